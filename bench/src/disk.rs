//! The disk's own limits, measured with plain file I/O on the same filesystem.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latency of a loop of small appends each followed by fdatasync.
#[derive(Debug)]
pub struct SyncLoop {
    pub ops: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

impl SyncLoop {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    pub fn mean_us(&self) -> f64 {
        self.latency_us.mean()
    }
}

/// A plain loop of `size`-byte write + fdatasync for `duration`.
pub fn write_fdatasync(dir: &Path, size: usize, duration: Duration) -> anyhow::Result<SyncLoop> {
    let path = dir.join("raw-fdatasync");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let buf = vec![0x5Au8; size];
    let mut hist = Histogram::<u64>::new(3)?;
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < duration && ops < 10_000_000 {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        hist.record(
            u64::try_from(t.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        )?;
        ops += 1;
    }
    let elapsed = start.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(SyncLoop {
        ops,
        elapsed,
        latency_us: hist,
    })
}

/// Sequential write bandwidth: `total` bytes in 1 MiB writes and one fsync at the end.
#[derive(Debug)]
pub struct Sequential {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Sequential {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64()
    }
}

pub fn sequential_bandwidth(dir: &Path, total: u64) -> anyhow::Result<Sequential> {
    let path = dir.join("raw-sequential");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let chunk = vec![0xA5u8; 1 << 20];
    let start = Instant::now();
    let mut written = 0u64;
    while written < total {
        f.write_all(&chunk)?;
        written += chunk.len() as u64;
    }
    f.sync_all()?;
    let elapsed = start.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(Sequential {
        bytes: written,
        elapsed,
    })
}
