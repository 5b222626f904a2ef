//! The one error type of the toolkit.
//!
//! Every adapter converts its client's errors into [`Error`], adding which
//! backend and which operation failed. The relay decides between retry and
//! dead-letter from [`Error::is_transient`] alone.

use std::borrow::Cow;
use std::fmt;

/// What went wrong, coarsely. Adapters pick the closest kind; the
/// transient/permanent flag is carried separately because the same kind can
/// be either (a timeout is transient, a broker that rejects a message for
/// good is permanent).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A message, topic, key, header or name failed validation.
    InvalidInput,
    /// A configuration value (URL, option, route pattern) is wrong.
    Config,
    /// The connection to a server failed or was lost.
    Connection,
    /// An operation did not complete in time.
    Timeout,
    /// The broker refused the message (nack, rejected, policy).
    Rejected,
    /// No route, stream, exchange or topic for the message.
    Unroutable,
    /// The message is larger than the broker or store accepts.
    TooLarge,
    /// Credentials were refused or the operation is not permitted.
    Unauthorized,
    /// The database reported an error.
    Database,
    /// A lease was lost: another relay owns the rows now.
    LeaseLost,
    /// Anything else.
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Config => "configuration error",
            ErrorKind::Connection => "connection error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Unroutable => "unroutable",
            ErrorKind::TooLarge => "too large",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Database => "database error",
            ErrorKind::LeaseLost => "lease lost",
            ErrorKind::Other => "error",
        };
        f.write_str(s)
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from a store, a transport, the router or validation.
///
/// Its [`Display`](fmt::Display) reads `backend operation: kind: message`
/// (for example `nats publish: timeout: no ack within 5s`), which is also
/// what a store records as a message's last error.
pub struct Error {
    kind: ErrorKind,
    transient: bool,
    unsent: bool,
    message: Cow<'static, str>,
    backend: Option<Cow<'static, str>>,
    operation: Option<&'static str>,
    source: Option<Source>,
}

impl Error {
    /// A permanent error: retrying will not help, the message is dead-lettered.
    pub fn permanent(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(kind, false, message)
    }

    /// A transient error: retry later with backoff.
    pub fn transient(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(kind, true, message)
    }

    fn new(kind: ErrorKind, transient: bool, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            transient,
            unsent: false,
            message: message.into(),
            backend: None,
            operation: None,
            source: None,
        }
    }

    /// Names the backend (`"postgres"`, `"nats"`, ...) the error came from.
    pub fn with_backend(mut self, backend: impl Into<Cow<'static, str>>) -> Self {
        self.backend = Some(backend.into());
        self
    }

    /// Names the operation (`"claim"`, `"publish"`, ...) that failed.
    pub fn with_operation(mut self, operation: &'static str) -> Self {
        self.operation = Some(operation);
        self
    }

    /// Marks a publish error as one where the message was not sent: the
    /// transport could not reach its broker (not connected, connection or
    /// channel refused, credentials refused on reconnect). The relay then
    /// hands the message back without counting an attempt and backs off as
    /// a whole ([`RelayConfig::transport_retry`](crate::RelayConfig)): a
    /// broker outage must not use up the attempts of every message claimed
    /// meanwhile and dead-letter them. Only for messages that did not leave
    /// the process: one sent whose outcome is unknown is an ordinary
    /// failure, so that a message that itself breaks the connection still
    /// ends up dead-lettered.
    pub fn unsent(mut self) -> Self {
        self.unsent = true;
        self
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether retrying later may succeed. The relay reschedules transient
    /// failures and dead-letters permanent ones.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// Whether the message was not sent because the broker could not be
    /// reached (see [`unsent`](Self::unsent)).
    pub fn is_unsent(&self) -> bool {
        self.unsent
    }

    /// The backend that reported the error, if one was named.
    pub fn backend(&self) -> Option<&str> {
        self.backend.as_deref()
    }

    /// The operation that failed, if one was named.
    pub fn operation(&self) -> Option<&'static str> {
        self.operation
    }

    /// The human-readable message, without backend and operation.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.backend, self.operation) {
            (Some(b), Some(o)) => write!(f, "{b} {o}: ")?,
            (Some(b), None) => write!(f, "{b}: ")?,
            (None, Some(o)) => write!(f, "{o}: ")?,
            (None, None) => {}
        }
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(source) = &self.source {
            let text = source.to_string();
            if !text.is_empty() && !self.message.contains(text.as_str()) {
                write!(f, ": {text}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("transient", &self.transient)
            .field("unsent", &self.unsent)
            .field("backend", &self.backend)
            .field("operation", &self.operation)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// Why a message, topic, key or header was refused. Converts into a
/// permanent [`Error`] of kind [`ErrorKind::InvalidInput`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The topic is empty.
    #[error("topic is empty")]
    EmptyTopic,
    /// The topic is longer than [`crate::limits::MAX_TOPIC_LEN`] bytes.
    #[error("topic is {len} bytes, more than the limit of {max}")]
    TopicTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The topic contains a character no broker accepts in a subject,
    /// routing key or stream name.
    #[error("topic {topic:?} contains {found:?}: {reason}")]
    InvalidTopic {
        /// The topic, escaped.
        topic: String,
        /// The offending character.
        found: char,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The key is empty (use no key instead) or too long.
    #[error("key is invalid: {reason}")]
    InvalidKey {
        /// Why it is refused.
        reason: String,
    },
    /// A header name or value cannot be carried by every broker.
    #[error("header {name:?} is invalid: {reason}")]
    InvalidHeader {
        /// The header name, escaped.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// The payload is larger than the configured limit.
    #[error("payload is {size} bytes, more than the limit of {limit}")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A time (`not_before`, `created_at`) is past what every store can
    /// hold: the end of year 9999 (MySQL's `DATETIME`).
    #[error("{what} is past the end of year 9999")]
    TimeOutOfRange {
        /// Which time.
        what: &'static str,
    },
    /// The payload could not be serialised to JSON.
    #[error("payload could not be serialised: {0}")]
    Serialize(String),
    /// A pattern, identifier or name is malformed.
    #[error("{what} {value:?} is invalid: {reason}")]
    InvalidName {
        /// What was being checked (`"route pattern"`, `"table name"`, ...).
        what: &'static str,
        /// The value, escaped.
        value: String,
        /// Why it is refused.
        reason: String,
    },
}

impl From<ValidationError> for Error {
    fn from(e: ValidationError) -> Self {
        let kind = match e {
            ValidationError::PayloadTooLarge { .. } => ErrorKind::TooLarge,
            _ => ErrorKind::InvalidInput,
        };
        Error::permanent(kind, e.to_string())
    }
}

/// Shorthand for `Result<T, outbox_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_backend_operation_and_kind() {
        let e = Error::transient(ErrorKind::Timeout, "no ack within 5s")
            .with_backend("nats")
            .with_operation("publish");
        assert_eq!(e.to_string(), "nats publish: timeout: no ack within 5s");
        assert!(e.is_transient());
        let v: Error = ValidationError::EmptyTopic.into();
        assert!(!v.is_transient());
        assert_eq!(v.kind(), ErrorKind::InvalidInput);
    }
}
