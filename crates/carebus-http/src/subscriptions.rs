//! Subscriptions over HTTP: settings, long-poll receive, ack/nack (also cumulative),
//! dead letters, and message traces.
//!
//! Delivery ids are u64 values below 2^63. They are answered both as a JSON number
//! (`delivery_id`) and as a decimal string (`delivery_id_str`, exact for clients whose
//! numbers are doubles), and ack/nack accept either form.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use carebus_core::{Delivery, SettleRefusal, Subscription, SubscriptionConfig, SubscriptionStats};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::stream::{FLAG_CONTENT_TYPE, FLAG_IDEMPOTENCY_KEY, FLAG_PARTITION_KEY};
use crate::{
    ApiError, AppState, MessageView, TopicPath, blocking, check_name, json_response, parse_json,
    push_base64_json, query_param, read_body, topic_name,
};

/// Most deliveries one receive answers.
pub(crate) const MAX_RECEIVE: u64 = 1000;
/// Longest long-poll.
pub(crate) const MAX_WAIT_MS: u64 = 60_000;
/// Most delivery ids in one ack or nack.
pub(crate) const MAX_IDS: usize = 10_000;
/// Longest consumer name.
const MAX_CONSUMER_LEN: usize = 200;
/// Longest nack delay: 24 h.
const MAX_NACK_DELAY_MS: u64 = 86_400_000;

/// Counters and gauges of a subscription on the wire.
#[derive(Debug, Serialize)]
pub(crate) struct StatsView {
    delivered: u64,
    redelivered: u64,
    acked: u64,
    nacked: u64,
    expired: u64,
    in_flight: u64,
    backlog: u64,
    dead_letters: u64,
}

impl From<SubscriptionStats> for StatsView {
    fn from(s: SubscriptionStats) -> Self {
        StatsView {
            delivered: s.delivered,
            redelivered: s.redelivered,
            acked: s.acked,
            nacked: s.nacked,
            expired: s.expired,
            in_flight: s.in_flight,
            backlog: s.backlog,
            dead_letters: s.dead_letters,
        }
    }
}

/// A subscription as answered by the subscription endpoints.
#[derive(Debug, Serialize)]
pub(crate) struct SubscriptionView {
    topic: String,
    name: String,
    config: SubscriptionConfig,
    stats: StatsView,
}

impl SubscriptionView {
    pub(crate) fn of(topic: &str, sub: &Subscription) -> Self {
        SubscriptionView {
            topic: topic.to_owned(),
            name: sub.name().to_owned(),
            config: sub.config(),
            stats: sub.stats().into(),
        }
    }
}

/// One delivery handed to a consumer.
#[derive(Debug, Serialize)]
struct DeliveryView {
    delivery_id: u64,
    delivery_id_str: String,
    attempt: u32,
    #[serde(flatten)]
    message: MessageView,
}

/// The media type of the binary receive answer (asked for with `Accept`).
pub const DELIVERIES_MEDIA_TYPE: &str = "application/vnd.carebus.deliveries";

/// Whether the request's `Accept` names the binary receive answer.
fn wants_binary(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            item.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(DELIVERIES_MEDIA_TYPE))
        })
}

/// A 4-byte big-endian length, then the bytes. (A stored field is far below 4 GiB: a
/// log record is; anything longer would be cut at the length written, never misframed.)
fn push_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(bytes.get(..n as usize).unwrap_or_default());
}

/// The binary receive answer (media type [`DELIVERIES_MEDIA_TYPE`]; layout in the
/// README): every field as stored, the bodies as they are (no base64, no JSON), keys
/// and header values byte for byte, repeated headers as separate entries.
fn deliveries_binary(deliveries: &[Delivery]) -> Vec<u8> {
    let bodies: usize = deliveries
        .iter()
        .map(|d| d.message.body.len())
        .fold(0usize, usize::saturating_add);
    let mut out =
        Vec::with_capacity(bodies.saturating_add(deliveries.len().saturating_mul(128)) + 8);
    out.push(1);
    let count = u32::try_from(deliveries.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for d in deliveries.iter().take(count as usize) {
        let m = &d.message;
        out.extend_from_slice(&d.delivery_id.to_be_bytes());
        out.extend_from_slice(&d.attempt.to_be_bytes());
        out.extend_from_slice(&m.partition.to_be_bytes());
        out.extend_from_slice(&m.offset.to_be_bytes());
        out.extend_from_slice(&m.timestamp_ms.to_be_bytes());
        let fields = [
            m.idempotency_key.as_deref(),
            m.partition_key.as_deref(),
            m.content_type.as_deref().map(str::as_bytes),
        ];
        let flags = [FLAG_IDEMPOTENCY_KEY, FLAG_PARTITION_KEY, FLAG_CONTENT_TYPE]
            .into_iter()
            .zip(&fields)
            .filter(|(_, f)| f.is_some())
            .fold(0u8, |acc, (flag, _)| acc | flag);
        out.push(flags);
        for f in fields.into_iter().flatten() {
            push_len_prefixed(&mut out, f);
        }
        let headers = u32::try_from(m.headers.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&headers.to_be_bytes());
        for (name, value) in m.headers.iter().take(headers as usize) {
            push_len_prefixed(&mut out, name.as_bytes());
            push_len_prefixed(&mut out, value);
        }
        push_len_prefixed(&mut out, &m.body);
    }
    out
}

/// The receive answer `{"deliveries":[…]}`, written into one buffer sized up front:
/// each delivery's fields through serde_json, then its body base64-encoded in place
/// ([`push_base64_json`]). Before, the body went through a `String` and serde_json's
/// escape scan, and the growing answer was copied as it doubled: together ~20 % of
/// the server's CPU while draining 1 KiB messages.
fn deliveries_answer(deliveries: &[Delivery]) -> Result<Vec<u8>, ApiError> {
    let bodies: usize = deliveries
        .iter()
        .map(|d| d.message.body.len().div_ceil(3).saturating_mul(4))
        .fold(0usize, usize::saturating_add);
    let mut out =
        Vec::with_capacity(bodies.saturating_add(deliveries.len().saturating_mul(400)) + 32);
    out.extend_from_slice(br#"{"deliveries":["#);
    for (i, d) in deliveries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let head = DeliveryView {
            delivery_id: d.delivery_id,
            delivery_id_str: d.delivery_id.to_string(),
            attempt: d.attempt,
            message: MessageView::without_body(&d.message),
        };
        serde_json::to_writer(&mut out, &head)
            .map_err(|e| ApiError::internal(&format!("cannot encode a delivery: {e}")))?;
        // The head is a non-empty object: it ends with its closing brace, and the
        // body goes in as its last field.
        if out.pop() != Some(b'}') {
            return Err(ApiError::internal("a delivery did not encode as an object"));
        }
        out.extend_from_slice(br#","body_base64":"#);
        push_base64_json(&mut out, &d.message.body);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveRequest {
    max: Option<u64>,
    wait_ms: Option<u64>,
    consumer: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AckRequest {
    delivery_ids: Option<Vec<Value>>,
    partition: Option<u32>,
    offset: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NackRequest {
    delivery_ids: Vec<Value>,
    reason: Option<String>,
    delay_ms: Option<u64>,
}

type SubPath = Result<Path<(String, String)>, PathRejection>;
type DeadLetterPath = Result<Path<(String, String, u64)>, PathRejection>;
type PositionPath = Result<Path<(String, u32, u64)>, PathRejection>;

fn names(path: SubPath) -> Result<(String, String), ApiError> {
    let Path((topic, sub)) = path?;
    check_name(&topic, "topic")?;
    check_name(&sub, "subscription")?;
    Ok((topic, sub))
}

/// Delivery ids from JSON numbers or decimal strings; duplicates dropped, order kept.
pub(crate) fn delivery_ids(values: &[Value]) -> Result<Vec<u64>, ApiError> {
    if values.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_delivery_id",
            "delivery_ids must not be empty",
        ));
    }
    if values.len() > MAX_IDS {
        return Err(ApiError::bad_request(
            "invalid_delivery_id",
            format!("at most {MAX_IDS} delivery ids per request"),
        ));
    }
    let mut seen = HashSet::with_capacity(values.len());
    let mut ids = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let id = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u64>().ok()
            }
            _ => None,
        };
        let Some(id) = id else {
            return Err(ApiError::bad_request(
                "invalid_delivery_id",
                format!(
                    "delivery_ids[{i}] must be a non-negative integer below 2^64, as a JSON number or a decimal string"
                ),
            ));
        };
        if seen.insert(id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

fn refusal_list(refused: &[(u64, SettleRefusal)]) -> Value {
    Value::Array(
        refused
            .iter()
            .map(|(id, why)| {
                json!({"delivery_id": id, "delivery_id_str": id.to_string(), "code": why.code()})
            })
            .collect(),
    )
}

/// 200 `{"<verb>": n, "refused": [...]}`, or 409 `stale_delivery` if every id was refused.
pub(crate) fn settle_response(
    verb: &str,
    asked: usize,
    refused: &[(u64, SettleRefusal)],
) -> Result<Response, ApiError> {
    let list = refusal_list(refused);
    if refused.len() >= asked {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "stale_delivery",
            format!(
                "none of the {asked} delivery ids is in flight (unknown, already settled, superseded by a redelivery, or its lease ran out); see `refused`"
            ),
        )
        .with("refused", list));
    }
    let mut body = serde_json::Map::new();
    body.insert(verb.to_owned(), json!(asked - refused.len()));
    body.insert("refused".to_owned(), list);
    Ok(json_response(StatusCode::OK, &Value::Object(body)))
}

pub(crate) async fn list(
    State(state): State<AppState>,
    path: TopicPath,
) -> Result<Response, ApiError> {
    let topic = topic_name(path)?;
    let subs = state.broker()?.subscriptions(&topic)?;
    let views: Vec<SubscriptionView> = subs
        .iter()
        .map(|s| SubscriptionView::of(&topic, s))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "subscriptions": views }),
    ))
}

pub(crate) async fn get_one(
    State(state): State<AppState>,
    path: SubPath,
) -> Result<Response, ApiError> {
    let (topic, name) = names(path)?;
    let sub = state.broker()?.subscription(&topic, &name)?;
    Ok(json_response(
        StatusCode::OK,
        &SubscriptionView::of(&topic, &sub),
    ))
}

pub(crate) async fn put(
    State(state): State<AppState>,
    path: SubPath,
    req: Request,
) -> Result<Response, ApiError> {
    let (topic, name) = names(path)?;
    let broker = state.broker()?;
    let (headers, body) = read_body(req, &state.config).await?;
    let config: SubscriptionConfig =
        parse_json(&headers, &body, Some(SubscriptionConfig::default()))?;
    let t = topic.clone();
    let (sub, created) = blocking(move || broker.put_subscription(&t, &name, config)).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = json_response(status, &SubscriptionView::of(&topic, &sub));
    if created
        && let Ok(v) =
            HeaderValue::from_str(&format!("/v1/topics/{topic}/subscriptions/{}", sub.name()))
    {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

pub(crate) async fn delete(
    State(state): State<AppState>,
    path: SubPath,
) -> Result<StatusCode, ApiError> {
    let (topic, name) = names(path)?;
    let broker = state.broker()?;
    // 404 for an unknown one without touching the store.
    broker.subscription(&topic, &name)?;
    blocking(move || broker.delete_subscription(&topic, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn receive(
    State(state): State<AppState>,
    path: SubPath,
    req: Request,
) -> Result<Response, ApiError> {
    let (topic, name) = names(path)?;
    let broker = state.broker()?;
    let (headers, body) = read_body(req, &state.config).await?;
    let r: ReceiveRequest = parse_json(&headers, &body, Some(ReceiveRequest::default()))?;
    let max = r.max.unwrap_or(1).clamp(1, MAX_RECEIVE);
    let wait = Duration::from_millis(r.wait_ms.unwrap_or(0).min(MAX_WAIT_MS));
    let consumer = r.consumer.unwrap_or_else(|| "default".to_owned());
    if consumer.is_empty()
        || consumer.chars().count() > MAX_CONSUMER_LEN
        || consumer.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            "invalid_consumer",
            format!(
                "consumer must be 1 to {MAX_CONSUMER_LEN} characters without control characters"
            ),
        ));
    }
    // 404 at once for an unknown subscription, before waiting.
    broker.subscription(&topic, &name)?;
    let max = usize::try_from(max).unwrap_or(1);
    let deliveries = tokio::select! {
        r = broker.receive(&topic, &name, &consumer, max, wait) => r?,
        () = state.slot.closed() => Vec::new(),
    };
    tracing::debug!(
        topic = %topic,
        subscription = %name,
        deliveries = deliveries.len(),
        "received"
    );
    let (answer, media_type) = if wants_binary(&headers) {
        (deliveries_binary(&deliveries), DELIVERIES_MEDIA_TYPE)
    } else {
        (deliveries_answer(&deliveries)?, "application/json")
    };
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(media_type))],
        answer,
    )
        .into_response())
}

pub(crate) async fn ack(
    State(state): State<AppState>,
    path: SubPath,
    req: Request,
) -> Result<Response, ApiError> {
    let (topic, name) = names(path)?;
    let broker = state.broker()?;
    let (headers, body) = read_body(req, &state.config).await?;
    let r: AckRequest = parse_json(&headers, &body, None)?;
    match (r.delivery_ids, r.partition, r.offset) {
        (Some(values), None, None) => {
            let ids = delivery_ids(&values)?;
            let refused = broker.ack(&topic, &name, &ids).await?;
            tracing::debug!(topic = %topic, subscription = %name, ids = ids.len(), refused = refused.len(), "acked");
            settle_response("acked", ids.len(), &refused)
        }
        (None, Some(partition), Some(offset)) => {
            broker.subscription(&topic, &name)?;
            let end = broker
                .topic(&topic)?
                .partition_log(partition)?
                .next_offset();
            if offset >= end {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "offset_beyond_end",
                    format!(
                        "partition {partition} ends before offset {offset} (next offset {end}); a cumulative ack may only cover stored messages"
                    ),
                ));
            }
            broker
                .ack_cumulative(&topic, &name, partition, offset)
                .await?;
            tracing::debug!(topic = %topic, subscription = %name, partition, offset, "cumulative ack");
            Ok(json_response(
                StatusCode::OK,
                &json!({ "acked_through": { "partition": partition, "offset": offset } }),
            ))
        }
        _ => Err(ApiError::bad_request(
            "invalid_json",
            "give either delivery_ids, or partition and offset (cumulative ack)",
        )),
    }
}

pub(crate) async fn nack(
    State(state): State<AppState>,
    path: SubPath,
    req: Request,
) -> Result<Response, ApiError> {
    let (topic, name) = names(path)?;
    let broker = state.broker()?;
    let (headers, body) = read_body(req, &state.config).await?;
    let r: NackRequest = parse_json(&headers, &body, None)?;
    let ids = delivery_ids(&r.delivery_ids)?;
    if r.delay_ms.is_some_and(|d| d > MAX_NACK_DELAY_MS) {
        return Err(ApiError::bad_request(
            "invalid_json",
            format!("delay_ms must be at most {MAX_NACK_DELAY_MS} (24 h)"),
        ));
    }
    let reason = r.reason.unwrap_or_else(|| "nacked".to_owned());
    let refused = broker
        .nack(&topic, &name, &ids, &reason, r.delay_ms)
        .await?;
    tracing::debug!(topic = %topic, subscription = %name, ids = ids.len(), refused = refused.len(), "nacked");
    settle_response("nacked", ids.len(), &refused)
}

pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    path: SubPath,
) -> Result<Response, ApiError> {
    let (topic, name) = names(path)?;
    let letters = state.broker()?.dead_letters(&topic, &name)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "dead_letters": letters }),
    ))
}

fn dead_letter_path(path: DeadLetterPath) -> Result<(String, String, u64), ApiError> {
    let Path((topic, sub, id)) = path?;
    check_name(&topic, "topic")?;
    check_name(&sub, "subscription")?;
    Ok((topic, sub, id))
}

pub(crate) async fn replay_dead_letter(
    State(state): State<AppState>,
    path: DeadLetterPath,
) -> Result<StatusCode, ApiError> {
    let (topic, name, id) = dead_letter_path(path)?;
    state
        .broker()?
        .replay_dead_letter(&topic, &name, id)
        .await?;
    tracing::info!(topic = %topic, subscription = %name, dead_letter = id, "dead letter replayed");
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn discard_dead_letter(
    State(state): State<AppState>,
    path: DeadLetterPath,
) -> Result<StatusCode, ApiError> {
    let (topic, name, id) = dead_letter_path(path)?;
    state
        .broker()?
        .discard_dead_letter(&topic, &name, id)
        .await?;
    tracing::info!(topic = %topic, subscription = %name, dead_letter = id, "dead letter discarded");
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn trace_position(
    State(state): State<AppState>,
    path: PositionPath,
) -> Result<Response, ApiError> {
    let Path((topic, partition, offset)) = path?;
    check_name(&topic, "topic")?;
    let broker: Arc<_> = state.broker()?;
    let found = blocking(move || broker.trace(&topic, partition, offset)).await?;
    match found {
        Some(t) => Ok(json_response(StatusCode::OK, &t)),
        None => Err(ApiError::not_found(format!(
            "no message at partition {partition} offset {offset}"
        ))),
    }
}

pub(crate) async fn trace_key(
    State(state): State<AppState>,
    path: TopicPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let topic = topic_name(path)?;
    let key = query
        .as_deref()
        .and_then(|q| query_param(q, "idempotency_key"))
        .transpose()?
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "missing_parameter",
                "give the query parameter idempotency_key (percent-encoded)",
            )
        })?;
    let broker = state.broker()?;
    let found = blocking(move || broker.trace_by_idempotency_key(&topic, &key)).await?;
    match found {
        Some(t) => Ok(json_response(StatusCode::OK, &t)),
        None => Err(ApiError::not_found(
            "no message with that idempotency key within the deduplication window",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use bytes::Bytes;
    use carebus_core::StoredMessage;
    use proptest::prelude::*;

    fn delivery(
        body: Vec<u8>,
        key: Option<Vec<u8>>,
        headers: Vec<(String, Vec<u8>)>,
        id: u64,
    ) -> Delivery {
        Delivery {
            delivery_id: id,
            attempt: u32::try_from(id % 5).unwrap() + 1,
            message: StoredMessage {
                partition: u32::try_from(id % 3).unwrap(),
                offset: id * 7,
                timestamp_ms: 1_700_000_000_000,
                partition_key: key.clone().map(Bytes::from),
                idempotency_key: key.map(Bytes::from),
                content_type: id
                    .is_multiple_of(2)
                    .then(|| "x-application/hl7-v2+er7".to_owned()),
                headers: headers
                    .into_iter()
                    .map(|(n, v)| (n, Bytes::from(v)))
                    .collect(),
                body: Bytes::from(body),
                body_hash: 0,
            },
        }
    }

    /// Up to 6 deliveries with any bodies and keys (binary, empty, not UTF-8) and
    /// headers named by `names`.
    fn deliveries(names: &'static str) -> impl Strategy<Value = Vec<Delivery>> {
        proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..1500),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
                proptest::collection::vec(
                    (names, proptest::collection::vec(any::<u8>(), 0..12)),
                    0..3,
                ),
            ),
            0..6,
        )
        .prop_map(|items| {
            items
                .into_iter()
                .enumerate()
                .map(|(i, (body, key, headers))| delivery(body, key, headers, i as u64 + 1))
                .collect()
        })
    }

    /// Reads a binary receive answer back (independently of the writer) into
    /// (id, attempt, partition, offset, timestamp, keys, content type, headers, body).
    #[allow(clippy::type_complexity)]
    fn read_binary(
        mut b: &[u8],
    ) -> Vec<(
        u64,
        u32,
        u32,
        u64,
        i64,
        [Option<Vec<u8>>; 3],
        Vec<(Vec<u8>, Vec<u8>)>,
        Vec<u8>,
    )> {
        fn n<const K: usize>(b: &mut &[u8]) -> [u8; K] {
            let (head, rest) = b.split_at(K);
            *b = rest;
            head.try_into().unwrap()
        }
        fn field(b: &mut &[u8]) -> Vec<u8> {
            let len = u32::from_be_bytes(n::<4>(b)) as usize;
            let (f, rest) = b.split_at(len);
            *b = rest;
            f.to_vec()
        }
        assert_eq!(n::<1>(&mut b), [1]);
        let count = u32::from_be_bytes(n::<4>(&mut b));
        let mut out = Vec::new();
        for _ in 0..count {
            let id = u64::from_be_bytes(n::<8>(&mut b));
            let attempt = u32::from_be_bytes(n::<4>(&mut b));
            let partition = u32::from_be_bytes(n::<4>(&mut b));
            let offset = u64::from_be_bytes(n::<8>(&mut b));
            let ts = i64::from_be_bytes(n::<8>(&mut b));
            let [flags] = n::<1>(&mut b);
            let fields = [1u8, 2, 4].map(|f| (flags & f != 0).then(|| field(&mut b)));
            let hc = u32::from_be_bytes(n::<4>(&mut b));
            let headers = (0..hc).map(|_| (field(&mut b), field(&mut b))).collect();
            let body = field(&mut b);
            out.push((id, attempt, partition, offset, ts, fields, headers, body));
        }
        assert!(b.is_empty(), "{} bytes left", b.len());
        out
    }

    #[test]
    fn accept_picks_the_binary_answer_only_when_named() {
        let mut h = axum::http::HeaderMap::new();
        assert!(!wants_binary(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!wants_binary(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json;q=0.5, Application/Vnd.Carebus.Deliveries"),
        );
        assert!(wants_binary(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.carebus.deliveries-other"),
        );
        assert!(!wants_binary(&h));
    }

    proptest! {
        /// The binary receive answer carries every field of every delivery exactly,
        /// keys, header values and bodies byte for byte, repeated headers apart.
        #[test]
        fn the_binary_receive_answer_carries_every_field(ds in deliveries("[a-z]{1,6}")) {
            let read = read_binary(&deliveries_binary(&ds));
            prop_assert_eq!(read.len(), ds.len());
            for (d, r) in ds.iter().zip(read) {
                let m = &d.message;
                prop_assert_eq!((r.0, r.1, r.2, r.3, r.4), (d.delivery_id, d.attempt, m.partition, m.offset, m.timestamp_ms));
                prop_assert_eq!(&r.5[0], &m.idempotency_key.as_ref().map(|k| k.to_vec()));
                prop_assert_eq!(&r.5[1], &m.partition_key.as_ref().map(|k| k.to_vec()));
                prop_assert_eq!(&r.5[2], &m.content_type.as_ref().map(|c| c.as_bytes().to_vec()));
                let headers: Vec<(Vec<u8>, Vec<u8>)> = m
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
                    .collect();
                prop_assert_eq!(&r.6, &headers);
                prop_assert_eq!(&r.7[..], &m.body[..]);
            }
        }

        /// The hand-written receive answer is the JSON the serde views give, for any
        /// bodies, keys and headers (binary, empty, not UTF-8, needing escapes).
        #[test]
        fn the_receive_answer_is_the_json_of_the_views(ds in deliveries("[a-z\"\\\\]{1,6}")) {
            let written = deliveries_answer(&ds).unwrap();
            let parsed: Value = serde_json::from_slice(&written).unwrap();
            let reference: Vec<Value> = ds
                .iter()
                .map(|d| {
                    serde_json::to_value(DeliveryView {
                        delivery_id: d.delivery_id,
                        delivery_id_str: d.delivery_id.to_string(),
                        attempt: d.attempt,
                        message: MessageView::from(&d.message),
                    })
                    .unwrap()
                })
                .collect();
            prop_assert_eq!(&parsed, &json!({ "deliveries": reference }));
            for (d, v) in ds.iter().zip(parsed["deliveries"].as_array().unwrap()) {
                let body = base64::engine::general_purpose::STANDARD
                    .decode(v["body_base64"].as_str().unwrap())
                    .unwrap();
                prop_assert_eq!(&body[..], &d.message.body[..]);
            }
        }
    }

    #[test]
    fn delivery_ids_come_as_numbers_or_strings_and_are_deduplicated() {
        let big = (1u64 << 62) + 12_345;
        let ids = delivery_ids(&[json!(7), json!(big.to_string()), json!(7), json!(big)]).unwrap();
        assert_eq!(ids, vec![7, big]);
        for bad in [
            json!(-1),
            json!(1.5),
            json!(""),
            json!("12a"),
            json!(null),
            json!("-3"),
        ] {
            let e = delivery_ids(std::slice::from_ref(&bad)).unwrap_err();
            assert_eq!(e.code, "invalid_delivery_id", "{bad}");
        }
        assert!(delivery_ids(&[]).is_err());
        assert!(delivery_ids(&[json!("18446744073709551616")]).is_err());
    }
}
