//! Claiming past the index entries of jobs already claimed.
//!
//! A claim walks the claim index from the oldest runnable entry. The entries of jobs already
//! claimed stay in that index until vacuum removes them. While a snapshot older than them is
//! open (an idle-in-transaction session, a long query, a replication slot's xmin) nothing
//! can remove them, nor mark them dead for index scans to skip: every claim visits the heap
//! row of every job processed since that snapshot was taken, and the queue slows down in
//! proportion to the work it has done. When the horizon moves they are marked dead and
//! skipped, but still read: between two vacuums a busy queue's claims each step over the
//! entries of every job claimed since the last one (a webhook burst of 40,000 spent a fifth
//! of the dispatcher's SQL time there).
//!
//! So once this database's horizon has stood still for `queue_ext.claim_window_after` while
//! transactions went on past it, or the table has more than MANY_DEAD_ROWS dead rows, a
//! backend claims from a window: per queue and priority it keeps a floor in claim order
//! (run_at, id), the older of the oldest waiting job and the probe's time less a margin,
//! found once every PROBE_EVERY by a probe that does walk the index, and it claims only jobs
//! at or above the floor. A job that becomes runnable below its floor (run_at set in the
//! past, a producer transaction longer than the margin, a dependent released, a claim rolled
//! back) is found by the next probe: it may wait up to PROBE_EVERY longer. The windows end
//! when the horizon moves and vacuum has brought the dead rows under MANY_DEAD_ROWS. The
//! state is this backend's own: nothing is shared, and a wrong floor can delay a job, never
//! hand it out twice (the claim still locks each row).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::gucs;

/// How often a windowed claimer walks the whole queue to find its floors again.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How often a backend looks at the horizon (it takes the ProcArray lock).
const HORIZON_EVERY: Duration = Duration::from_millis(250);
/// Dead rows of job_queue above which claims use windows, held horizon or not: a claim from
/// the start steps over an index entry per dead row of a claimed job.
const MANY_DEAD_ROWS: i64 = 10_000;

/// A queue's floors: one (run_at, id) per priority, highest first (critical ... low).
struct Window {
    run_ats: Vec<Option<TimestampWithTimeZone>>,
    ids: Vec<Option<pgrx::Uuid>>,
    probed_at: Instant,
}

#[derive(Default)]
struct State {
    horizon_checked_at: Option<Instant>,
    /// The horizon last seen, and since when it has been that.
    horizon: Option<(u32, Instant)>,
    /// Whether claims use windows now.
    windowed: bool,
    windows: HashMap<String, Window>,
}

impl State {
    fn look_at_horizon(&mut self, now: Instant) {
        self.horizon_checked_at = Some(now);
        let Some(((relid, oldest, next), after)) =
            gucs::claim_window_after().and_then(|after| Some((horizon()?, after)))
        else {
            self.horizon = None;
            self.windowed = false;
            self.windows.clear();
            return;
        };
        let since = match self.horizon {
            Some((seen, since)) if seen == oldest => since,
            _ => now,
        };
        self.horizon = Some((oldest, since));
        let stuck = oldest != next && now.duration_since(since) >= after;
        self.windowed = stuck || dead_rows(relid) > MANY_DEAD_ROWS;
        if !self.windowed {
            self.windows.clear();
        }
    }
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// How a claim on `queue_name` starts: NULL, from the oldest job (the horizon is free);
/// an empty array, probe for the floors first (`_claim_window_set` stores them); else the
/// floors' run_at, one per priority from critical to low (`_claim_window_ids`: their ids).
#[pg_extern(volatile, parallel_unsafe)]
fn _claim_window(queue_name: &str) -> Option<Vec<Option<TimestampWithTimeZone>>> {
    STATE.with_borrow_mut(|state| {
        let now = Instant::now();
        if state
            .horizon_checked_at
            .is_none_or(|at| now.duration_since(at) >= HORIZON_EVERY)
        {
            state.look_at_horizon(now);
        }
        if !state.windowed {
            return None;
        }
        match state.windows.get(queue_name) {
            Some(w) if now.duration_since(w.probed_at) < PROBE_EVERY => Some(w.run_ats.clone()),
            _ => Some(Vec::new()),
        }
    })
}

/// The ids of the floors `_claim_window` returned the run_at of.
#[pg_extern(volatile, parallel_unsafe)]
fn _claim_window_ids(queue_name: &str) -> Option<Vec<Option<pgrx::Uuid>>> {
    STATE.with_borrow(|state| state.windows.get(queue_name).map(|w| w.ids.clone()))
}

/// Stores the floors a probe found for `queue_name` (see `_claim_window`).
#[pg_extern(volatile, parallel_unsafe)]
fn _claim_window_set(
    queue_name: &str,
    run_ats: Vec<Option<TimestampWithTimeZone>>,
    ids: Vec<Option<pgrx::Uuid>>,
) {
    STATE.with_borrow_mut(|state| {
        if state.windowed {
            let window = Window {
                run_ats,
                ids,
                probed_at: Instant::now(),
            };
            state.windows.insert(queue_name.to_owned(), window);
        }
    })
}

/// job_queue's oid, this database's cleanup horizon for it (the oldest transaction whose
/// dead rows must be kept) and the next transaction id; None when the table is not there.
fn horizon() -> Option<(pg_sys::Oid, u32, u32)> {
    // SAFETY: catalogue lookups and ProcArray reads inside a transaction (a SQL function
    // call); the relation is opened with the lock every claim takes anyway and closed
    // before returning, keeping the lock to the end of the transaction as usual.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"queue_ext".as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return None;
        }
        let relid = pg_sys::get_relname_relid(c"job_queue".as_ptr(), nsp);
        if relid == pg_sys::InvalidOid {
            return None;
        }
        let rel = pg_sys::relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let oldest = pg_sys::GetOldestNonRemovableTransactionId(rel);
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        // The 32-bit id inside the 64-bit one (XidFromFullTransactionId).
        let next = pg_sys::ReadNextFullTransactionId().value as u32;
        Some((relid, u32::from(oldest), next))
    }
}

/// The dead rows of the table, as the statistics count them (vacuum resets the count).
fn dead_rows(relid: pg_sys::Oid) -> i64 {
    Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.pg_stat_get_dead_tuples($1)",
        &[relid.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(0)
}
