//! Names adapters use on the wire, so that every broker carries the outbox
//! metadata the same way where it has no native field for it.
//!
//! Header names starting with [`RESERVED_PREFIX`] are refused in user
//! headers, so these never collide with application data.

/// Prefix reserved for the toolkit's own headers.
pub const RESERVED_PREFIX: &str = "outbox-";
/// Header (or stream field) carrying the message id where the broker has no
/// native message id (Kafka, Redis); also sent beside native ids.
pub const ID_HEADER: &str = "outbox-id";
/// Header carrying the key where the broker has no native key (NATS, AMQP).
pub const KEY_HEADER: &str = "outbox-key";
/// Header carrying the original topic when a route renamed it.
pub const TOPIC_HEADER: &str = "outbox-topic";
