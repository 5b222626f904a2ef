//! The outbox-core transport conformance suite against the real NATS server:
//! once in JetStream mode (probe: a JetStream consumer on the test's stream),
//! once in core mode (probe: a core subscription).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use outbox_core::testing::{transport_conformance, TransportCase};
use outbox_nats::{NatsConfig, NatsTransport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_passes_transport_conformance() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let u = unique();
    let stream = format!("OUTBOX_CONF_{u}");
    let js = jetstream().await;
    create_stream(&js, &stream, &[&format!("conf{u}.>")]).await;
    let _cleanup = StreamCleanup(stream.clone());

    let transport = NatsTransport::connect(NatsConfig::builder(NATS_URL).build().unwrap())
        .await
        .unwrap();
    let topic = format!("conf{u}.orders");
    let probe = StreamProbe {
        js,
        stream,
        subject: topic.clone(),
    };
    let case = TransportCase::new(topic).rejected_topic(format!("nostream{u}.orders"));
    transport_conformance(&transport, &probe, &case).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_passes_transport_conformance() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let topic = format!("core{}.orders", unique());
    let probe = SubscriptionProbe::subscribe(&topic).await;
    let transport = NatsTransport::connect(NatsConfig::builder(NATS_URL).core().build().unwrap())
        .await
        .unwrap();
    transport_conformance(&transport, &probe, &TransportCase::new(topic)).await;
}
