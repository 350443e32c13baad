//! The client against a scripted in-process HTTP server on 127.0.0.1: the retrying
//! publisher keeps one idempotency key across a dropped connection, 503 and 507, and
//! does not retry 4xx; the consumer loop acks handler successes and nacks failures with
//! their reason; 409 `stale_delivery` is reported as refused ids, not as a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carebus_client::{
    CancellationToken, Client, Consumer, ConsumerOptions, Error, Message, Publisher, RetryPolicy,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One request as the mock server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// What the mock server does with a request.
enum Reply {
    /// Close the connection without answering (a crash after the request arrived).
    Drop,
    /// Answer with this status and JSON body.
    Json(u16, Value),
}

type Script = Box<dyn FnMut(&Seen, usize) -> Reply + Send>;

/// Serves each connection's single request with `script(request, index)`.
async fn mock(script: Script) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let script = Arc::new(Mutex::new(script));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            let script = script.clone();
            tokio::spawn(async move {
                let Some(req) = read_request(&mut sock).await else {
                    return;
                };
                let index = {
                    let mut l = log.lock().unwrap();
                    l.push(req.clone());
                    l.len() - 1
                };
                let reply = (script.lock().unwrap())(&req, index);
                match reply {
                    Reply::Drop => drop(sock),
                    Reply::Json(status, body) => {
                        let body = body.to_string();
                        let ct = if status >= 400 {
                            "application/problem+json"
                        } else {
                            "application/json"
                        };
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: {ct}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = sock.write_all(head.as_bytes()).await;
                        let _ = sock.write_all(body.as_bytes()).await;
                        let _ = sock.shutdown().await;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), seen)
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Seen {
        method,
        path,
        headers,
        body,
    })
}

fn outcome(duplicate: bool) -> Value {
    json!({"partition": 0, "offset": 7, "duplicate": duplicate, "conflict": false, "durability": "fsynced"})
}

fn problem(status: u16, code: &str) -> Value {
    json!({"type": format!("urn:carebus:problem:{code}"), "title": "x", "status": status,
           "detail": "scripted", "code": code})
}

fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 6,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        max_elapsed: Duration::from_secs(10),
        ..RetryPolicy::default()
    }
}

#[tokio::test]
async fn publisher_retries_with_one_generated_key() {
    let (url, seen) = mock(Box::new(|_, i| match i {
        0 => Reply::Drop,
        1 => Reply::Json(503, problem(503, "not_ready")),
        2 => Reply::Json(507, problem(507, "storage_full")),
        // The first attempt had reached the disk: the retry is a duplicate.
        _ => Reply::Json(200, outcome(true)),
    }))
    .await;
    let publisher = Publisher::new(Client::new(&url).unwrap(), fast_policy());
    let sent = publisher
        .publish("lab", Message::new("OBX|1").partition_key("MRN1"))
        .await
        .unwrap();
    assert_eq!(sent.attempts, 4);
    assert!(sent.outcome.duplicate);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    for s in seen.iter() {
        assert_eq!(s.method, "POST");
        assert_eq!(s.path, "/v1/topics/lab/messages");
        assert_eq!(s.headers["idempotency-key"], sent.idempotency_key);
        assert_eq!(s.headers["partition-key"], "MRN1");
        assert_eq!(s.body, b"OBX|1");
    }
    assert!(sent.idempotency_key.starts_with("cbc-"));
}

/// A connection closed before the answer (the server closing an idle keep-alive
/// connection as the request goes out): a keyed publish is sent once more at once, a
/// publish without a key is not (it could be stored twice), and a second close is an
/// error.
#[tokio::test]
async fn publish_with_a_key_is_sent_once_more_when_the_connection_closes_first() {
    let (url, seen) = mock(Box::new(|_, i| match i {
        0 => Reply::Drop,
        _ => Reply::Json(201, outcome(false)),
    }))
    .await;
    let client = Client::new(&url).unwrap();
    let out = client
        .publish("lab", &Message::new("OBX|1").idempotency_key("LAB|1"))
        .await
        .unwrap();
    assert!(!out.duplicate);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        for s in seen.iter() {
            assert_eq!(s.headers["idempotency-key"], "LAB|1");
            assert_eq!(s.body, b"OBX|1");
        }
    }

    let (url, seen) = mock(Box::new(|_, i| match i {
        0 => Reply::Drop,
        _ => Reply::Json(201, outcome(false)),
    }))
    .await;
    let err = Client::new(&url)
        .unwrap()
        .publish("lab", &Message::new("OBX|1"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "a keyless publish was resent"
    );

    let (url, seen) = mock(Box::new(|_, _| Reply::Drop)).await;
    let err = Client::new(&url)
        .unwrap()
        .publish("lab", &Message::new("OBX|1").idempotency_key("LAB|2"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert_eq!(seen.lock().unwrap().len(), 2, "resent more than once");
}

#[tokio::test]
async fn publisher_keeps_the_callers_key_and_does_not_retry_4xx() {
    let (url, seen) = mock(Box::new(|_, _| {
        Reply::Json(400, problem(400, "invalid_header"))
    }))
    .await;
    let publisher = Publisher::new(Client::new(&url).unwrap(), fast_policy());
    let err = publisher
        .publish("lab", Message::new("x").idempotency_key("LAB|1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("invalid_header"));
    assert_eq!(err.status(), Some(400));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["idempotency-key"], "LAB|1");
}

#[tokio::test]
async fn publisher_gives_up_after_bounded_attempts() {
    let (url, seen) = mock(Box::new(|_, _| {
        Reply::Json(500, problem(500, "storage_error"))
    }))
    .await;
    let publisher = Publisher::new(Client::new(&url).unwrap(), fast_policy());
    let err = publisher
        .publish("lab", Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RetriesExhausted { attempts: 6, .. }));
    assert_eq!(err.code(), Some("storage_error"));
    assert_eq!(seen.lock().unwrap().len(), 6);
}

#[tokio::test]
async fn unreachable_server_is_a_connect_error() {
    // Bind and drop to get a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let err = client.list_topics().await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn batch_gets_keys_before_the_first_attempt() {
    let (url, seen) = mock(Box::new(|_, i| match i {
        0 => Reply::Json(503, problem(503, "not_ready")),
        _ => Reply::Json(201, json!({"results": [outcome(false), outcome(false)]})),
    }))
    .await;
    let publisher = Publisher::new(Client::new(&url).unwrap(), fast_policy());
    let sent = publisher
        .publish_batch(
            "lab",
            vec![
                Message::new("a").idempotency_key("K-a"),
                Message::new(vec![0xffu8, 0]),
            ],
        )
        .await
        .unwrap();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].idempotency_key, "K-a");
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].path, "/v1/topics/lab/messages:batch");
    let first: Value = serde_json::from_slice(&seen[0].body).unwrap();
    let second: Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(first, second, "the retry sends the same keys");
    assert_eq!(
        first["messages"][0],
        json!({"body": "a", "idempotency_key": "K-a"})
    );
    assert_eq!(first["messages"][1]["body_base64"], "/wA=");
    assert_eq!(
        first["messages"][1]["idempotency_key"],
        json!(sent[1].idempotency_key)
    );
}

#[tokio::test]
async fn consumer_acks_successes_and_nacks_failures() {
    let (url, seen) = mock(Box::new(|req, _| {
        if req.path.ends_with("/receive") {
            static ONCE: std::sync::Once = std::sync::Once::new();
            let mut first = false;
            ONCE.call_once(|| first = true);
            if first {
                let d = |id: u64, off: u64, body: &str| {
                    json!({"delivery_id": id, "delivery_id_str": id.to_string(), "attempt": 1,
                           "partition": 0, "offset": off, "timestamp_ms": 1, "partition_key": null,
                           "idempotency_key": null, "content_type": null, "headers": {},
                           "body_base64": base64_of(body)})
                };
                return Reply::Json(
                    200,
                    json!({"deliveries": [d(11, 0, "good"), d(12, 1, "bad")]}),
                );
            }
            return Reply::Json(200, json!({"deliveries": []}));
        }
        if req.path.ends_with("/ack") {
            return Reply::Json(200, json!({"acked": 1, "refused": []}));
        }
        Reply::Json(200, json!({"nacked": 1, "refused": []}))
    }))
    .await;
    let consumer = Consumer::new(
        Client::new(&url).unwrap(),
        "lab",
        "inbox",
        ConsumerOptions {
            consumer: "c1".into(),
            wait_ms: 0,
            stop_when_idle: true,
            retry: fast_policy(),
            ..ConsumerOptions::default()
        },
    );
    let cancel = CancellationToken::new();
    let stats = consumer
        .run(&cancel, |d| async move {
            if d.body == b"good" {
                Ok(())
            } else {
                Err("LIS unavailable")
            }
        })
        .await
        .unwrap();
    assert_eq!((stats.received, stats.acked, stats.nacked), (2, 1, 1));
    let seen = seen.lock().unwrap();
    let by_path = |suffix: &str| -> Vec<Value> {
        seen.iter()
            .filter(|s| s.path.ends_with(suffix))
            .map(|s| serde_json::from_slice(&s.body).unwrap())
            .collect()
    };
    assert_eq!(
        by_path("/receive")[0],
        json!({"max": 10, "wait_ms": 0, "consumer": "c1"})
    );
    assert_eq!(by_path("/ack"), vec![json!({"delivery_ids": [11]})]);
    assert_eq!(
        by_path("/nack"),
        vec![json!({"delivery_ids": [12], "reason": "LIS unavailable"})]
    );
}

#[tokio::test]
async fn consumer_stops_on_cancel_during_a_long_poll() {
    let (url, _seen) = mock(Box::new(|_, _| Reply::Drop)).await;
    // The mock never answers usefully; with a long retry budget only cancellation ends it.
    let consumer = Consumer::new(
        Client::new(&url).unwrap(),
        "lab",
        "inbox",
        ConsumerOptions {
            retry: RetryPolicy {
                max_attempts: 1000,
                max_elapsed: Duration::from_secs(600),
                ..fast_policy()
            },
            ..ConsumerOptions::default()
        },
    );
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c2.cancel();
    });
    let stats = tokio::time::timeout(
        Duration::from_secs(10),
        consumer.run(&cancel, |_| async { Ok::<(), String>(()) }),
    )
    .await
    .expect("stopped by the token")
    .unwrap();
    assert_eq!(stats.received, 0);
}

#[tokio::test]
async fn all_refused_ack_is_reported_not_failed() {
    let (url, _seen) = mock(Box::new(|_, _| {
        let mut p = problem(409, "stale_delivery");
        p["refused"] = json!([{"delivery_id": 5, "delivery_id_str": "5", "code": "unknown_or_stale_delivery"}]);
        Reply::Json(409, p)
    }))
    .await;
    let client = Client::new(&url).unwrap();
    let settled = client.ack("lab", "inbox", &[5]).await.unwrap();
    assert_eq!(settled.count, 0);
    assert_eq!(settled.refused[0].code, "unknown_or_stale_delivery");
}

fn base64_of(s: &str) -> String {
    use std::fmt::Write as _;
    // Tiny standard base64 encoder (the test crate has no base64 dependency).
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                let _ = write!(out, "{}", A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
