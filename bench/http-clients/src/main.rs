//! What an HTTP client path costs per webhook request, outside Postgres: the dispatcher's
//! request pattern (a thread outside the runtime spawns a task per request and refills as
//! requests finish, `IN_FLIGHT` at a time, results back through a std channel) against the
//! benchmark's sink (bench/sink-rs), with requests of a delivery's size and headers.
//!
//!     queue_ext_bench_http_clients MODE PORT N IN_FLIGHT THREADS
//!
//! MODE: `reqwest` (a reqwest 0.12 client configured as queue_ext 0.11 had it), `hyper`
//! (hyper's HTTP/1.1 connection API and a pool of idle connections, as queue_ext's client now
//! is), or `raw` (requests written by hand and answers parsed with httparse: what is left
//! without an HTTP library). Prints requests per second and this process's CPU per request.

use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Sender = hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>;

#[derive(Clone)]
enum Client {
    Reqwest(reqwest::Client),
    Hyper(Arc<Mutex<Vec<Sender>>>),
    Raw(Arc<Mutex<Vec<tokio::net::TcpStream>>>),
}

const SIGNATURE: &str = "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=";

/// A delivery's headers (the host and length aside).
fn headers(id: &str) -> [(&'static str, String); 5] {
    [
        ("content-type", "application/json".into()),
        ("user-agent", "queue_ext/bench".into()),
        ("webhook-id", id.into()),
        ("webhook-timestamp", "1764633600".into()),
        ("webhook-signature", SIGNATURE.into()),
    ]
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

async fn request(client: Client, port: u16, i: usize) -> u16 {
    let body = format!("{{\"t0\": 0, \"n\": {i}}}");
    let id = format!("msg_00000000-0000-7000-8000-{i:012}");
    let timeout = Duration::from_secs(5);
    match client {
        Client::Reqwest(c) => {
            let mut builder = c.post(format!("http://127.0.0.1:{port}/floor"));
            for (name, value) in headers(&id) {
                builder = builder.header(name, value);
            }
            let mut response = builder.body(body).timeout(timeout).send().await.unwrap();
            let status = response.status().as_u16();
            while response.chunk().await.unwrap().is_some() {}
            status
        }
        Client::Hyper(pool) => {
            let pooled = pool.lock().unwrap().pop();
            let mut sender = match pooled {
                Some(s) => s,
                None => {
                    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                    stream.set_nodelay(true).unwrap();
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let (sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
                    tokio::spawn(connection);
                    sender
                }
            };
            sender.ready().await.unwrap();
            let mut builder = hyper::Request::post("/floor").header("host", format!("127.0.0.1:{port}"));
            for (name, value) in headers(&id) {
                builder = builder.header(name, value);
            }
            let request = builder.body(Full::new(bytes::Bytes::from(body))).unwrap();
            let response = tokio::time::timeout(timeout, sender.send_request(request)).await.unwrap().unwrap();
            let status = response.status().as_u16();
            response.into_body().collect().await.unwrap();
            pool.lock().unwrap().push(sender);
            status
        }
        Client::Raw(pool) => {
            let pooled = pool.lock().unwrap().pop();
            let mut stream = match pooled {
                Some(s) => s,
                None => {
                    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                    stream.set_nodelay(true).unwrap();
                    stream
                }
            };
            let mut head = format!("POST /floor HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n");
            for (name, value) in headers(&id) {
                head += &format!("{name}: {value}\r\n");
            }
            head += &format!("content-length: {}\r\n\r\n{body}", body.len());
            let exchange = async {
                stream.write_all(head.as_bytes()).await.unwrap();
                let mut buf = Vec::with_capacity(1024);
                loop {
                    assert!(stream.read_buf(&mut buf).await.unwrap() > 0, "the sink closed");
                    let mut headers = [httparse::EMPTY_HEADER; 64];
                    let mut response = httparse::Response::new(&mut headers);
                    if let httparse::Status::Complete(at) = response.parse(&buf).unwrap() {
                        let length = response
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= at + length {
                            return response.code.unwrap();
                        }
                    }
                }
            };
            let status = tokio::time::timeout(timeout, exchange).await.unwrap();
            pool.lock().unwrap().push(stream);
            status
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: queue_ext_bench_http_clients reqwest|hyper|raw PORT N IN_FLIGHT THREADS");
        std::process::exit(2);
    }
    let mode = args[1].as_str();
    let port: u16 = args[2].parse().unwrap();
    let n: usize = args[3].parse().unwrap();
    let in_flight: usize = args[4].parse().unwrap();
    let threads: usize = args[5].parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().unwrap();
    let client = {
        let _entered = runtime.enter();
        match mode {
            "reqwest" => Client::Reqwest(
                reqwest::Client::builder()
                    .use_rustls_tls()
                    .no_proxy()
                    .redirect(reqwest::redirect::Policy::none())
                    .referer(false)
                    .pool_max_idle_per_host(in_flight)
                    .pool_idle_timeout(Duration::from_secs(90))
                    .connect_timeout(Duration::from_secs(10))
                    .tcp_nodelay(true)
                    .build()
                    .unwrap(),
            ),
            "hyper" => Client::Hyper(Arc::default()),
            "raw" => Client::Raw(Arc::default()),
            other => panic!("unknown mode {other}"),
        }
    };
    // The first IN_FLIGHT requests open the connections and are not counted.
    let total = n + in_flight;
    let (tx, rx) = channel::<u16>();
    let (mut sent, mut done) = (0, 0);
    let (mut cpu_at, mut started) = (None, Instant::now());
    while done < total {
        while sent < total && sent - done < in_flight {
            let (client, tx, i) = (client.clone(), tx.clone(), sent);
            runtime.spawn(async move {
                let _ = tx.send(request(client, port, i).await);
            });
            sent += 1;
        }
        let first = rx.recv().unwrap();
        for status in std::iter::once(first).chain(rx.try_iter()) {
            assert_eq!(status, 200);
            done += 1;
        }
        if done >= in_flight && cpu_at.is_none() {
            cpu_at = Some(cpu_seconds());
            started = Instant::now();
        }
    }
    let cpu_us = (cpu_seconds() - cpu_at.unwrap_or(0.0)) / n as f64 * 1e6;
    let per_s = n as f64 / started.elapsed().as_secs_f64();
    println!("{{\"mode\": \"{mode}\", \"per_s\": {per_s:.0}, \"client_cpu_us\": {cpu_us:.1}}}");
}
