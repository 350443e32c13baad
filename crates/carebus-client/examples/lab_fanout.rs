//! Lab result fan-out: the laboratory system publishes results to `lab.results`; two
//! subscriptions each receive every result independently:
//!
//! - `clinician-inbox` shows results to clinicians (here: counts abnormal ones);
//! - `warehouse-loader` loads them into the data warehouse exactly once: in one
//!   transaction it publishes a load record to `lab.warehouse-loads` and acknowledges
//!   the deliveries, so a crash between the two can neither lose nor double a load.
//!
//! Run a broker (`cargo run -p carebus -- serve`), then
//! `cargo run -p carebus-client --example lab_fanout`
//! (`CAREBUS_URL` selects another server; default http://127.0.0.1:7070).
//! The results below are fictitious.

use carebus_client::{
    CancellationToken, Client, Consumer, ConsumerOptions, Message, Publisher, ReceiveOptions,
    RetryPolicy, StartPosition, SubscriptionConfig, TopicConfig,
};

/// The results topic.
pub const TOPIC: &str = "lab.results";
/// The clinicians' subscription.
pub const INBOX: &str = "clinician-inbox";
/// The data warehouse's subscription.
pub const WAREHOUSE: &str = "warehouse-loader";
/// Where the loader records its loads.
pub const LOADS_TOPIC: &str = "lab.warehouse-loads";

/// What the example did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Results published (stored or duplicate).
    pub published: usize,
    /// Results the inbox received and acknowledged.
    pub inbox: u64,
    /// Of which abnormal.
    pub abnormal: u64,
    /// Results the warehouse loaded (acknowledged in committed transactions).
    pub loaded: u64,
    /// Load records committed to `lab.warehouse-loads`.
    pub load_records: usize,
}

/// (accession, MRN, LOINC code, value, unit, abnormal flag)
const RESULTS: [(&str, &str, &str, &str, &str, &str); 4] = [
    ("ACC-7001", "MRN100234", "2345-7", "5.4", "mmol/L", "N"),
    ("ACC-7002", "MRN100234", "2823-3", "6.1", "mmol/L", "H"),
    ("ACC-7003", "MRN100871", "718-7", "13.9", "g/dL", "N"),
    ("ACC-7004", "MRN100871", "6690-2", "2.1", "10*9/L", "L"),
];

async fn ensure_topic(client: &Client, topic: &str) -> Result<(), carebus_client::Error> {
    match client.get_topic(topic).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => client
            .put_topic(
                topic,
                &TopicConfig {
                    partitions: Some(2),
                    ..TopicConfig::default()
                },
            )
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    }
}

async fn ensure_subscription(client: &Client, sub: &str) -> Result<(), carebus_client::Error> {
    match client.get_subscription(TOPIC, sub).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => {
            let config = SubscriptionConfig {
                start: Some(StartPosition::Earliest),
                ..SubscriptionConfig::default()
            };
            client
                .put_subscription(TOPIC, sub, &config)
                .await
                .map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Sets up topics and subscriptions, publishes the results, then runs both consumers
/// until their subscriptions are drained.
pub async fn run(url: &str) -> Result<Summary, Box<dyn std::error::Error>> {
    let client = Client::new(url)?;
    ensure_topic(&client, TOPIC).await?;
    ensure_topic(&client, LOADS_TOPIC).await?;
    ensure_subscription(&client, INBOX).await?;
    ensure_subscription(&client, WAREHOUSE).await?;
    let mut summary = Summary::default();

    // The laboratory system publishes; the accession number makes the key.
    let publisher = Publisher::new(client.clone(), RetryPolicy::default());
    for (accession, mrn, loinc, value, unit, flag) in RESULTS {
        let body = format!(
            "MSH|^~\\&|LIS|NORTHGATE|EHR|NORTHGATE|20260101120000||ORU^R01|{accession}|P|2.5\r\
             PID|1||{mrn}\r\
             OBX|1|NM|{loinc}^^LN||{value}|{unit}||{flag}|||F\r"
        );
        let sent = publisher
            .publish(
                TOPIC,
                Message::new(body)
                    .content_type("x-application/hl7-v2+er7")
                    .partition_key(mrn)
                    .idempotency_key(format!("LIS|NORTHGATE|{accession}")),
            )
            .await?;
        summary.published += 1;
        println!(
            "published {accession} -> partition {} offset {}",
            sent.outcome.partition, sent.outcome.offset
        );
    }

    // The clinician inbox: a plain consumer loop.
    let inbox = Consumer::new(
        client.clone(),
        TOPIC,
        INBOX,
        ConsumerOptions {
            consumer: "inbox-1".to_owned(),
            wait_ms: 2_000,
            stop_when_idle: true,
            ..ConsumerOptions::default()
        },
    );
    let mut abnormal = 0;
    let stats = inbox
        .run(&CancellationToken::new(), |d| {
            let text = String::from_utf8_lossy(&d.body);
            let flagged = text
                .split('\r')
                .filter(|seg| seg.starts_with("OBX|"))
                .any(|obx| matches!(obx.split('|').nth(8), Some("H" | "L" | "HH" | "LL" | "A")));
            if flagged {
                abnormal += 1;
            }
            async { Ok::<(), String>(()) }
        })
        .await?;
    summary.inbox = stats.acked;
    summary.abnormal = abnormal;
    println!(
        "clinician inbox: {} result(s), {abnormal} abnormal",
        stats.acked
    );

    // The warehouse loader: receive a batch, then publish its load record and
    // acknowledge the batch in one transaction.
    loop {
        let batch = client
            .receive(
                TOPIC,
                WAREHOUSE,
                &ReceiveOptions {
                    max: Some(100),
                    wait_ms: Some(2_000),
                    consumer: Some("warehouse-1".to_owned()),
                },
            )
            .await?;
        if batch.is_empty() {
            break;
        }
        let positions: Vec<String> = batch
            .iter()
            .map(|d| format!("{}/{}", d.partition, d.offset))
            .collect();
        // The load record lists positions only, not results.
        let record = serde_json::json!({"loaded": positions}).to_string();
        let ids: Vec<u64> = batch.iter().map(|d| d.delivery_id).collect();
        let txn = client.begin(Some(30_000)).await?;
        txn.publish(
            LOADS_TOPIC,
            &[Message::new(record).content_type("application/json")],
        )
        .await?;
        let accepted = txn.ack(TOPIC, WAREHOUSE, &ids).await?;
        if accepted.count == 0 {
            txn.abort().await?;
            continue;
        }
        let committed = txn.commit().await?;
        summary.loaded += accepted.count;
        summary.load_records += committed.len();
        println!(
            "warehouse: loaded {} result(s) in one transaction",
            accepted.count
        );
    }
    Ok(summary)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("CAREBUS_URL").unwrap_or_else(|_| carebus_client::DEFAULT_URL.to_owned());
    let s = run(&url).await?;
    println!(
        "published {}; inbox {} ({} abnormal); warehouse loaded {} in {} load record(s)",
        s.published, s.inbox, s.abnormal, s.loaded, s.load_records
    );
    Ok(())
}
