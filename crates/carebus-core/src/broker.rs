//! The broker: topics at run time and exactly-once publish.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use carebus_log::{AfterAppend, Durability, FsyncPolicy, Log, LogConfig, LogError};
use tokio::sync::Notify;

use crate::dedup::{
    CheckpointPolicy, DedupConfig, DedupEntry, DedupError, DedupIndex, fingerprint,
};
use crate::keys_in_flight::KeysInFlight;
use crate::message::{PublishMessage, StoredMessage};
use crate::store::{Store, StoreError, StoreReport, Topic};
use crate::subscription::{
    Compensation, DeadLetter, Delivery, SettleRefusal, Subscription, SubscriptionConfig,
    SubscriptionError,
};
use crate::topic::{TopicConfig, partition_for_key};
use crate::txn::{OpenTxn, PendingCommit, Transactions, TxnAck, generated_key};

/// Directory of a topic's subscriptions.
const SUBSCRIPTIONS_DIR: &str = "subscriptions";

fn list_subdirs(dir: &Path) -> Result<Vec<PathBuf>, SubscriptionError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(SubscriptionError::Io {
                path: dir.to_path_buf(),
                source: e,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(|e| SubscriptionError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// When a topic's dedup index checkpoints: after 100,000 inserts, but under sustained
/// load not more than once every 10 s unless 1,000,000 inserts wait, so a restart
/// after a crash replays at most 1,000,000 records per topic from the log. Each
/// checkpoint writes the index runs changed since the last one and fsyncs them, beside
/// the log's fdatasyncs on the same disk: against a checkpoint per 100,000 inserts, this
/// ran the publish stream's W1 at 256 in flight 3–7 % faster over 30 s, 13 % over 6 s
/// (BENCHMARKS.md, session 10). Replaying 990,000 records after a `kill -9` took 0.73 s.
const DEDUP_CHECKPOINTS: CheckpointPolicy = CheckpointPolicy {
    every_inserts: 100_000,
    min_interval_ms: 10_000,
    max_inserts: 1_000_000,
};

/// Errors of broker operations. Each has a stable `code()` for the wire.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The store (data directory, topic files) failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A partition log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A deduplication index failed.
    #[error(transparent)]
    Dedup(#[from] DedupError),
    /// No such topic.
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    /// No such partition.
    #[error("topic {topic} has no partition {partition}")]
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
    },
    /// A subscription operation failed.
    #[error(transparent)]
    Subscription(#[from] SubscriptionError),
    /// No such transaction (never begun, already committed or aborted).
    #[error("transaction {0} is not open")]
    UnknownTransaction(u64),
    /// The transaction's timeout passed; it was aborted.
    #[error("transaction {0} timed out and was aborted")]
    TransactionExpired(u64),
    /// The transaction could not commit and was aborted; nothing of it took effect.
    #[error("transaction {id} aborted: {reason}")]
    TransactionAborted {
        /// The transaction.
        id: u64,
        /// Why.
        reason: String,
    },
    /// A transaction would hold more messages or bytes than allowed.
    #[error("a transaction holds at most 10000 messages and 64 MiB of bodies")]
    TransactionTooLarge,
    /// Too many open transactions.
    #[error("too many open transactions")]
    TooManyTransactions,
    /// No such subscription.
    #[error("topic {topic} has no subscription {subscription}")]
    UnknownSubscription {
        /// The topic.
        topic: String,
        /// The subscription asked for.
        subscription: String,
    },
    /// An empty batch.
    #[error("a publish must carry at least one message")]
    EmptyBatch,
    /// The messages of one batch would land in different partitions.
    #[error(
        "the batch's messages map to {0} different partitions; an atomic batch must land in one partition (give them the same partition key, or publish them separately)"
    )]
    BatchSpansPartitions(usize),
    /// An internal lock was poisoned by a panic.
    #[error("internal error: a lock was poisoned")]
    Internal,
}

impl BrokerError {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::Store(StoreError::UnknownTopic(_)) | BrokerError::UnknownTopic(_) => {
                "unknown_topic"
            }
            BrokerError::Store(StoreError::InvalidTopic(_)) => "invalid_topic",
            BrokerError::Store(StoreError::PartitionsCannotShrink { .. }) => {
                "partitions_cannot_shrink"
            }
            BrokerError::Store(_) => "storage_error",
            BrokerError::Log(LogError::StorageFull { .. }) => "storage_full",
            BrokerError::Log(LogError::RecordTooLarge { .. } | LogError::BatchTooLarge { .. }) => {
                "message_too_large"
            }
            BrokerError::Log(LogError::OffsetOutOfRange { .. }) => "offset_out_of_range",
            BrokerError::Log(_) => "storage_error",
            BrokerError::Dedup(_) => "dedup_error",
            BrokerError::Subscription(e) => e.code(),
            BrokerError::UnknownSubscription { .. } => "unknown_subscription",
            BrokerError::UnknownTransaction(_) => "unknown_transaction",
            BrokerError::TransactionExpired(_) => "transaction_expired",
            BrokerError::TransactionAborted { .. } => "transaction_aborted",
            BrokerError::TooManyTransactions => "too_many_transactions",
            BrokerError::TransactionTooLarge => "transaction_too_large",
            BrokerError::UnknownPartition { .. } => "unknown_partition",
            BrokerError::EmptyBatch => "empty_batch",
            BrokerError::BatchSpansPartitions(_) => "batch_spans_partitions",
            BrokerError::Internal => "internal",
        }
    }
}

fn poisoned<T>(_: T) -> BrokerError {
    BrokerError::Internal
}

/// Deliveries a committing transaction holds in one subscription.
type HeldAcks = (Arc<Subscription>, (String, String), Vec<(u32, u64)>);

/// The life of one stored message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MessageTrace {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// When it was stored (ms since the epoch).
    pub stored_ms: i64,
    /// Its idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Size of its body.
    pub body_bytes: usize,
    /// Its history in every subscription of the topic.
    pub subscriptions: Vec<crate::subscription::SubscriptionTrace>,
}

/// Where a test commit stops, as if the process died there.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitStep {
    /// Deliveries held, nothing written.
    BeforeCommitRecord,
    /// The commit batch is durable; nothing applied.
    AfterCommitRecord,
    /// Messages published; acks not applied.
    AfterPublishes,
    /// Everything.
    Done,
}

/// Broker-wide settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Storage settings for every partition log.
    pub log: LogConfig,
    /// Memory budget of each topic's deduplication index before it spills to disk.
    pub dedup_memory_budget_bytes: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            log: LogConfig::default(),
            dedup_memory_budget_bytes: 64 << 20,
        }
    }
}

/// The answer to one published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Partition of the stored copy.
    pub partition: u32,
    /// Offset of the stored copy (the first copy, for a duplicate).
    pub offset: u64,
    /// The idempotency key was seen before: nothing new was stored.
    pub duplicate: bool,
    /// A duplicate whose body differs from the first copy (the first copy stays).
    pub conflict: bool,
    /// Durability of the stored copy.
    pub durability: Durability,
}

/// The size of a topic's deduplication index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupStats {
    /// Remembered idempotency keys (memory and disk).
    pub keys: u64,
    /// Bytes of memory the index holds.
    pub memory_bytes: u64,
    /// Runs spilled to disk.
    pub disk_runs: u64,
}

/// Counters of one topic, for metrics.
#[derive(Debug, Default)]
pub struct TopicCounters {
    /// Messages stored.
    pub published: AtomicU64,
    /// Publishes answered as duplicates.
    pub duplicates: AtomicU64,
    /// Duplicates whose body differed.
    pub conflicts: AtomicU64,
}

/// A topic at run time.
#[derive(Debug)]
pub struct TopicRuntime {
    name: String,
    topic: RwLock<Arc<Topic>>,
    /// Lookups take it briefly; inserts happen under it on the log's thread (see
    /// `publish`); sorting, merging and checkpoints run off it (`run_dedup_maintenance`).
    dedup: Mutex<DedupIndex>,
    /// Serialises dedup maintenance jobs and shutdown checkpoints.
    dedup_maintenance: Mutex<()>,
    /// Set by an insert that left maintenance due; a publisher then starts a job.
    dedup_maintenance_wanted: AtomicBool,
    /// Set while a maintenance job is out; cleared only once the job has let go of this
    /// runtime (see [`MaintenanceJob`]), so that dropping the broker can wait for it.
    dedup_maintenance_running: Arc<AtomicBool>,
    /// Fingerprints of keys being published: a second publish of a key waits for the
    /// first to be indexed (see `publish`).
    keys_in_flight: Arc<KeysInFlight>,
    round_robin: AtomicU32,
    /// Notified after every append, for subscriptions waiting for data.
    pub new_data: Notify,
    /// Publish counters.
    pub counters: TopicCounters,
    subscriptions: RwLock<BTreeMap<String, Arc<Subscription>>>,
}

impl TopicRuntime {
    fn open(
        topic: Arc<Topic>,
        topic_dir: &Path,
        budget: usize,
    ) -> Result<TopicRuntime, BrokerError> {
        let (mut dedup, replay_from) = DedupIndex::open(
            &topic_dir.join("dedup"),
            DedupConfig {
                window: topic.config.dedup_window(),
                memory_budget_bytes: budget,
            },
        )?;
        let mut replayed = 0u64;
        for (p, log) in topic.partitions.iter().enumerate() {
            let p32 = u32::try_from(p).unwrap_or(u32::MAX);
            let mut at = replay_from
                .get(&p32)
                .copied()
                .unwrap_or(0)
                .max(log.start_offset());
            let end = log.next_offset();
            while at < end {
                let records = log.read(at, 1024, 4 << 20)?;
                let Some(last) = records.last().map(|r| r.offset) else {
                    break;
                };
                for r in records {
                    let m = StoredMessage::from_record(p32, r);
                    match &m.idempotency_key {
                        Some(k) => dedup.insert(
                            k,
                            DedupEntry {
                                partition: p32,
                                offset: m.offset,
                                body_hash: m.body_hash,
                                timestamp_ms: m.timestamp_ms,
                            },
                        )?,
                        None => dedup.advance(p32, m.offset)?,
                    }
                    replayed += 1;
                }
                at = last + 1;
            }
        }
        if replayed > 0 {
            dedup.checkpoint()?;
            tracing::info!(topic = %topic.name, records = replayed, keys = dedup.len(), "dedup index caught up with the log");
        }
        dedup.defer_maintenance(DEDUP_CHECKPOINTS, carebus_log::now_ms());
        Ok(TopicRuntime {
            name: topic.name.clone(),
            topic: RwLock::new(topic),
            dedup: Mutex::new(dedup),
            dedup_maintenance: Mutex::new(()),
            dedup_maintenance_wanted: AtomicBool::new(false),
            dedup_maintenance_running: Arc::default(),
            keys_in_flight: Arc::default(),
            round_robin: AtomicU32::new(0),
            new_data: Notify::new(),
            counters: TopicCounters::default(),
            subscriptions: RwLock::new(BTreeMap::new()),
        })
    }

    /// Subscriptions hold their topic; dropping them here breaks that cycle so the
    /// logs close.
    fn close_subscriptions(&self) {
        if let Ok(mut subs) = self.subscriptions.write() {
            subs.clear();
        }
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topic's current configuration and logs.
    pub fn topic(&self) -> Arc<Topic> {
        match self.topic.read() {
            Ok(t) => Arc::clone(&t),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// The partition log, if it exists.
    pub fn partition(&self, p: u32) -> Option<Arc<Log>> {
        self.topic().partitions.get(p as usize).cloned()
    }

    /// The partition log, or a clear error.
    pub fn partition_log(&self, partition: u32) -> Result<Arc<Log>, BrokerError> {
        self.partition(partition)
            .ok_or_else(|| BrokerError::UnknownPartition {
                topic: self.name.clone(),
                partition,
            })
    }

    /// What the topic's deduplication index holds now (keys not yet expired by
    /// maintenance included).
    pub fn dedup_stats(&self) -> Result<DedupStats, BrokerError> {
        let d = self.dedup.lock().map_err(poisoned)?;
        Ok(DedupStats {
            keys: d.len() as u64,
            memory_bytes: d.memory_bytes() as u64,
            disk_runs: d.disk_runs() as u64,
        })
    }

    /// Reads one stored message.
    pub fn read_one(
        &self,
        partition: u32,
        offset: u64,
    ) -> Result<Option<StoredMessage>, BrokerError> {
        let log = self.partition_log(partition)?;
        let mut records = log.read(offset, 1, usize::MAX)?;
        Ok(records
            .pop()
            .filter(|r| r.offset == offset)
            .map(|r| StoredMessage::from_record(partition, r)))
    }

    /// The stored first copy for this idempotency key within the window, verified
    /// against the log (so a fingerprint collision never counts as a duplicate).
    pub fn find_by_idempotency_key(
        &self,
        key: &[u8],
        now_ms: i64,
    ) -> Result<Option<StoredMessage>, BrokerError> {
        self.find_by_fingerprint(key, fingerprint(key), now_ms)
    }

    /// As [`find_by_idempotency_key`](Self::find_by_idempotency_key), with the key's
    /// fingerprint already computed.
    fn find_by_fingerprint(
        &self,
        key: &[u8],
        fp: u64,
        now_ms: i64,
    ) -> Result<Option<StoredMessage>, BrokerError> {
        let candidates = self
            .dedup
            .lock()
            .map_err(poisoned)?
            .candidates_by_fingerprint(fp, now_ms)?;
        for c in candidates {
            match self.read_one(c.partition, c.offset) {
                Ok(Some(m)) if m.idempotency_key.as_deref() == Some(key) => return Ok(Some(m)),
                Ok(_) | Err(BrokerError::Log(LogError::OffsetOutOfRange { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    fn durability(&self, policy: FsyncPolicy) -> Durability {
        match policy {
            FsyncPolicy::Always => Durability::Fsynced,
            FsyncPolicy::Interval(_) => Durability::Buffered,
        }
    }

    /// Starts a dedup maintenance job on a blocking thread if an insert asked for one
    /// and none is running (without a runtime, runs it here).
    /// Starts the deduplication index's maintenance if any is due now (expiry of keys
    /// past the window, a checkpoint, full buffers), as a publish would: for topics
    /// that receive no publishes for a while (see [`Broker::run_due_maintenance`]).
    pub fn run_due_maintenance(self: &Arc<Self>) {
        let due = self
            .dedup
            .lock()
            .is_ok_and(|d| d.maintenance_due(carebus_log::now_ms()));
        if due {
            self.dedup_maintenance_wanted.store(true, Ordering::Release);
            self.schedule_dedup_maintenance();
        }
    }

    fn schedule_dedup_maintenance(self: &Arc<Self>) {
        if !self.dedup_maintenance_wanted.load(Ordering::Acquire)
            || self.dedup_maintenance_running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let job = MaintenanceJob {
            rt: Some(Arc::clone(self)),
            running: Arc::clone(&self.dedup_maintenance_running),
        };
        let work = move || {
            if let Some(rt) = &job.rt {
                rt.dedup_maintenance_wanted.store(false, Ordering::Release);
                rt.run_dedup_maintenance();
            }
            drop(job);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }

    /// Runs the dedup index's pending maintenance: the index's lock is held only to
    /// take the job and to install its result, never while sorting or writing files.
    fn run_dedup_maintenance(&self) {
        let Ok(_serial) = self.dedup_maintenance.lock() else {
            return;
        };
        // Bounded: a job takes all pending work; a few more rounds catch what arrived
        // meanwhile, and only while more is due.
        for round in 0..8 {
            let job = match self.dedup.lock() {
                Ok(mut d) => {
                    let now = carebus_log::now_ms();
                    if round > 0 && !d.maintenance_due(now) {
                        return;
                    }
                    d.begin_maintenance(now)
                }
                Err(_) => return,
            };
            let job = match job {
                Ok(Some(job)) => job,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(topic = %self.name, error = %e, "dedup maintenance refused");
                    return;
                }
            };
            let done = job.run();
            let finished = match self.dedup.lock() {
                Ok(mut d) => d.finish_maintenance(done),
                Err(_) => return,
            };
            if let Err(e) = finished {
                // The index is poisoned: publishes to this topic fail until a restart,
                // which rebuilds the index from the log.
                tracing::error!(topic = %self.name, error = %e, "dedup maintenance failed");
                return;
            }
        }
    }

    /// Persists the dedup index (waiting for a running maintenance job first).
    fn checkpoint_dedup(&self) -> Result<(), BrokerError> {
        let _serial = self.dedup_maintenance.lock().map_err(poisoned)?;
        self.dedup.lock().map_err(poisoned)?.checkpoint()?;
        Ok(())
    }
}

/// The broker core: topics, exactly-once publish, reads.
#[derive(Debug)]
pub struct Broker {
    txns: Transactions,
    store: Store,
    config: BrokerConfig,
    runtimes: RwLock<BTreeMap<String, Arc<TopicRuntime>>>,
}

impl Broker {
    /// Opens the data directory: recovers every partition log and brings every topic's
    /// deduplication index level with its log. Blocking: call it from a blocking thread.
    pub fn open(
        dir: impl AsRef<Path>,
        config: BrokerConfig,
    ) -> Result<(Broker, StoreReport), BrokerError> {
        let (store, report) = Store::open(dir, &config.log)?;
        let mut runtimes = BTreeMap::new();
        for topic in store.topics() {
            let topic_dir = store.topic_dir(&topic.name);
            let rt = Arc::new(TopicRuntime::open(
                Arc::clone(&topic),
                &topic_dir,
                config.dedup_memory_budget_bytes,
            )?);
            let mut subs = BTreeMap::new();
            for dir in list_subdirs(&topic_dir.join(SUBSCRIPTIONS_DIR))? {
                let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                    continue;
                };
                if name.starts_with('.') || !dir.join("subscription.json").exists() {
                    // An unfinished creation or deletion.
                    std::fs::remove_dir_all(&dir).map_err(|e| SubscriptionError::Io {
                        path: dir.clone(),
                        source: e,
                    })?;
                    continue;
                }
                let sub = Subscription::open(Arc::clone(&rt), &dir, &name)?;
                subs.insert(name, Arc::new(sub));
            }
            *rt.subscriptions.write().map_err(poisoned)? = subs;
            runtimes.insert(topic.name.clone(), rt);
        }
        let txn_dir = store.dir().join("txn");
        let (txn_log, _) = Log::open(
            &txn_dir,
            LogConfig {
                retention: carebus_log::Retention::default(),
                ..config.log.clone()
            },
        )
        .map_err(|source| StoreError::Log {
            path: txn_dir.clone(),
            source,
        })?;
        Ok((
            Broker {
                txns: Transactions::new(txn_log),
                store,
                config,
                runtimes: RwLock::new(runtimes),
            },
            report,
        ))
    }

    /// The data directory.
    pub fn dir(&self) -> PathBuf {
        self.store.dir().to_path_buf()
    }

    /// Creates a topic or updates its configuration. Returns whether it was created.
    pub fn put_topic(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<(Arc<TopicRuntime>, bool), BrokerError> {
        let mut runtimes = self.runtimes.write().map_err(poisoned)?;
        let (topic, created) = self.store.put_topic(name, config)?;
        if let Some(rt) = runtimes.get(name) {
            // Same index and counters; new configuration and partitions, and the new
            // deduplication window from now on.
            let window = topic.config.dedup_window();
            *rt.topic.write().map_err(poisoned)? = topic;
            rt.dedup.lock().map_err(poisoned)?.set_window(window);
            return Ok((Arc::clone(rt), created));
        }
        let rt = Arc::new(TopicRuntime::open(
            topic,
            &self.store.topic_dir(name),
            self.config.dedup_memory_budget_bytes,
        )?);
        runtimes.insert(name.to_owned(), Arc::clone(&rt));
        Ok((rt, created))
    }

    /// The topic at run time.
    pub fn topic(&self, name: &str) -> Result<Arc<TopicRuntime>, BrokerError> {
        self.runtimes
            .read()
            .map_err(poisoned)?
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_owned()))
    }

    /// All topics.
    pub fn topics(&self) -> Vec<Arc<TopicRuntime>> {
        self.runtimes
            .read()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Starts every topic's due index maintenance (see
    /// [`TopicRuntime::run_due_maintenance`]); a server calls this now and then so an
    /// idle topic forgets its expired keys too. Cheap when nothing is due.
    pub fn run_due_maintenance(&self) {
        for rt in self.topics() {
            rt.run_due_maintenance();
        }
    }

    /// Deletes a topic with all its messages.
    pub fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        let mut runtimes = self.runtimes.write().map_err(poisoned)?;
        if let Some(rt) = runtimes.remove(name) {
            rt.close_subscriptions();
        }
        self.store.delete_topic(name)?;
        Ok(())
    }

    /// Publishes a batch atomically: all stored or none. Messages whose idempotency key
    /// was already stored within the window are not stored again; their outcome points
    /// at the first copy and says `duplicate` (and `conflict` if the body differs).
    pub async fn publish(
        &self,
        topic: &str,
        messages: Vec<PublishMessage>,
    ) -> Result<Vec<PublishOutcome>, BrokerError> {
        self.publish_slice(topic, &messages).await
    }

    /// [`publish`](Broker::publish) of borrowed messages (a refused group can then be
    /// published again one by one without copies).
    async fn publish_slice(
        &self,
        topic: &str,
        messages: &[PublishMessage],
    ) -> Result<Vec<PublishOutcome>, BrokerError> {
        let rt = self.topic(topic)?;
        if messages.is_empty() {
            return Err(BrokerError::EmptyBatch);
        }
        let partitions = rt.topic().config.partitions;
        // Unkeyed messages of one batch share a partition, so a batch stays atomic.
        let unkeyed = rt.round_robin.fetch_add(1, Ordering::Relaxed) % partitions.max(1);
        let targets: Vec<u32> = messages
            .iter()
            .map(|m| {
                m.partition_key
                    .as_deref()
                    .map_or(unkeyed, |k| partition_for_key(k, partitions))
            })
            .collect();
        let mut distinct = targets.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let [partition] = distinct[..] else {
            return Err(BrokerError::BatchSpansPartitions(distinct.len()));
        };
        let log = rt.partition_log(partition)?;

        // Each key is hashed once, for the in-flight claim, the lookup and the insert.
        let fingerprints: Vec<Option<u64>> = messages
            .iter()
            .map(|m| m.idempotency_key.as_deref().map(fingerprint))
            .collect();
        // Serialise publishes of the same keys: claim their fingerprints (all at once,
        // so no deadlock). The claim is owned so that the log's after-append step can
        // release it once the keys are indexed, even if this future is dropped meanwhile.
        let mut claim = rt
            .keys_in_flight
            .claim(fingerprints.iter().flatten().copied())
            .await;

        let now = carebus_log::now_ms();
        let durability = rt.durability(self.config.log.fsync);
        let mut outcomes: Vec<Option<PublishOutcome>> = vec![None; messages.len()];
        let mut to_store: Vec<usize> = Vec::new();
        // Within the batch: a later message repeating an earlier key is a duplicate of it.
        let mut first_in_batch: HashMap<Bytes, usize> = HashMap::new();
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        for (i, (m, fp)) in messages.iter().zip(&fingerprints).enumerate() {
            let (Some(key), Some(fp)) = (&m.idempotency_key, *fp) else {
                to_store.push(i);
                continue;
            };
            if let Some(&j) = first_in_batch.get(key) {
                repeats.push((i, j));
                continue;
            }
            if let Some(first) = rt.find_by_fingerprint(key, fp, now)? {
                let conflict = first.body_hash != m.body_hash();
                outcomes[i] = Some(PublishOutcome {
                    partition: first.partition,
                    offset: first.offset,
                    duplicate: true,
                    conflict,
                    durability,
                });
                continue;
            }
            if messages.len() > 1 {
                first_in_batch.insert(key.clone(), i);
            }
            to_store.push(i);
        }

        if !to_store.is_empty() {
            // Each body is hashed once: for its stored header and its dedup entry.
            let hashes: Vec<u64> = to_store
                .iter()
                .filter_map(|&i| messages.get(i))
                .map(PublishMessage::body_hash)
                .collect();
            let records: Vec<_> = to_store
                .iter()
                .filter_map(|&i| messages.get(i))
                .zip(&hashes)
                .map(|(m, h)| m.to_record_with_hash(now, *h))
                .collect();
            // The keys are indexed by the log's own thread once the batch is durable,
            // in log order and before any later batch is acknowledged, so the index's
            // replay positions are exact and a publisher that goes away (a client
            // disconnect drops this future) never leaves a durable message unindexed.
            let index_entries: Vec<(Option<u64>, u64)> = to_store
                .iter()
                .zip(&hashes)
                .map(|(&i, &h)| (fingerprints.get(i).copied().flatten(), h))
                .collect();
            let held = claim.take();
            let indexer = Arc::clone(&rt);
            let after: AfterAppend = Box::new(move |ack| {
                let _released_after_indexing = held;
                let mut dedup = indexer
                    .dedup
                    .lock()
                    .map_err(|_| "the dedup index lock is poisoned")?;
                for (n, (fp, body_hash)) in index_entries.iter().enumerate() {
                    let offset = ack.base_offset + n as u64;
                    match fp {
                        Some(fp) => dedup.insert_by_fingerprint(
                            *fp,
                            DedupEntry {
                                partition,
                                offset,
                                body_hash: *body_hash,
                                timestamp_ms: now,
                            },
                        )?,
                        None => dedup.advance(partition, offset)?,
                    }
                }
                if dedup.maintenance_due(now) {
                    indexer
                        .dedup_maintenance_wanted
                        .store(true, Ordering::Release);
                }
                Ok(())
            });
            let ack = log
                .append_then(&records, after)
                .await
                .map_err(|e| match e {
                    LogError::AfterAppend(cause) => match cause.downcast::<DedupError>() {
                        Ok(d) => BrokerError::Dedup(*d),
                        Err(other) => BrokerError::Log(LogError::AfterAppend(other)),
                    },
                    other => BrokerError::Log(other),
                })?;
            for (n, &i) in to_store.iter().enumerate() {
                outcomes[i] = Some(PublishOutcome {
                    partition,
                    offset: ack.base_offset + n as u64,
                    duplicate: false,
                    conflict: false,
                    durability: ack.durability,
                });
            }
            rt.counters
                .published
                .fetch_add(to_store.len() as u64, Ordering::Relaxed);
        }
        for (i, j) in repeats {
            if let (Some(Some(first)), Some(mi), Some(mj)) =
                (outcomes.get(j).copied(), messages.get(i), messages.get(j))
            {
                outcomes[i] = Some(PublishOutcome {
                    duplicate: true,
                    conflict: mi.body_hash() != mj.body_hash(),
                    ..first
                });
            }
        }
        drop(claim);
        let outcomes: Vec<PublishOutcome> = outcomes.into_iter().flatten().collect();
        let dups = outcomes.iter().filter(|o| o.duplicate).count() as u64;
        let conflicts = outcomes.iter().filter(|o| o.conflict).count() as u64;
        rt.counters.duplicates.fetch_add(dups, Ordering::Relaxed);
        rt.counters
            .conflicts
            .fetch_add(conflicts, Ordering::Relaxed);
        if conflicts > 0 {
            tracing::warn!(
                topic,
                conflicts,
                "resend with a known idempotency key but a different body; first copy kept"
            );
        }
        rt.new_data.notify_waiters();
        rt.schedule_dedup_maintenance();
        Ok(outcomes)
    }

    /// Publishes messages each on its own terms, not as one atomic batch: each gets its
    /// own outcome or failure, exactly as if each had been published alone. The messages
    /// going to one partition are stored as one group (one append, one group commit) and
    /// keep their order; groups of different partitions run concurrently. A group refused
    /// before anything was stored because of one of its messages (too large, invalid) is
    /// published again one message at a time, so only that message fails; any other
    /// failure of a group (storage, index) is the answer of each of its messages.
    /// Fails as a whole only when the topic does not exist or `messages` is empty.
    pub async fn publish_each(
        &self,
        topic: &str,
        messages: Vec<PublishMessage>,
    ) -> Result<Vec<Result<PublishOutcome, Arc<BrokerError>>>, BrokerError> {
        let rt = self.topic(topic)?;
        if messages.is_empty() {
            return Err(BrokerError::EmptyBatch);
        }
        let partitions = rt.topic().config.partitions.max(1);
        // Unkeyed messages form one group of their own (`publish` picks its partition).
        let mut groups: BTreeMap<Option<u32>, (Vec<usize>, Vec<PublishMessage>)> = BTreeMap::new();
        for (i, m) in messages.into_iter().enumerate() {
            let target = m
                .partition_key
                .as_deref()
                .map(|k| partition_for_key(k, partitions));
            let group = groups.entry(target).or_default();
            group.0.push(i);
            group.1.push(m);
        }
        let count = groups.values().map(|(idx, _)| idx.len()).sum();
        let results = futures_util::future::join_all(
            groups
                .into_values()
                .map(|(idx, group)| async move { (idx, self.publish_group(topic, group).await) }),
        )
        .await;
        let mut out: Vec<Option<Result<PublishOutcome, Arc<BrokerError>>>> = vec![None; count];
        for (idx, answers) in results {
            for (i, answer) in idx.into_iter().zip(answers) {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(answer);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(Arc::new(BrokerError::Internal))))
            .collect())
    }

    /// One partition's group of [`publish_each`](Broker::publish_each): one atomic
    /// publish, or one publish per message when the group was refused for one of them.
    async fn publish_group(
        &self,
        topic: &str,
        group: Vec<PublishMessage>,
    ) -> Vec<Result<PublishOutcome, Arc<BrokerError>>> {
        let n = group.len();
        let err = match self.publish_slice(topic, &group).await {
            Ok(outcomes) if outcomes.len() == n => return outcomes.into_iter().map(Ok).collect(),
            Ok(_) => BrokerError::Internal,
            Err(e) => e,
        };
        let refused_for_one = matches!(
            err,
            BrokerError::Log(
                LogError::RecordTooLarge { .. }
                    | LogError::BatchTooLarge { .. }
                    | LogError::InvalidRecord(_)
            )
        );
        if n > 1 && refused_for_one {
            // Nothing of the group was stored: each message on its own.
            let mut out = Vec::with_capacity(n);
            for m in &group {
                out.push(
                    match self.publish_slice(topic, std::slice::from_ref(m)).await {
                        Ok(mut o) if o.len() == 1 => o.pop().ok_or(Arc::new(BrokerError::Internal)),
                        Ok(_) => Err(Arc::new(BrokerError::Internal)),
                        Err(e) => Err(Arc::new(e)),
                    },
                );
            }
            return out;
        }
        let err = Arc::new(err);
        (0..n).map(|_| Err(Arc::clone(&err))).collect()
    }

    /// Reads stored messages of a partition from `offset` on.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<StoredMessage>, BrokerError> {
        let rt = self.topic(topic)?;
        let log = rt.partition_log(partition)?;
        Ok(log
            .read(offset, max, 16 << 20)?
            .into_iter()
            .map(|r| StoredMessage::from_record(partition, r))
            .collect())
    }

    /// Creates a subscription or updates its settings (its position is kept). Blocking.
    pub fn put_subscription(
        &self,
        topic: &str,
        name: &str,
        config: SubscriptionConfig,
    ) -> Result<(Arc<Subscription>, bool), BrokerError> {
        crate::topic::validate_name(name).map_err(|_| SubscriptionError::InvalidSetting {
            field: "name",
            reason: "must match [A-Za-z0-9._-]{1,200} and not be . or ..",
        })?;
        config.validate()?;
        let rt = self.topic(topic)?;
        let mut subs = rt.subscriptions.write().map_err(poisoned)?;
        let dir = self
            .store
            .topic_dir(topic)
            .join(SUBSCRIPTIONS_DIR)
            .join(name);
        if let Some(existing) = subs.get(name) {
            // Persist the new settings (an error is the caller's), keep the open state.
            existing.save_config(&config)?;
            existing.set_config(config);
            return Ok((Arc::clone(existing), false));
        }
        let sub = Arc::new(Subscription::create(Arc::clone(&rt), &dir, name, config)?);
        subs.insert(name.to_owned(), Arc::clone(&sub));
        tracing::info!(topic, subscription = name, "subscription created");
        Ok((sub, true))
    }

    /// The subscription.
    pub fn subscription(&self, topic: &str, name: &str) -> Result<Arc<Subscription>, BrokerError> {
        let rt = self.topic(topic)?;
        let subs = rt.subscriptions.read().map_err(poisoned)?;
        subs.get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownSubscription {
                topic: topic.to_owned(),
                subscription: name.to_owned(),
            })
    }

    /// The subscriptions of a topic.
    pub fn subscriptions(&self, topic: &str) -> Result<Vec<Arc<Subscription>>, BrokerError> {
        let rt = self.topic(topic)?;
        let subs = rt.subscriptions.read().map_err(poisoned)?;
        Ok(subs.values().cloned().collect())
    }

    /// Deletes a subscription and its state.
    pub fn delete_subscription(&self, topic: &str, name: &str) -> Result<(), BrokerError> {
        let rt = self.topic(topic)?;
        let mut subs = rt.subscriptions.write().map_err(poisoned)?;
        let Some(sub) = subs.remove(name) else {
            return Err(BrokerError::UnknownSubscription {
                topic: topic.to_owned(),
                subscription: name.to_owned(),
            });
        };
        drop(subs);
        // Waiting receivers answer at once.
        sub.close();
        let base = self.store.topic_dir(topic).join(SUBSCRIPTIONS_DIR);
        let from = base.join(name);
        let to = base.join(format!(".deleted-{name}"));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e| BrokerError::Subscription(SubscriptionError::Io { path, source: e })
        };
        std::fs::rename(&from, &to).map_err(io(&from))?;
        std::fs::remove_dir_all(&to).map_err(io(&to))?;
        Ok(())
    }

    /// Waits up to `wait` for at most `max` deliveries for `consumer`.
    pub async fn receive(
        &self,
        topic: &str,
        subscription: &str,
        consumer: &str,
        max: usize,
        wait: std::time::Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let sub = self.subscription(topic, subscription)?;
        let (deliveries, compensations) = sub.receive(consumer, max, wait).await?;
        self.compensate(compensations).await;
        Ok(deliveries)
    }

    /// Acknowledges deliveries; returns the ids refused and why.
    pub async fn ack(
        &self,
        topic: &str,
        subscription: &str,
        ids: &[u64],
    ) -> Result<Vec<(u64, SettleRefusal)>, BrokerError> {
        Ok(self.subscription(topic, subscription)?.ack(ids).await?)
    }

    /// Negative acknowledgement; returns the ids refused and why.
    pub async fn nack(
        &self,
        topic: &str,
        subscription: &str,
        ids: &[u64],
        reason: &str,
        delay_ms: Option<u64>,
    ) -> Result<Vec<(u64, SettleRefusal)>, BrokerError> {
        let (refused, compensations) = self
            .subscription(topic, subscription)?
            .nack(ids, reason, delay_ms)
            .await?;
        self.compensate(compensations).await;
        Ok(refused)
    }

    /// Acknowledges every message of `partition` up to and including `offset`.
    pub async fn ack_cumulative(
        &self,
        topic: &str,
        subscription: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), BrokerError> {
        Ok(self
            .subscription(topic, subscription)?
            .ack_cumulative(partition, offset)
            .await?)
    }

    /// The dead letters of a subscription.
    pub fn dead_letters(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        Ok(self.subscription(topic, subscription)?.dead_letters())
    }

    /// Sends a dead letter back to its subscription.
    pub async fn replay_dead_letter(
        &self,
        topic: &str,
        subscription: &str,
        id: u64,
    ) -> Result<(), BrokerError> {
        Ok(self
            .subscription(topic, subscription)?
            .replay_dead_letter(id)
            .await?)
    }

    /// Discards a dead letter.
    pub async fn discard_dead_letter(
        &self,
        topic: &str,
        subscription: &str,
        id: u64,
    ) -> Result<(), BrokerError> {
        Ok(self
            .subscription(topic, subscription)?
            .discard_dead_letter(id)
            .await?)
    }

    /// Publishes failure records to compensation topics (created if missing). Each has
    /// an idempotency key, so a retry after a crash never announces a failure twice.
    async fn compensate(&self, compensations: Vec<Compensation>) {
        for c in compensations {
            if self.topic(&c.topic).is_err()
                && let Err(e) = self.put_topic(&c.topic, TopicConfig::default())
            {
                tracing::error!(topic = %c.topic, error = %e, "cannot create the compensation topic");
                continue;
            }
            let mut m = PublishMessage::new(serde_json::to_vec(&c.record).unwrap_or_default());
            m.content_type = Some("application/json".into());
            m.idempotency_key = Some(Bytes::from(c.idempotency_key));
            if let Err(e) = self.publish(&c.topic, vec![m]).await {
                tracing::error!(topic = %c.topic, error = %e, "cannot publish a compensation record");
            }
        }
    }

    /// The life of one stored message: when it was stored, and in every subscription
    /// each delivery attempt (consumer, time, outcome) and its current state.
    pub fn trace(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<Option<MessageTrace>, BrokerError> {
        let rt = self.topic(topic)?;
        let Some(m) = rt.read_one(partition, offset)? else {
            return Ok(None);
        };
        let mut subscriptions = Vec::new();
        for sub in self.subscriptions(topic)? {
            subscriptions.push(sub.trace(partition, offset)?);
        }
        Ok(Some(MessageTrace {
            topic: topic.to_owned(),
            partition,
            offset,
            stored_ms: m.timestamp_ms,
            idempotency_key: m
                .idempotency_key
                .as_deref()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            body_bytes: m.body.len(),
            subscriptions,
        }))
    }

    /// The trace of the message stored under this idempotency key (within the window).
    pub fn trace_by_idempotency_key(
        &self,
        topic: &str,
        key: &[u8],
    ) -> Result<Option<MessageTrace>, BrokerError> {
        let rt = self.topic(topic)?;
        match rt.find_by_idempotency_key(key, carebus_log::now_ms())? {
            Some(m) => self.trace(topic, m.partition, m.offset),
            None => Ok(None),
        }
    }

    /// Begins a transaction that aborts by itself after `timeout`.
    pub fn begin_transaction(&self, timeout: std::time::Duration) -> Result<u64, BrokerError> {
        let mut open = self.txns.open.lock().map_err(poisoned)?;
        let now = std::time::Instant::now();
        open.retain(|_, t| t.deadline > now);
        if open.len() >= crate::txn::MAX_OPEN {
            return Err(BrokerError::TooManyTransactions);
        }
        let id = self.txns.new_id();
        open.insert(
            id,
            OpenTxn {
                deadline: now + timeout.min(crate::txn::MAX_TIMEOUT),
                publishes: Vec::new(),
                acks: Vec::new(),
            },
        );
        Ok(id)
    }

    fn with_open_txn<T>(
        &self,
        id: u64,
        f: impl FnOnce(&mut OpenTxn) -> Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        let mut open = self.txns.open.lock().map_err(poisoned)?;
        let expired = open
            .get(&id)
            .map(|t| t.deadline <= std::time::Instant::now());
        match expired {
            None => Err(BrokerError::UnknownTransaction(id)),
            Some(true) => {
                open.remove(&id);
                Err(BrokerError::TransactionExpired(id))
            }
            Some(false) => open
                .get_mut(&id)
                .map_or(Err(BrokerError::UnknownTransaction(id)), f),
        }
    }

    /// Adds messages to publish when the transaction commits (invisible until then).
    pub fn transaction_publish(
        &self,
        id: u64,
        topic: &str,
        messages: Vec<PublishMessage>,
    ) -> Result<(), BrokerError> {
        self.topic(topic)?;
        if messages.is_empty() {
            return Err(BrokerError::EmptyBatch);
        }
        let bytes: usize = messages.iter().map(|m| m.body.len()).sum();
        self.with_open_txn(id, |t| {
            let held: usize = t.publishes.iter().map(|(_, m)| m.body.len()).sum();
            if t.publishes.len() + messages.len() > crate::txn::MAX_MESSAGES
                || held + bytes > crate::txn::MAX_BYTES
            {
                return Err(BrokerError::TransactionTooLarge);
            }
            t.publishes
                .extend(messages.into_iter().map(|m| (topic.to_owned(), m)));
            Ok(())
        })
    }

    /// Adds deliveries to acknowledge when the transaction commits. Ids that are not
    /// in flight now are refused (and not added).
    pub fn transaction_ack(
        &self,
        id: u64,
        topic: &str,
        subscription: &str,
        ids: &[u64],
    ) -> Result<Vec<(u64, SettleRefusal)>, BrokerError> {
        let sub = self.subscription(topic, subscription)?;
        let (_, refused) = sub.check_in_flight(ids)?;
        self.with_open_txn(id, |t| {
            for &d in ids {
                let known = t
                    .acks
                    .iter()
                    .any(|(tt, ss, x)| *x == d && tt == topic && ss == subscription);
                // A repeated id (a client's retry) is the same ack, not a second one.
                if !known && !refused.iter().any(|(r, _)| *r == d) {
                    t.acks.push((topic.to_owned(), subscription.to_owned(), d));
                }
            }
            Ok(())
        })?;
        Ok(refused)
    }

    /// Aborts a transaction: nothing of it takes effect, and the deliveries it would
    /// have acknowledged fail their attempt (as a nack would): they are delivered again
    /// after the backoff, and a message whose transactions always abort is
    /// dead-lettered after `max_attempts`.
    pub async fn abort_transaction(&self, id: u64) -> Result<(), BrokerError> {
        let txn = self
            .txns
            .open
            .lock()
            .map_err(poisoned)?
            .remove(&id)
            .ok_or(BrokerError::UnknownTransaction(id))?;
        self.fail_txn_deliveries(&txn.acks, "transaction aborted")
            .await;
        Ok(())
    }

    async fn fail_txn_deliveries(&self, acks: &[(String, String, u64)], reason: &str) {
        let mut groups: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
        for (topic, sub, d) in acks {
            groups
                .entry((topic.as_str(), sub.as_str()))
                .or_default()
                .push(*d);
        }
        for ((topic, sub), ids) in groups {
            // Ids no longer in flight (lease ran out meanwhile) are refused: nothing to do.
            if let Err(e) = self.nack(topic, sub, &ids, reason, None).await {
                tracing::warn!(topic, subscription = sub, error = %e, "could not release a transaction's deliveries");
            }
        }
    }

    /// Commits: all publishes and acks take effect, or none does.
    pub async fn commit_transaction(
        &self,
        id: u64,
    ) -> Result<Vec<(String, PublishOutcome)>, BrokerError> {
        self.commit_transaction_until(id, CommitStep::Done).await
    }

    /// Commit, stopping after `step` as if the process died there (for crash tests).
    #[doc(hidden)]
    pub async fn commit_transaction_until(
        &self,
        id: u64,
        step: CommitStep,
    ) -> Result<Vec<(String, PublishOutcome)>, BrokerError> {
        let txn = self
            .txns
            .open
            .lock()
            .map_err(poisoned)?
            .remove(&id)
            .ok_or(BrokerError::UnknownTransaction(id))?;
        if txn.deadline <= std::time::Instant::now() {
            self.fail_txn_deliveries(&txn.acks, "transaction expired")
                .await;
            return Err(BrokerError::TransactionExpired(id));
        }
        // Hold the deliveries: from here their leases cannot run out.
        let mut groups: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
        for (t, s, d) in &txn.acks {
            groups.entry((t.clone(), s.clone())).or_default().push(*d);
        }
        let mut held: Vec<HeldAcks> = Vec::new();
        for ((t, s), ids) in groups {
            let outcome = self
                .subscription(&t, &s)
                .and_then(|sub| Ok((sub.hold_for_commit(&ids)?, sub)));
            match outcome {
                Ok((Ok(positions), sub)) => held.push((sub, (t, s), positions)),
                Ok((Err(refused), _)) => {
                    for (sub, _, positions) in &held {
                        sub.release_held(positions);
                    }
                    let reason = format!(
                        "{} deliveries of {t}/{s} are no longer held (e.g. {:?})",
                        refused.len(),
                        refused.first().map(|r| r.1)
                    );
                    return Err(BrokerError::TransactionAborted { id, reason });
                }
                Err(e) => {
                    for (sub, _, positions) in &held {
                        sub.release_held(positions);
                    }
                    return Err(BrokerError::TransactionAborted {
                        id,
                        reason: e.to_string(),
                    });
                }
            }
        }
        let acks: Vec<TxnAck> = held
            .iter()
            .flat_map(|(_, (t, s), positions)| {
                positions.iter().map(|&(partition, offset)| TxnAck {
                    topic: t.clone(),
                    subscription: s.clone(),
                    partition,
                    offset,
                })
            })
            .collect();
        let publishes: Vec<(String, PublishMessage)> = txn
            .publishes
            .into_iter()
            .enumerate()
            .map(|(i, (t, mut m))| {
                if m.idempotency_key.is_none() {
                    m.idempotency_key = Some(generated_key(id, i));
                }
                (t, m)
            })
            .collect();
        if step == CommitStep::BeforeCommitRecord {
            return Ok(Vec::new());
        }
        // The commit point: one atomic, fsynced batch.
        if let Err(e) = self
            .txns
            .log
            .append(&Transactions::commit_batch(id, &publishes, &acks))
            .await
        {
            for (sub, _, positions) in &held {
                sub.release_held(positions);
            }
            return Err(BrokerError::TransactionAborted {
                id,
                reason: e.to_string(),
            });
        }
        self.apply_commit(
            PendingCommit {
                id,
                publishes,
                acks,
            },
            step,
        )
        .await
    }

    async fn apply_commit(
        &self,
        commit: PendingCommit,
        step: CommitStep,
    ) -> Result<Vec<(String, PublishOutcome)>, BrokerError> {
        if step == CommitStep::AfterCommitRecord {
            return Ok(Vec::new());
        }
        let mut outcomes = Vec::with_capacity(commit.publishes.len());
        for (topic, m) in commit.publishes {
            let o = self.publish(&topic, vec![m]).await?;
            outcomes.extend(o.into_iter().map(|o| (topic.clone(), o)));
        }
        if step == CommitStep::AfterPublishes {
            return Ok(outcomes);
        }
        let mut groups: BTreeMap<(String, String), Vec<(u32, u64)>> = BTreeMap::new();
        for a in commit.acks {
            groups
                .entry((a.topic, a.subscription))
                .or_default()
                .push((a.partition, a.offset));
        }
        for ((t, s), positions) in groups {
            match self.subscription(&t, &s) {
                Ok(sub) => sub.ack_positions(&positions).await?,
                Err(e) => {
                    tracing::warn!(topic = %t, subscription = %s, error = %e, "transaction ack of a vanished subscription skipped")
                }
            }
        }
        let done = serde_json::to_vec(&crate::txn::AppliedRecord { applied: commit.id })
            .unwrap_or_default();
        let _ = self
            .txns
            .log
            .append_detached(&[carebus_log::Record::new(done)]);
        Ok(outcomes)
    }

    /// Re-applies transactions committed before a crash but not fully applied. Call
    /// once after [`Broker::open`], before serving. Returns how many were re-applied.
    pub async fn finish_recovery(&self) -> Result<usize, BrokerError> {
        let pending = self.txns.pending_commits()?;
        let n = pending.len();
        for commit in pending {
            tracing::info!(
                transaction = commit.id,
                messages = commit.publishes.len(),
                acks = commit.acks.len(),
                "re-applying a committed transaction"
            );
            self.apply_commit(commit, CommitStep::Done).await?;
        }
        Ok(n)
    }

    /// Persists every topic's deduplication index (call at shutdown; bounds the replay
    /// at the next start).
    pub fn checkpoint(&self) -> Result<(), BrokerError> {
        for rt in self.topics() {
            rt.checkpoint_dedup()?;
        }
        Ok(())
    }
}

/// A dedup maintenance job's hold on its topic: dropped when the job ends (or is
/// dropped unrun, e.g. by a runtime shutting down), it lets go of the runtime first and
/// then clears the running flag.
struct MaintenanceJob {
    rt: Option<Arc<TopicRuntime>>,
    running: Arc<AtomicBool>,
}

impl Drop for MaintenanceJob {
    fn drop(&mut self) {
        drop(self.rt.take());
        self.running.store(false, Ordering::Release);
    }
}

/// Longest a dropped broker waits for a running dedup maintenance job to finish.
const MAINTENANCE_WAIT_ON_DROP: std::time::Duration = std::time::Duration::from_secs(30);

impl Drop for Broker {
    fn drop(&mut self) {
        if let Ok(runtimes) = self.runtimes.read() {
            for rt in runtimes.values() {
                rt.close_subscriptions();
            }
            // A maintenance job holds its topic (and so the partition logs and their
            // directory locks) on a blocking thread: wait for it, so that the data
            // directory can be opened again as soon as the broker is dropped.
            let started = std::time::Instant::now();
            for rt in runtimes.values() {
                while rt.dedup_maintenance_running.load(Ordering::Acquire)
                    && started.elapsed() < MAINTENANCE_WAIT_ON_DROP
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }
}
