//! The [`Transport`] trait: what a broker adapter implements.

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

/// The outcome of publishing one message of a batch.
pub type PublishResult = Result<()>;

/// Publishes messages to a broker and reports, per message, whether the
/// broker acknowledged it.
///
/// # Contract
///
/// - [`publish_batch`](Transport::publish_batch) returns exactly one result per
///   input message, in input order. (The relay treats a missing result as a
///   transient failure, but an adapter must not rely on that.)
/// - `Ok(())` means the broker acknowledged the message durably as far as the
///   broker offers: a publisher confirm, a JetStream PubAck, a Kafka delivery
///   report with `acks=all`, an XADD reply. A transport that cannot know
///   (core NATS, Redis Pub/Sub) documents so.
/// - A transport pipelines: it sends the whole batch without waiting for one
///   acknowledgement before sending the next, within a bounded window.
/// - Messages are sent in input order. The relay never passes two messages of
///   the same key in one call, so a transport need not stop after a failure.
/// - Every error says whether it is transient ([`Error::is_transient`]): a
///   transient error is retried with backoff, a permanent one dead-letters the
///   message at once. Client errors are converted into [`Error`]; none leaks.
/// - The broker receives the message id as its native dedup / message id where
///   it has one, so a re-publish after a crash can be recognised.
/// - Calls may run concurrently; the transport is shared behind an `Arc`.
/// - Nothing in a message coming from outside may make the transport panic.
#[async_trait]
pub trait Transport: Send + Sync {
    /// A short name for logs and metrics (`"nats"`, `"amqp"`, `"router"`).
    fn name(&self) -> &str;

    /// Publishes `messages` and returns one result per message, in order.
    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult>;

    /// The name of the transport that will carry messages of `topic`; a
    /// router answers with the routed transport's name. Used as the
    /// `transport` label of metrics.
    fn name_for(&self, topic: &str) -> &str {
        let _ = topic;
        self.name()
    }

    /// Flushes anything buffered and waits for outstanding acknowledgements;
    /// called once when the relay stops. The default does nothing.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Conveniences on every [`Transport`], so that an adapter implements only
/// the primitive.
#[async_trait]
pub trait TransportExt: Transport {
    /// Publishes a single message.
    async fn publish(&self, message: &Message) -> PublishResult {
        let mut results = self.publish_batch(std::slice::from_ref(message)).await;
        results
            .pop()
            .unwrap_or_else(|| Err(missing_result(self.name())))
    }
}

impl<T: Transport + ?Sized> TransportExt for T {}

/// The error recorded for a message a transport returned no result for.
pub(crate) fn missing_result(transport: &str) -> Error {
    Error::transient(
        ErrorKind::Other,
        "the transport returned no result for this message",
    )
    .with_backend(transport.to_string())
    .with_operation("publish")
}

#[async_trait]
impl<T: Transport + ?Sized> Transport for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        (**self).publish_batch(messages).await
    }
    fn name_for(&self, topic: &str) -> &str {
        (**self).name_for(topic)
    }
    async fn flush(&self) -> Result<()> {
        (**self).flush().await
    }
}
