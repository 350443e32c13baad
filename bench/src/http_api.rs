//! carebus over HTTP, through the Rust client crate: publish with idempotency keys
//! (one message per request, and batches), and receive + ack. The server runs in this
//! process on 127.0.0.1 (as `carebus serve` does), sharing the 2 vCPUs with the clients.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use carebus_client::{Client, Message, ReceiveOptions, SubscriptionConfig, TopicConfig};
use hdrhistogram::Histogram;

#[derive(Debug)]
pub struct HttpRun {
    pub label: String,
    pub messages: u64,
    pub elapsed: Duration,
    pub latency_us: Option<Histogram<u64>>,
}

fn body(tag: &str, seq: u64) -> Vec<u8> {
    let mut b =
        format!("MSH|^~\\&|LAB|RL|EMR|NG|20261124||ORU^R01|{tag}-{seq:010}|P|2.5.1\r").into_bytes();
    b.resize(1024, b'X');
    b
}

pub fn run(
    dir: &Path,
    publishers: usize,
    seconds: Duration,
    drain: u64,
) -> anyhow::Result<Vec<HttpRun>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let config = carebus_server::ServerConfig {
            data_dir: dir.to_path_buf(),
            http_addr: "127.0.0.1:0".parse()?,
            log: carebus_log::LogConfig::default(),
            max_body_bytes: carebus_server::DEFAULT_MAX_BODY_BYTES,
            mllp_addr: None,
            mllp_egress: Vec::new(),
            mllp_extra_addrs: Vec::new(),
            mllp_ingress: carebus_mllp::IngressConfig::default(),
            mllp_tls: None,
        };
        let server = tokio::spawn(carebus_server::run(
            config,
            async move {
                let _ = stop_rx.await;
            },
            Some(bound_tx),
        ));
        let addr = bound_rx.await?;
        let client = Client::new(&format!("http://{addr}"))?;
        // Wait (bounded) for the broker to be ready.
        let t0 = Instant::now();
        while client
            .put_topic("bench", &TopicConfig::default())
            .await
            .is_err()
        {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(30), "server not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut runs = Vec::new();
        // Alternating unkeyed and keyed single-message runs (twice each), then batches.
        for (run, (label, batch, keyed)) in [
            (
                "publish, 1 message per request, without keys",
                1usize,
                false,
            ),
            (
                "publish, 1 message per request, with idempotency keys",
                1,
                true,
            ),
            ("publish, 1 message per request, without keys", 1, false),
            (
                "publish, 1 message per request, with idempotency keys",
                1,
                true,
            ),
            (
                "publish, batches of 100 per request, with idempotency keys",
                100,
                true,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let stop = Arc::new(AtomicBool::new(false));
            let counted = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let tasks: Vec<_> = (0..publishers)
                .map(|p| {
                    let (client, stop, counted) =
                        (client.clone(), Arc::clone(&stop), Arc::clone(&counted));
                    tokio::spawn(async move {
                        let mut hist = Histogram::<u64>::new(3)?;
                        let mut seq = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let msgs: Vec<Message> = (0..batch)
                                .map(|_| {
                                    seq += 1;
                                    let tag = format!("R{run}-P{p:03}");
                                    let m = Message::new(body(&tag, seq));
                                    if keyed {
                                        m.idempotency_key(format!("{tag}-{seq}"))
                                    } else {
                                        m
                                    }
                                })
                                .collect();
                            let t = Instant::now();
                            if batch == 1 {
                                let o = client.publish("bench", &msgs[0]).await?;
                                anyhow::ensure!(!o.duplicate, "unexpected duplicate");
                            } else {
                                let o = client.publish_batch("bench", &msgs).await?;
                                anyhow::ensure!(
                                    o.iter().all(|o| !o.duplicate),
                                    "unexpected duplicate"
                                );
                            }
                            hist.record(
                                u64::try_from(t.elapsed().as_micros())
                                    .unwrap_or(u64::MAX)
                                    .max(1),
                            )?;
                            counted.fetch_add(batch as u64, Ordering::Relaxed);
                        }
                        Ok::<_, anyhow::Error>(hist)
                    })
                })
                .collect();
            tokio::time::sleep(seconds).await;
            stop.store(true, Ordering::Relaxed);
            let elapsed = start.elapsed();
            let mut hist = Histogram::<u64>::new(3)?;
            for t in tasks {
                hist.add(t.await??)?;
            }
            runs.push(HttpRun {
                label: format!("{label}, {publishers} publishers"),
                messages: counted.load(Ordering::Relaxed),
                elapsed,
                latency_us: Some(hist),
            });
        }
        // Receive + ack: drain `drain` stored messages with 4 consumers.
        client.put_topic("drain", &TopicConfig::default()).await?;
        client
            .put_subscription("drain", "s", &SubscriptionConfig::default())
            .await?;
        let mut left = drain;
        let mut seq = 0u64;
        while left > 0 {
            let n = left.min(200);
            let msgs: Vec<Message> = (0..n)
                .map(|_| {
                    seq += 1;
                    Message::new(body("D", seq))
                })
                .collect();
            client.publish_batch("drain", &msgs).await?;
            left -= n;
        }
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|c| {
                let (client, done) = (client.clone(), Arc::clone(&done));
                tokio::spawn(async move {
                    let opts = ReceiveOptions {
                        max: Some(100),
                        wait_ms: Some(20),
                        consumer: Some(format!("c{c}")),
                    };
                    let deadline = Instant::now() + Duration::from_secs(300);
                    while done.load(Ordering::Relaxed) < drain && Instant::now() < deadline {
                        let ds = client.receive("drain", "s", &opts).await?;
                        if ds.is_empty() {
                            continue;
                        }
                        let ids: Vec<u64> = ds.iter().map(|d| d.delivery_id).collect();
                        let settled = client.ack("drain", "s", &ids).await?;
                        anyhow::ensure!(settled.refused.is_empty(), "acks refused");
                        done.fetch_add(ids.len() as u64, Ordering::Relaxed);
                    }
                    Ok::<_, anyhow::Error>(())
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        runs.push(HttpRun {
            label: "receive (up to 100) + ack, 4 consumers".into(),
            messages: done.load(Ordering::Relaxed),
            elapsed: start.elapsed(),
            latency_us: None,
        });
        let _ = stop_tx.send(());
        let _ = server.await;
        Ok(runs)
    })
}

pub fn report(runs: &[HttpRun]) -> String {
    let mut s = String::from(
        "| over HTTP (1 KiB messages, fsync before ack) | msgs/s | request p50 | request p99 |\n|---|---:|---:|---:|\n",
    );
    for r in runs {
        let (p50, p99) = r
            .latency_us
            .as_ref()
            .map_or((String::new(), String::new()), |h| {
                (
                    format!("{:.3} ms", h.value_at_quantile(0.5) as f64 / 1000.0),
                    format!("{:.3} ms", h.value_at_quantile(0.99) as f64 / 1000.0),
                )
            });
        s.push_str(&format!(
            "| {} | {:.0} | {p50} | {p99} |\n",
            r.label,
            r.messages as f64 / r.elapsed.as_secs_f64()
        ));
    }
    s
}
