//! Guards `carebus serve` as a process: it listens, reports health and readiness,
//! refuses a second instance on the same data directory, and exits 0 on SIGTERM.

mod common;

use std::time::Duration;

use common::{Server, carebus, curl};

#[test]
fn serve_answers_health_and_readiness_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let (code, body) = curl(&["-s", &server.url("/healthz")]);
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, body) = curl(&["-s", &server.url("/readyz")]);
    assert_eq!((code, body.trim()), (200, "ready"));
    let (code, _) = curl(&["-s", &server.url("/no-such-path")]);
    assert_eq!(code, 404);
    assert!(dir.path().join("carebus.lock").exists());
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

#[test]
fn a_second_instance_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &[]);
    first.wait_status("/readyz", 200, Duration::from_secs(30));
    let out = carebus()
        .args(["serve", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("CAREBUS_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another carebus process"),
        "stderr: {stderr}"
    );
    // The first one is unaffected.
    let (code, _) = curl(&["-s", &first.url("/readyz")]);
    assert_eq!(code, 200);
    assert_eq!(first.terminate().code(), Some(0));
}

#[test]
fn bad_flags_give_a_clear_error_and_a_non_zero_exit() {
    let out = carebus()
        .args(["serve", "--fsync", "sometimes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fsync must be"));
    let out = carebus()
        .args(["serve", "--http-addr", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
