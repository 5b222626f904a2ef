//! Support for the cross-crate tests: a PostgreSQL outbox in a fresh schema,
//! producers that commit and roll back at random, consumers on the real
//! brokers, and the verdict every scenario prints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{Message, MessageId};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub mod consumers;
pub mod faults;

/// Where the tests expect PostgreSQL.
pub const PG_ADDR: &str = "127.0.0.1:5432";

/// The PostgreSQL URL (`OUTBOX_PG_URL`, default the local server).
pub fn pg_url() -> String {
    std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A random lowercase suffix for schema, subject, queue and stream names.
pub fn unique() -> String {
    (0..10).map(|_| fastrand::lowercase()).collect()
}

/// A pool whose connections carry `application_name` = `name` (so a fault
/// test can terminate them).
pub async fn pg_pool(name: &str, max: u32) -> PgPool {
    let opts: PgConnectOptions = pg_url().parse().expect("OUTBOX_PG_URL");
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts.application_name(name))
        .await
        .expect("connect to PostgreSQL")
}

/// Drops the schemas earlier runs left behind (a run still going keeps its
/// own).
async fn sweep(pool: &PgPool) {
    let names: Vec<String> = sqlx::query_scalar("SELECT nspname::text FROM pg_namespace")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    for name in outbox_core::testing::stale_names(&["e2e"], names) {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
            .execute(pool)
            .await;
    }
}

/// A migrated outbox in a fresh schema, with a business table beside it.
#[derive(Clone)]
pub struct Db {
    /// An admin pool for producers and checks.
    pub pool: PgPool,
    /// The enqueue side.
    pub outbox: Outbox,
    /// The qualified outbox table name.
    pub table: String,
    /// The schema.
    pub schema: String,
}

impl Db {
    /// Creates the schema, the outbox tables and an `orders` table.
    pub async fn fresh() -> Db {
        let pool = pg_pool("outbox-tests-admin", 20).await;
        static SWEPT: std::sync::Once = std::sync::Once::new();
        if outbox_core::testing::first_time(&SWEPT) {
            sweep(&pool).await;
        }
        let schema = outbox_core::testing::scratch_name("e2e");
        let table = format!("{schema}.outbox");
        let store = PgStore::with_config(
            pool.clone(),
            StoreConfig::default().table(&table).unwrap().listen(false),
        );
        store.migrate().await.unwrap();
        sqlx::query(&format!(
            "CREATE TABLE {schema}.orders (id BIGSERIAL PRIMARY KEY, customer TEXT NOT NULL, total INT NOT NULL)"
        ))
        .execute(&pool)
        .await
        .unwrap();
        Db {
            pool,
            outbox: Outbox::new().table(&table).unwrap(),
            table,
            schema,
        }
    }

    /// A store on its own pool (as a separate relay process would have).
    pub async fn store(&self, name: &str) -> PgStore {
        PgStore::with_config(
            pg_pool(name, 4).await,
            StoreConfig::default().table(&self.table).unwrap(),
        )
    }

    /// Rows not yet delivered.
    pub async fn backlog(&self) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE delivered_at IS NULL AND dead_at IS NULL",
            self.table
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

/// What producers enqueued: committed messages in enqueue order per key,
/// and the ids of rolled-back ones.
#[derive(Default, Clone)]
pub struct Produced {
    /// Committed ids with their key and position in commit order.
    pub committed: Vec<(MessageId, String)>,
    /// Ids enqueued in transactions that rolled back.
    pub rolled_back: HashSet<MessageId>,
}

/// Runs `producers` concurrent producers, each doing `transactions`
/// business transactions (an order row plus one outbox message on `topic`
/// with one of `keys` keys); a share `rollback` of them roll back. A key is
/// owned by one producer, so its enqueue order is that producer's order.
pub async fn produce(
    db: &Db,
    topic: &str,
    producers: usize,
    transactions: usize,
    keys: usize,
    rollback: f64,
    seed: u64,
) -> Produced {
    let out = Arc::new(Mutex::new(Produced::default()));
    let mut tasks = Vec::new();
    for p in 0..producers {
        let pool = db.pool.clone();
        let outbox = db.outbox.clone();
        let schema = db.schema.clone();
        let topic = topic.to_string();
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(p as u64));
            for i in 0..transactions {
                let k = (i % keys.div_ceil(producers).max(1)) * producers + p;
                let key = format!("customer-{k}");
                let total = rng.i32(1..1000);
                let mut tx = pool.begin().await.unwrap();
                sqlx::query(&format!(
                    "INSERT INTO {schema}.orders (customer, total) VALUES ($1, $2)"
                ))
                .bind(&key)
                .bind(total)
                .execute(&mut *tx)
                .await
                .unwrap();
                let m = Message::json(
                    &topic,
                    &serde_json::json!({"customer": key, "total": total, "n": i}),
                )
                .key(key.clone())
                .build()
                .unwrap();
                outbox.enqueue(&mut *tx, &m).await.unwrap();
                if rng.f64() < rollback {
                    tx.rollback().await.unwrap();
                    out.lock().unwrap().rolled_back.insert(m.id);
                } else {
                    // Record before commit, under the lock, so the recorded
                    // order of one key is its commit order.
                    tx.commit().await.unwrap();
                    out.lock().unwrap().committed.push((m.id, key));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(out).ok().unwrap().into_inner().unwrap()
}

/// The outcome of a scenario, as checked at the consumer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Committed messages that never arrived.
    pub lost: usize,
    /// Arrived messages that were rolled back or never enqueued.
    pub phantoms: usize,
    /// First deliveries of a key out of enqueue order.
    pub order_violations: usize,
    /// Deliveries beyond the first of a message.
    pub duplicates: usize,
}

impl Verdict {
    /// Compares what arrived (in arrival order) with what was produced.
    pub fn check(produced: &Produced, arrived: &[MessageId]) -> Verdict {
        let position: HashMap<MessageId, (&str, usize)> = produced
            .committed
            .iter()
            .enumerate()
            .map(|(i, (id, key))| (*id, (key.as_str(), i)))
            .collect();
        let mut v = Verdict::default();
        let mut seen = HashSet::new();
        let mut last: HashMap<&str, usize> = HashMap::new();
        for id in arrived {
            if !seen.insert(*id) {
                v.duplicates += 1;
                continue;
            }
            match position.get(id) {
                None => v.phantoms += 1,
                Some((key, pos)) => {
                    if let Some(prev) = last.insert(key, *pos) {
                        if prev > *pos {
                            v.order_violations += 1;
                        }
                    }
                }
            }
        }
        v.lost = produced
            .committed
            .iter()
            .filter(|(id, _)| !seen.contains(id))
            .count();
        v
    }

    /// Prints the scenario's summary line, and appends it to the file named
    /// by `OUTBOX_SUMMARY_FILE` (the test script prints that file at the end,
    /// since cargo captures the output of passing tests).
    pub fn print(&self, scenario: &str, messages: usize, faults: &str) {
        summary(&format!(
            "SUMMARY {scenario}: messages {messages}, {faults}, lost {}, phantoms {}, order violations {}, duplicates {}",
            self.lost, self.phantoms, self.order_violations, self.duplicates
        ));
    }
}

/// Waits until `arrived()` holds every committed id or `timeout` passes.
pub async fn wait_for_all(
    produced: &Produced,
    timeout: Duration,
    arrived: impl Fn() -> Vec<MessageId>,
) -> Vec<MessageId> {
    let want: HashSet<MessageId> = produced.committed.iter().map(|(id, _)| *id).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = arrived();
        let have: HashSet<&MessageId> = got.iter().collect();
        if want.iter().all(|id| have.contains(id)) || tokio::time::Instant::now() > deadline {
            // A moment more, so that a phantom would have time to show up.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return arrived();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `done` holds, checking every 20 ms; panics naming `what`
/// after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prints a summary line and appends it to `OUTBOX_SUMMARY_FILE` if set.
pub fn summary(line: &str) {
    println!("{line}");
    if let Ok(path) = std::env::var("OUTBOX_SUMMARY_FILE") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}
