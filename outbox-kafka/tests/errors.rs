//! Request errors injected into librdkafka's mock cluster are classified as
//! the contract says: not-enough-replicas is transient (librdkafka retries
//! it, and if it persists past the delivery timeout the message fails
//! transiently); message-too-large and topic-authorization-failed are
//! permanent.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{message, publish_until_acknowledged, transport, unique, KafkaProbe};
use outbox_core::{ErrorKind, Transport};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const NOT_ENOUGH_REPLICAS: RDKafkaRespErr = RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS;
const MSG_SIZE_TOO_LARGE: RDKafkaRespErr = RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE;
const TOPIC_AUTHORIZATION_FAILED: RDKafkaRespErr =
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;

/// A cluster with one topic of one partition, a probe on it, and a transport
/// that has already published one message (so the producer id is set up and
/// injected errors hit Produce requests only).
async fn setup(
    delivery_timeout: Duration,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
    KafkaProbe,
    outbox_kafka::KafkaTransport,
) {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let topic = unique("inject");
    cluster.create_topic(&topic, 1, 1).unwrap();
    let probe = KafkaProbe::start(&bootstrap, &topic, 1);
    let kafka = transport(&bootstrap, |b| {
        b.delivery_timeout(delivery_timeout)
            .property("retry.backoff.ms", "20")
            .property("retry.backoff.max.ms", "100")
    });
    // The first message may time out while the producer starts up on a
    // busy machine (short delivery timeouts): retry it like a relay would.
    publish_until_acknowledged(&kafka, vec![message(&topic, 0)], Duration::from_secs(30)).await;
    (cluster, topic, probe, kafka)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_enough_replicas_is_retried_and_delivered() {
    let (cluster, topic, probe, kafka) = setup(Duration::from_secs(10)).await;
    cluster.request_errors(RDKafkaApiKey::Produce, &[NOT_ENOUGH_REPLICAS; 3]);
    let m = message(&topic, 1);
    let results = kafka.publish_batch(std::slice::from_ref(&m)).await;
    assert!(
        results[0].is_ok(),
        "librdkafka retries a transient error: {:?}",
        results[0]
    );
    let got = probe.wait_for(&[m.id], Duration::from_secs(10)).await;
    let copies = got.iter().filter(|r| r.received.id == Some(m.id)).count();
    assert_eq!(copies, 1, "delivered once, no duplicate from the retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_not_enough_replicas_fails_transiently() {
    let (cluster, topic, _probe, kafka) = setup(Duration::from_millis(1500)).await;
    cluster.request_errors(RDKafkaApiKey::Produce, &[NOT_ENOUGH_REPLICAS; 1000]);
    let start = Instant::now();
    let results = kafka.publish_batch(&[message(&topic, 1)]).await;
    let e = results[0].as_ref().unwrap_err();
    println!("after {:?}: {e}", start.elapsed());
    assert!(e.is_transient(), "{e}");
    assert!(
        matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Rejected),
        "{e}"
    );
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    // Once the broker recovers, the relay's retry goes through.
    let results = kafka.publish_batch(&[message(&topic, 2)]).await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_too_large_from_the_broker_is_permanent() {
    let (cluster, topic, probe, kafka) = setup(Duration::from_secs(10)).await;
    cluster.request_errors(RDKafkaApiKey::Produce, &[MSG_SIZE_TOO_LARGE]);
    let results = kafka.publish_batch(&[message(&topic, 1)]).await;
    let e = results[0].as_ref().unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
    assert_eq!(e.operation(), Some("publish"));

    // The producer carries on with the next messages.
    let next = message(&topic, 2);
    let results = kafka.publish_batch(std::slice::from_ref(&next)).await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let got = probe.wait_for(&[next.id], Duration::from_secs(10)).await;
    assert!(got.iter().any(|r| r.received.id == Some(next.id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_authorization_failure_is_permanent() {
    let (cluster, topic, _probe, kafka) = setup(Duration::from_secs(10)).await;
    cluster.request_errors(RDKafkaApiKey::Produce, &[TOPIC_AUTHORIZATION_FAILED]);
    let results = kafka.publish_batch(&[message(&topic, 1)]).await;
    let e = results[0].as_ref().unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_a_permanent_config_error() {
    let config = outbox_kafka::KafkaConfig::builder("127.0.0.1:1")
        .property("no.such.property", "1")
        .build()
        .unwrap();
    let e = outbox_kafka::KafkaTransport::new(config).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(!e.is_transient());
    assert_eq!(e.operation(), Some("configure"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_is_transient_and_the_producer_is_replaced() {
    let (cluster, topic, probe, kafka) = setup(Duration::from_secs(10)).await;
    // An out-of-order sequence on the head-of-line request makes librdkafka
    // raise a fatal error: that producer instance cannot send any more.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    let first = message(&topic, 1);
    let results = kafka.publish_batch(std::slice::from_ref(&first)).await;
    let e = results[0].as_ref().unwrap_err();
    println!("fatal: {e}");
    assert!(e.is_transient(), "{e}");

    // The next batch goes through a fresh producer, as does the retry.
    let next = message(&topic, 2);
    let results = kafka.publish_batch(&[first.clone(), next.clone()]).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let got = probe
        .wait_for(&[first.id, next.id], Duration::from_secs(10))
        .await;
    for m in [&first, &next] {
        assert!(got.iter().any(|r| r.received.id == Some(m.id)));
    }
    kafka.flush().await.unwrap();
}

/// `connect` waits for a broker's metadata: it succeeds against the mock
/// cluster, and fails within `connect_timeout` (transiently, kind
/// Connection) when nothing listens or the port does not speak Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_waits_for_a_broker() {
    let cluster = MockCluster::new(1).unwrap();
    let config = outbox_kafka::KafkaConfig::builder(cluster.bootstrap_servers())
        .connect_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    outbox_kafka::KafkaTransport::connect(config).await.unwrap();

    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let not_kafka = silent.local_addr().unwrap().to_string();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    for brokers in [closed, not_kafka] {
        let config = outbox_kafka::KafkaConfig::builder(brokers.as_str())
            .connect_timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        let started = Instant::now();
        let e = outbox_kafka::KafkaTransport::connect(config)
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{brokers}: took {:?}",
            started.elapsed()
        );
        assert!(e.is_transient(), "{brokers}: {e}");
        assert_eq!(e.kind(), ErrorKind::Connection, "{brokers}: {e}");
        assert_eq!(e.operation(), Some("connect"), "{brokers}: {e}");
        assert!(
            e.to_string().contains("no broker answered within 500ms"),
            "{brokers}: {e}"
        );
    }
    drop(silent);
}
