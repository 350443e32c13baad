//! Patient demographics sync: a registration system publishes patient demographics to
//! the `patient-info` topic, and a downstream system (here, an in-memory master patient
//! index) receives and acknowledges them.
//!
//! - Each update carries an idempotency key made from the source system, the MRN and
//!   the record version, so a resend (after a timeout, a restart, a replayed export) is
//!   answered as a duplicate and never stored twice; the retrying publisher keeps that
//!   key across its own retries.
//! - The MRN is the partition key, so one patient's updates arrive in order.
//!
//! Run a broker (`cargo run -p carebus -- serve`), then
//! `cargo run -p carebus-client --example patient_info_sync`
//! (`CAREBUS_URL` selects another server; default http://127.0.0.1:7070).
//! The patients below are fictitious.

use std::collections::BTreeMap;

use carebus_client::{
    CancellationToken, Client, Consumer, ConsumerOptions, Message, Publisher, RetryPolicy,
    StartPosition, SubscriptionConfig, TopicConfig,
};

/// The topic the demographics go to.
pub const TOPIC: &str = "patient-info";
/// The downstream system's subscription.
pub const SUBSCRIPTION: &str = "mpi-sync";

/// What the example did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Updates stored by this run.
    pub stored: usize,
    /// Publishes answered as duplicates (the deliberate resend, or a re-run).
    pub duplicates: usize,
    /// The index after the sync: MRN → demographics (JSON text).
    pub index: BTreeMap<String, String>,
}

/// Demographics updates: (MRN, record version, JSON body).
fn updates() -> Vec<(&'static str, u32, String)> {
    [
        ("MRN100234", 1, "Doe", "Jane", "1984-03-12", "F"),
        ("MRN100871", 1, "Roe", "Richard", "1957-11-02", "M"),
        ("MRN100234", 2, "Doe-Smith", "Jane", "1984-03-12", "F"),
    ]
    .into_iter()
    .map(|(mrn, version, family, given, birth, sex)| {
        let body = serde_json::json!({
            "resourceType": "Patient",
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999", "value": mrn}],
            "name": [{"family": family, "given": [given]}],
            "birthDate": birth,
            "gender": if sex == "F" { "female" } else { "male" },
            "meta": {"versionId": version.to_string()}
        });
        (mrn, version, body.to_string())
    })
    .collect()
}

/// Creates the topic and subscription if missing, publishes the updates (and one
/// deliberate resend), then consumes until the subscription is drained.
pub async fn run(url: &str) -> Result<Summary, Box<dyn std::error::Error>> {
    let client = Client::new(url)?;
    match client.get_topic(TOPIC).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {
            client
                .put_topic(
                    TOPIC,
                    &TopicConfig {
                        partitions: Some(2),
                        ..TopicConfig::default()
                    },
                )
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    match client.get_subscription(TOPIC, SUBSCRIPTION).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {
            client
                .put_subscription(
                    TOPIC,
                    SUBSCRIPTION,
                    &SubscriptionConfig {
                        start: Some(StartPosition::Earliest),
                        ..SubscriptionConfig::default()
                    },
                )
                .await?;
        }
        Err(e) => return Err(e.into()),
    }

    // Publisher side.
    let publisher = Publisher::new(client.clone(), RetryPolicy::default());
    let mut summary = Summary::default();
    let mut sends: Vec<Message> = updates()
        .into_iter()
        .map(|(mrn, version, body)| {
            Message::new(body)
                .content_type("application/fhir+json")
                .partition_key(mrn)
                .idempotency_key(format!("REGISTRATION|{mrn}|v{version}"))
                .header("source-system", "registration")
        })
        .collect();
    // The registration system resends its first update (say, after a timeout).
    if let Some(first) = sends.first().cloned() {
        sends.push(first);
    }
    for message in sends {
        let sent = publisher.publish(TOPIC, message).await?;
        if sent.outcome.duplicate {
            summary.duplicates += 1;
        } else {
            summary.stored += 1;
        }
        // Ids and positions only: never the patient's data in logs.
        println!(
            "published {} -> partition {} offset {}{}",
            sent.idempotency_key,
            sent.outcome.partition,
            sent.outcome.offset,
            if sent.outcome.duplicate {
                " (duplicate, not stored again)"
            } else {
                ""
            }
        );
    }

    // Consumer side: apply each update to the index, acknowledge on success.
    let consumer = Consumer::new(
        client,
        TOPIC,
        SUBSCRIPTION,
        ConsumerOptions {
            consumer: "mpi-1".to_owned(),
            wait_ms: 2_000,
            stop_when_idle: true,
            ..ConsumerOptions::default()
        },
    );
    let mut index = BTreeMap::new();
    let stats = consumer
        .run(&CancellationToken::new(), |delivery| {
            let applied = match (
                delivery.partition_key.clone(),
                String::from_utf8(delivery.body),
            ) {
                (Some(mrn), Ok(body)) => {
                    index.insert(mrn, body);
                    Ok(())
                }
                // A nack reason goes into traces and dead letters: no patient data.
                (None, _) => Err("no partition key (MRN)".to_owned()),
                (_, Err(_)) => Err("body is not UTF-8 JSON".to_owned()),
            };
            async move { applied }
        })
        .await?;
    println!(
        "consumed {} update(s): {} acknowledged, {} rejected; {} patient(s) in the index",
        stats.received,
        stats.acked,
        stats.nacked,
        index.len()
    );
    summary.index = index;
    Ok(summary)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("CAREBUS_URL").unwrap_or_else(|_| carebus_client::DEFAULT_URL.to_owned());
    let summary = run(&url).await?;
    println!(
        "stored {} update(s), {} duplicate(s) dropped",
        summary.stored, summary.duplicates
    );
    Ok(())
}
