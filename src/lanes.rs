//! The dispatcher's request slots per queue. A queue sends at most its `webhook_max_in_flight`
//! requests at once, while the dispatcher may hold twice that many of its jobs when its
//! endpoint answers fast (larger claims cost less SQL per job). Each slot is a lane: one task
//! that sends the queue's waiting deliveries one after another, in claim order, until none is
//! left. A lane per slot rather than a task per request waiting on a semaphore: a finished
//! request goes straight on to the next, with no wake-up in between.

use std::collections::VecDeque;
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
    /// claim read it, and starts a lane if a slot is free. Called on the HTTP runtime.
    pub fn push<R: Report>(
        self: &Arc<Self>,
        d: Delivery,
        claimed_at: Instant,
        client: &HttpClient,
        to: &R,
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
            tokio::spawn(async move { lanes.run(to).await });
        }
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
