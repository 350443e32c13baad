//! carebus's broker core driven in process (no HTTP, no client library): the same
//! workloads as the network drivers, to show how much of a figure is the core (log,
//! group commit, delivery engine) and how much the front-end and its round trips.
//! Used for the W4 row "carebus-core in process".

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use carebus_core::{Broker, PublishMessage, SubscriptionConfig, TopicConfig};

use super::driver::{BoxFut, Consumer, Driver, Received, now_ns};

/// An open broker core, shared by the workload's tasks.
pub struct CoreDriver {
    broker: Arc<Broker>,
}

impl CoreDriver {
    pub fn new(broker: Arc<Broker>) -> Self {
        CoreDriver { broker }
    }
}

impl Driver for CoreDriver {
    fn setup<'a>(&'a self, topic: &'a str, subs: &'a [String]) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.broker.put_topic(topic, TopicConfig::default())?;
            for s in subs {
                self.broker
                    .put_subscription(topic, s, SubscriptionConfig::default())?;
            }
            Ok(())
        })
    }

    fn publish<'a>(&'a self, topic: &'a str, key: &'a str, body: Bytes) -> BoxFut<'a, bool> {
        Box::pin(async move {
            let mut m = PublishMessage::new(body);
            m.idempotency_key = Some(Bytes::copy_from_slice(key.as_bytes()));
            let out = self.broker.publish(topic, vec![m]).await?;
            let o = out
                .first()
                .ok_or_else(|| anyhow::anyhow!("no outcome for {key}"))?;
            Ok(o.duplicate)
        })
    }

    fn consumer<'a>(
        &'a self,
        topic: &'a str,
        sub: &'a str,
        name: &'a str,
    ) -> BoxFut<'a, Box<dyn Consumer>> {
        Box::pin(async move {
            let c: Box<dyn Consumer> = Box::new(CoreConsumer {
                broker: Arc::clone(&self.broker),
                topic: topic.to_owned(),
                sub: sub.to_owned(),
                name: name.to_owned(),
                acks: Vec::new(),
            });
            Ok(c)
        })
    }
}

/// A consumer whose acks run as their own tasks (pipelined, like the HTTP client's),
/// checked in [`Consumer::finish`].
struct CoreConsumer {
    broker: Arc<Broker>,
    topic: String,
    sub: String,
    name: String,
    acks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Consumer for CoreConsumer {
    fn receive_ack(&mut self, max: usize, wait: Duration) -> BoxFut<'_, Received> {
        Box::pin(async move {
            let ds = self
                .broker
                .receive(&self.topic, &self.sub, &self.name, max, wait)
                .await?;
            let at_ns = now_ns();
            if ds.is_empty() {
                return Ok(Received::default());
            }
            let ids: Vec<u64> = ds.iter().map(|d| d.delivery_id).collect();
            let (broker, topic, sub) = (
                Arc::clone(&self.broker),
                self.topic.clone(),
                self.sub.clone(),
            );
            self.acks.push(tokio::spawn(async move {
                let refused = broker.ack(&topic, &sub, &ids).await?;
                anyhow::ensure!(refused.is_empty(), "acks refused: {refused:?}");
                Ok(())
            }));
            // Reap finished acks now and then so the list stays short.
            if self.acks.len() > 1024 {
                let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.acks)
                    .into_iter()
                    .partition(tokio::task::JoinHandle::is_finished);
                self.acks = rest;
                for a in done {
                    a.await??;
                }
            }
            Ok(Received {
                at_ns,
                bodies: ds.into_iter().map(|d| d.message.body).collect(),
            })
        })
    }

    fn finish(&mut self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            for a in std::mem::take(&mut self.acks) {
                a.await??;
            }
            Ok(())
        })
    }
}
