//! Guards HL7 v2 ingress over MLLP: every valid sample is stored exactly once in
//! `hl7.<type>` and acknowledged with MSA-2 = its MSH-10 only after it is stored; a
//! resend gets the stored ACK byte for byte and stores nothing; a conflicting resend is
//! not stored and is counted; invalid samples get a negative ACK and store nothing;
//! frames split, joined, surrounded by garbage or over the size limit are handled
//! without disturbing the listener; batches are acknowledged message by message; one
//! patient's messages stay in order in one partition.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use carebus_core::{Broker, BrokerConfig};
use carebus_hl7::{AckCode, Message, parse_ack};
use carebus_mllp::{IngressConfig, IngressStats, frame, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn fixture(kind: &str, name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/hl7")
        .join(kind)
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
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

struct Fixture {
    _dir: tempfile::TempDir,
    broker: Arc<Broker>,
    addr: std::net::SocketAddr,
    stats: Arc<IngressStats>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(config: IngressConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let broker = Arc::new(Broker::open(dir.path(), BrokerConfig::default()).unwrap().0);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(IngressStats::default());
    let task = tokio::spawn(serve(
        listener,
        Arc::clone(&broker),
        config,
        Arc::clone(&stats),
    ));
    Fixture {
        _dir: dir,
        broker,
        addr,
        stats,
        task,
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads framed replies from one connection, keeping bytes that arrive after a reply
/// for the next one (replies to pipelined frames can come in one read).
#[derive(Default)]
struct Replies {
    buf: Vec<u8>,
}

impl Replies {
    /// The next framed reply (bounded in time).
    async fn next(&mut self, s: &mut TcpStream) -> Vec<u8> {
        let mut byte = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == [0x1c, 0x0d]) {
                assert_eq!(self.buf.first(), Some(&0x0b), "reply not framed");
                let reply = self.buf[1..end].to_vec();
                self.buf.drain(..end + 2);
                return reply;
            }
            let n = tokio::time::timeout_at(deadline, s.read(&mut byte))
                .await
                .expect("no reply in time")
                .unwrap();
            assert!(n > 0, "connection closed without a reply");
            self.buf.extend_from_slice(&byte[..n]);
        }
    }
}

/// Reads one framed reply (bounded in time), for a connection that sent one message.
async fn read_reply(s: &mut TcpStream) -> Vec<u8> {
    Replies::default().next(s).await
}

async fn send(addr: std::net::SocketAddr, message: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&frame(message)).await.unwrap();
    read_reply(&mut s).await
}

/// Messages stored in the hl7.<type> topics (not the conflict records).
fn stored_count(b: &Broker) -> usize {
    b.topics()
        .iter()
        .filter(|t| t.name() != "hl7.conflicts")
        .map(|t| {
            (0..t.topic().config.partitions)
                .map(|p| b.read(t.name(), p, 0, 10_000).unwrap().len())
                .sum::<usize>()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sample_is_stored_once_and_a_resend_gets_the_same_ack() {
    let f = start(IngressConfig::default()).await;
    let valid = fixtures("valid");
    let mut first_acks = Vec::new();
    for (name, bytes) in &valid {
        let reply = send(f.addr, bytes).await;
        let ack = parse_ack(&reply).unwrap_or_else(|e| panic!("{name}: unreadable ACK: {e}"));
        let msg = Message::parse(bytes).unwrap();
        assert!(
            matches!(ack.code, AckCode::AA | AckCode::CA),
            "{name}: {:?}",
            ack.code
        );
        assert_eq!(
            ack.acknowledged_control_id,
            msg.control_id().unwrap().raw(),
            "{name}: MSA-2"
        );
        first_acks.push(reply);
    }
    // conflicting_resend repeats adt_a01_admit's key with another body: not stored.
    let expected_stored = valid.len() - 1;
    assert_eq!(stored_count(&f.broker), expected_stored);
    assert_eq!(f.stats.conflicts.load(Ordering::Relaxed), 1);
    // The conflict is listable: one record in hl7.conflicts naming the first copy,
    // without the conflicting body.
    let conflicts: Vec<_> = (0..4)
        .flat_map(|p| f.broker.read("hl7.conflicts", p, 0, 10).unwrap())
        .collect();
    assert_eq!(conflicts.len(), 1);
    let record: serde_json::Value = serde_json::from_slice(&conflicts[0].body).unwrap();
    assert_eq!(record["topic"], "hl7.adt");
    assert!(
        record["idempotency_key"]
            .as_str()
            .unwrap()
            .ends_with("|NG-ADT-000101")
    );
    assert!(
        !String::from_utf8_lossy(&conflicts[0].body).contains("Okafor"),
        "no patient data in the record"
    );
    let admit = valid
        .iter()
        .position(|(n, _)| n == "adt_a01_admit.hl7")
        .unwrap();
    let conflict = valid
        .iter()
        .position(|(n, _)| n == "conflicting_resend.hl7")
        .unwrap();
    // adt_a01_admit is sent before conflicting_resend (alphabetical order), so the
    // conflicting resend gets admit's stored ACK.
    assert_eq!(
        first_acks[conflict], first_acks[admit],
        "a conflicting resend gets the first copy's ACK"
    );
    // Everything again: byte-identical ACKs, nothing stored.
    for ((name, bytes), first) in valid.iter().zip(&first_acks) {
        let reply = send(f.addr, bytes).await;
        assert_eq!(&reply, first, "{name}: resend ACK differs");
    }
    assert_eq!(stored_count(&f.broker), expected_stored);
    // Routing: one topic per message type (MSH-9.1, lower case).
    let mut names: Vec<String> = f
        .broker
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = valid
        .iter()
        .map(|(_, b)| {
            format!(
                "hl7.{}",
                Message::parse(b)
                    .unwrap()
                    .message_type()
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_lowercase()
            )
        })
        .collect();
    expected.push("hl7.conflicts".into());
    expected.sort();
    expected.dedup();
    assert_eq!(names, expected);
    // Resending the same conflicting body again records nothing new.
    let again: usize = (0..4)
        .map(|p| f.broker.read("hl7.conflicts", p, 0, 10).unwrap().len())
        .sum();
    assert_eq!(again, 1);
    assert!(names.contains(&"hl7.adt".to_owned()) && names.contains(&"hl7.oru".to_owned()));
    // Stored byte for byte.
    let orm: Vec<_> = (0..4)
        .flat_map(|p| f.broker.read("hl7.orm", p, 0, 10).unwrap())
        .collect();
    assert_eq!(orm.len(), 1);
    assert_eq!(&orm[0].body[..], &fixture("valid", "orm_o01_order.hl7")[..]);
}

#[tokio::test]
async fn invalid_samples_get_a_negative_ack_and_store_nothing() {
    let f = start(IngressConfig::default()).await;
    for (name, bytes) in fixtures("invalid") {
        let reply = send(f.addr, &bytes).await;
        let ack = parse_ack(&reply).unwrap_or_else(|e| panic!("{name}: unreadable NAK: {e}"));
        assert!(
            matches!(
                ack.code,
                AckCode::AR | AckCode::CR | AckCode::AE | AckCode::CE
            ),
            "{name}: {:?}",
            ack.code
        );
        assert!(
            !ack.errors.is_empty() || ack.text.is_some(),
            "{name}: no reason given"
        );
    }
    assert_eq!(stored_count(&f.broker), 0);
    // Random binary can hold several frame markers: at least one refusal per sample.
    assert!(f.stats.rejected.load(Ordering::Relaxed) >= fixtures("invalid").len() as u64);
}

#[tokio::test]
async fn split_joined_and_noisy_frames_are_all_answered_in_order() {
    let f = start(IngressConfig::default()).await;
    let a = fixture("valid", "adt_a01_admit.hl7");
    let b = fixture("valid", "adt_a08_update.hl7");
    let c = fixture("valid", "adt_a03_discharge.hl7");
    // Garbage, then three frames, the last without its final CR, delivered byte by byte.
    let mut wire = b"\r\nnoise".to_vec();
    wire.extend(frame(&a));
    wire.extend(frame(&b));
    let mut last = frame(&c);
    last.pop();
    wire.extend(last);
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    for chunk in wire.chunks(7) {
        s.write_all(chunk).await.unwrap();
    }
    // The replies to the first two frames may arrive in one read: one reader for all.
    let mut replies = Replies::default();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = replies.next(&mut s).await;
        ids.push(
            String::from_utf8_lossy(parse_ack(&r).unwrap().acknowledged_control_id).into_owned(),
        );
    }
    // The third frame ends when the sender closes its side.
    s.shutdown().await.unwrap();
    let r = replies.next(&mut s).await;
    ids.push(String::from_utf8_lossy(parse_ack(&r).unwrap().acknowledged_control_id).into_owned());
    let expected: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|m| {
            String::from_utf8_lossy(Message::parse(m).unwrap().control_id().unwrap().raw())
                .into_owned()
        })
        .collect();
    assert_eq!(ids, expected);
    // One patient: one partition, in order.
    let adt: Vec<_> = (0..4)
        .flat_map(|p| f.broker.read("hl7.adt", p, 0, 10).unwrap())
        .collect();
    assert_eq!(adt.len(), 3);
    assert!(
        adt.windows(2)
            .all(|w| w[0].partition == w[1].partition && w[0].offset < w[1].offset)
    );
    assert_eq!(&adt[0].body[..], &a[..]);
    assert_eq!(&adt[2].body[..], &c[..]);
}

#[tokio::test]
async fn an_oversized_frame_is_refused_and_the_listener_keeps_serving() {
    let f = start(IngressConfig {
        max_frame_bytes: 4096,
        ..IngressConfig::default()
    })
    .await;
    let mut big = fixture("valid", "oru_r01_cbc.hl7");
    big.extend(std::iter::repeat_n(b'X', 10_000));
    let reply = send(f.addr, &big).await;
    assert_eq!(parse_ack(&reply).unwrap().code, AckCode::AR);
    assert_eq!(stored_count(&f.broker), 0);
    let ok = send(f.addr, &fixture("valid", "oru_r01_cbc.hl7")).await;
    assert!(matches!(
        parse_ack(&ok).unwrap().code,
        AckCode::AA | AckCode::CA
    ));
    // Random bytes on the port: no crash, the next client is served.
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    s.write_all(&[0x0b, 0xff, 0x00, 0x1c, 0x0d, 0x42])
        .await
        .unwrap();
    let junk = read_reply(&mut s).await;
    assert!(matches!(parse_ack(&junk).unwrap().code, AckCode::AR));
    let ok = send(f.addr, &fixture("valid", "oru_r01_critical_potassium.hl7")).await;
    assert!(matches!(
        parse_ack(&ok).unwrap().code,
        AckCode::AA | AckCode::CA
    ));
}

#[tokio::test]
async fn a_batch_is_acknowledged_message_by_message() {
    let f = start(IngressConfig::default()).await;
    let reply = send(f.addr, &fixture("batch", "lab_batch.hl7")).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("BHS|"), "{text}");
    assert_eq!(text.matches("MSA|").count(), 3);
    for id in ["RL-B1-0001", "RL-B1-0002", "RL-B1-0003"] {
        assert!(text.contains(&format!("|{id}")), "{id} not acknowledged");
    }
    assert!(text.contains("BTS|3"));
    assert_eq!(stored_count(&f.broker), 3);
    // The batch again: nothing new.
    send(f.addr, &fixture("batch", "lab_batch.hl7")).await;
    assert_eq!(stored_count(&f.broker), 3);
}

#[tokio::test]
async fn routes_rejects_topic_and_negative_ack_codes_follow_the_configuration() {
    use carebus_mllp::{NegativeAck, Route};
    let config = IngressConfig {
        routes: vec![
            Route {
                message_type: Some("adt".into()),
                trigger_event: Some("A08".into()),
                topic: "hl7.adt.updates".into(),
                ..Route::default()
            },
            Route {
                sending_application: Some("LABSYS".into()),
                topic: "lab.results".into(),
                ..Route::default()
            },
        ],
        rejects_topic: Some("hl7.rejects".into()),
        invalid_message_ack: NegativeAck::Error,
        ..IngressConfig::default()
    };
    let f = start(config).await;
    send(f.addr, &fixture("valid", "adt_a08_update.hl7")).await;
    send(f.addr, &fixture("valid", "adt_a01_admit.hl7")).await;
    send(f.addr, &fixture("batch", "lab_batch.hl7")).await;
    let count = |topic: &str| -> usize {
        f.broker.topic(topic).map_or(0, |t| {
            (0..t.topic().config.partitions)
                .map(|p| f.broker.read(topic, p, 0, 100).unwrap().len())
                .sum()
        })
    };
    assert_eq!(
        count("hl7.adt.updates"),
        1,
        "A08 routed by type and trigger"
    );
    assert_eq!(
        count("hl7.adt"),
        1,
        "A01 falls through to the default route"
    );
    assert_eq!(
        count("lab.results"),
        3,
        "the lab's batch routed by sending application"
    );
    // A refused message: AE as configured, kept once in the rejects topic with its reason.
    for _ in 0..2 {
        let reply = send(f.addr, &fixture("invalid", "empty_control_id.hl7")).await;
        assert_eq!(parse_ack(&reply).unwrap().code, AckCode::AE);
    }
    let rejects: Vec<_> = (0..4)
        .flat_map(|p| f.broker.read("hl7.rejects", p, 0, 10).unwrap())
        .collect();
    assert_eq!(rejects.len(), 1);
    assert_eq!(
        &rejects[0].body[..],
        &fixture("invalid", "empty_control_id.hl7")[..]
    );
    assert!(
        rejects[0]
            .headers
            .iter()
            .any(|(n, v)| n == "mllp-reject-reason" && !v.is_empty())
    );
}

#[tokio::test]
async fn idle_connections_and_slow_senders_are_closed_and_the_listener_stays_bounded() {
    let f = start(IngressConfig {
        idle_timeout: Duration::from_millis(200),
        frame_timeout: Duration::from_millis(200),
        max_connections: 2,
        ..IngressConfig::default()
    })
    .await;
    let closed_within = |mut s: TcpStream, limit: Duration| async move {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(limit, s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    };
    // Idle: connected, never sends.
    let idle = TcpStream::connect(f.addr).await.unwrap();
    assert!(
        closed_within(idle, Duration::from_secs(5)).await,
        "idle connection kept open"
    );
    // Slow sender: starts a frame and stalls (half a frame, then nothing).
    let mut slow = TcpStream::connect(f.addr).await.unwrap();
    slow.write_all(b"\x0bMSH|^~\\&|SLOW").await.unwrap();
    assert!(
        closed_within(slow, Duration::from_secs(5)).await,
        "slow sender kept open"
    );
    // Bounded: with two idle connections held, a third is closed at once, and once they
    // time out a well-behaved sender is served again.
    let _a = TcpStream::connect(f.addr).await.unwrap();
    let _b = TcpStream::connect(f.addr).await.unwrap();
    // Accepted in connection order: a and b take the two places.
    let third = TcpStream::connect(f.addr).await.unwrap();
    assert!(
        closed_within(third, Duration::from_secs(2)).await,
        "connection over the bound accepted"
    );
    assert!(f.stats.refused_connections.load(Ordering::Relaxed) >= 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        s.write_all(&frame(&fixture("valid", "oru_r01_cbc.hl7")))
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await
            && n > 0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served again after the idle ones timed out"
        );
    }
}
