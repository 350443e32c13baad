//! Records and their byte encoding inside a batch.
//!
//! A record is encoded, little-endian, as:
//!
//! ```text
//! i64  timestamp_ms
//! i32  key_len        (-1: no key)
//! [u8] key
//! u32  value_len
//! [u8] value
//! u16  header_count
//!      per header: u16 name_len, [u8] name (UTF-8), u32 value_len, [u8] value
//! ```

use bytes::Bytes;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{LogError, Result};

/// A record offered to [`crate::Log::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Optional key (partition key, idempotency key… the log gives it no meaning).
    pub key: Option<Bytes>,
    /// The payload, stored byte for byte.
    pub value: Bytes,
    /// Named headers, kept in order.
    pub headers: Vec<(String, Bytes)>,
    /// Milliseconds since the Unix epoch; used by age-based retention.
    pub timestamp_ms: i64,
}

impl Record {
    /// A record with the given payload, no key, no headers, stamped now.
    pub fn new(value: impl Into<Bytes>) -> Self {
        Record {
            key: None,
            value: value.into(),
            headers: Vec::new(),
            timestamp_ms: now_ms(),
        }
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the timestamp.
    #[must_use]
    pub fn with_timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

    /// Size of this record once encoded.
    pub fn encoded_len(&self) -> usize {
        let key = self.key.as_ref().map_or(0, Bytes::len);
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| 2 + n.len() + 4 + v.len())
            .sum();
        8 + 4 + key + 4 + self.value.len() + 2 + headers
    }

    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        match &self.key {
            None => out.extend_from_slice(&(-1i32).to_le_bytes()),
            Some(k) => {
                let len =
                    i32::try_from(k.len()).map_err(|_| LogError::InvalidRecord("key too long"))?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(k);
            }
        }
        let vlen = u32::try_from(self.value.len())
            .map_err(|_| LogError::InvalidRecord("value too long"))?;
        out.extend_from_slice(&vlen.to_le_bytes());
        out.extend_from_slice(&self.value);
        let count = u16::try_from(self.headers.len())
            .map_err(|_| LogError::InvalidRecord("more than 65535 headers"))?;
        out.extend_from_slice(&count.to_le_bytes());
        for (name, value) in &self.headers {
            let nlen = u16::try_from(name.len())
                .map_err(|_| LogError::InvalidRecord("header name longer than 65535 bytes"))?;
            out.extend_from_slice(&nlen.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            let hlen = u32::try_from(value.len())
                .map_err(|_| LogError::InvalidRecord("header value too long"))?;
            out.extend_from_slice(&hlen.to_le_bytes());
            out.extend_from_slice(value);
        }
        Ok(())
    }
}

/// A record read back from the log, with the offset it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Dense offset, from 0.
    pub offset: u64,
    /// Timestamp given at append.
    pub timestamp_ms: i64,
    /// Key, if any.
    pub key: Option<Bytes>,
    /// Payload.
    pub value: Bytes,
    /// Headers, in the order given.
    pub headers: Vec<(String, Bytes)>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A little-endian cursor over bytes that fails instead of panicking.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    pub(crate) fn i32(&mut self) -> Option<i32> {
        self.array().map(i32::from_le_bytes)
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    pub(crate) fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_le_bytes)
    }
}

/// Decodes `count` records from a batch body (after its header), giving them
/// offsets from `base_offset`. `source` is the shared buffer the slices come from.
pub(crate) fn decode_records(
    source: &Bytes,
    start: usize,
    count: u32,
    base_offset: u64,
) -> std::result::Result<Vec<StoredRecord>, String> {
    let body = source.get(start..).ok_or("records start past the batch")?;
    let mut cur = Cursor::new(body);
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(body.len() / 22 + 1));
    let slice = |cur: &Cursor<'_>, len: usize| -> std::result::Result<Bytes, String> {
        let from = start + cur.pos - len;
        Ok(source.slice(from..from + len))
    };
    for i in 0..count {
        let ts = cur.i64().ok_or("truncated record timestamp")?;
        let klen = cur.i32().ok_or("truncated key length")?;
        let key = if klen < 0 {
            None
        } else {
            let n = usize::try_from(klen).map_err(|_| "bad key length")?;
            cur.take(n).ok_or("truncated key")?;
            Some(slice(&cur, n)?)
        };
        let vlen = usize::try_from(cur.u32().ok_or("truncated value length")?)
            .map_err(|_| "bad value length")?;
        cur.take(vlen).ok_or("truncated value")?;
        let value = slice(&cur, vlen)?;
        let hcount = cur.u16().ok_or("truncated header count")?;
        let mut headers = Vec::with_capacity(usize::from(hcount).min(cur.remaining() / 6 + 1));
        for _ in 0..hcount {
            let nlen = usize::from(cur.u16().ok_or("truncated header name length")?);
            let name = cur.take(nlen).ok_or("truncated header name")?;
            let name = std::str::from_utf8(name)
                .map_err(|_| "header name is not UTF-8")?
                .to_owned();
            let hlen = usize::try_from(cur.u32().ok_or("truncated header value length")?)
                .map_err(|_| "bad header length")?;
            cur.take(hlen).ok_or("truncated header value")?;
            headers.push((name, slice(&cur, hlen)?));
        }
        out.push(StoredRecord {
            offset: base_offset + u64::from(i),
            timestamp_ms: ts,
            key,
            value,
            headers,
        });
    }
    if cur.remaining() != 0 {
        return Err(format!(
            "{} stray bytes after the last record",
            cur.remaining()
        ));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_gives_the_records_back() {
        let recs = vec![
            Record::new("v1")
                .with_key("k1")
                .with_header("h", "x")
                .with_timestamp(5),
            Record::new(Bytes::new()).with_timestamp(-1),
        ];
        let mut buf = Vec::new();
        for r in &recs {
            let before = buf.len();
            r.encode_into(&mut buf).unwrap();
            assert_eq!(buf.len() - before, r.encoded_len());
        }
        let out = decode_records(&Bytes::from(buf), 0, 2, 10).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].offset, 10);
        assert_eq!(out[0].key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(out[0].headers, vec![("h".to_owned(), Bytes::from("x"))]);
        assert_eq!(out[1].offset, 11);
        assert_eq!(out[1].key, None);
        assert_eq!(out[1].timestamp_ms, -1);
    }

    #[test]
    fn decoding_truncated_bytes_fails_without_panicking() {
        let mut buf = Vec::new();
        Record::new("hello")
            .with_key("k")
            .encode_into(&mut buf)
            .unwrap();
        for cut in 0..buf.len() {
            let b = Bytes::copy_from_slice(&buf[..cut]);
            assert!(decode_records(&b, 0, 1, 0).is_err(), "cut at {cut}");
        }
        // A count larger than what the bytes hold fails too.
        assert!(decode_records(&Bytes::from(buf), 0, 2, 0).is_err());
    }
}
