//! RabbitMQ through lapin: a durable fanout exchange per topic with one quorum queue per
//! subscription, persistent messages, publisher confirms, manual acks. The Debian
//! server is started directly (as the invoking user, root here) with environment
//! variables and a config file written into the run directory, with its own epmd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use super::driver::{BoxFut, Consumer, Driver, Received, now_ns};
use super::procs::{Server, free_port, wait_ready};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// The server start script, if the Debian package is installed (with epmd).
pub fn locate() -> Option<PathBuf> {
    let p = PathBuf::from(SERVER);
    let epmd = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("epmd").is_file()));
    (p.exists() && epmd).then_some(p)
}

pub fn version() -> String {
    let q = |pkg: &str| {
        Command::new("dpkg-query")
            .args(["-W", "-f", "${Version}", pkg])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "?".into())
    };
    format!("{} (Erlang {})", q("rabbitmq-server"), q("erlang-base"))
}

/// The config file (rabbitmq.conf, sysctl format).
pub fn config(port: u16) -> String {
    format!(
        "# written by carebus-bench compare\n\
         listeners.tcp.default = 127.0.0.1:{port}\n\
         loopback_users = none\n\
         log.console = false\n\
         log.file.level = warning\n\
         # everything else default: quorum queues (x-queue-type=quorum) fsync their Raft\n\
         # log before confirming; publisher confirms; manual acks\n"
    )
}

/// Starts epmd and RabbitMQ with data under `dir` and connects.
pub async fn start(bin: &Path, dir: &Path) -> anyhow::Result<(Server, RabbitDriver)> {
    let base = dir.join("rabbitmq");
    let (home, mnesia, logs) = (base.join("home"), base.join("mnesia"), base.join("log"));
    for d in [&home, &mnesia, &logs] {
        std::fs::create_dir_all(d)?;
    }
    let (port, dist, epmd_port) = (free_port()?, free_port()?, free_port()?);
    let conf = base.join("rabbitmq.conf");
    std::fs::write(&conf, config(port))?;
    let plugins = base.join("enabled_plugins");
    std::fs::write(&plugins, "[].\n")?;
    let mut epmd = Command::new("epmd")
        .arg("-port")
        .arg(epmd_port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut cmd = Command::new(bin);
    cmd.env("HOME", &home)
        .env("ERL_EPMD_PORT", epmd_port.to_string())
        .env("RABBITMQ_NODENAME", "carebus_bench@localhost")
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist.to_string())
        .env("RABBITMQ_MNESIA_BASE", &mnesia)
        .env("RABBITMQ_LOG_BASE", &logs)
        .env("RABBITMQ_CONFIG_FILE", &conf)
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins)
        .env("RABBITMQ_PID_FILE", base.join("rabbitmq.pid"))
        .current_dir(&base);
    let mut server = match Server::spawn("rabbitmq", cmd, &dir.join("rabbitmq.log")) {
        Ok(s) => s,
        Err(e) => {
            // Do not leave the epmd started for it behind.
            let _ = epmd.kill();
            let _ = epmd.wait();
            return Err(e);
        }
    };
    server.add_helper(epmd);
    server.term_target = Some("beam.smp".into());
    let uri = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let probe_uri = uri.clone();
    wait_ready(&mut server, Duration::from_secs(90), || {
        let uri = probe_uri.clone();
        async move {
            let c = Connection::connect(&uri, ConnectionProperties::default()).await?;
            let _ = c.close(200, "probe".into()).await;
            Ok(())
        }
    })
    .await?;
    let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((
        server,
        RabbitDriver {
            conn,
            publish,
            queues: std::sync::Mutex::default(),
        },
    ))
}

pub struct RabbitDriver {
    conn: Connection,
    publish: Channel,
    /// The queues declared for each topic (its exchange), for `teardown`.
    queues: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
}

fn queue(topic: &str, sub: &str) -> String {
    format!("{topic}.{sub}")
}

impl Driver for RabbitDriver {
    fn teardown<'a>(&'a self, topic: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let names = self
                .queues
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(topic)
                .unwrap_or_default();
            for q in names {
                self.publish
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
            self.publish
                .exchange_delete(topic.into(), ExchangeDeleteOptions::default())
                .await?;
            Ok(())
        })
    }

    fn setup<'a>(&'a self, topic: &'a str, subs: &'a [String]) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let ch = &self.publish;
            ch.exchange_declare(
                topic.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
            // Without a queue RabbitMQ would drop (not store) what is published.
            let names: Vec<String> = if subs.is_empty() {
                vec![queue(topic, "store")]
            } else {
                subs.iter().map(|s| queue(topic, s)).collect()
            };
            self.queues
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(topic.to_owned(), names.clone());
            for q in names {
                let mut args = FieldTable::default();
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
                ch.queue_declare(
                    q.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await?;
                ch.queue_bind(
                    q.as_str().into(),
                    topic.into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
            Ok(())
        })
    }

    fn publish<'a>(&'a self, topic: &'a str, key: &'a str, body: Bytes) -> BoxFut<'a, bool> {
        Box::pin(async move {
            let confirm = self
                .publish
                .basic_publish(
                    topic.into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(key.into()),
                )
                .await?
                .await?;
            anyhow::ensure!(confirm.is_ack(), "publish not confirmed: {confirm:?}");
            // RabbitMQ has no publish deduplication: it never reports a duplicate.
            Ok(false)
        })
    }

    fn consumer<'a>(
        &'a self,
        topic: &'a str,
        sub: &'a str,
        name: &'a str,
    ) -> BoxFut<'a, Box<dyn Consumer>> {
        Box::pin(async move {
            let ch = self.conn.create_channel().await?;
            ch.basic_qos(512, BasicQosOptions::default()).await?;
            let consumer = ch
                .basic_consume(
                    queue(topic, sub).as_str().into(),
                    name.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let c: Box<dyn Consumer> = Box::new(RabbitConsumer {
                _channel: ch,
                consumer,
            });
            Ok(c)
        })
    }
}

struct RabbitConsumer {
    _channel: Channel,
    consumer: lapin::Consumer,
}

impl Consumer for RabbitConsumer {
    fn receive_ack(&mut self, max: usize, wait: Duration) -> BoxFut<'_, Received> {
        Box::pin(async move {
            let first = match tokio::time::timeout(wait, self.consumer.next()).await {
                Err(_) | Ok(None) => return Ok(Received::default()),
                Ok(Some(d)) => d?,
            };
            let mut batch = vec![first];
            while batch.len() < max {
                match self.consumer.next().now_or_never() {
                    Some(Some(d)) => batch.push(d?),
                    _ => break,
                }
            }
            let at_ns = now_ns();
            // One cumulative ack for the batch (multiple = true), as carebus acks a
            // batch of delivery ids in one request.
            if let Some(last) = batch.last() {
                last.acker.ack(BasicAckOptions { multiple: true }).await?;
            }
            Ok(Received {
                at_ns,
                bodies: batch.into_iter().map(|d| Bytes::from(d.data)).collect(),
            })
        })
    }
}
