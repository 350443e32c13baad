//! The client's errors.

use crate::types::Refused;

/// What went wrong talking to carebus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The base URL or a name in a path cannot be used.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL or name as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// The request cannot be sent as given (e.g. a header value that is not valid HTTP).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No connection could be made to the server.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The server's base URL.
        url: String,
        /// The transport's reason.
        reason: String,
    },
    /// The server did not answer in time (it may or may not have acted on the request).
    #[error("request to {url} timed out")]
    Timeout {
        /// The server's base URL.
        url: String,
    },
    /// The connection failed during the exchange (it may or may not have acted on it).
    #[error("transport error talking to {url}: {reason}")]
    Transport {
        /// The server's base URL.
        url: String,
        /// The transport's reason.
        reason: String,
    },
    /// The server answered with a problem document (or another non-success status).
    #[error("{status} {code}: {detail}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The problem's stable `code` (`http_<status>` when the body was no problem document).
        code: String,
        /// The problem's `detail` (or `title`).
        detail: String,
        /// The `refused` list of a `stale_delivery` problem.
        refused: Vec<Refused>,
    },
    /// The server's answer could not be read.
    #[error("unexpected answer from the server (HTTP {status}): {reason}")]
    Decode {
        /// HTTP status.
        status: u16,
        /// Why it could not be read.
        reason: String,
    },
    /// A retrying publisher gave up.
    #[error("gave up after {attempts} attempt(s): {last}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: Box<Error>,
    },
}

impl Error {
    /// The problem `code` of an API error (also through [`Error::RetriesExhausted`]).
    pub fn code(&self) -> Option<&str> {
        match self.root() {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status of an API or decode error.
    pub fn status(&self) -> Option<u16> {
        match self.root() {
            Error::Api { status, .. } | Error::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The error itself, or the last attempt's error of [`Error::RetriesExhausted`].
    pub fn root(&self) -> &Error {
        match self {
            Error::RetriesExhausted { last, .. } => last.root(),
            other => other,
        }
    }

    /// The server could not be reached (connect error or timeout).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self.root(),
            Error::Connect { .. } | Error::Timeout { .. } | Error::Transport { .. }
        )
    }

    /// 404 of any kind (`unknown_topic`, `unknown_subscription`, `not_found`, …).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Whether sending the same request again may succeed: connection failures,
    /// timeouts and server-side errors (5xx, including 503 `not_ready` and 507
    /// `storage_full`). Client errors (4xx) are not retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } | Error::Transport { .. } => true,
            Error::Api { status, .. } => *status >= 500,
            _ => false,
        }
    }
}
