//! Guards `carebus serve` as a process: it listens, reports health and readiness,
//! refuses a second instance on the same data directory, and exits 0 on SIGTERM.

mod common;

use std::time::Duration;

use common::{Server, carebus, curl, serve_until_exit, starting_log_line};

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

/// Publishes a 200-byte body to a fresh topic and returns (status, reply).
fn publish_200_bytes(server: &Server) -> (u16, String) {
    let (code, _) = curl(&["-s", "-X", "PUT", &server.url("/v1/topics/cfg")]);
    assert!(code == 201 || code == 200, "topic create: {code}");
    curl(&[
        "-s",
        "-X",
        "POST",
        "--data-binary",
        &"x".repeat(200),
        &server.url("/v1/topics/cfg/messages"),
    ])
}

#[test]
fn a_config_file_fills_what_flags_and_environment_leave_at_their_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("carebus.toml");
    std::fs::write(&file, "max_body_bytes = 100\nfsync = \"50ms\"\n").unwrap();
    let cfg = file.to_str().unwrap();

    // File only: the 100-byte limit and the interval policy apply.
    let server = Server::start(&dir.path().join("a"), &["--config", cfg]);
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    assert_eq!(publish_200_bytes(&server).0, 413);
    let (code, body) = curl(&[
        "-s",
        "-X",
        "POST",
        "--data-binary",
        "small",
        &server.url("/v1/topics/cfg/messages"),
    ]);
    assert_eq!(code, 201);
    assert!(body.contains("\"buffered\""), "{body}");
    assert_eq!(server.terminate().code(), Some(0));

    // The environment beats the file.
    let server = Server::start_with_env(
        &dir.path().join("b"),
        &["--config", cfg],
        &[("CAREBUS_MAX_BODY_BYTES", "1000")],
    );
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    assert_eq!(publish_200_bytes(&server).0, 201);
    assert_eq!(server.terminate().code(), Some(0));

    // A flag beats the environment and the file.
    let server = Server::start_with_env(
        &dir.path().join("c"),
        &["--config", cfg, "--max-body-bytes", "150"],
        &[("CAREBUS_MAX_BODY_BYTES", "1000")],
    );
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    assert_eq!(publish_200_bytes(&server).0, 413);
    assert_eq!(server.terminate().code(), Some(0));

    // The effective configuration is logged at start.
    let started = starting_log_line(&dir.path().join("d"), &["--config", cfg], &[]);
    assert_eq!(started["fields"]["max_body_bytes"], 100);
    assert_eq!(started["fields"]["fsync"], "50ms");
    assert_eq!(started["fields"]["config_file"], cfg);

    // An unknown key or a missing file is a clear error and a non-zero exit.
    std::fs::write(&file, "max_body_bytez = 1\n").unwrap();
    let out = carebus().args(["serve", "--config", cfg]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid config file"));
    let out = carebus()
        .args(["serve", "--config", "/nonexistent/carebus.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the config file"));
}

#[test]
fn worker_threads_come_from_flag_environment_or_file_and_default_to_one_fewer_than_the_cpus() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("carebus.toml");
    std::fs::write(&file, "worker_threads = 3\n").unwrap();
    let cfg = file.to_str().unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    let workers = |extra: &[&str], env: &[(&str, &str)]| {
        starting_log_line(&dir.path().join("d"), extra, env)["fields"]["worker_threads"].clone()
    };
    assert_eq!(workers(&[], &[]), cpus.saturating_sub(1).max(1));
    assert_eq!(workers(&["--config", cfg], &[]), 3);
    assert_eq!(
        workers(&["--config", cfg], &[("CAREBUS_WORKER_THREADS", "5")]),
        5
    );
    assert_eq!(
        workers(
            &["--config", cfg, "--worker-threads", "2"],
            &[("CAREBUS_WORKER_THREADS", "5")]
        ),
        2
    );

    // One worker serves HTTP and MLLP as usual.
    let server = Server::start(&dir.path().join("e"), &["--worker-threads", "1"]);
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let (code, body) = publish_200_bytes(&server);
    assert_eq!(code, 201, "{body}");
    assert_eq!(server.terminate().code(), Some(0));

    // Zero is refused, on the command line and in the file.
    let out = carebus()
        .args(["serve", "--worker-threads", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(&file, "worker_threads = 0\n").unwrap();
    let out = carebus().args(["serve", "--config", cfg]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("worker_threads"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_data_dir_that_cannot_be_used_is_a_clear_error_and_a_non_zero_exit() {
    // /proc does not allow creating directories, even for root.
    let (out, _) = serve_until_exit(std::path::Path::new("/proc/carebus-data"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/proc/carebus-data"), "{stderr}");
    // A regular file where the directory should be.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let (out, _) = serve_until_exit(&file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-a-dir"));
}
