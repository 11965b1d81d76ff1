//! The dynamic-config watcher (`--dynamic-config-json`/`-yaml`): every
//! `--dynamic-config-interval` the file is read, and when it changed and parses (merged
//! with the flags, which win) into settings that differ from the current ones, they are
//! applied. Static discovery: the file's backends become the engine set (a file listing
//! none is refused, keeping the current ones). A change of discovery (kind, namespace,
//! selector, port...) restarts it: a new watch lists and replaces the set (engines that
//! stay keep their state); back to static, the file's backends replace it. The routing
//! settings (aliases, known models, routing logic, session key) go to the router through
//! [`Reconfigure`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{k8s, EngineSet};
use crate::config::{self, Discovery, Dynamic, RouterArgs};

/// What a reload changes besides the engine set: the routing settings, which the router
/// owns.
pub trait Reconfigure: Send + Sync + 'static {
    /// Apply `config`'s aliases, known models, routing logic and session key.
    fn reconfigure(&self, config: Dynamic);
}

/// What the watcher works with.
pub struct Reload {
    pub engines: Arc<EngineSet>,
    pub k8s: Arc<k8s::Watcher>,
    /// The flags, merged with each version of the file.
    pub args: RouterArgs,
    pub path: PathBuf,
    pub interval: Duration,
    /// The settings applied now.
    pub current: Dynamic,
    pub routing: Arc<dyn Reconfigure>,
}

/// Watch the file forever.
pub async fn run(mut r: Reload) {
    let path = r.path.clone();
    let mut last = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(r.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = std::fs::read(&path).ok();
        if now == last {
            continue;
        }
        last = now;
        let parsed = config::read_file(&path).and_then(|f| config::dynamic_from(&r.args, &f));
        match parsed {
            Ok(d) if d.discovery == Discovery::Static && d.backends.is_empty() => {
                tracing::warn!(path = %path.display(), "dynamic config lists no backends; keeping the current ones")
            }
            Ok(d) if d == r.current => {}
            Ok(d) => {
                if d.discovery != r.current.discovery {
                    match &d.discovery {
                        Discovery::K8s(k) => {
                            if let Err(e) = r.k8s.start(k.clone()) {
                                tracing::warn!(error = %e, "dynamic config not applied");
                                continue;
                            }
                        }
                        Discovery::Static => r.k8s.stop(),
                    }
                }
                tracing::info!(path = %path.display(), engines = d.backends.len(), "dynamic config reloaded");
                // Under Kubernetes discovery the engine set is the watch's.
                let joined = (d.discovery == Discovery::Static)
                    .then(|| r.engines.apply_engines(&d.backends));
                r.routing.reconfigure(d.clone());
                r.current = d;
                if let Some(joined) = joined {
                    joined.models_asked().await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "dynamic config not applied"),
        }
    }
}
