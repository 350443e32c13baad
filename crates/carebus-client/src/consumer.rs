//! The consumer loop: receive → handler → ack on `Ok` / nack with the reason on `Err`.

use std::fmt::Display;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::types::{Delivery, ReceiveOptions};
use crate::{Client, Error, RetryPolicy};

/// Longest nack reason kept by the server.
const MAX_REASON_CHARS: usize = 1000;

/// Settings of a [`Consumer`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerOptions {
    /// Consumer name (dispatch and traces).
    pub consumer: String,
    /// Most deliveries per receive (1..=1000).
    pub batch: u32,
    /// Long-poll wait per receive (≤ 60000 ms).
    pub wait_ms: u64,
    /// Stop after handling this many deliveries.
    pub max_messages: Option<u64>,
    /// Stop after the first receive that returns nothing (drain, don't follow).
    pub stop_when_idle: bool,
    /// `delay_ms` of nacks (the subscription's backoff applies when longer).
    pub nack_delay_ms: Option<u64>,
    /// Retries of receive/ack/nack on transient failures (server restarting, 5xx); the
    /// loop fails once a call exhausts it.
    pub retry: RetryPolicy,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            consumer: "default".to_owned(),
            batch: 10,
            wait_ms: 20_000,
            max_messages: None,
            stop_when_idle: false,
            nack_delay_ms: None,
            retry: RetryPolicy::default(),
        }
    }
}

/// What a consumer loop did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Deliveries handed to the handler.
    pub received: u64,
    /// Acknowledged (handler `Ok`).
    pub acked: u64,
    /// Negatively acknowledged (handler `Err`).
    pub nacked: u64,
    /// Acks or nacks the server refused (lease ran out: the message comes again).
    pub refused: u64,
}

/// Runs a handler over a subscription's deliveries.
#[derive(Debug, Clone)]
pub struct Consumer {
    client: Client,
    topic: String,
    subscription: String,
    options: ConsumerOptions,
}

impl Consumer {
    /// A consumer of `topic`/`subscription`.
    pub fn new(client: Client, topic: &str, subscription: &str, options: ConsumerOptions) -> Self {
        Consumer {
            client,
            topic: topic.to_owned(),
            subscription: subscription.to_owned(),
            options,
        }
    }

    /// Receives and hands each delivery to `handler`: `Ok` acknowledges it, `Err` nacks
    /// it with the error's text as reason (do not put patient data in it). Stops when
    /// `cancel` is cancelled (between deliveries; a waiting receive is abandoned), after
    /// `max_messages`, or when idle with `stop_when_idle`. The acks of one receive are
    /// sent together after its deliveries have been handled.
    pub async fn run<F, Fut, E>(
        &self,
        cancel: &CancellationToken,
        mut handler: F,
    ) -> Result<ConsumerStats, Error>
    where
        F: FnMut(Delivery) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let mut stats = ConsumerStats::default();
        let o = &self.options;
        loop {
            let remaining = o.max_messages.map(|m| m.saturating_sub(stats.received));
            if remaining == Some(0) || cancel.is_cancelled() {
                return Ok(stats);
            }
            let max = remaining.map_or(o.batch, |r| {
                u32::try_from(r).unwrap_or(u32::MAX).min(o.batch)
            });
            let request = ReceiveOptions {
                max: Some(max.max(1)),
                wait_ms: Some(o.wait_ms),
                consumer: Some(o.consumer.clone()),
            };
            let received = tokio::select! {
                () = cancel.cancelled() => return Ok(stats),
                r = self.retrying("receive", || self.client.receive(&self.topic, &self.subscription, &request)) => r?,
            };
            if received.is_empty() {
                if o.stop_when_idle {
                    return Ok(stats);
                }
                continue;
            }
            let mut ok = Vec::new();
            for delivery in received {
                stats.received += 1;
                let id = delivery.delivery_id;
                match handler(delivery).await {
                    Ok(()) => ok.push(id),
                    Err(e) => {
                        let reason: String = e.to_string().chars().take(MAX_REASON_CHARS).collect();
                        let ids = [id];
                        let settled = self
                            .retrying("nack", || {
                                self.client.nack(
                                    &self.topic,
                                    &self.subscription,
                                    &ids,
                                    Some(&reason),
                                    o.nack_delay_ms,
                                )
                            })
                            .await?;
                        stats.nacked += settled.count;
                        stats.refused += settled.refused.len() as u64;
                    }
                }
            }
            if !ok.is_empty() {
                let settled = self
                    .retrying("ack", || {
                        self.client.ack(&self.topic, &self.subscription, &ok)
                    })
                    .await?;
                stats.acked += settled.count;
                stats.refused += settled.refused.len() as u64;
            }
        }
    }

    async fn retrying<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let (v, _) = self
            .options
            .retry
            .run(
                |_| call(),
                |n, err, delay: Duration| {
                    tracing::warn!(
                        topic = %self.topic,
                        subscription = %self.subscription,
                        call = what,
                        attempt = n,
                        error = %err,
                        delay_ms = delay.as_millis() as u64,
                        "consumer call failed; retrying"
                    );
                },
            )
            .await?;
        Ok(v)
    }
}
