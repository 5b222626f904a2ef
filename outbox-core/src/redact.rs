//! Redaction of credentials in URLs, for `Debug` output and logs.

/// Query parameters whose values are hidden (matched case-insensitively as
/// a substring of the parameter name).
const SECRET_PARAMS: &[&str] = &["pass", "secret", "token", "credential"];

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

fn one(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        // A user with a password keeps the user; a bare user-info part may
        // be a token (NATS), so it is hidden whole.
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***{host}"),
                None => format!("***{host}"),
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
                    Some((k, _))
                        if SECRET_PARAMS
                            .iter()
                            .any(|s| k.to_ascii_lowercase().contains(s)) =>
                    {
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
            ("not a url", "not a url"),
            ("", ""),
        ] {
            assert_eq!(url(given), shown, "{given}");
        }
    }
}
