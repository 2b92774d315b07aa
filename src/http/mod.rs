//! Webhook HTTP: one request per job attempt, run on a tokio runtime whose threads never
//! touch Postgres. The caller (dispatcher or `process_jobs`) hands in a [`Delivery`] and
//! gets back an [`Outcome`] that says what to record; nothing here panics on bad data.
//!
//! Whatever the endpoint does, the outcome is bounded and storable: the body is read up to
//! `queue_ext.response_max_bytes` and no further, the whole exchange (body included) ends
//! at the request's timeout, and text is made valid for `text`/`jsonb` ([`redact`]).
//! Nothing recorded carries the URL's credentials or query values, a header or the secret
//! ([`error`], [`redact_url`]).

pub mod connect;
pub mod error;
pub mod redact;
pub mod signing;
pub mod ssrf;

#[cfg(test)]
mod loopback;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, LOCATION,
    RETRY_AFTER, USER_AGENT,
};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};

pub use error::DeliveryError;
pub use redact::redact_url;
use ssrf::Allowlist;

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
    /// Set when the job was claimed ahead of a free request slot: its queue's
    /// webhook_max_in_flight, which the request waits under before it starts.
    #[serde(skip)]
    pub max_in_flight: Option<u32>,
    /// The version of the target's settings the job was claimed with (its
    /// `webhook_targets.settings_version`): a job held unsent whose target changed since is
    /// given back, not sent with the old settings.
    #[serde(skip)]
    pub settings_version: Option<i64>,
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

/// The connection pool, the TLS roots and the SSRF allowlist every connection is checked
/// against. Settings change by building a new client: pooled connections were checked
/// against the old allowlist, so they must go with it.
#[derive(Clone)]
pub struct HttpClient {
    pool: Arc<connect::Pool>,
    tls: Arc<rustls::ClientConfig>,
    allowlist: Arc<Allowlist>,
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
    #[error("queue_ext.http_ca_file {path} holds no usable PEM certificates: {reason}")]
    CaPem { path: String, reason: String },
    #[error("cannot set up TLS: {0}")]
    Tls(rustls::Error),
}

/// Callers report these as text.
impl From<ClientError> for String {
    fn from(e: ClientError) -> String {
        e.to_string()
    }
}

/// One hop's answer, with the connection it came on (back to the pool once read to the end).
struct Reply {
    response: http::Response<hyper::body::Incoming>,
    url: url::Url,
    origin: connect::Origin,
    sender: connect::Sender,
}

impl HttpClient {
    pub fn new(settings: &HttpSettings) -> Result<HttpClient, ClientError> {
        let mut roots = Vec::new();
        if let Some(path) = &settings.ca_file {
            use rustls_pki_types::pem::PemObject;
            let pem = std::fs::read(path).map_err(|source| ClientError::CaFile {
                path: path.clone(),
                source,
            })?;
            let bad = |reason: String| ClientError::CaPem {
                path: path.clone(),
                reason,
            };
            roots = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if roots.is_empty() {
                return Err(bad("no CERTIFICATE block".into()));
            }
        }
        let tls = connect::tls_config(roots).map_err(|e| match e {
            rustls::Error::InvalidCertificate(_) | rustls::Error::General(_) => {
                ClientError::CaPem {
                    path: settings.ca_file.clone().unwrap_or_default(),
                    reason: e.to_string(),
                }
            }
            other => ClientError::Tls(other),
        })?;
        Ok(HttpClient {
            pool: Arc::new(connect::Pool::new(settings.max_idle_per_host)),
            tls: Arc::new(tls),
            allowlist: Arc::new(Allowlist::parse(&settings.allowlist)),
            response_max_bytes: settings.response_max_bytes,
        })
    }

    /// Makes the request and classifies the result. Never panics, never returns an error:
    /// every failure becomes an Outcome to record on the job.
    pub async fn deliver(&self, d: Delivery) -> Outcome {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(d.effective_timeout_ms());
        match self.exchange(&d, deadline).await {
            Ok(reply) => self.read_response(&d, reply, started, deadline).await,
            Err(e) => Outcome::from_error(&d, &e, started),
        }
    }

    /// A target the guard lets through: http(s), a host, and not a refused IP literal.
    /// (Host names are checked when they are resolved, at connection time.)
    fn check_target(&self, url: &url::Url) -> Result<(), DeliveryError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(DeliveryError::Scheme);
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(DeliveryError::NoHost);
        }
        Ok(ssrf::check_url(&self.allowlist, url)?)
    }

    /// Sends the request and, when the queue follows redirects, each hop after it: every
    /// target is checked by the guard, all hops together end at the request's deadline, and
    /// a hop to another origin goes without the queue's configured headers (an API key for
    /// the webhook's host is not for wherever it redirects to).
    async fn exchange(&self, d: &Delivery, deadline: Instant) -> Result<Reply, DeliveryError> {
        let url_text = d.url.as_deref().ok_or(DeliveryError::NoUrl)?;
        let first = redact::parse_url(url_text).map_err(DeliveryError::InvalidUrl)?;
        self.check_target(&first)?;
        let mut method =
            http::Method::from_bytes(d.method.as_bytes()).map_err(|_| DeliveryError::Method)?;
        let mut body = if method == http::Method::GET {
            Bytes::new()
        } else {
            Bytes::from(d.body.clone())
        };
        let mut url = first.clone();
        let mut hops = 0;
        loop {
            let own_headers = url.origin() == first.origin();
            let request = self.request(d, &url, method.clone(), body.clone(), own_headers)?;
            let reply = self.send(d, url, request, deadline).await?;
            let status = reply.response.status().as_u16();
            if !d.follow_redirects || !matches!(status, 301 | 302 | 303 | 307 | 308) {
                return Ok(reply);
            }
            let Some(next) = reply
                .response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| reply.url.join(v).ok())
            else {
                // Recorded as a redirect that could not be followed.
                return Ok(reply);
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
            // As browsers do: 303, and 301/302 after a POST, fetch with GET.
            let to_get =
                status == 303 || (matches!(status, 301 | 302) && method == http::Method::POST);
            if to_get && method != http::Method::HEAD {
                method = http::Method::GET;
                body = Bytes::new();
            }
            // The redirect's own body is not read: its connection closes with it.
            url = next;
        }
    }

    /// Sends one hop's request on a pooled connection to its origin, or a new one. A pooled
    /// connection the endpoint closed meanwhile hands the request back unsent; it then goes
    /// on a new connection (the one case where a request is tried twice, and it was never
    /// written).
    async fn send(
        &self,
        d: &Delivery,
        url: url::Url,
        mut request: http::Request<Full<Bytes>>,
        deadline: Instant,
    ) -> Result<Reply, DeliveryError> {
        let timeout = || DeliveryError::Timeout(d.effective_timeout_ms());
        let origin = connect::Origin::of(&url).ok_or(DeliveryError::NoHost)?;
        let mut pooled = self.pool.take(&origin);
        loop {
            let reused = pooled.is_some();
            let mut sender = match pooled.take() {
                Some(sender) => sender,
                None => self.connect(d, &origin, deadline).await?,
            };
            let ready = tokio::time::timeout_at(deadline.into(), sender.ready())
                .await
                .map_err(|_| timeout())?;
            if let Err(e) = ready {
                if reused {
                    continue;
                }
                return Err(DeliveryError::from_hyper(&e, d));
            }
            match tokio::time::timeout_at(deadline.into(), sender.try_send_request(request))
                .await
                .map_err(|_| timeout())?
            {
                Ok(response) => {
                    return Ok(Reply {
                        response,
                        url,
                        origin,
                        sender,
                    })
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(DeliveryError::from_hyper(&e.into_error(), d)),
                },
            }
        }
    }

    /// A new connection, within both the connect timeout and the request's deadline.
    async fn connect(
        &self,
        d: &Delivery,
        origin: &connect::Origin,
        deadline: Instant,
    ) -> Result<connect::Sender, DeliveryError> {
        let by_connect = Instant::now() + CONNECT_TIMEOUT;
        let connecting = connect::connect(&self.tls, &self.allowlist, origin);
        match tokio::time::timeout_at(deadline.min(by_connect).into(), connecting).await {
            Ok(result) => result.map_err(|e| DeliveryError::from_connect(e, d)),
            Err(_) if by_connect < deadline => Err(DeliveryError::ConnectTimeout),
            Err(_) => Err(DeliveryError::Timeout(d.effective_timeout_ms())),
        }
    }

    /// One hop's request, signed over the body it carries.
    fn request(
        &self,
        d: &Delivery,
        url: &url::Url,
        method: http::Method,
        body: Bytes,
        own_headers: bool,
    ) -> Result<http::Request<Full<Bytes>>, DeliveryError> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("queue_ext/", env!("CARGO_PKG_VERSION"))),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
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
        // Credentials in the URL are sent as basic auth, unless an Authorization is configured.
        if !headers.contains_key(AUTHORIZATION) {
            if let Some(encoded) = error::basic_credentials(url) {
                if let Ok(mut value) = HeaderValue::from_str(&format!("Basic {encoded}")) {
                    value.set_sensitive(true);
                    headers.insert(AUTHORIZATION, value);
                }
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
        // The host as the URL writes it, with the port when it is not the scheme's own. A Host
        // the queue configured is kept; the connection still goes to the URL's host.
        if !headers.contains_key(HOST) {
            let host = match (url.host_str(), url.port()) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                (Some(host), None) => host.to_string(),
                (None, _) => return Err(DeliveryError::NoHost),
            };
            headers.insert(
                HOST,
                HeaderValue::from_str(&host).map_err(|_| DeliveryError::NoHost)?,
            );
        }
        // Origin form: the path and query, never the userinfo or the fragment.
        let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
        let mut request = http::Request::builder()
            .method(method)
            .uri(target)
            .body(Full::new(body))
            .map_err(|e| DeliveryError::Request(e.to_string()))?;
        *request.headers_mut() = headers;
        Ok(request)
    }

    async fn read_response(
        &self,
        d: &Delivery,
        reply: Reply,
        started: Instant,
        deadline: Instant,
    ) -> Outcome {
        let Reply {
            response,
            url,
            origin,
            sender,
        } = reply;
        let (parts, mut incoming) = response.into_parts();
        let status = parts.status;
        let retry_after = parts
            .headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let secrets = error::sensitive_strings(d, false);
        let headers = redact::storable_headers(&parts.headers, &url, &secrets);
        // Read at most response_max_bytes and then stop: memory stays bounded whatever the
        // endpoint sends (50 MB, or a body that never ends), and the rest is not worth
        // holding the slot for. A body not read to its end closes its connection.
        let max = self.response_max_bytes;
        let mut body = Vec::new();
        let mut cut = false;
        let mut body_error = None;
        let mut finished = false;
        while !finished {
            let frame = tokio::time::timeout_at(deadline.into(), incoming.frame()).await;
            match frame {
                Err(_) => {
                    body_error = Some(DeliveryError::Body {
                        status,
                        cause: error::BodyFailure::Timeout(d.effective_timeout_ms()),
                    });
                    break;
                }
                Ok(None) => finished = true,
                Ok(Some(Err(e))) => {
                    body_error = Some(DeliveryError::from_body(&e, status, d));
                    break;
                }
                Ok(Some(Ok(frame))) => {
                    let Ok(chunk) = frame.into_data() else {
                        continue; // trailers
                    };
                    let room = max.saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if chunk.len() > room {
                        cut = true;
                        break;
                    }
                }
            }
        }
        drop(incoming);
        if finished {
            self.pool.put(origin, sender);
        }
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

    #[test]
    fn an_unusable_ca_file_is_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("queue_ext_ca_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let settings = |path: &std::path::Path| HttpSettings {
            ca_file: Some(path.display().to_string()),
            response_max_bytes: 1024,
            ..Default::default()
        };
        let missing = dir.join("missing.pem");
        let e = HttpClient::new(&settings(&missing)).err().unwrap();
        assert!(matches!(e, ClientError::CaFile { .. }), "{e}");
        let no_pem = dir.join("no-pem.pem");
        std::fs::write(&no_pem, "not a certificate\n").unwrap();
        let e = HttpClient::new(&settings(&no_pem))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.ends_with("holds no usable PEM certificates: no CERTIFICATE block"),
            "{e}"
        );
        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = HttpClient::new(&settings(&garbage))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("holds no usable PEM certificates: "), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
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
