//! Model-based property test of the log: random sequences of appends, reads, reopens
//! and simulated crashes (a torn last write) are compared after every step with a
//! plain vector holding exactly the acknowledged records.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use carebus_log::{Log, LogConfig, Record, Retention};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(Option<Vec<u8>>, Vec<u8>)>),
    /// Append, then crash with only part of that write on disk: the append was never
    /// acknowledged, so it must vanish entirely. `cut` is how many of its bytes are lost.
    AppendTorn(Vec<(Option<Vec<u8>>, Vec<u8>)>, u16),
    Read {
        from: u16,
        max: u8,
    },
    Reopen,
}

fn batch() -> impl Strategy<Value = Vec<(Option<Vec<u8>>, Vec<u8>)>> {
    prop::collection::vec(
        (
            prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
            prop::collection::vec(any::<u8>(), 0..600),
        ),
        1..5,
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => batch().prop_map(Op::Append),
        1 => (batch(), any::<u16>()).prop_map(|(b, c)| Op::AppendTorn(b, c)),
        3 => (any::<u16>(), any::<u8>()).prop_map(|(from, max)| Op::Read { from, max }),
        1 => Just(Op::Reopen),
    ]
}

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 300,
        segment_max_age: None,
        retention: Retention::default(),
        ..LogConfig::default()
    }
}

fn records(b: &[(Option<Vec<u8>>, Vec<u8>)]) -> Vec<Record> {
    b.iter()
        .map(|(k, v)| {
            let r = Record::new(v.clone()).with_timestamp(7);
            match k {
                Some(k) => r.with_key(k.clone()),
                None => r,
            }
        })
        .collect()
}

fn last_segment(dir: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v.pop().unwrap()
}

fn check_all(log: &Log, model: &[Record]) {
    assert_eq!(log.next_offset(), model.len() as u64);
    let got = log.read(0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(got.len(), model.len());
    for (g, m) in got.iter().zip(model) {
        assert_eq!(g.value, m.value);
        assert_eq!(g.key, m.key);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_a_vector_of_acknowledged_records(ops in prop::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), cfg()).unwrap();
        let mut model: Vec<Record> = Vec::new();
        for op in ops {
            match op {
                Op::Append(b) => {
                    let recs = records(&b);
                    let ack = log.append_blocking(&recs).unwrap();
                    prop_assert_eq!(ack.base_offset, model.len() as u64);
                    model.extend(recs);
                }
                Op::AppendTorn(b, cut) => {
                    // A clean close trims the preallocation, so file sizes are exact.
                    drop(log);
                    let before_path = last_segment(dir.path());
                    let before_len = std::fs::metadata(&before_path).unwrap().len();
                    log = Log::open(dir.path(), cfg()).unwrap().0;
                    // The synced mark before the append: a torn append was never
                    // fdatasynced, so its mark was never written either.
                    let mark_path = dir.path().join("synced.mark");
                    let mark_before = std::fs::read(&mark_path).unwrap();
                    let recs = records(&b);
                    log.append_blocking(&recs).unwrap();
                    drop(log);
                    let after_path = last_segment(dir.path());
                    if after_path == before_path {
                        std::fs::write(&mark_path, &mark_before).unwrap();
                        let after_len = std::fs::metadata(&after_path).unwrap().len();
                        let grown = after_len - before_len;
                        let lost = 1 + u64::from(cut) % grown;
                        let f = std::fs::OpenOptions::new().write(true).open(&after_path).unwrap();
                        f.set_len(after_len - lost).unwrap();
                        let (l, report) = Log::open(dir.path(), cfg()).unwrap();
                        // Trailing zero bytes of the torn part count as unwritten, not torn.
                        prop_assert!(report.truncated_bytes <= grown - lost);
                        log = l;
                    } else {
                        // The append rolled a segment; keep it as an acknowledged append.
                        model.extend(recs);
                        log = Log::open(dir.path(), cfg()).unwrap().0;
                    }
                }
                Op::Read { from, max } => {
                    let from = if model.is_empty() { 0 } else { u64::from(from) % (model.len() as u64 + 2) };
                    let max = usize::from(max % 10) + 1;
                    let got = log.read(from, max, usize::MAX).unwrap();
                    let expected: Vec<&Record> = model.iter().skip(from as usize).take(max).collect();
                    prop_assert_eq!(got.len(), expected.len());
                    for (i, (g, m)) in got.iter().zip(expected).enumerate() {
                        prop_assert_eq!(g.offset, from + i as u64);
                        prop_assert_eq!(&g.value, &m.value);
                        prop_assert_eq!(&g.key, &m.key);
                        prop_assert_eq!(g.value.clone(), m.value.clone());
                    }
                }
                Op::Reopen => {
                    drop(log);
                    log = Log::open(dir.path(), cfg()).unwrap().0;
                }
            }
            check_all(&log, &model);
        }
    }
}
