//! LoRA adapters over HTTP, as `vllm serve` has them: a request's `model` naming a
//! registered adapter runs under it; `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter` (routed only with runtime updating on) answer vLLM's
//! plain-text success lines and its error bodies. Adapter files are read off the async
//! runtime (`spawn_blocking`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use protocol::ApiError;
use serde::Deserialize;

use crate::api::{read_json, ErrorResponse};
use crate::assembly::Engine;
use crate::lora::{Adapter, LoraError, Registry};

/// vLLM's error body for a LoRA error (status and type from [`LoraError::status`]).
pub(crate) fn lora_error(e: &LoraError) -> ApiError {
    let (status, kind) = e.status();
    ApiError::new(status, kind, e.to_string(), None)
}

/// Run a registry call that may read adapter files on the blocking pool.
async fn blocking<T: Send + 'static>(
    reg: &Arc<Registry>,
    f: impl FnOnce(&Registry) -> Result<T, LoraError> + Send + 'static,
) -> Result<T, ApiError> {
    let reg = reg.clone();
    match tokio::task::spawn_blocking(move || f(&reg)).await {
        Ok(r) => r.map_err(|e| lora_error(&e)),
        Err(e) => Err(ApiError::internal(format!("adapter loading failed: {e}"))),
    }
}

impl Engine {
    /// The adapter a request's `model` names: `Ok(None)` for the base model (or no
    /// model given), the adapter for a registered adapter name (read again from its path
    /// if it was dropped from memory), vLLM's 404 for anything else.
    pub(crate) async fn resolve_model(
        &self,
        model: Option<&str>,
    ) -> Result<Option<Arc<Adapter>>, ApiError> {
        let Some(m) = model else { return Ok(None) };
        if self.served.iter().any(|s| s == m) {
            return Ok(None);
        }
        if let Some(reg) = &self.lora {
            match reg.get_loaded(m) {
                Ok(Some(a)) => return Ok(Some(a)),
                Ok(None) => {
                    let name = m.to_string();
                    return blocking(reg, move |r| r.resolve(&name)).await.map(Some);
                }
                Err(_) => {}
            }
        }
        Err(self.model_not_found(m))
    }

    /// Unknown model: vLLM's 404, naming the base model's aliases.
    pub(crate) fn model_not_found(&self, model: &str) -> ApiError {
        ApiError::model_not_found(model, &self.served)
    }
}

/// P/D disaggregation moves KV keyed by tokens alone: a request under an adapter that
/// asks for it is refused (400) rather than served with another adapter's KV.
pub(crate) fn check_no_transfer(
    lora: Option<&Adapter>,
    params: Option<&serde_json::Value>,
) -> Result<(), ApiError> {
    match (lora, params) {
        (Some(a), Some(p)) if !p.is_null() => Err(ApiError::bad_request(
            format!(
                "kv_transfer_params (prefill/decode disaggregation) is not supported for \
                 LoRA adapter requests (model `{}`).",
                a.name
            ),
            Some("kv_transfer_params"),
        )),
        _ => Ok(()),
    }
}

#[derive(Debug, Deserialize)]
struct LoadRequest {
    #[serde(default)]
    lora_name: String,
    #[serde(default)]
    lora_path: String,
}

#[derive(Debug, Deserialize)]
struct UnloadRequest {
    #[serde(default)]
    lora_name: String,
}

fn plain_ok(text: String) -> Response {
    let mut r = Response::new(Body::from(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn registry(engine: &Engine) -> Result<&Arc<Registry>, ApiError> {
    engine
        .lora
        .as_ref()
        .ok_or_else(|| lora_error(&LoraError::Disabled))
}

/// `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`.
pub(crate) async fn load_adapter(
    State(engine): State<Engine>,
    req: Request,
) -> Result<Response, ErrorResponse> {
    let body: LoadRequest = read_json(&engine, req).await?;
    let reg = registry(&engine)?;
    if engine.served.contains(&body.lora_name) {
        return Err(lora_error(&LoraError::AlreadyLoaded(body.lora_name)).into());
    }
    let (name, path) = (body.lora_name.clone(), body.lora_path.clone());
    blocking(reg, move |r| r.load(&name, &path))
        .await
        .map_err(|mut e| {
            if e.status == 404 {
                // vLLM's wording for a path with no adapter.
                e.body.message = format!("Loading lora {} failed: {}", body.lora_name, e.body.message);
            }
            tracing::warn!(adapter = %body.lora_name, path = %body.lora_path, error = %e.body.message, "LoRA adapter not loaded");
            e
        })?;
    tracing::info!(adapter = %body.lora_name, path = %body.lora_path, "Loaded new LoRA adapter");
    Ok(plain_ok(format!(
        "Success: LoRA adapter '{}' added successfully.",
        body.lora_name
    )))
}

/// `POST /v1/unload_lora_adapter {"lora_name"}`. Requests already running under the
/// adapter finish with it (they hold its weights); new ones get a 404.
pub(crate) async fn unload_adapter(
    State(engine): State<Engine>,
    req: Request,
) -> Result<Response, ErrorResponse> {
    let body: UnloadRequest = read_json(&engine, req).await?;
    let reg = registry(&engine)?;
    reg.unload(&body.lora_name).map_err(|e| lora_error(&e))?;
    tracing::info!(adapter = %body.lora_name, "Removed LoRA adapter");
    Ok(plain_ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        body.lora_name
    )))
}
