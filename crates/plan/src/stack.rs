//! The stack `switchyard plan` simulates, in process and in virtual time: N sim engines
//! (each the real engine loop, scheduler, block manager and sim backend, stepping as a
//! task on a paused tokio clock: [`engine::engine_loop::virtual_engine`]) behind the
//! router's real routing policy (its ranking, its in-flight counts, its engine-stats
//! scrape, and for `kvaware` its KV index fed by the engines' KV events). The bench's
//! workloads reach it through [`bench::client::LocalServer`]: no sockets, no threads, so
//! virtual time moves only when every task waits.
//!
//! With a KV cache server (`--kv-cache-server`), every engine offloads as `switchyard up
//! --kv-cache-server` configures it (LMCache's settings: host memory on, the server
//! remote) to one in-process store of the server's capacity, [`cache::store::Store`],
//! the server's own LRU: no sockets, the transfers' time modelled by the sim backend
//! (round trip plus bytes at the profile's network rate), payloads of the model's real
//! size that share one range of zero pages.
//!
//! What is not simulated: HTTP and SSE framing, beyond the profile's fixed
//! `request_overhead_us` per request (what `plan calibrate` measured of them); the
//! router's retries and health checks (no engine fails here).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bench::client::{ErrorKind, LocalServer, Outcome};
use bytes::Bytes;
use cache::store::Store;
use engine::backend::sim::{Latency, SimBackend, SimProfile};
use engine::core::request::{EngineEvent, NewRequest, SamplingParams};
use engine::core::scheduler::SchedulerConfig;
use engine::engine_loop::{virtual_engine, CoreConfig, EngineCommand};
use engine::kv_offload::{KvTransferConfig, LmCacheSettings, Offload, OffloadMetrics};
use engine::kv_publisher::KvEventSink;
use engine::metrics::EngineMetrics;
use router::config::{BackendSpec, PrefixSettings, RoutingLogic};
use router::engines::Endpoint;
use router::policy::kvaware::tokens::prompt_tokens;
use router::policy::kvaware::KvState;
use router::policy::{Policy, RouteCtx};
use tokenizer::{SimTokenizer, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

/// The model name the simulated engines serve.
pub const MODEL: &str = "switchyard-sim";

/// One simulated deployment.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub engines: usize,
    pub routing: RoutingLogic,
    pub profile: SimProfile,
    /// Each engine's scheduler limits and pool (the engine's defaults unless the profile
    /// says otherwise).
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    /// The router's engine-stats scrape interval (queue lengths as the policies see them).
    pub stats_interval: Duration,
    /// The router's `kvaware` and `prefixaware` knobs.
    pub kv_overlap_weight: f64,
    pub kv_min_match: f64,
    pub prefix: PrefixSettings,
    /// A KV cache server of this many bytes shared by every engine, or none.
    pub kv_cache_server: Option<u64>,
}

struct Slot {
    tx: UnboundedSender<EngineCommand>,
    metrics: Arc<EngineMetrics>,
    offload: Option<Arc<OffloadMetrics>>,
}

/// A running simulated stack (inside a paused runtime).
pub struct Stack {
    engines: Vec<Slot>,
    endpoints: Vec<Arc<Endpoint>>,
    policy: Box<dyn Policy>,
    /// The shared KV cache server's store, when there is one.
    kv_server: Option<Arc<Store>>,
    tokenizer: SimTokenizer,
    max_model_len: usize,
    /// The profile's request overhead, waited before routing.
    overhead: Duration,
    next_id: AtomicU64,
    nonce: AtomicU64,
}

#[derive(serde::Deserialize)]
struct Fields {
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    ignore_eos: bool,
}

/// Counts a request in flight at its engine (as the router's proxy does) until dropped.
struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stack {
    /// Spawn the engines (and the router's feeds) on the current runtime.
    pub fn start(cfg: &StackConfig) -> anyhow::Result<Arc<Stack>> {
        let kv = Arc::new(KvState::new(0));
        let kvaware = cfg.routing == RoutingLogic::Kvaware;
        let policy = router::policy::build(
            cfg.routing,
            cfg.prefix,
            &kv,
            cfg.kv_overlap_weight,
            cfg.kv_min_match,
            false,
        );
        let base = Latency::preset(&cfg.profile.name)
            .or_else(|| Latency::preset("llama-3.1-8b-h100"))
            .expect("a shipped preset");
        let latency = cfg.profile.latency(base);
        let epoch = engine::clock::now();
        let kv_server = cfg.kv_cache_server.map(|bytes| Arc::new(Store::new(bytes)));
        let transfer = KvTransferConfig::parse(
            r#"{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}"#,
        )
        .map_err(anyhow::Error::msg)?;
        let mut engines = Vec::with_capacity(cfg.engines);
        let mut endpoints = Vec::with_capacity(cfg.engines);
        for i in 0..cfg.engines {
            let spec = BackendSpec {
                url: format!("http://sim-engine-{i}:8000"),
                model: Some(MODEL.into()),
                kv_events: None,
                label: None,
            };
            let ep = Arc::new(Endpoint::new(&spec, 60, epoch));
            let metrics = Arc::new(EngineMetrics::new(
                MODEL,
                cfg.block_size,
                cfg.num_blocks,
                true,
            ));
            let kv_events = kvaware.then(|| {
                let (sink, mut rx) = KvEventSink::channel(cfg.block_size, 1 << 16);
                let (kv, key) = (kv.clone(), ep.key);
                {
                    let mut idx = kv.index_mut();
                    idx.attach(key);
                    idx.set_block_size(key, cfg.block_size);
                }
                tokio::spawn(async move {
                    while let Some(batch) = rx.recv().await {
                        let mut idx = kv.index_mut();
                        for ev in &batch.events {
                            idx.apply(key, ev);
                        }
                    }
                });
                sink
            });
            let offload = match &kv_server {
                Some(store) => Some(
                    Offload::new(
                        transfer.clone(),
                        LmCacheSettings::default(),
                        latency.kv.layout(),
                        cfg.block_size,
                        MODEL,
                    )
                    .map_err(anyhow::Error::msg)?
                    .with_shared_remote(store.clone()),
                ),
                None => None,
            };
            let offload_metrics = offload.as_ref().map(|o| o.metrics.clone());
            let config = CoreConfig {
                scheduler: SchedulerConfig {
                    max_num_seqs: cfg.max_num_seqs,
                    max_num_batched_tokens: cfg.max_num_batched_tokens,
                    max_model_len: cfg.max_model_len,
                },
                num_blocks: cfg.num_blocks,
                block_size: cfg.block_size,
                prefix_caching: true,
                eos_token_ids: SimTokenizer::new().eos_token_ids().to_vec(),
                kv_events,
                offload,
                pd: None,
                max_loras: 0,
            };
            let backend = SimBackend::new(latency, 1.0, 0.0)
                .with_block_size(cfg.block_size)
                .in_virtual_time();
            let (tx, run) = virtual_engine(config, Box::new(backend), metrics.clone());
            tokio::spawn(run);
            engines.push(Slot {
                tx,
                metrics,
                offload: offload_metrics,
            });
            endpoints.push(ep);
        }
        // The router's scrape of each engine's queue, every `stats_interval`.
        let scraped: Vec<(Arc<Endpoint>, Arc<EngineMetrics>)> = endpoints
            .iter()
            .cloned()
            .zip(engines.iter().map(|s| s.metrics.clone()))
            .collect();
        let every = cfg.stats_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                for (ep, m) in &scraped {
                    ep.load.running.set(m.running.get());
                    ep.load.waiting.set(m.waiting.get());
                    ep.load.kv_usage.set(m.kv_usage.get());
                }
            }
        });
        Ok(Arc::new(Stack {
            engines,
            endpoints,
            policy,
            kv_server,
            tokenizer: SimTokenizer::new(),
            max_model_len: cfg.max_model_len,
            overhead: Duration::from_secs_f64(cfg.profile.request_overhead_us.max(0.0) / 1e6),
            next_id: AtomicU64::new(1),
            nonce: AtomicU64::new(0x5EED),
        }))
    }

    /// Prompt tokens the engines loaded from the KV tiers (their host memory and the
    /// cache server), and the cache server's `(chunks, bytes)` held at the end.
    pub fn kv_offload(&self) -> (u64, Option<(usize, u64)>) {
        let loaded = self
            .engines
            .iter()
            .filter_map(|s| s.offload.as_ref())
            .map(|m| m.hits.get())
            .sum();
        (loaded, self.kv_server.as_ref().map(|s| s.usage()))
    }

    /// Prompt tokens served from the engines' prefix caches, of all looked up.
    pub fn cache_hit_rate(&self) -> f64 {
        let (mut hits, mut queries) = (0u64, 0u64);
        for s in &self.engines {
            hits += s.metrics.prefix_hits.get();
            queries += s.metrics.prefix_queries.get();
        }
        if queries == 0 {
            0.0
        } else {
            hits as f64 / queries as f64
        }
    }

    /// Requests each engine was sent.
    pub fn routed(&self) -> Vec<u64> {
        self.endpoints.iter().map(|e| e.routed.get()).collect()
    }

    async fn handle(&self, body: &[u8], user: Option<&str>, keep_text: bool) -> Outcome {
        let start = engine::clock::now();
        let mut o = Outcome::default();
        let fail = |mut o: Outcome, m: String| {
            o.error = Some((ErrorKind::Http4xx, m));
            o
        };
        let Some(prompt) = prompt_tokens(&self.tokenizer, body) else {
            return fail(o, "the request has no prompt".into());
        };
        let f: Fields = match serde_json::from_slice(body) {
            Ok(f) => f,
            Err(e) => return fail(o, e.to_string()),
        };
        if prompt.is_empty() || prompt.len() >= self.max_model_len {
            return fail(
                o,
                format!(
                    "the prompt ({} tokens) does not fit the context ({})",
                    prompt.len(),
                    self.max_model_len
                ),
            );
        }
        let max_tokens = f
            .max_completion_tokens
            .or(f.max_tokens)
            .unwrap_or(16)
            .min(self.max_model_len - prompt.len())
            .max(1);
        if !self.overhead.is_zero() {
            tokio::time::sleep(self.overhead).await;
        }
        let nonce = self.nonce.fetch_add(0x9E37_79B9, Ordering::Relaxed);
        let ctx = RouteCtx::new(MODEL, user, nonce, body);
        let mut order = Vec::with_capacity(self.endpoints.len());
        self.policy.rank(&ctx, &self.endpoints, &mut order);
        let Some(&i) = order.first() else {
            return fail(o, "no engine".into());
        };
        let ep = &self.endpoints[i];
        ep.in_flight.fetch_add(1, Ordering::Relaxed);
        ep.routed.inc();
        let _counted = InFlight(ep);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let num_prompt = prompt.len();
        let request = NewRequest {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            prompt,
            params: SamplingParams {
                max_tokens,
                temperature: 0.0,
                ignore_eos: f.ignore_eos,
                ..SamplingParams::default()
            },
            arrival: start,
            events: tx,
            kv_transfer: None,
            lora: None,
        };
        if self.engines[i]
            .tx
            .send(EngineCommand::Add(request))
            .is_err()
        {
            return fail(o, "the engine stopped".into());
        }
        let mut ids = Vec::with_capacity(max_tokens);
        let mut last = start;
        while let Some(ev) = rx.recv().await {
            match ev {
                EngineEvent::Token { id, finish, .. } => {
                    let now = engine::clock::now();
                    if o.ttft.is_none() {
                        o.ttft = Some((now - start).as_secs_f64());
                    } else {
                        o.itl.push((now - last).as_secs_f64());
                    }
                    last = now;
                    ids.push(id);
                    if finish.is_some() {
                        break;
                    }
                }
                EngineEvent::Rejected(m) => {
                    o.error = Some((ErrorKind::Http4xx, m));
                    break;
                }
            }
        }
        if o.error.is_none() && ids.is_empty() {
            o.error = Some((ErrorKind::Truncated, "no token".into()));
        }
        o.e2e = (engine::clock::now() - start).as_secs_f64();
        o.prompt_tokens = Some(num_prompt as u64);
        o.output_tokens = Some(ids.len() as u64);
        o.chunks = ids.len() as u64;
        if keep_text {
            o.text = self.tokenizer.decode(&ids, true);
        }
        o
    }
}

/// The bench's way in.
pub struct Served(pub Arc<Stack>);

impl LocalServer for Served {
    fn serve(
        &self,
        _path: &str,
        body: Bytes,
        user: Option<&str>,
        keep_text: bool,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'static>> {
        let stack = self.0.clone();
        let user = user.map(str::to_string);
        Box::pin(async move { stack.handle(&body, user.as_deref(), keep_text).await })
    }
}
