//! Request validation with vLLM's wording: sampling parameters, token limits and the
//! context window. Everything here is a pure function of the request and the limits.

use protocol::openai::SamplingFields;
use protocol::ApiError;

use crate::core::SamplingParams;
use crate::generation::GenerationDefaults;

/// The most parallel choices (`n`) one request may ask for: each is a sequence in the
/// engine, so the bound keeps one request from flooding the queue.
pub const MAX_N: usize = 128;

/// Validated sampling settings plus the stop strings the API layer enforces.
#[derive(Debug, Clone)]
pub struct Validated {
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Parallel choices (`n`), 1 to [`MAX_N`].
    pub n: usize,
}

/// Check a prompt's length against the context window.
pub fn check_prompt_len(prompt_len: usize, max_model_len: usize) -> Result<(), ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::bad_request(
            "The prompt is empty.",
            Some("input_tokens"),
        ));
    }
    if prompt_len > max_model_len {
        return Err(ApiError::bad_param(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your prompt contains at least {prompt_len} input tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input prompt"
            ),
            "input_tokens",
            prompt_len,
        ));
    }
    if prompt_len == max_model_len {
        return Err(ApiError::bad_param(
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your prompt contains {prompt_len} input tokens, which leaves no room for output tokens. Please reduce the length of the input prompt"
            ),
            "input_tokens",
            prompt_len,
        ));
    }
    Ok(())
}

/// Validate the sampling fields. `max_tokens` is the effective request value (chat's
/// `max_completion_tokens` wins over `max_tokens`).
/// Most alternatives per token (vLLM's default `--max-logprobs`).
pub const MAX_LOGPROBS: i64 = 20;

/// `logprobs` as asked: chat's `logprobs: true` + `top_logprobs: k`, completions'
/// `logprobs: k`. `None`: not asked.
pub fn logprobs(
    flag: Option<bool>,
    top: Option<i64>,
    param: &str,
) -> Result<Option<u32>, ApiError> {
    if let Some(k) = top {
        if !(0..=MAX_LOGPROBS).contains(&k) {
            return Err(ApiError::bad_param(
                format!("{param} must be between 0 and {MAX_LOGPROBS}, got {k}"),
                param,
                k,
            ));
        }
    }
    Ok(match (flag, top) {
        (Some(false), Some(k)) if k > 0 => {
            return Err(ApiError::bad_request(
                "when using `top_logprobs`, `logprobs` must be set to true.",
                Some("top_logprobs"),
            ))
        }
        (Some(true), k) => Some(k.unwrap_or(0) as u32),
        (None, Some(k)) => Some(k as u32),
        _ => None,
    })
}

/// Fields the request leaves out take `defaults` (`--generation-config`), then vLLM's.
pub fn sampling(
    s: &SamplingFields,
    max_tokens: Option<i64>,
    prompt_len: usize,
    max_model_len: usize,
    defaults: &GenerationDefaults,
) -> Result<Validated, ApiError> {
    if let Some(v) = max_tokens {
        if v < 1 {
            return Err(ApiError::bad_param(
                format!("max_tokens must be at least 1, got {v}"),
                "max_tokens",
                v,
            ));
        }
        if v as u64 > max_model_len as u64 {
            return Err(ApiError::bad_param(
                format!("max_tokens={v} cannot be greater than max_model_len={max_model_len}. Please request fewer output tokens"),
                "max_tokens",
                v,
            ));
        }
    }
    if let Some(n) = s.n {
        if n < 1 {
            return Err(ApiError::bad_param(
                format!("n must be at least 1, got {n}."),
                "n",
                n,
            ));
        }
        if n > MAX_N as i64 {
            return Err(ApiError::bad_param(
                format!("n must be at most {MAX_N}, got {n}."),
                "n",
                n,
            ));
        }
    }
    let temperature = s.temperature.or(defaults.temperature).unwrap_or(1.0);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(ApiError::bad_param(
            format!("temperature must be non-negative, got {temperature}"),
            "temperature",
            temperature,
        ));
    }
    let top_p = s.top_p.or(defaults.top_p).unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_param(
            format!("top_p must be in (0, 1], got {top_p}"),
            "top_p",
            top_p,
        ));
    }
    let top_k = match s.top_k.or(defaults.top_k) {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 && k <= u32::MAX as i64 => Some(k as u32),
        Some(k) => {
            return Err(ApiError::bad_param(
                format!("top_k must be 0, -1 (disable), or at least 1, got {k}"),
                "top_k",
                k,
            ));
        }
    };
    let min_p = s.min_p.or(defaults.min_p).unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::bad_param(
            format!("min_p must be in [0, 1], got {min_p}"),
            "min_p",
            min_p,
        ));
    }
    let repetition_penalty = s
        .repetition_penalty
        .or(defaults.repetition_penalty)
        .unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 2.0) {
        return Err(ApiError::bad_param(
            format!("repetition_penalty must be in (0, 2], got {repetition_penalty}"),
            "repetition_penalty",
            repetition_penalty,
        ));
    }
    let penalty = |v: Option<f64>, name: &str| match v.unwrap_or(0.0) {
        p if (-2.0..=2.0).contains(&p) => Ok(p),
        p => Err(ApiError::bad_param(
            format!("{name} must be in [-2, 2], got {p}"),
            name,
            p,
        )),
    };
    let frequency_penalty = penalty(s.frequency_penalty, "frequency_penalty")?;
    let presence_penalty = penalty(s.presence_penalty, "presence_penalty")?;
    let room = max_model_len.saturating_sub(prompt_len);
    let max_tokens = max_tokens
        .or(defaults.max_new_tokens)
        .map(|v| v as usize)
        .unwrap_or(room)
        .min(room);
    let min_tokens = s.min_tokens.unwrap_or(0);
    if min_tokens < 0 {
        return Err(ApiError::bad_param(
            format!("min_tokens must be greater than or equal to 0, got {min_tokens}"),
            "min_tokens",
            min_tokens,
        ));
    }
    if min_tokens as u64 > max_tokens as u64 {
        return Err(ApiError::bad_param(
            format!("min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}"),
            "min_tokens",
            min_tokens,
        ));
    }
    let stop = s.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad_request(
            "stop cannot contain an empty string.",
            Some("stop"),
        ));
    }
    Ok(Validated {
        params: SamplingParams {
            max_tokens,
            min_tokens: min_tokens as usize,
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
            logprobs: None,
            seed: s.seed.map(|v| v as u64),
            ignore_eos: s.ignore_eos.unwrap_or(false),
            stop_token_ids: s.stop_token_ids.clone().unwrap_or_default(),
        },
        stop,
        n: s.n.map_or(1, |n| n as usize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_wording_for_bad_max_tokens() {
        let s = SamplingFields::default();
        let e = sampling(&s, Some(-5), 10, 2048, &GenerationDefaults::default()).unwrap_err();
        assert_eq!(
            e.body.message,
            "max_tokens must be at least 1, got -5. (parameter=max_tokens, value=-5)"
        );
        assert_eq!(
            (e.status, e.body.kind.as_str(), e.body.param.as_deref()),
            (400, "BadRequestError", Some("max_tokens"))
        );
        let e = sampling(&s, Some(5000), 10, 2048, &GenerationDefaults::default()).unwrap_err();
        assert_eq!(
            e.body.message,
            "max_tokens=5000 cannot be greater than max_model_len=2048. Please request fewer output tokens. (parameter=max_tokens, value=5000)"
        );
    }

    #[test]
    fn output_is_capped_by_the_context() {
        let v = sampling(
            &SamplingFields::default(),
            Some(100),
            2000,
            2048,
            &GenerationDefaults::default(),
        )
        .unwrap();
        assert_eq!(v.params.max_tokens, 48);
        let v = sampling(
            &SamplingFields::default(),
            None,
            2000,
            2048,
            &GenerationDefaults::default(),
        )
        .unwrap();
        assert_eq!(v.params.max_tokens, 48);
    }

    #[test]
    fn prompt_too_long_matches_vllm() {
        let e = check_prompt_len(2049, 2048).unwrap_err();
        assert!(e.body.message.starts_with("This model's maximum context length is 2048 tokens. However, your prompt contains at least 2049 input tokens"));
        assert_eq!(e.body.param.as_deref(), Some("input_tokens"));
    }
}
