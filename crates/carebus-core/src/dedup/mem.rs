//! The in-memory parts of the deduplication index: the insert buffer (a small
//! open-addressing hash table) and sorted runs stored as columns (36 bytes per entry).

use std::cmp::Ordering;

use super::DedupError;

/// One remembered key: its fingerprint and where its first copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rec {
    pub(crate) fp: u64,
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    pub(crate) body_hash: u64,
    pub(crate) ts: i64,
}

impl Rec {
    /// Runs are sorted by this; two records with equal keys are the same log record.
    pub(crate) fn sort_key(&self) -> (u64, u32, u64) {
        (self.fp, self.partition, self.offset)
    }
}

const EMPTY: u64 = u64::MAX;

/// A table slot: the fingerprint's high 32 bits (a tag) and the index of the entry in
/// `recs`, so probing past other keys' slots never has to read their entries.
fn slot_entry(fp: u64, idx: usize) -> u64 {
    (fp & 0xFFFF_FFFF_0000_0000) | (idx as u64 & 0xFFFF_FFFF)
}

fn slot_tag_matches(entry: u64, fp: u64) -> bool {
    (entry ^ fp) >> 32 == 0
}

fn slot_index(entry: u64) -> usize {
    (entry & 0xFFFF_FFFF) as usize
}

/// Unsorted entries plus a linear-probing table of tagged indices into them. Fixed
/// capacity, allocated once (and reused, see [`reset`](Self::reset)); `is_full` tells
/// the owner to turn it into a sorted run.
#[derive(Debug)]
pub(crate) struct Buffer {
    recs: Vec<Rec>,
    table: Vec<u64>,
    shift: u32,
    cap: usize,
}

impl Buffer {
    pub(crate) fn new(cap: usize) -> Self {
        let cap = cap.clamp(1, 1 << 30);
        // (The entry index must fit the slot's 32 bits; `cap` is far below that.)
        let slots = (cap * 2).next_power_of_two();
        Buffer {
            recs: Vec::with_capacity(cap),
            table: vec![EMPTY; slots],
            shift: 64 - slots.trailing_zeros(),
            cap,
        }
    }

    fn slot(&self, fp: u64) -> usize {
        // Fibonacci hashing spreads even non-random fingerprints (the tests' collisions).
        (fp.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    pub(crate) fn len(&self) -> usize {
        self.recs.len()
    }

    pub(crate) fn is_full(&self) -> bool {
        self.recs.len() >= self.cap
    }

    /// Empties the buffer, keeping its memory (already faulted in: reusing it spares the
    /// kernel zeroing fresh pages for every new buffer).
    pub(crate) fn reset(&mut self) {
        self.recs.clear();
        self.table.fill(EMPTY);
    }

    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Inserts unless the same log record (fingerprint, partition, offset) is already here.
    /// Returns whether it was inserted.
    pub(crate) fn insert(&mut self, rec: Rec) -> bool {
        let mask = self.table.len() - 1;
        let mut i = self.slot(rec.fp);
        loop {
            match self.table.get(i).copied() {
                Some(EMPTY) | None => break,
                Some(entry) => {
                    if slot_tag_matches(entry, rec.fp)
                        && self
                            .recs
                            .get(slot_index(entry))
                            .is_some_and(|r| r.sort_key() == rec.sort_key())
                    {
                        return false;
                    }
                }
            }
            i = (i + 1) & mask;
        }
        if let Some(slot) = self.table.get_mut(i) {
            *slot = slot_entry(rec.fp, self.recs.len());
            self.recs.push(rec);
            true
        } else {
            false
        }
    }

    pub(crate) fn lookup(&self, fp: u64, out: &mut Vec<Rec>) {
        let mask = self.table.len() - 1;
        let mut i = self.slot(fp);
        while let Some(&entry) = self.table.get(i) {
            if entry == EMPTY {
                break;
            }
            if slot_tag_matches(entry, fp)
                && let Some(r) = self.recs.get(slot_index(entry)).filter(|r| r.fp == fp)
            {
                out.push(*r);
            }
            i = (i + 1) & mask;
        }
    }

    /// The entries as a sorted run (the buffer itself is left as it is, so lookups may
    /// go on reading it meanwhile).
    pub(crate) fn to_sorted_columns(&self) -> Columns {
        let mut recs = self.recs.clone();
        recs.sort_unstable_by_key(Rec::sort_key);
        let mut cols = Columns::with_capacity(recs.len());
        for r in &recs {
            cols.push(r);
        }
        cols
    }

    /// Drops entries with `ts < cutoff`; returns how many.
    pub(crate) fn expire(&mut self, cutoff: i64) -> usize {
        let before = self.recs.len();
        let kept: Vec<Rec> = self
            .recs
            .iter()
            .filter(|r| r.ts >= cutoff)
            .copied()
            .collect();
        if kept.len() == before {
            return 0;
        }
        self.recs.clear();
        self.table.fill(EMPTY);
        for r in kept {
            self.insert(r);
        }
        before - self.recs.len()
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.recs.capacity() * size_of::<Rec>() + self.table.capacity() * size_of::<u64>()
    }
}

/// A sorted run in memory, one vector per field (no padding: 36 bytes per entry).
/// A register-blocked Bloom filter over fingerprints, for resident runs: each key sets 6
/// bits within one 64-bit word, so building costs a multiply and an OR per key and a
/// lookup one cache miss (about 10 bits per key, ~2 % false positives).
#[derive(Debug)]
pub(crate) struct BlockedBloom {
    words: Vec<u64>,
}

impl BlockedBloom {
    const BITS_PER_KEY: usize = 10;

    pub(crate) fn for_keys(n: usize) -> Self {
        BlockedBloom {
            words: vec![0; (n * Self::BITS_PER_KEY).div_ceil(64).max(1)],
        }
    }

    fn locate(&self, fp: u64) -> (usize, u64) {
        let word = ((u128::from(fp) * self.words.len() as u128) >> 64) as usize;
        let h = fp.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut mask = 0u64;
        for i in 0..6 {
            mask |= 1u64 << ((h >> (i * 6)) & 63);
        }
        (word, mask)
    }

    pub(crate) fn add(&mut self, fp: u64) {
        let (word, mask) = self.locate(fp);
        if let Some(w) = self.words.get_mut(word) {
            *w |= mask;
        }
    }

    pub(crate) fn may_contain(&self, fp: u64) -> bool {
        let (word, mask) = self.locate(fp);
        self.words.get(word).is_some_and(|w| w & mask == mask)
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.words.capacity() * 8
    }
}

#[derive(Debug, Default)]
pub(crate) struct Columns {
    fps: Vec<u64>,
    partitions: Vec<u32>,
    offsets: Vec<u64>,
    body_hashes: Vec<u64>,
    timestamps: Vec<i64>,
}

impl Columns {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Columns {
            fps: Vec::with_capacity(n),
            partitions: Vec::with_capacity(n),
            offsets: Vec::with_capacity(n),
            body_hashes: Vec::with_capacity(n),
            timestamps: Vec::with_capacity(n),
        }
    }

    pub(crate) fn push(&mut self, r: &Rec) {
        self.fps.push(r.fp);
        self.partitions.push(r.partition);
        self.offsets.push(r.offset);
        self.body_hashes.push(r.body_hash);
        self.timestamps.push(r.ts);
    }

    pub(crate) fn len(&self) -> usize {
        self.fps.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.fps.is_empty()
    }

    fn get(&self, i: usize) -> Option<Rec> {
        Some(Rec {
            fp: *self.fps.get(i)?,
            partition: *self.partitions.get(i)?,
            offset: *self.offsets.get(i)?,
            body_hash: *self.body_hashes.get(i)?,
            ts: *self.timestamps.get(i)?,
        })
    }

    pub(crate) fn lookup(&self, fp: u64, out: &mut Vec<Rec>) {
        let mut i = self.first_at_or_after(fp);
        while let Some(r) = self.get(i).filter(|r| r.fp == fp) {
            out.push(r);
            i += 1;
        }
    }

    /// The index of the first fingerprint `>= fp`. Fingerprints are uniform hashes, so
    /// the position is guessed by interpolation and the answer bracketed by galloping
    /// from there: a few cache misses instead of a binary search's ~log2(n). Any
    /// distribution (the tests' colliding fingerprints) is still answered exactly.
    fn first_at_or_after(&self, fp: u64) -> usize {
        let fps = self.fps.as_slice();
        let n = fps.len();
        if n < 64 {
            return fps.partition_point(|f| *f < fp);
        }
        let guess = ((u128::from(fp) * n as u128) >> 64) as usize;
        let guess = guess.min(n - 1);
        // Bracket [lo, hi) so that fps[lo - 1] < fp <= fps[hi] (where they exist).
        let (mut lo, mut hi) = (guess, guess + 1);
        let mut step = 8usize;
        while lo > 0 && fps.get(lo).is_some_and(|f| *f >= fp) {
            lo = lo.saturating_sub(step);
            step = step.saturating_mul(2);
        }
        step = 8;
        while hi < n && fps.get(hi - 1).is_some_and(|f| *f < fp) {
            hi = hi.saturating_add(step).min(n);
            step = step.saturating_mul(2);
        }
        let window = fps.get(lo..hi).unwrap_or(&[]);
        lo + window.partition_point(|f| *f < fp)
    }

    pub(crate) fn fingerprints(&self) -> impl Iterator<Item = u64> + '_ {
        self.fps.iter().copied()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = Rec> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    pub(crate) fn min_ts(&self) -> Option<i64> {
        self.timestamps.iter().copied().min()
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.fps.capacity() * 8
            + self.partitions.capacity() * 4
            + self.offsets.capacity() * 8
            + self.body_hashes.capacity() * 8
            + self.timestamps.capacity() * 8
    }
}

/// Merges two sorted record streams, dropping exact duplicates (the same log record twice,
/// e.g. from a replay) and records with `ts < cutoff`, and hands the result to `sink`.
pub(crate) fn merge<A, B>(
    a: A,
    b: B,
    cutoff: i64,
    mut sink: impl FnMut(&Rec) -> Result<(), DedupError>,
) -> Result<(), DedupError>
where
    A: Iterator<Item = Result<Rec, DedupError>>,
    B: Iterator<Item = Result<Rec, DedupError>>,
{
    let mut a = a.peekable();
    let mut b = b.peekable();
    let mut last: Option<(u64, u32, u64)> = None;
    loop {
        let next = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(Err(_)), _) | (Some(_), None) => a.next(),
            (_, Some(Err(_))) | (None, Some(_)) => b.next(),
            (Some(Ok(x)), Some(Ok(y))) => match x.sort_key().cmp(&y.sort_key()) {
                Ordering::Greater => b.next(),
                _ => a.next(),
            },
        };
        let Some(rec) = next.transpose()? else { break };
        if rec.ts < cutoff || last == Some(rec.sort_key()) {
            continue;
        }
        last = Some(rec.sort_key());
        sink(&rec)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(fp: u64, offset: u64, ts: i64) -> Rec {
        Rec {
            fp,
            partition: 0,
            offset,
            body_hash: 0,
            ts,
        }
    }

    proptest::proptest! {
        /// The interpolating search agrees with a plain binary search on any sorted
        /// fingerprints: uniform, clustered, repeated, at the extremes.
        #[test]
        fn interpolated_search_matches_binary_search(
            mut fps in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::any::<u64>(),
                    0u64..1_000,
                    (u64::MAX - 1_000)..=u64::MAX,
                    proptest::prelude::Just(1u64 << 63),
                ],
                0..400,
            ),
            probes in proptest::collection::vec(proptest::prelude::any::<u64>(), 1..20),
        ) {
            fps.sort_unstable();
            let mut cols = Columns::with_capacity(fps.len());
            for (i, fp) in fps.iter().enumerate() {
                cols.push(&rec(*fp, i as u64, 0));
            }
            let mut wanted: Vec<u64> = probes;
            wanted.extend(fps.iter().step_by(7).copied());
            wanted.extend([0, 1, u64::MAX, 1 << 63]);
            for fp in wanted {
                proptest::prop_assert_eq!(
                    cols.first_at_or_after(fp),
                    fps.partition_point(|f| *f < fp),
                    "fp {}", fp
                );
                let mut out = Vec::new();
                cols.lookup(fp, &mut out);
                proptest::prop_assert_eq!(out.len(), fps.iter().filter(|f| **f == fp).count());
            }
        }
    }

    #[test]
    fn a_reset_buffer_forgets_everything_and_takes_entries_again() {
        let mut b = Buffer::new(8);
        for i in 0..8 {
            assert!(b.insert(rec(i * 7, i, 0)));
        }
        assert!(b.is_full());
        b.reset();
        assert_eq!(b.len(), 0);
        let mut out = Vec::new();
        b.lookup(7, &mut out);
        assert!(out.is_empty());
        assert!(b.insert(rec(7, 100, 0)));
        b.lookup(7, &mut out);
        assert_eq!(out, vec![rec(7, 100, 0)]);
    }

    #[test]
    fn blocked_bloom_has_no_false_negatives_and_few_false_positives() {
        let n = 100_000u64;
        let fp = |i: u64| crate::dedup::fingerprint(&i.to_le_bytes());
        let mut bloom = BlockedBloom::for_keys(n as usize);
        for i in 0..n {
            bloom.add(fp(i));
        }
        assert!((0..n).all(|i| bloom.may_contain(fp(i))));
        let false_positives = (n..2 * n).filter(|&i| bloom.may_contain(fp(i))).count();
        assert!(
            false_positives < (n / 25) as usize,
            "{false_positives} false positives"
        );
    }

    #[test]
    fn buffer_finds_colliding_fingerprints_and_skips_replayed_records() {
        let mut b = Buffer::new(16);
        assert!(b.insert(rec(5, 1, 0)));
        assert!(b.insert(rec(5, 2, 0)));
        assert!(!b.insert(rec(5, 1, 0)));
        assert!(b.insert(rec(6, 3, 0)));
        let mut out = Vec::new();
        b.lookup(5, &mut out);
        out.sort_by_key(Rec::sort_key);
        assert_eq!(out, vec![rec(5, 1, 0), rec(5, 2, 0)]);
        assert_eq!(b.len(), 3);
        let cols = b.to_sorted_columns();
        assert_eq!(cols.len(), 3);
        assert!(cols.fingerprints().is_sorted());
        let mut out = Vec::new();
        cols.lookup(5, &mut out);
        assert_eq!(out, vec![rec(5, 1, 0), rec(5, 2, 0)]);
        out.clear();
        b.lookup(6, &mut out);
        assert_eq!(out, vec![rec(6, 3, 0)], "the buffer is left readable");
    }

    #[test]
    fn buffer_expire_keeps_the_rest_findable() {
        let mut b = Buffer::new(64);
        for i in 0..50 {
            b.insert(rec(i % 7, i, i as i64));
        }
        assert_eq!(b.expire(25), 25);
        for i in 0..50u64 {
            let mut out = Vec::new();
            b.lookup(i % 7, &mut out);
            assert_eq!(out.iter().any(|r| r.offset == i), i >= 25, "offset {i}");
        }
    }

    #[test]
    fn merge_orders_deduplicates_and_drops_expired() {
        let a = [rec(1, 1, 10), rec(3, 3, 10), rec(4, 4, 1)];
        let b = [rec(1, 1, 10), rec(2, 2, 10), rec(5, 5, 10)];
        let mut out = Vec::new();
        merge(
            a.iter().copied().map(Ok),
            b.iter().copied().map(Ok),
            5,
            |r| {
                out.push(*r);
                Ok(())
            },
        )
        .unwrap();
        let offsets: Vec<u64> = out.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![1, 2, 3, 5]);
    }
}
