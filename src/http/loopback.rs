//! The client against real endpoints on loopback: raw TCP servers that misbehave the way
//! real ones do (NUL bytes, invalid UTF-8, 50 MB, an endless body, 1 byte per second, a
//! reset mid-body, silence, redirects to private addresses), and an environment proxy.
//! Only tokio and the client: these run under plain `cargo test --lib`.
//!
//! The endpoints listen on 127.0.0.2, the one address the client's allowlist opens, so a
//! redirect to 127.0.0.1 or to `localhost` is a redirect to a refused address.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::redact::TRUNCATED;
use super::{Delivery, HttpClient, HttpSettings, Outcome};

const CAP: usize = 64 * 1024;
const SECRET_QUERY: &str = "s3cr3t-query";

/// What an endpoint does once it has read a request.
#[derive(Clone)]
enum Script {
    /// Writes these bytes, then closes cleanly.
    Raw(Vec<u8>),
    /// `Content-Length: n`, then n bytes of 'x' (written in 1 MiB pieces).
    Big(usize),
    /// A chunked body that never ends.
    Endless,
    /// `Content-Length: 100`, then one byte per second.
    Trickle,
    /// `Content-Length: 1000`, ten bytes, then a TCP reset.
    ResetMidBody,
    /// Reads the request and never answers.
    Silent,
    /// 200 with the request head as the body, and its Authorization in a header.
    Echo,
    /// A 302 to the location, formatted with the endpoint's port for `{port}`.
    Redirect(String),
    /// The same as a 307, which keeps the method and body.
    Temporary(String),
    /// Writes these bytes and waits for the next request on the same connection.
    KeepAlive(Vec<u8>),
    /// Writes these bytes, then closes the connection 50 ms later, as an endpoint closes an
    /// idle keep-alive connection (no `connection: close` said beforehand).
    IdleClose(Vec<u8>),
}

struct Endpoint {
    port: u16,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// Request heads, in order.
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Endpoint {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.2:{}{path}", self.port)
    }
    fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Starts an endpoint on `ip` that answers every request on `path_script`'s first match
/// (by path prefix), or 404.
async fn endpoint(ip: &str, scripts: Vec<(&'static str, Script)>) -> Endpoint {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, r, h) = (connections.clone(), requests.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (r, h, scripts) = (r.clone(), h.clone(), scripts.clone());
            tokio::spawn(async move {
                let _ = serve(stream, port, &r, &h, &scripts).await;
            });
        }
    });
    Endpoint {
        port,
        connections,
        requests,
        heads,
    }
}

async fn serve(
    mut stream: TcpStream,
    port: u16,
    requests: &AtomicUsize,
    heads: &std::sync::Mutex<Vec<String>>,
    scripts: &[(&'static str, Script)],
) -> std::io::Result<()> {
    loop {
        // Read the head, then the body it announces, so closing never resets unread data.
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut have = buf.len() - head_end;
        while have < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            have += n;
        }
        requests.fetch_add(1, Ordering::SeqCst);
        heads.lock().unwrap().push(head.clone());
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let script = scripts
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix))
            .map(|(_, s)| s.clone())
            .unwrap_or(Script::Raw(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(),
            ));
        match script {
            Script::KeepAlive(bytes) => stream.write_all(&bytes).await?,
            Script::IdleClose(bytes) => {
                stream.write_all(&bytes).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                stream.shutdown().await?;
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await? > 0 {}
                return Ok(());
            }
            Script::Raw(bytes) => {
                stream.write_all(&bytes).await?;
                stream.shutdown().await?;
                // Drain until the client closes, so the close is a FIN, not a reset.
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await? > 0 {}
                return Ok(());
            }
            Script::Big(n) => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
                stream.write_all(head.as_bytes()).await?;
                let piece = vec![b'x'; 1 << 20];
                let mut left = n;
                while left > 0 {
                    let k = left.min(piece.len());
                    stream.write_all(&piece[..k]).await?;
                    left -= k;
                }
                return Ok(());
            }
            Script::Endless => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await?;
                let chunk = format!("{:x}\r\n{}\r\n", 8192, "y".repeat(8192));
                loop {
                    stream.write_all(chunk.as_bytes()).await?;
                }
            }
            Script::Trickle => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
                    .await?;
                for _ in 0..100 {
                    stream.write_all(b"z").await?;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                return Ok(());
            }
            Script::ResetMidBody => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                    .await?;
                stream.flush().await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
                // SO_LINGER 0: closing sends RST instead of FIN (and, with nothing left to
                // send, does not block, which is why tokio deprecates it in general).
                #[allow(deprecated)]
                stream.set_linger(Some(Duration::ZERO))?;
                drop(stream);
                return Ok(());
            }
            Script::Echo => {
                let auth = header(&head, "authorization").unwrap_or_default();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nx-echo: {auth}\r\ncontent-length: {}\r\n\r\n{head}",
                    head.len()
                );
                stream.write_all(reply.as_bytes()).await?;
            }
            Script::Silent => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return Ok(());
            }
            Script::Redirect(ref location) | Script::Temporary(ref location) => {
                let status = match script {
                    Script::Temporary(_) => "307 Temporary Redirect",
                    _ => "302 Found",
                };
                let location = location.replace("{port}", &port.to_string());
                let reply = format!(
                    "HTTP/1.1 {status}\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n"
                );
                stream.write_all(reply.as_bytes()).await?;
                // Keep-alive: the next hop may come on this connection.
            }
        }
    }
}

fn client() -> HttpClient {
    HttpClient::new(&HttpSettings {
        allowlist: "127.0.0.2".into(),
        ca_file: None,
        response_max_bytes: CAP,
        max_idle_per_host: 4,
    })
    .unwrap()
}

fn delivery(url: &str, timeout_ms: i64, follow_redirects: bool) -> Delivery {
    Delivery {
        job_id: "01890000-0000-7000-8000-000000000001".into(),
        lease_token: "lease".into(),
        queue_name: "q".into(),
        attempt: 1,
        body: r#"{"n": 1}"#.into(),
        url: Some(url.into()),
        method: "POST".into(),
        headers: serde_json::from_str(
            r#"{"Authorization": "Bearer t0k3n-header", "X-Api-Key": "k3y-header"}"#,
        )
        .unwrap(),
        timeout_ms,
        secret: Some("whsec_c2VjcmV0LXNlY3JldA==".into()),
        follow_redirects,
        max_in_flight: None,
        settings_version: None,
    }
}

/// Nothing secret in what is recorded, and the whole outcome is storable as jsonb.
fn assert_clean(out: &Outcome) {
    let json = serde_json::to_string(out).unwrap();
    for secret in [
        SECRET_QUERY,
        "t0k3n-header",
        "k3y-header",
        "whsec_",
        "c2VjcmV0LXNlY3JldA",
        "pa55word",
    ] {
        assert!(!json.contains(secret), "{secret} recorded in {json}");
    }
    assert!(!json.contains("\\u0000"), "NUL recorded in {json}");
    if let Some(error) = &out.error {
        assert!(
            !error.contains("127.0.0.") && !error.contains("://"),
            "{error}"
        );
    }
}

/// A header's value in a request head (names compared without case).
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Whether the head's webhook-signature is the one for `body`.
fn signed_over(head: &str, body: &[u8]) -> bool {
    let (Some(id), Some(ts), Some(sig)) = (
        header(head, "webhook-id"),
        header(head, "webhook-timestamp"),
        header(head, "webhook-signature"),
    ) else {
        return false;
    };
    let secret = "whsec_c2VjcmV0LXNlY3JldA==";
    sig == super::signing::sign(secret, &id, ts.parse().unwrap(), body)
}

fn secret_url(e: &Endpoint, path: &str) -> String {
    e.url(path).replacen("http://", "http://alice:pa55word@", 1) + &format!("?token={SECRET_QUERY}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_and_invalid_utf8_are_stored_safely() {
    let mut reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\nx-bin: caf\xe9\r\ncontent-length: 12\r\n\r\n".to_vec();
    reply.extend_from_slice(b"ok\0\xff\xfe{\"a\":1}");
    let e = endpoint("127.0.0.2", vec![("/", Script::Raw(reply))]).await;
    let out = client()
        .deliver(delivery(&secret_url(&e, "/nul"), 5000, false))
        .await;
    assert_eq!(out.outcome, "delivered", "{out:?}");
    assert_eq!(out.status_code, Some(200));
    assert_eq!(
        out.response_body.as_deref(),
        Some("ok\u{FFFD}\u{FFFD}\u{FFFD}{\"a\":1}")
    );
    assert_eq!(
        out.response_headers.as_ref().unwrap()["x-bin"],
        "caf\u{FFFD}"
    );
    assert_eq!(out.url, format!("{}?token=REDACTED", e.url("/nul")));
    assert_clean(&out);
    // The request was signed and carried the configured header.
    let head = e.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.contains("webhook-signature: v1,"), "{head}");
    assert!(
        head.contains("authorization: bearer t0k3n-header"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_echoing_its_request_gets_no_secret_stored() {
    let e = endpoint("127.0.0.2", vec![("/", Script::Echo)]).await;
    let c = client();
    let out = c
        .deliver(delivery(&secret_url(&e, "/echo"), 5000, false))
        .await;
    assert_eq!(out.outcome, "delivered", "{out:?}");
    let body = out.response_body.as_deref().unwrap();
    // The endpoint saw them (the request is unchanged), the record does not hold them.
    let head = e.heads.lock().unwrap()[0].clone();
    assert!(
        head.contains(SECRET_QUERY) && head.contains("k3y-header"),
        "{head}"
    );
    assert!(body.starts_with("POST /echo?[redacted] "), "{body}");
    assert!(body.contains("x-api-key: [redacted]"), "{body}");
    assert_eq!(
        out.response_headers.as_ref().unwrap()["x-echo"],
        "[redacted]"
    );
    assert_clean(&out);
    // Without a configured Authorization, the userinfo is sent as basic auth.
    let mut d = delivery(&secret_url(&e, "/echo"), 5000, false);
    d.headers.remove("Authorization");
    let out = c.deliver(d).await;
    let head = e.heads.lock().unwrap()[1].clone();
    assert!(
        header(&head, "authorization")
            .unwrap()
            .starts_with("Basic "),
        "{head}"
    );
    assert_eq!(
        out.response_headers.as_ref().unwrap()["x-echo"],
        "Basic [redacted]"
    );
    assert!(out
        .response_body
        .as_deref()
        .unwrap()
        .contains("authorization: Basic [redacted]"));
    assert_clean(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_are_cut_at_the_cap() {
    let e = endpoint("127.0.0.2", vec![("/", Script::Big(50 << 20))]).await;
    let started = Instant::now();
    let out = client()
        .deliver(delivery(&e.url("/big"), 30_000, false))
        .await;
    assert_eq!(out.outcome, "delivered", "{out:?}");
    let body = out.response_body.as_deref().unwrap();
    assert_eq!(body.len(), CAP + TRUNCATED.len());
    assert!(body.ends_with(TRUNCATED));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_body_is_cut_at_the_cap_not_the_timeout() {
    let e = endpoint("127.0.0.2", vec![("/", Script::Endless)]).await;
    let started = Instant::now();
    let out = client()
        .deliver(delivery(&e.url("/endless"), 20_000, false))
        .await;
    // Had the client read on, the 20 s timeout would have made this a retry.
    assert_eq!(out.outcome, "delivered", "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let body = out.response_body.as_deref().unwrap();
    assert_eq!(body.len(), CAP + TRUNCATED.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_one_byte_per_second_after_a_200_ends_at_the_timeout_as_a_delivery() {
    let e = endpoint("127.0.0.2", vec![("/", Script::Trickle)]).await;
    let started = Instant::now();
    let out = client()
        .deliver(delivery(&secret_url(&e, "/slow"), 1500, false))
        .await;
    let elapsed = started.elapsed();
    assert_eq!(out.outcome, "delivered", "{out:?}");
    assert_eq!(
        out.error.as_deref(),
        Some("HTTP 200 OK, then reading the response body timed out after 1500 ms")
    );
    assert!(
        elapsed >= Duration::from_millis(1400) && elapsed < Duration::from_millis(3000),
        "{elapsed:?}"
    );
    // What arrived before the timeout is kept, marked as cut.
    let body = out.response_body.as_deref().unwrap();
    assert!(body.starts_with('z') && body.ends_with(TRUNCATED), "{body}");
    assert_clean(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_body_after_a_200_is_a_delivery() {
    let e = endpoint("127.0.0.2", vec![("/", Script::ResetMidBody)]).await;
    let out = client()
        .deliver(delivery(&secret_url(&e, "/reset"), 5000, false))
        .await;
    assert_eq!(out.outcome, "delivered", "{out:?}");
    let error = out.error.as_deref().unwrap();
    assert!(
        error.starts_with("HTTP 200 OK, then reading the response body failed: "),
        "{error}"
    );
    assert_eq!(
        out.response_body.as_deref(),
        Some(format!("0123456789{TRUNCATED}").as_str())
    );
    assert_clean(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_never_answers_times_out() {
    let e = endpoint("127.0.0.2", vec![("/", Script::Silent)]).await;
    let started = Instant::now();
    let out = client()
        .deliver(delivery(&secret_url(&e, "/silent"), 500, false))
        .await;
    assert_eq!(out.outcome, "retry", "{out:?}");
    assert_eq!(out.error.as_deref(), Some("timed out after 500 ms"));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(out.status_code, None);
    assert_clean(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_a_retry_without_the_url() {
    // Bind and drop: nothing listens on that port any more.
    let port = TcpListener::bind("127.0.0.2:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://alice:pa55word@127.0.0.2:{port}/x?token={SECRET_QUERY}");
    let out = client().deliver(delivery(&url, 2000, false)).await;
    assert_eq!(out.outcome, "retry", "{out:?}");
    let error = out.error.as_deref().unwrap();
    assert!(error.starts_with("connection failed: "), "{error}");
    assert_clean(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfollowed_redirect_is_a_permanent_failure_and_its_location_is_redacted() {
    let location = format!("http://127.0.0.1:{{port}}/private?token={SECRET_QUERY}");
    let e = endpoint("127.0.0.2", vec![("/", Script::Redirect(location))]).await;
    let out = client()
        .deliver(delivery(&secret_url(&e, "/r"), 5000, false))
        .await;
    assert_eq!(out.outcome, "failed", "{out:?}");
    assert_eq!(
        out.error.as_deref(),
        Some("HTTP 302 Found: redirect not followed (the queue's webhook_follow_redirects is off)")
    );
    assert_eq!(
        out.response_headers.as_ref().unwrap()["location"],
        format!("http://127.0.0.1:{}/private?token=REDACTED", e.port)
    );
    assert_eq!(e.count(), 1);
    assert_clean(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followed_redirects_are_checked_at_every_hop() {
    // A real listener on 127.0.0.1 that must never be reached.
    let private = endpoint(
        "127.0.0.1",
        vec![(
            "/",
            Script::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec()),
        )],
    )
    .await;
    let e = endpoint(
        "127.0.0.2",
        vec![
            (
                "/to-ip",
                Script::Redirect(format!("http://127.0.0.1:{}/", private.port)),
            ),
            (
                "/to-hex-ip",
                Script::Redirect(format!("http://0x7f000001:{}/", private.port)),
            ),
            (
                "/to-mapped",
                Script::Redirect(format!("http://[::ffff:127.0.0.1]:{}/", private.port)),
            ),
            (
                "/to-name",
                Script::Redirect(format!("http://localhost:{}/", private.port)),
            ),
            ("/to-file", Script::Redirect("file:///etc/passwd".into())),
            (
                "/to-gopher",
                Script::Redirect("gopher://127.0.0.2:{port}/".into()),
            ),
            ("/loop", Script::Redirect("/loop".into())),
            ("/hop", Script::Redirect("/ok?x=1".into())),
            (
                "/ok",
                Script::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()),
            ),
        ],
    )
    .await;
    let c = client();
    for (path, expected) in [
        (
            "/to-ip",
            "SSRF guard refused the target: its address is not public",
        ),
        (
            "/to-hex-ip",
            "SSRF guard refused the target: its address is not public",
        ),
        (
            "/to-mapped",
            "SSRF guard refused the target: its address is not public",
        ),
        (
            "/to-name",
            "SSRF guard refused the target: its host name resolves only to",
        ),
        (
            "/to-file",
            "redirect refused: redirect to a URL whose scheme is not http or https",
        ),
        (
            "/to-gopher",
            "redirect refused: redirect to a URL whose scheme is not http or https",
        ),
        ("/loop", "redirect refused: more than 5 redirects"),
    ] {
        let out = c.deliver(delivery(&secret_url(&e, path), 5000, true)).await;
        assert_eq!(out.outcome, "failed", "{path}: {out:?}");
        let error = out.error.as_deref().unwrap();
        assert!(error.starts_with(expected), "{path}: {error}");
        assert_clean(&out);
    }
    assert_eq!(private.count(), 0, "a refused hop was connected to");
    // The loop was followed five times after the first request, then refused.
    let loops = e
        .heads
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.contains(" /loop"))
        .count();
    assert_eq!(loops, 1 + super::MAX_REDIRECTS);

    // An allowed hop is followed; the Referer does not carry the first URL on; the POST
    // became a GET, signed over the empty body it now has.
    let out = c
        .deliver(delivery(&secret_url(&e, "/hop"), 5000, true))
        .await;
    assert_eq!(out.outcome, "delivered", "{out:?}");
    assert_eq!(out.response_body.as_deref(), Some("ok"));
    assert_eq!(out.url, format!("{}?token=REDACTED", e.url("/hop")));
    let heads = e.heads.lock().unwrap();
    let last = heads.last().unwrap();
    assert!(last.starts_with("GET /ok?x=1 "), "{last}");
    assert!(
        !last.to_ascii_lowercase().contains("referer") && !last.contains(SECRET_QUERY),
        "{last}"
    );
    assert!(signed_over(last, b""), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_headers_stay_with_their_origin() {
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec();
    let other = endpoint("127.0.0.2", vec![("/", Script::Raw(ok.clone()))]).await;
    let e = endpoint(
        "127.0.0.2",
        vec![
            ("/same", Script::Temporary("/land".into())),
            ("/cross", Script::Temporary(other.url("/land"))),
            ("/land", Script::Raw(ok)),
        ],
    )
    .await;
    let c = client();
    let body = br#"{"n": 1}"#;
    // Same origin: a 307 keeps the method, the body and every configured header.
    let out = c.deliver(delivery(&e.url("/same"), 5000, true)).await;
    assert_eq!(out.outcome, "delivered", "{out:?}");
    let head = e.heads.lock().unwrap().last().unwrap().clone();
    assert!(head.starts_with("POST /land "), "{head}");
    assert_eq!(header(&head, "x-api-key").as_deref(), Some("k3y-header"));
    assert_eq!(header(&head, "content-length").as_deref(), Some("8"));
    assert!(signed_over(&head, body), "{head}");
    // Another origin (here another port): no configured header goes along.
    let out = c.deliver(delivery(&e.url("/cross"), 5000, true)).await;
    assert_eq!(out.outcome, "delivered", "{out:?}");
    assert_eq!(other.count(), 1);
    let head = other.heads.lock().unwrap()[0].clone();
    assert!(head.starts_with("POST /land "), "{head}");
    assert_eq!(header(&head, "x-api-key"), None, "{head}");
    assert_eq!(header(&head, "authorization"), None, "{head}");
    assert!(signed_over(&head, body), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_in_any_spelling_are_never_connected_to() {
    let private = endpoint(
        "127.0.0.1",
        vec![(
            "/",
            Script::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec()),
        )],
    )
    .await;
    let c = client();
    let p = private.port;
    for url in [
        format!("http://127.0.0.1:{p}/"),
        format!("http://2130706433:{p}/"),
        format!("http://0x7f000001:{p}/"),
        format!("http://0177.0.0.1:{p}/"),
        format!("http://127.1:{p}/"),
        format!("http://[::ffff:127.0.0.1]:{p}/"),
        format!("http://[::ffff:7f00:1]:{p}/"),
        format!("http://[::127.0.0.1]:{p}/"),
        format!("http://0.0.0.0:{p}/"),
        format!("http://0:{p}/"),
        format!("http://[::]:{p}/"),
        format!("http://localhost:{p}/"),
    ] {
        let out = c.deliver(delivery(&url, 2000, false)).await;
        assert_eq!(out.outcome, "failed", "{url}: {out:?}");
        assert!(
            out.error
                .as_deref()
                .unwrap()
                .starts_with("SSRF guard refused the target"),
            "{url}: {out:?}"
        );
    }
    assert_eq!(private.count(), 0);
}

/// Run by [`the_environment_proxy_is_ignored`] in a child process with proxy variables
/// set, so this process's environment is never changed under other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the_environment_proxy_is_ignored"]
async fn proxy_child() {
    let Ok(url) = std::env::var("QUEUE_EXT_PROXY_TEST_URL") else {
        return;
    };
    let out = client().deliver(delivery(&url, 5000, false)).await;
    assert_eq!(out.outcome, "delivered", "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_proxy_is_ignored() {
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec();
    let target = endpoint("127.0.0.2", vec![("/", Script::Raw(ok.clone()))]).await;
    // A proxy that would happily forward: it answers 200 to anything it is sent.
    let proxy = endpoint("127.0.0.2", vec![("", Script::Raw(ok))]).await;
    let proxy_url = proxy.url("");
    let target_url = target.url("/via");
    // std's Command blocks: run it off the runtime's threads, which serve the endpoints.
    let child = tokio::task::spawn_blocking(move || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "http::loopback::proxy_child",
                "--ignored",
                "--test-threads=1",
            ])
            .env("QUEUE_EXT_PROXY_TEST_URL", target_url)
            .env("HTTP_PROXY", &proxy_url)
            .env("http_proxy", &proxy_url)
            .env("HTTPS_PROXY", &proxy_url)
            .env("ALL_PROXY", &proxy_url)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let output = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success() && output.contains("1 passed"),
        "the child's delivery failed: {output}"
    );
    assert_eq!(target.count(), 1, "the target was not reached directly");
    assert_eq!(proxy.count(), 0, "the request went through the proxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_kept_alive_and_a_cut_response_never_leaves_one_half_read() {
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec();
    let mut big = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 3 * CAP).into_bytes();
    big.extend(std::iter::repeat_n(b'b', 3 * CAP));
    let e = endpoint(
        "127.0.0.2",
        vec![
            ("/ok", Script::KeepAlive(ok)),
            ("/big", Script::KeepAlive(big)),
        ],
    )
    .await;
    let c = client();
    for _ in 0..20 {
        let out = c.deliver(delivery(&e.url("/ok"), 5000, false)).await;
        assert_eq!(out.outcome, "delivered", "{out:?}");
        assert_eq!(out.response_body.as_deref(), Some("ok"));
    }
    assert_eq!((e.count(), e.connection_count()), (20, 1));

    // A response cut at the cap takes its connection along: the next request goes on a new
    // one and reads its own answer, not the rest of the cut body.
    let out = c.deliver(delivery(&e.url("/big"), 5000, false)).await;
    assert!(out.response_body.as_deref().unwrap().ends_with(TRUNCATED));
    let out = c.deliver(delivery(&e.url("/ok"), 5000, false)).await;
    assert_eq!(out.response_body.as_deref(), Some("ok"), "{out:?}");
    assert_eq!((e.count(), e.connection_count()), (22, 2));

    // Many at once: each request arrives once, on at most one connection each.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (c, url) = (c.clone(), e.url(&format!("/ok?n={i}")));
        tasks.push(tokio::spawn(async move {
            c.deliver(delivery(&url, 5000, false)).await
        }));
    }
    for t in tasks {
        let out = t.await.unwrap();
        assert_eq!(out.outcome, "delivered", "{out:?}");
    }
    assert_eq!(e.count(), 22 + 64);
    assert!(e.connection_count() <= 2 + 64, "{}", e.connection_count());
    let heads = e.heads.lock().unwrap();
    for i in 0..64 {
        let path = format!("POST /ok?n={i} ");
        assert_eq!(
            heads.iter().filter(|h| h.starts_with(&path)).count(),
            1,
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_endpoint_closed_while_idle_is_not_sent_on() {
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec();
    let e = endpoint("127.0.0.2", vec![("/", Script::IdleClose(ok))]).await;
    let c = client();
    for round in 1..=3 {
        let out = c.deliver(delivery(&e.url("/idle"), 5000, false)).await;
        assert_eq!(out.outcome, "delivered", "round {round}: {out:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Sent once each, every one on a connection of its own.
    assert_eq!((e.count(), e.connection_count()), (3, 3));
}
