//! The `carebus` command.

mod commands;
mod output;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// carebus: an exactly-once message broker for clinical data.
#[derive(Debug, Parser)]
#[command(name = "carebus", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "CAREBUS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// Exit codes of the client commands, shown in `--help`.
const EXIT_CODES: &str = "\
Client commands find the server from --url or CAREBUS_URL (default http://127.0.0.1:7070).

Exit codes:
  0  ok
  1  usage or other error
  2  command-line usage error (unknown flag, missing argument)
  3  server unreachable (connection refused, timeout, reset)
  4  not found (topic, subscription, message, dead letter)
  5  conflict or refusal (exists already, idempotency key reused with another body,
     stale delivery, partitions cannot shrink)
  6  server-side error (HTTP 5xx, including not_ready and storage_full)
  7  carebus check found damaged stored data";

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker with its embedded store.
    Serve(ServeArgs),
    /// Topics: list, get, create, update, delete.
    #[command(after_help = EXIT_CODES)]
    Topics(commands::TopicsCmd),
    /// Subscriptions of a topic: list, get, create, update, delete.
    #[command(visible_alias = "subs", after_help = EXIT_CODES)]
    Subscriptions(commands::SubscriptionsCmd),
    /// Publish messages (from an argument, standard input or files), with retries that
    /// never store a message twice.
    #[command(after_help = EXIT_CODES)]
    Produce(commands::ProduceCmd),
    /// Receive a subscription's messages, print them and acknowledge them.
    #[command(after_help = EXIT_CODES)]
    Consume(commands::ConsumeCmd),
    /// Dead letters of a subscription: list, replay, discard.
    #[command(after_help = EXIT_CODES)]
    Dlq(commands::DlqCmd),
    /// Where a message is in every subscription of its topic.
    #[command(after_help = EXIT_CODES)]
    Trace(commands::TraceCmd),
    /// Verify every stored batch of a data directory (checksums, framing, offsets)
    /// without changing anything. Exit 0 when clean, 7 when damage is found.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Directory of the embedded store (best checked while the server is stopped).
    #[arg(long, default_value = "./carebus-data", env = "CAREBUS_DATA_DIR")]
    data_dir: PathBuf,
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

/// Every log directory under a data directory: partitions, subscription event logs,
/// the transaction log.
fn log_dirs(data_dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    let subdirs = |d: &std::path::Path| -> std::io::Result<Vec<PathBuf>> {
        let mut v = Vec::new();
        if d.is_dir() {
            for e in std::fs::read_dir(d)? {
                let e = e?;
                if e.file_type()?.is_dir() {
                    v.push(e.path());
                }
            }
        }
        v.sort();
        Ok(v)
    };
    let mut out = Vec::new();
    for topic in subdirs(&data_dir.join("topics"))? {
        for entry in subdirs(&topic)? {
            let name = entry
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if name.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() {
                out.push(entry);
            } else if name == "subscriptions" {
                for sub in subdirs(&entry)? {
                    out.push(sub.join("events"));
                }
            }
        }
    }
    out.push(data_dir.join("txn"));
    Ok(out.into_iter().filter(|d| d.is_dir()).collect())
}

/// `carebus check`: 0 when clean, 7 when damage is found, 1 when it cannot read.
fn check(args: &CheckArgs) -> u8 {
    if !args.data_dir.is_dir() {
        eprintln!(
            "error: {} is not a carebus data directory",
            args.data_dir.display()
        );
        return output::exit::ERROR;
    }
    let dirs = match log_dirs(&args.data_dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot list {}: {e}", args.data_dir.display());
            return output::exit::ERROR;
        }
    };
    let mut reports = Vec::new();
    for d in dirs {
        match carebus_log::verify_dir(&d) {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!("error: {}: {e}", d.display());
                return output::exit::ERROR;
            }
        }
    }
    let damaged = reports.iter().any(|r| !r.is_clean());
    if args.json {
        let logs: Vec<serde_json::Value> = reports
            .iter()
            .map(|r| {
                serde_json::json!({
                    "dir": r.dir.display().to_string(),
                    "segments": r.segments,
                    "records": r.records,
                    "bytes": r.bytes,
                    "torn_tail_bytes": r.torn_tail_bytes,
                    "problems": r.problems,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "clean": !damaged, "logs": logs }));
    } else {
        for r in &reports {
            let state = if r.is_clean() { "ok" } else { "DAMAGED" };
            println!(
                "{state:8} {:>6} segments {:>10} records  {}",
                r.segments,
                r.records,
                r.dir.display()
            );
            for p in &r.problems {
                println!("         {p}");
            }
            if r.torn_tail_bytes > 0 {
                println!(
                    "         {} bytes of an unfinished write at the end (recovery cuts them)",
                    r.torn_tail_bytes
                );
            }
        }
        println!(
            "{}",
            if damaged {
                "damage found"
            } else {
                "all stored data verified"
            }
        );
    }
    if damaged {
        output::exit::DAMAGED
    } else {
        output::exit::OK
    }
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Subscriptions delivered to MLLP destinations (only from the config file).
    #[arg(skip)]
    mllp_egress: Vec<carebus_server::EgressBinding>,
    /// More MLLP listeners (only from the config file).
    #[arg(skip)]
    mllp_extra_addrs: Vec<SocketAddr>,
    /// MLLP ingress settings (only from the config file).
    #[arg(skip)]
    mllp_ingress: carebus_mllp::IngressConfig,
    /// MLLP over TLS (only from the config file).
    #[arg(skip)]
    mllp_tls: Option<carebus_server::MllpTls>,
    /// A TOML file with any of the settings below (keys: data_dir, http_addr,
    /// mllp_addr, mllp (true/false), fsync, max_body_bytes, http_max_connections,
    /// http_header_timeout_ms, worker_threads), and `[[mllp_egress]]`
    /// tables (topic, subscription, destination, connections, ack_timeout_ms,
    /// on_negative_ack = "dead_letter" | "retry"). Precedence: command-line flag, then
    /// environment variable, then this file, then the built-in default.
    #[arg(long, env = "CAREBUS_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the embedded store.
    #[arg(long, default_value = "./carebus-data", env = "CAREBUS_DATA_DIR")]
    data_dir: PathBuf,
    /// Address of the HTTP API (port 0 picks a free port; the chosen one is logged).
    #[arg(long, default_value = "127.0.0.1:7070", env = "CAREBUS_HTTP_ADDR")]
    http_addr: SocketAddr,
    /// When appends reach the disk: `always` (fdatasync before every acknowledgement,
    /// shared by concurrent writers) or a number of milliseconds between fsyncs
    /// (faster; a machine crash can lose acknowledged messages of that last interval).
    #[arg(long, default_value = "always", env = "CAREBUS_FSYNC")]
    fsync: String,
    /// Address of the HL7 v2 MLLP listener (port 0 picks a free port; the chosen one
    /// is logged as `mllp listening`).
    #[arg(long, default_value = "127.0.0.1:2575", env = "CAREBUS_MLLP_ADDR")]
    mllp_addr: SocketAddr,
    /// Do not listen for MLLP.
    #[arg(long, env = "CAREBUS_NO_MLLP")]
    no_mllp: bool,
    /// Largest HTTP request body accepted, in bytes (larger ones are answered 413).
    #[arg(long, default_value_t = carebus_server::DEFAULT_MAX_BODY_BYTES, env = "CAREBUS_MAX_BODY_BYTES", value_parser = parse_max_body)]
    max_body_bytes: usize,
    /// HTTP connections open at once; at the bound, new connections wait in the
    /// kernel's accept queue until one closes.
    #[arg(long, default_value_t = carebus_server::DEFAULT_HTTP_MAX_CONNECTIONS, env = "CAREBUS_HTTP_MAX_CONNECTIONS", value_parser = parse_positive)]
    http_max_connections: usize,
    /// Milliseconds an HTTP client has to send a complete request head (request line
    /// and headers), counted from the connection's start or the previous answer; idle
    /// keep-alive connections are closed after it too (slowloris defence), and a request
    /// body that pauses this long is answered 408 `body_timeout`.
    #[arg(long, default_value_t = 30_000, env = "CAREBUS_HTTP_HEADER_TIMEOUT_MS", value_parser = parse_positive_u64)]
    http_header_timeout_ms: u64,
    /// Threads running the network front-ends (HTTP, WebSocket, MLLP). Default: one
    /// fewer than the CPUs available, at least 1, since each partition's log writes and
    /// fsyncs on threads of its own.
    #[arg(long, env = "CAREBUS_WORKER_THREADS", value_parser = parse_positive)]
    worker_threads: Option<usize>,
}

/// The default of `--worker-threads`: one fewer than the CPUs available, at least 1.
/// The log's writer and syncer threads do the disk work off the async runtime; on a
/// small machine a runtime worker per CPU left them competing with a second worker
/// that mostly woke up to steal (measured on 2 vCPUs: BENCHMARKS.md).
fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("must be a positive number: {e}")),
    }
}

fn parse_positive_u64(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("must be a positive number: {e}")),
    }
}

fn parse_max_body(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("must be a number of bytes: {e}")),
    }
}

fn parse_fsync(s: &str) -> anyhow::Result<carebus_log::FsyncPolicy> {
    if s == "always" {
        return Ok(carebus_log::FsyncPolicy::Always);
    }
    let ms: u64 = s.strip_suffix("ms").unwrap_or(s).parse().with_context(|| {
        format!("--fsync must be `always` or a number of milliseconds, not {s:?}")
    })?;
    anyhow::ensure!(ms > 0, "--fsync interval must be positive");
    Ok(carebus_log::FsyncPolicy::Interval(
        std::time::Duration::from_millis(ms),
    ))
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAREBUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
}

/// mimalloc instead of glibc's malloc: serving HTTP allocates per request, and glibc's
/// malloc/free/consolidation took ~16 % of the server's CPU under the W1 publish load
/// (perf, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Check(args) => {
            init_logging(cli.log_format, "warn");
            ExitCode::from(check(&args))
        }
        Command::Serve(args) => {
            init_logging(cli.log_format, "info");
            let serve_matches = matches.subcommand_matches("serve");
            match apply_config_file(args, serve_matches).and_then(serve) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // As `fn main() -> anyhow::Result<()>` reports it.
                    eprintln!("Error: {e:?}");
                    ExitCode::FAILURE
                }
            }
        }
        command => {
            init_logging(cli.log_format, "warn");
            ExitCode::from(client_command(command))
        }
    }
}

/// Runs a client command and returns its exit code (see [`EXIT_CODES`]).
fn client_command(command: Command) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return output::exit::ERROR;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Serve(_) | Command::Check(_) => Ok(output::exit::ERROR),
            Command::Topics(c) => commands::topics(c).await,
            Command::Subscriptions(c) => commands::subscriptions(c).await,
            Command::Produce(c) => commands::produce(c).await,
            Command::Consume(c) => commands::consume(c).await,
            Command::Dlq(c) => commands::dlq(c).await,
            Command::Trace(c) => commands::trace(c).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            let broken_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                return output::exit::OK;
            }
            eprintln!("error: {e:#}");
            output::exit_code(&e)
        }
    }
}

/// Settings a `--config` TOML file may hold.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    http_addr: Option<SocketAddr>,
    mllp_addr: Option<SocketAddr>,
    mllp: Option<bool>,
    fsync: Option<String>,
    max_body_bytes: Option<usize>,
    http_max_connections: Option<usize>,
    http_header_timeout_ms: Option<u64>,
    worker_threads: Option<usize>,
    /// `[[mllp_egress]]` tables: subscriptions delivered to MLLP destinations.
    #[serde(default)]
    mllp_egress: Vec<EgressFile>,
    /// `[mllp_ingress]`: routing, rejects topic, negative-ACK codes, more listeners.
    mllp_ingress: Option<IngressFile>,
    /// `[mllp_tls]`: an MLLP-over-TLS listener.
    mllp_tls: Option<TlsFile>,
}

/// The `[mllp_tls]` table of the config file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    addr: SocketAddr,
    /// PEM certificate chain of this server.
    cert: PathBuf,
    /// PEM private key of this server.
    key: PathBuf,
    /// PEM CA certificates: when given, clients must present a certificate it signed.
    client_ca: Option<PathBuf>,
}

/// The `[mllp_ingress]` table of the config file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IngressFile {
    /// More listener addresses besides `mllp_addr`.
    #[serde(default)]
    listeners: Vec<SocketAddr>,
    /// `[[mllp_ingress.routes]]`, first match wins.
    #[serde(default)]
    routes: Vec<RouteFile>,
    rejects_topic: Option<String>,
    /// `AR` (default) or `AE`.
    invalid_message_ack: Option<String>,
    /// `AE` (default) or `AR`.
    storage_failure_ack: Option<String>,
    max_frame_bytes: Option<usize>,
    max_connections: Option<usize>,
}

/// One routing rule of the config file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    message_type: Option<String>,
    trigger_event: Option<String>,
    sending_application: Option<String>,
    sending_facility: Option<String>,
    topic: String,
}

fn negative_ack(
    value: Option<&str>,
    default: carebus_mllp::NegativeAck,
    what: &str,
) -> anyhow::Result<carebus_mllp::NegativeAck> {
    match value {
        None => Ok(default),
        Some("AE") => Ok(carebus_mllp::NegativeAck::Error),
        Some("AR") => Ok(carebus_mllp::NegativeAck::Reject),
        Some(other) => anyhow::bail!("{what} must be AE or AR, not {other:?}"),
    }
}

/// One `[[mllp_egress]]` table of the config file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressFile {
    topic: String,
    subscription: String,
    destination: SocketAddr,
    connections: Option<usize>,
    ack_timeout_ms: Option<u64>,
    /// `dead_letter` (default) or `retry`.
    on_negative_ack: Option<String>,
}

/// Fills every setting that was left at its built-in default (neither a flag nor an
/// environment variable) from the `--config` file, if one is given.
fn apply_config_file(
    mut args: ServeArgs,
    matches: Option<&ArgMatches>,
) -> anyhow::Result<ServeArgs> {
    let Some(path) = args.config.clone() else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let file: FileConfig =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    let defaulted = |id: &str| {
        matches.is_none_or(|m| matches!(m.value_source(id), None | Some(ValueSource::DefaultValue)))
    };
    if let (true, Some(v)) = (defaulted("data_dir"), file.data_dir) {
        args.data_dir = v;
    }
    if let (true, Some(v)) = (defaulted("http_addr"), file.http_addr) {
        args.http_addr = v;
    }
    if let (true, Some(v)) = (defaulted("mllp_addr"), file.mllp_addr) {
        args.mllp_addr = v;
    }
    if let (true, Some(on)) = (defaulted("no_mllp"), file.mllp) {
        args.no_mllp = !on;
    }
    if let (true, Some(v)) = (defaulted("fsync"), file.fsync) {
        args.fsync = v;
    }
    if let Some(ingress) = file.mllp_ingress {
        let c = &mut args.mllp_ingress;
        for r in ingress.routes {
            anyhow::ensure!(
                carebus_core::validate_name(&r.topic).is_ok(),
                "route topic {:?} in {} is not a valid topic name",
                r.topic,
                path.display()
            );
            c.routes.push(carebus_mllp::Route {
                message_type: r.message_type,
                trigger_event: r.trigger_event,
                sending_application: r.sending_application,
                sending_facility: r.sending_facility,
                topic: r.topic,
            });
        }
        c.rejects_topic = ingress.rejects_topic;
        c.invalid_message_ack = negative_ack(
            ingress.invalid_message_ack.as_deref(),
            c.invalid_message_ack,
            "invalid_message_ack",
        )?;
        c.storage_failure_ack = negative_ack(
            ingress.storage_failure_ack.as_deref(),
            c.storage_failure_ack,
            "storage_failure_ack",
        )?;
        if let Some(n) = ingress.max_frame_bytes {
            c.max_frame_bytes = n;
        }
        if let Some(n) = ingress.max_connections {
            c.max_connections = n.max(1);
        }
        args.mllp_extra_addrs = ingress.listeners;
    }
    if let Some(t) = file.mllp_tls {
        let chain = carebus_mllp::tls::load_certs(&t.cert)?;
        let key = carebus_mllp::tls::load_key(&t.key)?;
        let client_ca = t
            .client_ca
            .as_deref()
            .map(carebus_mllp::tls::load_certs)
            .transpose()?;
        let acceptor = carebus_mllp::tls::acceptor(chain, key, client_ca)?;
        args.mllp_tls = Some(carebus_server::MllpTls {
            addr: t.addr,
            acceptor,
        });
    }
    for e in file.mllp_egress {
        let mut config = carebus_mllp::egress::EgressConfig::new(e.destination);
        if let Some(n) = e.connections {
            anyhow::ensure!(
                n > 0,
                "mllp_egress connections in {} must be at least 1",
                path.display()
            );
            config.connections = n;
        }
        if let Some(ms) = e.ack_timeout_ms {
            anyhow::ensure!(
                ms > 0,
                "mllp_egress ack_timeout_ms in {} must be positive",
                path.display()
            );
            config.ack_timeout = std::time::Duration::from_millis(ms);
        }
        config.on_negative_ack = match e.on_negative_ack.as_deref() {
            None | Some("dead_letter") => carebus_mllp::egress::NegativeAckPolicy::DeadLetter,
            Some("retry") => carebus_mllp::egress::NegativeAckPolicy::Retry,
            Some(other) => anyhow::bail!(
                "mllp_egress on_negative_ack in {} must be dead_letter or retry, not {other:?}",
                path.display()
            ),
        };
        args.mllp_egress.push(carebus_server::EgressBinding {
            topic: e.topic,
            subscription: e.subscription,
            config,
        });
    }
    if let (true, Some(v)) = (defaulted("max_body_bytes"), file.max_body_bytes) {
        anyhow::ensure!(
            v > 0,
            "max_body_bytes in {} must be at least 1",
            path.display()
        );
        args.max_body_bytes = v;
    }
    if let (true, Some(v)) = (defaulted("http_max_connections"), file.http_max_connections) {
        anyhow::ensure!(
            v > 0,
            "http_max_connections in {} must be at least 1",
            path.display()
        );
        args.http_max_connections = v;
    }
    if let (true, Some(v)) = (
        defaulted("http_header_timeout_ms"),
        file.http_header_timeout_ms,
    ) {
        anyhow::ensure!(
            v > 0,
            "http_header_timeout_ms in {} must be at least 1",
            path.display()
        );
        args.http_header_timeout_ms = v;
    }
    if let (true, Some(v)) = (defaulted("worker_threads"), file.worker_threads) {
        anyhow::ensure!(
            v > 0,
            "worker_threads in {} must be at least 1",
            path.display()
        );
        args.worker_threads = Some(v);
    }
    Ok(args)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let fsync = parse_fsync(&args.fsync)?;
    let config = carebus_server::ServerConfig {
        data_dir: args.data_dir,
        http_addr: args.http_addr,
        log: carebus_log::LogConfig {
            fsync,
            ..carebus_log::LogConfig::default()
        },
        max_body_bytes: args.max_body_bytes,
        mllp_addr: (!args.no_mllp).then_some(args.mllp_addr),
        mllp_egress: args.mllp_egress.clone(),
        mllp_extra_addrs: args.mllp_extra_addrs.clone(),
        mllp_ingress: args.mllp_ingress.clone(),
        mllp_tls: args.mllp_tls.clone(),
    };
    let worker_threads = args.worker_threads.unwrap_or_else(default_worker_threads);
    // The effective configuration (it holds no secrets).
    tracing::info!(
        config_file = %args.config.as_deref().map_or_else(|| "none".to_owned(), |p| p.display().to_string()),
        data_dir = %config.data_dir.display(),
        http_addr = %config.http_addr,
        mllp_addr = %config.mllp_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        fsync = %args.fsync,
        max_body_bytes = config.max_body_bytes,
        http_max_connections = args.http_max_connections,
        http_header_timeout_ms = args.http_header_timeout_ms,
        worker_threads,
        "starting carebus"
    );
    let limits = carebus_server::HttpLimits {
        max_connections: args.http_max_connections,
        header_timeout: std::time::Duration::from_millis(args.http_header_timeout_ms),
    };
    let data_dir = config.data_dir.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime
        .block_on(carebus_server::run_with_limits(
            config,
            limits,
            shutdown_signal(),
            None,
        ))
        .map_err(|e| {
            let what = unwritable_data_dir(&e, &data_dir);
            anyhow::Error::new(e).context(what)
        })?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// What to say above a failed `serve`: names the data directory when the cause is that
/// it cannot be written (a read-only file system, no permission, or not a directory).
fn unwritable_data_dir(e: &carebus_server::ServerError, data_dir: &std::path::Path) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if data_dir.exists() && !data_dir.is_dir() {
                return format!(
                    "carebus serve failed: the data directory {} is not a directory",
                    data_dir.display()
                );
            }
            match io.kind() {
                std::io::ErrorKind::ReadOnlyFilesystem => {
                    return format!(
                        "carebus serve failed: the data directory {} is on a read-only file system; carebus needs to write there",
                        data_dir.display()
                    );
                }
                std::io::ErrorKind::PermissionDenied => {
                    return format!(
                        "carebus serve failed: the data directory {} is not writable (permission denied)",
                        data_dir.display()
                    );
                }
                _ => {}
            }
        }
        source = err.source();
    }
    "carebus serve failed".to_owned()
}
