//! Room: where engines come from and how the router keeps up with them. The engine set
//! comes from a static list (flags, or the dynamic config file's, replaced when the file
//! changes: [`reload`]) or from the Kubernetes watch ([`k8s`]); either way the new set
//! goes through [`EngineSet::apply_engines`], the one way the set changes. Then the
//! background tasks: model discovery from each engine's `/v1/models` ([`models`]),
//! periodic health checks with ejection and readmission ([`health`]), and the
//! engine-stats scraper ([`scrape`]).
//!
//! The room is handed what it needs (the registry, the metrics whose series follow the
//! set, the settings, and a [`Reconfigure`] for the routing settings a reload changes),
//! never the router's state.

pub mod health;
pub mod k8s;
pub mod models;
pub mod reload;
pub mod scrape;

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;

use crate::config::{BackendSpec, Discovery, Dynamic, RouterArgs, Settings};
use crate::engines::{Endpoint, Registry};
use crate::observe::metrics::RouterMetrics;
use crate::upstream::{self, HttpClient};
pub use models::Joined;
pub use reload::Reconfigure;

/// How long [`start`] waits for the first Kubernetes LIST before serving anyway.
const K8S_SYNC_WAIT: Duration = Duration::from_secs(15);

/// The engine set and what must follow it: the registry, the metric series kept in step
/// with it, and what the router's own calls to engines need.
pub struct EngineSet {
    pub registry: Arc<Registry>,
    pub metrics: Arc<RouterMetrics>,
    /// `Authorization` for the router's own calls to engines (`VLLM_API_KEY`).
    pub auth: Option<HeaderValue>,
    connect_timeout: Duration,
}

impl EngineSet {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<RouterMetrics>,
        connect_timeout: Duration,
    ) -> Self {
        EngineSet {
            registry,
            metrics,
            auth: models::engine_auth_from_env(),
            connect_timeout,
        }
    }

    /// The one way the engine set changes (static lists at start and on every reload,
    /// each Kubernetes LIST and watch event): `specs` replace the set (an engine that
    /// stays keeps its `Endpoint`: health, load, statistics), the metric series follow,
    /// and every engine that joined without a configured model is asked for its models
    /// in the background (again for about a minute while it does not answer and is still
    /// in the set). Await [`Joined::models_asked`] to wait for the first answers.
    pub fn apply_engines(self: &Arc<Self>, specs: &[BackendSpec]) -> Joined {
        let joined = self.registry.apply(specs);
        self.metrics.sync(&self.registry);
        models::learn(self, joined)
    }

    /// This thread's upstream client.
    pub fn client(&self) -> HttpClient {
        upstream::thread_client(self.connect_timeout)
    }

    /// The client for probing or scraping `e`: this thread's, without keep-alive while
    /// `e` is ejected ([`HttpClient::unkept`]), so the checks do not hold open an engine
    /// that is shutting down.
    pub fn client_for(&self, e: &Endpoint) -> HttpClient {
        let c = self.client();
        if e.is_healthy() {
            c
        } else {
            c.unkept()
        }
    }
}

/// Find the first engines. Static: the configured backends become the set and are asked
/// for their models. Kubernetes: the watch starts, and this waits (at most 15 s) for its
/// first LIST and those engines' models, so a restarted router does not answer 404 for
/// models it has simply not seen yet.
pub async fn start(
    engines: &Arc<EngineSet>,
    k8s: &k8s::Watcher,
    config: &Dynamic,
) -> Result<(), String> {
    match &config.discovery {
        Discovery::Static => engines.apply_engines(&config.backends).models_asked().await,
        Discovery::K8s(k) => {
            let synced = k8s.start(k.clone())?;
            if tokio::time::timeout(K8S_SYNC_WAIT, synced).await.is_err() {
                tracing::warn!(
                    "Kubernetes discovery: no engine list after {K8S_SYNC_WAIT:?}; serving anyway"
                );
            }
        }
    }
    Ok(())
}

/// Start the background tasks: health checks, engine-stats scrapes and, with a dynamic
/// config file, its watcher (which changes the engine set, restarts or stops `k8s`, and
/// hands the routing settings to `routing`).
pub fn spawn_tasks(
    engines: &Arc<EngineSet>,
    k8s: Arc<k8s::Watcher>,
    settings: &Settings,
    args: &RouterArgs,
    routing: Arc<dyn Reconfigure>,
) {
    tokio::spawn(health::run(
        engines.clone(),
        settings.health_interval,
        settings.resilience.health_timeout,
        settings.health_successes,
        settings.health_failures,
    ));
    tokio::spawn(scrape::run(engines.clone(), settings.engine_stats_interval));
    if let Some(path) = settings.config_file.clone() {
        tokio::spawn(reload::run(reload::Reload {
            engines: engines.clone(),
            k8s,
            args: args.clone(),
            path,
            interval: settings.config_interval,
            current: settings.dynamic.clone(),
            routing,
        }));
    }
}

/// Every `interval` (a late tick is not made up), run `probe` on each engine of the set
/// as it is then, each in its own task so a slow engine delays no other; forever.
async fn each_engine_every<F, Fut>(engines: Arc<EngineSet>, interval: Duration, probe: F)
where
    F: Fn(Arc<EngineSet>, Arc<crate::engines::Endpoint>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = engines.registry.snapshot();
        for e in snap.endpoints.iter() {
            tokio::spawn(probe(engines.clone(), e.clone()));
        }
    }
}
