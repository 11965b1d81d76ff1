//! Room: Kubernetes service discovery (`--service-discovery k8s`): the engine set follows
//! the pods (or Services) that match `--k8s-label-selector` in `--k8s-namespace`.
//!
//! - [`client`]: the API client (a small HTTP/1.1 client over rustls, the `ring`
//!   provider; one connection per LIST or WATCH) and how it finds the server and
//!   credentials: in a pod, the service account; `--k8s-api-server`, `--k8s-token-file`,
//!   `--k8s-ca-file`; out of a cluster, a context of [`kubeconfig`].
//! - [`objects`]: the JSON shapes read (only the fields used) and which objects are
//!   engines: `pod-ip`: a pod while it is `Running`, ready, addressed and not being
//!   deleted (it leaves the set on the first event that says otherwise); `service-name`:
//!   every Service not being deleted, at `http://NAME.NAMESPACE.svc:PORT` (whether pods
//!   stand behind it is left to the health checks).
//! - [`reflector`]: LIST + WATCH in client-go's manner, handing each new set whole to
//!   [`EngineSet::apply_engines`].
//!
//! Either way an engine's models come from its `/v1/models`, as the Production Stack
//! router does (the pods' `model` label names the model spec, which need not be the
//! served name), asked when it joins and again for a while if it does not answer. This
//! file owns the [`Watcher`]: starting, restarting and stopping the reflector.

pub mod client;
pub mod kubeconfig;
pub mod objects;
pub mod reflector;

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::EngineSet;
use crate::config::{K8sSettings, RouterArgs};
use client::ApiClient;

/// The reflector while one runs, so a config reload can stop or replace it.
pub struct Watcher {
    engines: Arc<EngineSet>,
    /// The flags the API client is built from (on the first start).
    args: RouterArgs,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    api: Mutex<Option<Arc<ApiClient>>>,
}

impl Watcher {
    /// A watcher publishing to `engines`; nothing runs until [`Watcher::start`].
    pub fn new(engines: Arc<EngineSet>, args: RouterArgs) -> Self {
        Watcher {
            engines,
            args,
            task: Mutex::new(None),
            api: Mutex::new(None),
        }
    }

    /// Start (or restart) watching with `k`; the receiver fires after the first LIST has
    /// been applied and the engines it found were asked for their models.
    pub fn start(&self, k: K8sSettings) -> Result<oneshot::Receiver<()>, String> {
        let api = {
            let mut slot = self.api.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(a) => a.clone(),
                None => {
                    let a = Arc::new(ApiClient::from_args(&self.args)?);
                    *slot = Some(a.clone());
                    a
                }
            }
        };
        self.stop();
        let (tx, rx) = oneshot::channel();
        tracing::info!(namespace = %k.namespace, selector = %k.label_selector, kind = ?k.kind, port = k.port, "Kubernetes discovery: watching");
        let task = tokio::spawn(reflector::run(self.engines.clone(), k, api, tx));
        *self.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        Ok(rx)
    }

    /// Stop the watcher (the engine set stays as it is until something else replaces it).
    pub fn stop(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }
}
