//! Starting the systems under test as child processes and stopping them by PID:
//! SIGTERM, a grace period, then SIGKILL for the process and everything it started.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// A free TCP port on 127.0.0.1 (bound and released; the system binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Sends `signal` (e.g. "TERM") to `pid` with kill(1) (no unsafe code needed).
pub fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// User + system CPU seconds used so far by process `pid` (all its threads; `None`:
/// this process), from /proc/<pid>/stat (clock ticks of 1/100 s).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// (pid, parent pid, command name) of every process, from /proc.
fn processes() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid …"; comm may contain spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat.get(open + 1..close).unwrap_or_default().to_owned();
        let ppid = stat
            .get(close + 1..)
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            out.push((pid, ppid, comm));
        }
    }
    out
}

/// Every descendant of `root` as (pid, command name), parents before children.
pub fn descendants(root: u32) -> Vec<(u32, String)> {
    let all = processes();
    let mut children: BTreeMap<u32, Vec<(u32, String)>> = BTreeMap::new();
    for (pid, ppid, comm) in all {
        children.entry(ppid).or_default().push((pid, comm));
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(p) = queue.pop() {
        if let Some(kids) = children.get(&p) {
            for (pid, comm) in kids {
                out.push((*pid, comm.clone()));
                queue.push(*pid);
            }
        }
    }
    out
}

/// A started server process.
#[derive(Debug)]
pub struct Server {
    pub name: String,
    child: Option<Child>,
    /// Helpers started for it (e.g. epmd for RabbitMQ), stopped after it.
    helpers: Vec<Child>,
    /// Which process gets the SIGTERM: the child itself unless set (RabbitMQ's start
    /// script runs beam.smp as its child; the VM is what shuts down gracefully).
    pub term_target: Option<String>,
    pub log: PathBuf,
}

impl Server {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Server> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Server {
            name: name.to_owned(),
            child: Some(child),
            helpers: Vec::new(),
            term_target: None,
            log: log.to_path_buf(),
        })
    }

    pub fn add_helper(&mut self, helper: Child) {
        self.helpers.push(helper);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The PIDs that do the server's work (for strace): the `term_target` descendant
    /// when set, else the child.
    pub fn work_pids(&self) -> Vec<u32> {
        self.pid()
            .map_or_else(Vec::new, |pid| self.work_pids_of(pid))
    }

    /// Fails if the process has exited already (with its log's tail).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            anyhow::bail!("{} exited ({status}); log tail:\n{tail}", self.name);
        }
        Ok(())
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL for it and all its descendants;
    /// then the helpers the same way. Never leaves a process behind.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            let targets = match &self.term_target {
                Some(_) => self.work_pids_of(pid),
                None => vec![pid],
            };
            let targets = if targets.is_empty() {
                vec![pid]
            } else {
                targets
            };
            for t in &targets {
                signal(*t, "TERM");
            }
            stop_child(&mut child, grace);
        }
        for mut h in self.helpers.drain(..) {
            signal(h.id(), "TERM");
            stop_child(&mut h, Duration::from_secs(2));
        }
    }

    fn work_pids_of(&self, pid: u32) -> Vec<u32> {
        match &self.term_target {
            Some(comm) => descendants(pid)
                .into_iter()
                .filter(|(_, c)| c == comm)
                .map(|(p, _)| p)
                .collect(),
            None => vec![pid],
        }
    }
}

/// Waits up to `grace` for an already signalled child, then kills it and whatever it
/// left running, and reaps it.
fn stop_child(child: &mut Child, grace: Duration) {
    let pid = child.id();
    let t0 = Instant::now();
    // Remember the tree now: once the child is gone its orphans are re-parented.
    let mut tree = descendants(pid);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if t0.elapsed() < grace => {
                let now = descendants(pid);
                if !now.is_empty() {
                    tree = now;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    for (p, _) in tree {
        // Only those still alive (kill -0 would race just as much; KILL is harmless
        // for a PID that is gone, and PIDs are not reused within this short window).
        if Path::new(&format!("/proc/{p}")).exists() {
            signal(p, "KILL");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Polls `probe` every 100 ms until it succeeds or `limit` passes; checks that the
/// server is still running between attempts.
pub async fn wait_ready<F, Fut>(
    server: &mut Server,
    limit: Duration,
    mut probe: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let t0 = Instant::now();
    loop {
        let err = match probe().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        server.check_alive()?;
        if t0.elapsed() > limit {
            return Err(err.context(format!(
                "{} not ready after {:?} (log: {})",
                server.name,
                limit,
                server.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
