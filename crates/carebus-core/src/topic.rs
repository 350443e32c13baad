//! Topic names, configuration and the choice of partition for a message.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest topic (and subscription) name.
pub const MAX_NAME_LEN: usize = 200;

/// Why a name or a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicConfigError {
    /// The name breaks `[A-Za-z0-9._-]{1,200}` (or is `.`/`..`).
    #[error("invalid name: must match [A-Za-z0-9._-]{{1,200}} and not be . or ..")]
    InvalidName,
    /// A setting is out of range.
    #[error("invalid topic setting {field}: {reason}")]
    InvalidSetting {
        /// The setting.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

/// Checks a topic or subscription name: `[A-Za-z0-9._-]{1,200}`, and not `.` or `..`
/// (names become directory names).
pub fn validate_name(name: &str) -> Result<(), TopicConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(TopicConfigError::InvalidName)
    }
}

/// A topic's configuration, stored as `topic.json` in its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicConfig {
    /// Number of partitions (1..=1024). It can grow but not shrink; growing it remaps
    /// partition keys, so one key's order holds only among messages published after.
    pub partitions: u32,
    /// Delete whole segments once all their messages are older than this (ms).
    pub retention_ms: Option<u64>,
    /// Delete the oldest segments while a partition is larger than this.
    pub retention_bytes: Option<u64>,
    /// How long an idempotency key is remembered (ms); defaults to the retention.
    pub dedup_window_ms: Option<u64>,
}

/// Seven days, the default retention and deduplication window.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            retention_ms: Some(millis(DEFAULT_RETENTION)),
            retention_bytes: None,
            dedup_window_ms: None,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl TopicConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), TopicConfigError> {
        if !(1..=1024).contains(&self.partitions) {
            return Err(TopicConfigError::InvalidSetting {
                field: "partitions",
                reason: "must be between 1 and 1024",
            });
        }
        if self.retention_ms == Some(0) {
            return Err(TopicConfigError::InvalidSetting {
                field: "retention_ms",
                reason: "must be positive",
            });
        }
        if self.retention_bytes == Some(0) {
            return Err(TopicConfigError::InvalidSetting {
                field: "retention_bytes",
                reason: "must be positive",
            });
        }
        if self.dedup_window_ms == Some(0) {
            return Err(TopicConfigError::InvalidSetting {
                field: "dedup_window_ms",
                reason: "must be positive",
            });
        }
        Ok(())
    }

    /// The deduplication window: the configured one, else the retention, else 7 days.
    pub fn dedup_window(&self) -> Duration {
        Duration::from_millis(
            self.dedup_window_ms
                .or(self.retention_ms)
                .unwrap_or_else(|| millis(DEFAULT_RETENTION)),
        )
    }
}

/// The partition of a message with this partition key: a stable hash (xxh3-64, the same
/// on every machine and version), so the same key always lands in the same partition.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let p = u64::from(partitions.max(1));
    u32::try_from(xxhash_rust::xxh3::xxh3_64(key) % p).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_pattern() {
        for ok in ["hl7.adt", "patient-info", "a", "A_b.c-9", &"x".repeat(200)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"x".repeat(201),
            "a%2Fb",
        ] {
            assert_eq!(
                validate_name(bad),
                Err(TopicConfigError::InvalidName),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_same_key_always_maps_to_the_same_partition() {
        // Pinned values: changing the hash would silently reorder patients' messages.
        assert_eq!(partition_for_key(b"MRN100234^NORTHGATE", 1), 0);
        let p = partition_for_key(b"MRN100234^NORTHGATE", 8);
        for _ in 0..10 {
            assert_eq!(partition_for_key(b"MRN100234^NORTHGATE", 8), p);
        }
        let pinned: Vec<u32> = [
            "MRN100234^NORTHGATE",
            "MRN200871^NORTHGATE",
            "MRN300045^NORTHGATE",
            "987-65-4320^USSSA",
        ]
        .iter()
        .map(|k| partition_for_key(k.as_bytes(), 16))
        .collect();
        assert_eq!(pinned, [2, 1, 15, 10]);
        // Keys spread over all partitions.
        let mut seen = [0u32; 8];
        for i in 0..8000 {
            seen[partition_for_key(format!("MRN{i}").as_bytes(), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn config_defaults_validation_and_json() {
        let c = TopicConfig::default();
        assert_eq!(c.partitions, 1);
        assert_eq!(c.dedup_window(), DEFAULT_RETENTION);
        let c: TopicConfig =
            serde_json::from_str(r#"{"partitions":4,"dedup_window_ms":1000}"#).unwrap();
        assert_eq!(c.partitions, 4);
        assert_eq!(c.dedup_window(), Duration::from_millis(1000));
        assert!(serde_json::from_str::<TopicConfig>(r#"{"partitions":"4"}"#).is_err());
        assert!(serde_json::from_str::<TopicConfig>(r#"{"bogus":1}"#).is_err());
        assert!(TopicConfig { partitions: 0, ..c }.validate().is_err());
        assert!(
            TopicConfig {
                partitions: 1025,
                ..c
            }
            .validate()
            .is_err()
        );
        assert!(
            TopicConfig {
                retention_ms: Some(0),
                ..c
            }
            .validate()
            .is_err()
        );
        assert!(c.validate().is_ok());
    }
}
