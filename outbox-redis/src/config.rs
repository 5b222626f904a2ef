//! [`RedisConfig`]: where the transport connects, whether it appends to
//! streams or publishes to channels, how outbox topics name keys, trimming,
//! dedup and timeouts.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::RedisError;

/// Prefix of every environment variable [`RedisConfig::from_env`] reads.
pub const ENV_PREFIX: &str = "OUTBOX_REDIS_";

/// The longest dedup window accepted (a day): a marker key lives that long
/// per message.
pub const MAX_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// How messages are handed to Redis.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// `XADD` to a stream per topic (durable as far as Redis persists;
    /// consumers read with `XREAD` / `XREADGROUP` at their own pace).
    #[default]
    Streams,
    /// `PUBLISH` to a channel per topic. Not durable: a message published
    /// while nobody subscribes is gone, and `Ok` only means Redis accepted
    /// it.
    #[serde(rename = "pubsub")]
    PubSub,
}

impl fmt::Display for RedisMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RedisMode::Streams => "streams",
            RedisMode::PubSub => "pubsub",
        })
    }
}

impl std::str::FromStr for RedisMode {
    type Err = outbox_core::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "streams" | "stream" => Ok(RedisMode::Streams),
            "pubsub" | "pub/sub" | "pub-sub" => Ok(RedisMode::PubSub),
            _ => Err(RedisError::Config(format!(
                "mode {s:?} is neither \"streams\" nor \"pubsub\""
            ))
            .into()),
        }
    }
}

/// Configuration of a [`RedisTransport`](crate::RedisTransport).
///
/// Build it with [`RedisConfig::builder`] (validates) or read it with
/// [`RedisConfig::from_env`]. A deserialised value is checked when the
/// transport connects.
///
/// | field | env var | default | meaning |
/// | --- | --- | --- | --- |
/// | `url` | `OUTBOX_REDIS_URL` | `redis://127.0.0.1:6379` | `redis://[user][:password@]host[:port][/db]`, `rediss://` needs a TLS feature of `redis` |
/// | `mode` | `OUTBOX_REDIS_MODE` | `streams` | `streams` (XADD) or `pubsub` (PUBLISH) |
/// | `prefix` | `OUTBOX_REDIS_PREFIX` | empty | stream key / channel = prefix + outbox topic |
/// | `topic_map` | `OUTBOX_REDIS_TOPIC_MAP` | empty | `orders.placed=orders,...`: exact renames (no prefix added) |
/// | `maxlen` | `OUTBOX_REDIS_MAXLEN` | none | streams: `XADD ... MAXLEN ~ N` trimming |
/// | `dedup_window` | `OUTBOX_REDIS_DEDUP_WINDOW_MS` | none | streams: skip a message id already added within this window |
/// | `response_timeout` | `OUTBOX_REDIS_RESPONSE_TIMEOUT_MS` | 5 s | a batch without a reply by then fails (transient) |
/// | `connect_timeout` | `OUTBOX_REDIS_CONNECT_TIMEOUT_MS` | 2 s | one connection attempt |
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// Connection URL; its password is never shown by `Debug`.
    pub url: String,
    /// Streams (default) or Pub/Sub.
    pub mode: RedisMode,
    /// Prepended to the outbox topic to name the stream key or channel.
    pub prefix: String,
    /// Exact renames: outbox topic -> stream key or channel (the prefix is
    /// not added to a mapped name).
    pub topic_map: BTreeMap<String, String>,
    /// Streams only: trim each stream to about this many entries
    /// (`MAXLEN ~`). Consumers that fall further behind lose entries.
    pub maxlen: Option<u64>,
    /// Streams only: remember each message id for this long and skip a
    /// message whose id was already added (a re-publish after a relay
    /// crash), reporting it as published.
    #[serde(rename = "dedup_window_ms", with = "option_duration_ms")]
    pub dedup_window: Option<Duration>,
    /// How long a batch waits for Redis's replies.
    #[serde(rename = "response_timeout_ms", with = "outbox_core::settings::millis")]
    pub response_timeout: Duration,
    /// How long one connection attempt may take.
    #[serde(rename = "connect_timeout_ms", with = "outbox_core::settings::millis")]
    pub connect_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_string(),
            mode: RedisMode::Streams,
            prefix: String::new(),
            topic_map: BTreeMap::new(),
            maxlen: None,
            dedup_window: None,
            response_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// The URL with its password (and `pass` / `password` query values)
/// replaced by `***`.
pub fn redact_url(url: &str) -> String {
    outbox_core::redact::url(url)
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("mode", &self.mode)
            .field("prefix", &self.prefix)
            .field("topic_map", &self.topic_map)
            .field("maxlen", &self.maxlen)
            .field("dedup_window", &self.dedup_window)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl RedisConfig {
    /// Starts a configuration for the given URL
    /// (`redis://[user][:password@]host[:port][/db]`).
    pub fn builder(url: impl Into<String>) -> RedisConfigBuilder {
        RedisConfigBuilder {
            config: RedisConfig {
                url: url.into(),
                ..RedisConfig::default()
            },
        }
    }

    /// Reads the configuration from `OUTBOX_REDIS_*` environment variables
    /// (see the table on [`RedisConfig`]); unset variables keep their
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
    /// `OUTBOX_REDIS_` prefix are ignored, unknown ones under it are refused).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> outbox_core::Result<Self> {
        let mut config = RedisConfig::default();
        for (name, value) in vars {
            let Some(field) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let number = |value: &str| {
                value
                    .trim()
                    .parse::<u64>()
                    .map_err(|e| RedisError::Config(format!("{name}={value:?}: {e}")))
            };
            match field {
                "URL" => config.url = value,
                "MODE" => {
                    config.mode = value.parse().map_err(|e: outbox_core::Error| {
                        RedisError::Config(format!("{name}: {}", e.message()))
                    })?
                }
                "PREFIX" => config.prefix = value,
                "TOPIC_MAP" => config.topic_map = parse_map(&name, &value)?,
                "MAXLEN" => {
                    config.maxlen = Some(number(&value)?).filter(|n| *n > 0);
                }
                "DEDUP_WINDOW_MS" => {
                    config.dedup_window =
                        Some(Duration::from_millis(number(&value)?)).filter(|d| !d.is_zero());
                }
                "RESPONSE_TIMEOUT_MS" => {
                    config.response_timeout = Duration::from_millis(number(&value)?)
                }
                "CONNECT_TIMEOUT_MS" => {
                    config.connect_timeout = Duration::from_millis(number(&value)?)
                }
                _ => {
                    return Err(RedisError::Config(format!(
                        "unknown variable {name} (known: URL, MODE, PREFIX, TOPIC_MAP, MAXLEN, \
                         DEDUP_WINDOW_MS, RESPONSE_TIMEOUT_MS, CONNECT_TIMEOUT_MS)"
                    ))
                    .into())
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; [`RedisConfigBuilder::build`],
    /// [`from_env`](Self::from_env) and the transport call it.
    pub fn validate(&self) -> outbox_core::Result<()> {
        let bad = |m: String| -> outbox_core::Result<()> { Err(RedisError::Config(m).into()) };
        if redis::Client::open(self.url.as_str()).is_err() {
            // The client's message may quote the URL: show it redacted only.
            return bad(format!(
                "url {} is not a valid Redis URL",
                redact_url(&self.url)
            ));
        }
        if self.mode == RedisMode::PubSub {
            if self.maxlen.is_some() {
                return bad("maxlen applies to streams, not to pubsub mode".into());
            }
            if self.dedup_window.is_some() {
                return bad("dedup_window applies to streams, not to pubsub mode".into());
            }
        }
        if self.maxlen == Some(0) {
            return bad("maxlen is 0 (leave it unset for no trimming)".into());
        }
        if let Some(w) = self.dedup_window {
            if w < Duration::from_millis(1) {
                return bad("dedup_window is shorter than a millisecond".into());
            }
            if w > MAX_DEDUP_WINDOW {
                return bad(format!(
                    "dedup_window {w:?} is longer than {MAX_DEDUP_WINDOW:?}"
                ));
            }
        }
        if self.response_timeout.is_zero() {
            return bad("response_timeout is zero".into());
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout is zero".into());
        }
        for (from, to) in &self.topic_map {
            if from.is_empty() || to.is_empty() {
                return bad(format!("topic_map entry {from:?} -> {to:?} is empty"));
            }
        }
        Ok(())
    }

    /// The stream key or channel for an outbox topic: its `topic_map`
    /// entry, else `prefix` + topic.
    pub fn key_for<'a>(&'a self, topic: &'a str) -> std::borrow::Cow<'a, str> {
        use std::borrow::Cow;
        match self.topic_map.get(topic) {
            Some(mapped) => Cow::Borrowed(mapped.as_str()),
            None if self.prefix.is_empty() => Cow::Borrowed(topic),
            None => Cow::Owned(format!("{}{topic}", self.prefix)),
        }
    }
}

/// Parses `a=b,c=d` (spaces around items are ignored).
fn parse_map(name: &str, value: &str) -> outbox_core::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((from, to)) = item.split_once('=') else {
            return Err(RedisError::Config(format!(
                "{name}: {item:?} is not of the form outbox.topic=redis-key"
            ))
            .into());
        };
        map.insert(from.trim().to_string(), to.trim().to_string());
    }
    Ok(map)
}

/// Builds a checked [`RedisConfig`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisConfigBuilder {
    config: RedisConfig,
}

impl RedisConfigBuilder {
    /// Streams (default) or Pub/Sub.
    pub fn mode(mut self, mode: RedisMode) -> Self {
        self.config.mode = mode;
        self
    }

    /// Prepends `prefix` to every outbox topic that has no `topic_map` entry.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }

    /// Publishes messages of the outbox topic `from` to the stream or
    /// channel `to`.
    pub fn map_topic(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.config.topic_map.insert(from.into(), to.into());
        self
    }

    /// Streams: trims each stream to about `n` entries (`MAXLEN ~ n`).
    pub fn maxlen(mut self, n: u64) -> Self {
        self.config.maxlen = Some(n);
        self
    }

    /// Streams: skips a message whose id was added within `window`.
    pub fn dedup_window(mut self, window: Duration) -> Self {
        self.config.dedup_window = Some(window);
        self
    }

    /// How long a batch waits for replies (default 5 s).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.config.response_timeout = timeout;
        self
    }

    /// How long one connection attempt may take (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Checks the configuration and returns it.
    pub fn build(self) -> outbox_core::Result<RedisConfig> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// Serialises an optional [`Duration`] as whole milliseconds or null.
mod option_duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|ms| ms.map(Duration::from_millis))
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
        let c = RedisConfig::builder("redis://127.0.0.1:6379/2")
            .prefix("app:")
            .map_topic("orders.placed", "orders")
            .maxlen(10_000)
            .dedup_window(Duration::from_secs(60))
            .build()
            .unwrap();
        assert_eq!(c.key_for("orders.placed"), "orders");
        assert_eq!(c.key_for("audit.login"), "app:audit.login");

        for bad in [
            RedisConfig::builder("http://nope").build(),
            RedisConfig::builder("not a url").build(),
            RedisConfig::builder("redis://h")
                .mode(RedisMode::PubSub)
                .maxlen(5)
                .build(),
            RedisConfig::builder("redis://h")
                .mode(RedisMode::PubSub)
                .dedup_window(Duration::from_secs(1))
                .build(),
            RedisConfig::builder("redis://h").maxlen(0).build(),
            RedisConfig::builder("redis://h")
                .dedup_window(Duration::from_secs(3 * 24 * 3600))
                .build(),
            RedisConfig::builder("redis://h")
                .response_timeout(Duration::ZERO)
                .build(),
            RedisConfig::builder("redis://h").map_topic("a", "").build(),
        ] {
            let e = bad.unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::Config, "{e}");
            assert!(!e.is_transient());
            assert_eq!(e.backend(), Some("redis"));
        }
    }

    #[test]
    fn from_vars_reads_every_variable() {
        let c = RedisConfig::from_vars(vars(&[
            ("OUTBOX_REDIS_URL", "redis://:pw@10.0.0.1:6380/1"),
            ("OUTBOX_REDIS_MODE", "streams"),
            ("OUTBOX_REDIS_PREFIX", "app:"),
            ("OUTBOX_REDIS_TOPIC_MAP", "a.b=ab, c=cc"),
            ("OUTBOX_REDIS_MAXLEN", "5000"),
            ("OUTBOX_REDIS_DEDUP_WINDOW_MS", "60000"),
            ("OUTBOX_REDIS_RESPONSE_TIMEOUT_MS", "2500"),
            ("OUTBOX_REDIS_CONNECT_TIMEOUT_MS", "700"),
            ("HOME", "/root"),
        ]))
        .unwrap();
        assert_eq!(c.url, "redis://:pw@10.0.0.1:6380/1");
        assert_eq!(c.mode, RedisMode::Streams);
        assert_eq!(c.prefix, "app:");
        assert_eq!(c.topic_map["a.b"], "ab");
        assert_eq!(c.maxlen, Some(5000));
        assert_eq!(c.dedup_window, Some(Duration::from_secs(60)));
        assert_eq!(c.response_timeout, Duration::from_millis(2500));
        assert_eq!(c.connect_timeout, Duration::from_millis(700));

        let p = RedisConfig::from_vars(vars(&[("OUTBOX_REDIS_MODE", "pubsub")])).unwrap();
        assert_eq!(p.mode, RedisMode::PubSub);
        assert_eq!(
            RedisConfig::from_vars(Vec::new()).unwrap(),
            RedisConfig::default()
        );

        for bad in [
            ("OUTBOX_REDIS_MODE", "kafka"),
            ("OUTBOX_REDIS_MAXLEN", "lots"),
            ("OUTBOX_REDIS_TOPIC_MAP", "x"),
            ("OUTBOX_REDIS_URLS", "typo"),
        ] {
            let e = RedisConfig::from_vars(vars(&[bad])).unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::Config);
            assert!(e.to_string().contains(bad.0), "{e}");
        }
    }

    #[test]
    fn urls_are_redacted() {
        for (url, shown) in [
            (
                "redis://user:hunter2@host:6379/0",
                "redis://user:***@host:6379/0",
            ),
            ("redis://:hunter2@host", "redis://:***@host"),
            (
                "rediss://u:p%40ss@host/1?protocol=resp3",
                "rediss://u:***@host/1?protocol=resp3",
            ),
            (
                "redis+unix:///tmp/r.sock?db=1&pass=hunter2",
                "redis+unix:///tmp/r.sock?db=1&pass=***",
            ),
            ("redis://host:6379", "redis://host:6379"),
            ("redis://user@host", "redis://user@host"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        let c = RedisConfig::builder("redis://user:hunter2@127.0.0.1:6379")
            .build()
            .unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("user:***@127.0.0.1"), "{text}");
        let e = RedisConfig::builder("redis://user:hunter2@[bad")
            .build()
            .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn serde_round_trip() {
        let c = RedisConfig::builder("redis://h")
            .dedup_window(Duration::from_millis(1500))
            .build()
            .unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["dedup_window_ms"], 1500);
        assert_eq!(json["mode"], "streams");
        let back: RedisConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
        let p: RedisConfig = serde_json::from_str(r#"{"mode":"pubsub"}"#).unwrap();
        assert_eq!(p.mode, RedisMode::PubSub);
        assert_eq!(p.response_timeout, Duration::from_secs(5));
    }
}
