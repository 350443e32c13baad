//! Verifying each system's real sync policy: strace counts the sync calls its server
//! makes while the harness publishes a known number of messages.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::driver::{Driver, now_ns, oru};
use super::procs::signal;

/// The sync system calls counted.
pub const SYNC_CALLS: &[&str] = &[
    "fsync",
    "fdatasync",
    "sync_file_range",
    "syncfs",
    "sync",
    "msync",
];

pub fn available() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Attaches `strace -f -c` (all threads) to `pids`, summary into `out`.
pub fn attach(pids: &[u32], out: &Path) -> anyhow::Result<Child> {
    anyhow::ensure!(!pids.is_empty(), "no process to trace");
    let mut cmd = Command::new("strace");
    cmd.arg("-f")
        .arg("-c")
        .arg("-o")
        .arg(out)
        .arg("-e")
        .arg(format!("trace={}", SYNC_CALLS.join(",")));
    for p in pids {
        cmd.arg("-p").arg(p.to_string());
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Give it time to attach to every thread.
    std::thread::sleep(Duration::from_millis(700));
    Ok(child)
}

/// Detaches (SIGINT) and reads the per-call counts of the summary.
pub fn detach(mut child: Child, out: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    signal(child.id(), "INT");
    let t0 = Instant::now();
    while child.try_wait()?.is_none() {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("strace did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(out)?;
    Ok(parse(&text))
}

/// Parses `strace -c` output: "% time seconds usecs/call calls [errors] syscall".
pub fn parse(text: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(calls)) = (cols.last(), cols.get(3)) else {
            continue;
        };
        if cols.len() >= 5
            && SYNC_CALLS.contains(name)
            && let Ok(n) = calls.parse::<u64>()
        {
            counts.insert((*name).to_owned(), n);
        }
    }
    counts
}

/// Publishes `n` messages with `inflight` publishers; returns how many were sent.
pub async fn publish_n(
    d: Arc<dyn Driver>,
    topic: &str,
    n: u64,
    inflight: usize,
) -> anyhow::Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (d, next) = (Arc::clone(&d), Arc::clone(&next));
        let topic = topic.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let key = format!("{topic}-{i:010}");
                d.publish(&topic, &key, oru(&key, now_ns())).await?;
                sent += 1;
            }
            Ok::<_, anyhow::Error>(sent)
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await??;
    }
    Ok(sent)
}

/// One traced phase.
#[derive(Debug, Clone)]
pub struct Phase {
    pub inflight: usize,
    pub messages: u64,
    pub calls: BTreeMap<String, u64>,
}

impl Phase {
    pub fn syncs(&self) -> u64 {
        self.calls.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strace_summary() {
        let text = "% time     seconds  usecs/call     calls    errors syscall\n\
                    ------ ----------- ----------- --------- --------- ----------------\n\
                    100.00    0.209563         209      1002           fdatasync\n\
                      0.00    0.000000           0         3         1 fsync\n\
                    ------ ----------- ----------- --------- --------- ----------------\n\
                    100.00    0.209563         208      1005         1 total\n";
        let c = parse(text);
        assert_eq!(c.get("fdatasync"), Some(&1002));
        assert_eq!(c.get("fsync"), Some(&3));
        assert_eq!(c.get("total"), None);
    }
}
