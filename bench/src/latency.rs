//! Phase 4: commit-to-publish latency at steady offered loads, with NOTIFY
//! wakeups and with polling only, measured at a core NATS subscriber.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use outbox_core::{CancellationToken, Message, MessageId, Relay};
use outbox_sqlx::postgres::PgStore;
use outbox_sqlx::{Outbox, StoreConfig};

use crate::recorder::{percentile, Profile};
use crate::sys::{self, round, CpuUse};
use crate::{BoxResult, Ctx};

/// Concurrent producers (open loop: each on its own schedule).
pub const PRODUCERS: usize = 16;
/// Messages committed in the first second are not counted.
const WARM_UP: Duration = Duration::from_secs(1);
/// Poll interval of the polling-only relays.
pub const POLL: Duration = Duration::from_millis(100);
/// Poll interval of the NOTIFY relays (a fallback only).
const LONG_POLL: Duration = Duration::from_secs(10);
/// A directory: each run writes every message's timings there as CSV.
pub const TRACE_ENV: &str = "OUTBOX_BENCH_TRACE";
/// A directory on the database's disk: each run writes and flushes files
/// there in bursts, which stalls the database's WAL flushes (see
/// [`DiskPressure`]).
pub const PRESSURE_ENV: &str = "OUTBOX_BENCH_DISK_PRESSURE";

/// Set (to anything): each run holds a REPEATABLE READ snapshot open on a
/// connection of its own, as a long report or `pg_dump` would, so that no
/// dead row on the database can be removed meanwhile.
pub const SNAPSHOT_ENV: &str = "OUTBOX_BENCH_HOLD_SNAPSHOT";

/// A snapshot held open while it lives (see [`SNAPSHOT_ENV`]).
async fn hold_snapshot(ctx: &Ctx) -> BoxResult<sqlx::Transaction<'static, sqlx::Postgres>> {
    let pool = ctx.db.pool("outbox-bench-lat-snapshot", 1).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT count(*) FROM pg_class")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Disk pressure in bursts while it lives: 256 MiB written and flushed
/// (`fdatasync`), the file removed, 1.5 s of rest, again. On the benchmark
/// machine it held commits for 30-50 ms at p99 (about 1 ms without): the
/// disk stalls some machines have of their own, on demand.
struct DiskPressure {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskPressure {
    fn start(dir: &str) -> Self {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let path =
            std::path::Path::new(dir).join(format!("outbox-bench-pressure-{}", std::process::id()));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let chunk = vec![0x5a_u8; 1 << 20];
                while !stop.load(Ordering::SeqCst) {
                    let burst = std::fs::File::create(&path).and_then(|mut f| {
                        for _ in 0..256 {
                            f.write_all(&chunk)?;
                        }
                        f.sync_data()
                    });
                    let _ = std::fs::remove_file(&path);
                    if let Err(e) = burst {
                        eprintln!("  disk pressure stopped: {}: {e}", path.display());
                        return;
                    }
                    for _ in 0..30 {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        });
        DiskPressure {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DiskPressure {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One latency run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LatencyRun {
    /// `notify`, `wake`, `polling` or `polling-fixed`.
    pub mode: String,
    /// Whether the run had disk pressure ([`PRESSURE_ENV`]).
    pub disk_pressure: bool,
    /// Whether a snapshot was held open through the run ([`SNAPSHOT_ENV`]).
    pub snapshot_held: bool,
    /// The relay's poll interval (ms).
    pub poll_interval_ms: u64,
    /// The relay's shortest poll wait, after a claim that found messages (ms).
    pub min_poll_interval_ms: u64,
    /// Offered business transactions per second.
    pub offered_per_s: u32,
    /// Committed per second (below offered when the database cannot keep up).
    pub achieved_per_s: f64,
    /// Messages measured (after the warm-up).
    pub measured: usize,
    /// Committed messages that never arrived within the wait.
    pub missing: usize,
    /// From COMMIT's return (the transaction is committed) to arrival at
    /// the consumer (ms).
    pub p50_ms: f64,
    /// 90th percentile (ms).
    pub p90_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// Largest (ms).
    pub max_ms: f64,
    /// How late producers ran behind their schedule, 99th percentile (ms).
    pub schedule_lag_p99_ms: f64,
    /// From just before COMMIT to arrival, 99th percentile (ms): the
    /// commit's own wait for the WAL flush included.
    pub p99_from_before_commit_ms: f64,
    /// How long the producers' COMMIT took, 99th percentile (ms).
    pub commit_p99_ms: f64,
    /// The relay's own metrics: claim, publish and settle times, batch
    /// sizes, `outbox_commit_to_publish_seconds` (from the message's
    /// creation, before INSERT, to the broker's acknowledgement), failures.
    pub relay: Profile,
    /// Where CPU went.
    pub cpu: CpuUse,
}

struct Produced {
    id: MessageId,
    before_commit: Instant,
    committed: Instant,
    lag: Duration,
}

/// How producers wake the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// NOTIFY in every enqueuing transaction (`Outbox::notify(true)`).
    Notify,
    /// `Outbox::wake` after each commit: a NOTIFY only while the relay waits.
    Wake,
    /// Nothing: the relay's polls, at the library's default shortest wait
    /// after work (`RelayConfig::min_poll_interval`) up to [`POLL`].
    Polling,
    /// Nothing, and a fixed poll interval ([`POLL`]): for comparison.
    FixedPolling,
}

impl Wakeup {
    /// Every mode, in report order.
    pub const ALL: [Wakeup; 4] = [
        Wakeup::Notify,
        Wakeup::Wake,
        Wakeup::Polling,
        Wakeup::FixedPolling,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Wakeup::Notify => "notify",
            Wakeup::Wake => "wake",
            Wakeup::Polling => "polling",
            Wakeup::FixedPolling => "polling-fixed",
        }
    }

    fn polls(self) -> bool {
        matches!(self, Wakeup::Polling | Wakeup::FixedPolling)
    }

    /// The relay's poll interval and shortest poll wait.
    fn intervals(self) -> (Duration, Duration) {
        let min_poll = outbox_core::RelayConfig::default().min_poll_interval;
        match self {
            Wakeup::Notify | Wakeup::Wake => (LONG_POLL, min_poll),
            Wakeup::Polling => (POLL, min_poll),
            Wakeup::FixedPolling => (POLL, POLL),
        }
    }
}

/// One run at `load` tx/s with the given wakeup.
pub async fn run(ctx: &Ctx, wakeup: Wakeup, load: u32) -> BoxResult<LatencyRun> {
    let mode = wakeup.name();
    let table = ctx
        .db
        .outbox(&format!("lat_{}_{load}", mode.replace('-', "_")))
        .await?;
    let pressure = std::env::var(PRESSURE_ENV)
        .ok()
        .map(|d| DiskPressure::start(&d));
    let snapshot = match std::env::var_os(SNAPSHOT_ENV) {
        Some(_) => Some(hold_snapshot(ctx).await?),
        None => None,
    };
    let result = measure(ctx, wakeup, load, &table).await;
    let disk_pressure = pressure.is_some();
    let snapshot_held = snapshot.is_some();
    drop(pressure);
    if let Some(tx) = snapshot {
        tx.rollback().await?;
    }
    ctx.db.drop(&table.schema).await;
    result.map(|mut r| {
        r.mode = mode.to_string();
        r.disk_pressure = disk_pressure;
        r.snapshot_held = snapshot_held;
        r
    })
}

async fn measure(
    ctx: &Ctx,
    wakeup: Wakeup,
    load: u32,
    table: &crate::db::Table,
) -> BoxResult<LatencyRun> {
    let nats = ctx.brokers.nats_client().ok_or("NATS is not available")?;
    let topic = format!("benchlat.{}.events{load}", ctx.brokers.u);
    let mut sub = nats.subscribe(topic.clone()).await?;
    nats.flush().await?;

    // The consumer: arrival time of every id.
    let arrived: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
    let stop = CancellationToken::new();
    let consumer = tokio::spawn({
        let arrived = arrived.clone();
        let stop = stop.clone();
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    m = sub.next() => {
                        let Some(m) = m else { break };
                        let now = Instant::now();
                        let id = m.headers.as_ref()
                            .and_then(|h| h.get(outbox_core::wire::ID_HEADER))
                            .and_then(|v| v.as_str().parse::<MessageId>().ok());
                        if let Some(id) = id {
                            arrived.lock().unwrap_or_else(|p| p.into_inner()).insert(id, now);
                        }
                    }
                }
            }
        }
    });

    // The relay: another process as far as the producers are concerned (no
    // in-process signal), woken by NOTIFY or by its poll interval.
    let relay_pool = ctx.db.pool("outbox-bench-lat-relay", 4).await?;
    let store = PgStore::with_config(
        relay_pool.clone(),
        StoreConfig::default()
            .table(&table.name)?
            .listen(!wakeup.polls()),
    );
    let (poll, min_poll) = wakeup.intervals();
    let relay = Relay::builder(Arc::new(store), ctx.brokers.core_nats().await?)
        .batch_size(ctx.opts.batch)
        .poll_interval(poll)
        .min_poll_interval(min_poll)
        .build()?;
    let cancel = CancellationToken::new();
    let relay_task = tokio::spawn({
        let c = cancel.clone();
        async move { relay.run(c).await }
    });
    // Let the LISTEN connection come up.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Producers: open loop, PRODUCERS tasks each on a fixed schedule.
    let pool = ctx
        .db
        .pool("outbox-bench-lat-producer", PRODUCERS as u32)
        .await?;
    let outbox = Outbox::new()
        .table(&table.name)?
        .notify(wakeup == Wakeup::Notify);
    let period = Duration::from_secs_f64(PRODUCERS as f64 / f64::from(load));
    ctx.rec.reset();
    let c0 = sys::sample();
    let start = Instant::now() + Duration::from_millis(50);
    let until = start + ctx.opts.latency_time;
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let pool = pool.clone();
        let outbox = outbox.clone();
        let topic = topic.clone();
        let payload = ctx.payload.clone();
        let schema = table.schema.clone();
        let offset = period.mul_f64(p as f64 / PRODUCERS as f64);
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            let insert = format!("INSERT INTO {schema}.orders (customer, total) VALUES ($1, $2)");
            let mut out = Vec::new();
            for k in 0u32.. {
                let at = start + offset + period * k;
                if at >= until {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                let lag = at.elapsed();
                let m = Message::builder(topic.as_str(), payload.clone())
                    .key(format!("customer-{p}-{}", k % 64))
                    .build()?;
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                sqlx::query(&insert)
                    .bind(format!("customer-{p}"))
                    .bind(i32::try_from(k % 1000).unwrap_or(0))
                    .execute(&mut *tx)
                    .await?;
                outbox.enqueue(&mut *tx, &m).await?;
                let before_commit = Instant::now();
                tx.commit().await?;
                let committed = Instant::now();
                if wakeup == Wakeup::Wake {
                    outbox.wake(&mut *conn).await?;
                }
                out.push(Produced {
                    id: m.id,
                    before_commit,
                    committed,
                    lag,
                });
            }
            Ok::<_, crate::BoxError>(out)
        }));
    }
    let mut produced = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(v)) => produced.extend(v),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Wait for the stragglers.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = arrived.lock().unwrap_or_else(|p| p.into_inner()).len();
        if got >= produced.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = CpuUse::between(&c0, &sys::sample());
    let relay_profile = ctx.rec.profile();
    cancel.cancel();
    let _ = relay_task.await;
    stop.cancel();
    let _ = consumer.await;
    pool.close().await;
    relay_pool.close().await;
    if !errors.is_empty() {
        return Err(format!("producers failed: {}", errors.join("; ")).into());
    }

    let arrived = arrived.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let warm = start + WARM_UP;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (mut lat, mut with_commit, mut commits, mut lags) = (vec![], vec![], vec![], vec![]);
    let mut missing = 0;
    // With OUTBOX_BENCH_TRACE, one line per message: when its COMMIT began
    // (ms into the run), how long it took, how late the producer was, and
    // its latency.
    let trace_dir = std::env::var(TRACE_ENV).ok();
    let mut trace = String::from("commit_at_ms,commit_ms,lag_ms,latency_ms\n");
    for p in &produced {
        if p.before_commit < warm {
            continue;
        }
        lags.push(ms(p.lag));
        commits.push(ms(p.committed - p.before_commit));
        let latency = arrived.get(&p.id).map(|t| {
            with_commit.push(ms(t.saturating_duration_since(p.before_commit)));
            ms(t.saturating_duration_since(p.committed))
        });
        match latency {
            Some(l) => lat.push(l),
            None => missing += 1,
        }
        if trace_dir.is_some() {
            trace.push_str(&format!(
                "{:.3},{:.3},{:.3},{:.3}\n",
                ms(p.before_commit - start),
                ms(p.committed - p.before_commit),
                ms(p.lag),
                latency.unwrap_or(-1.0)
            ));
        }
    }
    if let Some(dir) = trace_dir {
        let file = format!("{dir}/latency-{}-{load}.csv", wakeup.name());
        if let Err(e) = std::fs::write(&file, trace) {
            eprintln!("  could not write {file}: {e}");
        }
    }
    for v in [&mut lat, &mut with_commit, &mut commits, &mut lags] {
        v.sort_by(f64::total_cmp);
    }
    Ok(LatencyRun {
        mode: String::new(),
        disk_pressure: false,
        snapshot_held: false,
        poll_interval_ms: u64::try_from(poll.as_millis()).unwrap_or(u64::MAX),
        min_poll_interval_ms: u64::try_from(min_poll.as_millis()).unwrap_or(u64::MAX),
        offered_per_s: load,
        achieved_per_s: round(produced.len() as f64 / elapsed, 0),
        measured: lat.len(),
        missing,
        p50_ms: round(percentile(&lat, 0.50), 2),
        p90_ms: round(percentile(&lat, 0.90), 2),
        p99_ms: round(percentile(&lat, 0.99), 2),
        max_ms: round(lat.last().copied().unwrap_or(0.0), 2),
        schedule_lag_p99_ms: round(percentile(&lags, 0.99), 2),
        p99_from_before_commit_ms: round(percentile(&with_commit, 0.99), 2),
        commit_p99_ms: round(percentile(&commits, 0.99), 2),
        relay: relay_profile,
        cpu,
    })
}
