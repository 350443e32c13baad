//! MLLP egress: a subscription's messages delivered to one MLLP destination, each
//! acknowledged by the broker only once the destination answered AA/CA for it.
//!
//! `connections` workers each own one TCP connection and hold at most one delivery
//! at a time (consumer `mllp-egress-<i>`). The subscription hands out a patient's next
//! message only once the previous one is settled, so one patient stays in order while
//! different patients go in parallel over different connections.
//!
//! Per delivery the stored body is sent framed, byte for byte the same on every resend
//! (same MSH-10), and the worker waits up to `ack_timeout` for the answer. The answer
//! counts only if it parses as an ACK whose MSA-2 equals the MSH-10 sent. A timeout, a
//! mismatched or unreadable answer, or a broken connection all mean "no ACK": the
//! connection is closed first (so a late ACK can never be credited to another message),
//! then the worker reconnects with bounded exponential backoff and resends the same
//! bytes.
//!
//! Lease handling (the choice made): the worker keeps the delivery across resends as
//! long as its lease (`ack_deadline_ms` of the subscription, counted from the moment
//! the delivery was received) leaves room for one more full exchange (`ack_timeout`
//! plus a margin). When it does not, the delivery is nacked (reason "no matching ack
//! before lease end", delay = current backoff) and the redelivery is sent again later:
//! the message is re-sent, never lost. Because every redelivery counts as an attempt,
//! set the subscription's `ack_deadline_ms` well above `ack_timeout` (3× or more), so
//! that transport trouble consumes few attempts. A worker only asks for a delivery
//! once it holds an open connection, so a destination that is down consumes no
//! attempts at all: messages wait in the subscription while workers retry the
//! connection with bounded backoff.
//!
//! Negative answers (AE/AR/CE/CR) are final for the exchange (the connection is kept):
//! - [`NegativeAckPolicy::DeadLetter`] (default): nack with the ACK's text as the
//!   reason and no extra delay. The subscription redelivers after its own backoff and
//!   dead-letters the message once `max_attempts` deliveries are used, so operators set
//!   `max_attempts` to the number of negative answers they tolerate.
//! - [`NegativeAckPolicy::Retry`]: nack with this egress's backoff delay (growing with
//!   the attempt number); `max_attempts` still bounds it.
//!
//! Nothing of a message's content is logged: topic, partition, offset, delivery id,
//! attempt and sizes only. The ACK text goes into the nack reason (kept with a dead
//! letter), never into the log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use carebus_core::{Broker, BrokerError, Delivery, SettleRefusal};
use carebus_hl7::{AckCode, Message, parse_ack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use crate::codec::{Frame, MllpCodec, frame};

/// How long one `receive` call waits before the worker checks its connection again.
const RECEIVE_WAIT: Duration = Duration::from_secs(1);
/// Largest answer frame read from the destination.
const MAX_ACK_BYTES: usize = 1 << 20;
/// Longest nack reason taken from an ACK's text.
const MAX_REASON_CHARS: usize = 200;

/// What to do with a message the destination answered negatively (AE/AR/CE/CR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NegativeAckPolicy {
    /// Nack without extra delay; the subscription's `max_attempts` dead-letters it.
    #[default]
    DeadLetter,
    /// Nack with a growing backoff delay and send it again.
    Retry,
}

/// Egress settings.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    /// The MLLP destination.
    pub destination: SocketAddr,
    /// Parallel connections (one worker each).
    pub connections: usize,
    /// How long to wait for the ACK of a sent message.
    pub ack_timeout: Duration,
    /// How long a connection attempt may take.
    pub connect_timeout: Duration,
    /// First delay before a reconnect / resend.
    pub backoff_initial: Duration,
    /// Longest delay before a reconnect / resend.
    pub backoff_max: Duration,
    /// What to do with negative ACKs.
    pub on_negative_ack: NegativeAckPolicy,
}

impl EgressConfig {
    /// Defaults for `destination`: 4 connections, 30 s ACK timeout, 10 s connect
    /// timeout, backoff 500 ms doubling up to 30 s, negative ACKs dead-lettered.
    pub fn new(destination: SocketAddr) -> Self {
        EgressConfig {
            destination,
            connections: 4,
            ack_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            on_negative_ack: NegativeAckPolicy::DeadLetter,
        }
    }
}

/// Counters of an egress.
#[derive(Debug, Default)]
pub struct EgressStats {
    /// Frames written (first sends and resends).
    pub sent: AtomicU64,
    /// Messages answered AA/CA and acknowledged to the broker.
    pub acked: AtomicU64,
    /// Resends of a message on the same delivery.
    pub retried: AtomicU64,
    /// Negative answers (AE/AR/CE/CR).
    pub negative: AtomicU64,
    /// Waits for an ACK that ran out.
    pub timeouts: AtomicU64,
    /// Answers that were unreadable or acknowledged another control id.
    pub mismatched: AtomicU64,
    /// Connections broken while sending or waiting.
    pub broken: AtomicU64,
    /// Connection attempts that failed.
    pub connect_failures: AtomicU64,
    /// Deliveries given back (nacked) because their lease would run out.
    pub released: AtomicU64,
    /// Stored messages without a readable MSH-10 (nacked, never sent).
    pub unsendable: AtomicU64,
}

/// Why the egress cannot run.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The topic or subscription is unknown, or the broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A setting is unusable.
    #[error("invalid egress setting: {0}")]
    InvalidSetting(&'static str),
}

/// Runs the egress until `stop` turns true (or its sender is dropped); returns its
/// counters. Deliveries held when it stops are nacked so they are sent again later.
pub async fn run_egress(
    broker: Arc<Broker>,
    topic: String,
    subscription: String,
    config: EgressConfig,
    stop: watch::Receiver<bool>,
) -> Result<Arc<EgressStats>, EgressError> {
    let stats = Arc::new(EgressStats::default());
    run_egress_with_stats(
        broker,
        topic,
        subscription,
        config,
        Arc::clone(&stats),
        stop,
    )
    .await?;
    Ok(stats)
}

/// [`run_egress`] with counters the caller can watch while it runs.
pub async fn run_egress_with_stats(
    broker: Arc<Broker>,
    topic: String,
    subscription: String,
    config: EgressConfig,
    stats: Arc<EgressStats>,
    stop: watch::Receiver<bool>,
) -> Result<(), EgressError> {
    if config.connections == 0 {
        return Err(EgressError::InvalidSetting(
            "connections must be at least 1",
        ));
    }
    if config.ack_timeout.is_zero() || config.connect_timeout.is_zero() {
        return Err(EgressError::InvalidSetting(
            "ack_timeout and connect_timeout must be positive",
        ));
    }
    if config.backoff_initial > config.backoff_max {
        return Err(EgressError::InvalidSetting(
            "backoff_initial must not exceed backoff_max",
        ));
    }
    // Fails early on an unknown topic or subscription.
    let lease = Duration::from_millis(
        broker
            .subscription(&topic, &subscription)?
            .config()
            .ack_deadline_ms,
    );
    if lease < config.ack_timeout.saturating_mul(2) {
        tracing::warn!(
            topic,
            subscription,
            lease_ms = lease.as_millis() as u64,
            ack_timeout_ms = config.ack_timeout.as_millis() as u64,
            "mllp egress: subscription lease is short for the ack timeout; failed exchanges will use delivery attempts"
        );
    }
    let shared = Arc::new(Shared {
        broker,
        topic,
        subscription,
        config,
        stats,
    });
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..shared.config.connections {
        let worker = Worker {
            shared: Arc::clone(&shared),
            consumer: format!("mllp-egress-{i}"),
            stop: stop.clone(),
            conn: None,
            backoff: Backoff::new(shared.config.backoff_initial, shared.config.backoff_max),
        };
        workers.spawn(worker.run());
    }
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => tracing::error!(error = %e, "mllp egress worker failed"),
        }
    }
    first_error.map_or(Ok(()), Err)
}

struct Shared {
    broker: Arc<Broker>,
    topic: String,
    subscription: String,
    config: EgressConfig,
    stats: Arc<EgressStats>,
}

/// Bounded exponential backoff.
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    fn peek(&self) -> Duration {
        self.next
    }

    fn take(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max).max(self.initial);
        d
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

struct Conn {
    stream: TcpStream,
    codec: MllpCodec,
    buf: BytesMut,
}

enum Reply {
    Frame(Bytes),
    Timeout,
    Broken,
    Stopped,
}

enum Exchange {
    /// Settled (acked or nacked) or given back: take the next delivery.
    Done,
    /// Stop requested; the delivery was given back.
    Stopped,
}

struct Worker {
    shared: Arc<Shared>,
    consumer: String,
    stop: watch::Receiver<bool>,
    conn: Option<Conn>,
    backoff: Backoff,
}

async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = stop.wait_for(|v| *v).await;
}

impl Worker {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps, unless stopped first; returns false when stopped.
    async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => !self.stopping(),
            () = until_stopped(&mut self.stop) => false,
        }
    }

    async fn run(mut self) -> Result<(), EgressError> {
        let s = Arc::clone(&self.shared);
        loop {
            if self.stopping() {
                return Ok(());
            }
            if !self.connected().await {
                if !self.connect().await {
                    let d = self.backoff.take();
                    if !self.sleep(d).await {
                        return Ok(());
                    }
                }
                continue;
            }
            let received = tokio::select! {
                r = s.broker.receive(&s.topic, &s.subscription, &self.consumer, 1, RECEIVE_WAIT) => r,
                () = until_stopped(&mut self.stop) => return Ok(()),
            };
            let deliveries = match received {
                Ok(d) => d,
                Err(
                    e @ (BrokerError::UnknownTopic(_) | BrokerError::UnknownSubscription { .. }),
                ) => {
                    tracing::error!(topic = s.topic, subscription = s.subscription, error = %e, "mllp egress stops: subscription gone");
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::warn!(topic = s.topic, subscription = s.subscription, code = e.code(), error = %e, "mllp egress receive failed");
                    let d = self.backoff.take();
                    if !self.sleep(d).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            for d in deliveries {
                if let Exchange::Stopped = self.exchange(d).await {
                    return Ok(());
                }
            }
        }
    }

    /// Whether the held connection is (as far as can be told without sending) usable.
    /// A connection the peer closed, or one with unsolicited bytes on it, is dropped.
    async fn connected(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let mut probe = [0u8; 64];
        let usable = match conn.stream.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => conn.buf.is_empty(),
            Ok(0) => false,
            Ok(n) => {
                tracing::debug!(
                    bytes = n,
                    "mllp egress: unsolicited bytes from the destination; reconnecting"
                );
                false
            }
            Err(_) => false,
        };
        if !usable {
            self.close().await;
        }
        usable
    }

    /// One connection attempt; true when connected.
    async fn connect(&mut self) -> bool {
        let s = &self.shared;
        let attempt = tokio::time::timeout(
            s.config.connect_timeout,
            TcpStream::connect(s.config.destination),
        );
        let result = tokio::select! {
            r = attempt => r,
            () = until_stopped(&mut self.stop) => return false,
        };
        match result {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                self.conn = Some(Conn {
                    stream,
                    codec: MllpCodec::new(MAX_ACK_BYTES),
                    buf: BytesMut::with_capacity(4096),
                });
                true
            }
            Ok(Err(e)) => {
                s.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(destination = %s.config.destination, error = %e, "mllp egress connect failed");
                false
            }
            Err(_) => {
                s.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(destination = %s.config.destination, "mllp egress connect timed out");
                false
            }
        }
    }

    async fn close(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = conn.stream.shutdown().await;
        }
    }

    /// Sends one delivery until it is settled, given back, or the egress stops.
    async fn exchange(&mut self, d: Delivery) -> Exchange {
        let s = Arc::clone(&self.shared);
        let received_at = Instant::now();
        let lease = Duration::from_millis(
            s.broker
                .subscription(&s.topic, &s.subscription)
                .map(|sub| sub.config().ack_deadline_ms)
                .unwrap_or(0),
        );
        let lease_end = received_at + lease;
        let margin = (lease / 10).min(Duration::from_secs(1));
        let (partition, offset) = (d.message.partition, d.message.offset);
        let Some(control_id) = Message::parse(&d.message.body)
            .ok()
            .and_then(|m| m.control_id().map(|f| f.raw().to_vec()))
        else {
            s.stats.unsendable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                topic = s.topic,
                partition,
                offset,
                "mllp egress: stored message has no readable MSH-10; not sent"
            );
            self.nack(&d, "stored message has no readable MSH-10", Some(0))
                .await;
            return Exchange::Done;
        };
        let framed = frame(&d.message.body);
        let mut first = true;
        loop {
            if self.stopping() {
                self.close().await;
                self.nack(&d, "mllp egress stopping", Some(0)).await;
                return Exchange::Stopped;
            }
            if !first && Instant::now() + s.config.ack_timeout + margin > lease_end {
                s.stats.released.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    topic = s.topic,
                    partition,
                    offset,
                    delivery = d.delivery_id,
                    "mllp egress: no matching ack before the lease ends; delivery given back"
                );
                let delay = ms(self.backoff.peek());
                self.nack(&d, "no matching ack before lease end", Some(delay))
                    .await;
                return Exchange::Done;
            }
            if !self.connected().await && !self.connect().await {
                if self.stopping() {
                    continue;
                }
                first = false;
                let delay = self.backoff.take();
                self.sleep(delay).await;
                continue;
            }
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            s.stats.sent.fetch_add(1, Ordering::Relaxed);
            if !first {
                s.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            let sent = conn.stream.write_all(&framed).await;
            let reply = match sent {
                Ok(()) => {
                    let timeout = s.config.ack_timeout;
                    let stop = &mut self.stop;
                    tokio::select! {
                        r = read_reply(conn, timeout) => r,
                        () = until_stopped(stop) => Reply::Stopped,
                    }
                }
                Err(_) => Reply::Broken,
            };
            let failure = match reply {
                Reply::Stopped => continue,
                Reply::Timeout => {
                    s.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    "timeout"
                }
                Reply::Broken => {
                    s.stats.broken.fetch_add(1, Ordering::Relaxed);
                    "connection broken"
                }
                Reply::Frame(bytes) => match parse_ack(&bytes) {
                    Ok(ack) if ack.acknowledged_control_id == control_id.as_slice() => {
                        self.backoff.reset();
                        let text = ack
                            .best_text()
                            .map(|t| t.chars().take(MAX_REASON_CHARS).collect::<String>());
                        return self.settle(&d, ack.code, text).await;
                    }
                    Ok(_) | Err(_) => {
                        s.stats.mismatched.fetch_add(1, Ordering::Relaxed);
                        "ack unreadable or for another control id"
                    }
                },
            };
            tracing::info!(
                topic = s.topic,
                partition,
                offset,
                delivery = d.delivery_id,
                attempt = d.attempt,
                bytes = framed.len(),
                failure,
                "mllp egress: no matching ack; closing the connection and resending"
            );
            // Never reuse a connection on which an answer may still arrive.
            self.close().await;
            let delay = self.backoff.take();
            self.sleep(delay).await;
        }
    }

    async fn settle(&mut self, d: &Delivery, code: AckCode, text: Option<String>) -> Exchange {
        let s = Arc::clone(&self.shared);
        let (partition, offset) = (d.message.partition, d.message.offset);
        match code {
            AckCode::AA | AckCode::CA => {
                s.stats.acked.fetch_add(1, Ordering::Relaxed);
                match s
                    .broker
                    .ack(&s.topic, &s.subscription, &[d.delivery_id])
                    .await
                {
                    Ok(refused) => {
                        for (_, why) in refused {
                            log_refusal(&s.topic, partition, offset, why);
                        }
                    }
                    Err(e) => tracing::error!(
                        topic = s.topic,
                        partition,
                        offset,
                        code = e.code(),
                        error = %e,
                        "mllp egress: broker ack failed; the message will be sent again"
                    ),
                }
            }
            AckCode::AE | AckCode::AR | AckCode::CE | AckCode::CR => {
                s.stats.negative.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    topic = s.topic,
                    partition,
                    offset,
                    delivery = d.delivery_id,
                    attempt = d.attempt,
                    code = code_str(code),
                    "mllp egress: negative ack"
                );
                let reason = format!(
                    "destination answered {}: {}",
                    code_str(code),
                    text.as_deref().unwrap_or("no text")
                );
                let delay = match s.config.on_negative_ack {
                    NegativeAckPolicy::DeadLetter => 0,
                    NegativeAckPolicy::Retry => {
                        let mut b = Backoff::new(s.config.backoff_initial, s.config.backoff_max);
                        for _ in 1..d.attempt.min(64) {
                            b.take();
                        }
                        ms(b.peek())
                    }
                };
                self.nack(d, &reason, Some(delay)).await;
            }
        }
        Exchange::Done
    }

    async fn nack(&self, d: &Delivery, reason: &str, delay_ms: Option<u64>) {
        let s = &self.shared;
        let (partition, offset) = (d.message.partition, d.message.offset);
        match s
            .broker
            .nack(
                &s.topic,
                &s.subscription,
                &[d.delivery_id],
                reason,
                delay_ms,
            )
            .await
        {
            Ok(refused) => {
                for (_, why) in refused {
                    log_refusal(&s.topic, partition, offset, why);
                }
            }
            Err(e) => tracing::error!(
                topic = s.topic,
                partition,
                offset,
                code = e.code(),
                error = %e,
                "mllp egress: broker nack failed; the lease will run out instead"
            ),
        }
    }
}

fn log_refusal(topic: &str, partition: u32, offset: u64, why: SettleRefusal) {
    tracing::warn!(
        topic,
        partition,
        offset,
        refusal = why.code(),
        "mllp egress: settlement refused; the message will be delivered and sent again"
    );
}

fn code_str(code: AckCode) -> &'static str {
    match code {
        AckCode::AA => "AA",
        AckCode::AE => "AE",
        AckCode::AR => "AR",
        AckCode::CA => "CA",
        AckCode::CE => "CE",
        AckCode::CR => "CR",
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reads the next frame within `timeout`.
async fn read_reply(conn: &mut Conn, timeout: Duration) -> Reply {
    let deadline = Instant::now() + timeout;
    loop {
        match conn.codec.decode(&mut conn.buf) {
            Ok(Some(Frame::Message(bytes))) => return Reply::Frame(bytes),
            Ok(Some(Frame::Skipped(n))) => {
                tracing::debug!(bytes = n, "mllp egress: bytes outside a frame skipped");
                continue;
            }
            Ok(None) => {}
            Err(_) => return Reply::Broken,
        }
        match tokio::time::timeout_at(deadline, conn.stream.read_buf(&mut conn.buf)).await {
            Err(_) => return Reply::Timeout,
            Ok(Err(_)) => return Reply::Broken,
            Ok(Ok(0)) => {
                return match conn.codec.decode_eof(&mut conn.buf) {
                    Ok(Some(Frame::Message(bytes))) => Reply::Frame(bytes),
                    _ => Reply::Broken,
                };
            }
            Ok(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_bound_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let seen: Vec<u64> = (0..5).map(|_| ms(b.take())).collect();
        assert_eq!(seen, vec![100, 200, 350, 350, 350]);
        b.reset();
        assert_eq!(ms(b.peek()), 100);
    }
}
