//! Request tracing: W3C trace context, the per-request log line, and an optional OTLP/HTTP
//! JSON span exporter.
//!
//! - Every proxied request belongs to a trace: the caller's, when it sent a valid
//!   `traceparent` (its `tracestate` travels on untouched), else a new one. The router's
//!   own span is a child of the caller's; each upstream attempt is a new child span of the
//!   router's, and the engine receives `traceparent: 00-<trace>-<attempt span>-<flags>`.
//! - When a request ends (its response body finished, or an error answered), one line goes
//!   to the log at debug level under the target [`ACCESS_TARGET`] (`router::access`):
//!   request id, model, engine, status, latency, TTFT, trace id.
//! - `--otlp-traces-endpoint URL`: the router's span (kind server) and one span per
//!   upstream attempt (kind client) of every sampled trace are queued for an exporter
//!   task that POSTs them in batches as OTLP/HTTP JSON (`/v1/traces`). The queue is
//!   bounded: when it is full a span is dropped and counted, and the request path never
//!   waits on it.
//!
//! Nothing here is kept per request past the request: a [`Trail`] lives in the request's
//! response body and is gone with it.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, HeaderValue, Request};
use bytes::Bytes;
use http_body_util::Full;
use protocol::prom::{Counter, TextWriter};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use kv_events::hash::mix64;

use crate::upstream::{self, HttpClient, REQUEST_ID, TRACEPARENT};

/// The `tracing` target of the per-request log line.
pub const ACCESS_TARGET: &str = "router::access";

/// Spans the exporter queue holds before it drops new ones.
const QUEUE: usize = 8192;
/// Spans per OTLP request at most.
const MAX_BATCH: usize = 512;
/// How long the exporter waits to fill a batch after its first span.
const BATCH_DELAY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

fn id_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        mix64(t ^ u64::from(std::process::id()).rotate_left(32))
    })
}

/// A random non-zero 64-bit id (span ids; two make a trace id). Per thread, no locking.
pub fn new_id() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = const { Cell::new(0) };
    }
    STATE.with(|s| {
        let mut x = s.get();
        if x == 0 {
            static THREADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let t = THREADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            x = mix64(id_seed() ^ t.wrapping_mul(0xD1B5_4A32_D192_ED03)) | 1;
        }
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(x);
        match mix64(x) {
            0 => 1,
            id => id,
        }
    })
}

fn hex_u64(s: &[u8]) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    hex(s).map(|v| v as u64)
}

fn hex(s: &[u8]) -> Option<u128> {
    let mut v: u128 = 0;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u128::from(d);
    }
    Some(v)
}

/// A `traceparent` value: `(trace id, parent span id, flags)`, or None when it is not
/// valid per W3C Trace Context (lowercase hex; version `ff` and all-zero ids invalid; a
/// version above `00` may carry more fields after a `-`).
pub fn parse_traceparent(v: &[u8]) -> Option<(u128, u64, u8)> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex(&v[0..2])? as u8;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace = hex(&v[3..35])?;
    let parent = hex_u64(&v[36..52])?;
    let flags = hex(&v[53..55])? as u8;
    (trace != 0 && parent != 0).then_some((trace, parent, flags))
}

pub fn format_traceparent(trace: u128, span: u64, flags: u8) -> HeaderValue {
    let s = format!("00-{trace:032x}-{span:016x}-{flags:02x}");
    HeaderValue::from_maybe_shared(Bytes::from(s)).unwrap_or_else(|_| {
        HeaderValue::from_static("00-00000000000000000000000000000001-0000000000000001-00")
    })
}

/// A request's place in its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceCtx {
    pub trace_id: u128,
    /// The caller's span, when it sent a valid `traceparent`.
    pub parent: Option<u64>,
    /// The router's span for this request.
    pub span_id: u64,
    /// Trace flags sent on (only `sampled`, bit 0, is kept); a new trace is sampled.
    pub flags: u8,
}

impl TraceCtx {
    /// Continue the caller's trace, or start one.
    pub fn from_headers(h: &HeaderMap) -> Self {
        let incoming = h
            .get(TRACEPARENT)
            .and_then(|v| parse_traceparent(v.as_bytes()));
        match incoming {
            Some((trace_id, parent, flags)) => TraceCtx {
                trace_id,
                parent: Some(parent),
                span_id: new_id(),
                flags: flags & 1,
            },
            None => TraceCtx {
                trace_id: (u128::from(new_id()) << 64) | u128::from(new_id()),
                parent: None,
                span_id: new_id(),
                flags: 1,
            },
        }
    }

    /// The incoming `tracestate` travels on only with the caller's valid `traceparent`.
    pub fn keeps_state(&self) -> bool {
        self.parent.is_some()
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` an upstream attempt with span `span` carries.
    pub fn header_for(&self, span: u64) -> HeaderValue {
        format_traceparent(self.trace_id, span, self.flags)
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What a request needs to log and export itself when it ends. Made only when the
/// access log is enabled or an exporter is configured.
pub struct Trail {
    pub tel: Arc<Telemetry>,
    pub request_id: HeaderValue,
    pub model: String,
    /// The router span's name: `METHOD /path`.
    pub name: String,
    pub ctx: TraceCtx,
    pub start: Instant,
    start_unix_ns: u64,
}

impl Trail {
    pub fn new(
        tel: Arc<Telemetry>,
        request_id: HeaderValue,
        model: &str,
        name: String,
        ctx: TraceCtx,
        start: Instant,
    ) -> Self {
        let start_unix_ns = unix_nanos().saturating_sub(start.elapsed().as_nanos() as u64);
        Trail {
            tel,
            request_id,
            model: model.to_string(),
            name,
            ctx,
            start,
            start_unix_ns,
        }
    }

    fn unix_ns(&self, at: Instant) -> u64 {
        self.start_unix_ns + at.saturating_duration_since(self.start).as_nanos() as u64
    }

    /// An upstream attempt with span `span`, from `start` until now, ended with `status`
    /// (HTTP status, 0 when none came) and `error` (when it failed).
    pub fn attempt(
        &self,
        span: u64,
        engine: &str,
        start: Instant,
        status: u16,
        error: Option<&str>,
    ) {
        let Some(x) = self.tel.exporter() else { return };
        if !self.ctx.sampled() {
            return;
        }
        let mut attrs = vec![
            ("gen_ai.request.model", Attr::Str(self.model.clone())),
            ("switchyard.engine", Attr::Str(engine.to_string())),
        ];
        if status != 0 {
            attrs.push(("http.response.status_code", Attr::Int(i64::from(status))));
        }
        x.push(SpanRecord {
            trace_id: self.ctx.trace_id,
            span_id: span,
            parent: Some(self.ctx.span_id),
            name: "upstream".to_string(),
            kind: SPAN_KIND_CLIENT,
            start_ns: self.unix_ns(start),
            end_ns: unix_nanos(),
            error: error.map(str::to_string),
            attrs,
        });
    }

    /// The request ended (`completed`: its response reached its end): its log line and
    /// the router's span. `ttft`: when the first token passed.
    pub fn finish(
        &self,
        engine: &str,
        status: u16,
        ttft: Option<Instant>,
        attempts: u32,
        completed: bool,
    ) {
        let latency = self.start.elapsed().as_secs_f64();
        let ttft_s = ttft.map(|t| t.saturating_duration_since(self.start).as_secs_f64());
        tracing::debug!(
            target: ACCESS_TARGET,
            request_id = self.request_id.to_str().unwrap_or("-"),
            model = %self.model,
            engine,
            status,
            latency_s = latency,
            ttft_s,
            attempts,
            completed,
            trace_id = %format_args!("{:032x}", self.ctx.trace_id),
            "request"
        );
        let Some(x) = self.tel.exporter() else { return };
        if !self.ctx.sampled() {
            return;
        }
        let mut attrs = vec![
            ("gen_ai.request.model", Attr::Str(self.model.clone())),
            (
                "gen_ai.request.id",
                Attr::Str(self.request_id.to_str().unwrap_or("").to_string()),
            ),
            ("switchyard.engine", Attr::Str(engine.to_string())),
            ("http.response.status_code", Attr::Int(i64::from(status))),
            ("switchyard.attempts", Attr::Int(i64::from(attempts))),
            ("gen_ai.latency.e2e", Attr::F64(latency)),
        ];
        if let Some(t) = ttft_s {
            attrs.push(("gen_ai.latency.time_to_first_token", Attr::F64(t)));
        }
        x.push(SpanRecord {
            trace_id: self.ctx.trace_id,
            span_id: self.ctx.span_id,
            parent: self.ctx.parent,
            name: self.name.clone(),
            kind: SPAN_KIND_SERVER,
            start_ns: self.start_unix_ns,
            end_ns: unix_nanos(),
            error: if status >= 500 {
                Some(format!("HTTP {status}"))
            } else if !completed {
                Some("response cut short".to_string())
            } else {
                None
            },
            attrs,
        });
    }
}

/// Log a request answered before it was routed (bad body, unknown model, no engine).
pub fn log_rejected(headers: &HeaderMap, model: &str, status: u16, start: Instant) {
    tracing::debug!(
        target: ACCESS_TARGET,
        request_id = headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
        model,
        engine = "",
        status,
        latency_s = start.elapsed().as_secs_f64(),
        "request"
    );
}

const SPAN_KIND_SERVER: u8 = 2;
const SPAN_KIND_CLIENT: u8 = 3;

enum Attr {
    Str(String),
    Int(i64),
    F64(f64),
}

/// One finished span, as queued for export.
pub struct SpanRecord {
    trace_id: u128,
    span_id: u64,
    parent: Option<u64>,
    name: String,
    kind: u8,
    start_ns: u64,
    end_ns: u64,
    error: Option<String>,
    attrs: Vec<(&'static str, Attr)>,
}

impl SpanRecord {
    /// OTLP/JSON: ids as lowercase hex, times as decimal strings, enums as numbers.
    fn to_json(&self) -> Value {
        let attrs: Vec<Value> = self
            .attrs
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Attr::Str(s) => json!({ "stringValue": s }),
                    Attr::Int(i) => json!({ "intValue": i.to_string() }),
                    Attr::F64(f) => json!({ "doubleValue": f }),
                };
                json!({ "key": k, "value": value })
            })
            .collect();
        let mut span = json!({
            "traceId": format!("{:032x}", self.trace_id),
            "spanId": format!("{:016x}", self.span_id),
            "name": self.name,
            "kind": self.kind,
            "startTimeUnixNano": self.start_ns.to_string(),
            "endTimeUnixNano": self.end_ns.max(self.start_ns).to_string(),
            "attributes": attrs,
            "status": match &self.error {
                Some(m) => json!({ "code": 2, "message": m }),
                None => json!({ "code": 0 }),
            },
        });
        if let Some(p) = self.parent {
            span["parentSpanId"] = json!(format!("{p:016x}"));
        }
        span
    }
}

/// An OTLP/HTTP JSON request body holding `spans`.
pub fn otlp_body(spans: &[SpanRecord]) -> Value {
    json!({
        "resourceSpans": [{
            "resource": { "attributes": [
                { "key": "service.name", "value": { "stringValue": "switchyard-router" } },
                { "key": "service.version", "value": { "stringValue": env!("CARGO_PKG_VERSION") } },
            ]},
            "scopeSpans": [{
                "scope": { "name": "switchyard-router", "version": env!("CARGO_PKG_VERSION") },
                "spans": spans.iter().map(SpanRecord::to_json).collect::<Vec<_>>(),
            }],
        }]
    })
}

/// The exporter's queue and counters.
pub struct Exporter {
    url: String,
    tx: mpsc::Sender<SpanRecord>,
    rx: Mutex<Option<mpsc::Receiver<SpanRecord>>>,
    exported: Counter,
    dropped: Counter,
    failed: Counter,
    /// Spans taken off the queue and not yet posted (the batch being gathered or sent).
    busy: AtomicUsize,
}

impl Exporter {
    /// Queue a span; when the queue is full it is dropped (and counted), never awaited.
    fn push(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// Tracing settings and the exporter, shared by every worker thread.
#[derive(Default)]
pub struct Telemetry {
    exporter: Option<Exporter>,
}

impl Telemetry {
    /// `endpoint`: `--otlp-traces-endpoint` (`http://HOST:PORT[/path]`; without a path,
    /// `/v1/traces`).
    pub fn new(endpoint: Option<&str>) -> Result<Self, String> {
        let Some(raw) = endpoint.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(Telemetry::default());
        };
        let uri: axum::http::Uri = raw
            .parse()
            .map_err(|e| format!("--otlp-traces-endpoint {raw}: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(format!(
                "--otlp-traces-endpoint {raw}: an http://HOST:PORT URL is needed (OTLP/HTTP JSON; no TLS)"
            ));
        }
        let url = if matches!(uri.path(), "" | "/") {
            format!("{}/v1/traces", raw.trim_end_matches('/'))
        } else {
            raw.to_string()
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        Ok(Telemetry {
            exporter: Some(Exporter {
                url,
                tx,
                rx: Mutex::new(Some(rx)),
                exported: Counter::default(),
                dropped: Counter::default(),
                failed: Counter::default(),
                busy: AtomicUsize::new(0),
            }),
        })
    }

    fn exporter(&self) -> Option<&Exporter> {
        self.exporter.as_ref()
    }

    /// Whether requests should carry a [`Trail`]: the access log is on, or spans are
    /// exported.
    pub fn wants_trail(&self) -> bool {
        self.exporter.is_some() || tracing::enabled!(target: ACCESS_TARGET, tracing::Level::DEBUG)
    }

    /// Start the exporter task (on the current runtime), once.
    pub fn spawn(self: &Arc<Self>) {
        let Some(x) = &self.exporter else { return };
        let Some(rx) = x.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        tracing::info!(endpoint = %x.url, "exporting traces (OTLP/HTTP JSON)");
        tokio::spawn(export_loop(self.clone(), rx));
    }

    /// Wait (at most `within`) until every queued span has been posted: called at
    /// shutdown, after the last request finished, so its spans are not lost. A batch
    /// still gathering goes out when its delay ([`BATCH_DELAY`]) ends.
    pub async fn flush(&self, within: Duration) {
        let Some(x) = &self.exporter else { return };
        let deadline = tokio::time::Instant::now() + within;
        while (x.tx.capacity() < x.tx.max_capacity() || x.busy.load(Ordering::Acquire) > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `vllm:router_otlp_spans_total{outcome}` while an exporter is configured.
    pub fn render_metrics(&self, w: &mut TextWriter) {
        let Some(x) = &self.exporter else { return };
        const N: &str = "vllm:router_otlp_spans_total";
        w.header(
            N,
            "counter",
            "Spans handed to the OTLP exporter, by outcome",
        );
        for (outcome, c) in [
            ("exported", &x.exported),
            ("dropped", &x.dropped),
            ("failed", &x.failed),
        ] {
            w.sample(N, &[("outcome", outcome)], c.get() as f64);
        }
    }
}

async fn export_loop(tel: Arc<Telemetry>, mut rx: mpsc::Receiver<SpanRecord>) {
    let Some(x) = tel.exporter() else { return };
    let client = upstream::http_client(Duration::from_secs(3));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut warned = false;
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        // Set before the next await, so `flush` never sees an empty queue and no batch.
        x.busy.store(batch.len(), Ordering::Release);
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < MAX_BATCH {
            let room = MAX_BATCH - batch.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => x.busy.store(batch.len(), Ordering::Release),
            }
        }
        let body = Bytes::from(otlp_body(&batch).to_string());
        let n = batch.len() as u64;
        let posted = post(&client, &x.url, body).await;
        x.busy.store(0, Ordering::Release);
        match posted {
            Ok(()) => {
                x.exported.add(n);
                warned = false;
            }
            Err(e) => {
                x.failed.add(n);
                if !warned {
                    tracing::warn!(endpoint = %x.url, error = %e, "OTLP export failed; spans dropped");
                    warned = true;
                } else {
                    tracing::debug!(endpoint = %x.url, error = %e, "OTLP export failed");
                }
            }
        }
    }
}

async fn post(client: &HttpClient, url: &str, body: Bytes) -> Result<(), String> {
    let req = Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read the answer so the connection can be reused.
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("collector answered {status}"))
        }
    };
    tokio::time::timeout(EXPORT_TIMEOUT, fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing_follows_the_spec() {
        let ok = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(ok),
            Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1))
        );
        for bad in [
            &b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            b"",
        ] {
            assert_eq!(
                parse_traceparent(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A later version may append fields.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-ab")
                .is_some()
        );
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01ab")
                .is_none()
        );
    }

    #[test]
    fn context_continues_or_starts_a_trace() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03"),
        );
        let c = TraceCtx::from_headers(&h);
        assert_eq!(c.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(c.parent, Some(0x00f067aa0ba902b7));
        assert_eq!(c.flags, 1, "only the sampled flag is passed on");
        assert!(c.keeps_state());
        let span = new_id();
        let sent = c.header_for(span);
        let (t, p, f) = parse_traceparent(sent.as_bytes()).expect("valid");
        assert_eq!((t, p, f), (c.trace_id, span, 1));

        let fresh = TraceCtx::from_headers(&HeaderMap::new());
        let other = TraceCtx::from_headers(&HeaderMap::new());
        assert_ne!(fresh.trace_id, other.trace_id);
        assert_eq!(fresh.parent, None);
        assert!(fresh.sampled() && !fresh.keeps_state());
        assert!(parse_traceparent(fresh.header_for(new_id()).as_bytes()).is_some());
    }

    #[test]
    fn span_ids_are_unique_and_nonzero() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = new_id();
            assert_ne!(id, 0);
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn endpoint_urls_are_checked_and_completed() {
        assert!(Telemetry::new(None).expect("none").exporter.is_none());
        let t = Telemetry::new(Some("http://127.0.0.1:4318")).expect("ok");
        assert_eq!(
            t.exporter().expect("x").url,
            "http://127.0.0.1:4318/v1/traces"
        );
        let t = Telemetry::new(Some("http://c:4318/custom/traces")).expect("ok");
        assert_eq!(t.exporter().expect("x").url, "http://c:4318/custom/traces");
        assert!(Telemetry::new(Some("https://c:4318")).is_err());
        assert!(Telemetry::new(Some("c:4318")).is_err());
    }

    #[test]
    fn spans_encode_as_otlp_json() {
        let s = SpanRecord {
            trace_id: 0xab,
            span_id: 0xcd,
            parent: Some(0xef),
            name: "POST /v1/completions".into(),
            kind: SPAN_KIND_SERVER,
            start_ns: 10,
            end_ns: 20,
            error: Some("HTTP 502".into()),
            attrs: vec![
                ("gen_ai.request.model", Attr::Str("m".into())),
                ("http.response.status_code", Attr::Int(502)),
                ("gen_ai.latency.e2e", Attr::F64(0.5)),
            ],
        };
        let v = otlp_body(std::slice::from_ref(&s));
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], format!("{:032x}", 0xab));
        assert_eq!(span["spanId"], "00000000000000cd");
        assert_eq!(span["parentSpanId"], "00000000000000ef");
        assert_eq!(span["kind"], 2);
        assert_eq!(span["startTimeUnixNano"], "10");
        assert_eq!(span["status"]["code"], 2);
        assert_eq!(span["attributes"][1]["value"]["intValue"], "502");
        assert_eq!(span["attributes"][2]["value"]["doubleValue"], 0.5);
        assert_eq!(
            v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "switchyard-router"
        );
    }
}
