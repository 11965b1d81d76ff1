//! End-to-end tests whose verdict compares real time with a model of it: `switchyard
//! plan`'s calibration, its virtual time against the same workload run for real, and its
//! recommendation run for real (see `plan.rs`). Their own test binary, so cargo runs them
//! after `it`'s, never beside its tests on the same cores, and one at a time
//! ([`serial`]): on a 2-core machine a neighbour's load is what they would measure.

#[allow(dead_code)]
#[path = "../it/common.rs"]
mod common;
mod plan;

/// Held for the whole of each test here: one at a time.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// [`serial`] for a test outside a runtime.
pub fn serial_blocking() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.blocking_lock()
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
