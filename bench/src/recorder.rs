//! A small `metrics` recorder that keeps every histogram sample and counter
//! of the relay in memory (labels aggregated by metric name), so that each
//! phase can read where the relay spent its time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata,
    SharedString, Unit,
};
use outbox_core::metrics as names;

#[derive(Default)]
struct Cell {
    counter: AtomicU64,
    samples: Mutex<Vec<f64>>,
}

impl Cell {
    fn samples(&self) -> MutexGuard<'_, Vec<f64>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.counter.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.counter.fetch_max(value, Ordering::Relaxed);
    }
}

impl HistogramFn for Cell {
    fn record(&self, value: f64) {
        self.samples().push(value);
    }
}

struct Ignore;

impl GaugeFn for Ignore {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, _: f64) {}
}

/// The recorder; clones share the same storage.
#[derive(Clone, Default)]
pub struct Recorder {
    cells: Arc<Mutex<HashMap<String, Arc<Cell>>>>,
}

impl Recorder {
    fn cell(&self, name: &str) -> Arc<Cell> {
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        cells
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Cell::default()))
            .clone()
    }

    /// Zeroes every counter and forgets every sample.
    pub fn reset(&self) {
        let cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        for c in cells.values() {
            c.counter.store(0, Ordering::Relaxed);
            c.samples().clear();
        }
    }

    /// The value of a counter (all labels summed).
    pub fn counter(&self, name: &str) -> u64 {
        self.cell(name).counter.load(Ordering::Relaxed)
    }

    /// The samples of a histogram, in recording order.
    pub fn samples(&self, name: &str) -> Vec<f64> {
        self.cell(name).samples().clone()
    }

    /// Where the relay spent its time since the last reset.
    pub fn profile(&self) -> Profile {
        Profile {
            claim: Series::of(&self.samples(names::CLAIM_DURATION)),
            publish: Series::of(&self.samples(names::PUBLISH_DURATION)),
            settle: Series::of(&self.samples(names::SETTLE_DURATION)),
            batch_size: Series::of(&self.samples(names::BATCH_SIZE)),
            commit_to_publish: Series::of(&self.samples(names::COMMIT_TO_PUBLISH)),
            published: self.counter(names::PUBLISHED),
            failed: self.counter(names::FAILED),
            lease_lost: self.counter(names::LEASE_LOST),
            store_errors: self.counter(names::STORE_ERRORS),
        }
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key.name()))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(Ignore))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.cell(key.name()))
    }
}

static GLOBAL: OnceLock<Recorder> = OnceLock::new();

/// Installs the recorder (once) and returns it.
pub fn install() -> Recorder {
    GLOBAL
        .get_or_init(|| {
            let r = Recorder::default();
            if metrics::set_global_recorder(r.clone()).is_err() {
                eprintln!(
                    "outbox-bench: another metrics recorder is installed; profiles will be empty"
                );
            }
            r
        })
        .clone()
}

/// Summary of a series of samples (seconds, or messages for batch sizes).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Series {
    /// How many samples.
    pub count: usize,
    /// Their sum.
    pub sum: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Series {
    /// Summarises `samples`.
    pub fn of(samples: &[f64]) -> Series {
        if samples.is_empty() {
            return Series::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let sum: f64 = s.iter().sum();
        Series {
            count: s.len(),
            sum,
            mean: sum / s.len() as f64,
            p50: percentile(&s, 0.50),
            p99: percentile(&s, 0.99),
            max: s[s.len() - 1],
        }
    }
}

/// The `q` quantile of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// What the relay's own metrics say about a phase.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Profile {
    /// `outbox_claim_duration_seconds`.
    pub claim: Series,
    /// `outbox_publish_duration_seconds`.
    pub publish: Series,
    /// `outbox_settle_duration_seconds`.
    pub settle: Series,
    /// `outbox_batch_size`.
    pub batch_size: Series,
    /// `outbox_commit_to_publish_seconds`.
    pub commit_to_publish: Series,
    /// `outbox_published_total`.
    pub published: u64,
    /// `outbox_failed_total`.
    pub failed: u64,
    /// `outbox_lease_lost_total`.
    pub lease_lost: u64,
    /// `outbox_store_errors_total`.
    pub store_errors: u64,
}
