//! Webhook HTTP: one request per job attempt, run on a tokio runtime whose threads never
//! touch Postgres. The caller (dispatcher or `process_jobs`) hands in a [`Delivery`] and
//! gets back an [`Outcome`] that says what to record; nothing here panics on bad data.

pub mod signing;
pub mod ssrf;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use serde::{Deserialize, Serialize};

use ssrf::{Allowlist, GuardedResolver, Refused};

/// One webhook attempt, as `queue_ext._dispatch_claim` describes it.
#[derive(Debug, Clone, Deserialize)]
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

/// What happened, in the shape `queue_ext._dispatch_record` takes.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub job_id: String,
    pub lease_token: String,
    pub queue_name: String,
    pub attempt: i32,
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
            url: d.url.clone().unwrap_or_default(),
            outcome,
            status_code: None,
            error,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            response_headers: None,
            response_body: None,
            retry_after_ms: None,
        }
    }

    /// A permanent failure found before any request was made (bad URL, refused host...).
    pub fn failed(d: &Delivery, error: String) -> Outcome {
        Outcome::new(d, "failed", Some(error), Instant::now())
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

/// Two reqwest clients (redirects off, and on for queues that allow them) sharing the SSRF
/// allowlist. Settings change by building a new client: pooled connections were checked
/// against the old allowlist, so they must go with it.
#[derive(Clone)]
pub struct HttpClient {
    plain: reqwest::Client,
    following: reqwest::Client,
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

impl HttpClient {
    pub fn new(settings: &HttpSettings) -> Result<HttpClient, String> {
        let allowlist = Arc::new(RwLock::new(Allowlist::parse(&settings.allowlist)));
        let mut roots = Vec::new();
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read queue_ext.http_ca_file {path}: {e}"))?;
            roots = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("queue_ext.http_ca_file {path}: {e}"))?;
        }
        let build = |policy: reqwest::redirect::Policy| {
            let mut b = reqwest::Client::builder()
                .use_rustls_tls()
                .dns_resolver(Arc::new(GuardedResolver {
                    allowlist: allowlist.clone(),
                }))
                .redirect(policy)
                .pool_max_idle_per_host(settings.max_idle_per_host.max(1))
                .pool_idle_timeout(Duration::from_secs(90))
                .connect_timeout(Duration::from_secs(10))
                .tcp_nodelay(true);
            for cert in &roots {
                b = b.add_root_certificate(cert.clone());
            }
            b.build()
                .map_err(|e| format!("cannot build the HTTP client: {e}"))
        };
        // Redirect targets that are IP literals skip the resolver, so check them here too.
        let guard = allowlist.clone();
        let following = build(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 {
                return attempt.error("more than 5 redirects");
            }
            let list = guard.read().map(|l| l.clone()).unwrap_or_default();
            match attempt
                .url()
                .host_str()
                .map(|h| ssrf::check_literal(&list, h))
            {
                Some(Err(refused)) => attempt.error(refused),
                _ => attempt.follow(),
            }
        }))?;
        Ok(HttpClient {
            plain: build(reqwest::redirect::Policy::none())?,
            following,
            allowlist,
            response_max_bytes: settings.response_max_bytes,
        })
    }

    /// Makes the request and classifies the result. Never panics, never returns an error:
    /// every failure becomes an Outcome to record on the job.
    pub async fn deliver(&self, d: Delivery) -> Outcome {
        let started = Instant::now();
        let request = match self.build_request(&d) {
            Ok(r) => r,
            Err(e) => return Outcome::new(&d, "failed", Some(e), started),
        };
        match request.send().await {
            Ok(response) => self.classify_response(&d, response, started).await,
            Err(e) => classify_error(&d, e, started),
        }
    }

    fn build_request(&self, d: &Delivery) -> Result<reqwest::RequestBuilder, String> {
        let url_text = d
            .url
            .as_deref()
            .ok_or("the queue has no webhook or callback URL any more")?;
        let url =
            reqwest::Url::parse(url_text).map_err(|e| format!("invalid URL {url_text:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "URL scheme {:?} is not http or https",
                url.scheme()
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("URL {url_text:?} has no host"))?;
        let list = self.allowlist.read().map(|l| l.clone()).unwrap_or_default();
        ssrf::check_literal(&list, host).map_err(|e| e.to_string())?;
        let method = reqwest::Method::from_bytes(d.method.as_bytes())
            .map_err(|_| format!("invalid method {:?}", d.method))?;

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("queue_ext/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in &d.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("invalid header name {name:?}"))?;
            let value = value
                .as_str()
                .ok_or_else(|| format!("header {name} is not a string"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("invalid value for header {name}"))?;
            headers.insert(name, value);
        }
        let body = if method == reqwest::Method::GET {
            Vec::new()
        } else {
            d.body.clone().into_bytes()
        };
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|t| t.as_secs() as i64)
            .unwrap_or(0);
        // The job id is the message id: identical on every retry, so receivers can dedupe.
        let msg_id = format!("msg_{}", d.job_id);
        headers.insert(
            "webhook-id",
            HeaderValue::from_str(&msg_id).map_err(|_| "invalid job id")?,
        );
        headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
        if let Some(secret) = d.secret.as_deref().filter(|s| !s.is_empty()) {
            let signature = signing::sign(secret, &msg_id, timestamp, &body);
            headers.insert(
                "webhook-signature",
                HeaderValue::from_str(&signature).map_err(|_| "bad signature")?,
            );
        }
        let client = if d.follow_redirects {
            &self.following
        } else {
            &self.plain
        };
        let timeout = Duration::from_millis(d.timeout_ms.clamp(1, 3_600_000) as u64);
        Ok(client
            .request(method, url)
            .headers(headers)
            .timeout(timeout)
            .body(body))
    }

    async fn classify_response(
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
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let headers: serde_json::Map<String, serde_json::Value> = response
            .headers()
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string(),
                    serde_json::Value::String(v.to_str().ok()?.to_string()),
                ))
            })
            .collect();
        // Read at most response_max_bytes; the rest is not worth holding up the slot for.
        let mut body = Vec::new();
        let mut truncated = false;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = self.response_max_bytes.saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if chunk.len() > room {
                        truncated = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => break, // a broken body after the status line does not change the verdict
            }
        }
        let (kind, error) = match status.as_u16() {
            200..=299 => ("delivered", None),
            429 | 500..=599 => ("retry", Some(format!("HTTP {status}"))),
            300..=399 => (
                "failed",
                Some(format!(
                    "HTTP {status}: redirect to {} not followed (webhook_follow_redirects is off)",
                    location.as_deref().unwrap_or("?")
                )),
            ),
            400..=499 => ("failed", Some(format!("HTTP {status}"))),
            _ => ("retry", Some(format!("unexpected HTTP {status}"))),
        };
        let mut out = Outcome::new(d, kind, error, started);
        out.status_code = Some(status.as_u16());
        out.response_headers = Some(serde_json::Value::Object(headers));
        let mut text = String::from_utf8_lossy(&body).into_owned();
        if truncated {
            text.push_str("…[truncated]");
        }
        out.response_body = Some(text);
        out.retry_after_ms = if kind == "retry" {
            retry_after.map(|d| d.as_millis() as u64)
        } else {
            None
        };
        out
    }
}

fn classify_error(d: &Delivery, e: reqwest::Error, started: Instant) -> Outcome {
    // The SSRF guard's refusal is permanent: retrying cannot make the address public.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(refused) = err.downcast_ref::<Refused>() {
            return Outcome::new(d, "failed", Some(refused.to_string()), started);
        }
        source = err.source();
    }
    let what = if e.is_timeout() {
        format!("timed out after {} ms", d.timeout_ms)
    } else if e.is_connect() {
        format!("connection failed: {}", error_chain(&e))
    } else if e.is_redirect() {
        return Outcome::new(
            d,
            "failed",
            Some(format!("redirect refused: {}", error_chain(&e))),
            started,
        );
    } else if e.is_builder() {
        return Outcome::new(
            d,
            "failed",
            Some(format!("invalid request: {}", error_chain(&e))),
            started,
        );
    } else {
        format!("request failed: {}", error_chain(&e))
    };
    Outcome::new(d, "retry", Some(what), started)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
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
}
