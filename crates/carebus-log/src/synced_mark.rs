//! The synced mark: how far the active segment was known to be durable.
//!
//! After every successful fdatasync of the active segment the log overwrites the small
//! file `synced.mark` with the segment's base offset and the length just made durable
//! (24 bytes: magic, base, length, CRC32C). The mark itself is written without an
//! fsync: it costs one small positional write per fdatasync, not a second flush.
//!
//! Why it can be trusted without its own fsync: it is written only *after* the
//! fdatasync it describes returned, so if it is on the disk, so is everything it
//! claims. After a power loss it may be older than the last fdatasync (or missing, or
//! torn, which its CRC tells); it is then a lower bound, never an overstatement.
//!
//! What recovery uses it for: a bad batch *after* the mark may be a torn write (the
//! tail that never became durable) and is cut; a bad batch *before* it is damage to
//! data that was acknowledged as durable (a bit flip, a bad sector, an outside write).
//! Cutting there would silently drop acknowledged records, and later appends would
//! reuse their offsets, so the log refuses to open instead (`LogError::Corrupt`), and
//! `carebus check` reports it as damage.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::fs_io;

/// The mark's file name inside a log directory.
pub(crate) const FILE_NAME: &str = "synced.mark";
const MAGIC: &[u8; 4] = b"CBSM";
const LEN: usize = 24;

/// A mark read back: the active segment (by base offset) was durable up to `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SyncedMark {
    pub(crate) segment_base: u64,
    pub(crate) len: u64,
}

pub(crate) fn encode(mark: SyncedMark) -> [u8; LEN] {
    let mut b = [0u8; LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4..12].copy_from_slice(&mark.segment_base.to_le_bytes());
    b[12..20].copy_from_slice(&mark.len.to_le_bytes());
    let crc = crc32c::crc32c(&b[..20]);
    b[20..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The mark in `bytes`, if they hold a whole, intact one.
pub(crate) fn decode(bytes: &[u8]) -> Option<SyncedMark> {
    let b = bytes.get(..LEN)?;
    if b.get(..4)? != MAGIC {
        return None;
    }
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    let crc = u32::from_le_bytes(b.get(20..24)?.try_into().ok()?);
    if crc32c::crc32c(b.get(..20)?) != crc {
        return None;
    }
    Some(SyncedMark {
        segment_base: u64_at(4)?,
        len: u64_at(12)?,
    })
}

/// The mark in `dir`, if there is an intact one (a missing, short or torn mark is no
/// mark: recovery then cannot tell damage from a torn tail, as before marks existed).
pub(crate) fn read(dir: &Path) -> Option<SyncedMark> {
    std::fs::read(dir.join(FILE_NAME))
        .ok()
        .and_then(|b| decode(&b))
}

/// The open mark file, written by the syncer (and by the writer when it syncs a small
/// group itself). A failure to write it is logged once and otherwise ignored: the mark
/// only ever helps recovery tell damage from a torn tail; appends never depend on it.
#[derive(Debug)]
pub(crate) struct MarkFile {
    file: File,
    path: PathBuf,
    failed: AtomicBool,
}

impl MarkFile {
    /// Opens (or creates) the mark file of `dir`; `None` (logged) if that fails.
    pub(crate) fn open(dir: &Path) -> Option<MarkFile> {
        let path = dir.join(FILE_NAME);
        match fs_io::open(&path, fs_io::OpenMode::CREATE_KEEP) {
            Ok(file) => Some(MarkFile {
                file,
                path,
                failed: AtomicBool::new(false),
            }),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot open the synced mark; recovery will treat any bad batch of the active segment as a torn tail");
                None
            }
        }
    }

    /// Records that the segment starting at `segment_base` is durable up to `len` bytes.
    /// Call only after the fdatasync that made it so has returned successfully.
    pub(crate) fn record(&self, segment_base: u64, len: u64) {
        let bytes = encode(SyncedMark { segment_base, len });
        if let Err(e) = fs_io::write_all_at(&self.file, &self.path, &bytes, 0)
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the synced mark");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_mark_reads_back_and_survives_a_longer_file() {
        let m = SyncedMark {
            segment_base: 4096,
            len: 123_456,
        };
        assert_eq!(decode(&encode(m)), Some(m));
        let mut longer = encode(m).to_vec();
        longer.extend_from_slice(&[7; 10]);
        assert_eq!(decode(&longer), Some(m));
    }

    #[test]
    fn a_written_mark_is_read_from_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let f = MarkFile::open(dir.path()).unwrap();
        f.record(0, 100);
        f.record(0, 250);
        assert_eq!(
            read(dir.path()),
            Some(SyncedMark {
                segment_base: 0,
                len: 250
            })
        );
    }

    proptest! {
        /// A torn, shortened or altered mark is no mark, never a different one.
        #[test]
        fn a_damaged_mark_is_rejected(base in any::<u64>(), len in any::<u64>(),
                                      cut in 0usize..LEN, at in 0usize..LEN, bit in 0u8..8) {
            let good = encode(SyncedMark { segment_base: base, len });
            prop_assert_eq!(decode(&good[..cut]), None);
            let mut flipped = good;
            flipped[at] ^= 1 << bit;
            prop_assert_eq!(decode(&flipped), None);
        }
    }
}
