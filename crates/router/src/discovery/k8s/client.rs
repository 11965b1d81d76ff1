//! The Kubernetes API client: just enough HTTP/1.1 for a LIST or a WATCH, one
//! connection per request, over rustls (the `ring` provider) for https.
//!
//! Where and how: in a pod, `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`
//! with the service account's token (re-read every minute and after a 401, as it rotates)
//! and CA; `--k8s-api-server` (http or https), `--k8s-token-file` and `--k8s-ca-file`
//! override them. Out of a cluster, a kubeconfig context ([`kubeconfig`]: token or client
//! certificate) gives them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, HOST, USER_AGENT};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::kubeconfig::{self, TokenSource};
use super::objects::ApiStatus;
use crate::config::RouterArgs;

/// The service account's files inside a pod.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request (a LIST page, or a WATCH opening) must have its response headers within
/// this.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the token file is read again.
const TOKEN_REFRESH: Duration = Duration::from_secs(60);

/// Where the API server is and how to authenticate.
pub struct ApiClient {
    tls: Option<tokio_rustls::TlsConnector>,
    /// Host as a TLS server name and for connecting (no brackets around IPv6).
    host: String,
    port: u16,
    /// `Host` header value.
    authority: HeaderValue,
    /// Path prefix before `/api/v1` (empty, or `/something` with no trailing slash).
    prefix: String,
    token: Option<Token>,
}

struct Token {
    source: TokenSource,
    cached: Mutex<Option<(HeaderValue, Instant)>>,
}

impl Token {
    fn header(&self) -> Result<HeaderValue, String> {
        let path = match &self.source {
            TokenSource::Inline(t) => {
                return HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| "the kubeconfig's token is not a header value".to_string());
            }
            TokenSource::File(p) => p,
        };
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, at)) = c.as_ref() {
            if at.elapsed() < TOKEN_REFRESH {
                return Ok(v.clone());
            }
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the token {}: {e}", path.display()))?;
        let v = HeaderValue::from_str(&format!("Bearer {}", text.trim()))
            .map_err(|_| format!("the token in {} is not a header value", path.display()))?;
        *c = Some((v.clone(), Instant::now()));
        Ok(v)
    }

    fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

fn existing(path: PathBuf) -> Option<PathBuf> {
    path.exists().then_some(path)
}

impl ApiClient {
    /// `--k8s-kubeconfig` if given; else `--k8s-api-server` and the other flags; else,
    /// in a pod, its service account and `KUBERNETES_SERVICE_*`; else the default
    /// kubeconfig (`$KUBECONFIG`, `~/.kube/config`). `--k8s-token-file` and
    /// `--k8s-ca-file` override a kubeconfig's token and CA.
    pub fn from_args(args: &RouterArgs) -> Result<ApiClient, String> {
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let kubeconfig = match &args.k8s_kubeconfig {
            Some(p) => Some(p.clone()),
            None if args.k8s_api_server.is_none() && !in_pod => {
                kubeconfig::default_path().and_then(existing)
            }
            None => None,
        };
        if let Some(path) = kubeconfig {
            let a = kubeconfig::load(&path, args.k8s_context.as_deref())?;
            let token = args
                .k8s_token_file
                .clone()
                .map(TokenSource::File)
                .or(a.token);
            let ca = match &args.k8s_ca_file {
                Some(p) => {
                    Some(std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?)
                }
                None => a.ca_pem,
            };
            let client = a
                .client_cert
                .as_ref()
                .map(|(c, k)| (c.as_slice(), k.as_slice()));
            return ApiClient::build(&a.server, token, ca.as_deref(), client);
        }
        let server = match &args.k8s_api_server {
            Some(s) => s.trim().to_string(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    "--service-discovery k8s: not in a pod (no KUBERNETES_SERVICE_HOST) and no kubeconfig ($KUBECONFIG, ~/.kube/config); give --k8s-kubeconfig or --k8s-api-server"
                        .to_string()
                })?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                format!("https://{host}:{port}")
            }
        };
        let token = args
            .k8s_token_file
            .clone()
            .or_else(|| existing(PathBuf::from(SA_DIR).join("token")));
        let ca = args
            .k8s_ca_file
            .clone()
            .or_else(|| existing(PathBuf::from(SA_DIR).join("ca.crt")));
        let ca_pem = match &ca {
            Some(p) => Some(std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?),
            None => None,
        };
        ApiClient::new(&server, token, ca_pem.as_deref())
    }

    /// `server` is `http(s)://HOST[:PORT][/PREFIX]`; `ca_pem` is required for https.
    pub fn new(
        server: &str,
        token: Option<PathBuf>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, String> {
        Self::build(server, token.map(TokenSource::File), ca_pem, None)
    }

    /// [`ApiClient::new`] with any token source and, for https, an optional client
    /// certificate chain and key (PEM).
    pub fn build(
        server: &str,
        token: Option<TokenSource>,
        ca_pem: Option<&[u8]>,
        client_cert: Option<(&[u8], &[u8])>,
    ) -> Result<Self, String> {
        let (https, rest) = if let Some(r) = server.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = server.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "--k8s-api-server {server:?}: expected http:// or https://"
            ));
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let default_port = if https { 443 } else { 80 };
        let (host, port) = split_host_port(authority, default_port)
            .ok_or_else(|| format!("--k8s-api-server {server:?}: bad host or port"))?;
        let tls = if https {
            let pem = ca_pem.ok_or_else(|| {
                format!("API server {server:?} is https: give --k8s-ca-file or a kubeconfig with its CA (no service account CA here)")
            })?;
            Some(tls_connector_with(pem, client_cert)?)
        } else {
            None
        };
        Ok(ApiClient {
            tls,
            authority: HeaderValue::from_str(authority)
                .map_err(|_| format!("--k8s-api-server {server:?}: bad host"))?,
            host,
            port,
            prefix: prefix.to_string(),
            token: token.map(|source| Token {
                source,
                cached: Mutex::new(None),
            }),
        })
    }

    /// GET `path_and_query` (below the server's prefix) on a new connection.
    pub async fn get(&self, path_and_query: &str) -> Result<Response<Incoming>, String> {
        let mut req = Request::get(format!("{}{path_and_query}", self.prefix))
            .header(HOST, self.authority.clone())
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, "switchyard-router")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        if let Some(t) = &self.token {
            req.headers_mut().insert(AUTHORIZATION, t.header()?);
        }
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| format!("connecting to {}: timed out", self.host))?
        .map_err(|e| format!("connecting to {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        let resp = match &self.tls {
            None => send(tcp, req).await?,
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("{}: {e}", self.host))?;
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
                    .await
                    .map_err(|_| "TLS handshake timed out".to_string())?
                    .map_err(|e| format!("TLS: {e}"))?;
                send(stream, req).await?
            }
        };
        if resp.status() == StatusCode::UNAUTHORIZED {
            if let Some(t) = &self.token {
                t.invalidate();
            }
        }
        Ok(resp)
    }
}

/// One request on its own HTTP/1.1 connection; the connection ends with the response.
async fn send<I>(io: I, req: Request<Empty<Bytes>>) -> Result<Response<Incoming>, String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tokio::time::timeout(LIST_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| "no response headers in time".to_string())?
        .map_err(|e| e.to_string())
}

fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None if !authority.is_empty() => Some((authority.to_string(), default_port)),
        None => None,
    }
}

/// A TLS client trusting exactly the CA certificates in `pem` (rustls, `ring`).
pub fn tls_connector(pem: &[u8]) -> Result<tokio_rustls::TlsConnector, String> {
    tls_connector_with(pem, None)
}

/// [`tls_connector`], presenting a client certificate chain and key (PEM) when given.
pub fn tls_connector_with(
    pem: &[u8],
    client_cert: Option<(&[u8], &[u8])>,
) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("CA file: {e}"))?;
        roots.add(cert).map_err(|e| format!("CA file: {e}"))?;
    }
    if roots.is_empty() {
        return Err("CA file: no certificate in it".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cfg = match client_cert {
        None => cfg.with_no_client_auth(),
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client certificate: {e}"))?;
            if chain.is_empty() {
                return Err("client certificate: no certificate in it".into());
            }
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("client key: {e}"))?;
            cfg.with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// Percent-encode a query value or path segment (RFC 3986 unreserved kept).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Read an error response's Status message (bounded).
pub async fn error_text(resp: Response<Incoming>) -> String {
    let status = resp.status();
    let body = Limited::new(resp.into_body(), 64 << 10)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    match serde_json::from_slice::<ApiStatus>(&body) {
        Ok(s) if !s.message.is_empty() => format!("{status}: {}", s.message),
        _ => format!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_urls_and_encoding() {
        assert_eq!(
            split_host_port("10.96.0.1:443", 80),
            Some(("10.96.0.1".into(), 443))
        );
        assert_eq!(
            split_host_port("[fd00::1]", 443),
            Some(("fd00::1".into(), 443))
        );
        assert_eq!(
            split_host_port("[fd00::1]:6443", 443),
            Some(("fd00::1".into(), 6443))
        );
        assert_eq!(split_host_port("host", 80), Some(("host".into(), 80)));
        assert_eq!(split_host_port(":1", 80), None);
        let c = ApiClient::new("http://127.0.0.1:8001/proxy/", None, None).expect("http");
        assert_eq!(
            (c.host.as_str(), c.port, c.prefix.as_str()),
            ("127.0.0.1", 8001, "/proxy")
        );
        assert!(
            ApiClient::new("https://k:443", None, None).is_err(),
            "https needs a CA"
        );
        assert!(ApiClient::new("ftp://k", None, None).is_err());
        assert!(tls_connector(b"not a pem").is_err());
        assert_eq!(
            encode("app=vllm,env in (a, b),!x"),
            "app%3Dvllm%2Cenv%20in%20%28a%2C%20b%29%2C%21x"
        );
    }
}
