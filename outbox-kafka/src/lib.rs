//! Kafka transport for the outbox relay (filled by the Kafka/Redis issue):
//! an idempotent rdkafka producer with `acks=all`, key = message key.
