//! PostgreSQL with several relays: order per key and no loss under random
//! transport failures, and recovery from terminated connections.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{fresh, pg_url, pool};
use outbox_core::testing::ScriptedTransport;
use outbox_core::{CancellationToken, Message, MessageId, Relay, RelayReport, RetryPolicy};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::StoreConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

async fn named_pool(name: &str, max: u32) -> PgPool {
    let opts: PgConnectOptions = pg_url().parse().unwrap();
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts.application_name(name))
        .await
        .unwrap()
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(10), 2.0, Duration::from_millis(200))
}

/// Checks the first deliveries of every key follow enqueue order; returns
/// the number of duplicate deliveries.
fn check(published: &[Message], order: &HashMap<MessageId, (String, usize)>) -> usize {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, usize> = HashMap::new();
    let mut dups = 0;
    for m in published {
        if !seen.insert(m.id) {
            dups += 1;
            continue;
        }
        let (key, pos) = &order[&m.id];
        if let Some(prev) = last.insert(key.as_str(), *pos) {
            assert!(
                prev < *pos,
                "key {key}: message #{pos} first delivered after #{prev}"
            );
        }
    }
    dups
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_relays_keep_order_per_key_under_random_failures() {
    let Some(admin) = pool(4).await else { return };
    let total = 20_000usize;
    let keys = 50;
    let (store, outbox) = fresh(&admin, StoreConfig::default()).await;
    let table = store.config().table.to_string();
    let transport = ScriptedTransport::new().fail_randomly(0.02, 42);

    let cancel = CancellationToken::new();
    let mut runs = Vec::new();
    for r in 0..3 {
        let pool = named_pool(&format!("outbox-relay-{r}"), 4).await;
        let config = StoreConfig::default().table(&table).unwrap();
        let store = PgStore::with_config(pool, config);
        let relay = Relay::builder(Arc::new(store), Arc::new(transport.clone()))
            .batch_size(200)
            .poll_interval(Duration::from_millis(50))
            .lease(Duration::from_secs(10))
            .max_attempts(1_000)
            .retry(fast_retry())
            .build()
            .unwrap();
        let c = cancel.clone();
        runs.push(tokio::spawn(async move { relay.run(c).await }));
    }

    // One producer enqueues while the relays run.
    let messages: Vec<Message> = (0..total)
        .map(|i| {
            Message::builder("orders.placed", format!("{{\"n\":{i}}}"))
                .key(format!("k{}", i % keys))
                .build()
                .unwrap()
        })
        .collect();
    let order: HashMap<MessageId, (String, usize)> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id, (m.key.clone().unwrap(), i)))
        .collect();
    // Spread over a few seconds so partitions move between relays mid-run.
    for chunk in messages.chunks(250) {
        let mut tx = admin.begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, chunk).await.unwrap();
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let distinct: HashSet<MessageId> = transport
            .recorder()
            .messages()
            .iter()
            .map(|m| m.id)
            .collect();
        if distinct.len() == total || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    let mut reports = Vec::new();
    for r in runs {
        reports.push(r.await.unwrap());
    }
    let published = transport.recorder().messages();
    let distinct: HashSet<MessageId> = published.iter().map(|m| m.id).collect();
    assert_eq!(distinct.len(), total, "every message delivered");
    let dups = check(&published, &order);
    let lost_leases: u64 = reports.iter().map(|r: &RelayReport| r.lease_lost).sum();
    let shares: Vec<u64> = reports.iter().map(|r| r.published).collect();
    println!(
        "three relays: {total} messages on {keys} keys, shares {shares:?}, retried {}, \
         duplicates {dups}, lease lost {lost_leases}",
        reports.iter().map(|r| r.retried).sum::<u64>()
    );
    assert!(
        shares.iter().all(|s| *s > 0),
        "every relay got a share: {shares:?}"
    );
    if lost_leases == 0 {
        assert_eq!(dups, 0, "no duplicate without a lost lease");
    }
}

async fn terminate(admin: &PgPool, application: &str) -> u64 {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(application)
    .fetch_one(admin)
    .await
    .unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_are_transient_and_the_relay_recovers() {
    let Some(admin) = pool(2).await else { return };
    let (store, outbox) = fresh(&admin, StoreConfig::default()).await;
    let table = store.config().table.to_string();
    let name = format!("outbox-recover-{}", fastrand::u32(..));
    let pool = named_pool(&name, 2).await;
    let store = PgStore::with_config(pool, StoreConfig::default().table(&table).unwrap());
    let transport = ScriptedTransport::new().slow(Duration::from_millis(300));
    let relay = Relay::builder(Arc::new(store), Arc::new(transport.clone()))
        .batch_size(100)
        .poll_interval(Duration::from_millis(50))
        .store_retry(fast_retry())
        .build()
        .unwrap();
    let messages: Vec<Message> = (0..1_000)
        .map(|i| {
            Message::builder("orders.placed", "x")
                .key(format!("k{}", i % 10))
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = admin.begin().await.unwrap();
    outbox.enqueue_batch(&mut *tx, &messages).await.unwrap();
    tx.commit().await.unwrap();

    let running = relay.spawn();
    let mut killed = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(450)).await;
        killed += terminate(&admin, &name).await;
    }
    assert!(killed > 0, "the relay's connections were terminated");
    let n = transport
        .recorder()
        .wait_for(1_000, Duration::from_secs(60))
        .await;
    let report = running.stop().await;
    let distinct: HashSet<MessageId> = transport
        .recorder()
        .messages()
        .iter()
        .map(|m| m.id)
        .collect();
    println!(
        "terminated {killed} connections; published {n}, settled {}, lease lost {}",
        report.published, report.lease_lost
    );
    assert_eq!(
        distinct.len(),
        1_000,
        "every message delivered without a restart"
    );
    let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "and settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_mid_batch_loses_its_lease_to_another() {
    let Some(admin) = pool(2).await else { return };
    let (store, outbox) = fresh(&admin, StoreConfig::default()).await;
    let table = store.config().table.to_string();
    let name = format!("outbox-cut-{}", fastrand::u32(..));
    let lease = Duration::from_secs(2);
    let a_store = PgStore::with_config(
        named_pool(&name, 2).await,
        StoreConfig::default().table(&table).unwrap(),
    );
    let slow = ScriptedTransport::new().slow(Duration::from_secs(60));
    let a = Relay::builder(Arc::new(a_store), Arc::new(slow))
        .lease(lease)
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let messages: Vec<Message> = (0..50)
        .map(|i| {
            Message::builder("orders.placed", "x")
                .key(format!("k{}", i % 5))
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = admin.begin().await.unwrap();
    outbox.enqueue_batch(&mut *tx, &messages).await.unwrap();
    tx.commit().await.unwrap();
    let a_run = tokio::spawn(async move { a.run(CancellationToken::new()).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leased: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table}_partitions WHERE owner IS NOT NULL AND lease_until > now()"
    ))
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(leased > 0, "relay A holds a claim");
    // A's connections die and A never comes back.
    terminate(&admin, &name).await;
    a_run.abort();

    let b_store = PgStore::with_config(
        named_pool("outbox-cut-b", 2).await,
        StoreConfig::default().table(&table).unwrap(),
    );
    let rec = outbox_core::testing::RecordingTransport::new();
    let b = Relay::builder(Arc::new(b_store), Arc::new(rec.clone()))
        .lease(lease)
        .poll_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let b_run = tokio::spawn({
        let c = cancel.clone();
        async move { b.run(c).await }
    });
    let started = tokio::time::Instant::now();
    assert_eq!(rec.wait_for(50, Duration::from_secs(30)).await, 50);
    println!("relay B took over after {:?}", started.elapsed());
    cancel.cancel();
    b_run.await.unwrap();
    let order: HashMap<MessageId, (String, usize)> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id, (m.key.clone().unwrap(), i)))
        .collect();
    assert_eq!(check(&rec.messages(), &order), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_with_four_lanes_keeps_order() {
    let Some(admin) = pool(4).await else { return };
    let (store, outbox) = fresh(&admin, StoreConfig::default()).await;
    let transport = ScriptedTransport::new().fail_randomly(0.05, 9);
    let relay = Relay::builder(Arc::new(store), Arc::new(transport.clone()))
        .lanes(4)
        .batch_size(100)
        .poll_interval(Duration::from_millis(50))
        .max_attempts(1_000)
        .retry(fast_retry())
        .build()
        .unwrap();
    let messages: Vec<Message> = (0..5_000)
        .map(|i| {
            Message::builder("orders.placed", "x")
                .key(format!("k{}", i % 40))
                .build()
                .unwrap()
        })
        .collect();
    let order: HashMap<MessageId, (String, usize)> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id, (m.key.clone().unwrap(), i)))
        .collect();
    let running = relay.spawn();
    for chunk in messages.chunks(500) {
        let mut tx = admin.begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, chunk).await.unwrap();
        tx.commit().await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while transport
        .recorder()
        .messages()
        .iter()
        .map(|m| m.id)
        .collect::<HashSet<_>>()
        .len()
        < 5_000
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = running.stop().await;
    let published = transport.recorder().messages();
    let dups = check(&published, &order);
    println!(
        "four lanes: published {}, retried {}, duplicates {dups}",
        report.published, report.retried
    );
    assert_eq!(
        published.iter().map(|m| m.id).collect::<HashSet<_>>().len(),
        5_000
    );
    assert_eq!(dups, 0);
}

/// Lanes own different partitions, and a NOTIFY must reach the one that
/// owns the message's: with a poll of an hour, each message, sent alone,
/// is published at once whichever lane owns its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reaches_every_lane() {
    let Some(admin) = pool(8).await else { return };
    let (store, outbox) = fresh(&admin, StoreConfig::default()).await;
    let outbox = outbox.notify(true);
    let table = store.config().table.to_string();
    let rec = outbox_core::testing::RecordingTransport::new();
    let relay = Relay::builder(Arc::new(store), Arc::new(rec.clone()))
        .lanes(4)
        .batch_size(50)
        .lease(Duration::from_secs(30))
        .poll_interval(Duration::from_secs(3_600))
        // No look of its own after work either: only a wakeup can find
        // the messages.
        .min_poll_interval(Duration::from_secs(3_600))
        .build()
        .unwrap();
    let running = relay.spawn();
    let send = |n: usize, from: usize| {
        let (admin, outbox) = (admin.clone(), outbox.clone());
        async move {
            let batch: Vec<Message> = (from..from + n)
                .map(|i| {
                    Message::builder("orders.placed", "x")
                        .key(format!("k{}", i % 200))
                        .build()
                        .unwrap()
                })
                .collect();
            let mut tx = admin.begin().await.unwrap();
            outbox.enqueue_batch(&mut *tx, &batch).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    // Lanes share the partitions while they claim: keep them busy until
    // all four own some.
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let owners: i64 = sqlx::query_scalar(&format!(
            "SELECT count(DISTINCT owner) FROM {table}_partitions WHERE lease_until > now()"
        ))
        .fetch_one(&admin)
        .await
        .unwrap();
        if owners == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lanes did not share the partitions ({owners} owners)"
        );
        send(500, sent).await;
        sent += 500;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rec.wait_for(sent, Duration::from_secs(30)).await, sent);
    // Now one message at a time, on keys spread over the partitions.
    for i in 0..24 {
        send(1, i).await;
        assert_eq!(
            rec.wait_for(sent + i + 1, Duration::from_secs(5)).await,
            sent + i + 1,
            "message {i} (key k{i}) waited for the poll"
        );
    }
    running.stop().await;
}
