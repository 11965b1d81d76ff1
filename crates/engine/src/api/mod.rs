//! The engine's HTTP surface, as `vllm serve`'s: OpenAI chat and completions (streaming
//! and not), models, tokenize/detokenize, health, version and metrics, with vLLM's error
//! bodies and status codes.
//!
//! Handlers validate and tokenize, then talk to the engine loop only through its
//! [`EngineHandle`]; a request's abort guard frees its KV blocks however the response
//! ends (finished, stop string, client gone).

mod generate;
mod validate;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
pub(crate) use httpx::{json_ok, ErrorResponse};
use protocol::openai::{
    unix_now, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
    TokenizeResponse,
};
use protocol::ApiError;

use crate::backend::sim::{Latency, SimBackend};
use crate::config::{BackendKind, EngineArgs};
use crate::core::scheduler::SchedulerConfig;
use crate::engine_loop::{spawn_engine, CoreConfig, EngineCommand, EngineHandle};
use crate::metrics::EngineMetrics;
use tokenizer::{SimTokenizer, Tokenizer};

/// The version string `/version` reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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
    pub generation: Arc<crate::generation::GenerationDefaults>,
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
    let (tokenizer, backend, max_model_len, num_blocks, generation): (
        Arc<dyn Tokenizer>,
        Box<dyn crate::backend::Backend>,
        usize,
        usize,
        crate::generation::GenerationDefaults,
    ) = match args.backend {
        BackendKind::Sim => {
            let names: Vec<&str> = crate::backend::sim::PRESETS
                .iter()
                .map(|(n, _)| *n)
                .collect();
            let latency = Latency::preset(&args.sim_preset)
                .ok_or_else(|| {
                    StartError::Flag(format!(
                        "unknown --sim-preset {:?}; known: {}",
                        args.sim_preset,
                        names.join(", ")
                    ))
                })?
                .with_overrides(&args.sim_latency);
            (
                Arc::new(SimTokenizer::new()),
                Box::new(SimBackend::new(
                    latency,
                    args.time_scale,
                    args.sim_eos_prob.clamp(0.0, 1.0),
                )),
                args.max_model_len.unwrap_or(8192),
                args.num_gpu_blocks.unwrap_or(16384),
                crate::generation::resolve(
                    &args.generation_config,
                    args.override_generation_config.as_ref(),
                    None,
                )
                .map_err(StartError::Flag)?,
            )
        }
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
    };
    let handle = spawn_engine(config, backend, metrics)?;
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
    })
}

/// The GGUF backend: model file (the default one fetched when none is given), its
/// tokenizer and template, its weights, and a KV pool sized from the memory flag.
#[allow(clippy::type_complexity)]
fn build_gguf(
    args: &EngineArgs,
) -> Result<
    (
        Arc<dyn Tokenizer>,
        Box<dyn crate::backend::Backend>,
        usize,
        usize,
        crate::generation::GenerationDefaults,
    ),
    StartError,
> {
    use crate::backend::gguf::{
        kv_cache::{KvCache, KvDtype},
        model::Model,
        GgufBackend,
    };
    let path = crate::model_store::resolve(args.model.as_deref().map(std::path::Path::new))
        .map_err(|e| StartError::Model(e.to_string()))?;
    let header = gguf::Gguf::open(&path).map_err(|e| StartError::Model(e.to_string()))?;
    let tokenizer = tokenizer::BpeTokenizer::from_gguf(&header)
        .map_err(|e| StartError::Model(e.to_string()))?;
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
    Ok((
        Arc::new(tokenizer),
        Box::new(backend),
        max_model_len,
        num_blocks,
        generation,
    ))
}

/// The HTTP routes.
pub fn router(engine: Engine) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/ping", get(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/kv_events", get(kv_events))
        .fallback(httpx::not_found)
        .method_not_allowed_fallback(httpx::method_not_allowed)
        .with_state(engine)
}

/// Serve until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Engine,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    httpx::serve(listener, router(engine), shutdown).await
}

/// Read a JSON body: JSON content type required, size limited (413), parsed with
/// vLLM-style validation errors (400).
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    engine: &Engine,
    req: Request,
) -> Result<T, ApiError> {
    read_json_probed::<T, T>(engine, req).await
}

/// [`read_json`] for bodies with flattened sampling fields (`P` names the bad field).
pub(crate) async fn read_json_probed<T, P>(engine: &Engine, req: Request) -> Result<T, ApiError>
where
    T: serde::de::DeserializeOwned,
    P: serde::de::DeserializeOwned,
{
    if !httpx::is_json(req.headers()) {
        return Err(ApiError::validation(
            "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
            None,
        ));
    }
    let (parts, body) = req.into_parts();
    let bytes = httpx::read_body(&parts.headers, body, engine.body_limit).await?;
    protocol::error::parse_json_body_probed::<T, P>(&bytes)
}

impl Engine {
    /// 404 unless `model` is absent or one of the served names.
    pub(crate) fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if !self.served.iter().any(|s| s == m) => {
                Err(ApiError::model_not_found(m, &self.served))
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn model_name(&self) -> &str {
        &self.served[0]
    }
}

async fn models(State(engine): State<Engine>) -> Response {
    let data = engine
        .served
        .iter()
        .map(|name| ModelCard {
            id: name.clone(),
            object: "model".into(),
            created: engine.created,
            owned_by: "vllm".into(),
            root: Some(engine.served[0].clone()),
            parent: None,
            max_model_len: Some(engine.max_model_len as u32),
        })
        .collect();
    json_ok(&ModelList {
        object: "list".into(),
        data,
    })
}

async fn tokenize(State(engine): State<Engine>, req: Request) -> Result<Response, ErrorResponse> {
    let body: TokenizeRequest = read_json(&engine, req).await?;
    engine.check_model(body.model.as_deref())?;
    let tokens = match (&body.messages, &body.prompt) {
        (Some(messages), _) => {
            let text = engine
                .tokenizer
                .apply_chat_template(messages, body.add_generation_prompt.unwrap_or(true))
                .map_err(|e| ApiError::bad_request(e, None))?;
            engine.tokenizer.encode(&text)
        }
        (None, Some(prompt)) if body.add_special_tokens.unwrap_or(true) => {
            engine.tokenizer.encode_prompt(prompt)
        }
        (None, Some(prompt)) => engine.tokenizer.encode(prompt),
        (None, None) => {
            return Err(ApiError::validation(
                "Either `prompt` or `messages` is required",
                Some("body.prompt"),
            )
            .into())
        }
    };
    let token_strs = body.return_token_strs.unwrap_or(false).then(|| {
        tokens
            .iter()
            .map(|t| engine.tokenizer.decode(&[*t], false))
            .collect()
    });
    Ok(json_ok(&TokenizeResponse {
        count: tokens.len(),
        max_model_len: engine.max_model_len as u32,
        tokens,
        token_strs,
    }))
}

async fn detokenize(State(engine): State<Engine>, req: Request) -> Result<Response, ErrorResponse> {
    let body: DetokenizeRequest = read_json(&engine, req).await?;
    engine.check_model(body.model.as_deref())?;
    Ok(json_ok(&DetokenizeResponse {
        prompt: engine.tokenizer.decode(&body.tokens, false),
    }))
}

async fn health() -> Response {
    Response::new(Body::empty())
}

async fn version() -> Response {
    json_ok(&serde_json::json!({ "version": VERSION }))
}

async fn metrics(State(engine): State<Engine>) -> Response {
    let mut r = Response::new(Body::from(engine.handle.metrics.render()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(protocol::prom::CONTENT_TYPE),
    );
    r
}

/// Where this engine publishes its KV-cache events (the real bound ports), so a router
/// finds them with no per-engine flags; 404 when events are off.
async fn kv_events(State(engine): State<Engine>) -> Response {
    match &engine.kv_events {
        Some(info) => json_ok(&serde_json::json!({
            "endpoint": info.endpoint,
            "replay_endpoint": info.replay_endpoint,
            "topic": info.topic,
            "block_size": engine.block_size,
        })),
        None => httpx::not_found().await,
    }
}

async fn reset_prefix_cache(State(engine): State<Engine>) -> Response {
    let (tx, rx) = std::sync::mpsc::channel();
    if !engine.handle.send(EngineCommand::ResetPrefixCache(tx)) {
        return ErrorResponse(ApiError::service_unavailable("engine stopped")).into_response();
    }
    let done = tokio::task::spawn_blocking(move || rx.recv().unwrap_or(false))
        .await
        .unwrap_or(false);
    if done {
        Response::new(Body::empty())
    } else {
        ErrorResponse(ApiError::bad_request(
            "Cannot reset the prefix cache while requests are running.",
            None,
        ))
        .into_response()
    }
}
