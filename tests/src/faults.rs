//! Fault tooling: relay child processes, server stop/start with a guard
//! that always restarts, sizes from the environment, a batch producer, and
//! end-of-run readers of durable brokers.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_core::{Message, MessageId};

use crate::{Db, Produced};

/// A size from the environment (`FAULT_<NAME>`), or `default`. CI runs the
/// defaults; a soak sets larger numbers.
pub fn size(name: &str, default: usize) -> usize {
    std::env::var(format!("FAULT_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn services() -> String {
    format!("{}/../scripts/services.sh", env!("CARGO_MANIFEST_DIR"))
}

/// Stops a local server (`postgres`, `redis`, `rabbitmq`, `nats`).
pub fn stop(server: &str) {
    let ok = Command::new("bash")
        .arg(services())
        .args(["stop", server])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "could not stop {server}");
}

/// Starts a local server and waits until it accepts connections.
pub fn start(server: &str) {
    let ok = Command::new("bash")
        .arg(services())
        .args(["start", server])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "could not start {server}");
}

/// Restarts the server when dropped, so a failing test leaves it running.
pub struct Running(pub &'static str);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(services())
            .args(["start", self.0])
            .status();
    }
}

/// A relay child process (the `fault-relay` binary).
pub struct RelayProcess {
    child: Child,
}

impl RelayProcess {
    /// Starts the relay binary `bin` (a test passes
    /// `env!("CARGO_BIN_EXE_fault-relay")`) over `db`'s table, publishing to
    /// Redis Streams (or core NATS with `transport = "nats"`).
    pub fn spawn(
        bin: &str,
        db: &Db,
        name: &str,
        transport: &str,
        lease_ms: u64,
        batch: usize,
    ) -> Self {
        let child = Command::new(bin)
            .env("FAULT_TABLE", &db.table)
            .env("FAULT_NAME", name)
            .env("FAULT_TRANSPORT", transport)
            .env("FAULT_LEASE_MS", lease_ms.to_string())
            .env("FAULT_BATCH", batch.to_string())
            .env("OUTBOX_PG_URL", crate::pg_url())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn fault-relay");
        RelayProcess { child }
    }

    /// kill -9.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit (true when it exited 0).
    pub fn terminate(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        false
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The shape of a producer's load for [`produce_batches`].
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Committed messages to produce.
    pub total: usize,
    /// Keys, assigned round robin.
    pub keys: usize,
    /// Messages per transaction.
    pub per_tx: usize,
    /// Share of transactions rolled back.
    pub rollback: f64,
    /// Pause between transactions.
    pub pause: Duration,
    /// Random seed for rollbacks.
    pub seed: u64,
}

/// One producer committing `load.total` messages on `topic` in
/// transactions of `load.per_tx` (each with a business row). Enqueue order
/// is this producer's order.
pub async fn produce_batches(db: &Db, topic: &str, load: Load) -> Produced {
    let Load {
        total,
        keys,
        per_tx,
        rollback,
        pause,
        seed,
    } = load;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Produced::default();
    let mut n = 0;
    while out.committed.len() < total {
        let batch: Vec<Message> = (0..per_tx.min(total - out.committed.len()))
            .map(|_| {
                n += 1;
                Message::json(topic, &serde_json::json!({"n": n}))
                    .key(format!("key-{}", n % keys))
                    .build()
                    .expect("valid message")
            })
            .collect();
        let mut tx = db.pool.begin().await.expect("begin");
        sqlx::query(&format!(
            "INSERT INTO {}.orders (customer, total) VALUES ('batch', $1)",
            db.schema
        ))
        .bind(i32::try_from(batch.len()).unwrap_or(0))
        .execute(&mut *tx)
        .await
        .expect("business row");
        db.outbox
            .enqueue_batch(&mut *tx, &batch)
            .await
            .expect("enqueue");
        if rng.f64() < rollback {
            tx.rollback().await.expect("rollback");
            out.rolled_back.extend(batch.iter().map(|m| m.id));
        } else {
            tx.commit().await.expect("commit");
            out.committed.extend(
                batch
                    .iter()
                    .map(|m| (m.id, m.key.clone().unwrap_or_default())),
            );
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    out
}

/// Every message of a JetStream stream, in stream order.
pub async fn jetstream_ids(url: &str, stream: &str) -> Vec<MessageId> {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let mut s = js.get_stream(stream).await.expect("stream");
    let last = s.info().await.expect("stream info").state.last_sequence;
    let mut ids = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = s.get_raw_message(seq).await {
            let id = m
                .headers
                .get("Nats-Msg-Id")
                .and_then(|v| v.as_str().parse().ok());
            if let Some(id) = id {
                ids.push(id);
            }
        }
    }
    ids
}

/// Every message of a Redis stream, in stream order (XRANGE).
pub async fn redis_stream_ids(url: &str, key: &str) -> Vec<MessageId> {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let mut ids = Vec::new();
    let mut start = "-".to_string();
    loop {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(5_000)
            .query_async(&mut conn)
            .await
            .expect("XRANGE");
        let n = reply.ids.len();
        for e in &reply.ids {
            let id: Option<String> = e.get(outbox_redis::envelope::FIELD_ID);
            if let Some(id) = id.and_then(|s| s.parse().ok()) {
                ids.push(id);
            }
        }
        match reply.ids.last() {
            Some(last) if n == 5_000 => start = format!("({}", last.id),
            _ => return ids,
        }
    }
}

/// Drains a RabbitMQ queue with basic.get (acking), in queue order.
pub async fn amqp_drain(url: &str, queue: &str) -> Vec<MessageId> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    let mut ids = Vec::new();
    while let Ok(Some(m)) = ch.basic_get(queue.into(), BasicGetOptions::default()).await {
        if let Some(id) = m
            .properties
            .message_id()
            .as_ref()
            .and_then(|s| s.as_str().parse().ok())
        {
            ids.push(id);
        }
        let _ = m.ack(BasicAckOptions::default()).await;
    }
    ids
}
