//! Guards exactly-once HL7 ingress against a faulty network: a proxy between a
//! resending sender and carebus drops ACKs, delays them past the sender's timeout,
//! resets the connection right after the frame arrives, and splits frames into small
//! pieces. The sender resends (same bytes, same MSH-10) on every timeout or reset, as
//! HL7 senders do. Each message must end up stored exactly once, and the sender must
//! finally get an ACK whose MSA-2 is its MSH-10.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use carebus_core::{Broker, BrokerConfig};
use carebus_hl7::parse_ack;
use carebus_mllp::{IngressConfig, IngressStats, frame, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to the n-th connection.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Pass,
    DropAck,
    DelayAck,
    ResetAfterFrame,
    Split,
}

fn plan(n: usize) -> Fault {
    match n % 5 {
        0 => Fault::DropAck,
        1 => Fault::DelayAck,
        2 => Fault::ResetAfterFrame,
        3 => Fault::Split,
        _ => Fault::Pass,
    }
}

async fn proxy(listener: TcpListener, upstream: SocketAddr, connections: Arc<AtomicUsize>) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        let n = connections.fetch_add(1, Ordering::SeqCst);
        let fault = plan(n);
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            // Client → server: the whole frame (split into 3-byte writes for Split).
            let mut buf = vec![0u8; 65536];
            let mut frame_bytes = Vec::new();
            while !frame_bytes.windows(2).any(|w| w == [0x1c, 0x0d]) {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => frame_bytes.extend_from_slice(&buf[..k]),
                }
            }
            if matches!(fault, Fault::Split) {
                for chunk in frame_bytes.chunks(3) {
                    if server.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            } else if server.write_all(&frame_bytes).await.is_err() {
                return;
            }
            if matches!(fault, Fault::ResetAfterFrame) {
                // The frame reached carebus; the sender sees the connection die.
                // A zero linger makes the close a TCP reset. (Deprecated because a
                // non-zero linger blocks on drop; zero does not.)
                #[allow(deprecated)]
                let _ = client.set_linger(Some(Duration::ZERO));
                return;
            }
            // Server → client: the ACK, or not.
            let mut ack = Vec::new();
            while !ack.windows(2).any(|w| w == [0x1c, 0x0d]) {
                match server.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => ack.extend_from_slice(&buf[..k]),
                }
            }
            match fault {
                Fault::DropAck => {}
                Fault::DelayAck => {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    let _ = client.write_all(&ack).await;
                }
                _ => {
                    let _ = client.write_all(&ack).await;
                }
            }
            // Keep the connection until the sender closes it.
            let _ = client.read(&mut buf).await;
        });
    }
}

/// An HL7 sender: one connection per attempt, 150 ms ACK timeout, resends identical
/// bytes until it gets an ACK for its control id (bounded).
async fn send_until_acked(proxy: SocketAddr, message: &[u8], control_id: &str) -> usize {
    for attempt in 1..=40 {
        let Ok(mut s) = TcpStream::connect(proxy).await else {
            continue;
        };
        if s.write_all(&frame(message)).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 8192];
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_millis(150), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(k) => {
                        got.extend_from_slice(&buf[..k]);
                        if got.windows(2).any(|w| w == [0x1c, 0x0d]) {
                            return true;
                        }
                    }
                }
            }
        })
        .await;
        if read == Ok(true) {
            let end = got.windows(2).position(|w| w == [0x1c, 0x0d]).unwrap();
            let ack = parse_ack(&got[1..end]).unwrap();
            // A late ACK on a new connection cannot happen: one connection per attempt.
            assert_eq!(ack.acknowledged_control_id, control_id.as_bytes());
            return attempt;
        }
        // Timeout or reset: close this connection (never reuse it) and resend.
        drop(s);
    }
    panic!("{control_id} never acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_stored_exactly_once_through_a_faulty_network() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Arc::new(Broker::open(dir.path(), BrokerConfig::default()).unwrap().0);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let carebus = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(
        listener,
        Arc::clone(&broker),
        IngressConfig::default(),
        Arc::new(IngressStats::default()),
    ));
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy_listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let proxy_task = tokio::spawn(proxy(proxy_listener, carebus, Arc::clone(&connections)));

    let mut total_attempts = 0;
    for i in 0..20 {
        let id = format!("FP-{i:04}");
        let msg = format!(
            "MSH|^~\\&|LIS|LAB|EMR|NG|20261124||ORU^R01|{id}|P|2.5.1\rPID|1||MRN{:03}^^^NG^MR\rOBX|1|NM|K^Potassium||4.{i}|mmol/L\r",
            i % 4
        );
        total_attempts += send_until_acked(proxy_addr, msg.as_bytes(), &id).await;
    }
    assert!(total_attempts > 20, "the proxy injected no faults");
    // Exactly once: 20 stored, whatever the resends.
    let rt = broker.topic("hl7.oru").unwrap();
    let stored: usize = (0..rt.topic().config.partitions)
        .map(|p| broker.read("hl7.oru", p, 0, 1000).unwrap().len())
        .sum();
    assert_eq!(stored, 20);
    assert!(
        rt.counters.duplicates.load(Ordering::Relaxed) > 0,
        "resends must have been recognised as duplicates"
    );
    server.abort();
    proxy_task.abort();
}
