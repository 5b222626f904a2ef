//! The results: the JSON document, the printed table, the targets of issue
//! 8 and a hand-written SVG chart.

use std::fmt::Write as _;

use crate::enqueue::EnqueueCost;
use crate::latency::LatencyRun;
use crate::memory::Memory;
use crate::opts::Options;
use crate::recorder::Profile;
use crate::scale::{GrowthRun, ScaleRun};
use crate::stores::StoreDrain;
use crate::sys::round;
use crate::throughput::{BrokerResult, DbLimit, Drain};

/// About the run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Meta {
    /// When it started (Unix seconds).
    pub started_unix: u64,
    /// Wall seconds of the whole run.
    pub total_secs: f64,
    /// CPU cores.
    pub cores: usize,
    /// 1-minute load average at start and at the end.
    pub load_avg_start: f64,
    /// At the end.
    pub load_avg_end: f64,
    /// The commit the workspace was at (if git is there).
    pub commit: Option<String>,
    /// PostgreSQL version.
    pub postgres: Option<String>,
    /// Mean `SELECT 1` round trip on loopback (µs).
    pub pg_round_trip_us: Option<f64>,
    /// Options of the run.
    pub options: Option<Options>,
    /// Remarks (quick mode, unavailable brokers, ...).
    pub notes: Vec<String>,
}

/// A target from issue 8 and whether this run met it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Target {
    /// What.
    pub target: String,
    /// Measured.
    pub value: String,
    /// Met?
    pub met: bool,
}

/// Everything.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Results {
    /// About the run.
    pub meta: Meta,
    /// Database claim + settle limit.
    pub db_limit: Option<DbLimit>,
    /// The relay with a transport that acknowledges at once.
    pub relay_no_broker: Option<Drain>,
    /// Per broker.
    pub brokers: Vec<BrokerResult>,
    /// Latency runs.
    pub latency: Vec<LatencyRun>,
    /// Enqueue cost.
    pub enqueue: Option<EnqueueCost>,
    /// 1, 2, 4 relays.
    pub scale: Vec<ScaleRun>,
    /// Small vs large backlog.
    pub growth: Vec<GrowthRun>,
    /// Peak RSS.
    pub memory: Option<Memory>,
    /// The relay on each store (null transport).
    pub stores: Vec<StoreDrain>,
    /// Targets of issue 8.
    pub targets: Vec<Target>,
    /// Phases that failed.
    pub errors: Vec<String>,
}

fn fmt_rate(v: f64) -> String {
    if v >= 100.0 {
        let v = v.round() as u64;
        let s = v.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{v:.1}")
    }
}

fn opt_rate(v: Option<f64>) -> String {
    v.map_or("-".into(), fmt_rate)
}

fn opt_ratio(v: Option<f64>) -> String {
    v.map_or("-".into(), |r| format!("{r:.2}"))
}

fn ms(s: f64) -> f64 {
    round(s * 1e3, 2)
}

impl Results {
    /// Evaluates the issue's targets.
    pub fn evaluate(&mut self) {
        let mut t = Vec::new();
        for b in &self.brokers {
            let (rel, limit, min) = if b.broker == "rabbitmq" {
                ("broker", b.ratio_vs_broker_limit, 0.8)
            } else if b.broker == "nats-core" {
                continue;
            } else {
                ("database", b.ratio_vs_db_limit, 0.9)
            };
            if let Some(r) = limit {
                t.push(Target {
                    target: format!("{}: relay >= {min} x the {rel} limit", b.label),
                    value: format!("{r:.2} x"),
                    met: r >= min,
                });
            }
        }
        for b in &self.brokers {
            if let Some(r) = b.ratio_vs_baseline {
                t.push(Target {
                    target: format!("{}: relay >= 50 x naive", b.label),
                    value: format!("{r:.1} x"),
                    met: r >= 50.0,
                });
            }
        }
        // The fixed-interval row is there for comparison: its latency is
        // the poll interval by design.
        for l in self
            .latency
            .iter()
            .filter(|l| l.offered_per_s == 1000 && l.mode != "polling-fixed")
        {
            t.push(Target {
                target: format!("p99 commit-to-publish < 10 ms at 1,000 msg/s ({})", l.mode),
                value: format!("{:.2} ms", l.p99_ms),
                met: l.p99_ms < 10.0 && l.missing == 0,
            });
        }
        if let Some(e) = &self.enqueue {
            t.push(Target {
                target: "outbox insert costs < 10 % of business throughput".into(),
                value: format!("{:.1} %", e.outbox_cost_pct),
                met: e.outbox_cost_pct < 10.0,
            });
            t.push(Target {
                target: "outbox row in the business statement (enqueue_with) costs < 10 %".into(),
                value: format!("{:.1} %", e.in_statement_cost_pct),
                met: e.in_statement_cost_pct < 10.0,
            });
        }
        if let (Some(small), Some(big)) = (self.growth.first(), self.growth.last()) {
            if self.growth.len() > 1 && small.msg_per_s > 0.0 {
                let r = big.msg_per_s / small.msg_per_s;
                t.push(Target {
                    target: format!(
                        "flat drain throughput {} -> {} rows (>= 0.9 x)",
                        fmt_rate(small.rows as f64),
                        fmt_rate(big.rows as f64)
                    ),
                    value: format!("{r:.2} x"),
                    met: r >= 0.9,
                });
            }
        }
        if let Some(m) = &self.memory {
            t.push(Target {
                target: "relay peak RSS < 64 MiB".into(),
                value: format!("{:.1} MiB", m.relay_peak_rss_mib),
                met: m.relay_peak_rss_mib < 64.0,
            });
        }
        self.targets = t;
    }

    /// The human-readable report.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let m = &self.meta;
        let _ = writeln!(
            s,
            "outbox-bench {} | {} cores | load avg {:.2} -> {:.2} | PostgreSQL {} | round trip {} µs | commit {}",
            if m.options.as_ref().is_some_and(|o| o.quick) { "--quick" } else { "(full)" },
            m.cores,
            m.load_avg_start,
            m.load_avg_end,
            m.postgres.as_deref().unwrap_or("?"),
            m.pg_round_trip_us.map_or("?".into(), |v| format!("{v:.0}")),
            m.commit.as_deref().unwrap_or("?"),
        );
        if let Some(o) = &m.options {
            let _ = writeln!(
                s,
                "backlog {} msgs/broker, payload {} B, batch {}, keys {}, naive time box {:?}",
                fmt_rate(o.messages as f64),
                o.payload,
                o.batch,
                o.keys,
                o.naive_time
            );
        }
        for n in &m.notes {
            let _ = writeln!(s, "note: {n}");
        }

        // Dropped again below when the throughput phase did not run.
        let throughput_at = s.len();
        let _ = writeln!(s, "\n1-3. Relay throughput (msg/s)");
        let _ = writeln!(
            s,
            "| broker | ours | ours, tuned transport* | naive | transport limit | raw client limit | DB limit | ours/naive | ours/min(limits) |"
        );
        let _ = writeln!(
            s,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for b in &self.brokers {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                b.label,
                opt_rate(b.ours.as_ref().map(|d| d.msg_per_s)),
                opt_rate(b.ours_tuned.as_ref().map(|d| d.msg_per_s)),
                opt_rate(b.naive.as_ref().map(|d| d.msg_per_s)),
                opt_rate(b.transport_limit_msg_per_s),
                opt_rate(b.raw_limit_msg_per_s),
                opt_rate(b.db_limit_msg_per_s),
                opt_ratio(b.ratio_vs_baseline),
                opt_ratio(b.ratio_vs_limit),
            );
        }
        if let Some(d) = &self.relay_no_broker {
            let _ = writeln!(
                s,
                "| (no broker: relay + null transport) | {} | | | | | {} | | {} |",
                fmt_rate(d.msg_per_s),
                opt_rate(self.db_limit.as_ref().map(|l| l.msg_per_s)),
                opt_ratio(
                    self.db_limit
                        .as_ref()
                        .filter(|l| l.msg_per_s > 0.0)
                        .map(|l| round(d.msg_per_s / l.msg_per_s, 2))
                ),
            );
        }

        let pairs: Vec<String> = self
            .brokers
            .iter()
            .filter(|b| b.pairs.len() > 1)
            .map(|b| {
                let runs: Vec<String> = b
                    .pairs
                    .iter()
                    .map(|p| {
                        format!(
                            "{} -> {} ({:.2})",
                            fmt_rate(p.db_limit_msg_per_s),
                            fmt_rate(p.ours_msg_per_s),
                            p.ratio
                        )
                    })
                    .collect();
                format!("{}: {}", b.label, runs.join(", "))
            })
            .collect();
        if !pairs.is_empty() {
            let _ = writeln!(
                s,
                "DB limit and ours are the median of pairs (a DB-limit run right before each drain; DB limit -> ours (ratio)): {}",
                pairs.join("; ")
            );
        }
        let commits: Vec<String> = self
            .brokers
            .iter()
            .filter_map(|b| {
                b.naive
                    .as_ref()
                    .map(|n| format!("{} {}", b.label, fmt_rate(n.single_commits_per_s)))
            })
            .collect();
        if !commits.is_empty() {
            let _ = writeln!(
                s,
                "naive is bound by one fsync'd commit per message: 1-writer autocommit rate just before each naive run: {}",
                commits.join(", ")
            );
        }
        let tuned: Vec<String> = self
            .brokers
            .iter()
            .filter_map(|b| b.tuning.as_ref().map(|t| format!("{} {t}", b.label)))
            .collect();
        if !tuned.is_empty() {
            let _ = writeln!(s, "* diagnostic, not the headline: {}", tuned.join("; "));
        }
        let _ = writeln!(
            s,
            "\nProfile of our relay (per batch of up to {}: mean ms, share of the drain's wall time; CPU from /proc)",
            self.meta.options.as_ref().map_or(0, |o| o.batch)
        );
        let _ = writeln!(
            s,
            "| broker | claims | claim | publish | settle | other | CPU µs/msg: relay process / postgres | CPU s: bench / postgres / broker / other | machine busy |"
        );
        let _ = writeln!(
            s,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
        );
        let mut rows: Vec<(String, &Drain, &str)> = self
            .brokers
            .iter()
            .flat_map(|b| {
                let group = crate::brokers::Broker::ALL
                    .iter()
                    .find(|k| k.id() == b.broker)
                    .map_or("other", |k| k.cpu_group());
                let mut v: Vec<(String, &Drain, &str)> = Vec::new();
                if let Some(d) = &b.ours {
                    v.push((b.label.clone(), d, group));
                }
                if let Some(d) = &b.ours_tuned {
                    v.push((format!("{} (tuned*)", b.label), d, group));
                }
                v
            })
            .collect();
        if let Some(d) = &self.relay_no_broker {
            rows.push(("(no broker)".into(), d, "-"));
        }
        for (label, d, group) in rows {
            let _ = writeln!(s, "| {label} | {} |", profile_cells(&d.profile, d, group));
        }
        if let Some(l) = &self.db_limit {
            let _ = writeln!(
                s,
                "| (DB limit loop) | {} | {:.2} ({:.0} %) | - | {:.2} ({:.0} %) | | {:.1} / {:.1} | {:.1} / {:.1} / - / {:.1} | {:.0} % |",
                l.claim.count,
                ms(l.claim.mean),
                100.0 * l.claim.sum / l.secs.max(1e-9),
                ms(l.settle.mean),
                100.0 * l.settle.sum / l.secs.max(1e-9),
                per_msg_us(l.cpu.of("bench"), l.messages),
                per_msg_us(l.cpu.of("postgres"), l.messages),
                l.cpu.of("bench"),
                l.cpu.of("postgres"),
                l.cpu.of("other"),
                l.cpu.machine_busy_pct,
            );
        }
        if self.brokers.is_empty() && self.db_limit.is_none() && self.relay_no_broker.is_none() {
            s.truncate(throughput_at);
        }

        if !self.latency.is_empty() {
            let _ = writeln!(
                s,
                "\n4. Commit-to-publish latency (core NATS consumer; from COMMIT's return to arrival; \
                 'p99 with commit' from just before COMMIT)"
            );
            let _ = writeln!(
                s,
                "| wakeup | offered tx/s | achieved | p50 ms | p90 ms | p99 ms | max ms | p99 with commit ms | commit p99 ms | missing | producer lag p99 ms | relay errors |"
            );
            let _ = writeln!(
                s,
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            for l in &self.latency {
                let _ = writeln!(
                    s,
                    "| {} ({}{}{}) | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {} |",
                    l.mode,
                    if l.min_poll_interval_ms < l.poll_interval_ms {
                        format!("poll {}-{} ms", l.min_poll_interval_ms, l.poll_interval_ms)
                    } else {
                        format!("{} ms poll", l.poll_interval_ms)
                    },
                    if l.disk_pressure { ", disk pressure" } else { "" },
                    if l.snapshot_held { ", snapshot held" } else { "" },
                    fmt_rate(f64::from(l.offered_per_s)),
                    fmt_rate(l.achieved_per_s),
                    l.p50_ms,
                    l.p90_ms,
                    l.p99_ms,
                    l.max_ms,
                    l.p99_from_before_commit_ms,
                    l.commit_p99_ms,
                    l.missing,
                    l.schedule_lag_p99_ms,
                    l.relay.failed + l.relay.store_errors,
                );
            }
        }

        if let Some(e) = &self.enqueue {
            let _ = writeln!(
                s,
                "\n5. Enqueue cost ({} writers, 1 business INSERT per tx)",
                e.writers
            );
            let _ = writeln!(s, "| variant | tx/s | cost |");
            let _ = writeln!(s, "| --- | ---: | ---: |");
            let _ = writeln!(
                s,
                "| business row only | {} | - |",
                fmt_rate(e.plain_tx_per_s)
            );
            for (variant, rate, cost) in [
                ("+ outbox insert", e.outbox_tx_per_s, e.outbox_cost_pct),
                (
                    "+ outbox insert + NOTIFY",
                    e.outbox_notify_tx_per_s,
                    e.outbox_notify_cost_pct,
                ),
                (
                    "+ outbox insert + `wake` after commit (no relay waiting)",
                    e.outbox_wake_tx_per_s,
                    e.outbox_wake_cost_pct,
                ),
                (
                    "diagnostic: + the same row by a one-row INSERT ... VALUES",
                    e.raw_insert_tx_per_s,
                    e.raw_insert_cost_pct,
                ),
                (
                    "diagnostic: + `SELECT 1` instead (any second statement)",
                    e.select1_tx_per_s,
                    e.select1_cost_pct,
                ),
                (
                    "+ outbox row in the business INSERT's own statement (`enqueue_with`)",
                    e.in_statement_tx_per_s,
                    e.in_statement_cost_pct,
                ),
            ] {
                let _ = writeln!(s, "| {variant} | {} | {cost:.1} % |", fmt_rate(rate));
            }
        }

        if !self.scale.is_empty() || !self.growth.is_empty() {
            let _ = writeln!(s, "\n6. Scale (Redis Streams)");
        }
        if !self.scale.is_empty() {
            let _ = writeln!(s, "| relays | messages | msg/s | speedup | lease lost |");
            let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: |");
            for r in &self.scale {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.2} | {} |",
                    r.relays,
                    fmt_rate(r.messages as f64),
                    fmt_rate(r.msg_per_s),
                    r.speedup,
                    r.profile.lease_lost
                );
            }
        }
        if !self.growth.is_empty() {
            let _ = writeln!(
                s,
                "| backlog rows | table MB | msg/s | first 10k msg/s | last 10k msg/s | claim ms first/last tenth |"
            );
            let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: | ---: |");
            for g in &self.growth {
                let _ = writeln!(
                    s,
                    "| {} | {:.0} | {} | {} | {} | {:.2} / {:.2} |",
                    fmt_rate(g.rows as f64),
                    g.table_mb,
                    fmt_rate(g.msg_per_s),
                    fmt_rate(g.first_10k_msg_per_s),
                    fmt_rate(g.last_10k_msg_per_s),
                    ms(g.claim_first_tenth.mean),
                    ms(g.claim_last_tenth.mean),
                );
            }
            for g in self.growth.iter().filter(|g| g.runs_msg_per_s.len() > 1) {
                let runs: Vec<String> = g.runs_msg_per_s.iter().map(|r| fmt_rate(*r)).collect();
                let _ = writeln!(
                    s,
                    "Backlog of {}: {} drains, {} msg/s (the median one is shown).",
                    fmt_rate(g.rows as f64),
                    runs.len(),
                    runs.join(", ")
                );
            }
        }

        if let Some(mem) = &self.memory {
            let _ = writeln!(
                s,
                "\n7. Memory: relay peak RSS {:.1} MiB (end {:.1} MiB; {}; {} msg/s); whole benchmark process peak {:.1} MiB",
                mem.relay_peak_rss_mib,
                mem.relay_end_rss_mib,
                mem.note,
                fmt_rate(mem.msg_per_s),
                mem.bench_process_peak_rss_mib
            );
        }

        if !self.stores.is_empty() {
            let _ = writeln!(
                s,
                "\n8. The relay on each store (null transport; per batch of up to {}: mean ms)",
                self.meta.options.as_ref().map_or(0, |o| o.batch)
            );
            let _ = writeln!(
                s,
                "| store | server | messages | msg/s | claims | claim ms | settle ms | CPU s: bench / server |"
            );
            let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |");
            for st in &self.stores {
                let d = &st.drain;
                let server = match st.store.as_str() {
                    "postgres" => d.cpu.of("postgres"),
                    "mysql" => d.cpu.of("mariadb"),
                    _ => 0.0,
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1} / {} |",
                    st.store,
                    st.server
                        .split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" "),
                    fmt_rate(d.published as f64),
                    fmt_rate(d.msg_per_s),
                    d.profile.claim.count,
                    ms(d.profile.claim.mean),
                    ms(d.profile.settle.mean),
                    d.cpu.of("bench"),
                    if st.store == "sqlite" {
                        "- (in process)".to_string()
                    } else {
                        format!("{server:.1}")
                    }
                );
            }
        }

        if !self.targets.is_empty() {
            let _ = writeln!(s, "\nTargets (issue 8)");
            let _ = writeln!(s, "| target | measured | met |");
            let _ = writeln!(s, "| --- | ---: | :---: |");
            for t in &self.targets {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    t.target,
                    t.value,
                    if t.met { "yes" } else { "no" }
                );
            }
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        s
    }
}

fn per_msg_us(cpu_s: f64, messages: u64) -> f64 {
    if messages == 0 {
        0.0
    } else {
        cpu_s * 1e6 / messages as f64
    }
}

fn profile_cells(p: &Profile, d: &Drain, broker_group: &str) -> String {
    let wall = d.secs.max(1e-9);
    let other = (wall - p.claim.sum - p.publish.sum - p.settle.sum).max(0.0);
    let broker_cpu = if broker_group == "-" || broker_group == "bench" {
        "-".to_string()
    } else {
        format!("{:.1}", d.cpu.of(broker_group))
    };
    format!(
        "{} | {:.2} ({:.0} %) | {:.2} ({:.0} %) | {:.2} ({:.0} %) | {:.0} % | {:.1} / {:.1} | {:.1} / {:.1} / {} / {:.1} | {:.0} %",
        p.claim.count,
        ms(p.claim.mean),
        100.0 * p.claim.sum / wall,
        ms(p.publish.mean),
        100.0 * p.publish.sum / wall,
        ms(p.settle.mean),
        100.0 * p.settle.sum / wall,
        100.0 * other / wall,
        per_msg_us(d.cpu.of("bench"), d.published),
        per_msg_us(d.cpu.of("postgres"), d.published),
        d.cpu.of("bench"),
        d.cpu.of("postgres"),
        broker_cpu,
        d.cpu.of("other"),
        d.cpu.machine_busy_pct,
    )
}

// ---------------------------------------------------------------- SVG ---

const WIDTH: f64 = 1000.0;
const LABEL_W: f64 = 190.0;
const BAR_H: f64 = 13.0;

#[derive(Clone, Copy)]
enum Scale {
    Log { min: f64, max: f64 },
    Linear { max: f64 },
}

impl Scale {
    fn frac(self, v: f64) -> f64 {
        match self {
            Scale::Log { min, max } => {
                if v <= min {
                    0.0
                } else {
                    ((v.log10() - min.log10()) / (max.log10() - min.log10())).clamp(0.0, 1.0)
                }
            }
            Scale::Linear { max } => (v / max).clamp(0.0, 1.0),
        }
    }
    fn ticks(self) -> Vec<f64> {
        match self {
            Scale::Log { min, max } => {
                let mut t = Vec::new();
                let mut x = min;
                while x <= max * 1.0001 {
                    t.push(x);
                    x *= 10.0;
                }
                t
            }
            Scale::Linear { max } => {
                let step = nice_step(max / 5.0);
                (0..)
                    .map(|i| f64::from(i) * step)
                    .take_while(|v| *v <= max * 1.0001)
                    .collect()
            }
        }
    }
}

fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    let f = raw / p;
    let n = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * p
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

struct Panel<'a> {
    title: String,
    series: &'a [(&'a str, &'a str)],
    /// (group label, [(series index, value)]).
    groups: Vec<(String, Vec<(usize, f64)>)>,
    scale: Scale,
    unit: &'a str,
    /// A vertical marker (value, label).
    marker: Option<(f64, &'a str)>,
}

impl Panel<'_> {
    /// Draws at `y`; returns the height used.
    fn draw(&self, out: &mut String, y: f64) -> f64 {
        let x0 = LABEL_W;
        let w = WIDTH - LABEL_W - 80.0;
        let mut cy = y;
        let _ = writeln!(
            out,
            r#"<text x="10" y="{:.1}" font-size="15" font-weight="bold">{}</text>"#,
            cy + 15.0,
            esc(&self.title)
        );
        cy += 24.0;
        // Legend.
        let mut lx = x0;
        for (name, color) in self.series {
            let _ = writeln!(
                out,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
                cy,
                lx + 16.0,
                cy + 10.5,
                esc(name)
            );
            lx += 24.0 + 7.0 * name.len() as f64;
        }
        cy += 20.0;
        let top = cy;
        let bars: usize = self.groups.iter().map(|(_, b)| b.len().max(1)).sum();
        let height = bars as f64 * (BAR_H + 2.0) + self.groups.len() as f64 * 10.0;
        // Grid.
        for t in self.scale.ticks() {
            let x = x0 + w * self.scale.frac(t);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#666">{}</text>"##,
                top + height,
                top + height + 12.0,
                short(t)
            );
        }
        if let Some((v, label)) = self.marker {
            let x = x0 + w * self.scale.frac(v);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#c00" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" font-size="10" fill="#c00">{}</text>"##,
                top - 4.0,
                top + height,
                x + 3.0,
                top - 3.0,
                esc(label)
            );
        }
        for (label, values) in &self.groups {
            let gh = values.len().max(1) as f64 * (BAR_H + 2.0);
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end">{}</text>"#,
                x0 - 8.0,
                cy + gh / 2.0 + 4.0,
                esc(label)
            );
            for (i, v) in values {
                let color = self.series.get(*i).map_or("#999", |s| s.1);
                let bw = (w * self.scale.frac(*v)).max(1.0);
                let _ = writeln!(
                    out,
                    r#"<rect x="{x0:.1}" y="{cy:.1}" width="{bw:.1}" height="{BAR_H}" fill="{color}"><title>{}: {} {}</title></rect><text x="{:.1}" y="{:.1}" font-size="10">{} {}</text>"#,
                    esc(self.series.get(*i).map_or("", |s| s.0)),
                    short(*v),
                    self.unit,
                    x0 + bw + 4.0,
                    cy + BAR_H - 2.5,
                    short(*v),
                    self.unit
                );
                cy += BAR_H + 2.0;
            }
            if values.is_empty() {
                cy += BAR_H + 2.0;
            }
            cy += 10.0;
        }
        cy - y + 22.0
    }
}

fn log_bounds(values: impl Iterator<Item = f64>) -> Scale {
    let mut lo = f64::MAX;
    let mut hi = 0.0f64;
    for v in values.filter(|v| *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hi <= 0.0 {
        return Scale::Log {
            min: 1.0,
            max: 10.0,
        };
    }
    Scale::Log {
        min: 10f64.powf(lo.log10().floor()),
        max: 10f64.powf(hi.log10().ceil()),
    }
}

impl Results {
    /// The chart.
    pub fn svg(&self) -> String {
        let mut body = String::new();
        let mut y = 40.0;

        // Throughput.
        let series = [
            ("ours", "#1f77b4"),
            ("naive baseline", "#9e9e9e"),
            ("broker limit", "#ff7f0e"),
            ("DB claim+settle limit", "#2ca02c"),
        ];
        let mut groups = Vec::new();
        for b in &self.brokers {
            let mut v = Vec::new();
            for (i, x) in [
                b.ours.as_ref().map(|d| d.msg_per_s),
                b.naive.as_ref().map(|d| d.msg_per_s),
                b.broker_limit_msg_per_s,
                b.db_limit_msg_per_s,
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(x) = x {
                    v.push((i, x));
                }
            }
            groups.push((b.label.clone(), v));
        }
        if !groups.is_empty() {
            let scale = log_bounds(groups.iter().flat_map(|(_, v)| v.iter().map(|x| x.1)));
            y += Panel {
                title: "Relay throughput draining a PostgreSQL backlog (msg/s, log scale)".into(),
                series: &series,
                groups,
                scale,
                unit: "",
                marker: None,
            }
            .draw(&mut body, y);
        }

        // Latency.
        let lseries = [
            ("p50", "#9ecae1"),
            ("p90", "#4292c6"),
            ("p99", "#08519c"),
            ("max", "#bbbbbb"),
        ];
        let lgroups: Vec<(String, Vec<(usize, f64)>)> = self
            .latency
            .iter()
            .map(|l| {
                (
                    format!("{} @ {}/s", l.mode, fmt_rate(f64::from(l.offered_per_s))),
                    vec![(0, l.p50_ms), (1, l.p90_ms), (2, l.p99_ms), (3, l.max_ms)],
                )
            })
            .collect();
        if !lgroups.is_empty() {
            let scale = log_bounds(
                lgroups
                    .iter()
                    .flat_map(|(_, v)| v.iter().map(|x| x.1))
                    .chain([10.0]),
            );
            y += Panel {
                title: "Commit-to-publish latency at a core NATS consumer (ms from COMMIT's return, log scale)".into(),
                series: &lseries,
                groups: lgroups,
                scale,
                unit: "ms",
                marker: Some((10.0, "10 ms target")),
            }
            .draw(&mut body, y);
        }

        // Enqueue cost.
        if let Some(e) = &self.enqueue {
            let eseries = [("business tx/s, 16 writers", "#6a51a3")];
            let groups = vec![
                (
                    "business row alone".to_string(),
                    vec![(0, e.plain_tx_per_s)],
                ),
                (
                    format!("+ outbox ({:.0} %)", e.outbox_cost_pct),
                    vec![(0, e.outbox_tx_per_s)],
                ),
                (
                    format!("+ outbox, NOTIFY ({:.0} %)", e.outbox_notify_cost_pct),
                    vec![(0, e.outbox_notify_tx_per_s)],
                ),
                (
                    format!("+ outbox, wake ({:.0} %)", e.outbox_wake_cost_pct),
                    vec![(0, e.outbox_wake_tx_per_s)],
                ),
                (
                    format!("+ outbox in statement ({:.0} %)", e.in_statement_cost_pct),
                    vec![(0, e.in_statement_tx_per_s)],
                ),
                (
                    format!("+ SELECT 1 only ({:.0} %)", e.select1_cost_pct),
                    vec![(0, e.select1_tx_per_s)],
                ),
            ];
            let max = e
                .plain_tx_per_s
                .max(e.outbox_tx_per_s)
                .max(e.outbox_notify_tx_per_s)
                * 1.1;
            y += Panel {
                title: "Enqueue cost: business transactions per second".into(),
                series: &eseries,
                groups,
                scale: Scale::Linear { max: max.max(1.0) },
                unit: "",
                marker: Some((e.plain_tx_per_s * 0.9, "-10 %")),
            }
            .draw(&mut body, y);
        }

        // Scale and growth.
        let sseries = [("msg/s (Redis Streams)", "#17becf")];
        let mut sgroups: Vec<(String, Vec<(usize, f64)>)> = self
            .scale
            .iter()
            .map(|r| (format!("{} relay(s)", r.relays), vec![(0, r.msg_per_s)]))
            .collect();
        for g in &self.growth {
            sgroups.push((
                format!("backlog {}", short(g.rows as f64)),
                vec![(0, g.msg_per_s)],
            ));
        }
        if !sgroups.is_empty() {
            let max = sgroups
                .iter()
                .flat_map(|(_, v)| v.iter().map(|x| x.1))
                .fold(0.0, f64::max)
                * 1.15;
            y += Panel {
                title: "Scale: relays on one table, and backlog size".into(),
                series: &sseries,
                groups: sgroups,
                scale: Scale::Linear { max: max.max(1.0) },
                unit: "",
                marker: None,
            }
            .draw(&mut body, y);
        }

        let m = &self.meta;
        let subtitle = format!(
            "{} run, {} cores, load avg {:.1}→{:.1}, backlog {} msgs of {} B, batch {}{}",
            if m.options.as_ref().is_some_and(|o| o.quick) {
                "quick"
            } else {
                "full"
            },
            m.cores,
            m.load_avg_start,
            m.load_avg_end,
            m.options
                .as_ref()
                .map_or("?".into(), |o| fmt_rate(o.messages as f64)),
            m.options.as_ref().map_or(0, |o| o.payload),
            m.options.as_ref().map_or(0, |o| o.batch),
            self.memory.as_ref().map_or(String::new(), |mm| format!(
                ", relay peak RSS {:.1} MiB",
                mm.relay_peak_rss_mib
            )),
        );
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h:.0}" viewBox="0 0 {WIDTH} {h:.0}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="17" font-weight="bold">outbox relay benchmark</text>
<text x="10" y="36" font-size="12" fill="#555">{}</text>
{body}</svg>
"##,
            esc(&subtitle),
            h = y + 10.0
        )
    }
}
