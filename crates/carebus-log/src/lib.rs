//! The storage primitive of carebus: an append-only, segmented, checksummed log.
//!
//! * Appends are atomic batches; offsets are dense from 0.
//! * Every batch is framed with its length and a CRC32C; after a crash a batch is
//!   entirely visible or entirely absent.
//! * [`Log::append`] returns only once the batch is on stable storage (fdatasync)
//!   under the default [`FsyncPolicy::Always`]; concurrent appenders share one fsync
//!   (group commit) because a single writer thread drains everything queued before
//!   each write + fdatasync.
//! * Segments roll at a configurable size; a sparse per-segment index turns a read by
//!   offset into a seek plus a sequential read.
//! * Opening a log recovers it: only the last (active) segment is scanned; a torn or
//!   corrupt tail past the synced mark (the length the last fdatasync made durable) is
//!   truncated and reported, while damage before it is refused ([`LogError::Corrupt`])
//!   rather than cut. Sealed segments are trusted through their index files and
//!   verified batch by batch when read.
//! * Retention deletes whole sealed segments by age and by total size.
//!
//! The on-disk layout and the fsync order are described in `DESIGN.md` next to this crate.
//!
//! ```
//! # fn main() -> Result<(), carebus_log::LogError> {
//! use carebus_log::{Log, LogConfig, Record};
//! let dir = tempfile::tempdir().map_err(|e| carebus_log::LogError::Config(e.to_string()))?;
//! let (log, _report) = Log::open(dir.path(), LogConfig::default())?;
//! let ack = log.append_blocking(&[Record::new("hello").with_key("patient-1")])?;
//! assert_eq!(ack.base_offset, 0);
//! let records = log.read(0, 10, 1 << 20)?;
//! assert_eq!(&records[0].value[..], b"hello");
//! # Ok(())
//! # }
//! ```

mod error;
mod fs_io;
mod record;
mod segment;
mod synced_mark;
mod verify;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

pub use error::{LogError, Result};
pub use record::{Record, StoredRecord, now_ms};
pub use verify::{VerifyReport, verify_dir};

/// Fault injection for tests: a hook that sees (and may fail) every file-system
/// operation the log performs under a directory. Only with the `fault-injection`
/// feature; see "Power-loss simulation" in DESIGN.md.
#[cfg(any(test, feature = "fault-injection"))]
pub mod fault {
    pub use crate::fs_io::{FsHook, FsOp, HookGuard, OpenMode, install_hook};
}

use segment::{
    IndexEntry, IndexHeader, SEGMENT_HEADER_LEN, parse_file_name, read_index_entries,
    read_index_header, scan_segment, segment_header, segment_path, sync_dir, write_index,
};

/// Hard ceiling on a batch body that recovery and reads accept, independent of the
/// configured limits, so that lowering a limit never makes stored batches unreadable.
pub(crate) const MAX_BATCH_BODY: usize = 1 << 30;

/// When appends reach stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fdatasync before every acknowledgement (shared by concurrent appenders). The default.
    Always,
    /// Acknowledge after the write to the page cache and fdatasync at most this long
    /// after. A crash of the machine (not only of the process) can lose acknowledged
    /// records written in the last interval. For users who choose speed over safety.
    Interval(Duration),
}

/// How durable an acknowledged append is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On stable storage: fdatasync returned before the acknowledgement.
    Fsynced,
    /// Written to the operating system; fsync pending (the `interval` policy).
    Buffered,
}

impl Durability {
    /// The name used on the wire: `fsynced` or `buffered`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsynced => "fsynced",
            Durability::Buffered => "buffered",
        }
    }
}

/// Retention limits; whole sealed segments are deleted when either is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Delete a sealed segment once its newest record is older than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest sealed segments while the log is larger than this.
    pub max_bytes: Option<u64>,
}

/// Tunables of a log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Roll to a new segment once the active one would grow past this (4 KiB ..= 1 GiB).
    pub segment_bytes: u64,
    /// Roll the active segment once it is this old and not empty (so age retention can act).
    pub segment_max_age: Option<Duration>,
    /// Bytes of log between two sparse index entries.
    pub index_interval_bytes: u64,
    /// Largest encoded record accepted.
    pub max_record_bytes: usize,
    /// Largest encoded batch accepted.
    pub max_batch_bytes: usize,
    /// When appends are fsynced.
    pub fsync: FsyncPolicy,
    /// What retention deletes.
    pub retention: Retention,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 128 * 1024 * 1024,
            segment_max_age: Some(Duration::from_secs(24 * 3600)),
            index_interval_bytes: 4096,
            max_record_bytes: 16 * 1024 * 1024,
            max_batch_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::Always,
            retention: Retention {
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
                max_bytes: None,
            },
        }
    }
}

impl LogConfig {
    fn validate(&self) -> Result<()> {
        if !(4096..=(1 << 30)).contains(&self.segment_bytes) {
            return Err(LogError::Config(
                "segment_bytes must be between 4 KiB and 1 GiB".into(),
            ));
        }
        if self.index_interval_bytes == 0 {
            return Err(LogError::Config(
                "index_interval_bytes must be at least 1".into(),
            ));
        }
        if self.max_batch_bytes > MAX_BATCH_BODY / 2 || self.max_batch_bytes < 64 {
            return Err(LogError::Config(
                "max_batch_bytes must be between 64 B and 512 MiB".into(),
            ));
        }
        if self.max_record_bytes == 0 || self.max_record_bytes > self.max_batch_bytes {
            return Err(LogError::Config(
                "max_record_bytes must be between 1 and max_batch_bytes".into(),
            ));
        }
        if let FsyncPolicy::Interval(d) = self.fsync
            && d.is_zero()
        {
            return Err(LogError::Config(
                "the fsync interval must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// The acknowledgement of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendAck {
    /// Offset of the first record of the batch.
    pub base_offset: u64,
    /// Offset of the last record of the batch.
    pub last_offset: u64,
    /// Whether the batch was fsynced before this acknowledgement.
    pub durability: Durability,
}

/// What opening the log found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments found (including the active one).
    pub segments: usize,
    /// First offset stored.
    pub start_offset: u64,
    /// Offset the next append will get.
    pub next_offset: u64,
    /// Bytes of the active segment that were scanned.
    pub scanned_bytes: u64,
    /// Bytes cut from the tail of the active segment (torn or corrupt batch).
    pub truncated_bytes: u64,
    /// Records the cut batch claimed to hold, when its header was readable.
    pub truncated_records: u64,
    /// Why the tail was cut.
    pub truncation_reason: Option<String>,
    /// Index files rebuilt by scanning their segment (after a crash during a roll).
    pub rebuilt_indexes: usize,
    /// Leftover files removed (temporary index files, orphaned index files).
    pub removed_files: usize,
    /// Problems in sealed segments that were found but not repaired (they are
    /// reported as errors when the affected records are read).
    pub warnings: Vec<String>,
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments deleted.
    pub deleted_segments: usize,
    /// Bytes freed.
    pub deleted_bytes: u64,
    /// First offset still stored.
    pub start_offset: u64,
}

/// Upper bounds (µs) of the fdatasync latency histogram's buckets.
pub const FSYNC_BUCKETS_MICROS: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

/// Counters about the writer, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// fdatasync calls per latency bucket (not cumulative): `fsync_buckets[i]` counts
    /// calls that took at most `FSYNC_BUCKETS_MICROS[i]` and more than the bucket
    /// before; calls slower than the last bound are only in `fsyncs`.
    pub fsync_buckets: [u64; FSYNC_BUCKETS_MICROS.len()],
    /// Batches appended.
    pub batches: u64,
    /// Records appended.
    pub records: u64,
    /// fdatasync calls made for appends (group commit makes this smaller than `batches`).
    pub fsyncs: u64,
    /// Total time spent in fdatasync, in microseconds.
    pub fsync_micros: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Of `fsyncs`, those the writer thread made itself for a small group that found
    /// the syncer idle (low load), skipping the hand-off to the syncer thread.
    pub inline_syncs: u64,
    /// fdatasyncs of zeros the writer filled ahead of the data while idle (not in
    /// `fsyncs`: no append waited for them).
    pub fill_syncs: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) fsync_buckets: [AtomicU64; FSYNC_BUCKETS_MICROS.len()],
    pub(crate) batches: AtomicU64,
    pub(crate) records: AtomicU64,
    pub(crate) fsyncs: AtomicU64,
    pub(crate) fsync_micros: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) inline_syncs: AtomicU64,
    /// fdatasyncs of the zeros filled ahead while the writer was idle (not in `fsyncs`).
    pub(crate) fill_syncs: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Sealed {
    pub(crate) base: u64,
    pub(crate) next_offset: u64,
    pub(crate) max_timestamp: i64,
    pub(crate) len: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<File>,
}

#[derive(Debug)]
pub(crate) struct ActiveView {
    pub(crate) base: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<File>,
    /// Bytes committed (written, and fsynced under `Always`).
    pub(crate) len: u64,
    pub(crate) next_offset: u64,
    pub(crate) entries: Vec<IndexEntry>,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) sealed: BTreeMap<u64, Sealed>,
    pub(crate) active: ActiveView,
    pub(crate) start_offset: u64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) config: LogConfig,
    pub(crate) state: RwLock<State>,
    pub(crate) visible: watch::Sender<u64>,
    pub(crate) poisoned: Mutex<Option<String>>,
    pub(crate) counters: Counters,
    /// Appends submitted and not yet answered.
    pub(crate) in_flight: Arc<AtomicU64>,
    index_cache: Mutex<HashMap<u64, Arc<Vec<IndexEntry>>>>,
    /// Where the active segment's durable length is recorded after each fdatasync.
    pub(crate) synced_mark: Option<synced_mark::MarkFile>,
}

const INDEX_CACHE_SEGMENTS: usize = 64;

/// A step run once an append is durable (per the fsync policy), before its appender is
/// answered; see [`Log::append_then`].
pub type AfterAppend = Box<
    dyn FnOnce(&AppendAck) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>
        + Send,
>;

/// The answer channel of one append. Counts appends in flight (submitted, not yet
/// answered) so the syncer can tell how many appenders are active.
pub(crate) struct AppendReply {
    tx: Option<oneshot::Sender<Result<AppendAck>>>,
    after: Option<AfterAppend>,
    in_flight: Arc<AtomicU64>,
}

impl AppendReply {
    fn new(
        tx: oneshot::Sender<Result<AppendAck>>,
        after: Option<AfterAppend>,
        in_flight: Arc<AtomicU64>,
    ) -> Self {
        in_flight.fetch_add(1, Ordering::AcqRel);
        AppendReply {
            tx: Some(tx),
            after,
            in_flight,
        }
    }

    /// Answers the appender; on success first runs its after-append step (which is
    /// dropped unrun on failure).
    pub(crate) fn send(mut self, result: Result<AppendAck>) {
        let result = match (result, self.after.take()) {
            (Ok(ack), Some(after)) => after(&ack).map(|()| ack).map_err(LogError::AfterAppend),
            (result, _) => result,
        };
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(result);
        }
    }
}

impl Drop for AppendReply {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) enum Request {
    Append {
        payload: Vec<u8>,
        count: u32,
        max_timestamp: i64,
        reply: AppendReply,
    },
    Sync(oneshot::Sender<Result<()>>),
    Shutdown,
}

/// An open log. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Log {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Request>,
    writer: Mutex<Option<JoinHandle<()>>>,
    _lock: File,
}

fn lock_poisoned<T>(_: T) -> LogError {
    LogError::Poisoned("an internal lock was poisoned by a panic".into())
}

impl Log {
    /// Opens (creating if needed) the log in `dir`, recovering it after a crash.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<(Log, RecoveryReport)> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs_io::create_dir_all(&dir).map_err(|e| LogError::io("create log directory", &dir, e))?;
        let lock_path = dir.join(".lock");
        let lock = fs_io::open(&lock_path, fs_io::OpenMode::CREATE_KEEP)
            .map_err(|e| LogError::io("open lock file", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(LogError::Locked(dir)),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(LogError::io("lock", &lock_path, e));
            }
        }
        let (state, report, writer_state) = recover(&dir, &config)?;
        let (visible, _) = watch::channel(report.next_offset);
        // Recovery left the active segment durable up to its length.
        let synced_mark = synced_mark::MarkFile::open(&dir);
        if let Some(m) = &synced_mark {
            m.record(writer_state.base, writer_state.len);
        }
        let shared = Arc::new(Shared {
            synced_mark,
            dir,
            config,
            state: RwLock::new(state),
            visible,
            poisoned: Mutex::new(None),
            counters: Counters::default(),
            in_flight: Arc::new(AtomicU64::new(0)),
            index_cache: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("carebus-log-writer".into())
            .spawn(move || writer::run(writer_shared, writer_state, rx))
            .map_err(|e| LogError::io("spawn writer thread", PathBuf::new(), e))?;
        Ok((
            Log {
                shared,
                tx,
                writer: Mutex::new(Some(handle)),
                _lock: lock,
            },
            report,
        ))
    }

    /// The directory holding this log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    /// Appends a batch atomically; resolves once it is durable (per the fsync policy).
    pub async fn append(&self, records: &[Record]) -> Result<AppendAck> {
        let rx = self.submit(records, None)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Like [`Log::append`], and once the batch is durable runs `after` with its
    /// acknowledgement, on the log's own thread, before the appender is answered.
    ///
    /// Steps run in log order (the step of a lower offset always runs first) and run even
    /// if the returned future is dropped after the batch was queued, so they suit index
    /// updates that must never miss or reorder a durable record. A failed step turns the
    /// answer into [`LogError::AfterAppend`] (the batch stays stored). If the append
    /// fails, `after` is dropped without running. Steps must be quick and must never wait
    /// for this log: every later acknowledgement waits for them.
    pub async fn append_then(&self, records: &[Record], after: AfterAppend) -> Result<AppendAck> {
        let rx = self.submit(records, Some(after))?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Like [`Log::append`], blocking the calling thread. Must not be called from
    /// inside an asynchronous runtime's worker.
    pub fn append_blocking(&self, records: &[Record]) -> Result<AppendAck> {
        let rx = self.submit(records, None)?;
        rx.blocking_recv().map_err(|_| LogError::Closed)?
    }

    /// Queues a batch without waiting for its acknowledgement: it is written in order
    /// with everything queued before and after it, and made durable by the next group
    /// commit, but a crash before then may lose it. For records whose loss is harmless.
    pub fn append_detached(&self, records: &[Record]) -> Result<()> {
        self.submit(records, None).map(|_| ())
    }

    fn submit(
        &self,
        records: &[Record],
        after: Option<AfterAppend>,
    ) -> Result<oneshot::Receiver<Result<AppendAck>>> {
        if records.is_empty() {
            return Err(LogError::EmptyBatch);
        }
        let cfg = &self.shared.config;
        let mut total = segment::BATCH_HEADER_LEN + segment::FRAME_PREFIX_LEN;
        let mut max_timestamp = i64::MIN;
        for (index, r) in records.iter().enumerate() {
            let size = r.encoded_len();
            if size > cfg.max_record_bytes {
                return Err(LogError::RecordTooLarge {
                    index,
                    size,
                    limit: cfg.max_record_bytes,
                });
            }
            total = total.saturating_add(size);
            max_timestamp = max_timestamp.max(r.timestamp_ms);
        }
        if total > cfg.max_batch_bytes {
            return Err(LogError::BatchTooLarge {
                size: total,
                limit: cfg.max_batch_bytes,
            });
        }
        let count = u32::try_from(records.len())
            .map_err(|_| LogError::InvalidRecord("more than 2^32 records in a batch"))?;
        let mut payload = Vec::with_capacity(total);
        for r in records {
            r.encode_into(&mut payload)?;
        }
        if let Some(why) = self.shared.poisoned.lock().map_err(lock_poisoned)?.clone() {
            return Err(LogError::Poisoned(why));
        }
        let (reply, rx) = oneshot::channel();
        let reply = AppendReply::new(reply, after, Arc::clone(&self.shared.in_flight));
        self.tx
            .send(Request::Append {
                payload,
                count,
                max_timestamp,
                reply,
            })
            .map_err(|_| LogError::Closed)?;
        Ok(rx)
    }

    /// Forces an fdatasync of everything written so far (useful under the interval policy).
    pub async fn sync(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Sync(reply))
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Blocking form of [`Log::sync`].
    pub fn sync_blocking(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Sync(reply))
            .map_err(|_| LogError::Closed)?;
        rx.blocking_recv().map_err(|_| LogError::Closed)?
    }

    /// The offset the next append will get (everything below is readable).
    pub fn next_offset(&self) -> u64 {
        *self.shared.visible.borrow()
    }

    /// The first offset still stored.
    pub fn start_offset(&self) -> u64 {
        self.shared.state.read().map_or(0, |s| s.start_offset)
    }

    /// A receiver that changes whenever new records become readable; its value is
    /// [`Log::next_offset`].
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.shared.visible.subscribe()
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.shared.state.read().map_or(0, |s| s.sealed.len() + 1)
    }

    /// Bytes on disk in segment files.
    pub fn size_bytes(&self) -> u64 {
        self.shared.state.read().map_or(0, |s| {
            s.sealed.values().map(|x| x.len).sum::<u64>() + s.active.len
        })
    }

    /// Writer counters.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.counters;
        LogStats {
            fsync_buckets: std::array::from_fn(|i| {
                c.fsync_buckets
                    .get(i)
                    .map_or(0, |b| b.load(Ordering::Relaxed))
            }),
            batches: c.batches.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            inline_syncs: c.inline_syncs.load(Ordering::Relaxed),
            fill_syncs: c.fill_syncs.load(Ordering::Relaxed),
            fsync_micros: c.fsync_micros.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Reads records from offset `from` on: at most `max_records`, and stops once
    /// `max_bytes` of keys and values are collected (at least one record is returned
    /// when one is available). Reads cross segment boundaries. An offset at or past
    /// the end gives an empty result; one below the start gives
    /// [`LogError::OffsetOutOfRange`]. Corrupt stored bytes give [`LogError::Corrupt`].
    pub fn read(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut offset = from;
        let end = self.next_offset();
        while offset < end && out.len() < max_records && (out.is_empty() || bytes < max_bytes) {
            let (file, path, base, active_position, end_position, segment_next) = {
                let st = self.shared.state.read().map_err(lock_poisoned)?;
                if offset < st.start_offset {
                    if out.is_empty() {
                        return Err(LogError::OffsetOutOfRange {
                            requested: offset,
                            start: st.start_offset,
                        });
                    }
                    break;
                }
                if offset >= st.active.base {
                    let a = &st.active;
                    let pos = segment::lookup(&a.entries, a.base, offset);
                    (
                        Arc::clone(&a.file),
                        a.path.clone(),
                        a.base,
                        Some(pos),
                        a.len,
                        a.next_offset,
                    )
                } else {
                    let Some((_, s)) = st.sealed.range(..=offset).next_back() else {
                        return Err(LogError::OffsetOutOfRange {
                            requested: offset,
                            start: st.start_offset,
                        });
                    };
                    (
                        Arc::clone(&s.file),
                        s.path.clone(),
                        s.base,
                        None,
                        s.len,
                        s.next_offset,
                    )
                }
            };
            // Sealed segments' indexes are loaded lazily; without one, scan from the header.
            let position = active_position.unwrap_or_else(|| {
                self.sealed_index(base, &path)
                    .map_or(SEGMENT_HEADER_LEN, |e| segment::lookup(&e, base, offset))
            });
            let before = out.len();
            segment::read_records(
                &file,
                &path,
                position,
                end_position,
                offset,
                max_records,
                max_bytes,
                MAX_BATCH_BODY,
                &mut out,
                &mut bytes,
            )?;
            match out.last() {
                Some(last) if out.len() > before => offset = last.offset + 1,
                _ => {
                    if offset < segment_next && offset < end {
                        return Err(LogError::Corrupt {
                            segment: path,
                            position,
                            reason: format!("offset {offset} is missing from its segment"),
                        });
                    }
                    offset = segment_next;
                }
            }
        }
        Ok(out)
    }

    fn sealed_index(&self, base: u64, segment: &Path) -> Option<Arc<Vec<IndexEntry>>> {
        let mut cache = self.shared.index_cache.lock().ok()?;
        if let Some(e) = cache.get(&base) {
            return Some(Arc::clone(e));
        }
        let dir = segment.parent()?;
        let (_, entries) = read_index_entries(&segment::index_path(dir, base))?;
        if cache.len() >= INDEX_CACHE_SEGMENTS
            && let Some(k) = cache.keys().next().copied()
        {
            cache.remove(&k);
        }
        let entries = Arc::new(entries);
        cache.insert(base, Arc::clone(&entries));
        Some(entries)
    }

    /// Deletes sealed segments past the retention limits. The active segment is never
    /// deleted; offsets of the remaining records never change.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<RetentionReport> {
        let retention = self.shared.config.retention;
        let (victims, start_offset) = {
            let mut st = self.shared.state.write().map_err(lock_poisoned)?;
            let mut total: u64 = st.sealed.values().map(|s| s.len).sum::<u64>() + st.active.len;
            let mut victims = Vec::new();
            while let Some((_, seg)) = st.sealed.first_key_value() {
                let too_old = retention.max_age.is_some_and(|age| {
                    let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
                    seg.max_timestamp < now_ms.saturating_sub(age_ms)
                });
                let too_big = retention.max_bytes.is_some_and(|max| total > max);
                if !(too_old || too_big) {
                    break;
                }
                total = total.saturating_sub(seg.len);
                if let Some((_, seg)) = st.sealed.pop_first() {
                    victims.push(seg);
                }
            }
            st.start_offset = st.sealed.keys().next().copied().unwrap_or(st.active.base);
            (victims, st.start_offset)
        };
        let mut report = RetentionReport {
            start_offset,
            ..RetentionReport::default()
        };
        for seg in &victims {
            fs_io::remove_file(&seg.path)
                .map_err(|e| LogError::io("delete segment", &seg.path, e))?;
            let idx = segment::index_path(&self.shared.dir, seg.base);
            match fs_io::remove_file(&idx) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::io("delete index", &idx, e)),
            }
            if let Ok(mut cache) = self.shared.index_cache.lock() {
                cache.remove(&seg.base);
            }
            report.deleted_segments += 1;
            report.deleted_bytes += seg.len;
        }
        if !victims.is_empty() {
            sync_dir(&self.shared.dir)?;
            tracing::info!(
                dir = %self.shared.dir.display(),
                segments = report.deleted_segments,
                bytes = report.deleted_bytes,
                start_offset,
                "retention deleted segments"
            );
        }
        Ok(report)
    }

    /// Stops the writer after it has synced everything written. Dropping the log does the same.
    pub fn close(self) {
        drop(self);
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = self.tx.send(Request::Shutdown);
        if let Ok(mut guard) = self.writer.lock()
            && let Some(handle) = guard.take()
        {
            let _ = handle.join();
        }
    }
}

/// Everything the writer thread owns about the active segment.
#[derive(Debug)]
pub(crate) struct WriterState {
    pub(crate) base: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<File>,
    pub(crate) len: u64,
    pub(crate) next_offset: u64,
    pub(crate) max_timestamp: i64,
    pub(crate) entries: Vec<IndexEntry>,
    pub(crate) last_indexed: Option<u64>,
    pub(crate) opened_at: Instant,
    /// File size: data plus zero-filled preallocation.
    pub(crate) allocated: u64,
}

fn open_rw(path: &Path) -> Result<File> {
    fs_io::open(path, fs_io::OpenMode::READ_WRITE)
        .map_err(|e| LogError::io("open segment", path, e))
}

/// Creates a new, empty segment file with its header, durably (file and directory fsynced).
pub(crate) fn create_segment(dir: &Path, base: u64) -> Result<(PathBuf, File)> {
    let path = segment_path(dir, base);
    let file = fs_io::open(&path, fs_io::OpenMode::CREATE_NEW)
        .map_err(|e| LogError::io("create segment", &path, e))?;
    fs_io::write_all_at(&file, &path, &segment_header(base), 0)
        .map_err(|e| LogError::io("write segment header", &path, e))?;
    fs_io::sync_all(&file, &path).map_err(|e| LogError::io("fsync segment", &path, e))?;
    sync_dir(dir)?;
    Ok((path, file))
}

fn header_ok(file: &File, base: u64) -> bool {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0).is_ok() && h == segment_header(base)
}

fn recover(dir: &Path, config: &LogConfig) -> Result<(State, RecoveryReport, WriterState)> {
    let mut report = RecoveryReport::default();
    let mut logs = Vec::new();
    let mut idxs = Vec::new();
    let listing = fs_io::read_dir(dir).map_err(|e| LogError::io("list log directory", dir, e))?;
    for entry in listing {
        let entry = entry.map_err(|e| LogError::io("list log directory", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = parse_file_name(name, "log") {
            logs.push(base);
        } else if let Some(base) = parse_file_name(name, "idx") {
            idxs.push(base);
        } else if name.ends_with(".idx.tmp") {
            let p = entry.path();
            fs_io::remove_file(&p).map_err(|e| LogError::io("remove temporary index", &p, e))?;
            report.removed_files += 1;
        }
    }
    logs.sort_unstable();
    for base in idxs {
        if logs.binary_search(&base).is_err() {
            let p = segment::index_path(dir, base);
            fs_io::remove_file(&p).map_err(|e| LogError::io("remove orphan index", &p, e))?;
            report.removed_files += 1;
        }
    }
    if logs.is_empty() {
        create_segment(dir, 0)?;
        logs.push(0);
    }
    let mut sealed = BTreeMap::new();
    let Some((&active_base, sealed_bases)) = logs.split_last() else {
        return Err(LogError::Config("no segment".into()));
    };
    for (i, &base) in sealed_bases.iter().enumerate() {
        let path = segment_path(dir, base);
        let file = fs_io::open(&path, fs_io::OpenMode::READ)
            .map_err(|e| LogError::io("open segment", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| LogError::io("stat segment", &path, e))?
            .len();
        let following = logs.get(i + 1).copied().unwrap_or(active_base);
        let idx_path = segment::index_path(dir, base);
        let header = read_index_header(&idx_path)
            .filter(|h| h.base == base && h.segment_len == len && h.next_offset >= base);
        let (next_offset, max_timestamp) = match header {
            Some(h) => (h.next_offset, h.max_timestamp),
            None => {
                // A crash during a roll (or a damaged index): rebuild from the segment.
                if !header_ok(&file, base) {
                    report
                        .warnings
                        .push(format!("segment {base}: bad segment header"));
                }
                let scan = scan_segment(
                    &file,
                    &path,
                    base,
                    len,
                    MAX_BATCH_BODY,
                    config.index_interval_bytes,
                )?;
                if let Some(why) = &scan.stopped_by {
                    report.warnings.push(format!(
                        "sealed segment {base}: unreadable from byte {}: {why}",
                        scan.valid_len
                    ));
                }
                let next = if scan.stopped_by.is_some() {
                    following
                } else {
                    scan.next_offset
                };
                let entry_count = u32::try_from(scan.entries.len())
                    .map_err(|_| LogError::Config("index too large".into()))?;
                write_index(
                    dir,
                    &IndexHeader {
                        base,
                        next_offset: next,
                        max_timestamp: scan.max_timestamp,
                        segment_len: len,
                        entry_count,
                    },
                    &scan.entries,
                )?;
                report.rebuilt_indexes += 1;
                (next, scan.max_timestamp)
            }
        };
        if next_offset != following {
            report.warnings.push(format!(
                "segment {base} ends at offset {next_offset} but the next segment starts at {following}"
            ));
        }
        sealed.insert(
            base,
            Sealed {
                base,
                next_offset,
                max_timestamp,
                len,
                path,
                file: Arc::new(file),
            },
        );
    }
    // The active segment: scan it and cut a torn tail.
    let path = segment_path(dir, active_base);
    let file = open_rw(&path)?;
    let mut len = file
        .metadata()
        .map_err(|e| LogError::io("stat segment", &path, e))?
        .len();
    if !header_ok(&file, active_base) {
        let mut all = vec![0u8; usize::try_from(len.min(1 << 20)).unwrap_or(0)];
        file.read_exact_at(&mut all, 0)
            .map_err(|e| LogError::io("read segment", &path, e))?;
        if len <= SEGMENT_HEADER_LEN || (len <= 1 << 20 && all.iter().all(|&b| b == 0)) {
            // Created but its header never reached the disk: nothing was acknowledged in it.
            fs_io::set_len(&file, &path, 0)
                .map_err(|e| LogError::io("truncate segment", &path, e))?;
            fs_io::write_all_at(&file, &path, &segment_header(active_base), 0)
                .map_err(|e| LogError::io("write segment header", &path, e))?;
            fs_io::sync_all(&file, &path).map_err(|e| LogError::io("fsync segment", &path, e))?;
            report.truncated_bytes += len;
            report.truncation_reason = Some("segment header never completed".into());
            len = SEGMENT_HEADER_LEN;
        } else {
            return Err(LogError::Corrupt {
                segment: path,
                position: 0,
                reason: "bad segment header".into(),
            });
        }
    }
    let scan = scan_segment(
        &file,
        &path,
        active_base,
        len,
        MAX_BATCH_BODY,
        config.index_interval_bytes,
    )?;
    report.scanned_bytes = scan.valid_len;
    // A bad batch inside what an fdatasync had made durable is damage, not a torn
    // write: cutting it would drop acknowledged records (and later appends would reuse
    // their offsets). Nothing is changed; the operator decides (see `carebus check`).
    if let Some(mark) = synced_mark::read(dir).filter(|m| m.segment_base == active_base)
        && scan.valid_len < mark.len
    {
        let what = match &scan.stopped_by {
            Some(why) => format!("{why} inside"),
            // Every batch is good but the file is shorter: truncated, or an older copy.
            None => "the segment ends (truncated, or replaced by an older copy?) inside".into(),
        };
        return Err(LogError::Corrupt {
            segment: path,
            position: scan.valid_len,
            reason: format!(
                "{what} the part of the active segment made durable before the last stop \
                 (up to byte {}); cutting it would drop acknowledged records, so the log is \
                 not opened (`carebus check` reports it; restore the segment, or delete \
                 synced.mark in this directory to accept cutting from the bad batch)",
                mark.len
            ),
        });
    }
    if scan.valid_len < len {
        // Zeros after the last batch are preallocated space (or a write whose size
        // reached the disk before its data): nothing was there. Anything else is a
        // torn or corrupt batch. Both are cut; only the latter is reported.
        let torn = segment::nonzero_extent(&file, &path, scan.valid_len, len)?;
        fs_io::set_len(&file, &path, scan.valid_len)
            .map_err(|e| LogError::io("truncate torn tail", &path, e))?;
        fs_io::sync_all(&file, &path).map_err(|e| LogError::io("fsync segment", &path, e))?;
        if torn > 0 {
            report.truncated_bytes += torn;
            report.truncated_records += u64::from(scan.first_invalid_count.unwrap_or(0));
            report.truncation_reason = scan.stopped_by.clone();
            tracing::warn!(
                segment = %path.display(),
                position = scan.valid_len,
                bytes = torn,
                "recovery truncated a torn or corrupt tail"
            );
        }
    } else {
        // After a process crash (not a power loss) the batches just scanned may be in
        // the page cache only. They are about to be served, so they must be durable.
        fs_io::sync_data(&file, &path).map_err(|e| LogError::io("fsync segment", &path, e))?;
    }
    // An index file for the active segment comes from a roll that did not finish.
    let stale = segment::index_path(dir, active_base);
    if stale.exists() {
        fs_io::remove_file(&stale).map_err(|e| LogError::io("remove stale index", &stale, e))?;
        report.removed_files += 1;
    }
    // Make the directory entries recovery relied on durable: after a process crash, the
    // active segment may have been created without its directory fsync yet (and
    // acknowledged appends to it would vanish with its entry on a power loss); rebuilt
    // indexes were renamed into place; leftovers were removed.
    sync_dir(dir)?;
    if let Some((_, last)) = sealed.last_key_value()
        && last.next_offset != active_base
    {
        report.warnings.push(format!(
            "segment {} ends at offset {} but the active segment starts at {active_base}",
            last.base, last.next_offset
        ));
    }
    let file = Arc::new(file);
    let start_offset = sealed.keys().next().copied().unwrap_or(active_base);
    report.segments = sealed.len() + 1;
    report.start_offset = start_offset;
    report.next_offset = scan.next_offset;
    let last_indexed = scan.entries.last().map(|e| u64::from(e.position));
    let state = State {
        sealed,
        active: ActiveView {
            base: active_base,
            path: path.clone(),
            file: Arc::clone(&file),
            len: scan.valid_len,
            next_offset: scan.next_offset,
            entries: scan.entries.clone(),
        },
        start_offset,
    };
    let writer = WriterState {
        base: active_base,
        path,
        file,
        len: scan.valid_len,
        next_offset: scan.next_offset,
        max_timestamp: scan.max_timestamp,
        entries: scan.entries,
        last_indexed,
        opened_at: Instant::now(),
        allocated: scan.valid_len,
    };
    Ok((state, report, writer))
}
