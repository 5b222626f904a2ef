//! [`Signal`]: an in-process wakeup from code that enqueued to the relay.

use std::sync::Arc;

use tokio::sync::Notify;

/// A cheap, cloneable handle the application calls after committing a
/// transaction that enqueued messages, so that a relay in the same process
/// claims them at once instead of waiting for its poll interval.
///
/// Pass a clone to [`RelayBuilder::signal`](crate::RelayBuilder::signal).
/// Notifying when no relay waits is free; several notifications before the
/// relay wakes count as one.
#[derive(Clone, Debug, Default)]
pub struct Signal(Arc<Notify>);

impl Signal {
    /// A new signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes the relay (call after commit): every waiting lane, or the next
    /// one to wait.
    pub fn notify(&self) {
        self.0.notify_waiters();
        self.0.notify_one();
    }

    /// Resolves at the next notification (or at once if one is stored).
    pub async fn notified(&self) {
        self.0.notified().await
    }
}
