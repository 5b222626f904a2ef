#![allow(clippy::unwrap_used)]
//! End to end: the `outbox-relay` binary against real servers. Rows are
//! inserted by plain SQL (as an application in any language would), and
//! arrive at real consumers: a core NATS subscriber and Redis XRANGE. Then
//! `/health`, `/metrics`, and SIGTERM ending in exit code 0.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{free_port, http_get, relay, unique, wait_for, Running, PG_ADDR};
use futures_util::StreamExt;
use outbox_core::testing::require_service;
use redis::AsyncCommands;

const NATS_ADDR: &str = "127.0.0.1:4222";
const REDIS_ADDR: &str = "127.0.0.1:6379";
/// The local server trusts loopback, so the password is ignored; it is here
/// to prove it never reaches the logs.
const PG_URL_WITH_PASSWORD: &str = "postgres://postgres:e2e-hidden-pw@127.0.0.1:5432/test";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Stream entries of `key` as (id, payload, key, headers) once there are `n`.
fn redis_entries(
    rt: &tokio::runtime::Runtime,
    redis: &redis::Client,
    key: &str,
    n: usize,
) -> Vec<(String, Vec<u8>, Option<String>, String)> {
    wait_for(20, &format!("{n} entries in {key}"), || {
        rt.block_on(async {
            let mut conn = redis.get_multiplexed_async_connection().await.ok()?;
            let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).await.ok()?;
            (reply.ids.len() >= n).then(|| {
                reply
                    .ids
                    .iter()
                    .map(|e| {
                        (
                            e.get::<String>("id").unwrap_or_default(),
                            e.get::<Vec<u8>>("payload").unwrap_or_default(),
                            e.get::<String>("key"),
                            e.get::<String>("headers").unwrap_or_default(),
                        )
                    })
                    .collect()
            })
        })
    })
}

/// A fresh working directory for one relay (its logs, maybe its SQLite
/// file), a free port and its listen address.
fn scratch(name: &str) -> (std::path::PathBuf, u16, String) {
    let dir = std::env::temp_dir().join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    (dir, port, format!("127.0.0.1:{port}"))
}

/// The URL of a new SQLite database in `dir`.
fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("app.db").display())
}

/// Starts the binary with `vars` (its output in `dir`) and waits until
/// `GET /health` on `port` answers 200; fails if it exits first. Returns the
/// process and the health body.
fn start_healthy(vars: &[(&str, &str)], dir: &std::path::Path, port: u16) -> (Running, String) {
    let mut cmd = relay(vars);
    cmd.stdout(Stdio::from(File::create(dir.join("stdout")).unwrap()))
        .stderr(Stdio::from(File::create(dir.join("stderr")).unwrap()));
    let mut child = Running(Some(cmd.spawn().unwrap()));
    let (_, body) = wait_for(60, "GET /health = 200", || {
        if let Some(status) = child.0.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "outbox-relay exited early ({status}): {}{}",
                read(&dir.join("stderr")),
                read(&dir.join("stdout"))
            );
        }
        http_get(port, "/health").filter(|(s, _)| *s == 200)
    });
    (child, body)
}

/// SIGTERM, then exit code 0 within 20 s.
fn stop_cleanly(child: &mut Running, dir: &std::path::Path) {
    let (status, _) = child.terminate(20);
    assert_eq!(status.code(), Some(0), "{}", read(&dir.join("stderr")));
}

/// Deletes a Redis stream a test wrote (best effort).
fn drop_stream(rt: &tokio::runtime::Runtime, redis: &redis::Client, stream: &str) {
    rt.block_on(async {
        if let Ok(mut conn) = redis.get_multiplexed_async_connection().await {
            let _: Result<(), _> = conn.del(stream).await;
        }
    });
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn postgres_to_nats_and_redis() {
    if !require_service("postgres", PG_ADDR)
        || !require_service("nats", NATS_ADDR)
        || !require_service("redis", REDIS_ADDR)
    {
        return;
    }
    let rt = runtime();
    let schema = unique("relay_");
    let table = format!("{schema}.outbox");
    let tag = unique("t");
    let stream_prefix = format!("relaytest-{tag}:");
    let (logs, port, listen) = scratch("outbox-relay-e2e-");

    // A core NATS subscriber must be there before anything is published.
    let nats = rt.block_on(async_nats::connect(NATS_ADDR)).unwrap();
    let mut notes = rt
        .block_on(nats.subscribe(format!("notes.{tag}.>")))
        .unwrap();
    rt.block_on(nats.flush()).unwrap();

    let routes = format!(
        "notes.{tag}.>=nats://127.0.0.1:4222?mode=core;audit.>=redis://127.0.0.1:6379?prefix={stream_prefix}"
    );
    let (mut child, body) = start_healthy(
        &[
            ("OUTBOX_RELAY_DATABASE_URL", PG_URL_WITH_PASSWORD),
            ("OUTBOX_RELAY_TABLE", &table),
            ("OUTBOX_RELAY_ROUTES", &routes),
            ("OUTBOX_RELAY_LISTEN", &listen),
            ("OUTBOX_RELAY_POLL_INTERVAL_MS", "100"),
            ("OUTBOX_RELAY_BATCH_SIZE", "50"),
            ("OUTBOX_RELAY_LOG", "info"),
        ],
        &logs,
        port,
    );
    assert_eq!(body, "ok\n");

    // An application in any language: plain INSERTs following the schema.
    let pool = rt.block_on(sqlx::PgPool::connect(common::PG_URL)).unwrap();
    let note_topic = format!("notes.{tag}.sent");
    let insert = format!(
        "INSERT INTO {table} (id, topic, msg_key, payload, headers) VALUES \
         ($1, $2, 'user-1', convert_to('note 1', 'UTF8'), '{{\"trace\":\"abc\"}}'), \
         ($3, $2, 'user-1', convert_to('note 2', 'UTF8'), '{{}}'), \
         ($4, $2, 'user-1', convert_to('note 3', 'UTF8'), '{{}}')"
    );
    let note_ids = [
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
    ];
    rt.block_on(
        sqlx::query(&insert)
            .bind(note_ids[0])
            .bind(&note_topic)
            .bind(note_ids[1])
            .bind(note_ids[2])
            .execute(&pool),
    )
    .unwrap();
    // Any UUID works as an id, generated by the database here; no key.
    let audit_ids: Vec<uuid::Uuid> = rt
        .block_on(
            sqlx::query_scalar(&format!(
                "INSERT INTO {table} (id, topic, payload) VALUES \
                 (gen_random_uuid(), 'audit.login', '\\x6c6f67696e'::bytea), \
                 (gen_random_uuid(), 'audit.login', '\\x6c6f67696e32'::bytea) RETURNING id"
            ))
            .fetch_all(&pool),
        )
        .unwrap();
    // No route matches: dead-lettered at once (permanent).
    rt.block_on(
        sqlx::query(&format!(
            "INSERT INTO {table} (id, topic, payload) VALUES (gen_random_uuid(), 'misc.nowhere', ''::bytea)"
        ))
        .execute(&pool),
    )
    .unwrap();

    // NATS: three messages in key order, with the id header and user headers.
    let received: Vec<async_nats::Message> = rt.block_on(async {
        let mut out = Vec::new();
        while out.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(20), notes.next()).await {
                Ok(Some(m)) => out.push(m),
                Ok(None) => panic!("NATS subscription ended"),
                Err(_) => panic!("only {} of 3 NATS messages arrived", out.len()),
            }
        }
        out
    });
    let payloads: Vec<&[u8]> = received.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(payloads, [&b"note 1"[..], b"note 2", b"note 3"]);
    for (m, id) in received.iter().zip(note_ids) {
        assert_eq!(m.subject.as_str(), note_topic);
        let headers = m.headers.as_ref().unwrap();
        assert_eq!(
            headers.get("outbox-id").map(|v| v.as_str().to_string()),
            Some(id.to_string())
        );
        assert_eq!(
            headers.get("outbox-key").map(|v| v.as_str().to_string()),
            Some("user-1".to_string())
        );
    }
    assert_eq!(
        received[0]
            .headers
            .as_ref()
            .unwrap()
            .get("trace")
            .map(|v| v.as_str().to_string()),
        Some("abc".to_string())
    );

    // Redis: both audit rows in the prefixed stream, with their ids.
    let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let stream = format!("{stream_prefix}audit.login");
    let entries = redis_entries(&rt, &redis, &stream, 2);
    let mut got: Vec<(String, Vec<u8>)> = entries
        .iter()
        .map(|(id, payload, key, _)| {
            assert_eq!(*key, None);
            (id.clone(), payload.clone())
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, Vec<u8>)> = vec![
        (audit_ids[0].to_string(), b"login".to_vec()),
        (audit_ids[1].to_string(), b"login2".to_vec()),
    ];
    want.sort();
    assert_eq!(got, want);

    // Delivered rows are deleted; the unroutable one is dead-lettered.
    let left: Vec<(String, bool, Option<String>)> = wait_for(20, "rows settled", || {
        let rows: Vec<(String, bool, Option<String>)> = rt
            .block_on(
                sqlx::query_as(&format!(
                    "SELECT topic, dead_at IS NOT NULL, last_error FROM {table} ORDER BY seq"
                ))
                .fetch_all(&pool),
            )
            .unwrap();
        (rows.len() == 1 && rows[0].1).then_some(rows)
    });
    assert_eq!(left[0].0, "misc.nowhere");
    assert!(
        left[0]
            .2
            .as_deref()
            .unwrap_or("")
            .contains("no route matches"),
        "{left:?}"
    );

    // Metrics in the Prometheus text format.
    let (status, metrics) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("outbox_published_total"), "{metrics}");
    let published: HashMap<&str, &str> = metrics
        .lines()
        .filter(|l| l.starts_with("outbox_published_total{"))
        .filter_map(|l| l.rsplit_once(' '))
        .collect();
    assert!(
        published
            .iter()
            .any(|(k, v)| k.contains("transport=\"nats\"") && *v == "3"),
        "{metrics}"
    );
    assert!(
        published
            .iter()
            .any(|(k, v)| k.contains("transport=\"redis\"") && *v == "2"),
        "{metrics}"
    );
    assert!(metrics.contains("outbox_dead_lettered_total"), "{metrics}");
    assert_eq!(http_get(port, "/nope").unwrap().0, 404);
    assert_eq!(http_get(port, "/health").unwrap().0, 200);

    // SIGTERM: a clean stop with exit code 0.
    let (status, took) = child.terminate(15);
    assert_eq!(
        status.code(),
        Some(0),
        "{status}: {}",
        read(&logs.join("stderr"))
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let stdout = read(&logs.join("stdout"));
    let stderr = read(&logs.join("stderr"));
    assert!(stderr.is_empty(), "{stderr}");
    assert!(stdout.contains("relay started"), "{stdout}");
    assert!(stdout.contains("relay stopped"), "{stdout}");
    assert!(stdout.contains("postgres:***@127.0.0.1"), "{stdout}");
    assert!(!stdout.contains("e2e-hidden-pw"), "{stdout}");
    assert!(!stdout.contains("panicked"), "{stdout}");

    // The graceful stop handed the partitions back.
    let held: i64 = rt
        .block_on(
            sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {table}_partitions WHERE owner IS NOT NULL"
            ))
            .fetch_one(&pool),
        )
        .unwrap();
    assert_eq!(held, 0);

    rt.block_on(async {
        let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&pool)
            .await;
        if let Ok(mut conn) = redis.get_multiplexed_async_connection().await {
            let _: Result<(), _> = conn.del(&stream).await;
        }
    });
    let _ = std::fs::remove_dir_all(&logs);
}

/// Inserts one `orders.placed` row into a SQLite outbox by plain SQL, as an
/// application in any language would; returns its id.
#[cfg(feature = "sqlite")]
fn insert_sqlite(
    rt: &tokio::runtime::Runtime,
    pool: &sqlx::SqlitePool,
    key: Option<&str>,
    payload: &[u8],
    headers: &str,
) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap();
    rt.block_on(
        sqlx::query(
            "INSERT INTO outbox_messages (id, topic, msg_key, payload, headers, created_at) \
             VALUES (?, 'orders.placed', ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(key)
        .bind(payload)
        .bind(headers)
        .bind(now)
        .execute(pool),
    )
    .unwrap();
    id
}

/// SQLite, the embedded engine: the same binary, a file instead of a server.
#[cfg(feature = "sqlite")]
#[test]
fn sqlite_to_redis_streams() {
    if !require_service("redis", REDIS_ADDR) {
        return;
    }
    let rt = runtime();
    let (dir, port, listen) = scratch("outbox-relay-sqlite-");
    let url = sqlite_url(&dir);
    let prefix = unique("relaytest-lite-");
    let routes = format!(">=redis://127.0.0.1:6379?prefix={prefix}:");
    let (mut child, _) = start_healthy(
        &[
            ("OUTBOX_RELAY_DATABASE_URL", &url),
            ("OUTBOX_RELAY_ROUTES", &routes),
            ("OUTBOX_RELAY_LISTEN", &listen),
            ("OUTBOX_RELAY_POLL_INTERVAL_MS", "100"),
            // Delivered rows are kept, and purged once older than 1 ms.
            ("OUTBOX_RELAY_KEEP_DELIVERED", "true"),
            ("OUTBOX_RELAY_RETENTION_MS", "1"),
        ],
        &dir,
        port,
    );

    let pool = rt.block_on(sqlx::SqlitePool::connect(&url)).unwrap();
    let id = insert_sqlite(&rt, &pool, Some("o-1"), b"order 1", r#"{"source":"sql"}"#);

    let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let stream = format!("{prefix}:orders.placed");
    let entries = redis_entries(&rt, &redis, &stream, 1);
    assert_eq!(entries[0].0, id.to_string());
    assert_eq!(entries[0].1, b"order 1");
    assert_eq!(entries[0].2.as_deref(), Some("o-1"));
    assert!(
        entries[0].3.contains("\"source\":\"sql\""),
        "{:?}",
        entries[0]
    );

    let (status, metrics) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("outbox_published_total"), "{metrics}");
    // The kept row is purged by the relay's retention (every second here).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = rt
            .block_on(sqlx::query_scalar("SELECT count(*) FROM outbox_messages").fetch_one(&pool))
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the delivered row was not purged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_cleanly(&mut child, &dir);

    rt.block_on(pool.close());
    drop_stream(&rt, &redis, &stream);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP forwarder to `target` that the test can cut, standing in for a
/// server that becomes unreachable.
struct Proxy {
    port: u16,
    cancel: outbox_core::CancellationToken,
}

impl Proxy {
    fn start(rt: &tokio::runtime::Runtime, port: u16, target: &'static str) -> Proxy {
        let cancel = outbox_core::CancellationToken::new();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = cancel.clone();
        rt.spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Proxy { port, cancel }
    }

    /// Closes the listener and every forwarded connection.
    fn cut(&self) {
        self.cancel.cancel();
    }
}

#[test]
fn health_reports_an_unreachable_database() {
    if !require_service("postgres", PG_ADDR) || !require_service("redis", REDIS_ADDR) {
        return;
    }
    let rt = runtime();
    let proxy = Proxy::start(&rt, 0, PG_ADDR);
    let schema = unique("relay_");
    let table = format!("{schema}.outbox");
    let db_url = format!("postgres://postgres@127.0.0.1:{}/test", proxy.port);
    let (dir, port, listen) = scratch("outbox-relay-health-");
    let (mut child, _) = start_healthy(
        &[
            ("OUTBOX_RELAY_DATABASE_URL", &db_url),
            ("OUTBOX_RELAY_TABLE", &table),
            ("OUTBOX_RELAY_ROUTES", ">=redis://127.0.0.1:6379"),
            ("OUTBOX_RELAY_LISTEN", &listen),
            ("OUTBOX_RELAY_CONNECT_TIMEOUT_MS", "1000"),
        ],
        &dir,
        port,
    );

    proxy.cut();
    let (_, body) = wait_for(30, "GET /health = 503", || {
        http_get(port, "/health").filter(|(s, _)| *s == 503)
    });
    assert!(body.starts_with("database unreachable: "), "{body}");
    // Metrics still answer, and the relay keeps running.
    assert_eq!(http_get(port, "/metrics").unwrap().0, 200);

    // The database comes back: healthy again.
    let _back = Proxy::start(&rt, proxy.port, PG_ADDR);
    wait_for(60, "GET /health = 200 again", || {
        http_get(port, "/health").filter(|(s, _)| *s == 200)
    });

    stop_cleanly(&mut child, &dir);
    rt.block_on(async {
        if let Ok(pool) = sqlx::PgPool::connect(common::PG_URL).await {
            let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&pool)
                .await;
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// A broker that stops answering turns `/health` to 503 once every publish
/// has failed for `unhealthy_after_ms`, naming the transport; the message
/// is delivered once the broker is back, and `/health` is 200 again.
#[cfg(feature = "sqlite")]
#[test]
fn health_reports_a_failing_transport() {
    if !require_service("redis", REDIS_ADDR) {
        return;
    }
    let rt = runtime();
    let proxy = Proxy::start(&rt, 0, REDIS_ADDR);
    let (dir, port, listen) = scratch("outbox-relay-broker-health-");
    let url = sqlite_url(&dir);
    let prefix = unique("relaytest-health-");
    let routes = format!(
        ">=redis://127.0.0.1:{}?prefix={prefix}:&connect_timeout_ms=300&response_timeout_ms=500",
        proxy.port
    );
    let (mut child, _) = start_healthy(
        &[
            ("OUTBOX_RELAY_DATABASE_URL", &url),
            ("OUTBOX_RELAY_ROUTES", &routes),
            ("OUTBOX_RELAY_LISTEN", &listen),
            ("OUTBOX_RELAY_POLL_INTERVAL_MS", "100"),
            ("OUTBOX_RELAY_RETRY_INITIAL_MS", "200"),
            ("OUTBOX_RELAY_RETRY_CAP_MS", "400"),
            ("OUTBOX_RELAY_MAX_ATTEMPTS", "1000"),
            ("OUTBOX_RELAY_UNHEALTHY_AFTER_MS", "1000"),
        ],
        &dir,
        port,
    );

    proxy.cut();
    let pool = rt.block_on(sqlx::SqlitePool::connect(&url)).unwrap();
    let id = insert_sqlite(&rt, &pool, None, b"during the outage", "{}");
    let (_, body) = wait_for(30, "GET /health = 503", || {
        http_get(port, "/health").filter(|(s, _)| *s == 503)
    });
    let named = format!("transport redis://127.0.0.1:{}", proxy.port);
    assert!(
        body.starts_with(&named) && body.contains(" failing for "),
        "{body}"
    );
    assert_eq!(http_get(port, "/metrics").unwrap().0, 200);

    let _back = Proxy::start(&rt, proxy.port, REDIS_ADDR);
    let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let stream = format!("{prefix}:orders.placed");
    let entries = redis_entries(&rt, &redis, &stream, 1);
    assert_eq!(entries[0].0, id.to_string());
    wait_for(30, "GET /health = 200 again", || {
        http_get(port, "/health").filter(|(s, _)| *s == 200)
    });

    stop_cleanly(&mut child, &dir);
    rt.block_on(pool.close());
    drop_stream(&rt, &redis, &stream);
    let _ = std::fs::remove_dir_all(&dir);
}

/// MySQL / MariaDB: the same binary, rows inserted by plain SQL.
#[cfg(feature = "mysql")]
#[test]
fn mysql_to_redis_streams() {
    let mysql_url = std::env::var("OUTBOX_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_string());
    if !require_service("mariadb", "127.0.0.1:3306") || !require_service("redis", REDIS_ADDR) {
        return;
    }
    let rt = runtime();
    let table = unique("relay_my_");
    let prefix = unique("relaytest-my-");
    let routes = format!(">=redis://127.0.0.1:6379?prefix={prefix}:");
    let (dir, port, listen) = scratch("outbox-relay-mysql-");
    let (mut child, _) = start_healthy(
        &[
            ("OUTBOX_RELAY_DATABASE_URL", mysql_url.as_str()),
            ("OUTBOX_RELAY_TABLE", &table),
            ("OUTBOX_RELAY_ROUTES", &routes),
            ("OUTBOX_RELAY_LISTEN", &listen),
            ("OUTBOX_RELAY_POLL_INTERVAL_MS", "100"),
        ],
        &dir,
        port,
    );

    let pool = rt.block_on(sqlx::MySqlPool::connect(&mysql_url)).unwrap();
    rt.block_on(
        sqlx::query(&format!(
            "INSERT INTO {table} (id, topic, msg_key, payload, headers, created_at) \
             VALUES (UUID(), 'invoices.sent', 'i-1', 'invoice 1', '{{}}', NOW(6))"
        ))
        .execute(&pool),
    )
    .unwrap();
    let redis = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let stream = format!("{prefix}:invoices.sent");
    let entries = redis_entries(&rt, &redis, &stream, 1);
    assert_eq!(entries[0].1, b"invoice 1");
    assert_eq!(entries[0].2.as_deref(), Some("i-1"));

    stop_cleanly(&mut child, &dir);
    rt.block_on(async {
        for suffix in ["", "_partitions", "_relays", "_blocked", "_token"] {
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {table}{suffix}"))
                .execute(&pool)
                .await;
        }
        pool.close().await;
    });
    drop_stream(&rt, &redis, &stream);
    let _ = std::fs::remove_dir_all(&dir);
}
