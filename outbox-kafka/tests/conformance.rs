//! The core transport conformance suite against librdkafka's mock cluster.
#![allow(clippy::unwrap_used)]

mod common;

use common::{transport, unique, KafkaProbe};
use outbox_core::testing::{transport_conformance, TransportCase};
use outbox_core::Transport;
use rdkafka::mocking::MockCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_mock_cluster() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let topic = unique("conformance");
    // One partition, so the probe sees keyed messages in the order sent.
    cluster.create_topic(&topic, 1, 1).unwrap();
    let probe = KafkaProbe::start(&bootstrap, &topic, 1);
    let kafka = transport(&bootstrap, |b| b);
    assert_eq!(kafka.name(), "kafka");

    // Auto-creation is off: a topic that does not exist is refused for good.
    let case = TransportCase::new(&topic).rejected_topic(unique("missing"));
    transport_conformance(&kafka, &probe, &case).await;
    kafka.flush().await.unwrap();
    drop(probe);
    drop(kafka);
    drop(cluster);
}
