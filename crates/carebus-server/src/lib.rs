//! The carebus server: opens the broker and serves the HTTP API (`carebus-http`).
//!
//! Start-up order: bind the HTTP listener (so `/healthz` answers at once), open the
//! broker (recover every partition log and deduplication index) on a blocking thread,
//! then report ready on `/readyz`. A shutdown signal stops accepting connections, lets
//! in-flight requests finish, checkpoints the deduplication indexes and closes the
//! broker (which syncs every log) before [`run`] returns.
//!
//! The HTTP listener is guarded ([`HttpLimits`], see `listener.rs`): a bound on open
//! connections (the excess waits in the kernel's accept queue) and a deadline for every
//! request head (slowloris, idle keep-alive connections).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use carebus_core::{Broker, BrokerConfig, BrokerError};
use carebus_http::{BrokerSlot, HttpConfig};
use carebus_log::LogConfig;
use tokio::sync::oneshot;

pub use carebus_http::DEFAULT_MAX_BODY_BYTES;
pub use listener::{DEFAULT_HTTP_HEADER_TIMEOUT, DEFAULT_HTTP_MAX_CONNECTIONS, HttpLimits};

/// How often the server starts the topics' due index maintenance (cheap when nothing is
/// due); publishes start it too.
const MAINTENANCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

mod listener;

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the embedded store lives.
    pub data_dir: PathBuf,
    /// Where the HTTP API listens (port 0 picks a free port).
    pub http_addr: SocketAddr,
    /// Storage tunables.
    pub log: LogConfig,
    /// Largest HTTP request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Where HL7 v2 over MLLP is accepted (`None`: no MLLP listener; port 0 picks a
    /// free port, logged as `mllp listening`).
    pub mllp_addr: Option<SocketAddr>,
    /// Subscriptions delivered to MLLP destinations.
    pub mllp_egress: Vec<EgressBinding>,
    /// More MLLP listeners, served like `mllp_addr`.
    pub mllp_extra_addrs: Vec<SocketAddr>,
    /// Routing, rejects topic, negative-ACK codes and limits of MLLP ingress.
    pub mllp_ingress: carebus_mllp::IngressConfig,
    /// An MLLP-over-TLS listener, if any.
    pub mllp_tls: Option<MllpTls>,
}

/// An MLLP-over-TLS listener: its address and the TLS settings (certificate, key,
/// required client CA).
#[derive(Clone)]
pub struct MllpTls {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The TLS side (see `carebus_mllp::tls::acceptor`).
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for MllpTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MllpTls")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A subscription bound to an MLLP destination.
#[derive(Debug, Clone)]
pub struct EgressBinding {
    /// The topic.
    pub topic: String,
    /// The subscription (created if missing, with a lease of 3 × the ACK timeout).
    pub subscription: String,
    /// Destination and behaviour.
    pub config: carebus_mllp::egress::EgressConfig,
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
    /// The broker could not be opened, or failed to checkpoint at shutdown.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
    /// A background task died.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// Runs until `shutdown` resolves. `bound` receives the actual HTTP address once listening.
/// The HTTP listener has the default [`HttpLimits`].
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    bound: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), ServerError> {
    run_with_limits(config, HttpLimits::default(), shutdown, bound).await
}

/// [`run`] with these limits on the HTTP listener (open connections, time allowed for
/// a request head).
pub async fn run_with_limits(
    config: ServerConfig,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    bound: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), ServerError> {
    let listener = listener::bind(config.http_addr).map_err(|source| ServerError::Bind {
        addr: config.http_addr,
        source,
    })?;
    let addr = listener.local_addr().map_err(ServerError::Http)?;
    tracing::info!(
        %addr,
        max_body_bytes = config.max_body_bytes,
        max_connections = limits.max_connections,
        header_timeout_ms = u64::try_from(limits.header_timeout.as_millis()).unwrap_or(u64::MAX),
        "http listening"
    );
    if let Some(tx) = bound {
        let _ = tx.send(addr);
    }
    let slot = BrokerSlot::new();
    let app = carebus_http::router(
        slot.clone(),
        HttpConfig {
            max_body_bytes: config.max_body_bytes,
            // The pause allowed in a request body is the time allowed for its head.
            body_idle_timeout: limits.header_timeout,
        },
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let listener = listener::GuardedListener::new(listener, limits);
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });
    let mut shutdown = tokio::spawn(shutdown);

    let data_dir = config.data_dir.clone();
    let broker_config = BrokerConfig {
        log: config.log.clone(),
        ..BrokerConfig::default()
    };
    let opened = tokio::task::spawn_blocking(move || Broker::open(&data_dir, broker_config));
    let result = tokio::select! {
        opened = opened => Some(opened),
        _ = &mut shutdown => None,
    };
    let outcome = match result {
        Some(Ok(Ok((broker, report)))) => {
            let topics = broker.topics();
            tracing::info!(
                data_dir = %config.data_dir.display(),
                topics = topics.len(),
                partitions = report.partitions,
                records = report.records,
                truncated_bytes = report.truncated_bytes,
                rebuilt_indexes = report.rebuilt_indexes,
                warnings = report.warnings.len(),
                "broker opened"
            );
            for w in &report.warnings {
                tracing::warn!(warning = %w, "store recovery");
            }
            // Transactions committed before a crash but not fully applied.
            match broker.finish_recovery().await {
                Ok(n) => {
                    tracing::info!(transactions = n, "transaction recovery done");
                    let broker = Arc::new(broker);
                    // MLLP starts once the broker can store: an ACK is only ever sent
                    // for a stored message.
                    let stats = Arc::new(carebus_mllp::IngressStats::default());
                    let mut mllp = Vec::new();
                    for addr in config.mllp_addr.iter().chain(&config.mllp_extra_addrs) {
                        let listener = match tokio::net::TcpListener::bind(addr).await {
                            Ok(l) => l,
                            Err(source) => {
                                return Err(ServerError::Bind {
                                    addr: *addr,
                                    source,
                                });
                            }
                        };
                        let bound = listener.local_addr().map_err(ServerError::Http)?;
                        tracing::info!(addr = %bound, "mllp listening");
                        mllp.push(tokio::spawn(carebus_mllp::serve(
                            listener,
                            Arc::clone(&broker),
                            config.mllp_ingress.clone(),
                            Arc::clone(&stats),
                        )));
                    }
                    if let Some(tls) = &config.mllp_tls {
                        let listener = match tokio::net::TcpListener::bind(tls.addr).await {
                            Ok(l) => l,
                            Err(source) => {
                                return Err(ServerError::Bind {
                                    addr: tls.addr,
                                    source,
                                });
                            }
                        };
                        let bound = listener.local_addr().map_err(ServerError::Http)?;
                        tracing::info!(addr = %bound, "mllp tls listening");
                        mllp.push(tokio::spawn(carebus_mllp::serve_tls(
                            listener,
                            tls.acceptor.clone(),
                            Arc::clone(&broker),
                            config.mllp_ingress.clone(),
                            Arc::clone(&stats),
                        )));
                    }
                    let (egress_stop, egress_rx) = tokio::sync::watch::channel(false);
                    let mut egress = Vec::new();
                    for b in &config.mllp_egress {
                        if let Err(e) = prepare_egress(&broker, b).await {
                            return Err(ServerError::Broker(e));
                        }
                        tracing::info!(topic = %b.topic, subscription = %b.subscription, destination = %b.config.destination, "mllp egress started");
                        egress.push(tokio::spawn(carebus_mllp::egress::run_egress(
                            Arc::clone(&broker),
                            b.topic.clone(),
                            b.subscription.clone(),
                            b.config.clone(),
                            egress_rx.clone(),
                        )));
                    }
                    // Index maintenance that publishes would start, for idle topics too
                    // (expired keys are forgotten without waiting for the next publish).
                    let maintenance = {
                        let broker = Arc::downgrade(&broker);
                        tokio::spawn(async move {
                            let mut every = tokio::time::interval(MAINTENANCE_INTERVAL);
                            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            loop {
                                every.tick().await;
                                let Some(broker) = broker.upgrade() else {
                                    break;
                                };
                                broker.run_due_maintenance();
                            }
                        })
                    };
                    slot.set(broker);
                    tracing::info!("ready");
                    let _ = (&mut shutdown).await;
                    maintenance.abort();
                    let _ = maintenance.await;
                    for task in mllp {
                        task.abort();
                    }
                    // Egress workers give back what they hold (nack) and stop.
                    let _ = egress_stop.send(true);
                    for task in egress {
                        let _ =
                            tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
                    }
                    Ok(())
                }
                Err(e) => Err(ServerError::Broker(e)),
            }
        }
        Some(Ok(Err(e))) => Err(ServerError::Broker(e)),
        Some(Err(e)) => Err(ServerError::Task(e.to_string())),
        None => Ok(()),
    };
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    // Long-polls waiting for deliveries answer now (with what they have).
    slot.close();
    let _ = stop_tx.send(true);
    let served = match http.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServerError::Http(e)),
        Err(e) => Err(ServerError::Task(e.to_string())),
    };
    // The router (and its clone of the slot) is gone once the server has finished.
    let broker = slot.get().cloned();
    drop(slot);
    if let Some(broker) = broker {
        let closed = tokio::task::spawn_blocking(move || {
            let r = broker.checkpoint();
            // Dropping the broker syncs and closes every log (blocking work: done here).
            drop(broker);
            r
        })
        .await;
        match closed {
            Ok(Ok(())) => tracing::info!("deduplication indexes checkpointed, logs closed"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "checkpoint at shutdown failed");
                return Err(ServerError::Broker(e));
            }
            Err(e) => return Err(ServerError::Task(e.to_string())),
        }
    }
    served?;
    outcome
}

/// Makes sure an egress binding's topic and subscription exist.
async fn prepare_egress(
    broker: &Arc<carebus_core::Broker>,
    b: &EgressBinding,
) -> Result<(), carebus_core::BrokerError> {
    let (broker, b) = (Arc::clone(broker), b.clone());
    let task = tokio::task::spawn_blocking(move || {
        if broker.topic(&b.topic).is_err() {
            broker.put_topic(&b.topic, carebus_core::TopicConfig::default())?;
        }
        if broker.subscription(&b.topic, &b.subscription).is_err() {
            let lease = u64::try_from(b.config.ack_timeout.as_millis().saturating_mul(3))
                .unwrap_or(u64::MAX)
                .max(30_000);
            let sub = carebus_core::SubscriptionConfig {
                ack_deadline_ms: lease,
                ..carebus_core::SubscriptionConfig::default()
            };
            broker.put_subscription(&b.topic, &b.subscription, sub)?;
        }
        Ok(())
    });
    task.await
        .unwrap_or(Err(carebus_core::BrokerError::Internal))
}
