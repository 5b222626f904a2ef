//! NATS transport for the outbox relay (filled by the NATS/AMQP issue):
//! JetStream publishing with `Nats-Msg-Id` dedup and awaited PubAcks, and
//! core NATS publishing, both pipelined, on async-nats.
