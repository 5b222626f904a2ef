//! A RabbitMQ restart in the middle of 5,000 confirmed publishes: the
//! transport (built once) reports the failures as transient, reconnects
//! lazily, and after retries every message is confirmed and sits in the
//! durable queue at least once.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use lapin::types::FieldTable;
use outbox_amqp::{AmqpConfig, AmqpTransport};
use outbox_core::{Message, MessageId, Transport};

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
async fn every_message_is_confirmed_and_queued_across_a_rabbitmq_restart() {
    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let _guard = RestartGuard("rabbitmq");
    let u = unique();
    let exchange = format!("outbox-restart-{u}");
    let queue = format!("restart-{u}");
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let topic = format!("restart{u}.orders");
    let config = AmqpConfig::builder(AMQP_URL)
        .exchange(&exchange)
        .confirm_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let transport = AmqpTransport::connect(config).await.unwrap();
    {
        let (conn, ch) = channel().await;
        bind_queue(&ch, &queue, &exchange, &topic, true, FieldTable::default()).await;
        let _ = conn.close(200, "OK".into()).await;
    }

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
    let mut restarted_at = Instant::now();
    let mut cap = TOTAL;
    let started = Instant::now();
    let mut before_rate = 0.0;

    loop {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "not done after 150 s: {} confirmed, phase {phase:?}",
            acked.len()
        );
        if released < TOTAL.min(cap) {
            // While the server is being stopped, trickle messages out so that
            // some are in flight at the moment it goes away.
            let chunk = if phase == Phase::Stopping { 25 } else { CHUNK };
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
                control = Some(tokio::task::spawn_blocking(|| services("stop", "rabbitmq")));
                phase = Phase::Stopping;
            }
            Phase::Stopping if control.as_ref().is_some_and(|c| c.is_finished()) => {
                assert!(
                    control.take().unwrap().await.unwrap(),
                    "rabbitmq did not stop"
                );
                down_since = Instant::now();
                cap = released + 1_000;
                phase = Phase::Down;
            }
            Phase::Down if down_since.elapsed() > Duration::from_secs(1) => {
                control = Some(tokio::task::spawn_blocking(|| {
                    services("start", "rabbitmq")
                }));
                phase = Phase::Starting;
            }
            Phase::Starting if control.as_ref().is_some_and(|c| c.is_finished()) => {
                assert!(
                    control.take().unwrap().await.unwrap(),
                    "rabbitmq did not start"
                );
                println!("rabbitmq restarted after {:?} down", down_since.elapsed());
                restarted_at = Instant::now();
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
        if phase == Phase::Stopping {
            tokio::time::sleep(Duration::from_millis(5)).await;
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
    let after = restarted_at.elapsed();
    assert_eq!(acked.len(), TOTAL);
    assert!(
        failures > 0,
        "the restart happened while messages were in flight"
    );

    let (_conn, ch) = channel().await;
    let got = drain(&ch, &queue, Duration::from_millis(500)).await;
    let ids: HashSet<MessageId> = got.iter().filter_map(|d| received(d).id).collect();
    let missing = all.iter().filter(|m| !ids.contains(&m.id)).count();
    println!(
        "rabbitmq restart: {TOTAL} confirmed in {elapsed:?} ({failures} transient failures {errors:?}, \
         {mixed_batches} calls cut by the outage, \
         {before_rate:.0} msg/s before the stop, the rest {after:?} after the restart), \
         {} queued ({} duplicates), {missing} missing",
        got.len(),
        got.len() - ids.len()
    );
    assert_eq!(
        missing, 0,
        "every confirmed message is in the durable queue"
    );
}
