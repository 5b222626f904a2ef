//! Relay behaviour on the in-memory store, on tokio's paused clock.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::testing::{MemoryStore, RecordingTransport, ScriptedTransport, StoreOptions};
use outbox_core::{
    CancellationToken, DeadLetters, Message, MessageId, PublishResult, Relay, RelayReport,
    RetryPolicy, Selector, Store, Transport,
};
use tokio::time::Instant;

fn msg(key: Option<&str>) -> Message {
    let b = Message::builder("orders.placed", "{}");
    match key {
        Some(k) => b.key(k),
        None => b,
    }
    .build()
    .unwrap()
}

fn no_jitter(initial_ms: u64, cap_ms: u64) -> RetryPolicy {
    RetryPolicy::exponential(
        Duration::from_millis(initial_ms),
        2.0,
        Duration::from_millis(cap_ms),
    )
    .with_jitter(0.0)
}

/// Every enqueued message was published exactly once, and messages of one
/// key in the order they were enqueued.
fn assert_once_in_key_order(enqueued: &[Message], published: &[Message]) {
    let position: HashMap<MessageId, usize> = enqueued
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id, i))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<Option<String>, usize> = HashMap::new();
    for m in published {
        assert!(seen.insert(m.id), "{} published twice", m.id);
        let at = position[&m.id];
        if m.key.is_some() {
            if let Some(before) = last.insert(m.key.clone(), at) {
                assert!(before < at, "key {:?}: {at} after {before}", m.key);
            }
        }
    }
    assert_eq!(seen.len(), enqueued.len(), "every message published");
}

/// Records when each publish attempt happened and how it ended.
#[derive(Clone)]
struct Timed {
    inner: Arc<dyn Transport>,
    log: Arc<Mutex<Vec<(Instant, MessageId, bool)>>>,
}

impl Timed {
    fn new(inner: Arc<dyn Transport>) -> Self {
        Timed {
            inner,
            log: Arc::default(),
        }
    }
    fn attempts(&self, id: MessageId) -> Vec<(Instant, bool)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, i, _)| *i == id)
            .map(|(t, _, ok)| (*t, *ok))
            .collect()
    }
}

#[async_trait]
impl Transport for Timed {
    fn name(&self) -> &str {
        "timed"
    }
    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        let r = self.inner.publish_batch(messages).await;
        let now = Instant::now();
        let mut log = self.log.lock().unwrap();
        for (m, r) in messages.iter().zip(&r) {
            log.push((now, m.id, r.is_ok()));
        }
        r
    }
}

#[tokio::test(start_paused = true)]
async fn relay_dropped_mid_batch_and_restarted_loses_nothing() {
    let store = Arc::new(MemoryStore::new());
    let ids = store
        .enqueue((0..100).map(|i| msg(Some(&format!("k{}", i % 7)))))
        .unwrap();
    let slow = ScriptedTransport::new().slow(Duration::from_secs(5));
    let first = Relay::builder(store.clone(), Arc::new(slow.clone()))
        .lease(Duration::from_secs(30))
        .build()
        .unwrap();
    let task = tokio::spawn(async move { first.run(CancellationToken::new()).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        store.leased() > 0,
        "the first relay holds a claim mid-batch"
    );
    task.abort(); // the process dies: no shutdown, no settle
    let _ = task.await;

    let rec = RecordingTransport::new();
    let second = Relay::builder(store.clone(), Arc::new(rec.clone()))
        .poll_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { second.run(cancel).await }
    });
    assert_eq!(rec.wait_for(100, Duration::from_secs(120)).await, 100);
    cancel.cancel();
    run.await.unwrap();
    let got: Vec<MessageId> = rec.messages().iter().map(|m| m.id).collect();
    for id in &ids {
        assert!(got.contains(id), "{id} was lost");
    }
    assert_eq!(store.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_hands_work_over_and_the_stale_settle_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let ids = store.enqueue((0..10).map(|_| msg(None))).unwrap();
    // The first relay's publish outlives its lease.
    let slow = ScriptedTransport::new().slow(Duration::from_secs(10));
    let a = Relay::builder(store.clone(), Arc::new(slow.clone()))
        .lease(Duration::from_secs(2))
        .build()
        .unwrap();
    let rec = RecordingTransport::new();
    let b = Relay::builder(store.clone(), Arc::new(rec.clone()))
        .lease(Duration::from_secs(2))
        .build()
        .unwrap();
    let a_run = tokio::spawn(async move { a.relay_once().await.unwrap() });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b_report = b.relay_once().await.unwrap();
    assert_eq!(
        b_report.published, 10,
        "after the lease expired another relay took over"
    );
    let a_report = a_run.await.unwrap();
    assert_eq!(a_report.published, 0, "the stale settle changed nothing");
    assert_eq!(a_report.lease_lost, 10);
    assert_eq!(rec.len(), 10);
    assert_eq!(
        slow.recorder().len(),
        10,
        "the duplicates came from the lost lease only"
    );
    for id in ids {
        assert!(store.row(&id).is_none(), "delivered rows are gone");
    }
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_is_capped_and_survives_a_restart() {
    let store = Arc::new(MemoryStore::new());
    let id = store.enqueue([msg(Some("k"))]).unwrap()[0];
    let failing = ScriptedTransport::new().fail_transient(5);
    let timed = Timed::new(Arc::new(failing.clone()));
    let build = || {
        Relay::builder(store.clone(), Arc::new(timed.clone()))
            .retry(no_jitter(1_000, 4_000))
            .poll_interval(Duration::from_millis(10))
            .max_attempts(10)
            .build()
            .unwrap()
    };
    // First relay: two failures, then it is stopped.
    let cancel = CancellationToken::new();
    let relay = build();
    let run = tokio::spawn({
        let c = cancel.clone();
        async move { relay.run(c).await }
    });
    while timed.attempts(id).len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel.cancel();
    run.await.unwrap();
    assert_eq!(store.row(&id).unwrap().attempts, 2, "attempts are stored");

    // A new relay (no memory of the old one) keeps the stored schedule.
    let cancel = CancellationToken::new();
    let relay = build();
    let run = tokio::spawn({
        let c = cancel.clone();
        async move { relay.run(c).await }
    });
    while !timed.attempts(id).last().is_some_and(|a| a.1) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel.cancel();
    run.await.unwrap();

    let times: Vec<Instant> = timed.attempts(id).iter().map(|a| a.0).collect();
    assert_eq!(times.len(), 6, "five failures, then success");
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    let expected = [1_000u128, 2_000, 4_000, 4_000, 4_000];
    for (gap, want) in gaps.iter().zip(expected) {
        assert!(
            *gap >= want && *gap <= want + 50,
            "gaps {gaps:?} should follow {expected:?} (poll granularity 10 ms)"
        );
    }
}

/// Seeded cases: random keys and messages, two relays taking turns with small
/// random batches against a transport that fails at random. Every message
/// is published exactly once and each key in order. With `ahead`, the store
/// claims ahead and each turn drains (pipelined) instead of relaying one
/// batch. Returns how many claims were taken ahead.
async fn random_cases(seed: u64, cases: usize, ahead: bool) -> u64 {
    let (max_keys, max_n, max_fail, max_batch) = if ahead {
        (6, 60, 0.5, 8)
    } else {
        (5, 40, 0.6, 12)
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut claims_ahead = 0;
    for case in 0..cases {
        let seed = rng.u64(..);
        let mut r = fastrand::Rng::with_seed(seed);
        let options = StoreOptions::default()
            .claim_ahead(ahead)
            .hold_dead_letters(ahead && r.bool());
        let store = Arc::new(MemoryStore::with_options(options));
        let keys = r.usize(1..max_keys);
        let n = r.usize(1..max_n);
        let ms: Vec<Message> = (0..n)
            .map(|_| {
                let k = r.usize(0..=keys);
                msg((k < keys).then(|| format!("k{k}")).as_deref())
            })
            .collect();
        let order: HashMap<MessageId, (Option<String>, usize)> = ms
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id, (m.key.clone(), i)))
            .collect();
        store.enqueue(ms).unwrap();
        let transport = ScriptedTransport::new().fail_randomly(r.f64() * max_fail, seed);
        let relays: Vec<Relay> = (0..2)
            .map(|_| {
                Relay::builder(store.clone(), Arc::new(transport.clone()))
                    .batch_size(r.usize(1..max_batch))
                    .max_attempts(1_000)
                    .retry(no_jitter(10, 40))
                    .build()
                    .unwrap()
            })
            .collect();
        let mut turns = 0;
        while store.pending() > 0 {
            let relay = &relays[turns % 2];
            if ahead {
                relay.drain().await.unwrap();
            } else {
                relay.relay_once().await.unwrap();
            }
            turns += 1;
            if ahead || turns % 3 == 0 {
                tokio::time::advance(Duration::from_millis(r.u64(1..50))).await;
            }
            assert!(turns < 100_000, "case {case} (seed {seed}) did not drain");
        }
        assert_eq!(store.leased(), 0, "case {case}: nothing stays leased");
        claims_ahead += store.claims_ahead();
        let published = transport.recorder().messages();
        assert_eq!(
            published.len(),
            n,
            "case {case} (seed {seed}): each message published once"
        );
        let mut last: HashMap<String, usize> = HashMap::new();
        for m in &published {
            let (key, pos) = &order[&m.id];
            if let Some(k) = key {
                if let Some(prev) = last.insert(k.clone(), *pos) {
                    assert!(
                        prev < *pos,
                        "case {case} (seed {seed}): key {k} published {pos} after {prev}"
                    );
                }
            }
        }
    }
    claims_ahead
}

#[tokio::test(start_paused = true)]
async fn per_key_order_holds_under_random_transient_failures() {
    random_cases(0x07b0c5, 2_000, false).await;
    println!("per-key order held in 2000 seeded cases");
}

#[tokio::test(start_paused = true)]
async fn a_failure_holds_back_later_messages_of_its_key_only() {
    let store = Arc::new(MemoryStore::new());
    let ids = store
        .enqueue([
            msg(Some("a")),
            msg(Some("a")),
            msg(Some("b")),
            msg(Some("a")),
        ])
        .unwrap();
    let transport = ScriptedTransport::new().fail_key_transient("a", 1);
    let relay = Relay::builder(store.clone(), Arc::new(transport.clone()))
        .retry(no_jitter(1_000, 1_000))
        .build()
        .unwrap();
    let report = relay.relay_once().await.unwrap();
    assert_eq!(report.published, 1, "key b went on");
    assert_eq!(report.retried, 1);
    assert_eq!(
        report.released, 2,
        "a2 and a3 were not published but released"
    );
    assert_eq!(transport.attempts(&ids[1]), 0);
    assert_eq!(transport.attempts(&ids[3]), 0);
    assert_eq!(
        relay.relay_once().await.unwrap().batches,
        0,
        "key a waits for its retry"
    );
    // Each message of key a fails its first attempt, so the key advances one
    // message per retry period, in order.
    for _ in 0..4 {
        tokio::time::advance(Duration::from_millis(1_001)).await;
        relay.drain().await.unwrap();
    }
    assert_eq!(store.pending(), 0);
    let order: Vec<MessageId> = transport
        .recorder()
        .messages()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(order, vec![ids[2], ids[0], ids[1], ids[3]]);
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_dead_letter_at_once_transient_after_max_attempts() {
    let store = Arc::new(MemoryStore::new());
    let poison = Message::builder("poison.pill", "x").build().unwrap();
    let flaky = Message::builder("flaky.topic", "y").build().unwrap();
    let good = msg(None);
    store
        .enqueue([poison.clone(), flaky.clone(), good.clone()])
        .unwrap();
    let transport = ScriptedTransport::new()
        .fail_topic_permanent("poison.pill")
        .fail_topic_transient("flaky.topic", 100);
    let relay = Relay::builder(store.clone(), Arc::new(transport.clone()))
        .max_attempts(3)
        .retry(no_jitter(100, 100))
        .build()
        .unwrap();
    let first = relay.relay_once().await.unwrap();
    assert_eq!(
        (first.published, first.dead_lettered, first.retried),
        (1, 1, 1)
    );
    let p = store.row(&poison.id).unwrap();
    assert!(p.dead);
    assert_eq!(p.attempts, 1);
    assert!(p.last_error.unwrap().contains("scripted permanent failure"));
    for _ in 0..5 {
        tokio::time::advance(Duration::from_millis(150)).await;
        relay.drain().await.unwrap();
    }
    let f = store.row(&flaky.id).unwrap();
    assert!(f.dead, "dead after max_attempts");
    assert_eq!(f.attempts, 3);
    assert_eq!(transport.attempts(&flaky.id), 3);

    // Fixed and requeued, both are delivered.
    transport.heal();
    assert_eq!(store.requeue(&Selector::All).await.unwrap(), 2);
    assert_eq!(relay.drain().await.unwrap().published, 2);
    assert_eq!(store.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_leaves_nothing_leased() {
    let store = Arc::new(MemoryStore::new());
    store
        .enqueue((0..50).map(|i| msg(Some(&format!("k{}", i % 5)))))
        .unwrap();
    let slow = ScriptedTransport::new().slow(Duration::from_secs(2));
    let relay = Relay::builder(store.clone(), Arc::new(slow.clone()))
        .lease(Duration::from_secs(300))
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let c = cancel.clone();
        async move { relay.run(c).await }
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(store.leased() > 0, "mid-publish");
    cancel.cancel();
    let report = run.await.unwrap();
    assert_eq!(store.leased(), 0, "nothing stays leased after shutdown");
    assert_eq!(
        report.published, 5,
        "the in-flight wave finished and was settled"
    );
    assert_eq!(
        report.released, 45,
        "later waves were released, not published"
    );
    assert_eq!(store.pending(), 45);
}

#[tokio::test(start_paused = true)]
async fn shutdown_timeout_releases_a_stuck_publish() {
    let store = Arc::new(MemoryStore::new());
    store.enqueue((0..5).map(|_| msg(None))).unwrap();
    let stuck = ScriptedTransport::new().slow(Duration::from_secs(3_600));
    let relay = Relay::builder(store.clone(), Arc::new(stuck))
        .shutdown_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let c = cancel.clone();
        async move { relay.run(c).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    cancel.cancel();
    let report = run.await.unwrap();
    assert_eq!(report.released, 5);
    assert_eq!(store.leased(), 0);
    assert_eq!(store.pending(), 5);
}

#[tokio::test(start_paused = true)]
async fn keeps_claiming_while_batches_are_full_and_wakes_on_signals() {
    let store = Arc::new(MemoryStore::new());
    let rec = RecordingTransport::new();
    let relay = Relay::builder(store.clone(), Arc::new(rec.clone()))
        .batch_size(100)
        .poll_interval(Duration::from_secs(3_600))
        .build()
        .unwrap();
    let signal = relay.signal();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let c = cancel.clone();
        async move { relay.run(c).await }
    });
    let start = Instant::now();
    // The store's own notification wakes it.
    store.enqueue((0..1_000).map(|_| msg(None))).unwrap();
    assert_eq!(rec.wait_for(1_000, Duration::from_secs(60)).await, 1_000);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "no poll interval was waited for"
    );
    // So does the in-process signal, when the store has no notifications.
    signal.notify();
    cancel.cancel();
    let report = run.await.unwrap();
    assert_eq!(report.published, 1_000);
    assert!(report.batches >= 10);
}

/// A store without notifications: only the signal or the poll wakes the relay.
struct Quiet(Arc<MemoryStore>);

#[async_trait]
impl Store for Quiet {
    fn name(&self) -> &str {
        "quiet"
    }
    async fn claim(
        &self,
        r: &outbox_core::ClaimRequest,
    ) -> outbox_core::Result<outbox_core::Claim> {
        self.0.claim(r).await
    }
    async fn settle(
        &self,
        l: &outbox_core::Lease,
        s: &outbox_core::Settlement,
    ) -> outbox_core::Result<outbox_core::SettleReport> {
        self.0.settle(l, s).await
    }
}

#[tokio::test(start_paused = true)]
async fn the_in_process_signal_wakes_an_idle_relay() {
    let mem = Arc::new(MemoryStore::new());
    let rec = RecordingTransport::new();
    let relay = Relay::builder(Arc::new(Quiet(mem.clone())), Arc::new(rec.clone()))
        .poll_interval(Duration::from_secs(3_600))
        .min_poll_interval(Duration::from_secs(3_600))
        .build()
        .unwrap();
    let signal = relay.signal();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let c = cancel.clone();
        async move { relay.run(c).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    mem.enqueue([msg(None)]).unwrap();
    let start = Instant::now();
    signal.notify();
    assert_eq!(rec.wait_for(1, Duration::from_secs(60)).await, 1);
    assert!(start.elapsed() < Duration::from_secs(1));
    // Without a wakeup, the poll interval is the fallback.
    mem.enqueue([msg(None)]).unwrap();
    let start = Instant::now();
    assert_eq!(rec.wait_for(2, Duration::from_secs(7_200)).await, 2);
    assert!(start.elapsed() >= Duration::from_secs(3_000));
    cancel.cancel();
    run.await.unwrap();
}

/// A store without notifications that records when each claim ran and how
/// many messages it returned; its empty claims report rows on their way
/// ([`outbox_core::Claim::incoming`]) while the flag is set.
struct Looks(Arc<MemoryStore>, Mutex<Vec<(Instant, usize)>>, AtomicBool);

impl Looks {
    fn since(&self, from: Instant) -> Vec<(Duration, usize)> {
        let looks = self.1.lock().unwrap();
        looks
            .iter()
            .filter(|(t, _)| *t >= from)
            .map(|(t, n)| (*t - from, *n))
            .collect()
    }

    /// Waits (a paused clock's time) until `count` looks came after `from`;
    /// returns the gaps between `from` and them, in ms.
    async fn gaps(&self, from: Instant, count: usize) -> Vec<u128> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let looks = self.since(from);
            if looks.len() >= count {
                let mut at = Duration::ZERO;
                return looks
                    .iter()
                    .map(|(d, _)| (*d - std::mem::replace(&mut at, *d)).as_millis())
                    .collect();
            }
            assert!(Instant::now() < deadline, "looks {looks:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The waits of a relay with a 10 ms shortest wait and a 1 s interval whose
/// looks find nothing.
const BACKING_OFF: [u128; 9] = [10, 20, 40, 80, 160, 320, 640, 1_000, 1_000];

fn assert_backing_off(gaps: &[u128], skip: usize) {
    for (gap, want) in gaps.iter().zip(BACKING_OFF).skip(skip) {
        assert!(
            *gap >= want && *gap <= want + 2,
            "gaps {gaps:?} should follow {BACKING_OFF:?}"
        );
    }
}

#[async_trait]
impl Store for Looks {
    fn name(&self) -> &str {
        "looks"
    }
    async fn claim(
        &self,
        r: &outbox_core::ClaimRequest,
    ) -> outbox_core::Result<outbox_core::Claim> {
        let mut claim = self.0.claim(r).await?;
        let n = claim.messages.len();
        self.1.lock().unwrap().push((Instant::now(), n));
        claim.incoming = n == 0 && self.2.load(Ordering::SeqCst);
        Ok(claim)
    }
    async fn settle(
        &self,
        l: &outbox_core::Lease,
        s: &outbox_core::Settlement,
    ) -> outbox_core::Result<outbox_core::SettleReport> {
        self.0.settle(l, s).await
    }
}

/// A relay with a 10 ms shortest wait and a 1 s interval on a [`Looks`]
/// store whose empty claims report rows on their way when `incoming`.
#[allow(clippy::type_complexity)]
fn run_looks(
    incoming: bool,
) -> (
    Arc<MemoryStore>,
    Arc<Looks>,
    RecordingTransport,
    CancellationToken,
    tokio::task::JoinHandle<outbox_core::RelayReport>,
) {
    let mem = Arc::new(MemoryStore::new());
    let looks = Arc::new(Looks(
        mem.clone(),
        Mutex::default(),
        AtomicBool::new(incoming),
    ));
    let rec = RecordingTransport::new();
    let relay = Relay::builder(looks.clone(), Arc::new(rec.clone()))
        .poll_interval(Duration::from_secs(1))
        .min_poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let c = cancel.clone();
        async move { relay.run(c).await }
    });
    (mem, looks, rec, cancel, run)
}

#[tokio::test(start_paused = true)]
async fn without_wakeups_a_relay_looks_again_soon_after_work_and_backs_off() {
    let (mem, looks, rec, cancel, run) = run_looks(false);
    // Idle, the relay is back at the poll interval after a few looks.
    let start = Instant::now();
    assert_backing_off(&looks.gaps(start, BACKING_OFF.len()).await, 0);
    assert!(looks.since(start).iter().all(|(_, n)| *n == 0));

    // A message while it waits a whole poll interval: found by the poll.
    let start = Instant::now();
    mem.enqueue([msg(None)]).unwrap();
    assert_eq!(rec.wait_for(1, Duration::from_secs(60)).await, 1);
    assert!(start.elapsed() <= Duration::from_secs(1));

    // Messages that keep coming, 3 ms apart, with no wakeup: each waits
    // for one short look, not for the poll interval.
    let mut waited = Vec::new();
    for i in 0..100 {
        let start = Instant::now();
        mem.enqueue([msg(None)]).unwrap();
        assert_eq!(rec.wait_for(i + 2, Duration::from_secs(60)).await, i + 2);
        waited.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let worst = waited.iter().max().copied().unwrap_or_default();
    assert!(
        worst <= Duration::from_millis(15),
        "a message waited {worst:?}: {waited:?}"
    );

    // When they stop, the waits double from the shortest to the interval.
    // The first gap starts after the last publish, within a look of it.
    let start = Instant::now();
    assert_backing_off(&looks.gaps(start, BACKING_OFF.len()).await, 1);
    cancel.cancel();
    run.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn rows_on_their_way_keep_the_waits_short_for_a_second_after_work() {
    let (mem, looks, rec, cancel, run) = run_looks(true);
    // Before any work, rows reported on their way do not hurry the relay
    // (a transaction that stays open would keep it looking).
    let start = Instant::now();
    assert_backing_off(&looks.gaps(start, BACKING_OFF.len()).await, 0);

    // After a claim that found messages, they keep every wait at the
    // shortest for a second, then it backs off as before.
    mem.enqueue([msg(None)]).unwrap();
    assert_eq!(rec.wait_for(1, Duration::from_secs(60)).await, 1);
    // About 100 looks 10 ms apart, then 20, 40, 80, 160 ms apart.
    let start = Instant::now();
    let mut at = 0;
    let times: Vec<u128> = looks
        .gaps(start, 104)
        .await
        .into_iter()
        .map(|gap| {
            at += gap;
            at
        })
        .collect();
    let hurried: Vec<u128> = times.iter().copied().filter(|ms| *ms < 990).collect();
    assert!(
        hurried.len() >= 95 && hurried.windows(2).all(|w| w[1] - w[0] <= 11),
        "looks in the first second: {hurried:?}"
    );
    let later: Vec<u128> = times.iter().copied().filter(|ms| *ms >= 1_010).collect();
    assert!(
        later.len() >= 3 && later.windows(2).all(|w| w[1] - w[0] >= 20),
        "looks after the first second: {later:?}, want a back-off (20, 40, 80 ... ms)"
    );

    // Without them, the waits double at once (from the claim ahead that
    // went with the publish).
    looks.2.store(false, Ordering::SeqCst);
    mem.enqueue([msg(None)]).unwrap();
    assert_eq!(rec.wait_for(2, Duration::from_secs(60)).await, 2);
    let start = Instant::now();
    let gaps = looks.gaps(start, BACKING_OFF.len() + 1).await;
    assert_backing_off(&gaps[1..], 0);
    cancel.cancel();
    run.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn store_errors_back_off_and_recover() {
    /// Fails the first `n` claims.
    struct Flaky(Arc<MemoryStore>, Mutex<u32>);
    #[async_trait]
    impl Store for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        async fn claim(
            &self,
            r: &outbox_core::ClaimRequest,
        ) -> outbox_core::Result<outbox_core::Claim> {
            {
                let mut n = self.1.lock().unwrap();
                if *n > 0 {
                    *n -= 1;
                    return Err(outbox_core::Error::transient(
                        outbox_core::ErrorKind::Connection,
                        "connection reset",
                    ));
                }
            }
            self.0.claim(r).await
        }
        async fn settle(
            &self,
            l: &outbox_core::Lease,
            s: &outbox_core::Settlement,
        ) -> outbox_core::Result<outbox_core::SettleReport> {
            self.0.settle(l, s).await
        }
    }
    let mem = Arc::new(MemoryStore::new());
    mem.enqueue((0..3).map(|_| msg(None))).unwrap();
    let rec = RecordingTransport::new();
    let relay = Relay::builder(
        Arc::new(Flaky(mem.clone(), Mutex::new(4))),
        Arc::new(rec.clone()),
    )
    .poll_interval(Duration::from_millis(10))
    .store_retry(no_jitter(100, 1_000))
    .build()
    .unwrap();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let c = cancel.clone();
        async move { relay.run(c).await }
    });
    let start = Instant::now();
    assert_eq!(rec.wait_for(3, Duration::from_secs(60)).await, 3);
    // 100 + 200 + 400 + 800 ms of backoff after four failed claims.
    assert!(
        start.elapsed() >= Duration::from_millis(1_500),
        "{:?}",
        start.elapsed()
    );
    cancel.cancel();
    run.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn hold_dead_letters_blocks_the_key_until_requeued() {
    let store = Arc::new(MemoryStore::with_options(
        StoreOptions::default().hold_dead_letters(true),
    ));
    let poison = Message::builder("poison.pill", "x")
        .key("k")
        .build()
        .unwrap();
    let next = Message::builder("orders.placed", "y")
        .key("k")
        .build()
        .unwrap();
    store.enqueue([poison.clone(), next.clone()]).unwrap();
    let transport = ScriptedTransport::new().fail_topic_permanent("poison.pill");
    let relay = Relay::builder(store.clone(), Arc::new(transport.clone()))
        .build()
        .unwrap();
    relay.drain().await.unwrap();
    assert!(
        transport.recorder().is_empty(),
        "the key is held behind its dead letter"
    );
    transport.heal();
    store
        .requeue(&Selector::Ids(vec![poison.id]))
        .await
        .unwrap();
    relay.drain().await.unwrap();
    let order: Vec<MessageId> = transport
        .recorder()
        .messages()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(order, vec![poison.id, next.id]);
}

#[tokio::test(start_paused = true)]
async fn a_row_that_breaks_the_rules_is_dead_lettered_not_published() {
    let store = Arc::new(MemoryStore::new());
    let good = msg(Some("k"));
    store.enqueue([good.clone()]).unwrap();
    // A foreign producer wrote a topic no broker accepts; simulate by
    // claiming and editing what the store hands out.
    struct Corrupting(Arc<MemoryStore>);
    #[async_trait]
    impl Store for Corrupting {
        fn name(&self) -> &str {
            "corrupting"
        }
        async fn claim(
            &self,
            r: &outbox_core::ClaimRequest,
        ) -> outbox_core::Result<outbox_core::Claim> {
            let mut c = self.0.claim(r).await?;
            for m in &mut c.messages {
                m.topic = "bad topic\n".into();
            }
            Ok(c)
        }
        async fn settle(
            &self,
            l: &outbox_core::Lease,
            s: &outbox_core::Settlement,
        ) -> outbox_core::Result<outbox_core::SettleReport> {
            self.0.settle(l, s).await
        }
    }
    let rec = RecordingTransport::new();
    let relay = Relay::builder(Arc::new(Corrupting(store.clone())), Arc::new(rec.clone()))
        .build()
        .unwrap();
    let report = relay.relay_once().await.unwrap();
    assert_eq!(report.dead_lettered, 1);
    assert!(rec.is_empty());
    let row = store.row(&good.id).unwrap();
    assert!(row.dead);
    assert!(row.last_error.unwrap().contains("topic"));
}

#[tokio::test(start_paused = true)]
async fn an_idle_relay_wakes_for_the_retry_it_scheduled() {
    let store = Arc::new(MemoryStore::new());
    let id = store.enqueue([msg(Some("k"))]).unwrap()[0];
    let transport = ScriptedTransport::new().fail_transient(1);
    let relay = Relay::builder(store.clone(), Arc::new(transport.clone()))
        .poll_interval(Duration::from_secs(3_600))
        .retry(no_jitter(200, 200))
        .build()
        .unwrap();
    let running = relay.spawn();
    let start = Instant::now();
    assert_eq!(
        transport
            .recorder()
            .wait_for(1, Duration::from_secs(7_200))
            .await,
        1
    );
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "woke for the retry after {took:?}, not the hour-long poll"
    );
    assert_eq!(transport.attempts(&id), 2);
    running.stop().await;
}

/// Runs `lanes` relay lanes over 600 messages on 12 keys with 20 % random
/// failures until all are published, checks order per key and that nothing
/// stays leased, and returns the report.
async fn run_under_failures(store: Arc<MemoryStore>, lanes: usize, seed: u64) -> RelayReport {
    let ms: Vec<Message> = (0..600)
        .map(|i| msg(Some(&format!("k{}", i % 12))))
        .collect();
    store.enqueue(ms.clone()).unwrap();
    let transport = ScriptedTransport::new()
        .fail_randomly(0.2, seed)
        .slow(Duration::from_millis(3));
    let relay = Relay::builder(store.clone(), Arc::new(transport.clone()))
        .lanes(lanes)
        .batch_size(25)
        .max_attempts(1_000)
        .retry(no_jitter(10, 50))
        .poll_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let running = relay.spawn();
    assert_eq!(
        transport
            .recorder()
            .wait_for(600, Duration::from_secs(600))
            .await,
        600
    );
    let report = running.stop().await;
    assert_eq!(report.published, 600);
    assert_once_in_key_order(&ms, &transport.recorder().messages());
    assert_eq!(store.leased(), 0);
    report
}

#[tokio::test(start_paused = true)]
async fn lanes_keep_per_key_order_under_failures() {
    let report = run_under_failures(Arc::new(MemoryStore::new()), 3, 5).await;
    assert!(report.batches > 24, "the lanes shared the work: {report:?}");
}

#[tokio::test(start_paused = true)]
async fn claiming_ahead_keeps_per_key_order_under_random_failures() {
    let ahead = random_cases(0xa4ead, 1_500, true).await;
    assert!(ahead > 1_000, "the relays claimed ahead ({ahead} claims)");
    println!("per-key order held in 1500 seeded cases, {ahead} claims taken ahead");
}

#[tokio::test(start_paused = true)]
async fn a_running_relay_claims_ahead_and_stops_with_nothing_leased() {
    let store = Arc::new(MemoryStore::with_options(
        StoreOptions::default().claim_ahead(true),
    ));
    run_under_failures(store.clone(), 1, 9).await;
    assert!(
        store.claims_ahead() > 5,
        "{} claims ahead",
        store.claims_ahead()
    );
    // Stopped in the middle of a pipelined backlog, it hands back every row.
    store
        .enqueue((0..400).map(|i| msg(Some(&format!("k{}", i % 7)))))
        .unwrap();
    let transport = ScriptedTransport::new().slow(Duration::from_millis(3));
    let relay = Relay::builder(store.clone(), Arc::new(transport))
        .batch_size(25)
        .build()
        .unwrap();
    let running = relay.spawn();
    tokio::time::sleep(Duration::from_millis(20)).await;
    running.stop().await;
    assert_eq!(store.leased(), 0, "nothing stays leased after a stop");
}

/// A store that hands out at most 3 messages per claim (as `MySqlStore`
/// bounds its claims), recording the limits it was asked for.
struct Capped(Arc<MemoryStore>, Mutex<Vec<usize>>);

#[async_trait]
impl Store for Capped {
    fn name(&self) -> &str {
        "capped"
    }
    fn max_claim(&self) -> Option<usize> {
        Some(3)
    }
    async fn claim(
        &self,
        r: &outbox_core::ClaimRequest,
    ) -> outbox_core::Result<outbox_core::Claim> {
        self.1.lock().unwrap().push(r.limit);
        self.0.claim(r).await
    }
    async fn claim_ahead(
        &self,
        r: &outbox_core::ClaimRequest,
        outstanding: &outbox_core::Lease,
    ) -> outbox_core::Result<Option<outbox_core::Claim>> {
        self.1.lock().unwrap().push(r.limit);
        self.0.claim_ahead(r, outstanding).await
    }
    async fn settle(
        &self,
        l: &outbox_core::Lease,
        s: &outbox_core::Settlement,
    ) -> outbox_core::Result<outbox_core::SettleReport> {
        self.0.settle(l, s).await
    }
}

/// A batch size above the store's `max_claim` asks for no more than it
/// hands out, and a claim of that many counts as full: the relay claims
/// ahead after it as after a full batch.
#[tokio::test(start_paused = true)]
async fn a_claim_of_the_stores_most_is_a_full_batch() {
    let mem = Arc::new(MemoryStore::with_options(
        StoreOptions::default().claim_ahead(true),
    ));
    mem.enqueue((0..30).map(|i| msg(Some(&format!("k{i}")))))
        .unwrap();
    let capped = Arc::new(Capped(mem.clone(), Mutex::default()));
    let rec = RecordingTransport::new();
    let relay = Relay::builder(capped.clone(), Arc::new(rec.clone()))
        .batch_size(10)
        .build()
        .unwrap();
    assert_eq!(relay.batch_size(), 3, "the store's most");
    assert_eq!(relay.config().batch_size, 10, "as configured");
    let running = relay.spawn();
    assert_eq!(rec.wait_for(30, Duration::from_secs(60)).await, 30);
    running.stop().await;
    let limits = capped.1.lock().unwrap().clone();
    assert!(limits.iter().all(|l| *l == 3), "asked for {limits:?}");
    assert!(
        mem.claims_ahead() >= 5,
        "{} claims ahead",
        mem.claims_ahead()
    );
}

/// Fails every message for good with a 100,000-byte error text.
struct Wordy;

#[async_trait]
impl Transport for Wordy {
    fn name(&self) -> &str {
        "wordy"
    }
    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        let text = "é".repeat(50_000);
        messages
            .iter()
            .map(|_| {
                Err(outbox_core::Error::permanent(
                    outbox_core::ErrorKind::Rejected,
                    text.clone(),
                ))
            })
            .collect()
    }
}

/// A long error text is cut to `MAX_ERROR_TEXT` bytes (at a character
/// boundary) before it goes to the store: a settle of a batch of failures
/// carries one per message, and a store's column may be bounded.
#[tokio::test(start_paused = true)]
async fn a_long_error_text_is_cut_before_it_is_recorded() {
    let store = Arc::new(MemoryStore::new());
    store.enqueue([msg(Some("a")), msg(None)]).unwrap();
    let relay = Relay::builder(store.clone(), Arc::new(Wordy))
        .build()
        .unwrap();
    let report = relay.relay_once().await.unwrap();
    assert_eq!(report.dead_lettered, 2);
    let dead = store.list_dead(None, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    for d in dead {
        assert!(
            d.error.len() <= outbox_core::MAX_ERROR_TEXT,
            "{}",
            d.error.len()
        );
        assert!(d.error.len() > outbox_core::MAX_ERROR_TEXT - 8);
        assert!(d.error.ends_with("éé…"), "cut at a character boundary");
    }
}

/// A broker outage longer than all of a message's retries together
/// dead-letters nothing: messages the transport could not send are handed
/// back without counting an attempt, and the relay backs off as a whole
/// instead of claiming and failing batch after batch. Once the broker is
/// back, everything is published once, in order per key.
#[tokio::test(start_paused = true)]
async fn a_broker_outage_uses_up_no_attempts_and_dead_letters_nothing() {
    let store = Arc::new(MemoryStore::with_options(
        StoreOptions::default().claim_ahead(true),
    ));
    let messages: Vec<Message> = (0..40).map(|i| msg(Some(&format!("k{}", i % 4)))).collect();
    store.enqueue(messages.clone()).unwrap();
    let transport = ScriptedTransport::new().unreachable();
    let relay = Relay::builder(store.clone(), Arc::new(transport.clone()))
        .batch_size(10)
        .max_attempts(2)
        .retry(no_jitter(10, 10))
        .transport_retry(no_jitter(100, 5_000))
        .build()
        .unwrap();
    let running = relay.spawn();
    // Down until the relay has tried ten times: 2 attempts 10 ms apart
    // would be spent many times over.
    let down = Instant::now();
    let deadline = down + Duration::from_secs(300);
    while transport.calls() < 10 {
        assert!(Instant::now() < deadline, "the relay stopped trying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for m in &messages {
        let row = store.row(&m.id).unwrap();
        assert!(
            row.pending && !row.dead,
            "{} is still pending: {row:?}",
            m.id
        );
        assert_eq!(row.attempts, 0, "an unsent message is not an attempt");
    }
    // Not a hot loop: each wait is as long as the outage so far (100 ms
    // to 5 s), so ten looks take seconds.
    assert!(
        down.elapsed() >= Duration::from_secs(2),
        "ten looks in {:?}",
        down.elapsed()
    );
    transport.heal();
    assert_eq!(
        transport
            .recorder()
            .wait_for(40, Duration::from_secs(30))
            .await,
        40
    );
    running.stop().await;
    assert_once_in_key_order(&messages, &transport.recorder().messages());
    assert_eq!(store.pending(), 0);
}

/// `drain` stops when the broker cannot be reached: it returns an error
/// that says the messages were not sent, and hands every claimed row back
/// (nothing stays leased, no attempt counted; they wait `transport_retry`).
#[tokio::test(start_paused = true)]
async fn drain_stops_and_hands_back_the_claim_when_the_broker_is_unreachable() {
    let store = Arc::new(MemoryStore::with_options(
        StoreOptions::default().claim_ahead(true),
    ));
    let messages: Vec<Message> = (0..30).map(|i| msg(Some(&format!("k{i}")))).collect();
    store.enqueue(messages.clone()).unwrap();
    let transport = ScriptedTransport::new().unreachable();
    let relay = Relay::builder(store.clone(), Arc::new(transport.clone()))
        .batch_size(10)
        .max_attempts(1)
        .build()
        .unwrap();
    let e = relay.drain().await.unwrap_err();
    assert!(e.is_unsent(), "{e}");
    assert_eq!(store.leased(), 0, "nothing stays leased");
    assert!(messages.iter().all(|m| store
        .row(&m.id)
        .is_some_and(|r| r.pending && r.attempts == 0)));
    assert!(relay.relay_once().await.unwrap_err().is_unsent());
    transport.heal();
    // Messages not sent step aside for a while (`transport_retry`): drain
    // again as they come due.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut published = 0;
    while published < 30 {
        assert!(Instant::now() < deadline, "{published} of 30 published");
        published += relay.drain().await.unwrap().published;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(published, 30);
    assert_eq!(store.pending(), 0);
}

/// With two brokers behind a router and one of them down, only that
/// broker's messages wait (uncounted); the other broker's are published,
/// even behind ten claims' worth of the down broker's backlog, and nothing
/// is dead-lettered.
#[tokio::test(start_paused = true)]
async fn one_unreachable_broker_holds_back_only_its_own_messages() {
    let store = Arc::new(MemoryStore::new());
    let down: Vec<Message> = (0..200)
        .map(|i| {
            Message::builder("audit.logged", "{}")
                .key(format!("a{i}"))
                .build()
                .unwrap()
        })
        .collect();
    let up: Vec<Message> = (0..10).map(|i| msg(Some(&format!("o{i}")))).collect();
    store.enqueue(down.iter().chain(&up).cloned()).unwrap();
    let transport = ScriptedTransport::new().unreachable_topic("audit.logged");
    let relay = Relay::builder(store.clone(), Arc::new(transport.clone()))
        .batch_size(20)
        .max_attempts(1)
        .transport_retry(no_jitter(100, 1_000))
        .build()
        .unwrap();
    let running = relay.spawn();
    assert_eq!(
        transport
            .recorder()
            .wait_for(10, Duration::from_secs(5))
            .await,
        10
    );
    // The down broker's messages are tried again and again meanwhile.
    let tried = transport.calls() + 10;
    let deadline = Instant::now() + Duration::from_secs(300);
    while transport.calls() < tried {
        assert!(Instant::now() < deadline, "the relay stopped trying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(down.iter().all(|m| store
        .row(&m.id)
        .is_some_and(|r| r.pending && r.attempts == 0)));
    transport.heal();
    assert_eq!(
        transport
            .recorder()
            .wait_for(210, Duration::from_secs(5))
            .await,
        210
    );
    running.stop().await;
    assert_eq!(store.pending(), 0);
}

/// Settings out of range are refused when the relay is built (a typed
/// configuration error), never met later as a panic or an SQL overflow.
#[test]
fn settings_out_of_range_are_config_errors() {
    let week = Duration::from_secs(7 * 24 * 3600);
    let build = |f: &dyn Fn(outbox_core::RelayBuilder) -> outbox_core::RelayBuilder| {
        f(Relay::builder(
            Arc::new(MemoryStore::new()),
            Arc::new(RecordingTransport::new()),
        ))
        .build()
    };
    let refused: [(
        &str,
        &dyn Fn(outbox_core::RelayBuilder) -> outbox_core::RelayBuilder,
    ); 7] = [
        ("batch_size", &|b| b.batch_size(0)),
        ("lease", &|b| b.lease(Duration::from_millis(5))),
        ("lease", &|b| b.lease(week + Duration::from_secs(1))),
        ("poll_interval", &|b| b.poll_interval(Duration::MAX)),
        ("retry", &|b| {
            b.retry(RetryPolicy::exponential(
                Duration::from_secs(1),
                2.0,
                Duration::MAX,
            ))
        }),
        ("transport_retry", &|b| {
            b.transport_retry(RetryPolicy::exponential(
                Duration::from_secs(1),
                2.0,
                Duration::MAX,
            ))
        }),
        ("max_attempts", &|b| b.max_attempts(0)),
    ];
    for (name, f) in refused {
        let e = build(f).err().unwrap_or_else(|| panic!("{name} accepted"));
        assert_eq!(e.kind(), outbox_core::ErrorKind::Config, "{e}");
        assert!(e.to_string().contains(name), "{e}");
    }
    assert!(build(&|b| b.lease(week).retry(RetryPolicy::exponential(
        Duration::from_secs(1),
        2.0,
        week
    )))
    .is_ok());
}

/// A broker so slow that one publish takes over a quarter of the lease: a
/// claim taken ahead would be as old as one publish when its own began and
/// could expire before it ended, and another relay could then publish its
/// rows (and later ones of their keys) meanwhile. The relay hands such a
/// claim back and claims afresh: with two relays on one store, every
/// message is published once, in order per key.
#[tokio::test(start_paused = true)]
async fn a_claim_taken_ahead_is_not_published_once_it_may_have_expired() {
    let store = Arc::new(MemoryStore::with_options(
        StoreOptions::default().claim_ahead(true),
    ));
    let messages: Vec<Message> = (0..120)
        .map(|i| msg(Some(&format!("k{}", i % 6))))
        .collect();
    store.enqueue(messages.clone()).unwrap();
    // Each publish takes 250 ms of a 400 ms lease.
    let transport = ScriptedTransport::new().slow(Duration::from_millis(250));
    let relays: Vec<_> = (0..2)
        .map(|_| {
            Relay::builder(store.clone(), Arc::new(transport.clone()))
                .batch_size(12)
                .lease(Duration::from_millis(400))
                .build()
                .unwrap()
                .spawn()
        })
        .collect();
    let published = transport
        .recorder()
        .wait_for(120, Duration::from_secs(120))
        .await;
    assert_eq!(published, 120);
    // Stopping lets publishes in flight finish: a late duplicate shows.
    for r in relays {
        r.stop().await;
    }
    // No claim outlived its lease: each published once.
    assert_once_in_key_order(&messages, &transport.recorder().messages());
}
