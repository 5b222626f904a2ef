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

/// How old a scratch name must be before [`stale_scratch`] calls it a
/// leftover: longer than any test run takes.
pub const SCRATCH_TTL: std::time::Duration = std::time::Duration::from_secs(3 * 3600);

/// A name for one test's scratch schema or database,
/// `{prefix}_{unix seconds}_{random}`: the time in it lets a later run
/// remove what this one leaves behind ([`stale_scratch`]) without touching
/// a run still going.
pub fn scratch_name(prefix: &str) -> String {
    format!("{prefix}_{}_{:08x}", unix_secs(), fastrand::u32(..))
}

/// Whether `name` is a [`scratch_name`] with `prefix` older than
/// [`SCRATCH_TTL`].
pub fn stale_scratch(prefix: &str, name: &str) -> bool {
    let Some((secs, random)) = name
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .and_then(|rest| rest.split_once('_'))
    else {
        return false;
    };
    let hex = random.len() == 8 && random.bytes().all(|b| b.is_ascii_hexdigit());
    match secs.parse::<u64>() {
        Ok(made) if hex => unix_secs().saturating_sub(made) > SCRATCH_TTL.as_secs(),
        _ => false,
    }
}

/// Of `names` (schemas or databases on a test server), those that are
/// stale [`scratch_name`]s with one of `prefixes`: what a test binary drops
/// before its first test.
pub fn stale_names(prefixes: &[&str], names: Vec<String>) -> Vec<String> {
    names
        .into_iter()
        .filter(|n| prefixes.iter().any(|p| stale_scratch(p, n)))
        .collect()
}

/// True the first time it is called with `once` (a `static`), so that a
/// test binary sweeps stale scratch names once, not per test.
pub fn first_time(once: &std::sync::Once) -> bool {
    let mut first = false;
    once.call_once(|| first = true);
    first
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_go_stale_after_the_ttl_only() {
        let fresh = scratch_name("t");
        assert!(fresh.starts_with("t_"), "{fresh}");
        assert!(!stale_scratch("t", &fresh));
        let old = format!("t_{}_0badcafe", unix_secs() - SCRATCH_TTL.as_secs() - 60);
        assert!(stale_scratch("t", &old));
        assert!(!stale_scratch("m", &old), "another prefix");
        for other in [
            "t_ca852cebb514",
            "t_12_xyz",
            "t_12_0badcafe0",
            "tt_1_0badcafe",
            "t",
        ] {
            assert!(!stale_scratch("t", other), "{other}");
        }
        let names = vec![fresh.clone(), old.clone(), format!("m{}", &old[1..])];
        assert_eq!(
            stale_names(&["t", "m"], names),
            vec![old.clone(), format!("m{}", &old[1..])]
        );
        static ONCE: std::sync::Once = std::sync::Once::new();
        assert!(first_time(&ONCE));
        assert!(!first_time(&ONCE));
    }
}
