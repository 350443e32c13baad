//! Guards the log's public semantics: dense offsets, atomic batches, reads across
//! segments, limits, retention, group commit and the durability each ack states.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use carebus_log::{Durability, FsyncPolicy, Log, LogConfig, LogError, Record, Retention};

fn small_segments() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        segment_max_age: None,
        retention: Retention::default(),
        ..LogConfig::default()
    }
}

fn rec(i: u64) -> Record {
    Record::new(format!("value-{i}-{}", "x".repeat((i % 97) as usize)))
        .with_key(format!("key-{}", i % 7))
        .with_header("n", i.to_string())
        .with_timestamp(1_000 + i as i64)
}

#[test]
fn offsets_are_dense_and_reads_cross_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (log, report) = Log::open(dir.path(), small_segments()).unwrap();
    assert_eq!(report.next_offset, 0);
    let mut expected = Vec::new();
    let mut next = 0u64;
    for b in 0..60u64 {
        let batch: Vec<Record> = (0..(b % 5 + 1)).map(|j| rec(next + j)).collect();
        let ack = log.append_blocking(&batch).unwrap();
        assert_eq!(ack.base_offset, next);
        assert_eq!(ack.last_offset, next + batch.len() as u64 - 1);
        assert_eq!(ack.durability, Durability::Fsynced);
        next += batch.len() as u64;
        expected.extend(batch);
    }
    assert!(log.segment_count() > 3, "segments: {}", log.segment_count());
    assert_eq!(log.next_offset(), next);
    // Read everything from every starting offset, in small pieces.
    for from in [0u64, 1, 17, next / 2, next - 1] {
        let mut got = Vec::new();
        let mut at = from;
        for _ in 0..1000 {
            let part = log.read(at, 7, usize::MAX).unwrap();
            if part.is_empty() {
                break;
            }
            at = part.last().unwrap().offset + 1;
            got.extend(part);
        }
        assert_eq!(got.len() as u64, next - from);
        for r in &got {
            let e = &expected[r.offset as usize];
            assert_eq!(r.value, e.value);
            assert_eq!(r.key, e.key);
            assert_eq!(r.headers, e.headers);
            assert_eq!(r.timestamp_ms, e.timestamp_ms);
        }
    }
    assert!(log.read(next, 10, usize::MAX).unwrap().is_empty());
    assert!(log.read(next + 100, 10, usize::MAX).unwrap().is_empty());
    // max_bytes stops early but always returns at least one record.
    let one = log.read(0, 100, 1).unwrap();
    assert_eq!(one.len(), 1);
    drop(log);

    let (log, report) = Log::open(dir.path(), small_segments()).unwrap();
    assert_eq!(report.next_offset, next);
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(report.rebuilt_indexes, 0);
    let all = log.read(0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(all.len() as u64, next);
    let ack = log.append_blocking(&[rec(next)]).unwrap();
    assert_eq!(ack.base_offset, next);
}

#[test]
fn limits_give_clear_errors_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        max_record_bytes: 1000,
        max_batch_bytes: 3000,
        ..small_segments()
    };
    let (log, _) = Log::open(dir.path(), cfg).unwrap();
    assert!(matches!(
        log.append_blocking(&[]),
        Err(LogError::EmptyBatch)
    ));
    let big = Record::new(vec![0u8; 2000]);
    match log.append_blocking(&[Record::new("ok"), big]) {
        Err(LogError::RecordTooLarge {
            index: 1,
            limit: 1000,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    let batch: Vec<Record> = (0..5).map(|_| Record::new(vec![1u8; 900])).collect();
    assert!(matches!(
        log.append_blocking(&batch),
        Err(LogError::BatchTooLarge { limit: 3000, .. })
    ));
    assert_eq!(log.next_offset(), 0);
    assert_eq!(
        log.append_blocking(&[Record::new("ok")])
            .unwrap()
            .base_offset,
        0
    );
    assert!(
        Log::open(
            tempfile::tempdir().unwrap().path(),
            LogConfig {
                segment_bytes: 10,
                ..LogConfig::default()
            }
        )
        .is_err()
    );
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, _) = Log::open(dir.path(), small_segments()).unwrap();
    assert!(matches!(
        Log::open(dir.path(), small_segments()),
        Err(LogError::Locked(_))
    ));
}

#[test]
fn retention_by_size_deletes_whole_old_segments_and_keeps_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention: Retention {
            max_age: None,
            max_bytes: Some(10_000),
        },
        ..small_segments()
    };
    let (log, _) = Log::open(dir.path(), cfg.clone()).unwrap();
    for i in 0..200 {
        log.append_blocking(&[Record::new(vec![b'a'; 200]).with_header("i", format!("{i}"))])
            .unwrap();
    }
    let before = log.segment_count();
    let report = log.enforce_retention(carebus_log::now_ms()).unwrap();
    assert!(report.deleted_segments > 0);
    assert_eq!(log.segment_count(), before - report.deleted_segments);
    assert!(
        log.size_bytes() <= 10_000 + 4096,
        "size {}",
        log.size_bytes()
    );
    let start = log.start_offset();
    assert_eq!(start, report.start_offset);
    assert!(start > 0);
    assert!(
        matches!(log.read(0, 1, 1), Err(LogError::OffsetOutOfRange { requested: 0, start: s }) if s == start)
    );
    let rest = log.read(start, usize::MAX, usize::MAX).unwrap();
    assert_eq!(rest.first().unwrap().offset, start);
    assert_eq!(rest.last().unwrap().offset, 199);
    for r in &rest {
        assert_eq!(r.headers[0].1, Bytes::from(r.offset.to_string()));
    }
    drop(log);
    let (log, report) = Log::open(dir.path(), cfg).unwrap();
    assert_eq!(report.start_offset, start);
    assert_eq!(log.next_offset(), 200);
}

#[test]
fn retention_by_age_uses_the_newest_timestamp_of_each_segment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention: Retention {
            max_age: Some(Duration::from_secs(60)),
            max_bytes: None,
        },
        ..small_segments()
    };
    let (log, _) = Log::open(dir.path(), cfg).unwrap();
    let now = carebus_log::now_ms();
    for i in 0..100 {
        log.append_blocking(&[Record::new(vec![b'o'; 300]).with_timestamp(now - 3_600_000 + i)])
            .unwrap();
    }
    let old_end = log.next_offset();
    for _ in 0..10 {
        log.append_blocking(&[Record::new(vec![b'n'; 300]).with_timestamp(now)])
            .unwrap();
    }
    let report = log.enforce_retention(now).unwrap();
    assert!(report.deleted_segments > 0);
    // Every remaining old record shares a segment with a new one, or is in the active one.
    let start = log.start_offset();
    assert!(start <= old_end);
    let rest = log.read(start, usize::MAX, usize::MAX).unwrap();
    assert!(rest.iter().filter(|r| r.timestamp_ms == now).count() == 10);
    // Nothing young is ever deleted.
    assert_eq!(log.enforce_retention(now).unwrap().deleted_segments, 0);
}

#[test]
fn concurrent_appenders_share_fsyncs_and_get_distinct_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), LogConfig::default()).unwrap();
    let log = Arc::new(log);
    let threads: Vec<_> = (0..32)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| {
                        let ack = log
                            .append_blocking(&[Record::new(format!("{t}:{i}"))])
                            .unwrap();
                        (ack.base_offset, format!("{t}:{i}"))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked: Vec<(u64, String)> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    acked.sort();
    assert_eq!(acked.len(), 1600);
    for (i, (off, _)) in acked.iter().enumerate() {
        assert_eq!(*off, i as u64);
    }
    for (off, value) in &acked {
        let r = log.read(*off, 1, usize::MAX).unwrap();
        assert_eq!(r[0].value, Bytes::from(value.clone()));
    }
    let stats = log.stats();
    assert_eq!(stats.batches, 1600);
    assert!(
        stats.fsyncs < stats.batches,
        "group commit did not share fsyncs: {stats:?}"
    );
}

#[test]
fn interval_policy_acks_say_buffered_and_sync_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        fsync: FsyncPolicy::Interval(Duration::from_millis(50)),
        ..small_segments()
    };
    let (log, _) = Log::open(dir.path(), cfg).unwrap();
    let ack = log.append_blocking(&[Record::new("a")]).unwrap();
    assert_eq!(ack.durability, Durability::Buffered);
    log.sync_blocking().unwrap();
    assert!(log.stats().fsyncs >= 1);
    assert_eq!(log.read(0, 1, 1).unwrap()[0].value, Bytes::from("a"));
}

#[tokio::test]
async fn async_append_and_watch_report_new_data() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), small_segments()).unwrap();
    let mut watch = log.watch();
    assert_eq!(*watch.borrow_and_update(), 0);
    let ack = log
        .append(&[Record::new("x"), Record::new("y")])
        .await
        .unwrap();
    assert_eq!((ack.base_offset, ack.last_offset), (0, 1));
    tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*watch.borrow(), 2);
    log.sync().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_append_steps_run_in_log_order_even_when_the_appender_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), LogConfig::default()).unwrap();
    let log = Arc::new(log);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let (log, seen) = (Arc::clone(&log), Arc::clone(&seen));
        tasks.push(tokio::spawn(async move {
            let after: carebus_log::AfterAppend = Box::new(move |ack| {
                seen.lock().unwrap().push(ack.base_offset);
                Ok(())
            });
            let batch = [rec(i), rec(i)];
            let append = log.append_then(&batch, after);
            if i % 3 == 0 {
                // Give up at once: the batch is queued, so its step must still run.
                let _ = tokio::time::timeout(Duration::ZERO, append).await;
            } else {
                append.await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    log.sync().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let expected: Vec<u64> = (0..200).map(|i| i * 2).collect();
    assert_eq!(
        seen, expected,
        "every durable batch's step ran once, in log order"
    );

    // A failing step: the batch stays stored, the appender hears why.
    let failing: carebus_log::AfterAppend = Box::new(|_| Err("index full".into()));
    let err = log
        .append_then(&[Record::new("z")], failing)
        .await
        .unwrap_err();
    assert!(matches!(err, LogError::AfterAppend(_)), "{err}");
    assert_eq!(log.next_offset(), 401);
    assert_eq!(
        log.read(400, 1, 1 << 20).unwrap()[0].value,
        Bytes::from("z")
    );

    // A refused append drops its step unrun.
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&ran);
    let never: carebus_log::AfterAppend = Box::new(move |_| {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    });
    assert!(log.append_then(&[], never).await.is_err());
    assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_appender_is_synced_by_the_writer_and_a_crowd_by_the_syncer() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), LogConfig::default()).unwrap();
    let log = Arc::new(log);
    let opened = log.stats();
    // One appender at a time: every append finds the syncer idle and is fsynced by
    // the writer itself, still before its acknowledgement.
    for i in 0..20u64 {
        let ack = log.append(&[rec(i)]).await.unwrap();
        assert_eq!(ack.base_offset, i);
        assert_eq!(ack.durability, Durability::Fsynced);
    }
    let lone = log.stats();
    assert_eq!(
        (lone.fsyncs - opened.fsyncs, lone.inline_syncs),
        (20, 20),
        "{opened:?} {lone:?}"
    );
    // Many appenders at once: groups larger than the inline bound go to the syncer.
    // (Bounded retries: how the crowd splits into groups depends on timing.)
    let mut next = 20u64;
    for _ in 0..20 {
        let appends = (next..next + 256).map(|i| {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.append(&[rec(i)]).await })
        });
        let acks = join_appends(appends).await;
        for ack in &acks {
            assert_eq!(ack.durability, Durability::Fsynced);
        }
        next += 256;
        let s = log.stats();
        if s.fsyncs > s.inline_syncs {
            break;
        }
    }
    let crowd = log.stats();
    assert!(crowd.fsyncs > crowd.inline_syncs, "{crowd:?}");
    assert_eq!(crowd.records, next);
    // Whoever synced, the log holds every record once, in offset order.
    let all = log.read(0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(all.len() as u64, next);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
    }
}

async fn join_appends(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<carebus_log::Result<carebus_log::AppendAck>>>,
) -> Vec<carebus_log::AppendAck> {
    let handles: Vec<_> = tasks.collect();
    let mut acks = Vec::with_capacity(handles.len());
    for h in handles {
        acks.push(h.await.unwrap().unwrap());
    }
    acks
}

#[test]
fn an_idle_writer_fills_ahead_of_the_data_and_a_reopen_keeps_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let segment = dir.path().join("00000000000000000000.log");
    let (log, _) = Log::open(dir.path(), LogConfig::default()).unwrap();
    // ~300 KiB of data: past the first fill's first chunks, so the idle writer fills on.
    let body = "x".repeat(1000);
    let batches: Vec<Vec<Record>> = (0..30u64)
        .map(|b| {
            (0..10)
                .map(|i| Record::new(format!("{}-{body}", b * 10 + i)))
                .collect()
        })
        .collect();
    for batch in &batches {
        log.append_blocking(batch).unwrap();
    }
    let data_end = log.stats().bytes_written;
    let mut filled = log.stats();
    for _ in 0..1000 {
        filled = log.stats();
        let size = std::fs::metadata(&segment).unwrap().len();
        if filled.fill_syncs > 0 && size >= data_end + (1 << 20) - (128 << 10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(filled.fill_syncs > 0, "{filled:?}");
    let size = std::fs::metadata(&segment).unwrap().len();
    assert!(
        size > data_end + (512 << 10),
        "size {size}, data {data_end}"
    );
    assert!(
        size <= data_end + (1 << 20) + 4096,
        "size {size}, data {data_end}"
    );
    // Fills are not appends' fdatasyncs.
    assert_eq!(filled.fsyncs, log.stats().fsyncs);
    drop(log);
    // The zeros after the last batch are preallocation: a reopen keeps every record
    // and appends after them.
    let (log, report) = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert_eq!(report.next_offset, 300);
    let ack = log.append_blocking(&[Record::new("after")]).unwrap();
    assert_eq!(ack.base_offset, 300);
    let all = log.read(0, usize::MAX, usize::MAX).unwrap();
    assert_eq!(all.len(), 301);
    for (i, r) in all.iter().take(300).enumerate() {
        assert_eq!(r.offset, i as u64);
        assert_eq!(r.value, Bytes::from(format!("{i}-{body}")));
    }
    assert_eq!(all[300].value, Bytes::from_static(b"after"));
}
