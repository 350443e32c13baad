//! The client commands: `topics`, `subscriptions`, `produce`, `consume`, `dlq`, `trace`.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use carebus_client::{
    Client, Delivery, Dispatch, Message, Published, Publisher, ReceiveOptions, RetryPolicy,
    StartPosition, SubscriptionConfig, Timeouts, TopicConfig,
};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::output::{self, Exit, exit};

/// How to reach the server, and how to print.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Base URL of the carebus server.
    #[arg(long, global = true, env = "CAREBUS_URL", default_value = carebus_client::DEFAULT_URL)]
    url: String,
    /// Print JSON for scripts (one document; JSON lines for `consume`) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Timeout of each request, in milliseconds.
    #[arg(long, global = true, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
}

impl Conn {
    fn client(&self) -> anyhow::Result<Client> {
        let timeouts = Timeouts {
            request: Duration::from_millis(self.timeout_ms),
            connect: Duration::from_millis(self.timeout_ms.min(5_000)),
        };
        Ok(Client::with_timeouts(&self.url, timeouts)?)
    }
}

// ----- topics -----

/// `carebus topics …`
#[derive(Debug, Args)]
pub struct TopicsCmd {
    #[command(subcommand)]
    action: TopicsAction,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum TopicsAction {
    /// List the topics.
    List,
    /// Show a topic: settings, partitions, figures.
    Get {
        /// Topic name.
        topic: String,
    },
    /// Create a topic (exit 5 if it exists already; see `update`).
    Create {
        /// Topic name ([A-Za-z0-9._-], at most 200 characters).
        topic: String,
        #[command(flatten)]
        settings: TopicSettings,
    },
    /// Change settings of an existing topic (the others are kept).
    Update {
        /// Topic name.
        topic: String,
        #[command(flatten)]
        settings: TopicSettings,
    },
    /// Delete a topic and all its messages (asks first on a terminal, unless --yes).
    Delete {
        /// Topic name.
        topic: String,
        /// Do not ask.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Debug, Args)]
struct TopicSettings {
    /// Number of partitions (1..=1024; can grow, not shrink). Default 1.
    #[arg(long)]
    partitions: Option<u32>,
    /// Retention by age, in milliseconds. Default 7 days.
    #[arg(long)]
    retention_ms: Option<u64>,
    /// Retention by size per partition, in bytes. Default none.
    #[arg(long)]
    retention_bytes: Option<u64>,
    /// Deduplication window, in milliseconds. Default: the retention.
    #[arg(long)]
    dedup_window_ms: Option<u64>,
}

impl TopicSettings {
    fn over(&self, base: TopicConfig) -> TopicConfig {
        TopicConfig {
            partitions: self.partitions.or(base.partitions),
            retention_ms: self.retention_ms.or(base.retention_ms),
            retention_bytes: self.retention_bytes.or(base.retention_bytes),
            dedup_window_ms: self.dedup_window_ms.or(base.dedup_window_ms),
        }
    }
}

pub async fn topics(cmd: TopicsCmd) -> anyhow::Result<u8> {
    let client = cmd.conn.client()?;
    let json = cmd.conn.json;
    match cmd.action {
        TopicsAction::List => {
            let topics = client.list_topics().await?;
            if json {
                output::json(&json!({ "topics": topics }))?;
                return Ok(exit::OK);
            }
            let mut t = output::table(&[
                "TOPIC",
                "PARTITIONS",
                "MESSAGES",
                "RETENTION MS",
                "SUBSCRIPTIONS",
            ]);
            if topics.is_empty() {
                output::line("no topics")?;
                return Ok(exit::OK);
            }
            for topic in &topics {
                t.add_row(vec![
                    topic.name.clone(),
                    topic.partitions.to_string(),
                    retained(topic).to_string(),
                    output::opt(topic.config.retention_ms),
                    subscription_names(topic),
                ]);
            }
            output::line(t)?;
        }
        TopicsAction::Get { topic } => {
            let topic = client
                .get_topic(&topic)
                .await
                .with_context(|| format!("topic {topic}"))?;
            print_topic(&topic, json)?;
        }
        TopicsAction::Create { topic, settings } => {
            match client.get_topic(&topic).await {
                Ok(_) => {
                    return Err(Exit {
                        code: exit::CONFLICT,
                        message: format!(
                            "topic {topic} exists already (use `carebus topics update`)"
                        ),
                    }
                    .into());
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            let created = client
                .put_topic(&topic, &settings.over(TopicConfig::default()))
                .await?;
            print_topic(&created, json)?;
        }
        TopicsAction::Update { topic, settings } => {
            let current = client
                .get_topic(&topic)
                .await
                .with_context(|| format!("topic {topic}"))?;
            let updated = client
                .put_topic(&topic, &settings.over(current.config))
                .await?;
            print_topic(&updated, json)?;
        }
        TopicsAction::Delete { topic, yes } => {
            if !yes && std::io::stdin().is_terminal() && !confirm(&topic)? {
                output::line("not deleted")?;
                return Ok(exit::ERROR);
            }
            client
                .delete_topic(&topic)
                .await
                .with_context(|| format!("topic {topic}"))?;
            if json {
                output::json(&json!({ "deleted": topic }))?;
            } else {
                output::line(format!("deleted topic {topic}"))?;
            }
        }
    }
    Ok(exit::OK)
}

fn confirm(topic: &str) -> anyhow::Result<bool> {
    let mut err = std::io::stderr().lock();
    write!(err, "Delete topic {topic} and all its messages? [y/N] ")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn retained(topic: &carebus_client::Topic) -> u64 {
    topic
        .end_offsets
        .iter()
        .zip(topic.start_offsets.iter().chain(std::iter::repeat(&0)))
        .map(|(end, start)| end.saturating_sub(*start))
        .sum()
}

fn subscription_names(topic: &carebus_client::Topic) -> String {
    if topic.subscriptions.is_empty() {
        return "-".to_owned();
    }
    topic
        .subscriptions
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_topic(topic: &carebus_client::Topic, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(topic);
    }
    let mut t = output::table(&["SETTING", "VALUE"]);
    t.add_row(vec!["topic".to_owned(), topic.name.clone()]);
    t.add_row(vec!["partitions".to_owned(), topic.partitions.to_string()]);
    t.add_row(vec![
        "retention_ms".to_owned(),
        output::opt(topic.config.retention_ms),
    ]);
    t.add_row(vec![
        "retention_bytes".to_owned(),
        output::opt(topic.config.retention_bytes),
    ]);
    t.add_row(vec![
        "dedup_window_ms".to_owned(),
        output::opt(topic.config.dedup_window_ms),
    ]);
    t.add_row(vec!["published".to_owned(), topic.published.to_string()]);
    t.add_row(vec!["duplicates".to_owned(), topic.duplicates.to_string()]);
    t.add_row(vec!["conflicts".to_owned(), topic.conflicts.to_string()]);
    t.add_row(vec!["subscriptions".to_owned(), subscription_names(topic)]);
    output::line(t)?;
    let mut p = output::table(&["PARTITION", "START OFFSET", "END OFFSET"]);
    for (i, end) in topic.end_offsets.iter().enumerate() {
        p.add_row(vec![
            i.to_string(),
            output::opt(topic.start_offsets.get(i)),
            end.to_string(),
        ]);
    }
    output::line(p)?;
    Ok(())
}

// ----- subscriptions -----

/// `carebus subscriptions …`
#[derive(Debug, Args)]
pub struct SubscriptionsCmd {
    #[command(subcommand)]
    action: SubsAction,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum SubsAction {
    /// List a topic's subscriptions.
    List {
        /// Topic name.
        topic: String,
    },
    /// Show a subscription: settings and figures.
    Get {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
    },
    /// Create a subscription (exit 5 if it exists already; see `update`).
    Create {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
        #[command(flatten)]
        settings: SubSettings,
    },
    /// Change settings of an existing subscription (the others and its position are kept).
    Update {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
        #[command(flatten)]
        settings: SubSettings,
    },
    /// Delete a subscription and its state (not the messages).
    Delete {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DispatchArg {
    RoundRobin,
    Random,
    LeastInFlight,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StartArg {
    Earliest,
    Latest,
}

#[derive(Debug, Args)]
struct SubSettings {
    /// How deliveries are spread over consumers. Default round-robin.
    #[arg(long, value_enum)]
    dispatch: Option<DispatchArg>,
    /// Lease of a delivery, in milliseconds (1..=86400000). Default 30000.
    #[arg(long)]
    ack_deadline_ms: Option<u64>,
    /// Deliveries of a message before it becomes a dead letter (1..=1000). Default 5.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Where a new subscription starts. Default earliest.
    #[arg(long, value_enum)]
    start: Option<StartArg>,
    /// Topic receiving a failure record (never the body) for each dead letter.
    #[arg(long)]
    dead_letter_topic: Option<String>,
}

impl SubSettings {
    fn over(&self, base: SubscriptionConfig) -> SubscriptionConfig {
        SubscriptionConfig {
            dispatch: self
                .dispatch
                .map(|d| match d {
                    DispatchArg::RoundRobin => Dispatch::RoundRobin,
                    DispatchArg::Random => Dispatch::Random,
                    DispatchArg::LeastInFlight => Dispatch::LeastInFlight,
                })
                .or(base.dispatch),
            ack_deadline_ms: self.ack_deadline_ms.or(base.ack_deadline_ms),
            max_attempts: self.max_attempts.or(base.max_attempts),
            backoff: base.backoff,
            start: self
                .start
                .map(|s| match s {
                    StartArg::Earliest => StartPosition::Earliest,
                    StartArg::Latest => StartPosition::Latest,
                })
                .or(base.start),
            dead_letter_topic: self.dead_letter_topic.clone().or(base.dead_letter_topic),
        }
    }
}

pub async fn subscriptions(cmd: SubscriptionsCmd) -> anyhow::Result<u8> {
    let client = cmd.conn.client()?;
    let json = cmd.conn.json;
    match cmd.action {
        SubsAction::List { topic } => {
            let subs = client
                .list_subscriptions(&topic)
                .await
                .with_context(|| format!("topic {topic}"))?;
            if json {
                output::json(&json!({ "subscriptions": subs }))?;
                return Ok(exit::OK);
            }
            let mut t = output::table(&[
                "SUBSCRIPTION",
                "DISPATCH",
                "BACKLOG",
                "IN FLIGHT",
                "DEAD LETTERS",
                "ACKED",
            ]);
            if subs.is_empty() {
                output::line(format!("no subscriptions on {topic}"))?;
                return Ok(exit::OK);
            }
            for s in &subs {
                t.add_row(vec![
                    s.name.clone(),
                    output::opt(s.config.dispatch.map(dispatch_name)),
                    s.stats.backlog.to_string(),
                    s.stats.in_flight.to_string(),
                    s.stats.dead_letters.to_string(),
                    s.stats.acked.to_string(),
                ]);
            }
            output::line(t)?;
        }
        SubsAction::Get {
            topic,
            subscription,
        } => {
            let s = client
                .get_subscription(&topic, &subscription)
                .await
                .with_context(|| format!("subscription {topic}/{subscription}"))?;
            print_subscription(&s, json)?;
        }
        SubsAction::Create {
            topic,
            subscription,
            settings,
        } => {
            match client.get_subscription(&topic, &subscription).await {
                Ok(_) => {
                    return Err(Exit {
                        code: exit::CONFLICT,
                        message: format!(
                            "subscription {topic}/{subscription} exists already (use `carebus subscriptions update`)"
                        ),
                    }
                    .into());
                }
                Err(e) if e.code() == Some("unknown_subscription") => {}
                Err(e) => return Err(anyhow::Error::new(e).context(format!("topic {topic}"))),
            }
            let s = client
                .put_subscription(
                    &topic,
                    &subscription,
                    &settings.over(SubscriptionConfig::default()),
                )
                .await?;
            print_subscription(&s, json)?;
        }
        SubsAction::Update {
            topic,
            subscription,
            settings,
        } => {
            let current = client
                .get_subscription(&topic, &subscription)
                .await
                .with_context(|| format!("subscription {topic}/{subscription}"))?;
            let s = client
                .put_subscription(&topic, &subscription, &settings.over(current.config))
                .await?;
            print_subscription(&s, json)?;
        }
        SubsAction::Delete {
            topic,
            subscription,
        } => {
            client
                .delete_subscription(&topic, &subscription)
                .await
                .with_context(|| format!("subscription {topic}/{subscription}"))?;
            if json {
                output::json(&json!({ "deleted": subscription, "topic": topic }))?;
            } else {
                output::line(format!("deleted subscription {topic}/{subscription}"))?;
            }
        }
    }
    Ok(exit::OK)
}

fn dispatch_name(d: Dispatch) -> &'static str {
    match d {
        Dispatch::RoundRobin => "round_robin",
        Dispatch::Random => "random",
        Dispatch::LeastInFlight => "least_in_flight",
    }
}

fn print_subscription(s: &carebus_client::Subscription, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(s);
    }
    let c = &s.config;
    let st = &s.stats;
    let mut t = output::table(&["SETTING", "VALUE"]);
    let rows: Vec<(&str, String)> = vec![
        ("topic", s.topic.clone()),
        ("subscription", s.name.clone()),
        ("dispatch", output::opt(c.dispatch.map(dispatch_name))),
        ("ack_deadline_ms", output::opt(c.ack_deadline_ms)),
        ("max_attempts", output::opt(c.max_attempts)),
        (
            "start",
            output::opt(c.start.map(|s| match s {
                StartPosition::Earliest => "earliest",
                StartPosition::Latest => "latest",
            })),
        ),
        (
            "dead_letter_topic",
            output::opt(c.dead_letter_topic.as_ref()),
        ),
        ("backlog", st.backlog.to_string()),
        ("in_flight", st.in_flight.to_string()),
        ("dead_letters", st.dead_letters.to_string()),
        ("delivered", st.delivered.to_string()),
        ("redelivered", st.redelivered.to_string()),
        ("acked", st.acked.to_string()),
        ("nacked", st.nacked.to_string()),
        ("expired", st.expired.to_string()),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_owned(), v]);
    }
    output::line(t)?;
    Ok(())
}

// ----- produce -----

/// `carebus produce TOPIC [MESSAGE]`
#[derive(Debug, Args)]
pub struct ProduceCmd {
    /// Topic name.
    topic: String,
    /// The message itself (`-` or nothing, and no --file: read standard input).
    #[arg(conflicts_with = "file")]
    message: Option<String>,
    /// Read messages from files, one message per file (repeatable).
    #[arg(long, short = 'f')]
    file: Vec<PathBuf>,
    /// One message per line of the input (empty lines are skipped; a CR before the LF
    /// is dropped).
    #[arg(long)]
    lines: bool,
    /// Partition key: messages with the same key keep their order.
    #[arg(long, short = 'k')]
    key: Option<String>,
    /// Idempotency key; with several messages, message n (from 1) gets `KEY#n`, so
    /// running the same command again stores nothing twice. Without it, a random key
    /// per message is used (retries never duplicate, but a re-run does).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Content type stored with the message(s).
    #[arg(long)]
    content_type: Option<String>,
    /// Message header NAME=VALUE (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Attempts per message (transient failures are retried with backoff, with the
    /// same idempotency key).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_attempts: u32,
    #[command(flatten)]
    conn: Conn,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, v)) if !n.trim().is_empty() => Ok((n.trim().to_owned(), v.to_owned())),
        _ => Err("must be NAME=VALUE".to_owned()),
    }
}

/// One message to send and where it came from.
struct Input {
    source: String,
    body: Vec<u8>,
}

fn read_inputs(cmd: &ProduceCmd) -> anyhow::Result<Vec<Input>> {
    let mut whole: Vec<Input> = Vec::new();
    match (&cmd.message, cmd.file.is_empty()) {
        (Some(m), true) if m != "-" => whole.push(Input {
            source: "argument".to_owned(),
            body: m.clone().into_bytes(),
        }),
        (_, true) => {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .context("reading standard input")?;
            whole.push(Input {
                source: "stdin".to_owned(),
                body,
            });
        }
        (_, false) => {
            for f in &cmd.file {
                let body = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                whole.push(Input {
                    source: f.display().to_string(),
                    body,
                });
            }
        }
    }
    if !cmd.lines {
        return Ok(whole);
    }
    let mut lines = Vec::new();
    for input in whole {
        for (i, line) in input.body.split(|b| *b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            lines.push(Input {
                source: format!("{}:{}", input.source, i + 1),
                body: line.to_vec(),
            });
        }
    }
    Ok(lines)
}

pub async fn produce(cmd: ProduceCmd) -> anyhow::Result<u8> {
    let inputs = read_inputs(&cmd)?;
    if inputs.is_empty() {
        return Err(Exit {
            code: exit::ERROR,
            message: "nothing to send (no non-empty line)".to_owned(),
        }
        .into());
    }
    let publisher = Publisher::new(
        cmd.conn.client()?,
        RetryPolicy {
            max_attempts: cmd.max_attempts,
            ..RetryPolicy::default()
        },
    );
    let many = inputs.len() > 1;
    let bar = if many && std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(inputs.len() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} messages  {per_sec}  eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut done: Vec<(String, Published)> = Vec::new();
    let mut failure = None;
    for (i, input) in inputs.into_iter().enumerate() {
        let mut m = Message::new(input.body);
        m.partition_key.clone_from(&cmd.key);
        m.content_type.clone_from(&cmd.content_type);
        m.idempotency_key = cmd.idempotency_key.as_ref().map(|k| {
            if many {
                format!("{k}#{}", i + 1)
            } else {
                k.clone()
            }
        });
        for (n, v) in &cmd.headers {
            m.headers.insert(n.clone(), v.clone());
        }
        match publisher.publish(&cmd.topic, m).await {
            Ok(p) => done.push((input.source, p)),
            Err(e) => {
                failure = Some(
                    anyhow::Error::new(e)
                        .context(format!("publishing {} to {}", input.source, cmd.topic)),
                );
                break;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    print_produced(&done, cmd.conn.json)?;
    if let Some(e) = failure {
        return Err(e);
    }
    let conflicts = done.iter().filter(|(_, p)| p.outcome.conflict).count();
    if conflicts > 0 {
        return Err(Exit {
            code: exit::CONFLICT,
            message: format!(
                "{conflicts} message(s) not stored: their idempotency key was used before with a different body"
            ),
        }
        .into());
    }
    Ok(exit::OK)
}

fn result_word(p: &Published) -> &'static str {
    match (p.outcome.duplicate, p.outcome.conflict) {
        (_, true) => "conflict",
        (true, false) => "duplicate",
        (false, false) => "stored",
    }
}

fn print_produced(done: &[(String, Published)], json: bool) -> anyhow::Result<()> {
    if json {
        let results: Vec<_> = done
            .iter()
            .map(|(source, p)| {
                json!({
                    "source": source,
                    "partition": p.outcome.partition,
                    "offset": p.outcome.offset,
                    "duplicate": p.outcome.duplicate,
                    "conflict": p.outcome.conflict,
                    "durability": p.outcome.durability,
                    "idempotency_key": p.idempotency_key,
                    "attempts": p.attempts,
                })
            })
            .collect();
        let count = |w: &str| done.iter().filter(|(_, p)| result_word(p) == w).count();
        return output::json(&json!({
            "results": results,
            "stored": count("stored"),
            "duplicates": count("duplicate"),
            "conflicts": count("conflict"),
        }));
    }
    if done.is_empty() {
        return Ok(());
    }
    let mut t = output::table(&["SOURCE", "RESULT", "PARTITION", "OFFSET", "IDEMPOTENCY KEY"]);
    for (source, p) in done {
        t.add_row(vec![
            source.clone(),
            result_word(p).to_owned(),
            p.outcome.partition.to_string(),
            p.outcome.offset.to_string(),
            p.idempotency_key.clone(),
        ]);
    }
    output::line(t)?;
    Ok(())
}

// ----- consume -----

/// `carebus consume TOPIC SUB`
#[derive(Debug, Args)]
pub struct ConsumeCmd {
    /// Topic name.
    topic: String,
    /// Subscription name.
    subscription: String,
    /// Do not acknowledge: the deliveries stay leased and come again after the
    /// subscription's ack deadline (as a new attempt).
    #[arg(long)]
    no_ack: bool,
    /// Stop after this many deliveries.
    #[arg(long)]
    max: Option<u64>,
    /// Keep waiting for new messages until --max or Ctrl-C (otherwise stop at the first
    /// empty poll).
    #[arg(long)]
    follow: bool,
    /// Consumer name (for dispatch and traces).
    #[arg(long, default_value = "carebus-cli")]
    consumer: String,
    /// Long-poll wait per receive, in milliseconds (≤ 60000). Default 1000, or 20000
    /// with --follow.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    wait_ms: Option<u64>,
    #[command(flatten)]
    conn: Conn,
}

pub async fn consume(cmd: ConsumeCmd) -> anyhow::Result<u8> {
    let client = cmd.conn.client()?;
    let wait_ms = cmd
        .wait_ms
        .unwrap_or(if cmd.follow { 20_000 } else { 1_000 });
    let mut count: u64 = 0;
    let mut refused: u64 = 0;
    let interrupted = shutdown_requested();
    tokio::pin!(interrupted);
    loop {
        let remaining = cmd.max.map(|m| m.saturating_sub(count));
        if remaining == Some(0) {
            break;
        }
        let max = remaining.map_or(100, |r| r.min(100)) as u32;
        let options = ReceiveOptions {
            max: Some(max),
            wait_ms: Some(wait_ms),
            consumer: Some(cmd.consumer.clone()),
        };
        let deliveries = tokio::select! {
            () = &mut interrupted => break,
            r = client.receive(&cmd.topic, &cmd.subscription, &options) => r
                .with_context(|| format!("receiving from {}/{}", cmd.topic, cmd.subscription))?,
        };
        if deliveries.is_empty() {
            if cmd.follow {
                continue;
            }
            break;
        }
        for d in &deliveries {
            print_delivery(d, cmd.conn.json)?;
        }
        count += deliveries.len() as u64;
        if !cmd.no_ack {
            let ids: Vec<u64> = deliveries.iter().map(|d| d.delivery_id).collect();
            let settled = client
                .ack(&cmd.topic, &cmd.subscription, &ids)
                .await
                .context("acknowledging")?;
            for r in &settled.refused {
                tracing::warn!(delivery_id = r.delivery_id, code = %r.code, "ack refused; the message will be delivered again");
            }
            refused += settled.refused.len() as u64;
        }
    }
    if !cmd.conn.json {
        let mut err = std::io::stderr().lock();
        let verb = if cmd.no_ack {
            "not acknowledged"
        } else {
            "acknowledged"
        };
        let _ = writeln!(
            err,
            "{count} message(s) received, {} {verb}",
            if cmd.no_ack { count } else { count - refused }
        );
    }
    if refused > 0 {
        return Err(Exit {
            code: exit::CONFLICT,
            message: format!(
                "{refused} acknowledgement(s) refused (lease expired or superseded): those messages will be delivered again"
            ),
        }
        .into());
    }
    Ok(exit::OK)
}

fn print_delivery(d: &Delivery, json: bool) -> anyhow::Result<()> {
    if json {
        let text = std::str::from_utf8(&d.body).ok();
        let line = json!({
            "delivery_id": d.delivery_id,
            "delivery_id_str": d.delivery_id.to_string(),
            "attempt": d.attempt,
            "partition": d.partition,
            "offset": d.offset,
            "timestamp_ms": d.timestamp_ms,
            "partition_key": d.partition_key,
            "idempotency_key": d.idempotency_key,
            "content_type": d.content_type,
            "headers": d.headers,
            "body": text,
            "body_base64": base64::engine::general_purpose::STANDARD.encode(&d.body),
        });
        output::line(line)?;
        return Ok(());
    }
    let mut head = format!(
        "── partition {} offset {} attempt {} delivery {} stored {}",
        d.partition,
        d.offset,
        d.attempt,
        d.delivery_id,
        output::time(d.timestamp_ms)
    );
    if let Some(k) = &d.partition_key {
        head.push_str(&format!(" key={k}"));
    }
    if let Some(k) = &d.idempotency_key {
        head.push_str(&format!(" idempotency-key={k}"));
    }
    if let Some(c) = &d.content_type {
        head.push_str(&format!(" content-type={c}"));
    }
    for (n, v) in &d.headers {
        head.push_str(&format!(" {n}={v}"));
    }
    let body = output::body_for_people(&d.body);
    output::line(format!("{head}\n{}", body.trim_end_matches('\n')))?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM (never, if the handlers cannot be installed).
async fn shutdown_requested() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

// ----- dead letters -----

/// `carebus dlq …`
#[derive(Debug, Args)]
pub struct DlqCmd {
    #[command(subcommand)]
    action: DlqAction,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// List a subscription's dead letters.
    List {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
    },
    /// Deliver a dead letter again (its attempts reset).
    Replay {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
        /// Dead letter id (from `dlq list`).
        id: u64,
    },
    /// Discard a dead letter for good.
    Discard {
        /// Topic name.
        topic: String,
        /// Subscription name.
        subscription: String,
        /// Dead letter id (from `dlq list`).
        id: u64,
    },
}

pub async fn dlq(cmd: DlqCmd) -> anyhow::Result<u8> {
    let client = cmd.conn.client()?;
    let json = cmd.conn.json;
    match cmd.action {
        DlqAction::List {
            topic,
            subscription,
        } => {
            let letters = client
                .dead_letters(&topic, &subscription)
                .await
                .with_context(|| format!("subscription {topic}/{subscription}"))?;
            if json {
                output::json(&json!({ "dead_letters": letters }))?;
                return Ok(exit::OK);
            }
            let mut t = output::table(&[
                "ID",
                "PARTITION",
                "OFFSET",
                "ATTEMPTS",
                "REASON",
                "FIRST FAILURE",
                "LAST FAILURE",
            ]);
            if letters.is_empty() {
                output::line(format!("no dead letters in {topic}/{subscription}"))?;
                return Ok(exit::OK);
            }
            for l in &letters {
                t.add_row(vec![
                    l.id.to_string(),
                    l.partition.to_string(),
                    l.offset.to_string(),
                    l.attempts.to_string(),
                    output::opt(l.reason.as_ref()),
                    output::time(l.first_failure_ms),
                    output::time(l.last_failure_ms),
                ]);
            }
            output::line(t)?;
        }
        DlqAction::Replay {
            topic,
            subscription,
            id,
        } => {
            client
                .replay_dead_letter(&topic, &subscription, id)
                .await
                .with_context(|| format!("dead letter {id} of {topic}/{subscription}"))?;
            if json {
                output::json(&json!({ "replayed": id }))?;
            } else {
                output::line(format!("replayed dead letter {id}"))?;
            }
        }
        DlqAction::Discard {
            topic,
            subscription,
            id,
        } => {
            client
                .discard_dead_letter(&topic, &subscription, id)
                .await
                .with_context(|| format!("dead letter {id} of {topic}/{subscription}"))?;
            if json {
                output::json(&json!({ "discarded": id }))?;
            } else {
                output::line(format!("discarded dead letter {id}"))?;
            }
        }
    }
    Ok(exit::OK)
}

// ----- trace -----

/// `carebus trace TOPIC (--partition P --offset O | --idempotency-key K)`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["offset", "idempotency_key"])))]
pub struct TraceCmd {
    /// Topic name.
    topic: String,
    /// Partition of the message (with --offset).
    #[arg(long, requires = "offset")]
    partition: Option<u32>,
    /// Offset of the message (with --partition).
    #[arg(long, requires = "partition")]
    offset: Option<u64>,
    /// Idempotency key of the message (its first stored copy).
    #[arg(long, conflicts_with_all = ["partition", "offset"])]
    idempotency_key: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

pub async fn trace(cmd: TraceCmd) -> anyhow::Result<u8> {
    let client = cmd.conn.client()?;
    let trace = match (&cmd.idempotency_key, cmd.partition, cmd.offset) {
        (Some(k), _, _) => client.trace_by_key(&cmd.topic, k).await,
        (None, Some(p), Some(o)) => client.trace(&cmd.topic, p, o).await,
        _ => {
            return Err(Exit {
                code: exit::ERROR,
                message: "give --partition and --offset, or --idempotency-key".to_owned(),
            }
            .into());
        }
    }
    .with_context(|| format!("trace in topic {}", cmd.topic))?;
    if cmd.conn.json {
        output::json(&trace)?;
        return Ok(exit::OK);
    }
    output::line(format!(
        "topic {} partition {} offset {} stored {} idempotency-key {} body {} bytes",
        trace.topic,
        trace.partition,
        trace.offset,
        output::time(trace.stored_ms),
        output::opt(trace.idempotency_key.as_ref()),
        output::opt(trace.body_bytes),
    ))?;
    let mut t = output::table(&["SUBSCRIPTION", "STATE", "EVENTS"]);
    for s in &trace.subscriptions {
        let events: Vec<String> = s
            .events
            .iter()
            .map(|e| {
                let mut line = format!("{} {}", output::time(Some(e.at_ms)), e.kind);
                for (k, v) in &e.details {
                    match v {
                        serde_json::Value::Null => {}
                        serde_json::Value::String(s) => line.push_str(&format!(" {k}={s}")),
                        other => line.push_str(&format!(" {k}={other}")),
                    }
                }
                line
            })
            .collect();
        t.add_row(vec![
            s.subscription.clone(),
            s.state.clone(),
            events.join("\n"),
        ]);
    }
    output::line(t)?;
    Ok(exit::OK)
}
