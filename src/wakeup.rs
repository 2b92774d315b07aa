//! Shared memory that the launcher, the dispatchers and every backend see: the launcher's
//! identity, one slot per dispatcher (which database, who runs it, how it is doing), and the
//! commit-time wake-ups.
//!
//! A transaction that enqueues webhook work only raises a backend-local flag. When it
//! commits, our transaction callback sets the latch of its database's dispatcher, so the
//! dispatcher wakes the instant the jobs become visible. A transaction that makes jobs of
//! any queue runnable also marks the queue's bucket in a backend-local bitmap; at commit
//! the bitmap is OR-ed into the dispatcher's slot, and the dispatcher publishes one
//! `NOTIFY queue_ext_jobs, '<queue>'` per marked queue for SQL workers, after the fact and
//! off the producers' commits (NOTIFY serialises every committing transaction that sends
//! one on a database-wide lock). CREATE EXTENSION raises another flag
//! that wakes the launcher at commit, so a new install is served at once. A rollback clears
//! both: nothing wakes, nothing is sent. The callback does no more than that, because an
//! error there would take the backend down.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};

/// Databases served at once (one dispatcher each). More are reported as `no_slot`.
pub const MAX_DISPATCHERS: usize = 32;

/// Announcement buckets: 256 bits per database. Two queues sharing a bucket are announced
/// together, which costs their workers one empty claim, never a missed job.
pub const ANNOUNCE_WORDS: usize = 4;
pub type AnnounceBits = [u64; ANNOUNCE_WORDS];

/// Which bit stands for a queue (FNV-1a of its name): the backend that marks it and the
/// dispatcher that reads it agree without sharing anything else.
pub fn announce_bucket(queue_name: &str) -> (usize, u64) {
    let bit = (fnv1a(queue_name.bytes()) % (ANNOUNCE_WORDS as u64 * 64)) as usize;
    (bit / 64, 1u64 << (bit % 64))
}

/// 64-bit FNV-1a: the hash every process computes alike for keys in shared memory.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h: u64, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub fn is_announced(bits: &AnnounceBits, queue_name: &str) -> bool {
    let (word, mask) = announce_bucket(queue_name);
    bits[word] & mask != 0
}

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
    /// A commit made webhook work: the dispatcher claims on its next turn. (An announcement
    /// alone wakes it too, but only to publish: a claim costs far more than a NOTIFY.)
    pub deliver_pending: AtomicBool,
    /// Queues with newly runnable jobs to announce, by bucket (`announce_bucket`).
    pub announce: [AtomicU64; ANNOUNCE_WORDS],
    /// Commits that paused or dropped a queue or asked for a running job's cancellation: the
    /// dispatcher holds back the jobs it holds unsent (waiting for a request slot) until it
    /// has looked at them again (lanes.rs, `Gate`).
    pub recheck_requested: AtomicU64,
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

/// Backends waiting in `wait_for_jobs` at once (waiting.rs). More poll instead.
pub const MAX_WAITERS: usize = 256;

/// A backend in `wait_for_jobs`: which database and queue buckets it waits for. `pid` 0 is a
/// free entry; `woken` is set by the commit that sets its latch.
#[derive(Default)]
pub struct Waiter {
    pub pid: AtomicI32,
    pub procno: AtomicI32,
    pub db_oid: AtomicU32,
    pub buckets: [AtomicU64; ANNOUNCE_WORDS],
    pub woken: AtomicBool,
}

pub struct Shared {
    pub launcher_pid: AtomicI32,
    pub launcher_procno: AtomicI32,
    /// Set by a committed CREATE EXTENSION: look at every database again now.
    pub rescan: AtomicBool,
    pub slots: [Slot; MAX_DISPATCHERS],
    pub waiters: [Waiter; MAX_WAITERS],
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            launcher_pid: AtomicI32::new(0),
            launcher_procno: AtomicI32::new(0),
            rescan: AtomicBool::new(false),
            slots: Default::default(),
            waiters: std::array::from_fn(|_| Waiter::default()),
        }
    }
}

// SAFETY: only atomics inside; no pointers into one process's memory.
unsafe impl PGRXSharedMemory for Shared {}

static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"queue_ext_shared_v5") };

/// True in the postmaster and its children when we were preloaded and own shared memory.
static SHMEM_READY: AtomicBool = AtomicBool::new(false);
/// This backend's transaction enqueued webhook work: wake the dispatcher at commit.
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
/// This backend's transaction paused or dropped a queue, changed its webhook settings or asked
/// for a running job's cancellation: have the dispatcher recheck what it holds unsent at commit.
static RECHECK_AT_COMMIT: AtomicBool = AtomicBool::new(false);
/// This backend's transaction installed queue_ext: wake the launcher at commit.
static WAKE_LAUNCHER_AT_COMMIT: AtomicBool = AtomicBool::new(false);
/// Queues this backend's transaction made runnable, by bucket: announced at commit.
static ANNOUNCE_AT_COMMIT: [AtomicU64; ANNOUNCE_WORDS] =
    [const { AtomicU64::new(0) }; ANNOUNCE_WORDS];

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
            let announce = take_local_announcements();
            let deliver = WAKE_AT_COMMIT.swap(false, Ordering::Relaxed);
            let recheck = RECHECK_AT_COMMIT.swap(false, Ordering::Relaxed);
            if deliver || recheck || announce.iter().any(|w| *w != 0) {
                // SAFETY: reading this backend's database id.
                let db = unsafe { pg_sys::MyDatabaseId };
                // Waiters first: a backend in wait_for_jobs claims as soon as it runs, while the
                // dispatcher only relays the news (a NOTIFY); on a busy machine the first
                // woken is the first to run.
                wake_waiters(db, &announce);
                post_to_dispatchers(db, deliver, recheck, &announce);
            }
            if WAKE_LAUNCHER_AT_COMMIT.swap(false, Ordering::Relaxed) {
                wake_launcher();
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
            RECHECK_AT_COMMIT.store(false, Ordering::Relaxed);
            WAKE_LAUNCHER_AT_COMMIT.store(false, Ordering::Relaxed);
            take_local_announcements();
        }
        _ => {}
    }
}

/// This process's PGPROC number, the index `set_latch_of` takes. PostgreSQL 17 removed
/// `PGPROC.pgprocno` in favour of the `MyProcNumber` global.
///
/// # Safety
/// Call on a backend's main thread after it has its PGPROC (`MyProc` is set).
pub unsafe fn my_procno() -> i32 {
    // SAFETY: the caller guarantees MyProc points at this process's PGPROC.
    #[cfg(not(feature = "pg18"))]
    let procno = unsafe { (*pg_sys::MyProc).pgprocno };
    // SAFETY: MyProcNumber is set before MyProc and never changes afterwards.
    #[cfg(feature = "pg18")]
    let procno = unsafe { pg_sys::MyProcNumber };
    procno
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

fn take_local_announcements() -> AnnounceBits {
    std::array::from_fn(|i| ANNOUNCE_AT_COMMIT[i].swap(0, Ordering::Relaxed))
}

/// Tells every live dispatcher serving `db` what a commit made (webhook work to deliver, jobs
/// held unsent to recheck, queues to announce) and wakes it.
fn post_to_dispatchers(db: pg_sys::Oid, deliver: bool, recheck: bool, bits: &AnnounceBits) {
    let Some(slots) = slots() else { return };
    for slot in slots {
        if slot.pid.load(Ordering::Acquire) != 0
            && slot.db_oid.load(Ordering::Relaxed) == db.to_u32()
        {
            // Wake the dispatcher only with news: when what this commit reports was already
            // pending, whoever made it pending woke the dispatcher, which has not taken it yet
            // (it takes before it acts). Under a stream of commits that spares it a wake-up
            // per commit.
            let mut news = deliver && !slot.deliver_pending.swap(true, Ordering::AcqRel);
            if recheck {
                slot.recheck_requested.fetch_add(1, Ordering::AcqRel);
                news = true;
            }
            for (word, b) in slot.announce.iter().zip(bits) {
                if *b != 0 && word.fetch_or(*b, Ordering::AcqRel) & *b != *b {
                    news = true;
                }
            }
            if news {
                set_latch_of(slot.procno.load(Ordering::Relaxed));
            }
        }
    }
}

/// Sets the latch of every backend waiting in `wait_for_jobs` on `db` for a bucket in `bits`.
fn wake_waiters(db: pg_sys::Oid, bits: &AnnounceBits) {
    let Some(shared) = shared() else { return };
    for w in &shared.waiters {
        if w.pid.load(Ordering::SeqCst) != 0
            && w.db_oid.load(Ordering::Relaxed) == db.to_u32()
            && w.buckets
                .iter()
                .zip(bits)
                .any(|(mine, b)| mine.load(Ordering::Relaxed) & b != 0)
        {
            w.woken.store(true, Ordering::SeqCst);
            set_latch_of(w.procno.load(Ordering::Relaxed));
        }
    }
}

/// Takes a free waiter entry for this backend. Counted as free too: one whose process is gone
/// (a FATAL exit skips the unregistering) and one of this backend's own (a backend waits once
/// at a time, so an entry of its own is left over). None when every entry is taken.
pub fn register_waiter(db: pg_sys::Oid, procno: i32, buckets: &AnnounceBits) -> Option<usize> {
    let shared = shared()?;
    // SAFETY: reading this process's pid.
    let me = unsafe { pg_sys::MyProcPid };
    for (i, w) in shared.waiters.iter().enumerate() {
        let pid = w.pid.load(Ordering::SeqCst);
        // SAFETY: signal 0 only checks that the process exists.
        let free = pid == 0 || pid == me || unsafe { libc::kill(pid, 0) } != 0;
        if free
            && w.pid
                .compare_exchange(pid, me, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            w.procno.store(procno, Ordering::Relaxed);
            w.db_oid.store(db.to_u32(), Ordering::Relaxed);
            w.woken.store(false, Ordering::SeqCst);
            for (word, b) in w.buckets.iter().zip(buckets) {
                word.store(*b, Ordering::SeqCst);
            }
            return Some(i);
        }
    }
    None
}

/// Whether a commit woke waiter `i` since the last call (and clears it).
pub fn take_waiter_wake(i: usize) -> bool {
    shared().is_some_and(|s| s.waiters[i].woken.swap(false, Ordering::SeqCst))
}

pub fn unregister_waiter(i: usize) {
    let Some(shared) = shared() else { return };
    let w = &shared.waiters[i];
    for word in &w.buckets {
        word.store(0, Ordering::Relaxed);
    }
    // SAFETY: reading this process's pid.
    let me = unsafe { pg_sys::MyProcPid };
    let _ = w
        .pid
        .compare_exchange(me, 0, Ordering::SeqCst, Ordering::SeqCst);
}

/// True when a dispatcher is attached to `db` to publish announcements.
fn dispatcher_attached(db: pg_sys::Oid) -> bool {
    slots().is_some_and(|slots| {
        slots.iter().any(|slot| {
            slot.pid.load(Ordering::Acquire) != 0
                && slot.db_oid.load(Ordering::Relaxed) == db.to_u32()
                && slot.state() == SlotState::Running
        })
    })
}

pub fn has_announcements(slot: &Slot) -> bool {
    slot.announce.iter().any(|w| w.load(Ordering::Acquire) != 0)
}

/// Takes (and clears) what `slot`'s dispatcher has to announce.
pub fn take_announcements(slot: &Slot) -> AnnounceBits {
    std::array::from_fn(|i| slot.announce[i].swap(0, Ordering::AcqRel))
}

/// Marks every bucket, so that a dispatcher that starts announces every queue once: what was
/// enqueued while none ran is not left waiting for a poll.
pub fn announce_everything(slot: &Slot) {
    for word in &slot.announce {
        word.store(u64::MAX, Ordering::Release);
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

/// Asks this database's dispatcher, once the current transaction commits, to look again at
/// the jobs it holds unsent (claimed ahead, waiting for a request slot) before it starts
/// another of their requests: pause_queue, drop_queue, cancel_job and a change of a queue's
/// webhook settings call it, so that such a job goes back to its queue, is let go or is
/// cancelled instead of being sent (or sent with settings no longer the queue's).
#[pg_extern(volatile, parallel_unsafe)]
fn _recheck_unsent_at_commit() {
    if SHMEM_READY.load(Ordering::Relaxed) {
        RECHECK_AT_COMMIT.store(true, Ordering::Relaxed);
    }
}

/// Asks for `queue_name` to be announced on `queue_ext_jobs` once the current transaction
/// commits, by this database's dispatcher. False when no dispatcher runs here (not
/// preloaded, or not started yet): the caller then sends the NOTIFY itself.
#[pg_extern(volatile, parallel_unsafe)]
fn _announce_at_commit(queue_name: &str) -> bool {
    if !SHMEM_READY.load(Ordering::Relaxed) {
        return false;
    }
    // Marked whether or not a dispatcher runs: backends in wait_for_jobs are woken by the
    // commit itself.
    let (word, mask) = announce_bucket(queue_name);
    ANNOUNCE_AT_COMMIT[word].fetch_or(mask, Ordering::Relaxed);
    // SAFETY: reading this backend's database id.
    dispatcher_attached(unsafe { pg_sys::MyDatabaseId })
}

/// Asks for the launcher to look at every database when the current transaction commits.
/// The install and upgrade scripts call it, so a new install is served within moments.
#[pg_extern(volatile, parallel_unsafe)]
fn _wake_launcher_at_commit() {
    if SHMEM_READY.load(Ordering::Relaxed) {
        WAKE_LAUNCHER_AT_COMMIT.store(true, Ordering::Relaxed);
    }
}
