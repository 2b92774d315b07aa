//! `CALL queue_ext.wait_for_jobs(queues, timeout)`: an idle SQL worker waits inside its own
//! connection until a commit makes jobs of its queues runnable, then claims.
//!
//! Against LISTEN on `queue_ext_jobs`, the wake-up skips two hops (the dispatcher's
//! announcement transaction and the notification's delivery to the client), and it needs no
//! LISTEN connection, which a connection pooler in transaction mode cannot keep. The waiter is
//! registered in shared memory with its queues' announcement buckets; the commit callback
//! that hands announcements to the dispatcher sets the latch of every waiter whose buckets
//! it touches (wakeup.rs).
//!
//! While waiting the backend holds no snapshot and no transaction id: the procedure commits
//! the CALL's transaction first (which is why it must be CALLed outside a transaction block),
//! so an idle worker never holds back vacuum's horizon. Each check for runnable jobs is a
//! short transaction of its own.

use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::wakeup::{self, AnnounceBits};

/// Longest wait one call may ask for.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A waiter's entry in shared memory; freed when dropped, however the call ends (a
/// timeout, a cancel, an ERROR unwinding through here).
struct Registration(Option<usize>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            wakeup::unregister_waiter(i);
        }
    }
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_queue_ext_wait_for_jobs() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The C entry point of the procedure (sql/events.sql). Arguments: queue_names text[]
/// (NULL: every queue), timeout interval, INOUT woken boolean. Returns woken: true when a
/// commit woke it or runnable jobs were already there (claim now; a wake-up may be for
/// another queue sharing a bucket, costing one empty claim), false when the timeout passed.
///
/// # Safety
/// Called by the function manager with a valid `fcinfo` for the declared signature.
#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn queue_ext_wait_for_jobs(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fcinfo comes from the function manager; context is a node or null.
    let non_atomic = unsafe {
        let context = (*fcinfo).context;
        !context.is_null()
            && (*context).type_ == pg_sys::NodeTag::T_CallContext
            && !(*(context as *mut pg_sys::CallContext)).atomic
    };
    if !non_atomic {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "wait_for_jobs must be CALLed outside a transaction block",
            "It commits before it waits, so that an idle worker holds no snapshot."
        );
    }
    // SAFETY: argument 0 is text[] per the declaration (NULL allowed).
    let queues: Option<Vec<Option<String>>> =
        unsafe { pgrx::fcinfo::pg_getarg::<Vec<Option<String>>>(fcinfo, 0) };
    // SAFETY: argument 1 is an interval (NULL allowed).
    let timeout = unsafe { interval_arg(fcinfo, 1) };
    let timeout = match timeout {
        Some(t) if t >= 0 && t as u128 <= MAX_WAIT.as_micros() => Duration::from_micros(t as u64),
        _ => {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "timeout must be between 0 and 1 hour"
            );
        }
    };
    let queues: Option<Vec<String>> = queues.map(|q| q.into_iter().flatten().collect());
    let woken = wait(queues, timeout);
    // SAFETY: fcinfo is this call's; the result row is formed in the caller's memory context.
    unsafe { result_row(fcinfo, woken) }
}

/// A procedure with output parameters returns them as one composite row.
///
/// # Safety
/// `fcinfo` must be the current call of a procedure whose only output is a boolean.
unsafe fn result_row(fcinfo: pg_sys::FunctionCallInfo, woken: bool) -> pg_sys::Datum {
    // SAFETY: per the caller; get_call_result_type fills tupdesc for a composite result.
    unsafe {
        let mut tupdesc: pg_sys::TupleDesc = std::ptr::null_mut();
        if pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut tupdesc)
            != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE
        {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "wait_for_jobs must be declared with one INOUT boolean"
            );
        }
        let tupdesc = pg_sys::BlessTupleDesc(tupdesc);
        let mut values = [pg_sys::Datum::from(woken)];
        let mut nulls = [false];
        let tuple = pg_sys::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::Datum::from((*tuple).t_data)
    }
}

/// Reads an interval argument as microseconds (a month counts 30 days), or None for NULL.
///
/// # Safety
/// `num` must be an interval argument of `fcinfo`.
unsafe fn interval_arg(fcinfo: pg_sys::FunctionCallInfo, num: usize) -> Option<i64> {
    // SAFETY: the caller guarantees the argument's type.
    unsafe {
        if pgrx::fcinfo::pg_arg_is_null(fcinfo, num) {
            return None;
        }
        let datum = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, num);
        let iv = datum.cast_mut_ptr::<pg_sys::Interval>();
        let days = i64::from((*iv).day) + 30 * i64::from((*iv).month);
        Some(
            (*iv)
                .time
                .saturating_add(days.saturating_mul(86_400_000_000)),
        )
    }
}

/// The wait itself, in a non-atomic SPI connection: commit (dropping the CALL's snapshot),
/// register, then check for runnable jobs and sleep until woken, a poll tick or the timeout.
fn wait(queues: Option<Vec<String>>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let bits: AnnounceBits = match &queues {
        None => [u64::MAX; wakeup::ANNOUNCE_WORDS],
        Some(names) => {
            let mut bits = [0u64; wakeup::ANNOUNCE_WORDS];
            for name in names {
                let (word, mask) = wakeup::announce_bucket(name);
                bits[word] |= mask;
            }
            bits
        }
    };
    // SAFETY: SPI in a non-atomic context (checked by the caller), finished below on every
    // path that returns; an ERROR unwinds past it and Postgres cleans SPI up at abort.
    unsafe {
        if pg_sys::SPI_connect_ext(pg_sys::SPI_OPT_NONATOMIC as i32)
            != pg_sys::SPI_OK_CONNECT as i32
        {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "wait_for_jobs could not connect to SPI"
            );
        }
        pg_sys::SPI_commit();
    }
    // Registered before the first check: a commit after it sets our latch, one before it is
    // visible to the check.
    // SAFETY: reading this backend's identifiers.
    let registration = Registration(wakeup::register_waiter(
        unsafe { pg_sys::MyDatabaseId },
        unsafe { wakeup::my_procno() },
        &bits,
    ));
    // Without a free waiter entry, poll more often instead of sleeping until woken.
    let poll = if registration.0.is_some() {
        crate::gucs::poll_interval().max(Duration::from_millis(10))
    } else {
        Duration::from_millis(50)
    };
    let mut tick = false;
    let woken = loop {
        if runnable(queues.as_deref(), tick) {
            break true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        let nap = left.min(poll);
        // SAFETY: waiting on our own latch from the backend's main thread.
        let events = unsafe {
            let events = pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                nap.as_millis().max(1) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            events
        };
        pg_sys::check_for_interrupts!();
        if events & pg_sys::WL_LATCH_SET as i32 != 0
            && registration.0.is_some_and(wakeup::take_waiter_wake)
        {
            break true;
        }
        tick = events & pg_sys::WL_TIMEOUT as i32 != 0;
    };
    drop(registration);
    // SAFETY: still inside the non-atomic SPI connection opened above, which this closes.
    unsafe {
        // The transaction the last check began predates the wake-up: end it, so that a
        // caller's claim in the same procedure has a now() no earlier than the commit that
        // woke it (a new job's run_at is its producer's now(), and a claim takes run_at <= now()).
        pg_sys::SPI_commit();
        pg_sys::SPI_finish();
    }
    woken
}

/// Whether any of `queues` (for None: every queue `get_next_jobs(NULL, ...)` claims from) has
/// a job a claim could take now, in a transaction of its own that is committed at once (it
/// holds no snapshot afterwards). Jobs held by a rate limit count only when `limited`: their
/// next token comes with no commit to announce it, so they end a wait at a poll tick, not
/// at once (a wait that returned at once for them would spin until the token came).
fn runnable(queues: Option<&[String]>, limited: bool) -> bool {
    let query = "SELECT EXISTS (SELECT 1 FROM queue_ext.job_queue AS j \
                 JOIN queue_ext.queues AS q ON q.queue_name OPERATOR(pg_catalog.=) j.queue_name \
                 WHERE j.status OPERATOR(pg_catalog.=) ANY ('{queued,retrying}'::queue_ext.job_state[]) \
                   AND j.run_at OPERATOR(pg_catalog.<=) pg_catalog.now() AND NOT q.paused \
                   AND ($2 OR j.rate_limit_key IS NULL) \
                   AND CASE WHEN $1 IS NULL \
                            THEN NOT q.is_webhook AND NOT pg_catalog.starts_with(q.queue_name, 'queue_ext.') \
                            ELSE j.queue_name OPERATOR(pg_catalog.=) ANY ($1) END)";
    let names: Option<Vec<String>> = queues.map(|q| q.to_vec());
    // SAFETY: a snapshot for this one statement (the commit in `wait` left none active),
    // popped before the commit that ends its transaction; still inside `wait`'s non-atomic
    // SPI connection.
    unsafe {
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let found = Spi::get_one_with_args::<bool>(query, &[names.into(), limited.into()]);
        pg_sys::PopActiveSnapshot();
        pg_sys::SPI_commit();
        match found {
            Ok(found) => found.unwrap_or(false),
            Err(e) => {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    format!("wait_for_jobs could not look for runnable jobs: {e}")
                );
            }
        }
    }
}
