//! Transport URLs: `nats://`, `amqp://` / `amqps://`, `kafka://`,
//! `redis://` / `rediss://`, with per-transport options as query parameters
//! mapped onto each adapter's configuration (through the adapter's own
//! `from_lookup` / `from_vars`, so every option is validated by the adapter).
//!
//! | scheme | URL | options |
//! | --- | --- | --- |
//! | `nats` | `nats://[user:pass@]host:4222[,nats://host2:4222]` | `mode` (`jetstream` / `core`), `max_in_flight`, `ack_timeout_ms`, `connect_timeout_ms`, `subject_prefix`, `subjects`, `stream_name`, `stream_subjects`, `stream_duplicate_window_ms`, `token`, `credentials_file`, `client_name` |
//! | `amqp`, `amqps` | `amqp://user:pass@host:5672/%2f` | `exchange`, `exchange_kind`, `declare_exchange`, `routes`, `max_in_flight`, `confirm_timeout_ms`, `connect_timeout_ms`, `unroutable_is_transient`, `connection_name`; lapin's own `heartbeat`, `frame_max`, `channel_max`, `connection_timeout`, `auth_mechanism` stay in the URL |
//! | `kafka` | `kafka://host:9092[,host2:9092]` | `client_id`, `linger_ms`, `delivery_timeout_ms`, `prefix`, `topic_map`, `auto_create_topics`, `property.<librdkafka.name>` |
//! | `redis`, `rediss` | `redis://[user:pass@]host:6379[/db]` | `mode` (`streams` / `pubsub`), `prefix`, `topic_map`, `maxlen`, `dedup_window_ms`, `response_timeout_ms`, `connect_timeout_ms`; redis-rs's own `protocol`, `db`, `user`, `pass` stay in the URL |

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_amqp::{AmqpConfig, AmqpTransport};
use outbox_core::{Error, ErrorKind, Transport};
use outbox_kafka::{KafkaConfig, KafkaTransport};
use outbox_nats::{NatsConfig, NatsTransport};
use outbox_redis::{RedisConfig, RedisTransport};

use crate::redact::{percent_decode, redact_url};

/// The kinds of transport a route can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// NATS (JetStream or core), `nats://`.
    Nats,
    /// RabbitMQ, `amqp://` or `amqps://`.
    Amqp,
    /// Kafka, `kafka://`.
    Kafka,
    /// Redis Streams or Pub/Sub, `redis://` or `rediss://`.
    Redis,
}

impl Scheme {
    /// The name used in messages and metrics (`nats`, `amqp`, `kafka`, `redis`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Nats => "nats",
            Scheme::Amqp => "amqp",
            Scheme::Kafka => "kafka",
            Scheme::Redis => "redis",
        }
    }

    /// The scheme of a URL scheme name, if it is one of ours.
    pub fn from_url_scheme(s: &str) -> Option<Scheme> {
        match s {
            "nats" => Some(Scheme::Nats),
            "amqp" | "amqps" => Some(Scheme::Amqp),
            "kafka" => Some(Scheme::Kafka),
            "redis" | "rediss" => Some(Scheme::Redis),
            _ => None,
        }
    }

    /// The options this scheme takes as query parameters (the relay's own,
    /// mapped onto the adapter configuration).
    pub fn options(self) -> &'static [&'static str] {
        match self {
            Scheme::Nats => NATS_OPTIONS,
            Scheme::Amqp => AMQP_OPTIONS,
            Scheme::Kafka => KAFKA_OPTIONS,
            Scheme::Redis => REDIS_OPTIONS,
        }
    }

    /// Query parameters the client library reads itself; they stay in the URL.
    fn passthrough(self) -> &'static [&'static str] {
        match self {
            Scheme::Amqp => &[
                "heartbeat",
                "frame_max",
                "channel_max",
                "connection_timeout",
                "auth_mechanism",
            ],
            Scheme::Redis => &["protocol", "db", "user", "pass"],
            Scheme::Nats | Scheme::Kafka => &[],
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const NATS_OPTIONS: &[&str] = &[
    "mode",
    "max_in_flight",
    "ack_timeout_ms",
    "connect_timeout_ms",
    "subject_prefix",
    "subjects",
    "stream_name",
    "stream_subjects",
    "stream_duplicate_window_ms",
    "token",
    "credentials_file",
    "client_name",
];

const AMQP_OPTIONS: &[&str] = &[
    "exchange",
    "exchange_kind",
    "declare_exchange",
    "routes",
    "max_in_flight",
    "confirm_timeout_ms",
    "connect_timeout_ms",
    "unroutable_is_transient",
    "connection_name",
];

const KAFKA_OPTIONS: &[&str] = &[
    "client_id",
    "linger_ms",
    "delivery_timeout_ms",
    "connect_timeout_ms",
    "prefix",
    "topic_map",
    "auto_create_topics",
    "property.<name>",
];

const REDIS_OPTIONS: &[&str] = &[
    "mode",
    "prefix",
    "topic_map",
    "maxlen",
    "dedup_window_ms",
    "response_timeout_ms",
    "connect_timeout_ms",
];

/// Why a route (or its transport URL) was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The route is not written as `pattern=transport-url`.
    #[error("expected pattern=transport-url")]
    MissingSeparator,
    /// The topic pattern is malformed.
    #[error("invalid pattern: {0}")]
    InvalidPattern(String),
    /// The URL has a scheme no adapter handles.
    #[error("unknown transport scheme {scheme:?} (expected nats, amqp, kafka, redis)")]
    UnknownScheme {
        /// The scheme as written (lowercased).
        scheme: String,
    },
    /// The URL is malformed; it is shown redacted.
    #[error("transport URL {url} is invalid: {reason}")]
    InvalidUrl {
        /// The URL, credentials hidden.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A query parameter the transport does not know.
    #[error("unknown {scheme} option {option:?} (known: {known})")]
    UnknownOption {
        /// The transport.
        scheme: Scheme,
        /// The option as written.
        option: String,
        /// The options it knows, comma-separated.
        known: String,
    },
    /// The adapter refused its configuration.
    #[error("{scheme}: {message}")]
    Transport {
        /// The transport.
        scheme: Scheme,
        /// The adapter's message.
        message: String,
    },
}

/// One adapter configuration, built from a transport URL.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum TargetConfig {
    /// A NATS transport.
    Nats(NatsConfig),
    /// A RabbitMQ transport.
    Amqp(AmqpConfig),
    /// A Kafka transport.
    Kafka(KafkaConfig),
    /// A Redis transport.
    Redis(RedisConfig),
}

/// Where a route sends its messages: the URL as written (routes naming the
/// same URL share one transport) and the adapter configuration built from it.
#[derive(Clone)]
pub struct Target {
    url: String,
    config: TargetConfig,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.redacted())
            .field("config", &self.config)
            .finish()
    }
}

impl Target {
    /// Parses a transport URL and builds the adapter configuration from it.
    pub fn parse(url: &str) -> Result<Target, RouteError> {
        let url = url.trim();
        let invalid = |reason: &str| RouteError::InvalidUrl {
            url: redact_url(url),
            reason: reason.to_string(),
        };
        let Some((scheme_text, rest)) = url.split_once("://") else {
            return Err(invalid("expected scheme://host:port"));
        };
        let scheme_text = scheme_text.to_ascii_lowercase();
        let scheme =
            Scheme::from_url_scheme(&scheme_text).ok_or_else(|| RouteError::UnknownScheme {
                scheme: scheme_text.chars().take(40).collect(),
            })?;
        if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains whitespace or control characters"));
        }
        let (rest, fragment) = match rest.find('#') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (base, query) = match rest.split_once('?') {
            Some((b, q)) => (b, q),
            None => (rest, ""),
        };
        if base.is_empty() || base.starts_with(['/', '@', ',']) {
            return Err(invalid("no host"));
        }

        let mut options: Vec<(String, String)> = Vec::new();
        let mut kept: Vec<&str> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(invalid(&format!(
                    "option {:?} has no value (write name=value)",
                    percent_decode(pair)
                )));
            };
            let key = percent_decode(key).to_ascii_lowercase();
            if scheme.passthrough().contains(&key.as_str()) {
                kept.push(pair);
                continue;
            }
            let known = scheme.options().contains(&key.as_str())
                || (scheme == Scheme::Kafka && key.starts_with("property.") && key.len() > 9);
            if !known {
                return Err(RouteError::UnknownOption {
                    scheme,
                    option: key.chars().take(60).collect(),
                    known: scheme.options().join(", "),
                });
            }
            if options.iter().any(|(k, _)| *k == key) {
                return Err(invalid(&format!("option {key:?} is given twice")));
            }
            options.push((key, percent_decode(value)));
        }

        // The URL the client library gets: without the relay's options.
        let client_url = if kept.is_empty() {
            format!("{scheme_text}://{base}{fragment}")
        } else {
            format!("{scheme_text}://{base}?{}{fragment}", kept.join("&"))
        };
        let config = match scheme {
            Scheme::Nats => {
                let vars = env_vars(outbox_nats::ENV_PREFIX, &client_url, "URL", &options);
                NatsConfig::from_lookup(|k| {
                    vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
                })
                .map(TargetConfig::Nats)
                .map_err(|e| adapter_error(scheme, outbox_nats::ENV_PREFIX, &e))?
            }
            Scheme::Amqp => {
                let vars = env_vars(outbox_amqp::ENV_PREFIX, &client_url, "URL", &options);
                AmqpConfig::from_lookup(|k| {
                    vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
                })
                .map(TargetConfig::Amqp)
                .map_err(|e| adapter_error(scheme, outbox_amqp::ENV_PREFIX, &e))?
            }
            Scheme::Kafka => {
                if !fragment.is_empty() {
                    return Err(invalid("a kafka URL has no fragment"));
                }
                let brokers = base.trim_end_matches('/');
                if brokers.contains('/') || brokers.contains('@') {
                    return Err(invalid(
                        "expected kafka://host:port[,host:port] (credentials go in property.sasl.* options)",
                    ));
                }
                let (properties, plain): (Vec<_>, Vec<_>) = options
                    .iter()
                    .cloned()
                    .partition(|(k, _)| k.starts_with("property."));
                let vars = env_vars(outbox_kafka::ENV_PREFIX, brokers, "BROKERS", &plain);
                let mut config = KafkaConfig::from_vars(vars)
                    .map_err(|e| adapter_error(scheme, outbox_kafka::ENV_PREFIX, &e))?;
                if !properties.is_empty() {
                    for (k, v) in properties {
                        config
                            .properties
                            .insert(k["property.".len()..].to_string(), v);
                    }
                    config
                        .validate()
                        .map_err(|e| adapter_error(scheme, outbox_kafka::ENV_PREFIX, &e))?;
                }
                TargetConfig::Kafka(config)
            }
            Scheme::Redis => {
                let vars = env_vars(outbox_redis::ENV_PREFIX, &client_url, "URL", &options);
                RedisConfig::from_vars(vars)
                    .map(TargetConfig::Redis)
                    .map_err(|e| adapter_error(scheme, outbox_redis::ENV_PREFIX, &e))?
            }
        };
        Ok(Target {
            url: url.to_string(),
            config,
        })
    }

    /// The URL as written (the key under which routes share a transport).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL with credentials hidden, for logs.
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }

    /// The kind of transport.
    pub fn scheme(&self) -> Scheme {
        match &self.config {
            TargetConfig::Nats(_) => Scheme::Nats,
            TargetConfig::Amqp(_) => Scheme::Amqp,
            TargetConfig::Kafka(_) => Scheme::Kafka,
            TargetConfig::Redis(_) => Scheme::Redis,
        }
    }

    /// The adapter configuration.
    pub fn config(&self) -> &TargetConfig {
        &self.config
    }

    /// Connects the transport with the adapter's own `connect` (each bounds
    /// its attempt with its `connect_timeout_ms` option); `timeout` only
    /// bounds a hung handshake.
    pub async fn connect(&self, timeout: Duration) -> Result<Arc<dyn Transport>, Error> {
        // The adapters bound their own connection attempts; this only keeps a
        // hung handshake from stalling the start for ever.
        let limit = timeout.saturating_mul(3).max(Duration::from_secs(10));
        let connect = async {
            let transport: Arc<dyn Transport> = match &self.config {
                TargetConfig::Nats(c) => Arc::new(NatsTransport::connect(c.clone()).await?),
                TargetConfig::Amqp(c) => Arc::new(AmqpTransport::connect(c.clone()).await?),
                TargetConfig::Redis(c) => Arc::new(RedisTransport::connect(c.clone()).await?),
                TargetConfig::Kafka(c) => Arc::new(KafkaTransport::connect(c.clone()).await?),
            };
            Ok(transport)
        };
        match tokio::time::timeout(limit, connect).await {
            Ok(r) => r,
            Err(_) => Err(Error::transient(
                ErrorKind::Timeout,
                format!("no connection within {limit:?}"),
            )
            .with_backend(self.scheme().as_str())
            .with_operation("connect")),
        }
    }
}

/// The adapter's environment variables for a URL and options:
/// `OUTBOX_NATS_URL=...`, `OUTBOX_NATS_MODE=core`, ...
fn env_vars(
    prefix: &str,
    url: &str,
    url_var: &str,
    options: &[(String, String)],
) -> Vec<(String, String)> {
    std::iter::once((format!("{prefix}{url_var}"), url.to_string()))
        .chain(
            options
                .iter()
                .map(|(k, v)| (format!("{prefix}{}", k.to_ascii_uppercase()), v.clone())),
        )
        .collect()
}

/// The adapter's message, with its variable names turned back into the
/// option names the user wrote (`OUTBOX_NATS_MAX_IN_FLIGHT` -> `max_in_flight`).
fn adapter_error(scheme: Scheme, prefix: &str, e: &Error) -> RouteError {
    let mut message = e.message().to_string();
    while let Some(start) = message.find(prefix) {
        let end = message[start..]
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .map_or(message.len(), |i| start + i);
        let option = message[start + prefix.len()..end].to_ascii_lowercase();
        let option = match option.as_str() {
            "url" | "brokers" => "URL".to_string(),
            _ => option,
        };
        message.replace_range(start..end, &option);
    }
    RouteError::Transport { scheme, message }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn env_names_become_option_names() {
        let e = Error::permanent(ErrorKind::Config, "OUTBOX_NATS_MAX_IN_FLIGHT=\"x\": bad");
        assert_eq!(
            adapter_error(Scheme::Nats, outbox_nats::ENV_PREFIX, &e).to_string(),
            "nats: max_in_flight=\"x\": bad"
        );
    }
}
