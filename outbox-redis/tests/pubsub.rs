//! Pub/Sub mode against the real Redis: a live subscriber gets the
//! messages published while it listens, with id, key, headers and payload;
//! nothing is kept for a subscriber that comes later (not durable).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{message, redis_up, transport, unique_prefix, PubSubProbe};
use outbox_core::testing::Probe;
use outbox_core::{Message, Transport};
use outbox_redis::RedisMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_live_subscribers_receive_messages() {
    if !redis_up() {
        return;
    }
    let prefix = unique_prefix("pubsub");
    let redis = transport(|b| b.prefix(prefix.as_str()).mode(RedisMode::PubSub)).await;

    // Nobody listens: Redis accepts the message (Ok) and drops it.
    let early = message("events", 0);
    assert!(redis.publish_batch(std::slice::from_ref(&early)).await[0].is_ok());

    let probe = PubSubProbe::subscribe(&format!("{prefix}events")).await;
    let live: Vec<Message> = (1..=50)
        .map(|i| {
            Message::builder("events", vec![i as u8, b'\n', 0])
                .key(format!("k{}", i % 5))
                .header("x-index", i.to_string())
                .build()
                .unwrap()
        })
        .collect();
    let results = redis.publish_batch(&live).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let got = probe.received(live.len(), Duration::from_secs(5)).await;
    let ids: Vec<_> = got.iter().map(|r| r.id.unwrap()).collect();
    let expected: Vec<_> = live.iter().map(|m| m.id).collect();
    assert_eq!(
        ids, expected,
        "the live messages, in order, and not the early one"
    );
    for (r, m) in got.iter().zip(&live) {
        assert_eq!(r.key, m.key);
        assert_eq!(r.payload, m.payload);
        assert_eq!(r.headers["x-index"], m.headers["x-index"]);
    }
    // Give a late copy of the early message a chance to show up: none does.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(probe.received(0, Duration::ZERO).await.len(), live.len());
}
