//! The relay side of an outbox table: the [`Store`] trait and its optional
//! capabilities [`DeadLetters`] and [`Purge`].
//!
//! Enqueue is not here: it must run on the application's own transaction,
//! so each storage crate offers it as functions taking that transaction.

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::error::Result;
use crate::message::{Message, MessageId};

/// The name a relay claims under (lease owner). Unique per relay instance.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId(String);

impl RelayId {
    /// A fresh id: `prefix-<pid>-<random>`.
    pub fn generate(prefix: &str) -> Self {
        RelayId(format!(
            "{prefix}-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ))
    }

    /// Uses a given name (for example a pod name). The caller keeps it unique.
    pub fn new(name: impl Into<String>) -> Self {
        RelayId(name.into())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelayId({})", self.0)
    }
}

/// A number that grows with every claim. A settlement carrying a token that
/// is no longer the row's current one changes nothing: the row was taken
/// over by another claim after the lease expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The right to publish and settle the messages of one claim until it
/// expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Who holds it.
    pub owner: RelayId,
    /// The token every claimed row carries while the lease holds.
    pub token: FencingToken,
    /// When the store may hand the rows to someone else (store clock).
    pub expires_at: SystemTime,
}

/// What a relay asks a store for.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    /// The claiming relay.
    pub owner: RelayId,
    /// At most this many messages.
    pub limit: usize,
    /// For this long (measured by the store's clock).
    pub lease: Duration,
}

/// Messages handed to one relay under one lease.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The lease the messages are held under.
    pub lease: Lease,
    /// The messages, in the order they were enqueued (per key).
    pub messages: Vec<Message>,
    /// On a claim that found nothing: other transactions are writing rows
    /// this claim could not see yet (uncommitted, or waiting for their
    /// commit to be flushed). A relay without wakeups then looks again after
    /// its shortest wait instead of backing off (see
    /// [`RelayConfig::min_poll_interval`](crate::RelayConfig::min_poll_interval)).
    /// A hint: a store that cannot tell, or whose relays are woken by every
    /// commit anyway, leaves it `false`.
    pub incoming: bool,
}

/// A failed message to publish again later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Which message.
    pub id: MessageId,
    /// Not before the store's clock plus this delay.
    pub delay: Duration,
    /// The error text to record as the last error.
    pub error: String,
}

/// A failed message to dead-letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Which message.
    pub id: MessageId,
    /// The error text to record as the last error.
    pub error: String,
}

/// The outcome of a claim, applied by [`Store::settle`] in one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Acknowledged by the broker: delete them (or mark them delivered).
    pub delivered: Vec<MessageId>,
    /// Failed transiently: count the attempt, record the error, not before
    /// the delay, then pending again.
    pub retries: Vec<Retry>,
    /// Failed for good or out of attempts: count the attempt, record the
    /// error, dead-letter.
    pub dead: Vec<Failure>,
    /// Not attempted (shutdown, or behind a failed message of the same key):
    /// pending again at once, attempts unchanged.
    pub released: Vec<MessageId>,
    /// Not sent, the broker unreachable ([`Error::is_unsent`]): like
    /// `retries` (the error recorded, not before the delay, later messages
    /// of its key held back) but no attempt counted, so an outage of any
    /// length dead-letters nothing. A store that keeps no attempts
    /// separately may treat these as retries that do not count.
    ///
    /// [`Error::is_unsent`]: crate::Error::is_unsent
    pub deferred: Vec<Retry>,
}

impl Settlement {
    /// True when there is nothing to settle.
    pub fn is_empty(&self) -> bool {
        self.delivered.is_empty()
            && self.retries.is_empty()
            && self.dead.is_empty()
            && self.released.is_empty()
            && self.deferred.is_empty()
    }

    /// How many messages it settles.
    pub fn len(&self) -> usize {
        self.delivered.len()
            + self.retries.len()
            + self.dead.len()
            + self.released.len()
            + self.deferred.len()
    }
}

/// How many rows a settlement changed. Rows whose lease was lost (their
/// token is no longer the lease's) are not counted: they were not changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SettleReport {
    /// Rows settled as delivered.
    pub delivered: u64,
    /// Rows rescheduled.
    pub rescheduled: u64,
    /// Rows dead-lettered.
    pub dead_lettered: u64,
    /// Rows released.
    pub released: u64,
}

impl SettleReport {
    /// All rows changed.
    pub fn total(&self) -> u64 {
        self.delivered + self.rescheduled + self.dead_lettered + self.released
    }
}

/// What a store can say about its backlog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages not yet delivered and not dead (pending, leased or waiting
    /// for a retry).
    pub backlog: u64,
    /// Age of the oldest message in the backlog.
    pub oldest_pending_age: Option<Duration>,
    /// Dead-lettered messages.
    pub dead: u64,
}

/// The relay side of an outbox table.
///
/// # Contract
///
/// - **One claim per owner at a time**: a relay settles a claim before it
///   claims again, except through [`Store::claim_ahead`]. A store may hand nothing to an owner whose earlier claim is
///   still unsettled and unexpired (for example after a failed settle), and
///   may share the backlog between owners (partition leases), so a claim by
///   one owner can come back empty while another owner holds work.
/// - **Claim** hands out at most `limit` messages that are pending, due (their
///   not-before / next-attempt time has passed by the store's clock) and not
///   under an unexpired lease, marks them leased to the owner until
///   `now + lease` under a fresh [`FencingToken`] greater than any earlier
///   one, and returns them in enqueue order, with `attempts` as stored.
///   An empty claim is not an error.
/// - **Order per key**: a store never hands out a message while an earlier
///   message of the same key is pending and not handed out in the same claim,
///   leased, or waiting for its retry. A dead-lettered message no longer blocks
///   its key, unless the store is configured to hold the key until the dead
///   letter is requeued or discarded. Several relays may claim at once; the
///   guarantee holds across all of them.
/// - **Leases expire**: once a lease has expired its rows can be claimed again
///   (under a new token) by any relay; a relay that crashed loses nothing.
/// - **Settle** applies a [`Settlement`] atomically, touching only rows that
///   still carry the lease's token. A stale token changes nothing and is not
///   an error; the [`SettleReport`] counts what changed. Delivered rows are
///   gone from the backlog; retried rows count one attempt and become due
///   after the delay; dead rows count one attempt and leave the backlog;
///   released rows are pending at once with attempts unchanged. All of them
///   lose their lease.
/// - Errors say whether they are transient (a lost connection, a timeout) or
///   permanent; a store recovers from transient errors by itself (the next
///   call works once the server is back).
#[async_trait]
pub trait Store: Send + Sync {
    /// A short name for logs and metrics (`"postgres"`, `"memory"`).
    fn name(&self) -> &str;

    /// Claims a batch under a lease.
    async fn claim(&self, request: &ClaimRequest) -> Result<Claim>;

    /// Applies the outcome of a claim.
    async fn settle(&self, lease: &Lease, settlement: &Settlement) -> Result<SettleReport>;

    /// Resolves when the store has been told of new work (PostgreSQL
    /// LISTEN/NOTIFY, for example). It may resolve spuriously. The default
    /// never resolves: the relay falls back to polling. Must be cancel-safe.
    async fn notified(&self) {
        std::future::pending::<()>().await
    }

    /// Backlog figures for gauges, if the store can tell. The default
    /// reports nothing.
    async fn stats(&self) -> Result<Option<Stats>> {
        Ok(None)
    }

    /// Most messages one claim hands out, whatever the request's `limit`
    /// (`None`, the default: no bound). The relay asks for no more, and
    /// counts a claim of this many as a full batch (more is likely waiting).
    fn max_claim(&self) -> Option<usize> {
        None
    }

    /// Claims the next batch while `outstanding`, this owner's latest claim,
    /// is still being published (claim ahead), so that the database works
    /// while the broker does. `None` means "not now": the relay settles
    /// `outstanding` and claims normally. The default always says so.
    ///
    /// A store that claims ahead keeps the contract with two changes: the
    /// new claim excludes the messages of `outstanding` and leaves its lease
    /// valid (both settle), and it may hand out later messages of keys that
    /// have a message in `outstanding`. The relay publishes those only after
    /// the earlier ones are acknowledged and releases them when an earlier
    /// one failed. The relay settles the claim before `outstanding` at the
    /// same time, in no fixed order, so the new claim must also exclude the
    /// messages of any claim of the owner whose settle has not returned.
    async fn claim_ahead(
        &self,
        request: &ClaimRequest,
        outstanding: &Lease,
    ) -> Result<Option<Claim>> {
        let _ = (request, outstanding);
        Ok(None)
    }

    /// Called once by a relay that stops gracefully, after its last settle:
    /// a store that shares work between relays (partition leases) hands the
    /// owner's share back at once instead of letting it expire. The default
    /// does nothing.
    async fn leave(&self, owner: &RelayId) -> Result<()> {
        let _ = owner;
        Ok(())
    }
}

/// A dead-lettered message with why it died.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The message, with its attempt count.
    pub message: Message,
    /// The last error recorded.
    pub error: String,
    /// When it was dead-lettered.
    pub dead_at: SystemTime,
}

/// Which dead letters to requeue or discard.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Selector {
    /// Every dead letter.
    All,
    /// Those of one topic.
    Topic(String),
    /// These ids.
    Ids(Vec<MessageId>),
}

/// Optional capability: list, requeue and discard dead letters.
///
/// # Contract
///
/// - `list_dead` returns dead letters oldest first, at most `limit`,
///   optionally of one topic.
/// - `requeue` makes the selected dead letters pending and due at once with
///   attempts reset to zero, keeping their place in key order (their original
///   sequence); it returns how many it requeued.
/// - `discard` deletes the selected dead letters and returns how many.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Lists dead letters.
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>>;
    /// Makes dead letters pending again.
    async fn requeue(&self, selector: &Selector) -> Result<u64>;
    /// Deletes dead letters.
    async fn discard(&self, selector: &Selector) -> Result<u64>;
}

/// Optional capability: delete delivered rows kept by a retention mode.
///
/// # Contract
///
/// `purge_delivered` deletes at most `limit` rows delivered longer than
/// `older_than` ago and returns how many; callers loop while it returns
/// `limit`. A store that deletes rows on delivery returns 0.
#[async_trait]
pub trait Purge: Send + Sync {
    /// Deletes delivered rows older than `older_than`, at most `limit`.
    async fn purge_delivered(&self, older_than: Duration, limit: usize) -> Result<u64>;
}

#[async_trait]
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn max_claim(&self) -> Option<usize> {
        (**self).max_claim()
    }
    async fn claim(&self, request: &ClaimRequest) -> Result<Claim> {
        (**self).claim(request).await
    }
    async fn settle(&self, lease: &Lease, settlement: &Settlement) -> Result<SettleReport> {
        (**self).settle(lease, settlement).await
    }
    async fn claim_ahead(
        &self,
        request: &ClaimRequest,
        outstanding: &Lease,
    ) -> Result<Option<Claim>> {
        (**self).claim_ahead(request, outstanding).await
    }
    async fn notified(&self) {
        (**self).notified().await
    }
    async fn stats(&self) -> Result<Option<Stats>> {
        (**self).stats().await
    }
    async fn leave(&self, owner: &RelayId) -> Result<()> {
        (**self).leave(owner).await
    }
}
