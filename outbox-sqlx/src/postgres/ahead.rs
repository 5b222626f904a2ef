//! Where a claim ahead starts: above what the owner's claims before it
//! have passed.
//!
//! Why: a claim ahead must leave out the rows of the owner's outstanding
//! claims, which are still pending and lie at the start of its scan. Sent
//! as a list of ids (2,000 with a claim being published and one being
//! settled), they cost more planning than the rest of the claim (0.78 ms
//! against 0.33 ms) and the scan walked past them again (execution 1.44 ms
//! against 0.71 ms; EXPLAIN ANALYZE, 100,000 rows, PostgreSQL 15 on this
//! project's 2-core machine). So while a run of claims ahead can tell that
//! no row at or below some `seq` is still to come, the next one reads only
//! above it (`passed`), and sends the ids only of outstanding rows above it
//! (none, when the claims read a backlog).
//!
//! A claim ahead may read above `passed` when every row at or below it that
//! it could take was handed out by an earlier claim of the owner or was
//! not due then, and taking it later cannot put it behind a later message
//! of its key. After a claim ahead, `passed` becomes the lower of its last
//! row's `seq` and `complete` (or stays, if higher) when:
//!
//! 1. `complete` was known before it began: the claim floor's last step 3
//!    found that every transaction that had drawn a `seq` up to `complete`
//!    had ended (see `floor`), so the claim's snapshot sees all of those
//!    rows;
//! 2. its snapshot found `<table>_blocked` empty: no retry, held dead
//!    letter or delayed keyed message held a key back, so a row it passed
//!    over was a delayed message without a key (which orders nothing);
//! 3. it reads in `seq` order, so it took every row it could up to its
//!    last one.
//!
//! Anything that may make a row at or below `passed` due again, or hold a
//! key, starts the run over (the next claim ahead sends every outstanding
//! id and reads from the floor): a settle that does anything but deliver
//! (retries, dead letters, releases), a claim that sees a blocked key, an
//! empty claim, a failed claim or settle, a requeue. A claim ahead that
//! began before such a reset does not move `passed` (`epoch`). A plain
//! claim (the owner holds nothing unsettled; at least once per rebalance,
//! about a second, while a relay drains) reads from the floor and begins a
//! new run, which also picks up delayed rows passed over before they were
//! due. `passed` holds only on the server it was found on (its start
//! time, as for the floor). Until the floor's first step 3 (about 0.4 s
//! after a relay's first claim) and while the sequence cannot be read,
//! claims ahead send every outstanding id, as before.

use std::collections::HashMap;
use std::sync::Mutex;

use sqlx::types::chrono::{DateTime, Utc};

/// When the server was started: `passed` holds only while this stays.
type Started = DateTime<Utc>;

/// The runs of claims ahead, per owner.
#[derive(Default)]
pub(super) struct Ahead {
    runs: Mutex<HashMap<String, Run>>,
}

#[derive(Default, Clone, Copy)]
struct Run {
    /// No row at or below this `seq` is still to come for a claim ahead.
    passed: Option<(i64, Started)>,
    /// The highest `seq` this run handed out.
    top: i64,
    /// Bumped by every reset.
    epoch: u64,
}

/// What a claim ahead reads with, taken before it starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Start {
    /// Read only above this `seq` (on the server started then).
    pub passed: Option<(i64, Started)>,
    /// Whether every outstanding row lies at or below `passed` (then the
    /// claim sends no ids).
    pub covers_outstanding: bool,
    epoch: u64,
}

impl Ahead {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before a claim ahead of `owner`.
    pub(super) fn start(&self, owner: &str) -> Start {
        let runs = self.lock();
        let run = runs.get(owner).copied().unwrap_or_default();
        Start {
            passed: run.passed,
            covers_outstanding: run.passed.is_some_and(|(p, _)| run.top <= p),
            epoch: run.epoch,
        }
    }

    /// After a plain claim of `owner` that handed out rows up to `top`: a
    /// new run.
    pub(super) fn plain(&self, owner: &str, top: Option<i64>) {
        let mut runs = self.lock();
        let run = runs.entry(owner.to_string()).or_default();
        run.passed = None;
        run.top = top.unwrap_or(i64::MIN);
        run.epoch = run.epoch.wrapping_add(1);
    }

    /// After a claim ahead of `owner` that began at `start`: `top` is its
    /// last row's `seq` (none: it found nothing), `clear` whether it found
    /// `<table>_blocked` empty, `complete` the `seq` up to which every row
    /// had committed or gone before it began, on the server started then
    /// (none: not known).
    pub(super) fn claimed(
        &self,
        owner: &str,
        start: Start,
        top: Option<i64>,
        clear: bool,
        complete: Option<(i64, Started)>,
    ) {
        let mut runs = self.lock();
        let run = runs.entry(owner.to_string()).or_default();
        // Its rows are outstanding whatever else happened meanwhile.
        run.top = run.top.max(top.unwrap_or(i64::MIN));
        if run.epoch != start.epoch {
            return;
        }
        let Some(top) = top.filter(|_| clear) else {
            run.passed = None;
            run.epoch = run.epoch.wrapping_add(1);
            return;
        };
        if let Some((last, started)) = complete {
            let now = top.min(last);
            run.passed = match run.passed {
                Some((p, on)) if on == started && p >= now => Some((p, on)),
                _ => Some((now, started)),
            };
        }
    }

    /// Starts `owner`'s run over (see the module's text).
    pub(super) fn reset(&self, owner: &str) {
        if let Some(run) = self.lock().get_mut(owner) {
            run.passed = None;
            run.epoch = run.epoch.wrapping_add(1);
        }
    }

    /// Starts every owner's run over.
    pub(super) fn reset_all(&self) {
        for run in self.lock().values_mut() {
            run.passed = None;
            run.epoch = run.epoch.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Started {
        DateTime::from_timestamp(secs, 0).unwrap_or_default()
    }

    fn complete(last: i64) -> Option<(i64, Started)> {
        Some((last, at(1)))
    }

    #[test]
    fn a_run_passes_what_it_read_completely_and_sends_no_ids_once_past_them() {
        let a = Ahead::default();
        a.plain("o", Some(1000));
        let s = a.start("o");
        assert_eq!((s.passed, s.covers_outstanding), (None, false));
        a.claimed("o", s, Some(2000), true, complete(5000));
        let s = a.start("o");
        assert_eq!(s.passed, Some((2000, at(1))));
        assert!(s.covers_outstanding, "rows 1..=2000 are all at or below");
        // Rows inserted after the checks: only up to `last`.
        a.claimed("o", s, Some(3000), true, complete(2500));
        let s = a.start("o");
        assert_eq!(s.passed, Some((2500, at(1))));
        assert!(!s.covers_outstanding, "rows up to 3000 are outstanding");
        // An insert under way: `passed` stays where it was.
        a.claimed("o", s, Some(4000), true, None);
        assert_eq!(a.start("o").passed, Some((2500, at(1))));
    }

    #[test]
    fn blocked_keys_empty_claims_and_resets_start_the_run_over() {
        let a = Ahead::default();
        a.plain("o", Some(10));
        a.claimed("o", a.start("o"), Some(20), true, complete(100));
        a.claimed("o", a.start("o"), Some(30), false, complete(100));
        assert_eq!(a.start("o").passed, None, "a blocked key");
        a.claimed("o", a.start("o"), Some(40), true, complete(100));
        a.claimed("o", a.start("o"), None, true, complete(100));
        assert_eq!(a.start("o").passed, None, "an empty claim");
        a.claimed("o", a.start("o"), Some(50), true, complete(100));
        // A claim that began before a reset does not move `passed`.
        let s = a.start("o");
        a.reset("o");
        a.claimed("o", s, Some(60), true, complete(100));
        assert_eq!(a.start("o").passed, None);
        a.claimed("o", a.start("o"), Some(70), true, complete(100));
        a.reset_all();
        assert_eq!(a.start("o").passed, None);
        // Another server start: the new value, not the higher one.
        a.claimed("o", a.start("o"), Some(80), true, complete(100));
        let s = a.start("o");
        a.claimed("o", s, Some(75), true, Some((100, at(2))));
        assert_eq!(a.start("o").passed, Some((75, at(2))));
    }

    #[test]
    fn rows_of_a_claim_that_met_a_reset_or_a_blocked_key_still_count_as_outstanding() {
        let a = Ahead::default();
        a.plain("o", Some(100));
        a.claimed("o", a.start("o"), Some(200), true, complete(1000));
        let s = a.start("o");
        a.reset("o");
        a.claimed("o", s, Some(450), true, complete(1000));
        a.claimed("o", a.start("o"), Some(500), false, complete(1000));
        a.claimed("o", a.start("o"), Some(300), true, complete(1000));
        let s = a.start("o");
        assert_eq!(s.passed, Some((300, at(1))));
        assert!(!s.covers_outstanding, "rows up to 500 are outstanding");
    }
}
