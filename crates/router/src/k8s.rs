//! Kubernetes service discovery (`--service-discovery k8s`): the engine set follows the
//! pods (or Services) that match `--k8s-label-selector` in `--k8s-namespace`.
//!
//! The watcher is a reflector in the manner of client-go's: LIST (paginated) gives the
//! objects and a `resourceVersion`; WATCH from it with `allowWatchBookmarks=true` and
//! `timeoutSeconds` streams `ADDED`/`MODIFIED`/`DELETED` events, and `BOOKMARK`s that only
//! move the resourceVersion on. A watch that ends (its timeout, a dropped connection) is
//! resumed from the last resourceVersion seen; `410 Gone` (an HTTP 410 when the watch
//! opens, or an `ERROR` event whose Status has code 410: the version left the server's
//! history) means events may have been missed, so the watcher lists again and replaces
//! the set with what the list says. Either way the new set is handed whole to
//! [`Registry::apply`](crate::engines::Registry::apply), which keeps the `Endpoint` (its
//! health, load and statistics) of every engine that stays. Failures back off from 0.5 s
//! to 30 s; a watch that ends at once without news counts as a failure, so nothing spins.
//!
//! `pod-ip`: a pod is an engine while it is `Running`, ready (its `Ready` condition, or
//! every container ready when it has no conditions), has a pod IP and is not being
//! deleted (`deletionTimestamp`); it leaves the set on the first event that says
//! otherwise. `service-name`: every Service not being deleted is an engine at
//! `http://NAME.NAMESPACE.svc:PORT`; whether pods stand behind it is left to the health
//! checks. Either way an engine's models come from its `/v1/models`, as the Production
//! Stack router does (the pods' `model` label names the model spec, which need not be the
//! served name), fetched when it joins and retried for a while if it does not answer.
//!
//! API access: in a pod, `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT` with
//! the service account's token (re-read every minute and after a 401, as it rotates) and
//! CA; `--k8s-api-server` (http or https), `--k8s-token-file` and `--k8s-ca-file` override
//! them. Out of a cluster, a kubeconfig context (`kubeconfig.rs`: token or client
//! certificate) gives them. TLS is rustls on the `ring` provider, one connection per request (a LIST or a
//! WATCH), and only the few JSON fields used here are parsed.
//!
//! Memory: the watcher keeps one name → URL map of the current engines; a watch line is
//! capped at [`MAX_LINE`] and a LIST page at [`MAX_PAGE`].

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, HOST, USER_AGENT};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::config::{BackendSpec, K8sDiscoveryType, K8sSettings, RouterArgs};
use crate::engines::Endpoint;
use crate::kubeconfig::{self, TokenSource};
use crate::RouterState;

/// The service account's files inside a pod.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Longest watch event line accepted (a pod's JSON is a few KiB).
pub const MAX_LINE: usize = 4 << 20;
/// Largest LIST page accepted (pages are asked for [`PAGE_LIMIT`] objects).
pub const MAX_PAGE: usize = 64 << 20;
const PAGE_LIMIT: usize = 500;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A LIST (each page) must be answered within this.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the token file is read again.
const TOKEN_REFRESH: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

// ------------------------------------------------------------------------------------
// API access

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
    async fn get(&self, path_and_query: &str) -> Result<Response<Incoming>, String> {
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

// ------------------------------------------------------------------------------------
// Objects: only the fields used here.

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Meta {
    pub name: String,
    pub resource_version: Option<String>,
    pub deletion_timestamp: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ContainerStatus {
    pub ready: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Status {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    pub conditions: Option<Vec<Condition>>,
    pub container_statuses: Option<Vec<ContainerStatus>>,
}

/// A pod or a Service.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Object {
    pub metadata: Meta,
    pub status: Option<Status>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct ListMeta {
    resource_version: Option<String>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct List {
    metadata: ListMeta,
    items: Vec<Object>,
}

/// A `metav1.Status` (the object of an `ERROR` event, or an error response's body).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ApiStatus {
    code: u16,
    reason: String,
    message: String,
}

#[derive(Deserialize)]
struct WatchEvent<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    object: &'a RawValue,
}

/// Whether a pod serves: `Running`, ready, with an IP, not being deleted.
pub fn pod_ready(obj: &Object) -> bool {
    let Some(st) = &obj.status else { return false };
    if obj.metadata.deletion_timestamp.is_some()
        || st.phase.as_deref() != Some("Running")
        || st.pod_ip.as_deref().is_none_or(str::is_empty)
    {
        return false;
    }
    match st
        .conditions
        .as_deref()
        .and_then(|c| c.iter().find(|c| c.kind == "Ready"))
    {
        Some(c) => c.status == "True",
        None => st
            .container_statuses
            .as_deref()
            .is_some_and(|c| !c.is_empty() && c.iter().all(|s| s.ready)),
    }
}

/// The engine URL `obj` stands for now, or None when it is not an engine.
pub fn engine_url(obj: &Object, k: &K8sSettings) -> Option<String> {
    if obj.metadata.name.is_empty() || obj.metadata.deletion_timestamp.is_some() {
        return None;
    }
    match k.kind {
        K8sDiscoveryType::ServiceName => Some(format!(
            "http://{}.{}.svc:{}",
            obj.metadata.name, k.namespace, k.port
        )),
        K8sDiscoveryType::PodIp => {
            if !pod_ready(obj) {
                return None;
            }
            let ip = obj.status.as_ref()?.pod_ip.as_deref()?;
            Some(if ip.contains(':') {
                format!("http://[{ip}]:{}", k.port)
            } else {
                format!("http://{ip}:{}", k.port)
            })
        }
    }
}

// ------------------------------------------------------------------------------------
// The watcher

/// The running watcher, if any, so a config reload can stop or replace it.
#[derive(Default)]
pub struct Control {
    task: Mutex<Option<tokio::task::AbortHandle>>,
    api: Mutex<Option<Arc<ApiClient>>>,
}

/// Start (or restart) watching with `k`; the receiver fires after the first LIST has
/// been applied and the engines it found were asked for their models.
pub fn start(state: &Arc<RouterState>, k: K8sSettings) -> Result<oneshot::Receiver<()>, String> {
    let api = {
        let mut slot = state.k8s.api.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(ApiClient::from_args(&state.args)?);
                *slot = Some(a.clone());
                a
            }
        }
    };
    stop(state);
    let (tx, rx) = oneshot::channel();
    tracing::info!(namespace = %k.namespace, selector = %k.label_selector, kind = ?k.kind, port = k.port, "Kubernetes discovery: watching");
    let task = tokio::spawn(run(state.clone(), k, api, tx));
    *state.k8s.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
    Ok(rx)
}

/// Stop the watcher (the engine set stays as it is until something else replaces it).
pub fn stop(state: &RouterState) {
    if let Some(t) = state
        .k8s
        .task
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        t.abort();
    }
}

/// Exponential backoff between failed attempts.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

enum WatchEnd {
    /// The server ended the watch (its timeout): resume from the last version.
    Closed,
    /// 410 Gone: the version is too old; list again.
    Gone,
    Failed(String),
}

/// The engine set as the watcher sees it (pod or Service name → URL).
struct Set<'a> {
    state: &'a Arc<RouterState>,
    engines: BTreeMap<String, String>,
}

impl Set<'_> {
    /// Publish the set to the registry; returns the endpoints that joined.
    fn publish(&self, before: &HashSet<String>) -> Vec<Arc<Endpoint>> {
        let mut seen = HashSet::new();
        let specs: Vec<BackendSpec> = self
            .engines
            .values()
            .filter(|u| seen.insert(u.as_str()))
            .map(|u| BackendSpec {
                url: u.clone(),
                model: None,
                kv_events: None,
            })
            .collect();
        self.state.registry.apply(&specs);
        self.state.metrics.sync(&self.state.registry);
        tracing::info!(
            engines = specs.len(),
            "Kubernetes discovery: engine set updated"
        );
        let snap = self.state.registry.snapshot();
        snap.endpoints
            .iter()
            .filter(|e| !before.contains(&e.url))
            .cloned()
            .collect()
    }

    fn urls(&self) -> HashSet<String> {
        self.engines.values().cloned().collect()
    }

    /// Apply one object's news; true when the set changed.
    fn upsert(&mut self, obj: &Object, k: &K8sSettings) -> bool {
        match engine_url(obj, k) {
            Some(url) => self.engines.insert(obj.metadata.name.clone(), url.clone()) != Some(url),
            None => self.engines.remove(&obj.metadata.name).is_some(),
        }
    }
}

/// Ask a joining engine for its models, retrying (0.25 s doubling, about a minute in
/// all) while it does not answer and is still in the set.
async fn learn_models(state: Arc<RouterState>, ep: Arc<Endpoint>, first_done: bool) {
    let mut delay = Duration::from_millis(250);
    if first_done {
        tokio::time::sleep(delay).await;
    }
    for _ in 0..8 {
        let present = state
            .registry
            .snapshot()
            .endpoints
            .iter()
            .any(|e| Arc::ptr_eq(e, &ep));
        if !present {
            return;
        }
        if crate::discovery::discover_models(&state, &ep).await {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(16));
    }
    tracing::warn!(engine = %ep.url, "Kubernetes discovery: the engine never listed its models");
}

async fn run(
    state: Arc<RouterState>,
    k: K8sSettings,
    api: Arc<ApiClient>,
    synced: oneshot::Sender<()>,
) {
    let resource = match k.kind {
        K8sDiscoveryType::PodIp => "pods",
        K8sDiscoveryType::ServiceName => "services",
    };
    let path = format!("/api/v1/namespaces/{}/{resource}", encode(&k.namespace));
    let selector = if k.label_selector.is_empty() {
        String::new()
    } else {
        format!("&labelSelector={}", encode(&k.label_selector))
    };
    let mut set = Set {
        state: &state,
        engines: BTreeMap::new(),
    };
    let mut synced = Some(synced);
    let mut version: Option<String> = None;
    let mut backoff = Backoff(BACKOFF_MIN);
    loop {
        let Some(from) = version.clone() else {
            match list(&api, &path, &selector).await {
                Ok((objects, rv)) => {
                    let before = set.urls();
                    let mut engines = BTreeMap::new();
                    for o in &objects {
                        if let Some(u) = engine_url(o, &k) {
                            engines.insert(o.metadata.name.clone(), u);
                        }
                    }
                    tracing::info!(objects = objects.len(), engines = engines.len(), resource_version = %rv, "Kubernetes discovery: listed");
                    let changed = engines != set.engines || synced.is_some();
                    set.engines = engines;
                    if changed {
                        let joined = set.publish(&before);
                        if let Some(tx) = synced.take() {
                            // Before the router says it is ready: the first engines' models.
                            let st = &state;
                            let ok = futures_util::future::join_all(
                                joined
                                    .iter()
                                    .map(|e| crate::discovery::discover_models(st, e)),
                            )
                            .await;
                            for (e, ok) in joined.into_iter().zip(ok) {
                                if !ok {
                                    tokio::spawn(learn_models(state.clone(), e, true));
                                }
                            }
                            let _ = tx.send(());
                        } else {
                            for e in joined {
                                tokio::spawn(learn_models(state.clone(), e, false));
                            }
                        }
                    }
                    version = Some(rv);
                }
                Err(e) => {
                    let wait = backoff.next();
                    tracing::warn!(error = %e, retry_in = ?wait, "Kubernetes discovery: LIST failed");
                    tokio::time::sleep(wait).await;
                }
            }
            continue;
        };
        let started = Instant::now();
        let mut progressed = false;
        let end = watch(
            &api,
            &path,
            &selector,
            &k,
            &from,
            &mut set,
            &mut version,
            &mut progressed,
        )
        .await;
        let quick = !progressed && started.elapsed() < Duration::from_secs(1);
        match end {
            WatchEnd::Closed if !quick => backoff.reset(),
            WatchEnd::Closed => {
                let wait = backoff.next();
                tracing::debug!(retry_in = ?wait, "Kubernetes discovery: the watch ended at once");
                tokio::time::sleep(wait).await;
            }
            WatchEnd::Gone => {
                tracing::info!(resource_version = %from, "Kubernetes discovery: 410 Gone, listing again");
                version = None;
                if quick {
                    tokio::time::sleep(backoff.next()).await;
                } else {
                    backoff.reset();
                }
            }
            WatchEnd::Failed(e) => {
                if !quick {
                    backoff.reset();
                }
                let wait = backoff.next();
                tracing::warn!(error = %e, retry_in = ?wait, "Kubernetes discovery: watch failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Read an error response's Status message (bounded).
async fn error_text(resp: Response<Incoming>) -> String {
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

/// LIST every page; the objects and the list's resourceVersion.
async fn list(
    api: &ApiClient,
    path: &str,
    selector: &str,
) -> Result<(Vec<Object>, String), String> {
    let mut objects = Vec::new();
    let mut cont: Option<String> = None;
    loop {
        let mut q = format!("{path}?limit={PAGE_LIMIT}{selector}");
        if let Some(c) = &cont {
            q.push_str("&continue=");
            q.push_str(&encode(c));
        }
        let resp = api.get(&q).await?;
        if resp.status() != StatusCode::OK {
            return Err(error_text(resp).await);
        }
        let body = tokio::time::timeout(
            LIST_TIMEOUT,
            Limited::new(resp.into_body(), MAX_PAGE).collect(),
        )
        .await
        .map_err(|_| "LIST body timed out".to_string())?
        .map_err(|e| format!("LIST body: {e}"))?
        .to_bytes();
        let page: List = serde_json::from_slice(&body).map_err(|e| format!("LIST body: {e}"))?;
        objects.extend(page.items);
        match page.metadata.continue_token.filter(|c| !c.is_empty()) {
            Some(c) => cont = Some(c),
            None => {
                let rv = page
                    .metadata
                    .resource_version
                    .filter(|v| !v.is_empty())
                    .ok_or("the LIST has no resourceVersion")?;
                return Ok((objects, rv));
            }
        }
    }
}

/// Follow one WATCH from `from`, applying events to `set` and moving `version` on.
#[allow(clippy::too_many_arguments)]
async fn watch(
    api: &ApiClient,
    path: &str,
    selector: &str,
    k: &K8sSettings,
    from: &str,
    set: &mut Set<'_>,
    version: &mut Option<String>,
    progressed: &mut bool,
) -> WatchEnd {
    let mut q = format!(
        "{path}?watch=1&allowWatchBookmarks=true&resourceVersion={}{selector}",
        encode(from)
    );
    if k.watcher_timeout_seconds > 0 {
        q.push_str(&format!("&timeoutSeconds={}", k.watcher_timeout_seconds));
    }
    // A silent connection is given up on after this (the server sends bookmarks about
    // every minute; resuming from the last version loses nothing).
    let idle = Duration::from_secs(if k.watcher_timeout_seconds > 0 {
        (k.watcher_timeout_seconds + 30).min(300)
    } else {
        300
    });
    let resp = match api.get(&q).await {
        Ok(r) => r,
        Err(e) => return WatchEnd::Failed(e),
    };
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::GONE => return WatchEnd::Gone,
        _ => return WatchEnd::Failed(error_text(resp).await),
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return WatchEnd::Failed(format!("no data for {idle:?}")),
            Ok(None) => return WatchEnd::Closed,
            Ok(Some(Err(e))) => return WatchEnd::Failed(format!("watch stream: {e}")),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(i) = memchr::memchr(b'\n', &buf) {
            let line = buf.split_to(i + 1);
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            match event(line, k, set, version) {
                Ok(()) => *progressed = true,
                Err(end) => return end,
            }
        }
        if buf.len() > MAX_LINE {
            return WatchEnd::Failed(format!("a watch event over {MAX_LINE} bytes"));
        }
    }
}

/// Apply one watch event line. `Err` ends the watch.
fn event(
    line: &[u8],
    k: &K8sSettings,
    set: &mut Set<'_>,
    version: &mut Option<String>,
) -> Result<(), WatchEnd> {
    let ev: WatchEvent<'_> = serde_json::from_slice(line)
        .map_err(|e| WatchEnd::Failed(format!("bad watch event: {e}")))?;
    if ev.kind == "ERROR" {
        let s: ApiStatus = serde_json::from_str(ev.object.get()).unwrap_or_default();
        return Err(if s.code == 410 {
            WatchEnd::Gone
        } else {
            WatchEnd::Failed(format!(
                "ERROR event {} {}: {}",
                s.code, s.reason, s.message
            ))
        });
    }
    let obj: Object = serde_json::from_str(ev.object.get())
        .map_err(|e| WatchEnd::Failed(format!("bad {} object: {e}", ev.kind)))?;
    if let Some(rv) = obj
        .metadata
        .resource_version
        .as_ref()
        .filter(|v| !v.is_empty())
    {
        *version = Some(rv.clone());
    }
    let before = set.urls();
    let changed = match ev.kind {
        "ADDED" | "MODIFIED" => set.upsert(&obj, k),
        "DELETED" => set.engines.remove(&obj.metadata.name).is_some(),
        "BOOKMARK" => false,
        other => {
            tracing::debug!(
                kind = other,
                "Kubernetes discovery: unknown event type ignored"
            );
            false
        }
    };
    if changed {
        for e in set.publish(&before) {
            tokio::spawn(learn_models(set.state.clone(), e, false));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(kind: K8sDiscoveryType) -> K8sSettings {
        K8sSettings {
            namespace: "ns".into(),
            label_selector: "app=vllm".into(),
            port: 8000,
            kind,
            watcher_timeout_seconds: 0,
        }
    }

    fn pod(json: serde_json::Value) -> Object {
        serde_json::from_value(json).expect("pod")
    }

    #[test]
    fn a_pod_is_an_engine_only_when_running_ready_addressed_and_not_deleted() {
        let k = settings(K8sDiscoveryType::PodIp);
        let ready = serde_json::json!({
            "metadata": {"name": "p", "resourceVersion": "7", "labels": {"model": "x"}},
            "spec": {"containers": [{"name": "vllm"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "vllm", "ready": true}]}
        });
        assert_eq!(
            engine_url(&pod(ready.clone()), &k).as_deref(),
            Some("http://10.0.0.5:8000")
        );
        let mut unready = ready.clone();
        unready["status"]["conditions"][1]["status"] = "False".into();
        assert_eq!(engine_url(&pod(unready), &k), None);
        let mut terminating = ready.clone();
        terminating["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z".into();
        assert_eq!(engine_url(&pod(terminating), &k), None);
        let mut pending = ready.clone();
        pending["status"]["phase"] = "Pending".into();
        assert_eq!(engine_url(&pod(pending), &k), None);
        let mut no_ip = ready.clone();
        no_ip["status"]
            .as_object_mut()
            .expect("status")
            .remove("podIP");
        assert_eq!(engine_url(&pod(no_ip), &k), None);
        // Without conditions, every container must be ready.
        let mut by_containers = ready.clone();
        by_containers["status"]
            .as_object_mut()
            .expect("status")
            .remove("conditions");
        assert!(engine_url(&pod(by_containers.clone()), &k).is_some());
        by_containers["status"]["containerStatuses"] =
            serde_json::json!([{"ready": true}, {"ready": false}]);
        assert_eq!(engine_url(&pod(by_containers.clone()), &k), None);
        by_containers["status"]["containerStatuses"] = serde_json::json!([]);
        assert_eq!(engine_url(&pod(by_containers), &k), None);
        let mut v6 = ready;
        v6["status"]["podIP"] = "fd00::5".into();
        assert_eq!(
            engine_url(&pod(v6), &k).as_deref(),
            Some("http://[fd00::5]:8000")
        );
    }

    #[test]
    fn a_service_is_an_engine_by_its_dns_name() {
        let k = settings(K8sDiscoveryType::ServiceName);
        let svc = pod(serde_json::json!({
            "metadata": {"name": "llama-engine", "resourceVersion": "3"},
            "spec": {"ports": [{"port": 80}]}, "status": {"loadBalancer": {}}
        }));
        assert_eq!(
            engine_url(&svc, &k).as_deref(),
            Some("http://llama-engine.ns.svc:8000")
        );
        let gone = pod(serde_json::json!({
            "metadata": {"name": "x", "deletionTimestamp": "2025-01-01T00:00:00Z"}
        }));
        assert_eq!(engine_url(&gone, &k), None);
    }

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

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff(BACKOFF_MIN);
        let seq: Vec<Duration> = (0..9).map(|_| b.next()).collect();
        assert_eq!(seq[0], BACKOFF_MIN);
        assert_eq!(seq[1], BACKOFF_MIN * 2);
        assert_eq!(*seq.last().expect("last"), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next(), BACKOFF_MIN);
    }

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/k8s-tls");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).expect("fixture")
    }

    fn acceptor() -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&fixture("server.pem"))
                .collect::<Result<_, _>>()
                .expect("cert");
        let key = PrivateKeyDer::from_pem_slice(&fixture("server.key")).expect("key");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }

    /// Accept one TLS connection, read the request head, answer `status` with `body`;
    /// returns the head (lower-cased).
    async fn serve_one(listener: &tokio::net::TcpListener, status: &str, body: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tcp, _) = listener.accept().await.expect("accept");
        let Ok(mut s) = acceptor().accept(tcp).await else {
            return String::new();
        };
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b).await.expect("read");
            if n == 0 {
                break;
            }
            head.extend_from_slice(&b[..n]);
        }
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.expect("write");
        let _ = s.shutdown().await;
        String::from_utf8_lossy(&head).to_lowercase()
    }

    #[tokio::test]
    async fn lists_over_tls_with_the_cluster_ca_and_a_rotating_token() {
        let dir = std::env::temp_dir().join(format!("sy-k8s-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let token = dir.join("token");
        std::fs::write(&token, "tok-1\n").expect("token");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let api = ApiClient::new(
            &format!("https://localhost:{port}"),
            Some(token.clone()),
            Some(&fixture("ca.pem")),
        )
        .expect("client");
        let list_body = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"42"},"items":[{"metadata":{"name":"p1","resourceVersion":"40"},"status":{"phase":"Running","podIP":"10.1.2.3","conditions":[{"type":"Ready","status":"True"}]}}]}"#;
        let server = async {
            let first = serve_one(
                &listener,
                "401 Unauthorized",
                r#"{"kind":"Status","code":401,"message":"Unauthorized"}"#,
            )
            .await;
            let second = serve_one(&listener, "200 OK", list_body).await;
            (first, second)
        };
        let client = async {
            let denied = list(&api, "/api/v1/namespaces/ns/pods", "&labelSelector=app%3Dx").await;
            // The token rotated: after the 401 it is read again at once.
            std::fs::write(&token, "tok-2\n").expect("token");
            let listed = list(&api, "/api/v1/namespaces/ns/pods", "&labelSelector=app%3Dx").await;
            (denied, listed)
        };
        let ((first, second), (denied, listed)) = tokio::join!(server, client);
        assert!(denied.is_err_and(|e| e.contains("Unauthorized")));
        assert!(first.contains("authorization: bearer tok-1"), "{first}");
        assert!(
            second.starts_with(
                "get /api/v1/namespaces/ns/pods?limit=500&labelselector=app%3dx http/1.1"
            ),
            "{second}"
        );
        assert!(second.contains("authorization: bearer tok-2"), "{second}");
        assert!(
            second.contains(&format!("host: localhost:{port}")),
            "{second}"
        );
        let (objects, rv) = listed.expect("listed over TLS");
        assert_eq!(rv, "42");
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].metadata.name, "p1");

        // A certificate that does not name the host is refused.
        let other = tokio::net::TcpListener::bind("127.0.0.2:0")
            .await
            .expect("bind");
        let port2 = other.local_addr().expect("addr").port();
        let wrong = ApiClient::new(
            &format!("https://127.0.0.2:{port2}"),
            None,
            Some(&fixture("ca.pem")),
        )
        .expect("client");
        let (_, refused) = tokio::join!(
            serve_one(&other, "200 OK", list_body),
            list(&wrong, "/api/v1/namespaces/ns/pods", "")
        );
        assert!(
            refused.is_err_and(|e| e.contains("TLS")),
            "the name is checked"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn watch_events_parse_with_their_status() {
        let bookmark = br#"{"type":"BOOKMARK","object":{"kind":"Pod","apiVersion":"v1","metadata":{"resourceVersion":"12345","creationTimestamp":null},"spec":{"containers":null},"status":{}}}"#;
        let ev: WatchEvent<'_> = serde_json::from_slice(bookmark).expect("bookmark");
        assert_eq!(ev.kind, "BOOKMARK");
        let obj: Object = serde_json::from_str(ev.object.get()).expect("object");
        assert_eq!(obj.metadata.resource_version.as_deref(), Some("12345"));
        let gone = br#"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 1 (2)","reason":"Expired","code":410}}"#;
        let ev: WatchEvent<'_> = serde_json::from_slice(gone).expect("error");
        let s: ApiStatus = serde_json::from_str(ev.object.get()).expect("status");
        assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
    }
}
