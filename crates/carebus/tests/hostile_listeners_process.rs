//! Guards the real `carebus serve` process under hostile input on every listener at
//! once, while a well-behaved client keeps publishing, consuming and sending HL7 over
//! MLLP (every one of its operations must succeed within a bound):
//!
//! - HTTP: slowloris heads trickled a byte at a time (closed by the server within the
//!   header timeout), bodies that stall mid-way (408 `body_timeout` after the same
//!   timeout; a body trickled with shorter pauses still succeeds), idle connections
//!   (closed likewise), a 1 MiB header (431 or
//!   closed), bodies over the limit (413, declared or chunked), 100,000-deep JSON
//!   nesting (400 problem+json), invalid UTF-8 in JSON and in header values and names
//!   (4xx), random bytes (4xx or closed), and a flood of connections past
//!   `--http-max-connections` (the excess waits in the kernel's queue; the server's
//!   file descriptors stay bounded; every flood connection is closed by the server).
//! - MLLP: random bytes, an oversized frame (negative ACK, then closed) and a flood of
//!   connections past the listener's bound (the excess is closed at once).
//!
//! The server's RSS (VmRSS from /proc/<pid>/status) is printed before the attack, at
//! its peak and after every attack connection is closed; after must stay within 64 MiB
//! of before. Everything talks to 127.0.0.1 only and every loop is bounded.
//!
//! Also: `--http-max-connections` and `--http-header-timeout-ms` come from flags, the
//! environment and the config file, in that order, and zero is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, curl};

/// `--http-header-timeout-ms` of the server under test.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// `--http-max-connections` of the server under test, at most (below the flood, so the
/// bound is reached; the default is 1024).
const HTTP_MAX_CONNECTIONS: usize = 512;
/// The MLLP listener's default bound.
const MLLP_MAX_CONNECTIONS: usize = 256;
/// Flood connections per listener (fewer if the file descriptor limit is low).
const FLOOD: usize = 1500;
/// Longest a well-behaved request on an open connection may take.
const WELL_BEHAVED_BOUND: Duration = Duration::from_secs(10);
/// Longest a well-behaved request on a new connection may take while the HTTP listener
/// is flooded past its bound (it waits in the accept queue for a free slot).
const NEW_CONNECTION_BOUND: Duration = Duration::from_secs(20);
/// After-attack RSS must be within this of the before-attack RSS.
const RSS_GROWTH_BOUND_KIB: u64 = 64 * 1024;

const HL7_FIXTURE: &str = "../../fixtures/hl7/valid/adt_a01_admit.hl7";

// ---------------------------------------------------------------- process figures

fn status_field(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The soft and hard limits on open files of this process.
fn nofile_limits() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| {
            if w == "unlimited" {
                Some(u64::MAX)
            } else {
                w.parse().ok()
            }
        })
        .collect();
    (
        nums.first().copied().unwrap_or(1024),
        nums.get(1).copied().unwrap_or(1024),
    )
}

/// Raises the soft open-files limit to the hard one (with `prlimit`: the workspace
/// forbids `unsafe`), so the test and the server it starts can hold the flood; returns
/// the soft limit in force.
fn raise_nofile() -> u64 {
    let (soft, hard) = nofile_limits();
    if soft < hard {
        let _ = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={hard}:{hard}"))
            .status();
    }
    nofile_limits().0
}

// ---------------------------------------------------------------- a small HTTP/1.1 client

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn assert_problem(&self, status: u16, what: &str) {
        assert_eq!(
            self.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{what}"
        );
        assert_eq!(self.json()["status"], status, "{what}");
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response from `s` (Content-Length or chunked).
fn read_reply(s: &mut TcpStream) -> std::io::Result<Reply> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "closed before a reply",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, "bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut rest = buf[head_end + 4..].to_vec();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "short body"));
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            while find(&rest, b"\r\n").is_none() {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "short chunk"));
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            let line_end = find(&rest, b"\r\n").unwrap_or(0);
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..line_end])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "bad chunk size"))?;
            while rest.len() < line_end + 2 + size + 2 {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "short chunk"));
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break body;
            }
        }
    } else {
        Vec::new()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Sends one request on a keep-alive connection and reads the reply.
fn request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (n, v) in headers {
        req.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    s.write_all(&req)?;
    read_reply(s)
}

fn connect(addr: SocketAddr, timeout: Duration) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, timeout)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    s
}

/// Sends raw bytes on a new connection (write errors ignored: the server may close
/// early), then reads until the server closes or `wait` passes. Returns what was read
/// and whether the server closed the connection.
fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (Vec<u8>, bool) {
    let mut s = connect(addr, Duration::from_secs(10));
    let _ = s.write_all(bytes);
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

fn status_of(reply: &[u8]) -> Option<u16> {
    let line = reply.split(|&b| b == b'\r').next()?;
    std::str::from_utf8(line)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// A small deterministic generator for random bytes.
struct XorShift(u64);

impl XorShift {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 24) as u8
            })
            .collect()
    }
}

// ---------------------------------------------------------------- MLLP

fn mllp_frame(message: &[u8]) -> Vec<u8> {
    let mut f = vec![0x0b];
    f.extend_from_slice(message);
    f.extend_from_slice(&[0x1c, 0x0d]);
    f
}

fn read_ack(s: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, &[0x1c, 0x0d]) {
            let start = buf.iter().position(|&b| b == 0x0b).map_or(0, |p| p + 1);
            return Ok(String::from_utf8_lossy(&buf[start..end]).into_owned());
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "closed before the ACK",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The fixture ADT^A01 with its control id (MSH-10) replaced.
fn hl7_message(template: &str, control_id: &str) -> Vec<u8> {
    let mut segments: Vec<String> = template.split('\r').map(str::to_owned).collect();
    let mut fields: Vec<String> = segments[0].split('|').map(str::to_owned).collect();
    fields[9] = control_id.to_owned();
    segments[0] = fields.join("|");
    segments.join("\r").into_bytes()
}

fn mllp_send(s: &mut TcpStream, template: &str, control_id: &str) -> std::io::Result<()> {
    s.write_all(&mllp_frame(&hl7_message(template, control_id)))?;
    let ack = read_ack(s)?;
    let accepted = ack.contains(&format!("MSA|AA|{control_id}"))
        || ack.contains(&format!("MSA|CA|{control_id}"));
    if accepted {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("not accepted: {ack:?}")))
    }
}

// ---------------------------------------------------------------- the well-behaved client

#[derive(Default)]
struct WellBehaved {
    published: AtomicU64,
    consumed: AtomicU64,
    fresh_connections: AtomicU64,
    mllp_sent: AtomicU64,
    slowest_ms: AtomicU64,
    slowest_fresh_ms: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl WellBehaved {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }

    fn timed<T>(
        &self,
        what: &str,
        bound: Duration,
        fresh: bool,
        f: impl FnOnce() -> Result<T, String>,
    ) -> Option<T> {
        let t0 = Instant::now();
        let r = f();
        let took = t0.elapsed();
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let slot = if fresh {
            &self.slowest_fresh_ms
        } else {
            &self.slowest_ms
        };
        slot.fetch_max(ms, Ordering::Relaxed);
        match r {
            Ok(v) if took <= bound => Some(v),
            Ok(_) => {
                self.fail(format!("{what} took {took:?} (bound {bound:?})"));
                None
            }
            Err(e) => {
                self.fail(format!("{what} failed after {took:?}: {e}"));
                None
            }
        }
    }
}

/// Publishes, receives and acks on one keep-alive connection and sends HL7 over one
/// MLLP connection, back to back.
fn well_behaved(
    mut conn: TcpStream,
    mut mllp: TcpStream,
    template: String,
    stop: Arc<AtomicBool>,
    wb: Arc<WellBehaved>,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        round += 1;
        let key = format!("wb-{round}");
        let published = wb.timed("publish", WELL_BEHAVED_BOUND, false, || {
            let r = request(
                &mut conn,
                "POST",
                "/v1/topics/wb/messages",
                &[("Idempotency-Key", &key), ("Content-Type", "text/plain")],
                format!("well-behaved message {round}").as_bytes(),
            )
            .map_err(|e| e.to_string())?;
            if r.status == 201 {
                Ok(())
            } else {
                Err(format!(
                    "status {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ))
            }
        });
        if published.is_none() {
            break;
        }
        wb.published.fetch_add(1, Ordering::Relaxed);
        let ids = wb.timed("receive", WELL_BEHAVED_BOUND, false, || {
            let r = request(
                &mut conn,
                "POST",
                "/v1/topics/wb/subscriptions/wb/receive",
                &[("Content-Type", "application/json")],
                br#"{"max": 100, "wait_ms": 1000, "consumer": "wb"}"#,
            )
            .map_err(|e| e.to_string())?;
            if r.status != 200 {
                return Err(format!("status {}", r.status));
            }
            let v = r.json();
            let ids: Vec<serde_json::Value> = v["deliveries"]
                .as_array()
                .map(|d| d.iter().map(|x| x["delivery_id_str"].clone()).collect())
                .unwrap_or_default();
            if ids.is_empty() {
                Err("nothing delivered".to_owned())
            } else {
                Ok(ids)
            }
        });
        let Some(ids) = ids else { break };
        let n = ids.len() as u64;
        let acked = wb.timed("ack", WELL_BEHAVED_BOUND, false, || {
            let body = serde_json::json!({ "delivery_ids": ids }).to_string();
            let r = request(
                &mut conn,
                "POST",
                "/v1/topics/wb/subscriptions/wb/ack",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .map_err(|e| e.to_string())?;
            if r.status == 200 && r.json()["acked"] == n {
                Ok(())
            } else {
                Err(format!(
                    "status {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ))
            }
        });
        if acked.is_none() {
            break;
        }
        wb.consumed.fetch_add(n, Ordering::Relaxed);
        let sent = wb.timed("mllp send", WELL_BEHAVED_BOUND, false, || {
            mllp_send(&mut mllp, &template, &format!("WB-{round}")).map_err(|e| e.to_string())
        });
        if sent.is_none() {
            break;
        }
        wb.mllp_sent.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every 500 ms, a request on a new HTTP connection (while the listener is flooded past
/// its bound, it waits in the accept queue for a free slot).
fn fresh_requests(http: SocketAddr, stop: Arc<AtomicBool>, wb: Arc<WellBehaved>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let fresh = wb.timed(
            "request on a new connection",
            NEW_CONNECTION_BOUND,
            true,
            || {
                let mut c = TcpStream::connect_timeout(&http, NEW_CONNECTION_BOUND)
                    .map_err(|e| e.to_string())?;
                c.set_read_timeout(Some(NEW_CONNECTION_BOUND))
                    .map_err(|e| e.to_string())?;
                let r =
                    request(&mut c, "GET", "/v1/topics/wb", &[], b"").map_err(|e| e.to_string())?;
                if r.status == 200 {
                    Ok(())
                } else {
                    Err(format!("status {}", r.status))
                }
            },
        );
        if fresh.is_none() {
            break;
        }
        wb.fresh_connections.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(500));
    }
}

// ---------------------------------------------------------------- the attacks

/// Every content attack on the HTTP port; panics on a wrong answer.
fn http_content_attacks(addr: SocketAddr, files: PathBuf) -> Vec<String> {
    let mut tried = Vec::new();
    let wait = Duration::from_secs(10);

    // A 1 MiB header: 431 (hyper's head limit) or closed, never an answer from a handler.
    let huge = format!(
        "GET /v1/topics HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n",
        "h".repeat(1 << 20)
    );
    let (reply, _) = raw(addr, huge.as_bytes(), wait);
    let status = status_of(&reply);
    assert!(
        status.is_none() || status == Some(431),
        "1 MiB header: {status:?}"
    );
    tried.push(format!("1 MiB header -> {status:?}"));
    // Ten thousand small headers.
    let mut many = String::from("GET /v1/topics HTTP/1.1\r\nHost: x\r\n");
    for i in 0..10_000 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let (reply, _) = raw(addr, many.as_bytes(), wait);
    let status = status_of(&reply);
    assert!(
        status.is_none() || (400..500).contains(&status.unwrap_or(0)),
        "10,000 headers: {status:?}"
    );
    tried.push(format!("10,000 headers -> {status:?}"));

    // Bodies over the limit: declared (refused before reading), and chunked (curl).
    let mut c = connect(addr, wait);
    let r = request_head_only(&mut c, "/v1/topics/wb/messages", 100 << 20);
    r.assert_problem(413, "declared 100 MiB body");
    tried.push("declared 100 MiB body -> 413".into());
    let big = files.join("big.bin");
    std::fs::write(&big, vec![b'A'; 9 << 20]).unwrap();
    let (code, body) = curl(&[
        "-s",
        "-X",
        "POST",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", big.display()),
        &format!("http://{addr}/v1/topics/wb/messages"),
    ]);
    assert_eq!(code, 413, "chunked 9 MiB body: {body}");
    tried.push("chunked 9 MiB body -> 413".into());

    // Deeply nested JSON.
    let mut c = connect(addr, wait);
    for (what, body) in [
        ("100,000 '['", "[".repeat(100_000)),
        ("100,000 '{\"a\":'", "{\"a\":".repeat(100_000)),
        (
            "100,000 '[' inside a batch",
            format!("{{\"messages\":{}", "[".repeat(100_000)),
        ),
    ] {
        let r = request(
            &mut c,
            "POST",
            "/v1/topics/wb/messages:batch",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .unwrap();
        r.assert_problem(400, what);
        tried.push(format!("{what} -> 400 {}", r.json()["code"]));
    }

    // Invalid UTF-8: in a JSON body, in a header value, in a header name, in the path.
    let r = request(
        &mut c,
        "POST",
        "/v1/topics/wb/messages:batch",
        &[("Content-Type", "application/json")],
        b"{\"messages\":[{\"body\":\"\xff\xfe\xc3\x28\"}]}",
    )
    .unwrap();
    r.assert_problem(400, "invalid UTF-8 in JSON");
    tried.push(format!("invalid UTF-8 in JSON -> 400 {}", r.json()["code"]));
    let mut req = b"POST /v1/topics/wb/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nIdempotency-Key: \xff\xfe\xc3\x28\r\n\r\nx".to_vec();
    c.write_all(&req).unwrap();
    let r = read_reply(&mut c).unwrap();
    r.assert_problem(400, "invalid UTF-8 in Idempotency-Key");
    tried.push(format!(
        "invalid UTF-8 in a header value -> 400 {}",
        r.json()["code"]
    ));
    req = b"GET /v1/topics HTTP/1.1\r\nHost: x\r\nX-\xff\xfe: v\r\n\r\n".to_vec();
    let (reply, _) = raw(addr, &req, wait);
    let status = status_of(&reply);
    assert!(
        status.is_none() || status == Some(400),
        "invalid UTF-8 in a header name: {status:?}"
    );
    tried.push(format!("invalid UTF-8 in a header name -> {status:?}"));
    let (reply, _) = raw(
        addr,
        b"GET /v1/topics/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        wait,
    );
    let status = status_of(&reply);
    assert!(
        status.is_none() || (400..500).contains(&status.unwrap_or(0)),
        "invalid UTF-8 in the path: {status:?}"
    );
    tried.push(format!("invalid UTF-8 in the path -> {status:?}"));

    // Random bytes: 4xx or closed, within the bound.
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for i in 0..20 {
        let bytes = rng.bytes(if i % 2 == 0 { 64 * 1024 } else { 512 });
        let (reply, closed) = raw(addr, &bytes, wait);
        let status = status_of(&reply);
        assert!(
            closed || status.is_some(),
            "random bytes #{i}: neither answered nor closed"
        );
        assert!(
            status.is_none_or(|s| (400..500).contains(&s)),
            "random bytes #{i}: {status:?}"
        );
    }
    tried.push("20 x random bytes (512 B / 64 KiB) -> 4xx or closed".into());
    tried
}

/// A request head declaring a body of `len` bytes, without the body; reads the reply.
fn request_head_only(c: &mut TcpStream, path: &str, len: usize) -> Reply {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
    );
    c.write_all(head.as_bytes()).unwrap();
    read_reply(c).unwrap()
}

/// Slowloris: heads trickled a byte at a time; the server must close each within the
/// header timeout (plus slack). Returns how long the slowest took to be closed.
fn slowloris(addr: SocketAddr, connections: usize) -> Duration {
    let mut conns: Vec<(TcpStream, Instant, bool)> = (0..connections)
        .map(|_| {
            let mut s = connect(addr, Duration::from_secs(10));
            s.set_nonblocking(true).unwrap();
            let _ = s.write_all(b"POST /v1/topics/wb/messages HTTP/1.1\r\nHost: x\r\n");
            (s, Instant::now(), false)
        })
        .collect();
    let limit = HEADER_TIMEOUT + Duration::from_secs(5);
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut byte = 0u8;
    while conns.iter().any(|c| !c.2) {
        assert!(
            t0.elapsed() < limit + Duration::from_secs(2),
            "slowloris connections still open after {:?}",
            t0.elapsed()
        );
        byte = byte.wrapping_add(1);
        for (s, started, closed) in &mut conns {
            if *closed {
                continue;
            }
            let _ = s.write(&[b'a' + byte % 26]);
            let mut buf = [0u8; 1024];
            match s.read(&mut buf) {
                Ok(0) => *closed = true,
                Ok(_) => {} // a 408/400 answer before the close is fine too
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *closed = true,
            }
            if *closed {
                let took = started.elapsed();
                assert!(
                    took <= limit,
                    "a slowloris connection was closed only after {took:?}"
                );
                slowest = slowest.max(took);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    slowest
}

/// Bodies that stall: heads complete, then part of the body and a pause longer than the
/// header timeout. Each must be answered 408 `body_timeout` within the timeout (plus
/// slack). And a body trickled a byte at a time, with pauses shorter than the timeout,
/// is still read and published (the bound is on pauses, not on slow senders).
/// Returns how long the slowest stalled body took to be answered.
fn stalled_bodies(addr: SocketAddr, connections: usize) -> Duration {
    let limit = HEADER_TIMEOUT + Duration::from_secs(5);
    // A topic of its own: the well-behaved client counts what it consumes from its topic.
    let mut s = connect(addr, limit + Duration::from_secs(5));
    let created = request(
        &mut s,
        "PUT",
        "/v1/topics/trickle",
        &[("Content-Type", "application/json")],
        b"{}",
    )
    .unwrap();
    assert!(
        created.status == 201 || created.status == 200,
        "topic: {}",
        created.status
    );
    let stalled: Vec<_> = (0..connections)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = connect(addr, limit + Duration::from_secs(5));
                let started = Instant::now();
                let head = "POST /v1/topics/trickle/messages HTTP/1.1\r\nHost: x\r\n\
                    Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n";
                s.write_all(head.as_bytes()).unwrap();
                s.write_all(format!("stalled {i:03}").as_bytes()).unwrap();
                let reply = read_reply(&mut s)
                    .unwrap_or_else(|e| panic!("no answer to a stalled body: {e}"));
                let took = started.elapsed();
                reply.assert_problem(408, "stalled body");
                assert_eq!(reply.json()["code"], "body_timeout");
                assert!(
                    took <= limit,
                    "a stalled body was answered only after {took:?}"
                );
                assert!(
                    took >= HEADER_TIMEOUT,
                    "a stalled body was cut before the timeout ({took:?})"
                );
                took
            })
        })
        .collect();
    // Slow but steady: 8 bytes, one every quarter of the header timeout.
    let head = "POST /v1/topics/trickle/messages HTTP/1.1\r\nHost: x\r\n\
        Content-Type: application/octet-stream\r\nContent-Length: 8\r\n\r\n";
    s.write_all(head.as_bytes()).unwrap();
    for b in b"trickled" {
        std::thread::sleep(HEADER_TIMEOUT / 4);
        s.write_all(&[*b]).unwrap();
    }
    let reply = read_reply(&mut s).unwrap();
    assert_eq!(
        reply.status,
        201,
        "a slow but steady body: {}",
        String::from_utf8_lossy(&reply.body)
    );
    stalled
        .into_iter()
        .map(|t| t.join().expect("stalled body"))
        .max()
        .unwrap_or_default()
}

/// Random bytes and an oversized frame on the MLLP port.
fn mllp_content_attacks(addr: SocketAddr) -> Vec<String> {
    let mut tried = Vec::new();
    let wait = Duration::from_secs(10);
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    for i in 0..20 {
        let mut bytes = rng.bytes(if i % 2 == 0 { 256 * 1024 } else { 1024 });
        if i % 4 == 1 {
            // Random content inside a frame: a negative ACK is due.
            bytes = mllp_frame(&bytes);
        }
        // The server answers what it can and waits for more: close our side after
        // a while.
        let (reply, _) = raw(addr, &bytes, Duration::from_millis(500));
        let text = String::from_utf8_lossy(&reply);
        assert!(
            !text.contains("MSA|AA") && !text.contains("MSA|CA"),
            "random bytes #{i} were accepted: {text:?}"
        );
    }
    tried.push("20 x random bytes (1 KiB / 256 KiB, some framed) -> no positive ACK".into());
    // A frame over the 8 MiB limit: AR, then the connection is closed.
    let mut frame = vec![0x0b];
    frame.extend(std::iter::repeat_n(b'M', 9 << 20));
    frame.extend_from_slice(&[0x1c, 0x0d]);
    let (reply, closed) = raw(addr, &frame, wait);
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains("MSA|AR") || text.is_empty(),
        "oversized frame: {text:?}"
    );
    assert!(closed, "the connection of an oversized frame stays open");
    tried.push("9 MiB MLLP frame -> AR, closed".into());
    tried
}

/// Opens `count` connections from 8 threads at once (a connect whose SYN the kernel
/// dropped waits a second for its retry) and returns those that connected, and how
/// many did not (the kernel's accept queue was full).
fn flood(addr: SocketAddr, count: usize) -> (Vec<TcpStream>, usize, Duration) {
    let started = Instant::now();
    let threads = 8;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let n = count / threads + usize::from(t < count % threads);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut v = Vec::with_capacity(n);
                let mut failed = 0;
                for _ in 0..n {
                    if t0.elapsed() > Duration::from_secs(30) {
                        failed += 1;
                        continue;
                    }
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                        Ok(s) => v.push(s),
                        Err(_) => failed += 1,
                    }
                }
                (v, failed)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(count);
    let mut failed = 0;
    for h in handles {
        let (v, f) = h.join().expect("flood thread");
        all.extend(v);
        failed += f;
    }
    (all, failed, started.elapsed())
}

/// Waits (bounded) until the server has closed every connection; returns how many
/// are still open at the end.
fn wait_all_closed(conns: &mut [TcpStream], within: Duration) -> usize {
    for c in conns.iter() {
        c.set_nonblocking(true).unwrap();
    }
    let mut open: Vec<bool> = vec![true; conns.len()];
    let t0 = Instant::now();
    loop {
        let mut buf = [0u8; 256];
        for (c, o) in conns.iter_mut().zip(open.iter_mut()) {
            if !*o {
                continue;
            }
            match c.read(&mut buf) {
                Ok(0) => *o = false,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *o = false,
            }
        }
        let still = open.iter().filter(|o| **o).count();
        if still == 0 || t0.elapsed() > within {
            return still;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------- the test

#[test]
fn every_listener_survives_hostile_input_and_floods_with_bounded_memory() {
    let started = Instant::now();
    let soft = raise_nofile();
    // Two floods held by this process at once, plus slack.
    let flood_count = FLOOD.min(usize::try_from(soft.saturating_sub(400) / 2).unwrap_or(FLOOD));
    eprintln!("open-files limit {soft}: {flood_count} flood connections per listener");
    assert!(
        flood_count >= 300,
        "too few file descriptors for a flood: soft limit {soft}"
    );

    let data = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let timeout_ms = HEADER_TIMEOUT.as_millis().to_string();
    let http_max = HTTP_MAX_CONNECTIONS.min(flood_count / 2);
    let max_conn = http_max.to_string();
    let server = Server::start_with_env(
        data.path(),
        &[
            "--http-header-timeout-ms",
            &timeout_ms,
            "--http-max-connections",
            &max_conn,
        ],
        &[("CAREBUS_LOG", "info")],
    );
    let pid = server.child.id();
    let http = server.addr;
    let mllp: SocketAddr =
        server.wait_log("mllp listening", Duration::from_secs(30))["fields"]["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    assert_eq!(
        curl(&["-s", "-X", "PUT", &server.url("/v1/topics/wb")]).0,
        201
    );
    assert_eq!(
        curl(&[
            "-s",
            "-X",
            "PUT",
            &server.url("/v1/topics/wb/subscriptions/wb")
        ])
        .0,
        201
    );
    let template = String::from_utf8(
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(HL7_FIXTURE)).unwrap(),
    )
    .unwrap();

    let mut conn = connect(http, WELL_BEHAVED_BOUND);
    let mut mllp_conn = connect(mllp, WELL_BEHAVED_BOUND);
    // A long poll longer than the header timeout keeps its connection (the deadline
    // only covers request heads), and so does the connection afterwards.
    let t0 = Instant::now();
    let r = request(
        &mut conn,
        "POST",
        "/v1/topics/wb/subscriptions/wb/receive",
        &[("Content-Type", "application/json")],
        format!("{{\"wait_ms\": {}}}", HEADER_TIMEOUT.as_millis() + 1000).as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(t0.elapsed() >= HEADER_TIMEOUT, "the long poll did not wait");
    // Warm up (allocations settle) before the first measurement.
    for i in 0..50 {
        let r = request(
            &mut conn,
            "POST",
            "/v1/topics/wb/messages",
            &[("Idempotency-Key", &format!("warm-{i}"))],
            b"warm-up",
        )
        .unwrap();
        assert_eq!(r.status, 201);
        mllp_send(&mut mllp_conn, &template, &format!("WARM-{i}")).unwrap();
    }
    let r = request(
        &mut conn,
        "POST",
        "/v1/topics/wb/subscriptions/wb/ack",
        &[("Content-Type", "application/json")],
        br#"{"partition": 0, "offset": 49}"#,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // An idle keep-alive connection is closed after the header timeout.
    let mut idle = connect(http, Duration::from_secs(10));
    assert_eq!(
        request(&mut idle, "GET", "/healthz", &[], b"")
            .unwrap()
            .status,
        200
    );
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let n = idle.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the idle keep-alive connection got data");
    assert!(
        t0.elapsed() < HEADER_TIMEOUT + Duration::from_secs(3),
        "idle keep-alive connection closed only after {:?}",
        t0.elapsed()
    );

    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_kib(pid);
    let fds_before = fd_count(pid);

    // Sample RSS and open files while the attack runs.
    let stop_monitor = Arc::new(AtomicBool::new(false));
    let monitor = {
        let stop = Arc::clone(&stop_monitor);
        std::thread::spawn(move || {
            let (mut peak_rss, mut peak_fds) = (0u64, 0usize);
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(120) {
                peak_rss = peak_rss.max(rss_kib(pid));
                peak_fds = peak_fds.max(fd_count(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            (peak_rss, peak_fds)
        })
    };
    // The well-behaved client's HTTP connection, opened just before the attack (an idle
    // keep-alive connection is closed after the header timeout, as shown above).
    drop(conn);
    let conn = connect(http, WELL_BEHAVED_BOUND);
    let stop_wb = Arc::new(AtomicBool::new(false));
    let wb = Arc::new(WellBehaved::default());
    let client = {
        let (stop, wb, template) = (Arc::clone(&stop_wb), Arc::clone(&wb), template.clone());
        std::thread::spawn(move || well_behaved(conn, mllp_conn, template, stop, wb))
    };
    let fresh_client = {
        let (stop, wb) = (Arc::clone(&stop_wb), Arc::clone(&wb));
        std::thread::spawn(move || fresh_requests(http, stop, wb))
    };

    // CAREBUS_HOSTILE_ROUNDS repeats the attack (default 1) to show that RSS levels off.
    let rounds: u32 = std::env::var("CAREBUS_HOSTILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .clamp(1, 10);
    let mut tried = Vec::new();
    let (mut phase1_took, mut phase2_took) = (Duration::ZERO, Duration::ZERO);
    let (mut fds_flooded, mut rss_flooded) = (0, 0);
    let mut rss_rounds = Vec::new();
    for round in 1..=rounds {
        // Phase 1: content attacks and slowloris on both listeners at once.
        let phase1 = Instant::now();
        let http_attacks = {
            let files = files.path().to_owned();
            std::thread::spawn(move || http_content_attacks(http, files))
        };
        let mllp_attacks = std::thread::spawn(move || mllp_content_attacks(mllp));
        let slow = std::thread::spawn(move || slowloris(http, 50));
        let stalls = std::thread::spawn(move || stalled_bodies(http, 10));
        let mut round_tried = http_attacks.join().expect("HTTP content attacks");
        round_tried.extend(mllp_attacks.join().expect("MLLP content attacks"));
        let slowest_slowloris = slow.join().expect("slowloris");
        round_tried.push(format!(
            "50 slowloris heads (a byte per 100 ms) -> all closed, slowest after {slowest_slowloris:?}"
        ));
        let slowest_stall = stalls.join().expect("stalled bodies");
        round_tried.push(format!(
            "10 bodies stalled after 11 of 1000 bytes -> all 408 body_timeout, slowest after {slowest_stall:?}; a body trickled a byte per {:?} -> 201",
            HEADER_TIMEOUT / 4
        ));
        phase1_took += phase1.elapsed();

        // Phase 2: connection floods past both bounds, held until the server has closed
        // the HTTP ones (idle: no head within the header timeout).
        let phase2 = Instant::now();
        let http_flood = std::thread::spawn(move || flood(http, flood_count));
        let mllp_flood = std::thread::spawn(move || flood(mllp, flood_count));
        let (mut http_flood, http_refused, http_flood_took) =
            http_flood.join().expect("HTTP flood");
        let (mut mllp_flood, mllp_refused, mllp_flood_took) =
            mllp_flood.join().expect("MLLP flood");
        std::thread::sleep(Duration::from_millis(500));
        fds_flooded = fds_flooded.max(fd_count(pid));
        rss_flooded = rss_flooded.max(rss_kib(pid));
        // Each wave of at most `http_max` is closed after the header timeout.
        let waves = u32::try_from(http_flood.len().div_ceil(http_max)).unwrap();
        let within = HEADER_TIMEOUT * (waves + 1) + Duration::from_secs(10);
        let still_open = wait_all_closed(&mut http_flood, within);
        assert_eq!(
            still_open, 0,
            "{still_open} idle HTTP flood connections still open after {within:?}"
        );
        let http_flood_closed_after = phase2.elapsed();
        // MLLP: the listener keeps at most its bound and closes the excess at once.
        let mllp_kept = wait_all_closed(&mut mllp_flood, Duration::from_secs(5));
        assert!(
            mllp_kept <= MLLP_MAX_CONNECTIONS,
            "the MLLP listener holds {mllp_kept} connections (bound {MLLP_MAX_CONNECTIONS})"
        );
        round_tried.push(format!(
            "{} HTTP connections at once (bound {http_max}; {} connected in {http_flood_took:?}, {http_refused} not let in by the kernel) -> all closed by the server after {http_flood_closed_after:?}",
            flood_count,
            http_flood.len()
        ));
        round_tried.push(format!(
            "{flood_count} MLLP connections at once (bound {MLLP_MAX_CONNECTIONS}; {} connected in {mllp_flood_took:?}, {mllp_refused} not let in by the kernel) -> {mllp_kept} kept, the rest closed at once",
            mllp_flood.len()
        ));
        drop(http_flood);
        drop(mllp_flood);
        phase2_took += phase2.elapsed();
        if round == 1 {
            tried = round_tried;
        }
        // Every attack connection closed (the well-behaved ones stay): RSS now.
        let t0 = Instant::now();
        while fd_count(pid) > fds_before + 8 && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        rss_rounds.push(rss_kib(pid));
    }

    // Let the well-behaved client run a little past the attack, then stop it.
    std::thread::sleep(Duration::from_secs(1));
    stop_wb.store(true, Ordering::Relaxed);
    client.join().expect("well-behaved client");
    fresh_client
        .join()
        .expect("well-behaved client (new connections)");
    stop_monitor.store(true, Ordering::Relaxed);
    let (peak_rss, peak_fds) = monitor.join().unwrap();

    // After: every attack connection closed; fresh connections work on both listeners.
    let t0 = Instant::now();
    while fd_count(pid) > fds_before + 8 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let fds_after = fd_count(pid);
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss_kib(pid);
    let mut fresh = connect(http, Duration::from_secs(10));
    let r = request(
        &mut fresh,
        "POST",
        "/v1/topics/wb/messages",
        &[("Idempotency-Key", "after-the-attack")],
        b"after",
    )
    .unwrap();
    assert_eq!(r.status, 201);
    let mut fresh_mllp = connect(mllp, Duration::from_secs(10));
    mllp_send(&mut fresh_mllp, &template, "AFTER-THE-ATTACK").unwrap();

    let failures = wb.failures.lock().unwrap().clone();
    let published = wb.published.load(Ordering::Relaxed);
    let consumed = wb.consumed.load(Ordering::Relaxed);
    let mllp_sent = wb.mllp_sent.load(Ordering::Relaxed);
    let fresh_count = wb.fresh_connections.load(Ordering::Relaxed);
    eprintln!("inputs tried:");
    for t in &tried {
        eprintln!("  - {t}");
    }
    eprintln!(
        "well-behaved client: {published} published, {consumed} consumed and acked, {mllp_sent} HL7 messages over MLLP, {fresh_count} requests on new connections; slowest request {} ms on its connection, {} ms on a new one",
        wb.slowest_ms.load(Ordering::Relaxed),
        wb.slowest_fresh_ms.load(Ordering::Relaxed)
    );
    eprintln!(
        "server RSS: before {} MiB, peak {} MiB, with the floods held {} MiB, after {} MiB (bound: before + {} MiB)",
        mib(rss_before),
        mib(peak_rss),
        mib(rss_flooded),
        mib(rss_after),
        RSS_GROWTH_BOUND_KIB / 1024
    );
    eprintln!(
        "server RSS after each round (MiB): {}",
        rss_rounds
            .iter()
            .map(|k| mib(*k))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "server open files: before {fds_before}, with the floods held {fds_flooded}, peak {peak_fds}, after {fds_after}"
    );
    eprintln!(
        "phases: content attacks + slowloris {phase1_took:?}, floods {phase2_took:?} ({rounds} round(s)); whole test {:?}",
        started.elapsed()
    );

    assert!(
        failures.is_empty(),
        "well-behaved operations failed: {failures:?}"
    );
    assert!(
        published >= 10,
        "the well-behaved client published only {published}"
    );
    assert_eq!(published, consumed, "every published message consumed");
    assert!(fresh_count >= 1, "no request on a new connection was made");
    assert!(
        rss_after <= rss_before + RSS_GROWTH_BOUND_KIB,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // The floods cost the server at most its bounds in open files.
    assert!(
        peak_fds <= fds_before + http_max + MLLP_MAX_CONNECTIONS + 64,
        "the server held {peak_fds} open files (before {fds_before})"
    );
    assert!(
        fds_after <= fds_before + 8,
        "{fds_after} open files after (before {fds_before})"
    );
    let (status, logs) = server.terminate_with_logs();
    assert_eq!(status.code(), Some(0));
    assert!(
        logs.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("http connection limit reached"))),
        "the HTTP flood never reached --http-max-connections"
    );
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// Seconds until the server closes an idle connection (or `None` within `wait`).
fn idle_close_after(addr: SocketAddr, wait: Duration) -> Option<Duration> {
    let mut s = connect(addr, Duration::from_secs(10));
    s.set_read_timeout(Some(wait)).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => Some(t0.elapsed()),
        Ok(_) => panic!("an idle connection got data"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(_) => Some(t0.elapsed()),
    }
}

#[test]
fn http_limits_come_from_flags_environment_and_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("carebus.toml");
    std::fs::write(
        &file,
        "http_header_timeout_ms = 500\nhttp_max_connections = 1\n",
    )
    .unwrap();
    let cfg = file.to_str().unwrap();

    // From the file: idle connections closed after 0.5 s; one connection at a time,
    // the next waits until it is closed.
    let server = Server::start(&dir.path().join("a"), &["--config", cfg]);
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let closed = idle_close_after(server.addr, Duration::from_secs(5)).expect("not closed");
    assert!(
        closed >= Duration::from_millis(300) && closed < Duration::from_secs(3),
        "{closed:?}"
    );
    let mut holder = connect(server.addr, Duration::from_secs(10));
    let t0 = Instant::now();
    let mut waiting = connect(server.addr, Duration::from_secs(10));
    let r = request(&mut waiting, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "served while the only slot was taken"
    );
    let mut buf = [0u8; 8];
    holder
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(holder.read(&mut buf).unwrap_or(0), 0);
    let (status, logs) = server.terminate_with_logs();
    assert_eq!(status.code(), Some(0));
    let limit = logs
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("http connection limit reached"))
        })
        .expect("no 'http connection limit reached' log line");
    assert_eq!(limit["fields"]["max_connections"], 1);

    // The environment beats the file, a flag beats both.
    let server = Server::start_with_env(
        &dir.path().join("b"),
        &["--config", cfg],
        &[("CAREBUS_HTTP_HEADER_TIMEOUT_MS", "5000")],
    );
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    assert_eq!(
        idle_close_after(server.addr, Duration::from_millis(1500)),
        None
    );
    assert_eq!(server.terminate().code(), Some(0));
    let server = Server::start_with_env(
        &dir.path().join("c"),
        &["--config", cfg, "--http-header-timeout-ms", "300"],
        &[("CAREBUS_HTTP_HEADER_TIMEOUT_MS", "5000")],
    );
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    assert!(
        idle_close_after(server.addr, Duration::from_secs(5))
            .is_some_and(|d| d < Duration::from_secs(3))
    );
    assert_eq!(server.terminate().code(), Some(0));

    // Zero is refused everywhere.
    let out = common::carebus()
        .args(["serve", "--http-max-connections", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = common::carebus()
        .args(["serve", "--http-header-timeout-ms", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(&file, "http_header_timeout_ms = 0\n").unwrap();
    let out = common::carebus()
        .args(["serve", "--config", cfg])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("http_header_timeout_ms"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client pool that opened more connections than `--http-max-connections`, each
/// with a fresh publish (answered after its fsync): the requests on the connections
/// waiting in the accept queue are served within a few seconds, because the accepted
/// connections, idle after their answers, give way after their grace (1 s) — not after
/// the 30 s header timeout. Every message is stored once.
#[test]
fn at_the_bound_idle_connections_give_way_to_waiting_publishes() {
    const BOUND: usize = 4;
    const WAITING: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--http-max-connections", &BOUND.to_string()],
    );
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let mut setup = connect(server.addr, Duration::from_secs(10));
    let r = request(
        &mut setup,
        "PUT",
        "/v1/topics/crowd",
        &[("content-type", "application/json")],
        br#"{"partitions":1}"#,
    )
    .unwrap();
    assert!(r.status == 200 || r.status == 201, "{}", r.status);
    drop(setup);

    let publish = |s: &mut TcpStream, i: usize| {
        let key = format!("crowd-{i}");
        request(
            s,
            "POST",
            "/v1/topics/crowd/messages",
            &[("idempotency-key", &key)],
            format!("message {i}").as_bytes(),
        )
    };
    // Fill the bound with keep-alive connections, each answered 201 and then idle.
    // (The setup connection's slot frees when the server sees it closed: retry once.)
    let mut idle = Vec::new();
    for i in 0..BOUND {
        let mut s = connect(server.addr, Duration::from_secs(30));
        let r = publish(&mut s, i).unwrap();
        assert_eq!(r.status, 201, "publish {i}");
        idle.push(s);
    }
    let t0 = Instant::now();
    let mut waiting = Vec::new();
    for i in BOUND..BOUND + WAITING {
        let mut s = connect(server.addr, Duration::from_secs(30));
        let key = format!("crowd-{i}");
        let body = format!("message {i}");
        let req = format!(
            "POST /v1/topics/crowd/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             idempotency-key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        waiting.push(s);
    }
    for (i, s) in waiting.iter_mut().enumerate() {
        let r = read_reply(s).unwrap_or_else(|e| panic!("waiting publish {i}: {e}"));
        assert_eq!(r.status, 201, "waiting publish {i}");
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "waiting publishes served after {took:?} (the header timeout is 30 s)"
    );
    let mut gave_way = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 8];
        if matches!(s.read(&mut buf), Ok(0)) {
            gave_way += 1;
        }
    }
    assert!(
        gave_way >= WAITING,
        "only {gave_way} idle connections gave way"
    );
    let mut check = connect(server.addr, Duration::from_secs(30));
    let r = request(&mut check, "GET", "/v1/topics/crowd", &[], b"").unwrap();
    assert_eq!(r.json()["published"], (BOUND + WAITING) as u64);
    assert_eq!(r.json()["duplicates"], 0);
    drop(check);
    assert_eq!(server.terminate().code(), Some(0));
}
