//! Phase 6: several relays on one table, and a small versus a large backlog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{CancellationToken, Relay, RelayId};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};

use crate::brokers::Broker;
use crate::db::{message, prefill};
use crate::recorder::{Profile, Series};
use crate::sys::{self, round, CpuUse};
use crate::{BoxResult, Ctx};

/// `k` relays draining one backlog.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScaleRun {
    /// Relays (each with its own pool and transport).
    pub relays: usize,
    /// Messages.
    pub messages: usize,
    /// From the backlog's commit to the last row settled (s).
    pub secs: f64,
    /// Messages per second.
    pub msg_per_s: f64,
    /// msg/s relative to one relay.
    pub speedup: f64,
    /// Seconds the relays needed to share the partitions before the run.
    pub balance_secs: f64,
    /// The relays' metrics.
    pub profile: Profile,
    /// Where CPU went.
    pub cpu: CpuUse,
}

/// One relay draining a backlog of `rows`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GrowthRun {
    /// Backlog rows.
    pub rows: usize,
    /// Size of the outbox table and its indexes after pre-fill (MB).
    pub table_mb: f64,
    /// Overall drain rate (msg/s).
    pub msg_per_s: f64,
    /// Every drain of a backlog this size, in the order run (msg/s); this
    /// run is the median one.
    pub runs_msg_per_s: Vec<f64>,
    /// Rate over the first 10,000 messages (msg/s).
    pub first_10k_msg_per_s: f64,
    /// Rate over the last 10,000 messages (msg/s).
    pub last_10k_msg_per_s: f64,
    /// Claim durations over the first tenth of the claims.
    pub claim_first_tenth: Series,
    /// Claim durations over the last tenth of the claims.
    pub claim_last_tenth: Series,
    /// Settle durations, all.
    pub settle: Series,
    /// Wall seconds.
    pub secs: f64,
    /// Pre-fill seconds.
    pub prefill_secs: f64,
    /// Where CPU went.
    pub cpu: CpuUse,
}

/// 1, 2 and 4 relays (separate pools, same table) draining one backlog
/// committed in one transaction after the relays have shared the partitions.
pub async fn relays(ctx: &Ctx, k: usize) -> BoxResult<ScaleRun> {
    let table = ctx.db.outbox(&format!("scale_{k}")).await?;
    let result = async {
        let topic = ctx.brokers.topic(Broker::Redis);
        let cancel = CancellationToken::new();
        let mut pools = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..k {
            let pool = ctx.db.pool(&format!("outbox-bench-scale-{i}"), 3).await?;
            let store = PgStore::with_config(
                pool.clone(),
                StoreConfig::default().table(&table.name)?.listen(false),
            );
            let relay =
                Relay::builder(Arc::new(store), ctx.brokers.transport(Broker::Redis).await?)
                    .batch_size(ctx.opts.batch)
                    .poll_interval(Duration::from_millis(50))
                    .id(RelayId::new(format!(
                        "bench-scale-{}-{k}-{i}",
                        ctx.brokers.u
                    )))
                    .build()?;
            let c = cancel.clone();
            tasks.push(tokio::spawn(async move { relay.run(c).await }));
            pools.push(pool);
        }
        // Wait until every relay holds its share of the 64 partitions.
        let share = (64 + k as i64 - 1) / k as i64;
        let started = Instant::now();
        loop {
            let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
                "SELECT owner, count(*) FROM {}_partitions \
                 WHERE owner IS NOT NULL AND lease_until > now() GROUP BY owner",
                table.name
            ))
            .fetch_all(&ctx.db.admin)
            .await?;
            let total: i64 = rows.iter().map(|(_, c)| c).sum();
            if (rows.len() == k && total == 64 && rows.iter().all(|(_, c)| *c <= share))
                || started.elapsed() > Duration::from_secs(20)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let balance_secs = started.elapsed().as_secs_f64();

        let n = ctx.opts.messages;
        let outbox = Outbox::new().table(&table.name)?;
        let messages = (0..n)
            .map(|i| message(&topic, &ctx.payload, ctx.opts.keys, i))
            .collect::<BoxResult<Vec<_>>>()?;
        let mut tx = ctx.db.admin.begin().await?;
        outbox.enqueue_batch(&mut *tx, &messages).await?;
        drop(messages);
        ctx.rec.reset();
        let c0 = sys::sample();
        let started = Instant::now();
        tx.commit().await?;
        let deadline = Duration::from_secs(600);
        while ctx.rec.counter(outbox_core::metrics::PUBLISHED) < n as u64
            && started.elapsed() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while ctx.db.pending(&table.name).await? > 0 && started.elapsed() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = CpuUse::between(&c0, &sys::sample());
        let profile = ctx.rec.profile();
        cancel.cancel();
        for t in tasks {
            let _ = t.await;
        }
        for p in pools {
            p.close().await;
        }
        Ok::<_, crate::BoxError>(ScaleRun {
            relays: k,
            messages: n,
            secs: round(secs, 3),
            msg_per_s: round(n as f64 / secs, 0),
            speedup: 0.0,
            balance_secs: round(balance_secs, 2),
            profile,
            cpu,
        })
    }
    .await;
    ctx.db.drop(&table.schema).await;
    let _ = ctx.brokers.purge(Broker::Redis).await;
    result
}

/// One relay (to Redis Streams) draining a pre-filled backlog of `rows`,
/// claim by claim, timing every batch.
pub async fn growth(ctx: &Ctx, rows: usize) -> BoxResult<GrowthRun> {
    let table = ctx.db.outbox(&format!("growth_{rows}")).await?;
    let result = async {
        let topic = ctx.brokers.topic(Broker::Redis);
        let prefill_took =
            prefill(&ctx.db, &table, &topic, rows, &ctx.payload, ctx.opts.keys).await?;
        let bytes: i64 =
            sqlx::query_scalar(&format!("SELECT pg_total_relation_size('{}')", table.name))
                .fetch_one(&ctx.db.admin)
                .await?;
        let pool = ctx.db.pool("outbox-bench-growth", 4).await?;
        let relay = Relay::builder(
            Arc::new(PgStore::with_config(
                pool.clone(),
                StoreConfig::default().table(&table.name)?.listen(false),
            )),
            ctx.brokers.transport(Broker::Redis).await?,
        )
        .batch_size(ctx.opts.batch)
        .build()?;
        ctx.rec.reset();
        let c0 = sys::sample();
        let started = Instant::now();
        // (messages so far, seconds since start) after every batch.
        let mut marks: Vec<(u64, f64)> = vec![(0, 0.0)];
        let mut done = 0u64;
        loop {
            let r = relay.relay_once().await?;
            if r.batches == 0 {
                break;
            }
            done += r.published;
            marks.push((done, started.elapsed().as_secs_f64()));
            // Keep Redis small on long runs.
            if marks.len().is_multiple_of(100) {
                let _ = ctx.brokers.purge(Broker::Redis).await;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = CpuUse::between(&c0, &sys::sample());
        pool.close().await;
        let window = 10_000u64.min(done);
        let rate_between = |from: u64, to: u64| {
            let t = |m: u64| {
                marks
                    .iter()
                    .find(|(n, _)| *n >= m)
                    .map_or(secs, |(_, t)| *t)
            };
            let (a, b) = (t(from), t(to));
            if b > a {
                round((to - from) as f64 / (b - a), 0)
            } else {
                0.0
            }
        };
        let claims = ctx.rec.samples(outbox_core::metrics::CLAIM_DURATION);
        let tenth = (claims.len() / 10).max(1).min(claims.len());
        Ok::<_, crate::BoxError>(GrowthRun {
            rows,
            table_mb: round(bytes as f64 / 1e6, 1),
            msg_per_s: round(done as f64 / secs, 0),
            runs_msg_per_s: Vec::new(),
            first_10k_msg_per_s: rate_between(0, window),
            last_10k_msg_per_s: rate_between(done - window, done),
            claim_first_tenth: Series::of(&claims[..tenth]),
            claim_last_tenth: Series::of(&claims[claims.len() - tenth..]),
            settle: Series::of(&ctx.rec.samples(outbox_core::metrics::SETTLE_DURATION)),
            secs: round(secs, 3),
            prefill_secs: round(prefill_took.as_secs_f64(), 2),
            cpu,
        })
    }
    .await;
    ctx.db.drop(&table.schema).await;
    let _ = ctx.brokers.purge(Broker::Redis).await;
    result
}
