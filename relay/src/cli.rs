//! The command line: `outbox-relay [--config FILE] [--check]`.

use std::path::PathBuf;

use crate::config::ConfigError;

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the relay (or, with `check`, connect everything and exit).
    Run {
        /// `--config FILE`, if given.
        config: Option<PathBuf>,
        /// `--check`: validate the configuration, connect to the database
        /// and every broker, then exit 0 without relaying.
        check: bool,
    },
    /// `--help`.
    Help,
    /// `--version`.
    Version,
}

/// The text `--help` prints.
pub const USAGE: &str = "\
outbox-relay: delivers outbox rows from a database table to brokers

usage: outbox-relay [--config FILE] [--check]

  --config FILE   read settings from a TOML file (also OUTBOX_RELAY_CONFIG);
                  OUTBOX_RELAY_* environment variables override it
  --check         check the configuration, connect to the database and every
                  broker, then exit (0 when all is well, 2 otherwise)
  -h, --help      show this help
  -V, --version   show the version

Settings (file key / variable): database_url / OUTBOX_RELAY_DATABASE_URL,
routes / OUTBOX_RELAY_ROUTES (\"orders.*=kafka://127.0.0.1:9092;>=amqp://...\"),
table, batch_size, lease_ms, poll_interval_ms, min_poll_interval_ms,
max_attempts, retry_initial_ms, retry_cap_ms, max_in_flight,
shutdown_timeout_ms, listen (default
127.0.0.1:9187: GET /metrics, GET /health), log, migrate, relay_id,
keep_delivered, retention_ms, hold_dead_letters, listen_notify,
db_max_connections,
connect_timeout_ms. See the README for the table.

Exit codes: 0 stopped by SIGINT/SIGTERM (or --check passed), 2 bad
configuration or a failed start, 1 a failure while running.
";

impl Command {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, ConfigError> {
        let mut config = None;
        let mut check = false;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(Command::Help),
                "-V" | "--version" => return Ok(Command::Version),
                "--check" => check = true,
                "-c" | "--config" => {
                    let Some(path) = args.next().filter(|p| !p.is_empty()) else {
                        return Err(ConfigError::Usage(format!("{arg} needs a file name")));
                    };
                    config = Some(PathBuf::from(path));
                }
                other => match other.strip_prefix("--config=") {
                    Some(path) if !path.is_empty() => config = Some(PathBuf::from(path)),
                    Some(_) => return Err(ConfigError::Usage("--config needs a file name".into())),
                    None => {
                        return Err(ConfigError::Usage(format!(
                            "unknown argument {:?}",
                            other.chars().take(80).collect::<String>()
                        )))
                    }
                },
            }
        }
        Ok(Command::Run { config, check })
    }
}
