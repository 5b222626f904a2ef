//! The crate's private error enum and its mapping into
//! [`outbox_core::Error`]: which failures are worth a retry.

use async_nats::jetstream::ErrorCode;
use outbox_core::{Error, ErrorKind};

/// Everything that can go wrong talking to NATS. Never leaves the crate:
/// converted into [`outbox_core::Error`] with backend `nats`.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum NatsError {
    /// Connecting failed (server down, DNS, TLS, timeout).
    #[error("could not connect: {0}")]
    Connect(String),
    /// The server refused the credentials.
    #[error("authorization refused: {0}")]
    Unauthorized(String),
    /// The credentials file could not be read.
    #[error("could not read the credentials file: {0}")]
    Credentials(String),
    /// The server has no JetStream, or the account has none.
    #[error("JetStream is not available: {0}")]
    JetStreamUnavailable(String),
    /// A JetStream API request (stream lookup, account info) failed on the way.
    #[error("JetStream request failed: {0}")]
    Request(String),
    /// Creating the configured stream was refused by the server.
    #[error("could not create stream {name:?}: {reason}")]
    CreateStream { name: String, reason: String },
    /// No stream captures the subject (checked with the server).
    #[error("no stream captures subject {0:?}")]
    NoStream(String),
    /// The subject is not a valid NATS subject.
    #[error("subject {0:?} is invalid")]
    InvalidSubject(String),
    /// A header cannot be carried as a NATS header.
    #[error("header {0:?} cannot be sent as a NATS header")]
    InvalidHeader(String),
    /// The message is larger than the server's max_payload.
    #[error("message too large: {0}")]
    TooLarge(String),
    /// No ack within the configured timeout.
    #[error("no ack within {0:?}")]
    Timeout(std::time::Duration),
    /// The connection broke before the ack arrived.
    #[error("connection lost before the ack: {0}")]
    Disconnected(String),
    /// Not sent: the client is not connected to the server (the relay
    /// hands the message back without counting an attempt).
    #[error("not sent: {0}")]
    NotConnected(String),
    /// The stream refused the message (limits, storage); may clear later.
    #[error("stream refused the message: {0}")]
    Refused(String),
    /// The stream refused the message for good (too large for the stream).
    #[error("stream refused the message for good: {0}")]
    RefusedPermanently(String),
    /// Anything else from the client.
    #[error("{0}")]
    Other(String),
}

impl NatsError {
    fn kind_and_transience(&self) -> (ErrorKind, bool) {
        match self {
            NatsError::Connect(_) => (ErrorKind::Connection, true),
            NatsError::Unauthorized(_) => (ErrorKind::Unauthorized, false),
            NatsError::Credentials(_) => (ErrorKind::Config, false),
            NatsError::JetStreamUnavailable(_) => (ErrorKind::Config, false),
            NatsError::Request(_) => (ErrorKind::Connection, true),
            NatsError::CreateStream { .. } => (ErrorKind::Config, false),
            NatsError::NoStream(_) => (ErrorKind::Unroutable, false),
            NatsError::InvalidSubject(_) => (ErrorKind::InvalidInput, false),
            NatsError::InvalidHeader(_) => (ErrorKind::InvalidInput, false),
            NatsError::TooLarge(_) => (ErrorKind::TooLarge, false),
            NatsError::Timeout(_) => (ErrorKind::Timeout, true),
            NatsError::Disconnected(_) => (ErrorKind::Connection, true),
            NatsError::NotConnected(_) => (ErrorKind::Connection, true),
            NatsError::Refused(_) => (ErrorKind::Rejected, true),
            NatsError::RefusedPermanently(_) => (ErrorKind::Rejected, false),
            NatsError::Other(_) => (ErrorKind::Other, true),
        }
    }

    /// Converts into the core error, naming the operation.
    pub(crate) fn during(self, operation: &'static str) -> Error {
        let (kind, transient) = self.kind_and_transience();
        let message = self.to_string();
        let unsent = matches!(self, NatsError::NotConnected(_));
        let e = if transient {
            Error::transient(kind, message)
        } else {
            Error::permanent(kind, message)
        };
        let e = e.with_backend("nats").with_operation(operation);
        if unsent {
            e.unsent()
        } else {
            e
        }
    }

    /// Maps a connect failure.
    pub(crate) fn from_connect(e: &async_nats::ConnectError) -> Self {
        use async_nats::ConnectErrorKind as K;
        match e.kind() {
            K::AuthorizationViolation | K::Authentication => NatsError::Unauthorized(e.to_string()),
            _ => NatsError::Connect(e.to_string()),
        }
    }

    /// Maps the error a stream answered a publish with.
    pub(crate) fn from_ack(e: &async_nats::jetstream::Error) -> Self {
        let code = e.error_code();
        if code == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
            || code == ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
        {
            NatsError::TooLarge(e.to_string())
        } else if [
            // What the message itself asks for (expected last id or
            // sequence, stream name, TTL headers): a retry gets the same.
            ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID,
            ErrorCode::STREAM_WRONG_LAST_SEQUENCE,
            ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT,
            ErrorCode::STREAM_EXPECTED_LAST_SEQ_PER_SUBJECT_INVALID,
            ErrorCode::STREAM_NOT_MATCH,
            ErrorCode::MESSAGE_TTL_INVALID,
            ErrorCode::MESSAGE_TTL_DISABLED,
        ]
        .contains(&code)
        {
            NatsError::RefusedPermanently(e.to_string())
        } else {
            NatsError::Refused(e.to_string())
        }
    }

    /// Maps a failure of the client to send a publish of `topic`.
    pub(crate) fn from_send(e: &async_nats::client::PublishError, topic: &str) -> Self {
        use async_nats::client::PublishErrorKind as K;
        match e.kind() {
            K::MaxPayloadExceeded => NatsError::TooLarge(e.to_string()),
            K::InvalidSubject => NatsError::InvalidSubject(topic.to_string()),
            // The client's channel to its connection is gone: not sent.
            _ => NatsError::NotConnected(e.to_string()),
        }
    }
}

impl From<NatsError> for Error {
    fn from(e: NatsError) -> Self {
        e.during("publish")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_says_transient_or_permanent() {
        let t = NatsError::Timeout(std::time::Duration::from_secs(1)).during("publish");
        assert!(t.is_transient());
        assert_eq!(t.kind(), ErrorKind::Timeout);
        assert_eq!(t.backend(), Some("nats"));
        assert_eq!(t.operation(), Some("publish"));
        let p: Error = NatsError::NoStream("x.y".into()).into();
        assert!(!p.is_transient());
        assert_eq!(p.kind(), ErrorKind::Unroutable);
        assert!(
            p.to_string().starts_with("nats publish: unroutable:"),
            "{p}"
        );
        assert!(!NatsError::InvalidHeader("h".into())
            .during("publish")
            .is_transient());
        let lost = NatsError::Disconnected("x".into()).during("publish");
        assert!(
            lost.is_transient() && !lost.is_unsent(),
            "sent, outcome unknown"
        );
        let down = NatsError::NotConnected("x".into()).during("publish");
        assert!(down.is_transient() && down.is_unsent());
        assert!(!NatsError::Unauthorized("x".into())
            .during("connect")
            .is_transient());
    }
}
