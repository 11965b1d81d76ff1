//! Room: the front door. Before a request is routed: who sent it (API keys: `keys`),
//! whether it may (its models, its rate limits: `limits`) and whether the router takes
//! it now, later or not at all (the global concurrency limit and its queue: `queue`).
//!
//! The order in the request path (`api`): the key is checked from the headers before the
//! body is read (401); after the body: the model the key may use (403), the key's rate
//! limits (429 + `Retry-After`), then the gate (429 + `Retry-After` when the queue is
//! full, 408 after waiting `--queue-timeout-secs`). The gate's permit goes with the
//! response body ([`hold`]) and is returned when the body ends or is dropped.
//!
//! With keys on, the client's `Authorization` is not forwarded: engines get
//! `--engine-api-key` (default `$VLLM_API_KEY`), the key the router's own calls to
//! engines use. With keys off, the client's header passes through as before.
//!
//! Everything here is shared by the worker threads (each its own runtime): the key set
//! behind a lock swapped whole on a reload, buckets and counters behind `Arc`s.

pub mod keys;
pub mod limits;
pub mod queue;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Response};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use protocol::prom::{Counter, TextWriter};
use protocol::ApiError;

use crate::config::AdmissionArgs;
pub use keys::{Client, KeySet, Reason};
use limits::Denied;
use queue::{Gate, Permit, Refused};

/// A request turned away: its error and, when waiting helps, `Retry-After` seconds.
#[derive(Debug)]
pub struct Rejection {
    pub error: ApiError,
    pub retry_after: Option<u64>,
}

impl Rejection {
    fn new(status: u16, kind: &str, message: String, param: Option<&str>) -> Self {
        Rejection {
            error: ApiError::new(status, kind, message, param),
            retry_after: None,
        }
    }

    fn retry(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

/// Set `Retry-After: secs` on `resp` (nothing when `None`).
pub fn set_retry_after(resp: &mut Response<Body>, secs: Option<u64>) {
    if let Some(v) = secs.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
}

/// The keys in force and where they come from.
struct Keys {
    set: RwLock<Arc<KeySet>>,
    file: Option<PathBuf>,
    shared: Option<keys::Digest>,
    interval: Duration,
}

impl Keys {
    fn current(&self) -> Arc<KeySet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The set from the file as it is now (and `--api-key`), keeping counters and buckets.
    fn load(&self, previous: &KeySet) -> Result<KeySet, String> {
        let specs = match &self.file {
            None => Vec::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                keys::parse(path, &text).map_err(|e| format!("{}: {e}", path.display()))?
            }
        };
        KeySet::build(&specs, self.shared.as_ref(), previous)
    }
}

/// The front door's state: keys (when on), the gate (when on), and counters.
pub struct Admission {
    keys: Option<Keys>,
    gate: Option<Arc<Gate>>,
    engine_auth: Option<HeaderValue>,
    /// Requests without a valid key (`missing_key`, `invalid_key`).
    anonymous: keys::KeyStats,
    /// Requests the gate refused: queue full, timed out.
    queue_full: Counter,
    queue_timeout: Counter,
}

fn secs(v: f64, name: &str) -> Result<Duration, String> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("--{name} must be a positive number of seconds"))
    }
}

impl Admission {
    /// Validate the flags and read the keys file (a bad file at start is an error).
    pub fn from_args(args: &AdmissionArgs) -> Result<Self, String> {
        // An empty --api-key (say an unset variable in a script) must not open the door.
        let shared = match args.api_key.as_ref().map(|k| k.0.trim()) {
            Some("") => return Err("--api-key is empty".to_string()),
            Some(k) => Some(keys::sha256(k.as_bytes())),
            None => None,
        };
        let keys = if shared.is_some() || args.api_keys_file.is_some() {
            let k = Keys {
                set: RwLock::new(Arc::new(KeySet::default())),
                file: args.api_keys_file.clone(),
                shared,
                interval: secs(args.api_keys_interval, "api-keys-interval")?,
            };
            let set = k.load(&KeySet::default())?;
            if set.is_empty() {
                tracing::warn!("the API keys file lists no key: every request will get 401");
            }
            *k.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
            Some(k)
        } else {
            None
        };
        let gate = (args.max_concurrent_requests > 0)
            .then(|| {
                secs(args.queue_timeout_secs, "queue-timeout-secs")
                    .map(|t| Arc::new(Gate::new(args.max_concurrent_requests, args.queue_size, t)))
            })
            .transpose()?;
        let engine_auth = match args.engine_api_key.as_ref().map(|k| k.0.trim()) {
            Some(k) if !k.is_empty() => Some(
                HeaderValue::from_str(&format!("Bearer {k}"))
                    .map_err(|_| "--engine-api-key is not a header value".to_string())?,
            ),
            _ => None,
        };
        Ok(Admission {
            keys,
            gate,
            engine_auth,
            anonymous: keys::KeyStats::default(),
            queue_full: Counter::default(),
            queue_timeout: Counter::default(),
        })
    }

    /// Whether requests need a key.
    pub fn keys_on(&self) -> bool {
        self.keys.is_some()
    }

    /// `Authorization` for requests to engines (`--engine-api-key`).
    pub fn engine_auth(&self) -> Option<HeaderValue> {
        self.engine_auth.clone()
    }

    /// The caller, from `Authorization: Bearer KEY`: `Ok(None)` when keys are off;
    /// 401 when the key is missing or is no key.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Arc<Client>>, Rejection> {
        let Some(keys) = &self.keys else {
            return Ok(None);
        };
        let Some(token) = httpx::auth::bearer_token(headers) else {
            self.anonymous.reject(Reason::MissingKey);
            return Err(Rejection::new(
                401,
                "AuthenticationError",
                "You didn't provide an API key: send it as `Authorization: Bearer KEY`."
                    .to_string(),
                None,
            ));
        };
        let found = keys
            .set
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .lookup(token)
            .cloned();
        match found {
            Some(c) => {
                c.stats.requests.inc();
                Ok(Some(c))
            }
            None => {
                self.anonymous.reject(Reason::InvalidKey);
                Err(Rejection::new(
                    401,
                    "AuthenticationError",
                    "Incorrect API key provided.".to_string(),
                    None,
                ))
            }
        }
    }

    /// What `who` may do with this request: the model (`requested`, or `resolved` from
    /// an alias) must be one of its models (403), and its buckets must hold one request
    /// and `tokens` (429). `tokens` is asked for only when the key has limits.
    pub fn authorize(
        &self,
        who: Option<&Client>,
        requested: &str,
        resolved: &str,
        tokens: impl FnOnce() -> u64,
    ) -> Result<(), Rejection> {
        let Some(c) = who else { return Ok(()) };
        if !c.allows(requested, resolved) {
            c.stats.reject(Reason::ModelNotAllowed);
            return Err(Rejection::new(
                403,
                "PermissionDeniedError",
                format!(
                    "The API key `{}` may not use the model `{requested}`.",
                    c.name
                ),
                Some("model"),
            ));
        }
        let Some(limiter) = &c.limiter else {
            return Ok(());
        };
        let tokens = tokens();
        let limited = |reason: Reason, what: &str, limit: Option<u64>, secs: u64| {
            c.stats.reject(reason);
            Rejection::new(
                429,
                "RateLimitError",
                format!(
                    "Rate limit reached for the API key `{}` on {what}: limit {}. Retry in {secs} s.",
                    c.name,
                    limit.unwrap_or(0)
                ),
                None,
            )
            .retry(secs)
        };
        match limiter.try_acquire(tokens, Instant::now()) {
            Ok(()) => {
                c.stats.tokens.add(tokens);
                Ok(())
            }
            Err(Denied::Requests { retry_after }) => Err(limited(
                Reason::RequestsPerMinute,
                "requests per minute",
                limiter.limits().requests_per_minute,
                retry_after,
            )),
            Err(Denied::Tokens { retry_after }) => Err(limited(
                Reason::TokensPerMinute,
                "tokens per minute",
                limiter.limits().tokens_per_minute,
                retry_after,
            )),
            Err(Denied::TooLarge { limit, asked }) => {
                c.stats.reject(Reason::TokensPerMinute);
                Err(Rejection::new(
                    429,
                    "RateLimitError",
                    format!(
                        "Request too large for the API key `{}` on tokens per minute: limit {limit}, requested about {asked} (prompt bytes / 4 + max_tokens).",
                        c.name
                    ),
                    None,
                ))
            }
        }
    }

    /// A slot under `--max-concurrent-requests` (waiting in the queue if need be);
    /// `Ok(None)` when there is no limit. Hold the permit until the response ends.
    pub async fn enter(&self, who: Option<&Client>) -> Result<Option<Permit>, Rejection> {
        let Some(gate) = &self.gate else {
            return Ok(None);
        };
        match gate.enter().await {
            Ok(p) => Ok(Some(p)),
            Err(Refused::QueueFull { retry_after }) => {
                self.queue_full.inc();
                if let Some(c) = who {
                    c.stats.reject(Reason::QueueFull);
                }
                Err(Rejection::new(
                    429,
                    "RateLimitError",
                    "The router is at its limit of concurrent requests and its queue is full; retry later."
                        .to_string(),
                    None,
                )
                .retry(retry_after))
            }
            Err(Refused::Timeout) => {
                self.queue_timeout.inc();
                if let Some(c) = who {
                    c.stats.reject(Reason::QueueTimeout);
                }
                Err(Rejection::new(
                    408,
                    "RequestTimeoutError",
                    "The request waited in the router's queue for --queue-timeout-secs without being admitted."
                        .to_string(),
                    None,
                ))
            }
        }
    }

    /// With keys on, the headers sent to engines carry the engine key instead of the
    /// client's.
    pub fn upstream_headers(&self, headers: &mut HeaderMap) {
        if self.keys.is_none() {
            return;
        }
        headers.remove(header::AUTHORIZATION);
        if let Some(a) = &self.engine_auth {
            headers.insert(header::AUTHORIZATION, a.clone());
        }
    }

    /// Re-read the keys file every `--api-keys-interval` when its bytes changed; a file
    /// that does not read or parse keeps the keys in force (logged as an error). Runs on
    /// the current runtime forever.
    pub fn spawn_reload(self: &Arc<Self>) {
        let Some(path) = self.keys.as_ref().and_then(|k| k.file.clone()) else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let Some(keys) = &me.keys else { return };
            let mut last = std::fs::read(&path).ok();
            let mut tick = tokio::time::interval(keys.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = std::fs::read(&path).ok();
                if now == last {
                    continue;
                }
                last = now;
                let current = keys.current();
                match keys.load(&current) {
                    Ok(set) => {
                        tracing::info!(path = %path.display(), keys = set.clients().len(), "API keys reloaded");
                        *keys.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "API keys file not applied; keeping the keys in force")
                    }
                }
            }
        });
    }

    /// The front door's metric families: per key name (only names in force, plus
    /// `anonymous`), and the gate's when it is on.
    pub fn render(&self, w: &mut TextWriter) {
        if let Some(keys) = &self.keys {
            let set = keys.current();
            const REQ: &str = "vllm:router_api_key_requests_total";
            w.header(REQ, "counter", "Requests that presented each API key");
            for c in set.clients() {
                w.sample(REQ, &[("key", &c.name)], c.stats.requests.get() as f64);
            }
            const TOK: &str = "vllm:router_api_key_tokens_total";
            w.header(
                TOK,
                "counter",
                "Estimated tokens (prompt bytes / 4 + max_tokens) of the requests admitted, per API key",
            );
            for c in set.clients() {
                w.sample(TOK, &[("key", &c.name)], c.stats.tokens.get() as f64);
            }
            const REJ: &str = "vllm:router_api_key_rejections_total";
            w.header(REJ, "counter", "Requests refused, per API key and reason");
            for r in [Reason::MissingKey, Reason::InvalidKey] {
                w.sample(
                    REJ,
                    &[("key", keys::ANONYMOUS), ("reason", r.label())],
                    self.anonymous.rejected(r) as f64,
                );
            }
            for c in set.clients() {
                for r in &Reason::ALL[2..] {
                    w.sample(
                        REJ,
                        &[("key", &c.name), ("reason", r.label())],
                        c.stats.rejected(*r) as f64,
                    );
                }
            }
        }
        if let Some(g) = &self.gate {
            const INF: &str = "vllm:router_admission_in_flight";
            w.header(
                INF,
                "gauge",
                "Requests admitted under --max-concurrent-requests and not finished",
            );
            w.sample(INF, &[], g.in_flight() as f64);
            const Q: &str = "vllm:router_admission_queue_depth";
            w.header(Q, "gauge", "Requests waiting for admission");
            w.sample(Q, &[], g.queued() as f64);
            const REJ: &str = "vllm:router_admission_rejections_total";
            w.header(
                REJ,
                "counter",
                "Requests the admission queue refused, by reason",
            );
            w.sample(
                REJ,
                &[("reason", "queue_full")],
                self.queue_full.get() as f64,
            );
            w.sample(
                REJ,
                &[("reason", "queue_timeout")],
                self.queue_timeout.get() as f64,
            );
        }
    }
}

/// A response body that holds the admission permit until it ends or is dropped.
struct Held {
    inner: Body,
    _permit: Permit,
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `resp` with `permit` held by its body.
pub fn hold(resp: Response<Body>, permit: Option<Permit>) -> Response<Body> {
    match permit {
        None => resp,
        Some(p) => resp.map(|inner| Body::new(Held { inner, _permit: p })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(file: Option<PathBuf>, key: Option<&str>) -> AdmissionArgs {
        AdmissionArgs {
            api_keys_file: file,
            api_key: key.map(|k| crate::config::Secret(k.to_string())),
            engine_api_key: Some(crate::config::Secret("engine-k".into())),
            api_keys_interval: 1.0,
            max_concurrent_requests: 0,
            queue_size: 100,
            queue_timeout_secs: 60.0,
        }
    }

    fn bearer(k: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {k}")).unwrap(),
        );
        h
    }

    #[test]
    fn keys_off_lets_everyone_in_and_forwards_the_clients_header() {
        let a = Admission::from_args(&args(None, None)).unwrap();
        assert!(a.authenticate(&HeaderMap::new()).unwrap().is_none());
        let mut h = bearer("client");
        a.upstream_headers(&mut h);
        assert_eq!(h[header::AUTHORIZATION], "Bearer client");
    }

    #[test]
    fn an_empty_shared_key_is_refused() {
        assert!(Admission::from_args(&args(None, Some(" "))).is_err());
    }

    #[test]
    fn the_shared_key_is_checked_and_replaced_upstream() {
        let a = Admission::from_args(&args(None, Some("s3cret"))).unwrap();
        assert_eq!(
            a.authenticate(&HeaderMap::new()).unwrap_err().error.status,
            401
        );
        assert_eq!(
            a.authenticate(&bearer("nope")).unwrap_err().error.status,
            401
        );
        let who = a.authenticate(&bearer("s3cret")).unwrap().expect("caller");
        assert_eq!(&*who.name, keys::SHARED_NAME);
        let mut h = bearer("s3cret");
        a.upstream_headers(&mut h);
        assert_eq!(h[header::AUTHORIZATION], "Bearer engine-k");
        let mut w = TextWriter::new();
        a.render(&mut w);
        let page = w.finish();
        assert!(!page.contains("s3cret"));
        assert!(page.contains(
            "vllm:router_api_key_rejections_total{key=\"anonymous\",reason=\"invalid_key\"} 1"
        ));
    }
}
