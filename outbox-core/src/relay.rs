//! The [`Relay`]: claims messages from a [`Store`], publishes them through a
//! [`Transport`] and settles the outcome, as an explicit state machine.
//!
//! ```text
//!             wake (notify / signal / poll)          non-empty claim
//!   ┌──────┐ ───────────────────────────▶ ┌──────────┐ ────────────▶ ┌────────────┐
//!   │ Idle │                              │ Claiming │               │ Publishing │
//!   └──────┘ ◀─────────────────────────── └──────────┘               └────────────┘
//!      ▲            empty claim              ▲    │ store error             │
//!      │                                     │    ▼                         ▼
//!      │        batch was not full      ┌────────────┐  batch full   ┌──────────┐
//!      └─────────────────────────────── │ BackingOff │ ◀──────────── │ Settling │
//!                                       └────────────┘  (→ Claiming) └──────────┘
//!   cancellation in any state ──▶ Stopping (in-flight publish finishes or its rows are released)
//! ```
//!
//! Claiming ahead: when the store supports [`Store::claim_ahead`] and a claim
//! is a full batch, the relay publishes it while the store settles the claim
//! before it and claims the next one (all three at once, the store calls on
//! tasks of their own so that the publish's encoding does not hold up their
//! round trips); a claim taken ahead releases messages of keys that failed
//! in the two claims before it. A claim taken ahead waits one publish
//! before its own: after a step that took a quarter of the lease (a slow
//! broker), it is handed back rather than risk expiring mid-publish.
//!
//! Per-key order: a claim is published in waves, the first message of each
//! key in the first wave, the second in the second, and so on (messages
//! without a key all go in the first wave). When a message fails, later
//! messages of its key in the claim are not published but released, and the
//! store keeps them behind the failed one until its retry.
//!
//! An unreachable broker: messages the transport reports
//! [unsent](Error::unsent) are deferred ([`Settlement::deferred`]): they
//! wait about as long as the outage has lasted
//! ([`RelayConfig::transport_retry`]) with later messages of their keys
//! behind them, and count no attempt.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info_span, warn, Instrument};

use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::metrics as names;
use crate::retry::RetryPolicy;
use crate::signal::Signal;
use crate::store::{
    Claim, ClaimRequest, Failure, Lease, RelayId, Retry, SettleReport, Settlement, Store,
};
use crate::transport::{missing_result, Transport};

/// How long after the last claim that found messages an idle relay keeps
/// looking every `min_poll_interval` while the store reports incoming rows
/// ([`Claim::incoming`]): long enough for the disk stalls seen on the
/// benchmark machine (up to 0.3 s), short enough that a long transaction
/// writing to the outbox costs a bounded number of looks (200 at 5 ms).
const HURRY: Duration = Duration::from_secs(1);

/// Most bytes of an error's text a relay records as a message's last
/// error: a broker's message can be long, a settle of a whole batch of
/// failures carries one per message, and a store's column may be bounded
/// (MySQL `TEXT`: 65,535 bytes, and a settle that does not fit fails every
/// time).
pub const MAX_ERROR_TEXT: usize = 2_048;

/// `e`'s text, cut to [`MAX_ERROR_TEXT`] bytes at a character boundary.
fn error_text(e: &Error) -> String {
    let mut text = e.to_string();
    if text.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Relay settings. Build them with [`RelayBuilder`]; every field has a default.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Most messages per claim (default 500; at most the store's
    /// [`Store::max_claim`]).
    pub batch_size: usize,
    /// How long a claim is held before another relay may take it (default 30 s).
    pub lease: Duration,
    /// How often an idle relay looks for work when nothing wakes it (default 1 s).
    pub poll_interval: Duration,
    /// How soon an idle relay looks again after a claim that found messages
    /// (default 5 ms; at most `poll_interval`), counted from that claim's
    /// start. Each look that finds nothing doubles the wait, up to
    /// `poll_interval`. Without NOTIFY (MySQL, SQLite, or PostgreSQL without
    /// `notify` or `wake`), messages that keep coming are so relayed within
    /// milliseconds, and a relay whose work stopped is back at
    /// `poll_interval` after a few looks (about ten from 5 ms to 1 s). Each
    /// look is a claim (PostgreSQL: 0.5-0.7 ms of server CPU when empty, on
    /// the 2-core benchmark machine): raise it to trade latency for database
    /// load, or set it to `poll_interval` for a fixed interval. Wakeups are
    /// not delayed by it. While the store reports rows on their way
    /// ([`Claim::incoming`]: PostgreSQL without LISTEN, when other
    /// transactions hold uncommitted writes to the table), empty looks keep
    /// the shortest wait for up to a second after the last claim that found
    /// messages, so that commits held up together (by a disk stall, say) are
    /// relayed as soon as they land, not a poll interval later.
    pub min_poll_interval: Duration,
    /// Failed attempts after which a transiently failing message is
    /// dead-lettered (default 10).
    pub max_attempts: u32,
    /// Backoff between attempts of a failed message.
    pub retry: RetryPolicy,
    /// Backoff while the store itself fails (claim or settle errors).
    pub store_retry: RetryPolicy,
    /// How long a message the transport could not send (its broker
    /// unreachable: [unsent](Error::unsent)) waits before it is tried
    /// again: as long as the outage has lasted so far, between `initial`
    /// and `cap` (default 250 ms and 30 s). It counts no attempt, so an
    /// outage of any length dead-letters nothing, and its row steps aside
    /// meanwhile (later messages of its key wait behind it), so that other
    /// brokers behind a router keep flowing.
    pub transport_retry: RetryPolicy,
    /// Most messages handed to the transport in one call; larger waves are
    /// published in several calls, one after another (default 1,000).
    pub max_in_flight: usize,
    /// How long a stopping relay waits for an in-flight publish before it
    /// releases the rows instead (default 10 s).
    pub shutdown_timeout: Duration,
    /// How often an idle relay refreshes the backlog gauges (default 15 s).
    pub stats_interval: Duration,
    /// Claim-publish-settle loops run side by side (default 1). Each lane
    /// claims as its own owner (`<id>/<n>`); the store keeps per-key order
    /// between lanes as between relays. A store that claims ahead already
    /// overlaps the database and the broker within one lane; more lanes pay
    /// off only when round trips, not CPU, bound the relay (a remote
    /// database or broker), and only once the store has shared its
    /// partitions between them (PostgreSQL: within a second). With more
    /// than one lane, one task waits on the store for all of them, so a
    /// PostgreSQL store counts as always waiting and `Outbox::wake` sends a
    /// NOTIFY on every call.
    pub lanes: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 500,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            min_poll_interval: Duration::from_millis(5),
            max_attempts: 10,
            retry: RetryPolicy::default(),
            store_retry: RetryPolicy::exponential(
                Duration::from_millis(100),
                2.0,
                Duration::from_secs(10),
            ),
            transport_retry: RetryPolicy::exponential(
                Duration::from_millis(250),
                2.0,
                Duration::from_secs(30),
            ),
            max_in_flight: 1000,
            shutdown_timeout: Duration::from_secs(10),
            stats_interval: Duration::from_secs(15),
            lanes: 1,
        }
    }
}

/// The longest duration a relay setting may have.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

impl RelayConfig {
    fn check(&self) -> Result<()> {
        let bad =
            |m: &str| Err(Error::permanent(ErrorKind::Config, m.to_string()).with_backend("relay"));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.lease < Duration::from_millis(10) {
            return bad("lease must be at least 10 ms");
        }
        if self.poll_interval.is_zero() {
            return bad("poll_interval must be more than zero");
        }
        if self.min_poll_interval.is_zero() {
            return bad("min_poll_interval must be more than zero");
        }
        // Longer makes no sense and would overflow clocks and SQL intervals.
        let durations = [
            ("lease", self.lease),
            ("poll_interval", self.poll_interval),
            ("min_poll_interval", self.min_poll_interval),
            ("shutdown_timeout", self.shutdown_timeout),
            ("stats_interval", self.stats_interval),
            ("retry's cap", self.retry.cap),
            ("store_retry's cap", self.store_retry.cap),
            ("transport_retry's cap", self.transport_retry.cap),
        ];
        for (name, d) in durations {
            if d > MAX_DURATION {
                return bad(&format!("{name} must be at most 7 days"));
            }
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1");
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight must be at least 1");
        }
        if self.lanes == 0 || self.lanes > 64 {
            return bad("lanes must be between 1 and 64");
        }
        Ok(())
    }
}

/// Builds a [`Relay`].
#[must_use]
pub struct RelayBuilder {
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    config: RelayConfig,
    id: Option<RelayId>,
    signal: Option<Signal>,
}

impl RelayBuilder {
    /// Replaces every setting at once.
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }
    /// Most messages per claim (at most the store's [`Store::max_claim`]).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.config.batch_size = n;
        self
    }
    /// Lease length.
    pub fn lease(mut self, d: Duration) -> Self {
        self.config.lease = d;
        self
    }
    /// Fallback poll interval.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.config.poll_interval = d;
        self
    }
    /// Shortest poll wait, after a claim that found messages (see
    /// [`RelayConfig::min_poll_interval`]).
    pub fn min_poll_interval(mut self, d: Duration) -> Self {
        self.config.min_poll_interval = d;
        self
    }
    /// Failed attempts before dead-lettering.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.config.max_attempts = n;
        self
    }
    /// Backoff between attempts of a failed message.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }
    /// Backoff while the store fails.
    pub fn store_retry(mut self, policy: RetryPolicy) -> Self {
        self.config.store_retry = policy;
        self
    }
    /// How long messages not sent (the broker unreachable) wait.
    pub fn transport_retry(mut self, policy: RetryPolicy) -> Self {
        self.config.transport_retry = policy;
        self
    }
    /// Most messages per transport call (the publish concurrency limit).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n;
        self
    }
    /// How long shutdown waits for an in-flight publish.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.config.shutdown_timeout = d;
        self
    }
    /// How often idle relays refresh backlog gauges.
    pub fn stats_interval(mut self, d: Duration) -> Self {
        self.config.stats_interval = d;
        self
    }
    /// Claim-publish-settle loops run side by side (see [`RelayConfig::lanes`]).
    pub fn lanes(mut self, n: usize) -> Self {
        self.config.lanes = n;
        self
    }
    /// The lease owner name (default: generated, `relay-<pid>-<random>`).
    pub fn id(mut self, id: RelayId) -> Self {
        self.id = Some(id);
        self
    }
    /// An in-process wakeup the application notifies after enqueuing.
    pub fn signal(mut self, signal: Signal) -> Self {
        self.signal = Some(signal);
        self
    }
    /// Checks the settings and returns the relay.
    pub fn build(self) -> Result<Relay> {
        self.config.check()?;
        Ok(Relay {
            store: self.store,
            transport: self.transport,
            config: self.config,
            id: self.id.unwrap_or_else(|| RelayId::generate("relay")),
            signal: self.signal.unwrap_or_default(),
            outage: Arc::default(),
        })
    }
}

/// The states of [`Relay::run`], named in logs and in the
/// `outbox_relay_transitions_total` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateName {
    /// Waiting for a wakeup or the poll interval.
    Idle,
    /// Asking the store for a batch.
    Claiming,
    /// Publishing a claimed batch.
    Publishing,
    /// Writing the outcome back to the store.
    Settling,
    /// Waiting after a store error.
    BackingOff,
    /// Finishing up after cancellation.
    Stopping,
}

impl StateName {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            StateName::Idle => "idle",
            StateName::Claiming => "claiming",
            StateName::Publishing => "publishing",
            StateName::Settling => "settling",
            StateName::BackingOff => "backing_off",
            StateName::Stopping => "stopping",
        }
    }
}

enum State {
    Idle,
    Claiming,
    /// Publishing a claim; `behind` is the claim before it when this one was
    /// claimed ahead (it is settled meanwhile).
    Publishing {
        claim: Claim,
        behind: Option<Published>,
    },
    Settling(Published),
    BackingOff(Duration),
    Stopping,
}

/// A published claim waiting to be settled.
struct Published {
    lease: Lease,
    settlement: Settlement,
    /// Keys it failed or held back: the two claims after it, when claimed
    /// ahead, release their messages.
    blocked: HashSet<String>,
    /// `blocked` of the claim before it.
    inherited: HashSet<String>,
    /// Whether it was a full batch (more work is likely waiting).
    full: bool,
    /// The shortest retry delay it asks for.
    soonest_retry: Option<Duration>,
    /// The first error of a message the transport could not send (its
    /// broker unreachable): the relay backs off before claiming again.
    unsent: Option<String>,
}

/// What [`Relay::publish`] did with a claim.
struct Publication {
    settlement: Settlement,
    /// The keys it failed or held back.
    blocked: HashSet<String>,
    /// The first error of a message the transport could not send.
    unsent: Option<String>,
}

/// What [`Relay::step`] did.
struct Step {
    /// The claim just published, not settled yet.
    published: Published,
    /// The settle of the claim before it, with that claim's soonest retry.
    behind: Option<(Result<RelayReport>, Option<Duration>)>,
    /// The claim taken ahead; `None` when none was asked for or the store
    /// said not now.
    ahead: Option<Result<Claim>>,
}

/// The error `drain` and `relay_once` return when the transport could not
/// reach its broker (`text`: the first such message error).
fn unsent_error(text: String) -> Error {
    Error::transient(ErrorKind::Connection, text)
        .with_backend("relay")
        .with_operation("publish")
        .unsent()
}

fn soonest_retry(settlement: &Settlement) -> Option<Duration> {
    let again = settlement.retries.iter().chain(&settlement.deferred);
    again.map(|r| r.delay).min()
}

impl State {
    fn name(&self) -> StateName {
        match self {
            State::Idle => StateName::Idle,
            State::Claiming => StateName::Claiming,
            State::Publishing { .. } => StateName::Publishing,
            State::Settling(_) => StateName::Settling,
            State::BackingOff(_) => StateName::BackingOff,
            State::Stopping => StateName::Stopping,
        }
    }
}

/// What a relay did, summed over a run or one batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Non-empty claims.
    pub batches: u64,
    /// Messages acknowledged by the broker and settled.
    pub published: u64,
    /// Messages rescheduled after a transient failure.
    pub retried: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Messages released unpublished (behind a failed key, or at shutdown).
    pub released: u64,
    /// Settled rows that had been taken over by another relay meanwhile.
    pub lease_lost: u64,
}

impl RelayReport {
    fn add(&mut self, o: &RelayReport) {
        self.batches += o.batches;
        self.published += o.published;
        self.retried += o.retried;
        self.dead_lettered += o.dead_lettered;
        self.released += o.released;
        self.lease_lost += o.lease_lost;
    }
}

/// Claims, publishes and settles outbox messages until cancelled.
///
/// One relay per process is the normal case; several relays (in one process
/// or many) cooperate through the store's leases, never through memory.
pub struct Relay {
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    config: RelayConfig,
    id: RelayId,
    signal: Signal,
    /// Since when publishes have met an unreachable broker (shared by
    /// lanes): messages not sent wait about as long as the outage has
    /// lasted.
    outage: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("id", &self.id)
            .field("store", &self.store.name())
            .field("transport", &self.transport.name())
            .field("config", &self.config)
            .finish()
    }
}

impl Relay {
    /// Starts building a relay over `store` and `transport` (often a
    /// [`Router`](crate::Router)).
    pub fn builder(store: Arc<dyn Store>, transport: Arc<dyn Transport>) -> RelayBuilder {
        RelayBuilder {
            store,
            transport,
            config: RelayConfig::default(),
            id: None,
            signal: None,
        }
    }

    /// The lease owner name.
    pub fn id(&self) -> &RelayId {
        &self.id
    }

    /// The settings.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// The most messages one claim asks for: `batch_size`, capped at the
    /// store's [`Store::max_claim`] (a store bounds a claim by what one of
    /// its statements can carry).
    pub fn batch_size(&self) -> usize {
        self.config
            .batch_size
            .min(self.store.max_claim().unwrap_or(usize::MAX))
            .max(1)
    }

    /// The in-process wakeup: notify it after committing an enqueue.
    pub fn signal(&self) -> Signal {
        self.signal.clone()
    }

    /// Runs until `cancel` fires, then stops gracefully: an in-flight publish
    /// finishes (up to the shutdown timeout) and is settled, unpublished rows
    /// are released, so nothing stays leased. Store errors never end the run;
    /// they are logged, counted and retried with backoff, as is a broker the
    /// transport cannot reach.
    pub async fn run(&self, cancel: CancellationToken) -> RelayReport {
        if self.config.lanes <= 1 {
            return self.run_lane(cancel, None).await;
        }
        let lanes: Vec<Relay> = (0..self.config.lanes)
            .map(|n| Relay {
                store: self.store.clone(),
                transport: self.transport.clone(),
                config: RelayConfig {
                    lanes: 1,
                    ..self.config.clone()
                },
                id: RelayId::new(format!("{}/{n}", self.id)),
                signal: self.signal.clone(),
                outage: self.outage.clone(),
            })
            .collect();
        // A wakeup from the store or the signal reaches one waiter, but
        // lanes own different partitions: one task waits for all of them,
        // and each lane keeps its own mark, so that it also sees a wakeup
        // that came while it was busy.
        let (woken, _) = tokio::sync::watch::channel(());
        let forward = async {
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = self.store.notified() => {}
                    _ = self.signal.notified() => {}
                }
                woken.send_replace(());
            }
        };
        let run = futures_util::future::join_all(
            lanes
                .iter()
                .map(|l| l.run_lane(cancel.clone(), Some(woken.subscribe()))),
        );
        let (reports, ()) = tokio::join!(run, forward);
        let mut total = RelayReport::default();
        for r in &reports {
            total.add(r);
        }
        total
    }

    /// One claim-publish-settle loop: the state machine.
    /// `woken`: the relay's shared wakeups when it runs several lanes (see
    /// `run`); without it the lane waits on the store and the signal.
    async fn run_lane(
        &self,
        cancel: CancellationToken,
        mut woken: Option<tokio::sync::watch::Receiver<()>>,
    ) -> RelayReport {
        let mut total = RelayReport::default();
        let mut state = State::Idle;
        let mut store_failures = 0u32;
        let mut last_stats: Option<Instant> = None;
        // When the soonest retry this relay scheduled falls due: an idle
        // relay wakes then rather than at its next poll.
        let mut next_retry: Option<Instant> = None;
        // How long Idle waits for a wakeup before it looks anyway: short
        // after work (more is likely to follow), doubled by every empty
        // claim up to the poll interval.
        let mut idle_wait = self.config.min_poll_interval;
        // When the last claim began: the wait counts from it, so that the
        // claim, publish and settle do not add to it (at 1,000 msg/s without
        // wakeups they took 3-4 ms, and the next look came 8-9 ms after the
        // one before instead of 5).
        let mut looked: Option<Instant> = None;
        // Until when empty claims that report incoming rows keep the wait
        // short: `HURRY` after the last claim that found messages, so that
        // a long transaction writing to the outbox costs a bounded number
        // of short looks.
        let mut hurry_until: Option<Instant> = None;
        let store_label = self.store.name().to_string();
        loop {
            let from = state.name();
            state = match state {
                State::Idle => {
                    if last_stats.is_none_or(|t| t.elapsed() >= self.config.stats_interval) {
                        last_stats = Some(Instant::now());
                        self.record_stats(&store_label).await;
                    }
                    let since = looked.map_or(Duration::ZERO, |t| t.elapsed());
                    let mut wait = idle_wait
                        .min(self.config.poll_interval)
                        .saturating_sub(since);
                    if let Some(due) = next_retry {
                        wait = wait.min(due.saturating_duration_since(Instant::now()));
                    }
                    let state = tokio::select! {
                        biased;
                        _ = cancel.cancelled() => State::Stopping,
                        _ = self.woken(&mut woken) => State::Claiming,
                        _ = tokio::time::sleep(wait) => State::Claiming,
                    };
                    if next_retry.is_some_and(|due| due <= Instant::now()) {
                        next_retry = None;
                    }
                    state
                }
                State::Claiming if cancel.is_cancelled() => State::Stopping,
                State::Claiming => {
                    looked = Some(Instant::now());
                    match self.claim().await {
                        Ok(claim) if claim.messages.is_empty() => {
                            store_failures = 0;
                            let hurry = hurry_until.is_some_and(|t| Instant::now() < t);
                            idle_wait = if claim.incoming && hurry {
                                // Rows on their way (commits held up by a
                                // disk stall, say): look again soon.
                                self.config.min_poll_interval
                            } else {
                                idle_wait.saturating_mul(2).min(self.config.poll_interval)
                            };
                            State::Idle
                        }
                        Ok(claim) => {
                            store_failures = 0;
                            State::Publishing {
                                claim,
                                behind: None,
                            }
                        }
                        Err(e) => {
                            store_failures += 1;
                            self.store_error("claim", &e);
                            State::BackingOff(self.config.store_retry.delay(store_failures))
                        }
                    }
                }
                State::Publishing { claim, behind } => {
                    idle_wait = self.config.min_poll_interval;
                    hurry_until = Some(Instant::now() + HURRY);
                    let started = Instant::now();
                    let step = self.step(claim, behind, &cancel).await;
                    let in_time = self.in_time(started);
                    let mut published = step.published;
                    let mut settled_behind = true;
                    if let Some((result, retry)) = step.behind {
                        match result {
                            Ok(report) => {
                                total.add(&report);
                                schedule(&mut next_retry, retry);
                            }
                            Err(_) => {
                                store_failures += 1;
                                settled_behind = false;
                            }
                        }
                    }
                    match step.ahead {
                        Some(Ok(next)) if next.messages.is_empty() => {
                            published.full = false;
                            State::Settling(published)
                        }
                        Some(Ok(next)) if settled_behind && !cancel.is_cancelled() && in_time => {
                            State::Publishing {
                                claim: next,
                                behind: Some(published),
                            }
                        }
                        Some(Ok(next)) => {
                            // Stopping, or a broker so slow that the claim
                            // could outlive its lease: hand it back
                            // unpublished.
                            if !in_time {
                                warn!(relay = %self.id, lease = ?self.config.lease,
                                    "a publish took a quarter of the lease: the claim taken ahead is handed back");
                            }
                            if let Ok(r) = self.hand_back(&next, &cancel).await {
                                total.add(&r);
                            }
                            State::Settling(published)
                        }
                        Some(Err(e)) => {
                            store_failures += 1;
                            self.store_error("claim", &e);
                            State::Settling(published)
                        }
                        None => {
                            // After a failed settle, wait before claiming again.
                            published.full &= settled_behind;
                            State::Settling(published)
                        }
                    }
                }
                State::Settling(published) => match self
                    .settle(&published.lease, &published.settlement, &cancel)
                    .await
                {
                    Ok(report) => {
                        total.add(&report);
                        schedule(&mut next_retry, published.soonest_retry);
                        if cancel.is_cancelled() {
                            State::Stopping
                        } else if published.full {
                            State::Claiming
                        } else {
                            State::Idle
                        }
                    }
                    Err(_) => {
                        store_failures += 1;
                        if cancel.is_cancelled() {
                            State::Stopping
                        } else {
                            State::BackingOff(self.config.store_retry.delay(store_failures))
                        }
                    }
                },
                State::BackingOff(delay) => {
                    tokio::select! {
                        _ = cancel.cancelled() => State::Stopping,
                        _ = tokio::time::sleep(delay) => State::Claiming,
                    }
                }
                State::Stopping => {
                    if let Err(e) = self.store.leave(&self.id).await {
                        warn!(relay = %self.id, error = %e, "could not hand back leases at shutdown");
                    }
                    if let Err(e) = self.transport.flush().await {
                        warn!(relay = %self.id, error = %e, "transport flush failed at shutdown");
                    }
                    debug!(relay = %self.id, ?total, "relay stopped");
                    return total;
                }
            };
            let to = state.name();
            if to != from {
                self.transition(from, to);
            }
        }
    }

    /// Runs the relay on a tokio task until [`RunningRelay::stop`] (or the
    /// returned handle's token) stops it.
    ///
    /// ```no_run
    /// # async fn f(relay: outbox_core::Relay) {
    /// let running = relay.spawn();
    /// // ... the application runs ...
    /// let report = running.stop().await; // graceful: nothing stays leased
    /// # }
    /// ```
    pub fn spawn(self) -> RunningRelay {
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let task = tokio::spawn(async move { self.run(token).await });
        RunningRelay { cancel, task }
    }

    /// Claims one batch, publishes it and settles it; returns what happened
    /// (an empty report when there was nothing to claim). Useful in tests and
    /// in programs that drive the relay themselves.
    pub async fn relay_once(&self) -> Result<RelayReport> {
        let claim = self.claim().await?;
        if claim.messages.is_empty() {
            return Ok(RelayReport::default());
        }
        let publication = self.publish(&claim.messages, &HashSet::new(), None).await;
        let report = self
            .settle(
                &claim.lease,
                &publication.settlement,
                &CancellationToken::new(),
            )
            .await?;
        match publication.unsent {
            Some(e) => Err(unsent_error(e)),
            None => Ok(report),
        }
    }

    /// Relays until a claim comes back empty (claiming ahead where the store
    /// can, like [`run`](Self::run)), then hands back the relay's share of the
    /// store (`Store::leave`), so that other relays need not wait for its
    /// leases to expire. Messages waiting for a retry are not waited for.
    ///
    /// It stops at the first store error, or when the transport cannot reach
    /// its broker (an error that [is unsent](Error::is_unsent)); what it
    /// published is settled first and what it had not is handed back.
    pub async fn drain(&self) -> Result<RelayReport> {
        let drained = self.drain_claims().await;
        // Hand the share back on an error too, so that the next run (a new
        // relay id, say) need not wait for these leases to expire.
        let left = self.store.leave(&self.id).await;
        let total = drained?;
        left?;
        Ok(total)
    }

    async fn drain_claims(&self) -> Result<RelayReport> {
        let never = CancellationToken::new();
        let mut total = RelayReport::default();
        let mut claim = self.claim().await?;
        let mut behind: Option<Published> = None;
        while !claim.messages.is_empty() {
            let started = Instant::now();
            let step = self.step(claim, behind.take(), &never).await;
            let in_time = self.in_time(started);
            let mut failed = None;
            if let Some((result, _)) = step.behind {
                match result {
                    Ok(r) => total.add(&r),
                    Err(e) => failed = Some(e),
                }
            }
            let published = step.published;
            match step.ahead {
                Some(Ok(next))
                    if !next.messages.is_empty()
                        && failed.is_none()
                        && published.unsent.is_none()
                        && in_time =>
                {
                    behind = Some(published);
                    claim = next;
                }
                ahead => {
                    // What was published is settled first: a store error on
                    // the hand-back must not leave it to be published again.
                    total.add(
                        &self
                            .settle(&published.lease, &published.settlement, &never)
                            .await?,
                    );
                    if let Some(Ok(next)) = &ahead {
                        total.add(&self.hand_back(next, &never).await?);
                    }
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    if let Some(Err(e)) = ahead {
                        return Err(e);
                    }
                    if let Some(e) = published.unsent {
                        return Err(unsent_error(e));
                    }
                    claim = self.claim().await?;
                }
            }
        }
        Ok(total)
    }

    /// Resolves at the next wakeup from the store or the signal.
    async fn woken(&self, shared: &mut Option<tokio::sync::watch::Receiver<()>>) {
        match shared {
            None => tokio::select! {
                _ = self.store.notified() => {}
                _ = self.signal.notified() => {}
            },
            Some(marks) => {
                if marks.changed().await.is_err() {
                    // No sender: no wakeup can come; the poll still runs.
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    fn transition(&self, from: StateName, to: StateName) {
        debug!(relay = %self.id, from = from.as_str(), to = to.as_str(), "relay state");
        metrics::counter!(names::RELAY_TRANSITIONS, "state" => to.as_str()).increment(1);
    }

    fn store_error(&self, operation: &'static str, e: &Error) {
        let store = self.store.name().to_string();
        metrics::counter!(names::STORE_ERRORS, "store" => store, "operation" => operation)
            .increment(1);
        if e.is_transient() {
            warn!(relay = %self.id, operation, error = %e, "store call failed, backing off");
        } else {
            error!(relay = %self.id, operation, error = %e, "store call failed permanently, backing off");
        }
    }

    async fn record_stats(&self, store: &str) {
        match self.store.stats().await {
            Ok(Some(s)) => {
                metrics::gauge!(names::BACKLOG, "store" => store.to_string()).set(s.backlog as f64);
                metrics::gauge!(names::DEAD, "store" => store.to_string()).set(s.dead as f64);
                metrics::gauge!(names::OLDEST_PENDING_AGE, "store" => store.to_string())
                    .set(s.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
            }
            Ok(None) => {}
            Err(e) => self.store_error("stats", &e),
        }
    }

    fn request(&self) -> ClaimRequest {
        ClaimRequest {
            owner: self.id.clone(),
            limit: self.batch_size(),
            lease: self.config.lease,
        }
    }

    /// The batch size, within what the store hands out in one claim.
    async fn claim(&self) -> Result<Claim> {
        let span = info_span!("outbox.claim", store = self.store.name(), relay = %self.id, count = tracing::field::Empty);
        let started = Instant::now();
        let claim = self
            .store
            .claim(&self.request())
            .instrument(span.clone())
            .await?;
        self.claimed(&span, started, &claim);
        Ok(claim)
    }

    /// Claims the next batch while `outstanding` is being published
    /// ([`Store::claim_ahead`]).
    async fn claim_ahead(&self, outstanding: &Lease) -> Result<Option<Claim>> {
        let span = info_span!("outbox.claim", store = self.store.name(), relay = %self.id,
            ahead = true, count = tracing::field::Empty);
        let started = Instant::now();
        let (store, request, outstanding) =
            (self.store.clone(), self.request(), outstanding.clone());
        let claim = detached(
            async move { store.claim_ahead(&request, &outstanding).await }.instrument(span.clone()),
        )
        .await?;
        if let Some(claim) = &claim {
            self.claimed(&span, started, claim);
        }
        Ok(claim)
    }

    fn claimed(&self, span: &tracing::Span, started: Instant, claim: &Claim) {
        let store = self.store.name();
        span.record("count", claim.messages.len());
        metrics::histogram!(names::CLAIM_DURATION, "store" => store.to_string())
            .record(started.elapsed().as_secs_f64());
        if !claim.messages.is_empty() {
            metrics::histogram!(names::BATCH_SIZE, "store" => store.to_string())
                .record(claim.messages.len() as f64);
        }
    }

    /// Publishes `claim` while the store settles the claim before it
    /// (`behind`) and, when `claim` is a full batch, claims the next one
    /// ahead, all three at once: the database and the broker work at the
    /// same time.
    ///
    /// A claim taken ahead may hold later messages of keys that failed in
    /// the two claims before it (the one publishing and the one settling
    /// when it was taken), so those keys are its `carry`: their messages are
    /// released. A claim that released such messages is not followed by a
    /// claim ahead: everything is settled and the next claim starts afresh,
    /// so the released rows are not overtaken again.
    async fn step(
        &self,
        claim: Claim,
        behind: Option<Published>,
        cancel: &CancellationToken,
    ) -> Step {
        let full = claim.messages.len() >= self.batch_size();
        let carry: HashSet<String> = behind
            .as_ref()
            .map(|b| b.blocked.union(&b.inherited).cloned().collect())
            .unwrap_or_default();
        let ahead = full && !carried(&claim.messages, &carry);
        let publish = self.publish(&claim.messages, &carry, Some(cancel));
        let settle = async {
            match &behind {
                Some(b) => Some(self.settle(&b.lease, &b.settlement, cancel).await),
                None => None,
            }
        };
        let next = async {
            if ahead && !cancel.is_cancelled() {
                self.claim_ahead(&claim.lease).await.transpose()
            } else {
                None
            }
        };
        // The claim ahead and the settle run on tasks of their own, in no
        // fixed order: a claim ahead must leave out the claim behind
        // whether or not its settle has finished (see `Store::claim_ahead`).
        let (publication, ahead, settled) = tokio::join!(publish, next, settle);
        let (inherited, behind_retry) = match behind {
            Some(b) => (b.blocked, b.soonest_retry),
            None => (HashSet::new(), None),
        };
        Step {
            behind: settled.map(|r| (r, behind_retry)),
            published: Published {
                soonest_retry: soonest_retry(&publication.settlement),
                lease: claim.lease,
                settlement: publication.settlement,
                blocked: publication.blocked,
                inherited,
                full,
                unsent: publication.unsent,
            },
            ahead,
        }
    }

    /// Publishes a claim in waves that keep per-key order and returns its
    /// settlement. With a cancellation token, no new wave starts after it
    /// fires and an in-flight call gets the shutdown timeout to finish.
    ///
    /// `carry` holds keys that failed (or were held back) in the claims
    /// before this one when this one was claimed ahead: their messages are
    /// released. Messages the transport could not send are released too
    /// (no attempt counted), and after a call that sent none of its
    /// messages the rest of the claim is released unpublished.
    async fn publish(
        &self,
        messages: &[Message],
        carry: &HashSet<String>,
        cancel: Option<&CancellationToken>,
    ) -> Publication {
        let mut settlement = Settlement::default();
        let carried = carried(messages, carry);
        let mut blocked: HashSet<String> = if carried {
            carry.clone()
        } else {
            HashSet::new()
        };
        let mut batch: Vec<Message> = Vec::new();
        let mut unsent: Option<String> = None;
        // Rows written by other programs may break the rules a builder
        // enforces: dead-letter those rather than hand them to a broker.
        let mut invalid: HashSet<usize> = HashSet::new();
        for (i, m) in messages.iter().enumerate() {
            if let Err(e) = m.validate(usize::MAX) {
                let e = Error::from(e)
                    .with_backend("relay")
                    .with_operation("validate");
                self.fail(m, &e, &mut settlement);
                if let Some(k) = &m.key {
                    blocked.insert(k.clone());
                }
                invalid.insert(i);
            }
        }
        for wave in waves(messages) {
            // The common case, one wave holding the whole claim, needs no copy.
            let wave_messages: &[Message] =
                if wave.len() == messages.len() && invalid.is_empty() && !carried {
                    messages
                } else {
                    batch.clear();
                    for &i in &wave {
                        let m = &messages[i];
                        if invalid.contains(&i) {
                            continue;
                        }
                        match &m.key {
                            Some(k) if blocked.contains(k) => settlement.released.push(m.id),
                            _ => batch.push(m.clone()),
                        }
                    }
                    &batch
                };
            for chunk in wave_messages.chunks(self.config.max_in_flight) {
                if cancel.is_some_and(|c| c.is_cancelled()) {
                    settlement.released.extend(chunk.iter().map(|m| m.id));
                    continue;
                }
                let Some(results) = self.publish_chunk(chunk, cancel).await else {
                    // Shutdown gave up waiting: the outcome is unknown, so the
                    // rows are published again later under the same ids.
                    settlement.released.extend(chunk.iter().map(|m| m.id));
                    continue;
                };
                let delay = self.deferral(&results);
                for (m, result) in chunk.iter().zip(results) {
                    match result {
                        Ok(()) => settlement.delivered.push(m.id),
                        Err(e) if e.is_unsent() => {
                            // Not sent, so not an attempt: it steps aside for
                            // a while (other brokers behind a router keep
                            // flowing), later messages of its key behind it.
                            if let Some(k) = &m.key {
                                blocked.insert(k.clone());
                            }
                            settlement.deferred.push(Retry {
                                id: m.id,
                                delay,
                                error: error_text(&e),
                            });
                            if unsent.is_none() {
                                unsent = Some(e.to_string());
                            }
                        }
                        Err(e) => {
                            if let Some(k) = &m.key {
                                blocked.insert(k.clone());
                            }
                            self.fail(m, &e, &mut settlement);
                        }
                    }
                }
            }
        }
        Publication {
            settlement,
            blocked,
            unsent,
        }
    }

    /// How long the messages of a publish that were not sent wait: as long
    /// as the outage has lasted so far, within `transport_retry`'s initial
    /// delay and cap (so that after the broker is back they wait at most
    /// about as long again as it was away). A publish that delivered and
    /// left nothing unsent ends the outage.
    fn deferral(&self, results: &[Result<()>]) -> Duration {
        let unsent = results
            .iter()
            .filter(|r| r.as_ref().is_err_and(Error::is_unsent))
            .count();
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        if unsent == 0 {
            if results.iter().any(Result::is_ok) {
                *outage = None;
            }
            return Duration::ZERO;
        }
        let since = *outage.get_or_insert_with(|| {
            warn!(relay = %self.id, unsent,
                "the transport cannot reach its broker: messages wait without using attempts");
            Instant::now()
        });
        drop(outage);
        metrics::counter!(names::FAILED, "topic" => "(unsent)", "transport" => self.transport.name().to_string(), "error" => "unsent")
            .increment(unsent as u64);
        let policy = &self.config.transport_retry;
        // Never zero: rows due again at once would be claimed in a loop.
        since
            .elapsed()
            .clamp(policy.initial, policy.cap.max(policy.initial))
            .max(Duration::from_millis(10))
    }

    /// Publishes one chunk; `None` when a shutdown gave up waiting for it.
    async fn publish_chunk(
        &self,
        chunk: &[Message],
        cancel: Option<&CancellationToken>,
    ) -> Option<Vec<Result<()>>> {
        let transport_name = self.transport.name().to_string();
        let topic = if chunk.iter().all(|m| m.topic == chunk[0].topic) {
            chunk[0].topic.as_str()
        } else {
            "(mixed)"
        };
        let span =
            info_span!("outbox.publish", transport = %transport_name, topic, count = chunk.len());
        let started = Instant::now();
        let call = self.transport.publish_batch(chunk).instrument(span);
        let mut results = match cancel {
            None => call.await,
            Some(cancel) => {
                tokio::pin!(call);
                tokio::select! {
                    r = &mut call => r,
                    _ = cancel.cancelled() => {
                        match tokio::time::timeout(self.config.shutdown_timeout, call).await {
                            Ok(r) => r,
                            Err(_) => {
                                warn!(relay = %self.id, count = chunk.len(), "shutdown timeout: releasing an unfinished publish");
                                return None;
                            }
                        }
                    }
                }
            }
        };
        metrics::histogram!(names::PUBLISH_DURATION, "transport" => transport_name.clone())
            .record(started.elapsed().as_secs_f64());
        if results.len() != chunk.len() {
            warn!(transport = %transport_name, expected = chunk.len(), got = results.len(),
                "transport returned the wrong number of results");
            results.truncate(chunk.len());
            while results.len() < chunk.len() {
                results.push(Err(missing_result(&transport_name)));
            }
        }
        self.count_published(chunk, &results);
        Some(results)
    }

    fn count_published(&self, chunk: &[Message], results: &[Result<()>]) {
        let now = SystemTime::now();
        let mut groups: HashMap<(&str, &str), (u64, Vec<f64>)> = HashMap::new();
        for (m, r) in chunk.iter().zip(results) {
            if r.is_ok() {
                let g = groups
                    .entry((m.topic.as_str(), self.transport.name_for(&m.topic)))
                    .or_default();
                g.0 += 1;
                g.1.push(
                    now.duration_since(m.created_at)
                        .unwrap_or_default()
                        .as_secs_f64(),
                );
            }
        }
        for ((topic, transport), (n, lat)) in groups {
            let labels = [
                ("topic", topic.to_string()),
                ("transport", transport.to_string()),
            ];
            metrics::counter!(names::PUBLISHED, &labels).increment(n);
            let h = metrics::histogram!(names::COMMIT_TO_PUBLISH, &labels);
            for l in lat {
                h.record(l);
            }
        }
    }

    fn fail(&self, m: &Message, e: &Error, settlement: &mut Settlement) {
        let failed = m.attempts.saturating_add(1);
        let transport = self.transport.name_for(&m.topic).to_string();
        let kind = if e.is_transient() {
            "transient"
        } else {
            "permanent"
        };
        metrics::counter!(names::FAILED, "topic" => m.topic.clone(), "transport" => transport.clone(), "error" => kind)
            .increment(1);
        if !e.is_transient() || failed >= self.config.max_attempts {
            metrics::counter!(names::DEAD_LETTERED, "topic" => m.topic.clone(), "transport" => transport)
                .increment(1);
            warn!(id = %m.id, topic = %m.topic, attempts = failed, error = %e, "dead-lettering message");
            settlement.dead.push(Failure {
                id: m.id,
                error: error_text(e),
            });
        } else {
            let delay = self.config.retry.delay(failed);
            debug!(id = %m.id, topic = %m.topic, attempts = failed, ?delay, error = %e, "rescheduling message");
            settlement.retries.push(Retry {
                id: m.id,
                delay,
                error: error_text(e),
            });
        }
    }

    /// Whether a claim taken ahead in the step that began at `started` is
    /// still safe to publish. It is as old as that step, and its publish
    /// will take about as long again; a store guarantees a claim only half
    /// its lease (PostgreSQL renews partition leases once half is spent).
    /// A step that took a quarter of the lease means the broker is slow
    /// enough that the claim could expire mid-publish and another relay
    /// publish its rows, and later ones of their keys, meanwhile.
    fn in_time(&self, started: Instant) -> bool {
        started.elapsed() < self.config.lease / 4
    }

    /// Hands a claim back unpublished.
    async fn hand_back(&self, claim: &Claim, cancel: &CancellationToken) -> Result<RelayReport> {
        if claim.messages.is_empty() {
            return Ok(RelayReport::default());
        }
        let released = Settlement {
            released: claim.messages.iter().map(|m| m.id).collect(),
            ..Settlement::default()
        };
        self.settle(&claim.lease, &released, cancel).await
    }

    /// Settles, retrying store errors with backoff while the lease lasts.
    async fn settle(
        &self,
        lease: &Lease,
        settlement: &Settlement,
        cancel: &CancellationToken,
    ) -> Result<RelayReport> {
        let store = self.store.name();
        let span = info_span!("outbox.settle", store, relay = %self.id, count = settlement.len(),
            delivered = settlement.delivered.len(), retried = settlement.retries.len(),
            dead = settlement.dead.len(), released = settlement.released.len());
        let mut failures = 0u32;
        // Copied once for the detached calls of every attempt.
        let call = Arc::new((lease.clone(), settlement.clone()));
        loop {
            let started = Instant::now();
            let (to, call) = (self.store.clone(), call.clone());
            match detached(
                async move { to.settle(&call.0, &call.1).await }.instrument(span.clone()),
            )
            .await
            {
                Ok(report) => {
                    metrics::histogram!(names::SETTLE_DURATION, "store" => store.to_string())
                        .record(started.elapsed().as_secs_f64());
                    return Ok(self.report(settlement, report));
                }
                Err(e) => {
                    failures += 1;
                    self.store_error("settle", &e);
                    let delay = self.config.store_retry.delay(failures);
                    let lease_left = lease
                        .expires_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    // Past the lease the rows belong to whoever claims next;
                    // give up and let them be published again (same ids).
                    if !e.is_transient()
                        || failures >= 8
                        || delay >= lease_left
                        || cancel.is_cancelled()
                    {
                        error!(relay = %self.id, error = %e, count = settlement.len(),
                            "could not settle; the rows will be claimed again when the lease expires");
                        return Err(e);
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn report(&self, settlement: &Settlement, r: SettleReport) -> RelayReport {
        let named = settlement.len() as u64;
        let lost = named.saturating_sub(r.total());
        if lost > 0 {
            metrics::counter!(names::LEASE_LOST, "store" => self.store.name().to_string())
                .increment(lost);
            warn!(relay = %self.id, lost, "lease lost: another relay took over some rows");
        }
        RelayReport {
            batches: 1,
            published: r.delivered,
            retried: r.rescheduled,
            dead_lettered: r.dead_lettered,
            released: r.released,
            lease_lost: lost,
        }
    }
}

/// A relay running on a tokio task, from [`Relay::spawn`].
#[derive(Debug)]
pub struct RunningRelay {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<RelayReport>,
}

impl RunningRelay {
    /// The token that stops the relay (to wire into a shutdown handler).
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops the relay gracefully and returns what it did. A relay task that
    /// panicked reports nothing (an empty report).
    pub async fn stop(self) -> RelayReport {
        self.cancel.cancel();
        self.task.await.unwrap_or_default()
    }
}

/// Runs a store call on a task of its own, so that its round trips go on
/// while the relay's task does a publish's CPU work (encoding a batch of
/// 1,000 takes about a millisecond, and a claim's replies waited for it).
/// Dropping the returned future aborts the task, as dropping the call
/// itself would have. A call that panics becomes a transient error (logged
/// and retried like any store error) instead of ending the relay.
async fn detached<T: Send + 'static>(
    call: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(tokio::spawn(call));
    match (&mut task.0).await {
        Ok(result) => result,
        Err(e) => Err(Error::transient(
            ErrorKind::Other,
            format!("store call did not finish: {e}"),
        )
        .with_backend("relay")),
    }
}

/// Wakes an idle relay a little after a retry it just scheduled is due (a
/// little after the store's time, so the row is due).
fn schedule(next_retry: &mut Option<Instant>, delay: Option<Duration>) {
    if let Some(delay) = delay {
        let due = Instant::now() + delay.min(MAX_DURATION) + Duration::from_millis(5);
        *next_retry = Some(next_retry.map_or(due, |t| t.min(due)));
    }
}

/// Whether a claim holds a message of a key in `carry`.
fn carried(messages: &[Message], carry: &HashSet<String>) -> bool {
    !carry.is_empty()
        && messages
            .iter()
            .any(|m| m.key.as_ref().is_some_and(|k| carry.contains(k)))
}

/// Splits a claim into waves: wave `n` holds the `n`-th message of each key;
/// messages without a key all go in the first wave. Within a wave, claim
/// order is kept.
pub(crate) fn waves(messages: &[Message]) -> Vec<Vec<usize>> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let n = match &m.key {
            None => 0,
            Some(k) => {
                let c = seen.entry(k.as_str()).or_insert(0);
                *c += 1;
                *c - 1
            }
        };
        if waves.len() <= n {
            waves.resize_with(n + 1, Vec::new);
        }
        waves[n].push(i);
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(key: Option<&str>) -> Message {
        let b = Message::builder("t", &b"x"[..]);
        match key {
            Some(k) => b.key(k),
            None => b,
        }
        .build()
        .unwrap()
    }

    #[test]
    fn waves_keep_one_message_per_key() {
        let ms = [
            msg(Some("a")),
            msg(Some("a")),
            msg(None),
            msg(Some("b")),
            msg(Some("a")),
            msg(None),
        ];
        assert_eq!(waves(&ms), vec![vec![0, 2, 3, 5], vec![1], vec![4]]);
    }

    #[test]
    #[cfg(feature = "testing")]
    fn bad_config_is_refused() {
        let store: Arc<dyn Store> = Arc::new(crate::testing::MemoryStore::new());
        let t: Arc<dyn Transport> = Arc::new(crate::testing::RecordingTransport::new());
        assert!(Relay::builder(store.clone(), t.clone())
            .batch_size(0)
            .build()
            .is_err());
        assert!(Relay::builder(store.clone(), t.clone())
            .max_attempts(0)
            .build()
            .is_err());
        assert!(Relay::builder(store, t).build().is_ok());
    }

    #[tokio::test]
    async fn a_detached_call_is_aborted_when_dropped() {
        // The call never finishes by itself; its guard reports when the
        // task is dropped, which only an abort does.
        struct Guard(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (dropped_tx, dropped) = tokio::sync::oneshot::channel();
        let call = detached(async move {
            let _guard = Guard(Some(dropped_tx));
            let _ = started_tx.send(());
            std::future::pending::<Result<()>>().await
        });
        // Drive it until the task runs, then drop it, as a relay whose
        // future is dropped drops its store calls.
        let mut call = Box::pin(call);
        tokio::select! {
            _ = &mut call => panic!("the call finished before it was dropped"),
            r = started => assert!(r.is_ok(), "the task started"),
        }
        drop(call);
        let aborted = tokio::time::timeout(Duration::from_secs(10), dropped).await;
        assert!(matches!(aborted, Ok(Ok(()))), "the task was aborted");
    }

    #[tokio::test]
    async fn a_panicking_store_call_is_a_transient_error() {
        let r: Result<()> = detached(async { panic!("store bug") }).await;
        assert!(
            matches!(&r, Err(e) if e.is_transient() && e.kind() == ErrorKind::Other),
            "{r:?}"
        );
        assert!(matches!(detached(async { Ok(7) }).await, Ok(7)));
    }
}
