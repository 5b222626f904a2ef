//! [`MemoryStore`]: an in-memory [`Store`] that keeps the whole contract.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::error::{Error, ErrorKind, Result};
use crate::limits;
use crate::message::{Message, MessageId};
use crate::store::{
    Claim, ClaimRequest, DeadLetter, DeadLetters, FencingToken, Lease, Purge, RelayId, Selector,
    SettleReport, Settlement, Stats, Store,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Pending,
    Dead,
    Delivered,
}

#[derive(Clone, Debug)]
struct Row {
    message: Message,
    status: Status,
    due: Option<SystemTime>,
    lease: Option<(FencingToken, RelayId, SystemTime)>,
    last_error: Option<String>,
    finished_at: Option<SystemTime>,
}

#[derive(Default)]
struct Inner {
    rows: BTreeMap<u64, Row>,
    by_id: HashMap<MessageId, u64>,
    next_seq: u64,
    next_token: u64,
    /// Non-empty claims taken ahead.
    ahead: u64,
}

/// Options for [`MemoryStore`].
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct StoreOptions {
    /// A dead letter keeps blocking its key until requeued or discarded.
    pub hold_dead_letters: bool,
    /// Keep delivered rows (for [`Purge`]) instead of deleting them.
    pub keep_delivered: bool,
    /// Support [`Store::claim_ahead`] (the relay then pipelines).
    pub claim_ahead: bool,
}

impl StoreOptions {
    /// Sets `hold_dead_letters`.
    pub fn hold_dead_letters(mut self, yes: bool) -> Self {
        self.hold_dead_letters = yes;
        self
    }
    /// Sets `keep_delivered`.
    pub fn keep_delivered(mut self, yes: bool) -> Self {
        self.keep_delivered = yes;
        self
    }
    /// Sets `claim_ahead`.
    pub fn claim_ahead(mut self, yes: bool) -> Self {
        self.claim_ahead = yes;
        self
    }
}

/// What the store holds about one message, for assertions in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowInfo {
    /// Failed attempts so far.
    pub attempts: u32,
    /// Whether it is pending (or leased / retrying).
    pub pending: bool,
    /// Whether it is dead-lettered.
    pub dead: bool,
    /// Whether it is delivered and kept.
    pub delivered: bool,
    /// Whether an unexpired lease holds it.
    pub leased: bool,
    /// The last recorded error.
    pub last_error: Option<String>,
}

/// An in-memory store honouring leases, fencing, not-before times,
/// retries, dead letters and order per key.
///
/// Its clock is tokio's (`tokio::time::Instant`) mapped onto wall time, so
/// tests on a paused tokio clock move leases and retry times forward with
/// `tokio::time::advance` or by sleeping.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    notify: Notify,
    options: StoreOptions,
    base_wall: SystemTime,
    base_tick: tokio::time::Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_options(StoreOptions::default())
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("options", &self.options)
            .finish()
    }
}

impl MemoryStore {
    fn take(&self, request: &ClaimRequest, ahead_of: Option<&Lease>) -> Claim {
        let now = self.now();
        let mut inner = self.lock();
        let token = FencingToken(inner.next_token);
        inner.next_token += 1;
        let expires_at = now + request.lease;
        let mut blocked: HashSet<String> = HashSet::new();
        let mut messages = Vec::new();
        for row in inner.rows.values_mut() {
            if messages.len() >= request.limit {
                break;
            }
            let key = row.message.key.as_deref();
            let takeable = match row.status {
                Status::Delivered => continue,
                Status::Dead => {
                    if self.options.hold_dead_letters {
                        if let Some(k) = key {
                            blocked.insert(k.to_string());
                        }
                    }
                    continue;
                }
                Status::Pending => {
                    // Claiming ahead: rows of the owner's outstanding
                    // claims are skipped but do not hold their keys back.
                    if ahead_of.is_some_and(|l| {
                        row.lease
                            .as_ref()
                            .is_some_and(|(_, o, until)| *o == l.owner && *until > now)
                    }) {
                        continue;
                    }
                    let leased = row.lease.as_ref().is_some_and(|l| l.2 > now);
                    let due = row.due.is_none_or(|t| t <= now);
                    !leased && due && !key.is_some_and(|k| blocked.contains(k))
                }
            };
            if !takeable {
                if let Some(k) = key {
                    blocked.insert(k.to_string());
                }
                continue;
            }
            row.lease = Some((token, request.owner.clone(), expires_at));
            messages.push(row.message.clone());
        }
        Claim {
            lease: Lease {
                owner: request.owner.clone(),
                token,
                expires_at,
            },
            messages,
            incoming: false,
        }
    }

    /// An empty store with default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with the given options.
    pub fn with_options(options: StoreOptions) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner {
                next_seq: 1,
                next_token: 1,
                ..Inner::default()
            }),
            notify: Notify::new(),
            options,
            base_wall: SystemTime::now(),
            base_tick: tokio::time::Instant::now(),
        }
    }

    /// The store's clock.
    pub fn now(&self) -> SystemTime {
        self.base_wall + self.base_tick.elapsed()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data behind (every
        // change is made after all checks), so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enqueues messages as one committed transaction: all or nothing.
    pub fn enqueue(&self, messages: impl IntoIterator<Item = Message>) -> Result<Vec<MessageId>> {
        let messages: Vec<Message> = messages.into_iter().collect();
        let mut inner = self.lock();
        let mut ids = HashSet::new();
        for m in &messages {
            m.validate(limits::DEFAULT_MAX_PAYLOAD).map_err(|e| {
                Error::from(e)
                    .with_backend("memory")
                    .with_operation("enqueue")
            })?;
            if inner.by_id.contains_key(&m.id) || !ids.insert(m.id) {
                return Err(Error::permanent(
                    ErrorKind::InvalidInput,
                    format!("message id {} is already in the outbox", m.id),
                )
                .with_backend("memory")
                .with_operation("enqueue"));
            }
        }
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            let seq = inner.next_seq;
            inner.next_seq += 1;
            inner.by_id.insert(m.id, seq);
            out.push(m.id);
            let due = m.not_before;
            inner.rows.insert(
                seq,
                Row {
                    message: Message { attempts: 0, ..m },
                    status: Status::Pending,
                    due,
                    lease: None,
                    last_error: None,
                    finished_at: None,
                },
            );
        }
        drop(inner);
        self.notify.notify_one();
        Ok(out)
    }

    /// What the store holds about `id`.
    pub fn row(&self, id: &MessageId) -> Option<RowInfo> {
        let now = self.now();
        let inner = self.lock();
        let row = inner.by_id.get(id).and_then(|s| inner.rows.get(s))?;
        Some(RowInfo {
            attempts: row.message.attempts,
            pending: row.status == Status::Pending,
            dead: row.status == Status::Dead,
            delivered: row.status == Status::Delivered,
            leased: row.lease.as_ref().is_some_and(|l| l.2 > now),
            last_error: row.last_error.clone(),
        })
    }

    /// How many non-empty claims were taken ahead ([`Store::claim_ahead`]).
    pub fn claims_ahead(&self) -> u64 {
        self.lock().ahead
    }

    /// Messages under an unexpired lease.
    pub fn leased(&self) -> usize {
        let now = self.now();
        self.lock()
            .rows
            .values()
            .filter(|r| r.status == Status::Pending && r.lease.as_ref().is_some_and(|l| l.2 > now))
            .count()
    }

    /// Messages not yet delivered nor dead.
    pub fn pending(&self) -> usize {
        self.lock()
            .rows
            .values()
            .filter(|r| r.status == Status::Pending)
            .count()
    }

    fn select(inner: &mut Inner, selector: &Selector) -> Vec<u64> {
        inner
            .rows
            .iter()
            .filter(|(_, r)| r.status == Status::Dead)
            .filter(|(_, r)| match selector {
                Selector::Topic(t) => &r.message.topic == t,
                Selector::Ids(ids) => ids.contains(&r.message.id),
                _ => true,
            })
            .map(|(s, _)| *s)
            .collect()
    }
}

/// The row `id` if it is pending under the lease with `token`.
fn held<'a>(
    rows: &'a mut BTreeMap<u64, Row>,
    by_id: &HashMap<MessageId, u64>,
    token: FencingToken,
    id: &MessageId,
) -> Option<(u64, &'a mut Row)> {
    let seq = *by_id.get(id)?;
    let row = rows.get_mut(&seq)?;
    let ours = row.status == Status::Pending && row.lease.as_ref().is_some_and(|l| l.0 == token);
    ours.then_some((seq, row))
}

#[async_trait]
impl Store for MemoryStore {
    fn name(&self) -> &str {
        "memory"
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim> {
        Ok(self.take(request, None))
    }

    async fn claim_ahead(
        &self,
        request: &ClaimRequest,
        outstanding: &Lease,
    ) -> Result<Option<Claim>> {
        if !self.options.claim_ahead {
            return Ok(None);
        }
        let claim = self.take(request, Some(outstanding));
        if !claim.messages.is_empty() {
            self.lock().ahead += 1;
        }
        Ok(Some(claim))
    }

    async fn settle(&self, lease: &Lease, settlement: &Settlement) -> Result<SettleReport> {
        let now = self.now();
        let keep = self.options.keep_delivered;
        let mut inner = self.lock();
        let mut report = SettleReport::default();
        let mut remove = Vec::new();
        {
            let Inner { rows, by_id, .. } = &mut *inner;
            let token = lease.token;
            for id in &settlement.delivered {
                if let Some((seq, row)) = held(rows, by_id, token, id) {
                    row.lease = None;
                    row.status = Status::Delivered;
                    row.finished_at = Some(now);
                    if !keep {
                        remove.push((seq, *id));
                    }
                    report.delivered += 1;
                }
            }
            let counted = settlement.retries.iter().map(|r| (r, 1));
            for (r, attempt) in counted.chain(settlement.deferred.iter().map(|r| (r, 0))) {
                if let Some((_, row)) = held(rows, by_id, token, &r.id) {
                    row.lease = None;
                    row.message.attempts = row.message.attempts.saturating_add(attempt);
                    row.last_error = Some(r.error.clone());
                    row.due = Some(now + r.delay);
                    report.rescheduled += 1;
                }
            }
            for f in &settlement.dead {
                if let Some((_, row)) = held(rows, by_id, token, &f.id) {
                    row.lease = None;
                    row.message.attempts = row.message.attempts.saturating_add(1);
                    row.last_error = Some(f.error.clone());
                    row.status = Status::Dead;
                    row.finished_at = Some(now);
                    report.dead_lettered += 1;
                }
            }
            for id in &settlement.released {
                if let Some((_, row)) = held(rows, by_id, token, id) {
                    row.lease = None;
                    report.released += 1;
                }
            }
        }
        for (seq, id) in remove {
            inner.rows.remove(&seq);
            inner.by_id.remove(&id);
        }
        Ok(report)
    }

    async fn notified(&self) {
        self.notify.notified().await
    }

    async fn stats(&self) -> Result<Option<Stats>> {
        let now = self.now();
        let inner = self.lock();
        let mut stats = Stats::default();
        for r in inner.rows.values() {
            match r.status {
                Status::Pending => {
                    stats.backlog += 1;
                    if stats.oldest_pending_age.is_none() {
                        stats.oldest_pending_age =
                            Some(now.duration_since(r.message.created_at).unwrap_or_default());
                    }
                }
                Status::Dead => stats.dead += 1,
                Status::Delivered => {}
            }
        }
        Ok(Some(stats))
    }
}

#[async_trait]
impl DeadLetters for MemoryStore {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let inner = self.lock();
        Ok(inner
            .rows
            .values()
            .filter(|r| r.status == Status::Dead)
            .filter(|r| topic.is_none_or(|t| r.message.topic == t))
            .take(limit)
            .map(|r| DeadLetter {
                message: r.message.clone(),
                error: r.last_error.clone().unwrap_or_default(),
                dead_at: r.finished_at.unwrap_or(r.message.created_at),
            })
            .collect())
    }

    async fn requeue(&self, selector: &Selector) -> Result<u64> {
        let mut inner = self.lock();
        let seqs = Self::select(&mut inner, selector);
        for s in &seqs {
            if let Some(r) = inner.rows.get_mut(s) {
                r.status = Status::Pending;
                r.message.attempts = 0;
                r.due = None;
                r.finished_at = None;
            }
        }
        drop(inner);
        if !seqs.is_empty() {
            self.notify.notify_one();
        }
        Ok(seqs.len() as u64)
    }

    async fn discard(&self, selector: &Selector) -> Result<u64> {
        let mut inner = self.lock();
        let seqs = Self::select(&mut inner, selector);
        for s in &seqs {
            if let Some(r) = inner.rows.remove(s) {
                inner.by_id.remove(&r.message.id);
            }
        }
        Ok(seqs.len() as u64)
    }
}

#[async_trait]
impl Purge for MemoryStore {
    async fn purge_delivered(&self, older_than: Duration, limit: usize) -> Result<u64> {
        let now = self.now();
        let mut inner = self.lock();
        let seqs: Vec<u64> = inner
            .rows
            .iter()
            .filter(|(_, r)| {
                r.status == Status::Delivered
                    && r.finished_at
                        .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= older_than)
            })
            .map(|(s, _)| *s)
            .take(limit)
            .collect();
        for s in &seqs {
            if let Some(r) = inner.rows.remove(s) {
                inner.by_id.remove(&r.message.id);
            }
        }
        Ok(seqs.len() as u64)
    }
}
