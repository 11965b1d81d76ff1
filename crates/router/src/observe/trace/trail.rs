//! The per-request trail: what a request needs to log and export itself when it ends.
//! One line goes to the log at debug level under the target [`ACCESS_TARGET`]
//! (`router::access`): request id, API key name (never the key), model, engine, status,
//! latency, TTFT, trace id; and,
//! with an exporter, the router's span (kind server) and one span per upstream attempt
//! (kind client) are queued for export. A [`Trail`] lives in the request's response body
//! and is gone with it.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue};

use super::context::TraceCtx;
use super::otlp::{Attr, SpanRecord, Telemetry, SPAN_KIND_CLIENT, SPAN_KIND_SERVER};
use crate::upstream::REQUEST_ID;

/// The `tracing` target of the per-request log line.
pub const ACCESS_TARGET: &str = "router::access";

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
    /// The API key's name, when keys are on.
    pub key: Option<Arc<str>>,
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
            key: None,
            start_unix_ns,
        }
    }

    /// Whether requests should carry a trail: the access log is on, or spans are
    /// exported.
    pub fn wanted(tel: &Telemetry) -> bool {
        tel.exporter().is_some() || tracing::enabled!(target: ACCESS_TARGET, tracing::Level::DEBUG)
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
            key = self.key.as_deref().unwrap_or(""),
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
        if let Some(k) = &self.key {
            attrs.push(("switchyard.api_key.name", Attr::Str(k.to_string())));
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

/// Log a request answered before it was routed (no or bad key, bad body, unknown model,
/// rate limited, no engine). `key`: the API key's name.
pub fn log_rejected(
    headers: &HeaderMap,
    key: Option<&str>,
    model: &str,
    status: u16,
    start: Instant,
) {
    tracing::debug!(
        target: ACCESS_TARGET,
        request_id = headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
        key = key.unwrap_or(""),
        model,
        engine = "",
        status,
        latency_s = start.elapsed().as_secs_f64(),
        "request"
    );
}
