//! The relay process's settings: read from a TOML file (optional) and from
//! `OUTBOX_RELAY_*` environment variables, which override the file.
//!
//! Every problem is one [`ConfigError`] naming where the bad value came from
//! (the variable, or the file and key) and what was expected.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use outbox_core::router::validate_pattern;
use outbox_core::{RelayConfig, RetryPolicy};
use outbox_sqlx::TableName;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::database::DatabaseUrl;
use crate::redact::{redact_url, url_secrets};
use crate::target::{RouteError, Target};

/// Prefix of every environment variable the relay reads.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";

/// The default address of the `/metrics` and `/health` endpoints.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";

/// Every setting: its key in the config file (the variable is
/// `OUTBOX_RELAY_` + the key in upper case) and what it means.
pub const SETTINGS: &[(&str, &str)] = &[
    (
        "config",
        "path of a TOML config file (environment only; or --config FILE)",
    ),
    (
        "database_url",
        "postgres://, mysql:// or sqlite:// URL of the outbox database",
    ),
    ("table", "outbox table, optionally schema-qualified"),
    (
        "routes",
        "pattern=transport-url pairs; the first match wins",
    ),
    ("batch_size", "most messages per claim"),
    ("lease_ms", "how long a claim is held"),
    ("poll_interval_ms", "how often an idle relay looks for work"),
    (
        "min_poll_interval_ms",
        "how soon it looks again after finding work (doubling to poll_interval_ms)",
    ),
    (
        "max_attempts",
        "failed attempts before a message is dead-lettered",
    ),
    ("retry_initial_ms", "backoff after the first failure"),
    ("retry_cap_ms", "longest backoff"),
    ("max_in_flight", "most messages per transport call"),
    (
        "shutdown_timeout_ms",
        "how long stopping waits for an in-flight publish",
    ),
    ("listen", "address of /metrics and /health, or off"),
    ("log", "tracing filter"),
    ("migrate", "create the outbox tables at start"),
    ("relay_id", "lease owner name"),
    (
        "keep_delivered",
        "keep delivered rows instead of deleting them",
    ),
    (
        "retention_ms",
        "with keep_delivered: how long delivered rows are kept before they are purged; 0 = never",
    ),
    (
        "hold_dead_letters",
        "a dead letter blocks later messages of its key",
    ),
    ("listen_notify", "PostgreSQL: LISTEN for enqueue NOTIFYs"),
    ("db_max_connections", "database pool size"),
    (
        "connect_timeout_ms",
        "how long connecting to the database may take",
    ),
    (
        "unhealthy_after_ms",
        "how long a transport may keep failing before /health answers 503",
    ),
];

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// An environment variable (its name).
    Env(String),
    /// A key of the config file.
    File {
        /// The file as given.
        path: String,
        /// The key.
        key: String,
    },
    /// The built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Env(name) => f.write_str(name),
            Origin::File { path, key } => write!(f, "{path}: {key}"),
            Origin::Default => f.write_str("default"),
        }
    }
}

/// A configuration problem. Its `Display` is the one line the process prints.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The command line is wrong.
    #[error("{0} (try --help)")]
    Usage(String),
    /// The config file cannot be read or parsed.
    #[error("config file {path}: {reason}")]
    File {
        /// The file as given.
        path: String,
        /// What is wrong (with line and column for syntax errors).
        reason: String,
    },
    /// An `OUTBOX_RELAY_*` variable the relay does not know (a typo?).
    #[error("{name}: unknown setting (known: {known})")]
    UnknownVariable {
        /// The variable.
        name: String,
        /// The known variables, comma-separated.
        known: String,
    },
    /// No database URL anywhere.
    #[error("no database URL: set {ENV_PREFIX}DATABASE_URL or database_url in the config file")]
    MissingDatabaseUrl,
    /// The database URL is malformed or names an engine this binary lacks.
    #[error("{origin}: {reason}")]
    InvalidDatabaseUrl {
        /// Where it came from.
        origin: Origin,
        /// What is wrong.
        reason: String,
    },
    /// The table name is not a valid (optionally schema-qualified) identifier.
    #[error("{origin}: {reason}")]
    InvalidTable {
        /// Where it came from.
        origin: Origin,
        /// What is wrong.
        reason: String,
    },
    /// A value does not parse.
    #[error("{origin}: {value:?} is not {expected}")]
    InvalidValue {
        /// Where it came from.
        origin: Origin,
        /// The value as written (cut to 80 characters).
        value: String,
        /// What was expected (`a whole number`, `true or false`, ...).
        expected: &'static str,
    },
    /// A value parses but is out of range.
    #[error("{origin}: {reason}")]
    OutOfRange {
        /// Where it came from.
        origin: Origin,
        /// The rule it breaks.
        reason: String,
    },
    /// No route anywhere.
    #[error("no routes: set {ENV_PREFIX}ROUTES (\"pattern=url;pattern=url\") or a [routes] table in the config file")]
    NoRoutes,
    /// A route is malformed or names a transport URL that is.
    #[error("{origin}: route {route:?}: {error}")]
    Route {
        /// Where it came from.
        origin: Origin,
        /// The route's pattern (or the whole entry when it has no `=`).
        route: String,
        /// What is wrong.
        error: Box<RouteError>,
    },
}

/// One route: topics matching `pattern` go to `target`.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    /// The topic pattern (`orders.*`, `audit.>`, `>`).
    pub pattern: String,
    /// The transport.
    pub target: Target,
}

/// The relay process's settings, validated.
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// The outbox database.
    pub database: DatabaseUrl,
    /// The outbox table.
    pub table: TableName,
    /// Routes in order; the first match wins.
    pub routes: Vec<RouteSpec>,
    /// Most messages per claim.
    pub batch_size: usize,
    /// Claim lease.
    pub lease: Duration,
    /// Idle poll interval.
    pub poll_interval: Duration,
    /// Poll wait after a claim that found messages.
    pub min_poll_interval: Duration,
    /// Failed attempts before dead-lettering.
    pub max_attempts: u32,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_cap: Duration,
    /// Most messages per transport call.
    pub max_in_flight: usize,
    /// How long stopping waits for an in-flight publish.
    pub shutdown_timeout: Duration,
    /// Address of `/metrics` and `/health`; `None` when off.
    pub listen: Option<SocketAddr>,
    /// tracing filter directives.
    pub log: String,
    /// Run migrations at start.
    pub migrate: bool,
    /// Lease owner name; generated when `None`.
    pub relay_id: Option<String>,
    /// Keep delivered rows.
    pub keep_delivered: bool,
    /// With `keep_delivered`: how long delivered rows are kept before the
    /// relay purges them; `None` never purges.
    pub retention: Option<Duration>,
    /// Dead letters block their key.
    pub hold_dead_letters: bool,
    /// PostgreSQL LISTEN for NOTIFY wakeups.
    pub listen_notify: bool,
    /// Database pool size.
    pub db_max_connections: u32,
    /// Connect timeout for the database and the brokers.
    pub connect_timeout: Duration,
    /// How long every publish of a transport may fail before `/health`
    /// reports it.
    pub unhealthy_after: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database", &self.database)
            .field("table", &self.table)
            .field("routes", &self.routes)
            .field("batch_size", &self.batch_size)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .field("min_poll_interval", &self.min_poll_interval)
            .field("max_attempts", &self.max_attempts)
            .field("retry_initial", &self.retry_initial)
            .field("retry_cap", &self.retry_cap)
            .field("max_in_flight", &self.max_in_flight)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("listen", &self.listen)
            .field("log", &self.log)
            .field("migrate", &self.migrate)
            .field("relay_id", &self.relay_id)
            .field("keep_delivered", &self.keep_delivered)
            .field("retention", &self.retention)
            .field("hold_dead_letters", &self.hold_dead_letters)
            .field("listen_notify", &self.listen_notify)
            .field("db_max_connections", &self.db_max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("unhealthy_after", &self.unhealthy_after)
            .finish()
    }
}

/// The config file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    table: Option<String>,
    routes: Option<Routes>,
    batch_size: Option<u64>,
    lease_ms: Option<u64>,
    poll_interval_ms: Option<u64>,
    min_poll_interval_ms: Option<u64>,
    max_attempts: Option<u64>,
    retry_initial_ms: Option<u64>,
    retry_cap_ms: Option<u64>,
    max_in_flight: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    listen: Option<String>,
    log: Option<String>,
    migrate: Option<bool>,
    relay_id: Option<String>,
    keep_delivered: Option<bool>,
    retention_ms: Option<u64>,
    hold_dead_letters: Option<bool>,
    listen_notify: Option<bool>,
    db_max_connections: Option<u64>,
    connect_timeout_ms: Option<u64>,
    unhealthy_after_ms: Option<u64>,
}

/// `[routes]` entries in file order.
#[derive(Debug, Default)]
struct Routes(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Routes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Routes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of \"pattern\" = \"transport URL\" entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Routes, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    out.push((k, v));
                }
                Ok(Routes(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A raw value and where it came from.
struct Raw<T> {
    value: T,
    origin: Origin,
}

/// The sources of one load: `OUTBOX_RELAY_*` variables and the file.
struct Sources {
    env: BTreeMap<String, String>,
    file: FileConfig,
    path: String,
}

impl Sources {
    fn env_name(key: &str) -> String {
        format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
    }

    fn file_origin(&self, key: &str) -> Origin {
        Origin::File {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }

    /// A string setting: the variable, else the file.
    fn string(&self, key: &str, file: Option<&String>) -> Option<Raw<String>> {
        let name = Self::env_name(key);
        if let Some(v) = self.env.get(&name) {
            return Some(Raw {
                value: v.clone(),
                origin: Origin::Env(name),
            });
        }
        file.map(|v| Raw {
            value: v.clone(),
            origin: self.file_origin(key),
        })
    }

    /// A whole number setting.
    fn number(&self, key: &str, file: Option<u64>) -> Result<Option<Raw<u64>>, ConfigError> {
        let name = Self::env_name(key);
        if let Some(v) = self.env.get(&name) {
            let value = v
                .trim()
                .parse::<u64>()
                .map_err(|_| ConfigError::InvalidValue {
                    origin: Origin::Env(name.clone()),
                    value: cut(v),
                    expected: "a whole number",
                })?;
            return Ok(Some(Raw {
                value,
                origin: Origin::Env(name),
            }));
        }
        Ok(file.map(|value| Raw {
            value,
            origin: self.file_origin(key),
        }))
    }

    /// A boolean setting.
    fn boolean(&self, key: &str, file: Option<bool>) -> Result<Option<bool>, ConfigError> {
        let name = Self::env_name(key);
        if let Some(v) = self.env.get(&name) {
            return match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(Some(true)),
                "0" | "false" | "no" | "off" => Ok(Some(false)),
                _ => Err(ConfigError::InvalidValue {
                    origin: Origin::Env(name),
                    value: cut(v),
                    expected: "true or false",
                }),
            };
        }
        Ok(file)
    }
}

fn cut(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A number within `min..=max`, or the default.
fn ranged<T: TryFrom<u64> + Copy>(
    raw: Option<Raw<u64>>,
    default: T,
    min: u64,
    max: u64,
    what: &str,
) -> Result<T, ConfigError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    if raw.value < min || raw.value > max {
        let reason = if max == u64::MAX {
            format!("{what} must be at least {min} (got {})", raw.value)
        } else {
            format!("{what} must be between {min} and {max} (got {})", raw.value)
        };
        return Err(ConfigError::OutOfRange {
            origin: raw.origin,
            reason,
        });
    }
    T::try_from(raw.value).map_err(|_| ConfigError::OutOfRange {
        origin: raw.origin,
        reason: format!("{what} is too large"),
    })
}

/// How long kept delivered rows stay by default: 7 days.
const DEFAULT_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// The longest duration setting, in ms: 7 days (the relay refuses longer).
const MAX_MS: u64 = 7 * 24 * 3600 * 1000;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Parses `OUTBOX_RELAY_ROUTES`: `pattern=url` entries separated by `;` or
/// new lines.
fn env_routes(value: &str) -> Vec<(String, String)> {
    value
        .split([';', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| match entry.split_once('=') {
            Some((p, u)) => (p.trim().to_string(), u.trim().to_string()),
            // No separator: reported by `route` below.
            None => (entry.to_string(), String::new()),
        })
        .collect()
}

fn route(origin: &Origin, pattern: &str, url: &str) -> Result<RouteSpec, ConfigError> {
    let fail = |error: RouteError| ConfigError::Route {
        origin: origin.clone(),
        route: cut(pattern),
        error: Box::new(error),
    };
    if url.is_empty() {
        return Err(fail(RouteError::MissingSeparator));
    }
    validate_pattern(pattern).map_err(|e| fail(RouteError::InvalidPattern(e.to_string())))?;
    let target = Target::parse(url).map_err(fail)?;
    Ok(RouteSpec {
        pattern: pattern.to_string(),
        target,
    })
}

impl Config {
    /// Loads the configuration from the process environment and the config
    /// file (`file`, else `OUTBOX_RELAY_CONFIG`, else none).
    pub fn from_env(file: Option<&Path>) -> Result<Config, ConfigError> {
        // Variables that are not UTF-8 are not ours: skip them.
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        Self::load(file, vars)
    }

    /// Loads the configuration from the given variables (only `OUTBOX_RELAY_*`
    /// ones are read; empty values count as unset) and the config file
    /// (`file`, else the `OUTBOX_RELAY_CONFIG` variable, else none).
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env = relay_vars(vars)?;
        let path: Option<PathBuf> = file
            .map(Path::to_path_buf)
            .or_else(|| env.get(&format!("{ENV_PREFIX}CONFIG")).map(PathBuf::from));
        let (text, shown) = match &path {
            Some(p) => {
                let shown = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::File {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?;
                (Some(text), shown)
            }
            None => (None, String::new()),
        };
        Self::from_parts(text.as_deref(), &shown, env)
    }

    /// Loads the configuration from TOML text (`path` is only used in
    /// messages) and variables, as [`load`](Self::load) does with a file.
    pub fn from_toml(
        text: &str,
        path: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::from_parts(Some(text), path, relay_vars(vars)?)
    }

    fn from_parts(
        text: Option<&str>,
        path: &str,
        env: BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let file = match text {
            Some(text) => toml::from_str::<FileConfig>(text).map_err(|e| ConfigError::File {
                path: path.to_string(),
                reason: toml_reason(text, &e),
            })?,
            None => FileConfig::default(),
        };
        let s = Sources {
            env,
            file,
            path: path.to_string(),
        };
        let f = &s.file;
        let defaults = RelayConfig::default();

        let database =
            match s.string("database_url", f.database_url.as_ref()) {
                Some(raw) if !raw.value.trim().is_empty() => DatabaseUrl::parse(&raw.value)
                    .map_err(|reason| ConfigError::InvalidDatabaseUrl {
                        origin: raw.origin,
                        reason,
                    })?,
                _ => return Err(ConfigError::MissingDatabaseUrl),
            };

        let table = match s.string("table", f.table.as_ref()) {
            Some(raw) => {
                TableName::parse(raw.value.trim()).map_err(|e| ConfigError::InvalidTable {
                    origin: raw.origin,
                    reason: e.message().to_string(),
                })?
            }
            None => TableName::default(),
        };

        let env_routes_name = Sources::env_name("routes");
        let (route_origin, entries): (Origin, Vec<(String, String)>) =
            match s.env.get(&env_routes_name) {
                Some(v) => (Origin::Env(env_routes_name), env_routes(v)),
                None => (
                    s.file_origin("routes"),
                    f.routes.as_ref().map(|r| r.0.clone()).unwrap_or_default(),
                ),
            };
        if entries.is_empty() {
            return Err(ConfigError::NoRoutes);
        }
        let mut routes = Vec::with_capacity(entries.len());
        for (pattern, url) in &entries {
            // A classic TOML slip: a setting written after the [routes] header
            // belongs to the routes table.
            if matches!(route_origin, Origin::File { .. })
                && SETTINGS.iter().any(|(k, _)| k == pattern)
            {
                return Err(ConfigError::File {
                    path: s.path.clone(),
                    reason: format!(
                        "routes.{pattern}: {pattern:?} is a setting, not a route pattern; \
                         put the settings before the [routes] table"
                    ),
                });
            }
            let origin = match &route_origin {
                Origin::File { path, .. } => Origin::File {
                    path: path.clone(),
                    key: format!("routes.{pattern:?}"),
                },
                o => o.clone(),
            };
            routes.push(route(&origin, pattern.trim(), url.trim())?);
        }

        let batch_size = ranged(
            s.number("batch_size", f.batch_size)?,
            defaults.batch_size,
            1,
            1_000_000,
            "batch_size",
        )?;
        let lease_ms = ranged(
            s.number("lease_ms", f.lease_ms)?,
            millis(defaults.lease),
            10,
            MAX_MS,
            "lease_ms",
        )?;
        let poll_ms = ranged(
            s.number("poll_interval_ms", f.poll_interval_ms)?,
            millis(defaults.poll_interval),
            1,
            MAX_MS,
            "poll_interval_ms",
        )?;
        let min_poll_ms = ranged(
            s.number("min_poll_interval_ms", f.min_poll_interval_ms)?,
            millis(defaults.min_poll_interval),
            1,
            MAX_MS,
            "min_poll_interval_ms",
        )?;
        let max_attempts = ranged(
            s.number("max_attempts", f.max_attempts)?,
            defaults.max_attempts,
            1,
            u64::from(u32::MAX),
            "max_attempts",
        )?;
        let retry_initial_raw = s.number("retry_initial_ms", f.retry_initial_ms)?;
        let retry_cap_raw = s.number("retry_cap_ms", f.retry_cap_ms)?;
        let cap_origin = retry_cap_raw.as_ref().map(|r| r.origin.clone());
        let initial_origin = retry_initial_raw.as_ref().map(|r| r.origin.clone());
        let retry_initial = ranged(
            retry_initial_raw,
            millis(defaults.retry.initial),
            1,
            MAX_MS,
            "retry_initial_ms",
        )?;
        let retry_cap = ranged(
            retry_cap_raw,
            millis(defaults.retry.cap),
            1,
            MAX_MS,
            "retry_cap_ms",
        )?;
        if retry_cap < retry_initial {
            return Err(ConfigError::OutOfRange {
                origin: cap_origin.or(initial_origin).unwrap_or(Origin::Default),
                reason: format!(
                    "retry_cap_ms ({retry_cap}) must not be less than retry_initial_ms ({retry_initial})"
                ),
            });
        }
        let max_in_flight = ranged(
            s.number("max_in_flight", f.max_in_flight)?,
            defaults.max_in_flight,
            1,
            1_000_000,
            "max_in_flight",
        )?;
        let shutdown_ms = ranged(
            s.number("shutdown_timeout_ms", f.shutdown_timeout_ms)?,
            millis(defaults.shutdown_timeout),
            0,
            MAX_MS,
            "shutdown_timeout_ms",
        )?;
        // Up to ten years: a window that long is for audit, not a mistake.
        let retention_ms = ranged(
            s.number("retention_ms", f.retention_ms)?,
            DEFAULT_RETENTION_MS,
            0,
            3_650 * 24 * 3_600 * 1_000,
            "retention_ms",
        )?;
        let db_max_connections = ranged(
            s.number("db_max_connections", f.db_max_connections)?,
            5u32,
            2,
            1000,
            "db_max_connections",
        )?;
        let connect_ms = ranged(
            s.number("connect_timeout_ms", f.connect_timeout_ms)?,
            5_000u64,
            1,
            MAX_MS,
            "connect_timeout_ms",
        )?;
        let unhealthy_ms = ranged(
            s.number("unhealthy_after_ms", f.unhealthy_after_ms)?,
            60_000u64,
            1,
            MAX_MS,
            "unhealthy_after_ms",
        )?;

        let listen = match s.string("listen", f.listen.as_ref()) {
            None => Some(SocketAddr::from_str(DEFAULT_LISTEN).map_err(|_| {
                ConfigError::InvalidValue {
                    origin: Origin::Default,
                    value: DEFAULT_LISTEN.to_string(),
                    expected: "an address",
                }
            })?),
            Some(raw) if raw.value.trim().eq_ignore_ascii_case("off") => None,
            Some(raw) => Some(SocketAddr::from_str(raw.value.trim()).map_err(|_| {
                ConfigError::InvalidValue {
                    origin: raw.origin,
                    value: cut(&raw.value),
                    expected: "an address like 127.0.0.1:9187 (or off)",
                }
            })?),
        };

        let log = match s.string("log", f.log.as_ref()) {
            Some(raw) => {
                let value = raw.value.trim().to_string();
                if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&value) {
                    return Err(ConfigError::OutOfRange {
                        origin: raw.origin,
                        reason: format!("{:?} is not a valid log filter: {e}", cut(&value)),
                    });
                }
                value
            }
            None => "info".to_string(),
        };

        let relay_id = match s.string("relay_id", f.relay_id.as_ref()) {
            Some(raw) => {
                let v = raw.value.trim().to_string();
                if v.is_empty() || v.len() > 200 || v.chars().any(char::is_control) {
                    return Err(ConfigError::OutOfRange {
                        origin: raw.origin,
                        reason: "relay_id must be 1 to 200 characters without control characters"
                            .to_string(),
                    });
                }
                Some(v)
            }
            None => None,
        };

        Ok(Config {
            database,
            table,
            routes,
            batch_size,
            lease: Duration::from_millis(lease_ms),
            poll_interval: Duration::from_millis(poll_ms),
            min_poll_interval: Duration::from_millis(min_poll_ms),
            max_attempts,
            retry_initial: Duration::from_millis(retry_initial),
            retry_cap: Duration::from_millis(retry_cap),
            max_in_flight,
            shutdown_timeout: Duration::from_millis(shutdown_ms),
            listen,
            log,
            migrate: s.boolean("migrate", f.migrate)?.unwrap_or(true),
            relay_id,
            keep_delivered: s
                .boolean("keep_delivered", f.keep_delivered)?
                .unwrap_or(false),
            retention: (retention_ms > 0).then(|| Duration::from_millis(retention_ms)),
            hold_dead_letters: s
                .boolean("hold_dead_letters", f.hold_dead_letters)?
                .unwrap_or(false),
            listen_notify: s.boolean("listen_notify", f.listen_notify)?.unwrap_or(true),
            db_max_connections,
            connect_timeout: Duration::from_millis(connect_ms),
            unhealthy_after: Duration::from_millis(unhealthy_ms),
        })
    }

    /// The retry policy (exponential, doubling, with the default jitter).
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::exponential(self.retry_initial, 2.0, self.retry_cap)
    }

    /// Every secret the configuration holds (passwords and tokens in the
    /// URLs), so that error lines can be scrubbed of them.
    pub fn secrets(&self) -> Vec<String> {
        let mut all = url_secrets(self.database.url());
        for r in &self.routes {
            all.extend(url_secrets(r.target.url()));
        }
        all.sort();
        all.dedup();
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
        all
    }

    /// A one-line summary of the routes with credentials hidden
    /// (`orders.* -> kafka://127.0.0.1:9092; > -> amqp://guest:***@...`).
    pub fn routes_summary(&self) -> String {
        self.routes
            .iter()
            .map(|r| format!("{} -> {}", r.pattern, redact_url(r.target.url())))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The `OUTBOX_RELAY_*` variables with a value; an unknown name is an error.
fn relay_vars(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut env = BTreeMap::new();
    for (name, value) in vars {
        let Some(key) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let known = SETTINGS.iter().any(|(k, _)| k.to_ascii_uppercase() == key);
        if !known {
            return Err(ConfigError::UnknownVariable {
                name: cut(&name),
                known: SETTINGS
                    .iter()
                    .map(|(k, _)| k.to_ascii_uppercase())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if !value.trim().is_empty() {
            env.insert(name, value);
        }
    }
    Ok(env)
}

/// A TOML error as one line: `line L, column C: message`.
fn toml_reason(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}
