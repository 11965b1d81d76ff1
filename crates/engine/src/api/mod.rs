//! The engine's HTTP surface, as `vllm serve`'s: OpenAI chat and completions (streaming
//! and not), models, tokenize/detokenize, health, version and metrics, with vLLM's error
//! bodies and status codes; with `--api-key`, vLLM's bearer-token check.
//!
//! Handlers validate and tokenize, then talk to the engine loop only through the
//! [`Engine`] bundle's [`EngineHandle`](crate::engine_loop::EngineHandle); a request's
//! abort guard frees its KV blocks however the response ends (finished, stop string,
//! client gone). This module holds the router, the small endpoints and body reading;
//! `generate` the chat and completions endpoints; `validate` the sampling fields.
//! Building the engine is [`crate::assembly`]'s.

mod generate;
mod lora;
mod validate;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
pub(crate) use httpx::{json_ok, ErrorResponse};
use protocol::openai::{
    DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
};
use protocol::ApiError;

use crate::assembly::Engine;
use crate::engine_loop::EngineCommand;

/// The version string `/version` reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Paths open without a key when `--api-key` is set (vLLM's public endpoints, and the
/// KV-event advertisement routers read).
const PUBLIC_PATHS: &[&str] = &["/health", "/ping", "/version", "/metrics", "/kv_events"];

/// `--api-key`: every other path needs one of the keys as a bearer token, else 401 with
/// vLLM's body. Keys compare in time independent of the secret (`httpx::auth::ct_eq`).
async fn require_key(
    State(engine): State<Engine>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if PUBLIC_PATHS.contains(&req.uri().path()) || req.method() == axum::http::Method::OPTIONS {
        return next.run(req).await;
    }
    let token = httpx::auth::bearer_token(req.headers()).unwrap_or_default();
    let mut ok = false;
    for k in engine.api_keys.iter() {
        ok |= httpx::auth::ct_eq(token, k.as_bytes());
    }
    if ok {
        return next.run(req).await;
    }
    httpx::json_response(
        axum::http::StatusCode::UNAUTHORIZED,
        r#"{"error":"Unauthorized"}"#.to_string(),
    )
}

/// The HTTP routes (behind `--api-key` when set), inside the fault-injection knobs when a
/// test sets them ([`crate::fault`]).
pub fn router(engine: Engine) -> Router {
    let faults = engine.faults.clone();
    crate::fault::wrap(routes(engine), &faults)
}

fn routes(engine: Engine) -> Router {
    let keyed = !engine.api_keys.is_empty();
    let r = Router::new()
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
        .method_not_allowed_fallback(httpx::method_not_allowed);
    // As vLLM: the routes exist only with runtime updating on.
    let r = if engine.runtime_lora {
        r.route("/v1/load_lora_adapter", post(lora::load_adapter))
            .route("/v1/unload_lora_adapter", post(lora::unload_adapter))
    } else {
        r
    };
    let r = if keyed {
        r.layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            require_key,
        ))
    } else {
        r
    };
    r.with_state(engine)
}

/// Serve until `shutdown` resolves, then drain (bounded by `serving.grace`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Engine,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    serving: httpx::Serving,
) -> std::io::Result<()> {
    httpx::serve(listener, router(engine), shutdown, &serving).await
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
    /// 404 unless `model` is absent, one of the served names or a registered LoRA
    /// adapter (which tokenizes as its base model).
    pub(crate) fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m)
                if !self.served.iter().any(|s| s == m)
                    && !self.lora.as_ref().is_some_and(|r| r.contains(m)) =>
            {
                Err(self.model_not_found(m))
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn model_name(&self) -> &str {
        &self.served[0]
    }
}

/// The served names, then the LoRA adapters (vLLM's cards: `root` the adapter's path,
/// `parent` its base model, no `max_model_len`).
async fn models(State(engine): State<Engine>) -> Response {
    let mut data: Vec<ModelCard> = engine
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
    if let Some(reg) = &engine.lora {
        data.extend(reg.list().into_iter().map(|a| {
            ModelCard {
                id: a.name,
                object: "model".into(),
                created: engine.created,
                owned_by: "vllm".into(),
                root: Some(a.path),
                parent: Some(
                    a.base_model_name
                        .unwrap_or_else(|| engine.served[0].clone()),
                ),
                max_model_len: None,
            }
        }));
    }
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
            let text = generate::render_chat(
                &engine,
                messages,
                body.add_generation_prompt,
                body.continue_final_message,
            )?;
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
