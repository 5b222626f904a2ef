//! MySQL 8 / MariaDB 10.6+: enqueue on `MySqlConnection`, [`MySqlStore`] for
//! relays, migrations.
//!
//! The same design as PostgreSQL (see `crate::postgres`): virtual partitions
//! leased by relays, a blocked-keys table for retries, fencing tokens. Rows
//! carry no lease of their own: a claim, in a short READ COMMITTED
//! transaction, stamps a fresh token on the owner's partitions (the update
//! locks them until the claim commits, so no other relay takes them
//! meanwhile) and reads their pending rows with a plain read. A settle
//! touches only rows of partitions the owner still holds with that token or
//! a later one, and only the ids the claim handed out. Times are UTC
//! (`UTC_TIMESTAMP(6)`, the database clock) in `DATETIME(6)` columns.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use outbox_core::{
    Claim, ClaimRequest, DeadLetter, DeadLetters, Error, FencingToken, Lease, Message, MessageId,
    Purge, RelayId, Result, Selector, SettleReport, Settlement, Stats, Store,
};
use sqlx::mysql::{MySqlPool, MySqlRow};
use sqlx::types::chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::{Acquire, MySqlConnection, Row};
use tokio::sync::Notify;
use tracing::debug;

use crate::error::db_error;
use crate::{behind_undecodable, bounded, decode_rows, listable, rescheduled, runs, to_settle};
use crate::{
    empty_claim, headers_from_json, sealed, Enqueue, Held, Outbox, Owners, StoreConfig, TableName,
    PARTITIONS,
};

const ENGINE: &str = "mysql";

fn err(operation: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| db_error(ENGINE, operation, e)
}

fn utc(t: SystemTime) -> NaiveDateTime {
    DateTime::<Utc>::from(t).naive_utc()
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// `?, ?, ?` for `n` values.
fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// Most values in one `NOT IN` list of a claim ahead: MariaDB turns a list
/// of 1,000 or more (`in_predicate_conversion_threshold`) into a join
/// with a derived table.
const NOT_IN_CHUNK: usize = 999;

/// A claim ahead's condition that leaves out the rows of `seqs` (the
/// owner's outstanding claims), one bind parameter each.
///
/// By `seq`, not by id: `seq` is in every entry of the pending index, so
/// the scan drops those rows before it reads them. By id it read each
/// (1,000 rows handed out for 3,000 read: 7.7 ms against 3.0 ms per claim
/// of 1,000, MariaDB 10.11, `ANALYZE`); as one list of 2,000 it was
/// turned into a join and read them too (8.4 ms).
fn outside(seqs: &[i64]) -> String {
    seqs.chunks(NOT_IN_CHUNK)
        .map(|c| format!(" AND m.seq NOT IN ({})", marks(c.len())))
        .collect()
}

/// The schema for `table`, as `migrate` applies it.
pub fn schema(table: &TableName) -> String {
    let t = table.qualified("");
    let name = table.name();
    let create_db = table
        .schema()
        .map(|s| format!("CREATE DATABASE IF NOT EXISTS {s};\n"))
        .unwrap_or_default();
    let parts = (0..PARTITIONS)
        .map(|p| format!("({p})"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"{create_db}CREATE TABLE IF NOT EXISTS {t} (
    seq          BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    id           VARCHAR(36) NOT NULL,
    topic        VARCHAR(255) NOT NULL,
    msg_key      VARCHAR(1024) NULL,
    key_hash     BINARY(32) AS (UNHEX(SHA2(msg_key, 256))) VIRTUAL,
    `partition`  SMALLINT AS (CRC32(COALESCE(msg_key, id)) & {mask}) STORED,
    payload      LONGBLOB NOT NULL,
    headers      LONGTEXT NOT NULL,
    created_at   DATETIME(6) NOT NULL,
    not_before   DATETIME(6) NULL,
    attempts     INT NOT NULL DEFAULT 0,
    last_error   TEXT NULL,
    -- Row leases: not used by MySqlStore since it stamps partitions; a
    -- claim still skips rows an older version leased until they expire.
    lease_owner  VARCHAR(255) NULL,
    lease_until  DATETIME(6) NULL,
    lease_token  BIGINT NULL,
    delivered_at DATETIME(6) NULL,
    dead_at      DATETIME(6) NULL,
    UNIQUE KEY {name}_id (id),
    KEY {name}_pending (delivered_at, dead_at, seq)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE IF NOT EXISTS {t}_partitions (
    `partition`  SMALLINT PRIMARY KEY,
    owner        VARCHAR(255) NULL,
    lease_until  DATETIME(6) NULL,
    claim_token  BIGINT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
INSERT IGNORE INTO {t}_partitions (`partition`) VALUES {parts};
CREATE TABLE IF NOT EXISTS {t}_relays (
    owner       VARCHAR(255) PRIMARY KEY,
    alive_until DATETIME(6) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE IF NOT EXISTS {t}_blocked (
    key_hash BINARY(32) NOT NULL,
    seq      BIGINT NOT NULL,
    PRIMARY KEY (key_hash, seq)
) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS {t}_token (
    id    TINYINT PRIMARY KEY,
    value BIGINT NOT NULL
) ENGINE=InnoDB;
INSERT IGNORE INTO {t}_token (id, value) VALUES (1, 0);
"#,
        mask = PARTITIONS - 1,
    )
}

/// Creates the outbox tables (and the database of a qualified name) if they
/// do not exist. Idempotent; a named lock serialises concurrent runs.
pub async fn migrate(pool: &MySqlPool, table: &TableName) -> Result<()> {
    let ddl = schema(table);
    let lock = format!("outbox-migrate:{table}");
    let mut conn = pool.acquire().await.map_err(err("migrate"))?;
    sqlx::query("SELECT GET_LOCK(?, 60)")
        .bind(&lock)
        .execute(&mut *conn)
        .await
        .map_err(err("migrate"))?;
    let mut result = Ok(());
    for statement in ddl.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
        if let Err(e) = sqlx::query(statement).execute(&mut *conn).await {
            result = Err(db_error(ENGINE, "migrate", e));
            break;
        }
    }
    if result.is_ok() {
        result = add_claim_token(&mut conn, table).await;
    }
    sqlx::query("SELECT RELEASE_LOCK(?)")
        .bind(&lock)
        .execute(&mut *conn)
        .await
        .map_err(err("migrate"))?;
    result
}

/// Tables made before partitions carried claim tokens get the column (MySQL
/// 8 has no `ADD COLUMN IF NOT EXISTS`).
async fn add_claim_token(conn: &mut MySqlConnection, table: &TableName) -> Result<()> {
    let found: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.columns \
         WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ? \
           AND column_name = 'claim_token'",
    )
    .bind(table.schema())
    .bind(format!("{}_partitions", table.name()))
    .fetch_one(&mut *conn)
    .await
    .map_err(err("migrate"))?;
    if found == 0 {
        let t = table.qualified("");
        sqlx::query(&format!(
            "ALTER TABLE {t}_partitions ADD COLUMN claim_token BIGINT NULL"
        ))
        .execute(&mut *conn)
        .await
        .map_err(err("migrate"))?;
    }
    Ok(())
}

impl sealed::Sealed for MySqlConnection {}

#[async_trait]
impl Enqueue for MySqlConnection {
    async fn insert(&mut self, outbox: &Outbox, messages: &[Message]) -> Result<()> {
        let t = outbox.table_name().qualified("");
        // A delayed keyed message holds back later messages of its key.
        let delayed: Vec<String> = messages
            .iter()
            .filter(|m| m.key.is_some() && m.not_before.is_some())
            .map(|m| m.id.to_string())
            .collect();
        if delayed.is_empty() {
            return write(self, &t, messages, &delayed).await;
        }
        let open = in_transaction(self).await?;
        if open {
            return write(self, &t, messages, &delayed).await;
        }
        if sqlx::Connection::is_in_transaction(self) {
            // sqlx began a transaction here that the server no longer has:
            // it was rolled back (a deadlock does that on MySQL). Writing
            // now would commit the message without the caller's rows.
            return Err(Error::transient(
                outbox_core::ErrorKind::Database,
                "the transaction was rolled back on the server (a deadlock?): retry the whole \
                 transaction, not this statement",
            )
            .with_backend(ENGINE)
            .with_operation("enqueue"));
        }
        // Its row and the entry that holds the key back commit together:
        // a relay that saw the row alone could hand out a later message of
        // the key first, or settle the row and leave the entry behind,
        // holding the key back for good. Without a transaction open
        // (autocommit), they get one of their own.
        let mut tx = sqlx::Connection::begin(&mut *self)
            .await
            .map_err(err("enqueue"))?;
        write(&mut tx, &t, messages, &delayed).await?;
        tx.commit().await.map_err(err("enqueue"))
    }
}

/// MySQL's `ER_SP_DOES_NOT_EXIST`: "SAVEPOINT ... does not exist".
const NO_SUCH_SAVEPOINT: u16 = 1305;

/// Whether `conn` has a transaction open, begun by sqlx or by hand (or
/// implicitly, with `autocommit` off). Outside one, `RELEASE SAVEPOINT`
/// finds no savepoint (error 1305) on MySQL and MariaDB alike; inside, the
/// pair changes nothing.
async fn in_transaction(conn: &mut MySqlConnection) -> Result<bool> {
    sqlx::Executor::execute(&mut *conn, "SAVEPOINT outbox_sqlx_probe")
        .await
        .map_err(err("enqueue"))?;
    match sqlx::Executor::execute(&mut *conn, "RELEASE SAVEPOINT outbox_sqlx_probe").await {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e))
            if e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some_and(|e| e.number() == NO_SUCH_SAVEPOINT) =>
        {
            Ok(false)
        }
        Err(e) => Err(err("enqueue")(e)),
    }
}

/// Most bytes of messages (payloads, headers, keys, topics) one insert
/// carries: a statement's parameters travel in one packet, and the server
/// drops a connection whose packet exceeds `max_allowed_packet` (16 MiB by
/// default on MariaDB, 64 MiB on MySQL 8). A message larger than this goes
/// alone.
const INSERT_BYTES: usize = 8 * 1024 * 1024;

/// The rows of `messages`, and the entries of the `delayed` ones (ids).
async fn write(
    conn: &mut MySqlConnection,
    t: &str,
    messages: &[Message],
    delayed: &[String],
) -> Result<()> {
    let headers: Vec<String> = messages
        .iter()
        .map(|m| serde_json::to_string(&m.headers).unwrap_or_else(|_| "{}".into()))
        .collect();
    let sizes: Vec<usize> = messages
        .iter()
        .zip(&headers)
        .map(|(m, h)| {
            m.payload.len() + h.len() + m.topic.len() + m.key.as_ref().map_or(0, String::len)
        })
        .collect();
    for run in runs(&sizes, usize::MAX, INSERT_BYTES) {
        let (start, end) = (run.start, run.end);
        let rows = vec!["(?, ?, ?, ?, ?, ?, ?)"; end - start].join(", ");
        let sql = format!(
            "INSERT INTO {t} (id, topic, msg_key, payload, headers, created_at, not_before) \
             VALUES {rows}"
        );
        let mut q = sqlx::query(&sql);
        for (m, h) in messages[start..end].iter().zip(&headers[start..end]) {
            q = q
                .bind(m.id.to_string())
                .bind(m.topic.as_str())
                .bind(m.key.as_deref())
                .bind(m.payload.as_ref())
                .bind(h.as_str())
                .bind(utc(m.created_at))
                .bind(m.not_before.map(utc));
        }
        q.execute(&mut *conn).await.map_err(err("enqueue"))?;
    }
    if !delayed.is_empty() {
        let sql = format!(
            "INSERT IGNORE INTO {t}_blocked (key_hash, seq) SELECT key_hash, seq FROM {t} \
             WHERE id IN ({})",
            marks(delayed.len())
        );
        let mut q = sqlx::query(&sql);
        for id in delayed {
            q = q.bind(id);
        }
        q.execute(&mut *conn).await.map_err(err("enqueue"))?;
    }
    Ok(())
}

/// Most rows a [`MySqlStore`] claim hands out, whatever the relay's batch
/// size: a statement takes at most [`MAX_PARAMETERS`], and a claim ahead
/// binds the `seq` of every outstanding row (two claims while the relay
/// settles one and publishes the other), a settle of retries three per row.
pub const MAX_CLAIM: usize = 20_000;

/// Most parameters one MySQL statement takes.
const MAX_PARAMETERS: usize = 65_535;

/// Most retries or dead letters one settle statement records, each with
/// its error text (at most [`outbox_core::MAX_ERROR_TEXT`] bytes): the
/// statement stays within a few MiB, under `max_allowed_packet` (16 MiB by
/// default on MariaDB).
const ERRORS_PER_STATEMENT: usize = 1_000;

/// The relay-side store on MySQL / MariaDB. Cheap to clone. A claim hands
/// out at most [`MAX_CLAIM`] rows.
#[derive(Clone)]
pub struct MySqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: MySqlPool,
    config: StoreConfig,
    owners: Owners,
    /// Per owner: the rows (ids and `seq`s) its outstanding claims handed
    /// out.
    held: Held,
    wakeup: Notify,
}

impl std::fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlStore")
            .field("config", &self.inner.config)
            .finish()
    }
}

// Text columns use a binary collation (exact comparison), which the MySQL
// protocol reports as binary: cast them back to text for decoding.
const COLUMNS: &str = "CAST(id AS CHAR) AS id, CAST(topic AS CHAR) AS topic, \
     CAST(msg_key AS CHAR) AS msg_key, payload, CAST(headers AS CHAR) AS headers, created_at, \
     attempts, not_before, seq";
const PENDING: &str = "delivered_at IS NULL AND dead_at IS NULL";
const UNLEASE: &str = "lease_owner = NULL, lease_until = NULL, lease_token = NULL";
const NOW: &str = "UTC_TIMESTAMP(6)";

impl MySqlStore {
    /// A store over `pool` with the default configuration. Call
    /// [`migrate`](Self::migrate) once before use.
    pub fn new(pool: MySqlPool) -> Self {
        Self::with_config(pool, StoreConfig::default())
    }

    /// A store with the given configuration (`listen` and `async_commit` do
    /// not apply to MySQL).
    pub fn with_config(pool: MySqlPool, config: StoreConfig) -> Self {
        MySqlStore {
            inner: Arc::new(Inner {
                pool,
                config,
                owners: Owners::default(),
                held: Held::default(),
                wakeup: Notify::new(),
            }),
        }
    }

    /// Creates the tables if they do not exist (see [`migrate`]).
    pub async fn migrate(&self) -> Result<()> {
        migrate(&self.inner.pool, &self.inner.config.table).await
    }

    /// The pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.inner.pool
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    fn table(&self) -> String {
        self.inner.config.table.qualified("")
    }

    /// A READ COMMITTED transaction: InnoDB then locks only the rows a
    /// locking read returns.
    async fn begin(
        &self,
        conn: &mut sqlx::pool::PoolConnection<sqlx::MySql>,
        operation: &'static str,
    ) -> Result<()> {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut **conn)
            .await
            .map_err(err(operation))?;
        Ok(())
    }

    async fn rebalance(&self, owner: &RelayId, lease: Duration) -> Result<()> {
        let t = self.table();
        let mut conn = self.inner.pool.acquire().await.map_err(err("claim"))?;
        self.begin(&mut conn, "claim").await?;
        let mut tx = conn.begin().await.map_err(err("claim"))?;
        sqlx::query(&format!(
            "INSERT INTO {t}_relays (owner, alive_until) VALUES (?, {NOW} + INTERVAL ? MICROSECOND) \
             ON DUPLICATE KEY UPDATE alive_until = VALUES(alive_until)"
        ))
        .bind(owner.as_str())
        .bind(micros(lease))
        .execute(&mut *tx)
        .await
        .map_err(err("claim"))?;
        let live: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {t}_relays WHERE alive_until > {NOW}"
        ))
        .fetch_one(&mut *tx)
        .await
        .map_err(err("claim"))?;
        let target = (i64::from(PARTITIONS) + live.max(1) - 1) / live.max(1);
        let mine: Vec<i16> = sqlx::query_scalar(&format!(
            "SELECT `partition` FROM {t}_partitions WHERE owner = ? ORDER BY `partition`"
        ))
        .bind(owner.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(err("claim"))?;
        let have = mine.len() as i64;
        if have > target && !self.inner.owners.busy(owner.as_str()) {
            let extra = &mine[usize::try_from(target).unwrap_or(0)..];
            let sql = format!(
                "UPDATE {t}_partitions SET owner = NULL, lease_until = NULL \
                 WHERE owner = ? AND `partition` IN ({})",
                marks(extra.len())
            );
            let mut q = sqlx::query(&sql).bind(owner.as_str());
            for p in extra {
                q = q.bind(*p);
            }
            q.execute(&mut *tx).await.map_err(err("claim"))?;
            debug!(%owner, count = extra.len(), "releasing partitions for other relays");
        } else if have < target {
            let free: Vec<i16> = sqlx::query_scalar(&format!(
                "SELECT `partition` FROM {t}_partitions \
                 WHERE owner IS NULL OR lease_until <= {NOW} \
                 ORDER BY `partition` LIMIT ? FOR UPDATE SKIP LOCKED"
            ))
            .bind(target - have)
            .fetch_all(&mut *tx)
            .await
            .map_err(err("claim"))?;
            if !free.is_empty() {
                let sql = format!(
                    "UPDATE {t}_partitions SET owner = ?, lease_until = {NOW} + INTERVAL ? MICROSECOND \
                     WHERE `partition` IN ({})",
                    marks(free.len())
                );
                let mut q = sqlx::query(&sql).bind(owner.as_str()).bind(micros(lease));
                for p in &free {
                    q = q.bind(*p);
                }
                q.execute(&mut *tx).await.map_err(err("claim"))?;
            }
        }
        tx.commit().await.map_err(err("claim"))?;
        Ok(())
    }

    /// Claims for `request.owner`; `exclude` (claiming ahead) leaves out
    /// the rows of its outstanding claims.
    async fn take(&self, request: &ClaimRequest, exclude: Option<Vec<i64>>) -> Result<Claim> {
        let owner = request.owner.as_str();
        let owners = &self.inner.owners;
        let t = self.table();
        let lease = micros(request.lease);
        let started = tokio::time::Instant::now();
        let mut conn = self.inner.pool.acquire().await.map_err(err("claim"))?;
        self.begin(&mut conn, "claim").await?;
        let mut tx = conn.begin().await.map_err(err("claim"))?;
        let token = sqlx::query(&format!(
            "UPDATE {t}_token SET value = LAST_INSERT_ID(value + 1) WHERE id = 1"
        ))
        .execute(&mut *tx)
        .await
        .map_err(err("claim"))?
        .last_insert_id();
        // Renews the owner's partition leases and stamps them with this
        // claim's token; the rows stay locked until the commit, so no other
        // relay takes a partition while its rows are read.
        let stamped = sqlx::query(&format!(
            "UPDATE {t}_partitions SET lease_until = {NOW} + INTERVAL ? MICROSECOND, \
               claim_token = ? WHERE owner = ?"
        ))
        .bind(lease)
        .bind(token)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(err("claim"))?
        .rows_affected();
        let mut rows = Vec::new();
        let mut now = Utc::now().naive_utc();
        if stamped > 0 {
            // The partitions as literals: with a subquery the optimizer may
            // give up the scan of the pending index in seq order (and the
            // early stop at the limit) for a join.
            let parts: Vec<i16> = sqlx::query_scalar(&format!(
                "SELECT `partition` FROM {t}_partitions WHERE owner = ?"
            ))
            .bind(owner)
            .fetch_all(&mut *tx)
            .await
            .map_err(err("claim"))?;
            // A plain read, no row locks: only the partitions' owner reads
            // their rows. Rows leased by an older version of this store are
            // skipped until their lease ends; a claim ahead leaves out the
            // rows still to be settled.
            let outside = exclude.as_deref().map_or_else(String::new, outside);
            let sql = format!(
                "SELECT {COLUMNS}, {NOW} AS now FROM {t} m \
                 WHERE m.{PENDING} AND m.`partition` IN ({}) \
                   AND (m.not_before IS NULL OR m.not_before <= {NOW}) \
                   AND (m.lease_until IS NULL OR m.lease_until <= {NOW}) \
                   AND NOT EXISTS (SELECT 1 FROM {t}_blocked b \
                                   WHERE b.key_hash = m.key_hash AND b.seq < m.seq) \
                   {outside} \
                 ORDER BY m.seq LIMIT ?",
                marks(parts.len())
            );
            let mut q = sqlx::query(&sql);
            for p in &parts {
                q = q.bind(*p);
            }
            for seq in exclude.iter().flatten() {
                q = q.bind(*seq);
            }
            if !parts.is_empty() {
                rows = q
                    .bind(i64::try_from(request.limit.min(MAX_CLAIM)).unwrap_or(0))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(err("claim"))?;
            }
            if let Some(r) = rows.first() {
                now = r.try_get("now").map_err(err("claim"))?;
            }
        }
        let decoded = self.decode_or_bury(&mut tx, &rows).await?;
        tx.commit().await.map_err(err("claim"))?;
        let (seqs, messages): (Vec<i64>, Vec<Message>) = decoded.into_iter().unzip();
        if !messages.is_empty() {
            owners.update(owner, |s| {
                // Checked: a store called directly may get any lease.
                let until = started.checked_add(request.lease).unwrap_or(started);
                s.outstanding = Some((token, until))
            });
            let rows = messages.iter().map(|m| m.id).zip(seqs).collect();
            // Every claim stamps its token here: the stamp is the token.
            self.inner
                .held
                .hold(owner, token, token, rows, exclude.is_some());
        }
        Ok(Claim {
            lease: Lease {
                owner: request.owner.clone(),
                token: FencingToken(token),
                expires_at: {
                    let now = SystemTime::from(now.and_utc());
                    now.checked_add(request.lease).unwrap_or(now)
                },
            },
            messages,
            // Which tables other transactions are writing is not cheap to
            // read here (MariaDB lists only waited-for locks).
            incoming: false,
        })
    }

    /// Decodes claimed rows. A row another program wrote that cannot be
    /// decoded (an `id` that is not a UUID) would fail every claim of its
    /// owner for good: it is dead-lettered instead, in the claim's
    /// transaction, and later rows of its key wait for the next claim
    /// (behind it, with `hold_dead_letters`, until it is requeued).
    async fn decode_or_bury(
        &self,
        tx: &mut MySqlConnection,
        rows: &[MySqlRow],
    ) -> Result<Vec<(i64, Message)>> {
        let t = self.table();
        let (mut decoded, undecodable) = decode_rows(rows, Self::row_to_message, |row| {
            let seq = row.try_get::<i64, _>("seq").ok()?;
            Some((seq, row.try_get("msg_key").unwrap_or(None)))
        })?;
        for u in &undecodable {
            sqlx::query(&format!(
                "UPDATE {t} SET dead_at = {NOW}, last_error = ? WHERE seq = ?"
            ))
            .bind(&u.error)
            .bind(u.seq)
            .execute(&mut *tx)
            .await
            .map_err(err("claim"))?;
            if self.inner.config.hold_dead_letters && u.key.is_some() {
                sqlx::query(&format!(
                    "INSERT IGNORE INTO {t}_blocked (key_hash, seq) \
                     SELECT key_hash, seq FROM {t} WHERE seq = ?"
                ))
                .bind(u.seq)
                .execute(&mut *tx)
                .await
                .map_err(err("claim"))?;
            }
        }
        // Later rows of their keys are not handed out by this claim.
        decoded.retain(|(seq, m)| !behind_undecodable(&undecodable, *seq, &m.key));
        Ok(decoded)
    }

    fn row_to_message(row: &MySqlRow) -> Result<(i64, Message)> {
        let get = |e: sqlx::Error| db_error(ENGINE, "claim", e);
        let id: String = row.try_get("id").map_err(get)?;
        let id: MessageId = id.parse().map_err(|e: outbox_core::ValidationError| {
            Error::from(e).with_backend(ENGINE).with_operation("claim")
        })?;
        let payload: Vec<u8> = row.try_get("payload").map_err(get)?;
        let headers: String = row.try_get("headers").map_err(get)?;
        let headers = serde_json::from_str(&headers).unwrap_or(serde_json::Value::Null);
        let created: NaiveDateTime = row.try_get("created_at").map_err(get)?;
        let not_before: Option<NaiveDateTime> = row.try_get("not_before").map_err(get)?;
        let attempts: i32 = row.try_get("attempts").map_err(get)?;
        let seq: i64 = row.try_get("seq").map_err(get)?;
        Ok((
            seq,
            Message {
                id,
                topic: row.try_get("topic").map_err(get)?,
                key: row.try_get("msg_key").map_err(get)?,
                payload: payload.into(),
                headers: headers_from_json(headers),
                created_at: SystemTime::from(created.and_utc()),
                attempts: u32::try_from(attempts).unwrap_or(0),
                not_before: not_before.map(|n| SystemTime::from(n.and_utc())),
            },
        ))
    }

    /// `WHERE` filter and its binds for a selector.
    fn selector(selector: &Selector) -> (String, Vec<String>) {
        match selector {
            Selector::Topic(t) => ("AND topic = ?".into(), vec![t.clone()]),
            Selector::Ids(ids) if ids.is_empty() => ("AND FALSE".into(), Vec::new()),
            Selector::Ids(ids) => (
                format!("AND id IN ({})", marks(ids.len())),
                ids.iter().map(|i| i.to_string()).collect(),
            ),
            _ => (String::new(), Vec::new()),
        }
    }
}

#[async_trait]
impl Store for MySqlStore {
    fn name(&self) -> &str {
        ENGINE
    }

    fn max_claim(&self) -> Option<usize> {
        Some(MAX_CLAIM)
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
        let exclude = inner.held.outstanding_seqs(request.owner.as_str());
        // Binding them all (with the partitions and the limit) would go
        // past a statement's parameters: not now (the relay holds two
        // claims at most, 40,000 rows).
        if exclude.len() > MAX_PARAMETERS - PARTITIONS as usize - 1 {
            return Ok(None);
        }
        self.take(request, Some(exclude)).await.map(Some)
    }

    async fn settle(&self, lease: &Lease, settlement: &Settlement) -> Result<SettleReport> {
        let inner = &self.inner;
        let Some((s, rows)) = to_settle(&inner.owners, &inner.held, lease, settlement) else {
            return Ok(SettleReport::default());
        };
        let owner = lease.owner.as_str();
        let t = self.table();
        let token = i64::try_from(lease.token.0).unwrap_or(-1);
        let mut report = SettleReport::default();
        let mut conn = self.inner.pool.acquire().await.map_err(err("settle"))?;
        self.begin(&mut conn, "settle").await?;
        let mut tx = conn.begin().await.map_err(err("settle"))?;
        // Partitions the owner still holds with this claim's stamp or a
        // later one of its own, by a plain read: as a subquery of the
        // statements below InnoDB would lock them, and a claim ahead
        // stamping them meanwhile would wait for this settle. With them,
        // whether any key is blocked: a delivered row's entry was committed
        // before its claim read the row, so this read sees it.
        let parts: Vec<(i16, bool)> = sqlx::query_as(&format!(
            "SELECT `partition`, EXISTS (SELECT 1 FROM {t}_blocked) FROM {t}_partitions \
             WHERE owner = ? AND claim_token >= ?"
        ))
        .bind(owner)
        .bind(token)
        .fetch_all(&mut *tx)
        .await
        .map_err(err("settle"))?;
        let blocked = parts.iter().any(|(_, b)| *b);
        if parts.is_empty() {
            tx.commit().await.map_err(err("settle"))?;
            self.inner.owners.settled(owner, lease.token.0);
            self.inner.held.release(owner, lease.token.0);
            return Ok(report);
        }
        let parts = parts
            .iter()
            .map(|(p, _)| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let ours = format!("m.`partition` IN ({parts}) AND m.{PENDING}");

        // By `seq`, the primary key (every id left is one the claim handed
        // out).
        let seqs: Vec<i64> = s
            .delivered
            .iter()
            .filter_map(|id| rows.get(id).copied())
            .collect();
        if !seqs.is_empty() {
            let list = marks(seqs.len());
            let unblock = format!(
                "DELETE b FROM {t}_blocked b JOIN {t} m ON b.key_hash = m.key_hash AND b.seq = m.seq \
                 WHERE {ours} AND m.seq IN ({list})"
            );
            let done = if self.inner.config.keep_delivered {
                format!("UPDATE {t} m SET m.delivered_at = {NOW}, {UNLEASE} WHERE {ours} AND m.seq IN ({list})")
            } else {
                format!("DELETE m FROM {t} m WHERE {ours} AND m.seq IN ({list})")
            };
            // No key blocked: nothing to unblock (the join cost a tenth of
            // the settle).
            let statements = if blocked {
                vec![unblock, done]
            } else {
                vec![done]
            };
            for (i, sql) in statements.iter().enumerate() {
                let mut q = sqlx::query(sql);
                for seq in &seqs {
                    q = q.bind(*seq);
                }
                let n = q
                    .execute(&mut *tx)
                    .await
                    .map_err(err("settle"))?
                    .rows_affected();
                if i + 1 == statements.len() {
                    report.delivered = n;
                }
            }
        }

        // Per-row values travel as a derived table of UNION ALL selects.
        let rows_of = |n: usize, cols: &[&str]| -> String {
            let first = cols
                .iter()
                .map(|c| format!("? AS {c}"))
                .collect::<Vec<_>>()
                .join(", ");
            let rest = vec!["?"; cols.len()].join(", ");
            let mut sql = format!("SELECT {first}");
            for _ in 1..n {
                sql.push_str(&format!(" UNION ALL SELECT {rest}"));
            }
            sql
        };

        let again = rescheduled(&s);
        if !again.is_empty() {
            let ids: Vec<String> = again.iter().map(|(r, _)| r.id.to_string()).collect();
            let block = format!(
                "INSERT IGNORE INTO {t}_blocked (key_hash, seq) SELECT m.key_hash, m.seq FROM {t} m \
                 WHERE {ours} AND m.msg_key IS NOT NULL AND m.id IN ({})",
                marks(ids.len())
            );
            let mut q = sqlx::query(&block);
            for id in &ids {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await.map_err(err("settle"))?;
            for part in again.chunks(ERRORS_PER_STATEMENT) {
                let update = format!(
                    "UPDATE {t} m JOIN ({}) x ON m.id = x.id \
                     SET m.attempts = m.attempts + x.attempt, m.last_error = x.err, \
                       m.not_before = {NOW} + INTERVAL x.delay MICROSECOND, {UNLEASE} \
                     WHERE {ours}",
                    rows_of(part.len(), &["id", "err", "delay", "attempt"])
                );
                let mut q = sqlx::query(&update);
                for (r, attempt) in part {
                    q = q
                        .bind(r.id.to_string())
                        .bind(bounded(&r.error))
                        .bind(micros(r.delay))
                        .bind(*attempt);
                }
                report.rescheduled += q
                    .execute(&mut *tx)
                    .await
                    .map_err(err("settle"))?
                    .rows_affected();
            }
        }

        if !s.dead.is_empty() {
            let ids: Vec<String> = s.dead.iter().map(|f| f.id.to_string()).collect();
            let blocks = if self.inner.config.hold_dead_letters {
                format!(
                    "INSERT IGNORE INTO {t}_blocked (key_hash, seq) SELECT m.key_hash, m.seq FROM {t} m \
                     WHERE {ours} AND m.msg_key IS NOT NULL AND m.id IN ({})",
                    marks(ids.len())
                )
            } else {
                format!(
                    "DELETE b FROM {t}_blocked b JOIN {t} m ON b.key_hash = m.key_hash AND b.seq = m.seq \
                     WHERE {ours} AND m.id IN ({})",
                    marks(ids.len())
                )
            };
            let mut q = sqlx::query(&blocks);
            for id in &ids {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await.map_err(err("settle"))?;
            for part in s.dead.chunks(ERRORS_PER_STATEMENT) {
                let update = format!(
                    "UPDATE {t} m JOIN ({}) x ON m.id = x.id \
                     SET m.attempts = m.attempts + 1, m.last_error = x.err, m.dead_at = {NOW}, {UNLEASE} \
                     WHERE {ours}",
                    rows_of(part.len(), &["id", "err"])
                );
                let mut q = sqlx::query(&update);
                for f in part {
                    q = q.bind(f.id.to_string()).bind(bounded(&f.error));
                }
                report.dead_lettered += q
                    .execute(&mut *tx)
                    .await
                    .map_err(err("settle"))?
                    .rows_affected();
            }
        }

        if !s.released.is_empty() {
            // Nothing to undo (rows carry no lease): the next claim reads
            // them again. Counted as the other engines do.
            let sql = format!(
                "SELECT COUNT(*) FROM {t} m WHERE {ours} AND m.id IN ({})",
                marks(s.released.len())
            );
            let mut q = sqlx::query_scalar::<_, i64>(&sql);
            for id in &s.released {
                q = q.bind(id.to_string());
            }
            let n = q.fetch_one(&mut *tx).await.map_err(err("settle"))?;
            report.released = u64::try_from(n).unwrap_or(0);
        }
        tx.commit().await.map_err(err("settle"))?;
        self.inner.owners.settled(owner, lease.token.0);
        self.inner.held.release(owner, lease.token.0);
        Ok(report)
    }

    async fn notified(&self) {
        self.inner.wakeup.notified().await
    }

    async fn stats(&self) -> Result<Option<Stats>> {
        let t = self.table();
        let row = sqlx::query(&format!(
            "SELECT CAST(COALESCE(SUM(dead_at IS NULL), 0) AS SIGNED) AS backlog, \
                    CAST(COALESCE(SUM(dead_at IS NOT NULL), 0) AS SIGNED) AS dead, \
                    CAST(TIMESTAMPDIFF(MICROSECOND, MIN(CASE WHEN dead_at IS NULL THEN created_at END), {NOW}) AS SIGNED) AS age \
             FROM {t} WHERE delivered_at IS NULL"
        ))
        .fetch_one(&self.inner.pool)
        .await
        .map_err(err("stats"))?;
        let backlog: i64 = row.try_get("backlog").map_err(err("stats"))?;
        let dead: i64 = row.try_get("dead").map_err(err("stats"))?;
        let age: Option<i64> = row.try_get("age").map_err(err("stats"))?;
        Ok(Some(Stats {
            backlog: u64::try_from(backlog).unwrap_or(0),
            dead: u64::try_from(dead).unwrap_or(0),
            oldest_pending_age: age.map(|a| Duration::from_micros(u64::try_from(a).unwrap_or(0))),
        }))
    }

    async fn leave(&self, owner: &RelayId) -> Result<()> {
        let t = self.table();
        if !self.inner.owners.busy(owner.as_str()) {
            sqlx::query(&format!(
                "UPDATE {t}_partitions SET owner = NULL, lease_until = NULL WHERE owner = ?"
            ))
            .bind(owner.as_str())
            .execute(&self.inner.pool)
            .await
            .map_err(err("leave"))?;
        }
        sqlx::query(&format!("DELETE FROM {t}_relays WHERE owner = ?"))
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
impl DeadLetters for MySqlStore {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let t = self.table();
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS}, CAST(last_error AS CHAR) AS last_error, dead_at FROM {t} \
             WHERE dead_at IS NOT NULL AND delivered_at IS NULL AND (? IS NULL OR topic = ?) \
             ORDER BY seq LIMIT ?"
        ))
        .bind(topic)
        .bind(topic)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(err("list_dead"))?;
        rows.iter()
            .filter_map(|row| listable(row, Self::row_to_message(row), &t))
            .map(|(row, message)| {
                let error: Option<String> = row.try_get("last_error").map_err(err("list_dead"))?;
                let dead_at: NaiveDateTime = row.try_get("dead_at").map_err(err("list_dead"))?;
                Ok(DeadLetter {
                    message,
                    error: error.unwrap_or_default(),
                    dead_at: SystemTime::from(dead_at.and_utc()),
                })
            })
            .collect()
    }

    async fn requeue(&self, selector: &Selector) -> Result<u64> {
        let t = self.table();
        let (filter, binds) = Self::selector(selector);
        let sql = format!(
            "UPDATE {t} SET dead_at = NULL, attempts = 0, not_before = NULL, {UNLEASE} \
             WHERE dead_at IS NOT NULL AND delivered_at IS NULL {filter}"
        );
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b);
        }
        let n = q
            .execute(&self.inner.pool)
            .await
            .map_err(err("requeue"))?
            .rows_affected();
        if n > 0 {
            self.inner.wakeup.notify_one();
        }
        Ok(n)
    }

    async fn discard(&self, selector: &Selector) -> Result<u64> {
        let t = self.table();
        let (filter, binds) = Self::selector(selector);
        let mut tx = self.inner.pool.begin().await.map_err(err("discard"))?;
        let unblock =
            format!(
            "DELETE b FROM {t}_blocked b JOIN {t} m ON b.key_hash = m.key_hash AND b.seq = m.seq \
             WHERE m.dead_at IS NOT NULL AND m.delivered_at IS NULL {}",
            filter.replace("AND topic", "AND m.topic").replace("AND id", "AND m.id")
        );
        let delete =
            format!("DELETE FROM {t} WHERE dead_at IS NOT NULL AND delivered_at IS NULL {filter}");
        let mut n = 0;
        for (i, sql) in [unblock, delete].iter().enumerate() {
            let mut q = sqlx::query(sql);
            for b in &binds {
                q = q.bind(b);
            }
            let affected = q
                .execute(&mut *tx)
                .await
                .map_err(err("discard"))?
                .rows_affected();
            if i == 1 {
                n = affected;
            }
        }
        tx.commit().await.map_err(err("discard"))?;
        Ok(n)
    }
}

#[async_trait]
impl Purge for MySqlStore {
    async fn purge_delivered(&self, older_than: Duration, limit: usize) -> Result<u64> {
        let t = self.table();
        let n = sqlx::query(&format!(
            "DELETE FROM {t} WHERE delivered_at IS NOT NULL \
               AND delivered_at <= {NOW} - INTERVAL ? MICROSECOND ORDER BY seq LIMIT ?"
        ))
        .bind(micros(older_than))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.inner.pool)
        .await
        .map_err(err("purge"))?
        .rows_affected();
        Ok(n)
    }
}
