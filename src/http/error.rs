//! Why a delivery did not succeed, and the one place that turns that into what is recorded:
//! an outcome kind (`retry` or `failed`) and a message. The message goes into the job's
//! `last_error`, which its producer reads, so it never carries the URL (lower layers' errors
//! quote it), its query, userinfo or host, a header or the secret.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::StatusCode;

use super::connect::ConnectError;
use super::ssrf::{Refused, ResolveError};
use super::Delivery;

/// Messages are kept short: they are stored on every attempt.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Why a redirect was not followed although the queue allows following them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RedirectRefused {
    #[error("more than {0} redirects")]
    TooMany(usize),
    #[error("redirect to a URL whose scheme is not http or https")]
    Scheme,
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("the queue has no webhook or callback URL any more")]
    NoUrl,
    /// Holds `url::ParseError`'s text, which names the defect, never the input.
    #[error("the webhook URL is invalid: {0}")]
    InvalidUrl(String),
    #[error("the webhook URL's scheme is not http or https")]
    Scheme,
    #[error("the webhook URL has no host")]
    NoHost,
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("invalid HTTP method")]
    Method,
    /// The name may be anything an admin pasted (a whole `Authorization: ...` line): the
    /// message counts instead of quoting it.
    #[error("webhook header number {0} has an invalid name")]
    HeaderName(usize),
    #[error("webhook header {0} has a value that is not a string or not valid in HTTP")]
    HeaderValue(String),
    #[error("the job id cannot be sent as a webhook-id header")]
    JobId,
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("timed out connecting after {} s", super::CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("redirect refused: {0}")]
    Redirect(RedirectRefused),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("request failed: {0}")]
    Transport(String),
    #[error("HTTP {0}")]
    Status(StatusCode),
    /// A 3xx answer: not followed because the queue does not follow redirects, or (when it
    /// does) because it had no usable Location. The Location is not quoted: it can echo
    /// the query and it names a target; the redacted form is in the delivery's headers.
    #[error("HTTP {status}: redirect not followed ({})", if *.following { "no usable Location header" } else { "the queue's webhook_follow_redirects is off" })]
    Redirected { status: StatusCode, following: bool },
    /// The status line arrived, then the body failed: the status decides (a 2xx is a
    /// delivery, with this as a note), the body is kept as far as it came.
    #[error("HTTP {status}, then reading the response body {cause}")]
    Body {
        status: StatusCode,
        cause: BodyFailure,
    },
    /// Claimed ahead of a free request slot, the job waited so long for one that its lease
    /// would not cover the request: it is not sent, and tried again later.
    #[error("not sent: waited {0} ms for a request slot (the queue's webhook_max_in_flight)")]
    SlotWait(u64),
    /// The dispatcher could not use what the claim described (see [`DeliveryError::unusable`]).
    #[error("unusable webhook settings: {0}")]
    Unusable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum BodyFailure {
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("failed: {0}")]
    Broken(String),
}

/// What the outcome of a failed attempt is: retry later, or give up.
pub fn status_kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "delivered",
        429 | 500..=599 => "retry",
        300..=499 => "failed",
        _ => "retry",
    }
}

impl DeliveryError {
    /// The one mapping to what is recorded: (`retry` | `failed`, or `delivered` for a 2xx
    /// whose body broke afterwards; message).
    pub fn verdict(&self) -> (&'static str, String) {
        use DeliveryError::*;
        let kind = match self {
            Timeout(_) | ConnectTimeout | Connect(_) | Transport(_) | SlotWait(_) => "retry",
            Status(s) => status_kind(*s),
            // The status is the receiver's answer: a 2xx acknowledged the webhook, so a body
            // that breaks afterwards does not make it sent again; a final 4xx stays final.
            Body { status, .. } => status_kind(*status),
            NoUrl
            | InvalidUrl(_)
            | Scheme
            | NoHost
            | Refused(_)
            | Method
            | HeaderName(_)
            | HeaderValue(_)
            | JobId
            | Redirect(_)
            | Request(_)
            | Redirected { .. }
            | Unusable(_) => "failed",
        };
        let mut message = self.to_string().replace('\0', "\u{FFFD}");
        if message.len() > MAX_MESSAGE_BYTES {
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        (kind, message)
    }

    /// Classifies a connection that could not be made. The guard's refusal is permanent:
    /// retrying cannot make the address public.
    pub fn from_connect(e: ConnectError, d: &Delivery) -> DeliveryError {
        match e {
            ConnectError::Resolve(ResolveError::Refused(refused)) => {
                DeliveryError::Refused(refused)
            }
            other => DeliveryError::Connect(scrub(&source_chain(&other), d)),
        }
    }

    /// Classifies an error from sending the request (before any status arrived).
    pub fn from_hyper(e: &hyper::Error, d: &Delivery) -> DeliveryError {
        if e.is_timeout() {
            return DeliveryError::Timeout(d.effective_timeout_ms());
        }
        DeliveryError::Transport(scrub(&source_chain(e), d))
    }

    /// Classifies an error while reading the body of a response with `status`.
    pub fn from_body(e: &hyper::Error, status: StatusCode, d: &Delivery) -> DeliveryError {
        let cause = if e.is_timeout() {
            BodyFailure::Timeout(d.effective_timeout_ms())
        } else {
            BodyFailure::Broken(scrub(&source_chain(e), d))
        };
        DeliveryError::Body { status, cause }
    }

    /// For a claim the dispatcher could not decode. serde's messages quote the offending
    /// value (a header value, a secret...), so only the kinds that name a field are kept.
    pub fn unusable(e: &serde_json::Error) -> DeliveryError {
        let text = e.to_string();
        let safe = ["missing field `", "unknown field `", "duplicate field `"]
            .iter()
            .any(|p| text.starts_with(p));
        DeliveryError::Unusable(if safe {
            text.split(" at line ")
                .next()
                .unwrap_or_default()
                .to_string()
        } else {
            "a field has the wrong type or value".to_string()
        })
    }
}

/// The error's text and its causes', each once (hyper repeats its cause in its own text
/// sometimes), e.g. "tcp connect error: Connection refused (os error 111)".
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source = Some(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Removes what a lower layer might quote from the request: TLS names the host it
/// expected, a resolver the name it looked up. The URL's parts, the secret and the header
/// values are replaced wherever they appear.
fn scrub(text: &str, d: &Delivery) -> String {
    redact_all(text, &sensitive_strings(d, true))
}

/// What must never be stored where non-admins read it: the secret, the configured header
/// values, the URL's password and query values (raw and decoded) and its basic-auth form;
/// with `with_target`, also the URL itself, its host and user name. An endpoint that
/// echoes its request (many do, on errors) would otherwise put them in the stored response.
pub fn sensitive_strings(d: &Delivery, with_target: bool) -> Vec<String> {
    let mut secrets: Vec<String> = Vec::new();
    if let Some(url_text) = d.url.as_deref() {
        if with_target {
            secrets.push(url_text.to_string());
        }
        if let Ok(url) = super::redact::parse_url(url_text) {
            if with_target {
                secrets.push(url.as_str().to_string());
                secrets.extend(url.host_str().map(str::to_string));
                secrets.extend(url.domain().map(|h| h.trim_end_matches('.').to_string()));
                secrets.push(url.username().to_string());
            }
            secrets.extend(url.password().map(str::to_string));
            secrets.extend(basic_credentials(&url));
            if let Some(query) = url.query() {
                secrets.push(query.to_string());
                secrets.extend(
                    query
                        .split('&')
                        .map(|p| p.split_once('=').map_or(p, |(_, v)| v).to_string()),
                );
            }
            secrets.extend(url.query_pairs().map(|(_, v)| v.into_owned()));
        }
    }
    secrets.extend(d.secret.clone());
    secrets.extend(
        d.headers
            .values()
            .filter_map(|v| v.as_str().map(str::to_string)),
    );
    // Longest first, so a whole URL goes before its host. Short strings would shred
    // ordinary words: an error message can lose a word, a stored response (which its
    // producer may use) should not lose `1000` to a `?page=1000`, so the bar is higher
    // there; credentials are rarely that short.
    let shortest = if with_target { 4 } else { 8 };
    secrets.retain(|s| s.len() >= shortest);
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    secrets
}

/// `text` with every string of `secrets` (longest first) replaced by `[redacted]`.
pub fn redact_all(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for s in secrets {
        if text.contains(s.as_str()) {
            text = text.replace(s.as_str(), "[redacted]");
        }
    }
    text
}

/// What the URL's userinfo is sent as, `base64(user:password)` after `Authorization: Basic `;
/// None without userinfo.
pub fn basic_credentials(url: &url::Url) -> Option<String> {
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let user = percent_decode(url.username());
    let pass = url.password().map(percent_decode).unwrap_or_default();
    Some(STANDARD.encode(format!("{user}:{pass}")))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod unit {
    use super::*;

    fn delivery(url: &str) -> Delivery {
        Delivery {
            job_id: "j".into(),
            lease_token: "l".into(),
            queue_name: "q".into(),
            attempt: 1,
            body: "{}".into(),
            url: Some(url.into()),
            method: "POST".into(),
            headers: serde_json::from_str(r#"{"Authorization": "Bearer t0k3n-value"}"#).unwrap(),
            timeout_ms: 300,
            secret: Some("whsec_c2VjcmV0LXNlY3JldA==".into()),
            follow_redirects: false,
            max_in_flight: None,
            settings_version: None,
        }
    }

    #[test]
    fn every_error_maps_to_one_kind_and_message() {
        use DeliveryError::*;
        let s = |c: u16| StatusCode::from_u16(c).unwrap();
        for (e, kind, message) in [
            (Timeout(300), "retry", "timed out after 300 ms"),
            (
                SlotWait(51_000),
                "retry",
                "not sent: waited 51000 ms for a request slot (the queue's webhook_max_in_flight)",
            ),
            (Status(s(503)), "retry", "HTTP 503 Service Unavailable"),
            (Status(s(429)), "retry", "HTTP 429 Too Many Requests"),
            (Status(s(400)), "failed", "HTTP 400 Bad Request"),
            (Status(s(410)), "failed", "HTTP 410 Gone"),
            (
                Redirected { status: s(302), following: false },
                "failed",
                "HTTP 302 Found: redirect not followed (the queue's webhook_follow_redirects is off)",
            ),
            (
                Body { status: s(200), cause: BodyFailure::Timeout(300) },
                "delivered",
                "HTTP 200 OK, then reading the response body timed out after 300 ms",
            ),
            (
                Body { status: s(404), cause: BodyFailure::Broken("reset".into()) },
                "failed",
                "HTTP 404 Not Found, then reading the response body failed: reset",
            ),
            (
                Body { status: s(503), cause: BodyFailure::Broken("reset".into()) },
                "retry",
                "HTTP 503 Service Unavailable, then reading the response body failed: reset",
            ),
            (Refused(super::Refused::Address), "failed", "SSRF guard refused the target"),
            (Redirect(RedirectRefused::Scheme), "failed", "redirect refused: redirect to a URL whose scheme"),
            (Redirect(RedirectRefused::TooMany(5)), "failed", "redirect refused: more than 5 redirects"),
            (HeaderName(2), "failed", "webhook header number 2 has an invalid name"),
            (Connect("x".into()), "retry", "connection failed: x"),
            (NoUrl, "failed", "the queue has no webhook"),
        ] {
            let (k, m) = e.verdict();
            assert_eq!(k, kind, "{e:?}");
            assert!(m.starts_with(message), "{m:?} should start with {message:?}");
        }
        let invalid = url::Url::parse("http://exa mple.com/?token=s3cr3t").unwrap_err();
        let (k, m) = InvalidUrl(invalid.to_string()).verdict();
        assert_eq!(k, "failed");
        assert!(!m.contains("s3cr3t") && !m.contains("exa mple"), "{m}");
    }

    #[test]
    fn messages_are_bounded_and_storable() {
        let (_, m) = DeliveryError::Transport(format!("a\0{}", "é".repeat(2000))).verdict();
        assert!(!m.contains('\0'));
        assert!(m.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
    }

    #[test]
    fn scrub_removes_url_parts_secret_and_header_values() {
        let d = delivery("https://alice:pa55word@hooks.example.com:8443/in?token=s3cr3t-token&a=b");
        let text = "invalid peer certificate: NotValidForName hooks.example.com; \
                    https://alice:pa55word@hooks.example.com:8443/in?token=s3cr3t-token&a=b; \
                    pa55word s3cr3t-token Bearer t0k3n-value whsec_c2VjcmV0LXNlY3JldA== alice";
        let out = scrub(text, &d);
        for secret in [
            "hooks.example",
            "pa55word",
            "s3cr3t-token",
            "t0k3n-value",
            "whsec_",
            "alice",
        ] {
            assert!(!out.contains(secret), "{secret} left in {out}");
        }
        assert!(out.starts_with("invalid peer certificate: NotValidForName [redacted]"));
    }

    #[test]
    fn echoed_secrets_are_found_in_every_form() {
        let d = delivery(
            "https://al%69ce:pa%24%24word@hooks.example.com/in?token=a%2Bb%2Bc%2Bd%2Be&plain-token&page=1000",
        );
        let secrets = sensitive_strings(&d, false);
        // Basic auth of the decoded userinfo "alice:pa$$word".
        let basic = STANDARD.encode("alice:pa$$word");
        let echoed = format!(
            "Authorization: Basic {basic}\nquery token=a%2Bb%2Bc%2Bd%2Be decoded a+b+c+d+e \
             plain-token Bearer t0k3n-value whsec_c2VjcmV0LXNlY3JldA== pa%24%24word \
             count 1000 at hooks.example.com"
        );
        let out = redact_all(&echoed, &secrets);
        for secret in [
            basic.as_str(),
            "a%2Bb%2Bc%2Bd%2Be",
            "a+b+c+d+e",
            "plain-token",
            "t0k3n-value",
            "whsec_",
            "pa%24%24word",
        ] {
            assert!(!out.contains(secret), "{secret} left in {out}");
        }
        // Short values and, without the target, the host in the response's own text stay.
        assert!(out.ends_with("count 1000 at hooks.example.com"), "{out}");
    }

    #[test]
    fn unusable_claims_do_not_quote_values() {
        let e = serde_json::from_str::<Delivery>(
            r#"{"job_id": "j", "headers": "Authorization: t0k3n"}"#,
        )
        .unwrap_err();
        let (kind, m) = DeliveryError::unusable(&e).verdict();
        assert_eq!(kind, "failed");
        assert!(!m.contains("t0k3n"), "{m}");
        let e = serde_json::from_str::<Delivery>(r#"{"job_id": "j"}"#).unwrap_err();
        assert_eq!(
            DeliveryError::unusable(&e).verdict().1,
            "unusable webhook settings: missing field `lease_token`"
        );
    }
}
