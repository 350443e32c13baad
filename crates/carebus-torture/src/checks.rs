//! The invariants, checked from the clients' history against what the server holds
//! once everything is drained:
//!
//! 1. **Set** (publishes, MLLP): every acknowledged publish is stored exactly once, at
//!    the position its acknowledgement named, byte for byte; nothing is stored twice or
//!    stored without having been sent.
//! 2. **Queue** (subscriptions `work` and `txn`): no message is delivered by a receive
//!    sent after its acknowledgement (plain ack or committed transaction) was confirmed;
//!    every stored message was acknowledged by the end; for each partition key, a
//!    message is never delivered before an acknowledgement of the previous one was sent.
//! 3. **Dead letters**: every message of the poison topic is in the dead-letter list
//!    exactly once.
//! 4. **Transactions**: no result of a transaction whose commit was never sent is
//!    visible; every confirmed commit's results are all visible and name it; a
//!    transaction is visible wholly or not at all; every order has exactly one result.

use std::collections::{BTreeMap, HashMap};

use carebus_client::{Client, StoredMessage};

use crate::TortureError;
use crate::history::{AckOutcome, History, Sub, TxnOutcome, lock};
use crate::workers::{HL7_TOPIC, ORDERS, POISON, POISON_SUB, RESULTS};

/// Violations found (empty: every invariant held).
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub violations: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    pub(crate) fn violation(&mut self, what: String) {
        self.violations.push(what);
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ok() {
            return write!(f, "every invariant held");
        }
        // Grouped by kind (the text with its numbers masked), a few examples each.
        let mut kinds: BTreeMap<String, Vec<&String>> = BTreeMap::new();
        for v in &self.violations {
            let mut kind = String::with_capacity(v.len());
            for c in v.chars() {
                if !c.is_ascii_digit() {
                    kind.push(c);
                } else if !kind.ends_with('#') {
                    kind.push('#');
                }
            }
            kinds.entry(kind).or_default().push(v);
        }
        writeln!(
            f,
            "{} violations of {} kinds:",
            self.violations.len(),
            kinds.len()
        )?;
        for (kind, examples) in kinds.iter().take(20) {
            writeln!(f, "  {} × {kind}", examples.len())?;
            for e in examples.iter().take(3) {
                writeln!(f, "      e.g. {e}")?;
            }
        }
        Ok(())
    }
}

pub(crate) struct Counts {
    pub(crate) messages: u64,
    pub(crate) dead_letters: u64,
}

type Position = (u32, u64);

/// Every stored message of a topic (none if it does not exist).
async fn read_topic(client: &Client, topic: &str) -> Result<Vec<StoredMessage>, TortureError> {
    let setup = |e: carebus_client::Error| TortureError::Setup(format!("reading {topic}: {e}"));
    let info = match client.get_topic(topic).await {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(Vec::new()),
        Err(e) => return Err(setup(e)),
    };
    let mut out = Vec::new();
    for (p, end) in info.end_offsets.iter().enumerate() {
        let p = u32::try_from(p).unwrap_or(u32::MAX);
        let start = info.start_offsets.get(p as usize).copied().unwrap_or(0);
        for o in start..*end {
            out.push(client.read_message(topic, p, o).await.map_err(setup)?);
        }
    }
    Ok(out)
}

fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.split(' ')
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

pub(crate) async fn check(
    client: &Client,
    history: &History,
    verdict: &mut Verdict,
) -> Result<Counts, TortureError> {
    for a in lock(&history.anomalies).iter() {
        verdict.violation(format!("client saw: {a}"));
    }
    let orders = read_topic(client, ORDERS).await?;
    let poison = read_topic(client, POISON).await?;
    let results = read_topic(client, RESULTS).await?;
    let hl7 = read_topic(client, HL7_TOPIC).await?;
    check_publishes(history, &orders, &poison, verdict);
    check_queues(history, &orders, verdict);
    check_transactions(history, &orders, &results, verdict);
    check_mllp(history, &hl7, verdict);
    let dead_letters = check_dead_letters(client, &poison, verdict).await?;
    Ok(Counts {
        messages: (orders.len() + poison.len() + results.len() + hl7.len()) as u64,
        dead_letters,
    })
}

fn check_publishes(
    history: &History,
    orders: &[StoredMessage],
    poison: &[StoredMessage],
    verdict: &mut Verdict,
) {
    let publishes = lock(&history.publishes);
    let sent: HashMap<(&str, &str), _> = publishes
        .iter()
        .map(|p| ((p.topic, p.key.as_str()), p))
        .collect();
    let mut stored: HashMap<(&str, &str), Vec<&StoredMessage>> = HashMap::new();
    for (topic, messages) in [(ORDERS, orders), (POISON, poison)] {
        for m in messages {
            let Some(key) = m.idempotency_key.as_deref() else {
                verdict.violation(format!(
                    "{topic} {}/{} has no idempotency key",
                    m.partition, m.offset
                ));
                continue;
            };
            match sent.get(&(topic, key)) {
                None => verdict.violation(format!(
                    "{topic} {}/{} ({key}) was never published",
                    m.partition, m.offset
                )),
                Some(p) if p.body != m.body => verdict.violation(format!(
                    "{topic} {}/{} ({key}) is not the body that was published",
                    m.partition, m.offset
                )),
                Some(_) => {}
            }
            stored.entry((topic, key)).or_default().push(m);
        }
    }
    for ((topic, key), copies) in &stored {
        if copies.len() > 1 {
            let at: Vec<String> = copies
                .iter()
                .map(|m| format!("{}/{}", m.partition, m.offset))
                .collect();
            verdict.violation(format!(
                "{topic} {key} stored {} times: {}",
                copies.len(),
                at.join(", ")
            ));
        }
    }
    for p in publishes.iter() {
        if p.conflict {
            verdict.violation(format!(
                "{} {}: a faithful resend was answered `conflict`",
                p.topic, p.key
            ));
        }
        let Some((partition, offset)) = p.acked_at else {
            continue;
        };
        match stored.get(&(p.topic, p.key.as_str())).map(Vec::as_slice) {
            None | Some([]) => verdict.violation(format!(
                "{} {}: acknowledged at {partition}/{offset} but not stored",
                p.topic, p.key
            )),
            Some([m, ..]) if (m.partition, m.offset) != (partition, offset) => {
                verdict.violation(format!(
                    "{} {}: acknowledged at {partition}/{offset} but stored at {}/{}",
                    p.topic, p.key, m.partition, m.offset
                ))
            }
            Some(_) => {}
        }
    }
}

fn check_queues(history: &History, orders: &[StoredMessage], verdict: &mut Verdict) {
    let deliveries = lock(&history.deliveries);
    let acks = lock(&history.acks);
    let txns = lock(&history.txns);
    // Per subscription and position: when acknowledgements were sent, and when the first
    // confirmed one was answered.
    let mut sent: HashMap<(Sub, Position), Vec<u64>> = HashMap::new();
    let mut confirmed: HashMap<(Sub, Position), u64> = HashMap::new();
    for a in acks.iter() {
        let k = (a.sub, (a.partition, a.offset));
        sent.entry(k).or_default().push(a.sent_us);
        if a.outcome == AckOutcome::Confirmed {
            let t = confirmed.entry(k).or_insert(a.answered_us);
            *t = (*t).min(a.answered_us);
        }
    }
    for t in txns.iter() {
        if t.outcome == TxnOutcome::NeverCommitted {
            continue;
        }
        for pos in &t.origins {
            let k = (Sub::Txn, *pos);
            sent.entry(k).or_default().push(t.commit_sent_us);
            if t.outcome == TxnOutcome::Committed {
                let c = confirmed.entry(k).or_insert(t.committed_us);
                *c = (*c).min(t.committed_us);
            }
        }
    }
    let mut delivered: HashMap<(Sub, Position), Vec<u64>> = HashMap::new();
    for d in deliveries.iter() {
        let k = (d.sub, (d.partition, d.offset));
        if let Some(&t) = confirmed.get(&k)
            && d.requested_us > t
        {
            verdict.violation(format!(
                "{:?} {}/{}: delivered by a receive sent {} µs after its acknowledgement was confirmed",
                d.sub,
                d.partition,
                d.offset,
                d.requested_us - t
            ));
        }
        delivered.entry(k).or_default().push(d.received_us);
    }
    // Per partition key, in offset order (one key lives in one partition).
    let mut by_key: BTreeMap<&str, Vec<Position>> = BTreeMap::new();
    for m in orders {
        by_key
            .entry(m.partition_key.as_deref().unwrap_or(""))
            .or_default()
            .push((m.partition, m.offset));
    }
    for sub in [Sub::Work, Sub::Txn] {
        for m in orders {
            if !sent.contains_key(&(sub, (m.partition, m.offset))) {
                verdict.violation(format!(
                    "{sub:?} {}/{}: never acknowledged although the subscription drained",
                    m.partition, m.offset
                ));
            }
        }
        for (key, positions) in &mut by_key {
            positions.sort_unstable();
            for pair in positions.windows(2) {
                let [earlier, later] = pair else { continue };
                let acked_sends = sent
                    .get(&(sub, *earlier))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let first_ack_sent = acked_sends.iter().min().copied();
                for &received in delivered
                    .get(&(sub, *later))
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    if first_ack_sent.is_none_or(|t| t > received) {
                        verdict.violation(format!(
                            "{sub:?} key {key}: {}/{} delivered before {}/{} was acknowledged",
                            later.0, later.1, earlier.0, earlier.1
                        ));
                    }
                }
            }
        }
    }
}

fn check_transactions(
    history: &History,
    orders: &[StoredMessage],
    results: &[StoredMessage],
    verdict: &mut Verdict,
) {
    let txns = lock(&history.txns);
    let by_id: HashMap<u64, _> = txns.iter().map(|t| (t.id, t)).collect();
    let order_key: HashMap<Position, &str> = orders
        .iter()
        .filter_map(|m| Some(((m.partition, m.offset), m.idempotency_key.as_deref()?)))
        .collect();
    // Result key → the transaction named in each stored copy.
    let mut result_txn: HashMap<&str, Vec<Option<u64>>> = HashMap::new();
    for r in results {
        let body = String::from_utf8_lossy(&r.body);
        let txn = field(&body, "txn").and_then(|t| t.parse::<u64>().ok());
        let key = r.idempotency_key.as_deref().unwrap_or("");
        result_txn.entry(key).or_default().push(txn);
        match txn.and_then(|id| by_id.get(&id)) {
            None => verdict.violation(format!(
                "result {}/{} names a transaction no client began",
                r.partition, r.offset
            )),
            Some(t) if t.outcome == TxnOutcome::NeverCommitted => verdict.violation(format!(
                "result {}/{} of transaction {} is visible but the transaction was never committed",
                r.partition, r.offset, t.id
            )),
            Some(_) => {}
        }
    }
    for (key, copies) in &result_txn {
        if copies.len() > 1 {
            verdict.violation(format!("result {key} stored {} times", copies.len()));
        }
    }
    for t in txns.iter() {
        let named: Vec<bool> = t
            .origins
            .iter()
            .map(|pos| {
                order_key.get(pos).is_some_and(|k| {
                    result_txn
                        .get(format!("R:{k}").as_str())
                        .is_some_and(|c| c.contains(&Some(t.id)))
                })
            })
            .collect();
        let visible = named.iter().filter(|v| **v).count();
        if t.outcome == TxnOutcome::Committed && visible < named.len() {
            verdict.violation(format!(
                "transaction {} committed but only {visible} of its {} results name it",
                t.id,
                named.len()
            ));
        } else if visible > 0 && visible < named.len() {
            verdict.violation(format!(
                "transaction {} partly visible: {visible} of {} results",
                t.id,
                named.len()
            ));
        }
    }
    for m in orders {
        let key = m.idempotency_key.as_deref().unwrap_or("");
        if !result_txn.contains_key(format!("R:{key}").as_str()) {
            verdict.violation(format!(
                "order {}/{} has no result after the drain",
                m.partition, m.offset
            ));
        }
    }
}

fn check_mllp(history: &History, hl7: &[StoredMessage], verdict: &mut Verdict) {
    let sent = lock(&history.mllp);
    let mut stored: HashMap<&str, usize> = HashMap::new();
    for m in hl7 {
        *stored
            .entry(m.idempotency_key.as_deref().unwrap_or(""))
            .or_default() += 1;
    }
    let known: std::collections::HashSet<&str> = sent.iter().map(|s| s.key.as_str()).collect();
    for (key, n) in &stored {
        if *n > 1 {
            verdict.violation(format!("MLLP message {key} stored {n} times"));
        }
        if !known.contains(key) {
            verdict.violation(format!("MLLP message {key} stored but never sent"));
        }
    }
    for s in sent.iter().filter(|s| s.acked) {
        if !stored.contains_key(s.key.as_str()) {
            verdict.violation(format!(
                "MLLP message {} acknowledged (AA) but not stored",
                s.key
            ));
        }
    }
}

async fn check_dead_letters(
    client: &Client,
    poison: &[StoredMessage],
    verdict: &mut Verdict,
) -> Result<u64, TortureError> {
    let letters = client
        .dead_letters(POISON, POISON_SUB)
        .await
        .map_err(|e| TortureError::Setup(format!("listing dead letters: {e}")))?;
    let mut count: HashMap<Position, usize> = HashMap::new();
    for l in &letters {
        *count.entry((l.partition, l.offset)).or_default() += 1;
    }
    for m in poison {
        match count.get(&(m.partition, m.offset)) {
            Some(1) => {}
            Some(n) => verdict.violation(format!(
                "poison {}/{} dead-lettered {n} times",
                m.partition, m.offset
            )),
            None => verdict.violation(format!(
                "poison {}/{} neither delivered nor dead-lettered",
                m.partition, m.offset
            )),
        }
    }
    Ok(letters.len() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::history::{AckRecord, DeliveryRecord, PublishRecord, TxnRecord};
    use crate::workers::order_body;

    fn stored(partition: u32, offset: u64, key: &str, patient: u32) -> StoredMessage {
        StoredMessage {
            partition,
            offset,
            timestamp_ms: None,
            partition_key: Some(format!("PAT-{patient}")),
            idempotency_key: Some(key.to_owned()),
            content_type: None,
            headers: BTreeMap::new(),
            body: order_body(key, patient),
        }
    }

    fn published(h: &History, key: &str, patient: u32, at: Option<Position>) {
        h.push_publish(PublishRecord {
            topic: ORDERS,
            key: key.to_owned(),
            body: order_body(key, patient),
            acked_at: at,
            conflict: false,
        });
    }

    fn delivered(h: &History, sub: Sub, pos: Position, requested_us: u64, received_us: u64) {
        lock(&h.deliveries).push(DeliveryRecord {
            sub,
            partition: pos.0,
            offset: pos.1,
            requested_us,
            received_us,
        });
    }

    fn acked(h: &History, pos: Position, sent_us: u64, answered_us: u64) {
        lock(&h.acks).push(AckRecord {
            sub: Sub::Work,
            partition: pos.0,
            offset: pos.1,
            sent_us,
            answered_us,
            outcome: AckOutcome::Confirmed,
        });
    }

    #[test]
    fn violations_are_reported_by_kind() {
        let mut v = Verdict::default();
        v.violation("Work 0/1: lost".into());
        v.violation("Work 2/35: lost".into());
        v.violation("result 1/2 stored 2 times".into());
        let text = v.to_string();
        assert!(text.starts_with("3 violations of 2 kinds"), "{text}");
        assert!(text.contains("2 × Work #/#: lost"), "{text}");
    }

    #[test]
    fn a_faithful_history_passes() {
        let h = History::new();
        published(&h, "a", 1, Some((0, 0)));
        published(&h, "b", 1, Some((0, 1)));
        let orders = [stored(0, 0, "a", 1), stored(0, 1, "b", 1)];
        delivered(&h, Sub::Work, (0, 0), 10, 20);
        acked(&h, (0, 0), 30, 40);
        delivered(&h, Sub::Work, (0, 1), 35, 50);
        acked(&h, (0, 1), 60, 70);
        let mut v = Verdict::default();
        check_publishes(&h, &orders, &[], &mut v);
        // The txn subscription never acknowledged anything in this history.
        let work_only: Vec<String> = {
            check_queues(&h, &orders, &mut v);
            v.violations
                .iter()
                .filter(|s| !s.starts_with("Txn"))
                .cloned()
                .collect()
        };
        assert!(work_only.is_empty(), "{work_only:?}");
    }

    #[test]
    fn lost_and_doubled_publishes_are_violations() {
        let h = History::new();
        published(&h, "a", 1, Some((0, 0)));
        published(&h, "b", 1, Some((0, 1)));
        // "a" is missing, "b" is stored twice, "c" was never published.
        let orders = [
            stored(0, 1, "b", 1),
            stored(0, 2, "b", 1),
            stored(0, 3, "c", 1),
        ];
        let mut v = Verdict::default();
        check_publishes(&h, &orders, &[], &mut v);
        let all = v.violations.join("\n");
        assert!(
            all.contains("a: acknowledged at 0/0 but not stored"),
            "{all}"
        );
        assert!(all.contains("b stored 2 times"), "{all}");
        assert!(all.contains("(c) was never published"), "{all}");
    }

    #[test]
    fn redelivery_after_a_confirmed_ack_and_broken_key_order_are_violations() {
        let h = History::new();
        let orders = [stored(0, 0, "a", 1), stored(0, 1, "b", 1)];
        delivered(&h, Sub::Work, (0, 0), 10, 20);
        acked(&h, (0, 0), 30, 40);
        // Delivered again by a receive sent after the ack was confirmed.
        delivered(&h, Sub::Work, (0, 0), 50, 60);
        // "b" (same patient) handed out before "a" was ever acknowledged.
        delivered(&h, Sub::Work, (0, 1), 5, 25);
        acked(&h, (0, 1), 70, 80);
        let mut v = Verdict::default();
        check_queues(&h, &orders, &mut v);
        let all = v.violations.join("\n");
        assert!(
            all.contains("Work 0/0: delivered by a receive sent 10 µs after"),
            "{all}"
        );
        assert!(
            all.contains("Work key PAT-1: 0/1 delivered before 0/0"),
            "{all}"
        );
    }

    #[test]
    fn partial_and_uncommitted_transactions_are_violations() {
        let h = History::new();
        let orders = [
            stored(0, 0, "a", 1),
            stored(1, 0, "b", 2),
            stored(2, 0, "c", 3),
        ];
        for (id, origins, outcome) in [
            (7, vec![(0, 0), (1, 0)], TxnOutcome::Committed),
            (8, vec![(2, 0)], TxnOutcome::NeverCommitted),
        ] {
            lock(&h.txns).push(TxnRecord {
                id,
                origins,
                outcome,
                commit_sent_us: 1,
                committed_us: 2,
            });
        }
        let result = |offset, key: &str, txn: u64| StoredMessage {
            body: format!("RESULT txn={txn} origin=x key={key}").into_bytes(),
            idempotency_key: Some(format!("R:{key}")),
            ..stored(0, offset, key, 0)
        };
        // Transaction 7 shows only one of its two results; 8 was never committed.
        let results = [result(0, "a", 7), result(1, "c", 8)];
        let mut v = Verdict::default();
        check_transactions(&h, &orders, &results, &mut v);
        let all = v.violations.join("\n");
        assert!(
            all.contains("transaction 7 committed but only 1 of its 2"),
            "{all}"
        );
        assert!(
            all.contains("transaction 8 is visible but the transaction was never committed"),
            "{all}"
        );
        assert!(all.contains("order 1/0 has no result"), "{all}");
    }
}
