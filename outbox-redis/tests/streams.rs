//! Streams mode against the real Redis: the entry layout read back with
//! XRANGE, a consumer group, dedup, trimming, per-message errors and
//! connection errors.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{cleanup, connection, envelope, message, redis_up, transport, unique_prefix, xrange};
use outbox_core::{wire, ErrorKind, Message, Transport};
use outbox_redis::envelope::{FIELD_HEADERS, FIELD_ID, FIELD_KEY, FIELD_PAYLOAD};
use outbox_redis::{RedisConfig, RedisTransport};
use redis::streams::StreamReadReply;
use redis::Value;

fn field<'a>(entry: &'a redis::streams::StreamId, name: &str) -> Option<&'a [u8]> {
    match entry.map.get(name) {
        Some(Value::BulkString(b)) => Some(b.as_slice()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_carry_id_key_headers_and_payload_fields() {
    if !redis_up() {
        return;
    }
    let prefix = unique_prefix("fields");
    let redis = transport(|b| b.prefix(prefix.as_str())).await;
    let keyed = Message::builder("orders", vec![0u8, 1, 2, 255])
        .key("order-7")
        .header("trace", "abc")
        .build()
        .unwrap();
    let keyless = Message::builder("orders", "plain").build().unwrap();
    let results = redis.publish_batch(&[keyed.clone(), keyless.clone()]).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let mut con = connection().await;
    let entries = xrange(&mut con, &format!("{prefix}orders")).await;
    assert_eq!(entries.len(), 2);
    let a = &entries[0];
    assert_eq!(field(a, FIELD_ID), Some(keyed.id.to_string().as_bytes()));
    assert_eq!(field(a, FIELD_KEY), Some(&b"order-7"[..]));
    let headers: serde_json::Value =
        serde_json::from_slice(field(a, FIELD_HEADERS).unwrap()).unwrap();
    assert_eq!(headers["trace"], "abc");
    assert_eq!(
        headers[wire::TOPIC_HEADER],
        "orders",
        "the prefix renamed the topic"
    );
    assert_eq!(field(a, FIELD_PAYLOAD), Some(&[0u8, 1, 2, 255][..]));
    let b = &entries[1];
    assert_eq!(
        field(b, FIELD_KEY),
        None,
        "a keyless message has no key field"
    );
    assert_eq!(envelope(b).id, keyless.id);
    assert_eq!(&envelope(b).payload[..], b"plain");
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_reads_every_message_once() {
    if !redis_up() {
        return;
    }
    let prefix = unique_prefix("group");
    let stream = format!("{prefix}events");
    let mut con = connection().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("workers")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut con)
        .await
        .unwrap();
    let redis = transport(|b| b.prefix(prefix.as_str())).await;
    let sent: Vec<Message> = (0..300).map(|i| message("events", i)).collect();
    for batch in sent.chunks(100) {
        let results = redis.publish_batch(batch).await;
        assert!(results.iter().all(Result::is_ok));
    }

    // Two consumers of one group share the entries between them.
    let mut seen = Vec::new();
    for consumer in ["c1", "c2", "c1", "c2"] {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("workers")
            .arg(consumer)
            .arg("COUNT")
            .arg(100)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async(&mut con)
            .await
            .unwrap();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                let _: i64 = redis::cmd("XACK")
                    .arg(&stream)
                    .arg("workers")
                    .arg(&entry.id)
                    .query_async(&mut con)
                    .await
                    .unwrap();
                seen.push(envelope(&entry).id);
            }
        }
    }
    let expected: Vec<_> = sent.iter().map(|m| m.id).collect();
    assert_eq!(seen, expected, "every message once, in order");
    let pending: Vec<Value> = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("workers")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(pending.first(), Some(&Value::Int(0)), "all acknowledged");
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_appends_a_republished_message_once() {
    if !redis_up() {
        return;
    }
    let prefix = unique_prefix("dedup");
    let stream = format!("{prefix}events");
    let window = Duration::from_millis(800);
    let redis = transport(|b| b.prefix(prefix.as_str()).dedup_window(window)).await;
    let m = message("events", 1);
    let other = message("events", 2);

    // First publish, a re-publish in its own batch, and twice in one batch.
    assert!(redis.publish_batch(std::slice::from_ref(&m)).await[0].is_ok());
    assert!(redis.publish_batch(std::slice::from_ref(&m)).await[0].is_ok());
    let r = redis
        .publish_batch(&[m.clone(), other.clone(), other.clone()])
        .await;
    assert!(
        r.iter().all(Result::is_ok),
        "a duplicate counts as published: {r:?}"
    );

    let mut con = connection().await;
    let ids: Vec<_> = xrange(&mut con, &stream)
        .await
        .iter()
        .map(|e| envelope(e).id)
        .collect();
    assert_eq!(ids, vec![m.id, other.id], "each id appended once");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{stream}:outbox-dedup:{}", m.id))
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 800,
        "the marker expires with the window: {ttl}"
    );

    // After the window a re-publish appends again (the window is the limit
    // of what dedup can promise).
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    assert!(redis.publish_batch(std::slice::from_ref(&m)).await[0].is_ok());
    assert_eq!(xrange(&mut con, &stream).await.len(), 3);
    // (A restart empties Redis's script cache; tests/restart.rs runs with
    // dedup on to show that the script is loaded again.)
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_is_not_taken_for_a_duplicate_later() {
    if !redis_up() {
        return;
    }
    let prefix = unique_prefix("dedup-fail");
    let stream = format!("{prefix}events");
    let redis = transport(|b| {
        b.prefix(prefix.as_str())
            .dedup_window(Duration::from_secs(60))
    })
    .await;
    let mut con = connection().await;
    let _: () = redis::cmd("SET")
        .arg(&stream)
        .arg("x")
        .query_async(&mut con)
        .await
        .unwrap();

    let m = message("events", 1);
    let r = redis.publish_batch(std::slice::from_ref(&m)).await;
    let e = r[0].as_ref().unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Rejected);
    assert!(e.message().contains("WRONGTYPE"), "{e}");

    // Once the key is fixed, the message (re-queued from the dead letters)
    // goes through: the failed attempt left no dedup marker behind.
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(redis.publish_batch(std::slice::from_ref(&m)).await[0].is_ok());
    let ids: Vec<_> = xrange(&mut con, &stream)
        .await
        .iter()
        .map(|e| envelope(e).id)
        .collect();
    assert_eq!(ids, vec![m.id]);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxlen_trims_streams_approximately() {
    if !redis_up() {
        return;
    }
    let prefix = unique_prefix("maxlen");
    let stream = format!("{prefix}events");
    let redis = transport(|b| b.prefix(prefix.as_str()).maxlen(100)).await;
    let sent: Vec<Message> = (0..1000).map(|i| message("events", i)).collect();
    for batch in sent.chunks(250) {
        assert!(redis.publish_batch(batch).await.iter().all(Result::is_ok));
    }
    let mut con = connection().await;
    let len: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!((100..1000).contains(&len), "trimmed to about 100: {len}");
    let entries = xrange(&mut con, &stream).await;
    let last = envelope(entries.last().unwrap());
    assert_eq!(last.id, sent[999].id, "the newest entries are kept");
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_map_names_the_stream() {
    if !redis_up() {
        return;
    }
    let prefix = unique_prefix("map");
    let mapped = format!("{prefix}orders-v1");
    let redis = transport(|b| {
        b.prefix("unused:")
            .map_topic("orders.placed", mapped.as_str())
    })
    .await;
    let m = message("orders.placed", 1);
    assert!(redis.publish_batch(std::slice::from_ref(&m)).await[0].is_ok());
    let mut con = connection().await;
    let entries = xrange(&mut con, &mapped).await;
    assert_eq!(entries.len(), 1);
    let e = envelope(&entries[0]);
    assert_eq!(e.id, m.id);
    assert_eq!(e.headers[wire::TOPIC_HEADER], "orders.placed");
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_a_transient_connection_error() {
    // Port 1 on loopback: nothing listens, the connection is refused.
    let config = RedisConfig::builder("redis://127.0.0.1:1")
        .connect_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let e = RedisTransport::connect(config).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
    assert_eq!(e.operation(), Some("connect"));
}
