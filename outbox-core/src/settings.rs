//! Small pieces every adapter's configuration shares: durations as whole
//! milliseconds in serde, and the words a boolean setting accepts.

/// Durations as whole milliseconds in serde:
/// `#[serde(with = "outbox_core::settings::millis")]`.
pub mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the duration as whole milliseconds (saturating).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Reads whole milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// A boolean setting: `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`, any
/// case, surrounding spaces ignored; `None` for anything else.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Refuses a misspelt variable, which would otherwise be ignored without
/// a word: the first of `names` that starts with `prefix` but is not
/// `prefix` followed by one of `known` comes back as a message naming it
/// and the known ones.
pub fn refuse_unknown<'a>(
    prefix: &str,
    known: &[&str],
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    let unknown = names.into_iter().find(|name| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| !known.contains(&rest))
    });
    match unknown {
        Some(name) => Err(format!(
            "unknown variable {name} (known: {})",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_bool, refuse_unknown};

    #[test]
    fn misspelt_names_are_refused() {
        let known = ["URL", "MODE"];
        let names = ["PATH", "OUTBOX_X_URL", "OUTBOX_X_MDOE", "OUTBOX_Y_Z"];
        assert_eq!(
            refuse_unknown("OUTBOX_X_", &known, names),
            Err("unknown variable OUTBOX_X_MDOE (known: URL, MODE)".to_string())
        );
        assert_eq!(
            refuse_unknown("OUTBOX_X_", &known, ["OUTBOX_X_URL"]),
            Ok(())
        );
    }

    #[test]
    fn booleans() {
        assert_eq!(parse_bool(" Yes "), Some(true));
        assert_eq!(parse_bool("OFF"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
