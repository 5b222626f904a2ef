//! Command-line options.

use std::path::PathBuf;
use std::time::Duration;

use crate::brokers::Broker;

/// The usage text printed by `--help`.
pub const USAGE: &str = "\
outbox-bench: relay throughput, latency, enqueue cost, scale and memory
against a naive baseline and the raw limits of the database and each broker,
and the relay on PostgreSQL, MariaDB and SQLite.

USAGE:
    cargo run --release -p outbox-bench -- [--quick] [OPTIONS]

OPTIONS:
    --quick               smaller sizes and shorter phases (a few minutes)
    --messages N          backlog drained per broker (default 100000, quick 20000)
    --payload BYTES       payload size (default 200)
    --big-backlog N       the large backlog of the growth test (default 1000000, quick 200000)
    --small-backlog N     the small backlog of the growth test (default 10000)
    --small-runs N        drains of the small backlog, around the large one; the median is
                          reported (default 5, quick 3)
    --batch N             relay batch size (default 1000)
    --keys N              distinct message keys, assigned round-robin; 0 = keyless (default 1000)
    --pairs N             database-limit runs, each right before a drain of our relay, per broker;
                          the ratio to the database limit is the median pair's (default 3, quick 1)
    --naive-secs S        how long the naive baseline runs per broker (default 20, quick 5)
    --latency-secs S      duration of each latency run (default 15, quick 5)
    --enqueue-secs S      duration of each enqueue-cost run (default 8, quick 3)
    --loads A,B           offered loads in tx/s for the latency runs (default 1000,5000)
    --brokers LIST        subset of jetstream,nats-core,rabbitmq,kafka-mock,redis-streams
    --only LIST           run only these phases: throughput,latency,enqueue,scale,growth,memory,stores
    --out DIR             where latest.json / latest.svg go (default bench/results)
    -h, --help            this text

SERVERS (environment, defaults are the local servers):
    OUTBOX_PG_URL     postgres://postgres@127.0.0.1:5432/test
    OUTBOX_MYSQL_URL  mysql://root@127.0.0.1:3306/test (the stores phase)
    OUTBOX_NATS_URL   nats://127.0.0.1:4222
    OUTBOX_AMQP_URL   amqp://guest:guest@127.0.0.1:5672/%2f
    OUTBOX_REDIS_URL  redis://127.0.0.1:6379
    Kafka is librdkafka's in-process mock cluster.

DIAGNOSTICS (environment):
    OUTBOX_BENCH_TRACE DIR  each latency run writes every message's timings to
                            DIR/latency-<wakeup>-<load>.csv (when its COMMIT began,
                            how long it took, producer lag, latency)
    OUTBOX_BENCH_DISK_PRESSURE DIR  during each latency run, write and flush 256 MiB
                            in DIR every 1.5 s (DIR on the database's disk: its
                            commits then stall as on a machine with a slow disk)
    OUTBOX_BENCH_HOLD_SNAPSHOT 1    hold a REPEATABLE READ snapshot open through each
                            latency run (as a long report or pg_dump would)
";

/// Every phase, in the order they run.
pub const PHASES: &[&str] = &[
    "throughput",
    "latency",
    "enqueue",
    "scale",
    "growth",
    "memory",
    "stores",
];

/// What to run and how big.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Options {
    /// Quick mode (smaller sizes).
    pub quick: bool,
    /// Backlog per broker for the throughput phase.
    pub messages: usize,
    /// Payload bytes.
    pub payload: usize,
    /// The large backlog of the growth test.
    pub big_backlog: usize,
    /// The small backlog of the growth test.
    pub small_backlog: usize,
    /// Drains of the small backlog (the median one is reported).
    pub small_runs: usize,
    /// Relay batch size.
    pub batch: usize,
    /// Distinct keys (round-robin); 0 = keyless.
    pub keys: usize,
    /// Database-limit / relay-drain pairs per broker.
    pub pairs: usize,
    /// Time box of the naive baseline per broker.
    #[serde(with = "secs")]
    pub naive_time: Duration,
    /// Duration of one latency run.
    #[serde(with = "secs")]
    pub latency_time: Duration,
    /// Duration of one enqueue-cost run.
    #[serde(with = "secs")]
    pub enqueue_time: Duration,
    /// Offered loads of the latency runs (tx/s).
    pub loads: Vec<u32>,
    /// Brokers to measure.
    pub brokers: Vec<Broker>,
    /// Phases to run.
    pub phases: Vec<String>,
    /// Output directory.
    pub out: PathBuf,
    /// PostgreSQL URL.
    #[serde(skip)]
    pub pg_url: String,
    /// MySQL / MariaDB URL (the stores phase).
    #[serde(skip)]
    pub mysql_url: String,
    /// NATS URL.
    #[serde(skip)]
    pub nats_url: String,
    /// RabbitMQ URL.
    #[serde(skip)]
    pub amqp_url: String,
    /// Redis URL.
    #[serde(skip)]
    pub redis_url: String,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

impl Options {
    /// Whether `phase` is to run.
    pub fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }
}

/// What the command line asked for.
pub enum Command {
    /// Print the usage.
    Help,
    /// Run the benchmark.
    Bench(Box<Options>),
    /// The relay child process of the memory phase (internal).
    Child(Vec<String>),
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn number<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.replace('_', "")
        .parse()
        .map_err(|_| format!("{flag}: {v:?} is not a valid number"))
}

fn seconds(flag: &str, v: Option<String>) -> Result<Duration, String> {
    let s: f64 = number(flag, v)?;
    if !(s.is_finite() && s > 0.0) {
        return Err(format!("{flag} must be more than 0"));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Parses the arguments (without the program name).
pub fn parse(args: Vec<String>) -> Result<Command, String> {
    if args.first().map(String::as_str) == Some("child-relay") {
        return Ok(Command::Child(args.into_iter().skip(1).collect()));
    }
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Options {
        quick,
        messages: if quick { 20_000 } else { 100_000 },
        payload: 200,
        big_backlog: if quick { 200_000 } else { 1_000_000 },
        small_backlog: 10_000,
        small_runs: if quick { 3 } else { 5 },
        batch: 1000,
        keys: 1000,
        pairs: if quick { 1 } else { 3 },
        naive_time: Duration::from_secs(if quick { 5 } else { 20 }),
        latency_time: Duration::from_secs(if quick { 5 } else { 15 }),
        enqueue_time: Duration::from_secs(if quick { 3 } else { 8 }),
        loads: vec![1000, 5000],
        brokers: Broker::ALL.to_vec(),
        phases: PHASES.iter().map(|s| s.to_string()).collect(),
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results")),
        pg_url: env_or("OUTBOX_PG_URL", "postgres://postgres@127.0.0.1:5432/test"),
        mysql_url: env_or("OUTBOX_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
        nats_url: env_or("OUTBOX_NATS_URL", "nats://127.0.0.1:4222"),
        amqp_url: env_or("OUTBOX_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        redis_url: env_or("OUTBOX_REDIS_URL", "redis://127.0.0.1:6379"),
    };
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--quick" => {}
            "--messages" => o.messages = number(&flag, it.next())?,
            "--payload" => o.payload = number(&flag, it.next())?,
            "--big-backlog" => o.big_backlog = number(&flag, it.next())?,
            "--small-backlog" => o.small_backlog = number(&flag, it.next())?,
            "--small-runs" => o.small_runs = number(&flag, it.next())?,
            "--batch" => o.batch = number(&flag, it.next())?,
            "--keys" => o.keys = number(&flag, it.next())?,
            "--pairs" => o.pairs = number(&flag, it.next())?,
            "--naive-secs" => o.naive_time = seconds(&flag, it.next())?,
            "--latency-secs" => o.latency_time = seconds(&flag, it.next())?,
            "--enqueue-secs" => o.enqueue_time = seconds(&flag, it.next())?,
            "--loads" => {
                let v = it.next().ok_or("--loads needs a value")?;
                o.loads = v
                    .split(',')
                    .map(|s| number::<u32>("--loads", Some(s.trim().to_string())))
                    .collect::<Result<_, _>>()?;
                if o.loads.contains(&0) {
                    return Err("--loads must be more than 0".into());
                }
            }
            "--brokers" => {
                let v = it.next().ok_or("--brokers needs a value")?;
                o.brokers = v
                    .split(',')
                    .map(|s| {
                        Broker::ALL
                            .iter()
                            .copied()
                            .find(|b| b.id() == s.trim())
                            .ok_or_else(|| format!("unknown broker {s:?}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--only" => {
                let v = it.next().ok_or("--only needs a value")?;
                o.phases = Vec::new();
                for p in v.split(',').map(str::trim) {
                    if !PHASES.contains(&p) {
                        return Err(format!("unknown phase {p:?}"));
                    }
                    o.phases.push(p.to_string());
                }
            }
            "--out" => o.out = PathBuf::from(it.next().ok_or("--out needs a value")?),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if o.messages == 0
        || o.batch == 0
        || o.small_backlog == 0
        || o.small_runs == 0
        || o.big_backlog == 0
        || o.pairs == 0
    {
        return Err("sizes must be more than 0".into());
    }
    Ok(Command::Bench(Box::new(o)))
}
