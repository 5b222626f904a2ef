//! Hiding credentials: URLs are shown with their password (and secret query
//! values) replaced by `***`, and error lines are scrubbed of every secret
//! the configuration holds before they are printed.

/// Whether a query option's value is a secret.
pub fn is_secret_key(key: &str) -> bool {
    outbox_core::redact::is_secret_param(key)
}

/// The URL with the password of its user info (`user:***@host`), a bare
/// user info (a NATS token) and secret-looking query values replaced by
/// `***`; comma-separated server lists too.
pub fn redact_url(url: &str) -> String {
    outbox_core::redact::url(url)
}

/// The secrets a URL holds: the password (or token) of each user info, and
/// the values of secret-looking query options. Both the raw and the
/// percent-decoded forms are returned, so that either can be scrubbed.
pub fn url_secrets(url: &str) -> Vec<String> {
    let mut found = outbox_core::redact::secrets(url);
    let decoded: Vec<String> = found.iter().map(|s| percent_decode(s)).collect();
    found.extend(decoded);
    found.retain(|s| s.len() >= 2);
    found.sort();
    found.dedup();
    // Longest first, so that a secret containing another is replaced whole.
    found.sort_by_key(|s| std::cmp::Reverse(s.len()));
    found
}

/// Replaces every occurrence of each secret in `line` with `***`.
pub fn scrub(line: &str, secrets: &[String]) -> String {
    let mut out = line.to_string();
    for s in secrets {
        if !s.is_empty() {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

/// Decodes `%XX` escapes (invalid escapes are kept as they are; the result
/// is lossy UTF-8).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("nats://tok@h:4222?mode=core"),
            "nats://***@h:4222?mode=core"
        );
        assert_eq!(
            redact_url("redis://h:6379/0?pass=s3&protocol=resp3#insecure"),
            "redis://h:6379/0?pass=***&protocol=resp3#insecure"
        );
        assert_eq!(
            redact_url("kafka://a:9092,b:9092?property.sasl.password=x&prefix=p."),
            "kafka://a:9092,b:9092?property.sasl.password=***&prefix=p."
        );
        assert_eq!(
            redact_url("nats://u:p@a:4222,nats://v:q@b:4222"),
            "nats://u:***@a:4222,nats://v:***@b:4222"
        );
        assert_eq!(redact_url("sqlite://relay.db"), "sqlite://relay.db");
        // A lone user name is not a secret, except a NATS token.
        assert_eq!(
            redact_url("mysql://root@127.0.0.1:3306/test"),
            "mysql://root@127.0.0.1:3306/test"
        );
        assert!(url_secrets("mysql://root@h/db").is_empty());
        assert_eq!(
            url_secrets("nats://tok3n@h:4222"),
            vec!["tok3n".to_string()]
        );
    }

    #[test]
    fn secrets_are_found_and_scrubbed() {
        let s = url_secrets("postgres://app:p%40ss@db:5432/app?sslpassword=zz");
        assert!(s.contains(&"p%40ss".to_string()), "{s:?}");
        assert!(s.contains(&"p@ss".to_string()), "{s:?}");
        assert!(s.contains(&"zz".to_string()), "{s:?}");
        assert_eq!(
            scrub("failed for p@ss and zz", &s),
            "failed for *** and ***"
        );
        // A password that breaks the URL syntax is found as well.
        let s = url_secrets("redis://u:pa#ss/x@h:6379");
        assert!(s.contains(&"pa#ss/x".to_string()), "{s:?}");
        assert_eq!(
            scrub("url redis://u:pa#ss/x@h:6379 is invalid", &s),
            "url redis://u:***@h:6379 is invalid"
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%3d"), "a/b=");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
