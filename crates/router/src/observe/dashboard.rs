//! The live status page: `GET /dashboard` is one self-contained HTML page (inline CSS
//! and JS, compiled into the binary; nothing fetched from elsewhere) that polls
//! `GET /dashboard/data` every second and redraws: engines (health, QPS, TTFT/ITL as the
//! router measured them, requests in flight, the engine's running/waiting queue, KV-cache
//! usage and prefix-cache hit rate from the stats scrapes, requests routed), models
//! (engines, requests, errors, the current rate) and the policy's routing decisions.
//!
//! Everything is computed per call from state the router keeps anyway (the snapshot,
//! each engine's counters, window statistics and histograms, the metric maps): no
//! history is kept here; the page keeps its own two minutes of request rate.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Response};
use serde_json::{json, Value};

use super::metrics::RouterMetrics;
use crate::engines::Registry;

const PAGE: &str = include_str!("dashboard.html");

pub async fn page() -> Response<Body> {
    let mut r = Response::new(Body::from(PAGE));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// What the page shows, borrowed from the router's state for one call.
pub struct Sources<'a> {
    pub registry: &'a Registry,
    pub metrics: &'a RouterMetrics,
    /// The routing policy's name.
    pub routing_logic: &'static str,
    /// The policy's decisions so far by outcome (empty for policies that do not
    /// classify them).
    pub decisions: Vec<(&'static str, u64)>,
    /// `--request-stats-window`, seconds.
    pub stats_window_s: u64,
    /// `--engine-stats-interval`.
    pub scrape_interval: Duration,
}

/// The `/dashboard/data` answer (not cached).
pub fn data(src: &Sources<'_>) -> Response<Body> {
    let mut r = httpx::json_ok(&status(src));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[derive(Default)]
struct ModelRow {
    engines: u64,
    healthy: u64,
    requests: u64,
    errors: u64,
}

/// What `/dashboard/data` answers.
pub fn status(src: &Sources<'_>) -> Value {
    let snap = src.registry.snapshot();
    let incoming = src.metrics.incoming_counts();
    let errors = src.metrics.error_counts();
    let rel = Ordering::Relaxed;
    let mut models: BTreeMap<&str, ModelRow> = BTreeMap::new();
    for (m, n) in &incoming {
        models.entry(m).or_default().requests = *n;
    }
    for ((_, m, _), n) in &errors {
        models.entry(m).or_default().errors += n;
    }
    let served: Vec<Arc<[String]>> = snap.endpoints.iter().map(|e| e.models()).collect();
    for (e, ms) in snap.endpoints.iter().zip(&served) {
        for m in ms.iter() {
            let row = models.entry(m).or_default();
            row.engines += 1;
            row.healthy += u64::from(e.is_healthy());
        }
    }
    let q = |h: &protocol::prom::Histogram, p: f64| h.quantile(p);
    let mut total_qps = 0.0;
    let engines: Vec<Value> = snap
        .endpoints
        .iter()
        .zip(&served)
        .map(|(e, ms)| {
            let w = e.stats.summary();
            total_qps += w.qps;
            let queries = e.load.prefix_queries.get();
            let errs: u64 = errors
                .iter()
                .filter(|((s, _, _), _)| *s == e.url)
                .map(|(_, n)| n)
                .sum();
            json!({
                "url": e.url,
                "id": e.host_port,
                "models": &**ms,
                "healthy": e.is_healthy(),
                "in_flight": e.in_flight.load(rel),
                "prefill": e.in_prefill.load(rel),
                "decode": e.in_decode.load(rel),
                "routed": e.routed.get(),
                "completed": e.latency.count(),
                "errors": errs,
                "scraped": e.load.scraped.load(rel),
                "engine_running": e.load.running.get(),
                "engine_waiting": e.load.waiting.get(),
                "kv_usage": e.load.kv_usage.get(),
                "prefix_hit_rate": (queries > 0.0).then(|| e.load.prefix_hits.get() / queries),
                "qps": w.qps,
                "avg_ttft": w.avg_ttft,
                "avg_itl": w.avg_itl,
                "avg_latency": w.avg_latency,
                "ttft_p50": q(&e.ttft, 0.5),
                "ttft_p99": q(&e.ttft, 0.99),
                "itl_p50": q(&e.itl, 0.5),
                "itl_p99": q(&e.itl, 0.99),
            })
        })
        .collect();
    let decisions: Vec<Value> = src
        .decisions
        .iter()
        .map(|(outcome, count)| json!({"outcome": outcome, "count": count}))
        .collect();
    let models: Vec<Value> = models
        .into_iter()
        .map(|(name, r)| {
            json!({
                "name": name,
                "engines": r.engines,
                "healthy_engines": r.healthy,
                "requests": r.requests,
                "errors": r.errors,
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": src.registry.epoch.elapsed().as_secs_f64(),
        "stats_window_s": src.stats_window_s,
        "scrape_interval_s": src.scrape_interval.as_secs_f64(),
        "routing_logic": src.routing_logic,
        "totals": {
            "engines": snap.endpoints.len(),
            "healthy_engines": snap.endpoints.iter().filter(|e| e.is_healthy()).count(),
            "in_flight": snap.endpoints.iter().map(|e| e.in_flight.load(rel)).sum::<u64>(),
            "routed": snap.endpoints.iter().map(|e| e.routed.get()).sum::<u64>(),
            "qps": total_qps,
            "requests": incoming.iter().map(|(_, n)| n).sum::<u64>(),
            "errors": errors.iter().map(|(_, n)| n).sum::<u64>(),
        },
        "engines": engines,
        "models": models,
        "decisions": decisions,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_is_self_contained() {
        let page = super::PAGE;
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains("dashboard/data"), "it polls its data");
        for external in ["http://", "https://", "//cdn", "<link", "src=\""] {
            assert!(!page.contains(external), "page loads {external}");
        }
        assert!(page.len() < 16 * 1024, "small: {} bytes", page.len());
    }
}
