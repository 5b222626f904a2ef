//! The router: first match wins, fallback, rename, no match, bad patterns.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use outbox_core::router::{pattern_matches, validate_pattern};
use outbox_core::testing::{RecordingTransport, ScriptedTransport};
use outbox_core::{ErrorKind, Message, Route, Router, Transport, TransportExt};

fn msg(topic: &str) -> Message {
    Message::builder(topic, "x").build().unwrap()
}

#[test]
fn patterns_match_like_nats_subjects() {
    for (pattern, topic, want) in [
        ("orders.placed", "orders.placed", true),
        ("orders.placed", "orders.placed.eu", false),
        ("orders.*", "orders.placed", true),
        ("orders.*", "orders", false),
        ("orders.*", "orders.placed.eu", false),
        ("*.placed", "orders.placed", true),
        ("audit.>", "audit.login", true),
        ("audit.>", "audit.login.failed", true),
        ("audit.>", "audit", false),
        (">", "anything.at.all", true),
        ("a.*.c", "a.b.c", true),
        ("a.*.c", "a.b.d", false),
    ] {
        assert_eq!(pattern_matches(pattern, topic), want, "{pattern} ~ {topic}");
    }
}

#[test]
fn bad_patterns_are_refused_when_the_router_is_built() {
    for bad in [
        "",
        "orders..placed",
        ".orders",
        "orders.>.x",
        "ord*rs",
        "orders.#",
        "a b",
        "x\n",
    ] {
        assert!(validate_pattern(bad).is_err(), "{bad:?} should be refused");
        let t = Arc::new(RecordingTransport::new());
        let err = Router::builder().route(bad, t).build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
    }
    let t = Arc::new(RecordingTransport::new());
    let err = Router::builder()
        .route_with(Route::new("a.*", t).topic("bad topic"))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        Router::builder().build().is_err(),
        "an empty router is refused"
    );
}

#[tokio::test]
async fn first_match_wins_and_the_fallback_takes_the_rest() {
    let kafka = RecordingTransport::named("kafka");
    let nats = RecordingTransport::named("nats");
    let redis = RecordingTransport::named("redis");
    let amqp = RecordingTransport::named("amqp");
    let router = Router::builder()
        .route("orders.*", Arc::new(kafka.clone()))
        .route("orders.placed", Arc::new(redis.clone())) // shadowed by the route above
        .route("notifications.*", Arc::new(nats.clone()))
        .route("audit.>", Arc::new(redis.clone()))
        .fallback(Arc::new(amqp.clone()))
        .build()
        .unwrap();
    let batch = vec![
        msg("orders.placed"),
        msg("notifications.email"),
        msg("audit.login.failed"),
        msg("billing.invoice"),
        msg("orders.cancelled"),
    ];
    let results = router.publish_batch(&batch).await;
    assert!(results.iter().all(Result::is_ok));
    let topics = |t: &RecordingTransport| {
        t.messages()
            .into_iter()
            .map(|m| m.topic)
            .collect::<Vec<_>>()
    };
    assert_eq!(topics(&kafka), vec!["orders.placed", "orders.cancelled"]);
    assert_eq!(topics(&nats), vec!["notifications.email"]);
    assert_eq!(topics(&redis), vec!["audit.login.failed"]);
    assert_eq!(topics(&amqp), vec!["billing.invoice"]);
    assert_eq!(router.name_for("orders.x"), "kafka");
    assert_eq!(router.name_for("zzz"), "amqp");
}

#[tokio::test]
async fn rename_changes_the_published_topic_only() {
    let t = RecordingTransport::new();
    let router = Router::builder()
        .route_with(Route::new("orders.*", Arc::new(t.clone())).prefix("prod."))
        .route_with(Route::new("audit.>", Arc::new(t.clone())).topic("audit-log"))
        .route_with(
            Route::new("legacy.*", Arc::new(t.clone()))
                .rename_with(|topic| topic.replace('.', "_")),
        )
        .route_with(Route::new("broken.*", Arc::new(t.clone())).rename_with(|_| String::new()))
        .build()
        .unwrap();
    let m = msg("orders.placed");
    router.publish(&m).await.unwrap();
    router.publish(&msg("audit.a.b")).await.unwrap();
    router.publish(&msg("legacy.thing")).await.unwrap();
    let err = router.publish(&msg("broken.x")).await.unwrap_err();
    assert!(!err.is_transient());
    let got = t.messages();
    assert_eq!(got[0].topic, "prod.orders.placed");
    assert_eq!(got[0].id, m.id, "everything else is kept");
    assert_eq!(got[1].topic, "audit-log");
    assert_eq!(got[2].topic, "legacy_thing");
    assert_eq!(got.len(), 3);
    // The topic it was written to travels in the `outbox-topic` header.
    let original: Vec<&str> = got
        .iter()
        .map(|m| m.headers[outbox_core::wire::TOPIC_HEADER].as_str())
        .collect();
    assert_eq!(original, ["orders.placed", "audit.a.b", "legacy.thing"]);
}

#[tokio::test]
async fn no_match_is_a_permanent_error_for_that_message_only() {
    let t = RecordingTransport::new();
    let router = Router::builder()
        .route("orders.*", Arc::new(t.clone()))
        .build()
        .unwrap();
    let results = router
        .publish_batch(&[msg("orders.a"), msg("unknown.b"), msg("orders.c")])
        .await;
    assert!(results[0].is_ok() && results[2].is_ok());
    let e = results[1].as_ref().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unroutable);
    assert!(!e.is_transient());
    assert_eq!(t.len(), 2);
}

#[tokio::test]
async fn results_stay_in_input_order_across_transports() {
    let ok = RecordingTransport::named("ok");
    let bad = ScriptedTransport::new().fail_topic_permanent("b.x");
    let router = Router::builder()
        .route("a.*", Arc::new(ok.clone()))
        .route("b.*", Arc::new(bad.clone()))
        .build()
        .unwrap();
    let batch: Vec<Message> = (0..20)
        .map(|i| msg(if i % 2 == 0 { "a.x" } else { "b.x" }))
        .collect();
    let results = router.publish_batch(&batch).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_ok(), i % 2 == 0, "result {i}");
    }
}
