//! The carebus server: opens the store and serves the HTTP endpoints.
//!
//! Start-up order: bind the HTTP listener (so `/healthz` answers at once), recover the
//! store on a blocking thread, then report ready on `/readyz`. A shutdown signal stops
//! accepting connections, lets in-flight requests finish, and closes the store (which
//! syncs every log) before [`run`] returns.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use carebus_core::{Store, StoreError};
use carebus_log::LogConfig;
use tokio::net::TcpListener;
use tokio::sync::{OnceCell, oneshot};

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the embedded store lives.
    pub data_dir: PathBuf,
    /// Where the HTTP API listens (port 0 picks a free port).
    pub http_addr: SocketAddr,
    /// Storage tunables.
    pub log: LogConfig,
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The HTTP listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
    /// A background task died.
    #[error("internal task failed: {0}")]
    Task(String),
}

#[derive(Debug, Default)]
struct AppState {
    ready: AtomicBool,
    store: OnceCell<Store>,
}

/// Builds the HTTP routes.
fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "recovering\n")
    }
}

/// Runs until `shutdown` resolves. `bound` receives the actual HTTP address once listening.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    bound: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), ServerError> {
    let listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.http_addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServerError::Http)?;
    tracing::info!(%addr, "http listening");
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    let state = Arc::new(AppState::default());
    let app = router(Arc::clone(&state));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let mut shutdown = tokio::spawn(shutdown);

    let data_dir = config.data_dir.clone();
    let log_config = config.log.clone();
    let opened = tokio::task::spawn_blocking(move || Store::open(&data_dir, &log_config));
    let result = tokio::select! {
        opened = opened => Some(opened),
        _ = &mut shutdown => None,
    };
    let outcome = match result {
        Some(Ok(Ok((store, report)))) => {
            tracing::info!(
                data_dir = %config.data_dir.display(),
                partitions = report.partitions,
                records = report.records,
                truncated_bytes = report.truncated_bytes,
                rebuilt_indexes = report.rebuilt_indexes,
                warnings = report.warnings.len(),
                "store opened"
            );
            for w in &report.warnings {
                tracing::warn!(warning = %w, "store recovery");
            }
            let _ = state.store.set(store);
            state.ready.store(true, Ordering::Release);
            tracing::info!("ready");
            let _ = (&mut shutdown).await;
            Ok(())
        }
        Some(Ok(Err(e))) => Err(ServerError::Store(e)),
        Some(Err(e)) => Err(ServerError::Task(e.to_string())),
        None => Ok(()),
    };
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    let _ = stop_tx.send(true);
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ServerError::Http(e)),
        Err(e) => return Err(ServerError::Task(e.to_string())),
    }
    // Dropping the store syncs and closes every log.
    drop(state);
    outcome
}
