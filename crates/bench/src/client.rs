//! One streaming request: send it, read the SSE stream as it arrives, and time it.
//!
//! TTFT is the time to the first event that carries generated text; ITL is each gap
//! between text-carrying events after that. Token counts come from the final `usage`
//! (`stream_options.include_usage`). Every way a request can go wrong maps to one
//! [`ErrorKind`]; nothing is dropped silently, and the one thing retried is a request
//! sent on a kept-alive connection the server had already closed (it never saw it).

use std::borrow::Cow;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{header, Method, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use memchr::memmem;
use serde::{Deserialize, Serialize};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No TCP connection could be made.
    Connect,
    /// The connection broke before response headers arrived.
    Disconnected,
    /// A 4xx answer.
    Http4xx,
    /// A 5xx answer.
    Http5xx,
    /// Any other non-2xx answer.
    HttpOther,
    /// The stream broke, or ended without a finish reason or `[DONE]`.
    Truncated,
    /// An `error` event inside the stream.
    StreamError,
    /// An event that is not the JSON we expect.
    Invalid,
    /// The request took longer than `--request-timeout`.
    Timeout,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::Http4xx => "http_4xx",
            ErrorKind::Http5xx => "http_5xx",
            ErrorKind::HttpOther => "http_other",
            ErrorKind::Truncated => "truncated",
            ErrorKind::StreamError => "stream_error",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Timeout => "timeout",
        }
    }
}

/// What one request measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Seconds from sending to the first text-carrying event.
    pub ttft: Option<f64>,
    /// Seconds from sending to the end (or the failure).
    pub e2e: f64,
    /// Seconds between consecutive text-carrying events.
    pub itl: Vec<f64>,
    pub prompt_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// Text-carrying events seen.
    pub chunks: u64,
    /// The generated text (kept only when asked: multi-round replays answers).
    pub text: String,
    pub error: Option<(ErrorKind, String)>,
}

pub fn http_client() -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(10)));
    conn.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4096)
        .build(conn)
}

/// A server in this process, reached without sockets: `switchyard plan`'s stack of sim
/// engines behind the router's policies, run in virtual time.
pub trait LocalServer: Send + Sync {
    /// Serve one streaming request to `path` (`user`: the session id the bench sends as
    /// `x-user-id`) and measure it as [`Target::stream`] does over HTTP.
    fn serve(
        &self,
        path: &str,
        body: Bytes,
        user: Option<&str>,
        keep_text: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'static>>;
}

/// The server under test.
#[derive(Clone)]
pub struct Target {
    pub client: HttpClient,
    /// Base URL without a trailing `/` or `/v1`.
    pub base: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
    /// Served in process instead of over HTTP.
    pub local: Option<std::sync::Arc<dyn LocalServer>>,
}

/// Why a request failed, and the detail.
pub type Fail = (ErrorKind, String);

impl Target {
    pub fn new(base_url: &str, api_key: Option<String>, timeout: Duration) -> Self {
        let mut base = base_url.trim_end_matches('/').to_string();
        if let Some(b) = base.strip_suffix("/v1") {
            base = b.to_string();
        }
        Target {
            client: http_client(),
            base,
            api_key,
            timeout,
            local: None,
        }
    }

    /// A target served in process by `server` (named `name` in reports).
    pub fn local(name: &str, server: std::sync::Arc<dyn LocalServer>, timeout: Duration) -> Self {
        Target {
            local: Some(server),
            ..Target::new(name, None, timeout)
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        user: Option<&str>,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let uri: Uri = format!("{}{}", self.base, path).parse()?;
        let mut b = Request::builder().method(method).uri(uri);
        if !body.is_empty() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(u) = user {
            b = b.header("x-user-id", u);
        }
        if let Some(k) = &self.api_key {
            b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        Ok(b.body(Full::new(body))?)
    }

    /// `GET path` (at most 30 s): the body of a 2xx answer, else an error naming it.
    pub async fn get(&self, path: &str) -> anyhow::Result<Bytes> {
        let req = self.request(Method::GET, path, Bytes::new(), None)?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| anyhow::anyhow!("GET {path} timed out"))??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(
            status.is_success(),
            "GET {path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok(body)
    }

    /// The first model the server lists (`GET /v1/models`).
    pub async fn first_model(&self) -> anyhow::Result<String> {
        #[derive(Deserialize)]
        struct List {
            data: Vec<Card>,
        }
        #[derive(Deserialize)]
        struct Card {
            id: String,
        }
        let body = self.get("/v1/models").await?;
        let list: List = serde_json::from_slice(&body)?;
        list.data
            .into_iter()
            .next()
            .map(|c| c.id)
            .ok_or_else(|| anyhow::anyhow!("GET /v1/models lists no model; pass --model"))
    }

    /// Send one streaming request to `path` and measure it. Never fails: a failure is
    /// recorded in the outcome.
    pub async fn stream(
        &self,
        path: &str,
        body: Bytes,
        user: Option<&str>,
        keep_text: bool,
    ) -> Outcome {
        let start = crate::now();
        let mut o = Outcome::default();
        let res = match &self.local {
            Some(local) => {
                let serving = local.serve(path, body, user, keep_text);
                tokio::time::timeout(self.timeout, serving)
                    .await
                    .map(|served| {
                        o = served;
                        Ok(())
                    })
            }
            None => {
                let inner = self.stream_inner(path, body, user, keep_text, start, &mut o);
                tokio::time::timeout(self.timeout, inner).await
            }
        };
        match res {
            Ok(Ok(())) => {}
            Ok(Err(f)) => o.error = Some(f),
            Err(_) => {
                o.error = Some((
                    ErrorKind::Timeout,
                    format!("no complete answer within {:?}", self.timeout),
                ))
            }
        }
        o.e2e = (crate::now() - start).as_secs_f64();
        o
    }

    async fn stream_inner(
        &self,
        path: &str,
        body: Bytes,
        user: Option<&str>,
        keep_text: bool,
        start: Instant,
        o: &mut Outcome,
    ) -> Result<(), Fail> {
        // A kept-alive connection the server closed after its last answer without saying
        // so (llama-server does after every stream) fails the next request sent on it
        // before a byte comes back: that request goes again, on another connection, up to
        // `SEND_TRIES` times. The server never answered it, so nothing is counted twice.
        let mut tries = 0;
        let resp = loop {
            tries += 1;
            let req = self
                .request(Method::POST, path, body.clone(), user)
                .map_err(|e| (ErrorKind::Connect, e.to_string()))?;
            match self.client.request(req).await {
                Ok(resp) => break resp,
                Err(e) if httpx::closed_unanswered(&e) && tries < SEND_TRIES => continue,
                Err(e) => {
                    let kind = if e.is_connect() {
                        ErrorKind::Connect
                    } else {
                        ErrorKind::Disconnected
                    };
                    return Err((kind, error_chain(&e)));
                }
            }
        };
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let kind = match status.as_u16() {
                400..=499 => ErrorKind::Http4xx,
                500..=599 => ErrorKind::Http5xx,
                _ => ErrorKind::HttpOther,
            };
            let mut text = Vec::new();
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    text.extend_from_slice(&d);
                    if text.len() > 4096 {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&text);
            return Err((kind, format!("{status}: {}", clip(&text, 300))));
        }
        let mut sse = SseParser::new(start, keep_text);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| (ErrorKind::Truncated, error_chain(&e)))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            sse.feed(&data, crate::now(), o)?;
        }
        sse.finish(crate::now(), o)
    }
}

/// An OpenAI stream's server-sent events, fed as the body's frames arrive (split
/// anywhere): text, TTFT/ITL, usage and errors go into an [`Outcome`]. Also a fuzz target
/// (`fuzz/fuzz_targets/sse.rs`: any split gives the same outcome as the whole).
pub struct SseParser {
    buf: BytesMut,
    state: SseState,
}

impl SseParser {
    pub fn new(start: Instant, keep_text: bool) -> Self {
        SseParser {
            buf: BytesMut::new(),
            state: SseState {
                start,
                last: None,
                done: false,
                finished: false,
                keep_text,
            },
        }
    }

    /// Take the next piece of the body; every complete event in it is applied to `o`.
    pub fn feed(&mut self, data: &[u8], now: Instant, o: &mut Outcome) -> Result<(), Fail> {
        self.buf.extend_from_slice(data);
        while let Some((end, skip)) = event_end(&self.buf) {
            let event = self.buf.split_to(end + skip);
            self.state.event(&event[..end], now, o)?;
        }
        Ok(())
    }

    /// The body ended: apply an unterminated last event, and fail a stream that never
    /// finished (no finish reason and no `[DONE]`).
    pub fn finish(&mut self, now: Instant, o: &mut Outcome) -> Result<(), Fail> {
        if !self.buf.iter().all(|b| b.is_ascii_whitespace()) {
            let rest = self.buf.split();
            self.state.event(&rest, now, o)?;
        }
        if !self.state.done && !self.state.finished {
            return Err((
                ErrorKind::Truncated,
                format!(
                    "stream ended after {} text events without a finish reason or [DONE]",
                    o.chunks
                ),
            ));
        }
        Ok(())
    }
}

/// The end of the first complete SSE event in `buf` and the delimiter's length.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memmem::find(buf, b"\n\n").map(|p| (p, 2));
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

struct SseState {
    start: Instant,
    last: Option<Instant>,
    done: bool,
    finished: bool,
    keep_text: bool,
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

impl SseState {
    fn event(&mut self, event: &[u8], now: Instant, o: &mut Outcome) -> Result<(), Fail> {
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(payload) = line.strip_prefix(b"data:") else {
                continue;
            };
            let payload = payload.trim_ascii();
            if payload == b"[DONE]" {
                self.done = true;
                continue;
            }
            if payload.is_empty() {
                continue;
            }
            let chunk: Chunk = serde_json::from_slice(payload).map_err(|e| {
                (
                    ErrorKind::Invalid,
                    format!("{e}: {}", clip(&String::from_utf8_lossy(payload), 200)),
                )
            })?;
            if let Some(err) = chunk.error {
                return Err((ErrorKind::StreamError, clip(&err.to_string(), 300)));
            }
            let mut has_text = false;
            for c in &chunk.choices {
                let piece = c
                    .delta
                    .as_ref()
                    .and_then(|d| {
                        d.content
                            .as_deref()
                            .filter(|s| !s.is_empty())
                            .or(d.reasoning_content.as_deref())
                    })
                    .or(c.text.as_deref())
                    .unwrap_or("");
                if !piece.is_empty() {
                    has_text = true;
                    if self.keep_text {
                        o.text.push_str(piece);
                    }
                }
                if c.finish_reason.is_some() {
                    self.finished = true;
                }
            }
            if has_text {
                o.chunks += 1;
                match self.last {
                    None => o.ttft = Some((now - self.start).as_secs_f64()),
                    Some(prev) => o.itl.push((now - prev).as_secs_f64()),
                }
                self.last = Some(now);
            }
            if let Some(u) = chunk.usage {
                o.prompt_tokens = u.prompt_tokens.or(o.prompt_tokens);
                o.output_tokens = u.completion_tokens.or(o.output_tokens);
            }
        }
        Ok(())
    }
}

/// Sends of one request before its failure to get an answer counts (see
/// [`httpx::closed_unanswered`]).
const SEND_TRIES: usize = 4;

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

pub fn clip(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(events: &[&str]) -> (Result<(), Fail>, Outcome, SseState) {
        let mut st = SseState {
            start: crate::now(),
            last: None,
            done: false,
            finished: false,
            keep_text: true,
        };
        let mut o = Outcome::default();
        for e in events {
            if let Err(f) = st.event(e.as_bytes(), crate::now(), &mut o) {
                return (Err(f), o, st);
            }
        }
        (Ok(()), o, st)
    }

    #[test]
    fn parses_chat_stream_with_usage() {
        let (r, o, st) = feed(&[
            r#"data: {"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
            r#"data: {"choices":[{"delta":{"content":" the"}}]}"#,
            r#"data: {"choices":[{"delta":{"content":" \"cat\""},"finish_reason":"length"}]}"#,
            r#"data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}}"#,
            "data: [DONE]",
        ]);
        r.unwrap();
        assert!(st.done && st.finished);
        assert_eq!(o.chunks, 2);
        assert!(o.ttft.is_some());
        assert_eq!(o.itl.len(), 1);
        assert_eq!(o.text, " the \"cat\"");
        assert_eq!((o.prompt_tokens, o.output_tokens), (Some(12), Some(2)));
    }

    #[test]
    fn completions_text_and_errors() {
        let (r, o, _) = feed(&[r#"data: {"choices":[{"text":"hi"}]}"#]);
        r.unwrap();
        assert_eq!(o.chunks, 1);
        let (r, _, _) = feed(&[r#"data: {"error":{"message":"boom"}}"#]);
        assert_eq!(r.unwrap_err().0, ErrorKind::StreamError);
        let (r, _, _) = feed(&["data: {not json"]);
        assert_eq!(r.unwrap_err().0, ErrorKind::Invalid);
    }

    #[test]
    fn finds_event_ends() {
        assert_eq!(event_end(b"data: x\n\ndata: y"), Some((7, 2)));
        assert_eq!(event_end(b"data: x\r\n\r\n"), Some((7, 4)));
        assert_eq!(event_end(b"data: x\n"), None);
    }

    #[test]
    fn base_url_forms() {
        let d = Duration::from_secs(1);
        assert_eq!(Target::new("http://h:1/v1/", None, d).base, "http://h:1");
        assert_eq!(Target::new("http://h:1", None, d).base, "http://h:1");
    }

    /// A server that closes each connection after one streamed answer, without
    /// `Connection: close` (llama-server's way): every request after the first lands on a
    /// closed connection and is sent again on a new one, so all succeed; a server that
    /// closes every connection unanswered still gets a `disconnected` failure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_kept_alive_connection_is_retried_not_counted() {
        use std::io::{Read, Write};
        fn serve(answer: bool) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}", l.local_addr().unwrap());
            let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let seen = conns.clone();
            std::thread::spawn(move || {
                for c in l.incoming() {
                    let Ok(mut c) = c else { return };
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    if answer {
                        let events = concat!(
                            "data: {\"choices\":[{\"index\":0,\"text\":\"hi\",\"finish_reason\":null}]}\n\n",
                            "data: {\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"length\"}],",
                            "\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\n",
                            "data: [DONE]\n\n"
                        );
                        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
                        let body = format!("{:x}\r\n{events}\r\n0\r\n\r\n", events.len());
                        let _ = c.write_all(format!("{head}{body}").as_bytes());
                        // Keep it open until the client reuses it, then close unanswered.
                        let _ = c.read(&mut buf);
                    }
                }
            });
            (base, conns)
        }
        let (base, conns) = serve(true);
        let t = Target::new(&base, None, Duration::from_secs(10));
        let body = Bytes::from_static(b"{\"prompt\":\"x\",\"stream\":true}");
        for i in 0..3 {
            let o = t.stream("/v1/completions", body.clone(), None, false).await;
            assert!(o.error.is_none(), "request {i}: {:?}", o.error);
            assert_eq!(o.output_tokens, Some(1));
        }
        assert!(conns.load(std::sync::atomic::Ordering::SeqCst) >= 3);
        let (base, conns) = serve(false);
        let t = Target::new(&base, None, Duration::from_secs(10));
        let o = t.stream("/v1/completions", body, None, false).await;
        assert_eq!(o.error.map(|e| e.0), Some(ErrorKind::Disconnected));
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), SEND_TRIES);
    }
}
