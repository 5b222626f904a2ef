//! Producer behaviour against librdkafka's mock cluster: order per key
//! within a partition, topic mapping, and messages refused before sending.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{message, transport, unique, KafkaProbe};
use outbox_core::{wire, ErrorKind, Message, Transport};
use rdkafka::mocking::MockCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_one_key_stay_in_one_partition_in_order() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let topic = unique("order");
    cluster.create_topic(&topic, 4, 1).unwrap();
    let probe = KafkaProbe::start(&bootstrap, &topic, 4);
    let kafka = transport(&bootstrap, |b| b);

    // 12 keys x 40 messages, interleaved, over several batches.
    let keys = 12;
    let per_key = 40;
    let all: Vec<Message> = (0..per_key)
        .flat_map(|seq| {
            let topic = topic.clone();
            (0..keys).map(move |k| {
                Message::builder(topic.as_str(), format!("{seq}"))
                    .key(format!("key-{k}"))
                    .header("x-seq", seq.to_string())
                    .build()
                    .unwrap()
            })
        })
        .collect();
    let start = Instant::now();
    for batch in all.chunks(96) {
        let results = kafka.publish_batch(batch).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }
    println!(
        "published {} keyed messages in {:?}",
        all.len(),
        start.elapsed()
    );

    let records = probe.records(all.len(), Duration::from_secs(20)).await;
    assert_eq!(records.len(), all.len(), "every message arrived once");
    let mut partitions: HashMap<String, i32> = HashMap::new();
    let mut seqs: BTreeMap<(String, i32), Vec<(i64, u32)>> = BTreeMap::new();
    for r in &records {
        let key = r.received.key.clone().unwrap();
        let p = *partitions.entry(key.clone()).or_insert(r.partition);
        assert_eq!(p, r.partition, "key {key} stays in one partition");
        let seq: u32 = r.received.headers["x-seq"].parse().unwrap();
        seqs.entry((key, p)).or_default().push((r.offset, seq));
    }
    assert_eq!(seqs.len(), keys, "every key seen");
    for ((key, _), mut list) in seqs {
        list.sort();
        let order: Vec<u32> = list.iter().map(|(_, s)| *s).collect();
        let expected: Vec<u32> = (0..per_key as u32).collect();
        assert_eq!(order, expected, "key {key} in enqueue order by offset");
    }
    let used: std::collections::HashSet<i32> = partitions.values().copied().collect();
    assert!(used.len() > 1, "keys spread over partitions: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_map_and_prefix_name_the_kafka_topic() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let mapped = unique("mapped");
    let prefix = format!("{}.", unique("pre"));
    let prefixed = format!("{prefix}orders.placed");
    cluster.create_topic(&mapped, 1, 1).unwrap();
    cluster.create_topic(&prefixed, 1, 1).unwrap();
    let mapped_probe = KafkaProbe::start(&bootstrap, &mapped, 1);
    let prefixed_probe = KafkaProbe::start(&bootstrap, &prefixed, 1);
    let kafka = transport(&bootstrap, |b| {
        b.prefix(prefix.as_str())
            .map_topic("audit:login", mapped.as_str())
    });

    let a = message("audit:login", 1);
    let b = message("orders.placed", 2);
    let results = kafka.publish_batch(&[a.clone(), b.clone()]).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let got = mapped_probe.records(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].received.id, Some(a.id));
    assert_eq!(
        got[0]
            .received
            .headers
            .get(wire::TOPIC_HEADER)
            .map(String::as_str),
        Some("audit:login"),
        "a renamed topic carries the original"
    );
    let got = prefixed_probe.records(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].received.id, Some(b.id));
    assert_eq!(
        got[0]
            .received
            .headers
            .get(wire::TOPIC_HEADER)
            .map(String::as_str),
        Some("orders.placed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_and_oversized_messages_fail_permanently_before_sending() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let topic = unique("local");
    cluster.create_topic(&topic, 1, 1).unwrap();
    let probe = KafkaProbe::start(&bootstrap, &topic, 1);
    let kafka = transport(&bootstrap, |b| b.property("message.max.bytes", "10000"));

    let good = message(&topic, 1);
    // ':' is fine in an outbox topic but not in a Kafka topic name.
    let bad_name = message("orders:placed", 2);
    let too_large = Message::builder(topic.as_str(), vec![b'x'; 20_000])
        .build()
        .unwrap();
    let good2 = message(&topic, 3);
    let results = kafka
        .publish_batch(&[good.clone(), bad_name, too_large, good2.clone()])
        .await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(results[3].is_ok(), "{:?}", results[3]);
    let e = results[1].as_ref().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(!e.is_transient());
    assert_eq!(e.backend(), Some("kafka"));
    let e = results[2].as_ref().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
    assert!(!e.is_transient());

    let got = probe.records(2, Duration::from_secs(10)).await;
    let ids: Vec<_> = got.iter().map(|r| r.received.id).collect();
    assert_eq!(
        ids,
        vec![Some(good.id), Some(good2.id)],
        "only the good ones were sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_is_created_when_auto_creation_is_on() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let topic = unique("auto");
    let kafka = transport(&bootstrap, |b| b.auto_create_topics(true));
    let m = message(&topic, 1);
    // The mock broker creates the topic on first use.
    let results = kafka.publish_batch(std::slice::from_ref(&m)).await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    kafka.flush().await.unwrap();
}
