//! One relay, four brokers: topics are routed by pattern.
//!
//! `orders.*` goes to Kafka, `notifications.*` to NATS JetStream, `audit.>`
//! to Redis Streams, and everything else to RabbitMQ. The program enqueues
//! events of several topics in PostgreSQL transactions (one rolls back), runs
//! one relay with a `Router`, and a consumer on each broker that prints where
//! each message arrived. It then cleans up its schema, stream, keys and
//! exchange and exits 0.
//!
//!     cargo run -p outbox-examples --features brokers --example mixed_routing
//!
//! Environment: `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), `NATS_URL` (default
//! `nats://127.0.0.1:4222`), `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), `REDIS_URL` (default
//! `redis://127.0.0.1:6379`), `KAFKA_BROKERS` (default: librdkafka's
//! in-process mock cluster).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use outbox_amqp::{AmqpConfig, AmqpTransport};
use outbox_core::wire::{ID_HEADER, TOPIC_HEADER};
use outbox_core::{CancellationToken, Message, MessageId, Relay, Router, Signal};
use outbox_kafka::{KafkaConfig, KafkaTransport};
use outbox_nats::{NatsConfig, NatsTransport, StreamSpec};
use outbox_redis::{Envelope, RedisConfig, RedisTransport};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use redis::streams::StreamReadReply;
use sqlx::PgPool;
use tokio::sync::mpsc::{self, UnboundedSender};

mod common;

use common::{env_or, pg_connect, unique, BoxError};

/// How long an XREAD blocks: well under redis-rs's 500 ms response timeout,
/// which a reply blocked for the same 500 ms sometimes missed.
const BLOCK_MS: u64 = 200;

/// The events the program enqueues, per business transaction.
const ORDER_1: &[(&str, &str)] = &[
    ("orders.placed", r#"{"order":1,"total":120}"#),
    (
        "notifications.email",
        r#"{"to":"customer-7","text":"order 1 received"}"#,
    ),
    ("audit.order.placed", r#"{"order":1,"by":"customer-7"}"#),
    ("billing.invoice.requested", r#"{"order":1,"amount":120}"#),
];
const ORDER_2: &[(&str, &str)] = &[
    ("orders.placed", r#"{"order":2,"total":80}"#),
    (
        "notifications.email",
        r#"{"to":"customer-9","text":"order 2 received"}"#,
    ),
];
const PAYMENT_1: &[(&str, &str)] = &[
    ("orders.paid", r#"{"order":1,"amount":120}"#),
    (
        "notifications.sms",
        r#"{"to":"customer-7","text":"payment received"}"#,
    ),
    ("audit.user.login", r#"{"user":"customer-7"}"#),
];
const KAFKA_TOPICS: &[&str] = &["orders.placed", "orders.paid"];
const REDIS_TOPICS: &[&str] = &["audit.order.placed", "audit.user.login"];

/// A message as one of the consumers received it.
struct Arrived {
    broker: &'static str,
    id: Option<MessageId>,
    topic: String,
}

/// Where the router should send `topic`.
fn expected_broker(topic: &str) -> &'static str {
    let tokens: Vec<&str> = topic.split('.').collect();
    match tokens.as_slice() {
        ["orders", _] => "kafka",
        ["notifications", _] => "nats",
        ["audit", _, ..] => "redis",
        _ => "rabbitmq",
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mixed_routing failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Names of this run's broker-side objects, unique so that runs never collide.
struct Names {
    schema: String,
    kafka_prefix: String,
    nats_prefix: String,
    nats_stream: String,
    redis_prefix: String,
    exchange: String,
}

async fn run() -> Result<(), BoxError> {
    let db_url = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let nats_url = env_or("NATS_URL", "nats://127.0.0.1:4222");
    let amqp_url = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let redis_url = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let run_id = unique();
    let n = Names {
        schema: format!("example_mixed_{run_id}"),
        kafka_prefix: format!("example-{run_id}."),
        nats_prefix: format!("example_{run_id}."),
        nats_stream: format!("EXAMPLE_{}", run_id.to_uppercase()),
        redis_prefix: format!("example:{run_id}:"),
        exchange: format!("example-{run_id}"),
    };

    println!("outbox example: one relay routing to Kafka, NATS, Redis and RabbitMQ");
    let pool = pg_connect(&db_url).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();

    // Kafka: a real cluster from KAFKA_BROKERS, or the in-process mock.
    let mut mock = None;
    let bootstrap = match std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(brokers) => {
            println!("   Kafka at {brokers} (topics are created on first publish)");
            brokers
        }
        None => {
            let cluster = MockCluster::new(1)?;
            for topic in KAFKA_TOPICS {
                cluster.create_topic(&format!("{}{topic}", n.kafka_prefix), 1, 1)?;
            }
            println!("   KAFKA_BROKERS is unset: Kafka is librdkafka's in-process mock cluster");
            let brokers = cluster.bootstrap_servers();
            mock = Some(cluster);
            brokers
        }
    };
    let kafka = KafkaTransport::connect(
        KafkaConfig::builder(&bootstrap)
            .prefix(&n.kafka_prefix)
            .auto_create_topics(mock.is_none())
            .build()?,
    )
    .await?;
    kafka_consumer(&bootstrap, &n.kafka_prefix, tx.clone())?;

    // NATS JetStream: subjects `example_<run>.<topic>` in this run's stream.
    let nats = NatsTransport::connect(
        NatsConfig::builder(&nats_url)
            .subject_prefix(&n.nats_prefix)
            .create_stream(StreamSpec::new(
                &n.nats_stream,
                [format!("{}>", n.nats_prefix)],
            ))
            .build()?,
    )
    .await
    .map_err(|e| {
        format!("cannot connect to NATS: {e} (start it with scripts/services.sh, or set NATS_URL)")
    })?;
    let nats_client = async_nats::connect(&nats_url).await?;
    nats_consumer(&nats_client, &n.nats_prefix, tx.clone()).await?;

    // Redis Streams: key `example:<run>:<topic>`.
    let redis = RedisTransport::connect(
        RedisConfig::builder(&redis_url)
            .prefix(&n.redis_prefix)
            .build()?,
    )
    .await
    .map_err(|e| {
        format!(
            "cannot connect to Redis: {e} (start it with scripts/services.sh, or set REDIS_URL)"
        )
    })?;
    let redis_client = redis::Client::open(redis_url.as_str())?;
    redis_consumer(&redis_client, &n.redis_prefix, tx.clone()).await?;

    // RabbitMQ: this run's topic exchange, a queue bound to everything.
    let amqp_conn = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("cannot connect to RabbitMQ: {e} (start it with scripts/services.sh, or set AMQP_URL)"))?;
    let channel = amqp_conn.create_channel().await?;
    amqp_consumer(&channel, &n.exchange, tx.clone()).await?;
    let rabbit = AmqpTransport::connect(
        AmqpConfig::builder(&amqp_url)
            .exchange(&n.exchange)
            .build()?,
    )
    .await?;
    drop(tx);

    // One router, one relay.
    let router = Router::builder()
        .route("orders.*", Arc::new(kafka))
        .route("notifications.*", Arc::new(nats))
        .route("audit.>", Arc::new(redis))
        .fallback(Arc::new(rabbit))
        .build()?;
    println!(
        "   routes: orders.*        -> Kafka topic {}<topic>",
        n.kafka_prefix
    );
    println!(
        "           notifications.* -> NATS subject {}<topic>",
        n.nats_prefix
    );
    println!(
        "           audit.>         -> Redis stream {}<topic>",
        n.redis_prefix
    );
    println!(
        "           anything else   -> RabbitMQ exchange {}\n",
        n.exchange
    );

    let outcome = demo(&pool, &n.schema, router, &mut rx).await;

    // Clean up whatever happened.
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", n.schema))
        .execute(&pool)
        .await?;
    async_nats::jetstream::new(nats_client)
        .delete_stream(&n.nats_stream)
        .await?;
    let mut conn = redis_client.get_multiplexed_async_connection().await?;
    for topic in REDIS_TOPICS {
        redis::cmd("DEL")
            .arg(format!("{}{topic}", n.redis_prefix))
            .query_async::<()>(&mut conn)
            .await?;
    }
    channel
        .exchange_delete(n.exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    amqp_conn.close(200, "done".into()).await?;
    drop(mock);
    println!("   cleaned up the schema, stream, stream keys and exchange of this run");
    outcome
}

async fn demo(
    pool: &PgPool,
    schema: &str,
    router: Router,
    rx: &mut mpsc::UnboundedReceiver<Arrived>,
) -> Result<(), BoxError> {
    let table = format!("{schema}.outbox_messages");
    let store = PgStore::with_config(pool.clone(), StoreConfig::default().table(&table)?);
    store.migrate().await?;
    sqlx::query(&format!(
        "CREATE TABLE {schema}.orders (id INT PRIMARY KEY, total INT NOT NULL, paid BOOL NOT NULL DEFAULT false)"
    ))
    .execute(pool)
    .await?;

    let signal = Signal::new();
    let outbox = Outbox::new().table(&table)?.signal(signal.clone());
    let relay = Relay::builder(Arc::new(store), Arc::new(router))
        .signal(signal)
        .poll_interval(Duration::from_millis(200))
        .build()?;
    let cancel = CancellationToken::new();
    let running = tokio::spawn({
        let cancel = cancel.clone();
        async move { relay.run(cancel).await }
    });

    println!("1. Business transactions, each writing its events in the same transaction");
    let mut committed: Vec<(MessageId, &str)> = Vec::new();
    let mut rolled_back = Vec::new();
    let steps = [
        (
            "order 1 placed",
            "INSERT INTO {s}.orders (id, total) VALUES (1, 120)",
            ORDER_1,
            true,
        ),
        (
            "order 2 placed",
            "INSERT INTO {s}.orders (id, total) VALUES (2, 80)",
            ORDER_2,
            false,
        ),
        (
            "order 1 paid",
            "UPDATE {s}.orders SET paid = true WHERE id = 1",
            PAYMENT_1,
            true,
        ),
    ];
    for (what, sql, events, commit) in steps {
        let mut tx = pool.begin().await?;
        sqlx::query(&sql.replace("{s}", schema))
            .execute(&mut *tx)
            .await?;
        let mut ids = Vec::new();
        for (topic, json) in events {
            let payload: serde_json::Value = serde_json::from_str(json)?;
            let event = Message::json(*topic, &payload).build()?;
            outbox.enqueue(&mut *tx, &event).await?;
            ids.push((event.id, *topic));
        }
        if commit {
            tx.commit().await?;
            outbox.committed();
            committed.extend(ids);
            println!("   {what}: committed with its events");
            for (topic, _) in events {
                println!("      {topic}");
            }
        } else {
            tx.rollback().await?;
            rolled_back.extend(ids.into_iter().map(|(id, _)| id));
            println!(
                "   {what}: rolled back, and its {} events with it",
                events.len()
            );
        }
    }

    println!("\n2. Where each message arrived");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut arrived: HashMap<MessageId, Arrived> = HashMap::new();
    let mut phantoms = 0;
    while arrived.len() < committed.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(a)) => {
                println!("   {:<9} received {}", a.broker, a.topic);
                match a.id {
                    Some(id) if rolled_back.contains(&id) => phantoms += 1,
                    Some(id) => {
                        arrived.insert(id, a);
                    }
                    None => {}
                }
            }
            _ => break,
        }
    }
    // A moment more, so that a rolled-back message would have time to show up.
    while let Ok(Some(a)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        println!("   {:<9} received {}", a.broker, a.topic);
        if a.id.is_some_and(|id| rolled_back.contains(&id)) {
            phantoms += 1;
        }
    }

    cancel.cancel();
    let report = running.await?;
    let misrouted: Vec<String> = committed
        .iter()
        .filter_map(|(id, topic)| match arrived.get(id) {
            Some(a) if a.broker == expected_broker(topic) => None,
            Some(a) => Some(format!("{topic} arrived at {}", a.broker)),
            None => Some(format!("{topic} never arrived")),
        })
        .collect();
    println!("\n3. Summary");
    println!(
        "   relay published {}, consumers received {} of {} committed",
        report.published,
        arrived.len(),
        committed.len()
    );
    println!(
        "   rolled-back messages published: {}",
        if phantoms == 0 {
            "none".to_string()
        } else {
            format!("{phantoms} (bug!)")
        }
    );
    if misrouted.is_empty() && phantoms == 0 {
        println!("   every message arrived where its route sends it");
        Ok(())
    } else {
        Err(format!("unexpected outcome: {}", misrouted.join("; ")).into())
    }
}

/// Reads the Kafka topics from the beginning.
fn kafka_consumer(
    bootstrap: &str,
    prefix: &str,
    tx: UnboundedSender<Arrived>,
) -> Result<(), BoxError> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{prefix}consumer"))
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()?;
    let mut partitions = TopicPartitionList::new();
    for topic in KAFKA_TOPICS {
        partitions.add_partition_offset(&format!("{prefix}{topic}"), 0, Offset::Beginning)?;
    }
    consumer.assign(&partitions)?;
    let prefix = prefix.to_string();
    tokio::spawn(async move {
        loop {
            let Ok(m) = consumer.recv().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let header = |name: &str| {
                m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == name)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
            };
            let topic = header(TOPIC_HEADER)
                .unwrap_or_else(|| m.topic().trim_start_matches(&prefix).to_string());
            let id = header(ID_HEADER).and_then(|s| s.parse().ok());
            if tx
                .send(Arrived {
                    broker: "kafka",
                    id,
                    topic,
                })
                .is_err()
            {
                break;
            }
        }
    });
    Ok(())
}

/// A plain NATS subscription on this run's subjects (it sees what JetStream
/// stores; a durable consumer would read the stream instead).
async fn nats_consumer(
    client: &async_nats::Client,
    prefix: &str,
    tx: UnboundedSender<Arrived>,
) -> Result<(), BoxError> {
    let mut sub = client.subscribe(format!("{prefix}>")).await?;
    client.flush().await?;
    let prefix = prefix.to_string();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            let topic = header(TOPIC_HEADER)
                .unwrap_or_else(|| m.subject.trim_start_matches(&prefix).to_string());
            let id = header(ID_HEADER).and_then(|s| s.parse().ok());
            if tx
                .send(Arrived {
                    broker: "nats",
                    id,
                    topic,
                })
                .is_err()
            {
                break;
            }
        }
    });
    Ok(())
}

/// Reads this run's Redis streams from their start (XREAD, blocking).
async fn redis_consumer(
    client: &redis::Client,
    prefix: &str,
    tx: UnboundedSender<Arrived>,
) -> Result<(), BoxError> {
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect to Redis: {e}"))?;
    let keys: Vec<String> = REDIS_TOPICS
        .iter()
        .map(|t| format!("{prefix}{t}"))
        .collect();
    let prefix = prefix.to_string();
    tokio::spawn(async move {
        let mut last: Vec<String> = keys.iter().map(|_| "0-0".to_string()).collect();
        loop {
            let reply: redis::RedisResult<StreamReadReply> = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(&keys)
                .arg(&last)
                .query_async(&mut conn)
                .await;
            let reply = match reply {
                Ok(reply) => reply,
                // A read that failed (a timeout, a dropped connection) is
                // tried again: ending here lost every later message.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            for stream in reply.keys {
                let Some(i) = keys.iter().position(|k| *k == stream.key) else {
                    continue;
                };
                for entry in stream.ids {
                    last[i] = entry.id.clone();
                    let fields = entry.map.iter().filter_map(|(name, value)| match value {
                        redis::Value::BulkString(bytes) => Some((name.as_str(), bytes.as_slice())),
                        _ => None,
                    });
                    let envelope = Envelope::from_stream_fields(fields).ok();
                    let topic = envelope
                        .as_ref()
                        .and_then(|e| e.headers.get(TOPIC_HEADER).cloned())
                        .unwrap_or_else(|| stream.key.trim_start_matches(&prefix).to_string());
                    let id = envelope.map(|e| e.id);
                    if tx
                        .send(Arrived {
                            broker: "redis",
                            id,
                            topic,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    Ok(())
}

/// Declares this run's exchange (as the transport does) and consumes a
/// queue of its own bound to every routing key.
async fn amqp_consumer(
    channel: &lapin::Channel,
    exchange: &str,
    tx: UnboundedSender<Arrived>,
) -> Result<(), BoxError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("".into(), exclusive, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut deliveries = channel
        .basic_consume(
            queue.name().clone(),
            "mixed_routing".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        while let Some(Ok(d)) = deliveries.next().await {
            let id = d
                .properties
                .message_id()
                .as_ref()
                .and_then(|s| s.as_str().parse().ok());
            let topic = d.routing_key.as_str().to_string();
            let _ = d.ack(BasicAckOptions::default()).await;
            if tx
                .send(Arrived {
                    broker: "rabbitmq",
                    id,
                    topic,
                })
                .is_err()
            {
                break;
            }
        }
    });
    Ok(())
}
