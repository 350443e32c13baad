//! Transactions: consume → transform → publish, exactly once.
//!
//! A transaction collects publishes (to any topics) and acks (of deliveries of any
//! subscriptions) in memory; nothing of it is visible or durable before commit.
//! Commit holds the deliveries (their leases can no longer expire), then appends one
//! atomic batch to the broker's transaction log — a commit record naming the acks and
//! the topics, followed by the messages themselves — and only then applies it:
//! publishes (each with an idempotency key, generated if the publisher gave none) and
//! acks. A crash after the commit batch is durable re-applies it at the next start
//! (publishing twice is deduplicated, acking twice is harmless); a crash before it,
//! an abort or a timeout leaves no trace, and the deliveries are delivered again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use carebus_log::{Log, Record, StoredRecord};
use serde::{Deserialize, Serialize};

use crate::message::{PublishMessage, StoredMessage};

/// The commit record, first record of a commit batch in the transaction log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CommitRecord {
    pub(crate) commit: u64,
    /// Topic of each message record that follows, in order.
    pub(crate) topics: Vec<String>,
    pub(crate) acks: Vec<TxnAck>,
}

/// Marks a commit as fully applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AppliedRecord {
    pub(crate) applied: u64,
}

/// One acknowledgement inside a transaction, by position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TxnAck {
    pub(crate) topic: String,
    pub(crate) subscription: String,
    pub(crate) partition: u32,
    pub(crate) offset: u64,
}

/// An open transaction.
#[derive(Debug)]
pub(crate) struct OpenTxn {
    pub(crate) deadline: Instant,
    pub(crate) publishes: Vec<(String, PublishMessage)>,
    /// (topic, subscription, delivery id)
    pub(crate) acks: Vec<(String, String, u64)>,
}

/// A commit found in the log but not marked applied.
#[derive(Debug)]
pub(crate) struct PendingCommit {
    pub(crate) id: u64,
    pub(crate) publishes: Vec<(String, PublishMessage)>,
    pub(crate) acks: Vec<TxnAck>,
}

/// Open transactions and the transaction log.
#[derive(Debug)]
pub(crate) struct Transactions {
    pub(crate) log: Log,
    pub(crate) open: Mutex<HashMap<u64, OpenTxn>>,
    rng: Mutex<u64>,
}

/// Most open transactions at once (a bound on memory).
pub(crate) const MAX_OPEN: usize = 10_000;
/// Most messages one transaction may publish.
pub(crate) const MAX_MESSAGES: usize = 10_000;
/// Most body bytes one transaction may publish (its commit is one log batch).
pub(crate) const MAX_BYTES: usize = 64 << 20;
/// Longest transaction timeout.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

impl Transactions {
    pub(crate) fn new(log: Log) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        Transactions {
            log,
            open: Mutex::new(HashMap::new()),
            rng: Mutex::new(seed | 1),
        }
    }

    /// A fresh, random transaction id (never 0).
    pub(crate) fn new_id(&self) -> u64 {
        let mut g = match self.rng.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        loop {
            *g ^= *g << 13;
            *g ^= *g >> 7;
            *g ^= *g << 17;
            let id = *g >> 1;
            if id != 0 {
                return id;
            }
        }
    }

    /// The commit batch: the commit record, then the messages.
    pub(crate) fn commit_batch(
        id: u64,
        publishes: &[(String, PublishMessage)],
        acks: &[TxnAck],
    ) -> Vec<Record> {
        let head = CommitRecord {
            commit: id,
            topics: publishes.iter().map(|(t, _)| t.clone()).collect(),
            acks: acks.to_vec(),
        };
        let mut batch = vec![Record::new(serde_json::to_vec(&head).unwrap_or_default())];
        let now = carebus_log::now_ms();
        batch.extend(publishes.iter().map(|(_, m)| m.to_record(now)));
        batch
    }

    /// Reads the log: commits not marked applied, in commit order.
    pub(crate) fn pending_commits(&self) -> Result<Vec<PendingCommit>, carebus_log::LogError> {
        let mut commits: Vec<PendingCommit> = Vec::new();
        let mut current: Option<(CommitRecord, Vec<StoredRecord>)> = None;
        let mut at = self.log.start_offset();
        let end = self.log.next_offset();
        let finish = |c: Option<(CommitRecord, Vec<StoredRecord>)>,
                      commits: &mut Vec<PendingCommit>| {
            if let Some((head, records)) = c {
                let publishes = head
                    .topics
                    .iter()
                    .cloned()
                    .zip(
                        records
                            .into_iter()
                            .map(|r| StoredMessage::from_record(0, r).into_publish()),
                    )
                    .collect();
                commits.push(PendingCommit {
                    id: head.commit,
                    publishes,
                    acks: head.acks,
                });
            }
        };
        while at < end {
            let records = self.log.read(at, 4096, 16 << 20)?;
            let Some(last) = records.last().map(|r| r.offset) else {
                break;
            };
            for r in records {
                if let Some((head, body)) = current.as_mut()
                    && body.len() < head.topics.len()
                {
                    body.push(r);
                    continue;
                }
                finish(current.take(), &mut commits);
                if let Ok(head) = serde_json::from_slice::<CommitRecord>(&r.value) {
                    current = Some((head, Vec::new()));
                } else if let Ok(done) = serde_json::from_slice::<AppliedRecord>(&r.value) {
                    commits.retain(|c| c.id != done.applied);
                }
            }
            at = last + 1;
        }
        finish(current.take(), &mut commits);
        Ok(commits)
    }
}

impl StoredMessage {
    /// The message as it would be published again.
    pub(crate) fn into_publish(self) -> PublishMessage {
        PublishMessage {
            body: self.body,
            content_type: self.content_type,
            partition_key: self.partition_key,
            idempotency_key: self.idempotency_key,
            headers: self.headers,
        }
    }
}

/// The idempotency key given to a transactional message that has none, so that
/// re-applying a commit after a crash never stores it twice.
pub(crate) fn generated_key(txn: u64, index: usize) -> Bytes {
    Bytes::from(format!("carebus-txn/{txn:016x}/{index}"))
}
