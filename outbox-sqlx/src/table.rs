//! [`TableName`]: the outbox table's name, validated once so that it can be
//! placed in SQL text safely.

use std::fmt;

use outbox_core::{Error, ValidationError};

/// Longest table (or schema) name part. Derived names (`<table>_partitions`,
/// `<table>_pending`, ...) must stay within PostgreSQL's 63-byte identifiers.
pub const MAX_NAME_LEN: usize = 40;

/// A validated outbox table name, optionally schema-qualified (`outbox_messages`,
/// `app.outbox_messages`).
///
/// Each part is 1 to [`MAX_NAME_LEN`] characters of lowercase ASCII letters,
/// digits and `_`, not starting with a digit. Anything else (quotes,
/// semicolons, spaces, uppercase) is refused: the name is placed in SQL text,
/// so it is checked, never escaped.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| -> Error {
            Error::from(ValidationError::InvalidName {
                what: "table name",
                value: s
                    .chars()
                    .take(80)
                    .collect::<String>()
                    .escape_debug()
                    .to_string(),
                reason: reason.to_string(),
            })
            .with_backend("sqlx")
        };
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() > 2 {
            return Err(invalid("at most one '.' (schema.table)"));
        }
        for p in &parts {
            if p.is_empty() {
                return Err(invalid("empty name part"));
            }
            if p.len() > MAX_NAME_LEN {
                return Err(invalid("a name part is longer than 40 characters"));
            }
            if p.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(invalid("a name part may not start with a digit"));
            }
            if !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(invalid(
                    "only lowercase letters, digits and '_' are allowed",
                ));
            }
            if RESERVED.binary_search(p).is_ok() {
                return Err(invalid(
                    "a reserved SQL word (names are placed in SQL unquoted)",
                ));
            }
        }
        Ok(match parts.as_slice() {
            [schema, name] => TableName {
                schema: Some(schema.to_string()),
                name: name.to_string(),
            },
            _ => TableName {
                schema: None,
                name: s.to_string(),
            },
        })
    }

    /// The schema part, if any.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The table part.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The qualified name of the table, or of a companion object when
    /// `suffix` is not empty (`app.outbox_messages_partitions`).
    pub fn qualified(&self, suffix: &str) -> String {
        match &self.schema {
            Some(s) => format!("{s}.{}{suffix}", self.name),
            None => format!("{}{suffix}", self.name),
        }
    }

    /// An unqualified companion name (for indexes, which live in the table's
    /// schema).
    pub fn local(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.name)
    }

    /// A name usable as a LISTEN/NOTIFY channel: `<schema>_<table>_wakeup`,
    /// or, where that passes PostgreSQL's 63 bytes (which `pg_notify`
    /// refuses and `LISTEN` cuts short), its first 38 bytes and a hash of
    /// all of it.
    pub fn channel(&self) -> String {
        let full = format!("{}_wakeup", self.qualified("").replace('.', "_"));
        if full.len() <= 63 {
            return full;
        }
        // FNV-1a: the same in every process and version, as the enqueue
        // side and the relay must agree on it.
        let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let start = full.get(..38).unwrap_or(&full);
        format!("{start}_{hash:016x}_wakeup")
    }
}

impl Default for TableName {
    fn default() -> Self {
        TableName {
            schema: None,
            name: DEFAULT_TABLE.to_string(),
        }
    }
}

/// Words PostgreSQL, MySQL/MariaDB or SQLite reserve, which an unquoted
/// name may not be (sorted, for the binary search).
#[rustfmt::skip]
const RESERVED: &[&str] = &[
    "accessible", "add", "all", "alter", "analyse", "analyze", "and", "any", "array", "as",
    "asc", "asensitive", "asymmetric", "authorization", "before", "between", "bigint", "binary",
    "blob", "both", "by", "call", "cascade", "case", "cast", "change", "char", "character",
    "check", "collate", "collation", "column", "concurrently", "condition", "constraint",
    "continue", "convert", "create", "cross", "current_catalog", "current_date", "current_role",
    "current_schema", "current_time", "current_timestamp", "current_user", "cursor", "database",
    "databases", "day_hour", "day_microsecond", "day_minute", "day_second", "dec", "decimal",
    "declare", "default", "deferrable", "delayed", "delete", "desc", "describe",
    "deterministic", "distinct", "distinctrow", "div", "do", "double", "drop", "dual", "each",
    "else", "elseif", "enclosed", "end", "escaped", "except", "exists", "exit", "explain",
    "false", "fetch", "float", "for", "force", "foreign", "freeze", "from", "full", "fulltext",
    "generated", "get", "grant", "group", "having", "high_priority", "hour_microsecond",
    "hour_minute", "hour_second", "if", "ignore", "ilike", "in", "index", "infile", "initially",
    "inner", "inout", "insensitive", "insert", "int", "integer", "intersect", "interval",
    "into", "is", "isnull", "iterate", "join", "key", "keys", "kill", "lateral", "leading",
    "leave", "left", "like", "limit", "linear", "lines", "load", "localtime", "localtimestamp",
    "lock", "long", "loop", "low_priority", "match", "mod", "modifies", "natural", "not",
    "notnull", "null", "numeric", "offset", "on", "only", "optimize", "option", "optionally",
    "or", "order", "out", "outer", "outfile", "over", "overlaps", "partition", "placing",
    "precision", "primary", "procedure", "purge", "range", "read", "reads", "real",
    "references", "regexp", "release", "rename", "repeat", "replace", "require", "restrict",
    "return", "returning", "revoke", "right", "rlike", "row", "rows", "schema", "schemas",
    "select", "sensitive", "separator", "session_user", "set", "show", "similar", "smallint",
    "some", "spatial", "specific", "sql", "ssl", "starting", "stored", "straight_join",
    "symmetric", "system_user", "table", "tablesample", "terminated", "then", "to", "trailing",
    "trigger", "true", "undo", "union", "unique", "unlock", "unsigned", "update", "usage",
    "use", "user", "using", "utc_date", "utc_time", "utc_timestamp", "values", "varchar",
    "variadic", "verbose", "virtual", "when", "where", "while", "window", "with", "write",
    "xor", "year_month", "zerofill",
];

/// The default table name.
pub const DEFAULT_TABLE: &str = "outbox_messages";

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.qualified(""))
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TableName({self})")
    }
}

impl std::str::FromStr for TableName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        TableName::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_never_escaped() {
        for ok in ["outbox_messages", "app.outbox", "_x1", "a"] {
            assert!(TableName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "outbox; DROP TABLE users; --",
            "outbox\"",
            "a.b.c",
            ".x",
            "x.",
            "1abc",
            "Outbox",
            "out box",
            "outbox'--",
            &"x".repeat(41),
            "order",
            "user.outbox",
            "app.select",
        ] {
            let e = TableName::parse(bad).unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::InvalidInput, "{bad}");
        }
        let t = TableName::parse("app.events").unwrap();
        assert_eq!(t.qualified("_partitions"), "app.events_partitions");
        assert_eq!(t.local("_pending"), "events_pending");
        assert_eq!(t.channel(), "app_events_wakeup");
    }

    #[test]
    fn reserved_words_are_sorted_lowercase_and_unique() {
        assert!(RESERVED.windows(2).all(|w| w[0] < w[1]));
        assert!(RESERVED
            .iter()
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        assert!(TableName::parse("orders").is_ok(), "only whole words");
    }

    #[test]
    fn long_names_get_a_channel_within_63_bytes() {
        let long = format!("{}.{}", "s".repeat(40), "t".repeat(40));
        let a = TableName::parse(&long).unwrap().channel();
        assert!(a.len() <= 63, "{a}");
        assert!(
            a.starts_with(&"s".repeat(38)) && a.ends_with("_wakeup"),
            "{a}"
        );
        assert_eq!(a, TableName::parse(&long).unwrap().channel(), "stable");
        let other = format!("{}.{}u", "s".repeat(40), "t".repeat(39));
        assert_ne!(a, TableName::parse(&other).unwrap().channel());
        // Exactly 63 bytes keeps the plain name.
        let edge = format!("{}.{}", "s".repeat(15), "t".repeat(40));
        assert_eq!(
            TableName::parse(&edge).unwrap().channel(),
            format!("{}_{}_wakeup", "s".repeat(15), "t".repeat(40))
        );
    }
}
