//! PostgreSQL: the store conformance suite, transactional enqueue, bad input.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{fresh, fresh_named, pool, PgHarness};
use outbox_core::testing::{store_conformance, RecordingTransport};
use outbox_core::{ErrorKind, Message, Relay};
use outbox_sqlx::{Outbox, StoreConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_store_suite() {
    let Some(pool) = pool(20).await else { return };
    store_conformance(&PgHarness { pool }).await;
}

async fn count(pool: &sqlx::PgPool, outbox: &Outbox) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}", outbox.table_name()))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn rollback_leaves_no_row_and_commit_exactly_one() {
    let Some(pool) = pool(5).await else { return };
    let (_store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let m = Message::json("orders.placed", &serde_json::json!({"id": 1}))
        .build()
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut *tx, &m).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&pool, &outbox).await, 0, "rolled back: no row");

    let mut tx = pool.begin().await.unwrap();
    let id = outbox.enqueue(&mut *tx, &m).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(id, m.id);
    assert_eq!(count(&pool, &outbox).await, 1, "committed: exactly one row");

    // On a plain connection (autocommit) it commits at once.
    let mut conn = pool.acquire().await.unwrap();
    let other = Message::builder("orders.placed", "x").build().unwrap();
    outbox.enqueue(&mut *conn, &other).await.unwrap();
    assert_eq!(count(&pool, &outbox).await, 2);
}

#[tokio::test]
async fn a_batch_of_ten_thousand_in_one_transaction() {
    let Some(pool) = pool(5).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let ms: Vec<Message> = (0..10_000)
        .map(|i| {
            Message::builder("orders.placed", format!("{{\"n\":{i}}}"))
                .key(format!("k{}", i % 100))
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let ids = outbox.enqueue_batch(&mut *tx, &ms).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(ids.len(), 10_000);
    assert_eq!(count(&pool, &outbox).await, 10_000);

    // Drained in order by one relay.
    let rec = RecordingTransport::new();
    let relay = Relay::builder(Arc::new(store), Arc::new(rec.clone()))
        .batch_size(1_000)
        .build()
        .unwrap();
    let report = relay.drain().await.unwrap();
    assert_eq!(report.published, 10_000);
    let got: Vec<_> = rec.messages().iter().map(|m| m.id).collect();
    assert_eq!(got, ids, "one relay, one key space: enqueue order");
    assert_eq!(
        count(&pool, &outbox).await,
        0,
        "delivered rows are deleted by default"
    );
}

#[tokio::test]
async fn bad_input_is_refused_before_any_sql() {
    let Some(pool) = pool(5).await else { return };
    for bad in [
        "outbox; DROP TABLE users; --",
        "outbox\"; --",
        "public.outbox' OR '1'='1",
        "Outbox",
        "a.b.c",
    ] {
        let e = Outbox::new().table(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
        assert!(StoreConfig::default().table(bad).is_err());
    }
    let (_store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let outbox = outbox.max_payload(1024);
    let mut tx = pool.begin().await.unwrap();
    let too_big = Message::builder("orders.placed", vec![0u8; 2048])
        .build()
        .unwrap();
    let e = outbox.enqueue(&mut *tx, &too_big).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge);
    // A message built by hand, bypassing the builder, is still checked.
    let mut sneaky = Message::builder("orders.placed", "x").build().unwrap();
    sneaky.topic = "orders'; DELETE FROM outbox; --".into();
    let e = outbox.enqueue(&mut *tx, &sneaky).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let mut bad_header = Message::builder("orders.placed", "x").build().unwrap();
    bad_header.headers.insert("bad name".into(), "v".into());
    assert!(outbox.enqueue(&mut *tx, &bad_header).await.is_err());
    // The transaction is still usable: nothing was sent.
    let ok = Message::builder("orders.placed", "x").build().unwrap();
    outbox.enqueue(&mut *tx, &ok).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&pool, &outbox).await, 1);
}

#[tokio::test]
async fn a_missing_table_is_a_permanent_config_error() {
    let Some(pool) = pool(5).await else { return };
    let outbox = Outbox::new().table("no_such_schema_x.outbox").unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let m = Message::builder("orders.placed", "x").build().unwrap();
    let e = outbox.enqueue(&mut *conn, &m).await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let Some(pool) = pool(10).await else { return };
    let table = format!("{}.outbox", common::unique("m"));
    let config = StoreConfig::default().table(&table).unwrap();
    let stores: Vec<_> = (0..4)
        .map(|_| outbox_sqlx::postgres::PgStore::with_config(pool.clone(), config.clone()))
        .collect();
    let runs = stores.iter().map(|s| s.migrate());
    for r in futures_join(runs).await {
        r.unwrap();
    }
    stores[0].migrate().await.unwrap();
}

async fn futures_join<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = fs.collect();
    let mut out = Vec::new();
    // Poll them concurrently on this task.
    let mut pinned: Vec<_> = handles.into_iter().map(Box::pin).collect();
    let results = std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out.iter().any(|(j, _)| *j == i) {
                continue;
            }
            match f.as_mut().poll(cx) {
                std::task::Poll::Ready(v) => out.push((i, v)),
                std::task::Poll::Pending => done = false,
            }
        }
        if done {
            std::task::Poll::Ready(std::mem::take(&mut out))
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().map(|(_, v)| v).collect()
}

#[tokio::test]
async fn retention_keeps_delivered_rows_then_purges_them_in_batches() {
    let Some(pool) = pool(5).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default().keep_delivered(true)).await;
    let ms: Vec<Message> = (0..250)
        .map(|_| Message::builder("t.x", "x").build().unwrap())
        .collect();
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_batch(&mut *tx, &ms).await.unwrap();
    tx.commit().await.unwrap();
    let store = Arc::new(store);
    let relay = Relay::builder(store.clone(), Arc::new(RecordingTransport::new()))
        .build()
        .unwrap();
    assert_eq!(relay.drain().await.unwrap().published, 250);
    assert_eq!(
        count(&pool, &outbox).await,
        250,
        "kept with their delivered time"
    );
    let kept = outbox_core::Retention::new(std::time::Duration::from_secs(3600)).batch(100);
    assert_eq!(
        kept.purge(store.as_ref()).await.unwrap(),
        0,
        "inside the window"
    );
    let expired = outbox_core::Retention::new(std::time::Duration::ZERO).batch(100);
    assert_eq!(
        expired.purge(store.as_ref()).await.unwrap(),
        250,
        "three batches"
    );
    assert_eq!(count(&pool, &outbox).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_relay_and_the_listener_reconnects() {
    use std::time::Duration;
    let Some(pool) = pool(5).await else { return };
    // The longest table name: `<schema>_<table>_wakeup` passes PostgreSQL's
    // 63 bytes for a channel, so the store shortens it.
    let (store, outbox) = fresh_named(&pool, StoreConfig::default(), &"o".repeat(40)).await;
    let outbox = outbox.notify(true);
    let rec = RecordingTransport::new();
    let relay = Relay::builder(Arc::new(store), Arc::new(rec.clone()))
        .poll_interval(Duration::from_secs(3_600))
        // No look of its own after work either: only a wakeup can find
        // the messages.
        .min_poll_interval(Duration::from_secs(3_600))
        .build()
        .unwrap();
    let running = relay.spawn();
    // The relay claims once at start, then only NOTIFY can wake it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let send = |n: usize| {
        let pool = pool.clone();
        let outbox = outbox.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let m = Message::builder("t.x", "x").build().unwrap();
            outbox.enqueue(&mut *tx, &m).await.unwrap();
            tx.commit().await.unwrap();
            n
        }
    };
    send(1).await;
    let started = std::time::Instant::now();
    assert_eq!(rec.wait_for(1, Duration::from_secs(10)).await, 1);
    println!("woken by NOTIFY after {:?}", started.elapsed());
    // Kill the listener's connection: it reconnects by itself.
    let killed: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE query ILIKE 'LISTEN%' AND datname = current_database() AND pid <> pg_backend_pid() \
           AND pg_terminate_backend(pid)",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!killed.is_empty(), "a listener connection existed");
    // Wait for a new listener before the next NOTIFY.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query ILIKE 'LISTEN%' AND datname = current_database() \
               AND pid <> pg_backend_pid() AND pid <> ALL($1)",
        )
        .bind(&killed)
        .fetch_one(&pool)
        .await
        .unwrap();
        if listening >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the listener did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send(2).await;
    assert_eq!(
        rec.wait_for(2, Duration::from_secs(10)).await,
        2,
        "woken again after reconnecting"
    );
    running.stop().await;
}

/// A relay statement dropped at any point (a relay stopped by dropping its
/// future) leaves no transaction, and none of its `SET LOCAL`s, on a
/// connection that goes back to the pool: the next borrower of a one-
/// connection pool finds `synchronous_commit` on and no open transaction.
#[tokio::test]
async fn a_dropped_relay_statement_leaves_no_transaction_in_the_pool() {
    use outbox_core::{ClaimRequest, RelayId, Store};
    let Some(pool) = pool(1).await else { return };
    // No LISTEN: its connection would be the pool's only one.
    let (store, outbox) = fresh(&pool, StoreConfig::default().listen(false)).await;
    keyed_backlog(&pool, &outbox, 200).await;
    let mut dropped = 0;
    for round in 0..150u64 {
        // A new owner each round, so that every claim goes to the database
        // (rebalance, then claim); dropped after 0-3 ms, mostly mid-way.
        let request = ClaimRequest {
            owner: RelayId::new(format!("r{round}")),
            limit: 100,
            lease: std::time::Duration::from_secs(30),
        };
        let wait = std::time::Duration::from_micros(round * 20);
        if tokio::time::timeout(wait, store.claim(&request))
            .await
            .is_err()
        {
            dropped += 1;
        }
        // Two statements on the pool's one connection: in autocommit each
        // is a transaction of its own, with an xid of its own.
        let xid = "SELECT txid_current(), current_setting('synchronous_commit')";
        let (a, sync): (i64, String) = sqlx::query_as(xid).fetch_one(&pool).await.unwrap();
        let (b, _): (i64, String) = sqlx::query_as(xid).fetch_one(&pool).await.unwrap();
        assert_eq!(
            sync, "on",
            "round {round}: a relay setting reached the pool"
        );
        assert_ne!(a, b, "round {round}: a relay transaction was left open");
    }
    assert!(dropped > 50, "only {dropped} of 150 claims were dropped");
}

/// Enqueues `n` messages, each with a key of its own.
async fn keyed_backlog(pool: &sqlx::PgPool, outbox: &Outbox, n: usize) {
    backlog(pool, outbox, n, |i| format!("k{i}")).await;
}

/// Commits `n` messages keyed `key(i)` in one batch; returns them.
async fn backlog(
    pool: &sqlx::PgPool,
    outbox: &Outbox,
    n: usize,
    key: impl Fn(usize) -> String,
) -> Vec<Message> {
    let ms: Vec<Message> = (0..n)
        .map(|i| {
            Message::builder("orders.placed", "x")
                .key(key(i))
                .build()
                .unwrap()
        })
        .collect();
    let mut conn = pool.acquire().await.unwrap();
    outbox.enqueue_batch(&mut *conn, &ms).await.unwrap();
    ms
}

/// A fresh store with 300 keyed messages, 100 of them claimed by owner
/// `keeper`: the store then keeps the claim's connection for the next
/// relay transaction.
async fn keep_one(
    pool: &sqlx::PgPool,
    config: StoreConfig,
) -> (outbox_sqlx::postgres::PgStore, outbox_core::Claim) {
    use outbox_core::{ClaimRequest, RelayId, Store};
    let (store, outbox) = fresh(pool, config.listen(false)).await;
    keyed_backlog(pool, &outbox, 300).await;
    let request = ClaimRequest {
        owner: RelayId::new("keeper"),
        limit: 100,
        lease: std::time::Duration::from_secs(30),
    };
    let claim = store.claim(&request).await.unwrap();
    assert_eq!(claim.messages.len(), 100);
    (store, claim)
}

/// Connections the pool has handed out and not got back. Connections go
/// back on a task (after a ping), so this waits up to 10 s for the count
/// to reach `want`, then 300 ms more for returns still in flight, and
/// returns the count then.
async fn out_of_pool(pool: &sqlx::PgPool, want: u32) -> u32 {
    let out = || pool.size() - pool.num_idle() as u32;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while out() != want && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    out()
}

/// A connection the store kept between relay transactions that died
/// meanwhile (the server closed it) is replaced without an error: its
/// `BEGIN` fails and the transaction begins again on a pool connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_that_died_is_replaced_without_an_error() {
    use outbox_core::Store;
    if pool(1).await.is_none() {
        return;
    }
    // A name of its own: only this pool's connections are killed.
    let name = outbox_core::testing::scratch_name("kept");
    let options: sqlx::postgres::PgConnectOptions = common::pg_url().parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.application_name(&name))
        .await
        .unwrap();
    let (store, claim) = keep_one(&pool, StoreConfig::default()).await;
    assert_eq!(
        out_of_pool(&pool, 1).await,
        1,
        "the claim's connection was not kept"
    );
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&name)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!killed.is_empty(), "no connection to kill");
    let report = store
        .settle(&claim.lease, &delivered(&claim))
        .await
        .unwrap();
    assert_eq!(report.delivered, 100);
}

/// `PgPool::close` waits for every connection: the store hands back the
/// ones it keeps when the pool is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_pool_is_not_held_up_by_kept_connections() {
    let Some(pool) = pool(4).await else { return };
    let (_store, _claim) = keep_one(&pool, StoreConfig::default()).await;
    assert_eq!(
        out_of_pool(&pool, 1).await,
        1,
        "the claim's connection was not kept"
    );
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), pool.close()).await;
    assert!(closed.is_ok(), "PgPool::close waited for a kept connection");
}

/// Two connections kept, as in a relay: after a claim of 100 of 300
/// messages and a claim ahead, a settle and a claim ahead ran at once.
/// Returns the store, the claim request and the two claims still to be
/// settled.
async fn two_kept(
    pool: &sqlx::PgPool,
) -> (
    outbox_sqlx::postgres::PgStore,
    outbox_core::ClaimRequest,
    outbox_core::Claim,
    outbox_core::Claim,
) {
    use outbox_core::{ClaimRequest, Store};
    // A claim ahead is refused once a rebalance falls due, 1 s after the
    // first claim: these few calls take milliseconds.
    let refused = "claim ahead refused: more than 1 s since the first claim";
    let (store, a) = keep_one(pool, StoreConfig::default()).await;
    let request = ClaimRequest {
        owner: a.lease.owner.clone(),
        limit: 100,
        lease: std::time::Duration::from_secs(30),
    };
    let b = store
        .claim_ahead(&request, &a.lease)
        .await
        .unwrap()
        .expect(refused);
    // Both take a connection before either commits: the claim ahead waits
    // on a lock of the partitions until the settle is done (it renews their
    // leases, as it asks for a lease over twice as long as they have left).
    let renewing = ClaimRequest {
        lease: std::time::Duration::from_secs(120),
        ..request.clone()
    };
    let table = store.config().table.to_string();
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query(&format!("SELECT 1 FROM {table}_partitions FOR UPDATE"))
        .execute(&mut *blocker)
        .await
        .unwrap();
    let claim = tokio::spawn({
        let (store, request, lease) = (store.clone(), renewing, b.lease.clone());
        async move { store.claim_ahead(&request, &lease).await }
    });
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND strpos(query, '{table}_partitions') > 0"
    );
    common::until_count(
        pool,
        &waiting,
        1,
        "the claim ahead did not wait for the lock",
    )
    .await;
    store.settle(&a.lease, &delivered(&a)).await.unwrap();
    blocker.rollback().await.unwrap();
    let c = claim.await.unwrap().unwrap().expect(refused);
    assert_eq!(c.messages.len(), 100);
    assert_eq!(out_of_pool(pool, 2).await, 2, "two connections kept");
    (store, request, b, c)
}

/// Every message of `claim` delivered.
fn delivered(claim: &outbox_core::Claim) -> outbox_core::Settlement {
    outbox_core::Settlement {
        delivered: claim.messages.iter().map(|m| m.id).collect(),
        ..outbox_core::Settlement::default()
    }
}

/// A claim that finds nothing hands the kept connections back: an idle
/// relay holds none (the claim ahead uses only one of the two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_claim_hands_kept_connections_back() {
    use outbox_core::Store;
    let Some(pool) = pool(4).await else { return };
    let (store, request, _b, c) = two_kept(&pool).await;
    let d = store
        .claim_ahead(&request, &c.lease)
        .await
        .unwrap()
        .unwrap();
    assert!(d.messages.is_empty());
    assert_eq!(
        out_of_pool(&pool, 0).await,
        0,
        "an idle store still holds a connection"
    );
}

/// A settle with no claim behind it (the end of a burst, whose last batch
/// was not full) hands the kept connections back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_settle_hands_kept_connections_back() {
    use outbox_core::Store;
    let Some(pool) = pool(4).await else { return };
    let (store, _request, b, c) = two_kept(&pool).await;
    store.settle(&b.lease, &delivered(&b)).await.unwrap();
    assert_eq!(
        out_of_pool(&pool, 2).await,
        2,
        "kept while a claim is behind"
    );
    store.settle(&c.lease, &delivered(&c)).await.unwrap();
    assert_eq!(
        out_of_pool(&pool, 0).await,
        0,
        "an idle store still holds a connection"
    );
}

/// Sends a marker NOTIFY on `channel` and checks that it is the next one
/// the listener hears: nothing was sent before it.
async fn nothing_before_a_marker(
    pool: &sqlx::PgPool,
    listener: &mut sqlx::postgres::PgListener,
    channel: &str,
    what: &str,
) {
    send_marker(pool, channel).await;
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.payload(), "marker", "{what}");
}

async fn send_marker(pool: &sqlx::PgPool, channel: &str) {
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(channel)
        .execute(pool)
        .await
        .unwrap();
}

/// Reads the NOTIFYs heard so far, up to a marker sent now.
async fn read_to_a_marker(
    pool: &sqlx::PgPool,
    listener: &mut sqlx::postgres::PgListener,
    channel: &str,
) {
    send_marker(pool, channel).await;
    let deadline = std::time::Duration::from_secs(10);
    while tokio::time::timeout(deadline, listener.recv())
        .await
        .unwrap()
        .unwrap()
        .payload()
        != "marker"
    {}
}

/// The next NOTIFY heard is `wake`'s (empty payload), not a marker.
async fn wake_heard(listener: &mut sqlx::postgres::PgListener) {
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next.payload(),
        "",
        "wake sent a NOTIFY to the waiting relay"
    );
}

/// NOTIFY rides in the enqueue statement itself, in each of its four
/// shapes (one message or a batch, with or without a delayed keyed
/// message); a rolled-back transaction sends none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_goes_with_every_enqueue_shape_and_not_with_a_rollback() {
    use std::time::{Duration, SystemTime};
    let Some(pool) = pool(3).await else { return };
    let (_store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let outbox = outbox.notify(true);
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener
        .listen(&outbox.table_name().channel())
        .await
        .unwrap();
    let later = SystemTime::now() + Duration::from_secs(3_600);
    let plain = |k: &str| Message::builder("t.n", "x").key(k).build().unwrap();
    let delayed = |k: &str| {
        Message::builder("t.n", "x")
            .key(k)
            .not_before(later)
            .build()
            .unwrap()
    };
    let shapes: Vec<(&str, Vec<Message>)> = vec![
        ("one", vec![plain("a")]),
        ("one delayed", vec![delayed("b")]),
        ("batch", vec![plain("c"), plain("d")]),
        ("batch with a delayed one", vec![plain("e"), delayed("f")]),
    ];
    let mut rows = 0;
    for (shape, ms) in shapes {
        let mut tx = pool.begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &ms).await.unwrap();
        tx.commit().await.unwrap();
        rows += ms.len() as i64;
        let got = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await;
        assert!(matches!(got, Ok(Ok(_))), "{shape}: a NOTIFY after commit");
        assert_eq!(count(&pool, &outbox).await, rows, "{shape}: rows written");
    }
    let blocked: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}_blocked",
        outbox.table_name().qualified("")
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(blocked, 2, "each delayed keyed message holds its key");
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut *tx, &plain("g")).await.unwrap();
    tx.rollback().await.unwrap();
    // A marker NOTIFY sent after the rollback must be the next one heard.
    let channel = outbox.table_name().channel();
    nothing_before_a_marker(
        &pool,
        &mut listener,
        &channel,
        "the rollback sent no NOTIFY",
    )
    .await;
    assert_eq!(count(&pool, &outbox).await, rows);
}

/// `Outbox::wake` (after commit, NOTIFY off): nothing is sent while no
/// relay waits; a waiting relay (polling only once an hour) is woken by it;
/// a relay that stays busy withdraws its entry and writes it again once
/// idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_reaches_a_waiting_relay_and_sends_nothing_otherwise() {
    use outbox_core::testing::ScriptedTransport;
    use std::time::{Duration, Instant};
    let Some(pool) = pool(8).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let channel = outbox.table_name().channel();
    let waiting = format!(
        "SELECT count(*) FROM {}_waiting WHERE until > now()",
        outbox.table_name().qualified("")
    );
    // Idle: the relay writes its entry just before it waits.
    let until_idle = |pool: sqlx::PgPool, what: &'static str| {
        let waiting = waiting.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while sqlx::query_scalar::<_, i64>(&waiting)
                .fetch_one(&pool)
                .await
                .unwrap()
                == 0
            {
                assert!(Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let entries = |pool: sqlx::PgPool, sql: String| async move {
        sqlx::query_scalar::<_, i64>(&sql)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen(&channel).await.unwrap();
    let commit = |ms: Vec<Message>| {
        let pool = pool.clone();
        let outbox = outbox.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            outbox.enqueue_batch(&mut *tx, &ms).await.unwrap();
            tx.commit().await.unwrap();
            outbox.wake(&pool).await.unwrap();
        }
    };
    let msg = || Message::builder("t.wake", "x").build().unwrap();

    // No relay waits: wake reads and sends nothing.
    commit(vec![msg()]).await;
    nothing_before_a_marker(
        &pool,
        &mut listener,
        &channel,
        "no NOTIFY while nobody waits",
    )
    .await;

    // A relay that polls once an hour: only a NOTIFY can wake it once idle.
    let slow = ScriptedTransport::new().slow(Duration::from_millis(40));
    let rec = slow.recorder().clone();
    let relay = Relay::builder(Arc::new(store), Arc::new(slow))
        .poll_interval(Duration::from_secs(3_600))
        // No look of its own after work either: only a wakeup can find
        // the messages.
        .min_poll_interval(Duration::from_secs(3_600))
        .lease(Duration::from_secs(30))
        .batch_size(200)
        .build()
        .unwrap();
    let running = relay.spawn();
    assert_eq!(rec.wait_for(1, Duration::from_secs(10)).await, 1);
    // Only a NOTIFY can deliver what is committed from now on.
    until_idle(pool.clone(), "the idle relay wrote no entry").await;
    commit(vec![msg()]).await;
    wake_heard(&mut listener).await;
    assert_eq!(
        rec.wait_for(2, Duration::from_secs(10)).await,
        2,
        "woken by wake's NOTIFY"
    );

    // Busy for about a second (25 batches of 40 ms): the entry goes.
    commit((0..5_000).map(|_| msg()).collect()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut withdrawn = false;
    while rec.len() < 5_002 && Instant::now() < deadline {
        withdrawn |= entries(pool.clone(), waiting.clone()).await == 0;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(withdrawn, "a busy relay withdraws its entry");
    assert_eq!(rec.wait_for(5_002, Duration::from_secs(20)).await, 5_002);
    // Idle again: the entry is back and wake still reaches the relay.
    until_idle(pool.clone(), "no entry once idle again").await;
    // What the busy phase's wake sent is behind a marker.
    read_to_a_marker(&pool, &mut listener, &channel).await;
    commit(vec![msg()]).await;
    wake_heard(&mut listener).await;
    assert_eq!(rec.wait_for(5_003, Duration::from_secs(10)).await, 5_003);
    running.stop().await;
}

/// No wakeup is lost at the moment a relay goes idle: 30 rounds, each
/// keeping the relay busy long enough to withdraw its entry, then four
/// writers committing and calling `wake` at random moments while it
/// finishes and writes its entry again; every round must be delivered
/// within seconds although the relay polls only once an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_loses_no_wakeup_while_the_relay_goes_idle() {
    use outbox_core::testing::ScriptedTransport;
    use std::time::Duration;
    let Some(pool) = pool(12).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let slow = ScriptedTransport::new().slow(Duration::from_millis(40));
    let rec = slow.recorder().clone();
    let relay = Relay::builder(Arc::new(store), Arc::new(slow))
        .poll_interval(Duration::from_secs(3_600))
        // No look of its own after work either: only a wakeup can find
        // the messages.
        .min_poll_interval(Duration::from_secs(3_600))
        .batch_size(100)
        .build()
        .unwrap();
    let running = relay.spawn();
    let msg = || Message::builder("t.race", "x").build().unwrap();
    let mut rng = fastrand::Rng::with_seed(8);
    let mut sent = 0;
    for round in 0..30 {
        // About 320 ms of publishing: the relay withdraws its entry.
        let busy: Vec<Message> = (0..800).map(|_| msg()).collect();
        let mut tx = pool.begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &busy).await.unwrap();
        tx.commit().await.unwrap();
        outbox.wake(&pool).await.unwrap();
        sent += busy.len();
        assert_eq!(rec.wait_for(sent, Duration::from_secs(20)).await, sent);
        // Now it settles, claims nothing and writes its entry again.
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let pause = Duration::from_micros(rng.u64(0..6_000));
                let pool = pool.clone();
                let outbox = outbox.clone();
                let m = msg();
                tokio::spawn(async move {
                    tokio::time::sleep(pause).await;
                    let mut tx = pool.begin().await.unwrap();
                    outbox.enqueue(&mut *tx, &m).await.unwrap();
                    tx.commit().await.unwrap();
                    outbox.wake(&pool).await.unwrap();
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        sent += 4;
        assert_eq!(
            rec.wait_for(sent, Duration::from_secs(10)).await,
            sent,
            "round {round}: a wakeup was lost"
        );
    }
    running.stop().await;
}

/// `Outbox::wake` on its own commits its NOTIFY without waiting for the WAL
/// flush, and leaves the connection's settings as they were; inside a
/// transaction (one that has written, and one that has not yet) it changes
/// none of the transaction's settings, so the business commit still waits
/// for the flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_changes_no_transaction_settings() {
    let Some(pool) = pool(4).await else { return };
    let (_store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let t = outbox.table_name().qualified("");
    // A waiting entry, so that wake sends its NOTIFY.
    sqlx::query(&format!(
        "INSERT INTO {t}_waiting (waiter, until) VALUES ('test', now() + interval '1 minute')"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let setting = "SELECT current_setting('synchronous_commit')";
    let mut conn = pool.acquire().await.unwrap();
    let before: String = sqlx::query_scalar(setting)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(before, "on", "the server's default here");

    for written_first in [true, false] {
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        let m = Message::builder("t.wake", "x").build().unwrap();
        if written_first {
            outbox.enqueue(&mut *tx, &m).await.unwrap();
        }
        outbox.wake(&mut *tx).await.unwrap();
        if !written_first {
            outbox.enqueue(&mut *tx, &m).await.unwrap();
        }
        let inside: String = sqlx::query_scalar(setting)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(
            inside, "on",
            "wake inside a transaction (written first: {written_first}) must not turn off \
             the flush of its commit"
        );
        tx.commit().await.unwrap();
    }

    outbox.wake(&mut *conn).await.unwrap();
    let after: String = sqlx::query_scalar(setting)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        after, "on",
        "wake on its own sets nothing beyond its own commit"
    );
}

/// A waiting relay whose LISTEN connection is cut LISTENs again and writes
/// its waiting entry again at once, though it wrote one moments before: an
/// entry written without waiting for the flush can be lost when the server
/// restarts (simulated here by deleting it), and `wake` would then send
/// nothing until the relay renewed it (20 s later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_writes_its_waiting_entry_again_after_listen_reconnects() {
    use outbox_core::testing::ScriptedTransport;
    use std::time::Duration;
    let Some(pool) = pool(8).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let t = outbox.table_name().qualified("");
    let channel = outbox.table_name().channel();
    let waiting = format!("SELECT count(*) FROM {t}_waiting WHERE until > now()");
    let transport = ScriptedTransport::new();
    let rec = transport.recorder().clone();
    let relay = Relay::builder(Arc::new(store), Arc::new(transport))
        .poll_interval(Duration::from_secs(3_600))
        // No look of its own after work either: only a wakeup can find
        // the messages.
        .min_poll_interval(Duration::from_secs(3_600))
        .build()
        .unwrap();
    let running = relay.spawn();
    common::until_count(&pool, &waiting, 1, "the idle relay wrote no entry").await;

    sqlx::query(&format!("DELETE FROM {t}_waiting"))
        .execute(&pool)
        .await
        .unwrap();
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE query LIKE 'LISTEN%' AND query LIKE '%' || $1 || '%'",
    )
    .bind(&channel)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(cut, 1, "the store's LISTEN connection");
    common::until_count(&pool, &waiting, 1, "no entry after LISTEN reconnected").await;

    let mut tx = pool.begin().await.unwrap();
    let m = Message::builder("t.wake", "x").build().unwrap();
    outbox.enqueue(&mut *tx, &m).await.unwrap();
    tx.commit().await.unwrap();
    outbox.wake(&pool).await.unwrap();
    assert_eq!(
        rec.wait_for(1, Duration::from_secs(10)).await,
        1,
        "woken by wake's NOTIFY on the new LISTEN connection"
    );
    running.stop().await;
}

/// Each round enqueues one message, claims and settles it as delivered, for
/// `rounds` rounds 20 ms apart (the claim floor steps after claims, at
/// most every 200 ms) or until `done`.
/// Returns the ids delivered.
async fn deliver_rounds(
    pool: &sqlx::PgPool,
    store: &outbox_sqlx::postgres::PgStore,
    outbox: &Outbox,
    rounds: usize,
    done: impl Fn(&[outbox_core::MessageId]) -> bool,
) -> Vec<outbox_core::MessageId> {
    use outbox_core::{Settlement, Store};
    let mut delivered = Vec::new();
    for _ in 0..rounds {
        let m = Message::builder("orders.placed", "x").build().unwrap();
        let mut conn = pool.acquire().await.unwrap();
        outbox.enqueue(&mut *conn, &m).await.unwrap();
        drop(conn);
        let claim = store.claim(&floor_request()).await.unwrap();
        let ids: Vec<_> = claim.messages.iter().map(|m| m.id).collect();
        let settlement = Settlement {
            delivered: ids.clone(),
            ..Settlement::default()
        };
        store.settle(&claim.lease, &settlement).await.unwrap();
        delivered.extend(ids);
        if done(&delivered) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    delivered
}

fn floor_request() -> outbox_core::ClaimRequest {
    outbox_core::ClaimRequest {
        owner: outbox_core::RelayId::new("floor"),
        limit: 100,
        lease: std::time::Duration::from_secs(30),
    }
}

/// Delivers rounds until the claim floor is above `seq` (at most 5 s);
/// returns it.
async fn floor_above(
    pool: &sqlx::PgPool,
    store: &outbox_sqlx::postgres::PgStore,
    outbox: &Outbox,
    seq: i64,
) -> i64 {
    for _ in 0..25 {
        deliver_rounds(pool, store, outbox, 10, |_| false).await;
        if let Some(floor) = store.claim_floor().filter(|f| *f > seq) {
            return floor;
        }
    }
    panic!("the floor ({:?}) never passed {seq}", store.claim_floor());
}

async fn seq_of<'c>(
    db: impl sqlx::PgExecutor<'c>,
    outbox: &Outbox,
    id: outbox_core::MessageId,
) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT seq FROM {} WHERE id = $1",
        outbox.table_name()
    ))
    .bind(id.as_uuid())
    .fetch_one(db)
    .await
    .unwrap()
}

/// The claim floor does not pass a row whose transaction is still open
/// while later rows are delivered, and passes it once it is delivered.
#[tokio::test]
async fn the_claim_floor_waits_for_an_open_writer() {
    let Some(pool) = pool(5).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default().listen(false)).await;
    let late = Message::builder("orders.placed", "late").build().unwrap();
    let mut open = pool.begin().await.unwrap();
    outbox.enqueue(&mut *open, &late).await.unwrap();
    let late_seq = seq_of(&mut *open, &outbox, late.id).await;
    // 1.5 s of later messages delivered while it is open.
    let delivered = deliver_rounds(&pool, &store, &outbox, 75, |_| false).await;
    assert_eq!(delivered.len(), 75);
    let floor = store.claim_floor();
    assert!(
        floor.is_none_or(|f| f <= late_seq),
        "the floor ({floor:?}) passed an open writer's row ({late_seq})"
    );
    open.commit().await.unwrap();
    let delivered = deliver_rounds(&pool, &store, &outbox, 250, |d| d.contains(&late.id)).await;
    assert!(
        delivered.contains(&late.id),
        "the row committed late was never claimed"
    );
    // Now nothing holds the floor back.
    floor_above(&pool, &store, &outbox, late_seq).await;
}

/// A dead letter requeued after the claim floor passed it is claimed: by
/// the very next claim when the store requeued it, within a few seconds
/// when it was requeued by hand (another process, an operator's SQL).
#[tokio::test]
async fn a_dead_letter_requeued_below_the_claim_floor_is_claimed() {
    use outbox_core::{DeadLetters, Failure, Selector, Settlement, Store};
    let Some(pool) = pool(5).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default().listen(false)).await;
    for by_hand in [false, true] {
        let poison = Message::builder("orders.placed", "poison").build().unwrap();
        let mut conn = pool.acquire().await.unwrap();
        outbox.enqueue(&mut *conn, &poison).await.unwrap();
        drop(conn);
        let poison_seq = seq_of(&pool, &outbox, poison.id).await;
        let claim = store.claim(&floor_request()).await.unwrap();
        assert_eq!(claim.messages.len(), 1);
        let dead = Settlement {
            dead: vec![Failure {
                id: poison.id,
                error: "refused".into(),
            }],
            ..Settlement::default()
        };
        store.settle(&claim.lease, &dead).await.unwrap();
        floor_above(&pool, &store, &outbox, poison_seq).await;
        if by_hand {
            sqlx::query(&format!(
                "UPDATE {} SET dead_at = NULL WHERE id = $1",
                outbox.table_name()
            ))
            .bind(poison.id.as_uuid())
            .execute(&pool)
            .await
            .unwrap();
        } else {
            let n = store
                .requeue(&Selector::Ids(vec![poison.id]))
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
        if by_hand {
            let delivered =
                deliver_rounds(&pool, &store, &outbox, 250, |d| d.contains(&poison.id)).await;
            assert!(
                delivered.contains(&poison.id),
                "the dead letter requeued by hand was never claimed (floor {:?})",
                store.claim_floor()
            );
        } else {
            let claim = store.claim(&floor_request()).await.unwrap();
            assert!(
                claim.messages.iter().any(|m| m.id == poison.id),
                "the next claim missed the requeued dead letter (floor {:?})",
                store.claim_floor()
            );
            let settlement = Settlement {
                delivered: claim.messages.iter().map(|m| m.id).collect(),
                ..Settlement::default()
            };
            store.settle(&claim.lease, &settlement).await.unwrap();
        }
    }
}

/// A table emptied with its sequence restarted: the floor starts over, and
/// new rows (with small `seq` again) are claimed.
#[tokio::test]
async fn the_claim_floor_starts_over_when_the_sequence_restarts() {
    let Some(pool) = pool(5).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default().listen(false)).await;
    let floor = floor_above(&pool, &store, &outbox, 20).await;
    sqlx::query(&format!(
        "TRUNCATE {} RESTART IDENTITY",
        outbox.table_name()
    ))
    .execute(&pool)
    .await
    .unwrap();
    // The first rounds may miss their rows until a step sees the sequence
    // went back; none is lost.
    let mut sent = 0;
    let mut delivered = 0;
    for _ in 0..50 {
        delivered += deliver_rounds(&pool, &store, &outbox, 1, |_| false)
            .await
            .len();
        sent += 1;
        if delivered == sent {
            break;
        }
    }
    assert_eq!(
        delivered, sent,
        "rows below the old floor were never claimed"
    );
    assert!(store.claim_floor().is_none_or(|f| f < floor));
}

/// The schema in the workspace README (for users of their own migration
/// tool) is the one `migrate` applies.
#[test]
fn the_readme_shows_the_schema_migrate_applies() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("the workspace README");
    let schema = outbox_sqlx::postgres::schema(&outbox_sqlx::TableName::default());
    assert!(
        readme.contains(schema.trim_end()),
        "README.md's PostgreSQL schema differs from postgres::schema():\n{schema}"
    );
}

/// An order's id and total as the arguments of an `enqueue_with` statement.
fn order_args(id: i64, total: i32) -> sqlx::postgres::PgArguments {
    use sqlx::Arguments;
    let mut args = sqlx::postgres::PgArguments::default();
    args.add(id).unwrap();
    args.add(total).unwrap();
    args
}

/// The outbox row written in the same statement as the business row: both
/// commit, or neither (a rollback, or a failing business statement); a
/// delayed keyed message blocks its key; with NOTIFY a listening store is
/// woken.
#[tokio::test]
async fn enqueue_with_writes_the_row_in_the_business_statement() {
    let Some(pool) = pool(5).await else { return };
    for notify in [false, true] {
        let (store, outbox) = fresh(&pool, StoreConfig::default().listen(notify)).await;
        let outbox = outbox.notify(notify);
        let schema = outbox.table_name().schema().unwrap().to_string();
        sqlx::query(&format!(
            "CREATE TABLE {schema}.orders (id BIGINT PRIMARY KEY, total INT NOT NULL)"
        ))
        .execute(&pool)
        .await
        .unwrap();
        let orders = format!("INSERT INTO {schema}.orders (id, total) VALUES ($1, $2)");
        let order_count = |pool: sqlx::PgPool| {
            let schema = schema.clone();
            async move {
                sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {schema}.orders"))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        let event = |i: i64| {
            Message::json("orders.placed", &serde_json::json!({ "id": i }))
                .key(format!("order-{i}"))
                .build()
                .unwrap()
        };

        // Committed: both rows.
        let mut tx = pool.begin().await.unwrap();
        let r = outbox
            .enqueue_with(&mut tx, &event(1), &orders, order_args(1_i64, 1250_i32))
            .await
            .unwrap();
        assert_eq!(r.rows_affected(), 1, "the business statement's result");
        tx.commit().await.unwrap();
        assert_eq!(
            (count(&pool, &outbox).await, order_count(pool.clone()).await),
            (1, 1)
        );

        // Rolled back: neither.
        let mut tx = pool.begin().await.unwrap();
        outbox
            .enqueue_with(&mut tx, &event(2), &orders, order_args(2_i64, 10_i32))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(
            (count(&pool, &outbox).await, order_count(pool.clone()).await),
            (1, 1)
        );

        // The business statement fails (duplicate key): neither, and the
        // error is the database's.
        let mut conn = pool.acquire().await.unwrap();
        let e = outbox
            .enqueue_with(&mut conn, &event(3), &orders, order_args(1_i64, 5_i32))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Database, "{e}");
        assert_eq!(
            (count(&pool, &outbox).await, order_count(pool.clone()).await),
            (1, 1)
        );

        // Bad input (over the payload limit): refused before any SQL.
        let small = outbox.clone().max_payload(16);
        let big = Message::builder("orders.placed", "x".repeat(100))
            .build()
            .unwrap();
        let e = small
            .enqueue_with(&mut conn, &big, &orders, order_args(4_i64, 1_i32))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
        assert_eq!(
            (count(&pool, &outbox).await, order_count(pool.clone()).await),
            (1, 1)
        );

        // A delayed keyed message blocks its key, as with `enqueue`.
        let delayed = Message::builder("orders.placed", "later")
            .key("order-9")
            .not_before(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
            .build()
            .unwrap();
        outbox
            .enqueue_with(&mut conn, &delayed, &orders, order_args(9_i64, 1_i32))
            .await
            .unwrap();
        let blocked: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT msg_key FROM {}_blocked",
            outbox.table_name()
        ))
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(
            blocked,
            ["order-9"],
            "only the delayed keyed message blocks its key"
        );

        // A statement that touches no row still writes the outbox row (the
        // caller checks the result).
        let update = format!("UPDATE {schema}.orders SET total = $2 WHERE id = $1");
        let before = count(&pool, &outbox).await;
        let r = outbox
            .enqueue_with(&mut conn, &event(12), &update, order_args(404, 1))
            .await
            .unwrap();
        assert_eq!(r.rows_affected(), 0);
        assert_eq!(count(&pool, &outbox).await, before + 1);

        // A statement with a WITH clause of its own (the outbox's parts go
        // first in it), also a recursive one.
        let with = format!(
            "  WITH o AS (SELECT $1::bigint AS id, $2::int AS total) \
             INSERT INTO {schema}.orders SELECT id, total FROM o"
        );
        let recursive = format!(
            "with\trecursive n(i) AS (SELECT $1::bigint UNION ALL SELECT i + 1 FROM n \
             WHERE i < $1 + 2) INSERT INTO {schema}.orders SELECT i, $2 FROM n"
        );
        for (statement, id, rows) in [(&with, 20_i64, 1), (&recursive, 30, 3)] {
            let before = (count(&pool, &outbox).await, order_count(pool.clone()).await);
            let r = outbox
                .enqueue_with(&mut conn, &event(id), statement, order_args(id, 7))
                .await
                .unwrap();
            assert_eq!(r.rows_affected(), rows, "{statement}");
            assert_eq!(
                (count(&pool, &outbox).await, order_count(pool.clone()).await),
                (before.0 + 1, before.1 + rows as i64),
                "{statement}"
            );
        }

        // With NOTIFY, a listener hears each shape (plain, delayed keyed).
        if notify {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
                .await
                .unwrap();
            listener
                .listen(&outbox.table_name().channel())
                .await
                .unwrap();
            let later = Message::builder("orders.placed", "later")
                .key("order-11")
                .not_before(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
                .build()
                .unwrap();
            for (id, m) in [(10_i64, event(10)), (11, later)] {
                outbox
                    .enqueue_with(&mut conn, &m, &orders, order_args(id, 1_i32))
                    .await
                    .unwrap();
                let got =
                    tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv()).await;
                assert!(matches!(got, Ok(Ok(_))), "order {id}: a NOTIFY");
            }
        }
        drop(store);
    }
}

/// Commits one message of key `k`.
async fn enqueue_keyed(pool: &sqlx::PgPool, outbox: &Outbox) {
    backlog(pool, outbox, 1, |_| "k".to_string()).await;
}

/// A transaction that has enqueued one message and is still open.
async fn open_writer(
    pool: &sqlx::PgPool,
    outbox: &Outbox,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    let m = Message::builder("orders.placed", "k").build().unwrap();
    outbox.enqueue(&mut *tx, &m).await.unwrap();
    tx
}

/// A claim that finds nothing says whether other transactions are writing
/// to the table (`Claim::incoming`: rows on their way, so a relay without
/// wakeups looks again soon instead of backing off), and only to this one.
#[tokio::test]
async fn an_empty_claim_says_whether_rows_are_on_their_way() {
    use outbox_core::Store;
    let Some(pool) = pool(5).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default().listen(false)).await;
    let (_, other) = fresh(&pool, StoreConfig::default().listen(false)).await;
    let request = floor_request();
    let empty = |incoming: bool, what: &'static str| {
        let (store, request) = (store.clone(), request.clone());
        async move {
            let claim = store.claim(&request).await.unwrap();
            assert!(claim.messages.is_empty(), "{what}: claimed");
            assert_eq!(claim.incoming, incoming, "{what}");
        }
    };
    empty(false, "nothing writes").await;
    // A transaction writing to another outbox table does not count.
    let elsewhere = open_writer(&pool, &other).await;
    empty(false, "another table").await;
    // One writing to this table does, until it commits or rolls back.
    let open = open_writer(&pool, &outbox).await;
    empty(true, "an open writer").await;
    open.commit().await.unwrap();
    let claim = store.claim(&request).await.unwrap();
    assert_eq!(claim.messages.len(), 1);
    assert!(
        !claim.incoming,
        "a claim that found messages reports nothing"
    );
    store
        .settle(&claim.lease, &delivered(&claim))
        .await
        .unwrap();
    let open = open_writer(&pool, &outbox).await;
    empty(true, "an open writer again").await;
    open.rollback().await.unwrap();
    elsewhere.rollback().await.unwrap();
    empty(false, "after rollback").await;
}

/// The owner's partition leases and stamps: `(min lease_until, max
/// lease_until, max claim_token)`.
async fn partition_leases(
    pool: &sqlx::PgPool,
    outbox: &Outbox,
    owner: &str,
) -> (Option<String>, Option<String>, Option<i64>) {
    sqlx::query_as(&format!(
        "SELECT min(lease_until)::text, max(lease_until)::text, max(claim_token) \
         FROM {}_partitions WHERE owner = $1",
        outbox.table_name()
    ))
    .bind(owner)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn lease_request(owner: &str, secs: u64) -> outbox_core::ClaimRequest {
    outbox_core::ClaimRequest {
        owner: outbox_core::RelayId::new(owner),
        limit: 100,
        lease: std::time::Duration::from_secs(secs),
    }
}

/// Claims write the partitions table only to renew leases that are half
/// spent: while a long transaction holds back the cleanup of dead rows (a
/// report, a dump), a table rewritten by every claim grew with every claim,
/// and every claim's time with it.
#[tokio::test]
async fn claims_leave_partition_leases_alone_until_half_spent() {
    use outbox_core::Store;
    let Some(pool) = pool(5).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default().listen(false)).await;
    let partitions = format!("{}_partitions", outbox.table_name());
    // A snapshot held open the whole time: no dead row can be removed.
    let mut report = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *report)
        .await
        .unwrap();
    sqlx::query(&format!("SELECT count(*) FROM {partitions}"))
        .execute(&mut *report)
        .await
        .unwrap();

    let request = lease_request("still", 60);
    assert!(store.claim(&request).await.unwrap().messages.is_empty());
    let taken = partition_leases(&pool, &outbox, "still").await;
    assert!(taken.0.is_some(), "no partition taken");
    for round in 0..300 {
        if round % 30 == 0 {
            enqueue_keyed(&pool, &outbox).await;
            let claim = store.claim(&request).await.unwrap();
            assert_eq!(claim.messages.len(), 1, "round {round}");
            let settled = store
                .settle(&claim.lease, &delivered(&claim))
                .await
                .unwrap();
            assert_eq!(
                settled.delivered, 1,
                "round {round}: the settle was fenced off"
            );
        } else {
            assert!(store.claim(&request).await.unwrap().messages.is_empty());
        }
    }
    assert_eq!(partition_leases(&pool, &outbox, "still").await, taken);
    let bytes: i64 = sqlx::query_scalar(&format!("SELECT pg_relation_size('{partitions}')"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        bytes <= 4 * 8192,
        "the partitions table grew to {bytes} bytes in 300 claims"
    );
    report.rollback().await.unwrap();
}

/// Once half of a lease is spent, the next claim (here a claim ahead)
/// renews the leases and stamps its token; the settle of the claim before
/// it, which saw the older stamp, still goes through.
#[tokio::test]
async fn a_claim_renews_half_spent_leases_and_the_claim_before_still_settles() {
    use outbox_core::Store;
    let Some(pool) = pool(5).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default().listen(false)).await;
    let request = lease_request("renew", 30);
    // The leases' ends moved, instead of waiting for time to pass.
    let left = |secs: i32| {
        let sql = format!(
            "UPDATE {}_partitions SET lease_until = now() + make_interval(secs => $1) \
             WHERE owner = 'renew'",
            outbox.table_name()
        );
        let pool = pool.clone();
        async move {
            sqlx::query(&sql)
                .bind(f64::from(secs))
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    assert!(store.claim(&request).await.unwrap().messages.is_empty());
    // Over half of the 30 s left: a claim leaves them alone.
    left(20).await;
    let taken = partition_leases(&pool, &outbox, "renew").await;
    enqueue_keyed(&pool, &outbox).await;
    let before = store.claim(&request).await.unwrap();
    assert_eq!(before.messages.len(), 1);
    assert_eq!(partition_leases(&pool, &outbox, "renew").await, taken);

    // Under half left: the claim ahead (no rebalance is due, within a
    // second of the first claim) renews them.
    left(10).await;
    let spent = partition_leases(&pool, &outbox, "renew").await;
    let ahead = store.claim_ahead(&request, &before.lease).await.unwrap();
    let ahead = ahead.expect("the claim ahead was refused");
    assert!(ahead.messages.is_empty());
    let renewed = partition_leases(&pool, &outbox, "renew").await;
    assert!(renewed.0 > taken.1, "not renewed: {spent:?} -> {renewed:?}");
    assert_eq!(renewed.2, i64::try_from(ahead.lease.token.0).ok());
    let settled = store
        .settle(&before.lease, &delivered(&before))
        .await
        .unwrap();
    assert_eq!(
        settled.delivered, 1,
        "a settle after a renewal was fenced off"
    );
}

/// Claims of 100 for owner `ahead`, with a long lease.
fn ahead_request() -> outbox_core::ClaimRequest {
    lease_request("ahead", 300)
}

/// Claims of nothing (`limit` 0) by owner `ahead` for 1.2 s: the claim
/// floor takes its steps after claims, the third of which finds every row
/// so far committed (claims ahead pass only such rows).
async fn floor_steps(store: &outbox_sqlx::postgres::PgStore) {
    use outbox_core::Store;
    let nothing = outbox_core::ClaimRequest {
        limit: 0,
        ..ahead_request()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1200);
    while std::time::Instant::now() < deadline {
        let claim = store.claim(&nothing).await.unwrap();
        assert!(claim.messages.is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Runs `scenario` until it gets through without a claim ahead refused
/// (`None`): a store refuses one when its rebalance is due, once a second,
/// which a slow machine may reach mid-scenario.
async fn without_a_rebalance<Fut>(scenario: impl Fn() -> Fut)
where
    Fut: std::future::Future<Output = Option<()>>,
{
    for _ in 0..5 {
        if scenario().await.is_some() {
            return;
        }
    }
    panic!("every try met a rebalance");
}

fn ids(c: &outbox_core::Claim) -> Vec<outbox_core::MessageId> {
    c.messages.iter().map(|m| m.id).collect()
}

/// Claims ahead pass what they read of a committed backlog (the next one
/// reads above it and sends no ids), and a row released below that is
/// claimed by the next claim ahead, before a later message of its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_ahead_after_a_release_takes_the_released_row_first() {
    use outbox_core::Store;
    let Some(pool) = pool(4).await else { return };
    without_a_rebalance(|| async {
        // Keys of their own, but rows 150 and 350 share one.
        let key = |i| match i {
            150 | 350 => "k".to_string(),
            i => format!("k{i}"),
        };
        let (store, outbox) = fresh(&pool, StoreConfig::default().listen(false)).await;
        let ms = backlog(&pool, &outbox, 400, key).await;
        floor_steps(&store).await;
        let request = ahead_request();
        let owner = request.owner.clone();
        let span = |r: std::ops::Range<usize>| ms[r].iter().map(|m| m.id).collect::<Vec<_>>();
        let plain = store.claim(&request).await.unwrap();
        assert_eq!(ids(&plain), span(0..100));
        assert_eq!(store.claims_ahead_start(&owner), None);
        let a1 = store.claim_ahead(&request, &plain.lease).await.unwrap()?;
        assert_eq!(ids(&a1), span(100..200));
        let passed = store.claims_ahead_start(&owner);
        assert!(passed.is_some(), "a committed backlog is passed");
        store
            .settle(&plain.lease, &delivered(&plain))
            .await
            .unwrap();
        let a2 = store.claim_ahead(&request, &a1.lease).await.unwrap()?;
        assert_eq!(ids(&a2), span(200..300));
        assert!(store.claims_ahead_start(&owner) > passed);
        let mut release = delivered(&a1);
        release.delivered.retain(|id| *id != ms[150].id);
        release.released = vec![ms[150].id];
        store.settle(&a1.lease, &release).await.unwrap();
        assert_eq!(store.claims_ahead_start(&owner), None);
        let a3 = ids(&store.claim_ahead(&request, &a2.lease).await.unwrap()?);
        let at = |id| a3.iter().position(|i| *i == id);
        assert_eq!(at(ms[150].id), Some(0), "the released row first");
        assert!(at(ms[350].id).is_some_and(|p| p > 0));
        assert!(
            !a3.iter().any(|id| span(200..300).contains(id)),
            "nothing outstanding"
        );
        Some(())
    })
    .await;
}

/// Claims ahead do not pass a row whose insert is still under way (it drew
/// a lower `seq` and commits later): the next claim ahead takes it, before
/// a later message of its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_ahead_still_takes_a_row_committed_late_below_the_claims_before_it() {
    use outbox_core::Store;
    let Some(pool) = pool(4).await else { return };
    without_a_rebalance(|| async {
        let (store, outbox) = fresh(&pool, StoreConfig::default().listen(false)).await;
        let request = ahead_request();
        let mut late = pool.begin().await.unwrap();
        let first = Message::builder("orders.placed", "x")
            .key("k")
            .build()
            .unwrap();
        outbox.enqueue(&mut *late, &first).await.unwrap();
        keyed_backlog(&pool, &outbox, 250).await;
        // The floor's steps run while it is open.
        floor_steps(&store).await;
        let plain = store.claim(&request).await.unwrap();
        let a1 = store.claim_ahead(&request, &plain.lease).await.unwrap()?;
        late.commit().await.unwrap();
        enqueue_keyed(&pool, &outbox).await;
        store
            .settle(&plain.lease, &delivered(&plain))
            .await
            .unwrap();
        let a2 = store.claim_ahead(&request, &a1.lease).await.unwrap()?;
        let taken: Vec<_> = ids(&plain)
            .into_iter()
            .chain(ids(&a1))
            .chain(ids(&a2))
            .collect();
        let at = |id| taken.iter().position(|i| *i == id);
        assert!(at(first.id).is_some(), "the row committed late was claimed");
        let later = a2
            .messages
            .iter()
            .find(|m| m.key.as_deref() == Some("k") && m.id != first.id);
        assert!(
            later.is_none_or(|m| at(m.id) > at(first.id)),
            "the late row first"
        );
        Some(())
    })
    .await;
}
