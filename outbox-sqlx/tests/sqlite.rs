//! SQLite: the store conformance suite and transactional enqueue, on files
//! in a temporary directory.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::testing::{store_conformance, RecordingTransport, StoreHarness, StoreOptions};
use outbox_core::{ErrorKind, Message, Relay};
use outbox_sqlx::sqlite::{connect, SqliteStore};
use outbox_sqlx::{Outbox, StoreConfig};
use sqlx::SqlitePool;

fn temp_db() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("outbox-sqlx-tests");
    std::fs::create_dir_all(&dir).unwrap();
    // Once per test binary: the files of earlier runs go (with their -wal
    // and -shm); a run still going keeps its own.
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = name.split('.').next().unwrap_or_default();
            if outbox_core::testing::stale_scratch("t", stem) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    });
    dir.join(format!("{}.db", outbox_core::testing::scratch_name("t")))
}

async fn fresh(config: StoreConfig) -> (SqliteStore, Outbox, SqlitePool) {
    let pool = connect(temp_db()).await.unwrap();
    let store = SqliteStore::with_config(pool.clone(), config);
    store.migrate().await.unwrap();
    let outbox = Outbox::new()
        .table(&store.config().table.to_string())
        .unwrap();
    (store, outbox, pool)
}

struct SqliteHarness;

#[async_trait]
impl StoreHarness for SqliteHarness {
    type Store = SqliteStore;

    async fn store(&self, options: StoreOptions) -> SqliteStore {
        let config = StoreConfig::default()
            .keep_delivered(options.keep_delivered)
            .hold_dead_letters(options.hold_dead_letters);
        fresh(config).await.0
    }

    async fn enqueue(
        &self,
        store: &SqliteStore,
        messages: Vec<Message>,
    ) -> outbox_core::Result<()> {
        let outbox = Outbox::new().table(&store.config().table.to_string())?;
        let mut tx = store.pool().begin().await.unwrap();
        outbox.enqueue_batch(&mut *tx, &messages).await?;
        tx.commit().await.unwrap();
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_store_suite() {
    store_conformance(&SqliteHarness).await;
}

async fn count(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_messages")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn rollback_leaves_no_row_and_commit_exactly_one() {
    let (_store, outbox, pool) = fresh(StoreConfig::default()).await;
    let m = Message::json("orders.placed", &serde_json::json!({"id": 1}))
        .build()
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut *tx, &m).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count(&pool).await, 0);
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue(&mut *tx, &m).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&pool).await, 1);
}

#[tokio::test]
async fn a_batch_of_ten_thousand_in_one_transaction_drains_in_order() {
    let (store, outbox, pool) = fresh(StoreConfig::default()).await;
    let ms: Vec<Message> = (0..10_000)
        .map(|i| {
            Message::builder("orders.placed", vec![0u8, 1, 2, (i % 256) as u8])
                .key(format!("k{}", i % 100))
                .header("n", i.to_string())
                .build()
                .unwrap()
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    let ids = outbox.enqueue_batch(&mut *tx, &ms).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&pool).await, 10_000);
    let rec = RecordingTransport::new();
    let relay = Relay::builder(Arc::new(store), Arc::new(rec.clone()))
        .batch_size(500)
        .build()
        .unwrap();
    assert_eq!(relay.drain().await.unwrap().published, 10_000);
    let got = rec.messages();
    assert_eq!(got.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    assert_eq!(got[7].payload, ms[7].payload, "binary payload intact");
    assert_eq!(got[7].headers, ms[7].headers);
    assert_eq!(count(&pool).await, 0);
}

#[tokio::test]
async fn bad_input_is_refused() {
    let (_store, outbox, pool) = fresh(StoreConfig::default()).await;
    assert!(Outbox::new().table("x; DROP TABLE y").is_err());
    let outbox = outbox.max_payload(16);
    let mut conn = pool.acquire().await.unwrap();
    let big = Message::builder("t", vec![0u8; 17]).build().unwrap();
    assert_eq!(
        outbox.enqueue(&mut *conn, &big).await.unwrap_err().kind(),
        ErrorKind::TooLarge
    );
    let missing = Outbox::new().table("no_such_table").unwrap();
    let m = Message::builder("t", "x").build().unwrap();
    let e = missing.enqueue(&mut *conn, &m).await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(
        e.kind(),
        ErrorKind::Config,
        "a missing table, as on the servers: {e}"
    );
    assert_eq!(count(&pool).await, 0);
}

/// Rows another program wrote that cannot be decoded (an `id` that is not a
/// UUID, a `created_at` stored as text) are dead-lettered by the claim that
/// meets them, with the reason, instead of failing every claim; the other
/// rows flow, and a later row of such a row's key after it or, with
/// `hold_dead_letters`, held behind it.
#[tokio::test]
async fn undecodable_rows_are_dead_lettered_not_a_stuck_claim() {
    for hold in [false, true] {
        let (store, outbox, pool) = fresh(StoreConfig::default().hold_dead_letters(hold)).await;
        let m = |key: &str| {
            Message::builder("orders.placed", "x")
                .key(key)
                .build()
                .unwrap()
        };
        let (bad_id, bad_time, other, after) = (m("k1"), m("k2"), m("k3"), m("k1"));
        let mut tx = pool.begin().await.unwrap();
        outbox
            .enqueue_batch(
                &mut *tx,
                &[
                    bad_id.clone(),
                    bad_time.clone(),
                    other.clone(),
                    after.clone(),
                ],
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let t = store.config().table.to_string();
        sqlx::query(&format!("UPDATE {t} SET id = 'not-a-uuid' WHERE id = ?"))
            .bind(bad_id.id.to_string())
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(&format!(
            "UPDATE {t} SET created_at = '2026-11-27T10:00:00Z' WHERE id = ?"
        ))
        .bind(bad_time.id.to_string())
        .execute(&pool)
        .await
        .unwrap();
        let store = Arc::new(store);
        let rec = RecordingTransport::new();
        let relay = Relay::builder(store.clone(), Arc::new(rec.clone()))
            .build()
            .unwrap();
        relay.drain().await.unwrap();
        let published: Vec<_> = rec.messages().iter().map(|m| m.id).collect();
        let expected = if hold {
            vec![other.id]
        } else {
            vec![other.id, after.id]
        };
        assert_eq!(published, expected, "hold_dead_letters {hold}");
        let errors: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT last_error FROM {t} WHERE dead_at IS NOT NULL ORDER BY seq"
        ))
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors.iter().all(|e| e.starts_with("undecodable row:")),
            "{errors:?}"
        );
        let listed = outbox_core::DeadLetters::list_dead(&*store, None, 10)
            .await
            .unwrap();
        assert!(listed.is_empty(), "listed without failing: {listed:?}");
    }
}
