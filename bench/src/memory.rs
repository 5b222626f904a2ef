//! Phase 7: the relay's peak memory. The relay runs alone in a child
//! process (this binary, `child-relay`), draining a pre-filled backlog to
//! Redis Streams, and reports its own `VmHWM` from `/proc/self/status`.

use std::sync::Arc;
use std::time::Instant;

use outbox_core::Relay;
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::StoreConfig;
use sqlx::postgres::PgPoolOptions;

use crate::brokers::Broker;
use crate::db::prefill;
use crate::sys::{self, round};
use crate::{BoxResult, Ctx};

/// What the child reported.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Memory {
    /// Where the relay ran.
    pub note: String,
    /// Messages the child drained.
    pub published: u64,
    /// Its drain rate (msg/s).
    pub msg_per_s: f64,
    /// Peak resident set size of the relay process (MiB).
    pub relay_peak_rss_mib: f64,
    /// Resident set size at the end (MiB).
    pub relay_end_rss_mib: f64,
    /// Peak RSS of the benchmark process itself (relay, producers,
    /// consumers, clients and the in-process Kafka mock cluster), MiB.
    pub bench_process_peak_rss_mib: f64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ChildReport {
    published: u64,
    secs: f64,
    vm_hwm_kib: u64,
    vm_rss_kib: u64,
}

/// Pre-fills the backlog, runs the child and reads its report.
pub async fn run(ctx: &Ctx) -> BoxResult<Memory> {
    let table = ctx.db.outbox("memory").await?;
    let result = async {
        let topic = ctx.brokers.topic(Broker::Redis);
        let n = ctx.opts.messages;
        prefill(&ctx.db, &table, &topic, n, &ctx.payload, ctx.opts.keys).await?;
        let exe = std::env::current_exe()?;
        let out = tokio::process::Command::new(exe)
            .arg("child-relay")
            .arg(&ctx.opts.pg_url)
            .arg(&table.name)
            .arg(ctx.brokers.redis_url())
            .arg(ctx.opts.batch.to_string())
            .kill_on_drop(true)
            .output()
            .await?;
        if !out.status.success() {
            return Err(format!(
                "child relay failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("CHILD_RESULT "))
            .ok_or("the child relay printed no result")?;
        let r: ChildReport = serde_json::from_str(line)?;
        Ok::<_, crate::BoxError>(Memory {
            note: format!(
                "a child process running only the relay (PgStore + RedisTransport, batch {}, \
                 no metrics recorder), draining {n} pre-filled messages",
                ctx.opts.batch
            ),
            published: r.published,
            msg_per_s: round(r.published as f64 / r.secs.max(1e-9), 0),
            relay_peak_rss_mib: round(r.vm_hwm_kib as f64 / 1024.0, 1),
            relay_end_rss_mib: round(r.vm_rss_kib as f64 / 1024.0, 1),
            bench_process_peak_rss_mib: 0.0,
        })
    }
    .await;
    ctx.db.drop(&table.schema).await;
    let _ = ctx.brokers.purge(Broker::Redis).await;
    result
}

/// The child: `child-relay PG_URL TABLE REDIS_URL BATCH`.
pub async fn child(args: Vec<String>) -> BoxResult<()> {
    let [pg_url, table, redis_url, batch] = args.as_slice() else {
        return Err("usage: child-relay PG_URL TABLE REDIS_URL BATCH".into());
    };
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(pg_url)
        .await?;
    let store = PgStore::with_config(pool, StoreConfig::default().table(table)?.listen(false));
    let transport = outbox_redis::RedisTransport::connect(
        outbox_redis::RedisConfig::builder(redis_url.as_str()).build()?,
    )
    .await?;
    let relay = Relay::builder(Arc::new(store), Arc::new(transport))
        .batch_size(batch.parse()?)
        .build()?;
    let started = Instant::now();
    let report = relay.drain().await?;
    let secs = started.elapsed().as_secs_f64();
    let (hwm, rss) = sys::memory_kib();
    println!(
        "CHILD_RESULT {}",
        serde_json::to_string(&ChildReport {
            published: report.published,
            secs,
            vm_hwm_kib: hwm,
            vm_rss_kib: rss,
        })?
    );
    Ok(())
}
