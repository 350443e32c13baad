//! A simulated disk under one log directory, fed by the log's file-system hook.
//!
//! It keeps, per file (inode), the content that is durable (as of the file's last
//! fsync/fdatasync) and the writes and truncations made since, in order; and per
//! directory the entries that are durable (as of its last fsync) and the creations,
//! renames and unlinks made since, in order. From that it produces the states a
//! power loss may leave on a journaling Linux file system (ext4 `data=ordered` or
//! `data=writeback`, xfs):
//!
//! * directory operations not yet made durable by an fsync of the directory survive
//!   as a prefix, in the order they were made (the journal commits metadata in order);
//! * a file holds its durable content, overlaid with its unsynced operations in one
//!   of these ways: none of them, all of them, a prefix of them, a prefix followed by
//!   a byte-torn part of the next write, or, per 512-byte sector independently, the
//!   sector's content after any number of them (writeback reorders and tears pages),
//!   with the file's length after any number of them. Space the file gained after its
//!   last sync but whose data never reached the disk reads as zeros, or (rarely, like
//!   ext4 `data=writeback`) as garbage. Durable bytes never change.
//!
//! A crash is declared by a trigger: the operation it fires on fails with an error
//! and is not performed, and so does every later operation, so the log's background
//! threads cannot touch the disk after the crash.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use carebus_log::fault::{FsHook, FsOp};

pub const SECTOR: usize = 512;

/// Decides whether to crash before an operation: called with the operation's index
/// (counted from the last [`Disk::arm`]) and the operation.
pub type Trigger = Box<dyn FnMut(u64, &FsOp<'_>) -> bool + Send>;

/// Decides whether an operation fails with an injected error (without a crash).
pub type Failer = Box<dyn FnMut(&FsOp<'_>) -> Option<io::Error> + Send>;

#[derive(Clone, Debug)]
enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

impl FileOp {
    fn apply(&self, v: &mut Vec<u8>) {
        match self {
            FileOp::Write { offset, data } => write_into(v, *offset, data),
            FileOp::SetLen(len) => v.resize(to_usize(*len), 0),
        }
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap()
}

fn write_into(v: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = to_usize(offset);
    let end = start + data.len();
    if v.len() < end {
        v.resize(end, 0);
    }
    v[start..end].copy_from_slice(data);
}

#[derive(Clone, Debug, Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    volatile: Vec<FileOp>,
}

#[derive(Clone, Debug)]
enum DirOp {
    Create(String, u64),
    Rename(String, String),
    Remove(String),
}

fn apply_dir_op(entries: &mut BTreeMap<String, u64>, op: &DirOp) {
    match op {
        DirOp::Create(name, ino) => {
            entries.insert(name.clone(), *ino);
        }
        DirOp::Rename(from, to) => {
            if let Some(ino) = entries.remove(from) {
                entries.insert(to.clone(), ino);
            }
        }
        DirOp::Remove(name) => {
            entries.remove(name);
        }
    }
}

/// How the unsynced operations of a file end up after the power loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileOutcome {
    /// Only the durable content.
    Lost,
    /// Everything written (as if the disk had caught up).
    Kept,
    /// The first k unsynced operations.
    Prefix,
    /// The first k, then a byte prefix of the next write.
    Torn,
    /// Each sector independently at some version; length at some version.
    Sectors,
}

pub const ALL_OUTCOMES: [FileOutcome; 5] = [
    FileOutcome::Lost,
    FileOutcome::Kept,
    FileOutcome::Prefix,
    FileOutcome::Torn,
    FileOutcome::Sectors,
];

/// Choices forced on a power loss; the rest is random.
#[derive(Clone, Debug, Default)]
pub struct Forced {
    /// How many of the pending directory operations survive.
    pub dir_prefix: Option<usize>,
    /// The same outcome for every file.
    pub outcome: Option<FileOutcome>,
    /// For `Torn`: tear the last unsynced write after this many bytes.
    pub torn_last_write_at: Option<usize>,
}

/// File name → content.
pub type Image = BTreeMap<String, Vec<u8>>;

struct State {
    next_ino: u64,
    inodes: HashMap<u64, Inode>,
    durable_entries: BTreeMap<String, u64>,
    entries: BTreeMap<String, u64>,
    pending: Vec<DirOp>,
    ops: u64,
    trigger: Option<Trigger>,
    failer: Option<Failer>,
    crashed: Option<String>,
    trace: Vec<String>,
    anomalies: Vec<String>,
}

/// The simulated disk of one log directory. Install it with
/// `carebus_log::fault::install_hook(dir, disk)`.
pub struct Disk {
    dir: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk").field("dir", &self.dir).finish()
    }
}

pub fn describe(op: &FsOp<'_>) -> String {
    let n = |p: &Path| {
        p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    match op {
        FsOp::CreateDir { path } => format!("mkdir {}", n(path)),
        FsOp::Open { path, mode } => format!(
            "open {}{}{}",
            n(path),
            if mode.create { " create" } else { "" },
            if mode.truncate { " truncate" } else { "" }
        ),
        FsOp::Write { path, offset, data } => {
            let zeros = if data.iter().all(|&b| b == 0) {
                " (zeros)"
            } else {
                ""
            };
            format!("write {} @{offset} +{}{zeros}", n(path), data.len())
        }
        FsOp::SetLen { path, len } => format!("set_len {} {len}", n(path)),
        FsOp::SyncData { path } => format!("fdatasync {}", n(path)),
        FsOp::SyncAll { path } => format!("fsync {}", n(path)),
        FsOp::SyncDir { .. } => "fsync dir".to_string(),
        FsOp::Rename { from, to } => format!("rename {} -> {}", n(from), n(to)),
        FsOp::Remove { path } => format!("unlink {}", n(path)),
        FsOp::ReadDir { .. } => "readdir".to_string(),
    }
}

impl Disk {
    /// A disk whose current content (the files in `dir`) is all durable.
    pub fn from_dir(dir: &Path) -> Disk {
        let disk = Disk {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                next_ino: 1,
                inodes: HashMap::new(),
                durable_entries: BTreeMap::new(),
                entries: BTreeMap::new(),
                pending: Vec::new(),
                ops: 0,
                trigger: None,
                failer: None,
                crashed: None,
                trace: Vec::new(),
                anomalies: Vec::new(),
            }),
        };
        disk.reset(&read_image(dir));
        disk
    }

    /// Forgets all history: `image` is what the disk durably holds.
    pub fn reset(&self, image: &Image) {
        let mut s = self.state.lock().unwrap();
        s.inodes.clear();
        s.entries.clear();
        s.pending.clear();
        for (name, content) in image {
            let ino = s.next_ino;
            s.next_ino += 1;
            s.inodes.insert(
                ino,
                Inode {
                    durable: content.clone(),
                    current: content.clone(),
                    volatile: Vec::new(),
                },
            );
            s.entries.insert(name.clone(), ino);
        }
        s.durable_entries = s.entries.clone();
        s.crashed = None;
        s.trigger = None;
        s.failer = None;
        s.ops = 0;
        s.trace.clear();
    }

    /// A copy of the model (history included) for another directory holding the same files.
    pub fn fork(&self, dir: &Path) -> Disk {
        let s = self.state.lock().unwrap();
        Disk {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                next_ino: s.next_ino,
                inodes: s.inodes.clone(),
                durable_entries: s.durable_entries.clone(),
                entries: s.entries.clone(),
                pending: s.pending.clone(),
                ops: 0,
                trigger: None,
                failer: None,
                crashed: None,
                trace: Vec::new(),
                anomalies: Vec::new(),
            }),
        }
    }

    /// Restarts the operation count and the trace, and sets (or clears) the crash trigger.
    pub fn arm(&self, trigger: Option<Trigger>) {
        let mut s = self.state.lock().unwrap();
        s.ops = 0;
        s.trace.clear();
        s.trigger = trigger;
    }

    pub fn set_failer(&self, failer: Option<Failer>) {
        self.state.lock().unwrap().failer = failer;
    }

    /// Declares a crash now (the power fails while the log is idle).
    pub fn crash_now(&self) {
        let mut s = self.state.lock().unwrap();
        if s.crashed.is_none() {
            s.crashed = Some("idle".into());
        }
    }

    /// After a process crash (no power loss): the disk works again and keeps its
    /// unsynced state.
    pub fn resume(&self) {
        let mut s = self.state.lock().unwrap();
        s.crashed = None;
        s.trigger = None;
        s.failer = None;
    }

    /// The operation the crash happened at, if it did.
    pub fn crashed(&self) -> Option<String> {
        self.state.lock().unwrap().crashed.clone()
    }

    /// Operations seen since the last `arm`.
    pub fn trace(&self) -> Vec<String> {
        self.state.lock().unwrap().trace.clone()
    }

    /// Pending (not yet durable) directory operations.
    pub fn pending_dir_ops(&self) -> usize {
        self.state.lock().unwrap().pending.len()
    }

    /// Checks that the model agrees with the real directory (every operation that
    /// changed it was seen). Returns the differences.
    pub fn check_matches_real_dir(&self) -> Result<(), String> {
        let s = self.state.lock().unwrap();
        if !s.anomalies.is_empty() {
            return Err(format!("model anomalies: {:?}", s.anomalies));
        }
        let real = read_image(&self.dir);
        let model: Image = s
            .entries
            .iter()
            .map(|(n, ino)| (n.clone(), s.inodes[ino].current.clone()))
            .collect();
        if real.keys().ne(model.keys()) {
            return Err(format!(
                "model has files {:?}, the directory {:?}",
                model.keys().collect::<Vec<_>>(),
                real.keys().collect::<Vec<_>>()
            ));
        }
        for (name, content) in &real {
            if model[name] != *content {
                return Err(format!(
                    "{name}: model has {} bytes, the file {} bytes (or different content)",
                    model[name].len(),
                    content.len()
                ));
            }
        }
        Ok(())
    }

    /// A state the directory may be in after a power loss now.
    pub fn power_loss_image(&self, rng: &mut fastrand::Rng, forced: &Forced) -> (Image, String) {
        let s = self.state.lock().unwrap();
        let p = forced
            .dir_prefix
            .unwrap_or_else(|| rng.usize(0..=s.pending.len()))
            .min(s.pending.len());
        let mut entries = s.durable_entries.clone();
        for op in &s.pending[..p] {
            apply_dir_op(&mut entries, op);
        }
        let mut what = format!("dir ops kept {p}/{}", s.pending.len());
        let mut image = Image::new();
        for (name, ino) in &entries {
            let inode = &s.inodes[ino];
            let outcome = forced
                .outcome
                .unwrap_or_else(|| ALL_OUTCOMES[rng.usize(0..ALL_OUTCOMES.len())]);
            let (content, how) = file_after_power_loss(inode, outcome, rng, forced);
            if !inode.volatile.is_empty() {
                what.push_str(&format!("; {name}: {how}"));
            }
            image.insert(name.clone(), content);
        }
        (image, what)
    }

    /// What the directory holds now, durable or not (what a process crash leaves).
    pub fn current_image(&self) -> Image {
        let s = self.state.lock().unwrap();
        s.entries
            .iter()
            .map(|(n, ino)| (n.clone(), s.inodes[ino].current.clone()))
            .collect()
    }

    fn name_in_dir(&self, p: &Path) -> Option<String> {
        (p.parent() == Some(self.dir.as_path()))
            .then(|| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .flatten()
    }

    fn apply(&self, s: &mut State, op: &FsOp<'_>) {
        let file_op = |s: &mut State, path: &Path, fop: FileOp| {
            let Some(name) = self.name_in_dir(path) else {
                s.anomalies
                    .push(format!("write outside the directory: {}", path.display()));
                return;
            };
            let Some(ino) = s.entries.get(&name).copied() else {
                s.anomalies.push(format!("write to unknown file {name}"));
                return;
            };
            let inode = s.inodes.get_mut(&ino).unwrap();
            fop.apply(&mut inode.current);
            inode.volatile.push(fop);
        };
        let sync = |s: &mut State, path: &Path| {
            let Some(ino) = self
                .name_in_dir(path)
                .and_then(|n| s.entries.get(&n).copied())
            else {
                s.anomalies
                    .push(format!("sync of unknown file {}", path.display()));
                return;
            };
            let inode = s.inodes.get_mut(&ino).unwrap();
            inode.durable = inode.current.clone();
            inode.volatile.clear();
        };
        match op {
            FsOp::CreateDir { .. } | FsOp::ReadDir { .. } => {}
            FsOp::Open { path, mode } => {
                if !(mode.create || mode.truncate) {
                    return;
                }
                let Some(name) = self.name_in_dir(path) else {
                    s.anomalies
                        .push(format!("open outside the directory: {}", path.display()));
                    return;
                };
                if !s.entries.contains_key(&name) && mode.create {
                    let ino = s.next_ino;
                    s.next_ino += 1;
                    s.inodes.insert(ino, Inode::default());
                    s.entries.insert(name.clone(), ino);
                    s.pending.push(DirOp::Create(name, ino));
                } else if mode.truncate {
                    file_op(s, path, FileOp::SetLen(0));
                }
            }
            FsOp::Write { path, offset, data } => file_op(
                s,
                path,
                FileOp::Write {
                    offset: *offset,
                    data: data.to_vec(),
                },
            ),
            FsOp::SetLen { path, len } => file_op(s, path, FileOp::SetLen(*len)),
            FsOp::SyncData { path } | FsOp::SyncAll { path } => sync(s, path),
            FsOp::SyncDir { path } => {
                if *path == self.dir.as_path() {
                    s.durable_entries = s.entries.clone();
                    s.pending.clear();
                } else {
                    s.anomalies
                        .push(format!("fsync of another directory {}", path.display()));
                }
            }
            FsOp::Rename { from, to } => {
                let (Some(a), Some(b)) = (self.name_in_dir(from), self.name_in_dir(to)) else {
                    s.anomalies.push("rename outside the directory".into());
                    return;
                };
                let op = DirOp::Rename(a, b);
                apply_dir_op(&mut s.entries, &op);
                s.pending.push(op);
            }
            FsOp::Remove { path } => {
                let Some(name) = self.name_in_dir(path) else {
                    s.anomalies.push("unlink outside the directory".into());
                    return;
                };
                let op = DirOp::Remove(name);
                apply_dir_op(&mut s.entries, &op);
                s.pending.push(op);
            }
        }
    }
}

impl FsHook for Disk {
    fn before(&self, op: &FsOp<'_>) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if s.crashed.is_some() {
            return Err(io::Error::other("simulated power loss: the disk is gone"));
        }
        let index = s.ops;
        s.ops += 1;
        let desc = describe(op);
        let fire = s.trigger.as_mut().is_some_and(|t| t(index, op));
        if fire {
            s.trace.push(format!("#{index} CRASH before: {desc}"));
            s.crashed = Some(format!("#{index} {desc}"));
            return Err(io::Error::other("simulated power loss"));
        }
        if let Some(err) = s.failer.as_mut().and_then(|f| f(op)) {
            s.trace.push(format!("#{index} FAILED ({err}): {desc}"));
            return Err(err);
        }
        s.trace.push(format!("#{index} {desc}"));
        Ok(())
    }

    fn after(&self, op: &FsOp<'_>, ok: bool) {
        let mut s = self.state.lock().unwrap();
        if !ok {
            let d = describe(op);
            s.anomalies.push(format!("a real operation failed: {d}"));
            return;
        }
        self.apply(&mut s, op);
    }
}

fn file_after_power_loss(
    inode: &Inode,
    outcome: FileOutcome,
    rng: &mut fastrand::Rng,
    forced: &Forced,
) -> (Vec<u8>, String) {
    let n = inode.volatile.len();
    if n == 0 {
        return (inode.durable.clone(), "synced".into());
    }
    // versions[i]: the content after the first i unsynced operations.
    let mut versions = Vec::with_capacity(n + 1);
    versions.push(inode.durable.clone());
    for op in &inode.volatile {
        let mut v = versions.last().unwrap().clone();
        op.apply(&mut v);
        versions.push(v);
    }
    match outcome {
        FileOutcome::Lost => (versions[0].clone(), format!("lost {n} ops")),
        FileOutcome::Kept => (versions[n].clone(), format!("kept {n} ops")),
        FileOutcome::Prefix => {
            let k = rng.usize(0..=n);
            (versions[k].clone(), format!("kept {k}/{n} ops"))
        }
        FileOutcome::Torn => {
            // Tear the last write (or a random one) after some bytes.
            let last_write = inode
                .volatile
                .iter()
                .rposition(|op| matches!(op, FileOp::Write { .. }));
            let k = match (forced.torn_last_write_at, last_write) {
                (Some(_), Some(w)) => w,
                _ => rng.usize(0..n),
            };
            let mut v = versions[k].clone();
            match &inode.volatile[k] {
                FileOp::Write { offset, data } => {
                    let cut = forced
                        .torn_last_write_at
                        .unwrap_or_else(|| rng.usize(0..=data.len()))
                        .min(data.len());
                    // The size update may or may not have reached the disk.
                    if rng.bool() {
                        let end = to_usize(*offset) + data.len();
                        if v.len() < end {
                            v.resize(end, 0);
                        }
                    }
                    write_into(&mut v, *offset, &data[..cut]);
                    (
                        v,
                        format!(
                            "kept {k}/{n} ops, then {cut}/{} bytes of a write",
                            data.len()
                        ),
                    )
                }
                FileOp::SetLen(_) => (v, format!("kept {k}/{n} ops")),
            }
        }
        FileOutcome::Sectors => {
            let len_version = rng.usize(0..=n);
            let len = versions[len_version].len();
            let durable_len = versions[0].len();
            let garbage = rng.u8(..) < 16;
            let mut out = vec![0u8; len];
            let mut start = 0;
            while start < len {
                let end = (start + SECTOR).min(len);
                let v = &versions[rng.usize(0..=n)];
                if v.len() > start {
                    let have = end.min(v.len());
                    out[start..have].copy_from_slice(&v[start..have]);
                } else if garbage && start >= durable_len {
                    // Allocated after the last sync, never written: stale blocks.
                    rng.fill(&mut out[start..end]);
                }
                start = end;
            }
            (
                out,
                format!(
                    "sectors at random versions of {n} ops, length of version {len_version}{}",
                    if garbage { ", garbage" } else { "" }
                ),
            )
        }
    }
}

/// The files of a directory.
pub fn read_image(dir: &Path) -> Image {
    let mut image = Image::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            image.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    image
}

/// Replaces the files of `dir` with `image`.
pub fn write_image(dir: &Path, image: &Image) {
    for e in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    for (name, content) in image {
        std::fs::write(dir.join(name), content).unwrap();
    }
}
