//! Shared set-up for the PostgreSQL tests: a pool on the local server and a
//! fresh schema per store.
#![allow(dead_code, clippy::unwrap_used)]

use async_trait::async_trait;
use outbox_core::testing::{StoreHarness, StoreOptions};
use outbox_core::Message;
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

pub const PG_ADDR: &str = "127.0.0.1:5432";

pub fn pg_url() -> String {
    std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A pool, or `None` (test skipped with a printed reason) when PostgreSQL is
/// not reachable and not required.
pub async fn pool(max: u32) -> Option<PgPool> {
    if !outbox_core::testing::require_service("postgres", PG_ADDR) {
        return None;
    }
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .connect(&pg_url())
        .await
        .expect("connect to PostgreSQL");
    static SWEPT: std::sync::Once = std::sync::Once::new();
    if outbox_core::testing::first_time(&SWEPT) {
        sweep(&pool).await;
    }
    Some(pool)
}

/// The prefixes of the schemas these tests make.
const PREFIXES: [&str; 2] = ["t", "m"];

/// A fresh schema name (see `outbox_core::testing::scratch_name`).
pub fn unique(prefix: &str) -> String {
    debug_assert!(PREFIXES.contains(&prefix), "add {prefix} to PREFIXES");
    outbox_core::testing::scratch_name(prefix)
}

/// Drops the schemas earlier runs of these tests left behind (once per
/// test binary; a run still going keeps its own).
async fn sweep(pool: &PgPool) {
    let names: Vec<String> = sqlx::query_scalar("SELECT nspname::text FROM pg_namespace")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    for name in outbox_core::testing::stale_names(&PREFIXES, names) {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
            .execute(pool)
            .await;
    }
}

/// A migrated store in a fresh schema, and its enqueue side.
pub async fn fresh(pool: &PgPool, config: StoreConfig) -> (PgStore, Outbox) {
    fresh_named(pool, config, "outbox").await
}

/// [`fresh`] with the table named `name` (in a fresh schema).
pub async fn fresh_named(pool: &PgPool, config: StoreConfig, name: &str) -> (PgStore, Outbox) {
    let table = format!("{}.{name}", unique("t"));
    let config = config.table(&table).unwrap();
    let store = PgStore::with_config(pool.clone(), config);
    store.migrate().await.unwrap();
    (store, Outbox::new().table(&table).unwrap())
}

pub struct PgHarness {
    pub pool: PgPool,
}

#[async_trait]
impl StoreHarness for PgHarness {
    type Store = PgStore;

    async fn store(&self, options: StoreOptions) -> PgStore {
        let config = StoreConfig::default()
            .keep_delivered(options.keep_delivered)
            .hold_dead_letters(options.hold_dead_letters);
        fresh(&self.pool, config).await.0
    }

    async fn enqueue(&self, store: &PgStore, messages: Vec<Message>) -> outbox_core::Result<()> {
        let outbox = Outbox::new().table(&store.config().table.to_string())?;
        let mut tx = self.pool.begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &messages).await?;
        tx.commit().await.unwrap();
        Ok(())
    }
}

/// Polls `sql` (one count) until it reaches `at_least`; fails with `what`
/// after 10 s.
pub async fn until_count(pool: &PgPool, sql: &str, at_least: i64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap()
        < at_least
    {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
