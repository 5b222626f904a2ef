//! MariaDB / MySQL: the store conformance suite, transactional enqueue, and
//! several relays keeping order per key.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::testing::{store_conformance, ScriptedTransport, StoreHarness, StoreOptions};
use outbox_core::{
    CancellationToken, ClaimRequest, ErrorKind, Message, MessageId, Relay, RelayId, RetryPolicy,
    Settlement, Store,
};
use outbox_sqlx::mysql::MySqlStore;
use outbox_sqlx::{Outbox, StoreConfig};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::MySqlPool;

fn url() -> String {
    std::env::var("OUTBOX_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

async fn pool(max: u32) -> Option<MySqlPool> {
    if !outbox_core::testing::require_service("mariadb", "127.0.0.1:3306") {
        return None;
    }
    let pool = MySqlPoolOptions::new()
        .max_connections(max)
        .connect(&url())
        .await
        .unwrap();
    static SWEPT: std::sync::Once = std::sync::Once::new();
    if outbox_core::testing::first_time(&SWEPT) {
        sweep(&pool).await;
    }
    Some(pool)
}

/// Drops the databases earlier runs of these tests left behind (a run
/// still going keeps its own).
async fn sweep(pool: &MySqlPool) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT CAST(schema_name AS CHAR) FROM information_schema.schemata")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    for name in outbox_core::testing::stale_names(&["t"], names) {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(pool)
            .await;
    }
}

async fn fresh(pool: &MySqlPool, config: StoreConfig) -> (MySqlStore, Outbox) {
    let table = format!("{}.outbox", outbox_core::testing::scratch_name("t"));
    let store = MySqlStore::with_config(pool.clone(), config.table(&table).unwrap());
    store.migrate().await.unwrap();
    (store, Outbox::new().table(&table).unwrap())
}

struct MySqlHarness {
    pool: MySqlPool,
}

#[async_trait]
impl StoreHarness for MySqlHarness {
    type Store = MySqlStore;

    async fn store(&self, options: StoreOptions) -> MySqlStore {
        let config = StoreConfig::default()
            .keep_delivered(options.keep_delivered)
            .hold_dead_letters(options.hold_dead_letters);
        fresh(&self.pool, config).await.0
    }

    async fn enqueue(&self, store: &MySqlStore, messages: Vec<Message>) -> outbox_core::Result<()> {
        let outbox = Outbox::new().table(&store.config().table.to_string())?;
        let mut tx = self.pool.begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &messages).await?;
        tx.commit().await.unwrap();
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_passes_the_store_suite() {
    let Some(pool) = pool(20).await else { return };
    store_conformance(&MySqlHarness { pool }).await;
}

async fn count(pool: &MySqlPool, outbox: &Outbox) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}", outbox.table_name()))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn rollback_leaves_no_row_commit_one_and_a_batch_of_ten_thousand() {
    let Some(pool) = pool(5).await else { return };
    let (_store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let m = Message::json("orders.placed", &serde_json::json!({"id": 1}))
        .build()
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut *tx, &m).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&pool, &outbox).await, 0);
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut *tx, &m).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&pool, &outbox).await, 1);

    let ms: Vec<Message> = (0..10_000)
        .map(|i| {
            Message::builder("orders.placed", "x")
                .key(format!("k{}", i % 100))
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_batch(&mut *tx, &ms).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&pool, &outbox).await, 10_001);
}

/// Claims for `request` and settles every message it got as delivered.
async fn deliver(store: &MySqlStore, request: &ClaimRequest) -> Vec<MessageId> {
    let claim = store.claim(request).await.unwrap();
    let ids: Vec<MessageId> = claim.messages.iter().map(|m| m.id).collect();
    let done = Settlement {
        delivered: ids.clone(),
        ..Settlement::default()
    };
    let report = store.settle(&claim.lease, &done).await.unwrap();
    assert_eq!(report.delivered, ids.len() as u64);
    ids
}

/// `n` messages with keys of their own, committed.
async fn backlog(pool: &MySqlPool, outbox: &Outbox, n: usize) -> Vec<Message> {
    let ms = keys_of_their_own(n);
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_batch(&mut *tx, &ms).await.unwrap();
    tx.commit().await.unwrap();
    ms
}

/// A claim of up to `limit` for `owner`, leased for 5 minutes.
fn request(owner: &str, limit: usize) -> ClaimRequest {
    ClaimRequest {
        owner: RelayId::new(owner),
        limit,
        lease: Duration::from_secs(300),
    }
}

/// `n` messages, each with a key of its own (in `seq` order, nothing holds
/// one back).
fn keys_of_their_own(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            Message::builder("orders.placed", "x")
                .key(format!("k{i}"))
                .build()
                .unwrap()
        })
        .collect()
}

/// Claims ahead leave out the owner's outstanding rows by `seq`, in lists
/// of under 1,000 each: with 3,000 outstanding (three lists), the next claim
/// ahead takes the rows after them, in order, and each settle counts its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_ahead_leaves_out_more_outstanding_rows_than_one_list_holds() {
    let Some(pool) = pool(5).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let ms = backlog(&pool, &outbox, 4_000).await;
    let request = |limit| request("ahead", limit);
    let ids = |c: &outbox_core::Claim| c.messages.iter().map(|m| m.id).collect::<Vec<_>>();
    let span = |r: std::ops::Range<usize>| ms[r].iter().map(|m| m.id).collect::<Vec<_>>();
    let first = store.claim(&request(1_500)).await.unwrap();
    assert_eq!(ids(&first), span(0..1_500));
    let second = store
        .claim_ahead(&request(1_500), &first.lease)
        .await
        .unwrap();
    let second = second.expect("no rebalance due yet");
    assert_eq!(ids(&second), span(1_500..3_000));
    // The first claim still outstanding: 3,000 rows left out.
    let third = store
        .claim_ahead(&request(1_500), &second.lease)
        .await
        .unwrap();
    let third = third.expect("no rebalance due yet");
    assert_eq!(ids(&third), span(3_000..4_000));
    for c in [&first, &second, &third] {
        let done = Settlement {
            delivered: ids(c),
            ..Settlement::default()
        };
        let report = store.settle(&c.lease, &done).await.unwrap();
        assert_eq!(report.delivered, c.messages.len() as u64);
    }
    assert_eq!(count(&pool, &outbox).await, 0);
}

/// A claim hands out at most `MAX_CLAIM` rows whatever the batch size, so
/// that every statement stays within MySQL's 65,535 parameters: a claim
/// ahead of a full claim, a settle of every row as a retry and one of
/// every row as delivered all go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_a_statement_holds_is_claimed_in_parts() {
    use outbox_sqlx::mysql::MAX_CLAIM;
    let Some(pool) = pool(5).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default()).await;
    assert_eq!(store.max_claim(), Some(MAX_CLAIM), "the relay is told");
    let total = 2 * MAX_CLAIM + 5_000;
    backlog(&pool, &outbox, total).await;
    let request = request("big", 100_000);
    let first = store.claim(&request).await.unwrap();
    assert_eq!(first.messages.len(), MAX_CLAIM);
    let retry = Settlement {
        retries: first
            .messages
            .iter()
            .map(|m| outbox_core::Retry {
                id: m.id,
                error: "try again".into(),
                delay: Duration::ZERO,
            })
            .collect(),
        ..Settlement::default()
    };
    let report = store.settle(&first.lease, &retry).await.unwrap();
    assert_eq!(report.rescheduled, MAX_CLAIM as u64);
    // Two full claims outstanding: the third binds 40,000 `seq`s. A
    // rebalance falls due once a second and refuses a claim ahead: on a slow
    // machine it can come between these; then they go back and start over.
    let mut chain = None;
    for _ in 0..5 {
        let c1 = store.claim(&request).await.unwrap();
        let c2 = store.claim_ahead(&request, &c1.lease).await.unwrap();
        let c3 = match &c2 {
            Some(c2) => store.claim_ahead(&request, &c2.lease).await.unwrap(),
            None => None,
        };
        if let (Some(c2), Some(c3)) = (&c2, c3) {
            chain = Some((c1, c2.clone(), c3));
            break;
        }
        for c in std::iter::once(&c1).chain(c2.as_ref()) {
            let back = Settlement {
                released: c.messages.iter().map(|m| m.id).collect(),
                ..Settlement::default()
            };
            store.settle(&c.lease, &back).await.unwrap();
        }
    }
    let (c1, c2, c3) = chain.expect("every try met a rebalance");
    let sizes = [&c1, &c2, &c3].map(|c| c.messages.len());
    assert_eq!(sizes, [MAX_CLAIM, MAX_CLAIM, total - 2 * MAX_CLAIM]);
    let mut delivered = 0;
    for c in [&c1, &c2, &c3] {
        let done = Settlement {
            delivered: c.messages.iter().map(|m| m.id).collect(),
            ..Settlement::default()
        };
        delivered += store.settle(&c.lease, &done).await.unwrap().delivered;
    }
    assert_eq!(delivered, total as u64);
    assert_eq!(count(&pool, &outbox).await, 0);
}

/// A settle records every failure's error text, cut to `MAX_ERROR_TEXT`
/// bytes (a `TEXT` column holds 65,535), in statements of a bounded size:
/// 9,000 dead letters (cut to 18 MB of text, over MariaDB's 16 MiB
/// `max_allowed_packet` as one statement) and retries with 70,000-byte
/// texts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_error_texts_are_cut_and_many_failures_settle_in_parts() {
    let Some(pool) = pool(3).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default()).await;
    backlog(&pool, &outbox, 9_100).await;
    let request = request("failing", 9_100);
    let claim = store.claim(&request).await.unwrap();
    assert_eq!(claim.messages.len(), 9_100);
    let (dead, retried) = claim.messages.split_at(9_000);
    let failed = Settlement {
        dead: dead
            .iter()
            .map(|m| outbox_core::Failure {
                id: m.id,
                error: "d".repeat(4_000),
            })
            .collect(),
        retries: retried
            .iter()
            .map(|m| outbox_core::Retry {
                id: m.id,
                error: "é".repeat(35_000),
                delay: Duration::from_secs(60),
            })
            .collect(),
        ..Settlement::default()
    };
    let report = store.settle(&claim.lease, &failed).await.unwrap();
    assert_eq!((report.dead_lettered, report.rescheduled), (9_000, 100));
    let lengths: Vec<(i64, i64)> = sqlx::query_as(&format!(
        "SELECT MIN(LENGTH(last_error)), MAX(LENGTH(last_error)) FROM {}",
        outbox.table_name()
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    let most = outbox_core::MAX_ERROR_TEXT as i64;
    assert!(
        lengths.iter().all(|(lo, hi)| *lo > most - 4 && *hi <= most),
        "{lengths:?}"
    );
}

/// A batch of messages at the largest payload (1 MiB each, 24 MiB in all)
/// is written in statements under MariaDB's 16 MiB `max_allowed_packet`:
/// as one statement the server dropped the connection.
#[tokio::test]
async fn a_batch_of_the_largest_payloads_is_written_in_parts() {
    let Some(pool) = pool(3).await else { return };
    let (_store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let payload = vec![7u8; outbox_core::limits::DEFAULT_MAX_PAYLOAD];
    let ms: Vec<Message> = (0..24)
        .map(|i| {
            Message::builder("orders.placed", payload.clone())
                .key(format!("k{i}"))
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_batch(&mut *tx, &ms).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&pool, &outbox).await, 24);
}

/// A delayed keyed message's row and the entry that holds its key back
/// commit together. Inside a transaction (begun by sqlx or by hand) the
/// enqueue takes none of its own: a rollback leaves nothing. Without one
/// (autocommit) it takes one: when the entry's insert fails, no row stays.
#[tokio::test]
async fn a_delayed_keyed_message_and_its_entry_commit_together() {
    let Some(pool) = pool(3).await else { return };
    let (_store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let t = outbox.table_name().to_string();
    let delayed = || {
        Message::builder("orders.placed", "x")
            .key("k")
            .delay(Duration::from_secs(60))
            .build()
            .unwrap()
    };
    let blocked = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {t}_blocked"))
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    outbox.enqueue(&mut *conn, &delayed()).await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut *tx, &delayed()).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!((count(&pool, &outbox).await, blocked().await), (0, 0));
    // A transaction the server rolled back under sqlx (as a deadlock does):
    // the enqueue must not write, and certainly not commit on its own.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut *tx).await.unwrap();
    let e = outbox.enqueue(&mut *tx, &delayed()).await.unwrap_err();
    assert!(
        e.is_transient() && e.to_string().contains("retry the whole"),
        "{e}"
    );
    drop(tx);
    assert_eq!((count(&pool, &outbox).await, blocked().await), (0, 0));
    outbox.enqueue(&mut *conn, &delayed()).await.unwrap();
    assert_eq!((count(&pool, &outbox).await, blocked().await), (1, 1));
    sqlx::query(&format!("DROP TABLE {t}_blocked"))
        .execute(&pool)
        .await
        .unwrap();
    assert!(outbox.enqueue(&mut *conn, &delayed()).await.is_err());
    assert_eq!(count(&pool, &outbox).await, 1, "no row without its entry");
}

/// A table an older version made: its partitions have no claim token, and
/// rows may still carry that version's row leases.
#[tokio::test]
async fn a_table_from_before_partition_stamps_is_upgraded() {
    let Some(pool) = pool(4).await else { return };
    let (store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let t = outbox.table_name().to_string();
    sqlx::query(&format!(
        "ALTER TABLE {t}_partitions DROP COLUMN claim_token"
    ))
    .execute(&pool)
    .await
    .unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let leased = Message::builder("up.grade", "a").key("k1").build().unwrap();
    let free = Message::builder("up.grade", "b").key("k2").build().unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox
        .enqueue_batch(&mut *tx, &[leased.clone(), free.clone()])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let lease_until = |at: &'static str| {
        let (pool, t, id) = (pool.clone(), t.clone(), leased.id.to_string());
        async move {
            sqlx::query(&format!(
                "UPDATE {t} SET lease_owner = 'old', lease_token = 1, lease_until = {at} \
                 WHERE id = ?"
            ))
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    lease_until("UTC_TIMESTAMP(6) + INTERVAL 1 HOUR").await;
    let request = ClaimRequest {
        owner: RelayId::new("new"),
        limit: 10,
        lease: Duration::from_secs(30),
    };
    assert_eq!(
        deliver(&store, &request).await,
        vec![free.id],
        "a row an older relay leases is left to it"
    );
    lease_until("UTC_TIMESTAMP(6) - INTERVAL 1 SECOND").await;
    assert_eq!(
        deliver(&store, &request).await,
        vec![leased.id],
        "once its lease ended, the row is claimed"
    );
    assert_eq!(count(&pool, &outbox).await, 0);
}

#[tokio::test]
async fn bad_input_is_refused() {
    let Some(pool) = pool(5).await else { return };
    assert!(Outbox::new().table("x`; DROP DATABASE test; --").is_err());
    let (_store, outbox) = fresh(&pool, StoreConfig::default()).await;
    let mut conn = pool.acquire().await.unwrap();
    let big = Message::builder("t", vec![0u8; 100]).build().unwrap();
    let e = outbox
        .clone()
        .max_payload(10)
        .enqueue(&mut *conn, &big)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge);
    let missing = Outbox::new().table("no_such_table_x").unwrap();
    let e = missing
        .enqueue(&mut *conn, &Message::builder("t", "x").build().unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert_eq!(count(&pool, &outbox).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_relays_keep_order_per_key() {
    let Some(admin) = pool(4).await else { return };
    let (store, outbox) = fresh(&admin, StoreConfig::default()).await;
    let table = store.config().table.to_string();
    let total = 6_000;
    let transport = ScriptedTransport::new().fail_randomly(0.02, 7);
    let cancel = CancellationToken::new();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let pool = MySqlPoolOptions::new()
            .max_connections(3)
            .connect(&url())
            .await
            .unwrap();
        let store = MySqlStore::with_config(pool, StoreConfig::default().table(&table).unwrap());
        let relay = Relay::builder(Arc::new(store), Arc::new(transport.clone()))
            .batch_size(200)
            .poll_interval(Duration::from_millis(50))
            .max_attempts(1_000)
            .retry(RetryPolicy::exponential(
                Duration::from_millis(10),
                2.0,
                Duration::from_millis(200),
            ))
            .build()
            .unwrap();
        let c = cancel.clone();
        runs.push(tokio::spawn(async move { relay.run(c).await }));
    }
    let messages: Vec<Message> = (0..total)
        .map(|i| {
            Message::builder("orders.placed", "x")
                .key(format!("k{}", i % 30))
                .build()
                .unwrap()
        })
        .collect();
    let order: HashMap<MessageId, (String, usize)> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id, (m.key.clone().unwrap(), i)))
        .collect();
    for chunk in messages.chunks(200) {
        let mut tx = admin.begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, chunk).await.unwrap();
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline {
        let n: HashSet<MessageId> = transport
            .recorder()
            .messages()
            .iter()
            .map(|m| m.id)
            .collect();
        if n.len() == total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    let mut shares = Vec::new();
    let mut lost = 0;
    for r in runs {
        let r = r.await.unwrap();
        shares.push(r.published);
        lost += r.lease_lost;
    }
    let published = transport.recorder().messages();
    let mut seen = HashSet::new();
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut dups = 0;
    for m in &published {
        if !seen.insert(m.id) {
            dups += 1;
            continue;
        }
        let (k, pos) = &order[&m.id];
        if let Some(prev) = last.insert(k.clone(), *pos) {
            assert!(prev < *pos, "key {k}: #{pos} after #{prev}");
        }
    }
    println!("mysql three relays: {total} messages, shares {shares:?}, duplicates {dups}, lease lost {lost}");
    assert_eq!(seen.len(), total);
    if lost == 0 {
        assert_eq!(dups, 0);
    }
}

/// A row another program wrote with an `id` that is not a UUID cannot be
/// decoded. It is dead-lettered by the claim that meets it (its error says
/// why) instead of failing every claim of its owner; the other rows flow,
/// a later row of its key after it, or, with `hold_dead_letters`, held
/// behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_row_is_dead_lettered_not_a_stuck_claim() {
    let Some(pool) = pool(4).await else { return };
    for hold in [false, true] {
        let (store, outbox) = fresh(&pool, StoreConfig::default().hold_dead_letters(hold)).await;
        let m = |key: &str| {
            Message::builder("orders.placed", "x")
                .key(key)
                .build()
                .unwrap()
        };
        let (bad, other, after) = (m("k1"), m("k2"), m("k1"));
        let mut tx = pool.begin().await.unwrap();
        outbox
            .enqueue_batch(&mut *tx, &[bad.clone(), other.clone(), after.clone()])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let t = store.config().table.to_string();
        sqlx::query(&format!("UPDATE {t} SET id = 'not-a-uuid' WHERE id = ?"))
            .bind(bad.id.to_string())
            .execute(&pool)
            .await
            .unwrap();
        let store = Arc::new(store);
        let rec = outbox_core::testing::RecordingTransport::new();
        let relay = Relay::builder(store.clone(), Arc::new(rec.clone()))
            .build()
            .unwrap();
        relay.drain().await.unwrap();
        let published: Vec<MessageId> = rec.messages().iter().map(|m| m.id).collect();
        let expected = if hold {
            vec![other.id]
        } else {
            vec![other.id, after.id]
        };
        assert_eq!(published, expected, "hold_dead_letters {hold}");
        let (dead, error): (Option<String>, Option<String>) = sqlx::query_as(&format!(
            "SELECT CAST(dead_at AS CHAR), CAST(last_error AS CHAR) FROM {t} WHERE id = 'not-a-uuid'"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(dead.is_some(), "dead-lettered");
        let error = error.unwrap();
        assert!(error.starts_with("undecodable row:"), "{error}");
        let listed = outbox_core::DeadLetters::list_dead(&*store, None, 10)
            .await
            .unwrap();
        assert!(listed.is_empty(), "listed without failing: {listed:?}");
    }
}
