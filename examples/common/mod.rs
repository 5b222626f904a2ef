//! What the PostgreSQL examples share: connecting, the three orders (one
//! rolled back), collecting arrivals, names. Each example includes it with
//! `mod common;`.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use outbox_core::{Message, MessageId};
use outbox_sqlx::Outbox;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::mpsc;

/// The error type of the examples' `main`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Three orders, each with its `orders.placed` event in the same
/// transaction; order 2 rolls back. Returns the committed event ids and the
/// rolled-back one.
pub async fn place_orders(
    pool: &PgPool,
    outbox: &Outbox,
    schema: &str,
) -> Result<(Vec<MessageId>, MessageId), BoxError> {
    let mut committed = Vec::new();
    let mut rolled_back = MessageId::new();
    for (id, customer, total, commit) in [
        (1, "customer-7", 120, true),
        (2, "customer-9", 80, false),
        (3, "customer-7", 45, true),
    ] {
        let mut tx = pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO {schema}.orders (id, customer, total) VALUES ($1, $2, $3)"
        ))
        .bind(id)
        .bind(customer)
        .bind(total)
        .execute(&mut *tx)
        .await?;
        let event = Message::json(
            "orders.placed",
            &serde_json::json!({"order": id, "total": total}),
        )
        .key(customer)
        .build()?;
        outbox.enqueue(&mut *tx, &event).await?;
        if commit {
            tx.commit().await?;
            outbox.committed();
            committed.push(event.id);
            println!("   order {id} committed   -> orders.placed (key {customer})");
        } else {
            tx.rollback().await?;
            rolled_back = event.id;
            println!("   order {id} rolled back -> its event rolled back with it");
        }
    }
    Ok((committed, rolled_back))
}

/// Collects arrivals until `count` came or `timeout` passed, then waits a
/// moment more so that anything unexpected would show up too.
pub async fn receive<T>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    count: usize,
    timeout: Duration,
) -> Vec<T> {
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(a)) => got.push(a),
            _ => break,
        }
    }
    while let Ok(Some(a)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        got.push(a);
    }
    got
}

/// Connects to PostgreSQL, saying where (without credentials) and what to do
/// when it is not there.
pub async fn pg_connect(url: &str) -> Result<PgPool, BoxError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| format!("DATABASE_URL is not a PostgreSQL URL: {e}"))?;
    let place = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    );
    println!("   PostgreSQL at {place}");
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(|e| {
            format!("cannot connect to PostgreSQL at {place}: {e} (start it with scripts/services.sh, or set DATABASE_URL)")
        })?;
    Ok(pool)
}

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Eight random hex digits, so that parallel runs never share names.
pub fn unique() -> String {
    let id = MessageId::new().to_string();
    id[id.len() - 8..].to_string()
}
