//! The core transport conformance suite against the real Redis, in streams
//! mode (plain and with dedup and trimming) and in Pub/Sub mode.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{cleanup, connection, redis_up, transport, unique_prefix, PubSubProbe, StreamProbe};
use outbox_core::testing::{transport_conformance, TransportCase};
use outbox_core::Transport;
use outbox_redis::RedisMode;

/// Streams: the probe reads with XRANGE; the rejected topic names a key that
/// holds a plain string, so XADD fails with WRONGTYPE.
async fn streams_case(name: &str, dedup: bool) {
    let prefix = unique_prefix(name);
    let redis = transport(|b| {
        let b = b.prefix(prefix.as_str());
        if dedup {
            b.dedup_window(Duration::from_secs(30)).maxlen(100_000)
        } else {
            b
        }
    })
    .await;
    assert_eq!(redis.name(), "redis");
    let mut con = connection().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}rejected"))
        .arg("not a stream")
        .query_async(&mut con)
        .await
        .unwrap();
    let probe = StreamProbe {
        stream: format!("{prefix}events"),
    };
    let case = TransportCase::new("events").rejected_topic("rejected");
    transport_conformance(&redis, &probe, &case).await;
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_streams() {
    if !redis_up() {
        return;
    }
    streams_case("conformance", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_streams_with_dedup_and_maxlen() {
    if !redis_up() {
        return;
    }
    streams_case("conformance-dedup", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_pubsub_with_live_subscriber() {
    if !redis_up() {
        return;
    }
    let prefix = unique_prefix("conformance-pubsub");
    let redis = transport(|b| b.prefix(prefix.as_str()).mode(RedisMode::PubSub)).await;
    // Subscribe first: Pub/Sub delivers only to current subscribers.
    let probe = PubSubProbe::subscribe(&format!("{prefix}events")).await;
    // Nothing is refused in Pub/Sub mode: no rejected topic.
    let case = TransportCase::new("events");
    transport_conformance(&redis, &probe, &case).await;
}
