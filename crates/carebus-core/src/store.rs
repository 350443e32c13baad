//! The data directory: lock, layout and recovery of every partition log.
//!
//! ```text
//! <data-dir>/
//!   carebus.lock                 exclusive lock held while a broker runs
//!   topics/<topic>/<partition>/  one carebus-log directory per partition
//! ```

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use carebus_log::{Log, LogConfig, LogError};

/// Errors opening the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created, read or locked.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The path concerned.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another broker holds the lock.
    #[error(
        "data directory {0} is in use by another carebus process (lock file carebus.lock is held)"
    )]
    Locked(PathBuf),
    /// A partition log failed to open.
    #[error("partition log {path}: {source}")]
    Log {
        /// The partition directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: LogError,
    },
}

/// What opening the store found, for the start-up log line. Holds no message contents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreReport {
    /// Partition logs opened.
    pub partitions: usize,
    /// Records stored across all partitions.
    pub records: u64,
    /// Bytes of torn tails cut during recovery.
    pub truncated_bytes: u64,
    /// Index files rebuilt during recovery.
    pub rebuilt_indexes: usize,
    /// Problems found in sealed segments (reported again on read).
    pub warnings: Vec<String>,
}

/// The open data directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    logs: BTreeMap<(String, String), Arc<Log>>,
    _lock: File,
}

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::DataDir {
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    /// Creates the directory if needed, takes its lock and recovers every partition log.
    pub fn open(
        dir: impl AsRef<Path>,
        log_config: &LogConfig,
    ) -> Result<(Store, StoreReport), StoreError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(dir_err(&dir))?;
        let lock_path = dir.join("carebus.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(dir_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(StoreError::Locked(dir)),
            Err(TryLockError::Error(e)) => return Err(dir_err(&lock_path)(e)),
        }
        let topics = dir.join("topics");
        std::fs::create_dir_all(&topics).map_err(dir_err(&topics))?;
        let mut report = StoreReport::default();
        let mut logs = BTreeMap::new();
        for topic in sorted_subdirs(&topics)? {
            for partition in sorted_subdirs(&topic)? {
                let (log, r) = Log::open(&partition, log_config.clone()).map_err(|source| {
                    StoreError::Log {
                        path: partition.clone(),
                        source,
                    }
                })?;
                report.partitions += 1;
                report.records += r.next_offset.saturating_sub(r.start_offset);
                report.truncated_bytes += r.truncated_bytes;
                report.rebuilt_indexes += r.rebuilt_indexes;
                report.warnings.extend(r.warnings);
                let name = |p: &Path| {
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                };
                logs.insert((name(&topic), name(&partition)), Arc::new(log));
            }
        }
        Ok((
            Store {
                dir,
                logs,
                _lock: lock,
            },
            report,
        ))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of open partition logs.
    pub fn partition_count(&self) -> usize {
        self.logs.len()
    }
}

fn sorted_subdirs(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_err(dir))? {
        let entry = entry.map_err(dir_err(dir))?;
        if entry.file_type().map_err(dir_err(dir))?.is_dir() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_second_store_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, report) = Store::open(dir.path(), &LogConfig::default()).unwrap();
        assert_eq!(report.partitions, 0);
        assert!(matches!(
            Store::open(dir.path(), &LogConfig::default()),
            Err(StoreError::Locked(_))
        ));
    }

    #[test]
    fn partition_logs_are_recovered_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) =
                Log::open(dir.path().join("topics/adt/0"), LogConfig::default()).unwrap();
            log.append_blocking(&[carebus_log::Record::new("a"), carebus_log::Record::new("b")])
                .unwrap();
        }
        let (store, report) = Store::open(dir.path(), &LogConfig::default()).unwrap();
        assert_eq!(store.partition_count(), 1);
        assert_eq!(report.records, 2);
    }
}
