//! The dispatcher's request slots per queue. A queue sends at most its `webhook_max_in_flight`
//! requests at once, while the dispatcher may hold twice that many of its jobs when its
//! endpoint answers fast (larger claims cost less SQL per job). Each slot is a lane: one task
//! that sends the queue's waiting deliveries one after another, in claim order, until none is
//! left. A lane per slot rather than a task per request waiting on a semaphore: a finished
//! request goes straight on to the next, with no wake-up in between. A waiting job has not
//! been sent, so pausing or dropping its queue, cancelling it or changing its queue's webhook
//! settings still stops it: such a commit closes every lane's gate until the dispatcher has
//! rechecked what waits.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::http::{Delivery, DeliveryError, HttpClient, Outcome};

/// A job claimed ahead waits at most one request timeout for a slot (the claim holds at most
/// twice the queue's max_in_flight, and slots go in claim order); its lease covers two
/// timeouts and 30 s from before the claim. One that has waited its timeout and this much
/// more is not sent, so that no request can outlast its lease.
const SLOT_WAIT_MARGIN: Duration = Duration::from_secs(20);

/// What the dispatcher's recheck needs of a delivery waiting for a slot: which claim of which
/// job it is, and the version of the target's settings it was claimed with.
pub struct WaitingJob {
    pub job_id: String,
    pub lease_token: String,
    pub settings_version: Option<i64>,
}

/// Where a lane's outcomes go.
pub trait Report: Clone + Send + Sync + 'static {
    fn report(&self, outcome: Outcome);
}

/// Holds back every waiting delivery of the dispatcher while a recheck is due: a commit that
/// paused or dropped a queue, changed its webhook settings or asked for a job's cancellation,
/// counts one in `requested`
/// (shared memory), and no lane starts another request until the dispatcher has rechecked
/// what it holds and says so (`open_to`). Requests already started go on.
pub struct Gate {
    requested: &'static AtomicU64,
    done: AtomicU64,
    opened: Notify,
}

/// Stands in for the shared-memory counter of a dispatcher that has no slot.
static NO_RECHECKS: AtomicU64 = AtomicU64::new(0);

impl Gate {
    pub fn new(requested: Option<&'static AtomicU64>) -> Arc<Gate> {
        let requested = requested.unwrap_or(&NO_RECHECKS);
        Arc::new(Gate {
            done: AtomicU64::new(requested.load(Ordering::Acquire)),
            requested,
            opened: Notify::new(),
        })
    }

    /// The count of rechecks requested so far, when it is ahead of the last one done.
    pub fn due(&self) -> Option<u64> {
        let requested = self.requested.load(Ordering::Acquire);
        (requested != self.done.load(Ordering::Acquire)).then_some(requested)
    }

    /// The recheck of everything requested up to `requested` is done: lanes go on.
    pub fn open_to(&self, requested: u64) {
        self.done.store(requested, Ordering::Release);
        self.opened.notify_waiters();
    }

    async fn pass(&self) {
        loop {
            // Created before the check: a notify_waiters between the two still wakes it.
            let opened = self.opened.notified();
            if self.due().is_none() {
                return;
            }
            opened.await;
        }
    }
}

/// A delivery waiting for a slot: when its claim began, and the HTTP client of that moment
/// (a reload of the HTTP settings applies to every delivery claimed after it).
struct Waiting {
    delivery: Delivery,
    claimed_at: Instant,
    client: HttpClient,
}

/// One queue's waiting deliveries and its lanes.
pub struct Lanes {
    state: Mutex<State>,
    gate: Arc<Gate>,
}

struct State {
    waiting: VecDeque<Waiting>,
    /// The queue's max_in_flight as of its latest claim.
    slots: usize,
    /// Lanes running; a lane leaves under the same lock that finds `waiting` empty, or finds
    /// more lanes running than `slots` (the queue's max_in_flight was lowered).
    running: usize,
}

impl Lanes {
    pub fn new(gate: Arc<Gate>) -> Arc<Lanes> {
        Arc::new(Lanes {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                slots: 1,
                running: 0,
            }),
            gate,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing under the lock can panic half-way; a poisoned lock still holds a whole state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `d`, whose claim began at `claimed_at`, under the queue's max_in_flight as that
    /// claim read it, and starts a lane on `runtime` if a slot is free. Called by the
    /// dispatcher as it hands over a claim, so that a delivery is in its lanes (where a
    /// recheck finds it) from then on.
    pub fn push<R: Report>(
        self: &Arc<Self>,
        d: Delivery,
        claimed_at: Instant,
        client: &HttpClient,
        to: &R,
        runtime: &tokio::runtime::Handle,
    ) {
        let start = {
            let mut state = self.state();
            state.slots = d.max_in_flight.unwrap_or(1).max(1) as usize;
            state.waiting.push_back(Waiting {
                delivery: d,
                claimed_at,
                client: client.clone(),
            });
            let start = state.running < state.slots;
            if start {
                state.running += 1;
            }
            start
        };
        if start {
            let (lanes, to) = (self.clone(), to.clone());
            runtime.spawn(async move { lanes.run(to).await });
        }
    }

    /// The deliveries still waiting for a slot.
    pub fn waiting(&self) -> Vec<WaitingJob> {
        self.state()
            .waiting
            .iter()
            .map(|w| WaitingJob {
                job_id: w.delivery.job_id.clone(),
                lease_token: w.delivery.lease_token.clone(),
                settings_version: w.delivery.settings_version,
            })
            .collect()
    }

    /// Takes the deliveries of `job_ids` that are still waiting, so that none of them starts.
    pub fn withdraw<V>(&self, job_ids: &HashMap<String, V>) -> Vec<Delivery> {
        let mut state = self.state();
        let (taken, kept): (VecDeque<Waiting>, VecDeque<Waiting>) =
            std::mem::take(&mut state.waiting)
                .into_iter()
                .partition(|w| job_ids.contains_key(&w.delivery.job_id));
        state.waiting = kept;
        taken.into_iter().map(|w| w.delivery).collect()
    }

    /// Takes every delivery still waiting, so that none of them starts (the dispatcher is
    /// stopping and returns them to their queues unsent).
    pub fn abandon_waiting(&self) -> Vec<Delivery> {
        self.state().waiting.drain(..).map(|w| w.delivery).collect()
    }

    fn next(&self) -> Option<Waiting> {
        let mut state = self.state();
        let next = if state.running > state.slots {
            None
        } else {
            state.waiting.pop_front()
        };
        if next.is_none() {
            state.running -= 1;
        }
        next
    }

    async fn run<R: Report>(self: Arc<Self>, to: R) {
        loop {
            self.gate.pass().await;
            let Some(w) = self.next() else { break };
            let d = w.delivery;
            let waited = w.claimed_at.elapsed();
            let outcome =
                if waited > Duration::from_millis(d.effective_timeout_ms()) + SLOT_WAIT_MARGIN {
                    let late = DeliveryError::SlotWait(waited.as_millis() as u64);
                    Outcome::from_error(&d, &late, w.claimed_at)
                } else {
                    w.client.deliver(d).await
                };
            to.report(outcome);
        }
    }
}
