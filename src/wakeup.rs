//! Shared memory the dispatchers and every backend see: one slot per dispatcher (who it is,
//! how it is doing), and the commit-time wake-up.
//!
//! A transaction that enqueues webhook work only raises a backend-local flag. When it
//! commits, our transaction callback sets the latch of its database's dispatcher, so the
//! dispatcher wakes the instant the jobs become visible. A rollback clears the flag: nothing
//! wakes, nothing is sent. The callback does no more than that, because an error there
//! would take the backend down.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};

pub const MAX_DISPATCHERS: usize = 16;

/// One dispatcher's public state. `pid == 0` means the slot is free.
#[derive(Default)]
pub struct Slot {
    pub pid: AtomicI32,
    pub db_oid: AtomicU32,
    pub procno: AtomicI32,
    pub started_at_ms: AtomicI64,
    pub heartbeat_ms: AtomicI64,
    pub in_flight: AtomicU32,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
}

#[derive(Default)]
pub struct Dispatchers {
    pub slots: [Slot; MAX_DISPATCHERS],
}

// SAFETY: only atomics inside; no pointers into one process's memory.
unsafe impl PGRXSharedMemory for Dispatchers {}

static DISPATCHERS: PgAtomic<Dispatchers> = unsafe { PgAtomic::new(c"queue_ext_dispatchers") };

/// True in the postmaster and its children when we were preloaded and own shared memory.
static SHMEM_READY: AtomicBool = AtomicBool::new(false);
/// This backend's transaction enqueued webhook work: wake the dispatcher at commit.
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while preloading.
pub fn init_shmem() {
    pg_shmem_init!(DISPATCHERS);
    SHMEM_READY.store(true, Ordering::Relaxed);
}

/// Called from `_PG_init` in every process that loads the library.
pub fn init_callbacks() {
    // SAFETY: registering a plain C callback with no argument; it lives as long as the library.
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

pub fn slots() -> Option<&'static [Slot; MAX_DISPATCHERS]> {
    SHMEM_READY
        .load(Ordering::Relaxed)
        .then(|| &DISPATCHERS.get().slots)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
            if WAKE_AT_COMMIT.swap(false, Ordering::Relaxed) =>
        {
            // SAFETY: reading this backend's database id.
            wake_dispatchers(unsafe { pg_sys::MyDatabaseId });
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => WAKE_AT_COMMIT.store(false, Ordering::Relaxed),
        _ => {}
    }
}

/// Sets the latch of every live dispatcher serving `db`.
pub fn wake_dispatchers(db: pg_sys::Oid) {
    let Some(slots) = slots() else { return };
    for slot in slots {
        if slot.pid.load(Ordering::Acquire) != 0
            && slot.db_oid.load(Ordering::Relaxed) == db.to_u32()
        {
            let procno = slot.procno.load(Ordering::Relaxed);
            // SAFETY: procno came from a live PGPROC of ProcGlobal->allProcs, whose latches
            // live in shared memory. If the dispatcher just exited, the latch belongs to some
            // other process, and a spurious SetLatch is harmless by design.
            unsafe {
                let proc = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
                pg_sys::SetLatch(&mut (*proc).procLatch);
            }
        }
    }
}

/// Asks for the dispatcher to be woken when the current transaction commits.
#[pg_extern(volatile, parallel_unsafe)]
fn _wake_dispatcher_at_commit() {
    if SHMEM_READY.load(Ordering::Relaxed) {
        WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
    }
}

/// The dispatchers' own view of themselves, one row per configured database (none when
/// queue_ext is not preloaded).
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
pub fn dispatcher_status() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(pid, Option<i32>),
        name!(running, bool),
        name!(started_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(last_heartbeat, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(in_flight, i64),
        name!(delivered, i64),
        name!(retried, i64),
        name!(failed, i64),
    ),
> {
    let stale_after = (crate::gucs::poll_interval().as_millis() as i64 * 3).max(5_000);
    // Without preloading there are no dispatchers (and queue_ext.database is not defined).
    let configured = if slots().is_some() {
        crate::gucs::databases()
    } else {
        Vec::new()
    };
    let rows: Vec<_> = configured
        .into_iter()
        .enumerate()
        .take(MAX_DISPATCHERS)
        .map(|(i, database)| {
            let slot = slots().map(|s| &s[i]);
            let pid = slot
                .map(|s| s.pid.load(Ordering::Acquire))
                .filter(|p| *p != 0);
            let load_ms = |f: fn(&Slot) -> i64| slot.map(f).filter(|ms| *ms > 0);
            let started = load_ms(|s| s.started_at_ms.load(Ordering::Relaxed));
            let beat = load_ms(|s| s.heartbeat_ms.load(Ordering::Relaxed));
            let running = pid.is_some() && beat.is_some_and(|b| now_ms() - b < stale_after);
            let count = |f: fn(&Slot) -> u64| slot.map(f).unwrap_or(0) as i64;
            (
                database,
                pid,
                running,
                started.and_then(to_timestamp),
                beat.and_then(to_timestamp),
                slot.map(|s| s.in_flight.load(Ordering::Relaxed) as i64)
                    .unwrap_or(0),
                count(|s| s.delivered.load(Ordering::Relaxed)),
                count(|s| s.retried.load(Ordering::Relaxed)),
                count(|s| s.failed.load(Ordering::Relaxed)),
            )
        })
        .collect();
    TableIterator::new(rows)
}

fn to_timestamp(ms: i64) -> Option<pgrx::datum::TimestampWithTimeZone> {
    Some(pgrx::datum::to_timestamp(ms as f64 / 1000.0))
}
