//! PostgreSQL -> Kafka, end to end.
//!
//! Creates an outbox in a fresh schema on PostgreSQL, places orders in
//! transactions (order 2 rolls back), runs a relay that publishes through an
//! idempotent Kafka producer (acks=all), and a Kafka consumer that prints
//! what arrived. It then drops its schema and exits 0.
//!
//! Without `KAFKA_BROKERS` it starts librdkafka's mock cluster, a
//! Kafka-protocol broker inside this process, so no Kafka server is needed.
//!
//!     cargo run -p outbox-examples --features brokers --example postgres_kafka
//!
//! Environment: `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), `KAFKA_BROKERS` (for example
//! `localhost:9092`; default: the in-process mock cluster).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{CancellationToken, MessageId, Relay, Signal};
use outbox_kafka::{KafkaConfig, KafkaTransport};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers as _;
use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::mpsc;

mod common;

use common::{env_or, pg_connect, place_orders, receive, unique, BoxError};

/// A message as the consumer received it.
struct Arrived {
    id: Option<MessageId>,
    topic: String,
    key: String,
    payload: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postgres_kafka failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let db_url = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let run_id = unique();
    let schema = format!("example_kafka_{run_id}");
    // Kafka topic = this prefix + outbox topic.
    let prefix = format!("example-{run_id}.");
    let kafka_topic = format!("{prefix}orders.placed");

    println!("outbox example: PostgreSQL -> Kafka");
    let pool = pg_connect(&db_url).await?;
    println!("   outbox table {schema}.outbox_messages");

    // A real cluster from KAFKA_BROKERS, or the in-process mock cluster.
    let mut mock = None;
    let bootstrap = match std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(brokers) => {
            println!("   Kafka at {brokers} (KAFKA_BROKERS)");
            create_topic(&brokers, &kafka_topic).await?;
            brokers
        }
        None => {
            let cluster = MockCluster::new(1)?;
            cluster.create_topic(&kafka_topic, 1, 1)?;
            let brokers = cluster.bootstrap_servers();
            println!("   KAFKA_BROKERS is unset: using librdkafka's in-process mock cluster");
            println!("   (a Kafka-protocol broker inside this process, at {brokers})");
            mock = Some(cluster);
            brokers
        }
    };
    println!("   Kafka topic {kafka_topic}\n");

    let outcome = demo(&pool, &schema, &bootstrap, &prefix, &kafka_topic).await;

    // Clean up whatever happened.
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&pool)
        .await?;
    if mock.is_none() {
        admin(&bootstrap)?
            .delete_topics(&[kafka_topic.as_str()], &AdminOptions::new())
            .await?;
    }
    drop(mock);
    println!("   dropped schema {schema} and topic {kafka_topic}");
    outcome
}

async fn demo(
    pool: &PgPool,
    schema: &str,
    bootstrap: &str,
    prefix: &str,
    kafka_topic: &str,
) -> Result<(), BoxError> {
    // The outbox tables, and a business table beside them.
    let table = format!("{schema}.outbox_messages");
    let store = PgStore::with_config(pool.clone(), StoreConfig::default().table(&table)?);
    store.migrate().await?;
    sqlx::query(&format!(
        "CREATE TABLE {schema}.orders (id INT PRIMARY KEY, customer TEXT NOT NULL, total INT NOT NULL)"
    ))
    .execute(pool)
    .await?;

    // A consumer reading the topic's partition from the beginning.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{prefix}consumer"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition_offset(kafka_topic, 0, Offset::Beginning)?;
    consumer.assign(&partitions)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok(m) = consumer.recv().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let id = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == outbox_core::wire::ID_HEADER)
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            });
            let arrived = Arrived {
                id,
                topic: m.topic().to_string(),
                key: m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_else(|| "-".into()),
                payload: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            };
            if tx.send(arrived).is_err() {
                break;
            }
        }
    });

    // The transport: an idempotent producer, topic = prefix + outbox topic.
    let kafka =
        KafkaTransport::connect(KafkaConfig::builder(bootstrap).prefix(prefix).build()?).await?;

    // The relay, woken in-process when a transaction that enqueued commits.
    let signal = Signal::new();
    let outbox = Outbox::new().table(&table)?.signal(signal.clone());
    let relay = Relay::builder(Arc::new(store), Arc::new(kafka))
        .signal(signal)
        .poll_interval(Duration::from_millis(200))
        .build()?;
    let cancel = CancellationToken::new();
    let running = tokio::spawn({
        let cancel = cancel.clone();
        async move { relay.run(cancel).await }
    });

    println!("1. Business transactions, each writing its event in the same transaction");
    let (committed, rolled_back) = place_orders(pool, &outbox, schema).await?;

    println!("\n2. The relay publishes (acks=all); the consumer prints what arrived");
    let arrived = receive(&mut rx, committed.len(), Duration::from_secs(20)).await;
    for a in &arrived {
        println!("   {:<30} key {:<11} {}", a.topic, a.key, a.payload);
    }
    println!("   (Kafka key = message key: one key, one partition, in order;");
    println!("    the outbox id travels in the outbox-id header for deduplication)");

    cancel.cancel();
    let report = running.await?;
    let ids: Vec<MessageId> = arrived.iter().filter_map(|a| a.id).collect();
    let phantom = ids.contains(&rolled_back);
    println!("\n3. Summary");
    println!(
        "   relay published {}, consumer received {} of {} committed",
        report.published,
        ids.len(),
        committed.len()
    );
    println!(
        "   rolled-back order 2 published: {}",
        if phantom { "YES (bug!)" } else { "no" }
    );
    if phantom || !committed.iter().all(|id| ids.contains(id)) {
        return Err("not every committed message arrived exactly as expected".into());
    }
    Ok(())
}

fn admin(brokers: &str) -> Result<AdminClient<DefaultClientContext>, BoxError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?)
}

/// Creates `topic` (one partition) on a real cluster.
async fn create_topic(brokers: &str, topic: &str) -> Result<(), BoxError> {
    let results = admin(brokers)?
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| format!("cannot create topic {topic} on {brokers}: {e}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("cannot create topic {name}: {code}").into()),
        }
    }
    Ok(())
}
