//! PostgreSQL: enqueue on `PgConnection`, [`PgStore`] for relays, migrations.
//!
//! How relays share work: every message gets `partition = hash(key) & 63`
//! (keyless messages hash their id) in a generated column. Relays hold
//! short leases on partitions in `<table>_partitions` and claim only from
//! partitions they hold, in sequence order, without row locks: a claim
//! reads only partitions with more than half of their lease left, and no
//! other relay takes a partition before its lease expires.
//! A claim renews the owner's partition leases once half of a lease is
//! spent, stamping them with its token, in the same statement that reads
//! the rows; rows carry no lease of their own. A partition an owner takes
//! gets a new stamp, so an earlier owner's settle (fenced by the owner, the
//! lowest stamp its claim saw and the ids the claim handed out) changes
//! nothing, and the new owner never races it for one key. Live relays
//! register in `<table>_relays`; each takes
//! `ceil(64 / live relays)` partitions, so a new relay gets a share and a
//! dead relay's share moves once its lease expires.
//!
//! A message that waits for a retry (or a delayed keyed message, or a held
//! dead letter) blocks later messages of its key through a row in the small
//! `<table>_blocked` table, so claims never scan earlier rows of a key.
//!
//! Claims read the pending index from a floor below which no row is
//! pending (see `floor`), not from its start: settled rows leave dead
//! index entries there until VACUUM, and a claim would walk them all.
//!
//! Order per key is the order of `seq`, assigned at insert: for two
//! concurrent transactions writing the same key, it is the order their
//! inserts ran, which is the commit order when the key's business rows are
//! locked by the application (as they are when both update the same entity).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use outbox_core::{
    Claim, ClaimRequest, DeadLetter, DeadLetters, Error, FencingToken, Lease, Message, MessageId,
    Purge, RelayId, Result, Selector, SettleReport, Settlement, Stats, Store,
};
use sqlx::error::BoxDynError;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgListener, PgPool, PgQueryResult, PgRow};
use sqlx::types::chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{Arguments, PgConnection, Row};
use tokio::sync::Notify;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::error::db_error;
use crate::{
    empty_claim, headers_from_json, sealed, secs, Enqueue, Held, Outbox, Owners, StoreConfig,
    TableName, PARTITIONS,
};
use crate::{rescheduled, to_settle};

mod ahead;
mod floor;

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

const ENGINE: &str = "postgres";

fn err(operation: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| db_error(ENGINE, operation, e)
}

/// The schema for `table`, as `migrate` applies it (for users who run their
/// own migration tool: copy it).
pub fn schema(table: &TableName) -> String {
    let t = table.qualified("");
    let create_schema = table
        .schema()
        .map(|s| format!("CREATE SCHEMA IF NOT EXISTS {s};\n"))
        .unwrap_or_default();
    format!(
        r#"{create_schema}CREATE TABLE IF NOT EXISTS {t} (
    id           UUID PRIMARY KEY,
    seq          BIGINT GENERATED ALWAYS AS IDENTITY,
    topic        TEXT NOT NULL,
    msg_key      TEXT,
    partition    SMALLINT GENERATED ALWAYS AS ((hashtext(COALESCE(msg_key, id::text)) & {mask})::smallint) STORED,
    payload      BYTEA NOT NULL,
    headers      JSONB NOT NULL DEFAULT '{{}}',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    not_before   TIMESTAMPTZ,
    attempts     INT NOT NULL DEFAULT 0,
    last_error   TEXT,
    -- Row leases: not used by PgStore (it leases partitions), kept for
    -- relays that lease rows.
    lease_owner  TEXT,
    lease_until  TIMESTAMPTZ,
    lease_token  BIGINT,
    delivered_at TIMESTAMPTZ,
    dead_at      TIMESTAMPTZ
);
-- Claims read pending rows in seq order through this partial index only.
CREATE INDEX IF NOT EXISTS {pending} ON {t} (seq) WHERE delivered_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS {dead} ON {t} (seq) WHERE dead_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS {delivered} ON {t} (delivered_at) WHERE delivered_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS {t}_partitions (
    partition   SMALLINT PRIMARY KEY,
    owner       TEXT,
    lease_until TIMESTAMPTZ,
    claim_token BIGINT
);
ALTER TABLE {t}_partitions ADD COLUMN IF NOT EXISTS claim_token BIGINT;
INSERT INTO {t}_partitions (partition) SELECT generate_series(0, {last}) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {t}_relays (
    owner       TEXT PRIMARY KEY,
    alive_until TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS {t}_blocked (
    msg_key TEXT NOT NULL,
    seq     BIGINT NOT NULL,
    PRIMARY KEY (msg_key, seq)
);
CREATE SEQUENCE IF NOT EXISTS {t}_token;
-- Relays waiting for a wakeup (see `Outbox::wake`), until their entry expires.
CREATE TABLE IF NOT EXISTS {t}_waiting (
    waiter TEXT PRIMARY KEY,
    until  TIMESTAMPTZ NOT NULL
);
"#,
        mask = PARTITIONS - 1,
        last = PARTITIONS - 1,
        pending = table.local("_pending"),
        dead = table.local("_dead"),
        delivered = table.local("_delivered"),
    )
}

/// Creates the outbox tables if they do not exist. Idempotent, and safe when
/// several processes run it at once (an advisory lock serialises them).
pub async fn migrate(pool: &PgPool, table: &TableName) -> Result<()> {
    let mut tx = pool.begin().await.map_err(err("migrate"))?;
    let lock = format!("outbox-migrate:{table}");
    let ddl = schema(table);
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(&lock)
        .execute(&mut *tx)
        .await
        .map_err(err("migrate"))?;
    // One statement at a time: the schema has no ';' inside a statement.
    for statement in ddl.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .map_err(err("migrate"))?;
    }
    tx.commit().await.map_err(err("migrate"))?;
    Ok(())
}

impl sealed::Sealed for PgConnection {}

#[async_trait]
impl Enqueue for PgConnection {
    async fn insert(&mut self, outbox: &Outbox, messages: &[Message]) -> Result<()> {
        let t = outbox.table_name().qualified("");
        if let [m] = messages {
            // One message (the common business transaction): a plain VALUES
            // insert is cheaper than unnesting arrays.
            let blocks = m.key.is_some() && m.not_before.is_some();
            let insert =
                format!("INSERT INTO {t} ({ROW_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)");
            let sql = statement(&t, insert, blocks.then_some(""), outbox.notify);
            let mut args = PgArguments::default();
            add_row(&mut args, m).map_err(encode_error("enqueue"))?;
            wake(sqlx::query_with(&sql, args), outbox)
                .execute(&mut *self)
                .await
                .map_err(err("enqueue"))?;
            return Ok(());
        }
        let n = messages.len();
        let mut ids = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        let mut due = Vec::with_capacity(n);
        let mut blocks = false;
        for m in messages {
            ids.push(*m.id.as_uuid());
            topics.push(m.topic.as_str());
            keys.push(m.key.as_deref());
            payloads.push(m.payload.as_ref());
            headers.push(Json(&m.headers));
            created.push(DateTime::<Utc>::from(m.created_at));
            due.push(m.not_before.map(DateTime::<Utc>::from));
            blocks |= m.key.is_some() && m.not_before.is_some();
        }
        let insert = format!(
            "INSERT INTO {t} ({ROW_COLUMNS}) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::jsonb[], \
             $6::timestamptz[], $7::timestamptz[])"
        );
        let only_delayed = "WHERE msg_key IS NOT NULL AND not_before IS NOT NULL";
        let sql = statement(&t, insert, blocks.then_some(only_delayed), outbox.notify);
        let query = sqlx::query(&sql)
            .bind(ids)
            .bind(topics)
            .bind(keys)
            .bind(payloads)
            .bind(headers)
            .bind(created)
            .bind(due);
        wake(query, outbox)
            .execute(&mut *self)
            .await
            .map_err(err("enqueue"))?;
        Ok(())
    }
}

impl Outbox {
    /// PostgreSQL: writes `message` into the outbox in the same statement
    /// as one of the caller's own writes, so that the outbox row costs no
    /// round trip of its own (what a second statement costs a short
    /// business transaction is measured in `bench/README.md`, phase 5).
    ///
    /// `statement` is the caller's `INSERT`, `UPDATE`, `DELETE`, `MERGE` or
    /// `SELECT`, with its parameters `$1`, `$2`, ... in `args`
    /// (`PgArguments::add`, in order). The outbox row goes in a `WITH` part
    /// named `outbox_sqlx_row` (and `outbox_sqlx_blocks` for a delayed keyed
    /// message), whose parameters follow the caller's: in front of the
    /// statement, or first in its own `WITH` clause when it starts with one
    /// (`WITH` or `WITH RECURSIVE` as its first word, not after a comment).
    /// Both commit or roll back together, and a statement that fails writes
    /// neither; but the row is written however many rows the caller's
    /// statement touched, also none: check the result and roll back if that
    /// means no event. Returns the caller's statement's result (rows it
    /// returns are not read). Validation runs
    /// before any SQL, as in [`Outbox::enqueue`]; an error of the caller's
    /// statement carries its `sqlx::Error` as the source.
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool, outbox: outbox_sqlx::Outbox) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// use sqlx::Arguments;
    /// let event = outbox_core::Message::json("orders.placed", &serde_json::json!({"id": 7})).build()?;
    /// let mut args = sqlx::postgres::PgArguments::default();
    /// args.add(7_i64)?;
    /// args.add(1250_i32)?;
    /// let mut tx = pool.begin().await?;
    /// outbox
    ///     .enqueue_with(&mut tx, &event, "INSERT INTO orders (id, total) VALUES ($1, $2)", args)
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_with(
        &self,
        conn: &mut PgConnection,
        message: &Message,
        statement: &str,
        args: PgArguments,
    ) -> Result<PgQueryResult> {
        let operation = "enqueue_with";
        self.check(message, operation)?;
        let t = self.table_name().qualified("");
        let n = args.len();
        let p = |i: usize| format!("${}", n + i);
        let values = (1..=7).map(p).collect::<Vec<_>>().join(", ");
        let mut returning = Vec::new();
        let blocks = message.key.is_some() && message.not_before.is_some();
        if blocks {
            returning.push("msg_key, seq".to_string());
        }
        // NOTIFY in the insert's RETURNING list: a WITH part that changes
        // data runs to completion whatever the main statement reads.
        if self.notify {
            returning.push(format!("pg_notify({}::text, '')", p(8)));
        }
        let returning = if returning.is_empty() {
            String::new()
        } else {
            format!(" RETURNING {}", returning.join(", "))
        };
        let block = if blocks {
            format!(
                ", outbox_sqlx_blocks AS (INSERT INTO {t}_blocked (msg_key, seq) \
                 SELECT msg_key, seq FROM outbox_sqlx_row ON CONFLICT DO NOTHING)"
            )
        } else {
            String::new()
        };
        let parts = format!(
            "outbox_sqlx_row AS (INSERT INTO {t} ({ROW_COLUMNS}) \
               VALUES ({values}){returning}){block}"
        );
        let sql = with_parts(&parts, statement);
        let mut args = args;
        add_row(&mut args, message).map_err(encode_error(operation))?;
        if self.notify {
            args.add(self.table_name().channel())
                .map_err(encode_error(operation))?;
        }
        sqlx::query_with(&sql, args)
            .execute(&mut *conn)
            .await
            .map_err(err(operation))
    }

    /// PostgreSQL: wakes a relay that waits for work, for a transaction
    /// that enqueued without NOTIFY (`notify(false)`, the default). Call it
    /// after the commit, on any connection or the pool: it reads
    /// `<table>_waiting` and sends a NOTIFY only while some relay's store
    /// (with `listen` on) waits there. A busy relay withdraws its entry, so
    /// under load this costs one small read per business transaction
    /// instead of NOTIFY's database-wide lock through every commit.
    ///
    /// No wakeup is lost: a relay writes its entry before it claims one
    /// last time and waits, so a transaction that committed before the
    /// entry is seen by that claim, and one whose `wake` reads after the
    /// entry finds it. Errors are the store's; a failed `wake` loses no
    /// message (the relay's poll finds it).
    ///
    /// Run on its own (not inside a transaction), the NOTIFY's commit does
    /// not wait for the WAL flush: the business transaction is durable
    /// already, and a NOTIFY lost in a crash only leaves the relay to its
    /// poll. Waiting for the flush put every stall of the disk between the
    /// commit and the relay's wakeup. Inside a transaction it changes none
    /// of the transaction's settings.
    ///
    /// Takes the pool, a connection or a transaction. The future is boxed:
    /// a generic `async fn` over `Acquire` could not be awaited inside
    /// `tokio::spawn` (rustc cannot prove it `Send` for every lifetime).
    pub fn wake<'c, A>(&'c self, conn: A) -> BoxFuture<'c, Result<()>>
    where
        A: sqlx::Acquire<'c, Database = sqlx::Postgres> + Send + 'c,
    {
        Box::pin(self.wake_on(conn))
    }

    async fn wake_on<'c, A>(&'c self, conn: A) -> Result<()>
    where
        A: sqlx::Acquire<'c, Database = sqlx::Postgres> + Send + 'c,
    {
        let t = self.table_name().qualified("");
        let mut conn = conn.acquire().await.map_err(err("wake"))?;
        // Read first, with a prepared statement: under load no relay waits,
        // and this read is all a wake costs.
        let waits: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM {t}_waiting WHERE until > now() LIMIT 1"
        ))
        .fetch_optional(&mut *conn)
        .await
        .map_err(err("wake"))?;
        if waits.is_none() {
            return Ok(());
        }
        // One simple-protocol message: on its own it is one implicit
        // transaction whose start is this statement's start, so
        // `set_config(.., true)` (`SET LOCAL`) reaches only it. In a
        // transaction begun earlier the two times differ and nothing is
        // set. The channel name comes from a validated table name.
        let notify = format!(
            "SELECT set_config('synchronous_commit', 'off', true) \
             WHERE statement_timestamp() = transaction_timestamp(); \
             SELECT pg_notify('{}', '')",
            self.table_name().channel()
        );
        sqlx::Executor::execute(&mut *conn, notify.as_str())
            .await
            .map_err(err("wake"))?;
        Ok(())
    }
}

/// The columns an enqueue writes, in the order [`add_row`] binds them.
const ROW_COLUMNS: &str = "id, topic, msg_key, payload, headers, created_at, not_before";

/// Binds one message's [`ROW_COLUMNS`] values.
fn add_row(args: &mut PgArguments, m: &Message) -> std::result::Result<(), BoxDynError> {
    args.add(m.id.as_uuid())?;
    args.add(m.topic.as_str())?;
    args.add(m.key.as_deref())?;
    args.add(m.payload.as_ref())?;
    args.add(Json(&m.headers))?;
    args.add(DateTime::<Utc>::from(m.created_at))?;
    args.add(m.not_before.map(DateTime::<Utc>::from))
}

fn encode_error(operation: &'static str) -> impl FnOnce(BoxDynError) -> Error {
    move |e| err(operation)(sqlx::Error::Encode(e))
}

/// Binds the NOTIFY channel ($8) when NOTIFY is on.
fn wake<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, PgArguments>,
    outbox: &Outbox,
) -> sqlx::query::Query<'q, sqlx::Postgres, PgArguments> {
    if outbox.notify {
        query.bind(outbox.table_name().channel())
    } else {
        query
    }
}

/// `statement` with the WITH `parts` in front: in a WITH clause of their
/// own, or first in the statement's own (`WITH RECURSIVE` covers the whole
/// list, and a part that does not refer to itself is fine in it).
fn with_parts(parts: &str, statement: &str) -> String {
    // The keyword, case-insensitively, then white space.
    fn after<'s>(s: &'s str, keyword: &str) -> Option<&'s str> {
        let rest = s.get(keyword.len()..)?;
        let head = s.get(..keyword.len())?;
        (head.eq_ignore_ascii_case(keyword) && rest.starts_with(char::is_whitespace))
            .then(|| rest.trim_start())
    }
    let trimmed = statement.trim_start();
    match after(trimmed, "WITH") {
        Some(list) => match after(list, "RECURSIVE") {
            Some(list) => format!("WITH RECURSIVE {parts}, {list}"),
            None => format!("WITH {parts}, {list}"),
        },
        None => format!("WITH {parts} {statement}"),
    }
}

/// The enqueue statement around `insert` (parameters $1-$7): with
/// `blocks`, a filter on the inserted rows whose keys a delayed message
/// holds back; with `notify`, a NOTIFY on channel $8 in the same statement
/// (a statement of its own cost a round trip per business transaction).
fn statement(t: &str, insert: String, blocks: Option<&str>, notify: bool) -> String {
    let block = |filter: &str| {
        format!(
            "INSERT INTO {t}_blocked (msg_key, seq) SELECT msg_key, seq FROM ins {filter} \
             ON CONFLICT DO NOTHING"
        )
    };
    // A data-modifying WITH part always runs to completion, whatever the
    // main statement reads of it.
    let wake = "SELECT pg_notify($8::text, '') WHERE EXISTS (SELECT 1 FROM ins)";
    match (blocks, notify) {
        (None, false) => insert,
        (None, true) => format!("WITH ins AS ({insert} RETURNING 1) {wake}"),
        (Some(filter), false) => format!(
            "WITH ins AS ({insert} RETURNING msg_key, seq, not_before) {}",
            block(filter)
        ),
        (Some(filter), true) => format!(
            "WITH ins AS ({insert} RETURNING msg_key, seq, not_before), \
             b AS ({}) {wake}",
            block(filter)
        ),
    }
}

/// The relay-side store on PostgreSQL. Cheap to clone; clones share the
/// listener and the per-owner bookkeeping.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    config: StoreConfig,
    sql: Sql,
    owners: Owners,
    /// Per owner: the ids its outstanding claims handed out, by token.
    held: Held,
    wakeup: Arc<Notify>,
    listener: Option<tokio::task::JoinHandle<()>>,
    waiting: Waiting,
    /// Connections kept between relay transactions (see [`RelayConn`]).
    kept: std::sync::Mutex<Vec<PoolConnection<sqlx::Postgres>>>,
    /// Whether a task clears `kept` when the pool is closed.
    watching_close: std::sync::atomic::AtomicBool,
    /// Where claims start reading the pending index.
    floor: floor::Floor,
    /// Where claims ahead start reading it.
    ahead: ahead::Ahead,
}

/// This store's entry in `<table>_waiting`: present while one of its relays
/// waits for work, so that `Outbox::wake` sends a NOTIFY only then. Its
/// name is written into `Sql::announce` and `Sql::withdraw`.
struct Waiting {
    /// True while the LISTEN connection is up: an entry is written only
    /// then (a NOTIFY sent while nobody listens is lost).
    listening: Arc<std::sync::atomic::AtomicBool>,
    /// Relays of this store inside `notified()` now.
    waiters: std::sync::atomic::AtomicUsize,
    /// When the entry was last written; `None` when there is none, or
    /// when LISTEN (re)connected since (the server may have restarted and
    /// lost an entry written without waiting for the flush).
    written: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// Since when claims have kept returning messages.
    busy_since: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long an entry lives unless renewed (a relay that dies leaves one).
const WAITING_TTL: Duration = Duration::from_secs(60);
/// How often a waiting relay renews its entry.
const WAITING_RENEW: Duration = Duration::from_secs(20);
/// How long claims must keep returning messages before the entry goes, so
/// that a relay between two small batches is not announced and withdrawn
/// every time.
const BUSY_BEFORE_WITHDRAW: Duration = Duration::from_millis(250);

/// Counts a relay inside `notified()` for as long as it is there.
struct Waiter<'a>(&'a Waiting);

impl<'a> Waiter<'a> {
    fn enter(waiting: &'a Waiting) -> Self {
        waiting
            .waiters
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Waiter(waiting)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0
            .waiters
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Inner {
    fn lock_written(&self) -> std::sync::MutexGuard<'_, Option<std::time::Instant>> {
        self.waiting
            .written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<PoolConnection<sqlx::Postgres>>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the kept connections back to the pool.
    fn return_kept(&self) {
        let kept = std::mem::take(&mut *self.kept());
        drop(kept);
    }

    /// Wakes every relay of this store waiting now, and the next to wait:
    /// work may be in any relay's partitions.
    fn wake_all(&self) {
        self.wakeup.notify_waiters();
        self.wakeup.notify_one();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = &self.listener {
            h.abort();
        }
        // A pool connection hands itself back on a task: without a runtime
        // (a store dropped after its runtime, with connections still kept
        // by a relay that was aborted) that would panic. Left open instead;
        // the process is most likely ending.
        if tokio::runtime::Handle::try_current().is_err() {
            std::mem::forget(std::mem::take(&mut *self.kept()));
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("table", &self.inner.config.table)
            .field("config", &self.inner.config)
            .finish()
    }
}

/// A pooled connection for one relay transaction, begun with the relay
/// statements' settings in the same round trip as `BEGIN`: `synchronous_commit`
/// off when configured, JIT off, and a plan made for each call's values and
/// the table as it is now (a cached generic plan made while the table was
/// empty scanned the whole table in every settle once it had grown: 100,000
/// rows, 600 ms per settle).
///
/// After its commit it goes back to the pool, or, while the relay has more
/// to do, the store keeps it for its next relay transaction: taking a
/// connection from the pool and giving it back costs two round trips (sqlx
/// pings it both ways), which made up a seventh of a claim ahead under load
/// (1.0 ms of 7.4 ms, 1,000 rows, Redis Streams benchmark). A kept
/// connection is checked by its `BEGIN` instead: if that fails (the server
/// restarted, the connection was killed), it is closed and the transaction
/// begins again on one from the pool. The store keeps at most [`KEPT`], only
/// while the pool has an idle connection left or room for another, hands
/// them back when a claim finds nothing, a settle has no claim behind it or
/// a relay leaves, and at once when the pool is closed. Meanwhile the pool
/// cannot apply `max_lifetime` or `idle_timeout` to them, and they skip
/// its `before_acquire` and `after_release` hooks.
///
/// Without a commit it is closed, never reused: sqlx does not roll back a
/// `BEGIN` that failed or was cancelled part-way, and this one carries
/// `SET LOCAL synchronous_commit TO off`, which must never reach another
/// borrower of a shared pool (its commits would no longer wait for the WAL
/// flush).
struct RelayConn {
    conn: Option<PoolConnection<sqlx::Postgres>>,
    store: Arc<Inner>,
    /// Committed, and whether to keep it for the next relay transaction.
    committed: Option<bool>,
}

/// Where a claim's message columns begin (after token, now, incoming,
/// stamp, until and clear).
const MESSAGE_AT: usize = 6;

/// Most connections a store keeps between relay transactions: a claim and
/// a settle in flight for each of two relays (or lanes).
const KEPT: usize = 4;

impl RelayConn {
    /// A connection with its relay transaction begun: a kept one when the
    /// store has one that is still alive, else one from the pool.
    async fn begin(store: &Arc<Inner>, operation: &'static str) -> Result<Self> {
        let on = |conn| RelayConn {
            conn: Some(conn),
            store: store.clone(),
            committed: None,
        };
        let kept = store.kept().pop();
        if let Some(conn) = kept {
            let mut c = on(conn);
            match c.run(&store.sql.begin, operation).await {
                Ok(()) => return Ok(c),
                // Dropped uncommitted: closed.
                Err(e) => debug!(error = %e, "a kept connection failed; taking one from the pool"),
            }
        }
        let mut c = on(store.pool.acquire().await.map_err(err(operation))?);
        c.run(&store.sql.begin, operation).await?;
        Ok(c)
    }

    /// The connection, to run the transaction's statements on (present
    /// until the drop).
    fn db(&mut self, operation: &'static str) -> Result<&mut PgConnection> {
        self.conn.as_deref_mut().ok_or_else(|| {
            err(operation)(sqlx::Error::Protocol(
                "relay connection already released".into(),
            ))
        })
    }

    async fn run(&mut self, sql: &str, operation: &'static str) -> Result<()> {
        let db = self.db(operation)?;
        sqlx::Executor::execute(db, sql)
            .await
            .map(|_| ())
            .map_err(err(operation))
    }

    /// Commits; then the connection is kept for the store's next relay
    /// transaction (`keep`, when there is room) or goes back to the pool, at
    /// once: the caller may need a connection next, and the pool may have no
    /// other.
    async fn commit(mut self, operation: &'static str, keep: bool) -> Result<()> {
        self.run("COMMIT", operation).await?;
        self.committed = Some(keep);
        Ok(())
    }
}

impl Drop for RelayConn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        match self.committed {
            None => conn.close_on_drop(),
            Some(false) => {}
            Some(true) => {
                // Listening before the first connection is kept.
                watch_close(&self.store);
                let pool = &self.store.pool;
                let mut kept = self.store.kept();
                // Never the pool's last free connection. Closed is read
                // under the lock: the close watcher empties `kept` under it
                // after the pool is marked closed, so nothing is kept after.
                let room = !pool.is_closed()
                    && (pool.num_idle() > 0 || pool.size() < pool.options().get_max_connections());
                if room && kept.len() < KEPT {
                    kept.push(conn);
                }
            }
        }
    }
}

/// Once per store: a task that hands the kept connections back when the
/// pool is closed (`PgPool::close` waits for every connection).
fn watch_close(store: &Arc<Inner>) {
    if store.watching_close.swap(true, Ordering::SeqCst) {
        return;
    }
    let closed = store.pool.close_event();
    let store = Arc::downgrade(store);
    tokio::spawn(async move {
        closed.await;
        if let Some(store) = store.upgrade() {
            store.return_kept();
        }
    });
}

/// Statements, built once from the validated table name.
struct Sql {
    /// BEGIN and the relay statements' settings, one round trip.
    begin: String,
    announce: String,
    withdraw: String,
    claim: String,
    claim_ahead: String,
    settle: String,
    heartbeat: String,
    live: String,
    mine: String,
    release: String,
    acquire: String,
    floor: floor::FloorSql,
}

impl Sql {
    /// `waiter`: this store's entry name in `<table>_waiting` (digits, hex
    /// and dashes, so it can be written into the statements).
    fn new(c: &StoreConfig, waiter: &str) -> Self {
        let t = c.table.qualified("");
        // The waiting entry is a hint: a lost one costs a NOTIFY or sends a
        // spare one, so its writes never wait for the WAL flush. Waiting for
        // it put every stall of the disk (fsyncs of 15-300 ms seen here)
        // into the relay's path: `withdraw` runs inside a claim, `announce`
        // before the relay sleeps. One simple-protocol round trip, run as
        // one implicit transaction, so `SET LOCAL` covers it.
        let hint = if c.async_commit {
            "SET LOCAL synchronous_commit TO off; "
        } else {
            ""
        };
        // Pending, written so that it does not match the partial index's
        // predicate: a settle then looks its rows up by primary key even
        // when the statistics say the table is empty (analyzed before a
        // burst), instead of walking the whole pending index.
        let pending = "COALESCE(delivered_at, dead_at) IS NULL";
        // Rows are not leased one by one: the owner's partitions are, and
        // renewing or taking them stamps them. A settle ($1: the lowest
        // stamp its claim saw) touches only rows in partitions the owner
        // still holds with that stamp or a later one of its own (a claim
        // ahead may renew while the one before it is still to be settled).
        let ours = format!(
            "partition = ANY(ARRAY(SELECT partition FROM {t}_partitions \
               WHERE owner = $9 AND claim_token >= $1))"
        );
        let delivered = if c.keep_delivered {
            format!(
                "UPDATE {t} SET delivered_at = now() \
                 WHERE id = ANY($2) AND {ours} AND {pending} RETURNING msg_key, seq"
            )
        } else {
            format!(
                "DELETE FROM {t} WHERE id = ANY($2) AND {ours} AND {pending} \
                 RETURNING msg_key, seq"
            )
        };
        let dead_blocks = if c.hold_dead_letters {
            format!(
                "INSERT INTO {t}_blocked (msg_key, seq) SELECT msg_key, seq FROM x \
                 WHERE msg_key IS NOT NULL ON CONFLICT DO NOTHING"
            )
        } else {
            format!(
                "DELETE FROM {t}_blocked b USING x WHERE b.msg_key = x.msg_key AND b.seq = x.seq"
            )
        };
        // One row per claimed message, or one row of NULLs: the token and
        // the database time come back either way. The blocked-keys probe is
        // skipped when nothing is blocked (checked once per claim: a third
        // of the claim's time on an empty side table). A claim that finds
        // nothing says whether other transactions are writing to the table
        // (`Claim::incoming`; reading `pg_locks` took 0.03 ms here). It
        // tests `c.id`, not `c` itself: a second reference to `c` would
        // have it copied into a tuplestore, payloads and all.
        //
        // The owner's partitions: a claim renews their leases (stamping its
        // token on them) only once half of `lease` is spent, and reads from
        // those with more than half left. Renewing them in every claim wrote
        // 64 rows per claim, and while any long transaction (a report, a
        // dump) held back the cleanup of dead rows the table grew with them:
        // 0.2 ms per claim became 14 ms within 30 s here.
        let mine = format!(
            "WITH tok AS (SELECT nextval('{t}_token') AS v, now() AS now), \
             renewed AS ( \
               UPDATE {t}_partitions SET lease_until = now() + make_interval(secs => $3), \
                 claim_token = (SELECT v FROM tok) \
               WHERE owner = $1 AND (lease_until IS NULL OR claim_token IS NULL \
                 OR lease_until <= now() + make_interval(secs => $3 / 2)) \
               RETURNING partition, claim_token, lease_until), \
             mine AS ( \
               SELECT partition, claim_token, lease_until FROM renewed \
               UNION ALL \
               SELECT partition, claim_token, lease_until FROM {t}_partitions \
               WHERE owner = $1 AND lease_until > now() + make_interval(secs => $3 / 2) \
                 AND claim_token IS NOT NULL)"
        );
        // `{filter}`: the claim floor, and a claim ahead leaves out the
        // owner's outstanding rows ($4). With a custom plan the array is a
        // constant, so the check is a hash lookup and the scan keeps to the
        // index in seq order.
        //
        // No `FOR UPDATE`: only the partitions' owner reads their rows, and
        // no other owner takes a partition before its lease expires, which
        // is at least half of `lease` after the claim began. Locking each row
        // wrote a lock into every row and a WAL record per row, a quarter of
        // the claim (1,000 rows: 4.1 ms with, 3.1 ms without).
        //
        // Not ordered in the statement: sorting the batch in the database
        // cost a tenth of the claim, and `take` sorts it by seq. Empty
        // headers come back NULL, which saves turning every '{}' into text
        // and parsing it again.
        let claim = |filter: &str, incoming: &str| {
            format!(
                "{mine}, c AS ( \
                   SELECT t.id, t.topic, t.msg_key, t.payload, \
                     NULLIF(t.headers, '{{}}'::jsonb) AS headers, t.created_at, \
                     t.attempts, t.not_before, t.seq \
                   FROM {t} t \
                   WHERE t.delivered_at IS NULL AND t.dead_at IS NULL \
                     AND t.partition = ANY(ARRAY(SELECT partition FROM mine)) \
                     AND (t.not_before IS NULL OR t.not_before <= now()) \
                     AND (NOT EXISTS (SELECT 1 FROM {t}_blocked) \
                          OR NOT EXISTS (SELECT 1 FROM {t}_blocked b \
                                         WHERE b.msg_key = t.msg_key AND b.seq < t.seq)) \
                     {filter} \
                   ORDER BY t.seq LIMIT $2) \
                 SELECT tok.v AS token, tok.now AS now, {incoming} AS incoming, \
                   (SELECT min(claim_token) FROM mine) AS stamp, \
                   (SELECT min(lease_until) FROM mine) AS until, \
                   NOT EXISTS (SELECT 1 FROM {t}_blocked) AS clear, \
                   c.* FROM tok LEFT JOIN c ON true"
            )
        };
        // $6: whether to look (see `take`).
        let incoming = format!(
            "CASE WHEN c.id IS NULL AND $6 THEN EXISTS (SELECT 1 FROM pg_locks \
               WHERE {} AND relation = '{t}'::regclass) END",
            floor::HOLDERS
        );
        let floor = floor::FloorSql::new(&t);
        // JIT off: a claim's cost estimate (a LIMIT over an index scan of
        // the whole pending index) can pass `jit_above_cost`, and
        // compiling took 15-45 ms against a 2-3 ms claim (measured with a
        // NOT IN variant of the claim ahead, PostgreSQL 15).
        let begin = format!(
            "BEGIN; {}SET LOCAL plan_cache_mode TO force_custom_plan; SET LOCAL jit TO off",
            if c.async_commit {
                "SET LOCAL synchronous_commit TO off; "
            } else {
                ""
            }
        );
        Sql {
            begin,
            announce: format!(
                "{hint}INSERT INTO {t}_waiting (waiter, until) \
                 VALUES ('{waiter}', now() + make_interval(secs => {ttl})) \
                 ON CONFLICT (waiter) DO UPDATE SET until = EXCLUDED.until",
                ttl = WAITING_TTL.as_secs()
            ),
            withdraw: format!("{hint}DELETE FROM {t}_waiting WHERE waiter = '{waiter}'"),
            claim: claim(&floor::filter(4), &incoming),
            // A relay does not ask for incoming rows with a claim ahead.
            // And it reads only above what the claims before it passed
            // ($7, on the server started at $8; see `ahead`). On another
            // server (a restart, a failover) that bound is void, and a claim
            // sent without the outstanding ids (all at or below it) reads
            // nothing rather than hand them out again.
            claim_ahead: claim(
                &format!(
                    "AND NOT (t.id = ANY($4::uuid[])) AND t.seq > CASE \
                       WHEN pg_postmaster_start_time() = $8 THEN $7 \
                       WHEN $8 IS NULL OR cardinality($4::uuid[]) > 0 \
                         THEN -9223372036854775807 - 1 \
                       ELSE 9223372036854775807 END {}",
                    floor::filter(5)
                ),
                "NULL::boolean",
            ),
            // `cardinality(..) > 0` lets the planner drop the parts of a
            // settle that have nothing to do (usually all but `d`): it had
            // planned them as whole-table scans on a table it thought small.
            // `db` looks for blocked entries only when there are any: a
            // probe per delivered row was a fifth of the settle.
            settle: format!(
                "WITH d AS ({delivered}), \
                 db AS (DELETE FROM {t}_blocked b USING d \
                   WHERE EXISTS (SELECT 1 FROM {t}_blocked) \
                     AND b.msg_key = d.msg_key AND b.seq = d.seq), \
                 r AS ( \
                   UPDATE {t} t SET attempts = t.attempts + x.attempt, last_error = x.err, \
                     not_before = now() + make_interval(secs => x.delay) \
                   FROM unnest($3::uuid[], $4::text[], $5::float8[], $10::int4[]) \
                     AS x(id, err, delay, attempt) \
                   WHERE cardinality($3::uuid[]) > 0 AND t.id = x.id AND t.{ours} AND {pending_t} \
                   RETURNING t.msg_key, t.seq), \
                 rb AS (INSERT INTO {t}_blocked (msg_key, seq) SELECT msg_key, seq FROM r \
                   WHERE msg_key IS NOT NULL ON CONFLICT DO NOTHING), \
                 x AS ( \
                   UPDATE {t} t SET attempts = t.attempts + 1, last_error = x.err, dead_at = now() \
                   FROM unnest($6::uuid[], $7::text[]) AS x(id, err) \
                   WHERE cardinality($6::uuid[]) > 0 AND t.id = x.id AND t.{ours} AND {pending_t} \
                   RETURNING t.msg_key, t.seq), \
                 xb AS ({dead_blocks}) \
                 SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM r), \
                        (SELECT count(*) FROM x), \
                        (SELECT count(*) FROM {t} \
                         WHERE cardinality($8::uuid[]) > 0 AND id = ANY($8) AND {ours} AND {pending})",
                pending_t = "COALESCE(t.delivered_at, t.dead_at) IS NULL",
            ),
            heartbeat: format!(
                "INSERT INTO {t}_relays (owner, alive_until) \
                 VALUES ($1, now() + make_interval(secs => $2)) \
                 ON CONFLICT (owner) DO UPDATE SET alive_until = EXCLUDED.alive_until"
            ),
            live: format!("SELECT count(*) FROM {t}_relays WHERE alive_until > now()"),
            mine: format!("SELECT partition FROM {t}_partitions WHERE owner = $1 ORDER BY partition"),
            release: format!(
                "UPDATE {t}_partitions SET owner = NULL, lease_until = NULL \
                 WHERE owner = $1 AND partition = ANY($2)"
            ),
            // A fresh stamp: settles of the partition's earlier owners are
            // fenced by the owner, this keeps stamps rising per owner.
            acquire: format!(
                "UPDATE {t}_partitions SET owner = $1, lease_until = now() + make_interval(secs => $2), \
                 claim_token = nextval('{t}_token') \
                 WHERE partition IN (SELECT partition FROM {t}_partitions \
                   WHERE owner IS NULL OR lease_until <= now() \
                   ORDER BY partition LIMIT $3 FOR UPDATE SKIP LOCKED)"
            ),
            floor,
        }
    }
}

impl PgStore {
    /// A store over `pool` with the default configuration. Call
    /// [`migrate`](Self::migrate) once before use (or run the SQL of
    /// [`schema`] yourself).
    pub fn new(pool: PgPool) -> Self {
        Self::with_config(pool, StoreConfig::default())
    }

    /// A store with the given configuration. With `listen` on, a background
    /// task LISTENs for the enqueue side's NOTIFY and reconnects by itself;
    /// it needs a tokio runtime.
    pub fn with_config(pool: PgPool, config: StoreConfig) -> Self {
        let wakeup = Arc::new(Notify::new());
        let listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiter = format!("{}-{}", std::process::id(), Uuid::now_v7());
        let written = Arc::new(std::sync::Mutex::new(None));
        let listener = config.listen.then(|| {
            tokio::spawn(listen(
                pool.clone(),
                config.table.channel(),
                Arc::downgrade(&wakeup),
                listening.clone(),
                written.clone(),
            ))
        });
        PgStore {
            inner: Arc::new(Inner {
                sql: Sql::new(&config, &waiter),
                pool,
                config,
                owners: Owners::default(),
                held: Held::default(),
                wakeup,
                listener,
                kept: std::sync::Mutex::default(),
                watching_close: std::sync::atomic::AtomicBool::new(false),
                floor: floor::Floor::default(),
                ahead: ahead::Ahead::default(),
                waiting: Waiting {
                    listening,
                    waiters: std::sync::atomic::AtomicUsize::new(0),
                    written,
                    busy_since: std::sync::Mutex::new(None),
                },
            }),
        }
    }

    /// Creates the tables if they do not exist (see [`migrate`]).
    pub async fn migrate(&self) -> Result<()> {
        migrate(&self.inner.pool, &self.inner.config.table).await
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The claim floor: the `seq` below which this store's claims do not
    /// read the pending index, because no row is pending there (`None`:
    /// they read from its start). Steps after claims move it up once no
    /// transaction that could still write a row below it is running, and
    /// down when rows below it are pending again (at once for this store's
    /// requeues, within a few seconds for others while relays are busy).
    /// Claims on a server started at another time than the one it was
    /// found on (a restart, a failover) ignore it.
    pub fn claim_floor(&self) -> Option<i64> {
        self.inner.floor.get().map(|(seq, _)| seq)
    }

    /// Where the next claim ahead of `owner` starts reading the pending
    /// index: above this `seq`, which the owner's claims before it passed
    /// (`None`: at the claim floor, leaving out the owner's outstanding rows
    /// by id). Claims ahead move it up while they read a backlog that has
    /// committed; a plain claim, a settle that does more than deliver, a
    /// blocked key or a requeue drop it.
    pub fn claims_ahead_start(&self, owner: &RelayId) -> Option<i64> {
        self.inner
            .ahead
            .start(owner.as_str())
            .passed
            .map(|(seq, _)| seq)
    }

    /// Renews the owner's registration and moves partitions towards a fair
    /// share: `ceil(64 / live relays)` each.
    async fn rebalance(&self, owner: &RelayId, lease: Duration) -> Result<()> {
        let sql = &self.inner.sql;
        let mut conn = RelayConn::begin(&self.inner, "claim").await?;
        sqlx::query(&sql.heartbeat)
            .bind(owner.as_str())
            .bind(secs(lease))
            .execute(conn.db("claim")?)
            .await
            .map_err(err("claim"))?;
        let live: i64 = sqlx::query_scalar(&sql.live)
            .fetch_one(conn.db("claim")?)
            .await
            .map_err(err("claim"))?;
        let target = (i64::from(PARTITIONS) + live.max(1) - 1) / live.max(1);
        let mine: Vec<i16> = sqlx::query_scalar(&sql.mine)
            .bind(owner.as_str())
            .fetch_all(conn.db("claim")?)
            .await
            .map_err(err("claim"))?;
        let have = mine.len() as i64;
        if have > target && !self.inner.owners.busy(owner.as_str()) {
            let extra: Vec<i16> = mine[target as usize..].to_vec();
            debug!(%owner, count = extra.len(), "releasing partitions for other relays");
            sqlx::query(&sql.release)
                .bind(owner.as_str())
                .bind(extra)
                .execute(conn.db("claim")?)
                .await
                .map_err(err("claim"))?;
        } else if have < target {
            let got = sqlx::query(&sql.acquire)
                .bind(owner.as_str())
                .bind(secs(lease))
                .bind(target - have)
                .execute(conn.db("claim")?)
                .await
                .map_err(err("claim"))?
                .rows_affected();
            if got > 0 {
                debug!(%owner, got, "acquired partitions");
            }
        }
        // A claim follows.
        conn.commit("claim", true).await
    }

    /// [`Store::settle`], without the resets of claims ahead.
    async fn settling(&self, lease: &Lease, settlement: &Settlement) -> Result<SettleReport> {
        let inner = &self.inner;
        let Some((s, _)) = to_settle(&inner.owners, &inner.held, lease, settlement) else {
            return Ok(SettleReport::default());
        };
        let owner = lease.owner.as_str();
        // Fenced by the stamp the claim saw, not its own token: the claim
        // stamped its token only if it renewed the leases.
        let stamp = self.inner.held.stamp(owner, lease.token.0);
        let stamp = stamp.map_or(i64::MAX, |s| i64::try_from(s).unwrap_or(i64::MAX));
        let uuids = |ids: &[MessageId]| ids.iter().map(|i| *i.as_uuid()).collect::<Vec<_>>();
        let mut conn = RelayConn::begin(&self.inner, "settle").await?;
        let again = rescheduled(&s);
        let row = sqlx::query(&self.inner.sql.settle)
            .bind(stamp)
            .bind(uuids(&s.delivered))
            .bind(
                again
                    .iter()
                    .map(|(r, _)| *r.id.as_uuid())
                    .collect::<Vec<_>>(),
            )
            .bind(
                again
                    .iter()
                    .map(|(r, _)| r.error.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(again.iter().map(|(r, _)| secs(r.delay)).collect::<Vec<_>>())
            .bind(s.dead.iter().map(|f| *f.id.as_uuid()).collect::<Vec<_>>())
            .bind(s.dead.iter().map(|f| f.error.as_str()).collect::<Vec<_>>())
            .bind(uuids(&s.released))
            .bind(owner)
            .bind(again.iter().map(|(_, n)| *n).collect::<Vec<i32>>())
            .fetch_one(conn.db("settle")?)
            .await
            .map_err(err("settle"))?;
        // Kept while a later claim of this owner is still to be settled.
        let later = self
            .inner
            .owners
            .get(owner)
            .outstanding
            .is_some_and(|(t, _)| t != lease.token.0);
        conn.commit("settle", later).await?;
        if !later {
            // Nothing claimed behind this one: the relay may go idle.
            self.inner.return_kept();
        }
        self.inner.owners.settled(owner, lease.token.0);
        self.inner.held.release(owner, lease.token.0);
        let n = |i: usize| -> Result<u64> {
            let v: i64 = row.try_get(i).map_err(err("settle"))?;
            Ok(u64::try_from(v).unwrap_or(0))
        };
        Ok(SettleReport {
            delivered: n(0)?,
            rescheduled: n(1)?,
            dead_lettered: n(2)?,
            released: n(3)?,
        })
    }

    /// Claims for `request.owner`; `exclude` (claiming ahead) leaves out
    /// the rows of its outstanding claims.
    async fn take(&self, request: &ClaimRequest, exclude: Option<Vec<Uuid>>) -> Result<Claim> {
        let owner = request.owner.as_str();
        let taken = self.taking(request, exclude).await;
        if taken.is_err() {
            self.inner.ahead.reset(owner);
        }
        taken
    }

    async fn taking(&self, request: &ClaimRequest, exclude: Option<Vec<Uuid>>) -> Result<Claim> {
        let owner = request.owner.as_str();
        let limit = i64::try_from(request.limit).unwrap_or(i64::MAX);
        let started = tokio::time::Instant::now();
        let ahead = exclude.is_some();
        let sql = &self.inner.sql;
        let (floor, server_started) = self.inner.floor.get().unzip();
        let floor = floor.unwrap_or(i64::MIN);
        // A claim ahead reads above what the claims before it passed; the
        // rows up to `complete` have all committed (or gone) before it
        // begins (see `ahead`).
        let run = ahead.then(|| self.inner.ahead.start(owner));
        let complete = self.inner.floor.complete();
        let mut conn = RelayConn::begin(&self.inner, "claim").await?;
        let query = match exclude {
            Some(ids) => sqlx::query(&sql.claim_ahead)
                .bind(owner)
                .bind(limit)
                .bind(secs(request.lease))
                .bind(if run.is_some_and(|r| r.covers_outstanding) {
                    Vec::new()
                } else {
                    ids
                })
                .bind(floor)
                .bind(server_started)
                .bind(run.and_then(|r| r.passed).map_or(i64::MIN, |(seq, _)| seq))
                .bind(run.and_then(|r| r.passed).map(|(_, on)| on)),
            // Incoming rows matter only to a relay that polls: while LISTEN
            // is up, their commits wake it (NOTIFY, or `wake` after them).
            // Asking for them anyway cost NOTIFY relays 0.2-0.3 ms of p50
            // at 1,000 msg/s (empty claims kept the shortest wait).
            None => sqlx::query(&sql.claim)
                .bind(owner)
                .bind(limit)
                .bind(secs(request.lease))
                .bind(floor)
                .bind(server_started)
                .bind(!self.inner.waiting.listening.load(Ordering::SeqCst)),
        };
        let rows = query
            .fetch_all(conn.db("claim")?)
            .await
            .map_err(err("claim"))?;
        // With messages found, a settle and most likely another claim
        // follow; without, the relay goes idle and hands its connections
        // back.
        let found = rows
            .first()
            .is_some_and(|r| matches!(column::<Option<Uuid>>(r, MESSAGE_AT, true), Ok(Some(_))));
        conn.commit("claim", found).await?;
        if !found {
            self.inner.return_kept();
        }
        // Moves the floor past what settles delete (or back, after the
        // sequence restarted), on a task of its own: claims do not wait.
        if let Some(running) = self.inner.floor.due() {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let (floor, sql) = (&inner.floor, &inner.sql.floor);
                if floor.step(&inner.pool, sql, running).await {
                    // Rows below the old floor may be waiting.
                    inner.wake_all();
                }
            });
        }
        let Some(first) = rows.first() else {
            match run {
                Some(run) => self.inner.ahead.claimed(owner, run, None, true, None),
                None => self.inner.ahead.plain(owner, None),
            }
            return Ok(empty_claim(request));
        };
        let token: i64 = first.try_get("token").map_err(err("claim"))?;
        let now: DateTime<Utc> = first.try_get("now").map_err(err("claim"))?;
        let incoming: Option<bool> = first.try_get("incoming").map_err(err("claim"))?;
        let stamp: Option<i64> = first.try_get("stamp").map_err(err("claim"))?;
        let until: Option<DateTime<Utc>> = first.try_get("until").map_err(err("claim"))?;
        let clear: bool = first.try_get("clear").map_err(err("claim"))?;
        let mut batch = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let id: Option<Uuid> = column(row, MESSAGE_AT, i == 0).map_err(err("claim"))?;
            if id.is_some() {
                batch.push(Self::row_to_message(row, MESSAGE_AT, i == 0)?);
            }
        }
        batch.sort_unstable_by_key(|(seq, _)| *seq);
        let top = batch.last().map(|(seq, _)| *seq);
        match run {
            Some(run) => {
                self.inner.ahead.claimed(owner, run, top, clear, complete);
            }
            None => self.inner.ahead.plain(owner, top),
        }
        let (seqs, messages): (Vec<i64>, Vec<Message>) = batch.into_iter().unzip();
        self.busy(!messages.is_empty()).await;
        let token = u64::try_from(token).unwrap_or(0);
        // The lease ends with the soonest of the partitions' leases (more
        // than half of `lease` from now).
        let left = until
            .and_then(|u| (u - now).to_std().ok())
            .map_or(request.lease, |d| d.min(request.lease));
        if !messages.is_empty() {
            self.inner.owners.update(owner, |s| {
                s.outstanding = Some((token, started.checked_add(left).unwrap_or(started)))
            });
            let rows = messages.iter().map(|m| m.id).zip(seqs).collect();
            let stamp = stamp.and_then(|s| u64::try_from(s).ok()).unwrap_or(0);
            self.inner.held.hold(owner, token, stamp, rows, ahead);
        }
        Ok(Claim {
            lease: Lease {
                owner: request.owner.clone(),
                token: FencingToken(token),
                expires_at: {
                    let now = SystemTime::from(now);
                    now.checked_add(left).unwrap_or(now)
                },
            },
            messages,
            incoming: incoming.unwrap_or(false),
        })
    }

    /// Writes or renews this store's waiting entry; false when it could
    /// not (the relay then waits for its poll interval, as without it).
    async fn announce(&self) -> bool {
        let inner = &self.inner;
        let written = sqlx::Executor::execute(&inner.pool, inner.sql.announce.as_str()).await;
        match written {
            Ok(_) => {
                *inner.lock_written() = Some(std::time::Instant::now());
                true
            }
            Err(e) => {
                debug!(error = %e, "could not announce a waiting relay");
                false
            }
        }
    }

    /// After a claim: once claims have kept finding messages for a while
    /// and no relay of this store waits, the waiting entry goes, and
    /// `Outbox::wake` stops sending NOTIFYs.
    async fn busy(&self, found: bool) {
        let inner = &self.inner;
        let waiting = &inner.waiting;
        let since = {
            let mut since = waiting.busy_since.lock().unwrap_or_else(|p| p.into_inner());
            if !found {
                *since = None;
                return;
            }
            *since.get_or_insert_with(std::time::Instant::now)
        };
        if since.elapsed() >= BUSY_BEFORE_WITHDRAW {
            self.withdraw().await;
        }
    }

    /// Deletes the waiting entry, unless there is none or a relay of this
    /// store waits now.
    async fn withdraw(&self) {
        let inner = &self.inner;
        let waiting = &inner.waiting;
        if waiting.waiters.load(std::sync::atomic::Ordering::SeqCst) > 0
            || inner.lock_written().is_none()
        {
            return;
        }
        let gone = sqlx::Executor::execute(&inner.pool, inner.sql.withdraw.as_str()).await;
        match gone {
            Ok(_) => {
                *inner.lock_written() = None;
                // A lane that started waiting meanwhile announces again.
                inner.wakeup.notify_waiters();
            }
            Err(e) => debug!(error = %e, "could not withdraw the waiting entry"),
        }
    }

    /// A message row: `id, topic, msg_key, payload, headers, created_at,
    /// attempts, not_before, seq` by position from column `at`. `checked`:
    /// the column types are checked (on a result's first row, which has
    /// the same columns as the rest: checking every row of a claim was half
    /// of its decoding).
    fn row_to_message(row: &PgRow, at: usize, checked: bool) -> Result<(i64, Message)> {
        let get = |e: sqlx::Error| db_error(ENGINE, "claim", e);
        let id: Uuid = column(row, at, checked).map_err(get)?;
        let topic: String = column(row, at + 1, checked).map_err(get)?;
        let key: Option<String> = column(row, at + 2, checked).map_err(get)?;
        let payload: Vec<u8> = column(row, at + 3, checked).map_err(get)?;
        let headers: Option<serde_json::Value> = column(row, at + 4, checked).map_err(get)?;
        let created: DateTime<Utc> = column(row, at + 5, checked).map_err(get)?;
        let attempts: i32 = column(row, at + 6, checked).map_err(get)?;
        let not_before: Option<DateTime<Utc>> = column(row, at + 7, checked).map_err(get)?;
        let seq: i64 = column(row, at + 8, checked).map_err(get)?;
        Ok((
            seq,
            Message {
                id: MessageId::from_uuid(id),
                topic,
                key,
                payload: payload.into(),
                headers: headers.map(headers_from_json).unwrap_or_default(),
                created_at: SystemTime::from(created),
                attempts: u32::try_from(attempts).unwrap_or(0),
                not_before: not_before.map(SystemTime::from),
            },
        ))
    }

    /// The filter for a selector: `$1` a topic or NULL, `$2` ids or NULL.
    fn selector(selector: &Selector) -> (Option<String>, Option<Vec<Uuid>>) {
        match selector {
            Selector::Topic(t) => (Some(t.clone()), None),
            Selector::Ids(ids) => (None, Some(ids.iter().map(|i| *i.as_uuid()).collect())),
            _ => (None, None),
        }
    }
}

/// Column `i` of `row`, its type checked or not (see `row_to_message`).
fn column<'r, T>(row: &'r PgRow, i: usize, checked: bool) -> std::result::Result<T, sqlx::Error>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    if checked {
        row.try_get(i)
    } else {
        row.try_get_unchecked(i)
    }
}

const SELECTOR_FILTER: &str =
    "AND ($1::text IS NULL OR topic = $1) AND ($2::uuid[] IS NULL OR id = ANY($2))";

async fn listen(
    pool: PgPool,
    channel: String,
    wakeup: std::sync::Weak<Notify>,
    listening: Arc<std::sync::atomic::AtomicBool>,
    written: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
) {
    let mut failures = 0u32;
    loop {
        listening.store(false, Ordering::SeqCst);
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                failures += 1;
                warn!(error = %e, "outbox LISTEN connection failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(25)))).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            warn!(error = %e, "outbox LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        failures = 0;
        // Written again by the next wait: an entry from before may be gone.
        *written.lock().unwrap_or_else(|p| p.into_inner()) = None;
        listening.store(true, Ordering::SeqCst);
        // A relay that began waiting before LISTEN was up wrote no waiting
        // entry: wake it, so that it claims and waits again with one.
        match wakeup.upgrade() {
            Some(w) => w.notify_one(),
            None => return,
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => {}
                // The connection was lost: LISTEN again on a new one here
                // (not on sqlx's next call, which would not say when it is
                // listening again), then wake the relay, which claims what
                // notifications were missed and writes its entry again.
                Ok(None) => {
                    listening.store(false, Ordering::SeqCst);
                    break;
                }
                Err(e) => {
                    listening.store(false, Ordering::SeqCst);
                    warn!(error = %e, "outbox LISTEN connection lost; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
            match wakeup.upgrade() {
                Some(w) => w.notify_one(),
                None => return,
            }
        }
    }
}

#[async_trait]
impl Store for PgStore {
    fn name(&self) -> &str {
        ENGINE
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim> {
        let rebalance = self.rebalance(&request.owner, request.lease);
        if !self.inner.owners.ready(request, rebalance).await? {
            return Ok(empty_claim(request));
        }
        self.take(request, None).await
    }

    async fn claim_ahead(
        &self,
        request: &ClaimRequest,
        outstanding: &Lease,
    ) -> Result<Option<Claim>> {
        let inner = &self.inner;
        if !inner.owners.may_claim_ahead(request, outstanding) {
            return Ok(None);
        }
        let exclude = inner.held.outstanding(request.owner.as_str());
        let exclude = exclude.iter().map(|i| *i.as_uuid()).collect();
        self.take(request, Some(exclude)).await.map(Some)
    }

    async fn settle(&self, lease: &Lease, settlement: &Settlement) -> Result<SettleReport> {
        // Anything but deliveries may make rows due again below what the
        // owner's claims ahead passed, or hold a key (see `ahead`).
        let delivering = settlement.retries.is_empty()
            && settlement.dead.is_empty()
            && settlement.released.is_empty()
            && settlement.deferred.is_empty();
        if !delivering {
            self.inner.ahead.reset(lease.owner.as_str());
        }
        let settled = self.settling(lease, settlement).await;
        if settled.is_err() {
            self.inner.ahead.reset(lease.owner.as_str());
        }
        settled
    }

    async fn notified(&self) {
        let inner = &self.inner;
        let waiting = &inner.waiting;
        if !waiting.listening.load(std::sync::atomic::Ordering::SeqCst) {
            return inner.wakeup.notified().await;
        }
        let _counted = Waiter::enter(waiting);
        // Without a live entry, write it and return at once: the relay
        // claims once more and so sees every transaction that committed
        // before the entry did; one that commits after it finds the entry
        // in `Outbox::wake` and sends a NOTIFY. An entry older than the
        // renewal period counts as gone (it may have expired meanwhile).
        let live = inner
            .lock_written()
            .is_some_and(|t| t.elapsed() < WAITING_RENEW);
        if !live {
            if self.announce().await {
                return;
            }
            return inner.wakeup.notified().await;
        }
        loop {
            let due = inner.lock_written().map_or(Duration::ZERO, |t| {
                WAITING_RENEW.saturating_sub(t.elapsed())
            });
            tokio::select! {
                _ = inner.wakeup.notified() => return,
                _ = tokio::time::sleep(due) => {
                    if !self.announce().await {
                        // The database is not answering: wait as without
                        // an entry (the relay's poll still runs).
                        return inner.wakeup.notified().await;
                    }
                }
            }
        }
    }

    async fn stats(&self) -> Result<Option<Stats>> {
        let t = self.inner.config.table.qualified("");
        let row = sqlx::query(&format!(
            "SELECT count(*) FILTER (WHERE dead_at IS NULL) AS backlog, \
                    EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE dead_at IS NULL))::float8 AS age, \
                    count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead \
             FROM {t} WHERE delivered_at IS NULL"
        ))
        .fetch_one(&self.inner.pool)
        .await
        .map_err(err("stats"))?;
        let backlog: i64 = row.try_get("backlog").map_err(err("stats"))?;
        let dead: i64 = row.try_get("dead").map_err(err("stats"))?;
        let age: Option<f64> = row.try_get("age").map_err(err("stats"))?;
        Ok(Some(Stats {
            backlog: u64::try_from(backlog).unwrap_or(0),
            dead: u64::try_from(dead).unwrap_or(0),
            oldest_pending_age: age
                .filter(|a| a.is_finite())
                .map(|a| Duration::from_secs_f64(a.max(0.0))),
        }))
    }

    async fn leave(&self, owner: &RelayId) -> Result<()> {
        self.inner.return_kept();
        let t = self.inner.config.table.qualified("");
        if !self.inner.owners.busy(owner.as_str()) {
            sqlx::query(&format!(
                "UPDATE {t}_partitions SET owner = NULL, lease_until = NULL WHERE owner = $1"
            ))
            .bind(owner.as_str())
            .execute(&self.inner.pool)
            .await
            .map_err(err("leave"))?;
        }
        // A stopped relay waits for nothing: `wake` stops sending NOTIFYs.
        self.withdraw().await;
        sqlx::query(&format!("DELETE FROM {t}_relays WHERE owner = $1"))
            .bind(owner.as_str())
            .execute(&self.inner.pool)
            .await
            .map_err(err("leave"))?;
        self.inner.owners.remove(owner.as_str());
        self.inner.held.forget(owner.as_str());
        Ok(())
    }
}

#[async_trait]
impl DeadLetters for PgStore {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let t = self.inner.config.table.qualified("");
        let rows = sqlx::query(&format!(
            "SELECT id, topic, msg_key, payload, headers, created_at, attempts, not_before, seq, \
                    last_error, dead_at \
             FROM {t} WHERE dead_at IS NOT NULL AND ($1::text IS NULL OR topic = $1) \
             ORDER BY seq LIMIT $2"
        ))
        .bind(topic)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(err("list_dead"))?;
        rows.iter()
            .map(|row| {
                let (_, message) = Self::row_to_message(row, 0, true)?;
                let error: Option<String> = row.try_get("last_error").map_err(err("list_dead"))?;
                let dead_at: DateTime<Utc> = row.try_get("dead_at").map_err(err("list_dead"))?;
                Ok(DeadLetter {
                    message,
                    error: error.unwrap_or_default(),
                    dead_at: SystemTime::from(dead_at),
                })
            })
            .collect()
    }

    async fn requeue(&self, selector: &Selector) -> Result<u64> {
        let t = self.inner.config.table.qualified("");
        let (topic, ids) = Self::selector(selector);
        let filter = SELECTOR_FILTER;
        let n = sqlx::query(&format!(
            "UPDATE {t} SET dead_at = NULL, attempts = 0, not_before = NULL, \
               lease_owner = NULL, lease_until = NULL, lease_token = NULL \
             WHERE dead_at IS NOT NULL AND delivered_at IS NULL {filter}"
        ))
        .bind(topic)
        .bind(ids)
        .execute(&self.inner.pool)
        .await
        .map_err(|e| {
            // It may have committed: rows may be pending below the floor.
            self.inner.floor.clear();
            self.inner.ahead.reset_all();
            self.inner.wake_all();
            err("requeue")(e)
        })?
        .rows_affected();
        if n > 0 {
            // Pending again, maybe below the claim floor and below what
            // claims ahead passed.
            self.inner.floor.clear();
            self.inner.ahead.reset_all();
            self.inner.wake_all();
        }
        Ok(n)
    }

    async fn discard(&self, selector: &Selector) -> Result<u64> {
        let t = self.inner.config.table.qualified("");
        let (topic, ids) = Self::selector(selector);
        let filter = SELECTOR_FILTER;
        let row = sqlx::query(&format!(
            "WITH x AS (DELETE FROM {t} WHERE dead_at IS NOT NULL {filter} RETURNING msg_key, seq), \
             xb AS (DELETE FROM {t}_blocked b USING x WHERE b.msg_key = x.msg_key AND b.seq = x.seq) \
             SELECT count(*) FROM x"
        ))
        .bind(topic)
        .bind(ids)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(err("discard"))?;
        let n: i64 = row.try_get(0).map_err(err("discard"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

#[async_trait]
impl Purge for PgStore {
    async fn purge_delivered(&self, older_than: Duration, limit: usize) -> Result<u64> {
        let t = self.inner.config.table.qualified("");
        let n = sqlx::query(&format!(
            "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} \
               WHERE delivered_at IS NOT NULL AND delivered_at <= now() - make_interval(secs => $1) \
               LIMIT $2)"
        ))
        .bind(secs(older_than))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.inner.pool)
        .await
        .map_err(err("purge"))?
        .rows_affected();
        Ok(n)
    }
}
