//! Helpers shared by the integration tests: unique names, queues bound to
//! the test's exchange, a probe, a server guard.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use outbox_core::testing::{Probe, Received};
use outbox_core::wire::KEY_HEADER;
use outbox_core::Headers;

pub const AMQP_ADDR: &str = "127.0.0.1:5672";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A random lowercase suffix for exchange, queue and topic names.
pub fn unique() -> String {
    (0..10).map(|_| fastrand::lowercase()).collect()
}

pub async fn channel() -> (Connection, Channel) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Declares `queue` (durable or not, with `args`) and binds it to `exchange`
/// with `routing_key`.
pub async fn bind_queue(
    ch: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
    durable: bool,
    args: FieldTable,
) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable,
            auto_delete: !durable,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        routing_key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Converts a delivery into what the conformance suite compares: the id from
/// `message_id`, headers from the field table (strings back to `String`).
pub fn received(d: &Delivery) -> Received {
    let mut headers = Headers::new();
    if let Some(table) = d.properties.headers() {
        for (name, value) in table.inner() {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                other => format!("{other:?}"),
            };
            headers.insert(name.as_str().to_string(), text);
        }
    }
    Received {
        id: d
            .properties
            .message_id()
            .as_ref()
            .and_then(|s| s.as_str().parse().ok()),
        key: headers.get(KEY_HEADER).cloned(),
        headers,
        payload: bytes::Bytes::from(d.data.clone()),
    }
}

/// Takes everything from `queue` with basic.get until it stays empty for
/// `quiet`.
pub async fn drain(ch: &Channel, queue: &str, quiet: Duration) -> Vec<Delivery> {
    let mut out = Vec::new();
    let mut empty_since = Instant::now();
    loop {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => {
                out.push(m.delivery);
                empty_since = Instant::now();
            }
            None if empty_since.elapsed() >= quiet => return out,
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A consumer on a queue bound to the case's routing key.
pub struct QueueProbe {
    got: Arc<Mutex<Vec<Received>>>,
    _conn: Connection,
}

impl QueueProbe {
    pub async fn bind(exchange: &str, routing_key: &str) -> Self {
        let (conn, ch) = channel().await;
        let queue = format!("probe-{}", unique());
        bind_queue(
            &ch,
            &queue,
            exchange,
            routing_key,
            false,
            FieldTable::default(),
        )
        .await;
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "probe".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        tokio::spawn(async move {
            let _ch = ch;
            while let Some(Ok(d)) = consumer.next().await {
                sink.lock().unwrap().push(received(&d));
            }
        });
        QueueProbe { got, _conn: conn }
    }
}

#[async_trait]
impl Probe for QueueProbe {
    async fn received(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.got.lock().unwrap().clone();
            if got.len() >= count || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Deletes exchanges and queues on drop (best effort).
#[derive(Default)]
pub struct Cleanup {
    pub exchanges: Vec<String>,
    pub queues: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let exchanges = std::mem::take(&mut self.exchanges);
        let queues = std::mem::take(&mut self.queues);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(Ok(conn)) = tokio::time::timeout(
                    Duration::from_secs(3),
                    Connection::connect(AMQP_URL, ConnectionProperties::default()),
                )
                .await
                else {
                    return;
                };
                for q in queues {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for e in exchanges {
                    if let Ok(ch) = conn.create_channel().await {
                        let _ = ch
                            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "OK".into()).await;
            });
        })
        .join();
    }
}

/// Runs `scripts/services.sh ACTION NAME`.
pub fn services(action: &str, name: &str) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services.sh");
    std::process::Command::new(script)
        .args([action, name])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Starts the server again when dropped, so a failing test never leaves it
/// stopped.
pub struct RestartGuard(pub &'static str);

impl Drop for RestartGuard {
    fn drop(&mut self) {
        if !services("start", self.0) {
            eprintln!("could not start {} again: run scripts/services.sh", self.0);
        }
    }
}
