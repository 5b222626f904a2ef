//! How a message is laid out in Redis, and [`Envelope`] to read it back.
//!
//! **Streams**: one entry per message with the fields
//! [`FIELD_ID`] (`id`, the message id), [`FIELD_KEY`] (`key`, only for a
//! keyed message), [`FIELD_HEADERS`] (`headers`, a JSON object of string
//! values, `{}` when there are none) and [`FIELD_PAYLOAD`] (`payload`, the
//! raw payload bytes).
//!
//! **Pub/Sub**: the channel message is a one-line JSON object
//! `{"id":"…","key":"…","headers":{…}}` (`key` absent for a keyless
//! message), then a newline (`\n`), then the raw payload bytes. JSON never
//! contains a raw newline, so the first `\n` ends the metadata and the
//! payload may be any bytes.
//!
//! When the transport renamed the topic (`prefix`, `topic_map`), the
//! headers carry the original under `outbox-topic`
//! ([`outbox_core::wire::TOPIC_HEADER`]).

use bytes::Bytes;
use outbox_core::{Headers, Message, MessageId};
use serde::{Deserialize, Serialize};

use crate::error::RedisError;

/// Stream field holding the message id.
pub const FIELD_ID: &str = "id";
/// Stream field holding the key (absent for a keyless message).
pub const FIELD_KEY: &str = "key";
/// Stream field holding the headers as a JSON object.
pub const FIELD_HEADERS: &str = "headers";
/// Stream field holding the payload bytes.
pub const FIELD_PAYLOAD: &str = "payload";

/// A message as a consumer reads it back from a stream entry or a Pub/Sub
/// message.
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The outbox message id (stable across re-publishes: dedup on it).
    pub id: MessageId,
    /// The ordering key, if the message had one.
    pub key: Option<String>,
    /// The message headers.
    pub headers: Headers,
    /// The payload bytes.
    pub payload: Bytes,
}

impl std::fmt::Debug for Envelope {
    // Payloads can be large or sensitive: Debug shows their size only, as
    // `Message`'s does.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("headers", &self.headers)
            .field("payload", &format_args!("{} bytes", self.payload.len()))
            .finish()
    }
}

#[derive(Serialize)]
struct MetaOut<'a> {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    headers: &'a Headers,
}

#[derive(Deserialize)]
struct MetaIn {
    id: MessageId,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    headers: Headers,
}

/// The headers sent with `message`: its own, plus `outbox-topic` when the
/// topic was renamed.
pub(crate) fn wire_headers(message: &Message, renamed: bool) -> std::borrow::Cow<'_, Headers> {
    if renamed {
        let mut h = message.headers.clone();
        // A router that renamed the topic already named the original.
        h.entry(outbox_core::wire::TOPIC_HEADER.to_string())
            .or_insert_with(|| message.topic.clone());
        std::borrow::Cow::Owned(h)
    } else {
        std::borrow::Cow::Borrowed(&message.headers)
    }
}

/// The headers as the JSON object stored in the `headers` field.
pub(crate) fn headers_json(headers: &Headers) -> Result<String, RedisError> {
    serde_json::to_string(headers).map_err(|e| RedisError::Encode(e.to_string()))
}

/// The Pub/Sub message for `message`.
pub(crate) fn encode_pubsub(message: &Message, headers: &Headers) -> Result<Vec<u8>, RedisError> {
    let meta = MetaOut {
        id: message.id.to_string(),
        key: message.key.as_deref(),
        headers,
    };
    let mut out = serde_json::to_vec(&meta).map_err(|e| RedisError::Encode(e.to_string()))?;
    out.push(b'\n');
    out.extend_from_slice(&message.payload);
    Ok(out)
}

fn invalid(reason: impl Into<String>) -> outbox_core::Error {
    RedisError::Decode(reason.into()).into()
}

impl Envelope {
    /// Reads a Pub/Sub message published by the transport.
    pub fn from_pubsub(bytes: &[u8]) -> outbox_core::Result<Self> {
        let split = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| invalid("no newline after the metadata"))?;
        let (meta, rest) = bytes.split_at(split);
        let meta: MetaIn = serde_json::from_slice(meta)
            .map_err(|e| invalid(format!("metadata is not the expected JSON: {e}")))?;
        Ok(Envelope {
            id: meta.id,
            key: meta.key,
            headers: meta.headers,
            payload: Bytes::copy_from_slice(rest.get(1..).unwrap_or_default()),
        })
    }

    /// Reads a stream entry added by the transport, given its fields as
    /// (name, value) pairs (fields it does not know are ignored).
    pub fn from_stream_fields<'a>(
        fields: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> outbox_core::Result<Self> {
        let mut id = None;
        let mut key = None;
        let mut headers = Headers::new();
        let mut payload = None;
        for (name, value) in fields {
            match name {
                FIELD_ID => {
                    let text = std::str::from_utf8(value)
                        .map_err(|_| invalid("the id field is not UTF-8"))?;
                    id = Some(
                        text.parse::<MessageId>()
                            .map_err(|e| invalid(format!("the id field: {e}")))?,
                    );
                }
                FIELD_KEY => {
                    key = Some(
                        String::from_utf8(value.to_vec())
                            .map_err(|_| invalid("the key field is not UTF-8"))?,
                    );
                }
                FIELD_HEADERS => {
                    headers = serde_json::from_slice(value).map_err(|e| {
                        invalid(format!(
                            "the headers field is not a JSON object of strings: {e}"
                        ))
                    })?;
                }
                FIELD_PAYLOAD => payload = Some(Bytes::copy_from_slice(value)),
                _ => {}
            }
        }
        Ok(Envelope {
            id: id.ok_or_else(|| invalid("no id field"))?,
            key,
            headers,
            payload: payload.ok_or_else(|| invalid("no payload field"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn pubsub_envelope_round_trips_binary_payloads() {
        let m = Message::builder("t", vec![0u8, b'\n', 255, b'{'])
            .key("k\u{e9}")
            .header("h", "v \"quoted\"\t")
            .build()
            .unwrap();
        let bytes = encode_pubsub(&m, &m.headers).unwrap();
        let first_line = bytes.split(|b| *b == b'\n').next().unwrap();
        assert!(serde_json::from_slice::<serde_json::Value>(first_line).is_ok());
        let e = Envelope::from_pubsub(&bytes).unwrap();
        assert_eq!(e.id, m.id);
        assert_eq!(e.key, m.key);
        assert_eq!(e.headers, m.headers);
        assert_eq!(e.payload, m.payload);
        let shown = format!("{e:?}");
        assert!(
            shown.contains("4 bytes") && !shown.contains("255"),
            "{shown}"
        );

        let keyless = Message::builder("t", Bytes::new()).build().unwrap();
        let bytes = encode_pubsub(&keyless, &keyless.headers).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("\"key\""));
        let e = Envelope::from_pubsub(&bytes).unwrap();
        assert_eq!(e.key, None);
        assert!(e.payload.is_empty());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"no newline",
            b"{}\n",
            b"{\"id\":\"x\"}\npayload",
            b"\xff\n",
        ] {
            let e = Envelope::from_pubsub(bad).unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::InvalidInput);
        }
        assert!(Envelope::from_stream_fields([(FIELD_PAYLOAD, &b"x"[..])]).is_err());
        assert!(Envelope::from_stream_fields([(FIELD_ID, &b"nope"[..])]).is_err());
        let id = MessageId::new().to_string();
        assert!(
            Envelope::from_stream_fields([(FIELD_ID, id.as_bytes()), (FIELD_HEADERS, b"[1]")])
                .is_err()
        );
        let ok = Envelope::from_stream_fields([
            (FIELD_ID, id.as_bytes()),
            (FIELD_PAYLOAD, b"p"),
            ("extra", b"ignored"),
        ])
        .unwrap();
        assert_eq!(ok.payload, Bytes::from_static(b"p"));
        assert!(ok.headers.is_empty());
    }

    #[test]
    fn renamed_topics_carry_the_original() {
        let m = Message::builder("orders.placed", "x").build().unwrap();
        assert!(wire_headers(&m, false).is_empty());
        assert_eq!(
            wire_headers(&m, true)[outbox_core::wire::TOPIC_HEADER],
            "orders.placed"
        );
    }
}
