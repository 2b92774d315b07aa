//! What the launcher and the dispatchers say about themselves, for SQL: one row per
//! database they serve or tried to serve, read from shared memory.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;

use crate::wakeup::{self, Slot, SlotState};

type Timestamp = pgrx::datum::TimestampWithTimeZone;

struct Row {
    database: String,
    pid: Option<i32>,
    running: bool,
    state: &'static str,
    detail: String,
    started_at: Option<Timestamp>,
    last_heartbeat: Option<Timestamp>,
    in_flight: i64,
    delivered: i64,
    retried: i64,
    failed: i64,
}

/// The database's name, or None once it is gone.
fn database_name(oid: u32) -> Option<String> {
    // SAFETY: a syscache lookup of pg_database (a shared catalog) in a backend; the result is
    // palloc'd in the current memory context or NULL.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::Oid::from(oid));
        (!name.is_null()).then(|| {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        })
    }
}

fn to_timestamp(ms: i64) -> Option<Timestamp> {
    (ms > 0).then(|| pgrx::datum::to_timestamp(ms as f64 / 1000.0))
}

fn row(slot: &Slot, database: String) -> Row {
    let stale_after = (crate::gucs::poll_interval().as_millis() as i64 * 3).max(5_000);
    let pid = Some(slot.pid.load(Ordering::Acquire)).filter(|p| *p != 0);
    let state = slot.state();
    let beat = slot.heartbeat_ms.load(Ordering::Relaxed);
    let running =
        state == SlotState::Running && pid.is_some() && wakeup::now_ms() - beat < stale_after;
    let detail = match state {
        SlotState::Running if running => "delivering".to_string(),
        SlotState::Running => format!(
            "no heartbeat for {} s",
            (wakeup::now_ms() - beat).max(0) / 1000
        ),
        SlotState::Starting => "starting".to_string(),
        SlotState::Restarting => format!(
            "ended; the launcher restarts it (started {} times)",
            slot.starts.load(Ordering::Relaxed)
        ),
        SlotState::NoWorkerSlot => format!(
            "no background worker slot: raise max_worker_processes (now {}); each database with queue_ext needs one, plus one for the launcher",
            // SAFETY: reading a plain int setting of this backend.
            unsafe { pg_sys::max_worker_processes }
        ),
        SlotState::NoExtension => "queue_ext is not installed in this database".to_string(),
        SlotState::Free => "free".to_string(),
    };
    let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as i64;
    Row {
        database,
        pid,
        running,
        state: state.name(),
        detail,
        started_at: to_timestamp(slot.started_at_ms.load(Ordering::Relaxed)),
        last_heartbeat: to_timestamp(beat),
        in_flight: slot.in_flight.load(Ordering::Relaxed) as i64,
        delivered: count(&slot.delivered),
        retried: count(&slot.retried),
        failed: count(&slot.failed),
    }
}

/// Every database the launcher serves or tried to (databases without queue_ext left out),
/// plus a row for this database when it has no dispatcher at all, saying why.
fn rows() -> Vec<Row> {
    // SAFETY: reading this backend's database id.
    let here = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let Some(shared) = wakeup::shared() else {
        return vec![Row::missing(
            here,
            "not_preloaded",
            "queue_ext is not in shared_preload_libraries: no dispatcher runs; call queue_ext.process_jobs() (e.g. from pg_cron)".into(),
        )];
    };
    let mut rows = Vec::new();
    let mut served_here = false;
    for slot in &shared.slots {
        let oid = slot.db_oid.load(Ordering::Relaxed);
        if oid == 0 || slot.state() == SlotState::NoExtension {
            continue;
        }
        let Some(name) = database_name(oid) else {
            continue;
        };
        served_here |= oid == here;
        rows.push(row(slot, name));
    }
    // Databases queue_ext.database names that do not exist: said here, not in the log.
    for name in crate::gucs::databases() {
        let Ok(cname) = std::ffi::CString::new(name.as_str()) else {
            continue;
        };
        // SAFETY: a catalog lookup by name; missing_ok, so an unknown name gives InvalidOid.
        if unsafe { pg_sys::get_database_oid(cname.as_ptr(), true) } == pg_sys::InvalidOid {
            let mut missing = Row::missing(
                0,
                "no_database",
                "queue_ext.database names it, but no such database exists".into(),
            );
            missing.database = name;
            rows.push(missing);
        }
    }
    if !served_here {
        let names = crate::gucs::databases();
        let (state, detail) = if shared.launcher_pid.load(Ordering::Acquire) == 0 {
            ("no_launcher", "the queue_ext launcher is not running (it restarts within seconds unless the server is shutting down)".to_string())
        } else if !names.is_empty() && !database_name(here).is_some_and(|n| names.contains(&n)) {
            (
                "not_listed",
                format!(
                    "this database is not in queue_ext.database ({})",
                    names.join(", ")
                ),
            )
        } else if shared
            .slots
            .iter()
            .all(|s| s.db_oid.load(Ordering::Relaxed) != 0)
        {
            (
                "no_slot",
                format!(
                    "queue_ext serves at most {} databases at once",
                    shared.slots.len()
                ),
            )
        } else {
            (
                "starting",
                "the launcher starts this database's dispatcher within seconds".to_string(),
            )
        };
        rows.push(Row::missing(here, state, detail));
    }
    rows.sort_by(|a, b| a.database.cmp(&b.database));
    rows
}

impl Row {
    fn missing(oid: u32, state: &'static str, detail: String) -> Row {
        Row {
            database: database_name(oid).unwrap_or_default(),
            pid: None,
            running: false,
            state,
            detail,
            started_at: None,
            last_heartbeat: None,
            in_flight: 0,
            delivered: 0,
            retried: 0,
            failed: 0,
        }
    }
}

/// The dispatchers' own view of themselves: one row per database served, and one for the
/// calling database when it has no dispatcher, whose `state`/`detail` say why.
#[pg_extern(name = "dispatcher_status", volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
pub fn dispatcher_states() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(pid, Option<i32>),
        name!(running, bool),
        name!(started_at, Option<Timestamp>),
        name!(last_heartbeat, Option<Timestamp>),
        name!(in_flight, i64),
        name!(delivered, i64),
        name!(retried, i64),
        name!(failed, i64),
        name!(state, String),
        name!(detail, String),
    ),
> {
    TableIterator::new(rows().into_iter().map(|r| {
        (
            r.database,
            r.pid,
            r.running,
            r.started_at,
            r.last_heartbeat,
            r.in_flight,
            r.delivered,
            r.retried,
            r.failed,
            r.state.to_string(),
            r.detail,
        )
    }))
}

/// The 0.3.0 shape of dispatcher_status(), kept under its old C symbol so that a database
/// still at 0.3.0 (between installing this library and ALTER EXTENSION UPDATE) keeps working.
#[pg_extern(sql = false)]
#[allow(clippy::type_complexity)]
pub fn dispatcher_status() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(pid, Option<i32>),
        name!(running, bool),
        name!(started_at, Option<Timestamp>),
        name!(last_heartbeat, Option<Timestamp>),
        name!(in_flight, i64),
        name!(delivered, i64),
        name!(retried, i64),
        name!(failed, i64),
    ),
> {
    TableIterator::new(rows().into_iter().map(|r| {
        (
            r.database,
            r.pid,
            r.running,
            r.started_at,
            r.last_heartbeat,
            r.in_flight,
            r.delivered,
            r.retried,
            r.failed,
        )
    }))
}
