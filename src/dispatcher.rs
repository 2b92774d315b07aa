//! The background dispatcher: one worker per database with queue_ext, started (and
//! restarted) by the launcher, delivering webhook jobs the moment they commit.
//!
//! Its loop: wake (commit latch, a finished request, or the poll backstop) → record finished
//! requests and claim as many due jobs as there is room for, in one short transaction →
//! hand them to the HTTP runtime → sleep. Requests run on a tokio thread that never touches
//! Postgres; they report through a channel and an eventfd that the wait watches, so a slow
//! endpoint only occupies its own slots and nothing waits for a batch.
//!
//! Nothing is lost and nothing stops it: a claim is a lease in a logged table, and every
//! statement runs isolated (`db::isolated`), so an SQL error is recorded on the job concerned
//! and the loop goes on. If the process dies anyway, the launcher starts another, which puts
//! the jobs this one held back in their queues before claiming anything; they are delivered
//! again with the same webhook-id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::{PgBuiltInOids, PgOid};

use crate::db::{self, DbError};
use crate::delivery::{self, Claimed, Unstorable};
use crate::gucs;
use crate::http::{self, Delivery, HttpClient, Outcome};
use crate::lanes::{self, Gate, Lanes};
use crate::wakeup::{self, Slot, SlotState, MAX_DISPATCHERS};

/// Every dispatcher claims under this worker id; there is one per database.
const WORKER_ID: &str = "queue_ext-dispatcher";
/// How often expired leases are swept and the extension's presence checked.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// At most one announcement transaction per this long: under a stream of commits they
/// coalesce (each costs a commit record), while the first after a quiet spell goes at once.
const ANNOUNCE_GAP: Duration = Duration::from_millis(5);
/// How often the delivery log is trimmed to `queue_ext.delivery_log_retention`.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// While the delivery log holds more expired rows than one batch removes, the next batch
/// follows this soon: a busy queue adds far more than a batch a minute, and each batch delays
/// the turn it runs in.
const PURGE_AGAIN: Duration = Duration::from_millis(100);
/// How long an outcome the database would not take is tried again, a transaction per turn,
/// before its job is failed with the reason (delivery.rs, `Unstorable`).
const RECORD_RETRY_FOR: Duration = Duration::from_secs(30);
/// The dispatcher's `deadlock_timeout`. In a lock cycle with a schema change (an
/// `ALTER EXTENSION UPDATE`, an operator's DDL) the waiter whose timeout ends first is the one
/// cancelled: the dispatcher's transactions are retried on its next turn, the operator's
/// statement is not, so the dispatcher checks first and gives way.
const DEADLOCK_TIMEOUT: &str = "10ms";
/// A queue whose requests take less than this on average (its endpoint's answers, or its
/// failures) is claimed ahead of its free request slots (lanes.rs): up to twice its
/// webhook_max_in_flight, the second half waiting in the dispatcher for a slot. Its jobs
/// then wait about one such request; a slow or failing endpoint's queue is claimed only into
/// free slots, so that its jobs wait in the queue, not in the dispatcher under a lease.
const AHEAD_BELOW: f64 = 200.0;
/// The weight of each new request's duration in a queue's running average.
const AVERAGE_WEIGHT: f64 = 0.2;
/// A queue's average is forgotten once it has had no request for this long: it starts again
/// without claims ahead, until its requests say how fast its endpoint answers now.
const AVERAGE_FOR: Duration = Duration::from_secs(10);
/// While deliveries wait for a request slot they are rechecked at least this often, even
/// with no commit asking for it.
const RECHECK_EVERY: Duration = Duration::from_secs(1);
/// How long the lanes stay held while a requested recheck keeps failing.
const RECHECK_HOLD: Duration = Duration::from_secs(5);
/// A recurring warning is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn queue_ext_dispatcher_main(arg: pg_sys::Datum) {
    // SAFETY: the argument is the int4 slot index the launcher set.
    let index = unsafe { i32::from_datum(arg, false) }
        .unwrap_or(0)
        .clamp(0, MAX_DISPATCHERS as i32 - 1) as usize;
    let oid: u32 = BackgroundWorker::get_extra().parse().unwrap_or(0);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(oid)), None);
    let slot = wakeup::slots().map(|s| &s[index]);
    if let Some(slot) = slot {
        // One dispatcher per database: a restarted launcher may have started this one while
        // the earlier one was still coming up.
        // SAFETY: reading this process's pid.
        let me = unsafe { pg_sys::MyProcPid };
        loop {
            let other = slot.pid.load(Ordering::Acquire);
            // SAFETY: signal 0 only checks that the process exists.
            if other != 0 && other != me && unsafe { libc::kill(other, 0) } == 0 {
                return;
            }
            if slot
                .pid
                .compare_exchange(other, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break;
            }
        }
        // SAFETY: registering a plain callback; it runs once, as this process exits.
        unsafe { pg_sys::before_shmem_exit(Some(clear_slot_pid), pg_sys::Datum::from(index)) };
    }
    if let Err(e) = db::transaction(|| {
        Spi::run_with_args(
            "SELECT pg_catalog.set_config('deadlock_timeout', $1, false)",
            &[DEADLOCK_TIMEOUT.into()],
        )
    }) {
        pgrx::warning!("queue_ext dispatcher: cannot set deadlock_timeout: {e}");
    }
    let database = db::transaction(|| Spi::get_one::<String>("SELECT current_database()::text"))
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("oid {oid}"));
    match db::extension_installed() {
        Ok(true) => {}
        Ok(false) => {
            // Not installed here: the launcher looks again later (or when it is created).
            if let Some(slot) = slot {
                slot.set_state(SlotState::NoExtension);
            }
            return;
        }
        Err(e) => {
            pgrx::warning!("queue_ext dispatcher for {database} cannot start: {e}");
            return;
        }
    }
    let mut dispatcher = match Dispatcher::new(slot) {
        Ok(d) => d,
        Err(e) => {
            // A bad setting (say, an unreadable CA file): say so; the launcher retries later.
            pgrx::warning!("queue_ext dispatcher for {database} cannot start: {e}");
            return;
        }
    };
    log!("queue_ext dispatcher started for database {database}");
    let reason = dispatcher.run();
    log!("queue_ext dispatcher for database {database} stopped: {reason}");
}

/// Clears the slot's pid when the process exits, however it exits (an ERROR included), so
/// that the launcher and dispatcher_status() see at once that it is gone.
#[pg_guard]
unsafe extern "C-unwind" fn clear_slot_pid(_code: std::ffi::c_int, arg: pg_sys::Datum) {
    let index = arg.value().min(MAX_DISPATCHERS - 1);
    if let Some(slots) = wakeup::slots() {
        // SAFETY: reading this process's pid.
        let me = unsafe { pg_sys::MyProcPid };
        // Only our own pid: the slot may belong to another process by now.
        let _ = slots[index]
            .pid
            .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Why a dispatcher could not start (it says so and exits; the launcher tries again).
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot start the HTTP runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Client(#[from] http::ClientError),
    #[error("cannot create the wake-up eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Threads of the dispatcher's HTTP runtime. One keeps a request's tasks (the delivery, its
/// connection's) on the thread that woke for them; a second thread only moved them between
/// threads, at a futex wake-up each time, and the main thread's SQL is the bound anyway.
const HTTP_THREADS: usize = 1;

/// How request tasks hand back their outcomes: over a channel, and through an eventfd that
/// the main thread's wait watches, written once per drain rather than once per request.
#[derive(Clone)]
struct Reports {
    done: Sender<Outcome>,
    /// Nonblocking; stays open for the process's life.
    eventfd: i32,
    /// Set by the first outcome since the main thread last drained the channel.
    signalled: Arc<AtomicBool>,
}

impl lanes::Report for Reports {
    fn report(&self, outcome: Outcome) {
        Reports::report(self, outcome)
    }
}

impl Reports {
    fn report(&self, outcome: Outcome) {
        // The receiver lives as long as the runtime, so send cannot fail while we run.
        let _ = self.done.send(outcome);
        if !self.signalled.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes to our own eventfd.
            unsafe { libc::write(self.eventfd, (&one as *const u64).cast(), 8) };
        }
    }
}

/// Logs each kind of recurring warning at most once per `WARN_EVERY`.
#[derive(Default)]
struct Warnings {
    last: HashMap<&'static str, Instant>,
}

impl Warnings {
    fn warn(&mut self, kind: &'static str, text: impl FnOnce() -> String) {
        let now = Instant::now();
        if self
            .last
            .get(kind)
            .is_some_and(|t| now.duration_since(*t) < WARN_EVERY)
        {
            return;
        }
        self.last.insert(kind, now);
        pgrx::warning!("queue_ext dispatcher: {}", text());
    }
}

/// The statements of an announcement, planned once per dispatcher (SPI_keepplan).
struct AnnouncePlans {
    async_commit: OwnedPreparedStatement,
    queues: OwnedPreparedStatement,
    notify: OwnedPreparedStatement,
}

impl AnnouncePlans {
    fn prepare(client: &SpiClient<'_>) -> Result<AnnouncePlans, pgrx::spi::Error> {
        Ok(AnnouncePlans {
            async_commit: client
                .prepare_mut(
                    "SELECT pg_catalog.set_config('synchronous_commit', 'off', true)",
                    &[],
                )?
                .keep(),
            queues: client
                .prepare(
                    "SELECT queue_name FROM queue_ext.queues WHERE NOT is_webhook AND NOT paused",
                    &[],
                )?
                .keep(),
            notify: client
                .prepare_mut(
                    "SELECT pg_catalog.pg_notify('queue_ext_jobs', q) FROM unnest($1::text[]) AS q",
                    &[PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID)],
                )?
                .keep(),
        })
    }
}

struct Dispatcher {
    slot: Option<&'static Slot>,
    runtime: tokio::runtime::Runtime,
    client: HttpClient,
    http_settings: http::HttpSettings,
    reports: Reports,
    done_rx: Receiver<Outcome>,
    /// Deliveries held, by job id (in flight, or waiting for a request slot), kept so a
    /// shutdown can release them.
    in_flight: HashMap<String, Delivery>,
    /// Each busy queue's request slots.
    lanes: HashMap<String, Arc<Lanes>>,
    /// Holds every lane back while a recheck of the waiting deliveries is due.
    gate: Arc<Gate>,
    /// When the waiting deliveries were last rechecked, and since when rechecking has failed.
    last_recheck: Instant,
    recheck_failing_since: Option<Instant>,
    /// Deliveries taken out of their lanes by a recheck whose return to their queues has not
    /// gone through yet, each with the reason for its history: tried again each turn, never
    /// sent.
    withdrawn: Vec<(Delivery, String)>,
    /// Finished requests whose outcome the database would not take yet, with when it first
    /// refused: tried again each turn, until RECORD_RETRY_FOR has passed.
    unrecorded: Vec<(Outcome, Instant)>,
    busy: HashMap<String, u32>,
    /// Each queue's average request duration (ms, AVERAGE_WEIGHT per request), and when its
    /// last request ended.
    request_ms: HashMap<String, (f64, Instant)>,
    recovered: bool,
    last_sweep: Instant,
    last_purge: Instant,
    /// The last trim found expired rows: trim again after PURGE_AGAIN, not PURGE_EVERY.
    purge_behind: bool,
    /// When the last claim turn began: the poll interval counts from there.
    last_claim: Instant,
    last_announce: Instant,
    announce_plans: Option<AnnouncePlans>,
    /// When the next token of a rate limit holding back a webhook job comes: sleep no longer.
    next_token_in: Option<Duration>,
    warnings: Warnings,
}

/// Returns deliveries never sent to their queues, in the current transaction, each with its
/// reason in the history (one call per reason); how many went back or were cancelled.
fn return_withdrawn(unsent: &[(Delivery, String)]) -> Result<i32, pgrx::spi::Error> {
    let mut by_reason: HashMap<&str, Vec<&Delivery>> = HashMap::new();
    for (d, why) in unsent {
        by_reason.entry(why.as_str()).or_default().push(d);
    }
    let mut returned = 0;
    for (why, deliveries) in by_reason {
        returned += delivery::return_unsent(&deliveries, why)?;
    }
    Ok(returned)
}

impl Dispatcher {
    fn new(slot: Option<&'static Slot>) -> Result<Dispatcher, StartError> {
        let runtime = http::new_runtime(HTTP_THREADS).map_err(StartError::Runtime)?;
        let http_settings = delivery::http_settings();
        let client = HttpClient::new(&http_settings)?;
        // SAFETY: plain syscall; a nonblocking eventfd that request tasks bump.
        let eventfd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if eventfd < 0 {
            return Err(StartError::EventFd(std::io::Error::last_os_error()));
        }
        let (done_tx, done_rx) = channel();
        if let Some(slot) = slot {
            // SAFETY: reading this process's own identifiers.
            unsafe {
                slot.procno.store(wakeup::my_procno(), Ordering::Relaxed);
            }
            slot.started_at_ms
                .store(wakeup::now_ms(), Ordering::Relaxed);
            slot.heartbeat_ms.store(wakeup::now_ms(), Ordering::Relaxed);
            // SAFETY: as above.
            slot.pid
                .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
            slot.set_state(SlotState::Running);
            wakeup::announce_everything(slot);
        }
        let stale = Instant::now() - PURGE_EVERY;
        Ok(Dispatcher {
            slot,
            runtime,
            client,
            http_settings,
            reports: Reports {
                done: done_tx,
                eventfd,
                signalled: Arc::new(AtomicBool::new(false)),
            },
            done_rx,
            in_flight: HashMap::new(),
            lanes: HashMap::new(),
            gate: Gate::new(slot.map(|slot| &slot.recheck_requested)),
            last_recheck: Instant::now(),
            recheck_failing_since: None,
            withdrawn: Vec::new(),
            unrecorded: Vec::new(),
            busy: HashMap::new(),
            request_ms: HashMap::new(),
            recovered: false,
            last_sweep: stale,
            last_purge: stale,
            purge_behind: false,
            last_claim: Instant::now(),
            last_announce: stale,
            announce_plans: None,
            next_token_in: None,
            warnings: Warnings::default(),
        })
    }

    /// The loop; returns why it ended.
    fn run(&mut self) -> &'static str {
        let mut claim_due = true;
        loop {
            // Both flags reset when read: read each once per turn.
            if BackgroundWorker::sighup_received() {
                // SAFETY: reloading the configuration file on the main thread, as a backend does.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                self.reload_http();
            }
            if BackgroundWorker::sigterm_received() {
                self.shut_down();
                if let Some(slot) = self.slot {
                    slot.terminated.store(true, Ordering::Release);
                }
                return "terminated";
            }
            if !self.recovered {
                self.recover();
            }
            self.announce();
            self.withdraw_unsent();
            let more_work = claim_due && {
                self.last_claim = Instant::now();
                self.record_and_claim()
            };
            if !self.maintain() {
                // DROP EXTENSION: nothing left to deliver or record here.
                if let Some(slot) = self.slot {
                    slot.set_state(SlotState::NoExtension);
                }
                return "queue_ext was dropped from the database";
            }
            if let Some(slot) = self.slot {
                slot.heartbeat_ms.store(wakeup::now_ms(), Ordering::Relaxed);
                slot.in_flight
                    .store(self.in_flight.len() as u32, Ordering::Relaxed);
            }
            claim_due = more_work || self.wait_for_work();
        }
    }

    /// Sleeps until something needs doing; true when that includes claiming or recording:
    /// webhook work committed, a request finished, the poll interval or a rate limit's next
    /// token came. A wake-up that only has queues to announce (or the delivery log's next
    /// batch to trim) returns false, so a busy producer on a SQL worker's queue costs the
    /// dispatcher a NOTIFY, not a claim.
    fn wait_for_work(&mut self) -> bool {
        let mut next = gucs::poll_interval().min(SWEEP_EVERY);
        if let Some(t) = self.next_token_in {
            next = next.min(t.max(Duration::from_millis(1)));
        }
        let due_at = self.last_claim + next;
        let mut timeout = due_at.saturating_duration_since(Instant::now());
        if timeout.is_zero() {
            return true;
        }
        if self.slot.is_some_and(wakeup::has_announcements) {
            let announce_at = self.last_announce + ANNOUNCE_GAP;
            timeout = timeout.min(announce_at.saturating_duration_since(Instant::now()));
        }
        if self.purge_behind {
            let purge_at = self.last_purge + PURGE_AGAIN;
            timeout = timeout.min(purge_at.saturating_duration_since(Instant::now()));
        }
        let woke = self.wait(timeout);
        let delivery = self
            .slot
            .is_none_or(|slot| slot.deliver_pending.swap(false, Ordering::AcqRel));
        delivery || woke & pg_sys::WL_SOCKET_READABLE as i32 != 0 || Instant::now() >= due_at
    }

    /// Rebuilds the HTTP client when its settings changed. Requests in flight finish on the
    /// old one; a bad new setting keeps the old client and says why.
    fn reload_http(&mut self) {
        let settings = delivery::http_settings();
        if settings == self.http_settings {
            return;
        }
        match HttpClient::new(&settings) {
            Ok(client) => {
                self.client = client;
                self.http_settings = settings;
                log!("queue_ext dispatcher: HTTP settings reloaded");
            }
            Err(e) => {
                pgrx::warning!("queue_ext dispatcher: keeping the previous HTTP settings: {e}")
            }
        }
    }

    /// Puts back in their queues the deliveries an earlier dispatcher of this database held
    /// when it died (the attempt counts: the request may have reached the endpoint).
    fn recover(&mut self) {
        let recovered = db::transaction(|| {
            Spi::get_one_with_args::<i32>(
                "SELECT queue_ext._return_running($1, 'dispatcher restarted during delivery')",
                &[WORKER_ID.into()],
            )
        });
        match recovered {
            Ok(Some(n)) if n > 0 => {
                log!("queue_ext dispatcher: {n} deliveries interrupted by a restart were re-queued")
            }
            Ok(_) => {}
            Err(e) => {
                self.warnings.warn("recover", || {
                    format!("recovering interrupted deliveries failed (retried each turn): {e}")
                });
                return;
            }
        }
        self.recovered = true;
    }

    /// Publishes `NOTIFY queue_ext_jobs, '<queue>'` for each queue whose jobs became runnable
    /// in transactions that committed since the last turn: one short transaction for all of
    /// them, without waiting for its commit to reach disk (it changes no data). Webhook
    /// queues are ours to drain, so nobody else is told about them. An idle worker's wake-up
    /// waits on this, so its statements are planned once and kept.
    fn announce(&mut self) {
        let Some(slot) = self.slot else { return };
        if self.last_announce.elapsed() < ANNOUNCE_GAP && wakeup::has_announcements(slot) {
            // Busy: let this turn's commits join the next announcement (wait_for_work wakes
            // for it). An idle queue's first job is announced at once.
            return;
        }
        let bits = wakeup::take_announcements(slot);
        if bits.iter().all(|w| *w == 0) {
            return;
        }
        let plans = &mut self.announce_plans;
        let sent = db::transaction(|| {
            Spi::connect_mut(|client| {
                if plans.is_none() {
                    *plans = Some(AnnouncePlans::prepare(client)?);
                }
                let plans = plans.as_ref().expect("prepared above");
                client.update(&plans.async_commit, None, &[])?;
                let queues: Vec<String> = client
                    .select(&plans.queues, None, &[])?
                    .filter_map(|row| row.get::<String>(1).transpose())
                    .filter(|name| {
                        name.as_ref()
                            .map_or(true, |n| wakeup::is_announced(&bits, n))
                    })
                    .collect::<Result<_, _>>()?;
                if !queues.is_empty() {
                    client.update(&plans.notify, None, &[queues.into()])?;
                }
                Ok(())
            })
        });
        self.last_announce = Instant::now();
        if let Err(e) = sent {
            // Planned again next time: the error may have been the plans' (say, a queues
            // table recreated by an extension update).
            self.announce_plans = None;
            self.warnings
                .warn("announce", || format!("announcing new jobs failed: {e}"));
        }
    }

    /// Records every finished request and claims what there is room for, in one transaction
    /// (one commit per turn of the loop, however busy), then starts the new requests. True
    /// when it filled every free slot, so there may be more to claim at once.
    fn record_and_claim(&mut self) -> bool {
        let fresh = self.take_finished();
        // While the lanes are held for a recheck (asked for since the last one, or failing),
        // nothing claimed now could start: claim nothing, so that no job waits behind the
        // gate under a lease (after a kill -9 its attempt would count, unsent).
        let room = if self.gate.due().is_some() {
            0
        } else {
            gucs::max_in_flight().saturating_sub(self.in_flight.len())
        };
        if fresh.is_empty() && self.unrecorded.is_empty() && room == 0 {
            return false;
        }
        // Outcomes refused before: once more, or, after RECORD_RETRY_FOR, for the last time.
        let (last, again): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unrecorded)
            .into_iter()
            .partition(|(_, since)| since.elapsed() >= RECORD_RETRY_FOR);
        let first_refused: HashMap<String, Instant> = again
            .iter()
            .map(|(o, since)| (o.job_id.clone(), *since))
            .collect();
        let outcomes: Vec<Outcome> = again.into_iter().map(|(o, _)| o).chain(fresh).collect();
        let last: Vec<Outcome> = last.into_iter().map(|(o, _)| o).collect();
        let busy = self.busy.clone();
        let ahead: Vec<String> = self
            .request_ms
            .iter()
            .filter(|(_, (ms, _))| *ms < AHEAD_BELOW)
            .map(|(queue, _)| queue.clone())
            .collect();
        let mut failures = Vec::new();
        let mut kept = Vec::new();
        // Before the transaction, whose now() starts the leases of what it claims.
        let claimed_at = Instant::now();
        let turn = db::transaction(|| {
            if !gucs::dispatcher_synchronous_commit() {
                Spi::run("SET LOCAL synchronous_commit = off")?;
            }
            // Each in a subtransaction of its own: a claim that fails does not undo the
            // records, and a record that fails is retried piece by piece (delivery.rs).
            (failures, kept) = delivery::record_isolated(&outcomes, Unstorable::Keep);
            failures.extend(delivery::record_isolated(&last, Unstorable::Bury).0);
            if room == 0 || !self.recovered {
                return Ok((Vec::new(), Vec::new()));
            }
            Ok(delivery::claim_isolated(WORKER_ID, room, &busy, &ahead))
        });
        for f in failures {
            self.warnings.warn("record", || f);
        }
        let now = Instant::now();
        let dated = |o: Outcome| {
            let since = first_refused.get(&o.job_id).copied().unwrap_or(now);
            (o, since)
        };
        self.unrecorded = kept.into_iter().map(dated).collect();
        let claimed = match turn {
            Ok((claimed, failed)) => {
                for (queue, e) in failed {
                    self.warnings.warn("claim", || {
                        format!("claiming from queue {queue} failed: {e}")
                    });
                }
                claimed
            }
            Err(e) => {
                // The commit itself failed: what was recorded and claimed is undone; the
                // outcomes are tried again next turn (their jobs keep their leases meanwhile).
                self.unrecorded = outcomes.into_iter().chain(last).map(dated).collect();
                self.warnings
                    .warn("claim", || format!("recording and claiming failed: {e}"));
                return false;
            }
        };
        let full = room > 0 && claimed.len() >= room;
        let short = room > 0 && claimed.len() < room;
        let taken = claimed.len();
        let (mut unusable, mut deliveries) = (Vec::new(), Vec::new());
        for c in claimed {
            match c {
                Claimed::Send(d) => deliveries.push(d),
                Claimed::Unusable(o) => unusable.push(o),
            }
        }
        self.send_all(deliveries, claimed_at);
        if !unusable.is_empty() {
            // Its own description was unusable: trying again would find the same.
            let failures =
                db::transaction(|| Ok(delivery::record_isolated(&unusable, Unstorable::Bury).0));
            for f in failures.unwrap_or_default() {
                self.warnings.warn("record", || f);
            }
        }
        // Short of work: is some of it only waiting for a rate limit's next token? (Asked
        // after the requests are on their way, in a transaction of its own.) A token already
        // due while nothing could be claimed means the queues are full, not rate-limited: a
        // finished request wakes us then, so do not spin.
        self.next_token_in = if short {
            db::transaction(delivery::rate_limit_wait)
                .unwrap_or_else(|_| {
                    // Asked and planned again next time (the SQL may have changed).
                    delivery::forget_protocol();
                    None
                })
                .filter(|wait| taken > 0 || *wait >= Duration::from_millis(5))
        } else {
            None
        };
        full
    }

    /// Takes the finished requests off the in-flight books (their outcomes still to record).
    fn take_finished(&mut self) -> Vec<Outcome> {
        // Before draining: an outcome sent after this point signals again.
        self.reports.signalled.store(false, Ordering::SeqCst);
        let outcomes: Vec<Outcome> = self.done_rx.try_iter().collect();
        let now = Instant::now();
        for o in &outcomes {
            self.in_flight.remove(&o.job_id);
            if let Some(n) = self.busy.get_mut(&o.queue_name) {
                *n = n.saturating_sub(1);
            }
            // A request that failed counts as slow: a failing endpoint's queue is claimed
            // only into free slots.
            let ms = if o.outcome == "delivered" {
                o.duration_ms
            } else {
                o.duration_ms.max(AHEAD_BELOW)
            };
            let (average, last) = self
                .request_ms
                .entry(o.queue_name.clone())
                .or_insert((ms, now));
            *average += AVERAGE_WEIGHT * (ms - *average);
            *last = now;
            if let Some(slot) = self.slot {
                let counter = match o.outcome {
                    "delivered" => &slot.delivered,
                    "retry" => &slot.retried,
                    _ => &slot.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Slots no waiting or running request holds any more: a later claim starts afresh
        // (with the queue's max_in_flight of that time).
        self.lanes.retain(|_, lanes| Arc::strong_count(lanes) > 1);
        self.request_ms
            .retain(|_, (_, last)| now.duration_since(*last) < AVERAGE_FOR);
        outcomes
    }

    /// Records finished requests on their own (at shutdown, when nothing more is claimed).
    fn record_finished(&mut self) {
        let mut outcomes = self.take_finished();
        outcomes.extend(
            std::mem::take(&mut self.unrecorded)
                .into_iter()
                .map(|(o, _)| o),
        );
        if outcomes.is_empty() {
            return;
        }
        // What is still refused stays with its job's lease: the shutdown returns those jobs to
        // their queues, and they are delivered again with the same webhook-id.
        match db::transaction(|| Ok(delivery::record_isolated(&outcomes, Unstorable::Keep).0)) {
            Ok(failures) => failures
                .into_iter()
                .for_each(|f| self.warnings.warn("record", || f)),
            Err(e) => pgrx::warning!("queue_ext dispatcher: recording outcomes failed: {e}"),
        }
    }

    /// Starts the requests of one claim. A delivery that carries its queue's max_in_flight
    /// (any claim from a database at 0.12.0 on) goes to the queue's lanes, which send it when
    /// one of its slots is free; it is queued there before this returns, so that a recheck
    /// (`withdraw_unsent`) finds it. The others go to a single task, which spawns one per
    /// request from inside the runtime (no wake-up of the HTTP thread per request).
    fn send_all(&mut self, deliveries: Vec<Delivery>, claimed_at: Instant) {
        let mut direct = Vec::new();
        for d in deliveries {
            *self.busy.entry(d.queue_name.clone()).or_default() += 1;
            self.in_flight.insert(d.job_id.clone(), d.clone());
            if d.max_in_flight.is_some() {
                let lanes = self
                    .lanes
                    .entry(d.queue_name.clone())
                    .or_insert_with(|| Lanes::new(self.gate.clone()));
                lanes.push(
                    d,
                    claimed_at,
                    &self.client,
                    &self.reports,
                    self.runtime.handle(),
                );
            } else {
                direct.push(d);
            }
        }
        if direct.is_empty() {
            return;
        }
        let client = self.client.clone();
        let reports = self.reports.clone();
        self.runtime.spawn(async move {
            for d in direct {
                let (client, reports) = (client.clone(), reports.clone());
                tokio::spawn(async move { reports.report(client.deliver(d).await) });
            }
        });
    }

    /// Rechecks the deliveries waiting for a request slot when a commit asked for it (it paused
    /// or dropped a queue, asked for a running job's cancellation or changed a queue's webhook
    /// settings; the lanes hold back until this is done), and every RECHECK_EVERY anyway while
    /// any wait (a prepared transaction's COMMIT PREPARED sends no word). Those of paused
    /// queues, and those claimed with webhook settings changed since, go back to their queues
    /// and those whose cancellation was asked for are cancelled, their attempt not counted;
    /// those no longer this dispatcher's to send (a dropped queue's) are let go.
    /// Requests already started go on, as any worker's would.
    fn withdraw_unsent(&mut self) {
        let due = self.gate.due();
        let backstop = self.last_recheck.elapsed() >= RECHECK_EVERY;
        if due.is_none() && !backstop && self.withdrawn.is_empty() {
            return;
        }
        let waiting: Vec<lanes::WaitingJob> =
            self.lanes.values().flat_map(|l| l.waiting()).collect();
        if due.is_some() || backstop {
            self.last_recheck = Instant::now();
        }
        if !waiting.is_empty() && (due.is_some() || backstop) {
            match db::transaction(|| delivery::unsent_to_withdraw(&waiting)) {
                Ok(reasons) => {
                    self.recheck_failing_since = None;
                    if !reasons.is_empty() {
                        for lanes in self.lanes.values() {
                            self.withdrawn
                                .extend(lanes.withdraw(&reasons).into_iter().map(|d| {
                                    let why = reasons.get(&d.job_id).cloned().unwrap_or_default();
                                    (d, why)
                                }));
                        }
                    }
                }
                Err(e) => {
                    // The lanes stay held and it is asked again next turn; past RECHECK_HOLD
                    // they go on, so that a broken check cannot stop every delivery.
                    let since = *self.recheck_failing_since.get_or_insert_with(Instant::now);
                    self.warnings.warn("withdraw", || {
                        format!("checking the jobs waiting for a request slot failed: {e}")
                    });
                    if since.elapsed() < RECHECK_HOLD {
                        return;
                    }
                }
            }
        }
        if let Some(requested) = due {
            self.gate.open_to(requested);
        }
        if self.withdrawn.is_empty() {
            return;
        }
        let withdrawn = std::mem::take(&mut self.withdrawn);
        match db::transaction(|| return_withdrawn(&withdrawn)) {
            Ok(_) => self.forget_held(withdrawn.iter().map(|(d, _)| d)),
            Err(e) => {
                // Kept out of the lanes and tried again next turn; should it keep failing, the
                // leases expire and the sweep returns the jobs.
                self.withdrawn = withdrawn;
                self.warnings.warn("withdraw", || {
                    format!("returning jobs withdrawn from their request slots failed: {e}")
                });
            }
        }
    }

    /// Takes deliveries that went back to their queues unsent off the books.
    fn forget_held<'a>(&mut self, deliveries: impl IntoIterator<Item = &'a Delivery>) {
        for d in deliveries {
            self.in_flight.remove(&d.job_id);
            if let Some(n) = self.busy.get_mut(&d.queue_name) {
                *n = n.saturating_sub(1);
            }
        }
    }

    /// Every second: check queue_ext is still installed, and return expired leases (of any
    /// worker, so external workers that died are covered too); every minute, and a batch
    /// per PURGE_AGAIN until nothing expired is left: trim the delivery log. False once
    /// queue_ext is gone from the database.
    fn maintain(&mut self) -> bool {
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            match db::extension_installed() {
                Ok(false) => return false,
                Ok(true) => {}
                Err(e) => self
                    .warnings
                    .warn("extension", || format!("cannot check for queue_ext: {e}")),
            }
            if let Err(e) = db::transaction(|| Spi::run("SELECT queue_ext.cleanup_stuck_jobs()")) {
                self.warnings
                    .warn("sweep", || format!("cleanup_stuck_jobs failed: {e}"));
            }
        }
        let purge_gap = if self.purge_behind {
            PURGE_AGAIN
        } else {
            PURGE_EVERY
        };
        if self.last_purge.elapsed() >= purge_gap {
            self.last_purge = Instant::now();
            let minutes = gucs::delivery_log_retention().as_secs_f64() / 60.0;
            let purged = db::transaction(|| {
                Spi::get_one_with_args::<i32>(
                    "SELECT queue_ext._purge_deliveries(make_interval(mins => $1::int))",
                    &[(minutes as i32).into()],
                )
            });
            self.purge_behind = match purged {
                Ok(n) => n.unwrap_or(0) > 0,
                Err(e) => {
                    self.warnings
                        .warn("purge", || format!("trimming the delivery log failed: {e}"));
                    false
                }
            };
        }
        true
    }

    /// Sleeps until the latch is set (a commit, a signal), a request finishes, or `timeout`;
    /// returns the events that ended the sleep.
    fn wait(&self, timeout: Duration) -> i32 {
        let events = pg_sys::WL_LATCH_SET
            | pg_sys::WL_SOCKET_READABLE
            | pg_sys::WL_TIMEOUT
            | pg_sys::WL_EXIT_ON_PM_DEATH;
        // SAFETY: waiting on our own latch and eventfd from the main thread; the postmaster's
        // death ends the process inside the call (WL_EXIT_ON_PM_DEATH).
        let woke = unsafe {
            let woke = pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as i32,
                self.reports.eventfd,
                timeout.as_micros().div_ceil(1000) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            let mut counter: u64 = 0;
            let read = libc::read(self.reports.eventfd, (&mut counter as *mut u64).cast(), 8);
            // A wake-up the latch ended may not say the eventfd was readable too; reading it
            // consumes that signal, so say it here, or the outcomes would wait for the poll.
            if read == 8 && counter > 0 {
                woke | pg_sys::WL_SOCKET_READABLE as i32
            } else {
                woke
            }
        };
        pg_sys::check_for_interrupts!();
        woke
    }

    /// Jobs claimed ahead and still waiting for a request slot go back to their queues as if
    /// never claimed: nothing was sent, so the attempt does not count. If that fails they stay
    /// held, and the end of the shutdown returns them with the rest.
    fn return_unsent(&mut self) {
        let mut unsent: Vec<(Delivery, String)> = self
            .lanes
            .values()
            .flat_map(|lanes| lanes.abandon_waiting())
            .map(|d| (d, "not sent: the dispatcher stopped".to_string()))
            .collect();
        unsent.append(&mut self.withdrawn);
        if unsent.is_empty() {
            return;
        }
        match db::transaction(|| return_withdrawn(&unsent)) {
            Ok(returned) => {
                self.forget_held(unsent.iter().map(|(d, _)| d));
                log!("queue_ext dispatcher: returned {returned} deliveries waiting for a request slot, unsent");
            }
            Err(e) => pgrx::warning!(
                "queue_ext dispatcher: returning unsent deliveries failed ({e}); they are released with the rest"
            ),
        }
    }

    /// SIGTERM: claim nothing more, return the jobs waiting for a request slot to their
    /// queues unsent, give requests in flight `queue_ext.shutdown_grace` to finish and record
    /// them, then return the rest to their queues.
    fn shut_down(&mut self) {
        self.return_unsent();
        // A command that needs the database to itself (DROP DATABASE...) is waiting: go now.
        let grace = match self.slot {
            Some(slot) if slot.leave_now.load(Ordering::Acquire) => Duration::ZERO,
            _ => gucs::shutdown_grace(),
        };
        let deadline = Instant::now() + grace;
        while !self.in_flight.is_empty() && Instant::now() < deadline {
            self.wait(
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
            );
            self.record_finished();
        }
        if self.in_flight.is_empty() {
            return;
        }
        // Back in their queues through the one path that returns a lost attempt: the request
        // may have reached the endpoint, so the attempt counts (with the reason) and a job out
        // of attempts goes to the dead letter queue. Repeated restarts cannot resend it forever.
        let result: Result<Option<i32>, DbError> = db::transaction(|| {
            Spi::get_one_with_args::<i32>(
                "SELECT queue_ext._return_running($1, 'dispatcher stopped during delivery')",
                &[WORKER_ID.into()],
            )
        });
        match result {
            Ok(n) => log!(
                "queue_ext dispatcher: released {} unfinished deliveries at shutdown",
                n.unwrap_or(0)
            ),
            Err(e) => pgrx::warning!(
                "queue_ext dispatcher: releasing deliveries failed ({e}); their leases will expire"
            ),
        }
    }
}
