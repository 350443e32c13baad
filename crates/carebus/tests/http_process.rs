//! Guards the HTTP API of the real `carebus serve` process, driven by curl over
//! 127.0.0.1: topic creation, exactly-once publish with Idempotency-Key (201 then 200 at
//! the same position, conflicting resends flagged), partition keys, atomic batches,
//! byte-for-byte read-back of binary and HL7 (CR-separated) bodies, hostile input
//! answered 4xx with `application/problem+json` while the server stays healthy, the
//! `--max-body-bytes` flag, duplicates still detected after a restart on the same data
//! directory (exactly once across restarts), no message bodies in the logs, and exit 0
//! on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Server;
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(30);
const HL7_FIXTURE: &str = "../../fixtures/hl7/valid/adt_a01_admit.hl7";
const HL7_CT: &str = "x-application/hl7-v2+er7";

struct Resp {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts a 4xx problem document with this status and code.
    fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.content_type, "application/problem+json");
        let p = self.json();
        assert_eq!(p["code"], code, "{p}");
        assert_eq!(p["status"], status);
        p
    }
}

/// curl with these arguments; the body is captured as bytes.
fn curl(args: &[&str]) -> Resp {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new("curl")
        .args(["--max-time", "30", "-s", "-o"])
        .arg(out_file.path())
        .args(["-w", "%{http_code} %{content_type}"])
        .args(args)
        .output()
        .expect("curl is installed (the test command installs it)");
    let meta = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, content_type) = meta.split_once(' ').unwrap_or((&meta, ""));
    Resp {
        status: status.trim().parse().unwrap_or(0),
        content_type: content_type.trim().to_owned(),
        body: std::fs::read(out_file.path()).unwrap_or_default(),
    }
}

fn publish_file(server: &Server, topic: &str, file: &Path, headers: &[&str]) -> Resp {
    let mut args: Vec<String> = vec![
        "-X".into(),
        "POST".into(),
        "--data-binary".into(),
        format!("@{}", file.display()),
    ];
    for h in headers {
        args.push("-H".into());
        args.push((*h).to_owned());
    }
    args.push(server.url(&format!("/v1/topics/{topic}/messages")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(&args)
}

fn post_json(server: &Server, path: &str, body: &str) -> Resp {
    curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
        &server.url(path),
    ])
}

fn put_topic(server: &Server, topic: &str, body: &str) -> Resp {
    curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
        &server.url(&format!("/v1/topics/{topic}")),
    ])
}

fn read_back(server: &Server, topic: &str, partition: u64, offset: u64) -> (Value, Vec<u8>) {
    use base64::Engine as _;
    let r = curl(&[&server.url(&format!("/v1/topics/{topic}/messages/{partition}/{offset}"))]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let m = r.json();
    let body = base64::engine::general_purpose::STANDARD
        .decode(m["body_base64"].as_str().unwrap())
        .unwrap();
    (m, body)
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn the_http_api_carries_messages_exactly_once_across_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let hl7 = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(HL7_FIXTURE)).unwrap();
    assert!(
        hl7.contains(&b'\r'),
        "the fixture has CR segment separators"
    );
    let hl7_file = write_file(files.path(), "adt.hl7", &hl7);
    let mut conflicting = hl7.clone();
    conflicting.extend_from_slice(b"ZZZ|changed\r");
    let conflicting_file = write_file(files.path(), "adt-changed.hl7", &conflicting);
    let binary: Vec<u8> = (0..=255u8)
        .chain([0, 0, 0xff, 0xfe, b'\r', b'\n'])
        .collect();
    assert!(std::str::from_utf8(&binary).is_err());
    let binary_file = write_file(files.path(), "blob.bin", &binary);

    let server = Server::start_with_env(data.path(), &[], &[("CAREBUS_LOG", "debug")]);
    server.wait_status("/readyz", 200, READY);

    // Topic.
    let r = put_topic(&server, "hl7.adt", r#"{"partitions":4}"#);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["end_offsets"], json!([0, 0, 0, 0]));
    assert_eq!(
        put_topic(&server, "hl7.adt", r#"{"partitions":4}"#).status,
        200
    );

    // Exactly-once publish: 201, then 200 at the same position, then a flagged conflict.
    let key_headers = [
        "Content-Type: x-application/hl7-v2+er7",
        "Idempotency-Key: NORTHGATE|MSG00001",
        "Partition-Key: MRN100234^NORTHGATE",
        "X-Carebus-Header-Sending-Facility: NORTHGATE",
    ];
    let first = publish_file(&server, "hl7.adt", &hl7_file, &key_headers);
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(first.content_type, "application/json");
    let first = first.json();
    assert_eq!(first["duplicate"], false);
    assert_eq!(first["durability"], "fsynced");
    let partition = first["partition"].as_u64().unwrap();
    let offset = first["offset"].as_u64().unwrap();
    let again = publish_file(&server, "hl7.adt", &hl7_file, &key_headers);
    assert_eq!(again.status, 200);
    assert_eq!(
        again.json(),
        json!({"partition": partition, "offset": offset, "duplicate": true, "conflict": false, "durability": "fsynced"})
    );
    let conflict = publish_file(&server, "hl7.adt", &conflicting_file, &key_headers);
    assert_eq!(conflict.status, 200);
    assert_eq!(conflict.json()["conflict"], true);
    assert_eq!(conflict.json()["offset"], offset);

    // The same partition key keeps its partition, in order.
    let mut last = offset;
    for i in 2..6 {
        let r = publish_file(
            &server,
            "hl7.adt",
            &hl7_file,
            &[
                "Partition-Key: MRN100234^NORTHGATE",
                &format!("Idempotency-Key: NORTHGATE|MSG0000{i}"),
            ],
        );
        assert_eq!(r.status, 201);
        assert_eq!(r.json()["partition"], partition);
        let o = r.json()["offset"].as_u64().unwrap();
        assert_eq!(o, last + 1);
        last = o;
    }

    // Byte for byte: HL7 with CRs, and a binary body with NULs and non-UTF-8 bytes.
    let (m, body) = read_back(&server, "hl7.adt", partition, offset);
    assert_eq!(body, hl7);
    assert_eq!(m["content_type"], HL7_CT);
    assert_eq!(m["idempotency_key"], "NORTHGATE|MSG00001");
    assert_eq!(m["partition_key"], "MRN100234^NORTHGATE");
    assert_eq!(m["headers"], json!({"sending-facility": "NORTHGATE"}));
    let r = publish_file(
        &server,
        "hl7.adt",
        &binary_file,
        &[
            "Content-Type: application/octet-stream",
            "Partition-Key: DEVICE-7",
        ],
    );
    assert_eq!(r.status, 201);
    let (bp, bo) = (
        r.json()["partition"].as_u64().unwrap(),
        r.json()["offset"].as_u64().unwrap(),
    );
    let (m, body) = read_back(&server, "hl7.adt", bp, bo);
    assert_eq!(body, binary);
    assert_eq!(m["content_type"], "application/octet-stream");
    // Lookup by idempotency key (percent-encoded) gives the first copy.
    let r = curl(&[
        "-G",
        "--data-urlencode",
        "idempotency_key=NORTHGATE|MSG00001",
        &server.url("/v1/topics/hl7.adt/messages"),
    ]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["offset"], offset);

    // Atomic batch: one partition, all stored; a batch spanning partitions stores nothing.
    let batch = json!({"messages": [
        {"body": "OBX|1|NM|K||6.9\r", "idempotency_key": "LAB|1", "partition_key": "MRN9", "content_type": HL7_CT},
        {"body_base64": "AAH/", "idempotency_key": "LAB|2", "partition_key": "MRN9"}
    ]});
    let r = post_json(
        &server,
        "/v1/topics/hl7.adt/messages:batch",
        &batch.to_string(),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["partition"], results[1]["partition"]);
    assert_eq!(
        results[1]["offset"].as_u64().unwrap(),
        results[0]["offset"].as_u64().unwrap() + 1
    );
    let (_, b) = read_back(
        &server,
        "hl7.adt",
        results[1]["partition"].as_u64().unwrap(),
        results[1]["offset"].as_u64().unwrap(),
    );
    assert_eq!(b, [0, 1, 255]);
    let r = post_json(
        &server,
        "/v1/topics/hl7.adt/messages:batch",
        &batch.to_string(),
    );
    assert_eq!(r.status, 200, "the same batch again is all duplicates");
    let ends_before = curl(&[&server.url("/v1/topics/hl7.adt")]).json()["end_offsets"].clone();
    let spread = json!({"messages": (0..16).map(|i| json!({"body": "x", "partition_key": format!("MRN{i}")})).collect::<Vec<_>>()});
    post_json(
        &server,
        "/v1/topics/hl7.adt/messages:batch",
        &spread.to_string(),
    )
    .problem(400, "batch_spans_partitions");
    let topic = curl(&[&server.url("/v1/topics/hl7.adt")]).json();
    assert_eq!(
        topic["end_offsets"], ends_before,
        "nothing of the refused batch stored"
    );
    assert_eq!(topic["duplicates"], 4);
    assert_eq!(topic["conflicts"], 1);
    let stored: u64 = topic["end_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(stored, 8);

    // Hostile input: 4xx problem documents, never 5xx.
    post_json(
        &server,
        "/v1/topics/hl7.adt/messages:batch",
        r#"{"messages":[{"body":"PID|1||MRN-LEAK"#,
    )
    .problem(400, "malformed_json");
    let p = post_json(
        &server,
        "/v1/topics/hl7.adt/messages:batch",
        r#"{"messages":[{"body":"PID|1||MRN-LEAK","partition_key":["x"]}]}"#,
    )
    .problem(400, "invalid_json");
    assert!(!p.to_string().contains("MRN-LEAK"));
    put_topic(&server, "t2", r#"{"partitions":"many"}"#).problem(400, "invalid_json");
    put_topic(&server, "t2", r#"{"partitions":2,"replicas":3}"#).problem(400, "invalid_json");
    put_topic(&server, "t2", "{").problem(400, "malformed_json");
    let big = write_file(files.path(), "big.bin", &vec![b'A'; 9 << 20]);
    publish_file(
        &server,
        "hl7.adt",
        &big,
        &["Content-Type: application/octet-stream"],
    )
    .problem(413, "body_too_large");
    let r = curl(&[&server.url("/v1/topics/a%zzb")]);
    assert!((400..500).contains(&r.status), "{}", r.status);
    assert_eq!(r.content_type, "application/problem+json");
    curl(&[&server.url(&format!("/v1/topics/{}", "n".repeat(300)))]).problem(400, "invalid_name");
    put_topic(&server, &"n".repeat(300), "{}").problem(400, "invalid_name");
    curl(&[&server.url("/v1/topics/nope/messages/0/0")]).problem(404, "unknown_topic");
    curl(&[&server.url("/v1/topics/hl7.adt/messages/x/0")]).problem(400, "invalid_path");
    curl(&["-X", "PATCH", &server.url("/v1/topics/hl7.adt")]).problem(405, "method_not_allowed");
    curl(&[&server.url("/v1/nothing-here")]).problem(404, "not_found");
    let r = curl(&[&server.url("/healthz")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok\n"[..]));
    let r = curl(&[&server.url("/openapi.json")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["openapi"], "3.1.0");

    let (status, logs) = server.terminate_with_logs();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    let all_logs: String = logs.iter().map(Value::to_string).collect();
    assert!(
        all_logs.contains("published"),
        "debug publish lines are logged"
    );
    for secret in [
        "MRN-LEAK",
        "Okafor",
        "987-65-4320",
        "Harbour",
        "ZZZ|changed",
        "OBX|1",
    ] {
        assert!(
            !all_logs.contains(secret),
            "logs contain message content {secret:?}"
        );
    }
    assert!(
        logs.iter()
            .any(|l| l["fields"]["message"] == "deduplication indexes checkpointed, logs closed")
    );

    // Restart on the same data directory: the duplicate is still detected.
    let server = Server::start(data.path(), &[]);
    let opened = server.wait_log("broker opened", READY);
    assert_eq!(opened["fields"]["topics"], 1);
    assert_eq!(opened["fields"]["partitions"], 4);
    assert_eq!(opened["fields"]["records"], 8);
    server.wait_status("/readyz", 200, READY);
    let r = publish_file(&server, "hl7.adt", &hl7_file, &key_headers);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json(),
        json!({"partition": partition, "offset": offset, "duplicate": true, "conflict": false, "durability": "fsynced"})
    );
    let r = publish_file(&server, "hl7.adt", &conflicting_file, &key_headers);
    assert_eq!((r.status, r.json()["conflict"].clone()), (200, json!(true)));
    let r = post_json(
        &server,
        "/v1/topics/hl7.adt/messages:batch",
        &batch.to_string(),
    );
    assert_eq!(r.status, 200, "the batch's keys survive the restart too");
    let (_, body) = read_back(&server, "hl7.adt", partition, offset);
    assert_eq!(body, hl7);
    let topic = curl(&[&server.url("/v1/topics/hl7.adt")]).json();
    assert_eq!(topic["partitions"], 4);
    assert_eq!(topic["end_offsets"], ends_before);
    assert_eq!(
        curl(&["-X", "DELETE", &server.url("/v1/topics/hl7.adt")]).status,
        204
    );
    curl(&[&server.url("/v1/topics/hl7.adt")]).problem(404, "unknown_topic");
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn max_body_bytes_is_configurable() {
    let data = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &["--max-body-bytes", "1000"]);
    server.wait_status("/readyz", 200, READY);
    assert_eq!(put_topic(&server, "t", "{}").status, 201);
    let at_limit = write_file(files.path(), "a", &[7u8; 1000]);
    let over = write_file(files.path(), "b", &[7u8; 1001]);
    assert_eq!(publish_file(&server, "t", &at_limit, &[]).status, 201);
    let p = publish_file(&server, "t", &over, &[]).problem(413, "body_too_large");
    assert!(p["detail"].as_str().unwrap().contains("1000"));
    // Chunked (no Content-Length) is limited too.
    let r = publish_file(&server, "t", &over, &["Transfer-Encoding: chunked"]);
    r.problem(413, "body_too_large");
    assert_eq!(curl(&[&server.url("/healthz")]).status, 200);
    assert_eq!(server.terminate().code(), Some(0));

    let out = common::carebus()
        .args(["serve", "--max-body-bytes", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
