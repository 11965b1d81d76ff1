//! Streaming: a response's choices as Server-Sent Events in OpenAI's chunk format, with
//! vLLM's framing (`data: {...}\n\n`, then `data: [DONE]`).

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use protocol::openai::Usage;
use protocol::ApiError;

use super::output::{usage, Choices, Piece};

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

pub(super) fn frame<T: serde::Serialize>(v: &T) -> Bytes {
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

/// Where a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Frames of the choices' pieces as they come; after the last, the usage frame (when
    /// asked for) or `[DONE]`.
    Pieces,
    /// Only `[DONE]` is left (after the usage frame or an error frame).
    Done,
    /// Everything is sent.
    Ended,
}

/// The state of a stream after its head frames: the merged choices and what is owed.
struct Tail<M, P, U> {
    merged: M,
    /// Each choice's completion tokens so far (for the usage frame).
    tokens: Vec<u32>,
    prompt_tokens: u32,
    piece_frame: P,
    usage_frame: Option<U>,
    phase: Phase,
}

impl<M, P, U> Tail<M, P, U>
where
    M: futures_util::Stream<Item = (usize, Result<Piece, ApiError>, u32)> + Unpin,
    P: FnMut(usize, Piece) -> Bytes,
    U: FnOnce(Usage) -> Bytes,
{
    /// The next frame; `None` once the stream has ended.
    async fn next_frame(&mut self) -> Option<Bytes> {
        use futures_util::StreamExt;
        match self.phase {
            Phase::Pieces => match self.merged.next().await {
                Some((i, Ok(piece), n)) => {
                    self.tokens[i] = n;
                    Some((self.piece_frame)(i, piece))
                }
                Some((_, Err(e), _)) => {
                    self.usage_frame = None;
                    self.phase = Phase::Done;
                    Some(error_frame(&e))
                }
                None => match self.usage_frame.take() {
                    Some(u) => {
                        self.phase = Phase::Done;
                        Some(u(usage(self.prompt_tokens, self.tokens.iter().sum())))
                    }
                    None => {
                        self.phase = Phase::Ended;
                        Some(Bytes::from_static(DONE))
                    }
                },
            },
            Phase::Done => {
                self.phase = Phase::Ended;
                Some(Bytes::from_static(DONE))
            }
            Phase::Ended => None,
        }
    }
}

impl Choices {
    /// A streamed response: `head` frames, then a frame per piece of any choice as it
    /// comes (`piece_frame(choice, piece)`), then, when `usage_frame` is given, one with
    /// the usage summed over the choices, then `[DONE]`. An error sends an error frame
    /// and `[DONE]` and ends the stream, which aborts the other choices.
    pub(super) fn stream(
        self,
        head: Vec<Bytes>,
        piece_frame: impl FnMut(usize, Piece) -> Bytes + Send + 'static,
        usage_frame: Option<impl FnOnce(Usage) -> Bytes + Send + 'static>,
    ) -> Response {
        use futures_util::StreamExt;
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
        let tail = Tail {
            merged,
            tokens,
            prompt_tokens: self.prompt_tokens,
            piece_frame,
            usage_frame,
            phase: Phase::Pieces,
        };
        let tail = futures_util::stream::unfold(tail, |mut t| async move {
            let frame = t.next_frame().await?;
            Some((frame, t))
        });
        sse_response(
            futures_util::stream::iter(head)
                .chain(tail)
                .map(Ok::<_, Infallible>),
        )
    }
}
