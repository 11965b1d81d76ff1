//! The Switchyard router: one OpenAI endpoint in front of many engines and models.
//!
//! - [`config`]: flags (the Production Stack router's) and the dynamic config file.
//! - [`engines`]: the engine set (identity, models, health, load, stats) as snapshots.
//! - [`discovery`]: where engines come from (static lists), model discovery, health
//!   checks, engine-stats scraping and config reloads: the background tasks.
//! - [`k8s`]: Kubernetes discovery: the engine set follows a LIST + WATCH of the pods (or
//!   Services) matching a label selector.
//! - [`policy`]: routing policies ranking engines per request.
//! - [`kv_index`], [`kv_subscriber`]: the engines' KV-cache events behind `kvaware`.
//! - [`prefix_tree`]: the approximate prefix tree behind `prefixaware` routing.
//! - [`proxy`]: the per-request forwarding path with failover and observation.
//! - [`stats`]: constant-memory sliding-window request statistics.
//! - [`metrics`]: the router's `/metrics`.
//! - [`trace`]: W3C trace context, the per-request log line, OTLP span export.
//! - [`dashboard`]: the live status page (`/dashboard`).
//! - [`api`]: the HTTP surface.

pub mod api;
pub mod config;
pub mod discovery;
pub mod engines;
pub mod k8s;
pub mod kubeconfig;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

pub use config::RouterArgs;
use config::{Discovery, Dynamic, Settings};
use engines::Registry;
use observe::metrics::RouterMetrics;
use policy::kvaware::{self, KvState};
use policy::Policy;
use proxy::Proxy;

/// The settings that can change while running, swapped whole on a reload.
pub struct DynState {
    pub config: Dynamic,
    pub policy: Box<dyn Policy>,
    pub session_key: Option<String>,
}

impl DynState {
    fn new(config: Dynamic, kv: &Arc<KvState>) -> Self {
        DynState {
            policy: policy::build(
                config.routing_logic,
                config.prefix,
                kv,
                config.kv_overlap_weight,
                config.kv_min_match,
            ),
            session_key: config.session_key.clone(),
            config,
        }
    }
}

pub struct RouterState {
    pub args: RouterArgs,
    pub settings: Settings,
    pub registry: Arc<Registry>,
    pub metrics: Arc<RouterMetrics>,
    pub proxy: Proxy,
    /// The KV-cache index and `kvaware` metrics (kept across reloads).
    pub kv: Arc<KvState>,
    dynamic: RwLock<Arc<DynState>>,
    /// Per-process random seed (request ids, randomized policies).
    pub seed: u64,
    /// `Authorization` for the router's own calls to engines (`VLLM_API_KEY`).
    pub engine_auth: Option<axum::http::HeaderValue>,
    /// The Kubernetes watcher, while `--service-discovery k8s`.
    pub k8s: k8s::Control,
}

impl RouterState {
    pub fn dynamic(&self) -> Arc<DynState> {
        self.dynamic
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Apply new dynamic settings: engines kept keep their state; requests in flight
    /// hold the old snapshot and finish undisturbed. Under Kubernetes discovery the
    /// engine set is the watcher's and is left alone here.
    pub fn apply(&self, config: Dynamic) {
        if config.discovery == Discovery::Static {
            self.registry.apply(&config.backends);
        }
        self.registry.set_aliases(config.aliases.clone());
        self.registry.set_pinned(config.known_models.clone());
        self.kv
            .set_following(config.routing_logic == config::RoutingLogic::Kvaware);
        *self.dynamic.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(DynState::new(config, &self.kv));
        self.metrics.sync(&self.registry);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How long `bind` waits for the first Kubernetes LIST before serving anyway.
const K8S_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// A router bound to its port, engines discovered, ready to serve.
pub struct Bound {
    pub addr: SocketAddr,
    pub state: Arc<RouterState>,
    listener: tokio::net::TcpListener,
}

/// Validate flags, bind, discover the engines' models, and start background tasks.
pub async fn bind(args: RouterArgs) -> Result<Bound, RouterError> {
    let settings = Settings::from_args(&args)?;
    let addr = format!("{}:{}", settings.host, settings.port);
    let resolved = tokio::net::lookup_host(&addr)
        .await
        .map_err(|source| RouterError::Bind {
            addr: addr.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| RouterError::Bind {
            addr: addr.clone(),
            source: std::io::ErrorKind::AddrNotAvailable.into(),
        })?;
    let listener = reuseport_listener(resolved).map_err(|source| RouterError::Bind {
        addr: addr.clone(),
        source,
    })?;
    let metrics = Arc::new(RouterMetrics::default());
    let telemetry = Arc::new(
        observe::trace::Telemetry::new(args.otlp_traces_endpoint.as_deref())
            .map_err(config::ConfigError::Invalid)?,
    );
    telemetry.spawn();
    let proxy = Proxy {
        connect_timeout: settings.connect_timeout,
        first_byte_timeout: settings.first_byte_timeout,
        max_attempts: settings.max_attempts,
        failure_threshold: settings.health_failures,
        metrics: metrics.clone(),
        telemetry,
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()).rotate_left(32);
    let dynamic = settings.dynamic.clone();
    let tokenizers =
        kvaware::Tokenizers::load(&args.tokenizers).map_err(config::ConfigError::Invalid)?;
    let kv = Arc::new(KvState::new(args.kv_events_port).with_tokenizers(tokenizers));
    let state = Arc::new(RouterState {
        registry: Arc::new(Registry::new(settings.request_stats_window)),
        dynamic: RwLock::new(Arc::new(DynState::new(dynamic.clone(), &kv))),
        kv,
        args,
        settings,
        metrics,
        proxy,
        seed,
        engine_auth: discovery::engine_auth_from_env(),
        k8s: k8s::Control::default(),
    });
    state.apply(dynamic.clone());
    match dynamic.discovery {
        Discovery::Static => discovery::refresh_models(&state).await,
        Discovery::K8s(k) => {
            // Serve once the first LIST is in (and its engines' models), so a restarted
            // router does not answer 404 for models it has simply not seen yet.
            let synced = k8s::start(&state, k).map_err(config::ConfigError::Invalid)?;
            if tokio::time::timeout(K8S_SYNC_WAIT, synced).await.is_err() {
                tracing::warn!(
                    "Kubernetes discovery: no engine list after {K8S_SYNC_WAIT:?}; serving anyway"
                );
            }
        }
    }
    discovery::spawn_tasks(state.clone());
    kvaware::subscriber::spawn(
        state.kv.clone(),
        Arc::downgrade(&state.registry),
        state.settings.connect_timeout,
    );
    Ok(Bound {
        addr: listener.local_addr()?,
        state,
        listener,
    })
}

/// How long shutdown waits for queued trace spans to reach the collector.
const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_secs(3);

/// A listening socket with SO_REUSEPORT, so each worker thread can have its own.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Bound {
    /// Serve on `workers` threads, each a single-threaded runtime with its own listener
    /// (SO_REUSEPORT: the kernel spreads connections) and its own upstream pool, so a
    /// request never hops between threads. This thread serves too; call it from a
    /// current-thread runtime. `workers == 0` means one per core.
    pub async fn serve_workers(
        self,
        workers: usize,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let workers = if workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            workers
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut threads = Vec::new();
        for i in 1..workers {
            let listener = reuseport_listener(self.addr)?.into_std()?;
            let state = self.state.clone();
            let mut stop = stop_rx.clone();
            threads.push(httpx::spawn_runtime_thread(
                format!("router-{i}"),
                async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let until = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    httpx::serve(listener, api::router(state), until).await
                },
            )?);
        }
        let state = self.state.clone();
        let result = httpx::serve(self.listener, api::router(self.state), async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
        for t in threads {
            let _ = t.join();
        }
        state.proxy.telemetry.flush(SHUTDOWN_FLUSH).await;
        result
    }

    /// Serve on the current runtime until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let result = httpx::serve(self.listener, api::router(self.state), shutdown).await;
        state.proxy.telemetry.flush(SHUTDOWN_FLUSH).await;
        result
    }
}
