//! The quickstart: the outbox pattern end to end on an embedded default,
//! no server needed (SQLite in a temporary directory, an in-process broker).
//!
//! It places orders in transactions (one rolls back), runs a relay, shows a
//! transient broker failure retried with backoff and a poison message
//! dead-lettered, fixed and requeued, and exits 0 within seconds.
//!
//!     cargo run -p outbox-examples --example quickstart

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{
    CancellationToken, DeadLetters, Error, ErrorKind, Message, PublishResult, Relay, RetryPolicy,
    Selector, Signal, Transport,
};
use outbox_sqlx::sqlite::{connect, SqliteStore};
use outbox_sqlx::Outbox;

/// An in-process "broker": it prints what it receives, refuses
/// `payments.captured` twice (a transient outage) and `audit.poison` until it
/// is fixed (a permanent rejection).
#[derive(Clone)]
struct Broker {
    state: Arc<Mutex<BrokerState>>,
    started: Instant,
}

#[derive(Default)]
struct BrokerState {
    received: Vec<Message>,
    refusals: BTreeMap<String, u32>,
    poison_fixed: bool,
}

#[async_trait]
impl Transport for Broker {
    fn name(&self) -> &str {
        "in-process"
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        messages
            .iter()
            .map(|m| {
                let refused = s.refusals.entry(m.id.to_string()).or_default();
                if m.topic == "payments.captured" && *refused < 2 {
                    *refused += 1;
                    println!(
                        "   [broker +{:>4} ms] {} refused for now (attempt {}): retried with backoff",
                        self.started.elapsed().as_millis(),
                        m.topic,
                        refused
                    );
                    return Err(Error::transient(ErrorKind::Connection, "broker busy"));
                }
                if m.topic == "audit.poison" && !s.poison_fixed {
                    println!(
                        "   [broker +{:>4} ms] {} rejected for good: dead-lettered",
                        self.started.elapsed().as_millis(),
                        m.topic
                    );
                    return Err(Error::permanent(ErrorKind::Rejected, "schema mismatch"));
                }
                println!(
                    "   [broker +{:>4} ms] received {:<18} key={:<12} {}",
                    self.started.elapsed().as_millis(),
                    m.topic,
                    m.key.as_deref().unwrap_or("-"),
                    String::from_utf8_lossy(&m.payload)
                );
                s.received.push(m.clone());
                Ok(())
            })
            .collect()
    }
}

impl Broker {
    fn received(&self) -> Vec<Message> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .received
            .clone()
    }
    fn fix_poison(&self) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .poison_fixed = true;
    }
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("outbox-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("app.db");
    println!(
        "outbox quickstart: SQLite at {}, an in-process broker\n",
        db.display()
    );

    let pool = connect(&db).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT, total INTEGER)",
    )
    .execute(&pool)
    .await?;
    let store = SqliteStore::new(pool.clone());
    store.migrate().await?;
    let signal = Signal::new();
    let outbox = Outbox::new().signal(signal.clone());

    println!("1. Business transactions, each writing its event in the same transaction");
    let mut committed = Vec::new();
    let orders = [
        (1, "customer-7", 120, true),
        (2, "customer-9", 80, false),
        (3, "customer-7", 45, true),
    ];
    for (id, customer, total, commit) in orders {
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO orders (id, customer, total) VALUES (?, ?, ?)")
            .bind(id)
            .bind(customer)
            .bind(total)
            .execute(&mut *tx)
            .await?;
        let event = Message::json(
            "orders.placed",
            &serde_json::json!({"order": id, "total": total}),
        )
        .key(customer)
        .build()?;
        outbox.enqueue(&mut *tx, &event).await?;
        if commit {
            tx.commit().await?;
            outbox.committed();
            committed.push(event.id);
            println!("   order {id} committed   -> orders.placed (key {customer})");
        } else {
            tx.rollback().await?;
            println!("   order {id} rolled back -> its event rolled back with it");
        }
    }
    let mut tx = pool.begin().await?;
    let payment = Message::json(
        "payments.captured",
        &serde_json::json!({"order": 1, "amount": 120}),
    )
    .key("customer-7")
    .build()?;
    outbox.enqueue(&mut *tx, &payment).await?;
    let poison = Message::json(
        "audit.poison",
        &serde_json::json!({"order": 3, "note": "bad schema"}),
    )
    .build()?;
    outbox.enqueue(&mut *tx, &poison).await?;
    tx.commit().await?;
    outbox.committed();
    committed.push(payment.id);
    println!("   payment committed  -> payments.captured (the broker will refuse it twice)");
    println!("   audit committed    -> audit.poison (the broker rejects it for good)\n");

    println!("2. The relay claims, publishes and settles (retry 100 ms doubling, 3 attempts)");
    let broker = Broker {
        state: Arc::default(),
        started: Instant::now(),
    };
    let relay = Relay::builder(Arc::new(store.clone()), Arc::new(broker.clone()))
        .signal(signal.clone())
        .poll_interval(Duration::from_millis(50))
        .max_attempts(3)
        .retry(
            RetryPolicy::exponential(Duration::from_millis(100), 2.0, Duration::from_secs(1))
                .with_jitter(0.0),
        )
        .build()?;
    let cancel = CancellationToken::new();
    let running = tokio::spawn({
        let cancel = cancel.clone();
        async move { relay.run(cancel).await }
    });
    wait_until("the committed events", Duration::from_secs(10), || {
        let got: Vec<_> = broker.received().iter().map(|m| m.id).collect();
        committed.iter().all(|id| got.contains(id))
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let dead = loop {
        let dead = store.list_dead(None, 10).await?;
        if !dead.is_empty() || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("\n3. Dead letters");
    for d in &dead {
        println!(
            "   {} after {} attempt(s): {}",
            d.message.topic, d.message.attempts, d.error
        );
    }
    println!("   fixing the cause and requeueing");
    broker.fix_poison();
    store.requeue(&Selector::Ids(vec![poison.id])).await?;
    wait_until("the requeued message", Duration::from_secs(10), || {
        broker.received().iter().any(|m| m.id == poison.id)
    })
    .await?;

    cancel.cancel();
    let report = running.await?;
    let received = broker.received();
    let rolled_back = received.iter().any(|m| {
        m.payload_json::<serde_json::Value>()
            .is_ok_and(|v| v["order"] == 2 && m.topic == "orders.placed")
    });
    println!("\n4. Summary");
    println!(
        "   published {} messages, retried {}, dead-lettered {}",
        report.published, report.retried, report.dead_lettered
    );
    println!(
        "   rolled-back order 2 published: {}",
        if rolled_back { "YES (bug!)" } else { "no" }
    );
    let order7: Vec<String> = received
        .iter()
        .filter(|m| m.key.as_deref() == Some("customer-7"))
        .map(|m| m.topic.clone())
        .collect();
    println!("   customer-7 events in order: {}", order7.join(", "));
    println!("   done in {:.1} s", started.elapsed().as_secs_f64());
    std::fs::remove_dir_all(&dir).ok();
    if rolled_back || received.len() != committed.len() + 1 {
        return Err("unexpected outcome".into());
    }
    Ok(())
}
