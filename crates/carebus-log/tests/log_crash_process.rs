//! Guards durability against a real process crash: a child process appends from
//! several threads and prints each acknowledgement; the parent SIGKILLs it at a random
//! moment, reopens the log and checks that every acknowledged record is present,
//! intact and at its acknowledged offset. Several rounds run on the same directory.
//!
//! The child is this same test binary, re-run with `CAREBUS_LOG_CRASH_CHILD` set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carebus_log::{Log, LogConfig, Record, Retention};

const CHILD_ENV: &str = "CAREBUS_LOG_CRASH_CHILD";

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes: 64 * 1024,
        retention: Retention::default(),
        ..LogConfig::default()
    }
}

fn value(round: u32, thread: u32, seq: u32) -> String {
    let body = format!("r{round}-t{thread}-s{seq}-");
    let pad = "z".repeat((seq as usize * 37) % 900);
    format!("{body}{pad}")
}

/// Runs only as the child: appends until killed.
#[test]
#[ignore = "child process of log_crash_process_kill_and_recover"]
fn crash_child_append_loop() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u32 = std::env::var("CAREBUS_LOG_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let (log, _) = Log::open(&dir, cfg()).unwrap();
    let log = Arc::new(log);
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let handles: Vec<_> = (0..8u32)
        .map(|t| {
            let log = Arc::clone(&log);
            let out = Arc::clone(&out);
            std::thread::spawn(move || {
                // Bounded: the parent kills us long before this ends.
                for seq in 0..200_000u32 {
                    let n = 1 + seq % 3;
                    let batch: Vec<Record> = (0..n)
                        .map(|j| Record::new(value(round, t, seq * 4 + j)))
                        .collect();
                    let ack = log.append_blocking(&batch).unwrap();
                    let mut o = out.lock().unwrap();
                    for j in 0..n {
                        writeln!(
                            o,
                            "ACK {} {} END",
                            ack.base_offset + u64::from(j),
                            value(round, t, seq * 4 + j)
                        )
                        .unwrap();
                    }
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// A tiny xorshift generator so the schedule is reproducible from a printed seed.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn log_crash_process_kill_and_recover() {
    let mut seed: u64 = std::env::var("CAREBUS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) * 2_654_435_761 + 1);
    println!("crash test seed: {seed} (set CAREBUS_CRASH_SEED to reproduce)");
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut total_truncated = 0u64;
    for round in 0..6u32 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_append_loop",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("CAREBUS_LOG_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // A line cut short by the kill lacks its END marker and is ignored.
                if line.starts_with("ACK ") && line.ends_with(" END") && tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for the first acknowledgement (readiness), then kill after a random delay.
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("child never acknowledged an append");
        let delay = Duration::from_millis(20 + next(&mut seed) % 400);
        let started = Instant::now();
        let mut lines = vec![first];
        while started.elapsed() < delay {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(5)) {
                lines.push(l);
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        for l in &lines {
            let mut parts = l.splitn(3, ' ');
            parts.next();
            let off: u64 = parts.next().unwrap().parse().unwrap();
            let val = parts.next().unwrap().trim_end_matches(" END").to_owned();
            if let Some(prev) = acked.insert(off, val.clone()) {
                panic!("offset {off} acknowledged twice: {prev} and {val}");
            }
        }
        let (log, report) = Log::open(dir.path(), cfg()).unwrap();
        total_truncated += report.truncated_bytes;
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        let all = log.read(0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(all.len() as u64, log.next_offset());
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
        }
        for (off, val) in &acked {
            let r = all
                .get(*off as usize)
                .unwrap_or_else(|| panic!("acknowledged offset {off} lost in round {round}"));
            assert_eq!(
                std::str::from_utf8(&r.value).unwrap(),
                val,
                "offset {off} changed"
            );
        }
        println!(
            "round {round}: {} acknowledged so far, {} stored, {} bytes of torn tail cut",
            acked.len(),
            all.len(),
            report.truncated_bytes
        );
        drop(log);
    }
    assert!(
        acked.len() > 100,
        "too few acknowledgements to mean anything: {}",
        acked.len()
    );
    println!("total torn bytes cut over all rounds: {total_truncated}");
}
