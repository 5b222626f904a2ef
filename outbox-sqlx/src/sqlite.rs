//! SQLite: enqueue on `SqliteConnection`, [`SqliteStore`] for one relay
//! process, migrations. It backs the quickstart.
//!
//! SQLite serialises writers, so a claim runs in one write transaction and
//! keeps order per key with a plain check for earlier rows of the same key;
//! several relays in the same process are safe. Run relays in one process
//! only: the store's clock is that process's clock. Use WAL mode
//! ([`connect`] sets it) so that readers do not block the relay.
//!
//! Times are stored as microseconds since the Unix epoch (INTEGER), ids as
//! hyphenated UUID text, headers as a JSON object.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use outbox_core::{
    Claim, ClaimRequest, DeadLetter, DeadLetters, Error, FencingToken, Lease, Message, MessageId,
    Purge, Result, Selector, SettleReport, Settlement, Stats, Store,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection};
use tokio::sync::Notify;

use crate::error::db_error;
use crate::{
    behind_undecodable, decode_rows, dedupe, headers_from_json, listable, rescheduled, sealed,
    Enqueue, Outbox, StoreConfig, TableName,
};

const ENGINE: &str = "sqlite";

fn err(operation: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| db_error(ENGINE, operation, e)
}

fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

fn from_micros(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

fn now() -> i64 {
    micros(SystemTime::now())
}

/// Opens (creating if missing) a SQLite database file in WAL mode with a
/// busy timeout, suitable for both the application and the relay.
pub async fn connect(path: impl AsRef<std::path::Path>) -> Result<SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .map_err(err("connect"))
}

/// The schema for `table`, as `migrate` applies it.
pub fn schema(table: &TableName) -> String {
    let t = table.qualified("");
    let prefix = table.schema().map(|s| format!("{s}.")).unwrap_or_default();
    let name = table.name();
    format!(
        r#"CREATE TABLE IF NOT EXISTS {t} (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    topic        TEXT NOT NULL,
    msg_key      TEXT,
    payload      BLOB NOT NULL,
    headers      TEXT NOT NULL DEFAULT '{{}}',
    created_at   INTEGER NOT NULL,
    not_before   INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    lease_owner  TEXT,
    lease_until  INTEGER,
    lease_token  INTEGER,
    delivered_at INTEGER,
    dead_at      INTEGER
);
CREATE INDEX IF NOT EXISTS {prefix}{name}_pending ON {name} (seq) WHERE delivered_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS {prefix}{name}_key ON {name} (msg_key, seq) WHERE msg_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS {t}_token (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
INSERT OR IGNORE INTO {t}_token (id, value) VALUES (1, 0);
"#
    )
}

/// Creates the outbox tables if they do not exist. Idempotent; concurrent
/// runs are serialised by SQLite's write lock.
pub async fn migrate(pool: &SqlitePool, table: &TableName) -> Result<()> {
    let ddl = schema(table);
    let mut tx = pool.begin().await.map_err(err("migrate"))?;
    for statement in ddl.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .map_err(err("migrate"))?;
    }
    tx.commit().await.map_err(err("migrate"))?;
    Ok(())
}

impl sealed::Sealed for SqliteConnection {}

#[async_trait]
impl Enqueue for SqliteConnection {
    async fn insert(&mut self, outbox: &Outbox, messages: &[Message]) -> Result<()> {
        let t = outbox.table_name().qualified("");
        // One statement per chunk, rows as a JSON array (SQLite has no arrays).
        let rows: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                serde_json::json!([
                    m.id.to_string(),
                    m.topic,
                    m.key,
                    hex(&m.payload),
                    serde_json::to_string(&m.headers).unwrap_or_else(|_| "{}".into()),
                    micros(m.created_at),
                    m.not_before.map(micros),
                ])
            })
            .collect();
        let sql = format!(
            "INSERT INTO {t} (id, topic, msg_key, payload, headers, created_at, not_before) \
             SELECT value->>0, value->>1, value->>2, unhex(value->>3), value->>4, value->>5, value->>6 \
             FROM json_each(?) ORDER BY key"
        );
        let json = serde_json::Value::Array(rows).to_string();
        sqlx::query(&sql)
            .bind(json)
            .execute(&mut *self)
            .await
            .map_err(err("enqueue"))?;
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The relay-side store on SQLite, for relays in one process.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    config: StoreConfig,
    wakeup: Notify,
    claim: String,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("config", &self.inner.config)
            .finish()
    }
}

const COLUMNS: &str = "id, topic, msg_key, payload, headers, created_at, attempts, not_before, seq";

impl SqliteStore {
    /// A store over `pool` with the default configuration. Call
    /// [`migrate`](Self::migrate) once before use.
    pub fn new(pool: SqlitePool) -> Self {
        Self::with_config(pool, StoreConfig::default())
    }

    /// A store with the given configuration (`listen` and `async_commit`
    /// do not apply to SQLite).
    pub fn with_config(pool: SqlitePool, config: StoreConfig) -> Self {
        let t = config.table.qualified("");
        let hold = if config.hold_dead_letters {
            "OR (e.dead_at IS NOT NULL AND e.delivered_at IS NULL)"
        } else {
            ""
        };
        // A row is claimable when pending, due and unleased, and no earlier
        // row of its key is waiting (not due), leased, or (if held) dead.
        let claim = format!(
            "UPDATE {t} SET lease_owner = ?1, lease_until = ?2, lease_token = ?3 \
             WHERE seq IN ( \
               SELECT m.seq FROM {t} m \
               WHERE m.delivered_at IS NULL AND m.dead_at IS NULL \
                 AND (m.not_before IS NULL OR m.not_before <= ?4) \
                 AND (m.lease_until IS NULL OR m.lease_until <= ?4) \
                 AND (m.msg_key IS NULL OR NOT EXISTS ( \
                   SELECT 1 FROM {t} e WHERE e.msg_key = m.msg_key AND e.seq < m.seq AND ( \
                     (e.delivered_at IS NULL AND e.dead_at IS NULL \
                       AND ((e.not_before IS NOT NULL AND e.not_before > ?4) \
                         OR (e.lease_until IS NOT NULL AND e.lease_until > ?4))) {hold}))) \
               ORDER BY m.seq LIMIT ?5) \
             RETURNING {COLUMNS}"
        );
        SqliteStore {
            inner: Arc::new(Inner {
                pool,
                config,
                wakeup: Notify::new(),
                claim,
            }),
        }
    }

    /// Creates the tables if they do not exist (see [`migrate`]).
    pub async fn migrate(&self) -> Result<()> {
        migrate(&self.inner.pool, &self.inner.config.table).await
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    fn table(&self) -> String {
        self.inner.config.table.qualified("")
    }

    /// Decodes claimed rows. A row another program wrote that cannot be
    /// decoded (an `id` that is not a UUID, a time that is not an integer)
    /// would fail every claim for good: it is dead-lettered instead, in the
    /// claim's transaction, and later rows of its key in the claim are
    /// handed back for the next claim (which holds them behind it with
    /// `hold_dead_letters`).
    async fn decode_or_bury(
        &self,
        tx: &mut SqliteConnection,
        rows: &[SqliteRow],
        now: i64,
    ) -> Result<Vec<(i64, Message)>> {
        let t = self.table();
        let (mut decoded, undecodable) = decode_rows(rows, Self::row_to_message, |row| {
            let seq = row.try_get::<i64, _>("seq").ok()?;
            Some((seq, row.try_get("msg_key").unwrap_or(None)))
        })?;
        for u in &undecodable {
            sqlx::query(&format!(
                "UPDATE {t} SET dead_at = ?1, last_error = ?2, \
                   lease_owner = NULL, lease_until = NULL, lease_token = NULL \
                 WHERE seq = ?3"
            ))
            .bind(now)
            .bind(&u.error)
            .bind(u.seq)
            .execute(&mut *tx)
            .await
            .map_err(err("claim"))?;
        }
        // Later rows of their keys go back for the next claim.
        for (seq, m) in &decoded {
            if behind_undecodable(&undecodable, *seq, &m.key) {
                sqlx::query(&format!(
                    "UPDATE {t} SET lease_owner = NULL, lease_until = NULL, lease_token = NULL \
                     WHERE seq = ?1"
                ))
                .bind(seq)
                .execute(&mut *tx)
                .await
                .map_err(err("claim"))?;
            }
        }
        decoded.retain(|(seq, m)| !behind_undecodable(&undecodable, *seq, &m.key));
        Ok(decoded)
    }

    fn row_to_message(row: &SqliteRow) -> Result<(i64, Message)> {
        let get = |e: sqlx::Error| db_error(ENGINE, "claim", e);
        let id: String = row.try_get("id").map_err(get)?;
        let id: MessageId = id.parse().map_err(|e: outbox_core::ValidationError| {
            Error::from(e).with_backend(ENGINE).with_operation("claim")
        })?;
        let payload: Vec<u8> = row.try_get("payload").map_err(get)?;
        let headers: String = row.try_get("headers").map_err(get)?;
        let headers = serde_json::from_str(&headers).unwrap_or(serde_json::Value::Null);
        let created: i64 = row.try_get("created_at").map_err(get)?;
        let not_before: Option<i64> = row.try_get("not_before").map_err(get)?;
        let attempts: i64 = row.try_get("attempts").map_err(get)?;
        let seq: i64 = row.try_get("seq").map_err(get)?;
        Ok((
            seq,
            Message {
                id,
                topic: row.try_get("topic").map_err(get)?,
                key: row.try_get("msg_key").map_err(get)?,
                payload: payload.into(),
                headers: headers_from_json(headers),
                created_at: from_micros(created),
                attempts: u32::try_from(attempts).unwrap_or(0),
                not_before: not_before.map(from_micros),
            },
        ))
    }

    /// `(topic, ids)` as bound for the selector filter.
    fn selector(selector: &Selector) -> (Option<String>, Option<String>) {
        match selector {
            Selector::Topic(t) => (Some(t.clone()), None),
            Selector::Ids(ids) => (None, Some(ids_json(ids))),
            _ => (None, None),
        }
    }
}

const SELECTOR_FILTER: &str = "AND (?1 IS NULL OR topic = ?1) \
     AND (?2 IS NULL OR id IN (SELECT value FROM json_each(?2)))";

fn ids_json(ids: &[MessageId]) -> String {
    serde_json::Value::Array(
        ids.iter()
            .map(|i| serde_json::Value::String(i.to_string()))
            .collect(),
    )
    .to_string()
}

#[async_trait]
impl Store for SqliteStore {
    fn name(&self) -> &str {
        ENGINE
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim> {
        let t = self.table();
        let now = now();
        let until =
            now.saturating_add(i64::try_from(request.lease.as_micros()).unwrap_or(i64::MAX));
        let mut tx = self.inner.pool.begin().await.map_err(err("claim"))?;
        // Writing first takes SQLite's write lock before anything is read.
        let token: i64 = sqlx::query_scalar(&format!(
            "UPDATE {t}_token SET value = value + 1 WHERE id = 1 RETURNING value"
        ))
        .fetch_one(&mut *tx)
        .await
        .map_err(err("claim"))?;
        let rows = sqlx::query(&self.inner.claim)
            .bind(request.owner.as_str())
            .bind(until)
            .bind(token)
            .bind(now)
            .bind(i64::try_from(request.limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(err("claim"))?;
        let mut messages = self.decode_or_bury(&mut tx, &rows, now).await?;
        tx.commit().await.map_err(err("claim"))?;
        messages.sort_by_key(|(seq, _)| *seq);
        Ok(Claim {
            lease: Lease {
                owner: request.owner.clone(),
                token: FencingToken(u64::try_from(token).unwrap_or(0)),
                expires_at: from_micros(until),
            },
            messages: messages.into_iter().map(|(_, m)| m).collect(),
            incoming: false,
        })
    }

    async fn settle(&self, lease: &Lease, settlement: &Settlement) -> Result<SettleReport> {
        if settlement.is_empty() {
            return Ok(SettleReport::default());
        }
        let t = self.table();
        let s = dedupe(settlement);
        let token = i64::try_from(lease.token.0).unwrap_or(-1);
        let now = now();
        let ours = "lease_token = ?1 AND delivered_at IS NULL AND dead_at IS NULL";
        let unlease = "lease_owner = NULL, lease_until = NULL, lease_token = NULL";
        let delivered = if self.inner.config.keep_delivered {
            format!(
                "UPDATE {t} SET delivered_at = ?3, {unlease} \
                 WHERE {ours} AND id IN (SELECT value FROM json_each(?2))"
            )
        } else {
            format!("DELETE FROM {t} WHERE {ours} AND id IN (SELECT value FROM json_each(?2)) AND ?3 IS NOT NULL")
        };
        let retry = format!(
            "UPDATE {t} SET attempts = attempts + (x.value->>3), last_error = x.value->>1, \
               not_before = ?3 + (x.value->>2), {unlease} \
             FROM json_each(?2) x WHERE {t}.id = x.value->>0 AND {t}.{ours}"
        );
        let dead = format!(
            "UPDATE {t} SET attempts = attempts + 1, last_error = x.value->>1, dead_at = ?3, {unlease} \
             FROM json_each(?2) x WHERE {t}.id = x.value->>0 AND {t}.{ours}"
        );
        let release = format!(
            "UPDATE {t} SET {unlease} WHERE {ours} AND id IN (SELECT value FROM json_each(?2)) AND ?3 IS NOT NULL"
        );
        let retries = serde_json::Value::Array(
            rescheduled(&s)
                .into_iter()
                .map(|(r, attempt)| {
                    serde_json::json!([
                        r.id.to_string(),
                        r.error,
                        i64::try_from(r.delay.as_micros()).unwrap_or(i64::MAX),
                        attempt
                    ])
                })
                .collect(),
        )
        .to_string();
        let deaths = serde_json::Value::Array(
            s.dead
                .iter()
                .map(|f| serde_json::json!([f.id.to_string(), f.error]))
                .collect(),
        )
        .to_string();
        let mut tx = self.inner.pool.begin().await.map_err(err("settle"))?;
        let mut counts = [0u64; 4];
        for (i, (sql, arg)) in [
            (&delivered, ids_json(&s.delivered)),
            (&retry, retries),
            (&dead, deaths),
            (&release, ids_json(&s.released)),
        ]
        .into_iter()
        .enumerate()
        {
            if arg == "[]" {
                continue;
            }
            counts[i] = sqlx::query(sql)
                .bind(token)
                .bind(arg)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(err("settle"))?
                .rows_affected();
        }
        tx.commit().await.map_err(err("settle"))?;
        Ok(SettleReport {
            delivered: counts[0],
            rescheduled: counts[1],
            dead_lettered: counts[2],
            released: counts[3],
        })
    }

    async fn notified(&self) {
        self.inner.wakeup.notified().await
    }

    async fn stats(&self) -> Result<Option<Stats>> {
        let t = self.table();
        let row = sqlx::query(&format!(
            "SELECT count(*) FILTER (WHERE dead_at IS NULL) AS backlog, \
                    min(created_at) FILTER (WHERE dead_at IS NULL) AS oldest, \
                    count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead \
             FROM {t} WHERE delivered_at IS NULL"
        ))
        .fetch_one(&self.inner.pool)
        .await
        .map_err(err("stats"))?;
        let backlog: i64 = row.try_get("backlog").map_err(err("stats"))?;
        let dead: i64 = row.try_get("dead").map_err(err("stats"))?;
        let oldest: Option<i64> = row.try_get("oldest").map_err(err("stats"))?;
        Ok(Some(Stats {
            backlog: u64::try_from(backlog).unwrap_or(0),
            dead: u64::try_from(dead).unwrap_or(0),
            oldest_pending_age: oldest
                .map(|o| Duration::from_micros(u64::try_from(now() - o).unwrap_or(0))),
        }))
    }
}

#[async_trait]
impl DeadLetters for SqliteStore {
    async fn list_dead(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let t = self.table();
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS}, last_error, dead_at FROM {t} \
             WHERE dead_at IS NOT NULL AND delivered_at IS NULL AND (?1 IS NULL OR topic = ?1) \
             ORDER BY seq LIMIT ?2"
        ))
        .bind(topic)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(err("list_dead"))?;
        rows.iter()
            .filter_map(|row| listable(row, Self::row_to_message(row), &t))
            .map(|(row, message)| {
                let error: Option<String> = row.try_get("last_error").map_err(err("list_dead"))?;
                let dead_at: i64 = row.try_get("dead_at").map_err(err("list_dead"))?;
                Ok(DeadLetter {
                    message,
                    error: error.unwrap_or_default(),
                    dead_at: from_micros(dead_at),
                })
            })
            .collect()
    }

    async fn requeue(&self, selector: &Selector) -> Result<u64> {
        let t = self.table();
        let (topic, ids) = Self::selector(selector);
        let n = sqlx::query(&format!(
            "UPDATE {t} SET dead_at = NULL, attempts = 0, not_before = NULL, \
               lease_owner = NULL, lease_until = NULL, lease_token = NULL \
             WHERE dead_at IS NOT NULL AND delivered_at IS NULL {SELECTOR_FILTER}"
        ))
        .bind(topic)
        .bind(ids)
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
        let (topic, ids) = Self::selector(selector);
        let n = sqlx::query(&format!(
            "DELETE FROM {t} WHERE dead_at IS NOT NULL AND delivered_at IS NULL {SELECTOR_FILTER}"
        ))
        .bind(topic)
        .bind(ids)
        .execute(&self.inner.pool)
        .await
        .map_err(err("discard"))?
        .rows_affected();
        Ok(n)
    }
}

#[async_trait]
impl Purge for SqliteStore {
    async fn purge_delivered(&self, older_than: Duration, limit: usize) -> Result<u64> {
        let t = self.table();
        let cutoff =
            now().saturating_sub(i64::try_from(older_than.as_micros()).unwrap_or(i64::MAX));
        let n = sqlx::query(&format!(
            "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} \
               WHERE delivered_at IS NOT NULL AND delivered_at <= ?1 LIMIT ?2)"
        ))
        .bind(cutoff)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.inner.pool)
        .await
        .map_err(err("purge"))?
        .rows_affected();
        Ok(n)
    }
}
