//! HTTP plumbing shared by the engine and the router: OpenAI error responses, JSON
//! responses, size-limited body reading, FastAPI-style 404/405 bodies, serving with
//! TLS, TCP_NODELAY and a bounded drain on SIGINT/SIGTERM (`serving`); the `process_*`
//! metrics; bearer tokens compared in constant time (`auth`); which client errors a
//! request may be sent again after ([`closed_unanswered`]).

pub mod auth;
pub mod process;
pub mod serving;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use protocol::ApiError;

/// An [`ApiError`] as an HTTP response (`{"error":{...}}` with its status).
pub struct ErrorResponse(pub ApiError);

impl From<ApiError> for ErrorResponse {
    fn from(e: ApiError) -> Self {
        ErrorResponse(e)
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, self.0.to_json())
    }
}

pub fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn json_ok<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_string(v) {
        Ok(s) => json_response(StatusCode::OK, s),
        Err(e) => ErrorResponse(ApiError::internal(e.to_string())).into_response(),
    }
}

/// Whether the request declares a JSON body.
pub fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false)
}

/// Read a whole body of at most `limit` bytes. Over the limit: 413, after reading on
/// (discarding, up to a bound) so the client finishes sending and sees the answer
/// instead of a reset connection. Memory stays at most `limit`.
pub async fn read_body(
    headers: &axum::http::HeaderMap,
    mut body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::validation(format!("could not read the request body: {e}"), None)
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            buf.extend_from_slice(&data);
        } else {
            buf = Vec::new();
            if seen > limit.saturating_mul(8).max(64 << 20) {
                break;
            }
        }
    }
    if seen > limit {
        return Err(ApiError::payload_too_large(limit));
    }
    Ok(Bytes::from(buf))
}

/// FastAPI's body for an unknown route (vLLM and the Production Stack router are FastAPI).
pub async fn not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, r#"{"detail":"Not Found"}"#.into())
}

pub async fn method_not_allowed() -> Response {
    json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        r#"{"detail":"Method Not Allowed"}"#.into(),
    )
}

pub use serving::{serve, ServeArgs, Serving, TlsError};

/// Whether a request failed because its connection closed before any of the answer came
/// (hyper's "connection closed before message completed"), as when a server closes a
/// kept-alive connection the request was already on its way down: llama.cpp's
/// `llama-server` does after every streamed answer while its headers say `Keep-Alive`,
/// and any server may when its idle timeout meets a new request. The server answered
/// nothing, so the request may be sent again on another connection. A refused connect is
/// not this (`is_connect`).
pub fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    use std::error::Error;
    !e.is_connect()
        && e.source()
            .and_then(|s| s.downcast_ref::<hyper::Error>())
            .is_some_and(|h| h.is_incomplete_message())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Run `fut` on a new thread named `name` with its own single-threaded tokio runtime (the
/// engine's KV-event publisher, the router's KV-event subscriber and each router worker).
/// The runtime is built before the thread starts, so a failure is the caller's error.
pub fn spawn_runtime_thread<F>(
    name: impl Into<String>,
    fut: F,
) -> std::io::Result<std::thread::JoinHandle<F::Output>>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || rt.block_on(fut))
}
