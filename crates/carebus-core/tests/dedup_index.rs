//! Guards the deduplication index of exactly-once publish (`carebus_core::dedup`):
//! lookups and the window, that a checkpoint plus a replay of the log from the returned
//! positions gives the same answers after a clean restart or a crash, that spilling to
//! disk under a tiny memory budget forgets nothing, that corrupt files are reported as
//! errors (never as "not a duplicate"), that fingerprint collisions surface as several
//! candidates, and the memory cost per key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use carebus_core::dedup::{DedupConfig, DedupEntry, DedupError, DedupIndex, fingerprint};

const HOUR_MS: i64 = 3_600_000;

fn config(budget: usize) -> DedupConfig {
    DedupConfig {
        window: Duration::from_secs(3600),
        memory_budget_bytes: budget,
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("EPICADT|NORTHGATE|NG-ADT-{i:07}").into_bytes()
}

/// A stand-in for the partition logs: every keyed record in append order.
#[derive(Default)]
struct FakeLog {
    records: Vec<(Vec<u8>, DedupEntry)>,
    next_offset: BTreeMap<u32, u64>,
}

impl FakeLog {
    fn append(&mut self, k: Vec<u8>, partition: u32, ts: i64) -> DedupEntry {
        let off = self.next_offset.entry(partition).or_insert(0);
        let e = DedupEntry {
            partition,
            offset: *off,
            body_hash: fingerprint(&k) ^ 0x5555,
            timestamp_ms: ts,
        };
        *off += 1;
        self.records.push((k, e));
        e
    }

    /// What the broker does on start-up: replay every keyed record from `replay_from`.
    fn replay(&self, idx: &mut DedupIndex, replay_from: &BTreeMap<u32, u64>) -> usize {
        let mut n = 0;
        for (k, e) in &self.records {
            if e.offset >= replay_from.get(&e.partition).copied().unwrap_or(0) {
                idx.insert(k, *e).unwrap();
                n += 1;
            }
        }
        n
    }
}

fn publish(idx: &mut DedupIndex, log: &mut FakeLog, i: u64, ts: i64) -> DedupEntry {
    let e = log.append(key(i), (i % 3) as u32, ts);
    idx.insert(&key(i), e).unwrap();
    e
}

fn run_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cbr"))
        .collect();
    v.sort();
    v
}

fn flip_byte(path: &Path, pos: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[pos as usize] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

#[test]
fn insert_then_candidates_finds_the_first_copy_only_for_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, replay_from) = DedupIndex::open(dir.path(), config(1 << 20)).unwrap();
    assert!(replay_from.is_empty());
    let mut log = FakeLog::default();
    let e = publish(&mut idx, &mut log, 101, 1000);
    assert_eq!(idx.candidates(&key(101), 1000).unwrap(), vec![e]);
    assert!(idx.candidates(&key(102), 1000).unwrap().is_empty());
    assert!(idx.candidates(b"", 1000).unwrap().is_empty());
    assert_eq!(idx.len(), 1);
    // Replaying the same record again (idempotent replay) changes no answer.
    idx.insert(&key(101), e).unwrap();
    assert_eq!(idx.candidates(&key(101), 1000).unwrap(), vec![e]);
}

#[test]
fn entries_older_than_the_window_are_not_returned_and_expire_drops_them() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, _) = DedupIndex::open(dir.path(), config(1 << 20)).unwrap();
    let mut log = FakeLog::default();
    let old = publish(&mut idx, &mut log, 1, 0);
    let new = publish(&mut idx, &mut log, 2, HOUR_MS / 2);
    // Exactly at the window's edge it is still a duplicate; one millisecond later it is not.
    assert_eq!(idx.candidates(&key(1), HOUR_MS).unwrap(), vec![old]);
    assert!(idx.candidates(&key(1), HOUR_MS + 1).unwrap().is_empty());
    assert_eq!(idx.expire(HOUR_MS + 1).unwrap(), 1);
    assert_eq!(idx.len(), 1);
    assert_eq!(idx.candidates(&key(2), HOUR_MS + 1).unwrap(), vec![new]);
    // After expiry the key may be published again; the new copy is what is found.
    let again = publish(&mut idx, &mut log, 1, HOUR_MS + 2);
    assert_eq!(idx.candidates(&key(1), HOUR_MS + 2).unwrap(), vec![again]);
}

#[test]
fn checkpoint_and_reopen_return_replay_positions_and_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FakeLog::default();
    let mut expected = Vec::new();
    {
        let (mut idx, _) = DedupIndex::open(dir.path(), config(1 << 20)).unwrap();
        for i in 0..3000 {
            expected.push(publish(&mut idx, &mut log, i, 1000 + i as i64));
        }
        idx.advance(7, 41).unwrap(); // a partition that only saw records without a key
        idx.checkpoint().unwrap();
    }
    let (idx, replay_from) = DedupIndex::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(
        replay_from,
        BTreeMap::from([(0, 1000), (1, 1000), (2, 1000), (7, 42)])
    );
    assert_eq!(idx.len(), 3000);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(idx.candidates(&key(i as u64), 5000).unwrap(), vec![*e]);
    }
}

#[test]
fn crash_without_checkpoint_replays_from_older_positions_and_recovers_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FakeLog::default();
    let mut expected = Vec::new();
    {
        let (mut idx, _) = DedupIndex::open(dir.path(), config(1 << 20)).unwrap();
        for i in 0..300 {
            expected.push(publish(&mut idx, &mut log, i, 1000));
        }
        idx.checkpoint().unwrap();
        for i in 300..600 {
            expected.push(publish(&mut idx, &mut log, i, 1000));
        }
        // Dropped without a checkpoint: what a crash leaves behind.
    }
    let (mut idx, replay_from) = DedupIndex::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(replay_from, BTreeMap::from([(0, 100), (1, 100), (2, 100)]));
    assert!(idx.candidates(&key(450), 1000).unwrap().is_empty());
    assert_eq!(log.replay(&mut idx, &replay_from), 300);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(idx.candidates(&key(i as u64), 1000).unwrap(), vec![*e]);
    }
    // A second crash in the middle of the replay, and a replay from the very start
    // (as if the checkpoint were missing), still give the same answers.
    drop(idx);
    let (mut idx, _) = DedupIndex::open(dir.path(), config(1 << 20)).unwrap();
    log.replay(&mut idx, &BTreeMap::new());
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(idx.candidates(&key(i as u64), 1000).unwrap(), vec![*e]);
    }
}

#[test]
fn tiny_budget_spills_to_disk_and_keeps_every_key_findable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 16 << 10;
    let n = 20_000u64;
    let mut log = FakeLog::default();
    let mut expected = Vec::new();
    {
        let (mut idx, _) = DedupIndex::open(dir.path(), config(budget)).unwrap();
        for i in 0..n {
            expected.push(publish(&mut idx, &mut log, i, 1000));
            if i % 4999 == 0 {
                idx.checkpoint().unwrap();
            }
        }
        assert!(idx.disk_runs() >= 2, "{} disk runs", idx.disk_runs());
        assert!(idx.disk_runs() <= 8, "{} disk runs", idx.disk_runs());
        for (i, e) in expected.iter().enumerate() {
            assert_eq!(idx.candidates(&key(i as u64), 1000).unwrap(), vec![*e]);
        }
        // No checkpoint: the tail after the last spill comes back from the replay.
    }
    let (mut idx, replay_from) = DedupIndex::open(dir.path(), config(budget)).unwrap();
    log.replay(&mut idx, &replay_from);
    assert!(idx.disk_runs() >= 1);
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(idx.candidates(&key(i as u64), 1000).unwrap(), vec![*e]);
    }
    assert!(!run_files(dir.path()).is_empty());
}

#[test]
fn expire_deletes_run_files_whose_entries_are_all_expired() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, _) = DedupIndex::open(dir.path(), config(16 << 10)).unwrap();
    let mut log = FakeLog::default();
    for i in 0..5000 {
        publish(&mut idx, &mut log, i, 0);
    }
    idx.checkpoint().unwrap();
    let bytes_on_disk = |dir: &Path| -> u64 {
        run_files(dir)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum()
    };
    let bytes_before = bytes_on_disk(dir.path());
    assert!(bytes_before >= 5000 * 36);
    for i in 5000..5100 {
        publish(&mut idx, &mut log, i, 2 * HOUR_MS);
    }
    let dropped = idx.expire(2 * HOUR_MS).unwrap();
    assert_eq!(dropped, 5000);
    idx.checkpoint().unwrap();
    assert_eq!(idx.len(), 100);
    // Only the 100 live entries (and their files' fixed overhead) remain on disk.
    let bytes_after = bytes_on_disk(dir.path());
    assert!(
        bytes_after < bytes_before / 10,
        "{bytes_after} of {bytes_before} bytes left"
    );
    assert!(idx.candidates(&key(1), 2 * HOUR_MS).unwrap().is_empty());
    assert_eq!(idx.candidates(&key(5050), 2 * HOUR_MS).unwrap().len(), 1);
}

/// Builds an index whose entries are all in run files that stay on disk after reopen.
fn spilled_index(dir: &Path) -> (FakeLog, Vec<DedupEntry>) {
    let (mut idx, _) = DedupIndex::open(dir, config(4 << 10)).unwrap();
    let mut log = FakeLog::default();
    let expected = (0..2000)
        .map(|i| publish(&mut idx, &mut log, i, 1000))
        .collect();
    idx.checkpoint().unwrap();
    (log, expected)
}

#[test]
fn corrupt_data_block_is_an_error_on_lookup_never_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, expected) = spilled_index(dir.path());
    let files = run_files(dir.path());
    let biggest = files
        .iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    flip_byte(biggest, 32 + 36 * 5 + 3); // inside the 6th record of the first block
    let (idx, _) = DedupIndex::open(dir.path(), config(4 << 10)).unwrap();
    let mut errors = 0;
    for (i, e) in expected.iter().enumerate() {
        match idx.candidates(&key(i as u64), 1000) {
            Ok(found) => assert_eq!(found, vec![*e], "key {i} answered wrongly"),
            Err(DedupError::Corrupt { path, .. }) => {
                assert_eq!(&path, biggest);
                errors += 1;
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    // Every other key of the 113-record block hits the bad CRC.
    assert!(errors >= 100, "{errors} errors");
}

#[test]
fn corrupt_run_footer_or_header_is_an_error_on_open() {
    for pos_from_end in [30u64, 0] {
        let dir = tempfile::tempdir().unwrap();
        spilled_index(dir.path());
        let file = run_files(dir.path()).pop().unwrap();
        let len = fs::metadata(&file).unwrap().len();
        let pos = if pos_from_end == 0 {
            10
        } else {
            len - pos_from_end
        };
        flip_byte(&file, pos);
        let err = DedupIndex::open(dir.path(), config(4 << 10)).unwrap_err();
        assert!(matches!(err, DedupError::Corrupt { .. }), "{err}");
    }
}

#[test]
fn corrupt_or_incomplete_checkpoint_is_an_error_on_open() {
    let dir = tempfile::tempdir().unwrap();
    spilled_index(dir.path());
    flip_byte(&dir.path().join("MANIFEST"), 14);
    assert!(matches!(
        DedupIndex::open(dir.path(), config(4 << 10)),
        Err(DedupError::Corrupt { .. })
    ));

    let dir = tempfile::tempdir().unwrap();
    spilled_index(dir.path());
    fs::remove_file(run_files(dir.path()).pop().unwrap()).unwrap();
    assert!(matches!(
        DedupIndex::open(dir.path(), config(4 << 10)),
        Err(DedupError::Io { .. })
    ));
}

#[test]
fn leftover_files_from_an_interrupted_checkpoint_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, expected) = spilled_index(dir.path());
    fs::write(dir.path().join("MANIFEST.tmp"), b"half").unwrap();
    let orphan = dir.path().join("run-00000000000000009999.cbr");
    fs::write(&orphan, b"torn").unwrap();
    let (idx, _) = DedupIndex::open(dir.path(), config(4 << 10)).unwrap();
    assert!(!orphan.exists());
    assert!(!dir.path().join("MANIFEST.tmp").exists());
    assert_eq!(idx.candidates(&key(7), 1000).unwrap(), vec![expected[7]]);
}

#[test]
fn fingerprint_collisions_are_returned_as_several_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let fp = 0xDEAD_BEEF;
    let a = DedupEntry {
        partition: 0,
        offset: 10,
        body_hash: 1,
        timestamp_ms: 1000,
    };
    let b = DedupEntry {
        partition: 2,
        offset: 3,
        body_hash: 2,
        timestamp_ms: 1001,
    };
    {
        let (mut idx, _) = DedupIndex::open(dir.path(), config(4 << 10)).unwrap();
        idx.insert_by_fingerprint(fp, a).unwrap();
        // Push `a` to disk (tiny budget), keep `b` in memory: both are still found.
        for i in 0..2000 {
            idx.insert(
                &key(i),
                DedupEntry {
                    offset: 100 + i,
                    ..a
                },
            )
            .unwrap();
        }
        idx.insert_by_fingerprint(fp, b).unwrap();
        assert!(idx.disk_runs() >= 1);
        assert_eq!(idx.candidates_by_fingerprint(fp, 1001).unwrap(), vec![a, b]);
        idx.checkpoint().unwrap();
    }
    let (idx, _) = DedupIndex::open(dir.path(), config(1 << 20)).unwrap();
    assert_eq!(idx.candidates_by_fingerprint(fp, 1001).unwrap(), vec![a, b]);
    assert!(
        idx.candidates_by_fingerprint(fp + 1, 1001)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn memory_per_key_is_measured_and_under_64_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut idx, _) = DedupIndex::open(dir.path(), config(1 << 30)).unwrap();
    let mut log = FakeLog::default();
    let n = 400_000;
    for i in 0..n {
        publish(&mut idx, &mut log, i, 1000);
    }
    assert_eq!(idx.disk_runs(), 0);
    let per_key = idx.memory_bytes() as f64 / n as f64;
    assert!(per_key <= 64.0, "{per_key:.1} bytes per key");
    assert!(
        per_key >= 36.0,
        "{per_key:.1} bytes per key is below the record size"
    );
}
