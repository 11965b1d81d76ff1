//! `switchyard engine` flags, named as `vllm serve`'s where they apply so scripts and
//! Helm values written for vLLM carry over.

use clap::{Args, ValueEnum};

use crate::backend::sim::LatencyModel;
use crate::generation::{GenerationDefaults, GenerationSource};
use crate::kv_publisher::KvEventsConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// A latency model on the real scheduler and block manager.
    Sim,
    /// A real llama-family (or qwen2) model from a GGUF file, on CPU.
    Gguf,
}

#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the chosen port is logged).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// TLS and the shutdown drain (`--ssl-certfile`, `--ssl-keyfile`, `--shutdown-timeout`).
    #[command(flatten)]
    pub serve: httpx::ServeArgs,
    /// The model. `gguf`: a GGUF file's path, or a short name fetched into the cache on
    /// first use: `smollm2` (SmolLM2-135M-Instruct Q4_1, the default) or `gemma3-270m`
    /// (Gemma 3 270M Q4_K_M); `sim`: a name (default `switchyard-sim`).
    #[arg(long)]
    pub model: Option<String>,
    /// Names the model is served under (the first is reported); defaults to --model.
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub served_model_name: Vec<String>,
    /// What runs the model: `gguf` (a real model from a GGUF file, on CPU; the default, as
    /// `vllm serve MODEL` serves the model it is given) or `sim` (a latency model, asked for
    /// by name).
    #[arg(long, value_enum, default_value_t = BackendKind::Gguf)]
    pub backend: BackendKind,
    /// Where default sampling parameters come from, for requests that leave them out:
    /// `auto` (the model's recommendation: the GGUF's `general.sampling.*` keys, else its
    /// model card's published settings), `vllm` (vLLM's neutral defaults), or a folder (or
    /// file) with a Hugging Face `generation_config.json`.
    #[arg(long, default_value = "auto", value_parser = GenerationSource::parse)]
    pub generation_config: GenerationSource,
    /// Default sampling parameters over those of --generation-config, as JSON: e.g.
    /// '{"temperature":0.5,"top_p":0.95,"top_k":40,"min_p":0.05,"repetition_penalty":1.1,
    /// "max_new_tokens":256}'.
    #[arg(long, value_parser = GenerationDefaults::parse_override)]
    pub override_generation_config: Option<GenerationDefaults>,
    /// Context length: prompt plus output tokens (default: the model's, 8192 for sim).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most tokens in one step (prefill chunks plus decodes).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks in the pool (vLLM: --num-gpu-blocks-override). Default: 16384 for sim;
    /// for gguf, what --kv-cache-memory-bytes holds.
    #[arg(long, alias = "num-gpu-blocks-override")]
    pub num_gpu_blocks: Option<usize>,
    /// `gguf`: memory for the KV cache, in bytes (default: $VLLM_CPU_KVCACHE_SPACE GiB as
    /// vLLM on CPU reads it, else 1 GiB).
    #[arg(long)]
    pub kv_cache_memory_bytes: Option<u64>,
    /// `gguf`: the KV cache's element type: `auto` (float16, as llama.cpp and vLLM keep KV
    /// in the model's 16-bit type), `float16`, or `float32` (twice the memory per token).
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
    /// `gguf`: keep an f32 copy of the weights for the prefill gemm (prefill about 1.25x
    /// faster than on the Q8_0 kernel) while it fits this many bytes; 0 keeps Q8_0 only,
    /// saving 4 bytes per weight (540 MB for SmolLM2-135M).
    #[arg(long, default_value_t = crate::backend::gguf::model::DEFAULT_F32_BUDGET_BYTES as u64)]
    pub cpu_f32_weights_max_bytes: u64,
    /// `gguf`: decode steps with at least this many sequences use the f32 gemm instead of
    /// the Q8_0 kernel. 0 (the default) never does, which keeps every sequence's output
    /// independent of its batch; the Q8_0 kernel won at every batch size measured.
    #[arg(long, default_value_t = 0)]
    pub cpu_decode_gemm_rows: usize,
    /// Automatic prefix caching (on by default).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Sim latency preset: llama-3.1-8b-h100, smollm2-135m-cpu or zero.
    #[arg(long, default_value = "llama-3.1-8b-h100")]
    pub sim_preset: String,
    /// A sim profile (`switchyard plan calibrate` writes them; a preset's name works
    /// too): its latency model replaces the preset's, and its KV pool size is the default
    /// of --num-gpu-blocks. The --sim-* cost flags still override it.
    #[arg(long)]
    pub sim_profile: Option<String>,
    #[command(flatten)]
    pub sim_latency: LatencyModel,
    /// Multiply every simulated duration (0.1 runs ten times faster than real time).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Probability that the sim backend ends a sequence at each token (unless ignore_eos).
    #[arg(long, default_value_t = 0.0)]
    pub sim_eos_prob: f64,
    /// KV-cache events, as vLLM's JSON: e.g. '{"enable_kv_cache_events":true,
    /// "publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558",
    /// "buffer_steps":10000,"hwm":100000,"topic":"kv"}'.
    #[arg(long, value_parser = KvEventsConfig::parse)]
    pub kv_events_config: Option<KvEventsConfig>,
    /// KV offloading as vLLM + LMCache configure it:
    /// '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}' (or kv_producer,
    /// kv_consumer). The tiers follow LMCache's settings from `LMCACHE_*` variables or
    /// the YAML file `LMCACHE_CONFIG_FILE` names: `chunk_size` (256), `local_cpu` (true),
    /// `max_local_cpu_size` (GiB, 5), `local_disk` (file:///path), `max_local_disk_size`
    /// (GiB), `remote_url` (lm://host:port[,lm://...], redis://, redis-sentinel://,
    /// redis-cluster://), `blocking_timeout_secs` (10).
    ///
    /// Prefill/decode disaggregation as vLLM's NixlConnector:
    /// '{"kv_connector":"NixlConnector","kv_role":"kv_both"}' (kv_producer: prefill only,
    /// kv_consumer: decode only), `kv_load_failure_policy` `recompute` (default) or
    /// `fail`, `kv_connector_extra_config.kv_lease_duration` (seconds; else
    /// `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`, else 30, as vLLM 0.32). The side channel listens on
    /// `VLLM_NIXL_SIDE_CHANNEL_HOST` (localhost) : `VLLM_NIXL_SIDE_CHANNEL_PORT` (5600).
    #[arg(long, value_parser = crate::kv_offload::KvTransferConfig::parse)]
    pub kv_transfer_config: Option<crate::kv_offload::KvTransferConfig>,
    /// The P/D side channel's port (NixlConnector), overriding
    /// `VLLM_NIXL_SIDE_CHANNEL_PORT`; 0: chosen by the OS (the bound port is advertised).
    #[arg(long)]
    pub kv_side_channel_port: Option<u16>,
    /// Largest accepted request body, in bytes (larger: 413).
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub max_request_body_bytes: usize,
    /// Require `Authorization: Bearer KEY` on every path but /health, /ping, /version,
    /// /metrics and /kv_events (else 401 `{"error":"Unauthorized"}`), as `vllm serve
    /// --api-key`; repeat for several keys. Default: `$VLLM_API_KEY`.
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true)]
    pub api_key: Vec<String>,
    /// Serve LoRA adapters as extra models (`--lora-modules`, runtime loading).
    #[arg(long)]
    pub enable_lora: bool,
    /// Most distinct LoRA adapters among running requests (one step batches them with the
    /// base model); requests for further adapters wait.
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,
    /// Highest LoRA rank accepted (a higher one is refused at load with a 400).
    #[arg(long, default_value_t = 16)]
    pub max_lora_rank: usize,
    /// LoRA adapters kept in memory (default: --max-loras); the least recently used are
    /// dropped and read again from their path when asked for.
    #[arg(long)]
    pub max_cpu_loras: Option<usize>,
    /// LoRA adapters served from the start, as `name=path` or JSON `{"name": ...,
    /// "path": ..., "base_model_name": ...}` (a PEFT folder or a llama.cpp LoRA .gguf).
    #[arg(long, num_args = 1.., value_parser = crate::lora::ModuleSpec::parse)]
    pub lora_modules: Vec<crate::lora::ModuleSpec>,
    /// `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (also on when
    /// `VLLM_ALLOW_RUNTIME_LORA_UPDATING` is true, as vLLM).
    #[arg(long)]
    pub allow_runtime_lora_updating: bool,
    /// Fault injection for resilience tests (hidden knobs, see `crate::fault`).
    #[command(flatten)]
    pub fault: crate::fault::FaultArgs,
    /// Accepted for vLLM compatibility; no effect here.
    #[arg(long, hide = true)]
    pub dtype: Option<String>,
    #[arg(long, hide = true)]
    pub tensor_parallel_size: Option<usize>,
    #[arg(long, hide = true)]
    pub gpu_memory_utilization: Option<f64>,
    #[arg(long, hide = true)]
    pub trust_remote_code: bool,
    #[arg(long, hide = true)]
    pub enable_chunked_prefill: bool,
    #[arg(long, hide = true)]
    pub disable_log_requests: bool,
}

impl EngineArgs {
    /// The served names: `--served-model-name`, else `--model` as given (vLLM's rule),
    /// else the backend's default model's name.
    pub fn served_names(&self) -> Vec<String> {
        if !self.served_model_name.is_empty() {
            return self.served_model_name.clone();
        }
        match (&self.model, self.backend) {
            (Some(m), _) => vec![m.clone()],
            (None, BackendKind::Sim) => vec!["switchyard-sim".into()],
            (None, BackendKind::Gguf) => vec![crate::model_store::DEFAULT_MODEL_NAME.into()],
        }
    }

    pub fn prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching
    }

    /// Runtime LoRA loading: the flag, or `VLLM_ALLOW_RUNTIME_LORA_UPDATING` (`1`/`true`).
    pub fn runtime_lora_updating(&self) -> bool {
        self.allow_runtime_lora_updating
            || std::env::var("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
                .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true"))
    }
}
