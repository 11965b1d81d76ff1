//! Mid-stream failover: when the engine serving a streamed completion dies or stalls
//! after part of the answer reached the client, continue the answer on another engine
//! and splice its stream onto the client's, so the client sees one unbroken answer.
//!
//! [`ResumableBody`] wraps the proxy's observed upstream body. While the answer flows it
//! passes SSE frames through unchanged (only aligned to frame boundaries, so a cut never
//! leaves half a frame with the client) and reads each one: the original `id`,
//! `created` and `model`, the text sent so far, the number of content events (≈ tokens)
//! and whether a `finish_reason` or `data: [DONE]` came. When the upstream body errors,
//! ends early, or sends nothing for `--stream-stall-timeout-secs` once tokens flow
//! (before the first token: `--first-byte-timeout`), it asks the next healthy engine of
//! the request's ranking not yet tried for a continuation:
//! - `/v1/completions`: `prompt` = the original prompt + the text so far;
//! - `/v1/chat/completions`: the messages + `{"role":"assistant","content": text}` with
//!   `continue_final_message: true, add_generation_prompt: false` (vLLM's way to continue
//!   a message; an original that already continues an assistant message gets the text
//!   appended to it);
//!
//! with `max_tokens`/`max_completion_tokens` (and `min_tokens`) reduced by the events
//! already sent, everything else as the client sent it (seed, sampling, stop strings). A
//! last event of only whitespace is left out of the prompt (re-tokenized, it would merge
//! with what follows) and its repeat dropped from the continuation.
//! The continuation's frames are rewritten to the original's `id`, `created` and `model`
//! (chat: its role-only first chunk dropped; usage: the already-sent events moved from
//! prompt to completion tokens) and the stream ends with `[DONE]` as usual.
//!
//! Only `stream: true` completions and chat with one choice, no log-probabilities, no
//! `echo`/`best_of`/`suffix`, no tools or structured output, and a text prompt qualify
//! ([`qualifies`], checked from the body once per streamed request); the others are
//! passed through as before and counted as `not_resumable`. Memory is bounded: the text
//! kept is at most [`MAX_TEXT`] bytes and a partial frame at most [`MAX_PENDING`]; past
//! either the stream is passed through unparsed and no longer resumable. The normal path
//! costs a copy of the request's headers per request and, per frame, `memchr` scans of
//! compact JSON (the content's escaped text appended as it is); JSON is parsed for the
//! first frame and re-serialized only after a resume.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::Full;
use memchr::memmem;
use protocol::prom::{Counter, TextWriter};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::engines::{EjectCause, Endpoint};
use crate::proxy::{is_hop_by_hop, Forward, ObservedBody, Observer, Proxy};
use crate::upstream::{self, REQUEST_ID, TRACEPARENT, TRACESTATE};

/// Most text kept per stream for a continuation (bytes); past it, not resumable.
pub const MAX_TEXT: usize = 1 << 20;
/// Longest partial SSE frame held back waiting for its end (bytes).
pub const MAX_PENDING: usize = 256 * 1024;

/// Settings and counters, one per router.
#[derive(Debug, Default)]
pub struct Resume {
    /// Continuations per request (0: off).
    pub attempts: u32,
    /// No frame for this long, once tokens flow, counts as a stall (None: never).
    pub stall: Option<Duration>,
    pub resumed: Counter,
    pub failed: Counter,
    pub not_resumable: Counter,
}

/// Which generate endpoint a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completions,
    Chat,
}

impl Kind {
    /// The generate endpoint `path_and_query` names, if any.
    pub fn of(path_and_query: &str) -> Option<Kind> {
        let path = path_and_query.split('?').next().unwrap_or("");
        match path {
            "/v1/completions" => Some(Kind::Completions),
            "/v1/chat/completions" => Some(Kind::Chat),
            _ => None,
        }
    }
}

/// The body fields that decide whether a stream can be continued elsewhere; the rest is
/// skipped unparsed.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    best_of: Option<u64>,
    #[serde(default, borrow)]
    logprobs: Option<&'a RawValue>,
    #[serde(default)]
    top_logprobs: Option<u64>,
    #[serde(default)]
    prompt_logprobs: Option<u64>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default, borrow)]
    suffix: Option<&'a RawValue>,
    #[serde(default, borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(default, borrow)]
    messages: Option<&'a RawValue>,
    #[serde(default, borrow)]
    tools: Option<&'a RawValue>,
    #[serde(default, borrow)]
    response_format: Option<&'a RawValue>,
    #[serde(default, borrow)]
    guided_json: Option<&'a RawValue>,
    #[serde(default, borrow)]
    guided_regex: Option<&'a RawValue>,
    #[serde(default, borrow)]
    guided_choice: Option<&'a RawValue>,
    #[serde(default, borrow)]
    guided_grammar: Option<&'a RawValue>,
    #[serde(default, borrow)]
    structured_outputs: Option<&'a RawValue>,
}

fn is_set(v: Option<&RawValue>) -> bool {
    v.is_some_and(|r| !matches!(r.get(), "null" | "false" | "[]"))
}

/// Whether a streamed request of `kind` with this body can be continued on another
/// engine: one choice, no log-probabilities, `echo`, `best_of` or `suffix`, no tools or
/// structured output (a grammar would restart), a text prompt (completions).
pub fn qualifies(kind: Kind, body: &[u8]) -> bool {
    let Ok(f) = serde_json::from_slice::<Fields<'_>>(body) else {
        return false;
    };
    let text_format = f.response_format.is_none_or(|r| {
        r.get() == "null"
            || serde_json::from_str::<Value>(r.get())
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(|t| t == "text"))
                .unwrap_or(false)
    });
    let input = match kind {
        Kind::Completions => f.prompt.is_some_and(|p| p.get().starts_with('"')),
        Kind::Chat => f.messages.is_some_and(|m| m.get().starts_with('[')),
    };
    input
        && f.n.unwrap_or(1) == 1
        && f.best_of.unwrap_or(1) <= 1
        && !is_set(f.logprobs)
        && f.top_logprobs.is_none()
        && f.prompt_logprobs.is_none()
        && !f.echo.unwrap_or(false)
        && !is_set(f.suffix)
        && !is_set(f.tools)
        && text_format
        && !is_set(f.guided_json)
        && !is_set(f.guided_regex)
        && !is_set(f.guided_choice)
        && !is_set(f.guided_grammar)
        && !is_set(f.structured_outputs)
}

impl Resume {
    pub fn render_metrics(&self, w: &mut TextWriter) {
        const N: &str = "vllm:router_stream_resumes_total";
        w.header(
            N,
            "counter",
            "Streams cut mid-answer (engine died or stalled) and continued on another engine \
             (resumed), that could not be continued (failed), and streamed completions the \
             router would not continue, counted when they arrive (not_resumable)",
        );
        for (outcome, c) in [
            ("resumed", &self.resumed),
            ("failed", &self.failed),
            ("not_resumable", &self.not_resumable),
        ] {
            w.sample(N, &[("outcome", outcome)], c.get() as f64);
        }
    }
}

/// What a continuation needs to reach another engine.
pub struct Origin {
    pub kind: Kind,
    pub method: Method,
    pub path_and_query: String,
    /// The client's headers minus hop-by-hop ones, `content-length` and trace context.
    pub headers: HeaderMap,
    pub body: Bytes,
    pub request_id: HeaderValue,
    /// The request's trace context header for the continuation (a new child span).
    pub traceparent: HeaderValue,
    /// The policy's ranking; engines already tried are skipped.
    pub ranked: Vec<Arc<Endpoint>>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub failure_threshold: u32,
}

/// The continuation context for a response about to stream to the client, when the
/// request can be resumed; counts a streamed completion that cannot as `not_resumable`.
pub(crate) fn origin(
    proxy: &Proxy,
    f: &Forward<'_>,
    ranked: &[Arc<Endpoint>],
    status: StatusCode,
) -> Option<Origin> {
    let r = &proxy.resume;
    if r.attempts == 0 || !f.stream || status != StatusCode::OK {
        return None;
    }
    let kind = Kind::of(f.path_and_query)?;
    let body = f.resume_body.as_ref().unwrap_or(&f.body);
    if !qualifies(kind, body) {
        r.not_resumable.inc();
        return None;
    }
    Some(Origin {
        kind,
        method: f.method.clone(),
        path_and_query: f.path_and_query.to_string(),
        headers: forward_headers(f.headers, f.trace.keeps_state()),
        body: body.clone(),
        request_id: f.request_id.clone(),
        traceparent: f.trace.header_for(crate::observe::trace::new_id()),
        ranked: ranked.to_vec(),
        connect_timeout: proxy.connect_timeout,
        first_byte_timeout: proxy.first_byte_timeout,
        failure_threshold: proxy.failure_threshold,
    })
}

/// Copy the headers a continuation forwards (as the proxy's first attempt does).
pub fn forward_headers(h: &HeaderMap, keep_tracestate: bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(h.len());
    for (name, value) in h {
        if !is_hop_by_hop(name)
            && name != header::CONTENT_LENGTH
            && name.as_str() != TRACEPARENT
            && (keep_tracestate || name.as_str() != TRACESTATE)
        {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// What `poll_frame` answers.
type Polled = Poll<Option<Result<Frame<Bytes>, axum::BoxError>>>;

type Connecting =
    Pin<Box<dyn Future<Output = Result<(ObservedBody, Arc<Endpoint>), String>> + Send>>;

/// The client's response body: the upstream stream, continued on another engine when
/// it is cut.
pub struct ResumableBody {
    inner: Option<ObservedBody>,
    connecting: Option<Connecting>,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the current upstream last sent something.
    last_activity: tokio::time::Instant,
    resume: Arc<Resume>,
    origin: Box<Origin>,
    /// Engines that served (or failed) this request.
    tried: Vec<Arc<Endpoint>>,
    acc: Accounting,
    /// Bytes of an incomplete frame held back.
    pending: BytesMut,
    /// Continuations made so far.
    resumes: u32,
    /// Frames after a continuation are rewritten (ids, role chunk, usage).
    spliced: bool,
    /// The current continuation's role-only chunk is still to be dropped (chat).
    drop_role: bool,
    /// Events sent before the current continuation began that are in its prompt.
    base_events: u64,
    /// Text sent to the client but held back from the continuation's prompt (trailing
    /// whitespace, whose tokens merge differently when re-tokenized): the continuation
    /// writes it again first, and that is dropped.
    skip: String,
    /// Parsing stopped (limits passed): frames go through untouched, no resume.
    passthrough: bool,
    /// The text limit passed after a resume: frames are still rewritten, no resume.
    full: bool,
    /// The current upstream has sent a token: from then on a silence of
    /// `--stream-stall-timeout-secs` is a stall (before it, the wait is the prefill,
    /// allowed the first-byte timeout).
    flowing: bool,
    /// Send `[DONE]` then end (a cut after the finish, or a continuation with nothing
    /// left to generate).
    closing: Option<Bytes>,
    ended: bool,
}

/// What the client has been sent so far.
#[derive(Debug, Default)]
struct Accounting {
    id: Option<String>,
    created: Option<u64>,
    model: Option<String>,
    object: Option<String>,
    /// The content sent: the JSON-escaped bodies of its strings, concatenated as they
    /// came (unescaped only for a continuation).
    raw: Vec<u8>,
    /// Where the last content event starts in `raw`.
    last_start: usize,
    events: u64,
    finished: bool,
    done: bool,
    /// The identity was read from a first frame.
    identified: bool,
    /// Frames are not compact JSON: each is parsed instead of scanned.
    loose: bool,
}

#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    object: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    choices: First<'a>,
}

/// The first of `choices`, the rest skipped unparsed (no allocation per frame).
#[derive(Default)]
struct First<'a>(Option<ChoiceView<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for First<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = First<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<First<'a>, A::Error> {
                let first = seq.next_element::<ChoiceView<'a>>()?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(First(first))
            }
            fn visit_unit<E>(self) -> Result<First<'a>, E> {
                Ok(First(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<DeltaView<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(default, borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

/// One complete SSE event's `data:` payload, if it has one.
fn data_of(frame: &[u8]) -> Option<&[u8]> {
    // The usual frame: one `data: ` line.
    if let Some(d) = frame.strip_prefix(b"data: ") {
        if let Some(i) = memchr::memchr(b'\n', d) {
            if d.get(i + 1).is_none_or(|&c| c == b'\n' || c == b'\r') {
                let line = &d[..i];
                return Some(line.strip_suffix(b"\r").unwrap_or(line));
            }
        }
    }
    frame.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let d = line.strip_prefix(b"data:")?;
        Some(d.strip_prefix(b" ").unwrap_or(d))
    })
}

/// What one frame says, for the accounting and the splice.
#[derive(Debug, Default, PartialEq)]
struct Seen<'a> {
    content: Option<Cow<'a, str>>,
    role_only: bool,
    finish: bool,
    done: bool,
}

impl Accounting {
    /// Read one complete frame and count its content; false when the text limit is
    /// passed. Compact JSON (what vLLM and Switchyard write) is scanned, not parsed: the
    /// content's escaped string is copied as it is.
    fn read(&mut self, frame: &[u8]) -> bool {
        if self.loose || !self.identified {
            let seen = self.parse(frame);
            return seen.content.as_deref().is_none_or(|t| self.add(t));
        }
        let Some(data) = data_of(frame) else {
            return true;
        };
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
            return true;
        }
        if FINISH.find(data).is_some() {
            self.finished = true;
        }
        let piece = json_string_at(data, &CONTENT).or_else(|| json_string_at(data, &TEXT));
        match piece {
            Some(p) if !p.is_empty() => self.add_raw(p),
            _ => true,
        }
    }

    /// Count one content event given as text; false when the text limit is passed.
    fn add(&mut self, t: &str) -> bool {
        match serde_json::to_string(t) {
            Ok(quoted) => self.add_raw(&quoted.as_bytes()[1..quoted.len() - 1]),
            Err(_) => false,
        }
    }

    /// Count one content event given as an escaped JSON string body.
    fn add_raw(&mut self, escaped: &[u8]) -> bool {
        self.events += 1;
        if self.raw.len() + escaped.len() > MAX_TEXT {
            return false;
        }
        self.last_start = self.raw.len();
        self.raw.extend_from_slice(escaped);
        true
    }

    /// The text sent so far.
    fn text(&self) -> Option<String> {
        unescape(&self.raw)
    }

    /// The last content event's text.
    fn last_piece(&self) -> Option<String> {
        unescape(&self.raw[self.last_start..])
    }

    /// What one complete frame says (identity kept from the first one).
    fn parse<'a>(&mut self, frame: &'a [u8]) -> Seen<'a> {
        let mut seen = Seen::default();
        let Some(data) = data_of(frame) else {
            return seen;
        };
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
            seen.done = true;
            return seen;
        }
        let Ok(c) = serde_json::from_slice::<ChunkView<'_>>(data) else {
            return seen;
        };
        if !self.identified {
            self.identified = c.id.is_some();
            self.loose = memmem::find(data, b"\": ").is_some();
            self.id = c.id.map(Cow::into_owned);
            self.created = c.created;
            self.model = c.model.map(Cow::into_owned);
            self.object = c.object.map(Cow::into_owned);
        }
        let Some(ch) = c.choices.0 else {
            return seen;
        };
        let (content, role) = match ch.delta {
            Some(d) => (d.content, d.role.is_some()),
            None => (ch.text, false),
        };
        let content = content.filter(|t| !t.is_empty());
        seen.finish = ch.finish_reason.is_some();
        seen.role_only = role && content.is_none() && !seen.finish;
        if seen.finish {
            self.finished = true;
        }
        seen.content = content;
        seen
    }
}

static FINISH: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"finish_reason\":\""));
static CONTENT: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"content\":\""));
static TEXT: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"text\":\""));
static FRAME_END: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\n\n"));

/// The escaped body of the JSON string that follows the first `key` (`"name":"`).
fn json_string_at<'a>(data: &'a [u8], key: &memmem::Finder<'_>) -> Option<&'a [u8]> {
    let start = key.find(data)? + key.needle().len();
    let mut i = start;
    loop {
        i += memchr::memchr2(b'"', b'\\', data.get(i..)?)?;
        if data[i] == b'"' {
            return Some(&data[start..i]);
        }
        i += 2;
    }
}

/// The text of an escaped JSON string body.
fn unescape(escaped: &[u8]) -> Option<String> {
    let mut quoted = Vec::with_capacity(escaped.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(escaped);
    quoted.push(b'"');
    serde_json::from_slice(&quoted).ok()
}

/// The end of the last complete frame in `b` (after its blank line), if any.
fn last_boundary(b: &[u8]) -> Option<usize> {
    if b.ends_with(b"\n\n") {
        return Some(b.len());
    }
    memmem::rfind(b, b"\n\n").map(|i| i + 2)
}

impl ResumableBody {
    pub(crate) fn new(
        inner: ObservedBody,
        served_by: Arc<Endpoint>,
        resume: Arc<Resume>,
        origin: Origin,
    ) -> Self {
        let mut body = ResumableBody {
            inner: Some(inner),
            connecting: None,
            stall: None,
            last_activity: tokio::time::Instant::now(),
            resume,
            origin: Box::new(origin),
            tried: vec![served_by],
            acc: Accounting::default(),
            pending: BytesMut::new(),
            resumes: 0,
            spliced: false,
            drop_role: false,
            base_events: 0,
            skip: String::new(),
            passthrough: false,
            full: false,
            flowing: false,
            closing: None,
            ended: false,
        };
        body.arm_stall();
        body
    }

    /// The silence allowed: `--stream-stall-timeout-secs` once tokens flow; before the
    /// first token (the prompt's prefill) the longer first-byte timeout.
    fn silence(&self) -> Option<Duration> {
        let stall = self.resume.stall?;
        Some(if self.flowing {
            stall
        } else {
            self.origin.first_byte_timeout.max(stall)
        })
    }

    /// Note upstream activity. The timer is not moved per frame: when it fires early it
    /// is set again from the last activity (`poll_stall`).
    fn arm_stall(&mut self) {
        let Some(d) = self.silence() else { return };
        self.last_activity = tokio::time::Instant::now();
        if self.stall.is_none() {
            self.stall = Some(Box::pin(tokio::time::sleep_until(self.last_activity + d)));
        }
    }

    /// Tokens started to flow: the (shorter) stall timeout applies from now.
    fn tighten_stall(&mut self) {
        if let (Some(d), Some(s)) = (self.silence(), &mut self.stall) {
            s.as_mut().reset(self.last_activity + d);
        }
    }

    /// Whether the upstream has been silent for longer than allowed (registers the
    /// waker otherwise).
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(d) = self.silence() else {
            return false;
        };
        let deadline = self.last_activity + d;
        let Some(s) = &mut self.stall else {
            return false;
        };
        loop {
            if s.as_mut().poll(cx).is_pending() {
                return false;
            }
            if tokio::time::Instant::now() >= deadline {
                return true;
            }
            s.as_mut().reset(deadline);
        }
    }

    /// Handle data from upstream: what to send the client now (maybe nothing).
    fn on_data(&mut self, data: Bytes) -> Option<Bytes> {
        if self.passthrough {
            return Some(data);
        }
        // Whole frames only go out; a trailing partial one waits for its end.
        let mut buf = if self.pending.is_empty() {
            BytesMut::new()
        } else {
            std::mem::take(&mut self.pending)
        };
        let complete: Bytes = if buf.is_empty() {
            match last_boundary(&data) {
                Some(end) if end == data.len() => data,
                Some(end) => {
                    self.pending.extend_from_slice(&data[end..]);
                    data.slice(..end)
                }
                None => {
                    self.pending.extend_from_slice(&data);
                    Bytes::new()
                }
            }
        } else {
            buf.extend_from_slice(&data);
            match last_boundary(&buf) {
                Some(end) => {
                    let whole = buf.split_to(end).freeze();
                    self.pending = buf;
                    whole
                }
                None => {
                    self.pending = buf;
                    Bytes::new()
                }
            }
        };
        if self.pending.len() > MAX_PENDING {
            return Some(self.stop_parsing(complete));
        }
        if complete.is_empty() {
            return None;
        }
        if !self.spliced {
            for frame in FrameIter(&complete) {
                if !self.acc.read(frame) {
                    self.passthrough = true;
                    break;
                }
            }
            return Some(complete);
        }
        let mut out = BytesMut::with_capacity(complete.len() + 64);
        for frame in FrameIter(&complete) {
            let seen = self.acc.parse(frame);
            if self.drop_role && seen.role_only {
                self.drop_role = false;
                continue;
            }
            if seen.content.is_some() || seen.finish {
                self.drop_role = false;
            }
            let mut replaced = None;
            if let Some(t) = seen.content.as_deref() {
                let rest = self.unskip(t);
                if rest.is_empty() && !seen.finish {
                    continue;
                }
                if !rest.is_empty() && !self.full && !self.acc.add(rest) {
                    // Past the text limit: no further resume, but frames keep the
                    // original's identity.
                    self.full = true;
                }
                if rest.len() != t.len() {
                    replaced = Some(rest.to_string());
                }
            }
            self.rewrite(frame, replaced.as_deref(), &mut out);
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    /// What of a continuation's content `t` is new to the client: the text held back from
    /// the continuation's prompt (and already sent) comes again first and is dropped.
    fn unskip<'t>(&mut self, t: &'t str) -> &'t str {
        if self.skip.is_empty() {
            return t;
        }
        if let Some(rest) = t.strip_prefix(self.skip.as_str()) {
            self.skip.clear();
            rest
        } else if let Some(left) = self.skip.strip_prefix(t) {
            self.skip = left.to_string();
            ""
        } else {
            tracing::debug!(held = ?self.skip, got = ?t, "the continuation did not repeat the held-back text");
            self.skip.clear();
            t
        }
    }

    /// Give up parsing: send what is held back as it is, from now on untouched.
    fn stop_parsing(&mut self, complete: Bytes) -> Bytes {
        self.passthrough = true;
        let mut out = BytesMut::from(&complete[..]);
        out.extend_from_slice(&self.pending);
        self.pending.clear();
        out.freeze()
    }

    /// A continuation's frame with the original's identity (and usage with the events
    /// sent before it counted as completion tokens).
    fn rewrite(&self, frame: &[u8], content: Option<&str>, out: &mut BytesMut) {
        let Some(data) = data_of(frame) else {
            out.extend_from_slice(frame);
            return;
        };
        let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(data) else {
            out.extend_from_slice(frame);
            return;
        };
        if let (Some(id), true) = (&self.acc.id, m.contains_key("id")) {
            m.insert("id".into(), Value::from(id.as_str()));
        }
        if let (Some(c), true) = (self.acc.created, m.contains_key("created")) {
            m.insert("created".into(), Value::from(c));
        }
        if let (Some(model), true) = (&self.acc.model, m.contains_key("model")) {
            m.insert("model".into(), Value::from(model.as_str()));
        }
        if let Some(ch) = content.and_then(|_| m.get_mut("choices")?.get_mut(0)) {
            let t = Value::from(content.unwrap_or_default());
            match ch.get_mut("delta") {
                Some(d) => d["content"] = t,
                None => ch["text"] = t,
            }
        }
        if let Some(Value::Object(u)) = m.get_mut("usage") {
            let moved = self.base_events;
            let get = |u: &Map<String, Value>, k: &str| u.get(k).and_then(Value::as_u64);
            if let (Some(p), Some(c)) = (get(u, "prompt_tokens"), get(u, "completion_tokens")) {
                u.insert("prompt_tokens".into(), Value::from(p.saturating_sub(moved)));
                u.insert("completion_tokens".into(), Value::from(c + moved.min(p)));
            }
        }
        out.extend_from_slice(b"data: ");
        if serde_json::to_writer(BytesMutWriter(out), &Value::Object(m)).is_err() {
            return;
        }
        out.extend_from_slice(b"\n\n");
    }

    fn can_resume(&self) -> bool {
        !self.passthrough && !self.full && self.resumes < self.resume.attempts && !self.acc.done
    }

    /// An engine of the ranking not tried yet takes requests now (healthy, breaker not
    /// open): somewhere a continuation could go.
    fn untried_engine_serves(&self) -> bool {
        self.origin.ranked.iter().any(|e| {
            e.is_healthy()
                && e.breaker.state() != crate::engines::breaker::State::Open
                && !self.tried.iter().any(|t| Arc::ptr_eq(t, e))
        })
    }

    /// The stream was cut (`why`): resume, or say how it ends.
    fn on_cut(&mut self, why: &str) -> Option<Polled> {
        self.inner = None;
        self.stall = None;
        self.flowing = false;
        if self.acc.done {
            return Some(Poll::Ready(None));
        }
        if self.acc.finished {
            // The answer is complete; only the end marker was lost.
            self.closing = Some(Bytes::from_static(b"data: [DONE]\n\n"));
            return None;
        }
        if !self.can_resume() {
            self.resume.failed.inc();
            tracing::warn!(request_id = ?self.origin.request_id, reason = why, "stream cut and not resumed");
            return Some(Poll::Ready(Some(Err(format!(
                "upstream stream cut: {why}"
            )
            .into()))));
        }
        let body = match continuation(&self.origin, &self.acc) {
            Ok(Some(c)) => {
                self.base_events = self.acc.events - u64::from(!c.held.is_empty());
                self.skip = c.held;
                c.body
            }
            Ok(None) => {
                // Every allowed token was sent: end as the engine would have.
                self.resume.resumed.inc();
                self.closing = Some(finish_frame(self.origin.kind, &self.acc));
                return None;
            }
            Err(e) => {
                self.resume.failed.inc();
                tracing::warn!(request_id = ?self.origin.request_id, error = %e, "stream cut; no continuation possible");
                return Some(Poll::Ready(Some(Err(format!(
                    "upstream stream cut: {why}"
                )
                .into()))));
            }
        };
        self.pending.clear();
        self.resumes += 1;
        let candidates: Vec<Arc<Endpoint>> = self
            .origin
            .ranked
            .iter()
            .filter(|e| e.is_healthy() && !self.tried.iter().any(|t| Arc::ptr_eq(t, e)))
            .cloned()
            .collect();
        tracing::info!(request_id = ?self.origin.request_id, reason = why, sent_events = self.acc.events, "stream cut; continuing on another engine");
        let o = &self.origin;
        let req = Attempt {
            method: o.method.clone(),
            path_and_query: o.path_and_query.clone(),
            headers: o.headers.clone(),
            request_id: o.request_id.clone(),
            traceparent: o.traceparent.clone(),
            connect_timeout: o.connect_timeout,
            first_byte_timeout: o.first_byte_timeout,
            failure_threshold: o.failure_threshold,
        };
        self.connecting = Some(Box::pin(req.run(candidates, body)));
        None
    }
}

/// SSE frames (each ending with its blank line) in a buffer of whole frames.
struct FrameIter<'a>(&'a [u8]);

impl<'a> Iterator for FrameIter<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.0.is_empty() {
            return None;
        }
        let end = FRAME_END.find(self.0).map_or(self.0.len(), |i| i + 2);
        let (frame, rest) = self.0.split_at(end);
        self.0 = rest;
        Some(frame)
    }
}

struct BytesMutWriter<'a>(&'a mut BytesMut);

impl std::io::Write for BytesMutWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A final chunk with `finish_reason: "length"` and `[DONE]`, for a stream cut after
/// its last allowed token but before its finish.
fn finish_frame(kind: Kind, acc: &Accounting) -> Bytes {
    let choice = match kind {
        Kind::Completions => serde_json::json!({"index": 0, "text": "", "logprobs": null,
            "finish_reason": "length", "stop_reason": null}),
        Kind::Chat => serde_json::json!({"index": 0, "delta": {"content": ""}, "logprobs": null,
            "finish_reason": "length", "stop_reason": null}),
    };
    let object = acc.object.clone().unwrap_or_else(|| {
        match kind {
            Kind::Completions => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        }
        .into()
    });
    let v = serde_json::json!({"id": acc.id, "object": object, "created": acc.created,
        "model": acc.model, "choices": [choice]});
    Bytes::from(format!("data: {v}\n\ndata: [DONE]\n\n"))
}

/// Errors building a continuation (the stream then ends cut, as without resuming).
#[derive(Debug, thiserror::Error)]
pub enum ContinuationError {
    #[error("the request body is not a JSON object")]
    NotObject,
    #[error("the prompt is not a string")]
    Prompt,
    #[error("the messages are not a list")]
    Messages,
    #[error("the final message to continue has no text content")]
    FinalMessage,
    #[error("the text sent is not valid JSON string content")]
    Text,
}

/// A continuation request.
#[derive(Debug)]
struct Continuation {
    body: Bytes,
    /// The end of the text sent, left out of the prompt for the engine to write again.
    held: String,
}

/// The continuation request's body: the original with the text so far appended, token
/// limits reduced by the events sent; `None` when no token is left to generate. A last
/// event of only whitespace is held back (its tokens would merge with what follows when
/// the engine re-tokenizes the prompt, which changes a greedy answer): the engine
/// generates it again.
fn continuation(o: &Origin, acc: &Accounting) -> Result<Option<Continuation>, ContinuationError> {
    let all = acc.text().ok_or(ContinuationError::Text)?;
    let last = acc.last_piece().ok_or(ContinuationError::Text)?;
    if all.is_empty() {
        // Nothing reached the client yet: send the request as it was.
        return Ok(Some(Continuation {
            body: o.body.clone(),
            held: String::new(),
        }));
    }
    let hold = !last.is_empty() && last.len() < all.len() && last.chars().all(char::is_whitespace);
    let (text, held) = if hold {
        all.split_at(all.len() - last.len())
    } else {
        (all.as_str(), "")
    };
    let events = acc.events - u64::from(hold);
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(&o.body) else {
        return Err(ContinuationError::NotObject);
    };
    match o.kind {
        Kind::Completions => {
            let Some(Value::String(p)) = m.get_mut("prompt") else {
                return Err(ContinuationError::Prompt);
            };
            p.push_str(text);
        }
        Kind::Chat => {
            let continuing = m
                .get("continue_final_message")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let Some(Value::Array(msgs)) = m.get_mut("messages") else {
                return Err(ContinuationError::Messages);
            };
            if continuing {
                let Some(Value::String(c)) = msgs.last_mut().and_then(|l| l.get_mut("content"))
                else {
                    return Err(ContinuationError::FinalMessage);
                };
                c.push_str(text);
            } else {
                msgs.push(serde_json::json!({"role": "assistant", "content": text}));
            }
            m.insert("continue_final_message".into(), Value::Bool(true));
            m.insert("add_generation_prompt".into(), Value::Bool(false));
        }
    }
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(left) = m.get(key).and_then(Value::as_u64) {
            let left = left.saturating_sub(acc.events);
            if left == 0 {
                return Ok(None);
            }
            m.insert(key.into(), Value::from(left + u64::from(hold)));
        }
    }
    if let Some(min) = m.get("min_tokens").and_then(Value::as_u64) {
        m.insert("min_tokens".into(), Value::from(min.saturating_sub(events)));
    }
    m.insert("stream".into(), Value::Bool(true));
    let body = serde_json::to_vec(&Value::Object(m)).map_err(|_| ContinuationError::NotObject)?;
    Ok(Some(Continuation {
        body: Bytes::from(body),
        held: held.to_string(),
    }))
}

/// One continuation's trip to the engines left, in ranking order.
struct Attempt {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    request_id: HeaderValue,
    traceparent: HeaderValue,
    connect_timeout: Duration,
    first_byte_timeout: Duration,
    failure_threshold: u32,
}

impl Attempt {
    async fn run(
        self,
        candidates: Vec<Arc<Endpoint>>,
        body: Bytes,
    ) -> Result<(ObservedBody, Arc<Endpoint>), String> {
        let client = upstream::thread_client(self.connect_timeout);
        let mut last = String::from("no other healthy engine serves the model");
        for ep in candidates {
            let uri: Uri = match format!("{}{}", ep.url, self.path_and_query).parse() {
                Ok(u) => u,
                Err(e) => {
                    last = format!("bad upstream URI: {e}");
                    continue;
                }
            };
            let make = || {
                let mut req = Request::new(Full::new(body.clone()));
                *req.method_mut() = self.method.clone();
                *req.uri_mut() = uri.clone();
                let h = req.headers_mut();
                for (name, value) in &self.headers {
                    h.append(name.clone(), value.clone());
                }
                h.insert(HeaderName::from_static(REQUEST_ID), self.request_id.clone());
                h.insert(
                    HeaderName::from_static(TRACEPARENT),
                    self.traceparent.clone(),
                );
                req
            };
            let obs = Observer::start(ep.clone(), true);
            match tokio::time::timeout(self.first_byte_timeout, client.send(make)).await {
                Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                    return Ok((ObservedBody::fresh(resp.into_body(), obs), ep));
                }
                Ok(Ok(resp)) => {
                    obs.failed();
                    if resp.status().is_server_error() {
                        ep.record_failure(self.failure_threshold, EjectCause::Traffic);
                    }
                    last = format!("{} answered {}", ep.url, resp.status());
                }
                Ok(Err(e)) => {
                    obs.failed();
                    ep.record_failure(self.failure_threshold, EjectCause::Traffic);
                    last = format!("{}: {e}", ep.url);
                }
                Err(_) => {
                    obs.failed();
                    last = format!("{} did not answer in time", ep.url);
                }
            }
        }
        Err(last)
    }
}

impl HttpBody for ResumableBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            if let Some(c) = this.closing.take() {
                this.ended = true;
                return Poll::Ready(Some(Ok(Frame::data(c))));
            }
            if let Some(conn) = &mut this.connecting {
                match conn.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok((body, ep))) => {
                        this.connecting = None;
                        this.inner = Some(body);
                        this.tried.push(ep);
                        this.resume.resumed.inc();
                        this.spliced = true;
                        this.drop_role = this.origin.kind == Kind::Chat;
                        this.arm_stall();
                        continue;
                    }
                    Poll::Ready(Err(e)) => {
                        this.connecting = None;
                        this.resume.failed.inc();
                        this.ended = true;
                        tracing::warn!(request_id = ?this.origin.request_id, error = %e, "stream cut; the continuation failed");
                        return Poll::Ready(Some(Err(format!(
                            "upstream stream cut; continuation failed: {e}"
                        )
                        .into())));
                    }
                }
            }
            let Some(inner) = &mut this.inner else {
                this.ended = true;
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(other) => return Poll::Ready(Some(Ok(other))),
                    };
                    let before = this.acc.events;
                    let out = this.on_data(data);
                    this.arm_stall();
                    if !this.flowing && this.acc.events > before {
                        this.flowing = true;
                        this.tighten_stall();
                    }
                    if let Some(out) = out {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let why = e.to_string();
                    if let Some(ep) = this.tried.last() {
                        ep.record_failure(this.origin.failure_threshold, EjectCause::Traffic);
                    }
                    if let Some(p) = this.on_cut(&why) {
                        this.ended = true;
                        return p;
                    }
                }
                Poll::Ready(None) => {
                    if this.acc.done || this.passthrough {
                        this.ended = true;
                        let rest = std::mem::take(&mut this.pending);
                        if !rest.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(rest.freeze()))));
                        }
                        return Poll::Ready(None);
                    }
                    if let Some(p) = this.on_cut("the engine ended the stream early") {
                        this.ended = true;
                        return p;
                    }
                }
                Poll::Pending => {
                    if this.poll_stall(cx) {
                        // Silence alone does not count against the engine (a long
                        // prefill step of a busy CPU engine is silence too): its health
                        // checks decide whether it is alive. And with no other engine to
                        // continue on, the stream keeps waiting on this one.
                        let elsewhere = this.can_resume() && this.untried_engine_serves();
                        if !elsewhere {
                            this.last_activity = tokio::time::Instant::now();
                            if let (Some(d), Some(st)) = (this.silence(), &mut this.stall) {
                                st.as_mut().reset(this.last_activity + d);
                            }
                            continue;
                        }
                        if let Some(p) = this.on_cut("the engine stalled") {
                            this.ended = true;
                            return p;
                        }
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// `b` cut at the offsets `at` (for tests of split frames).
#[cfg(test)]
fn chunks(b: &[u8], at: &[usize]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut prev = 0;
    for &i in at.iter().chain(std::iter::once(&b.len())) {
        out.push(Bytes::copy_from_slice(&b[prev..i]));
        prev = i;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualifying_requests() {
        let c = Kind::Completions;
        assert!(qualifies(
            c,
            br#"{"model":"m","prompt":"hi","stream":true}"#
        ));
        assert!(qualifies(
            c,
            br#"{"prompt":"hi","n":1,"logprobs":null,"echo":false}"#
        ));
        assert!(!qualifies(c, br#"{"prompt":"hi","n":2}"#));
        assert!(!qualifies(c, br#"{"prompt":"hi","logprobs":1}"#));
        assert!(!qualifies(c, br#"{"prompt":"hi","echo":true}"#));
        assert!(!qualifies(c, br#"{"prompt":[1,2,3]}"#));
        assert!(!qualifies(c, b"not json"));
        let chat = Kind::Chat;
        assert!(qualifies(
            chat,
            br#"{"messages":[{"role":"user","content":"hi"}]}"#
        ));
        assert!(qualifies(
            chat,
            br#"{"messages":[],"logprobs":false,"response_format":{"type":"text"}}"#
        ));
        assert!(!qualifies(chat, br#"{"messages":[],"logprobs":true}"#));
        assert!(!qualifies(chat, br#"{"messages":[],"top_logprobs":2}"#));
        assert!(!qualifies(
            chat,
            br#"{"messages":[],"response_format":{"type":"json_object"}}"#
        ));
        assert!(!qualifies(
            chat,
            br#"{"messages":[],"tools":[{"type":"function"}]}"#
        ));
        assert_eq!(Kind::of("/v1/completions?id=x"), Some(Kind::Completions));
        assert_eq!(Kind::of("/v1/embeddings"), None);
    }

    #[test]
    fn accounting_reads_text_events_and_ends() {
        let mut a = Accounting::default();
        let role = br#"data: {"id":"c1","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert!(a.parse(role).role_only);
        assert_eq!(a.id.as_deref(), Some("c1"));
        a.read(br#"data: {"id":"c1","choices":[{"delta":{"content":" he\"llo"}}]}"#);
        a.read(
            br#"data: {"id":"c1","choices":[{"delta":{"content":" you"},"finish_reason":null}]}"#,
        );
        assert_eq!(a.text().unwrap(), " he\"llo you");
        assert_eq!(a.events, 2);
        assert!(!a.finished);
        a.read(br#"data: {"choices":[{"delta":{"content":""},"finish_reason":"stop"}]}"#);
        assert!(a.finished);
        a.read(b"data: [DONE]");
        assert!(a.done);
    }

    #[test]
    fn scanned_and_parsed_frames_read_alike() {
        let frames: [&[u8]; 4] = [
            br#"data: {"id":"c","choices":[{"index":0,"text":"a\"b\\","finish_reason":null}]}"#,
            br#"data: {"id":"c","choices":[{"index":0,"text":"\u00e9\n","logprobs":null}]}"#,
            br#"data: {"id":"c","choices":[{"index":0,"text":"","finish_reason":"length"}]}"#,
            b"data: [DONE]",
        ];
        let mut compact = Accounting::default();
        for f in frames {
            assert!(compact.read(f));
        }
        assert!(!compact.loose);
        let mut loose = Accounting::default();
        for f in frames {
            let spaced = String::from_utf8(f.to_vec())
                .unwrap()
                .replace("\":", "\": ");
            assert!(loose.read(spaced.as_bytes()));
        }
        assert!(loose.loose);
        for a in [&compact, &loose] {
            assert_eq!(a.text().unwrap(), "a\"b\\\u{e9}\n");
            assert_eq!(a.last_piece().unwrap(), "\u{e9}\n");
            assert_eq!(a.events, 2);
            assert!(a.finished && a.done);
        }
        assert_eq!(
            json_string_at(br#"{"text":"x\\"}"#, &TEXT),
            Some(&br"x\\"[..])
        );
        assert_eq!(json_string_at(br#"{"text":"unterminated"#, &TEXT), None);
        assert_eq!(data_of(b"data: {}\r\n\r\n"), Some(&b"{}"[..]));
        assert_eq!(
            data_of(b": keep-alive\ndata: [DONE]\n\n"),
            Some(&b"[DONE]"[..])
        );
        assert_eq!(data_of(b"event: x\n\n"), None);
    }

    /// The wrapper's cost per frame on the normal path (run with `--release --ignored
    /// --nocapture`).
    #[test]
    #[ignore]
    fn cost_per_frame() {
        let frames: Vec<Bytes> = (0..64)
            .map(|i| {
                Bytes::from(format!(
                    "data: {{\"id\":\"cmpl-1f0c4b7e\",\"object\":\"text_completion\",\"created\":1764730000,\"model\":\"switchyard-sim\",\"choices\":[{{\"index\":0,\"text\":\" w{i}\",\"logprobs\":null,\"finish_reason\":null,\"stop_reason\":null}}],\"usage\":null}}\n\n"
                ))
            })
            .collect();
        let rounds = 5000;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            let mut b = test_body();
            for f in &frames {
                std::hint::black_box(b.on_data(f.clone()));
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / (rounds * frames.len()) as f64;
        println!("{ns:.0} ns per frame");
    }

    fn origin(kind: Kind, body: &str) -> Origin {
        Origin {
            kind,
            method: Method::POST,
            path_and_query: "/v1/completions".into(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
            request_id: HeaderValue::from_static("r"),
            traceparent: HeaderValue::from_static("t"),
            ranked: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            failure_threshold: 3,
        }
    }

    #[test]
    fn continuations_append_the_text_and_reduce_the_limits() {
        let mut acc = Accounting::default();
        for piece in [" w", "o", "r"] {
            assert!(acc.add(piece));
        }
        let o = origin(
            Kind::Completions,
            r#"{"prompt":"Hello","max_tokens":10,"min_tokens":2,"seed":7,"stream":true}"#,
        );
        let b = continuation(&o, &acc).unwrap().unwrap();
        assert!(b.held.is_empty());
        let v: Value = serde_json::from_slice(&b.body).unwrap();
        assert_eq!(v["prompt"], "Hello wor");
        assert_eq!(v["max_tokens"], 7);
        assert_eq!(v["min_tokens"], 0);
        assert_eq!(v["seed"], 7);

        let o = origin(
            Kind::Chat,
            r#"{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":3}"#,
        );
        assert!(continuation(&o, &acc).unwrap().is_none(), "nothing left");
        let o = origin(
            Kind::Chat,
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        );
        let v: Value =
            serde_json::from_slice(&continuation(&o, &acc).unwrap().unwrap().body).unwrap();
        assert_eq!(v["messages"][1]["role"], "assistant");
        assert_eq!(v["messages"][1]["content"], " wor");
        assert_eq!(v["continue_final_message"], true);
        assert_eq!(v["add_generation_prompt"], false);
        // A request already continuing a message gets the text appended to it.
        let o = origin(
            Kind::Chat,
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"Sure,"}],"continue_final_message":true,"add_generation_prompt":false}"#,
        );
        let v: Value =
            serde_json::from_slice(&continuation(&o, &acc).unwrap().unwrap().body).unwrap();
        assert_eq!(v["messages"].as_array().unwrap().len(), 2);
        assert_eq!(v["messages"][1]["content"], "Sure, wor");
        let o = origin(Kind::Completions, r#"{"prompt":[1,2]}"#);
        assert!(continuation(&o, &acc).is_err());
    }

    #[test]
    fn frames_split_across_chunks_are_reassembled() {
        let stream = b"data: {\"id\":\"a\",\"choices\":[{\"text\":\"x\"}]}\n\ndata: {\"id\":\"a\",\"choices\":[{\"text\":\"y\"}]}\n\ndata: [DONE]\n\n";
        for cut in 1..stream.len() {
            let mut b = test_body();
            let mut out = Vec::new();
            for c in chunks(stream, &[cut]) {
                if let Some(o) = b.on_data(c) {
                    out.extend_from_slice(&o);
                }
            }
            assert_eq!(out, stream, "cut at {cut}");
            assert_eq!(b.acc.text().unwrap(), "xy");
            assert!(b.acc.done);
            assert!(b.pending.is_empty());
        }
    }

    #[test]
    fn spliced_frames_get_the_original_identity() {
        let mut b = test_body();
        b.on_data(Bytes::from_static(
            b"data: {\"id\":\"orig\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\ndata: {\"id\":\"orig\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" a\"}}]}\n\n",
        ));
        b.spliced = true;
        b.drop_role = true;
        b.base_events = b.acc.events;
        let out = b
            .on_data(Bytes::from_static(
                b"data: {\"id\":\"new\",\"created\":9,\"model\":\"m2\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\ndata: {\"id\":\"new\",\"created\":9,\"model\":\"m2\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" b\"}}]}\n\ndata: {\"id\":\"new\",\"created\":9,\"model\":\"m2\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":4,\"total_tokens\":15}}\n\ndata: [DONE]\n\n",
            ))
            .unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        let frames: Vec<&str> = text.split("\n\n").filter(|f| !f.is_empty()).collect();
        assert_eq!(frames.len(), 3, "{text}");
        let v: Value = serde_json::from_str(&frames[0]["data: ".len()..]).unwrap();
        assert_eq!(v["id"], "orig");
        assert_eq!(v["created"], 1);
        assert_eq!(v["model"], "m");
        assert_eq!(v["choices"][0]["delta"]["content"], " b");
        let u: Value = serde_json::from_str(&frames[1]["data: ".len()..]).unwrap();
        assert_eq!(u["usage"]["prompt_tokens"], 10);
        assert_eq!(u["usage"]["completion_tokens"], 5);
        assert_eq!(u["usage"]["total_tokens"], 15);
        assert_eq!(frames[2], "data: [DONE]");
        assert_eq!(b.acc.text().unwrap(), " a b");
    }

    #[test]
    fn trailing_whitespace_is_held_back_and_its_repeat_dropped() {
        let mut acc = Accounting::default();
        assert!(acc.add("Hello."));
        assert!(acc.add("\n\n"));
        let o = origin(
            Kind::Completions,
            r#"{"prompt":"Hi","max_tokens":10,"stream":true}"#,
        );
        let c = continuation(&o, &acc).unwrap().unwrap();
        assert_eq!(c.held, "\n\n");
        let v: Value = serde_json::from_slice(&c.body).unwrap();
        assert_eq!(v["prompt"], "HiHello.");
        assert_eq!(v["max_tokens"], 9, "the held-back token is generated again");

        let mut b = test_body();
        b.origin.kind = Kind::Completions;
        b.acc = acc;
        b.spliced = true;
        b.skip = c.held;
        let frame = |t: &str| {
            format!(
                "data: {}\n\n",
                serde_json::json!({"id":"x","choices":[{"text":t}]})
            )
        };
        assert_eq!(
            b.on_data(Bytes::from(frame("\n"))),
            None,
            "part of the held text"
        );
        let out = b.on_data(Bytes::from(frame("\nThe"))).unwrap();
        let v: Value =
            serde_json::from_str(std::str::from_utf8(&out).unwrap()["data: ".len()..].trim())
                .unwrap();
        assert_eq!(v["choices"][0]["text"], "The");
        assert_eq!(b.acc.text().unwrap(), "Hello.\n\nThe");
        assert_eq!(b.acc.events, 3);
        // Text that does not repeat the held part goes through as it is.
        b.skip = "\n".into();
        let out = b.on_data(Bytes::from(frame(" end"))).unwrap();
        assert!(std::str::from_utf8(&out).unwrap().contains("\" end\""));
        assert!(b.skip.is_empty());
    }

    /// A body in the accounting state only (no upstream), for the frame logic.
    fn test_body() -> ResumableBody {
        ResumableBody {
            inner: None,
            connecting: None,
            stall: None,
            last_activity: tokio::time::Instant::now(),
            resume: Arc::new(Resume::default()),
            origin: Box::new(origin(Kind::Chat, "{}")),
            tried: Vec::new(),
            acc: Accounting::default(),
            pending: BytesMut::new(),
            resumes: 0,
            spliced: false,
            drop_role: false,
            base_events: 0,
            skip: String::new(),
            passthrough: false,
            full: false,
            flowing: false,
            closing: None,
            ended: false,
        }
    }
}
