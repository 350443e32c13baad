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
    fn teardown<'a>(&'a self, topic: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.broker.delete_topic(topic)?;
            Ok(())
        })
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use carebus_core::BrokerConfig;

    /// The harness deletes each workload's topic afterwards (so the next starts with its
    /// memory given back): the topic and its stored data must then be gone.
    #[tokio::test]
    async fn teardown_deletes_the_topic_and_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, _) = Broker::open(dir.path(), BrokerConfig::default()).unwrap();
        let broker = Arc::new(broker);
        let d = CoreDriver::new(Arc::clone(&broker));
        d.setup("w1i1", &["s".to_owned()]).await.unwrap();
        let keep = CoreDriver::new(Arc::clone(&broker));
        keep.setup("w1i256", &[]).await.unwrap();
        for i in 0..10 {
            let dup = d
                .publish("w1i1", &format!("k{i}"), Bytes::from(vec![b'x'; 1024]))
                .await
                .unwrap();
            assert!(!dup);
        }
        let files_before = count_files(dir.path());
        d.teardown("w1i1").await.unwrap();
        let names: Vec<String> = broker
            .topics()
            .iter()
            .map(|t| t.topic().name.clone())
            .collect();
        assert_eq!(names, vec!["w1i256".to_owned()]);
        assert!(
            count_files(dir.path()) < files_before,
            "the topic's files are deleted"
        );
        assert!(d.teardown("w1i1").await.is_err(), "already gone");
    }

    /// A workload that failed before its topic existed is reported once, by its own
    /// error; a deletion that fails after a workload that went well is reported.
    #[tokio::test]
    async fn a_failed_deletion_is_noted_only_after_a_workload_that_noted_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, _) = Broker::open(dir.path(), BrokerConfig::default()).unwrap();
        let d = CoreDriver::new(Arc::new(broker));
        let mut errors = Vec::new();
        let since = errors.len();
        errors.push("W1 in-flight 1: could not create the topic".to_owned());
        super::super::release(&d, "never-made", &mut errors, since).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let since = errors.len();
        super::super::release(&d, "never-made", &mut errors, since).await;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[1].starts_with("deleting topic never-made after its workload"),
            "{errors:?}"
        );
    }

    fn count_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                if e.path().is_dir() {
                    count_files(&e.path())
                } else {
                    1
                }
            })
            .sum()
    }
}
