//! `carebus-torture`: SIGKILL the real `carebus` under load, then check what survived.
//!
//! ```text
//! cargo build --release -p carebus -p carebus-torture
//! target/release/carebus-torture --carebus-bin target/release/carebus --rounds 100
//! target/release/carebus-torture --carebus-bin target/release/carebus --seed 1234   # replay a schedule
//! ```
//! Exit status: 0 when every invariant held, 1 on a violation, 2 when the run could not
//! be carried out.

use std::path::PathBuf;
use std::process::ExitCode;

use carebus_torture::{TortureConfig, run};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "carebus-torture",
    about = "Crash chaos against the carebus binary, then Jepsen-style checks"
)]
struct Args {
    /// The carebus binary to torture.
    #[arg(long, default_value = "target/release/carebus")]
    carebus_bin: PathBuf,
    /// Data directory (default: a new temporary directory, removed when all held).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed of the kill schedule and the workers' choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// SIGKILL/restart rounds.
    #[arg(long, default_value_t = 30)]
    rounds: u32,
    /// Shortest time a round runs before its SIGKILL, in milliseconds.
    #[arg(long, default_value_t = 300)]
    min_round_ms: u64,
    /// Longest time a round runs before its SIGKILL, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    max_round_ms: u64,
    #[arg(long, default_value_t = 4)]
    producers: u64,
    #[arg(long, default_value_t = 3)]
    consumers: u64,
    #[arg(long, default_value_t = 2)]
    transformers: u64,
    #[arg(long, default_value_t = 2)]
    mllp_senders: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("carebus-torture seed {seed} (rerun with --seed {seed})");
    let (data_dir, temp) = match args.data_dir {
        Some(d) => (d, None),
        None => {
            let d = std::env::temp_dir().join(format!("carebus-torture-{seed}"));
            (d.clone(), Some(d))
        }
    };
    let mut config = TortureConfig::ci(args.carebus_bin, data_dir.clone(), seed);
    config.rounds = args.rounds;
    config.round_ms = (args.min_round_ms, args.max_round_ms.max(args.min_round_ms));
    config.producers = args.producers;
    config.consumers = args.consumers;
    config.transformers = args.transformers;
    config.mllp_senders = args.mllp_senders;
    // Long runs can leave a large backlog for the transformers to drain.
    config.drain_limit = std::time::Duration::from_secs(1800);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("carebus-torture: cannot start a runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(&config)) {
        Ok(report) => {
            println!("{report}");
            if report.verdict.ok() {
                if let Some(t) = temp {
                    let _ = std::fs::remove_dir_all(t);
                }
                ExitCode::SUCCESS
            } else {
                println!("data directory kept for inspection: {}", data_dir.display());
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!(
                "carebus-torture: {e} (seed {seed}, data directory {})",
                data_dir.display()
            );
            ExitCode::from(2)
        }
    }
}
