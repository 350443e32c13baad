//! carebus: the real `carebus serve` binary, driven over HTTP through `carebus-client`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use carebus_client::{
    Client, Durability, Message, PublishStream, ReceiveOptions, SubscriptionConfig, TopicConfig,
};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use super::driver::{BoxFut, Consumer, Driver, Received, now_ns, oru};
use super::procs::{Server, free_port, wait_ready};
use super::workloads::{Throughput, measure_window, record};

/// The `carebus` binary: the option, else `$CARGO_TARGET_DIR/release/carebus`, else
/// beside this benchmark's own binary, else the workspace's `target/release/carebus`.
pub fn locate(option: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = option {
        return p.is_file().then(|| p.to_path_buf());
    }
    let mut candidates = Vec::new();
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("release/carebus"));
    }
    // Beside this benchmark binary (the same target directory).
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join("carebus"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/carebus"));
    candidates.into_iter().find(|p| p.is_file())
}

pub fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The command line the harness runs (written into the report).
pub fn settings(bin: &Path) -> String {
    format!(
        "`{} serve --data-dir <run dir>/carebus --http-addr 127.0.0.1:<free port> --no-mllp` \
         (defaults otherwise: `--fsync always`, i.e. fdatasync before every acknowledgement, \
         shared by concurrent writers; topics with 1 partition)",
        bin.display()
    )
}

#[derive(Debug, Clone)]
pub struct CarebusDriver {
    pub client: Client,
    /// Set when an acknowledgement said `buffered` instead of `fsynced`.
    pub saw_buffered: Arc<AtomicBool>,
}

impl CarebusDriver {
    /// Whether a publish outcome was a duplicate; a conflict is an error (the harness
    /// never changes a body), and a `buffered` acknowledgement is noted.
    fn duplicate(&self, key: &str, o: &carebus_client::Outcome) -> anyhow::Result<bool> {
        anyhow::ensure!(!o.conflict, "conflict for key {key}");
        if o.durability != Durability::Fsynced {
            self.saw_buffered.store(true, Ordering::Relaxed);
        }
        Ok(o.duplicate)
    }
}

/// Starts `carebus serve` with its data in `dir` and waits until `/v1` answers.
pub async fn start(bin: &Path, dir: &Path) -> anyhow::Result<(Server, CarebusDriver)> {
    let data = dir.join("carebus");
    std::fs::create_dir_all(&data)?;
    let port = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--no-mllp")
        .env("CAREBUS_LOG", "warn");
    let mut server = Server::spawn("carebus", cmd, &dir.join("carebus.log"))?;
    let client = Client::new(&format!("http://127.0.0.1:{port}"))?;
    let c = client.clone();
    wait_ready(&mut server, Duration::from_secs(60), || {
        let c = c.clone();
        async move {
            c.list_topics().await?;
            Ok(())
        }
    })
    .await?;
    Ok((
        server,
        CarebusDriver {
            client,
            saw_buffered: Arc::new(AtomicBool::new(false)),
        },
    ))
}

impl Driver for CarebusDriver {
    fn teardown<'a>(&'a self, topic: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.client.delete_topic(topic).await?;
            Ok(())
        })
    }

    fn setup<'a>(&'a self, topic: &'a str, subs: &'a [String]) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.client
                .put_topic(topic, &TopicConfig::default())
                .await?;
            for s in subs {
                self.client
                    .put_subscription(topic, s, &SubscriptionConfig::default())
                    .await?;
            }
            Ok(())
        })
    }

    fn publish<'a>(&'a self, topic: &'a str, key: &'a str, body: Bytes) -> BoxFut<'a, bool> {
        Box::pin(async move {
            let m = Message::new(Vec::from(body)).idempotency_key(key);
            let o = self.client.publish(topic, &m).await?;
            self.duplicate(key, &o)
        })
    }

    fn consumer<'a>(
        &'a self,
        topic: &'a str,
        sub: &'a str,
        name: &'a str,
    ) -> BoxFut<'a, Box<dyn Consumer>> {
        Box::pin(async move {
            let c: Box<dyn Consumer> = Box::new(CarebusConsumer {
                client: self.client.clone(),
                topic: topic.to_owned(),
                sub: sub.to_owned(),
                name: name.to_owned(),
                acks: JoinSet::new(),
            });
            Ok(c)
        })
    }
}

/// Ack requests one consumer keeps in flight while it receives the next messages.
const ACKS_IN_FLIGHT: usize = 4;

struct CarebusConsumer {
    client: Client,
    topic: String,
    sub: String,
    name: String,
    /// Ack requests sent and not yet answered (each answer comes after an fsync).
    acks: JoinSet<anyhow::Result<()>>,
}

impl CarebusConsumer {
    /// Waits for one pending ack (if any) and fails if it was refused.
    async fn settle_one(&mut self) -> anyhow::Result<()> {
        if let Some(done) = self.acks.join_next().await {
            done??;
        }
        Ok(())
    }
}

impl Consumer for CarebusConsumer {
    fn receive_ack(&mut self, max: usize, wait: Duration) -> BoxFut<'_, Received> {
        Box::pin(async move {
            let opts = ReceiveOptions {
                max: Some(u32::try_from(max.clamp(1, 1000)).unwrap_or(1000)),
                wait_ms: Some(u64::try_from(wait.as_millis()).unwrap_or(60_000)),
                consumer: Some(self.name.clone()),
            };
            let ds = self.client.receive(&self.topic, &self.sub, &opts).await?;
            let at_ns = now_ns();
            if ds.is_empty() {
                return Ok(Received::default());
            }
            let ids: Vec<u64> = ds.iter().map(|d| d.delivery_id).collect();
            while self.acks.len() >= ACKS_IN_FLIGHT {
                self.settle_one().await?;
            }
            let (client, topic, sub) = (self.client.clone(), self.topic.clone(), self.sub.clone());
            self.acks.spawn(async move {
                let settled = client.ack(&topic, &sub, &ids).await?;
                anyhow::ensure!(
                    settled.refused.is_empty(),
                    "{} acks refused",
                    settled.refused.len()
                );
                Ok(())
            });
            Ok(Received {
                at_ns,
                bodies: ds.into_iter().map(|d| Bytes::from(d.body)).collect(),
            })
        })
    }

    fn finish(&mut self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            while !self.acks.is_empty() {
                self.settle_one().await?;
            }
            Ok(())
        })
    }
}

/// carebus only: `publish_batch` (messages:batch) with `batch` messages per request and
/// `inflight` requests outstanding, each message with its own idempotency key.
pub async fn batch_publish(
    d: &CarebusDriver,
    topic: &str,
    batch: usize,
    inflight: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Throughput> {
    d.setup(topic, &[]).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..inflight {
        let (client, stop, measuring, counted, total) = (
            d.client.clone(),
            Arc::clone(&stop),
            Arc::clone(&measuring),
            Arc::clone(&counted),
            Arc::clone(&total),
        );
        let topic = topic.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msgs: Vec<Message> = (0..batch)
                    .map(|_| {
                        seq += 1;
                        let key = format!("B-{t:03}-{seq:010}");
                        Message::new(Vec::from(oru(&key, 0))).idempotency_key(key)
                    })
                    .collect();
                let t0 = Instant::now();
                let out = client.publish_batch(&topic, &msgs).await?;
                anyhow::ensure!(out.iter().all(|o| !o.duplicate), "unexpected duplicate");
                total.fetch_add(batch as u64, Ordering::Relaxed);
                if measuring.load(Ordering::Relaxed) {
                    record(&mut hist, t0.elapsed())?;
                    counted.fetch_add(batch as u64, Ordering::Relaxed);
                }
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    measure_window(
        tasks,
        (warmup, duration),
        &measuring,
        &stop,
        (&counted, &total),
    )
    .await
}

/// carebus publishing over the `messages:stream` WebSocket (one socket per topic, opened
/// at the first publish and shared by all publishing tasks); everything else as
/// [`CarebusDriver`]. Used for the W1 rows "over messages:stream".
pub struct StreamDriver {
    inner: CarebusDriver,
    /// Looked up by every publish (a plain lock held for a map lookup).
    streams: std::sync::RwLock<std::collections::HashMap<String, PublishStream>>,
    /// Held while a socket is opened, so concurrent first publishes open one.
    opening: tokio::sync::Mutex<()>,
}

impl StreamDriver {
    pub fn new(inner: CarebusDriver) -> Self {
        StreamDriver {
            inner,
            streams: std::sync::RwLock::default(),
            opening: tokio::sync::Mutex::default(),
        }
    }

    fn open_stream(&self, topic: &str) -> Option<PublishStream> {
        let streams = self.streams.read().unwrap_or_else(PoisonError::into_inner);
        streams.get(topic).cloned()
    }

    async fn stream(&self, topic: &str) -> anyhow::Result<PublishStream> {
        if let Some(s) = self.open_stream(topic) {
            return Ok(s);
        }
        let _opening = self.opening.lock().await;
        if let Some(s) = self.open_stream(topic) {
            return Ok(s);
        }
        let s = self.inner.client.publish_stream(topic).await?;
        self.streams
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(topic.to_owned(), s.clone());
        Ok(s)
    }
}

impl Driver for StreamDriver {
    fn setup<'a>(&'a self, topic: &'a str, subs: &'a [String]) -> BoxFut<'a, ()> {
        self.inner.setup(topic, subs)
    }

    /// Closes the topic's socket (the last clone goes with the map's entry), then
    /// deletes the topic.
    fn teardown<'a>(&'a self, topic: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let stream = self
                .streams
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(topic);
            drop(stream);
            self.inner.teardown(topic).await
        })
    }

    fn publish<'a>(&'a self, topic: &'a str, key: &'a str, body: Bytes) -> BoxFut<'a, bool> {
        Box::pin(async move {
            let m = Message::new(Vec::from(body)).idempotency_key(key);
            let o = self.stream(topic).await?.publish(&m).await?;
            self.inner.duplicate(key, &o)
        })
    }

    fn consumer<'a>(
        &'a self,
        topic: &'a str,
        sub: &'a str,
        name: &'a str,
    ) -> BoxFut<'a, Box<dyn Consumer>> {
        self.inner.consumer(topic, sub, name)
    }
}
