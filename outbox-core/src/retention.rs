//! Retention: purging delivered rows that a store keeps (for audit or
//! debugging) once they are older than a window, in bounded batches.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::Result;
use crate::store::Purge;

/// How long delivered rows are kept and how they are purged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Delivered rows older than this are deleted.
    pub window: Duration,
    /// Rows per delete statement (keeps each transaction short).
    pub batch: usize,
    /// How often [`run`](Self::run) purges.
    pub every: Duration,
}

impl Retention {
    /// Keep delivered rows for `window`; purge every minute, 1,000 rows per
    /// statement.
    pub fn new(window: Duration) -> Self {
        Retention {
            window,
            batch: 1_000,
            every: Duration::from_secs(60),
        }
    }

    /// Sets the rows per statement (at least 1).
    pub fn batch(mut self, rows: usize) -> Self {
        self.batch = rows.max(1);
        self
    }

    /// Sets how often [`run`](Self::run) purges.
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Purges everything past the window now, batch after batch; returns how
    /// many rows it deleted.
    pub async fn purge(&self, store: &dyn Purge) -> Result<u64> {
        self.purge_until(store, &CancellationToken::new()).await
    }

    /// [`purge`](Self::purge), stopping between batches once `cancel` fires
    /// (a first purge of millions of kept rows must not hold up a shutdown).
    async fn purge_until(&self, store: &dyn Purge, cancel: &CancellationToken) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = store.purge_delivered(self.window, self.batch).await?;
            total += n;
            if n < self.batch as u64 || cancel.is_cancelled() {
                return Ok(total);
            }
            // Let other work in between batches.
            tokio::task::yield_now().await;
        }
    }

    /// Purges every [`every`](Self::every) until `cancel` fires. Errors are
    /// logged and retried at the next round.
    pub async fn run(&self, store: Arc<dyn Purge>, cancel: CancellationToken) {
        loop {
            match self.purge_until(store.as_ref(), &cancel).await {
                Ok(0) => {}
                Ok(n) => debug!(rows = n, "purged delivered outbox rows"),
                Err(e) => warn!(error = %e, "purging delivered outbox rows failed"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.every) => {}
            }
        }
    }
}
