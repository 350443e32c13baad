//! Errors on the wire: RFC 9457 problem documents with a stable `code`.
//!
//! Details name topics, partitions, offsets, sizes and header names, never message
//! bodies or header values. Server-side failures are logged in full and answered with
//! a generic detail (no file paths leave the process).

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use carebus_core::{BrokerError, StoreError};
use carebus_log::LogError;
use serde::Serialize;

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error answered as `application/problem+json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (also the last part of `type`).
    pub code: &'static str,
    /// Human-readable explanation of this occurrence (never message contents).
    pub detail: String,
    /// Extension members added to the problem document (e.g. `refused`).
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
    #[serde(flatten)]
    extensions: &'a serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    /// An error with this status, code and detail.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
            extensions: serde_json::Map::new(),
        }
    }

    /// Adds an extension member to the problem document.
    pub fn with(mut self, name: &str, value: serde_json::Value) -> Self {
        self.extensions.insert(name.to_owned(), value);
        self
    }

    /// 400 with this code.
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// 404 `not_found`.
    pub fn not_found(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// 413 `body_too_large`.
    pub fn body_too_large(limit: usize) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 408 `body_timeout`: the request body stalled for longer than allowed.
    pub fn body_timeout(idle: std::time::Duration) -> Self {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "no part of the request body arrived for {} ms; send the body without pauses",
                idle.as_millis()
            ),
        )
    }

    /// 503 `not_ready`: the broker is still recovering its store.
    pub fn not_ready() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the broker is recovering its store; retry when /readyz answers 200",
        )
    }

    /// 500 `internal` for a failure of the server itself (details go to the log only).
    pub fn internal(what: &str) -> Self {
        tracing::error!(error = what, "internal error answering a request");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let problem = Problem {
            kind: format!("urn:carebus:problem:{}", self.code),
            title,
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
            extensions: &self.extensions,
        };
        let mut response = (self.status, Json(problem)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

fn storage_full_io(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        ApiError::from(&e)
    }
}

impl From<&BrokerError> for ApiError {
    fn from(e: &BrokerError) -> Self {
        let full = match e {
            BrokerError::Log(l) => l.is_storage_full(),
            BrokerError::Store(StoreError::Log { source, .. }) => source.is_storage_full(),
            BrokerError::Store(StoreError::DataDir { source, .. }) => storage_full_io(source),
            _ => false,
        };
        if full {
            tracing::error!(error = %e, "storage full");
            return ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage_full",
                "the broker's disk is full; nothing was stored; retry later",
            );
        }
        let code = e.code();
        let status = match code {
            "unknown_topic"
            | "unknown_partition"
            | "offset_out_of_range"
            | "unknown_subscription"
            | "unknown_dead_letter"
            | "unknown_transaction" => StatusCode::NOT_FOUND,
            "invalid_topic" | "invalid_subscription" | "empty_batch" | "batch_spans_partitions" => {
                StatusCode::BAD_REQUEST
            }
            "partitions_cannot_shrink" | "transaction_aborted" | "offset_beyond_end" => {
                StatusCode::CONFLICT
            }
            "transaction_expired" => StatusCode::GONE,
            "too_many_transactions" => StatusCode::TOO_MANY_REQUESTS,
            "message_too_large" | "transaction_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
            "storage_full" => StatusCode::INSUFFICIENT_STORAGE,
            _ => {
                // Storage, index and internal failures: full error in the log only.
                tracing::error!(error = %e, code, "broker error");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    code,
                    "the broker failed to complete the request; see the server log",
                );
            }
        };
        // These messages carry names, numbers and sizes only.
        let detail = match e {
            BrokerError::Log(LogError::OffsetOutOfRange { .. }) => {
                "no message at that offset (not yet written, or removed by retention)".to_owned()
            }
            BrokerError::TransactionAborted { id, reason } => {
                // The reason may quote a storage error (with file paths): log only.
                tracing::warn!(transaction = id, reason = %reason, "transaction aborted");
                format!(
                    "transaction {id} could not commit and was aborted: nothing of it took effect, and the deliveries it acknowledged will be delivered again"
                )
            }
            other => other.to_string(),
        };
        ApiError::new(status, code, detail)
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::bad_request("invalid_path", e.body_text())
    }
}
