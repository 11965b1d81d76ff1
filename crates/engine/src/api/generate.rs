//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, tokenize, submit to
//! the engine loop, and turn its token events into a JSON body or an SSE stream in
//! OpenAI's chunk format (vLLM's framing: `data: {...}\n\n`, then `data: [DONE]`).
//!
//! [`Generation`] is the per-request state: incremental detokenization, stop strings
//! (matched text is cut, and never leaked into a stream: up to the longest stop string's
//! length minus one byte is held back), and the abort guard that frees the request's KV
//! blocks if the response ends early for any reason, a client disconnect included.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use protocol::openai::{
    unix_now, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatResponseMessage, CompletionChoice, CompletionRequest,
    CompletionResponse, Prompt, SamplingFields, StopReason, Usage,
};
use protocol::ApiError;
use tokio::sync::mpsc::UnboundedReceiver;

use super::validate::{self, Validated};
use super::{json_ok, read_json_probed, Engine, ErrorResponse};
use crate::core::{
    EngineCommand, EngineEvent, EngineHandle, FinishReason, NewRequest, TokenLogprobs,
};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

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
struct Piece {
    text: String,
    finish: Option<(FinishReason, Option<StopReason>)>,
    logprobs: Vec<(u32, TokenLogprobs)>,
}

/// One request in flight: receives token events and yields text pieces.
struct Generation {
    engine: Engine,
    rx: UnboundedReceiver<EngineEvent>,
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    hold_back: usize,
    pending: String,
    /// Log-probs of tokens not yet handed out in a piece.
    pending_lp: Vec<(u32, TokenLogprobs)>,
    prompt_tokens: u32,
    completion_tokens: u32,
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
                crate::hash::mix64(id ^ engine.created.rotate_left(17))
            ),
            created: unix_now(),
        })
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
            completion_tokens: self.completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// The next piece of text; `None` after the last one.
    async fn next(&mut self) -> Option<Result<Piece, ApiError>> {
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
fn chat_logprobs(tok: &dyn Tokenizer, lps: &[(u32, TokenLogprobs)]) -> serde_json::Value {
    let entry = |id: u32, lp: f32| {
        let t = tok.decode(&[id], false);
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
fn completion_logprobs(
    tok: &dyn Tokenizer,
    lps: &[(u32, TokenLogprobs)],
    mut offset: usize,
) -> serde_json::Value {
    let mut tokens = Vec::with_capacity(lps.len());
    let mut token_logprobs = Vec::with_capacity(lps.len());
    let mut top = Vec::with_capacity(lps.len());
    let mut offsets = Vec::with_capacity(lps.len());
    for (id, lp) in lps {
        let t = tok.decode(&[*id], false);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        token_logprobs.push(lp.logprob);
        let m: serde_json::Map<String, serde_json::Value> = lp
            .top
            .iter()
            .map(|(i, l)| (tok.decode(&[*i], false), serde_json::json!(l)))
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

fn sse_response(
    stream: impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn frame<T: serde::Serialize>(v: &T) -> Bytes {
    let mut s = String::with_capacity(256);
    s.push_str("data: ");
    s.push_str(&serde_json::to_string(v).unwrap_or_else(|_| "{}".into()));
    s.push_str("\n\n");
    Bytes::from(s)
}

fn error_frame(e: &ApiError) -> Bytes {
    Bytes::from(format!("data: {}\n\n", e.to_json()))
}

const DONE: &[u8] = b"data: [DONE]\n\n";

fn fingerprint() -> Option<String> {
    Some(format!("switchyard-{}", super::VERSION))
}

pub async fn chat_completions(
    State(engine): State<Engine>,
    req: Request,
) -> Result<Response, ErrorResponse> {
    let body: ChatCompletionRequest = read_json_probed::<_, SamplingFields>(&engine, req).await?;
    engine.check_model(body.model.as_deref())?;
    if body.messages.is_empty() {
        return Err(ApiError::validation(
            "messages must contain at least one message",
            Some("body.messages"),
        )
        .into());
    }
    let text = engine
        .tokenizer
        .apply_chat_template(&body.messages, body.add_generation_prompt.unwrap_or(true))
        .map_err(|e| ApiError::bad_request(e, None))?;
    let prompt = engine.tokenizer.encode(&text);
    validate::check_prompt_len(prompt.len(), engine.max_model_len)?;
    let s = &body.sampling;
    let mut v = validate::sampling(
        s,
        body.max_completion_tokens.or(s.max_tokens),
        prompt.len(),
        engine.max_model_len,
    )?;
    v.params.logprobs = validate::logprobs(body.logprobs, body.top_logprobs, "top_logprobs")?;
    let want_lp = v.params.logprobs.is_some();
    let include_usage = s
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let mut generation = Generation::start(&engine, prompt, v, "chatcmpl")?;
    let model = engine.model_name().to_string();

    if !s.stream.unwrap_or(false) {
        let mut content = String::new();
        let mut finish = None;
        let mut lps = Vec::new();
        while let Some(piece) = generation.next().await {
            let piece = piece?;
            content.push_str(&piece.text);
            lps.extend(piece.logprobs);
            if piece.finish.is_some() {
                finish = piece.finish;
            }
        }
        let (reason, stop_reason) = finish.unwrap_or((FinishReason::Abort, None));
        return Ok(json_ok(&ChatCompletionResponse {
            id: generation.id.clone(),
            object: "chat.completion",
            created: generation.created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatResponseMessage {
                    role: "assistant",
                    content,
                    refusal: None,
                    annotations: None,
                    audio: None,
                    function_call: None,
                    reasoning: None,
                },
                logprobs: want_lp.then(|| chat_logprobs(engine.tokenizer.as_ref(), &lps)),
                finish_reason: Some(reason.as_str()),
                stop_reason,
            }],
            service_tier: None,
            system_fingerprint: fingerprint(),
            usage: generation.usage(),
            prompt_logprobs: None,
            kv_transfer_params: None,
        }));
    }

    let tok = engine.tokenizer.clone();
    let chunk = move |g: &Generation,
                      delta: ChatDelta,
                      finish: Option<(FinishReason, Option<StopReason>)>,
                      lps: &[(u32, TokenLogprobs)]| {
        let (finish_reason, stop_reason) = match finish {
            Some((r, s)) => (Some(r.as_str()), s),
            None => (None, None),
        };
        ChatCompletionChunk {
            id: g.id.clone(),
            object: "chat.completion.chunk",
            created: g.created,
            model: model.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs: (want_lp && !lps.is_empty()).then(|| chat_logprobs(tok.as_ref(), lps)),
                finish_reason,
                stop_reason,
            }],
            usage: None,
            system_fingerprint: None,
        }
    };
    let first = frame(&chunk(
        &generation,
        ChatDelta {
            role: Some("assistant"),
            content: String::new(),
        },
        None,
        &[],
    ));
    // States: 0 = role chunk, 1 = content, 2 = usage, 3 = [DONE], 4 = end.
    let stream = futures_util::stream::unfold(
        (generation, 0u8, Some(first)),
        move |(mut g, state, first)| {
            let chunk = chunk.clone();
            async move {
                match state {
                    0 => first.map(|f| (Ok(f), (g, 1, None))),
                    1 => match g.next().await {
                        Some(Ok(piece)) => {
                            let fin = piece.finish.is_some();
                            let f = frame(&chunk(
                                &g,
                                ChatDelta {
                                    role: None,
                                    content: piece.text,
                                },
                                piece.finish,
                                &piece.logprobs,
                            ));
                            let next = if fin {
                                if include_usage {
                                    2
                                } else {
                                    3
                                }
                            } else {
                                1
                            };
                            Some((Ok(f), (g, next, None)))
                        }
                        Some(Err(e)) => Some((Ok(error_frame(&e)), (g, 3, None))),
                        None => Some((Ok(Bytes::from_static(DONE)), (g, 4, None))),
                    },
                    2 => {
                        let mut c = chunk(
                            &g,
                            ChatDelta {
                                role: None,
                                content: String::new(),
                            },
                            None,
                            &[],
                        );
                        c.choices.clear();
                        c.usage = Some(g.usage());
                        c.system_fingerprint = fingerprint();
                        Some((Ok(frame(&c)), (g, 3, None)))
                    }
                    3 => Some((Ok(Bytes::from_static(DONE)), (g, 4, None))),
                    _ => None,
                }
            }
        },
    );
    Ok(sse_response(stream))
}

pub async fn completions(
    State(engine): State<Engine>,
    req: Request,
) -> Result<Response, ErrorResponse> {
    let body: CompletionRequest = read_json_probed::<_, SamplingFields>(&engine, req).await?;
    engine.check_model(body.model.as_deref())?;
    let prompt = match body.prompt {
        Prompt::Text(t) => engine.tokenizer.encode_prompt(&t),
        Prompt::Tokens(t) => t,
        Prompt::TextBatch(mut v) if v.len() == 1 => engine.tokenizer.encode_prompt(&v.remove(0)),
        Prompt::TokenBatch(mut v) if v.len() == 1 => v.remove(0),
        _ => {
            return Err(ApiError::bad_request(
                "Only a single prompt per request is supported.",
                Some("prompt"),
            )
            .into());
        }
    };
    validate::check_prompt_len(prompt.len(), engine.max_model_len)?;
    let s = &body.sampling;
    let mut v = validate::sampling(s, s.max_tokens, prompt.len(), engine.max_model_len)?;
    v.params.logprobs = validate::logprobs(None, body.logprobs, "logprobs")?;
    let want_lp = v.params.logprobs.is_some();
    let include_usage = s
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let echo = body
        .echo
        .unwrap_or(false)
        .then(|| engine.tokenizer.decode(&prompt, false));
    let mut generation = Generation::start(&engine, prompt, v, "cmpl")?;
    let model = engine.model_name().to_string();

    let tok = engine.tokenizer.clone();
    let response = move |g: &Generation,
                         text: String,
                         finish: Option<(FinishReason, Option<StopReason>)>,
                         lps: &[(u32, TokenLogprobs)],
                         offset: usize| {
        let (finish_reason, stop_reason) = match finish {
            Some((r, s)) => (Some(r.as_str()), s),
            None => (None, None),
        };
        CompletionResponse {
            id: g.id.clone(),
            object: "text_completion",
            created: g.created,
            model: model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                logprobs: want_lp.then(|| completion_logprobs(tok.as_ref(), lps, offset)),
                text,
                finish_reason,
                stop_reason,
            }],
            service_tier: None,
            system_fingerprint: None,
            usage: None,
        }
    };

    if !s.stream.unwrap_or(false) {
        let mut text = echo.unwrap_or_default();
        let offset = text.len();
        let mut finish = None;
        let mut lps = Vec::new();
        while let Some(piece) = generation.next().await {
            let piece = piece?;
            text.push_str(&piece.text);
            lps.extend(piece.logprobs);
            if piece.finish.is_some() {
                finish = piece.finish;
            }
        }
        let mut r = response(
            &generation,
            text,
            Some(finish.unwrap_or((FinishReason::Abort, None))),
            &lps,
            offset,
        );
        r.usage = Some(generation.usage());
        r.system_fingerprint = fingerprint();
        return Ok(json_ok(&r));
    }

    // States: 0 = echo, 1 = text, 2 = usage, 3 = [DONE], 4 = end.
    let start_state = if echo.is_some() { 0u8 } else { 1 };
    let stream = futures_util::stream::unfold(
        (generation, start_state, echo),
        move |(mut g, state, echo)| {
            let response = response.clone();
            async move {
                match state {
                    0 => Some((
                        Ok(frame(&response(&g, echo.unwrap_or_default(), None, &[], 0))),
                        (g, 1, None),
                    )),
                    1 => match g.next().await {
                        Some(Ok(piece)) => {
                            let fin = piece.finish.is_some();
                            let mut r = response(&g, piece.text, piece.finish, &piece.logprobs, 0);
                            if fin {
                                r.system_fingerprint = fingerprint();
                            }
                            let next = if fin {
                                if include_usage {
                                    2
                                } else {
                                    3
                                }
                            } else {
                                1
                            };
                            Some((Ok(frame(&r)), (g, next, None)))
                        }
                        Some(Err(e)) => Some((Ok(error_frame(&e)), (g, 3, None))),
                        None => Some((Ok(Bytes::from_static(DONE)), (g, 4, None))),
                    },
                    2 => {
                        let mut r = response(&g, String::new(), None, &[], 0);
                        r.choices.clear();
                        r.usage = Some(g.usage());
                        Some((Ok(frame(&r)), (g, 3, None)))
                    }
                    3 => Some((Ok(Bytes::from_static(DONE)), (g, 4, None))),
                    _ => None,
                }
            }
        },
    );
    Ok(sse_response(stream))
}
