//! The per-request path: send the request to the first usable engine of the policy's
//! ranking and stream the response back untouched while a small observer records
//! first-token time, inter-token gaps and the end. The observer's drop releases the
//! engine's in-flight count however the response ends (finished, error, client gone),
//! and nothing per request outlives the request.
//!
//! Engines that fail or hang: nothing goes to the client before the engine's first byte
//! (the response head *and* the body's first frame), so until then the request can be
//! re-sent. Ejected engines and open circuit breakers are skipped (when every engine is
//! out, the policy's first choice is still tried); a connect error, reset, 5xx or 429
//! is retried on the next engine after a jittered exponential backoff while the retry
//! budget ([`retry`]) allows; failures count toward the engine's ejection and breaker.
//! A request waiting for the first byte of an engine that gets ejected (health checks,
//! failures of other requests, its breaker) is moved elsewhere at once instead of
//! waiting for `--first-byte-timeout`; a stream already started from it is cut once it
//! stays silent for `--health-check-timeout-secs`. Streams that started are never
//! re-sent.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use memchr::memmem;
use protocol::ApiError;
use tokio::sync::futures::OwnedNotified;

mod retry;

pub use retry::Retries;

use crate::config::BreakerSettings;
use crate::engines::breaker::{self, Permit};
use crate::engines::{EjectCause, Endpoint};
use crate::observe::metrics::RouterMetrics;
use crate::observe::trace::{self, Telemetry, TraceCtx, Trail};
use crate::upstream::{self, HttpClient, ENGINE_HEADER, REQUEST_ID, TRACEPARENT, TRACESTATE};

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those we set ourselves.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

/// What the proxy needs to know about one request.
pub struct Forward<'a> {
    pub method: Method,
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    pub request_id: HeaderValue,
    pub model: &'a str,
    pub stream: bool,
    /// The request's trace: each attempt sends a child span of it as `traceparent`.
    pub trace: TraceCtx,
    /// The body a mid-stream continuation starts from when it is not `body`
    /// (disaggregated decode: the client's, without `kv_transfer_params`).
    pub resume_body: Option<Bytes>,
}

pub struct Proxy {
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub max_attempts: usize,
    /// `--health-failure-threshold`: consecutive failed requests that eject an engine.
    pub failure_threshold: u32,
    /// `--health-check-timeout-secs`: how long a stream from an ejected engine may stay
    /// silent before it is cut.
    pub stall_timeout: Duration,
    pub breaker: BreakerSettings,
    /// Backoff and the retry budget.
    pub retries: Retries,
    pub metrics: Arc<RouterMetrics>,
    /// The access log and span export.
    pub telemetry: Arc<Telemetry>,
    /// Mid-stream failover settings and counters.
    pub resume: Arc<crate::resume::Resume>,
}

/// A failed attempt that another engine may retry: why, and the engine's status if it
/// answered.
struct Failure {
    message: String,
    status: u16,
}

impl Failure {
    fn new(message: String) -> Self {
        Failure { message, status: 0 }
    }
}

enum AttemptError {
    /// Nothing reached the client: the request may be retried. `engine_failed`: the
    /// engine is to blame (connect error, reset, 5xx), which counts toward its ejection
    /// and its circuit breaker; a 429 is back-pressure and does not.
    Retryable {
        failure: Failure,
        engine_failed: bool,
    },
    /// The engine was ejected (or its breaker opened) while the request waited for its
    /// first byte: it goes elsewhere at once.
    Moved,
    /// The engine took the request but sent no first byte in time.
    Timeout,
}

/// What an attempt got: the response head, its body, and the body's first frame (read
/// before anything goes to the client, so that until then the request can be re-sent).
struct Answer {
    parts: axum::http::response::Parts,
    body: Incoming,
    first: Option<Result<Frame<Bytes>, hyper::Error>>,
}

/// A half-open breaker's trial: freed if the attempt ends without an outcome.
struct TrialGuard<'a> {
    ep: &'a Endpoint,
    active: bool,
}

impl Drop for TrialGuard<'_> {
    fn drop(&mut self) {
        if self.active {
            self.ep.breaker.trial_abandoned();
        }
    }
}

impl Proxy {
    /// This thread's upstream client.
    pub fn client(&self) -> HttpClient {
        upstream::thread_client(self.connect_timeout)
    }

    /// The next engine of `ranked` to try, cycling from `next`: healthy and with its
    /// breaker letting the request through. When none is and nothing was tried yet, the
    /// policy's first choice anyway (a request is never refused only because every
    /// breaker is open: one of them may have recovered); returned with `false`, its
    /// ejection not watched.
    fn pick<'r>(
        &self,
        ranked: &'r [Arc<Endpoint>],
        next: &mut usize,
        first: bool,
    ) -> Option<(&'r Arc<Endpoint>, Permit, bool)> {
        let n = ranked.len();
        let now = Instant::now();
        for k in 0..n {
            let i = (*next + k) % n;
            let ep = &ranked[i];
            if !ep.is_healthy() {
                continue;
            }
            match ep.breaker.permit(&self.breaker, now) {
                Permit::Denied => continue,
                p => {
                    *next = i + 1;
                    return Some((ep, p, true));
                }
            }
        }
        if first {
            *next = 1;
            return ranked.first().map(|ep| (ep, Permit::Go, false));
        }
        None
    }

    /// A live request failed at `ep`: toward its ejection and its breaker.
    fn engine_failed(&self, ep: &Endpoint) {
        if ep.record_failure(self.failure_threshold, EjectCause::Traffic) {
            tracing::warn!(engine = %ep.url, "engine ejected after consecutive failed requests");
        }
        if ep.breaker.on_failure(&self.breaker, Instant::now()) {
            tracing::warn!(engine = %ep.url, "circuit breaker opened");
            ep.ejected(EjectCause::CircuitBreaker);
        }
    }

    /// Try engines of `ranked` in order (skipping ejected and open ones) until one sends
    /// a first byte; retry connect errors, resets, 5xx and 429 after a jittered backoff
    /// while the retry budget allows, and move a request whose engine is ejected while it
    /// waits at once. `trail` (when the access log or span export is on) goes with the
    /// response body and logs the request when it ends.
    pub async fn forward(
        &self,
        f: &Forward<'_>,
        ranked: &[Arc<Endpoint>],
        mut trail: Option<Box<Trail>>,
    ) -> Response<Body> {
        self.retries.on_request();
        let mut last_err = String::from("no engine was tried");
        let mut last_status = 502u16;
        let mut attempts = 0u32;
        let mut retries_after_failure = 0u32;
        let mut after_failure = false;
        let mut next = 0usize;
        let mut last_engine = "";
        // The last attempt was moved off an ejected engine: if every engine has been
        // ejected meanwhile (they may go in the same instant), the request still goes
        // to one and waits there rather than failing for want of anywhere to move.
        let mut moved = false;
        let mut moves = 0usize;
        while (attempts as usize) < self.max_attempts + moves {
            let Some((ep, permit, watch)) = self.pick(ranked, &mut next, attempts == 0 || moved)
            else {
                last_err = format!("no engine left to try ({last_err})");
                break;
            };
            if after_failure {
                if !self.retries.try_retry() {
                    last_err = format!("retry budget exhausted ({last_err})");
                    if permit == Permit::Trial {
                        ep.breaker.trial_abandoned();
                    }
                    break;
                }
                let salt = trace::new_id();
                tokio::time::sleep(self.retries.backoff(retries_after_failure, salt)).await;
                retries_after_failure += 1;
            }
            let mut trial = TrialGuard {
                ep,
                active: permit == Permit::Trial,
            };
            attempts += 1;
            last_engine = &ep.url;
            let span = trace::new_id();
            let mut obs = Observer::start(ep.clone(), f.stream);
            match self.attempt(f, ep, ranked, span, watch).await {
                Ok(answer) => {
                    trial.active = false;
                    ep.record_live_success();
                    if ep.breaker.on_success(&self.breaker) {
                        tracing::info!(engine = %ep.url, "circuit breaker closed");
                    }
                    if let Some(Ok(frame)) = &answer.first {
                        if let Some(d) = frame.data_ref() {
                            obs.on_data(d);
                        }
                    }
                    obs.status = answer.parts.status.as_u16();
                    obs.span = span;
                    obs.attempts = attempts;
                    obs.trail = trail.take();
                    let Answer {
                        mut parts,
                        body,
                        first,
                    } = answer;
                    strip_hop_by_hop(&mut parts.headers);
                    parts
                        .headers
                        .insert(HeaderName::from_static(REQUEST_ID), f.request_id.clone());
                    parts
                        .headers
                        .insert(HeaderName::from_static(ENGINE_HEADER), ep.header.clone());
                    let cut = f.stream.then(|| CutWatch {
                        unavailable: Box::pin(ep.unavailable.clone().notified_owned()),
                        stall: self.stall_timeout,
                        ranked: ranked.into(),
                        deadline: None,
                    });
                    let body = ObservedBody::new(body, obs, first, cut);
                    if let Some(origin) = crate::resume::origin(self, f, ranked, parts.status) {
                        let body = crate::resume::ResumableBody::new(
                            body,
                            ep.clone(),
                            self.resume.clone(),
                            origin,
                        );
                        return Response::from_parts(parts, Body::new(body));
                    }
                    return Response::from_parts(parts, Body::new(body));
                }
                Err(AttemptError::Timeout) => {
                    trial.active = false;
                    if let Some(t) = &trail {
                        t.attempt(span, &ep.url, obs.start, 0, Some("first-byte timeout"));
                        t.finish(&ep.url, 504, None, attempts, false);
                    }
                    obs.failed();
                    self.metrics.error(&ep.url, f.model, "timeout");
                    self.engine_failed(ep);
                    return error(ApiError::new(
                        504,
                        "GatewayTimeoutError",
                        format!(
                            "The engine did not answer within {:?}.",
                            self.first_byte_timeout
                        ),
                        None,
                    ));
                }
                Err(AttemptError::Moved) => {
                    if let Some(t) = &trail {
                        t.attempt(span, &ep.url, obs.start, 0, Some("engine ejected"));
                    }
                    obs.failed();
                    self.retries.moved.inc();
                    tracing::debug!(engine = %ep.url, "engine ejected before its first byte; moving the request");
                    last_err = format!("engine {} was ejected", ep.url);
                    after_failure = false;
                    moved = true;
                    // A move is not a retry: it does not use up an attempt, up to one
                    // move per engine.
                    if moves < ranked.len() {
                        moves += 1;
                    }
                }
                Err(AttemptError::Retryable {
                    failure,
                    engine_failed,
                }) => {
                    if let Some(t) = &trail {
                        t.attempt(
                            span,
                            &ep.url,
                            obs.start,
                            failure.status,
                            Some(&failure.message),
                        );
                    }
                    obs.failed();
                    self.metrics.error(&ep.url, f.model, "upstream_unavailable");
                    if engine_failed {
                        trial.active = false;
                        self.engine_failed(ep);
                    }
                    tracing::debug!(engine = %ep.url, error = %failure.message, "attempt failed; retrying");
                    last_err = failure.message;
                    last_status = if failure.status == 429 { 429 } else { 502 };
                    after_failure = true;
                    moved = false;
                }
            }
        }
        if let Some(t) = &trail {
            t.finish(last_engine, last_status, None, attempts, false);
        }
        if last_status == 429 {
            return error(ApiError::new(
                429,
                "RateLimitError",
                format!("The engines are overloaded: {last_err}"),
                None,
            ));
        }
        error(ApiError::new(
            502,
            "BadGatewayError",
            format!("No engine could take the request: {last_err}"),
            None,
        ))
    }

    /// One attempt at `ep`: send, wait for the response head and the body's first frame
    /// (at most `--first-byte-timeout`; with `watch`, only until the engine is ejected).
    async fn attempt(
        &self,
        f: &Forward<'_>,
        ep: &Endpoint,
        ranked: &[Arc<Endpoint>],
        span: u64,
        watch: bool,
    ) -> Result<Answer, AttemptError> {
        let retryable = |message: String| AttemptError::Retryable {
            failure: Failure::new(message),
            engine_failed: true,
        };
        let uri: Uri = format!("{}{}", ep.url, f.path_and_query)
            .parse()
            .map_err(|e| AttemptError::Retryable {
                failure: Failure::new(format!("bad upstream URI: {e}")),
                engine_failed: false,
            })?;
        let keep_state = f.trace.keeps_state();
        let traceparent = f.trace.header_for(span);
        let make = || {
            let mut req = Request::new(Full::new(f.body.clone()));
            *req.method_mut() = f.method.clone();
            *req.uri_mut() = uri.clone();
            let h = req.headers_mut();
            for (name, value) in f.headers {
                if !is_hop_by_hop(name)
                    && name != header::CONTENT_LENGTH
                    && name.as_str() != TRACEPARENT
                    && (keep_state || name.as_str() != TRACESTATE)
                {
                    h.append(name.clone(), value.clone());
                }
            }
            h.insert(HeaderName::from_static(REQUEST_ID), f.request_id.clone());
            h.insert(HeaderName::from_static(TRACEPARENT), traceparent.clone());
            req
        };
        // Registered before the request goes out, so an ejection from now on wakes it.
        let unavailable = ep.unavailable.notified();
        tokio::pin!(unavailable);
        if watch
            && (!ep.is_healthy() || ep.breaker.state() == breaker::State::Open)
            && another_serves(ranked, ep)
        {
            return Err(AttemptError::Moved);
        }
        let work = async {
            let resp = self
                .client()
                .send(make)
                .await
                .map_err(|e| retryable(e.to_string()))?;
            let status = resp.status();
            // A server error before any of the response reached the client: the engine
            // failed (vLLM answers 500 "EngineCore encountered an issue" to the requests
            // it holds when it shuts down), so another engine may serve it. 429: the
            // engine is overloaded; another may have room (not held against it).
            if matches!(
                status,
                StatusCode::INTERNAL_SERVER_ERROR
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
                    | StatusCode::TOO_MANY_REQUESTS
            ) {
                return Err(AttemptError::Retryable {
                    failure: Failure {
                        message: format!("engine answered {status}"),
                        status: status.as_u16(),
                    },
                    engine_failed: status != StatusCode::TOO_MANY_REQUESTS,
                });
            }
            let (parts, mut body) = resp.into_parts();
            // The first frame: until it is here nothing went to the client, so a reset
            // (the engine died) or an ejection (it hangs) can still go elsewhere.
            let first = if body.is_end_stream() {
                None
            } else {
                match body.frame().await {
                    Some(Err(e)) => {
                        return Err(retryable(format!("reset before the first byte: {e}")))
                    }
                    other => other,
                }
            };
            Ok(Answer { parts, body, first })
        };
        let work = tokio::time::timeout(self.first_byte_timeout, work);
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => return match r {
                    Err(_) => Err(AttemptError::Timeout),
                    Ok(r) => r,
                },
                _ = &mut unavailable, if watch => {
                    if another_serves(ranked, ep) {
                        return Err(AttemptError::Moved);
                    }
                    // The last engine standing (every one ejected at once: a starved
                    // machine, a network blip): failing the request helps no one, so it
                    // waits here for the first-byte timeout.
                    unavailable.set(ep.unavailable.notified());
                }
            }
        }
    }
}

/// Is there an engine in `ranked` other than `ep` that takes requests now (healthy, its
/// breaker not open)? When there is none, a request is not moved off `ep` and a silent
/// stream from it is not cut: there is nowhere better to go.
pub(crate) fn another_serves(ranked: &[Arc<Endpoint>], ep: &Endpoint) -> bool {
    ranked.iter().any(|o| {
        !std::ptr::eq(Arc::as_ptr(o), ep)
            && o.is_healthy()
            && o.breaker.state() != breaker::State::Open
    })
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let drop: Vec<HeaderName> = h.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for n in drop {
        h.remove(n);
    }
}

pub fn error(e: ApiError) -> Response<Body> {
    axum::response::IntoResponse::into_response(httpx::ErrorResponse(e))
}

/// Watches one response: in-flight accounting and timing. Created per attempt.
pub struct Observer {
    ep: Arc<Endpoint>,
    stream: bool,
    start: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    itl_sum: f64,
    itl_n: u64,
    tokens: u64,
    usage_tokens: Option<u64>,
    completed: bool,
    failed: bool,
    /// The engine's status, its attempt's span and number (for the trail).
    status: u16,
    span: u64,
    attempts: u32,
    trail: Option<Box<Trail>>,
}

impl Observer {
    pub(crate) fn start(ep: Arc<Endpoint>, stream: bool) -> Self {
        ep.in_flight.fetch_add(1, Ordering::Relaxed);
        ep.in_prefill.fetch_add(1, Ordering::Relaxed);
        ep.routed.inc();
        ep.stats.on_arrival();
        Observer {
            ep,
            stream,
            start: Instant::now(),
            first: None,
            last: None,
            itl_sum: 0.0,
            itl_n: 0,
            tokens: 0,
            usage_tokens: None,
            completed: false,
            failed: false,
            status: 0,
            span: 0,
            attempts: 0,
            trail: None,
        }
    }

    pub(crate) fn failed(mut self) {
        self.failed = true;
    }

    fn on_data(&mut self, d: &[u8]) {
        let now = Instant::now();
        let n = if self.stream {
            count_token_events(d)
        } else {
            u64::from(!d.is_empty())
        };
        if let Some(u) = find_completion_tokens(d) {
            self.usage_tokens = Some(u);
        }
        if n == 0 {
            return;
        }
        match self.last {
            None => {
                self.first = Some(now);
                let ttft = now.duration_since(self.start).as_secs_f64();
                self.ep.ttft.observe(ttft);
                self.ep.in_prefill.fetch_sub(1, Ordering::Relaxed);
                self.ep.in_decode.fetch_add(1, Ordering::Relaxed);
            }
            Some(last) => {
                let gap = now.duration_since(last).as_secs_f64();
                self.ep.itl.observe(gap);
                self.itl_sum += gap;
                self.itl_n += 1;
            }
        }
        self.last = Some(now);
        self.tokens += n;
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let ep = &self.ep;
        ep.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.first.is_some() {
            ep.in_decode.fetch_sub(1, Ordering::Relaxed);
        } else {
            ep.in_prefill.fetch_sub(1, Ordering::Relaxed);
        }
        if self.failed {
            return;
        }
        let latency = self.start.elapsed().as_secs_f64();
        if self.completed {
            ep.latency.observe(latency);
        }
        let ttft = self
            .first
            .map(|f| f.duration_since(self.start).as_secs_f64());
        let decoded = self
            .usage_tokens
            .unwrap_or(if self.stream { self.tokens } else { 0 });
        ep.stats
            .on_complete(latency, ttft, self.itl_sum, self.itl_n, decoded);
        if let Some(t) = self.trail.take() {
            let error = (!self.completed).then_some("response cut short");
            t.attempt(self.span, &ep.url, self.start, self.status, error);
            t.finish(
                &ep.url,
                self.status,
                self.first,
                self.attempts,
                self.completed,
            );
        }
    }
}

/// SSE events in `d` that carry a token: a non-empty `"content":"…"` (chat) or
/// `"text":"…"` (completions).
fn count_token_events(d: &[u8]) -> u64 {
    let mut n = 0;
    for pat in [&b"\"content\":\""[..], &b"\"text\":\""[..]] {
        for i in memmem::find_iter(d, pat) {
            if d.get(i + pat.len()).is_some_and(|&c| c != b'"') {
                n += 1;
            }
        }
    }
    n
}

fn find_completion_tokens(d: &[u8]) -> Option<u64> {
    const PAT: &[u8] = b"\"completion_tokens\":";
    let i = memmem::rfind(d, PAT)? + PAT.len();
    let digits: Vec<u8> = d[i..]
        .iter()
        .skip_while(|c| **c == b' ')
        .take_while(|c| c.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Boxed so a stream can end with our own error (a cut) as well as the engine's.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A stream cut because its engine was ejected and it then stayed silent.
#[derive(Debug, thiserror::Error)]
#[error("the engine was ejected and its stream stayed silent for {0:?}")]
struct StreamCut(Duration);

/// Watching a stream's engine: woken when it is ejected; then a silent stream is cut
/// after the stall timeout.
pub(crate) struct CutWatch {
    unavailable: Pin<Box<OwnedNotified>>,
    stall: Duration,
    /// The request's ranking: a stream is cut only when another engine could continue it.
    ranked: Arc<[Arc<Endpoint>]>,
    /// Armed once the engine is ejected: the stream's deadline, pushed back by each
    /// frame.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The upstream body, passed through frame by frame (never buffered) under observation.
pub(crate) struct ObservedBody {
    inner: Incoming,
    obs: Observer,
    /// What the inner body yielded after the frames merged into the last one (at the
    /// start: the first frame, read before the response went out).
    stashed: Option<Option<Result<Frame<Bytes>, BoxError>>>,
    cut: Option<CutWatch>,
}

/// Frames already read from the engine are merged up to this size, so a burst of SSE
/// chunks goes out in one write instead of one write per chunk.
const MERGE_LIMIT: usize = 64 * 1024;

impl ObservedBody {
    pub(crate) fn new(
        inner: Incoming,
        mut obs: Observer,
        first: Option<Result<Frame<Bytes>, hyper::Error>>,
        cut: Option<CutWatch>,
    ) -> Self {
        if first.is_none() || inner.is_end_stream() {
            obs.completed = true;
        }
        ObservedBody {
            inner,
            obs,
            stashed: Some(first.map(|r| r.map_err(BoxError::from))),
            cut,
        }
    }

    /// A body no frame of which was read yet, with no ejection watch (mid-stream
    /// failover's continuation, which has its own stall watch).
    pub(crate) fn fresh(inner: Incoming, obs: Observer) -> Self {
        ObservedBody {
            inner,
            obs,
            stashed: None,
            cut: None,
        }
    }

    fn observe(&mut self, polled: &Option<Result<Frame<Bytes>, hyper::Error>>) {
        match polled {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    self.obs.on_data(d);
                }
                // A body of known length ends without a final poll.
                if self.inner.is_end_stream() {
                    self.obs.completed = true;
                }
                if let Some(dl) = self.cut.as_mut().and_then(|c| {
                    let stall = c.stall;
                    c.deadline.as_mut().map(|d| (d, stall))
                }) {
                    dl.0.as_mut().reset(tokio::time::Instant::now() + dl.1);
                }
            }
            None => self.obs.completed = true,
            Some(Err(_)) => {}
        }
    }

    /// The engine has nothing for us now: is it time to cut the stream?
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(c) = self.cut.as_mut() else {
            return false;
        };
        if c.deadline.is_none() {
            loop {
                if c.unavailable.as_mut().poll(cx).is_pending() {
                    return false;
                }
                if another_serves(&c.ranked, &self.obs.ep) {
                    break;
                }
                // No engine to continue on: keep the stream, watch for the next ejection.
                c.unavailable = Box::pin(self.obs.ep.unavailable.clone().notified_owned());
            }
            // Ejected: silent since the last frame (or the start) for `stall` ends it.
            let since = self.obs.last.or(self.obs.first).unwrap_or(self.obs.start);
            c.deadline = Some(Box::pin(tokio::time::sleep_until(
                tokio::time::Instant::from_std(since + c.stall),
            )));
        }
        c.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(stashed) = this.stashed.take() {
            return Poll::Ready(stashed);
        }
        let first = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(p) => p,
            Poll::Pending => {
                if this.poll_cut(cx) {
                    let stall = this.cut.as_ref().map_or(Duration::ZERO, |c| c.stall);
                    tracing::warn!(engine = %this.obs.ep.url, "stream cut: its engine was ejected and it stayed silent");
                    this.cut = None;
                    return Poll::Ready(Some(Err(Box::new(StreamCut(stall)))));
                }
                return Poll::Pending;
            }
        };
        this.observe(&first);
        let Some(Ok(frame)) = first else {
            return Poll::Ready(first.map(|r| r.map_err(BoxError::from)));
        };
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(other) => return Poll::Ready(Some(Ok(other))),
        };
        // Merge data frames that are already here (no waiting for more).
        let mut merged: Option<bytes::BytesMut> = None;
        while !this.inner.is_end_stream()
            && merged.as_ref().map_or(data.len(), |m| m.len()) < MERGE_LIMIT
        {
            let next = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(p) => p,
                Poll::Pending => break,
            };
            this.observe(&next);
            match next {
                Some(Ok(f)) if f.is_data() => {
                    let Ok(more) = f.into_data() else { break };
                    merged
                        .get_or_insert_with(|| bytes::BytesMut::from(&data[..]))
                        .extend_from_slice(&more);
                }
                other => {
                    this.stashed = Some(other.map(|r| r.map_err(BoxError::from)));
                    break;
                }
            }
        }
        let out = merged.map_or(data, bytes::BytesMut::freeze);
        Poll::Ready(Some(Ok(Frame::data(out))))
    }

    fn is_end_stream(&self) -> bool {
        self.stashed.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.stashed.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_events_are_counted_and_empty_deltas_are_not() {
        let role = br#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(count_token_events(role), 0);
        let two = b"data: {\"choices\":[{\"delta\":{\"content\":\" a\"}}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\n";
        assert_eq!(count_token_events(two), 2);
        assert_eq!(
            find_completion_tokens(br#"{"usage":{"prompt_tokens":3,"completion_tokens": 17}}"#),
            Some(17)
        );
        assert_eq!(find_completion_tokens(b"nothing"), None);
    }
}
