//! Guards the deduplication index against a model: random sequences of publishes (with
//! and without an idempotency key), lookups, checkpoints, clean restarts, crashes,
//! expiry and the passing of time, under a tiny (always spilling) and a roomy memory
//! budget, with real fingerprints and with fingerprints folded to 2 bits (constant
//! collisions). After every step the broker's decision (candidates verified against the
//! log, as the broker does) must equal a `HashMap<Vec<u8>, DedupEntry>` model.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use carebus_core::dedup::{DedupConfig, DedupEntry, DedupIndex, fingerprint};
use proptest::prelude::*;

const WINDOW_MS: i64 = 1000;

/// A record of the fake partition log: its idempotency key, if any, and its entry.
type LogRecord = (Option<Vec<u8>>, DedupEntry);

#[derive(Debug, Clone)]
enum Op {
    Publish { key: u8, partition: u32, body: u8 },
    PublishWithoutKey { partition: u32 },
    Lookup { key: u8 },
    Tick { ms: i64 },
    Checkpoint,
    Restart,
    Crash,
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..40, 0u32..3, 0u8..2).prop_map(|(key, partition, body)| Op::Publish { key, partition, body }),
        1 => (0u32..3).prop_map(|partition| Op::PublishWithoutKey { partition }),
        3 => (0u8..40).prop_map(|key| Op::Lookup { key }),
        2 => (0i64..400).prop_map(|ms| Op::Tick { ms }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
        1 => Just(Op::Expire),
    ]
}

struct Harness {
    dir: tempfile::TempDir,
    config: DedupConfig,
    fold: bool,
    idx: Option<DedupIndex>,
    /// Per partition, the records in offset order: the key, if any, and its entry.
    log: BTreeMap<u32, Vec<LogRecord>>,
    model: HashMap<Vec<u8>, DedupEntry>,
    now: i64,
}

impl Harness {
    fn fp(&self, key: &[u8]) -> u64 {
        if self.fold {
            fingerprint(key) & 3
        } else {
            fingerprint(key)
        }
    }

    fn idx(&mut self) -> &mut DedupIndex {
        self.idx.as_mut().unwrap()
    }

    /// What the broker would answer: the candidate whose logged key is `key`.
    fn decide(&mut self, key: &[u8]) -> Option<DedupEntry> {
        let fp = self.fp(key);
        let now = self.now;
        let cands = self.idx().candidates_by_fingerprint(fp, now).unwrap();
        let verified: Vec<DedupEntry> = cands
            .into_iter()
            .filter(|c| {
                let rec = self
                    .log
                    .get(&c.partition)
                    .and_then(|p| p.get(c.offset as usize));
                rec.and_then(|(k, _)| k.as_deref()) == Some(key)
            })
            .collect();
        assert!(
            verified.len() <= 1,
            "two live copies of one key: {verified:?}"
        );
        verified.first().copied()
    }

    fn expected(&self, key: &[u8]) -> Option<DedupEntry> {
        self.model
            .get(key)
            .copied()
            .filter(|e| e.timestamp_ms >= self.now - WINDOW_MS)
    }

    fn reopen(&mut self) {
        self.idx = None;
        let (mut idx, replay_from) = DedupIndex::open(self.dir.path(), self.config).unwrap();
        for (p, records) in &self.log {
            let from = replay_from.get(p).copied().unwrap_or(0) as usize;
            for (k, e) in records.iter().skip(from) {
                match k {
                    Some(k) => {
                        let fp = if self.fold {
                            fingerprint(k) & 3
                        } else {
                            fingerprint(k)
                        };
                        idx.insert_by_fingerprint(fp, *e).unwrap();
                    }
                    None => idx.advance(*p, e.offset).unwrap(),
                }
            }
        }
        self.idx = Some(idx);
    }

    fn append(&mut self, key: Option<Vec<u8>>, partition: u32, body: u8) -> DedupEntry {
        let records = self.log.entry(partition).or_default();
        let e = DedupEntry {
            partition,
            offset: records.len() as u64,
            body_hash: u64::from(body),
            timestamp_ms: self.now,
        };
        records.push((key, e));
        e
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Publish {
                key,
                partition,
                body,
            } => {
                let key = format!("EPICADT|NORTHGATE|NG-ADT-{key:06}").into_bytes();
                let found = self.decide(&key);
                assert_eq!(found, self.expected(&key));
                if found.is_none() {
                    let e = self.append(Some(key.clone()), *partition, *body);
                    let fp = self.fp(&key);
                    self.idx().insert_by_fingerprint(fp, e).unwrap();
                    self.model.insert(key, e);
                }
            }
            Op::PublishWithoutKey { partition } => {
                let e = self.append(None, *partition, 0);
                self.idx().advance(*partition, e.offset).unwrap();
            }
            Op::Lookup { key } => {
                let key = format!("EPICADT|NORTHGATE|NG-ADT-{key:06}").into_bytes();
                assert_eq!(self.decide(&key), self.expected(&key));
            }
            Op::Tick { ms } => self.now += ms,
            Op::Checkpoint => self.idx().checkpoint().unwrap(),
            Op::Restart => {
                self.idx().checkpoint().unwrap();
                self.reopen();
            }
            Op::Crash => self.reopen(),
            Op::Expire => {
                let now = self.now;
                self.idx().expire(now).unwrap();
                self.model.retain(|_, e| e.timestamp_ms >= now - WINDOW_MS);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn index_agrees_with_a_hashmap_model(
        ops in proptest::collection::vec(op(), 1..160),
        tiny_budget in any::<bool>(),
        fold in any::<bool>(),
    ) {
        let config = DedupConfig {
            window: Duration::from_millis(WINDOW_MS as u64),
            memory_budget_bytes: if tiny_budget { 2 << 10 } else { 1 << 20 },
        };
        let dir = tempfile::tempdir().unwrap();
        let (idx, replay_from) = DedupIndex::open(dir.path(), config).unwrap();
        prop_assert!(replay_from.is_empty());
        let mut h = Harness {
            dir,
            config,
            fold,
            idx: Some(idx),
            log: BTreeMap::new(),
            model: HashMap::new(),
            now: 10_000,
        };
        for op in &ops {
            h.step(op);
        }
        // Finally every key ever published answers as the model does, after a crash too.
        let keys: Vec<Vec<u8>> = h.model.keys().cloned().collect();
        for k in &keys {
            prop_assert_eq!(h.decide(k), h.expected(k));
        }
        h.reopen();
        for k in &keys {
            prop_assert_eq!(h.decide(k), h.expected(k));
        }
    }
}
