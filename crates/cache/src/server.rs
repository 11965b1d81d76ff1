//! `switchyard cache-server`: the shared KV tier's remote server. It speaks LMCache's
//! `lm://` protocol ([`crate::lm`]) so real vLLM engines with LMCache and Switchyard
//! engines can both use it, and does better where LMCache's own server fails its users:
//! - memory bounded by `--max-bytes`, least recently used objects evicted first;
//! - one task per connection on a shared runtime (no thread per socket);
//! - a PUT is stored only once its whole body has arrived: a short body changes nothing;
//!   the buffer grows with the bytes received, never with the length a header claims;
//! - a header it cannot parse closes that connection only;
//! - `GET /metrics` and `GET /health` on an HTTP port;
//! - optionally every chunk in a directory too (`--persist-dir`), served after memory
//!   evicted it and across restarts.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::BytesMut;
use protocol::prom::{Counter, TextWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::lm::{self, Reply, Request};
use crate::store::{Object, PutOutcome, Store};

/// `switchyard cache-server` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on (both ports).
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// The `lm://` port (LMCache's `remote_url: lm://HOST:PORT`); 0 picks a free one.
    #[arg(long, default_value_t = 65432)]
    pub port: u16,
    /// The HTTP port for `/metrics` and `/health`; 0 picks a free one.
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Payload bytes held at most; past it the least recently used chunks are evicted.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_bytes: u64,
    /// Also keep every chunk in this directory (written off the request path), and serve
    /// from it what memory evicted; chunks there survive a restart.
    #[arg(long)]
    pub persist_dir: Option<std::path::PathBuf>,
    /// Bytes `--persist-dir` holds at most (least recently used files go first).
    #[arg(long, default_value_t = 16 << 30)]
    pub persist_max_bytes: u64,
}

/// The server's counters (`/metrics`).
#[derive(Default)]
pub struct Metrics {
    put_stored: Counter,
    put_rejected: Counter,
    get_hit: Counter,
    get_miss: Counter,
    exist_hit: Counter,
    exist_miss: Counter,
    health: Counter,
    list: Counter,
    evictions: Counter,
    protocol_errors: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    connections: Counter,
    closed: Counter,
}

/// What every connection shares.
pub struct State {
    pub store: Store,
    pub metrics: Metrics,
    /// `--persist-dir`.
    pub disk: Option<Arc<crate::disk::DiskTier>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A server bound to both its ports.
pub struct Bound {
    pub lm_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub state: Arc<State>,
    lm: TcpListener,
    http: TcpListener,
}

async fn listen(host: &str, port: u16) -> Result<TcpListener, ServerError> {
    TcpListener::bind((host, port))
        .await
        .map_err(|source| ServerError::Bind {
            addr: format!("{host}:{port}"),
            source,
        })
}

pub async fn bind(args: &ServerArgs) -> Result<Bound, ServerError> {
    let disk = match &args.persist_dir {
        Some(dir) => Some(Arc::new(crate::disk::DiskTier::open(
            dir,
            args.persist_max_bytes,
        )?)),
        None => None,
    };
    let lm = listen(&args.host, args.port).await?;
    let http = listen(&args.host, args.http_port).await?;
    Ok(Bound {
        lm_addr: lm.local_addr()?,
        http_addr: http.local_addr()?,
        state: Arc::new(State {
            store: Store::new(args.max_bytes),
            metrics: Metrics::default(),
            disk,
        }),
        lm,
        http,
    })
}

impl Bound {
    /// Serve both ports until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let state = self.state.clone();
        let lm = self.lm;
        let accept = tokio::spawn(async move {
            // Connections end with the server: shutdown aborts them.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    r = lm.accept() => match r {
                        Ok((sock, _)) => {
                            let _ = sock.set_nodelay(true);
                            while conns.try_join_next().is_some() {}
                            conns.spawn(connection(sock, state.clone()));
                        }
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "cache server: accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    },
                    _ = async { let _ = stop_rx.wait_for(|s| *s).await; } => break,
                }
            }
            conns.abort_all();
        });
        let routes = axum::Router::new()
            .route("/health", get(|| async { httpx::json_ok(&serde_health()) }))
            .route("/metrics", get(render_metrics))
            .with_state(self.state.clone());
        let result = httpx::serve(
            self.http,
            routes,
            async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            },
            &httpx::Serving::default(),
        )
        .await;
        let _ = accept.await;
        result
    }
}

fn serde_health() -> std::collections::BTreeMap<&'static str, &'static str> {
    std::collections::BTreeMap::from([("status", "ok")])
}

/// One client connection: requests in order until it closes or sends what cannot be
/// parsed.
async fn connection(mut sock: TcpStream, state: Arc<State>) {
    let m = &state.metrics;
    m.connections.inc();
    let mut header = [0u8; lm::REQUEST_LEN];
    loop {
        if sock.read_exact(&mut header).await.is_err() {
            break;
        }
        let req = match Request::decode(&header) {
            Ok(r) => r,
            Err(e) => {
                m.protocol_errors.inc();
                tracing::debug!(error = %e, "cache server: closing a connection after a bad header");
                break;
            }
        };
        let ok = match req.command {
            lm::PUT => put(&mut sock, &state, req).await,
            lm::GET => match lookup(&state, &req.key).await {
                Some(o) => {
                    m.get_hit.inc();
                    m.bytes_out.add(o.data.len() as u64);
                    let reply = Reply {
                        code: lm::SUCCESS,
                        meta: o.meta,
                        location: 0,
                    };
                    sock.write_all(&reply.encode()).await.is_ok()
                        && sock.write_all(&o.data).await.is_ok()
                }
                None => {
                    m.get_miss.inc();
                    sock.write_all(&Reply::bare(lm::FAIL).encode())
                        .await
                        .is_ok()
                }
            },
            lm::EXIST => {
                let on_disk = state.disk.as_ref().is_some_and(|d| d.contains(&req.key));
                let code = if state.store.contains(&req.key) || on_disk {
                    m.exist_hit.inc();
                    lm::SUCCESS
                } else {
                    m.exist_miss.inc();
                    lm::FAIL
                };
                sock.write_all(&Reply::bare(code).encode()).await.is_ok()
            }
            lm::HEALTH => {
                m.health.inc();
                sock.write_all(&Reply::bare(lm::SUCCESS).encode())
                    .await
                    .is_ok()
            }
            // LMCache's server answers LIST with nothing; so do we.
            _ => {
                m.list.inc();
                true
            }
        };
        if !ok {
            break;
        }
    }
    m.closed.inc();
}

/// A chunk from memory, else from `--persist-dir` (read on the blocking pool, and kept
/// in memory again).
async fn lookup(state: &Arc<State>, key: &str) -> Option<Object> {
    if let Some(o) = state.store.get(key) {
        return Some(o);
    }
    let disk = state.disk.clone()?;
    let k = key.to_string();
    let o = tokio::task::spawn_blocking(move || disk.get(&k))
        .await
        .ok()??;
    if let PutOutcome::Stored { evicted } = state.store.put(key, o.clone()) {
        state.metrics.evictions.add(evicted as u64);
    }
    Some(o)
}

/// Read a PUT's body and store it. False when the connection must close (the body was
/// cut short: nothing is stored).
async fn put(sock: &mut TcpStream, state: &Arc<State>, req: Request) -> bool {
    let m = &state.metrics;
    let len = req.meta.length as u64;
    if len > state.store.max_bytes() {
        // Larger than the whole store: read past it to stay in step with the client.
        m.put_rejected.inc();
        let mut sink = tokio::io::sink();
        let mut body = (&mut *sock).take(len);
        return matches!(tokio::io::copy(&mut body, &mut sink).await, Ok(n) if n == len);
    }
    let len = len as usize;
    // Grown as bytes arrive, so a header claiming a large body costs nothing until the
    // bytes are really sent.
    let mut buf = BytesMut::with_capacity(len.min(1 << 20));
    while buf.len() < len {
        let want = (len - buf.len()).min(1 << 20);
        buf.reserve(want);
        let mut limited = (&mut *sock).take(want as u64);
        match limited.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                m.put_rejected.inc();
                return false;
            }
            Ok(_) => {}
        }
    }
    m.bytes_in.add(len as u64);
    let object = Object {
        meta: req.meta,
        data: buf.freeze(),
    };
    if let Some(disk) = &state.disk {
        let (disk, key, o) = (disk.clone(), req.key.clone(), object.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = disk.put(&key, &o) {
                tracing::warn!(error = %e, "cache server: writing to --persist-dir failed");
            }
        });
    }
    match state.store.put(&req.key, object) {
        PutOutcome::Stored { evicted } => {
            m.put_stored.inc();
            m.evictions.add(evicted as u64);
        }
        PutOutcome::TooLarge => m.put_rejected.inc(),
    }
    true
}

async fn render_metrics(axum::extract::State(state): axum::extract::State<Arc<State>>) -> Response {
    let m = &state.metrics;
    let (entries, bytes) = state.store.usage();
    let mut w = TextWriter::new();
    let gauge = |w: &mut TextWriter, name: &str, help: &str, v: f64| {
        w.header(name, "gauge", help);
        w.sample(name, &[], v);
    };
    gauge(
        &mut w,
        "switchyard_cache_server_bytes",
        "Payload bytes held.",
        bytes as f64,
    );
    gauge(
        &mut w,
        "switchyard_cache_server_entries",
        "Chunks held.",
        entries as f64,
    );
    gauge(
        &mut w,
        "switchyard_cache_server_max_bytes",
        "Payload bytes held at most (--max-bytes).",
        state.store.max_bytes() as f64,
    );
    let open = m.connections.get().saturating_sub(m.closed.get());
    gauge(
        &mut w,
        "switchyard_cache_server_connections",
        "Open client connections.",
        open as f64,
    );
    let name = "switchyard_cache_server_requests_total";
    w.header(name, "counter", "Requests by command and outcome.");
    for (command, outcome, c) in [
        ("put", "stored", &m.put_stored),
        ("put", "rejected", &m.put_rejected),
        ("get", "hit", &m.get_hit),
        ("get", "miss", &m.get_miss),
        ("exist", "hit", &m.exist_hit),
        ("exist", "miss", &m.exist_miss),
        ("health", "ok", &m.health),
        ("list", "ok", &m.list),
    ] {
        w.sample(
            name,
            &[("command", command), ("outcome", outcome)],
            c.get() as f64,
        );
    }
    for (name, help, c) in [
        (
            "switchyard_cache_server_evictions_total",
            "Chunks evicted to stay within --max-bytes.",
            &m.evictions,
        ),
        (
            "switchyard_cache_server_protocol_errors_total",
            "Connections closed after a header that could not be parsed.",
            &m.protocol_errors,
        ),
        (
            "switchyard_cache_server_received_bytes_total",
            "Payload bytes stored by PUTs.",
            &m.bytes_in,
        ),
        (
            "switchyard_cache_server_sent_bytes_total",
            "Payload bytes sent by GET hits.",
            &m.bytes_out,
        ),
    ] {
        w.header(name, "counter", help);
        w.sample(name, &[], c.get() as f64);
    }
    httpx::process::write_process_metrics(&mut w, None);
    let mut r = w.finish().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(protocol::prom::CONTENT_TYPE),
    );
    r
}

/// Run a cache server until SIGINT/SIGTERM, printing `LM lm://ADDR` and then
/// `READY http://ADDR` on stdout once both ports serve.
pub async fn run(args: ServerArgs) -> Result<(), ServerError> {
    let bound = bind(&args).await?;
    tracing::info!(lm = %bound.lm_addr, http = %bound.http_addr, max_bytes = args.max_bytes, "cache server listening");
    println!("LM lm://{}", bound.lm_addr);
    println!("READY http://{}", bound.http_addr);
    bound.serve(httpx::shutdown_signal()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::client::LmClient;
    use crate::lm::Meta;

    async fn start(max_bytes: u64) -> (SocketAddr, Arc<State>, tokio::sync::oneshot::Sender<()>) {
        start_on(0, max_bytes).await
    }

    async fn start_on(
        port: u16,
        max_bytes: u64,
    ) -> (SocketAddr, Arc<State>, tokio::sync::oneshot::Sender<()>) {
        let args = ServerArgs {
            host: "127.0.0.1".into(),
            port,
            http_port: 0,
            max_bytes,
            persist_dir: None,
            persist_max_bytes: 1 << 30,
        };
        let bound = bind(&args).await.expect("bind");
        let (addr, state) = (bound.lm_addr, bound.state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(bound.serve(async move {
            let _ = rx.await;
        }));
        (addr, state, tx)
    }

    fn meta(shape0: i32) -> Meta {
        Meta {
            length: 0,
            fmt: lm::FMT_KV_2LTD,
            dtype: lm::DTYPE_BFLOAT16,
            shape: [shape0, 2, 4, 8],
        }
    }

    #[tokio::test]
    async fn put_exist_get_round_trip_echoes_the_layout() {
        let (addr, state, _stop) = start(1 << 20).await;
        let c = LmClient::new(addr.to_string(), Duration::from_secs(5));
        assert!(!c.exists("m@1@0@1@bfloat16").await.expect("exist"));
        assert!(c.get("m@1@0@1@bfloat16").await.expect("get").is_none());
        let data: Vec<u8> = (0..256u32).map(|i| i as u8).collect();
        c.put("m@1@0@1@bfloat16", meta(2), &data)
            .await
            .expect("put");
        assert!(c.exists("m@1@0@1@bfloat16").await.expect("exist"));
        let o = c.get("m@1@0@1@bfloat16").await.expect("get").expect("hit");
        assert_eq!(&o.data[..], &data[..]);
        assert_eq!(
            o.meta,
            Meta {
                length: 256,
                ..meta(2)
            }
        );
        assert_eq!(state.store.usage(), (1, 256));
        assert_eq!(
            (state.metrics.get_hit.get(), state.metrics.get_miss.get()),
            (1, 1)
        );
    }

    #[tokio::test]
    async fn a_short_put_stores_nothing_and_others_are_served() {
        let (addr, state, _stop) = start(1 << 20).await;
        let mut raw = TcpStream::connect(addr).await.expect("connect");
        let header = Request::new(
            lm::PUT,
            Meta {
                length: 65536,
                ..meta(2)
            },
            "short",
        )
        .encode()
        .expect("encode");
        raw.write_all(&header).await.expect("write");
        raw.write_all(&[7u8; 100]).await.expect("write");
        drop(raw);
        let c = LmClient::new(addr.to_string(), Duration::from_secs(5));
        // The server notices the close; wait on the counter, not a sleep.
        for _ in 0..500 {
            if state.metrics.put_rejected.get() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(state.metrics.put_rejected.get(), 1);
        assert!(!c.exists("short").await.expect("exist"));
        assert_eq!(state.store.usage(), (0, 0));
        // A bad header closes only its own connection.
        let mut bad = TcpStream::connect(addr).await.expect("connect");
        let mut h = Request::new(lm::GET, Meta::NONE, "k")
            .encode()
            .expect("encode");
        h[..4].copy_from_slice(&42i32.to_ne_bytes());
        bad.write_all(&h).await.expect("write");
        let mut buf = [0u8; 1];
        assert_eq!(bad.read(&mut buf).await.expect("read"), 0, "closed");
        c.put("ok", meta(1), &[1, 2, 3]).await.expect("put");
        assert!(c.exists("ok").await.expect("exist"));
    }

    #[tokio::test]
    async fn memory_stays_within_max_bytes_and_too_large_is_refused() {
        let (addr, state, _stop) = start(10_000).await;
        let c = LmClient::new(addr.to_string(), Duration::from_secs(5));
        for i in 0..50 {
            c.put(&format!("k{i}"), meta(1), &[i as u8; 1000])
                .await
                .expect("put");
        }
        assert!(c.exists("k49").await.expect("exist"));
        assert!(
            !c.exists("k0").await.expect("exist"),
            "the oldest went first"
        );
        let (n, bytes) = state.store.usage();
        assert!(bytes <= 10_000 && n == 10, "{n} {bytes}");
        assert_eq!(state.metrics.evictions.get(), 40);
        // Larger than the whole store: read past, not stored, the connection goes on.
        c.put("huge", meta(1), &vec![0u8; 20_000])
            .await
            .expect("put");
        assert!(!c.exists("huge").await.expect("exist"));
        assert!(c.exists("k49").await.expect("exist"));
        assert_eq!(state.metrics.put_rejected.get(), 1);
    }

    #[tokio::test]
    async fn a_restarted_server_is_reached_again_after_the_backoff() {
        let (addr, _state, stop) = start(1 << 20).await;
        let c = LmClient::new(addr.to_string(), Duration::from_secs(5));
        c.put("a", meta(1), &[1]).await.expect("put");
        assert!(c.exists("a").await.expect("exist"));
        let _ = stop.send(());
        // The connection is cut and the port closed: errors, never a hang.
        let mut failed = false;
        for _ in 0..200 {
            if c.exists("a").await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(failed, "a stopped server is an error");
        // Restarted on the same port (empty): reached again once the backoff allows.
        let (_addr, _state2, _stop2) = start_on(addr.port(), 1 << 20).await;
        let mut back = None;
        for _ in 0..100 {
            match c.exists("a").await {
                Ok(found) => {
                    back = Some(found);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        assert_eq!(back, Some(false), "reconnected to the new, empty server");
    }

    #[tokio::test]
    async fn persisted_chunks_outlive_memory_and_restarts() {
        let dir = std::env::temp_dir().join(format!("switchyard-persist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let args = |port| ServerArgs {
            host: "127.0.0.1".into(),
            port,
            http_port: 0,
            max_bytes: 3000,
            persist_dir: Some(dir.clone()),
            persist_max_bytes: 1 << 20,
        };
        let start = |a: ServerArgs| async move {
            let bound = bind(&a).await.expect("bind");
            let (addr, state) = (bound.lm_addr, bound.state.clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(bound.serve(async move {
                let _ = rx.await;
            }));
            (addr, state, tx)
        };
        let (addr, state, stop) = start(args(0)).await;
        let c = LmClient::new(addr.to_string(), Duration::from_secs(5));
        for i in 0..5u8 {
            c.put(&format!("k{i}"), meta(1), &[i; 1000])
                .await
                .expect("put");
        }
        // Memory holds three; the first two come back from the directory.
        let disk = state.disk.clone().expect("disk");
        for _ in 0..500 {
            if disk.bytes() == 5000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(disk.bytes(), 5000);
        assert_eq!(state.store.usage().0, 3);
        assert!(c.exists("k0").await.expect("exist"));
        let o = c.get("k0").await.expect("get").expect("from disk");
        assert_eq!(
            (o.data.len(), o.data[0], o.meta.shape),
            (1000, 0, [1, 2, 4, 8])
        );
        let _ = stop.send(());
        let (addr2, _state2, _stop2) = start(args(0)).await;
        let c2 = LmClient::new(addr2.to_string(), Duration::from_secs(5));
        let o = c2.get("k4").await.expect("get").expect("after a restart");
        assert_eq!(o.data[..], [4u8; 1000][..]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
