//! `switchyard router` flags (the Production Stack router's names and meanings) and the
//! dynamic config file (JSON, same keys with underscores), re-read when it changes.
//!
//! [`Settings`] is the merged, validated view every other module reads. Flags given on
//! the command line win over the file's values at start; a later change of the file
//! replaces the backends, models, aliases, routing logic and session key, and the service
//! discovery (static lists or the Kubernetes watch and its namespace, selector and port).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

mod resilience;
pub use resilience::{BreakerSettings, Resilience, ResilienceArgs, RetrySettings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingLogic {
    /// Rotate over the model's engines.
    Roundrobin,
    /// Consistent hashing of the session id (header or body field); least load without.
    Session,
    /// Fewest requests in flight, ties broken by the engines' queue.
    #[value(alias = "least-load")]
    Leastload,
    /// Power of two choices: the less loaded of two engines picked at random.
    #[value(name = "p2c", alias = "power-of-two")]
    #[serde(rename = "p2c")]
    P2c,
    /// Follow an approximate prefix tree of past prompts while the pool is balanced;
    /// least load otherwise (SGLang's cache-aware manner).
    #[value(name = "prefixaware", alias = "prefix-aware")]
    #[serde(rename = "prefixaware")]
    Prefixaware,
    /// Follow the engines' KV-cache events: the lowest cost of uncached prefill blocks
    /// (weighted) plus active blocks (Dynamo's manner); least load without events.
    #[value(name = "kvaware", alias = "kv-aware")]
    #[serde(rename = "kvaware")]
    Kvaware,
    /// Prefill/decode disaggregation (vLLM's NixlConnector contract): each completion or
    /// chat goes first to a prefill engine (`--prefill-model-labels`, ranked cache-aware
    /// as `prefixaware`) with `max_tokens: 1`, then with the `kv_transfer_params` it
    /// answered to a decode engine (`--decode-model-labels`, least load). Other paths go
    /// to decode engines. (The Production Stack router calls this contract
    /// `disaggregated_prefill_orchestrated`, accepted too; its own `disaggregated_prefill`
    /// leaves the KV hand-off to LMCache and sends no `kv_transfer_params`.)
    #[value(
        name = "disaggregated_prefill",
        aliases = ["disaggregated-prefill", "disaggregated_prefill_orchestrated"]
    )]
    #[serde(
        rename = "disaggregated_prefill",
        alias = "disaggregated_prefill_orchestrated"
    )]
    DisaggregatedPrefill,
}

/// The `prefixaware` policy's knobs (see `policy::prefix`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixSettings {
    /// Follow the cache when the longest match covers more than this fraction of the
    /// prompt.
    pub match_threshold: f64,
    /// The pool is imbalanced (least load wins) when max - min in-flight exceeds this...
    pub balance_abs: u64,
    /// ...and max exceeds min times this.
    pub balance_rel: f64,
    /// Memory the prefix trees may hold (text bytes plus bookkeeping), all models.
    pub max_chars: usize,
}

impl Default for PrefixSettings {
    fn default() -> Self {
        PrefixSettings {
            match_threshold: 0.5,
            balance_abs: 32,
            balance_rel: 1.5,
            max_chars: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryKind {
    /// `--static-backends` (and the dynamic config file's list).
    Static,
    /// Watch the engine pods (or Services) in a namespace through the Kubernetes API.
    K8s,
}

/// What `--service-discovery k8s` watches, and so what an engine's URL is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
pub enum K8sDiscoveryType {
    /// Pods: each ready pod is an engine at `http://POD_IP:--k8s-port`.
    #[value(name = "pod-ip")]
    #[serde(rename = "pod-ip")]
    PodIp,
    /// Services: each Service is an engine at `http://NAME.NAMESPACE.svc:--k8s-port`, and
    /// Kubernetes spreads its requests over the Service's pods.
    #[value(name = "service-name")]
    #[serde(rename = "service-name")]
    ServiceName,
}

/// `--service-discovery k8s`: where and what to watch (see `discovery::k8s`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sSettings {
    pub namespace: String,
    /// A Kubernetes label selector (`app=vllm,env in (a,b)`), passed to the API as is.
    pub label_selector: String,
    /// The engines' port (pod-ip: the container port; service-name: the Service port).
    pub port: u16,
    pub kind: K8sDiscoveryType,
    /// The watch's `timeoutSeconds`; 0 leaves it to the API server.
    pub watcher_timeout_seconds: u64,
}

/// Where the engine set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// The backends listed in the flags or the dynamic config file.
    Static,
    /// A watch over the Kubernetes API; the backend list is not used.
    K8s(K8sSettings),
}

/// The service account's namespace file, the default of `--k8s-namespace` in a pod.
pub const SA_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

#[derive(Debug, Clone, Args)]
pub struct RouterArgs {
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    #[arg(long, default_value_t = 8001)]
    pub port: u16,
    /// TLS and the shutdown drain (`--ssl-certfile`, `--ssl-keyfile`, `--shutdown-timeout`).
    #[command(flatten)]
    pub serve: httpx::ServeArgs,
    /// `static` (the default) or `k8s`.
    #[arg(long, value_enum)]
    pub service_discovery: Option<DiscoveryKind>,
    /// `k8s`: the namespace of the engine pods [default: the router's own (the service
    /// account's namespace file), else `default`].
    #[arg(long)]
    pub k8s_namespace: Option<String>,
    /// `k8s`: the label selector of the engine pods (or Services) [default: all].
    #[arg(long)]
    pub k8s_label_selector: Option<String>,
    /// `k8s`: the port the engines serve on [default: 8000].
    #[arg(long)]
    pub k8s_port: Option<u16>,
    /// `k8s`: `pod-ip` (an engine per ready pod) or `service-name` (an engine per Service)
    /// [default: pod-ip].
    #[arg(long, value_enum)]
    pub k8s_service_discovery_type: Option<K8sDiscoveryType>,
    /// `k8s`: the watch's `timeoutSeconds`: the API server ends each watch after this
    /// long and the router resumes it from where it was; 0 leaves it to the server
    /// [default: 0].
    #[arg(long)]
    pub k8s_watcher_timeout_seconds: Option<u64>,
    /// `k8s`: the Kubernetes API server (`https://HOST:PORT`, or `http://` for
    /// `kubectl proxy`) [default: in a pod, `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`].
    #[arg(long)]
    pub k8s_api_server: Option<String>,
    /// `k8s`: a file holding the bearer token, re-read as it rotates [default: the
    /// service account's token, when present].
    #[arg(long)]
    pub k8s_token_file: Option<PathBuf>,
    /// `k8s`: PEM file of the CA that signed the API server's certificate [default: the
    /// service account's `ca.crt`].
    #[arg(long)]
    pub k8s_ca_file: Option<PathBuf>,
    /// `k8s`: kubeconfig to reach the API server from outside a cluster (token or client
    /// certificate) [default out of a pod, without --k8s-api-server: $KUBECONFIG, else
    /// ~/.kube/config].
    #[arg(long)]
    pub k8s_kubeconfig: Option<PathBuf>,
    /// `k8s`: the kubeconfig context to use [default: its current-context].
    #[arg(long)]
    pub k8s_context: Option<String>,
    /// Engine base URLs, comma separated.
    #[arg(long)]
    pub static_backends: Option<String>,
    /// The model of each backend, in the same order (comma separated); discovered from
    /// each backend's /v1/models when omitted.
    #[arg(long)]
    pub static_models: Option<String>,
    /// The model label of each backend (its Kubernetes pod label `model` under k8s
    /// discovery), in the order of `--static-backends`, comma separated; an empty entry
    /// leaves a backend unlabelled. `disaggregated_prefill` sorts engines into prefill and
    /// decode by it.
    #[arg(long)]
    pub static_model_labels: Option<String>,
    /// `disaggregated_prefill`: the model labels of prefill engines, comma separated.
    #[arg(long)]
    pub prefill_model_labels: Option<String>,
    /// `disaggregated_prefill`: the model labels of decode engines, comma separated.
    #[arg(long)]
    pub decode_model_labels: Option<String>,
    /// `alias:model` pairs, comma separated.
    #[arg(long)]
    pub static_aliases: Option<String>,
    /// Models to answer 503 (and count as incoming) while no engine serves them, rather
    /// than 404: for engines scaled to zero (KEDA scales them up on the incoming rate),
    /// even before this router has seen one. Comma separated.
    #[arg(long)]
    pub known_models: Option<String>,
    /// `kvaware`: each backend's KV-event endpoint (`tcp://HOST:PORT`), in the order of
    /// `--static-backends`, comma separated; an empty entry keeps the default (the
    /// engine's advertisement, else its host and `--kv-events-port`). For several vLLM
    /// engines on one host, each publishing on its own port.
    #[arg(long)]
    pub static_kv_events_endpoints: Option<String>,
    /// `kvaware`: the tokenizer (a GGUF model file) to render and tokenize prompts with,
    /// as the engines do; `MODEL=PATH` for one model, a bare `PATH` for every model without
    /// its own. Repeatable. Without it, prompts are tokenized as Switchyard's sim engines
    /// do.
    #[arg(long = "tokenizer", value_name = "[MODEL=]PATH")]
    pub tokenizers: Vec<String>,
    #[arg(long, value_enum)]
    pub routing_logic: Option<RoutingLogic>,
    /// The header (or JSON body field) holding the session id for `session` routing.
    #[arg(long)]
    pub session_key: Option<String>,
    /// `prefixaware`: follow the cache when the longest match covers more than this
    /// fraction of the prompt's text (0..1).
    #[arg(long, default_value_t = 0.5)]
    pub prefix_match_threshold: f64,
    /// `prefixaware`: the pool counts as imbalanced (least load wins over the cache) when
    /// the most and least loaded engines differ by more than this many requests in
    /// flight...
    #[arg(long, default_value_t = 32)]
    pub balance_abs_threshold: u64,
    /// ...and the most loaded carries more than this many times the least loaded's.
    #[arg(long, default_value_t = 1.5)]
    pub balance_rel_threshold: f64,
    /// `prefixaware`: memory the prefix trees may use, in bytes of prompt text plus
    /// per-node bookkeeping (least recently used prompts are evicted beyond it).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub prefix_cache_max_chars: usize,
    /// `kvaware`: weight of the prompt's uncached blocks (prefill work) against the
    /// engine's active blocks in the cost. The default of 16 was measured on multi-round
    /// QA (BENCHMARKS.md): at 1 one extra request in flight outweighs re-prefilling a
    /// whole conversation, so conversations keep moving and the hit rate falls below
    /// round robin's; at 4, under saturation (48 users), in-flight differences of a few
    /// requests still moved conversations (84.6% hit against 89.8% at 16, 12% fewer
    /// requests served).
    #[arg(long, default_value_t = 16.0)]
    pub kv_overlap_weight: f64,
    /// `kvaware`: when no engine holds more than this fraction of the prompt (say only a
    /// system prompt every user shares), the request goes to the least loaded engine with
    /// the emptiest cache instead of piling new conversations onto whichever engine
    /// cached the common part first.
    #[arg(long, default_value_t = 0.3)]
    pub kv_min_match: f64,
    /// Requests for a LoRA adapter go first to the adapter's home engine (rendezvous
    /// hashing, spilling over when it has 1.25x the mean load), so each engine keeps few
    /// adapters active; the routing logic orders the rest, and base-model requests.
    #[arg(long)]
    pub lora_affinity: bool,
    /// `kvaware`: the port engines that do not advertise their KV-event endpoint (real
    /// vLLM) publish on, at their own host.
    #[arg(long, default_value_t = 5557)]
    pub kv_events_port: u16,
    /// Seconds between scrapes of each engine's /metrics (and model refreshes).
    #[arg(long, default_value_t = 30)]
    pub engine_stats_interval: u64,
    /// Sliding window, in seconds, of the per-engine request statistics.
    #[arg(long, default_value_t = 60)]
    pub request_stats_window: u64,
    /// Seconds between health checks of each engine.
    #[arg(long, default_value_t = 5.0)]
    pub health_check_interval: f64,
    /// Consecutive failed checks (or failed connects) before an engine is ejected.
    #[arg(long, default_value_t = 3)]
    pub health_failure_threshold: u32,
    /// Consecutive good checks before an ejected engine is readmitted.
    #[arg(long, default_value_t = 2)]
    pub health_success_threshold: u32,
    /// Seconds to wait for an upstream TCP connection.
    #[arg(long, default_value_t = 3.0)]
    pub connect_timeout: f64,
    /// Seconds to wait for an upstream's first byte: its response headers and the first
    /// frame of its body (until then the request can still go to another engine).
    #[arg(long, default_value_t = 600.0)]
    pub first_byte_timeout: f64,
    /// Upstream attempts per request (the first try plus retries), over the ranking's
    /// engines in order (SGLang: --retry-max-retries).
    #[arg(long, alias = "retry-max-retries", default_value_t = 3)]
    pub max_attempts: usize,
    /// Largest accepted request body, in bytes (larger: 413).
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_request_body_bytes: usize,
    /// `Retry-After` seconds on a 503 for a known model with no healthy engine.
    #[arg(long, default_value_t = 5)]
    pub retry_after: u64,
    /// API keys, rate limits and admission control (see `admission`).
    #[command(flatten)]
    pub admission: AdmissionArgs,
    /// Mid-stream failover: when an engine dies or stalls after part of a streamed
    /// completion reached the client, continue the answer on another engine (prompt +
    /// text so far), at most this many times per request; 0 turns it off.
    #[arg(long, default_value_t = 2)]
    pub stream_resume_attempts: u32,
    /// Seconds without a frame from an engine that is streaming tokens after which the
    /// stream counts as stalled and is continued elsewhere (0: never).
    #[arg(long, default_value_t = 5.0)]
    pub stream_stall_timeout_secs: f64,
    /// Worker threads serving requests, each with its own listener and upstream pool
    /// (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// JSON file with the same settings (underscored keys), re-read when it changes.
    #[arg(long, conflicts_with = "dynamic_config_yaml")]
    pub dynamic_config_json: Option<PathBuf>,
    /// The same as a YAML file.
    #[arg(long)]
    pub dynamic_config_yaml: Option<PathBuf>,
    /// Seconds between checks of the dynamic config file.
    #[arg(long, default_value_t = 10.0)]
    pub dynamic_config_interval: f64,
    /// Export a span per request (and per upstream attempt) of sampled traces to this
    /// OTLP/HTTP collector, as JSON (`http://HOST:4318`; `/v1/traces` is added when the
    /// URL has no path). Batched, from a bounded queue that drops when full.
    #[arg(long, value_name = "URL")]
    pub otlp_traces_endpoint: Option<String>,
    /// Health-check timeout, circuit breaker, retries (`config::resilience`).
    #[command(flatten)]
    pub resilience: ResilienceArgs,
}

/// A secret from the command line or the environment: never printed (`Debug` hides it).
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// The front door's flags: API keys, rate limits, admission control (`admission`).
#[derive(Debug, Clone, Args)]
pub struct AdmissionArgs {
    /// API keys (YAML, or JSON when the name ends in .json): `keys:` a list of `name`,
    /// `key` or `key_sha256`, optional `models` and `limits` (`requests_per_minute`,
    /// `tokens_per_minute`). Every path but /health, /version, /metrics, /engines and
    /// /dashboard then needs `Authorization: Bearer KEY`. Re-read when it changes; a
    /// file that does not parse keeps the keys in force.
    #[arg(long, value_name = "PATH")]
    pub api_keys_file: Option<PathBuf>,
    /// One key every client may use (named `shared`), as `vllm serve --api-key`.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<Secret>,
    /// The bearer token the router sends to engines (model discovery, and proxied
    /// requests when router keys are on; without router keys the client's header is
    /// forwarded) [default: $VLLM_API_KEY].
    #[arg(long, value_name = "KEY", env = "VLLM_API_KEY", hide_env_values = true)]
    pub engine_api_key: Option<Secret>,
    /// Seconds between checks of --api-keys-file.
    #[arg(long, default_value_t = 5.0)]
    pub api_keys_interval: f64,
    /// Requests the router handles at once, from admission to the end of the response
    /// body (streams included); 0: no limit.
    #[arg(long, default_value_t = 0)]
    pub max_concurrent_requests: usize,
    /// With --max-concurrent-requests: requests that may wait for a slot (FIFO); more
    /// get 429 with `Retry-After`.
    #[arg(long, default_value_t = 100)]
    pub queue_size: usize,
    /// With --max-concurrent-requests: seconds a request may wait for a slot, then 408.
    #[arg(long, default_value_t = 60.0)]
    pub queue_timeout_secs: f64,
}

/// The dynamic config file. Lists may be JSON arrays or comma-separated strings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub service_discovery: Option<DiscoveryKind>,
    #[serde(default)]
    pub routing_logic: Option<RoutingLogic>,
    #[serde(default)]
    pub session_key: Option<String>,
    #[serde(default)]
    pub static_backends: Option<StrList>,
    #[serde(default)]
    pub static_models: Option<StrList>,
    #[serde(default)]
    pub static_model_labels: Option<StrList>,
    #[serde(default)]
    pub prefill_model_labels: Option<StrList>,
    #[serde(default)]
    pub decode_model_labels: Option<StrList>,
    #[serde(default)]
    pub static_aliases: Option<StrList>,
    #[serde(default)]
    pub known_models: Option<StrList>,
    #[serde(default)]
    pub static_kv_events_endpoints: Option<StrList>,
    #[serde(default)]
    pub k8s_namespace: Option<String>,
    #[serde(default)]
    pub k8s_label_selector: Option<String>,
    #[serde(default)]
    pub k8s_port: Option<u16>,
    #[serde(default)]
    pub k8s_service_discovery_type: Option<K8sDiscoveryType>,
    #[serde(default)]
    pub k8s_watcher_timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StrList {
    Csv(String),
    List(Vec<String>),
}

impl StrList {
    fn items(&self) -> Vec<String> {
        match self {
            StrList::Csv(s) => split_csv(s),
            StrList::List(v) => v
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }
}

impl StrList {
    /// Like `items`, but an empty entry keeps its place (for lists aligned with backends).
    fn items_keeping_empty(&self) -> Vec<String> {
        match self {
            StrList::Csv(s) => s.split(',').map(|x| x.trim().to_string()).collect(),
            StrList::List(v) => v.iter().map(|s| s.trim().to_string()).collect(),
        }
    }
}

fn split_csv(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// One configured engine.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BackendSpec {
    pub url: String,
    /// Its model when configured; discovered from /v1/models otherwise.
    pub model: Option<String>,
    /// Where it publishes KV-cache events, when configured; otherwise its advertisement
    /// (Switchyard) or `tcp://HOST:--kv-events-port` (vLLM).
    pub kv_events: Option<String>,
    /// Its model label (`--static-model-labels`, or the pod label `model`).
    pub label: Option<String>,
}

/// `disaggregated_prefill`'s two sides, by model label.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PdLabels {
    pub prefill: Vec<String>,
    pub decode: Vec<String>,
}

impl PdLabels {
    pub fn is_prefill(&self, label: Option<&str>) -> bool {
        label.is_some_and(|l| self.prefill.iter().any(|p| p == l))
    }

    pub fn is_decode(&self, label: Option<&str>) -> bool {
        label.is_some_and(|l| self.decode.iter().any(|d| d == l))
    }
}

/// The settings that can change at run time.
#[derive(Debug, Clone, PartialEq)]
pub struct Dynamic {
    pub discovery: Discovery,
    pub routing_logic: RoutingLogic,
    pub session_key: Option<String>,
    pub backends: Vec<BackendSpec>,
    pub aliases: HashMap<String, String>,
    /// `--known-models`: always remembered, so they get 503 (not 404) with no engine.
    pub known_models: Vec<String>,
    pub prefix: PrefixSettings,
    /// `kvaware`'s `--kv-overlap-weight`.
    pub kv_overlap_weight: f64,
    /// `kvaware`'s `--kv-min-match`.
    pub kv_min_match: f64,
    /// `--lora-affinity`.
    pub lora_affinity: bool,
    /// `disaggregated_prefill`'s prefill and decode labels.
    pub pd: PdLabels,
}

/// Everything the router runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub dynamic: Dynamic,
    pub engine_stats_interval: Duration,
    pub request_stats_window: u64,
    pub health_interval: Duration,
    pub health_failures: u32,
    pub health_successes: u32,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub max_attempts: usize,
    pub body_limit: usize,
    pub retry_after: u64,
    pub config_file: Option<PathBuf>,
    pub config_interval: Duration,
    /// Health-check timeout, circuit breaker, retries.
    pub resilience: Resilience,
}

fn secs(v: f64, name: &str) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ConfigError::Invalid(format!(
            "--{name} must be a positive number of seconds"
        )))
    }
}

pub fn read_file(path: &PathBuf) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
    let parsed = if yaml {
        serde_yaml::from_slice(&text).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(&text).map_err(|e| e.to_string())
    };
    parsed.map_err(|message| ConfigError::Parse {
        path: path.clone(),
        message,
    })
}

/// Build the dynamic part from flags (which win) and a file.
pub fn dynamic_from(args: &RouterArgs, file: &FileConfig) -> Result<Dynamic, ConfigError> {
    let discovery = discovery_from(args, file)?;
    // Under k8s the engines come from the watch: static lists are not read.
    let backends = if discovery == Discovery::Static {
        backends_from(args, file)?
    } else {
        Vec::new()
    };
    let aliases = aliases_from(args, file)?;
    let prefix = prefix_from(args)?;
    check_kvaware(args)?;
    let routing_logic = args
        .routing_logic
        .or(file.routing_logic)
        .unwrap_or(RoutingLogic::Roundrobin);
    let pd = PdLabels {
        prefill: list(
            args.prefill_model_labels.as_ref(),
            file.prefill_model_labels.as_ref(),
        ),
        decode: list(
            args.decode_model_labels.as_ref(),
            file.decode_model_labels.as_ref(),
        ),
    };
    if routing_logic == RoutingLogic::DisaggregatedPrefill {
        if pd.prefill.is_empty() || pd.decode.is_empty() {
            return Err(ConfigError::Invalid(
                "--routing-logic disaggregated_prefill needs --prefill-model-labels and \
                 --decode-model-labels (the `model` labels of the prefill and decode engines)"
                    .into(),
            ));
        }
        if let Some(both) = pd.prefill.iter().find(|l| pd.decode.contains(l)) {
            return Err(ConfigError::Invalid(format!(
                "model label `{both}` is in both --prefill-model-labels and --decode-model-labels"
            )));
        }
    }
    Ok(Dynamic {
        discovery,
        prefix,
        kv_overlap_weight: args.kv_overlap_weight,
        kv_min_match: args.kv_min_match,
        lora_affinity: args.lora_affinity,
        pd,
        routing_logic,
        session_key: args
            .session_key
            .clone()
            .or_else(|| file.session_key.clone()),
        backends,
        aliases,
        known_models: list(args.known_models.as_ref(), file.known_models.as_ref()),
    })
}

/// A list from its flag (comma separated) when given, else from the file.
fn list(flag: Option<&String>, file: Option<&StrList>) -> Vec<String> {
    match flag {
        Some(s) => split_csv(s),
        None => file.map(StrList::items).unwrap_or_default(),
    }
}

/// [`list`], keeping empty entries in their place (lists aligned with the backends).
fn list_keeping_empty(flag: Option<&String>, file: Option<&StrList>) -> Vec<String> {
    match flag {
        Some(s) => StrList::Csv(s.clone()).items_keeping_empty(),
        None => file.map(StrList::items_keeping_empty).unwrap_or_default(),
    }
}

/// Static lists, or the Kubernetes watch and what it watches.
fn discovery_from(args: &RouterArgs, file: &FileConfig) -> Result<Discovery, ConfigError> {
    let kind = args
        .service_discovery
        .or(file.service_discovery)
        .unwrap_or(DiscoveryKind::Static);
    if kind == DiscoveryKind::Static {
        return Ok(Discovery::Static);
    }
    let k = K8sSettings {
        namespace: args
            .k8s_namespace
            .clone()
            .or_else(|| file.k8s_namespace.clone())
            .or_else(|| {
                std::fs::read_to_string(SA_NAMESPACE_FILE)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "default".into()),
        label_selector: args
            .k8s_label_selector
            .clone()
            .or_else(|| file.k8s_label_selector.clone())
            .unwrap_or_default()
            .trim()
            .to_string(),
        port: args.k8s_port.or(file.k8s_port).unwrap_or(8000),
        kind: args
            .k8s_service_discovery_type
            .or(file.k8s_service_discovery_type)
            .unwrap_or(K8sDiscoveryType::PodIp),
        watcher_timeout_seconds: args
            .k8s_watcher_timeout_seconds
            .or(file.k8s_watcher_timeout_seconds)
            .unwrap_or(0),
    };
    if k.namespace.is_empty() || k.port == 0 {
        return Err(ConfigError::Invalid(
            "--k8s-namespace must not be empty and --k8s-port must be a port".into(),
        ));
    }
    Ok(Discovery::K8s(k))
}

/// The static backends, each with its model and KV-event endpoint when listed (lists
/// aligned with the backends, in order).
fn backends_from(args: &RouterArgs, file: &FileConfig) -> Result<Vec<BackendSpec>, ConfigError> {
    let backends = list(args.static_backends.as_ref(), file.static_backends.as_ref());
    let models = list(args.static_models.as_ref(), file.static_models.as_ref());
    if !models.is_empty() && models.len() != backends.len() {
        return Err(ConfigError::Invalid(format!(
            "--static-models lists {} models for {} backends: give one model per backend, in order",
            models.len(),
            backends.len()
        )));
    }
    let kv_endpoints = list_keeping_empty(
        args.static_kv_events_endpoints.as_ref(),
        file.static_kv_events_endpoints.as_ref(),
    );
    if !kv_endpoints.is_empty() && kv_endpoints.len() != backends.len() {
        return Err(ConfigError::Invalid(format!(
            "--static-kv-events-endpoints lists {} endpoints for {} backends: give one per backend, in order (an empty entry keeps the default)",
            kv_endpoints.len(),
            backends.len()
        )));
    }
    let labels = list_keeping_empty(
        args.static_model_labels.as_ref(),
        file.static_model_labels.as_ref(),
    );
    if !labels.is_empty() && labels.len() != backends.len() {
        return Err(ConfigError::Invalid(format!(
            "--static-model-labels lists {} labels for {} backends: give one label per backend, in order (an empty entry leaves one unlabelled)",
            labels.len(),
            backends.len()
        )));
    }
    let mut specs = Vec::with_capacity(backends.len());
    for (i, b) in backends.iter().enumerate() {
        let url = normalize_url(b)?;
        let kv_events = match kv_endpoints.get(i).map(String::as_str) {
            None | Some("") => None,
            Some(e) if e.starts_with("tcp://") && e.rsplit_once(':').is_some() => {
                Some(e.to_string())
            }
            Some(e) => {
                return Err(ConfigError::Invalid(format!(
                    "--static-kv-events-endpoints: `{e}` is not tcp://HOST:PORT"
                )))
            }
        };
        specs.push(BackendSpec {
            url,
            model: models.get(i).cloned(),
            kv_events,
            label: labels.get(i).filter(|l| !l.is_empty()).cloned(),
        });
    }
    Ok(specs)
}

/// `alias:model` pairs.
fn aliases_from(
    args: &RouterArgs,
    file: &FileConfig,
) -> Result<HashMap<String, String>, ConfigError> {
    let mut aliases = HashMap::new();
    for a in list(args.static_aliases.as_ref(), file.static_aliases.as_ref()) {
        let (alias, model) = a
            .split_once(':')
            .ok_or_else(|| ConfigError::Invalid(format!("alias {a:?} is not alias:model")))?;
        aliases.insert(alias.trim().to_string(), model.trim().to_string());
    }
    Ok(aliases)
}

/// The `prefixaware` knobs, checked.
fn prefix_from(args: &RouterArgs) -> Result<PrefixSettings, ConfigError> {
    let prefix = PrefixSettings {
        match_threshold: args.prefix_match_threshold,
        balance_abs: args.balance_abs_threshold,
        balance_rel: args.balance_rel_threshold,
        max_chars: args.prefix_cache_max_chars,
    };
    if !(0.0..=1.0).contains(&prefix.match_threshold)
        || !prefix.balance_rel.is_finite()
        || prefix.balance_rel < 1.0
        || prefix.max_chars == 0
    {
        return Err(ConfigError::Invalid(
            "--prefix-match-threshold must be within 0..1, --balance-rel-threshold at least 1 \
             and --prefix-cache-max-chars positive"
                .into(),
        ));
    }
    Ok(prefix)
}

/// The `kvaware` knobs are in range.
fn check_kvaware(args: &RouterArgs) -> Result<(), ConfigError> {
    if !args.kv_overlap_weight.is_finite() || args.kv_overlap_weight < 0.0 {
        return Err(ConfigError::Invalid(
            "--kv-overlap-weight must be a non-negative number".into(),
        ));
    }
    if !(0.0..=1.0).contains(&args.kv_min_match) {
        return Err(ConfigError::Invalid(
            "--kv-min-match must be between 0 and 1".into(),
        ));
    }
    Ok(())
}

/// `http://host:port` with no trailing slash; only plain HTTP upstreams are supported.
pub fn normalize_url(s: &str) -> Result<String, ConfigError> {
    let s = s.trim().trim_end_matches('/');
    let rest = s.strip_prefix("http://").ok_or_else(|| {
        ConfigError::Invalid(format!("backend {s:?}: only http:// URLs are supported"))
    })?;
    if rest.is_empty() || rest.contains('/') {
        return Err(ConfigError::Invalid(format!(
            "backend {s:?}: expected http://host:port"
        )));
    }
    Ok(s.to_string())
}

impl Settings {
    pub fn from_args(args: &RouterArgs) -> Result<Settings, ConfigError> {
        let file = match args
            .dynamic_config_json
            .as_ref()
            .or(args.dynamic_config_yaml.as_ref())
        {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let dynamic = dynamic_from(args, &file)?;
        if dynamic.discovery == Discovery::Static && dynamic.backends.is_empty() {
            return Err(ConfigError::Invalid(
                "no backends: give --static-backends (or static_backends in --dynamic-config-json), \
                 or --service-discovery k8s"
                    .into(),
            ));
        }
        if args.max_attempts == 0
            || args.request_stats_window == 0
            || args.engine_stats_interval == 0
        {
            return Err(ConfigError::Invalid(
                "--max-attempts, --request-stats-window and --engine-stats-interval must be positive".into(),
            ));
        }
        Ok(Settings {
            host: args.host.clone(),
            port: args.port,
            dynamic,
            engine_stats_interval: Duration::from_secs(args.engine_stats_interval),
            request_stats_window: args.request_stats_window,
            health_interval: secs(args.health_check_interval, "health-check-interval")?,
            health_failures: args.health_failure_threshold.max(1),
            health_successes: args.health_success_threshold.max(1),
            connect_timeout: secs(args.connect_timeout, "connect-timeout")?,
            first_byte_timeout: secs(args.first_byte_timeout, "first-byte-timeout")?,
            max_attempts: args.max_attempts,
            body_limit: args.max_request_body_bytes,
            retry_after: args.retry_after,
            config_file: args
                .dynamic_config_json
                .clone()
                .or_else(|| args.dynamic_config_yaml.clone()),
            config_interval: secs(args.dynamic_config_interval, "dynamic-config-interval")?,
            resilience: args.resilience.settings()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: RouterArgs,
    }

    fn args(v: &[&str]) -> RouterArgs {
        T::parse_from(std::iter::once("router").chain(v.iter().copied())).a
    }

    #[test]
    fn production_stack_flags_parse_with_their_meaning() {
        let a = args(&[
            "--service-discovery",
            "static",
            "--static-backends",
            "http://a:1,http://b:2/",
            "--static-models",
            "m1,m2",
            "--static-aliases",
            "gpt-4:m1",
            "--routing-logic",
            "session",
            "--session-key",
            "x-user-id",
            "--engine-stats-interval",
            "15",
            "--request-stats-window",
            "30",
        ]);
        let s = Settings::from_args(&a).expect("valid");
        assert_eq!(
            s.dynamic.backends[1],
            BackendSpec {
                url: "http://b:2".into(),
                model: Some("m2".into()),
                kv_events: None,
                label: None,
            }
        );
        assert_eq!(
            s.dynamic.aliases.get("gpt-4").map(String::as_str),
            Some("m1")
        );
        assert_eq!(s.dynamic.routing_logic, RoutingLogic::Session);
        assert_eq!(s.dynamic.session_key.as_deref(), Some("x-user-id"));
        assert_eq!(s.engine_stats_interval, Duration::from_secs(15));
        assert_eq!(s.request_stats_window, 30);
    }

    #[test]
    fn disaggregated_prefill_takes_labels_aligned_with_the_backends() {
        let s = Settings::from_args(&args(&[
            "--static-backends",
            "http://p:1,http://d:2,http://x:3",
            "--static-model-labels",
            "m-prefill,m-decode,",
            "--routing-logic",
            "disaggregated_prefill",
            "--prefill-model-labels",
            "m-prefill",
            "--decode-model-labels",
            "m-decode,other-decode",
        ]))
        .expect("valid");
        let d = &s.dynamic;
        assert_eq!(d.routing_logic, RoutingLogic::DisaggregatedPrefill);
        let labels: Vec<Option<&str>> = d.backends.iter().map(|b| b.label.as_deref()).collect();
        assert_eq!(labels, [Some("m-prefill"), Some("m-decode"), None]);
        assert_eq!(d.pd.prefill, ["m-prefill"]);
        assert_eq!(d.pd.decode, ["m-decode", "other-decode"]);
        assert!(d.pd.is_prefill(Some("m-prefill")) && !d.pd.is_prefill(None));
        assert!(d.pd.is_decode(Some("other-decode")) && !d.pd.is_decode(Some("m-prefill")));

        let err = |v: &[&str]| {
            Settings::from_args(&args(v))
                .expect_err("invalid")
                .to_string()
        };
        let e = err(&[
            "--static-backends",
            "http://p:1,http://d:2",
            "--static-model-labels",
            "m-prefill",
        ]);
        assert!(
            e.contains("--static-model-labels lists 1 labels for 2 backends"),
            "{e}"
        );
        let e = err(&[
            "--static-backends",
            "http://p:1",
            "--routing-logic",
            "disaggregated_prefill",
            "--prefill-model-labels",
            "m-prefill",
        ]);
        assert!(e.contains("--decode-model-labels"), "{e}");
        let e = err(&[
            "--static-backends",
            "http://p:1",
            "--routing-logic",
            "disaggregated_prefill",
            "--prefill-model-labels",
            "a,b",
            "--decode-model-labels",
            "b",
        ]);
        assert!(e.contains("`b` is in both"), "{e}");

        let file: FileConfig = serde_json::from_str(
            r#"{"routing_logic":"disaggregated_prefill","static_backends":["http://p:1","http://d:2"],
                "static_model_labels":["m-prefill","m-decode"],"prefill_model_labels":"m-prefill",
                "decode_model_labels":["m-decode"]}"#,
        )
        .expect("file");
        let d = dynamic_from(&args(&[]), &file).expect("valid");
        assert_eq!(d.routing_logic, RoutingLogic::DisaggregatedPrefill);
        assert_eq!(d.backends[1].label.as_deref(), Some("m-decode"));
        let a = args(&["--routing-logic", "disaggregated_prefill_orchestrated"]);
        assert_eq!(a.routing_logic, Some(RoutingLogic::DisaggregatedPrefill));
        assert_eq!((d.pd.prefill.len(), d.pd.decode.len()), (1, 1));
    }

    #[test]
    fn mismatched_models_and_bad_urls_are_rejected() {
        assert!(Settings::from_args(&args(&[
            "--static-backends",
            "http://a:1",
            "--static-models",
            "m1,m2"
        ]))
        .is_err());
        assert!(Settings::from_args(&args(&["--static-backends", "https://a:1"])).is_err());
        assert!(Settings::from_args(&args(&[])).is_err());
    }

    #[test]
    fn prefixaware_and_its_knobs_parse() {
        let s = Settings::from_args(&args(&[
            "--static-backends",
            "http://a:1",
            "--routing-logic",
            "prefixaware",
            "--prefix-match-threshold",
            "0.7",
            "--balance-abs-threshold",
            "8",
            "--balance-rel-threshold",
            "2",
            "--prefix-cache-max-chars",
            "1000",
        ]))
        .expect("valid");
        assert_eq!(s.dynamic.routing_logic, RoutingLogic::Prefixaware);
        assert_eq!(
            s.dynamic.prefix,
            PrefixSettings {
                match_threshold: 0.7,
                balance_abs: 8,
                balance_rel: 2.0,
                max_chars: 1000
            }
        );
        let d = Settings::from_args(&args(&["--static-backends", "http://a:1"])).expect("valid");
        assert_eq!(d.dynamic.prefix, PrefixSettings::default());
        for bad in [
            ["--prefix-match-threshold", "1.5"],
            ["--balance-rel-threshold", "0.5"],
            ["--prefix-cache-max-chars", "0"],
        ] {
            let a = args(&["--static-backends", "http://a:1", bad[0], bad[1]]);
            assert!(Settings::from_args(&a).is_err(), "{bad:?}");
        }
        let file: FileConfig =
            serde_json::from_str(r#"{"routing_logic":"prefixaware"}"#).expect("json");
        assert_eq!(file.routing_logic, Some(RoutingLogic::Prefixaware));
    }

    #[test]
    fn kvaware_and_its_knobs_parse() {
        let a = args(&[
            "--static-backends",
            "http://a:1",
            "--routing-logic",
            "kvaware",
            "--kv-overlap-weight",
            "2.5",
            "--kv-events-port",
            "6000",
        ]);
        let s = Settings::from_args(&a).expect("valid");
        assert_eq!(s.dynamic.routing_logic, RoutingLogic::Kvaware);
        assert_eq!(s.dynamic.kv_overlap_weight, 2.5);
        assert_eq!(a.kv_events_port, 6000);
        let d = args(&["--static-backends", "http://a:1"]);
        assert_eq!((d.kv_overlap_weight, d.kv_events_port), (16.0, 5557));
        let bad = args(&["--static-backends", "http://a:1", "--kv-overlap-weight=-1"]);
        assert!(Settings::from_args(&bad).is_err());
        let file: FileConfig =
            serde_json::from_str(r#"{"routing_logic":"kvaware"}"#).expect("json");
        assert_eq!(file.routing_logic, Some(RoutingLogic::Kvaware));
    }

    #[test]
    fn yaml_config_files_read_like_json() {
        let dir = std::env::temp_dir().join(format!("sy-yaml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("router.yaml");
        std::fs::write(&path, "routing_logic: session\nsession_key: x-user-id\nstatic_backends:\n  - http://a:1\n  - http://b:2\nstatic_models: m,m\n").expect("write");
        let f = read_file(&path).expect("yaml parses");
        let d = dynamic_from(&args(&[]), &f).expect("valid");
        assert_eq!(d.routing_logic, RoutingLogic::Session);
        assert_eq!(d.backends.len(), 2);
        assert_eq!(d.backends[1].model.as_deref(), Some("m"));
        std::fs::write(&path, "routing_logic: [nope").expect("write");
        assert!(matches!(read_file(&path), Err(ConfigError::Parse { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn k8s_discovery_flags_follow_the_production_stack() {
        // Defaults: port 8000, pod-ip, no selector, server-chosen watch timeout; no
        // backends needed.
        let s = Settings::from_args(&args(&[
            "--service-discovery",
            "k8s",
            "--k8s-namespace",
            "serving",
        ]))
        .expect("valid without backends");
        assert_eq!(
            s.dynamic.discovery,
            Discovery::K8s(K8sSettings {
                namespace: "serving".into(),
                label_selector: String::new(),
                port: 8000,
                kind: K8sDiscoveryType::PodIp,
                watcher_timeout_seconds: 0,
            })
        );
        let s = Settings::from_args(&args(&[
            "--service-discovery",
            "k8s",
            "--k8s-namespace",
            "serving",
            "--k8s-label-selector",
            "environment=test,release=test",
            "--k8s-port",
            "8080",
            "--k8s-service-discovery-type",
            "service-name",
            "--k8s-watcher-timeout-seconds",
            "30",
            "--static-backends",
            "http://ignored:1",
        ]))
        .expect("valid");
        let Discovery::K8s(k) = &s.dynamic.discovery else {
            panic!("k8s")
        };
        assert_eq!(k.label_selector, "environment=test,release=test");
        assert_eq!(
            (k.port, k.kind, k.watcher_timeout_seconds),
            (8080, K8sDiscoveryType::ServiceName, 30)
        );
        assert!(s.dynamic.backends.is_empty(), "static lists are not used");
        // The file's keys (Production Stack names), flags winning.
        let file: FileConfig = serde_json::from_str(
            r#"{"service_discovery":"k8s","k8s_namespace":"a","k8s_label_selector":"app=x","k8s_port":9000,"k8s_service_discovery_type":"pod-ip"}"#,
        )
        .expect("json");
        let d = dynamic_from(&args(&["--k8s-port", "7000"]), &file).expect("valid");
        let Discovery::K8s(k) = d.discovery else {
            panic!("k8s")
        };
        assert_eq!(
            (k.namespace.as_str(), k.label_selector.as_str(), k.port),
            ("a", "app=x", 7000)
        );
        assert!(
            Settings::from_args(&args(&["--service-discovery", "k8s", "--k8s-port", "0"])).is_err()
        );
        assert!(Settings::from_args(&args(&["--service-discovery", "static"])).is_err());
    }

    #[test]
    fn file_values_apply_unless_flags_override() {
        let file: FileConfig = serde_json::from_str(
            r#"{"routing_logic":"leastload","static_backends":["http://x:1"],"static_aliases":"a:b"}"#,
        )
        .expect("json");
        let d = dynamic_from(&args(&["--routing-logic", "roundrobin"]), &file).expect("valid");
        assert_eq!(d.routing_logic, RoutingLogic::Roundrobin);
        assert_eq!(d.backends.len(), 1);
        assert_eq!(d.aliases.get("a").map(String::as_str), Some("b"));
    }
}
