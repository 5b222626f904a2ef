//! The outbox-core transport conformance suite against the real RabbitMQ,
//! with a queue bound to the test's routing key as the probe.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use outbox_amqp::{AmqpConfig, AmqpTransport};
use outbox_core::testing::{transport_conformance, TransportCase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_passes_transport_conformance() {
    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let u = unique();
    let exchange = format!("outbox-conf-{u}");
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![],
    };
    let transport = AmqpTransport::connect(
        AmqpConfig::builder(AMQP_URL)
            .exchange(&exchange)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let topic = format!("conf{u}.orders");
    let probe = QueueProbe::bind(&exchange, &topic).await;
    let case = TransportCase::new(topic).rejected_topic(format!("unbound{u}.orders"));
    transport_conformance(&transport, &probe, &case).await;
}
