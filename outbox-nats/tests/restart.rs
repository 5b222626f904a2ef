//! A NATS restart in the middle of 5,000 JetStream publishes: the transport
//! (built once) reports the failures as transient, recovers by itself, and
//! after retries every message is acknowledged and stored exactly once.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use outbox_core::testing::{restart_drill, RestartDrill};
use outbox_core::{Message, MessageId};
use outbox_nats::{NatsConfig, NatsTransport, StreamSpec};

const TOTAL: usize = 5_000;

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
    let drill = RestartDrill {
        server: "nats",
        control: services,
        down_for: Duration::from_secs(2),
        trickle: 10,
        pause_while_stopping: Duration::ZERO,
        timeout: Duration::from_secs(100),
    };
    let r = restart_drill(&transport, &all, drill).await;

    let js = jetstream().await;
    let stored = read_stream(&js, &stream, &topic).await;
    let ids: HashSet<MessageId> = stored.iter().filter_map(|r| r.id).collect();
    let missing = all.iter().filter(|m| !ids.contains(&m.id)).count();
    println!(
        "nats restart: {TOTAL} acknowledged in {:?} ({} transient failures {:?}, \
         {} calls cut by the outage, {:.0} msg/s before the stop), {} stored, {missing} missing",
        r.elapsed,
        r.failures,
        r.errors,
        r.mixed_batches,
        r.before_rate,
        stored.len()
    );
    assert_eq!(missing, 0, "every acknowledged message is in the stream");
    assert_eq!(
        stored.len(),
        TOTAL,
        "Nats-Msg-Id dedup keeps one copy of each"
    );
}
