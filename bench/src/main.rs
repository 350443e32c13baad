//! carebus benchmarks. Each figure is measured in the same run as the disk's own
//! limits on the same filesystem, and reported as a ratio against them.
//!
//! `cargo run --release -p carebus-bench -- log --dir /path/on/the/disk/to/test`

mod compare;
mod core_broker;
mod dedup_memory;
mod disk;
mod http_api;
mod log_append;
mod mllp_ingest;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "carebus-bench", about = "carebus benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// carebus against peer brokers (NATS JetStream, RabbitMQ quorum queues), W1–W6,
    /// with the disk's limits measured in the same run; markdown report + PNG chart.
    Compare(compare::CompareArgs),
    /// Storage log append throughput and latency against raw write+fdatasync.
    Log {
        /// Directory on the filesystem to measure (a temporary directory is made inside).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Seconds of appends before each measurement starts (steady state).
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// Concurrent appenders for the group-commit measurement.
        #[arg(long, default_value_t = 64)]
        appenders: usize,
    },
    /// Broker core in process: publish with and without idempotency keys, deliver + ack.
    Core {
        /// Directory on the filesystem to measure (a temporary directory is made inside).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Seconds per publish measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Seconds before each publish measurement starts.
        #[arg(long, default_value_t = 1)]
        warmup: u64,
        /// Concurrent publishers.
        #[arg(long, default_value_t = 64)]
        publishers: usize,
        /// Runs of each publish kind (alternating); the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Messages stored and then drained for deliver + ack.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Concurrent consumers for deliver + ack.
        #[arg(long, default_value_t = 4)]
        consumers: usize,
        /// Run only this publish kind, `keyed` or `unkeyed` (for profiling one kind);
        /// prints its runs and skips the ratio and deliver + ack.
        #[arg(long)]
        only: Option<String>,
    },
    /// carebus over HTTP through the Rust client: keyed publish (single and batches),
    /// receive + ack.
    Http {
        /// Directory on the filesystem to measure (a temporary directory is made inside).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Seconds per publish measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent publishers.
        #[arg(long, default_value_t = 64)]
        publishers: usize,
        /// Messages stored and then drained by receive + ack.
        #[arg(long, default_value_t = 50_000)]
        messages: u64,
    },
    /// HL7 v2 over MLLP ingest with ACK after fsync, 1 and 16 connections.
    Mllp {
        /// Directory on the filesystem to measure (a temporary directory is made inside).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Seconds before each measurement starts.
        #[arg(long, default_value_t = 1)]
        warmup: u64,
    },
    /// Memory per key of the deduplication index (its own count and RSS growth),
    /// insert and lookup rates; everything stays in memory.
    DedupMemory {
        /// Keys to insert.
        #[arg(long, default_value_t = 10_000_000)]
        keys: u64,
        /// Directory for the index's files (a temporary directory is made inside).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

/// The same allocator as the `carebus` binary, so in-process measurements match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Compare(args) => compare::run(args),
        Command::Http {
            dir,
            seconds,
            publishers,
            messages,
        } => {
            let work = tempfile::Builder::new()
                .prefix("carebus-bench-")
                .tempdir_in(&dir)?;
            let runs = http_api::run(
                work.path(),
                publishers,
                Duration::from_secs(seconds.max(1)),
                messages,
            )?;
            println!("{}", http_api::report(&runs));
            Ok(())
        }
        Command::Mllp {
            dir,
            seconds,
            warmup,
        } => {
            let work = tempfile::Builder::new()
                .prefix("carebus-bench-")
                .tempdir_in(&dir)?;
            let (w, d) = (
                Duration::from_secs(warmup),
                Duration::from_secs(seconds.max(1)),
            );
            let mut runs = Vec::new();
            for connections in [1usize, 16] {
                std::process::Command::new("sync").status()?;
                runs.push(mllp_ingest::run(
                    &work.path().join(format!("mllp-{connections}")),
                    connections,
                    w,
                    d,
                )?);
            }
            println!("{}", mllp_ingest::report(&runs));
            Ok(())
        }
        Command::Core {
            dir,
            seconds,
            warmup,
            publishers,
            rounds,
            messages,
            consumers,
            only,
        } => {
            let kinds: Vec<bool> = match only.as_deref() {
                None => vec![false, true],
                Some("keyed") => vec![true],
                Some("unkeyed") => vec![false],
                Some(other) => anyhow::bail!("--only takes keyed or unkeyed, not {other}"),
            };
            let work = tempfile::Builder::new()
                .prefix("carebus-bench-")
                .tempdir_in(&dir)?;
            let (w, d) = (
                Duration::from_secs(warmup),
                Duration::from_secs(seconds.max(1)),
            );
            // Alternate the two kinds (unkeyed, keyed, unkeyed, keyed, …) and flush the
            // page cache's dirty data before each run, so neither kind pays for the
            // writeback of the other's data; report the median run of each.
            let mut unkeyed_runs = Vec::new();
            let mut keyed_runs = Vec::new();
            for round in 0..rounds.max(1) {
                for &keyed in &kinds {
                    std::process::Command::new("sync").status()?;
                    let name = format!("{}-{round}", if keyed { "keyed" } else { "unkeyed" });
                    let run =
                        core_broker::publish(&work.path().join(name), keyed, publishers, w, d)?;
                    if keyed {
                        keyed_runs.push(run);
                    } else {
                        unkeyed_runs.push(run);
                    }
                }
            }
            if only.is_some() {
                for runs in [unkeyed_runs, keyed_runs] {
                    if !runs.is_empty() {
                        core_broker::median(runs)?;
                    }
                }
                return Ok(());
            }
            // Throughput drifts with the machine (a shared VM) by ±10 % between runs;
            // the ratio of the two runs of one round (taken back to back) cancels most
            // of that drift, so the median of the rounds' ratios is reported too.
            let mut paired: Vec<f64> = unkeyed_runs
                .iter()
                .zip(&keyed_runs)
                .map(|(u, k)| k.per_sec() / u.per_sec())
                .collect();
            paired.sort_by(f64::total_cmp);
            eprintln!(
                "keyed ÷ unkeyed per round, sorted: {}",
                paired
                    .iter()
                    .map(|r| format!("{:.0} %", r * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let paired_median = paired.get(paired.len() / 2).copied().unwrap_or(0.0);
            let unkeyed = core_broker::median(unkeyed_runs)?;
            let keyed = core_broker::median(keyed_runs)?;
            let deliver =
                core_broker::deliver_ack(&work.path().join("deliver"), messages, consumers)?;
            println!(
                "{}",
                core_broker::report(
                    &unkeyed,
                    &keyed,
                    paired_median,
                    &deliver,
                    publishers,
                    consumers
                )
            );
            Ok(())
        }
        Command::Log {
            dir,
            seconds,
            warmup,
            appenders,
        } => {
            let work = tempfile::Builder::new()
                .prefix("carebus-bench-")
                .tempdir_in(&dir)?;
            let secs = Duration::from_secs(seconds.max(1));
            eprintln!("measuring in {}", work.path().display());
            let raw_sync = disk::write_fdatasync(work.path(), 1024, secs)?;
            let raw_seq = disk::sequential_bandwidth(work.path(), 256 << 20)?;
            let warm = Duration::from_secs(warmup);
            let one = log_append::run(&work.path().join("log1"), 1, 1024, warm, secs)?;
            let many = log_append::run(&work.path().join("log64"), appenders, 1024, warm, secs)?;
            let cold = log_append::run(
                &work.path().join("log64-cold"),
                appenders,
                1024,
                Duration::ZERO,
                secs,
            )?;
            let report = log_append::report(&raw_sync, &raw_seq, &one, &many, &cold, appenders);
            println!("{report}");
            Ok(())
        }
        Command::DedupMemory { keys, dir } => {
            let work = tempfile::Builder::new()
                .prefix("carebus-bench-dedup-")
                .tempdir_in(&dir)?;
            let r = dedup_memory::run(work.path(), keys)?;
            println!("{}", dedup_memory::report(&r));
            Ok(())
        }
    }
}
