//! Where engines come from and how the router keeps up with them: static lists (from
//! flags or the dynamic config file, re-read when it changes) or the Kubernetes watch
//! (`k8s.rs`, the same `BackendSpec` lists into the same registry), model discovery from
//! each engine's `/v1/models` (LoRA adapters included; with `VLLM_API_KEY` as the bearer
//! token when set, as the Production Stack router does), periodic health checks (eject
//! after consecutive failures, readmit after successes), and the engine-stats scraper
//! that reads each engine's `/metrics` under vLLM's current and deprecated names.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;

use crate::config::Discovery;
use crate::engines::Endpoint;
use crate::upstream;
use crate::RouterState;

/// Ask every engine without a configured model which models it serves.
pub async fn refresh_models(state: &Arc<RouterState>) {
    let snap = state.registry.snapshot();
    let jobs = snap
        .endpoints
        .iter()
        .filter(|e| e.configured_model.is_none())
        .map(|e| {
            let state = state.clone();
            let e = e.clone();
            async move {
                discover_models(&state, &e).await;
            }
        });
    futures_util::future::join_all(jobs).await;
}

/// `Authorization` for the router's own calls to engines: `Bearer $VLLM_API_KEY` when
/// that is set (the key vLLM was started with).
pub fn engine_auth_from_env() -> Option<HeaderValue> {
    let key = std::env::var("VLLM_API_KEY").ok()?;
    let key = key.trim();
    if key.is_empty() {
        return None;
    }
    HeaderValue::from_str(&format!("Bearer {key}")).ok()
}

/// Ask `e` which models it serves and record them; true when it answered.
pub async fn discover_models(state: &RouterState, e: &Endpoint) -> bool {
    let url = format!("{}/v1/models", e.url);
    let auth = state.engine_auth.as_ref();
    match upstream::get(&state.proxy.client(), &url, Duration::from_secs(5), auth).await {
        Ok((s, body)) if s.is_success() => match serde_json::from_slice::<serde_json::Value>(&body)
        {
            Ok(v) => {
                let cards: Vec<serde_json::Value> =
                    v["data"].as_array().cloned().unwrap_or_default();
                let models: Vec<String> = cards
                    .iter()
                    .filter_map(|c| c["id"].as_str().map(str::to_string))
                    .collect();
                e.set_models(models.clone(), cards);
                for m in &models {
                    state.registry.remember(m);
                }
                state.metrics.sync(&state.registry);
                true
            }
            Err(err) => {
                tracing::warn!(engine = %e.url, error = %err, "bad /v1/models body");
                false
            }
        },
        Ok((s, _)) => {
            tracing::warn!(engine = %e.url, status = %s, "/v1/models failed");
            false
        }
        Err(err) => {
            tracing::debug!(engine = %e.url, error = %err, "/v1/models unreachable");
            false
        }
    }
}

pub fn spawn_tasks(state: Arc<RouterState>) {
    tokio::spawn(health_loop(state.clone()));
    tokio::spawn(scrape_loop(state.clone()));
    if state.settings.config_file.is_some() {
        tokio::spawn(config_loop(state));
    }
}

async fn health_loop(state: Arc<RouterState>) {
    let mut tick = tokio::time::interval(state.settings.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = state.settings.health_interval.min(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let snap = state.registry.snapshot();
        for e in snap.endpoints.iter() {
            let (state, e) = (state.clone(), e.clone());
            tokio::spawn(async move {
                let ok = matches!(
                    upstream::get(&state.proxy.client(), &format!("{}/health", e.url), timeout, None).await,
                    Ok((s, _)) if s.is_success()
                );
                if ok {
                    if e.record_success(state.settings.health_successes) {
                        tracing::info!(engine = %e.url, "engine readmitted");
                        if e.configured_model.is_none() {
                            discover_models(&state, &e).await;
                        }
                    }
                } else if e.record_failure(state.settings.health_failures) {
                    tracing::warn!(engine = %e.url, "engine ejected: health checks failing");
                }
            });
        }
    }
}

async fn scrape_loop(state: Arc<RouterState>) {
    let mut tick = tokio::time::interval(state.settings.engine_stats_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = state.registry.snapshot();
        for e in snap.endpoints.iter() {
            let (state, e) = (state.clone(), e.clone());
            tokio::spawn(async move {
                if let Ok((s, body)) = upstream::get(
                    &state.proxy.client(),
                    &format!("{}/metrics", e.url),
                    Duration::from_secs(5),
                    None,
                )
                .await
                {
                    if s.is_success() {
                        apply_scrape(&e, &body);
                    }
                }
                if e.configured_model.is_none() && e.is_healthy() {
                    discover_models(&state, &e).await;
                }
            });
        }
    }
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

async fn config_loop(state: Arc<RouterState>) {
    let Some(path) = state.settings.config_file.clone() else {
        return;
    };
    let mut last = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(state.settings.config_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        let parsed = crate::config::read_file(&path)
            .and_then(|f| crate::config::dynamic_from(&state.args, &f));
        match parsed {
            Ok(d) if d.discovery == Discovery::Static && d.backends.is_empty() => {
                tracing::warn!(path = %path.display(), "dynamic config lists no backends; keeping the current ones")
            }
            Ok(d) => {
                let current = state.dynamic().config.discovery.clone();
                if d == state.dynamic().config {
                    continue;
                }
                // A change of discovery (kind, namespace, selector, port...) restarts it:
                // a new watch lists and replaces the set (engines that stay keep their
                // state); back to static, the file's backends replace it.
                if d.discovery != current {
                    match &d.discovery {
                        Discovery::K8s(k) => {
                            if let Err(e) = crate::k8s::start(&state, k.clone()) {
                                tracing::warn!(error = %e, "dynamic config not applied");
                                continue;
                            }
                        }
                        Discovery::Static => crate::k8s::stop(&state),
                    }
                }
                tracing::info!(path = %path.display(), engines = d.backends.len(), "dynamic config reloaded");
                state.apply(d);
                refresh_models(&state).await;
            }
            Err(e) => tracing::warn!(error = %e, "dynamic config not applied"),
        }
    }
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
