//! Guards transactions (consume → transform → publish): a commit makes every publish
//! and ack take effect, an abort or a timeout none, subscribers never see uncommitted
//! messages, and a crash at every step of a commit leaves either all or nothing once
//! the broker is reopened and has finished recovery.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use carebus_core::{
    Broker, BrokerConfig, BrokerError, CommitStep, Delivery, PublishMessage, SubscriptionConfig,
    TopicConfig,
};

const W: Duration = Duration::from_millis(300);

async fn open(dir: &std::path::Path) -> Broker {
    let b = Broker::open(dir, BrokerConfig::default()).unwrap().0;
    b.finish_recovery().await.unwrap();
    b
}

async fn setup(dir: &std::path::Path) -> (Broker, Delivery) {
    let b = open(dir).await;
    b.put_topic("hl7.oru", TopicConfig::default()).unwrap();
    b.put_topic("fhir.observation", TopicConfig::default())
        .unwrap();
    let cfg = SubscriptionConfig {
        ack_deadline_ms: 60_000,
        backoff: carebus_core::Backoff {
            initial_ms: 10,
            max_ms: 10,
            multiplier: 1.0,
            jitter: 0.0,
        },
        ..SubscriptionConfig::default()
    };
    b.put_subscription("hl7.oru", "transformer", cfg.clone())
        .unwrap();
    b.put_subscription("fhir.observation", "warehouse", cfg)
        .unwrap();
    b.publish(
        "hl7.oru",
        vec![PublishMessage::new("ORU^R01 potassium 6.1")],
    )
    .await
    .unwrap();
    let d = b
        .receive("hl7.oru", "transformer", "t1", 1, W)
        .await
        .unwrap()
        .pop()
        .unwrap();
    (b, d)
}

fn output() -> Vec<PublishMessage> {
    vec![PublishMessage::new(Bytes::from_static(
        b"{\"resourceType\":\"Observation\"}",
    ))]
}

#[tokio::test]
async fn commit_applies_publishes_and_acks_together_and_nothing_is_visible_before() {
    let dir = tempfile::tempdir().unwrap();
    let (b, d) = setup(dir.path()).await;
    let txn = b.begin_transaction(Duration::from_secs(30)).unwrap();
    b.transaction_publish(txn, "fhir.observation", output())
        .unwrap();
    assert!(
        b.transaction_ack(txn, "hl7.oru", "transformer", &[d.delivery_id])
            .unwrap()
            .is_empty()
    );
    // Not visible before commit.
    assert!(
        b.receive(
            "fhir.observation",
            "warehouse",
            "w",
            1,
            Duration::from_millis(50)
        )
        .await
        .unwrap()
        .is_empty()
    );
    let out = b.commit_transaction(txn).await.unwrap();
    assert_eq!(out.len(), 1);
    let seen = b
        .receive("fhir.observation", "warehouse", "w", 10, W)
        .await
        .unwrap();
    assert_eq!(seen.len(), 1);
    // The input is acknowledged: never delivered again, its old id is dead.
    assert_eq!(
        b.ack("hl7.oru", "transformer", &[d.delivery_id])
            .await
            .unwrap()
            .len(),
        1
    );
    drop(b);
    let b = open(dir.path()).await;
    assert!(
        b.receive(
            "hl7.oru",
            "transformer",
            "t1",
            1,
            Duration::from_millis(100)
        )
        .await
        .unwrap()
        .is_empty()
    );
    assert_eq!(b.read("fhir.observation", 0, 0, 10).unwrap().len(), 1);
    assert!(matches!(
        b.commit_transaction(txn).await,
        Err(BrokerError::UnknownTransaction(_))
    ));
}

#[tokio::test]
async fn abort_and_timeout_leave_no_trace_and_redeliver_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let (b, d) = setup(dir.path()).await;
    let txn = b.begin_transaction(Duration::from_secs(30)).unwrap();
    b.transaction_publish(txn, "fhir.observation", output())
        .unwrap();
    b.transaction_ack(txn, "hl7.oru", "transformer", &[d.delivery_id])
        .unwrap();
    b.abort_transaction(txn).await.unwrap();
    assert!(b.read("fhir.observation", 0, 0, 10).unwrap().is_empty());
    let again = b
        .receive("hl7.oru", "transformer", "t2", 1, W)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(again.message.offset, d.message.offset);
    // The aborted attempt counts (as a nack would): a message whose transactions always
    // abort is dead-lettered after max_attempts instead of looping forever.
    assert_eq!(again.attempt, 2);
    // Timeout.
    let txn = b.begin_transaction(Duration::from_millis(30)).unwrap();
    b.transaction_publish(txn, "fhir.observation", output())
        .unwrap();
    b.transaction_ack(txn, "hl7.oru", "transformer", &[again.delivery_id])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(matches!(
        b.commit_transaction(txn).await,
        Err(BrokerError::TransactionExpired(_))
    ));
    assert!(b.read("fhir.observation", 0, 0, 10).unwrap().is_empty());
    let third = b
        .receive("hl7.oru", "transformer", "t3", 1, W)
        .await
        .unwrap();
    assert_eq!(
        third.len(),
        1,
        "the expired transaction's input is delivered again"
    );
    // Stale delivery ids are refused inside a transaction too.
    let txn = b.begin_transaction(Duration::from_secs(5)).unwrap();
    assert_eq!(
        b.transaction_ack(txn, "hl7.oru", "transformer", &[d.delivery_id])
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_crash_at_every_step_of_a_commit_gives_all_or_nothing() {
    for step in [
        CommitStep::BeforeCommitRecord,
        CommitStep::AfterCommitRecord,
        CommitStep::AfterPublishes,
        CommitStep::Done,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (b, d) = setup(dir.path()).await;
        let txn = b.begin_transaction(Duration::from_secs(30)).unwrap();
        b.transaction_publish(txn, "fhir.observation", output())
            .unwrap();
        b.transaction_publish(txn, "fhir.observation", output())
            .unwrap();
        b.transaction_ack(txn, "hl7.oru", "transformer", &[d.delivery_id])
            .unwrap();
        b.commit_transaction_until(txn, step).await.unwrap();
        drop(b); // the process dies here
        let b = open(dir.path()).await;
        let published = b.read("fhir.observation", 0, 0, 10).unwrap().len();
        let redelivered = b
            .receive(
                "hl7.oru",
                "transformer",
                "t9",
                1,
                Duration::from_millis(100),
            )
            .await
            .unwrap()
            .len();
        if step == CommitStep::BeforeCommitRecord {
            assert_eq!(
                (published, redelivered),
                (0, 1),
                "{step:?}: nothing may take effect"
            );
        } else {
            assert_eq!(
                (published, redelivered),
                (2, 0),
                "{step:?}: everything takes effect exactly once"
            );
        }
        // Recovery is idempotent: a second restart changes nothing.
        drop(b);
        let b = open(dir.path()).await;
        assert_eq!(
            b.read("fhir.observation", 0, 0, 10).unwrap().len(),
            published,
            "{step:?}"
        );
    }
}

#[tokio::test]
async fn a_repeated_ack_in_a_transaction_is_one_ack_and_sizes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (b, d) = setup(dir.path()).await;
    let txn = b.begin_transaction(Duration::from_secs(30)).unwrap();
    b.transaction_ack(txn, "hl7.oru", "transformer", &[d.delivery_id])
        .unwrap();
    b.transaction_ack(txn, "hl7.oru", "transformer", &[d.delivery_id])
        .unwrap();
    b.commit_transaction(txn).await.unwrap();
    assert!(
        b.receive(
            "hl7.oru",
            "transformer",
            "t1",
            1,
            Duration::from_millis(100)
        )
        .await
        .unwrap()
        .is_empty()
    );
    let txn = b.begin_transaction(Duration::from_secs(30)).unwrap();
    let big = vec![PublishMessage::new(vec![0u8; 40 << 20])];
    b.transaction_publish(txn, "fhir.observation", big.clone())
        .unwrap();
    let e = b
        .transaction_publish(txn, "fhir.observation", big)
        .unwrap_err();
    assert_eq!(e.code(), "transaction_too_large");
}
