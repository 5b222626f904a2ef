#![doc = include_str!("../README.md")]

mod config;
mod error;
mod transport;

pub use config::{redact_url, AmqpConfig, AmqpConfigBuilder, AmqpRoute, ExchangeType, ENV_PREFIX};
pub use transport::{AmqpTransport, CORRELATION_ID_HEADER, TYPE_HEADER};
