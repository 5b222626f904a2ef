//! Writing your own adapter: an append-only JSON-lines file as the "broker".
//!
//! The first half is a complete third-party-style transport (configuration,
//! the `Transport` impl, error mapping, and a reader), the kind of code an
//! `outbox-file` crate would hold. The program runs the core conformance
//! suite (`outbox_core::testing::transport_conformance`) against it, with a
//! `Probe` that reads the file back, then relays a few orders from SQLite
//! through it, as the quickstart does. No server needed.
//!
//!     cargo run -p outbox-examples --example custom_transport

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::testing::{transport_conformance, Probe, Received, TransportCase};
use outbox_core::{
    CancellationToken, Error, ErrorKind, Headers, Message, MessageId, PublishResult, Relay, Signal,
    Transport,
};
use outbox_sqlx::sqlite::{connect, SqliteStore};
use outbox_sqlx::Outbox;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// The adapter.

/// Configuration: the file, and the topic prefixes it accepts (as a stream
/// captures subjects); a message for any other topic is unroutable.
#[derive(Clone, Debug)]
pub struct FileSinkConfig {
    /// The file messages are appended to.
    pub path: PathBuf,
    /// Accepted topic prefixes.
    pub accept: Vec<String>,
}

/// One line of the file: the message id (for dedup), topic, key, headers and
/// the payload bytes in hex.
#[derive(Serialize, Deserialize)]
pub struct Line {
    id: MessageId,
    topic: String,
    key: Option<String>,
    headers: Headers,
    payload: String,
}

/// The transport. "Acknowledged" means written and flushed to disk (fsync).
pub struct FileSink {
    config: FileSinkConfig,
    file: Arc<Mutex<File>>,
}

impl FileSink {
    /// Opens (or creates) the file for appending.
    pub fn open(config: FileSinkConfig) -> outbox_core::Result<Self> {
        let mut options = OpenOptions::new();
        let file = options.create(true).append(true).open(&config.path);
        let file = file.map_err(|e| io_error("open", e))?;
        let file = Arc::new(Mutex::new(file));
        Ok(FileSink { config, file })
    }

    fn encode(&self, m: &Message) -> outbox_core::Result<String> {
        if !self.config.accept.iter().any(|p| m.topic.starts_with(p)) {
            let reason = format!("no sink accepts topic {}", m.topic);
            return Err(Error::permanent(ErrorKind::Unroutable, reason).with_backend("file"));
        }
        let line = Line {
            id: m.id,
            topic: m.topic.clone(),
            key: m.key.clone(),
            headers: m.headers.clone(),
            payload: m.payload.iter().map(|b| format!("{b:02x}")).collect(),
        };
        let json = serde_json::to_string(&line).map_err(|e| {
            Error::permanent(ErrorKind::InvalidInput, e.to_string()).with_backend("file")
        })?;
        Ok(json + "\n")
    }
}

/// Maps I/O errors: permission problems are permanent (dead-letter), anything
/// else (disk full, I/O errors) is transient (retry with backoff).
fn io_error(operation: &'static str, e: io::Error) -> Error {
    let error = match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            Error::permanent(ErrorKind::Unauthorized, e.to_string())
        }
        _ => Error::transient(ErrorKind::Other, e.to_string()),
    };
    error
        .with_backend("file")
        .with_operation(operation)
        .with_source(e)
}

#[async_trait]
impl Transport for FileSink {
    fn name(&self) -> &str {
        "file"
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        let encoded: Vec<_> = messages.iter().map(|m| self.encode(m)).collect();
        let batch: String = encoded.iter().flatten().map(String::as_str).collect();
        // One write and one fsync per batch: a file's form of pipelining.
        let file = self.file.clone();
        let written = match batch.is_empty() {
            true => Ok(()),
            false => tokio::task::spawn_blocking(move || {
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                file.write_all(batch.as_bytes())?;
                file.sync_data()
            })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string()))),
        };
        let failed = |e: &io::Error| io_error("publish", io::Error::new(e.kind(), e.to_string()));
        encoded
            .into_iter()
            .map(|r| r.and_then(|_| written.as_ref().map_err(failed).copied()))
            .collect()
    }
}

/// Reads the file back, skipping lines it cannot parse (a write torn by a
/// crash; the relay publishes that message again).
pub fn read_lines(path: &Path) -> Vec<Line> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

/// The conformance suite's subscriber: what the file holds for one topic.
struct FileProbe {
    path: PathBuf,
    topic: String,
}

#[async_trait]
impl Probe for FileProbe {
    async fn received(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = read_lines(&self.path)
                .into_iter()
                .filter(|l| l.topic == self.topic);
            let got: Vec<Received> = lines.map(received).collect();
            if got.len() >= count || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The payload bytes of a line (hex pairs that do not parse are skipped).
fn payload(line: &Line) -> Vec<u8> {
    let pairs = line.payload.as_bytes().chunks(2).map(std::str::from_utf8);
    let bytes = pairs.filter_map(|p| u8::from_str_radix(p.ok()?, 16).ok());
    bytes.collect()
}

fn received(line: Line) -> Received {
    let payload = payload(&line).into();
    let (id, key, headers) = (Some(line.id), line.key, line.headers);
    Received {
        id,
        key,
        headers,
        payload,
    }
}

// ---------------------------------------------------------------------------
// The program: the conformance suite, then a relay from SQLite through it.

#[tokio::main]
async fn main() -> ExitCode {
    let dir = std::env::temp_dir().join(format!("outbox-custom-transport-{}", std::process::id()));
    let outcome = run(&dir).await;
    std::fs::remove_dir_all(&dir).ok();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("custom_transport failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    println!("custom transport: an append-only JSON-lines file as the broker");
    println!("   files in {}\n", dir.display());

    println!("1. The core conformance suite against the file sink");
    let path = dir.join("conformance.jsonl");
    let config = FileSinkConfig {
        path: path.clone(),
        accept: vec!["conformance.".into()],
    };
    let sink = FileSink::open(config)?;
    let probe = FileProbe {
        path,
        topic: "conformance.events".into(),
    };
    let case = TransportCase::new("conformance.events").rejected_topic("elsewhere.events");
    // The suite panics on the first failure; run it in a task to report that.
    tokio::spawn(async move { transport_conformance(&sink, &probe, &case).await })
        .await
        .map_err(|_| "the transport conformance suite failed (see the message above)")?;
    println!("   transport conformance: passed\n");

    println!("2. A relay from SQLite through the file sink");
    let events = dir.join("events.jsonl");
    let config = FileSinkConfig {
        path: events.clone(),
        accept: vec!["orders.".into()],
    };
    let sink = FileSink::open(config)?;
    let pool = connect(dir.join("app.db")).await?;
    let store = SqliteStore::new(pool.clone());
    store.migrate().await?;
    let signal = Signal::new();
    let outbox = Outbox::new().signal(signal.clone());
    let relay = Relay::builder(Arc::new(store), Arc::new(sink))
        .signal(signal)
        .poll_interval(Duration::from_millis(50))
        .build()?;
    let cancel = CancellationToken::new();
    let running = tokio::spawn({
        let cancel = cancel.clone();
        async move { relay.run(cancel).await }
    });
    let mut rolled_back = None;
    for (order, commit) in [(1, true), (2, false), (3, true)] {
        let mut tx = pool.begin().await?;
        let event = Message::json("orders.placed", &serde_json::json!({ "order": order }))
            .key(format!("order-{order}"))
            .header("content-type", "application/json")
            .build()?;
        outbox.enqueue(&mut *tx, &event).await?;
        if commit {
            tx.commit().await?;
            outbox.committed();
            println!("   order {order} committed");
        } else {
            tx.rollback().await?;
            rolled_back = Some(event.id);
            println!("   order {order} rolled back");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_lines(&events).len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    cancel.cancel();
    let report = running.await?;

    let lines = read_lines(&events);
    println!("   events.jsonl holds one JSON object per line:");
    for l in &lines {
        let key = l.key.as_deref().unwrap_or("-");
        let payload = String::from_utf8_lossy(&payload(l)).into_owned();
        println!("   {} key {key} payload {payload}", l.topic);
    }
    let phantom = lines.iter().any(|l| Some(l.id) == rolled_back);
    println!("\n3. Summary");
    println!(
        "   relay published {}, the file holds {} lines",
        report.published,
        lines.len()
    );
    println!(
        "   rolled-back order 2 published: {}",
        if phantom { "YES (bug!)" } else { "no" }
    );
    if phantom || lines.len() != 2 {
        return Err("unexpected outcome".into());
    }
    Ok(())
}
