//! JetStream behaviour against the real server: dedup by `Nats-Msg-Id`,
//! stream creation, subject mapping and error classification.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use outbox_core::{ErrorKind, Message, Transport, TransportExt};
use outbox_nats::{NatsConfig, NatsTransport, StreamSpec};

fn message(topic: &str, i: usize) -> Message {
    Message::builder(topic, format!("payload {i}"))
        .key(format!("k{i}"))
        .header("x-i", i.to_string())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_published_twice_is_stored_once() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let u = unique();
    let stream = format!("OUTBOX_DEDUP_{u}");
    let js = jetstream().await;
    create_stream(&js, &stream, &[&format!("dedup{u}.>")]).await;
    let _cleanup = StreamCleanup(stream.clone());
    let transport = NatsTransport::connect(NatsConfig::builder(NATS_URL).build().unwrap())
        .await
        .unwrap();

    let topic = format!("dedup{u}.orders");
    let m = message(&topic, 1);
    let other = message(&topic, 2);
    // Twice in separate calls (a re-publish after a crash) and once more in
    // the same batch as a new message: every publish is acknowledged.
    transport.publish(&m).await.unwrap();
    transport.publish(&m).await.unwrap();
    let r = transport
        .publish_batch(&[m.clone(), other.clone(), m.clone()])
        .await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");

    let mut s = js.get_stream(&stream).await.unwrap();
    assert_eq!(
        s.info().await.unwrap().state.messages,
        2,
        "stored once each"
    );
    let stored = read_stream(&js, &stream, &topic).await;
    let ids: Vec<_> = stored.iter().map(|r| r.id.unwrap()).collect();
    assert_eq!(ids, vec![m.id, other.id]);
    assert_eq!(
        stored[0].headers.get("outbox-id").unwrap(),
        &m.id.to_string()
    );
    assert_eq!(stored[0].key.as_deref(), Some("k1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_without_stream_is_a_permanent_unroutable_error() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let transport = NatsTransport::connect(NatsConfig::builder(NATS_URL).build().unwrap())
        .await
        .unwrap();
    let e = transport
        .publish(&message(&format!("nowhere{}.x", unique()), 1))
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Unroutable);
    assert!(e.to_string().starts_with("nats publish: unroutable"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_stream_is_created_on_connect_and_after_deletion() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let u = unique();
    let stream = format!("OUTBOX_CREATE_{u}");
    let _cleanup = StreamCleanup(stream.clone());
    let config = NatsConfig::builder(NATS_URL)
        .create_stream(
            StreamSpec::new(&stream, [format!("create{u}.>")])
                .duplicate_window(Duration::from_secs(30)),
        )
        .build()
        .unwrap();
    let transport = NatsTransport::connect(config).await.unwrap();
    let js = jetstream().await;
    let mut s = js.get_stream(&stream).await.unwrap();
    assert_eq!(
        s.info().await.unwrap().config.duplicate_window,
        Duration::from_secs(30)
    );

    let topic = format!("create{u}.orders");
    transport.publish(&message(&topic, 1)).await.unwrap();

    // Someone deletes the stream: the next publish recreates it and succeeds.
    js.delete_stream(&stream).await.unwrap();
    let batch = [message(&topic, 2), message(&topic, 3)];
    let r = transport.publish_batch(&batch).await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    let stored = read_stream(&js, &stream, &topic).await;
    assert_eq!(stored.len(), 2);

    // A subject the configured stream does not capture is still permanent.
    let e = transport
        .publish(&message(&format!("other{u}.x"), 4))
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_follow_the_prefix_and_mapping_and_keep_the_topic() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let u = unique();
    let stream = format!("OUTBOX_MAP_{u}");
    let js = jetstream().await;
    create_stream(&js, &stream, &[&format!("app{u}.>")]).await;
    let _cleanup = StreamCleanup(stream.clone());
    let config = NatsConfig::builder(NATS_URL)
        .subject_prefix(format!("app{u}."))
        .subject("orders.placed", "sales.orders")
        .build()
        .unwrap();
    let transport = NatsTransport::connect(config).await.unwrap();
    // Topics alternate within the batch: each message gets its own subject.
    let batch: Vec<Message> = (0..4)
        .map(|i| message(["orders.placed", "audit.login"][i % 2], i))
        .collect();
    let r = transport.publish_batch(&batch).await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");

    for (subject, topic) in [
        ("sales.orders", "orders.placed"),
        ("audit.login", "audit.login"),
    ] {
        let stored = read_stream(&js, &stream, &format!("app{u}.{subject}")).await;
        assert_eq!(stored.len(), 2, "{subject}");
        for m in &stored {
            assert_eq!(m.headers.get("outbox-topic").unwrap(), topic);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_one_still_publishes_everything_in_order() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let u = unique();
    let stream = format!("OUTBOX_WIN_{u}");
    let js = jetstream().await;
    create_stream(&js, &stream, &[&format!("win{u}.>")]).await;
    let _cleanup = StreamCleanup(stream.clone());
    let transport = std::sync::Arc::new(
        NatsTransport::connect(
            NatsConfig::builder(NATS_URL)
                .max_in_flight(1)
                .build()
                .unwrap(),
        )
        .await
        .unwrap(),
    );
    // Two concurrent calls share the window of one: no deadlock.
    let topic = format!("win{u}.t");
    let a: Vec<_> = (0..50).map(|i| message(&topic, i)).collect();
    let b: Vec<_> = (50..100).map(|i| message(&topic, i)).collect();
    let (ra, rb) = tokio::join!(transport.publish_batch(&a), transport.publish_batch(&b));
    assert!(ra.iter().chain(&rb).all(Result::is_ok));
    let stored = read_stream(&js, &stream, &topic).await;
    assert_eq!(stored.len(), 100);
    let pos = |id| stored.iter().position(|r| r.id == Some(id)).unwrap();
    assert!(a.windows(2).all(|w| pos(w[0].id) < pos(w[1].id)));
}

#[tokio::test]
async fn connecting_to_nothing_is_a_transient_connection_error() {
    let config = NatsConfig::builder("nats://user:hunter2@127.0.0.1:1")
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let e = NatsTransport::connect(config).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert_eq!(e.kind(), ErrorKind::Connection);
    assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_hides_credentials() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let config = NatsConfig::builder("nats://127.0.0.1:4222")
        .core()
        .build()
        .unwrap();
    let transport = NatsTransport::connect(config).await.unwrap();
    assert!(transport.is_connected());
    assert_eq!(transport.name(), "nats");
    let debug = format!("{transport:?}");
    assert!(debug.contains("NatsTransport"), "{debug}");
    let with_token = NatsConfig::builder("nats://u:pw@h")
        .token("s3cret")
        .build()
        .unwrap();
    let debug = format!("{with_token:?}");
    assert!(
        !debug.contains("s3cret") && !debug.contains(":pw@"),
        "{debug}"
    );
}

/// A stream's refusals come back per message, each with its own verdict:
/// too large for the stream is permanent, a full stream may clear later,
/// and the neighbours of a refused message are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refusal_fails_only_its_message() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let u = unique();
    let stream = format!("OUTBOX_REFUSE_{u}");
    let js = jetstream().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("refuse{u}.>")],
        max_message_size: 1_024,
        max_messages: 3,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    let _cleanup = StreamCleanup(stream.clone());
    let transport = NatsTransport::connect(NatsConfig::builder(NATS_URL).build().unwrap())
        .await
        .unwrap();
    let topic = format!("refuse{u}.orders");
    let big = Message::builder(&topic, vec![b'x'; 4_096]).build().unwrap();
    let batch = [
        message(&topic, 1),
        big,
        message(&topic, 2),
        message(&topic, 3),
        message(&topic, 4),
    ];
    let r = transport.publish_batch(&batch).await;
    assert!(r[0].is_ok() && r[2].is_ok() && r[3].is_ok(), "{r:?}");
    let too_large = r[1].as_ref().unwrap_err();
    assert_eq!(too_large.kind(), ErrorKind::TooLarge, "{too_large}");
    assert!(!too_large.is_transient(), "{too_large}");
    let full = r[4].as_ref().unwrap_err();
    assert_eq!(full.kind(), ErrorKind::Rejected, "{full}");
    assert!(full.is_transient(), "{full}");
    assert!(full.to_string().contains("maximum messages"), "{full}");
    assert!(too_large.to_string().contains("maximum"), "{too_large}");
    let stored = read_stream(&js, &stream, &topic).await;
    let ids: Vec<_> = stored.iter().map(|r| r.id.unwrap()).collect();
    assert_eq!(ids, vec![batch[0].id, batch[2].id, batch[3].id]);
}

/// A subject that something answers but no stream stores (a plain
/// subscriber, no ack): each message fails as a transient timeout after
/// `ack_timeout`, the window's slots come back, and the transport goes on
/// publishing elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_publishes_time_out_and_free_the_window() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let u = unique();
    let listener = async_nats::connect(NATS_URL).await.unwrap();
    let _sink = listener.subscribe(format!("stall{u}.>")).await.unwrap();
    listener.flush().await.unwrap();
    let stream = format!("OUTBOX_AFTER_{u}");
    let js = jetstream().await;
    create_stream(&js, &stream, &[&format!("after{u}.>")]).await;
    let _cleanup = StreamCleanup(stream.clone());
    let config = NatsConfig::builder(NATS_URL)
        .max_in_flight(2)
        .ack_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let transport = NatsTransport::connect(config).await.unwrap();

    let stalled: Vec<Message> = (0..5).map(|i| message(&format!("stall{u}.x"), i)).collect();
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), transport.publish_batch(&stalled))
        .await
        .expect("the call returned");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    for e in &r {
        let e = e.as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(e.is_transient(), "{e}");
    }
    // More messages than the window: every slot came back.
    let after: Vec<Message> = (0..5).map(|i| message(&format!("after{u}.x"), i)).collect();
    let r = tokio::time::timeout(Duration::from_secs(10), transport.publish_batch(&after))
        .await
        .expect("the window's slots came back");
    assert!(r.iter().all(Result::is_ok), "{r:?}");
}

/// A TCP forwarder to the server whose connections the test can cut (the
/// listener stays, so the client reconnects through it).
struct Proxy {
    url: String,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = links.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let link = tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(NATS_ADDR).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                held.lock().unwrap().push(link.abort_handle());
            }
        });
        Proxy { url, links }
    }

    /// Closes every forwarded connection.
    fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

/// Acks awaited when the connection drops never come: the call fails those
/// messages at once as transient connection errors (not after
/// `ack_timeout`), and the transport publishes again once reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_awaited_over_a_lost_connection_fail_at_once() {
    if !outbox_core::testing::require_service("nats", NATS_ADDR) {
        return;
    }
    let u = unique();
    // Something answers the subject (so the server reports no missing
    // stream) but never acks.
    let listener = async_nats::connect(NATS_URL).await.unwrap();
    let mut sink = listener.subscribe(format!("cut{u}.>")).await.unwrap();
    listener.flush().await.unwrap();
    let stream = format!("OUTBOX_RECONNECTED_{u}");
    let js = jetstream().await;
    create_stream(&js, &stream, &[&format!("back{u}.>")]).await;
    let _cleanup = StreamCleanup(stream.clone());
    let proxy = Proxy::start().await;
    let config = NatsConfig::builder(&proxy.url)
        .ack_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let transport = std::sync::Arc::new(NatsTransport::connect(config).await.unwrap());

    let waiting: Vec<Message> = (0..5).map(|i| message(&format!("cut{u}.x"), i)).collect();
    let call = {
        let transport = transport.clone();
        tokio::spawn(async move { transport.publish_batch(&waiting).await })
    };
    // Sent (the sink has them all), and waiting for acks that will not come.
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(10), sink.next())
            .await
            .expect("the transport sent the batch")
            .expect("the sink is subscribed");
    }
    assert!(!call.is_finished(), "the call returned before the cut");
    proxy.cut();
    let r = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call returned after the cut, well before ack_timeout")
        .unwrap();
    assert_eq!(r.len(), 5);
    for e in &r {
        let e = e.as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
        assert!(e.is_transient(), "{e}");
    }
    // Reconnected through the proxy: a stream subject is stored again.
    let back: Vec<Message> = (0..5).map(|i| message(&format!("back{u}.x"), i)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), transport.publish_batch(&back))
            .await
            .expect("a publish after the reconnect returned");
        if r.iter().all(Result::is_ok) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never stored again: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
