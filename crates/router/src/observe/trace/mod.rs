//! Request tracing. The room owns three things, one file each:
//! - [`context`]: W3C trace context. Every proxied request belongs to a trace: the
//!   caller's, when it sent a valid `traceparent` (its `tracestate` travels on
//!   untouched), else a new one. The router's own span is a child of the caller's; each
//!   upstream attempt is a new child span of the router's, and the engine receives
//!   `traceparent: 00-<trace>-<attempt span>-<flags>`.
//! - [`trail`]: the per-request [`Trail`]: when a request ends (its response body
//!   finished, or an error answered), one line goes to the log at debug level under the
//!   target [`ACCESS_TARGET`] (`router::access`), and its spans go to the exporter.
//! - [`otlp`]: `--otlp-traces-endpoint URL`: the router's span (kind server) and one span
//!   per upstream attempt (kind client) of every sampled trace are queued for an exporter
//!   task that POSTs them in batches as OTLP/HTTP JSON (`/v1/traces`), from a bounded
//!   queue that drops (and counts) when full; the request path never waits on it.
//!
//! Nothing here is kept per request past the request.

pub mod context;
pub mod otlp;
pub mod trail;

pub use context::{new_id, TraceCtx};
pub use otlp::Telemetry;
pub use trail::{log_rejected, Trail, ACCESS_TARGET};
