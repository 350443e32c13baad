//! Guards the full-disk behaviour of the real binary: with its data directory on a
//! small tmpfs, publishes eventually get 507 `storage_full` (a clear error, never a
//! 5xx crash or a silent loss), the server keeps serving, every acknowledged publish is
//! still there after a restart, and publishing works again by itself once space
//! returns. Over MLLP the same: a negative ACK while full (never AA), and the resent
//! message is stored once when space returns. Needs root to mount the tmpfs; without it
//! the test says so and stops.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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

/// Sends one ORU^R01 (with an 8 KiB report text, so the disk fills quickly) over MLLP
/// and returns its ACK's MSA-1.
fn mllp_send(addr: SocketAddr, control_id: &str) -> String {
    let message = format!(
        "MSH|^~\\&|LAB|FULLDISK|EMR|HOSP|20261124120000||ORU^R01^ORU_R01|{control_id}|P|2.5.1\r\
         PID|1||MRN-FULL^^^HOSP^MR||Doe^Pat\r\
         OBX|1|TX|RPT^Report||{}||||||F\r",
        "w".repeat(8192)
    );
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut frame = vec![0x0b];
    frame.extend_from_slice(message.as_bytes());
    frame.extend_from_slice(&[0x1c, 0x0d]);
    stream.write_all(&frame).unwrap();
    let mut ack = Vec::new();
    let mut buf = [0u8; 4096];
    while !ack.ends_with(&[0x1c, 0x0d]) {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed without an ACK");
        ack.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&ack).into_owned();
    let msa = text
        .split('\r')
        .find(|s| s.starts_with("MSA|"))
        .unwrap_or_else(|| panic!("no MSA in {text:?}"));
    let fields: Vec<&str> = msa.split('|').collect();
    assert_eq!(fields[2], control_id, "ACK for another message: {msa}");
    fields[1].to_owned()
}

fn hl7_stored(server: &Server) -> u64 {
    let (_, body) = curl(&["-s", &server.url("/v1/topics/hl7.oru")]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["end_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .sum()
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
    let mllp: SocketAddr =
        server.wait_log("mllp listening", Duration::from_secs(30))["fields"]["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    // The HL7 topic exists before the disk fills.
    assert_eq!(mllp_send(mllp, "FULL-0001"), "AA");

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
    // MLLP: the HL7 topic's log still has room in its preallocated segment, so keep
    // sending until it is full too; then a negative ACK (never AA) and nothing stored.
    let mut hl7_acked = 1u64;
    let mut refused = None;
    for i in 0..2_000 {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "MLLP never refused"
        );
        let control_id = format!("FULL-{:05}", i + 2);
        match mllp_send(mllp, &control_id).as_str() {
            "AA" => hl7_acked += 1,
            "AE" | "AR" => {
                refused = Some(control_id);
                break;
            }
            other => panic!("MSA-1 {other} for {control_id}"),
        }
    }
    let refused = refused.expect("MLLP never refused a message on a full disk");
    eprintln!("MLLP on the full disk: {hl7_acked} AA, then {refused} refused");
    assert_eq!(hl7_stored(&server), hl7_acked);

    // Space returns: publishing works again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let (code, body) = publish(&server, "after-space-returned");
    assert_eq!(code, 201, "{body}");
    acked.push("after-space-returned".into());
    // The HL7 sender resends the refused message: stored now, once.
    assert_eq!(mllp_send(mllp, &refused), "AA");
    assert_eq!(mllp_send(mllp, &refused), "AA");
    hl7_acked += 1;
    assert_eq!(hl7_stored(&server), hl7_acked);

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
    assert_eq!(hl7_stored(&server), hl7_acked);
    let _ = server.terminate();
    let _ = Path::new(&fs.0);
}
