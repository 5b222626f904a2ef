//! The (only) broker of the mock cluster goes down mid-run and comes back.
//!
//! "None lost" here: the mock cluster keeps its log while a broker is down,
//! so every message must end up in the topic. The publisher behaves like a
//! relay: messages that fail (transiently: a delivery timeout, or not sent
//! while no broker answers) are published again until every one is
//! acknowledged; a consumer then must see every message id at least once.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{message, publish_until_acknowledged, transport, unique, KafkaProbe};
use outbox_core::{Message, Transport};
use rdkafka::mocking::MockCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_and_up_mid_run_loses_nothing() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let topic = unique("restart");
    cluster.create_topic(&topic, 2, 1).unwrap();
    let probe = KafkaProbe::start(&bootstrap, &topic, 2);
    // A short delivery timeout so that messages fail (transiently) while the
    // broker is down, and the relay-like retry path is exercised.
    let kafka = Arc::new(transport(&bootstrap, |b| {
        b.delivery_timeout(Duration::from_millis(1000))
            .property("reconnect.backoff.ms", "50")
            .property("reconnect.backoff.max.ms", "200")
    }));

    let total = 1200;
    let all: Vec<Message> = (0..total).map(|i| message(&topic, i)).collect();
    let publisher = {
        let kafka = kafka.clone();
        let all = all.clone();
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for batch in all.chunks(20) {
                errors.extend(
                    publish_until_acknowledged(&*kafka, batch.to_vec(), Duration::from_secs(60))
                        .await,
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            errors
        })
    };

    // Take the broker down once some messages went through.
    let start = Instant::now();
    while probe.records(1, Duration::ZERO).await.len() < 200 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no progress before the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.broker_down(1).unwrap();
    println!(
        "broker down after {} records",
        probe.records(0, Duration::ZERO).await.len()
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cluster.broker_up(1).unwrap();
    println!("broker up again");

    let errors = publisher.await.unwrap();
    println!(
        "all {total} acknowledged after {:?}; {} transient failures retried (e.g. {:?})",
        start.elapsed(),
        errors.len(),
        errors.first().map(ToString::to_string)
    );
    // Messages queued before librdkafka noticed the outage fail after the
    // delivery timeout; later calls wait for a broker to answer (up to
    // `connect_timeout`) and otherwise send nothing: every error is
    // transient.
    assert!(errors.iter().all(|e| e.is_transient()));

    let ids: Vec<_> = all.iter().map(|m| m.id).collect();
    let records = probe.wait_for(&ids, Duration::from_secs(30)).await;
    let seen: HashSet<_> = records.iter().filter_map(|r| r.received.id).collect();
    let missing: Vec<_> = all.iter().filter(|m| !seen.contains(&m.id)).collect();
    assert!(
        missing.is_empty(),
        "{} messages lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    println!(
        "{} records for {total} messages ({} duplicates from retries)",
        records.len(),
        records.len() - seen.len()
    );
    kafka.flush().await.unwrap();
}

/// While every broker is down, a publish sends nothing and says so
/// (`is_unsent`, so the relay hands the messages back uncounted instead of
/// letting each fail after `delivery_timeout` and use up an attempt); once a
/// broker is back, publishes go through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_every_broker_is_down_nothing_is_sent_and_the_errors_say_so() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let topic = unique("down");
    cluster.create_topic(&topic, 1, 1).unwrap();
    let kafka = transport(&bootstrap, |b| {
        b.delivery_timeout(Duration::from_millis(1000))
            .connect_timeout(Duration::from_millis(500))
            .property("reconnect.backoff.ms", "50")
            .property("reconnect.backoff.max.ms", "200")
    });
    publish_until_acknowledged(&kafka, vec![message(&topic, 0)], Duration::from_secs(30)).await;

    cluster.broker_down(1).unwrap();
    // Messages queued before librdkafka noticed fail after the delivery
    // timeout like any attempt; then the transport stops sending.
    let start = Instant::now();
    let unsent = loop {
        let batch: Vec<Message> = (1..=10).map(|i| message(&topic, i)).collect();
        let results = kafka.publish_batch(&batch).await;
        if results
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.is_unsent()))
        {
            break results;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "publishes never said unsent: {results:?}"
        );
    };
    let e = unsent[0].as_ref().unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(e.kind(), outbox_core::ErrorKind::Connection, "{e}");
    println!("unsent after {:?}: {e}", start.elapsed());

    cluster.broker_up(1).unwrap();
    let back = Instant::now();
    let errors =
        publish_until_acknowledged(&kafka, vec![message(&topic, 11)], Duration::from_secs(30))
            .await;
    println!(
        "published again {:?} after the broker came back ({} failed tries)",
        back.elapsed(),
        errors.len()
    );
}
