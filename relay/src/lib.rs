#![doc = include_str!("../README.md")]

#[cfg(not(any(feature = "postgres", feature = "mysql", feature = "sqlite")))]
compile_error!("outbox-relay needs at least one of the features postgres, mysql, sqlite");

pub mod app;
pub mod cli;
pub mod config;
pub mod database;
mod http;
pub mod redact;
pub mod target;

pub use app::{run, StartError};
pub use cli::Command;
pub use config::{Config, ConfigError, Origin, ENV_PREFIX};
pub use database::{DatabaseUrl, Engine};
pub use target::{RouteError, Scheme, Target, TargetConfig};
