//! Phase 1-3: relay throughput per broker, the naive baseline, the raw
//! limits of each broker and of the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{ClaimRequest, Message, MessageId, Relay, RelayId, Settlement, Store, Transport};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::StoreConfig;
use sqlx::Row;

use crate::brokers::{Broker, Brokers, NullTransport};
use crate::db::{message, prefill, Table};
use crate::recorder::{Profile, Series};
use crate::sys::{self, round, CpuUse};
use crate::{BoxResult, Ctx};

/// One relay drain.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Drain {
    /// Messages published and settled.
    pub published: u64,
    /// Wall seconds of the drain.
    pub secs: f64,
    /// Messages per second.
    pub msg_per_s: f64,
    /// How long the pre-fill took (enqueue_batch, 10,000 per transaction).
    pub prefill_secs: f64,
    /// The relay's own metrics over the drain.
    pub profile: Profile,
    /// Where CPU went.
    pub cpu: CpuUse,
}

/// The database's own claim + settle rate, no broker.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DbLimit {
    /// Messages claimed and settled per second.
    pub msg_per_s: f64,
    /// Messages.
    pub messages: u64,
    /// Wall seconds.
    pub secs: f64,
    /// `PgStore::claim` durations (seconds).
    pub claim: Series,
    /// `PgStore::settle` durations (seconds).
    pub settle: Series,
    /// Where CPU went.
    pub cpu: CpuUse,
}

/// A database-limit run and the drain of our relay right after it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Pair {
    /// The database limit (msg/s).
    pub db_limit_msg_per_s: f64,
    /// Our relay (msg/s).
    pub ours_msg_per_s: f64,
    /// ours / database limit.
    pub ratio: f64,
}

/// The naive relay (the reference module's design).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Naive {
    /// Messages relayed before the time box ended (or the backlog did).
    pub relayed: u64,
    /// Wall seconds.
    pub secs: f64,
    /// Messages per second.
    pub msg_per_s: f64,
    /// Where CPU went.
    pub cpu: CpuUse,
    /// One-row autocommit INSERTs per second on one connection, measured
    /// just before: the commit (fsync) rate that bounds this design.
    pub single_commits_per_s: f64,
}

/// Everything measured for one broker.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BrokerResult {
    /// Broker id.
    pub broker: String,
    /// Label.
    pub label: String,
    /// Our relay draining the backlog.
    pub ours: Option<Drain>,
    /// Diagnostic: our relay with a tuned transport (see `tuning`).
    pub ours_tuned: Option<Drain>,
    /// What was tuned.
    pub tuning: Option<String>,
    /// The naive baseline.
    pub naive: Option<Naive>,
    /// Our transport alone, `publish_batch` of 5,000, no database (msg/s).
    pub transport_limit_msg_per_s: Option<f64>,
    /// The raw client alone, pipelined, no outbox code (msg/s).
    pub raw_limit_msg_per_s: Option<f64>,
    /// The broker limit: the better of the two above (msg/s).
    pub broker_limit_msg_per_s: Option<f64>,
    /// The database's claim + settle limit (msg/s): the one measured right
    /// before `ours` (see `pairs`).
    pub db_limit_msg_per_s: Option<f64>,
    /// Every database-limit run and the drain of our relay right after it;
    /// `ours` is the drain of the pair with the median ratio. The machine's
    /// speed drifts between runs (the database limit alone ranged
    /// 88k-181k msg/s over one session), so a limit measured minutes
    /// before made the ratio swing with it.
    pub pairs: Vec<Pair>,
    /// min(broker limit, database limit).
    pub limit_msg_per_s: Option<f64>,
    /// ours / naive.
    pub ratio_vs_baseline: Option<f64>,
    /// ours / min(limits).
    pub ratio_vs_limit: Option<f64>,
    /// ours / database limit.
    pub ratio_vs_db_limit: Option<f64>,
    /// ours / broker limit.
    pub ratio_vs_broker_limit: Option<f64>,
    /// What failed.
    pub errors: Vec<String>,
}

fn pg_store(pool: sqlx::PgPool, table: &Table) -> BoxResult<PgStore> {
    Ok(PgStore::with_config(
        pool,
        StoreConfig::default().table(&table.name)?.listen(false),
    ))
}

/// Pre-fills `n` messages for `topic` in a fresh table and drains them with
/// one relay over `transport` (`Relay::drain`, batch size from the options).
pub async fn drain(
    ctx: &Ctx,
    label: &str,
    topic: &str,
    transport: Arc<dyn Transport>,
    n: usize,
) -> BoxResult<Drain> {
    let table = ctx.db.outbox(label).await?;
    let result = async {
        let prefill_took = prefill(&ctx.db, &table, topic, n, &ctx.payload, ctx.opts.keys).await?;
        let pool = ctx.db.pool("outbox-bench-relay", 4).await?;
        let store = Arc::new(pg_store(pool.clone(), &table)?);
        let drained = relay_drain(ctx, label, store, transport, n, prefill_took).await;
        pool.close().await;
        drained
    }
    .await;
    ctx.db.drop(&table.schema).await;
    result
}

/// One relay (`Relay::drain`, batch size from the options) drains the `n`
/// messages pre-filled in `store` (which took `prefill`) over `transport`.
pub async fn relay_drain(
    ctx: &Ctx,
    label: &str,
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    n: usize,
    prefill: Duration,
) -> BoxResult<Drain> {
    let relay = Relay::builder(store, transport)
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
            "  warning: {label}: published {} of {n} ({report:?})",
            report.published
        );
    }
    Ok(Drain {
        published: report.published,
        secs: round(secs, 3),
        msg_per_s: round(report.published as f64 / secs, 0),
        prefill_secs: round(prefill.as_secs_f64(), 2),
        profile: ctx.rec.profile(),
        cpu,
    })
}

/// The database limit: `PgStore::claim` + `PgStore::settle` (all delivered)
/// in a loop, no publish.
pub async fn db_limit(ctx: &Ctx) -> BoxResult<DbLimit> {
    let table = ctx.db.outbox("dblimit").await?;
    let result = async {
        let n = ctx.opts.messages;
        prefill(
            &ctx.db,
            &table,
            "bench.dblimit",
            n,
            &ctx.payload,
            ctx.opts.keys,
        )
        .await?;
        let pool = ctx.db.pool("outbox-bench-dblimit", 4).await?;
        let store = pg_store(pool.clone(), &table)?;
        let request = ClaimRequest {
            owner: RelayId::new(format!("bench-dblimit-{}", ctx.brokers.u)),
            limit: ctx.opts.batch,
            lease: Duration::from_secs(30),
        };
        let mut claims = Vec::new();
        let mut settles = Vec::new();
        let mut done = 0u64;
        let c0 = sys::sample();
        let started = Instant::now();
        loop {
            let t = Instant::now();
            let claim = store.claim(&request).await?;
            claims.push(t.elapsed().as_secs_f64());
            if claim.messages.is_empty() {
                break;
            }
            let settlement = Settlement {
                delivered: claim.messages.iter().map(|m| m.id).collect(),
                ..Settlement::default()
            };
            let t = Instant::now();
            let r = store.settle(&claim.lease, &settlement).await?;
            settles.push(t.elapsed().as_secs_f64());
            done += r.delivered;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = CpuUse::between(&c0, &sys::sample());
        store.leave(&request.owner).await?;
        pool.close().await;
        Ok::<_, crate::BoxError>(DbLimit {
            msg_per_s: round(done as f64 / secs, 0),
            messages: done,
            secs: round(secs, 3),
            claim: Series::of(&claims),
            settle: Series::of(&settles),
            cpu,
        })
    }
    .await;
    ctx.db.drop(&table.schema).await;
    result
}

/// The relay over a transport that acknowledges at once (no broker).
pub async fn relay_no_broker(ctx: &Ctx) -> BoxResult<Drain> {
    drain(
        ctx,
        "nobroker",
        "bench.nobroker",
        Arc::new(NullTransport),
        ctx.opts.messages,
    )
    .await
}

/// The reference module's relay: fetch 100 rows by insert time, publish
/// each alone and wait for its acknowledgement, one UPDATE per row (its own
/// autocommit transaction), poll every second when nothing is pending. Time
/// boxed: runs until the backlog is gone or `naive_time` passed.
pub async fn naive(ctx: &Ctx, b: Broker) -> BoxResult<Naive> {
    let schema = ctx.db.schema(&format!("naive_{}", b.tag())).await?;
    let result = async {
        let t = format!("{schema}.outbox_messages");
        // The reference migration.
        for ddl in [
            format!(
                "CREATE TABLE {t} (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), \
                 topic TEXT NOT NULL, payload BYTEA NOT NULL, headers JSONB DEFAULT '{{}}', \
                 attempt INT DEFAULT 1, relayed_at TIMESTAMPTZ, failed_at TIMESTAMPTZ, \
                 last_error TEXT, inserted_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL)"
            ),
            format!("CREATE INDEX ON {t} (relayed_at, inserted_at)"),
            format!("CREATE INDEX ON {t} (failed_at)"),
        ] {
            sqlx::query(&ddl).execute(&ctx.db.admin).await?;
        }
        let n = ctx.opts.messages;
        let topic = ctx.brokers.topic(b);
        sqlx::query(&format!(
            "INSERT INTO {t} (topic, payload, inserted_at, updated_at) \
             SELECT $1, $2, now() + g * interval '1 microsecond', now() \
             FROM generate_series(1, $3) g"
        ))
        .bind(&topic)
        .bind(ctx.payload.as_ref())
        .bind(i64::try_from(n)?)
        .execute(&ctx.db.admin)
        .await?;
        sqlx::query(&format!("ANALYZE {t}"))
            .execute(&ctx.db.admin)
            .await?;
        let transport = ctx.brokers.transport(b).await?;
        let pool = ctx.db.pool("outbox-bench-naive", 1).await?;
        let single_commits_per_s = single_commits(&pool, &schema).await?;
        let fetch = format!(
            "SELECT id, topic, payload FROM {t} WHERE relayed_at IS NULL AND failed_at IS NULL \
             ORDER BY inserted_at ASC LIMIT 100"
        );
        let mark = format!("UPDATE {t} SET relayed_at = now(), updated_at = now() WHERE id = $1");
        let fail = format!(
            "UPDATE {t} SET attempt = attempt + 1, last_error = $2, updated_at = now(), \
             failed_at = CASE WHEN attempt + 1 > 5 THEN now() END WHERE id = $1"
        );
        let mut relayed = 0u64;
        let c0 = sys::sample();
        let started = Instant::now();
        'poll: while started.elapsed() < ctx.opts.naive_time {
            let rows = sqlx::query(&fetch).fetch_all(&pool).await?;
            if rows.is_empty() {
                if relayed >= n as u64 {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            for row in rows {
                let id: uuid::Uuid = row.try_get("id")?;
                let topic: String = row.try_get("topic")?;
                let payload: Vec<u8> = row.try_get("payload")?;
                let m = Message::builder(topic, payload)
                    .id(MessageId::from_uuid(id))
                    .build()?;
                let mut r = transport.publish_batch(std::slice::from_ref(&m)).await;
                match r.pop() {
                    Some(Ok(())) => {
                        sqlx::query(&mark).bind(id).execute(&pool).await?;
                        relayed += 1;
                    }
                    other => {
                        let e = other.map_or("no result".to_string(), |r| {
                            r.err().map(|e| e.to_string()).unwrap_or_default()
                        });
                        sqlx::query(&fail).bind(id).bind(e).execute(&pool).await?;
                    }
                }
                if started.elapsed() >= ctx.opts.naive_time {
                    break 'poll;
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = CpuUse::between(&c0, &sys::sample());
        pool.close().await;
        Ok::<_, crate::BoxError>(Naive {
            relayed,
            secs: round(secs, 3),
            msg_per_s: round(relayed as f64 / secs, 1),
            cpu,
            single_commits_per_s: round(single_commits_per_s, 0),
        })
    }
    .await;
    ctx.db.drop(&schema).await;
    result
}

/// Everything for one broker: ours, naive, the two broker limits.
/// `db_limit_before`: the run's first database limit, used should a
/// paired one fail.
pub async fn broker(ctx: &Ctx, b: Broker, db_limit_before: Option<f64>) -> BrokerResult {
    let mut r = BrokerResult {
        broker: b.id().to_string(),
        label: b.label().to_string(),
        ..BrokerResult::default()
    };
    let topic = ctx.brokers.topic(b);
    let n = ctx.opts.messages;
    let note = |r: &mut BrokerResult, what: &str, e: crate::BoxError| {
        eprintln!("  {}: {what} failed: {e}", b.label());
        r.errors.push(format!("{what}: {e}"));
    };

    // (ratio, database limit, drain) of each pair.
    let mut pairs = Vec::new();
    for pair in 1..=ctx.opts.pairs {
        eprintln!(
            "  {}: database limit, then our relay, {n} messages (pair {pair} of {})",
            b.label(),
            ctx.opts.pairs
        );
        let limit = match db_limit(ctx).await {
            Ok(l) => Some(l.msg_per_s),
            Err(e) => {
                note(&mut r, "db limit", e);
                db_limit_before
            }
        };
        let ours = async {
            let t = ctx.brokers.transport(b).await?;
            drain(ctx, &format!("tp_{}", b.tag()), &topic, t, n).await
        };
        match ours.await {
            Ok(d) => {
                let ratio = limit.filter(|l| *l > 0.0).map_or(0.0, |l| d.msg_per_s / l);
                pairs.push((ratio, limit, d));
            }
            Err(e) => note(&mut r, "relay", e),
        }
        let _ = ctx.brokers.purge(b).await;
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    r.pairs = pairs
        .iter()
        .map(|(ratio, limit, d)| Pair {
            db_limit_msg_per_s: limit.unwrap_or(0.0),
            ours_msg_per_s: d.msg_per_s,
            ratio: round(*ratio, 2),
        })
        .collect();
    let db_limit = if pairs.is_empty() {
        db_limit_before
    } else {
        let (_, limit, d) = pairs.swap_remove(pairs.len() / 2);
        r.ours = Some(d);
        limit
    };
    r.db_limit_msg_per_s = db_limit;

    if let Some(tuning) = Brokers::tuning(b) {
        eprintln!("  {}: our relay, tuned transport: {tuning}", b.label());
        let tuned = async {
            let t = ctx.brokers.transport_with(b, true).await?;
            drain(ctx, &format!("tuned_{}", b.tag()), &topic, t, n).await
        };
        match tuned.await {
            Ok(d) => r.ours_tuned = Some(d),
            Err(e) => note(&mut r, "relay (tuned)", e),
        }
        r.tuning = Some(tuning.to_string());
        let _ = ctx.brokers.purge(b).await;
    }

    eprintln!(
        "  {}: naive baseline (at most {:?})",
        b.label(),
        ctx.opts.naive_time
    );
    match naive(ctx, b).await {
        Ok(v) => r.naive = Some(v),
        Err(e) => note(&mut r, "naive", e),
    }
    let _ = ctx.brokers.purge(b).await;

    eprintln!("  {}: broker limits", b.label());
    let messages: BoxResult<Vec<Message>> = (0..n)
        .map(|i| message(&topic, &ctx.payload, ctx.opts.keys, i))
        .collect();
    match messages {
        Ok(messages) => match ctx.brokers.transport_limit(b, &messages).await {
            Ok((rate, failed)) => {
                if failed > 0 {
                    r.errors
                        .push(format!("transport limit: {failed} publishes failed"));
                }
                r.transport_limit_msg_per_s = Some(round(rate, 0));
            }
            Err(e) => note(&mut r, "transport limit", e),
        },
        Err(e) => note(&mut r, "transport limit", e),
    }
    let _ = ctx.brokers.purge(b).await;
    match ctx.brokers.raw_limit(b, n, &ctx.payload).await {
        Ok(rate) => r.raw_limit_msg_per_s = Some(round(rate, 0)),
        Err(e) => note(&mut r, "raw limit", e),
    }
    let _ = ctx.brokers.purge(b).await;

    r.broker_limit_msg_per_s = match (r.transport_limit_msg_per_s, r.raw_limit_msg_per_s) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    r.limit_msg_per_s = match (r.broker_limit_msg_per_s, db_limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(ours) = &r.ours {
        let o = ours.msg_per_s;
        let ratio = |d: Option<f64>| d.filter(|d| *d > 0.0).map(|d| round(o / d, 2));
        r.ratio_vs_baseline = ratio(r.naive.as_ref().map(|n| n.msg_per_s));
        r.ratio_vs_limit = ratio(r.limit_msg_per_s);
        r.ratio_vs_db_limit = ratio(db_limit);
        r.ratio_vs_broker_limit = ratio(r.broker_limit_msg_per_s);
    }
    r
}

/// One-row autocommit INSERTs per second on one connection, for a second.
async fn single_commits(pool: &sqlx::PgPool, schema: &str) -> BoxResult<f64> {
    let t = format!("{schema}.commit_probe");
    sqlx::query(&format!(
        "CREATE TABLE {t} (id BIGSERIAL PRIMARY KEY, v INT)"
    ))
    .execute(pool)
    .await?;
    let insert = format!("INSERT INTO {t} (v) VALUES (1)");
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < Duration::from_secs(1) {
        sqlx::query(&insert).execute(pool).await?;
        n += 1;
    }
    Ok(f64::from(n) / started.elapsed().as_secs_f64())
}
