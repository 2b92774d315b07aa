//! The background dispatcher: one worker per database in `queue_ext.database`, delivering
//! webhook jobs the moment they commit.
//!
//! Its loop: wake (commit latch, a finished request, or the poll backstop) → record finished
//! requests in one short transaction → claim as many due jobs as there is room for in a
//! second one → hand them to the HTTP runtime → sleep. Requests run on tokio threads that
//! never touch Postgres; they report through a channel and an eventfd that the wait
//! watches, so a slow endpoint only occupies its own slots and nothing waits for a batch.
//!
//! Nothing is lost: a claim is a lease in a logged table. If this process dies mid-request,
//! the next one (restarted by the postmaster) puts the jobs it held back in their queues
//! before claiming anything, and they are delivered again with the same webhook-id.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::delivery::{self, Claimed};
use crate::gucs;
use crate::http::{self, Delivery, HttpClient, Outcome};
use crate::wakeup::{self, Slot, MAX_DISPATCHERS};

/// Every dispatcher claims under this worker id; there is one per database.
const WORKER_ID: &str = "queue_ext-dispatcher";
/// How often expired leases are swept and the delivery log trimmed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Registers one dispatcher per configured database. Called from `_PG_init` while preloading.
pub fn register() {
    let mut seen = Vec::new();
    for db in gucs::databases() {
        if seen.contains(&db) || seen.len() == MAX_DISPATCHERS {
            continue;
        }
        BackgroundWorkerBuilder::new(&format!("queue_ext dispatcher ({db})"))
            .set_type("queue_ext dispatcher")
            .set_library("queue_ext")
            .set_function("queue_ext_dispatcher_main")
            .set_argument((seen.len() as i32).into_datum())
            .set_extra(&db)
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            // Restart a second after a crash or an error exit.
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
        seen.push(db);
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn queue_ext_dispatcher_main(arg: pg_sys::Datum) {
    // SAFETY: the argument is the int4 slot index set in register().
    let index = unsafe { i32::from_datum(arg, false) }
        .unwrap_or(0)
        .clamp(0, MAX_DISPATCHERS as i32 - 1) as usize;
    let database = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);

    let mut dispatcher = match Dispatcher::new(index) {
        Ok(d) => d,
        Err(e) => {
            // A bad setting (say, an unreadable CA file): say so and retry after the restart delay.
            pgrx::warning!("queue_ext dispatcher for {database} cannot start: {e}");
            return;
        }
    };
    log!("queue_ext dispatcher started for database {database}");
    dispatcher.run();
    log!("queue_ext dispatcher for database {database} stopped");
}

struct Dispatcher {
    slot: Option<&'static Slot>,
    runtime: tokio::runtime::Runtime,
    client: HttpClient,
    http_settings: http::HttpSettings,
    done_tx: Sender<Outcome>,
    done_rx: Receiver<Outcome>,
    /// Written by request tasks when they finish; the wait watches it.
    eventfd: i32,
    /// Requests in flight, by job id, kept so a shutdown can release them.
    in_flight: HashMap<String, Delivery>,
    busy: HashMap<String, u32>,
    installed: bool,
    last_sweep: Instant,
    last_purge: Instant,
    /// When the next token of a rate limit holding back a webhook job comes: sleep no longer.
    next_token_in: Option<Duration>,
}

impl Dispatcher {
    fn new(index: usize) -> Result<Dispatcher, String> {
        let runtime =
            http::new_runtime(2).map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
        let http_settings = delivery::http_settings();
        let client = HttpClient::new(&http_settings)?;
        // SAFETY: plain syscall; a nonblocking eventfd that request tasks bump.
        let eventfd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if eventfd < 0 {
            return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
        }
        let (done_tx, done_rx) = channel();
        let slot = wakeup::slots().map(|s| &s[index]);
        if let Some(slot) = slot {
            // SAFETY: reading this process's own identifiers.
            unsafe {
                slot.db_oid
                    .store(pg_sys::MyDatabaseId.to_u32(), Ordering::Relaxed);
                slot.procno
                    .store((*pg_sys::MyProc).pgprocno, Ordering::Relaxed);
            }
            slot.started_at_ms
                .store(wakeup::now_ms(), Ordering::Relaxed);
            slot.heartbeat_ms.store(wakeup::now_ms(), Ordering::Relaxed);
            // SAFETY: as above.
            slot.pid
                .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
        }
        let stale = Instant::now() - PURGE_EVERY;
        Ok(Dispatcher {
            slot,
            runtime,
            client,
            http_settings,
            done_tx,
            done_rx,
            eventfd,
            in_flight: HashMap::new(),
            busy: HashMap::new(),
            installed: false,
            last_sweep: stale,
            last_purge: stale,
            next_token_in: None,
        })
    }

    fn run(&mut self) {
        loop {
            // Both flags reset when read: read each once per turn.
            if BackgroundWorker::sighup_received() {
                // SAFETY: reloading the configuration file on the main thread, as a backend does.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                self.reload_http();
            }
            if BackgroundWorker::sigterm_received() {
                self.shut_down();
                return;
            }
            let mut more_work = false;
            if self.ensure_installed() {
                more_work = self.record_and_claim();
                self.maintain();
            }
            if let Some(slot) = self.slot {
                slot.heartbeat_ms.store(wakeup::now_ms(), Ordering::Relaxed);
                slot.in_flight
                    .store(self.in_flight.len() as u32, Ordering::Relaxed);
            }
            if !more_work {
                let mut timeout = gucs::poll_interval().min(SWEEP_EVERY);
                if let Some(t) = self.next_token_in {
                    timeout = timeout.min(t.max(Duration::from_millis(1)));
                }
                self.wait(timeout);
            }
        }
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

    /// A preloaded worker starts before CREATE EXTENSION: wait for it instead of failing
    /// into a restart loop. Once installed, recover what a previous dispatcher held.
    fn ensure_installed(&mut self) -> bool {
        if self.installed {
            return true;
        }
        let installed = BackgroundWorker::transaction(|| {
            Spi::get_one::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'queue_ext')",
            )
        });
        if !matches!(installed, Ok(Some(true))) {
            return false;
        }
        let recovered = BackgroundWorker::transaction(|| {
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
            Err(e) => pgrx::warning!(
                "queue_ext dispatcher: recovering interrupted deliveries failed: {e}"
            ),
        }
        self.installed = true;
        true
    }

    /// Records every finished request and claims what there is room for, in one transaction
    /// (one commit per turn of the loop, however busy), then starts the new requests. True
    /// when it filled every free slot, so there may be more to claim at once.
    fn record_and_claim(&mut self) -> bool {
        let outcomes = self.take_finished();
        let room = gucs::max_in_flight().saturating_sub(self.in_flight.len());
        if outcomes.is_empty() && room == 0 {
            return false;
        }
        let turn = BackgroundWorker::transaction(|| {
            if !gucs::dispatcher_synchronous_commit() {
                Spi::run("SET LOCAL synchronous_commit = off")?;
            }
            if !outcomes.is_empty() {
                delivery::record(&outcomes)?;
            }
            if room == 0 {
                return Ok::<_, pgrx::spi::Error>(Vec::new());
            }
            delivery::claim(WORKER_ID, room, &self.busy, None)
        });
        let claimed = match turn {
            Ok(claimed) => claimed,
            Err(e) => {
                // The leases stay; the sweep returns these jobs for another attempt.
                pgrx::warning!(
                    "queue_ext dispatcher: recording {} outcomes and claiming failed: {e}",
                    outcomes.len()
                );
                return false;
            }
        };
        let full = room > 0 && claimed.len() >= room;
        let short = room > 0 && claimed.len() < room;
        let mut unusable = Vec::new();
        for c in claimed {
            match c {
                Claimed::Send(d) => self.send(d),
                Claimed::Unusable(o) => unusable.push(o),
            }
        }
        if !unusable.is_empty() {
            if let Err(e) = BackgroundWorker::transaction(|| delivery::record(&unusable)) {
                pgrx::warning!("queue_ext dispatcher: recording unusable deliveries failed: {e}");
            }
        }
        // Short of work: is some of it only waiting for a rate limit's next token? (Asked
        // after the requests are on their way, in a read-only transaction of its own.)
        self.next_token_in = if short {
            BackgroundWorker::transaction(delivery::rate_limit_wait).unwrap_or(None)
        } else {
            None
        };
        full
    }

    /// Takes the finished requests off the in-flight books (their outcomes still to record).
    fn take_finished(&mut self) -> Vec<Outcome> {
        let outcomes: Vec<Outcome> = self.done_rx.try_iter().collect();
        for o in &outcomes {
            self.in_flight.remove(&o.job_id);
            if let Some(n) = self.busy.get_mut(&o.queue_name) {
                *n = n.saturating_sub(1);
            }
            if let Some(slot) = self.slot {
                let counter = match o.outcome {
                    "delivered" => &slot.delivered,
                    "retry" => &slot.retried,
                    _ => &slot.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        outcomes
    }

    /// Records finished requests on their own (at shutdown, when nothing more is claimed).
    fn record_finished(&mut self) {
        let outcomes = self.take_finished();
        if outcomes.is_empty() {
            return;
        }
        if let Err(e) = BackgroundWorker::transaction(|| delivery::record(&outcomes)) {
            pgrx::warning!(
                "queue_ext dispatcher: recording {} outcomes failed: {e}",
                outcomes.len()
            );
        }
    }

    fn send(&mut self, d: Delivery) {
        *self.busy.entry(d.queue_name.clone()).or_default() += 1;
        self.in_flight.insert(d.job_id.clone(), d.clone());
        let client = self.client.clone();
        let done = self.done_tx.clone();
        let eventfd = self.eventfd;
        self.runtime.spawn(async move {
            let outcome = client.deliver(d).await;
            // The receiver lives as long as the runtime, so send cannot fail while we run.
            let _ = done.send(outcome);
            let one: u64 = 1;
            // SAFETY: writing 8 bytes to our eventfd; it stays open for the process's life.
            unsafe { libc::write(eventfd, (&one as *const u64).cast(), 8) };
        });
    }

    /// Every second: return expired leases (of any worker, so external workers that died
    /// are covered too); every minute: trim the delivery log.
    fn maintain(&mut self) {
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            if let Err(e) =
                BackgroundWorker::transaction(|| Spi::run("SELECT queue_ext.cleanup_stuck_jobs()"))
            {
                pgrx::warning!("queue_ext dispatcher: cleanup_stuck_jobs failed: {e}");
            }
        }
        if self.last_purge.elapsed() >= PURGE_EVERY {
            self.last_purge = Instant::now();
            let minutes = gucs::delivery_log_retention().as_secs_f64() / 60.0;
            if let Err(e) = BackgroundWorker::transaction(|| {
                Spi::run_with_args(
                    "SELECT queue_ext._purge_deliveries(make_interval(mins => $1::int))",
                    &[(minutes as i32).into()],
                )
            }) {
                pgrx::warning!("queue_ext dispatcher: trimming the delivery log failed: {e}");
            }
        }
    }

    /// Sleeps until the latch is set (a commit, a signal), a request finishes, or `timeout`.
    fn wait(&self, timeout: Duration) {
        let events = pg_sys::WL_LATCH_SET
            | pg_sys::WL_SOCKET_READABLE
            | pg_sys::WL_TIMEOUT
            | pg_sys::WL_EXIT_ON_PM_DEATH;
        // SAFETY: waiting on our own latch and eventfd from the main thread; the postmaster's
        // death ends the process inside the call (WL_EXIT_ON_PM_DEATH).
        unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as i32,
                self.eventfd,
                timeout.as_micros().div_ceil(1000) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            let mut counter: u64 = 0;
            libc::read(self.eventfd, (&mut counter as *mut u64).cast(), 8);
        }
        pg_sys::check_for_interrupts!();
    }

    /// SIGTERM: claim nothing more, give requests in flight `queue_ext.shutdown_grace` to
    /// finish and record them, then put the rest back in their queues.
    fn shut_down(&mut self) {
        let deadline = Instant::now() + gucs::shutdown_grace();
        while self.installed && !self.in_flight.is_empty() && Instant::now() < deadline {
            self.wait(
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
            );
            self.record_finished();
        }
        if self.installed && !self.in_flight.is_empty() {
            let held: Vec<serde_json::Value> = self
                .in_flight
                .values()
                .map(|d| serde_json::json!({"job_id": d.job_id, "lease_token": d.lease_token}))
                .collect();
            let result = BackgroundWorker::transaction(|| {
                Spi::get_one_with_args::<i32>(
                    "SELECT queue_ext._dispatch_release($1)",
                    &[pgrx::JsonB(serde_json::Value::Array(held)).into()],
                )
            });
            match result {
                Ok(n) => log!("queue_ext dispatcher: released {} unfinished deliveries at shutdown", n.unwrap_or(0)),
                Err(e) => pgrx::warning!("queue_ext dispatcher: releasing deliveries failed ({e}); their leases will expire"),
            }
        }
        if let Some(slot) = self.slot {
            slot.pid.store(0, Ordering::Release);
        }
    }
}
