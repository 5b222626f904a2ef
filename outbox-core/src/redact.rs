//! Redaction of credentials in URLs, for `Debug` output and logs.

/// Query parameters whose values are hidden (matched case-insensitively as
/// a substring of the parameter name).
const SECRET_PARAMS: &[&str] = &["pass", "secret", "token", "credential", "key.pem"];

/// Whether a URL query parameter (or option) named `name` holds a secret:
/// its name contains `pass`, `secret`, `token`, `credential` or `key.pem`.
pub fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|s| name.contains(s))
}

/// `url` with its password, token and secret query values replaced by `***`.
/// Several URLs separated by commas are each redacted.
///
/// A password that breaks the URL syntax (an unencoded `/`, `?`, `#`, `,` or
/// `@`) is hidden too: when an `@` follows the host part, everything up to
/// the last `@` counts as user info, which may hide more than the password
/// but never shows it.
///
/// ```
/// use outbox_core::redact::url;
/// assert_eq!(url("amqp://guest:guest@h:5672/%2f"), "amqp://guest:***@h:5672/%2f");
/// assert_eq!(url("nats://s3cr3t@h:4222"), "nats://***@h:4222");
/// assert_eq!(url("redis://h:6379/0?password=x&db=1"), "redis://h:6379/0?password=***&db=1");
/// assert_eq!(url("redis://u:pa#ss@h:6379"), "redis://u:***@h:6379");
/// ```
pub fn url(url: &str) -> String {
    urls(url)
        .into_iter()
        .map(|u| {
            let parsed = Parsed::of(u);
            let authority = match parsed.userinfo {
                // A user with a password keeps the user; in a NATS URL a
                // bare user-info part is a token, so it is hidden whole.
                Some(info) => match info.split_once(':') {
                    Some((user, _)) => format!("{user}:***@"),
                    None if bare_userinfo_is_token(parsed.scheme) => "***@".to_string(),
                    None => format!("{info}@"),
                },
                None => String::new(),
            };
            let rest = match parsed.rest.split_once('?') {
                Some((path, query)) => {
                    let (query, fragment) = match query.split_once('#') {
                        Some((q, f)) => (q, Some(f)),
                        None => (query, None),
                    };
                    let query: Vec<String> = query
                        .split('&')
                        .map(|pair| match pair.split_once('=') {
                            Some((k, _)) if is_secret_param(k) => format!("{k}=***"),
                            _ => pair.to_string(),
                        })
                        .collect();
                    match fragment {
                        Some(f) => format!("{path}?{}#{f}", query.join("&")),
                        None => format!("{path}?{}", query.join("&")),
                    }
                }
                None => parsed.rest.to_string(),
            };
            format!("{}{authority}{rest}", parsed.scheme)
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The secrets `url` holds, as written: the password (or NATS token) of
/// each user info and the values of secret-looking query parameters, so
/// that text quoting the URL can be scrubbed of them.
pub fn secrets(url: &str) -> Vec<String> {
    let mut found = Vec::new();
    for u in urls(url) {
        let parsed = Parsed::of(u);
        if let Some(info) = parsed.userinfo {
            match info.split_once(':') {
                Some((_, password)) => found.push(password.to_string()),
                None if bare_userinfo_is_token(parsed.scheme) => found.push(info.to_string()),
                None => {}
            }
        }
        if let Some((_, query)) = parsed.rest.split_once('?') {
            let query = query.split('#').next().unwrap_or("");
            for pair in query.split('&') {
                if let Some((k, v)) = pair.split_once('=') {
                    if is_secret_param(k) {
                        found.push(v.to_string());
                    }
                }
            }
        }
    }
    found
}

/// Whether a user-info part without `:` is a token in URLs of this scheme
/// (`nats://`, `tls://`, `ws://`, `wss://`, as NATS clients use them).
pub fn bare_userinfo_is_token(scheme: &str) -> bool {
    let scheme = scheme.trim_end_matches("://").to_ascii_lowercase();
    matches!(scheme.as_str(), "nats" | "tls" | "ws" | "wss")
}

/// The URLs of a comma-separated list. A comma inside a user info (an
/// unencoded password) does not split: a piece that holds an `@` but no
/// scheme joins the piece before it when that one has no `@` yet.
fn urls(list: &str) -> Vec<&str> {
    // (start, end) of each URL in `list`.
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    for end in list.match_indices(',').map(|(i, _)| i).chain([list.len()]) {
        let piece = &list[start..end];
        match spans.last_mut() {
            Some(last)
                if !piece.contains("://")
                    && piece.contains('@')
                    && !list[last.0..last.1].contains('@') =>
            {
                last.1 = end;
            }
            _ => spans.push((start, end)),
        }
        start = end + 1;
    }
    spans.into_iter().map(|(a, b)| &list[a..b]).collect()
}

/// One URL split into scheme (with `://`), user info and the rest.
struct Parsed<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    rest: &'a str,
}

impl<'a> Parsed<'a> {
    fn of(url: &'a str) -> Self {
        let (scheme, after) = match url.find("://") {
            Some(i) => url.split_at(i + 3),
            None => ("", url),
        };
        let authority = &after[..after.find(['/', '?', '#']).unwrap_or(after.len())];
        // The last `@` of the authority ends the user info; without one
        // there, an `@` further on means a password with `/`, `?` or `#`
        // in it, and the last `@` of all ends it.
        let at = authority.rfind('@').or_else(|| after.rfind('@'));
        match at {
            Some(at) => Parsed {
                scheme,
                userinfo: Some(&after[..at]),
                rest: &after[at + 1..],
            },
            None => Parsed {
                scheme,
                userinfo: None,
                rest: after,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn hides_passwords_tokens_and_secret_parameters() {
        for (given, shown) in [
            ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
            ("postgres://h:5432/db", "postgres://h:5432/db"),
            (
                "nats://a:b@h1:4222,nats://c:d@h2:4222",
                "nats://a:***@h1:4222,nats://c:***@h2:4222",
            ),
            ("nats://tok@h:4222?mode=core", "nats://***@h:4222?mode=core"),
            (
                "kafka://a:9092?property.sasl.password=x&prefix=p.",
                "kafka://a:9092?property.sasl.password=***&prefix=p.",
            ),
            (
                "redis://h/0?pass=s3&protocol=resp3#insecure",
                "redis://h/0?pass=***&protocol=resp3#insecure",
            ),
            ("mysql://root@h:3306/test", "mysql://root@h:3306/test"),
            // Passwords that break the URL syntax are hidden all the same.
            ("redis://u:pa#ss@h:6379", "redis://u:***@h:6379"),
            ("amqp://u:ab/cd@h/%2f", "amqp://u:***@h/%2f"),
            ("amqp://u:ab?cd@h:5672", "amqp://u:***@h:5672"),
            ("amqp://u:a,b@h:5672", "amqp://u:***@h:5672"),
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            (
                "nats://a:b,c@h1:4222,nats://d:e@h2:4222",
                "nats://a:***@h1:4222,nats://d:***@h2:4222",
            ),
            ("nats://h1:4222,h2:4222", "nats://h1:4222,h2:4222"),
            ("not a url", "not a url"),
            ("", ""),
        ] {
            assert_eq!(url(given), shown, "{given}");
        }
    }
}
