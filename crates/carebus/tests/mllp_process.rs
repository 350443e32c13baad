//! Guards HL7 v2 over MLLP on the real binary, driven by an independent HL7 client
//! (`mllp_send` from Python's `hl7` package, installed by `scripts/test.sh`): every valid
//! sample is acknowledged with MSA-2 = its MSH-10 and stored exactly once in
//! `hl7.<type>`; sending everything again gets byte-identical ACKs and stores nothing;
//! invalid samples get negative ACKs and store nothing; a batch is acknowledged per
//! message; one patient's ADT messages stay in order in one partition; and after a
//! restart a resend is still recognised.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Server, curl};

fn mllp_send() -> Option<PathBuf> {
    match std::env::var("CAREBUS_TEST_PYTHON") {
        Ok(py) => Some(Path::new(&py).with_file_name("mllp_send")),
        Err(_) if std::env::var("CI").is_ok() => {
            panic!("CAREBUS_TEST_PYTHON is not set: run the tests with scripts/test.sh")
        }
        Err(_) => None,
    }
}

fn fixtures(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/hl7")
        .join(kind);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Sends one framed message with mllp_send; returns what it printed (the ACKs).
fn send(tool: &Path, addr: SocketAddr, message: &[u8], dir: &Path) -> String {
    let file = dir.join("msg.mllp");
    let mut framed = vec![0x0b];
    framed.extend_from_slice(message);
    framed.extend_from_slice(&[0x1c, 0x0d]);
    std::fs::write(&file, framed).unwrap();
    let out = Command::new(tool)
        .args(["-p", &addr.port().to_string(), "-f"])
        .arg(&file)
        .arg(addr.ip().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mllp_send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends one framed message over a plain TCP socket and returns the first reply.
fn raw_send(addr: SocketAddr, message: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut framed = vec![0x0b];
    framed.extend_from_slice(message);
    framed.extend_from_slice(&[0x1c, 0x0d]);
    s.write_all(&framed).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..1000 {
        if let Some(end) = buf.windows(2).position(|w| w == [0x1c, 0x0d]) {
            return String::from_utf8_lossy(&buf[1..end]).into_owned();
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed without a reply");
        buf.extend_from_slice(&chunk[..n]);
    }
    panic!("no complete reply");
}

fn msa(ack: &str) -> (String, String) {
    let seg = ack
        .split(['\r', '\n'])
        .find(|s| s.starts_with("MSA|"))
        .unwrap_or_else(|| panic!("no MSA in {ack:?}"));
    let f: Vec<&str> = seg.split('|').collect();
    (
        f.get(1).unwrap_or(&"").to_string(),
        f.get(2).unwrap_or(&"").to_string(),
    )
}

fn control_id(message: &[u8]) -> String {
    let msh = message.split(|&b| b == b'\r' || b == b'\n').next().unwrap();
    String::from_utf8_lossy(msh)
        .split('|')
        .nth(9)
        .unwrap()
        .to_owned()
}

fn mllp_addr(server: &Server) -> SocketAddr {
    let v = server.wait_log("mllp listening", Duration::from_secs(30));
    v["fields"]["addr"].as_str().unwrap().parse().unwrap()
}

fn stored(server: &Server) -> u64 {
    let (_, body) = curl(&["-s", &server.url("/v1/topics")]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["topics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| {
            let name = t["name"].as_str().unwrap();
            name.starts_with("hl7.") && name != "hl7.conflicts"
        })
        .flat_map(|t| {
            t["end_offsets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o.as_u64().unwrap())
                .collect::<Vec<_>>()
        })
        .sum()
}

#[test]
fn hl7_samples_over_mllp_are_stored_exactly_once_with_stable_acks() {
    let Some(tool) = mllp_send() else {
        eprintln!(
            "NOTICE: mllp_process skipped: CAREBUS_TEST_PYTHON not set (run scripts/test.sh)"
        );
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let addr = mllp_addr(&server);

    let valid = fixtures("valid");
    let mut acks = Vec::new();
    for (name, bytes) in &valid {
        let ack = send(&tool, addr, bytes, scratch.path());
        let (code, acked) = msa(&ack);
        assert!(code == "AA" || code == "CA", "{name}: {code} in {ack:?}");
        assert_eq!(acked, control_id(bytes), "{name}: MSA-2");
        acks.push(ack);
    }
    // conflicting_resend repeats adt_a01_admit's sender and control id: not stored again.
    assert_eq!(stored(&server), valid.len() as u64 - 1);

    for (name, bytes) in fixtures("invalid") {
        // mllp_send cannot carry bytes that are MLLP markers themselves (random binary):
        // those go over a plain socket.
        let ack = if bytes.iter().any(|&b| b == 0x0b || b == 0x1c) {
            raw_send(addr, &bytes)
        } else {
            send(&tool, addr, &bytes, scratch.path())
        };
        assert!(
            ack.contains("MSA|AR") || ack.contains("MSA|CR") || ack.contains("MSA|AE"),
            "{name}: {ack:?}"
        );
        assert!(
            !ack.contains("MSA|AA") && !ack.contains("MSA|CA"),
            "{name} was accepted"
        );
    }
    assert_eq!(
        stored(&server),
        valid.len() as u64 - 1,
        "an invalid sample was stored"
    );

    let (_, batch) = fixtures("batch").remove(0);
    let reply = send(&tool, addr, &batch, scratch.path());
    assert_eq!(
        reply.matches("MSA|AA").count() + reply.matches("MSA|CA").count(),
        3,
        "{reply:?}"
    );
    let after_batch = valid.len() as u64 - 1 + 3;
    assert_eq!(stored(&server), after_batch);

    // Everything again: byte-identical ACKs, nothing new stored.
    for ((name, bytes), first) in valid.iter().zip(&acks) {
        assert_eq!(
            &send(&tool, addr, bytes, scratch.path()),
            first,
            "{name}: resend ACK differs"
        );
    }
    send(&tool, addr, &batch, scratch.path());
    assert_eq!(stored(&server), after_batch);

    // One patient's ADT messages (A01, A08, A03) in one partition, in sending order.
    let (_, body) = curl(&["-s", &server.url("/v1/topics/hl7.adt")]);
    let topic: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut mrn100234 = Vec::new();
    for (p, end) in topic["end_offsets"].as_array().unwrap().iter().enumerate() {
        for o in 0..end.as_u64().unwrap() {
            let (_, m) = curl(&[
                "-s",
                &server.url(&format!("/v1/topics/hl7.adt/messages/{p}/{o}")),
            ]);
            let m: serde_json::Value = serde_json::from_str(&m).unwrap();
            if m["partition_key"]
                .as_str()
                .is_some_and(|k| k.contains("MRN100234"))
            {
                mrn100234.push((p, o, m["idempotency_key"].as_str().unwrap().to_owned()));
            }
        }
    }
    let partitions: std::collections::BTreeSet<usize> = mrn100234.iter().map(|x| x.0).collect();
    assert_eq!(partitions.len(), 1, "{mrn100234:?}");
    let order: Vec<String> = mrn100234
        .iter()
        .map(|x| x.2.rsplit('|').next().unwrap().to_owned())
        .collect();
    // Sent in file-name order: admit (a01), discharge (a03), update (a08).
    let expected: Vec<String> = [
        "adt_a01_admit.hl7",
        "adt_a03_discharge.hl7",
        "adt_a08_update.hl7",
    ]
    .iter()
    .map(|n| control_id(&valid.iter().find(|(f, _)| f == n).unwrap().1))
    .collect();
    let positions: Vec<usize> = expected
        .iter()
        .map(|id| {
            order
                .iter()
                .position(|x| x == id)
                .unwrap_or_else(|| panic!("{id} not stored: {order:?}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "stored out of sending order: {order:?}"
    );

    // Restart: the resend is still recognised, with the same ACK.
    assert_eq!(server.terminate().code(), Some(0));
    let server = Server::start(data.path(), &[]);
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let addr = mllp_addr(&server);
    let (name, bytes) = &valid[0];
    assert_eq!(
        &send(&tool, addr, bytes, scratch.path()),
        &acks[0],
        "{name} after restart"
    );
    assert_eq!(stored(&server), after_batch);
    assert_eq!(server.terminate().code(), Some(0));
}
