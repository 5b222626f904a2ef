//! Both conformance suites against the in-memory store and test transports.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outbox_core::testing::{
    store_conformance, transport_conformance, MemoryHarness, RecordingTransport, ScriptedTransport,
    TransportCase,
};

#[tokio::test(start_paused = true)]
async fn memory_store_passes_the_store_suite() {
    store_conformance(&MemoryHarness).await;
}

#[tokio::test]
async fn recording_transport_passes_the_transport_suite() {
    let t = RecordingTransport::new();
    transport_conformance(&t, &t, &TransportCase::new("conformance.recording")).await;
}

#[tokio::test]
async fn scripted_transport_classifies_a_rejection_as_permanent() {
    let t = ScriptedTransport::new().fail_topic_permanent("conformance.rejected");
    let case = TransportCase::new("conformance.scripted").rejected_topic("conformance.rejected");
    transport_conformance(&t, &t, &case).await;
}

#[tokio::test]
#[should_panic(expected = "must be rejected")]
async fn the_transport_suite_catches_a_transport_that_accepts_everything() {
    let t = RecordingTransport::new();
    let case = TransportCase::new("conformance.a").rejected_topic("conformance.b");
    tokio::time::timeout(
        Duration::from_secs(30),
        transport_conformance(&t, &t, &case),
    )
    .await
    .unwrap();
}
