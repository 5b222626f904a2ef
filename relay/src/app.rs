//! Starting, running and stopping the relay process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use outbox_core::{
    CancellationToken, Relay, RelayId, Retention, Router, Transport, WatchedTransport,
};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::database::Db;
use crate::http::{serve, HttpState};

/// Why the process could not start (exit code 2) or failed while running
/// (exit code 1). `Display` is the one line printed on stderr.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database cannot be reached or used.
    #[error("database {url}: {reason}")]
    Database {
        /// The database URL, password hidden.
        url: String,
        /// What failed.
        reason: String,
    },
    /// A transport cannot connect.
    #[error("route {pattern:?}: {url}: {reason}")]
    Transport {
        /// The first route using the transport.
        pattern: String,
        /// The transport URL, credentials hidden.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The metrics and health address cannot be bound.
    #[error("listen {addr}: {reason}")]
    Listen {
        /// The address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// Setting up the process (signals, metrics recorder, relay) failed.
    #[error("{0}")]
    Setup(String),
    /// The relay failed while running.
    #[error("relay failed: {0}")]
    Failed(String),
}

impl StartError {
    /// The process exit code: 1 for a failure while running, 2 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Failed(_) => 1,
            _ => 2,
        }
    }
}

/// Connects everything, then relays until SIGINT or SIGTERM and stops
/// gracefully (in-flight publishes finish, leases are handed back). With
/// `check`, returns after connecting without relaying.
pub async fn run(config: Config, check: bool) -> Result<(), StartError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| StartError::Setup(format!("{what}: {e}"));
    // Signals first: a SIGTERM during the start then stops the relay at once
    // once it is up, instead of killing the process half-way.
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| setup("cannot handle SIGTERM", &e))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| setup("cannot handle SIGINT", &e))?;

    let listener = match config.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| StartError::Listen {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?,
        ),
        None => None,
    };

    let db_error = |reason: String| StartError::Database {
        url: config.database.redacted(),
        reason,
    };
    info!(database = %config.database.redacted(), table = %config.table, "connecting to the database");
    let db = Db::connect(&config).await.map_err(db_error)?;
    if config.migrate {
        db.migrate()
            .await
            .map_err(|e| db_error(format!("migration failed: {e}")))?;
    }

    // One transport per distinct URL, shared by the routes naming it, each
    // watched for `/health`.
    let mut transports: HashMap<&str, Arc<dyn Transport>> = HashMap::new();
    let mut watches = Vec::new();
    let mut router = Router::builder();
    for route in &config.routes {
        let url = route.target.url();
        let transport = match transports.get(url) {
            Some(t) => t.clone(),
            None => {
                info!(route = %route.pattern, transport = %route.target.redacted(), "connecting");
                let t = route
                    .target
                    .connect(config.connect_timeout)
                    .await
                    .map_err(|e| StartError::Transport {
                        pattern: route.pattern.clone(),
                        url: route.target.redacted(),
                        reason: format!("cannot connect: {e}"),
                    })?;
                let (t, health) = WatchedTransport::new(t, route.target.redacted());
                let t: Arc<dyn Transport> = Arc::new(t);
                watches.push(health);
                transports.insert(url, t.clone());
                t
            }
        };
        router = router.route(route.pattern.clone(), transport);
    }
    let router = router.build().map_err(|e| setup("router", &e))?;

    let mut relay = Relay::builder(db.store(), Arc::new(router))
        .batch_size(config.batch_size)
        .lease(config.lease)
        .poll_interval(config.poll_interval)
        .min_poll_interval(config.min_poll_interval)
        .max_attempts(config.max_attempts)
        .retry(config.retry_policy())
        .max_in_flight(config.max_in_flight)
        .shutdown_timeout(config.shutdown_timeout);
    if let Some(id) = &config.relay_id {
        relay = relay.id(RelayId::new(id.clone()));
    }
    let relay = relay.build().map_err(|e| setup("relay", &e))?;

    if check {
        info!(
            database = %config.database.redacted(),
            routes = %config.routes_summary(),
            "configuration checked: the database and every transport are reachable"
        );
        drop(relay);
        db.close().await;
        return Ok(());
    }

    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| setup("metrics recorder", &e))?;
    outbox_core::metrics::describe();

    let cancel = CancellationToken::new();
    let state = Arc::new(HttpState {
        metrics: metrics.clone(),
        db: db.clone(),
        running: AtomicBool::new(true),
        secrets: config.secrets(),
        transports: watches,
        unhealthy_after: config.unhealthy_after,
    });
    // The HTTP server outlives the relay's stop, so that /health answers
    // 503 "stopping" and /metrics can be read meanwhile.
    let http_stop = CancellationToken::new();
    let http = listener.map(|l| tokio::spawn(serve(l, state.clone(), http_stop.clone())));
    let upkeep = {
        let cancel = cancel.child_token();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = every.tick() => metrics.run_upkeep(),
                }
            }
        })
    };

    // Kept delivered rows older than the window go, once a minute (a
    // window under a minute: as often as the window, at least 1 s apart).
    let retention = match (config.keep_delivered, config.retention) {
        (true, Some(window)) => {
            let (store, cancel) = (db.purge(), cancel.child_token());
            let every = window.clamp(Duration::from_secs(1), Duration::from_secs(60));
            Some(tokio::spawn(async move {
                Retention::new(window).every(every).run(store, cancel).await
            }))
        }
        _ => None,
    };

    info!(
        relay = %relay.id(),
        database = %config.database.redacted(),
        table = %config.table,
        routes = %config.routes_summary(),
        listen = %config.listen.map_or_else(|| "off".to_string(), |a| a.to_string()),
        batch_size = relay.batch_size(),
        "relay started"
    );
    let relay = Arc::new(relay);
    let mut running = {
        let relay = relay.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move { relay.run(cancel).await })
    };

    let early_end = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM: stopping"); None }
        _ = sigint.recv() => { info!("SIGINT: stopping"); None }
        r = &mut running => Some(r),
    };

    state.running.store(false, Ordering::SeqCst);
    cancel.cancel();
    let outcome = match early_end {
        // `run` only returns after cancellation; ending by itself is a bug.
        Some(Ok(report)) => Err(StartError::Failed(format!(
            "the relay stopped by itself ({report:?})"
        ))),
        Some(Err(e)) => Err(StartError::Failed(format!("the relay task failed: {e}"))),
        None => {
            let grace = config.shutdown_timeout + config.lease.min(Duration::from_secs(30));
            match tokio::time::timeout(grace, &mut running).await {
                Ok(Ok(report)) => {
                    info!(
                        published = report.published,
                        retried = report.retried,
                        dead_lettered = report.dead_lettered,
                        released = report.released,
                        batches = report.batches,
                        "relay stopped"
                    );
                    Ok(())
                }
                Ok(Err(e)) => {
                    error!(error = %e, "the relay task failed while stopping");
                    Err(StartError::Failed(format!("the relay task failed: {e}")))
                }
                Err(_) => {
                    warn!(
                        ?grace,
                        "the relay did not stop in time; its leases will expire"
                    );
                    running.abort();
                    Ok(())
                }
            }
        }
    };
    http_stop.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    let _ = upkeep.await;
    if let Some(r) = retention {
        let _ = r.await;
    }
    // The store's last users go first, so that its LISTEN task ends before
    // the pool closes under it.
    drop(relay);
    drop(state);
    db.close().await;
    outcome
}
