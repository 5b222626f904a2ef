//! Whether a transport delivers: [`WatchedTransport`] wraps a transport and
//! keeps, in a shared [`TransportHealth`], since when every publish has been
//! failing, so that a health check can say so instead of answering `ok`
//! while a broker is down. The `outbox-relay` binary's `/health` uses it;
//! an application that embeds a relay can do the same:
//!
//! ```no_run
//! use std::{sync::Arc, time::Duration};
//! use outbox_core::{Transport, WatchedTransport};
//!
//! fn watch(nats: Arc<dyn Transport>) -> Arc<dyn Transport> {
//!     let (watched, health) = WatchedTransport::new(nats, "nats://127.0.0.1:4222");
//!     tokio::spawn(async move {
//!         let mut every = tokio::time::interval(Duration::from_secs(10));
//!         loop {
//!             every.tick().await;
//!             if let Some(why) = health.failing(Duration::from_secs(60)) {
//!                 eprintln!("unhealthy: {why}");
//!             }
//!         }
//!     });
//!     Arc::new(watched)
//! }
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::Result;
use crate::message::Message;
use crate::transport::{PublishResult, Transport};

/// What one transport has been doing, shared with its [`WatchedTransport`].
#[derive(Debug)]
pub struct TransportHealth {
    /// How the transport is named in reports (a URL without credentials).
    name: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Set by the first failing call after a success; cleared by a success.
    failing_since: Option<Instant>,
    /// The error of the latest failing call.
    last_error: Option<String>,
}

impl TransportHealth {
    fn new(name: String) -> Self {
        TransportHealth {
            name,
            state: Mutex::new(State::default()),
        }
    }

    /// `Some(why)` when every publish for at least `after` has failed with
    /// a transient error (a broker or network problem, not a bad message);
    /// `why` names the transport, says for how long and gives the latest
    /// error. `None` before any publish and after any delivery.
    pub fn failing(&self, after: Duration) -> Option<String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let since = state.failing_since?;
        let failing_for = since.elapsed();
        (failing_for >= after).then(|| {
            format!(
                "transport {} failing for {} s: {}",
                self.name,
                failing_for.as_secs(),
                state.last_error.as_deref().unwrap_or("unknown error")
            )
        })
    }

    /// Records one call's results.
    fn record(&self, results: &[PublishResult]) {
        let delivered = results.iter().any(|r| r.is_ok());
        // A permanent error is about the message (too large, rejected
        // header), not about the broker being reachable; one that left the
        // message unsent (credentials refused on a reconnect) is about the
        // broker.
        let broken = results.iter().find_map(|r| {
            r.as_ref()
                .err()
                .filter(|e| e.is_transient() || e.is_unsent())
        });
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if delivered {
            state.failing_since = None;
            state.last_error = None;
        } else if let Some(e) = broken {
            state.failing_since.get_or_insert_with(Instant::now);
            state.last_error = Some(e.to_string());
        }
    }
}

/// A transport whose outcomes feed a [`TransportHealth`]; otherwise it is
/// the transport it wraps (same name, results and flush).
pub struct WatchedTransport {
    inner: Arc<dyn Transport>,
    health: Arc<TransportHealth>,
}

impl std::fmt::Debug for WatchedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedTransport")
            .field("transport", &self.inner.name())
            .field("health", &self.health)
            .finish()
    }
}

impl WatchedTransport {
    /// Wraps `inner`, named `name` in reports (a URL: hide its credentials
    /// first). Returns the transport to hand to the relay or a router, and
    /// the health to read.
    pub fn new(inner: Arc<dyn Transport>, name: impl Into<String>) -> (Self, Arc<TransportHealth>) {
        let health = Arc::new(TransportHealth::new(name.into()));
        (
            WatchedTransport {
                inner,
                health: health.clone(),
            },
            health,
        )
    }
}

#[async_trait]
impl Transport for WatchedTransport {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        let results = self.inner.publish_batch(messages).await;
        self.health.record(&results);
        results
    }

    fn name_for(&self, topic: &str) -> &str {
        self.inner.name_for(topic)
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorKind};

    fn transient() -> PublishResult {
        Err(Error::transient(
            ErrorKind::Connection,
            "connection refused",
        ))
    }

    fn permanent() -> PublishResult {
        Err(Error::permanent(ErrorKind::TooLarge, "too large"))
    }

    #[test]
    fn failing_after_the_threshold_until_a_success() {
        let w = TransportHealth::new("nats://127.0.0.1:4222".into());
        assert_eq!(w.failing(Duration::ZERO), None, "nothing published yet");
        w.record(&[Ok(()), Ok(())]);
        assert_eq!(w.failing(Duration::ZERO), None);
        w.record(&[transient(), transient()]);
        let why = w.failing(Duration::ZERO).unwrap();
        assert!(
            why.starts_with("transport nats://127.0.0.1:4222 failing for 0 s"),
            "{why}"
        );
        assert!(why.contains("connection refused"), "{why}");
        assert_eq!(
            w.failing(Duration::from_secs(60)),
            None,
            "not failing long enough yet"
        );
        w.record(&[transient(), Ok(())]);
        assert_eq!(w.failing(Duration::ZERO), None, "one delivery is enough");
    }

    #[test]
    fn a_bad_message_does_not_make_the_broker_unhealthy() {
        let w = TransportHealth::new("redis://127.0.0.1:6379".into());
        w.record(&[permanent()]);
        assert_eq!(w.failing(Duration::ZERO), None);
        w.record(&[]);
        assert_eq!(
            w.failing(Duration::ZERO),
            None,
            "an empty call says nothing"
        );
    }

    #[test]
    fn refused_credentials_on_a_reconnect_make_the_broker_unhealthy() {
        let w = TransportHealth::new("amqp://127.0.0.1:5672".into());
        let refused =
            Err(crate::Error::permanent(crate::ErrorKind::Unauthorized, "access refused").unsent());
        w.record(&[refused]);
        assert!(w.failing(Duration::ZERO).is_some(), "nothing was sent");
    }

    #[test]
    fn the_failure_keeps_its_start_time() {
        let w = TransportHealth::new("amqp://127.0.0.1:5672".into());
        w.record(&[transient()]);
        std::thread::sleep(Duration::from_millis(30));
        w.record(&[transient()]);
        assert!(
            w.failing(Duration::from_millis(30)).is_some(),
            "measured from the first failure, not the latest"
        );
    }
}
