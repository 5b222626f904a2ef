//! PostgreSQL -> Redis Streams, end to end.
//!
//! Creates an outbox in a fresh schema on PostgreSQL, places orders in
//! transactions (order 2 rolls back), runs a relay that appends to a Redis
//! stream (XADD), and a consumer (XREAD) that prints what arrived. It then
//! drops its schema and stream and exits 0.
//!
//!     cargo run -p outbox-examples --features brokers --example postgres_redis
//!
//! Environment: `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), `REDIS_URL` (default
//! `redis://127.0.0.1:6379`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{CancellationToken, MessageId, Relay, Signal};
use outbox_redis::{Envelope, RedisConfig, RedisTransport};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};
use redis::streams::StreamReadReply;
use sqlx::PgPool;
use tokio::sync::mpsc;

mod common;

use common::{env_or, pg_connect, place_orders, receive, unique, BoxError};

/// A message as the consumer received it.
struct Arrived {
    id: Option<MessageId>,
    entry: String,
    key: String,
    payload: String,
}

/// How long an XREAD blocks: well under redis-rs's 500 ms response timeout,
/// which a reply blocked for the same 500 ms sometimes missed.
const BLOCK_MS: u64 = 200;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postgres_redis failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let db_url = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test");
    let redis_url = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let run_id = unique();
    let schema = format!("example_redis_{run_id}");
    // Stream key = this prefix + outbox topic.
    let prefix = format!("example:{run_id}:");
    let stream = format!("{prefix}orders.placed");

    println!("outbox example: PostgreSQL -> Redis Streams");
    let pool = pg_connect(&db_url).await?;
    println!("   outbox table {schema}.outbox_messages");
    println!(
        "   Redis at {}, stream {stream}\n",
        outbox_redis::redact_url(&redis_url)
    );
    let client = redis::Client::open(redis_url.as_str())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect to Redis: {e} (start it with scripts/services.sh, or set REDIS_URL)"))?;

    let outcome = demo(&pool, &schema, &client, &redis_url, &prefix, &stream).await;

    // Clean up whatever happened.
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&pool)
        .await?;
    redis::cmd("DEL")
        .arg(&stream)
        .query_async::<()>(&mut conn)
        .await?;
    println!("   dropped schema {schema} and stream {stream}");
    outcome
}

async fn demo(
    pool: &PgPool,
    schema: &str,
    client: &redis::Client,
    redis_url: &str,
    prefix: &str,
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

    // A consumer reading the stream from its start (XREAD, blocking).
    let mut reader = client.get_multiplexed_async_connection().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let key = stream.to_string();
    tokio::spawn(async move {
        let mut last = "0-0".to_string();
        loop {
            let reply: redis::RedisResult<StreamReadReply> = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(&key)
                .arg(&last)
                .query_async(&mut reader)
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
            for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
                last = entry.id.clone();
                let fields = entry.map.iter().filter_map(|(name, value)| match value {
                    redis::Value::BulkString(bytes) => Some((name.as_str(), bytes.as_slice())),
                    _ => None,
                });
                let arrived = match Envelope::from_stream_fields(fields) {
                    Ok(e) => Arrived {
                        id: Some(e.id),
                        entry: entry.id.clone(),
                        key: e.key.unwrap_or_else(|| "-".into()),
                        payload: String::from_utf8_lossy(&e.payload).into_owned(),
                    },
                    Err(e) => Arrived {
                        id: None,
                        entry: entry.id.clone(),
                        key: "-".into(),
                        payload: format!("(not an outbox entry: {e})"),
                    },
                };
                if tx.send(arrived).is_err() {
                    return;
                }
            }
        }
    });

    // The transport: XADD to prefix + topic.
    let redis =
        RedisTransport::connect(RedisConfig::builder(redis_url).prefix(prefix).build()?).await?;

    // The relay, woken in-process when a transaction that enqueued commits.
    let signal = Signal::new();
    let outbox = Outbox::new().table(&table)?.signal(signal.clone());
    let relay = Relay::builder(Arc::new(store), Arc::new(redis))
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

    println!("\n2. The relay appends (XADD); the consumer prints what arrived");
    let arrived = receive(&mut rx, committed.len(), Duration::from_secs(15)).await;
    for a in &arrived {
        println!("   entry {:<16} key {:<11} {}", a.entry, a.key, a.payload);
    }
    println!("   (each entry carries the outbox id in its `id` field: deduplicate on it)");

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
