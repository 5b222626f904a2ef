//! End to end: business transactions on PostgreSQL that enqueue (and some
//! roll back) -> relay -> each broker -> a real consumer that checks every
//! committed message arrived, in key order, once, and nothing rolled back.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use outbox_core::testing::require_service;
use outbox_core::{Relay, Router, Transport};
use outbox_tests::{consumers, produce, unique, wait_for_all, Db, Verdict, PG_ADDR};

const PRODUCERS: usize = 8;
const TRANSACTIONS: usize = 150;
const KEYS: usize = 24;
const ROLLBACK: f64 = 0.25;

/// Runs producers and one relay over `transport` for topics `topic`, and
/// checks what `arrived` reports.
async fn scenario(
    name: &str,
    topic: &str,
    transport: Arc<dyn Transport>,
    arrived: impl Fn() -> Vec<outbox_core::MessageId>,
) {
    let db = Db::fresh().await;
    let store = db.store(&format!("e2e-{name}")).await;
    let relay = Relay::builder(Arc::new(store), transport)
        .poll_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let running = relay.spawn();
    let produced = produce(&db, topic, PRODUCERS, TRANSACTIONS, KEYS, ROLLBACK, 11).await;
    let got = wait_for_all(&produced, Duration::from_secs(60), arrived).await;
    let report = running.stop().await;
    let v = Verdict::check(&produced, &got);
    v.print(
        &format!("e2e {name}"),
        produced.committed.len() + produced.rolled_back.len(),
        &format!("rolled back {}", produced.rolled_back.len()),
    );
    assert!(!produced.rolled_back.is_empty() && !produced.committed.is_empty());
    assert_eq!(v, Verdict::default(), "{name}: {v:?} (relay {report:?})");
    assert_eq!(db.backlog().await, 0, "{name}: everything settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_to_jetstream() {
    if !require_service("postgres", PG_ADDR) || !require_service("nats", "127.0.0.1:4222") {
        return;
    }
    let u = unique();
    let topic = format!("e2e.{u}.orders");
    let config = outbox_nats::NatsConfig::builder("nats://127.0.0.1:4222")
        .create_stream(outbox_nats::StreamSpec::new(
            format!("E2E_{u}"),
            [format!("e2e.{u}.>")],
        ))
        .build()
        .unwrap();
    let nats = Arc::new(outbox_nats::NatsTransport::connect(config).await.unwrap());
    let log = consumers::nats("nats://127.0.0.1:4222", &format!("e2e.{u}.>")).await;
    scenario("jetstream", &topic, nats, || log.ids()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_to_rabbitmq() {
    if !require_service("postgres", PG_ADDR) || !require_service("rabbitmq", "127.0.0.1:5672") {
        return;
    }
    let u = unique();
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let exchange = format!("e2e-{u}");
    let topic = format!("e2e.{u}.orders");
    let log = consumers::amqp(url, &exchange, &format!("e2e-{u}"), &format!("e2e.{u}.#")).await;
    let config = outbox_amqp::AmqpConfig::builder(url)
        .exchange(&exchange)
        .build()
        .unwrap();
    let amqp = Arc::new(outbox_amqp::AmqpTransport::connect(config).await.unwrap());
    scenario("rabbitmq", &topic, amqp, || log.ids()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_to_kafka() {
    if !require_service("postgres", PG_ADDR) {
        return;
    }
    let cluster = rdkafka::mocking::MockCluster::new(3).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let topic = format!("e2e.{}.orders", unique());
    cluster.create_topic(&topic, 4, 3).unwrap();
    let config = outbox_kafka::KafkaConfig::builder(&bootstrap)
        .build()
        .unwrap();
    let kafka = Arc::new(outbox_kafka::KafkaTransport::connect(config).await.unwrap());
    let log = consumers::kafka(&bootstrap, &topic, 4);
    scenario("kafka", &topic, kafka, || log.ids()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_to_redis_streams() {
    if !require_service("postgres", PG_ADDR) || !require_service("redis", "127.0.0.1:6379") {
        return;
    }
    let topic = format!("e2e.{}.orders", unique());
    let config = outbox_redis::RedisConfig::builder("redis://127.0.0.1:6379")
        .build()
        .unwrap();
    let redis = Arc::new(outbox_redis::RedisTransport::connect(config).await.unwrap());
    let log = consumers::redis_stream("redis://127.0.0.1:6379", &topic);
    scenario("redis", &topic, redis, || log.ids()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_relay_routes_topics_to_four_brokers() {
    if !require_service("postgres", PG_ADDR)
        || !require_service("nats", "127.0.0.1:4222")
        || !require_service("rabbitmq", "127.0.0.1:5672")
        || !require_service("redis", "127.0.0.1:6379")
    {
        return;
    }
    let u = unique();
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let orders = format!("orders.{u}");
    cluster.create_topic(&orders, 2, 1).unwrap();
    let kafka = outbox_kafka::KafkaTransport::connect(
        outbox_kafka::KafkaConfig::builder(&bootstrap)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let nats = outbox_nats::NatsTransport::connect(
        outbox_nats::NatsConfig::builder("nats://127.0.0.1:4222")
            .core()
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let redis = outbox_redis::RedisTransport::connect(
        outbox_redis::RedisConfig::builder("redis://127.0.0.1:6379")
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let exchange = format!("mixed-{u}");
    let amqp = outbox_amqp::AmqpTransport::connect(
        outbox_amqp::AmqpConfig::builder(url)
            .exchange(&exchange)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let router = Router::builder()
        .route("orders.*", Arc::new(kafka))
        .route("notifications.*", Arc::new(nats))
        .route("audit.>", Arc::new(redis))
        .fallback(Arc::new(amqp))
        .build()
        .unwrap();
    let k = consumers::kafka(&bootstrap, &orders, 2);
    let n = consumers::nats("nats://127.0.0.1:4222", &format!("notifications.{u}")).await;
    let r = consumers::redis_stream("redis://127.0.0.1:6379", &format!("audit.{u}.login"));
    let a = consumers::amqp(url, &exchange, &format!("mixed-{u}"), "#").await;

    let db = Db::fresh().await;
    let relay = Relay::builder(Arc::new(db.store("e2e-mixed").await), Arc::new(router))
        .poll_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let running = relay.spawn();
    let topics = [
        orders.clone(),
        format!("notifications.{u}"),
        format!("audit.{u}.login"),
        format!("billing.{u}"),
    ];
    let mut all = Vec::new();
    for (i, topic) in topics.iter().enumerate() {
        let produced = produce(&db, topic, 2, 40, 4, 0.2, 100 + i as u64).await;
        all.push(produced);
    }
    let logs = [k.clone(), n.clone(), r.clone(), a.clone()];
    for (produced, log) in all.iter().zip(&logs) {
        let got = wait_for_all(produced, Duration::from_secs(30), || log.ids()).await;
        let v = Verdict::check(produced, &got);
        assert_eq!(v, Verdict::default(), "{v:?}");
    }
    let report = running.stop().await;
    let total: usize = all.iter().map(|p| p.committed.len()).sum();
    outbox_tests::summary(&format!(
        "SUMMARY mixed routing: {total} committed messages to kafka, nats, redis and rabbitmq, published {}",
        report.published
    ));
    assert_eq!(report.published as usize, total);
}
