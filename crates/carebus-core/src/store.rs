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

use std::sync::RwLock;
use std::time::Duration;

use carebus_log::{Log, LogConfig, LogError, Retention};

use crate::topic::{TopicConfig, validate_name};

const TOPIC_CONFIG_FILE: &str = "topic.json";
const DELETED_PREFIX: &str = ".deleted-";

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
    /// A topic name or configuration was refused.
    #[error(transparent)]
    InvalidTopic(#[from] crate::topic::TopicConfigError),
    /// No such topic.
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    /// The change would drop partitions.
    #[error(
        "topic {topic} has {current} partitions; partitions can grow but not shrink (asked for {requested})"
    )]
    PartitionsCannotShrink {
        /// The topic.
        topic: String,
        /// Partitions it has.
        current: u32,
        /// Partitions asked for.
        requested: u32,
    },
    /// A stored topic configuration could not be read.
    #[error("topic configuration {path} is unreadable: {reason}")]
    BadTopicConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
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

/// An open topic: its configuration and one log per partition.
#[derive(Debug)]
pub struct Topic {
    /// The topic's name.
    pub name: String,
    /// Its configuration.
    pub config: TopicConfig,
    /// Partition logs, index = partition number.
    pub partitions: Vec<Arc<Log>>,
}

/// The open data directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    log_config: LogConfig,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
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
        let topics_dir = dir.join("topics");
        std::fs::create_dir_all(&topics_dir).map_err(dir_err(&topics_dir))?;
        let mut report = StoreReport::default();
        let mut topics = BTreeMap::new();
        for topic_dir in sorted_subdirs(&topics_dir)? {
            let name = topic_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let config_path = topic_dir.join(TOPIC_CONFIG_FILE);
            if name.starts_with(DELETED_PREFIX) || !config_path.exists() {
                // A deletion or a creation that did not finish: the topic never existed
                // (its configuration is written last), or was deleted.
                std::fs::remove_dir_all(&topic_dir).map_err(dir_err(&topic_dir))?;
                tracing::info!(dir = %topic_dir.display(), "removed an unfinished topic directory");
                continue;
            }
            let bytes = std::fs::read(&config_path).map_err(dir_err(&config_path))?;
            let config: TopicConfig =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::BadTopicConfig {
                    path: config_path.clone(),
                    reason: e.to_string(),
                })?;
            config.validate()?;
            let mut partitions = Vec::new();
            for p in 0..config.partitions {
                let path = topic_dir.join(p.to_string());
                let (log, r) = Log::open(&path, partition_log_config(log_config, &config))
                    .map_err(|source| StoreError::Log {
                        path: path.clone(),
                        source,
                    })?;
                report.partitions += 1;
                report.records += r.next_offset.saturating_sub(r.start_offset);
                report.truncated_bytes += r.truncated_bytes;
                report.rebuilt_indexes += r.rebuilt_indexes;
                report.warnings.extend(r.warnings);
                partitions.push(Arc::new(log));
            }
            topics.insert(
                name.clone(),
                Arc::new(Topic {
                    name,
                    config,
                    partitions,
                }),
            );
        }
        Ok((
            Store {
                dir,
                log_config: log_config.clone(),
                topics: RwLock::new(topics),
                _lock: lock,
            },
            report,
        ))
    }

    /// Creates a topic, or updates its configuration (partitions may only grow).
    /// Returns the topic and whether it was created.
    pub fn put_topic(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<(Arc<Topic>, bool), StoreError> {
        validate_name(name)?;
        config.validate()?;
        let mut topics = self.topics.write().map_err(|_| lock_err(&self.dir))?;
        let topic_dir = self.dir.join("topics").join(name);
        let existing = topics.get(name).cloned();
        if let Some(t) = &existing
            && config.partitions < t.config.partitions
        {
            return Err(StoreError::PartitionsCannotShrink {
                topic: name.to_owned(),
                current: t.config.partitions,
                requested: config.partitions,
            });
        }
        std::fs::create_dir_all(&topic_dir).map_err(dir_err(&topic_dir))?;
        let mut partitions: Vec<Arc<Log>> = existing
            .as_ref()
            .map(|t| t.partitions.clone())
            .unwrap_or_default();
        for p in partitions.len()..config.partitions as usize {
            let path = topic_dir.join(p.to_string());
            let (log, _) = Log::open(&path, partition_log_config(&self.log_config, &config))
                .map_err(|source| StoreError::Log {
                    path: path.clone(),
                    source,
                })?;
            partitions.push(Arc::new(log));
        }
        // The configuration is written last and atomically: a topic exists once it is there.
        let config_path = topic_dir.join(TOPIC_CONFIG_FILE);
        let json = serde_json::to_vec_pretty(&config).map_err(|e| StoreError::BadTopicConfig {
            path: config_path.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&config_path, &json)?;
        let topic = Arc::new(Topic {
            name: name.to_owned(),
            config,
            partitions,
        });
        topics.insert(name.to_owned(), Arc::clone(&topic));
        tracing::info!(
            topic = name,
            partitions = config.partitions,
            created = existing.is_none(),
            "topic configured"
        );
        Ok((topic, existing.is_none()))
    }

    /// The directory of a topic (whether or not it exists).
    pub fn topic_dir(&self, name: &str) -> PathBuf {
        self.dir.join("topics").join(name)
    }

    /// The topic, if it exists.
    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().ok()?.get(name).cloned()
    }

    /// All topics, by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Deletes a topic and all its messages.
    pub fn delete_topic(&self, name: &str) -> Result<(), StoreError> {
        validate_name(name)?;
        let mut topics = self.topics.write().map_err(|_| lock_err(&self.dir))?;
        if topics.remove(name).is_none() {
            return Err(StoreError::UnknownTopic(name.to_owned()));
        }
        let topics_dir = self.dir.join("topics");
        let from = topics_dir.join(name);
        let to = topics_dir.join(format!("{DELETED_PREFIX}{name}"));
        // Rename first (atomic, durable with the directory fsync), then remove at leisure;
        // an interrupted removal is finished at the next start.
        std::fs::rename(&from, &to).map_err(dir_err(&from))?;
        File::open(&topics_dir)
            .and_then(|d| d.sync_all())
            .map_err(dir_err(&topics_dir))?;
        std::fs::remove_dir_all(&to).map_err(dir_err(&to))?;
        tracing::info!(topic = name, "topic deleted");
        Ok(())
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of open partition logs.
    pub fn partition_count(&self) -> usize {
        self.topics
            .read()
            .map_or(0, |t| t.values().map(|x| x.partitions.len()).sum())
    }
}

fn lock_err(dir: &Path) -> StoreError {
    StoreError::DataDir {
        path: dir.to_path_buf(),
        source: std::io::Error::other("internal lock poisoned"),
    }
}

fn partition_log_config(base: &LogConfig, topic: &TopicConfig) -> LogConfig {
    LogConfig {
        retention: Retention {
            max_age: topic.retention_ms.map(Duration::from_millis),
            max_bytes: topic.retention_bytes,
        },
        ..base.clone()
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(dir_err(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(dir_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(dir_err(path))?;
    if let Some(parent) = path.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(dir_err(parent))?;
    }
    Ok(())
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
    fn topics_persist_grow_and_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig::default();
        {
            let (store, _) = Store::open(dir.path(), &cfg).unwrap();
            let (t, created) = store
                .put_topic(
                    "hl7.adt",
                    TopicConfig {
                        partitions: 2,
                        ..TopicConfig::default()
                    },
                )
                .unwrap();
            assert!(created);
            t.partitions[1]
                .append_blocking(&[carebus_log::Record::new("a"), carebus_log::Record::new("b")])
                .unwrap();
            let (_, created) = store
                .put_topic(
                    "hl7.adt",
                    TopicConfig {
                        partitions: 3,
                        ..TopicConfig::default()
                    },
                )
                .unwrap();
            assert!(!created);
            assert!(matches!(
                store.put_topic(
                    "hl7.adt",
                    TopicConfig {
                        partitions: 1,
                        ..TopicConfig::default()
                    }
                ),
                Err(StoreError::PartitionsCannotShrink {
                    current: 3,
                    requested: 1,
                    ..
                })
            ));
            assert!(matches!(
                store.put_topic("../x", TopicConfig::default()),
                Err(StoreError::InvalidTopic(_))
            ));
            store.put_topic("gone", TopicConfig::default()).unwrap();
            store.delete_topic("gone").unwrap();
            assert!(matches!(
                store.delete_topic("gone"),
                Err(StoreError::UnknownTopic(_))
            ));
            assert!(!dir.path().join("topics/gone").exists());
        }
        // An unfinished creation (no topic.json) disappears at the next start.
        std::fs::create_dir_all(dir.path().join("topics/half/0")).unwrap();
        let (store, report) = Store::open(dir.path(), &cfg).unwrap();
        assert_eq!(report.records, 2);
        assert_eq!(report.partitions, 3);
        let t = store.topic("hl7.adt").unwrap();
        assert_eq!(t.config.partitions, 3);
        assert_eq!(t.partitions[1].next_offset(), 2);
        assert!(store.topic("half").is_none());
        assert!(!dir.path().join("topics/half").exists());
        assert_eq!(store.topics().len(), 1);
    }

    #[test]
    fn a_corrupt_topic_configuration_stops_the_start_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path(), &LogConfig::default()).unwrap();
            store.put_topic("t", TopicConfig::default()).unwrap();
        }
        std::fs::write(dir.path().join("topics/t/topic.json"), b"{not json").unwrap();
        assert!(matches!(
            Store::open(dir.path(), &LogConfig::default()),
            Err(StoreError::BadTopicConfig { .. })
        ));
    }
}
