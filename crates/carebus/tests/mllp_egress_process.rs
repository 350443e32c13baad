//! Guards MLLP egress configured from the config file on the real binary: HL7 messages
//! that arrive over MLLP are stored, delivered by the `[[mllp_egress]]` binding to an
//! MLLP receiver in order, acknowledged once the receiver's ACK (with the right MSA-2)
//! arrives, and the server still stops cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, curl};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/hl7/valid")
            .join(name),
    )
    .unwrap()
}

fn control_id(message: &[u8]) -> String {
    let msh = message.split(|&b| b == b'\r' || b == b'\n').next().unwrap();
    String::from_utf8_lossy(msh)
        .split('|')
        .nth(9)
        .unwrap()
        .to_owned()
}

/// Reads one MLLP frame (bounded in time by the socket timeout).
fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..10_000 {
        if let Some(end) = buf.windows(2).position(|w| w == [0x1c, 0x0d]) {
            return Some(buf[1..end].to_vec());
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    None
}

fn framed(m: &[u8]) -> Vec<u8> {
    [&[0x0b][..], m, &[0x1c, 0x0d]].concat()
}

/// A receiver that answers AA with MSA-2 = the MSH-10 it got, and records the ids.
fn start_receiver() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&got);
    std::thread::spawn(move || {
        for conn in listener.incoming().take(100) {
            let Ok(mut s) = conn else { continue };
            let record = Arc::clone(&record);
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                while let Some(m) = read_frame(&mut s) {
                    let id = control_id(&m);
                    record.lock().unwrap().push(id.clone());
                    let ack = format!(
                        "MSH|^~\\&|RCV|LAB|CAREBUS|NG|20261124||ACK^R01^ACK|A-{id}|P|2.5.1\rMSA|AA|{id}\r"
                    );
                    if s.write_all(&framed(ack.as_bytes())).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, got)
}

#[test]
fn messages_in_over_mllp_go_out_over_mllp_exactly_as_configured() {
    let (receiver, got) = start_receiver();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("carebus.toml");
    std::fs::write(
        &config,
        format!(
            "[[mllp_egress]]\ntopic = \"hl7.oru\"\nsubscription = \"lab-out\"\ndestination = \"{receiver}\"\nconnections = 2\nack_timeout_ms = 2000\n"
        ),
    )
    .unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let mllp: SocketAddr =
        server.wait_log("mllp listening", Duration::from_secs(30))["fields"]["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();

    let sent = [
        fixture("oru_r01_cbc.hl7"),
        fixture("oru_r01_critical_potassium.hl7"),
    ];
    let mut s = TcpStream::connect(mllp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for m in &sent {
        s.write_all(&framed(m)).unwrap();
        let ack = read_frame(&mut s).unwrap();
        assert!(
            String::from_utf8_lossy(&ack).contains("MSA|AA|")
                || String::from_utf8_lossy(&ack).contains("MSA|CA|")
        );
    }

    let want: Vec<String> = sent.iter().map(|m| control_id(m)).collect();
    let t0 = Instant::now();
    loop {
        let have = got.lock().unwrap().clone();
        if want.iter().all(|id| have.contains(id)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not delivered: have {have:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Acknowledged on the broker side once the receiver's ACK arrived.
    let t0 = Instant::now();
    loop {
        let (_, body) = curl(&[
            "-s",
            &server.url("/v1/topics/hl7.oru/subscriptions/lab-out"),
        ]);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["stats"]["acked"] == 2 && v["stats"]["backlog"] == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not acknowledged: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Each message reached the receiver once (no failures were injected here).
    assert_eq!(got.lock().unwrap().len(), 2);
    assert_eq!(server.terminate().code(), Some(0));
}
