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
//!    lowest pending `seq` up to `last` (or `last + 1`) is the new floor,
//! 4. once the WAL up to that statement is flushed (a later step): a crash
//!    the server recovers from in place, which loses what was not flushed
//!    (settles commit asynchronously), brings back no row below it.
//!
//! The floor holds only on the server it was found on: it carries the
//! server's start time (`pg_postmaster_start_time()`), and a claim on a
//! server started at another time (after a restart, or on another server
//! after a failover, which may lack the end of the WAL) reads from the
//! start of the index until a step finds a floor there.
//!
//! Rows can also become pending again on a running server: a dead letter
//! requeued (by this store, by another process or by hand). This store's
//! own requeues drop the floor at once; every [`HEAL`] a step looks below
//! the floor for pending rows, lowers it to the lowest (safe whatever runs
//! meanwhile) and wakes the relay. A held dead letter blocks its key
//! through `<table>_blocked` meanwhile; one that does not hold its key has
//! no order to keep (later messages of its key may already be out).
//!
//! Assumed: `seq` comes only from its identity (no `OVERRIDING SYSTEM
//! VALUE`, no `COPY` or restore of `seq` into a table relays are reading),
//! the sequence is not restarted under running relays (a step that sees it
//! went back starts over, but claims until then may skip rows), and it
//! hands out values in order (`CACHE 1`, the default). With another cache,
//! or when the relay's role cannot read the sequence, there is no floor
//! and a warning says why. A pending row that is not due yet (a far
//! `not_before`, a retry's backoff, a key held behind a dead letter) and an
//! open transaction that has written to the table keep the floor at or
//! below them, and claims walk what lies between.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use sqlx::types::chrono::{DateTime, Utc};
use sqlx::Row;
use tracing::{debug, warn};

use super::err;

/// How often a step is due (each is one or two short statements; the walk
/// a floor saves grows by what is settled meanwhile).
const STEP: Duration = Duration::from_millis(200);

/// How often a step looks below the floor (one walk of the pending index
/// up to it, off the claims' path): about the longest a row made pending
/// again elsewhere waits below the floor while relays are busy (an idle
/// relay takes its next step after its next claim).
const HEAL: Duration = Duration::from_secs(2);

/// A step that takes longer is dropped (a connection that never answers
/// would otherwise stop all later steps), and the floor with it.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// When the server was started: a floor holds only as long as this stays.
type Started = DateTime<Utc>;

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
    /// No row below this `seq` is pending while the server runs since
    /// then (none: claims read from the start).
    floor: Option<(i64, Started)>,
    /// Every row with a `seq` up to this one had committed or gone when
    /// the last step 3 found no writer left (`last`): a statement begun
    /// since sees all of them (claims ahead, see `ahead`).
    complete: Option<(i64, Started)>,
    /// Bumped when the floor drops: a step 3 under way then keeps its
    /// result to itself.
    epoch: u64,
    /// Steps 1 and 2 done: `last` and `writers`.
    next: Option<Next>,
    /// Step 3 done: the new floor, once the WAL is flushed up to this
    /// position (and if the floor did not drop meanwhile, `epoch`).
    raise: Option<Raise>,
    stepped: Option<Instant>,
    healed: Option<Instant>,
    /// A step is running (one at a time).
    stepping: bool,
    /// The last step failed (warned once, until one succeeds).
    failing: bool,
    /// The sequence cannot be read or caches values: no floor.
    off: bool,
}

/// `last`, `writers` and the server's start time of steps 1 and 2.
type Next = (i64, Vec<String>, Started);

/// Step 3's floor, its server's start time, the WAL position to wait for
/// and the `epoch` it was found in.
type Raise = ((i64, Started), i64, u64);

/// The statements, built once from the validated table name.
pub(super) struct FloorSql {
    last: String,
    writers: String,
    writing: String,
    lowest: String,
    below: String,
    flushed: String,
}

/// The rows of `pg_locks` that mean a transaction writes to a table (every
/// insert takes this lock first, and holds it to the end of its commit).
pub(super) const HOLDERS: &str = "locktype = 'relation' \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND mode = 'RowExclusiveLock'";

/// The claims' condition on `t.seq`: the floor as parameter `$at`, the
/// server start time it holds for as `$at + 1` (NULL for none).
pub(super) fn filter(at: usize) -> String {
    format!(
        "AND t.seq >= CASE WHEN pg_postmaster_start_time() = ${} THEN ${at} \
           ELSE -9223372036854775807 - 1 END",
        at + 1
    )
}

impl FloorSql {
    pub(super) fn new(t: &str) -> Self {
        let sequence = format!("(SELECT pg_get_serial_sequence('{t}', 'seq')::regclass AS s) x");
        let readable = "has_sequence_privilege(s, 'SELECT, USAGE')";
        FloorSql {
            last: format!(
                "SELECT {readable}, CASE WHEN {readable} THEN pg_sequence_last_value(s) END, \
                   (SELECT seqcache FROM pg_sequence WHERE seqrelid = s), \
                   pg_postmaster_start_time() FROM {sequence}"
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
                   AND seq >= $2 AND seq <= $1), pg_sequence_last_value(s), \
                   pg_postmaster_start_time(), \
                   (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint FROM {sequence}"
            ),
            flushed: "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint, \
                      pg_postmaster_start_time()"
                .to_string(),
            below: format!(
                "SELECT (SELECT min(seq) FROM {t} WHERE delivered_at IS NULL AND dead_at IS NULL \
                   AND seq < $1), pg_postmaster_start_time()"
            ),
        }
    }
}

impl State {
    /// Lowers the floor to `seq` (none: no floor) and voids any step 3
    /// under way.
    fn lower(&mut self, seq: Option<i64>) {
        self.floor = match (self.floor, seq) {
            (Some((f, on)), Some(seq)) => Some((f.min(seq), on)),
            _ => None,
        };
        self.epoch = self.epoch.wrapping_add(1);
    }
}

impl Floor {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The floor and the server start time it holds for.
    pub(super) fn get(&self) -> Option<(i64, Started)> {
        self.state().floor
    }

    /// The `seq` up to which every row has committed or gone, and the
    /// server start time it holds for (see `State::complete`).
    pub(super) fn complete(&self) -> Option<(i64, Started)> {
        self.state().complete
    }

    /// Rows below the floor may be pending again (this store requeued
    /// them): claims read from the start until a step 3 finds a floor.
    pub(super) fn clear(&self) {
        self.state().lower(None);
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
    /// Returns true when the floor went down: rows below it may wait.
    pub(super) async fn step(&self, pool: &PgPool, sql: &FloorSql, _running: Stepping) -> bool {
        let (heal, raise, next, epoch) = {
            let mut s = self.state();
            let heal = s.floor.is_some() && s.healed.is_none_or(|t| t.elapsed() >= HEAL);
            let raise = if heal { None } else { s.raise.take() };
            let next = if heal || raise.is_some() {
                None
            } else {
                s.next.take()
            };
            (heal, raise, next, s.epoch)
        };
        let step = async {
            match (raise, next) {
                _ if heal => self.heal(pool, sql).await,
                (Some(raise), _) => self.confirm(pool, sql, raise).await,
                (None, None) => self.begin(pool, sql).await,
                (None, Some(next)) => self.finish(pool, sql, next).await,
            }
        };
        let stepped = tokio::time::timeout(STEP_TIMEOUT, step)
            .await
            .unwrap_or_else(|_| {
                Err(outbox_core::Error::transient(
                    outbox_core::ErrorKind::Timeout,
                    format!("a claim floor step took over {STEP_TIMEOUT:?}"),
                ))
            });
        if heal && stepped.is_err() {
            // Rows pending below the floor would wait for a heal that does
            // not come: no floor until one succeeds.
            self.clear();
        }
        let mut s = self.state();
        let lowered = s.epoch != epoch;
        match stepped {
            Ok(()) => s.failing = false,
            Err(e) if !s.failing => {
                s.failing = true;
                warn!(error = %e, "a claim floor step failed; claims may read more of the pending index until one succeeds");
            }
            Err(e) => debug!(error = %e, "a claim floor step failed again"),
        }
        lowered
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
        let started: Started = row.try_get(3).map_err(err("claim"))?;
        if !readable || cache != Some(1) {
            warn!(
                readable,
                ?cache,
                "no claim floor: the relay's role cannot read the seq sequence, or the sequence \
                 caches values; claims read the pending index from its start"
            );
            let mut s = self.state();
            s.off = true;
            s.lower(None);
            s.complete = None;
            return Ok(());
        }
        if self.get().is_some_and(|(_, on)| on != started) {
            // Another server, or this one restarted: start over.
            self.clear();
        }
        {
            let mut s = self.state();
            if s.complete
                .is_some_and(|(c, on)| on != started || last.is_none_or(|l| l < c))
            {
                // Another server, or the sequence went back.
                s.complete = None;
            }
        }
        let Some(last) = last else {
            return Ok(());
        };
        match self.get() {
            // The sequence went back: start over.
            Some((seq, _)) if last < seq.saturating_sub(1) => {
                self.clear();
                return Ok(());
            }
            // Nothing handed out since the floor was found.
            Some((seq, _)) if last.checked_add(1) == Some(seq) => return Ok(()),
            _ => {}
        }
        let writers: Vec<String> = sqlx::query_scalar(&sql.writers)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        self.state().next = Some((last, writers, started));
        Ok(())
    }

    /// Step 3, once no writer of step 2 is left.
    async fn finish(
        &self,
        pool: &PgPool,
        sql: &FloorSql,
        (last, writers, started): Next,
    ) -> outbox_core::Result<()> {
        let writing: bool = sqlx::query_scalar(&sql.writing)
            .bind(&writers)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        if writing {
            self.state().next = Some((last, writers, started));
            return Ok(());
        }
        let (from, epoch) = {
            let s = self.state();
            (s.floor.map_or(i64::MIN, |(seq, _)| seq), s.epoch)
        };
        let row = sqlx::query(&sql.lowest)
            .bind(last)
            .bind(from)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        let lowest: Option<i64> = row.try_get(0).map_err(err("claim"))?;
        let now: Option<i64> = row.try_get(1).map_err(err("claim"))?;
        let on: Started = row.try_get(2).map_err(err("claim"))?;
        let wal: i64 = row.try_get(3).map_err(err("claim"))?;
        let mut s = self.state();
        if on != started || now.is_none_or(|n| n < last) {
            // Another server, or the sequence went back since step 1:
            // `writers` said nothing about its new values.
            s.lower(None);
            s.complete = None;
        } else {
            // `writing` found none of `writers` left.
            s.complete = Some((last, started));
            let floor = lowest.unwrap_or(last.saturating_add(1));
            s.raise = Some(((floor, started), wal, epoch));
        }
        Ok(())
    }

    /// Step 4: the new floor once the WAL its step 3 read is flushed.
    async fn confirm(
        &self,
        pool: &PgPool,
        sql: &FloorSql,
        (floor, wal, epoch): Raise,
    ) -> outbox_core::Result<()> {
        let row = sqlx::query(&sql.flushed)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        let flushed: i64 = row.try_get(0).map_err(err("claim"))?;
        let on: Started = row.try_get(1).map_err(err("claim"))?;
        let mut s = self.state();
        if on != floor.1 || s.epoch != epoch {
            // Another server, or the floor dropped meanwhile: start over.
        } else if flushed >= wal {
            s.floor = Some(floor);
        } else {
            s.raise = Some((floor, wal, epoch));
        }
        Ok(())
    }

    /// Lowers the floor to the lowest pending row below it, if any: rows
    /// made pending again elsewhere.
    async fn heal(&self, pool: &PgPool, sql: &FloorSql) -> outbox_core::Result<()> {
        let Some((floor, started)) = self.get() else {
            return Ok(());
        };
        let row = sqlx::query(&sql.below)
            .bind(floor)
            .fetch_one(pool)
            .await
            .map_err(err("claim"))?;
        let below: Option<i64> = row.try_get(0).map_err(err("claim"))?;
        let on: Started = row.try_get(1).map_err(err("claim"))?;
        let mut s = self.state();
        s.healed = Some(Instant::now());
        if on != started {
            s.lower(None);
        } else if let Some(below) = below {
            debug!(floor, below, "a row below the claim floor is pending again");
            s.lower(Some(below));
        }
        Ok(())
    }
}
