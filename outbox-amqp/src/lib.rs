//! RabbitMQ transport for the outbox relay (filled by the NATS/AMQP issue):
//! publisher confirms, persistent delivery, mandatory publishes and a bounded
//! confirm window, on lapin.
