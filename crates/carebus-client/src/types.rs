//! The JSON shapes of the carebus HTTP API, as the client sends and reads them.
//!
//! Request types skip absent fields (the server refuses unknown fields, not missing
//! ones); reply types ignore fields they do not know, so a newer server still parses.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Settings of a topic (`PUT /v1/topics/{topic}`); `None` takes the server's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Number of partitions, 1..=1024 (can grow, not shrink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// Retention by age in milliseconds (default 7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
    /// Retention by size in bytes per partition (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_bytes: Option<u64>,
    /// Deduplication window in milliseconds (default: the retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window_ms: Option<u64>,
}

/// A topic with its configuration and figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Topic {
    /// The topic's name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
    /// The configuration as stored.
    #[serde(default)]
    pub config: TopicConfig,
    /// Next offset of each partition.
    #[serde(default)]
    pub end_offsets: Vec<u64>,
    /// First retained offset of each partition.
    #[serde(default)]
    pub start_offsets: Vec<u64>,
    /// Messages stored since the broker started.
    #[serde(default)]
    pub published: u64,
    /// Duplicate publishes answered since the broker started.
    #[serde(default)]
    pub duplicates: u64,
    /// Conflicting resends (same key, different body) since the broker started.
    #[serde(default)]
    pub conflicts: u64,
    /// The topic's subscriptions.
    #[serde(default)]
    pub subscriptions: Vec<Subscription>,
}

/// How a subscription spreads deliveries over its consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dispatch {
    /// By consumer name, in turn.
    RoundRobin,
    /// A random waiting consumer.
    Random,
    /// The consumer with the fewest unacknowledged deliveries.
    LeastInFlight,
}

/// Where a new subscription starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// The oldest retained message.
    Earliest,
    /// The next message published.
    Latest,
}

/// Redelivery backoff of a subscription; `None` fields take the server's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionBackoff {
    /// Delay after the first failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_ms: Option<u64>,
    /// Longest delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<u64>,
    /// Growth per attempt (1..=100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// Random spread (0..=1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

/// Settings of a subscription; `None` takes the server's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionConfig {
    /// Dispatch strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<Dispatch>,
    /// Lease of a delivery in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_deadline_ms: Option<u64>,
    /// Deliveries of one message before it becomes a dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Redelivery backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<SubscriptionBackoff>,
    /// Start position (only used at creation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartPosition>,
    /// Topic receiving a failure record per dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

/// Counters (since the broker started) and gauges (now) of a subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscriptionStats {
    /// Deliveries made.
    pub delivered: u64,
    /// Of which redeliveries.
    pub redelivered: u64,
    /// Acknowledged.
    pub acked: u64,
    /// Negatively acknowledged.
    pub nacked: u64,
    /// Leases that ran out.
    pub expired: u64,
    /// Leased now.
    pub in_flight: u64,
    /// Stored, neither acknowledged nor dead-lettered.
    pub backlog: u64,
    /// Dead letters now.
    pub dead_letters: u64,
}

/// A subscription with its settings and figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// The topic.
    pub topic: String,
    /// The subscription's name.
    pub name: String,
    /// Its settings.
    #[serde(default)]
    pub config: SubscriptionConfig,
    /// Its figures.
    #[serde(default)]
    pub stats: SubscriptionStats,
}

/// A message to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The payload, stored byte for byte.
    pub body: Vec<u8>,
    /// Content type stored with the message.
    pub content_type: Option<String>,
    /// A second publish with this key (within the dedup window) is not stored again.
    pub idempotency_key: Option<String>,
    /// Messages with the same partition key keep their order.
    pub partition_key: Option<String>,
    /// Message headers (names are lower-cased by the server).
    pub headers: BTreeMap<String, String>,
}

impl Message {
    /// A message with this body and nothing else.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        Message {
            body: body.into(),
            ..Message::default()
        }
    }

    /// Sets the idempotency key.
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the partition key.
    #[must_use]
    pub fn partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Sets the content type.
    #[must_use]
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// One message in the JSON form of `messages:batch` and transaction publishes.
#[derive(Debug, Serialize)]
pub(crate) struct BatchMessage<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition_key: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: &'a BTreeMap<String, String>,
}

impl<'a> From<&'a Message> for BatchMessage<'a> {
    fn from(m: &'a Message) -> Self {
        let (body, body_base64) = match std::str::from_utf8(&m.body) {
            Ok(text) => (Some(text), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&m.body)),
            ),
        };
        BatchMessage {
            body,
            body_base64,
            content_type: m.content_type.as_deref(),
            idempotency_key: m.idempotency_key.as_deref(),
            partition_key: m.partition_key.as_deref(),
            headers: &m.headers,
        }
    }
}

/// How durable an acknowledged message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// On disk before the answer.
    Fsynced,
    /// Written; fsynced within the server's interval.
    Buffered,
}

/// The server's answer to one publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Partition of the stored copy.
    pub partition: u32,
    /// Offset of the stored copy.
    pub offset: u64,
    /// The key had been stored already: nothing new was stored.
    #[serde(default)]
    pub duplicate: bool,
    /// A duplicate whose body differs from the stored copy (the first copy is kept).
    #[serde(default)]
    pub conflict: bool,
    /// How durable the copy is.
    pub durability: Durability,
}

/// A stored message, as read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// When it was stored (milliseconds since the epoch).
    #[serde(default)]
    pub timestamp_ms: Option<i64>,
    /// Partition key.
    #[serde(default)]
    pub partition_key: Option<String>,
    /// Idempotency key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Content type.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The payload.
    #[serde(rename = "body_base64", with = "base64_body")]
    pub body: Vec<u8>,
}

/// A leased message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Fencing id to acknowledge with (below 2^63).
    pub delivery_id: u64,
    /// 1 for the first delivery, then counting redeliveries.
    pub attempt: u32,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// When it was stored (milliseconds since the epoch).
    #[serde(default)]
    pub timestamp_ms: Option<i64>,
    /// Partition key.
    #[serde(default)]
    pub partition_key: Option<String>,
    /// Idempotency key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Content type.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The payload.
    #[serde(rename = "body_base64", with = "base64_body")]
    pub body: Vec<u8>,
}

/// What `receive` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReceiveOptions {
    /// Most deliveries in one answer (server bounds: 1..=1000, default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Long poll: wait up to this long for a first delivery (≤ 60000; default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// Consumer name (dispatch and traces).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

/// A delivery id the server refused to settle, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// The refused id.
    pub delivery_id: u64,
    /// `unknown_or_stale_delivery` or `lease_expired`.
    pub code: String,
}

/// The answer to an ack, nack or transactional ack.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    /// How many ids took effect.
    pub count: u64,
    /// The ids that changed nothing.
    pub refused: Vec<Refused>,
}

/// A dead letter of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its id (for replay and discard).
    pub id: u64,
    /// Partition of the message.
    pub partition: u32,
    /// Offset of the message.
    pub offset: u64,
    /// The last failure's reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// Deliveries made.
    #[serde(default)]
    pub attempts: u32,
    /// First failure (milliseconds since the epoch).
    #[serde(default)]
    pub first_failure_ms: Option<i64>,
    /// Last failure (milliseconds since the epoch).
    #[serde(default)]
    pub last_failure_ms: Option<i64>,
}

/// One event in a message's life within a subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceEvent {
    /// When (milliseconds since the epoch).
    pub at_ms: i64,
    /// `delivered`, `acked`, `nacked`, `lease_expired`, `dead_lettered`, …
    pub kind: String,
    /// Anything else the server said about the event (attempt, consumer, reason, …).
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// A message's state and history in one subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionTrace {
    /// The subscription.
    pub subscription: String,
    /// `pending`, `in_flight`, `acknowledged`, `dead_lettered`, `discarded`, `not_subscribed`.
    pub state: String,
    /// Its events, oldest first.
    #[serde(default)]
    pub events: Vec<TraceEvent>,
}

/// Where a message is in every subscription of its topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// The topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// When it was stored.
    #[serde(default)]
    pub stored_ms: Option<i64>,
    /// Idempotency key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Size of the body (the body itself is never in a trace).
    #[serde(default)]
    pub body_bytes: Option<u64>,
    /// Per subscription.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionTrace>,
}

/// The outcome of one message published by a committed transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitResult {
    /// The topic.
    pub topic: String,
    /// Where it was stored.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Serde for `body_base64` as bytes.
pub(crate) mod base64_body {
    use base64::Engine as _;
    use serde::Deserializer;

    pub(crate) fn serialize<S: serde::Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(body))
    }

    /// Decodes straight from the JSON text (no intermediate `String` when the reader
    /// can lend it, as with `serde_json::from_slice`).
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Base64Visitor;
        impl serde::de::Visitor<'_> for Base64Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                base64::engine::general_purpose::STANDARD
                    .decode(v.as_bytes())
                    .map_err(E::custom)
            }
        }
        d.deserialize_str(Base64Visitor)
    }
}

/// Reads `{"acked"|"nacked"|"accepted": n, "refused": [...]}`.
pub(crate) fn settled_from(value: &serde_json::Value, verb: &str) -> Option<Settled> {
    let count = value.get(verb)?.as_u64()?;
    let refused = refused_from(value);
    Some(Settled { count, refused })
}

/// Reads a `refused` list (in an answer or a problem document); absent → empty.
pub(crate) fn refused_from(value: &serde_json::Value) -> Vec<Refused> {
    let Some(list) = value.get("refused").and_then(|r| r.as_array()) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|r| {
            let id = r
                .get("delivery_id_str")
                .and_then(|s| s.as_str())
                .and_then(|s| s.parse().ok())
                .or_else(|| r.get("delivery_id").and_then(serde_json::Value::as_u64))?;
            let code = r.get("code").and_then(|c| c.as_str()).unwrap_or("refused");
            Some(Refused {
                delivery_id: id,
                code: code.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    #[test]
    fn batch_message_uses_text_or_base64_and_skips_absent_fields() {
        let m = Message::new("MSH|^~\\&|\r").idempotency_key("K1");
        let v = serde_json::to_value(BatchMessage::from(&m)).unwrap();
        assert_eq!(v, json!({"body": "MSH|^~\\&|\r", "idempotency_key": "K1"}));
        let m = Message::new(vec![0u8, 1, 0xff])
            .partition_key("MRN1")
            .content_type("application/octet-stream")
            .header("origin", "lis");
        let v = serde_json::to_value(BatchMessage::from(&m)).unwrap();
        assert_eq!(
            v,
            json!({"body_base64": "AAH/", "partition_key": "MRN1",
                   "content_type": "application/octet-stream", "headers": {"origin": "lis"}})
        );
    }

    #[test]
    fn configs_send_only_what_is_set() {
        let c = TopicConfig {
            partitions: Some(4),
            ..TopicConfig::default()
        };
        assert_eq!(serde_json::to_value(&c).unwrap(), json!({"partitions": 4}));
        let s = SubscriptionConfig {
            dispatch: Some(Dispatch::LeastInFlight),
            start: Some(StartPosition::Latest),
            ..SubscriptionConfig::default()
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"dispatch": "least_in_flight", "start": "latest"})
        );
        assert_eq!(
            serde_json::to_value(ReceiveOptions::default()).unwrap(),
            json!({})
        );
    }

    #[test]
    fn reads_server_shapes() {
        let d: Delivery = serde_json::from_value(json!({
            "delivery_id": 6120448306151526077u64, "delivery_id_str": "6120448306151526077",
            "attempt": 1, "partition": 2, "offset": 17, "timestamp_ms": 1793600000000u64,
            "partition_key": "MRN100234", "idempotency_key": null,
            "content_type": null, "headers": {}, "body_base64": "AAH/", "future_field": 1
        }))
        .unwrap();
        assert_eq!(d.delivery_id, 6120448306151526077);
        assert_eq!(d.body, vec![0, 1, 0xff]);
        assert_eq!(d.idempotency_key, None);
        let t: Topic = serde_json::from_value(json!({
            "name": "hl7.adt", "partitions": 4, "subscriptions": [],
            "config": {"partitions": 4, "retention_ms": 604800000u64, "retention_bytes": null, "dedup_window_ms": null},
            "end_offsets": [12, 0, 3, 7], "start_offsets": [0, 0, 0, 0],
            "published": 22, "duplicates": 3, "conflicts": 1
        }))
        .unwrap();
        assert_eq!(t.config.retention_bytes, None);
        assert_eq!(t.end_offsets.iter().sum::<u64>(), 22);
        let s = settled_from(
            &json!({"acked": 1, "refused": [{"delivery_id": 9, "delivery_id_str": "9", "code": "lease_expired"}]}),
            "acked",
        )
        .unwrap();
        assert_eq!(s.count, 1);
        assert_eq!(s.refused[0].code, "lease_expired");
        let tr: Trace = serde_json::from_value(json!({
            "topic": "t", "partition": 0, "offset": 1, "stored_ms": 5, "idempotency_key": "k", "body_bytes": 3,
            "subscriptions": [{"subscription": "s", "state": "acknowledged", "events": [
                {"at_ms": 1, "kind": "delivered", "attempt": 1, "consumer": "c"}, {"at_ms": 2, "kind": "acked"}]}]
        }))
        .unwrap();
        assert_eq!(tr.subscriptions[0].events[0].details["consumer"], "c");
    }
}
