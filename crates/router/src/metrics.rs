//! The router's `/metrics`, under the Production Stack router's names and labels (so its
//! Grafana dashboards and KEDA triggers work unchanged), plus real TTFT, ITL and
//! latency histograms per engine.
//!
//! Label sets are bounded: `server` by the engines, `model` by the models that exist
//! (never by whatever string a request sent), `error_type` by a fixed list.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use protocol::prom::{Counter, TextWriter};

use crate::engines::{Registry, Snapshot};

/// `(server, model, error_type)`.
type ErrorKey = (String, String, &'static str);

#[derive(Debug, Default)]
pub struct RouterMetrics {
    incoming: RwLock<HashMap<String, Arc<Counter>>>,
    errors: RwLock<HashMap<ErrorKey, Arc<Counter>>>,
}

fn get_or_insert<K: std::hash::Hash + Eq + Clone>(
    map: &RwLock<HashMap<K, Arc<Counter>>>,
    key: &K,
) -> Arc<Counter> {
    if let Some(c) = map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
        return c.clone();
    }
    map.write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.clone())
        .or_default()
        .clone()
}

impl RouterMetrics {
    /// A valid request for a known model arrived (`vllm:num_incoming_requests_total`).
    pub fn incoming(&self, model: &str) {
        if let Some(c) = self
            .incoming
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
        {
            c.inc();
            return;
        }
        get_or_insert(&self.incoming, &model.to_string()).inc();
    }

    /// A request failed. `server` is the engine URL ("" when none was reached).
    pub fn error(&self, server: &str, model: &str, error_type: &'static str) {
        get_or_insert(
            &self.errors,
            &(server.to_string(), model.to_string(), error_type),
        )
        .inc();
    }

    pub fn render(&self, registry: &Registry) -> String {
        let snap: Arc<Snapshot> = registry.snapshot();
        let mut w = TextWriter::new();
        let per_server = |w: &mut TextWriter,
                          name: &str,
                          help: &str,
                          f: &dyn Fn(&crate::engines::Endpoint) -> f64| {
            w.header(name, "gauge", help);
            for e in &snap.endpoints {
                w.sample(name, &[("server", &e.url)], f(e));
            }
        };
        let summaries: Vec<_> = snap.endpoints.iter().map(|e| e.stats.summary()).collect();
        let idx = |e: &crate::engines::Endpoint| {
            snap.endpoints
                .iter()
                .position(|x| std::ptr::eq(&**x, e))
                .unwrap_or(0)
        };
        per_server(
            &mut w,
            "vllm:current_qps",
            "Current Queries Per Second",
            &|e| summaries[idx(e)].qps,
        );
        per_server(
            &mut w,
            "vllm:avg_latency",
            "Average end-to-end request latency",
            &|e| summaries[idx(e)].avg_latency,
        );
        per_server(
            &mut w,
            "vllm:avg_itl",
            "Average Inter-Token Latency",
            &|e| summaries[idx(e)].avg_itl,
        );
        per_server(
            &mut w,
            "vllm:avg_ttft",
            "Average time to first token",
            &|e| summaries[idx(e)].avg_ttft,
        );
        per_server(
            &mut w,
            "vllm:avg_decoding_length",
            "Average Decoding Length",
            &|e| summaries[idx(e)].avg_decoding_length,
        );
        let rel = std::sync::atomic::Ordering::Relaxed;
        per_server(
            &mut w,
            "vllm:num_prefill_requests",
            "Number of Prefill Requests",
            &|e| e.in_prefill.load(rel) as f64,
        );
        per_server(
            &mut w,
            "vllm:num_decoding_requests",
            "Number of Decoding Requests",
            &|e| e.in_decode.load(rel) as f64,
        );
        per_server(
            &mut w,
            "vllm:num_requests_running",
            "Number of running requests",
            &|e| e.load.running.get(),
        );
        per_server(
            &mut w,
            "vllm:num_requests_waiting",
            "Number of waiting requests",
            &|e| e.load.waiting.get(),
        );
        per_server(
            &mut w,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage reported by the engine",
            &|e| e.load.kv_usage.get(),
        );
        per_server(
            &mut w,
            "vllm:gpu_prefix_cache_hits_total",
            "Total GPU Prefix Cache Hits",
            &|e| e.load.prefix_hits.get(),
        );
        per_server(
            &mut w,
            "vllm:gpu_prefix_cache_queries_total",
            "Total GPU Prefix Cache Queries",
            &|e| e.load.prefix_queries.get(),
        );
        per_server(
            &mut w,
            "vllm:gpu_prefix_cache_hit_rate",
            "GPU Prefix Cache Hit Rate",
            &|e| {
                let q = e.load.prefix_queries.get();
                if q > 0.0 {
                    e.load.prefix_hits.get() / q
                } else {
                    0.0
                }
            },
        );
        per_server(
            &mut w,
            "vllm:router_in_flight_requests",
            "Requests this router has in flight to the engine",
            &|e| e.in_flight.load(rel) as f64,
        );
        w.header(
            "vllm:healthy_pods_total",
            "gauge",
            "Number of healthy vLLM pods",
        );
        for e in &snap.endpoints {
            w.sample(
                "vllm:healthy_pods_total",
                &[("server", &e.url)],
                if e.is_healthy() { 1.0 } else { 0.0 },
            );
        }
        w.header(
            "vllm:num_incoming_requests_total",
            "counter",
            "Total valid incoming requests to router (including when no backends available).",
        );
        {
            let inc = self.incoming.read().unwrap_or_else(|p| p.into_inner());
            let mut keys: Vec<_> = inc.keys().collect();
            keys.sort();
            for k in keys {
                w.sample(
                    "vllm:num_incoming_requests_total",
                    &[("model", k)],
                    inc[k].get() as f64,
                );
            }
        }
        w.header(
            "vllm:request_errors_total",
            "counter",
            "Total request errors",
        );
        {
            let errs = self.errors.read().unwrap_or_else(|p| p.into_inner());
            let mut keys: Vec<_> = errs.keys().collect();
            keys.sort();
            for k in keys {
                w.sample(
                    "vllm:request_errors_total",
                    &[("server", &k.0), ("model", &k.1), ("error_type", k.2)],
                    errs[k].get() as f64,
                );
            }
        }
        let hist =
            |w: &mut TextWriter,
             name: &str,
             help: &str,
             f: &dyn Fn(&crate::engines::Endpoint) -> &protocol::prom::Histogram| {
                w.header(name, "histogram", help);
                for e in &snap.endpoints {
                    w.histogram(name, &[("server", &e.url)], f(e));
                }
            };
        hist(
            &mut w,
            "vllm:request_latency_seconds",
            "End-to-end request latency seen by the router",
            &|e| &e.latency,
        );
        hist(
            &mut w,
            "vllm:router_ttft_seconds",
            "Time to first token seen by the router",
            &|e| &e.ttft,
        );
        hist(
            &mut w,
            "vllm:router_itl_seconds",
            "Inter-token latency seen by the router",
            &|e| &e.itl,
        );
        w.finish()
    }
}
