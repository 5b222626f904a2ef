//! [`Router`]: a [`Transport`] that sends each message to the transport of
//! the first route whose pattern matches its topic.
//!
//! Patterns are dot-separated like topics: a literal token matches itself,
//! `*` matches exactly one token, `>` (only as the last token) matches one or
//! more remaining tokens. `orders.*` matches `orders.placed` but not
//! `orders.placed.eu`; `audit.>` matches both `audit.login` and
//! `audit.login.failed` but not `audit`.
//!
//! ```
//! # #[cfg(feature = "testing")]
//! # fn main() -> Result<(), outbox_core::Error> {
//! # use std::sync::Arc;
//! # use outbox_core::{Router, Route};
//! # use outbox_core::testing::RecordingTransport;
//! let kafka = Arc::new(RecordingTransport::named("kafka"));
//! let nats = Arc::new(RecordingTransport::named("nats"));
//! let router = Router::builder()
//!     .route("orders.*", kafka)
//!     .route_with(Route::new("audit.>", nats.clone()).prefix("archive."))
//!     .fallback(nats)
//!     .build()?;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::future::join_all;

use crate::error::{Error, ErrorKind, Result, ValidationError};
use crate::message::{validate_topic, Message};
use crate::transport::{missing_result, PublishResult, Transport};

/// How a route changes the topic before publishing.
#[derive(Clone)]
enum Rename {
    To(String),
    Prefix(String),
    With(Arc<dyn Fn(&str) -> String + Send + Sync>),
}

impl Rename {
    fn apply(&self, topic: &str) -> String {
        match self {
            Rename::To(t) => t.clone(),
            Rename::Prefix(p) => format!("{p}{topic}"),
            Rename::With(f) => f(topic),
        }
    }
}

/// One route: a topic pattern, the transport for matching messages, and an
/// optional topic rename.
#[derive(Clone)]
pub struct Route {
    pattern: String,
    transport: Arc<dyn Transport>,
    rename: Option<Rename>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("pattern", &self.pattern)
            .field("transport", &self.transport.name())
            .field("renames", &self.rename.is_some())
            .finish()
    }
}

impl Route {
    /// A route from `pattern` to `transport`, keeping the topic.
    pub fn new(pattern: impl Into<String>, transport: Arc<dyn Transport>) -> Self {
        Route {
            pattern: pattern.into(),
            transport,
            rename: None,
        }
    }

    /// Publishes every matching message under this fixed topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.rename = Some(Rename::To(topic.into()));
        self
    }

    /// Publishes matching messages under `prefix` + topic.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.rename = Some(Rename::Prefix(prefix.into()));
        self
    }

    /// Publishes matching messages under `f(topic)`. A result that is not a
    /// valid topic fails that message permanently.
    pub fn rename_with(mut self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.rename = Some(Rename::With(Arc::new(f)));
        self
    }

    /// The pattern.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
}

/// Checks a route pattern: non-empty dot-separated tokens, `*` and `>` only
/// as whole tokens, `>` only last, no whitespace or control characters.
pub fn validate_pattern(pattern: &str) -> Result<(), ValidationError> {
    let invalid = |reason: &str| ValidationError::InvalidName {
        what: "route pattern",
        value: pattern.escape_debug().to_string(),
        reason: reason.to_string(),
    };
    if pattern.is_empty() {
        return Err(invalid("empty"));
    }
    if pattern.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid("contains whitespace or a control character"));
    }
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(invalid("empty token (leading, trailing or double '.')"));
        }
        if *t == ">" && i + 1 != tokens.len() {
            return Err(invalid("'>' may only be the last token"));
        }
        if t.len() > 1 && (t.contains('*') || t.contains('>')) {
            return Err(invalid("'*' and '>' must be whole tokens"));
        }
        if t.contains('#') {
            return Err(invalid("'#' is not a wildcard here; use '>'"));
        }
    }
    Ok(())
}

/// Whether `topic` matches `pattern` (see the module docs for the syntax).
pub fn pattern_matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('.');
    let mut t = topic.split('.');
    loop {
        match (p.next(), t.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Builds a [`Router`]; [`build`](RouterBuilder::build) checks every pattern.
#[derive(Default)]
#[must_use]
pub struct RouterBuilder {
    routes: Vec<Route>,
    fallback: Option<Arc<dyn Transport>>,
}

impl RouterBuilder {
    /// Adds a route from `pattern` to `transport`. Routes are tried in the
    /// order they were added; the first match wins.
    pub fn route(self, pattern: impl Into<String>, transport: Arc<dyn Transport>) -> Self {
        self.route_with(Route::new(pattern, transport))
    }

    /// Adds a configured route.
    pub fn route_with(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Sends messages no route matches to `transport` instead of failing them.
    pub fn fallback(mut self, transport: Arc<dyn Transport>) -> Self {
        self.fallback = Some(transport);
        self
    }

    /// Checks every pattern and fixed topic and returns the router.
    pub fn build(self) -> Result<Router> {
        for r in &self.routes {
            validate_pattern(&r.pattern).map_err(|e| Error::from(e).with_backend("router"))?;
            if let Some(Rename::To(t) | Rename::Prefix(t)) = &r.rename {
                let probe = match &r.rename {
                    Some(Rename::Prefix(_)) => format!("{t}x"),
                    _ => t.clone(),
                };
                validate_topic(&probe).map_err(|e| {
                    Error::permanent(
                        ErrorKind::Config,
                        format!("route {:?} renames to an invalid topic: {e}", r.pattern),
                    )
                    .with_backend("router")
                })?;
            }
        }
        if self.routes.is_empty() && self.fallback.is_none() {
            return Err(Error::permanent(
                ErrorKind::Config,
                "a router needs a route or a fallback",
            )
            .with_backend("router"));
        }
        Ok(Router {
            routes: self.routes,
            fallback: self.fallback,
        })
    }
}

/// A [`Transport`] that dispatches each message to the transport of the
/// first matching route, or to the fallback. Sub-batches for different
/// transports are published concurrently. A message that matches nothing and
/// has no fallback fails with a permanent [`ErrorKind::Unroutable`] error.
pub struct Router {
    routes: Vec<Route>,
    fallback: Option<Arc<dyn Transport>>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("routes", &self.routes)
            .field(
                "fallback",
                &self.fallback.as_ref().map(|t| t.name().to_string()),
            )
            .finish()
    }
}

const FALLBACK: usize = usize::MAX;

impl Router {
    /// Starts a router.
    pub fn builder() -> RouterBuilder {
        RouterBuilder::default()
    }

    /// The index of the route for `topic`, `FALLBACK`, or `None`.
    fn target(&self, topic: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| pattern_matches(&r.pattern, topic))
            .or(self.fallback.as_ref().map(|_| FALLBACK))
    }

    fn transport(&self, target: usize) -> Option<&Arc<dyn Transport>> {
        if target == FALLBACK {
            self.fallback.as_ref()
        } else {
            self.routes.get(target).map(|r| &r.transport)
        }
    }

    fn rename(&self, target: usize) -> Option<&Rename> {
        self.routes.get(target).and_then(|r| r.rename.as_ref())
    }
}

#[async_trait]
impl Transport for Router {
    fn name(&self) -> &str {
        "router"
    }

    fn name_for(&self, topic: &str) -> &str {
        match self.target(topic).and_then(|t| self.transport(t)) {
            Some(t) => t.name_for(topic),
            None => "unrouted",
        }
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        let mut results: Vec<Option<PublishResult>> = messages.iter().map(|_| None).collect();
        // Group message indices by target, keeping input order inside a group.
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            match self.target(&m.topic) {
                Some(target) => match groups.iter_mut().find(|(t, _)| *t == target) {
                    Some((_, idx)) => idx.push(i),
                    None => groups.push((target, vec![i])),
                },
                None => {
                    results[i] = Some(Err(Error::permanent(
                        ErrorKind::Unroutable,
                        format!(
                            "no route matches topic {:?} and there is no fallback",
                            m.topic
                        ),
                    )
                    .with_backend("router")
                    .with_operation("publish")))
                }
            }
        }

        let mut calls = Vec::with_capacity(groups.len());
        for (target, idx) in &groups {
            let Some(transport) = self.transport(*target) else {
                continue;
            };
            let rename = self.rename(*target);
            let whole = rename.is_none() && idx.len() == messages.len();
            let mut batch = Vec::new();
            let mut sent = Vec::new();
            if !whole {
                for &i in idx {
                    let mut m = messages[i].clone();
                    if let Some(r) = rename {
                        let renamed = r.apply(&m.topic);
                        if renamed != m.topic {
                            // The consumer may want the topic it was written to.
                            let original = std::mem::replace(&mut m.topic, renamed);
                            m.headers
                                .entry(crate::wire::TOPIC_HEADER.to_string())
                                .or_insert(original);
                        }
                        if let Err(e) = validate_topic(&m.topic) {
                            results[i] = Some(Err(Error::permanent(
                                ErrorKind::InvalidInput,
                                format!("route renamed the topic to an invalid one: {e}"),
                            )
                            .with_backend("router")
                            .with_operation("publish")));
                            continue;
                        }
                    }
                    batch.push(m);
                    sent.push(i);
                }
            } else {
                sent.clone_from(idx);
            }
            calls.push(async move {
                let out = if whole {
                    transport.publish_batch(messages).await
                } else {
                    transport.publish_batch(&batch).await
                };
                (transport.name().to_string(), sent, out)
            });
        }

        for (name, sent, out) in join_all(calls).await {
            let mut out = out.into_iter();
            for i in sent {
                results[i] = Some(out.next().unwrap_or_else(|| Err(missing_result(&name))));
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(missing_result("router"))))
            .collect()
    }

    async fn flush(&self) -> Result<()> {
        let all = self
            .routes
            .iter()
            .map(|r| &r.transport)
            .chain(self.fallback.iter());
        for r in join_all(all.map(|t| t.flush())).await {
            r?;
        }
        Ok(())
    }
}
