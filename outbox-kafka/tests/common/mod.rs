//! Helpers shared by the Kafka tests: unique topic names, a transport on a
//! mock cluster, and a consumer that records what arrived.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::testing::{Probe, Received};
use outbox_core::{wire, Headers, Message, MessageId, PublishResult, Transport};
use outbox_kafka::{KafkaConfig, KafkaConfigBuilder, KafkaTransport};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

/// A topic name no other test uses.
pub fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::now_v7().simple())
}

/// A transport on `bootstrap` with test-friendly settings: an unknown topic
/// is given up after one second instead of librdkafka's thirty.
pub fn transport(
    bootstrap: &str,
    configure: impl FnOnce(KafkaConfigBuilder) -> KafkaConfigBuilder,
) -> KafkaTransport {
    let builder =
        KafkaConfig::builder(bootstrap).property("topic.metadata.propagation.max.ms", "1000");
    KafkaTransport::new(configure(builder).build().unwrap()).unwrap()
}

/// One record as a consumer saw it, with its partition and offset.
#[derive(Clone, Debug)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub received: Received,
}

/// A consumer reading partitions `0..partitions` of a topic from the start,
/// in a background task.
pub struct KafkaProbe {
    records: Arc<Mutex<Vec<Record>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KafkaProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KafkaProbe {
    pub fn start(bootstrap: &str, topic: &str, partitions: i32) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("probe"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = records.clone();
        let task = tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(m) => {
                        let mut headers = Headers::new();
                        let mut id = None;
                        if let Some(h) = m.headers() {
                            for header in h.iter() {
                                let value = header
                                    .value
                                    .map(|v| String::from_utf8_lossy(v).into_owned())
                                    .unwrap_or_default();
                                if header.key == wire::ID_HEADER {
                                    id = value.parse::<MessageId>().ok();
                                }
                                headers.insert(header.key.to_string(), value);
                            }
                        }
                        let received = Received {
                            id,
                            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                            headers,
                            payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                        };
                        sink.lock().unwrap().push(Record {
                            partition: m.partition(),
                            offset: m.offset(),
                            received,
                        });
                    }
                    Err(_) => {
                        // Broker away (restart test): librdkafka reconnects.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        KafkaProbe { records, task }
    }

    /// Waits until every id in `ids` arrived or `timeout` passed; returns
    /// all records so far.
    pub async fn wait_for(&self, ids: &[MessageId], timeout: Duration) -> Vec<Record> {
        let start = Instant::now();
        loop {
            let got = self.records.lock().unwrap().clone();
            let all = ids
                .iter()
                .all(|id| got.iter().any(|r| r.received.id == Some(*id)));
            if all || start.elapsed() >= timeout {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `count` records arrived or `timeout` passed.
    pub async fn records(&self, count: usize, timeout: Duration) -> Vec<Record> {
        let start = Instant::now();
        loop {
            let got = self.records.lock().unwrap().clone();
            if got.len() >= count || start.elapsed() >= timeout {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[async_trait]
impl Probe for KafkaProbe {
    async fn received(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.records(count, timeout)
            .await
            .into_iter()
            .map(|r| r.received)
            .collect()
    }
}

/// A keyless message with a small payload.
pub fn message(topic: &str, i: usize) -> Message {
    Message::builder(topic, format!("payload {i}"))
        .header("x-index", i.to_string())
        .build()
        .unwrap()
}

/// Publishes `messages` the way a relay would: failed ones (which must be
/// transient) are published again until every message is acknowledged or
/// `deadline` passes. Returns the transient errors seen.
pub async fn publish_until_acknowledged(
    transport: &dyn Transport,
    messages: Vec<Message>,
    deadline: Duration,
) -> Vec<outbox_core::Error> {
    let start = Instant::now();
    let mut pending = messages;
    let mut errors = Vec::new();
    while !pending.is_empty() {
        assert!(
            start.elapsed() < deadline,
            "{} messages still unacknowledged after {deadline:?}; last errors: {:?}",
            pending.len(),
            errors.iter().rev().take(3).collect::<Vec<_>>()
        );
        let results: Vec<PublishResult> = transport.publish_batch(&pending).await;
        assert_eq!(results.len(), pending.len());
        let mut retry = Vec::new();
        for (m, r) in pending.into_iter().zip(results) {
            if let Err(e) = r {
                assert!(e.is_transient(), "only transient failures expected: {e}");
                errors.push(e);
                retry.push(m);
            }
        }
        if !retry.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        pending = retry;
    }
    errors
}
