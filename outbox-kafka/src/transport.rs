//! [`KafkaTransport`]: publishes outbox messages with an idempotent
//! librdkafka producer (`enable.idempotence=true`, `acks=all`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use outbox_core::{wire, Message, PublishResult, Transport};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::config::KafkaConfig;
use crate::error::{KafkaError, BACKEND};

/// Extra time, beyond `delivery_timeout`, that the transport waits for a
/// delivery report before it gives up on it itself. librdkafka always
/// reports within `message.timeout.ms`; this only guards against a hang.
const REPORT_GRACE: Duration = Duration::from_secs(5);

/// How long to wait between attempts to queue a message while librdkafka's
/// local queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(10);

/// Publishes outbox messages to Kafka.
///
/// Each message becomes one Kafka record: key = the message key (none for a
/// keyless message, so the partitioner spreads them), value = the payload,
/// headers = `outbox-id` (the message id) plus the message's own headers
/// (and `outbox-topic` with the original topic when the configuration
/// renamed it). A batch is queued in input order without waiting, then
/// every delivery report is awaited, so the whole batch is in flight at once.
///
/// `Ok(())` for a message means a delivery report with `acks=all`. The
/// producer is idempotent: librdkafka's own retries never duplicate or
/// reorder records within a partition. Should librdkafka raise a fatal
/// error, the transport replaces the producer and reports the affected
/// messages as transient failures.
pub struct KafkaTransport {
    config: KafkaConfig,
    client_config: ClientConfig,
    producer: Mutex<WatchedProducer>,
    /// Set when librdkafka reports every broker connection down; cleared
    /// when a broker answers again.
    all_down: Arc<AtomicBool>,
}

type WatchedProducer = FutureProducer<Watch>;

/// The producer's client context: notes when librdkafka reports every
/// broker connection down, so that the transport sends nothing until a
/// broker answers (messages queued meanwhile would each fail after
/// `delivery_timeout` and use up an attempt).
struct Watch {
    all_down: Arc<AtomicBool>,
}

impl ClientContext for Watch {
    fn error(&self, error: RdKafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.all_down.store(true, Ordering::Release);
        }
        tracing::warn!(backend = BACKEND, %error, reason, "librdkafka error");
    }
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KafkaTransport {
    /// Creates the producer and waits (up to `connect_timeout`) until a
    /// broker answers a metadata request, so that an unreachable cluster,
    /// a port that is not Kafka or refused credentials show at start, like
    /// every adapter's `connect`. It fails permanently (kind
    /// [`Config`](outbox_core::ErrorKind::Config)) when the configuration or
    /// a passed-through property is invalid, permanently (kind
    /// [`Unauthorized`](outbox_core::ErrorKind::Unauthorized)) when the
    /// credentials are refused, and transiently (kind
    /// [`Connection`](outbox_core::ErrorKind::Connection)) when no broker
    /// answers in time.
    pub async fn connect(config: KafkaConfig) -> outbox_core::Result<Self> {
        let transport = Self::new(config)?;
        let producer = transport.producer();
        let within = transport.config.connect_timeout;
        // librdkafka's metadata call blocks its thread.
        let answered = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Timeout::After(within))
                .map(|_| ())
        })
        .await;
        let failed = match answered {
            Ok(Ok(())) => return Ok(transport),
            Ok(Err(e)) => KafkaError::Connect {
                code: e.rdkafka_error_code(),
                within,
                detail: e.to_string(),
            },
            Err(e) => KafkaError::Connect {
                code: None,
                within,
                detail: e.to_string(),
            },
        };
        Err(failed.into())
    }

    /// Creates the producer without waiting for a broker: librdkafka
    /// connects in the background, so this does not fail when the brokers
    /// are down (publishes then fail transiently until they are up). For
    /// callers outside an async context.
    pub fn new(config: KafkaConfig) -> outbox_core::Result<Self> {
        config.validate()?;
        let client_config = client_config(&config);
        let all_down = Arc::new(AtomicBool::new(false));
        let producer = create_producer(&client_config, &all_down)?;
        Ok(KafkaTransport {
            config,
            client_config,
            producer: Mutex::new(producer),
            all_down,
        })
    }

    /// The configuration the transport runs with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    fn producer(&self) -> WatchedProducer {
        self.producer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the producer after a fatal error (unless another call has
    /// replaced it already).
    fn replace_producer(&self, broken: &WatchedProducer) {
        let mut current = self.producer.lock().unwrap_or_else(PoisonError::into_inner);
        if !std::ptr::eq(current.client().native_ptr(), broken.client().native_ptr()) {
            return;
        }
        match create_producer(&self.client_config, &self.all_down) {
            Ok(fresh) => {
                tracing::warn!(
                    backend = BACKEND,
                    "the producer hit a fatal error and was replaced"
                );
                *current = fresh;
            }
            Err(e) => {
                tracing::error!(backend = BACKEND, error = %e, "could not replace the failed producer");
            }
        }
    }

    /// While every broker connection is down, asks for metadata (up to
    /// `connect_timeout`): a broker that answers clears the mark, otherwise
    /// the call sends nothing (the error's detail).
    async fn reachable(&self, producer: &WatchedProducer) -> Result<(), String> {
        if !self.all_down.load(Ordering::Acquire) {
            return Ok(());
        }
        let within = self.config.connect_timeout;
        let probe = producer.clone();
        // librdkafka's metadata call blocks its thread.
        let answered = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, Timeout::After(within))
                .map(|_| ())
        })
        .await;
        match answered {
            Ok(Ok(())) => {
                self.all_down.store(false, Ordering::Release);
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Queues one record, waiting while librdkafka's local queue is full
    /// (at most `delivery_timeout`).
    async fn enqueue(
        &self,
        producer: &WatchedProducer,
        topic: &str,
        message: &Message,
        rename: bool,
    ) -> Result<DeliveryFuture, KafkaError> {
        let auto_create = self.config.auto_create_topics;
        let id = message.id.to_string();
        let mut record = FutureRecord::to(topic)
            .payload(message.payload.as_ref())
            .headers(headers(&id, message, rename));
        if let Some(key) = &message.key {
            record = record.key(key.as_bytes());
        }
        let deadline = tokio::time::Instant::now() + self.config.delivery_timeout;
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if tokio::time::Instant::now() < deadline =>
                {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((e, _)) => {
                    let code = e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                    return Err(KafkaError::Enqueue { code, auto_create });
                }
            }
        }
    }
}

fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", config.linger.as_millis().to_string())
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().to_string(),
        )
        .set(
            "allow.auto.create.topics",
            if config.auto_create_topics {
                "true"
            } else {
                "false"
            },
        );
    if let Some(id) = &config.client_id {
        c.set("client.id", id);
    }
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

fn create_producer(
    config: &ClientConfig,
    all_down: &Arc<AtomicBool>,
) -> outbox_core::Result<WatchedProducer> {
    let watch = Watch {
        all_down: all_down.clone(),
    };
    WatchedProducer::from_config_and_context(config, watch)
        .map_err(|e| KafkaError::Client(e).into())
}

fn headers(id: &str, message: &Message, rename: bool) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(message.headers.len() + 2).insert(Header {
        key: wire::ID_HEADER,
        value: Some(id.as_bytes()),
    });
    // A router that renamed the topic already named the original.
    if rename && !message.headers.contains_key(wire::TOPIC_HEADER) {
        h = h.insert(Header {
            key: wire::TOPIC_HEADER,
            value: Some(message.topic.as_bytes()),
        });
    }
    for (name, value) in &message.headers {
        h = h.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    h
}

enum Pending {
    Failed(outbox_core::Error),
    Queued(DeliveryFuture),
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &str {
        BACKEND
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        if messages.is_empty() {
            return Vec::new();
        }
        let producer = self.producer();
        let auto_create = self.config.auto_create_topics;
        if let Err(detail) = self.reachable(&producer).await {
            return messages
                .iter()
                .map(|_| Err(KafkaError::Unreachable(detail.clone()).into()))
                .collect();
        }

        // Queue everything in input order, then await all reports.
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let queued = match self.config.kafka_topic(&message.topic) {
                Err(e) => Pending::Failed(e),
                Ok(topic) => {
                    let rename = topic != message.topic.as_str();
                    match self.enqueue(&producer, &topic, message, rename).await {
                        Ok(delivery) => Pending::Queued(delivery),
                        Err(e) => Pending::Failed(e.into()),
                    }
                }
            };
            pending.push(queued);
        }

        let limit = self.config.delivery_timeout + REPORT_GRACE;
        let reports = pending.into_iter().map(|p| async move {
            match p {
                Pending::Failed(e) => Err(e),
                Pending::Queued(delivery) => match tokio::time::timeout(limit, delivery).await {
                    Err(_) => Err(KafkaError::ReportTimeout(limit).into()),
                    Ok(Err(_canceled)) => Err(KafkaError::Canceled.into()),
                    Ok(Ok(Ok(_delivery))) => Ok(()),
                    Ok(Ok(Err((e, _message)))) => {
                        let code = e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                        Err(KafkaError::Delivery { code, auto_create }.into())
                    }
                },
            }
        });
        let results: Vec<PublishResult> = join_all(reports).await;

        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::warn!(backend = BACKEND, ?code, %reason, "fatal producer error");
            self.replace_producer(&producer);
        }
        results
    }

    async fn flush(&self) -> outbox_core::Result<()> {
        let producer = self.producer();
        let timeout = self.config.delivery_timeout + REPORT_GRACE;
        // Flushing blocks the calling thread while it polls: keep it off the
        // async workers.
        let outcome = tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| KafkaError::Flush(e.to_string()))?;
        outcome.map_err(|e| KafkaError::Flush(e.to_string()).into())
    }
}
