//! A broker restart drill for adapter tests: publish a stream of messages
//! through a transport, like a relay would, while the broker is stopped and
//! started again, and report what the transport said.
//!
//! The drill checks the transport's side (failures are transient, every
//! message is acknowledged after retries); the caller then reads the broker
//! to check that every acknowledged message was stored.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::message::{Message, MessageId};
use crate::transport::Transport;

/// Starts or stops a server: `control("stop" | "start", server)`, true on
/// success (blocking; it runs on a blocking thread).
pub type Control = fn(&str, &str) -> bool;

/// How to run a [`restart_drill`].
#[derive(Clone, Copy, Debug)]
pub struct RestartDrill {
    /// The server's name, as `control` knows it.
    pub server: &'static str,
    /// Stops and starts the server.
    pub control: Control,
    /// How long the server stays down once stopped.
    pub down_for: Duration,
    /// Messages handed out per round while the server is being stopped, so
    /// that some are in flight when it goes away.
    pub trickle: usize,
    /// A pause after each call while the server is being stopped.
    pub pause_while_stopping: Duration,
    /// The whole drill fails after this long.
    pub timeout: Duration,
}

/// What a [`restart_drill`] saw.
#[derive(Debug, Default)]
pub struct DrillReport {
    /// Messages the transport acknowledged (after retries).
    pub acked: HashSet<MessageId>,
    /// Failed attempts, all transient.
    pub failures: usize,
    /// Failed attempts by error kind.
    pub errors: HashMap<String, usize>,
    /// Calls with both acknowledged and failed messages.
    pub mixed_batches: usize,
    /// Acknowledged messages per second before the stop.
    pub before_rate: f64,
    /// The whole drill.
    pub elapsed: Duration,
    /// From the server being up again to the end.
    pub after_restart: Duration,
}

#[derive(Debug, PartialEq)]
enum Phase {
    Before,
    Stopping,
    Down,
    Starting,
    After,
}

const CHUNK: usize = 250;
const BATCH: usize = 500;
/// How long failed messages wait before they are published again.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// Whether a stop or start command ran and succeeded (false when none ran).
async fn finished(command: Option<tokio::task::JoinHandle<bool>>) -> bool {
    match command {
        Some(c) => c.await.unwrap_or(false),
        None => false,
    }
}

/// Publishes `all` through `transport` in calls of up to 500, retrying failed
/// messages 200 ms later, while the server is stopped (after a third went
/// out) and started again. Panics if an error is not transient, if a server
/// command fails, or after the timeout; asserts that every message was
/// acknowledged and that the outage caused failures.
pub async fn restart_drill(
    transport: &dyn Transport,
    all: &[Message],
    drill: RestartDrill,
) -> DrillReport {
    let total = all.len();
    let server = drill.server;
    let control = drill.control;
    let mut report = DrillReport::default();
    let mut released = 0;
    let mut pending: Vec<Message> = Vec::new();
    let mut phase = Phase::Before;
    let mut command: Option<tokio::task::JoinHandle<bool>> = None;
    let mut down_since = Instant::now();
    let mut restarted_at = Instant::now();
    let mut cap = total;
    let started = Instant::now();
    let done =
        |c: &Option<tokio::task::JoinHandle<bool>>| c.as_ref().is_some_and(|c| c.is_finished());

    loop {
        assert!(
            started.elapsed() < drill.timeout,
            "not done after {:?}: {} acknowledged, phase {phase:?}",
            drill.timeout,
            report.acked.len()
        );
        if released < total.min(cap) {
            let chunk = if phase == Phase::Stopping {
                drill.trickle
            } else {
                CHUNK
            };
            let end = (released + chunk).min(total.min(cap));
            pending.extend_from_slice(&all[released..end]);
            released = end;
        }
        match phase {
            Phase::Before if released >= total / 3 => {
                report.before_rate = report.acked.len() as f64 / started.elapsed().as_secs_f64();
                // Hold the rest back until the server is down, so that some
                // messages meet the outage.
                cap = released + 2_500;
                command = Some(tokio::task::spawn_blocking(move || control("stop", server)));
                phase = Phase::Stopping;
            }
            Phase::Stopping if done(&command) => {
                let ok = finished(command.take()).await;
                assert!(ok, "{server} did not stop");
                down_since = Instant::now();
                cap = released + 1_000;
                phase = Phase::Down;
            }
            Phase::Down if down_since.elapsed() > drill.down_for => {
                command = Some(tokio::task::spawn_blocking(move || {
                    control("start", server)
                }));
                phase = Phase::Starting;
            }
            Phase::Starting if done(&command) => {
                let ok = finished(command.take()).await;
                assert!(ok, "{server} did not start");
                println!("{server} restarted after {:?} down", down_since.elapsed());
                restarted_at = Instant::now();
                cap = total;
                phase = Phase::After;
            }
            _ => {}
        }
        if pending.is_empty() {
            if released == total && phase == Phase::After {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        // Like a relay: one call per batch, failed messages retried later.
        let take = pending.len().min(BATCH);
        let batch: Vec<Message> = pending.drain(..take).collect();
        let results = transport.publish_batch(&batch).await;
        assert_eq!(results.len(), batch.len());
        if results.iter().any(Result::is_ok) && results.iter().any(Result::is_err) {
            report.mixed_batches += 1;
        }
        if phase == Phase::Stopping && !drill.pause_while_stopping.is_zero() {
            tokio::time::sleep(drill.pause_while_stopping).await;
        }
        let mut failed = Vec::new();
        for (m, r) in batch.into_iter().zip(results) {
            match r {
                Ok(()) => {
                    report.acked.insert(m.id);
                }
                Err(e) => {
                    assert!(
                        e.is_transient(),
                        "a restart must only cause transient errors: {e}"
                    );
                    *report.errors.entry(format!("{:?}", e.kind())).or_default() += 1;
                    report.failures += 1;
                    failed.push(m);
                }
            }
        }
        if !failed.is_empty() {
            failed.append(&mut pending);
            pending = failed;
            // The retry backoff of a relay; the loop's deadline bounds it.
            tokio::time::sleep(RETRY_BACKOFF).await;
        }
    }
    report.elapsed = started.elapsed();
    report.after_restart = restarted_at.elapsed();
    assert_eq!(report.acked.len(), total, "every message acknowledged");
    assert!(
        report.failures > 0,
        "the restart happened while messages were in flight"
    );
    report
}
