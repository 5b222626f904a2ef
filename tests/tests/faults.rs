//! The fault-injection suite: each scenario checks the delivery guarantees
//! with a real consumer on the broker and prints a `SUMMARY` line (messages,
//! faults, lost, phantoms, order violations, duplicates). Sizes come from
//! `FAULT_*` variables (see the README); the defaults are CI's quick run.
//! Scenarios run one at a time (some stop servers) and always leave every
//! server running.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use outbox_core::testing::require_service;
use outbox_core::{
    DeadLetters, ErrorKind, Message, MessageId, Relay, RetryPolicy, Selector, Transport,
};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};
use outbox_tests::faults::{
    amqp_drain, jetstream_ids, produce_batches, redis_stream_ids, size, start, stop, Load,
    RelayProcess, Running,
};
use outbox_tests::{
    consumers, produce, unique, wait_for_all, wait_until, Db, Produced, Verdict, PG_ADDR,
};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const REDIS: &str = "redis://127.0.0.1:6379";
const NATS: &str = "nats://127.0.0.1:4222";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const RELAY_BIN: &str = env!("CARGO_BIN_EXE_fault-relay");

fn services(names: &[(&str, &str)]) -> bool {
    require_service("postgres", PG_ADDR) && names.iter().all(|(n, a)| require_service(n, a))
}

async fn redis_transport() -> Arc<dyn Transport> {
    let config = outbox_redis::RedisConfig::builder(REDIS).build().unwrap();
    Arc::new(outbox_redis::RedisTransport::connect(config).await.unwrap())
}

/// Runs an in-process relay over `db` until the returned handle stops it;
/// a message that fails `max_attempts` times is dead-lettered.
async fn relay_in_process(
    db: &Db,
    name: &str,
    transport: Arc<dyn Transport>,
    max_attempts: u32,
) -> outbox_core::RunningRelay {
    let relay = Relay::builder(Arc::new(db.store(name).await), transport)
        .poll_interval(Duration::from_millis(50))
        .lease(Duration::from_secs(5))
        .store_retry(RetryPolicy::exponential(
            Duration::from_millis(50),
            2.0,
            Duration::from_secs(1),
        ))
        .retry(RetryPolicy::exponential(
            Duration::from_millis(50),
            2.0,
            Duration::from_secs(1),
        ))
        .max_attempts(max_attempts)
        .build()
        .unwrap();
    relay.spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_the_relay_process_repeatedly() {
    let _serial = SERIAL.lock().await;
    if !services(&[("redis", "127.0.0.1:6379")]) {
        return;
    }
    let total = size("MESSAGES", 50_000);
    let kills = size("KILLS", 10);
    let keys = 100;
    let batch = 200;
    let db = Db::fresh().await;
    let topic = format!("faults.{}.kill", unique());
    let log = consumers::redis_stream(REDIS, &topic);
    let mut relay = RelayProcess::spawn(RELAY_BIN, &db, "kill9", "redis", 2_000, batch);
    let producer = {
        let db = db.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            // Spread over the kills: ~25 transactions of 20 a second per kill.
            let pause = Duration::from_millis((1_500 * kills as u64) / (total as u64 / 20).max(1));
            produce_batches(
                &db,
                &topic,
                Load {
                    total,
                    keys,
                    per_tx: 20,
                    rollback: 0.1,
                    pause,
                    seed: 7,
                },
            )
            .await
        })
    };
    let mut rng = fastrand::Rng::with_seed(99);
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.u64(400..1_600))).await;
        relay.kill();
        relay = RelayProcess::spawn(RELAY_BIN, &db, "kill9", "redis", 2_000, batch);
    }
    let produced = producer.await.unwrap();
    let got = wait_for_all(&produced, Duration::from_secs(180), || log.ids()).await;
    assert!(relay.terminate(), "the last relay exits 0 on SIGTERM");
    let v = Verdict::check(&produced, &got);
    v.print(
        "kill -9",
        total,
        &format!("kills {kills}, rolled back {}", produced.rolled_back.len()),
    );
    assert_eq!((v.lost, v.phantoms, v.order_violations), (0, 0, 0), "{v:?}");
    assert!(
        // A relay that claims ahead has up to two published claims not yet
        // settled: the one being settled and the one being published.
        v.duplicates <= kills * 2 * batch,
        "duplicates only around kills, at most two batches each: {v:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_relay_processes_one_killed() {
    let _serial = SERIAL.lock().await;
    if !services(&[("redis", "127.0.0.1:6379")]) {
        return;
    }
    let total = size("RELAYS_MESSAGES", 20_000);
    let batch = 100;
    let db = Db::fresh().await;
    let topic = format!("faults.{}.relays", unique());
    let log = consumers::redis_stream(REDIS, &topic);
    let relays: Vec<RelayProcess> = ["a", "b", "c"]
        .iter()
        .map(|n| RelayProcess::spawn(RELAY_BIN, &db, &format!("relay-{n}"), "redis", 2_000, batch))
        .collect();
    let mut relays = relays.into_iter();
    let victim = relays.next().unwrap();
    let producer = {
        let db = db.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            produce_batches(
                &db,
                &topic,
                Load {
                    total,
                    keys: 100,
                    per_tx: 20,
                    rollback: 0.1,
                    pause: Duration::from_millis(4),
                    seed: 3,
                },
            )
            .await
        })
    };
    // Kill it mid-run, once the relays have delivered a tenth.
    wait_until("a tenth delivered", Duration::from_secs(60), || {
        log.ids().len() >= total / 10
    })
    .await;
    victim.kill();
    let produced = producer.await.unwrap();
    let got = wait_for_all(&produced, Duration::from_secs(120), || log.ids()).await;
    for r in relays {
        assert!(r.terminate(), "a surviving relay exits 0 on SIGTERM");
    }
    let v = Verdict::check(&produced, &got);
    v.print("three relays, one killed", total, "kills 1");
    assert_eq!((v.lost, v.phantoms, v.order_violations), (0, 0, 0), "{v:?}");
    assert!(
        v.duplicates <= 2 * batch,
        "duplicates only from the killed relay's last two batches: {v:?}"
    );
}

/// Produces `total` messages over a few seconds while `fault` runs, then
/// checks what `read` finds on the broker.
async fn outage<F, R>(
    name: &str,
    topic: &str,
    db: &Db,
    transport: Arc<dyn Transport>,
    fault: F,
    read: impl FnOnce(Produced) -> R,
) where
    F: std::future::Future<Output = ()>,
    R: std::future::Future<Output = Vec<MessageId>>,
{
    let total = size("OUTAGE_MESSAGES", 4_000);
    // Five attempts are spent within 1.6 s at this retry policy: an outage
    // that counted attempts would dead-letter what it caught (lost on the
    // broker). Messages the transport could not send count none.
    let running = relay_in_process(db, &format!("outage-{name}"), transport, 5).await;
    let producer = {
        let db = db.clone();
        let topic = topic.to_string();
        tokio::spawn(async move {
            produce_batches(
                &db,
                &topic,
                Load {
                    total,
                    keys: 50,
                    per_tx: 10,
                    rollback: 0.1,
                    pause: Duration::from_millis(10),
                    seed: 5,
                },
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    fault.await;
    let produced = producer.await.unwrap();
    // Wait until the outbox is drained, then read the broker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while db.backlog().await > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = running.stop().await;
    let got = read(produced.clone()).await;
    let v = Verdict::check(&produced, &got);
    v.print(
        &format!("{name} outage"),
        total,
        &format!(
            "restarts 1, retried {}, dead-lettered {}",
            report.retried, report.dead_lettered
        ),
    );
    assert_eq!(
        (v.lost, v.phantoms, v.order_violations),
        (0, 0, 0),
        "{name}: {v:?}"
    );
    assert_eq!(
        report.dead_lettered, 0,
        "{name}: the outage dead-lettered messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_restart_mid_run() {
    let _serial = SERIAL.lock().await;
    if !services(&[("nats", "127.0.0.1:4222")]) {
        return;
    }
    let u = unique();
    let stream = format!("FAULTS_{u}");
    let topic = format!("faults.{u}.nats");
    let config = outbox_nats::NatsConfig::builder(NATS)
        .create_stream(outbox_nats::StreamSpec::new(&stream, [topic.clone()]))
        .build()
        .unwrap();
    let nats = Arc::new(outbox_nats::NatsTransport::connect(config).await.unwrap());
    let db = Db::fresh().await;
    let fault = async {
        let _guard = Running("nats");
        stop("nats");
        tokio::time::sleep(Duration::from_secs(3)).await;
        start("nats");
    };
    outage("nats", &topic, &db, nats, fault, |_| {
        jetstream_ids(NATS, &stream)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restart_mid_run() {
    let _serial = SERIAL.lock().await;
    if !services(&[("rabbitmq", "127.0.0.1:5672")]) {
        return;
    }
    let u = unique();
    let exchange = format!("faults-{u}");
    let queue = format!("faults-{u}");
    let topic = format!("faults.{u}.amqp");
    // Declares the durable exchange and queue; the consumer itself reads at the end.
    drop(consumers::amqp_declare(AMQP, &exchange, &queue, &topic).await);
    let config = outbox_amqp::AmqpConfig::builder(AMQP)
        .exchange(&exchange)
        .build()
        .unwrap();
    let amqp = Arc::new(outbox_amqp::AmqpTransport::connect(config).await.unwrap());
    let db = Db::fresh().await;
    let fault = async {
        let _guard = Running("rabbitmq");
        stop("rabbitmq");
        tokio::time::sleep(Duration::from_secs(2)).await;
        start("rabbitmq");
    };
    outage("rabbitmq", &topic, &db, amqp, fault, |_| {
        amqp_drain(AMQP, &queue)
    })
    .await;
}

/// Runs `redis-cli` once Redis has loaded its data and returns its output.
fn redis_cli(args: &[&str]) -> String {
    for _ in 0..100 {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379"])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if !out.contains("LOADING") {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    String::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restart_mid_run() {
    let _serial = SERIAL.lock().await;
    if !services(&[("redis", "127.0.0.1:6379")]) {
        return;
    }
    let topic = format!("faults.{}.redis", unique());
    let redis = redis_transport().await;
    let db = Db::fresh().await;
    let stream = topic.clone();
    let fault = async move {
        let _guard = Running("redis");
        // This Redis keeps nothing on disk; SHUTDOWN SAVE writes a snapshot
        // that the restart loads, so acknowledged entries survive like on a
        // persistent Redis. A copy of it is put back if the restart came up
        // without it (seen once: the server started before the file was
        // there), so that only the relay can lose messages here.
        let dump = "/var/lib/redis/dump.rdb";
        let copy = "/var/lib/redis/outbox-faults.rdb";
        let _ = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6379", "shutdown", "save"])
            .status();
        stop("redis");
        let saved = std::fs::copy(dump, copy).is_ok();
        tokio::time::sleep(Duration::from_secs(2)).await;
        start("redis");
        if saved && redis_cli(&["exists", &stream]).trim() == "0" {
            stop("redis");
            let _ = std::fs::copy(copy, dump);
            start("redis");
            assert_eq!(
                redis_cli(&["exists", &stream]).trim(),
                "1",
                "Redis did not reload its snapshot"
            );
        }
        let _ = std::fs::remove_file(dump);
        let _ = std::fs::remove_file(copy);
    };
    outage("redis", &topic, &db, redis, fault, |_| {
        redis_stream_ids(REDIS, &topic)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_broker_down_and_up_mid_run() {
    let _serial = SERIAL.lock().await;
    if !services(&[]) {
        return;
    }
    let cluster = rdkafka::mocking::MockCluster::new(3).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let topic = format!("faults.{}.kafka", unique());
    cluster.create_topic(&topic, 3, 3).unwrap();
    let config = outbox_kafka::KafkaConfig::builder(&bootstrap)
        .build()
        .unwrap();
    let kafka = Arc::new(outbox_kafka::KafkaTransport::connect(config).await.unwrap());
    let log = consumers::kafka(&bootstrap, &topic, 3);
    let db = Db::fresh().await;
    let fault = async {
        for b in 1..=3 {
            cluster.broker_down(b).unwrap();
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        for b in 1..=3 {
            cluster.broker_up(b).unwrap();
        }
    };
    // The consumer trails the relay: wait until it has every committed message.
    let read = |produced: Produced| async move {
        wait_for_all(&produced, Duration::from_secs(60), || log.ids()).await
    };
    outage("kafka", &topic, &db, kafka, fault, read).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_connections_terminated_then_postgres_restarted() {
    let _serial = SERIAL.lock().await;
    if !services(&[("redis", "127.0.0.1:6379")]) {
        return;
    }
    let db = Db::fresh().await;
    let topic = format!("faults.{}.db", unique());
    let log = consumers::redis_stream(REDIS, &topic);
    let name = format!("faults-db-{}", unique());
    let running = relay_in_process(&db, &name, redis_transport().await, 1_000).await;

    // Phase 1: the relay's connections are terminated again and again.
    let first = {
        let db = db.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            produce_batches(
                &db,
                &topic,
                Load {
                    total: size("DB_MESSAGES", 5_000),
                    keys: 50,
                    per_tx: 10,
                    rollback: 0.1,
                    pause: Duration::from_millis(5),
                    seed: 1,
                },
            )
            .await
        })
    };
    let mut terminated = 0i64;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        terminated += sqlx::query_scalar::<_, i64>(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&name)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    }
    let mut produced = first.await.unwrap();

    // Phase 2: a backlog, then PostgreSQL itself restarts mid-drain.
    let second = produce_batches(
        &db,
        &topic,
        Load {
            total: size("DB_MESSAGES", 5_000) * 2,
            keys: 50,
            per_tx: 500,
            rollback: 0.0,
            pause: Duration::ZERO,
            seed: 2,
        },
    )
    .await;
    {
        let _guard = Running("postgres");
        stop("postgres");
        tokio::time::sleep(Duration::from_secs(2)).await;
        start("postgres");
    }
    produced.committed.extend(second.committed);
    let got = wait_for_all(&produced, Duration::from_secs(120), || log.ids()).await;
    let report = running.stop().await;
    let v = Verdict::check(&produced, &got);
    v.print(
        "database faults",
        produced.committed.len() + produced.rolled_back.len(),
        &format!(
            "terminated connections {terminated}, postgres restarts 1, lease lost {}",
            report.lease_lost
        ),
    );
    assert!(terminated > 0);
    assert_eq!((v.lost, v.phantoms, v.order_violations), (0, 0, 0), "{v:?}");
}

/// A store's claims after PostgreSQL restarted, for owner `ahead`: claims
/// of nothing until the claim floor is found (its steps follow claims; the
/// step that finds it also records that every row so far has committed,
/// which claims ahead go by), then a restart, then a plain claim and a
/// claim ahead of it. `None` when the claim ahead was refused (a rebalance
/// due) or a floor step on the new server came first and left it nothing
/// to go by: the scenario is tried again.
async fn claims_around_a_restart(
    store: &PgStore,
    request: &outbox_core::ClaimRequest,
) -> Option<(outbox_core::Claim, outbox_core::Claim)> {
    use outbox_core::Store;
    let nothing = outbox_core::ClaimRequest {
        limit: 0,
        ..request.clone()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while store.claim_floor().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no claim floor");
        assert!(store.claim(&nothing).await.unwrap().messages.is_empty());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let _guard = Running("postgres");
        stop("postgres");
        start("postgres");
    }
    let plain = store.claim(request).await.unwrap();
    let ahead = store.claim_ahead(request, &plain.lease).await.unwrap()?;
    store.claims_ahead_start(&request.owner)?;
    Some((plain, ahead))
}

/// Claims ahead read above what the claims before them passed, which holds
/// only on the server it was found on. After PostgreSQL restarts (as after
/// a failover, where rows may sit under other `seq`s), a claim ahead that
/// sends no ids (every outstanding row lies below that start) reads
/// nothing rather than from the start of the index, which would hand the
/// outstanding rows out again. Then the rest drains exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_ahead_hand_out_no_row_twice_across_a_postgres_restart() {
    use outbox_core::Store;
    let _serial = SERIAL.lock().await;
    if !services(&[]) {
        return;
    }
    let request = outbox_core::ClaimRequest {
        owner: outbox_core::RelayId::new("ahead"),
        limit: 100,
        lease: Duration::from_secs(300),
    };
    for _ in 0..3 {
        let db = Db::fresh().await;
        let store = PgStore::with_config(
            outbox_tests::pg_pool("faults-ahead", 4).await,
            StoreConfig::default()
                .table(&db.table)
                .unwrap()
                .listen(false),
        );
        let ms: Vec<Message> = (0..400)
            .map(|i| {
                Message::builder("faults.ahead", "x")
                    .key(format!("k{i}"))
                    .build()
                    .unwrap()
            })
            .collect();
        let mut conn = db.pool.acquire().await.unwrap();
        db.outbox.enqueue_batch(&mut *conn, &ms).await.unwrap();
        drop(conn);
        let Some((plain, a1)) = claims_around_a_restart(&store, &request).await else {
            continue;
        };
        let ids = |c: &outbox_core::Claim| c.messages.iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(
            ids(&plain),
            ms[..100].iter().map(|m| m.id).collect::<Vec<_>>()
        );
        assert_eq!(
            ids(&a1),
            ms[100..200].iter().map(|m| m.id).collect::<Vec<_>>()
        );
        store
            .settle(&plain.lease, &delivered(&plain))
            .await
            .unwrap();
        // a1's rows are outstanding and lie below where the next claim
        // ahead starts, on the server before the restart.
        let a2 = store.claim_ahead(&request, &a1.lease).await.unwrap();
        let a2 = a2.expect("no rebalance due yet");
        assert!(
            !ids(&a2).iter().any(|id| ids(&a1).contains(id)),
            "a claim ahead handed out outstanding rows again"
        );
        assert!(a2.messages.is_empty(), "reads nothing on the new server");
        assert_eq!(store.claims_ahead_start(&request.owner), None);
        let mut arrived: Vec<MessageId> = [&plain, &a1, &a2].into_iter().flat_map(ids).collect();
        store.settle(&a1.lease, &delivered(&a1)).await.unwrap();
        for _ in 0..20 {
            let c = store.claim(&request).await.unwrap();
            if c.messages.is_empty() {
                break;
            }
            arrived.extend(ids(&c));
            store.settle(&c.lease, &delivered(&c)).await.unwrap();
        }
        let produced = Produced {
            committed: ms
                .iter()
                .map(|m| (m.id, m.key.clone().unwrap_or_default()))
                .collect(),
            rolled_back: Default::default(),
        };
        let v = Verdict::check(&produced, &arrived);
        v.print(
            "claims ahead across a restart",
            ms.len(),
            "postgres restarts 1",
        );
        assert_eq!(v, Verdict::default(), "{v:?}");
        assert_eq!(db.backlog().await, 0);
        return;
    }
    panic!("every try met a rebalance or a floor step first");
}

/// Every message of `claim` delivered.
fn delivered(claim: &outbox_core::Claim) -> outbox_core::Settlement {
    outbox_core::Settlement {
        delivered: claim.messages.iter().map(|m| m.id).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollbacks_under_load() {
    let _serial = SERIAL.lock().await;
    if !services(&[("redis", "127.0.0.1:6379")]) {
        return;
    }
    let db = Db::fresh().await;
    let topic = format!("faults.{}.rollbacks", unique());
    let log = consumers::redis_stream(REDIS, &topic);
    let running = relay_in_process(&db, "rollbacks", redis_transport().await, 1_000).await;
    let producers = size("PRODUCERS", 16);
    let tx = size("PRODUCER_TRANSACTIONS", 250);
    let produced = produce(&db, &topic, producers, tx, 64, 0.4, 21).await;
    let got = wait_for_all(&produced, Duration::from_secs(120), || log.ids()).await;
    running.stop().await;
    let v = Verdict::check(&produced, &got);
    v.print(
        "rollbacks under load",
        producers * tx,
        &format!(
            "producers {producers}, rolled back {}",
            produced.rolled_back.len()
        ),
    );
    assert_eq!(v, Verdict::default(), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_is_dead_lettered_while_other_keys_flow_then_requeued() {
    let _serial = SERIAL.lock().await;
    if !services(&[("rabbitmq", "127.0.0.1:5672")]) {
        return;
    }
    let u = unique();
    let exchange = format!("poison-{u}");
    let queue = format!("poison-{u}");
    let good = format!("poison.{u}.good");
    let bad = format!("poison.{u}.bad");
    // Only `good` is bound: `bad` is unroutable, reported as transient here
    // so that it goes through max_attempts.
    drop(consumers::amqp_declare(AMQP, &exchange, &queue, &good).await);
    let config = outbox_amqp::AmqpConfig::builder(AMQP)
        .exchange(&exchange)
        .unroutable_is_transient(true)
        .build()
        .unwrap();
    let amqp = Arc::new(outbox_amqp::AmqpTransport::connect(config).await.unwrap());
    let db = Db::fresh().await;
    let store = Arc::new(db.store("poison").await);
    let max_attempts = 3;
    let relay = Relay::builder(store.clone(), amqp)
        .poll_interval(Duration::from_millis(50))
        .max_attempts(max_attempts)
        .retry(RetryPolicy::exponential(
            Duration::from_millis(100),
            2.0,
            Duration::from_millis(400),
        ))
        .build()
        .unwrap();
    let poison = Message::builder(&bad, "poison")
        .key("k-poison")
        .build()
        .unwrap();
    let behind: Vec<Message> = (0..5)
        .map(|i| {
            Message::builder(&good, format!("behind {i}"))
                .key("k-poison")
                .build()
                .unwrap()
        })
        .collect();
    let others: Vec<Message> = (0..200)
        .map(|i| {
            Message::builder(&good, format!("other {i}"))
                .key(format!("k{}", i % 20))
                .build()
                .unwrap()
        })
        .collect();
    let mut all = vec![poison.clone()];
    all.extend(behind.iter().cloned());
    all.extend(others.iter().cloned());
    let mut tx = db.pool.begin().await.unwrap();
    db.outbox.enqueue_batch(&mut *tx, &all).await.unwrap();
    tx.commit().await.unwrap();
    let running = relay.spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = store.list_dead(None, 10).await.unwrap();
        if !dead.is_empty() && db.backlog().await == 0 || tokio::time::Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead.len(), 1, "only the poison message is dead");
    assert_eq!(dead[0].message.id, poison.id);
    assert_eq!(dead[0].message.attempts, max_attempts, "after max_attempts");
    assert!(
        dead[0].error.contains("unroutable") || dead[0].error.contains("returned"),
        "{}",
        dead[0].error
    );
    let delivered = amqp_drain(AMQP, &queue).await;
    assert_eq!(
        delivered.len(),
        205,
        "other keys flowed, and the key moved on once it died"
    );
    // Fix the cause (bind the topic), requeue: it is delivered.
    drop(consumers::amqp_declare(AMQP, &exchange, &queue, &bad).await);
    assert_eq!(
        store
            .requeue(&Selector::Ids(vec![poison.id]))
            .await
            .unwrap(),
        1
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut later = Vec::new();
    while later.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        later = amqp_drain(AMQP, &queue).await;
    }
    running.stop().await;
    assert_eq!(
        later,
        vec![poison.id],
        "requeued after the fix, it is delivered"
    );
    outbox_tests::summary(&format!(
        "SUMMARY poison: messages 206, dead-lettered 1 after {max_attempts} attempts ({}), requeued and delivered 1, lost 0, phantoms 0, order violations 0, duplicates 0",
        dead[0].error
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_typed_error_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    if !services(&[("redis", "127.0.0.1:6379")]) {
        return;
    }
    let db = Db::fresh().await;
    let topic = format!("faults.{}.bad", unique());
    let good: Vec<Message> = (0..10)
        .map(|_| Message::builder(&topic, "ok").build().unwrap())
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    db.outbox.enqueue_batch(&mut *tx, &good).await.unwrap();
    tx.commit().await.unwrap();
    let mut refused = 0;

    for table in [
        "x; DROP TABLE users; --",
        "a\"b",
        "public.t' OR '1'='1",
        "Upper",
        "a.b.c",
    ] {
        assert_eq!(
            Outbox::new().table(table).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert!(StoreConfig::default().table(table).is_err());
        refused += 2;
    }
    for t in [
        "",
        "a b",
        "orders.*",
        "x\u{0}y",
        "'; DELETE FROM outbox; --",
    ] {
        assert!(Message::builder(t, "x").build().is_err(), "{t:?}");
        refused += 1;
    }
    let mut conn = db.pool.acquire().await.unwrap();
    let big = Message::builder(&topic, vec![0u8; 2 * 1024 * 1024])
        .max_payload(usize::MAX)
        .build()
        .unwrap();
    assert_eq!(
        db.outbox
            .enqueue(&mut *conn, &big)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::TooLarge
    );
    let mut header = Message::builder(&topic, "x").build().unwrap();
    header.headers.insert("bad\nname".into(), "v".into());
    assert_eq!(
        db.outbox
            .enqueue(&mut *conn, &header)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    refused += 2;

    // Broken URLs and unreachable or refusing servers: typed errors, no panic.
    assert!(sqlx::PgPool::connect("postgres://[::1").await.is_err());
    assert!(outbox_nats::NatsConfig::builder("nats://exa mple:4222")
        .build()
        .is_err());
    assert!(outbox_amqp::AmqpConfig::builder("amqp://:::")
        .build()
        .is_err());
    assert!(outbox_redis::RedisConfig::builder("redis//nope")
        .build()
        .is_err());
    assert!(outbox_kafka::KafkaConfig::builder("").build().is_err());
    let nobody = sqlx::PgPool::connect("postgres://nobody:wrong@127.0.0.1:5432/test").await;
    assert!(nobody.is_err(), "an unknown role is refused");
    refused += 6;

    // A missing table: the store says so (permanent), the relay keeps running.
    let missing = PgStore::with_config(
        db.pool.clone(),
        StoreConfig::default()
            .table(&format!("{}.missing", db.schema))
            .unwrap()
            .listen(false),
    );
    let claim = outbox_core::Store::claim(
        &missing,
        &outbox_core::ClaimRequest {
            owner: outbox_core::RelayId::new("x"),
            limit: 10,
            lease: Duration::from_secs(1),
        },
    )
    .await
    .unwrap_err();
    assert!(!claim.is_transient(), "{claim}");
    refused += 1;

    // Nothing enqueued before was lost.
    let log = consumers::redis_stream(REDIS, &topic);
    let running = relay_in_process(&db, "bad-input", redis_transport().await, 1_000).await;
    let produced = outbox_tests::Produced {
        committed: good.iter().map(|m| (m.id, String::new())).collect(),
        rolled_back: Default::default(),
    };
    let got = wait_for_all(&produced, Duration::from_secs(30), || log.ids()).await;
    running.stop().await;
    let v = Verdict::check(&produced, &got);
    v.print("bad input", 10, &format!("refused inputs {refused}"));
    assert_eq!(v, Verdict::default());
}
