#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod error;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod redact;
pub mod relay;
pub mod retention;
pub mod retry;
pub mod router;
pub mod settings;
pub mod signal;
pub mod store;
pub mod transport;
pub mod watch;
pub mod wire;

#[cfg(feature = "testing")]
pub mod testing;

pub use error::{Error, ErrorKind, Result, ValidationError};
pub use message::{Headers, Message, MessageBuilder, MessageId};
pub use relay::{
    Relay, RelayBuilder, RelayConfig, RelayReport, RunningRelay, StateName, MAX_ERROR_TEXT,
};
pub use retention::Retention;
pub use retry::RetryPolicy;
pub use router::{Route, Router, RouterBuilder};
pub use signal::Signal;
pub use store::{
    Claim, ClaimRequest, DeadLetter, DeadLetters, Failure, FencingToken, Lease, Purge, RelayId,
    Retry, Selector, SettleReport, Settlement, Stats, Store,
};
pub use transport::{PublishResult, Transport, TransportExt};
pub use watch::{TransportHealth, WatchedTransport};

/// Re-exported so applications need not depend on tokio-util for the
/// token that stops a relay.
pub use tokio_util::sync::CancellationToken;
