#![doc = include_str!("../README.md")]

mod config;
pub mod envelope;
mod error;
mod transport;

pub use config::{
    redact_url, RedisConfig, RedisConfigBuilder, RedisMode, ENV_PREFIX, MAX_DEDUP_WINDOW,
};
pub use envelope::Envelope;
pub use transport::RedisTransport;
