//! Guards `carebus serve` on a data directory it cannot write: on a read-only mounted
//! file system (a `ro` tmpfs, since root ignores permission bits) — the directory
//! itself, and a missing one below it that cannot be created — it exits non-zero
//! within a bound with a message naming the directory and saying it is read-only; a
//! regular file in its place is named as "not a directory" and left as it was. (A
//! directory that cannot be created is covered by `serve_process`.) Needs root to mount
//! the tmpfs; without it that test says so and stops.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::serve_until_exit;

/// A read-only tmpfs mounted for the test, unmounted on drop.
struct ReadOnlyTmpfs(PathBuf);

impl ReadOnlyTmpfs {
    fn mount() -> Option<ReadOnlyTmpfs> {
        let dir = tempfile::tempdir().unwrap().keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Some(ReadOnlyTmpfs(dir))
        } else {
            let _ = std::fs::remove_dir(&dir);
            None
        }
    }
}

impl Drop for ReadOnlyTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_read_only_data_dir_is_a_clear_error_and_a_non_zero_exit() {
    let Some(fs) = ReadOnlyTmpfs::mount() else {
        eprintln!(
            "NOTICE: readonly_data_dir_process skipped: cannot mount a read-only tmpfs (needs root)"
        );
        return;
    };
    // Writing there really fails (root ignores permission bits, not a ro mount).
    assert!(std::fs::write(fs.0.join("probe"), b"x").is_err());

    for dir in [fs.0.clone(), fs.0.join("carebus-data")] {
        let (out, took) = serve_until_exit(&dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "exit status {:?} on {}",
            out.status,
            dir.display()
        );
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("the data directory {}", dir.display())),
            "the message does not name {}: {stderr}",
            dir.display()
        );
        assert!(
            stderr.contains("read-only file system"),
            "the message does not say read-only: {stderr}"
        );
        eprintln!(
            "{} -> exit 1 after {took:?}: {}",
            dir.display(),
            stderr.lines().next().unwrap_or("")
        );
    }
}

#[test]
fn a_regular_file_as_data_dir_is_named_as_not_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let (out, _) = serve_until_exit(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the data directory {} is not a directory",
            file.display()
        )),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "the file was changed");
}
