//! A circuit breaker per engine, fed by live traffic (the SGLang gateway's model and
//! defaults): **closed** (requests flow; consecutive failures are counted) → **open**
//! after `--cb-failure-threshold` of them (the engine gets no requests) → **half-open**
//! once `--cb-timeout-duration-secs` has passed (one trial request at a time goes
//! through) → **closed** after `--cb-success-threshold` successful trials, or open again
//! (for another cool-down) at the first failed one.
//!
//! A failure is a connect error, a reset, a 5xx before the first byte or a first-byte
//! timeout; a success is a response whose first byte arrived. The closed path is two
//! relaxed atomics; the lock is taken only on transitions and while open or half-open.
//! Health checks do not feed it (they have their own ejection, in [`super::Endpoint`]).

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

pub use crate::config::BreakerSettings;

/// The breaker's state, as the `vllm:router_circuit_breaker_state` gauge reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }
}

/// Whether a request may go to the engine, and if so whether it is the half-open trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Closed: go.
    Go,
    /// Half-open: this request is the trial; report its outcome (or
    /// [`Breaker::trial_abandoned`]).
    Trial,
    /// Open, or a trial is already out.
    Denied,
}

#[derive(Debug)]
struct Inner {
    opened_at: Instant,
    /// Successful trials since half-open.
    trial_oks: u32,
    trial_out: bool,
}

#[derive(Debug)]
pub struct Breaker {
    state: AtomicU8,
    fails: AtomicU32,
    inner: Mutex<Inner>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: AtomicU8::new(State::Closed as u8),
            fails: AtomicU32::new(0),
            inner: Mutex::new(Inner {
                opened_at: Instant::now(),
                trial_oks: 0,
                trial_out: false,
            }),
        }
    }
}

impl Breaker {
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, s: State) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// May a request go to the engine now? (Open past its cool-down turns half-open.)
    pub fn permit(&self, cfg: &BreakerSettings, now: Instant) -> Permit {
        if !cfg.enabled || self.state() == State::Closed {
            return Permit::Go;
        }
        let mut inner = self.lock();
        match self.state() {
            State::Closed => Permit::Go,
            State::Open if now.duration_since(inner.opened_at) < cfg.open_for => Permit::Denied,
            State::Open => {
                self.set(State::HalfOpen);
                inner.trial_oks = 0;
                inner.trial_out = true;
                Permit::Trial
            }
            State::HalfOpen if inner.trial_out => Permit::Denied,
            State::HalfOpen => {
                inner.trial_out = true;
                Permit::Trial
            }
        }
    }

    /// A trial ended without an outcome (the client went away): let another through.
    pub fn trial_abandoned(&self) {
        self.lock().trial_out = false;
    }

    /// A response's first byte arrived. True when this closed the breaker.
    pub fn on_success(&self, cfg: &BreakerSettings) -> bool {
        if self.state() == State::Closed {
            if self.fails.load(Ordering::Relaxed) != 0 {
                self.fails.store(0, Ordering::Relaxed);
            }
            return false;
        }
        if !cfg.enabled {
            return false;
        }
        let mut inner = self.lock();
        match self.state() {
            State::Closed => false,
            // A success while open (the request went there because every engine was
            // unavailable) counts as a first good trial.
            State::Open | State::HalfOpen => {
                inner.trial_out = false;
                inner.trial_oks += 1;
                self.set(State::HalfOpen);
                if inner.trial_oks >= cfg.success_threshold.max(1) {
                    self.fails.store(0, Ordering::Relaxed);
                    self.set(State::Closed);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// A request failed at the engine. True when this opened the breaker.
    pub fn on_failure(&self, cfg: &BreakerSettings, now: Instant) -> bool {
        if !cfg.enabled {
            return false;
        }
        if self.state() == State::Closed {
            let n = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
            if n < cfg.failure_threshold.max(1) {
                return false;
            }
        }
        let mut inner = self.lock();
        let was = self.state();
        inner.opened_at = now;
        inner.trial_out = false;
        inner.trial_oks = 0;
        self.set(State::Open);
        was != State::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> BreakerSettings {
        BreakerSettings {
            enabled: true,
            failure_threshold: 3,
            success_threshold: 2,
            open_for: Duration::from_secs(10),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_closes_after_trials() {
        let c = cfg();
        let b = Breaker::default();
        let t0 = Instant::now();
        assert!(!b.on_failure(&c, t0));
        assert!(!b.on_failure(&c, t0));
        assert!(!b.on_success(&c), "a success resets the count");
        assert!(!b.on_failure(&c, t0));
        assert!(!b.on_failure(&c, t0));
        assert!(b.on_failure(&c, t0), "third consecutive failure opens it");
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.permit(&c, t0 + Duration::from_secs(5)), Permit::Denied);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(b.permit(&c, later), Permit::Trial);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.permit(&c, later), Permit::Denied, "one trial at a time");
        assert!(!b.on_success(&c));
        assert_eq!(b.permit(&c, later), Permit::Trial);
        assert!(b.on_success(&c), "second good trial closes it");
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.permit(&c, later), Permit::Go);
    }

    #[test]
    fn a_failed_trial_reopens_and_an_abandoned_one_frees_the_slot() {
        let c = cfg();
        let b = Breaker::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            b.on_failure(&c, t0);
        }
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(b.permit(&c, t1), Permit::Trial);
        b.trial_abandoned();
        assert_eq!(b.permit(&c, t1), Permit::Trial);
        assert!(b.on_failure(&c, t1), "a failed trial opens it again");
        assert_eq!(b.permit(&c, t1 + Duration::from_secs(5)), Permit::Denied);
        assert_eq!(b.permit(&c, t1 + Duration::from_secs(11)), Permit::Trial);
    }

    #[test]
    fn disabled_always_permits() {
        let c = BreakerSettings {
            enabled: false,
            ..cfg()
        };
        let b = Breaker::default();
        for _ in 0..10 {
            assert!(!b.on_failure(&c, Instant::now()));
        }
        assert_eq!(b.permit(&c, Instant::now()), Permit::Go);
    }
}
