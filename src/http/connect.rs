//! Connections to webhook endpoints: HTTP/1.1 over TCP, or over TLS for `https`, made to an
//! address the SSRF guard checked and kept alive per origin for the next delivery.
//!
//! A connection serves one request at a time and belongs to that request until its response
//! has been read to the end; only then does it go back to the pool. A response cut short (at
//! the size cap, a timeout, a broken body) takes its connection with it, so a connection in
//! the pool never has a half-read response on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::ssrf::{self, Allowlist, ResolveError};

/// The sending half of a connection; its other half runs as a task of its own.
pub type Sender = SendRequest<Full<Bytes>>;

/// How long an idle connection is kept (endpoints commonly close theirs after a minute or two).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often idle connections are swept (`Pool::start_sweeper`).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// What a connection may be reused for: the scheme's security, the host and the port.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Origin {
    pub tls: bool,
    /// As the URL writes it: a name, a dotted quad or `[v6]`.
    pub host: String,
    pub port: u16,
}

impl Origin {
    /// None for a URL without a host or a port (neither http nor https).
    pub fn of(url: &url::Url) -> Option<Origin> {
        Some(Origin {
            tls: url.scheme() == "https",
            host: url.host_str()?.to_string(),
            port: url.port_or_known_default()?,
        })
    }
}

/// Why no connection could be made. Texts name no host or address.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("tcp connect error: {0}")]
    Tcp(std::io::Error),
    #[error("the host is not a valid TLS server name")]
    ServerName,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
}

type Idle = HashMap<Origin, Vec<(Sender, Instant)>>;

/// Idle connections by origin, newest last, each with when it was last used.
pub struct Pool {
    idle: Arc<Mutex<Idle>>,
    max_idle_per_origin: usize,
    idle_timeout: Duration,
    sweeper: AtomicBool,
}

impl Pool {
    pub fn new(max_idle_per_origin: usize) -> Pool {
        Pool::with_idle_timeout(max_idle_per_origin, IDLE_TIMEOUT)
    }

    pub fn with_idle_timeout(max_idle_per_origin: usize, idle_timeout: Duration) -> Pool {
        Pool {
            idle: Arc::new(Mutex::new(HashMap::new())),
            max_idle_per_origin: max_idle_per_origin.max(1),
            idle_timeout,
            sweeper: AtomicBool::new(false),
        }
    }

    /// The most recently used idle connection to `origin` that is still open, if any;
    /// closed and expired ones are dropped on the way. (It may still be finishing the last
    /// exchange: wait for `ready` before sending.)
    pub fn take(&self, origin: &Origin) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(origin)?;
        while let Some((sender, since)) = list.pop() {
            if since.elapsed() < self.idle_timeout && !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps a connection whose response was read to the end, if there is room.
    pub fn put(&self, origin: Origin, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        self.start_sweeper();
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let list = idle.entry(origin).or_default();
        if list.len() < self.max_idle_per_origin {
            list.push((sender, Instant::now()));
        }
    }

    /// Closes what has been idle too long, every so often, for as long as the pool exists:
    /// `take` only ever looks at an origin's newest connections, so after a burst the older
    /// ones (and origins no longer used) would otherwise stay open. Started by the first
    /// `put`, which runs on the runtime.
    fn start_sweeper(&self) {
        if self.sweeper.swap(true, Ordering::Relaxed) {
            return;
        }
        let idle = Arc::downgrade(&self.idle);
        let (timeout, every) = (self.idle_timeout, (self.idle_timeout / 2).min(SWEEP_EVERY));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(idle) = idle.upgrade() else {
                    return;
                };
                let Ok(mut idle) = idle.lock() else {
                    return;
                };
                idle.retain(|_, list| {
                    list.retain(|(sender, since)| since.elapsed() < timeout && !sender.is_closed());
                    !list.is_empty()
                });
            }
        });
    }
}

/// A new connection to `origin`: to its IP literal (which the caller checked), or to the
/// first address of its name that the guard lets through and that accepts.
pub async fn connect(
    tls: &Arc<rustls::ClientConfig>,
    allowlist: &Allowlist,
    origin: &Origin,
) -> Result<Sender, ConnectError> {
    let addrs = match ssrf::host_ip(&origin.host) {
        Some(ip) => vec![SocketAddr::new(ip, origin.port)],
        None => ssrf::resolve(allowlist, &origin.host, origin.port).await?,
    };
    let mut last = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let stream = stream.ok_or_else(|| {
        ConnectError::Tcp(last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()))
    })?;
    // Requests are small and written whole: send them at once.
    stream.set_nodelay(true).map_err(ConnectError::Tcp)?;
    if !origin.tls {
        return handshake(stream).await;
    }
    let bare = origin
        .host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(&origin.host);
    let name = ServerName::try_from(bare.to_string()).map_err(|_| ConnectError::ServerName)?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, stream)
        .await
        .map_err(ConnectError::Tls)?;
    handshake(stream).await
}

async fn handshake<T>(io: T) -> Result<Sender, ConnectError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // hyper bounds a response head: 100 headers, ~400 KiB.
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        // Its end (the endpoint closed, or the sender and response were dropped) is not an
        // error of any delivery: one in progress sees it through its own response.
        let _ = connection.await;
    });
    Ok(sender)
}

/// TLS as webhook endpoints need it: the public roots (webpki-roots) and, when configured,
/// those of `queue_ext.http_ca_file`; HTTP/1.1 offered by ALPN.
pub fn tls_config(
    extra_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod unit {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let origin = Origin {
            tls: false,
            host: "127.0.0.2".into(),
            port: listener.local_addr().unwrap().port(),
        };
        let pool = Pool::with_idle_timeout(8, Duration::from_millis(200));
        let tls = Arc::new(tls_config(Vec::new()).unwrap());
        let list = Allowlist::parse("127.0.0.2");
        let mut ends = Vec::new();
        for _ in 0..3 {
            let sender = connect(&tls, &list, &origin).await.unwrap();
            let (server_end, _) = listener.accept().await.unwrap();
            ends.push(server_end);
            pool.put(origin.clone(), sender);
        }
        // Taken and put back: the newest stays in use, the two older ones only idle.
        for _ in 0..4 {
            let sender = pool.take(&origin).unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            pool.put(origin.clone(), sender);
        }
        let mut closed = 0;
        for end in &mut ends {
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_millis(100), end.read(&mut buf)).await;
            if matches!(read, Ok(Ok(0))) {
                closed += 1;
            }
        }
        assert_eq!(closed, 2, "the two idle connections, not the one in use");
        assert_eq!(pool.idle.lock().unwrap()[&origin].len(), 1);
    }
}
