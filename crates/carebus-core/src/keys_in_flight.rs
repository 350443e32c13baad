//! Publishes in progress, by idempotency-key fingerprint.
//!
//! A publish claims the fingerprints of its keys before it looks them up, and the claim
//! is released only once the keys are in the dedup index (the log's after-append step
//! drops it) or the append failed. So two publishes of one key never both miss the
//! lookup and both store it: the second waits, then finds the first copy. Only publishes
//! of the same fingerprint wait for each other (unlike lock stripes, where unrelated keys
//! sharing a stripe wait a whole group commit).

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// Fingerprints are already uniform 64-bit hashes: hash them as themselves.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type FingerprintSet = HashSet<u64, BuildHasherDefault<IdentityHasher>>;

/// The fingerprints being published on one topic.
#[derive(Debug, Default)]
pub(crate) struct KeysInFlight {
    claimed: Mutex<FingerprintSet>,
    /// Publishes waiting for a claim to be released (changed under `claimed`'s lock).
    waiting: AtomicUsize,
    released: Notify,
}

/// Claimed fingerprints; dropping it releases them and wakes publishes waiting for them.
#[derive(Debug)]
pub(crate) struct Claim {
    owner: Arc<KeysInFlight>,
    fingerprints: Claimed,
}

#[derive(Debug)]
enum Claimed {
    One(u64),
    Many(Vec<u64>),
}

impl Claimed {
    fn as_slice(&self) -> &[u64] {
        match self {
            Claimed::One(fp) => std::slice::from_ref(fp),
            Claimed::Many(fps) => fps,
        }
    }
}

impl KeysInFlight {
    fn lock(&self) -> MutexGuard<'_, FingerprintSet> {
        // The set holds plain integers and nothing panics while it is locked: a poisoned
        // lock still guards a consistent set.
        self.claimed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims `fingerprints` (repeats allowed), waiting while a publish holds any of
    /// them. `None` when there are none to claim.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        fingerprints: impl Iterator<Item = u64>,
    ) -> Option<Claim> {
        let mut fingerprints = fingerprints;
        let first = fingerprints.next()?;
        let fingerprints = match fingerprints.next() {
            None => Claimed::One(first),
            Some(second) => {
                let mut fps = vec![first, second];
                fps.extend(fingerprints);
                fps.sort_unstable();
                fps.dedup();
                Claimed::Many(fps)
            }
        };
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Registered before the check, so a release between the check and the
            // await still wakes this publish.
            notified.as_mut().enable();
            {
                let mut claimed = self.lock();
                let wanted = fingerprints.as_slice();
                if wanted.iter().all(|fp| !claimed.contains(fp)) {
                    claimed.extend(wanted.iter().copied());
                    return Some(Claim {
                        owner: Arc::clone(self),
                        fingerprints,
                    });
                }
                self.waiting.fetch_add(1, Ordering::SeqCst);
            }
            // Counted out again even if this publish is cancelled while it waits.
            let _counted = Waiting(&self.waiting);
            notified.await;
        }
    }

    /// Fingerprints claimed now (for tests and diagnostics).
    #[cfg(test)]
    fn claimed(&self) -> usize {
        self.lock().len()
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        {
            let mut claimed = self.owner.lock();
            for fp in self.fingerprints.as_slice() {
                claimed.remove(fp);
            }
        }
        // A waiter counts itself under the lock taken above, so it is seen here.
        if self.owner.waiting.load(Ordering::SeqCst) > 0 {
            self.owner.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn only_the_same_fingerprint_waits_and_a_release_wakes_it() {
        let keys = Arc::new(KeysInFlight::default());
        let a = keys.claim([1u64].into_iter()).await.unwrap();
        let b = keys.claim([2u64, 3, 3].into_iter()).await.unwrap();
        assert_eq!(keys.claimed(), 3);
        assert!(keys.claim(std::iter::empty()).await.is_none());
        let waiter = {
            let keys = Arc::clone(&keys);
            tokio::spawn(async move { keys.claim([3u64, 4].into_iter()).await.map(drop) })
        };
        // The waiter cannot get 3 while `b` holds it.
        let early = tokio::time::timeout(Duration::from_millis(100), async {
            while keys.waiting.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(early.is_ok(), "the second claim of 3 waits");
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        drop(a);
        assert_eq!(keys.claimed(), 0);
        assert_eq!(keys.waiting.load(Ordering::SeqCst), 0);
    }
}
