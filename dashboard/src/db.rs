//! Every query the dashboard runs. Values are always bound as parameters; times, ids and
//! enums are turned into text by Postgres so that the pages print exactly what SQL says.

use serde::Serialize;
use serde_json::Value;
use tokio::sync::RwLock;
use tokio_postgres::{Client, NoTls, Row};

pub struct Db {
    url: String,
    client: RwLock<std::sync::Arc<Client>>,
}

/// A failed query, with the SQLSTATE when Postgres gave one.
#[derive(Debug)]
pub struct DbError {
    pub code: Option<String>,
    pub message: String,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(d) => DbError {
                code: Some(d.code().code().to_string()),
                message: d.message().to_string(),
            },
            None => DbError {
                code: None,
                message: e.to_string(),
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, DbError>;

pub async fn open(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("queue_ext-dashboard: database connection closed: {e}");
        }
    });
    client
        .batch_execute("SET application_name = 'queue_ext-dashboard'")
        .await?;
    Ok(client)
}

impl Db {
    pub async fn connect(url: &str) -> Result<Db> {
        let client = open(url).await?;
        Ok(Db {
            url: url.to_string(),
            client: RwLock::new(std::sync::Arc::new(client)),
        })
    }

    /// The shared connection, opened again if it was lost (a restart of the server).
    async fn client(&self) -> Result<std::sync::Arc<Client>> {
        {
            let c = self.client.read().await;
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let mut c = self.client.write().await;
        if c.is_closed() {
            *c = std::sync::Arc::new(open(&self.url).await?);
        }
        Ok(c.clone())
    }

    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        Ok(self.client().await?.query(sql, params).await?)
    }

    pub async fn queue_counts(&self) -> Result<Vec<QueueCounts>> {
        let rows = self
            .rows(
                "SELECT q.queue_name, q.paused, q.is_webhook,
                        coalesce(l.waiting, 0), coalesce(l.queued, 0), coalesce(l.retrying, 0),
                        coalesce(l.running, 0), coalesce(d.dead, 0)
                 FROM queue_ext.queues AS q
                 LEFT JOIN (SELECT j.queue_name,
                                   count(*) FILTER (WHERE j.status = 'waiting') AS waiting,
                                   count(*) FILTER (WHERE j.status = 'queued') AS queued,
                                   count(*) FILTER (WHERE j.status = 'retrying') AS retrying,
                                   count(*) FILTER (WHERE j.status = 'running') AS running
                            FROM queue_ext.job_queue AS j GROUP BY 1) AS l USING (queue_name)
                 LEFT JOIN (SELECT d.queue_name, count(*) AS dead
                            FROM queue_ext.job_dead_letter AS d GROUP BY 1) AS d USING (queue_name)
                 ORDER BY q.queue_name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| QueueCounts {
                queue: r.get(0),
                paused: r.get(1),
                webhook: r.get(2),
                waiting: r.get(3),
                queued: r.get(4),
                retrying: r.get(5),
                running: r.get(6),
                dead: r.get(7),
            })
            .collect())
    }

    /// Webhook target hosts (never the path, query, credentials or headers). Only admins may
    /// read webhook_targets: for any other role the map is empty.
    pub async fn webhook_hosts(&self) -> Vec<(String, String)> {
        self.rows(
            "SELECT t.queue_name, substring(t.url FROM '^[A-Za-z]+://(?:[^@/?#]*@)?([^/?#]+)')
             FROM queue_ext.webhook_targets AS t WHERE t.url IS NOT NULL",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .unwrap_or_default()
    }

    /// Completed jobs per minute and their mean wait, per queue, over the last hour (the
    /// archive's finished_at index bounds the read to that hour).
    pub async fn throughput(&self) -> Result<Vec<(String, i32, i64, f64)>> {
        let rows = self
            .rows(
                "SELECT a.queue_name,
                        (59 - floor(extract(epoch FROM date_trunc('minute', now()) - date_trunc('minute', a.finished_at)) / 60))::int,
                        count(*),
                        coalesce(avg(extract(epoch FROM a.started_at - a.run_at)), 0)::float8
                 FROM queue_ext.job_archive AS a
                 WHERE a.finished_at > date_trunc('minute', now()) - interval '59 minutes'
                   AND a.status = 'completed'
                 GROUP BY 1, 2",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    pub async fn dispatchers(&self) -> Result<Vec<Dispatcher>> {
        let rows = self
            .rows(
                "SELECT s.database, s.running, s.state, s.detail, s.pid, s.in_flight, s.delivered,
                        s.retried, s.failed, to_char(s.last_heartbeat, 'YYYY-MM-DD HH24:MI:SS')
                 FROM queue_ext.dispatcher_status() AS s ORDER BY 1",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Dispatcher {
                database: r.get(0),
                running: r.get(1),
                state: r.get(2),
                detail: r.get(3),
                pid: r.get(4),
                in_flight: r.get(5),
                delivered: r.get(6),
                retried: r.get(7),
                failed: r.get(8),
                last_heartbeat: r.get(9),
            })
            .collect())
    }

    pub async fn health(&self) -> Result<Value> {
        Ok(self
            .rows("SELECT queue_ext.health()", &[])
            .await?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(Value::Null))
    }

    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .rows("SELECT queue_ext.metrics()", &[])
            .await?
            .first()
            .map(|r| r.get(0))
            .unwrap_or_default())
    }

    /// One page of a queue's jobs, newest first. Job ids are UUIDv7 (time-ordered), so the
    /// page after `before` is an index range on the primary key however deep it is.
    pub async fn jobs(&self, f: &JobFilter) -> Result<Vec<JobRow>> {
        let (table, time_col, status_ok) = match f.state.as_deref() {
            None | Some("") => ("job_queue", "created_at", true),
            Some("waiting" | "queued" | "retrying" | "running") => {
                ("job_queue", "created_at", true)
            }
            Some("completed" | "cancelled") => ("job_archive", "finished_at", true),
            Some("dead") => ("job_dead_letter", "died_at", false),
            Some(other) => {
                return Err(DbError {
                    code: Some("22023".into()),
                    message: format!("unknown state {other:?}"),
                })
            }
        };
        let status = if status_ok {
            "j.status::text"
        } else {
            "'dead'::text"
        };
        // Table and column names come from the fixed list above, never from the request.
        let sql = format!(
            "SELECT j.id::text, {status}, j.priority::text, j.attempt, left(j.payload::text, 300),
                    to_char(j.{time_col}, 'YYYY-MM-DD HH24:MI:SS.MS'), j.last_error
             FROM queue_ext.{table} AS j
             WHERE j.queue_name = $1
               AND ($2::text IS NULL OR {status} = $2)
               AND ($3::text IS NULL OR j.payload ->> $3 = $4)
               AND ($5::text IS NULL OR j.priority::text = $5)
               AND ($6::text IS NULL OR j.id < $6::text::uuid)
               AND ($8::text IS NULL OR j.{time_col} >= $8::text::timestamptz)
               AND ($9::text IS NULL OR j.{time_col} < $9::text::timestamptz)
             ORDER BY j.id DESC LIMIT $7"
        );
        let before = match f.before.as_deref().filter(|s| !s.is_empty()) {
            Some(b) => Some(parse_uuid(b)?),
            None => None,
        };
        let state = f.state.clone().filter(|s| !s.is_empty());
        let key = f.key.clone().filter(|s| !s.is_empty());
        let priority = f.priority.clone().filter(|s| !s.is_empty());
        let limit = f.limit;
        let since = f.since.clone().filter(|s| !s.is_empty());
        let until = f.until.clone().filter(|s| !s.is_empty());
        let rows = self
            .rows(
                &sql,
                &[
                    &f.queue,
                    &state,
                    &key,
                    &f.value.clone().unwrap_or_default(),
                    &priority,
                    &before,
                    &limit,
                    &since,
                    &until,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| JobRow {
                id: r.get(0),
                state: r.get(1),
                priority: r.get(2),
                attempt: r.get(3),
                payload: r.get(4),
                at: r.get(5),
                last_error: r.get(6),
            })
            .collect())
    }

    pub async fn dead_letters(
        &self,
        queue: Option<&str>,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeadRow>> {
        let before = match before.filter(|s| !s.is_empty()) {
            Some(b) => Some(parse_uuid(b)?),
            None => None,
        };
        let rows = self
            .rows(
                "SELECT d.id::text, d.queue_name, d.attempt, d.reason, d.last_error,
                        left(d.payload::text, 200), to_char(d.died_at, 'YYYY-MM-DD HH24:MI:SS')
                 FROM queue_ext.job_dead_letter AS d
                 WHERE ($1::text IS NULL OR d.queue_name = $1) AND ($2::text IS NULL OR d.id < $2::text::uuid)
                 ORDER BY d.id DESC LIMIT $3",
                &[&queue.filter(|q| !q.is_empty()), &before, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| DeadRow {
                id: r.get(0),
                queue: r.get(1),
                attempt: r.get(2),
                reason: r.get(3),
                last_error: r.get(4),
                payload: r.get(5),
                died_at: r.get(6),
            })
            .collect())
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobDetail>> {
        let uuid = parse_uuid(id)?;
        let rows = self
            .rows(
                "SELECT s.id::text, s.queue_name, s.status::text, s.priority::text, s.attempt,
                        s.max_attempts, s.result, s.last_error, s.errors, s.progress::float8,
                        s.progress_details, s.worker_id, s.enqueued_by::text,
                        to_char(s.enqueued_at, 'YYYY-MM-DD HH24:MI:SS.MS'),
                        to_char(s.run_at, 'YYYY-MM-DD HH24:MI:SS.MS'),
                        to_char(s.started_at, 'YYYY-MM-DD HH24:MI:SS.MS'),
                        to_char(s.finished_at, 'YYYY-MM-DD HH24:MI:SS.MS'),
                        coalesce((SELECT j.payload FROM queue_ext.job_queue AS j WHERE j.id = s.id),
                                 (SELECT a.payload FROM queue_ext.job_archive AS a WHERE a.id = s.id),
                                 (SELECT d.payload FROM queue_ext.job_dead_letter AS d WHERE d.id = s.id)),
                        (SELECT d.reason FROM queue_ext.job_dead_letter AS d WHERE d.id = s.id)
                 FROM queue_ext.job_status($1::text::uuid) AS s",
                &[&uuid],
            )
            .await;
        let rows = match rows {
            Err(DbError { code: Some(c), .. }) if c == "42704" => return Ok(None),
            other => other?,
        };
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let mut history: Vec<History> = self
            .rows(
                "SELECT coalesce(h.from_status::text, ''), h.to_status::text, h.attempt,
                        h.worker_id, h.error, to_char(h.at, 'YYYY-MM-DD HH24:MI:SS.MS')
                 FROM queue_ext.job_status_history AS h WHERE h.job_id = $1::text::uuid ORDER BY h.id",
                &[&uuid],
            )
            .await?
            .iter()
            .map(|h| History {
                from: h.get(0),
                to: h.get(1),
                attempt: h.get(2),
                worker_id: h.get(3),
                error: h.get(4),
                at: h.get(5),
            })
            .collect();
        // The enqueue is recorded on the job, not in the history (jobs enqueued before
        // 0.6.0 have a history row for it: no second one then).
        if !history.iter().any(|h| h.from.is_empty()) {
            history.insert(
                0,
                History {
                    from: String::new(),
                    to: "enqueued".into(),
                    attempt: 0,
                    worker_id: None,
                    error: None,
                    at: r.get(13),
                },
            );
        }
        // Workers and admins read the delivery log and the dependency graph; a role that
        // cannot simply sees none.
        let deliveries = self
            .rows(
                "SELECT w.attempt, w.outcome, w.status_code, w.duration_ms, w.url, w.error,
                        left(w.response_body, 500), to_char(w.delivered_at, 'YYYY-MM-DD HH24:MI:SS.MS')
                 FROM queue_ext.webhook_deliveries AS w WHERE w.job_id = $1::text::uuid ORDER BY w.id",
                &[&uuid],
            )
            .await
            .unwrap_or_default()
            .iter()
            .map(|w| Delivery {
                attempt: w.get(0),
                outcome: w.get(1),
                status_code: w.get(2),
                duration_ms: w.get(3),
                url: w.get(4),
                error: w.get(5),
                response_excerpt: w.get(6),
                at: w.get(7),
            })
            .collect();
        let waits_for = self
            .rows(
                "SELECT d.depends_on::text FROM queue_ext.job_dependencies AS d WHERE d.job_id = $1::text::uuid ORDER BY 1",
                &[&uuid],
            )
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let needed_by = self
            .rows(
                "SELECT d.job_id::text FROM queue_ext.job_dependencies AS d WHERE d.depends_on = $1::text::uuid ORDER BY 1",
                &[&uuid],
            )
            .await
            .unwrap_or_default()
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(Some(JobDetail {
            id: r.get(0),
            queue: r.get(1),
            state: r.get(2),
            priority: r.get(3),
            attempt: r.get(4),
            max_attempts: r.get(5),
            result: r.get(6),
            last_error: r.get(7),
            errors: r.get(8),
            progress: r.get(9),
            progress_details: r.get(10),
            worker_id: r.get(11),
            enqueued_by: r.get(12),
            enqueued_at: r.get(13),
            run_at: r.get(14),
            started_at: r.get(15),
            finished_at: r.get(16),
            payload: r.get(17),
            dead_reason: r.get(18),
            history,
            deliveries,
            waits_for,
            needed_by,
        }))
    }

    pub async fn limits(&self) -> Result<Vec<Limit>> {
        let rows = self
            .rows(
                "SELECT l.kind, l.key, l.max_jobs, l.per::text, l.burst, l.tokens, l.max_running,
                        l.active, l.waiting, l.runnable
                 FROM queue_ext.list_limits() AS l ORDER BY 1, 2",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Limit {
                kind: r.get(0),
                key: r.get(1),
                max_jobs: r.get(2),
                per: r.get(3),
                burst: r.get(4),
                tokens: r.get(5),
                max_running: r.get(6),
                active: r.get(7),
                waiting: r.get(8),
                runnable: r.get(9),
            })
            .collect())
    }

    // Actions: queue_ext's own functions, which check the caller's role.

    /// A rate limit (`max` jobs per `per`, `burst`) or a concurrency limit (`max` running).
    pub async fn set_limit(
        &self,
        kind: &str,
        key: &str,
        max: i32,
        per: Option<&str>,
        burst: Option<i32>,
    ) -> Result<()> {
        match kind {
            "rate" => self
                .rows(
                    "SELECT queue_ext.set_rate_limit($1, $2, coalesce($3::text::interval, interval '1 second'),
                                                     coalesce($4::int, 1))",
                    &[&key, &max, &per.filter(|p| !p.is_empty()), &burst],
                )
                .await
                .map(|_| ()),
            "concurrency" => self
                .rows(
                    "SELECT queue_ext.set_concurrency_limit($1, $2)",
                    &[&key, &max],
                )
                .await
                .map(|_| ()),
            other => Err(DbError {
                code: Some("22023".into()),
                message: format!("unknown limit kind {:?}", truncate(other, 40)),
            }),
        }
    }

    pub async fn pause(&self, queue: &str, pause: bool) -> Result<()> {
        let sql = if pause {
            "SELECT queue_ext.pause_queue($1)"
        } else {
            "SELECT queue_ext.resume_queue($1)"
        };
        self.rows(sql, &[&queue]).await.map(|_| ())
    }

    pub async fn cancel(&self, id: &str) -> Result<String> {
        let uuid = parse_uuid(id)?;
        let rows = self
            .rows(
                "SELECT queue_ext.cancel_job($1::text::uuid, 'cancelled from the dashboard')::text",
                &[&uuid],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)).unwrap_or_default())
    }

    pub async fn retry_dead(&self, id: &str) -> Result<String> {
        let uuid = parse_uuid(id)?;
        let rows = self
            .rows(
                "SELECT queue_ext.retry_dead_job($1::text::uuid)::text",
                &[&uuid],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)).unwrap_or_default())
    }

    pub async fn purge_dead(&self, queue: Option<&str>, older_than: Option<&str>) -> Result<i64> {
        let rows = self
            .rows(
                "SELECT queue_ext.purge_dead_letter($2::text::interval, $1::text)::bigint",
                &[
                    &queue.filter(|q| !q.is_empty()),
                    &older_than.filter(|o| !o.is_empty()),
                ],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)).unwrap_or_default())
    }
}

fn parse_uuid(s: &str) -> Result<String> {
    // Checked here so that a malformed id is a clear 22023, not a cast error mid-query; the
    // value is still bound as a parameter and cast by Postgres.
    let ok = s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(DbError {
            code: Some("22023".into()),
            message: format!("{:?} is not a job id", truncate(s, 60)),
        })
    }
}

pub fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct QueueCounts {
    pub queue: String,
    pub paused: bool,
    pub webhook: bool,
    pub waiting: i64,
    pub queued: i64,
    pub retrying: i64,
    pub running: i64,
    pub dead: i64,
}

#[derive(Serialize)]
pub struct Limit {
    pub kind: String,
    pub key: String,
    pub max_jobs: Option<i32>,
    pub per: Option<String>,
    pub burst: Option<i32>,
    pub tokens: Option<f64>,
    pub max_running: Option<i32>,
    pub active: Option<i32>,
    pub waiting: Option<i64>,
    pub runnable: Option<i64>,
}

#[derive(Serialize)]
pub struct Dispatcher {
    pub database: String,
    pub running: bool,
    pub state: String,
    pub detail: String,
    pub pid: Option<i32>,
    pub in_flight: i64,
    pub delivered: i64,
    pub retried: i64,
    pub failed: i64,
    pub last_heartbeat: Option<String>,
}

#[derive(serde::Deserialize, Default, Clone)]
pub struct JobFilter {
    #[serde(skip)]
    pub queue: String,
    pub state: Option<String>,
    pub key: Option<String>,
    pub value: Option<String>,
    pub priority: Option<String>,
    pub before: Option<String>,
    /// Bounds on the job's time: created (live jobs), finished or died.
    pub since: Option<String>,
    pub until: Option<String>,
    #[serde(skip)]
    pub limit: i64,
}

#[derive(Serialize)]
pub struct JobRow {
    pub id: String,
    pub state: String,
    pub priority: String,
    pub attempt: i32,
    pub payload: String,
    pub at: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Serialize)]
pub struct DeadRow {
    pub id: String,
    pub queue: String,
    pub attempt: i32,
    pub reason: String,
    pub last_error: Option<String>,
    pub payload: String,
    pub died_at: Option<String>,
}

#[derive(Serialize)]
pub struct History {
    pub from: String,
    pub to: String,
    pub attempt: i32,
    pub worker_id: Option<String>,
    pub error: Option<String>,
    pub at: Option<String>,
}

#[derive(Serialize)]
pub struct Delivery {
    pub attempt: i32,
    pub outcome: String,
    pub status_code: Option<i32>,
    pub duration_ms: Option<f64>,
    pub url: String,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
    pub at: Option<String>,
}

#[derive(Serialize)]
pub struct JobDetail {
    pub id: String,
    pub queue: String,
    pub state: String,
    pub priority: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub result: Option<Value>,
    pub last_error: Option<String>,
    pub errors: Option<Value>,
    pub progress: Option<f64>,
    pub progress_details: Option<Value>,
    pub worker_id: Option<String>,
    pub enqueued_by: Option<String>,
    pub enqueued_at: Option<String>,
    pub run_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub payload: Option<Value>,
    pub dead_reason: Option<String>,
    pub history: Vec<History>,
    pub deliveries: Vec<Delivery>,
    pub waits_for: Vec<String>,
    pub needed_by: Vec<String>,
}
