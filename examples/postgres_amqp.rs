//! PostgreSQL -> RabbitMQ, end to end.
//!
//! Creates an outbox in a fresh schema on PostgreSQL, places orders in
//! transactions (order 2 rolls back), runs a relay that publishes to a
//! RabbitMQ topic exchange with publisher confirms, and a consumer on a queue
//! bound to `orders.#` that prints what arrived. It then drops its schema and
//! exchange and exits 0.
//!
//!     cargo run -p outbox-examples --features brokers --example postgres_amqp
//!
//! Environment: `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use outbox_amqp::{AmqpConfig, AmqpTransport};
use outbox_core::{CancellationToken, MessageId, Relay, Signal};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};
use sqlx::PgPool;
use tokio::sync::mpsc;

mod common;

use common::{env_or, pg_connect, place_orders, receive, unique, BoxError};

/// A message as the consumer received it.
struct Arrived {
    id: Option<MessageId>,
    routing_key: String,
    key: String,
    payload: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postgres_amqp failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let db_url = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let amqp_url = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let run_id = unique();
    let schema = format!("example_amqp_{run_id}");
    let exchange = format!("example-{run_id}");

    println!("outbox example: PostgreSQL -> RabbitMQ");
    let pool = pg_connect(&db_url).await?;
    println!("   outbox table {schema}.outbox_messages");
    println!("   RabbitMQ at {}", outbox_amqp::redact_url(&amqp_url));
    let conn = Connection::connect(&amqp_url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("cannot connect to RabbitMQ: {e} (start it with scripts/services.sh, or set AMQP_URL)"))?;
    let channel = conn.create_channel().await?;
    let outcome = demo(&pool, &schema, &channel, &exchange, &amqp_url).await;

    // Clean up whatever happened.
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&pool)
        .await?;
    channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    conn.close(200, "done".into()).await?;
    println!("   dropped schema {schema} and exchange {exchange}");
    outcome
}

async fn demo(
    pool: &PgPool,
    schema: &str,
    channel: &lapin::Channel,
    exchange: &str,
    amqp_url: &str,
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

    // A consumer: the exchange (declared as the transport declares it), a
    // queue of this connection's own bound to `orders.#`.
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            "orders.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut deliveries = channel
        .basic_consume(
            queue.name().clone(),
            "postgres_amqp".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(d)) = deliveries.next().await {
            let key = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(outbox_core::wire::KEY_HEADER))
                .and_then(|v| match v {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                });
            let arrived = Arrived {
                id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .and_then(|s| s.as_str().parse().ok()),
                routing_key: d.routing_key.as_str().to_string(),
                key: key.unwrap_or_else(|| "-".into()),
                payload: String::from_utf8_lossy(&d.data).into_owned(),
            };
            let _ = d.ack(BasicAckOptions::default()).await;
            if tx.send(arrived).is_err() {
                break;
            }
        }
    });

    // The transport publishes to this run's exchange, routing key = topic.
    let rabbit =
        AmqpTransport::connect(AmqpConfig::builder(amqp_url).exchange(exchange).build()?).await?;
    println!("   exchange {exchange}, a queue bound to orders.#\n");

    // The relay, woken in-process when a transaction that enqueued commits.
    let signal = Signal::new();
    let outbox = Outbox::new().table(&table)?.signal(signal.clone());
    let relay = Relay::builder(Arc::new(store), Arc::new(rabbit))
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

    println!("\n2. The relay publishes (with confirms); the consumer prints what arrived");
    let arrived = receive(&mut rx, committed.len(), Duration::from_secs(15)).await;
    for a in &arrived {
        println!(
            "   routing key {:<14} key {:<11} {}",
            a.routing_key, a.key, a.payload
        );
    }
    println!("   (each carries its outbox id as message_id: deduplicate on it)");

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
