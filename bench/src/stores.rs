//! Phase 8: the relay on each store, not only PostgreSQL: a backlog in
//! MariaDB (`MySqlStore`) and in a SQLite file (`SqliteStore`) drained
//! through a transport that acknowledges at once, beside the same drain on
//! PostgreSQL. What the store costs the relay, with no broker in the way.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::Store;
use outbox_sqlx::mysql::MySqlStore;
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::sqlite::SqliteStore;
use outbox_sqlx::{Outbox, StoreConfig};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};

use crate::brokers::NullTransport;
use crate::db::enqueue_backlog;
use crate::throughput::{relay_drain, Drain};
use crate::{BoxResult, Ctx};

/// One store's drain.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StoreDrain {
    /// `postgres`, `mysql` or `sqlite`.
    pub store: String,
    /// What ran it (server version, or the SQLite library's).
    pub server: String,
    /// The drain (pre-fill: `enqueue_batch`, 10,000 per transaction).
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

/// Enqueues the `--messages` backlog into `outbox` on `pool`.
async fn prefill<DB>(ctx: &Ctx, pool: &sqlx::Pool<DB>, outbox: &Outbox) -> BoxResult<Duration>
where
    DB: sqlx::Database,
    DB::Connection: outbox_sqlx::Enqueue,
{
    let topic = format!("bench.{}.stores", ctx.brokers.u);
    enqueue_backlog(
        pool,
        outbox,
        &topic,
        ctx.opts.messages,
        &ctx.payload,
        ctx.opts.keys,
    )
    .await
}

/// One relay drains the store through the null transport.
async fn drain(
    ctx: &Ctx,
    name: &str,
    server: String,
    store: Arc<dyn Store>,
    prefill: Duration,
) -> BoxResult<StoreDrain> {
    let transport = Arc::new(NullTransport);
    Ok(StoreDrain {
        store: name.to_string(),
        server,
        drain: relay_drain(ctx, name, store, transport, ctx.opts.messages, prefill).await?,
    })
}
