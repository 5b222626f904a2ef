//! A relay process for the fault tests: PostgreSQL to Redis Streams (or core
//! NATS), configured by environment variables, stopped by SIGTERM or killed.
//!
//! FAULT_TABLE (required), OUTBOX_PG_URL, FAULT_TRANSPORT (`redis` or
//! `nats`), FAULT_BROKER_URL, FAULT_LEASE_MS, FAULT_BATCH, FAULT_NAME.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{CancellationToken, Relay, RelayId, Transport};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::StoreConfig;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn number(name: &str, default: u64) -> Result<u64, String> {
    env(name, &default.to_string())
        .parse()
        .map_err(|e| format!("{name}: {e}"))
}

async fn run() -> Result<(), String> {
    let table = std::env::var("FAULT_TABLE").map_err(|_| "FAULT_TABLE is not set".to_string())?;
    let name = env("FAULT_NAME", "fault-relay");
    let lease = Duration::from_millis(number("FAULT_LEASE_MS", 2_000)?);
    let batch = usize::try_from(number("FAULT_BATCH", 200)?).map_err(|e| e.to_string())?;
    let pool = outbox_tests::pg_pool(&name, 4).await;
    let store = PgStore::with_config(
        pool,
        StoreConfig::default()
            .table(&table)
            .map_err(|e| e.to_string())?,
    );
    let transport: Arc<dyn Transport> = match env("FAULT_TRANSPORT", "redis").as_str() {
        "redis" => {
            let config = outbox_redis::RedisConfig::builder(env(
                "FAULT_BROKER_URL",
                "redis://127.0.0.1:6379",
            ))
            .build()
            .map_err(|e| e.to_string())?;
            Arc::new(
                outbox_redis::RedisTransport::connect(config)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        }
        "nats" => {
            let config =
                outbox_nats::NatsConfig::builder(env("FAULT_BROKER_URL", "nats://127.0.0.1:4222"))
                    .core()
                    .build()
                    .map_err(|e| e.to_string())?;
            Arc::new(
                outbox_nats::NatsTransport::connect(config)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        }
        other => return Err(format!("FAULT_TRANSPORT: unknown transport {other:?}")),
    };
    let relay = Relay::builder(Arc::new(store), transport)
        .id(RelayId::new(format!("{name}-{}", std::process::id())))
        .batch_size(batch)
        .lease(lease)
        .poll_interval(Duration::from_millis(50))
        .build()
        .map_err(|e| e.to_string())?;
    let cancel = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let stop = cancel.clone();
    tokio::spawn(async move {
        term.recv().await;
        stop.cancel();
    });
    let report = relay.run(cancel).await;
    println!(
        "fault-relay {name}: published {}, retried {}, lease lost {}",
        report.published, report.retried, report.lease_lost
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("fault-relay: error: {e}");
        std::process::exit(2);
    }
}
