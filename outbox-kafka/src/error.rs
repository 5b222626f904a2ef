//! The adapter's private error type and its mapping into
//! [`outbox_core::Error`]: which librdkafka errors are transient (retry with
//! backoff) and which are permanent (dead-letter now).

use std::time::Duration;

use outbox_core::ErrorKind;
use rdkafka::types::RDKafkaErrorCode as Code;

/// The backend name on every error of this crate.
pub(crate) const BACKEND: &str = "kafka";

/// What can go wrong in this adapter. Private: callers see
/// [`outbox_core::Error`] only.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KafkaError {
    /// A configuration value is wrong.
    #[error("{0}")]
    Config(String),
    /// librdkafka refused the configuration or could not create the producer.
    #[error("could not create the producer: {0}")]
    Client(#[source] rdkafka::error::KafkaError),
    /// The Kafka topic name derived from the outbox topic is invalid.
    #[error("topic \"{topic}\" is not a valid Kafka topic name: {reason}")]
    InvalidTopic { topic: String, reason: String },
    /// librdkafka refused to queue the message.
    #[error("could not queue the message: {code}")]
    Enqueue { code: Code, auto_create: bool },
    /// The broker (or librdkafka) reported a failed delivery.
    #[error("delivery failed: {code}")]
    Delivery { code: Code, auto_create: bool },
    /// The producer went away before the delivery report arrived.
    #[error("the producer was closed before the delivery report arrived")]
    Canceled,
    /// No delivery report arrived within the transport's own deadline.
    #[error("no delivery report within {0:?}")]
    ReportTimeout(Duration),
    /// Flushing did not complete.
    #[error("flush failed: {0}")]
    Flush(String),
    /// No broker answered a metadata request while connecting.
    #[error("no broker answered within {within:?}: {detail}")]
    Connect {
        code: Option<Code>,
        within: Duration,
        detail: String,
    },
    /// Not sent: every broker connection is down and none answered a
    /// metadata request (the relay hands the message back uncounted).
    #[error("not sent: no broker is reachable ({0})")]
    Unreachable(String),
}

/// How a librdkafka error code is classified: the kind and whether a retry
/// later may succeed. `auto_create` says whether the broker may create
/// unknown topics (then an unknown topic is transient).
pub(crate) fn classify(code: Code, auto_create: bool) -> (ErrorKind, bool) {
    use ErrorKind::*;
    match code {
        Code::MessageSizeTooLarge | Code::MessageBatchTooLarge | Code::InvalidMessageSize => {
            (TooLarge, false)
        }
        Code::UnknownTopicOrPartition
        | Code::UnknownTopic
        | Code::UnknownPartition
        | Code::UnknownTopicId => (Unroutable, auto_create),
        Code::TopicAuthorizationFailed
        | Code::ClusterAuthorizationFailed
        | Code::TransactionalIdAuthorizationFailed
        | Code::GroupAuthorizationFailed
        | Code::DelegationTokenAuthorizationFailed
        | Code::SaslAuthenticationFailed
        | Code::Authentication => (Unauthorized, false),
        Code::InvalidTopic
        | Code::InvalidRecord
        | Code::InvalidTimestamp
        | Code::UnsupportedForMessageFormat
        | Code::InvalidArgument
        | Code::BadMessage
        | Code::KeySerialization
        | Code::ValueSerialization => (InvalidInput, false),
        Code::PolicyViolation => (Rejected, false),
        Code::InvalidRequiredAcks
        | Code::UnsupportedCompressionType
        | Code::UnsupportedVersion
        | Code::UnsupportedSASLMechanism
        | Code::InvalidConfig => (Config, false),
        Code::MessageTimedOut
        | Code::OperationTimedOut
        | Code::RequestTimedOut
        | Code::TimedOutQueue => (Timeout, true),
        Code::BrokerTransportFailure
        | Code::AllBrokersDown
        | Code::Resolve
        | Code::NetworkException
        | Code::BrokerNotAvailable
        | Code::LeaderNotAvailable
        | Code::NotLeaderForPartition
        | Code::SSL => (Connection, true),
        Code::NotEnoughReplicas
        | Code::NotEnoughReplicasAfterAppend
        | Code::KafkaStorageError
        | Code::ThrottlingQuotaExceeded => (Rejected, true),
        // Queue full, purged, fatal (the producer is replaced), idempotence
        // bookkeeping and anything unknown: retrying later is the safe side;
        // the relay dead-letters after max_attempts anyway.
        _ => (Other, true),
    }
}

impl KafkaError {
    fn operation(&self) -> &'static str {
        match self {
            KafkaError::Config(_) | KafkaError::Client(_) => "configure",
            KafkaError::Flush(_) => "flush",
            KafkaError::Connect { .. } => "connect",
            _ => "publish",
        }
    }

    fn kind_and_transience(&self) -> (ErrorKind, bool) {
        match self {
            KafkaError::Config(_) | KafkaError::Client(_) => (ErrorKind::Config, false),
            KafkaError::InvalidTopic { .. } => (ErrorKind::InvalidInput, false),
            KafkaError::Enqueue { code, auto_create }
            | KafkaError::Delivery { code, auto_create } => classify(*code, *auto_create),
            KafkaError::Canceled => (ErrorKind::Other, true),
            KafkaError::ReportTimeout(_) => (ErrorKind::Timeout, true),
            KafkaError::Flush(_) => (ErrorKind::Timeout, true),
            KafkaError::Unreachable(_) => (ErrorKind::Connection, true),
            // Refused credentials stay refused; anything else (down,
            // unreachable, not answering) may pass.
            KafkaError::Connect { code, .. } => match code.map(|c| classify(c, false)) {
                Some((ErrorKind::Unauthorized, _)) => (ErrorKind::Unauthorized, false),
                _ => (ErrorKind::Connection, true),
            },
        }
    }
}

impl From<KafkaError> for outbox_core::Error {
    fn from(e: KafkaError) -> Self {
        let (kind, transient) = e.kind_and_transience();
        let operation = e.operation();
        let message = e.to_string();
        let error = if transient {
            outbox_core::Error::transient(kind, message)
        } else {
            outbox_core::Error::permanent(kind, message)
        };
        let error = error.with_backend(BACKEND).with_operation(operation);
        if matches!(e, KafkaError::Unreachable(_)) {
            error.unsent()
        } else {
            error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_contract() {
        let permanent = [
            (Code::MessageSizeTooLarge, ErrorKind::TooLarge),
            (Code::MessageBatchTooLarge, ErrorKind::TooLarge),
            (Code::UnknownTopicOrPartition, ErrorKind::Unroutable),
            (Code::UnknownTopic, ErrorKind::Unroutable),
            (Code::TopicAuthorizationFailed, ErrorKind::Unauthorized),
            (Code::ClusterAuthorizationFailed, ErrorKind::Unauthorized),
            (Code::SaslAuthenticationFailed, ErrorKind::Unauthorized),
            (Code::InvalidTopic, ErrorKind::InvalidInput),
            (Code::PolicyViolation, ErrorKind::Rejected),
        ];
        for (code, kind) in permanent {
            assert_eq!(classify(code, false), (kind, false), "{code:?}");
        }
        let transient = [
            (Code::MessageTimedOut, ErrorKind::Timeout),
            (Code::RequestTimedOut, ErrorKind::Timeout),
            (Code::BrokerTransportFailure, ErrorKind::Connection),
            (Code::AllBrokersDown, ErrorKind::Connection),
            (Code::NotLeaderForPartition, ErrorKind::Connection),
            (Code::NotEnoughReplicas, ErrorKind::Rejected),
            (Code::NotEnoughReplicasAfterAppend, ErrorKind::Rejected),
            (Code::QueueFull, ErrorKind::Other),
            (Code::Fatal, ErrorKind::Other),
            (Code::OutOfOrderSequenceNumber, ErrorKind::Other),
        ];
        for (code, kind) in transient {
            assert_eq!(classify(code, false), (kind, true), "{code:?}");
        }
        // An unknown topic is worth retrying when the broker creates topics.
        assert_eq!(
            classify(Code::UnknownTopicOrPartition, true),
            (ErrorKind::Unroutable, true)
        );
    }

    #[test]
    fn conversion_names_backend_and_operation() {
        let e: outbox_core::Error = KafkaError::Delivery {
            code: Code::MessageSizeTooLarge,
            auto_create: false,
        }
        .into();
        assert_eq!(e.backend(), Some("kafka"));
        assert_eq!(e.operation(), Some("publish"));
        assert!(!e.is_transient());
        assert!(
            e.to_string().starts_with("kafka publish: too large: "),
            "{e}"
        );

        let e: outbox_core::Error = KafkaError::Config("brokers is empty".into()).into();
        assert_eq!(e.operation(), Some("configure"));
        assert_eq!(e.kind(), ErrorKind::Config);

        let e: outbox_core::Error = KafkaError::Flush("timed out".into()).into();
        assert_eq!(e.operation(), Some("flush"));
        assert!(e.is_transient());
    }
}
