#![doc = include_str!("../README.md")]

mod config;
mod error;
mod transport;

pub use config::{redact_url, NatsConfig, NatsConfigBuilder, NatsMode, StreamSpec, ENV_PREFIX};
pub use transport::NatsTransport;
