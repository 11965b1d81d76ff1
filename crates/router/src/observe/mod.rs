//! Room: what the router tells about itself. [`metrics`]: `/metrics` under the
//! Production Stack router's names; [`dashboard`]: the live status page; [`trace`]: W3C
//! trace context, the per-request log line and OTLP span export. It reads the engine set
//! (`engines`) and calls out through `upstream`; nothing here routes or discovers.

pub mod dashboard;
pub mod metrics;
pub mod trace;
