//! Guards the full-disk behaviour of the real binary: with its data directory on a
//! small tmpfs, publishes eventually get 507 `storage_full` (a clear error, never a
//! 5xx crash or a silent loss), the server keeps serving, every acknowledged publish is
//! still there after a restart, and publishing works again by itself once space
//! returns. Needs root to mount the tmpfs; without it the test says so and stops.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, curl};

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap().keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn publish(server: &Server, key: &str) -> (u16, String) {
    curl(&[
        "-s",
        "-X",
        "POST",
        "-H",
        &format!("Idempotency-Key: {key}"),
        "--data-binary",
        &"r".repeat(1024),
        &server.url("/v1/topics/full/messages"),
    ])
}

/// Publishes 20 keyed 1 KiB messages in one atomic batch.
fn publish_batch(server: &Server, first: usize) -> (u16, String) {
    let messages: Vec<serde_json::Value> = (first..first + 20)
        .map(|i| serde_json::json!({"body": "r".repeat(1024), "idempotency_key": format!("k-{i:06}")}))
        .collect();
    curl(&[
        "-s",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "--data-binary",
        &serde_json::json!({ "messages": messages }).to_string(),
        &server.url("/v1/topics/full/messages:batch"),
    ])
}

fn stored(server: &Server) -> u64 {
    let (_, body) = curl(&["-s", &server.url("/v1/topics/full")]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["end_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .sum()
}

#[test]
fn a_full_disk_gives_507_loses_nothing_acknowledged_and_heals_when_space_returns() {
    let Some(fs) = Tmpfs::mount("8m") else {
        eprintln!("NOTICE: disk_full_process skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let data = fs.0.join("data");
    // Space we can give back later.
    let filler = fs.0.join("filler");
    std::fs::write(&filler, vec![0u8; 3 << 20]).unwrap();

    let server = Server::start(&data, &[]);
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let (code, _) = curl(&["-s", "-X", "PUT", &server.url("/v1/topics/full")]);
    assert_eq!(code, 201);

    let mut acked = Vec::new();
    let mut full = None;
    let t0 = Instant::now();
    for batch in 0..2_000 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the disk never filled"
        );
        let (code, body) = publish_batch(&server, batch * 20);
        match code {
            201 => acked.extend((batch * 20..batch * 20 + 20).map(|i| format!("k-{i:06}"))),
            507 => {
                full = Some(body);
                break;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    let body = full.expect("no 507 before the limit");
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["code"], "storage_full");
    assert!(
        acked.len() > 100,
        "only {} stored before the disk was full",
        acked.len()
    );
    // Still serving, and refusing again while full; nothing half-stored.
    assert_eq!(curl(&["-s", &server.url("/healthz")]).0, 200);
    assert_eq!(publish(&server, "while-full").0, 507);
    assert_eq!(stored(&server), acked.len() as u64);

    // Space returns: publishing works again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let (code, body) = publish(&server, "after-space-returned");
    assert_eq!(code, 201, "{body}");
    acked.push("after-space-returned".into());

    // Every acknowledged publish survives a restart, exactly once.
    let _ = server.terminate();
    let server = Server::start(&data, &[]);
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    assert_eq!(stored(&server), acked.len() as u64);
    for key in [
        &acked[0],
        &acked[acked.len() / 2],
        &acked[acked.len() - 2],
        &acked[acked.len() - 1],
    ] {
        let (code, _) = curl(&[
            "-s",
            &server.url(&format!("/v1/topics/full/messages?idempotency_key={key}")),
        ]);
        assert_eq!(code, 200, "{key} lost");
        // A resend is a duplicate, not a second copy.
        assert_eq!(publish(&server, key).0, 200);
    }
    assert_eq!(stored(&server), acked.len() as u64);
    let _ = server.terminate();
    let _ = Path::new(&fs.0);
}
