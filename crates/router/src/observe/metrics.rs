//! The router's `/metrics`, under the Production Stack router's names and labels (so its
//! Grafana dashboards and KEDA triggers work unchanged), plus real TTFT, ITL and
//! latency histograms per engine.
//!
//! Label sets are bounded: `server` by the engines, `model` by the models that exist
//! (never by whatever string a request sent), `error_type` by a fixed list.
//! [`RouterMetrics::sync`] keeps the per-model maps in step with the registry: a model's
//! counters exist at 0 from the moment it is known (Prometheus's `rate()` cannot see the
//! first increment of a series born at 1), and go when it is forgotten or its engine
//! leaves.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use protocol::prom::{Counter, TextWriter};

use crate::engines::{Registry, Snapshot};

/// `(server, model, error_type)`.
type ErrorKey = (String, String, &'static str);

/// A request for a known model found no healthy engine (counted with server "").
pub const NO_HEALTHY_ENGINE: &str = "no_healthy_engine";
/// What can go wrong at an engine (counted with its URL as `server`).
pub const ENGINE_ERRORS: [&str; 2] = ["timeout", "upstream_unavailable"];

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

    /// Make the per-model series match the registry: every known model has its incoming
    /// counter and every error series it can produce (`no_healthy_engine`; `timeout` and
    /// `upstream_unavailable` per engine serving it), at 0 until counted; series of models
    /// no longer known, or of engines that left, are dropped. So the maps hold at most
    /// the known models (bounded, see `engines::KNOWN_MODELS_CAP`) times the engines.
    /// Called when the engine set or its models change, and at every render.
    pub fn sync(&self, registry: &Registry) {
        let known: HashSet<String> = registry.known_models().into_iter().collect();
        let snap = registry.snapshot();
        let servers: HashSet<&str> = snap.endpoints.iter().map(|e| e.url.as_str()).collect();
        let in_sync = {
            let inc = self.incoming.read().unwrap_or_else(|p| p.into_inner());
            inc.len() == known.len() && known.iter().all(|m| inc.contains_key(m))
        };
        if !in_sync {
            let mut inc = self.incoming.write().unwrap_or_else(|p| p.into_inner());
            inc.retain(|m, _| known.contains(m));
            for m in &known {
                inc.entry(m.clone()).or_default();
            }
        }
        let mut wanted: Vec<ErrorKey> = known
            .iter()
            .map(|m| (String::new(), m.clone(), NO_HEALTHY_ENGINE))
            .collect();
        for e in &snap.endpoints {
            for m in e.models().iter().filter(|m| known.contains(*m)) {
                for t in ENGINE_ERRORS {
                    wanted.push((e.url.clone(), m.clone(), t));
                }
            }
        }
        let keep = |k: &ErrorKey| {
            known.contains(&k.1) && (k.0.is_empty() || servers.contains(k.0.as_str()))
        };
        let in_sync = {
            let errs = self.errors.read().unwrap_or_else(|p| p.into_inner());
            errs.keys().all(keep) && wanted.iter().all(|k| errs.contains_key(k))
        };
        if !in_sync {
            let mut errs = self.errors.write().unwrap_or_else(|p| p.into_inner());
            errs.retain(|k, _| keep(k));
            for k in wanted {
                errs.entry(k).or_default();
            }
        }
    }

    /// `vllm:num_incoming_requests_total` per model, by name.
    pub fn incoming_counts(&self) -> Vec<(String, u64)> {
        let inc = self.incoming.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = inc.iter().map(|(k, c)| (k.clone(), c.get())).collect();
        v.sort();
        v
    }

    /// `vllm:request_errors_total`: `((server, model, error_type), count)`.
    pub fn error_counts(&self) -> Vec<(ErrorKey, u64)> {
        let errs = self.errors.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = errs.iter().map(|(k, c)| (k.clone(), c.get())).collect();
        v.sort();
        v
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
        self.sync(registry);
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
            "vllm:router_circuit_breaker_state",
            "gauge",
            "Circuit breaker of the engine: 0 closed, 1 open, 2 half-open",
        );
        for e in &snap.endpoints {
            w.sample(
                "vllm:router_circuit_breaker_state",
                &[("server", &e.url)],
                f64::from(e.breaker.state() as u8),
            );
        }
        w.header(
            "vllm:router_engine_ejections_total",
            "counter",
            "Times the engine was taken out of rotation, by cause",
        );
        for e in &snap.endpoints {
            for cause in crate::engines::EjectCause::ALL {
                w.sample(
                    "vllm:router_engine_ejections_total",
                    &[("server", &e.url), ("cause", cause.label())],
                    e.ejections[cause as usize].get() as f64,
                );
            }
        }
        w.header(
            "vllm:router_engine_info",
            "gauge",
            "1 for each engine (server) and model it serves: joins the per-server series to models",
        );
        for e in &snap.endpoints {
            for m in e.models().iter() {
                w.sample(
                    "vllm:router_engine_info",
                    &[("server", &e.url), ("model", m)],
                    1.0,
                );
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;

    fn spec(url: &str, model: &str) -> BackendSpec {
        BackendSpec {
            url: url.into(),
            model: Some(model.into()),
            kv_events: None,
            label: None,
        }
    }

    #[test]
    fn known_models_start_at_zero_and_stay_bounded() {
        let r = Registry::new(10);
        r.apply(&[spec("http://a:1", "m"), spec("http://b:2", "n")]);
        let m = RouterMetrics::default();
        m.sync(&r);
        let page = m.render(&r);
        for line in [
            "vllm:num_incoming_requests_total{model=\"m\"} 0",
            "vllm:num_incoming_requests_total{model=\"n\"} 0",
            "vllm:request_errors_total{server=\"\",model=\"m\",error_type=\"no_healthy_engine\"} 0",
            "vllm:request_errors_total{server=\"http://a:1\",model=\"m\",error_type=\"timeout\"} 0",
            "vllm:request_errors_total{server=\"http://b:2\",model=\"n\",error_type=\"upstream_unavailable\"} 0",
            "vllm:router_engine_info{server=\"http://a:1\",model=\"m\"} 1",
            "vllm:router_engine_info{server=\"http://b:2\",model=\"n\"} 1",
        ] {
            assert!(page.contains(line), "{line} missing from\n{page}");
        }
        assert!(
            !page.contains("server=\"http://a:1\",model=\"n\""),
            "no series for a model the engine does not serve"
        );
        m.incoming("m");
        m.error("http://a:1", "m", "timeout");
        assert_eq!(m.incoming_counts(), vec![("m".into(), 1), ("n".into(), 0)]);

        // Engine b leaves: its series go; model n stays known (503s), so its own stay.
        r.apply(&[spec("http://a:1", "m")]);
        m.sync(&r);
        let errs = m.error_counts();
        assert!(
            errs.iter().all(|((s, _, _), _)| s != "http://b:2"),
            "{errs:?}"
        );
        assert!(errs.contains(&(("http://a:1".into(), "m".into(), "timeout"), 1)));
        assert!(errs.contains(&((String::new(), "n".into(), NO_HEALTHY_ENGINE), 0)));

        // Many models come and go: the maps stay within the known set.
        for i in 0..crate::engines::KNOWN_MODELS_CAP + 50 {
            r.remember(&format!("gone-{i}"));
            if i % 100 == 0 {
                m.sync(&r);
            }
        }
        m.sync(&r);
        assert_eq!(m.incoming_counts().len(), r.known_len());
        assert!(m.incoming_counts().len() <= crate::engines::KNOWN_MODELS_CAP + 1);
        assert_eq!(
            m.error_counts().len(),
            r.known_len() + ENGINE_ERRORS.len(),
            "one no_healthy_engine per known model, plus engine a's for m"
        );
        assert!(
            m.incoming_counts().iter().any(|(k, n)| k == "m" && *n == 1),
            "in use: kept"
        );
    }
}
