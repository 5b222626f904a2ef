//! Whether each transport delivers: every route's transport is wrapped in a
//! [`Watched`] that remembers since when its publishes have been failing,
//! so that `/health` can say so instead of answering `ok` while a broker is
//! down.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{Message, PublishResult, Result, Transport};

/// What one transport has been doing.
#[derive(Debug)]
pub(crate) struct Watch {
    /// The transport URL, credentials hidden.
    url: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Set by the first failing call after a success; cleared by a success.
    failing_since: Option<Instant>,
    /// The error of the latest failing call.
    last_error: Option<String>,
}

impl Watch {
    fn new(url: String) -> Self {
        Watch {
            url,
            state: Mutex::new(State::default()),
        }
    }

    /// `Some(why)` when every publish for at least `after` has failed with
    /// a transient error (a broker or network problem, not a bad message).
    pub(crate) fn failing(&self, after: Duration) -> Option<String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let since = state.failing_since?;
        let failing_for = since.elapsed();
        (failing_for >= after).then(|| {
            format!(
                "transport {} failing for {} s: {}",
                self.url,
                failing_for.as_secs(),
                state.last_error.as_deref().unwrap_or("unknown error")
            )
        })
    }

    /// Records one call's results.
    fn record(&self, results: &[PublishResult]) {
        let delivered = results.iter().any(|r| r.is_ok());
        // A permanent error is about the message (too large, rejected
        // header), not about the broker being reachable.
        let broken = results
            .iter()
            .find_map(|r| r.as_ref().err().filter(|e| e.is_transient()));
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

/// A transport whose outcomes feed a [`Watch`].
pub(crate) struct Watched {
    inner: Arc<dyn Transport>,
    watch: Arc<Watch>,
}

impl Watched {
    /// Wraps `inner`, reachable at `url` (credentials already hidden).
    pub(crate) fn new(inner: Arc<dyn Transport>, url: String) -> (Self, Arc<Watch>) {
        let watch = Arc::new(Watch::new(url));
        (
            Watched {
                inner,
                watch: watch.clone(),
            },
            watch,
        )
    }
}

#[async_trait]
impl Transport for Watched {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        let results = self.inner.publish_batch(messages).await;
        self.watch.record(&results);
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
    use outbox_core::{Error, ErrorKind};

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
        let w = Watch::new("nats://127.0.0.1:4222".into());
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
        let w = Watch::new("redis://127.0.0.1:6379".into());
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
    fn the_failure_keeps_its_start_time() {
        let w = Watch::new("amqp://127.0.0.1:5672".into());
        w.record(&[transient()]);
        std::thread::sleep(Duration::from_millis(30));
        w.record(&[transient()]);
        assert!(
            w.failing(Duration::from_millis(30)).is_some(),
            "measured from the first failure, not the latest"
        );
    }
}
