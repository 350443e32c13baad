//! Starting and stopping the real `carebus` binary for process-level tests.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::zombie_processes
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `carebus serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub logs: mpsc::Receiver<serde_json::Value>,
}

pub fn carebus() -> Command {
    Command::new(env!("CARGO_BIN_EXE_carebus"))
}

/// `carebus serve` with JSON logs on free ports (HTTP and MLLP), `data_dir`, `extra`
/// arguments and `env`.
pub fn serve_command(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = carebus();
    command
        .envs(env.iter().copied())
        .args([
            "--log-format",
            "json",
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--mllp-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra);
    command
}

impl Server {
    /// Starts the server on a free port with JSON logs and waits until it listens.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(data_dir, extra, &[])
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = serve_command(data_dir, extra, env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start carebus");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "carebus did not start listening within 30 s"
            );
            let v = rx
                .recv_timeout(left)
                .expect("carebus exited before listening");
            if v["fields"]["message"] == "http listening" {
                let addr = v["fields"]["addr"].as_str().unwrap().parse().unwrap();
                return Server {
                    child,
                    addr,
                    logs: rx,
                };
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Polls `path` until it answers `status`, for at most `timeout`.
    pub fn wait_status(&self, path: &str, status: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (code, _) = curl(&["-s", &self.url(path)]);
            if code == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not answer {status} within {timeout:?} (last {code})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a log line with this message appears, returning it.
    pub fn wait_log(&self, message: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .logs
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line {message:?} within {timeout:?}"));
            if v["fields"]["message"] == message {
                return v;
            }
        }
    }

    /// Sends SIGTERM, waits (bounded) for the exit, and returns the status with every
    /// log line not consumed yet.
    pub fn terminate_with_logs(mut self) -> (ExitStatus, Vec<serde_json::Value>) {
        let logs = std::mem::replace(&mut self.logs, mpsc::channel().1);
        let status = self.terminate();
        // The reader thread ends when the process's stderr closes.
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(v) = logs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            lines.push(v);
        }
        (status, lines)
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "carebus did not exit within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs curl (an independent HTTP client) and returns the HTTP status and body.
pub fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed (the test command installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Runs `carebus serve` (HTTP on a free port, no MLLP, error-level logs) on `data_dir`
/// expecting it to stop on its own: waits at most 20 s, then kills it and panics.
pub fn serve_until_exit(data_dir: &Path) -> (Output, Duration) {
    let t0 = Instant::now();
    let mut child = carebus()
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--no-mllp",
            "--data-dir",
        ])
        .arg(data_dir)
        .env("CAREBUS_LOG", "error")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "carebus serve on {} still running after 20 s",
                data_dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    (child.wait_with_output().unwrap(), took)
}

/// Starts `carebus serve` with JSON logs, returns its "starting carebus" log line (the
/// effective configuration) and kills it.
pub fn starting_log_line(
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> serde_json::Value {
    let mut child = serve_command(data_dir, extra, env)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = lines
        .take(50)
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .find(|v| v["fields"]["message"] == "starting carebus");
    child.kill().unwrap();
    child.wait().unwrap();
    started.expect("no 'starting carebus' log line")
}
