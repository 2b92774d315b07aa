//! The HTML pages. Everything shown comes from the database, and payloads, errors, results
//! and worker ids are written by whoever enqueues or works: every value goes through `esc`
//! (or `attr`/`url_path` in attributes and links) on its way into a page.

use std::fmt::Write;

use serde_json::Value;

use crate::db::{DeadRow, Dispatcher, JobDetail, JobFilter, JobRow, Limit, QueueCounts};

pub struct View {
    pub csrf: String,
    pub read_only: bool,
    pub logged_in: bool,
}

pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt(s: &Option<String>) -> String {
    esc(s.as_deref().unwrap_or(""))
}

/// A value for a path segment or query value, percent-encoded (then safe in attributes).
pub fn url_path(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn layout(v: &View, title: &str, body: &str) -> String {
    let logout = if v.logged_in {
        format!(
            r#"<form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" value="{}"><button>Log out</button></form>"#,
            esc(&v.csrf)
        )
    } else {
        String::new()
    };
    let mode = if v.read_only {
        r#"<span class="badge" id="read-only">read-only</span>"#
    } else {
        ""
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · queue_ext</title><link rel="stylesheet" href="/static/app.css"><script src="/static/app.js" defer></script></head>
<body><header><a href="/" class="brand">queue_ext</a> <nav><a href="/">Overview</a> <a href="/dead">Dead letters</a> <a href="/metrics">Metrics</a></nav> {mode} <span id="live" class="muted"></span> {logout}</header>
<main>{body}</main></body></html>"#,
        title = esc(title),
    )
}

pub fn error_page(message: &str, code: Option<&str>) -> String {
    let code = code
        .map(|c| format!(" (SQLSTATE {})", esc(c)))
        .unwrap_or_default();
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Error · queue_ext</title><link rel="stylesheet" href="/static/app.css"></head>
<body><main><h1>Refused</h1><p class="error" id="error">{}{code}</p><p><a href="/">Back to the overview</a></p></main></body></html>"#,
        esc(message)
    )
}

pub fn login(csrf: &str, failed: bool) -> String {
    let msg = if failed {
        r#"<p class="error">Wrong token.</p>"#
    } else {
        ""
    };
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Log in · queue_ext</title><link rel="stylesheet" href="/static/app.css"></head>
<body><main><h1>queue_ext dashboard</h1>{msg}<form method="post" action="/login"><input type="hidden" name="csrf" value="{}">
<label>Token <input type="password" name="token" autofocus></label> <button>Log in</button></form></main></body></html>"#,
        esc(csrf)
    )
}

fn action(v: &View, path: &str, label: &str, confirm: &str, extra: &str) -> String {
    if v.read_only {
        return String::new();
    }
    format!(
        r#"<form method="post" action="{}" class="inline" data-confirm="{}"><input type="hidden" name="csrf" value="{}">{extra}<button>{}</button></form>"#,
        esc(path),
        esc(confirm),
        esc(&v.csrf),
        esc(label)
    )
}

/// A bar chart of `values` as inline SVG (no script, no external file).
fn bars(values: &[f64], width: u32, height: u32, title: &str) -> String {
    let max = values.iter().cloned().fold(0.0_f64, f64::max);
    let n = values.len().max(1) as f64;
    let w = f64::from(width) / n;
    let mut svg = format!(
        r##"<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img"><title>{}</title><rect width="{width}" height="{height}" fill="#f4f6f8"/>"##,
        esc(title)
    );
    if max > 0.0 {
        for (i, v) in values.iter().enumerate().filter(|(_, v)| **v > 0.0) {
            let h = (v / max * f64::from(height - 2)).max(if *v > 0.0 { 1.0 } else { 0.0 });
            let _ = write!(
                svg,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#3b82f6"/>"##,
                i as f64 * w,
                f64::from(height) - h,
                (w - 0.5).max(0.5)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

pub fn overview(
    v: &View,
    counts: &[QueueCounts],
    hosts: &[(String, String)],
    throughput: &[(String, i32, i64, f64)],
    dispatchers: &[Dispatcher],
    health: &Value,
    limits: &[Limit],
) -> String {
    let mut b = String::new();
    // health(): status and reasons.
    let status = health
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let _ = write!(
        b,
        r#"<section><h2>Health <span class="badge status-{0}" id="health-status">{0}</span></h2>"#,
        esc(status)
    );
    if let Some(reasons) = health.get("reasons").and_then(Value::as_array) {
        if !reasons.is_empty() {
            b.push_str(r#"<ul class="warnings" id="health-reasons">"#);
            for r in reasons {
                let _ = write!(b, "<li>{}</li>", esc(r.as_str().unwrap_or("")));
            }
            b.push_str("</ul>");
        }
    }
    b.push_str("</section>");

    // Throughput per queue and in all, per minute over the last hour.
    let mut all = vec![0.0; 60];
    let mut wait_sum = vec![0.0; 60];
    let mut per_queue: std::collections::HashMap<&str, Vec<f64>> = Default::default();
    for (q, minute, n, wait) in throughput {
        if let Ok(i) = usize::try_from(*minute) {
            if i < 60 {
                all[i] += *n as f64;
                wait_sum[i] += wait * *n as f64;
                per_queue.entry(q.as_str()).or_insert_with(|| vec![0.0; 60])[i] += *n as f64;
            }
        }
    }
    let mean_wait: Vec<f64> = wait_sum
        .iter()
        .zip(&all)
        .map(|(w, n)| if *n > 0.0 { w / n } else { 0.0 })
        .collect();
    let _ = write!(
        b,
        r#"<section class="charts" data-chart="overview"><figure>{}<figcaption>Completed per minute, last hour ({} in all)</figcaption></figure><figure>{}<figcaption>Mean wait per minute (s), last hour</figcaption></figure></section>"#,
        bars(&all, 360, 60, "completed per minute"),
        all.iter().sum::<f64>() as i64,
        bars(&mean_wait, 360, 60, "mean wait in seconds")
    );

    b.push_str(
        r#"<section><h2>Queues</h2><table id="queues"><thead><tr><th>Queue</th><th>State</th><th>Waiting</th><th>Queued</th><th>Retrying</th><th>Running</th><th>Dead</th><th>Completed, last hour</th><th>Webhook host</th><th></th></tr></thead><tbody>"#,
    );
    for c in counts {
        let host = hosts
            .iter()
            .find(|(q, _)| *q == c.queue)
            .map(|(_, h)| esc(h))
            .unwrap_or_else(|| {
                if c.webhook {
                    "webhook".into()
                } else {
                    String::new()
                }
            });
        let chart = per_queue
            .get(c.queue.as_str())
            .map(|v| {
                format!(
                    "{} {}",
                    bars(v, 120, 18, "completed per minute"),
                    v.iter().sum::<f64>() as i64
                )
            })
            .unwrap_or_default();
        // The extension's own queues (queue_ext.*) cannot be paused: no button that would fail.
        let toggle = if c.queue.starts_with("queue_ext.") {
            String::new()
        } else if c.paused {
            action(
                v,
                &format!("/queues/{}/resume", url_path(&c.queue)),
                "Resume",
                &format!("Resume queue {}?", c.queue),
                "",
            )
        } else {
            action(
                v,
                &format!("/queues/{}/pause", url_path(&c.queue)),
                "Pause",
                &format!("Pause queue {}?", c.queue),
                "",
            )
        };
        let q = esc(&c.queue);
        let _ = write!(
            b,
            r#"<tr data-queue="{q}"><td><a href="/queues/{}">{q}</a></td><td data-k="paused">{}</td><td data-k="waiting">{}</td><td data-k="queued">{}</td><td data-k="retrying">{}</td><td data-k="running">{}</td><td data-k="dead">{}</td><td data-chart="{q}">{chart}</td><td>{host}</td><td>{toggle}</td></tr>"#,
            url_path(&c.queue),
            if c.paused { "paused" } else { "active" },
            c.waiting,
            c.queued,
            c.retrying,
            c.running,
            c.dead
        );
    }
    b.push_str("</tbody></table></section>");

    b.push_str(r#"<section><h2>Dispatchers</h2><table id="dispatchers"><thead><tr><th>Database</th><th>Running</th><th>State</th><th>PID</th><th>In flight</th><th>Delivered</th><th>Retried</th><th>Failed</th><th>Last heartbeat</th><th>Detail</th></tr></thead><tbody>"#);
    for d in dispatchers {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&d.database),
            if d.running { "yes" } else { "no" },
            esc(&d.state),
            d.pid.map(|p| p.to_string()).unwrap_or_default(),
            d.in_flight,
            d.delivered,
            d.retried,
            d.failed,
            opt(&d.last_heartbeat),
            esc(&d.detail)
        );
    }
    b.push_str("</tbody></table></section>");

    b.push_str(r#"<section id="limits"><h2>Limits</h2><table id="limit-table"><thead><tr><th>Kind</th><th>Key</th><th>Max</th><th>Per</th><th>Burst</th><th>Tokens</th><th>Running</th><th>Waiting</th><th>Runnable</th></tr></thead><tbody>"#);
    let num = |n: Option<i64>| n.map(|n| n.to_string()).unwrap_or_default();
    for l in limits {
        let max = if l.kind == "rate" {
            l.max_jobs
        } else {
            l.max_running
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&l.kind),
            esc(&l.key),
            num(max.map(i64::from)),
            opt(&l.per),
            num(l.burst.map(i64::from)),
            l.tokens.map(|t| format!("{t:.1}")).unwrap_or_default(),
            num(l.active.map(i64::from)),
            num(l.waiting),
            num(l.runnable)
        );
    }
    b.push_str("</tbody></table>");
    if !v.read_only {
        let _ = write!(
            b,
            r#"<form method="post" action="/limits" id="set-limit" data-confirm="Change this limit?"><input type="hidden" name="csrf" value="{}"><select name="kind"><option value="rate">rate</option><option value="concurrency">concurrency</option></select> <input name="key" placeholder="key"> max <input name="max" size="5"> per <input name="per" placeholder="1 second" size="10"> burst <input name="burst" size="4"> <button>Set limit</button></form>"#,
            esc(&v.csrf)
        );
    }
    b.push_str("</section>");
    layout(v, "Overview", &b)
}

const STATES: [&str; 7] = [
    "waiting",
    "queued",
    "retrying",
    "running",
    "completed",
    "cancelled",
    "dead",
];
const PRIORITIES: [&str; 4] = ["low", "normal", "high", "critical"];

fn select(name: &str, options: &[&str], current: Option<&str>, any: &str) -> String {
    let mut s = format!(r#"<select name="{name}"><option value="">{any}</option>"#);
    for o in options {
        let sel = if current == Some(*o) { " selected" } else { "" };
        let _ = write!(s, r#"<option{sel}>{o}</option>"#);
    }
    s.push_str("</select>");
    s
}

pub fn queue(v: &View, c: &QueueCounts, f: &JobFilter, jobs: &[JobRow], more: bool) -> String {
    let q = esc(&c.queue);
    let mut b = format!(
        r#"<h1>Queue {q} <span class="badge">{}</span></h1><table id="queues" class="counts"><tr data-queue="{q}"><th>Waiting</th><td data-k="waiting">{}</td><th>Queued</th><td data-k="queued">{}</td><th>Retrying</th><td data-k="retrying">{}</td><th>Running</th><td data-k="running">{}</td><th>Dead</th><td data-k="dead">{}</td></tr></table>"#,
        if c.paused { "paused" } else { "active" },
        c.waiting,
        c.queued,
        c.retrying,
        c.running,
        c.dead
    );
    let back = format!("/queues/{}", url_path(&c.queue));
    let extra = format!(
        r#"<input type="hidden" name="back" value="{}">"#,
        esc(&back)
    );
    b.push_str(&if c.queue.starts_with("queue_ext.") {
        String::new()
    } else if c.paused {
        action(
            v,
            &format!("{back}/resume"),
            "Resume",
            &format!("Resume queue {}?", c.queue),
            &extra,
        )
    } else {
        action(
            v,
            &format!("{back}/pause"),
            "Pause",
            &format!("Pause queue {}?", c.queue),
            &extra,
        )
    });
    let _ = write!(
        b,
        r#"<form method="get" action="{}" class="filters">{} {} <input name="key" placeholder="payload key" value="{}"> = <input name="value" placeholder="value" value="{}"> from <input name="since" placeholder="2026-01-31 12:00" value="{}"> to <input name="until" placeholder="time" value="{}"> <button>Filter</button></form>"#,
        esc(&back),
        select("state", &STATES, f.state.as_deref(), "live (any state)"),
        select(
            "priority",
            &PRIORITIES,
            f.priority.as_deref(),
            "any priority"
        ),
        opt(&f.key),
        opt(&f.value),
        opt(&f.since),
        opt(&f.until)
    );
    // The first page follows the queue live: the script reloads it from the JSON API when
    // the queue's counts change. Deeper pages stay put (their window is fixed by `before`).
    let live_src = if f.before.as_deref().unwrap_or("").is_empty() {
        let mut qs = form_urlencoded::Serializer::new(String::new());
        for (k, val) in [
            ("state", &f.state),
            ("priority", &f.priority),
            ("key", &f.key),
            ("value", &f.value),
            ("since", &f.since),
            ("until", &f.until),
        ] {
            if let Some(val) = val.as_deref().filter(|x| !x.is_empty()) {
                qs.append_pair(k, val);
            }
        }
        format!(
            r#" data-live="/api/queues/{}/jobs?{}" data-queue-name="{q}""#,
            url_path(&c.queue),
            esc(&qs.finish())
        )
    } else {
        String::new()
    };
    let _ = write!(
        b,
        r#"<table id="jobs"{live_src}><thead><tr><th>Job</th><th>State</th><th>Priority</th><th>Attempt</th><th>Time</th><th>Payload</th><th>Last error</th></tr></thead><tbody>"#
    );
    for j in jobs {
        let _ = write!(
            b,
            r#"<tr><td><a href="/jobs/{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>"#,
            url_path(&j.id),
            esc(&j.id),
            esc(&j.state),
            esc(&j.priority),
            j.attempt,
            opt(&j.at),
            esc(&j.payload),
            esc(crate::db::truncate(
                j.last_error.as_deref().unwrap_or(""),
                200
            ))
        );
    }
    b.push_str("</tbody></table>");
    if jobs.is_empty() {
        b.push_str(r#"<p class="muted">No jobs.</p>"#);
    }
    if more {
        if let Some(last) = jobs.last() {
            let mut qs = form_urlencoded::Serializer::new(String::new());
            for (k, val) in [
                ("state", &f.state),
                ("priority", &f.priority),
                ("key", &f.key),
                ("value", &f.value),
                ("since", &f.since),
                ("until", &f.until),
            ] {
                if let Some(val) = val.as_deref().filter(|x| !x.is_empty()) {
                    qs.append_pair(k, val);
                }
            }
            qs.append_pair("before", &last.id);
            let _ = write!(
                b,
                r#"<p><a id="next" href="{}?{}">Older jobs →</a></p>"#,
                esc(&back),
                esc(&qs.finish())
            );
        }
    }
    layout(v, &format!("Queue {}", c.queue), &b)
}

fn json_block(value: &Option<Value>) -> String {
    match value {
        Some(v) => format!(
            "<pre>{}</pre>",
            esc(&serde_json::to_string_pretty(v).unwrap_or_default())
        ),
        None => r#"<p class="muted">none</p>"#.into(),
    }
}

pub fn job(v: &View, j: &JobDetail) -> String {
    let mut b = format!(
        r#"<h1>Job <code>{}</code></h1><table class="fields" id="job">"#,
        esc(&j.id)
    );
    let progress = j.progress.map(|p| format!("{p}%")).unwrap_or_default();
    let attempts = format!("{} of {}", j.attempt, j.max_attempts);
    for (k, val) in [
        (
            "Queue",
            Some(format!(
                r#"<a href="/queues/{}">{}</a>"#,
                url_path(&j.queue),
                esc(&j.queue)
            )),
        ),
        (
            "State",
            Some(format!(r#"<span id="state">{}</span>"#, esc(&j.state))),
        ),
        ("Priority", Some(esc(&j.priority))),
        ("Attempts", Some(esc(&attempts))),
        ("Progress", Some(esc(&progress))),
        ("Worker", Some(opt(&j.worker_id))),
        ("Enqueued by", Some(opt(&j.enqueued_by))),
        ("Enqueued at", Some(opt(&j.enqueued_at))),
        ("Run at", Some(opt(&j.run_at))),
        ("Started at", Some(opt(&j.started_at))),
        ("Finished at", Some(opt(&j.finished_at))),
        ("Dead because", j.dead_reason.as_ref().map(|r| esc(r))),
        ("Last error", j.last_error.as_ref().map(|r| esc(r))),
    ] {
        if let Some(val) = val {
            let _ = write!(b, "<tr><th>{k}</th><td>{val}</td></tr>");
        }
    }
    b.push_str("</table>");
    let live = matches!(
        j.state.as_str(),
        "waiting" | "queued" | "retrying" | "running"
    );
    if live {
        b.push_str(&action(
            v,
            &format!("/jobs/{}/cancel", url_path(&j.id)),
            "Cancel job",
            "Cancel this job?",
            "",
        ));
    }
    if j.state == "dead" {
        b.push_str(&action(
            v,
            &format!("/jobs/{}/retry", url_path(&j.id)),
            "Retry job",
            "Retry this dead job?",
            "",
        ));
    }
    let _ = write!(
        b,
        r#"<h2>Payload</h2><div id="payload">{}</div>"#,
        json_block(&j.payload)
    );
    let _ = write!(
        b,
        r#"<h2>Result</h2><div id="result">{}</div>"#,
        json_block(&j.result)
    );
    if j.progress_details.is_some() {
        let _ = write!(
            b,
            "<h2>Progress details</h2>{}",
            json_block(&j.progress_details)
        );
    }
    let _ = write!(b, "<h2>Errors</h2>{}", json_block(&j.errors));

    b.push_str(r#"<h2>History</h2><table id="history"><thead><tr><th>At</th><th>From</th><th>To</th><th>Attempt</th><th>Worker</th><th>Error</th></tr></thead><tbody>"#);
    for h in &j.history {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            opt(&h.at),
            esc(&h.from),
            esc(&h.to),
            h.attempt,
            opt(&h.worker_id),
            opt(&h.error)
        );
    }
    b.push_str("</tbody></table>");

    b.push_str(r#"<h2>Webhook deliveries</h2><table id="deliveries"><thead><tr><th>At</th><th>Attempt</th><th>Outcome</th><th>Status</th><th>Duration (ms)</th><th>URL</th><th>Error</th><th>Response</th></tr></thead><tbody>"#);
    for d in &j.deliveries {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            opt(&d.at),
            d.attempt,
            esc(&d.outcome),
            d.status_code.map(|c| c.to_string()).unwrap_or_default(),
            d.duration_ms.map(|m| format!("{m:.1}")).unwrap_or_default(),
            esc(&d.url),
            opt(&d.error),
            opt(&d.response_excerpt)
        );
    }
    b.push_str("</tbody></table>");

    let links = |ids: &[String]| -> String {
        if ids.is_empty() {
            return r#"<span class="muted">none</span>"#.into();
        }
        ids.iter()
            .map(|i| format!(r#"<a href="/jobs/{}">{}</a>"#, url_path(i), esc(i)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = write!(
        b,
        r#"<h2>Dependencies</h2><p id="waits-for">Waits for: {}</p><p id="needed-by">Needed by: {}</p>"#,
        links(&j.waits_for),
        links(&j.needed_by)
    );
    layout(v, &format!("Job {}", j.id), &b)
}

pub fn dead(v: &View, queue: Option<&str>, rows: &[DeadRow], more: bool) -> String {
    let mut b = String::from("<h1>Dead letters</h1>");
    let _ = write!(
        b,
        r#"<form method="get" action="/dead" class="filters"><input name="queue" placeholder="queue" value="{}"> <button>Filter</button></form>"#,
        esc(queue.unwrap_or(""))
    );
    let back = match queue.filter(|q| !q.is_empty()) {
        Some(q) => format!("/dead?queue={}", url_path(q)),
        None => "/dead".to_string(),
    };
    let controls = !v.read_only;
    if controls {
        let _ = write!(
            b,
            r#"<form method="post" action="/dead/retry" id="retry-many" data-confirm="Retry the selected dead jobs?"><input type="hidden" name="csrf" value="{}"><input type="hidden" name="back" value="{}">"#,
            esc(&v.csrf),
            esc(&back)
        );
    }
    b.push_str(r#"<table id="dead"><thead><tr><th></th><th>Job</th><th>Queue</th><th>Attempts</th><th>Died at</th><th>Reason</th><th>Last error</th><th>Payload</th><th></th></tr></thead><tbody>"#);
    for d in rows {
        let (check, one) = if controls {
            (
                format!(
                    r#"<input type="checkbox" name="id" value="{}">"#,
                    esc(&d.id)
                ),
                format!(
                    r#"<button formaction="/jobs/{}/retry" data-confirm="Retry this dead job?" class="retry-one">Retry</button>"#,
                    url_path(&d.id)
                ),
            )
        } else {
            (String::new(), String::new())
        };
        let _ = write!(
            b,
            r#"<tr data-id="{}"><td>{check}</td><td><a href="/jobs/{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{one}</td></tr>"#,
            esc(&d.id),
            url_path(&d.id),
            esc(&d.id),
            esc(&d.queue),
            d.attempt,
            opt(&d.died_at),
            esc(&d.reason),
            esc(crate::db::truncate(
                d.last_error.as_deref().unwrap_or(""),
                200
            )),
            esc(&d.payload)
        );
    }
    b.push_str("</tbody></table>");
    if controls {
        b.push_str(r#"<p><button id="retry-selected">Retry selected</button></p></form>"#);
        let _ = write!(
            b,
            r#"<h2>Purge</h2><form method="post" action="/dead/purge" id="purge" data-confirm="Delete these dead letters for good?"><input type="hidden" name="csrf" value="{}"><input type="hidden" name="back" value="{}"><input name="queue" placeholder="queue (all if empty)" value="{}"> <input name="older_than" placeholder="older than, e.g. 7 days"> <button>Purge</button></form>"#,
            esc(&v.csrf),
            esc(&back),
            esc(queue.unwrap_or(""))
        );
    }
    if rows.is_empty() {
        b.push_str(r#"<p class="muted">No dead letters.</p>"#);
    }
    if more {
        if let Some(last) = rows.last() {
            let mut qs = form_urlencoded::Serializer::new(String::new());
            if let Some(q) = queue.filter(|q| !q.is_empty()) {
                qs.append_pair("queue", q);
            }
            qs.append_pair("before", &last.id);
            let _ = write!(
                b,
                r#"<p><a id="next" href="/dead?{}">Older →</a></p>"#,
                esc(&qs.finish())
            );
        }
    }
    layout(v, "Dead letters", &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(url_path("a b/c?d"), "a+b%2Fc%3Fd");
    }
}
