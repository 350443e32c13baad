//! Guards durability against power loss, simulated inside the storage write path.
//!
//! Every file-system operation of the log goes through a hook (the `fault-injection`
//! feature); a simulated disk (`disk.rs`) records what is durable and what is not,
//! declares a crash at a chosen operation (that operation and every later one fail,
//! so nothing more reaches the disk), and rewrites the directory into a state a power
//! loss may leave on ext4/xfs. The log is then reopened (recovery) and checked:
//!
//! * every append acknowledged as durable (and every record served after an earlier
//!   recovery) is present, exactly once, at its offset, with identical bytes;
//! * offsets are dense, no partial batch is visible, nothing is served that was never
//!   appended;
//! * appends work again afterwards and are durable too;
//! * retention never deleted data younger than its cutoff, and a crash during
//!   deletion leaves a log that opens and reads correctly.
//!
//! Crash points: between write and fsync, in the middle of a batch (every byte cut of
//! a torn write), at every step of a segment roll (index write included), at every
//! step of recovery, during retention deletion (between the files of one segment and
//! between segments); injected I/O errors (ENOSPC, EIO); and a seeded random test
//! over all of them, with process crashes followed by power loss.
//!
//! `CAREBUS_POWER_LOSS_SEED=<n>` reruns one case of the random test; `..._CASES=<n>`
//! sets how many run (default 400 with fsync `always`, 250 with `interval`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod disk;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use carebus_log::fault::{FsOp, HookGuard, install_hook};
use carebus_log::{
    AppendAck, Durability, FsyncPolicy, Log, LogConfig, LogError, Record, Retention,
};
use disk::{ALL_OUTCOMES, Disk, FileOutcome, Forced, Image, write_image};

// ---------------------------------------------------------------------------------
// What was appended, and what must survive.

#[derive(Clone, Debug)]
struct Spec {
    sizes: Vec<usize>,
    ts: i64,
}

fn value(id: u64, i: usize, size: usize) -> Vec<u8> {
    let mut v = format!("b{id}.{i}|").into_bytes();
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1);
    for _ in 0..size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

fn records(id: u64, spec: &Spec) -> Vec<Record> {
    spec.sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let mut r = Record::new(value(id, i, size)).with_timestamp(spec.ts);
            if (id + i as u64).is_multiple_of(3) {
                r = r.with_key(format!("k{id}"));
            }
            if i % 2 == 1 {
                r = r.with_header("h", format!("{id}:{i}"));
            }
            r
        })
        .collect()
}

/// Everything the test knows about the log's content.
#[derive(Clone, Debug, Default)]
struct Expect {
    specs: HashMap<u64, Spec>,
    next_id: u64,
    /// Base offset → batch id: acknowledged as fsynced, covered by a successful sync,
    /// or served after a recovery. These must survive every later crash.
    durable: BTreeMap<u64, u64>,
    /// Acknowledged as buffered (interval policy): durable after the next successful sync.
    buffered: Vec<(u64, u64)>,
    /// Retention may have deleted batches with a timestamp below this.
    cutoff: i64,
}

impl Expect {
    fn batch(&mut self, sizes: Vec<usize>) -> (u64, Vec<Record>) {
        let id = self.next_id;
        self.next_id += 1;
        let spec = Spec {
            sizes,
            ts: i64::try_from(id).unwrap() + 1,
        };
        let recs = records(id, &spec);
        self.specs.insert(id, spec);
        (id, recs)
    }

    fn acked(&mut self, id: u64, ack: &AppendAck) -> Result<(), String> {
        let count = self.specs[&id].sizes.len() as u64;
        if ack.last_offset + 1 - ack.base_offset != count {
            return Err(format!("ack {ack:?} for a batch of {count}"));
        }
        match ack.durability {
            Durability::Fsynced => {
                self.durable.insert(ack.base_offset, id);
            }
            Durability::Buffered => self.buffered.push((ack.base_offset, id)),
        }
        Ok(())
    }

    fn synced(&mut self) {
        for (base, id) in self.buffered.drain(..) {
            self.durable.insert(base, id);
        }
    }
}

fn parse_label(value: &[u8]) -> Option<(u64, usize)> {
    let bar = value.iter().position(|&b| b == b'|')?;
    let label = std::str::from_utf8(value.get(1..bar)?).ok()?;
    let (id, i) = label.split_once('.')?;
    Some((id.parse().ok()?, i.parse().ok()?))
}

/// Checks the invariants on an open log, then records everything it serves as durable.
fn check(log: &Log, exp: &mut Expect) -> Result<u64, String> {
    let start = log.start_offset();
    let end = log.next_offset();
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let mut open_batch: Option<(u64, u64, usize)> = None; // id, base, next index
    let mut off = start;
    while off < end {
        let recs = log
            .read(off, 256, usize::MAX)
            .map_err(|e| format!("read at {off} (start {start}, end {end}) failed: {e}"))?;
        if recs.is_empty() {
            return Err(format!("read at {off} returned nothing; end is {end}"));
        }
        for r in recs {
            if r.offset >= end {
                return Err(format!(
                    "offset {} served, but the log ends at {end}",
                    r.offset
                ));
            }
            if r.offset != off {
                return Err(format!(
                    "offsets not dense: expected {off}, got {}",
                    r.offset
                ));
            }
            let Some((id, i)) = parse_label(&r.value) else {
                return Err(format!(
                    "offset {off} holds a record that was never appended"
                ));
            };
            let Some(spec) = exp.specs.get(&id) else {
                return Err(format!(
                    "offset {off} holds batch {id} that was never appended"
                ));
            };
            let want = records(id, spec);
            let Some(w) = want.get(i) else {
                return Err(format!("offset {off}: batch {id} has no record {i}"));
            };
            if r.value != w.value
                || r.key != w.key
                || r.headers != w.headers
                || r.timestamp_ms != w.timestamp_ms
            {
                return Err(format!(
                    "offset {off}: record {id}.{i} differs from what was appended"
                ));
            }
            match open_batch {
                None if i == 0 => {
                    if let Some(prev) = seen.get(&id) {
                        return Err(format!("batch {id} served twice, at {prev} and {off}"));
                    }
                    open_batch = Some((id, off, 1));
                }
                Some((bid, base, next)) if bid == id && next == i => {
                    open_batch = Some((bid, base, next + 1));
                }
                _ => {
                    return Err(format!(
                        "offset {off}: record {id}.{i} does not continue batch {open_batch:?} (partial batch)"
                    ));
                }
            }
            if let Some((bid, base, next)) = open_batch
                && next == spec.sizes.len()
            {
                seen.insert(bid, base);
                open_batch = None;
            }
            off += 1;
        }
    }
    if let Some(b) = open_batch {
        return Err(format!("partial batch at the end of the log: {b:?}"));
    }
    for (&base, &id) in &exp.durable {
        if base >= start {
            match seen.get(&id) {
                Some(&at) if at == base => {}
                Some(&at) => {
                    return Err(format!(
                        "durable batch {id} moved from offset {base} to {at}"
                    ));
                }
                None => {
                    return Err(format!(
                        "durable batch {id} at offset {base} is lost (log holds {start}..{end})"
                    ));
                }
            }
        } else if exp.specs[&id].ts >= exp.cutoff {
            return Err(format!(
                "retention deleted batch {id} at {base} (timestamp {}), younger than the cutoff {}",
                exp.specs[&id].ts, exp.cutoff
            ));
        }
    }
    // What was served must survive from now on.
    for (id, base) in seen {
        exp.durable.insert(base, id);
    }
    Ok(end - start)
}

// ---------------------------------------------------------------------------------
// A log directory on a simulated disk.

fn base_dir() -> tempfile::TempDir {
    // tmpfs makes the real fsyncs free; the simulation does not depend on them.
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new()
            .prefix("carebus-power-loss")
            .tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

struct Sim {
    // Field order: the hook goes before the directory.
    _guard: HookGuard,
    disk: Arc<Disk>,
    dir: tempfile::TempDir,
    cfg: LogConfig,
    exp: Expect,
}

impl Sim {
    fn new(cfg: LogConfig) -> Sim {
        Sim::with_image(cfg, &Image::new(), Expect::default())
    }

    fn with_image(cfg: LogConfig, image: &Image, exp: Expect) -> Sim {
        let dir = base_dir();
        write_image(dir.path(), image);
        let disk = Arc::new(Disk::from_dir(dir.path()));
        let guard = install_hook(dir.path(), disk.clone());
        Sim {
            _guard: guard,
            disk,
            dir,
            cfg,
            exp,
        }
    }

    /// A copy of this directory as a process crash leaves it (unsynced data still in
    /// the page cache), whose disk remembers what is not durable yet.
    fn fork_process_crash(&self) -> Sim {
        let dir = base_dir();
        write_image(dir.path(), &self.disk.current_image());
        let disk = Arc::new(self.disk.fork(dir.path()));
        let guard = install_hook(dir.path(), disk.clone());
        Sim {
            _guard: guard,
            disk,
            dir,
            cfg: self.cfg.clone(),
            exp: self.exp.clone(),
        }
    }

    /// Opens (recovers) the log; a recovery that warns about damage is a failure,
    /// since a power loss alone must never damage the log.
    fn open(&self) -> Result<Log, String> {
        let (log, report) = Log::open(self.dir.path(), self.cfg.clone())
            .map_err(|e| format!("open failed: {e}"))?;
        if !report.warnings.is_empty() && self.disk.crashed().is_none() {
            return Err(format!("recovery warned: {:?}", report.warnings));
        }
        Ok(log)
    }

    fn append(&mut self, log: &Log, sizes: Vec<usize>) -> Result<AppendAck, LogError> {
        let (id, recs) = self.exp.batch(sizes);
        let r = log.append_blocking(&recs);
        if let Ok(ack) = &r {
            self.exp.acked(id, ack).unwrap();
        }
        r
    }

    /// Several appends at once from threads, so that one write holds several batches.
    fn burst(&mut self, log: &Log, batches: Vec<Vec<usize>>) -> Vec<Result<AppendAck, LogError>> {
        let prepared: Vec<(u64, Vec<Record>)> =
            batches.into_iter().map(|s| self.exp.batch(s)).collect();
        let results: Vec<(u64, Result<AppendAck, LogError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = prepared
                .iter()
                .map(|(id, recs)| s.spawn(move || (*id, log.append_blocking(recs))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        results
            .into_iter()
            .map(|(id, r)| {
                if let Ok(ack) = &r {
                    self.exp.acked(id, ack).unwrap();
                }
                r
            })
            .collect()
    }

    /// Power loss now: the directory becomes a state the disk may be left in.
    fn power_loss(&mut self, rng: &mut fastrand::Rng, forced: &Forced) -> Result<String, String> {
        self.disk.check_matches_real_dir()?;
        let (image, what) = self.disk.power_loss_image(rng, forced);
        write_image(self.dir.path(), &image);
        self.disk.reset(&image);
        Ok(what)
    }

    /// A fresh simulation on a power-loss image of this one.
    fn fork_power_loss(&self, rng: &mut fastrand::Rng, forced: &Forced) -> (Sim, String) {
        let (image, what) = self.disk.power_loss_image(rng, forced);
        (
            Sim::with_image(self.cfg.clone(), &image, self.exp.clone()),
            what,
        )
    }

    /// Recovers, checks, appends once and checks again.
    fn recover_and_check(&mut self) -> Result<(), String> {
        self.disk.arm(None);
        let log = self.open()?;
        check(&log, &mut self.exp).map_err(|e| format!("after recovery: {e}"))?;
        self.append(&log, vec![77])
            .map_err(|e| format!("append after recovery failed: {e}"))?;
        check(&log, &mut self.exp).map_err(|e| format!("after appending: {e}"))?;
        Ok(())
    }

    /// Recovers, checks, appends, closes cleanly, recovers and checks again.
    fn recover_and_verify(&mut self) -> Result<(), String> {
        self.disk.arm(None);
        let log = self.open()?;
        check(&log, &mut self.exp).map_err(|e| format!("after recovery: {e}"))?;
        for n in 0..3 {
            self.append(&log, vec![40 + n * 150])
                .map_err(|e| format!("append after recovery failed: {e}"))?;
        }
        check(&log, &mut self.exp).map_err(|e| format!("after appending: {e}"))?;
        drop(log);
        let log = self.open()?;
        check(&log, &mut self.exp).map_err(|e| format!("after a clean reopen: {e}"))?;
        Ok(())
    }
}

fn small_cfg() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 300,
        segment_max_age: None,
        retention: Retention {
            max_age: Some(Duration::from_secs(1000)),
            max_bytes: None,
        },
        ..LogConfig::default()
    }
}

/// `now` for `enforce_retention` that deletes segments whose newest record is older than `cutoff`.
fn now_for_cutoff(cutoff: i64) -> i64 {
    cutoff + 1_000_000
}

fn crash_at(n: u64) -> disk::Trigger {
    Box::new(move |i, _| i == n)
}

fn crash_on(mut pred: impl FnMut(&FsOp<'_>) -> bool + Send + 'static) -> disk::Trigger {
    Box::new(move |_, op| pred(op))
}

fn is_log(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "log")
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

// ---------------------------------------------------------------------------------
// Explicit crash points.

/// The crash hits the fdatasync after a write: the write may be lost, kept, torn or
/// partly reordered; acknowledged appends before it survive, the unacknowledged one
/// is all or nothing.
#[test]
fn crash_between_write_and_fsync() {
    let mut rng = fastrand::Rng::with_seed(1);
    let mut runs = 0;
    for outcome in ALL_OUTCOMES {
        for round in 0..12 {
            let mut sim = Sim::new(small_cfg());
            let log = sim.open().unwrap();
            for i in 0..(round % 5 + 2) {
                sim.append(&log, vec![30 + i * 47]).unwrap();
            }
            sim.disk.arm(Some(crash_on(
                |op| matches!(op, FsOp::SyncData { path } if is_log(path)),
            )));
            let sizes = if round % 2 == 0 {
                vec![700]
            } else {
                vec![5, 300, 20]
            };
            assert!(sim.append(&log, sizes).is_err());
            assert!(sim.disk.crashed().unwrap().contains("fdatasync"));
            drop(log);
            let what = sim
                .power_loss(
                    &mut rng,
                    &Forced {
                        outcome: Some(outcome),
                        ..Forced::default()
                    },
                )
                .unwrap();
            sim.recover_and_verify()
                .unwrap_or_else(|e| panic!("{outcome:?} round {round} ({what}): {e}"));
            runs += 1;
        }
    }
    assert_eq!(runs, 60);
    println!("between write and fsync: {runs} power-loss states verified");
}

/// Crashes at the fdatasync after one write holding a burst of four batches; returns
/// the crashed simulation, its trace and the length of that write.
fn crash_after_a_grouped_write(delay_ms: u64) -> (Sim, Vec<String>, usize) {
    let mut sim = Sim::new(LogConfig {
        segment_bytes: 64 * 1024,
        ..small_cfg()
    });
    let log = sim.open().unwrap();
    sim.append(&log, vec![100]).unwrap();
    // Hold the writer inside its next write until a burst of appends is queued, so
    // that it takes them all into its following write; crash at the fdatasync after
    // that write.
    let released = Arc::new(AtomicBool::new(false));
    let gate = Arc::clone(&released);
    let blocked = Arc::new(AtomicBool::new(false));
    let in_write = Arc::clone(&blocked);
    let mut phase = 0;
    sim.disk.arm(Some(crash_on(move |op| {
        let data_write = matches!(op, FsOp::Write { path, offset, data }
            if is_log(path) && *offset > 0 && data.iter().any(|&b| b != 0));
        match phase {
            0 if data_write => {
                in_write.store(true, Ordering::Release);
                while !gate.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                phase = 1;
                false
            }
            1 if data_write => {
                phase = 2;
                false
            }
            2 => matches!(op, FsOp::SyncData { .. }),
            _ => false,
        }
    })));
    let (_, recs) = sim.exp.batch(vec![10]);
    log.append_detached(&recs).unwrap();
    while !blocked.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(delay_ms));
        released.store(true, Ordering::Release);
    });
    let results = sim.burst(&log, vec![vec![200], vec![1, 2, 3], vec![900], vec![64; 5]]);
    opener.join().unwrap();
    assert!(
        results.iter().all(Result::is_err),
        "{results:?} {:#?}",
        sim.disk.trace()
    );
    drop(log);
    sim.disk.check_matches_real_dir().unwrap();
    let trace = sim.disk.trace();
    let last_write = trace
        .iter()
        .rfind(|t| t.contains(".log @") && !t.contains("zeros") && !t.contains(" @0 "))
        .unwrap_or_else(|| panic!("no data write in {trace:#?}"))
        .clone();
    let last_len: usize = last_write
        .rsplit('+')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The four batches of the burst frame to ~1.7 KB together.
    (sim, trace, last_len)
}

/// One write holding several batches (group commit), torn at every byte, and torn
/// per sector in random ways: recovery keeps a prefix of whole batches.
#[test]
fn a_torn_write_in_the_middle_of_a_batch_group_is_all_or_nothing_per_batch() {
    let mut rng = fastrand::Rng::with_seed(2);
    // The grouping depends on the scheduler: retry with more time if it split.
    let (sim, trace, last_len) = [200, 600, 1500]
        .into_iter()
        .map(crash_after_a_grouped_write)
        .find(|(_, _, len)| *len > 1500)
        .expect("the burst was never taken into one write");
    let mut cases = 0;
    for cut in 0..=last_len {
        let (mut s2, what) = sim.fork_power_loss(
            &mut rng,
            &Forced {
                dir_prefix: None,
                outcome: Some(FileOutcome::Torn),
                torn_last_write_at: Some(cut),
            },
        );
        s2.recover_and_check()
            .unwrap_or_else(|e| panic!("cut {cut} ({what}): {e}\ntrace {trace:#?}"));
        cases += 1;
    }
    for i in 0..200 {
        let (mut s2, what) = sim.fork_power_loss(
            &mut rng,
            &Forced {
                outcome: Some(FileOutcome::Sectors),
                ..Forced::default()
            },
        );
        s2.recover_and_verify()
            .unwrap_or_else(|e| panic!("sectors {i} ({what}): {e}"));
        cases += 1;
    }
    println!("torn group write: {cases} power-loss states verified");
}

/// Runs `workload` once to learn its operations, then once per operation with a
/// crash before it, and checks many power-loss outcomes of each crash, plus a
/// process crash followed by recovery and a power loss.
fn crash_at_every_step(
    name: &str,
    seed: u64,
    prepare: &dyn Fn(&mut Sim, &Log),
    workload: &dyn Fn(&mut Sim, &Log),
    must_contain: &[&str],
) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Dry run.
    let mut sim = Sim::new(small_cfg());
    let log = sim.open().unwrap();
    prepare(&mut sim, &log);
    sim.disk.arm(None);
    workload(&mut sim, &log);
    let trace = sim.disk.trace();
    drop(log);
    for want in must_contain {
        assert!(
            trace.iter().any(|t| t.contains(want)),
            "{name}: no `{want}` in {trace:#?}"
        );
    }
    let mut cases = 0;
    for step in 0..=trace.len() {
        let mut sim = Sim::new(small_cfg());
        let log = sim.open().unwrap();
        prepare(&mut sim, &log);
        sim.disk.arm(Some(crash_at(step as u64)));
        workload(&mut sim, &log);
        sim.disk.crash_now();
        let at = sim.disk.crashed().unwrap();
        drop(log);
        sim.disk.check_matches_real_dir().unwrap();
        let pending = sim.disk.pending_dir_ops();
        let mut outcomes: Vec<Forced> = Vec::new();
        for p in 0..=pending {
            for outcome in [FileOutcome::Lost, FileOutcome::Kept] {
                outcomes.push(Forced {
                    dir_prefix: Some(p),
                    outcome: Some(outcome),
                    torn_last_write_at: None,
                });
            }
            for _ in 0..3 {
                outcomes.push(Forced {
                    dir_prefix: Some(p),
                    ..Forced::default()
                });
            }
        }
        for forced in &outcomes {
            let (mut s2, what) = sim.fork_power_loss(&mut rng, forced);
            s2.recover_and_verify().unwrap_or_else(|e| {
                panic!("{name}: crash at {at}, power loss {what}: {e}\ntrace {trace:#?}")
            });
            cases += 1;
        }
        // A process crash here, recovery, a few appends, then a power loss.
        for k in 0..4 {
            let mut s2 = sim.fork_process_crash();
            let log = s2
                .open()
                .unwrap_or_else(|e| panic!("{name}: crash at {at}: {e}"));
            check(&log, &mut s2.exp)
                .unwrap_or_else(|e| panic!("{name}: process crash at {at}: {e}"));
            for n in 0..k {
                s2.append(&log, vec![50 + n * 10]).unwrap();
            }
            s2.disk.crash_now();
            drop(log);
            let what = s2.power_loss(&mut rng, &Forced::default()).unwrap();
            s2.recover_and_verify().unwrap_or_else(|e| {
                panic!(
                    "{name}: process crash at {at}, recovery, {k} appends, power loss {what}: {e}"
                )
            });
            cases += 1;
        }
    }
    cases
}

fn fill_until_next_append_rolls(sim: &mut Sim, log: &Log, size: usize) {
    loop {
        let before = log.size_bytes();
        // A record of `size` bytes frames to about size + 60 bytes.
        if before + size as u64 + 100 > sim.cfg.segment_bytes {
            return;
        }
        sim.append(log, vec![size]).unwrap();
    }
}

/// Every step of a segment roll: syncing and trimming the full segment, writing its
/// index (temp file, fsync, rename), creating the next segment (header, fsync) and
/// the directory fsync, then the first write into the new segment.
#[test]
fn crash_at_every_step_of_a_segment_roll() {
    let cases = crash_at_every_step(
        "roll",
        3,
        &|sim, log| fill_until_next_append_rolls(sim, log, 300),
        &|sim, log| {
            let _ = sim.append(log, vec![400]);
            let _ = sim.append(log, vec![10]);
        },
        &[
            "set_len 00000000000000000000.log",
            "fdatasync 00000000000000000000.log",
            "open 00000000000000000000.idx.tmp create truncate",
            "write 00000000000000000000.idx.tmp",
            "fsync 00000000000000000000.idx.tmp",
            "rename 00000000000000000000.idx.tmp -> 00000000000000000000.idx",
            ".log create truncate",
            "fsync dir",
        ],
    );
    assert!(cases > 100, "{cases}");
    println!("segment roll: {cases} crash states verified");
}

/// Every step of a retention pass deleting two segments: between the segment file
/// and the index of one segment, between segments, and before the directory fsync.
#[test]
fn crash_at_every_step_of_retention() {
    let cases = crash_at_every_step(
        "retention",
        4,
        &|sim, log| {
            while log.segment_count() < 5 {
                sim.append(log, vec![250, 250]).unwrap();
            }
        },
        &|sim, log| {
            // Delete everything older than the third segment's first batch.
            let st = log
                .read(log.start_offset(), usize::MAX, usize::MAX)
                .unwrap();
            let mut firsts: Vec<i64> = Vec::new();
            let mut last_ts = i64::MIN;
            for r in st {
                if r.timestamp_ms != last_ts {
                    firsts.push(r.timestamp_ms);
                    last_ts = r.timestamp_ms;
                }
            }
            // Batches are ~560 B, so ~7 per 4 KiB segment; the cutoff at batch 15
            // expires the first two segments.
            let cutoff = firsts[15];
            sim.exp.cutoff = sim.exp.cutoff.max(cutoff);
            let _ = log.enforce_retention(now_for_cutoff(cutoff));
        },
        &[
            "unlink 00000000000000000000.log",
            "unlink 00000000000000000000.idx",
            "fsync dir",
        ],
    );
    assert!(cases > 20, "{cases}");
    println!("retention: {cases} crash states verified");
}

/// Every step of recovery itself (removing leftovers, rebuilding an index, cutting a
/// torn tail), crashed and recovered again.
#[test]
fn crash_at_every_step_of_recovery() {
    let mut rng = fastrand::Rng::with_seed(5);
    // A directory needing every kind of repair.
    let mut sim = Sim::new(small_cfg());
    let log = sim.open().unwrap();
    while log.segment_count() < 3 {
        sim.append(&log, vec![200]).unwrap();
    }
    sim.append(&log, vec![100]).unwrap();
    drop(log);
    let mut image = disk::read_image(sim.dir.path());
    let idx: Vec<String> = image
        .keys()
        .filter(|n| n.ends_with(".idx"))
        .cloned()
        .collect();
    let second_idx = idx[1].clone();
    let content = image.remove(&second_idx).unwrap();
    image.insert(format!("{second_idx}.tmp"), content[..10].to_vec());
    image.insert("00000000000000099999.idx".into(), vec![1, 2, 3]);
    let active = image.keys().rfind(|n| n.ends_with(".log")).unwrap().clone();
    image
        .get_mut(&active)
        .unwrap()
        .extend_from_slice(&[0x55; 37]);
    image.get_mut(&active).unwrap().extend_from_slice(&[0; 500]);
    let base = Sim::with_image(small_cfg(), &image, sim.exp.clone());
    // Dry run of recovery.
    base.disk.arm(None);
    let probe = base.fork_process_crash();
    probe.disk.arm(None);
    drop(probe.open().unwrap());
    let trace = probe.disk.trace();
    for want in [
        "unlink 00000000000000099999.idx",
        ".idx.tmp create",
        "rename",
        "set_len",
    ] {
        assert!(
            trace.iter().any(|t| t.contains(want)),
            "no `{want}` in {trace:#?}"
        );
    }
    let mut cases = 0;
    for step in 0..trace.len() {
        let s = base.fork_process_crash();
        s.disk.arm(Some(crash_at(step as u64)));
        match s.open() {
            Ok(log) => {
                s.disk.crash_now();
                drop(log);
            }
            Err(_) => assert!(s.disk.crashed().is_some()),
        }
        let at = s.disk.crashed().unwrap();
        for i in 0..12 {
            let (mut s2, what) = s.fork_power_loss(&mut rng, &Forced::default());
            s2.recover_and_verify()
                .unwrap_or_else(|e| panic!("crash in recovery at {at} ({i}: {what}): {e}"));
            cases += 1;
        }
    }
    assert!(cases > 50, "{cases}");
    println!("recovery: {cases} crash states verified");
}

/// Regression: after a process crash (not a power loss) the page cache still holds
/// a batch that was written but never fsynced. Recovery serves it, so it must make it
/// durable first; a power loss right after recovery used to lose it.
#[test]
fn recovery_after_a_process_crash_makes_what_it_serves_durable() {
    let mut rng = fastrand::Rng::with_seed(9);
    let mut sim = Sim::new(small_cfg());
    let log = sim.open().unwrap();
    sim.append(&log, vec![100]).unwrap();
    // A batch larger than a segment gets a segment of its own, without zero-filled
    // preallocation after it: recovery finds nothing to cut (cutting fsyncs anyway).
    sim.disk.arm(Some(crash_on(
        |op| matches!(op, FsOp::SyncData { path } if !path.ends_with("00000000000000000000.log")),
    )));
    assert!(sim.append(&log, vec![5000]).is_err());
    drop(log);
    let mut s2 = sim.fork_process_crash();
    let log = s2.open().unwrap();
    assert_eq!(
        check(&log, &mut s2.exp).unwrap(),
        2,
        "recovery serves the unsynced batch"
    );
    s2.disk.crash_now();
    drop(log);
    s2.power_loss(
        &mut rng,
        &Forced {
            outcome: Some(FileOutcome::Lost),
            ..Forced::default()
        },
    )
    .unwrap();
    s2.recover_and_verify().unwrap();
}

/// Regression: a process crash between creating the next segment and the directory
/// fsync of a roll. Recovery adopts the new file as the active segment; appends to it
/// are acknowledged after an fdatasync of the file only, so recovery must fsync the
/// directory, or a power loss later drops the file with those appends.
#[test]
fn recovery_makes_the_entry_of_a_segment_created_before_a_process_crash_durable() {
    let mut rng = fastrand::Rng::with_seed(10);
    let mut sim = Sim::new(small_cfg());
    let log = sim.open().unwrap();
    fill_until_next_append_rolls(&mut sim, &log, 300);
    sim.disk
        .arm(Some(crash_on(|op| matches!(op, FsOp::SyncDir { .. }))));
    assert!(sim.append(&log, vec![400]).is_err());
    drop(log);
    let mut s2 = sim.fork_process_crash();
    let log = s2.open().unwrap();
    check(&log, &mut s2.exp).unwrap();
    s2.append(&log, vec![10]).unwrap();
    s2.disk.crash_now();
    drop(log);
    s2.power_loss(
        &mut rng,
        &Forced {
            dir_prefix: Some(0),
            outcome: Some(FileOutcome::Kept),
            ..Forced::default()
        },
    )
    .unwrap();
    s2.recover_and_verify().unwrap();
}

// ---------------------------------------------------------------------------------
// Injected I/O errors.

/// A write failing with ENOSPC is undone; later appends work and a power loss
/// afterwards keeps every acknowledged append.
#[test]
fn a_failed_write_is_undone_and_later_appends_are_durable() {
    let mut rng = fastrand::Rng::with_seed(6);
    for seed in 0..20 {
        let mut sim = Sim::new(small_cfg());
        let log = sim.open().unwrap();
        for _ in 0..(seed % 4) {
            sim.append(&log, vec![120]).unwrap();
        }
        let mut once = true;
        sim.disk.set_failer(Some(Box::new(move |op| {
            if let FsOp::Write { path, .. } = op
                && is_log(path)
                && std::mem::take(&mut once)
            {
                return Some(enospc());
            }
            None
        })));
        let err = sim.append(&log, vec![300]).unwrap_err();
        assert!(err.is_storage_full(), "{err}");
        sim.disk.set_failer(None);
        for _ in 0..3 {
            sim.append(&log, vec![200]).unwrap();
        }
        sim.disk
            .arm(Some(crash_on(|op| matches!(op, FsOp::SyncData { .. }))));
        let _ = sim.append(&log, vec![50]);
        drop(log);
        let what = sim.power_loss(&mut rng, &Forced::default()).unwrap();
        sim.recover_and_verify()
            .unwrap_or_else(|e| panic!("seed {seed} ({what}): {e}"));
    }
}

/// A failed fdatasync poisons the log; after a power loss the acknowledged appends
/// are all there and the reopened log works.
#[test]
fn a_failed_fsync_poisons_and_recovery_keeps_the_acknowledged() {
    let mut rng = fastrand::Rng::with_seed(7);
    for seed in 0..20 {
        let mut sim = Sim::new(small_cfg());
        let log = sim.open().unwrap();
        for _ in 0..(seed % 5) {
            sim.append(&log, vec![150]).unwrap();
        }
        sim.disk.set_failer(Some(Box::new(|op| {
            matches!(op, FsOp::SyncData { .. }).then(|| io::Error::from_raw_os_error(5))
        })));
        assert!(sim.append(&log, vec![10]).is_err());
        sim.disk.set_failer(None);
        assert!(matches!(
            sim.append(&log, vec![10]),
            Err(LogError::Poisoned(_))
        ));
        sim.disk.crash_now();
        drop(log);
        let what = sim.power_loss(&mut rng, &Forced::default()).unwrap();
        sim.recover_and_verify()
            .unwrap_or_else(|e| panic!("seed {seed} ({what}): {e}"));
    }
}

/// A roll that fails after creating the next segment file (here: ENOSPC on its
/// header) must not let smaller appends continue in the old segment: after a restart
/// the newer file would be taken as the active segment, starting at an offset the
/// old segment has since used.
#[test]
fn a_failed_roll_does_not_leave_a_successor_behind_later_appends() {
    let mut rng = fastrand::Rng::with_seed(8);
    for fail_at in ["header", "segment fsync", "dir fsync", "index"] {
        let mut sim = Sim::new(small_cfg());
        let log = sim.open().unwrap();
        // Leave 340..700 bytes free: room for small batches, not for a big one.
        while log.size_bytes() + 700 <= sim.cfg.segment_bytes {
            sim.append(&log, vec![300]).unwrap();
        }
        let mut once = true;
        sim.disk.set_failer(Some(Box::new(move |op| {
            let hit = match op {
                FsOp::Write { path, offset, .. } => {
                    (fail_at == "header" && is_log(path) && *offset == 0)
                        || (fail_at == "index" && path.to_string_lossy().ends_with(".idx.tmp"))
                }
                FsOp::SyncAll { path } => {
                    fail_at == "segment fsync"
                        && is_log(path)
                        && !path.ends_with("00000000000000000000.log")
                }
                FsOp::SyncDir { .. } => fail_at == "dir fsync",
                _ => false,
            };
            (hit && std::mem::take(&mut once)).then(enospc)
        })));
        // A batch that needs a roll: the roll fails.
        assert!(sim.append(&log, vec![1500]).is_err(), "{fail_at}");
        sim.disk.set_failer(None);
        // A small batch that would still fit into the old segment, then more.
        for n in 0..6 {
            sim.append(&log, vec![10 + n])
                .unwrap_or_else(|e| panic!("{fail_at}: append after the failed roll: {e}"));
        }
        check(&log, &mut sim.exp).unwrap();
        drop(log);
        // A clean restart first, then the same after a power loss.
        let mut clean = Sim::with_image(
            small_cfg(),
            &disk::read_image(sim.dir.path()),
            sim.exp.clone(),
        );
        clean
            .recover_and_verify()
            .unwrap_or_else(|e| panic!("{fail_at}: clean restart: {e}"));
        sim.disk.crash_now();
        let what = sim.power_loss(&mut rng, &Forced::default()).unwrap();
        sim.recover_and_verify()
            .unwrap_or_else(|e| panic!("{fail_at}: power loss ({what}): {e}"));
    }
}

// ---------------------------------------------------------------------------------
// Seeded random test.

#[derive(Debug, Default)]
struct CaseStats {
    crashes: u64,
    in_workload: u64,
    in_recovery: u64,
    idle: u64,
    process_crashes: u64,
    acked: u64,
}

/// Random appends (single, batches, concurrent bursts), retention passes, syncs,
/// injected ENOSPC and clean reopens; a crash at a random operation (of the workload
/// or of recovery) or while idle; then a power loss, or a process crash whose
/// unsynced state a later power loss may still lose. Several rounds per case.
fn run_case(seed: u64, interval: bool) -> Result<CaseStats, String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut stats = CaseStats::default();
    let cfg = LogConfig {
        segment_bytes: if rng.bool() { 4096 } else { 8192 },
        index_interval_bytes: rng.u64(32..1024),
        segment_max_age: None,
        max_record_bytes: 4096,
        max_batch_bytes: 6000,
        fsync: if interval {
            FsyncPolicy::Interval(Duration::from_millis(rng.u64(1..5)))
        } else {
            FsyncPolicy::Always
        },
        retention: Retention {
            max_age: Some(Duration::from_secs(1000)),
            max_bytes: None,
        },
    };
    let mut sim = Sim::new(cfg);
    let rounds = rng.usize(3..8);
    let mut history: Vec<String> = Vec::new();
    let ctx = |h: &Vec<String>, e: String| format!("{e}\nhistory:\n  {}", h.join("\n  "));
    for round in 0..rounds {
        // Open, perhaps crashing during recovery.
        let recovery_crash = rng.u8(..) < 50;
        if recovery_crash {
            sim.disk.arm(Some(crash_at(rng.u64(0..16))));
        } else {
            sim.disk.arm(None);
        }
        let opened = sim.open();
        let log = match opened {
            Err(e) if sim.disk.crashed().is_none() => {
                return Err(ctx(&history, format!("round {round}: {e}")));
            }
            Err(_) => None,
            Ok(log) if sim.disk.crashed().is_some() => {
                drop(log);
                None
            }
            Ok(log) => Some(log),
        };
        let Some(log) = log else {
            stats.in_recovery += 1;
            history.push(format!(
                "round {round}: crash in recovery at {}",
                sim.disk.crashed().unwrap()
            ));
            crash(&mut sim, &mut rng, &mut stats, &mut history).map_err(|e| ctx(&history, e))?;
            continue;
        };
        sim.disk.arm(None);
        check(&log, &mut sim.exp)
            .map_err(|e| ctx(&history, format!("round {round}, after recovery: {e}")))?;
        let mut log = Some(log);
        let actions = rng.usize(1..30);
        let crash_op = rng.u64(0..(actions as u64 * 4 + 10));
        sim.disk.arm(Some(crash_at(crash_op)));
        history.push(format!(
            "round {round}: {actions} actions, crash at op {crash_op}"
        ));
        for _ in 0..actions {
            let Some(l) = log.as_ref() else { break };
            let mut errors_allowed = false;
            let mut results: Vec<Result<AppendAck, LogError>> = Vec::new();
            match rng.u8(0..100) {
                0..45 => {
                    let size = if rng.u8(..) < 20 {
                        rng.usize(500..3000)
                    } else {
                        rng.usize(0..300)
                    };
                    results.push(sim.append(l, vec![size]));
                }
                45..70 => {
                    let sizes = (0..rng.usize(2..8)).map(|_| rng.usize(0..400)).collect();
                    results.push(sim.append(l, sizes));
                }
                70..82 => {
                    let batches = (0..rng.usize(2..5))
                        .map(|_| (0..rng.usize(1..4)).map(|_| rng.usize(0..300)).collect())
                        .collect();
                    results = sim.burst(l, batches);
                }
                82..88 => {
                    let lo = sim.exp.cutoff;
                    let hi = i64::try_from(sim.exp.next_id).unwrap() + 1;
                    let cutoff = if hi > lo { rng.i64(lo..=hi) } else { lo };
                    sim.exp.cutoff = cutoff;
                    history.push(format!("  retention, cutoff {cutoff}"));
                    if let Err(e) = l.enforce_retention(now_for_cutoff(cutoff))
                        && sim.disk.crashed().is_none()
                    {
                        return Err(ctx(&history, format!("retention failed: {e}")));
                    }
                }
                88..93 => match l.sync_blocking() {
                    Ok(()) => sim.exp.synced(),
                    Err(e) if sim.disk.crashed().is_none() => {
                        return Err(ctx(&history, format!("sync failed: {e}")));
                    }
                    Err(_) => {}
                },
                93..96 => {
                    errors_allowed = true;
                    history.push("  ENOSPC on the next segment write".into());
                    let mut once = true;
                    sim.disk.set_failer(Some(Box::new(move |op| {
                        (matches!(op, FsOp::Write { path, .. } if is_log(path))
                            && std::mem::take(&mut once))
                        .then(enospc)
                    })));
                    results.push(sim.append(l, vec![rng.usize(0..200)]));
                    sim.disk.set_failer(None);
                }
                _ => {
                    // Clean close and reopen (either may crash).
                    history.push("  clean close and reopen".into());
                    drop(log.take());
                    if sim.disk.crashed().is_none() {
                        match sim.open() {
                            Ok(l) => {
                                if sim.disk.crashed().is_none() {
                                    sim.exp.synced();
                                    check(&l, &mut sim.exp).map_err(|e| {
                                        ctx(&history, format!("round {round}, clean reopen: {e}"))
                                    })?;
                                }
                                log = Some(l);
                            }
                            Err(e) if sim.disk.crashed().is_none() => {
                                return Err(ctx(&history, format!("clean reopen: {e}")));
                            }
                            Err(_) => {}
                        }
                    }
                }
            }
            for r in &results {
                if let Err(e) = r
                    && sim.disk.crashed().is_none()
                    && !errors_allowed
                {
                    return Err(ctx(&history, format!("append failed without a crash: {e}")));
                }
            }
            if sim.disk.crashed().is_some() {
                break;
            }
        }
        if let Some(at) = sim.disk.crashed() {
            stats.in_workload += 1;
            history.push(format!("  crashed at {at}"));
        } else {
            stats.idle += 1;
            sim.disk.crash_now();
            history.push("  crashed while idle".into());
        }
        drop(log);
        crash(&mut sim, &mut rng, &mut stats, &mut history).map_err(|e| ctx(&history, e))?;
    }
    sim.disk.arm(None);
    sim.recover_and_verify()
        .map_err(|e| ctx(&history, format!("final recovery: {e}")))?;
    stats.acked = sim.exp.durable.len() as u64;
    Ok(stats)
}

/// After the crash: a power loss (3 in 4), or a process crash (the page cache
/// survives, and so does the simulated disk's record of what is not durable yet).
fn crash(
    sim: &mut Sim,
    rng: &mut fastrand::Rng,
    stats: &mut CaseStats,
    history: &mut Vec<String>,
) -> Result<(), String> {
    stats.crashes += 1;
    if rng.u8(0..4) == 0 {
        sim.disk.check_matches_real_dir()?;
        sim.disk.resume();
        stats.process_crashes += 1;
        history.push("  process crash".into());
    } else {
        let what = sim.power_loss(rng, &Forced::default())?;
        history.push(format!("  power loss: {what}"));
    }
    // Nothing acknowledged as buffered survives a crash as a promise.
    sim.exp.buffered.clear();
    Ok(())
}

fn random_cases(interval: bool, default_cases: u64, salt: u64) {
    let cases: u64 = std::env::var("CAREBUS_POWER_LOSS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let seeds: Vec<u64> = match std::env::var("CAREBUS_POWER_LOSS_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let base = fastrand::u64(..) & 0xffff_ffff;
            (0..cases).map(|i| (base + i) ^ salt).collect()
        }
    };
    let mut total = CaseStats::default();
    for seed in seeds {
        let s = run_case(seed, interval).unwrap_or_else(|e| {
            panic!(
                "power-loss case failed; rerun with CAREBUS_POWER_LOSS_SEED={seed} \
                 (interval policy: {interval})\n{e}"
            )
        });
        total.crashes += s.crashes;
        total.in_workload += s.in_workload;
        total.in_recovery += s.in_recovery;
        total.idle += s.idle;
        total.process_crashes += s.process_crashes;
        total.acked += s.acked;
    }
    println!("random power-loss cases (interval: {interval}): {total:?}");
}

#[test]
fn random_crashes_fsync_always() {
    random_cases(false, 400, 0);
}

#[test]
fn random_crashes_fsync_interval() {
    random_cases(true, 250, 1 << 40);
}
