//! Guards the subscription, trace, transaction and metrics endpoints in-process (router
//! driven with `oneshot`, a real broker in a temporary directory): subscription
//! create/update/list/get/delete and their problems; long-poll receive (returns early
//! when a message arrives, ends at `wait_ms` otherwise, ends at shutdown); delivery ids
//! round-tripping as JSON numbers and strings; ack/nack with partial refusals (200) and
//! all-stale (409 `stale_delivery`); cumulative ack; dead letters listed, replayed and
//! discarded; message traces by position and idempotency key; transactions (commit,
//! abort, expiry 410, failed commit 409, unknown 404); and `/metrics` in Prometheus text
//! format whose counters move with the traffic and whose labels are route templates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use carebus_core::{Broker, BrokerConfig};
use carebus_http::{BrokerSlot, HttpConfig, router};
use serde_json::{Value, json};
use tower::ServiceExt as _;

struct Api {
    app: Router,
    slot: BrokerSlot,
    _dir: tempfile::TempDir,
}

fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = Broker::open(dir.path(), BrokerConfig::default()).unwrap();
    let slot = BrokerSlot::from(Arc::new(broker));
    Api {
        app: router(slot.clone(), HttpConfig::default()),
        slot,
        _dir: dir,
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }

    fn ok(&self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        if self.body.is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        assert_eq!(
            self.headers.get(header::CONTENT_TYPE).unwrap(),
            "application/problem+json"
        );
        let p = self.json();
        assert_eq!(p["code"], code, "{p}");
        assert_eq!(p["status"], status);
        p
    }
}

async fn send(app: &Router, method: Method, uri: &str, json_body: Option<&Value>) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    let body = match json_body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Method::GET, uri, None).await
}

async fn put(app: &Router, uri: &str, body: &Value) -> Reply {
    send(app, Method::PUT, uri, Some(body)).await
}

async fn post(app: &Router, uri: &str, body: &Value) -> Reply {
    send(app, Method::POST, uri, Some(body)).await
}

async fn delete(app: &Router, uri: &str) -> Reply {
    send(app, Method::DELETE, uri, None).await
}

/// Publishes one message with this idempotency key (and partition key, if any).
async fn publish(app: &Router, topic: &str, key: &str, pkey: Option<&str>, body: &str) -> Value {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("/v1/topics/{topic}/messages"))
        .header("idempotency-key", key)
        .header("content-type", "text/plain");
    if let Some(p) = pkey {
        req = req.header("partition-key", p);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let b = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    serde_json::from_slice(&b).unwrap()
}

async fn receive(app: &Router, topic: &str, sub: &str, max: u64, wait_ms: u64) -> Vec<Value> {
    let r = post(
        app,
        &format!("/v1/topics/{topic}/subscriptions/{sub}/receive"),
        &json!({"max": max, "wait_ms": wait_ms, "consumer": "c1"}),
    )
    .await;
    r.ok(200)["deliveries"].as_array().unwrap().clone()
}

/// Fast redelivery: no backoff.
fn quick(max_attempts: u32) -> Value {
    json!({"max_attempts": max_attempts, "ack_deadline_ms": 30000,
           "backoff": {"initial_ms": 0, "max_ms": 0, "multiplier": 1.0, "jitter": 0.0}})
}

#[tokio::test]
async fn subscriptions_are_created_updated_listed_read_and_deleted() {
    let api = api();
    let app = &api.app;
    put(app, "/v1/topics/t", &json!({"partitions": 2}))
        .await
        .ok(201);

    let r = put(
        app,
        "/v1/topics/t/subscriptions/billing",
        &json!({"dispatch": "least_in_flight", "max_attempts": 3}),
    )
    .await;
    let s = r.ok(201);
    assert_eq!(
        r.headers.get(header::LOCATION).unwrap(),
        "/v1/topics/t/subscriptions/billing"
    );
    assert_eq!(s["name"], "billing");
    assert_eq!(s["topic"], "t");
    assert_eq!(s["config"]["dispatch"], "least_in_flight");
    assert_eq!(s["config"]["max_attempts"], 3);
    assert_eq!(s["config"]["ack_deadline_ms"], 30000);
    assert_eq!(s["stats"]["backlog"], 0);

    // Update: 200, settings replaced.
    let s = put(
        app,
        "/v1/topics/t/subscriptions/billing",
        &json!({"max_attempts": 7, "start": "latest"}),
    )
    .await
    .ok(200);
    assert_eq!(s["config"]["max_attempts"], 7);
    assert_eq!(s["config"]["dispatch"], "round_robin");
    // An empty body without Content-Type: defaults.
    let r = send(app, Method::PUT, "/v1/topics/t/subscriptions/audit", None).await;
    assert_eq!(r.ok(201)["config"]["max_attempts"], 5);

    let list = get(app, "/v1/topics/t/subscriptions").await.ok(200);
    let names: Vec<&str> = list["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["audit", "billing"]);
    let topic = get(app, "/v1/topics/t").await.ok(200);
    assert_eq!(topic["subscriptions"].as_array().unwrap().len(), 2);
    assert_eq!(topic["subscriptions"][1]["config"]["max_attempts"], 7);

    let one = get(app, "/v1/topics/t/subscriptions/billing").await.ok(200);
    assert_eq!(one["config"]["max_attempts"], 7);
    for k in [
        "delivered",
        "redelivered",
        "acked",
        "nacked",
        "expired",
        "in_flight",
        "backlog",
        "dead_letters",
    ] {
        assert!(one["stats"][k].is_u64(), "{k}: {one}");
    }

    // Problems.
    put(
        app,
        "/v1/topics/t/subscriptions/x",
        &json!({"max_attempts": 0}),
    )
    .await
    .problem(400, "invalid_subscription");
    put(app, "/v1/topics/t/subscriptions/x", &json!({"speed": 1}))
        .await
        .problem(400, "invalid_json");
    put(
        app,
        "/v1/topics/t/subscriptions/x",
        &json!({"dispatch": "fastest"}),
    )
    .await
    .problem(400, "invalid_json");
    put(app, "/v1/topics/t/subscriptions/x%20y", &json!({}))
        .await
        .problem(400, "invalid_name");
    put(app, "/v1/topics/nope/subscriptions/x", &json!({}))
        .await
        .problem(404, "unknown_topic");
    get(app, "/v1/topics/t/subscriptions/nope")
        .await
        .problem(404, "unknown_subscription");
    get(app, "/v1/topics/nope/subscriptions")
        .await
        .problem(404, "unknown_topic");
    let r = send(
        app,
        Method::PATCH,
        "/v1/topics/t/subscriptions/billing",
        None,
    )
    .await;
    r.problem(405, "method_not_allowed");

    delete(app, "/v1/topics/t/subscriptions/billing")
        .await
        .ok(204);
    get(app, "/v1/topics/t/subscriptions/billing")
        .await
        .problem(404, "unknown_subscription");
    delete(app, "/v1/topics/t/subscriptions/billing")
        .await
        .problem(404, "unknown_subscription");
    let list = get(app, "/v1/topics/t/subscriptions").await.ok(200);
    assert_eq!(list["subscriptions"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn deliveries_carry_the_message_and_ids_round_trip_as_numbers_and_strings() {
    let api = api();
    let app = &api.app;
    put(app, "/v1/topics/t", &json!({})).await.ok(201);
    put(app, "/v1/topics/t/subscriptions/s", &quick(5))
        .await
        .ok(201);
    for i in 0..3 {
        publish(
            app,
            "t",
            &format!("k{i}"),
            Some("MRN1"),
            &format!("body {i}"),
        )
        .await;
    }
    let r = post(
        app,
        "/v1/topics/t/subscriptions/s/receive",
        &json!({"max": 10, "wait_ms": 0, "consumer": "c1"}),
    )
    .await;
    let raw = r.text();
    let ds = r.ok(200)["deliveries"].as_array().unwrap().clone();
    // One partition key: in order, one at a time (the next waits for the ack).
    assert_eq!(ds.len(), 1, "{ds:?}");
    let d = &ds[0];
    assert_eq!(d["partition"], 0);
    assert_eq!(d["offset"], 0);
    assert_eq!(d["attempt"], 1);
    assert_eq!(d["idempotency_key"], "k0");
    assert_eq!(d["partition_key"], "MRN1");
    assert_eq!(d["content_type"], "text/plain");
    assert_eq!(d["headers"], json!({}));
    assert_eq!(
        BASE64.decode(d["body_base64"].as_str().unwrap()).unwrap(),
        b"body 0"
    );
    // The number is exact (serde_json keeps u64) and equals the string form.
    let id = d["delivery_id"].as_u64().unwrap();
    assert!(id < 1 << 63);
    assert_eq!(d["delivery_id_str"], id.to_string());
    assert!(raw.contains(&format!("\"delivery_id\":{id}")), "{raw}");

    // Ack by string form.
    let a = post(
        app,
        "/v1/topics/t/subscriptions/s/ack",
        &json!({"delivery_ids": [id.to_string()]}),
    )
    .await
    .ok(200);
    assert_eq!(a, json!({"acked": 1, "refused": []}));
    // Acked again: every id refused → 409 with the list.
    let p = post(
        app,
        "/v1/topics/t/subscriptions/s/ack",
        &json!({"delivery_ids": [id]}),
    )
    .await
    .problem(409, "stale_delivery");
    assert_eq!(
        p["refused"],
        json!([{"delivery_id": id, "delivery_id_str": id.to_string(), "code": "unknown_or_stale_delivery"}])
    );

    // Next one (in order), acked by number together with a stale id: partial → 200.
    let ds = receive(app, "t", "s", 10, 0).await;
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0]["offset"], 1);
    let id1 = ds[0]["delivery_id"].as_u64().unwrap();
    let a = post(
        app,
        "/v1/topics/t/subscriptions/s/ack",
        &json!({"delivery_ids": [id1, id]}),
    )
    .await
    .ok(200);
    assert_eq!(a["acked"], 1);
    assert_eq!(a["refused"][0]["delivery_id_str"], id.to_string());
    assert_eq!(a["refused"][0]["code"], "unknown_or_stale_delivery");

    // Nack → redelivered as attempt 2 with a new id; the old id is stale.
    let ds = receive(app, "t", "s", 10, 0).await;
    let id2 = ds[0]["delivery_id"].as_u64().unwrap();
    let n = post(
        app,
        "/v1/topics/t/subscriptions/s/nack",
        &json!({"delivery_ids": [id2.to_string()], "reason": "downstream unavailable"}),
    )
    .await
    .ok(200);
    assert_eq!(n, json!({"nacked": 1, "refused": []}));
    let ds = receive(app, "t", "s", 10, 2000).await;
    assert_eq!(ds[0]["offset"], 2);
    assert_eq!(ds[0]["attempt"], 2);
    let id3 = ds[0]["delivery_id"].as_u64().unwrap();
    assert_ne!(id3, id2);
    post(
        app,
        "/v1/topics/t/subscriptions/s/nack",
        &json!({"delivery_ids": [id2]}),
    )
    .await
    .problem(409, "stale_delivery");

    let stats = get(app, "/v1/topics/t/subscriptions/s").await.ok(200)["stats"].clone();
    assert_eq!(stats["delivered"], 4);
    assert_eq!(stats["redelivered"], 1);
    assert_eq!(stats["acked"], 2);
    assert_eq!(stats["nacked"], 1);
    assert_eq!(stats["in_flight"], 1);
    assert_eq!(stats["backlog"], 1);

    // Malformed settle requests.
    for (body, code) in [
        (json!({"delivery_ids": []}), "invalid_delivery_id"),
        (json!({"delivery_ids": [-1]}), "invalid_delivery_id"),
        (json!({"delivery_ids": ["0x10"]}), "invalid_delivery_id"),
        (json!({"delivery_ids": [1.5]}), "invalid_delivery_id"),
        (
            json!({"delivery_ids": [1], "partition": 0, "offset": 0}),
            "invalid_json",
        ),
        (json!({"partition": 0}), "invalid_json"),
        (json!({}), "invalid_json"),
        (json!({"ids": [1]}), "invalid_json"),
    ] {
        post(app, "/v1/topics/t/subscriptions/s/ack", &body)
            .await
            .problem(400, code);
    }
    post(
        app,
        "/v1/topics/t/subscriptions/s/nack",
        &json!({"delivery_ids": [id3], "delay_ms": 100_000_000_000_u64}),
    )
    .await
    .problem(400, "invalid_json");
    post(
        app,
        "/v1/topics/t/subscriptions/nope/ack",
        &json!({"delivery_ids": [1]}),
    )
    .await
    .problem(404, "unknown_subscription");
    let r = send(app, Method::POST, "/v1/topics/t/subscriptions/s/ack", None).await;
    r.problem(415, "unsupported_media_type");
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_a_message_arrives() {
    let api = api();
    let app = &api.app;
    put(app, "/v1/topics/t", &json!({})).await.ok(201);
    put(app, "/v1/topics/t/subscriptions/s", &json!({}))
        .await
        .ok(201);

    // Nothing there: answers empty after about wait_ms.
    let start = Instant::now();
    assert!(receive(app, "t", "s", 5, 300).await.is_empty());
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A 20 s long poll answered by a publish 200 ms in.
    let poll = {
        let app = app.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let ds = receive(&app, "t", "s", 5, 20_000).await;
            (ds, start.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(app, "t", "k1", None, "hello").await;
    let (ds, took) = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("long poll answered")
        .unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0]["idempotency_key"], "k1");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Defaults with an empty body: max 1, no wait, consumer "default".
    publish(app, "t", "k2", None, "a").await;
    publish(app, "t", "k3", None, "b").await;
    let r = send(
        app,
        Method::POST,
        "/v1/topics/t/subscriptions/s/receive",
        None,
    )
    .await;
    assert_eq!(r.ok(200)["deliveries"].as_array().unwrap().len(), 1);
    // max 0 is raised to 1; a huge max is bounded (not refused).
    assert_eq!(receive(app, "t", "s", 0, 0).await.len(), 1);
    assert!(receive(app, "t", "s", 1_000_000, 0).await.is_empty());

    // Problems.
    for (body, code) in [
        (json!({"consumer": ""}), "invalid_consumer"),
        (json!({"consumer": "a\nb"}), "invalid_consumer"),
        (json!({"consumer": "x".repeat(201)}), "invalid_consumer"),
        (json!({"max": -1}), "invalid_json"),
        (json!({"wait": 5}), "invalid_json"),
    ] {
        post(app, "/v1/topics/t/subscriptions/s/receive", &body)
            .await
            .problem(400, code);
    }
    post(
        app,
        "/v1/topics/t/subscriptions/nope/receive",
        &json!({"wait_ms": 10_000}),
    )
    .await
    .problem(404, "unknown_subscription");
}

#[tokio::test]
async fn a_waiting_long_poll_ends_at_shutdown() {
    let api = api();
    let app = &api.app;
    put(app, "/v1/topics/t", &json!({})).await.ok(201);
    put(app, "/v1/topics/t/subscriptions/s", &json!({}))
        .await
        .ok(201);
    let poll = {
        let app = app.clone();
        tokio::spawn(async move { receive(&app, "t", "s", 5, 60_000).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.slot.close();
    let ds = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long poll ended at close")
        .unwrap();
    assert!(ds.is_empty());
}

#[tokio::test]
async fn cumulative_ack_settles_everything_up_to_an_offset() {
    let api = api();
    let app = &api.app;
    put(app, "/v1/topics/t", &json!({"partitions": 2}))
        .await
        .ok(201);
    put(app, "/v1/topics/t/subscriptions/s", &json!({}))
        .await
        .ok(201);
    let mut p0 = None;
    for i in 0..5 {
        let o = publish(app, "t", &format!("k{i}"), Some("MRN1"), "x").await;
        assert!(p0.is_none_or(|p| p == o["partition"]));
        p0 = Some(o["partition"].clone());
    }
    let p = p0.unwrap().as_u64().unwrap();
    let a = post(
        app,
        "/v1/topics/t/subscriptions/s/ack",
        &json!({"partition": p, "offset": 2}),
    )
    .await
    .ok(200);
    assert_eq!(a, json!({"acked_through": {"partition": p, "offset": 2}}));
    let ds = receive(app, "t", "s", 10, 0).await;
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0]["offset"], 3);
    assert_eq!(
        get(app, "/v1/topics/t/subscriptions/s").await.ok(200)["stats"]["backlog"],
        2
    );
    post(
        app,
        "/v1/topics/t/subscriptions/s/ack",
        &json!({"partition": p, "offset": 5}),
    )
    .await
    .problem(409, "offset_beyond_end");
    post(
        app,
        "/v1/topics/t/subscriptions/s/ack",
        &json!({"partition": 7, "offset": 0}),
    )
    .await
    .problem(404, "unknown_partition");
    // Through the in-flight one: settled, its id is stale afterwards.
    post(
        app,
        "/v1/topics/t/subscriptions/s/ack",
        &json!({"partition": p, "offset": 4}),
    )
    .await
    .ok(200);
    post(
        app,
        "/v1/topics/t/subscriptions/s/ack",
        &json!({"delivery_ids": [ds[0]["delivery_id_str"]]}),
    )
    .await
    .problem(409, "stale_delivery");
    assert!(receive(app, "t", "s", 10, 0).await.is_empty());
}

#[tokio::test]
async fn dead_letters_are_listed_replayed_and_discarded() {
    let api = api();
    let app = &api.app;
    put(app, "/v1/topics/t", &json!({})).await.ok(201);
    let mut cfg = quick(1);
    cfg["dead_letter_topic"] = json!("t.failures");
    put(app, "/v1/topics/t/subscriptions/s", &cfg).await.ok(201);
    publish(app, "t", "k1", None, "x").await;

    let ds = receive(app, "t", "s", 1, 0).await;
    post(
        app,
        "/v1/topics/t/subscriptions/s/nack",
        &json!({"delivery_ids": [ds[0]["delivery_id"]], "reason": "rejected by LIS"}),
    )
    .await
    .ok(200);
    let dl = get(app, "/v1/topics/t/subscriptions/s/dead-letters")
        .await
        .ok(200);
    let letters = dl["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{dl}");
    assert_eq!(letters[0]["offset"], 0);
    assert_eq!(letters[0]["attempts"], 1);
    assert_eq!(letters[0]["reason"], "rejected by LIS");
    let id = letters[0]["id"].as_u64().unwrap();
    // The compensation topic got a failure record.
    let t = get(app, "/v1/topics/t.failures").await.ok(200);
    assert_eq!(t["end_offsets"], json!([1]));

    // Replay: delivered again.
    let r = send(
        app,
        Method::POST,
        &format!("/v1/topics/t/subscriptions/s/dead-letters/{id}/replay"),
        None,
    )
    .await;
    r.ok(204);
    let ds = receive(app, "t", "s", 1, 2000).await;
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0]["offset"], 0);
    post(
        app,
        "/v1/topics/t/subscriptions/s/nack",
        &json!({"delivery_ids": [ds[0]["delivery_id"]]}),
    )
    .await
    .ok(200);
    let dl = get(app, "/v1/topics/t/subscriptions/s/dead-letters")
        .await
        .ok(200);
    let id2 = dl["dead_letters"][0]["id"].as_u64().unwrap();
    assert_ne!(id, id2);
    assert_eq!(
        get(app, "/v1/topics/t/subscriptions/s").await.ok(200)["stats"]["dead_letters"],
        1
    );

    delete(
        app,
        &format!("/v1/topics/t/subscriptions/s/dead-letters/{id2}"),
    )
    .await
    .ok(204);
    let dl = get(app, "/v1/topics/t/subscriptions/s/dead-letters")
        .await
        .ok(200);
    assert_eq!(dl["dead_letters"], json!([]));
    delete(
        app,
        &format!("/v1/topics/t/subscriptions/s/dead-letters/{id2}"),
    )
    .await
    .problem(404, "unknown_dead_letter");
    send(
        app,
        Method::POST,
        "/v1/topics/t/subscriptions/s/dead-letters/999/replay",
        None,
    )
    .await
    .problem(404, "unknown_dead_letter");
    get(app, "/v1/topics/t/subscriptions/s/dead-letters/x/replay")
        .await
        .problem(405, "method_not_allowed");
    delete(app, "/v1/topics/t/subscriptions/s/dead-letters/abc")
        .await
        .problem(400, "invalid_path");
    get(app, "/v1/topics/t/subscriptions/nope/dead-letters")
        .await
        .problem(404, "unknown_subscription");
}

#[tokio::test]
async fn traces_follow_a_message_through_its_subscriptions() {
    let api = api();
    let app = &api.app;
    put(app, "/v1/topics/t", &json!({})).await.ok(201);
    put(app, "/v1/topics/t/subscriptions/a", &json!({}))
        .await
        .ok(201);
    put(app, "/v1/topics/t/subscriptions/b", &json!({}))
        .await
        .ok(201);
    publish(app, "t", "LAB|1", None, "secret body").await;
    let ds = receive(app, "t", "a", 1, 0).await;
    post(
        app,
        "/v1/topics/t/subscriptions/a/ack",
        &json!({"delivery_ids": [ds[0]["delivery_id"]]}),
    )
    .await
    .ok(200);

    let r = get(app, "/v1/topics/t/messages/0/0/trace").await;
    assert!(!r.text().contains("secret"));
    let t = r.ok(200);
    assert_eq!(t["topic"], "t");
    assert_eq!(t["idempotency_key"], "LAB|1");
    assert_eq!(t["body_bytes"], 11);
    let subs = t["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 2);
    assert_eq!(subs[0]["subscription"], "a");
    assert_eq!(subs[0]["state"], "acknowledged");
    let kinds: Vec<&str> = subs[0]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["delivered", "acked"]);
    assert_eq!(subs[0]["events"][0]["consumer"], "c1");
    assert_eq!(subs[1]["state"], "pending");

    let by_key = get(app, "/v1/topics/t/trace?idempotency_key=LAB%7C1")
        .await
        .ok(200);
    assert_eq!(by_key, t);
    get(app, "/v1/topics/t/trace?idempotency_key=nope")
        .await
        .problem(404, "not_found");
    get(app, "/v1/topics/t/trace")
        .await
        .problem(400, "missing_parameter");
    get(app, "/v1/topics/t/messages/0/9/trace")
        .await
        .problem(404, "not_found");
    get(app, "/v1/topics/t/messages/5/0/trace")
        .await
        .problem(404, "unknown_partition");
    get(app, "/v1/topics/t/messages/x/0/trace")
        .await
        .problem(400, "invalid_path");
    get(app, "/v1/topics/nope/messages/0/0/trace")
        .await
        .problem(404, "unknown_topic");
}

#[tokio::test]
async fn transactions_commit_abort_expire_and_fail_as_problems() {
    let api = api();
    let app = &api.app;
    put(app, "/v1/topics/in", &json!({})).await.ok(201);
    put(app, "/v1/topics/out", &json!({})).await.ok(201);
    put(app, "/v1/topics/in/subscriptions/s", &quick(10))
        .await
        .ok(201);
    publish(app, "in", "order-1", None, "raw").await;
    let d = receive(app, "in", "s", 1, 0).await[0].clone();

    // Commit: the publish appears and the delivery is acknowledged, together.
    let r = post(app, "/v1/transactions", &json!({"timeout_ms": 30_000})).await;
    let tx = r.ok(201);
    let id = tx["transaction_id"].as_u64().unwrap();
    assert_eq!(tx["transaction_id_str"], id.to_string());
    assert!(
        r.headers.get(header::LOCATION).is_none(),
        "a transaction cannot be fetched"
    );
    let q = post(
        app,
        &format!("/v1/transactions/{id}/publish"),
        &json!({"topic": "out", "messages": [{"body": "transformed", "idempotency_key": "order-1/out"}]}),
    )
    .await
    .ok(200);
    assert_eq!(q, json!({"queued": 1}));
    assert_eq!(
        get(app, "/v1/topics/out").await.ok(200)["end_offsets"],
        json!([0])
    );
    let a = post(
        app,
        &format!("/v1/transactions/{id}/ack"),
        &json!({"topic": "in", "subscription": "s", "delivery_ids": [d["delivery_id_str"], 12345]}),
    )
    .await
    .ok(200);
    assert_eq!(a["accepted"], 1);
    assert_eq!(a["refused"][0]["delivery_id"], 12345);
    let c = send(
        app,
        Method::POST,
        &format!("/v1/transactions/{id}/commit"),
        None,
    )
    .await
    .ok(200);
    assert_eq!(c["results"].as_array().unwrap().len(), 1);
    assert_eq!(c["results"][0]["topic"], "out");
    assert_eq!(c["results"][0]["offset"], 0);
    assert_eq!(c["results"][0]["duplicate"], false);
    assert_eq!(c["results"][0]["durability"], "fsynced");
    assert_eq!(
        get(app, "/v1/topics/out").await.ok(200)["end_offsets"],
        json!([1])
    );
    post(
        app,
        "/v1/topics/in/subscriptions/s/ack",
        &json!({"delivery_ids": [d["delivery_id"]]}),
    )
    .await
    .problem(409, "stale_delivery");
    send(
        app,
        Method::POST,
        &format!("/v1/transactions/{id}/commit"),
        None,
    )
    .await
    .problem(404, "unknown_transaction");

    // Abort: nothing happens and the delivery comes back.
    publish(app, "in", "order-2", None, "raw2").await;
    let d = receive(app, "in", "s", 1, 0).await[0].clone();
    let id = post(app, "/v1/transactions", &json!({})).await.ok(201)["transaction_id"]
        .as_u64()
        .unwrap();
    post(
        app,
        &format!("/v1/transactions/{id}/ack"),
        &json!({"topic": "in", "subscription": "s", "delivery_ids": [d["delivery_id"]]}),
    )
    .await
    .ok(200);
    send(
        app,
        Method::POST,
        &format!("/v1/transactions/{id}/abort"),
        None,
    )
    .await
    .ok(204);
    let again = receive(app, "in", "s", 1, 2000).await;
    assert_eq!(again[0]["offset"], d["offset"]);
    send(
        app,
        Method::POST,
        &format!("/v1/transactions/{id}/abort"),
        None,
    )
    .await
    .problem(404, "unknown_transaction");

    // A commit whose delivery was settled meanwhile fails as a whole: 409.
    let id = post(app, "/v1/transactions", &json!({})).await.ok(201)["transaction_id"]
        .as_u64()
        .unwrap();
    post(
        app,
        &format!("/v1/transactions/{id}/ack"),
        &json!({"topic": "in", "subscription": "s", "delivery_ids": [again[0]["delivery_id"]]}),
    )
    .await
    .ok(200);
    post(
        app,
        &format!("/v1/transactions/{id}/publish"),
        &json!({"topic": "out", "messages": [{"body": "never"}]}),
    )
    .await
    .ok(200);
    post(
        app,
        "/v1/topics/in/subscriptions/s/ack",
        &json!({"delivery_ids": [again[0]["delivery_id"]]}),
    )
    .await
    .ok(200);
    let p = send(
        app,
        Method::POST,
        &format!("/v1/transactions/{id}/commit"),
        None,
    )
    .await
    .problem(409, "transaction_aborted");
    assert!(!p["detail"].as_str().unwrap().contains('/'), "{p}");
    assert_eq!(
        get(app, "/v1/topics/out").await.ok(200)["end_offsets"],
        json!([1])
    );

    // Expiry: 410 once, then unknown.
    let id = post(app, "/v1/transactions", &json!({"timeout_ms": 1}))
        .await
        .ok(201)["transaction_id"]
        .as_u64()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    post(
        app,
        &format!("/v1/transactions/{id}/publish"),
        &json!({"topic": "out", "messages": [{"body": "late"}]}),
    )
    .await
    .problem(410, "transaction_expired");
    send(
        app,
        Method::POST,
        &format!("/v1/transactions/{id}/commit"),
        None,
    )
    .await
    .problem(404, "unknown_transaction");

    // Request problems.
    post(app, "/v1/transactions", &json!({"timeout_ms": 0}))
        .await
        .problem(400, "invalid_json");
    post(app, "/v1/transactions", &json!({"timeout_ms": 3_600_001}))
        .await
        .problem(400, "invalid_json");
    let r = send(app, Method::POST, "/v1/transactions", None).await;
    let id = r.ok(201)["transaction_id"].as_u64().unwrap();
    post(
        app,
        &format!("/v1/transactions/{id}/publish"),
        &json!({"topic": "nope", "messages": [{"body": "x"}]}),
    )
    .await
    .problem(404, "unknown_topic");
    post(
        app,
        &format!("/v1/transactions/{id}/publish"),
        &json!({"topic": "out", "messages": []}),
    )
    .await
    .problem(400, "empty_batch");
    post(
        app,
        &format!("/v1/transactions/{id}/publish"),
        &json!({"topic": "out", "messages": [{"body": "x", "body_base64": "eA=="}]}),
    )
    .await
    .problem(400, "invalid_message");
    post(
        app,
        &format!("/v1/transactions/{id}/ack"),
        &json!({"topic": "in", "subscription": "s", "delivery_ids": [1]}),
    )
    .await
    .problem(409, "stale_delivery");
    post(
        app,
        "/v1/transactions/123/publish",
        &json!({"topic": "out", "messages": [{"body": "x"}]}),
    )
    .await
    .problem(404, "unknown_transaction");
    send(app, Method::POST, "/v1/transactions/abc/commit", None)
        .await
        .problem(400, "invalid_path");
}

/// Parses the exposition line by line: `# HELP`/`# TYPE` comments and samples.
/// Returns every sample as (name, labels, value).
fn parse_metrics(text: &str) -> Vec<(String, HashMap<String, String>, f64)> {
    let mut samples = Vec::new();
    let mut typed: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        assert!(!line.is_empty(), "empty line in exposition");
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().unwrap();
            let arg = parts.next().unwrap();
            assert!(name.starts_with("carebus_"), "{line}");
            match kind {
                "HELP" => assert!(!arg.is_empty()),
                "TYPE" => {
                    assert!(["counter", "gauge", "histogram"].contains(&arg), "{line}");
                    assert!(
                        typed.insert(name.to_owned(), arg.to_owned()).is_none(),
                        "{line}"
                    );
                }
                other => panic!("unknown comment {other}: {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l.strip_suffix('}').unwrap();
                let mut map = HashMap::new();
                for pair in l.split("\",") {
                    let (k, v) = pair.split_once("=\"").unwrap();
                    map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (n.to_owned(), map)
            }
            None => (series.to_owned(), HashMap::new()),
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&name);
        assert!(
            typed.contains_key(family),
            "sample before its # TYPE: {line}"
        );
        samples.push((name, labels, value));
    }
    samples
}

fn value(
    samples: &[(String, HashMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .sum()
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_move_with_the_traffic() {
    let api = api();
    let app = &api.app;
    put(app, "/v1/topics/t", &json!({"partitions": 2}))
        .await
        .ok(201);
    put(app, "/v1/topics/t/subscriptions/s", &quick(5))
        .await
        .ok(201);

    let r = get(app, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers.get(header::CONTENT_TYPE).unwrap(),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let before = parse_metrics(&r.text());
    assert_eq!(value(&before, "carebus_ready", &[]), 1.0);
    assert_eq!(
        value(&before, "carebus_topic_published_total", &[("topic", "t")]),
        0.0
    );
    assert_eq!(
        value(
            &before,
            "carebus_subscription_backlog",
            &[("topic", "t"), ("subscription", "s")]
        ),
        0.0
    );

    publish(app, "t", "k1", Some("MRN1"), "secret-body-1").await;
    publish(app, "t", "k1", Some("MRN1"), "secret-body-1").await; // duplicate
    publish(app, "t", "k1", Some("MRN1"), "secret-body-X").await; // conflict
    publish(app, "t", "k2", Some("MRN2"), "secret-body-2").await;
    let ds = receive(app, "t", "s", 10, 0).await;
    assert_eq!(ds.len(), 2);
    post(
        app,
        "/v1/topics/t/subscriptions/s/ack",
        &json!({"delivery_ids": [ds[0]["delivery_id"]]}),
    )
    .await
    .ok(200);
    post(
        app,
        "/v1/topics/t/subscriptions/s/ack",
        &json!({"delivery_ids": [ds[0]["delivery_id"]]}),
    )
    .await
    .problem(409, "stale_delivery");
    get(app, "/v1/nothing/here").await.problem(404, "not_found");

    let text = get(app, "/metrics").await.text();
    assert!(!text.contains("secret"), "message content in metrics");
    assert!(
        !text.contains("/v1/topics/t/"),
        "a raw path as a label:\n{text}"
    );
    let m = parse_metrics(&text);
    let t = [("topic", "t")];
    assert_eq!(value(&m, "carebus_topic_published_total", &t), 2.0);
    assert_eq!(value(&m, "carebus_topic_duplicates_total", &t), 2.0);
    assert_eq!(value(&m, "carebus_topic_conflicts_total", &t), 1.0);
    assert_eq!(value(&m, "carebus_partition_end_offset", &t), 2.0);
    assert!(value(&m, "carebus_partition_log_bytes", &t) > 0.0);
    assert!(value(&m, "carebus_storage_fsyncs_total", &t) >= 1.0);
    // Publishes one at a time find the log's syncer idle: the writer syncs them itself.
    let inline = value(&m, "carebus_storage_inline_fsyncs_total", &t);
    assert!(
        inline >= 1.0 && inline <= value(&m, "carebus_storage_fsyncs_total", &t),
        "{inline}"
    );
    assert!(value(&m, "carebus_storage_fsync_seconds_total", &t) >= 0.0);
    // Two small records do not use up the zeros filled just in time: nothing to fill ahead.
    assert!(
        m.iter()
            .any(|(n, l, _)| n == "carebus_storage_fill_fsyncs_total"
                && l.get("topic").map(String::as_str) == Some("t")),
        "no fill fsync counter for the topic"
    );
    assert_eq!(value(&m, "carebus_storage_fill_fsyncs_total", &t), 0.0);
    assert_eq!(value(&m, "carebus_storage_records_total", &t), 2.0);
    // The fdatasync histogram: count = fsyncs, +Inf bucket = count, buckets cumulative.
    let fsyncs = value(&m, "carebus_storage_fsyncs_total", &t);
    assert_eq!(
        value(&m, "carebus_storage_fsync_duration_seconds_count", &t),
        fsyncs
    );
    let inf = [("topic", "t"), ("le", "+Inf")];
    assert_eq!(
        value(&m, "carebus_storage_fsync_duration_seconds_bucket", &inf),
        fsyncs
    );
    let one_second = [("topic", "t"), ("le", "1")];
    assert!(
        value(
            &m,
            "carebus_storage_fsync_duration_seconds_bucket",
            &one_second
        ) <= fsyncs
    );
    let s = [("topic", "t"), ("subscription", "s")];
    assert_eq!(value(&m, "carebus_subscription_delivered_total", &s), 2.0);
    assert_eq!(value(&m, "carebus_subscription_acked_total", &s), 1.0);
    assert_eq!(value(&m, "carebus_subscription_in_flight", &s), 1.0);
    assert_eq!(value(&m, "carebus_subscription_backlog", &s), 1.0);
    assert_eq!(value(&m, "carebus_subscription_dead_letters", &s), 0.0);

    let publish_route = [("route", "/v1/topics/{topic}/messages"), ("method", "POST")];
    assert_eq!(
        value(
            &m,
            "carebus_http_requests_total",
            &[publish_route[0], publish_route[1], ("status", "201")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            "carebus_http_requests_total",
            &[publish_route[0], publish_route[1], ("status", "200")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            "carebus_http_requests_total",
            &[
                (
                    "route",
                    "/v1/topics/{topic}/subscriptions/{subscription}/ack"
                ),
                ("status", "409")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "carebus_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
    // The histogram: cumulative buckets ending in +Inf = count.
    let buckets: Vec<(f64, f64)> = m
        .iter()
        .filter(|(n, l, _)| {
            n == "carebus_http_request_duration_seconds_bucket"
                && publish_route
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, l, v)| {
            let le = l["le"].as_str();
            (
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                },
                *v,
            )
        })
        .collect();
    assert!(buckets.len() > 5);
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
    );
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 4.0));
    assert_eq!(
        value(
            &m,
            "carebus_http_request_duration_seconds_count",
            &publish_route
        ),
        4.0
    );
    assert!(
        value(
            &m,
            "carebus_http_request_duration_seconds_sum",
            &publish_route
        ) > 0.0
    );

    // Before the broker is open, only HTTP figures and carebus_ready 0.
    let app = router(BrokerSlot::new(), HttpConfig::default());
    let m = parse_metrics(&get(&app, "/metrics").await.text());
    assert_eq!(value(&m, "carebus_ready", &[]), 0.0);
}

#[tokio::test]
async fn the_fill_fsync_counter_moves_once_the_log_fills_ahead_while_idle() {
    let api = api();
    let app = &api.app;
    put(app, "/v1/topics/fill", &json!({"partitions": 1}))
        .await
        .ok(201);
    // ~320 KiB of data: more than one 128 KiB chunk past the first preallocation, so the
    // log's writer, idle between these one-at-a-time publishes, fills ahead.
    let body = "x".repeat(10 * 1024);
    for i in 0..32 {
        publish(app, "fill", &format!("k{i}"), None, &body).await;
    }
    let t = [("topic", "fill")];
    let deadline = Instant::now() + Duration::from_secs(10);
    let fills = loop {
        let m = parse_metrics(&get(app, "/metrics").await.text());
        let fills = value(&m, "carebus_storage_fill_fsyncs_total", &t);
        if fills > 0.0 || Instant::now() >= deadline {
            break fills;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(fills >= 1.0, "no fill fdatasync reported: {fills}");
    // Fills are not appends' fdatasyncs: one publish at a time needs one each.
    let m = parse_metrics(&get(app, "/metrics").await.text());
    assert!(value(&m, "carebus_storage_fsyncs_total", &t) >= 32.0);
    assert_eq!(value(&m, "carebus_storage_records_total", &t), 32.0);
}
