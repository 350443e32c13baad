//! The CI-sized crash chaos (issue 7): producers, consumers, transactions and MLLP
//! senders against the real binary while it is SIGKILLed and restarted 15 times, then
//! the Jepsen-style checks of `carebus-torture`. The seed is printed; rerun one with
//! `CAREBUS_TORTURE_SEED=<seed> cargo test -p carebus --test torture_process`, or the
//! long form with `carebus-torture --seed <seed>` (see RELIABILITY.md).

use std::time::{SystemTime, UNIX_EPOCH};

use carebus_torture::{TortureConfig, run};

#[test]
fn sigkill_chaos_loses_nothing_and_lets_nothing_through() -> Result<(), Box<dyn std::error::Error>>
{
    let seed = match std::env::var("CAREBUS_TORTURE_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64,
    };
    eprintln!("carebus-torture seed {seed} (rerun with CAREBUS_TORTURE_SEED={seed})");
    let dir = tempfile::tempdir()?;
    let config = TortureConfig::ci(
        env!("CARGO_BIN_EXE_carebus").into(),
        dir.path().join("data"),
        seed,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(&config))?;
    eprintln!("{report}");
    assert_eq!(report.kills, config.rounds);
    assert!(report.publishes_acknowledged > 0 && report.mllp_acknowledged > 0);
    assert!(report.transactions_committed > 0 && report.dead_letters_verified > 0);
    assert!(report.verdict.ok(), "seed {seed}: {}", report.verdict);
    Ok(())
}
