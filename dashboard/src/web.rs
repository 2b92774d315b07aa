//! Routes, the guard every request passes, and the action handlers.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};

use crate::auth::{self, Auth};
use crate::db::{Db, DbError, JobFilter};
use crate::live::Live;
use crate::pages;

const PAGE: i64 = 50;

#[derive(Clone)]
pub struct AppState {
    pub db: Arc<Db>,
    pub live: Arc<Live>,
    pub auth: Arc<Auth>,
    pub read_only: bool,
}

impl AppState {
    pub fn new(db: Arc<Db>, live: Arc<Live>, token: Option<String>, read_only: bool) -> AppState {
        AppState {
            db,
            live,
            auth: Arc::new(Auth::new(token)),
            read_only,
        }
    }

    pub fn view(&self) -> pages::View {
        pages::View {
            csrf: self.auth.csrf.clone(),
            read_only: self.read_only,
            logged_in: self.auth.required(),
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/queues/{queue}", get(queue_page))
        .route("/queues/{queue}/pause", post(pause))
        .route("/queues/{queue}/resume", post(resume))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/retry", post(retry))
        .route("/dead", get(dead_page))
        .route("/dead/retry", post(retry_many))
        .route("/dead/purge", post(purge))
        .route("/limits", post(set_limit))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/events", get(events))
        .route("/metrics", get(metrics))
        .route("/api/queues", get(api_queues))
        .route("/api/queues/{queue}/jobs", get(api_jobs))
        .route("/api/jobs/{id}", get(api_job))
        .route("/api/dead", get(api_dead))
        .route("/static/app.js", get(app_js))
        .route("/static/app.css", get(app_css))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Every request: the Host check (no token) or authentication (token), then the headers
/// that keep the pages from being framed, sniffed or loading anything from elsewhere.
async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let public = path == "/login" || path.starts_with("/static/");
    let mut res = if !s.auth.required() {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if auth::loopback_host(host) {
            next.run(req).await
        } else {
            (
                StatusCode::FORBIDDEN,
                "this dashboard answers only to localhost without --token\n",
            )
                .into_response()
        }
    } else if public || s.auth.allows(req.headers()) {
        next.run(req).await
    } else if req.method() == Method::GET && wants_html(req.headers()) {
        Redirect::to("/login").into_response()
    } else {
        let mut r = (StatusCode::UNAUTHORIZED, "token required\n").into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

fn wants_html(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// A database error as a page (or JSON under /api/), with the status its SQLSTATE means.
fn db_error(e: DbError, json: bool) -> Response {
    let status = match e.code.as_deref() {
        Some("42501") => StatusCode::FORBIDDEN,
        Some("42704") => StatusCode::NOT_FOUND,
        Some("55000" | "55006") => StatusCode::CONFLICT,
        Some(c) if c.starts_with("22") => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if json {
        (
            status,
            Json(serde_json::json!({"error": e.message, "sqlstate": e.code})),
        )
            .into_response()
    } else {
        (
            status,
            Html(pages::error_page(&e.message, e.code.as_deref())),
        )
            .into_response()
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, Html(pages::error_page(why, None))).into_response()
}

// Pages.

async fn overview(State(s): State<AppState>) -> Response {
    let counts = match s.db.queue_counts().await {
        Ok(c) => c,
        Err(e) => return db_error(e, false),
    };
    let hosts = s.db.webhook_hosts().await;
    let throughput = s.db.throughput().await.unwrap_or_default();
    let dispatchers = s.db.dispatchers().await.unwrap_or_default();
    let health = s.db.health().await.unwrap_or(serde_json::Value::Null);
    let limits = s.db.limits().await.unwrap_or_default();
    Html(pages::overview(
        &s.view(),
        &counts,
        &hosts,
        &throughput,
        &dispatchers,
        &health,
        &limits,
    ))
    .into_response()
}

fn filter(queue: String, mut f: JobFilter) -> JobFilter {
    f.queue = queue;
    f.limit = PAGE + 1;
    f
}

async fn queue_page(
    State(s): State<AppState>,
    Path(queue): Path<String>,
    Query(f): Query<JobFilter>,
) -> Response {
    let f = filter(queue, f);
    let counts = match s.db.queue_counts().await {
        Ok(c) => c,
        Err(e) => return db_error(e, false),
    };
    let Some(q) = counts.iter().find(|c| c.queue == f.queue) else {
        return refuse(StatusCode::NOT_FOUND, "no such queue");
    };
    match s.db.jobs(&f).await {
        Ok(mut jobs) => {
            let more = jobs.len() as i64 > PAGE;
            jobs.truncate(PAGE as usize);
            Html(pages::queue(&s.view(), q, &f, &jobs, more)).into_response()
        }
        Err(e) => db_error(e, false),
    }
}

async fn job_page(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match s.db.job(&id).await {
        Ok(Some(j)) => Html(pages::job(&s.view(), &j)).into_response(),
        Ok(None) => refuse(StatusCode::NOT_FOUND, "no such job"),
        Err(e) => db_error(e, false),
    }
}

#[derive(serde::Deserialize)]
struct DeadQuery {
    queue: Option<String>,
    before: Option<String>,
}

async fn dead_page(State(s): State<AppState>, Query(q): Query<DeadQuery>) -> Response {
    match s
        .db
        .dead_letters(q.queue.as_deref(), q.before.as_deref(), PAGE + 1)
        .await
    {
        Ok(mut rows) => {
            let more = rows.len() as i64 > PAGE;
            rows.truncate(PAGE as usize);
            Html(pages::dead(&s.view(), q.queue.as_deref(), &rows, more)).into_response()
        }
        Err(e) => db_error(e, false),
    }
}

// Actions: refused in read-only mode and without the CSRF token, then one SQL API call.

struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &Bytes) -> Form {
        Form(
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    /// Where to go afterwards: a path of ours, never another site.
    fn back(&self, default: &str) -> String {
        match self.get("back") {
            // Visible ASCII only: it becomes a Location header.
            Some(b)
                if b.starts_with('/')
                    && !b.starts_with("//")
                    && !b.contains('\\')
                    && b.bytes().all(|c| (0x21..0x7f).contains(&c)) =>
            {
                b.to_string()
            }
            _ => default.to_string(),
        }
    }
}

fn check_action(s: &AppState, form: &Form) -> Option<Response> {
    if s.read_only {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "this dashboard is read-only: actions are refused",
        ));
    }
    if !s.auth.csrf_ok(form.get("csrf")) {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token: reload the page and try again",
        ));
    }
    None
}

async fn pause(State(s): State<AppState>, Path(queue): Path<String>, body: Bytes) -> Response {
    set_paused(s, queue, body, true).await
}

async fn resume(State(s): State<AppState>, Path(queue): Path<String>, body: Bytes) -> Response {
    set_paused(s, queue, body, false).await
}

async fn set_paused(s: AppState, queue: String, body: Bytes, paused: bool) -> Response {
    let form = Form::parse(&body);
    if let Some(r) = check_action(&s, &form) {
        return r;
    }
    match s.db.pause(&queue, paused).await {
        Ok(()) => Redirect::to(&form.back("/")).into_response(),
        Err(e) => db_error(e, false),
    }
}

async fn cancel(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if let Some(r) = check_action(&s, &form) {
        return r;
    }
    match s.db.cancel(&id).await {
        Ok(_) => Redirect::to(&format!("/jobs/{}", pages::url_path(&id))).into_response(),
        Err(e) => db_error(e, false),
    }
}

async fn retry(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if let Some(r) = check_action(&s, &form) {
        return r;
    }
    match s.db.retry_dead(&id).await {
        Ok(_) => {
            Redirect::to(&form.back(&format!("/jobs/{}", pages::url_path(&id)))).into_response()
        }
        Err(e) => db_error(e, false),
    }
}

async fn retry_many(State(s): State<AppState>, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if let Some(r) = check_action(&s, &form) {
        return r;
    }
    let ids = form.all("id");
    if ids.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "no dead job selected");
    }
    for id in ids {
        if let Err(e) = s.db.retry_dead(id).await {
            return db_error(e, false);
        }
    }
    Redirect::to(&form.back("/dead")).into_response()
}

async fn purge(State(s): State<AppState>, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if let Some(r) = check_action(&s, &form) {
        return r;
    }
    match s
        .db
        .purge_dead(form.get("queue"), form.get("older_than"))
        .await
    {
        Ok(_) => Redirect::to(&form.back("/dead")).into_response(),
        Err(e) => db_error(e, false),
    }
}

async fn set_limit(State(s): State<AppState>, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if let Some(r) = check_action(&s, &form) {
        return r;
    }
    let number = |name: &str| {
        form.get(name)
            .filter(|v| !v.is_empty())
            .map(str::parse::<i32>)
    };
    let (max, burst) = match (number("max"), number("burst")) {
        (Some(Ok(m)), None) => (m, None),
        (Some(Ok(m)), Some(Ok(b))) => (m, Some(b)),
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "max (and burst) must be whole numbers",
            )
        }
    };
    match s
        .db
        .set_limit(
            form.get("kind").unwrap_or(""),
            form.get("key").unwrap_or(""),
            max,
            form.get("per"),
            burst,
        )
        .await
    {
        Ok(()) => Redirect::to("/#limits").into_response(),
        Err(e) => db_error(e, false),
    }
}

// Login: the token, once, for a session cookie.

async fn login_page(State(s): State<AppState>) -> Response {
    if !s.auth.required() {
        return Redirect::to("/").into_response();
    }
    Html(pages::login(&s.auth.login_csrf, false)).into_response()
}

async fn login(State(s): State<AppState>, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if !s.auth.required() {
        return Redirect::to("/").into_response();
    }
    if !form
        .get("csrf")
        .is_some_and(|c| auth::same(&s.auth.login_csrf, c))
    {
        return refuse(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    if !s.auth.token_ok(form.get("token").unwrap_or("")) {
        return (
            StatusCode::UNAUTHORIZED,
            Html(pages::login(&s.auth.login_csrf, true)),
        )
            .into_response();
    }
    let id = s.auth.new_session();
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict",
        auth::COOKIE
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let form = Form::parse(&body);
    if !s.auth.csrf_ok(form.get("csrf")) {
        return refuse(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    if let Some(id) = auth::cookie(&headers, auth::COOKIE) {
        s.auth.end_session(&id);
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "queue_ext_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

// Live updates and machine-readable views.

async fn events(State(s): State<AppState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = s.live.subscribe();
    let stream = stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(data) => return Some((Ok(Event::default().event("counts").data(data)), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn metrics(State(s): State<AppState>) -> Response {
    match s.db.metrics().await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "# queue_ext.metrics() failed: {}\n",
                e.message.replace('\n', " ")
            ),
        )
            .into_response(),
    }
}

async fn api_queues(State(s): State<AppState>) -> Response {
    match s.db.queue_counts().await {
        Ok(c) => Json(serde_json::json!({ "queues": c })).into_response(),
        Err(e) => db_error(e, true),
    }
}

async fn api_jobs(
    State(s): State<AppState>,
    Path(queue): Path<String>,
    Query(f): Query<JobFilter>,
) -> Response {
    let f = filter(queue, f);
    match s.db.jobs(&f).await {
        Ok(mut jobs) => {
            let more = jobs.len() as i64 > PAGE;
            jobs.truncate(PAGE as usize);
            let next = if more {
                jobs.last().map(|j| j.id.clone())
            } else {
                None
            };
            Json(serde_json::json!({ "jobs": jobs, "next_before": next })).into_response()
        }
        Err(e) => db_error(e, true),
    }
}

async fn api_job(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match s.db.job(&id).await {
        Ok(Some(j)) => Json(j).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such job"})),
        )
            .into_response(),
        Err(e) => db_error(e, true),
    }
}

async fn api_dead(State(s): State<AppState>, Query(q): Query<DeadQuery>) -> Response {
    match s
        .db
        .dead_letters(q.queue.as_deref(), q.before.as_deref(), PAGE)
        .await
    {
        Ok(rows) => Json(serde_json::json!({ "dead": rows })).into_response(),
        Err(e) => db_error(e, true),
    }
}

async fn app_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../assets/app.js"),
    )
        .into_response()
}

async fn app_css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../assets/app.css"),
    )
        .into_response()
}
