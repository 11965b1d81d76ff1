//! Per-key rate limits: requests per minute and tokens per minute, each a token bucket
//! that holds a minute's worth and refills continuously (rate = limit / 60 per second).
//! A request takes one request and its estimated tokens from both buckets at once, or
//! nothing: denied, it learns how long until both hold enough (`Retry-After`).
//!
//! Tokens are estimated before the request runs: the body's length / 4 (about four bytes
//! of JSON per token) plus `max_tokens` (or `max_completion_tokens`) × `n`. Nothing is
//! settled afterwards with the real usage.

use std::sync::Mutex;
use std::time::Instant;

use serde::Deserialize;

/// A key's limits, as the keys file writes them (absent: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }
}

/// The tokens a request is charged: `body_len / 4` for the prompt, plus what it may
/// generate.
pub fn estimate_tokens(body_len: usize, max_tokens: Option<u64>, n: Option<u64>) -> u64 {
    let prompt = (body_len / 4) as u64;
    let output = max_tokens
        .unwrap_or(0)
        .saturating_mul(n.unwrap_or(1).max(1));
    prompt.saturating_add(output)
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Over the requests-per-minute limit; enough refills in `retry_after` seconds.
    Requests { retry_after: u64 },
    /// Over the tokens-per-minute limit; enough refills in `retry_after` seconds.
    Tokens { retry_after: u64 },
    /// The request alone needs more tokens than a minute allows: never admitted.
    TooLarge { limit: u64, asked: u64 },
}

struct Levels {
    requests: f64,
    tokens: f64,
    at: Instant,
}

/// One key's buckets. Shared by every worker thread (a short mutex; no await under it).
pub struct Limiter {
    limits: Limits,
    levels: Mutex<Levels>,
}

/// Seconds (at least 1) until a bucket refilling `per_minute` gains `deficit`.
fn wait_secs(deficit: f64, per_minute: u64) -> u64 {
    let per_sec = per_minute as f64 / 60.0;
    if per_sec <= 0.0 {
        return 60;
    }
    ((deficit / per_sec).ceil() as u64).max(1)
}

impl Limiter {
    /// Full buckets.
    pub fn new(limits: Limits, now: Instant) -> Self {
        Limiter {
            limits,
            levels: Mutex::new(Levels {
                requests: limits.requests_per_minute.unwrap_or(0) as f64,
                tokens: limits.tokens_per_minute.unwrap_or(0) as f64,
                at: now,
            }),
        }
    }

    /// New limits for a key that had `old`: what it had used stays used (levels capped
    /// by the new sizes), so rewriting the file does not refill anyone.
    pub fn carried(limits: Limits, old: &Limiter, now: Instant) -> Self {
        let l = Limiter::new(limits, now);
        {
            let mut o = old.levels.lock().unwrap_or_else(|p| p.into_inner());
            old.refill(&mut o, now);
            let mut n = l.levels.lock().unwrap_or_else(|p| p.into_inner());
            if old.limits.requests_per_minute.is_some() {
                n.requests = n.requests.min(o.requests);
            }
            if old.limits.tokens_per_minute.is_some() {
                n.tokens = n.tokens.min(o.tokens);
            }
        }
        l
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn refill(&self, l: &mut Levels, now: Instant) {
        let dt = now.saturating_duration_since(l.at).as_secs_f64();
        l.at = now.max(l.at);
        if let Some(rpm) = self.limits.requests_per_minute {
            l.requests = (l.requests + dt * rpm as f64 / 60.0).min(rpm as f64);
        }
        if let Some(tpm) = self.limits.tokens_per_minute {
            l.tokens = (l.tokens + dt * tpm as f64 / 60.0).min(tpm as f64);
        }
    }

    /// Take one request and `tokens` from the buckets, or nothing.
    pub fn try_acquire(&self, tokens: u64, now: Instant) -> Result<(), Denied> {
        if let Some(tpm) = self.limits.tokens_per_minute {
            if tokens > tpm {
                return Err(Denied::TooLarge {
                    limit: tpm,
                    asked: tokens,
                });
            }
        }
        let mut l = self.levels.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut l, now);
        let req_wait = match self.limits.requests_per_minute {
            Some(rpm) if l.requests < 1.0 => wait_secs(1.0 - l.requests, rpm),
            _ => 0,
        };
        let tok_wait = match self.limits.tokens_per_minute {
            Some(tpm) if l.tokens < tokens as f64 => wait_secs(tokens as f64 - l.tokens, tpm),
            _ => 0,
        };
        if req_wait > 0 || tok_wait > 0 {
            return Err(if req_wait >= tok_wait {
                Denied::Requests {
                    retry_after: req_wait,
                }
            } else {
                Denied::Tokens {
                    retry_after: tok_wait,
                }
            });
        }
        if self.limits.requests_per_minute.is_some() {
            l.requests -= 1.0;
        }
        if self.limits.tokens_per_minute.is_some() {
            l.tokens -= tokens as f64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(rpm: Option<u64>, tpm: Option<u64>) -> Limits {
        Limits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    #[test]
    fn a_burst_of_the_limit_passes_then_one_more_waits_for_the_refill() {
        let t0 = Instant::now();
        let l = Limiter::new(limits(Some(60), None), t0);
        for _ in 0..60 {
            assert_eq!(l.try_acquire(0, t0), Ok(()));
        }
        assert_eq!(
            l.try_acquire(0, t0),
            Err(Denied::Requests { retry_after: 1 })
        );
        // One request per second refills continuously.
        assert!(l.try_acquire(0, t0 + Duration::from_millis(1001)).is_ok());
        assert!(l.try_acquire(0, t0 + Duration::from_millis(1002)).is_err());
    }

    #[test]
    fn tokens_are_checked_with_requests_and_taken_only_together() {
        let t0 = Instant::now();
        let l = Limiter::new(limits(Some(10), Some(600)), t0);
        assert!(l.try_acquire(500, t0).is_ok());
        // 100 left; 300 asked: 200 short at 10 tokens/s.
        assert_eq!(
            l.try_acquire(300, t0),
            Err(Denied::Tokens { retry_after: 20 })
        );
        // The refused request took nothing: 9 requests still pass.
        for _ in 0..9 {
            assert!(l.try_acquire(10, t0).is_ok());
        }
        assert!(matches!(l.try_acquire(0, t0), Err(Denied::Requests { .. })));
        assert_eq!(
            l.try_acquire(601, t0),
            Err(Denied::TooLarge {
                limit: 600,
                asked: 601
            })
        );
    }

    #[test]
    fn new_limits_keep_what_was_used() {
        let t0 = Instant::now();
        let old = Limiter::new(limits(Some(10), None), t0);
        for _ in 0..10 {
            assert!(old.try_acquire(0, t0).is_ok());
        }
        let new = Limiter::carried(limits(Some(100), None), &old, t0);
        assert!(
            new.try_acquire(0, t0).is_err(),
            "rewriting the file refilled"
        );
        let unlimited = Limiter::new(limits(None, None), t0);
        assert!(unlimited.try_acquire(1 << 40, t0).is_ok());
    }

    #[test]
    fn estimates_prompt_and_output() {
        assert_eq!(estimate_tokens(400, Some(50), None), 150);
        assert_eq!(estimate_tokens(400, Some(50), Some(3)), 250);
        assert_eq!(estimate_tokens(3, None, None), 0);
        assert_eq!(estimate_tokens(0, Some(u64::MAX), Some(2)), u64::MAX);
    }
}
