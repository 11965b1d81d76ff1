//! The router's side of talking to engines (and to the OTLP collector): the HTTP client
//! type, one connection pool per thread, a bounded `GET`, and the header names the
//! proxy, tracing, discovery and the KV-event subscriber share. Every module that calls
//! out imports these from here, never from one another.

use std::cell::RefCell;
use std::time::Duration;

use axum::http::{header, HeaderValue, Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The request id, taken from the client when it sent one, sent to the engine and back.
pub const REQUEST_ID: &str = "x-request-id";
/// Response header naming the engine (`host:port`) that served the request.
pub const ENGINE_HEADER: &str = "x-switchyard-engine";
/// W3C trace context: the caller's, and each upstream attempt's span.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The HTTP/1.1 client every upstream call goes through.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client with its own pool: no Nagle, `connect_timeout` per connect, plain HTTP only.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(connect_timeout));
    conn.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(conn)
}

thread_local! {
    /// One upstream connection pool per thread: a connection is driven by the runtime
    /// that opened it, so a per-core router never hands a socket to another thread.
    static CLIENT: RefCell<Option<HttpClient>> = const { RefCell::new(None) };
}

/// This thread's client (made on first use with `connect_timeout`).
pub fn thread_client(connect_timeout: Duration) -> HttpClient {
    CLIENT.with(|c| {
        c.borrow_mut()
            .get_or_insert_with(|| http_client(connect_timeout))
            .clone()
    })
}

/// GET `url` with `authorization` (when given), body capped at 8 MiB.
pub async fn get(
    client: &HttpClient,
    url: &str,
    timeout: Duration,
    authorization: Option<&HeaderValue>,
) -> Result<(StatusCode, Bytes), String> {
    let mut req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    if let Some(a) = authorization {
        req.headers_mut().insert(header::AUTHORIZATION, a.clone());
    }
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 8 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// POST a JSON `body` to `url` with `authorization` (when given), answer capped at 1 MiB.
pub async fn post_json(
    client: &HttpClient,
    url: &str,
    body: Bytes,
    timeout: Duration,
    authorization: Option<&HeaderValue>,
) -> Result<(StatusCode, Bytes), String> {
    let mut req = Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    if let Some(a) = authorization {
        req.headers_mut().insert(header::AUTHORIZATION, a.clone());
    }
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| "timed out".to_string())?
}
