//! queue_ext-dashboard: a small web server that shows and steers queue_ext's queues.
//!
//! It reads through queue_ext's views and functions and acts only through its SQL API
//! (pause_queue, cancel_job, retry_dead_job, purge_dead_letter), with the privileges of the
//! role in --database-url: a queue_ext_worker role sees everything but secrets, actions need
//! queue_ext_admin. Live updates: LISTEN on queue_ext_jobs and queue_ext_events plus a one
//! second refresh, pushed to browsers with server-sent events.

mod auth;
mod db;
mod live;
mod pages;
mod web;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

const USAGE: &str = "usage: queue_ext-dashboard --database-url postgres://USER@HOST/DB \
[--listen 127.0.0.1:8080] [--token TOKEN] [--read-only]

  --database-url  where queue_ext is installed (also $DATABASE_URL)
  --listen        address to serve on (default 127.0.0.1:8080); any address that is not
                  loopback needs --token
  --token         require this token: `Authorization: Bearer TOKEN`, or a login form that
                  sets a session cookie (also $QUEUE_EXT_DASHBOARD_TOKEN)
  --read-only     show everything, offer and accept no action";

#[derive(Debug)]
struct Args {
    database_url: String,
    listen: SocketAddr,
    token: Option<String>,
    read_only: bool,
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut database_url = std::env::var("DATABASE_URL").ok();
    let mut listen = "127.0.0.1:8080".to_string();
    let mut token = std::env::var("QUEUE_EXT_DASHBOARD_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let mut read_only = false;
    while let Some(arg) = argv.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("{what} needs a value"))
        };
        match name.as_str() {
            "--database-url" => database_url = Some(value("--database-url")?),
            "--listen" => listen = value("--listen")?,
            "--token" => token = Some(value("--token")?),
            "--read-only" => read_only = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let database_url = database_url.ok_or("--database-url is required")?;
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| format!("--listen {listen:?} is not an address:port"))?;
    if let Some(t) = &token {
        if t.len() < 8 {
            return Err("--token must be at least 8 characters".into());
        }
    }
    // Anyone who can reach the port could act on the queues: off loopback, only with a token.
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(format!(
            "refusing to listen on {listen} without --token (only loopback addresses may go without one)"
        ));
    }
    Ok(Args {
        database_url,
        listen,
        token,
        read_only,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("queue_ext-dashboard: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let db = match db::Db::connect(&args.database_url).await {
        Ok(db) => Arc::new(db),
        Err(e) => {
            eprintln!("queue_ext-dashboard: cannot connect to the database: {e}");
            return ExitCode::FAILURE;
        }
    };
    let live = live::Live::start(db.clone(), args.database_url.clone());
    let state = web::AppState::new(db, live, args.token.clone(), args.read_only);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("queue_ext-dashboard: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    eprintln!(
        "queue_ext-dashboard listening on http://{addr}/ ({}{})",
        if args.token.is_some() {
            "token required"
        } else {
            "no token"
        },
        if args.read_only { ", read-only" } else { "" }
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term_wait = async move {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    let result = axum::serve(listener, web::router(state))
        .with_graceful_shutdown(async {
            tokio::select! { _ = shutdown => {}, _ = term_wait => {} }
        })
        .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("queue_ext-dashboard: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn non_loopback_needs_a_token() {
        let e = args(&["--database-url", "postgres://x", "--listen", "0.0.0.0:8080"]).unwrap_err();
        assert!(e.contains("without --token"), "{e}");
        assert!(args(&[
            "--database-url=postgres://x",
            "--listen=0.0.0.0:8080",
            "--token=abcdefgh12"
        ])
        .is_ok());
        assert!(args(&["--database-url", "postgres://x", "--listen", "[::1]:80"]).is_ok());
    }
}
