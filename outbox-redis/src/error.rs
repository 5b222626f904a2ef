//! The adapter's private error type and its mapping into
//! [`outbox_core::Error`]: which Redis failures are transient (retry with
//! backoff) and which are permanent (dead-letter now).

use outbox_core::ErrorKind;

/// The backend name on every error of this crate.
pub(crate) const BACKEND: &str = "redis";

/// What can go wrong in this adapter. Private: callers see
/// [`outbox_core::Error`] only.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedisError {
    /// A configuration value is wrong.
    #[error("{0}")]
    Config(String),
    /// The first connection failed.
    #[error("could not connect: {0}")]
    Connect(#[source] redis::RedisError),
    /// The whole pipeline failed (connection lost, timeout, ...): no
    /// message of the batch is known to be added.
    #[error("batch failed: {0}")]
    Batch(#[source] redis::RedisError),
    /// Redis answered one command with an error reply.
    #[error("{code} {detail}")]
    Server { code: String, detail: String },
    /// Redis sent fewer replies than commands.
    #[error("no reply for this message")]
    MissingReply,
    /// The message could not be encoded.
    #[error("could not encode the message: {0}")]
    Encode(String),
    /// A stream entry or Pub/Sub message is not in the transport's format.
    #[error("not an outbox message: {0}")]
    Decode(String),
}

/// How an error reply code (`WRONGTYPE`, `ERR`, `OOM`, ...) is classified.
pub(crate) fn classify_reply(code: &str) -> (ErrorKind, bool) {
    match code {
        // The key holds another type: retrying will not change that.
        "WRONGTYPE" => (ErrorKind::Rejected, false),
        // Generic errors, among them script errors (`ERR user_script:...`,
        // `ERR Error running script`) and syntax errors.
        "ERR" => (ErrorKind::Rejected, false),
        // An ACL forbids the command or key.
        "NOPERM" => (ErrorKind::Unauthorized, false),
        // Cluster redirections: the transport talks to one node only.
        "MOVED" | "ASK" | "CROSSSLOT" => (ErrorKind::Config, false),
        // Credentials missing or refused: an operator fixes them; the
        // backlog should not be dead-lettered meanwhile.
        "NOAUTH" | "WRONGPASS" => (ErrorKind::Unauthorized, true),
        // The server is busy, loading, read-only after a failover, out of
        // memory or cannot persist: it may accept the message later.
        "OOM" | "MISCONF" | "NOREPLICAS" => (ErrorKind::Rejected, true),
        "LOADING" | "BUSY" | "READONLY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" => {
            (ErrorKind::Connection, true)
        }
        // The script cache was emptied (restart): loaded again next batch.
        "NOSCRIPT" | "EXECABORT" => (ErrorKind::Other, true),
        _ => (ErrorKind::Other, true),
    }
}

/// How a client-side error of a whole batch (or connection) is classified.
fn classify_client(e: &redis::RedisError, connecting: bool) -> (ErrorKind, bool) {
    use redis::ErrorKind as K;
    if e.is_timeout() {
        return (ErrorKind::Timeout, true);
    }
    if let Some(code) = e.code() {
        let (kind, transient) = classify_reply(code);
        // A refused first connection with an error reply (wrong password,
        // ACL) will not fix itself; during publishing it is a blip to wait out.
        return (
            kind,
            transient && !(connecting && kind == ErrorKind::Unauthorized),
        );
    }
    match e.kind() {
        K::AuthenticationFailed => (ErrorKind::Unauthorized, !connecting),
        K::InvalidClientConfig => (ErrorKind::Config, false),
        K::Io | K::ClusterConnectionNotFound => (ErrorKind::Connection, true),
        _ if e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error() => {
            (ErrorKind::Connection, true)
        }
        _ => (ErrorKind::Other, true),
    }
}

impl RedisError {
    fn operation(&self) -> &'static str {
        match self {
            RedisError::Config(_) => "configure",
            RedisError::Connect(_) => "connect",
            RedisError::Decode(_) => "decode",
            _ => "publish",
        }
    }

    fn kind_and_transience(&self) -> (ErrorKind, bool) {
        match self {
            RedisError::Config(_) => (ErrorKind::Config, false),
            RedisError::Connect(e) => classify_client(e, true),
            RedisError::Batch(e) => classify_client(e, false),
            RedisError::Server { code, .. } => classify_reply(code),
            RedisError::MissingReply => (ErrorKind::Other, true),
            RedisError::Encode(_) | RedisError::Decode(_) => (ErrorKind::InvalidInput, false),
        }
    }
}

impl From<RedisError> for outbox_core::Error {
    fn from(e: RedisError) -> Self {
        let (kind, transient) = e.kind_and_transience();
        let operation = e.operation();
        let message = e.to_string();
        let error = if transient {
            outbox_core::Error::transient(kind, message)
        } else {
            outbox_core::Error::permanent(kind, message)
        };
        error.with_backend(BACKEND).with_operation(operation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> outbox_core::Error {
        RedisError::Server {
            code: code.into(),
            detail: "detail".into(),
        }
        .into()
    }

    #[test]
    fn reply_codes_are_classified() {
        for code in ["WRONGTYPE", "ERR", "NOPERM", "CROSSSLOT"] {
            assert!(!server(code).is_transient(), "{code}");
        }
        for code in [
            "OOM",
            "LOADING",
            "BUSY",
            "READONLY",
            "NOSCRIPT",
            "NOAUTH",
            "SOMETHINGNEW",
        ] {
            assert!(server(code).is_transient(), "{code}");
        }
        let e = server("WRONGTYPE");
        assert_eq!(e.kind(), ErrorKind::Rejected);
        assert_eq!(e.backend(), Some("redis"));
        assert_eq!(e.operation(), Some("publish"));
        assert_eq!(e.to_string(), "redis publish: rejected: WRONGTYPE detail");
    }

    #[test]
    fn client_errors_are_classified() {
        let io =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e: outbox_core::Error = RedisError::Batch(io.clone()).into();
        assert!(e.is_transient());
        assert_eq!(e.kind(), ErrorKind::Connection);
        let e: outbox_core::Error = RedisError::Connect(io).into();
        assert!(e.is_transient());
        assert_eq!(e.operation(), Some("connect"));

        let timeout = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let e: outbox_core::Error = RedisError::Batch(timeout).into();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.is_transient());

        let auth =
            redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "bad password"));
        let e: outbox_core::Error = RedisError::Connect(auth.clone()).into();
        assert_eq!(e.kind(), ErrorKind::Unauthorized);
        assert!(!e.is_transient());
        let e: outbox_core::Error = RedisError::Batch(auth).into();
        assert!(e.is_transient());
    }
}
