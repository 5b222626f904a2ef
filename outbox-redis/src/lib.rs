//! Redis transport for the outbox relay (filled by the Kafka/Redis issue):
//! Redis Streams (XADD, optional dedup) and Pub/Sub publishing.
