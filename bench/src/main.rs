//! `outbox-bench`: the relay benchmark of issue 8.
//!
//! Measures, in one run against the local servers: relay throughput from a
//! PostgreSQL backlog to each broker, a naive baseline (the reference
//! module's design), the raw limits of each broker and of the database,
//! commit-to-publish latency with NOTIFY and with polling, what the outbox
//! costs business transactions, several relays and a growing backlog, the
//! relay's peak memory, and the relay on MariaDB and SQLite. Prints a table, writes `latest.json` and
//! `latest.svg`. Asserts nothing about speed.
//!
//! ```text
//! cargo run --release -p outbox-bench -- --quick
//! ```

mod brokers;
mod db;
mod enqueue;
mod latency;
mod memory;
mod opts;
mod recorder;
mod report;
mod scale;
mod stores;
mod sys;
mod throughput;

use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::brokers::Brokers;
use crate::db::Db;
use crate::opts::{Command, Options};
use crate::recorder::Recorder;
use crate::report::Results;

/// Any error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A result with any error.
pub type BoxResult<T> = Result<T, BoxError>;

/// What every phase needs.
pub struct Ctx {
    /// Options.
    pub opts: Options,
    /// PostgreSQL.
    pub db: Db,
    /// Brokers.
    pub brokers: Brokers,
    /// The metrics recorder.
    pub rec: Recorder,
    /// The payload every message carries.
    pub payload: Bytes,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match opts::parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outbox-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outbox-bench: no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match command {
        Command::Help => {
            print!("{}", opts::USAGE);
            Ok(())
        }
        Command::Child(args) => runtime.block_on(memory::child(args)),
        Command::Bench(o) => runtime.block_on(bench(*o)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn log(started: Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
}

fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn bench(opts: Options) -> BoxResult<()> {
    let started = Instant::now();
    let rec = recorder::install();
    let u: String = (0..8).map(|_| fastrand::lowercase()).collect();
    let mut results = Results::default();
    results.meta.started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    results.meta.cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    results.meta.load_avg_start = sys::load_average();
    results.meta.commit = commit();
    if opts.quick {
        results.meta.notes.push(format!(
            "quick mode: smaller sizes (backlog {} per broker, big backlog {}, naive {:?}, \
             latency runs {:?}, enqueue runs {:?}); run without --quick for the full sizes",
            opts.messages, opts.big_backlog, opts.naive_time, opts.latency_time, opts.enqueue_time
        ));
    }
    log(started, &format!("connecting (run id {u})"));
    let db = Db::connect(&opts.pg_url, format!("bench_{u}")).await?;
    results.meta.postgres = sqlx::query_scalar::<_, String>("SHOW server_version")
        .fetch_one(&db.admin)
        .await
        .ok();
    results.meta.pg_round_trip_us = db.round_trip_us().await.ok().map(|v| sys::round(v, 1));
    let brokers = Brokers::setup(
        &opts.brokers,
        &u,
        &opts.nats_url,
        &opts.amqp_url,
        &opts.redis_url,
    )
    .await;
    for (b, why) in &brokers.unavailable {
        let note = format!("{} unavailable, skipped: {why}", b.label());
        log(started, &note);
        results.meta.notes.push(note);
    }
    let ctx = Ctx {
        payload: db::payload(opts.payload),
        opts,
        db,
        brokers,
        rec,
    };
    phases(&ctx, &mut results, started).await;

    log(started, "cleaning up");
    ctx.db.drop_all().await;
    let Ctx {
        opts, mut brokers, ..
    } = ctx;
    brokers.cleanup().await;

    results.meta.load_avg_end = sys::load_average();
    results.meta.total_secs = sys::round(started.elapsed().as_secs_f64(), 1);
    let (hwm, _) = sys::memory_kib();
    if let Some(m) = &mut results.memory {
        m.bench_process_peak_rss_mib = sys::round(hwm as f64 / 1024.0, 1);
    }
    results.meta.options = Some(opts.clone());
    results.evaluate();

    let table = results.table();
    println!("{table}");
    std::fs::create_dir_all(&opts.out)?;
    let json = opts.out.join("latest.json");
    let svg = opts.out.join("latest.svg");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    std::fs::write(&svg, results.svg())?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

async fn phases(ctx: &Ctx, results: &mut Results, started: Instant) {
    let o = &ctx.opts;
    let fail = |results: &mut Results, what: &str, e: BoxError| {
        let line = format!("{what}: {e}");
        eprintln!("  FAILED {line}");
        results.errors.push(line);
    };

    if o.runs("throughput") {
        log(started, "database claim + settle limit");
        match throughput::db_limit(ctx).await {
            Ok(l) => results.db_limit = Some(l),
            Err(e) => fail(results, "db limit", e),
        }
        log(started, "relay with no broker (null transport)");
        match throughput::relay_no_broker(ctx).await {
            Ok(d) => results.relay_no_broker = Some(d),
            Err(e) => fail(results, "relay with no broker", e),
        }
        let db_limit = results.db_limit.as_ref().map(|l| l.msg_per_s);
        for &b in &o.brokers {
            if let Some(why) = ctx.brokers.why(b) {
                fail(results, b.label(), why.to_string().into());
                continue;
            }
            log(started, &format!("throughput: {}", b.label()));
            let r = throughput::broker(ctx, b, db_limit).await;
            results.brokers.push(r);
        }
    }

    if o.runs("latency") {
        for wakeup in latency::Wakeup::ALL {
            for &load in &o.loads {
                let mode = wakeup.name();
                log(started, &format!("latency: {mode}, {load} tx/s"));
                match latency::run(ctx, wakeup, load).await {
                    Ok(r) => {
                        eprintln!(
                            "  p50 {:.2} ms, p99 {:.2} ms, achieved {:.0}/s",
                            r.p50_ms, r.p99_ms, r.achieved_per_s
                        );
                        results.latency.push(r);
                    }
                    Err(e) => fail(results, &format!("latency {mode} {load}"), e),
                }
            }
        }
    }

    if o.runs("enqueue") {
        log(started, "enqueue cost");
        match enqueue::run(ctx).await {
            Ok(r) => results.enqueue = Some(r),
            Err(e) => fail(results, "enqueue cost", e),
        }
    }

    let redis = ctx.brokers.available(brokers::Broker::Redis);
    if o.runs("scale") && redis {
        for k in [1, 2, 4] {
            log(started, &format!("scale: {k} relay(s)"));
            match scale::relays(ctx, k).await {
                Ok(r) => {
                    eprintln!("  {:.0} msg/s", r.msg_per_s);
                    results.scale.push(r);
                }
                Err(e) => fail(results, &format!("scale {k}"), e),
            }
        }
        if let Some(one) = results.scale.first().map(|r| r.msg_per_s) {
            for r in &mut results.scale {
                r.speedup = if one > 0.0 {
                    sys::round(r.msg_per_s / one, 2)
                } else {
                    0.0
                };
            }
        }
    }

    if o.runs("growth") && redis {
        // A small drain lasts about a tenth of a second, so one alone swings
        // with the machine: drain it several times, half before and half
        // after the large backlog, and report the median.
        let before = o.small_runs.div_ceil(2);
        let plan = std::iter::repeat_n(false, before)
            .chain([true])
            .chain(std::iter::repeat_n(false, o.small_runs - before));
        let mut small: Vec<scale::GrowthRun> = Vec::new();
        let mut big = None;
        for is_big in plan {
            let rows = if is_big {
                o.big_backlog
            } else {
                o.small_backlog
            };
            log(started, &format!("growth: backlog of {rows}"));
            match scale::growth(ctx, rows).await {
                Ok(r) => {
                    eprintln!(
                        "  {:.0} msg/s (first 10k {:.0}, last 10k {:.0})",
                        r.msg_per_s, r.first_10k_msg_per_s, r.last_10k_msg_per_s
                    );
                    if is_big {
                        big = Some(r);
                    } else {
                        small.push(r);
                    }
                }
                Err(e) => fail(results, &format!("growth {rows}"), e),
            }
        }
        let rates: Vec<f64> = small.iter().map(|r| r.msg_per_s).collect();
        small.sort_by(|a, b| a.msg_per_s.total_cmp(&b.msg_per_s));
        if !small.is_empty() {
            let mut median = small.swap_remove(small.len() / 2);
            median.runs_msg_per_s = rates;
            results.growth.push(median);
        }
        if let Some(mut r) = big {
            r.runs_msg_per_s = vec![r.msg_per_s];
            results.growth.push(r);
        }
    }

    if o.runs("memory") && redis {
        log(started, "memory: relay in a child process");
        match memory::run(ctx).await {
            Ok(m) => results.memory = Some(m),
            Err(e) => fail(results, "memory", e),
        }
    }
    if o.runs("stores") {
        log(
            started,
            "stores: the relay on PostgreSQL, MariaDB and SQLite (null transport)",
        );
        for r in stores::run(ctx).await {
            match r {
                Ok(d) => results.stores.push(d),
                Err((store, e)) => fail(results, &format!("stores {store}"), e),
            }
        }
    }
    if !redis && (o.runs("scale") || o.runs("growth") || o.runs("memory")) {
        results
            .meta
            .notes
            .push("scale, growth and memory need Redis: skipped".into());
    }
}
