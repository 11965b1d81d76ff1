//! OTLP/HTTP JSON span export (`--otlp-traces-endpoint URL`): the spans of sampled traces
//! are queued for an exporter task that POSTs them in batches to the collector
//! (`/v1/traces`). The queue is bounded: when it is full a span is dropped and counted,
//! and the request path never waits on it. [`Telemetry`] is the tracing settings and the
//! exporter, shared by every worker thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use protocol::prom::{Counter, TextWriter};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::upstream::{self, HttpClient};

/// Spans the exporter queue holds before it drops new ones.
const QUEUE: usize = 8192;
/// Spans per OTLP request at most.
const MAX_BATCH: usize = 512;
/// How long the exporter waits to fill a batch after its first span.
const BATCH_DELAY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) const SPAN_KIND_SERVER: u8 = 2;
pub(super) const SPAN_KIND_CLIENT: u8 = 3;

pub(super) enum Attr {
    Str(String),
    Int(i64),
    F64(f64),
}

/// One finished span, as queued for export.
pub struct SpanRecord {
    pub(super) trace_id: u128,
    pub(super) span_id: u64,
    pub(super) parent: Option<u64>,
    pub(super) name: String,
    pub(super) kind: u8,
    pub(super) start_ns: u64,
    pub(super) end_ns: u64,
    pub(super) error: Option<String>,
    pub(super) attrs: Vec<(&'static str, Attr)>,
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
    pub(super) fn push(&self, span: SpanRecord) {
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

    pub(super) fn exporter(&self) -> Option<&Exporter> {
        self.exporter.as_ref()
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
    let client = HttpClient::new(Duration::from_secs(3));
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
    let (status, _) = upstream::post_json(client, url, body, EXPORT_TIMEOUT, None).await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("collector answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
