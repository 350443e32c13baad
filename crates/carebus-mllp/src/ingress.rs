//! The MLLP ingress listener: HL7 v2 messages in, stored exactly once, acknowledged
//! only after they are durable.
//!
//! Per message: parse and validate (a failure gets AR, or CR in enhanced mode, with an
//! ERR segment saying why, and nothing is stored); route to `hl7.<message type>`
//! (created on first use); partition by the patient (PID-3, first repetition: id and
//! assigning authority) so one patient's messages keep their order; idempotency key
//! MSH-3 + MSH-4 + MSH-10. The positive ACK (AA, or CA in enhanced mode) is built
//! before the message is stored and stored with it; it is sent only once the store
//! answered (fsynced under the default policy). A resend of a stored message gets the
//! stored ACK again, byte for byte, and nothing is stored twice; a resend with the same
//! key but a different body (a conflict) gets the same, is not stored, and is counted
//! and logged (without message content).
//!
//! One connection's messages are handled in order; connections run in parallel, up to
//! a bound. Idle connections and slow senders are closed after their timeouts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use carebus_core::{Broker, BrokerError, PublishMessage, TopicConfig};
use carebus_hl7::{
    AckCode, AckError, AckOptions, ErrorCode, Message, Severity, build_ack,
    build_ack_without_header, parse_batch,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::codec::Decoder;

use crate::codec::{Frame, FrameError, MllpCodec, frame};

/// Header under which the ACK sent for a message is stored with it.
pub const ACK_HEADER: &str = "mllp-ack";
/// Content type of stored HL7 v2 messages.
pub const CONTENT_TYPE: &str = "application/hl7-v2";

/// Listener settings.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// Largest frame accepted.
    pub max_frame_bytes: usize,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// A connection with no bytes for this long is closed.
    pub idle_timeout: Duration,
    /// A frame must arrive whole within this long once it started.
    pub frame_timeout: Duration,
    /// Topic prefix: messages go to `<prefix><type>` (`hl7.adt`, `hl7.oru`, …) unless a
    /// route says otherwise.
    pub topic_prefix: String,
    /// Routing rules, first match wins; unmatched messages go to `<prefix><type>`.
    pub routes: Vec<Route>,
    /// Where refused messages are kept (raw bytes and the reason), if anywhere.
    pub rejects_topic: Option<String>,
    /// The answer to a message that cannot be accepted (unparseable, invalid):
    /// `Reject` (AR/CR, the default: do not resend) or `Error` (AE/CE).
    pub invalid_message_ack: NegativeAck,
    /// The answer when the message could not be stored (disk full, storage error):
    /// `Error` (AE/CE, the default: resend later) or `Reject` (AR/CR).
    pub storage_failure_ack: NegativeAck,
}

/// Which negative acknowledgement answers a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegativeAck {
    /// AE (CE in enhanced mode): application error.
    Error,
    /// AR (CR in enhanced mode): application reject.
    Reject,
}

impl NegativeAck {
    fn code(self, enhanced: bool) -> AckCode {
        match (self, enhanced) {
            (NegativeAck::Error, false) => AckCode::AE,
            (NegativeAck::Error, true) => AckCode::CE,
            (NegativeAck::Reject, false) => AckCode::AR,
            (NegativeAck::Reject, true) => AckCode::CR,
        }
    }
}

/// A routing rule: every condition given must match (message type and trigger event
/// case-insensitively, sending application and facility — their first component —
/// exactly).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// MSH-9.1, e.g. `ADT`.
    pub message_type: Option<String>,
    /// MSH-9.2, e.g. `A01`.
    pub trigger_event: Option<String>,
    /// MSH-3.1.
    pub sending_application: Option<String>,
    /// MSH-4.1.
    pub sending_facility: Option<String>,
    /// The topic for matching messages.
    pub topic: String,
}

impl Route {
    fn matches(&self, msg: &Message<'_>) -> bool {
        let text = |c: Option<String>| c.unwrap_or_default();
        let comp = |f: Option<carebus_hl7::Field<'_>>| {
            f.and_then(|f| f.component(1))
                .map(|c| String::from_utf8_lossy(&c.decoded()).into_owned())
        };
        let ty = text(
            msg.message_type()
                .map(|c| String::from_utf8_lossy(&c.decoded()).into_owned()),
        );
        let ev = text(
            msg.trigger_event()
                .map(|c| String::from_utf8_lossy(&c.decoded()).into_owned()),
        );
        self.message_type
            .as_ref()
            .is_none_or(|t| t.eq_ignore_ascii_case(&ty))
            && self
                .trigger_event
                .as_ref()
                .is_none_or(|t| t.eq_ignore_ascii_case(&ev))
            && self
                .sending_application
                .as_ref()
                .is_none_or(|a| Some(a.clone()) == comp(msg.sending_application()))
            && self
                .sending_facility
                .as_ref()
                .is_none_or(|f| Some(f.clone()) == comp(msg.sending_facility()))
    }
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            max_frame_bytes: 8 << 20,
            max_connections: 256,
            idle_timeout: Duration::from_secs(300),
            frame_timeout: Duration::from_secs(60),
            topic_prefix: "hl7.".into(),
            routes: Vec::new(),
            rejects_topic: None,
            invalid_message_ack: NegativeAck::Reject,
            storage_failure_ack: NegativeAck::Error,
        }
    }
}

/// Counters of the listener.
#[derive(Debug, Default)]
pub struct IngressStats {
    /// Messages stored.
    pub stored: AtomicU64,
    /// Resends answered with the stored ACK.
    pub duplicates: AtomicU64,
    /// Resends whose body differed from the stored copy.
    pub conflicts: AtomicU64,
    /// Messages refused with a negative ACK.
    pub rejected: AtomicU64,
    /// Connections refused because of the bound.
    pub refused_connections: AtomicU64,
}

/// Serves MLLP on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: IngressConfig,
    stats: Arc<IngressStats>,
) {
    serve_with(listener, broker, config, stats, None).await;
}

/// Serves MLLP over TLS on `listener` until the task is dropped (see [`crate::tls`]).
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    broker: Arc<Broker>,
    config: IngressConfig,
    stats: Arc<IngressStats>,
) {
    serve_with(listener, broker, config, stats, Some(acceptor)).await;
}

async fn serve_with(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: IngressConfig,
    stats: Arc<IngressStats>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let config = Arc::new(config);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "mllp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            stats.refused_connections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "mllp connection refused: too many connections");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (broker, config, stats, tls) = (
            Arc::clone(&broker),
            Arc::clone(&config),
            Arc::clone(&stats),
            tls.clone(),
        );
        tokio::spawn(async move {
            let result = match tls {
                None => connection(stream, peer, &broker, &config, &stats).await,
                Some(acceptor) => {
                    // The handshake is bounded like a frame.
                    match tokio::time::timeout(config.frame_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls_stream)) => {
                            connection(tls_stream, peer, &broker, &config, &stats).await
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "mllp tls handshake refused");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::info!(%peer, "mllp tls handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "mllp connection closed");
            }
            drop(permit);
        });
    }
}

async fn connection<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    broker: &Broker,
    config: &IngressConfig,
    stats: &IngressStats,
) -> Result<(), FrameError> {
    let mut codec = MllpCodec::new(config.max_frame_bytes);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        // Everything complete in the buffer first, in order.
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Frame::Message(bytes))) => {
                    let reply = handle(broker, config, stats, &bytes).await;
                    stream.write_all(&frame(&reply)).await?;
                }
                Ok(Some(Frame::Skipped(n))) => {
                    tracing::debug!(%peer, bytes = n, "mllp bytes outside a frame skipped")
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { limit }) => {
                    stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, limit, "mllp frame over the size limit refused; closing the connection");
                    let nak = reject_without_header(
                        AckCode::AR,
                        ErrorCode::ApplicationInternalError,
                        "message larger than the receiver's limit",
                    );
                    stream.write_all(&frame(&nak)).await?;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        let wait = if buf.is_empty() {
            config.idle_timeout
        } else {
            config.frame_timeout
        };
        let n = match tokio::time::timeout(wait, stream.read_buf(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => {
                tracing::debug!(%peer, pending = buf.len(), "mllp connection timed out");
                return Ok(());
            }
        };
        if n == 0 {
            if let Ok(Some(Frame::Message(bytes))) = codec.decode_eof(&mut buf) {
                let reply = handle(broker, config, stats, &bytes).await;
                let _ = stream.write_all(&frame(&reply)).await;
            }
            return Ok(());
        }
    }
}

fn reject_without_header(code: AckCode, error: ErrorCode, text: &str) -> Vec<u8> {
    let err = AckError {
        code: error,
        location: None,
        severity: Severity::Error,
        message: Some(text.into()),
    };
    let ts = hl7_timestamp();
    let id = new_control_id();
    build_ack_without_header(&AckOptions {
        code,
        control_id: &id,
        timestamp: &ts,
        error: Some(&err),
    })
}

/// Handles one frame's content (a message or a batch) and returns the reply.
async fn handle(
    broker: &Broker,
    config: &IngressConfig,
    stats: &IngressStats,
    bytes: &Bytes,
) -> Vec<u8> {
    let is_batch = bytes.starts_with(b"FHS") || bytes.starts_with(b"BHS");
    if !is_batch {
        return handle_message(broker, config, stats, bytes).await;
    }
    let batch = match parse_batch(bytes) {
        Ok(b) => b,
        Err(e) => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            return reject_without_header(
                AckCode::AR,
                ErrorCode::SegmentSequenceError,
                &format!("unreadable batch: {e}"),
            );
        }
    };
    // Each message on its own; the answer is a batch of their ACKs.
    let ranges: Vec<std::ops::Range<usize>> = batch.messages().map(|m| m.range.clone()).collect();
    let mut acks = Vec::new();
    for r in ranges {
        let one = bytes.slice(r);
        acks.push(handle_message(broker, config, stats, &one).await);
    }
    let mut out = Vec::new();
    out.extend_from_slice(format!("BHS|^~\\&|CAREBUS||||{}\r", hl7_timestamp()).as_bytes());
    for a in &acks {
        out.extend_from_slice(a);
    }
    out.extend_from_slice(format!("BTS|{}\r", acks.len()).as_bytes());
    out
}

async fn handle_message(
    broker: &Broker,
    config: &IngressConfig,
    stats: &IngressStats,
    bytes: &Bytes,
) -> Vec<u8> {
    let ts = hl7_timestamp();
    let id = new_control_id();
    let msg = match Message::parse(bytes) {
        Ok(m) => m,
        Err(e) => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::info!(bytes = bytes.len(), reason = %e, "mllp message refused: no readable MSH");
            keep_reject(broker, config, bytes, &e.to_string()).await;
            let err = AckError::from(&e);
            return build_ack_without_header(&AckOptions {
                code: config.invalid_message_ack.code(false),
                control_id: &id,
                timestamp: &ts,
                error: Some(&err),
            });
        }
    };
    let enhanced = msg.accept_ack_type().is_some() || msg.application_ack_type().is_some();
    let accept = if enhanced { AckCode::CA } else { AckCode::AA };
    let reject = config.invalid_message_ack.code(enhanced);
    let fail = config.storage_failure_ack.code(enhanced);
    let nak = |code, err: &AckError| {
        build_ack(
            &msg,
            &AckOptions {
                code,
                control_id: &id,
                timestamp: &ts,
                error: Some(err),
            },
        )
    };
    if let Err(e) = msg.validate() {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::info!(bytes = bytes.len(), reason = %e, "mllp message refused");
        keep_reject(broker, config, bytes, &e.to_string()).await;
        return nak(reject, &AckError::from(&e));
    }
    let message_type: String = msg
        .message_type()
        .map(|t| {
            t.raw()
                .iter()
                .filter(|b| b.is_ascii_alphanumeric())
                .map(|b| b.to_ascii_lowercase() as char)
                .collect()
        })
        .unwrap_or_default();
    if message_type.is_empty() {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        let err = AckError {
            code: ErrorCode::UnsupportedMessageType,
            location: None,
            severity: Severity::Error,
            message: Some("message type is not routable".into()),
        };
        keep_reject(broker, config, bytes, "message type is not routable").await;
        return nak(reject, &err);
    }
    let topic = config.routes.iter().find(|r| r.matches(&msg)).map_or_else(
        || format!("{}{message_type}", config.topic_prefix),
        |r| r.topic.clone(),
    );
    let mut key = Vec::new();
    key.extend_from_slice(msg.sending_application().map_or(&b""[..], |f| f.raw()));
    key.push(b'|');
    key.extend_from_slice(msg.sending_facility().map_or(&b""[..], |f| f.raw()));
    key.push(b'|');
    key.extend_from_slice(msg.control_id().map_or(&b""[..], |f| f.raw()));
    let ack = build_ack(
        &msg,
        &AckOptions {
            code: accept,
            control_id: &id,
            timestamp: &ts,
            error: None,
        },
    );
    let key = Bytes::from(key);
    let publish = PublishMessage {
        body: bytes.clone(),
        content_type: Some(CONTENT_TYPE.into()),
        partition_key: msg.patient_identifier().map(|p| Bytes::from(p.key())),
        idempotency_key: Some(key.clone()),
        headers: vec![(ACK_HEADER.into(), Bytes::from(ack.clone()))],
    };
    match store(broker, &topic, publish).await {
        Ok(Stored::New) => {
            stats.stored.fetch_add(1, Ordering::Relaxed);
            ack
        }
        Ok(Stored::Duplicate {
            stored_ack,
            conflict,
            partition,
            offset,
        }) => {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            if conflict {
                stats.conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    topic,
                    partition,
                    offset,
                    "mllp resend with a known control id but a different body: first copy kept"
                );
                record_conflict(broker, config, &topic, partition, offset, &key, bytes).await;
            }
            stored_ack.map_or(ack, |a| a.to_vec())
        }
        Err(e) => {
            tracing::error!(topic, code = e.code(), error = %e, "mllp message not stored");
            let text = if e.code() == "storage_full" {
                "receiver storage full; resend later"
            } else {
                "receiver could not store the message; resend later"
            };
            let err = AckError {
                code: ErrorCode::ApplicationInternalError,
                location: None,
                severity: Severity::Error,
                message: Some(text.into()),
            };
            nak(fail, &err)
        }
    }
}

/// Makes a conflict listable: a record in `<prefix>conflicts` (`hl7.conflicts`) naming
/// the first copy, the key (sender application, facility and control id) and the
/// conflicting body's hash and size (never its content). Keyed by the first copy and
/// that hash, so the same conflicting resend repeated is recorded once.
async fn record_conflict(
    broker: &Broker,
    config: &IngressConfig,
    topic: &str,
    partition: u32,
    offset: u64,
    key: &Bytes,
    body: &Bytes,
) {
    let hash = carebus_core::body_hash(body);
    let record = serde_json::json!({
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "idempotency_key": String::from_utf8_lossy(key),
        "conflicting_body_hash": format!("{hash:016x}"),
        "conflicting_body_bytes": body.len(),
        "received_ms": carebus_log::now_ms(),
    })
    .to_string();
    let conflicts = format!("{}conflicts", config.topic_prefix);
    let message = PublishMessage {
        body: Bytes::from(record),
        content_type: Some("application/json".into()),
        partition_key: None,
        idempotency_key: Some(Bytes::from(format!(
            "conflict/{topic}/{partition}/{offset}/{hash:016x}"
        ))),
        headers: Vec::new(),
    };
    if let Err(e) = store(broker, &conflicts, message).await {
        tracing::error!(topic = %conflicts, code = e.code(), "could not record a conflict");
    }
}

/// Keeps a refused message in the rejects topic, if one is configured: the raw bytes
/// and the reason (which names positions, never content). The same bytes are kept once.
async fn keep_reject(broker: &Broker, config: &IngressConfig, bytes: &Bytes, reason: &str) {
    let Some(topic) = &config.rejects_topic else {
        return;
    };
    let message = PublishMessage {
        body: bytes.clone(),
        content_type: Some(CONTENT_TYPE.into()),
        partition_key: None,
        idempotency_key: Some(Bytes::from(format!(
            "reject/{:016x}",
            carebus_core::body_hash(bytes)
        ))),
        headers: vec![("mllp-reject-reason".into(), Bytes::from(reason.to_owned()))],
    };
    if let Err(e) = store(broker, topic, message).await {
        tracing::error!(topic, code = e.code(), "could not keep a refused message");
    }
}

enum Stored {
    New,
    Duplicate {
        stored_ack: Option<Bytes>,
        conflict: bool,
        partition: u32,
        offset: u64,
    },
}

async fn store(
    broker: &Broker,
    topic: &str,
    message: PublishMessage,
) -> Result<Stored, BrokerError> {
    if broker.topic(topic).is_err() {
        // Created on first use (idempotent if two connections race).
        broker.put_topic(
            topic,
            TopicConfig {
                partitions: 4,
                ..TopicConfig::default()
            },
        )?;
    }
    let outcome = broker.publish(topic, vec![message]).await?;
    let Some(o) = outcome.first().copied() else {
        return Err(BrokerError::EmptyBatch);
    };
    if !o.duplicate {
        return Ok(Stored::New);
    }
    let stored = broker.read(topic, o.partition, o.offset, 1)?;
    let stored_ack = stored
        .into_iter()
        .find(|m| m.offset == o.offset)
        .and_then(|m| {
            m.headers
                .into_iter()
                .find(|(n, _)| n == ACK_HEADER)
                .map(|(_, v)| v)
        });
    Ok(Stored::Duplicate {
        stored_ack,
        conflict: o.conflict,
        partition: o.partition,
        offset: o.offset,
    })
}

static CONTROL_IDS: AtomicU64 = AtomicU64::new(0);

/// A control id for our ACKs: unique in this process, and across restarts by its time part.
fn new_control_id() -> String {
    let n = CONTROL_IDS.fetch_add(1, Ordering::Relaxed);
    format!("CB{:X}{:04X}", carebus_log::now_ms(), n & 0xFFFF)
}

/// Now as an HL7 DTM in UTC: `YYYYMMDDHHMMSS+0000`.
pub fn hl7_timestamp() -> String {
    let ms = carebus_log::now_ms().max(0);
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}{mo:02}{d:02}{h:02}{m:02}{s:02}+0000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_look_like_hl7_dtm() {
        let t = hl7_timestamp();
        assert_eq!(t.len(), 19);
        assert!(t.starts_with("20"));
        assert!(t.ends_with("+0000"));
        assert!(t[..14].bytes().all(|b| b.is_ascii_digit()));
        assert_ne!(new_control_id(), new_control_id());
    }
}
