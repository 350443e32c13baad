//! The one small trait every system is driven through, and the message every workload
//! sends: a 1 KiB HL7 v2 ORU^R01 whose MSH-10 (the idempotency key) varies.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// A boxed, sendable future of an `anyhow` result (keeps the traits object-safe).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// A system under test, reached through its own client library.
pub trait Driver: Send + Sync {
    /// Creates `topic` with these subscriptions, each receiving every message (fan-out).
    /// With no subscription the topic still stores what is published.
    fn setup<'a>(&'a self, topic: &'a str, subs: &'a [String]) -> BoxFut<'a, ()>;
    /// Publishes one message with its idempotency key (= MSH-10) and returns once the
    /// system has acknowledged it; `true` when the system said it was a duplicate.
    fn publish<'a>(&'a self, topic: &'a str, key: &'a str, body: Bytes) -> BoxFut<'a, bool>;
    /// A consumer on `sub` of `topic`; consumers on the same subscription compete.
    fn consumer<'a>(
        &'a self,
        topic: &'a str,
        sub: &'a str,
        name: &'a str,
    ) -> BoxFut<'a, Box<dyn Consumer>>;
    /// Deletes `topic` with everything stored in it (its subscriptions, queues or
    /// consumers too) once a workload's figures are taken. The next workload then starts
    /// with the memory this one's data held in the page cache given back: on a virtual
    /// machine whose free memory is returned to the host, writing into memory not used
    /// lately is several times slower (BENCHMARKS.md, session 9), so without this a
    /// workload's figure would depend on how much the workloads before it wrote.
    fn teardown<'a>(&'a self, topic: &'a str) -> BoxFut<'a, ()>;
}

/// Messages received in one call, and when they had arrived (before they were acked).
#[derive(Debug, Default)]
pub struct Received {
    /// [`now_ns`] right after the messages were received, before the acknowledgement.
    pub at_ns: u64,
    pub bodies: Vec<Bytes>,
}

/// One consumer of a subscription.
pub trait Consumer: Send {
    /// Up to `max` messages, waiting at most `wait` for the first; every returned message
    /// has been acknowledged explicitly before this returns: the ack handed to the client
    /// library, which sends it without waiting for the next receive (NATS and RabbitMQ
    /// acks are fire-and-forget frames; carebus pipelines its ack requests, each answered
    /// after the server's fsync, and [`finish`](Consumer::finish) checks them all).
    fn receive_ack(&mut self, max: usize, wait: Duration) -> BoxFut<'_, Received>;

    /// Waits for acknowledgements the client still has in flight and fails if any was
    /// refused (for clients that pipeline them); called once the consumer is done.
    fn finish(&mut self) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the first call in this process (the clock stamped into bodies).
pub fn now_ns() -> u64 {
    let e = EPOCH.get_or_init(Instant::now);
    u64::try_from(e.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Size of every message body.
pub const BODY_BYTES: usize = 1024;

const STAMP: &[u8] = b"NTE|1|L|t=";

/// A 1 KiB ORU^R01 with MSH-10 = `control_id` and the send time `t_ns` in an NTE
/// segment (0 for bodies that must be byte-identical when resent). Spliced into a
/// template made once: the harness shares the CPUs with the system under test, and
/// formatting every body anew cost a fifth of its CPU at 256 in flight.
pub fn oru(control_id: &str, t_ns: u64) -> Bytes {
    static MIDDLE: OnceLock<Vec<u8>> = OnceLock::new();
    let middle = MIDDLE.get_or_init(|| {
        let mut m = String::from(
            "^^^NORTHGATE^MR||Doe^Jane||19800101|F\r\
             OBR|1|ORD1|FIL1|24323-8^Comprehensive metabolic panel^LN|||20261124080000\r",
        );
        for i in 1..=8 {
            m.push_str(&format!(
                "OBX|{i}|NM|2345-{i}^Analyte {i}^LN||{}.{}|mmol/L|3.5-5.1|N|||F\r",
                4 + i % 3,
                i
            ));
        }
        m.push_str("NTE|1|L|t=");
        m.into_bytes()
    });
    let mut b = Vec::with_capacity(BODY_BYTES);
    b.extend_from_slice(b"MSH|^~\\&|LABSYS|REGIONLAB|EPIC|NORTHGATE|20261124083015||ORU^R01|");
    b.extend_from_slice(control_id.as_bytes());
    b.extend_from_slice(b"|P|2.5.1\rPID|1||MRN");
    push_digits(&mut b, (control_id.len() * 7919 % 1_000_000) as u64, 6);
    b.extend_from_slice(middle);
    push_digits(&mut b, t_ns, 20);
    b.push(b'|');
    // Pad the note to exactly 1 KiB, ending the segment with a CR.
    b.resize(BODY_BYTES - 1, b'x');
    b.push(b'\r');
    Bytes::from(b)
}

/// Appends `v` in decimal, zero-padded to at least `width` digits.
fn push_digits(b: &mut Vec<u8>, mut v: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut n = 0;
    while v > 0 || n == 0 {
        digits[19 - n] = b'0' + (v % 10) as u8;
        v /= 10;
        n += 1;
    }
    b.extend_from_slice(&digits[20 - n.max(width).min(20)..]);
}

/// MSH-10 of a body made by [`oru`].
pub fn control_id(body: &[u8]) -> Option<&[u8]> {
    let msh = body.split(|&c| c == b'\r').next()?;
    msh.split(|&c| c == b'|').nth(9)
}

/// The send time stamped by [`oru`].
pub fn sent_ns(body: &[u8]) -> Option<u64> {
    let at = body.windows(STAMP.len()).position(|w| w == STAMP)? + STAMP.len();
    let digits = body.get(at..at + 20)?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A stable 64-bit hash of a control id (for counting distinct messages).
pub fn key_hash(key: &[u8]) -> u64 {
    // FNV-1a: good enough for ~100k distinct keys, no dependency.
    key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_one_kib_and_parses_back() {
        let b = oru("W1-003-0000000042", 123_456_789);
        assert_eq!(b.len(), BODY_BYTES);
        assert_eq!(control_id(&b), Some(&b"W1-003-0000000042"[..]));
        assert_eq!(sent_ns(&b), Some(123_456_789));
        assert_eq!(oru("A", 0), oru("A", 0));
        assert_eq!(
            String::from_utf8_lossy(&oru("W1-003-0000000042", 123_456_789)[..420]),
            "MSH|^~\\&|LABSYS|REGIONLAB|EPIC|NORTHGATE|20261124083015||ORU^R01|W1-003-0000000042|P|2.5.1\r\
             PID|1||MRN134623^^^NORTHGATE^MR||Doe^Jane||19800101|F\r\
             OBR|1|ORD1|FIL1|24323-8^Comprehensive metabolic panel^LN|||20261124080000\r\
             OBX|1|NM|2345-1^Analyte 1^LN||5.1|mmol/L|3.5-5.1|N|||F\r\
             OBX|2|NM|2345-2^Analyte 2^LN||6.2|mmol/L|3.5-5.1|N|||F\r\
             OBX|3|NM|2345-3^Analyte 3^LN||4.3|mmol/L|3.5-5.1|N|||F\r\
             OBX|4|NM|2345-4^Analyte 4^LN||5.4|mmol/L|3.5-5.1|N|||F\r\
             OBX|5|NM|2345-5^Analyte 5^LN||6.5|mmol/L|3.5-5.1|N|||F\r\
             OBX|6|NM|2345-6^Analyte 6^LN||4.6|mmol/L|3.5-5.1|N|||F\r\
             OBX|7|NM|2345-7^Analyte 7^LN||5.7|mmol/L|3.5-5.1|N|||F\r\
             OBX|8|NM|2345-8^Analyte 8^LN||6.8|mmol/L|3.5-5.1|N|||F\r\
             NTE|1|L|t=00000000000123456789|xxxx"[..420]
        );
    }
}
