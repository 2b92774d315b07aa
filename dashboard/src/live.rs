//! Live counts for the pages: one connection LISTENs on queue_ext_jobs (a queue name,
//! announced once enqueued jobs have committed) and queue_ext_events (every state change
//! of queues that publish events); either one, or a second passing, refreshes the counts,
//! which go to every open page as a server-sent event. Nothing is queried while no page
//! is open.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{broadcast, Notify};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::db::Db;

pub struct Live {
    pub tx: broadcast::Sender<String>,
    changed: Arc<Notify>,
}

impl Live {
    pub fn start(db: Arc<Db>, url: String) -> Arc<Live> {
        let (tx, _) = broadcast::channel(16);
        let live = Arc::new(Live {
            tx,
            changed: Arc::new(Notify::new()),
        });
        tokio::spawn(listen(url, live.changed.clone()));
        tokio::spawn(refresh(db, live.clone()));
        live
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        // A new page wants its first figures now, not at the next tick.
        self.changed.notify_one();
        self.tx.subscribe()
    }
}

async fn listen(url: String, changed: Arc<Notify>) {
    loop {
        match tokio_postgres::connect(&url, NoTls).await {
            Ok((client, mut connection)) => {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let driver = async {
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(_)) => changed.notify_one(),
                            Ok(_) => {}
                            Err(e) => {
                                eprintln!("queue_ext-dashboard: listener connection: {e}");
                                break;
                            }
                        }
                    }
                };
                let subscribe = async {
                    if let Err(e) = client
                        .batch_execute("LISTEN queue_ext_jobs; LISTEN queue_ext_events")
                        .await
                    {
                        eprintln!("queue_ext-dashboard: LISTEN failed: {e}");
                    }
                    std::future::pending::<()>().await
                };
                tokio::select! { _ = driver => {}, _ = subscribe => {} }
            }
            Err(e) => eprintln!("queue_ext-dashboard: listener cannot connect: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn refresh(db: Arc<Db>, live: Arc<Live>) {
    let mut pause = Duration::ZERO;
    loop {
        // Wake on a notification or once a second, whichever comes first. Counting reads
        // every live job (~0.16 s per million), so after each refresh the next one waits at
        // least three times as long as it took: a queue notifying constantly costs the
        // database at most a quarter of one backend, and a burst collapses into one refresh.
        tokio::time::sleep(pause).await;
        let rest = Duration::from_secs(1).saturating_sub(pause);
        let _ = tokio::time::timeout(rest, live.changed.notified()).await;
        if live.tx.receiver_count() == 0 {
            pause = Duration::ZERO;
            continue;
        }
        let started = Instant::now();
        let payload = match db.queue_counts().await {
            Ok(counts) => serde_json::json!({ "queues": counts }).to_string(),
            Err(e) => serde_json::json!({ "error": e.message }).to_string(),
        };
        let _ = live.tx.send(payload);
        pause = (started.elapsed() * 3).max(Duration::from_millis(100));
    }
}
