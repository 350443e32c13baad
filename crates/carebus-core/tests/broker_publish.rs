//! Guards exactly-once publish in the broker core: duplicates by idempotency key are
//! not stored again (also across a restart without a dedup checkpoint), conflicting
//! resends are reported and keep the first copy, one partition key keeps one partition
//! and its order, batches are all-or-nothing, and keys past the window are dropped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use carebus_core::{Broker, BrokerConfig, BrokerError, PublishMessage, TopicConfig};

fn msg(body: &str, key: Option<&str>, pk: Option<&str>) -> PublishMessage {
    let mut m = PublishMessage::new(Bytes::copy_from_slice(body.as_bytes()));
    m.idempotency_key = key.map(|k| Bytes::copy_from_slice(k.as_bytes()));
    m.partition_key = pk.map(|k| Bytes::copy_from_slice(k.as_bytes()));
    m
}

fn open(dir: &std::path::Path) -> Broker {
    Broker::open(dir, BrokerConfig::default()).unwrap().0
}

#[tokio::test]
async fn a_duplicate_is_not_stored_again_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    broker.put_topic("hl7.adt", TopicConfig::default()).unwrap();
    let first = broker
        .publish(
            "hl7.adt",
            vec![msg(
                "A01 admit",
                Some("EPICADT|NORTHGATE|NG-ADT-000101"),
                None,
            )],
        )
        .await
        .unwrap();
    assert!(!first[0].duplicate);
    assert_eq!(first[0].offset, 0);
    // Same control id, other facility: a different key, stored.
    let other = broker
        .publish(
            "hl7.adt",
            vec![msg(
                "A01 other",
                Some("EPICADT|SOUTHSIDE|NG-ADT-000101"),
                None,
            )],
        )
        .await
        .unwrap();
    assert!(!other[0].duplicate);
    assert_eq!(other[0].offset, 1);
    let again = broker
        .publish(
            "hl7.adt",
            vec![msg(
                "A01 admit",
                Some("EPICADT|NORTHGATE|NG-ADT-000101"),
                None,
            )],
        )
        .await
        .unwrap();
    assert!(again[0].duplicate);
    assert!(!again[0].conflict);
    assert_eq!((again[0].partition, again[0].offset), (0, 0));
    // No checkpoint: dropping the broker is a crash for the dedup index; the log replays it.
    drop(broker);
    let broker = open(dir.path());
    let after = broker
        .publish(
            "hl7.adt",
            vec![msg(
                "A01 admit",
                Some("EPICADT|NORTHGATE|NG-ADT-000101"),
                None,
            )],
        )
        .await
        .unwrap();
    assert!(after[0].duplicate);
    assert_eq!(after[0].offset, 0);
    let stored = broker.read("hl7.adt", 0, 0, 100).unwrap();
    assert_eq!(stored.len(), 2, "each message stored exactly once");
    // And after a checkpoint too.
    broker.checkpoint().unwrap();
    drop(broker);
    let broker = open(dir.path());
    let after = broker
        .publish(
            "hl7.adt",
            vec![msg(
                "A01 admit",
                Some("EPICADT|NORTHGATE|NG-ADT-000101"),
                None,
            )],
        )
        .await
        .unwrap();
    assert!(after[0].duplicate);
    assert_eq!(broker.read("hl7.adt", 0, 0, 100).unwrap().len(), 2);
    let rt = broker.topic("hl7.adt").unwrap();
    assert_eq!(
        rt.counters
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_conflicting_resend_keeps_the_first_copy_and_says_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    broker.put_topic("t", TopicConfig::default()).unwrap();
    broker
        .publish("t", vec![msg("original", Some("k1"), None)])
        .await
        .unwrap();
    let r = broker
        .publish("t", vec![msg("different body", Some("k1"), None)])
        .await
        .unwrap();
    assert!(r[0].duplicate && r[0].conflict);
    let stored = broker.read("t", 0, 0, 10).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(&stored[0].body[..], b"original");
    let rt = broker.topic("t").unwrap();
    assert_eq!(
        rt.counters
            .conflicts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn one_partition_key_keeps_one_partition_and_its_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    broker
        .put_topic(
            "t",
            TopicConfig {
                partitions: 8,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..200 {
        let patient = format!("MRN{}", i % 10);
        let r = broker
            .publish(
                "t",
                vec![msg(&format!("{patient}-{i}"), None, Some(&patient))],
            )
            .await
            .unwrap();
        let p = *seen.entry(patient.clone()).or_insert(r[0].partition);
        assert_eq!(p, r[0].partition, "{patient} moved partition");
    }
    for (patient, p) in seen {
        let bodies: Vec<String> = broker
            .read("t", p, 0, 1000)
            .unwrap()
            .into_iter()
            .filter(|m| m.partition_key.as_deref() == Some(patient.as_bytes()))
            .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
            .collect();
        assert_eq!(bodies.len(), 20);
        let seq: Vec<usize> = bodies
            .iter()
            .map(|b| b.rsplit('-').next().unwrap().parse().unwrap())
            .collect();
        assert!(seq.windows(2).all(|w| w[0] < w[1]), "{patient}: {seq:?}");
    }
}

#[tokio::test]
async fn batches_are_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    broker
        .put_topic(
            "t",
            TopicConfig {
                partitions: 4,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    // Same partition key: one atomic log batch, with a repeated key inside it.
    let r = broker
        .publish(
            "t",
            vec![
                msg("a", Some("k-a"), Some("P1")),
                msg("b", Some("k-b"), Some("P1")),
                msg("a2", Some("k-a"), Some("P1")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.len(), 3);
    assert!(!r[0].duplicate && !r[1].duplicate);
    assert!(r[2].duplicate && r[2].conflict);
    assert_eq!(r[2].offset, r[0].offset);
    assert_eq!(r[1].offset, r[0].offset + 1);
    // Keys that map to different partitions: refused whole, nothing stored.
    let keys: Vec<String> = (0..50).map(|i| format!("P{i}")).collect();
    let batch: Vec<PublishMessage> = keys.iter().map(|k| msg("x", None, Some(k))).collect();
    let before: usize = (0..4)
        .map(|p| broker.read("t", p, 0, 1000).unwrap().len())
        .sum();
    let err = broker.publish("t", batch).await.unwrap_err();
    assert_eq!(err.code(), "batch_spans_partitions");
    let after: usize = (0..4)
        .map(|p| broker.read("t", p, 0, 1000).unwrap().len())
        .sum();
    assert_eq!(before, after);
    // Too large: refused whole.
    let big = vec![
        msg("ok", None, Some("P1")),
        PublishMessage::new(vec![0u8; 17 << 20]).with_partition_key("P1"),
    ];
    let err = broker.publish("t", big).await.unwrap_err();
    assert_eq!(err.code(), "message_too_large");
    let after2: usize = (0..4)
        .map(|p| broker.read("t", p, 0, 1000).unwrap().len())
        .sum();
    assert_eq!(after, after2);
}

#[tokio::test]
async fn publish_each_answers_every_message_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    broker
        .put_topic(
            "t",
            TopicConfig {
                partitions: 3,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let stored_before = broker
        .publish("t", vec![msg("earlier", Some("k-earlier"), Some("P0"))])
        .await
        .unwrap();
    // Three partition keys interleaved, unkeyed messages, a resend of a stored key, a
    // key repeated inside the call, and one message too large for the log.
    let mut messages = Vec::new();
    for i in 0..12 {
        let pk = format!("P{}", i % 3);
        messages.push(msg(&format!("m{i}"), Some(&format!("k{i}")), Some(&pk)));
    }
    messages.push(msg("u0", Some("k-u0"), None));
    messages.push(msg("u1", None, None));
    messages.push(msg("earlier", Some("k-earlier"), Some("P0")));
    messages.push(msg("m4 again", Some("k4"), Some("P1")));
    messages.push(PublishMessage::new(vec![0u8; 17 << 20]).with_partition_key("P2"));
    let n = messages.len();
    let answers = broker.publish_each("t", messages).await.unwrap();
    assert_eq!(answers.len(), n);

    // The too-large message fails alone; its partition's group is still stored.
    let err = answers[n - 1].as_ref().unwrap_err();
    assert_eq!(err.code(), "message_too_large");
    let ok: Vec<_> = answers[..n - 1]
        .iter()
        .map(|a| *a.as_ref().unwrap())
        .collect();
    // The resend and the repeat point at their first copies.
    let resend = ok[14];
    assert!(resend.duplicate && !resend.conflict);
    assert_eq!(
        (resend.partition, resend.offset),
        (stored_before[0].partition, stored_before[0].offset)
    );
    let repeat = ok[15];
    assert!(repeat.duplicate && repeat.conflict);
    assert_eq!(
        (repeat.partition, repeat.offset),
        (ok[4].partition, ok[4].offset)
    );
    assert!(ok[..14].iter().all(|o| !o.duplicate));

    // Every stored message is where its answer says, and each partition key's messages
    // are in the order given.
    for (i, o) in ok[..14].iter().enumerate() {
        let read = broker.read("t", o.partition, o.offset, 1).unwrap();
        let body = String::from_utf8(read[0].body.to_vec()).unwrap();
        let expected = if i < 12 {
            format!("m{i}")
        } else {
            format!("u{}", i - 12)
        };
        assert_eq!(body, expected);
    }
    for p in 0..3 {
        let same_key: Vec<_> = (0..12).filter(|i| i % 3 == p).map(|i| ok[i]).collect();
        assert!(
            same_key
                .windows(2)
                .all(|w| { w[0].partition == w[1].partition && w[0].offset < w[1].offset })
        );
    }
    let total: usize = (0..3)
        .map(|p| broker.read("t", p, 0, 1000).unwrap().len())
        .sum();
    assert_eq!(total, 1 + 14);

    // Only an unknown topic or an empty call fails as a whole.
    assert_eq!(
        broker
            .publish_each("nope", vec![msg("x", None, None)])
            .await
            .unwrap_err()
            .code(),
        "unknown_topic"
    );
    assert!(broker.publish_each("t", Vec::new()).await.is_err());
}

#[tokio::test]
async fn concurrent_publishes_of_one_key_store_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = std::sync::Arc::new(open(dir.path()));
    broker.put_topic("t", TopicConfig::default()).unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let b = std::sync::Arc::clone(&broker);
            tokio::spawn(async move {
                b.publish(
                    "t",
                    vec![msg("same", Some(&format!("key-{}", i % 4)), None)],
                )
                .await
            })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        if !r[0].duplicate {
            stored += 1;
        }
    }
    assert_eq!(stored, 4);
    assert_eq!(broker.read("t", 0, 0, 100).unwrap().len(), 4);
}

#[tokio::test]
async fn unknown_topics_and_partitions_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    let e = broker
        .publish("nope", vec![msg("x", None, None)])
        .await
        .unwrap_err();
    assert!(matches!(e, BrokerError::UnknownTopic(_)));
    assert_eq!(e.code(), "unknown_topic");
    broker.put_topic("t", TopicConfig::default()).unwrap();
    assert_eq!(
        broker.read("t", 5, 0, 1).unwrap_err().code(),
        "unknown_partition"
    );
    assert_eq!(
        broker.publish("t", vec![]).await.unwrap_err().code(),
        "empty_batch"
    );
}

/// A client that times out and resends is the common case in hospital integration: the
/// first publish's future is dropped (an HTTP handler is cancelled when its client
/// disconnects) after its append was queued. The resend must find the first copy, never
/// store a second one, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_gives_up_midway_never_causes_a_second_copy() {
    let dir = tempfile::tempdir().unwrap();
    let broker = std::sync::Arc::new(open(dir.path()));
    broker.put_topic("orders", TopicConfig::default()).unwrap();
    let keys: Vec<String> = (0..64).map(|i| format!("ORM|LAB|{i:06}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let first = broker.publish("orders", vec![msg("order", Some(key), None)]);
        // Drop the publish after 0, 1 or a few polls: wherever it stops, the resend
        // below must either find it or store the only copy.
        let mut first = Box::pin(first);
        for _ in 0..1 + i % 3 {
            let poll = tokio::time::timeout(std::time::Duration::ZERO, &mut first).await;
            if poll.is_ok() {
                break;
            }
        }
        drop(first);
        let resend = broker
            .publish("orders", vec![msg("order", Some(key), None)])
            .await
            .unwrap();
        assert!(!resend[0].conflict);
    }
    let count_copies = |broker: &Broker| {
        let stored = broker.read("orders", 0, 0, 10_000).unwrap();
        let mut per_key = std::collections::BTreeMap::<Bytes, usize>::new();
        for m in stored {
            *per_key.entry(m.idempotency_key.unwrap()).or_default() += 1;
        }
        per_key
    };
    let per_key = count_copies(&broker);
    assert_eq!(per_key.len(), keys.len(), "every key stored");
    assert!(per_key.values().all(|&n| n == 1), "{per_key:?}");
    // And after a restart (no checkpoint: the index is rebuilt from the log).
    drop(broker);
    let broker = open(dir.path());
    for key in &keys {
        let again = broker
            .publish("orders", vec![msg("order", Some(key), None)])
            .await
            .unwrap();
        assert!(again[0].duplicate, "{key} stored twice after a restart");
    }
    assert!(count_copies(&broker).values().all(|&n| n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_past_the_dedup_window_are_forgotten_and_their_memory_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    let config = TopicConfig {
        dedup_window_ms: Some(1_000),
        ..TopicConfig::default()
    };
    broker.put_topic("short", config).unwrap();
    let rt = broker.topic("short").unwrap();
    for i in 0..50 {
        let m = msg("old", Some(&format!("old-{i}")), None);
        assert!(!broker.publish("short", vec![m]).await.unwrap()[0].duplicate);
    }
    assert_eq!(rt.dedup_stats().unwrap().keys, 50);
    let resend = broker
        .publish("short", vec![msg("old", Some("old-0"), None)])
        .await
        .unwrap();
    assert!(
        resend[0].duplicate,
        "inside the window a resend is a duplicate"
    );
    // Keep publishing new keys (publishes are what schedule maintenance) until the old
    // keys have been expired: after the 1 s window plus the 1 s expiry interval.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        let m = msg("new", Some(&format!("new-{n}")), None);
        broker.publish("short", vec![m]).await.unwrap();
        // At 5 new keys a second, at most ~10 are younger than window + interval; 15
        // or fewer remembered means the old ones are going (they expire in passes).
        let keys = rt.dedup_stats().unwrap().keys;
        if keys <= 15 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "old keys still remembered: {keys} after {n} new ones"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Past the window the old key is new again.
    let after = broker
        .publish("short", vec![msg("old", Some("old-1"), None)])
        .await
        .unwrap();
    assert!(!after[0].duplicate);
}

/// Runs due maintenance (as the server does every second) until the topic's index holds
/// at most `keys` keys; fails after 20 s.
async fn maintain_until_keys_at_most(broker: &Broker, rt: &carebus_core::TopicRuntime, keys: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        broker.run_due_maintenance();
        let held = rt.dedup_stats().unwrap().keys;
        if held <= keys {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expired keys still remembered: {held} (expected at most {keys})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_topic_forgets_its_expired_keys_when_maintenance_is_run() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    let config = TopicConfig {
        dedup_window_ms: Some(1_000),
        ..TopicConfig::default()
    };
    broker.put_topic("idle", config).unwrap();
    let rt = broker.topic("idle").unwrap();
    for i in 0..20 {
        let m = msg("x", Some(&format!("k-{i}")), None);
        broker.publish("idle", vec![m]).await.unwrap();
    }
    assert_eq!(rt.dedup_stats().unwrap().keys, 20);
    // No more publishes: only the periodic call can start the expiry.
    maintain_until_keys_at_most(&broker, &rt, 0).await;
    // Forgotten means a resend is stored again (the window has passed).
    let again = broker
        .publish("idle", vec![msg("x", Some("k-0"), None)])
        .await
        .unwrap();
    assert!(!again[0].duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_dedup_window_takes_effect_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path());
    let hour = TopicConfig {
        dedup_window_ms: Some(3_600_000),
        ..TopicConfig::default()
    };
    broker.put_topic("w", hour).unwrap();
    broker
        .publish("w", vec![msg("x", Some("K"), None)])
        .await
        .unwrap();
    let again = broker
        .publish("w", vec![msg("x", Some("K"), None)])
        .await
        .unwrap();
    assert!(again[0].duplicate);
    // Shortened to 500 ms: once K is older than that, a resend is stored again, and
    // maintenance forgets the old entry.
    let short = TopicConfig {
        dedup_window_ms: Some(500),
        ..hour
    };
    broker.put_topic("w", short).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let later = broker
        .publish("w", vec![msg("x", Some("K"), None)])
        .await
        .unwrap();
    assert!(!later[0].duplicate, "the shorter window applies at once");
    let rt = broker.topic("w").unwrap();
    maintain_until_keys_at_most(&broker, &rt, 1).await;
    // Lengthened again: the window is used for lookups from now on.
    let day = TopicConfig {
        dedup_window_ms: Some(86_400_000),
        ..TopicConfig::default()
    };
    broker.put_topic("w", day).unwrap();
    let dup = broker
        .publish("w", vec![msg("x", Some("K"), None)])
        .await
        .unwrap();
    assert!(dup[0].duplicate);
    assert_eq!(dup[0].offset, later[0].offset);
}
