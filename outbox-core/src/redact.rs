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
/// ```
/// use outbox_core::redact::url;
/// assert_eq!(url("amqp://guest:guest@h:5672/%2f"), "amqp://guest:***@h:5672/%2f");
/// assert_eq!(url("nats://s3cr3t@h:4222"), "nats://***@h:4222");
/// assert_eq!(url("redis://h:6379/0?password=x&db=1"), "redis://h:6379/0?password=***&db=1");
/// ```
pub fn url(url: &str) -> String {
    url.split(',').map(one).collect::<Vec<_>>().join(",")
}

/// Whether a user-info part without `:` is a token in URLs of this scheme
/// (`nats://`, `tls://`, `ws://`, `wss://`, as NATS clients use them).
pub fn bare_userinfo_is_token(scheme: &str) -> bool {
    let scheme = scheme.trim_end_matches("://").to_ascii_lowercase();
    matches!(scheme.as_str(), "nats" | "tls" | "ws" | "wss")
}

fn one(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        // A user with a password keeps the user; in a NATS URL a bare
        // user-info part is a token, so it is hidden whole.
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***{host}"),
                None if bare_userinfo_is_token(scheme) => format!("***{host}"),
                None => format!("{userinfo}{host}"),
            }
        }
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if is_secret_param(k) => {
                        format!("{k}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            match fragment {
                Some(f) => format!("{path}?{}#{f}", query.join("&")),
                None => format!("{path}?{}", query.join("&")),
            }
        }
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{tail}")
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
            ("not a url", "not a url"),
            ("", ""),
        ] {
            assert_eq!(url(given), shown, "{given}");
        }
    }
}
