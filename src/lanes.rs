//! The dispatcher's request slots for jobs claimed ahead of them. A queue sends at most its
//! `webhook_max_in_flight` requests at once, while the dispatcher may hold twice that many of
//! its jobs (larger claims cost less SQL per job). Each slot is a lane: one task that sends
//! the queue's waiting deliveries one after another, in claim order, until none is left. A
//! lane per slot rather than a task per request waiting on a semaphore: a finished request
//! goes straight on to the next, with no wake-up in between.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http::{Delivery, DeliveryError, HttpClient, Outcome};

/// A job claimed ahead waits at most one request timeout for a slot (the claim holds at most
/// twice the queue's max_in_flight, and slots go in claim order); its lease covers two
/// timeouts and 30 s. One that has waited its timeout and this much more is not sent, so that
/// no request can outlast its lease.
const SLOT_WAIT_MARGIN: Duration = Duration::from_secs(20);

/// Where a lane's outcomes go.
pub trait Report: Clone + Send + Sync + 'static {
    fn report(&self, outcome: Outcome);
}

/// One queue's waiting deliveries (at one max_in_flight) and its lanes.
pub struct Lanes {
    slots: usize,
    state: Mutex<State>,
}

struct State {
    waiting: VecDeque<(Delivery, Instant)>,
    /// Lanes running; a lane leaves under the same lock that finds `waiting` empty.
    running: usize,
}

impl Lanes {
    pub fn new(slots: u32) -> Arc<Lanes> {
        Arc::new(Lanes {
            slots: (slots as usize).max(1),
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                running: 0,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing under the lock can panic half-way; a poisoned lock still holds a whole state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `d` (claimed at `claimed_at`) and starts a lane if a slot is free. Called on the
    /// HTTP runtime.
    pub fn push<R: Report>(
        self: &Arc<Self>,
        d: Delivery,
        claimed_at: Instant,
        client: &HttpClient,
        to: &R,
    ) {
        let start = {
            let mut state = self.state();
            state.waiting.push_back((d, claimed_at));
            let start = state.running < self.slots;
            if start {
                state.running += 1;
            }
            start
        };
        if start {
            let (lanes, client, to) = (self.clone(), client.clone(), to.clone());
            tokio::spawn(async move { lanes.run(client, to).await });
        }
    }

    /// Takes every delivery still waiting, so that none of them starts (the dispatcher is
    /// stopping and returns them to their queues unsent).
    pub fn abandon_waiting(&self) -> Vec<Delivery> {
        self.state().waiting.drain(..).map(|(d, _)| d).collect()
    }

    fn next(&self) -> Option<(Delivery, Instant)> {
        let mut state = self.state();
        let next = state.waiting.pop_front();
        if next.is_none() {
            state.running -= 1;
        }
        next
    }

    async fn run<R: Report>(self: Arc<Self>, client: HttpClient, to: R) {
        while let Some((d, claimed_at)) = self.next() {
            let waited = claimed_at.elapsed();
            let outcome =
                if waited > Duration::from_millis(d.effective_timeout_ms()) + SLOT_WAIT_MARGIN {
                    let late = DeliveryError::SlotWait(waited.as_millis() as u64);
                    Outcome::from_error(&d, &late, Instant::now())
                } else {
                    client.deliver(d).await
                };
            to.report(outcome);
        }
    }
}
