//! The launcher: one background worker, started by the postmaster when queue_ext is
//! preloaded, that keeps one dispatcher running in every database where queue_ext is
//! installed (or in those `queue_ext.database` names).
//!
//! It reads pg_database itself (a shared catalog, so it needs no database of its own: it
//! never blocks CREATE DATABASE ... TEMPLATE or DROP DATABASE), and each second, or at once
//! when CREATE EXTENSION commits anywhere, it:
//!   * starts a dispatcher for a database it has not looked at yet; a dispatcher that finds
//!     no queue_ext in its database says so and exits, and that database is looked at again
//!     every `RECHECK_MISSING`;
//!   * restarts a dispatcher that ended for any other reason (pg_terminate_backend, an error,
//!     a crash) after a short delay that grows while it keeps failing (not while it is
//!     only being terminated);
//!   * forgets databases that were dropped, and stops dispatchers of databases no longer
//!     listed in `queue_ext.database`.
//!
//! Dispatchers are dynamic workers that the postmaster never restarts itself: the launcher
//! is the one place that decides. The launcher exits non-zero on SIGTERM, so the postmaster
//! restarts it unless the server itself is shutting down.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::gucs;
use crate::wakeup::{self, Slot, SlotState, MAX_DISPATCHERS};

/// How often the launcher looks at pg_database when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);
/// How often a database without queue_ext is looked at again (CREATE EXTENSION wakes the
/// launcher at once; this catches databases copied from a template that has queue_ext).
const RECHECK_MISSING: Duration = Duration::from_secs(10);
/// Restart delays after a dispatcher ended: 1 s, doubling while it keeps ending within
/// `STABLE_AFTER` of its start, up to 30 s.
const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// A dispatcher that has not reported in this long after its start is presumed failed.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Registers the launcher. Called from `_PG_init` while preloading.
pub fn register() {
    BackgroundWorkerBuilder::new("queue_ext launcher")
        .set_type("queue_ext launcher")
        .set_library("queue_ext")
        .set_function("queue_ext_launcher_main")
        // Shared catalogs only, but reading them needs a (database-less) connection.
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn queue_ext_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: the launcher reads only shared catalogs.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let Some(shared) = wakeup::shared() else {
        return;
    };
    // SAFETY: reading this process's own identifiers.
    unsafe {
        shared
            .launcher_procno
            .store(wakeup::my_procno(), Ordering::Relaxed);
        shared
            .launcher_pid
            .store(pg_sys::MyProcPid, Ordering::Release);
    }
    log!("queue_ext launcher started");
    let mut launcher = Launcher::adopting(&shared.slots);
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file on the main thread, as a backend does.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let rescan = shared.rescan.swap(false, Ordering::AcqRel);
        launcher.tick(&shared.slots, rescan);
        // False on SIGTERM (the flag is consumed here) or when the postmaster died.
        if !BackgroundWorker::wait_latch(Some(TICK)) {
            break;
        }
    }
    shared.launcher_pid.store(0, Ordering::Release);
    log!("queue_ext launcher stopping; the postmaster restarts it unless the server is shutting down");
    // Non-zero: a terminated launcher comes back. At shutdown the postmaster restarts nothing.
    // SAFETY: ends this process the way Postgres does, running its exit callbacks.
    unsafe { pg_sys::proc_exit(1) };
}

/// What the launcher remembers about one database between ticks (process-local; shared
/// memory holds what others may read).
struct Tracked {
    slot: usize,
    handle: Option<DynamicBackgroundWorker>,
    /// When to (re)start its dispatcher, if it is not running.
    next_start: Instant,
    restart_delay: Duration,
    started: Instant,
    /// Log a start failure once per failure streak, not every tick.
    warned: bool,
    /// A CREATE EXTENSION committed since its dispatcher last started: a dispatcher that
    /// found no queue_ext may have looked just before that commit, so look again.
    recheck: bool,
}

impl Tracked {
    fn new(slot: usize, now: Instant) -> Tracked {
        Tracked {
            slot,
            handle: None,
            next_start: now,
            restart_delay: FIRST_RESTART_DELAY,
            started: now,
            warned: false,
            recheck: false,
        }
    }
}

#[derive(Default)]
struct Launcher {
    databases: HashMap<u32, Tracked>,
}

impl Launcher {
    /// Takes over the slots an earlier launcher filled (this one was restarted): their
    /// dispatchers keep running and are watched by pid.
    fn adopting(slots: &[Slot; MAX_DISPATCHERS]) -> Launcher {
        let now = Instant::now();
        let mut launcher = Launcher::default();
        for (index, slot) in slots.iter().enumerate() {
            let oid = slot.db_oid.load(Ordering::Relaxed);
            if oid != 0 {
                launcher.databases.insert(oid, Tracked::new(index, now));
            }
        }
        launcher
    }

    fn tick(&mut self, slots: &'static [Slot; MAX_DISPATCHERS], rescan: bool) {
        let wanted = match wanted_databases() {
            Ok(w) => w,
            Err(e) => {
                pgrx::warning!("queue_ext launcher: cannot read pg_database: {e}");
                return;
            }
        };
        // Databases dropped, or no longer named in queue_ext.database.
        let gone: Vec<u32> = self
            .databases
            .keys()
            .filter(|oid| !wanted.contains(oid))
            .copied()
            .collect();
        for oid in gone {
            if let Some(t) = self.databases.remove(&oid) {
                let slot = &slots[t.slot];
                // It releases what it holds and exits.
                if let Some(handle) = t.handle {
                    let _ = handle.terminate();
                } else {
                    let pid = slot.pid.load(Ordering::Acquire);
                    if pid != 0 {
                        // SAFETY: a plain signal to our own dispatcher process.
                        unsafe { libc::kill(pid, libc::SIGTERM) };
                    }
                }
                slot.db_oid.store(0, Ordering::Relaxed);
                slot.set_state(SlotState::Free);
            }
        }
        let now = Instant::now();
        if rescan {
            self.databases.values_mut().for_each(|t| t.recheck = true);
        }
        for oid in wanted {
            if let std::collections::hash_map::Entry::Vacant(entry) = self.databases.entry(oid) {
                let Some(index) = free_slot(slots) else {
                    continue; // reported by dispatcher_status() as databases without a slot
                };
                slots[index].db_oid.store(oid, Ordering::Relaxed);
                // Free until started below, in this same tick; a hold was for the database
                // that had the slot before.
                slots[index].set_state(SlotState::Free);
                slots[index].hold_until_ms.store(0, Ordering::Release);
                entry.insert(Tracked::new(index, now));
            }
            let t = self.databases.get_mut(&oid).expect("inserted above");
            let slot = &slots[t.slot];
            if is_alive(t, slot) {
                continue;
            }
            t.handle = None;
            let due = match slot.state() {
                // No queue_ext there when last looked: look again now and then, or at once
                // when a CREATE EXTENSION committed.
                SlotState::NoExtension => {
                    rescan || t.recheck || t.started.elapsed() >= RECHECK_MISSING
                }
                // It ended (or never reported in): come back after a delay that grows while
                // it keeps failing soon after starting.
                SlotState::Running | SlotState::Starting => {
                    if slot.terminated.swap(false, Ordering::AcqRel)
                        || t.started.elapsed() >= STABLE_AFTER
                    {
                        t.restart_delay = FIRST_RESTART_DELAY;
                    }
                    t.next_start = now + t.restart_delay;
                    t.restart_delay = (t.restart_delay * 2).min(MAX_RESTART_DELAY);
                    slot.set_state(SlotState::Restarting);
                    false
                }
                SlotState::Restarting | SlotState::NoWorkerSlot | SlotState::Free => {
                    t.next_start <= now
                }
            };
            if !due || slot.hold_until_ms.load(Ordering::Acquire) > wakeup::now_ms() {
                continue;
            }
            self.start(oid, slots);
        }
    }

    fn start(&mut self, oid: u32, slots: &'static [Slot; MAX_DISPATCHERS]) {
        let t = self.databases.get_mut(&oid).expect("tracked");
        let slot = &slots[t.slot];
        t.recheck = false;
        slot.pid.store(0, Ordering::Release);
        slot.leave_now.store(false, Ordering::Release);
        slot.terminated.store(false, Ordering::Release);
        // SAFETY: reading this process's pid, to be told when the worker starts or stops.
        let me = unsafe { pg_sys::MyProcPid };
        let registered = BackgroundWorkerBuilder::new(&format!("queue_ext dispatcher (oid {oid})"))
            .set_type("queue_ext dispatcher")
            .set_library("queue_ext")
            .set_function("queue_ext_dispatcher_main")
            .set_argument((t.slot as i32).into_datum())
            .set_extra(&oid.to_string())
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            // The launcher restarts it; the postmaster must not as well.
            .set_restart_time(None)
            .set_notify_pid(me)
            .load_dynamic();
        t.started = Instant::now();
        match registered {
            Ok(handle) => {
                t.handle = Some(handle);
                t.warned = false;
                slot.starts.fetch_add(1, Ordering::Relaxed);
                slot.set_state(SlotState::Starting);
            }
            Err(_) => {
                slot.set_state(SlotState::NoWorkerSlot);
                t.next_start = Instant::now() + Duration::from_secs(5);
                if !t.warned {
                    t.warned = true;
                    pgrx::warning!(
                        "queue_ext launcher: no background worker slot for the dispatcher of database oid {oid}; raise max_worker_processes (one per database with queue_ext, plus one for the launcher)"
                    );
                }
            }
        }
    }
}

/// True while the database's dispatcher process exists (starting or running).
fn is_alive(t: &Tracked, slot: &Slot) -> bool {
    if let Some(handle) = &t.handle {
        use pgrx::bgworkers::BackgroundWorkerStatus::*;
        return match handle.pid() {
            Ok(_) => true,
            Err(NotYetStarted) => t.started.elapsed() < START_TIMEOUT,
            Err(_) => false,
        };
    }
    // Adopted from an earlier launcher (no handle): trust the pid it published.
    let pid = slot.pid.load(Ordering::Acquire);
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn free_slot(slots: &[Slot; MAX_DISPATCHERS]) -> Option<usize> {
    slots
        .iter()
        .position(|s| s.db_oid.load(Ordering::Relaxed) == 0)
}

/// Databases that should have a dispatcher: every one that accepts connections (or those
/// named in queue_ext.database), by oid.
fn wanted_databases() -> Result<Vec<u32>, String> {
    let names = gucs::databases();
    let all = list_databases()?;
    Ok(all
        .into_iter()
        .filter(|(_, name)| names.is_empty() || names.iter().any(|n| n == name))
        .map(|(oid, _)| oid)
        .collect())
}

/// Reads pg_database with a catalog scan, as the autovacuum launcher does.
fn list_databases() -> Result<Vec<(u32, String)>, String> {
    let mut found = Vec::new();
    // SAFETY: a short read-only transaction over a shared catalog in this process's main
    // thread; every tuple is copied out before the scan ends.
    let scanned = unsafe {
        PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            pg_sys::SetCurrentStatementStartTimestamp();
            pg_sys::StartTransactionCommand();
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as _);
            let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let form = &*(pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_database);
                // datconnlimit -2 marks a database whose DROP was interrupted.
                if form.datallowconn && !form.datistemplate && form.datconnlimit != -2 {
                    let name = std::ffi::CStr::from_ptr(form.datname.data.as_ptr())
                        .to_string_lossy()
                        .into_owned();
                    found.push((form.oid.to_u32(), name));
                }
            }
            pg_sys::table_endscan(scan);
            pg_sys::table_close(rel, pg_sys::AccessShareLock as _);
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
            Ok(())
        }))
        .catch_others(|e| {
            pg_sys::AbortCurrentTransaction();
            Err(match e {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r)
                | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                    r.message().to_string()
                }
            })
        })
        .execute()
    };
    scanned.map(|()| found)
}
