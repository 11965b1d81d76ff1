//! The router's side of talking to engines (and to the OTLP collector): the HTTP client
//! (one connection pool per thread; a request a stale kept-alive connection dropped is
//! sent again on a new connection), a bounded `GET` and JSON `POST`, and the header names the
//! proxy, tracing, discovery and the KV-event subscriber share. Every module that calls
//! out imports these from here, never from one another.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::uri::InvalidUri;
use axum::http::{header, Extensions, HeaderValue, Method, Request, Response, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// The request id, taken from the client when it sent one, sent to the engine and back.
pub const REQUEST_ID: &str = "x-request-id";
/// Response header naming the engine (`host:port`) that served the request.
pub const ENGINE_HEADER: &str = "x-switchyard-engine";
/// W3C trace context: the caller's, and each upstream attempt's span.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The HTTP/1.1 client every upstream call goes through: a pool of kept-alive
/// connections, and a second client that never keeps one, for the send after a pooled
/// connection closed unanswered ([`HttpClient::send`]). Cloning shares both.
#[derive(Clone)]
pub struct HttpClient {
    pooled: Client<Connector, Full<Bytes>>,
    fresh: Client<Connector, Full<Bytes>>,
}

/// What [`HttpClient::send`] gets back.
pub type SendResult = Result<Response<Incoming>, hyper_util::client::legacy::Error>;

impl HttpClient {
    /// A client with its own pool: no Nagle, `connect_timeout` per connect, plain HTTP
    /// only.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(connect_timeout));
        conn.enforce_http(true);
        let conn = Connector(conn);
        let pooled = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(conn.clone());
        let fresh = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(conn);
        HttpClient { pooled, fresh }
    }

    /// The same client without keep-alive: every request on a new connection, closed
    /// once answered. For probing and scraping an engine that is not healthy: a
    /// connection kept alive by calls every few seconds holds a draining server open
    /// (uvicorn, so vLLM, waits for its connections to close before it exits, and a
    /// kept-alive connection in use never does).
    pub fn unkept(&self) -> HttpClient {
        HttpClient {
            pooled: self.fresh.clone(),
            fresh: self.fresh.clone(),
        }
    }

    /// Send the request `make` builds. When the engine closed a kept-alive connection
    /// (opened before this request) without any of the answer ([`httpx::closed_unanswered`]:
    /// llama-server closes one after every streamed answer; any server may when its idle
    /// timeout meets a new request), it is built and sent once more, on a new connection
    /// that is not kept: nothing was answered, and the engine is not to blame. A new
    /// connection closed unanswered is the engine's failure, returned as it is.
    pub async fn send(&self, make: impl Fn() -> Request<Full<Bytes>>) -> SendResult {
        let sent = Instant::now();
        match self.pooled.request(make()).await {
            Err(e) if httpx::closed_unanswered(&e) && opened_before(&e, sent) => {
                tracing::debug!(error = %e, "kept-alive connection closed unanswered; sending again on a new one");
                self.fresh.request(make()).await
            }
            r => r,
        }
    }
}

/// Whether the connection `e` happened on was opened before `t`.
fn opened_before(e: &hyper_util::client::legacy::Error, t: Instant) -> bool {
    let Some(info) = e.connect_info() else {
        return false;
    };
    let mut ext = Extensions::new();
    info.get_extras(&mut ext);
    ext.get::<Opened>().is_some_and(|o| o.0 < t)
}

/// When a connection was opened: carried in its `Connected` info, so that a failed
/// request can tell a kept-alive connection from the one opened for it.
#[derive(Clone, Copy)]
struct Opened(Instant);

/// [`HttpConnector`] whose connections carry [`Opened`].
#[derive(Clone)]
pub struct Connector(HttpConnector);

impl tower_service::Service<Uri> for Connector {
    type Response = Stamped;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Stamped, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(Stamped {
                io,
                opened: Instant::now(),
            })
        })
    }
}

/// A TCP connection and when it was opened.
pub struct Stamped {
    io: TokioIo<TcpStream>,
    opened: Instant,
}

impl Connection for Stamped {
    fn connected(&self) -> Connected {
        self.io.connected().extra(Opened(self.opened))
    }
}

impl hyper::rt::Read for Stamped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Stamped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
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
            .get_or_insert_with(|| HttpClient::new(connect_timeout))
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
    call(client, url, None, 8 << 20, timeout, authorization).await
}

/// POST a JSON `body` to `url` with `authorization` (when given), answer capped at 1 MiB.
pub async fn post_json(
    client: &HttpClient,
    url: &str,
    body: Bytes,
    timeout: Duration,
    authorization: Option<&HeaderValue>,
) -> Result<(StatusCode, Bytes), String> {
    call(client, url, Some(body), 1 << 20, timeout, authorization).await
}

/// GET `url`, or POST it the JSON `json`; the answer read whole up to `cap` bytes, all
/// within `timeout`.
async fn call(
    client: &HttpClient,
    url: &str,
    json: Option<Bytes>,
    cap: usize,
    timeout: Duration,
    authorization: Option<&HeaderValue>,
) -> Result<(StatusCode, Bytes), String> {
    let uri: Uri = url.parse().map_err(|e: InvalidUri| e.to_string())?;
    let make = || {
        let mut req = match &json {
            Some(body) => {
                let mut req = Request::new(Full::new(body.clone()));
                *req.method_mut() = Method::POST;
                req.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                req
            }
            None => Request::new(Full::default()),
        };
        *req.uri_mut() = uri.clone();
        if let Some(a) = authorization {
            req.headers_mut().insert(header::AUTHORIZATION, a.clone());
        }
        req
    };
    let fut = async {
        let resp = client.send(make).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), cap)
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
