#![allow(clippy::unwrap_used)]
//! The binary refuses bad configurations with one line on stderr and exit
//! code 2, never a panic; `--help` and `--check` exit 0.

mod common;

use std::process::Output;

use common::{free_port, relay, run_to_end, unique, PG_ADDR, PG_URL};
use outbox_core::testing::require_service;

/// Asserts exit code 2 and exactly one `outbox-relay: error:` line on
/// stderr; returns that line without the prefix.
fn one_error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit status {:?}, stderr: {stderr}, stdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    lines[0]
        .strip_prefix("outbox-relay: error: ")
        .unwrap_or_else(|| panic!("no error prefix: {stderr}"))
        .to_string()
}

fn fails_with(vars: &[(&str, &str)]) -> String {
    one_error_line(&run_to_end(relay(vars), 60))
}

const NATS: &str = ">=nats://127.0.0.1:4222";

#[test]
fn missing_database_url() {
    assert_eq!(
        fails_with(&[("OUTBOX_RELAY_ROUTES", NATS)]),
        "no database URL: set OUTBOX_RELAY_DATABASE_URL or database_url in the config file"
    );
}

#[test]
fn missing_routes() {
    assert!(fails_with(&[("OUTBOX_RELAY_DATABASE_URL", PG_URL)]).starts_with("no routes: "));
}

#[test]
fn unknown_transport_scheme() {
    assert_eq!(
        fails_with(&[
            ("OUTBOX_RELAY_DATABASE_URL", PG_URL),
            ("OUTBOX_RELAY_ROUTES", "orders.*=kafak://127.0.0.1:9092"),
        ]),
        "OUTBOX_RELAY_ROUTES: route \"orders.*\": unknown transport scheme \"kafak\" (expected nats, amqp, kafka, redis)"
    );
}

#[test]
fn invalid_route_pattern() {
    assert_eq!(
        fails_with(&[
            ("OUTBOX_RELAY_DATABASE_URL", PG_URL),
            ("OUTBOX_RELAY_ROUTES", "orders.>.eu=nats://127.0.0.1:4222"),
        ]),
        "OUTBOX_RELAY_ROUTES: route \"orders.>.eu\": invalid pattern: route pattern \"orders.>.eu\" is invalid: '>' may only be the last token"
    );
}

#[test]
fn invalid_table_name() {
    assert_eq!(
        fails_with(&[
            ("OUTBOX_RELAY_DATABASE_URL", PG_URL),
            ("OUTBOX_RELAY_ROUTES", NATS),
            ("OUTBOX_RELAY_TABLE", "outbox;drop"),
        ]),
        "OUTBOX_RELAY_TABLE: table name \"outbox;drop\" is invalid: only lowercase letters, digits and '_' are allowed"
    );
}

#[test]
fn unparsable_number() {
    assert_eq!(
        fails_with(&[
            ("OUTBOX_RELAY_DATABASE_URL", PG_URL),
            ("OUTBOX_RELAY_ROUTES", NATS),
            ("OUTBOX_RELAY_BATCH_SIZE", "lots"),
        ]),
        "OUTBOX_RELAY_BATCH_SIZE: \"lots\" is not a whole number"
    );
}

#[test]
fn unknown_variable() {
    assert!(fails_with(&[
        ("OUTBOX_RELAY_DATABASE_URL", PG_URL),
        ("OUTBOX_RELAY_ROUTES", NATS),
        ("OUTBOX_RELAY_POLL_MS", "5"),
    ])
    .starts_with("OUTBOX_RELAY_POLL_MS: unknown setting (known: "));
}

#[test]
fn bad_config_files() {
    let dir = std::env::temp_dir().join(unique("outbox-relay-bin-"));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.toml");
    let mut cmd = relay(&[]);
    cmd.arg("--config").arg(&missing);
    let line = one_error_line(&run_to_end(cmd, 30));
    assert!(
        line.starts_with(&format!("config file {}: ", missing.display())),
        "{line}"
    );

    let broken = dir.join("broken.toml");
    std::fs::write(
        &broken,
        "database_url = \"postgres://h/db\"\n[routes]\n\">\" = nats://h\n",
    )
    .unwrap();
    let cmd = relay(&[("OUTBOX_RELAY_CONFIG", broken.to_str().unwrap())]);
    let line = one_error_line(&run_to_end(cmd, 30));
    assert!(
        line.starts_with(&format!(
            "config file {}: line 3, column ",
            broken.display()
        )),
        "{line}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_arguments_and_help() {
    let mut cmd = relay(&[]);
    cmd.arg("--frobnicate");
    assert_eq!(
        one_error_line(&run_to_end(cmd, 30)),
        "unknown argument \"--frobnicate\" (try --help)"
    );
    let mut cmd = relay(&[]);
    cmd.arg("--help");
    let out = run_to_end(cmd, 30);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("usage: outbox-relay"));
    assert!(out.stderr.is_empty());
}

#[test]
fn unreachable_database() {
    let line = fails_with(&[
        (
            "OUTBOX_RELAY_DATABASE_URL",
            "postgres://postgres:topsecret@127.0.0.1:1/test",
        ),
        ("OUTBOX_RELAY_ROUTES", NATS),
        ("OUTBOX_RELAY_CONNECT_TIMEOUT_MS", "2000"),
        ("OUTBOX_RELAY_LISTEN", "off"),
    ]);
    assert!(
        line.starts_with("database postgres://postgres:***@127.0.0.1:1/test: cannot connect: "),
        "{line}"
    );
    assert!(!line.contains("topsecret"), "{line}");
}

#[test]
fn listen_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let line = fails_with(&[
        ("OUTBOX_RELAY_DATABASE_URL", PG_URL),
        ("OUTBOX_RELAY_ROUTES", NATS),
        ("OUTBOX_RELAY_LISTEN", &addr),
    ]);
    assert!(line.starts_with(&format!("listen {addr}: ")), "{line}");
}

#[test]
fn wrong_database_user_or_name() {
    if !require_service("postgres", PG_ADDR) {
        return;
    }
    let role = unique("nobody_");
    let url = format!("postgres://{role}:topsecret@127.0.0.1:5432/test");
    let line = fails_with(&[
        ("OUTBOX_RELAY_DATABASE_URL", &url),
        ("OUTBOX_RELAY_ROUTES", NATS),
        ("OUTBOX_RELAY_LISTEN", "off"),
    ]);
    assert!(line.contains("cannot connect"), "{line}");
    assert!(line.contains(&role), "{line}");
    assert!(!line.contains("topsecret"), "{line}");

    let db = unique("nodb_");
    let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
    let line = fails_with(&[
        ("OUTBOX_RELAY_DATABASE_URL", &url),
        ("OUTBOX_RELAY_ROUTES", NATS),
        ("OUTBOX_RELAY_LISTEN", "off"),
    ]);
    assert!(
        line.contains(&format!("database \"{db}\" does not exist")),
        "{line}"
    );
}

/// A transport that cannot connect: exit 2 naming the route.
#[test]
fn unreachable_transports() {
    if !require_service("postgres", PG_ADDR) {
        return;
    }
    for (url, expect) in [
        ("nats://127.0.0.1:1", "nats connect: "),
        (
            "kafka://127.0.0.1:1?connect_timeout_ms=500",
            "kafka connect: connection error: no broker answered within 500ms: ",
        ),
        ("amqp://guest:topsecret@127.0.0.1:1/%2f", "amqp connect: "),
        (
            "redis://127.0.0.1:1?connect_timeout_ms=500",
            "redis connect: ",
        ),
    ] {
        let routes = format!("audit.>={url}");
        let line = fails_with(&[
            ("OUTBOX_RELAY_DATABASE_URL", PG_URL),
            ("OUTBOX_RELAY_ROUTES", &routes),
            ("OUTBOX_RELAY_MIGRATE", "false"),
            ("OUTBOX_RELAY_LISTEN", "off"),
            ("OUTBOX_RELAY_CONNECT_TIMEOUT_MS", "1000"),
        ]);
        let shown = outbox_relay::redact::redact_url(url);
        assert!(
            line.starts_with(&format!("route \"audit.>\": {shown}: cannot connect: ")),
            "{line}"
        );
        assert!(line.contains(expect), "{url}: {line}");
        assert!(!line.contains("topsecret"), "{line}");
    }
}

#[test]
fn wrong_broker_password() {
    if !require_service("postgres", PG_ADDR) || !require_service("rabbitmq", "127.0.0.1:5672") {
        return;
    }
    let line = fails_with(&[
        ("OUTBOX_RELAY_DATABASE_URL", PG_URL),
        (
            "OUTBOX_RELAY_ROUTES",
            ">=amqp://guest:wrong-topsecret@127.0.0.1:5672/%2f",
        ),
        ("OUTBOX_RELAY_MIGRATE", "false"),
        ("OUTBOX_RELAY_LISTEN", "off"),
    ]);
    assert!(
        line.starts_with("route \">\": amqp://guest:***@127.0.0.1:5672/%2f: cannot connect: "),
        "{line}"
    );
    assert!(!line.contains("topsecret"), "{line}");
}

#[test]
fn check_connects_and_exits_0() {
    if !require_service("postgres", PG_ADDR)
        || !require_service("nats", "127.0.0.1:4222")
        || !require_service("redis", "127.0.0.1:6379")
    {
        return;
    }
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = relay(&[
        ("OUTBOX_RELAY_DATABASE_URL", PG_URL),
        (
            "OUTBOX_RELAY_ROUTES",
            "a.>=nats://127.0.0.1:4222?mode=core;>=redis://127.0.0.1:6379",
        ),
        ("OUTBOX_RELAY_MIGRATE", "false"),
        ("OUTBOX_RELAY_LISTEN", &listen),
    ]);
    cmd.arg("--check");
    let out = run_to_end(cmd, 60);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("configuration checked"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
