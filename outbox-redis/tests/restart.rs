//! Redis is stopped and started again while messages are being published.
//!
//! What "none lost" means here: this Redis keeps nothing on disk (no RDB, no
//! AOF), so a restart empties it, and an entry that Redis acknowledged but
//! nobody read before the restart is gone with it. That is Redis's
//! durability setting, not something a transport can change. What the
//! transport must guarantee is that it never reports a message as published
//! unless Redis appended it, and that it recovers by itself. So:
//!
//! - a consumer reads the stream continuously (XREAD, reconnecting and
//!   starting over from the beginning of the new, empty stream after the
//!   restart) and records every message id it sees;
//! - the publisher behaves like a relay: failed messages (which must be
//!   transient) are published again until every one is acknowledged;
//! - the publisher is paused just before the stop until the consumer has
//!   read everything acknowledged so far, then resumes into the outage;
//! - at the end every message must have been acknowledged and every
//!   acknowledged id must have been seen by the consumer.
//!
//! The transport runs with dedup on, so the test also shows that the dedup
//! script, which a restart removes from Redis's script cache, is loaded
//! again. Redis is restarted by a guard even when the test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{message, redis_up, transport, unique_prefix, URL};
use outbox_core::{Message, MessageId, Transport};
use redis::streams::StreamReadReply;

fn services(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
    let status = Command::new("bash")
        .arg(script)
        .arg(action)
        .arg("redis")
        .status()
        .unwrap();
    assert!(status.success(), "services.sh {action} redis failed");
}

/// Starts Redis again when dropped, whatever happened to the test.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
        let _ = Command::new("bash")
            .arg(script)
            .arg("start")
            .arg("redis")
            .status();
    }
}

/// Reads `stream` with XREAD until `stop`, recording message ids.
async fn consume(stream: String, seen: Arc<Mutex<HashSet<MessageId>>>, stop: Arc<AtomicUsize>) {
    let client = redis::Client::open(URL).unwrap();
    let mut con = None;
    let mut last = "0".to_string();
    while stop.load(Ordering::SeqCst) == 0 {
        let c = match con.as_mut() {
            Some(c) => c,
            None => match client.get_multiplexed_async_connection().await {
                Ok(c) => con.insert(c),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let reply: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(500)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(&stream)
            .arg(&last)
            .query_async(c)
            .await;
        match reply {
            Ok(reply) => {
                for key in reply.map(|r| r.keys).unwrap_or_default() {
                    for entry in key.ids {
                        seen.lock().unwrap().insert(common::envelope(&entry).id);
                        last = entry.id;
                    }
                }
            }
            Err(_) => {
                // Redis went away: reconnect, and read the (new, empty)
                // stream from its start.
                con = None;
                last = "0".to_string();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn wait_for(what: &str, deadline: Duration, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_run_loses_nothing_acknowledged() {
    if !redis_up() {
        return;
    }
    let _guard = RestartGuard;
    let prefix = unique_prefix("restart");
    let stream = format!("{prefix}events");
    let redis = Arc::new(
        transport(|b| {
            b.prefix(prefix.as_str())
                .dedup_window(Duration::from_secs(60))
                .response_timeout(Duration::from_secs(1))
                .connect_timeout(Duration::from_millis(500))
        })
        .await,
    );

    let seen = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(AtomicUsize::new(0));
    let consumer = tokio::spawn(consume(stream.clone(), seen.clone(), stop.clone()));

    let total = 2000;
    let all: Vec<Message> = (0..total).map(|i| message("events", i)).collect();
    let acked = Arc::new(Mutex::new(Vec::<MessageId>::new()));
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let publisher = {
        let (redis, all, acked, gate) = (redis.clone(), all.clone(), acked.clone(), gate.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            let start = Instant::now();
            for batch in all.chunks(20) {
                let _open = gate.lock().await;
                let mut pending: Vec<Message> = batch.to_vec();
                while !pending.is_empty() {
                    assert!(start.elapsed() < Duration::from_secs(90), "no recovery");
                    let results = redis.publish_batch(&pending).await;
                    let mut retry = Vec::new();
                    for (m, r) in pending.into_iter().zip(results) {
                        match r {
                            Ok(()) => acked.lock().unwrap().push(m.id),
                            Err(e) => {
                                assert!(e.is_transient(), "only transient failures: {e}");
                                errors.push(e);
                                retry.push(m);
                            }
                        }
                    }
                    if !retry.is_empty() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    pending = retry;
                }
                drop(_open);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            errors
        })
    };

    let all_acked_seen = || {
        let acked = acked.lock().unwrap().clone();
        let seen = seen.lock().unwrap();
        acked.iter().all(|id| seen.contains(id))
    };

    wait_for("500 acknowledgements", Duration::from_secs(30), || {
        acked.lock().unwrap().len() >= 500
    })
    .await;
    let paused = gate.lock().await;
    wait_for(
        "the consumer to catch up",
        Duration::from_secs(10),
        &all_acked_seen,
    )
    .await;
    let before = acked.lock().unwrap().len();
    services("stop");
    println!("redis stopped after {before} acknowledged messages");
    drop(paused);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    services("start");
    println!("redis started again");

    let errors = publisher.await.unwrap();
    wait_for(
        "the consumer to see everything",
        Duration::from_secs(20),
        &all_acked_seen,
    )
    .await;
    stop.store(1, Ordering::SeqCst);
    consumer.await.unwrap();

    let acked = acked.lock().unwrap().clone();
    let unique: HashSet<_> = acked.iter().copied().collect();
    assert_eq!(unique.len(), total, "every message acknowledged");
    assert_eq!(acked.len(), total, "none acknowledged twice");
    assert!(
        !errors.is_empty(),
        "publishing during the outage failed (transiently)"
    );
    let seen = seen.lock().unwrap();
    assert!(
        all.iter().all(|m| seen.contains(&m.id)),
        "every acknowledged message was read"
    );
    println!(
        "{total} acknowledged and read; {} transient failures during the outage (e.g. {})",
        errors.len(),
        errors[0]
    );
}
