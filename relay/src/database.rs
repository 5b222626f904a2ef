//! The outbox database: which engine a URL names, connecting, migrating,
//! and the health check's `SELECT 1`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{Purge, Store};

use crate::config::Config;
use crate::redact::redact_url;

/// A database engine the relay can read an outbox from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Engine {
    /// PostgreSQL, `postgres://` or `postgresql://`.
    Postgres,
    /// MySQL 8 or MariaDB 10.6+, `mysql://` or `mariadb://`.
    MySql,
    /// SQLite, `sqlite://path` or `sqlite:path` (one relay process).
    Sqlite,
}

impl Engine {
    /// The engine's name (`postgres`, `mysql`, `sqlite`).
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::MySql => "mysql",
            Engine::Sqlite => "sqlite",
        }
    }

    fn built_in(self) -> bool {
        match self {
            Engine::Postgres => cfg!(feature = "postgres"),
            Engine::MySql => cfg!(feature = "mysql"),
            Engine::Sqlite => cfg!(feature = "sqlite"),
        }
    }
}

/// A validated database URL. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    engine: Engine,
    url: String,
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseUrl")
            .field("engine", &self.engine)
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

impl DatabaseUrl {
    /// Checks the scheme and lets the driver parse the rest; the error is a
    /// message that never repeats the password.
    pub fn parse(url: &str) -> Result<DatabaseUrl, String> {
        let url = url.trim();
        let scheme = url
            .split_once(':')
            .map(|(s, _)| s)
            .filter(|s| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            })
            .ok_or_else(|| {
                "not a database URL (expected postgres://user:password@host:5432/database, \
                 mysql://... or sqlite://path)"
                    .to_string()
            })?;
        let engine = match scheme.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" => Engine::Postgres,
            "mysql" | "mariadb" => Engine::MySql,
            "sqlite" => Engine::Sqlite,
            other => {
                return Err(format!(
                    "unsupported database scheme {:?} (expected postgres, mysql, sqlite)",
                    other.chars().take(40).collect::<String>()
                ))
            }
        };
        if !engine.built_in() {
            return Err(format!(
                "this binary was built without {} support (cargo feature {})",
                engine.as_str(),
                engine.as_str()
            ));
        }
        // The driver's own parser catches bad ports, hosts and options now
        // rather than at connect time.
        let url = match engine {
            Engine::MySql if scheme.eq_ignore_ascii_case("mariadb") => {
                format!("mysql{}", &url[scheme.len()..])
            }
            _ => url.to_string(),
        };
        check_url(engine, &url)?;
        Ok(DatabaseUrl { engine, url })
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The URL as given (with its password: do not log it; see
    /// [`redacted`](Self::redacted)).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with the password hidden.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }
}

fn check_url(engine: Engine, url: &str) -> Result<(), String> {
    use std::str::FromStr;
    let describe = |e: sqlx::Error| format!("invalid database URL: {e}");
    match engine {
        #[cfg(feature = "postgres")]
        Engine::Postgres => sqlx::postgres::PgConnectOptions::from_str(url)
            .map(|_| ())
            .map_err(describe),
        #[cfg(feature = "mysql")]
        Engine::MySql => sqlx::mysql::MySqlConnectOptions::from_str(url)
            .map(|_| ())
            .map_err(describe),
        #[cfg(feature = "sqlite")]
        Engine::Sqlite => sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .map(|_| ())
            .map_err(describe),
        #[allow(unreachable_patterns)]
        _ => Err(format!("{} support is not built in", engine.as_str())),
    }
}

/// A connected store of one of the engines.
#[derive(Clone)]
pub(crate) enum Db {
    #[cfg(feature = "postgres")]
    Postgres(outbox_sqlx::postgres::PgStore),
    #[cfg(feature = "mysql")]
    MySql(outbox_sqlx::mysql::MySqlStore),
    #[cfg(feature = "sqlite")]
    Sqlite(outbox_sqlx::sqlite::SqliteStore),
}

/// Opens one connection first (so a wrong password or an unreachable server
/// is reported at once, not after the pool's retries), then the pool.
async fn probe<C, F>(connect: F, timeout: Duration) -> Result<(), String>
where
    C: sqlx::Connection,
    F: std::future::Future<Output = Result<C, sqlx::Error>>,
{
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(format!("cannot connect: {e}")),
        Err(_) => Err(format!("cannot connect: no answer within {timeout:?}")),
    }
}

impl Db {
    /// Connects to the configured database and builds the store.
    pub(crate) async fn connect(config: &Config) -> Result<Db, String> {
        use std::str::FromStr;

        use sqlx::ConnectOptions;

        let url = config.database.url();
        let timeout = config.connect_timeout;
        let store_config = outbox_sqlx::StoreConfig::default()
            .table(&config.table.to_string())
            .map_err(|e| e.message().to_string())?
            .keep_delivered(config.keep_delivered)
            .hold_dead_letters(config.hold_dead_letters)
            .listen(config.listen_notify);
        let bad_url = |e: sqlx::Error| format!("invalid database URL: {e}");
        let pool_error = |e: sqlx::Error| format!("cannot open the connection pool: {e}");
        match config.database.engine() {
            #[cfg(feature = "postgres")]
            Engine::Postgres => {
                let options = sqlx::postgres::PgConnectOptions::from_str(url).map_err(bad_url)?;
                probe(options.connect(), timeout).await?;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(config.db_max_connections)
                    .acquire_timeout(timeout)
                    .connect_with(options)
                    .await
                    .map_err(pool_error)?;
                Ok(Db::Postgres(outbox_sqlx::postgres::PgStore::with_config(
                    pool,
                    store_config,
                )))
            }
            #[cfg(feature = "mysql")]
            Engine::MySql => {
                let options = sqlx::mysql::MySqlConnectOptions::from_str(url).map_err(bad_url)?;
                probe(options.connect(), timeout).await?;
                let pool = sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(config.db_max_connections)
                    .acquire_timeout(timeout)
                    .connect_with(options)
                    .await
                    .map_err(pool_error)?;
                Ok(Db::MySql(outbox_sqlx::mysql::MySqlStore::with_config(
                    pool,
                    store_config,
                )))
            }
            #[cfg(feature = "sqlite")]
            Engine::Sqlite => {
                use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
                let options = SqliteConnectOptions::from_str(url)
                    .map_err(bad_url)?
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10));
                probe(options.connect(), timeout).await?;
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(config.db_max_connections)
                    .acquire_timeout(timeout)
                    .connect_with(options)
                    .await
                    .map_err(pool_error)?;
                Ok(Db::Sqlite(outbox_sqlx::sqlite::SqliteStore::with_config(
                    pool,
                    store_config,
                )))
            }
            #[allow(unreachable_patterns)]
            other => Err(format!("{} support is not built in", other.as_str())),
        }
    }

    /// Creates the outbox tables if they are missing.
    pub(crate) async fn migrate(&self) -> outbox_core::Result<()> {
        match self {
            #[cfg(feature = "postgres")]
            Db::Postgres(s) => s.migrate().await,
            #[cfg(feature = "mysql")]
            Db::MySql(s) => s.migrate().await,
            #[cfg(feature = "sqlite")]
            Db::Sqlite(s) => s.migrate().await,
        }
    }

    /// The store, for the relay.
    pub(crate) fn store(&self) -> Arc<dyn Store> {
        match self {
            #[cfg(feature = "postgres")]
            Db::Postgres(s) => Arc::new(s.clone()),
            #[cfg(feature = "mysql")]
            Db::MySql(s) => Arc::new(s.clone()),
            #[cfg(feature = "sqlite")]
            Db::Sqlite(s) => Arc::new(s.clone()),
        }
    }

    /// The store, for purging kept delivered rows.
    pub(crate) fn purge(&self) -> Arc<dyn Purge> {
        match self {
            #[cfg(feature = "postgres")]
            Db::Postgres(s) => Arc::new(s.clone()),
            #[cfg(feature = "mysql")]
            Db::MySql(s) => Arc::new(s.clone()),
            #[cfg(feature = "sqlite")]
            Db::Sqlite(s) => Arc::new(s.clone()),
        }
    }

    /// `SELECT 1` within `timeout`.
    pub(crate) async fn ping(&self, timeout: Duration) -> Result<(), String> {
        let query = async {
            match self {
                #[cfg(feature = "postgres")]
                Db::Postgres(s) => sqlx::query("SELECT 1").execute(s.pool()).await.map(|_| ()),
                #[cfg(feature = "mysql")]
                Db::MySql(s) => sqlx::query("SELECT 1").execute(s.pool()).await.map(|_| ()),
                #[cfg(feature = "sqlite")]
                Db::Sqlite(s) => sqlx::query("SELECT 1").execute(s.pool()).await.map(|_| ()),
            }
        };
        match tokio::time::timeout(timeout, query).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Drops the store (ending its background tasks once no other clone
    /// holds it), then closes the pool.
    pub(crate) async fn close(self) {
        match self {
            #[cfg(feature = "postgres")]
            Db::Postgres(s) => {
                let pool = s.pool().clone();
                drop(s);
                pool.close().await
            }
            #[cfg(feature = "mysql")]
            Db::MySql(s) => {
                let pool = s.pool().clone();
                drop(s);
                pool.close().await
            }
            #[cfg(feature = "sqlite")]
            Db::Sqlite(s) => {
                let pool = s.pool().clone();
                drop(s);
                pool.close().await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(
            DatabaseUrl::parse("postgres://u:p@h:5432/db")
                .unwrap()
                .engine(),
            Engine::Postgres
        );
        assert!(DatabaseUrl::parse("oracle://h/db")
            .unwrap_err()
            .contains("unsupported database scheme \"oracle\""));
        assert!(DatabaseUrl::parse("just text")
            .unwrap_err()
            .starts_with("not a database URL"));
        let e = DatabaseUrl::parse("postgres://u:secret@h:notaport/db").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}
