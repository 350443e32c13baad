//! Transactions over HTTP: begin, publish, ack, commit, abort.
//!
//! Transaction ids are u64 values below 2^63, answered as a JSON number and as a
//! decimal string; in paths they are plain decimal.

use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::subscriptions::{delivery_ids, settle_response};
use crate::{
    ApiError, AppState, BatchMessage, OutcomeView, check_name, json_response, message_from_json,
    parse_json, read_body,
};

/// Timeout of a transaction begun without one.
const DEFAULT_TIMEOUT_MS: u64 = 60_000;
/// Longest timeout (the core's limit).
const MAX_TIMEOUT_MS: u64 = 3_600_000;

type TxnPath = Result<Path<u64>, PathRejection>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BeginRequest {
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    topic: String,
    messages: Vec<BatchMessage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckRequest {
    topic: String,
    subscription: String,
    delivery_ids: Vec<Value>,
}

#[derive(Debug, Serialize)]
struct CommitResult {
    topic: String,
    #[serde(flatten)]
    outcome: OutcomeView,
}

fn txn_id(path: TxnPath) -> Result<u64, ApiError> {
    let Path(id) = path?;
    Ok(id)
}

pub(crate) async fn begin(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    let broker = state.broker()?;
    let (headers, body) = read_body(req, &state.config).await?;
    let r: BeginRequest = parse_json(&headers, &body, Some(BeginRequest::default()))?;
    let timeout_ms = r.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(ApiError::bad_request(
            "invalid_json",
            format!("timeout_ms must be between 1 and {MAX_TIMEOUT_MS} (1 h)"),
        ));
    }
    let id = broker.begin_transaction(Duration::from_millis(timeout_ms))?;
    tracing::debug!(transaction = id, timeout_ms, "transaction begun");
    // No Location header: a transaction is not a resource that can be fetched.
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "transaction_id": id,
            "transaction_id_str": id.to_string(),
            "timeout_ms": timeout_ms,
        }),
    ))
}

pub(crate) async fn publish(
    State(state): State<AppState>,
    path: TxnPath,
    req: Request,
) -> Result<Response, ApiError> {
    let id = txn_id(path)?;
    let broker = state.broker()?;
    let (headers, body) = read_body(req, &state.config).await?;
    let r: PublishRequest = parse_json(&headers, &body, None)?;
    drop(body);
    check_name(&r.topic, "topic")?;
    let messages = r
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message_from_json(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let count = messages.len();
    broker.transaction_publish(id, &r.topic, messages)?;
    tracing::debug!(transaction = id, topic = %r.topic, messages = count, "transaction publish queued");
    Ok(json_response(StatusCode::OK, &json!({ "queued": count })))
}

pub(crate) async fn ack(
    State(state): State<AppState>,
    path: TxnPath,
    req: Request,
) -> Result<Response, ApiError> {
    let id = txn_id(path)?;
    let broker = state.broker()?;
    let (headers, body) = read_body(req, &state.config).await?;
    let r: AckRequest = parse_json(&headers, &body, None)?;
    check_name(&r.topic, "topic")?;
    check_name(&r.subscription, "subscription")?;
    let ids = delivery_ids(&r.delivery_ids)?;
    let refused = broker.transaction_ack(id, &r.topic, &r.subscription, &ids)?;
    tracing::debug!(transaction = id, topic = %r.topic, subscription = %r.subscription, ids = ids.len(), refused = refused.len(), "transaction ack queued");
    settle_response("accepted", ids.len(), &refused)
}

pub(crate) async fn commit(
    State(state): State<AppState>,
    path: TxnPath,
) -> Result<Response, ApiError> {
    let id = txn_id(path)?;
    let broker = state.broker()?;
    let outcomes = broker.commit_transaction(id).await?;
    tracing::debug!(
        transaction = id,
        messages = outcomes.len(),
        "transaction committed"
    );
    let results: Vec<CommitResult> = outcomes
        .iter()
        .map(|(topic, o)| CommitResult {
            topic: topic.clone(),
            outcome: OutcomeView::from(o),
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "transaction_id": id, "transaction_id_str": id.to_string(), "results": results }),
    ))
}

pub(crate) async fn abort(
    State(state): State<AppState>,
    path: TxnPath,
) -> Result<StatusCode, ApiError> {
    let id = txn_id(path)?;
    state.broker()?.abort_transaction(id).await?;
    tracing::debug!(transaction = id, "transaction aborted by the client");
    Ok(StatusCode::NO_CONTENT)
}
