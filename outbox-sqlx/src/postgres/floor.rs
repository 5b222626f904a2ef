//! The claim floor: a `seq` below which no row is pending, kept in
//! `<table>_floor`, so that a claim starts its walk of the pending index
//! there.
//!
//! Why: a settled row leaves a dead entry in the pending index until VACUUM
//! removes it, and a claim walks the index from its start. Draining a
//! 1,000,000-row backlog, 900,000 such entries made every claim read 2,500
//! index pages: 8.5 ms per claim against 0.4 ms after a VACUUM (PostgreSQL
//! 15), and autovacuum runs at most once a minute.
//!
//! The floor moves up only in steps that see every row below it:
//!
//! 1. Read `last`, the last `seq` handed out (the identity sequence's own
//!    value).
//! 2. Then read the transactions holding `RowExclusiveLock` on the table
//!    (`writers`). Every insert takes that lock before it draws a `seq` and
//!    holds it to its transaction's end. So every row with `seq <= last` is
//!    from a transaction that had ended by step 2 or is in `writers`, and a
//!    transaction that takes the lock later draws a larger `seq`.
//! 3. Once none of `writers` holds the lock any more (a later step), a new
//!    statement sees every row with `seq <= last` that will ever commit. The
//!    floor becomes the lowest pending `seq` up to `last`, or `last + 1`.
//!
//! It moves down with anything that makes a row pending again: a trigger on
//! `UPDATE` (a requeue, by the store or by hand) lowers it in the same
//! transaction, and step 3 moves it only if it did not change meanwhile.
//! Being a row, it is as durable as the rows it describes: after a crash
//! (settles commit asynchronously) or a failover, the floor and the rows
//! come back from the same stretch of WAL. A sequence that went back
//! (`TRUNCATE ... RESTART IDENTITY`) resets it at the next step.
//!
//! Assumed: `seq` comes only from its identity (no `OVERRIDING SYSTEM
//! VALUE`), and the sequence hands out values in order (`CACHE 1`, the
//! default; with another cache, or without the right to read the sequence,
//! the floor stays where it is and a warning says why). A prepared (two-
//! phase) transaction holding the lock keeps the floor still until it ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use sqlx::Row;
use tracing::{debug, warn};

use super::err;

/// How often a busy store takes a step (each step is one or two short
/// statements; the walk a floor saves grows by what is settled meanwhile).
const STEP: Duration = Duration::from_millis(200);

/// The schema of the floor, part of `schema()`: the table, and the trigger
/// that lowers the floor when an `UPDATE` makes rows pending.
pub(super) fn schema(t: &str, name: &str) -> String {
    format!(
        r#"-- The claim floor: no pending row has a smaller seq.
CREATE TABLE IF NOT EXISTS {t}_floor (
    one     BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    seq     BIGINT NOT NULL DEFAULT 0,
    version BIGINT NOT NULL DEFAULT 0
);
INSERT INTO {t}_floor DEFAULT VALUES ON CONFLICT DO NOTHING;
-- Rows made pending again (a requeue, also by hand) lower the floor.
CREATE OR REPLACE FUNCTION {t}_floor_lower() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE {t}_floor f SET seq = n.seq, version = f.version + 1 FROM (SELECT min(seq) AS seq FROM changed WHERE delivered_at IS NULL AND dead_at IS NULL) n WHERE n.seq < f.seq; RETURN NULL; END $$;
DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = '{name}_floor' AND tgrelid = '{t}'::regclass) THEN CREATE TRIGGER {name}_floor AFTER UPDATE ON {t} REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION {t}_floor_lower(); END IF; END $$;
"#
    )
}

/// The claims' condition on `t.seq`.
pub(super) fn filter(t: &str) -> String {
    format!("AND t.seq >= COALESCE((SELECT seq FROM {t}_floor), 0)")
}

/// A store's stepping state, shared by its relays (the floor itself is in
/// the database).
#[derive(Default)]
pub(super) struct Floor {
    state: std::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Steps 1 and 2 done: `last` and `writers`.
    next: Option<Next>,
    stepped: Option<Instant>,
    /// A step is running (one at a time).
    stepping: bool,
    /// The sequence cannot be read or caches values: no more steps.
    off: bool,
}

/// `last` and `writers` of steps 1 and 2.
type Next = (i64, Vec<String>);

/// The statements, built once from the validated table name.
pub(super) struct FloorSql {
    get: String,
    last: String,
    reset: String,
    writers: String,
    writing: String,
    raise: String,
}

const HOLDERS: &str = "locktype = 'relation' \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND mode = 'RowExclusiveLock'";

impl FloorSql {
    pub(super) fn new(t: &str) -> Self {
        let readable = "has_sequence_privilege(s, 'SELECT, USAGE')";
        FloorSql {
            get: format!("SELECT seq FROM {t}_floor"),
            last: format!(
                "SELECT {readable}, CASE WHEN {readable} THEN pg_sequence_last_value(s) END, \
                   (SELECT seqcache FROM pg_sequence WHERE seqrelid = s), \
                   (SELECT seq FROM {t}_floor) \
                 FROM (SELECT pg_get_serial_sequence('{t}', 'seq')::regclass AS s) x"
            ),
            reset: format!("UPDATE {t}_floor SET seq = 0, version = version + 1 WHERE seq > 0"),
            writers: format!(
                "SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{{}}') FROM pg_locks \
                 WHERE {HOLDERS} AND relation = '{t}'::regclass"
            ),
            // Prepared transactions hold their locks under another name
            // (and no pid): any of them on the table counts as writing.
            writing: format!(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE {HOLDERS} \
                   AND relation = '{t}'::regclass AND (virtualtransaction = ANY($1) OR pid IS NULL))"
            ),
            // Only if the floor did not change since this statement's
            // snapshot (a requeue lowered it): the re-check after waiting
            // for its row lock sees the new version.
            raise: format!(
                "UPDATE {t}_floor f SET seq = x.seq, version = f.version + 1 \
                 FROM (SELECT coalesce((SELECT min(seq) FROM {t} \
                         WHERE delivered_at IS NULL AND dead_at IS NULL \
                           AND seq >= o.seq AND seq <= $1), $1 + 1) AS seq, o.version \
                       FROM {t}_floor o) x \
                 WHERE f.version = x.version AND x.seq > f.seq"
            ),
        }
    }

    /// The floor now.
    pub(super) async fn get(&self, pool: &PgPool) -> outbox_core::Result<i64> {
        let floor: Option<i64> = sqlx::query_scalar(&self.get)
            .fetch_optional(pool)
            .await
            .map_err(err("claim"))?;
        Ok(floor.unwrap_or(0))
    }
}

/// A step to take, marked as running until dropped.
pub(super) struct Step {
    floor: Arc<Floor>,
    next: Option<Next>,
}

impl Drop for Step {
    fn drop(&mut self) {
        self.floor.state().stepping = false;
    }
}

impl Floor {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next step, when one is due and none is running.
    pub(super) fn due(self: &Arc<Self>) -> Option<Step> {
        let mut s = self.state();
        if s.off || s.stepping || s.stepped.is_some_and(|t| t.elapsed() < STEP) {
            return None;
        }
        s.stepping = true;
        s.stepped = Some(Instant::now());
        let next = s.next.take();
        Some(Step {
            floor: self.clone(),
            next,
        })
    }
}

impl Step {
    /// Runs the step. A failed step starts over later; the floor stays
    /// where it was, which is safe.
    pub(super) async fn run(mut self, pool: &PgPool, sql: &FloorSql) {
        let stepped = match self.next.take() {
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
        let readable: bool = row.try_get(0).map_err(err("claim"))?;
        let last: Option<i64> = row.try_get(1).map_err(err("claim"))?;
        let cache: Option<i64> = row.try_get(2).map_err(err("claim"))?;
        let floor: Option<i64> = row.try_get(3).map_err(err("claim"))?;
        if !readable || cache != Some(1) {
            warn!(
                readable,
                ?cache,
                "the claim floor stays where it is: the relay's role cannot read the seq \
                 sequence, or the sequence caches values; claims read the pending index \
                 from further down"
            );
            self.floor.state().off = true;
            return Ok(());
        }
        // Nothing handed out yet, or the sequence went back: start over.
        let Some(last) = last.filter(|l| *l >= floor.unwrap_or(0).saturating_sub(1)) else {
            sqlx::query(&sql.reset)
                .execute(pool)
                .await
                .map_err(err("claim"))?;
            return Ok(());
        };
        let writers: Vec<String> = sqlx::query_scalar(&sql.writers)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        self.floor.state().next = Some((last, writers));
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
            self.floor.state().next = Some((last, writers));
            return Ok(());
        }
        sqlx::query(&sql.raise)
            .bind(last)
            .execute(pool)
            .await
            .map_err(err("claim"))?;
        Ok(())
    }
}
