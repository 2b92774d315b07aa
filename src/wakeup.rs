//! Shared memory that the launcher, the dispatchers and every backend see: the launcher's
//! identity, one slot per dispatcher (which database, who runs it, how it is doing), and the
//! commit-time wake-ups.
//!
//! A transaction that enqueues webhook work only raises a backend-local flag. When it
//! commits, our transaction callback sets the latch of its database's dispatcher, so the
//! dispatcher wakes the instant the jobs become visible. CREATE EXTENSION raises another flag
//! that wakes the launcher at commit, so a new install is served at once. A rollback clears
//! both: nothing wakes, nothing is sent. The callback does no more than that, because an
//! error there would take the backend down.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};

/// Databases served at once (one dispatcher each). More are reported as `no_slot`.
pub const MAX_DISPATCHERS: usize = 32;

/// What a slot's dispatcher is doing, as the launcher and the dispatcher record it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum SlotState {
    /// Unused.
    Free = 0,
    /// The launcher asked the postmaster for a process; it has not reported in yet.
    Starting = 1,
    /// Delivering.
    Running = 2,
    /// The database has no queue_ext: the process exited; the launcher looks again later
    /// (at once when CREATE EXTENSION commits anywhere).
    NoExtension = 3,
    /// The process ended (terminated, failed or crashed); the launcher restarts it after a
    /// short, growing delay.
    Restarting = 4,
    /// The postmaster had no background worker slot free (max_worker_processes).
    NoWorkerSlot = 5,
}

impl SlotState {
    pub fn from_u32(v: u32) -> SlotState {
        match v {
            1 => SlotState::Starting,
            2 => SlotState::Running,
            3 => SlotState::NoExtension,
            4 => SlotState::Restarting,
            5 => SlotState::NoWorkerSlot,
            _ => SlotState::Free,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SlotState::Free => "free",
            SlotState::Starting => "starting",
            SlotState::Running => "running",
            SlotState::NoExtension => "no_extension",
            SlotState::Restarting => "restarting",
            SlotState::NoWorkerSlot => "no_worker_slot",
        }
    }
}

/// One database's dispatcher. The launcher owns `db_oid` and `state` transitions into
/// Starting/Restarting/NoWorkerSlot; the dispatcher writes its pid and its counters.
#[derive(Default)]
pub struct Slot {
    pub db_oid: AtomicU32,
    pub state: AtomicU32,
    /// 0 when no dispatcher process is attached.
    pub pid: AtomicI32,
    pub procno: AtomicI32,
    pub started_at_ms: AtomicI64,
    pub heartbeat_ms: AtomicI64,
    /// How many times the launcher has (re)started this database's dispatcher.
    pub starts: AtomicU32,
    /// Until when the launcher must not start a dispatcher here (a command needs the
    /// database to itself: ddl.rs), in ms since the epoch.
    pub hold_until_ms: AtomicI64,
    /// The dispatcher is to exit at once, releasing what it holds without a grace period.
    pub leave_now: AtomicBool,
    /// The last dispatcher here ended because it was told to (SIGTERM), not by failing: it
    /// comes back after the first delay, however often that happens.
    pub terminated: AtomicBool,
    pub in_flight: AtomicU32,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
}

impl Slot {
    pub fn state(&self) -> SlotState {
        SlotState::from_u32(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, state: SlotState) {
        self.state.store(state as u32, Ordering::Release);
    }
}

#[derive(Default)]
pub struct Shared {
    pub launcher_pid: AtomicI32,
    pub launcher_procno: AtomicI32,
    /// Set by a committed CREATE EXTENSION: look at every database again now.
    pub rescan: AtomicBool,
    pub slots: [Slot; MAX_DISPATCHERS],
}

// SAFETY: only atomics inside; no pointers into one process's memory.
unsafe impl PGRXSharedMemory for Shared {}

static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"queue_ext_shared_v2") };

/// True in the postmaster and its children when we were preloaded and own shared memory.
static SHMEM_READY: AtomicBool = AtomicBool::new(false);
/// This backend's transaction enqueued webhook work: wake the dispatcher at commit.
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
/// This backend's transaction installed queue_ext: wake the launcher at commit.
static WAKE_LAUNCHER_AT_COMMIT: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while preloading.
pub fn init_shmem() {
    pg_shmem_init!(SHARED);
    SHMEM_READY.store(true, Ordering::Relaxed);
}

/// Called from `_PG_init` in every process that loads the library.
pub fn init_callbacks() {
    // SAFETY: registering a plain C callback with no argument; it lives as long as the library.
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

pub fn shared() -> Option<&'static Shared> {
    SHMEM_READY.load(Ordering::Relaxed).then(|| SHARED.get())
}

pub fn slots() -> Option<&'static [Slot; MAX_DISPATCHERS]> {
    shared().map(|s| &s.slots)
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
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            if WAKE_AT_COMMIT.swap(false, Ordering::Relaxed) {
                // SAFETY: reading this backend's database id.
                wake_dispatchers(unsafe { pg_sys::MyDatabaseId });
            }
            if WAKE_LAUNCHER_AT_COMMIT.swap(false, Ordering::Relaxed) {
                wake_launcher();
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
            WAKE_LAUNCHER_AT_COMMIT.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Sets the latch of the process whose PGPROC number is `procno`.
fn set_latch_of(procno: i32) {
    if procno < 0 {
        return;
    }
    // SAFETY: procno came from a live PGPROC of ProcGlobal->allProcs, whose latches live in
    // shared memory. If that process just exited, the latch belongs to some other process,
    // and a spurious SetLatch is harmless by design.
    unsafe {
        let proc = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
        pg_sys::SetLatch(&mut (*proc).procLatch);
    }
}

/// Sets the latch of every live dispatcher serving `db`.
pub fn wake_dispatchers(db: pg_sys::Oid) {
    let Some(slots) = slots() else { return };
    for slot in slots {
        if slot.pid.load(Ordering::Acquire) != 0
            && slot.db_oid.load(Ordering::Relaxed) == db.to_u32()
        {
            set_latch_of(slot.procno.load(Ordering::Relaxed));
        }
    }
}

/// Asks the launcher to look at every database again now.
pub fn wake_launcher() {
    let Some(shared) = shared() else { return };
    shared.rescan.store(true, Ordering::Release);
    if shared.launcher_pid.load(Ordering::Acquire) != 0 {
        set_latch_of(shared.launcher_procno.load(Ordering::Relaxed));
    }
}

/// Asks for the dispatcher to be woken when the current transaction commits.
#[pg_extern(volatile, parallel_unsafe)]
fn _wake_dispatcher_at_commit() {
    if SHMEM_READY.load(Ordering::Relaxed) {
        WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
    }
}

/// Asks for the launcher to look at every database when the current transaction commits.
/// The install and upgrade scripts call it, so a new install is served within moments.
#[pg_extern(volatile, parallel_unsafe)]
fn _wake_launcher_at_commit() {
    if SHMEM_READY.load(Ordering::Relaxed) {
        WAKE_LAUNCHER_AT_COMMIT.store(true, Ordering::Relaxed);
    }
}
