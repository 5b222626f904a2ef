//! The claim floor: a `seq` below which no row is pending, so that a claim
//! starts its walk of the pending index there.
//!
//! Why: a settled row leaves a dead entry in the pending index until VACUUM
//! removes it, and a claim walks the index from its start. Draining a
//! 1,000,000-row backlog, 900,000 such entries made every claim read 2,500
//! index pages: 8.5 ms per claim against 0.4 ms after a VACUUM (PostgreSQL
//! 15), and autovacuum runs at most once a minute.
//!
//! A store moves its floor up in steps, on a task of their own, that see
//! every row below it:
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
//! Rows can also become pending again: a dead letter requeued (by this
//! store, by another process or by hand), a row a crash or a failover
//! brought back (settles commit asynchronously). So the floor is never
//! trusted for long: this store's own requeues drop it at once, and every
//! [`HEAL`] a step looks below it for pending rows and lowers it to the
//! lowest (safe whatever runs meanwhile), so such a row waits about that
//! long. Order per key holds meanwhile: a held dead letter still blocks its
//! key through `<table>_blocked`, and a dead letter that does not hold its
//! key has no order to keep. A step that finds the sequence went back
//! (`TRUNCATE ... RESTART IDENTITY`, a failover) starts over from 0.
//!
//! Assumed: `seq` comes only from its identity (no `OVERRIDING SYSTEM
//! VALUE`), and the sequence hands out values in order (`CACHE 1`, the
//! default). With another cache, or when the relay's role cannot read the
//! sequence, the floor stays at 0 and a warning says why. An open
//! transaction that wrote to the table (or a prepared one) keeps the floor
//! where it is until it ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use sqlx::Row;
use tracing::{debug, warn};

use super::err;

/// How often a step is due (each is one or two short statements; the walk
/// a floor saves grows by what is settled meanwhile).
const STEP: Duration = Duration::from_millis(200);

/// How often a step looks below the floor (one walk of the pending index
/// up to it, off the claims' path): about the longest a row made pending
/// again elsewhere waits below the floor.
const HEAL: Duration = Duration::from_secs(2);

/// A store's floor, shared by its relays.
#[derive(Default)]
pub(super) struct Floor {
    state: Arc<std::sync::Mutex<State>>,
}

/// A step marked as running, until dropped (also when its task is dropped
/// before it ran).
pub(super) struct Stepping(Arc<std::sync::Mutex<State>>);

impl Drop for Stepping {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).stepping = false;
    }
}

#[derive(Default)]
struct State {
    /// No row below it is pending (0: none).
    seq: i64,
    /// Bumped when the floor drops: a step 3 under way then keeps its
    /// result to itself.
    epoch: u64,
    /// Steps 1 and 2 done: `last` and `writers`.
    next: Option<Next>,
    stepped: Option<Instant>,
    healed: Option<Instant>,
    /// A step is running (one at a time).
    stepping: bool,
    /// The last step failed (warned once, until one succeeds).
    failing: bool,
    /// The sequence cannot be read or caches values: no floor.
    off: bool,
}

/// `last` and `writers` of steps 1 and 2.
type Next = (i64, Vec<String>);

/// The statements, built once from the validated table name.
pub(super) struct FloorSql {
    last: String,
    writers: String,
    writing: String,
    lowest: String,
    below: String,
}

const HOLDERS: &str = "locktype = 'relation' \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND mode = 'RowExclusiveLock'";

impl FloorSql {
    pub(super) fn new(t: &str) -> Self {
        let sequence = format!("(SELECT pg_get_serial_sequence('{t}', 'seq')::regclass AS s) x");
        let readable = "has_sequence_privilege(s, 'SELECT, USAGE')";
        FloorSql {
            last: format!(
                "SELECT {readable}, CASE WHEN {readable} THEN pg_sequence_last_value(s) END, \
                   (SELECT seqcache FROM pg_sequence WHERE seqrelid = s) FROM {sequence}"
            ),
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
            // With the sequence's value now: below `last`, it went back.
            lowest: format!(
                "SELECT (SELECT min(seq) FROM {t} WHERE delivered_at IS NULL AND dead_at IS NULL \
                   AND seq >= $2 AND seq <= $1), pg_sequence_last_value(s) FROM {sequence}"
            ),
            below: format!(
                "SELECT min(seq) FROM {t} WHERE delivered_at IS NULL AND dead_at IS NULL AND seq < $1"
            ),
        }
    }
}

impl Floor {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The floor, to bind into a claim.
    pub(super) fn get(&self) -> i64 {
        self.state().seq
    }

    /// Rows below the floor may be pending again (this store requeued
    /// them): claims read from `seq` 0 until a step 3 says otherwise.
    pub(super) fn drop_to_zero(&self) {
        let mut s = self.state();
        s.seq = 0;
        s.epoch = s.epoch.wrapping_add(1);
    }

    /// A step marked as running, when one is due and none is running; the
    /// caller runs it with [`step`](Self::step), on a task of its own.
    pub(super) fn due(&self) -> Option<Stepping> {
        let mut s = self.state();
        // The first step waits a period too: a short burst gains nothing.
        let last = *s.stepped.get_or_insert_with(Instant::now);
        if s.off || s.stepping || last.elapsed() < STEP {
            return None;
        }
        s.stepping = true;
        s.stepped = Some(Instant::now());
        Some(Stepping(self.state.clone()))
    }

    /// Runs the step [`due`](Self::due) marked. A failed step starts over
    /// later; the floor stays where it was, or drops, which is safe.
    pub(super) async fn step(&self, pool: &PgPool, sql: &FloorSql, _running: Stepping) {
        let (heal, next) = {
            let mut s = self.state();
            let heal = s.seq > 0 && s.healed.is_none_or(|t| t.elapsed() >= HEAL);
            (heal, if heal { None } else { s.next.take() })
        };
        let stepped = match next {
            _ if heal => self.heal(pool, sql).await,
            None => self.begin(pool, sql).await,
            Some(next) => self.finish(pool, sql, next).await,
        };
        let mut s = self.state();
        match stepped {
            Ok(()) => s.failing = false,
            Err(e) if !s.failing => {
                s.failing = true;
                warn!(error = %e, "a claim floor step failed; claims may read more of the pending index until one succeeds");
            }
            Err(e) => debug!(error = %e, "a claim floor step failed again"),
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
        if !readable || cache != Some(1) {
            warn!(
                readable,
                ?cache,
                "no claim floor: the relay's role cannot read the seq sequence, or the sequence \
                 caches values; claims read the pending index from its start"
            );
            let mut s = self.state();
            s.off = true;
            s.seq = 0;
            return Ok(());
        }
        let floor = self.get();
        // Nothing handed out yet, or the sequence went back: start over.
        let Some(last) = last.filter(|l| *l >= floor.saturating_sub(1)) else {
            if floor > 0 {
                self.drop_to_zero();
            }
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
        let (from, epoch) = {
            let s = self.state();
            (s.seq, s.epoch)
        };
        let row = sqlx::query(&sql.lowest)
            .bind(last)
            .bind(from)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        let lowest: Option<i64> = row.try_get(0).map_err(err("claim"))?;
        let now: Option<i64> = row.try_get(1).map_err(err("claim"))?;
        let mut s = self.state();
        if now.is_none_or(|n| n < last) {
            // The sequence went back since step 1 (a failover, a restart
            // of it): `writers` said nothing about its new values.
            s.seq = 0;
            s.epoch = s.epoch.wrapping_add(1);
        } else if s.epoch == epoch {
            s.seq = lowest.unwrap_or(last.saturating_add(1));
        }
        Ok(())
    }

    /// Lowers the floor to the lowest pending row below it, if any: rows
    /// made pending again elsewhere.
    async fn heal(&self, pool: &PgPool, sql: &FloorSql) -> outbox_core::Result<()> {
        let floor = self.get();
        let below: Option<i64> = sqlx::query_scalar(&sql.below)
            .bind(floor)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        let mut s = self.state();
        s.healed = Some(Instant::now());
        if let Some(below) = below {
            debug!(floor, below, "a row below the claim floor is pending again");
            s.seq = s.seq.min(below);
            s.epoch = s.epoch.wrapping_add(1);
        }
        Ok(())
    }
}
