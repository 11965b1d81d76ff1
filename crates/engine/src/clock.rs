//! The engine's clock: the real one, or a tokio runtime's paused (virtual) clock.
//!
//! Every time the engine core reads (arrival, scheduling, token times, leases) comes from
//! [`now`], which is tokio's clock: outside a runtime, or in a runtime whose clock runs,
//! that is the system's monotonic clock; inside a runtime started paused (`switchyard
//! plan`'s discrete-event simulation) it is virtual time, which moves only when every task
//! waits on a timer. The same scheduler, block manager and sim backend thus run in real
//! time behind the HTTP API and in virtual time under the planner, with no second copy.

use std::time::Instant;

/// The current time (virtual under a paused runtime).
#[inline]
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
