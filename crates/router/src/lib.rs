//! The Switchyard router: one OpenAI endpoint in front of many engines and models.
//!
//! Rooms, by feature (each `mod.rs` says what it owns):
//! - [`api`]: the HTTP surface; [`proxy`]: the per-request forwarding path with failover
//!   and observation; [`resume`]: mid-stream failover (a cut stream continued on another
//!   engine); [`pd`]: prefill/decode disaggregation (prefill on one engine, decode with
//!   its `kv_transfer_params` on another, both through the proxy). This file: the router's state, `bind` and serving.
//! - [`admission`]: the front door: API keys, per-key rate limits, the concurrency limit
//!   and its queue.
//! - [`config`]: flags (the Production Stack router's) and the dynamic config file.
//! - [`engines`]: the engine set (identity, models, health, load, window statistics) as
//!   snapshots.
//! - [`discovery`]: where engines come from (static lists, config reloads, the Kubernetes
//!   watch), model discovery, health checks and engine-stats scraping.
//! - [`policy`]: routing policies ranking engines per request, `prefixaware` and
//!   `kvaware` with their trees, index and KV-event subscriber.
//! - [`observe`]: `/metrics`, the dashboard, trace context, the access log and OTLP
//!   export.
//! - [`upstream`]: the HTTP client and header names every call to an engine shares.
//!
//! Dependencies go one way: this file and `api` → `admission`, `proxy`, `discovery`,
//! `policy`, `observe` → `engines`, `upstream`, `config`.

pub mod admission;
pub mod api;
pub mod config;
pub mod discovery;
pub mod engines;
pub mod lora;
pub mod observe;
pub mod pd;
pub mod policy;
pub mod proxy;
pub mod resume;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

pub use config::RouterArgs;
use config::{Dynamic, RoutingLogic, Settings};
use discovery::k8s;
use discovery::EngineSet;
use engines::Registry;
use observe::metrics::RouterMetrics;
use policy::kvaware::{self, KvState};
use policy::Policy;
use proxy::Proxy;

/// The settings that can change while running, swapped whole on a reload.
pub struct DynState {
    pub config: Dynamic,
    pub policy: Box<dyn Policy>,
    /// `disaggregated_prefill`'s sides (None under any other routing logic).
    pub pd: Option<pd::Sides>,
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
                config.lora_affinity,
            ),
            session_key: config.session_key.clone(),
            pd: (config.routing_logic == RoutingLogic::DisaggregatedPrefill)
                .then(|| pd::Sides::new(config.pd.clone(), config.prefix)),
            config,
        }
    }
}

pub struct RouterState {
    pub args: RouterArgs,
    /// API keys, rate limits, the concurrency limit.
    pub admission: Arc<admission::Admission>,
    pub settings: Settings,
    pub registry: Arc<Registry>,
    pub metrics: Arc<RouterMetrics>,
    pub proxy: Proxy,
    /// The KV-cache index and `kvaware` metrics (kept across reloads).
    pub kv: Arc<KvState>,
    /// Prefill/decode disaggregation's metrics (kept across reloads).
    pub pd: pd::PdMetrics,
    dynamic: RwLock<Arc<DynState>>,
    /// Per-process random seed (request ids, randomized policies).
    pub seed: u64,
    /// The engine set, for the router's own calls to engines (LoRA loading).
    pub engines: Arc<EngineSet>,
}

impl RouterState {
    pub fn dynamic(&self) -> Arc<DynState> {
        self.dynamic
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Apply new routing settings (aliases, known models, routing logic, session key):
    /// requests in flight keep the policy they were ranked with. The engine set is
    /// discovery's ([`EngineSet::apply_engines`]).
    pub fn apply_settings(&self, config: Dynamic) {
        self.registry.set_aliases(config.aliases.clone());
        self.registry.set_pinned(config.known_models.clone());
        self.kv
            .set_following(config.routing_logic == RoutingLogic::Kvaware);
        *self.dynamic.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(DynState::new(config, &self.kv));
        self.metrics.sync(&self.registry);
    }
}

impl discovery::Reconfigure for RouterState {
    fn reconfigure(&self, config: Dynamic) {
        self.apply_settings(config);
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

/// A router bound to its port, engines discovered, ready to serve.
pub struct Bound {
    pub addr: SocketAddr,
    pub state: Arc<RouterState>,
    listener: tokio::net::TcpListener,
    serving: httpx::Serving,
}

/// Validate flags, bind, discover the engines' models, and start background tasks.
pub async fn bind(args: RouterArgs) -> Result<Bound, RouterError> {
    let settings = Settings::from_args(&args)?;
    let serving = args
        .serve
        .serving()
        .map_err(|e| config::ConfigError::Invalid(e.to_string()))?;
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
    let admission = Arc::new(
        admission::Admission::from_args(&args.admission).map_err(config::ConfigError::Invalid)?,
    );
    let metrics = Arc::new(RouterMetrics::default());
    let telemetry = Arc::new(
        observe::trace::Telemetry::new(args.otlp_traces_endpoint.as_deref())
            .map_err(config::ConfigError::Invalid)?,
    );
    telemetry.spawn();
    let stall = args.stream_stall_timeout_secs;
    if !stall.is_finite() || stall < 0.0 {
        return Err(config::ConfigError::Invalid(
            "--stream-stall-timeout-secs must be a number of seconds (0: off)".into(),
        )
        .into());
    }
    let resume = Arc::new(resume::Resume {
        attempts: args.stream_resume_attempts,
        stall: (stall > 0.0).then(|| std::time::Duration::from_secs_f64(stall)),
        ..resume::Resume::default()
    });
    let proxy = Proxy {
        resume,
        connect_timeout: settings.connect_timeout,
        first_byte_timeout: settings.first_byte_timeout,
        max_attempts: if settings.resilience.disable_retries {
            1
        } else {
            settings.max_attempts
        },
        failure_threshold: settings.health_failures,
        stall_timeout: settings.resilience.health_timeout,
        breaker: settings.resilience.breaker,
        retries: proxy::Retries::new(settings.resilience.retry),
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
    let registry = Arc::new(Registry::new(settings.request_stats_window));
    let mut engine_set =
        EngineSet::new(registry.clone(), metrics.clone(), settings.connect_timeout);
    // `--engine-api-key` (default `$VLLM_API_KEY`) for the router's own calls too.
    engine_set.auth = admission.engine_auth();
    let engines = Arc::new(engine_set);
    let k8s = Arc::new(k8s::Watcher::new(engines.clone(), args.clone()));
    admission.spawn_reload();
    let state = Arc::new(RouterState {
        admission,
        registry,
        dynamic: RwLock::new(Arc::new(DynState::new(dynamic.clone(), &kv))),
        kv,
        pd: pd::PdMetrics::default(),
        args,
        settings,
        metrics,
        proxy,
        seed,
        engines: engines.clone(),
    });
    state.apply_settings(dynamic.clone());
    discovery::start(&engines, &k8s, &dynamic)
        .await
        .map_err(config::ConfigError::Invalid)?;
    discovery::spawn_tasks(&engines, k8s, &state.settings, &state.args, state.clone());
    kvaware::subscriber::spawn(
        state.kv.clone(),
        Arc::downgrade(&state.registry),
        state.settings.connect_timeout,
    );
    Ok(Bound {
        addr: listener.local_addr()?,
        state,
        listener,
        serving,
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
    /// `https` when the listener speaks TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        self.serving.scheme()
    }

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
            let serving = self.serving.clone();
            threads.push(httpx::spawn_runtime_thread(
                format!("router-{i}"),
                async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let until = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    httpx::serve(listener, api::router(state), until, &serving).await
                },
            )?);
        }
        let state = self.state.clone();
        let result = httpx::serve(
            self.listener,
            api::router(self.state),
            async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            },
            &self.serving,
        )
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
        let result = httpx::serve(
            self.listener,
            api::router(self.state),
            shutdown,
            &self.serving,
        )
        .await;
        state.proxy.telemetry.flush(SHUTDOWN_FLUSH).await;
        result
    }
}
