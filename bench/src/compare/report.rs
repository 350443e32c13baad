//! The markdown report, the goals (as ratios within the run) and the chart's panels.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use super::chart::Panel;
use super::{CompareArgs, Outcome};
use crate::disk::{Sequential, SyncLoop};

/// What the machine is.
#[derive(Debug)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub filesystem: String,
    /// /proc/loadavg when the run started (other work on the machine).
    pub load: String,
}

impl Machine {
    pub fn probe(dir: &Path) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "?".into(), |s| s.trim().to_owned());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        let filesystem = std::process::Command::new("df")
            .arg("-T")
            .arg(dir)
            .output()
            .ok()
            .and_then(|o| {
                let s = String::from_utf8_lossy(&o.stdout).to_string();
                let l = s.lines().nth(1)?.to_owned();
                let cols: Vec<&str> = l.split_whitespace().collect();
                Some(format!(
                    "{} ({}) mounted on {}",
                    cols.first()?,
                    cols.get(1)?,
                    cols.last()?
                ))
            })
            .unwrap_or_else(|| "?".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            memory_gib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            filesystem,
            load: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// The disk's own limits, measured in this run.
#[derive(Debug)]
pub struct Disk {
    pub when: String,
    pub sync_p50: f64,
    pub sync_p99: f64,
    pub sync_p999: f64,
    pub sync_mean: f64,
    pub syncs_per_sec: f64,
    pub seq_mbs: f64,
    /// Open-loop latency floor under ideal group commit (see
    /// [`SyncLoop::open_loop_floor_us`]), p50 / p99 (ms).
    pub floor_p50: f64,
    pub floor_p99: f64,
}

impl Disk {
    pub fn new(when: &str, s: &SyncLoop, q: &Sequential) -> anyhow::Result<Disk> {
        let ms = |q: f64| s.latency_us.value_at_quantile(q) as f64 / 1000.0;
        let floor = s.open_loop_floor_us()?;
        let floor_ms = |q: f64| floor.value_at_quantile(q) as f64 / 1000.0;
        Ok(Disk {
            when: when.to_owned(),
            sync_p50: ms(0.5),
            sync_p99: ms(0.99),
            sync_p999: ms(0.999),
            sync_mean: s.mean_us() / 1000.0,
            syncs_per_sec: s.ops_per_sec(),
            seq_mbs: q.bytes_per_sec() / 1e6,
            floor_p50: floor_ms(0.5),
            floor_p99: floor_ms(0.99),
        })
    }
}

pub struct Input<'a> {
    pub stamp: &'a str,
    pub args: &'a CompareArgs,
    pub machine: &'a Machine,
    /// The measurement the goals use (the lower fdatasync p99).
    pub disk: Option<&'a Disk>,
    pub disks: &'a [Disk],
    pub outcomes: &'a [Outcome],
    pub png: Option<&'a Path>,
    pub notes: Vec<String>,
    pub elapsed: Duration,
}

/// 1234567.8 → "1,234,568".
pub fn count(v: f64) -> String {
    let n = v.round().max(0.0) as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn opt_count(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), count)
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.3}"))
}

fn opt_us(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.1}"))
}

fn lat(o: &Outcome, p: &str) -> String {
    format!(
        "{} / {} / {}",
        opt_ms(o.get(&format!("{p}.p50"))),
        opt_ms(o.get(&format!("{p}.p99"))),
        opt_ms(o.get(&format!("{p}.p999")))
    )
}

fn find<'a>(os: &'a [Outcome], key: &str) -> Option<&'a Outcome> {
    os.iter()
        .find(|o| o.key == key && o.skipped.is_none() && !o.median.is_empty())
}

/// One goal of the issue, evaluated within this run.
#[derive(Debug)]
pub struct Goal {
    pub goal: &'static str,
    pub measured: String,
    pub ratio: String,
    pub met: Option<bool>,
}

pub fn goals(os: &[Outcome], disk: Option<&Disk>) -> Vec<Goal> {
    let cb = find(os, "carebus");
    let get = |o: Option<&Outcome>, k: &str| o.and_then(|o| o.get(k));
    let mut g = Vec::new();
    let ratio_goal =
        |goal: &'static str, a: Option<f64>, b: Option<f64>, need: f64, what: &str| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Goal {
                goal,
                measured: format!("{} vs {} {what}", count(a), count(b)),
                ratio: format!("{:.2}× (goal ≥ {need}×)", a / b),
                met: Some(a / b >= need),
            },
            _ => Goal {
                goal,
                measured: "not measured".into(),
                ratio: "–".into(),
                met: None,
            },
        };
    let nats = find(os, "nats");
    let rabbit = find(os, "rabbitmq");
    g.push(ratio_goal(
        "W1 in-flight 256: carebus (fsync) ≥ NATS default (no fsync)",
        get(cb, "w1_256.rate"),
        get(nats, "w1_256.rate"),
        1.0,
        "msgs/s",
    ));
    g.push(ratio_goal(
        "W1 in-flight 256: carebus ≥ 5× RabbitMQ quorum",
        get(cb, "w1_256.rate"),
        get(rabbit, "w1_256.rate"),
        5.0,
        "msgs/s",
    ));
    g.push(ratio_goal(
        "W1 in-flight 256 over messages:stream: carebus (fsync) ≥ NATS default (no fsync)",
        get(cb, "stream_256.rate"),
        get(nats, "w1_256.rate"),
        1.0,
        "msgs/s",
    ));
    g.push(ratio_goal(
        "W1 in-flight 256 over messages:stream: carebus ≥ 5× RabbitMQ quorum",
        get(cb, "stream_256.rate"),
        get(rabbit, "w1_256.rate"),
        5.0,
        "msgs/s",
    ));
    for (goal, key) in [
        (
            "W1 in-flight 1: carebus p99 ≤ 2× raw fdatasync p99",
            "w1_1.p99",
        ),
        (
            "W1 in-flight 1 over messages:stream: carebus p99 ≤ 2× raw fdatasync p99",
            "stream_1.p99",
        ),
    ] {
        g.push(match (get(cb, key), disk.map(|d| d.sync_p99)) {
            (Some(a), Some(b)) if b > 0.0 => Goal {
                goal,
                measured: format!("{a:.3} ms vs {b:.3} ms"),
                ratio: format!("{:.2}× (goal ≤ 2×)", a / b),
                met: Some(a / b <= 2.0),
            },
            _ => Goal {
                goal,
                measured: "not measured".into(),
                ratio: "–".into(),
                met: None,
            },
        });
    }
    g.push(ratio_goal(
        "W3 drain: carebus ≥ NATS (default)",
        get(cb, "w3.rate"),
        get(nats, "w3.rate"),
        1.0,
        "msgs/s",
    ));
    g.push(ratio_goal(
        "W3 drain: carebus ≥ NATS (sync always)",
        get(cb, "w3.rate"),
        get(find(os, "nats-sync"), "w3.rate"),
        1.0,
        "msgs/s",
    ));
    match (
        get(cb, "w2.received"),
        get(cb, "w2.distinct"),
        get(cb, "w2.unique"),
    ) {
        (Some(r), Some(d), Some(u)) => g.push(Goal {
            goal: "W2: carebus consumer receives each unique message exactly once (100,000)",
            measured: format!(
                "{} received, {} distinct, of {} unique",
                count(r),
                count(d),
                count(u)
            ),
            ratio: format!("{:.4}", r / u.max(1.0)),
            met: Some((r - u).abs() < 0.5 && (d - u).abs() < 0.5),
        }),
        _ => g.push(Goal {
            goal: "W2: carebus consumer receives each unique message exactly once (100,000)",
            measured: "not measured".into(),
            ratio: "–".into(),
            met: None,
        }),
    }
    for (goal, key) in [
        (
            "W4: carebus p99 publish→receive ≤ 2 ms at 5,000 msg/s",
            "w4.p99",
        ),
        (
            "W4 with the producer on messages:stream: carebus p99 publish→receive ≤ 2 ms at 5,000 msg/s",
            "w4stream.p99",
        ),
    ] {
        let floor = disk.map_or(String::new(), |d| {
            format!(" (this disk's open-loop floor: p99 {:.3} ms)", d.floor_p99)
        });
        g.push(match get(cb, key) {
            Some(p) => Goal {
                goal,
                measured: format!("{p:.3} ms{floor}"),
                ratio: format!("{:.2}× of 2 ms", p / 2.0),
                met: Some(p <= 2.0),
            },
            None => Goal {
                goal,
                measured: "not measured".into(),
                ratio: "–".into(),
                met: None,
            },
        });
    }
    g
}

fn label(o: &Outcome) -> String {
    match o.key.as_str() {
        "carebus" => "carebus (HTTP, carebus-client)".into(),
        "nats" => "NATS JetStream, default".into(),
        "nats-sync" => "NATS JetStream, sync always".into(),
        "rabbitmq" => "RabbitMQ quorum queue".into(),
        k => k.into(),
    }
}

/// A row for a system that did not run (or produced nothing).
fn missing(o: &Outcome, cols: usize) -> Option<String> {
    let why = o.skipped.clone().or_else(|| {
        o.median
            .is_empty()
            .then(|| format!("failed: {}", o.errors.first().cloned().unwrap_or_default()))
    })?;
    Some(format!(
        "| {} | {} | {}{} |\n",
        label(o),
        o.durability,
        why.replace('|', "/").replace('\n', " "),
        " |".repeat(cols.saturating_sub(1))
    ))
}

pub fn markdown(i: &Input<'_>) -> String {
    let mut s = String::new();
    let os = i.outcomes;
    let _ = writeln!(s, "# carebus vs peer brokers — run of {}\n", i.stamp);
    let _ = writeln!(
        s,
        "Command: `carebus-bench {}` ({} round(s) per system, each on a new server, \
         rounds interleaved across the systems; figures are medians over rounds; each workload's \
         topic, stream or queue is deleted once its figures are taken, so the next starts with \
         the memory its data held given back). Whole run: {:.0} s.\n",
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        i.args.rounds.max(1),
        i.elapsed.as_secs_f64()
    );
    let m = i.machine;
    let _ = writeln!(
        s,
        "Machine: {} vCPU ({}), {:.1} GiB RAM, Linux {}; data on {}. The harness (clients) \
         and the system under test share the CPUs; load average at the start: {}.\n",
        m.cpus, m.cpu_model, m.memory_gib, m.kernel, m.filesystem, m.load
    );
    if !i.disks.is_empty() {
        let _ = writeln!(
            s,
            "## The disk's limits (same run, same filesystem)\n\n\
             Measured at the start and at the end of the run (5 s each); the goals use the \
             measurement with the lower fdatasync p99 (the stricter one for carebus). \
             Open-loop floor: the latency messages arriving at random times (as in W4) \
             would see with ideal group commit and no CPU cost, computed from the same \
             sequence of fdatasyncs: each waits for the fdatasync in progress, then the \
             next one. A slow fdatasync counts by how long it lasts (every message of \
             those milliseconds waits), so its p99 can be far above the per-call p99.\n"
        );
        let _ = writeln!(
            s,
            "| when | raw 1 KiB write + fdatasync p50 / p99 / p999 | mean | syncs/s (1 writer) | sequential write | open-loop floor p50 / p99 |\n|---|---|---:|---:|---:|---|"
        );
    }
    for d in i.disks {
        let _ = writeln!(
            s,
            "| {} | {:.3} / {:.3} / {:.3} ms | {:.3} ms | {} | {} MB/s | {:.3} / {:.3} ms |",
            d.when,
            d.sync_p50,
            d.sync_p99,
            d.sync_p999,
            d.sync_mean,
            count(d.syncs_per_sec),
            count(d.seq_mbs),
            d.floor_p50,
            d.floor_p99
        );
    }
    if !i.disks.is_empty() {
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "## Systems\n\n| system | version | durability |\n|---|---|---|"
    );
    for o in os {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            label(o),
            if o.version.is_empty() {
                "–"
            } else {
                &o.version
            },
            o.skipped.as_deref().map_or_else(
                || o.durability.clone(),
                |w| format!("{} — {w}", o.durability)
            )
        );
    }
    s.push('\n');

    let _ = writeln!(
        s,
        "## W1 durable publish with idempotency keys (1 KiB ORU^R01, MSH-10 = key)\n\n\
         {} s measured after {} s warm-up; latency = publish → ack (ms).\n\n\
         Server CPU = CPU time of the server's processes (from /proc, warm-up \
         included) per message acknowledged; client CPU = this harness's.\n\n\
         | system | durability | in-flight | msgs/s | MB/s | p50 / p99 / p999 ms | server CPU µs/msg | client CPU µs/msg |\n|---|---|---:|---:|---:|---|---:|---:|",
        i.args.seconds, i.args.warmup
    );
    for o in os {
        if let Some(r) = missing(o, 6) {
            s.push_str(&r);
            continue;
        }
        for f in [1, 256] {
            let p = format!("w1_{f}");
            let _ = writeln!(
                s,
                "| {} | {} | {f} | {} | {:.1} | {} | {} | {} |",
                label(o),
                o.durability,
                opt_count(o.get(&format!("{p}.rate"))),
                o.get(&format!("{p}.mbs")).unwrap_or(0.0),
                lat(o, &p),
                opt_us(o.get(&format!("{p}.server_cpu_us"))),
                opt_us(o.get(&format!("{p}.client_cpu_us")))
            );
        }
    }
    s.push('\n');

    if let Some(cb) = find(os, "carebus") {
        let _ = writeln!(
            s,
            "### Where carebus's time goes (same run; all with idempotency keys, fsync before ack)\n\n\
             | path | in flight | msgs/s | p50 / p99 / p999 ms (per call) | server CPU µs/msg | client CPU µs/msg |\n|---|---:|---:|---|---:|---:|"
        );
        let rows = [
            ("HTTP, 1 message per request (W1)", "256 messages", "w1_256"),
            (
                "HTTP `publish_batch`, 64 messages per request",
                "4 requests = 256 messages",
                "batch",
            ),
            (
                "WebSocket `messages:stream`, 1 message per frame, one socket",
                "256 messages",
                "stream_256",
            ),
            (
                "in-process carebus-core (no HTTP; CPU = whole process)",
                "256 publishers",
                "core_256",
            ),
            ("HTTP, 1 message per request (W1)", "1", "w1_1"),
            (
                "WebSocket `messages:stream`, 1 message per frame, one socket",
                "1",
                "stream_1",
            ),
            (
                "in-process carebus-core (no HTTP; CPU = whole process)",
                "1",
                "core_1",
            ),
        ];
        for (what, inflight, p) in rows {
            let _ = writeln!(
                s,
                "| {what} | {inflight} | {} | {} | {} | {} |",
                opt_count(cb.get(&format!("{p}.rate"))),
                lat(cb, p),
                opt_us(cb.get(&format!("{p}.server_cpu_us"))),
                opt_us(cb.get(&format!("{p}.client_cpu_us")))
            );
        }
        s.push('\n');
    }

    let _ = writeln!(
        s,
        "## W2 retrying producer and W3 drain\n\n\
         W2: {} unique messages plus 10 % byte-identical resends of earlier ids (same \
         MSH-10 = same idempotency key / `Nats-Msg-Id` / AMQP message-id), 256 in flight; \
         then {} competing consumers drain the subscription with explicit acks and count \
         what arrives (exactly-once = received = distinct = {}). W3 = that drain's rate \
         (first receive to last message); CPU per message drained, server and harness \
         (the drain's CPU over the messages received, including its final 1 s of quiet).\n\n\
         | system | durability | sent | dups reported by broker | received | distinct | exactly-once | W3 drain msgs/s | W3 CPU µs/msg server / client |\n|---|---|---:|---:|---:|---:|---|---:|---|",
        count(i.args.w2_messages as f64),
        i.args.drain_consumers,
        count(i.args.w2_messages as f64)
    );
    for o in os {
        if let Some(r) = missing(o, 7) {
            s.push_str(&r);
            continue;
        }
        let (rec, dis, uni) = (
            o.get("w2.received"),
            o.get("w2.distinct"),
            o.get("w2.unique"),
        );
        let exact = match (rec, dis, uni) {
            (Some(r), Some(d), Some(u)) if (r - u).abs() < 0.5 && (d - u).abs() < 0.5 => {
                "yes".to_owned()
            }
            (Some(r), Some(_), Some(u)) if r > u => format!("no: {} extra copies", count(r - u)),
            (Some(_), Some(_), Some(_)) => "no: messages missing".to_owned(),
            _ => "–".to_owned(),
        };
        let incomplete = if o.get("w2.complete") == Some(0.0) {
            " (publish cut at time limit)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "| {} | {} | {}{incomplete} | {} | {} | {} | {exact} | {} | {} / {} |",
            label(o),
            o.durability,
            opt_count(o.get("w2.sent")),
            opt_count(o.get("w2.dups")),
            opt_count(rec),
            opt_count(dis),
            opt_count(o.get("w3.rate")),
            opt_us(o.get("w3.server_cpu_us")),
            opt_us(o.get("w3.client_cpu_us"))
        );
    }
    s.push('\n');

    let _ = writeln!(
        s,
        "## W4 end-to-end latency at a fixed rate\n\n\
         {} msg/s for {} s, measured after {} s of warm-up at the same rate (not counted: \
         it warms connections and the topic, as W1's warm-up does) (open loop: {} messages \
         per 1 ms tick, each publish its own task); one consumer receives and acks; \
         latency = time the message was received (before its ack) − send time stamped in \
         the body (ms); the publish side alone = publish → its acknowledgement; received = \
         measured messages the consumer got.\n\n\
         | system | durability | achieved msgs/s | received | publishes failed | p50 / p99 / p999 ms | publish → ack p50 / p99 / p999 ms |\n|---|---|---:|---:|---:|---|---|",
        count(i.args.w4_rate as f64),
        i.args.w4_seconds,
        i.args.warmup,
        (i.args.w4_rate / 1000).max(1)
    );
    for o in os {
        if let Some(r) = missing(o, 5) {
            s.push_str(&r);
            continue;
        }
        let row = |who: &str, p: &str| {
            format!(
                "| {who} | {} | {} | {} of {} | {} | {} | {} |\n",
                o.durability,
                opt_count(o.get(&format!("{p}.achieved"))),
                opt_count(o.get(&format!("{p}.received"))),
                opt_count(o.get(&format!("{p}.sent"))),
                opt_count(o.get(&format!("{p}.failed"))),
                lat(o, p),
                lat(o, &format!("{p}ack"))
            )
        };
        s.push_str(&row(&label(o), "w4"));
        if o.key == "carebus" && o.get("w4stream.sent").is_some() {
            s.push_str(&row(
                "carebus, producer on `messages:stream` (one socket)",
                "w4stream",
            ));
        }
        if o.key == "carebus" && o.get("w4core.sent").is_some() {
            s.push_str(&row(
                "carebus-core in process (no HTTP: where the time goes)",
                "w4core",
            ));
        }
    }
    s.push('\n');

    let _ = writeln!(
        s,
        "## W5 fan-out and competing consumers\n\n\
         {} messages published (256 in flight) to a topic with 4 fan-out subscriptions and \
         one shared subscription; then one consumer per fan-out subscription drains all 4 \
         together (deliveries/s over the 4), then 8 competing consumers drain the shared \
         one.\n\n\
         | system | durability | fan-out 4 subs: deliveries/s | delivered | 8 competing: msgs/s | delivered |\n|---|---|---:|---:|---:|---:|",
        count(i.args.w5_messages as f64)
    );
    for o in os {
        if let Some(r) = missing(o, 4) {
            s.push_str(&r);
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            label(o),
            o.durability,
            opt_count(o.get("w5.fanout_rate")),
            opt_count(o.get("w5.fanout_received")),
            opt_count(o.get("w5.comp_rate")),
            opt_count(o.get("w5.comp_received"))
        );
    }
    s.push('\n');

    if let Some(cb) = find(os, "carebus") {
        let _ = writeln!(
            s,
            "## W6 MLLP ingest (carebus only; ACK after fsync; broker in process)\n\n\
             | connections | msgs/s | p50 / p99 / p999 ms |\n|---:|---:|---|"
        );
        for c in [1, 16] {
            let p = format!("w6_{c}");
            let _ = writeln!(
                s,
                "| {c} | {} | {} |",
                opt_count(cb.get(&format!("{p}.rate"))),
                lat(cb, &p)
            );
        }
        s.push('\n');
    }

    if i.disk.is_some() {
        let _ = writeln!(
            s,
            "## Goals (ratios within this run)\n\n| goal | measured | ratio | met |\n|---|---|---|---|"
        );
        for g in goals(os, i.disk) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                g.goal,
                g.measured,
                g.ratio,
                match g.met {
                    Some(true) => "**met**",
                    Some(false) => "**not met**",
                    None => "n/a",
                }
            );
        }
        s.push('\n');
    }

    if os.iter().any(|o| !o.strace.is_empty()) {
        let _ = writeln!(
            s,
            "## Sync policy verified with strace\n\n\
             `strace -f -c -e trace=fsync,fdatasync,sync_file_range,syncfs,sync,msync -p <server pids>` \
             attached while the harness publishes (after the topic was created).\n\n\
             | system | claimed | publishers | messages | sync calls | per message | verdict |\n|---|---|---:|---:|---|---:|---|"
        );
        for o in os {
            for p in &o.strace {
                let calls = if p.calls.is_empty() {
                    "none".to_owned()
                } else {
                    p.calls
                        .iter()
                        .map(|(k, v)| format!("{k} {}", count(*v as f64)))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let per = p.syncs() as f64 / (p.messages.max(1)) as f64;
                let verdict = if p.syncs() == 0 {
                    "no sync while publishing: acknowledged before fsync"
                } else if p.inflight == 1 && per >= 0.95 {
                    "a sync for every acknowledged message: fsync before ack"
                } else if p.inflight == 1 {
                    "fewer syncs than acknowledgements with one publisher: NOT fsync before every ack"
                } else if per >= 0.95 {
                    "a sync per message even with concurrent publishers (no group commit)"
                } else {
                    "syncs shared by concurrent publishes (group commit)"
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {calls} | {per:.2} | {verdict} |",
                    label(o),
                    o.durability,
                    p.inflight,
                    count(p.messages as f64),
                );
            }
        }
        s.push('\n');
    }

    if let Some(png) = i.png {
        let _ = writeln!(s, "Chart: `{}`\n", png.display());
    }
    let _ = writeln!(s, "## Settings\n");
    for o in os {
        if !o.settings.is_empty() {
            let _ = writeln!(s, "- **{}**: {}\n", label(o), o.settings);
        }
    }
    let errors: Vec<String> = os
        .iter()
        .flat_map(|o| o.errors.iter().map(move |e| format!("{}: {e}", o.key)))
        .chain(i.notes.iter().cloned())
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(s, "## Problems in this run\n");
        for e in errors {
            let _ = writeln!(s, "- {}", e.replace('\n', " "));
        }
        s.push('\n');
    }
    if i.args.rounds > 1 {
        let _ = writeln!(s, "## Every round\n");
        for o in os {
            for (r, m) in o.rounds.iter().enumerate() {
                let key = |k: &str| opt_count(m.get(k).copied());
                let _ = writeln!(
                    s,
                    "- {} round {r}: W1/1 {} msgs/s, W1/256 {} msgs/s, W3 {} msgs/s, W4 p99 {} ms",
                    o.key,
                    key("w1_1.rate"),
                    key("w1_256.rate"),
                    key("w3.rate"),
                    opt_ms(m.get("w4.p99").copied())
                );
            }
        }
    }
    s
}

/// The chart: headline figures per system.
pub fn panels(os: &[Outcome], disk: Option<&Disk>) -> Vec<Panel> {
    let short = |o: &Outcome| {
        match o.key.as_str() {
            "carebus" => "carebus",
            "nats" => "NATS default",
            "nats-sync" => "NATS sync",
            "rabbitmq" => "RabbitMQ",
            k => k,
        }
        .to_owned()
    };
    let per = |k: &str| -> Vec<(String, Option<f64>)> {
        os.iter().map(|o| (short(o), o.get(k))).collect()
    };
    let mut w1_256 = per("w1_256.rate");
    if let Some(cb) = find(os, "carebus") {
        w1_256.push(("carebus batch".into(), cb.get("batch.rate")));
        w1_256.push(("carebus stream".into(), cb.get("stream_256.rate")));
        w1_256.push(("carebus core".into(), cb.get("core_256.rate")));
    }
    let mut w1_1 = per("w1_1.p99");
    w1_1.push(("raw fdatasync".into(), disk.map(|d| d.sync_p99)));
    vec![
        Panel {
            title: "W1 in-flight 256: msgs/s".into(),
            bars: w1_256,
            log: false,
        },
        Panel {
            title: "W1 in-flight 1: msgs/s".into(),
            bars: per("w1_1.rate"),
            log: false,
        },
        Panel {
            title: "W1 in-flight 1: p99 publish→ack (ms, log scale)".into(),
            bars: w1_1,
            log: true,
        },
        Panel {
            title: "W3 drain with explicit acks: msgs/s".into(),
            bars: per("w3.rate"),
            log: false,
        },
        Panel {
            title: "W4 p99 publish→receive at 5,000/s (ms, log scale)".into(),
            bars: per("w4.p99"),
            log: true,
        },
        Panel {
            title: "W5 8 competing consumers: msgs/s".into(),
            bars: per("w5.comp_rate"),
            log: false,
        },
    ]
}
