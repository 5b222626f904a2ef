//! PostgreSQL -> NATS JetStream, end to end.
//!
//! Creates an outbox in a fresh schema on PostgreSQL, places orders in
//! transactions (order 2 rolls back), runs a relay that publishes to a
//! JetStream stream, and a JetStream consumer that prints what arrived. It
//! then drops its schema and stream and exits 0.
//!
//!     cargo run -p outbox-examples --features brokers --example postgres_nats
//!
//! Environment: `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), `NATS_URL` (default
//! `nats://127.0.0.1:4222`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use outbox_core::{CancellationToken, MessageId, Relay, Signal};
use outbox_nats::{NatsConfig, NatsTransport, StreamSpec};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};
use sqlx::PgPool;
use tokio::sync::mpsc;

mod common;

use common::{env_or, pg_connect, place_orders, receive, unique, BoxError};

/// A message as the consumer received it.
struct Arrived {
    id: Option<MessageId>,
    subject: String,
    key: String,
    payload: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postgres_nats failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let db_url = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let nats_url = env_or("NATS_URL", "nats://127.0.0.1:4222");
    let run_id = unique();
    let schema = format!("example_nats_{run_id}");
    let prefix = format!("example_{run_id}.");
    let stream = format!("EXAMPLE_{}", run_id.to_uppercase());

    println!("outbox example: PostgreSQL -> NATS JetStream");
    let pool = pg_connect(&db_url).await?;
    println!("   outbox table {schema}.outbox_messages");
    let nats = NatsTransport::connect(
        NatsConfig::builder(&nats_url)
            // Subjects are `example_<run>.<topic>`, captured by this run's stream.
            .subject_prefix(&prefix)
            .create_stream(StreamSpec::new(&stream, [format!("{prefix}>")]))
            .build()?,
    )
    .await
    .map_err(|e| {
        format!("cannot connect to NATS: {e} (start it with scripts/services.sh, or set NATS_URL)")
    })?;
    println!("   NATS stream {stream} (subjects {prefix}>)\n");

    let client = async_nats::connect(&nats_url).await?;
    let jetstream = async_nats::jetstream::new(client);
    let outcome = demo(&pool, &schema, nats, &jetstream, &stream).await;

    // Clean up whatever happened.
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&pool)
        .await?;
    jetstream.delete_stream(&stream).await?;
    println!("   dropped schema {schema} and stream {stream}");
    outcome
}

async fn demo(
    pool: &PgPool,
    schema: &str,
    nats: NatsTransport,
    jetstream: &async_nats::jetstream::Context,
    stream: &str,
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

    // A consumer on the stream: an ephemeral pull consumer from the start.
    let consumer = jetstream
        .get_stream(stream)
        .await?
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await?;
    let mut messages = consumer.messages().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            let arrived = Arrived {
                id: header("Nats-Msg-Id").and_then(|s| s.parse().ok()),
                subject: m.subject.to_string(),
                key: header(outbox_core::wire::KEY_HEADER).unwrap_or_else(|| "-".into()),
                payload: String::from_utf8_lossy(&m.payload).into_owned(),
            };
            let _ = m.ack().await;
            if tx.send(arrived).is_err() {
                break;
            }
        }
    });

    // The relay, woken in-process when a transaction that enqueued commits.
    let signal = Signal::new();
    let outbox = Outbox::new().table(&table)?.signal(signal.clone());
    let relay = Relay::builder(Arc::new(store), Arc::new(nats))
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

    println!("\n2. The relay publishes; the JetStream consumer prints what arrived");
    let arrived = receive(&mut rx, committed.len(), Duration::from_secs(15)).await;
    for a in &arrived {
        println!("   {:<28} key {:<11} {}", a.subject, a.key, a.payload);
    }
    println!(
        "   (each carries its outbox id as Nats-Msg-Id: the stream drops a re-published copy)"
    );

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
