//! The carebus HTTP/JSON front-end: topics, exactly-once publish and reads,
//! subscriptions (long-poll receive, ack/nack, dead letters), message traces,
//! transactions and Prometheus metrics.
//!
//! [`router`] builds an axum [`Router`] over a [`Broker`]. The broker may arrive later
//! (a [`BrokerSlot`] filled once the store is recovered): until then `/healthz` answers
//! 200, `/readyz` 503 and every `/v1` endpoint 503 `not_ready`. Every error is an
//! RFC 9457 `application/problem+json` document with a stable `code`; see `README.md`
//! in this crate for the endpoints and `GET /openapi.json` for the machine-readable
//! description. Logs carry topic names, partitions, offsets and sizes, never bodies.

// The hand-written OpenAPI document is one large `serde_json::json!` literal.
#![recursion_limit = "512"]

mod metrics;
mod openapi;
mod problem;
mod stream;
mod subscriptions;
mod transactions;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use carebus_core::{
    Broker, PublishMessage, PublishOutcome, StoredMessage, TopicConfig, TopicRuntime, validate_name,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use openapi::openapi;
pub use problem::{ApiError, PROBLEM_JSON};
pub use stream::{BINARY_FRAME_VERSION, decode_binary_stream_frame, decode_stream_frame};

/// Default largest request body: 8 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

/// Prefix of request headers that become message headers (`X-Carebus-Header-<Name>`).
pub const HEADER_PREFIX: &str = "x-carebus-header-";

/// Settings of the HTTP front-end.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body accepted (413 `body_too_large` above it).
    pub max_body_bytes: usize,
    /// Longest pause allowed while a request body arrives (408 `body_timeout` after it):
    /// a client that trickles its body cannot hold a connection and a task forever.
    pub body_idle_timeout: Duration,
}

/// Default [`HttpConfig::body_idle_timeout`].
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
        }
    }
}

/// Where the broker will be once it is open; shared by the router and its owner.
///
/// It also carries the shutdown signal: [`BrokerSlot::close`] makes waiting long-polls
/// answer at once (with what they have), so a graceful shutdown is not held up by them.
#[derive(Debug, Clone)]
pub struct BrokerSlot {
    broker: Arc<OnceLock<Arc<Broker>>>,
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for BrokerSlot {
    fn default() -> Self {
        BrokerSlot {
            broker: Arc::default(),
            closing: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

impl BrokerSlot {
    /// An empty slot: the API answers 503 until [`BrokerSlot::set`].
    pub fn new() -> Self {
        BrokerSlot::default()
    }

    /// Puts the open broker in; returns false if one was already there.
    pub fn set(&self, broker: Arc<Broker>) -> bool {
        self.broker.set(broker).is_ok()
    }

    /// The broker, once open.
    pub fn get(&self) -> Option<&Arc<Broker>> {
        self.broker.get()
    }

    /// Announces shutdown: long-polls waiting in `receive` answer now.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`BrokerSlot::close`] has been called.
    pub(crate) async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        // The sender lives as long as this slot, so this only ends by a close.
        let _ = rx.wait_for(|closing| *closing).await;
    }
}

impl From<Arc<Broker>> for BrokerSlot {
    fn from(broker: Arc<Broker>) -> Self {
        let slot = BrokerSlot::new();
        slot.set(broker);
        slot
    }
}

#[derive(Debug, Clone)]
pub(crate) struct AppState {
    slot: BrokerSlot,
    config: HttpConfig,
    metrics: Arc<metrics::HttpMetrics>,
}

impl AppState {
    pub(crate) fn broker(&self) -> Result<Arc<Broker>, ApiError> {
        self.slot.get().cloned().ok_or_else(ApiError::not_ready)
    }
}

/// Builds the HTTP API (including `/healthz`, `/readyz` and `/openapi.json`).
pub fn router(slot: impl Into<BrokerSlot>, config: HttpConfig) -> Router {
    let limit = config.max_body_bytes;
    let state = AppState {
        slot: slot.into(),
        config,
        metrics: Arc::default(),
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_doc))
        .route("/v1/topics", get(list_topics))
        .route(
            "/v1/topics/{topic}",
            get(get_topic).put(put_topic).delete(delete_topic),
        )
        .route(
            "/v1/topics/{topic}/messages",
            get(find_message).post(publish_one),
        )
        .route("/v1/topics/{topic}/messages:batch", post(publish_batch))
        .route(
            "/v1/topics/{topic}/messages:stream",
            get(stream::publish_stream),
        )
        .route(
            "/v1/topics/{topic}/messages/{partition}/{offset}",
            get(read_message),
        )
        .route(
            "/v1/topics/{topic}/messages/{partition}/{offset}/trace",
            get(subscriptions::trace_position),
        )
        .route("/v1/topics/{topic}/trace", get(subscriptions::trace_key))
        .route("/v1/topics/{topic}/subscriptions", get(subscriptions::list))
        .route(
            "/v1/topics/{topic}/subscriptions/{subscription}",
            get(subscriptions::get_one)
                .put(subscriptions::put)
                .delete(subscriptions::delete),
        )
        .route(
            "/v1/topics/{topic}/subscriptions/{subscription}/receive",
            post(subscriptions::receive),
        )
        .route(
            "/v1/topics/{topic}/subscriptions/{subscription}/ack",
            post(subscriptions::ack),
        )
        .route(
            "/v1/topics/{topic}/subscriptions/{subscription}/nack",
            post(subscriptions::nack),
        )
        .route(
            "/v1/topics/{topic}/subscriptions/{subscription}/dead-letters",
            get(subscriptions::dead_letters),
        )
        .route(
            "/v1/topics/{topic}/subscriptions/{subscription}/dead-letters/{id}",
            axum::routing::delete(subscriptions::discard_dead_letter),
        )
        .route(
            "/v1/topics/{topic}/subscriptions/{subscription}/dead-letters/{id}/replay",
            post(subscriptions::replay_dead_letter),
        )
        .route("/v1/transactions", post(transactions::begin))
        .route(
            "/v1/transactions/{transaction}/publish",
            post(transactions::publish),
        )
        .route(
            "/v1/transactions/{transaction}/ack",
            post(transactions::ack),
        )
        .route(
            "/v1/transactions/{transaction}/commit",
            post(transactions::commit),
        )
        .route(
            "/v1/transactions/{transaction}/abort",
            post(transactions::abort),
        )
        .route("/metrics", get(metrics::endpoint))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.slot.get().is_some() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "recovering\n")
    }
}

async fn openapi_doc() -> axum::Json<serde_json::Value> {
    axum::Json(openapi())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see GET /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not support that method (see the Allow header)",
    )
}

// ---------------------------------------------------------------------------------
// Wire shapes

/// A topic as answered by the topic endpoints.
#[derive(Debug, Serialize)]
struct TopicView {
    subscriptions: Vec<subscriptions::SubscriptionView>,
    name: String,
    partitions: u32,
    config: TopicConfig,
    end_offsets: Vec<u64>,
    start_offsets: Vec<u64>,
    published: u64,
    duplicates: u64,
    conflicts: u64,
}

impl TopicView {
    fn of(broker: &Broker, rt: &TopicRuntime) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let topic = rt.topic();
        // A topic deleted meanwhile simply shows no subscriptions.
        let subscriptions = broker
            .subscriptions(rt.name())
            .unwrap_or_default()
            .iter()
            .map(|s| subscriptions::SubscriptionView::of(rt.name(), s))
            .collect();
        TopicView {
            subscriptions,
            name: rt.name().to_owned(),
            partitions: topic.config.partitions,
            config: topic.config,
            end_offsets: topic.partitions.iter().map(|l| l.next_offset()).collect(),
            start_offsets: topic.partitions.iter().map(|l| l.start_offset()).collect(),
            published: rt.counters.published.load(Relaxed),
            duplicates: rt.counters.duplicates.load(Relaxed),
            conflicts: rt.counters.conflicts.load(Relaxed),
        }
    }
}

/// The answer to one published message.
#[derive(Debug, Serialize)]
pub(crate) struct OutcomeView {
    partition: u32,
    offset: u64,
    duplicate: bool,
    conflict: bool,
    durability: &'static str,
}

impl From<&PublishOutcome> for OutcomeView {
    fn from(o: &PublishOutcome) -> Self {
        OutcomeView {
            partition: o.partition,
            offset: o.offset,
            duplicate: o.duplicate,
            conflict: o.conflict,
            durability: o.durability.as_str(),
        }
    }
}

/// A stored message read back.
#[derive(Debug, Serialize)]
pub(crate) struct MessageView {
    partition: u32,
    offset: u64,
    timestamp_ms: i64,
    partition_key: Option<String>,
    idempotency_key: Option<String>,
    content_type: Option<String>,
    headers: BTreeMap<String, String>,
    /// Always there in answers; `None` only while the receive answer writes the body
    /// itself (see `subscriptions::deliveries_answer`). Kept the last field.
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<Base64Body>,
}

/// A body, written out as standard base64 when the answer is serialised (not before).
/// About 1 µs per 1 KiB body, half the encoding and half serde_json's escape scan of
/// the encoded string (streaming `Base64Display` instead measured the same).
#[derive(Debug)]
pub(crate) struct Base64Body(Bytes);

/// Appends `body` as a JSON string of its standard base64, encoded in place. Base64
/// text never needs escaping, so this skips serde_json's escape scan and the
/// intermediate `String`.
pub(crate) fn push_base64_json(out: &mut Vec<u8>, body: &[u8]) {
    out.push(b'"');
    let start = out.len();
    let len = base64::encoded_len(body.len(), true).unwrap_or(0);
    out.resize(start + len, 0);
    match out
        .get_mut(start..)
        .map(|buf| BASE64.encode_slice(body, buf))
    {
        Some(Ok(written)) => out.truncate(start + written),
        // Not reachable (the buffer is sized by `encoded_len`); the slow path is exact.
        _ => {
            out.truncate(start);
            out.extend_from_slice(BASE64.encode(body).as_bytes());
        }
    }
    out.push(b'"');
}

impl Serialize for Base64Body {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(&self.0))
    }
}

fn text(b: &[u8]) -> String {
    // Keys and header values enter through this API as UTF-8, so this is exact for them.
    String::from_utf8_lossy(b).into_owned()
}

impl From<&StoredMessage> for MessageView {
    fn from(m: &StoredMessage) -> Self {
        let mut view = MessageView::without_body(m);
        view.body_base64 = Some(Base64Body(m.body.clone()));
        view
    }
}

impl MessageView {
    /// The view of everything but the body (which the caller writes itself).
    pub(crate) fn without_body(m: &StoredMessage) -> Self {
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in &m.headers {
            headers
                .entry(name.clone())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&text(value));
                })
                .or_insert_with(|| text(value));
        }
        MessageView {
            partition: m.partition,
            offset: m.offset,
            timestamp_ms: m.timestamp_ms,
            partition_key: m.partition_key.as_deref().map(text),
            idempotency_key: m.idempotency_key.as_deref().map(text),
            content_type: m.content_type.clone(),
            headers,
            body_base64: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    messages: Vec<BatchMessage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchMessage {
    body: Option<String>,
    body_base64: Option<String>,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    partition_key: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct Results {
    results: Vec<OutcomeView>,
}

// ---------------------------------------------------------------------------------
// Request helpers

pub(crate) type TopicPath = Result<Path<String>, PathRejection>;

/// Checks a topic or subscription name against `[A-Za-z0-9._-]{1,200}`.
pub(crate) fn check_name(name: &str, what: &str) -> Result<(), ApiError> {
    validate_name(name).map_err(|_| {
        ApiError::bad_request(
            "invalid_name",
            format!("{what} names must match [A-Za-z0-9._-]{{1,200}} and not be . or .."),
        )
    })
}

/// The topic name from the path, checked against `[A-Za-z0-9._-]{1,200}`.
pub(crate) fn topic_name(path: TopicPath) -> Result<String, ApiError> {
    let Path(name) = path?;
    check_name(&name, "topic")?;
    Ok(name)
}

/// Reads the body, refusing it by its declared length before reading when too large.
/// Reads a request body of at most `max_body_bytes`, failing with 408 `body_timeout`
/// when no part of it arrives for `body_idle_timeout`.
pub(crate) async fn read_body(
    req: Request,
    config: &HttpConfig,
) -> Result<(HeaderMap, Bytes), ApiError> {
    use futures_util::StreamExt;

    let limit = config.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::body_too_large(limit));
    }
    let (parts, body) = req.into_parts();
    let mut chunks = body.into_data_stream();
    // Capacity from the declared length, but never trusted beyond 1 MiB up front.
    let expected = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit));
    let mut buf = BytesMut::with_capacity(expected.min(limit).min(1 << 20));
    loop {
        let next = tokio::time::timeout(config.body_idle_timeout, chunks.next())
            .await
            .map_err(|_| ApiError::body_timeout(config.body_idle_timeout))?;
        match next {
            None => break,
            Some(Ok(chunk)) => {
                if buf.len().saturating_add(chunk.len()) > limit {
                    return Err(ApiError::body_too_large(limit));
                }
                buf.extend_from_slice(&chunk);
            }
            Some(Err(_)) => {
                return Err(ApiError::bad_request(
                    "unreadable_body",
                    "the request body could not be read",
                ));
            }
        }
    }
    Ok((parts.headers, buf.freeze()))
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses a JSON body. An empty body without a content type is `empty` if given.
pub(crate) fn parse_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    empty: Option<T>,
) -> Result<T, ApiError> {
    if body.is_empty()
        && !headers.contains_key(header::CONTENT_TYPE)
        && let Some(v) = empty
    {
        return Ok(v);
    }
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "this endpoint takes a JSON body: send Content-Type: application/json",
        ));
    }
    // serde_json's messages name fields, types and positions; a type mismatch also
    // quotes the offending string value (`invalid type: string "…"`), which goes back
    // only to its sender, in the problem detail (problem details are not logged).
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("malformed_json", e.to_string()))?;
    // serde would also read a struct from an array of its fields: only objects are taken.
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    T::deserialize(value).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))
}

fn utf8_header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "invalid_header",
            format!("header {name} must appear at most once"),
        ));
    }
    let s = std::str::from_utf8(v.as_bytes()).map_err(|_| {
        ApiError::bad_request("invalid_header", format!("header {name} must be UTF-8"))
    })?;
    Ok(Some(s.to_owned()))
}

fn non_empty_key(value: Option<String>, what: &str) -> Result<Option<Bytes>, ApiError> {
    match value {
        Some(v) if v.is_empty() => Err(ApiError::bad_request(
            "invalid_header",
            format!("{what} must not be empty"),
        )),
        other => Ok(other.map(Bytes::from)),
    }
}

/// The message described by an HTTP request: body + headers.
fn message_from_http(headers: &HeaderMap, body: Bytes) -> Result<PublishMessage, ApiError> {
    let content_type = utf8_header(headers, header::CONTENT_TYPE.as_str())?;
    let idempotency_key =
        non_empty_key(utf8_header(headers, "idempotency-key")?, "Idempotency-Key")?;
    let partition_key = non_empty_key(utf8_header(headers, "partition-key")?, "Partition-Key")?;
    let mut user: Vec<(String, Bytes)> = Vec::new();
    for (name, value) in headers {
        let Some(short) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        if short.is_empty() {
            continue;
        }
        let value = std::str::from_utf8(value.as_bytes()).map_err(|_| {
            ApiError::bad_request(
                "invalid_header",
                format!("header {} must be UTF-8", name.as_str()),
            )
        })?;
        // Repeated fields combine with ", " (RFC 9110 section 5.3).
        if let Some((_, v)) = user.iter_mut().find(|(n, _)| n == short) {
            let mut joined = v.to_vec();
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(value.as_bytes());
            *v = Bytes::from(joined);
        } else {
            user.push((short.to_owned(), Bytes::copy_from_slice(value.as_bytes())));
        }
    }
    Ok(PublishMessage {
        body,
        content_type,
        partition_key,
        idempotency_key,
        headers: user,
    })
}

pub(crate) fn message_from_json(i: usize, m: BatchMessage) -> Result<PublishMessage, ApiError> {
    let body = match (m.body, m.body_base64) {
        (Some(text), None) => Bytes::from(text),
        (None, Some(b64)) => Bytes::from(BASE64.decode(b64.as_bytes()).map_err(|_| {
            ApiError::bad_request(
                "invalid_base64",
                format!(
                    "messages[{i}].body_base64 is not valid base64 (standard alphabet, padded)"
                ),
            )
        })?),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_message",
                format!("messages[{i}] must have exactly one of body and body_base64"),
            ));
        }
    };
    build_message(
        &format!("messages[{i}]"),
        MessageParts {
            body,
            content_type: m.content_type,
            partition_key: m.partition_key,
            idempotency_key: m.idempotency_key,
            headers: m
                .headers
                .into_iter()
                .map(|(n, v)| (n, Bytes::from(v)))
                .collect(),
        },
    )
}

/// A message to publish as a front-end read it, before the API's rules are applied.
pub(crate) struct MessageParts {
    pub(crate) body: Bytes,
    pub(crate) content_type: Option<String>,
    pub(crate) partition_key: Option<String>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) headers: Vec<(String, Bytes)>,
}

/// The API's rules for a message, whatever encoding it came in (JSON or a binary
/// stream frame): keys, if given, are not empty; header names are not empty and are
/// stored lowercase. `what` names the message in errors.
pub(crate) fn build_message(what: &str, m: MessageParts) -> Result<PublishMessage, ApiError> {
    let key = |v: Option<String>, field: &str| match v {
        Some(v) if v.is_empty() => Err(ApiError::bad_request(
            "invalid_message",
            format!("{what}.{field} must not be empty"),
        )),
        other => Ok(other.map(Bytes::from)),
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for (name, value) in m.headers {
        if name.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_message",
                format!("{what}.headers has an empty name"),
            ));
        }
        headers.push((name.to_ascii_lowercase(), value));
    }
    Ok(PublishMessage {
        body: m.body,
        content_type: m.content_type,
        partition_key: key(m.partition_key, "partition_key")?,
        idempotency_key: key(m.idempotency_key, "idempotency_key")?,
        headers,
    })
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, carebus_core::BrokerError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal(&e.to_string())),
    }
}

pub(crate) fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    (status, axum::Json(value)).into_response()
}

// ---------------------------------------------------------------------------------
// Handlers

async fn list_topics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let broker = state.broker()?;
    let topics: Vec<TopicView> = broker
        .topics()
        .iter()
        .map(|rt| TopicView::of(&broker, rt))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "topics": topics }),
    ))
}

async fn get_topic(State(state): State<AppState>, path: TopicPath) -> Result<Response, ApiError> {
    let name = topic_name(path)?;
    let broker = state.broker()?;
    let rt = broker.topic(&name)?;
    Ok(json_response(StatusCode::OK, &TopicView::of(&broker, &rt)))
}

async fn put_topic(
    State(state): State<AppState>,
    path: TopicPath,
    req: Request,
) -> Result<Response, ApiError> {
    let name = topic_name(path)?;
    let broker = state.broker()?;
    let (headers, body) = read_body(req, &state.config).await?;
    let config: TopicConfig = parse_json(&headers, &body, Some(TopicConfig::default()))?;
    let b = Arc::clone(&broker);
    let (rt, created) = blocking(move || b.put_topic(&name, config)).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = json_response(status, &TopicView::of(&broker, &rt));
    if created && let Ok(v) = HeaderValue::from_str(&format!("/v1/topics/{}", rt.name())) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

async fn delete_topic(
    State(state): State<AppState>,
    path: TopicPath,
) -> Result<StatusCode, ApiError> {
    let name = topic_name(path)?;
    let broker = state.broker()?;
    // Answer 404 for an unknown topic without touching the store.
    broker.topic(&name)?;
    blocking(move || broker.delete_topic(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn publish_one(
    State(state): State<AppState>,
    path: TopicPath,
    req: Request,
) -> Result<Response, ApiError> {
    let name = topic_name(path)?;
    let broker = state.broker()?;
    let (headers, body) = read_body(req, &state.config).await?;
    let size = body.len();
    let message = message_from_http(&headers, body)?;
    let outcomes = broker.publish(&name, vec![message]).await?;
    let Some(outcome) = outcomes.first() else {
        return Err(ApiError::internal("publish answered no outcome"));
    };
    tracing::debug!(
        topic = %name,
        partition = outcome.partition,
        offset = outcome.offset,
        bytes = size,
        duplicate = outcome.duplicate,
        conflict = outcome.conflict,
        "published"
    );
    let status = if outcome.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_response(status, &OutcomeView::from(outcome)))
}

async fn publish_batch(
    State(state): State<AppState>,
    path: TopicPath,
    req: Request,
) -> Result<Response, ApiError> {
    let name = topic_name(path)?;
    let broker = state.broker()?;
    let (headers, body) = read_body(req, &state.config).await?;
    let batch: BatchRequest = parse_json(&headers, &body, None)?;
    drop(body);
    let messages = batch
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message_from_json(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let count = messages.len();
    let outcomes = broker.publish(&name, messages).await?;
    let stored = outcomes.iter().filter(|o| !o.duplicate).count();
    tracing::debug!(topic = %name, messages = count, stored, "batch published");
    let status = if stored > 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(
        status,
        &Results {
            results: outcomes.iter().map(OutcomeView::from).collect(),
        },
    ))
}

async fn read_message(
    State(state): State<AppState>,
    path: Result<Path<(String, u32, u64)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((name, partition, offset)) = path?;
    let name = topic_name(Ok(Path(name)))?;
    let rt = state.broker()?.topic(&name)?;
    let found = blocking(move || rt.read_one(partition, offset)).await?;
    match found {
        Some(m) => Ok(json_response(StatusCode::OK, &MessageView::from(&m))),
        None => Err(ApiError::not_found(format!(
            "no message at partition {partition} offset {offset}"
        ))),
    }
}

async fn find_message(
    State(state): State<AppState>,
    path: TopicPath,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let name = topic_name(path)?;
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
    let rt = state.broker()?.topic(&name)?;
    let now = carebus_log::now_ms();
    let found = blocking(move || rt.find_by_idempotency_key(&key, now)).await?;
    match found {
        Some(m) => Ok(json_response(StatusCode::OK, &MessageView::from(&m))),
        None => Err(ApiError::not_found(
            "no message with that idempotency key within the deduplication window",
        )),
    }
}

/// The first value of `name` in an `application/x-www-form-urlencoded` query, decoded.
pub(crate) fn query_param(query: &str, name: &str) -> Option<Result<Vec<u8>, ApiError>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(k) {
            Some(k) if k == name.as_bytes() => Some(percent_decode(v).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("query parameter {name} has invalid percent-encoding"),
                )
            })),
            _ => None,
        }
    })
}

/// Decodes `%XX` escapes and `+` (space); `None` on a malformed escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_percent_decoded_and_bad_escapes_refused() {
        assert_eq!(percent_decode("a%7Cb+c%00"), Some(b"a|b c\0".to_vec()));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%+1"), None);
        let q = "x=1&idempotency_key=MSG%7C1&idempotency_key=other";
        assert_eq!(
            query_param(q, "idempotency_key").unwrap().unwrap(),
            b"MSG|1".to_vec()
        );
        assert!(query_param("y=2", "idempotency_key").is_none());
        assert!(
            query_param("idempotency_key=%G1", "idempotency_key")
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn json_content_types_are_recognised() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        for (ct, ok) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/problem+json", true),
            ("text/plain", false),
            ("application/x-www-form-urlencoded", false),
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_json(&h), ok, "{ct}");
        }
    }
}
