//! [`NatsTransport`]: the [`Transport`] implementation.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::header::{HeaderMap, HeaderName, HeaderValue, NATS_MESSAGE_ID};
use async_nats::jetstream::context::GetStreamByNameErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectOptions, Event, StatusCode, Subject};
use async_trait::async_trait;
use futures_util::stream::StreamExt;
use outbox_core::router::pattern_matches;
use outbox_core::wire::{ID_HEADER, KEY_HEADER, TOPIC_HEADER};
use outbox_core::{Error, Message, PublishResult, Transport};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{server_addrs, validate_subject, NatsConfig, NatsMode, StreamSpec};
use crate::error::NatsError;

/// Publishes outbox messages to NATS: JetStream (each message acknowledged by
/// its stream, deduplicated by `Nats-Msg-Id`) or core NATS (not durable).
///
/// One transport holds one client connection; async-nats reconnects it by
/// itself after the server restarts, so the transport is built once and shared
/// (`Arc`) for the life of the process. Publishes are pipelined: up to
/// [`NatsConfig::max_in_flight`] acks are awaited at once across all calls.
pub struct NatsTransport {
    config: NatsConfig,
    client: Client,
    jetstream: Option<jetstream::Context>,
    /// Where JetStream acks arrive (JetStream mode only).
    acks: Option<Acks>,
    window: Arc<Semaphore>,
    /// Connections lost so far (the client reconnects by itself).
    lost: watch::Receiver<u64>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("config", &self.config)
            .field("state", &self.client.connection_state().to_string())
            .finish_non_exhaustive()
    }
}

/// What a server check found for a subject a publish had no stream for.
enum Missing {
    /// The stream was (re)created: publish again.
    Created,
    /// The check failed or a stream exists now: retry later.
    Transient(NatsError),
    /// No stream captures the subject, and none is configured to.
    Permanent(NatsError),
}

impl NatsTransport {
    /// Connects to the server(s) of `config`.
    ///
    /// In JetStream mode it also checks that JetStream is available and
    /// creates [`NatsConfig::create_stream`] if that is set and missing. Fails
    /// with a transient [`Connection`](outbox_core::ErrorKind::Connection)
    /// error when the server is unreachable, and with a permanent error when
    /// the configuration, the credentials or the server's JetStream set-up is
    /// wrong.
    pub async fn connect(config: NatsConfig) -> Result<Self, Error> {
        config.validate()?;
        let addrs = server_addrs(&config.url)?;
        let mut options = ConnectOptions::new()
            .name(&config.client_name)
            // Room for every ack of a full window in the ack subscription
            // (the client drops what does not fit).
            .subscription_capacity(config.max_in_flight.saturating_mul(2).max(65_536))
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.ack_timeout))
            .max_reconnects(None);
        // Acks awaited over a lost connection never come: counting losses
        // lets a call fail them at once instead of after `ack_timeout`.
        let (lost_tx, lost) = watch::channel(0u64);
        let lost_tx = Arc::new(lost_tx);
        options = options.event_callback(move |event| {
            let lost = lost_tx.clone();
            async move {
                if matches!(event, Event::Disconnected) {
                    lost.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
        });
        if let Some(token) = &config.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &config.credentials_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| NatsError::Credentials(e.to_string()).during("connect"))?;
        }
        let client = match tokio::time::timeout(
            config.connect_timeout.saturating_mul(2),
            options.connect(addrs),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(NatsError::from_connect(&e).during("connect")),
            Err(_) => {
                return Err(NatsError::Connect(format!(
                    "no connection within {:?}",
                    config.connect_timeout
                ))
                .during("connect"))
            }
        };

        let jetstream = match config.mode {
            NatsMode::Core => None,
            NatsMode::JetStream => {
                // Used for the JetStream API (stream checks and creation);
                // publishes go through `Acks`.
                let context = jetstream::ContextBuilder::new()
                    .timeout(config.ack_timeout)
                    .build(client.clone());
                check_jetstream(&context).await?;
                if let Some(spec) = &config.create_stream {
                    ensure_stream(&context, spec).await?;
                }
                Some(context)
            }
        };
        let acks = match jetstream {
            Some(_) => Some(Acks::subscribe(&client).await?),
            None => None,
        };
        let window = Arc::new(Semaphore::new(config.max_in_flight));
        Ok(NatsTransport {
            config,
            client,
            jetstream,
            acks,
            window,
            lost,
        })
    }

    /// The configuration this transport was built with.
    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    /// Whether the client is connected right now (it reconnects by itself).
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Subject and headers for one message. `last` holds the topic and
    /// subject of the message before: a batch mostly has one topic, so its
    /// subject is mapped and checked once.
    fn prepare(
        &self,
        m: &Message,
        last: &mut Option<(String, Subject)>,
    ) -> Result<(Subject, HeaderMap), NatsError> {
        let subject = match last {
            Some((topic, subject)) if *topic == m.topic => subject.clone(),
            _ => {
                let subject = self.config.subject_for(&m.topic);
                validate_subject(&subject, false)
                    .map_err(|_| NatsError::InvalidSubject(subject.clone()))?;
                let subject = Subject::from(subject);
                *last = Some((m.topic.clone(), subject.clone()));
                subject
            }
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &m.headers {
            let n = HeaderName::from_str(name)
                .map_err(|_| NatsError::InvalidHeader(name.to_string()))?;
            headers.insert(n, value_of(name, value)?);
        }
        let id = value_of(ID_HEADER, &m.id.to_string())?;
        if let Some(key) = &m.key {
            headers.insert(KEY, value_of(KEY_HEADER, key)?);
        }
        // A router that renamed the topic already named the original.
        if subject.as_str() != m.topic && !m.headers.contains_key(TOPIC_HEADER) {
            headers.insert(TOPIC, value_of(TOPIC_HEADER, &m.topic)?);
        }
        if self.jetstream.is_some() {
            headers.insert(NATS_MESSAGE_ID, id.clone());
        }
        headers.insert(ID, id);
        Ok((subject, headers))
    }

    /// Publishes `indices` of `messages` through JetStream, pipelined: each
    /// message asks for its ack on a reply subject of its own under
    /// [`Acks`], within the transport's window. Messages whose subject had
    /// no stream are returned for a server check.
    async fn publish_jetstream(
        &self,
        acks: &Acks,
        messages: &[Message],
        indices: &[usize],
        results: &mut [Option<PublishResult>],
    ) -> Vec<usize> {
        let timeout = self.config.ack_timeout;
        if acks.router.is_finished() {
            let e = NatsError::NotConnected("the ack subscription has ended".into());
            for &i in indices {
                results[i] = Some(Err(e.clone().into()));
            }
            return Vec::new();
        }
        let mut call = acks.register();
        let mut lost = self.lost.clone();
        lost.mark_unchanged();
        // The window slot of every message still waiting for its ack.
        let mut waiting: HashMap<usize, OwnedSemaphorePermit> = HashMap::new();
        let mut no_stream = Vec::new();
        let mut down: Option<NatsError> = None;
        let mut last = None;
        // The last send or ack: a server that answers nothing for a whole
        // `ack_timeout` after it fails what is still waiting.
        let mut progress = Instant::now();
        // Records the first answer to a message still waiting; anything
        // else (a duplicate, a stray reply) is not progress.
        let mut record = |(i, ack): (usize, Ack),
                          waiting: &mut HashMap<usize, OwnedSemaphorePermit>,
                          results: &mut [Option<PublishResult>]|
         -> bool {
            if waiting.remove(&i).is_none() {
                return false;
            }
            match ack {
                Ack::Stored => results[i] = Some(Ok(())),
                Ack::NoStream => no_stream.push(i),
                Ack::Failed(e) => results[i] = Some(Err(e.into())),
            }
            true
        };
        for &i in indices {
            let Some(m) = messages.get(i) else { continue };
            if let Some(e) = &down {
                results[i] = Some(Err(e.clone().into()));
                continue;
            }
            if self.client.connection_state() == State::Disconnected {
                let e = NatsError::NotConnected("not connected to the server".into());
                results[i] = Some(Err(e.clone().into()));
                down = Some(e);
                continue;
            }
            let (subject, headers) = match self.prepare(m, &mut last) {
                Ok(p) => p,
                Err(e) => {
                    results[i] = Some(Err(e.into()));
                    continue;
                }
            };
            // A window slot; acks that arrive meanwhile free theirs (also
            // this call's own, so it never waits on itself).
            let permit = loop {
                tokio::select! {
                    biased;
                    Some(ack) = call.replies.recv(), if !waiting.is_empty() => {
                        if record(ack, &mut waiting, results) {
                            progress = Instant::now();
                        }
                    }
                    permit = self.window.clone().acquire_owned() => break permit.ok(),
                    Ok(()) = lost.changed(), if !waiting.is_empty() => {
                        cut_off(&mut waiting, results);
                    }
                    // No ack for a whole timeout: what waits has failed
                    // (a dead connection is caught above, before sending).
                    _ = tokio::time::sleep_until(until(progress, timeout)), if !waiting.is_empty() => {
                        timed_out(&mut waiting, results, timeout);
                    }
                }
            };
            // A loss seen now came after the sends still waiting.
            if lost.has_changed().unwrap_or(false) {
                lost.mark_unchanged();
                cut_off(&mut waiting, results);
            }
            let send = self.client.publish_with_reply_and_headers(
                subject,
                call.reply(i),
                headers,
                m.payload.clone(),
            );
            match tokio::time::timeout(timeout, send).await {
                Ok(Ok(())) => {
                    if let Some(permit) = permit {
                        waiting.insert(i, permit);
                    }
                    progress = Instant::now();
                }
                Ok(Err(e)) => results[i] = Some(Err(NatsError::from_send(&e, &m.topic).into())),
                Err(_) => {
                    // The client could not even queue the publish: the
                    // connection is down; fail the rest fast.
                    let e = NatsError::NotConnected(format!("could not send within {timeout:?}"));
                    results[i] = Some(Err(e.clone().into()));
                    down = Some(e);
                }
            }
        }
        while !waiting.is_empty() {
            tokio::select! {
                biased;
                ack = call.replies.recv() => match ack {
                    Some(ack) => {
                        if record(ack, &mut waiting, results) {
                            progress = Instant::now();
                        }
                    }
                    None => timed_out(&mut waiting, results, timeout),
                },
                Ok(()) = lost.changed() => cut_off(&mut waiting, results),
                _ = tokio::time::sleep_until(until(progress, timeout)) => {
                    timed_out(&mut waiting, results, timeout);
                }
            }
        }
        no_stream
    }

    /// Asks the server which stream captures `subject`; creates the
    /// configured stream when none does and it would.
    async fn check_missing(&self, context: &jetstream::Context, subject: &str) -> Missing {
        match context.stream_by_subject(subject).await {
            Ok(name) => Missing::Transient(NatsError::Refused(format!(
                "stream {name:?} did not answer for subject {subject:?} (is it starting?)"
            ))),
            Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                match &self.config.create_stream {
                    Some(spec) if spec.subjects.iter().any(|p| covers(p, subject)) => {
                        match ensure_stream(context, spec).await {
                            Ok(()) => {
                                tracing::warn!(
                                    stream = %spec.name,
                                    subject,
                                    "outbox-nats: no stream captured the subject; created the configured stream"
                                );
                                Missing::Created
                            }
                            Err(e) if e.is_transient() => {
                                Missing::Transient(NatsError::Request(e.message().to_string()))
                            }
                            Err(e) => Missing::Permanent(NatsError::CreateStream {
                                name: spec.name.clone(),
                                reason: e.message().to_string(),
                            }),
                        }
                    }
                    _ => Missing::Permanent(NatsError::NoStream(subject.to_string())),
                }
            }
            Err(e) => Missing::Transient(NatsError::Request(e.to_string())),
        }
    }

    async fn publish_core(&self, messages: &[Message], results: &mut [Option<PublishResult>]) {
        let timeout = self.config.ack_timeout;
        if self.client.connection_state() == State::Disconnected {
            let e = NatsError::NotConnected("not connected to the server".into());
            for r in results.iter_mut() {
                *r = Some(Err(e.clone().into()));
            }
            return;
        }
        let mut sent = vec![false; messages.len()];
        let work = async {
            let mut last = None;
            for (i, m) in messages.iter().enumerate() {
                let (subject, headers) = match self.prepare(m, &mut last) {
                    Ok(p) => p,
                    Err(e) => {
                        results[i] = Some(Err(e.into()));
                        continue;
                    }
                };
                match self
                    .client
                    .publish_with_headers(subject, headers, m.payload.clone())
                    .await
                {
                    Ok(()) => sent[i] = true,
                    Err(e) => results[i] = Some(Err(NatsError::from_send(&e, &m.topic).into())),
                }
            }
            // One round trip: a request nobody answers. The server replies
            // "no responders" only after it has read every publish before it.
            let barrier = self.client.new_inbox();
            let request = async_nats::client::Request::new().timeout(Some(timeout));
            match self.client.send_request(barrier, request).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
                Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                    Err(NatsError::Timeout(timeout))
                }
                Err(e) => Err(NatsError::Disconnected(e.to_string())),
            }
        };
        let outcome = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(NatsError::Timeout(timeout)),
        };
        for (i, slot) in results.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            *slot = Some(match &outcome {
                Ok(()) if sent.get(i).copied().unwrap_or(false) => Ok(()),
                Ok(()) => Err(NatsError::Timeout(timeout).into()),
                Err(e) => Err(e.clone().into()),
            });
        }
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &str {
        "nats"
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        let mut results: Vec<Option<PublishResult>> = messages.iter().map(|_| None).collect();
        match (&self.jetstream, &self.acks) {
            (Some(context), Some(acks)) => {
                let all: Vec<usize> = (0..messages.len()).collect();
                let no_stream = self
                    .publish_jetstream(acks, messages, &all, &mut results)
                    .await;
                if !no_stream.is_empty() {
                    let mut verdicts: HashMap<String, Missing> = HashMap::new();
                    let mut again = Vec::new();
                    for &i in &no_stream {
                        let Some(m) = messages.get(i) else { continue };
                        let subject = self.config.subject_for(&m.topic);
                        if !verdicts.contains_key(&subject) {
                            let v = self.check_missing(context, &subject).await;
                            verdicts.insert(subject.clone(), v);
                        }
                        match verdicts.get(&subject) {
                            Some(Missing::Created) => again.push(i),
                            Some(Missing::Transient(e)) | Some(Missing::Permanent(e)) => {
                                results[i] = Some(Err(e.clone().into()));
                            }
                            None => {}
                        }
                    }
                    if !again.is_empty() {
                        let still = self
                            .publish_jetstream(acks, messages, &again, &mut results)
                            .await;
                        for i in still {
                            let subject = messages
                                .get(i)
                                .map(|m| self.config.subject_for(&m.topic))
                                .unwrap_or_default();
                            results[i] = Some(Err(NatsError::Refused(format!(
                                "the stream for {subject:?} was created but did not answer yet"
                            ))
                            .into()));
                        }
                    }
                }
            }
            _ => self.publish_core(messages, &mut results).await,
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(NatsError::Other("no result recorded".into()).into())))
            .collect()
    }

    async fn flush(&self) -> Result<(), Error> {
        match tokio::time::timeout(self.config.ack_timeout, self.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(NatsError::Disconnected(e.to_string()).during("flush")),
            Err(_) => Err(NatsError::Timeout(self.config.ack_timeout).during("flush")),
        }
    }
}

/// What the stream answered for one message.
enum Ack {
    Stored,
    /// No stream captures the subject: checked with the server.
    NoStream,
    Failed(NatsError),
}

impl Ack {
    fn read(m: &async_nats::Message) -> Ack {
        if m.status == Some(StatusCode::NO_RESPONDERS) {
            return Ack::NoStream;
        }
        if let Some(status) = m.status.filter(|s| *s != StatusCode::OK) {
            return Ack::Failed(NatsError::Refused(format!(
                "status {status} {}",
                m.description.as_deref().unwrap_or_default()
            )));
        }
        /// A PubAck names the stream that stored the message and its
        /// sequence there (a duplicate within the window too: already
        /// stored); a refusal has `error`.
        #[derive(serde::Deserialize)]
        struct Reply {
            error: Option<jetstream::Error>,
            stream: Option<String>,
            seq: Option<u64>,
        }
        match serde_json::from_slice::<Reply>(&m.payload) {
            Ok(Reply { error: Some(e), .. }) => Ack::Failed(NatsError::from_ack(&e)),
            Ok(Reply {
                stream: Some(stream),
                seq: Some(_),
                ..
            }) if !stream.is_empty() => Ack::Stored,
            Ok(_) => Ack::Failed(NatsError::Other("a reply that is not a PubAck".into())),
            Err(e) => Ack::Failed(NatsError::Other(format!("an unreadable ack: {e}"))),
        }
    }
}

/// The call token and message index of a reply subject
/// `<prefix><call>.<index>`.
fn route<'s>(subject: &'s str, prefix: &str) -> Option<(&'s str, usize)> {
    let (call, index) = subject.strip_prefix(prefix)?.split_once('.')?;
    Some((call, index.parse().ok()?))
}

/// When a wait that began at `progress` ends (a day at most, so that a
/// huge `ack_timeout` cannot overflow the clock).
fn until(progress: Instant, timeout: Duration) -> Instant {
    progress
        .checked_add(timeout)
        .unwrap_or(progress + Duration::from_secs(86_400))
}

/// Fails every message still waiting: the connection its ack would have
/// come over was lost (it may be stored: a retry is deduplicated by its
/// `Nats-Msg-Id`).
fn cut_off(
    waiting: &mut HashMap<usize, OwnedSemaphorePermit>,
    results: &mut [Option<PublishResult>],
) {
    for (i, _) in waiting.drain() {
        let e = NatsError::Disconnected("the connection was lost before the ack came".into());
        results[i] = Some(Err(e.into()));
    }
}

/// Fails every message still waiting for its ack (their slots go back to
/// the window).
fn timed_out(
    waiting: &mut HashMap<usize, OwnedSemaphorePermit>,
    results: &mut [Option<PublishResult>],
    timeout: Duration,
) {
    for (i, _) in waiting.drain() {
        results[i] = Some(Err(NatsError::Timeout(timeout).into()));
    }
}

/// The transport's JetStream acks. Every publish asks for its ack on
/// `<inbox>.<call>.<index>`, and one subscription to `<inbox>.>` routes
/// each to its call. The client's own request path costs a reply inbox, a
/// oneshot channel and a timer per message: 7.3 CPU µs per message against
/// 5.2 this way (the transport alone).
struct Acks {
    inbox: String,
    client: Client,
    calls: Arc<std::sync::Mutex<Routes>>,
    router: tokio::task::JoinHandle<()>,
}

impl Acks {
    async fn subscribe(client: &Client) -> Result<Acks, Error> {
        let inbox = client.new_inbox();
        let mut subscriber = client
            .subscribe(format!("{inbox}.>"))
            .await
            .map_err(|e| NatsError::Disconnected(e.to_string()).during("connect"))?;
        let calls: Arc<std::sync::Mutex<Routes>> = Arc::default();
        let (routes, prefix) = (calls.clone(), format!("{inbox}."));
        let router = tokio::spawn(async move {
            while let Some(m) = subscriber.next().await {
                let Some((call, index)) = route(&m.subject, &prefix) else {
                    continue;
                };
                let ack = Ack::read(&m);
                let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
                // A call that gave up (timed out, dropped) is gone: its
                // late acks are dropped; the relay publishes again.
                if let Some(call) = routes.get(call) {
                    let _ = call.send((index, ack));
                }
            }
        });
        Ok(Acks {
            inbox,
            client: client.clone(),
            calls,
            router,
        })
    }

    /// A call's reply subjects and the channel its acks arrive on; dropped,
    /// it stops receiving. Each call has a random token of its own, so
    /// that no reply meant for another call, or guessed, reaches it.
    fn register(&self) -> Call<'_> {
        let inbox = self.client.new_inbox();
        let id = inbox.rsplit('.').next().unwrap_or(&inbox).to_string();
        let (tx, replies) = mpsc::unbounded_channel();
        self.routes().insert(id.clone(), tx);
        Call {
            acks: self,
            id,
            replies,
        }
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Each waiting call's id and the channel of its acks (message index and
/// answer).
type Routes = HashMap<String, mpsc::UnboundedSender<(usize, Ack)>>;

impl Drop for Acks {
    fn drop(&mut self) {
        self.router.abort();
    }
}

/// One `publish_batch` call's share of [`Acks`].
struct Call<'a> {
    acks: &'a Acks,
    id: String,
    replies: mpsc::UnboundedReceiver<(usize, Ack)>,
}

impl Call<'_> {
    /// The reply subject of message `index`.
    fn reply(&self, index: usize) -> Subject {
        Subject::from(format!("{}.{}.{index}", self.acks.inbox, self.id))
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.acks.routes().remove(&self.id);
    }
}

/// The headers the transport sets on every message, parsed once.
const ID: HeaderName = HeaderName::from_static(ID_HEADER);
const KEY: HeaderName = HeaderName::from_static(KEY_HEADER);
const TOPIC: HeaderName = HeaderName::from_static(TOPIC_HEADER);

fn value_of(name: &str, value: &str) -> Result<HeaderValue, NatsError> {
    HeaderValue::from_str(value).map_err(|_| NatsError::InvalidHeader(name.to_string()))
}

/// Whether the stream subject `pattern` (NATS wildcards) captures `subject`.
fn covers(pattern: &str, subject: &str) -> bool {
    pattern_matches(pattern, subject)
}

/// Fails unless the server (and account) has JetStream. Reads the account
/// info loosely, so that servers older than the client's model work too.
async fn check_jetstream(context: &jetstream::Context) -> Result<(), Error> {
    use async_nats::jetstream::context::RequestErrorKind as K;
    match context
        .request::<_, _, serde_json::Value>("INFO", &())
        .await
    {
        Ok(info) => match info.get("error") {
            Some(error) => Err(NatsError::JetStreamUnavailable(
                error
                    .get("description")
                    .and_then(|d| d.as_str())
                    .unwrap_or("the server answered with an error")
                    .to_string(),
            )
            .during("connect")),
            None => Ok(()),
        },
        Err(e) if e.kind() == K::NoResponders => Err(NatsError::JetStreamUnavailable(
            "nothing answers the JetStream API (is JetStream enabled?)".into(),
        )
        .during("connect")),
        Err(e) => Err(NatsError::Request(e.to_string()).during("connect")),
    }
}

/// Creates the stream of `spec` unless a stream of that name exists.
async fn ensure_stream(context: &jetstream::Context, spec: &StreamSpec) -> Result<(), Error> {
    use async_nats::jetstream::context::CreateStreamErrorKind as K;
    let config = stream::Config {
        name: spec.name.clone(),
        subjects: spec.subjects.clone(),
        duplicate_window: spec.duplicate_window,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    match context.get_or_create_stream(config).await {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.kind() {
            K::TimedOut | K::Response | K::ResponseParse | K::JetStreamUnavailable => {
                NatsError::Request(e.to_string())
            }
            _ => NatsError::CreateStream {
                name: spec.name.clone(),
                reason: e.to_string(),
            },
        }
        .during("create stream")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(payload: &str, status: Option<StatusCode>) -> Ack {
        Ack::read(&async_nats::Message {
            subject: Subject::from("_INBOX.x.0.0"),
            reply: None,
            payload: bytes::Bytes::from(payload.to_string()),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        })
    }

    fn failed(ack: Ack) -> Error {
        match ack {
            Ack::Failed(e) => e.into(),
            Ack::Stored => panic!("stored"),
            Ack::NoStream => panic!("no stream"),
        }
    }

    #[test]
    fn acks_are_read_strictly() {
        assert!(matches!(
            reply(r#"{"stream":"S","seq":7}"#, None),
            Ack::Stored
        ));
        assert!(matches!(
            reply(r#"{"stream":"S","seq":7,"duplicate":true}"#, None),
            Ack::Stored
        ));
        assert!(matches!(
            reply("", Some(StatusCode::NO_RESPONDERS)),
            Ack::NoStream
        ));
        let large = failed(reply(
            r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}"#,
            None,
        ));
        assert_eq!(large.kind(), outbox_core::ErrorKind::TooLarge);
        assert!(!large.is_transient());
        let wrong = failed(reply(
            r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#,
            None,
        ));
        assert!(!wrong.is_transient());
        let full = failed(reply(
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
            None,
        ));
        assert_eq!(full.kind(), outbox_core::ErrorKind::Rejected);
        assert!(full.is_transient());
        // Anything else is not a store: retried, never counted as one.
        for odd in [
            "{}",
            r#"{"seq":7}"#,
            r#"{"stream":"S"}"#,
            r#"{"stream":"","seq":7}"#,
            r#"{"stream":1,"seq":7}"#,
            r#"{"stream":"S","seq":-1}"#,
            "not json",
            "",
        ] {
            assert!(failed(reply(odd, None)).is_transient(), "{odd:?}");
        }
        assert!(failed(reply("", Some(StatusCode::TIMEOUT))).is_transient());
    }

    #[test]
    fn reply_subjects_name_their_call_and_message() {
        let prefix = "_INBOX.abc.";
        assert_eq!(route("_INBOX.abc.tok.7", prefix), Some(("tok", 7)));
        assert_eq!(route("_INBOX.abc.tok.0", prefix), Some(("tok", 0)));
        for stray in [
            "_INBOX.other.tok.7",
            "_INBOX.abc.tok",
            "_INBOX.abc.tok.7.8",
            "_INBOX.abc.tok.x",
            "_INBOX.abc.tok.-1",
            "_INBOX.abc.tok.99999999999999999999999",
            "_INBOX.abc.",
            "",
        ] {
            assert_eq!(route(stray, prefix), None, "{stray:?}");
        }
    }

    #[test]
    fn stream_subjects_cover_with_wildcards() {
        assert!(covers("orders.>", "orders.placed"));
        assert!(covers("orders.*", "orders.placed"));
        assert!(!covers("orders.*", "orders.placed.eu"));
        assert!(covers("orders.placed", "orders.placed"));
        assert!(!covers("orders.>", "audit.login"));
    }
}
