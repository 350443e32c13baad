//! Offline verification of a log directory: every batch of every segment is read and
//! its checksum, framing and offsets checked, without changing anything (no lock, no
//! recovery, no truncation). For `carebus check`.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::MAX_BATCH_BODY;
use crate::error::{LogError, Result};
use crate::segment::{nonzero_extent, parse_file_name, scan_segment};

/// What verifying one log directory found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// The directory.
    pub dir: PathBuf,
    /// Segment files read.
    pub segments: usize,
    /// Records in valid batches.
    pub records: u64,
    /// Bytes of valid batches (and headers).
    pub bytes: u64,
    /// Problems: a sealed segment with a bad batch (data that would not be served), a
    /// bad batch in the active segment before its synced mark (acknowledged data
    /// damaged; the log refuses to open), or offsets that do not follow on between
    /// segments.
    pub problems: Vec<String>,
    /// Bytes after the last valid batch of the last segment (and past its synced mark)
    /// that are not zeros: a torn write that recovery will cut (normal after a crash;
    /// not a problem).
    pub torn_tail_bytes: u64,
}

impl VerifyReport {
    /// True when nothing stored is damaged.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies the log in `dir` (read only).
pub fn verify_dir(dir: &Path) -> Result<VerifyReport> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LogError::io("list log directory", dir, e))? {
        let entry = entry.map_err(|e| LogError::io("list log directory", dir, e))?;
        if let Some(base) = entry
            .file_name()
            .to_str()
            .and_then(|n| parse_file_name(n, "log"))
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    let mut report = VerifyReport {
        dir: dir.to_path_buf(),
        ..VerifyReport::default()
    };
    let mut expected: Option<u64> = None;
    for (i, &base) in bases.iter().enumerate() {
        let last = i + 1 == bases.len();
        let path = crate::segment::segment_path(dir, base);
        let file = File::open(&path).map_err(|e| LogError::io("open segment", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| LogError::io("stat segment", &path, e))?
            .len();
        report.segments += 1;
        if let Some(exp) = expected
            && exp != base
        {
            report.problems.push(format!(
                "{}: starts at offset {base}, the previous segment ends at {exp}",
                path.display()
            ));
        }
        let scan = scan_segment(&file, &path, base, len, MAX_BATCH_BODY, u64::MAX)?;
        report.records += scan.next_offset - base;
        report.bytes += scan.valid_len;
        expected = Some(scan.next_offset);
        // In the last segment a bad batch past the synced mark may be a torn write;
        // before it (or a file that ends before it), it is damage to data that had been
        // made durable.
        let synced = crate::synced_mark::read(dir)
            .filter(|m| last && m.segment_base == base)
            .map_or(0, |m| m.len);
        if scan.valid_len < synced {
            report.problems.push(format!(
                "{}: {} at byte {}, inside the part made durable before the last stop (up to \
                 byte {synced}); records from offset {} on cannot be read, and the log will \
                 not open until this is repaired",
                path.display(),
                scan.stopped_by.as_deref().map_or_else(
                    || "the segment ends (truncated, or an older copy?)".to_owned(),
                    |why| format!("bad batch ({why})")
                ),
                scan.valid_len,
                scan.next_offset
            ));
        } else if scan.valid_len < len {
            let damaged = nonzero_extent(&file, &path, scan.valid_len, len)?;
            if last {
                report.torn_tail_bytes = damaged;
            } else if damaged > 0 {
                report.problems.push(format!(
                    "{}: bad batch at byte {} ({}); records from offset {} on in this segment cannot be read",
                    path.display(),
                    scan.valid_len,
                    scan.stopped_by.as_deref().unwrap_or("unreadable"),
                    scan.next_offset
                ));
            }
        }
    }
    Ok(report)
}
