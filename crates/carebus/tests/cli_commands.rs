//! The client commands of the `carebus` binary, run as processes against a real
//! `carebus serve` on 127.0.0.1: `topics` (tables and `--json`), `produce` (argument,
//! stdin, files, `--lines`, duplicate and conflicting idempotency keys), `consume`
//! (prints and acknowledges; `--no-ack`, `--max`), `dlq`, `trace`, and the documented
//! exit codes (3 unreachable, 4 not found, 5 conflict, 2 usage). Parts whose endpoints
//! the server's `/openapi.json` does not list yet are skipped with a printed notice.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::zombie_processes
)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A `carebus serve` on a free port, killed on drop.
struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let (child, addr) = spawn_server(dir.path(), "127.0.0.1:0");
        let server = Server {
            child,
            url: format!("http://{addr}"),
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(&format!("{}/readyz", self.url)).0 != 200 {
            assert!(Instant::now() < deadline, "not ready within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The API paths the server documents, with parameter names blanked: `{}`.
    fn paths(&self) -> BTreeSet<String> {
        let (status, body) = http_get(&format!("{}/openapi.json", self.url));
        assert_eq!(status, 200);
        let doc: Value = serde_json::from_str(&body).unwrap();
        doc["paths"]
            .as_object()
            .map(|m| m.keys().map(|k| blank_params(k)).collect())
            .unwrap_or_default()
    }

    /// Whether every path is served; prints a notice naming the skipped part if not.
    fn supports(&self, part: &str, paths: &[&str]) -> bool {
        let have = self.paths();
        let missing: Vec<&&str> = paths
            .iter()
            .filter(|p| !have.contains(&blank_params(p)))
            .collect();
        if missing.is_empty() {
            return true;
        }
        eprintln!("NOTICE: skipping {part}: the server does not serve {missing:?} yet");
        false
    }

    /// Runs `carebus ARGS` against this server.
    fn cli(&self, args: &[&str]) -> Output {
        cli(&self.url, args, None)
    }

    fn cli_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        cli(&self.url, args, Some(stdin))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn blank_params(path: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in path.chars() {
        match c {
            '{' => {
                inside = true;
                out.push('{');
            }
            '}' => {
                inside = false;
                out.push('}');
            }
            _ if inside => {}
            _ => out.push(c),
        }
    }
    out
}

/// Starts `carebus serve` with JSON logs and returns it with its HTTP address.
fn spawn_server(data_dir: &Path, http_addr: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_carebus"))
        .args(["--log-format", "json", "serve", "--http-addr", http_addr])
        .arg("--data-dir")
        .arg(data_dir)
        // A free MLLP port too, where the server has an MLLP listener.
        .env("CAREBUS_MLLP_ADDR", "127.0.0.1:0")
        .env_remove("CAREBUS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["fields"]["message"] == "http listening"
            {
                let _ = tx.send(v["fields"]["addr"].as_str().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("carebus listens within 30 s");
    (child, addr)
}

/// A minimal HTTP GET over TCP (status, body).
fn http_get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let Ok(mut s) = std::net::TcpStream::connect(host) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[derive(Debug)]
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }
}

/// Runs the CLI with `CAREBUS_URL=url`, bounded to 60 s.
fn cli(url: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_carebus"))
        .args(args)
        .env("CAREBUS_URL", url)
        .env_remove("CAREBUS_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).unwrap();
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("carebus {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn end_total(server: &Server, topic: &str) -> u64 {
    let t = server.cli(&["topics", "get", topic, "--json"]).ok().json();
    t["end_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn topics_create_list_get_update_delete() {
    let server = Server::start();
    let out = server.cli(&["topics", "create", "lab.results", "--partitions", "3"]);
    out.ok();
    assert!(out.stdout.contains("lab.results"), "{out:?}");
    assert!(out.stdout.contains("partitions"), "{out:?}");

    // Creating it again is refused (exit 5) and changes nothing.
    let again = server.cli(&["topics", "create", "lab.results", "--partitions", "1"]);
    assert_eq!(again.code, 5, "{again:?}");
    assert!(again.stderr.contains("exists already"), "{again:?}");

    server
        .cli(&["topics", "create", "hl7.adt", "--retention-ms", "3600000"])
        .ok();
    let table = server.cli(&["topics", "list"]);
    table.ok();
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(
        lines[1].contains("TOPIC") && lines[1].contains("PARTITIONS"),
        "{table:?}"
    );
    let adt = lines.iter().position(|l| l.contains("hl7.adt")).unwrap();
    let lab = lines
        .iter()
        .position(|l| l.contains("lab.results"))
        .unwrap();
    assert!(adt < lab, "sorted by name: {table:?}");
    assert!(lines[lab].contains(" 3 "), "{table:?}");

    let list = server.cli(&["topics", "list", "--json"]).ok().json();
    let names: Vec<&str> = list["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hl7.adt", "lab.results"]);

    let got = server
        .cli(&["topics", "get", "hl7.adt", "--json"])
        .ok()
        .json();
    assert_eq!(got["partitions"], 1);
    assert_eq!(got["config"]["retention_ms"], 3_600_000);

    // update keeps what it is not told to change.
    let updated = server
        .cli(&[
            "topics",
            "update",
            "lab.results",
            "--retention-ms",
            "60000",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(updated["partitions"], 3);
    assert_eq!(updated["config"]["retention_ms"], 60_000);
    let shrink = server.cli(&["topics", "update", "lab.results", "--partitions", "2"]);
    assert_eq!(shrink.code, 5, "partitions cannot shrink: {shrink:?}");

    let del = server.cli(&["topics", "delete", "hl7.adt"]);
    del.ok();
    assert!(del.stdout.contains("deleted topic hl7.adt"));
    let gone = server.cli(&["topics", "get", "hl7.adt"]);
    assert_eq!(gone.code, 4, "{gone:?}");
    assert!(gone.stderr.contains("unknown_topic"), "{gone:?}");
    let gone = server.cli(&["topics", "delete", "hl7.adt"]);
    assert_eq!(gone.code, 4, "{gone:?}");
}

#[test]
fn produce_from_argument_stdin_files_and_lines() {
    let server = Server::start();
    server
        .cli(&["topics", "create", "lab", "--partitions", "2"])
        .ok();

    // From an argument, with keys, content type and headers.
    let one = server
        .cli(&[
            "produce",
            "lab",
            "OBX|1|NM|2345-7",
            "--key",
            "MRN1",
            "--idempotency-key",
            "LIS|1",
            "--content-type",
            "x-application/hl7-v2+er7",
            "--header",
            "origin=lis",
            "-H",
            "facility=NORTHGATE",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(one["stored"], 1);
    let r = &one["results"][0];
    assert_eq!(r["source"], "argument");
    assert_eq!(r["idempotency_key"], "LIS|1");
    assert_eq!(r["duplicate"], false);
    let (status, body) = http_get(&format!(
        "{}/v1/topics/lab/messages/{}/{}",
        server.url, r["partition"], r["offset"]
    ));
    assert_eq!(status, 200);
    let stored: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stored["partition_key"], "MRN1");
    assert_eq!(stored["content_type"], "x-application/hl7-v2+er7");
    assert_eq!(stored["headers"]["origin"], "lis");
    assert_eq!(stored["headers"]["facility"], "NORTHGATE");

    // From standard input, byte for byte (a CR-separated HL7 message).
    let hl7 = b"MSH|^~\\&|LIS\rPID|1||MRN2\r";
    let from_stdin = server.cli_stdin(&["produce", "lab", "--json"], hl7);
    let r = &from_stdin.ok().json()["results"][0];
    assert_eq!(r["source"], "stdin");
    assert!(r["idempotency_key"].as_str().unwrap().starts_with("cbc-"));
    let (_, body) = http_get(&format!(
        "{}/v1/topics/lab/messages/{}/{}",
        server.url, r["partition"], r["offset"]
    ));
    let stored: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        stored["body_base64"],
        "TVNIfF5+XCZ8TElTDVBJRHwxfHxNUk4yDQ=="
    );

    // From files: one message per file; a table by default.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    std::fs::write(&a, br#"{"resourceType":"Patient"}"#).unwrap();
    std::fs::write(&b, br#"{"resourceType":"Observation"}"#).unwrap();
    let files = server.cli(&[
        "produce",
        "lab",
        "--file",
        a.to_str().unwrap(),
        "-f",
        b.to_str().unwrap(),
    ]);
    files.ok();
    assert!(files.stdout.contains("a.json") && files.stdout.contains("b.json"));
    assert_eq!(files.stdout.matches("stored").count(), 2, "{files:?}");

    // --lines: one message per non-empty line, CRLF tolerated; keys KEY#n.
    let lines = server
        .cli_stdin(
            &[
                "produce",
                "lab",
                "--lines",
                "--idempotency-key",
                "BATCH7",
                "--json",
            ],
            b"first\r\nsecond\n\nthird\n",
        )
        .ok()
        .json();
    let keys: Vec<&str> = lines["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["idempotency_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["BATCH7#1", "BATCH7#2", "BATCH7#3"]);
    // --lines over a file, too.
    std::fs::write(&a, b"x\ny\n").unwrap();
    server
        .cli(&["produce", "lab", "--lines", "-f", a.to_str().unwrap()])
        .ok();
    assert_eq!(end_total(&server, "lab"), 1 + 1 + 2 + 3 + 2);

    // Running the same --lines import again stores nothing new.
    let rerun = server
        .cli_stdin(
            &[
                "produce",
                "lab",
                "--lines",
                "--idempotency-key",
                "BATCH7",
                "--json",
            ],
            b"first\r\nsecond\n\nthird\n",
        )
        .ok()
        .json();
    assert_eq!(rerun["duplicates"], 3);
    assert_eq!(end_total(&server, "lab"), 9);

    // Nothing to send: an error, not an empty message.
    let empty = server.cli_stdin(&["produce", "lab", "--lines"], b"\n\n");
    assert_eq!(empty.code, 1, "{empty:?}");
}

#[test]
fn duplicate_produce_reports_duplicate_and_stores_once() {
    let server = Server::start();
    server.cli(&["topics", "create", "orders"]).ok();
    let args = [
        "produce",
        "orders",
        "RXO|med-1",
        "--idempotency-key",
        "PHARM|ORDER-1",
        "--json",
    ];
    let first = server.cli(&args).ok().json();
    assert_eq!(first["stored"], 1);
    let second = server.cli(&args).ok().json();
    assert_eq!(second["duplicates"], 1);
    assert_eq!(second["results"][0]["duplicate"], true);
    assert_eq!(
        second["results"][0]["offset"],
        first["results"][0]["offset"]
    );
    let table = server.cli(&args[..5]);
    table.ok();
    assert!(table.stdout.contains("duplicate"), "{table:?}");
    assert_eq!(end_total(&server, "orders"), 1);

    // Same key, different body: not stored, exit 5.
    let conflict = server.cli(&[
        "produce",
        "orders",
        "RXO|med-2",
        "--idempotency-key",
        "PHARM|ORDER-1",
    ]);
    assert_eq!(conflict.code, 5, "{conflict:?}");
    assert!(conflict.stdout.contains("conflict"));
    assert_eq!(end_total(&server, "orders"), 1);
}

#[test]
fn consume_prints_and_acknowledges() {
    let server = Server::start();
    let sub_paths = [
        "/v1/topics/{topic}/subscriptions/{s}",
        "/v1/topics/{topic}/subscriptions/{s}/receive",
        "/v1/topics/{topic}/subscriptions/{s}/ack",
    ];
    if !server.supports("consume", &sub_paths) {
        return;
    }
    server.cli(&["topics", "create", "adt"]).ok();
    server
        .cli(&[
            "subscriptions",
            "create",
            "adt",
            "billing",
            "--start",
            "earliest",
        ])
        .ok();
    let again = server.cli(&["subscriptions", "create", "adt", "billing"]);
    assert_eq!(again.code, 5, "{again:?}");
    let subs = server
        .cli(&["subscriptions", "list", "adt", "--json"])
        .ok()
        .json();
    assert_eq!(subs["subscriptions"][0]["name"], "billing");
    server
        .cli_stdin(
            &["produce", "adt", "--lines", "--key", "MRN7"],
            b"A01 admit\nA08 update\nA03 discharge\n",
        )
        .ok();

    let got = server.cli(&["consume", "adt", "billing", "--json"]);
    let lines = got.ok().json_lines();
    let bodies: Vec<&str> = lines.iter().map(|l| l["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["A01 admit", "A08 update", "A03 discharge"]);
    assert!(
        lines
            .iter()
            .all(|l| l["attempt"] == 1 && l["partition_key"] == "MRN7")
    );
    assert!(lines[0]["delivery_id_str"].is_string());

    // All acknowledged: nothing more to get.
    let none = server.cli(&["consume", "adt", "billing", "--json", "--wait-ms", "300"]);
    assert_eq!(none.ok().stdout, "");
    let sub = server
        .cli(&["subscriptions", "get", "adt", "billing", "--json"])
        .ok()
        .json();
    assert_eq!(sub["stats"]["acked"], 3);
    assert_eq!(sub["stats"]["backlog"], 0);

    // Human output prints the body; --max stops early.
    server
        .cli_stdin(
            &["produce", "adt", "--lines"],
            b"A04 register\nA05 pre-admit\n",
        )
        .ok();
    let human = server.cli(&["consume", "adt", "billing", "--max", "1"]);
    human.ok();
    assert!(human.stdout.contains("A04 register"), "{human:?}");
    assert!(!human.stdout.contains("A05"), "{human:?}");
    assert!(human.stdout.contains("offset 3"), "{human:?}");
    assert!(
        human
            .stderr
            .contains("1 message(s) received, 1 acknowledged")
    );

    // --no-ack: the delivery stays leased and comes back after the ack deadline.
    server
        .cli(&[
            "subscriptions",
            "update",
            "adt",
            "billing",
            "--ack-deadline-ms",
            "300",
        ])
        .ok();
    let peek = server.cli(&["consume", "adt", "billing", "--no-ack", "--json"]);
    let first = peek.ok().json_lines();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["body"], "A05 pre-admit");
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        let out = server.cli(&["consume", "adt", "billing", "--json", "--wait-ms", "2000"]);
        let lines = out.ok().json_lines();
        if !lines.is_empty() {
            break lines;
        }
        assert!(Instant::now() < deadline, "not delivered again");
    };
    assert_eq!(again[0]["body"], "A05 pre-admit");
    assert_eq!(again[0]["attempt"], 2);

    server
        .cli(&["subscriptions", "delete", "adt", "billing"])
        .ok();
    let gone = server.cli(&["consume", "adt", "billing"]);
    assert_eq!(gone.code, 4, "{gone:?}");
}

#[test]
fn dead_letters_and_traces() {
    let server = Server::start();
    let paths = [
        "/v1/topics/{topic}/subscriptions/{s}",
        "/v1/topics/{topic}/subscriptions/{s}/receive",
        "/v1/topics/{topic}/subscriptions/{s}/nack",
        "/v1/topics/{topic}/subscriptions/{s}/dead-letters",
        "/v1/topics/{topic}/subscriptions/{s}/dead-letters/{id}",
        "/v1/topics/{topic}/subscriptions/{s}/dead-letters/{id}/replay",
        "/v1/topics/{topic}/messages/{p}/{o}/trace",
        "/v1/topics/{topic}/trace",
    ];
    if !server.supports("dlq and trace", &paths) {
        return;
    }
    server.cli(&["topics", "create", "lab"]).ok();
    server
        .cli(&[
            "subscriptions",
            "create",
            "lab",
            "lis",
            "--max-attempts",
            "1",
        ])
        .ok();
    server
        .cli(&["produce", "lab", "OBX|bad", "--idempotency-key", "LAB|9"])
        .ok();

    // No nack command in the CLI: the client library fails the message once.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = carebus_client::Client::new(&server.url).unwrap();
        let got = client
            .receive(
                "lab",
                "lis",
                &carebus_client::ReceiveOptions {
                    max: Some(1),
                    wait_ms: Some(5000),
                    consumer: Some("lis-1".into()),
                },
            )
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        let n = client
            .nack(
                "lab",
                "lis",
                &[got[0].delivery_id],
                Some("LIS unavailable"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(n.count, 1);
    });

    let deadline = Instant::now() + Duration::from_secs(10);
    let letters = loop {
        let out = server
            .cli(&["dlq", "list", "lab", "lis", "--json"])
            .ok()
            .json();
        let letters = out["dead_letters"].as_array().unwrap().clone();
        if !letters.is_empty() {
            break letters;
        }
        assert!(Instant::now() < deadline, "no dead letter");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(letters[0]["reason"], "LIS unavailable");
    let id = letters[0]["id"].to_string();
    let table = server.cli(&["dlq", "list", "lab", "lis"]);
    assert!(table.ok().stdout.contains("LIS unavailable"));

    // The trace by position and by key shows the dead letter.
    let trace = server
        .cli(&[
            "trace",
            "lab",
            "--partition",
            "0",
            "--offset",
            "0",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(trace["subscriptions"][0]["subscription"], "lis");
    assert_eq!(trace["subscriptions"][0]["state"], "dead_lettered");
    let by_key = server.cli(&["trace", "lab", "--idempotency-key", "LAB|9"]);
    by_key.ok();
    assert!(by_key.stdout.contains("dead_lettered"), "{by_key:?}");
    assert!(by_key.stdout.contains("nacked"), "{by_key:?}");
    let missing = server.cli(&["trace", "lab", "--idempotency-key", "LAB|404"]);
    assert_eq!(missing.code, 4, "{missing:?}");

    // Replay: delivered again, then acknowledged by consume.
    server.cli(&["dlq", "replay", "lab", "lis", &id]).ok();
    let got = server.cli(&["consume", "lab", "lis", "--json", "--wait-ms", "5000"]);
    let lines = got.ok().json_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["body"], "OBX|bad");
    let after = server
        .cli(&["dlq", "list", "lab", "lis", "--json"])
        .ok()
        .json();
    assert_eq!(after["dead_letters"].as_array().unwrap().len(), 0);
    let trace = server
        .cli(&["trace", "lab", "--idempotency-key", "LAB|9", "--json"])
        .ok()
        .json();
    assert_eq!(trace["subscriptions"][0]["state"], "acknowledged");

    // Discarding an unknown dead letter: 4.
    let unknown = server.cli(&["dlq", "discard", "lab", "lis", "424242"]);
    assert_eq!(unknown.code, 4, "{unknown:?}");
}

#[test]
fn exit_codes() {
    // Unreachable: 3, without retrying forever.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let out = cli(&nobody, &["topics", "list"], None);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("cannot connect"), "{out:?}");
    let out = cli(&nobody, &["produce", "t", "x", "--max-attempts", "2"], None);
    assert_eq!(out.code, 3, "{out:?}");
    let out = cli(
        "http://127.0.0.1:1",
        &["topics", "get", "t", "--url", &nobody],
        None,
    );
    assert_eq!(out.code, 3, "--url wins over CAREBUS_URL: {out:?}");

    let server = Server::start();
    // Unknown topic: 4, for every command that names one.
    for args in [
        &["topics", "get", "nope"][..],
        &["produce", "nope", "x"],
        &["subscriptions", "list", "nope"],
    ] {
        let out = server.cli(args);
        assert_eq!(out.code, 4, "{args:?}: {out:?}");
        assert!(out.stderr.contains("unknown_topic"), "{out:?}");
    }
    // Usage errors: clap's 2.
    for args in [
        &["topics", "frobnicate"][..],
        &["trace", "t"],
        &["trace", "t", "--partition", "0"],
        &["produce"],
        &["consume", "t", "s", "--wait-ms", "999999"],
    ] {
        let out = server.cli(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
    }
    // Invalid input the server refuses (400): 1.
    let out = server.cli(&["topics", "create", "bad name!"]);
    assert_eq!(out.code, 1, "{out:?}");
    // The help documents the codes.
    let help = server.cli(&["--help"]);
    assert!(help.ok().stdout.contains("3  server unreachable"));
}
