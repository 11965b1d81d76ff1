//! LoRA adapters across engines (the Production Stack's LoRA controller, as endpoints).
//! Adapters are models the engines list in `/v1/models` (discovery learns them, so
//! requests for an adapter reach only engines that hold it); here the router loads and
//! unloads them:
//!
//! - `POST /v1/load_lora_adapter {"lora_name", "lora_path", "replicas"?, "model"?}`:
//!   loads onto `replicas` healthy engines (default: all) that serve `model` when given,
//!   least loaded first (engines already holding it count toward `replicas`); each
//!   engine's model list is read again right after, so the adapter is routable at once.
//! - `POST /v1/unload_lora_adapter {"lora_name"}`: unloads from every engine holding it;
//!   unloaded everywhere, the name is forgotten (a 404 again).
//!
//! The engines must allow runtime updating (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`). Answers
//! are JSON: which engines loaded (or unloaded) it and which failed with what; when none
//! succeeded, the first engine's own error (status and body) is returned.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Response, StatusCode};
use bytes::Bytes;
use protocol::ApiError;
use serde::Deserialize;
use serde_json::json;

use crate::discovery::EngineSet;
use crate::engines::Endpoint;
use crate::proxy::error;
use crate::upstream;

/// How long an engine may take to read an adapter.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Deserialize)]
struct LoadBody {
    #[serde(default)]
    lora_name: String,
    #[serde(default)]
    lora_path: String,
    #[serde(default)]
    replicas: Option<usize>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UnloadBody {
    #[serde(default)]
    lora_name: String,
}

fn invalid(message: &str) -> Response<Body> {
    error(ApiError::new(400, "InvalidUserInput", message, None))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            format!("The request body is not a valid JSON object: {e}"),
            None,
        )
    })
}

/// One engine's answer.
struct Outcome {
    engine: Arc<Endpoint>,
    result: Result<(StatusCode, Bytes), String>,
}

impl Outcome {
    fn ok(&self) -> bool {
        matches!(&self.result, Ok((s, _)) if s.is_success())
    }

    fn failure_json(&self) -> serde_json::Value {
        match &self.result {
            Ok((s, b)) => json!({
                "engine": self.engine.host_port,
                "status": s.as_u16(),
                "error": serde_json::from_slice::<serde_json::Value>(b)
                    .unwrap_or_else(|_| json!(String::from_utf8_lossy(b))),
            }),
            Err(e) => json!({"engine": self.engine.host_port, "status": 502, "error": e}),
        }
    }

    /// The engine's own answer as the router's (its status and body), or a 502.
    fn as_response(&self) -> Response<Body> {
        match &self.result {
            Ok((s, b)) => httpx::json_response(*s, String::from_utf8_lossy(b).into_owned()),
            Err(e) => error(ApiError::new(
                502,
                "BadGatewayError",
                format!("engine {}: {e}", self.engine.host_port),
                None,
            )),
        }
    }
}

async fn post_all(
    engines: &Arc<EngineSet>,
    targets: Vec<Arc<Endpoint>>,
    path: &str,
    body: Bytes,
) -> Vec<Outcome> {
    let calls = targets.into_iter().map(|engine| {
        let body = body.clone();
        let url = format!("{}{path}", engine.url);
        async move {
            let result = upstream::post_json(
                &engines.client(),
                &url,
                body,
                LOAD_TIMEOUT,
                engines.auth.as_ref(),
            )
            .await;
            if matches!(&result, Ok((s, _)) if s.is_success()) {
                // Its model list now, so routing follows at once.
                engines.discover_models(&engine).await;
            }
            Outcome { engine, result }
        }
    });
    futures_util::future::join_all(calls).await
}

fn load_of(e: &Endpoint) -> f64 {
    e.in_flight.load(Ordering::Relaxed) as f64 + e.scraped_queue()
}

/// `POST /v1/load_lora_adapter` (see the module's doc).
pub async fn load(engines: &Arc<EngineSet>, body: &[u8]) -> Response<Body> {
    let b: LoadBody = match parse(body) {
        Ok(b) => b,
        Err(e) => return error(e),
    };
    if b.lora_name.is_empty() || b.lora_path.is_empty() {
        return invalid("Both 'lora_name' and 'lora_path' must be provided.");
    }
    if b.replicas == Some(0) {
        return invalid("'replicas' must be at least 1.");
    }
    let snap = engines.registry.snapshot();
    let eligible: Vec<Arc<Endpoint>> = snap
        .endpoints
        .iter()
        .filter(|e| e.is_healthy() && b.model.as_deref().is_none_or(|m| e.serves(m)))
        .cloned()
        .collect();
    if eligible.is_empty() {
        return error(ApiError::service_unavailable(match &b.model {
            Some(m) => format!("No healthy engine serves model `{m}` right now."),
            None => "No healthy engine right now.".to_string(),
        }));
    }
    let (holding, mut rest): (Vec<_>, Vec<_>) =
        eligible.into_iter().partition(|e| e.serves(&b.lora_name));
    rest.sort_by(|x, y| load_of(x).total_cmp(&load_of(y)));
    let want = b.replicas.unwrap_or(usize::MAX);
    let targets: Vec<Arc<Endpoint>> = rest
        .into_iter()
        .take(want.saturating_sub(holding.len()))
        .collect();
    let payload =
        Bytes::from(json!({"lora_name": b.lora_name, "lora_path": b.lora_path}).to_string());
    let outcomes = post_all(engines, targets, "/v1/load_lora_adapter", payload).await;
    let loaded: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.ok())
        .map(|o| o.engine.host_port.as_str())
        .collect();
    if loaded.is_empty() && holding.is_empty() {
        if let Some(first) = outcomes.first() {
            return first.as_response();
        }
    }
    tracing::info!(adapter = %b.lora_name, engines = ?loaded, "LoRA adapter loaded");
    httpx::json_ok(&json!({
        "lora_name": b.lora_name,
        "loaded": loaded,
        "already_loaded": holding.iter().map(|e| e.host_port.as_str()).collect::<Vec<_>>(),
        "failed": outcomes.iter().filter(|o| !o.ok()).map(Outcome::failure_json).collect::<Vec<_>>(),
    }))
}

/// `POST /v1/unload_lora_adapter` (see the module's doc).
pub async fn unload(engines: &Arc<EngineSet>, body: &[u8]) -> Response<Body> {
    let b: UnloadBody = match parse(body) {
        Ok(b) => b,
        Err(e) => return error(e),
    };
    if b.lora_name.is_empty() {
        return invalid("'lora_name' needs to be provided to unload a LoRA adapter.");
    }
    let snap = engines.registry.snapshot();
    let holding: Vec<Arc<Endpoint>> = snap
        .endpoints
        .iter()
        .filter(|e| e.serves(&b.lora_name))
        .cloned()
        .collect();
    if holding.is_empty() {
        return error(ApiError::new(
            404,
            "NotFoundError",
            format!("The lora adapter '{}' cannot be found.", b.lora_name),
            None,
        ));
    }
    let payload = Bytes::from(json!({"lora_name": b.lora_name}).to_string());
    let outcomes = post_all(engines, holding, "/v1/unload_lora_adapter", payload).await;
    let unloaded: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.ok())
        .map(|o| o.engine.host_port.as_str())
        .collect();
    if unloaded.is_empty() {
        if let Some(first) = outcomes.first() {
            return first.as_response();
        }
    }
    if engines.registry.forget_unserved(&b.lora_name) {
        engines.metrics.sync(&engines.registry);
    }
    tracing::info!(adapter = %b.lora_name, engines = ?unloaded, "LoRA adapter unloaded");
    httpx::json_ok(&json!({
        "lora_name": b.lora_name,
        "unloaded": unloaded,
        "failed": outcomes.iter().filter(|o| !o.ok()).map(Outcome::failure_json).collect::<Vec<_>>(),
    }))
}

/// Both endpoints want a key when keys are on, as every `/v1` path.
pub fn authorized(
    admission: &crate::admission::Admission,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    admission
        .authenticate(headers)
        .map(|_| ())
        .map_err(|r| r.error)
}
