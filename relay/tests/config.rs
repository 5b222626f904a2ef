#![allow(clippy::unwrap_used)]
//! Configuration parsing: environment, file, overrides, and every kind of
//! bad input with its exact error.

use std::net::SocketAddr;
use std::time::Duration;

use outbox_nats::NatsMode;
use outbox_redis::RedisMode;
use outbox_relay::config::RouteSpec;
use outbox_relay::{Config, ConfigError, Engine, Origin, RouteError, Scheme, TargetConfig};

const DB: &str = "postgres://postgres:s3cr3t@127.0.0.1:5432/test";

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::load(None, vars(pairs))
}

/// The minimum plus `extra`.
fn with(extra: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut all = vec![
        ("OUTBOX_RELAY_DATABASE_URL", DB),
        ("OUTBOX_RELAY_ROUTES", ">=nats://127.0.0.1:4222"),
    ];
    for (k, v) in extra {
        all.retain(|(n, _)| n != k);
        all.push((k, v));
    }
    env(&all)
}

fn err(extra: &[(&str, &str)]) -> String {
    with(extra).unwrap_err().to_string()
}

fn patterns(routes: &[RouteSpec]) -> Vec<&str> {
    routes.iter().map(|r| r.pattern.as_str()).collect()
}

#[test]
fn environment_only() {
    let c = env(&[
        ("OUTBOX_RELAY_DATABASE_URL", DB),
        ("OUTBOX_RELAY_TABLE", "app.outbox"),
        (
            "OUTBOX_RELAY_ROUTES",
            "orders.* = kafka://127.0.0.1:9092 ; notifications.>=nats://127.0.0.1:4222?mode=core;\
             audit.>=redis://127.0.0.1:6379?mode=pubsub;>=amqp://guest:guest@127.0.0.1:5672/%2f?exchange=events",
        ),
        ("OUTBOX_RELAY_BATCH_SIZE", "250"),
        ("OUTBOX_RELAY_LEASE_MS", "15000"),
        ("OUTBOX_RELAY_POLL_INTERVAL_MS", "250"),
        ("OUTBOX_RELAY_MIN_POLL_INTERVAL_MS", "20"),
        ("OUTBOX_RELAY_MAX_ATTEMPTS", "7"),
        ("OUTBOX_RELAY_RETRY_INITIAL_MS", "200"),
        ("OUTBOX_RELAY_RETRY_CAP_MS", "60000"),
        ("OUTBOX_RELAY_MAX_IN_FLIGHT", "64"),
        ("OUTBOX_RELAY_SHUTDOWN_TIMEOUT_MS", "3000"),
        ("OUTBOX_RELAY_LISTEN", "0.0.0.0:9999"),
        ("OUTBOX_RELAY_LOG", "info,outbox_core=debug"),
        ("OUTBOX_RELAY_MIGRATE", "false"),
        ("OUTBOX_RELAY_RELAY_ID", "relay-a"),
        ("OUTBOX_RELAY_KEEP_DELIVERED", "yes"),
        ("OUTBOX_RELAY_RETENTION_MS", "3600000"),
        ("OUTBOX_RELAY_HOLD_DEAD_LETTERS", "1"),
        ("OUTBOX_RELAY_LISTEN_NOTIFY", "off"),
        ("OUTBOX_RELAY_DB_MAX_CONNECTIONS", "8"),
        ("OUTBOX_RELAY_CONNECT_TIMEOUT_MS", "1500"),
        ("UNRELATED", "ignored"),
    ])
    .unwrap();
    assert_eq!(c.database.engine(), Engine::Postgres);
    assert_eq!(c.table.to_string(), "app.outbox");
    assert_eq!(
        patterns(&c.routes),
        ["orders.*", "notifications.>", "audit.>", ">"]
    );
    let schemes: Vec<Scheme> = c.routes.iter().map(|r| r.target.scheme()).collect();
    assert_eq!(
        schemes,
        [Scheme::Kafka, Scheme::Nats, Scheme::Redis, Scheme::Amqp]
    );
    assert_eq!(c.batch_size, 250);
    assert_eq!(c.lease, Duration::from_secs(15));
    assert_eq!(c.poll_interval, Duration::from_millis(250));
    assert_eq!(c.min_poll_interval, Duration::from_millis(20));
    assert_eq!(c.max_attempts, 7);
    assert_eq!(c.retry_initial, Duration::from_millis(200));
    assert_eq!(c.retry_cap, Duration::from_secs(60));
    assert_eq!(c.max_in_flight, 64);
    assert_eq!(c.shutdown_timeout, Duration::from_secs(3));
    assert_eq!(
        c.listen,
        Some("0.0.0.0:9999".parse::<SocketAddr>().unwrap())
    );
    assert_eq!(c.log, "info,outbox_core=debug");
    assert!(!c.migrate);
    assert_eq!(c.relay_id.as_deref(), Some("relay-a"));
    assert!(c.keep_delivered);
    assert_eq!(c.retention, Some(Duration::from_secs(3600)));
    assert!(c.hold_dead_letters);
    assert!(!c.listen_notify);
    assert_eq!(c.db_max_connections, 8);
    assert_eq!(c.connect_timeout, Duration::from_millis(1500));
    let p = c.retry_policy();
    assert_eq!(p.initial, Duration::from_millis(200));
    assert_eq!(p.cap, Duration::from_secs(60));
}

#[test]
fn defaults() {
    let c = with(&[]).unwrap();
    assert_eq!(c.table.to_string(), "outbox_messages");
    assert_eq!(c.batch_size, 500);
    assert_eq!(c.lease, Duration::from_secs(30));
    assert_eq!(c.poll_interval, Duration::from_secs(1));
    assert_eq!(c.min_poll_interval, Duration::from_millis(5));
    assert_eq!(c.max_attempts, 10);
    assert_eq!(c.retry_initial, Duration::from_millis(500));
    assert_eq!(c.retry_cap, Duration::from_secs(300));
    assert_eq!(c.max_in_flight, 1000);
    assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(c.listen, Some("127.0.0.1:9187".parse().unwrap()));
    assert_eq!(c.log, "info");
    assert!(c.migrate);
    assert!(c.relay_id.is_none());
    assert!(!c.keep_delivered);
    assert_eq!(c.retention, Some(Duration::from_secs(7 * 24 * 3600)));
    assert!(!c.hold_dead_letters);
    assert!(c.listen_notify);
    assert_eq!(c.db_max_connections, 5);
    let never = with(&[("OUTBOX_RELAY_RETENTION_MS", "0")]).unwrap();
    assert_eq!(never.retention, None, "0 keeps delivered rows for good");
    assert_eq!(c.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.unhealthy_after, Duration::from_secs(60));
    // Empty values count as unset.
    let c = with(&[("OUTBOX_RELAY_BATCH_SIZE", " "), ("OUTBOX_RELAY_TABLE", "")]).unwrap();
    assert_eq!(c.batch_size, 500);
    assert_eq!(c.table.to_string(), "outbox_messages");
    assert_eq!(
        with(&[("OUTBOX_RELAY_LISTEN", "off")]).unwrap().listen,
        None
    );
}

const FILE: &str = r#"
# routes keep their order: the first match wins
database_url = "postgres://postgres:filepass@127.0.0.1:5432/test"
table = "relay.outbox"
batch_size = 100
lease_ms = 20000
poll_interval_ms = 500
min_poll_interval_ms = 50
max_attempts = 5
retry_initial_ms = 100
retry_cap_ms = 10000
max_in_flight = 50
shutdown_timeout_ms = 2000
listen = "127.0.0.1:9300"
log = "warn"
migrate = false
relay_id = "file-relay"
keep_delivered = true
hold_dead_letters = true
listen_notify = false
db_max_connections = 3
connect_timeout_ms = 2500
unhealthy_after_ms = 15000

[routes]
"orders.*" = "kafka://127.0.0.1:9092?linger_ms=20&property.compression.type=zstd"
"audit.>" = "redis://127.0.0.1:6379/0?prefix=app:&maxlen=1000"
"notifications.>" = "nats://127.0.0.1:4222?mode=core&max_in_flight=8"
">" = "amqp://guest:guest@127.0.0.1:5672/%2f?exchange=outbox&heartbeat=10"
"#;

#[test]
fn file_only_keeps_route_order_and_maps_options() {
    let c = Config::from_toml(FILE, "relay.toml", vars(&[])).unwrap();
    assert_eq!(c.table.to_string(), "relay.outbox");
    assert_eq!(
        patterns(&c.routes),
        ["orders.*", "audit.>", "notifications.>", ">"]
    );
    assert_eq!(c.batch_size, 100);
    assert_eq!(c.lease, Duration::from_secs(20));
    assert_eq!(c.poll_interval, Duration::from_millis(500));
    assert_eq!(c.min_poll_interval, Duration::from_millis(50));
    assert_eq!(c.max_attempts, 5);
    assert_eq!(c.retry_initial, Duration::from_millis(100));
    assert_eq!(c.retry_cap, Duration::from_secs(10));
    assert_eq!(c.max_in_flight, 50);
    assert_eq!(c.shutdown_timeout, Duration::from_secs(2));
    assert_eq!(c.listen, Some("127.0.0.1:9300".parse().unwrap()));
    assert_eq!(c.log, "warn");
    assert!(!c.migrate);
    assert_eq!(c.relay_id.as_deref(), Some("file-relay"));
    assert!(c.keep_delivered && c.hold_dead_letters && !c.listen_notify);
    assert_eq!(c.db_max_connections, 3);
    assert_eq!(c.connect_timeout, Duration::from_millis(2500));
    assert_eq!(c.unhealthy_after, Duration::from_secs(15));

    match c.routes[0].target.config() {
        TargetConfig::Kafka(k) => {
            assert_eq!(k.brokers, "127.0.0.1:9092");
            assert_eq!(k.linger, Duration::from_millis(20));
            assert_eq!(
                k.properties.get("compression.type").map(String::as_str),
                Some("zstd")
            );
        }
        other => panic!("{other:?}"),
    }
    match c.routes[1].target.config() {
        TargetConfig::Redis(r) => {
            assert_eq!(r.url, "redis://127.0.0.1:6379/0");
            assert_eq!(r.mode, RedisMode::Streams);
            assert_eq!(r.prefix, "app:");
            assert_eq!(r.maxlen, Some(1000));
        }
        other => panic!("{other:?}"),
    }
    match c.routes[2].target.config() {
        TargetConfig::Nats(n) => {
            assert_eq!(n.url, "nats://127.0.0.1:4222");
            assert_eq!(n.mode, NatsMode::Core);
            assert_eq!(n.max_in_flight, 8);
        }
        other => panic!("{other:?}"),
    }
    match c.routes[3].target.config() {
        TargetConfig::Amqp(a) => {
            // lapin's own option stays in the URL, the relay's is taken out.
            assert_eq!(a.url, "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10");
            assert_eq!(a.exchange, "outbox");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn environment_overrides_the_file() {
    let c = Config::from_toml(
        FILE,
        "relay.toml",
        vars(&[
            ("OUTBOX_RELAY_BATCH_SIZE", "42"),
            ("OUTBOX_RELAY_MIGRATE", "true"),
            ("OUTBOX_RELAY_ROUTES", "x.>=redis://127.0.0.1:6379"),
        ]),
    )
    .unwrap();
    assert_eq!(c.batch_size, 42);
    assert!(c.migrate);
    // The variable replaces the file's routes entirely.
    assert_eq!(patterns(&c.routes), ["x.>"]);
    // Everything else still comes from the file.
    assert_eq!(c.max_attempts, 5);
    assert_eq!(c.table.to_string(), "relay.outbox");
}

#[test]
fn file_from_argument_or_variable() {
    let dir = std::env::temp_dir().join(format!("outbox-relay-cfg-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a.toml");
    let b = dir.join("b.toml");
    std::fs::write(&a, FILE).unwrap();
    std::fs::write(&b, FILE.replace("batch_size = 100", "batch_size = 7")).unwrap();

    let by_var = Config::load(None, vars(&[("OUTBOX_RELAY_CONFIG", b.to_str().unwrap())])).unwrap();
    assert_eq!(by_var.batch_size, 7);
    // --config wins over OUTBOX_RELAY_CONFIG.
    let by_arg = Config::load(
        Some(&a),
        vars(&[("OUTBOX_RELAY_CONFIG", b.to_str().unwrap())]),
    )
    .unwrap();
    assert_eq!(by_arg.batch_size, 100);

    let missing = dir.join("missing.toml");
    let e = Config::load(Some(&missing), vars(&[])).unwrap_err();
    assert!(matches!(e, ConfigError::File { .. }), "{e:?}");
    assert!(e.to_string().starts_with(&format!(
        "config file {}: No such file or directory",
        missing.display()
    )));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_files() {
    let bad = |text: &str| Config::from_toml(text, "r.toml", vars(&[])).unwrap_err();
    let e = bad("database_url = \"postgres://h/db\"\nbatch_size = \n");
    assert!(matches!(e, ConfigError::File { .. }));
    assert!(
        e.to_string()
            .starts_with("config file r.toml: line 2, column "),
        "{e}"
    );
    let e = bad("database_url = \"postgres://h/db\"\nbatch_sise = 5\n");
    assert!(
        e.to_string()
            .starts_with("config file r.toml: line 2, column 1: unknown field `batch_sise`"),
        "{e}"
    );
    let e = bad("database_url = \"postgres://h/db\"\nbatch_size = \"ten\"\n");
    assert!(
        e.to_string()
            .starts_with("config file r.toml: line 2, column 14: invalid type: string \"ten\""),
        "{e}"
    );
    let e = bad("batch_size = -1\n");
    assert!(e.to_string().contains("line 1"), "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");
    // Values from the file are named by file and key.
    let e = bad(
        "database_url = \"postgres://h/db\"\nbatch_size = 0\n[routes]\n\">\" = \"nats://h:4222\"\n",
    );
    assert_eq!(
        e,
        ConfigError::OutOfRange {
            origin: Origin::File {
                path: "r.toml".into(),
                key: "batch_size".into()
            },
            reason: "batch_size must be between 1 and 1000000 (got 0)".into()
        }
    );
    let e =
        bad("database_url = \"postgres://h/db\"\n[routes]\n\"orders.*\" = \"kafak://h:9092\"\n");
    assert_eq!(
        e.to_string(),
        "r.toml: routes.\"orders.*\": route \"orders.*\": unknown transport scheme \"kafak\" (expected nats, amqp, kafka, redis)"
    );
}

#[test]
fn missing_settings() {
    assert_eq!(
        env(&[("OUTBOX_RELAY_ROUTES", ">=nats://h:4222")]).unwrap_err(),
        ConfigError::MissingDatabaseUrl
    );
    assert_eq!(
        ConfigError::MissingDatabaseUrl.to_string(),
        "no database URL: set OUTBOX_RELAY_DATABASE_URL or database_url in the config file"
    );
    assert_eq!(
        env(&[("OUTBOX_RELAY_DATABASE_URL", DB)]).unwrap_err(),
        ConfigError::NoRoutes
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_ROUTES", " ; ")]),
        ConfigError::NoRoutes.to_string()
    );
}

#[test]
fn bad_routes() {
    let route_err = |routes: &str| match with(&[("OUTBOX_RELAY_ROUTES", routes)]).unwrap_err() {
        ConfigError::Route {
            origin,
            route,
            error,
        } => {
            assert_eq!(origin, Origin::Env("OUTBOX_RELAY_ROUTES".into()));
            (route, *error)
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        err(&[("OUTBOX_RELAY_ROUTES", "orders.*=kafak://127.0.0.1:9092")]),
        "OUTBOX_RELAY_ROUTES: route \"orders.*\": unknown transport scheme \"kafak\" (expected nats, amqp, kafka, redis)"
    );
    assert_eq!(
        route_err("orders.*=kafak://127.0.0.1:9092"),
        (
            "orders.*".into(),
            RouteError::UnknownScheme {
                scheme: "kafak".into()
            }
        )
    );
    assert_eq!(
        route_err("orders.* nats://h:4222"),
        (
            "orders.* nats://h:4222".into(),
            RouteError::MissingSeparator
        )
    );
    let (route, e) = route_err("orders.*x=nats://h:4222");
    assert_eq!(route, "orders.*x");
    assert!(matches!(e, RouteError::InvalidPattern(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "invalid pattern: route pattern \"orders.*x\" is invalid: '*' and '>' must be whole tokens"
    );
    let (_, e) = route_err("a.>.b=nats://h:4222");
    assert!(matches!(e, RouteError::InvalidPattern(_)));
    let (_, e) = route_err("a=127.0.0.1:4222");
    assert_eq!(
        e,
        RouteError::InvalidUrl {
            url: "127.0.0.1:4222".into(),
            reason: "expected scheme://host:port".into()
        }
    );
    let (_, e) = route_err("a=nats://h:4222?mdoe=core");
    assert_eq!(
        e,
        RouteError::UnknownOption {
            scheme: Scheme::Nats,
            option: "mdoe".into(),
            known: Scheme::Nats.options().join(", "),
        }
    );
    let (_, e) = route_err("a=nats://h:4222?mode");
    assert!(matches!(e, RouteError::InvalidUrl { .. }), "{e:?}");
    let (_, e) = route_err("a=nats://h:4222?mode=core&mode=jetstream");
    assert!(e.to_string().contains("given twice"), "{e}");
    let (_, e) = route_err("a=nats://");
    assert!(e.to_string().ends_with("no host"), "{e}");

    // Options the adapter refuses come back with the option's own name.
    let (_, e) = route_err("a=nats://h:4222?mode=fast");
    assert!(
        matches!(
            e,
            RouteError::Transport {
                scheme: Scheme::Nats,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().starts_with("nats: mode \"fast\" is invalid"),
        "{e}"
    );
    let (_, e) = route_err("a=nats://h:4222?max_in_flight=lots");
    assert!(
        e.to_string().starts_with("nats: max_in_flight=\"lots\""),
        "{e}"
    );
    let (_, e) = route_err("a=kafka://h:9092?linger_ms=soon");
    assert!(
        e.to_string().starts_with("kafka: linger_ms=\"soon\""),
        "{e}"
    );
    let (_, e) = route_err("a=redis://h:6379?mode=pubsub&maxlen=10");
    assert_eq!(
        e.to_string(),
        "redis: maxlen applies to streams, not to pubsub mode"
    );
    let (_, e) = route_err("a=amqp://guest:guest@h:5672/%2f?exchange=bad%20name");
    assert!(
        e.to_string()
            .starts_with("amqp: exchange name \"bad name\""),
        "{e}"
    );
    let (_, e) = route_err("a=kafka://user:pw@h:9092");
    assert!(matches!(e, RouteError::InvalidUrl { .. }), "{e:?}");
    assert!(!e.to_string().contains("pw@"), "{e}");
}

#[test]
fn bad_values() {
    assert_eq!(
        err(&[("OUTBOX_RELAY_BATCH_SIZE", "ten")]),
        "OUTBOX_RELAY_BATCH_SIZE: \"ten\" is not a whole number"
    );
    assert_eq!(
        with(&[("OUTBOX_RELAY_LEASE_MS", "-5")]).unwrap_err(),
        ConfigError::InvalidValue {
            origin: Origin::Env("OUTBOX_RELAY_LEASE_MS".into()),
            value: "-5".into(),
            expected: "a whole number"
        }
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_BATCH_SIZE", "0")]),
        "OUTBOX_RELAY_BATCH_SIZE: batch_size must be between 1 and 1000000 (got 0)"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_MAX_ATTEMPTS", "0")]),
        "OUTBOX_RELAY_MAX_ATTEMPTS: max_attempts must be between 1 and 4294967295 (got 0)"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_MAX_ATTEMPTS", "99999999999")]),
        "OUTBOX_RELAY_MAX_ATTEMPTS: max_attempts must be between 1 and 4294967295 (got 99999999999)"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_LEASE_MS", "5")]),
        "OUTBOX_RELAY_LEASE_MS: lease_ms must be between 10 and 604800000 (got 5)"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_RETRY_CAP_MS", "604800001")]),
        "OUTBOX_RELAY_RETRY_CAP_MS: retry_cap_ms must be between 1 and 604800000 (got 604800001)"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_POLL_INTERVAL_MS", "0")]),
        "OUTBOX_RELAY_POLL_INTERVAL_MS: poll_interval_ms must be between 1 and 604800000 (got 0)"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_MIN_POLL_INTERVAL_MS", "0")]),
        "OUTBOX_RELAY_MIN_POLL_INTERVAL_MS: min_poll_interval_ms must be between 1 and 604800000 (got 0)"
    );
    assert_eq!(
        err(&[
            ("OUTBOX_RELAY_RETRY_INITIAL_MS", "5000"),
            ("OUTBOX_RELAY_RETRY_CAP_MS", "1000")
        ]),
        "OUTBOX_RELAY_RETRY_CAP_MS: retry_cap_ms (1000) must not be less than retry_initial_ms (5000)"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_DB_MAX_CONNECTIONS", "1")]),
        "OUTBOX_RELAY_DB_MAX_CONNECTIONS: db_max_connections must be between 2 and 1000 (got 1)"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_UNHEALTHY_AFTER_MS", "0")]),
        "OUTBOX_RELAY_UNHEALTHY_AFTER_MS: unhealthy_after_ms must be between 1 and 604800000 (got 0)"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_MIGRATE", "maybe")]),
        "OUTBOX_RELAY_MIGRATE: \"maybe\" is not true or false"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_LISTEN", "localhost")]),
        "OUTBOX_RELAY_LISTEN: \"localhost\" is not an address like 127.0.0.1:9187 (or off)"
    );
    let e = err(&[("OUTBOX_RELAY_LOG", "info,[[[")]);
    assert!(
        e.starts_with("OUTBOX_RELAY_LOG: \"info,[[[\" is not a valid log filter: "),
        "{e}"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_RELAY_ID", "a\u{7}b")]),
        "OUTBOX_RELAY_RELAY_ID: relay_id must be 1 to 200 characters without control characters"
    );
}

#[test]
fn bad_table_and_database() {
    let e = with(&[("OUTBOX_RELAY_TABLE", "Outbox; DROP TABLE x")]).unwrap_err();
    assert!(matches!(e, ConfigError::InvalidTable { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "OUTBOX_RELAY_TABLE: table name \"Outbox; DROP TABLE x\" is invalid: only lowercase letters, digits and '_' are allowed"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_TABLE", "a.b.c")]),
        "OUTBOX_RELAY_TABLE: table name \"a.b.c\" is invalid: at most one '.' (schema.table)"
    );
    assert_eq!(
        err(&[("OUTBOX_RELAY_DATABASE_URL", "oracle://h/db")]),
        "OUTBOX_RELAY_DATABASE_URL: unsupported database scheme \"oracle\" (expected postgres, mysql, sqlite)"
    );
    assert!(matches!(
        with(&[("OUTBOX_RELAY_DATABASE_URL", "not a url")]).unwrap_err(),
        ConfigError::InvalidDatabaseUrl { .. }
    ));
    let e = err(&[(
        "OUTBOX_RELAY_DATABASE_URL",
        "postgres://u:hunter2@h:port/db",
    )]);
    assert!(
        e.starts_with("OUTBOX_RELAY_DATABASE_URL: invalid database URL"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    for (url, engine) in [
        ("postgresql://h/db", Engine::Postgres),
        ("mysql://root@127.0.0.1:3306/test", Engine::MySql),
        ("mariadb://root@127.0.0.1:3306/test", Engine::MySql),
        ("sqlite://relay.db", Engine::Sqlite),
        ("sqlite::memory:", Engine::Sqlite),
    ] {
        let c = with(&[("OUTBOX_RELAY_DATABASE_URL", url)]).unwrap();
        assert_eq!(c.database.engine(), engine, "{url}");
    }
}

#[test]
fn unknown_variables_are_refused() {
    let e = with(&[("OUTBOX_RELAY_BATCHSIZE", "5")]).unwrap_err();
    assert!(
        matches!(&e, ConfigError::UnknownVariable { name, .. } if name == "OUTBOX_RELAY_BATCHSIZE")
    );
    assert!(e
        .to_string()
        .starts_with("OUTBOX_RELAY_BATCHSIZE: unknown setting (known: CONFIG, DATABASE_URL, TABLE, ROUTES, BATCH_SIZE"));
}

#[test]
fn credentials_are_hidden() {
    let c = with(&[(
        "OUTBOX_RELAY_ROUTES",
        "a.>=amqp://app:amqp-pw@h:5672/%2f;b.>=nats://nats-token@h:4222;c.>=kafka://h:9092?property.sasl.password=kafka-pw",
    )])
    .unwrap();
    let debug = format!("{c:?}");
    for secret in ["s3cr3t", "amqp-pw", "nats-token", "kafka-pw"] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
        assert!(c.secrets().iter().any(|s| s == secret), "{secret}");
    }
    let summary = c.routes_summary();
    assert_eq!(
        summary,
        "a.> -> amqp://app:***@h:5672/%2f; b.> -> nats://***@h:4222; c.> -> kafka://h:9092?property.sasl.password=***"
    );
    assert_eq!(
        c.database.redacted(),
        "postgres://postgres:***@127.0.0.1:5432/test"
    );
}

#[test]
fn routes_sharing_a_url_share_the_target_url() {
    let c = with(&[(
        "OUTBOX_RELAY_ROUTES",
        "a.*=nats://h:4222\nb.*=nats://h:4222;c.*=nats://h:4222?mode=core",
    )])
    .unwrap();
    let urls: Vec<&str> = c.routes.iter().map(|r| r.target.url()).collect();
    assert_eq!(
        urls,
        ["nats://h:4222", "nats://h:4222", "nats://h:4222?mode=core"]
    );
}

#[test]
fn command_line() {
    use outbox_relay::Command;
    let parse = |a: &[&str]| Command::parse(a.iter().map(|s| s.to_string()));
    assert_eq!(
        parse(&[]).unwrap(),
        Command::Run {
            config: None,
            check: false
        }
    );
    assert_eq!(
        parse(&["--config", "r.toml", "--check"]).unwrap(),
        Command::Run {
            config: Some("r.toml".into()),
            check: true
        }
    );
    assert_eq!(
        parse(&["--config=r.toml"]).unwrap(),
        Command::Run {
            config: Some("r.toml".into()),
            check: false
        }
    );
    assert_eq!(parse(&["--help"]).unwrap(), Command::Help);
    assert_eq!(parse(&["-V"]).unwrap(), Command::Version);
    assert_eq!(
        parse(&["--config"]).unwrap_err().to_string(),
        "--config needs a file name (try --help)"
    );
    assert_eq!(
        parse(&["--frobnicate"]).unwrap_err().to_string(),
        "unknown argument \"--frobnicate\" (try --help)"
    );
}

#[test]
fn example_config_file_is_valid() {
    let c = Config::from_toml(
        include_str!("../relay.example.toml"),
        "relay.example.toml",
        vars(&[]),
    )
    .unwrap();
    assert_eq!(
        patterns(&c.routes),
        ["orders.*", "notifications.>", "audit.>", ">"]
    );
    assert_eq!(c.listen, Some("127.0.0.1:9187".parse().unwrap()));
    assert!(c.migrate);
}

#[test]
fn a_setting_after_the_routes_table_is_explained() {
    let e = Config::from_toml(
        "database_url = \"postgres://h/db\"\n[routes]\n\">\" = \"nats://h:4222\"\nlisten = \"off\"\n",
        "r.toml",
        vars(&[]),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "config file r.toml: routes.listen: \"listen\" is a setting, not a route pattern; put the settings before the [routes] table"
    );
}
