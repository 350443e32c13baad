//! Guards MLLP ingress settings from the config file on the real binary: an extra
//! listener, a routing rule, the rejects topic and the configured negative-ACK code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Server, curl};

fn fixture(kind: &str, name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/hl7")
            .join(kind)
            .join(name),
    )
    .unwrap()
}

fn exchange(addr: SocketAddr, message: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[&[0x0b][..], message, &[0x1c, 0x0d]].concat())
        .unwrap();
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
    panic!("no reply");
}

fn stored(server: &Server, topic: &str) -> u64 {
    let (code, body) = curl(&["-s", &server.url(&format!("/v1/topics/{topic}"))]);
    if code == 404 {
        return 0;
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["end_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .sum()
}

#[test]
fn ingress_routes_rejects_and_extra_listeners_come_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("carebus.toml");
    std::fs::write(
        &config,
        "[mllp_ingress]\nlisteners = [\"127.0.0.1:0\"]\nrejects_topic = \"hl7.rejects\"\ninvalid_message_ack = \"AE\"\n\
         [[mllp_ingress.routes]]\nmessage_type = \"ADT\"\ntopic = \"adt.all\"\n",
    )
    .unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let addr = |v: serde_json::Value| -> SocketAddr {
        v["fields"]["addr"].as_str().unwrap().parse().unwrap()
    };
    let first = addr(server.wait_log("mllp listening", Duration::from_secs(30)));
    let second = addr(server.wait_log("mllp listening", Duration::from_secs(30)));
    assert_ne!(first, second);

    assert!(exchange(second, &fixture("valid", "adt_a01_admit.hl7")).contains("|NG-ADT-000101"));
    assert!(exchange(first, &fixture("valid", "oru_r01_cbc.hl7")).contains("MSA|"));
    assert_eq!(stored(&server, "adt.all"), 1, "routed by the rule");
    assert_eq!(stored(&server, "hl7.adt"), 0);
    assert_eq!(stored(&server, "hl7.oru"), 1, "no rule: the default route");

    let nak = exchange(first, &fixture("invalid", "missing_message_type.hl7"));
    assert!(nak.contains("MSA|AE"), "{nak}");
    assert_eq!(stored(&server, "hl7.rejects"), 1);
    assert_eq!(server.terminate().code(), Some(0));

    // A bad value is a clear start-up error.
    std::fs::write(&config, "[mllp_ingress]\ninvalid_message_ack = \"AX\"\n").unwrap();
    let out = common::carebus()
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_message_ack must be AE or AR"));
}
