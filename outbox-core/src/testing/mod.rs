//! Test kit (feature `testing`): an in-memory store, test transports and the
//! conformance suites adapter crates run against their real servers.
//!
//! A third-party adapter calls [`transport_conformance`] (or
//! [`store_conformance`]) from its own tests with a fresh namespace per test.

mod memory;
pub mod restart;
pub mod store_conformance;
pub mod transport_conformance;
mod transports;

pub use memory::{MemoryStore, RowInfo, StoreOptions};
pub use restart::{restart_drill, DrillReport, RestartDrill};
pub use store_conformance::{store_conformance, StoreHarness};
pub use transport_conformance::{transport_conformance, Probe, Received, TransportCase};
pub use transports::{RecordingTransport, ScriptedTransport};

use async_trait::async_trait;

use crate::error::Result;
use crate::message::Message;

/// The harness for [`MemoryStore`], so the core runs its own suite.
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryHarness;

#[async_trait]
impl StoreHarness for MemoryHarness {
    type Store = MemoryStore;

    async fn store(&self, options: StoreOptions) -> MemoryStore {
        MemoryStore::with_options(options)
    }

    async fn enqueue(&self, store: &MemoryStore, messages: Vec<Message>) -> Result<()> {
        store.enqueue(messages).map(|_| ())
    }
}

/// Whether a test that needs the server at `addr` (`host:port`) may run.
///
/// Returns `true` when something accepts TCP connections there. Otherwise,
/// when `OUTBOX_REQUIRE_SERVICES=1` (CI sets it) it panics, and else it prints
/// why the test is skipped and returns `false`:
///
/// ```text
/// if !outbox_core::testing::require_service("nats", "127.0.0.1:4222") { return; }
/// ```
pub fn require_service(name: &str, addr: &str) -> bool {
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| {
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).is_ok()
        });
    if reachable {
        return true;
    }
    if std::env::var("OUTBOX_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!("{name} is required (OUTBOX_REQUIRE_SERVICES=1) but nothing listens on {addr}; run scripts/services.sh");
    }
    println!("skipped: {name} is not reachable on {addr} (set OUTBOX_REQUIRE_SERVICES=1 to fail instead)");
    false
}
