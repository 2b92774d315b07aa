//! A queue_ext worker in Rust (tokio-postgres).
//!
//!     DATABASE_URL=postgresql://app@localhost/app QUEUE=emails CONCURRENCY=4 queue_ext-rust-worker
//!
//! CONCURRENCY tasks each hold a connection and run one job at a time. Idle tasks sleep until
//! `NOTIFY queue_ext_jobs, '<queue>'` (sent after an enqueue commits) or POLL_SECONDS pass:
//! the poll catches retries whose backoff has ended, which nobody announces. A long job's
//! lease is extended by a heartbeat every HEARTBEAT_SECONDS. A job that returns an error is
//! failed with fail_job (queue_ext retries it after backoff, up to the queue's max_attempts).
//!
//! SIGTERM or SIGINT: claim nothing more, give running jobs SHUTDOWN_GRACE seconds to finish,
//! then drop them and fail them with retry_in => 0 so another worker takes them at once. No
//! job is left `running` behind the process. Prints one JSON line per finished attempt.
use std::{env, error::Error, sync::Arc, time::Duration};

use futures_util::{stream, StreamExt};
use serde_json::{json, Value};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{watch, Notify},
    task::JoinSet,
    time::{self, Instant},
};
use tokio_postgres::{AsyncMessage, Client, NoTls};

struct Config {
    dsn: String,
    queue: String,
    concurrency: usize,
    poll: Duration,
    heartbeat: Duration,
    grace: Duration,
    worker_id: String,
}

impl Config {
    fn from_env() -> Self {
        let var =
            |name: &str, default: &str| env::var(name).unwrap_or_else(|_| default.to_string());
        let secs = |name: &str, default: &str| {
            Duration::from_secs_f64(
                var(name, default)
                    .parse()
                    .unwrap_or_else(|_| panic!("{name} must be a number")),
            )
        };
        Config {
            dsn: var("DATABASE_URL", "postgresql:///postgres"),
            queue: var("QUEUE", "default"),
            concurrency: var("CONCURRENCY", "4")
                .parse()
                .expect("CONCURRENCY must be a number"),
            poll: secs("POLL_SECONDS", "5"),
            heartbeat: secs("HEARTBEAT_SECONDS", "30"),
            grace: secs("SHUTDOWN_GRACE", "10"),
            worker_id: var("WORKER_ID", &format!("rust-{}", std::process::id())),
        }
    }
}

struct Job {
    id: String,
    payload: Value,
    attempt: i32,
    lease_token: String,
}

/// The work itself: replace with yours. This one sleeps `payload.ms` milliseconds and fails
/// its first `payload.fail_attempts` attempts.
async fn handle(job: &Job, cfg: &Config) -> Result<Value, String> {
    time::sleep(Duration::from_millis(
        job.payload["ms"].as_u64().unwrap_or(0),
    ))
    .await;
    if i64::from(job.attempt) <= job.payload["fail_attempts"].as_i64().unwrap_or(0) {
        return Err(format!("simulated failure on attempt {}", job.attempt));
    }
    Ok(json!({ "worker": cfg.worker_id }))
}

fn log(fields: Value) {
    println!("{fields}");
}

/// Runs one claimed job to its outcome: heartbeats while it works, then complete or fail.
/// `abandon` turns true when the shutdown grace is over: the work is dropped and given back.
async fn run(
    client: &Client,
    cfg: &Config,
    job: Job,
    mut abandon: watch::Receiver<bool>,
) -> Result<(), tokio_postgres::Error> {
    let work = handle(&job, cfg);
    let gone = async move {
        let _ = abandon.wait_for(|gone| *gone).await;
    };
    tokio::pin!(work, gone);
    let mut beat = time::interval_at(Instant::now() + cfg.heartbeat, cfg.heartbeat);
    let outcome = loop {
        tokio::select! {
            result = &mut work => break Some(result),
            _ = &mut gone => break None,
            _ = beat.tick() => {
                // 55000 means the lease was lost; the outcome below will report it too.
                if let Err(err) = client.execute("SELECT queue_ext.heartbeat($1::text::uuid, $2::text::uuid)",
                                                 &[&job.id, &job.lease_token]).await {
                    log(json!({"event": "heartbeat_failed", "job_id": job.id, "error": err.to_string()}));
                }
            }
        }
    };
    let (error, retry_in) = match outcome {
        Some(Ok(result)) => {
            client
                .execute("SELECT queue_ext.complete_job($1::text::uuid, $2, lease_token => $3::text::uuid)",
                         &[&job.id, &result, &job.lease_token])
                .await?;
            log(json!({"event": "completed", "job_id": job.id, "attempt": job.attempt}));
            return Ok(());
        }
        Some(Err(error)) => (error, None),
        None => (
            "worker shut down before the job finished".to_string(),
            Some("0"),
        ),
    };
    let row = client
        .query_one(
            "SELECT queue_ext.fail_job($1::text::uuid, $2, lease_token => $3::text::uuid, \
                    retry_in => $4::text::interval)::text",
            &[&job.id, &error, &job.lease_token, &retry_in],
        )
        .await?;
    let state: String = row.get(0);
    log(
        json!({"event": "failed", "job_id": job.id, "attempt": job.attempt, "state": state, "error": error}),
    );
    Ok(())
}

async fn connect(dsn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("connection error: {err}");
        }
    });
    Ok(client)
}

async fn slot(
    cfg: Arc<Config>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    abandon: watch::Receiver<bool>,
) -> Result<(), tokio_postgres::Error> {
    let client = connect(&cfg.dsn).await?;
    while !*stop.borrow() {
        // Registered before the claim, so a NOTIFY that arrives during it is not missed.
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let row = client
            .query_opt(
                "SELECT job_id::text, payload, attempt, lease_token::text \
                        FROM queue_ext.get_next_job($1, $2)",
                &[&cfg.queue, &cfg.worker_id],
            )
            .await?;
        let Some(row) = row else {
            tokio::select! {
                _ = woken => {}
                _ = time::sleep(cfg.poll) => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        let job = Job {
            id: row.get(0),
            payload: row.get(1),
            attempt: row.get(2),
            lease_token: row.get(3),
        };
        let id = job.id.clone();
        if let Err(err) = run(&client, &cfg, job, abandon.clone()).await {
            // e.g. 55000 when the lease expired mid-job: the job is someone else's now.
            log(json!({"event": "report_failed", "job_id": id, "error": err.to_string()}));
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let cfg = Arc::new(Config::from_env());

    // The listening connection: its notifications arrive through poll_message.
    let (listener, mut connection) = tokio_postgres::connect(&cfg.dsn, NoTls).await?;
    let wake = Arc::new(Notify::new());
    let (notify, queue) = (wake.clone(), cfg.queue.clone());
    tokio::spawn(async move {
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                if n.payload() == queue {
                    notify.notify_waiters();
                }
            }
        }
    });
    listener.batch_execute("LISTEN queue_ext_jobs").await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (abandon_tx, abandon_rx) = watch::channel(false);
    let mut slots = JoinSet::new();
    for _ in 0..cfg.concurrency {
        slots.spawn(slot(
            cfg.clone(),
            wake.clone(),
            stop_rx.clone(),
            abandon_rx.clone(),
        ));
    }
    log(
        json!({"event": "started", "worker": cfg.worker_id, "queue": cfg.queue, "concurrency": cfg.concurrency}),
    );

    let (mut term, mut int) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    stop_tx.send(true)?;
    let finish = async {
        while let Some(done) = slots.join_next().await {
            if let Ok(Err(err)) = done {
                eprintln!("worker task failed: {err}");
            }
        }
    };
    tokio::pin!(finish);
    if time::timeout(cfg.grace, &mut finish).await.is_err() {
        abandon_tx.send(true)?;
        finish.await;
    }
    log(json!({"event": "stopped", "worker": cfg.worker_id}));
    Ok(())
}
