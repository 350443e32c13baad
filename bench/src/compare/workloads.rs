//! The workloads W1–W5, written once against the [`Driver`] trait.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::driver::{Consumer, Driver, control_id, key_hash, now_ns, oru, sent_ns};

/// Messages acknowledged over a measured interval, with per-call latency.
#[derive(Debug)]
pub struct Throughput {
    pub messages: u64,
    /// Including the warm-up.
    pub total: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

impl Throughput {
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Records a duration in microseconds (at least 1).
pub fn record(hist: &mut Histogram<u64>, d: Duration) -> anyhow::Result<()> {
    hist.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1))?;
    Ok(())
}

/// W1: `inflight` publishers each publish one message (own idempotency key) and wait
/// for its acknowledgement, for `warmup` + `duration`; only `duration` is counted.
pub async fn w1(
    d: Arc<dyn Driver>,
    topic: &str,
    inflight: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Throughput> {
    d.setup(topic, &[]).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..inflight {
        let (d, stop, measuring, counted, total) = (
            Arc::clone(&d),
            Arc::clone(&stop),
            Arc::clone(&measuring),
            Arc::clone(&counted),
            Arc::clone(&total),
        );
        let topic = topic.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let key = format!("{topic}-{t:03}-{seq:010}");
                let body = oru(&key, now_ns());
                let t0 = Instant::now();
                let dup = d.publish(&topic, &key, body).await?;
                anyhow::ensure!(!dup, "unexpected duplicate for {key}");
                total.fetch_add(1, Ordering::Relaxed);
                if measuring.load(Ordering::Relaxed) {
                    record(&mut hist, t0.elapsed())?;
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    measure_window(
        tasks,
        (warmup, duration),
        &measuring,
        &stop,
        (&counted, &total),
    )
    .await
}

/// What consumers received.
#[derive(Debug)]
pub struct Drain {
    pub received: u64,
    /// Of those, messages with no send time stamped in the body (W4's warm-up).
    pub unstamped: u64,
    pub distinct: u64,
    /// From the start to the last message received.
    pub elapsed: Duration,
    pub timed_out: bool,
    /// Publish → receive latency (from the time stamped into each body).
    pub latency_us: Histogram<u64>,
}

impl Drain {
    pub fn rate(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the consumers until together they received at least `expected` messages and
/// then nothing more for `quiet` (so extra copies are counted too), or `limit` passed.
pub async fn drain(
    consumers: Vec<Box<dyn Consumer>>,
    expected: u64,
    quiet: Duration,
    limit: Duration,
) -> anyhow::Result<Drain> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start_ns = now_ns();
    let last_ns = Arc::new(AtomicU64::new(start_ns));
    let mut tasks = Vec::new();
    for mut c in consumers {
        let (stop, count, last_ns) = (Arc::clone(&stop), Arc::clone(&count), Arc::clone(&last_ns));
        tasks.push(tokio::spawn(async move {
            let mut keys = Vec::new();
            let mut hist = Histogram::<u64>::new(3)?;
            let mut unstamped = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let got = c.receive_ack(100, Duration::from_millis(100)).await?;
                if got.bodies.is_empty() {
                    continue;
                }
                // Latency ends when the messages were received (before their ack).
                let now = got.at_ns;
                for b in &got.bodies {
                    match sent_ns(b) {
                        Some(t) if t > 0 && t <= now => hist.record(((now - t) / 1000).max(1))?,
                        Some(t) if t > 0 => {}
                        _ => unstamped += 1,
                    }
                    keys.push(control_id(b).map_or(0, key_hash));
                }
                count.fetch_add(got.bodies.len() as u64, Ordering::Relaxed);
                last_ns.fetch_max(now_ns(), Ordering::Relaxed);
            }
            c.finish().await?;
            Ok::<_, anyhow::Error>((keys, hist, unstamped))
        }));
    }
    let t0 = Instant::now();
    let mut timed_out = false;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let quiet_for =
            Duration::from_nanos(now_ns().saturating_sub(last_ns.load(Ordering::Relaxed)));
        if count.load(Ordering::Relaxed) >= expected && quiet_for >= quiet {
            break;
        }
        if t0.elapsed() > limit {
            timed_out = true;
            break;
        }
        if tasks.iter().any(tokio::task::JoinHandle::is_finished) {
            break; // a consumer failed: its error is returned below
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut distinct = HashSet::new();
    let mut hist = Histogram::<u64>::new(3)?;
    let mut unstamped = 0;
    for t in tasks {
        let (keys, h, u) = t.await??;
        distinct.extend(keys);
        hist.add(h)?;
        unstamped += u;
    }
    Ok(Drain {
        received: count.load(Ordering::Relaxed),
        unstamped,
        distinct: distinct.len() as u64,
        elapsed: Duration::from_nanos(last_ns.load(Ordering::Relaxed).saturating_sub(start_ns)),
        timed_out,
        latency_us: hist,
    })
}

/// W2 (retrying producer, counted at the consumer) and W3 (draining what it stored).
#[derive(Debug)]
pub struct W2 {
    pub unique: u64,
    pub sent: u64,
    pub resends: u64,
    pub duplicates_reported: u64,
    pub publish_elapsed: Duration,
    pub publish_complete: bool,
    pub drain: Drain,
    /// `cpu` read just before and just after the drain.
    pub drain_cpu: [CpuReading; 2],
}

/// CPU seconds used so far by (the system's server processes, this harness), when known.
pub type CpuReading = (Option<f64>, Option<f64>);

/// The send order: every unique id once, and after every 10th a resend of an earlier id
/// (byte-identical: same MSH-10, same body), mostly ≥ 512 positions back.
fn w2_plan(unique: u64) -> Vec<u64> {
    let mut plan = Vec::with_capacity(usize::try_from(unique + unique / 10).unwrap_or(0));
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for u in 0..unique {
        plan.push(u);
        if (u + 1).is_multiple_of(10) {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let range = if u >= 1024 { u - 512 } else { u + 1 };
            plan.push((x >> 33) % range);
        }
    }
    plan
}

pub async fn w2_w3(
    d: Arc<dyn Driver>,
    topic: &str,
    unique: u64,
    inflight: usize,
    consumers: usize,
    limit: Duration,
    cpu: &dyn Fn() -> CpuReading,
) -> anyhow::Result<W2> {
    d.setup(topic, &["s".to_owned()]).await?;
    let plan = Arc::new(w2_plan(unique));
    let next = Arc::new(AtomicUsize::new(0));
    let dups = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (d, plan, next, dups, sent) = (
            Arc::clone(&d),
            Arc::clone(&plan),
            Arc::clone(&next),
            Arc::clone(&dups),
            Arc::clone(&sent),
        );
        let topic = topic.to_owned();
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < limit {
                let Some(&id) = plan.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let key = format!("W2-{id:010}");
                if d.publish(&topic, &key, oru(&key, 0)).await? {
                    dups.fetch_add(1, Ordering::Relaxed);
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let publish_elapsed = start.elapsed();
    let sent = sent.load(Ordering::Relaxed);
    let mut cs = Vec::new();
    for i in 0..consumers.max(1) {
        cs.push(d.consumer(topic, "s", &format!("c{i}")).await?);
    }
    let before = cpu();
    let drain = drain(cs, unique, Duration::from_secs(1), limit).await?;
    let drain_cpu = [before, cpu()];
    Ok(W2 {
        unique,
        sent,
        resends: plan.len() as u64 - unique,
        duplicates_reported: dups.load(Ordering::Relaxed),
        publish_elapsed,
        publish_complete: sent == plan.len() as u64,
        drain,
        drain_cpu,
    })
}

/// W4: publish at a fixed rate (open loop, ticks of 1 ms) while one consumer receives
/// and acks; latency = receive time − send time stamped in the body.
#[derive(Debug)]
pub struct W4 {
    pub target_rate: u64,
    /// Measured messages sent (after the warm-up).
    pub sent: u64,
    /// Warm-up messages sent first at the same rate (not measured; their bodies carry
    /// no send time, so the consumer leaves them out of the latency).
    pub warmup_sent: u64,
    /// Publishes that failed (e.g. the client's ack timeout when the system falls behind
    /// the rate), warm-up included, and the first such error.
    pub failed: u64,
    pub first_error: Option<String>,
    pub send_elapsed: Duration,
    /// Publish → acknowledgement of the same messages (µs): the publish side of the
    /// end-to-end latency.
    pub ack_latency_us: Histogram<u64>,
    pub drain: Drain,
}

impl W4 {
    /// Measured messages the consumer received (warm-up ones left out).
    pub fn received(&self) -> u64 {
        self.drain.received.saturating_sub(self.drain.unstamped)
    }
}

/// Publishes sent at a fixed rate, each its own task.
struct Paced {
    sent: u64,
    failed: u64,
    first_error: Option<String>,
    elapsed: Duration,
    acks: Histogram<u64>,
}

/// Sends `total` messages at `rate` (`rate / 1000` per 1 ms tick), each publish its own
/// task (open loop: a slow answer does not slow the sending). Keys are
/// `{prefix}{n:010}`; with `stamped`, each body carries its send time.
async fn paced(
    d: &Arc<dyn Driver>,
    topic: &str,
    rate: u64,
    total: u64,
    prefix: &'static str,
    stamped: bool,
) -> anyhow::Result<Paced> {
    let per_tick = (rate / 1000).max(1);
    let limit = Arc::new(tokio::sync::Semaphore::new(4096));
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut p = Paced {
        sent: 0,
        failed: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        acks: Histogram::<u64>::new(3)?,
    };
    let mut pending = Vec::new();
    let start = Instant::now();
    while p.sent < total {
        ticker.tick().await;
        for _ in 0..per_tick.min(total - p.sent) {
            p.sent += 1;
            let n = p.sent;
            let permit = Arc::clone(&limit).acquire_owned().await?;
            let d = Arc::clone(d);
            let topic = topic.to_owned();
            pending.push(tokio::spawn(async move {
                let key = format!("{prefix}{n:010}");
                let t0 = Instant::now();
                let at = if stamped { now_ns() } else { 0 };
                let r = d.publish(&topic, &key, oru(&key, at)).await;
                let took = t0.elapsed();
                drop(permit);
                r.map(|_| took)
            }));
        }
        // Reap finished sends now and then so the list stays short.
        if pending.len() > 8192 {
            let (done, rest): (Vec<_>, Vec<_>) = pending
                .into_iter()
                .partition(tokio::task::JoinHandle::is_finished);
            for t in done {
                p.reap(t.await?)?;
            }
            pending = rest;
        }
    }
    p.elapsed = start.elapsed();
    for t in pending {
        p.reap(t.await?)?;
    }
    Ok(p)
}

impl Paced {
    fn reap(&mut self, r: anyhow::Result<Duration>) -> anyhow::Result<()> {
        match r {
            Ok(took) => record(&mut self.acks, took)?,
            Err(e) => {
                self.failed += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        Ok(())
    }
}

/// W4: a consumer receives while messages are published at `rate` for `warmup`
/// (not measured: warms the connections, the pool and the topic, as W1's warm-up
/// does), then for `duration` (measured: publish → receive and publish → ack).
pub async fn w4(
    d: Arc<dyn Driver>,
    topic: &str,
    rate: u64,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<W4> {
    d.setup(topic, &["s".to_owned()]).await?;
    let total = rate * duration.as_secs().max(1);
    let warm = rate * warmup.as_secs();
    let consumer = d.consumer(topic, "s", "c0").await?;
    let receiver = tokio::spawn(drain(
        vec![consumer],
        warm + total,
        Duration::from_millis(500),
        warmup + duration + Duration::from_secs(30),
    ));
    let w = paced(&d, topic, rate, warm, "W4-warm-", false).await?;
    let m = paced(&d, topic, rate, total, "W4-", true).await?;
    let drain = receiver.await??;
    Ok(W4 {
        target_rate: rate,
        sent: m.sent,
        warmup_sent: w.sent,
        failed: w.failed + m.failed,
        first_error: w.first_error.or(m.first_error),
        send_elapsed: m.elapsed,
        ack_latency_us: m.acks,
        drain,
    })
}

/// W5: `messages` published to a topic with 4 fan-out subscriptions and one shared
/// one; then 4 consumers (one per fan-out subscription) drain together, then 8
/// competing consumers drain the shared subscription.
#[derive(Debug)]
pub struct W5 {
    pub published: u64,
    pub fanout: Drain,
    pub competing: Drain,
}

pub async fn w5(
    d: Arc<dyn Driver>,
    topic: &str,
    messages: u64,
    limit: Duration,
) -> anyhow::Result<W5> {
    let subs: Vec<String> = ["f0", "f1", "f2", "f3", "shared"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    d.setup(topic, &subs).await?;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..256 {
        let (d, next) = (Arc::clone(&d), Arc::clone(&next));
        let topic = topic.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while start.elapsed() < limit {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= messages {
                    break;
                }
                let key = format!("W5-{i:010}");
                d.publish(&topic, &key, oru(&key, 0)).await?;
                sent += 1;
            }
            Ok::<_, anyhow::Error>(sent)
        }));
    }
    let mut published = 0;
    for t in tasks {
        published += t.await??;
    }
    let mut cs = Vec::new();
    for (i, s) in subs.iter().take(4).enumerate() {
        cs.push(d.consumer(topic, s, &format!("fan{i}")).await?);
    }
    let fanout = drain(cs, published * 4, Duration::from_millis(500), limit).await?;
    let mut cs = Vec::new();
    for i in 0..8 {
        cs.push(d.consumer(topic, "shared", &format!("comp{i}")).await?);
    }
    let competing = drain(cs, published, Duration::from_millis(500), limit).await?;
    Ok(W5 {
        published,
        fanout,
        competing,
    })
}

/// Counters shared by a measurement's tasks: messages counted in the window, and all.
type Counters<'a> = (&'a AtomicU64, &'a AtomicU64);

/// Lets `tasks` warm up, counts for `duration`, stops them and merges their latency
/// histograms (`window` = (warm-up, duration)).
pub async fn measure_window(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>>,
    window: (Duration, Duration),
    measuring: &AtomicBool,
    stop: &AtomicBool,
    (counted, total): Counters<'_>,
) -> anyhow::Result<Throughput> {
    let (warmup, duration) = window;
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await??)?;
    }
    Ok(Throughput {
        messages: counted.load(Ordering::Relaxed),
        total: total.load(Ordering::Relaxed),
        elapsed,
        latency_us: hist,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w2_plan_has_every_id_once_plus_ten_percent_earlier_resends() {
        let plan = w2_plan(100_000);
        assert_eq!(plan.len(), 110_000);
        let distinct: HashSet<_> = plan.iter().collect();
        assert_eq!(distinct.len(), 100_000);
        let mut seen = HashSet::new();
        for id in plan {
            // A resend is always of an id sent before.
            if !seen.insert(id) {
                continue;
            }
        }
        assert_eq!(seen.len(), 100_000);
    }
}
