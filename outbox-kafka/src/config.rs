//! [`KafkaConfig`]: where the producer connects, how long it lingers and
//! waits, how outbox topics map to Kafka topics, and librdkafka properties
//! passed through as they are.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::KafkaError;

/// Prefix of every environment variable [`KafkaConfig::from_env`] reads.
pub const ENV_PREFIX: &str = "OUTBOX_KAFKA_";

/// Prefix of the environment variables that pass a librdkafka property
/// through: `OUTBOX_KAFKA_PROPERTY_SASL_PASSWORD=x` sets `sasl.password=x`
/// (the rest of the name is lower-cased, `_` becomes `.`).
pub const ENV_PROPERTY_PREFIX: &str = "OUTBOX_KAFKA_PROPERTY_";

/// The longest Kafka topic name.
pub const MAX_TOPIC_NAME_LEN: usize = 249;

/// librdkafka's upper bound for `linger.ms`.
const MAX_LINGER: Duration = Duration::from_millis(900_000);

/// Properties the transport sets itself and that the outbox's guarantees
/// rest on: a pass-through value must keep them.
const ENFORCED: &[(&str, &[&str])] = &[
    ("enable.idempotence", &["true"]),
    ("acks", &["all", "-1"]),
    ("request.required.acks", &["all", "-1"]),
];

/// Configuration of a [`KafkaTransport`](crate::KafkaTransport).
///
/// Build it with [`KafkaConfig::builder`] (validates) or read it with
/// [`KafkaConfig::from_env`]. A deserialised value is checked when the
/// transport is created.
///
/// | field | env var | default | meaning |
/// | --- | --- | --- | --- |
/// | `brokers` | `OUTBOX_KAFKA_BROKERS` | `localhost:9092` | `bootstrap.servers`, comma-separated `host:port` |
/// | `client_id` | `OUTBOX_KAFKA_CLIENT_ID` | none (librdkafka's) | `client.id` |
/// | `linger` | `OUTBOX_KAFKA_LINGER_MS` | 1 ms | `linger.ms`: how long the producer gathers a batch (the relay hands over whole batches already; the benchmark measured 54k msg/s at 5 ms, 68k at 0) |
/// | `delivery_timeout` | `OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS` | 10 s | `message.timeout.ms`: a message not acknowledged by then fails (transient); keep it (plus 5 s) under half the relay's lease, or a slow broker outlasts a claim |
/// | `connect_timeout` | `OUTBOX_KAFKA_CONNECT_TIMEOUT_MS` | 5 s | how long [`connect`](crate::KafkaTransport::connect) waits for a broker's metadata |
/// | `prefix` | `OUTBOX_KAFKA_PREFIX` | empty | prepended to the outbox topic to name the Kafka topic |
/// | `topic_map` | `OUTBOX_KAFKA_TOPIC_MAP` | empty | `outbox.topic=kafka-topic,...`: exact renames, before `prefix` |
/// | `auto_create_topics` | `OUTBOX_KAFKA_AUTO_CREATE_TOPICS` | `false` | `allow.auto.create.topics`; when on, an unknown topic is a transient error |
/// | `properties` | `OUTBOX_KAFKA_PROPERTY_<NAME>` | empty | any librdkafka property, set last |
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    /// `client.id`, if set.
    pub client_id: Option<String>,
    /// `linger.ms`: how long the producer waits to fill a batch.
    #[serde(rename = "linger_ms", with = "outbox_core::settings::millis")]
    pub linger: Duration,
    /// `message.timeout.ms`: how long librdkafka keeps trying to deliver a
    /// message (retrying internally) before it reports a transient failure.
    #[serde(rename = "delivery_timeout_ms", with = "outbox_core::settings::millis")]
    pub delivery_timeout: Duration,
    /// How long [`connect`](crate::KafkaTransport::connect) waits for a
    /// broker to answer a metadata request.
    #[serde(rename = "connect_timeout_ms", with = "outbox_core::settings::millis")]
    pub connect_timeout: Duration,
    /// Prepended to the outbox topic to form the Kafka topic name.
    pub prefix: String,
    /// Exact renames: outbox topic -> Kafka topic (the prefix is not added
    /// to a mapped name).
    pub topic_map: BTreeMap<String, String>,
    /// Whether the broker may create a topic on first use. Off by default:
    /// a message to an unknown topic then fails permanently.
    pub auto_create_topics: bool,
    /// librdkafka properties passed through (`compression.type`,
    /// `security.protocol`, `sasl.password`, ...). They are set last, so they
    /// override the fields above, except that `enable.idempotence` must stay
    /// `true` and `acks` `all`.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".to_string(),
            client_id: None,
            linger: Duration::from_millis(1),
            // With the 5 s grace, within half the relay's default 30 s
            // lease: a publish must not outlast its claim.
            delivery_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            prefix: String::new(),
            topic_map: BTreeMap::new(),
            auto_create_topics: false,
            properties: BTreeMap::new(),
        }
    }
}

/// Whether a property's value is a secret that Debug output hides.
pub(crate) fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "key.pem",
        "oauthbearer.config",
    ]
    .iter()
    .any(|s| name.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("linger", &self.linger)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("prefix", &self.prefix)
            .field("topic_map", &self.topic_map)
            .field("auto_create_topics", &self.auto_create_topics)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaConfig {
    /// Starts a configuration for the given `bootstrap.servers`.
    pub fn builder(brokers: impl Into<String>) -> KafkaConfigBuilder {
        KafkaConfigBuilder {
            config: KafkaConfig {
                brokers: brokers.into(),
                ..KafkaConfig::default()
            },
        }
    }

    /// Reads the configuration from `OUTBOX_KAFKA_*` environment variables
    /// (see the table on [`KafkaConfig`]); unset variables keep their
    /// defaults. Fails with a permanent [`ErrorKind::Config`] error naming
    /// the variable that does not parse.
    ///
    /// [`ErrorKind::Config`]: outbox_core::ErrorKind::Config
    pub fn from_env() -> outbox_core::Result<Self> {
        // Variables that are not valid UTF-8 are not ours to read: skip them
        // rather than panic as `std::env::vars` would.
        Self::from_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// [`from_env`](Self::from_env) over a given list of (name, value)
    /// pairs instead of the process environment (names without the
    /// `OUTBOX_KAFKA_` prefix are ignored, unknown ones under it are refused).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> outbox_core::Result<Self> {
        let mut config = KafkaConfig::default();
        for (name, value) in vars {
            let Some(field) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parse_ms = |value: &str| {
                value
                    .trim()
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|e| KafkaError::Config(format!("{name}={value:?}: {e}")))
            };
            if let Some(property) = name.strip_prefix(ENV_PROPERTY_PREFIX) {
                if property.is_empty() {
                    return Err(KafkaError::Config(format!("{name}: no property name")).into());
                }
                let property = property.to_ascii_lowercase().replace('_', ".");
                config.properties.insert(property, value);
                continue;
            }
            match field {
                "BROKERS" => config.brokers = value,
                "CLIENT_ID" => config.client_id = Some(value).filter(|v| !v.is_empty()),
                "LINGER_MS" => config.linger = parse_ms(&value)?,
                "DELIVERY_TIMEOUT_MS" => config.delivery_timeout = parse_ms(&value)?,
                "CONNECT_TIMEOUT_MS" => config.connect_timeout = parse_ms(&value)?,
                "PREFIX" => config.prefix = value,
                "TOPIC_MAP" => config.topic_map = parse_map(&name, &value)?,
                "AUTO_CREATE_TOPICS" => config.auto_create_topics = parse_bool(&name, &value)?,
                _ => {
                    return Err(KafkaError::Config(format!(
                        "unknown variable {name} (known: BROKERS, CLIENT_ID, LINGER_MS, \
                         DELIVERY_TIMEOUT_MS, CONNECT_TIMEOUT_MS, PREFIX, TOPIC_MAP, AUTO_CREATE_TOPICS, PROPERTY_<NAME>)"
                    ))
                    .into())
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; [`KafkaConfigBuilder::build`], [`from_env`](Self::from_env)
    /// and the transport call it.
    pub fn validate(&self) -> outbox_core::Result<()> {
        let bad = |m: String| -> outbox_core::Result<()> { Err(KafkaError::Config(m).into()) };
        if self.brokers.trim().is_empty() {
            return bad("brokers is empty".into());
        }
        if self.brokers.chars().any(char::is_control) {
            return bad("brokers contains a control character".into());
        }
        if self.linger > MAX_LINGER {
            return bad(format!(
                "linger is {:?}, more than librdkafka's limit of {MAX_LINGER:?}",
                self.linger
            ));
        }
        if self.delivery_timeout.is_zero() {
            return bad("delivery_timeout is zero".into());
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout is zero".into());
        }
        if self.delivery_timeout < self.linger {
            return bad(format!(
                "delivery_timeout ({:?}) is shorter than linger ({:?})",
                self.delivery_timeout, self.linger
            ));
        }
        if i32::try_from(self.delivery_timeout.as_millis()).is_err() {
            return bad(format!(
                "delivery_timeout {:?} is too long",
                self.delivery_timeout
            ));
        }
        if let Some(c) = self.prefix.chars().find(|c| !is_topic_char(*c)) {
            return bad(format!(
                "prefix {:?} contains {c:?}; Kafka topic names allow only [a-zA-Z0-9._-]",
                self.prefix
            ));
        }
        for (from, to) in &self.topic_map {
            if from.is_empty() {
                return bad("topic_map has an empty outbox topic".into());
            }
            if let Err(e) = validate_topic_name(to) {
                return bad(format!("topic_map entry {from:?}: {e}"));
            }
        }
        for (name, value) in &self.properties {
            if name.trim().is_empty() {
                return bad("a property has an empty name".into());
            }
            if let Some((_, allowed)) = ENFORCED.iter().find(|(n, _)| n == name) {
                if !allowed.contains(&value.trim().to_ascii_lowercase().as_str()) {
                    return bad(format!(
                        "property {name} must be {} for the outbox's guarantees (got {value:?})",
                        allowed.join(" or ")
                    ));
                }
            }
            if name == "transactional.id" {
                return bad("property transactional.id is not supported: the transport uses an idempotent, non-transactional producer".into());
            }
        }
        Ok(())
    }

    /// The Kafka topic for an outbox topic: its `topic_map` entry, else
    /// `prefix` + topic. Fails (permanently) when the result is not a valid
    /// Kafka topic name.
    pub fn kafka_topic<'a>(
        &'a self,
        topic: &'a str,
    ) -> outbox_core::Result<std::borrow::Cow<'a, str>> {
        use std::borrow::Cow;
        let name: Cow<'a, str> = match self.topic_map.get(topic) {
            Some(mapped) => Cow::Borrowed(mapped.as_str()),
            None if self.prefix.is_empty() => Cow::Borrowed(topic),
            None => Cow::Owned(format!("{}{topic}", self.prefix)),
        };
        validate_topic_name(&name).map_err(|reason| KafkaError::InvalidTopic {
            topic: name.escape_debug().to_string(),
            reason,
        })?;
        Ok(name)
    }
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-'
}

/// Checks a Kafka topic name: 1 to 249 characters of `[a-zA-Z0-9._-]`, not
/// `.` or `..`.
pub(crate) fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty topic name".into());
    }
    if name.len() > MAX_TOPIC_NAME_LEN {
        return Err(format!(
            "{} characters, more than Kafka's limit of {MAX_TOPIC_NAME_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are not topic names".into());
    }
    if let Some(c) = name.chars().find(|c| !is_topic_char(*c)) {
        return Err(format!(
            "contains {c:?}; Kafka topic names allow only [a-zA-Z0-9._-] (map the topic with topic_map or a route)"
        ));
    }
    Ok(())
}

fn parse_bool(name: &str, value: &str) -> outbox_core::Result<bool> {
    if value.trim().is_empty() {
        return Ok(false);
    }
    outbox_core::settings::parse_bool(value)
        .ok_or_else(|| KafkaError::Config(format!("{name}={value:?} is not a boolean")).into())
}

/// Parses `a=b,c=d` (spaces around items are ignored).
fn parse_map(name: &str, value: &str) -> outbox_core::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((from, to)) = item.split_once('=') else {
            return Err(KafkaError::Config(format!(
                "{name}: {item:?} is not of the form outbox.topic=kafka-topic"
            ))
            .into());
        };
        map.insert(from.trim().to_string(), to.trim().to_string());
    }
    Ok(map)
}

/// Builds a checked [`KafkaConfig`].
#[derive(Debug, Clone)]
#[must_use]
pub struct KafkaConfigBuilder {
    config: KafkaConfig,
}

impl KafkaConfigBuilder {
    /// Sets `client.id`.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.config.client_id = Some(id.into());
        self
    }

    /// Sets `linger.ms` (default 1 ms).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.config.linger = linger;
        self
    }

    /// Sets `message.timeout.ms` (default 10 s).
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.config.delivery_timeout = timeout;
        self
    }

    /// How long `connect` waits for a broker's metadata (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Prepends `prefix` to every outbox topic that has no `topic_map` entry.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// Publishes messages of the outbox topic `from` to the Kafka topic `to`.
    pub fn map_topic(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.config.topic_map.insert(from.into(), to.into());
        self
    }

    /// Lets the broker create topics on first use (default off).
    pub fn auto_create_topics(mut self, on: bool) -> Self {
        self.config.auto_create_topics = on;
        self
    }

    /// Passes a librdkafka property through.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.properties.insert(name.into(), value.into());
        self
    }

    /// Checks the configuration and returns it.
    pub fn build(self) -> outbox_core::Result<KafkaConfig> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn builder_checks_fields() {
        let c = KafkaConfig::builder("b1:9092,b2:9092")
            .linger(Duration::from_millis(10))
            .prefix("prod.")
            .map_topic("orders.placed", "orders-v1")
            .property("compression.type", "lz4")
            .build()
            .unwrap();
        assert_eq!(c.linger, Duration::from_millis(10));
        assert_eq!(c.kafka_topic("orders.placed").unwrap(), "orders-v1");
        assert_eq!(c.kafka_topic("audit.login").unwrap(), "prod.audit.login");

        for bad in [
            KafkaConfig::builder(" ").build(),
            KafkaConfig::builder("b:1").prefix("bad prefix").build(),
            KafkaConfig::builder("b:1")
                .map_topic("a", "no/slash")
                .build(),
            KafkaConfig::builder("b:1")
                .property("enable.idempotence", "false")
                .build(),
            KafkaConfig::builder("b:1").property("acks", "1").build(),
            KafkaConfig::builder("b:1")
                .delivery_timeout(Duration::ZERO)
                .build(),
            KafkaConfig::builder("b:1")
                .linger(Duration::from_secs(1000))
                .build(),
        ] {
            let e = bad.unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::Config, "{e}");
            assert!(!e.is_transient());
            assert_eq!(e.backend(), Some("kafka"));
        }
        assert!(KafkaConfig::builder("b:1")
            .property("acks", "all")
            .property("enable.idempotence", "true")
            .build()
            .is_ok());
    }

    #[test]
    fn invalid_topic_names_are_permanent_invalid_input() {
        let c = KafkaConfig::default();
        for topic in ["orders:placed", "ünïcode", "a/b", ".", ".."] {
            let e = c.kafka_topic(topic).unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::InvalidInput, "{topic}");
            assert!(!e.is_transient());
        }
        let long = "a".repeat(MAX_TOPIC_NAME_LEN + 1);
        assert!(c.kafka_topic(&long).is_err());
        assert!(c.kafka_topic("orders.placed_v1-eu").is_ok());
    }

    #[test]
    fn from_vars_reads_every_variable() {
        let c = KafkaConfig::from_vars(vars(&[
            ("OUTBOX_KAFKA_BROKERS", "k1:9092"),
            ("OUTBOX_KAFKA_CLIENT_ID", "relay-1"),
            ("OUTBOX_KAFKA_LINGER_MS", "20"),
            ("OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS", "60000"),
            ("OUTBOX_KAFKA_PREFIX", "prod."),
            ("OUTBOX_KAFKA_TOPIC_MAP", "a.b=ab, c=cc"),
            ("OUTBOX_KAFKA_AUTO_CREATE_TOPICS", "true"),
            ("OUTBOX_KAFKA_PROPERTY_SASL_PASSWORD", "s3cret"),
            ("OUTBOX_KAFKA_PROPERTY_COMPRESSION_TYPE", "zstd"),
            ("PATH", "/usr/bin"),
        ]))
        .unwrap();
        assert_eq!(c.brokers, "k1:9092");
        assert_eq!(c.client_id.as_deref(), Some("relay-1"));
        assert_eq!(c.linger, Duration::from_millis(20));
        assert_eq!(c.delivery_timeout, Duration::from_secs(60));
        assert_eq!(c.prefix, "prod.");
        assert_eq!(c.topic_map.get("a.b").map(String::as_str), Some("ab"));
        assert_eq!(c.topic_map.get("c").map(String::as_str), Some("cc"));
        assert!(c.auto_create_topics);
        assert_eq!(c.properties["sasl.password"], "s3cret");
        assert_eq!(c.properties["compression.type"], "zstd");

        let defaults = KafkaConfig::from_vars(Vec::new()).unwrap();
        assert_eq!(defaults, KafkaConfig::default());

        for bad in [
            ("OUTBOX_KAFKA_LINGER_MS", "soon"),
            ("OUTBOX_KAFKA_AUTO_CREATE_TOPICS", "maybe"),
            ("OUTBOX_KAFKA_TOPIC_MAP", "nomapping"),
            ("OUTBOX_KAFKA_BROKER", "typo"),
            ("OUTBOX_KAFKA_PROPERTY_", "x"),
        ] {
            let e = KafkaConfig::from_vars(vars(&[bad])).unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::Config);
            assert!(e.to_string().contains(bad.0), "{e}");
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        let c = KafkaConfig::builder("b:1")
            .property("sasl.password", "hunter2")
            .property("ssl.key.password", "hunter3")
            .property("sasl.oauthbearer.client.secret", "hunter4")
            .property("sasl.username", "alice")
            .build()
            .unwrap();
        let text = format!("{c:?}");
        for secret in ["hunter2", "hunter3", "hunter4"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(text.contains("alice"));
        assert!(text.contains("***"));
    }

    #[test]
    fn serde_round_trip() {
        let c = KafkaConfig::builder("b:1")
            .linger(Duration::from_millis(7))
            .map_topic("x", "y")
            .build()
            .unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["linger_ms"], 7);
        let back: KafkaConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
        let partial: KafkaConfig = serde_json::from_str(r#"{"brokers":"x:1"}"#).unwrap();
        assert_eq!(partial.linger, Duration::from_millis(1));
    }
}
