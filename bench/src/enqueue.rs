//! Phase 5: what the outbox costs the business transactions: 16 writers in
//! a closed loop, each transaction inserting one business row, without an
//! outbox message, with one, with one plus NOTIFY, and with one plus
//! `Outbox::wake` after the commit, and with one written by the business
//! INSERT's own statement (`Outbox::enqueue_with`: what the row costs
//! without a round trip of its own). Two diagnostics: an extra `SELECT 1`
//! (what any second statement costs) and the outbox row by a hand-written
//! one-row insert.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::Message;
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};

use crate::sys::{self, round, CpuUse};
use crate::{BoxResult, Ctx};

/// Concurrent writers.
pub const WRITERS: usize = 16;

/// The three variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Plain,
    Outbox,
    Notify,
    /// `Outbox::wake` after each commit (no relay waits: one read).
    Wake,
    /// Diagnostic: the same outbox row written by a plain one-row
    /// `INSERT ... VALUES`, not through `Outbox::enqueue`.
    RawInsert,
    /// Diagnostic: no outbox row, a `SELECT 1` in its place.
    Select1,
    /// The outbox row written by the business INSERT's own statement
    /// (`Outbox::enqueue_with`: no round trip of its own).
    InStatement,
}

/// Business throughput without and with the outbox.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EnqueueCost {
    /// Writers.
    pub writers: usize,
    /// Business tx/s, one business INSERT per transaction.
    pub plain_tx_per_s: f64,
    /// The same plus `Outbox::enqueue` of one message.
    pub outbox_tx_per_s: f64,
    /// The same plus NOTIFY (`Outbox::notify(true)`), a relay LISTENing.
    pub outbox_notify_tx_per_s: f64,
    /// 1 - outbox / plain, in percent.
    pub outbox_cost_pct: f64,
    /// 1 - notify / plain, in percent.
    pub outbox_notify_cost_pct: f64,
    /// The outbox insert plus `Outbox::wake` after the commit, with no relay
    /// waiting (as while relays are busy): one small read, no NOTIFY.
    pub outbox_wake_tx_per_s: f64,
    /// 1 - wake / plain, in percent.
    pub outbox_wake_cost_pct: f64,
    /// Diagnostic: the same outbox row by a hand-written one-row
    /// `INSERT ... VALUES` instead of `Outbox::enqueue`.
    pub raw_insert_tx_per_s: f64,
    /// 1 - raw insert / plain, in percent.
    pub raw_insert_cost_pct: f64,
    /// Diagnostic: a `SELECT 1` instead of the outbox insert (the cost of
    /// any second statement).
    pub select1_tx_per_s: f64,
    /// 1 - select1 / plain, in percent.
    pub select1_cost_pct: f64,
    /// The outbox row written in the business INSERT's own statement
    /// (`Outbox::enqueue_with`).
    pub in_statement_tx_per_s: f64,
    /// 1 - in statement / plain, in percent.
    pub in_statement_cost_pct: f64,
    /// Every run in order (variant, tx/s): runs go plain, outbox, raw,
    /// select1, in statement, wake, notify, then the same backwards;
    /// each variant's two runs are averaged.
    pub runs: Vec<(String, f64)>,
    /// Where CPU went over all runs.
    pub cpu: CpuUse,
}

/// Measures the three variants.
pub async fn run(ctx: &Ctx) -> BoxResult<EnqueueCost> {
    let table = ctx.db.outbox("enqueue").await?;
    let result = async {
        let pool = ctx.db.pool("outbox-bench-writer", WRITERS as u32).await?;
        // A relay-side store LISTENing, as in production with NOTIFY on.
        let listener = PgStore::with_config(
            ctx.db.pool("outbox-bench-listener", 2).await?,
            StoreConfig::default().table(&table.name)?.listen(true),
        );
        let mut runs = Vec::new();
        let c0 = sys::sample();
        let order = [
            Variant::Plain,
            Variant::Outbox,
            Variant::RawInsert,
            Variant::Select1,
            Variant::InStatement,
            Variant::Wake,
            Variant::Notify,
        ];
        for v in order.iter().chain(order.iter().rev()).copied() {
            let rate = writers(ctx, &pool, &table, v).await?;
            eprintln!("  {v:?}: {rate:.0} tx/s");
            runs.push((v, rate));
        }
        let cpu = CpuUse::between(&c0, &sys::sample());
        drop(listener);
        pool.close().await;
        let mean = |w: Variant| {
            let r: Vec<f64> = runs
                .iter()
                .filter(|(v, _)| *v == w)
                .map(|(_, r)| *r)
                .collect();
            r.iter().sum::<f64>() / r.len().max(1) as f64
        };
        let plain = mean(Variant::Plain);
        let outbox = mean(Variant::Outbox);
        let notify = mean(Variant::Notify);
        let wake = mean(Variant::Wake);
        let raw = mean(Variant::RawInsert);
        let select1 = mean(Variant::Select1);
        let in_statement = mean(Variant::InStatement);
        let cost = |x: f64| {
            if plain > 0.0 {
                round(100.0 * (1.0 - x / plain), 1)
            } else {
                0.0
            }
        };
        Ok::<_, crate::BoxError>(EnqueueCost {
            writers: WRITERS,
            plain_tx_per_s: round(plain, 0),
            outbox_tx_per_s: round(outbox, 0),
            outbox_notify_tx_per_s: round(notify, 0),
            outbox_cost_pct: cost(outbox),
            outbox_notify_cost_pct: cost(notify),
            outbox_wake_tx_per_s: round(wake, 0),
            outbox_wake_cost_pct: cost(wake),
            raw_insert_tx_per_s: round(raw, 0),
            raw_insert_cost_pct: cost(raw),
            select1_tx_per_s: round(select1, 0),
            select1_cost_pct: cost(select1),
            in_statement_tx_per_s: round(in_statement, 0),
            in_statement_cost_pct: cost(in_statement),
            runs: runs
                .iter()
                .map(|(v, r)| (format!("{v:?}").to_lowercase(), round(*r, 0)))
                .collect(),
            cpu,
        })
    }
    .await;
    ctx.db.drop(&table.schema).await;
    result
}

async fn writers(
    ctx: &Ctx,
    pool: &sqlx::PgPool,
    table: &crate::db::Table,
    v: Variant,
) -> BoxResult<f64> {
    let outbox = Outbox::new()
        .table(&table.name)?
        .notify(v == Variant::Notify);
    let insert = Arc::new(format!(
        "INSERT INTO {}.orders (customer, total) VALUES ($1, $2)",
        table.schema
    ));
    let raw = Arc::new(format!(
        "INSERT INTO {} (id, topic, msg_key, payload) VALUES ($1, $2, $3, $4)",
        table.name
    ));
    let in_statement = Arc::new(format!(
        "INSERT INTO {}.orders (customer, total) VALUES ($1, $2)",
        table.schema
    ));
    let topic = format!("bench.{}.enqueue", ctx.brokers.u);
    let duration = ctx.opts.enqueue_time;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let pool = pool.clone();
        let outbox = outbox.clone();
        let insert = insert.clone();
        let raw = raw.clone();
        let in_statement = in_statement.clone();
        let topic = topic.clone();
        let payload = ctx.payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            let mut n = 0u64;
            while start.elapsed() < duration {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                let customer = format!("customer-{w}");
                let total = i32::try_from(n % 1000).unwrap_or(0);
                // Built only where a row is written: plain and select1 pay
                // nothing for it.
                let message = || {
                    Message::builder(topic.as_str(), payload.clone())
                        .key(format!("customer-{w}-{}", n % 64))
                        .build()
                };
                if v == Variant::InStatement {
                    let mut args = sqlx::postgres::PgArguments::default();
                    sqlx::Arguments::add(&mut args, &customer)?;
                    sqlx::Arguments::add(&mut args, total)?;
                    outbox
                        .enqueue_with(&mut tx, &message()?, &in_statement, args)
                        .await?;
                } else {
                    sqlx::query(&insert)
                        .bind(&customer)
                        .bind(total)
                        .execute(&mut *tx)
                        .await?;
                }
                match v {
                    Variant::Plain | Variant::InStatement => {}
                    Variant::Select1 => {
                        sqlx::query("SELECT 1").execute(&mut *tx).await?;
                    }
                    Variant::RawInsert => {
                        row(&raw, &message()?).execute(&mut *tx).await?;
                    }
                    Variant::Outbox | Variant::Notify | Variant::Wake => {
                        outbox.enqueue(&mut *tx, &message()?).await?;
                    }
                }
                tx.commit().await?;
                if v == Variant::Wake {
                    outbox.wake(&mut *conn).await?;
                }
                n += 1;
            }
            Ok::<_, crate::BoxError>(n)
        }));
    }
    let mut total = 0u64;
    for t in tasks {
        total += t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    // Let autovacuum and the WAL writer catch up between runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(total as f64 / secs)
}

/// A hand-written statement with the outbox row's columns bound as $1-$4
/// (id, topic, key, payload).
fn row<'q>(
    sql: &'q str,
    m: &Message,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(*m.id.as_uuid())
        .bind(m.topic.clone())
        .bind(m.key.clone())
        .bind(m.payload.to_vec())
}
