//! The dispatcher's request slots per queue. A queue sends at most its `webhook_max_in_flight`
//! requests at once, while the dispatcher may hold twice that many of its jobs when its
//! endpoint answers fast (larger claims cost less SQL per job). Each slot is a lane: one task
//! that sends the queue's waiting deliveries one after another, in claim order, until none is
//! left. A lane per slot rather than a task per request waiting on a semaphore: a finished
//! request goes straight on to the next, with no wake-up in between.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http::{Delivery, DeliveryError, HttpClient, Outcome};

/// A job claimed ahead waits at most one request timeout for a slot (the claim holds at most
/// twice the queue's max_in_flight, and slots go in claim order); its lease covers two
/// timeouts and 30 s from before the claim. One that has waited its timeout and this much
/// more is not sent, so that no request can outlast its lease.
const SLOT_WAIT_MARGIN: Duration = Duration::from_secs(20);

/// Where a lane's outcomes go.
pub trait Report: Clone + Send + Sync + 'static {
    fn report(&self, outcome: Outcome);
}

/// A delivery waiting for a slot: when its claim began, and the HTTP client of that moment
/// (a reload of the HTTP settings applies to every delivery claimed after it).
struct Waiting {
    delivery: Delivery,
    claimed_at: Instant,
    client: HttpClient,
}

/// Deliveries taken out of line before their request started.
pub struct Withdrawn(Vec<Waiting>);

impl Withdrawn {
    pub fn deliveries(&self) -> impl Iterator<Item = &Delivery> {
        self.0.iter().map(|w| &w.delivery)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One queue's waiting deliveries and its lanes.
pub struct Lanes {
    state: Mutex<State>,
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
    pub fn new() -> Arc<Lanes> {
        Arc::new(Lanes {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                slots: 1,
                running: 0,
            }),
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
        let slots = d.max_in_flight.unwrap_or(1).max(1) as usize;
        self.queue(
            vec![Waiting {
                delivery: d,
                claimed_at,
                client: client.clone(),
            }],
            Some(slots),
            to,
            runtime,
        );
    }

    /// Appends `waiting` and starts as many lanes as they need and the slots allow.
    fn queue<R: Report>(
        self: &Arc<Self>,
        waiting: Vec<Waiting>,
        slots: Option<usize>,
        to: &R,
        runtime: &tokio::runtime::Handle,
    ) {
        let start = {
            let mut state = self.state();
            if let Some(slots) = slots {
                state.slots = slots;
            }
            state.waiting.extend(waiting);
            let start = state
                .slots
                .min(state.waiting.len() + state.running)
                .saturating_sub(state.running);
            state.running += start;
            start
        };
        for _ in 0..start {
            let (lanes, to) = (self.clone(), to.clone());
            runtime.spawn(async move { lanes.run(to).await });
        }
    }

    /// The deliveries still waiting for a slot.
    pub fn waiting(&self) -> Vec<Delivery> {
        self.state()
            .waiting
            .iter()
            .map(|w| w.delivery.clone())
            .collect()
    }

    /// Takes the deliveries of `job_ids` that are still waiting, so that none of them
    /// starts (their queue was paused or the job cancelled meanwhile).
    pub fn withdraw(&self, job_ids: &HashSet<String>) -> Withdrawn {
        let mut state = self.state();
        let (taken, kept): (VecDeque<Waiting>, VecDeque<Waiting>) =
            std::mem::take(&mut state.waiting)
                .into_iter()
                .partition(|w| job_ids.contains(&w.delivery.job_id));
        state.waiting = kept;
        Withdrawn(taken.into())
    }

    /// Puts withdrawn deliveries back in line (returning them to their queues failed): they
    /// are sent as if never withdrawn.
    pub fn restore<R: Report>(
        self: &Arc<Self>,
        withdrawn: Withdrawn,
        to: &R,
        runtime: &tokio::runtime::Handle,
    ) {
        self.queue(withdrawn.0, None, to, runtime);
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
        while let Some(w) = self.next() {
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
