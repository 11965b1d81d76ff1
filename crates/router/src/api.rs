//! The router's HTTP surface: the proxied OpenAI/vLLM paths (routed by the body's
//! `model`), and what it answers itself: `/v1/models` (merged), `/engines`, `/health`,
//! `/version`, `/metrics`, `/dashboard` (and its `/dashboard/data`), LoRA loading
//! (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`: [`crate::lora`]). Errors are
//! OpenAI-format JSON. With API keys on (`admission`), the proxied paths and `/v1/models`
//! need a key; `/health`, `/version`, `/metrics`, `/engines` and `/dashboard` stay open.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use axum::routing::{get, post};
use protocol::ApiError;
use serde::Deserialize;
use serde_json::json;

use kv_events::hash::mix64;

use crate::admission::{self, limits, Rejection};
use crate::engines::Endpoint;
use crate::observe::dashboard;
use crate::observe::metrics::NO_HEALTHY_ENGINE;
use crate::observe::trace::{log_rejected, TraceCtx, Trail};
use crate::pd;
use crate::policy::RouteCtx;
use crate::proxy::{error, Forward};
use crate::resume::Kind;
use crate::upstream::REQUEST_ID;
use crate::RouterState;

/// Paths proxied to engines, routed by the body's `model`.
pub const PROXIED: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/tokenize",
    "/detokenize",
    "/v1/rerank",
    "/rerank",
    "/v1/score",
    "/score",
];

pub fn router(state: Arc<RouterState>) -> axum::Router {
    let mut r = axum::Router::new();
    for p in PROXIED {
        r = r.route(p, post(proxy));
    }
    r.route("/v1/models", get(models))
        .route("/engines", get(engines))
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/data", get(dashboard_data))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .fallback(httpx::not_found)
        .method_not_allowed_fallback(httpx::method_not_allowed)
        .with_state(state)
}

/// The few body fields routing and rate limits need; everything else is skipped
/// unparsed.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    /// For the token estimate only: a value that is not a count is the engine's to
    /// refuse, not the router's.
    #[serde(default, deserialize_with = "lenient_count")]
    max_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_count")]
    max_completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_count")]
    n: Option<u64>,
}

/// A non-negative integer, or `None` for anything else (never an error).
fn lenient_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("anything")
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(u64::try_from(v).ok())
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            while a
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn new_request_id(seed: u64) -> HeaderValue {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let id = format!(
        "{:016x}{:016x}",
        mix64(seed ^ n),
        mix64(n.rotate_left(29) ^ seed)
    );
    HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// A string field of the top-level JSON object (for `--session-key` given as a field).
fn body_field<'a>(body: &'a [u8], key: &str) -> Option<Cow<'a, str>> {
    #[derive(Deserialize)]
    struct Fields<'a>(
        #[serde(borrow)] std::collections::HashMap<Cow<'a, str>, &'a serde_json::value::RawValue>,
    );
    let Fields(map) = serde_json::from_slice(body).ok()?;
    let raw = map.get(key)?;
    match serde_json::from_str::<Cow<'_, str>>(raw.get()) {
        Ok(Cow::Borrowed(s)) => Some(Cow::Owned(s.to_string())),
        Ok(Cow::Owned(s)) => Some(Cow::Owned(s)),
        Err(_) => Some(Cow::Owned(raw.get().to_string())),
    }
}

async fn proxy(State(st): State<Arc<RouterState>>, req: Request) -> Response<Body> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    // The key, before the body is read.
    let who = match st.admission.authenticate(&parts.headers) {
        Ok(w) => w,
        Err(r) => {
            log_rejected(&parts.headers, None, "", r.error.status, start);
            let mut resp = error(r.error);
            admission::set_retry_after(&mut resp, r.retry_after);
            return resp;
        }
    };
    let key_name = who.as_ref().map(|c| &*c.name);
    // Answered here, before routing: logged (no trace span).
    let reject = |model: &str, e: ApiError| {
        log_rejected(&parts.headers, key_name, model, e.status, start);
        error(e)
    };
    let refuse = |model: &str, r: Rejection| {
        let mut resp = reject(model, r.error);
        admission::set_retry_after(&mut resp, r.retry_after);
        resp
    };
    let bytes = match httpx::read_body(&parts.headers, body, st.settings.body_limit).await {
        Ok(b) => b,
        Err(e) => return reject("", e),
    };
    let head: Head<'_> = match serde_json::from_slice(&bytes) {
        Ok(h) => h,
        Err(e) => {
            return reject(
                "",
                ApiError::bad_request(
                    format!("The request body is not a valid JSON object: {e}"),
                    None,
                ),
            )
        }
    };
    let Some(requested) = head.model.as_deref() else {
        return reject(
            "",
            ApiError::bad_request("The request body has no `model` field.", Some("model")),
        );
    };
    let model = st.registry.resolve(requested);
    let model: &str = &model;
    // The key's models (403) and rate limits (429).
    if let Err(r) = st
        .admission
        .authorize(who.as_deref(), requested, model, || {
            limits::estimate_tokens(
                bytes.len(),
                head.max_tokens.or(head.max_completion_tokens),
                head.n,
            )
        })
    {
        return refuse(requested, r);
    }
    if !st.registry.is_known(model) {
        return reject(
            requested,
            ApiError::new(
                404,
                "NotFoundError",
                format!("The model `{requested}` does not exist."),
                Some("model"),
            ),
        );
    }
    st.metrics.incoming(model);
    // A slot under --max-concurrent-requests (429 queue full, 408 waited too long), held
    // by the response body.
    let permit = match st.admission.enter(who.as_deref()).await {
        Ok(p) => p,
        Err(r) => return refuse(model, r),
    };

    let snap = st.registry.snapshot();
    let pinned = query_param(parts.uri.query(), "id");
    let candidates: Vec<Arc<Endpoint>> = snap
        .endpoints
        .iter()
        .filter(|e| e.is_healthy() && e.serves(model) && pinned.is_none_or(|id| e.matches_id(id)))
        .cloned()
        .collect();
    if candidates.is_empty() {
        st.metrics.error("", model, NO_HEALTHY_ENGINE);
        let what = match pinned {
            Some(id) => format!("Engine `{id}` is not available for model `{model}`."),
            None => format!("No healthy engine serves model `{model}` right now; retry later."),
        };
        let mut r = reject(model, ApiError::service_unavailable(what));
        if let Ok(v) = HeaderValue::from_str(&st.settings.retry_after.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }

    let request_id = parts
        .headers
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .cloned()
        .unwrap_or_else(|| new_request_id(st.seed));
    let dynamic = st.dynamic();
    let session_owned: Option<Cow<'_, str>> = dynamic.session_key.as_deref().and_then(|k| {
        parts
            .headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(Cow::Borrowed)
            .or_else(|| body_field(&bytes, k))
    });
    let nonce = mix64(st.seed ^ NEXT_ID.fetch_add(1, Ordering::Relaxed));
    // disaggregated_prefill: the prefill ranking when the request is disaggregated.
    let mut prefill: Option<Vec<Arc<Endpoint>>> = None;
    let ranked: Vec<Arc<Endpoint>> = {
        let ctx = RouteCtx::new(model, session_owned.as_deref(), nonce, &bytes);
        match dynamic.pd.as_ref() {
            None => pd::Sides::rank(&*dynamic.policy, &ctx, &candidates),
            Some(sides) => {
                let (p, d) = sides.split(&candidates);
                if d.is_empty() {
                    st.metrics.error("", model, NO_HEALTHY_ENGINE);
                    let mut r = reject(
                        model,
                        ApiError::service_unavailable(format!(
                            "No healthy decode engine (model labels {:?}) serves model `{model}` right now; retry later.",
                            sides.labels.decode
                        )),
                    );
                    if let Ok(v) = HeaderValue::from_str(&st.settings.retry_after.to_string()) {
                        r.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                    return r;
                }
                if Kind::of(parts.uri.path()).is_some() {
                    if p.is_empty() {
                        st.pd.fallbacks.inc();
                        tracing::debug!(
                            model,
                            "no healthy prefill engine: served plainly by a decode engine"
                        );
                    } else {
                        prefill = Some(pd::Sides::rank(&sides.prefill, &ctx, &p));
                    }
                }
                pd::Sides::rank(&sides.decode, &ctx, &d)
            }
        }
    };
    // With keys on, engines get the engine key, not the client's.
    st.admission.upstream_headers(&mut parts.headers);

    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(parts.uri.path());
    let trace = TraceCtx::from_headers(&parts.headers);
    let tel = &st.proxy.telemetry;
    let trail = Trail::wanted(tel).then(|| {
        let mut t = Trail::new(
            tel.clone(),
            request_id.clone(),
            model,
            format!("{} {}", parts.method, parts.uri.path()),
            trace,
            start,
        );
        t.key = who.as_ref().map(|c| c.name.clone());
        Box::new(t)
    });
    let f = Forward {
        method: parts.method.clone(),
        path_and_query,
        headers: &parts.headers,
        body: bytes.clone(),
        request_id,
        model,
        stream: head.stream.unwrap_or(false),
        trace,
        resume_body: None,
    };
    let resp = match prefill {
        Some(p) => pd::serve(&st.proxy, &st.pd, &f, &p, &ranked, trail).await,
        None => st.proxy.forward(&f, &ranked, trail).await,
    };
    admission::hold(resp, permit)
}

/// Read a LoRA request's body (a key first, when keys are on).
async fn lora_body(st: &RouterState, req: Request) -> Result<bytes::Bytes, ApiError> {
    let (parts, body) = req.into_parts();
    crate::lora::authorized(&st.admission, &parts.headers)?;
    httpx::read_body(&parts.headers, body, st.settings.body_limit).await
}

/// `POST /v1/load_lora_adapter` onto engines chosen by load ([`crate::lora`]).
async fn load_lora(State(st): State<Arc<RouterState>>, req: Request) -> Response<Body> {
    match lora_body(&st, req).await {
        Ok(b) => crate::lora::load(&st.engines, &b).await,
        Err(e) => error(e),
    }
}

/// `POST /v1/unload_lora_adapter` from every engine holding it ([`crate::lora`]).
async fn unload_lora(State(st): State<Arc<RouterState>>, req: Request) -> Response<Body> {
    match lora_body(&st, req).await {
        Ok(b) => crate::lora::unload(&st.engines, &b).await,
        Err(e) => error(e),
    }
}

async fn models(State(st): State<Arc<RouterState>>, headers: HeaderMap) -> Response<Body> {
    // With keys on: a key, and only the models it may use are listed.
    let who = match st.admission.authenticate(&headers) {
        Ok(w) => w,
        Err(r) => return error(r.error),
    };
    let allowed = |id: &str| who.as_ref().is_none_or(|c| c.allows(id, id));
    let snap = st.registry.snapshot();
    let mut seen = HashSet::new();
    let mut data = Vec::new();
    for e in snap.endpoints.iter().filter(|e| e.is_healthy()) {
        let cards = e.cards.read().unwrap_or_else(|p| p.into_inner()).clone();
        if cards.is_empty() {
            for m in e.models().iter().filter(|m| allowed(m)) {
                if seen.insert(m.clone()) {
                    data.push(json!({"id": m, "object": "model", "created": 0, "owned_by": "vllm", "root": m, "parent": null}));
                }
            }
        } else {
            for c in cards.iter() {
                if let Some(id) = c.get("id").and_then(|v| v.as_str()) {
                    if allowed(id) && seen.insert(id.to_string()) {
                        data.push(c.clone());
                    }
                }
            }
        }
    }
    httpx::json_ok(&json!({"object": "list", "data": data}))
}

async fn engines(State(st): State<Arc<RouterState>>) -> Response<Body> {
    let snap = st.registry.snapshot();
    let list: Vec<_> = snap
        .endpoints
        .iter()
        .map(|e| {
            let w = e.stats.summary();
            json!({
                "id": e.host_port,
                "url": e.url,
                "models": &*e.models(),
                "healthy": e.is_healthy(),
                "in_flight": e.in_flight.load(Ordering::Relaxed),
                "engine_running": e.load.running.get(),
                "engine_waiting": e.load.waiting.get(),
                "kv_cache_usage": e.load.kv_usage.get(),
                "qps": w.qps,
                "avg_ttft": w.avg_ttft,
                "avg_itl": w.avg_itl,
                "avg_latency": w.avg_latency,
            })
        })
        .collect();
    httpx::json_ok(&json!({"object": "list", "data": list}))
}

async fn health(State(st): State<Arc<RouterState>>) -> Response<Body> {
    let snap = st.registry.snapshot();
    let healthy = snap.endpoints.iter().filter(|e| e.is_healthy()).count();
    httpx::json_ok(
        &json!({"status": "healthy", "engines": snap.endpoints.len(), "healthy_engines": healthy}),
    )
}

async fn version() -> Response<Body> {
    httpx::json_ok(&json!({"version": env!("CARGO_PKG_VERSION")}))
}

async fn dashboard_data(State(st): State<Arc<RouterState>>) -> Response<Body> {
    let dynamic = st.dynamic();
    dashboard::data(&dashboard::Sources {
        registry: &st.registry,
        metrics: &st.metrics,
        routing_logic: match dynamic.pd {
            Some(_) => "disaggregated_prefill",
            None => dynamic.policy.name(),
        },
        // disaggregated_prefill: the prefill side's cache-aware decisions.
        decisions: match &dynamic.pd {
            Some(sides) => crate::policy::Policy::decisions(&sides.prefill),
            None => dynamic.policy.decisions(),
        },
        stats_window_s: st.settings.request_stats_window,
        scrape_interval: st.settings.engine_stats_interval,
    })
}

async fn metrics(State(st): State<Arc<RouterState>>) -> Response<Body> {
    let mut page = st.metrics.render(&st.registry);
    page.push_str(&st.kv.render(&st.registry));
    let mut w = protocol::prom::TextWriter::new();
    let dynamic = st.dynamic();
    dynamic.policy.render_metrics(&mut w);
    st.proxy.telemetry.render_metrics(&mut w);
    st.admission.render(&mut w);
    st.proxy.retries.render_metrics(&mut w);
    st.proxy.resume.render_metrics(&mut w);
    if let Some(sides) = dynamic.pd.as_ref() {
        st.pd.render_metrics(&mut w);
        crate::policy::Policy::render_metrics(&sides.prefill, &mut w);
    }
    httpx::process::write_process_metrics(&mut w, None);
    page.push_str(&w.finish());
    let mut r = Response::new(Body::from(page));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(protocol::prom::CONTENT_TYPE),
    );
    *r.status_mut() = StatusCode::OK;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_query_and_body_fields() {
        assert_eq!(query_param(Some("a=1&id=h:2"), "id"), Some("h:2"));
        assert_eq!(query_param(None, "id"), None);
        assert_eq!(
            body_field(br#"{"user":"u-1","messages":[]}"#, "user").as_deref(),
            Some("u-1")
        );
        assert_eq!(body_field(br#"{"user":7}"#, "user").as_deref(), Some("7"));
        assert_eq!(body_field(b"not json", "user"), None);
    }

    #[test]
    fn token_counts_never_fail_the_head() {
        let h: Head<'_> =
            serde_json::from_slice(br#"{"model":"m","max_tokens":12,"n":2,"stream":true}"#)
                .expect("head");
        assert_eq!(
            (h.max_tokens, h.n, h.stream),
            (Some(12), Some(2), Some(true))
        );
        for odd in [
            r#"{"model":"m","max_tokens":"12"}"#,
            r#"{"model":"m","max_tokens":-1,"n":1.5}"#,
            r#"{"model":"m","max_tokens":null,"max_completion_tokens":[1,{"a":2}]}"#,
            r#"{"model":"m","max_tokens":{"x":[true]}}"#,
        ] {
            let h: Head<'_> = serde_json::from_str(odd).expect(odd);
            assert_eq!(h.model.as_deref(), Some("m"));
            assert_eq!(
                (h.max_tokens, h.max_completion_tokens),
                (None, None),
                "{odd}"
            );
        }
    }
}
