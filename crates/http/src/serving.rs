//! How both roles serve: plain TCP or TLS (rustls, `--ssl-certfile`/`--ssl-keyfile` as
//! `vllm serve` names them), TCP_NODELAY on every connection, and a bounded drain: on the
//! shutdown signal the listener closes, in-flight requests (streams included) finish, and
//! whatever is still open after `--shutdown-timeout` is cut.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish its TLS handshake before it is dropped; a slow
/// or silent client never holds up anyone else's accept.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them (backpressure on accept).
const ACCEPT_QUEUE: usize = 128;

/// Serving options shared by every listener of a process.
#[derive(Clone)]
pub struct Serving {
    /// TLS on the listener, or plain HTTP.
    pub tls: Option<TlsAcceptor>,
    /// After the shutdown signal, how long in-flight requests may run before the server
    /// returns and their connections are cut.
    pub grace: Duration,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            tls: None,
            grace: Duration::from_secs(30),
        }
    }
}

impl Serving {
    /// Options from the flags: TLS when both files are given (one without the other is an
    /// error), and the drain bound in seconds.
    pub fn from_flags(
        certfile: Option<&Path>,
        keyfile: Option<&Path>,
        shutdown_timeout_secs: f64,
    ) -> Result<Self, TlsError> {
        let tls = match (certfile, keyfile) {
            (None, None) => None,
            (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
            _ => return Err(TlsError::Incomplete),
        };
        if !(shutdown_timeout_secs.is_finite() && shutdown_timeout_secs >= 0.0) {
            return Err(TlsError::Grace(shutdown_timeout_secs));
        }
        Ok(Serving {
            tls,
            grace: Duration::from_secs_f64(shutdown_timeout_secs),
        })
    }

    /// The URL scheme clients use: `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--ssl-certfile and --ssl-keyfile go together: give both or neither")]
    Incomplete,
    #[error("reading {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("--shutdown-timeout must be a number of seconds >= 0, not {0}")]
    Grace(f64),
}

/// A rustls server configuration from PEM files (a certificate chain; a PKCS#8, PKCS#1
/// or SEC1 private key), offering HTTP/1.1.
pub fn tls_acceptor(certfile: &Path, keyfile: &Path) -> Result<TlsAcceptor, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read_err = |path: &Path, e: &dyn std::fmt::Display| TlsError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(certfile)
        .map_err(|e| read_err(certfile, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(certfile, &e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: certfile.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(keyfile).map_err(|e| read_err(keyfile, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serve `app` on `listener` until `shutdown` resolves, then drain for at most
/// `serving.grace`.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    serving: &Serving,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    match &serving.tls {
        None => {
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            drain(listener, app, shutdown, serving.grace).await
        }
        Some(acceptor) => {
            let listener = TlsListener::new(listener, acceptor.clone())?;
            drain(listener, app, shutdown, serving.grace).await
        }
    }
}

async fn drain<L>(
    listener: L,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = signalled_tx.send(());
    });
    let deadline = async move {
        match signalled_rx.await {
            Ok(()) => tokio::time::sleep(grace).await,
            // The server ended on its own: nothing to bound.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        result = server.into_future() => result,
        () = deadline => {
            tracing::warn!(grace_secs = grace.as_secs_f64(), "shutdown timeout reached; closing the connections still open");
            Ok(())
        }
    }
}

/// A TLS listener for `axum::serve`: a task accepts TCP connections and runs each
/// handshake on its own task (bounded by [`HANDSHAKE_TIMEOUT`]), handing finished ones
/// over a bounded channel. Dropping the listener stops accepting.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(ACCEPT_QUEUE);
        let accept_task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, as axum does.
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            rx,
            addr,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// The serving flags both roles take (`#[command(flatten)]`), named as `vllm serve`
/// names them.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// PEM certificate chain: serve HTTPS (needs --ssl-keyfile).
    #[arg(long, value_name = "PATH")]
    pub ssl_certfile: Option<std::path::PathBuf>,
    /// PEM private key for --ssl-certfile.
    #[arg(long, value_name = "PATH")]
    pub ssl_keyfile: Option<std::path::PathBuf>,
    /// On SIGTERM/SIGINT: stop accepting, let in-flight requests (streams included) run
    /// for at most this many seconds, then exit. Keep it below the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
}

impl ServeArgs {
    pub fn serving(&self) -> Result<Serving, TlsError> {
        Serving::from_flags(
            self.ssl_certfile.as_deref(),
            self.ssl_keyfile.as_deref(),
            self.shutdown_timeout,
        )
    }
}

impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs {
            ssl_certfile: None,
            ssl_keyfile: None,
            shutdown_timeout: 30.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tls")
            .join(name)
    }

    #[test]
    fn flags_give_tls_only_with_both_files() {
        let (cert, key) = (fixture("cert.pem"), fixture("key.pem"));
        let s = Serving::from_flags(Some(&cert), Some(&key), 2.5).expect("valid files");
        assert_eq!(s.scheme(), "https");
        assert_eq!(s.grace, Duration::from_millis(2500));
        assert_eq!(
            Serving::from_flags(None, None, 0.0).unwrap().scheme(),
            "http"
        );
        assert!(matches!(
            Serving::from_flags(Some(&cert), None, 1.0),
            Err(TlsError::Incomplete)
        ));
        assert!(matches!(
            Serving::from_flags(None, None, -1.0),
            Err(TlsError::Grace(_))
        ));
        // A key where the certificate should be, and a missing file: clear errors.
        assert!(matches!(
            Serving::from_flags(Some(&key), Some(&key), 1.0),
            Err(TlsError::NoCertificate { .. })
        ));
        let missing = fixture("missing.pem");
        let e = Serving::from_flags(Some(&missing), Some(&key), 1.0).err();
        assert!(
            matches!(&e, Some(TlsError::Read { path, .. }) if path.contains("missing.pem")),
            "{e:?}"
        );
    }
}
