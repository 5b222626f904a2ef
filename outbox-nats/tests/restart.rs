//! A NATS restart in the middle of 5,000 JetStream publishes: the transport
//! (built once) reports the failures as transient, recovers by itself, and
//! after retries every message is acknowledged and stored exactly once.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use outbox_core::{Message, MessageId, Transport};
use outbox_nats::{NatsConfig, NatsTransport, StreamSpec};

const TOTAL: usize = 5_000;
const CHUNK: usize = 250;
const BATCH: usize = 500;

#[derive(Debug, PartialEq)]
enum Phase {
    Before,
    Stopping,
    Down,
    Starting,
    After,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_acknowledged_and_stored_across_a_nats_restart() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let _guard = RestartGuard("nats");
    let u = unique();
    let stream = format!("OUTBOX_RESTART_{u}");
    let _cleanup = StreamCleanup(stream.clone());
    let topic = format!("restart{u}.orders");
    let config = NatsConfig::builder(NATS_URL)
        .ack_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
        .create_stream(StreamSpec::new(&stream, [format!("restart{u}.>")]))
        .build()
        .unwrap();
    let transport = NatsTransport::connect(config).await.unwrap();

    let all: Vec<Message> = (0..TOTAL)
        .map(|i| {
            Message::builder(&topic, format!("{{\"n\":{i}}}"))
                .key(format!("k{}", i % 97))
                .build()
                .unwrap()
        })
        .collect();
    let mut released = 0;
    let mut pending: Vec<Message> = Vec::new();
    let mut acked: HashSet<MessageId> = HashSet::new();
    let mut failures = 0usize;
    let mut mixed_batches = 0usize;
    let mut errors: HashMap<String, usize> = HashMap::new();
    let mut phase = Phase::Before;
    let mut control: Option<tokio::task::JoinHandle<bool>> = None;
    let mut down_since = Instant::now();
    let mut cap = TOTAL;
    let started = Instant::now();
    let mut before_rate = 0.0;

    loop {
        assert!(
            started.elapsed() < Duration::from_secs(100),
            "not done after 100 s: {} acknowledged, phase {phase:?}",
            acked.len()
        );
        if released < TOTAL.min(cap) {
            // While the server is being stopped, trickle messages out so that
            // some are in flight at the moment it goes away.
            let chunk = if phase == Phase::Stopping { 10 } else { CHUNK };
            let end = (released + chunk).min(TOTAL.min(cap));
            pending.extend_from_slice(&all[released..end]);
            released = end;
        }
        match phase {
            Phase::Before if released >= TOTAL / 3 => {
                before_rate = acked.len() as f64 / started.elapsed().as_secs_f64();
                // Hold the rest back until the server is down, so that some
                // messages meet the outage.
                cap = released + 2_500;
                control = Some(tokio::task::spawn_blocking(|| services("stop", "nats")));
                phase = Phase::Stopping;
            }
            Phase::Stopping if control.as_ref().is_some_and(|c| c.is_finished()) => {
                assert!(control.take().unwrap().await.unwrap(), "nats did not stop");
                down_since = Instant::now();
                cap = released + 1_000;
                phase = Phase::Down;
            }
            Phase::Down if down_since.elapsed() > Duration::from_secs(2) => {
                control = Some(tokio::task::spawn_blocking(|| services("start", "nats")));
                phase = Phase::Starting;
            }
            Phase::Starting if control.as_ref().is_some_and(|c| c.is_finished()) => {
                assert!(control.take().unwrap().await.unwrap(), "nats did not start");
                println!("nats restarted after {:?} down", down_since.elapsed());
                cap = TOTAL;
                phase = Phase::After;
            }
            _ => {}
        }
        if pending.is_empty() {
            if released == TOTAL && phase == Phase::After {
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
            mixed_batches += 1;
        }
        let mut failed = Vec::new();
        for (m, r) in batch.into_iter().zip(results) {
            match r {
                Ok(()) => {
                    acked.insert(m.id);
                }
                Err(e) => {
                    assert!(
                        e.is_transient(),
                        "a restart must only cause transient errors: {e}"
                    );
                    *errors.entry(format!("{:?}", e.kind())).or_default() += 1;
                    failures += 1;
                    failed.push(m);
                }
            }
        }
        if !failed.is_empty() {
            failed.append(&mut pending);
            pending = failed;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(acked.len(), TOTAL);
    assert!(
        failures > 0,
        "the restart happened while messages were in flight"
    );

    let js = jetstream().await;
    let stored = read_stream(&js, &stream, &topic).await;
    let ids: HashSet<MessageId> = stored.iter().filter_map(|r| r.id).collect();
    let missing = all.iter().filter(|m| !ids.contains(&m.id)).count();
    println!(
        "nats restart: {TOTAL} acknowledged in {elapsed:?} ({failures} transient failures {errors:?}, \
         {mixed_batches} calls cut by the outage, \
         {before_rate:.0} msg/s before the stop), {} stored, {missing} missing",
        stored.len()
    );
    assert_eq!(missing, 0, "every acknowledged message is in the stream");
    assert_eq!(
        stored.len(),
        TOTAL,
        "Nats-Msg-Id dedup keeps one copy of each"
    );
}
