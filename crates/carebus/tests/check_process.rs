//! Guards `carebus check`: on a data directory whose partition log has a flipped byte
//! in a sealed segment it reports the damaged file and exits 7; on an intact one it
//! exits 0; an unfinished write at the end of a log is reported but is not damage; a
//! missing directory is a clear error (exit 1). It changes nothing it reads.
//! And: a flipped byte in acknowledged messages of the active segment (published over
//! HTTP, acknowledged as fsynced) stops `carebus serve` with an error naming the
//! segment instead of cutting them, `check` reports it as damage, and once the bytes
//! are repaired the server serves every message again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use carebus_log::{Log, LogConfig, Record, Retention};
use common::{Server, carebus, curl, serve_until_exit};

fn build(dir: &std::path::Path) -> std::path::PathBuf {
    let part = dir.join("topics/lab/0");
    let cfg = LogConfig {
        segment_bytes: 4096,
        retention: Retention::default(),
        ..LogConfig::default()
    };
    let (log, _) = Log::open(&part, cfg).unwrap();
    for i in 0..100 {
        log.append_blocking(&[Record::new(format!("result {i} {}", "x".repeat(100)))])
            .unwrap();
    }
    drop(log);
    part
}

/// `carebus check --data-dir DIR` (text output), run to its end.
fn check(data_dir: &std::path::Path) -> std::process::Output {
    carebus()
        .args(["check", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap()
}

fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn check_reports_damage_in_sealed_segments_and_passes_intact_data() {
    let dir = tempfile::tempdir().unwrap();
    let part = build(dir.path());
    let out = carebus()
        .args(["check", "--json", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["clean"], true);
    assert_eq!(v["logs"][0]["records"], 100);

    // An unfinished write at the end of the active segment: reported, not damage.
    let segs = segments(&part);
    let mut tail = std::fs::OpenOptions::new()
        .append(true)
        .open(segs.last().unwrap())
        .unwrap();
    std::io::Write::write_all(&mut tail, &[9u8; 10]).unwrap();
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unfinished write"));

    // A flipped byte in a sealed segment: damage, named, exit 7, file unchanged.
    let first = &segs[0];
    let mut bytes = std::fs::read(first).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(first, &bytes).unwrap();
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(7));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("DAMAGED") && text.contains(first.file_name().unwrap().to_str().unwrap()),
        "{text}"
    );
    assert_eq!(
        std::fs::read(first).unwrap(),
        bytes,
        "check must not change what it reads"
    );

    let out = carebus()
        .args(["check", "--data-dir", "/nonexistent/carebus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a carebus data directory"));
}

#[test]
fn damaged_acknowledged_data_in_the_active_segment_stops_serve_instead_of_being_cut() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let (code, _) = curl(&["-s", "-X", "PUT", &server.url("/v1/topics/lab")]);
    assert_eq!(code, 201);
    for i in 0..20 {
        let (code, body) = curl(&[
            "-s",
            "-X",
            "POST",
            "-H",
            &format!("Idempotency-Key: LAB|{i:04}"),
            "--data-binary",
            &format!(
                "MSH|^~\\&|LAB|RL|EMR|NG|20261207||ORU^R01|{i:04}|P|2.5.1\r{}",
                "x".repeat(300)
            ),
            &server.url("/v1/topics/lab/messages"),
        ]);
        assert_eq!(code, 201, "{body}");
        assert!(body.contains("fsynced"), "{body}");
    }
    assert!(server.terminate().success());
    let part = dir.path().join("topics/lab/0");
    let active = segments(&part).pop().unwrap();
    let original = std::fs::read(&active).unwrap();
    let mut damaged = original.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x08;
    std::fs::write(&active, &damaged).unwrap();

    let (out, _) = serve_until_exit(dir.path());
    assert!(
        !out.status.success(),
        "serve started on damaged acknowledged data"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(active.file_name().unwrap().to_str().unwrap()) && err.contains("durable"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&active).unwrap(),
        damaged,
        "serve changed the damaged segment"
    );

    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(7));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("DAMAGED") && text.contains("durable"),
        "{text}"
    );

    // Repaired (the original bytes restored, as from a replica or a backup): all 20 back.
    std::fs::write(&active, &original).unwrap();
    let server = Server::start(dir.path(), &[]);
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let (code, body) = curl(&["-s", &server.url("/v1/topics/lab")]);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["end_offsets"][0], 20, "{body}");
    let (code, body) = curl(&["-s", &server.url("/v1/topics/lab/messages/0/19")]);
    assert_eq!(code, 200, "{body}");
    assert!(server.terminate().success());
}
