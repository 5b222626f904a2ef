//! The message model: [`MessageId`], [`Message`] and its builder, and the
//! validation every message passes before it is stored.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ValidationError;
use crate::limits;

/// Headers carried with a message: name -> value, sorted by name.
pub type Headers = BTreeMap<String, String>;

/// The id of a message: a UUIDv7 chosen at enqueue, stable across every
/// retry and relay, and sent to the broker as its dedup / message id.
///
/// UUIDv7 starts with a millisecond timestamp, so ids sort roughly by
/// creation time and index well.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A fresh UUIDv7.
    pub fn new() -> Self {
        MessageId(Uuid::now_v7())
    }

    /// Wraps an existing UUID (as read back from a store).
    pub fn from_uuid(uuid: Uuid) -> Self {
        MessageId(uuid)
    }

    /// The UUID inside.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The 16 bytes of the UUID.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0.hyphenated())
    }
}

impl FromStr for MessageId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(MessageId)
            .map_err(|e| ValidationError::InvalidName {
                what: "message id",
                value: s.escape_debug().to_string(),
                reason: e.to_string(),
            })
    }
}

impl From<Uuid> for MessageId {
    fn from(u: Uuid) -> Self {
        MessageId(u)
    }
}

/// One outbox message, as enqueued and as claimed by a relay.
///
/// Build new messages with [`Message::builder`] or [`Message::json`]; both
/// validate. A store fills `attempts` when it hands a message out.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// Stable id, sent to the broker as its dedup / message id.
    pub id: MessageId,
    /// Dot-separated topic (`orders.placed`), used for routing.
    pub topic: String,
    /// Ordering key: messages with the same key are published in enqueue order.
    pub key: Option<String>,
    /// The payload bytes (JSON or anything else).
    pub payload: Bytes,
    /// String headers, carried as the broker's native headers.
    pub headers: Headers,
    /// When the message was created.
    pub created_at: SystemTime,
    /// Publish attempts that failed so far.
    pub attempts: u32,
    /// Not published before this time (delayed delivery).
    pub not_before: Option<SystemTime>,
}

impl fmt::Debug for Message {
    // Payloads can be large or sensitive: Debug shows their size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("key", &self.key)
            .field("payload_len", &self.payload.len())
            .field("headers", &self.headers)
            .field("attempts", &self.attempts)
            .field("not_before", &self.not_before)
            .finish()
    }
}

impl Message {
    /// Starts a message with a raw-bytes payload.
    pub fn builder(topic: impl Into<String>, payload: impl Into<Bytes>) -> MessageBuilder {
        MessageBuilder {
            id: None,
            topic: topic.into(),
            key: None,
            payload: Ok(payload.into()),
            headers: Headers::new(),
            not_before: None,
            max_payload: limits::DEFAULT_MAX_PAYLOAD,
        }
    }

    /// Starts a message whose payload is `value` serialised as JSON; sets the
    /// `content-type` header to `application/json`. A serialisation error is
    /// reported by [`MessageBuilder::build`].
    pub fn json<T: Serialize + ?Sized>(topic: impl Into<String>, value: &T) -> MessageBuilder {
        let mut b = Message::builder(topic, Bytes::new());
        b.payload = serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| ValidationError::Serialize(e.to_string()));
        b.header(CONTENT_TYPE, "application/json")
    }

    /// Deserialises the payload as JSON.
    pub fn payload_json<T: for<'de> Deserialize<'de>>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.payload)
    }

    /// Checks topic, key, headers and payload size against the limits every
    /// broker accepts. Stores call this before writing; transports may
    /// assume it held.
    pub fn validate(&self, max_payload: usize) -> Result<(), ValidationError> {
        validate_topic(&self.topic)?;
        if let Some(key) = &self.key {
            validate_key(key)?;
        }
        validate_headers(&self.headers)?;
        for (what, at) in [
            ("created_at", Some(self.created_at)),
            ("not_before", self.not_before),
        ] {
            if at.is_some_and(|t| t > latest_time()) {
                return Err(ValidationError::TimeOutOfRange { what });
            }
        }
        if self.payload.len() > max_payload {
            return Err(ValidationError::PayloadTooLarge {
                size: self.payload.len(),
                limit: max_payload,
            });
        }
        Ok(())
    }
}

/// The latest time a message may carry: the end of year 9999, the most
/// MySQL's `DATETIME` holds (and far inside what PostgreSQL, SQLite and the
/// time conversions on the way accept).
fn latest_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)
}

/// The header name [`Message::json`] sets.
pub const CONTENT_TYPE: &str = "content-type";

/// Builds a validated [`Message`].
#[derive(Debug)]
#[must_use]
pub struct MessageBuilder {
    id: Option<MessageId>,
    topic: String,
    key: Option<String>,
    payload: Result<Bytes, ValidationError>,
    headers: Headers,
    not_before: Option<SystemTime>,
    max_payload: usize,
}

impl MessageBuilder {
    /// Sets the ordering key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header (a later value for the same name replaces the earlier).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Adds several headers.
    pub fn headers<K: Into<String>, V: Into<String>>(
        mut self,
        headers: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in headers {
            self.headers.insert(k.into(), v.into());
        }
        self
    }

    /// Uses a given id instead of a fresh UUIDv7 (for idempotent producers
    /// that derive ids from their own data).
    pub fn id(mut self, id: MessageId) -> Self {
        self.id = Some(id);
        self
    }

    /// Delays publishing until `at`.
    pub fn not_before(mut self, at: SystemTime) -> Self {
        self.not_before = Some(at);
        self
    }

    /// Delays publishing by `delay` from now (a delay past the end of year
    /// 9999 fails [`build`](Self::build)).
    pub fn delay(mut self, delay: Duration) -> Self {
        let past_any_store = latest_time() + Duration::from_secs(1);
        self.not_before = Some(
            SystemTime::now()
                .checked_add(delay)
                .map_or(past_any_store, |t| t.min(past_any_store)),
        );
        self
    }

    /// Sets the payload limit checked by [`build`](Self::build)
    /// (default [`limits::DEFAULT_MAX_PAYLOAD`]).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Validates and returns the message.
    pub fn build(self) -> Result<Message, ValidationError> {
        let message = Message {
            id: self.id.unwrap_or_default(),
            topic: self.topic,
            key: self.key,
            payload: self.payload?,
            headers: self.headers,
            created_at: SystemTime::now(),
            attempts: 0,
            not_before: self.not_before,
        };
        message.validate(self.max_payload)?;
        Ok(message)
    }
}

fn escape(s: &str) -> String {
    let mut e: String = s
        .chars()
        .take(64)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if s.chars().count() > 64 {
        e.push('…');
    }
    e
}

/// Checks a topic: non-empty, at most [`limits::MAX_TOPIC_LEN`] bytes, no
/// whitespace or control characters, no `*` or `>` (wildcards in NATS and
/// AMQP), no empty dot-separated token.
pub fn validate_topic(topic: &str) -> Result<(), ValidationError> {
    if topic.is_empty() {
        return Err(ValidationError::EmptyTopic);
    }
    if topic.len() > limits::MAX_TOPIC_LEN {
        return Err(ValidationError::TopicTooLong {
            len: topic.len(),
            max: limits::MAX_TOPIC_LEN,
        });
    }
    let bad = |found: char, reason: &'static str| ValidationError::InvalidTopic {
        topic: escape(topic),
        found,
        reason,
    };
    // The common case, printable ASCII without wildcards, needs no
    // per-character look-up; anything else gets the checks below.
    let plain = topic
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'*' | b'>' | b'#'));
    if !plain {
        for c in topic.chars() {
            if c.is_control() {
                return Err(bad(c, "control characters are not allowed"));
            }
            if c.is_whitespace() {
                return Err(bad(c, "whitespace is not allowed"));
            }
            if c == '*' || c == '>' || c == '#' {
                return Err(bad(
                    c,
                    "wildcard characters are reserved for route patterns",
                ));
            }
        }
    }
    if topic.starts_with('.') || topic.ends_with('.') || topic.contains("..") {
        return Err(bad(
            '.',
            "a topic may not start or end with '.' or contain '..'",
        ));
    }
    Ok(())
}

/// Checks a key: non-empty, at most [`limits::MAX_KEY_LEN`] bytes, no control
/// characters (keys travel as header values on some brokers).
pub fn validate_key(key: &str) -> Result<(), ValidationError> {
    let reason = if key.is_empty() {
        "empty (use no key instead)".to_string()
    } else if key.len() > limits::MAX_KEY_LEN {
        format!(
            "{} bytes, more than the limit of {}",
            key.len(),
            limits::MAX_KEY_LEN
        )
    } else if let Some(c) = key.chars().find(|c| c.is_control()) {
        format!("contains the control character {c:?}")
    } else {
        return Ok(());
    };
    Err(ValidationError::InvalidKey { reason })
}

/// Checks headers: at most [`limits::MAX_HEADERS`]; names are 1 to
/// [`limits::MAX_HEADER_NAME_LEN`] bytes of HTTP token characters (what NATS,
/// AMQP, Kafka and Redis all carry); values at most
/// [`limits::MAX_HEADER_VALUE_LEN`] bytes with no control characters but tab.
pub fn validate_headers(headers: &Headers) -> Result<(), ValidationError> {
    if headers.len() > limits::MAX_HEADERS {
        return Err(ValidationError::InvalidHeader {
            name: String::new(),
            reason: format!(
                "{} headers, more than the limit of {}",
                headers.len(),
                limits::MAX_HEADERS
            ),
        });
    }
    for (name, value) in headers {
        let invalid = |reason: String| ValidationError::InvalidHeader {
            name: escape(name),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("empty name".into()));
        }
        if name.len() > limits::MAX_HEADER_NAME_LEN {
            return Err(invalid(format!(
                "name is {} bytes, more than the limit of {}",
                name.len(),
                limits::MAX_HEADER_NAME_LEN
            )));
        }
        if let Some(c) = name.chars().find(|c| !is_token_char(*c)) {
            return Err(invalid(format!(
                "name contains {c:?}; allowed are letters, digits and !#$%&'*+-.^_`|~"
            )));
        }
        if name
            .get(..crate::wire::RESERVED_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(crate::wire::RESERVED_PREFIX))
        {
            return Err(invalid(format!(
                "names starting with {:?} are reserved for the toolkit",
                crate::wire::RESERVED_PREFIX
            )));
        }
        if value.len() > limits::MAX_HEADER_VALUE_LEN {
            return Err(invalid(format!(
                "value is {} bytes, more than the limit of {}",
                value.len(),
                limits::MAX_HEADER_VALUE_LEN
            )));
        }
        if let Some(c) = value.chars().find(|c| c.is_control() && *c != '\t') {
            return Err(invalid(format!(
                "value contains the control character {c:?}"
            )));
        }
    }
    Ok(())
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_past_year_9999_are_refused() {
        use std::time::{Duration, SystemTime};
        let b = || Message::builder("t", "x").key("k");
        let far = Duration::from_secs(10u64.pow(13));
        for built in [
            b().delay(far).build(),
            b().delay(Duration::MAX).build(),
            b().not_before(SystemTime::UNIX_EPOCH + far).build(),
        ] {
            assert_eq!(
                built.unwrap_err(),
                ValidationError::TimeOutOfRange { what: "not_before" }
            );
        }
        let year = Duration::from_secs(365 * 24 * 3600);
        let m = b().delay(year).build().unwrap();
        assert!(m.not_before.is_some_and(|t| t > SystemTime::now()));
    }

    #[test]
    fn builder_validates_and_sets_json_content_type() {
        let m = Message::json("orders.placed", &serde_json::json!({"id": 7}))
            .key("order-7")
            .header("trace-id", "abc")
            .build()
            .unwrap();
        assert_eq!(m.headers.get(CONTENT_TYPE).unwrap(), "application/json");
        assert_eq!(m.payload_json::<serde_json::Value>().unwrap()["id"], 7);
        assert_eq!(m.id.as_uuid().get_version_num(), 7);
        assert_eq!(m.attempts, 0);
    }

    #[test]
    fn ids_are_v7_and_increase() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<MessageId>().unwrap(), a);
        assert!("not-a-uuid".parse::<MessageId>().is_err());
    }

    #[test]
    fn bad_topics_are_refused() {
        for (topic, ok) in [
            ("orders", true),
            ("orders.placed.v1", true),
            ("orders-eu_1", true),
            ("", false),
            ("orders placed", false),
            ("orders\nplaced", false),
            ("orders.*", false),
            ("orders.>", false),
            (".orders", false),
            ("orders..placed", false),
            ("orders.", false),
            ("'; DROP TABLE outbox_messages; --", false),
            ("orders#eu", false),
            ("orders\x7f", false),
            // Past ASCII, each character is checked on its own.
            ("bestellungen.größe", true),
            ("注文.作成", true),
            ("orders\u{3000}placed", false),
            ("orders\u{85}", false),
            ("größe.*", false),
            ("größe..x", false),
        ] {
            assert_eq!(validate_topic(topic).is_ok(), ok, "{topic:?}");
        }
        let long = "a".repeat(limits::MAX_TOPIC_LEN + 1);
        assert!(matches!(
            validate_topic(&long),
            Err(ValidationError::TopicTooLong { .. })
        ));
    }

    #[test]
    fn bad_keys_headers_and_payloads_are_refused() {
        let b = || Message::builder("t", &b"x"[..]);
        assert!(b().key("").build().is_err());
        assert!(b().key("a\u{0}b").build().is_err());
        assert!(b()
            .key("k".repeat(limits::MAX_KEY_LEN + 1))
            .build()
            .is_err());
        assert!(b().header("", "v").build().is_err());
        assert!(b().header("bad name", "v").build().is_err());
        assert!(b().header("bad:name", "v").build().is_err());
        assert!(b().header("n", "line\r\nbreak").build().is_err());
        assert!(b().header("n", "tab\tok").build().is_ok());
        assert!(b().header("Outbox-Id", "spoof").build().is_err());
        let err = Message::builder("t", vec![0u8; 11])
            .max_payload(10)
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            ValidationError::PayloadTooLarge {
                size: 11,
                limit: 10
            }
        );
        let many: Vec<_> = (0..=limits::MAX_HEADERS)
            .map(|i| (format!("h{i}"), "v"))
            .collect();
        assert!(b().headers(many).build().is_err());
    }
}
