//! Model discovery: which models each engine serves, from its `/v1/models` (LoRA adapters
//! included; with `VLLM_API_KEY` as the bearer token when set, as the Production Stack
//! router does). Engines that join are asked at once and, while they do not answer and
//! are still in the set, again for about a minute; the health checks ask an engine again
//! when it is readmitted, and the stats scraper at every scrape.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use tokio::sync::oneshot;

use super::EngineSet;
use crate::engines::Endpoint;
use crate::upstream;

/// Attempts to learn a joining engine's models (0.25 s doubling between them, capped at
/// 16 s: about a minute in all).
const LEARN_ATTEMPTS: usize = 8;

/// `Authorization` for the router's own calls to engines: `Bearer $VLLM_API_KEY` when
/// that is set (the key vLLM was started with).
pub fn engine_auth_from_env() -> Option<HeaderValue> {
    let key = std::env::var("VLLM_API_KEY").ok()?;
    let key = key.trim();
    if key.is_empty() {
        return None;
    }
    HeaderValue::from_str(&format!("Bearer {key}")).ok()
}

impl EngineSet {
    /// Ask `e` which models it serves and record them; true when it answered.
    pub async fn discover_models(&self, e: &Endpoint) -> bool {
        let url = format!("{}/v1/models", e.url);
        let auth = self.auth.as_ref();
        match upstream::get(&self.client(), &url, Duration::from_secs(5), auth).await {
            Ok((s, body)) if s.is_success() => {
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(v) => {
                        let cards: Vec<serde_json::Value> =
                            v["data"].as_array().cloned().unwrap_or_default();
                        let models: Vec<String> = cards
                            .iter()
                            .filter_map(|c| c["id"].as_str().map(str::to_string))
                            .collect();
                        e.set_models(models.clone(), cards);
                        for m in &models {
                            self.registry.remember(m);
                        }
                        self.metrics.sync(&self.registry);
                        true
                    }
                    Err(err) => {
                        tracing::warn!(engine = %e.url, error = %err, "bad /v1/models body");
                        false
                    }
                }
            }
            Ok((s, _)) => {
                tracing::warn!(engine = %e.url, status = %s, "/v1/models failed");
                false
            }
            Err(err) => {
                tracing::debug!(engine = %e.url, error = %err, "/v1/models unreachable");
                false
            }
        }
    }
}

/// The engines that joined the set, being asked for their models.
#[derive(Debug, Default)]
pub struct Joined {
    first_answers: Vec<oneshot::Receiver<()>>,
}

impl Joined {
    /// Wait until every engine that joined was asked once (answered, refused or timed
    /// out); those that did not answer go on being asked in the background.
    pub async fn models_asked(self) {
        futures_util::future::join_all(self.first_answers).await;
    }
}

/// Start learning the models of `joined` (those without a configured model).
pub(super) fn learn(engines: &Arc<EngineSet>, joined: Vec<Arc<Endpoint>>) -> Joined {
    let first_answers = joined
        .into_iter()
        .filter(|e| e.configured_model.is_none())
        .map(|e| {
            let (tx, rx) = oneshot::channel();
            tokio::spawn(learn_models(engines.clone(), e, tx));
            rx
        })
        .collect();
    Joined { first_answers }
}

/// Ask a joining engine for its models, retrying (0.25 s doubling) while it does not
/// answer and is still in the set; `asked` fires after the first attempt.
async fn learn_models(engines: Arc<EngineSet>, ep: Arc<Endpoint>, asked: oneshot::Sender<()>) {
    let mut asked = Some(asked);
    let mut delay = Duration::from_millis(250);
    for _ in 0..LEARN_ATTEMPTS {
        let present = engines
            .registry
            .snapshot()
            .endpoints
            .iter()
            .any(|e| Arc::ptr_eq(e, &ep));
        if !present {
            return;
        }
        let answered = engines.discover_models(&ep).await;
        if let Some(tx) = asked.take() {
            let _ = tx.send(());
        }
        if answered {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(16));
    }
    tracing::warn!(engine = %ep.url, "the engine never listed its models");
}
