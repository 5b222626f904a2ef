//! [`RedisTransport`]: appends outbox messages to Redis streams (`XADD`,
//! optionally deduplicated by a server-side script) or publishes them to
//! Pub/Sub channels, one pipelined round trip per batch.

use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{Message, PublishResult, Transport};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Pipeline, Script, Value};

use crate::config::{RedisConfig, RedisMode};
use crate::envelope::{
    encode_pubsub, headers_json, wire_headers, FIELD_HEADERS, FIELD_ID, FIELD_KEY, FIELD_PAYLOAD,
};
use crate::error::{RedisError, BACKEND};

/// Reconnection attempts the connection manager makes per failed call
/// before the call fails (transiently); the next call tries again.
const RECONNECT_RETRIES: usize = 2;
/// Upper bound of the pause between reconnection attempts.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// The dedup script. Atomic on the server: it sets a marker key for the
/// message id (`SET NX PX window`) and appends only if the marker was new.
/// Should the append fail (a key of the wrong type, say) the marker is
/// removed again, so that the failure is not later taken for a duplicate.
///
/// KEYS[1] = stream, KEYS[2] = marker; ARGV[1] = window in ms, ARGV[2] =
/// MAXLEN (`0`: no trimming), ARGV[3..] = field/value pairs.
/// Returns the new entry id, or 0 for a duplicate.
const DEDUP_SCRIPT: &str = r"
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local args = {'XADD', KEYS[1]}
if ARGV[2] ~= '0' then
  args[#args + 1] = 'MAXLEN'
  args[#args + 1] = '~'
  args[#args + 1] = ARGV[2]
end
args[#args + 1] = '*'
for i = 3, #ARGV do
  args[#args + 1] = ARGV[i]
end
local reply = redis.pcall(unpack(args))
if type(reply) == 'table' and reply.err then
  redis.call('DEL', KEYS[2])
end
return reply
";

/// The key of the dedup marker of message `id` on `stream`.
pub(crate) fn dedup_marker(stream: &str, id: &outbox_core::MessageId) -> String {
    format!("{stream}:outbox-dedup:{id}")
}

/// Publishes outbox messages to Redis.
///
/// In [`RedisMode::Streams`] (the default) each message is appended with
/// `XADD <prefix><topic> [MAXLEN ~ n] * id … [key …] headers … payload …`
/// (see [`crate::envelope`] for the layout); `Ok` means Redis replied with
/// the new entry id. With a `dedup_window`, a server-side script skips a
/// message id already appended within the window and reports it as
/// published. In [`RedisMode::PubSub`] each message is `PUBLISH`ed; `Ok`
/// means Redis accepted it, not that anyone received it.
///
/// A batch is one pipelined round trip on a connection that reconnects by
/// itself. An error reply fails only its own message (`WRONGTYPE`, script
/// errors: permanent); a lost connection or a timeout fails the whole batch
/// transiently.
#[derive(Clone)]
pub struct RedisTransport {
    config: RedisConfig,
    connection: ConnectionManager,
    script: Script,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisTransport {
    /// Connects to Redis. Fails transiently when Redis cannot be reached,
    /// permanently when the configuration or the credentials are wrong.
    /// Once connected, the connection is re-established by itself whenever
    /// it drops.
    pub async fn connect(config: RedisConfig) -> outbox_core::Result<Self> {
        config.validate()?;
        let client = redis::Client::open(config.url.as_str()).map_err(|_| {
            RedisError::Config(format!(
                "url {} is not a valid Redis URL",
                crate::config::redact_url(&config.url)
            ))
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let connection = ConnectionManager::new_with_config(client, manager_config)
            .await
            .map_err(RedisError::Connect)?;
        Ok(RedisTransport {
            config,
            connection,
            script: Script::new(DEDUP_SCRIPT),
        })
    }

    /// The configuration the transport runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Adds the command for one message to the pipeline.
    fn add(&self, pipe: &mut Pipeline, message: &Message) -> Result<(), RedisError> {
        let target = self.config.key_for(&message.topic);
        let renamed = target != message.topic.as_str();
        let headers = wire_headers(message, renamed);
        match self.config.mode {
            RedisMode::PubSub => {
                let body = encode_pubsub(message, &headers)?;
                pipe.cmd("PUBLISH").arg(target.as_ref()).arg(body);
            }
            RedisMode::Streams => {
                let id = message.id.to_string();
                let headers = headers_json(&headers)?;
                match self.config.dedup_window {
                    Some(window) => {
                        let mut call = self.script.key(target.as_ref());
                        call.key(dedup_marker(&target, &message.id))
                            .arg(u64::try_from(window.as_millis()).unwrap_or(u64::MAX))
                            .arg(self.config.maxlen.unwrap_or(0))
                            .arg(FIELD_ID)
                            .arg(&id);
                        if let Some(key) = &message.key {
                            call.arg(FIELD_KEY).arg(key);
                        }
                        call.arg(FIELD_HEADERS)
                            .arg(&headers)
                            .arg(FIELD_PAYLOAD)
                            .arg(message.payload.as_ref());
                        pipe.invoke_script(&call);
                    }
                    None => {
                        let cmd = pipe.cmd("XADD").arg(target.as_ref());
                        if let Some(n) = self.config.maxlen {
                            cmd.arg("MAXLEN").arg("~").arg(n);
                        }
                        cmd.arg("*").arg(FIELD_ID).arg(&id);
                        if let Some(key) = &message.key {
                            cmd.arg(FIELD_KEY).arg(key);
                        }
                        cmd.arg(FIELD_HEADERS)
                            .arg(&headers)
                            .arg(FIELD_PAYLOAD)
                            .arg(message.payload.as_ref());
                    }
                }
            }
        }
        Ok(())
    }

    /// What one reply means for its message.
    fn settle(&self, message: &Message, reply: Option<Value>) -> PublishResult {
        match reply {
            None => Err(RedisError::MissingReply.into()),
            Some(Value::ServerError(e)) => Err(RedisError::Server {
                code: e.code().to_string(),
                detail: e.details().unwrap_or_default().to_string(),
            }
            .into()),
            Some(Value::Int(0)) if self.config.dedup_window.is_some() => {
                tracing::debug!(
                    backend = BACKEND,
                    id = %message.id,
                    topic = %message.topic,
                    "duplicate within the dedup window: not appended again"
                );
                Ok(())
            }
            Some(Value::Int(0)) if self.config.mode == RedisMode::PubSub => {
                tracing::debug!(
                    backend = BACKEND,
                    id = %message.id,
                    topic = %message.topic,
                    "published to a channel without subscribers"
                );
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }
}

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &str {
        BACKEND
    }

    async fn publish_batch(&self, messages: &[Message]) -> Vec<PublishResult> {
        let mut results: Vec<Option<PublishResult>> = messages.iter().map(|_| None).collect();
        let mut pipe = redis::pipe();
        // One message's error reply must not fail the others.
        pipe.ignore_errors();
        if self.config.mode == RedisMode::Streams && self.config.dedup_window.is_some() {
            // Cheap when already loaded; after a server restart the script
            // cache is empty and EVALSHA would fail without it.
            pipe.load_script(&self.script).ignore();
        }
        let mut sent = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            match self.add(&mut pipe, message) {
                Ok(()) => sent.push(i),
                Err(e) => results[i] = Some(Err(e.into())),
            }
        }
        if !sent.is_empty() {
            let mut connection = self.connection.clone();
            match pipe.query_async::<Vec<Value>>(&mut connection).await {
                Ok(replies) => {
                    let mut replies = replies.into_iter();
                    for i in sent {
                        results[i] = Some(self.settle(&messages[i], replies.next()));
                    }
                }
                Err(e) => {
                    tracing::debug!(backend = BACKEND, error = %e, "batch failed");
                    // A refused connection sent nothing: the relay hands the
                    // batch back uncounted and backs off. A connection lost
                    // mid-pipeline may have stored some of it.
                    let unsent = e.is_connection_refusal();
                    for i in sent {
                        let error: outbox_core::Error = RedisError::Batch(e.clone()).into();
                        results[i] = Some(Err(if unsent { error.unsent() } else { error }));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(RedisError::MissingReply.into())))
            .collect()
    }
}
