//! Helpers shared by the Redis tests: unique key prefixes, readers that act
//! as probes, and cleanup.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use outbox_core::testing::{Probe, Received};
use outbox_core::Message;
use outbox_redis::{Envelope, RedisConfig, RedisConfigBuilder, RedisTransport};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamRangeReply};
use redis::Value;

pub const ADDR: &str = "127.0.0.1:6379";
pub const URL: &str = "redis://127.0.0.1:6379";

/// Whether Redis is there (fails instead when OUTBOX_REQUIRE_SERVICES=1).
pub fn redis_up() -> bool {
    outbox_core::testing::require_service("redis", ADDR)
}

/// A key prefix no other test uses.
pub fn unique_prefix(name: &str) -> String {
    format!("outbox-test:{name}:{}:", uuid::Uuid::now_v7().simple())
}

pub async fn transport(
    configure: impl FnOnce(RedisConfigBuilder) -> RedisConfigBuilder,
) -> RedisTransport {
    RedisTransport::connect(configure(RedisConfig::builder(URL)).build().unwrap())
        .await
        .unwrap()
}

pub async fn connection() -> MultiplexedConnection {
    redis::Client::open(URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Deletes every key under `prefix`.
pub async fn cleanup(prefix: &str) {
    let mut con = connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut con)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut con)
            .await
            .unwrap();
    }
}

/// A stream entry turned back into a message.
pub fn envelope(entry: &StreamId) -> Envelope {
    let fields = entry.map.iter().filter_map(|(name, value)| match value {
        Value::BulkString(bytes) => Some((name.as_str(), bytes.as_slice())),
        _ => None,
    });
    Envelope::from_stream_fields(fields).unwrap()
}

pub fn received(e: Envelope) -> Received {
    Received {
        id: Some(e.id),
        key: e.key,
        headers: e.headers,
        payload: e.payload,
    }
}

pub async fn xrange(con: &mut MultiplexedConnection, stream: &str) -> Vec<StreamId> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(con)
        .await
        .unwrap();
    reply.ids
}

/// Reads a stream with XRANGE until enough entries are there.
pub struct StreamProbe {
    pub stream: String,
}

#[async_trait]
impl Probe for StreamProbe {
    async fn received(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let mut con = connection().await;
        let start = Instant::now();
        loop {
            let entries = xrange(&mut con, &self.stream).await;
            if entries.len() >= count || start.elapsed() >= timeout {
                return entries.iter().map(|e| received(envelope(e))).collect();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A live Pub/Sub subscriber recording every message on one channel.
pub struct PubSubProbe {
    got: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PubSubProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PubSubProbe {
    /// Subscribes (and waits for the confirmation) before returning.
    pub async fn subscribe(channel: &str) -> Self {
        let mut pubsub = redis::Client::open(URL)
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        pubsub.subscribe(channel).await.unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let task = tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(m) = messages.next().await {
                let e = Envelope::from_pubsub(m.get_payload_bytes()).unwrap();
                sink.lock().unwrap().push(received(e));
            }
        });
        PubSubProbe { got, task }
    }
}

#[async_trait]
impl Probe for PubSubProbe {
    async fn received(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let got = self.got.lock().unwrap().clone();
            if got.len() >= count || start.elapsed() >= timeout {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn message(topic: &str, i: usize) -> Message {
    Message::builder(topic, format!("payload {i}"))
        .header("x-index", i.to_string())
        .build()
        .unwrap()
}
