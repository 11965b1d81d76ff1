//! Prefill/decode disaggregation (`--routing-logic disaggregated_prefill`), on vLLM's
//! NixlConnector contract, which real vLLM engines and Switchyard engines both speak:
//!
//! 1. **Prefill**: the request goes, not streamed, to a prefill engine (model label in
//!    `--prefill-model-labels`; ranked cache-aware, as `prefixaware`) with `max_tokens: 1`
//!    (and `max_completion_tokens: 1` when present), `stream: false`, no
//!    `stream_options`/`min_tokens`, and `kv_transfer_params` asking for a remote decode.
//!    The engine computes the prompt's KV and answers with the `kv_transfer_params` a
//!    decode engine needs to pull it (engine id, block ids, host, port).
//! 2. **Decode**: the original request, with those `kv_transfer_params` copied in
//!    verbatim, goes through the ordinary proxy path ([`Proxy::forward`]) to a decode
//!    engine (label in `--decode-model-labels`, least load): streamed if the client asked,
//!    retried on another decode engine until its first byte; a stream cut mid-answer is
//!    continued elsewhere as plain serving ([`Forward::resume_body`]: the continuation
//!    carries no `kv_transfer_params`).
//!
//! The KV transfer itself happens between the engines. A prefill answer without
//! `kv_transfer_params` (engines sharing KV through LMCache, as the Production Stack's own
//! disaggregation does) sends the original request on to decode, counted apart. A prefill
//! that fails (an error status, an answer that is not JSON, no prefill engine reachable) is an
//! OpenAI error naming the prefill side: a 4xx from the engine passes through as is (bad
//! input stays a 400), the rest is a 502 (504/429 as the proxy gave them). With no
//! healthy prefill engine the request is served plainly by a decode engine (counted).
//! Paths other than completions and chat go to decode engines plainly.
//!
//! Per request: one parse of the body into a JSON map (for the prefill rewrite); the
//! decode body is the original bytes with the parameters spliced in. Nothing is kept past
//! the request.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use protocol::prom::{Counter, Histogram, TextWriter, TTFT_BUCKETS};
use protocol::ApiError;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::config::{PdLabels, PrefixSettings};
use crate::engines::Endpoint;
use crate::observe::trace::Trail;
use crate::policy::{LeastLoad, Policy, PrefixAware, RouteCtx};
use crate::proxy::{error, Forward, Proxy};
use crate::upstream::ENGINE_HEADER;

/// Names the prefill engine that served a disaggregated request (beside
/// `x-switchyard-engine`, the decode engine).
pub const PREFILL_ENGINE_HEADER: &str = "x-switchyard-prefill-engine";

/// The largest prefill answer read (it holds one token and the transfer parameters).
const PREFILL_ANSWER_LIMIT: usize = 4 * 1024 * 1024;

/// The two sides and how each is ranked (rebuilt on a config reload).
pub struct Sides {
    pub labels: PdLabels,
    /// Cache-aware: a prompt whose prefix a prefill engine computed recently goes back to
    /// it (its prefix cache saves the prefill).
    pub prefill: PrefixAware,
    /// Least load.
    pub decode: LeastLoad,
}

impl Sides {
    pub fn new(labels: PdLabels, prefix: PrefixSettings) -> Self {
        Sides {
            labels,
            prefill: PrefixAware::new(prefix),
            decode: LeastLoad,
        }
    }

    /// `candidates` split into prefill and decode engines by their model label (an
    /// engine with neither label serves neither).
    pub fn split(&self, candidates: &[Arc<Endpoint>]) -> (Vec<Arc<Endpoint>>, Vec<Arc<Endpoint>>) {
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        for e in candidates {
            let label = e.label.as_deref();
            if self.labels.is_prefill(label) {
                prefill.push(e.clone());
            } else if self.labels.is_decode(label) {
                decode.push(e.clone());
            }
        }
        (prefill, decode)
    }

    /// `side` ranked by `policy`.
    pub fn rank(
        policy: &dyn Policy,
        ctx: &RouteCtx<'_>,
        side: &[Arc<Endpoint>],
    ) -> Vec<Arc<Endpoint>> {
        let mut order = Vec::with_capacity(side.len());
        policy.rank(ctx, side, &mut order);
        order.iter().map(|&i| side[i].clone()).collect()
    }
}

/// Hand-off outcomes (`vllm:router_pd_handoffs_total{outcome}`).
const OUTCOMES: [&str; 4] = ["ok", "prefill_failed", "decode_failed", "ok_without_params"];
/// Why a prefill failed (`vllm:router_pd_prefill_failures_total{reason}`).
const REASONS: [&str; 3] = ["http_error", "bad_answer", "unreachable"];

/// The disaggregation metrics (kept across reloads; rendered while it is the routing
/// logic).
pub struct PdMetrics {
    pub prefill_seconds: Histogram,
    pub decode_first_byte_seconds: Histogram,
    handoffs: [Counter; 4],
    pub fallbacks: Counter,
    prefill_failures: [Counter; 3],
}

impl Default for PdMetrics {
    fn default() -> Self {
        PdMetrics {
            prefill_seconds: Histogram::new(TTFT_BUCKETS),
            decode_first_byte_seconds: Histogram::new(TTFT_BUCKETS),
            handoffs: Default::default(),
            fallbacks: Counter::default(),
            prefill_failures: Default::default(),
        }
    }
}

impl PdMetrics {
    fn handoff(&self, outcome: usize) {
        self.handoffs[outcome].inc();
    }

    fn prefill_failed(&self, reason: usize) {
        self.prefill_failures[reason].inc();
        self.handoff(1);
    }

    pub fn render_metrics(&self, w: &mut TextWriter) {
        const P: &str = "vllm:router_pd_prefill_seconds";
        w.header(
            P,
            "histogram",
            "Prefill requests of disaggregated serving: sent to a prefill engine until its \
             kv_transfer_params were read",
        );
        w.histogram(P, &[], &self.prefill_seconds);
        const D: &str = "vllm:router_pd_decode_first_byte_seconds";
        w.header(
            D,
            "histogram",
            "Decode requests of disaggregated serving: sent to a decode engine until its first \
             byte (the KV transfer from the prefill engine is inside it)",
        );
        w.histogram(D, &[], &self.decode_first_byte_seconds);
        const H: &str = "vllm:router_pd_handoffs_total";
        w.header(
            H,
            "counter",
            "Disaggregated requests by outcome: decode answered (ok), the prefill failed \
             (prefill_failed), no decode engine answered (decode_failed), decode answered \
             after a prefill that returned no kv_transfer_params (ok_without_params: KV \
             shared another way, e.g. LMCache, or recomputed)",
        );
        for (o, c) in OUTCOMES.iter().zip(&self.handoffs) {
            w.sample(H, &[("outcome", o)], c.get() as f64);
        }
        const F: &str = "vllm:router_pd_fallbacks_total";
        w.header(
            F,
            "counter",
            "Completions served plainly by a decode engine because no prefill engine was healthy",
        );
        w.sample(F, &[], self.fallbacks.get() as f64);
        const R: &str = "vllm:router_pd_prefill_failures_total";
        w.header(
            R,
            "counter",
            "Failed prefills: the engine answered an error (http_error), answered something \
             that is not a JSON completion (bad_answer), or none could be reached (unreachable)",
        );
        for (r, c) in REASONS.iter().zip(&self.prefill_failures) {
            w.sample(R, &[("reason", r)], c.get() as f64);
        }
    }
}

/// The `kv_transfer_params` a prefill request carries: compute the prompt and keep its
/// KV for a remote decode.
pub fn prefill_params() -> Value {
    json!({
        "do_remote_decode": true,
        "do_remote_prefill": false,
        "remote_engine_id": null,
        "remote_block_ids": null,
        "remote_host": null,
        "remote_port": null,
    })
}

/// The prefill request's body from the client's (a JSON object).
pub fn prefill_body(mut req: Map<String, Value>) -> Bytes {
    req.insert("max_tokens".into(), json!(1));
    if req.contains_key("max_completion_tokens") {
        req.insert("max_completion_tokens".into(), json!(1));
    }
    req.insert("stream".into(), Value::Bool(false));
    req.remove("stream_options");
    req.remove("min_tokens");
    req.insert("kv_transfer_params".into(), prefill_params());
    Bytes::from(serde_json::to_vec(&Value::Object(req)).unwrap_or_default())
}

/// The decode request's body: the client's with `params` (the prefill's answer, as its
/// raw JSON text) as `kv_transfer_params`. The original bytes are kept: the parameters
/// are spliced in before the closing brace (replacing one the client sent, if any).
pub fn decode_body(original: &[u8], req: &Map<String, Value>, params: &RawValue) -> Bytes {
    if !req.contains_key("kv_transfer_params") {
        let trimmed = original.trim_ascii_end();
        if let Some(head) = trimmed.strip_suffix(b"}") {
            let head = head.trim_ascii_end();
            let mut out = Vec::with_capacity(original.len() + params.get().len() + 24);
            out.extend_from_slice(head);
            if !req.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(b"\"kv_transfer_params\":");
            out.extend_from_slice(params.get().as_bytes());
            out.push(b'}');
            return Bytes::from(out);
        }
    }
    let mut req = req.clone();
    let v: Value = serde_json::from_str(params.get()).unwrap_or(Value::Null);
    req.insert("kv_transfer_params".into(), v);
    Bytes::from(serde_json::to_vec(&Value::Object(req)).unwrap_or_default())
}

#[derive(Deserialize)]
struct PrefillAnswer<'a> {
    #[serde(borrow, default)]
    kv_transfer_params: Option<&'a RawValue>,
}

/// Names the prefill side in an error message: the engine that answered, else the
/// engines the proxy could try.
fn side_name(answered: Option<&str>, ranked: &[Arc<Endpoint>]) -> String {
    match answered {
        Some(hp) => format!("prefill engine http://{hp}"),
        None => {
            let urls: Vec<&str> = ranked.iter().map(|e| e.url.as_str()).collect();
            let s = if urls.len() == 1 { "" } else { "s" };
            format!("prefill engine{s} {}", urls.join(", "))
        }
    }
}

fn prefill_error(status: u16, message: String) -> Response<Body> {
    let kind = match status {
        504 => "GatewayTimeoutError",
        429 => "RateLimitError",
        _ => "BadGatewayError",
    };
    error(ApiError::new(status, kind, message, None))
}

/// The message of an OpenAI/vLLM error body, or the body as text.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct E {
        #[serde(default)]
        error: Option<Inner>,
        #[serde(default)]
        message: Option<String>,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        message: Option<String>,
    }
    match serde_json::from_slice::<E>(body) {
        Ok(E {
            error: Some(Inner { message: Some(m) }),
            ..
        })
        | Ok(E {
            message: Some(m), ..
        }) => m,
        _ => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    }
}

/// Serve one completion or chat request disaggregated: prefill on `prefill` (ranked, not
/// empty), then decode on `decode` (ranked). `f` is the client's request.
pub async fn serve(
    proxy: &Proxy,
    metrics: &PdMetrics,
    f: &Forward<'_>,
    prefill: &[Arc<Endpoint>],
    decode: &[Arc<Endpoint>],
    trail: Option<Box<Trail>>,
) -> Response<Body> {
    // Checked a JSON object with a model already; anything else is served plainly.
    let Ok(req) = serde_json::from_slice::<Map<String, Value>>(&f.body) else {
        return proxy.forward(f, decode, trail).await;
    };
    let pf = Forward {
        method: f.method.clone(),
        path_and_query: f.path_and_query,
        headers: f.headers,
        body: prefill_body(req.clone()),
        request_id: f.request_id.clone(),
        model: f.model,
        stream: false,
        trace: f.trace,
        resume_body: None,
    };
    let start = Instant::now();
    let resp = proxy.forward(&pf, prefill, None).await;
    let (parts, body) = resp.into_parts();
    let answered = parts
        .headers
        .get(ENGINE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match Limited::new(body, PREFILL_ANSWER_LIMIT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            metrics.prefill_failed(0);
            return prefill_error(
                502,
                format!(
                    "{}: reading its answer: {e}",
                    side_name(answered.as_deref(), prefill)
                ),
            );
        }
    };
    let status = parts.status;
    if answered.is_none() {
        // The proxy's own error: no prefill engine could take it.
        metrics.prefill_failed(2);
        let code = match status.as_u16() {
            s @ (429 | 504) => s,
            _ => 502,
        };
        return prefill_error(
            code,
            format!("{}: {}", side_name(None, prefill), error_message(&body)),
        );
    }
    if !status.is_success() {
        metrics.prefill_failed(0);
        if status.is_client_error() {
            // Bad input stays the engine's own answer.
            return Response::from_parts(parts, Body::from(body));
        }
        return prefill_error(
            502,
            format!(
                "{} answered {status}: {}",
                side_name(answered.as_deref(), prefill),
                error_message(&body)
            ),
        );
    }
    let params = match serde_json::from_slice::<PrefillAnswer<'_>>(&body) {
        Ok(PrefillAnswer {
            kv_transfer_params: Some(p),
        }) if p.get().starts_with('{') => Some(p),
        // No parameters: the engines share KV another way (the Production Stack's
        // LMCache-based disaggregation answers so), and the decode engine finds the KV
        // there or computes it. The original request goes on, as that router sends it.
        Ok(_) => None,
        Err(_) => {
            metrics.prefill_failed(1);
            return prefill_error(
                502,
                format!(
                    "{}: its answer is not a completion (JSON object) to read                      kv_transfer_params from",
                    side_name(answered.as_deref(), prefill)
                ),
            );
        }
    };
    metrics
        .prefill_seconds
        .observe(start.elapsed().as_secs_f64());
    let df = Forward {
        method: f.method.clone(),
        path_and_query: f.path_and_query,
        headers: f.headers,
        body: match params {
            Some(p) => decode_body(&f.body, &req, p),
            None => f.body.clone(),
        },
        request_id: f.request_id.clone(),
        model: f.model,
        stream: f.stream,
        trace: f.trace,
        resume_body: Some(f.body.clone()),
    };
    let start = Instant::now();
    let mut resp = proxy.forward(&df, decode, trail).await;
    let decoded = resp.headers().contains_key(ENGINE_HEADER);
    if decoded {
        metrics
            .decode_first_byte_seconds
            .observe(start.elapsed().as_secs_f64());
        metrics.handoff(if params.is_some() { 0 } else { 3 });
    } else {
        metrics.handoff(2);
    }
    if let Some(hp) = answered.and_then(|a| HeaderValue::from_str(&a).ok()) {
        resp.headers_mut()
            .insert(HeaderName::from_static(PREFILL_ENGINE_HEADER), hp);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).expect("object")
    }

    #[test]
    fn the_prefill_body_asks_for_one_token_and_a_remote_decode() {
        let b = prefill_body(map(
            r#"{"model":"m","prompt":"hi","max_tokens":50,"max_completion_tokens":50,
                "stream":true,"stream_options":{"include_usage":true},"min_tokens":3,"temperature":0.5}"#,
        ));
        let v: Value = serde_json::from_slice(&b).expect("json");
        assert_eq!(
            v,
            json!({"model":"m","prompt":"hi","max_tokens":1,"max_completion_tokens":1,
                   "stream":false,"temperature":0.5,"kv_transfer_params":{
                   "do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,
                   "remote_block_ids":null,"remote_host":null,"remote_port":null}})
        );
        let v: Value = serde_json::from_slice(&prefill_body(map(r#"{"model":"m"}"#))).expect("j");
        assert!(v.get("max_completion_tokens").is_none());
        assert_eq!(v["max_tokens"], 1);
    }

    #[test]
    fn the_decode_body_is_the_original_with_the_params_verbatim() {
        let params =
            RawValue::from_string(r#"{"remote_block_ids":[1,2],"remote_port":5600}"#.into())
                .expect("raw");
        let orig = br#"{"model":"m","prompt":"hi","temperature":0.7} "#;
        let b = decode_body(
            orig,
            &map(std::str::from_utf8(orig).expect("utf8")),
            &params,
        );
        assert_eq!(
            &b[..],
            br#"{"model":"m","prompt":"hi","temperature":0.7,"kv_transfer_params":{"remote_block_ids":[1,2],"remote_port":5600}}"#
        );
        // The client's own parameters are replaced.
        let orig = br#"{"model":"m","kv_transfer_params":{"x":1}}"#;
        let b = decode_body(
            orig,
            &map(std::str::from_utf8(orig).expect("utf8")),
            &params,
        );
        let v: Value = serde_json::from_slice(&b).expect("json");
        assert_eq!(v["kv_transfer_params"]["remote_port"], 5600);
        assert!(v["kv_transfer_params"].get("x").is_none());
        let b = decode_body(b"{}", &Map::new(), &params);
        assert_eq!(
            &b[..],
            br#"{"kv_transfer_params":{"remote_block_ids":[1,2],"remote_port":5600}}"#
        );
    }

    #[test]
    fn error_messages_are_read_from_openai_bodies() {
        assert_eq!(
            error_message(br#"{"error":{"message":"boom","type":"x"}}"#),
            "boom"
        );
        assert_eq!(error_message(br#"{"message":"m2"}"#), "m2");
        assert_eq!(error_message(b"plain"), "plain");
    }
}
