//! What leaves the HTTP client for the database: redacted URLs, and response text that
//! Postgres can store. Webhook URLs may carry credentials (`user:pw@`, `?token=`) that only
//! admins may read, while delivery rows and job errors are read by workers and producers.
//! Response bodies and headers are whatever a remote endpoint sent: `text` and `jsonb`
//! refuse NUL and invalid UTF-8, so they are made valid and bounded here.

use http::HeaderMap;

/// Stands in for a URL that cannot be parsed (its text could hold anything).
pub const UNPARSABLE_URL: &str = "(unparsable URL)";
/// Replaces every query value (and every query part without a key).
pub const REDACTED: &str = "REDACTED";
/// Appended to text cut short.
pub const TRUNCATED: &str = "…[truncated]";

/// At most this many response headers are kept...
pub const MAX_HEADERS: usize = 64;
/// ...and at most this many bytes of header names and values in all.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// `url::Url::parse`, remembering the last URL each thread parsed: the deliveries of a
/// queue share one URL, and each needs it parsed three times (the request, what to redact from
/// the response, the delivery log's redacted form). URL parsing was 8% of the HTTP thread's
/// time (`perf`). The error is the parser's message.
pub fn parse_url(text: &str) -> Result<url::Url, String> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(String, url::Url)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((seen, url)) = last.as_ref() {
            if seen == text {
                return Ok(url.clone());
            }
        }
        let url = url::Url::parse(text).map_err(|e| e.to_string())?;
        *last = Some((text.to_string(), url.clone()));
        Ok(url)
    })
}

/// `scheme://host[:port]/path` with userinfo removed, every query value replaced by
/// `REDACTED` (keys kept) and the fragment dropped. Text that does not parse as a URL
/// becomes a fixed placeholder.
pub fn redact_url(text: &str) -> String {
    match parse_url(text) {
        Ok(url) => redact_parsed(&url),
        Err(_) => UNPARSABLE_URL.to_string(),
    }
}

/// [`redact_url`] for a URL already parsed.
pub fn redact_parsed(url: &url::Url) -> String {
    let Some(host) = url.host_str() else {
        // mailto:, data: and the like: nothing in them is safe to show.
        return format!("{}:{REDACTED}", url.scheme());
    };
    let mut out = format!("{}://{host}", url.scheme());
    if let Some(port) = url.port() {
        out.push_str(&format!(":{port}"));
    }
    out.push_str(url.path());
    if let Some(query) = url.query() {
        out.push('?');
        out.push_str(&redact_query(query));
    }
    out
}

/// `a=1&b=2&flag` -> `a=REDACTED&b=REDACTED&REDACTED`: a part without `=` may be a bare
/// token (`?s3cr3t`), so it is not kept either.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|part| match part.split_once('=') {
            Some((key, _)) => format!("{key}={REDACTED}"),
            None if part.is_empty() => String::new(),
            None => REDACTED.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A `Location`-like header value, which may be relative to the URL that answered.
fn redact_reference(value: &str, base: &url::Url) -> String {
    match base.join(value) {
        Ok(url) => redact_parsed(&url),
        Err(_) => UNPARSABLE_URL.to_string(),
    }
}

/// Makes text storable: invalid UTF-8 and NUL (which neither `text` nor `jsonb` can hold)
/// become U+FFFD, and the result is cut to at most `max` bytes on a character boundary,
/// with [`TRUNCATED`] appended when anything was cut here or `cut_before` says the input
/// was already incomplete.
pub fn storable_text(bytes: &[u8], max: usize, cut_before: bool) -> String {
    let mut text = String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}");
    let mut cut = cut_before;
    if text.len() > max {
        text.truncate(floor_char_boundary(&text, max));
        cut = true;
    }
    if cut {
        text.push_str(TRUNCATED);
    }
    text
}

/// The largest index `<= max` that is a char boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Response headers as a JSON object: values made storable, repeated headers joined with
/// `", "`, at most [`MAX_HEADERS`] names and [`MAX_HEADER_BYTES`] bytes kept. URLs the
/// endpoint sends back (`Location`, `Content-Location`) can echo the request's query
/// (a trailing-slash redirect keeps `?token=`), so they are redacted; cookies are dropped;
/// any of `secrets` echoed in a value is replaced.
pub fn storable_headers(
    headers: &HeaderMap,
    base: &url::Url,
    secrets: &[String],
) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    let mut budget = MAX_HEADER_BYTES;
    for name in headers.keys() {
        if out.len() >= MAX_HEADERS || budget <= name.as_str().len() {
            break;
        }
        let raw: Vec<Vec<u8>> = headers
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect();
        let value = match name.as_str() {
            "location" | "content-location" => raw
                .iter()
                .map(|v| redact_reference(&String::from_utf8_lossy(v), base))
                .collect::<Vec<_>>()
                .join(", "),
            "set-cookie" => REDACTED.to_string(),
            _ => raw
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect::<Vec<_>>()
                .join(", "),
        };
        budget -= name.as_str().len();
        let value = super::error::redact_all(&value, secrets);
        let value = storable_text(value.as_bytes(), budget, false);
        budget = budget.saturating_sub(value.len());
        out.insert(name.as_str().to_string(), serde_json::Value::String(value));
    }
    out
}

#[cfg(test)]
mod unit {
    use super::*;
    use http::header::{HeaderName, HeaderValue};

    #[test]
    fn the_remembered_url_is_only_ever_the_one_asked_for() {
        let urls = [
            "https://a.example/hook?token=one",
            "https://b.example/other",
            "not a url",
            "https://a.example/hook?token=one",
            "https://a.example/hook?token=two",
        ];
        for _ in 0..2 {
            for text in urls {
                let direct = url::Url::parse(text).map_err(|e| e.to_string());
                assert_eq!(parse_url(text), direct, "{text}");
                assert_eq!(parse_url(text), direct, "{text}, asked again");
            }
        }
    }

    #[test]
    fn urls_lose_credentials_query_values_and_fragments() {
        for (input, expected) in [
            ("https://example.com/hook", "https://example.com/hook"),
            ("https://example.com", "https://example.com/"),
            (
                "https://user:pw@example.com:8443/a/b?token=s3cr3t&x=1#frag",
                "https://example.com:8443/a/b?token=REDACTED&x=REDACTED",
            ),
            ("http://u@example.com:80/p", "http://example.com/p"),
            (
                "https://example.com/p?s3cr3t",
                "https://example.com/p?REDACTED",
            ),
            (
                "https://example.com/p?a=&b=c=d&&",
                "https://example.com/p?a=REDACTED&b=REDACTED&&",
            ),
            ("https://example.com/p?", "https://example.com/p?"),
            ("http://2130706433/x?k=v", "http://127.0.0.1/x?k=REDACTED"),
            ("http://[::ffff:127.0.0.1]:9/", "http://[::ffff:7f00:1]:9/"),
            ("mailto:someone@example.com", "mailto:REDACTED"),
        ] {
            assert_eq!(redact_url(input), expected, "{input}");
        }
        for junk in [
            "",
            "not a url",
            "http://",
            "https://exa mple.com/?token=s3cr3t",
            "http://[::1/",
        ] {
            assert_eq!(redact_url(junk), UNPARSABLE_URL, "{junk:?}");
        }
    }

    #[test]
    fn text_is_valid_utf8_without_nul_and_cut_on_a_char_boundary() {
        assert_eq!(storable_text(b"a\0b", 100, false), "a\u{FFFD}b");
        assert_eq!(
            storable_text(b"\xff\xfeok", 100, false),
            "\u{FFFD}\u{FFFD}ok"
        );
        assert_eq!(storable_text(b"abc", 100, true), format!("abc{TRUNCATED}"));
        // "é" is two bytes: a cut at 2 must not split it.
        assert_eq!(
            storable_text("aé".as_bytes(), 2, false),
            format!("a{TRUNCATED}")
        );
        assert_eq!(storable_text("aé".as_bytes(), 3, false), "aé");
        // Replacement characters are three bytes each: the cap holds after replacing.
        let text = storable_text(&[0u8; 10], 10, false);
        assert_eq!(text, format!("{}{TRUNCATED}", "\u{FFFD}".repeat(3)));
        assert_eq!(storable_text(b"abc", 0, false), TRUNCATED);
        for text in [
            storable_text(
                &(0..=255u8).cycle().take(5000).collect::<Vec<_>>(),
                1000,
                false,
            ),
            storable_text(&[0xe2, 0x82], 1000, false),
        ] {
            assert!(!text.contains('\0'));
            // jsonb accepts it: serde_json escapes nothing as \u0000.
            assert!(!serde_json::to_string(&text).unwrap().contains("\\u0000"));
            assert!(text.len() <= 1000 + TRUNCATED.len());
        }
    }

    #[test]
    fn headers_are_bounded_redacted_and_storable() {
        let base = url::Url::parse("https://example.com/hook?token=s3cr3t").unwrap();
        let mut h = HeaderMap::new();
        h.insert("location", HeaderValue::from_static("/hook/?token=s3cr3t"));
        h.insert(
            "content-location",
            HeaderValue::from_static("https://u:p@other.example/x?y=z"),
        );
        h.insert("set-cookie", HeaderValue::from_static("session=abc"));
        h.insert("x-latin1", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        h.append("x-many", HeaderValue::from_static("1"));
        h.append("x-many", HeaderValue::from_static("2"));
        h.insert("x-echo", HeaderValue::from_static("Bearer t0k3n-value"));
        let out = storable_headers(&h, &base, &["t0k3n-value".to_string()]);
        assert_eq!(out["location"], "https://example.com/hook/?token=REDACTED");
        assert_eq!(
            out["content-location"],
            "https://other.example/x?y=REDACTED"
        );
        assert_eq!(out["set-cookie"], REDACTED);
        assert_eq!(out["x-latin1"], "caf\u{FFFD}");
        assert_eq!(out["x-many"], "1, 2");
        assert_eq!(out["x-echo"], "Bearer [redacted]");
        assert!(!serde_json::to_string(&out).unwrap().contains("s3cr3t"));

        let mut many = HeaderMap::new();
        for i in 0..200 {
            let name = HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap();
            many.insert(name, HeaderValue::from_static("v"));
        }
        assert_eq!(storable_headers(&many, &base, &[]).len(), MAX_HEADERS);

        let mut big = HeaderMap::new();
        let long = "x".repeat(6000);
        for i in 0..4 {
            let name = HeaderName::from_bytes(format!("x-big{i}").as_bytes()).unwrap();
            big.insert(name, HeaderValue::from_str(&long).unwrap());
        }
        let kept = storable_headers(&big, &base, &[]);
        let bytes: usize = kept
            .iter()
            .map(|(k, v)| k.len() + v.as_str().unwrap().len())
            .sum();
        assert!(
            bytes <= MAX_HEADER_BYTES + kept.len() * TRUNCATED.len(),
            "{bytes}"
        );
        assert!(
            kept.len() < 4
                && kept
                    .values()
                    .any(|v| v.as_str().unwrap().ends_with(TRUNCATED))
        );
    }
}
