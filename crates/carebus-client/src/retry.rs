//! Retry policy and the retrying publisher.
//!
//! A publish is retried only with its idempotency key fixed before the first attempt,
//! so an attempt that reached the disk but whose answer was lost is answered as a
//! duplicate on the retry: the message is stored once.

use std::time::{Duration, Instant};

use crate::types::{Message, Outcome};
use crate::{Client, Error};

/// Exponential backoff with jitter, bounded in attempts and total time.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Most attempts, the first included (at least 1).
    pub max_attempts: u32,
    /// Delay after the first failure.
    pub initial_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
    /// Growth of the delay per failure (≥ 1).
    pub multiplier: f64,
    /// Random spread of each delay, 0..=1 (0.2: ±20 %).
    pub jitter: f64,
    /// No attempt starts after this much time since the first one.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.2,
            max_elapsed: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// A policy making exactly one attempt.
    pub fn no_retry() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Delay after failed attempt number `failures` (1-based), given a random number
    /// in 0..1: `initial × multiplier^(failures-1)`, capped at `max_backoff`, spread
    /// by ±`jitter`, never above `max_backoff`.
    pub fn backoff(&self, failures: u32, random01: f64) -> Duration {
        let exp = i32::try_from(failures.saturating_sub(1))
            .unwrap_or(i32::MAX)
            .min(64);
        let max = self.max_backoff.as_secs_f64();
        let base =
            (self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exp)).min(max);
        let spread = base * self.jitter.clamp(0.0, 1.0) * (2.0 * random01.clamp(0.0, 1.0) - 1.0);
        Duration::try_from_secs_f64((base + spread).clamp(0.0, max)).unwrap_or(self.max_backoff)
    }

    /// Runs `attempt` until it succeeds, fails with a non-retryable error, or the
    /// policy's attempts or time run out ([`Error::RetriesExhausted`]). `on_retry` is
    /// told of each failure that will be retried, with the delay before the next try.
    pub async fn run<T, F, Fut>(
        &self,
        mut attempt: F,
        mut on_retry: impl FnMut(u32, &Error, Duration),
    ) -> Result<(T, u32), Error>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let started = Instant::now();
        let max_attempts = self.max_attempts.max(1);
        let mut n = 0;
        loop {
            n += 1;
            let err = match attempt(n).await {
                Ok(v) => return Ok((v, n)),
                Err(e) => e,
            };
            if !err.is_retryable() {
                return Err(err);
            }
            let delay = self.backoff(n, fastrand::f64());
            let out_of_time = started.elapsed() + delay > self.max_elapsed;
            if n >= max_attempts || out_of_time {
                return Err(Error::RetriesExhausted {
                    attempts: n,
                    last: Box::new(err),
                });
            }
            on_retry(n, &err, delay);
            tokio::time::sleep(delay).await;
        }
    }
}

/// A random idempotency key (`cbc-` and 32 hex digits from the OS's random source).
pub fn generate_idempotency_key() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to time, process and a per-process counter, which
        // is still unique for this process's keys.
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mixed = nanos
            ^ (u128::from(std::process::id()) << 96)
            ^ (u128::from(COUNTER.fetch_add(1, Ordering::Relaxed)) << 64);
        bytes = mixed.to_le_bytes();
    }
    let mut key = String::with_capacity(36);
    key.push_str("cbc-");
    for b in bytes {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

/// The result of a retried publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The server's answer to the successful attempt. After more than one attempt,
    /// `duplicate: true` may mean an earlier attempt of this very call stored it.
    pub outcome: Outcome,
    /// The idempotency key used (the caller's, or the generated one).
    pub idempotency_key: String,
    /// Attempts made.
    pub attempts: u32,
}

/// Publishes with retries; see [`RetryPolicy`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Publisher {
    client: Client,
    policy: RetryPolicy,
}

impl Publisher {
    /// A publisher over `client` with `policy`.
    pub fn new(client: Client, policy: RetryPolicy) -> Self {
        Publisher { client, policy }
    }

    /// The retry policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Publishes one message, retrying transient failures with the same idempotency
    /// key (generated before the first attempt when the message has none).
    pub async fn publish(&self, topic: &str, mut message: Message) -> Result<Published, Error> {
        let key = message
            .idempotency_key
            .get_or_insert_with(generate_idempotency_key)
            .clone();
        let message = &message;
        let (outcome, attempts) = self
            .policy
            .run(
                |_| self.client.publish_attempt(topic, message, false),
                |n, err, delay| {
                    tracing::warn!(
                        topic,
                        attempt = n,
                        error = %err,
                        delay_ms = delay.as_millis() as u64,
                        "publish failed; retrying with the same idempotency key"
                    );
                },
            )
            .await?;
        Ok(Published {
            outcome,
            idempotency_key: key,
            attempts,
        })
    }

    /// Publishes an atomic batch (one partition), retrying transient failures; every
    /// message without an idempotency key gets one before the first attempt.
    pub async fn publish_batch(
        &self,
        topic: &str,
        mut messages: Vec<Message>,
    ) -> Result<Vec<Published>, Error> {
        for m in &mut messages {
            m.idempotency_key
                .get_or_insert_with(generate_idempotency_key);
        }
        let batch = &messages;
        let (outcomes, attempts) = self
            .policy
            .run(
                |_| self.client.publish_batch(topic, batch),
                |n, err, delay| {
                    tracing::warn!(
                        topic,
                        attempt = n,
                        messages = batch.len(),
                        error = %err,
                        delay_ms = delay.as_millis() as u64,
                        "batch publish failed; retrying with the same idempotency keys"
                    );
                },
            )
            .await?;
        Ok(outcomes
            .into_iter()
            .zip(messages)
            .map(|(outcome, m)| Published {
                outcome,
                idempotency_key: m.idempotency_key.unwrap_or_default(),
                attempts,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            multiplier: 2.0,
            jitter: 0.5,
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(1, 0.5), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 0.5), Duration::from_millis(200));
        assert_eq!(p.backoff(3, 0.5), Duration::from_millis(400));
        assert_eq!(p.backoff(5, 0.5), Duration::from_millis(1000));
        assert_eq!(p.backoff(1000, 0.5), Duration::from_millis(1000));
        assert_eq!(p.backoff(1, 0.0), Duration::from_millis(50));
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(150));
        // Jitter never pushes above the cap.
        assert_eq!(p.backoff(10, 1.0), Duration::from_millis(1000));
        for i in 0..100 {
            let d = p.backoff(2, f64::from(i) / 100.0);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(300));
        }
    }

    #[test]
    fn generated_keys_are_distinct() {
        let a = generate_idempotency_key();
        let b = generate_idempotency_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert!(a.starts_with("cbc-"));
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            max_elapsed: Duration::from_secs(5),
            ..RetryPolicy::default()
        }
    }

    fn api(status: u16) -> Error {
        Error::Api {
            status,
            code: "x".into(),
            detail: String::new(),
            refused: Vec::new(),
        }
    }

    #[tokio::test]
    async fn retries_5xx_and_connect_errors_but_not_4xx() {
        let mut calls = 0;
        let r = fast()
            .run(
                |n| {
                    calls += 1;
                    async move {
                        match n {
                            1 => Err(api(503)),
                            2 => Err(Error::Connect {
                                url: "u".into(),
                                reason: "refused".into(),
                            }),
                            3 => Err(api(507)),
                            _ => Ok(n),
                        }
                    }
                },
                |_, _, _| {},
            )
            .await
            .unwrap();
        assert_eq!(r, (4, 4));
        assert_eq!(calls, 4);

        let mut calls = 0;
        let e = fast()
            .run(
                |_| {
                    calls += 1;
                    async { Err::<(), _>(api(409)) }
                },
                |_, _, _| {},
            )
            .await
            .unwrap_err();
        assert_eq!(calls, 1);
        assert_eq!(e.status(), Some(409));
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts_and_max_elapsed() {
        let mut calls = 0;
        let e = fast()
            .run(
                |_| {
                    calls += 1;
                    async { Err::<(), _>(api(500)) }
                },
                |_, _, _| {},
            )
            .await
            .unwrap_err();
        assert_eq!(calls, 4);
        assert!(matches!(e, Error::RetriesExhausted { attempts: 4, .. }));
        assert_eq!(e.status(), Some(500));

        let p = RetryPolicy {
            max_attempts: 1000,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(20),
            jitter: 0.0,
            max_elapsed: Duration::from_millis(100),
            ..RetryPolicy::default()
        };
        let started = Instant::now();
        let mut calls = 0;
        let e = p
            .run(
                |_| {
                    calls += 1;
                    async { Err::<(), _>(Error::Timeout { url: "u".into() }) }
                },
                |_, _, _| {},
            )
            .await
            .unwrap_err();
        assert!(e.is_unreachable());
        assert!(calls <= 6, "{calls} attempts within 100 ms of 20 ms delays");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
