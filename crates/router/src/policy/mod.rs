//! Room: routing policies. A policy ranks the engines that can serve a request, most
//! preferred first; the proxy tries them in that order, so failover is just walking the
//! ranking (pingora's `BackendSelection` idea). A policy is a function of the request, the
//! engines' current state and its own small state: unit-testable without sockets.
//!
//! This file owns the trait, the request context and [`build`]. The simple policies are a
//! file each (`roundrobin`, `session`, `leastload`, `p2c`, and `lora_affinity`, which
//! wraps any of them); the tree-based ones a
//! folder each: [`prefix`] (with its prefix tree) and [`kvaware`] (with its KV-cache
//! index and the subscriber following the engines' KV events). [`decisions`] is the
//! decision statistics both of those keep.

pub mod decisions;
pub mod kvaware;
mod leastload;
mod lora_affinity;
mod p2c;
pub mod prefix;
mod roundrobin;
mod session;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::sync::Arc;

pub use kvaware::KvAware;
pub use leastload::LeastLoad;
pub use lora_affinity::LoraAffinity;
pub use p2c::PowerOfTwo;
pub use prefix::PrefixAware;
pub use roundrobin::RoundRobin;
pub use session::Session;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::{PrefixSettings, RoutingLogic};
use crate::engines::Endpoint;
use kvaware::KvState;

/// What a policy may look at in a request.
#[derive(Debug, Default)]
pub struct RouteCtx<'a> {
    pub model: &'a str,
    /// The session id (from the `--session-key` header or body field), if any.
    pub session: Option<&'a str>,
    /// A per-request random value (for randomized policies).
    pub nonce: u64,
    /// The request body (JSON) as received: `kvaware` renders and tokenizes its prompt.
    pub body: &'a [u8],
    /// [`RouteCtx::prompt`], extracted from `body` the first time a policy asks.
    prompt: OnceCell<Option<String>>,
}

impl<'a> RouteCtx<'a> {
    pub fn new(model: &'a str, session: Option<&'a str>, nonce: u64, body: &'a [u8]) -> Self {
        RouteCtx {
            model,
            session,
            nonce,
            body,
            prompt: OnceCell::new(),
        }
    }

    /// A context whose prompt text is given rather than read from a body.
    pub fn with_prompt(model: &'a str, prompt: &str) -> Self {
        RouteCtx {
            model,
            prompt: OnceCell::from(Some(prompt.to_string())),
            ..RouteCtx::default()
        }
    }

    /// The prompt as text (chat: role-marked message contents in order; completions: the
    /// prompt; see [`prompt_text`]), read from the body on the first call only: a policy
    /// that never asks costs no parse.
    pub fn prompt(&self) -> Option<&str> {
        self.prompt
            .get_or_init(|| prompt_text(self.body))
            .as_deref()
    }
}

pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;
    /// Fill `order` with indices into `candidates`, best first (every index once).
    fn rank(&self, ctx: &RouteCtx<'_>, candidates: &[Arc<Endpoint>], order: &mut Vec<usize>);
    /// The policy's own `/metrics` families (decisions, state size), if it keeps any.
    fn render_metrics(&self, _w: &mut protocol::prom::TextWriter) {}
    /// Its decisions so far by outcome (`cache_hit`, `miss`...), for the dashboard; empty
    /// for policies that do not classify them.
    fn decisions(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

pub fn build(
    logic: RoutingLogic,
    prefix: PrefixSettings,
    kv: &Arc<KvState>,
    kv_overlap_weight: f64,
    kv_min_match: f64,
    lora_affinity: bool,
) -> Box<dyn Policy> {
    let policy: Box<dyn Policy> = match logic {
        RoutingLogic::Roundrobin => Box::new(RoundRobin::default()),
        RoutingLogic::Session => Box::new(Session),
        // disaggregated_prefill: what is not a completion (and the decode side) goes by
        // load; `pd::Sides` ranks the prefill side.
        RoutingLogic::Leastload | RoutingLogic::DisaggregatedPrefill => Box::new(LeastLoad),
        RoutingLogic::P2c => Box::new(PowerOfTwo),
        RoutingLogic::Prefixaware => Box::new(PrefixAware::new(prefix)),
        RoutingLogic::Kvaware => {
            Box::new(KvAware::new(kv.clone(), kv_overlap_weight).with_min_match(kv_min_match))
        }
    };
    if lora_affinity {
        Box::new(LoraAffinity::new(policy))
    } else {
        policy
    }
}

/// Load as the router sees it: requests in flight here, then the engine's own queue.
pub(crate) fn load_key(e: &Endpoint) -> (u64, u64) {
    let inflight = e.in_flight.load(std::sync::atomic::Ordering::Relaxed);
    (inflight, e.scraped_queue().max(0.0) as u64)
}

/// All indices, least loaded first (stable: ties keep their order).
pub(crate) fn by_load(candidates: &[Arc<Endpoint>], order: &mut Vec<usize>) {
    order.clear();
    order.extend(0..candidates.len());
    order.sort_by_key(|&i| load_key(&candidates[i]));
}

/// The fields a prompt is read from.
#[derive(Deserialize)]
struct PromptFields<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// The prompt as text for prefix routing: for chat, each message as `<|role|>` then its
/// text (a string, or the text parts of a list), in order; for completions, the prompt
/// (a string; of a batch, the first; token ids as space-terminated numbers, so a token
/// prefix stays a text prefix). None when the body has neither.
pub fn prompt_text(body: &[u8]) -> Option<String> {
    let f: PromptFields<'_> = serde_json::from_slice(body).ok()?;
    if let Some(messages) = f.messages {
        let mut out = String::new();
        for m in &messages {
            out.push_str("<|");
            out.push_str(m.role.as_deref().unwrap_or(""));
            out.push_str("|>");
            let Some(c) = m.content else { continue };
            if let Ok(s) = serde_json::from_str::<Cow<'_, str>>(c.get()) {
                out.push_str(&s);
            } else if let Ok(parts) = serde_json::from_str::<Vec<Part<'_>>>(c.get()) {
                for t in parts.iter().filter_map(|p| p.text.as_deref()) {
                    out.push_str(t);
                }
            }
        }
        return Some(out);
    }
    let raw = f.prompt?;
    prompt_value(raw.get())
}

fn prompt_value(raw: &str) -> Option<String> {
    let raw = raw.trim_start();
    match raw.as_bytes().first()? {
        b'"' => serde_json::from_str::<Cow<'_, str>>(raw)
            .ok()
            .map(Cow::into_owned),
        b'[' => {
            let items: Vec<&RawValue> = serde_json::from_str(raw).ok()?;
            let first = items.first()?.get();
            if first.starts_with(['"', '[']) {
                return prompt_value(first);
            }
            let mut out = String::with_capacity(items.len() * 6);
            for id in items {
                out.push_str(id.get());
                out.push(' ');
            }
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::sync::Arc;
    use std::time::Instant;

    use crate::config::BackendSpec;
    use crate::engines::Endpoint;

    pub fn engines(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                let spec = BackendSpec {
                    url: format!("http://10.0.0.{i}:8000"),
                    model: Some("m".into()),
                    kv_events: None,
                    label: None,
                };
                Arc::new(Endpoint::new(&spec, 10, Instant::now()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_is_read_from_the_body_once_when_asked() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let ctx = RouteCtx::new("m", None, 7, body);
        assert!(
            ctx.prompt.get().is_none(),
            "nothing parsed before a policy asks"
        );
        let first = ctx.prompt().expect("a prompt");
        assert_eq!(first, "<|user|>hi");
        assert!(
            std::ptr::eq(first, ctx.prompt().expect("again")),
            "parsed once"
        );
        assert_eq!(RouteCtx::default().prompt(), None);
        assert_eq!(RouteCtx::with_prompt("m", "given").prompt(), Some("given"));
    }

    #[test]
    fn prompt_text_of_chat_and_completions() {
        let chat = br#"{"model":"m","messages":[{"role":"system","content":"be \"brief\""},
            {"role":"user","content":[{"type":"text","text":"look: "},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"a cat"}]},
            {"role":"assistant","content":null},{"role":"user","content":"ok"}]}"#;
        assert_eq!(
            prompt_text(chat).as_deref(),
            Some("<|system|>be \"brief\"<|user|>look: a cat<|assistant|><|user|>ok")
        );
        assert_eq!(
            prompt_text(br#"{"model":"m","prompt":"once upon"}"#).as_deref(),
            Some("once upon")
        );
        assert_eq!(
            prompt_text(br#"{"prompt":["first","second"]}"#).as_deref(),
            Some("first")
        );
        assert_eq!(
            prompt_text(br#"{"prompt":[1,22,333]}"#).as_deref(),
            Some("1 22 333 ")
        );
        assert_eq!(
            prompt_text(br#"{"prompt":[[5,6],[7]]}"#).as_deref(),
            Some("5 6 ")
        );
        assert_eq!(prompt_text(br#"{"model":"m","input":"x"}"#), None);
        assert_eq!(prompt_text(b"[1,2]"), None);
    }
}
