//! Maps sqlx errors into the core error type, transient or permanent.

use outbox_core::{Error, ErrorKind};

/// Converts a sqlx error, naming the engine and operation.
pub(crate) fn db_error(engine: &'static str, operation: &'static str, e: sqlx::Error) -> Error {
    let (mut kind, transient, mut message) = classify(&e);
    // An enqueue writes unique values only in the id: a unique violation
    // there is a message id already in the outbox (a re-used id).
    if operation == "enqueue" && is_unique_violation(&e) {
        kind = ErrorKind::InvalidInput;
        message = format!("a message with this id is already in the outbox ({message})");
    }
    let err = if transient {
        Error::transient(kind, message)
    } else {
        Error::permanent(kind, message)
    };
    err.with_backend(engine)
        .with_operation(operation)
        .with_source(e)
}

fn classify(e: &sqlx::Error) -> (ErrorKind, bool, String) {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => {
            (ErrorKind::Connection, true, "connection failed".into())
        }
        sqlx::Error::PoolTimedOut => (
            ErrorKind::Timeout,
            true,
            "timed out waiting for a database connection".into(),
        ),
        sqlx::Error::PoolClosed => (ErrorKind::Connection, false, "the pool is closed".into()),
        sqlx::Error::WorkerCrashed => (ErrorKind::Connection, true, "driver worker crashed".into()),
        sqlx::Error::Configuration(_) => (
            ErrorKind::Config,
            false,
            "bad database configuration".into(),
        ),
        sqlx::Error::Database(db) => {
            #[allow(unused_mut)]
            let mut code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // MySQL's SQLSTATEs are coarse (HY000 for most); its error
            // numbers say more.
            #[cfg(feature = "mysql")]
            if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                code = my.number().to_string();
            }
            let (mut kind, transient) = classify_code(&code);
            // SQLite says "no such table" with the generic code 1 only.
            if code == "1" && db.message().starts_with("no such table") {
                kind = ErrorKind::Config;
            }
            (kind, transient, format!("database error {code}"))
        }
        _ => (ErrorKind::Database, false, "database error".into()),
    }
}

/// A unique constraint refused the row: PostgreSQL 23505, MySQL 1062,
/// SQLite's primary key or unique extended codes (1555, 2067).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            if matches!(db.kind(), sqlx::error::ErrorKind::UniqueViolation) {
                return true;
            }
            #[cfg(feature = "mysql")]
            if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                return my.number() == 1062;
            }
            false
        }
        _ => false,
    }
}

/// SQLSTATE (PostgreSQL, SQLite extended codes as text) or MySQL error numbers.
fn classify_code(code: &str) -> (ErrorKind, bool) {
    match code {
        // PostgreSQL: connection exceptions, shutdown, resource limits,
        // serialization failures and deadlocks are worth retrying.
        c if c.starts_with("08") => (ErrorKind::Connection, true),
        "57P01" | "57P02" | "57P03" | "57014" => (ErrorKind::Connection, true),
        "53300" | "53200" | "53100" => (ErrorKind::Database, true),
        "40001" | "40P01" | "55P03" => (ErrorKind::Database, true),
        c if c.starts_with("28") => (ErrorKind::Unauthorized, false),
        "42P01" | "3D000" | "3F000" => (ErrorKind::Config, false),
        // MySQL / MariaDB: lock wait timeout, deadlock, too many connections,
        // server gone / shutting down.
        "1205" | "1213" | "1040" | "1053" | "2006" | "2013" | "1927" => (ErrorKind::Database, true),
        "1045" | "1044" | "1142" => (ErrorKind::Unauthorized, false),
        "1146" | "1049" => (ErrorKind::Config, false),
        // SQLite: busy / locked.
        "5" | "6" | "261" | "262" | "517" => (ErrorKind::Database, true),
        _ => (ErrorKind::Database, false),
    }
}
