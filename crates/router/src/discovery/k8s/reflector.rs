//! The reflector, in the manner of client-go's: LIST (paginated) gives the objects and a
//! `resourceVersion`; WATCH from it with `allowWatchBookmarks=true` and `timeoutSeconds`
//! streams `ADDED`/`MODIFIED`/`DELETED` events, and `BOOKMARK`s that only move the
//! resourceVersion on. A watch that ends (its timeout, a dropped connection) is resumed
//! from the last resourceVersion seen; `410 Gone` (an HTTP 410 when the watch opens, or an
//! `ERROR` event whose Status has code 410: the version left the server's history) means
//! events may have been missed, so the reflector lists again and replaces the set with
//! what the list says. Either way the new set is handed whole to
//! [`EngineSet::apply_engines`], which keeps the `Endpoint` (its health, load and
//! statistics) of every engine that stays and asks the engines that join for their
//! models. Failures back off from 0.5 s to 30 s; a watch that ends at once without news
//! counts as a failure, so nothing spins.
//!
//! Memory: one name → URL map of the current engines; a watch line is capped at
//! [`MAX_LINE`] and a LIST page at [`MAX_PAGE`].

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http_body_util::{BodyExt, Limited};
use hyper::StatusCode;
use tokio::sync::oneshot;

use super::client::{encode, error_text, ApiClient, LIST_TIMEOUT};
use super::objects::{engine_url, ApiStatus, List, Object, WatchEvent};
use crate::config::{BackendSpec, K8sDiscoveryType, K8sSettings};
use crate::discovery::{EngineSet, Joined};

/// Longest watch event line accepted (a pod's JSON is a few KiB).
pub const MAX_LINE: usize = 4 << 20;
/// Largest LIST page accepted (pages are asked for [`PAGE_LIMIT`] objects).
pub const MAX_PAGE: usize = 64 << 20;
const PAGE_LIMIT: usize = 500;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

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

/// An engine as the watcher sees it: its URL and its `model` label.
type Seen = (String, Option<String>);

/// The engine set as the watcher sees it (pod or Service name → URL and label).
struct Set<'a> {
    target: &'a Arc<EngineSet>,
    engines: BTreeMap<String, Seen>,
}

impl Set<'_> {
    /// Publish the set ([`EngineSet::apply_engines`]); the engines that joined have their
    /// models asked for.
    fn publish(&self) -> Joined {
        let mut seen = HashSet::new();
        let specs: Vec<BackendSpec> = self
            .engines
            .values()
            .filter(|(u, _)| seen.insert(u.as_str()))
            .map(|(u, label)| BackendSpec {
                url: u.clone(),
                model: None,
                kv_events: None,
                label: label.clone(),
            })
            .collect();
        let joined = self.target.apply_engines(&specs);
        tracing::info!(
            engines = specs.len(),
            "Kubernetes discovery: engine set updated"
        );
        joined
    }

    /// Apply one object's news; true when the set changed.
    fn upsert(&mut self, obj: &Object, k: &K8sSettings) -> bool {
        match seen(obj, k) {
            Some(e) => self.engines.insert(obj.metadata.name.clone(), e.clone()) != Some(e),
            None => self.engines.remove(&obj.metadata.name).is_some(),
        }
    }
}

/// `obj` as an engine, when it is one.
fn seen(obj: &Object, k: &K8sSettings) -> Option<Seen> {
    engine_url(obj, k).map(|u| (u, obj.metadata.labels.model.clone()))
}

/// List and watch with `k` until aborted, publishing every change of the set; `synced`
/// fires after the first LIST was published and its engines were asked for their models.
pub async fn run(
    target: Arc<EngineSet>,
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
        target: &target,
        engines: BTreeMap::new(),
    };
    let mut synced = Some(synced);
    let mut version: Option<String> = None;
    let mut backoff = Backoff(BACKOFF_MIN);
    loop {
        let Some(from) = version.clone() else {
            match list(&api, &path, &selector).await {
                Ok((objects, rv)) => {
                    let mut engines = BTreeMap::new();
                    for o in &objects {
                        if let Some(u) = seen(o, &k) {
                            engines.insert(o.metadata.name.clone(), u);
                        }
                    }
                    tracing::info!(objects = objects.len(), engines = engines.len(), resource_version = %rv, "Kubernetes discovery: listed");
                    let changed = engines != set.engines || synced.is_some();
                    set.engines = engines;
                    if changed {
                        let joined = set.publish();
                        if let Some(tx) = synced.take() {
                            // Before the router says it is ready: the first engines' models.
                            joined.models_asked().await;
                            let _ = tx.send(());
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

/// LIST every page; the objects and the list's resourceVersion.
pub async fn list(
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
        set.publish();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
