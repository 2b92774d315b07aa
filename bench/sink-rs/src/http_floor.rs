//! The webhook cell's floor: what this machine's loopback HTTP does with no database and no
//! queue. `CONNECTIONS` threads, each with one keep-alive connection to the sink, send `N`
//! POSTs in all, each with the headers and body size of a delivery (webhook-id, timestamp,
//! signature, a small JSON body), reading each 200 before sending the next. Prints one JSON
//! line: requests per second and this client's CPU per request.
//!
//!     queue_ext_bench_http_floor PORT N CONNECTIONS

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn run(port: u16, next: &AtomicUsize, n: usize) -> std::io::Result<()> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return Ok(());
        }
        let body = format!("{{\"t0\": 0, \"n\": {i}}}");
        let request = format!(
            "POST /floor HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n\
             user-agent: queue_ext-http-floor\r\nwebhook-id: msg_00000000-0000-7000-8000-{i:012}\r\n\
             webhook-timestamp: 1764633600\r\n\
             webhook-signature: v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        writer.write_all(request.as_bytes())?;
        let mut length = 0usize;
        line.clear();
        reader.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!("unexpected status line {line:?}")));
        }
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("connection closed mid-response"));
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut reply = vec![0u8; length];
        reader.read_exact(&mut reply)?;
    }
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().ok());
    let (Some(Some(port)), Some(Some(n)), Some(Some(connections))) = (args.next(), args.next(), args.next())
    else {
        eprintln!("usage: queue_ext_bench_http_floor PORT N CONNECTIONS");
        std::process::exit(2);
    };
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let threads: Vec<_> = (0..connections.max(1))
        .map(|_| {
            let next = next.clone();
            std::thread::spawn(move || run(port as u16, &next, n))
        })
        .collect();
    for t in threads {
        let failure = match t.join() {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "a client thread panicked".to_string(),
        };
        eprintln!("queue_ext_bench_http_floor: {failure}");
        std::process::exit(1);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_us = (cpu_seconds() - cpu_before) / n.max(1) as f64 * 1e6;
    println!("{{\"per_s\": {:.1}, \"client_cpu_us\": {:.1}}}", n as f64 / elapsed, cpu_us);
}
