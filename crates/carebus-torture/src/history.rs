//! What the clients saw, recorded with times (microseconds since the run began) so the
//! checks can tell "before" from "after" without trusting the server.

use std::sync::Mutex;
use std::time::Instant;

/// The subscriptions the workers consume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Sub {
    /// `torture.orders` / `work`: acks, nacks and abandoned leases.
    Work,
    /// `torture.orders` / `txn`: acknowledged inside transactions.
    Txn,
    /// `torture.poison` / `poison`: always nacked, so dead-lettered.
    Poison,
}

#[derive(Debug, Clone)]
pub(crate) struct PublishRecord {
    pub(crate) topic: &'static str,
    pub(crate) key: String,
    pub(crate) body: Vec<u8>,
    /// Partition and offset from an acknowledgement, if one came back.
    pub(crate) acked_at: Option<(u32, u64)>,
    pub(crate) conflict: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct DeliveryRecord {
    pub(crate) sub: Sub,
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    /// When the receive request was sent and when its answer arrived.
    pub(crate) requested_us: u64,
    pub(crate) received_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckOutcome {
    /// The server answered and did not refuse this id.
    Confirmed,
    /// The request failed (e.g. the server was killed): it may or may not have applied.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct AckRecord {
    pub(crate) sub: Sub,
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    pub(crate) sent_us: u64,
    pub(crate) answered_us: u64,
    pub(crate) outcome: AckOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxnOutcome {
    /// Commit answered 200.
    Committed,
    /// Commit was sent but no answer came: all or nothing may have happened.
    CommitUnknown,
    /// Never committed: aborted, abandoned to expire, refused, or lost with the server.
    NeverCommitted,
}

#[derive(Debug, Clone)]
pub(crate) struct TxnRecord {
    pub(crate) id: u64,
    /// The `torture.orders` positions it acknowledged.
    pub(crate) origins: Vec<(u32, u64)>,
    pub(crate) outcome: TxnOutcome,
    /// When the commit request was sent (Committed and CommitUnknown).
    pub(crate) commit_sent_us: u64,
    /// When the commit answer arrived (Committed only).
    pub(crate) committed_us: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct MllpRecord {
    /// The idempotency key the broker derives: MSH-3|MSH-4|MSH-10.
    pub(crate) key: String,
    pub(crate) acked: bool,
}

/// Everything recorded during a run.
#[derive(Debug)]
pub(crate) struct History {
    start: Instant,
    pub(crate) publishes: Mutex<Vec<PublishRecord>>,
    pub(crate) deliveries: Mutex<Vec<DeliveryRecord>>,
    pub(crate) acks: Mutex<Vec<AckRecord>>,
    pub(crate) txns: Mutex<Vec<TxnRecord>>,
    pub(crate) mllp: Mutex<Vec<MllpRecord>>,
    /// Protocol-level surprises seen by the workers (each one fails the run).
    pub(crate) anomalies: Mutex<Vec<String>>,
    pub(crate) nacks: Mutex<u64>,
}

/// Locks a mutex, recovering the data if a worker panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl History {
    pub(crate) fn new() -> History {
        History {
            start: Instant::now(),
            publishes: Mutex::default(),
            deliveries: Mutex::default(),
            acks: Mutex::default(),
            txns: Mutex::default(),
            mllp: Mutex::default(),
            anomalies: Mutex::default(),
            nacks: Mutex::default(),
        }
    }

    pub(crate) fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub(crate) fn anomaly(&self, what: String) {
        lock(&self.anomalies).push(what);
    }

    pub(crate) fn push_publish(&self, record: PublishRecord) -> usize {
        let mut p = lock(&self.publishes);
        p.push(record);
        p.len() - 1
    }

    pub(crate) fn publish_acked(&self, index: usize, at: (u32, u64), conflict: bool) {
        if let Some(p) = lock(&self.publishes).get_mut(index) {
            p.acked_at = Some(at);
            p.conflict = conflict;
        }
    }

    pub(crate) fn push_mllp(&self, key: String) -> usize {
        let mut m = lock(&self.mllp);
        m.push(MllpRecord { key, acked: false });
        m.len() - 1
    }

    pub(crate) fn mllp_acked(&self, index: usize) {
        if let Some(m) = lock(&self.mllp).get_mut(index) {
            m.acked = true;
        }
    }
}
