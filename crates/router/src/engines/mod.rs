//! The engine set: each engine's identity, models, health, load and statistics, and the
//! registry that holds the current set as an immutable snapshot.
//!
//! A request takes the snapshot (one `Arc` clone), so discovery and reloads never block
//! or disturb requests in flight; an engine kept across a change keeps its counters.
//! Memory is O(engines + models): nothing here is keyed by request. Each engine's
//! sliding-window request statistics are [`stats`]'s ring; its circuit breaker is
//! [`breaker`]'s.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::Notify;

use kv_events::hash::mix64;
use protocol::prom::{Counter, Gauge, Histogram, ITL_BUCKETS, TTFT_BUCKETS};

pub mod breaker;
pub mod stats;

use crate::config::BackendSpec;
use breaker::Breaker;
use stats::RequestStats;

/// Why an engine was taken out of rotation (the `cause` label of
/// `vllm:router_engine_ejections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectCause {
    /// `--health-failure-threshold` failed (or timed out) health checks.
    HealthCheck,
    /// As many consecutive failures of live requests (passive outlier ejection).
    Traffic,
    /// Its circuit breaker opened.
    CircuitBreaker,
}

impl EjectCause {
    pub const ALL: [EjectCause; 3] = [
        EjectCause::HealthCheck,
        EjectCause::Traffic,
        EjectCause::CircuitBreaker,
    ];

    pub fn label(self) -> &'static str {
        match self {
            EjectCause::HealthCheck => "health_check",
            EjectCause::Traffic => "traffic",
            EjectCause::CircuitBreaker => "circuit_breaker",
        }
    }
}

/// Load figures scraped from an engine's `/metrics`.
#[derive(Debug, Default)]
pub struct EngineLoad {
    pub running: Gauge,
    pub waiting: Gauge,
    pub kv_usage: Gauge,
    pub prefix_hits: Gauge,
    pub prefix_queries: Gauge,
    pub scraped: AtomicBool,
}

#[derive(Debug)]
pub struct Endpoint {
    /// Base URL, `http://host:port`; also the engine's id (`?id=` accepts it or host:port).
    pub url: String,
    pub host_port: String,
    /// `host:port` as a header value, sent back as `x-switchyard-engine`.
    pub header: axum::http::HeaderValue,
    /// Hash of the URL, for consistent hashing.
    pub key: u64,
    /// Models configured for this engine (if any); otherwise discovered.
    pub configured_model: Option<String>,
    /// Its KV-event endpoint when configured (`--static-kv-events-endpoints`).
    pub kv_events: Option<String>,
    /// Its model label (`--static-model-labels`, the pod label `model`): which side of
    /// `disaggregated_prefill` it serves.
    pub label: Option<String>,
    models: RwLock<Arc<[String]>>,
    /// Model cards from the engine's /v1/models (kept for the merged listing).
    pub cards: RwLock<Arc<[serde_json::Value]>>,
    healthy: AtomicBool,
    /// Consecutive failed health checks.
    fails: AtomicU32,
    /// Consecutive failed live requests (a passing health check does not clear them: an
    /// engine that answers `/health` but fails every request is still ejected).
    live_fails: AtomicU32,
    oks: AtomicU32,
    pub in_flight: AtomicU64,
    pub in_prefill: AtomicU64,
    pub in_decode: AtomicU64,
    /// Attempts sent to this engine since it joined (the routing decisions it got).
    pub routed: Counter,
    pub load: EngineLoad,
    pub stats: RequestStats,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub latency: Histogram,
    /// Live-traffic circuit breaker.
    pub breaker: Breaker,
    /// Woken when the engine is ejected or its breaker opens: requests still waiting
    /// for its first byte go elsewhere at once, its silent streams are cut.
    pub unavailable: Arc<Notify>,
    /// Ejections so far, by [`EjectCause`] (in `EjectCause::ALL` order).
    pub ejections: [Counter; 3],
}

pub fn hash_str(s: &str) -> u64 {
    // FNV-1a, then a strong mix: stable across processes and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

impl Endpoint {
    pub fn new(spec: &BackendSpec, window: u64, epoch: Instant) -> Self {
        let host_port = spec.url.trim_start_matches("http://").to_string();
        let models: Arc<[String]> = spec.model.iter().cloned().collect();
        Endpoint {
            header: axum::http::HeaderValue::from_str(&host_port)
                .unwrap_or_else(|_| axum::http::HeaderValue::from_static("invalid")),
            key: hash_str(&spec.url),
            url: spec.url.clone(),
            host_port,
            configured_model: spec.model.clone(),
            kv_events: spec.kv_events.clone(),
            label: spec.label.clone(),
            models: RwLock::new(models),
            cards: RwLock::new(Arc::from(Vec::new())),
            // Admitted until health checks say otherwise (a configured engine is
            // presumed up; a failed connect fails over and counts against it).
            healthy: AtomicBool::new(true),
            fails: AtomicU32::new(0),
            live_fails: AtomicU32::new(0),
            oks: AtomicU32::new(0),
            in_flight: AtomicU64::new(0),
            in_prefill: AtomicU64::new(0),
            in_decode: AtomicU64::new(0),
            routed: Counter::default(),
            load: EngineLoad::default(),
            stats: RequestStats::new(window, epoch),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            latency: Histogram::new(protocol::prom::REQUEST_LATENCY_BUCKETS),
            breaker: Breaker::default(),
            unavailable: Arc::new(Notify::new()),
            ejections: Default::default(),
        }
    }

    pub fn models(&self) -> Arc<[String]> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|m| m == model)
    }

    pub fn set_models(&self, models: Vec<String>, cards: Vec<serde_json::Value>) {
        *self.models.write().unwrap_or_else(|p| p.into_inner()) = models.into();
        *self.cards.write().unwrap_or_else(|p| p.into_inner()) = cards.into();
    }

    /// The base model of `model` when it is a LoRA adapter on this engine: its card
    /// names a `parent` other than itself, as vLLM lists adapters.
    pub fn adapter_parent(&self, model: &str) -> Option<String> {
        self.cards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|c| c.get("id").and_then(|v| v.as_str()) == Some(model))
            .find_map(|c| c.get("parent").and_then(|v| v.as_str()))
            .filter(|p| *p != model)
            .map(str::to_string)
    }

    pub fn is_adapter(&self, model: &str) -> bool {
        self.adapter_parent(model).is_some()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Record a failed health check (`HealthCheck`) or live request (`Traffic`): a
    /// connect error, reset, 5xx or first-byte timeout. True when it ejected the engine;
    /// then whoever waits on [`Endpoint::unavailable`] is woken.
    pub fn record_failure(&self, threshold: u32, cause: EjectCause) -> bool {
        self.oks.store(0, Ordering::Relaxed);
        let streak = match cause {
            EjectCause::Traffic => &self.live_fails,
            _ => &self.fails,
        };
        let n = streak.fetch_add(1, Ordering::Relaxed) + 1;
        let ejected = n >= threshold && self.healthy.swap(false, Ordering::Relaxed);
        if ejected {
            self.ejected(cause);
        }
        ejected
    }

    /// Count an ejection (or a breaker opening) and wake the requests waiting on it.
    pub fn ejected(&self, cause: EjectCause) {
        self.ejections[cause as usize].inc();
        self.unavailable.notify_waiters();
    }

    /// A live request got its first byte: failures are no longer consecutive.
    pub fn record_live_success(&self) {
        if self.live_fails.load(Ordering::Relaxed) != 0 {
            self.live_fails.store(0, Ordering::Relaxed);
        }
    }

    /// Record a good check; true when it readmitted the engine (which starts it with a
    /// clean record of live requests too).
    pub fn record_success(&self, threshold: u32) -> bool {
        self.fails.store(0, Ordering::Relaxed);
        let n = self.oks.fetch_add(1, Ordering::Relaxed) + 1;
        let readmitted = n >= threshold && !self.healthy.swap(true, Ordering::Relaxed);
        if readmitted {
            self.live_fails.store(0, Ordering::Relaxed);
        }
        readmitted
    }

    /// The engine's queue as scraped: waiting plus running.
    pub fn scraped_queue(&self) -> f64 {
        self.load.waiting.get() + self.load.running.get()
    }

    pub fn matches_id(&self, id: &str) -> bool {
        id == self.url || id == self.host_port
    }
}

/// How many model names the registry remembers beyond those in use.
pub const KNOWN_MODELS_CAP: usize = 1024;

/// The models seen so far, in the order first seen. Past [`KNOWN_MODELS_CAP`] the oldest
/// name that no engine serves and no alias names is forgotten (its requests are 404s
/// again); names in use are never forgotten, so the set holds at most the cap plus the
/// models the current engines serve.
#[derive(Debug, Default)]
pub struct KnownModels {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl KnownModels {
    pub fn contains(&self, model: &str) -> bool {
        self.set.contains(model)
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Add `model`; when full, first forget the oldest name for which `in_use` is false.
    pub fn insert(&mut self, model: &str, cap: usize, in_use: impl Fn(&str) -> bool) {
        if self.set.contains(model) {
            return;
        }
        if self.set.len() >= cap {
            if let Some(i) = self.order.iter().position(|m| !in_use(m)) {
                if let Some(old) = self.order.remove(i) {
                    self.set.remove(&old);
                }
            }
        }
        self.set.insert(model.to_string());
        self.order.push_back(model.to_string());
    }

    /// Forget `model` (true when it was known).
    pub fn remove(&mut self, model: &str) -> bool {
        if !self.set.remove(model) {
            return false;
        }
        self.order.retain(|m| m != model);
        true
    }
}

/// The current engines, replaced whole on every change.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub endpoints: Vec<Arc<Endpoint>>,
}

#[derive(Debug)]
pub struct Registry {
    snapshot: RwLock<Arc<Snapshot>>,
    aliases: RwLock<Arc<HashMap<String, String>>>,
    /// `--known-models`: kept known whatever else is forgotten.
    pinned: RwLock<Arc<Vec<String>>>,
    /// Models served or configured since start: a request for one of these with no
    /// healthy engine is a 503 (scale from zero), not a 404. Bounded (see [`KnownModels`]).
    known: Mutex<KnownModels>,
    window: u64,
    pub epoch: Instant,
}

impl Registry {
    pub fn new(window: u64) -> Self {
        Registry {
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            aliases: RwLock::new(Arc::new(HashMap::new())),
            pinned: RwLock::new(Arc::new(Vec::new())),
            known: Mutex::new(KnownModels::default()),
            window,
            epoch: Instant::now(),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the engine set with `specs`, keeping the state of engines that stay;
    /// returns the engines that joined. (The router changes its set through
    /// `discovery::EngineSet::apply_engines`, which keeps the rest in step.)
    pub fn apply(&self, specs: &[BackendSpec]) -> Vec<Arc<Endpoint>> {
        let old = self.snapshot();
        let mut endpoints = Vec::with_capacity(specs.len());
        let mut joined = Vec::new();
        for spec in specs {
            let kept = old.endpoints.iter().find(|e| {
                e.url == spec.url && e.configured_model == spec.model && e.label == spec.label
            });
            let ep = match kept {
                Some(e) => e.clone(),
                None => {
                    let e = Arc::new(Endpoint::new(spec, self.window, self.epoch));
                    joined.push(e.clone());
                    e
                }
            };
            if let Some(m) = &spec.model {
                self.remember(m);
            }
            endpoints.push(ep);
        }
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Snapshot { endpoints });
        joined
    }

    pub fn set_aliases(&self, aliases: HashMap<String, String>) {
        for m in aliases.values() {
            self.remember(m);
        }
        *self.aliases.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(aliases);
    }

    /// Models that stay known with no engine serving them (`--known-models`).
    pub fn set_pinned(&self, models: Vec<String>) {
        *self.pinned.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(models.clone());
        for m in &models {
            self.remember(m);
        }
    }

    pub fn remember(&self, model: &str) {
        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if k.contains(model) {
            return;
        }
        let snap = self.snapshot();
        let aliases = self
            .aliases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let pinned = self
            .pinned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        k.insert(model, KNOWN_MODELS_CAP, |m| {
            snap.endpoints.iter().any(|e| e.serves(m))
                || aliases.values().any(|a| a == m)
                || pinned.iter().any(|p| p == m)
        });
    }

    /// Forget `model` unless an engine still serves it or it is pinned or an alias's
    /// target (a LoRA adapter unloaded everywhere: a 404 again, not a 503).
    pub fn forget_unserved(&self, model: &str) -> bool {
        let mut k = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let served = self.snapshot().endpoints.iter().any(|e| e.serves(model));
        let kept = served
            || self
                .aliases
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .any(|a| a == model)
            || self
                .pinned
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|p| p == model);
        !kept && k.remove(model)
    }

    /// The model names remembered (see [`KnownModels`]: bounded).
    pub fn known_models(&self) -> Vec<String> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .order
            .iter()
            .cloned()
            .collect()
    }

    /// How many model names are remembered.
    pub fn known_len(&self) -> usize {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_known(&self, model: &str) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(model)
    }

    /// The model a requested name refers to (aliases resolved).
    pub fn resolve<'a>(&self, requested: &'a str) -> std::borrow::Cow<'a, str> {
        let aliases = self.aliases.read().unwrap_or_else(|p| p.into_inner());
        match aliases.get(requested) {
            Some(m) => std::borrow::Cow::Owned(m.clone()),
            None => std::borrow::Cow::Borrowed(requested),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str, model: Option<&str>) -> BackendSpec {
        BackendSpec {
            url: url.into(),
            model: model.map(str::to_string),
            kv_events: None,
            label: None,
        }
    }

    #[test]
    fn passing_health_checks_do_not_clear_a_streak_of_failed_requests() {
        let ep = Endpoint::new(&spec("http://a:1", Some("m")), 10, Instant::now());
        assert!(!ep.record_failure(2, EjectCause::Traffic));
        // `/health` answers while every request fails (an engine answering 500s).
        assert!(!ep.record_success(2));
        assert!(
            ep.record_failure(2, EjectCause::Traffic),
            "second failure ejects"
        );
        assert!(!ep.is_healthy());
        // Two good checks readmit it with a clean record: one failure does not eject.
        assert!(!ep.record_success(2));
        assert!(ep.record_success(2));
        assert!(!ep.record_failure(2, EjectCause::Traffic));
        assert!(ep.is_healthy());
        // A served request breaks the streak; a failed check does not join it.
        ep.record_live_success();
        assert!(!ep.record_failure(2, EjectCause::Traffic));
        assert!(!ep.record_failure(2, EjectCause::HealthCheck));
        assert!(ep.is_healthy());
        assert!(ep.record_failure(2, EjectCause::HealthCheck));
    }

    #[test]
    fn apply_keeps_state_of_engines_that_stay() {
        let r = Registry::new(10);
        r.apply(&[spec("http://a:1", Some("m")), spec("http://b:2", Some("m"))]);
        let a = r.snapshot().endpoints[0].clone();
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        let joined = r.apply(&[spec("http://a:1", Some("m")), spec("http://c:3", Some("n"))]);
        let snap = r.snapshot();
        assert_eq!(joined.len(), 1);
        assert!(Arc::ptr_eq(&joined[0], &snap.endpoints[1]), "c joined");
        assert!(Arc::ptr_eq(&snap.endpoints[0], &a));
        assert_eq!(snap.endpoints[1].url, "http://c:3");
        assert!(r.is_known("m") && r.is_known("n") && !r.is_known("x"));
    }

    #[test]
    fn known_models_are_bounded_but_keep_names_in_use() {
        let r = Registry::new(10);
        r.apply(&[spec("http://a:1", Some("served"))]);
        r.set_aliases(HashMap::from([(
            "alias".to_string(),
            "aliased".to_string(),
        )]));
        for i in 0..KNOWN_MODELS_CAP + 100 {
            r.remember(&format!("gone-{i}"));
        }
        assert_eq!(r.known_len(), KNOWN_MODELS_CAP);
        assert!(r.is_known("served"), "a model an engine serves stays known");
        assert!(r.is_known("aliased"), "an alias target stays known");
        assert!(
            !r.is_known("gone-0"),
            "the oldest unused name was forgotten"
        );
        assert!(r.is_known(&format!("gone-{}", KNOWN_MODELS_CAP + 99)));

        // When every name is in use nothing is forgotten.
        let mut k = KnownModels::default();
        for i in 0..5 {
            k.insert(&format!("m{i}"), 3, |_| true);
        }
        assert_eq!(k.len(), 5);
        k.insert("m0", 3, |_| false);
        assert_eq!(k.len(), 5, "a known name is not added twice");
    }

    #[test]
    fn health_thresholds_eject_and_readmit() {
        let e = Endpoint::new(&spec("http://a:1", None), 10, Instant::now());
        assert!(!e.record_failure(2, EjectCause::HealthCheck));
        e.record_live_success();
        assert!(!e.record_failure(2, EjectCause::Traffic));
        assert!(e.record_failure(2, EjectCause::Traffic));
        assert!(!e.is_healthy());
        assert_eq!(e.ejections[EjectCause::Traffic as usize].get(), 1);
        assert!(!e.record_success(2));
        assert!(e.record_success(2));
        assert!(e.is_healthy());
    }
}
