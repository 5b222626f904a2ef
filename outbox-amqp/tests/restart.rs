//! A RabbitMQ restart in the middle of 5,000 confirmed publishes: the
//! transport (built once) reports the failures as transient, reconnects
//! lazily, and after retries every message is confirmed and sits in the
//! durable queue at least once.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use lapin::types::FieldTable;
use outbox_amqp::{AmqpConfig, AmqpTransport};
use outbox_core::testing::{restart_drill, RestartDrill};
use outbox_core::{Message, MessageId};

const TOTAL: usize = 5_000;

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
    let drill = RestartDrill {
        server: "rabbitmq",
        control: services,
        down_for: Duration::from_secs(1),
        trickle: 25,
        pause_while_stopping: Duration::from_millis(5),
        timeout: Duration::from_secs(150),
    };
    let r = restart_drill(&transport, &all, drill).await;

    let (_conn, ch) = channel().await;
    let got = drain(&ch, &queue, Duration::from_millis(500)).await;
    let ids: HashSet<MessageId> = got.iter().filter_map(|d| received(d).id).collect();
    let missing = all.iter().filter(|m| !ids.contains(&m.id)).count();
    println!(
        "rabbitmq restart: {TOTAL} confirmed in {:?} ({} transient failures {:?}, \
         {} calls cut by the outage, {:.0} msg/s before the stop, \
         the rest {:?} after the restart), {} queued ({} duplicates), {missing} missing",
        r.elapsed,
        r.failures,
        r.errors,
        r.mixed_batches,
        r.before_rate,
        r.after_restart,
        got.len(),
        got.len() - ids.len()
    );
    assert_eq!(
        missing, 0,
        "every confirmed message is in the durable queue"
    );
}
