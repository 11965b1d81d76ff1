//! Flags for engines that fail or hang: the health checks' own timeout, the circuit
//! breaker and retries with backoff and a budget. Names and defaults follow the SGLang
//! gateway's (`--cb-*`, `--retry-*`, `--health-check-timeout-secs`) where it has them.

use std::time::Duration;

use clap::Args;

use super::ConfigError;

#[derive(Debug, Clone, Args)]
pub struct ResilienceArgs {
    /// Seconds a health check may take before it counts as failed (a frozen engine still
    /// accepts connections: only this timeout tells).
    #[arg(long, default_value_t = 2.0)]
    pub health_check_timeout_secs: f64,
    /// Circuit breaker: consecutive failed requests (connect errors, resets, 5xx or
    /// first-byte timeouts) that open an engine's breaker; an open engine gets no
    /// requests.
    #[arg(long, default_value_t = 10)]
    pub cb_failure_threshold: u32,
    /// Circuit breaker: successful trial requests, one at a time, that close it again.
    #[arg(long, default_value_t = 3)]
    pub cb_success_threshold: u32,
    /// Circuit breaker: seconds it stays open before letting a trial request through.
    #[arg(long, default_value_t = 60.0)]
    pub cb_timeout_duration_secs: f64,
    /// Turn the circuit breaker off.
    #[arg(long)]
    pub disable_circuit_breaker: bool,
    /// Wait before the first retry, in milliseconds (then times
    /// --retry-backoff-multiplier each retry, up to --retry-max-backoff-ms, jittered).
    #[arg(long, default_value_t = 50)]
    pub retry_initial_backoff_ms: u64,
    /// The longest wait between retries, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub retry_max_backoff_ms: u64,
    /// Growth of the wait from one retry to the next.
    #[arg(long, default_value_t = 1.5)]
    pub retry_backoff_multiplier: f64,
    /// Each wait is drawn within ± this fraction of itself.
    #[arg(long, default_value_t = 0.2)]
    pub retry_jitter_factor: f64,
    /// No retries: one attempt per request (as --max-attempts 1).
    #[arg(long)]
    pub disable_retries: bool,
    /// Retry budget: retries may add at most this fraction of the requests of the last
    /// 10 s (beyond the floor below), so retries cannot multiply an overload.
    #[arg(long, default_value_t = 0.2)]
    pub retry_budget_ratio: f64,
    /// Retry budget floor: this many retries per second are always allowed (over the
    /// last 10 s), so a quiet router still retries.
    #[arg(long, default_value_t = 10.0)]
    pub retry_budget_min_per_sec: f64,
}

/// The breaker's knobs (`--cb-*`, `--disable-circuit-breaker`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    pub enabled: bool,
    /// Consecutive failures that open it.
    pub failure_threshold: u32,
    /// Successful trials in half-open that close it.
    pub success_threshold: u32,
    /// How long it stays open before letting a trial through.
    pub open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            enabled: true,
            failure_threshold: 10,
            success_threshold: 3,
            open_for: Duration::from_secs(60),
        }
    }
}

/// How retries wait and how many the budget allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    pub jitter: f64,
    pub budget_ratio: f64,
    pub budget_min_per_sec: f64,
}

/// The checked values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resilience {
    pub health_timeout: Duration,
    pub breaker: BreakerSettings,
    pub retry: RetrySettings,
    pub disable_retries: bool,
}

fn nonneg(v: f64, name: &str) -> Result<f64, ConfigError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(ConfigError::Invalid(format!(
            "--{name} must be a non-negative number"
        )))
    }
}

impl ResilienceArgs {
    pub fn settings(&self) -> Result<Resilience, ConfigError> {
        let health = nonneg(self.health_check_timeout_secs, "health-check-timeout-secs")?;
        let open_for = nonneg(self.cb_timeout_duration_secs, "cb-timeout-duration-secs")?;
        if health == 0.0 {
            return Err(ConfigError::Invalid(
                "--health-check-timeout-secs must be positive".into(),
            ));
        }
        let multiplier = nonneg(self.retry_backoff_multiplier, "retry-backoff-multiplier")?;
        let jitter = nonneg(self.retry_jitter_factor, "retry-jitter-factor")?;
        if multiplier < 1.0 || jitter > 1.0 {
            return Err(ConfigError::Invalid(
                "--retry-backoff-multiplier must be at least 1 and --retry-jitter-factor within 0..1"
                    .into(),
            ));
        }
        Ok(Resilience {
            health_timeout: Duration::from_secs_f64(health),
            breaker: BreakerSettings {
                enabled: !self.disable_circuit_breaker,
                failure_threshold: self.cb_failure_threshold.max(1),
                success_threshold: self.cb_success_threshold.max(1),
                open_for: Duration::from_secs_f64(open_for),
            },
            retry: RetrySettings {
                initial_backoff: Duration::from_millis(self.retry_initial_backoff_ms),
                max_backoff: Duration::from_millis(
                    self.retry_max_backoff_ms.max(self.retry_initial_backoff_ms),
                ),
                multiplier,
                jitter,
                budget_ratio: nonneg(self.retry_budget_ratio, "retry-budget-ratio")?,
                budget_min_per_sec: nonneg(
                    self.retry_budget_min_per_sec,
                    "retry-budget-min-per-sec",
                )?,
            },
            disable_retries: self.disable_retries,
        })
    }
}
