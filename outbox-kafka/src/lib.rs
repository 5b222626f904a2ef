#![doc = include_str!("../README.md")]

mod config;
mod error;
mod transport;

pub use config::{
    KafkaConfig, KafkaConfigBuilder, ENV_PREFIX, ENV_PROPERTY_PREFIX, MAX_TOPIC_NAME_LEN,
};
pub use transport::KafkaTransport;
