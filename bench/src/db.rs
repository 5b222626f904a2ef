//! PostgreSQL set-up: pools, one fresh schema per phase (dropped after it),
//! outbox tables, business tables and backlog pre-fill.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outbox_core::Message;
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::BoxResult;

/// Rows per enqueue transaction while pre-filling.
const PREFILL_TX: usize = 10_000;

/// The database side of the benchmark.
pub struct Db {
    url: String,
    /// An admin pool (DDL, checks, pre-fill).
    pub admin: PgPool,
    /// The run's unique prefix, `bench_<random>`.
    pub prefix: String,
    schemas: Mutex<Vec<String>>,
}

/// A migrated outbox table in its own schema.
#[derive(Clone, Debug)]
pub struct Table {
    /// The schema (dropped at the end of the phase).
    pub schema: String,
    /// The qualified outbox table name.
    pub name: String,
}

impl Db {
    /// Connects and checks the server answers.
    pub async fn connect(url: &str, prefix: String) -> BoxResult<Db> {
        let db = Db {
            url: url.to_string(),
            admin: PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(
                    url.parse::<PgConnectOptions>()?
                        .application_name("outbox-bench"),
                )
                .await?,
            prefix,
            schemas: Mutex::new(Vec::new()),
        };
        sqlx::query("SELECT 1").execute(&db.admin).await?;
        Ok(db)
    }

    /// A new pool whose connections are named `name` (its own connections,
    /// as a separate process would have).
    pub async fn pool(&self, name: &str, max: u32) -> BoxResult<PgPool> {
        let opts: PgConnectOptions = self.url.parse()?;
        Ok(PgPoolOptions::new()
            .max_connections(max)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts.application_name(name))
            .await?)
    }

    /// Creates schema `<prefix>_<label>` (remembered for cleanup).
    pub async fn schema(&self, label: &str) -> BoxResult<String> {
        let schema = format!("{}_{label}", self.prefix);
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&self.admin)
            .await?;
        self.schemas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(schema.clone());
        Ok(schema)
    }

    /// A fresh schema with a migrated outbox table `outbox` and a business
    /// table `orders` beside it.
    pub async fn outbox(&self, label: &str) -> BoxResult<Table> {
        let schema = self.schema(label).await?;
        let name = format!("{schema}.outbox");
        let store = PgStore::with_config(
            self.admin.clone(),
            StoreConfig::default().table(&name)?.listen(false),
        );
        store.migrate().await?;
        sqlx::query(&format!(
            "CREATE TABLE {schema}.orders (id BIGSERIAL PRIMARY KEY, customer TEXT NOT NULL, \
             total INT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        ))
        .execute(&self.admin)
        .await?;
        Ok(Table { schema, name })
    }

    /// Drops a schema made by [`schema`](Self::schema).
    pub async fn drop(&self, schema: &str) {
        if let Err(e) = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&self.admin)
            .await
        {
            eprintln!("outbox-bench: could not drop schema {schema}: {e}");
            return;
        }
        self.schemas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| s != schema);
    }

    /// Drops every schema still left.
    pub async fn drop_all(&self) {
        let left: Vec<String> = self
            .schemas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for s in left {
            self.drop(&s).await;
        }
    }

    /// Rows of `table` not yet delivered or dead.
    pub async fn pending(&self, table: &str) -> BoxResult<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE delivered_at IS NULL AND dead_at IS NULL"
        ))
        .fetch_one(&self.admin)
        .await?)
    }

    /// The mean round trip of `SELECT 1` on one connection, in microseconds.
    pub async fn round_trip_us(&self) -> BoxResult<f64> {
        let mut conn = self.admin.acquire().await?;
        for _ in 0..20 {
            sqlx::query("SELECT 1").execute(&mut *conn).await?;
        }
        let n = 500;
        let started = Instant::now();
        for _ in 0..n {
            sqlx::query("SELECT 1").execute(&mut *conn).await?;
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(n))
    }
}

/// Builds message `i` of a backlog.
pub fn message(topic: &str, payload: &Bytes, keys: usize, i: usize) -> BoxResult<Message> {
    let b = Message::builder(topic, payload.clone());
    let b = if keys == 0 {
        b
    } else {
        b.key(format!("key-{}", i % keys))
    };
    Ok(b.build()?)
}

/// A payload of `n` bytes (printable, so any broker takes it).
pub fn payload(n: usize) -> Bytes {
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    Bytes::from(
        (0..n)
            .map(|i| alphabet[(i * 7 + 3) % alphabet.len()])
            .collect::<Vec<u8>>(),
    )
}

/// Enqueues `n` messages on `topic` into `table` (through
/// `Outbox::enqueue_batch`, 10,000 per transaction) and analyses the
/// table, as autovacuum would on a table that grew this much. Returns
/// how long the enqueue took.
pub async fn prefill(
    db: &Db,
    table: &Table,
    topic: &str,
    n: usize,
    payload: &Bytes,
    keys: usize,
) -> BoxResult<Duration> {
    let outbox = Outbox::new().table(&table.name)?;
    let took = enqueue_backlog(&db.admin, &outbox, topic, n, payload, keys).await?;
    sqlx::query(&format!("ANALYZE {}", table.name))
        .execute(&db.admin)
        .await?;
    Ok(took)
}

/// Enqueues backlog messages `0..n` on `topic` into `outbox` on `pool`
/// (`Outbox::enqueue_batch`, 10,000 per transaction); returns how long that
/// took.
pub async fn enqueue_backlog<DB>(
    pool: &sqlx::Pool<DB>,
    outbox: &Outbox,
    topic: &str,
    n: usize,
    payload: &Bytes,
    keys: usize,
) -> BoxResult<Duration>
where
    DB: sqlx::Database,
    DB::Connection: outbox_sqlx::Enqueue,
{
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let m = PREFILL_TX.min(n - i);
        let batch = (i..i + m)
            .map(|j| message(topic, payload, keys, j))
            .collect::<BoxResult<Vec<_>>>()?;
        let mut tx = pool.begin().await?;
        outbox.enqueue_batch(&mut *tx, &batch).await?;
        tx.commit().await?;
        i += m;
    }
    Ok(started.elapsed())
}
