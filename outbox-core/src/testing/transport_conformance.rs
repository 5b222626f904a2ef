//! The transport conformance suite: every [`Transport`] runs it against its
//! real broker, with a [`Probe`] (a subscriber) that reports what arrived.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::message::{Headers, Message, MessageId};
use crate::transport::{Transport, TransportExt};

/// A message as a subscriber on the broker received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The message id, read from the broker's native id field or header.
    pub id: Option<MessageId>,
    /// The key, as carried by the broker.
    pub key: Option<String>,
    /// The headers as received (a broker may add its own).
    pub headers: Headers,
    /// The payload bytes.
    pub payload: Bytes,
}

/// A subscriber on the real broker, set up by the caller for the case's topic
/// before the suite publishes.
#[async_trait]
pub trait Probe: Send + Sync {
    /// Everything received so far on the case's topic, after waiting until at
    /// least `count` messages arrived or `timeout` passed.
    async fn received(&self, count: usize, timeout: Duration) -> Vec<Received>;
}

/// What the suite publishes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TransportCase {
    /// The topic to publish on; the probe listens there. Make it unique per run.
    pub topic: String,
    /// A topic the broker refuses for good (no stream, unroutable, wrong
    /// type): a message there must fail with a permanent error while the rest
    /// of its batch succeeds. `None` skips that check.
    pub rejected_topic: Option<String>,
    /// Messages in the main batch (default 200).
    pub batch: usize,
    /// How long the probe may take to see everything (default 10 s).
    pub timeout: Duration,
}

impl TransportCase {
    /// A case publishing on `topic`.
    pub fn new(topic: impl Into<String>) -> Self {
        TransportCase {
            topic: topic.into(),
            rejected_topic: None,
            batch: 200,
            timeout: Duration::from_secs(10),
        }
    }

    /// Sets a topic the broker rejects permanently.
    pub fn rejected_topic(mut self, topic: impl Into<String>) -> Self {
        self.rejected_topic = Some(topic.into());
        self
    }

    /// Sets the batch size.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n;
        self
    }
}

fn sample(topic: &str, i: usize) -> Message {
    let payload: Bytes = match i {
        0 => Bytes::new(),
        1 => Bytes::from_static(&[0, 159, 146, 150, 255, b'\n', 0]),
        2 => Bytes::from(vec![b'x'; 64 * 1024]),
        _ => Bytes::from(format!("{{\"n\":{i},\"text\":\"héllo ✓\"}}")),
    };
    let mut b = Message::builder(topic, payload)
        .header("x-index", i.to_string())
        .header("x-unicode", "é✓ ok")
        .header("x-spaces", "a value with spaces");
    if !i.is_multiple_of(3) {
        b = b.key(format!("key-{i}"));
    }
    b.build().expect("valid sample message")
}

/// Runs the suite; panics with a description on the first failure.
pub async fn transport_conformance(
    transport: &dyn Transport,
    probe: &dyn Probe,
    case: &TransportCase,
) {
    let name = transport.name().to_string();
    assert!(!name.is_empty(), "a transport has a name");

    let empty = transport.publish_batch(&[]).await;
    assert!(empty.is_empty(), "{name}: an empty batch gives no results");
    println!("transport conformance ({name}): empty batch ok");

    let sent: Vec<Message> = (0..case.batch.max(3))
        .map(|i| sample(&case.topic, i))
        .collect();
    let results = transport.publish_batch(&sent).await;
    assert_eq!(results.len(), sent.len(), "{name}: one result per message");
    for (m, r) in sent.iter().zip(&results) {
        if let Err(e) = r {
            panic!("{name}: message {} failed: {e}", m.id);
        }
    }
    println!(
        "transport conformance ({name}): batch of {} acknowledged",
        sent.len()
    );

    let single = sample(&case.topic, sent.len());
    transport
        .publish(&single)
        .await
        .unwrap_or_else(|e| panic!("{name}: single publish failed: {e}"));

    let mut all = sent.clone();
    all.push(single);
    let got = probe.received(all.len(), case.timeout).await;
    let by_id: HashMap<MessageId, &Received> =
        got.iter().filter_map(|r| r.id.map(|id| (id, r))).collect();
    for m in &all {
        let r = by_id.get(&m.id).unwrap_or_else(|| {
            panic!(
                "{name}: message {} never arrived ({} arrived)",
                m.id,
                got.len()
            )
        });
        assert_eq!(r.payload, m.payload, "{name}: payload of {} intact", m.id);
        assert_eq!(r.key, m.key, "{name}: key of {} intact", m.id);
        for (k, v) in &m.headers {
            assert_eq!(
                r.headers.get(k),
                Some(v),
                "{name}: header {k} of {} intact (got {:?})",
                m.id,
                r.headers
            );
        }
    }
    println!(
        "transport conformance ({name}): {} messages arrived with id, key, headers and payload intact",
        all.len()
    );

    // Keyed messages of one call arrive in the order sent.
    let pos: HashMap<MessageId, usize> = got
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.id.map(|id| (id, i)))
        .collect();
    let keyed: Vec<usize> = sent
        .iter()
        .filter(|m| m.key.is_some())
        .map(|m| pos[&m.id])
        .collect();
    assert!(
        keyed.windows(2).all(|w| w[0] < w[1]),
        "{name}: messages arrive in the order sent"
    );

    // A re-publish (after a crash, say) is acknowledged; the broker may drop it.
    let again = transport.publish_batch(&all[3..4]).await;
    assert!(
        matches!(again.as_slice(), [Ok(())]),
        "{name}: a duplicate publish is acknowledged: {again:?}"
    );
    println!("transport conformance ({name}): duplicate publish acknowledged");

    if let Some(bad) = &case.rejected_topic {
        let batch = vec![
            sample(&case.topic, 10_001),
            sample(bad, 10_002),
            sample(&case.topic, 10_003),
        ];
        let r = transport.publish_batch(&batch).await;
        assert_eq!(r.len(), 3, "{name}: one result per message");
        assert!(
            r[0].is_ok(),
            "{name}: a good message beside a rejected one succeeds: {:?}",
            r[0]
        );
        assert!(
            r[2].is_ok(),
            "{name}: a good message beside a rejected one succeeds: {:?}",
            r[2]
        );
        match &r[1] {
            Ok(()) => panic!("{name}: a message to {bad:?} must be rejected"),
            Err(e) => assert!(!e.is_transient(), "{name}: the rejection is permanent: {e}"),
        }
        println!("transport conformance ({name}): rejected message classified as permanent");
    }
}
