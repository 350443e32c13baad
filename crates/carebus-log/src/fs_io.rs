//! Every file-system operation that creates, changes, syncs, renames or deletes
//! anything in a log directory goes through this module.
//!
//! In a normal build each function is an `#[inline]` pass-through to `std`: the
//! description of the operation is built by a closure that is never called, so the
//! write path pays nothing for it.
//!
//! In tests and with the `fault-injection` feature, an operation on a path under a
//! directory for which a hook was installed ([`install_hook`]) is first shown to the
//! hook, which may refuse it (the caller sees the returned `io::Error`, and nothing
//! reaches the disk), and after it ran the hook is told whether it succeeded. The
//! hook call and the operation run under one mutex per hook, so the hook sees the
//! operations in exactly the order the file system performed them. This is how the
//! power-loss simulation in `tests/log_power_loss` injects crashes and records what
//! the disk would hold (see "Power-loss simulation" in DESIGN.md).

// Without the hooks, the operation descriptions are built by closures that are
// never called: nothing reads them.
#![cfg_attr(not(any(test, feature = "fault-injection")), allow(dead_code))]

use std::fs::{File, OpenOptions, ReadDir};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenMode {
    /// Open for reading.
    pub read: bool,
    /// Open for writing.
    pub write: bool,
    /// Create the file if it does not exist.
    pub create: bool,
    /// Truncate the file to zero length.
    pub truncate: bool,
}

impl OpenMode {
    pub(crate) const READ: OpenMode = OpenMode {
        read: true,
        write: false,
        create: false,
        truncate: false,
    };
    pub(crate) const READ_WRITE: OpenMode = OpenMode {
        read: true,
        write: true,
        create: false,
        truncate: false,
    };
    /// Create or truncate, for reading and writing.
    pub(crate) const CREATE_NEW: OpenMode = OpenMode {
        read: true,
        write: true,
        create: true,
        truncate: true,
    };
    /// Create if missing, keep the content (the lock file).
    pub(crate) const CREATE_KEEP: OpenMode = OpenMode {
        read: false,
        write: true,
        create: true,
        truncate: false,
    };

    fn options(self) -> OpenOptions {
        let mut o = OpenOptions::new();
        o.read(self.read)
            .write(self.write)
            .create(self.create)
            .truncate(self.truncate);
        o
    }
}

/// One file-system operation, as shown to a hook.
#[derive(Debug, Clone, Copy)]
pub enum FsOp<'a> {
    /// `create_dir_all` of the log directory.
    CreateDir {
        /// The directory.
        path: &'a Path,
    },
    /// Opening (possibly creating or truncating) a file.
    Open {
        /// The file.
        path: &'a Path,
        /// How.
        mode: OpenMode,
    },
    /// A positional write of all of `data` at `offset`.
    Write {
        /// The file written.
        path: &'a Path,
        /// Byte position.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// `ftruncate` (shrinking or growing).
    SetLen {
        /// The file.
        path: &'a Path,
        /// Its new length.
        len: u64,
    },
    /// `fdatasync` of a file.
    SyncData {
        /// The file.
        path: &'a Path,
    },
    /// `fsync` of a file.
    SyncAll {
        /// The file.
        path: &'a Path,
    },
    /// `fsync` of a directory (makes its entries durable).
    SyncDir {
        /// The directory.
        path: &'a Path,
    },
    /// `rename`.
    Rename {
        /// Old name.
        from: &'a Path,
        /// New name (replaced if it exists).
        to: &'a Path,
    },
    /// `unlink`.
    Remove {
        /// The file.
        path: &'a Path,
    },
    /// Listing a directory.
    ReadDir {
        /// The directory.
        path: &'a Path,
    },
}

impl FsOp<'_> {
    /// The path the operation acts on (for a rename, the old name).
    pub fn path(&self) -> &Path {
        match self {
            FsOp::CreateDir { path }
            | FsOp::Open { path, .. }
            | FsOp::Write { path, .. }
            | FsOp::SetLen { path, .. }
            | FsOp::SyncData { path }
            | FsOp::SyncAll { path }
            | FsOp::SyncDir { path }
            | FsOp::Remove { path }
            | FsOp::ReadDir { path } => path,
            FsOp::Rename { from, .. } => from,
        }
    }

    /// Whether the operation can change what is on the disk.
    pub fn is_mutation(&self) -> bool {
        match self {
            FsOp::Open { mode, .. } => mode.create || mode.truncate,
            FsOp::ReadDir { .. } => false,
            _ => true,
        }
    }
}

#[cfg(not(any(test, feature = "fault-injection")))]
#[inline(always)]
fn guarded<'a, T>(
    _op: impl FnOnce() -> FsOp<'a>,
    run: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    run()
}

#[cfg(any(test, feature = "fault-injection"))]
fn guarded<'a, T>(
    op: impl FnOnce() -> FsOp<'a>,
    run: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    hooks::guarded(op, run)
}

#[inline]
pub(crate) fn create_dir_all(path: &Path) -> io::Result<()> {
    guarded(
        || FsOp::CreateDir { path },
        || std::fs::create_dir_all(path),
    )
}

#[inline]
pub(crate) fn open(path: &Path, mode: OpenMode) -> io::Result<File> {
    guarded(|| FsOp::Open { path, mode }, || mode.options().open(path))
}

#[inline]
pub(crate) fn write_all_at(file: &File, path: &Path, data: &[u8], offset: u64) -> io::Result<()> {
    guarded(
        || FsOp::Write { path, offset, data },
        || file.write_all_at(data, offset),
    )
}

#[inline]
pub(crate) fn set_len(file: &File, path: &Path, len: u64) -> io::Result<()> {
    guarded(|| FsOp::SetLen { path, len }, || file.set_len(len))
}

#[inline]
pub(crate) fn sync_data(file: &File, path: &Path) -> io::Result<()> {
    guarded(|| FsOp::SyncData { path }, || file.sync_data())
}

#[inline]
pub(crate) fn sync_all(file: &File, path: &Path) -> io::Result<()> {
    guarded(|| FsOp::SyncAll { path }, || file.sync_all())
}

#[inline]
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    guarded(
        || FsOp::SyncDir { path },
        || File::open(path).and_then(|d| d.sync_all()),
    )
}

#[inline]
pub(crate) fn rename(from: &Path, to: &Path) -> io::Result<()> {
    guarded(|| FsOp::Rename { from, to }, || std::fs::rename(from, to))
}

#[inline]
pub(crate) fn remove_file(path: &Path) -> io::Result<()> {
    guarded(|| FsOp::Remove { path }, || std::fs::remove_file(path))
}

#[inline]
pub(crate) fn read_dir(path: &Path) -> io::Result<ReadDir> {
    guarded(|| FsOp::ReadDir { path }, || std::fs::read_dir(path))
}

#[cfg(any(test, feature = "fault-injection"))]
pub use hooks::{FsHook, HookGuard, install_hook};

#[cfg(any(test, feature = "fault-injection"))]
mod hooks {
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, PoisonError, RwLock};

    use super::FsOp;

    /// Sees every file-system operation the log performs under one directory.
    pub trait FsHook: Send + Sync {
        /// Called before the operation. An error is returned to the log instead of
        /// performing the operation.
        fn before(&self, op: &FsOp<'_>) -> io::Result<()>;
        /// Called after the operation was performed, with whether it succeeded.
        fn after(&self, op: &FsOp<'_>, ok: bool);
    }

    struct Installed {
        id: usize,
        dir: PathBuf,
        hook: Arc<dyn FsHook>,
        serial: Arc<Mutex<()>>,
    }

    static HOOKS: RwLock<Vec<Installed>> = RwLock::new(Vec::new());
    /// Hooks installed; operations skip the lookup while it is zero.
    static INSTALLED: AtomicUsize = AtomicUsize::new(0);
    static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

    /// Removes its hook when dropped.
    #[derive(Debug)]
    pub struct HookGuard {
        id: usize,
    }

    impl Drop for HookGuard {
        fn drop(&mut self) {
            let mut hooks = HOOKS.write().unwrap_or_else(PoisonError::into_inner);
            let before = hooks.len();
            hooks.retain(|h| h.id != self.id);
            if hooks.len() < before {
                INSTALLED.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Shows every operation on `dir` and on paths under it to `hook`, until the
    /// returned guard is dropped. Pass the same path that is given to `Log::open`.
    pub fn install_hook(dir: &Path, hook: Arc<dyn FsHook>) -> HookGuard {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut hooks = HOOKS.write().unwrap_or_else(PoisonError::into_inner);
        hooks.push(Installed {
            id,
            dir: dir.to_path_buf(),
            hook,
            serial: Arc::new(Mutex::new(())),
        });
        INSTALLED.fetch_add(1, Ordering::AcqRel);
        HookGuard { id }
    }

    type Found = (Arc<dyn FsHook>, Arc<Mutex<()>>);

    fn find(path: &Path) -> Option<Found> {
        let hooks = HOOKS.read().unwrap_or_else(PoisonError::into_inner);
        hooks
            .iter()
            .find(|h| path.starts_with(&h.dir))
            .map(|h| (Arc::clone(&h.hook), Arc::clone(&h.serial)))
    }

    pub(super) fn guarded<'a, T>(
        op: impl FnOnce() -> FsOp<'a>,
        run: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        if INSTALLED.load(Ordering::Acquire) == 0 {
            return run();
        }
        let op = op();
        let Some((hook, serial)) = find(op.path()) else {
            return run();
        };
        let _serial = serial.lock().unwrap_or_else(PoisonError::into_inner);
        hook.before(&op)?;
        let result = run();
        hook.after(&op, result.is_ok());
        result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<String>>,
    }

    impl FsHook for Recorder {
        fn before(&self, op: &FsOp<'_>) -> io::Result<()> {
            if matches!(op, FsOp::SyncData { .. }) {
                return Err(io::Error::other("refused"));
            }
            Ok(())
        }
        fn after(&self, op: &FsOp<'_>, ok: bool) {
            let name = op
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kind = match op {
                FsOp::Open { .. } => "open",
                FsOp::Write { .. } => "write",
                FsOp::Rename { .. } => "rename",
                _ => "other",
            };
            self.seen
                .lock()
                .unwrap()
                .push(format!("{kind} {name} {ok}"));
        }
    }

    #[test]
    fn a_hook_sees_operations_under_its_directory_and_can_refuse_them() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let hook = Arc::new(Recorder::default());
        let guard = install_hook(dir.path(), hook.clone());
        let a = dir.path().join("a");
        let f = open(&a, OpenMode::CREATE_NEW).unwrap();
        write_all_at(&f, &a, b"xyz", 0).unwrap();
        assert!(sync_data(&f, &a).is_err(), "the hook refuses fdatasync");
        rename(&a, &dir.path().join("b")).unwrap();
        // Another directory is not seen.
        let c = other.path().join("c");
        let g = open(&c, OpenMode::CREATE_NEW).unwrap();
        sync_data(&g, &c).unwrap();
        assert_eq!(
            *hook.seen.lock().unwrap(),
            ["open a true", "write a true", "rename a true"]
        );
        drop(guard);
        let h = open(&dir.path().join("b"), OpenMode::READ_WRITE).unwrap();
        sync_data(&h, &dir.path().join("b")).unwrap();
        assert_eq!(hook.seen.lock().unwrap().len(), 3, "removed with its guard");
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b"xyz");
    }
}
