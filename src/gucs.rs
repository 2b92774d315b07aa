//! Settings, all under the reserved `queue_ext.` prefix. One static per setting, one typed
//! accessor each; `init()` registers them from `_PG_init`.

use std::ffi::CString;
use std::time::Duration;

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Largest payload, in bytes of stored jsonb, that enqueue accepts.
static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
/// Databases the dispatchers serve, comma-separated; empty: every database with queue_ext.
static DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Requests one dispatcher may have in flight at once, over all queues.
static MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(256);
/// Request timeout for webhook queues that set none.
static HTTP_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
/// Backstop poll: how long the dispatcher sleeps when nothing wakes it.
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
/// Hosts and CIDRs the SSRF guard lets through although they are private.
static HTTP_ALLOWLIST: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Extra trusted root certificates (PEM file), e.g. a private CA.
static HTTP_CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// How much of a response body is kept.
static RESPONSE_MAX_BYTES: GucSetting<i32> = GucSetting::<i32>::new(64 * 1024);
/// How long webhook_deliveries rows are kept, in minutes.
static DELIVERY_LOG_RETENTION_MIN: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 60);
/// How long a stopping dispatcher waits for requests in flight before releasing them.
static SHUTDOWN_GRACE_MS: GucSetting<i32> = GucSetting::<i32>::new(2_000);
/// Whether the dispatcher's own bookkeeping (claims, delivery records) waits for the WAL flush.
static DISPATCHER_SYNCHRONOUS_COMMIT: GucSetting<bool> = GucSetting::<bool>::new(true);
/// How long the cleanup horizon may stand still before claims switch to windows.
static CLAIM_WINDOW_AFTER_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);

pub fn init() {
    GucRegistry::define_int_guc(
        c"queue_ext.max_payload_bytes",
        c"Largest job payload enqueue accepts, in bytes of stored jsonb.",
        c"Enqueueing a larger payload fails with SQLSTATE 54000 and nothing is stored.",
        &MAX_PAYLOAD_BYTES,
        1,
        i32::MAX,
        // A limit that protects the server: a producer must not lift it for its own session.
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_string_guc(
        c"queue_ext.database",
        c"Databases whose webhook queues are delivered, comma-separated; empty: all.",
        c"Empty (the default): every database where queue_ext is installed gets a dispatcher \
          (one background worker each, plus one launcher). Needs queue_ext in \
          shared_preload_libraries.",
        &DATABASES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"queue_ext.max_in_flight",
        c"Most webhook deliveries one dispatcher holds at once, in flight or waiting for a request slot.",
        c"Each webhook queue also sends at most its own webhook_max_in_flight requests at once.",
        &MAX_IN_FLIGHT,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"queue_ext.http_timeout",
        c"Webhook request timeout for queues that set no webhook_timeout.",
        c"",
        &HTTP_TIMEOUT_MS,
        1,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"queue_ext.poll_interval",
        c"How long the dispatcher sleeps when no commit wakes it.",
        c"Commits of webhook jobs wake it at once; the poll only catches delayed and retried jobs.",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"queue_ext.http_allowlist",
        c"Hosts and CIDRs webhooks may reach although they are loopback, private or link-local.",
        c"Comma-separated, e.g. '127.0.0.1/32, hooks.internal'. Everything else private is refused.",
        &HTTP_ALLOWLIST,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"queue_ext.http_ca_file",
        c"PEM file of extra root certificates trusted for https webhooks.",
        c"",
        &HTTP_CA_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"queue_ext.response_max_bytes",
        c"How much of a webhook response body is stored.",
        c"",
        &RESPONSE_MAX_BYTES,
        0,
        16 * 1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"queue_ext.delivery_log_retention",
        c"How long rows of queue_ext.webhook_deliveries are kept.",
        c"",
        &DELIVERY_LOG_RETENTION_MIN,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MIN,
    );
    GucRegistry::define_int_guc(
        c"queue_ext.shutdown_grace",
        c"How long a stopping dispatcher waits for requests in flight.",
        c"Requests still unanswered then are released back to their queue.",
        &SHUTDOWN_GRACE_MS,
        0,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"queue_ext.dispatcher_synchronous_commit",
        c"Whether the dispatcher's claims and delivery records wait for the WAL flush.",
        c"off takes a flush off every turn of the dispatcher's loop (lower latency, more \
          deliveries per second). A crash can then forget the last moments of its bookkeeping: \
          those jobs are delivered again (same webhook-id); none is lost. Jobs themselves are \
          enqueued by your sessions, under their own synchronous_commit.",
        &DISPATCHER_SYNCHRONOUS_COMMIT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"queue_ext.claim_window_after",
        c"How long the xmin horizon may stand still before claims start from a floor.",
        c"While an old snapshot (an idle transaction, a long query, a replication slot) keeps \
          vacuum from removing the claim index's entries of claimed jobs, every claim would \
          visit all of them. Once the horizon has not moved for this long, or while the \
          table has more than 10,000 dead rows, a claim starts from a floor found every 2 \
          seconds instead; a job made runnable below the floor (run_at in the past, a \
          dependent released, a claim rolled back) can then wait up to 2 seconds longer. 0 \
          turns it off.",
        &CLAIM_WINDOW_AFTER_MS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    // SAFETY: called once from _PG_init, after our GUCs are defined.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"queue_ext".as_ptr()) };
}

/// The current `queue_ext.max_payload_bytes` in bytes, for the SQL that checks payloads
/// (`current_setting` would give it with a unit, like "1MB").
#[pg_extern(stable, parallel_safe)]
pub fn max_payload_bytes() -> i32 {
    MAX_PAYLOAD_BYTES.get()
}

/// How long the horizon stands still before claims use windows (claim_window.rs); None: never.
pub fn claim_window_after() -> Option<Duration> {
    match CLAIM_WINDOW_AFTER_MS.get() {
        0 => None,
        ms => Some(Duration::from_millis(ms as u64)),
    }
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn millis(setting: &GucSetting<i32>) -> Duration {
    Duration::from_millis(setting.get().max(0) as u64)
}

pub fn databases() -> Vec<String> {
    string(&DATABASES)
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

pub fn max_in_flight() -> usize {
    MAX_IN_FLIGHT.get().max(1) as usize
}

pub fn http_timeout() -> Duration {
    millis(&HTTP_TIMEOUT_MS)
}

pub fn poll_interval() -> Duration {
    millis(&POLL_INTERVAL_MS)
}

pub fn http_allowlist() -> String {
    string(&HTTP_ALLOWLIST)
}

pub fn http_ca_file() -> Option<String> {
    Some(string(&HTTP_CA_FILE)).filter(|s| !s.is_empty())
}

pub fn response_max_bytes() -> usize {
    RESPONSE_MAX_BYTES.get().max(0) as usize
}

pub fn delivery_log_retention() -> Duration {
    Duration::from_secs(DELIVERY_LOG_RETENTION_MIN.get().max(1) as u64 * 60)
}

pub fn dispatcher_synchronous_commit() -> bool {
    DISPATCHER_SYNCHRONOUS_COMMIT.get()
}

pub fn shutdown_grace() -> Duration {
    millis(&SHUTDOWN_GRACE_MS)
}
