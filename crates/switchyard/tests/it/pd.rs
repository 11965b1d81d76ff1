//! Prefill/decode disaggregation through the router (`--routing-logic
//! disaggregated_prefill`, vLLM's NixlConnector contract): fake engines in the test
//! record what reaches them and answer as a prefill or decode engine would; a real router
//! runs as a process on loopback.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::common::{client, get_json, metric, read_request, Proc, RawRequest};

const MODEL: &str = "m";

/// How a fake engine answers POSTs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// A prefill engine: one token and its `kv_transfer_params`.
    Prefill,
    /// A prefill engine whose answer has no `kv_transfer_params` (LMCache-style P/D).
    PrefillNoParams,
    /// Answers 200 with a body that is not JSON.
    NotJson,
    /// A decode engine: the answer (streamed when asked), after `delay_ms`.
    Decode,
    /// Answers every request (health checks too) with this status.
    Status(u16),
    /// Reads the request and closes the connection without a byte.
    Drop,
    /// Streams two content events, then closes mid-stream.
    Cut,
}

#[derive(Clone, Debug)]
struct Seen {
    path: String,
    body: Value,
}

struct Fake {
    url: String,
    name: String,
    mode: Arc<Mutex<Mode>>,
    delay_ms: Arc<Mutex<u64>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// The parameters fake prefill engine `name` answers with.
fn params_of(name: &str) -> Value {
    json!({"do_remote_prefill": true, "do_remote_decode": false,
           "remote_engine_id": format!("engine-{name}"), "remote_block_ids": [3, 1, 4],
           "remote_host": "127.0.0.1", "remote_port": 5601, "tp_size": 1})
}

fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

impl Fake {
    async fn start(name: &str, mode: Mode) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let f = Fake {
            url,
            name: name.to_string(),
            mode: Arc::new(Mutex::new(mode)),
            delay_ms: Arc::new(Mutex::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
        };
        let (mode, delay, log, name) = (
            f.mode.clone(),
            f.delay_ms.clone(),
            f.seen.clone(),
            f.name.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (mode, delay, log, name) =
                    (mode.clone(), delay.clone(), log.clone(), name.clone());
                tokio::spawn(async move {
                    let mut r = BufReader::new(sock);
                    let Some(RawRequest {
                        method,
                        target: path,
                        body,
                        ..
                    }) = read_request(&mut r).await
                    else {
                        return;
                    };
                    let mode = *mode.lock().expect("lock");
                    let mut sock = r.into_inner();
                    let reply = |status: u16, v: Value| {
                        let b = v.to_string();
                        format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                            b.len()
                        )
                    };
                    if method != "POST" {
                        let out = match (mode, path.as_str()) {
                            (Mode::Status(s), _) => reply(s, json!({})),
                            (_, "/v1/models") => reply(
                                200,
                                json!({"object":"list","data":[{"id":MODEL,"object":"model"}]}),
                            ),
                            _ => reply(200, json!({})),
                        };
                        let _ = sock.write_all(out.as_bytes()).await;
                        let _ = sock.shutdown().await;
                        return;
                    }
                    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    log.lock().expect("lock").push(Seen {
                        path: path.clone(),
                        body: req.clone(),
                    });
                    let d = *delay.lock().expect("lock");
                    if d > 0 {
                        tokio::time::sleep(Duration::from_millis(d)).await;
                    }
                    let chat = path == "/v1/chat/completions";
                    let text = format!("decoded by {name}");
                    let out = match mode {
                        Mode::Status(s) => reply(
                            s,
                            json!({"error":{"message":format!("fake {name} says {s}"),"type":"BadRequestError","code":s}}),
                        ),
                        Mode::Drop => {
                            drop(sock);
                            return;
                        }
                        Mode::NotJson => {
                            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 8\r\nconnection: close\r\n\r\nnot json";
                            let _ = sock.write_all(head.as_bytes()).await;
                            let _ = sock.shutdown().await;
                            return;
                        }
                        Mode::Prefill | Mode::PrefillNoParams => {
                            let mut v = json!({"id":"cmpl-p","object":"text_completion","model":MODEL,
                                "choices":[{"index":0,"text":"x","finish_reason":"length"}],
                                "usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}});
                            if mode == Mode::Prefill {
                                v["kv_transfer_params"] = params_of(&name);
                            } else {
                                v["kv_transfer_params"] = Value::Null;
                            }
                            reply(200, v)
                        }
                        Mode::Decode | Mode::Cut => {
                            let stream = req["stream"].as_bool().unwrap_or(false);
                            if !stream {
                                let v = if chat {
                                    json!({"id":"chatcmpl-d","object":"chat.completion","model":MODEL,
                                        "choices":[{"index":0,"message":{"role":"assistant","content":text},"finish_reason":"stop"}]})
                                } else {
                                    json!({"id":"cmpl-d","object":"text_completion","model":MODEL,
                                        "choices":[{"index":0,"text":text,"finish_reason":"stop"}]})
                                };
                                reply(200, v)
                            } else {
                                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
                                let _ = sock.write_all(head.as_bytes()).await;
                                let event = |t: &str| {
                                    let v = if chat {
                                        json!({"id":"chatcmpl-d","object":"chat.completion.chunk","created":1,"model":MODEL,
                                            "choices":[{"index":0,"delta":{"content":t},"finish_reason":null}]})
                                    } else {
                                        json!({"id":"cmpl-d","object":"text_completion","created":1,"model":MODEL,
                                            "choices":[{"index":0,"text":t,"finish_reason":null}]})
                                    };
                                    chunk(&format!("data: {v}\n\n"))
                                };
                                for w in ["decoded", " by", &format!(" {name}")] {
                                    let _ = sock.write_all(event(w).as_bytes()).await;
                                    let _ = sock.flush().await;
                                    if mode == Mode::Cut && w == " by" {
                                        tokio::time::sleep(Duration::from_millis(50)).await;
                                        drop(sock);
                                        return;
                                    }
                                }
                                let _ = sock.write_all(chunk("data: [DONE]\n\n").as_bytes()).await;
                                let _ = sock.write_all(b"0\r\n\r\n").await;
                                let _ = sock.shutdown().await;
                                return;
                            }
                        }
                    };
                    let _ = sock.write_all(out.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        f
    }

    fn set_mode(&self, m: Mode) {
        *self.mode.lock().expect("lock") = m;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    fn clear(&self) {
        self.seen.lock().expect("lock").clear();
    }

    fn host_port(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }
}

/// A router over `prefill` then `decode` fakes, labelled `m-prefill` / `m-decode`.
fn pd_router(prefill: &[&Fake], decode: &[&Fake], extra: &[&str]) -> Proc {
    let urls: Vec<&str> = prefill
        .iter()
        .chain(decode)
        .map(|f| f.url.as_str())
        .collect();
    let labels: Vec<&str> = prefill
        .iter()
        .map(|_| "m-prefill")
        .chain(decode.iter().map(|_| "m-decode"))
        .collect();
    let models = vec![MODEL; urls.len()].join(",");
    let labels = labels.join(",");
    let mut args = vec![
        "--static-models",
        &models,
        "--static-model-labels",
        &labels,
        "--routing-logic",
        "disaggregated_prefill",
        "--prefill-model-labels",
        "m-prefill",
        "--decode-model-labels",
        "m-decode",
        "--engine-stats-interval",
        "3600",
    ];
    args.extend_from_slice(extra);
    Proc::router(&urls, &args)
}

/// What the prefill request must be, from the client's body.
fn expected_prefill(mut body: Value) -> Value {
    let o = body.as_object_mut().expect("object");
    o.insert("max_tokens".into(), json!(1));
    if o.contains_key("max_completion_tokens") {
        o.insert("max_completion_tokens".into(), json!(1));
    }
    o.insert("stream".into(), json!(false));
    o.remove("stream_options");
    o.remove("min_tokens");
    o.insert(
        "kv_transfer_params".into(),
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null}),
    );
    body
}

async fn page(c: &reqwest::Client, router: &Proc) -> String {
    c.get(router.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// The text of a router answer, streamed (SSE) or not.
fn answer_text(body: &str) -> String {
    if !body.starts_with("data:") {
        let v: Value = serde_json::from_str(body).expect("json answer");
        let c = &v["choices"][0];
        return c["text"]
            .as_str()
            .or_else(|| c["message"]["content"].as_str())
            .unwrap_or("")
            .to_string();
    }
    let mut out = String::new();
    for l in body.lines() {
        let Some(d) = l.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(d).expect("event");
        let c = &v["choices"][0];
        out.push_str(
            c["text"]
                .as_str()
                .or_else(|| c["delta"]["content"].as_str())
                .unwrap_or(""),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_prefill_then_decode_with_the_exact_bodies_and_each_side_ranked() {
    let (p1, p2) = (
        Fake::start("p1", Mode::Prefill).await,
        Fake::start("p2", Mode::Prefill).await,
    );
    let (d1, d2) = (
        Fake::start("d1", Mode::Decode).await,
        Fake::start("d2", Mode::Decode).await,
    );
    let router = pd_router(&[&p1, &p2], &[&d1, &d2], &[]);
    let c = client();
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    let bodies = [
        (
            "/v1/completions",
            json!({"model":MODEL,"prompt":format!("{long} one"),"max_tokens":20,"min_tokens":2,"temperature":0.5}),
        ),
        (
            "/v1/completions",
            json!({"model":MODEL,"prompt":format!("{long} two"),"max_tokens":20,"stream":true,
                   "stream_options":{"include_usage":true}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model":MODEL,"messages":[{"role":"user","content":"hi there"}],
                   "max_completion_tokens":9,"stream":true,"stream_options":{"include_usage":true},"min_tokens":1}),
        ),
        (
            "/v1/chat/completions",
            json!({"model":MODEL,"messages":[{"role":"user","content":"hello"}],"seed":3}),
        ),
    ];
    for (path, body) in &bodies {
        for f in [&p1, &p2, &d1, &d2] {
            f.clear();
        }
        let r = c
            .post(router.url(path))
            .json(body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{path} {body}");
        let prefill_hp = r
            .headers()
            .get("x-switchyard-prefill-engine")
            .and_then(|v| v.to_str().ok())
            .expect("prefill header")
            .to_string();
        let decode_hp = r
            .headers()
            .get("x-switchyard-engine")
            .and_then(|v| v.to_str().ok())
            .expect("engine header")
            .to_string();
        let text = answer_text(&r.text().await.expect("body"));
        let (p, d) = (
            [&p1, &p2]
                .into_iter()
                .find(|f| f.host_port() == prefill_hp)
                .expect("a prefill fake"),
            [&d1, &d2]
                .into_iter()
                .find(|f| f.host_port() == decode_hp)
                .expect("a decode fake"),
        );
        assert_eq!(text, format!("decoded by {}", d.name), "{path} {body}");
        let ps = p.seen();
        assert_eq!(ps.len(), 1, "one prefill request");
        assert_eq!(ps[0].path, *path);
        assert_eq!(ps[0].body, expected_prefill(body.clone()), "prefill body");
        let ds = d.seen();
        assert_eq!(ds.len(), 1, "one decode request");
        let mut want = body.clone();
        want["kv_transfer_params"] = params_of(&p.name);
        assert_eq!(ds[0].body, want, "decode body: the original + the params");
    }

    // Prefill is cache-aware: a prompt goes back to the engine that prefilled its
    // prefix; a new one spreads to the other.
    let mut prefill_of = Vec::new();
    for tail in ["alpha", "beta", "alpha"] {
        let body = json!({"model":MODEL,"prompt":format!("{long} {tail} {}", "x".repeat(4)),"max_tokens":4});
        let r = c
            .post(router.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        prefill_of.push(
            r.headers()["x-switchyard-prefill-engine"]
                .to_str()
                .expect("h")
                .to_string(),
        );
    }
    assert_eq!(
        prefill_of[0], prefill_of[2],
        "same prefix, same prefill engine"
    );

    // Decode is least load: with one decode busy, the next request goes to the other.
    for f in [&d1, &d2] {
        *f.delay_ms.lock().expect("lock") = 1500;
        f.clear();
    }
    let send = |c: reqwest::Client, url: String| async move {
        let r = c
            .post(url)
            .json(&json!({"model":MODEL,"prompt":"slow","max_tokens":3}))
            .send()
            .await
            .expect("send");
        r.headers()["x-switchyard-engine"]
            .to_str()
            .expect("h")
            .to_string()
    };
    let first = tokio::spawn(send(c.clone(), router.url("/v1/completions")));
    let t0 = Instant::now();
    while d1.seen().len() + d2.seen().len() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "first decode");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = send(c.clone(), router.url("/v1/completions")).await;
    let first = first.await.expect("join");
    assert_ne!(first, second, "the idle decode engine takes the second");
    for f in [&d1, &d2] {
        *f.delay_ms.lock().expect("lock") = 0;
    }

    // Not a completion: straight to a decode engine, no prefill.
    for f in [&p1, &p2, &d1, &d2] {
        f.clear();
    }
    let r = c
        .post(router.url("/tokenize"))
        .json(&json!({"model":MODEL,"prompt":"hi"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert!(p1.seen().is_empty() && p2.seen().is_empty());
    let plain: Vec<Seen> = d1.seen().into_iter().chain(d2.seen()).collect();
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].body, json!({"model":MODEL,"prompt":"hi"}));

    let m = page(&c, &router).await;
    assert_eq!(
        metric(&m, "vllm:router_pd_handoffs_total", &[("outcome", "ok")]),
        Some(9.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "vllm:router_pd_prefill_seconds_count", &[]),
        Some(9.0)
    );
    assert_eq!(
        metric(&m, "vllm:router_pd_decode_first_byte_seconds_count", &[]),
        Some(9.0)
    );
    assert_eq!(metric(&m, "vllm:router_pd_fallbacks_total", &[]), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_prefill_failures_are_errors_naming_the_prefill_side() {
    let p = Fake::start("p", Mode::Status(400)).await;
    let d = Fake::start("d", Mode::Decode).await;
    // Health checks would see the 400s and 500s too: checked rarely here.
    let router = pd_router(
        &[&p],
        &[&d],
        &["--max-attempts", "1", "--health-check-interval", "3600"],
    );
    let c = client();
    let body = json!({"model":MODEL,"prompt":"hi","max_tokens":5});
    let post = || async {
        let r = c
            .post(router.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .expect("send");
        let s = r.status().as_u16();
        (s, r.json::<Value>().await.expect("json error"))
    };

    // Bad input stays the engine's own 400.
    let (s, v) = post().await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["message"], "fake p says 400");

    // An answer without kv_transfer_params (engines sharing KV through LMCache, as the
    // Production Stack's own disaggregation does): the original request goes on to decode.
    p.set_mode(Mode::PrefillNoParams);
    let (s, v) = post().await;
    assert_eq!(s, 200, "{v}");
    let seen = d.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].body, body,
        "the original request, no parameters added"
    );
    d.clear();

    p.set_mode(Mode::NotJson);
    let (s, v) = post().await;
    assert_eq!(s, 502, "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(
        msg.starts_with(&format!("prefill engine {}", p.url)) && msg.contains("kv_transfer_params"),
        "{msg}"
    );

    p.set_mode(Mode::Status(500));
    let (s, v) = post().await;
    assert_eq!(s, 502, "{v}");
    let msg = v["error"]["message"].as_str().expect("message");
    assert!(
        msg.starts_with(&format!("prefill engine {}", p.url)),
        "{msg}"
    );
    assert!(d.seen().is_empty(), "no decode after a failed prefill");

    let m = page(&c, &router).await;
    for (reason, n) in [
        ("http_error", 1.0),
        ("bad_answer", 1.0),
        ("unreachable", 1.0),
    ] {
        assert_eq!(
            metric(
                &m,
                "vllm:router_pd_prefill_failures_total",
                &[("reason", reason)]
            ),
            Some(n),
            "{reason}\n{m}"
        );
    }
    assert_eq!(
        metric(
            &m,
            "vllm:router_pd_handoffs_total",
            &[("outcome", "prefill_failed")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &m,
            "vllm:router_pd_handoffs_total",
            &[("outcome", "ok_without_params")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_without_a_healthy_prefill_engine_serves_plainly_on_decode() {
    let p = Fake::start("p", Mode::Status(503)).await;
    let d = Fake::start("d", Mode::Decode).await;
    let router = pd_router(
        &[&p],
        &[&d],
        &[
            "--health-check-interval",
            "0.2",
            "--health-failure-threshold",
            "1",
        ],
    );
    let c = client();
    let t0 = Instant::now();
    loop {
        let e = get_json(&c, &router.url("/engines")).await;
        let down = e["data"]
            .as_array()
            .expect("engines")
            .iter()
            .any(|x| x["url"] == p.url.as_str() && x["healthy"] == false);
        if down {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "prefill ejected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = json!({"model":MODEL,"messages":[{"role":"user","content":"hi"}],"max_tokens":5});
    let r = c
        .post(router.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-switchyard-prefill-engine").is_none());
    assert_eq!(answer_text(&r.text().await.expect("text")), "decoded by d");
    assert!(p.seen().is_empty());
    assert_eq!(d.seen()[0].body, body, "plain: the client's body untouched");
    let m = page(&c, &router).await;
    assert_eq!(metric(&m, "vllm:router_pd_fallbacks_total", &[]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_decode_failures_retry_with_the_params_and_resume_without_them() {
    let p = Fake::start("p", Mode::Prefill).await;
    let (d1, d2) = (
        Fake::start("d1", Mode::Drop).await,
        Fake::start("d2", Mode::Decode).await,
    );
    let router = pd_router(&[&p], &[&d1, &d2], &["--health-check-interval", "3600"]);
    let c = client();
    let body = json!({"model":MODEL,"prompt":"hello","max_tokens":5});
    let r = c
        .post(router.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(answer_text(&r.text().await.expect("t")), "decoded by d2");
    let mut want = body.clone();
    want["kv_transfer_params"] = params_of("p");
    let (s1, s2) = (d1.seen(), d2.seen());
    assert_eq!(
        s1.len(),
        1,
        "d1 (least loaded, listed first) was tried first"
    );
    assert_eq!(s1[0].body, want);
    assert_eq!(s2.len(), 1, "retried on d2");
    assert_eq!(s2[0].body, want, "the retry carries the same params");

    // Mid-stream: d1 cuts the stream; the continuation on d2 is plain serving.
    d1.set_mode(Mode::Cut);
    for f in [&d1, &d2] {
        f.clear();
    }
    // d1 is still ranked first (both idle, in listed order; one failure opens no breaker).
    let body = json!({"model":MODEL,"prompt":"hello","max_tokens":5,"stream":true});
    let r = c
        .post(router.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let text = answer_text(&r.text().await.expect("t"));
    let (s1, s2) = (d1.seen(), d2.seen());
    assert_eq!(s1.len(), 1, "{text}");
    assert_eq!(s1[0].body["kv_transfer_params"], params_of("p"));
    assert_eq!(s2.len(), 1, "continued on d2: {text}");
    assert!(
        s2[0].body.get("kv_transfer_params").is_none(),
        "the continuation is plain serving: {}",
        s2[0].body
    );
    assert!(
        s2[0].body["prompt"]
            .as_str()
            .is_some_and(|p| p.starts_with("hellodecoded by")),
        "{}",
        s2[0].body
    );
    assert!(text.starts_with("decoded by"), "{text}");
}

/// XpYd over real sim engines (the engine side of the contract: `it/pd_engine.rs`):
/// 1P1D and 2P2D answers equal one plain engine's, streamed and not, chat and
/// completions; the decode engines compute at most the last prompt token of each
/// request (the rest arrives over the side channel), the prefill engines generate one
/// token per request; a decode engine killed is routed around with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_xpyd_sim_engines_answer_as_one_engine_and_move_the_kv() {
    let kv = r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#;
    let sim = ["--sim-preset", "zero", "--served-model-name", MODEL];
    let single = Proc::engine(&sim);
    let c = client();
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(8);
    let bodies = |stream: bool| {
        [
            (
                "/v1/completions",
                json!({"model":MODEL,"prompt":prompt,"max_tokens":12,"seed":1,"stream":stream}),
            ),
            (
                "/v1/chat/completions",
                json!({"model":MODEL,"messages":[{"role":"user","content":prompt}],"max_tokens":12,
                       "temperature":0,"stream":stream}),
            ),
        ]
    };
    let mut want = Vec::new();
    for (path, body) in bodies(false) {
        let r = c
            .post(single.url(path))
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        want.push(answer_text(&r.text().await.expect("text")));
    }
    let page = |u: String| {
        let c = c.clone();
        async move {
            c.get(u)
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text")
        }
    };
    for (np, nd) in [(1usize, 1usize), (2, 2)] {
        let engines: Vec<Proc> = (0..np + nd)
            .map(|_| {
                let mut a = sim.to_vec();
                a.extend(["--kv-transfer-config", kv, "--kv-side-channel-port", "0"]);
                Proc::engine(&a)
            })
            .collect();
        let urls: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
        let labels: Vec<&str> = (0..np + nd)
            .map(|i| if i < np { "m-prefill" } else { "m-decode" })
            .collect();
        let labels = labels.join(",");
        let mut router = Proc::router(
            &urls,
            &[
                "--static-model-labels",
                &labels,
                "--routing-logic",
                "disaggregated_prefill",
                "--prefill-model-labels",
                "m-prefill",
                "--decode-model-labels",
                "m-decode",
            ],
        );
        let mut n = 0.0;
        for stream in [false, true] {
            for ((path, body), want) in bodies(stream).into_iter().zip(&want) {
                let r = c
                    .post(router.url(path))
                    .json(&body)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 200, "{np}P{nd}D {path}");
                let p = r.headers()["x-switchyard-prefill-engine"]
                    .to_str()
                    .expect("h")
                    .to_string();
                let d = r.headers()["x-switchyard-engine"]
                    .to_str()
                    .expect("h")
                    .to_string();
                assert!(
                    engines[..np].iter().any(|e| e.host_port() == p),
                    "prefill on a prefill engine"
                );
                assert!(
                    engines[np..].iter().any(|e| e.host_port() == d),
                    "decode on a decode engine"
                );
                let got = answer_text(&r.text().await.expect("text"));
                assert_eq!(&got, want, "{np}P{nd}D {path} stream={stream}");
                n += 1.0;
            }
        }
        let (mut generated, mut computed, mut moved) = (0.0, 0.0, 0.0);
        for e in &engines[..np] {
            let m = page(e.url("/metrics")).await;
            generated += metric(&m, "vllm:generation_tokens_total", &[]).unwrap_or(0.0);
        }
        for e in &engines[np..] {
            let m = page(e.url("/metrics")).await;
            let src = |s| {
                metric(&m, "vllm:prompt_tokens_by_source_total", &[("source", s)]).unwrap_or(0.0)
            };
            computed += src("local_compute");
            moved += src("external_kv_transfer");
        }
        assert_eq!(generated, n, "{np}P{nd}D: one token per prefill request");
        assert!(
            computed <= n,
            "{np}P{nd}D: decode engines computed {computed} prompt tokens"
        );
        assert!(moved >= n * 90.0, "{np}P{nd}D: {moved} prompt tokens moved");
        let m = page(router.url("/metrics")).await;
        assert_eq!(
            metric(&m, "vllm:router_pd_handoffs_total", &[("outcome", "ok")]),
            Some(n)
        );

        if nd > 1 {
            // A decode engine dies: the next requests go to the other one, none lost.
            let mut engines = engines;
            let mut victim = engines.pop().expect("decode engine");
            let _ = victim.child.kill();
            let _ = victim.child.wait();
            for _ in 0..6 {
                let (path, body) = bodies(true)[0].clone();
                let r = c
                    .post(router.url(path))
                    .json(&body)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 200, "after a decode engine died");
                assert_eq!(
                    r.headers()["x-switchyard-engine"].to_str().expect("h"),
                    engines[np].host_port()
                );
                assert_eq!(answer_text(&r.text().await.expect("text")), want[0]);
            }
        }
        router.terminate();
    }
}
