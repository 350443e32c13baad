//! The binary receive answer (`application/vnd.carebus.deliveries`, version 1): what
//! [`Client::receive`](crate::Client::receive) asks for, since it carries the bodies
//! as they are (no base64, no JSON to parse). Layout in the carebus-http README;
//! integers big-endian, every length 4 bytes.

use std::collections::BTreeMap;

use bytes::Buf;

use crate::types::Delivery;

/// The media type asked for with `Accept`.
pub(crate) const MEDIA_TYPE: &str = "application/vnd.carebus.deliveries";

const FLAG_IDEMPOTENCY_KEY: u8 = 1;
const FLAG_PARTITION_KEY: u8 = 2;
const FLAG_CONTENT_TYPE: u8 = 4;

fn short(what: &str) -> impl FnOnce(bytes::TryGetError) -> String + '_ {
    move |_| format!("the answer ends inside a delivery's {what}")
}

fn take<'a>(buf: &mut &'a [u8], what: &str) -> Result<&'a [u8], String> {
    let n = buf.try_get_u32().map_err(short(what))?;
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    if buf.len() < n {
        return Err(format!(
            "the answer ends inside a delivery's {what} ({n} bytes announced, {} left)",
            buf.len()
        ));
    }
    let (field, rest) = buf.split_at(n);
    *buf = rest;
    Ok(field)
}

/// Text as the JSON answer gives it (keys and header values sent as UTF-8 come back
/// exact).
fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Decodes a binary receive answer (`application/vnd.carebus.deliveries`; what
/// [`Client::receive`](crate::Client::receive) does with it). Headers repeated in the
/// message are joined with ", " (as in the JSON answer). An answer that is cut short,
/// padded or of another version is an error saying where.
pub fn decode(mut buf: &[u8]) -> Result<Vec<Delivery>, String> {
    let version = buf.try_get_u8().map_err(|_| "empty answer".to_owned())?;
    if version != 1 {
        return Err(format!("unknown binary answer version {version}"));
    }
    let count = buf.try_get_u32().map_err(short("count"))?;
    // Each delivery takes at least 41 bytes: the count is bounded by the answer's size.
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(buf.len() / 41));
    for _ in 0..count {
        let delivery_id = buf.try_get_u64().map_err(short("id"))?;
        let attempt = buf.try_get_u32().map_err(short("attempt"))?;
        let partition = buf.try_get_u32().map_err(short("partition"))?;
        let offset = buf.try_get_u64().map_err(short("offset"))?;
        let timestamp_ms = buf.try_get_i64().map_err(short("timestamp"))?;
        let flags = buf.try_get_u8().map_err(short("flags"))?;
        let mut field = |flag: u8, what: &str| -> Result<Option<String>, String> {
            if flags & flag == 0 {
                return Ok(None);
            }
            take(&mut buf, what).map(|b| Some(text(b)))
        };
        let idempotency_key = field(FLAG_IDEMPOTENCY_KEY, "idempotency key")?;
        let partition_key = field(FLAG_PARTITION_KEY, "partition key")?;
        let content_type = field(FLAG_CONTENT_TYPE, "content type")?;
        let header_count = buf.try_get_u32().map_err(short("header count"))?;
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for _ in 0..header_count {
            let name = text(take(&mut buf, "header name")?);
            let value = text(take(&mut buf, "header value")?);
            headers
                .entry(name)
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert(value);
        }
        let body = take(&mut buf, "body")?.to_vec();
        out.push(Delivery {
            delivery_id,
            attempt,
            partition,
            offset,
            timestamp_ms: Some(timestamp_ms),
            partition_key,
            idempotency_key,
            content_type,
            headers,
            body,
        });
    }
    if !buf.is_empty() {
        return Err(format!("{} bytes after the last delivery", buf.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&u32::try_from(b.len()).unwrap().to_be_bytes());
        out.extend_from_slice(b);
    }

    /// One delivery as the layout describes (written independently of the decoder).
    fn answer() -> Vec<u8> {
        let mut a = vec![1];
        a.extend_from_slice(&1u32.to_be_bytes());
        a.extend_from_slice(&77u64.to_be_bytes());
        a.extend_from_slice(&2u32.to_be_bytes());
        a.extend_from_slice(&3u32.to_be_bytes());
        a.extend_from_slice(&40u64.to_be_bytes());
        a.extend_from_slice(&1_700_000_000_123i64.to_be_bytes());
        a.push(FLAG_IDEMPOTENCY_KEY | FLAG_CONTENT_TYPE);
        put(&mut a, b"LAB|9");
        put(&mut a, b"x-application/hl7-v2+er7");
        a.extend_from_slice(&3u32.to_be_bytes());
        put(&mut a, b"origin");
        put(&mut a, b"lab");
        put(&mut a, b"via");
        put(&mut a, b"a");
        put(&mut a, b"via");
        put(&mut a, b"b");
        put(&mut a, b"MSH|\r\x00\xff");
        a
    }

    #[test]
    fn a_binary_answer_decodes_every_field() {
        let ds = decode(&answer()).unwrap();
        assert_eq!(ds.len(), 1);
        let d = &ds[0];
        assert_eq!(
            (d.delivery_id, d.attempt, d.partition, d.offset),
            (77, 2, 3, 40)
        );
        assert_eq!(d.timestamp_ms, Some(1_700_000_000_123));
        assert_eq!(d.idempotency_key.as_deref(), Some("LAB|9"));
        assert_eq!(d.partition_key, None);
        assert_eq!(d.content_type.as_deref(), Some("x-application/hl7-v2+er7"));
        assert_eq!(d.headers.get("origin").map(String::as_str), Some("lab"));
        assert_eq!(d.headers.get("via").map(String::as_str), Some("a, b"));
        assert_eq!(d.body, b"MSH|\r\x00\xff");
        // No deliveries.
        let mut empty = vec![1];
        empty.extend_from_slice(&0u32.to_be_bytes());
        assert!(decode(&empty).unwrap().is_empty());
    }

    #[test]
    fn a_cut_or_padded_binary_answer_is_an_error_not_a_panic() {
        let a = answer();
        for cut in 0..a.len() {
            assert!(decode(&a[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = a.clone();
        padded.push(0);
        assert!(decode(&padded).is_err());
        let mut v2 = a;
        v2[0] = 2;
        assert!(decode(&v2).unwrap_err().contains("version 2"));
        // A huge count with nothing behind it.
        let mut huge = vec![1];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&huge).is_err());
    }
}
