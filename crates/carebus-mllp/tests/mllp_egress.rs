//! Guards MLLP egress: every message of a subscription reaches a misbehaving receiver
//! (connections dropped without an ACK, ACKs arriving after the timeout, ACKs naming
//! another control id, AE answers) and is acknowledged to the broker exactly once;
//! each patient's messages are first accepted in publish order; messages answered AE
//! end up dead-lettered by the subscription's `max_attempts`; a destination that is
//! down consumes no delivery attempts and loses nothing; the egress stops on request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use carebus_core::{
    Backoff, Broker, BrokerConfig, PublishMessage, SubscriptionConfig, TopicConfig,
};
use carebus_hl7::Message;
use carebus_mllp::{
    EgressConfig, EgressError, EgressStats, Frame, MllpCodec, NegativeAckPolicy, frame,
    run_egress_with_stats,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::codec::Decoder;

const TOPIC: &str = "hl7.adt";
const SUB: &str = "to-ehr";

#[derive(Clone, Copy, Debug)]
enum Misbehave {
    /// Close the connection after reading the frame, without processing it.
    Drop,
    /// Accept, but answer only after the sender's timeout.
    Late,
    /// Accept, but answer with MSA-2 naming another control id.
    WrongMsa,
}

/// A scripted MLLP receiver: the first sight of a planned control id misbehaves;
/// control ids in `ae` are always answered AE; everything else is accepted (once per
/// control id, a resend is answered AA again) and answered AA.
#[derive(Default)]
struct TestReceiver {
    plan: HashMap<String, Misbehave>,
    ae: HashSet<String>,
    seen: Mutex<HashMap<String, u32>>,
    accepted: Mutex<Vec<String>>,
}

fn control_id(patient: usize, n: usize) -> String {
    format!("P{patient}-{n}")
}

fn patient_of(cid: &str) -> &str {
    cid.split('-').next().unwrap()
}

fn hl7(cid: &str) -> Vec<u8> {
    let patient = patient_of(cid);
    format!(
        "MSH|^~\\&|SRC|FAC|EHR|FAC|20260101120000||ADT^A08^ADT_A01|{cid}|P|2.5\r\
         PID|1||{patient}^^^HOSP^MR||DOE^JOHN\r"
    )
    .into_bytes()
}

fn ack(code: &str, acked: &str) -> Vec<u8> {
    frame(
        format!(
            "MSH|^~\\&|EHR|FAC|SRC|FAC|20260101120001||ACK^A08^ACK|R-{acked}|P|2.5\r\
             MSA|{code}|{acked}|{}\r",
            if code == "AA" {
                ""
            } else {
                "test receiver refuses"
            }
        )
        .as_bytes(),
    )
}

impl TestReceiver {
    async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(Arc::clone(&self).connection(stream));
        }
    }

    async fn connection(self: Arc<Self>, mut stream: TcpStream) {
        let mut codec = MllpCodec::new(1 << 20);
        let mut buf = BytesMut::new();
        loop {
            while let Ok(Some(f)) = codec.decode(&mut buf) {
                let Frame::Message(bytes) = f else { continue };
                let msg = Message::parse(&bytes).unwrap();
                let cid = msg.control_id().unwrap().as_str().unwrap().to_owned();
                let n = {
                    let mut seen = self.seen.lock().unwrap();
                    let n = seen.entry(cid.clone()).or_default();
                    *n += 1;
                    *n
                };
                if self.ae.contains(&cid) {
                    if stream.write_all(&ack("AE", &cid)).await.is_err() {
                        return;
                    }
                    continue;
                }
                let misbehave = if n == 1 {
                    self.plan.get(&cid).copied()
                } else {
                    None
                };
                if let Some(Misbehave::Drop) = misbehave {
                    return;
                }
                {
                    let mut accepted = self.accepted.lock().unwrap();
                    if !accepted.contains(&cid) {
                        accepted.push(cid.clone());
                    }
                }
                let reply = match misbehave {
                    Some(Misbehave::Late) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        ack("AA", &cid)
                    }
                    Some(Misbehave::WrongMsa) => ack("AA", "SOMEONE-ELSE"),
                    _ => ack("AA", &cid),
                };
                if stream.write_all(&reply).await.is_err() {
                    return;
                }
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    broker: Arc<Broker>,
    published: Vec<String>,
}

async fn setup(patients: usize, per_patient: usize, max_attempts: u32) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let broker = Arc::new(Broker::open(dir.path(), BrokerConfig::default()).unwrap().0);
    broker
        .put_topic(
            TOPIC,
            TopicConfig {
                partitions: 2,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    broker
        .put_subscription(
            TOPIC,
            SUB,
            SubscriptionConfig {
                ack_deadline_ms: 10_000,
                max_attempts,
                backoff: Backoff {
                    initial_ms: 20,
                    max_ms: 100,
                    multiplier: 2.0,
                    jitter: 0.0,
                },
                ..SubscriptionConfig::default()
            },
        )
        .unwrap();
    // Interleaved over patients, each patient's messages in order.
    let mut published = Vec::new();
    for n in 0..per_patient {
        for p in 0..patients {
            let cid = control_id(p, n);
            let m = PublishMessage::new(hl7(&cid)).with_partition_key(format!("P{p}"));
            broker.publish(TOPIC, vec![m]).await.unwrap();
            published.push(cid);
        }
    }
    Setup {
        _dir: dir,
        broker,
        published,
    }
}

fn config(destination: SocketAddr) -> EgressConfig {
    EgressConfig {
        connections: 3,
        ack_timeout: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(1),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..EgressConfig::new(destination)
    }
}

type EgressTask = tokio::task::JoinHandle<Result<(), EgressError>>;

fn start_egress(
    broker: &Arc<Broker>,
    config: EgressConfig,
) -> (Arc<EgressStats>, watch::Sender<bool>, EgressTask) {
    let stats = Arc::new(EgressStats::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_egress_with_stats(
        Arc::clone(broker),
        TOPIC.into(),
        SUB.into(),
        config,
        Arc::clone(&stats),
        stop_rx,
    ));
    (stats, stop_tx, task)
}

/// Waits (bounded) until every published message is acked or dead-lettered.
async fn wait_settled(broker: &Broker, total: u64, within: Duration) {
    let sub = broker.subscription(TOPIC, SUB).unwrap();
    let end = tokio::time::Instant::now() + within;
    loop {
        let s = sub.stats();
        if s.acked + s.dead_letters == total && s.backlog == 0 && s.in_flight == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "not settled in time: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop(stop_tx: watch::Sender<bool>, task: EgressTask) {
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("egress stops")
        .unwrap()
        .unwrap();
}

fn assert_order(published: &[String], accepted: &[String], skipped: &HashSet<String>) {
    let by_patient = |list: &[String]| {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for c in list {
            m.entry(patient_of(c).to_owned())
                .or_default()
                .push(c.clone());
        }
        m
    };
    let expected: Vec<String> = published
        .iter()
        .filter(|c| !skipped.contains(*c))
        .cloned()
        .collect();
    assert_eq!(by_patient(accepted), by_patient(&expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_is_acknowledged_once_in_patient_order_despite_a_misbehaving_receiver() {
    let s = setup(5, 6, 2).await;
    let mut receiver = TestReceiver::default();
    let ae: HashSet<String> = [control_id(2, 3), control_id(4, 0)].into();
    let (mut drops, mut lates, mut wrongs) = (0u64, 0u64, 0u64);
    for (i, cid) in s.published.iter().enumerate() {
        if ae.contains(cid) {
            continue;
        }
        let m = match i % 7 {
            1 => Misbehave::Drop,
            3 => Misbehave::Late,
            5 => Misbehave::WrongMsa,
            _ => continue,
        };
        match m {
            Misbehave::Drop => drops += 1,
            Misbehave::Late => lates += 1,
            Misbehave::WrongMsa => wrongs += 1,
        }
        receiver.plan.insert(cid.clone(), m);
    }
    assert!(drops > 0 && lates > 0 && wrongs > 0);
    receiver.ae = ae.clone();
    let receiver = Arc::new(receiver);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(Arc::clone(&receiver).serve(listener));

    let (stats, stop_tx, task) = start_egress(&s.broker, config(addr));
    let total = s.published.len() as u64;
    wait_settled(&s.broker, total, Duration::from_secs(15)).await;
    stop(stop_tx, task).await;
    server.abort();

    // Broker side: each message acknowledged exactly once, AE ones dead-lettered.
    let sub = s.broker.subscription(TOPIC, SUB).unwrap().stats();
    assert_eq!(sub.acked, total - ae.len() as u64, "{sub:?}");
    assert_eq!(sub.dead_letters, ae.len() as u64, "{sub:?}");
    assert_eq!((sub.backlog, sub.in_flight), (0, 0), "{sub:?}");
    let dead = s.broker.dead_letters(TOPIC, SUB).unwrap();
    assert_eq!(dead.len(), ae.len());
    assert!(dead.iter().all(|d| d.reason.contains("AE")), "{dead:?}");

    // Receiver side: every non-AE message accepted exactly once, in patient order.
    let accepted = receiver.accepted.lock().unwrap().clone();
    let unique: HashSet<&String> = accepted.iter().collect();
    assert_eq!(unique.len(), accepted.len());
    assert_eq!(accepted.len() as u64, total - ae.len() as u64);
    assert_order(&s.published, &accepted, &ae);

    // Egress counters saw every kind of trouble.
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    eprintln!("{stats:?} drops={drops} lates={lates} wrongs={wrongs}");
    assert_eq!(get(&stats.acked), total - ae.len() as u64);
    assert_eq!(get(&stats.negative), 2 * ae.len() as u64);
    assert!(get(&stats.timeouts) >= lates, "timeouts");
    assert!(get(&stats.mismatched) >= wrongs, "mismatched");
    assert!(get(&stats.broken) >= drops, "broken");
    assert!(get(&stats.retried) >= drops + lates + wrongs, "retried");
    assert_eq!(get(&stats.released), 0);
    assert!(get(&stats.sent) >= total + drops + lates + wrongs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destination_that_is_down_loses_nothing_and_uses_no_attempts() {
    let s = setup(3, 4, 2).await;
    // An address nobody listens on (yet).
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (stats, stop_tx, task) = start_egress(&s.broker, config(addr));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(stats.connect_failures.load(Ordering::Relaxed) > 0);
    let sub = s.broker.subscription(TOPIC, SUB).unwrap();
    assert_eq!(sub.stats().delivered, 0, "no attempts while down");

    let receiver = Arc::new(TestReceiver::default());
    let listener = TcpListener::bind(addr).await.unwrap();
    let server = tokio::spawn(Arc::clone(&receiver).serve(listener));
    let total = s.published.len() as u64;
    wait_settled(&s.broker, total, Duration::from_secs(10)).await;
    stop(stop_tx, task).await;
    server.abort();

    let st = sub.stats();
    assert_eq!((st.acked, st.dead_letters), (total, 0), "{st:?}");
    let accepted = receiver.accepted.lock().unwrap().clone();
    assert_eq!(accepted.len() as u64, total);
    assert_order(&s.published, &accepted, &HashSet::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_policy_sends_a_refused_message_again_until_accepted_or_out_of_attempts() {
    let s = setup(1, 2, 3).await;
    let receiver = Arc::new(TestReceiver {
        ae: [control_id(0, 0)].into(),
        ..TestReceiver::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(Arc::clone(&receiver).serve(listener));
    let mut cfg = config(addr);
    cfg.on_negative_ack = NegativeAckPolicy::Retry;
    let (stats, stop_tx, task) = start_egress(&s.broker, cfg);
    wait_settled(&s.broker, 2, Duration::from_secs(10)).await;
    stop(stop_tx, task).await;
    server.abort();
    // Three attempts, each answered AE, then dead-lettered; the next one goes through.
    assert_eq!(stats.negative.load(Ordering::Relaxed), 3);
    assert_eq!(receiver.seen.lock().unwrap()[&control_id(0, 0)], 3);
    let st = s.broker.subscription(TOPIC, SUB).unwrap().stats();
    assert_eq!((st.acked, st.dead_letters), (1, 1), "{st:?}");
    assert_eq!(*receiver.accepted.lock().unwrap(), vec![control_id(0, 1)]);
}
