//! Model-based property test of the broker core: random publishes (with and without
//! idempotency keys and partition keys), receives, acks, nacks, stale acks and
//! reopens are applied to the broker and to a small in-memory reference model, and
//! compared after every step and after every reopen: exactly-once storage, no
//! acknowledged message delivered again, no message handed out twice at once, per-key
//! order, and every unacknowledged message delivered again after a reopen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use carebus_core::{
    Backoff, Broker, BrokerConfig, PublishMessage, SubscriptionConfig, TopicConfig,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Publish {
        idem: Option<u8>,
        patient: Option<u8>,
        body: u8,
    },
    Receive {
        consumer: u8,
        max: u8,
    },
    Ack {
        pick: u8,
    },
    Nack {
        pick: u8,
    },
    AckStale {
        id: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (prop::option::of(0u8..6), prop::option::of(0u8..4), any::<u8>())
            .prop_map(|(idem, patient, body)| Op::Publish { idem, patient, body }),
        4 => (0u8..3, 1u8..5).prop_map(|(consumer, max)| Op::Receive { consumer, max }),
        4 => any::<u8>().prop_map(|pick| Op::Ack { pick }),
        1 => any::<u8>().prop_map(|pick| Op::Nack { pick }),
        1 => any::<u64>().prop_map(|id| Op::AckStale { id }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone)]
struct Stored {
    body: Bytes,
    patient: Option<u8>,
}

#[derive(Default)]
struct Model {
    stored: BTreeMap<(u32, u64), Stored>,
    by_key: HashMap<u8, (u32, u64)>,
    acked: BTreeSet<(u32, u64)>,
    /// delivery id -> position, for deliveries the model believes are outstanding
    in_flight: BTreeMap<u64, (u32, u64)>,
    /// ever delivered since the last reopen
    delivered_since_reopen: BTreeSet<(u32, u64)>,
}

fn sub_config() -> SubscriptionConfig {
    SubscriptionConfig {
        ack_deadline_ms: 3_600_000,
        max_attempts: 1000,
        backoff: Backoff {
            initial_ms: 0,
            max_ms: 0,
            multiplier: 1.0,
            jitter: 0.0,
        },
        ..SubscriptionConfig::default()
    }
}

async fn open(dir: &std::path::Path) -> Broker {
    let b = Broker::open(dir, BrokerConfig::default()).unwrap().0;
    b.finish_recovery().await.unwrap();
    b
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(dir.path()).await;
    b.put_topic(
        "t",
        TopicConfig {
            partitions: 2,
            ..TopicConfig::default()
        },
    )
    .unwrap();
    b.put_subscription("t", "s", sub_config()).unwrap();
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Publish {
                idem,
                patient,
                body,
            } => {
                let mut msg = PublishMessage::new(Bytes::from(vec![body; 3]));
                msg.idempotency_key = idem.map(|k| Bytes::from(format!("key-{k}")));
                msg.partition_key = patient.map(|p| Bytes::from(format!("MRN{p}")));
                let out = b.publish("t", vec![msg.clone()]).await.unwrap()[0];
                let pos = (out.partition, out.offset);
                match idem.and_then(|k| m.by_key.get(&k).copied()) {
                    Some(first) => {
                        prop_assert!(out.duplicate, "a known key was stored again");
                        prop_assert_eq!(pos, first);
                        prop_assert_eq!(out.conflict, m.stored[&first].body != msg.body);
                    }
                    None => {
                        prop_assert!(!out.duplicate);
                        prop_assert!(!m.stored.contains_key(&pos), "offset reused");
                        m.stored.insert(
                            pos,
                            Stored {
                                body: msg.body.clone(),
                                patient,
                            },
                        );
                        if let Some(k) = idem {
                            m.by_key.insert(k, pos);
                        }
                    }
                }
            }
            Op::Receive { consumer, max } => {
                let ds = b
                    .receive(
                        "t",
                        "s",
                        &format!("c{consumer}"),
                        usize::from(max),
                        Duration::ZERO,
                    )
                    .await
                    .unwrap();
                prop_assert!(ds.len() <= usize::from(max));
                for d in ds {
                    let pos = (d.message.partition, d.message.offset);
                    let s = m
                        .stored
                        .get(&pos)
                        .expect("delivered a message that was never stored");
                    prop_assert_eq!(&d.message.body, &s.body);
                    prop_assert!(
                        !m.acked.contains(&pos),
                        "acknowledged message {:?} delivered again",
                        pos
                    );
                    prop_assert!(
                        !m.in_flight.values().any(|&p| p == pos),
                        "{:?} handed out twice at once",
                        pos
                    );
                    // Per-key order: every earlier message of this patient in this partition is acked.
                    if let Some(pat) = s.patient {
                        for (&(p, o), other) in m.stored.range((pos.0, 0)..pos) {
                            if p == pos.0 && other.patient == Some(pat) {
                                prop_assert!(
                                    m.acked.contains(&(p, o)),
                                    "patient {} out of order: {:?} before {:?}",
                                    pat,
                                    pos,
                                    (p, o)
                                );
                            }
                        }
                    }
                    m.in_flight.insert(d.delivery_id, pos);
                    m.delivered_since_reopen.insert(pos);
                }
            }
            Op::Ack { pick } | Op::Nack { pick } if m.in_flight.is_empty() => {
                let _ = pick;
            }
            Op::Ack { pick } => {
                let (&id, &pos) = m
                    .in_flight
                    .iter()
                    .nth(usize::from(pick) % m.in_flight.len())
                    .unwrap();
                let refused = b.ack("t", "s", &[id]).await.unwrap();
                prop_assert!(refused.is_empty(), "a valid ack was refused: {:?}", refused);
                m.in_flight.remove(&id);
                m.acked.insert(pos);
                // Acking the same id again is refused and changes nothing.
                prop_assert_eq!(b.ack("t", "s", &[id]).await.unwrap().len(), 1);
            }
            Op::Nack { pick } => {
                let (&id, _) = m
                    .in_flight
                    .iter()
                    .nth(usize::from(pick) % m.in_flight.len())
                    .unwrap();
                let refused = b.nack("t", "s", &[id], "model nack", None).await.unwrap();
                prop_assert!(refused.is_empty());
                m.in_flight.remove(&id);
            }
            Op::AckStale { id } => {
                if !m.in_flight.contains_key(&id) {
                    prop_assert_eq!(
                        b.ack("t", "s", &[id]).await.unwrap().len(),
                        1,
                        "an unknown id was accepted"
                    );
                }
            }
            Op::Reopen => {
                drop(b);
                b = open(dir.path()).await;
                m.in_flight.clear();
                m.delivered_since_reopen.clear();
            }
        }
        // After every step: storage equals the model, the backlog counts the unacked.
        let mut all = BTreeMap::new();
        for p in 0..2 {
            for msg in b.read("t", p, 0, 10_000).unwrap() {
                all.insert((p, msg.offset), msg.body);
            }
        }
        prop_assert_eq!(all.len(), m.stored.len());
        for (pos, body) in &all {
            prop_assert_eq!(body, &m.stored[pos].body);
        }
        let stats = b.subscription("t", "s").unwrap().stats();
        prop_assert_eq!(stats.backlog as usize, m.stored.len() - m.acked.len());
        prop_assert_eq!(stats.in_flight as usize, m.in_flight.len());
    }
    // Finally, after a reopen everything unacknowledged is delivered again, and nothing acked.
    drop(b);
    let b = open(dir.path()).await;
    let mut got = BTreeSet::new();
    for _ in 0..100 {
        let ds = b
            .receive("t", "s", "final", 100, Duration::ZERO)
            .await
            .unwrap();
        if ds.is_empty() {
            break;
        }
        for d in &ds {
            prop_assert!(got.insert((d.message.partition, d.message.offset)));
        }
        let ids: Vec<u64> = ds.iter().map(|d| d.delivery_id).collect();
        b.ack("t", "s", &ids).await.unwrap();
    }
    let unacked: BTreeSet<(u32, u64)> = m
        .stored
        .keys()
        .filter(|p| !m.acked.contains(p))
        .copied()
        .collect();
    prop_assert_eq!(got, unacked);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn the_broker_matches_a_reference_model(ops in prop::collection::vec(op(), 1..45)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}
