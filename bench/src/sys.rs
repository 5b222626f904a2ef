//! What the machine did during a phase, from `/proc`: CPU seconds of this
//! process, of the servers (by process name) and of everything else, and
//! this process's memory.

use std::collections::BTreeMap;
use std::time::Instant;

/// Linux reports process times in USER_HZ ticks, 100 per second.
const TICKS_PER_SEC: f64 = 100.0;

/// A moment's CPU counters.
#[derive(Clone, Debug)]
pub struct CpuSample {
    at: Instant,
    busy: u64,
    total: u64,
    by_group: BTreeMap<&'static str, u64>,
}

/// The group a process belongs to, by its command name.
fn group(comm: &str, pid: u32, me: u32) -> &'static str {
    if pid == me {
        return "bench";
    }
    match comm {
        "postgres" | "postmaster" => "postgres",
        "nats-server" => "nats",
        "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => "rabbitmq",
        "redis-server" => "redis",
        "mariadbd" | "mysqld" => "mariadb",
        _ => "other",
    }
}

fn read_ticks(stat: &str) -> Option<(String, u64)> {
    // pid (comm) state ppid ... field 14 utime, 15 stime (1-based).
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// Reads the counters now. Processes that vanish meanwhile are skipped.
pub fn sample() -> CpuSample {
    let me = std::process::id();
    let mut by_group: BTreeMap<&'static str, u64> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((comm, ticks)) = read_ticks(&stat) {
                *by_group.entry(group(&comm, pid, me)).or_default() += ticks;
            }
        }
    }
    let (busy, total) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            Some((total.saturating_sub(idle), total))
        })
        .unwrap_or((0, 0));
    CpuSample {
        at: Instant::now(),
        busy,
        total,
        by_group,
    }
}

/// CPU use between two samples.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CpuUse {
    /// Wall seconds.
    pub wall_s: f64,
    /// Share of all cores busy, in percent.
    pub machine_busy_pct: f64,
    /// CPU seconds by group: `bench` (this process: relay, clients and, for
    /// Kafka, the mock cluster), `postgres`, the brokers, `other` (anything
    /// else on the machine, e.g. other builds).
    pub cpu_s: BTreeMap<String, f64>,
}

impl CpuUse {
    /// From `a` to `b`.
    pub fn between(a: &CpuSample, b: &CpuSample) -> CpuUse {
        let total = b.total.saturating_sub(a.total) as f64;
        let busy = b.busy.saturating_sub(a.busy) as f64;
        let mut cpu_s = BTreeMap::new();
        for (g, t) in &b.by_group {
            let before = a.by_group.get(g).copied().unwrap_or(0);
            // Processes that exited meanwhile make a group shrink: clamp.
            let d = t.saturating_sub(before) as f64 / TICKS_PER_SEC;
            if d > 0.0 {
                cpu_s.insert(g.to_string(), round(d, 2));
            }
        }
        CpuUse {
            wall_s: round(b.at.duration_since(a.at).as_secs_f64(), 3),
            machine_busy_pct: if total > 0.0 {
                round(100.0 * busy / total, 1)
            } else {
                0.0
            },
            cpu_s,
        }
    }

    /// CPU seconds of one group.
    pub fn of(&self, group: &str) -> f64 {
        self.cpu_s.get(group).copied().unwrap_or(0.0)
    }
}

/// `VmHWM` and `VmRSS` of this process, in KiB.
pub fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Rounds to `digits` decimals.
pub fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}
