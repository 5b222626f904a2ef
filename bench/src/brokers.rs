//! The brokers: names unique to the run, our transports, a raw-client
//! pipelined publisher per broker (the broker's own limit), purging between
//! phases and cleanup at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::header::{HeaderMap, NATS_MESSAGE_ID};
use async_nats::jetstream;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation};
use outbox_core::wire::ID_HEADER;
use outbox_core::{Message, PublishResult, Transport};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};

use crate::BoxResult;

/// Pipelining window of the raw-client limit runs (publishes awaiting their
/// acknowledgement at once).
pub const RAW_WINDOW: usize = 1000;
/// Messages per call of the transport limit runs.
pub const LIMIT_BATCH: usize = 5000;

/// A broker the relay publishes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Broker {
    /// NATS JetStream (PubAck per message).
    #[serde(rename = "jetstream")]
    JetStream,
    /// Core NATS (no acknowledgement; one server round trip per batch).
    #[serde(rename = "nats-core")]
    CoreNats,
    /// RabbitMQ with publisher confirms, durable queue, persistent messages.
    #[serde(rename = "rabbitmq")]
    RabbitMq,
    /// librdkafka's in-process mock cluster, idempotent producer, acks=all.
    #[serde(rename = "kafka-mock")]
    Kafka,
    /// Redis Streams (XADD).
    #[serde(rename = "redis-streams")]
    Redis,
}

impl Broker {
    /// Every broker, in report order.
    pub const ALL: [Broker; 5] = [
        Broker::JetStream,
        Broker::CoreNats,
        Broker::RabbitMq,
        Broker::Kafka,
        Broker::Redis,
    ];

    /// The id used on the command line and in the JSON.
    pub fn id(self) -> &'static str {
        match self {
            Broker::JetStream => "jetstream",
            Broker::CoreNats => "nats-core",
            Broker::RabbitMq => "rabbitmq",
            Broker::Kafka => "kafka-mock",
            Broker::Redis => "redis-streams",
        }
    }

    /// A short label for tables and the chart.
    pub fn label(self) -> &'static str {
        match self {
            Broker::JetStream => "JetStream",
            Broker::CoreNats => "core NATS",
            Broker::RabbitMq => "RabbitMQ",
            Broker::Kafka => "Kafka (mock)",
            Broker::Redis => "Redis Streams",
        }
    }

    /// A short SQL-safe tag.
    pub fn tag(self) -> &'static str {
        match self {
            Broker::JetStream => "js",
            Broker::CoreNats => "core",
            Broker::RabbitMq => "amqp",
            Broker::Kafka => "kafka",
            Broker::Redis => "redis",
        }
    }

    /// The CPU group (see `sys`) of the broker's server process.
    pub fn cpu_group(self) -> &'static str {
        match self {
            Broker::JetStream | Broker::CoreNats => "nats",
            Broker::RabbitMq => "rabbitmq",
            Broker::Kafka => "bench",
            Broker::Redis => "redis",
        }
    }
}

/// The run's broker-side resources.
pub struct Brokers {
    /// Unique suffix of every name.
    pub u: String,
    nats_url: String,
    amqp_url: String,
    redis_url: String,
    nats: Option<async_nats::Client>,
    amqp: Option<lapin::Connection>,
    redis: Option<redis::aio::MultiplexedConnection>,
    kafka: Option<MockCluster<'static, DefaultProducerContext>>,
    kafka_bootstrap: String,
    /// Brokers that could not be set up, with why.
    pub unavailable: Vec<(Broker, String)>,
}

impl Brokers {
    /// Connects to the brokers in `wanted` and creates the run's stream,
    /// exchange, queue and topic. A broker that fails is listed in
    /// `unavailable` and skipped.
    pub async fn setup(
        wanted: &[Broker],
        u: &str,
        nats_url: &str,
        amqp_url: &str,
        redis_url: &str,
    ) -> Brokers {
        let mut b = Brokers {
            u: u.to_string(),
            nats_url: nats_url.to_string(),
            amqp_url: amqp_url.to_string(),
            redis_url: redis_url.to_string(),
            nats: None,
            amqp: None,
            redis: None,
            kafka: None,
            kafka_bootstrap: String::new(),
            unavailable: Vec::new(),
        };
        // NATS is needed for the latency phase too (core NATS).
        match async_nats::connect(nats_url).await {
            Ok(c) => {
                if wanted.contains(&Broker::JetStream) {
                    let js = jetstream::new(c.clone());
                    let config = jetstream::stream::Config {
                        name: b.stream(),
                        subjects: vec![format!("benchjs.{u}.>")],
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    };
                    if let Err(e) = js.get_or_create_stream(config).await {
                        b.unavailable
                            .push((Broker::JetStream, format!("create stream: {e}")));
                    }
                }
                b.nats = Some(c);
            }
            Err(e) => {
                for k in [Broker::JetStream, Broker::CoreNats] {
                    if wanted.contains(&k) {
                        b.unavailable.push((k, format!("connect: {e}")));
                    }
                }
            }
        }
        if wanted.contains(&Broker::RabbitMq) {
            match b.amqp_setup().await {
                Ok(c) => b.amqp = Some(c),
                Err(e) => b.unavailable.push((Broker::RabbitMq, e.to_string())),
            }
        }
        if wanted.contains(&Broker::Kafka) {
            match MockCluster::new(3) {
                Ok(c) => {
                    if let Err(e) = c.create_topic(&b.topic(Broker::Kafka), 4, 3) {
                        b.unavailable
                            .push((Broker::Kafka, format!("create topic: {e}")));
                    }
                    b.kafka_bootstrap = c.bootstrap_servers();
                    b.kafka = Some(c);
                }
                Err(e) => b
                    .unavailable
                    .push((Broker::Kafka, format!("mock cluster: {e}"))),
            }
        }
        if wanted.contains(&Broker::Redis) {
            let conn = async {
                let client = redis::Client::open(redis_url)?;
                client.get_multiplexed_async_connection().await
            };
            match conn.await {
                Ok(c) => b.redis = Some(c),
                Err(e) => b.unavailable.push((Broker::Redis, format!("connect: {e}"))),
            }
        }
        b
    }

    async fn amqp_setup(&self) -> BoxResult<lapin::Connection> {
        let conn =
            lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
                .await?;
        let ch = conn.create_channel().await?;
        ch.exchange_declare(
            self.exchange().as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            self.queue().as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            self.queue().as_str().into(),
            self.exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(conn)
    }

    /// Whether `b` was set up.
    pub fn available(&self, b: Broker) -> bool {
        !self.unavailable.iter().any(|(k, _)| *k == b)
    }

    /// Why `b` is unavailable.
    pub fn why(&self, b: Broker) -> Option<&str> {
        self.unavailable
            .iter()
            .find(|(k, _)| *k == b)
            .map(|(_, e)| e.as_str())
    }

    fn stream(&self) -> String {
        format!("BENCH_{}", self.u)
    }
    fn exchange(&self) -> String {
        format!("bench-{}", self.u)
    }
    fn queue(&self) -> String {
        format!("bench-{}", self.u)
    }

    /// The topic messages for `b` carry.
    pub fn topic(&self, b: Broker) -> String {
        let u = &self.u;
        match b {
            Broker::JetStream => format!("benchjs.{u}.events"),
            Broker::CoreNats => format!("benchcore.{u}.events"),
            Broker::RabbitMq | Broker::Kafka | Broker::Redis => format!("bench.{u}.events"),
        }
    }

    /// A new transport of ours for `b` (library defaults).
    pub async fn transport(&self, b: Broker) -> BoxResult<Arc<dyn Transport>> {
        self.transport_with(b, false).await
    }

    /// What [`tuned`](Self::transport_with) changes for `b`, if anything.
    pub fn tuning(b: Broker) -> Option<&'static str> {
        match b {
            Broker::JetStream => Some("max_in_flight 4096 (default 1024)"),
            Broker::RabbitMq => Some("max_in_flight 4096 (default 1024)"),
            Broker::Kafka => Some("linger 0 ms (default 1 ms)"),
            Broker::CoreNats | Broker::Redis => None,
        }
    }

    /// A transport for `b`, with the library defaults or, when `tuned`,
    /// with the settings of [`tuning`](Self::tuning).
    pub async fn transport_with(&self, b: Broker, tuned: bool) -> BoxResult<Arc<dyn Transport>> {
        // Library defaults unless tuned.
        const TUNED_WINDOW: usize = 4096;
        Ok(match b {
            Broker::JetStream | Broker::CoreNats => {
                let builder =
                    outbox_nats::NatsConfig::builder(&self.nats_url).client_name("outbox-bench");
                let builder = if tuned {
                    builder.max_in_flight(TUNED_WINDOW)
                } else {
                    builder
                };
                let builder = if b == Broker::CoreNats {
                    builder.core()
                } else {
                    builder
                };
                Arc::new(outbox_nats::NatsTransport::connect(builder.build()?).await?)
            }
            Broker::RabbitMq => {
                let builder = outbox_amqp::AmqpConfig::builder(&self.amqp_url)
                    .exchange(self.exchange())
                    .connection_name("outbox-bench");
                let builder = if tuned {
                    builder.max_in_flight(TUNED_WINDOW)
                } else {
                    builder
                };
                Arc::new(outbox_amqp::AmqpTransport::connect(builder.build()?).await?)
            }
            Broker::Kafka => Arc::new(
                outbox_kafka::KafkaTransport::connect(if tuned {
                    outbox_kafka::KafkaConfig::builder(&self.kafka_bootstrap)
                        .linger(Duration::ZERO)
                        .build()?
                } else {
                    outbox_kafka::KafkaConfig::builder(&self.kafka_bootstrap).build()?
                })
                .await?,
            ),
            Broker::Redis => Arc::new(
                outbox_redis::RedisTransport::connect(
                    outbox_redis::RedisConfig::builder(&self.redis_url).build()?,
                )
                .await?,
            ),
        })
    }

    /// A core NATS transport (for the latency phase).
    pub async fn core_nats(&self) -> BoxResult<Arc<dyn Transport>> {
        self.transport(Broker::CoreNats).await
    }

    /// A plain NATS client.
    pub fn nats_client(&self) -> Option<async_nats::Client> {
        self.nats.clone()
    }

    /// The Redis URL.
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// Removes what earlier phases stored for `b`, so that phases do not
    /// pay for each other's leftovers.
    pub async fn purge(&self, b: Broker) -> BoxResult<()> {
        match b {
            Broker::JetStream => {
                if let Some(c) = &self.nats {
                    let js = jetstream::new(c.clone());
                    js.get_stream(self.stream()).await?.purge().await?;
                }
            }
            Broker::RabbitMq => {
                if let Some(c) = &self.amqp {
                    let ch = c.create_channel().await?;
                    ch.queue_purge(self.queue().as_str().into(), QueuePurgeOptions::default())
                        .await?;
                    let _ = ch.close(200, "OK".into()).await;
                }
            }
            Broker::Redis => self.redis_del(&[self.topic(Broker::Redis)]).await?,
            Broker::CoreNats | Broker::Kafka => {}
        }
        Ok(())
    }

    /// Deletes keys on Redis.
    pub async fn redis_del(&self, keys: &[String]) -> BoxResult<()> {
        if let Some(c) = &self.redis {
            let mut c = c.clone();
            let _: i64 = redis::cmd("DEL").arg(keys).query_async(&mut c).await?;
        }
        Ok(())
    }

    /// Deletes the run's stream, queue, exchange and keys. Uses fresh
    /// connections: the set-up ones may have broken meanwhile (other test
    /// suites restart servers).
    pub async fn cleanup(&mut self) {
        if let Ok(c) = async_nats::connect(&self.nats_url).await {
            let js = jetstream::new(c);
            let _ = js.delete_stream(self.stream()).await;
        }
        if self.amqp.is_some() {
            if let Ok(c) =
                lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
                    .await
            {
                if let Ok(ch) = c.create_channel().await {
                    let _ = ch
                        .queue_delete(self.queue().as_str().into(), QueueDeleteOptions::default())
                        .await;
                    let _ = ch
                        .exchange_delete(
                            self.exchange().as_str().into(),
                            ExchangeDeleteOptions::default(),
                        )
                        .await;
                }
                let _ = c.close(200, "OK".into()).await;
            }
        }
        if let Some(old) = &self.amqp {
            let _ = old.close(200, "OK".into()).await;
        }
        if let Ok(client) = redis::Client::open(self.redis_url.as_str()) {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                let _: redis::RedisResult<i64> = redis::cmd("DEL")
                    .arg(self.topic(Broker::Redis))
                    .query_async(&mut c)
                    .await;
            }
        }
        self.kafka = None;
    }

    /// Our transport's rate with no database: `publish_batch` over the
    /// messages in calls of [`LIMIT_BATCH`]. Returns msg/s and failures.
    pub async fn transport_limit(
        &self,
        b: Broker,
        messages: &[Message],
    ) -> BoxResult<(f64, usize)> {
        let t = self.transport(b).await?;
        // Warm up (connections, channel pool, producer metadata).
        let _ = t.publish_batch(&messages[..messages.len().min(100)]).await;
        let started = Instant::now();
        let mut failed = 0;
        for chunk in messages.chunks(LIMIT_BATCH) {
            failed += t
                .publish_batch(chunk)
                .await
                .iter()
                .filter(|r| r.is_err())
                .count();
        }
        let secs = started.elapsed().as_secs_f64();
        let _ = t.flush().await;
        Ok((messages.len() as f64 / secs, failed))
    }

    /// The broker's own pipelined rate through its client library, with no
    /// outbox code: [`RAW_WINDOW`] acknowledgements outstanding (JetStream,
    /// RabbitMQ), everything queued then every report awaited (Kafka),
    /// pipelines of 1,000 XADDs (Redis), publishes then one round trip (core
    /// NATS). Each message carries its id like ours do. The client is set up
    /// and warmed up (100 messages) before the clock starts.
    pub async fn raw_limit(&self, b: Broker, n: usize, payload: &Bytes) -> BoxResult<f64> {
        let subject = self.topic(b);
        let ids = |k: usize| -> Vec<String> {
            (0..k)
                .map(|_| outbox_core::MessageId::new().to_string())
                .collect()
        };
        let (warm, ids) = (ids(100), ids(n));
        let started;
        match b {
            Broker::JetStream => {
                let c = self.nats.clone().ok_or("no NATS connection")?;
                let js = jetstream::ContextBuilder::new()
                    .max_ack_inflight(RAW_WINDOW)
                    .build(c);
                raw_jetstream(&js, &subject, &warm, payload).await?;
                started = Instant::now();
                raw_jetstream(&js, &subject, &ids, payload).await?;
            }
            Broker::CoreNats => {
                let c = self.nats.clone().ok_or("no NATS connection")?;
                raw_core(&c, &subject, &warm, payload).await?;
                started = Instant::now();
                raw_core(&c, &subject, &ids, payload).await?;
            }
            Broker::RabbitMq => {
                let conn = lapin::Connection::connect(
                    &self.amqp_url,
                    lapin::ConnectionProperties::default(),
                )
                .await?;
                let ch = conn.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                let exchange = self.exchange();
                raw_amqp(&ch, &exchange, &subject, &warm, payload).await?;
                started = Instant::now();
                raw_amqp(&ch, &exchange, &subject, &ids, payload).await?;
                let _ = conn.close(200, "OK".into()).await;
            }
            Broker::Kafka => {
                let producer: FutureProducer = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", &self.kafka_bootstrap)
                    .set("enable.idempotence", "true")
                    .set("acks", "all")
                    .set("linger.ms", "5")
                    .create()?;
                raw_kafka(&producer, &subject, &warm, payload).await?;
                started = Instant::now();
                raw_kafka(&producer, &subject, &ids, payload).await?;
            }
            Broker::Redis => {
                let mut c = self.redis.clone().ok_or("no Redis connection")?;
                raw_redis(&mut c, &subject, &warm, payload).await?;
                started = Instant::now();
                raw_redis(&mut c, &subject, &ids, payload).await?;
            }
        }
        Ok(n as f64 / started.elapsed().as_secs_f64())
    }
}

async fn raw_jetstream(
    js: &jetstream::Context,
    subject: &str,
    ids: &[String],
    payload: &Bytes,
) -> BoxResult<()> {
    let mut inflight = FuturesUnordered::new();
    for id in ids {
        if inflight.len() >= RAW_WINDOW {
            if let Some(r) = inflight.next().await {
                r?;
            }
        }
        let mut h = HeaderMap::new();
        h.insert(NATS_MESSAGE_ID, id.as_str());
        h.insert(ID_HEADER, id.as_str());
        let ack = js
            .send_publish(
                subject.to_string(),
                jetstream::message::PublishMessage::build()
                    .payload(payload.clone())
                    .headers(h),
            )
            .await?;
        inflight.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(r) = inflight.next().await {
        r?;
    }
    Ok(())
}

async fn raw_core(
    c: &async_nats::Client,
    subject: &str,
    ids: &[String],
    payload: &Bytes,
) -> BoxResult<()> {
    for id in ids {
        let mut h = HeaderMap::new();
        h.insert(ID_HEADER, id.as_str());
        c.publish_with_headers(subject.to_string(), h, payload.clone())
            .await?;
    }
    nats_barrier(c).await
}

async fn raw_amqp(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    ids: &[String],
    payload: &Bytes,
) -> BoxResult<()> {
    let mut inflight = FuturesUnordered::new();
    for id in ids {
        if inflight.len() >= RAW_WINDOW {
            if let Some(r) = inflight.next().await {
                check_confirm(r)?;
            }
        }
        let mut table = FieldTable::default();
        table.insert(
            ShortString::from(ID_HEADER),
            AMQPValue::LongString(LongString::from(id.as_str())),
        );
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(id.as_str()))
            .with_headers(table);
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload,
                props,
            )
            .await?;
        inflight.push(confirm);
    }
    while let Some(r) = inflight.next().await {
        check_confirm(r)?;
    }
    Ok(())
}

async fn raw_kafka(
    producer: &FutureProducer,
    topic: &str,
    ids: &[String],
    payload: &Bytes,
) -> BoxResult<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut reports = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let key = format!("key-{}", i % 1000);
        let mut record = FutureRecord::to(topic)
            .payload(payload.as_ref())
            .key(key.as_bytes())
            .headers(OwnedHeaders::new().insert(Header {
                key: ID_HEADER,
                value: Some(id.as_bytes()),
            }));
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    reports.push(f);
                    break;
                }
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for r in futures_util::future::join_all(reports).await {
        match r {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e.into()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn raw_redis(
    c: &mut redis::aio::MultiplexedConnection,
    key: &str,
    ids: &[String],
    payload: &Bytes,
) -> BoxResult<()> {
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("XADD")
                .arg(key)
                .arg("*")
                .arg("id")
                .arg(id)
                .arg("payload")
                .arg(payload.as_ref())
                .ignore();
        }
        pipe.query_async::<()>(c).await?;
    }
    Ok(())
}

fn check_confirm(r: lapin::Result<Confirmation>) -> BoxResult<()> {
    match r? {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err("RabbitMQ returned a message (unroutable)".into()),
        Confirmation::Nack(_) => Err("RabbitMQ nacked a message".into()),
    }
}

/// One round trip to the NATS server: a request nobody answers comes back
/// as "no responders" only after the server has read everything before it.
pub async fn nats_barrier(c: &async_nats::Client) -> BoxResult<()> {
    let inbox = c.new_inbox();
    match c
        .send_request(
            inbox,
            async_nats::client::Request::new().timeout(Some(Duration::from_secs(10))),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A transport that acknowledges everything at once: the relay with no
/// broker, to see the relay's own cost on top of the store.
pub struct NullTransport;

#[async_trait]
impl Transport for NullTransport {
    fn name(&self) -> &str {
        "null"
    }
    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        messages.iter().map(|_| Ok(())).collect()
    }
}
