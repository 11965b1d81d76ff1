//! Out-of-cluster access for Kubernetes discovery: the API server and credentials of one
//! kubeconfig context, read the way `kubectl` reads them.
//!
//! Owns parsing only: which file (`--k8s-kubeconfig`, else the first path of
//! `$KUBECONFIG`, else `~/.kube/config`), which context (`--k8s-context`, else
//! `current-context`), and from it the server URL, the CA (`certificate-authority` file
//! or `-data`), and the user's credentials: a bearer token (`token` or `tokenFile`) or a
//! client certificate and key (files or `-data`). Relative paths are taken from the
//! kubeconfig's directory, as kubectl does. Exec plugins, auth providers, basic auth and
//! `insecure-skip-tls-verify` are refused with a message naming them, never ignored.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// What a context gives for reaching the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub server: String,
    /// PEM of the CA that signed the server's certificate (https).
    pub ca_pem: Option<Vec<u8>>,
    pub token: Option<TokenSource>,
    /// PEM client certificate chain and private key.
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
}

/// Where a bearer token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Read again from time to time (it may rotate).
    File(PathBuf),
    Inline(String),
}

#[derive(Deserialize)]
struct Config {
    #[serde(default, rename = "current-context")]
    current_context: String,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    users: Vec<NamedUser>,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Deserialize)]
struct Context {
    cluster: String,
    #[serde(default)]
    user: String,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: String,
    certificate_authority: Option<String>,
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    client_certificate: Option<String>,
    client_certificate_data: Option<String>,
    client_key: Option<String>,
    client_key_data: Option<String>,
    exec: Option<serde_yaml::Value>,
    auth_provider: Option<serde_yaml::Value>,
    username: Option<String>,
}

/// `--k8s-kubeconfig`, else the first entry of `$KUBECONFIG`, else `~/.kube/config`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(first) = std::env::var_os("KUBECONFIG")
        .as_deref()
        .and_then(|v| std::env::split_paths(v).find(|p| !p.as_os_str().is_empty()))
    {
        return Some(first);
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".kube").join("config"))
}

/// Read `path` and resolve `context` (or the current context).
pub fn load(path: &Path, context: Option<&str>) -> Result<Access, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
    parse(&text, path.parent().unwrap_or(Path::new(".")), context)
        .map_err(|e| format!("kubeconfig {}: {e}", path.display()))
}

/// Resolve `context` in kubeconfig `text`; relative paths are taken from `dir`.
pub fn parse(text: &str, dir: &Path, context: Option<&str>) -> Result<Access, String> {
    let cfg: Config = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let name = context
        .filter(|c| !c.is_empty())
        .unwrap_or(&cfg.current_context);
    if name.is_empty() {
        return Err("no current-context (give --k8s-context)".into());
    }
    let ctx = &cfg
        .contexts
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| format!("no context named {name:?}"))?
        .context;
    let cluster = &cfg
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .ok_or_else(|| format!("context {name:?}: no cluster named {:?}", ctx.cluster))?
        .cluster;
    if cluster.insecure_skip_tls_verify {
        return Err(format!(
            "cluster {:?}: insecure-skip-tls-verify is not supported (give its CA)",
            ctx.cluster
        ));
    }
    let default_user = User::default();
    let user = if ctx.user.is_empty() {
        &default_user
    } else {
        &cfg.users
            .iter()
            .find(|u| u.name == ctx.user)
            .ok_or_else(|| format!("context {name:?}: no user named {:?}", ctx.user))?
            .user
    };
    let who = format!("user {:?}", ctx.user);
    if user.exec.is_some() || user.auth_provider.is_some() {
        return Err(format!(
            "{who}: exec plugins and auth providers are not supported; use a token or a client certificate"
        ));
    }
    if user.username.is_some() {
        return Err(format!("{who}: basic auth is not supported"));
    }
    let ca_pem = read_either(
        dir,
        cluster.certificate_authority.as_deref(),
        cluster.certificate_authority_data.as_deref(),
        "certificate-authority",
    )?;
    let token = match (&user.token, &user.token_file) {
        (Some(t), _) => Some(TokenSource::Inline(t.trim().to_string())),
        (None, Some(f)) => Some(TokenSource::File(resolve(dir, f))),
        (None, None) => None,
    };
    let cert = read_either(
        dir,
        user.client_certificate.as_deref(),
        user.client_certificate_data.as_deref(),
        "client-certificate",
    )?;
    let key = read_either(
        dir,
        user.client_key.as_deref(),
        user.client_key_data.as_deref(),
        "client-key",
    )?;
    let client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(format!(
                "{who}: a client certificate needs both its certificate and key"
            ))
        }
    };
    Ok(Access {
        server: cluster.server.trim().to_string(),
        ca_pem,
        token,
        client_cert,
    })
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// The bytes of a `FIELD` (a file path) or `FIELD-data` (base64) entry.
fn read_either(
    dir: &Path,
    file: Option<&str>,
    data: Option<&str>,
    field: &str,
) -> Result<Option<Vec<u8>>, String> {
    if let Some(d) = data {
        let clean: String = d.split_whitespace().collect();
        return base64::engine::general_purpose::STANDARD
            .decode(clean)
            .map(Some)
            .map_err(|e| format!("{field}-data: not base64 ({e})"));
    }
    match file {
        Some(f) => {
            let path = resolve(dir, f);
            std::fs::read(&path)
                .map(Some)
                .map_err(|e| format!("{field} {}: {e}", path.display()))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
apiVersion: v1
kind: Config
current-context: dev
clusters:
- name: dev-cluster
  cluster:
    server: https://dev.example:6443
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==
- name: lab
  cluster:
    server: http://127.0.0.1:8001
contexts:
- name: dev
  context:
    cluster: dev-cluster
    user: alice
    namespace: serving
- name: lab
  context:
    cluster: lab
    user: bob
- name: exec
  context:
    cluster: lab
    user: cloud
- name: half
  context:
    cluster: lab
    user: half
users:
- name: alice
  user:
    token: " abc.def "
- name: bob
  user:
    tokenFile: tokens/bob
    client-certificate-data: Y2VydA==
    client-key-data: a2V5
- name: cloud
  user:
    exec:
      command: gke-gcloud-auth-plugin
- name: half
  user:
    client-certificate-data: Y2VydA==
"#;

    #[test]
    fn resolves_the_current_or_named_context() {
        let dir = Path::new("/home/u/.kube");
        let a = parse(CFG, dir, None).expect("current context");
        assert_eq!(a.server, "https://dev.example:6443");
        assert_eq!(
            a.ca_pem.as_deref(),
            Some(&b"-----BEGIN CERTIFICATE-----\n"[..])
        );
        assert_eq!(a.token, Some(TokenSource::Inline("abc.def".into())));
        assert_eq!(a.client_cert, None);

        let b = parse(CFG, dir, Some("lab")).expect("named context");
        assert_eq!(b.server, "http://127.0.0.1:8001");
        assert_eq!(b.ca_pem, None);
        assert_eq!(
            b.token,
            Some(TokenSource::File(PathBuf::from("/home/u/.kube/tokens/bob"))),
            "relative to the kubeconfig's directory"
        );
        assert_eq!(b.client_cert, Some((b"cert".to_vec(), b"key".to_vec())));
    }

    #[test]
    fn unsupported_or_broken_entries_are_named() {
        let dir = Path::new("/k");
        let e = parse(CFG, dir, Some("exec")).unwrap_err();
        assert!(e.contains("exec plugins"), "{e}");
        let e = parse(CFG, dir, Some("half")).unwrap_err();
        assert!(e.contains("both its certificate and key"), "{e}");
        let e = parse(CFG, dir, Some("nope")).unwrap_err();
        assert!(e.contains("no context named \"nope\""), "{e}");
        let e = parse("current-context: ''\n", dir, None).unwrap_err();
        assert!(e.contains("no current-context"), "{e}");
        let e = parse("clusters: 5\n", dir, None).unwrap_err();
        assert!(!e.is_empty());
        let bad = CFG.replace("LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==", "abc$def");
        let e = parse(&bad, dir, None).unwrap_err();
        assert!(e.contains("certificate-authority-data: not base64"), "{e}");
        let skip = CFG.replace(
            "server: http://127.0.0.1:8001",
            "server: http://127.0.0.1:8001\n    insecure-skip-tls-verify: true",
        );
        let e = parse(&skip, dir, Some("lab")).unwrap_err();
        assert!(e.contains("insecure-skip-tls-verify"), "{e}");
    }
}
