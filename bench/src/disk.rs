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
    /// Each write + fdatasync's duration, in the order they ran (µs).
    pub durations_us: Vec<u64>,
}

impl SyncLoop {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    pub fn mean_us(&self) -> f64 {
        self.latency_us.mean()
    }

    /// The latency floor this disk sets for messages arriving at random times (open
    /// loop, like W4) under ideal group commit with no CPU cost: a message arriving
    /// while an fdatasync runs waits for it to end, then for the next one, which
    /// covers it. Arrivals are spread evenly in time (every 5 µs) over the measured
    /// sequence of fdatasyncs, so a slow fdatasync counts by how long it lasted, as
    /// it does for a steady stream of messages (one 5 ms stall delays every message
    /// of those 5 ms), not once as in `latency_us`.
    pub fn open_loop_floor_us(&self) -> anyhow::Result<Histogram<u64>> {
        const STEP_US: usize = 5;
        let mut hist = Histogram::<u64>::new(3)?;
        for pair in self.durations_us.windows(2) {
            let [current, next] = [pair[0], pair[1]];
            for into in (0..current).step_by(STEP_US) {
                hist.record((current - into + next).max(1))?;
            }
        }
        Ok(hist)
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
    let mut durations_us = Vec::new();
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < duration && ops < 10_000_000 {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        let took = u64::try_from(t.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        hist.record(took)?;
        durations_us.push(took);
        ops += 1;
    }
    let elapsed = start.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(SyncLoop {
        ops,
        elapsed,
        latency_us: hist,
        durations_us,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_loop_floor_weighs_a_slow_fdatasync_by_its_duration() {
        // 999 fdatasyncs of 100 µs and one of 10 ms: 0.1 % of the calls, but about
        // 9 % of the time, so well over 1 % of evenly spread arrivals wait behind it.
        let mut durations_us = vec![100u64; 1000];
        durations_us[500] = 10_000;
        let mut latency_us = Histogram::<u64>::new(3).unwrap();
        for d in &durations_us {
            latency_us.record(*d).unwrap();
        }
        let s = SyncLoop {
            ops: 1000,
            elapsed: Duration::from_secs(1),
            latency_us,
            durations_us,
        };
        assert_eq!(s.latency_us.value_at_quantile(0.99), 100);
        let floor = s.open_loop_floor_us().unwrap();
        // Typical arrival: the rest of one 100 µs fdatasync plus the next.
        let p50 = floor.value_at_quantile(0.5);
        assert!((100..=200).contains(&p50), "{p50}");
        // The tail is set by the stall: several ms, not 100 µs.
        let p99 = floor.value_at_quantile(0.99);
        assert!(p99 > 5_000, "{p99}");
        assert!(floor.max() <= 10_100 + 10, "{}", floor.max());
    }
}
