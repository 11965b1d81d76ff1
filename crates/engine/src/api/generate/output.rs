//! Output processing (vLLM's output processor): turns a request's engine events into
//! text pieces for the handlers. [`Generation`] is one engine request: incremental
//! detokenization, stop strings (matched text is cut and never leaked into a stream: up
//! to the longest stop string's length minus one byte is held back), finish reasons, the
//! generated-token and finish-reason counts as the client sees them, and the abort guard
//! that frees the request's KV blocks if the response ends early for any reason, a client
//! disconnect included. [`Choices`] runs a response's `n` parallel choices. Also the
//! pieces of a response body built from outputs: log-probs in chat's and completions'
//! formats, and usage.

use std::sync::Arc;

use protocol::openai::{unix_now, StopReason, Usage};
use protocol::ApiError;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::validate::Validated;
use crate::assembly::Engine;
use crate::core::{EngineEvent, FinishReason, KvTransfer, NewRequest, TokenLogprobs};
use crate::engine_loop::{EngineCommand, EngineHandle};
use crate::lora::Adapter;
use tokenizer::{IncrementalDecoder, Tokenizer};

/// Sends an abort for the request when dropped while still armed.
struct AbortGuard {
    handle: EngineHandle,
    id: u64,
    armed: bool,
}

impl AbortGuard {
    /// Disarm; with a reason, tell the engine to stop the request, handing it the
    /// receiver so the request is counted with that reason.
    fn finish(
        &mut self,
        reason: Option<FinishReason>,
        events: Option<UnboundedReceiver<EngineEvent>>,
    ) {
        if self.armed {
            self.armed = false;
            if let Some(reason) = reason {
                self.handle.send(EngineCommand::Abort {
                    id: self.id,
                    reason,
                    events,
                });
            }
        }
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        self.finish(Some(FinishReason::Abort), None);
    }
}

/// A piece of output text, and how generation ended when it did; with the log-probs of
/// the tokens whose text it completes, when asked for.
pub(super) struct Piece {
    pub(super) text: String,
    pub(super) finish: Option<(FinishReason, Option<StopReason>)>,
    pub(super) logprobs: Vec<(u32, TokenLogprobs)>,
}

/// One request in flight: receives token events and yields text pieces.
pub(super) struct Generation {
    engine: Engine,
    rx: UnboundedReceiver<EngineEvent>,
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    hold_back: usize,
    pending: String,
    /// Log-probs of tokens not yet handed out in a piece.
    pending_lp: Vec<(u32, TokenLogprobs)>,
    prompt_tokens: u32,
    pub(super) completion_tokens: u32,
    done: bool,
    guard: AbortGuard,
    id: String,
    created: u64,
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            // The response ended before the request did: the client went away.
            self.engine.handle.metrics.finished(FinishReason::Abort);
        }
    }
}

impl Generation {
    fn start(
        engine: &Engine,
        prompt: Vec<u32>,
        v: Validated,
        id_prefix: &str,
        kv_transfer: Option<KvTransfer>,
        lora: Option<Arc<Adapter>>,
    ) -> Result<Self, ApiError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = engine.handle.next_request_id();
        let prompt_tokens = prompt.len() as u32;
        let req = NewRequest {
            id,
            prompt,
            params: v.params,
            arrival: std::time::Instant::now(),
            events: tx,
            kv_transfer,
            lora,
        };
        if !engine.handle.send(EngineCommand::Add(req)) {
            return Err(ApiError::service_unavailable("The engine has stopped."));
        }
        let hold_back = v
            .stop
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Ok(Generation {
            engine: engine.clone(),
            rx,
            decoder: IncrementalDecoder::new(),
            stop: v.stop,
            hold_back,
            pending: String::new(),
            pending_lp: Vec::new(),
            prompt_tokens,
            completion_tokens: 0,
            done: false,
            guard: AbortGuard {
                handle: engine.handle.clone(),
                id,
                armed: true,
            },
            id: format!(
                "{id_prefix}-{:016x}",
                kv_events::hash::mix64(id ^ engine.created.rotate_left(17))
            ),
            created: unix_now(),
        })
    }

    /// The next piece of text; `None` after the last one.
    pub(super) async fn next(&mut self) -> Option<Result<Piece, ApiError>> {
        while !self.done {
            let event = match self.rx.recv().await {
                Some(e) => e,
                None => {
                    self.done = true;
                    self.guard.finish(None, None);
                    return Some(Err(ApiError::internal(
                        "The engine stopped before the request finished.",
                    )));
                }
            };
            let (id, finish) = match event {
                EngineEvent::Token {
                    id,
                    finish,
                    logprobs,
                } => {
                    if let Some(lp) = logprobs {
                        self.pending_lp.push((id, *lp));
                    }
                    (id, finish)
                }
                EngineEvent::Rejected(msg) => {
                    self.done = true;
                    self.guard.finish(None, None);
                    return Some(Err(ApiError::bad_request(msg, None)));
                }
            };
            self.completion_tokens += 1;
            self.engine.handle.metrics.generation_tokens.inc();
            let delta = self.decoder.push(self.engine.tokenizer.as_ref(), id);
            self.pending.push_str(&delta);
            if let Some((pos, stop)) = self.find_stop() {
                self.pending.truncate(pos);
                self.done = true;
                self.engine.handle.metrics.finished(FinishReason::Stop);
                // The engine would go on: stop it, counting the request as stopped.
                let (_, closed) = tokio::sync::mpsc::unbounded_channel();
                let rx = std::mem::replace(&mut self.rx, closed);
                self.guard.finish(Some(FinishReason::Stop), Some(rx));
                let text = std::mem::take(&mut self.pending);
                return Some(Ok(Piece {
                    text,
                    finish: Some((FinishReason::Stop, Some(StopReason::Text(stop)))),
                    logprobs: std::mem::take(&mut self.pending_lp),
                }));
            }
            if let Some(f) = finish {
                self.done = true;
                self.engine.handle.metrics.finished(f.reason);
                self.guard.finish(None, None);
                let text = std::mem::take(&mut self.pending);
                return Some(Ok(Piece {
                    text,
                    finish: Some((f.reason, f.stop_token.map(StopReason::Token))),
                    logprobs: std::mem::take(&mut self.pending_lp),
                }));
            }
            if self.pending.len() > self.hold_back {
                let mut cut = self.pending.len() - self.hold_back;
                while !self.pending.is_char_boundary(cut) {
                    cut -= 1;
                }
                if cut > 0 {
                    let rest = self.pending.split_off(cut);
                    let text = std::mem::replace(&mut self.pending, rest);
                    return Some(Ok(Piece {
                        text,
                        finish: None,
                        logprobs: std::mem::take(&mut self.pending_lp),
                    }));
                }
            }
        }
        None
    }

    fn find_stop(&self) -> Option<(usize, String)> {
        self.stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|p| (p, s.clone())))
            .min_by_key(|(p, _)| *p)
    }
}

/// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub(super) fn chat_logprobs(
    tok: &dyn Tokenizer,
    lps: &[(u32, TokenLogprobs)],
) -> serde_json::Value {
    let entry = |id: u32, lp: f32| {
        let t = tok.decode_continuation(&[id], false);
        serde_json::json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    let content: Vec<serde_json::Value> = lps
        .iter()
        .map(|(id, lp)| {
            let mut e = entry(*id, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|(i, l)| entry(*i, *l)).collect();
            e
        })
        .collect();
    serde_json::json!({ "content": content })
}

/// Completions' `logprobs`: parallel lists, `top_logprobs` as `{token: logprob}` maps.
pub(super) fn completion_logprobs(
    tok: &dyn Tokenizer,
    lps: &[(u32, TokenLogprobs)],
    mut offset: usize,
) -> serde_json::Value {
    let mut tokens = Vec::with_capacity(lps.len());
    let mut token_logprobs = Vec::with_capacity(lps.len());
    let mut top = Vec::with_capacity(lps.len());
    let mut offsets = Vec::with_capacity(lps.len());
    for (id, lp) in lps {
        let t = tok.decode_continuation(&[*id], false);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        token_logprobs.push(lp.logprob);
        let m: serde_json::Map<String, serde_json::Value> = lp
            .top
            .iter()
            .map(|(i, l)| (tok.decode_continuation(&[*i], false), serde_json::json!(l)))
            .collect();
        top.push(serde_json::Value::Object(m));
    }
    serde_json::json!({
        "text_offset": offsets,
        "token_logprobs": token_logprobs,
        "tokens": tokens,
        "top_logprobs": top,
    })
}

/// The `n` parallel choices of one response (vLLM's parallel sampling): one engine
/// request each, on the same prompt; with a `seed`, choice `i` samples with `seed + i`,
/// so every choice is reproducible and they differ from one another.
pub(super) struct Choices {
    pub(super) gens: Vec<Generation>,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) prompt_tokens: u32,
}

/// One finished choice of a non-streamed response.
pub(super) struct Done {
    pub(super) text: String,
    pub(super) finish: (FinishReason, Option<StopReason>),
    pub(super) logprobs: Vec<(u32, TokenLogprobs)>,
    pub(super) tokens: u32,
}

impl Choices {
    /// `kv_transfer` (P/D) goes with the first choice; every choice runs under `lora`.
    pub(super) fn start(
        engine: &Engine,
        mut prompt: Vec<u32>,
        v: Validated,
        id_prefix: &str,
        mut kv_transfer: Option<KvTransfer>,
        lora: Option<Arc<Adapter>>,
    ) -> Result<Self, ApiError> {
        let n = v.n.max(1);
        let mut gens = Vec::with_capacity(n);
        for i in 0..n {
            let mut vi = v.clone();
            vi.params.seed = v.params.seed.map(|s| s.wrapping_add(i as u64));
            let p = if i + 1 == n {
                std::mem::take(&mut prompt)
            } else {
                prompt.clone()
            };
            gens.push(Generation::start(
                engine,
                p,
                vi,
                id_prefix,
                kv_transfer.take(),
                lora.clone(),
            )?);
        }
        let first = &gens[0];
        Ok(Choices {
            id: first.id.clone(),
            created: first.created,
            prompt_tokens: first.prompt_tokens,
            gens,
        })
    }

    pub(super) fn usage(&self, completion_tokens: u32) -> Usage {
        usage(self.prompt_tokens, completion_tokens)
    }

    /// Run every choice to its end (the first error wins; the rest are then aborted).
    pub(super) async fn collect(&mut self) -> Result<Vec<Done>, ApiError> {
        futures_util::future::try_join_all(self.gens.iter_mut().map(|g| async move {
            let (mut text, mut finish, mut logprobs) = (String::new(), None, Vec::new());
            while let Some(piece) = g.next().await {
                let piece = piece?;
                text.push_str(&piece.text);
                logprobs.extend(piece.logprobs);
                if piece.finish.is_some() {
                    finish = piece.finish;
                }
            }
            Ok(Done {
                text,
                finish: finish.unwrap_or((FinishReason::Abort, None)),
                logprobs,
                tokens: g.completion_tokens,
            })
        }))
        .await
    }
}

pub(super) fn usage(prompt_tokens: u32, completion_tokens: u32) -> Usage {
    Usage {
        prompt_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        completion_tokens,
        prompt_tokens_details: None,
    }
}
