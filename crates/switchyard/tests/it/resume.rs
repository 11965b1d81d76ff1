//! Mid-stream failover end to end: an engine killed (SIGKILL) or frozen (SIGSTOP) while
//! it streams an answer through the router; the client gets one unbroken stream equal
//! to an uninterrupted run's, and the router counts what it resumed and what it could not.

use std::process::Command;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::{client, metric, Proc};

const ENGINE_HEADER: &str = "x-switchyard-engine";

/// A streamed answer as the client saw it.
#[derive(Debug, Default)]
struct Seen {
    text: String,
    ids: Vec<String>,
    models: Vec<String>,
    created: Vec<u64>,
    roles: usize,
    finish: Option<String>,
    usage: Option<Value>,
    done: bool,
    /// The body ended with an error (a cut the client noticed).
    cut: bool,
}

impl Seen {
    fn frame(&mut self, data: &str) {
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        self.ids.push(v["id"].as_str().unwrap_or("").to_string());
        self.models
            .push(v["model"].as_str().unwrap_or("").to_string());
        self.created.push(v["created"].as_u64().unwrap_or(0));
        if !v["usage"].is_null() {
            self.usage = Some(v["usage"].clone());
        }
        let Some(ch) = v["choices"].get(0) else {
            return;
        };
        if ch["delta"]["role"].is_string() {
            self.roles += 1;
        }
        let piece = ch["text"].as_str().or(ch["delta"]["content"].as_str());
        self.text.push_str(piece.unwrap_or(""));
        if let Some(f) = ch["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
    }
}

/// Stream `body` to `path` at `base`; once `after` content frames arrived, run `fault`
/// with the serving engine's `host:port` (once). Returns what the client saw.
async fn stream(
    base: &str,
    path: &str,
    body: &Value,
    after: usize,
    mut fault: impl FnMut(&str),
) -> Seen {
    let c = client();
    let resp = c
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let engine = resp
        .headers()
        .get(ENGINE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut seen = Seen::default();
    let mut buf = Vec::new();
    let mut frames = 0;
    let mut faulted = false;
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let Ok(chunk) = chunk else {
            seen.cut = true;
            break;
        };
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buf.drain(..i + 2).collect();
            let frame = std::str::from_utf8(&frame).expect("utf-8 frame");
            let data = frame
                .trim_end()
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data frame: {frame:?}"));
            seen.frame(data);
            frames += 1;
        }
        if !faulted && frames > after {
            faulted = true;
            fault(&engine);
        }
    }
    assert!(
        buf.is_empty(),
        "a partial frame reached the client: {buf:?}"
    );
    seen
}

fn signal(p: &Proc, sig: &str) {
    let pid = p.child.id().to_string();
    let _ = Command::new("kill").args([sig, &pid]).status();
}

/// Two sim engines (decode ≈ 6 ms a token) behind a router that calls a 1 s silence a
/// stall. The engines are SIGKILLed on drop, frozen or not.
fn stack() -> (Vec<Proc>, Proc) {
    let engines = vec![Proc::engine(&[]), Proc::engine(&[])];
    let backends: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
    let router = Proc::router(&backends, &["--stream-stall-timeout-secs", "1"]);
    (engines, router)
}

fn by_host<'a>(engines: &'a [Proc], host: &str) -> &'a Proc {
    engines
        .iter()
        .find(|e| e.host_port() == host)
        .unwrap_or_else(|| panic!("no engine {host}"))
}

async fn resumes(router: &Proc, outcome: &str) -> f64 {
    let page = client()
        .get(router.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    metric(
        &page,
        "vllm:router_stream_resumes_total",
        &[("outcome", outcome)],
    )
    .unwrap_or(-1.0)
}

fn completion() -> Value {
    json!({"model":"switchyard-sim","prompt":"Once upon a time","max_tokens":200,
           "temperature":0,"seed":7,"ignore_eos":true,"stream":true,
           "stream_options":{"include_usage":true}})
}

fn chat() -> Value {
    json!({"model":"switchyard-sim","messages":[{"role":"user","content":"Tell me a story."}],
           "max_tokens":200,"temperature":0,"seed":11,"ignore_eos":true,"stream":true,
           "stream_options":{"include_usage":true}})
}

fn assert_one_answer(got: &Seen, want: &Seen) {
    assert!(!got.cut, "the client saw the cut");
    assert!(got.done, "no [DONE]");
    assert_eq!(got.text, want.text, "the spliced answer differs");
    assert_eq!(got.finish.as_deref(), Some("length"));
    assert!(got.ids.iter().all(|i| *i == got.ids[0]), "ids changed");
    assert!(got.models.iter().all(|m| *m == got.models[0]));
    assert!(got.created.iter().all(|c| *c == got.created[0]));
    assert!(got.roles <= 1, "a second role chunk reached the client");
    let u = got.usage.as_ref().expect("usage");
    let w = want.usage.as_ref().expect("usage");
    assert_eq!(u, w, "usage of the spliced answer");
}

#[tokio::test]
async fn a_killed_engine_s_answer_is_continued_on_another() {
    let (engines, router) = stack();
    let want = stream(&engines[0].url, "/v1/completions", &completion(), 0, |_| {}).await;
    assert!(want.text.split_whitespace().count() > 100, "{want:?}");
    let got = stream(&router.url, "/v1/completions", &completion(), 40, |host| {
        signal(by_host(&engines, host), "-KILL");
    })
    .await;
    assert_one_answer(&got, &want);
    assert_eq!(resumes(&router, "resumed").await, 1.0);
    assert_eq!(resumes(&router, "failed").await, 0.0);
}

#[tokio::test]
async fn a_frozen_engine_s_chat_answer_is_continued_on_another() {
    let (engines, router) = stack();
    let want = stream(&engines[1].url, "/v1/chat/completions", &chat(), 0, |_| {}).await;
    let got = stream(&router.url, "/v1/chat/completions", &chat(), 60, |host| {
        signal(by_host(&engines, host), "-STOP");
    })
    .await;
    assert_one_answer(&got, &want);
    assert_eq!(got.roles, 1);
    assert_eq!(resumes(&router, "resumed").await, 1.0);
    // `engines` drop here: SIGKILL ends the frozen one too.
}

#[tokio::test]
async fn a_stream_that_cannot_be_continued_is_cut_and_counted() {
    let (engines, router) = stack();
    let mut body = completion();
    body["n"] = json!(2);
    let got = stream(&router.url, "/v1/completions", &body, 20, |host| {
        signal(by_host(&engines, host), "-KILL");
    })
    .await;
    assert!(!got.done, "n=2 is not resumed: {got:?}");
    assert_eq!(resumes(&router, "not_resumable").await, 1.0);
    assert_eq!(resumes(&router, "resumed").await, 0.0);
    // With failover off, a resumable request is cut too, and not counted as anything.
    let engines = [Proc::engine(&[]), Proc::engine(&[])];
    let backends: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
    let router = Proc::router(&backends, &["--stream-resume-attempts", "0"]);
    let got = stream(&router.url, "/v1/completions", &completion(), 20, |host| {
        signal(by_host(&engines, host), "-KILL");
    })
    .await;
    assert!(!got.done);
}

#[tokio::test]
async fn an_engine_frozen_before_its_first_token_is_replaced() {
    // A slow prefill (about 1 s for this prompt) and a 1 s first-byte timeout: the
    // engine is frozen after its role chunk, before any token.
    let slow = ["--sim-prefill-us-per-token", "60000"];
    let engines = vec![Proc::engine(&slow), Proc::engine(&slow)];
    let backends: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
    let router = Proc::router(
        &backends,
        &[
            "--stream-stall-timeout-secs",
            "1",
            "--first-byte-timeout",
            "1",
        ],
    );
    let mut body = chat();
    body["max_tokens"] = json!(20);
    let want = stream(&engines[0].url, "/v1/chat/completions", &body, 0, |_| {}).await;
    let got = stream(&router.url, "/v1/chat/completions", &body, 0, |host| {
        signal(by_host(&engines, host), "-STOP");
    })
    .await;
    assert_one_answer(&got, &want);
    assert_eq!(got.roles, 1);
    assert_eq!(resumes(&router, "resumed").await, 1.0);
}
