//! Every metric the toolkit records, in one place.
//!
//! Metrics go through the [`metrics`](https://docs.rs/metrics) facade: install
//! any recorder (Prometheus, StatsD, ...) in the application and they appear.
//! Labels: `topic` (message topic), `transport` (the transport that carried
//! it, as named by [`Transport::name_for`](crate::Transport::name_for)),
//! `store` (the store's name), `state` (a relay state) and `error` (`transient`
//! or `permanent`).

/// Counter, labels `topic`, `transport`: messages the broker acknowledged.
pub const PUBLISHED: &str = "outbox_published_total";
/// Counter, labels `topic`, `transport`, `error`: failed publish attempts.
pub const FAILED: &str = "outbox_failed_total";
/// Counter, labels `topic`, `transport`: messages dead-lettered.
pub const DEAD_LETTERED: &str = "outbox_dead_lettered_total";
/// Histogram (seconds), label `transport`: duration of one publish call for a
/// batch (from send to the last acknowledgement).
pub const PUBLISH_DURATION: &str = "outbox_publish_duration_seconds";
/// Histogram (seconds), labels `topic`, `transport`: from a message's
/// `created_at` to its acknowledgement (commit-to-publish latency, measured
/// with the enqueuing process's clock).
pub const COMMIT_TO_PUBLISH: &str = "outbox_commit_to_publish_seconds";
/// Histogram (messages), label `store`: messages per non-empty claim.
pub const BATCH_SIZE: &str = "outbox_batch_size";
/// Histogram (seconds), label `store`: duration of a claim.
pub const CLAIM_DURATION: &str = "outbox_claim_duration_seconds";
/// Histogram (seconds), label `store`: duration of a settle.
pub const SETTLE_DURATION: &str = "outbox_settle_duration_seconds";
/// Counter, label `store`: settlements that touched fewer rows than they
/// named because a lease was lost to another relay.
pub const LEASE_LOST: &str = "outbox_lease_lost_total";
/// Counter, labels `store`, `operation`: store calls that failed.
pub const STORE_ERRORS: &str = "outbox_store_errors_total";
/// Counter, label `state`: relay state transitions, by the state entered.
pub const RELAY_TRANSITIONS: &str = "outbox_relay_transitions_total";
/// Gauge, label `store`: messages waiting (pending, leased or retrying).
pub const BACKLOG: &str = "outbox_backlog";
/// Gauge (seconds), label `store`: age of the oldest waiting message.
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
/// Gauge, label `store`: dead-lettered messages.
pub const DEAD: &str = "outbox_dead";

/// All names above with their kind, for exporters that describe metrics.
pub const ALL: &[(&str, &str)] = &[
    (PUBLISHED, "counter"),
    (FAILED, "counter"),
    (DEAD_LETTERED, "counter"),
    (PUBLISH_DURATION, "histogram"),
    (COMMIT_TO_PUBLISH, "histogram"),
    (BATCH_SIZE, "histogram"),
    (CLAIM_DURATION, "histogram"),
    (SETTLE_DURATION, "histogram"),
    (LEASE_LOST, "counter"),
    (STORE_ERRORS, "counter"),
    (RELAY_TRANSITIONS, "counter"),
    (BACKLOG, "gauge"),
    (OLDEST_PENDING_AGE, "gauge"),
    (DEAD, "gauge"),
];

/// Registers a description for every metric with the installed recorder.
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(PUBLISHED, "Messages the broker acknowledged");
    describe_counter!(FAILED, "Failed publish attempts");
    describe_counter!(DEAD_LETTERED, "Messages dead-lettered");
    describe_histogram!(
        PUBLISH_DURATION,
        Unit::Seconds,
        "Duration of one publish call"
    );
    describe_histogram!(
        COMMIT_TO_PUBLISH,
        Unit::Seconds,
        "From enqueue to acknowledgement"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Messages per claim");
    describe_histogram!(CLAIM_DURATION, Unit::Seconds, "Duration of a claim");
    describe_histogram!(SETTLE_DURATION, Unit::Seconds, "Duration of a settle");
    describe_counter!(LEASE_LOST, "Settlements that lost rows to another relay");
    describe_counter!(STORE_ERRORS, "Store calls that failed");
    describe_counter!(
        RELAY_TRANSITIONS,
        "Relay state transitions by state entered"
    );
    describe_gauge!(BACKLOG, "Messages waiting");
    describe_gauge!(
        OLDEST_PENDING_AGE,
        Unit::Seconds,
        "Age of the oldest waiting message"
    );
    describe_gauge!(DEAD, "Dead-lettered messages");
}
