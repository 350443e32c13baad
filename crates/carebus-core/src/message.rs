//! How a published message is stored as a log record, and read back.
//!
//! `key` = partition key, `value` = body byte for byte. System fields travel in
//! headers whose names start with `cb.`; the publisher's own headers are stored with
//! the prefix `h.` so the two can never collide.

use bytes::Bytes;
use carebus_log::{Record, StoredRecord};

const IDEMPOTENCY_KEY: &str = "cb.idem";
const CONTENT_TYPE: &str = "cb.ct";
const BODY_HASH: &str = "cb.hash";
const USER_PREFIX: &str = "h.";

/// A message offered for publication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishMessage {
    /// The payload, stored byte for byte.
    pub body: Bytes,
    /// MIME type of the body, if known.
    pub content_type: Option<String>,
    /// Messages with the same partition key land in the same partition, in order.
    pub partition_key: Option<Bytes>,
    /// A second publish with the same key within the window is not stored again.
    pub idempotency_key: Option<Bytes>,
    /// The publisher's headers, kept in order.
    pub headers: Vec<(String, Bytes)>,
}

impl PublishMessage {
    /// A message with this body and nothing else.
    pub fn new(body: impl Into<Bytes>) -> Self {
        PublishMessage {
            body: body.into(),
            ..PublishMessage::default()
        }
    }

    /// Sets the idempotency key.
    #[must_use]
    pub fn with_idempotency_key(mut self, key: impl Into<Bytes>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the partition key.
    #[must_use]
    pub fn with_partition_key(mut self, key: impl Into<Bytes>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Hash of the body, used to tell a faithful resend from a conflicting one.
    pub fn body_hash(&self) -> u64 {
        body_hash(&self.body)
    }

    pub(crate) fn to_record(&self, timestamp_ms: i64) -> Record {
        self.to_record_with_hash(timestamp_ms, self.body_hash())
    }

    /// As [`to_record`](Self::to_record), with the body hash already computed.
    pub(crate) fn to_record_with_hash(&self, timestamp_ms: i64, body_hash: u64) -> Record {
        let mut headers = Vec::with_capacity(self.headers.len() + 3);
        if let Some(k) = &self.idempotency_key {
            headers.push((IDEMPOTENCY_KEY.to_owned(), k.clone()));
        }
        if let Some(ct) = &self.content_type {
            headers.push((CONTENT_TYPE.to_owned(), Bytes::from(ct.clone())));
        }
        headers.push((
            BODY_HASH.to_owned(),
            Bytes::copy_from_slice(&body_hash.to_le_bytes()),
        ));
        for (name, value) in &self.headers {
            headers.push((format!("{USER_PREFIX}{name}"), value.clone()));
        }
        Record {
            key: self.partition_key.clone(),
            value: self.body.clone(),
            headers,
            timestamp_ms,
        }
    }
}

/// The body hash: xxh3-64, stable across machines and versions.
pub fn body_hash(body: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(body)
}

/// A stored message as read back from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Partition it is in.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
    /// When it was stored (ms since the epoch).
    pub timestamp_ms: i64,
    /// Partition key.
    pub partition_key: Option<Bytes>,
    /// Idempotency key.
    pub idempotency_key: Option<Bytes>,
    /// Content type.
    pub content_type: Option<String>,
    /// The publisher's headers.
    pub headers: Vec<(String, Bytes)>,
    /// The body, byte for byte.
    pub body: Bytes,
    /// Hash of the body as stored.
    pub body_hash: u64,
}

impl StoredMessage {
    pub(crate) fn from_record(partition: u32, r: StoredRecord) -> Self {
        let mut idempotency_key = None;
        let mut content_type = None;
        let mut stored_hash = None;
        let mut headers = Vec::new();
        for (name, value) in r.headers {
            match name.as_str() {
                IDEMPOTENCY_KEY => idempotency_key = Some(value),
                CONTENT_TYPE => content_type = Some(String::from_utf8_lossy(&value).into_owned()),
                BODY_HASH => {
                    stored_hash = <[u8; 8]>::try_from(&value[..]).ok().map(u64::from_le_bytes);
                }
                _ => {
                    if let Some(user) = name.strip_prefix(USER_PREFIX) {
                        headers.push((user.to_owned(), value));
                    }
                }
            }
        }
        let body_hash = stored_hash.unwrap_or_else(|| body_hash(&r.value));
        StoredMessage {
            partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            partition_key: r.key,
            idempotency_key,
            content_type,
            headers,
            body: r.value,
            body_hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_the_round_trip_through_a_record() {
        let m = PublishMessage {
            body: Bytes::from_static(b"MSH|^~\\&|..."),
            content_type: Some("x-application/hl7-v2+er7".into()),
            partition_key: Some(Bytes::from_static(b"MRN1")),
            idempotency_key: Some(Bytes::from_static(b"A|B|C")),
            headers: vec![
                ("cb.idem".into(), Bytes::from_static(b"spoof")),
                ("x".into(), Bytes::from_static(b"1")),
            ],
        };
        let r = m.to_record(42);
        let stored = StoredRecord {
            offset: 7,
            timestamp_ms: r.timestamp_ms,
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
        };
        let back = StoredMessage::from_record(3, stored);
        assert_eq!(back.partition, 3);
        assert_eq!(back.offset, 7);
        assert_eq!(back.body, m.body);
        assert_eq!(
            back.idempotency_key, m.idempotency_key,
            "a user header named cb.idem cannot spoof the key"
        );
        assert_eq!(back.headers, m.headers);
        assert_eq!(back.content_type, m.content_type);
        assert_eq!(back.body_hash, m.body_hash());
    }
}
