//! Crash chaos against the real `carebus` binary.
//!
//! While HTTP producers (idempotency keys, retries), consumers (ack, nack, abandoned
//! leases), transactional transformers (consume → publish → commit/abort/abandon), a
//! poison consumer (everything dead-lettered) and MLLP senders (resend on timeout) run,
//! the server is SIGKILLed at moments drawn from a seed and restarted, `rounds` times.
//! Then the chaos stops, everything is drained, and the history the clients recorded is
//! checked against what the server holds, in the manner of Jepsen's set and queue
//! workloads (see [`checks`]).
//!
//! The seed fixes the kill schedule and every worker's choices; thread interleavings and
//! the exact instants of the kills relative to requests still vary between runs.

mod checks;
mod history;
mod server;
mod workers;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use carebus_client::{
    Client, StartPosition, SubscriptionBackoff, SubscriptionConfig, Timeouts, TopicConfig,
};
use tokio::sync::watch;

pub use checks::Verdict;
use history::History;
use server::Server;
use workers::{Endpoint, Shared};

/// Errors that stop a run before its checks (not invariant violations: see [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum TortureError {
    /// The server could not be started, reached or stopped.
    #[error("setup: {0}")]
    Setup(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct TortureConfig {
    /// The `carebus` binary to torture.
    pub carebus_bin: PathBuf,
    /// Data directory for the server (created; should be empty).
    pub data_dir: PathBuf,
    /// Seed of the kill schedule and of every worker's choices.
    pub seed: u64,
    /// Kill/restart rounds.
    pub rounds: u32,
    /// Each round runs this long (drawn uniformly, milliseconds) before the SIGKILL.
    pub round_ms: (u64, u64),
    pub producers: u64,
    pub consumers: u64,
    pub transformers: u64,
    pub mllp_senders: u64,
    /// The final drain fails when it makes no progress for this long.
    pub drain_stall: Duration,
    /// Bound of the whole final drain.
    pub drain_limit: Duration,
}

impl TortureConfig {
    /// A run sized for CI (well under a minute on 2 vCPUs with a debug build).
    pub fn ci(carebus_bin: PathBuf, data_dir: PathBuf, seed: u64) -> Self {
        TortureConfig {
            carebus_bin,
            data_dir,
            seed,
            rounds: 15,
            round_ms: (300, 1500),
            producers: 4,
            consumers: 3,
            transformers: 2,
            mllp_senders: 2,
            drain_stall: Duration::from_secs(30),
            drain_limit: Duration::from_secs(240),
        }
    }
}

/// Counts of what was done and verified, and every violation found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seed: u64,
    pub rounds: u32,
    pub kills: u32,
    pub publishes_attempted: u64,
    pub publishes_acknowledged: u64,
    pub deliveries: u64,
    pub acks_confirmed: u64,
    pub nacks: u64,
    pub transactions_committed: u64,
    pub transactions_commit_unknown: u64,
    pub transactions_never_committed: u64,
    pub mllp_sent: u64,
    pub mllp_acknowledged: u64,
    pub messages_verified: u64,
    pub dead_letters_verified: u64,
    pub elapsed: Duration,
    pub verdict: Verdict,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} · {} rounds · {} SIGKILLs · {:.1} s",
            self.seed,
            self.rounds,
            self.kills,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "publishes: {} attempted, {} acknowledged · deliveries {} · acks confirmed {} · nacks {}",
            self.publishes_attempted,
            self.publishes_acknowledged,
            self.deliveries,
            self.acks_confirmed,
            self.nacks
        )?;
        writeln!(
            f,
            "transactions: {} committed, {} commit outcome unknown, {} never committed",
            self.transactions_committed,
            self.transactions_commit_unknown,
            self.transactions_never_committed
        )?;
        writeln!(
            f,
            "MLLP: {} sent, {} acknowledged · stored messages verified {} · dead letters verified {}",
            self.mllp_sent,
            self.mllp_acknowledged,
            self.messages_verified,
            self.dead_letters_verified
        )?;
        write!(f, "{}", self.verdict)
    }
}

fn client_for(server: &Server) -> Result<Client, TortureError> {
    Client::with_timeouts(
        &format!("http://{}", server.http),
        Timeouts {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(3),
        },
    )
    .map_err(|e| TortureError::Setup(e.to_string()))
}

/// Starts the server and waits until its store answers (recovery done).
async fn start(config: &TortureConfig) -> Result<(Server, Client), TortureError> {
    let (bin, dir) = (config.carebus_bin.clone(), config.data_dir.clone());
    let server =
        tokio::task::spawn_blocking(move || Server::start(&bin, &dir, Duration::from_secs(60)))
            .await
            .map_err(|e| TortureError::Setup(e.to_string()))??;
    let client = client_for(&server)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.list_topics().await {
            Ok(_) => return Ok((server, client)),
            Err(e) if Instant::now() >= deadline => {
                return Err(TortureError::Setup(format!(
                    "carebus not ready within 60 s: {e}"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn set_up_topics(client: &Client) -> Result<(), TortureError> {
    let setup = |e: carebus_client::Error| TortureError::Setup(format!("creating topics: {e}"));
    let topic = |partitions| TopicConfig {
        partitions: Some(partitions),
        ..TopicConfig::default()
    };
    client
        .put_topic(workers::ORDERS, &topic(4))
        .await
        .map_err(setup)?;
    client
        .put_topic(workers::RESULTS, &topic(2))
        .await
        .map_err(setup)?;
    client
        .put_topic(workers::POISON, &topic(2))
        .await
        .map_err(setup)?;
    let backoff = Some(SubscriptionBackoff {
        initial_ms: Some(5),
        max_ms: Some(100),
        multiplier: Some(2.0),
        jitter: Some(0.2),
    });
    let sub = |ack_deadline_ms, max_attempts| SubscriptionConfig {
        ack_deadline_ms: Some(ack_deadline_ms),
        max_attempts: Some(max_attempts),
        backoff: backoff.clone(),
        start: Some(StartPosition::Earliest),
        ..SubscriptionConfig::default()
    };
    client
        .put_subscription(workers::ORDERS, workers::WORK_SUB, &sub(1000, 1000))
        .await
        .map_err(setup)?;
    client
        .put_subscription(workers::ORDERS, workers::TXN_SUB, &sub(3000, 1000))
        .await
        .map_err(setup)?;
    client
        .put_subscription(workers::POISON, workers::POISON_SUB, &sub(1000, 3))
        .await
        .map_err(setup)?;
    Ok(())
}

/// Waits until every subscription has nothing left to deliver. Gives up when the
/// remaining count has not gone down for `stall` (a consumer that stopped making
/// progress), or after `limit` in all.
async fn drained(client: &Client, stall: Duration, limit: Duration) -> Result<(), String> {
    let started = Instant::now();
    let mut best = u64::MAX;
    let mut progress_at = Instant::now();
    loop {
        let mut left = 0u64;
        let mut known = true;
        for (topic, sub) in [
            (workers::ORDERS, workers::WORK_SUB),
            (workers::ORDERS, workers::TXN_SUB),
            (workers::POISON, workers::POISON_SUB),
        ] {
            match client.get_subscription(topic, sub).await {
                Ok(s) => left += s.stats.backlog + s.stats.in_flight,
                Err(_) => known = false,
            }
        }
        if known && left == 0 {
            return Ok(());
        }
        if known && left < best {
            best = left;
            progress_at = Instant::now();
        }
        if progress_at.elapsed() > stall {
            return Err(format!(
                "draining made no progress for {stall:?}: {best} messages still to deliver"
            ));
        }
        if started.elapsed() > limit {
            return Err(format!(
                "draining took longer than {limit:?}: {best} messages still to deliver"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the chaos, then the checks. `Err` only when the run could not be carried out;
/// violations are in the report's verdict.
pub async fn run(config: &TortureConfig) -> Result<Report, TortureError> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| TortureError::Setup(format!("{}: {e}", config.data_dir.display())))?;
    let mut schedule = fastrand::Rng::with_seed(config.seed);
    let history = Arc::new(History::new());
    let phase = Arc::new(AtomicU8::new(workers::CHAOS));
    let (endpoint_tx, endpoint_rx) = watch::channel(None::<Endpoint>);
    let shared = Shared {
        history: Arc::clone(&history),
        phase: Arc::clone(&phase),
        endpoint: endpoint_rx,
    };

    let (mut server, client) = start(config).await?;
    set_up_topics(&client).await?;
    let _ = endpoint_tx.send(Some(Endpoint {
        client,
        mllp: server.mllp,
    }));

    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..config.producers {
        tasks.spawn(workers::producer(shared.clone(), w, config.seed));
    }
    for w in 0..config.consumers {
        tasks.spawn(workers::consumer(shared.clone(), w, config.seed));
    }
    for w in 0..config.transformers {
        tasks.spawn(workers::transformer(shared.clone(), w, config.seed));
    }
    for w in 0..config.mllp_senders {
        tasks.spawn(workers::mllp_sender(shared.clone(), w, config.seed));
    }
    tasks.spawn(workers::poison_consumer(shared.clone()));

    let mut kills = 0u32;
    for _ in 0..config.rounds {
        let (lo, hi) = config.round_ms;
        let wait = schedule.u64(lo..=hi.max(lo));
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let _ = endpoint_tx.send(None);
        tokio::task::spawn_blocking(move || server.kill())
            .await
            .map_err(|e| TortureError::Setup(e.to_string()))??;
        kills += 1;
        let (next, client) = start(config).await?;
        server = next;
        let _ = endpoint_tx.send(Some(Endpoint {
            client,
            mllp: server.mllp,
        }));
    }

    // No more kills: producers and senders stop, consumers ack and transformers commit
    // everything that is left.
    phase.store(workers::DRAIN, Ordering::SeqCst);
    let client = client_for(&server)?;
    let drain = drained(&client, config.drain_stall, config.drain_limit).await;
    phase.store(workers::STOP, Ordering::SeqCst);
    while tasks.join_next().await.is_some() {}

    let mut verdict = Verdict::default();
    if let Err(e) = drain {
        verdict.violation(e);
    }
    let counts = checks::check(&client, &history, &mut verdict).await?;
    drop(server);

    let publishes = history::lock(&history.publishes);
    let txns = history::lock(&history.txns);
    let mllp = history::lock(&history.mllp);
    let count_txns = |o| txns.iter().filter(|t| t.outcome == o).count() as u64;
    Ok(Report {
        seed: config.seed,
        rounds: config.rounds,
        kills,
        publishes_attempted: publishes.len() as u64,
        publishes_acknowledged: publishes.iter().filter(|p| p.acked_at.is_some()).count() as u64,
        deliveries: history::lock(&history.deliveries).len() as u64,
        acks_confirmed: history::lock(&history.acks)
            .iter()
            .filter(|a| a.outcome == history::AckOutcome::Confirmed)
            .count() as u64,
        nacks: *history::lock(&history.nacks),
        transactions_committed: count_txns(history::TxnOutcome::Committed),
        transactions_commit_unknown: count_txns(history::TxnOutcome::CommitUnknown),
        transactions_never_committed: count_txns(history::TxnOutcome::NeverCommitted),
        mllp_sent: mllp.len() as u64,
        mllp_acknowledged: mllp.iter().filter(|m| m.acked).count() as u64,
        messages_verified: counts.messages,
        dead_letters_verified: counts.dead_letters,
        elapsed: started.elapsed(),
        verdict,
    })
}
