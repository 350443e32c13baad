//! Starting, SIGKILLing and restarting the real `carebus` binary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::TortureError;

/// A running `carebus serve`, listening on free ports of 127.0.0.1.
#[derive(Debug)]
pub(crate) struct Server {
    child: Option<Child>,
    pub(crate) http: SocketAddr,
    pub(crate) mllp: SocketAddr,
}

impl Server {
    /// Starts the server on `data_dir` and waits (at most `timeout`) until both listeners
    /// are bound. Readiness of the store is the caller's to wait for.
    pub(crate) fn start(
        bin: &Path,
        data_dir: &Path,
        timeout: Duration,
    ) -> Result<Server, TortureError> {
        let mut child = Command::new(bin)
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
            .env("CAREBUS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| TortureError::Setup(format!("cannot start {}: {e}", bin.display())))?;
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            return Err(TortureError::Setup("no stderr pipe".into()));
        };
        let (tx, rx) = mpsc::channel::<(String, SocketAddr)>();
        // Reads the JSON log lines; keeps draining after the addresses are known so the
        // server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let fields = &v["fields"];
                let (Some(message), Some(addr)) =
                    (fields["message"].as_str(), fields["addr"].as_str())
                else {
                    continue;
                };
                if let Ok(addr) = addr.parse::<SocketAddr>() {
                    let _ = tx.send((message.to_owned(), addr));
                }
            }
        });
        let deadline = Instant::now() + timeout;
        let (mut http, mut mllp) = (None, None);
        while http.is_none() || mllp.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((message, addr)) if message == "http listening" => http = Some(addr),
                Ok((message, addr)) if message == "mllp listening" => mllp = Some(addr),
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    return Err(TortureError::Setup(format!(
                        "carebus did not bind its listeners within {timeout:?} (exit status {status:?})"
                    )));
                }
            }
        }
        match (http, mllp) {
            (Some(http), Some(mllp)) => Ok(Server {
                child: Some(child),
                http,
                mllp,
            }),
            _ => Err(TortureError::Setup("listener addresses missing".into())),
        }
    }

    /// SIGKILL, then reap the process.
    pub(crate) fn kill(mut self) -> Result<(), TortureError> {
        self.kill_inner()
    }

    fn kill_inner(&mut self) -> Result<(), TortureError> {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .map_err(|e| TortureError::Setup(format!("cannot kill carebus: {e}")))?;
            child
                .wait()
                .map_err(|e| TortureError::Setup(format!("cannot reap carebus: {e}")))?;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.kill_inner();
    }
}
