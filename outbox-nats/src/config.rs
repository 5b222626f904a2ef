//! [`NatsConfig`]: where to connect, JetStream or core NATS, the ack window,
//! subject mapping and an optional stream to create.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use outbox_core::settings::refuse_unknown;
use outbox_core::{Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// Prefix of the environment variables [`NatsConfig::from_env`] reads.
pub const ENV_PREFIX: &str = "OUTBOX_NATS_";

/// How messages are published.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsMode {
    /// JetStream: each publish waits for the stream's PubAck, and carries
    /// `Nats-Msg-Id` so the server drops duplicates within its window.
    #[default]
    JetStream,
    /// Core NATS: fire-and-forget publishes followed by one round trip to the
    /// server per batch. **Not durable**: a message reaches only subscribers
    /// connected at that moment, and nothing is stored.
    Core,
}

impl FromStr for NatsMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "jetstream" | "js" => Ok(NatsMode::JetStream),
            "core" => Ok(NatsMode::Core),
            other => Err(config_error(format!(
                "mode {other:?} is invalid: use \"jetstream\" or \"core\""
            ))),
        }
    }
}

impl fmt::Display for NatsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NatsMode::JetStream => "jetstream",
            NatsMode::Core => "core",
        })
    }
}

/// A JetStream stream the transport creates when it is missing.
///
/// The transport creates it on connect (if absent; an existing stream of that
/// name is left as it is), and again when a publish finds no stream for its
/// subject (after someone deleted it).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSpec {
    /// Stream name (no spaces, `.`, `*` or `>`).
    pub name: String,
    /// Subjects the stream captures (wildcards allowed: `orders.>`).
    pub subjects: Vec<String>,
    /// Window within which the server drops a message whose `Nats-Msg-Id`
    /// it has already stored (default 2 minutes, the server's default).
    #[serde(with = "outbox_core::settings::millis", rename = "duplicate_window_ms")]
    pub duplicate_window: Duration,
}

impl StreamSpec {
    /// A file-backed stream `name` capturing `subjects`, with the default
    /// duplicate window.
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        subjects: impl IntoIterator<Item = S>,
    ) -> Self {
        StreamSpec {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            duplicate_window: Duration::from_secs(120),
        }
    }

    /// Sets the duplicate window.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        if self.name.is_empty()
            || self
                .name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>'))
        {
            return Err(config_error(format!(
                "stream name {:?} is invalid: it must be non-empty, without spaces, '.', '*' or '>'",
                self.name
            )));
        }
        if self.subjects.is_empty() {
            return Err(config_error(format!(
                "stream {:?} needs at least one subject",
                self.name
            )));
        }
        for s in &self.subjects {
            validate_subject(s, true)
                .map_err(|e| config_error(format!("stream subject {s:?} is invalid: {e}")))?;
        }
        Ok(())
    }
}

/// Configuration of a [`NatsTransport`](crate::NatsTransport).
///
/// Build it with [`NatsConfig::builder`] or read it with
/// [`NatsConfig::from_env`]; both validate. `Debug` hides the password in the
/// URL and the token.
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas
    /// (`nats://user:pass@host:4222`). Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// JetStream (default) or core NATS.
    pub mode: NatsMode,
    /// Most publishes awaiting their ack at once, across all batches of this
    /// transport (default 1,024).
    pub max_in_flight: usize,
    /// How long a call waits with no PubAck coming before the messages still
    /// unanswered fail as transient timeouts (JetStream; they fail at once
    /// when the connection is lost), or a batch for the server round trip
    /// (core) (default 10 s).
    #[serde(with = "outbox_core::settings::millis", rename = "ack_timeout_ms")]
    pub ack_timeout: Duration,
    /// How long connecting may take (default 5 s).
    #[serde(with = "outbox_core::settings::millis", rename = "connect_timeout_ms")]
    pub connect_timeout: Duration,
    /// Prepended to every topic to form the subject (`"app."` turns
    /// `orders.placed` into `app.orders.placed`). Default none.
    pub subject_prefix: Option<String>,
    /// Exact topic -> subject mappings, applied before the prefix.
    pub subjects: BTreeMap<String, String>,
    /// A stream to create when missing (JetStream only). Default none: a
    /// subject no stream captures fails permanently.
    pub create_stream: Option<StreamSpec>,
    /// Authentication token. Default none.
    pub token: Option<String>,
    /// Path of a `.creds` file (JWT + NKey). Default none.
    pub credentials_file: Option<PathBuf>,
    /// Client name shown by the server (default `outbox-relay`).
    pub client_name: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_string(),
            mode: NatsMode::JetStream,
            max_in_flight: 1024,
            ack_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            subject_prefix: None,
            subjects: BTreeMap::new(),
            create_stream: None,
            token: None,
            credentials_file: None,
            client_name: "outbox-relay".to_string(),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("mode", &self.mode)
            .field("max_in_flight", &self.max_in_flight)
            .field("ack_timeout", &self.ack_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("subject_prefix", &self.subject_prefix)
            .field("subjects", &self.subjects)
            .field("create_stream", &self.create_stream)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("credentials_file", &self.credentials_file)
            .field("client_name", &self.client_name)
            .finish()
    }
}

impl NatsConfig {
    /// Starts a configuration for the server(s) at `url`.
    pub fn builder(url: impl Into<String>) -> NatsConfigBuilder {
        NatsConfigBuilder {
            config: NatsConfig {
                url: url.into(),
                ..NatsConfig::default()
            },
        }
    }

    /// Reads the configuration from `OUTBOX_NATS_*` environment variables;
    /// unset variables keep their defaults.
    ///
    /// | variable | field |
    /// | --- | --- |
    /// | `OUTBOX_NATS_URL` | `url` |
    /// | `OUTBOX_NATS_MODE` | `mode`: `jetstream` or `core` |
    /// | `OUTBOX_NATS_MAX_IN_FLIGHT` | `max_in_flight` |
    /// | `OUTBOX_NATS_ACK_TIMEOUT_MS` | `ack_timeout` |
    /// | `OUTBOX_NATS_CONNECT_TIMEOUT_MS` | `connect_timeout` |
    /// | `OUTBOX_NATS_SUBJECT_PREFIX` | `subject_prefix` |
    /// | `OUTBOX_NATS_SUBJECTS` | `subjects`: `topic=subject,topic=subject` |
    /// | `OUTBOX_NATS_STREAM_NAME` | `create_stream.name` |
    /// | `OUTBOX_NATS_STREAM_SUBJECTS` | `create_stream.subjects`, comma-separated |
    /// | `OUTBOX_NATS_STREAM_DUPLICATE_WINDOW_MS` | `create_stream.duplicate_window` |
    /// | `OUTBOX_NATS_TOKEN` | `token` |
    /// | `OUTBOX_NATS_CREDENTIALS_FILE` | `credentials_file` |
    /// | `OUTBOX_NATS_CLIENT_NAME` | `client_name` |
    ///
    /// A variable under the prefix that is none of these is refused (a
    /// misspelt name would otherwise be ignored).
    pub fn from_env() -> Result<NatsConfig, Error> {
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
    ) -> Result<NatsConfig, Error> {
        let vars: std::collections::HashMap<String, String> = vars.into_iter().collect();
        refuse_unknown(ENV_PREFIX, VARIABLES, vars.keys().map(String::as_str))
            .map_err(config_error)?;
        Self::from_lookup(|name| vars.get(name).cloned())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup`
    /// (handy in tests and for other configuration sources).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<NatsConfig, Error> {
        let var = |suffix: &str| {
            lookup(&format!("{ENV_PREFIX}{suffix}")).filter(|v| !v.trim().is_empty())
        };
        let mut b = NatsConfig::builder(var("URL").unwrap_or_else(|| NatsConfig::default().url));
        if let Some(v) = var("MODE") {
            b = b.mode(v.parse()?);
        }
        if let Some(v) = var("MAX_IN_FLIGHT") {
            b = b.max_in_flight(parse_env("MAX_IN_FLIGHT", &v)?);
        }
        if let Some(v) = var("ACK_TIMEOUT_MS") {
            b = b.ack_timeout(Duration::from_millis(parse_env("ACK_TIMEOUT_MS", &v)?));
        }
        if let Some(v) = var("CONNECT_TIMEOUT_MS") {
            b = b.connect_timeout(Duration::from_millis(parse_env("CONNECT_TIMEOUT_MS", &v)?));
        }
        if let Some(v) = var("SUBJECT_PREFIX") {
            b = b.subject_prefix(v);
        }
        if let Some(v) = var("SUBJECTS") {
            for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (topic, subject) = pair.split_once('=').ok_or_else(|| {
                    config_error(format!(
                        "{ENV_PREFIX}SUBJECTS: {pair:?} is not topic=subject"
                    ))
                })?;
                b = b.subject(topic.trim(), subject.trim());
            }
        }
        match (var("STREAM_NAME"), var("STREAM_SUBJECTS")) {
            (Some(name), Some(subjects)) => {
                let mut spec = StreamSpec::new(
                    name,
                    subjects.split(',').map(str::trim).filter(|s| !s.is_empty()),
                );
                if let Some(v) = var("STREAM_DUPLICATE_WINDOW_MS") {
                    spec = spec.duplicate_window(Duration::from_millis(parse_env(
                        "STREAM_DUPLICATE_WINDOW_MS",
                        &v,
                    )?));
                }
                b = b.create_stream(spec);
            }
            (None, None) => {}
            _ => {
                return Err(config_error(format!(
                    "{ENV_PREFIX}STREAM_NAME and {ENV_PREFIX}STREAM_SUBJECTS go together"
                )))
            }
        }
        if let Some(v) = var("TOKEN") {
            b = b.token(v);
        }
        if let Some(v) = var("CREDENTIALS_FILE") {
            b = b.credentials_file(v);
        }
        if let Some(v) = var("CLIENT_NAME") {
            b = b.client_name(v);
        }
        b.build()
    }

    /// Checks every field; [`NatsConfigBuilder::build`] calls this.
    pub fn validate(&self) -> Result<(), Error> {
        server_addrs(&self.url)?;
        if self.max_in_flight == 0 {
            return Err(config_error("max_in_flight must be at least 1"));
        }
        if self.ack_timeout.is_zero() {
            return Err(config_error("ack_timeout must be more than zero"));
        }
        if self.connect_timeout.is_zero() {
            return Err(config_error("connect_timeout must be more than zero"));
        }
        if let Some(prefix) = &self.subject_prefix {
            // A prefix followed by one token must be a valid subject.
            validate_subject(&format!("{prefix}x"), false)
                .map_err(|e| config_error(format!("subject_prefix {prefix:?} is invalid: {e}")))?;
        }
        for (topic, subject) in &self.subjects {
            outbox_core::message::validate_topic(topic)
                .map_err(|e| config_error(format!("subjects: topic {topic:?}: {e}")))?;
            validate_subject(subject, false)
                .map_err(|e| config_error(format!("subjects: subject {subject:?}: {e}")))?;
        }
        if let Some(spec) = &self.create_stream {
            if self.mode == NatsMode::Core {
                return Err(config_error(
                    "create_stream needs JetStream mode (core NATS stores nothing)",
                ));
            }
            spec.validate()?;
        }
        if self.token.as_deref().is_some_and(str::is_empty) {
            return Err(config_error("token is empty"));
        }
        if self.client_name.is_empty() {
            return Err(config_error("client_name is empty"));
        }
        Ok(())
    }

    /// The subject a message of `topic` is published on: the exact mapping if
    /// there is one, else the topic; then the prefix.
    pub fn subject_for(&self, topic: &str) -> String {
        let base = self.subjects.get(topic).map_or(topic, String::as_str);
        match &self.subject_prefix {
            Some(prefix) => format!("{prefix}{base}"),
            None => base.to_string(),
        }
    }
}

/// Builds a validated [`NatsConfig`].
#[derive(Debug, Clone)]
#[must_use]
pub struct NatsConfigBuilder {
    config: NatsConfig,
}

impl NatsConfigBuilder {
    /// JetStream (default) or core NATS.
    pub fn mode(mut self, mode: NatsMode) -> Self {
        self.config.mode = mode;
        self
    }

    /// Shorthand for `mode(NatsMode::Core)`.
    pub fn core(self) -> Self {
        self.mode(NatsMode::Core)
    }

    /// Most publishes awaiting their ack at once (default 1,024).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n;
        self
    }

    /// How long a publish waits for its ack (default 10 s).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.config.ack_timeout = timeout;
        self
    }

    /// How long connecting may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Prepends `prefix` to every subject.
    pub fn subject_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.subject_prefix = Some(prefix.into());
        self
    }

    /// Publishes messages of `topic` on `subject` instead.
    pub fn subject(mut self, topic: impl Into<String>, subject: impl Into<String>) -> Self {
        self.config.subjects.insert(topic.into(), subject.into());
        self
    }

    /// Creates this stream when it is missing.
    pub fn create_stream(mut self, spec: StreamSpec) -> Self {
        self.config.create_stream = Some(spec);
        self
    }

    /// Authenticates with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.config.token = Some(token.into());
        self
    }

    /// Authenticates with a `.creds` file.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.credentials_file = Some(path.into());
        self
    }

    /// Client name shown by the server.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.config.client_name = name.into();
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<NatsConfig, Error> {
        self.config.validate()?;
        Ok(self.config)
    }
}

pub(crate) fn config_error(message: impl Into<String>) -> Error {
    Error::permanent(ErrorKind::Config, message.into())
        .with_backend("nats")
        .with_operation("configure")
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

/// Parses the comma-separated server list; errors never echo the URL, which
/// may hold a password.
pub(crate) fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, Error> {
    let addrs: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if addrs.is_empty() {
        return Err(config_error("url is empty"));
    }
    addrs
        .into_iter()
        .map(|a| {
            a.parse::<async_nats::ServerAddr>()
                .map_err(|e| config_error(format!("url {} is invalid: {e}", redact_url(a))))
        })
        .collect()
}

/// Checks a NATS subject: dot-separated non-empty tokens without whitespace;
/// `*` and `>` only as whole tokens and only when `wildcards` is set, `>` last.
pub(crate) fn validate_subject(subject: &str, wildcards: bool) -> Result<(), String> {
    if subject.is_empty() {
        return Err("empty".into());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err("empty token (leading, trailing or double '.')".into());
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("whitespace or control characters".into());
        }
        let wild = *t == "*" || *t == ">";
        if wild && !wildcards {
            return Err("wildcards are not allowed here".into());
        }
        if *t == ">" && i + 1 != tokens.len() {
            return Err("'>' must be the last token".into());
        }
        if !wild && (t.contains('*') || t.contains('>')) {
            return Err("'*' and '>' must be whole tokens".into());
        }
    }
    Ok(())
}

/// Replaces the password of every URL in a comma-separated list with `***`
/// (`nats://user:***@host:4222`); a lone user part is taken as a token and
/// hidden whole.
pub fn redact_url(url: &str) -> String {
    outbox_core::redact::url(url)
}

/// The variables [`NatsConfig::from_env`] reads, without the prefix.
const VARIABLES: &[&str] = &[
    "ACK_TIMEOUT_MS",
    "CLIENT_NAME",
    "CONNECT_TIMEOUT_MS",
    "CREDENTIALS_FILE",
    "MAX_IN_FLIGHT",
    "MODE",
    "STREAM_DUPLICATE_WINDOW_MS",
    "STREAM_NAME",
    "STREAM_SUBJECTS",
    "SUBJECTS",
    "SUBJECT_PREFIX",
    "TOKEN",
    "URL",
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn builder_validates() {
        let c = NatsConfig::builder("nats://127.0.0.1:4222")
            .max_in_flight(8)
            .subject_prefix("app.")
            .subject("orders.placed", "sales.orders")
            .build()
            .unwrap();
        assert_eq!(c.subject_for("orders.placed"), "app.sales.orders");
        assert_eq!(c.subject_for("audit.login"), "app.audit.login");
        assert!(NatsConfig::builder("nats://h")
            .max_in_flight(0)
            .build()
            .is_err());
        assert!(NatsConfig::builder("http://h").build().is_err());
        assert!(NatsConfig::builder("").build().is_err());
        assert!(NatsConfig::builder("nats://h")
            .subject_prefix("a b")
            .build()
            .is_err());
        assert!(NatsConfig::builder("nats://h")
            .subject("orders", "orders.*")
            .build()
            .is_err());
        assert!(NatsConfig::builder("nats://h")
            .create_stream(StreamSpec::new("A.B", ["x"]))
            .build()
            .is_err());
        assert!(NatsConfig::builder("nats://h")
            .core()
            .create_stream(StreamSpec::new("S", ["x.>"]))
            .build()
            .is_err());
        let e = NatsConfig::builder("nats://h")
            .ack_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(!e.is_transient());
        assert!(NatsConfig::builder("nats://a:4222, nats://b:4222")
            .build()
            .is_ok());
    }

    #[test]
    fn from_env_reads_documented_variables() {
        let vars: BTreeMap<&str, &str> = [
            ("OUTBOX_NATS_URL", "nats://u:secret@h:4222"),
            ("OUTBOX_NATS_MODE", "core"),
            ("OUTBOX_NATS_MAX_IN_FLIGHT", "32"),
            ("OUTBOX_NATS_ACK_TIMEOUT_MS", "1500"),
            ("OUTBOX_NATS_SUBJECTS", "a.b=c.d, e=f"),
            ("OUTBOX_NATS_TOKEN", "tok"),
        ]
        .into_iter()
        .collect();
        let c = NatsConfig::from_lookup(|k| vars.get(k).map(|v| v.to_string())).unwrap();
        // from_vars reads the same; a misspelt name under the prefix is refused.
        let pairs = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(NatsConfig::from_vars(pairs.clone()).unwrap(), c);
        let typo = pairs.chain([("OUTBOX_NATS_ACK_TIMEOUT_MSS".to_string(), "1".to_string())]);
        let e = NatsConfig::from_vars(typo).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("OUTBOX_NATS_ACK_TIMEOUT_MSS"), "{e}");
        assert_eq!(c.mode, NatsMode::Core);
        assert_eq!(c.max_in_flight, 32);
        assert_eq!(c.ack_timeout, Duration::from_millis(1500));
        assert_eq!(c.subject_for("a.b"), "c.d");
        assert_eq!(c.subject_for("e"), "f");
        let debug = format!("{c:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(!debug.contains("tok\""), "{debug}");
        assert!(debug.contains("nats://u:***@h:4222"), "{debug}");

        let bad = |k: &'static str, v: &'static str| {
            NatsConfig::from_lookup(|name| (name == k).then(|| v.to_string())).unwrap_err()
        };
        assert_eq!(
            bad("OUTBOX_NATS_MAX_IN_FLIGHT", "many").kind(),
            ErrorKind::Config
        );
        assert_eq!(bad("OUTBOX_NATS_MODE", "fast").kind(), ErrorKind::Config);
        assert_eq!(
            bad("OUTBOX_NATS_STREAM_NAME", "S").kind(),
            ErrorKind::Config
        );
        let s = NatsConfig::from_lookup(|name| match name {
            "OUTBOX_NATS_STREAM_NAME" => Some("S".into()),
            "OUTBOX_NATS_STREAM_SUBJECTS" => Some("orders.>, audit.>".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            s.create_stream.unwrap().subjects,
            vec!["orders.>".to_string(), "audit.>".to_string()]
        );
    }

    #[test]
    fn redaction_hides_passwords_and_tokens() {
        assert_eq!(redact_url("nats://u:p@h:1/x"), "nats://u:***@h:1/x");
        assert_eq!(redact_url("nats://token@h"), "nats://***@h");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(
            redact_url("nats://a:b@h1,nats://c:d@h2"),
            "nats://a:***@h1,nats://c:***@h2"
        );
        assert_eq!(redact_url("u:p@h"), "u:***@h");
    }

    #[test]
    fn serde_round_trip() {
        let c = NatsConfig::builder("nats://h")
            .create_stream(StreamSpec::new("S", ["x.>"]))
            .build()
            .unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"ack_timeout_ms\":10000"), "{json}");
        assert!(json.contains("\"mode\":\"jetstream\""), "{json}");
        let back: NatsConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        let partial: NatsConfig = serde_json::from_str(r#"{"mode":"core"}"#).unwrap();
        assert_eq!(partial.mode, NatsMode::Core);
        assert_eq!(partial.max_in_flight, 1024);
    }
}
