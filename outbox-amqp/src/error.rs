//! The crate's private error enum and its mapping into
//! [`outbox_core::Error`]: which failures are worth a retry.

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use outbox_core::{Error, ErrorKind};

/// Everything that can go wrong talking to RabbitMQ. Never leaves the crate:
/// converted into [`outbox_core::Error`] with backend `amqp`.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum AmqpError {
    /// Connecting failed (broker down, DNS, TLS, timeout).
    #[error("could not connect: {0}")]
    Connect(String),
    /// The broker refused the credentials or the vhost.
    #[error("access refused: {0}")]
    Unauthorized(String),
    /// The connection or channel broke (broker restart, network, heartbeat).
    #[error("connection lost: {0}")]
    Connection(String),
    /// The broker closed the channel for a reason that may clear.
    #[error("channel closed by the broker: {0}")]
    Channel(String),
    /// The exchange does not exist.
    #[error("exchange {0:?} does not exist")]
    NoExchange(String),
    /// Declaring the exchange failed (it exists with other settings, or the
    /// name is reserved).
    #[error("exchange {name:?} cannot be declared: {reason}")]
    Exchange { name: String, reason: String },
    /// The broker returned the message: no queue is bound for its routing key.
    #[error("returned by the broker ({code} {text}): no queue is bound to exchange {exchange:?} for routing key {routing_key:?}")]
    Unroutable {
        exchange: String,
        routing_key: String,
        code: u16,
        text: String,
        transient: bool,
    },
    /// The broker nacked the message (internal error, queue limit with
    /// reject-publish).
    #[error("the broker nacked the message")]
    Nacked,
    /// No confirm within the configured timeout.
    #[error("no confirm within {0:?}")]
    Timeout(std::time::Duration),
    /// An exchange name, routing key or property is too long for AMQP.
    #[error("{0}")]
    InvalidInput(String),
    /// A header cannot be carried in an AMQP field table.
    #[error("header {0:?} cannot be sent as an AMQP header")]
    InvalidHeader(String),
    /// Anything else from the client.
    #[error("{0}")]
    Other(String),
}

impl AmqpError {
    fn kind_and_transience(&self) -> (ErrorKind, bool) {
        match self {
            AmqpError::Connect(_) => (ErrorKind::Connection, true),
            AmqpError::Unauthorized(_) => (ErrorKind::Unauthorized, false),
            AmqpError::Connection(_) => (ErrorKind::Connection, true),
            AmqpError::Channel(_) => (ErrorKind::Connection, true),
            AmqpError::NoExchange(_) => (ErrorKind::Unroutable, false),
            AmqpError::Exchange { .. } => (ErrorKind::Config, false),
            AmqpError::Unroutable { transient, .. } => (ErrorKind::Unroutable, *transient),
            AmqpError::Nacked => (ErrorKind::Rejected, true),
            AmqpError::Timeout(_) => (ErrorKind::Timeout, true),
            AmqpError::InvalidInput(_) => (ErrorKind::InvalidInput, false),
            AmqpError::InvalidHeader(_) => (ErrorKind::InvalidInput, false),
            AmqpError::Other(_) => (ErrorKind::Other, true),
        }
    }

    /// Converts into the core error, naming the operation.
    pub(crate) fn during(self, operation: &'static str) -> Error {
        let (kind, transient) = self.kind_and_transience();
        let message = self.to_string();
        let e = if transient {
            Error::transient(kind, message)
        } else {
            Error::permanent(kind, message)
        };
        e.with_backend("amqp").with_operation(operation)
    }

    /// Whether the connection itself is unusable (as opposed to one message
    /// or one exchange).
    pub(crate) fn is_connection(&self) -> bool {
        matches!(
            self,
            AmqpError::Connect(_) | AmqpError::Connection(_) | AmqpError::Unauthorized(_)
        )
    }

    /// Maps a lapin error.
    pub(crate) fn from_lapin(e: &lapin::Error) -> Self {
        use lapin::ErrorKind as K;
        match e.kind() {
            K::ProtocolError(amqp) => {
                let text = amqp.get_message().to_string();
                match amqp.kind() {
                    AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                        AmqpError::Unauthorized(text)
                    }
                    AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => AmqpError::Channel(text),
                    AMQPErrorKind::Soft(_) => AmqpError::Channel(text),
                    AMQPErrorKind::Hard(_) => AmqpError::Connection(text),
                }
            }
            K::AuthProviderError(text) => AmqpError::Unauthorized(text.clone()),
            K::IOError(_)
            | K::InvalidChannelState(..)
            | K::InvalidConnectionState(_)
            | K::InvalidChannel(_)
            | K::MissingHeartbeatError
            | K::ParsingError(_)
            | K::SerialisationError(_)
            | K::RuntimeShutdownError(_) => AmqpError::Connection(e.to_string()),
            _ => AmqpError::Other(e.to_string()),
        }
    }

    /// Whether the broker closed the channel (a soft protocol error).
    pub(crate) fn lapin_channel_close(e: &lapin::Error) -> bool {
        matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(_)))
    }

    /// Whether the broker said "not found" (a missing exchange).
    pub(crate) fn lapin_not_found(e: &lapin::Error) -> bool {
        matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
    }
}

impl From<AmqpError> for Error {
    fn from(e: AmqpError) -> Self {
        e.during("publish")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_says_transient_or_permanent() {
        let t = AmqpError::Timeout(std::time::Duration::from_secs(1)).during("publish");
        assert!(t.is_transient());
        assert_eq!(t.kind(), ErrorKind::Timeout);
        assert_eq!(t.backend(), Some("amqp"));
        let u: Error = AmqpError::Unroutable {
            exchange: "outbox".into(),
            routing_key: "nowhere".into(),
            code: 312,
            text: "NO_ROUTE".into(),
            transient: false,
        }
        .into();
        assert!(!u.is_transient());
        assert_eq!(u.kind(), ErrorKind::Unroutable);
        assert!(
            u.to_string().starts_with("amqp publish: unroutable:"),
            "{u}"
        );
        assert!(AmqpError::Nacked.during("publish").is_transient());
        assert!(!AmqpError::NoExchange("x".into())
            .during("publish")
            .is_transient());
        assert!(AmqpError::Connection("reset".into())
            .during("publish")
            .is_transient());
    }
}
