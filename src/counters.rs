//! Job counters for Prometheus: completed, failed (attempts) and dead, per database and
//! queue, since the server started. Prometheus expects exactly that of a `_total` counter: it
//! only ever grows, and a restart shows as a reset, which `rate()` handles.
//!
//! The SQL that makes a transition adds to a backend-local tally (`_count_at_commit`); the
//! tally reaches shared memory only when the transaction commits, so a rollback, or a
//! subtransaction rolled back to a savepoint, counts nothing. The shared table is lock-free:
//! each entry is keyed by a hash of the database and the queue name, claimed by
//! compare-and-swap, and its counters are atomics, so the commit callback never waits.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};

/// Queues counted per cluster. Beyond that, a queue's counts go to the `(other)` entry of its
/// database, so nothing is lost, only its label.
const ENTRIES: usize = 1024;
/// Label of the overflow entry: not a valid queue name, so it cannot collide with one.
pub const OTHER: &str = "(other)";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Completed = 0,
    Failed = 1,
    Dead = 2,
}

impl Kind {
    fn parse(kind: &str) -> Option<Kind> {
        match kind {
            "completed" => Some(Kind::Completed),
            "failed" => Some(Kind::Failed),
            "dead" => Some(Kind::Dead),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Entry {
    /// 0: free. Otherwise `key(db, queue)`.
    key: AtomicU64,
    counts: [AtomicU64; 3],
}

pub struct Counters {
    entries: [Entry; ENTRIES],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            entries: std::array::from_fn(|_| Entry::default()),
        }
    }
}

// SAFETY: only atomics inside; no pointers into one process's memory.
unsafe impl PGRXSharedMemory for Counters {}

static COUNTERS: PgAtomic<Counters> = unsafe { PgAtomic::new(c"queue_ext_counters_v1") };
static SHMEM_READY: AtomicBool = AtomicBool::new(false);

/// (subtransaction, key, kind, n) added by the current transaction, not yet committed.
type Tally = Vec<(pg_sys::SubTransactionId, u64, Kind, u64)>;

thread_local! {
    static PENDING: RefCell<Tally> = const { RefCell::new(Vec::new()) };
}

/// Called from `_PG_init` while preloading.
pub fn init_shmem() {
    pg_shmem_init!(COUNTERS);
    SHMEM_READY.store(true, Ordering::Relaxed);
}

/// Called from `_PG_init` in every process that loads the library.
pub fn init_callbacks() {
    // SAFETY: registering plain C callbacks with no argument; they live as long as the library.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

/// FNV-1a over the database id and the queue name; never 0 (0 marks a free entry).
fn key(db: u32, queue: &str) -> u64 {
    crate::wakeup::fnv1a(db.to_le_bytes().into_iter().chain(queue.bytes())).max(1)
}

/// The entry for `key`, claimed if `claim` and it has none yet; None when the table is full
/// (or, without `claim`, when the key was never counted).
fn entry(table: &Counters, key: u64, claim: bool) -> Option<&Entry> {
    let start = (key % ENTRIES as u64) as usize;
    for i in 0..ENTRIES {
        let e = &table.entries[(start + i) % ENTRIES];
        match e.key.load(Ordering::Acquire) {
            k if k == key => return Some(e),
            0 if !claim => return None,
            0 => match e
                .key
                .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(e),
                Err(k) if k == key => return Some(e),
                Err(_) => continue,
            },
            _ => continue,
        }
    }
    None
}

fn publish(tally: Tally) {
    if !SHMEM_READY.load(Ordering::Relaxed) {
        return;
    }
    let table = COUNTERS.get();
    // SAFETY: reading this backend's database id.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    for (_, k, kind, n) in tally {
        if let Some(e) = entry(table, k, true).or_else(|| entry(table, key(db, OTHER), true)) {
            e.counts[kind as usize].fetch_add(n, Ordering::Relaxed);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            let tally = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
            if !tally.is_empty() {
                publish(tally);
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => PENDING.with(|p| p.borrow_mut().clear()),
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        // What a committed subtransaction counted now belongs to its parent, and goes if the
        // parent is rolled back.
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => PENDING.with(|p| {
            for t in p.borrow_mut().iter_mut().filter(|t| t.0 == my_subid) {
                t.0 = parent_subid;
            }
        }),
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
            PENDING.with(|p| p.borrow_mut().retain(|t| t.0 != my_subid))
        }
        _ => {}
    }
}

/// Adds n to queue_name's `kind` counter ('completed', 'failed' or 'dead') when the current
/// transaction commits. Without shared memory (not preloaded) it counts nothing.
#[pg_extern(volatile, parallel_unsafe)]
fn _count_at_commit(queue_name: &str, kind: &str, n: i64) {
    let Some(kind) = Kind::parse(kind) else {
        pgrx::error!("unknown counter kind \"{kind}\" (completed, failed or dead)");
    };
    if !SHMEM_READY.load(Ordering::Relaxed) || n <= 0 {
        return;
    }
    // SAFETY: reading this backend's database id and current subtransaction.
    let (db, subid) = unsafe {
        (
            pg_sys::MyDatabaseId.to_u32(),
            pg_sys::GetCurrentSubTransactionId(),
        )
    };
    let k = key(db, queue_name);
    PENDING.with(|p| p.borrow_mut().push((subid, k, kind, n as u64)));
}

/// Counts since the server started for each of `queue_names` in this database, plus the
/// `(other)` entry when queues overflowed the table. No rows without shared memory.
#[pg_extern(stable, parallel_safe)]
fn _job_counters(
    queue_names: Vec<Option<String>>,
) -> TableIterator<
    'static,
    (
        name!(queue_name, String),
        name!(completed, i64),
        name!(failed, i64),
        name!(dead, i64),
    ),
> {
    let mut rows = Vec::new();
    if SHMEM_READY.load(Ordering::Relaxed) {
        let table = COUNTERS.get();
        // SAFETY: reading this backend's database id.
        let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
        let names = queue_names.into_iter().flatten();
        for name in names.chain(std::iter::once(OTHER.to_string())) {
            let found = entry(table, key(db, &name), false);
            if found.is_none() && name == OTHER {
                continue;
            }
            let count =
                |k: Kind| found.map_or(0, |e| e.counts[k as usize].load(Ordering::Relaxed) as i64);
            rows.push((
                name,
                count(Kind::Completed),
                count(Kind::Failed),
                count(Kind::Dead),
            ));
        }
    }
    TableIterator::new(rows)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn keys_differ_by_database_and_queue_and_are_never_free() {
        assert_ne!(key(1, "a"), key(2, "a"));
        assert_ne!(key(1, "a"), key(1, "b"));
        assert_ne!(key(1, ""), 0);
    }

    #[test]
    fn a_full_table_hands_out_no_entry_and_finds_claimed_ones() {
        let table = Counters::default();
        for i in 0..ENTRIES as u64 {
            assert!(entry(&table, i + 1, true).is_some());
        }
        assert!(entry(&table, ENTRIES as u64 + 7, true).is_none());
        assert!(entry(&table, 5, false).is_some());
        assert!(entry(&table, ENTRIES as u64 + 9, false).is_none());
    }
}
