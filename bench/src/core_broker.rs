//! Broker-core throughput, in process (no network): publish with and without
//! idempotency keys, and deliver + ack.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use carebus_core::{Broker, BrokerConfig, PublishMessage, SubscriptionConfig, TopicConfig};
use hdrhistogram::Histogram;

#[derive(Debug)]
pub struct PublishRun {
    pub keyed: bool,
    pub messages: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
    /// CPU time of the whole process (broker and publishers) per message measured.
    pub cpu_us_per_msg: f64,
}

/// User + system CPU seconds of this process so far, from /proc (Linux), or 0.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and
    // 13th of them, in clock ticks (USER_HZ, 100 on Linux).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

impl PublishRun {
    pub fn per_sec(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

/// `publishers` tasks publish one 1 KiB message at a time (an HL7-like body whose
/// control id varies) for `duration`, after `warmup`.
pub fn publish(
    dir: &Path,
    keyed: bool,
    publishers: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<PublishRun> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (broker, _) = Broker::open(dir, BrokerConfig::default())?;
    let broker = Arc::new(broker);
    broker.put_topic("bench", TopicConfig::default())?;
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..publishers)
        .map(|p| {
            let (broker, stop, measuring, counted) = (
                Arc::clone(&broker),
                Arc::clone(&stop),
                Arc::clone(&measuring),
                Arc::clone(&counted),
            );
            runtime.spawn(async move {
                let mut hist = Histogram::<u64>::new(3)?;
                let filler = "X".repeat(1024 - 64);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let control = format!("P{p:03}-{seq:010}");
                    let body = format!(
                        "MSH|^~\\&|LAB|RL|EMR|NG|20261124||ORU^R01|{control}|P|2.5.1\r{filler}"
                    );
                    let mut m = PublishMessage::new(Bytes::from(body));
                    if keyed {
                        m.idempotency_key = Some(Bytes::from(format!("LAB|RL|{control}")));
                    }
                    let t = Instant::now();
                    let out = broker.publish("bench", vec![m]).await?;
                    anyhow::ensure!(
                        out.first().is_some_and(|o| !o.duplicate),
                        "unexpected duplicate"
                    );
                    if measuring.load(Ordering::Relaxed) {
                        hist.record(
                            u64::try_from(t.elapsed().as_micros())
                                .unwrap_or(u64::MAX)
                                .max(1),
                        )?;
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok::<_, anyhow::Error>(hist)
            })
        })
        .collect();
    std::thread::sleep(warmup);
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let cpu_start = process_cpu_seconds();
    std::thread::sleep(duration);
    measuring.store(false, Ordering::Relaxed);
    let cpu = process_cpu_seconds() - cpu_start;
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3)?;
    for h in handles {
        hist.add(runtime.block_on(h)??)?;
    }
    let messages = counted.load(Ordering::Relaxed);
    Ok(PublishRun {
        keyed,
        messages,
        elapsed,
        latency_us: hist,
        cpu_us_per_msg: cpu * 1e6 / messages.max(1) as f64,
    })
}

/// The run with the median throughput (all runs are printed to stderr).
pub fn median(mut runs: Vec<PublishRun>) -> anyhow::Result<PublishRun> {
    runs.sort_by(|a, b| a.per_sec().total_cmp(&b.per_sec()));
    let all: Vec<String> = runs
        .iter()
        .map(|r| format!("{:.0} ({:.1} µs CPU/msg)", r.per_sec(), r.cpu_us_per_msg))
        .collect();
    let kind = if runs.first().is_some_and(|r| r.keyed) {
        "keyed"
    } else {
        "unkeyed"
    };
    eprintln!("{kind} runs, msgs/s, sorted: {}", all.join(", "));
    let mid = runs.len() / 2;
    runs.into_iter()
        .nth(mid)
        .ok_or_else(|| anyhow::anyhow!("no runs"))
}

#[derive(Debug)]
pub struct DeliverRun {
    pub messages: u64,
    pub elapsed: Duration,
}

/// Stores `count` 1 KiB messages, then `consumers` tasks receive (up to 100 at a
/// time) and acknowledge them all.
pub fn deliver_ack(dir: &Path, count: u64, consumers: usize) -> anyhow::Result<DeliverRun> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (broker, _) = Broker::open(dir, BrokerConfig::default())?;
    let broker = Arc::new(broker);
    broker.put_topic("drain", TopicConfig::default())?;
    broker.put_subscription("drain", "s", SubscriptionConfig::default())?;
    let body = Bytes::from(vec![b'x'; 1024]);
    runtime.block_on(async {
        let mut left = count;
        while left > 0 {
            let n = left.min(500);
            let batch = (0..n).map(|_| PublishMessage::new(body.clone())).collect();
            broker.publish("drain", batch).await?;
            left -= n;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..consumers)
        .map(|c| {
            let (broker, done) = (Arc::clone(&broker), Arc::clone(&done));
            runtime.spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(300);
                while done.load(Ordering::Relaxed) < count && Instant::now() < deadline {
                    let ds = broker
                        .receive(
                            "drain",
                            "s",
                            &format!("c{c}"),
                            100,
                            Duration::from_millis(20),
                        )
                        .await?;
                    if ds.is_empty() {
                        continue;
                    }
                    let ids: Vec<u64> = ds.iter().map(|d| d.delivery_id).collect();
                    let refused = broker.ack("drain", "s", &ids).await?;
                    anyhow::ensure!(refused.is_empty(), "acks refused");
                    done.fetch_add(ids.len() as u64, Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for h in handles {
        runtime.block_on(h)??;
    }
    Ok(DeliverRun {
        messages: done.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

pub fn report(
    unkeyed: &PublishRun,
    keyed: &PublishRun,
    paired_ratio: f64,
    deliver: &DeliverRun,
    publishers: usize,
    consumers: usize,
) -> String {
    let ms =
        |h: &Histogram<u64>, q: f64| format!("{:.3} ms", h.value_at_quantile(q) as f64 / 1000.0);
    let mut s = String::from("| measurement | msgs/s | p50 | p99 |\n|---|---:|---:|---:|\n");
    for r in [unkeyed, keyed] {
        s.push_str(&format!(
            "| publish 1 KiB, {publishers} publishers, fsync before ack, {} | {:.0} | {} | {} |\n",
            if r.keyed {
                "with idempotency keys"
            } else {
                "without keys"
            },
            r.per_sec(),
            ms(&r.latency_us, 0.5),
            ms(&r.latency_us, 0.99)
        ));
    }
    s.push_str(&format!(
        "| deliver + ack {} stored 1 KiB messages, {consumers} consumers, batches of 100 | {:.0} | | |\n",
        deliver.messages,
        deliver.messages as f64 / deliver.elapsed.as_secs_f64()
    ));
    let ratio = keyed.per_sec() / unkeyed.per_sec();
    let met = |r: f64| if r >= 0.9 { "yes" } else { "no" };
    s.push_str(&format!(
        "\n| goal | measured | target | met |\n|---|---:|---:|---|\n\
         | keyed publish ÷ unkeyed publish (median runs) | {:.0} % | ≥ 90 % | {} |\n\
         | keyed publish ÷ unkeyed publish (median of each round's pair) | {:.0} % | ≥ 90 % | {} |\n",
        ratio * 100.0,
        met(ratio),
        paired_ratio * 100.0,
        met(paired_ratio)
    ));
    s
}
