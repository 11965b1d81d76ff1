//! Periodic health checks: every `--health-check-interval`, a `GET /health` to each engine,
//! given `--health-check-timeout-secs` to answer (a frozen process still accepts
//! connections: only the timeout tells). `--health-failure-threshold` consecutive
//! failures eject it (requests stop going there, and those waiting for its first byte
//! go elsewhere at once; failures of live requests count too, see `proxy`), `--health-success-threshold`
//! consecutive successes readmit it, and a readmitted engine without a configured model
//! is asked for its models again. Ejection and readmission flip the engine's own health
//! flag: the set (the registry's snapshot) stays as it is. An ejected engine is checked on
//! a new connection each time, closed once answered (`EngineSet::client_for`).

use std::sync::Arc;
use std::time::Duration;

use super::EngineSet;
use crate::engines::EjectCause;
use crate::upstream;

/// Check every engine every `interval`, forever.
pub async fn run(
    engines: Arc<EngineSet>,
    interval: Duration,
    timeout: Duration,
    successes: u32,
    failures: u32,
) {
    super::each_engine_every(engines, interval, move |engines, e| async move {
        let url = format!("{}/health", e.url);
        let ok = matches!(
            upstream::get(&engines.client_for(&e), &url, timeout, None).await,
            Ok((s, _)) if s.is_success()
        );
        if ok {
            if e.record_success(successes) {
                tracing::info!(engine = %e.url, "engine readmitted");
                if e.configured_model.is_none() {
                    engines.discover_models(&e).await;
                }
            }
        } else if e.record_failure(failures, EjectCause::HealthCheck) {
            tracing::warn!(engine = %e.url, "engine ejected: health checks failing");
        }
    })
    .await
}
