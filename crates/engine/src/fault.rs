//! Fault injection for resilience tests: hidden `switchyard engine` flags that make an
//! engine answer 500s or answer slowly, so the router's ejection, circuit breaker and
//! retries can be exercised against real processes (`it/chaos.rs`, `bench/chaos.sh`).
//! Hanging (SIGSTOP) and dying (SIGKILL) are done with signals on the process itself.
//!
//! Test knobs only: hidden from `--help`, off unless given. With `--fault-on-signal` the
//! faults stay off until the process receives SIGUSR1 (each SIGUSR1 toggles them), so a
//! test can turn a healthy engine faulty at a moment of its choosing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use clap::Args;
use protocol::ApiError;

/// The fault flags (hidden test knobs).
#[derive(Debug, Clone, Default, Args)]
pub struct FaultArgs {
    /// Test knob: answer this fraction (0..1) of generation requests (POST) with a 500
    /// before doing any work, as vLLM answers when its engine core fails.
    #[arg(long, default_value_t = 0.0, hide = true)]
    pub fault_http_500_rate: f64,
    /// Test knob: delay every response, `/health` included, by this many milliseconds
    /// (a slow or overloaded engine).
    #[arg(long, default_value_t = 0, hide = true)]
    pub fault_delay_ms: u64,
    /// Test knob: keep the faults off until SIGUSR1 (each SIGUSR1 toggles them).
    #[arg(long, hide = true)]
    pub fault_on_signal: bool,
}

impl FaultArgs {
    fn any(&self) -> bool {
        self.fault_http_500_rate > 0.0 || self.fault_delay_ms > 0
    }

    /// Check the values.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.fault_http_500_rate) {
            return Err("--fault-http-500-rate must be within 0..1".into());
        }
        Ok(())
    }
}

struct Faults {
    args: FaultArgs,
    on: AtomicBool,
    /// Counter-based draw for the 500 rate (deterministic, no RNG state to share).
    n: AtomicU64,
}

/// `router` with the faults of `args` in front of every route (unchanged when none is
/// asked for). With `--fault-on-signal`, call from within the runtime that serves it
/// (the SIGUSR1 listener is a task).
pub fn wrap(router: Router, args: &FaultArgs) -> Router {
    if !args.any() {
        return router;
    }
    let faults = Arc::new(Faults {
        args: args.clone(),
        on: AtomicBool::new(!args.fault_on_signal),
        n: AtomicU64::new(0),
    });
    tracing::warn!(?args, "fault injection configured (test knobs)");
    if args.fault_on_signal {
        let f = faults.clone();
        tokio::spawn(async move {
            let Ok(mut sig) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
            else {
                tracing::error!("cannot listen for SIGUSR1: faults stay off");
                return;
            };
            while sig.recv().await.is_some() {
                let was = f.on.fetch_xor(true, Ordering::Relaxed);
                tracing::warn!(on = !was, "faults toggled by SIGUSR1");
            }
        });
    }
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let f = faults.clone();
            async move { f.apply(req, next).await }
        },
    ))
}

impl Faults {
    async fn apply(&self, req: Request, next: Next) -> Response {
        if !self.on.load(Ordering::Relaxed) {
            return next.run(req).await;
        }
        if self.args.fault_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.args.fault_delay_ms)).await;
        }
        if req.method() == axum::http::Method::POST && self.draw_500() {
            return httpx::ErrorResponse(ApiError::internal(
                "EngineCore encountered an issue (injected fault).",
            ))
            .into_response();
        }
        next.run(req).await
    }

    /// Whether this request gets a 500: spread evenly at the configured rate.
    fn draw_500(&self) -> bool {
        let rate = self.args.fault_http_500_rate;
        if rate <= 0.0 {
            return false;
        }
        let n = self.n.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * rate).floor() > (n * rate).floor()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_500_rate_is_spread_evenly() {
        let f = Faults {
            args: FaultArgs {
                fault_http_500_rate: 0.25,
                ..FaultArgs::default()
            },
            on: AtomicBool::new(true),
            n: AtomicU64::new(0),
        };
        let hits = (0..100).filter(|_| f.draw_500()).count();
        assert_eq!(hits, 25);
        let all = Faults {
            args: FaultArgs {
                fault_http_500_rate: 1.0,
                ..FaultArgs::default()
            },
            on: AtomicBool::new(true),
            n: AtomicU64::new(0),
        };
        assert!((0..10).all(|_| all.draw_500()));
        assert!(FaultArgs {
            fault_http_500_rate: 2.0,
            ..FaultArgs::default()
        }
        .validate()
        .is_err());
    }
}
