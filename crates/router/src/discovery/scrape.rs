//! The engine-stats scraper: every `--engine-stats-interval`, each engine's `/metrics` is
//! read for its load (running and waiting requests, KV-cache usage, prefix-cache hits and
//! queries) under vLLM's current and deprecated names, and an engine without a configured
//! model that is healthy is asked for its models again. An ejected engine is scraped
//! without keep-alive (`EngineSet::client_for`).

use std::sync::Arc;
use std::time::Duration;

use super::EngineSet;
use crate::engines::Endpoint;
use crate::upstream;

/// Scrape every engine every `interval`, forever.
pub async fn run(engines: Arc<EngineSet>, interval: Duration) {
    super::each_engine_every(engines, interval, |engines, e| async move {
        let url = format!("{}/metrics", e.url);
        let client = engines.client_for(&e);
        let got = upstream::get(&client, &url, Duration::from_secs(5), None).await;
        if let Ok((s, body)) = got {
            if s.is_success() {
                apply_scrape(&e, &body);
            }
        }
        if e.configured_model.is_none() && e.is_healthy() {
            engines.discover_models(&e).await;
        }
    })
    .await
}

/// Sum the samples of the load metrics on an engine's `/metrics` page. Accepts both the
/// current names and the deprecated `vllm:gpu_*` ones (current wins when both appear).
pub fn apply_scrape(e: &Endpoint, page: &[u8]) {
    let text = String::from_utf8_lossy(page);
    let mut v = [0f64; 7];
    let mut seen = [false; 7];
    const NAMES: [&str; 7] = [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
    ];
    let mut gpu_queries = (0f64, false);
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        let Ok(x) = value.trim().parse::<f64>() else {
            continue;
        };
        if name == "vllm:gpu_prefix_cache_queries_total" {
            gpu_queries = (gpu_queries.0 + x, true);
            continue;
        }
        if let Some(i) = NAMES.iter().position(|n| *n == name) {
            v[i] += x;
            seen[i] = true;
        }
    }
    let pick = |cur: usize, old: usize| if seen[cur] { v[cur] } else { v[old] };
    e.load.running.set(v[0]);
    e.load.waiting.set(v[1]);
    e.load.kv_usage.set(pick(2, 3));
    e.load.prefix_hits.set(pick(4, 5));
    e.load
        .prefix_queries
        .set(if seen[6] { v[6] } else { gpu_queries.0 });
    e.load
        .scraped
        .store(true, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendSpec;

    #[test]
    fn scrape_reads_current_and_deprecated_names() {
        let e = Endpoint::new(
            &BackendSpec {
                url: "http://a:1".into(),
                ..Default::default()
            },
            10,
            std::time::Instant::now(),
        );
        let vllm = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/vllm-reference/metrics.txt"
        ))
        .expect("fixture");
        apply_scrape(&e, &vllm);
        assert!(e.load.scraped.load(std::sync::atomic::Ordering::Relaxed));
        assert!(e.load.prefix_queries.get() > 0.0, "vLLM 0.32 names read");
        let old = b"vllm:num_requests_running{model_name=\"m\"} 3\nvllm:num_requests_waiting{model_name=\"m\"} 2\n\
vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\nvllm:gpu_prefix_cache_hits_total{model_name=\"m\"} 10\n\
vllm:gpu_prefix_cache_queries_total{model_name=\"m\"} 40\n";
        apply_scrape(&e, old);
        assert_eq!(
            (
                e.load.running.get(),
                e.load.waiting.get(),
                e.load.kv_usage.get(),
                e.load.prefix_hits.get(),
                e.load.prefix_queries.get()
            ),
            (3.0, 2.0, 0.5, 10.0, 40.0)
        );
    }
}
