//! Test transports: [`RecordingTransport`] keeps what it is sent,
//! [`ScriptedTransport`] fails and slows down on a script.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind};
use crate::message::{Message, MessageId};
use crate::testing::transport_conformance::{Probe, Received};
use crate::transport::{PublishResult, Transport};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A transport that acknowledges everything and records it, in publish order.
/// Clones share the record.
#[derive(Clone, Debug)]
pub struct RecordingTransport {
    name: String,
    log: Arc<Mutex<Vec<Message>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Default for RecordingTransport {
    fn default() -> Self {
        Self::named("recording")
    }
}

impl RecordingTransport {
    /// A recorder named `recording`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A recorder with a name of your choice (for router tests).
    pub fn named(name: impl Into<String>) -> Self {
        RecordingTransport {
            name: name.into(),
            log: Arc::default(),
            notify: Arc::default(),
        }
    }

    /// Everything published so far, in order (duplicates included).
    pub fn messages(&self) -> Vec<Message> {
        lock(&self.log).clone()
    }

    /// How many publishes succeeded so far.
    pub fn len(&self) -> usize {
        lock(&self.log).len()
    }

    /// Whether nothing was published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until at least `count` messages were recorded or `timeout`
    /// passed; returns how many there are.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            let n = self.len();
            if n >= count {
                return n;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.len();
            }
        }
    }

    fn record(&self, m: &Message) {
        lock(&self.log).push(m.clone());
        self.notify.notify_waiters();
    }
}

#[async_trait]
impl Transport for RecordingTransport {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        messages
            .iter()
            .map(|m| {
                self.record(m);
                Ok(())
            })
            .collect()
    }
}

#[async_trait]
impl Probe for RecordingTransport {
    async fn received(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.wait_for(count, timeout).await;
        self.messages()
            .into_iter()
            .map(|m| Received {
                id: Some(m.id),
                key: m.key,
                headers: m.headers,
                payload: m.payload,
            })
            .collect()
    }
}

/// What a [`ScriptedTransport`] does to the messages a rule matches.
#[derive(Clone, Debug)]
enum Action {
    /// Fail transiently the first `n` attempts of each matching message.
    Transient(u32),
    /// Fail permanently.
    Permanent,
    /// Fail as not sent: the broker cannot be reached.
    Unsent,
}

#[derive(Clone, Debug)]
struct Rule {
    topic: Option<String>,
    key: Option<String>,
    action: Action,
}

#[derive(Debug)]
struct Script {
    rules: Vec<Rule>,
    random: Option<(f64, fastrand::Rng)>,
    delay: Duration,
    attempts: HashMap<MessageId, u32>,
    calls: u64,
}

/// A transport that fails or slows down as scripted and records what it
/// acknowledged in an inner [`RecordingTransport`]. Rules are checked in the
/// order they were added; the first that matches decides.
#[derive(Clone, Debug)]
pub struct ScriptedTransport {
    recorder: RecordingTransport,
    script: Arc<Mutex<Script>>,
}

impl Default for ScriptedTransport {
    fn default() -> Self {
        ScriptedTransport {
            recorder: RecordingTransport::named("scripted"),
            script: Arc::new(Mutex::new(Script {
                rules: Vec::new(),
                random: None,
                delay: Duration::ZERO,
                attempts: HashMap::new(),
                calls: 0,
            })),
        }
    }
}

impl ScriptedTransport {
    /// A transport that acknowledges everything until told otherwise.
    pub fn new() -> Self {
        Self::default()
    }

    fn rule(self, topic: Option<&str>, key: Option<&str>, action: Action) -> Self {
        lock(&self.script).rules.push(Rule {
            topic: topic.map(str::to_string),
            key: key.map(str::to_string),
            action,
        });
        self
    }

    /// Every message fails transiently on its first `n` attempts.
    pub fn fail_transient(self, n: u32) -> Self {
        self.rule(None, None, Action::Transient(n))
    }

    /// Messages of `topic` fail transiently on their first `n` attempts.
    pub fn fail_topic_transient(self, topic: &str, n: u32) -> Self {
        self.rule(Some(topic), None, Action::Transient(n))
    }

    /// Messages of `key` fail transiently on their first `n` attempts.
    pub fn fail_key_transient(self, key: &str, n: u32) -> Self {
        self.rule(None, Some(key), Action::Transient(n))
    }

    /// Messages of `topic` fail permanently.
    pub fn fail_topic_permanent(self, topic: &str) -> Self {
        self.rule(Some(topic), None, Action::Permanent)
    }

    /// Every message fails as not sent ([`Error::unsent`]), as while the
    /// broker is down, until [`heal`](Self::heal).
    pub fn unreachable(self) -> Self {
        self.rule(None, None, Action::Unsent)
    }

    /// Messages of `topic` fail as not sent (their broker is down) until
    /// [`heal`](Self::heal).
    pub fn unreachable_topic(self, topic: &str) -> Self {
        self.rule(Some(topic), None, Action::Unsent)
    }

    /// Each message fails transiently with probability `p`, drawn from a
    /// generator seeded with `seed` (reproducible).
    pub fn fail_randomly(self, p: f64, seed: u64) -> Self {
        lock(&self.script).random = Some((p, fastrand::Rng::with_seed(seed)));
        self
    }

    /// Each call takes at least `delay` (a slow broker).
    pub fn slow(self, delay: Duration) -> Self {
        lock(&self.script).delay = delay;
        self
    }

    /// Removes every rule and random failure: the cause is fixed.
    pub fn heal(&self) {
        let mut s = lock(&self.script);
        s.rules.clear();
        s.random = None;
    }

    /// The successful publishes.
    pub fn recorder(&self) -> &RecordingTransport {
        &self.recorder
    }

    /// Publish calls so far.
    pub fn calls(&self) -> u64 {
        lock(&self.script).calls
    }

    /// Attempts seen for `id` (successful or not).
    pub fn attempts(&self, id: &MessageId) -> u32 {
        lock(&self.script).attempts.get(id).copied().unwrap_or(0)
    }

    fn decide(&self, m: &Message) -> PublishResult {
        let mut s = lock(&self.script);
        let n = {
            let a = s.attempts.entry(m.id).or_insert(0);
            *a += 1;
            *a
        };
        let rule = s.rules.iter().find(|r| {
            r.topic.as_ref().is_none_or(|t| *t == m.topic)
                && r.key.as_ref().is_none_or(|k| Some(k) == m.key.as_ref())
        });
        match rule.map(|r| &r.action) {
            Some(Action::Permanent) => {
                return Err(
                    Error::permanent(ErrorKind::Rejected, "scripted permanent failure")
                        .with_backend("scripted")
                        .with_operation("publish"),
                )
            }
            Some(Action::Unsent) => {
                return Err(
                    Error::transient(ErrorKind::Connection, "scripted: broker unreachable")
                        .with_backend("scripted")
                        .with_operation("publish")
                        .unsent(),
                )
            }
            Some(Action::Transient(times)) if n <= *times => {
                return Err(Error::transient(
                    ErrorKind::Connection,
                    format!("scripted transient failure {n} of {times}"),
                )
                .with_backend("scripted")
                .with_operation("publish"))
            }
            _ => {}
        }
        if let Some((p, rng)) = &mut s.random {
            if rng.f64() < *p {
                return Err(
                    Error::transient(ErrorKind::Timeout, "scripted random failure")
                        .with_backend("scripted")
                        .with_operation("publish"),
                );
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for ScriptedTransport {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        let delay = {
            let mut s = lock(&self.script);
            s.calls += 1;
            s.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        messages
            .iter()
            .map(|m| {
                let r = self.decide(m);
                if r.is_ok() {
                    self.recorder.record(m);
                }
                r
            })
            .collect()
    }
}

#[async_trait]
impl Probe for ScriptedTransport {
    async fn received(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.recorder.received(count, timeout).await
    }
}
