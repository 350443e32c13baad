//! The `carebus` command.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

/// carebus: an exactly-once message broker for clinical data.
#[derive(Debug, Parser)]
#[command(name = "carebus", version, about)]
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker with its embedded store.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAREBUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve(args) => {
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
            };
            tracing::info!(
                data_dir = %config.data_dir.display(),
                http_addr = %config.http_addr,
                fsync = %args.fsync,
                max_body_bytes = config.max_body_bytes,
                "starting carebus"
            );
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime
                .block_on(carebus_server::run(config, shutdown_signal(), None))
                .context("carebus serve failed")?;
            tracing::info!("stopped cleanly");
            Ok(())
        }
    }
}
