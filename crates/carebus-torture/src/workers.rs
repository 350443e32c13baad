//! The clients: HTTP producers, consumers, transactional transformers, a poison
//! consumer and MLLP senders. Each keeps going while the server dies under it, retrying
//! with the same idempotency key or the same HL7 bytes, and records what it saw.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use carebus_client::{Client, Delivery, Message, ReceiveOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::history::{
    AckOutcome, AckRecord, DeliveryRecord, History, PublishRecord, Sub, TxnOutcome, TxnRecord, lock,
};

pub(crate) const ORDERS: &str = "torture.orders";
pub(crate) const RESULTS: &str = "torture.results";
pub(crate) const POISON: &str = "torture.poison";
pub(crate) const HL7_TOPIC: &str = "hl7.oru";
pub(crate) const WORK_SUB: &str = "work";
pub(crate) const TXN_SUB: &str = "txn";
pub(crate) const POISON_SUB: &str = "poison";
const PATIENTS: u32 = 24;
const RETRY_PAUSE: Duration = Duration::from_millis(25);

/// Phases of a run, shared by every worker.
pub(crate) const CHAOS: u8 = 0;
pub(crate) const DRAIN: u8 = 1;
pub(crate) const STOP: u8 = 2;

/// Where the server currently listens (`None` while it is down).
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) client: Client,
    pub(crate) mllp: SocketAddr,
}

#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) history: Arc<History>,
    pub(crate) phase: Arc<AtomicU8>,
    pub(crate) endpoint: watch::Receiver<Option<Endpoint>>,
}

impl Shared {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    fn client(&self) -> Option<Client> {
        self.endpoint.borrow().as_ref().map(|e| e.client.clone())
    }

    fn mllp(&self) -> Option<SocketAddr> {
        self.endpoint.borrow().as_ref().map(|e| e.mllp)
    }
}

/// The body of an orders message: everything the checks need is in it.
pub(crate) fn order_body(key: &str, patient: u32) -> Vec<u8> {
    format!("ORDER key={key} patient=PAT-{patient} {}", "x".repeat(200)).into_bytes()
}

/// Publishes keyed messages (3 % of them to the poison topic) with retries until
/// acknowledged, through kills and restarts.
pub(crate) async fn producer(shared: Shared, worker: u64, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed ^ (0x1000 + worker));
    let mut n = 0u64;
    while shared.phase() == CHAOS {
        n += 1;
        let patient = rng.u32(0..PATIENTS);
        let poison = rng.u32(0..100) < 3;
        let (topic, key) = if poison {
            (POISON, format!("x{worker}-{n}"))
        } else {
            (ORDERS, format!("p{worker}-{n}"))
        };
        let body = order_body(&key, patient);
        let message = Message::new(body.clone())
            .idempotency_key(key.clone())
            .partition_key(format!("PAT-{patient}"));
        let index = shared.history.push_publish(PublishRecord {
            topic,
            key,
            body,
            acked_at: None,
            conflict: false,
        });
        // Retry until acknowledged; once the chaos ends, one more try at most.
        let mut tries = 0u32;
        loop {
            if tries > 0 && shared.phase() != CHAOS {
                break;
            }
            tries += 1;
            let Some(client) = shared.client() else {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            };
            match client.publish(topic, &message).await {
                Ok(outcome) => {
                    shared.history.publish_acked(
                        index,
                        (outcome.partition, outcome.offset),
                        outcome.conflict,
                    );
                    break;
                }
                Err(e) if e.is_retryable() || e.is_unreachable() => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => {
                    shared
                        .history
                        .anomaly(format!("publish to {topic} refused: {e}"));
                    break;
                }
            }
        }
    }
}

async fn receive(
    shared: &Shared,
    client: &Client,
    topic: &str,
    sub_name: &str,
    sub: Sub,
    consumer: &str,
    max: u32,
) -> Option<Vec<Delivery>> {
    let options = ReceiveOptions {
        max: Some(max),
        wait_ms: Some(200),
        consumer: Some(consumer.to_owned()),
    };
    let requested_us = shared.history.now_us();
    match client.receive(topic, sub_name, &options).await {
        Ok(deliveries) => {
            let received_us = shared.history.now_us();
            let mut all = lock(&shared.history.deliveries);
            for d in &deliveries {
                all.push(DeliveryRecord {
                    sub,
                    partition: d.partition,
                    offset: d.offset,
                    requested_us,
                    received_us,
                });
            }
            Some(deliveries)
        }
        Err(e) => {
            if !(e.is_retryable() || e.is_unreachable()) {
                shared
                    .history
                    .anomaly(format!("receive on {topic}/{sub_name} refused: {e}"));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
            None
        }
    }
}

fn record_acks(
    shared: &Shared,
    sub: Sub,
    deliveries: &[&Delivery],
    sent_us: u64,
    refused: &[u64],
    outcome: AckOutcome,
) {
    let answered_us = shared.history.now_us();
    let mut acks = lock(&shared.history.acks);
    for d in deliveries {
        if refused.contains(&d.delivery_id) {
            continue;
        }
        acks.push(AckRecord {
            sub,
            partition: d.partition,
            offset: d.offset,
            sent_us,
            answered_us,
            outcome,
        });
    }
}

/// Consumes `torture.orders` / `work`: during the chaos acks 75 %, nacks 15 % and
/// abandons 10 % (their leases run out); while draining acks everything.
pub(crate) async fn consumer(shared: Shared, worker: u64, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed ^ (0x2000 + worker));
    let name = format!("consumer-{worker}");
    while shared.phase() != STOP {
        let Some(client) = shared.client() else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        let Some(deliveries) =
            receive(&shared, &client, ORDERS, WORK_SUB, Sub::Work, &name, 8).await
        else {
            continue;
        };
        let chaos = shared.phase() == CHAOS;
        let (mut ack, mut nack) = (Vec::new(), Vec::new());
        for d in &deliveries {
            let roll = if chaos { rng.u32(0..100) } else { 0 };
            if roll < 75 {
                ack.push(d);
            } else if roll < 90 {
                nack.push(d);
            }
        }
        if !ack.is_empty() {
            let ids: Vec<u64> = ack.iter().map(|d| d.delivery_id).collect();
            let sent_us = shared.history.now_us();
            match client.ack(ORDERS, WORK_SUB, &ids).await {
                Ok(settled) => {
                    let refused: Vec<u64> = settled.refused.iter().map(|r| r.delivery_id).collect();
                    record_acks(
                        &shared,
                        Sub::Work,
                        &ack,
                        sent_us,
                        &refused,
                        AckOutcome::Confirmed,
                    );
                }
                Err(_) => record_acks(&shared, Sub::Work, &ack, sent_us, &[], AckOutcome::Unknown),
            }
        }
        if !nack.is_empty() {
            let ids: Vec<u64> = nack.iter().map(|d| d.delivery_id).collect();
            if client
                .nack(ORDERS, WORK_SUB, &ids, Some("torture nack"), None)
                .await
                .is_ok()
            {
                *lock(&shared.history.nacks) += ids.len() as u64;
            }
        }
    }
}

/// Consumes `torture.orders` / `txn` and, per batch, in one transaction publishes a
/// result per message to `torture.results` (idempotency key `R:<key>`, body naming the
/// transaction) and acknowledges the deliveries. During the chaos 70 % commit, 20 %
/// abort and 10 % are abandoned to expire; while draining all commit.
pub(crate) async fn transformer(shared: Shared, worker: u64, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed ^ (0x3000 + worker));
    let name = format!("transformer-{worker}");
    while shared.phase() != STOP {
        let Some(client) = shared.client() else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        // Small transactions during the chaos; larger ones to drain what is left.
        let max = if shared.phase() == CHAOS { 4 } else { 32 };
        let Some(deliveries) =
            receive(&shared, &client, ORDERS, TXN_SUB, Sub::Txn, &name, max).await
        else {
            continue;
        };
        if deliveries.is_empty() {
            continue;
        }
        let Ok(txn) = client.begin(Some(1500)).await else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        let id = txn.id();
        let origins: Vec<(u32, u64)> = deliveries.iter().map(|d| (d.partition, d.offset)).collect();
        let results: Vec<Message> = deliveries
            .iter()
            .map(|d| {
                let key = d.idempotency_key.clone().unwrap_or_default();
                Message::new(format!(
                    "RESULT txn={id} origin={}/{} key={key}",
                    d.partition, d.offset
                ))
                .idempotency_key(format!("R:{key}"))
            })
            .collect();
        let ids: Vec<u64> = deliveries.iter().map(|d| d.delivery_id).collect();
        let mut record = TxnRecord {
            id,
            origins,
            outcome: TxnOutcome::NeverCommitted,
            commit_sent_us: 0,
            committed_us: 0,
        };
        let staged = match txn.publish(RESULTS, &results).await {
            Ok(_) => match txn.ack(ORDERS, TXN_SUB, &ids).await {
                Ok(settled) => settled.refused.is_empty(),
                Err(_) => false,
            },
            Err(_) => false,
        };
        let roll = if shared.phase() == CHAOS {
            rng.u32(0..100)
        } else {
            0
        };
        if staged && roll < 70 {
            record.commit_sent_us = shared.history.now_us();
            match txn.commit().await {
                Ok(_) => {
                    record.outcome = TxnOutcome::Committed;
                    record.committed_us = shared.history.now_us();
                }
                Err(e) if e.is_retryable() || e.is_unreachable() => {
                    record.outcome = TxnOutcome::CommitUnknown;
                }
                // Refused (expired, unknown after a restart): nothing took effect.
                Err(_) => {}
            }
        } else if roll < 90 {
            let _ = txn.abort().await;
        }
        lock(&shared.history.txns).push(record);
    }
}

/// Nacks everything of `torture.poison` / `poison`, so every message is dead-lettered.
pub(crate) async fn poison_consumer(shared: Shared) {
    while shared.phase() != STOP {
        let Some(client) = shared.client() else {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        };
        let Some(deliveries) = receive(
            &shared,
            &client,
            POISON,
            POISON_SUB,
            Sub::Poison,
            "poison",
            16,
        )
        .await
        else {
            continue;
        };
        if deliveries.is_empty() {
            continue;
        }
        let ids: Vec<u64> = deliveries.iter().map(|d| d.delivery_id).collect();
        let _ = client
            .nack(POISON, POISON_SUB, &ids, Some("torture poison"), None)
            .await;
    }
}

fn hl7_message(worker: u64, n: u64, patient: u32) -> (String, Vec<u8>) {
    let control = format!("T{worker}-{n}");
    let facility = format!("LAB{worker}");
    let text = format!(
        "MSH|^~\\&|TORTURE|{facility}|EMR|HOSP|20261124120000||ORU^R01^ORU_R01|{control}|P|2.5.1\r\
         PID|1||PAT{patient}^^^HOSP^MR||Doe^Pat\r\
         OBR|1||ORD{n}|GLU^Glucose\r\
         OBX|1|NM|GLU^Glucose||{}|mg/dL|||||F\r",
        70 + n % 100
    );
    let mut frame = Vec::with_capacity(text.len() + 3);
    frame.push(0x0b);
    frame.extend_from_slice(text.as_bytes());
    frame.extend_from_slice(&[0x1c, 0x0d]);
    (format!("TORTURE|{facility}|{control}"), frame)
}

/// MSA-1 and MSA-2 of an ACK frame's payload.
fn msa(ack: &[u8]) -> Option<(String, String)> {
    let text = String::from_utf8_lossy(ack);
    let segment = text
        .split(['\r', '\n'])
        .find(|s| s.starts_with("MSA|"))?
        .to_owned();
    let mut fields = segment.split('|').skip(1);
    Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
}

async fn exchange(stream: &mut TcpStream, frame: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(frame).await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        answer.extend_from_slice(buf.get(..n).unwrap_or_default());
        if answer.ends_with(&[0x1c, 0x0d]) {
            return Ok(answer);
        }
        if answer.len() > 1 << 20 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
}

/// Sends ORU^R01 messages over MLLP, one at a time, resending the same bytes on a new
/// connection after a timeout or a broken connection, until an AA arrives.
pub(crate) async fn mllp_sender(shared: Shared, worker: u64, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed ^ (0x4000 + worker));
    let mut stream: Option<TcpStream> = None;
    let mut n = 0u64;
    while shared.phase() == CHAOS {
        n += 1;
        let (key, frame) = hl7_message(worker, n, rng.u32(0..PATIENTS));
        let control = format!("T{worker}-{n}");
        let index = shared.history.push_mllp(key);
        let mut tries = 0u32;
        loop {
            if tries > 0 && shared.phase() != CHAOS {
                break;
            }
            tries += 1;
            let mut s = match stream.take() {
                Some(s) => s,
                None => {
                    let Some(addr) = shared.mllp() else {
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    };
                    match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        _ => {
                            tokio::time::sleep(RETRY_PAUSE).await;
                            continue;
                        }
                    }
                }
            };
            match tokio::time::timeout(Duration::from_secs(3), exchange(&mut s, &frame)).await {
                Ok(Ok(answer)) => match msa(&answer) {
                    Some((code, id)) if id != control => {
                        shared.history.anomaly(format!(
                            "MLLP ACK for {control} names another message ({code} {id})"
                        ));
                        break;
                    }
                    Some((code, _)) if code == "AA" || code == "CA" => {
                        shared.history.mllp_acked(index);
                        stream = Some(s);
                        break;
                    }
                    other => {
                        // A negative ACK is a clear refusal: resend later.
                        let _ = other;
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                },
                // Broken or silent connection: drop it and resend on a new one.
                _ => tokio::time::sleep(RETRY_PAUSE).await,
            }
        }
    }
}
