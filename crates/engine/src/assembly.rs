//! Engine assembly: from the `switchyard engine` flags to a running engine. Builds the
//! tokenizer and the backend (`sim`, or `gguf`: model file, weights, KV pool sized from
//! the memory flags), the generation defaults, the metrics and the KV-event publisher,
//! then spawns the engine loop, and bundles what the HTTP handlers need into an
//! [`Engine`].

use std::sync::Arc;

use protocol::openai::unix_now;
use tokenizer::{SimTokenizer, Tokenizer};

use crate::backend::sim::{Latency, SimBackend};
use crate::backend::Backend;
use crate::config::{BackendKind, EngineArgs};
use crate::core::scheduler::SchedulerConfig;
use crate::engine_loop::{spawn_engine, CoreConfig, EngineHandle};
use crate::generation::GenerationDefaults;
use crate::metrics::EngineMetrics;

/// Everything a handler needs; cloned per request (cheap: `Arc`s).
#[derive(Clone)]
pub struct Engine {
    pub handle: EngineHandle,
    pub tokenizer: Arc<dyn Tokenizer>,
    pub served: Arc<[String]>,
    pub max_model_len: usize,
    pub body_limit: usize,
    pub created: u64,
    /// Where KV-cache events are published, when `--kv-events-config` enables them.
    pub kv_events: Option<crate::kv_publisher::PublisherInfo>,
    /// Tokens per KV block (advertised with the events endpoint).
    pub block_size: usize,
    /// Sampling defaults for fields a request leaves out (`--generation-config`).
    pub generation: Arc<GenerationDefaults>,
    /// `--api-key` (or `VLLM_API_KEY`): the bearer tokens `/v1/*` and the other
    /// non-public paths require; empty: no authentication.
    pub api_keys: Arc<[String]>,
    /// Fault injection for resilience tests (hidden knobs; off by default).
    pub faults: crate::fault::FaultArgs,
    /// P/D disaggregation (NixlConnector), when on.
    pub pd: Option<(
        Arc<crate::kv_offload::pd::PdConfig>,
        Arc<crate::kv_offload::pd::PdMetrics>,
    )>,
    /// LoRA adapters (`--enable-lora`), when on.
    pub lora: Option<Arc<crate::lora::Registry>>,
    /// `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` are open.
    pub runtime_lora: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid flag: {0}")]
    Flag(String),
    #[error("model: {0}")]
    Model(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What a backend kind contributes to the engine.
struct Parts {
    tokenizer: Arc<dyn Tokenizer>,
    backend: Box<dyn Backend>,
    max_model_len: usize,
    num_blocks: usize,
    generation: GenerationDefaults,
}

/// Build the engine (core loop, backend, tokenizer) from its flags.
pub fn build_engine(args: &EngineArgs) -> Result<Engine, StartError> {
    if args.block_size == 0 || args.num_gpu_blocks == Some(0) || args.max_num_seqs == 0 {
        return Err(StartError::Flag(
            "--block-size, --num-gpu-blocks and --max-num-seqs must be positive".into(),
        ));
    }
    if !(args.time_scale >= 0.0 && args.time_scale.is_finite()) {
        return Err(StartError::Flag(
            "--time-scale must be a non-negative number".into(),
        ));
    }
    args.fault.validate().map_err(StartError::Flag)?;
    let Parts {
        tokenizer,
        backend,
        max_model_len,
        num_blocks,
        generation,
    } = match args.backend {
        BackendKind::Sim => build_sim(args)?,
        BackendKind::Gguf => build_gguf(args)?,
    };
    if max_model_len < 2 || args.max_num_batched_tokens == 0 {
        return Err(StartError::Flag(
            "--max-model-len must be at least 2 and --max-num-batched-tokens positive".into(),
        ));
    }
    if num_blocks.saturating_mul(args.block_size) < max_model_len {
        // As vLLM: a request of the full context must fit the KV cache on its own, or it
        // could never finish (it would preempt itself forever).
        return Err(StartError::Flag(format!(
            "the KV cache ({} blocks of {} tokens = {} tokens) cannot hold one request of --max-model-len {}; \
             raise --num-gpu-blocks (or --kv-cache-memory-bytes) or lower --max-model-len",
            num_blocks,
            args.block_size,
            num_blocks * args.block_size,
            max_model_len
        )));
    }
    let served: Arc<[String]> = args.served_names().into();
    let mut metrics = EngineMetrics::new(
        &served[0],
        args.block_size,
        num_blocks,
        args.prefix_caching(),
    );
    metrics.cache_dtype = args.kv_cache_dtype.trim().to_string();
    let pd = match &args.kv_transfer_config {
        Some(t) if t.is_nixl() => Some(pd_setup(
            args,
            t,
            backend.kv_layout(),
            backend.kv_network_model(),
        )?),
        _ => None,
    };
    if let Some((_, m, _)) = &pd {
        metrics.pd = Some(m.clone());
    }
    let lora = lora_setup(args, backend.lora_geometry(), &served)?;
    if lora.is_some() {
        metrics.lora = Some(crate::metrics::LoraInfo::new(args.max_loras));
    }
    let offload = match &args.kv_transfer_config {
        None => None,
        Some(t) if t.is_nixl() => None,
        Some(transfer) => {
            let layout = backend.kv_layout().ok_or_else(|| {
                StartError::Flag("--kv-transfer-config: this backend keeps no KV to offload".into())
            })?;
            if !args.prefix_caching() {
                return Err(StartError::Flag(
                    "--kv-transfer-config needs prefix caching (loaded chunks are prefix hits)"
                        .into(),
                ));
            }
            let settings =
                crate::kv_offload::LmCacheSettings::from_env().map_err(StartError::Flag)?;
            let off = crate::kv_offload::Offload::new(
                transfer.clone(),
                settings.clone(),
                layout,
                args.block_size,
                &served[0],
            )
            .map_err(StartError::Flag)?;
            tracing::info!(
                role = %transfer.kv_role,
                chunk_size = settings.chunk_size,
                cpu_bytes = if settings.local_cpu { settings.max_local_cpu_bytes() } else { 0 },
                disk = ?settings.local_disk,
                remote = ?settings.remote_url,
                "KV offloading on"
            );
            metrics.offload = Some(off.metrics.clone());
            Some(off)
        }
    };
    let metrics = Arc::new(metrics);
    let (kv_sink, kv_events) = match &args.kv_events_config {
        Some(c) if c.enabled() => {
            let (sink, info) = crate::kv_publisher::start_publisher(c, args.block_size)?;
            tracing::info!(endpoint = %info.endpoint, replay = ?info.replay_endpoint, "publishing KV-cache events");
            (Some(sink), Some(info))
        }
        _ => (None, None),
    };
    let config = CoreConfig {
        scheduler: SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_model_len,
        },
        num_blocks,
        block_size: args.block_size,
        prefix_caching: args.prefix_caching(),
        eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        kv_events: kv_sink,
        offload,
        pd: pd.as_ref().map(|(c, m, _)| (c.clone(), m.clone())),
        max_loras: if lora.is_some() { args.max_loras } else { 0 },
    };
    let handle = spawn_engine(config, backend, metrics)?;
    if let Some((cfg, m, listener)) = &pd {
        start_side_channel(listener.try_clone()?, m.clone(), handle.clone())?;
        tracing::info!(
            engine_id = %cfg.engine_id,
            side_channel = %format!("{}:{}", cfg.host, cfg.port),
            role = if cfg.produces && cfg.consumes { "kv_both" } else if cfg.produces { "kv_producer" } else { "kv_consumer" },
            lease_secs = cfg.lease.as_secs_f64(),
            "P/D KV transfer (NixlConnector) on; side channel listening"
        );
    }
    Ok(Engine {
        handle,
        tokenizer,
        served,
        max_model_len,
        body_limit: args.max_request_body_bytes,
        created: unix_now(),
        kv_events,
        block_size: args.block_size,
        generation: Arc::new(generation),
        api_keys: args
            .api_key
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect(),
        faults: args.fault.clone(),
        pd: pd.map(|(c, m, _)| (c, m)),
        lora,
        runtime_lora: args.runtime_lora_updating(),
    })
}

/// The LoRA registry (`--enable-lora`), with `--lora-modules` loaded.
fn lora_setup(
    args: &EngineArgs,
    geometry: Option<crate::lora::Geometry>,
    served: &[String],
) -> Result<Option<Arc<crate::lora::Registry>>, StartError> {
    if !args.enable_lora {
        if !args.lora_modules.is_empty() {
            return Err(StartError::Flag(
                "--lora-modules needs --enable-lora".into(),
            ));
        }
        return Ok(None);
    }
    if args.max_loras == 0 || args.max_lora_rank == 0 {
        return Err(StartError::Flag(
            "--max-loras and --max-lora-rank must be positive".into(),
        ));
    }
    let max_cpu_loras = args.max_cpu_loras.unwrap_or(args.max_loras);
    if max_cpu_loras < args.max_loras {
        return Err(StartError::Flag(format!(
            "--max-cpu-loras ({max_cpu_loras}) must be at least --max-loras ({})",
            args.max_loras
        )));
    }
    let reg = crate::lora::Registry::new(crate::lora::LoraConfig {
        max_loras: args.max_loras,
        max_lora_rank: args.max_lora_rank,
        max_cpu_loras,
        geometry,
    });
    for m in &args.lora_modules {
        if served.contains(&m.name) {
            return Err(StartError::Flag(format!(
                "--lora-modules: `{}` is the base model's name",
                m.name
            )));
        }
        if let Some(b) = &m.base_model_name {
            if !served.contains(b) {
                return Err(StartError::Flag(format!(
                    "--lora-modules: `{}` names base model `{b}`, this engine serves `{}`",
                    m.name, served[0]
                )));
            }
        }
        reg.load_for(&m.name, &m.path, m.base_model_name.as_deref())
            .map_err(|e| StartError::Flag(format!("--lora-modules {}: {e}", m.name)))?;
    }
    Ok(Some(Arc::new(reg)))
}

/// NixlConnector's settings: engine id, side channel (bound now, so the advertised port
/// is the real one), lease duration, policy.
fn pd_setup(
    args: &EngineArgs,
    t: &crate::kv_offload::KvTransferConfig,
    layout: Option<crate::core::step::KvLayout>,
    modelled: Option<crate::backend::NetworkModel>,
) -> Result<
    (
        Arc<crate::kv_offload::pd::PdConfig>,
        Arc<crate::kv_offload::pd::PdMetrics>,
        std::net::TcpListener,
    ),
    StartError,
> {
    let layout = layout.ok_or_else(|| {
        StartError::Flag("--kv-transfer-config: this backend keeps no KV to transfer".into())
    })?;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let lease = t
        .lease_duration(env("VLLM_NIXL_ABORT_REQUEST_TIMEOUT").as_deref())
        .map_err(StartError::Flag)?;
    let host = env("VLLM_NIXL_SIDE_CHANNEL_HOST").unwrap_or_else(|| "localhost".into());
    let port = match (
        args.kv_side_channel_port,
        env("VLLM_NIXL_SIDE_CHANNEL_PORT"),
    ) {
        (Some(p), _) => p,
        (None, Some(v)) => v.trim().parse::<u16>().map_err(|_| {
            StartError::Flag(format!("VLLM_NIXL_SIDE_CHANNEL_PORT {v:?} is not a port"))
        })?,
        (None, None) => 5600,
    };
    let listener = std::net::TcpListener::bind((host.as_str(), port))
        .map_err(|e| StartError::Flag(format!("KV side channel {host}:{port}: {e}")))?;
    let port = listener.local_addr()?.port();
    let cfg = crate::kv_offload::pd::PdConfig {
        engine_id: crate::kv_offload::pd::new_uuid(),
        host,
        port,
        lease: std::time::Duration::from_secs_f64(lease),
        fail_on_error: t.fail_on_load_error(),
        produces: t.stores(),
        consumes: t.loads(),
        layout,
        block_size: args.block_size,
        pull_timeout: std::time::Duration::from_secs(10),
        modelled,
    };
    Ok((
        Arc::new(cfg),
        Arc::new(crate::kv_offload::pd::PdMetrics::default()),
        listener,
    ))
}

/// Serve side-channel reads on their own thread: each read goes to the loop, which owns
/// the KV.
fn start_side_channel(
    listener: std::net::TcpListener,
    metrics: Arc<crate::kv_offload::pd::PdMetrics>,
    handle: EngineHandle,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    httpx::spawn_runtime_thread("kv-side-channel", async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "KV side channel failed to start");
                return;
            }
        };
        let ask = move |request| {
            let handle = handle.clone();
            async move {
                let (reply, rx) = tokio::sync::oneshot::channel();
                if !handle.send(crate::engine_loop::EngineCommand::KvRead { request, reply }) {
                    return Err("the engine has stopped".to_string());
                }
                rx.await
                    .unwrap_or_else(|_| Err("the engine has stopped".to_string()))
            }
        };
        crate::kv_offload::pd::serve(listener, metrics, ask).await;
    })?;
    Ok(())
}

/// The sim backend: a latency preset (with overrides), the sim tokenizer, and the pool
/// and context the flags give (8192 tokens and 16384 blocks by default).
fn build_sim(args: &EngineArgs) -> Result<Parts, StartError> {
    let names: Vec<&str> = crate::backend::sim::PRESETS
        .iter()
        .map(|(n, _)| *n)
        .collect();
    let preset = Latency::preset(&args.sim_preset).ok_or_else(|| {
        StartError::Flag(format!(
            "unknown --sim-preset {:?}; known: {}",
            args.sim_preset,
            names.join(", ")
        ))
    })?;
    let profile = match &args.sim_profile {
        Some(p) => Some(crate::backend::sim::SimProfile::load(p).map_err(StartError::Flag)?),
        None => None,
    };
    let latency = profile
        .as_ref()
        .map_or(preset, |p| p.latency(preset))
        .with_overrides(&args.sim_latency);
    let profile_blocks = profile.as_ref().and_then(|p| p.num_gpu_blocks);
    Ok(Parts {
        tokenizer: Arc::new(SimTokenizer::new()),
        backend: Box::new(
            SimBackend::new(latency, args.time_scale, args.sim_eos_prob.clamp(0.0, 1.0))
                .with_block_size(args.block_size),
        ),
        max_model_len: args.max_model_len.unwrap_or(8192),
        num_blocks: args.num_gpu_blocks.or(profile_blocks).unwrap_or(16384),
        generation: crate::generation::resolve(
            &args.generation_config,
            args.override_generation_config.as_ref(),
            None,
        )
        .map_err(StartError::Flag)?,
    })
}

/// The GGUF backend: model file (the default one fetched when none is given), its
/// tokenizer and template, its weights, and a KV pool sized from the memory flag.
fn build_gguf(args: &EngineArgs) -> Result<Parts, StartError> {
    use crate::backend::gguf::{
        kv_cache::{KvCache, KvDtype},
        model::Model,
        GgufBackend,
    };
    let path = crate::model_store::resolve(args.model.as_deref().map(std::path::Path::new))
        .map_err(|e| StartError::Model(e.to_string()))?;
    let header = gguf::Gguf::open(&path).map_err(|e| StartError::Model(e.to_string()))?;
    let tokenizer = tokenizer::from_gguf(&header).map_err(|e| StartError::Model(e.to_string()))?;
    let generation = crate::generation::resolve(
        &args.generation_config,
        args.override_generation_config.as_ref(),
        Some((&path, &header)),
    )
    .map_err(StartError::Flag)?;
    if !generation.is_empty() {
        tracing::info!(
            defaults = ?generation,
            "default sampling parameters from the generation config (requests may override)"
        );
    }
    let started = std::time::Instant::now();
    let f32_budget = usize::try_from(args.cpu_f32_weights_max_bytes).unwrap_or(usize::MAX);
    let model =
        Model::load_with(&header, f32_budget).map_err(|e| StartError::Model(e.to_string()))?;
    let cfg = model.cfg.clone();
    tracing::info!(
        model = %path.display(),
        arch = %cfg.arch,
        layers = cfg.n_layers,
        hidden = cfg.hidden,
        f32_copies = model.has_f32(),
        secs = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    let max_model_len = args.max_model_len.unwrap_or(cfg.context_length);
    if max_model_len > cfg.context_length {
        return Err(StartError::Flag(format!(
            "--max-model-len {max_model_len} is longer than the model's context ({})",
            cfg.context_length
        )));
    }
    let kv_dtype = match args.kv_cache_dtype.trim().to_ascii_lowercase().as_str() {
        "auto" | "float16" | "fp16" | "half" => KvDtype::F16,
        "float32" | "fp32" | "float" => KvDtype::F32,
        other => {
            return Err(StartError::Flag(format!(
                "--kv-cache-dtype {other}: the gguf backend keeps KV in auto (float16), float16 or float32"
            )))
        }
    };
    let per_block = KvCache::bytes_per_block(
        cfg.n_layers,
        args.block_size,
        cfg.n_kv_heads,
        cfg.head_dim,
        kv_dtype,
    );
    let num_blocks = match args.num_gpu_blocks {
        Some(n) => n,
        None => {
            let bytes = args.kv_cache_memory_bytes.unwrap_or_else(|| {
                std::env::var("VLLM_CPU_KVCACHE_SPACE")
                    .ok()
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|g| *g > 0.0)
                    .map_or(1 << 30, |g| (g * (1u64 << 30) as f64) as u64)
            });
            (bytes as usize / per_block.max(1)).max(1)
        }
    };
    let eos = tokenizer.eos_token_ids().to_vec();
    let gemm_rows = match args.cpu_decode_gemm_rows {
        0 => usize::MAX,
        n => n,
    };
    let backend = GgufBackend::with_kv_dtype(model, num_blocks, args.block_size, eos, kv_dtype)
        .with_decode_gemm_rows(gemm_rows);
    Ok(Parts {
        tokenizer,
        backend: Box::new(backend),
        max_model_len,
        num_blocks,
        generation,
    })
}
