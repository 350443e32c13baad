//! Guards recovery: torn and corrupt tails are cut and reported, bit flips in sealed
//! segments are errors on read (never data), a bad batch in the active segment before
//! its synced mark refuses the open (acknowledged data is never cut), crashes during a segment roll or an index
//! write are repaired, and recovery only scans the active segment.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use carebus_log::{Log, LogConfig, LogError, Record, Retention};

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 200,
        segment_max_age: None,
        retention: Retention::default(),
        ..LogConfig::default()
    }
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

fn fill(log: &Log, n: u64) {
    for i in 0..n {
        log.append_blocking(&[Record::new(format!("record-{i:05}-{}", "p".repeat(100)))])
            .unwrap();
    }
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

/// Flips the bits `mask` of the byte at `at` (counted from the end when negative) of
/// `path`, and returns the file's new content.
fn flip(path: &Path, at: isize, mask: u8) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    let i = if at < 0 {
        bytes.len() - at.unsigned_abs()
    } else {
        at.unsigned_abs()
    };
    bytes[i] ^= mask;
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// Opens the log expecting recovery to refuse it as damaged: the bad position and why.
fn expect_refused(dir: &Path) -> (u64, String) {
    match Log::open(dir, cfg()) {
        Err(LogError::Corrupt {
            position, reason, ..
        }) => (position, reason),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a log missing or with damaged acknowledged records was opened"),
    }
}

#[test]
fn a_torn_tail_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), cfg()).unwrap();
    fill(&log, 5);
    drop(log);
    let active = files(dir.path(), "log").pop().unwrap();
    let good_len = std::fs::metadata(&active).unwrap().len();
    // A batch frame whose length says 500 bytes, of which only 40 reached the disk.
    let mut torn = Vec::new();
    torn.extend_from_slice(&500u32.to_le_bytes());
    torn.extend_from_slice(&[0xAB; 36]);
    append_bytes(&active, &torn);
    let (log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert_eq!(report.truncated_bytes, 40);
    assert!(report.truncation_reason.is_some());
    assert_eq!(std::fs::metadata(&active).unwrap().len(), good_len);
    assert_eq!(log.next_offset(), 5);
    assert_eq!(
        log.append_blocking(&[Record::new("after")])
            .unwrap()
            .base_offset,
        5
    );
    assert_eq!(log.read(0, 100, usize::MAX).unwrap().len(), 6);
}

#[test]
fn zeros_after_the_last_batch_are_cut_but_not_reported_as_torn() {
    // Zeros are what preallocation leaves, or a size update that reached the disk
    // before its data: no batch was there.
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), cfg()).unwrap();
    fill(&log, 3);
    drop(log);
    let active = files(dir.path(), "log").pop().unwrap();
    let good_len = std::fs::metadata(&active).unwrap().len();
    append_bytes(&active, &[0u8; 1000]);
    let (log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(std::fs::metadata(&active).unwrap().len(), good_len);
    assert_eq!(log.next_offset(), 3);
    // Garbage after zeros is torn data: reported up to its last byte.
    drop(log);
    append_bytes(&active, &[0u8; 100]);
    append_bytes(&active, &[7u8; 5]);
    append_bytes(&active, &[0u8; 50]);
    let (_log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert_eq!(report.truncated_bytes, 105);
}

#[test]
fn an_open_log_preallocates_and_a_clean_close_trims() {
    let dir = tempfile::tempdir().unwrap();
    let big = LogConfig {
        segment_bytes: 8 << 20,
        ..cfg()
    };
    let (log, _) = Log::open(dir.path(), big.clone()).unwrap();
    fill(&log, 3);
    let active = files(dir.path(), "log").pop().unwrap();
    let open_len = std::fs::metadata(&active).unwrap().len();
    assert!(open_len >= 1 << 20, "preallocated {open_len}");
    let data_len = log.size_bytes();
    drop(log);
    assert_eq!(std::fs::metadata(&active).unwrap().len(), data_len);
    // A crash leaves the zeros: recovery cuts them silently.
    let (log, _) = Log::open(dir.path(), big.clone()).unwrap();
    fill(&log, 1);
    let crash_image = std::fs::read(&active).unwrap();
    drop(log);
    std::fs::write(&active, &crash_image).unwrap();
    let (log, report) = Log::open(dir.path(), big).unwrap();
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(log.next_offset(), 4);
}

#[test]
fn without_its_synced_mark_a_bit_flip_in_the_last_batch_of_the_active_segment_drops_that_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), cfg()).unwrap();
    fill(&log, 3);
    log.append_blocking(&[Record::new("a"), Record::new("b")])
        .unwrap();
    drop(log);
    // As after a power loss that lost the mark's write: a bad last batch cannot be told
    // from a torn write, and is cut.
    std::fs::remove_file(dir.path().join(SYNCED_MARK)).unwrap();
    flip(&files(dir.path(), "log").pop().unwrap(), -3, 0x10);
    let (log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert_eq!(log.next_offset(), 3);
    assert_eq!(report.truncated_records, 2);
    assert!(report.truncation_reason.unwrap().contains("checksum"));
}

/// The file the log records its active segment's durable length in.
const SYNCED_MARK: &str = "synced.mark";

#[test]
fn a_bit_flip_in_synced_data_of_the_active_segment_refuses_to_open_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), cfg()).unwrap();
    fill(&log, 6);
    drop(log);
    assert_eq!(files(dir.path(), "log").len(), 1, "one active segment");
    let active = files(dir.path(), "log").pop().unwrap();
    let original = std::fs::read(&active).unwrap();
    let mark = std::fs::read(dir.path().join(SYNCED_MARK)).unwrap();
    // A flipped byte in the middle batch, and (separately) in the last one: both were
    // acknowledged as fsynced, so neither may be cut.
    for at in [original.len() / 2, original.len() - 3] {
        std::fs::write(&active, &original).unwrap();
        let damaged = flip(&active, at as isize, 0x04);
        let (position, reason) = expect_refused(dir.path());
        assert!(
            position <= at as u64,
            "bad batch at {position}, flip at {at}"
        );
        assert!(reason.contains("durable"), "{reason}");
        assert_eq!(
            std::fs::read(&active).unwrap(),
            damaged,
            "the segment was changed"
        );
        assert_eq!(std::fs::read(dir.path().join(SYNCED_MARK)).unwrap(), mark);
        // `carebus check` (verify_dir) names it as damage, not as a torn tail.
        let v = carebus_log::verify_dir(dir.path()).unwrap();
        assert!(!v.is_clean(), "{v:?}");
        assert_eq!(v.torn_tail_bytes, 0);
        assert!(v.problems[0].contains("durable"), "{:?}", v.problems);
    }
    // Repaired (here: the original bytes back), the log opens with every record.
    std::fs::write(&active, &original).unwrap();
    assert!(carebus_log::verify_dir(dir.path()).unwrap().is_clean());
    let (log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(log.next_offset(), 6);
    let recs = log.read(0, 10, usize::MAX).unwrap();
    assert_eq!(recs.len(), 6);
    drop(log);
    // The operator's way to accept the loss instead: without the mark, recovery cuts
    // from the bad batch and reports what it cut.
    flip(&active, (original.len() / 2) as isize, 0x04);
    expect_refused(dir.path());
    std::fs::remove_file(dir.path().join(SYNCED_MARK)).unwrap();
    let (log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert!(log.next_offset() < 6);
    // Counted from the bad batch's own header: the batches after it are not parsed.
    assert!(
        report.truncated_records >= 1 && report.truncated_bytes > 0,
        "{report:?}"
    );
}

#[test]
fn an_active_segment_shorter_than_its_synced_mark_refuses_to_open() {
    // As when an older copy of the segment is put back (or the file was truncated): every
    // batch in it is good, but acknowledged records past its end are gone.
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), cfg()).unwrap();
    fill(&log, 3);
    drop(log);
    let active = files(dir.path(), "log").pop().unwrap();
    let older = std::fs::read(&active).unwrap();
    let (log, _) = Log::open(dir.path(), cfg()).unwrap();
    fill(&log, 3);
    drop(log);
    assert_eq!(files(dir.path(), "log").pop().unwrap(), active, "no roll");
    std::fs::write(&active, &older).unwrap();
    let (position, reason) = expect_refused(dir.path());
    assert_eq!(position, older.len() as u64);
    assert!(reason.contains("ends"), "{reason}");
    let v = carebus_log::verify_dir(dir.path()).unwrap();
    assert!(!v.is_clean(), "{v:?}");
    assert!(v.problems[0].contains("ends"), "{:?}", v.problems);
    assert_eq!(std::fs::read(&active).unwrap(), older);
    // Accepting the older copy: without the mark it opens with its 3 records.
    std::fs::remove_file(dir.path().join(SYNCED_MARK)).unwrap();
    let (log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert_eq!(log.next_offset(), 3);
    assert_eq!(report.truncated_bytes, 0);
}

#[test]
fn a_stale_synced_mark_still_lets_recovery_cut_a_bad_batch_written_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), cfg()).unwrap();
    fill(&log, 3);
    // The mark as a power loss may leave it: from an earlier fdatasync.
    let stale = std::fs::read(dir.path().join(SYNCED_MARK)).unwrap();
    log.append_blocking(&[Record::new("a"), Record::new("b")])
        .unwrap();
    drop(log);
    std::fs::write(dir.path().join(SYNCED_MARK), &stale).unwrap();
    flip(&files(dir.path(), "log").pop().unwrap(), -3, 0x10);
    let (log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert_eq!(log.next_offset(), 3);
    assert_eq!(report.truncated_records, 2);
    // A torn or foreign mark is no mark: the same.
    drop(log);
    log_with_garbage_mark_cuts_the_tail(dir.path());
}

fn log_with_garbage_mark_cuts_the_tail(dir: &Path) {
    let (log, _) = Log::open(dir, cfg()).unwrap();
    log.append_blocking(&[Record::new("c")]).unwrap();
    drop(log);
    std::fs::write(dir.join(SYNCED_MARK), b"CBSM and then something torn").unwrap();
    flip(&files(dir, "log").pop().unwrap(), -1, 0x01);
    let (log, report) = Log::open(dir, cfg()).unwrap();
    assert_eq!(log.next_offset(), 3);
    assert_eq!(report.truncated_records, 1);
}

#[test]
fn corruption_in_a_sealed_segment_is_an_error_on_read_never_data() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), cfg()).unwrap();
    fill(&log, 200);
    drop(log);
    let segs = files(dir.path(), "log");
    assert!(segs.len() >= 3);
    let first = &segs[0];
    let mut bytes = std::fs::read(first).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(first, &bytes).unwrap();
    let (log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert_eq!(
        report.truncated_bytes, 0,
        "a sealed segment is never truncated"
    );
    assert_eq!(log.next_offset(), 200);
    let mut errors = Vec::new();
    let mut good = 0;
    for off in 0..200 {
        match log.read(off, 1, usize::MAX) {
            Ok(r) => {
                assert_eq!(r.len(), 1);
                assert_eq!(r[0].offset, off);
                assert!(
                    r[0].value
                        .starts_with(format!("record-{off:05}-").as_bytes())
                );
                good += 1;
            }
            Err(LogError::Corrupt { .. }) => errors.push(off),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    // The flipped batch fails, and so do the few records after it whose nearest index
    // entry lies before it (a read cannot step over a batch whose length it cannot trust).
    assert!(
        !errors.is_empty() && errors.len() <= 3,
        "errors at {errors:?}"
    );
    assert!(
        errors.windows(2).all(|w| w[1] == w[0] + 1),
        "errors at {errors:?}"
    );
    assert_eq!(good + errors.len(), 200);
    // A read that starts before the bad batch stops with the error rather than skipping it.
    assert!(matches!(
        log.read(0, 200, usize::MAX),
        Err(LogError::Corrupt { .. })
    ));
}

#[test]
fn a_crash_during_a_roll_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), cfg()).unwrap();
    fill(&log, 100);
    drop(log);
    let segs = files(dir.path(), "log");
    let idxs = files(dir.path(), "idx");
    assert_eq!(idxs.len(), segs.len() - 1);
    // Crash after the index of the last sealed segment was written to a temp file only,
    // and the index of an older one is lost.
    std::fs::rename(
        idxs.last().unwrap(),
        idxs.last().unwrap().with_extension("idx.tmp"),
    )
    .unwrap();
    std::fs::remove_file(&idxs[0]).unwrap();
    // And a new segment file whose header never made it.
    let next_base = 100u64;
    let new_seg = dir.path().join(format!("{next_base:020}.log"));
    let last_active = segs.last().unwrap().clone();
    std::fs::write(&new_seg, [0u8; 7]).unwrap();
    // The real roll only creates a new segment when the last one is complete; emulate
    // that by sealing the current active as well: write nothing more into it.
    let (log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert_eq!(report.removed_files, 1, "the temp index is removed");
    assert_eq!(
        report.rebuilt_indexes, 3,
        "two lost indexes and the unsealed previous segment"
    );
    assert_eq!(
        report.truncated_bytes, 7,
        "the headerless new segment is reset"
    );
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(log.next_offset(), 100);
    let all = log.read(0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(all.len(), 100);
    assert!(last_active.exists());
    assert_eq!(
        log.append_blocking(&[Record::new("x")])
            .unwrap()
            .base_offset,
        100
    );
}

#[test]
fn recovery_scans_only_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), cfg()).unwrap();
    fill(&log, 300);
    drop(log);
    let segs = files(dir.path(), "log");
    let active_len = std::fs::metadata(segs.last().unwrap()).unwrap().len();
    let (_log, report) = Log::open(dir.path(), cfg()).unwrap();
    assert_eq!(report.scanned_bytes, active_len);
    assert_eq!(report.segments, segs.len());
    assert_eq!(report.rebuilt_indexes, 0);
}
