//! Limits every message is checked against, chosen so that any supported
//! broker accepts each part of a message that passes (topic, key, header
//! names and values). The whole message must also fit the broker's message
//! size, which these limits do not add up to: NATS counts headers in its
//! `max_payload` (1 MiB by default) and librdkafka sends at most
//! `message.max.bytes` (1,000,000 bytes by default). A message over the
//! broker's size fails to publish with a permanent
//! [`TooLarge`](crate::ErrorKind::TooLarge) error and is dead-lettered;
//! lower [`DEFAULT_MAX_PAYLOAD`] with `Outbox::max_payload` (outbox-sqlx) to
//! refuse such messages at enqueue instead.

/// Longest topic in bytes (Kafka's topic-name limit is 249).
pub const MAX_TOPIC_LEN: usize = 249;
/// Longest key in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Most headers on one message.
pub const MAX_HEADERS: usize = 64;
/// Longest header name in bytes (AMQP field names are at most 128).
pub const MAX_HEADER_NAME_LEN: usize = 128;
/// Longest header value in bytes.
pub const MAX_HEADER_VALUE_LEN: usize = 4096;
/// Default payload limit (1 MiB, the default NATS max_payload).
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
