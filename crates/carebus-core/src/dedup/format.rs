//! On-disk formats of the deduplication index: run files and the manifest.
//!
//! Everything is little-endian. See the `//!` header of `dedup/mod.rs` for the layout.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::DedupError;
use super::mem::Rec;

/// Bytes of one record in a run file: fp u64 | partition u32 | offset u64 | body_hash u64 | ts i64.
pub(crate) const RECORD_LEN: usize = 36;
/// Records per data block: 113 × 36 + 4 (CRC) = 4072 bytes, so a block fits one 4 KiB page read.
pub(crate) const BLOCK_RECORDS: usize = 113;
const HEADER_LEN: u64 = 32;
const TRAILER_LEN: u64 = 24;
const RUN_MAGIC: &[u8; 4] = b"CBDR";
const TRAILER_MAGIC: &[u8; 4] = b"CBDE";
const MANIFEST_MAGIC: &[u8; 4] = b"CBDM";
const VERSION: u16 = 1;
/// Bloom filter: bits per key and probes (≈ 0.8 % false positives).
const BLOOM_BITS_PER_KEY: u64 = 10;
const BLOOM_PROBES: u32 = 7;
pub(crate) const MANIFEST: &str = "MANIFEST";
const MANIFEST_TMP: &str = "MANIFEST.tmp";

pub(crate) fn run_file_name(id: u64) -> String {
    format!("run-{id:020}.cbr")
}

pub(crate) fn parse_run_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("run-")?.strip_suffix(".cbr")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DedupError + '_ {
    move |source| DedupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, detail: impl Into<String>) -> DedupError {
    DedupError::Corrupt {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Reads fixed-size little-endian fields from a byte slice without panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.pos.checked_add(N)?;
        let bytes: [u8; N] = self.buf.get(self.pos..end)?.try_into().ok()?;
        self.pos = end;
        Some(bytes)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
    }
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
}

pub(crate) fn encode_rec(rec: &Rec, out: &mut Vec<u8>) {
    out.extend_from_slice(&rec.fp.to_le_bytes());
    out.extend_from_slice(&rec.partition.to_le_bytes());
    out.extend_from_slice(&rec.offset.to_le_bytes());
    out.extend_from_slice(&rec.body_hash.to_le_bytes());
    out.extend_from_slice(&rec.ts.to_le_bytes());
}

fn decode_rec(r: &mut Reader<'_>) -> Option<Rec> {
    Some(Rec {
        fp: r.u64()?,
        partition: r.u32()?,
        offset: r.u64()?,
        body_hash: r.u64()?,
        ts: r.i64()?,
    })
}

/// A Bloom filter over fingerprints (which are already uniformly distributed hashes).
#[derive(Debug)]
pub(crate) struct Bloom {
    words: Vec<u64>,
    probes: u32,
}

impl Bloom {
    fn for_keys(n: u64) -> Self {
        let bits = n.saturating_mul(BLOOM_BITS_PER_KEY).max(64);
        let words = usize::try_from(bits.div_ceil(64)).unwrap_or(usize::MAX >> 8);
        Bloom {
            words: vec![0; words],
            probes: BLOOM_PROBES,
        }
    }

    fn positions(&self, fp: u64) -> impl Iterator<Item = (usize, u64)> + use<> {
        let nbits = (self.words.len() as u64).saturating_mul(64).max(1);
        let h2 = (fp.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(29) | 1;
        (0..u64::from(self.probes)).map(move |i| {
            let bit = fp.wrapping_add(i.wrapping_mul(h2)) % nbits;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    fn add(&mut self, fp: u64) {
        for (w, mask) in self.positions(fp) {
            if let Some(word) = self.words.get_mut(w) {
                *word |= mask;
            }
        }
    }

    pub(crate) fn may_contain(&self, fp: u64) -> bool {
        self.positions(fp)
            .all(|(w, mask)| self.words.get(w).is_some_and(|word| word & mask != 0))
    }
}

/// Writes one immutable run file. Records must be pushed in (fp, partition, offset) order.
pub(crate) struct RunWriter {
    path: PathBuf,
    out: BufWriter<File>,
    block: Vec<u8>,
    in_block: usize,
    count: u64,
    fences: Vec<u64>,
    bloom: Bloom,
    min_ts: i64,
    max_ts: i64,
    id: u64,
}

impl RunWriter {
    /// `expected` is an upper bound of the records to come (sizes the Bloom filter).
    pub(crate) fn create(dir: &Path, id: u64, expected: u64) -> Result<Self, DedupError> {
        let path = dir.join(run_file_name(id));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut out = BufWriter::with_capacity(256 << 10, file);
        out.write_all(&[0u8; HEADER_LEN as usize])
            .map_err(io_err(&path))?;
        Ok(RunWriter {
            path,
            out,
            block: Vec::with_capacity(BLOCK_RECORDS * RECORD_LEN + 4),
            in_block: 0,
            count: 0,
            fences: Vec::new(),
            bloom: Bloom::for_keys(expected),
            min_ts: i64::MAX,
            max_ts: i64::MIN,
            id,
        })
    }

    pub(crate) fn push(&mut self, rec: &Rec) -> Result<(), DedupError> {
        if self.in_block == 0 {
            self.fences.push(rec.fp);
        }
        encode_rec(rec, &mut self.block);
        self.bloom.add(rec.fp);
        self.min_ts = self.min_ts.min(rec.ts);
        self.max_ts = self.max_ts.max(rec.ts);
        self.in_block += 1;
        self.count += 1;
        if self.in_block == BLOCK_RECORDS {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> Result<(), DedupError> {
        if self.in_block == 0 {
            return Ok(());
        }
        let crc = crc32c::crc32c(&self.block);
        self.block.extend_from_slice(&crc.to_le_bytes());
        self.out
            .write_all(&self.block)
            .map_err(io_err(&self.path))?;
        self.block.clear();
        self.in_block = 0;
        Ok(())
    }

    /// Finishes and fsyncs the file. Returns `None` (and removes the file) when no record
    /// was pushed. The directory entry becomes durable with the next manifest's dir fsync.
    pub(crate) fn finish(mut self) -> Result<Option<(u64, u64)>, DedupError> {
        if self.count == 0 {
            drop(self.out);
            fs::remove_file(&self.path).map_err(io_err(&self.path))?;
            return Ok(None);
        }
        self.flush_block()?;
        let data_len = self.count * RECORD_LEN as u64 + (self.fences.len() as u64) * 4;
        let footer_offset = HEADER_LEN + data_len;
        let mut footer =
            Vec::with_capacity(32 + self.fences.len() * 8 + self.bloom.words.len() * 8);
        footer.extend_from_slice(&self.min_ts.to_le_bytes());
        footer.extend_from_slice(&self.max_ts.to_le_bytes());
        footer.extend_from_slice(&(self.fences.len() as u64).to_le_bytes());
        for f in &self.fences {
            footer.extend_from_slice(&f.to_le_bytes());
        }
        footer.extend_from_slice(&self.bloom.probes.to_le_bytes());
        footer.extend_from_slice(&(self.bloom.words.len() as u64).to_le_bytes());
        for w in &self.bloom.words {
            footer.extend_from_slice(&w.to_le_bytes());
        }
        let mut trailer = Vec::with_capacity(TRAILER_LEN as usize);
        trailer.extend_from_slice(&footer_offset.to_le_bytes());
        trailer.extend_from_slice(&(footer.len() as u64).to_le_bytes());
        trailer.extend_from_slice(&crc32c::crc32c(&footer).to_le_bytes());
        trailer.extend_from_slice(TRAILER_MAGIC);
        self.out.write_all(&footer).map_err(io_err(&self.path))?;
        self.out.write_all(&trailer).map_err(io_err(&self.path))?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_err(&self.path)(e.into_error()))?;
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(RUN_MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes());
        header.extend_from_slice(&self.id.to_le_bytes());
        header.extend_from_slice(&self.count.to_le_bytes());
        header.extend_from_slice(&(BLOCK_RECORDS as u32).to_le_bytes());
        let crc = crc32c::crc32c(&header);
        header.extend_from_slice(&crc.to_le_bytes());
        file.write_all_at(&header, 0).map_err(io_err(&self.path))?;
        file.sync_all().map_err(io_err(&self.path))?;
        Ok(Some((self.id, self.count)))
    }
}

/// A run file on disk, queried with positional reads. In memory: fence pointers (first
/// fingerprint of each block) and a Bloom filter.
#[derive(Debug)]
pub(crate) struct DiskRun {
    pub(crate) id: u64,
    path: PathBuf,
    file: File,
    pub(crate) count: u64,
    block_records: usize,
    fences: Vec<u64>,
    bloom: Bloom,
    pub(crate) min_ts: i64,
    pub(crate) max_ts: i64,
}

impl DiskRun {
    /// Opens and validates a run file: header CRC, sizes, footer CRC. Data blocks are
    /// verified (CRC) whenever they are read.
    pub(crate) fn open(dir: &Path, id: u64) -> Result<Self, DedupError> {
        let path = dir.join(run_file_name(id));
        let file = File::open(&path).map_err(io_err(&path))?;
        let file_len = file.metadata().map_err(io_err(&path))?.len();
        if file_len < HEADER_LEN + TRAILER_LEN {
            return Err(corrupt(&path, format!("file too short ({file_len} bytes)")));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0).map_err(io_err(&path))?;
        let mut r = Reader::new(&header);
        let bad_header = || corrupt(&path, "bad run header");
        let magic: [u8; 4] = r.take().ok_or_else(bad_header)?;
        let version = r.u16().ok_or_else(bad_header)?;
        let _reserved = r.u16().ok_or_else(bad_header)?;
        let file_id = r.u64().ok_or_else(bad_header)?;
        let count = r.u64().ok_or_else(bad_header)?;
        let block_records = r.u32().ok_or_else(bad_header)?;
        let crc = r.u32().ok_or_else(bad_header)?;
        if &magic != RUN_MAGIC
            || header.get(..28).map(crc32c::crc32c) != Some(crc)
            || version != VERSION
            || file_id != id
            || block_records == 0
        {
            return Err(bad_header());
        }
        let block_records = block_records as usize;
        let n_blocks = count.div_ceil(block_records as u64);
        let data_len = count
            .checked_mul(RECORD_LEN as u64)
            .and_then(|d| d.checked_add(n_blocks * 4))
            .ok_or_else(bad_header)?;

        let mut trailer = [0u8; TRAILER_LEN as usize];
        file.read_exact_at(&mut trailer, file_len - TRAILER_LEN)
            .map_err(io_err(&path))?;
        let mut t = Reader::new(&trailer);
        let bad_trailer = || corrupt(&path, "bad run trailer");
        let footer_offset = t.u64().ok_or_else(bad_trailer)?;
        let footer_len = t.u64().ok_or_else(bad_trailer)?;
        let footer_crc = t.u32().ok_or_else(bad_trailer)?;
        let tmagic: [u8; 4] = t.take().ok_or_else(bad_trailer)?;
        if &tmagic != TRAILER_MAGIC
            || Some(footer_offset) != HEADER_LEN.checked_add(data_len)
            || footer_offset
                .checked_add(footer_len)
                .and_then(|x| x.checked_add(TRAILER_LEN))
                != Some(file_len)
        {
            return Err(bad_trailer());
        }
        let mut footer = vec![0u8; usize::try_from(footer_len).map_err(|_| bad_trailer())?];
        file.read_exact_at(&mut footer, footer_offset)
            .map_err(io_err(&path))?;
        if crc32c::crc32c(&footer) != footer_crc {
            return Err(corrupt(&path, "footer CRC mismatch"));
        }
        let mut f = Reader::new(&footer);
        let bad_footer = || corrupt(&path, "bad run footer");
        let min_ts = f.i64().ok_or_else(bad_footer)?;
        let max_ts = f.i64().ok_or_else(bad_footer)?;
        let n_fences = f.u64().ok_or_else(bad_footer)?;
        if n_fences != n_blocks || n_fences.saturating_mul(8) > f.remaining() as u64 {
            return Err(bad_footer());
        }
        let mut fences = Vec::with_capacity(n_fences as usize);
        for _ in 0..n_fences {
            fences.push(f.u64().ok_or_else(bad_footer)?);
        }
        if fences.windows(2).any(|w| w.first() > w.get(1)) {
            return Err(corrupt(&path, "fence pointers out of order"));
        }
        let probes = f.u32().ok_or_else(bad_footer)?;
        let n_words = f.u64().ok_or_else(bad_footer)?;
        if n_words == 0 || probes == 0 || n_words.saturating_mul(8) != f.remaining() as u64 {
            return Err(bad_footer());
        }
        let mut words = Vec::with_capacity(n_words as usize);
        for _ in 0..n_words {
            words.push(f.u64().ok_or_else(bad_footer)?);
        }
        Ok(DiskRun {
            id,
            path,
            file,
            count,
            block_records,
            fences,
            bloom: Bloom { words, probes },
            min_ts,
            max_ts,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.fences.capacity() * 8
            + self.bloom.words.capacity() * 8
            + self.path.as_os_str().len()
    }

    fn n_blocks(&self) -> usize {
        self.fences.len()
    }

    /// Reads block `b` into `buf` (records only, CRC verified) and returns its record count.
    fn read_block(&self, b: usize, buf: &mut Vec<u8>) -> Result<usize, DedupError> {
        let first = (b as u64) * self.block_records as u64;
        let records = (self.count.saturating_sub(first)).min(self.block_records as u64) as usize;
        if records == 0 {
            return Err(corrupt(&self.path, "block index out of range"));
        }
        let stride = (self.block_records * RECORD_LEN + 4) as u64;
        let pos = HEADER_LEN + (b as u64) * stride;
        let len = records * RECORD_LEN;
        buf.clear();
        buf.resize(len + 4, 0);
        self.file
            .read_exact_at(buf, pos)
            .map_err(io_err(&self.path))?;
        let stored = buf
            .get(len..)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map(u32::from_le_bytes);
        buf.truncate(len);
        if stored != Some(crc32c::crc32c(buf)) {
            return Err(corrupt(&self.path, format!("data block {b} CRC mismatch")));
        }
        Ok(records)
    }

    fn decode_block(&self, buf: &[u8], out: &mut Vec<Rec>) -> Result<(), DedupError> {
        let mut r = Reader::new(buf);
        while r.remaining() > 0 {
            let rec = decode_rec(&mut r).ok_or_else(|| corrupt(&self.path, "short record"))?;
            out.push(rec);
        }
        Ok(())
    }

    /// Appends every record with fingerprint `fp` to `out`.
    pub(crate) fn lookup(&self, fp: u64, out: &mut Vec<Rec>) -> Result<(), DedupError> {
        if !self.bloom.may_contain(fp) {
            return Ok(());
        }
        // Records with `fp` may begin in the last block whose first fingerprint is < fp.
        let start = self.fences.partition_point(|f| *f < fp).saturating_sub(1);
        let mut buf = Vec::new();
        let mut recs = Vec::new();
        for b in start..self.n_blocks() {
            if self.fences.get(b).is_none_or(|f| *f > fp) {
                break;
            }
            self.read_block(b, &mut buf)?;
            recs.clear();
            self.decode_block(&buf, &mut recs)?;
            out.extend(recs.iter().filter(|r| r.fp == fp));
            if recs.last().is_some_and(|r| r.fp > fp) {
                break;
            }
        }
        Ok(())
    }

    /// A sequential reader of all records (CRC-verified), for merges and loading.
    pub(crate) fn cursor(&self) -> DiskCursor<'_> {
        DiskCursor {
            run: self,
            next_block: 0,
            buf: Vec::new(),
            recs: Vec::new(),
            pos: 0,
        }
    }
}

pub(crate) struct DiskCursor<'a> {
    run: &'a DiskRun,
    next_block: usize,
    buf: Vec<u8>,
    recs: Vec<Rec>,
    pos: usize,
}

impl Iterator for DiskCursor<'_> {
    type Item = Result<Rec, DedupError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(rec) = self.recs.get(self.pos) {
                self.pos += 1;
                return Some(Ok(*rec));
            }
            if self.next_block >= self.run.n_blocks() {
                return None;
            }
            let b = self.next_block;
            self.next_block += 1;
            self.recs.clear();
            self.pos = 0;
            if let Err(e) = self
                .run
                .read_block(b, &mut self.buf)
                .and_then(|_| self.run.decode_block(&self.buf, &mut self.recs))
            {
                self.next_block = usize::MAX;
                return Some(Err(e));
            }
        }
    }
}

/// The checkpoint: which run files make up the index, and per partition the offset from
/// which the log must be replayed into it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub(crate) replay_from: Vec<(u32, u64)>,
    pub(crate) runs: Vec<u64>,
}

impl Manifest {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.replay_from.len() * 12 + self.runs.len() * 8);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.replay_from.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for (p, o) in &self.replay_from {
            out.extend_from_slice(&p.to_le_bytes());
            out.extend_from_slice(&o.to_le_bytes());
        }
        for id in &self.runs {
            out.extend_from_slice(&id.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(path: &Path, buf: &[u8]) -> Result<Self, DedupError> {
        let bad = || corrupt(path, "bad manifest");
        let body_len = buf.len().checked_sub(4).ok_or_else(bad)?;
        let (body, crc) = buf.split_at(body_len);
        let crc = <[u8; 4]>::try_from(crc).map_err(|_| bad())?;
        if crc32c::crc32c(body) != u32::from_le_bytes(crc) {
            return Err(corrupt(path, "manifest CRC mismatch"));
        }
        let mut r = Reader::new(body);
        let magic: [u8; 4] = r.take().ok_or_else(bad)?;
        let version = r.u16().ok_or_else(bad)?;
        let _reserved = r.u16().ok_or_else(bad)?;
        let n_parts = r.u32().ok_or_else(bad)? as usize;
        let n_runs = r.u32().ok_or_else(bad)? as usize;
        if &magic != MANIFEST_MAGIC
            || version != VERSION
            || n_parts
                .checked_mul(12)
                .and_then(|x| x.checked_add(n_runs.checked_mul(8)?))
                != Some(r.remaining())
        {
            return Err(bad());
        }
        let mut m = Manifest::default();
        for _ in 0..n_parts {
            m.replay_from
                .push((r.u32().ok_or_else(bad)?, r.u64().ok_or_else(bad)?));
        }
        for _ in 0..n_runs {
            m.runs.push(r.u64().ok_or_else(bad)?);
        }
        if m.replay_from
            .windows(2)
            .any(|w| w.first().map(|x| x.0) >= w.get(1).map(|x| x.0))
        {
            return Err(corrupt(path, "manifest partitions out of order"));
        }
        let mut ids = m.runs.clone();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w.first() == w.get(1)) {
            return Err(corrupt(path, "manifest lists a run twice"));
        }
        Ok(m)
    }

    /// Reads `dir/MANIFEST`; `None` when there is none yet.
    pub(crate) fn load(dir: &Path) -> Result<Option<Self>, DedupError> {
        let path = dir.join(MANIFEST);
        match fs::read(&path) {
            Ok(buf) => Self::decode(&path, &buf).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Replaces `dir/MANIFEST` atomically: write tmp, fsync, rename, fsync the directory.
    pub(crate) fn store(&self, dir: &Path) -> Result<(), DedupError> {
        let tmp = dir.join(MANIFEST_TMP);
        let path = dir.join(MANIFEST);
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&self.encode()).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(dir)
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), DedupError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(fp: u64, offset: u64) -> Rec {
        Rec {
            fp,
            partition: 1,
            offset,
            body_hash: fp ^ 7,
            ts: offset as i64,
        }
    }

    #[test]
    fn run_file_round_trips_and_finds_keys_across_block_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = RunWriter::create(dir.path(), 3, 1000).unwrap();
        // fp 500 repeated across a block boundary (records 110..=120).
        let mut all = Vec::new();
        for i in 0..1000u64 {
            let fp = if (110..=120).contains(&i) {
                500
            } else if i < 110 {
                i
            } else {
                i + 1000
            };
            all.push(rec(fp, i));
        }
        for r in &all {
            w.push(r).unwrap();
        }
        assert_eq!(w.finish().unwrap(), Some((3, 1000)));
        let run = DiskRun::open(dir.path(), 3).unwrap();
        let mut out = Vec::new();
        run.lookup(500, &mut out).unwrap();
        assert_eq!(out.len(), 11);
        out.clear();
        run.lookup(1999, &mut out).unwrap();
        assert_eq!(out, vec![rec(1999, 999)]);
        out.clear();
        run.lookup(5000, &mut out).unwrap();
        assert!(out.is_empty());
        let read: Vec<Rec> = run.cursor().collect::<Result<_, _>>().unwrap();
        assert_eq!(read, all);
        assert_eq!((run.min_ts, run.max_ts), (0, 999));
    }

    #[test]
    fn bloom_has_no_false_negatives_and_few_false_positives() {
        let mut b = Bloom::for_keys(10_000);
        for i in 0..10_000u64 {
            b.add(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()));
        }
        for i in 0..10_000u64 {
            assert!(b.may_contain(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())));
        }
        let fp = (10_000..110_000u64)
            .filter(|i| b.may_contain(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())))
            .count();
        assert!(fp < 2_000, "false positives {fp} of 100000");
    }

    #[test]
    fn manifest_round_trips_and_rejects_flipped_bits() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest {
            replay_from: vec![(0, 10), (3, 7)],
            runs: vec![4, 9],
        };
        m.store(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), Some(m));
        let path = dir.path().join(MANIFEST);
        let mut bytes = fs::read(&path).unwrap();
        bytes[13] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Manifest::load(dir.path()),
            Err(DedupError::Corrupt { .. })
        ));
    }

    #[test]
    fn run_file_names_parse_back() {
        assert_eq!(parse_run_file_name(&run_file_name(42)), Some(42));
        assert_eq!(parse_run_file_name("run-42.cbr"), None);
        assert_eq!(parse_run_file_name("MANIFEST"), None);
    }
}
