//! Memory per remembered key of the deduplication index, and its insert and lookup rates.
//!
//! `carebus-bench dedup-memory --keys 10000000`
//!
//! Inserts N realistic HL7 idempotency keys (`EPICADT|NORTHGATE|NG-ADT-0000001`, 32
//! bytes) with a memory budget large enough for the index to stay in memory, then looks
//! up present and absent keys. Bytes per key are measured two ways: the index's own
//! `memory_bytes()` (sum of allocated capacities) and the process's resident-set growth
//! (`/proc/self/statm`, before opening the index and after the last insert). The peak
//! RSS growth (`VmHWM`) shows the transient cost of merging sorted runs. The allocator
//! (mimalloc) returns freed merge buffers to the OS only after a delay, so RSS is read
//! again once settled: after the lookups, the lowest of readings every 100 ms for up to
//! 3 s (the index still alive).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use carebus_core::dedup::{DedupConfig, DedupEntry, DedupIndex};

#[derive(Debug)]
pub struct Report {
    pub keys: u64,
    pub index_bytes: u64,
    pub rss_growth_bytes: u64,
    pub settled_rss_growth_bytes: u64,
    pub peak_rss_growth_bytes: u64,
    pub insert_secs: f64,
    pub lookups: u64,
    pub hit_secs: f64,
    pub miss_secs: f64,
    pub miss_candidates: u64,
    pub disk_runs: usize,
}

fn page_size() -> u64 {
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("KernelPageSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4096, |kb| kb * 1024)
}

/// Resident set size in bytes, from `/proc/self/statm` (second field, in pages).
fn rss_bytes(page: u64) -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("statm has no resident field")?
        .parse()
        .context("statm resident field")?;
    Ok(pages * page)
}

/// Peak resident set size in bytes (`VmHWM` of `/proc/self/status`).
fn peak_rss_bytes() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("status has no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .context("VmHWM")?;
    Ok(kb * 1024)
}

fn key<'a>(buf: &'a mut String, prefix: &str, i: u64) -> &'a [u8] {
    buf.clear();
    let _ = write!(buf, "EPICADT|NORTHGATE|{prefix}{i:07}");
    buf.as_bytes()
}

pub fn run(dir: &Path, keys: u64) -> anyhow::Result<Report> {
    let page = page_size();
    let mut buf = String::with_capacity(64);
    let base_ts: i64 = 1_750_000_000_000;
    let config = DedupConfig {
        window: Duration::from_secs(7 * 24 * 3600),
        // Large enough that nothing spills: this measures the in-memory representation.
        memory_budget_bytes: usize::try_from(keys.saturating_mul(256)).unwrap_or(usize::MAX),
    };
    let rss_before = rss_bytes(page)?;
    let peak_before = peak_rss_bytes()?;
    let (mut idx, _) = DedupIndex::open(dir, config)?;

    let start = Instant::now();
    for i in 0..keys {
        let entry = DedupEntry {
            partition: (i % 8) as u32,
            offset: i / 8,
            body_hash: i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            timestamp_ms: base_ts + (i / 1000) as i64,
        };
        idx.insert(key(&mut buf, "NG-ADT-", i), entry)?;
    }
    let insert_secs = start.elapsed().as_secs_f64();
    let rss_after = rss_bytes(page)?;
    let peak_after = peak_rss_bytes()?;
    let index_bytes = idx.memory_bytes() as u64;
    let disk_runs = idx.disk_runs();
    anyhow::ensure!(
        idx.len() as u64 == keys,
        "index holds {} of {keys} keys",
        idx.len()
    );

    let now = base_ts + (keys / 1000) as i64;
    let lookups = keys.clamp(1, 1_000_000);
    let stride = 7919 % keys.max(1);
    let start = Instant::now();
    let mut i = 0u64;
    for _ in 0..lookups {
        let found = idx.candidates(key(&mut buf, "NG-ADT-", i), now)?;
        anyhow::ensure!(
            found
                .iter()
                .any(|e| e.offset == i / 8 && e.partition == (i % 8) as u32),
            "key {i} not found"
        );
        i = (i + stride.max(1)) % keys.max(1);
    }
    let hit_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut miss_candidates = 0u64;
    for j in 0..lookups {
        miss_candidates += idx.candidates(key(&mut buf, "NG-ORM-", j), now)?.len() as u64;
    }
    let miss_secs = start.elapsed().as_secs_f64();
    let mut settled = rss_bytes(page)?;
    let settle_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle_until {
        std::thread::sleep(Duration::from_millis(100));
        settled = settled.min(rss_bytes(page)?);
    }
    anyhow::ensure!(idx.len() as u64 == keys, "index changed while settling");

    Ok(Report {
        keys,
        index_bytes,
        rss_growth_bytes: rss_after.saturating_sub(rss_before),
        settled_rss_growth_bytes: settled.saturating_sub(rss_before),
        peak_rss_growth_bytes: peak_after.saturating_sub(peak_before),
        insert_secs,
        lookups,
        hit_secs,
        miss_secs,
        miss_candidates,
        disk_runs,
    })
}

pub fn report(r: &Report) -> String {
    let per_key = |b: u64| b as f64 / r.keys.max(1) as f64;
    let rate = |n: u64, secs: f64| n as f64 / secs.max(1e-9);
    let mut out = String::new();
    out.push_str(
        "| keys | index bytes/key (memory_bytes) | RSS growth bytes/key (after inserts) \
         | RSS growth bytes/key (settled) | peak RSS growth bytes/key \
         | inserts/s | lookups/s (present) | lookups/s (absent) |\n",
    );
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let _ = writeln!(
        out,
        "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} |",
        r.keys,
        per_key(r.index_bytes),
        per_key(r.rss_growth_bytes),
        per_key(r.settled_rss_growth_bytes),
        per_key(r.peak_rss_growth_bytes),
        rate(r.keys, r.insert_secs),
        rate(r.lookups, r.hit_secs),
        rate(r.lookups, r.miss_secs),
    );
    let _ = write!(
        out,
        "\n({} lookups each; {} candidates returned for absent keys; {} disk runs)",
        r.lookups, r.miss_candidates, r.disk_runs
    );
    out
}
