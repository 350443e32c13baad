//! Printing for the client commands: tables for people, JSON for scripts, exit codes.

use std::io::Write;

use base64::Engine as _;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

/// Exit codes scripts can rely on (documented in `--help` and CLI.md).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Usage or any other error.
    pub const ERROR: u8 = 1;
    /// The server could not be reached (connection refused, timeout, reset).
    pub const UNREACHABLE: u8 = 3;
    /// Not found: topic, subscription, message, dead letter, … (HTTP 404).
    pub const NOT_FOUND: u8 = 4;
    /// Conflict or refusal: already exists, idempotency key reused with another body,
    /// stale delivery, partitions cannot shrink (HTTP 409).
    pub const CONFLICT: u8 = 5;
    /// Server-side error (HTTP 5xx), including `not_ready` and `storage_full`.
    pub const SERVER: u8 = 6;
    /// `carebus check` found damaged stored data.
    pub const DAMAGED: u8 = 7;
}

/// An error that ends a command with a chosen exit code.
#[derive(Debug)]
pub struct Exit {
    /// The exit code.
    pub code: u8,
    /// What to tell the user.
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// The exit code for an error of a client command.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<Exit>() {
            return e.code;
        }
        if let Some(e) = cause.downcast_ref::<carebus_client::Error>() {
            return client_exit_code(e);
        }
    }
    exit::ERROR
}

/// The exit code for a client error.
pub fn client_exit_code(e: &carebus_client::Error) -> u8 {
    if e.is_unreachable() {
        return exit::UNREACHABLE;
    }
    match e.status() {
        Some(404) => exit::NOT_FOUND,
        Some(409) => exit::CONFLICT,
        Some(s) if s >= 500 => exit::SERVER,
        _ => exit::ERROR,
    }
}

/// A table in the CLI's style.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    t
}

/// Writes `text` and a newline to stdout.
pub fn line(text: impl std::fmt::Display) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Writes `value` as one JSON document to stdout.
pub fn json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    line(text)?;
    Ok(())
}

/// Milliseconds since the epoch as an RFC 3339 UTC time (`-` when absent).
pub fn time(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "-".to_owned();
    };
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// An optional value for a table cell.
pub fn opt(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A body for people: text as is (HL7's lone CR segment separators shown as line
/// breaks), anything else as base64 with its size.
pub fn body_for_people(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) => text.replace("\r\n", "\n").replace('\r', "\n"),
        Err(_) => format!(
            "<{} bytes, not UTF-8; base64:>\n{}",
            body.len(),
            base64::engine::general_purpose::STANDARD.encode(body)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(time(Some(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(Some(1_793_600_000_123)), "2026-11-02T06:13:20.123Z");
        assert_eq!(time(Some(951_782_400_000)), "2000-02-29T00:00:00.000Z");
        assert_eq!(time(None), "-");
    }

    #[test]
    fn bodies_for_people() {
        assert_eq!(body_for_people(b"MSH|a\rPID|b\r"), "MSH|a\nPID|b\n");
        assert!(body_for_people(&[0xff, 0]).contains("/wA="));
    }

    #[test]
    fn client_errors_map_to_exit_codes() {
        let api = |status| carebus_client::Error::Api {
            status,
            code: "x".into(),
            detail: String::new(),
            refused: Vec::new(),
        };
        assert_eq!(client_exit_code(&api(404)), exit::NOT_FOUND);
        assert_eq!(client_exit_code(&api(409)), exit::CONFLICT);
        assert_eq!(client_exit_code(&api(503)), exit::SERVER);
        assert_eq!(client_exit_code(&api(400)), exit::ERROR);
        let gone = carebus_client::Error::RetriesExhausted {
            attempts: 3,
            last: Box::new(carebus_client::Error::Connect {
                url: "u".into(),
                reason: "refused".into(),
            }),
        };
        assert_eq!(client_exit_code(&gone), exit::UNREACHABLE);
        let wrapped = anyhow::Error::new(api(404)).context("getting topic t");
        assert_eq!(exit_code(&wrapped), exit::NOT_FOUND);
    }
}
