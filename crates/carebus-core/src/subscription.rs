//! Subscriptions: durable cursors on a topic whose consumers compete for deliveries.
//!
//! Every subscription of a topic receives every message (publish/subscribe); the
//! consumers of one subscription share its messages (work queue). A delivery is held
//! under a lease and carries a fresh, random delivery id: an ack or nack with an
//! unknown, stale or expired id is refused and changes nothing. Per partition key,
//! the next message is not handed out while an earlier one is unacknowledged, so one
//! patient's messages are processed in order and a failing message holds back only
//! its own key.
//!
//! State is an event log (`events/`, a carebus-log) replayed on open: acks, nacks,
//! dead letters and cumulative acks are fsynced before they are answered; delivery
//! attempts are logged without waiting (a crash may forget an attempt count, never an
//! ack). After a crash every unacknowledged message is delivered again and no
//! acknowledged one is.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use carebus_log::{Log, LogConfig, LogError, Record, Retention, now_ms};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::broker::TopicRuntime;
use crate::message::StoredMessage;
use crate::topic::validate_name;

/// Messages of one partition held in memory per subscription, beyond the cursor.
const WINDOW: usize = 1024;

/// How deliveries are spread over the consumers waiting on a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dispatch {
    /// In turn.
    #[default]
    RoundRobin,
    /// At random.
    Random,
    /// To the consumer with the fewest unacknowledged deliveries.
    LeastInFlight,
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// With the oldest stored message.
    #[default]
    Earliest,
    /// With the next message published.
    Latest,
}

/// Redelivery backoff: `initial_ms × multiplier^(attempt-1)`, at most `max_ms`, with
/// ± `jitter` (a fraction) of randomness.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial_ms: u64,
    /// Longest delay.
    pub max_ms: u64,
    /// Growth per attempt (≥ 1).
    pub multiplier: f64,
    /// Random spread, 0 ..= 1.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_ms: 1000,
            max_ms: 60_000,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// Delay before attempt `attempts + 1`, given a random number in 0..1.
    pub fn delay_ms(&self, attempts: u32, random01: f64) -> u64 {
        let exp = i32::try_from(attempts.saturating_sub(1))
            .unwrap_or(i32::MAX)
            .min(60);
        let base =
            (self.initial_ms as f64 * self.multiplier.max(1.0).powi(exp)).min(self.max_ms as f64);
        let spread = base * self.jitter.clamp(0.0, 1.0) * (2.0 * random01.clamp(0.0, 1.0) - 1.0);
        (base + spread).clamp(0.0, self.max_ms as f64) as u64
    }
}

/// A subscription's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionConfig {
    /// How deliveries are spread over consumers.
    pub dispatch: Dispatch,
    /// Lease of a delivery: unacknowledged after this, it is delivered again.
    pub ack_deadline_ms: u64,
    /// Deliveries of one message before it is dead-lettered.
    pub max_attempts: u32,
    /// Delay before a failed message is delivered again.
    pub backoff: Backoff,
    /// Where a new subscription starts.
    pub start: StartPosition,
    /// Compensation topic: a failure record is published there for every dead letter.
    pub dead_letter_topic: Option<String>,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            dispatch: Dispatch::RoundRobin,
            ack_deadline_ms: 30_000,
            max_attempts: 5,
            backoff: Backoff::default(),
            start: StartPosition::Earliest,
            dead_letter_topic: None,
        }
    }
}

impl SubscriptionConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), SubscriptionError> {
        let bad = |field: &'static str, reason: &'static str| {
            Err(SubscriptionError::InvalidSetting { field, reason })
        };
        if !(1..=86_400_000).contains(&self.ack_deadline_ms) {
            return bad("ack_deadline_ms", "must be between 1 ms and 24 h");
        }
        if !(1..=1000).contains(&self.max_attempts) {
            return bad("max_attempts", "must be between 1 and 1000");
        }
        if !(self.backoff.multiplier.is_finite()
            && self.backoff.multiplier >= 1.0
            && self.backoff.multiplier <= 100.0)
        {
            return bad("backoff.multiplier", "must be between 1 and 100");
        }
        if !(self.backoff.jitter.is_finite() && (0.0..=1.0).contains(&self.backoff.jitter)) {
            return bad("backoff.jitter", "must be between 0 and 1");
        }
        if self.backoff.initial_ms > self.backoff.max_ms || self.backoff.max_ms > 86_400_000 {
            return bad(
                "backoff",
                "initial_ms must not exceed max_ms, and max_ms at most 24 h",
            );
        }
        if let Some(t) = &self.dead_letter_topic {
            validate_name(t).map_err(|_| SubscriptionError::InvalidSetting {
                field: "dead_letter_topic",
                reason: "must be a valid topic name",
            })?;
        }
        Ok(())
    }
}

/// Errors of subscription operations.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// A setting is out of range.
    #[error("invalid subscription setting {field}: {reason}")]
    InvalidSetting {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The subscription's files failed.
    #[error("subscription storage {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The subscription's event log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A stored file is unreadable.
    #[error("subscription file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No such dead letter.
    #[error("no dead letter {0}")]
    UnknownDeadLetter(u64),
    /// No such partition.
    #[error("no partition {0}")]
    UnknownPartition(u32),
    /// A cumulative ack past the last stored message.
    #[error("partition {partition} ends before offset {offset} (next offset {end})")]
    OffsetBeyondEnd {
        /// The partition.
        partition: u32,
        /// The offset asked for.
        offset: u64,
        /// The partition's next offset.
        end: u64,
    },
    /// An internal lock was poisoned.
    #[error("internal error: a lock was poisoned")]
    Internal,
}

impl SubscriptionError {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            SubscriptionError::InvalidSetting { .. } => "invalid_subscription",
            SubscriptionError::Log(LogError::StorageFull { .. }) => "storage_full",
            SubscriptionError::Io { .. }
            | SubscriptionError::Log(_)
            | SubscriptionError::Corrupt { .. } => "storage_error",
            SubscriptionError::UnknownDeadLetter(_) => "unknown_dead_letter",
            SubscriptionError::UnknownPartition(_) => "unknown_partition",
            SubscriptionError::OffsetBeyondEnd { .. } => "offset_beyond_end",
            SubscriptionError::Internal => "internal",
        }
    }
}

fn poisoned<T>(_: T) -> SubscriptionError {
    SubscriptionError::Internal
}

/// A message's position: (partition, offset).
pub(crate) type Position = (u32, u64);
/// What an all-or-nothing hold gives: the positions held, or why not.
pub(crate) type HoldOutcome = Result<Vec<Position>, Vec<Refusal>>;

/// A delivery being settled: (delivery id, partition, offset).
type Settling = (u64, u32, u64);
/// A delivery id that was refused, and why.
pub type Refusal = (u64, SettleRefusal);

/// Why an ack or nack of one delivery id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SettleRefusal {
    /// Never issued, already settled, or issued to an attempt that was superseded.
    UnknownOrStale,
    /// The lease ran out before the ack arrived; the message will be delivered again.
    LeaseExpired,
}

impl SettleRefusal {
    /// A stable code for the wire.
    pub fn code(self) -> &'static str {
        match self {
            SettleRefusal::UnknownOrStale => "unknown_or_stale_delivery",
            SettleRefusal::LeaseExpired => "lease_expired",
        }
    }
}

/// One delivery attempt handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Fencing token of this attempt; ack and nack name it.
    pub delivery_id: u64,
    /// 1 for the first delivery of the message, then 2, 3, …
    pub attempt: u32,
    /// The message.
    pub message: StoredMessage,
}

/// A message that exhausted its attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its id in the dead-letter store.
    pub id: u64,
    /// Original partition.
    pub partition: u32,
    /// Original offset.
    pub offset: u64,
    /// The last failure reason.
    pub reason: String,
    /// Deliveries made.
    pub attempts: u32,
    /// First failure (ms since the epoch).
    pub first_failure_ms: i64,
    /// Last failure (ms since the epoch).
    pub last_failure_ms: i64,
}

/// One step in the life of a message in a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceEvent {
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// `delivered`, `not_handed_over` (the receiver went away before it got the
    /// delivery; the attempt does not count), `acked`, `nacked`, `lease_expired`,
    /// `dead_lettered`, `cumulative_ack`, `dead_letter_replayed` or
    /// `dead_letter_discarded`.
    pub kind: &'static str,
    /// Delivery attempt number (for `delivered`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Consumer (for `delivered`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Reason (for `nacked` and `dead_lettered`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A message's history in one subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionTrace {
    /// The subscription.
    pub subscription: String,
    /// `pending`, `in_flight`, `acknowledged`, `dead_lettered`, `discarded` (a dead
    /// letter thrown away) or `not_subscribed` (the message precedes the subscription's
    /// start).
    pub state: &'static str,
    /// What happened, oldest first.
    pub events: Vec<TraceEvent>,
}

/// Events of the subscription's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
enum Event {
    Attempt {
        p: u32,
        o: u64,
        n: u32,
        c: String,
        t: i64,
    },
    /// An attempt that never reached its consumer (the receiver went away): it does
    /// not count.
    Released {
        p: u32,
        o: u64,
        n: u32,
        t: i64,
    },
    Ack {
        p: u32,
        o: u64,
        t: i64,
    },
    Nack {
        p: u32,
        o: u64,
        t: i64,
        reason: String,
    },
    Expired {
        p: u32,
        o: u64,
        t: i64,
    },
    Dead {
        p: u32,
        o: u64,
        t: i64,
        dl: DeadLetter,
    },
    CumulativeAck {
        p: u32,
        upto: u64,
        t: i64,
    },
    DeadLetterReplay {
        id: u64,
        t: i64,
    },
    DeadLetterDiscard {
        id: u64,
        t: i64,
    },
}

impl Event {
    fn record(&self) -> Record {
        Record::new(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Stored as `subscription.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SubscriptionFile {
    config: SubscriptionConfig,
    /// Per partition, the offset the subscription started at.
    start_offsets: Vec<u64>,
}

#[derive(Debug, Clone)]
enum Status {
    Ready {
        not_before_ms: i64,
    },
    InFlight {
        id: u64,
        consumer: String,
        deadline_ms: i64,
    },
    /// Being acknowledged, nacked or dead-lettered: not deliverable, not expirable.
    Settling,
}

#[derive(Debug, Clone, Default)]
struct Failures {
    attempts: u32,
    first_ms: Option<i64>,
    last_ms: Option<i64>,
    reason: Option<String>,
}

#[derive(Debug)]
struct Pending {
    message: StoredMessage,
    status: Status,
    failures: Failures,
}

#[derive(Debug, Default)]
struct PartState {
    floor: u64,
    done: BTreeSet<u64>,
    read_pos: u64,
    pending: BTreeMap<u64, Pending>,
    key_queues: HashMap<Bytes, VecDeque<u64>>,
    /// No pending message below this offset is `Ready` (a lower bound: dispatch starts
    /// its scan here instead of walking every delivery in flight; anything that makes a
    /// message ready lowers it).
    ready_from: u64,
}

impl PartState {
    fn is_done(&self, o: u64) -> bool {
        o < self.floor || self.done.contains(&o)
    }

    fn mark_done(&mut self, o: u64) {
        if o >= self.floor {
            self.done.insert(o);
        }
        while self.done.remove(&self.floor) {
            self.floor += 1;
        }
    }

    fn unmark_done(&mut self, o: u64) {
        self.done.remove(&o);
    }

    fn is_head_of_key(&self, o: u64, key: Option<&Bytes>) -> bool {
        key.is_none_or(|k| self.key_queues.get(k).and_then(|q| q.front()) == Some(&o))
    }

    fn remove_pending(&mut self, o: u64) -> Option<Pending> {
        let p = self.pending.remove(&o)?;
        if let Some(k) = &p.message.partition_key
            && let Some(q) = self.key_queues.get_mut(k)
        {
            q.retain(|&x| x != o);
            if q.is_empty() {
                self.key_queues.remove(k);
            }
        }
        Some(p)
    }

    fn insert_pending(&mut self, o: u64, p: Pending) {
        if matches!(p.status, Status::Ready { .. }) {
            self.ready_from = self.ready_from.min(o);
        }
        if let Some(k) = &p.message.partition_key {
            let q = self.key_queues.entry(k.clone()).or_default();
            let at = q.partition_point(|&x| x < o);
            q.insert(at, o);
        }
        self.pending.insert(o, p);
    }
}

/// Body bytes one receive answers with at most (always at least one message): a batch
/// of large messages (reports, PDFs) is cut short instead of growing without bound.
pub const MAX_RECEIVE_BYTES: usize = 8 << 20;

#[derive(Debug)]
struct Waiter {
    id: u64,
    consumer: String,
    max: usize,
    batch: Vec<Delivery>,
    /// Body bytes in `batch` (bounded by [`MAX_RECEIVE_BYTES`]).
    bytes: usize,
    tx: Option<oneshot::Sender<Vec<Delivery>>>,
}

/// Unregisters a receiver's waiter when its `receive` ends in any way.
struct WaiterGuard<'a> {
    sub: &'a Subscription,
    id: u64,
    rx: Option<oneshot::Receiver<Vec<Delivery>>>,
}

impl WaiterGuard<'_> {
    /// The batch, if dispatch has answered this waiter.
    fn try_take(&mut self) -> Option<Vec<Delivery>> {
        let batch = self.rx.as_mut()?.try_recv().ok()?;
        self.rx = None;
        Some(batch)
    }

    /// The batch if any, else nothing (the waiter must be unregistered first).
    fn take(&mut self) -> Vec<Delivery> {
        self.try_take().unwrap_or_default()
    }

    fn unregister(&self) {
        if let Ok(mut s) = self.sub.state.lock() {
            s.waiters.retain(|w| w.id != self.id);
        }
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.unregister();
        // Answered but never taken (the caller went away): give the deliveries back.
        if let Some(batch) = self.try_take() {
            if let Ok(mut s) = self.sub.state.lock() {
                for d in batch {
                    self.sub.release_undelivered(&mut s, d.delivery_id);
                }
            }
            self.sub.changed.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct State {
    closed: bool,
    config: SubscriptionConfig,
    parts: Vec<PartState>,
    in_flight: HashMap<u64, (u32, u64)>,
    /// No lease in flight ends before this (ms; a lower bound, `i64::MAX` when none is
    /// known): lease expiry scans the in-flight deliveries only once it has passed.
    earliest_lease_end_ms: i64,
    consumer_in_flight: HashMap<String, usize>,
    waiters: Vec<Waiter>,
    next_waiter: u64,
    last_served: Option<String>,
    rng: u64,
    /// Failures of messages not loaded yet (from the event log).
    replayed_failures: HashMap<(u32, u64), Failures>,
    dead_letters: BTreeMap<u64, DeadLetter>,
    next_dead_letter: u64,
    delivered: u64,
    redelivered: u64,
    acked: u64,
    nacked: u64,
    expired: u64,
}

/// Counters of a subscription, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// Deliveries handed out (first attempts and redeliveries).
    pub delivered: u64,
    /// Deliveries that were not the first attempt.
    pub redelivered: u64,
    /// Acknowledged deliveries.
    pub acked: u64,
    /// Negative acknowledgements.
    pub nacked: u64,
    /// Leases that ran out.
    pub expired: u64,
    /// Deliveries currently unacknowledged.
    pub in_flight: u64,
    /// Messages stored but not yet acknowledged or dead-lettered.
    pub backlog: u64,
    /// Messages in the dead-letter store.
    pub dead_letters: u64,
}

/// A dead letter to announce on the compensation topic (done by the broker).
#[derive(Debug, Clone)]
pub(crate) struct Compensation {
    pub(crate) topic: String,
    pub(crate) record: serde_json::Value,
    pub(crate) idempotency_key: String,
}

/// A subscription at run time.
#[derive(Debug)]
pub struct Subscription {
    name: String,
    topic: Arc<TopicRuntime>,
    dir: PathBuf,
    events: Log,
    state: Mutex<State>,
    changed: Notify,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SubscriptionError + '_ {
    move |source| SubscriptionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SubscriptionError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err(parent))?;
    }
    Ok(())
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    xxhash_rust::xxh3::xxh3_64(
        &[t.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat(),
    ) | 1
}

impl State {
    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn random01(&mut self) -> f64 {
        (self.next_random() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn new_delivery_id(&mut self) -> u64 {
        loop {
            let id = self.next_random() >> 1; // fits a JSON-safe-ish positive i64
            if id != 0 && !self.in_flight.contains_key(&id) {
                return id;
            }
        }
    }

    /// Notes that the message at `o` of partition `p` became `Ready` again, so that
    /// dispatch's scan of that partition starts no later than it.
    fn became_ready(&mut self, p: u32, o: u64) {
        if let Some(ps) = self.parts.get_mut(p as usize) {
            ps.ready_from = ps.ready_from.min(o);
        }
    }

    fn release_consumer(&mut self, consumer: &str) {
        if let Some(n) = self.consumer_in_flight.get_mut(consumer) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Subscription {
    /// Creates a subscription (or updates its settings) and opens it. Blocking.
    pub(crate) fn create(
        topic: Arc<TopicRuntime>,
        dir: &Path,
        name: &str,
        config: SubscriptionConfig,
    ) -> Result<Subscription, SubscriptionError> {
        config.validate()?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let file = dir.join("subscription.json");
        let start_offsets = match read_file(&file)? {
            Some(existing) => existing.start_offsets,
            None => topic
                .topic()
                .partitions
                .iter()
                .map(|l| match config.start {
                    StartPosition::Earliest => l.start_offset(),
                    StartPosition::Latest => l.next_offset(),
                })
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&SubscriptionFile {
            config,
            start_offsets,
        })
        .map_err(|e| SubscriptionError::Corrupt {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&file, &bytes)?;
        Self::open(topic, dir, name)
    }

    /// Opens an existing subscription, replaying its event log. Blocking.
    pub(crate) fn open(
        topic: Arc<TopicRuntime>,
        dir: &Path,
        name: &str,
    ) -> Result<Subscription, SubscriptionError> {
        let file_path = dir.join("subscription.json");
        let file = read_file(&file_path)?.ok_or_else(|| SubscriptionError::Corrupt {
            path: file_path.clone(),
            reason: "missing".into(),
        })?;
        let log_config = LogConfig {
            segment_bytes: 16 << 20,
            retention: Retention::default(),
            ..LogConfig::default()
        };
        let (events, _) = Log::open(dir.join("events"), log_config)?;
        let partitions = topic.topic().partitions.len();
        let mut parts: Vec<PartState> = (0..partitions)
            .map(|p| {
                let start = file.start_offsets.get(p).copied().unwrap_or(0);
                PartState {
                    floor: start,
                    read_pos: start,
                    ..PartState::default()
                }
            })
            .collect();
        let mut failures: HashMap<(u32, u64), Failures> = HashMap::new();
        let mut dead_letters = BTreeMap::new();
        let mut next_dead_letter = 1u64;
        // Dead letters replayed and not settled since: pending again, even below the cursor.
        let mut undead: BTreeSet<(u32, u64)> = BTreeSet::new();
        let mut at = events.start_offset();
        let end = events.next_offset();
        while at < end {
            let batch = events.read(at, 4096, 8 << 20)?;
            let Some(last) = batch.last().map(|r| r.offset) else {
                break;
            };
            for r in batch {
                let Ok(ev) = serde_json::from_slice::<Event>(&r.value) else {
                    return Err(SubscriptionError::Corrupt {
                        path: dir.join("events"),
                        reason: format!("undecodable event at offset {}", r.offset),
                    });
                };
                let part = |parts: &mut Vec<PartState>, p: u32| -> usize {
                    let i = p as usize;
                    while parts.len() <= i {
                        parts.push(PartState::default());
                    }
                    i
                };
                match ev {
                    Event::Attempt { p, o, n, .. } => {
                        let f = failures.entry((p, o)).or_default();
                        f.attempts = f.attempts.max(n);
                    }
                    Event::Released { p, o, n, .. } => {
                        let f = failures.entry((p, o)).or_default();
                        if f.attempts == n {
                            f.attempts = n.saturating_sub(1);
                        }
                    }
                    Event::Ack { p, o, .. } => {
                        let i = part(&mut parts, p);
                        parts[i].mark_done(o);
                        failures.remove(&(p, o));
                        undead.remove(&(p, o));
                    }
                    Event::Nack { p, o, t, reason } => {
                        let f = failures.entry((p, o)).or_default();
                        f.first_ms.get_or_insert(t);
                        f.last_ms = Some(t);
                        f.reason = Some(reason);
                    }
                    Event::Expired { p, o, t } => {
                        let f = failures.entry((p, o)).or_default();
                        f.first_ms.get_or_insert(t);
                        f.last_ms = Some(t);
                        f.reason = Some("lease expired".into());
                    }
                    Event::Dead { p, o, dl, .. } => {
                        let i = part(&mut parts, p);
                        parts[i].mark_done(o);
                        failures.remove(&(p, o));
                        undead.remove(&(p, o));
                        next_dead_letter = next_dead_letter.max(dl.id + 1);
                        dead_letters.insert(dl.id, dl);
                    }
                    Event::CumulativeAck { p, upto, .. } => {
                        let i = part(&mut parts, p);
                        let ps = &mut parts[i];
                        ps.floor = ps.floor.max(upto.saturating_add(1));
                        ps.done = ps.done.split_off(&ps.floor);
                        while ps.done.remove(&ps.floor) {
                            ps.floor += 1;
                        }
                        failures.retain(|&(fp, fo), _| fp != p || fo > upto);
                        undead.retain(|&(fp, fo)| fp != p || fo > upto);
                    }
                    Event::DeadLetterReplay { id, .. } => {
                        if let Some(dl) = dead_letters.remove(&id) {
                            let i = part(&mut parts, dl.partition);
                            parts[i].unmark_done(dl.offset);
                            failures.remove(&(dl.partition, dl.offset));
                            undead.insert((dl.partition, dl.offset));
                        }
                    }
                    Event::DeadLetterDiscard { id, .. } => {
                        dead_letters.remove(&id);
                    }
                }
            }
            at = last + 1;
        }
        for ps in &mut parts {
            ps.read_pos = ps.floor;
        }
        let config = file.config;
        let mut state = State {
            closed: false,
            config,
            parts,
            in_flight: HashMap::new(),
            earliest_lease_end_ms: i64::MAX,
            consumer_in_flight: HashMap::new(),
            waiters: Vec::new(),
            next_waiter: 1,
            last_served: None,
            rng: seed(),
            replayed_failures: failures,
            dead_letters,
            next_dead_letter,
            delivered: 0,
            redelivered: 0,
            acked: 0,
            nacked: 0,
            expired: 0,
        };
        // Replayed dead letters are pending again even below the cursor.
        for (p, o) in undead {
            if let Some(m) = topic.read_one(p, o).ok().flatten()
                && let Some(ps) = state.parts.get_mut(p as usize)
            {
                ps.insert_pending(
                    o,
                    Pending {
                        message: m,
                        status: Status::Ready { not_before_ms: 0 },
                        failures: Failures::default(),
                    },
                );
            }
        }
        Ok(Subscription {
            name: name.to_owned(),
            topic,
            dir: dir.to_path_buf(),
            events,
            state: Mutex::new(state),
            changed: Notify::new(),
        })
    }

    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its settings.
    pub fn config(&self) -> SubscriptionConfig {
        self.state
            .lock()
            .map(|s| s.config.clone())
            .unwrap_or_default()
    }

    /// Persists new settings (the start offsets stay).
    pub(crate) fn save_config(&self, config: &SubscriptionConfig) -> Result<(), SubscriptionError> {
        let path = self.dir.join("subscription.json");
        let mut file = read_file(&path)?.ok_or_else(|| SubscriptionError::Corrupt {
            path: path.clone(),
            reason: "missing".into(),
        })?;
        file.config = config.clone();
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| SubscriptionError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&path, &bytes)
    }

    /// Replaces its settings in memory (see `save_config`).
    pub(crate) fn set_config(&self, config: SubscriptionConfig) {
        if let Ok(mut s) = self.state.lock() {
            s.config = config;
        }
    }

    /// Receivers currently waiting for deliveries.
    pub fn waiting(&self) -> usize {
        self.state.lock().map_or(0, |s| s.waiters.len())
    }

    /// Counters and gauges.
    pub fn stats(&self) -> SubscriptionStats {
        let Ok(s) = self.state.lock() else {
            return SubscriptionStats::default();
        };
        let topic = self.topic.topic();
        let backlog: u64 = s
            .parts
            .iter()
            .enumerate()
            .map(|(p, ps)| {
                let end = topic
                    .partitions
                    .get(p)
                    .map_or(ps.floor, |l| l.next_offset());
                end.saturating_sub(ps.floor)
                    .saturating_sub(ps.done.len() as u64)
            })
            .sum();
        SubscriptionStats {
            delivered: s.delivered,
            redelivered: s.redelivered,
            acked: s.acked,
            nacked: s.nacked,
            expired: s.expired,
            in_flight: s.in_flight.len() as u64,
            backlog,
            dead_letters: s.dead_letters.len() as u64,
        }
    }

    /// Loads new messages, expires leases. Returns messages to dead-letter.
    fn refresh(
        &self,
        s: &mut State,
        now: i64,
    ) -> Result<Vec<(u32, u64, String)>, SubscriptionError> {
        let topic = self.topic.topic();
        while s.parts.len() < topic.partitions.len() {
            s.parts.push(PartState::default());
        }
        // Expire leases: a scan of the deliveries in flight, once the earliest lease
        // may have ended (each receive comes here; most have nothing to expire).
        let mut expired: Vec<(u64, u32, u64)> = Vec::new();
        if s.earliest_lease_end_ms <= now {
            let mut earliest = i64::MAX;
            for (&id, &(p, o)) in &s.in_flight {
                let status = s
                    .parts
                    .get(p as usize)
                    .and_then(|ps| ps.pending.get(&o))
                    .map(|x| &x.status);
                if let Some(Status::InFlight { deadline_ms, .. }) = status {
                    if *deadline_ms <= now {
                        expired.push((id, p, o));
                    } else {
                        earliest = earliest.min(*deadline_ms);
                    }
                }
            }
            s.earliest_lease_end_ms = earliest;
        }
        let mut to_dead = Vec::new();
        let mut expired_events = Vec::new();
        for (id, p, o) in expired {
            s.in_flight.remove(&id);
            s.expired += 1;
            let max_attempts = s.config.max_attempts;
            let backoff = s.config.backoff;
            let r = s.random01();
            let Some(ps) = s.parts.get_mut(p as usize) else {
                continue;
            };
            let Some(pending) = ps.pending.get_mut(&o) else {
                continue;
            };
            let consumer = match &pending.status {
                Status::InFlight { consumer, .. } => consumer.clone(),
                _ => String::new(),
            };
            pending.failures.first_ms.get_or_insert(now);
            pending.failures.last_ms = Some(now);
            pending.failures.reason = Some("lease expired".into());
            if pending.failures.attempts >= max_attempts {
                pending.status = Status::Settling;
                to_dead.push((p, o, "lease expired".to_owned()));
            } else {
                pending.status = Status::Ready {
                    not_before_ms: now + backoff.delay_ms(pending.failures.attempts, r) as i64,
                };
                s.became_ready(p, o);
            }
            s.release_consumer(&consumer);
            expired_events.push(Event::Expired { p, o, t: now }.record());
        }
        if !expired_events.is_empty() {
            let _ = self.events.append_detached(&expired_events);
        }
        // Load the window.
        for (p, ps) in s.parts.iter_mut().enumerate() {
            let Some(log) = topic.partitions.get(p) else {
                continue;
            };
            let end = log.next_offset();
            ps.read_pos = ps.read_pos.max(ps.floor).max(log.start_offset());
            while ps.pending.len() < WINDOW && ps.read_pos < end {
                let want = WINDOW - ps.pending.len();
                let records = log.read(ps.read_pos, want, 4 << 20)?;
                let Some(last) = records.last().map(|r| r.offset) else {
                    break;
                };
                for r in records {
                    let o = r.offset;
                    if ps.is_done(o) || ps.pending.contains_key(&o) {
                        continue;
                    }
                    let p32 = u32::try_from(p).unwrap_or(u32::MAX);
                    let failures = s.replayed_failures.remove(&(p32, o)).unwrap_or_default();
                    let message = StoredMessage::from_record(p32, r);
                    ps.insert_pending(
                        o,
                        Pending {
                            message,
                            status: Status::Ready { not_before_ms: 0 },
                            failures,
                        },
                    );
                }
                ps.read_pos = last + 1;
            }
        }
        Ok(to_dead)
    }

    /// Hands deliverable messages to waiting consumers by the dispatch strategy.
    fn dispatch(&self, s: &mut State, now: i64) {
        if s.waiters.is_empty() {
            return;
        }
        let capacity: usize = s
            .waiters
            .iter()
            .map(|w| w.max.saturating_sub(w.batch.len()))
            .sum();
        let mut candidates = Vec::new();
        for (p, ps) in s.parts.iter_mut().enumerate() {
            // The deliveries in flight ahead of the first ready message are skipped.
            let mut first_ready = None;
            let mut complete = true;
            for (&o, pending) in ps.pending.range(ps.ready_from..) {
                if candidates.len() >= capacity {
                    complete = false;
                    break;
                }
                let Status::Ready { not_before_ms } = pending.status else {
                    continue;
                };
                first_ready.get_or_insert(o);
                if not_before_ms <= now
                    && ps.is_head_of_key(o, pending.message.partition_key.as_ref())
                {
                    candidates.push((p, o));
                }
            }
            match first_ready {
                Some(o) => ps.ready_from = o,
                // Nothing ready in the whole partition: later ones lower the bound.
                None if complete => ps.ready_from = u64::MAX,
                None => {}
            }
        }
        let deadline_ms = i64::try_from(s.config.ack_deadline_ms).unwrap_or(i64::MAX);
        let mut attempts = Vec::new();
        for (p, o) in candidates {
            let Some(w) = self.pick_waiter(s) else { break };
            let id = s.new_delivery_id();
            let Some(waiter) = s.waiters.get(w) else {
                break;
            };
            let consumer = waiter.consumer.clone();
            let Some(pending) = s.parts.get_mut(p).and_then(|ps| ps.pending.get_mut(&o)) else {
                continue;
            };
            pending.failures.attempts += 1;
            let attempt = pending.failures.attempts;
            let lease_end = now.saturating_add(deadline_ms);
            pending.status = Status::InFlight {
                id,
                consumer: consumer.clone(),
                deadline_ms: lease_end,
            };
            s.earliest_lease_end_ms = s.earliest_lease_end_ms.min(lease_end);
            let delivery = Delivery {
                delivery_id: id,
                attempt,
                message: pending.message.clone(),
            };
            let p32 = u32::try_from(p).unwrap_or(u32::MAX);
            s.in_flight.insert(id, (p32, o));
            *s.consumer_in_flight.entry(consumer.clone()).or_default() += 1;
            s.delivered += 1;
            if attempt > 1 {
                s.redelivered += 1;
            }
            attempts.push(
                Event::Attempt {
                    p: p32,
                    o,
                    n: attempt,
                    c: consumer,
                    t: now,
                }
                .record(),
            );
            if let Some(waiter) = s.waiters.get_mut(w) {
                waiter.bytes = waiter.bytes.saturating_add(delivery.message.body.len());
                waiter.batch.push(delivery);
            }
        }
        // One append for the attempts of this dispatch (in their order).
        if !attempts.is_empty() {
            let _ = self.events.append_detached(&attempts);
        }
        // Answer every waiter that got something.
        let mut i = 0;
        while i < s.waiters.len() {
            if s.waiters.get(i).is_some_and(|w| !w.batch.is_empty()) {
                let mut w = s.waiters.remove(i);
                if let Some(tx) = w.tx.take()
                    && let Err(batch) = tx.send(std::mem::take(&mut w.batch))
                {
                    // The receiver gave up meanwhile: release the deliveries at once.
                    for d in batch {
                        self.release_undelivered(s, d.delivery_id);
                    }
                }
            } else {
                i += 1;
            }
        }
    }

    /// A delivery that never reached its consumer goes back as if never made.
    fn release_undelivered(&self, s: &mut State, id: u64) {
        if let Some((p, o)) = s.in_flight.remove(&id)
            && let Some(pending) = s
                .parts
                .get_mut(p as usize)
                .and_then(|ps| ps.pending.get_mut(&o))
            && let Status::InFlight { consumer, .. } = &pending.status
        {
            let c = consumer.clone();
            let n = pending.failures.attempts;
            pending.status = Status::Ready { not_before_ms: 0 };
            pending.failures.attempts = n.saturating_sub(1);
            s.became_ready(p, o);
            s.release_consumer(&c);
            let _ = self.events.append_detached(&[Event::Released {
                p,
                o,
                n,
                t: now_ms(),
            }
            .record()]);
        }
    }

    fn pick_waiter(&self, s: &mut State) -> Option<usize> {
        let open: Vec<usize> = s
            .waiters
            .iter()
            .enumerate()
            .filter(|(_, w)| w.batch.len() < w.max && w.bytes < MAX_RECEIVE_BYTES)
            .map(|(i, _)| i)
            .collect();
        if open.is_empty() {
            return None;
        }
        match s.config.dispatch {
            Dispatch::RoundRobin => {
                // In turn by consumer name (not by arrival), after the last one served:
                // the first open waiter by (name, arrival) after it, else the first of all.
                let name = |i: usize| s.waiters.get(i).map_or("", |w| w.consumer.as_str());
                let order = |a: &usize, b: &usize| name(*a).cmp(name(*b)).then(a.cmp(b));
                let last = s.last_served.as_deref();
                let pick = open
                    .iter()
                    .copied()
                    .filter(|&i| last.is_some_and(|l| name(i) > l))
                    .min_by(order)
                    .or_else(|| open.iter().copied().min_by(order));
                let served = pick.map(|i| name(i).to_owned());
                if served.is_some() {
                    s.last_served = served;
                }
                pick
            }
            Dispatch::Random => {
                let r = usize::try_from(s.next_random() % open.len() as u64).unwrap_or(0);
                open.get(r).copied()
            }
            Dispatch::LeastInFlight => open.iter().copied().min_by_key(|&i| {
                s.waiters.get(i).map_or(usize::MAX, |w| {
                    s.consumer_in_flight.get(&w.consumer).copied().unwrap_or(0)
                })
            }),
        }
    }

    /// Waits up to `wait` for at most `max` deliveries for `consumer`.
    pub(crate) async fn receive(
        &self,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<(Vec<Delivery>, Vec<Compensation>), SubscriptionError> {
        let max = max.clamp(1, 1000);
        let deadline = tokio::time::Instant::now() + wait;
        let (tx, rx) = oneshot::channel();
        let mut compensations = Vec::new();
        let waiter_id = {
            let mut s = self.state.lock().map_err(poisoned)?;
            let id = s.next_waiter;
            s.next_waiter += 1;
            s.waiters.push(Waiter {
                id,
                consumer: consumer.to_owned(),
                max,
                batch: Vec::new(),
                bytes: 0,
                tx: Some(tx),
            });
            id
        };
        // From here on, however this future ends (answer, error, or dropped because the
        // client went away), the guard unregisters the waiter and gives back any
        // deliveries that never reached the consumer.
        let mut guard = WaiterGuard {
            sub: self,
            id: waiter_id,
            rx: Some(rx),
        };
        loop {
            let data = self.topic.new_data.notified();
            let changed = self.changed.notified();
            tokio::pin!(data);
            tokio::pin!(changed);
            data.as_mut().enable();
            changed.as_mut().enable();
            let now = now_ms();
            let to_dead = {
                let mut s = self.state.lock().map_err(poisoned)?;
                if s.closed {
                    return Ok((guard.take(), compensations));
                }
                let to_dead = self.refresh(&mut s, now)?;
                self.dispatch(&mut s, now);
                to_dead
            };
            compensations.extend(self.dead_letter_all(to_dead).await?);
            if let Some(batch) = guard.try_take() {
                return Ok((batch, compensations));
            }
            let tick = tokio::time::sleep(Duration::from_millis(25));
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    guard.unregister();
                    return Ok((guard.take(), compensations));
                }
                () = &mut data => {}
                () = &mut changed => {}
                () = tick => {}
            }
        }
    }

    /// Stops the subscription: waiting receivers answer at once with nothing.
    pub(crate) fn close(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.closed = true;
        }
        self.changed.notify_waiters();
    }

    /// Validates delivery ids and marks them settling. Returns (id, p, o) accepted and refusals.
    fn begin_settle(
        &self,
        ids: &[u64],
        now: i64,
    ) -> Result<(Vec<Settling>, Vec<Refusal>), SubscriptionError> {
        let mut s = self.state.lock().map_err(poisoned)?;
        let mut ok = Vec::new();
        let mut refused = Vec::new();
        for &id in ids {
            let Some(&(p, o)) = s.in_flight.get(&id) else {
                refused.push((id, SettleRefusal::UnknownOrStale));
                continue;
            };
            let Some(pending) = s
                .parts
                .get_mut(p as usize)
                .and_then(|ps| ps.pending.get_mut(&o))
            else {
                refused.push((id, SettleRefusal::UnknownOrStale));
                continue;
            };
            match &pending.status {
                Status::InFlight {
                    id: current,
                    deadline_ms,
                    consumer,
                } if *current == id => {
                    if *deadline_ms <= now {
                        refused.push((id, SettleRefusal::LeaseExpired));
                        continue;
                    }
                    let c = consumer.clone();
                    pending.status = Status::Settling;
                    s.in_flight.remove(&id);
                    s.release_consumer(&c);
                    ok.push((id, p, o));
                }
                _ => refused.push((id, SettleRefusal::UnknownOrStale)),
            }
        }
        Ok((ok, refused))
    }

    /// Puts messages whose settling failed back to deliverable.
    fn abort_settle(&self, items: &[(u64, u32, u64)]) {
        if let Ok(mut s) = self.state.lock() {
            for &(_, p, o) in items {
                if let Some(pending) = s
                    .parts
                    .get_mut(p as usize)
                    .and_then(|ps| ps.pending.get_mut(&o))
                {
                    pending.status = Status::Ready { not_before_ms: 0 };
                    s.became_ready(p, o);
                }
            }
        }
        self.changed.notify_waiters();
    }

    fn finish_done(&self, s: &mut State, p: u32, o: u64) {
        if let Some(ps) = s.parts.get_mut(p as usize) {
            ps.remove_pending(o);
            ps.mark_done(o);
        }
    }

    /// Acknowledges deliveries: durable before this returns.
    pub(crate) async fn ack(
        &self,
        ids: &[u64],
    ) -> Result<Vec<(u64, SettleRefusal)>, SubscriptionError> {
        let (ok, refused) = self.begin_settle(ids, now_ms())?;
        if ok.is_empty() {
            return Ok(refused);
        }
        let positions: Vec<(u32, u64)> = ok.iter().map(|&(_, p, o)| (p, o)).collect();
        if let Err(e) = self.ack_positions(&positions).await {
            self.abort_settle(&ok);
            return Err(e);
        }
        Ok(refused)
    }

    /// Checks delivery ids without changing anything: the positions of those that are
    /// in flight under an unexpired lease, and refusals for the others.
    pub(crate) fn check_in_flight(
        &self,
        ids: &[u64],
    ) -> Result<(Vec<Position>, Vec<Refusal>), SubscriptionError> {
        let now = now_ms();
        let s = self.state.lock().map_err(poisoned)?;
        let mut ok = Vec::new();
        let mut refused = Vec::new();
        for &id in ids {
            let pos = s.in_flight.get(&id).copied();
            let status = pos
                .and_then(|(p, o)| s.parts.get(p as usize)?.pending.get(&o))
                .map(|x| &x.status);
            match (pos, status) {
                (
                    Some(pos),
                    Some(Status::InFlight {
                        id: cur,
                        deadline_ms,
                        ..
                    }),
                ) if *cur == id => {
                    if *deadline_ms <= now {
                        refused.push((id, SettleRefusal::LeaseExpired));
                    } else {
                        ok.push(pos);
                    }
                }
                _ => refused.push((id, SettleRefusal::UnknownOrStale)),
            }
        }
        Ok((ok, refused))
    }

    /// Marks delivery ids as settling (so their leases cannot expire) for a
    /// transaction's commit. All or nothing: on any refusal nothing changes.
    pub(crate) fn hold_for_commit(&self, ids: &[u64]) -> Result<HoldOutcome, SubscriptionError> {
        let (ok, refused) = self.begin_settle(ids, now_ms())?;
        if refused.is_empty() {
            return Ok(Ok(ok.iter().map(|&(_, p, o)| (p, o)).collect()));
        }
        self.abort_settle(&ok);
        Ok(Err(refused))
    }

    /// Releases deliveries held for a commit that did not happen.
    pub(crate) fn release_held(&self, positions: &[(u32, u64)]) {
        let items: Vec<Settling> = positions.iter().map(|&(p, o)| (0, p, o)).collect();
        self.abort_settle(&items);
    }

    /// Acknowledges messages by position, durably (used by acks and by transactions,
    /// also when re-applied after a crash: acknowledging twice is harmless).
    pub(crate) async fn ack_positions(
        &self,
        positions: &[(u32, u64)],
    ) -> Result<(), SubscriptionError> {
        let now = now_ms();
        let records: Vec<Record> = positions
            .iter()
            .map(|&(p, o)| Event::Ack { p, o, t: now }.record())
            .collect();
        self.events.append(&records).await?;
        {
            let mut s = self.state.lock().map_err(poisoned)?;
            for &(p, o) in positions {
                let held = s
                    .parts
                    .get(p as usize)
                    .and_then(|ps| ps.pending.get(&o))
                    .and_then(|x| match &x.status {
                        Status::InFlight { id, consumer, .. } => Some((*id, consumer.clone())),
                        _ => None,
                    });
                if let Some((id, consumer)) = held {
                    s.in_flight.remove(&id);
                    s.release_consumer(&consumer);
                }
                self.finish_done(&mut s, p, o);
            }
            s.acked += positions.len() as u64;
        }
        self.changed.notify_waiters();
        Ok(())
    }

    /// Negative acknowledgement: delivered again after the backoff (or `delay_ms` if
    /// longer), or dead-lettered once out of attempts.
    pub(crate) async fn nack(
        &self,
        ids: &[u64],
        reason: &str,
        delay_ms: Option<u64>,
    ) -> Result<(Vec<(u64, SettleRefusal)>, Vec<Compensation>), SubscriptionError> {
        let now = now_ms();
        let (ok, refused) = self.begin_settle(ids, now)?;
        if ok.is_empty() {
            return Ok((refused, Vec::new()));
        }
        let reason: String = reason.chars().take(1000).collect();
        let records: Vec<Record> = ok
            .iter()
            .map(|&(_, p, o)| {
                Event::Nack {
                    p,
                    o,
                    t: now,
                    reason: reason.clone(),
                }
                .record()
            })
            .collect();
        if let Err(e) = self.events.append(&records).await {
            self.abort_settle(&ok);
            return Err(e.into());
        }
        let mut to_dead = Vec::new();
        {
            let mut s = self.state.lock().map_err(poisoned)?;
            s.nacked += ok.len() as u64;
            let max_attempts = s.config.max_attempts;
            let backoff = s.config.backoff;
            for &(_, p, o) in &ok {
                let r = s.random01();
                let Some(pending) = s
                    .parts
                    .get_mut(p as usize)
                    .and_then(|ps| ps.pending.get_mut(&o))
                else {
                    continue;
                };
                pending.failures.first_ms.get_or_insert(now);
                pending.failures.last_ms = Some(now);
                pending.failures.reason = Some(reason.clone());
                if pending.failures.attempts >= max_attempts {
                    to_dead.push((p, o, reason.clone()));
                } else {
                    let delay = backoff
                        .delay_ms(pending.failures.attempts, r)
                        .max(delay_ms.unwrap_or(0));
                    pending.status = Status::Ready {
                        not_before_ms: now.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)),
                    };
                    s.became_ready(p, o);
                }
            }
        }
        let compensations = self.dead_letter_all(to_dead).await?;
        self.changed.notify_waiters();
        Ok((refused, compensations))
    }

    /// Moves messages (already `Settling`) to the dead-letter store.
    async fn dead_letter_all(
        &self,
        items: Vec<(u32, u64, String)>,
    ) -> Result<Vec<Compensation>, SubscriptionError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let (letters, target) = {
            let mut s = self.state.lock().map_err(poisoned)?;
            let mut letters = Vec::new();
            for (p, o, reason) in items {
                let id = s.next_dead_letter;
                s.next_dead_letter += 1;
                let Some(pending) = s.parts.get(p as usize).and_then(|ps| ps.pending.get(&o))
                else {
                    continue;
                };
                letters.push(DeadLetter {
                    id,
                    partition: p,
                    offset: o,
                    reason,
                    attempts: pending.failures.attempts,
                    first_failure_ms: pending.failures.first_ms.unwrap_or(now),
                    last_failure_ms: pending.failures.last_ms.unwrap_or(now),
                });
            }
            (letters, s.config.dead_letter_topic.clone())
        };
        let records: Vec<Record> = letters
            .iter()
            .map(|dl| {
                Event::Dead {
                    p: dl.partition,
                    o: dl.offset,
                    t: now,
                    dl: dl.clone(),
                }
                .record()
            })
            .collect();
        if let Err(e) = self.events.append(&records).await {
            let back: Vec<(u64, u32, u64)> =
                letters.iter().map(|d| (0, d.partition, d.offset)).collect();
            self.abort_settle(&back);
            return Err(e.into());
        }
        let mut s = self.state.lock().map_err(poisoned)?;
        let mut compensations = Vec::new();
        for dl in letters {
            let key = self.finish_dead(&mut s, &dl);
            tracing::warn!(
                topic = self.topic.name(),
                subscription = %self.name,
                partition = dl.partition,
                offset = dl.offset,
                attempts = dl.attempts,
                dead_letter = dl.id,
                "message dead-lettered"
            );
            if let Some(t) = &target {
                compensations.push(Compensation {
                    topic: t.clone(),
                    record: serde_json::json!({
                        "topic": self.topic.name(),
                        "subscription": self.name,
                        "dead_letter_id": dl.id,
                        "partition": dl.partition,
                        "offset": dl.offset,
                        "reason": dl.reason,
                        "attempts": dl.attempts,
                        "first_failure_ms": dl.first_failure_ms,
                        "last_failure_ms": dl.last_failure_ms,
                        "idempotency_key": key.map(|k| String::from_utf8_lossy(&k).into_owned()),
                    }),
                    idempotency_key: format!(
                        "carebus-dead-letter/{}/{}/{}/{}/{}",
                        self.topic.name(),
                        self.name,
                        dl.partition,
                        dl.offset,
                        dl.id
                    ),
                });
            }
            s.dead_letters.insert(dl.id, dl);
        }
        Ok(compensations)
    }

    fn finish_dead(&self, s: &mut State, dl: &DeadLetter) -> Option<Bytes> {
        let key = s
            .parts
            .get(dl.partition as usize)
            .and_then(|ps| ps.pending.get(&dl.offset))
            .and_then(|x| x.message.idempotency_key.clone());
        self.finish_done(s, dl.partition, dl.offset);
        key
    }

    /// Acknowledges everything up to and including `upto` in `partition`.
    pub(crate) async fn ack_cumulative(
        &self,
        partition: u32,
        upto: u64,
    ) -> Result<(), SubscriptionError> {
        // Messages not yet stored cannot be acknowledged: they would never be delivered.
        match self.topic.partition(partition).map(|l| l.next_offset()) {
            None => return Err(SubscriptionError::UnknownPartition(partition)),
            Some(end) if upto >= end => {
                return Err(SubscriptionError::OffsetBeyondEnd {
                    partition,
                    offset: upto,
                    end,
                });
            }
            Some(_) => {}
        }
        let now = now_ms();
        self.events
            .append(&[Event::CumulativeAck {
                p: partition,
                upto,
                t: now,
            }
            .record()])
            .await?;
        let mut s = self.state.lock().map_err(poisoned)?;
        while s.parts.len() <= partition as usize {
            s.parts.push(PartState::default());
        }
        let mut released = Vec::new();
        let mut newly_acked = 0u64;
        if let Some(ps) = s.parts.get_mut(partition as usize) {
            let settled: Vec<u64> = ps.pending.range(..=upto).map(|(&o, _)| o).collect();
            newly_acked += settled.len() as u64;
            for o in settled {
                if let Some(p) = ps.remove_pending(o)
                    && let Status::InFlight { id, consumer, .. } = p.status
                {
                    released.push((id, consumer));
                }
            }
            ps.floor = ps.floor.max(upto.saturating_add(1));
            ps.done = ps.done.split_off(&ps.floor);
            while ps.done.remove(&ps.floor) {
                ps.floor += 1;
            }
            ps.read_pos = ps.read_pos.max(ps.floor);
        }
        for (id, consumer) in released {
            s.in_flight.remove(&id);
            s.release_consumer(&consumer);
        }
        s.acked += newly_acked;
        drop(s);
        self.changed.notify_waiters();
        Ok(())
    }

    /// The history and current state of one message in this subscription. Scans the
    /// subscription's event log (an operator's tool, not a hot path).
    pub fn trace(
        &self,
        partition: u32,
        offset: u64,
    ) -> Result<SubscriptionTrace, SubscriptionError> {
        let mut events = Vec::new();
        let mut dead_ids = BTreeSet::new();
        let mut at = self.events.start_offset();
        let end = self.events.next_offset();
        let ev = |at_ms, kind| TraceEvent {
            at_ms,
            kind,
            attempt: None,
            consumer: None,
            reason: None,
        };
        while at < end {
            let batch = self.events.read(at, 4096, 8 << 20)?;
            let Some(last) = batch.last().map(|r| r.offset) else {
                break;
            };
            for r in batch {
                let Ok(e) = serde_json::from_slice::<Event>(&r.value) else {
                    continue;
                };
                let hit = |p: u32, o: u64| p == partition && o == offset;
                match e {
                    Event::Attempt { p, o, n, c, t } if hit(p, o) => {
                        events.push(TraceEvent {
                            attempt: Some(n),
                            consumer: Some(c),
                            ..ev(t, "delivered")
                        });
                    }
                    Event::Ack { p, o, t } if hit(p, o) => events.push(ev(t, "acked")),
                    Event::Nack { p, o, t, reason } if hit(p, o) => {
                        events.push(TraceEvent {
                            reason: Some(reason),
                            ..ev(t, "nacked")
                        });
                    }
                    Event::Expired { p, o, t } if hit(p, o) => events.push(ev(t, "lease_expired")),
                    Event::Released { p, o, n, t } if hit(p, o) => {
                        events.push(TraceEvent {
                            attempt: Some(n),
                            ..ev(t, "not_handed_over")
                        });
                    }
                    Event::Dead { p, o, t, dl } if hit(p, o) => {
                        dead_ids.insert(dl.id);
                        events.push(TraceEvent {
                            reason: Some(dl.reason),
                            ..ev(t, "dead_lettered")
                        });
                    }
                    Event::CumulativeAck { p, upto, t } if p == partition && offset <= upto => {
                        // Only if it still settled something for this message.
                        let settled = events.last().is_some_and(|e| {
                            matches!(
                                e.kind,
                                "acked"
                                    | "dead_lettered"
                                    | "dead_letter_discarded"
                                    | "cumulative_ack"
                            )
                        });
                        if !settled {
                            events.push(ev(t, "cumulative_ack"));
                        }
                    }
                    Event::DeadLetterReplay { id, t } if dead_ids.contains(&id) => {
                        events.push(ev(t, "dead_letter_replayed"))
                    }
                    Event::DeadLetterDiscard { id, t } if dead_ids.contains(&id) => {
                        events.push(ev(t, "dead_letter_discarded"))
                    }
                    _ => {}
                }
            }
            at = last + 1;
        }
        let s = self.state.lock().map_err(poisoned)?;
        let ps = s.parts.get(partition as usize);
        let pending = ps.and_then(|ps| ps.pending.get(&offset));
        let state = if s
            .dead_letters
            .values()
            .any(|d| d.partition == partition && d.offset == offset)
        {
            "dead_lettered"
        } else if let Some(p) = pending {
            if matches!(p.status, Status::InFlight { .. }) {
                "in_flight"
            } else {
                "pending"
            }
        } else if ps.is_some_and(|ps| ps.is_done(offset)) {
            match events.last().map(|e| e.kind) {
                None => "not_subscribed",
                Some("dead_letter_discarded") => "discarded",
                Some(_) => "acknowledged",
            }
        } else {
            "pending"
        };
        Ok(SubscriptionTrace {
            subscription: self.name.clone(),
            state,
            events,
        })
    }

    /// The dead-letter store.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.state
            .lock()
            .map(|s| s.dead_letters.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Puts a dead letter back into the subscription, attempts reset.
    pub(crate) async fn replay_dead_letter(&self, id: u64) -> Result<(), SubscriptionError> {
        let dl = {
            let s = self.state.lock().map_err(poisoned)?;
            s.dead_letters
                .get(&id)
                .cloned()
                .ok_or(SubscriptionError::UnknownDeadLetter(id))?
        };
        self.events
            .append(&[Event::DeadLetterReplay { id, t: now_ms() }.record()])
            .await?;
        let message = self.topic.read_one(dl.partition, dl.offset).map_err(|e| {
            SubscriptionError::Corrupt {
                path: self.dir.clone(),
                reason: e.to_string(),
            }
        })?;
        let mut s = self.state.lock().map_err(poisoned)?;
        s.dead_letters.remove(&id);
        if let (Some(message), Some(ps)) = (message, s.parts.get_mut(dl.partition as usize)) {
            ps.unmark_done(dl.offset);
            ps.insert_pending(
                dl.offset,
                Pending {
                    message,
                    status: Status::Ready { not_before_ms: 0 },
                    failures: Failures::default(),
                },
            );
        }
        drop(s);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Removes a dead letter for good.
    pub(crate) async fn discard_dead_letter(&self, id: u64) -> Result<(), SubscriptionError> {
        {
            let s = self.state.lock().map_err(poisoned)?;
            if !s.dead_letters.contains_key(&id) {
                return Err(SubscriptionError::UnknownDeadLetter(id));
            }
        }
        self.events
            .append(&[Event::DeadLetterDiscard { id, t: now_ms() }.record()])
            .await?;
        self.state
            .lock()
            .map_err(poisoned)?
            .dead_letters
            .remove(&id);
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<Option<SubscriptionFile>, SubscriptionError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| SubscriptionError::Corrupt {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        let b = Backoff {
            initial_ms: 100,
            max_ms: 1000,
            multiplier: 2.0,
            jitter: 0.0,
        };
        assert_eq!(b.delay_ms(1, 0.5), 100);
        assert_eq!(b.delay_ms(2, 0.5), 200);
        assert_eq!(b.delay_ms(3, 0.5), 400);
        assert_eq!(b.delay_ms(10, 0.5), 1000);
        let j = Backoff { jitter: 0.5, ..b };
        assert_eq!(j.delay_ms(1, 0.0), 50);
        assert_eq!(j.delay_ms(1, 1.0), 150);
        assert_eq!(j.delay_ms(u32::MAX, 1.0), 1000);
    }

    #[test]
    fn config_validation_and_json() {
        assert!(SubscriptionConfig::default().validate().is_ok());
        let c: SubscriptionConfig =
            serde_json::from_str(r#"{"dispatch":"least_in_flight","max_attempts":3}"#).unwrap();
        assert_eq!(c.dispatch, Dispatch::LeastInFlight);
        assert_eq!(c.max_attempts, 3);
        assert!(serde_json::from_str::<SubscriptionConfig>(r#"{"dispatch":"fastest"}"#).is_err());
        assert!(
            SubscriptionConfig {
                max_attempts: 0,
                ..c.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            SubscriptionConfig {
                ack_deadline_ms: 0,
                ..c.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            SubscriptionConfig {
                dead_letter_topic: Some("a/b".into()),
                ..c.clone()
            }
            .validate()
            .is_err()
        );
        let bad = Backoff {
            multiplier: f64::NAN,
            ..Backoff::default()
        };
        assert!(SubscriptionConfig { backoff: bad, ..c }.validate().is_err());
    }

    #[test]
    fn the_cursor_advances_over_contiguous_done_offsets_only() {
        let mut ps = PartState::default();
        ps.mark_done(1);
        assert_eq!(ps.floor, 0);
        ps.mark_done(0);
        assert_eq!(ps.floor, 2);
        ps.mark_done(5);
        assert!(ps.is_done(5) && !ps.is_done(3));
        ps.unmark_done(5);
        assert!(!ps.is_done(5));
    }
}
