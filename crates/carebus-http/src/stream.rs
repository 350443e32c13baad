//! `GET /v1/topics/{topic}/messages:stream`: pipelined publishing over a WebSocket.
//!
//! One HTTP request per message costs the server more CPU than the publish itself; a
//! producer that keeps hundreds of messages in flight can instead open this WebSocket
//! and send one text frame per message without waiting for the answers:
//!
//! ```text
//! → {"id": 7, "message": {"body": "MSH|…", "idempotency_key": "LAB|1", …}}
//! ← {"id": 7, "result": {"partition": 0, "offset": 12, "duplicate": false,
//!                        "conflict": false, "durability": "fsynced"}}
//! ← {"id": 8, "error": {"status": 400, "code": "invalid_message", "detail": "…"}}
//! ```
//!
//! `message` is exactly an element of `messages:batch` (`body` or `body_base64`,
//! `content_type`, `idempotency_key`, `partition_key`, `headers`); `id` is the client's
//! (an unsigned integer) and comes back with the answer. Each message is published on
//! its own, with the same exactly-once guarantees as `POST …/messages`: a result is sent
//! only once the message is durable (or found to be a duplicate). Frames that arrive
//! together (up to [`MAX_GROUP`] of them) are handed to the core as one group
//! ([`carebus_core::Broker::publish_each`]): one append per partition, in the order
//! sent, yet each message succeeds or fails on its own. Answers come back in
//! the order the publishes complete, which is not necessarily the order sent (messages
//! of one partition key are still stored in the order they were sent on this socket only
//! if the producer waits for each answer; pipelined sends race like concurrent requests).
//! A frame that is not such an object is answered with an error whose `id` is `null`
//! when none could be read; the socket stays open. At most [`MAX_IN_FLIGHT`] publishes
//! per socket run at once (reading pauses beyond that); a socket with no frame from the
//! client for [`IDLE_TIMEOUT`] is closed (clients keep it alive with pings). Frames held
//! by running publishes are also bounded in bytes per socket ([`MAX_IN_FLIGHT_KIB`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use carebus_core::PublishMessage;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

use crate::problem::ApiError;
use crate::{AppState, BatchMessage, OutcomeView, TopicPath, message_from_json, topic_name};

/// Publishes one socket may have running at once.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Bytes of frames one socket may have in running publishes (KiB; 64 MiB).
pub const MAX_IN_FLIGHT_KIB: u32 = 64 * 1024;
/// A socket without any frame from the client for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamFrame {
    id: u64,
    message: BatchMessage,
}

#[derive(Debug, Serialize)]
struct StreamError<'a> {
    status: u16,
    code: &'a str,
    detail: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum StreamReply<'a> {
    Result {
        id: u64,
        result: OutcomeView,
    },
    Error {
        id: Option<u64>,
        error: StreamError<'a>,
    },
}

fn error_reply(id: Option<u64>, e: &ApiError) -> Message {
    reply(&StreamReply::Error {
        id,
        error: StreamError {
            status: e.status.as_u16(),
            code: e.code,
            detail: &e.detail,
        },
    })
}

fn reply(r: &StreamReply<'_>) -> Message {
    // Serialising these plain structs cannot fail; an empty frame would be the only
    // outcome if it ever did.
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(r).unwrap_or_default(),
    ))
}

/// The upgrade handler: checks the topic and the broker before switching protocols, so
/// an unknown topic is a plain 404 problem document.
pub(crate) async fn publish_stream(
    State(state): State<AppState>,
    path: TopicPath,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let name = topic_name(path)?;
    let broker = state.broker()?;
    broker.topic(&name)?;
    // A plain request (no `Upgrade: websocket`, or a bad handshake) gets a problem
    // document like every other error of the API.
    let upgrade = upgrade.map_err(|r| {
        ApiError::new(
            r.status(),
            "websocket_upgrade_required",
            format!(
                "this endpoint is a WebSocket (RFC 6455 handshake, version 13): {}",
                r.body_text()
            ),
        )
    })?;
    let max_frame = state.config.max_body_bytes;
    Ok(upgrade
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
        .on_upgrade(move |socket| run(socket, broker, name)))
}

async fn run(socket: WebSocket, broker: Arc<carebus_core::Broker>, topic: String) {
    use futures_util::{FutureExt, SinkExt, StreamExt};

    let (mut sink, mut frames) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(MAX_IN_FLIGHT);
    // The writer sends every answer queued at the moment with one flush (one write
    // for a burst of answers from one group commit).
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut ok = sink.feed(first).await.is_ok();
            while ok && let Ok(next) = rx.try_recv() {
                ok = sink.feed(next).await.is_ok();
            }
            if !ok || sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT_KIB as usize));
    let mut published = 0u64;
    tracing::debug!(topic, "publish stream opened");
    'read: loop {
        // Wait for a frame, then take the frames already received behind it (a producer
        // with many in flight sends them in bursts): they are published as one group,
        // one append per partition, each message still answered on its own.
        let first = match tokio::time::timeout(IDLE_TIMEOUT, frames.next()).await {
            Err(_) => {
                let _ = tx
                    .send(Message::Close(Some(CloseFrame {
                        code: close_code::AWAY,
                        reason: Utf8Bytes::from_static("idle"),
                    })))
                    .await;
                break;
            }
            Ok(None | Some(Err(_))) => break,
            Ok(Some(Ok(frame))) => frame,
        };
        let mut group: Vec<StreamFrame> = Vec::new();
        let mut kib = 0u32;
        let mut next = Some(first);
        let mut closing = false;
        while let Some(frame) = next.take() {
            match frame {
                Message::Text(text) => match parse_frame(text.as_str()) {
                    Ok(f) => {
                        kib = kib.saturating_add(frame_kib(text.len()));
                        group.push(f);
                    }
                    Err((id, e)) => {
                        if tx.send(error_reply(id, &e)).await.is_err() {
                            break 'read;
                        }
                    }
                },
                Message::Binary(_) => {
                    let e = ApiError::bad_request(
                        "invalid_frame",
                        "send each message as a text frame holding a JSON object",
                    );
                    if tx.send(error_reply(None, &e)).await.is_err() {
                        break 'read;
                    }
                }
                Message::Close(_) => {
                    closing = true;
                    break;
                }
                // Pings are answered by the WebSocket layer; they only keep the socket alive.
                Message::Ping(_) | Message::Pong(_) => {}
            }
            if group.len() >= MAX_GROUP || kib >= MAX_GROUP_KIB {
                break;
            }
            next = match frames.next().now_or_never() {
                Some(Some(Ok(frame))) => Some(frame),
                Some(None | Some(Err(_))) => {
                    closing = true;
                    None
                }
                None => None,
            };
        }
        if !group.is_empty() {
            // Reading pauses while the socket's running publishes hold too many messages
            // or bytes (the permits go back as each group is answered).
            let count = u32::try_from(group.len()).unwrap_or(u32::MAX);
            let (Ok(permits), Ok(bytes)) = (
                Arc::clone(&slots).acquire_many_owned(count).await,
                Arc::clone(&budget)
                    .acquire_many_owned(kib.min(MAX_IN_FLIGHT_KIB))
                    .await,
            ) else {
                break;
            };
            published += group.len() as u64;
            let (broker, topic, tx) = (Arc::clone(&broker), topic.clone(), tx.clone());
            tokio::spawn(async move {
                publish_group(&broker, &topic, group, &tx).await;
                drop((permits, bytes));
            });
        }
        if closing {
            break;
        }
    }
    drop(tx);
    // Publishes still running answer into the channel; the writer ends when they are done.
    let _ = writer.await;
    tracing::debug!(topic, published, "publish stream closed");
}

/// Frames published together at most (and their size in KiB): what is read from the
/// socket at once, up to these bounds, is one group.
const MAX_GROUP: usize = 256;
const MAX_GROUP_KIB: u32 = 4 * 1024;

fn frame_kib(len: usize) -> u32 {
    u32::try_from(len / 1024 + 1)
        .unwrap_or(u32::MAX)
        .min(MAX_IN_FLIGHT_KIB)
}

/// Publishes one group of frames (each message on its own terms) and queues one answer
/// per frame, in the group's order.
async fn publish_group(
    broker: &carebus_core::Broker,
    topic: &str,
    group: Vec<StreamFrame>,
    tx: &mpsc::Sender<Message>,
) {
    let mut ids = Vec::with_capacity(group.len());
    let mut messages = Vec::with_capacity(group.len());
    for frame in group {
        match message_from_json(0, frame.message) {
            Ok(m) => {
                ids.push(frame.id);
                messages.push(m);
            }
            // The client may be gone; what is stored stays stored all the same.
            Err(e) => {
                let _ = tx.send(error_reply(Some(frame.id), &e)).await;
            }
        }
    }
    if messages.is_empty() {
        return;
    }
    let answers = match broker.publish_each(topic, messages).await {
        Ok(answers) => answers,
        Err(e) => {
            let e = ApiError::from(e);
            for id in ids {
                let _ = tx.send(error_reply(Some(id), &e)).await;
            }
            return;
        }
    };
    // A failure shared by a partition's group is converted (and, if internal, logged)
    // once, not once per message.
    let mut converted: Option<(Arc<carebus_core::BrokerError>, ApiError)> = None;
    for (id, answer) in ids.into_iter().zip(answers) {
        let frame = match answer {
            Ok(o) => reply(&StreamReply::Result {
                id,
                result: OutcomeView::from(&o),
            }),
            Err(e) => {
                let api = match &converted {
                    Some((seen, api)) if Arc::ptr_eq(seen, &e) => api.clone(),
                    _ => {
                        let api = ApiError::from(&*e);
                        converted = Some((e, api.clone()));
                        api
                    }
                };
                error_reply(Some(id), &api)
            }
        };
        let _ = tx.send(frame).await;
    }
}

/// Decodes one text frame of the publish stream into its id and the message to publish,
/// exactly as the stream does (for fuzzing and for tools that speak the protocol). On
/// failure: the frame's id when it had a readable one, and the problem it is answered with.
pub fn decode_stream_frame(text: &str) -> Result<(u64, PublishMessage), (Option<u64>, ApiError)> {
    let frame = parse_frame(text)?;
    let id = frame.id;
    message_from_json(0, frame.message)
        .map(|m| (id, m))
        .map_err(|e| (Some(id), e))
}

/// Reads a frame as the API reads JSON bodies (an object, then its fields); on failure
/// also the frame's `id` when it has a readable one, to answer with.
fn parse_frame(text: &str) -> Result<StreamFrame, (Option<u64>, ApiError)> {
    // The common case, a well-formed frame, is read in one pass; only a bad frame is
    // read again as a generic value, for its id and the same errors as request bodies.
    // (A JSON array of the fields would also deserialize into the struct: refused.)
    if text.trim_start().starts_with('{')
        && let Ok(frame) = serde_json::from_str::<StreamFrame>(text)
    {
        return Ok(frame);
    }
    // serde_json's messages name fields, types and positions (as for request bodies).
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| (None, ApiError::bad_request("malformed_json", e.to_string())))?;
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    if !value.is_object() {
        return Err((
            id,
            ApiError::bad_request(
                "invalid_json",
                "a frame must be a JSON object: {\"id\": <unsigned integer>, \"message\": {…}}",
            ),
        ));
    }
    StreamFrame::deserialize(value)
        .map_err(|e| (id, ApiError::bad_request("invalid_json", e.to_string())))
}
