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
//! when none could be read; the socket stays open.
//!
//! A message may instead come as a **binary frame**, which carries the body byte for
//! byte (no JSON escaping, no base64: cheaper for both sides). Integers big-endian:
//!
//! ```text
//! u8   1                       the format's version
//! u64  id
//! u8   flags                   1 = idempotency key, 2 = partition key, 4 = content type
//! (u32 n, n bytes) × each flagged field, in that order (UTF-8)
//! u32  header count, then per header: u32 n, n bytes name; u32 n, n bytes value (UTF-8)
//! the rest of the frame        the body
//! ```
//!
//! It is answered like a text frame (a JSON text frame with its `id`), under the same
//! rules as a `messages:batch` element; a frame that cannot be read is answered with
//! code `invalid_frame` (and its `id` once the first 9 bytes were there). At most [`MAX_IN_FLIGHT`] publishes
//! per socket run at once (reading pauses beyond that); a socket with no frame from the
//! client for [`IDLE_TIMEOUT`] is closed (clients keep it alive with pings). Frames held
//! by running publishes are also bounded in bytes per socket ([`MAX_IN_FLIGHT_KIB`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use bytes::{Buf, Bytes};
use carebus_core::PublishMessage;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

use crate::problem::ApiError;
use crate::{
    AppState, BatchMessage, MessageParts, OutcomeView, TopicPath, build_message, message_from_json,
    topic_name,
};

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

/// A frame read from the socket, waiting in a group to be published.
enum Pending {
    /// A text frame: its JSON message is checked in the publishing task.
    Json(StreamFrame),
    /// A binary frame, already decoded.
    Ready(u64, PublishMessage),
}

/// The version byte binary frames start with.
pub const BINARY_FRAME_VERSION: u8 = 1;
/// What the WebSocket reads from the socket at most per read. tungstenite zero-fills
/// this much of its buffer before every read, including reads that find nothing yet
/// (its default, 128 KiB, was a visible share of the server's CPU at one message in
/// flight: `bench/profiles/`); frames larger than this still arrive whole, over several
/// reads.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// Flag bits of the binary formats (publish frames and the binary receive answer):
/// which optional fields follow.
pub(crate) const FLAG_IDEMPOTENCY_KEY: u8 = 1;
pub(crate) const FLAG_PARTITION_KEY: u8 = 2;
pub(crate) const FLAG_CONTENT_TYPE: u8 = 4;

fn invalid_frame(detail: String) -> ApiError {
    ApiError::bad_request("invalid_frame", detail)
}

/// Takes `n` bytes off the front of `buf` (no copy), or says what was cut short.
fn take(buf: &mut Bytes, n: usize, what: &str) -> Result<Bytes, ApiError> {
    if buf.remaining() < n {
        return Err(invalid_frame(format!(
            "the binary frame ends inside its {what} ({n} bytes announced, {} left)",
            buf.remaining()
        )));
    }
    Ok(buf.split_to(n))
}

fn short(what: &str) -> impl FnOnce(bytes::TryGetError) -> ApiError + '_ {
    move |_| invalid_frame(format!("the binary frame ends inside its {what}"))
}

fn utf8(b: Bytes, what: &str) -> Result<String, ApiError> {
    String::from_utf8(b.into()).map_err(|_| invalid_frame(format!("the {what} is not UTF-8")))
}

/// Decodes one binary frame of the publish stream (format in the module docs) into its
/// id and the message to publish, under the same rules as a text frame. The body is a
/// slice of the frame (no copy). On failure: the id when the frame got that far, and
/// the problem it is answered with.
pub fn decode_binary_stream_frame(
    frame: Bytes,
) -> Result<(u64, PublishMessage), (Option<u64>, ApiError)> {
    let mut buf = frame;
    let version = buf.try_get_u8().map_err(|e| (None, short("version")(e)))?;
    if version != BINARY_FRAME_VERSION {
        return Err((
            None,
            invalid_frame(format!(
                "binary frame version {version} is not supported (version {BINARY_FRAME_VERSION} is)"
            )),
        ));
    }
    let id = buf.try_get_u64().map_err(|e| (None, short("id")(e)))?;
    decode_binary_message(buf)
        .map(|m| (id, m))
        .map_err(|e| (Some(id), e))
}

fn decode_binary_message(mut buf: Bytes) -> Result<PublishMessage, ApiError> {
    let flags = buf.try_get_u8().map_err(short("flags"))?;
    let known = FLAG_IDEMPOTENCY_KEY | FLAG_PARTITION_KEY | FLAG_CONTENT_TYPE;
    if flags & !known != 0 {
        return Err(invalid_frame(format!(
            "unknown flags {:#04x} in the binary frame",
            flags & !known
        )));
    }
    let mut field = |flag: u8, what: &str| -> Result<Option<String>, ApiError> {
        if flags & flag == 0 {
            return Ok(None);
        }
        let n = buf.try_get_u32().map_err(short(what))?;
        let b = take(&mut buf, usize::try_from(n).unwrap_or(usize::MAX), what)?;
        utf8(b, what).map(Some)
    };
    let idempotency_key = field(FLAG_IDEMPOTENCY_KEY, "idempotency key")?;
    let partition_key = field(FLAG_PARTITION_KEY, "partition key")?;
    let content_type = field(FLAG_CONTENT_TYPE, "content type")?;
    // Each header takes at least 8 bytes, so the count is bounded by the frame's size.
    let count = buf.try_get_u32().map_err(short("header count"))?;
    let mut headers = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(64));
    for _ in 0..count {
        let n = buf.try_get_u32().map_err(short("header name"))?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let name = utf8(take(&mut buf, n, "header name")?, "header name")?;
        let n = buf.try_get_u32().map_err(short("header value"))?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let value = take(&mut buf, n, "header value")?;
        if std::str::from_utf8(&value).is_err() {
            return Err(invalid_frame("a header value is not UTF-8".into()));
        }
        headers.push((name, value));
    }
    build_message(
        "the binary frame",
        MessageParts {
            body: buf,
            content_type,
            partition_key,
            idempotency_key,
            headers,
        },
    )
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
        .read_buffer_size(READ_BUFFER_BYTES)
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
        let mut group: Vec<Pending> = Vec::new();
        let mut kib = 0u32;
        let mut next = Some(first);
        let mut closing = false;
        while let Some(frame) = next.take() {
            match frame {
                Message::Text(text) => match parse_frame(text.as_str()) {
                    Ok(f) => {
                        kib = kib.saturating_add(frame_kib(text.len()));
                        group.push(Pending::Json(f));
                    }
                    Err((id, e)) => {
                        if tx.send(error_reply(id, &e)).await.is_err() {
                            break 'read;
                        }
                    }
                },
                Message::Binary(bytes) => {
                    let len = bytes.len();
                    match decode_binary_stream_frame(bytes) {
                        Ok((id, m)) => {
                            kib = kib.saturating_add(frame_kib(len));
                            group.push(Pending::Ready(id, m));
                        }
                        Err((id, e)) => {
                            if tx.send(error_reply(id, &e)).await.is_err() {
                                break 'read;
                            }
                        }
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
/// socket at once, up to these bounds, is one group. Smaller groups than a producer's
/// whole burst keep the stages busy at once (the next group is parsed and written
/// while the last one's fdatasync runs, and its answers go out sooner): measured
/// against 256 at 256 in flight (6 alternating pairs, BENCHMARKS.md), 32 was faster
/// in 5 of 6, by ~6 % on average; 16 was no better than 32.
const MAX_GROUP: usize = 32;
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
    group: Vec<Pending>,
    tx: &mpsc::Sender<Message>,
) {
    let mut ids = Vec::with_capacity(group.len());
    let mut messages = Vec::with_capacity(group.len());
    for pending in group {
        let (id, message) = match pending {
            Pending::Json(frame) => (frame.id, message_from_json(0, frame.message)),
            Pending::Ready(id, m) => (id, Ok(m)),
        };
        match message {
            Ok(m) => {
                ids.push(id);
                messages.push(m);
            }
            // The client may be gone; what is stored stays stored all the same.
            Err(e) => {
                let _ = tx.send(error_reply(Some(id), &e)).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A binary frame, written as the module docs describe (independently of the decoder).
    fn frame(
        id: u64,
        idem: Option<&str>,
        part: Option<&str>,
        ctype: Option<&str>,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Vec<u8> {
        let mut f = vec![BINARY_FRAME_VERSION];
        f.extend_from_slice(&id.to_be_bytes());
        let flags = u8::from(idem.is_some())
            | (u8::from(part.is_some()) << 1)
            | (u8::from(ctype.is_some()) << 2);
        f.push(flags);
        for v in [idem, part, ctype].into_iter().flatten() {
            f.extend_from_slice(&u32::try_from(v.len()).unwrap().to_be_bytes());
            f.extend_from_slice(v.as_bytes());
        }
        f.extend_from_slice(&u32::try_from(headers.len()).unwrap().to_be_bytes());
        for (n, v) in headers {
            f.extend_from_slice(&u32::try_from(n.len()).unwrap().to_be_bytes());
            f.extend_from_slice(n.as_bytes());
            f.extend_from_slice(&u32::try_from(v.len()).unwrap().to_be_bytes());
            f.extend_from_slice(v);
        }
        f.extend_from_slice(body);
        f
    }

    fn decode(f: &[u8]) -> Result<(u64, PublishMessage), (Option<u64>, ApiError)> {
        decode_binary_stream_frame(Bytes::copy_from_slice(f))
    }

    #[test]
    fn a_binary_frame_carries_every_field_and_the_body_byte_for_byte() {
        let body = b"MSH|^~\\&|LIS|NG\rPID|1||MRN1\r\x00\xff";
        let f = frame(
            (1 << 63) + 5,
            Some("LIS|C1"),
            Some("MRN1"),
            Some("x-application/hl7-v2+er7"),
            &[("Origin", b"lab"), ("X-Trace", b"")],
            body,
        );
        let (id, m) = decode(&f).unwrap();
        assert_eq!(id, (1 << 63) + 5);
        assert_eq!(m.body.as_ref(), body);
        assert_eq!(m.idempotency_key.as_deref(), Some(&b"LIS|C1"[..]));
        assert_eq!(m.partition_key.as_deref(), Some(&b"MRN1"[..]));
        assert_eq!(m.content_type.as_deref(), Some("x-application/hl7-v2+er7"));
        let headers: Vec<(&str, &[u8])> = m
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_ref()))
            .collect();
        assert_eq!(headers, [("origin", &b"lab"[..]), ("x-trace", &b""[..])]);

        // Nothing but an id: an unkeyed message with an empty body.
        let (id, m) = decode(&frame(0, None, None, None, &[], b"")).unwrap();
        assert_eq!(id, 0);
        assert!(m.body.is_empty() && m.idempotency_key.is_none() && m.headers.is_empty());
    }

    #[test]
    fn a_bad_binary_frame_is_refused_with_its_id_once_readable() {
        let good = frame(9, Some("K"), Some("P"), Some("t"), &[("h", b"v")], b"body");
        // Cut anywhere before the body: refused; the id comes back once 9 bytes are in.
        // (Cut inside the body is a shorter body, which is fine.)
        let body_at = good.len() - 4;
        for cut in 0..body_at {
            let (id, e) = decode(&good[..cut]).unwrap_err();
            assert_eq!(e.code, "invalid_frame", "cut at {cut}: {}", e.detail);
            assert_eq!(id, (cut >= 9).then_some(9), "cut at {cut}");
        }
        let mut v2 = good.clone();
        v2[0] = 2;
        let (id, e) = decode(&v2).unwrap_err();
        assert_eq!((id, e.code), (None, "invalid_frame"));
        assert!(e.detail.contains("version 2"), "{}", e.detail);
        let mut flags = good.clone();
        flags[9] |= 0x80;
        assert_eq!(decode(&flags).unwrap_err().1.code, "invalid_frame");
        // A key that is not UTF-8.
        let mut bad_key = frame(3, Some("AB"), None, None, &[], b"x");
        bad_key[14] = 0xff;
        let (id, e) = decode(&bad_key).unwrap_err();
        assert_eq!((id, e.code), (Some(3), "invalid_frame"));
        // A header value that is not UTF-8.
        let (_, e) = decode(&frame(3, None, None, None, &[("h", b"\xff")], b"x")).unwrap_err();
        assert_eq!(e.code, "invalid_frame");
        // The API's own rules, as for JSON: an empty key or header name.
        let (id, e) = decode(&frame(4, Some(""), None, None, &[], b"x")).unwrap_err();
        assert_eq!((id, e.code), (Some(4), "invalid_message"));
        let (_, e) = decode(&frame(4, None, None, None, &[("", b"v")], b"x")).unwrap_err();
        assert_eq!(e.code, "invalid_message");
        // A length beyond the frame.
        let mut long = frame(5, Some("K"), None, None, &[], b"");
        long[10..14].copy_from_slice(&200u32.to_be_bytes());
        assert_eq!(decode(&long).unwrap_err().1.code, "invalid_frame");
    }

    proptest! {
        #[test]
        fn binary_frames_round_trip(
            id in any::<u64>(),
            idem in proptest::option::of("[ -~]{1,40}"),
            part in proptest::option::of("\\PC{1,10}"),
            headers in proptest::collection::vec(("[a-zA-Z-]{1,8}", "\\PC{0,20}"), 0..4),
            body in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let hs: Vec<(&str, &[u8])> =
                headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
            let f = frame(id, idem.as_deref(), part.as_deref(), None, &hs, &body);
            let (got, m) = decode(&f).unwrap();
            prop_assert_eq!(got, id);
            prop_assert_eq!(m.body.as_ref(), &body[..]);
            prop_assert_eq!(m.idempotency_key.as_deref(), idem.as_deref().map(str::as_bytes));
            prop_assert_eq!(m.partition_key.as_deref(), part.as_deref().map(str::as_bytes));
            prop_assert_eq!(m.headers.len(), headers.len());
        }

        #[test]
        fn any_bytes_decode_or_get_a_client_error(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Err((_, e)) = decode(&data) {
                prop_assert!(e.status.is_client_error(), "{}", e.code);
            }
        }
    }
}
