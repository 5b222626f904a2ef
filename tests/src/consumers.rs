//! Consumers on the real brokers that record, in arrival order, the outbox
//! id of every message they receive.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use outbox_core::MessageId;

/// Ids received so far, shared with a background task.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<MessageId>>>);

impl Log {
    /// A snapshot, in arrival order.
    pub fn ids(&self) -> Vec<MessageId> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn push(&self, id: MessageId) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(id);
    }
}

fn parse(id: Option<&str>) -> Option<MessageId> {
    id.and_then(|s| s.parse().ok())
}

/// A core NATS subscription on `subject` (wildcards allowed); reads the id
/// from `Nats-Msg-Id` or `outbox-id`.
pub async fn nats(url: &str, subject: &str) -> Log {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let mut sub = client
        .subscribe(subject.to_string())
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let log = Log::default();
    let out = log.clone();
    tokio::spawn(async move {
        let _client = client;
        while let Some(m) = sub.next().await {
            let id = m.headers.as_ref().and_then(|h| {
                h.get("Nats-Msg-Id")
                    .or_else(|| h.get(outbox_core::wire::ID_HEADER))
                    .map(|v| v.as_str().to_string())
            });
            if let Some(id) = parse(id.as_deref()) {
                out.push(id);
            }
        }
    });
    log
}

/// A durable queue bound to `exchange` with `binding`, consumed with acks;
/// reads the id from the `message_id` property.
pub async fn amqp(url: &str, exchange: &str, queue: &str, binding: &str) -> Log {
    let conn = amqp_declare(url, exchange, queue, binding).await;
    let ch = conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "outbox-tests".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let log = Log::default();
    let out = log.clone();
    tokio::spawn(async move {
        let _conn = conn;
        while let Some(Ok(d)) = consumer.next().await {
            if let Some(id) = parse(d.properties.message_id().as_ref().map(|s| s.as_str())) {
                out.push(id);
            }
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });
    log
}

/// A Kafka consumer reading every partition of `topic` from the beginning;
/// reads the id from the `outbox-id` header.
pub fn kafka(bootstrap: &str, topic: &str, partitions: i32) -> Log {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers as _;
    use rdkafka::Message as _;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("outbox-tests-{}", crate::unique()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let log = Log::default();
    let out = log.clone();
    tokio::spawn(async move {
        loop {
            match consumer.recv().await {
                Ok(m) => {
                    let id = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == outbox_core::wire::ID_HEADER)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    });
                    if let Some(id) = parse(id.as_deref()) {
                        out.push(id);
                    }
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    });
    log
}

/// A reader of the Redis stream `key` from its start (XREAD, blocking);
/// reads the id from the entry's `id` field. Reconnects after errors.
pub fn redis_stream(url: &str, key: &str) -> Log {
    let log = Log::default();
    let out = log.clone();
    let url = url.to_string();
    let key = key.to_string();
    tokio::spawn(async move {
        let mut last = "0-0".to_string();
        loop {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                return;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            };
            loop {
                let reply: redis::RedisResult<redis::streams::StreamReadReply> =
                    redis::cmd("XREAD")
                        .arg("COUNT")
                        .arg(1000)
                        .arg("BLOCK")
                        // Under redis-rs's 500 ms response timeout.
                        .arg(200)
                        .arg("STREAMS")
                        .arg(&key)
                        .arg(&last)
                        .query_async(&mut conn)
                        .await;
                let Ok(reply) = reply else { break };
                for stream in reply.keys {
                    for entry in stream.ids {
                        last = entry.id.clone();
                        let id: Option<String> = entry.get(outbox_redis::envelope::FIELD_ID);
                        if let Some(id) = parse(id.as_deref()) {
                            out.push(id);
                        }
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    log
}

/// Declares a durable topic exchange and a durable queue bound to it with
/// `binding`, and returns the connection (drop it when done).
pub async fn amqp_declare(
    url: &str,
    exchange: &str,
    queue: &str,
    binding: &str,
) -> lapin::Connection {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exchange");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare queue");
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        binding.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    conn
}
