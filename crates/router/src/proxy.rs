//! The per-request path: send the request to the first usable engine of the policy's
//! ranking, fail over on errors before response headers, and stream the response back
//! untouched while a small observer records first-token time, inter-token gaps and the
//! end. The observer's drop releases the engine's in-flight count however the response
//! ends (finished, error, client gone), and nothing per request outlives the request.

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
use http_body_util::Full;
use hyper::body::Incoming;
use memchr::memmem;
use protocol::ApiError;

use crate::engines::Endpoint;
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
}

pub struct Proxy {
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub max_attempts: usize,
    pub failure_threshold: u32,
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
    /// Nothing reached the client: the next engine may be tried.
    Retryable(Failure),
    /// The engine took the request but did not answer in time.
    Timeout,
}

impl Proxy {
    /// This thread's upstream client.
    pub fn client(&self) -> HttpClient {
        upstream::thread_client(self.connect_timeout)
    }

    /// Try `ranked` engines in order; return the first response with headers. `trail`
    /// (when the access log or span export is on) goes with the response body and logs
    /// the request when it ends.
    pub async fn forward(
        &self,
        f: &Forward<'_>,
        ranked: &[Arc<Endpoint>],
        mut trail: Option<Box<Trail>>,
    ) -> Response<Body> {
        let mut last_err = String::from("no engine was tried");
        let mut attempts = 0u32;
        let mut last_engine = "";
        for ep in ranked.iter().take(self.max_attempts) {
            attempts += 1;
            last_engine = &ep.url;
            let span = trace::new_id();
            let mut obs = Observer::start(ep.clone(), f.stream);
            match self.attempt(f, ep, span).await {
                Ok(resp) => {
                    obs.status = resp.status().as_u16();
                    obs.span = span;
                    obs.attempts = attempts;
                    obs.trail = trail.take();
                    let (mut parts, incoming) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    parts
                        .headers
                        .insert(HeaderName::from_static(REQUEST_ID), f.request_id.clone());
                    parts
                        .headers
                        .insert(HeaderName::from_static(ENGINE_HEADER), ep.header.clone());
                    let body = ObservedBody::new(incoming, obs);
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
                    if let Some(t) = &trail {
                        t.attempt(span, &ep.url, obs.start, 0, Some("first-byte timeout"));
                        t.finish(&ep.url, 504, None, attempts, false);
                    }
                    obs.failed();
                    self.metrics.error(&ep.url, f.model, "timeout");
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
                Err(AttemptError::Retryable(e)) => {
                    if let Some(t) = &trail {
                        t.attempt(span, &ep.url, obs.start, e.status, Some(&e.message));
                    }
                    obs.failed();
                    self.metrics.error(&ep.url, f.model, "upstream_unavailable");
                    if ep.record_failure(self.failure_threshold) {
                        tracing::warn!(engine = %ep.url, "engine ejected after failed requests");
                    }
                    tracing::debug!(engine = %ep.url, error = %e.message, "attempt failed; trying the next engine");
                    last_err = e.message;
                }
            }
        }
        if let Some(t) = &trail {
            t.finish(last_engine, 502, None, attempts, false);
        }
        error(ApiError::new(
            502,
            "BadGatewayError",
            format!("No engine could take the request: {last_err}"),
            None,
        ))
    }

    async fn attempt(
        &self,
        f: &Forward<'_>,
        ep: &Endpoint,
        span: u64,
    ) -> Result<Response<Incoming>, AttemptError> {
        let uri: Uri = format!("{}{}", ep.url, f.path_and_query)
            .parse()
            .map_err(|e| AttemptError::Retryable(Failure::new(format!("bad upstream URI: {e}"))))?;
        let mut req = Request::new(Full::new(f.body.clone()));
        *req.method_mut() = f.method.clone();
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        let keep_state = f.trace.keeps_state();
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
        h.insert(
            HeaderName::from_static(TRACEPARENT),
            f.trace.header_for(span),
        );
        let resp =
            match tokio::time::timeout(self.first_byte_timeout, self.client().request(req)).await {
                Err(_) => return Err(AttemptError::Timeout),
                Ok(Err(e)) => return Err(AttemptError::Retryable(Failure::new(e.to_string()))),
                Ok(Ok(r)) => r,
            };
        // A server error before any of the response reached the client: the engine failed
        // (vLLM answers 500 "EngineCore encountered an issue" to the requests it holds when
        // it shuts down), so another engine may serve it. A stream that already started
        // (200 and SSE headers) is never retried.
        if matches!(
            resp.status(),
            StatusCode::INTERNAL_SERVER_ERROR
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        ) {
            return Err(AttemptError::Retryable(Failure {
                message: format!("engine answered {}", resp.status()),
                status: resp.status().as_u16(),
            }));
        }
        Ok(resp)
    }
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

/// The upstream body, passed through frame by frame (never buffered) under observation.
pub(crate) struct ObservedBody {
    inner: Incoming,
    obs: Observer,
    /// What the inner body yielded after the frames merged into the last one.
    stashed: Option<Option<Result<Frame<Bytes>, hyper::Error>>>,
}

/// Frames already read from the engine are merged up to this size, so a burst of SSE
/// chunks goes out in one write instead of one write per chunk.
const MERGE_LIMIT: usize = 64 * 1024;

impl ObservedBody {
    pub(crate) fn new(inner: Incoming, obs: Observer) -> Self {
        ObservedBody {
            inner,
            obs,
            stashed: None,
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
            }
            None => self.obs.completed = true,
            Some(Err(_)) => {}
        }
    }
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = hyper::Error;

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
            Poll::Pending => return Poll::Pending,
        };
        this.observe(&first);
        let Some(Ok(frame)) = first else {
            return Poll::Ready(first);
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
                    this.stashed = Some(other);
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
