//! [`AmqpTransport`]: the [`Transport`] implementation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use outbox_core::message::CONTENT_TYPE;
use outbox_core::wire::{ID_HEADER, KEY_HEADER, TOPIC_HEADER};
use outbox_core::{Error, Message, PublishResult, Transport};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

use crate::config::{parse_uri, AmqpConfig, ExchangeType};
use crate::error::AmqpError;

/// Header whose value becomes the AMQP `type` property.
pub const TYPE_HEADER: &str = "type";
/// Header whose value becomes the AMQP `correlation_id` property.
pub const CORRELATION_ID_HEADER: &str = "correlation-id";

/// Publishes outbox messages to RabbitMQ (AMQP 0-9-1) with publisher
/// confirms: `Ok` means the broker confirmed the message, persistent, routed
/// to at least one queue (publishes are `mandatory`).
///
/// The transport keeps one connection and a small pool of confirm-mode
/// channels; each `publish_batch` call uses a channel of its own, so confirms
/// and returned messages are never attributed across calls. When the
/// connection or a channel breaks (broker restart, channel error) the
/// affected messages fail as transient errors and the next call reconnects.
/// Build it once and share it (`Arc`).
pub struct AmqpTransport {
    config: AmqpConfig,
    uri: AMQPUri,
    link: Mutex<Link>,
    idle: SyncMutex<Vec<Pooled>>,
    generation: AtomicU64,
    window: Arc<Semaphore>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The connection, behind a lock; replaced lazily when it breaks.
struct Link {
    connection: Option<Connection>,
    /// Set when a publish met a missing exchange: check the topology again.
    recheck: bool,
    /// Exchanges that cannot be published to, and why.
    unusable: Arc<HashMap<String, AmqpError>>,
    /// When `unusable` was last found.
    checked_at: Instant,
}

/// How long an exchange found unusable stays so before it is checked again.
const RECHECK_AFTER: Duration = Duration::from_secs(5);

/// A confirm-mode channel with what was known about the exchanges when it
/// was opened.
struct Pooled {
    channel: Channel,
    unusable: Arc<HashMap<String, AmqpError>>,
    checked_at: Instant,
    generation: u64,
}

type ConfirmOutcome = Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>;

/// What one call learned about its channel and connection.
#[derive(Default)]
struct Health {
    /// The channel can be reused.
    channel_broken: bool,
    /// The connection should be replaced.
    connection_broken: bool,
    /// An exchange went missing.
    recheck: bool,
    /// Messages whose confirm failed with the channel's closing error, whose
    /// publish met the closing channel, or that were not sent after that:
    /// the broker closes a channel for one message and fails every confirm
    /// outstanding on it, so the error may be another message's.
    orphans: Vec<usize>,
    /// The broker closed the channel (a soft error such as 403 or 406),
    /// which one message can cause; a lost connection is nobody's fault.
    refused: bool,
}

impl AmqpTransport {
    /// Connects to the broker of `config`, declares (or, with
    /// `declare_exchange = false`, checks) its exchanges and opens a confirm
    /// channel.
    ///
    /// Fails with a transient [`Connection`](outbox_core::ErrorKind::Connection)
    /// error when the broker is unreachable, and with a permanent error when
    /// the configuration or the credentials are wrong or an exchange is
    /// missing or declared differently.
    pub async fn connect(config: AmqpConfig) -> Result<Self, Error> {
        config.validate()?;
        let uri = parse_uri(&config.url)?;
        let window = Arc::new(Semaphore::new(config.max_in_flight));
        let transport = AmqpTransport {
            config,
            uri,
            link: Mutex::new(Link {
                connection: None,
                recheck: false,
                unusable: Arc::new(HashMap::new()),
                checked_at: Instant::now(),
            }),
            idle: SyncMutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            window,
        };
        let pooled = transport
            .checkout()
            .await
            .map_err(|e| e.during("connect"))?;
        if let Some((name, problem)) = pooled.unusable.iter().next() {
            tracing::debug!(exchange = %name, "outbox-amqp: exchange unusable at connect");
            return Err(problem.clone().during("connect"));
        }
        transport.checkin(pooled);
        Ok(transport)
    }

    /// The configuration this transport was built with.
    pub fn config(&self) -> &AmqpConfig {
        &self.config
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Pooled>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A confirm channel for one call: an idle one, or a new one on the
    /// current connection, reconnecting first if the connection broke.
    async fn checkout(&self) -> Result<Pooled, AmqpError> {
        let generation = self.generation.load(Ordering::Acquire);
        loop {
            let Some(p) = self.idle().pop() else { break };
            let fresh = p.unusable.is_empty() || p.checked_at.elapsed() < RECHECK_AFTER;
            if p.generation == generation && p.channel.status().connected() && fresh {
                return Ok(p);
            }
        }
        let mut link = self.link.lock().await;
        let alive = link
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected());
        if !alive {
            link.connection = None;
            let connection = self.open_connection().await?;
            link.unusable = Arc::new(self.topology(&connection).await?);
            link.checked_at = Instant::now();
            link.connection = Some(connection);
            link.recheck = false;
            self.new_generation();
        } else if link.recheck
            || (!link.unusable.is_empty() && link.checked_at.elapsed() >= RECHECK_AFTER)
        {
            if let Some(connection) = &link.connection {
                match self.topology(connection).await {
                    Ok(unusable) => {
                        link.unusable = Arc::new(unusable);
                        link.checked_at = Instant::now();
                    }
                    Err(e) => {
                        // The connection failed: replace it on the next call.
                        link.connection = None;
                        return Err(e);
                    }
                }
            }
            link.recheck = false;
            self.new_generation();
        }
        let Some(connection) = link.connection.as_ref() else {
            return Err(AmqpError::Connection("no connection".into()));
        };
        match self.open_channel(connection).await {
            Ok(channel) => Ok(Pooled {
                channel,
                unusable: link.unusable.clone(),
                checked_at: link.checked_at,
                generation: self.generation.load(Ordering::Acquire),
            }),
            Err(e) => {
                if e.is_connection() {
                    link.connection = None;
                }
                Err(e)
            }
        }
    }

    fn new_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.idle().clear();
    }

    /// Returns a healthy channel to the pool.
    fn checkin(&self, pooled: Pooled) {
        if pooled.generation == self.generation.load(Ordering::Acquire)
            && pooled.channel.status().connected()
        {
            self.idle().push(pooled);
        }
    }

    async fn open_connection(&self) -> Result<Connection, AmqpError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.config.connection_name.as_str()));
        let connect = Connection::connect_uri(self.uri.clone(), properties);
        match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Ok(Ok(connection)) => {
                tracing::debug!("outbox-amqp: connected");
                Ok(connection)
            }
            Ok(Err(e)) => Err(match AmqpError::from_lapin(&e) {
                AmqpError::Unauthorized(text) => AmqpError::Unauthorized(text),
                other => AmqpError::Connect(other.to_string()),
            }),
            Err(_) => Err(AmqpError::Connect(format!(
                "no connection within {:?}",
                self.config.connect_timeout
            ))),
        }
    }

    async fn open_channel(&self, connection: &Connection) -> Result<Channel, AmqpError> {
        let limit = self.config.connect_timeout;
        let open = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| AmqpError::from_lapin(&e))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| AmqpError::from_lapin(&e))?;
            Ok(channel)
        };
        match tokio::time::timeout(limit, open).await {
            Ok(r) => r,
            Err(_) => Err(AmqpError::Connection(format!(
                "no channel within {limit:?}"
            ))),
        }
    }

    /// Declares (or passively checks) every configured exchange; returns
    /// those that cannot be used. Fails only when the connection fails.
    async fn topology(
        &self,
        connection: &Connection,
    ) -> Result<HashMap<String, AmqpError>, AmqpError> {
        let mut unusable = HashMap::new();
        let mut spare: Option<Channel> = None;
        for name in self.config.exchanges() {
            let channel = match spare.take() {
                Some(c) => c,
                None => connection
                    .create_channel()
                    .await
                    .map_err(|e| AmqpError::from_lapin(&e))?,
            };
            // Predeclared amq.* exchanges cannot be declared, only checked.
            let passive = !self.config.declare_exchange || name.starts_with("amq.");
            let options = ExchangeDeclareOptions {
                passive,
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            let kind = match self.config.exchange_kind {
                ExchangeType::Direct => ExchangeKind::Direct,
                ExchangeType::Fanout => ExchangeKind::Fanout,
                ExchangeType::Headers => ExchangeKind::Headers,
                _ => ExchangeKind::Topic,
            };
            let declared = tokio::time::timeout(
                self.config.connect_timeout,
                channel.exchange_declare(name.into(), kind, options, FieldTable::default()),
            )
            .await;
            match declared {
                Ok(Ok(())) => spare = Some(channel),
                Ok(Err(e)) => {
                    let mapped = AmqpError::from_lapin(&e);
                    if matches!(mapped, AmqpError::Connection(_)) {
                        return Err(mapped);
                    }
                    let problem = if AmqpError::lapin_not_found(&e) {
                        AmqpError::NoExchange(name.to_string())
                    } else {
                        AmqpError::Exchange {
                            name: name.to_string(),
                            reason: mapped.to_string(),
                        }
                    };
                    tracing::warn!(exchange = name, error = %problem, "outbox-amqp: exchange unusable");
                    unusable.insert(name.to_string(), problem);
                }
                Err(_) => {
                    return Err(AmqpError::Connection(format!(
                        "exchange.declare of {name:?} got no answer"
                    )))
                }
            }
        }
        if let Some(channel) = spare {
            let _ = channel.close(200, "OK".into()).await;
        }
        Ok(unusable)
    }

    /// Properties of one message: persistent, message id, content type,
    /// type, correlation id and headers.
    /// The message's properties; `routing_key` is where it goes (the topic
    /// unless a route sets another, which then adds `outbox-topic`).
    fn properties(m: &Message, routing_key: &str) -> Result<BasicProperties, AmqpError> {
        let id = m.id.to_string();
        let mut table = FieldTable::default();
        for (name, value) in &m.headers {
            let key = ShortString::try_new(name.as_str())
                .map_err(|_| AmqpError::InvalidHeader(name.clone()))?;
            table.insert(key, AMQPValue::LongString(LongString::from(value.as_str())));
        }
        // A router that renamed the topic already named the original.
        if routing_key != m.topic && !m.headers.contains_key(TOPIC_HEADER) {
            table.insert(
                ShortString::from(TOPIC_HEADER),
                AMQPValue::LongString(LongString::from(m.topic.as_str())),
            );
        }
        table.insert(
            ShortString::from(ID_HEADER),
            AMQPValue::LongString(LongString::from(id.as_str())),
        );
        if let Some(key) = &m.key {
            table.insert(
                ShortString::from(KEY_HEADER),
                AMQPValue::LongString(LongString::from(key.as_str())),
            );
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(id.as_str()))
            .with_headers(table);
        if let Ok(since) = m.created_at.duration_since(UNIX_EPOCH) {
            props = props.with_timestamp(since.as_secs());
        }
        // Values longer than a short string stay in the headers only.
        if let Some(v) = m.headers.get(CONTENT_TYPE) {
            if let Ok(s) = ShortString::try_new(v.as_str()) {
                props = props.with_content_type(s);
            }
        }
        if let Some(v) = m.headers.get(TYPE_HEADER) {
            if let Ok(s) = ShortString::try_new(v.as_str()) {
                props = props.with_type(s);
            }
        }
        if let Some(v) = m.headers.get(CORRELATION_ID_HEADER) {
            if let Ok(s) = ShortString::try_new(v.as_str()) {
                props = props.with_correlation_id(s);
            }
        }
        Ok(props)
    }

    /// Waits for a window slot while collecting confirms that complete
    /// meanwhile, so a call never waits on slots held by its own confirms.
    async fn slot<F: std::future::Future>(
        &self,
        inflight: &mut FuturesUnordered<F>,
        mut done: impl FnMut(F::Output),
    ) -> Option<OwnedSemaphorePermit> {
        loop {
            tokio::select! {
                biased;
                Some(out) = inflight.next(), if !inflight.is_empty() => done(out),
                permit = self.window.clone().acquire_owned() => return permit.ok(),
            }
        }
    }

    /// Returns a channel after a publish, or drops it (closing it) when it
    /// broke, replacing the connection on the next call when that broke.
    async fn finish(&self, pooled: Pooled, health: &Health) {
        if !(health.channel_broken || health.connection_broken || health.recheck) {
            self.checkin(pooled);
            return;
        }
        let mut link = self.link.lock().await;
        link.recheck |= health.recheck;
        // Replace the connection on the next call, unless another call
        // already replaced the one this call used.
        let replaced = pooled.generation != self.generation.load(Ordering::Acquire)
            && link
                .connection
                .as_ref()
                .is_some_and(|c| c.status().connected());
        if health.connection_broken && !replaced {
            tracing::warn!(
                "outbox-amqp: connection lost or unresponsive; reconnecting on the next publish"
            );
            link.connection = None;
            drop(link);
            self.new_generation();
        }
    }

    /// Gives each orphan of a closed channel its own verdict: publishes it
    /// alone on a fresh channel, so that the message that made the broker
    /// close the channel fails with that error and the others are published
    /// (one that had reached a queue before the close is published twice,
    /// under its id). Without a connection to do it on, an orphan that was
    /// sent fails transiently (its error may have been another message's)
    /// and one that was not stays unsent.
    async fn isolate(
        &self,
        messages: &[Message],
        orphans: &[usize],
        results: &mut [Option<PublishResult>],
    ) {
        // Whether a fresh channel cannot be had (the connection broke).
        let mut down = false;
        for &i in orphans {
            let Some(m) = messages.get(i) else { continue };
            let shared = match results.get_mut(i) {
                Some(slot @ Some(Err(_))) => slot,
                _ => continue,
            };
            if !down {
                if let Ok(pooled) = self.checkout().await {
                    let mut own = [None];
                    let mut health = Health::default();
                    self.publish_on(&pooled, std::slice::from_ref(m), &mut own, &mut health)
                        .await;
                    down = health.connection_broken;
                    self.finish(pooled, &health).await;
                    if let [Some(result)] = own {
                        *shared = Some(result);
                        continue;
                    }
                } else {
                    down = true;
                }
            }
            if let Some(Err(e)) = shared
                .as_ref()
                .filter(|r| !r.as_ref().is_err_and(Error::is_unsent))
            {
                let text = format!("the channel closed before the confirm: {}", e.message());
                *shared = Some(Err(AmqpError::Channel(text).into()));
            }
        }
    }

    /// Publishes the whole batch on one channel, pipelined.
    async fn publish_on(
        &self,
        pooled: &Pooled,
        messages: &[Message],
        results: &mut [Option<PublishResult>],
        health: &mut Health,
    ) {
        let timeout = self.config.confirm_timeout;
        let mut returned: Vec<BasicReturnMessage> = Vec::new();
        let mut inflight = FuturesUnordered::new();
        let mut broken: Option<AmqpError> = None;
        for (i, m) in messages.iter().enumerate() {
            if let Some(e) = &broken {
                // Not sent: the channel broke on an earlier message.
                results[i] = Some(Err(e.clone().during("publish").unsent()));
                health.orphans.push(i);
                continue;
            }
            let (exchange, routing_key) = self.config.route_for(&m.topic);
            if let Some(problem) = pooled.unusable.get(exchange) {
                results[i] = Some(Err(problem.clone().into()));
                continue;
            }
            let prepared = Self::properties(m, routing_key).and_then(|props| {
                let ex = ShortString::try_new(exchange).map_err(|_| {
                    AmqpError::InvalidInput(format!("exchange name {exchange:?} is too long"))
                })?;
                let rk = ShortString::try_new(routing_key).map_err(|_| {
                    AmqpError::InvalidInput(format!(
                        "routing key is {} bytes, more than 255",
                        routing_key.len()
                    ))
                })?;
                Ok((ex, rk, props))
            });
            let (ex, rk, props) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    results[i] = Some(Err(e.into()));
                    continue;
                }
            };
            let permit = self
                .slot(&mut inflight, |out| {
                    record_confirm(out, results, &mut returned, health, timeout)
                })
                .await;
            let options = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            let publish = pooled
                .channel
                .basic_publish(ex, rk, options, &m.payload, props);
            match tokio::time::timeout(timeout, publish).await {
                Ok(Ok(confirm)) => inflight.push(async move {
                    let outcome = tokio::time::timeout(timeout, confirm).await;
                    drop(permit);
                    (i, outcome)
                }),
                Ok(Err(e)) => {
                    let mapped = AmqpError::from_lapin(&e);
                    health.channel_broken = true;
                    health.connection_broken |= matches!(mapped, AmqpError::Connection(_));
                    health.recheck |= AmqpError::lapin_not_found(&e);
                    health.refused |= AmqpError::lapin_channel_close(&e);
                    health.orphans.push(i);
                    results[i] = Some(Err(mapped.clone().into()));
                    broken = Some(mapped);
                }
                Err(_) => {
                    let e = AmqpError::Connection(format!("could not send within {timeout:?}"));
                    health.channel_broken = true;
                    health.connection_broken = true;
                    results[i] = Some(Err(e.clone().into()));
                    broken = Some(e);
                }
            }
        }
        while let Some(out) = inflight.next().await {
            record_confirm(out, results, &mut returned, health, timeout);
        }

        // A returned message comes back with the confirm of whichever
        // message the broker acknowledged next (lapin cannot tell which it
        // belongs to); its message id names it.
        if !returned.is_empty() {
            let index: HashMap<String, usize> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| (m.id.to_string(), i))
                .collect();
            for r in returned {
                let id = r
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string());
                match id.as_ref().and_then(|id| index.get(id)) {
                    Some(&i) => {
                        results[i] = Some(Err(AmqpError::Unroutable {
                            exchange: r.delivery.exchange.to_string(),
                            routing_key: r.delivery.routing_key.to_string(),
                            code: r.reply_code,
                            text: r.reply_text.to_string(),
                            transient: self.config.unroutable_is_transient,
                        }
                        .into()));
                    }
                    None => tracing::warn!(
                        message_id = ?id,
                        "outbox-amqp: the broker returned a message this call did not publish"
                    ),
                }
            }
        }
    }
}

/// Records the confirm of message `i`.
fn record_confirm(
    (i, outcome): (usize, ConfirmOutcome),
    results: &mut [Option<PublishResult>],
    returned: &mut Vec<BasicReturnMessage>,
    health: &mut Health,
    timeout: Duration,
) {
    let Some(slot) = results.get_mut(i) else {
        return;
    };
    *slot = Some(match outcome {
        Ok(Ok(Confirmation::Ack(ret))) => {
            returned.extend(ret);
            Ok(())
        }
        Ok(Ok(Confirmation::Nack(ret))) => {
            returned.extend(ret);
            Err(AmqpError::Nacked.into())
        }
        Ok(Ok(Confirmation::NotRequested)) => {
            health.channel_broken = true;
            Err(AmqpError::Other("the channel is not in confirm mode".into()).into())
        }
        Ok(Err(e)) => {
            let mapped = AmqpError::from_lapin(&e);
            health.channel_broken = true;
            health.connection_broken |= matches!(mapped, AmqpError::Connection(_));
            health.recheck |= AmqpError::lapin_not_found(&e);
            health.refused |= AmqpError::lapin_channel_close(&e);
            health.orphans.push(i);
            Err(mapped.into())
        }
        Err(_) => {
            // Confirms stopped coming: the connection is likely dead.
            health.channel_broken = true;
            health.connection_broken = true;
            Err(AmqpError::Timeout(timeout).into())
        }
    });
}

#[async_trait]
impl Transport for AmqpTransport {
    fn name(&self) -> &str {
        "amqp"
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        if messages.is_empty() {
            return Vec::new();
        }
        let pooled = match self.checkout().await {
            Ok(p) => p,
            // No channel, so nothing was sent: the relay hands the batch
            // back uncounted and backs off (credentials refused on a
            // reconnect included: rotated secrets must not dead-letter the
            // backlog).
            Err(e) => {
                return messages
                    .iter()
                    .map(|_| Err(e.clone().during("publish").unsent()))
                    .collect()
            }
        };
        let mut results: Vec<Option<PublishResult>> = messages.iter().map(|_| None).collect();
        let mut health = Health::default();
        self.publish_on(&pooled, messages, &mut results, &mut health)
            .await;
        let orphans = std::mem::take(&mut health.orphans);
        // Only a channel the broker closed can be one message's fault; a
        // missing exchange (404) is not (the exchanges are checked again on
        // the next call instead), nor a lost connection.
        let isolate =
            messages.len() > 1 && !orphans.is_empty() && health.refused && !health.recheck;
        self.finish(pooled, &health).await;
        if isolate {
            self.isolate(messages, &orphans, &mut results).await;
        }

        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(AmqpError::Other("no result recorded".into()).into())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn properties_carry_id_key_headers_and_special_headers() {
        let m = Message::json("orders.placed", &serde_json::json!({"n": 1}))
            .key("order-1")
            .header("type", "OrderPlaced")
            .header("correlation-id", "c-1")
            .header("x-trace", "t")
            .build()
            .unwrap();
        let p = AmqpTransport::properties(&m, "orders.placed").unwrap();
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), m.id.to_string());
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "OrderPlaced");
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "c-1");
        let h = p.headers().as_ref().unwrap().inner();
        assert!(h.contains_key("x-trace"));
        assert!(h.contains_key(ID_HEADER));
        assert!(h.contains_key(KEY_HEADER));
        assert!(
            !h.contains_key(TOPIC_HEADER),
            "the routing key is the topic"
        );
        let p = AmqpTransport::properties(&m, "eu.orders").unwrap();
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get(TOPIC_HEADER),
            Some(&AMQPValue::LongString(LongString::from("orders.placed"))),
            "a route replaced the routing key: the topic travels in a header"
        );
        let long = Message::builder("t", &b"x"[..])
            .header("type", "t".repeat(300))
            .build()
            .unwrap();
        let p = AmqpTransport::properties(&long, "t").unwrap();
        assert!(p.kind().is_none());
        assert!(p.headers().as_ref().unwrap().contains_key("type"));
    }
}
