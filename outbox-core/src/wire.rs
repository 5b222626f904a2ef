//! Names adapters use on the wire, so that every broker carries the outbox
//! metadata the same way where it has no native field for it.
//!
//! Header names starting with [`RESERVED_PREFIX`] are refused in user
//! headers, so these never collide with application data.

/// Prefix reserved for the toolkit's own headers.
pub const RESERVED_PREFIX: &str = "outbox-";
/// Header carrying the message id where the broker has no native message id
/// (Kafka); also sent beside native ids (NATS, AMQP). Redis stream entries
/// carry it in their `id` field.
pub const ID_HEADER: &str = "outbox-id";
/// Header carrying the key where the broker has no native key (NATS, AMQP).
pub const KEY_HEADER: &str = "outbox-key";
/// Header carrying the original topic when a route renamed it.
pub const TOPIC_HEADER: &str = "outbox-topic";
