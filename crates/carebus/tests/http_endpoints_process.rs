//! Guards that every endpoint of the HTTP API answers as documented, against the real
//! `carebus serve` process driven by curl over 127.0.0.1: status codes, content types,
//! `Location` headers and JSON fields of topics, exactly-once publish (single and
//! batch), reads by position and by idempotency key, subscriptions (long-poll receive,
//! ack, stale re-ack, nack with delay and redelivery, cumulative ack, dead letters with
//! replay, discard and compensation records), message traces, transactions (commit and
//! abort), `/metrics` figures that match what the test did, `/healthz` and `/readyz`.
//! Every (method, path) listed by `GET /openapi.json` must be exercised here (and be in
//! the README's endpoint table), so an endpoint added without a process test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::Server;
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(30);
const JSON: &str = "application/json";
const PROBLEM: &str = "application/problem+json";
const HL7_CT: &str = "x-application/hl7-v2+er7";
/// Fast redelivery for the test: no backoff, no jitter.
const NO_BACKOFF: &str = r#"{"initial_ms":0,"max_ms":0,"multiplier":1.0,"jitter":0.0}"#;

struct Resp {
    status: u16,
    content_type: String,
    /// Lower-cased header names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts this status and a JSON body (`application/json`), and returns it.
    fn json(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(self.content_type, JSON, "{}", self.text());
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    /// Asserts an RFC 9457 problem document with this status and code, and returns it.
    fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(self.content_type, PROBLEM, "{}", self.text());
        let p: Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(p["code"], code, "{p}");
        assert_eq!(p["status"], status, "{p}");
        assert_eq!(p["type"], format!("urn:carebus:problem:{code}"), "{p}");
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
        assert!(p["detail"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
        p
    }

    /// Asserts 204 with an empty body.
    fn no_content(&self) {
        assert_eq!(self.status, 204, "{}", self.text());
        assert!(self.body.is_empty(), "{}", self.text());
    }
}

/// The server, the path templates of its OpenAPI document, and every
/// (method, template, status) this test has been answered, with counts.
struct Api {
    server: Server,
    templates: Vec<String>,
    answered: BTreeMap<(String, String, u16), u64>,
}

impl Api {
    /// Runs curl with `-X method` on `path` (which may carry a query) plus `args`.
    fn call(&mut self, method: &str, path: &str, args: &[&str]) -> Resp {
        let dir = tempfile::tempdir().unwrap();
        let (body_file, header_file) = (dir.path().join("body"), dir.path().join("headers"));
        let out = Command::new("curl")
            .args(["--max-time", "30", "-s", "-X", method, "-o"])
            .arg(&body_file)
            .arg("-D")
            .arg(&header_file)
            .args(["-w", "%{http_code} %{content_type}"])
            .args(args)
            .arg(self.server.url(path))
            .output()
            .expect("curl is installed (the test command installs it)");
        let meta = String::from_utf8_lossy(&out.stdout).into_owned();
        let (status, content_type) = meta.split_once(' ').unwrap_or((&meta, ""));
        let headers = std::fs::read_to_string(&header_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let resp = Resp {
            status: status.trim().parse().unwrap_or(0),
            content_type: content_type.trim().to_owned(),
            headers,
            body: std::fs::read(&body_file).unwrap_or_default(),
        };
        assert_ne!(resp.status, 0, "curl {method} {path} failed: {out:?}");
        let route = path.split('?').next().unwrap();
        if let Some(t) = template_of(&self.templates, route) {
            *self
                .answered
                .entry((method.to_owned(), t, resp.status))
                .or_default() += 1;
        }
        resp
    }

    fn get(&mut self, path: &str) -> Resp {
        self.call("GET", path, &[])
    }

    fn delete(&mut self, path: &str) -> Resp {
        self.call("DELETE", path, &[])
    }

    /// POST without a body (and so without a Content-Type).
    fn post_empty(&mut self, path: &str) -> Resp {
        self.call("POST", path, &[])
    }

    fn send_json(&mut self, method: &str, path: &str, body: &Value) -> Resp {
        let body = body.to_string();
        self.call(
            method,
            path,
            &[
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
            ],
        )
    }

    fn post_json(&mut self, path: &str, body: &Value) -> Resp {
        self.send_json("POST", path, body)
    }

    fn put_json(&mut self, path: &str, body: &Value) -> Resp {
        self.send_json("PUT", path, body)
    }

    /// Publishes `body` (bytes, via a file) with these request headers.
    fn publish(&mut self, topic: &str, body: &[u8], headers: &[&str]) -> Resp {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), body).unwrap();
        let data = format!("@{}", file.path().display());
        let mut args = vec!["--data-binary", data.as_str()];
        for h in headers {
            args.extend(["-H", h]);
        }
        self.call("POST", &format!("/v1/topics/{topic}/messages"), &args)
    }

    fn topic(&mut self, topic: &str) -> Value {
        self.get(&format!("/v1/topics/{topic}")).json(200)
    }

    /// Reads a message by position; returns it and its decoded body.
    fn read(&mut self, topic: &str, partition: u64, offset: u64) -> (Value, Vec<u8>) {
        let m = self
            .get(&format!("/v1/topics/{topic}/messages/{partition}/{offset}"))
            .json(200);
        assert_eq!(
            (m["partition"].as_u64(), m["offset"].as_u64()),
            (Some(partition), Some(offset))
        );
        let body = b64(&m["body_base64"]);
        (m, body)
    }

    fn receive(&mut self, topic: &str, sub: &str, max: u32, wait_ms: u64) -> Vec<Value> {
        let r = self
            .post_json(
                &format!("/v1/topics/{topic}/subscriptions/{sub}/receive"),
                &json!({"max": max, "wait_ms": wait_ms, "consumer": "worker-1"}),
            )
            .json(200);
        let deliveries = r["deliveries"].as_array().unwrap().clone();
        for d in &deliveries {
            check_delivery(d);
        }
        deliveries
    }

    fn sub(&mut self, topic: &str, sub: &str) -> Value {
        self.get(&format!("/v1/topics/{topic}/subscriptions/{sub}"))
            .json(200)
    }

    fn trace(&mut self, topic: &str, partition: u64, offset: u64) -> Value {
        self.get(&format!(
            "/v1/topics/{topic}/messages/{partition}/{offset}/trace"
        ))
        .json(200)
    }
}

/// The OpenAPI template a concrete path answers to: every literal segment equal, every
/// `{parameter}` segment non-empty; the most literal template wins.
fn template_of(templates: &[String], path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split('/').collect();
    templates
        .iter()
        .filter(|t| {
            let tsegs: Vec<&str> = t.split('/').collect();
            tsegs.len() == segs.len()
                && tsegs.iter().zip(&segs).all(|(t, s)| {
                    if t.starts_with('{') && t.ends_with('}') {
                        !s.is_empty()
                    } else {
                        t == s
                    }
                })
        })
        .max_by_key(|t| t.split('/').filter(|s| !s.starts_with('{')).count())
        .cloned()
}

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_else(|| panic!("not a string: {v}")))
        .unwrap()
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every documented field of a delivery, and the two id forms agree.
fn check_delivery(d: &Value) {
    let id = d["delivery_id"].as_u64().unwrap_or_else(|| panic!("{d}"));
    assert!((1..1 << 63).contains(&id), "{d}");
    assert_eq!(d["delivery_id_str"], id.to_string(), "{d}");
    assert!(d["attempt"].as_u64().unwrap() >= 1, "{d}");
    for f in ["partition", "offset", "timestamp_ms"] {
        assert!(d[f].is_u64(), "{f}: {d}");
    }
    for f in ["partition_key", "idempotency_key", "content_type"] {
        assert!(d[f].is_string() || d[f].is_null(), "{f}: {d}");
    }
    assert!(d["headers"].is_object(), "{d}");
    b64(&d["body_base64"]);
}

fn id(d: &Value) -> u64 {
    d["delivery_id"].as_u64().unwrap()
}

fn pos(v: &Value) -> (u64, u64) {
    (
        v["partition"].as_u64().unwrap(),
        v["offset"].as_u64().unwrap(),
    )
}

/// The event kinds of the one subscription `sub` in a trace, and its state.
fn trace_of(trace: &Value, sub: &str) -> (String, Vec<String>, Vec<Value>) {
    let s = trace["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subscription"] == sub)
        .unwrap_or_else(|| panic!("no {sub} in {trace}"));
    let events = s["events"].as_array().unwrap().clone();
    for e in &events {
        assert!(e["at_ms"].is_u64(), "{e}");
    }
    let kinds = events
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    (s["state"].as_str().unwrap().to_owned(), kinds, events)
}

/// `kinds` is `expected`, possibly followed by `cumulative_ack` events: the server lists
/// a later cumulative ack in the trace of every message it covers, even of one already
/// acknowledged before (where it changed nothing).
fn assert_settled_then_cumulative(kinds: &[String], expected: &[&str]) {
    assert!(
        kinds.len() >= expected.len()
            && kinds.iter().zip(expected).all(|(k, e)| k == e)
            && kinds[expected.len()..]
                .iter()
                .all(|k| k == "cumulative_ack"),
        "{kinds:?} is not {expected:?} (+ cumulative_ack)"
    );
}

/// Parses the Prometheus text format into (name, labels) → value.
fn parse_metrics(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                let mut labels = BTreeMap::new();
                let mut chars = rest.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                    assert_eq!(chars.next(), Some('"'), "{line}");
                    let mut val = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => val.push(chars.next().unwrap()),
                            '"' => break,
                            c => val.push(c),
                        }
                    }
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                    labels.insert(key, val);
                }
                (name.to_owned(), labels)
            }
        };
        out.insert((name, labels), value.parse().unwrap());
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// (method, template) pairs of the README's endpoint tables, with parameter names and
/// queries dropped (`{}`), for comparison with the OpenAPI document.
fn readme_endpoints() -> BTreeSet<(String, String)> {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../carebus-http/README.md"),
    )
    .unwrap();
    let mut out = BTreeSet::new();
    for line in readme.lines() {
        let Some(cell) = line.strip_prefix("| `") else {
            continue;
        };
        let Some((code, _)) = cell.split_once('`') else {
            continue;
        };
        let Some((method, path)) = code.split_once(' ') else {
            continue;
        };
        if ["GET", "PUT", "POST", "DELETE", "PATCH"].contains(&method) && path.starts_with('/') {
            out.insert((method.to_owned(), normalize(path)));
        }
    }
    out
}

fn normalize(template: &str) -> String {
    let path = template.split('?').next().unwrap();
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push_str("{}");
            }
            '}' => in_param = false,
            c if !in_param => out.push(c),
            _ => {}
        }
    }
    out
}

#[test]
fn every_http_endpoint_answers_as_documented() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    server.wait_status("/readyz", 200, READY);
    let mut api = Api {
        server,
        templates: vec!["/openapi.json".to_owned()],
        answered: BTreeMap::new(),
    };

    // The OpenAPI document lists the endpoints this test must cover.
    let r = api.get("/openapi.json");
    let spec = r.json(200);
    assert_eq!(spec["openapi"], "3.1.0");
    let mut listed = BTreeSet::new();
    for (template, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "put", "post", "delete", "patch", "head", "options"]
                .contains(&method.as_str())
            {
                listed.insert((method.to_uppercase(), template.clone()));
            }
        }
        for op in item.as_object().unwrap().values() {
            if let Some(responses) = op.get("responses") {
                assert!(
                    responses.as_object().is_some_and(|r| !r.is_empty()),
                    "{template}"
                );
            }
        }
    }
    assert!(listed.len() >= 29, "{listed:?}");
    api.templates = spec["paths"].as_object().unwrap().keys().cloned().collect();
    // The README's tables list the same endpoints.
    let from_spec: BTreeSet<(String, String)> = listed
        .iter()
        .map(|(m, t)| (m.clone(), normalize(t)))
        .collect();
    assert_eq!(
        readme_endpoints(),
        from_spec,
        "crates/carebus-http/README.md and GET /openapi.json list different endpoints"
    );

    health(&mut api);
    let published = topics_and_messages(&mut api);
    subscriptions(&mut api);
    dead_letters(&mut api);
    transactions(&mut api);
    metrics(&mut api, published);
    an_idle_topic_forgets_expired_keys(&mut api);

    // Every endpoint of the OpenAPI document was exercised.
    let exercised: BTreeSet<(String, String)> = api
        .answered
        .keys()
        .map(|(m, t, _)| (m.clone(), t.clone()))
        .collect();
    let missing: Vec<_> = listed.difference(&exercised).collect();
    assert!(
        missing.is_empty(),
        "endpoints in /openapi.json without a process test here: {missing:?}"
    );
    assert_eq!(api.server.terminate().code(), Some(0));
}

fn health(api: &mut Api) {
    let r = api.get("/healthz");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    assert!(
        r.content_type.starts_with("text/plain"),
        "{}",
        r.content_type
    );
    let r = api.get("/readyz");
    assert_eq!((r.status, r.text().as_str()), (200, "ready\n"));
    assert!(
        r.content_type.starts_with("text/plain"),
        "{}",
        r.content_type
    );
}

/// Topics, publish (single and batch), reads. Returns how many messages were stored in
/// `lab.orders` (for the metrics).
fn topics_and_messages(api: &mut Api) -> u64 {
    // Create (201 with Location), update (200), read, list.
    let r = api.put_json("/v1/topics/lab.orders", &json!({"partitions": 2}));
    let t = r.json(201);
    assert_eq!(r.header("location"), Some("/v1/topics/lab.orders"));
    assert_eq!(t["name"], "lab.orders");
    assert_eq!(t["partitions"], 2);
    assert_eq!(t["config"]["partitions"], 2);
    assert_eq!(t["end_offsets"], json!([0, 0]));
    assert_eq!(t["start_offsets"], json!([0, 0]));
    assert_eq!(t["subscriptions"], json!([]));
    assert_eq!(
        (&t["published"], &t["duplicates"], &t["conflicts"]),
        (&json!(0), &json!(0), &json!(0))
    );
    let r = api.put_json(
        "/v1/topics/lab.orders",
        &json!({"partitions": 2, "dedup_window_ms": 3_600_000}),
    );
    let t = r.json(200);
    assert_eq!(r.header("location"), None, "no Location on update");
    assert_eq!(t["config"]["dedup_window_ms"], 3_600_000);
    api.put_json("/v1/topics/lab.orders", &json!({"partitions": 1}))
        .problem(409, "partitions_cannot_shrink");
    let t = api.topic("lab.orders");
    assert_eq!(t["partitions"], 2);
    assert_eq!(t["config"]["retention_ms"], 604_800_000);
    // A PUT without a body takes every default.
    let t = api.call("PUT", "/v1/topics/scratch", &[]).json(201);
    assert_eq!(t["partitions"], 1);
    let list = api.get("/v1/topics").json(200);
    let names: Vec<&str> = list["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lab.orders", "scratch"]);
    // Delete: 204, then the topic is gone.
    api.delete("/v1/topics/scratch").no_content();
    api.get("/v1/topics/scratch").problem(404, "unknown_topic");
    api.delete("/v1/topics/scratch")
        .problem(404, "unknown_topic");

    // One message, exactly once.
    let hl7 =
        b"MSH|^~\\&|LIS|NORTHGATE|||20260101||ORM^O01|ORD1|P|2.5\rPID|1||MRN7\r\x00\xff".to_vec();
    let key = "NORTHGATE|ORD|0001";
    let headers = [
        "Content-Type: x-application/hl7-v2+er7",
        "Idempotency-Key: NORTHGATE|ORD|0001",
        "Partition-Key: MRN7^NORTHGATE",
        "X-Carebus-Header-Sending-Facility: NORTHGATE",
        "X-Carebus-Header-Trace-Id: abc-123",
    ];
    let first = api.publish("lab.orders", &hl7, &headers).json(201);
    assert_eq!(first["duplicate"], false);
    assert_eq!(first["conflict"], false);
    assert_eq!(first["durability"], "fsynced");
    let (p, o) = pos(&first);
    let again = api.publish("lab.orders", &hl7, &headers).json(200);
    assert_eq!(
        again,
        json!({"partition": p, "offset": o, "duplicate": true, "conflict": false, "durability": "fsynced"})
    );
    let mut changed = hl7.clone();
    changed.extend_from_slice(b"ZZZ|1\r");
    let conflict = api.publish("lab.orders", &changed, &headers).json(200);
    assert_eq!(
        (
            pos(&conflict),
            &conflict["duplicate"],
            &conflict["conflict"]
        ),
        ((p, o), &json!(true), &json!(true))
    );
    // Read back by position: the exact bytes and metadata of the first copy.
    let (m, body) = api.read("lab.orders", p, o);
    assert_eq!(body, hl7);
    assert_eq!(m["content_type"], HL7_CT);
    assert_eq!(m["idempotency_key"], key);
    assert_eq!(m["partition_key"], "MRN7^NORTHGATE");
    assert_eq!(
        m["headers"],
        json!({"sending-facility": "NORTHGATE", "trace-id": "abc-123"})
    );
    assert!(m["timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
    // Read back by idempotency key.
    let by_key = api
        .get(&format!(
            "/v1/topics/lab.orders/messages?idempotency_key={}",
            pct(key)
        ))
        .json(200);
    assert_eq!(by_key, m);
    api.get("/v1/topics/lab.orders/messages?idempotency_key=NOPE")
        .problem(404, "not_found");
    api.get(&format!("/v1/topics/lab.orders/messages/{p}/{}", o + 100))
        .problem(404, "not_found");
    // A message without any key: nulls.
    let plain = api.publish("lab.orders", b"plain", &[]).json(201);
    let (m, body) = {
        let (pp, po) = pos(&plain);
        api.read("lab.orders", pp, po)
    };
    assert_eq!(body, b"plain");
    assert_eq!(m["idempotency_key"], Value::Null);
    assert_eq!(m["partition_key"], Value::Null);
    assert_eq!(m["headers"], json!({}));

    // Batch: atomic, one partition, 201 when stored, 200 when all duplicates.
    let batch = json!({"messages": [
        {"body": "OBR|1|ORD2\r", "idempotency_key": "LIS|2", "partition_key": "MRN7^NORTHGATE",
         "content_type": HL7_CT, "headers": {"Origin": "lis"}},
        {"body_base64": "AAEC/w==", "idempotency_key": "LIS|3", "partition_key": "MRN7^NORTHGATE"},
    ]});
    let end = api.topic("lab.orders")["end_offsets"][p as usize]
        .as_u64()
        .unwrap();
    let results = api
        .post_json("/v1/topics/lab.orders/messages:batch", &batch)
        .json(201)["results"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(results.len(), 2);
    assert_eq!(
        results[0]["partition"], p,
        "same partition key, same partition"
    );
    assert_eq!(pos(&results[0]).1, end);
    assert_eq!(pos(&results[1]).1, end + 1);
    for r in &results {
        assert_eq!(
            (&r["duplicate"], &r["durability"]),
            (&json!(false), &json!("fsynced"))
        );
    }
    let (m, body) = api.read("lab.orders", p, end);
    assert_eq!(body, b"OBR|1|ORD2\r");
    assert_eq!(m["headers"], json!({"origin": "lis"}));
    assert_eq!(api.read("lab.orders", p, end + 1).1, [0, 1, 2, 255]);
    let again = api
        .post_json("/v1/topics/lab.orders/messages:batch", &batch)
        .json(200);
    assert!(
        again["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["duplicate"] == true)
    );
    api.post_json(
        "/v1/topics/lab.orders/messages:batch",
        &json!({"messages": []}),
    )
    .problem(400, "empty_batch");
    // The publish stream is a WebSocket (driven in ws_publish_process.rs); without the
    // handshake, or for an unknown topic, it answers with problem documents.
    api.get("/v1/topics/lab.orders/messages:stream")
        .problem(400, "websocket_upgrade_required");
    api.get("/v1/topics/nope/messages:stream")
        .problem(404, "unknown_topic");

    let t = api.topic("lab.orders");
    let stored: u64 = t["end_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(stored, 4);
    assert_eq!(t["published"], 4);
    assert_eq!(
        t["duplicates"], 4,
        "two single resends and two batch resends"
    );
    assert_eq!(t["conflicts"], 1);
    4
}

fn subscriptions(api: &mut Api) {
    let base = "/v1/topics/sub.basic/subscriptions";
    api.put_json("/v1/topics/sub.basic", &json!({"partitions": 1}))
        .json(201);
    let config: Value = json!({
        "dispatch": "round_robin", "ack_deadline_ms": 30000, "max_attempts": 5,
        "backoff": serde_json::from_str::<Value>(NO_BACKOFF).unwrap(),
        "start": "earliest", "dead_letter_topic": null
    });
    let r = api.put_json(&format!("{base}/worker"), &config);
    let s = r.json(201);
    assert_eq!(
        r.header("location"),
        Some("/v1/topics/sub.basic/subscriptions/worker")
    );
    assert_eq!(
        (&s["topic"], &s["name"]),
        (&json!("sub.basic"), &json!("worker"))
    );
    assert_eq!(s["config"], config);
    assert_eq!(
        s["stats"],
        json!({"delivered": 0, "redelivered": 0, "acked": 0, "nacked": 0, "expired": 0,
               "in_flight": 0, "backlog": 0, "dead_letters": 0})
    );
    let s = api.put_json(&format!("{base}/worker"), &config).json(200);
    assert_eq!(s["config"], config);
    api.put_json(&format!("{base}/worker"), &json!({"max_attempts": 0}))
        .problem(400, "invalid_subscription");
    // A scratch subscription with defaults (empty PUT), listed, then deleted.
    let s = api
        .call("PUT", &format!("{base}/zz.scratch"), &[])
        .json(201);
    assert_eq!(s["config"]["max_attempts"], 5);
    assert_eq!(s["config"]["ack_deadline_ms"], 30000);
    let list = api.get(base).json(200);
    let names: Vec<&str> = list["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["worker", "zz.scratch"]);
    api.delete(&format!("{base}/zz.scratch")).no_content();
    api.get(&format!("{base}/zz.scratch"))
        .problem(404, "unknown_subscription");
    api.delete(&format!("{base}/zz.scratch"))
        .problem(404, "unknown_subscription");
    assert_eq!(
        api.topic("sub.basic")["subscriptions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Three messages, each with its own partition key (no ordering between them).
    for i in 0..3 {
        api.publish(
            "sub.basic",
            format!("m{i}").as_bytes(),
            &[
                &format!("Partition-Key: P{i}"),
                &format!("Idempotency-Key: B|{i}"),
            ],
        )
        .json(201);
    }
    // Receiving from an unknown subscription: 404 at once.
    api.post_empty("/v1/topics/sub.basic/subscriptions/nobody/receive")
        .problem(404, "unknown_subscription");

    // Receive m0 and ack it; acking the same id again is refused (409 stale_delivery).
    let d = api.receive("sub.basic", "worker", 1, 2000);
    assert_eq!(d.len(), 1);
    let d0 = d[0].clone();
    assert_eq!((pos(&d0), d0["attempt"].as_u64()), ((0, 0), Some(1)));
    assert_eq!(b64(&d0["body_base64"]), b"m0");
    assert_eq!(d0["partition_key"], "P0");
    assert_eq!(d0["idempotency_key"], "B|0");
    let ack = format!("{base}/worker/ack");
    let r = api
        .post_json(&ack, &json!({"delivery_ids": [id(&d0)]}))
        .json(200);
    assert_eq!(r, json!({"acked": 1, "refused": []}));
    let p = api
        .post_json(&ack, &json!({"delivery_ids": [d0["delivery_id_str"]]}))
        .problem(409, "stale_delivery");
    assert_eq!(
        p["refused"],
        json!([{"delivery_id": id(&d0), "delivery_id_str": d0["delivery_id_str"], "code": "unknown_or_stale_delivery"}])
    );

    // Receive m1, nack it with a reason and a delay: m2 comes first, m1 after the delay
    // as attempt 2 with a new id.
    let d = api.receive("sub.basic", "worker", 1, 2000);
    let d1 = d[0].clone();
    assert_eq!(pos(&d1), (0, 1));
    let nacked_at = Instant::now();
    let r = api
        .post_json(
            &format!("{base}/worker/nack"),
            &json!({"delivery_ids": [d1["delivery_id_str"]], "reason": "LIS unavailable", "delay_ms": 300}),
        )
        .json(200);
    assert_eq!(r, json!({"nacked": 1, "refused": []}));
    // m2 is deliverable at once; m1 only once delay_ms has passed (a slow machine may
    // already be past it here, so both orders are checked against the clock).
    let first = api.receive("sub.basic", "worker", 10, 0);
    let d2 = first
        .iter()
        .find(|d| pos(d) == (0, 2))
        .unwrap_or_else(|| panic!("m2 is deliverable at once: {first:?}"))
        .clone();
    let early = first.iter().find(|d| pos(d) == (0, 1)).cloned();
    let d1b = early.unwrap_or_else(|| {
        let d = api.receive("sub.basic", "worker", 10, 5000);
        assert_eq!(d.len(), 1, "{d:?}");
        d[0].clone()
    });
    assert!(
        nacked_at.elapsed() >= Duration::from_millis(300),
        "redelivered before delay_ms: {:?}",
        nacked_at.elapsed()
    );
    assert_eq!(pos(&d1b), (0, 1));
    assert_eq!(d1b["attempt"], 2);
    assert_ne!(id(&d1b), id(&d1));
    assert_eq!(b64(&d1b["body_base64"]), b"m1");
    // The superseded id is stale; in a mixed ack the good one counts.
    let r = api
        .post_json(&ack, &json!({"delivery_ids": [id(&d1), id(&d1b)]}))
        .json(200);
    assert_eq!(r["acked"], 1);
    assert_eq!(r["refused"][0]["delivery_id"], id(&d1));
    assert_eq!(r["refused"][0]["code"], "unknown_or_stale_delivery");

    // Cumulative ack through offset 2 settles m2 (in flight), whose id becomes stale.
    api.post_json(&ack, &json!({"partition": 0, "offset": 3}))
        .problem(409, "offset_beyond_end");
    api.post_json(&ack, &json!({"partition": 5, "offset": 0}))
        .problem(404, "unknown_partition");
    api.post_json(&ack, &json!({"partition": 0}))
        .problem(400, "invalid_json");
    let r = api
        .post_json(&ack, &json!({"partition": 0, "offset": 2}))
        .json(200);
    assert_eq!(r, json!({"acked_through": {"partition": 0, "offset": 2}}));
    api.post_json(&ack, &json!({"delivery_ids": [id(&d2)]}))
        .problem(409, "stale_delivery");
    let s = api.sub("sub.basic", "worker");
    assert_eq!(s["stats"]["in_flight"], 0, "{s}");
    assert_eq!(s["stats"]["backlog"], 0, "{s}");
    assert_eq!(s["stats"]["delivered"], 4, "{s}");
    assert_eq!(s["stats"]["redelivered"], 1, "{s}");
    assert_eq!(s["stats"]["nacked"], 1, "{s}");
    assert_eq!(s["stats"]["dead_letters"], 0, "{s}");
    // Nothing left: an empty long poll answers after wait_ms with no deliveries.
    let polled = Instant::now();
    assert!(api.receive("sub.basic", "worker", 10, 100).is_empty());
    assert!(polled.elapsed() >= Duration::from_millis(100));

    // Traces, by position and by idempotency key.
    let t = api.trace("sub.basic", 0, 0);
    assert_eq!(
        (
            &t["topic"],
            &t["partition"],
            &t["offset"],
            &t["idempotency_key"],
            &t["body_bytes"]
        ),
        (
            &json!("sub.basic"),
            &json!(0),
            &json!(0),
            &json!("B|0"),
            &json!(2)
        )
    );
    assert!(t["stored_ms"].is_u64());
    let (state, kinds, events) = trace_of(&t, "worker");
    assert_eq!(state, "acknowledged");
    assert_settled_then_cumulative(&kinds, &["delivered", "acked"]);
    assert_eq!(
        (&events[0]["attempt"], &events[0]["consumer"]),
        (&json!(1), &json!("worker-1"))
    );
    let t = api
        .get(&format!(
            "/v1/topics/sub.basic/trace?idempotency_key={}",
            pct("B|1")
        ))
        .json(200);
    assert_eq!((&t["partition"], &t["offset"]), (&json!(0), &json!(1)));
    let (state, kinds, events) = trace_of(&t, "worker");
    assert_eq!(state, "acknowledged");
    assert_settled_then_cumulative(&kinds, &["delivered", "nacked", "delivered", "acked"]);
    assert_eq!(events[1]["reason"], "LIS unavailable");
    assert_eq!(events[2]["attempt"], 2);
    let (state, kinds, _) = trace_of(&api.trace("sub.basic", 0, 2), "worker");
    assert_eq!(
        (state.as_str(), kinds),
        (
            "acknowledged",
            vec!["delivered".to_owned(), "cumulative_ack".to_owned()]
        )
    );
    api.get("/v1/topics/sub.basic/trace?idempotency_key=NOPE")
        .problem(404, "not_found");
    api.get("/v1/topics/sub.basic/messages/0/9/trace")
        .problem(404, "not_found");
}

fn dead_letters(api: &mut Api) {
    let base = "/v1/topics/sub.dlq/subscriptions/fragile";
    api.put_json("/v1/topics/sub.dlq", &json!({"partitions": 1}))
        .json(201);
    let s = api
        .put_json(
            base,
            &json!({"max_attempts": 1, "dead_letter_topic": "sub.dlq.failures",
                    "backoff": serde_json::from_str::<Value>(NO_BACKOFF).unwrap()}),
        )
        .json(201);
    assert_eq!(s["config"]["dead_letter_topic"], "sub.dlq.failures");
    api.publish("sub.dlq", b"poison", &["Idempotency-Key: DLQ|1"])
        .json(201);

    // One attempt: the nack dead-letters it.
    let d = api.receive("sub.dlq", "fragile", 1, 2000);
    assert_eq!((d.len(), d[0]["attempt"].as_u64()), (1, Some(1)));
    api.post_json(
        &format!("{base}/nack"),
        &json!({"delivery_ids": [id(&d[0])], "reason": "bad segment"}),
    )
    .json(200);
    let letters = api.get(&format!("{base}/dead-letters")).json(200);
    let letters = letters["dead_letters"].as_array().unwrap().clone();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let dl = &letters[0];
    assert_eq!((&dl["partition"], &dl["offset"]), (&json!(0), &json!(0)));
    assert_eq!(
        (&dl["reason"], &dl["attempts"]),
        (&json!("bad segment"), &json!(1))
    );
    assert!(dl["first_failure_ms"].as_u64().unwrap() <= dl["last_failure_ms"].as_u64().unwrap());
    let first_id = dl["id"].as_u64().unwrap();
    assert!(api.receive("sub.dlq", "fragile", 1, 0).is_empty());
    let s = api.sub("sub.dlq", "fragile");
    assert_eq!(
        (&s["stats"]["dead_letters"], &s["stats"]["backlog"]),
        (&json!(1), &json!(0)),
        "{s}"
    );
    let (state, _, _) = trace_of(&api.trace("sub.dlq", 0, 0), "fragile");
    assert_eq!(state, "dead_lettered");

    // Replay: delivered again with its attempts reset; nacked again, a new dead letter.
    api.post_empty(&format!("{base}/dead-letters/{first_id}/replay"))
        .no_content();
    api.post_empty(&format!("{base}/dead-letters/{first_id}/replay"))
        .problem(404, "unknown_dead_letter");
    assert_eq!(
        api.get(&format!("{base}/dead-letters")).json(200),
        json!({"dead_letters": []})
    );
    let d = api.receive("sub.dlq", "fragile", 1, 2000);
    assert_eq!(d.len(), 1);
    assert_eq!((pos(&d[0]), d[0]["attempt"].as_u64()), ((0, 0), Some(1)));
    assert_eq!(b64(&d[0]["body_base64"]), b"poison");
    api.post_json(
        &format!("{base}/nack"),
        &json!({"delivery_ids": [d[0]["delivery_id_str"]], "reason": "still bad"}),
    )
    .json(200);
    let letters = api.get(&format!("{base}/dead-letters")).json(200)["dead_letters"].clone();
    assert_eq!(letters.as_array().unwrap().len(), 1, "{letters}");
    let second_id = letters[0]["id"].as_u64().unwrap();
    assert_ne!(second_id, first_id);
    assert_eq!(letters[0]["reason"], "still bad");

    // Discard: 204, gone; again 404.
    api.delete(&format!("{base}/dead-letters/{second_id}"))
        .no_content();
    api.delete(&format!("{base}/dead-letters/{second_id}"))
        .problem(404, "unknown_dead_letter");
    assert_eq!(
        api.get(&format!("{base}/dead-letters")).json(200),
        json!({"dead_letters": []})
    );
    let t = api
        .get("/v1/topics/sub.dlq/trace?idempotency_key=DLQ%7C1")
        .json(200);
    let (state, kinds, _) = trace_of(&t, "fragile");
    assert_eq!(state, "discarded");
    assert_eq!(
        kinds,
        [
            "delivered",
            "nacked",
            "dead_lettered",
            "dead_letter_replayed",
            "delivered",
            "nacked",
            "dead_lettered",
            "dead_letter_discarded"
        ]
    );

    // The compensation topic holds one failure record per dead letter (never the body).
    let deadline = Instant::now() + Duration::from_secs(5);
    let records: Vec<Value> = loop {
        let r = api.get("/v1/topics/sub.dlq.failures");
        if r.status == 200 && r.json(200)["end_offsets"] == json!([2]) {
            break (0..2)
                .map(|o| {
                    let (m, body) = api.read("sub.dlq.failures", 0, o);
                    assert!(
                        m["idempotency_key"]
                            .as_str()
                            .unwrap()
                            .starts_with("carebus-dead-letter/"),
                        "{m}"
                    );
                    serde_json::from_slice(&body).unwrap()
                })
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "no 2 failure records: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for (rec, (dl_id, reason)) in records
        .iter()
        .zip([(first_id, "bad segment"), (second_id, "still bad")])
    {
        assert_eq!(rec["topic"], "sub.dlq", "{rec}");
        assert_eq!(rec["subscription"], "fragile", "{rec}");
        assert_eq!(rec["dead_letter_id"], dl_id, "{rec}");
        assert_eq!(
            (&rec["partition"], &rec["offset"]),
            (&json!(0), &json!(0)),
            "{rec}"
        );
        assert_eq!(rec["reason"], reason, "{rec}");
        assert_eq!(rec["attempts"], 1, "{rec}");
        assert_eq!(rec["idempotency_key"], "DLQ|1", "{rec}");
        assert!(!rec.to_string().contains("poison"), "{rec}");
    }
}

fn transactions(api: &mut Api) {
    for t in ["txn.in", "txn.out"] {
        api.call("PUT", &format!("/v1/topics/{t}"), &[]).json(201);
    }
    api.put_json(
        "/v1/topics/txn.in/subscriptions/transformer",
        &json!({"backoff": serde_json::from_str::<Value>(NO_BACKOFF).unwrap()}),
    )
    .json(201);
    for i in 0..2 {
        api.publish("txn.in", format!("order-{i}").as_bytes(), &[])
            .json(201);
    }
    let input = api.receive("txn.in", "transformer", 1, 2000);
    assert_eq!(pos(&input[0]), (0, 0));

    // Commit: the output appears and the input is settled.
    let r = api.post_empty("/v1/transactions");
    let txn = r.json(201);
    let tid = txn["transaction_id"].as_u64().unwrap();
    assert_eq!(txn["transaction_id_str"], tid.to_string());
    assert_eq!(txn["timeout_ms"], 60000);
    assert_eq!(
        r.header("location"),
        None,
        "a transaction cannot be fetched"
    );
    let r = api
        .post_json(
            &format!("/v1/transactions/{tid}/publish"),
            &json!({"topic": "txn.out", "messages": [{"body": "result-0", "idempotency_key": "OUT|0"}]}),
        )
        .json(200);
    assert_eq!(r, json!({"queued": 1}));
    assert_eq!(
        api.topic("txn.out")["end_offsets"],
        json!([0]),
        "invisible before commit"
    );
    let r = api
        .post_json(
            &format!("/v1/transactions/{tid}/ack"),
            &json!({"topic": "txn.in", "subscription": "transformer", "delivery_ids": [id(&input[0])]}),
        )
        .json(200);
    assert_eq!(r, json!({"accepted": 1, "refused": []}));
    let r = api
        .post_empty(&format!("/v1/transactions/{tid}/commit"))
        .json(200);
    assert_eq!(r["transaction_id"], tid);
    assert_eq!(r["transaction_id_str"], tid.to_string());
    assert_eq!(
        r["results"],
        json!([{"topic": "txn.out", "partition": 0, "offset": 0, "duplicate": false, "conflict": false, "durability": "fsynced"}])
    );
    assert_eq!(api.read("txn.out", 0, 0).1, b"result-0");
    api.post_empty(&format!("/v1/transactions/{tid}/commit"))
        .problem(404, "unknown_transaction");
    // The acked input is not delivered again; the next one is.
    let next = api.receive("txn.in", "transformer", 10, 0);
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(pos(&next[0]), (0, 1));
    let (state, kinds, _) = trace_of(&api.trace("txn.in", 0, 0), "transformer");
    assert_eq!(state, "acknowledged");
    assert_eq!(kinds, ["delivered", "acked"]);

    // Abort: nothing appears and the input is delivered again.
    let txn = api
        .post_json("/v1/transactions", &json!({"timeout_ms": 5000}))
        .json(201);
    assert_eq!(txn["timeout_ms"], 5000);
    let tid = txn["transaction_id_str"].as_str().unwrap().to_owned();
    api.post_json(
        &format!("/v1/transactions/{tid}/publish"),
        &json!({"topic": "txn.out", "messages": [{"body": "result-1", "idempotency_key": "OUT|1"}]}),
    )
    .json(200);
    api.post_json(
        &format!("/v1/transactions/{tid}/ack"),
        &json!({"topic": "txn.in", "subscription": "transformer", "delivery_ids": [next[0]["delivery_id_str"]]}),
    )
    .json(200);
    api.post_empty(&format!("/v1/transactions/{tid}/abort"))
        .no_content();
    api.post_empty(&format!("/v1/transactions/{tid}/abort"))
        .problem(404, "unknown_transaction");
    assert_eq!(api.topic("txn.out")["end_offsets"], json!([1]));
    api.get("/v1/topics/txn.out/messages?idempotency_key=OUT%7C1")
        .problem(404, "not_found");
    let again = api.receive("txn.in", "transformer", 10, 2000);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(pos(&again[0]), (0, 1));
    assert_ne!(id(&again[0]), id(&next[0]));
    assert_eq!(b64(&again[0]["body_base64"]), b"order-1");
    api.post_json(
        "/v1/topics/txn.in/subscriptions/transformer/ack",
        &json!({"delivery_ids": [id(&again[0])]}),
    )
    .json(200);
    // A stale id in a transaction is refused (409, all refused).
    let tid = api.post_empty("/v1/transactions").json(201)["transaction_id"]
        .as_u64()
        .unwrap();
    api.post_json(
        &format!("/v1/transactions/{tid}/ack"),
        &json!({"topic": "txn.in", "subscription": "transformer", "delivery_ids": [id(&again[0])]}),
    )
    .problem(409, "stale_delivery");
    api.post_empty(&format!("/v1/transactions/{tid}/abort"))
        .no_content();
    api.post_empty("/v1/transactions/12345/commit")
        .problem(404, "unknown_transaction");
}

/// The server runs due index maintenance by itself: a topic with a 1 s dedup window
/// that receives nothing more forgets its keys (seen in `carebus_dedup_keys`), and a
/// resend after that is stored again.
fn an_idle_topic_forgets_expired_keys(api: &mut Api) {
    api.put_json(
        "/v1/topics/short.window",
        &json!({"dedup_window_ms": 1_000}),
    )
    .json(201);
    for i in 0..3 {
        api.publish(
            "short.window",
            b"ADT",
            &[&format!("Idempotency-Key: SHORT|{i}")],
        )
        .json(201);
    }
    let topic = [("topic", "short.window")];
    let keys = |api: &mut Api| {
        let text = api.get("/metrics").text();
        parse_metrics(&text)
            .get(&("carebus_dedup_keys".to_owned(), labels(&topic)))
            .copied()
    };
    assert_eq!(keys(api), Some(3.0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while keys(api) != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "an idle topic still remembers its keys: {:?}",
            keys(api)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = api
        .publish("short.window", b"ADT", &["Idempotency-Key: SHORT|0"])
        .json(201);
    assert_eq!(again["duplicate"], false, "{again}");
}

fn metrics(api: &mut Api, published: u64) {
    let r = api.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        r.content_type
    );
    let text = r.text();
    for (name, kind) in [
        ("carebus_ready", "gauge"),
        ("carebus_topic_published_total", "counter"),
        ("carebus_topic_duplicates_total", "counter"),
        ("carebus_topic_conflicts_total", "counter"),
        ("carebus_dedup_keys", "gauge"),
        ("carebus_dedup_memory_bytes", "gauge"),
        ("carebus_dedup_disk_runs", "gauge"),
        ("carebus_partition_end_offset", "gauge"),
        ("carebus_subscription_delivered_total", "counter"),
        ("carebus_subscription_acked_total", "counter"),
        ("carebus_subscription_nacked_total", "counter"),
        ("carebus_subscription_dead_letters", "gauge"),
        ("carebus_http_requests_total", "counter"),
        ("carebus_http_request_duration_seconds", "histogram"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "no # TYPE {name} {kind}"
        );
    }
    let m = parse_metrics(&text);
    let get = |name: &str, l: &[(&str, &str)]| -> f64 {
        *m.get(&(name.to_owned(), labels(l)))
            .unwrap_or_else(|| panic!("no {name}{l:?}"))
    };
    assert_eq!(get("carebus_ready", &[]), 1.0);
    let orders = [("topic", "lab.orders")];
    assert_eq!(
        get("carebus_topic_published_total", &orders),
        published as f64
    );
    assert_eq!(get("carebus_topic_duplicates_total", &orders), 4.0);
    assert_eq!(get("carebus_topic_conflicts_total", &orders), 1.0);
    // Three distinct idempotency keys were stored in lab.orders (one message had none).
    assert_eq!(get("carebus_dedup_keys", &orders), 3.0);
    assert!(get("carebus_dedup_memory_bytes", &orders) > 0.0);
    assert_eq!(get("carebus_dedup_disk_runs", &orders), 0.0);
    assert_eq!(
        get("carebus_topic_published_total", &[("topic", "sub.basic")]),
        3.0
    );
    assert_eq!(
        get("carebus_topic_published_total", &[("topic", "txn.out")]),
        1.0
    );
    assert_eq!(
        get(
            "carebus_partition_end_offset",
            &[("topic", "sub.dlq.failures"), ("partition", "0")]
        ),
        2.0
    );
    let worker = [("topic", "sub.basic"), ("subscription", "worker")];
    assert_eq!(get("carebus_subscription_delivered_total", &worker), 4.0);
    assert_eq!(get("carebus_subscription_redelivered_total", &worker), 1.0);
    assert_eq!(get("carebus_subscription_nacked_total", &worker), 1.0);
    assert_eq!(get("carebus_subscription_in_flight", &worker), 0.0);
    assert_eq!(get("carebus_subscription_backlog", &worker), 0.0);
    let fragile = [("topic", "sub.dlq"), ("subscription", "fragile")];
    assert_eq!(get("carebus_subscription_nacked_total", &fragile), 2.0);
    assert_eq!(get("carebus_subscription_dead_letters", &fragile), 0.0);
    // Every request this test was answered (by route template, method and status) is
    // counted exactly; /readyz was also polled by the start-up helper.
    for ((method, route, status), n) in &api.answered {
        if route == "/readyz" || route == "/metrics" {
            continue;
        }
        let status = status.to_string();
        assert_eq!(
            get(
                "carebus_http_requests_total",
                &[("route", route), ("method", method), ("status", &status)]
            ),
            *n as f64,
            "{method} {route} {status}"
        );
    }
    let unknown = m
        .keys()
        .filter(|(name, l)| name == "carebus_http_requests_total" && l["route"] != "unmatched")
        .map(|(_, l)| (l["method"].clone(), l["route"].clone()))
        .filter(|(_, route)| route != "/readyz" && route != "/metrics")
        .filter(|k| !api.answered.keys().any(|(m, r, _)| (m, r) == (&k.0, &k.1)))
        .collect::<Vec<_>>();
    assert!(
        unknown.is_empty(),
        "routes counted that this test never called: {unknown:?}"
    );
}
