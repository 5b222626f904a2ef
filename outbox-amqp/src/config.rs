//! [`AmqpConfig`]: where to connect, which exchange and routing key a topic
//! goes to, the confirm window and what an unroutable message means.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use outbox_core::router::{pattern_matches, validate_pattern};
use outbox_core::settings::refuse_unknown;
use outbox_core::{Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// Prefix of the environment variables [`AmqpConfig::from_env`] reads.
pub const ENV_PREFIX: &str = "OUTBOX_AMQP_";

/// Longest exchange name or routing key AMQP carries (a short string).
const MAX_SHORT_STRING: usize = 255;

/// The type of exchange the transport declares (when it declares one).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    /// Routing key patterns with `*` and `#` (the default).
    #[default]
    Topic,
    /// Exact routing key match.
    Direct,
    /// Every bound queue.
    Fanout,
    /// Header matching.
    Headers,
}

impl FromStr for ExchangeType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "topic" => Ok(ExchangeType::Topic),
            "direct" => Ok(ExchangeType::Direct),
            "fanout" => Ok(ExchangeType::Fanout),
            "headers" => Ok(ExchangeType::Headers),
            other => Err(config_error(format!(
                "exchange kind {other:?} is invalid: use topic, direct, fanout or headers"
            ))),
        }
    }
}

/// Sends topics matching `pattern` to another exchange and, optionally, a
/// fixed routing key.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmqpRoute {
    /// Topic pattern: dot-separated, `*` one token, `>` the rest (as in
    /// [`outbox_core::Router`]).
    pub pattern: String,
    /// Exchange for matching topics (`""` is the default exchange, where the
    /// routing key names a queue).
    pub exchange: String,
    /// Routing key for matching topics; `None` uses the topic.
    pub routing_key: Option<String>,
}

impl AmqpRoute {
    /// Topics matching `pattern` go to `exchange` with the topic as routing key.
    pub fn new(pattern: impl Into<String>, exchange: impl Into<String>) -> Self {
        AmqpRoute {
            pattern: pattern.into(),
            exchange: exchange.into(),
            routing_key: None,
        }
    }

    /// Uses a fixed routing key instead of the topic.
    pub fn routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = Some(key.into());
        self
    }
}

/// Configuration of an [`AmqpTransport`](crate::AmqpTransport).
///
/// Build it with [`AmqpConfig::builder`] or read it with
/// [`AmqpConfig::from_env`]; both validate. `Debug` hides the password in the
/// URL.
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AmqpConfig {
    /// Broker URL (`amqp://user:pass@host:5672/vhost`, vhost `/` is `%2f`).
    /// Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Exchange for topics no route matches (default `outbox`); the routing
    /// key is the topic.
    pub exchange: String,
    /// Type of the exchanges the transport declares (default topic).
    pub exchange_kind: ExchangeType,
    /// Declare the exchanges (durable) on every (re)connect (default true).
    /// When false they must exist: connecting checks them.
    pub declare_exchange: bool,
    /// Per-topic-pattern overrides; the first matching route wins.
    pub routes: Vec<AmqpRoute>,
    /// Most publishes awaiting their confirm at once, across all batches of
    /// this transport (default 1,024).
    pub max_in_flight: usize,
    /// How long a publish waits for its confirm before failing as a transient
    /// timeout (default 10 s).
    #[serde(with = "outbox_core::settings::millis", rename = "confirm_timeout_ms")]
    pub confirm_timeout: Duration,
    /// How long connecting may take (default 5 s).
    #[serde(with = "outbox_core::settings::millis", rename = "connect_timeout_ms")]
    pub connect_timeout: Duration,
    /// Whether a message no queue is bound for (returned by the broker) is
    /// retried later instead of dead-lettered (default false: permanent).
    pub unroutable_is_transient: bool,
    /// Connection name shown by RabbitMQ (default `outbox-relay`).
    pub connection_name: String,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_string(),
            exchange: "outbox".to_string(),
            exchange_kind: ExchangeType::Topic,
            declare_exchange: true,
            routes: Vec::new(),
            max_in_flight: 1024,
            confirm_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            unroutable_is_transient: false,
            connection_name: "outbox-relay".to_string(),
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("exchange_kind", &self.exchange_kind)
            .field("declare_exchange", &self.declare_exchange)
            .field("routes", &self.routes)
            .field("max_in_flight", &self.max_in_flight)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("unroutable_is_transient", &self.unroutable_is_transient)
            .field("connection_name", &self.connection_name)
            .finish()
    }
}

impl AmqpConfig {
    /// Starts a configuration for the broker at `url`.
    pub fn builder(url: impl Into<String>) -> AmqpConfigBuilder {
        AmqpConfigBuilder {
            config: AmqpConfig {
                url: url.into(),
                ..AmqpConfig::default()
            },
        }
    }

    /// Reads the configuration from `OUTBOX_AMQP_*` environment variables;
    /// unset variables keep their defaults.
    ///
    /// | variable | field |
    /// | --- | --- |
    /// | `OUTBOX_AMQP_URL` | `url` |
    /// | `OUTBOX_AMQP_EXCHANGE` | `exchange` |
    /// | `OUTBOX_AMQP_EXCHANGE_KIND` | `exchange_kind`: topic, direct, fanout, headers |
    /// | `OUTBOX_AMQP_DECLARE_EXCHANGE` | `declare_exchange`: true / false |
    /// | `OUTBOX_AMQP_ROUTES` | `routes`: `pattern=exchange` or `pattern=exchange@routing.key`, comma-separated |
    /// | `OUTBOX_AMQP_MAX_IN_FLIGHT` | `max_in_flight` |
    /// | `OUTBOX_AMQP_CONFIRM_TIMEOUT_MS` | `confirm_timeout` |
    /// | `OUTBOX_AMQP_CONNECT_TIMEOUT_MS` | `connect_timeout` |
    /// | `OUTBOX_AMQP_UNROUTABLE_IS_TRANSIENT` | `unroutable_is_transient`: true / false |
    /// | `OUTBOX_AMQP_CONNECTION_NAME` | `connection_name` |
    ///
    /// A variable under the prefix that is none of these is refused (a
    /// misspelt name would otherwise be ignored).
    pub fn from_env() -> Result<AmqpConfig, Error> {
        let names: Vec<String> = std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .collect();
        let names = names.iter().map(String::as_str);
        refuse_unknown(ENV_PREFIX, VARIABLES, names).map_err(config_error)?;
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the same variables from `(name, value)` pairs instead of the
    /// process environment (every adapter has this form); unknown names
    /// under the prefix are refused, as by [`from_env`](Self::from_env).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AmqpConfig, Error> {
        let vars: std::collections::HashMap<String, String> = vars.into_iter().collect();
        refuse_unknown(ENV_PREFIX, VARIABLES, vars.keys().map(String::as_str))
            .map_err(config_error)?;
        Self::from_lookup(|name| vars.get(name).cloned())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<AmqpConfig, Error> {
        let var = |suffix: &str| {
            lookup(&format!("{ENV_PREFIX}{suffix}")).filter(|v| !v.trim().is_empty())
        };
        let mut b = AmqpConfig::builder(var("URL").unwrap_or_else(|| AmqpConfig::default().url));
        if let Some(v) = var("EXCHANGE") {
            b = b.exchange(v.trim());
        }
        if let Some(v) = var("EXCHANGE_KIND") {
            b = b.exchange_kind(v.parse()?);
        }
        if let Some(v) = var("DECLARE_EXCHANGE") {
            b = b.declare_exchange(parse_bool("DECLARE_EXCHANGE", &v)?);
        }
        if let Some(v) = var("ROUTES") {
            for item in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (pattern, target) = item.split_once('=').ok_or_else(|| {
                    config_error(format!(
                        "{ENV_PREFIX}ROUTES: {item:?} is not pattern=exchange[@routing.key]"
                    ))
                })?;
                let route = match target.split_once('@') {
                    Some((exchange, key)) => {
                        AmqpRoute::new(pattern.trim(), exchange.trim()).routing_key(key.trim())
                    }
                    None => AmqpRoute::new(pattern.trim(), target.trim()),
                };
                b = b.route(route);
            }
        }
        if let Some(v) = var("MAX_IN_FLIGHT") {
            b = b.max_in_flight(parse_env("MAX_IN_FLIGHT", &v)?);
        }
        if let Some(v) = var("CONFIRM_TIMEOUT_MS") {
            b = b.confirm_timeout(Duration::from_millis(parse_env("CONFIRM_TIMEOUT_MS", &v)?));
        }
        if let Some(v) = var("CONNECT_TIMEOUT_MS") {
            b = b.connect_timeout(Duration::from_millis(parse_env("CONNECT_TIMEOUT_MS", &v)?));
        }
        if let Some(v) = var("UNROUTABLE_IS_TRANSIENT") {
            b = b.unroutable_is_transient(parse_bool("UNROUTABLE_IS_TRANSIENT", &v)?);
        }
        if let Some(v) = var("CONNECTION_NAME") {
            b = b.connection_name(v);
        }
        b.build()
    }

    /// Checks every field; [`AmqpConfigBuilder::build`] calls this.
    pub fn validate(&self) -> Result<(), Error> {
        parse_uri(&self.url)?;
        validate_exchange(&self.exchange)?;
        for r in &self.routes {
            validate_pattern(&r.pattern)
                .map_err(|e| config_error(format!("route {:?}: {e}", r.pattern)))?;
            validate_exchange(&r.exchange)?;
            if let Some(key) = &r.routing_key {
                if key.len() > MAX_SHORT_STRING {
                    return Err(config_error(format!(
                        "route {:?}: routing key is {} bytes, more than {MAX_SHORT_STRING}",
                        r.pattern,
                        key.len()
                    )));
                }
            }
        }
        if self.max_in_flight == 0 {
            return Err(config_error("max_in_flight must be at least 1"));
        }
        if self.confirm_timeout.is_zero() {
            return Err(config_error("confirm_timeout must be more than zero"));
        }
        if self.connect_timeout.is_zero() {
            return Err(config_error("connect_timeout must be more than zero"));
        }
        if self.connection_name.is_empty() {
            return Err(config_error("connection_name is empty"));
        }
        Ok(())
    }

    /// The exchange and routing key for a message of `topic`: the first
    /// matching route, else [`exchange`](Self::exchange) with the topic.
    pub fn route_for<'a>(&'a self, topic: &'a str) -> (&'a str, &'a str) {
        match self
            .routes
            .iter()
            .find(|r| pattern_matches(&r.pattern, topic))
        {
            Some(r) => (&r.exchange, r.routing_key.as_deref().unwrap_or(topic)),
            None => (&self.exchange, topic),
        }
    }

    /// Every named exchange the configuration publishes to (the default
    /// exchange `""` excluded).
    pub(crate) fn exchanges(&self) -> BTreeSet<&str> {
        std::iter::once(self.exchange.as_str())
            .chain(self.routes.iter().map(|r| r.exchange.as_str()))
            .filter(|e| !e.is_empty())
            .collect()
    }
}

/// Builds a validated [`AmqpConfig`].
#[derive(Debug, Clone)]
#[must_use]
pub struct AmqpConfigBuilder {
    config: AmqpConfig,
}

impl AmqpConfigBuilder {
    /// Exchange for topics no route matches (default `outbox`).
    pub fn exchange(mut self, name: impl Into<String>) -> Self {
        self.config.exchange = name.into();
        self
    }

    /// Type of declared exchanges (default topic).
    pub fn exchange_kind(mut self, kind: ExchangeType) -> Self {
        self.config.exchange_kind = kind;
        self
    }

    /// Declare the exchanges on connect (default true).
    pub fn declare_exchange(mut self, declare: bool) -> Self {
        self.config.declare_exchange = declare;
        self
    }

    /// Adds a per-pattern route (first match wins).
    pub fn route(mut self, route: AmqpRoute) -> Self {
        self.config.routes.push(route);
        self
    }

    /// Most publishes awaiting their confirm at once (default 1,024).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n;
        self
    }

    /// How long a publish waits for its confirm (default 10 s).
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.config.confirm_timeout = timeout;
        self
    }

    /// How long connecting may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Retry unroutable messages instead of dead-lettering them.
    pub fn unroutable_is_transient(mut self, transient: bool) -> Self {
        self.config.unroutable_is_transient = transient;
        self
    }

    /// Connection name shown by RabbitMQ.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.config.connection_name = name.into();
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<AmqpConfig, Error> {
        self.config.validate()?;
        Ok(self.config)
    }
}

pub(crate) fn config_error(message: impl Into<String>) -> Error {
    Error::permanent(ErrorKind::Config, message.into())
        .with_backend("amqp")
        .with_operation("configure")
}

/// Parses the URL; errors never echo it (it may hold a password).
pub(crate) fn parse_uri(url: &str) -> Result<lapin::uri::AMQPUri, Error> {
    if url.trim().is_empty() {
        return Err(config_error("url is empty"));
    }
    url.parse::<lapin::uri::AMQPUri>()
        .map_err(|e| config_error(format!("url {} is invalid: {e}", redact_url(url))))
}

fn validate_exchange(name: &str) -> Result<(), Error> {
    if name.len() > MAX_SHORT_STRING {
        return Err(config_error(format!(
            "exchange name is {} bytes, more than {MAX_SHORT_STRING}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(config_error(format!(
            "exchange name {name:?} contains {c:?}; allowed are letters, digits, '-', '_', '.' and ':'"
        )));
    }
    Ok(())
}

fn parse_env<T: FromStr>(suffix: &str, value: &str) -> Result<T, Error>
where
    T::Err: fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e| config_error(format!("{ENV_PREFIX}{suffix}={value:?}: {e}")))
}

fn parse_bool(suffix: &str, value: &str) -> Result<bool, Error> {
    outbox_core::settings::parse_bool(value).ok_or_else(|| {
        config_error(format!(
            "{ENV_PREFIX}{suffix}={value:?}: expected true or false"
        ))
    })
}

/// Replaces the password in an AMQP URL with `***`
/// (`amqp://user:***@host:5672/%2f`).
pub fn redact_url(url: &str) -> String {
    outbox_core::redact::url(url)
}

/// The variables [`AmqpConfig::from_env`] reads, without the prefix.
const VARIABLES: &[&str] = &[
    "CONFIRM_TIMEOUT_MS",
    "CONNECTION_NAME",
    "CONNECT_TIMEOUT_MS",
    "DECLARE_EXCHANGE",
    "EXCHANGE",
    "EXCHANGE_KIND",
    "MAX_IN_FLIGHT",
    "ROUTES",
    "UNROUTABLE_IS_TRANSIENT",
    "URL",
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn builder_validates_and_routes() {
        let c = AmqpConfig::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
            .exchange("events")
            .route(AmqpRoute::new("audit.>", "audit"))
            .route(AmqpRoute::new("orders.*", "").routing_key("orders-queue"))
            .build()
            .unwrap();
        assert_eq!(
            c.route_for("audit.login.failed"),
            ("audit", "audit.login.failed")
        );
        assert_eq!(c.route_for("orders.placed"), ("", "orders-queue"));
        assert_eq!(c.route_for("billing.paid"), ("events", "billing.paid"));
        assert_eq!(
            c.exchanges().into_iter().collect::<Vec<_>>(),
            vec!["audit", "events"]
        );

        assert!(AmqpConfig::builder("http://h").build().is_err());
        assert!(AmqpConfig::builder("").build().is_err());
        assert!(AmqpConfig::builder("amqp://h")
            .max_in_flight(0)
            .build()
            .is_err());
        assert!(AmqpConfig::builder("amqp://h")
            .exchange("bad name")
            .build()
            .is_err());
        assert!(AmqpConfig::builder("amqp://h")
            .route(AmqpRoute::new("a.>.b", "x"))
            .build()
            .is_err());
        let e = AmqpConfig::builder("amqp://h")
            .confirm_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(!e.is_transient());
    }

    #[test]
    fn from_env_reads_documented_variables() {
        let vars: BTreeMap<&str, &str> = [
            ("OUTBOX_AMQP_URL", "amqp://app:secret@rabbit:5672/prod"),
            ("OUTBOX_AMQP_EXCHANGE", "events"),
            ("OUTBOX_AMQP_DECLARE_EXCHANGE", "false"),
            (
                "OUTBOX_AMQP_ROUTES",
                "audit.>=audit, orders.*=@orders-queue",
            ),
            ("OUTBOX_AMQP_MAX_IN_FLIGHT", "64"),
            ("OUTBOX_AMQP_CONFIRM_TIMEOUT_MS", "2500"),
            ("OUTBOX_AMQP_UNROUTABLE_IS_TRANSIENT", "yes"),
        ]
        .into_iter()
        .collect();
        let c = AmqpConfig::from_lookup(|k| vars.get(k).map(|v| v.to_string())).unwrap();
        // from_vars reads the same; a misspelt name under the prefix is refused.
        let pairs = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(AmqpConfig::from_vars(pairs.clone()).unwrap(), c);
        let typo = pairs.chain([(
            "OUTBOX_AMQP_CONFIRM_TIMEOUT_MSS".to_string(),
            "1".to_string(),
        )]);
        let e = AmqpConfig::from_vars(typo).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(
            e.to_string().contains("OUTBOX_AMQP_CONFIRM_TIMEOUT_MSS"),
            "{e}"
        );
        assert_eq!(c.exchange, "events");
        assert!(!c.declare_exchange);
        assert_eq!(c.max_in_flight, 64);
        assert_eq!(c.confirm_timeout, Duration::from_millis(2500));
        assert!(c.unroutable_is_transient);
        assert_eq!(c.route_for("orders.placed"), ("", "orders-queue"));
        assert_eq!(c.route_for("audit.x"), ("audit", "audit.x"));
        let debug = format!("{c:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(debug.contains("amqp://app:***@rabbit:5672/prod"), "{debug}");

        let bad = |k: &'static str, v: &'static str| {
            AmqpConfig::from_lookup(|name| (name == k).then(|| v.to_string())).unwrap_err()
        };
        assert_eq!(
            bad("OUTBOX_AMQP_MAX_IN_FLIGHT", "-1").kind(),
            ErrorKind::Config
        );
        assert_eq!(
            bad("OUTBOX_AMQP_DECLARE_EXCHANGE", "maybe").kind(),
            ErrorKind::Config
        );
        assert_eq!(bad("OUTBOX_AMQP_ROUTES", "audit").kind(), ErrorKind::Config);
        assert_eq!(
            bad("OUTBOX_AMQP_EXCHANGE_KIND", "x").kind(),
            ErrorKind::Config
        );
        let e = bad("OUTBOX_AMQP_URL", "amqp://u:hunter2@h:notaport/");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn serde_round_trip() {
        let c = AmqpConfig::builder("amqp://h")
            .route(AmqpRoute::new("a.*", "x").routing_key("k"))
            .build()
            .unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"confirm_timeout_ms\":10000"), "{json}");
        assert!(json.contains("\"exchange_kind\":\"topic\""), "{json}");
        let back: AmqpConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        let partial: AmqpConfig = serde_json::from_str(r#"{"exchange":"e"}"#).unwrap();
        assert_eq!(partial.max_in_flight, 1024);
        assert!(partial.declare_exchange);
    }
}
