//! The write path: a writer thread and a syncer thread in a pipeline (group commit).
//!
//! Appenders encode their batch and queue it. The writer takes everything queued
//! (up to a bound), frames the batches with consecutive offsets, writes them with one
//! positional write and hands the written group to the syncer. The syncer takes every
//! group handed to it so far, calls fdatasync once for all of them, publishes the new
//! end to readers and answers every appender. While the syncer waits for the disk the
//! writer is already writing the next groups, so the disk is kept busy with one
//! fdatasync after another, each covering everything that arrived during the last.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::error::{LogError, Result};
use crate::fs_io;
use crate::segment::{self, IndexEntry, IndexHeader};
use crate::{
    ActiveView, AppendAck, AppendReply, Durability, FsyncPolicy, Request, Sealed, Shared,
    WriterState, create_segment,
};

/// Most requests taken into one group.
const MAX_GROUP_REQUESTS: usize = 4096;
/// Most bytes taken into one group (a single larger batch still goes alone).
const MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;
/// A group of at most this many appends (and [`INLINE_SYNC_BYTES`]) that finds the
/// syncer idle is fdatasynced and answered by the writer itself: at low load (one
/// appender, or a trickle) that saves the hand-off to the syncer thread and its
/// wake-up, which on a shared VM costs a good part of an fdatasync. While the writer
/// syncs, new appends queue up; the next group is then larger and goes to the syncer,
/// so under load the pipeline is as before.
const INLINE_SYNC_APPENDS: usize = 8;
const INLINE_SYNC_BYTES: usize = 64 * 1024;
/// The active segment is extended with written zeros this much at a time, so that an
/// append overwrites allocated, initialised blocks and its fdatasync needs no size
/// or extent update (measured on ext4 here: ~35 % faster than appending to a growing
/// file; fallocate's unwritten extents measured slower under group commit).
const PREALLOCATE_BYTES: u64 = 1 << 20;
/// While its queue is empty the writer zero-fills this far past the data of a segment
/// that has data, a chunk at a time, each chunk made durable by its own fdatasync before
/// the writer looks at the queue again. Data fdatasyncs then find their space written
/// and allocated instead of also writing the just-in-time fill of [`PREALLOCATE_BYTES`]
/// (measured with `bench/scripts/prealloc-fsync.py`: p99 of 16–128 KiB syncs 2–3×
/// lower). As far ahead as the just-in-time fill, so a log takes no more disk; a
/// segment without data (a log never appended to) is not filled.
const IDLE_FILL_AHEAD: u64 = PREALLOCATE_BYTES;
const IDLE_FILL_CHUNK: u64 = 128 << 10;
/// The zeros written ahead: one static buffer (its pages are the kernel's shared zero
/// page until written, so nothing is allocated or cleared per preallocation).
static ZEROS: [u8; PREALLOCATE_BYTES as usize] = [0; PREALLOCATE_BYTES as usize];

struct PendingAppend {
    payload: Vec<u8>,
    count: u32,
    max_timestamp: i64,
    reply: AppendReply,
}

impl PendingAppend {
    fn frame_len(&self) -> u64 {
        (segment::FRAME_PREFIX_LEN + segment::BATCH_HEADER_LEN + self.payload.len()) as u64
    }
}

/// A group written to the page cache, waiting for fdatasync and publication.
struct WrittenGroup {
    file: Arc<std::fs::File>,
    path: PathBuf,
    segment_base: u64,
    end_len: u64,
    next_offset: u64,
    new_entries: Vec<IndexEntry>,
    records: u64,
    bytes: u64,
    replies: Vec<(AppendReply, u64, u64)>,
}

enum SyncerMsg {
    Written(WrittenGroup),
    /// Answered once everything handed over before it is synced and published.
    Barrier(std::sync::mpsc::SyncSender<Result<()>>),
}

fn clone_err(e: &LogError) -> LogError {
    match e {
        LogError::Poisoned(s) => LogError::Poisoned(s.clone()),
        LogError::StorageFull { path } => LogError::StorageFull { path: path.clone() },
        other => LogError::Poisoned(other.to_string()),
    }
}

fn poisoned(shared: &Shared) -> Option<String> {
    shared.poisoned.lock().ok().and_then(|g| g.clone())
}

fn poison(shared: &Shared, why: String) {
    tracing::error!(dir = %shared.dir.display(), reason = %why, "log poisoned; appends refused until reopen");
    if let Ok(mut g) = shared.poisoned.lock() {
        g.get_or_insert(why);
    }
}

fn fdatasync(shared: &Shared, file: &std::fs::File, path: &std::path::Path) -> Result<()> {
    let t = Instant::now();
    let r = fs_io::sync_data(file, path);
    let c = &shared.counters;
    c.fsyncs.fetch_add(1, Ordering::Relaxed);
    let micros = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
    if let Some(bucket) = crate::FSYNC_BUCKETS_MICROS
        .iter()
        .position(|&b| micros <= b)
        .and_then(|i| c.fsync_buckets.get(i))
    {
        bucket.fetch_add(1, Ordering::Relaxed);
    }
    c.fsync_micros.fetch_add(micros, Ordering::Relaxed);
    r.map_err(|e| {
        let err = LogError::io("fdatasync", path, e);
        poison(shared, err.to_string());
        err
    })
}

/// Entry point of the writer thread. Starts and finally joins the syncer thread.
pub(crate) fn run(shared: Arc<Shared>, seg: WriterState, rx: Receiver<Request>) {
    let (sync_tx, sync_rx) = mpsc::channel();
    let syncer_shared = Arc::clone(&shared);
    let done = Arc::new(AtomicU64::new(0));
    let syncer_done = Arc::clone(&done);
    let syncer = std::thread::Builder::new()
        .name("carebus-log-syncer".into())
        .spawn(move || run_syncer(syncer_shared, sync_rx, &syncer_done));
    let syncer = match syncer {
        Ok(h) => h,
        Err(e) => {
            poison(&shared, format!("cannot start the syncer thread: {e}"));
            return;
        }
    };
    let mut w = Writer {
        shared,
        seg,
        syncer: sync_tx,
        handed: 0,
        syncer_done: done,
        buf: Vec::new(),
        roll_pending: false,
        fill_failed: false,
        fill_file: None,
    };
    let mut shutting_down = false;
    while !shutting_down {
        // Idle: fill ahead a chunk at a time, looking at the queue between chunks.
        let waiting = loop {
            match rx.try_recv() {
                Ok(req) => break Some(req),
                Err(mpsc::TryRecvError::Disconnected) => break None,
                Err(mpsc::TryRecvError::Empty) => {
                    if !w.fill_ahead_while_idle() {
                        break rx.recv().ok();
                    }
                }
            }
        };
        let Some(first) = waiting else { break };
        let mut appends = Vec::new();
        let mut syncs = Vec::new();
        let mut bytes = 0usize;
        let mut next = Some(first);
        while let Some(req) = next.take() {
            match req {
                Request::Append {
                    payload,
                    count,
                    max_timestamp,
                    reply,
                } => {
                    bytes += payload.len();
                    appends.push(PendingAppend {
                        payload,
                        count,
                        max_timestamp,
                        reply,
                    });
                }
                Request::Sync(reply) => syncs.push(reply),
                Request::Shutdown => shutting_down = true,
            }
            if appends.len() < MAX_GROUP_REQUESTS && bytes < MAX_GROUP_BYTES && !shutting_down {
                next = rx.try_recv().ok();
            }
        }
        if !appends.is_empty() {
            let inline = appends.len() <= INLINE_SYNC_APPENDS && bytes <= INLINE_SYNC_BYTES;
            w.commit(appends, inline);
        }
        if !syncs.is_empty() {
            let result = w.barrier();
            for reply in syncs {
                let _ = reply.send(result.as_ref().map(|_| ()).map_err(clone_err));
            }
        }
    }
    let _ = w.barrier();
    w.trim_preallocation();
    drop(w);
    let _ = syncer.join();
}

struct Writer {
    shared: Arc<Shared>,
    seg: WriterState,
    syncer: Sender<SyncerMsg>,
    /// Groups handed to the syncer so far.
    handed: u64,
    /// Groups the syncer has answered so far (it counts them after publishing).
    syncer_done: Arc<AtomicU64>,
    buf: Vec<u8>,
    /// A roll started and did not finish (an I/O error). Until one succeeds nothing
    /// more is written to the active segment: the failed roll may have left its index
    /// and the next segment's file behind, and on a restart that file would become
    /// the active segment, starting at an offset later appends here would also use.
    roll_pending: bool,
    /// A zero-fill ahead failed in the active segment: no more idle fills until a roll.
    fill_failed: bool,
    /// The active segment (by base offset) opened a second time, for the idle fill's
    /// writes and fdatasyncs. Its own open file description keeps the fill's fdatasync
    /// from taking a writeback error away from the syncer: the kernel reports an error
    /// once per open file description (errseq), so an fdatasync of the fill on the
    /// syncer's descriptor, running beside the syncer's, could see the error in its
    /// place and leave the syncer's fdatasync returning success for data that never
    /// reached the disk. With two descriptors each sees it.
    fill_file: Option<(u64, std::fs::File)>,
}

impl Writer {
    /// Waits until everything written so far is synced (per policy: fsynced) and published.
    fn barrier(&self) -> Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.syncer
            .send(SyncerMsg::Barrier(tx))
            .map_err(|_| LogError::Closed)?;
        rx.recv().map_err(|_| LogError::Closed)?
    }

    fn should_roll(&self, frame_len: u64) -> bool {
        let has_data = self.seg.len > segment::SEGMENT_HEADER_LEN;
        let full = self.seg.len + frame_len > self.shared.config.segment_bytes;
        let old = self
            .shared
            .config
            .segment_max_age
            .is_some_and(|age| self.seg.opened_at.elapsed() >= age);
        has_data && (full || old || self.roll_pending)
    }

    /// Cuts the zero-filled preallocation so the file ends with its last batch.
    fn trim_preallocation(&mut self) {
        if self.seg.allocated > self.seg.len {
            match fs_io::set_len(&self.seg.file, &self.seg.path, self.seg.len) {
                Ok(()) => self.seg.allocated = self.seg.len,
                Err(e) => {
                    tracing::warn!(segment = %self.seg.path.display(), error = %e, "cannot trim preallocation")
                }
            }
            let _ = fs_io::sync_all(&self.seg.file, &self.seg.path);
        }
    }

    /// Zero-fills one chunk past the allocated end (up to [`IDLE_FILL_AHEAD`] past the
    /// data, within the segment) and fdatasyncs it. Returns whether it filled one (the
    /// caller then looks at its queue and may call again). It writes and syncs through
    /// its own descriptor ([`Writer::fill_file`]), so the syncer's fdatasync still sees
    /// any writeback error. A failed fdatasync poisons the log like a data fdatasync:
    /// it flushes the file's data pages too, and the error may be theirs.
    fn fill_ahead_while_idle(&mut self) -> bool {
        if self.fill_failed
            || self.roll_pending
            || self.seg.len <= segment::SEGMENT_HEADER_LEN
            || poisoned(&self.shared).is_some()
        {
            return false;
        }
        let want = (self.seg.len + IDLE_FILL_AHEAD).min(self.shared.config.segment_bytes);
        let start = self.seg.allocated.max(self.seg.len);
        // Whole chunks only: one fdatasync per chunk of data, not one per append.
        if start.saturating_add(IDLE_FILL_CHUNK) > want {
            return false;
        }
        let n = IDLE_FILL_CHUNK;
        let zeros = ZEROS
            .get(..usize::try_from(n).unwrap_or(usize::MAX))
            .unwrap_or(&ZEROS);
        if self
            .fill_file
            .as_ref()
            .is_none_or(|(base, _)| *base != self.seg.base)
        {
            self.fill_file = None;
            match fs_io::open(&self.seg.path, fs_io::OpenMode::READ_WRITE) {
                Ok(f) => self.fill_file = Some((self.seg.base, f)),
                Err(e) => {
                    tracing::warn!(segment = %self.seg.path.display(), error = %e, "cannot open the segment for zero-fill ahead");
                    self.fill_failed = true;
                    return false;
                }
            }
        }
        let Some((_, fill_file)) = &self.fill_file else {
            return false;
        };
        if let Err(e) = fs_io::write_all_at(fill_file, &self.seg.path, zeros, start) {
            // Not needed for correctness (appends fill just in time): stop trying
            // until the next segment.
            tracing::warn!(segment = %self.seg.path.display(), error = %e, "zero-fill ahead failed");
            self.fill_failed = true;
            return false;
        }
        self.seg.allocated = start + n;
        if let Err(e) = fs_io::sync_data(fill_file, &self.seg.path) {
            let err = LogError::io("fdatasync", &self.seg.path, e);
            poison(&self.shared, err.to_string());
            return false;
        }
        self.shared
            .counters
            .fill_syncs
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Makes sure the file is allocated up to `end`, zero-filling ahead.
    fn preallocate(&mut self, end: u64) -> Result<()> {
        if end <= self.seg.allocated {
            return Ok(());
        }
        let target = (end + PREALLOCATE_BYTES).min(self.shared.config.segment_bytes.max(end));
        // `end` is past the allocated end: the data write itself extends the file up
        // to it, and zeros follow.
        if target > end {
            // `target - end` is at most PREALLOCATE_BYTES, the length of ZEROS.
            let n = usize::try_from(target - end).unwrap_or(usize::MAX);
            let zeros = ZEROS.get(..n).unwrap_or(&ZEROS);
            fs_io::write_all_at(&self.seg.file, &self.seg.path, zeros, end)
                .map_err(|e| LogError::io("preallocate", &self.seg.path, e))?;
        }
        self.seg.allocated = target.max(end);
        Ok(())
    }

    /// Seals the active segment once all of it is durable, and starts a new one.
    fn roll(&mut self) -> Result<()> {
        self.roll_pending = true;
        self.barrier()?;
        self.trim_preallocation();
        // Under the interval policy the barrier does not fsync; a sealed segment must be durable.
        fdatasync(&self.shared, &self.seg.file, &self.seg.path)?;
        let dir = self.shared.dir.clone();
        let entry_count = u32::try_from(self.seg.entries.len())
            .map_err(|_| LogError::Config("index too large".into()))?;
        segment::write_index(
            &dir,
            &IndexHeader {
                base: self.seg.base,
                next_offset: self.seg.next_offset,
                max_timestamp: self.seg.max_timestamp,
                segment_len: self.seg.len,
                entry_count,
            },
            &self.seg.entries,
        )?;
        // create_segment fsyncs the directory, which also makes the index rename durable.
        let base = self.seg.next_offset;
        let (path, file) = create_segment(&dir, base)?;
        let file = Arc::new(file);
        let old = std::mem::replace(
            &mut self.seg,
            WriterState {
                base,
                path: path.clone(),
                file: Arc::clone(&file),
                len: segment::SEGMENT_HEADER_LEN,
                next_offset: base,
                max_timestamp: i64::MIN,
                entries: Vec::new(),
                last_indexed: None,
                opened_at: Instant::now(),
                allocated: segment::SEGMENT_HEADER_LEN,
            },
        );
        let mut st = self
            .shared
            .state
            .write()
            .map_err(|_| LogError::Poisoned("state lock poisoned".into()))?;
        st.sealed.insert(
            old.base,
            Sealed {
                base: old.base,
                next_offset: old.next_offset,
                max_timestamp: old.max_timestamp,
                len: old.len,
                path: old.path,
                file: old.file,
            },
        );
        st.active = ActiveView {
            base,
            path,
            file,
            len: segment::SEGMENT_HEADER_LEN,
            next_offset: base,
            entries: Vec::new(),
        };
        self.roll_pending = false;
        self.fill_failed = false;
        self.fill_file = None;
        tracing::debug!(dir = %dir.display(), sealed = old.base, new_base = base, "segment rolled");
        Ok(())
    }

    /// Writes the appends; `small` lets [`Writer::finish`] sync them on this thread.
    fn commit(&mut self, appends: Vec<PendingAppend>, small: bool) {
        if let Some(why) = poisoned(&self.shared) {
            for a in appends {
                a.reply.send(Err(LogError::Poisoned(why.clone())));
            }
            return;
        }
        let mut rest = appends.into_iter().peekable();
        while let Some(first) = rest.peek() {
            if self.should_roll(first.frame_len())
                && let Err(e) = self.roll()
            {
                tracing::error!(dir = %self.shared.dir.display(), error = %e, "segment roll failed");
                for a in rest {
                    a.reply.send(Err(clone_err(&e)));
                }
                return;
            }
            // Take batches while they fit in this segment (always at least one).
            let mut chunk = Vec::new();
            let mut projected = self.seg.len;
            while let Some(a) = rest.peek() {
                let fl = a.frame_len();
                if !chunk.is_empty() && projected + fl > self.shared.config.segment_bytes {
                    break;
                }
                projected += fl;
                if let Some(a) = rest.next() {
                    chunk.push(a);
                }
            }
            let finished = self
                .write_chunk(chunk)
                .and_then(|group| group.map_or(Ok(()), |g| self.finish(g, small)));
            if let Err(e) = finished {
                for a in rest {
                    a.reply.send(Err(clone_err(&e)));
                }
                return;
            }
        }
    }

    /// Gets a written group synced, published and answered: by this thread when the
    /// group is small, the policy is to fsync every append and the syncer has answered
    /// everything handed to it (so offsets are still published in order); otherwise by
    /// the syncer.
    fn finish(&mut self, group: WrittenGroup, small: bool) -> Result<()> {
        let syncer_idle = self.syncer_done.load(Ordering::Acquire) == self.handed;
        if small && syncer_idle && self.shared.config.fsync == FsyncPolicy::Always {
            // A failed fdatasync poisons the log, and `publish` then answers every
            // appender of the group with the error.
            let synced = sync_groups(&self.shared, std::slice::from_ref(&group));
            self.shared
                .counters
                .inline_syncs
                .fetch_add(1, Ordering::Relaxed);
            let end = (group.segment_base, group.end_len);
            let _ = publish(&self.shared, vec![group], Durability::Fsynced);
            // Noted after the answers (off their path); still after the fdatasync.
            if synced.is_ok() {
                record_synced(&self.shared, end.0, end.1);
            }
            return Ok(());
        }
        self.syncer
            .send(SyncerMsg::Written(group))
            .map_err(|_| LogError::Closed)?;
        self.handed += 1;
        Ok(())
    }

    /// Writes one group of batches at the end of the active segment and returns it,
    /// to be synced. On a failed write, cuts what landed, answers with the error and
    /// returns `None`.
    fn write_chunk(&mut self, chunk: Vec<PendingAppend>) -> Result<Option<WrittenGroup>> {
        self.buf.clear();
        let start_len = self.seg.len;
        let mut offset = self.seg.next_offset;
        let mut spans = Vec::with_capacity(chunk.len());
        let mut new_entries: Vec<IndexEntry> = Vec::new();
        let mut last_indexed = self.seg.last_indexed;
        let mut max_ts = self.seg.max_timestamp;
        let mut records = 0u64;
        for a in &chunk {
            let position = start_len + self.buf.len() as u64;
            let entry = (
                u32::try_from(offset - self.seg.base),
                u32::try_from(position),
            );
            let framed =
                segment::encode_frame(&mut self.buf, offset, a.count, a.max_timestamp, &a.payload);
            let (Ok(()), (Ok(rel), Ok(pos))) = (framed, entry) else {
                let e = LogError::Config("segment too large for its index".into());
                for a in chunk {
                    a.reply.send(Err(clone_err(&e)));
                }
                return Ok(None);
            };
            if last_indexed.is_none_or(|l| position - l >= self.shared.config.index_interval_bytes)
            {
                new_entries.push(IndexEntry {
                    relative_offset: rel,
                    position: pos,
                });
                last_indexed = Some(position);
            }
            spans.push((offset, offset + u64::from(a.count) - 1));
            offset += u64::from(a.count);
            records += u64::from(a.count);
            max_ts = max_ts.max(a.max_timestamp);
        }
        let end = start_len + self.buf.len() as u64;
        let written = self.preallocate(end).and_then(|()| {
            fs_io::write_all_at(&self.seg.file, &self.seg.path, &self.buf, start_len)
                .map_err(|e| LogError::io("write", &self.seg.path, e))
        });
        if let Err(err) = written {
            // Cut whatever part of the write landed, so the next append starts clean.
            match fs_io::set_len(&self.seg.file, &self.seg.path, start_len) {
                Ok(()) => self.seg.allocated = start_len,
                Err(t) => poison(&self.shared, format!("could not undo a failed write: {t}")),
            }
            tracing::warn!(dir = %self.shared.dir.display(), error = %err, "append failed; nothing of it kept");
            for a in chunk {
                a.reply.send(Err(clone_err(&err)));
            }
            return Ok(None);
        }
        let written = self.buf.len() as u64;
        self.seg.len += written;
        self.seg.next_offset = offset;
        self.seg.max_timestamp = max_ts;
        self.seg.last_indexed = last_indexed;
        self.seg.entries.extend_from_slice(&new_entries);
        let group = WrittenGroup {
            file: Arc::clone(&self.seg.file),
            path: self.seg.path.clone(),
            segment_base: self.seg.base,
            end_len: self.seg.len,
            next_offset: offset,
            new_entries,
            records,
            bytes: written,
            replies: chunk
                .into_iter()
                .zip(spans)
                .map(|(a, (b, l))| (a.reply, b, l))
                .collect(),
        };
        Ok(Some(group))
    }
}

/// Entry point of the syncer thread.
/// `done` counts the groups answered (the writer syncs a small group itself only while
/// it equals the number it handed over).
fn run_syncer(shared: Arc<Shared>, rx: Receiver<SyncerMsg>, done: &AtomicU64) {
    let interval = match shared.config.fsync {
        FsyncPolicy::Always => None,
        FsyncPolicy::Interval(d) => Some(d),
    };
    // Interval policy: the oldest unsynced write, and the file it went to.
    let mut dirty: Option<Dirty> = None;
    // Appends in flight when the last group was answered: the appenders just released
    // are expected back at once, so the next fdatasync briefly waits for them (bounded
    // by half an fdatasync) instead of splitting them into two alternating cohorts.
    let mut population = 0u64;
    let mut last_fsync = Duration::ZERO;
    let mut cohort = CohortWait::default();
    loop {
        let first = match (interval, &dirty) {
            (Some(every), Some(Dirty { since, .. })) => {
                match rx.recv_timeout(every.saturating_sub(since.elapsed())) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Some(d) = dirty.take() {
                            let _ = d.sync(&shared);
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            _ => match rx.recv_timeout(Duration::from_secs(3600)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            },
        };
        let mut groups: Vec<WrittenGroup> = Vec::new();
        let mut barriers = Vec::new();
        let mut pending = 0u64;
        let mut next = Some(first);
        let mut deadline: Option<Instant> = None;
        let may_wait = interval.is_none() && cohort.should_wait();
        let mut before_wait = None;
        while let Some(m) = next.take() {
            match m {
                SyncerMsg::Written(g) => {
                    pending += g.replies.len() as u64;
                    groups.push(g);
                }
                SyncerMsg::Barrier(b) => {
                    // Stop taking more: the barrier covers only what came before it.
                    barriers.push(b);
                    break;
                }
            }
            next = rx.try_recv().ok();
            if next.is_none() && pending < population && may_wait {
                before_wait.get_or_insert(pending);
                let until = *deadline.get_or_insert_with(|| {
                    Instant::now() + (last_fsync / 2).min(Duration::from_micros(500))
                });
                next = rx
                    .recv_timeout(until.saturating_duration_since(Instant::now()))
                    .ok();
            }
        }
        if let Some(before) = before_wait {
            cohort.waited(
                population.saturating_sub(before),
                pending.saturating_sub(before),
            );
        }
        let group_count = groups.len() as u64;
        let result = if interval.is_some() {
            if let Some(g) = groups.last() {
                let since = dirty.as_ref().map_or_else(Instant::now, |d| d.since);
                dirty = Some(Dirty {
                    since,
                    file: Arc::clone(&g.file),
                    path: g.path.clone(),
                    segment_base: g.segment_base,
                    end_len: g.end_len,
                });
            }
            // A sync request or a roll wants everything on disk.
            let synced = match (barriers.is_empty(), dirty.take()) {
                (false, Some(d)) => d.sync(&shared),
                (true, d) => {
                    dirty = d;
                    Ok(())
                }
                (false, None) => Ok(()),
            };
            // A failed fdatasync poisoned the log, so publish answers with the error.
            let published = publish(&shared, groups, Durability::Buffered);
            synced.and(published)
        } else {
            let started = Instant::now();
            let synced = sync_groups(&shared, &groups);
            last_fsync = started.elapsed();
            population = shared.in_flight.load(Ordering::Acquire);
            let end = synced_end(&groups);
            let published = publish(&shared, groups, Durability::Fsynced);
            // Noted after the answers (off their path); still after the fdatasync. A
            // mark written later by the writer's own sync may land first: the mark is
            // then older than the data, which it may always be (a lower bound).
            if let (Ok(()), Some((base, len))) = (&synced, end) {
                record_synced(&shared, base, len);
            }
            synced.and(published)
        };
        done.fetch_add(group_count, Ordering::Release);
        for b in barriers {
            let _ = b.send(result.as_ref().map(|_| ()).map_err(clone_err));
        }
    }
    if let Some(d) = dirty.take() {
        let _ = d.sync(&shared);
    }
}

/// Interval policy: written and not yet synced, since `since`, up to `end_len` of the
/// segment `segment_base`.
struct Dirty {
    since: Instant,
    file: Arc<std::fs::File>,
    path: PathBuf,
    segment_base: u64,
    end_len: u64,
}

impl Dirty {
    fn sync(self, shared: &Shared) -> Result<()> {
        fdatasync(shared, &self.file, &self.path)?;
        record_synced(shared, self.segment_base, self.end_len);
        Ok(())
    }
}

/// Whether the syncer's short wait for the appenders it just released pays off. It
/// does when they come straight back (closed-loop producers: each waits for its answer
/// and sends the next message), so one fdatasync covers them all. It does not when
/// appends arrive independently of the answers (producers at a fixed rate): then the
/// wait only adds latency. After a wait that brought back less than half of the
/// appenders it waited for, the next [`CohortWait::SKIP`] fdatasyncs do not wait; then
/// waiting is tried again.
#[derive(Debug, Default)]
struct CohortWait {
    skip: u32,
}

impl CohortWait {
    const SKIP: u32 = 8;

    /// Whether this round may wait for the expected appenders.
    fn should_wait(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            false
        } else {
            true
        }
    }

    /// A wait ended: `expected` appenders were missing when it began, `came` arrived.
    fn waited(&mut self, expected: u64, came: u64) {
        if came.saturating_mul(2) < expected {
            self.skip = Self::SKIP;
        }
    }
}

/// fdatasyncs every file the groups were written to (one per segment, usually one).
/// A failure poisons the log (see [`fdatasync`]).
fn sync_groups(shared: &Shared, groups: &[WrittenGroup]) -> Result<()> {
    let mut last_base = None;
    for g in groups {
        if last_base != Some(g.segment_base) {
            fdatasync(shared, &g.file, &g.path)?;
            last_base = Some(g.segment_base);
        }
    }
    Ok(())
}

/// Where the last of `groups` ends: what [`record_synced`] notes once they are synced.
fn synced_end(groups: &[WrittenGroup]) -> Option<(u64, u64)> {
    groups.last().map(|g| (g.segment_base, g.end_len))
}

/// Notes in the synced mark that the segment is durable up to `len` bytes (after the
/// fdatasync that made it so returned).
fn record_synced(shared: &Shared, segment_base: u64, len: u64) {
    if let Some(mark) = &shared.synced_mark {
        mark.record(segment_base, len);
    }
}

/// Makes the groups visible to readers and answers their appenders.
fn publish(shared: &Shared, groups: Vec<WrittenGroup>, durability: Durability) -> Result<()> {
    if let Some(why) = poisoned(shared) {
        for g in groups {
            for (reply, _, _) in g.replies {
                reply.send(Err(LogError::Poisoned(why.clone())));
            }
        }
        return Err(LogError::Poisoned(why));
    }
    let Some(last) = groups.last() else {
        return Ok(());
    };
    let visible = last.next_offset;
    {
        let Ok(mut st) = shared.state.write() else {
            return Err(LogError::Poisoned("state lock poisoned".into()));
        };
        for g in &groups {
            // Rolls wait for a barrier, so every group belongs to the active segment.
            if g.segment_base == st.active.base {
                st.active.len = g.end_len;
                st.active.next_offset = g.next_offset;
                st.active.entries.extend_from_slice(&g.new_entries);
            }
        }
    }
    shared.visible.send_replace(visible);
    let c = &shared.counters;
    for g in groups {
        c.batches
            .fetch_add(g.replies.len() as u64, Ordering::Relaxed);
        c.records.fetch_add(g.records, Ordering::Relaxed);
        c.bytes_written.fetch_add(g.bytes, Ordering::Relaxed);
        for (reply, base_offset, last_offset) in g.replies {
            reply.send(Ok(AppendAck {
                base_offset,
                last_offset,
                durability,
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::CohortWait;

    #[test]
    fn the_cohort_wait_stops_while_it_does_not_pay_and_is_tried_again() {
        let mut c = CohortWait::default();
        // Closed loop: the released appenders come back; waiting goes on.
        for _ in 0..20 {
            assert!(c.should_wait());
            c.waited(64, 60);
        }
        // Open loop: few of the expected appenders come; the next SKIP rounds do not wait.
        assert!(c.should_wait());
        c.waited(10, 2);
        for _ in 0..CohortWait::SKIP {
            assert!(!c.should_wait());
        }
        // Then it is tried again, and kept if it pays.
        assert!(c.should_wait());
        c.waited(10, 5);
        assert!(c.should_wait());
    }
}
