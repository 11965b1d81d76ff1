//! Admission control: at most `--max-concurrent-requests` requests in the router at once
//! (from admission until their response body ends), the rest waiting in a bounded FIFO
//! queue (`--queue-size`) for at most `--queue-timeout-secs`: a full queue answers 429,
//! a wait that times out 408.
//!
//! One [`Gate`] serves every worker thread: a tokio semaphore (fair, FIFO, and usable
//! from any runtime) plus a counter of waiters that bounds the queue. A [`Permit`] goes
//! with the response body and returns its slot when dropped, however the response ends.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full; a slot may be free in about `retry_after` seconds.
    QueueFull { retry_after: u64 },
    /// It waited `--queue-timeout-secs` without a slot.
    Timeout,
}

pub struct Gate {
    sem: Arc<Semaphore>,
    max: usize,
    queue_size: usize,
    timeout: Duration,
    waiting: AtomicUsize,
    /// Moving average of how long a permit is held, in µs (for `Retry-After`).
    hold_us: AtomicU64,
}

/// A slot, held until dropped.
pub struct Permit {
    _permit: OwnedSemaphorePermit,
    gate: Arc<Gate>,
    since: Instant,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let us = self.since.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        // An estimate: a lost update between threads does not matter.
        let avg = self.gate.hold_us.load(Ordering::Relaxed);
        let next = if avg == 0 { us } else { avg - avg / 8 + us / 8 };
        self.gate.hold_us.store(next, Ordering::Relaxed);
    }
}

/// Removes a waiter from the count however the wait ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    /// `max` > 0 requests at once, `queue_size` waiting, each at most `timeout`.
    pub fn new(max: usize, queue_size: usize, timeout: Duration) -> Self {
        Gate {
            sem: Arc::new(Semaphore::new(max)),
            max,
            queue_size,
            timeout,
            waiting: AtomicUsize::new(0),
            hold_us: AtomicU64::new(0),
        }
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.max.saturating_sub(self.sem.available_permits())
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Seconds until the queue has likely moved by its length: the average hold time ×
    /// (queue + 1) / slots, within 1..=the queue timeout.
    fn retry_after(&self) -> u64 {
        let hold = self.hold_us.load(Ordering::Relaxed) as f64 / 1e6;
        let secs = (hold * (self.queue_size + 1) as f64 / self.max as f64).ceil() as u64;
        secs.clamp(1, self.timeout.as_secs().max(1))
    }

    /// A slot now, or after waiting in the queue.
    pub async fn enter(self: &Arc<Self>) -> Result<Permit, Refused> {
        let permit = |p| Permit {
            _permit: p,
            gate: self.clone(),
            since: Instant::now(),
        };
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Ok(permit(p));
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_size {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::QueueFull {
                retry_after: self.retry_after(),
            });
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(self.timeout, self.sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(permit(p)),
            // The semaphore is never closed; a timeout either way.
            Ok(Err(_)) | Err(_) => Err(Refused::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_queues_in_order_and_refuses_beyond_the_queue() {
        let g = Arc::new(Gate::new(1, 1, Duration::from_secs(5)));
        let first = g.enter().await.expect("a free slot");
        assert_eq!(g.in_flight(), 1);
        let g2 = g.clone();
        let queued = tokio::spawn(async move { g2.enter().await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(g.queued(), 1);
        assert!(matches!(g.enter().await, Err(Refused::QueueFull { .. })));
        assert_eq!(g.queued(), 1, "a refused request does not stay counted");
        drop(first);
        assert_eq!(queued.await.unwrap(), Ok(()));
        assert_eq!((g.in_flight(), g.queued()), (0, 0));
    }

    #[tokio::test]
    async fn a_wait_times_out() {
        let g = Arc::new(Gate::new(1, 4, Duration::from_millis(50)));
        let _held = g.enter().await.expect("slot");
        assert_eq!(g.enter().await.err(), Some(Refused::Timeout));
        assert_eq!(g.queued(), 0);
    }
}
