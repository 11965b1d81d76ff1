//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, tokenize, submit to
//! the engine loop, and turn its token events into a JSON body or an SSE stream in
//! OpenAI's chunk format (vLLM's framing: `data: {...}\n\n`, then `data: [DONE]`).
//!
//! [`Choices`] runs a request's `n` parallel choices (one engine request each) and merges
//! their pieces into one body or stream. [`Generation`] is the per-choice state:
//! incremental detokenization, stop strings
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
use super::{json_ok, read_json_probed, ErrorResponse};
use crate::assembly::Engine;
use crate::core::{EngineEvent, FinishReason, NewRequest, TokenLogprobs};
use crate::engine_loop::{EngineCommand, EngineHandle};
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
                kv_events::hash::mix64(id ^ engine.created.rotate_left(17))
            ),
            created: unix_now(),
        })
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

/// The `n` parallel choices of one response (vLLM's parallel sampling): one engine
/// request each, on the same prompt; with a `seed`, choice `i` samples with `seed + i`,
/// so every choice is reproducible and they differ from one another.
struct Choices {
    gens: Vec<Generation>,
    id: String,
    created: u64,
    prompt_tokens: u32,
}

/// One finished choice of a non-streamed response.
struct Done {
    text: String,
    finish: (FinishReason, Option<StopReason>),
    logprobs: Vec<(u32, TokenLogprobs)>,
    tokens: u32,
}

impl Choices {
    fn start(
        engine: &Engine,
        mut prompt: Vec<u32>,
        v: Validated,
        id_prefix: &str,
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
            gens.push(Generation::start(engine, p, vi, id_prefix)?);
        }
        let first = &gens[0];
        Ok(Choices {
            id: first.id.clone(),
            created: first.created,
            prompt_tokens: first.prompt_tokens,
            gens,
        })
    }

    fn usage(&self, completion_tokens: u32) -> Usage {
        usage(self.prompt_tokens, completion_tokens)
    }

    /// Run every choice to its end (the first error wins; the rest are then aborted).
    async fn collect(&mut self) -> Result<Vec<Done>, ApiError> {
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

    /// A streamed response: `head` frames, then a frame per piece of any choice as it
    /// comes (`piece_frame(choice, piece)`), then, when `usage_frame` is given, one with
    /// the usage summed over the choices, then `[DONE]`. An error sends an error frame
    /// and `[DONE]` and ends the stream, which aborts the other choices.
    fn stream(
        self,
        head: Vec<Bytes>,
        piece_frame: impl FnMut(usize, Piece) -> Bytes + Send + 'static,
        usage_frame: Option<impl FnOnce(Usage) -> Bytes + Send + 'static>,
    ) -> Response {
        use futures_util::StreamExt;
        let prompt_tokens = self.prompt_tokens;
        let tokens = vec![0u32; self.gens.len()];
        let merged =
            futures_util::stream::select_all(self.gens.into_iter().enumerate().map(|(i, g)| {
                futures_util::stream::unfold(g, move |mut g| async move {
                    let piece = g.next().await?;
                    let n = g.completion_tokens;
                    Some(((i, piece, n), g))
                })
                .boxed()
            }));
        // Phases: 0 = pieces, 1 = [DONE], 2 = end.
        let tail = futures_util::stream::unfold(
            (merged, tokens, piece_frame, usage_frame, 0u8),
            move |(mut merged, mut tokens, mut piece_frame, mut usage_frame, phase)| async move {
                match phase {
                    0 => match merged.next().await {
                        Some((i, Ok(piece), n)) => {
                            tokens[i] = n;
                            let f = piece_frame(i, piece);
                            Some((f, (merged, tokens, piece_frame, usage_frame, 0)))
                        }
                        Some((_, Err(e), _)) => {
                            Some((error_frame(&e), (merged, tokens, piece_frame, None, 1)))
                        }
                        None => match usage_frame.take() {
                            Some(u) => {
                                let f = u(usage(prompt_tokens, tokens.iter().sum()));
                                Some((f, (merged, tokens, piece_frame, None, 1)))
                            }
                            None => Some((
                                Bytes::from_static(DONE),
                                (merged, tokens, piece_frame, None, 2),
                            )),
                        },
                    },
                    1 => Some((
                        Bytes::from_static(DONE),
                        (merged, tokens, piece_frame, usage_frame, 2),
                    )),
                    _ => None,
                }
            },
        );
        sse_response(
            futures_util::stream::iter(head)
                .chain(tail)
                .map(Ok::<_, Infallible>),
        )
    }
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Usage {
    Usage {
        prompt_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        completion_tokens,
        prompt_tokens_details: None,
    }
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
        &engine.generation,
    )?;
    v.params.logprobs = validate::logprobs(body.logprobs, body.top_logprobs, "top_logprobs")?;
    let want_lp = v.params.logprobs.is_some();
    let include_usage = s
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let mut choices = Choices::start(&engine, prompt, v, "chatcmpl")?;
    let model = engine.model_name().to_string();

    if !s.stream.unwrap_or(false) {
        let done = choices.collect().await?;
        let completion_tokens = done.iter().map(|d| d.tokens).sum();
        return Ok(json_ok(&ChatCompletionResponse {
            id: choices.id.clone(),
            object: "chat.completion",
            created: choices.created,
            model,
            choices: done
                .into_iter()
                .enumerate()
                .map(|(index, d)| ChatChoice {
                    index: index as u32,
                    message: ChatResponseMessage {
                        role: "assistant",
                        content: d.text,
                        refusal: None,
                        annotations: None,
                        audio: None,
                        function_call: None,
                        reasoning: None,
                    },
                    logprobs: want_lp
                        .then(|| chat_logprobs(engine.tokenizer.as_ref(), &d.logprobs)),
                    finish_reason: Some(d.finish.0.as_str()),
                    stop_reason: d.finish.1,
                })
                .collect(),
            service_tier: None,
            system_fingerprint: fingerprint(),
            usage: choices.usage(completion_tokens),
            prompt_logprobs: None,
            kv_transfer_params: None,
        }));
    }

    let tok = engine.tokenizer.clone();
    let (id, created) = (choices.id.clone(), choices.created);
    let chunk = move |index: usize,
                      delta: ChatDelta,
                      finish: Option<(FinishReason, Option<StopReason>)>,
                      lps: &[(u32, TokenLogprobs)]| {
        let (finish_reason, stop_reason) = match finish {
            Some((r, s)) => (Some(r.as_str()), s),
            None => (None, None),
        };
        ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model.clone(),
            choices: vec![ChatChunkChoice {
                index: index as u32,
                delta,
                logprobs: (want_lp && !lps.is_empty()).then(|| chat_logprobs(tok.as_ref(), lps)),
                finish_reason,
                stop_reason,
            }],
            usage: None,
            system_fingerprint: None,
        }
    };
    // vLLM's order: a role chunk for every choice first.
    let head = (0..choices.gens.len())
        .map(|i| {
            let role = ChatDelta {
                role: Some("assistant"),
                content: String::new(),
            };
            frame(&chunk(i, role, None, &[]))
        })
        .collect();
    let usage_chunk = chunk.clone();
    let piece_frame = move |i: usize, piece: Piece| {
        let delta = ChatDelta {
            role: None,
            content: piece.text,
        };
        frame(&chunk(i, delta, piece.finish, &piece.logprobs))
    };
    let usage_frame = include_usage.then_some(move |u: Usage| {
        let empty = ChatDelta {
            role: None,
            content: String::new(),
        };
        let mut c = usage_chunk(0, empty, None, &[]);
        c.choices.clear();
        c.usage = Some(u);
        c.system_fingerprint = fingerprint();
        frame(&c)
    });
    Ok(choices.stream(head, piece_frame, usage_frame))
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
    let mut v = validate::sampling(
        s,
        s.max_tokens,
        prompt.len(),
        engine.max_model_len,
        &engine.generation,
    )?;
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
    let mut choices = Choices::start(&engine, prompt, v, "cmpl")?;
    let model = engine.model_name().to_string();

    let tok = engine.tokenizer.clone();
    let (id, created) = (choices.id.clone(), choices.created);
    let response = move |index: usize,
                         text: String,
                         finish: Option<(FinishReason, Option<StopReason>)>,
                         lps: &[(u32, TokenLogprobs)],
                         offset: usize| {
        let (finish_reason, stop_reason) = match finish {
            Some((r, s)) => (Some(r.as_str()), s),
            None => (None, None),
        };
        CompletionResponse {
            id: id.clone(),
            object: "text_completion",
            created,
            model: model.clone(),
            choices: vec![CompletionChoice {
                index: index as u32,
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
        let done = choices.collect().await?;
        let completion_tokens = done.iter().map(|d| d.tokens).sum();
        let echo = echo.unwrap_or_default();
        let mut r = response(0, String::new(), None, &[], 0);
        r.choices = done
            .into_iter()
            .enumerate()
            .flat_map(|(i, d)| {
                let text = format!("{echo}{}", d.text);
                response(i, text, Some(d.finish), &d.logprobs, echo.len()).choices
            })
            .collect();
        r.usage = Some(choices.usage(completion_tokens));
        r.system_fingerprint = fingerprint();
        return Ok(json_ok(&r));
    }

    // The echoed prompt opens every choice.
    let head = match &echo {
        Some(e) => (0..choices.gens.len())
            .map(|i| frame(&response(i, e.clone(), None, &[], 0)))
            .collect(),
        None => Vec::new(),
    };
    let usage_response = response.clone();
    let piece_frame = move |i: usize, piece: Piece| {
        let fin = piece.finish.is_some();
        let mut r = response(i, piece.text, piece.finish, &piece.logprobs, 0);
        if fin {
            r.system_fingerprint = fingerprint();
        }
        frame(&r)
    };
    let usage_frame = include_usage.then_some(move |u: Usage| {
        let mut r = usage_response(0, String::new(), None, &[], 0);
        r.choices.clear();
        r.usage = Some(u);
        frame(&r)
    });
    Ok(choices.stream(head, piece_frame, usage_frame))
}
