//! MLLP ingest throughput: connections each send one HL7 ORU^R01 (~1 KiB, its MSH-10
//! varies) at a time and wait for its ACK, which carebus sends only after the message is
//! fsynced. Broker and listener run in this process on 127.0.0.1.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use carebus_core::{Broker, BrokerConfig};
use carebus_mllp::{IngressConfig, IngressStats, frame, serve};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug)]
pub struct MllpRun {
    pub connections: usize,
    pub messages: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

fn oru(conn: usize, seq: u64) -> Vec<u8> {
    let obx: String = (1..=8)
        .map(|i| {
            format!(
                "OBX|{i}|NM|2345-{i}^Analyte {i}^LN||{}.{}|mmol/L|3.5-5.1|N|||F\r",
                4 + i % 3,
                seq % 10
            )
        })
        .collect();
    format!(
        "MSH|^~\\&|LABSYS|REGIONLAB|EPIC|NORTHGATE|20261124083015||ORU^R01|BENCH-{conn:03}-{seq:010}|P|2.5.1\r\
         PID|1||MRN{:06}^^^NORTHGATE^MR||Doe^Jane||19800101|F\r\
         OBR|1|ORD{seq}|FIL{seq}|24323-8^Comprehensive metabolic panel^LN|||20261124080000\r{obx}",
        seq % 5000
    )
    .into_bytes()
}

pub fn run(
    dir: &Path,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<MllpRun> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let broker = Arc::new(Broker::open(dir, BrokerConfig::default())?.0);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(serve(
            listener,
            Arc::clone(&broker),
            IngressConfig::default(),
            Arc::new(IngressStats::default()),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let measuring = Arc::new(AtomicBool::new(false));
        let counted = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..connections {
            let (stop, measuring, counted) = (
                Arc::clone(&stop),
                Arc::clone(&measuring),
                Arc::clone(&counted),
            );
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3)?;
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let mut buf = vec![0u8; 8192];
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let t = Instant::now();
                    s.write_all(&frame(&oru(c, seq))).await?;
                    let mut got = Vec::new();
                    loop {
                        let n = s.read(&mut buf).await?;
                        anyhow::ensure!(n > 0, "connection closed");
                        got.extend_from_slice(buf.get(..n).unwrap_or_default());
                        if got.ends_with(&[0x1c, 0x0d]) {
                            break;
                        }
                    }
                    anyhow::ensure!(got.windows(7).any(|w| w == b"MSA|AA|"), "not accepted");
                    if measuring.load(Ordering::Relaxed) {
                        hist.record(
                            u64::try_from(t.elapsed().as_micros())
                                .unwrap_or(u64::MAX)
                                .max(1),
                        )?;
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok::<_, anyhow::Error>(hist)
            }));
        }
        tokio::time::sleep(warmup).await;
        measuring.store(true, Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::sleep(duration).await;
        measuring.store(false, Ordering::Relaxed);
        let elapsed = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        let mut hist = Histogram::<u64>::new(3)?;
        for t in tasks {
            hist.add(t.await??)?;
        }
        server.abort();
        Ok(MllpRun {
            connections,
            messages: counted.load(Ordering::Relaxed),
            elapsed,
            latency_us: hist,
        })
    })
}

pub fn report(runs: &[MllpRun]) -> String {
    let ms =
        |h: &Histogram<u64>, q: f64| format!("{:.3} ms", h.value_at_quantile(q) as f64 / 1000.0);
    let mut s = String::from(
        "| MLLP ingest, ACK after fsync | msgs/s | p50 | p99 |\n|---|---:|---:|---:|\n",
    );
    for r in runs {
        s.push_str(&format!(
            "| {} connection(s) | {:.0} | {} | {} |\n",
            r.connections,
            r.messages as f64 / r.elapsed.as_secs_f64(),
            ms(&r.latency_us, 0.5),
            ms(&r.latency_us, 0.99)
        ));
    }
    s
}
