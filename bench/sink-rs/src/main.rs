//! The webhook benchmark's sink: answers every request with 200 at once over keep-alive
//! HTTP/1.1 and records when each webhook-id arrived, with the `t0` (enqueue time) its body
//! carries. `GET /__stats` returns `{webhook-id: [[arrived, t0], ...]}`, `POST /__reset` clears
//! it, paths under `/slow` answer after 5 s, and `/floor` (the HTTP floor's requests,
//! src/http_floor.rs) is answered without being recorded. One thread per connection: the
//! dispatcher keeps a bounded pool of connections, and a compiled sink keeps the client side of
//! the benchmark from being what is measured.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type Arrivals = Arc<Mutex<HashMap<String, Vec<(f64, Option<f64>)>>>>;

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The number after `"t0":` in a JSON body, if any (the benchmark's payloads are flat).
fn t0_of(body: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = &text[text.find("\"t0\"")? + 4..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = rest.find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c))).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn serve(stream: TcpStream, arrivals: Arrivals) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let arrived = now();
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let (mut length, mut webhook_id) = (0usize, String::new());
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("webhook-id") {
                    webhook_id = value.to_string();
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        if path.starts_with("/slow") {
            std::thread::sleep(Duration::from_secs(5));
        }
        let reply = match (method.as_str(), path.as_str()) {
            ("GET", "/__stats") => {
                let all = arrivals.lock().unwrap();
                let mut out = String::from("{");
                for (i, (id, times)) in all.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&format!("\"{}\":[", id.replace('"', "")));
                    for (j, (at, t0)) in times.iter().enumerate() {
                        let t0 = t0.map(|t| t.to_string()).unwrap_or_else(|| "null".into());
                        out.push_str(&format!("{}[{at},{t0}]", if j > 0 { "," } else { "" }));
                    }
                    out.push(']');
                }
                out.push('}');
                out
            }
            (_, "/__reset") => {
                arrivals.lock().unwrap().clear();
                "{}".to_string()
            }
            // The HTTP floor's requests (src/http_floor.rs): answered, not recorded.
            (_, "/floor") => "{\"ok\":true}".to_string(),
            _ => {
                let t0 = t0_of(&body);
                arrivals.lock().unwrap().entry(webhook_id).or_default().push((arrived, t0));
                "{\"ok\":true}".to_string()
            }
        };
        // One write per response: one segment on the wire.
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
            reply.len(),
            reply
        );
        writer.write_all(response.as_bytes())?;
    }
}

fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).expect("usage: sink PORT");
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("cannot listen");
    let arrivals: Arrivals = Arc::default();
    for stream in listener.incoming().flatten() {
        let arrivals = arrivals.clone();
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = serve(stream, arrivals);
            })
            .ok();
    }
}
