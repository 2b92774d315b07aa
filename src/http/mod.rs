//! Webhook HTTP: one request per job attempt, run on a tokio runtime whose threads never
//! touch Postgres. The caller (dispatcher or `process_jobs`) hands in a [`Delivery`] and
//! gets back an [`Outcome`] that says what to record; nothing here panics on bad data.
//!
//! Whatever the endpoint does, the outcome is bounded and storable: the body is read up to
//! `queue_ext.response_max_bytes` and no further, the whole exchange (body included) ends
//! at the request's timeout, and text is made valid for `text`/`jsonb` ([`redact`]).
//! Nothing recorded carries the URL's credentials or query values, a header or the secret
//! ([`error`], [`redact_url`]).

pub mod error;
pub mod redact;
pub mod signing;
pub mod ssrf;

#[cfg(test)]
mod loopback;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT,
};
use serde::{Deserialize, Serialize};

pub use error::DeliveryError;
pub use redact::redact_url;
use ssrf::{Allowlist, GuardedResolver};

/// Redirects followed at most, for queues that follow them.
pub const MAX_REDIRECTS: usize = 5;
/// How long connecting may take (the request's own timeout still bounds it).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One webhook attempt, as `queue_ext._dispatch_claim_rows` describes it.
#[derive(Clone, Deserialize)]
pub struct Delivery {
    pub job_id: String,
    pub lease_token: String,
    pub queue_name: String,
    pub attempt: i32,
    pub body: String,
    pub url: Option<String>,
    pub method: String,
    #[serde(default)]
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub timeout_ms: i64,
    pub secret: Option<String>,
    #[serde(default)]
    pub follow_redirects: bool,
}

impl Delivery {
    /// The timeout the request really gets: at least 1 ms, at most an hour.
    pub fn effective_timeout_ms(&self) -> u64 {
        self.timeout_ms.clamp(1, 3_600_000) as u64
    }
}

/// Debug output ends up in logs: it shows the redacted URL and no secret or header value.
impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("job_id", &self.job_id)
            .field("lease_token", &self.lease_token)
            .field("queue_name", &self.queue_name)
            .field("attempt", &self.attempt)
            .field("url", &self.url.as_deref().map(redact_url))
            .field("method", &self.method)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout_ms", &self.timeout_ms)
            .field("secret", &self.secret.as_ref().map(|_| "REDACTED"))
            .field("follow_redirects", &self.follow_redirects)
            .finish_non_exhaustive()
    }
}

/// What happened, as `queue_ext._dispatch_record_rows` takes it.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub job_id: String,
    pub lease_token: String,
    pub queue_name: String,
    pub attempt: i32,
    /// The target, redacted ([`redact_url`]): workers can read the delivery log.
    pub url: String,
    /// delivered | retry | failed
    pub outcome: &'static str,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: f64,
    pub response_headers: Option<serde_json::Value>,
    pub response_body: Option<String>,
    pub retry_after_ms: Option<u64>,
}

impl Outcome {
    fn new(
        d: &Delivery,
        outcome: &'static str,
        error: Option<String>,
        started: Instant,
    ) -> Outcome {
        Outcome {
            job_id: d.job_id.clone(),
            lease_token: d.lease_token.clone(),
            queue_name: d.queue_name.clone(),
            attempt: d.attempt,
            url: d.url.as_deref().map(redact_url).unwrap_or_default(),
            outcome,
            status_code: None,
            error,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            response_headers: None,
            response_body: None,
            retry_after_ms: None,
        }
    }

    /// The outcome of an attempt that ended with `e`, through its one mapping.
    pub fn from_error(d: &Delivery, e: &DeliveryError, started: Instant) -> Outcome {
        let (kind, message) = e.verdict();
        Outcome::new(d, kind, Some(message), started)
    }
}

/// Runs `f` with every signal blocked in the calling thread, so threads it creates inherit
/// the mask: Postgres's signal handlers must only ever run on its own thread.
pub fn with_signals_blocked<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: plain libc calls on a local sigset; the old mask is restored before returning.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        result
    }
}

/// A multi-threaded runtime whose threads have all signals blocked.
pub fn new_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    with_signals_blocked(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("queue_ext-http")
            .enable_all()
            .build()
    })
}

/// The reqwest client and the SSRF allowlist it resolves with. Settings change by building
/// a new client: pooled connections were checked against the old allowlist, so they must
/// go with it.
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    allowlist: Arc<RwLock<Allowlist>>,
    response_max_bytes: usize,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpSettings {
    pub allowlist: String,
    pub ca_file: Option<String>,
    pub response_max_bytes: usize,
    pub max_idle_per_host: usize,
}

/// Why the client could not be built (a setting is wrong); the previous client stays.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read queue_ext.http_ca_file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("queue_ext.http_ca_file {path} holds no usable PEM certificates: {source}")]
    CaPem {
        path: String,
        source: reqwest::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Build(reqwest::Error),
}

/// Callers report these as text.
impl From<ClientError> for String {
    fn from(e: ClientError) -> String {
        e.to_string()
    }
}

impl HttpClient {
    pub fn new(settings: &HttpSettings) -> Result<HttpClient, ClientError> {
        let allowlist = Arc::new(RwLock::new(Allowlist::parse(&settings.allowlist)));
        let mut roots = Vec::new();
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|source| ClientError::CaFile {
                path: path.clone(),
                source,
            })?;
            roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
                ClientError::CaPem {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            // A proxy from HTTP_PROXY/HTTPS_PROXY/ALL_PROXY would be the address the guard
            // checks instead of the target's: never use one.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                allowlist: allowlist.clone(),
            }))
            // Redirects are followed by `exchange`, hop by hop, where each target is checked
            // and the queue's headers stay with the origin they were configured for.
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .pool_max_idle_per_host(settings.max_idle_per_host.max(1))
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(CONNECT_TIMEOUT)
            // HTTP/1 heads are bounded by hyper (100 headers, ~400 KiB); bound HTTP/2's.
            .http2_max_header_list_size(256 * 1024)
            .tcp_nodelay(true);
        for cert in roots {
            builder = builder.add_root_certificate(cert);
        }
        Ok(HttpClient {
            client: builder.build().map_err(ClientError::Build)?,
            allowlist,
            response_max_bytes: settings.response_max_bytes,
        })
    }

    /// Makes the request and classifies the result. Never panics, never returns an error:
    /// every failure becomes an Outcome to record on the job.
    pub async fn deliver(&self, d: Delivery) -> Outcome {
        let started = Instant::now();
        match self.exchange(&d, started).await {
            Ok(response) => self.read_response(&d, response, started).await,
            Err(e) => Outcome::from_error(&d, &e, started),
        }
    }

    /// A target the guard lets through: http(s), a host, and not a refused IP literal.
    /// (Host names are checked when they are resolved, at connection time.)
    fn check_target(&self, url: &reqwest::Url) -> Result<(), DeliveryError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(DeliveryError::Scheme);
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(DeliveryError::NoHost);
        }
        let list = self.allowlist.read().map(|l| l.clone()).unwrap_or_default();
        Ok(ssrf::check_url(&list, url)?)
    }

    /// Sends the request and, when the queue follows redirects, each hop after it: every
    /// target is checked by the guard, all hops together get the request's timeout, and a
    /// hop to another origin goes without the queue's configured headers (an API key for
    /// the webhook's host is not for wherever it redirects to).
    async fn exchange(
        &self,
        d: &Delivery,
        started: Instant,
    ) -> Result<reqwest::Response, DeliveryError> {
        let url_text = d.url.as_deref().ok_or(DeliveryError::NoUrl)?;
        let first = redact::parse_url(url_text).map_err(DeliveryError::InvalidUrl)?;
        self.check_target(&first)?;
        let mut method =
            reqwest::Method::from_bytes(d.method.as_bytes()).map_err(|_| DeliveryError::Method)?;
        let mut body = if method == reqwest::Method::GET {
            Vec::new()
        } else {
            d.body.clone().into_bytes()
        };
        let timeout = Duration::from_millis(d.effective_timeout_ms());
        let mut url = first.clone();
        let mut hops = 0;
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(DeliveryError::Timeout(d.effective_timeout_ms()));
            }
            let own_headers = url.origin() == first.origin();
            // reqwest's timeout runs from connecting until the body has been read (it moves
            // into the response body), so a body trickled byte by byte ends there too.
            let response = self
                .request(d, &url, method.clone(), body.clone(), own_headers)?
                .timeout(left)
                .send()
                .await
                .map_err(|e| DeliveryError::from_send(e, d))?;
            let status = response.status().as_u16();
            if !d.follow_redirects || !matches!(status, 301 | 302 | 303 | 307 | 308) {
                return Ok(response);
            }
            let Some(next) = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| response.url().join(v).ok())
            else {
                // Recorded as a redirect that could not be followed.
                return Ok(response);
            };
            if !matches!(next.scheme(), "http" | "https") {
                return Err(DeliveryError::Redirect(error::RedirectRefused::Scheme));
            }
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(DeliveryError::Redirect(error::RedirectRefused::TooMany(
                    MAX_REDIRECTS,
                )));
            }
            self.check_target(&next)?;
            // As browsers and reqwest do: 303, and 301/302 after a POST, fetch with GET.
            let to_get =
                status == 303 || (matches!(status, 301 | 302) && method == reqwest::Method::POST);
            if to_get && method != reqwest::Method::HEAD {
                method = reqwest::Method::GET;
                body = Vec::new();
            }
            url = next;
        }
    }

    /// One hop's request, signed over the body it carries.
    fn request(
        &self,
        d: &Delivery,
        url: &reqwest::Url,
        method: reqwest::Method,
        body: Vec<u8>,
        own_headers: bool,
    ) -> Result<reqwest::RequestBuilder, DeliveryError> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("queue_ext/", env!("CARGO_PKG_VERSION"))),
        );
        if own_headers {
            for (i, (name, value)) in d.headers.iter().enumerate() {
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| DeliveryError::HeaderName(i + 1))?;
                let value = value
                    .as_str()
                    .and_then(|v| HeaderValue::from_str(v).ok())
                    .ok_or_else(|| DeliveryError::HeaderValue(name.to_string()))?;
                headers.insert(name, value);
            }
        }
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|t| t.as_secs() as i64)
            .unwrap_or(0);
        // The job id is the message id: identical on every retry, so receivers can dedupe.
        let msg_id = format!("msg_{}", d.job_id);
        headers.insert(
            "webhook-id",
            HeaderValue::from_str(&msg_id).map_err(|_| DeliveryError::JobId)?,
        );
        headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
        if let Some(secret) = d.secret.as_deref().filter(|s| !s.is_empty()) {
            let signature = signing::sign(secret, &msg_id, timestamp, &body);
            // base64 after "v1,": always a valid header value.
            if let Ok(value) = HeaderValue::from_str(&signature) {
                headers.insert("webhook-signature", value);
            }
        }
        Ok(self
            .client
            .request(method, url.clone())
            .headers(headers)
            .body(body))
    }

    async fn read_response(
        &self,
        d: &Delivery,
        mut response: reqwest::Response,
        started: Instant,
    ) -> Outcome {
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let secrets = error::sensitive_strings(d, false);
        let headers = redact::storable_headers(response.headers(), response.url(), &secrets);
        // Read at most response_max_bytes and then stop: memory stays bounded whatever the
        // endpoint sends (50 MB, or a body that never ends), and the rest is not worth
        // holding the slot for. Dropping the response closes the connection.
        let max = self.response_max_bytes;
        let mut body = Vec::new();
        let mut cut = false;
        let mut body_error = None;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = max.saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if chunk.len() > room {
                        cut = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    body_error = Some(DeliveryError::from_body(e, status, d));
                    break;
                }
            }
        }
        drop(response);
        let cut = cut || body_error.is_some();
        let error = match body_error {
            Some(e) => Some(e),
            None if status.is_success() => None,
            None if status.is_redirection() => Some(DeliveryError::Redirected {
                status,
                following: d.follow_redirects,
            }),
            None => Some(DeliveryError::Status(status)),
        };
        let mut out = match &error {
            Some(e) => Outcome::from_error(d, e, started),
            None => Outcome::new(d, "delivered", None, started),
        };
        out.status_code = Some(status.as_u16());
        out.response_headers = Some(serde_json::Value::Object(headers));
        // Replaced before the cut, so "[redacted]" never pushes the text past the cap.
        let text = error::redact_all(&String::from_utf8_lossy(&body), &secrets);
        out.response_body = Some(redact::storable_text(text.as_bytes(), max, cut));
        out.retry_after_ms = if out.outcome == "retry" {
            retry_after.map(|d| d.as_millis() as u64)
        } else {
            None
        };
        out
    }
}

/// `Retry-After` is either delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(86_400)),
    )
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let parsed = parse_retry_after(&later).unwrap();
        assert!(parsed > Duration::from_secs(100) && parsed <= Duration::from_secs(120));
        assert_eq!(parse_retry_after("soon"), None);
    }

    fn delivery() -> Delivery {
        serde_json::from_value(serde_json::json!({
            "job_id": "j1", "lease_token": "l1", "queue_name": "q", "attempt": 1,
            "body": "{}", "url": "https://alice:pa55@example.com/in?token=s3cr3t",
            "method": "POST", "headers": {"Authorization": "Bearer t0k3n"},
            "timeout_ms": 1000, "secret": "whsec_abc"
        }))
        .unwrap()
    }

    #[test]
    fn outcomes_and_debug_output_hold_only_the_redacted_url() {
        let d = delivery();
        let debug = format!("{d:?}");
        for secret in ["pa55", "s3cr3t", "t0k3n", "whsec_abc"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        let out = Outcome::from_error(&d, &DeliveryError::NoUrl, Instant::now());
        assert_eq!(out.outcome, "failed");
        assert_eq!(out.url, "https://example.com/in?token=REDACTED");
    }

    #[tokio::test]
    async fn requests_refused_before_sending_say_why_without_the_url() {
        let client = HttpClient::new(&HttpSettings {
            response_max_bytes: 1024,
            ..Default::default()
        })
        .unwrap();
        for (url, expected) in [
            (None, "the queue has no webhook"),
            (
                Some("ftp://example.com/x?token=s3cr3t"),
                "the webhook URL's scheme",
            ),
            (
                Some("http://exa mple.com/?token=s3cr3t"),
                "the webhook URL is invalid",
            ),
            (
                Some("http://2130706433/?token=s3cr3t"),
                "SSRF guard refused the target",
            ),
            (
                Some("http://[::ffff:127.0.0.1]/?token=s3cr3t"),
                "SSRF guard refused the target",
            ),
            (
                Some("http://0/?token=s3cr3t"),
                "SSRF guard refused the target",
            ),
        ] {
            let mut d = delivery();
            d.url = url.map(str::to_string);
            let out = client.deliver(d).await;
            assert_eq!(out.outcome, "failed", "{url:?}");
            let error = out.error.unwrap();
            assert!(error.starts_with(expected), "{url:?}: {error}");
            assert!(
                !error.contains("s3cr3t") && !out.url.contains("s3cr3t"),
                "{error}"
            );
        }
        let mut d = delivery();
        d.headers = serde_json::from_str(r#"{"Authorization: Bearer t0k3n": "x"}"#).unwrap();
        let error = client.deliver(d).await.error.unwrap();
        assert_eq!(error, "webhook header number 1 has an invalid name");
    }
}
