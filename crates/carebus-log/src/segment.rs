//! Segment files, batch frames and sparse index files: the on-disk layout.
//!
//! See `DESIGN.md` in this crate for the byte layouts and the fsync order.

use bytes::Bytes;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{LogError, Result};
use crate::fs_io;
use crate::record::{Cursor, StoredRecord, decode_records};

/// Magic at the start of every segment file.
pub(crate) const SEGMENT_MAGIC: &[u8; 4] = b"CBSG";
/// Magic at the start of every index file.
pub(crate) const INDEX_MAGIC: &[u8; 4] = b"CBIX";
pub(crate) const FORMAT_VERSION: u16 = 1;
/// Segment header: magic, version u16, reserved u16, base offset u64.
pub(crate) const SEGMENT_HEADER_LEN: u64 = 16;
/// Batch frame prefix: body length u32, crc32c u32.
pub(crate) const FRAME_PREFIX_LEN: usize = 8;
/// Batch body header: base offset u64, record count u32, max timestamp i64, attributes u32.
pub(crate) const BATCH_HEADER_LEN: usize = 24;
/// Index file header: magic, version, reserved, base, next, max_ts, segment_len, entry count, header crc.
const INDEX_HEADER_LEN: usize = 4 + 2 + 2 + 8 + 8 + 8 + 8 + 4 + 4;

pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

pub(crate) fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.idx"))
}

/// Parses `00000000000000000042.log` into 42.
pub(crate) fn parse_file_name(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

pub(crate) fn segment_header(base: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[..4].copy_from_slice(SEGMENT_MAGIC);
    h[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&base.to_le_bytes());
    h
}

/// One sparse index entry: the first offset of a batch (relative to the segment
/// base) and the byte position of that batch in the segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) relative_offset: u32,
    pub(crate) position: u32,
}

/// Finds the position from which to scan for `offset`: the last entry at or below it.
pub(crate) fn lookup(entries: &[IndexEntry], base: u64, offset: u64) -> u64 {
    let rel = offset.saturating_sub(base);
    let idx = entries.partition_point(|e| u64::from(e.relative_offset) <= rel);
    match idx.checked_sub(1).and_then(|i| entries.get(i)) {
        Some(e) => u64::from(e.position),
        None => SEGMENT_HEADER_LEN,
    }
}

/// Encodes a batch frame around an already encoded record payload.
pub(crate) fn encode_frame(
    out: &mut Vec<u8>,
    base_offset: u64,
    count: u32,
    max_timestamp: i64,
    payload: &[u8],
) -> Result<()> {
    let body_len = u32::try_from(BATCH_HEADER_LEN + payload.len())
        .map_err(|_| LogError::InvalidRecord("batch larger than 4 GiB"))?;
    let start = out.len();
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&base_offset.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&max_timestamp.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(payload);
    let body_start = start + FRAME_PREFIX_LEN;
    let crc = crc32c::crc32c(out.get(body_start..).unwrap_or_default());
    if let Some(slot) = out.get_mut(start + 4..start + 8) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
    Ok(())
}

/// The header of a batch that passed its checksum.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchInfo {
    pub(crate) frame_len: u64,
    pub(crate) base_offset: u64,
    pub(crate) count: u32,
    pub(crate) max_timestamp: i64,
}

impl BatchInfo {
    pub(crate) fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }
}

/// Why a frame could not be accepted.
#[derive(Debug)]
pub(crate) enum FrameProblem {
    /// Fewer bytes than the frame claims: a torn write, or the end of the data.
    Short,
    /// The bytes are there but wrong.
    Invalid(String),
}

/// Checks a frame at the start of `buf`.
/// Returns the batch info and the body range inside `buf`.
pub(crate) fn check_frame(
    buf: &[u8],
    max_body: usize,
    expected_offset: Option<u64>,
) -> std::result::Result<(BatchInfo, std::ops::Range<usize>), FrameProblem> {
    let mut cur = Cursor::new(buf);
    let body_len = cur.u32().ok_or(FrameProblem::Short)?;
    let crc = cur.u32().ok_or(FrameProblem::Short)?;
    let body_len = usize::try_from(body_len).map_err(|_| FrameProblem::Invalid("length".into()))?;
    if body_len < BATCH_HEADER_LEN || body_len > max_body {
        return Err(FrameProblem::Invalid(format!(
            "implausible batch length {body_len}"
        )));
    }
    let body = cur.take(body_len).ok_or(FrameProblem::Short)?;
    if crc32c::crc32c(body) != crc {
        return Err(FrameProblem::Invalid("checksum mismatch".into()));
    }
    let mut h = Cursor::new(body);
    let base_offset = h.u64().ok_or(FrameProblem::Short)?;
    let count = h.u32().ok_or(FrameProblem::Short)?;
    let max_timestamp = h.i64().ok_or(FrameProblem::Short)?;
    if count == 0 {
        return Err(FrameProblem::Invalid("batch with zero records".into()));
    }
    if let Some(exp) = expected_offset
        && base_offset != exp
    {
        return Err(FrameProblem::Invalid(format!(
            "batch base offset {base_offset}, expected {exp}"
        )));
    }
    let info = BatchInfo {
        frame_len: (FRAME_PREFIX_LEN + body_len) as u64,
        base_offset,
        count,
        max_timestamp,
    };
    Ok((info, FRAME_PREFIX_LEN..FRAME_PREFIX_LEN + body_len))
}

/// Reads a whole file region with positional reads.
pub(crate) fn read_at(file: &File, path: &Path, position: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, position)
        .map_err(|e| LogError::io("read", path, e))?;
    Ok(buf)
}

/// Outcome of scanning a segment from some position to its end.
#[derive(Debug)]
pub(crate) struct ScanResult {
    /// Position just after the last valid batch.
    pub(crate) valid_len: u64,
    /// Offset after the last valid batch.
    pub(crate) next_offset: u64,
    pub(crate) max_timestamp: i64,
    /// Index entries for the valid batches.
    pub(crate) entries: Vec<IndexEntry>,
    /// What stopped the scan before the end of the file, if anything.
    pub(crate) stopped_by: Option<String>,
    /// Records claimed by the first invalid batch's header, when readable.
    pub(crate) first_invalid_count: Option<u32>,
}

/// Scans batches of a segment from its header to `file_len`, verifying each.
pub(crate) fn scan_segment(
    file: &File,
    path: &Path,
    base: u64,
    file_len: u64,
    max_body: usize,
    index_interval: u64,
) -> Result<ScanResult> {
    const CHUNK: usize = 1 << 20;
    let mut pos = SEGMENT_HEADER_LEN;
    let mut next_offset = base;
    let mut max_timestamp = i64::MIN;
    let mut entries = Vec::new();
    let mut last_indexed: Option<u64> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_pos = pos; // file position of buf[0]
    loop {
        if pos >= file_len {
            return Ok(ScanResult {
                valid_len: pos,
                next_offset,
                max_timestamp,
                entries,
                stopped_by: None,
                first_invalid_count: None,
            });
        }
        let in_buf = usize::try_from(pos - buf_pos).unwrap_or(usize::MAX);
        let attempt = buf
            .get(in_buf..)
            .map(|b| check_frame(b, max_body, Some(next_offset)));
        match attempt {
            Some(Ok((info, _))) => {
                if last_indexed.is_none_or(|l| pos - l >= index_interval) {
                    entries.push(IndexEntry {
                        relative_offset: u32::try_from(next_offset - base).map_err(|_| {
                            LogError::Config("more than 2^32 records in one segment".into())
                        })?,
                        position: u32::try_from(pos)
                            .map_err(|_| LogError::Config("segment larger than 4 GiB".into()))?,
                    });
                    last_indexed = Some(pos);
                }
                pos += info.frame_len;
                next_offset = info.next_offset();
                max_timestamp = max_timestamp.max(info.max_timestamp);
            }
            Some(Err(FrameProblem::Invalid(reason))) => {
                let count = buf
                    .get(in_buf + 16..in_buf + 20)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok().map(u32::from_le_bytes));
                return Ok(ScanResult {
                    valid_len: pos,
                    next_offset,
                    max_timestamp,
                    entries,
                    stopped_by: Some(reason),
                    first_invalid_count: count,
                });
            }
            None | Some(Err(FrameProblem::Short)) => {
                // Need more bytes: refill from `pos`, reading at least what the frame claims.
                let remaining = file_len - pos;
                let claimed = buf
                    .get(in_buf..in_buf + 4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(0, |b| u32::from_le_bytes(b) as usize + FRAME_PREFIX_LEN);
                let want = CHUNK.max(claimed.min(max_body + FRAME_PREFIX_LEN));
                let len = usize::try_from(remaining).unwrap_or(usize::MAX).min(want);
                let had = buf.len().saturating_sub(in_buf);
                if buf_pos == pos && had >= len {
                    // Everything up to the end of the file is in the buffer and it is still short.
                    return Ok(ScanResult {
                        valid_len: pos,
                        next_offset,
                        max_timestamp,
                        entries,
                        stopped_by: Some(format!("torn batch: {remaining} trailing bytes")),
                        first_invalid_count: None,
                    });
                }
                buf = read_at(file, path, pos, len)?;
                buf_pos = pos;
            }
        }
    }
}

/// Reads and decodes batches of one segment from `position`, collecting records at
/// or after `from` until `end_position`, `max_records` or `max_bytes`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_records(
    file: &File,
    path: &Path,
    mut position: u64,
    end_position: u64,
    from: u64,
    max_records: usize,
    max_bytes: usize,
    max_body: usize,
    out: &mut Vec<StoredRecord>,
    bytes_so_far: &mut usize,
) -> Result<()> {
    const CHUNK: usize = 256 * 1024;
    while position < end_position && out.len() < max_records {
        if !out.is_empty() && *bytes_so_far >= max_bytes {
            break;
        }
        let avail = usize::try_from(end_position - position).unwrap_or(usize::MAX);
        let prefix = read_at(file, path, position, FRAME_PREFIX_LEN.min(avail))?;
        let claimed = prefix
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, |b| u32::from_le_bytes(b) as usize);
        let frame = FRAME_PREFIX_LEN.saturating_add(claimed.min(max_body));
        let want = frame.max(CHUNK.min(avail)).min(avail);
        let buf = Bytes::from(read_at(file, path, position, want)?);
        let mut in_buf = 0usize;
        while let Some(rest) = buf.get(in_buf..) {
            if rest.is_empty()
                || out.len() >= max_records
                || (!out.is_empty() && *bytes_so_far >= max_bytes)
            {
                break;
            }
            let (info, body) = match check_frame(rest, max_body, None) {
                Ok(ok) => ok,
                Err(FrameProblem::Short) if in_buf > 0 => break, // refill
                Err(FrameProblem::Short) => {
                    return Err(LogError::Corrupt {
                        segment: path.to_path_buf(),
                        position,
                        reason: "batch extends past the end of the segment".into(),
                    });
                }
                Err(FrameProblem::Invalid(reason)) => {
                    return Err(LogError::Corrupt {
                        segment: path.to_path_buf(),
                        position,
                        reason,
                    });
                }
            };
            if info.next_offset() > from {
                let records_start = in_buf + body.start + BATCH_HEADER_LEN;
                let body_bytes = buf.slice(..in_buf + body.end);
                let recs = decode_records(&body_bytes, records_start, info.count, info.base_offset)
                    .map_err(|reason| LogError::Corrupt {
                        segment: path.to_path_buf(),
                        position,
                        reason,
                    })?;
                for r in recs {
                    if r.offset < from {
                        continue;
                    }
                    if out.len() >= max_records || (!out.is_empty() && *bytes_so_far >= max_bytes) {
                        break;
                    }
                    *bytes_so_far += r.value.len() + r.key.as_ref().map_or(0, Bytes::len);
                    out.push(r);
                }
            }
            in_buf += usize::try_from(info.frame_len).unwrap_or(usize::MAX);
            position += info.frame_len;
        }
    }
    Ok(())
}

/// Metadata kept in an index file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexHeader {
    pub(crate) base: u64,
    pub(crate) next_offset: u64,
    pub(crate) max_timestamp: i64,
    pub(crate) segment_len: u64,
    pub(crate) entry_count: u32,
}

/// Writes an index file atomically: temp file, fsync, rename. The caller fsyncs the directory.
pub(crate) fn write_index(dir: &Path, header: &IndexHeader, entries: &[IndexEntry]) -> Result<()> {
    let path = index_path(dir, header.base);
    let tmp = path.with_extension("idx.tmp");
    let mut buf = Vec::with_capacity(INDEX_HEADER_LEN + entries.len() * 8 + 4);
    buf.extend_from_slice(INDEX_MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf.extend_from_slice(&header.base.to_le_bytes());
    buf.extend_from_slice(&header.next_offset.to_le_bytes());
    buf.extend_from_slice(&header.max_timestamp.to_le_bytes());
    buf.extend_from_slice(&header.segment_len.to_le_bytes());
    buf.extend_from_slice(&header.entry_count.to_le_bytes());
    let hcrc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&hcrc.to_le_bytes());
    let entries_start = buf.len();
    for e in entries {
        buf.extend_from_slice(&e.relative_offset.to_le_bytes());
        buf.extend_from_slice(&e.position.to_le_bytes());
    }
    let ecrc = crc32c::crc32c(buf.get(entries_start..).unwrap_or_default());
    buf.extend_from_slice(&ecrc.to_le_bytes());
    let f = fs_io::open(&tmp, fs_io::OpenMode::CREATE_NEW)
        .map_err(|e| LogError::io("create index", &tmp, e))?;
    fs_io::write_all_at(&f, &tmp, &buf, 0).map_err(|e| LogError::io("write index", &tmp, e))?;
    fs_io::sync_all(&f, &tmp).map_err(|e| LogError::io("fsync index", &tmp, e))?;
    fs_io::rename(&tmp, &path).map_err(|e| LogError::io("rename index", &path, e))?;
    Ok(())
}

/// Reads only the header of an index file. `None` when missing or invalid.
pub(crate) fn read_index_header(path: &Path) -> Option<IndexHeader> {
    let file = File::open(path).ok()?;
    let mut buf = [0u8; INDEX_HEADER_LEN];
    file.read_exact_at(&mut buf, 0).ok()?;
    parse_index_header(&buf)
}

fn parse_index_header(buf: &[u8]) -> Option<IndexHeader> {
    let mut c = Cursor::new(buf);
    if c.take(4)? != INDEX_MAGIC || c.u16()? != FORMAT_VERSION {
        return None;
    }
    c.u16()?;
    let header = IndexHeader {
        base: c.u64()?,
        next_offset: c.u64()?,
        max_timestamp: c.i64()?,
        segment_len: c.u64()?,
        entry_count: c.u32()?,
    };
    let crc = c.u32()?;
    (crc32c::crc32c(buf.get(..INDEX_HEADER_LEN - 4)?) == crc).then_some(header)
}

/// Reads the entries of an index file, verifying both checksums.
pub(crate) fn read_index_entries(path: &Path) -> Option<(IndexHeader, Vec<IndexEntry>)> {
    let buf = std::fs::read(path).ok()?;
    let header = parse_index_header(&buf)?;
    let n = usize::try_from(header.entry_count).ok()?;
    let entries_bytes =
        buf.get(INDEX_HEADER_LEN..INDEX_HEADER_LEN.checked_add(n.checked_mul(8)?)?)?;
    let mut c = Cursor::new(buf.get(INDEX_HEADER_LEN + entries_bytes.len()..)?);
    if c.u32()? != crc32c::crc32c(entries_bytes) || c.remaining() != 0 {
        return None;
    }
    let mut entries = Vec::with_capacity(n);
    let mut c = Cursor::new(entries_bytes);
    for _ in 0..n {
        entries.push(IndexEntry {
            relative_offset: c.u32()?,
            position: c.u32()?,
        });
    }
    Some((header, entries))
}

/// Length of `[from, to)` up to and including its last non-zero byte (0 if all zeros).
pub(crate) fn nonzero_extent(file: &File, path: &Path, from: u64, to: u64) -> Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let mut last_nonzero: Option<u64> = None;
    let mut pos = from;
    while pos < to {
        let len = (to - pos).min(CHUNK);
        let buf = read_at(file, path, pos, usize::try_from(len).unwrap_or(0))?;
        if let Some(i) = buf.iter().rposition(|&b| b != 0) {
            last_nonzero = Some(pos + i as u64);
        }
        pos += len;
    }
    Ok(last_nonzero.map_or(0, |l| l + 1 - from))
}

/// fsyncs a directory so that created, renamed and deleted entries are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs_io::sync_dir(dir).map_err(|e| LogError::io("fsync directory", dir, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        let p = segment_path(Path::new("/x"), 42);
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, "00000000000000000042.log");
        assert_eq!(parse_file_name(name, "log"), Some(42));
        assert_eq!(parse_file_name("42.log", "log"), None);
        assert_eq!(parse_file_name("0000000000000000004x.log", "log"), None);
        assert_eq!(parse_file_name(name, "idx"), None);
    }

    #[test]
    fn lookup_picks_the_last_entry_at_or_below() {
        let e = [
            IndexEntry {
                relative_offset: 0,
                position: 16,
            },
            IndexEntry {
                relative_offset: 10,
                position: 4000,
            },
            IndexEntry {
                relative_offset: 20,
                position: 8000,
            },
        ];
        assert_eq!(lookup(&e, 100, 100), 16);
        assert_eq!(lookup(&e, 100, 109), 16);
        assert_eq!(lookup(&e, 100, 110), 4000);
        assert_eq!(lookup(&e, 100, 125), 8000);
        assert_eq!(lookup(&[], 100, 125), SEGMENT_HEADER_LEN);
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_frame_is_detected() {
        let mut frame = Vec::new();
        encode_frame(&mut frame, 7, 1, 1, b"payload bytes").unwrap();
        assert!(check_frame(&frame, 1 << 20, Some(7)).is_ok());
        for byte in 0..frame.len() {
            for bit in 0..8 {
                let mut f = frame.clone();
                f[byte] ^= 1 << bit;
                assert!(
                    check_frame(&f, 1 << 20, Some(7)).is_err(),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn index_files_round_trip_and_reject_damage() {
        let dir = tempfile::tempdir().unwrap();
        let header = IndexHeader {
            base: 5,
            next_offset: 9,
            max_timestamp: 3,
            segment_len: 100,
            entry_count: 2,
        };
        let entries = [
            IndexEntry {
                relative_offset: 0,
                position: 16,
            },
            IndexEntry {
                relative_offset: 2,
                position: 60,
            },
        ];
        write_index(dir.path(), &header, &entries).unwrap();
        let path = index_path(dir.path(), 5);
        assert_eq!(read_index_header(&path), Some(header));
        assert_eq!(read_index_entries(&path), Some((header, entries.to_vec())));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_index_entries(&path).is_none());
        bytes[10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_index_header(&path).is_none());
    }
}
