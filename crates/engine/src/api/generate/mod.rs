//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, tokenize, submit to
//! the engine loop, and turn its token events into a JSON body or an SSE stream in
//! OpenAI's chunk format (vLLM's framing: `data: {...}\n\n`, then `data: [DONE]`).
//!
//! - [`handlers`]: the two endpoints (parse, validate, tokenize, submit, respond).
//! - [`output`]: output processing: a request's events to text pieces (incremental
//!   detokenization, stop strings, finish reasons, counts), the `n` parallel choices,
//!   log-probs formatting and usage; the abort guard that frees KV blocks early.
//! - [`stream`]: the SSE framing and the stream's state machine.
//! - [`pd`]: `kv_transfer_params` (P/D disaggregation): the prefill's lease, the
//!   decode's pull from the prefill engine's side channel.

mod handlers;
mod output;
mod pd;
mod stream;

pub(crate) use handlers::render_chat;
pub use handlers::{chat_completions, completions};
