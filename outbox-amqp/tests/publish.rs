//! RabbitMQ behaviour against the real broker: what a bound queue receives,
//! unroutable messages, nacks, missing exchanges, routes and connect errors.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use outbox_amqp::{AmqpConfig, AmqpRoute, AmqpTransport};
use outbox_core::{ErrorKind, Message, Transport, TransportExt};

fn message(topic: &str, i: usize) -> Message {
    Message::builder(topic, format!("payload {i}"))
        .key(format!("k{i}"))
        .header("x-i", i.to_string())
        .build()
        .unwrap()
}

async fn transport(exchange: &str) -> AmqpTransport {
    AmqpTransport::connect(
        AmqpConfig::builder(AMQP_URL)
            .exchange(exchange)
            .build()
            .unwrap(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_queue_receives_id_headers_properties_and_payload_intact() {
    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let u = unique();
    let exchange = format!("outbox-props-{u}");
    let queue = format!("props-{u}");
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let t = transport(&exchange).await;
    let (_conn, ch) = channel().await;
    let topic = format!("props{u}.orders.placed");
    bind_queue(
        &ch,
        &queue,
        &exchange,
        &format!("props{u}.orders.*"),
        true,
        FieldTable::default(),
    )
    .await;

    let payload: Vec<u8> = (0..=255u8).collect();
    let m = Message::builder(&topic, payload.clone())
        .key("order-7")
        .header("content-type", "application/octet-stream")
        .header("type", "OrderPlaced")
        .header("correlation-id", "corr-1")
        .header("x-unicode", "é✓")
        .build()
        .unwrap();
    t.publish(&m).await.unwrap();

    let got = drain(&ch, &queue, Duration::from_millis(300)).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.data, payload);
    assert_eq!(d.exchange.as_str(), exchange);
    assert_eq!(d.routing_key.as_str(), topic);
    let p = &d.properties;
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), m.id.to_string());
    assert_eq!(p.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/octet-stream"
    );
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "OrderPlaced");
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "corr-1");
    assert!(p.timestamp().is_some());
    let r = received(d);
    assert_eq!(r.id, Some(m.id));
    assert_eq!(r.key.as_deref(), Some("order-7"));
    assert_eq!(r.headers.get("outbox-id").unwrap(), &m.id.to_string());
    assert_eq!(r.headers.get("x-unicode").unwrap(), "é✓");
    assert_eq!(r.headers.get("type").unwrap(), "OrderPlaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_messages_are_reported_each_to_its_own_message() {
    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let u = unique();
    let exchange = format!("outbox-unroutable-{u}");
    let queue = format!("unroutable-{u}");
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let t = transport(&exchange).await;
    let (_conn, ch) = channel().await;
    let good = format!("good{u}.t");
    bind_queue(&ch, &queue, &exchange, &good, true, FieldTable::default()).await;

    // Returned messages come back interleaved with (multiple) acks: each
    // failure must land on the message that was returned, nowhere else.
    for round in 0..3 {
        let batch: Vec<Message> = (0..300)
            .map(|i| {
                let topic = if i % 3 == round {
                    format!("nobody{u}.t")
                } else {
                    good.clone()
                };
                message(&topic, i)
            })
            .collect();
        let results = t.publish_batch(&batch).await;
        for (i, (m, r)) in batch.iter().zip(&results).enumerate() {
            if i % 3 == round {
                let e = r.as_ref().unwrap_err();
                assert!(!e.is_transient(), "{e}");
                assert_eq!(e.kind(), ErrorKind::Unroutable);
                assert!(e.to_string().contains("NO_ROUTE"), "{e}");
                assert!(m.topic.starts_with("nobody"));
            } else {
                assert!(r.is_ok(), "message {i} of round {round}: {r:?}");
            }
        }
    }
    let got = drain(&ch, &queue, Duration::from_millis(300)).await;
    assert_eq!(got.len(), 600);

    let transient = AmqpTransport::connect(
        AmqpConfig::builder(AMQP_URL)
            .exchange(&exchange)
            .unroutable_is_transient(true)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let e = transient
        .publish(&message(&format!("nobody{u}.t"), 1))
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Unroutable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_is_a_transient_rejection() {
    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let u = unique();
    let exchange = format!("outbox-nack-{u}");
    let queue = format!("nack-{u}");
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let t = transport(&exchange).await;
    let (_conn, ch) = channel().await;
    let topic = format!("nack{u}.t");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(2));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    bind_queue(&ch, &queue, &exchange, &topic, true, args).await;

    let batch: Vec<Message> = (0..5).map(|i| message(&topic, i)).collect();
    let r = t.publish_batch(&batch).await;
    assert!(r[0].is_ok() && r[1].is_ok(), "{r:?}");
    for e in r[2..].iter().map(|r| r.as_ref().unwrap_err()) {
        assert!(e.is_transient(), "{e}");
        assert_eq!(e.kind(), ErrorKind::Rejected);
    }
    // The channel stays usable after nacks.
    let _ = drain(&ch, &queue, Duration::from_millis(200)).await;
    t.publish(&message(&topic, 9)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_exchange_fails_transiently_then_recovers_on_the_same_transport() {
    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let u = unique();
    let exchange = format!("outbox-deleted-{u}");
    let queue = format!("deleted-{u}");
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let t = transport(&exchange).await;
    let (_conn, ch) = channel().await;
    let topic = format!("deleted{u}.t");
    bind_queue(&ch, &queue, &exchange, &topic, true, FieldTable::default()).await;
    t.publish(&message(&topic, 0)).await.unwrap();

    ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    // The broker closes the channel (404): every message of that call is a
    // transient failure, none silently dropped.
    let r = t
        .publish_batch(&[message(&topic, 1), message(&topic, 2)])
        .await;
    assert!(
        r.iter()
            .all(|r| r.as_ref().is_err_and(|e| e.is_transient())),
        "{r:?}"
    );

    // The next call declares the exchange again (declare_exchange is on);
    // with its binding gone the message is unroutable, and reported so.
    // Now and then the broker closes the whole connection instead
    // (CHANNEL_ERROR "expected 'channel.open'": a frame of the batch above
    // reached it after the channel's close-ok); that call then fails
    // transiently and the one after it reconnects.
    let mut e = t.publish(&message(&topic, 3)).await.unwrap_err();
    if e.kind() == ErrorKind::Connection {
        assert!(e.is_transient(), "{e}");
        e = t.publish(&message(&topic, 3)).await.unwrap_err();
    }
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
    bind_queue(&ch, &queue, &exchange, &topic, true, FieldTable::default()).await;
    t.publish(&message(&topic, 4)).await.unwrap();
    let got = drain(&ch, &queue, Duration::from_millis(300)).await;
    let ids: Vec<_> = got.iter().map(|d| received(d).id.unwrap()).collect();
    assert_eq!(
        ids.len(),
        2,
        "message 0 before the deletion and message 4 after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_declaring_a_missing_exchange_is_a_permanent_error() {
    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let u = unique();
    let exchange = format!("outbox-missing-{u}");
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![],
    };
    let config = AmqpConfig::builder(AMQP_URL)
        .exchange(&exchange)
        .declare_exchange(false)
        .build()
        .unwrap();
    let e = AmqpTransport::connect(config.clone()).await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Unroutable);

    let (_conn, ch) = channel().await;
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let t = AmqpTransport::connect(config).await.unwrap();
    let topic = format!("missing{u}.t");
    let queue = format!("missing-{u}");
    let _cleanup_queue = Cleanup {
        exchanges: vec![],
        queues: vec![queue.clone()],
    };
    bind_queue(&ch, &queue, &exchange, &topic, true, FieldTable::default()).await;
    t.publish(&message(&topic, 1)).await.unwrap();

    ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let first = t.publish(&message(&topic, 2)).await.unwrap_err();
    assert!(first.is_transient(), "{first}");
    let second = t.publish(&message(&topic, 3)).await.unwrap_err();
    assert!(!second.is_transient(), "{second}");
    assert_eq!(second.kind(), ErrorKind::Unroutable);
    assert!(second.to_string().contains("does not exist"), "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_the_exchange_and_routing_key() {
    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let u = unique();
    let main = format!("outbox-main-{u}");
    let audit = format!("outbox-audit-{u}");
    let direct_queue = format!("direct-{u}");
    let audit_queue = format!("audit-{u}");
    let _cleanup = Cleanup {
        exchanges: vec![main.clone(), audit.clone()],
        queues: vec![direct_queue.clone(), audit_queue.clone()],
    };
    let config = AmqpConfig::builder(AMQP_URL)
        .exchange(&main)
        .route(AmqpRoute::new(format!("audit{u}.>"), &audit))
        .route(AmqpRoute::new(format!("jobs{u}.*"), "").routing_key(&direct_queue))
        .build()
        .unwrap();
    let t = AmqpTransport::connect(config).await.unwrap();
    let (_conn, ch) = channel().await;
    bind_queue(&ch, &audit_queue, &audit, "#", true, FieldTable::default()).await;
    // The default exchange routes by queue name.
    ch.queue_declare(
        direct_queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();

    let r = t
        .publish_batch(&[
            message(&format!("audit{u}.login.failed"), 1),
            message(&format!("jobs{u}.resize"), 2),
        ])
        .await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    let a = drain(&ch, &audit_queue, Duration::from_millis(300)).await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].exchange.as_str(), audit);
    let d = drain(&ch, &direct_queue, Duration::from_millis(300)).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].routing_key.as_str(), direct_queue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_a_window_of_one() {
    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let u = unique();
    let exchange = format!("outbox-window-{u}");
    let queue = format!("window-{u}");
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let t = Arc::new(
        AmqpTransport::connect(
            AmqpConfig::builder(AMQP_URL)
                .exchange(&exchange)
                .max_in_flight(1)
                .build()
                .unwrap(),
        )
        .await
        .unwrap(),
    );
    let (_conn, ch) = channel().await;
    let topic = format!("window{u}.t");
    bind_queue(&ch, &queue, &exchange, &topic, true, FieldTable::default()).await;
    let a: Vec<_> = (0..40).map(|i| message(&topic, i)).collect();
    let b: Vec<_> = (40..80).map(|i| message(&topic, i)).collect();
    let (ra, rb) = tokio::join!(t.publish_batch(&a), t.publish_batch(&b));
    assert!(ra.iter().chain(&rb).all(Result::is_ok));
    let got = drain(&ch, &queue, Duration::from_millis(300)).await;
    assert_eq!(got.len(), 80);
    let ids: Vec<_> = got.iter().map(|d| received(d).id.unwrap()).collect();
    let pos = |id| ids.iter().position(|x| *x == id).unwrap();
    assert!(
        a.windows(2).all(|w| pos(w[0].id) < pos(w[1].id)),
        "order within a call"
    );
}

#[tokio::test]
async fn connect_errors_say_transient_or_permanent_and_hide_the_password() {
    let down = AmqpConfig::builder("amqp://guest:hunter2@127.0.0.1:1/%2f")
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let e = AmqpTransport::connect(down).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Connection);
    assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");

    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let refused = AmqpConfig::builder("amqp://guest:wrong-password@127.0.0.1:5672/%2f")
        .build()
        .unwrap();
    let e = AmqpTransport::connect(refused).await.unwrap_err();
    assert!(!format!("{e} {e:?}").contains("wrong-password"), "{e:?}");
    println!("bad credentials: {e}");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(!e.is_transient(), "{e}");

    let t = AmqpTransport::connect(AmqpConfig::builder(AMQP_URL).build().unwrap())
        .await
        .unwrap();
    assert_eq!(t.name(), "amqp");
    let debug = format!("{t:?}");
    assert!(debug.contains("guest:***@"), "{debug}");
}

/// Runs `rabbitmqctl` (the tests run on the broker's machine, as root in CI).
fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broker user, deleted when dropped.
struct User(String);

impl Drop for User {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

/// RabbitMQ closes the channel when one message breaks a rule (here a
/// topic permission: 403 for its routing key) and fails every confirm still
/// outstanding on it with that error. Only the message that broke the rule
/// fails (permanently); the others on the channel are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_fails_alone_not_the_others_on_its_channel() {
    if !outbox_core::testing::require_service("rabbitmq", AMQP_ADDR) {
        return;
    }
    let u = unique();
    let exchange = format!("outbox-refused-{u}");
    let queue = format!("refused-{u}");
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let user = User(format!("outbox-refused-{u}"));
    rabbitmqctl(&["add_user", &user.0, "secret"]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
    rabbitmqctl(&[
        "set_topic_permissions",
        "-p",
        "/",
        &user.0,
        &exchange,
        "^allowed\\.",
        ".*",
    ]);
    let t = AmqpTransport::connect(
        AmqpConfig::builder(format!("amqp://{}:secret@127.0.0.1:5672/%2f", user.0))
            .exchange(&exchange)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let (_conn, ch) = channel().await;
    bind_queue(
        &ch,
        &queue,
        &exchange,
        "allowed.#",
        true,
        FieldTable::default(),
    )
    .await;
    let batch: Vec<Message> = (0..40)
        .map(|i| {
            let topic = if i == 20 { "forbidden.x" } else { "allowed.x" };
            message(topic, i)
        })
        .collect();
    let results = t.publish_batch(&batch).await;
    for (i, r) in results.iter().enumerate() {
        if i == 20 {
            let e = r.as_ref().unwrap_err();
            assert!(!e.is_transient(), "{e}");
            assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
        } else {
            assert!(r.is_ok(), "message {i}: {r:?}");
        }
    }
    let got = drain(&ch, &queue, Duration::from_millis(500)).await;
    let mut ids: Vec<String> = got
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 39, "every allowed message is queued");
    // The transport still works afterwards.
    assert!(t.publish(&message("allowed.y", 99)).await.is_ok());
}
