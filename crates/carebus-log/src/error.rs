//! Errors returned by the log.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong when opening, appending to or reading a log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O error other than a full disk.
    #[error("log I/O error during {op} on {path}: {source}")]
    Io {
        /// What the log was doing.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The filesystem holding the log is full (ENOSPC/EDQUOT). Nothing of the
    /// failed append was kept; appends succeed again once space returns.
    #[error("no space left on the device holding {path}")]
    StorageFull {
        /// The file that could not grow.
        path: PathBuf,
    },
    /// A batch with no records was offered.
    #[error("a batch must hold at least one record")]
    EmptyBatch,
    /// One record is larger than `max_record_bytes`.
    #[error("record {index} of the batch is {size} bytes; the limit is {limit} bytes")]
    RecordTooLarge {
        /// Position of the record inside the batch.
        index: usize,
        /// Its encoded size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The whole batch is larger than `max_batch_bytes`.
    #[error("batch is {size} bytes; the limit is {limit} bytes")]
    BatchTooLarge {
        /// Encoded size of the batch.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A header name or count does not fit the on-disk encoding.
    #[error("invalid record: {0}")]
    InvalidRecord(&'static str),
    /// The requested offset was removed by retention (or never existed below the start).
    #[error("offset {requested} is below the log start offset {start}")]
    OffsetOutOfRange {
        /// Offset asked for.
        requested: u64,
        /// First offset still stored.
        start: u64,
    },
    /// Stored bytes failed verification (checksum, framing or offset mismatch).
    /// The data is never returned.
    #[error("corrupt data in segment {segment} at byte {position}: {reason}")]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte position of the bad batch inside the segment.
        position: u64,
        /// What check failed.
        reason: String,
    },
    /// A previous fsync failed; the log refuses further appends until it is reopened,
    /// because the kernel may have dropped the dirty pages (see the PostgreSQL "fsyncgate").
    #[error("the log stopped accepting appends after a failed fsync: {0}")]
    Poisoned(String),
    /// The log's writer has shut down.
    #[error("the log is closed")]
    Closed,
    /// Another process (or another `Log` in this process) has the directory open.
    #[error("log directory {0} is locked by another user")]
    Locked(PathBuf),
    /// The configuration is unusable.
    #[error("invalid log configuration: {0}")]
    Config(String),
    /// The batch is durable, but the step the appender asked to run after it
    /// ([`crate::Log::append_then`]) failed.
    #[error("appended, but the step after the append failed: {0}")]
    AfterAppend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl LogError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if is_storage_full(&source) {
            LogError::StorageFull { path }
        } else {
            LogError::Io { op, path, source }
        }
    }

    /// True when the error is a full disk, which heals by itself when space returns.
    pub fn is_storage_full(&self) -> bool {
        matches!(self, LogError::StorageFull { .. })
    }
}

fn is_storage_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.kind() == io::ErrorKind::QuotaExceeded
}

/// Shorthand used throughout the crate.
pub type Result<T, E = LogError> = std::result::Result<T, E>;
