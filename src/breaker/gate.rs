//! The gate every call to a node passes: admission through the node's
//! circuit breaker (the state machine beside it, in `mod.rs`), the
//! outcome recorded afterwards, and the log lines and hooks of a change.
//! A success on a closed breaker, the common case, takes no lock.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::{Breaker, BreakerConfig, BreakerState, Outcome, Transition};
use crate::error::{Error, ErrorKind, Result, RetryAfter};
use crate::hooks::{self, Hooks, NodeEvent};
use crate::info::NodeInfo;
use crate::sync::lock;

/// A node's circuit breaker as calls meet it.
#[derive(Debug)]
pub(crate) struct Gate {
    info: NodeInfo,
    hooks: Arc<Hooks>,
    breaker: Mutex<Breaker>,
    // Mirrors of the breaker for the lock-free fast path.
    state: AtomicU8,
    failures: AtomicU32,
}

/// Admission through a node's breaker; records the call's outcome, or
/// releases its trial slot if dropped without one (a panic in user code).
pub(crate) struct Permit<'a> {
    gate: &'a Gate,
    held_slot: bool,
    done: bool,
}

impl Permit<'_> {
    /// Records the outcome of the call from its result.
    pub(crate) fn finish<T>(self, result: &Result<T>) {
        match result {
            Ok(_) => self.settle(Outcome::Success),
            Err(e) => self.finish_error(e),
        }
    }

    /// Records a call that failed with `err`: a failure of the node only if
    /// it is a connection-level error.
    pub(crate) fn finish_error(self, err: &Error) {
        self.settle(if err.is_connection_error() {
            Outcome::Failure
        } else {
            Outcome::Success
        });
    }

    fn settle(mut self, outcome: Outcome) {
        self.done = true;
        self.gate.record(outcome, self.held_slot);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.gate.record(Outcome::Abandoned, self.held_slot);
        }
    }
}

impl Gate {
    pub(crate) fn new(config: BreakerConfig, info: NodeInfo, hooks: Arc<Hooks>) -> Gate {
        Gate {
            info,
            hooks,
            breaker: Mutex::new(Breaker::new(config)),
            state: AtomicU8::new(BreakerState::Closed.to_u8()),
            failures: AtomicU32::new(0),
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Relaxed))
    }

    /// Whether the breaker would let a call through now (no slot is taken).
    pub(crate) fn allows(&self) -> bool {
        self.state() == BreakerState::Closed || lock(&self.breaker).would_allow(Instant::now())
    }

    /// How long until an open breaker lets a call through.
    pub(crate) fn retry_after(&self) -> Duration {
        lock(&self.breaker).retry_after(Instant::now())
    }

    /// Asks the breaker to let a call through; fails fast when it is open.
    pub(crate) fn admit(&self) -> Result<Permit<'_>> {
        if self.state() == BreakerState::Closed {
            return Ok(Permit {
                gate: self,
                held_slot: false,
                done: false,
            });
        }
        let now = Instant::now();
        let (admitted, transition) = {
            let mut b = lock(&self.breaker);
            let r = b.try_acquire(now);
            self.mirror(&b);
            r
        };
        self.report(transition);
        match admitted {
            Ok(held_slot) => Ok(Permit {
                gate: self,
                held_slot,
                done: false,
            }),
            Err(wait) => Err(Error::new(ErrorKind::CircuitOpen)
                .with_node(&self.info)
                .with_source(RetryAfter(wait))),
        }
    }

    pub(crate) fn record(&self, outcome: Outcome, held_slot: bool) {
        // The common case, a success on a healthy node, takes no lock.
        if !held_slot
            && outcome != Outcome::Failure
            && self.state() == BreakerState::Closed
            && self.failures.load(Relaxed) == 0
        {
            return;
        }
        let transition = {
            let mut b = lock(&self.breaker);
            let t = b.record(outcome, held_slot, Instant::now());
            self.mirror(&b);
            t
        };
        self.report(transition);
    }

    /// A health probe reached the node: an open breaker closes.
    pub(crate) fn probe_succeeded(&self) {
        if self.state() == BreakerState::Closed {
            return;
        }
        let transition = {
            let mut b = lock(&self.breaker);
            let t = b.probe_succeeded(Instant::now());
            self.mirror(&b);
            t
        };
        self.report(transition);
    }

    fn mirror(&self, b: &Breaker) {
        self.state.store(b.state().to_u8(), Relaxed);
        self.failures.store(b.consecutive_failures(), Relaxed);
    }

    /// Logs a state change (never while the breaker lock is held).
    fn report(&self, transition: Option<Transition>) {
        if let Some(t) = transition {
            match t.to {
                BreakerState::Open => {
                    log::warn!("circuit breaker of {} opened (was {})", self.info, t.from)
                }
                _ => log::info!(
                    "circuit breaker of {} is {} (was {})",
                    self.info,
                    t.to,
                    t.from
                ),
            }
            let event = NodeEvent {
                node: &self.info,
                breaker: Some((t.from, t.to)),
                up: None,
                role: None,
            };
            hooks::notify(
                &self.hooks.on_breaker_state_change,
                "on_breaker_state_change",
                |hook| hook(&event),
            );
        }
    }
}
