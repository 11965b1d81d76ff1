//! The `POST /v1/chat/completions` and `POST /v1/completions` handlers: parse the body,
//! check the model, tokenize (chat through the model's template), validate the sampling
//! fields, submit the request's choices, and respond with one JSON body or a stream.

use axum::extract::{Request, State};
use axum::response::Response;
use protocol::openai::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatMessage, ChatResponseMessage, CompletionChoice,
    CompletionRequest, CompletionResponse, Prompt, SamplingFields, StopReason, Usage,
};
use protocol::ApiError;

use super::output::{chat_logprobs, completion_logprobs, Choices, Piece};
use super::stream::frame;
use crate::api::validate;
use crate::api::{json_ok, read_json_probed, ErrorResponse};
use crate::assembly::Engine;
use crate::core::{FinishReason, TokenLogprobs};

/// The `system_fingerprint` of final chunks and bodies: this build's version.
fn fingerprint() -> Option<String> {
    Some(format!("switchyard-{}", crate::api::VERSION))
}

/// The chat prompt: the template with a generation prompt (default), or, with
/// `continue_final_message` (and `add_generation_prompt: false`, which vLLM requires),
/// without one and cut after the final message's text (vLLM's and transformers' way), so
/// the model continues that message.
pub(crate) fn render_chat(
    engine: &Engine,
    messages: &[ChatMessage],
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
) -> Result<String, ApiError> {
    let cont = continue_final_message.unwrap_or(false);
    if cont && add_generation_prompt == Some(true) {
        return Err(ApiError::validation(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            None,
        ));
    }
    let add_generation_prompt = add_generation_prompt.unwrap_or(true);
    if cont && add_generation_prompt {
        // vLLM's default generation prompt left on: transformers refuses the render.
        return Err(ApiError::bad_request(
            "continue_final_message and add_generation_prompt are not compatible. Use \
             continue_final_message when you want the model to continue the final message, \
             and add_generation_prompt when you want to add a header that will prompt it to \
             start a new assistant message instead.",
            None,
        ));
    }
    let text = engine
        .tokenizer
        .apply_chat_template(messages, add_generation_prompt)
        .map_err(|e| ApiError::bad_request(e, None))?;
    if !cont {
        return Ok(text);
    }
    let last = messages
        .last()
        .and_then(|m| m.content.as_ref())
        .map(|c| c.text())
        .unwrap_or_default();
    tokenizer::template::continue_final_message(&text, &last)
        .map_err(|e| ApiError::bad_request(e, None))
}

pub async fn chat_completions(
    State(engine): State<Engine>,
    req: Request,
) -> Result<Response, ErrorResponse> {
    let body: ChatCompletionRequest = read_json_probed::<_, SamplingFields>(&engine, req).await?;
    let lora = engine.resolve_model(body.model.as_deref()).await?;
    if body.messages.is_empty() {
        return Err(ApiError::validation(
            "messages must contain at least one message",
            Some("body.messages"),
        )
        .into());
    }
    let text = render_chat(
        &engine,
        &body.messages,
        body.add_generation_prompt,
        body.continue_final_message,
    )?;
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
    crate::api::lora::check_no_transfer(lora.as_deref(), s.kv_transfer_params.as_ref())?;
    let mut pd_plan = super::pd::plan(
        &engine,
        s.kv_transfer_params.as_ref(),
        &prompt,
        v.n,
        s.stream.unwrap_or(false),
    )
    .await?;
    let model = match &lora {
        Some(a) => a.name.clone(),
        None => engine.model_name().to_string(),
    };
    let mut choices = Choices::start(
        &engine,
        prompt,
        v,
        "chatcmpl",
        pd_plan.transfer.take(),
        lora,
    )?;

    if !s.stream.unwrap_or(false) {
        let done = choices.collect().await?;
        let completion_tokens = done.iter().map(|d| d.tokens).sum();
        let kv_transfer_params = pd_plan.response_params(&engine).await;
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
            kv_transfer_params,
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
    let lora = engine.resolve_model(body.model.as_deref()).await?;
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
    crate::api::lora::check_no_transfer(lora.as_deref(), s.kv_transfer_params.as_ref())?;
    let mut pd_plan = super::pd::plan(
        &engine,
        s.kv_transfer_params.as_ref(),
        &prompt,
        v.n,
        s.stream.unwrap_or(false),
    )
    .await?;
    let model = match &lora {
        Some(a) => a.name.clone(),
        None => engine.model_name().to_string(),
    };
    let mut choices = Choices::start(&engine, prompt, v, "cmpl", pd_plan.transfer.take(), lora)?;

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
            kv_transfer_params: None,
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
        r.kv_transfer_params = pd_plan.response_params(&engine).await;
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
