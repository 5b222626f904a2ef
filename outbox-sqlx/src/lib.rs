#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code)
)]

mod error;
mod table;

#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use async_trait::async_trait;
use outbox_core::{limits, Error, Message, MessageId, Result, Signal};

pub use table::{TableName, DEFAULT_TABLE, MAX_NAME_LEN};

/// Number of virtual partitions messages are spread over (by key, or by id
/// when keyless). Relays share partitions through leases.
pub const PARTITIONS: i32 = 64;

/// The enqueue side: which table, the payload limit, and how relays are
/// woken. Cheap to clone; build one at start-up and share it.
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_core::Message;
/// use outbox_sqlx::Outbox;
///
/// let outbox = Outbox::new();
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id) VALUES (1)").execute(&mut *tx).await?;
/// outbox.enqueue(&mut *tx, &Message::json("orders.placed", &serde_json::json!({"id": 1})).key("1").build()?).await?;
/// tx.commit().await?;
/// outbox.committed(); // wake a relay in this process at once
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Outbox {
    table: TableName,
    max_payload: usize,
    notify: bool,
    signal: Option<Signal>,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            table: TableName::default(),
            max_payload: limits::DEFAULT_MAX_PAYLOAD,
            notify: false,
            signal: None,
        }
    }
}

impl Outbox {
    /// The default: table `outbox_messages`, 1 MiB payload limit, no NOTIFY.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses another table (validated: see [`TableName`]).
    pub fn table(mut self, table: &str) -> Result<Self> {
        self.table = TableName::parse(table)?;
        Ok(self)
    }

    /// Refuses payloads larger than `bytes` (default 1 MiB).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// PostgreSQL only: also send a NOTIFY in the enqueuing transaction, so
    /// relays in other processes wake at commit. It costs business
    /// throughput (NOTIFY serialises commits); off by default, relays then
    /// find work by the in-process [`Signal`] or their poll interval.
    pub fn notify(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// The in-process signal [`committed`](Self::committed) notifies; pass
    /// the same one to the relay (`Relay::builder(..).signal(..)`).
    pub fn signal(mut self, signal: Signal) -> Self {
        self.signal = Some(signal);
        self
    }

    /// The table.
    pub fn table_name(&self) -> &TableName {
        &self.table
    }

    /// Call after committing a transaction that enqueued: wakes a relay in
    /// this process at once (no-op without a signal).
    pub fn committed(&self) {
        if let Some(s) = &self.signal {
            s.notify();
        }
    }

    /// Writes `message` into the outbox on the caller's connection or
    /// transaction (`&mut *tx`), so it commits or rolls back with the
    /// business rows. Validation runs before any SQL.
    ///
    /// A transient error means: retry the whole transaction, not this
    /// call. On MySQL a deadlock has already rolled the transaction back,
    /// and a statement retried on its own would run in autocommit, without
    /// the business rows (a delayed keyed message refuses to; a plain one
    /// cannot tell).
    pub async fn enqueue<C>(&self, conn: &mut C, message: &Message) -> Result<MessageId>
    where
        C: Enqueue + ?Sized,
    {
        self.enqueue_batch(conn, std::slice::from_ref(message))
            .await
            .map(|ids| ids.into_iter().next().unwrap_or(message.id))
    }

    /// Writes many messages in one statement (per 5,000 rows or 64 MiB of
    /// payloads; on MySQL per 8 MiB, within the server's
    /// `max_allowed_packet`) on the caller's connection or transaction. All are validated before any
    /// SQL runs. In a transaction they commit together; on a connection
    /// without one, each statement commits by itself.
    pub async fn enqueue_batch<C>(
        &self,
        conn: &mut C,
        messages: &[Message],
    ) -> Result<Vec<MessageId>>
    where
        C: Enqueue + ?Sized,
    {
        for m in messages {
            self.check(m, "enqueue")?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        for chunk in statements(messages) {
            conn.insert(self, chunk).await?;
        }
        Ok(messages.iter().map(|m| m.id).collect())
    }
}

impl Outbox {
    /// Validates a message before any SQL (the payload against this
    /// outbox's limit).
    pub(crate) fn check(&self, m: &Message, operation: &'static str) -> Result<()> {
        m.validate(self.max_payload).map_err(|e| {
            Error::from(e)
                .with_backend("sqlx")
                .with_operation(operation)
        })
    }
}

/// Rows per INSERT statement (keeps bind parameter counts within every
/// engine's limit).
const ENQUEUE_CHUNK: usize = 5_000;

/// Payload bytes per INSERT statement: PostgreSQL refuses a parameter of
/// 1 GiB or more (the payloads travel as one array), SQLite a string of
/// 1 GB (the rows travel as one JSON text).
const ENQUEUE_BYTES: usize = 64 * 1024 * 1024;

/// `messages` in runs of at most [`ENQUEUE_CHUNK`] rows and, past the
/// first message of a run, [`ENQUEUE_BYTES`] of payload.
fn statements(messages: &[Message]) -> Vec<&[Message]> {
    let sizes: Vec<usize> = messages.iter().map(|m| m.payload.len()).collect();
    runs(&sizes, ENQUEUE_CHUNK, ENQUEUE_BYTES)
        .filter_map(|r| messages.get(r))
        .collect()
}

/// A claimed row that could not be decoded (written by another program):
/// the claim dead-letters it instead of failing for good.
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) struct Undecodable {
    pub(crate) seq: i64,
    pub(crate) key: Option<String>,
    /// Why, as recorded in `last_error` (at most `MAX_ERROR_TEXT` bytes).
    pub(crate) error: String,
}

/// Claimed rows decoded (with their `seq`), and those that could not be.
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) type Decoded = (Vec<(i64, Message)>, Vec<Undecodable>);

/// Decodes claimed rows with `decode`; a row it fails on is set aside with
/// its `seq` and key from `seq_key` (one whose `seq` cannot be read fails
/// the claim: it cannot even be named).
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) fn decode_rows<R>(
    rows: &[R],
    decode: impl Fn(&R) -> outbox_core::Result<(i64, Message)>,
    seq_key: impl Fn(&R) -> Option<(i64, Option<String>)>,
) -> outbox_core::Result<Decoded> {
    let mut decoded = Vec::with_capacity(rows.len());
    let mut undecodable = Vec::new();
    for row in rows {
        match decode(row) {
            Ok(d) => decoded.push(d),
            Err(e) => {
                let Some((seq, key)) = seq_key(row) else {
                    return Err(e);
                };
                let error = bounded(&format!("undecodable row: {e}")).to_string();
                tracing::warn!(seq, error = %e, "dead-lettering an undecodable outbox row");
                undecodable.push(Undecodable { seq, key, error });
            }
        }
    }
    Ok((decoded, undecodable))
}

/// A dead letter to list with its row, or `None` for one a claim buried as
/// undecodable: only SQL can show it (its error names its seq).
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) fn listable<'r, R>(
    row: &'r R,
    decoded: outbox_core::Result<(i64, Message)>,
    table: &str,
) -> Option<(&'r R, Message)> {
    match decoded {
        Ok((_, message)) => Some((row, message)),
        Err(e) => {
            tracing::warn!(table, error = %e, "an undecodable dead letter is not listed");
            None
        }
    }
}

/// Whether the row `seq` of `key` comes after an undecodable row of the
/// same key: the claim does not hand it out (it waits for the next one).
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) fn behind_undecodable(
    undecodable: &[Undecodable],
    seq: i64,
    key: &Option<String>,
) -> bool {
    undecodable
        .iter()
        .any(|u| u.key.is_some() && u.key == *key && seq > u.seq)
}

/// `text` cut to [`outbox_core::MAX_ERROR_TEXT`] bytes at a character
/// boundary (the relay cuts it already; a store called directly may get
/// more, and MySQL's `last_error` is a `TEXT` column: 65,535 bytes).
#[cfg(any(feature = "mysql", feature = "sqlite"))]
pub(crate) fn bounded(text: &str) -> &str {
    let mut end = text.len().min(outbox_core::MAX_ERROR_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or(text)
}

/// Consecutive ranges of `sizes`, each of at least one item and at most
/// `rows` items, and past its first item at most `bytes` in all.
pub(crate) fn runs(
    sizes: &[usize],
    rows: usize,
    bytes: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        let rest = sizes.get(start..).filter(|r| !r.is_empty())?;
        let mut total = 0;
        let n = rest
            .iter()
            .take(rows)
            .enumerate()
            .take_while(|(i, size)| {
                total += **size;
                *i == 0 || total <= bytes
            })
            .count();
        let run = start..start + n.max(1);
        start = run.end;
        Some(run)
    })
}

mod sealed {
    pub trait Sealed {}
}

/// A connection the outbox can enqueue on: `PgConnection`, `MySqlConnection`
/// or `SqliteConnection` (pass `&mut *tx` for a transaction). Sealed.
#[async_trait]
pub trait Enqueue: sealed::Sealed + Send {
    #[doc(hidden)]
    async fn insert(&mut self, outbox: &Outbox, messages: &[Message]) -> Result<()>;
}

/// Options of the relay-side stores, shared by every engine.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StoreConfig {
    /// The outbox table.
    pub table: TableName,
    /// Keep delivered rows (with their delivered time) instead of deleting
    /// them; purge them with `Purge::purge_delivered` or the store's purger.
    pub keep_delivered: bool,
    /// A dead letter keeps blocking later messages of its key until it is
    /// requeued or discarded.
    pub hold_dead_letters: bool,
    /// PostgreSQL: LISTEN for the enqueue side's NOTIFY (default on; it costs
    /// one connection).
    pub listen: bool,
    /// Run claims and settles with `synchronous_commit = off` (PostgreSQL;
    /// default on): a settle lost in a crash only causes a re-publish with
    /// the same id.
    pub async_commit: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            table: TableName::default(),
            keep_delivered: false,
            hold_dead_letters: false,
            listen: true,
            async_commit: true,
        }
    }
}

impl StoreConfig {
    /// Uses another table (validated: see [`TableName`]).
    pub fn table(mut self, table: &str) -> Result<Self> {
        self.table = TableName::parse(table)?;
        Ok(self)
    }
    /// Sets [`keep_delivered`](Self::keep_delivered).
    pub fn keep_delivered(mut self, on: bool) -> Self {
        self.keep_delivered = on;
        self
    }
    /// Sets [`hold_dead_letters`](Self::hold_dead_letters).
    pub fn hold_dead_letters(mut self, on: bool) -> Self {
        self.hold_dead_letters = on;
        self
    }
    /// Sets [`listen`](Self::listen).
    pub fn listen(mut self, on: bool) -> Self {
        self.listen = on;
        self
    }
    /// Sets [`async_commit`](Self::async_commit).
    pub fn async_commit(mut self, on: bool) -> Self {
        self.async_commit = on;
        self
    }
}

/// Per-owner bookkeeping shared by the partitioned stores: the unsettled claim an owner
/// holds, so that it is not handed later messages of the same keys before it
/// settles (after a failed settle, its rows stay leased until they expire).
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[derive(Default)]
pub(crate) struct Owners {
    inner: std::sync::Mutex<std::collections::HashMap<String, OwnerState>>,
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
#[derive(Default, Clone, Copy)]
pub(crate) struct OwnerState {
    /// Token and local expiry of the last claim not yet settled.
    pub outstanding: Option<(u64, tokio::time::Instant)>,
    /// When the owner last rebalanced its partitions.
    pub rebalanced: Option<tokio::time::Instant>,
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl Owners {
    pub fn get(&self, owner: &str) -> OwnerState {
        self.lock().get(owner).copied().unwrap_or_default()
    }
    pub fn update(&self, owner: &str, f: impl FnOnce(&mut OwnerState)) {
        f(self.lock().entry(owner.to_string()).or_default());
    }
    pub fn remove(&self, owner: &str) {
        self.lock().remove(owner);
    }
    /// Whether `owner` holds an unsettled, unexpired claim.
    pub fn busy(&self, owner: &str) -> bool {
        self.get(owner)
            .outstanding
            .is_some_and(|(_, until)| until > tokio::time::Instant::now())
    }
    /// Whether `owner` must rebalance before its next claim.
    pub fn rebalance_due(&self, owner: &str, lease: std::time::Duration) -> bool {
        self.get(owner)
            .rebalanced
            .is_none_or(|t| t.elapsed() >= rebalance_every(lease))
    }
    /// What a claim does before it reads: nothing more while the owner
    /// holds an unsettled claim (`false`: the claim comes back empty), and
    /// `rebalance` first when one is due.
    pub async fn ready(
        &self,
        request: &outbox_core::ClaimRequest,
        rebalance: impl std::future::Future<Output = Result<()>>,
    ) -> Result<bool> {
        let owner = request.owner.as_str();
        if self.busy(owner) {
            return Ok(false);
        }
        if self.rebalance_due(owner, request.lease) {
            rebalance.await?;
            self.update(owner, |s| s.rebalanced = Some(tokio::time::Instant::now()));
        }
        Ok(true)
    }
    /// Whether a claim ahead of `outstanding` may go now: only on top of
    /// this owner's latest, unexpired claim, and not when a rebalance is
    /// due (the relay settles first, so that partitions given up hold no
    /// unsettled rows). It leaves out the rows of the owner's outstanding
    /// claims ([`Held`]).
    pub fn may_claim_ahead(
        &self,
        request: &outbox_core::ClaimRequest,
        outstanding: &outbox_core::Lease,
    ) -> bool {
        let owner = request.owner.as_str();
        let latest = self.get(owner).outstanding.map(|(token, _)| token);
        outstanding.owner == request.owner
            && latest == Some(outstanding.token.0)
            && self.busy(owner)
            && !self.rebalance_due(owner, request.lease)
    }
    /// Records a settle: clears the outstanding claim if it is this one.
    pub fn settled(&self, owner: &str, token: u64) {
        self.update(owner, |s| {
            if s.outstanding.is_some_and(|(t, _)| t == token) {
                s.outstanding = None;
            }
        });
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, OwnerState>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The ids each outstanding claim handed out, per owner (two claims while
/// an owner claims ahead). Stores that fence settles by partition stamps
/// (every row of an owner's partitions passes it) settle only these rows.
#[cfg(any(feature = "postgres", feature = "mysql"))]
#[derive(Default)]
pub(crate) struct Held {
    inner: std::sync::Mutex<std::collections::HashMap<String, HeldClaims>>,
}

/// An owner's outstanding claims.
#[cfg(any(feature = "postgres", feature = "mysql"))]
type HeldClaims = Vec<HeldClaim>;

/// One outstanding claim.
#[cfg(any(feature = "postgres", feature = "mysql"))]
struct HeldClaim {
    /// The claim's token (its lease's `FencingToken`).
    token: u64,
    /// The lowest stamp on the partitions it read from: its settle is
    /// fenced by it (PostgreSQL).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    stamp: u64,
    /// The ids it handed out, with their `seq`s (MySQL leaves them out of
    /// a claim ahead and settles them by `seq`).
    rows: HeldRows,
}

/// A claim's ids, each with its `seq`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) type HeldRows = std::sync::Arc<std::collections::HashMap<outbox_core::MessageId, i64>>;

/// What a settle of `lease` writes: `settlement` without ids named twice
/// or not handed out by that claim (the partition stamp fences other
/// owners, this other rows of the same partitions), with the claim's rows.
/// `None` when nothing is left: the owner's claim counts as settled.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn to_settle(
    owners: &Owners,
    held: &Held,
    lease: &outbox_core::Lease,
    settlement: &outbox_core::Settlement,
) -> Option<(outbox_core::Settlement, HeldRows)> {
    let owner = lease.owner.as_str();
    let (s, rows) = if settlement.is_empty() {
        (outbox_core::Settlement::default(), HeldRows::default())
    } else {
        held.only_held(owner, lease.token.0, settlement)
    };
    if s.is_empty() {
        owners.settled(owner, lease.token.0);
        return None;
    }
    Some((s, rows))
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, HeldClaims>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the ids a claim handed out, with their `seq`s; a claim that
    /// is not ahead replaces the owner's earlier ones (those were settled or
    /// have failed).
    pub fn hold(
        &self,
        owner: &str,
        token: u64,
        stamp: u64,
        rows: std::collections::HashMap<outbox_core::MessageId, i64>,
        ahead: bool,
    ) {
        let mut held = self.lock();
        let claims = held.entry(owner.to_string()).or_default();
        if !ahead {
            claims.clear();
        }
        claims.push(HeldClaim {
            token,
            stamp,
            rows: std::sync::Arc::new(rows),
        });
    }

    /// Every id `owner`'s outstanding claims handed out.
    #[cfg(feature = "postgres")]
    pub fn outstanding(&self, owner: &str) -> Vec<outbox_core::MessageId> {
        self.lock()
            .get(owner)
            .map(|c| c.iter().flat_map(|h| h.rows.keys().copied()).collect())
            .unwrap_or_default()
    }

    /// The `seq` of every row `owner`'s outstanding claims handed out.
    #[cfg(feature = "mysql")]
    pub fn outstanding_seqs(&self, owner: &str) -> Vec<i64> {
        self.lock()
            .get(owner)
            .map(|c| c.iter().flat_map(|h| h.rows.values().copied()).collect())
            .unwrap_or_default()
    }

    /// The stamp the claim `token` of `owner` saw (see [`HeldClaim`]).
    #[cfg(feature = "postgres")]
    pub fn stamp(&self, owner: &str, token: u64) -> Option<u64> {
        self.lock()
            .get(owner)
            .and_then(|c| c.iter().find(|h| h.token == token))
            .map(|h| h.stamp)
    }

    /// `settlement` without ids named twice and without ids the claim
    /// `token` of `owner` did not hand out, and that claim's rows (each
    /// id's `seq`).
    fn only_held(
        &self,
        owner: &str,
        token: u64,
        settlement: &outbox_core::Settlement,
    ) -> (outbox_core::Settlement, HeldRows) {
        let held = self
            .lock()
            .get(owner)
            .and_then(|c| c.iter().find(|h| h.token == token))
            .map(|h| h.rows.clone())
            .unwrap_or_default();
        let mut s = dedupe(settlement);
        s.delivered.retain(|id| held.contains_key(id));
        s.retries.retain(|r| held.contains_key(&r.id));
        s.dead.retain(|f| held.contains_key(&f.id));
        s.released.retain(|id| held.contains_key(id));
        s.deferred.retain(|r| held.contains_key(&r.id));
        (s, held)
    }

    /// Forgets every claim of an owner that left.
    pub fn forget(&self, owner: &str) {
        self.lock().remove(owner);
    }

    /// Forgets a settled claim.
    pub fn release(&self, owner: &str, token: u64) {
        if let Some(c) = self.lock().get_mut(owner) {
            c.retain(|h| h.token != token);
        }
    }
}

/// How often an owner rebalances: often enough that a new relay gets its
/// share within a second.
#[cfg(any(feature = "postgres", feature = "mysql"))]
fn rebalance_every(lease: std::time::Duration) -> std::time::Duration {
    (lease / 3).clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(1),
    )
}

/// An empty claim for an owner that may not claim now.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) fn empty_claim(request: &outbox_core::ClaimRequest) -> outbox_core::Claim {
    outbox_core::Claim {
        lease: outbox_core::Lease {
            owner: request.owner.clone(),
            token: outbox_core::FencingToken(0),
            expires_at: std::time::SystemTime::now(),
        },
        messages: Vec::new(),
        incoming: false,
    }
}

/// Headers as stored (a JSON object) back into string pairs. Values that a
/// foreign producer wrote as non-strings keep their JSON text.
pub(crate) fn headers_from_json(v: serde_json::Value) -> outbox_core::Headers {
    match v {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => outbox_core::Headers::new(),
    }
}

/// Seconds as a float for SQL intervals.
#[cfg(feature = "postgres")]
pub(crate) fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// Drops ids named twice in one settlement (the first part naming an id
/// wins), so every engine applies a settlement the same way.
pub(crate) fn dedupe(s: &outbox_core::Settlement) -> outbox_core::Settlement {
    let mut seen = std::collections::HashSet::new();
    outbox_core::Settlement {
        delivered: s
            .delivered
            .iter()
            .copied()
            .filter(|id| seen.insert(*id))
            .collect(),
        retries: s
            .retries
            .iter()
            .filter(|r| seen.insert(r.id))
            .cloned()
            .collect(),
        dead: s
            .dead
            .iter()
            .filter(|f| seen.insert(f.id))
            .cloned()
            .collect(),
        released: s
            .released
            .iter()
            .copied()
            .filter(|id| seen.insert(*id))
            .collect(),
        deferred: s
            .deferred
            .iter()
            .filter(|r| seen.insert(r.id))
            .cloned()
            .collect(),
    }
}

/// The rows a settlement reschedules, each with the attempts it counts:
/// retries one, deferred messages (not sent) none.
pub(crate) fn rescheduled(s: &outbox_core::Settlement) -> Vec<(&outbox_core::Retry, i32)> {
    let retries = s.retries.iter().map(|r| (r, 1));
    retries.chain(s.deferred.iter().map(|r| (r, 0))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(n: usize, bytes: usize) -> Vec<Message> {
        (0..n)
            .map(|_| {
                Message::builder("t", vec![0u8; bytes])
                    .max_payload(bytes)
                    .build()
            })
            .collect::<std::result::Result<_, _>>()
            .unwrap_or_default()
    }

    fn runs(messages: &[Message]) -> Vec<usize> {
        statements(messages)
            .into_iter()
            .map(<[Message]>::len)
            .collect()
    }

    #[test]
    fn a_batch_goes_in_statements_of_bounded_rows_and_bytes() {
        assert_eq!(runs(&sized(12_001, 1)), [5_000, 5_000, 2_001]);
        // 1 MiB payloads: 64 to a statement.
        assert_eq!(runs(&sized(130, 1024 * 1024)), [64, 64, 2]);
        // A payload over the budget goes alone.
        let mut big = sized(1, ENQUEUE_BYTES + 1);
        big.extend(sized(2, 1));
        assert_eq!(runs(&big), [1, 2]);
        assert!(runs(&[]).is_empty());
    }
}
