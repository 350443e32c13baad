//! Append throughput and latency of carebus-log with fsync before every acknowledgement.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use carebus_log::{Durability, Log, LogConfig, LogStats, Record};
use hdrhistogram::Histogram;

use crate::disk::{Sequential, SyncLoop};

#[derive(Debug)]
pub struct AppendRun {
    pub appenders: usize,
    pub records: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
    pub stats: LogStats,
}

impl AppendRun {
    pub fn records_per_sec(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
}

/// `appenders` tasks each append one `size`-byte record at a time; what happens in the
/// first `warmup` is not measured, then `duration` is.
pub fn run(
    dir: &Path,
    appenders: usize,
    size: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<AppendRun> {
    let (log, _) = Log::open(
        dir,
        LogConfig {
            retention: Default::default(),
            ..LogConfig::default()
        },
    )?;
    let log = Arc::new(log);
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(warmup.is_zero()));
    // Appenders are tasks on a multi-threaded runtime, as the server's request handlers are.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let handles: Vec<_> = (0..appenders)
        .map(|_| {
            let log = Arc::clone(&log);
            let stop = Arc::clone(&stop);
            let measuring = Arc::clone(&measuring);
            runtime.spawn(async move {
                let mut hist = Histogram::<u64>::new(3)?;
                let value = bytes::Bytes::from(vec![0x42u8; size]);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ack = log.append(&[Record::new(value.clone())]).await?;
                    anyhow::ensure!(ack.durability == Durability::Fsynced, "ack was not fsynced");
                    if !measuring.load(Ordering::Relaxed) {
                        continue;
                    }
                    hist.record(
                        u64::try_from(t.elapsed().as_micros())
                            .unwrap_or(u64::MAX)
                            .max(1),
                    )?;
                }
                Ok::<_, anyhow::Error>(hist)
            })
        })
        .collect();
    std::thread::sleep(warmup);
    let before = log.stats();
    let start = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let after = log.stats();
    let mut hist = Histogram::<u64>::new(3)?;
    for h in handles {
        let part = runtime.block_on(h)??;
        hist.add(part)?;
    }
    let stats = LogStats {
        fsync_buckets: std::array::from_fn(|i| after.fsync_buckets[i] - before.fsync_buckets[i]),
        batches: after.batches - before.batches,
        records: after.records - before.records,
        fsyncs: after.fsyncs - before.fsyncs,
        fsync_micros: after.fsync_micros - before.fsync_micros,
        inline_syncs: after.inline_syncs - before.inline_syncs,
        fill_syncs: after.fill_syncs - before.fill_syncs,
        bytes_written: after.bytes_written - before.bytes_written,
    };
    Ok(AppendRun {
        appenders,
        records: stats.records,
        elapsed,
        latency_us: hist,
        stats,
    })
}

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

pub fn report(
    raw: &SyncLoop,
    seq: &Sequential,
    one: &AppendRun,
    many: &AppendRun,
    cold: &AppendRun,
    appenders: usize,
) -> String {
    let raw_mean = raw.mean_us();
    let raw_p50 = raw.latency_us.value_at_quantile(0.5) as f64;
    let seq_records = seq.bytes_per_sec() / 1024.0;
    let group_limit = appenders as f64 * 1_000_000.0 / raw_mean;
    let physical = seq_records.min(group_limit);
    let many_ratio = many.records_per_sec() / physical;
    let one_mean = one.latency_us.mean();
    let one_p50 = one.latency_us.value_at_quantile(0.5) as f64;
    let mut s = String::new();
    s.push_str("| measurement | records/s | p50 | p99 | mean | fsyncs | records per fsync | mean fdatasync |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    s.push_str(&format!(
        "| raw 1 KiB write + fdatasync loop | {:.0} | {} | {} | {} | {} | 1 | |\n",
        raw.ops_per_sec(),
        ms(raw_p50),
        ms(raw.latency_us.value_at_quantile(0.99) as f64),
        ms(raw_mean),
        raw.ops
    ));
    s.push_str(&format!(
        "| raw sequential write, one fsync at the end | {:.0} (1 KiB units; {:.0} MB/s) | | | | 1 | | |\n",
        seq_records,
        seq.bytes_per_sec() / 1e6
    ));
    for (run, when) in [
        (one, "steady state"),
        (many, "steady state"),
        (cold, "new log, no warm-up"),
    ] {
        s.push_str(&format!(
            "| carebus-log append, {} appender(s), fsync before ack, {when} | {:.0} | {} | {} | {} | {} | {:.1} | {} |\n",
            run.appenders,
            run.records_per_sec(),
            ms(run.latency_us.value_at_quantile(0.5) as f64),
            ms(run.latency_us.value_at_quantile(0.99) as f64),
            ms(run.latency_us.mean()),
            run.stats.fsyncs,
            run.stats.records as f64 / run.stats.fsyncs.max(1) as f64,
            ms(run.stats.fsync_micros as f64 / run.stats.fsyncs.max(1) as f64)
        ));
    }
    s.push_str("\n| goal | measured | target | met |\n|---|---:|---:|---|\n");
    s.push_str(&format!(
        "| {appenders} appenders vs what group commit could physically give, min(seq bandwidth, {appenders} × 1 KiB ÷ raw fdatasync mean = {:.0}/s) = {:.0}/s | {:.0} % | ≥ 50 % | {} |\n",
        group_limit,
        physical,
        many_ratio * 100.0,
        if many_ratio >= 0.5 { "yes" } else { "no" }
    ));
    let r_mean = one_mean / raw_mean;
    let r_p50 = one_p50 / raw_p50;
    s.push_str(&format!(
        "| 1 appender latency ÷ raw write+fdatasync latency | mean {:.2}×, p50 {:.2}× | ≤ 1.5× | {} |\n",
        r_mean,
        r_p50,
        if r_mean <= 1.5 && r_p50 <= 1.5 { "yes" } else { "no" }
    ));
    s
}
