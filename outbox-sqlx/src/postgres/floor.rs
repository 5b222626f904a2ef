//! The claim floor: a `seq` below which no pending row exists, so that a
//! claim starts its walk of the pending index there.
//!
//! Why: a settled row leaves a dead entry in the pending index until VACUUM
//! removes it, and a claim walks the index from its start. Draining a
//! 1,000,000-row backlog, 900,000 such entries made every claim read 2,500
//! index pages: 8.5 ms per claim against 0.4 ms after a VACUUM (PostgreSQL
//! 15), and autovacuum runs at most once a minute.
//!
//! The floor is safe because it moves only in steps that see every row
//! below it:
//!
//! 1. Read `last`, the last `seq` handed out (the identity sequence's own
//!    value; `seq` comes from nothing else).
//! 2. Then read the transactions holding a lock on the table that lets them
//!    write (`writers`). A transaction takes that lock before its insert
//!    draws a `seq`, and holds it to its end. So every row with `seq <=
//!    last` is from a transaction that had ended by step 2 or is in
//!    `writers`; any transaction that takes the lock later draws a larger
//!    `seq`.
//! 3. Once none of `writers` holds its lock any more (a later step), every
//!    row with `seq <= last` that will ever commit has committed: a new
//!    statement sees them all. The floor becomes the lowest pending `seq`
//!    up to `last`, or `last + 1` when there is none.
//!
//! Only one thing makes an older row pending again: a requeue of dead
//! letters. Each requeue counts itself in `<table>_requeues`, in its own
//! transaction, and a floor holds only for the count it was taken at; a
//! claim that sees another count reads from the start, until the next step.
//! Rows made pending again by hand (an `UPDATE` outside the store) are
//! claimed only once the store starts over (a new process). A prepared
//! (two-phase) transaction holding a write lock on the table stops the
//! floor from moving until it ends. A sequence with a cache above 1 hands
//! out values out of order, so the floor then stays off.

use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use sqlx::Row;
use tracing::debug;

use super::err;

/// How often a busy store takes a step (each step is one or two short
/// statements; the walk a floor saves grows by what is settled meanwhile).
const STEP: Duration = Duration::from_millis(200);

/// A store's floor, shared by its relays.
#[derive(Default)]
pub(super) struct Floor {
    state: std::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// No pending row has a smaller `seq`, while `requeues` is the table's
    /// count (0 until the first step: no floor).
    seq: i64,
    requeues: i64,
    /// A step under way: `last` and `writers` of steps 1 and 2.
    next: Option<Next>,
    stepped: Option<Instant>,
    /// A step is running (one at a time).
    stepping: bool,
    /// The sequence caches values: no floor.
    off: bool,
}

/// `last` and `writers` of steps 1 and 2.
pub(super) type Next = (i64, Vec<String>);

/// The statements, built once from the validated table name.
pub(super) struct FloorSql {
    /// The claims' filter (`{floor}` and `{requeues}` are the binds).
    table: String,
    last: String,
    writers: String,
    writing: String,
    lowest: String,
}

/// Lock modes a transaction may write the table under.
const WRITE_LOCKS: &str = "mode NOT IN ('AccessShareLock', 'RowShareLock')";
const THIS_DB: &str =
    "locktype = 'relation' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

impl FloorSql {
    pub(super) fn new(table: &str) -> Self {
        FloorSql {
            table: table.to_string(),
            last: format!(
                "SELECT pg_sequence_last_value(s), \
                   (SELECT seqcache FROM pg_sequence WHERE seqrelid = s) \
                 FROM (SELECT pg_get_serial_sequence('{table}', 'seq')::regclass AS s) x"
            ),
            writers: format!(
                "SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{{}}') FROM pg_locks \
                 WHERE {THIS_DB} AND relation = '{table}'::regclass AND {WRITE_LOCKS}"
            ),
            // Prepared transactions hold their locks under another name
            // (and no pid): any of them on the table counts as writing.
            writing: format!(
                "SELECT EXISTS (SELECT 1 FROM pg_locks \
                 WHERE {THIS_DB} AND relation = '{table}'::regclass AND {WRITE_LOCKS} \
                   AND (virtualtransaction = ANY($1) OR pid IS NULL))"
            ),
            // Reads on from the old floor only if no requeue came between.
            lowest: format!(
                "SELECT r.count, (SELECT min(seq) FROM {table} \
                   WHERE delivered_at IS NULL AND dead_at IS NULL AND seq <= $1 \
                     AND seq >= CASE WHEN r.count = $2 THEN $3 ELSE 0 END) \
                 FROM {table}_requeues r"
            ),
        }
    }

    /// The claims' condition on `t.seq`, with the floor and the requeue
    /// count it holds for as parameters `$floor` and `$floor + 1`.
    pub(super) fn filter(&self, floor: usize) -> String {
        format!(
            "AND t.seq >= COALESCE((SELECT ${floor}::bigint FROM {}_requeues \
                                   WHERE count = ${}), 0)",
            self.table,
            floor + 1
        )
    }
}

impl Floor {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The floor and the requeue count it holds for, to bind into a claim.
    pub(super) fn get(&self) -> (i64, i64) {
        let s = self.state();
        (s.seq, s.requeues)
    }

    /// When a step is due and none is running: the step to take (`None`:
    /// steps 1 and 2, else step 3), now marked as running. The caller runs
    /// it with [`step`](Self::step).
    pub(super) fn due(&self) -> Option<Option<Next>> {
        let mut s = self.state();
        if s.off || s.stepping || s.stepped.is_some_and(|t| t.elapsed() < STEP) {
            return None;
        }
        s.stepping = true;
        s.stepped = Some(Instant::now());
        Some(s.next.take())
    }

    /// Runs a step [`due`](Self::due) returned. A failed step starts over
    /// later; the floor stays where it was, which is safe.
    pub(super) async fn step(&self, pool: &PgPool, sql: &FloorSql, next: Option<Next>) {
        /// Ends the step however it ends (also when its task is dropped).
        struct Running<'a>(&'a Floor);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.state().stepping = false;
            }
        }
        let _running = Running(self);
        let stepped = match next {
            None => self.begin(pool, sql).await,
            Some(next) => self.finish(pool, sql, next).await,
        };
        if let Err(e) = stepped {
            debug!(error = %e, "claim floor step failed; starting over");
        }
    }

    /// Steps 1 and 2: `last`, then `writers` (in this order, as separate
    /// statements).
    async fn begin(&self, pool: &PgPool, sql: &FloorSql) -> outbox_core::Result<()> {
        let row = sqlx::query(&sql.last)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        let last: Option<i64> = row.try_get(0).map_err(err("claim"))?;
        let cache: Option<i64> = row.try_get(1).map_err(err("claim"))?;
        if cache != Some(1) {
            debug!(?cache, "the seq sequence caches values: no claim floor");
            self.state().off = true;
            return Ok(());
        }
        // Nothing handed out yet (or not readable): nothing to skip.
        let Some(last) = last else {
            return Ok(());
        };
        let writers: Vec<String> = sqlx::query_scalar(&sql.writers)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        self.state().next = Some((last, writers));
        Ok(())
    }

    /// Step 3, once no writer of step 2 is left.
    async fn finish(
        &self,
        pool: &PgPool,
        sql: &FloorSql,
        (last, writers): Next,
    ) -> outbox_core::Result<()> {
        let writing: bool = sqlx::query_scalar(&sql.writing)
            .bind(&writers)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        if writing {
            self.state().next = Some((last, writers));
            return Ok(());
        }
        let (seq, requeues) = self.get();
        let row = sqlx::query(&sql.lowest)
            .bind(last)
            .bind(requeues)
            .bind(seq)
            .fetch_optional(pool)
            .await
            .map_err(err("claim"))?;
        let Some(row) = row else {
            return Ok(());
        };
        let count: i64 = row.try_get(0).map_err(err("claim"))?;
        let lowest: Option<i64> = row.try_get(1).map_err(err("claim"))?;
        let mut s = self.state();
        s.seq = lowest.unwrap_or(last.saturating_add(1));
        s.requeues = count;
        Ok(())
    }
}
