//! Phase 8: the relay on each store, not only PostgreSQL: a backlog in
//! MariaDB (`MySqlStore`) and in a SQLite file (`SqliteStore`) drained
//! through a transport that acknowledges at once, beside the same drain on
//! PostgreSQL. What the store costs the relay, with no broker in the way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{Relay, Store};
use outbox_sqlx::mysql::MySqlStore;
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::sqlite::SqliteStore;
use outbox_sqlx::{Outbox, StoreConfig};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};

use crate::brokers::NullTransport;
use crate::db::message;
use crate::sys::{self, round, CpuUse};
use crate::throughput::Drain;
use crate::{BoxResult, Ctx};

/// Rows per enqueue transaction while pre-filling.
const PREFILL_TX: usize = 5_000;

/// One store's drain.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StoreDrain {
    /// `postgres`, `mysql` or `sqlite`.
    pub store: String,
    /// What ran it (server version, or the SQLite library's).
    pub server: String,
    /// The drain (pre-fill: `enqueue_batch`, 5,000 per transaction).
    #[serde(flatten)]
    pub drain: Drain,
}

/// Drains a backlog of `ctx.opts.messages` on each store.
pub async fn run(ctx: &Ctx) -> Vec<Result<StoreDrain, (String, crate::BoxError)>> {
    let mut out = Vec::new();
    for store in ["postgres", "mysql", "sqlite"] {
        eprintln!("  {store}");
        let r = match store {
            "postgres" => postgres(ctx).await,
            "mysql" => mysql(ctx).await,
            _ => sqlite(ctx).await,
        };
        match &r {
            Ok(d) => eprintln!("  {store}: {:.0} msg/s", d.drain.msg_per_s),
            Err(e) => eprintln!("  {store}: FAILED {e}"),
        }
        out.push(r.map_err(|e| (store.to_string(), e)));
    }
    out
}

async fn postgres(ctx: &Ctx) -> BoxResult<StoreDrain> {
    let table = ctx.db.outbox("stores").await?;
    let result = async {
        let pool = ctx.db.pool("outbox-bench-stores", 4).await?;
        let prefill = prefill(ctx, &pool, &Outbox::new().table(&table.name)?).await?;
        sqlx::query(&format!("ANALYZE {}", table.name))
            .execute(&ctx.db.admin)
            .await?;
        let store = PgStore::with_config(
            pool.clone(),
            StoreConfig::default().table(&table.name)?.listen(false),
        );
        let server: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(&pool)
            .await?;
        let d = drain(ctx, "postgres", server, Arc::new(store), prefill).await;
        pool.close().await;
        d
    }
    .await;
    ctx.db.drop(&table.schema).await;
    result
}

async fn mysql(ctx: &Ctx) -> BoxResult<StoreDrain> {
    let options: MySqlConnectOptions = ctx.opts.mysql_url.parse()?;
    let pool = MySqlPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await?;
    let db = format!("{}_stores", ctx.db.prefix);
    let table = format!("{db}.outbox");
    let result = async {
        let config = StoreConfig::default().table(&table)?;
        let store = MySqlStore::with_config(pool.clone(), config);
        store.migrate().await?;
        let prefill = prefill(ctx, &pool, &Outbox::new().table(&table)?).await?;
        sqlx::query(&format!("ANALYZE TABLE {table}"))
            .execute(&pool)
            .await?;
        let server: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(&pool)
            .await?;
        drain(ctx, "mysql", server, Arc::new(store), prefill).await
    }
    .await;
    if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute(&pool)
        .await
    {
        eprintln!("outbox-bench: could not drop database {db}: {e}");
    }
    pool.close().await;
    result
}

async fn sqlite(ctx: &Ctx) -> BoxResult<StoreDrain> {
    let dir = std::env::temp_dir().join(format!("{}-stores", ctx.db.prefix));
    std::fs::create_dir_all(&dir)?;
    let result = async {
        let pool = outbox_sqlx::sqlite::connect(dir.join("outbox.db")).await?;
        let store = SqliteStore::new(pool.clone());
        store.migrate().await?;
        let prefill = prefill(ctx, &pool, &Outbox::new()).await?;
        let server: String = sqlx::query_scalar("SELECT 'SQLite ' || sqlite_version()")
            .fetch_one(&pool)
            .await?;
        let d = drain(ctx, "sqlite", server, Arc::new(store), prefill).await;
        pool.close().await;
        d
    }
    .await;
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        eprintln!("outbox-bench: could not remove {}: {e}", dir.display());
    }
    result
}

/// Enqueues `--messages` backlog messages, a batch per transaction; returns
/// how long that took.
async fn prefill<DB>(ctx: &Ctx, pool: &sqlx::Pool<DB>, outbox: &Outbox) -> BoxResult<Duration>
where
    DB: sqlx::Database,
    DB::Connection: outbox_sqlx::Enqueue,
{
    let topic = format!("bench.{}.stores", ctx.brokers.u);
    let n = ctx.opts.messages;
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let m = PREFILL_TX.min(n - i);
        let batch = (i..i + m)
            .map(|j| message(&topic, &ctx.payload, ctx.opts.keys, j))
            .collect::<BoxResult<Vec<_>>>()?;
        let mut tx = pool.begin().await?;
        outbox.enqueue_batch(&mut *tx, &batch).await?;
        tx.commit().await?;
        i += m;
    }
    Ok(started.elapsed())
}

/// One relay (batch size from the options) drains the store.
async fn drain(
    ctx: &Ctx,
    name: &str,
    server: String,
    store: Arc<dyn Store>,
    prefill: Duration,
) -> BoxResult<StoreDrain> {
    let n = ctx.opts.messages;
    let relay = Relay::builder(store, Arc::new(NullTransport))
        .batch_size(ctx.opts.batch)
        .build()?;
    ctx.rec.reset();
    let c0 = sys::sample();
    let started = Instant::now();
    let report = relay.drain().await?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = CpuUse::between(&c0, &sys::sample());
    if report.published != n as u64 {
        eprintln!(
            "  warning: {name}: published {} of {n} ({report:?})",
            report.published
        );
    }
    Ok(StoreDrain {
        store: name.to_string(),
        server,
        drain: Drain {
            published: report.published,
            secs: round(secs, 3),
            msg_per_s: round(report.published as f64 / secs, 0),
            prefill_secs: round(prefill.as_secs_f64(), 2),
            profile: ctx.rec.profile(),
            cpu,
        },
    })
}
