//! The engine's Prometheus metrics, with vLLM's names, labels (`engine`, `model_name`)
//! and bucket layouts. The engine loop updates them; `GET /metrics` renders them.

use protocol::prom::{self, Counter, Gauge, Histogram, TextWriter};

use crate::core::FinishReason;

#[derive(Debug)]
pub struct EngineMetrics {
    pub model_name: String,
    pub engine: String,
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub prefix_caching: bool,
    /// `--kv-cache-dtype` as given (the `cache_dtype` label; vLLM's default is `auto`).
    pub cache_dtype: String,
    pub running: Gauge,
    pub waiting: Gauge,
    pub kv_usage: Gauge,
    pub prefix_queries: Counter,
    pub prefix_hits: Counter,
    pub prompt_tokens: Counter,
    /// Prompt tokens whose KV came from another engine (P/D decode).
    pub external_prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub preemptions: Counter,
    pub success: [Counter; 4],
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub start_time: f64,
    /// KV offloading's own families, when `--kv-transfer-config` is on.
    pub offload: Option<std::sync::Arc<crate::kv_offload::OffloadMetrics>>,
    /// P/D disaggregation's families, when NixlConnector is on.
    pub pd: Option<std::sync::Arc<crate::kv_offload::pd::PdMetrics>>,
    /// `vllm:lora_requests_info`, when LoRA is on.
    pub lora: Option<LoraInfo>,
}

/// vLLM's `vllm:lora_requests_info`: the adapters of running and waiting requests, as
/// labels of a gauge whose value is when they were last updated.
#[derive(Debug)]
pub struct LoraInfo {
    max_lora: String,
    state: std::sync::Mutex<(String, String, f64)>,
}

impl LoraInfo {
    pub fn new(max_loras: usize) -> LoraInfo {
        LoraInfo {
            max_lora: max_loras.to_string(),
            state: std::sync::Mutex::new((String::new(), String::new(), 0.0)),
        }
    }

    /// The adapters of the running and waiting requests now (each named once).
    pub fn set<'a>(
        &self,
        running: impl Iterator<Item = &'a crate::lora::Adapter>,
        waiting: impl Iterator<Item = &'a crate::lora::Adapter>,
    ) {
        let names = |it: &mut dyn Iterator<Item = &'a crate::lora::Adapter>| {
            let mut v: Vec<&str> = Vec::new();
            for a in it {
                if !v.contains(&a.name.as_str()) {
                    v.push(&a.name);
                }
            }
            v.join(",")
        };
        let (mut r, mut w) = (running, waiting);
        let (r, w) = (names(&mut r), names(&mut w));
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.0 != r || s.1 != w || s.2 == 0.0 {
            *s = (r, w, unix_now());
        }
    }

    fn render(&self, w: &mut TextWriter) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        w.header(
            "vllm:lora_requests_info",
            "gauge",
            "Running stats on lora requests.",
        );
        w.sample(
            "vllm:lora_requests_info",
            &[
                ("max_lora", &self.max_lora),
                ("running_lora_adapters", &s.0),
                ("waiting_lora_adapters", &s.1),
            ],
            if s.2 == 0.0 { unix_now() } else { s.2 },
        );
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl EngineMetrics {
    pub fn new(
        model_name: &str,
        block_size: usize,
        num_gpu_blocks: usize,
        prefix_caching: bool,
    ) -> Self {
        EngineMetrics {
            model_name: model_name.to_string(),
            engine: "0".to_string(),
            block_size,
            num_gpu_blocks,
            prefix_caching,
            cache_dtype: "auto".to_string(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_usage: Gauge::default(),
            prefix_queries: Counter::default(),
            prefix_hits: Counter::default(),
            prompt_tokens: Counter::default(),
            external_prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            preemptions: Counter::default(),
            success: Default::default(),
            ttft: Histogram::new(prom::TTFT_BUCKETS),
            itl: Histogram::new(prom::ITL_BUCKETS),
            e2e: Histogram::new(prom::REQUEST_LATENCY_BUCKETS),
            queue_time: Histogram::new(prom::REQUEST_LATENCY_BUCKETS),
            start_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            offload: None,
            pd: None,
            lora: None,
        }
    }

    pub fn finished(&self, reason: FinishReason) {
        self.success[reason.index()].inc();
    }

    /// The whole `/metrics` page.
    pub fn render(&self) -> String {
        let mut w = TextWriter::new();
        let l: &[(&str, &str)] = &[("engine", &self.engine), ("model_name", &self.model_name)];
        let gauge = |w: &mut TextWriter, name: &str, help: &str, v: f64| {
            w.header(name, "gauge", help);
            w.sample(name, l, v);
        };
        let counter = |w: &mut TextWriter, name: &str, help: &str, v: u64| {
            w.header(name, "counter", help);
            w.sample(name, l, v as f64);
        };
        gauge(
            &mut w,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            self.running.get(),
        );
        gauge(
            &mut w,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            self.waiting.get(),
        );
        let usage = self.kv_usage.get();
        gauge(
            &mut w,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            usage,
        );
        gauge(
            &mut w,
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: use vllm:kv_cache_usage_perc.",
            usage,
        );
        let (q, h) = (self.prefix_queries.get(), self.prefix_hits.get());
        counter(
            &mut w,
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            q,
        );
        counter(
            &mut w,
            "vllm:prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.",
            h,
        );
        counter(
            &mut w,
            "vllm:gpu_prefix_cache_queries_total",
            "GPU prefix cache queries, in terms of number of queried tokens. DEPRECATED.",
            q,
        );
        counter(
            &mut w,
            "vllm:gpu_prefix_cache_hits_total",
            "GPU prefix cache hits, in terms of number of cached tokens. DEPRECATED.",
            h,
        );
        counter(
            &mut w,
            "vllm:num_preemptions_total",
            "Cumulative number of preemption from the engine.",
            self.preemptions.get(),
        );
        counter(
            &mut w,
            "vllm:prompt_tokens_total",
            "Number of prefill tokens processed.",
            self.prompt_tokens.get(),
        );
        let (prompt, external) = (self.prompt_tokens.get(), self.external_prompt_tokens.get());
        w.header(
            "vllm:prompt_tokens_by_source_total",
            "counter",
            "Number of prompt tokens by source.",
        );
        for (source, v) in [
            (
                "local_compute",
                prompt.saturating_sub(h).saturating_sub(external),
            ),
            ("local_cache_hit", h),
            ("external_kv_transfer", external),
        ] {
            w.sample(
                "vllm:prompt_tokens_by_source_total",
                &[
                    ("engine", &self.engine),
                    ("model_name", &self.model_name),
                    ("source", source),
                ],
                v as f64,
            );
        }
        counter(
            &mut w,
            "vllm:prompt_tokens_cached_total",
            "Number of cached prompt tokens (local + external).",
            h + external,
        );
        counter(
            &mut w,
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            self.generation_tokens.get(),
        );
        w.header(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
        );
        for r in FinishReason::ALL {
            w.sample(
                "vllm:request_success_total",
                &[
                    ("engine", &self.engine),
                    ("finished_reason", r.as_str()),
                    ("model_name", &self.model_name),
                ],
                self.success[r.index()].get() as f64,
            );
        }
        let hist = |w: &mut TextWriter, name: &str, help: &str, h: &Histogram| {
            w.header(name, "histogram", help);
            w.histogram(name, l, h);
        };
        hist(
            &mut w,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &self.ttft,
        );
        hist(
            &mut w,
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &self.itl,
        );
        hist(
            &mut w,
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &self.e2e,
        );
        hist(
            &mut w,
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &self.queue_time,
        );
        w.header(
            "vllm:cache_config_info",
            "gauge",
            "Information of the LLMEngine CacheConfig",
        );
        let bs = self.block_size.to_string();
        let nb = self.num_gpu_blocks.to_string();
        let pc = if self.prefix_caching { "True" } else { "False" };
        w.sample(
            "vllm:cache_config_info",
            &[
                ("block_size", &bs),
                ("cache_dtype", &self.cache_dtype),
                ("enable_prefix_caching", pc),
                ("engine", &self.engine),
                ("num_gpu_blocks", &nb),
                ("prefix_caching_hash_algo", "switchyard-mix64"),
            ],
            1.0,
        );
        if let Some(o) = &self.offload {
            o.render(&mut w, l);
        }
        if let Some(p) = &self.pd {
            p.render(&mut w, l);
        }
        if let Some(info) = &self.lora {
            info.render(&mut w);
        }
        httpx::process::write_process_metrics(&mut w, Some(self.start_time));
        w.finish()
    }
}
