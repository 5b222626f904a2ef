//! Helpers shared by the integration tests: unique names, a server guard,
//! probes reading what NATS received.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use outbox_core::testing::{Probe, Received};
use outbox_core::wire::KEY_HEADER;
use outbox_core::Headers;

pub const NATS_ADDR: &str = "127.0.0.1:4222";
pub const NATS_URL: &str = "nats://127.0.0.1:4222";

/// A random lowercase suffix for stream, subject and topic names.
pub fn unique() -> String {
    (0..10).map(|_| fastrand::lowercase()).collect()
}

pub async fn jetstream() -> jetstream::Context {
    jetstream::new(async_nats::connect(NATS_URL).await.unwrap())
}

/// Creates a stream `name` capturing `subjects`.
pub async fn create_stream(js: &jetstream::Context, name: &str, subjects: &[&str]) {
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Deletes a stream on drop (best effort), so reruns do not pile streams up.
pub struct StreamCleanup(pub String);

impl Drop for StreamCleanup {
    fn drop(&mut self) {
        let name = self.0.clone();
        // A fresh runtime on a fresh thread: drop may run inside the test's.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(2), async_nats::connect(NATS_URL))
                        .await
                {
                    let _ = jetstream::new(client).delete_stream(&name).await;
                }
            });
        })
        .join();
    }
}

/// Converts a NATS message into what the conformance suite compares.
pub fn received(headers: Option<&async_nats::HeaderMap>, payload: &bytes::Bytes) -> Received {
    let mut map = Headers::new();
    if let Some(h) = headers {
        for (name, values) in h.iter() {
            if let Some(v) = values.last() {
                map.insert(name.to_string(), v.as_str().to_string());
            }
        }
    }
    let id = map
        .get("Nats-Msg-Id")
        .or_else(|| map.get(outbox_core::wire::ID_HEADER))
        .and_then(|v| v.parse().ok());
    Received {
        id,
        key: map.get(KEY_HEADER).cloned(),
        headers: map,
        payload: payload.clone(),
    }
}

/// Everything the stream holds on `filter` now, in stream order.
pub async fn read_stream(js: &jetstream::Context, stream: &str, filter: &str) -> Vec<Received> {
    let mut s = js.get_stream(stream).await.unwrap();
    let total = s.info().await.unwrap().state.messages;
    if total == 0 {
        return Vec::new();
    }
    let consumer = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(next)) = tokio::time::timeout(Duration::from_secs(3), messages.next()).await {
        let m = next.unwrap();
        out.push(received(m.headers.as_ref(), &m.payload));
        if m.info().map(|i| i.pending == 0).unwrap_or(true) {
            break;
        }
    }
    out
}

/// Reads the stream (a JetStream consumer) on the case's subject.
pub struct StreamProbe {
    pub js: jetstream::Context,
    pub stream: String,
    pub subject: String,
}

#[async_trait]
impl Probe for StreamProbe {
    async fn received(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = read_stream(&self.js, &self.stream, &self.subject).await;
            if got.len() >= count || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A core NATS subscription collecting everything on a subject.
pub struct SubscriptionProbe {
    got: Arc<Mutex<Vec<Received>>>,
}

impl SubscriptionProbe {
    pub async fn subscribe(subject: &str) -> Self {
        let client = async_nats::connect(NATS_URL).await.unwrap();
        let mut sub = client.subscribe(subject.to_string()).await.unwrap();
        client.flush().await.unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        tokio::spawn(async move {
            let _client = client;
            while let Some(m) = sub.next().await {
                sink.lock()
                    .unwrap()
                    .push(received(m.headers.as_ref(), &m.payload));
            }
        });
        SubscriptionProbe { got }
    }
}

#[async_trait]
impl Probe for SubscriptionProbe {
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
