//! The router end to end: real sim engines and a real router as processes on loopback.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::common::{client, get_json, get_text, metric, read_request, Proc};

const ENGINE_HEADER: &str = "x-switchyard-engine";

fn router(engines: &[&Proc], extra: &[&str]) -> Proc {
    let backends: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
    Proc::router(&backends, extra)
}

async fn chat(
    c: &reqwest::Client,
    r: &Proc,
    headers: &[(&str, &str)],
    body: Value,
) -> reqwest::Response {
    let mut req = c.post(r.url("/v1/chat/completions")).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("send")
}

async fn completion(c: &reqwest::Client, r: &Proc, body: &Value) -> reqwest::Response {
    c.post(r.url("/v1/completions"))
        .json(body)
        .send()
        .await
        .expect("send")
}

fn small_chat() -> Value {
    json!({"model":"switchyard-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"ignore_eos":true})
}

fn served_by(r: &reqwest::Response) -> String {
    r.headers()
        .get(ENGINE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn engine_metric(
    c: &reqwest::Client,
    e: &Proc,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let page = c
        .get(e.url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metric(&page, name, labels)
}

#[tokio::test]
async fn proxies_every_endpoint_and_answers_its_own() {
    let e1 = Proc::engine(&["--sim-preset", "zero"]);
    let e2 = Proc::engine(&["--sim-preset", "zero", "--served-model-name", "other"]);
    let r = router(&[&e1, &e2], &[]);
    let c = client();

    // Chat and completions, streaming and not; the request id is echoed and forwarded.
    let resp = chat(
        &c,
        &r,
        &[("x-request-id", "abc-123"), ("authorization", "Bearer t")],
        small_chat(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("abc-123")
    );
    assert_eq!(served_by(&resp), e1.host_port());
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let resp = c
        .post(r.url("/v1/completions"))
        .json(&json!({"model":"other","prompt":"x","max_tokens":2,"stream":true,"ignore_eos":true}))
        .send()
        .await
        .expect("send");
    assert_eq!(served_by(&resp), e2.host_port());
    assert!(
        resp.headers().get("x-request-id").is_some(),
        "a request id is generated"
    );
    let body = resp.text().await.expect("body");
    assert!(
        body.ends_with("data: [DONE]\n\n") && body.matches("data: {").count() == 2,
        "{body}"
    );
    for (path, body) in [
        ("/tokenize", json!({"model":"other","prompt":"hello there"})),
        (
            "/detokenize",
            json!({"model":"other","tokens":[1819043176]}),
        ),
    ] {
        let resp = c.post(r.url(path)).json(&body).send().await.expect("send");
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(served_by(&resp), e2.host_port(), "{path}");
    }
    // Paths the sim engine does not implement still reach it: its FastAPI-style 404.
    for path in [
        "/v1/embeddings",
        "/v1/responses",
        "/v1/rerank",
        "/rerank",
        "/v1/score",
        "/score",
    ] {
        let resp = c
            .post(r.url(path))
            .json(&json!({"model":"other","input":"x"}))
            .send()
            .await
            .expect("send");
        assert_eq!(served_by(&resp), e2.host_port(), "{path} was proxied");
        assert_eq!(resp.status(), 404, "{path}");
        assert_eq!(
            resp.text().await.expect("body"),
            r#"{"detail":"Not Found"}"#
        );
    }
    // Answered by the router itself.
    let models: Value = get_json(&c, &r.url("/v1/models")).await;
    let mut ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["other", "switchyard-sim"]);
    let engines: Value = get_json(&c, &r.url("/engines")).await;
    assert_eq!(engines["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        c.get(r.url("/health")).send().await.expect("send").status(),
        200
    );
    let v: Value = get_json(&c, &r.url("/version")).await;
    assert!(v["version"].is_string());
    let page = c
        .get(r.url("/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert_eq!(
        metric(
            &page,
            "vllm:num_incoming_requests_total",
            &[("model", "switchyard-sim")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&page, "vllm:healthy_pods_total", &[("server", &e1.url)]),
        Some(1.0)
    );
    for name in [
        "vllm:current_qps",
        "vllm:avg_latency",
        "vllm:avg_itl",
        "vllm:avg_decoding_length",
        "vllm:num_prefill_requests",
        "vllm:num_decoding_requests",
        "vllm:num_requests_running",
    ] {
        assert!(
            metric(&page, name, &[("server", &e1.url)]).is_some(),
            "{name}"
        );
    }
    assert_eq!(
        metric(
            &page,
            "vllm:request_latency_seconds_count",
            &[("server", &e1.url)]
        ),
        Some(1.0)
    );
    // `?id=` pins an engine.
    let resp = c
        .post(r.url(&format!("/v1/completions?id={}", e2.host_port())))
        .json(&json!({"model":"other","prompt":"x","max_tokens":1}))
        .send()
        .await
        .expect("send");
    assert_eq!(served_by(&resp), e2.host_port());
}

#[tokio::test]
async fn roundrobin_spreads_evenly() {
    let engines: Vec<Proc> = (0..3)
        .map(|_| Proc::engine(&["--sim-preset", "zero"]))
        .collect();
    let refs: Vec<&Proc> = engines.iter().collect();
    let r = router(&refs, &["--routing-logic", "roundrobin"]);
    let c = client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let resp = chat(&c, &r, &[], small_chat()).await;
        assert_eq!(resp.status(), 200);
        *counts.entry(served_by(&resp)).or_default() += 1;
    }
    for e in &engines {
        assert_eq!(counts.get(&e.host_port()), Some(&10), "{counts:?}");
        let done = engine_metric(
            &c,
            e,
            "vllm:request_success_total",
            &[("finished_reason", "length")],
        )
        .await;
        assert_eq!(done, Some(10.0), "the engine itself served 10");
    }
}

#[tokio::test]
async fn session_affinity_survives_losing_an_engine() {
    let mut engines: Vec<Option<Proc>> = (0..3)
        .map(|_| Some(Proc::engine(&["--sim-preset", "zero"])))
        .collect();
    let refs: Vec<&Proc> = engines.iter().flatten().collect();
    let r = router(
        &refs,
        &[
            "--routing-logic",
            "session",
            "--session-key",
            "x-user-id",
            "--health-check-interval",
            "0.2",
        ],
    );
    let c = client();
    let mut owner: HashMap<String, String> = HashMap::new();
    for i in 0..60 {
        let user = format!("user-{i}");
        for _ in 0..2 {
            let resp = chat(&c, &r, &[("x-user-id", &user)], small_chat()).await;
            assert_eq!(resp.status(), 200);
            let e = served_by(&resp);
            let prev = owner.entry(user.clone()).or_insert_with(|| e.clone());
            assert_eq!(*prev, e, "{user} moved between requests");
        }
    }
    let distinct: std::collections::HashSet<_> = owner.values().collect();
    assert_eq!(distinct.len(), 3, "sessions spread over all engines");
    // A body field of the same name works too.
    let mut body = small_chat();
    body["x-user-id"] = json!("user-7");
    let resp = chat(&c, &r, &[], body).await;
    assert_eq!(served_by(&resp), owner["user-7"]);

    let gone = engines[1].as_ref().expect("engine").host_port();
    engines[1] = None; // killed
    let mut moved = 0;
    for i in 0..60 {
        let user = format!("user-{i}");
        let resp = chat(&c, &r, &[("x-user-id", &user)], small_chat()).await;
        assert_eq!(resp.status(), 200, "{user} failed over");
        let now = served_by(&resp);
        if owner[&user] == gone {
            moved += 1;
            assert_ne!(now, gone);
        } else {
            assert_eq!(now, owner[&user], "{user} moved though its engine stayed");
        }
    }
    assert!(
        moved > 0 && moved < 40,
        "only the dead engine's sessions move: {moved}"
    );
}

#[tokio::test]
async fn errors_are_openai_json_with_the_right_status() {
    let e = Proc::engine(&["--sim-preset", "zero"]);
    let r = router(
        &[&e],
        &[
            "--max-request-body-bytes",
            "10000",
            "--known-models",
            "ghost",
        ],
    );
    let c = client();
    let send = |body: Vec<u8>| {
        c.post(r.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let check = |status: u16, text: &str, want: u16| {
        assert_eq!(status, want, "{text}");
        let v: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert_eq!(v["error"]["code"], want, "{text}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    };
    for (body, want) in [
        // `--known-models`: no engine serves it yet (scaled to zero), so 503, not 404.
        (br#"{"model":"ghost","messages":[]}"#.to_vec(), 503),
        (b"{not json".to_vec(), 400),
        (br#"{"messages":[]}"#.to_vec(), 400),
        (br#"{"model":"nope","messages":[]}"#.to_vec(), 404),
        (
            format!(
                r#"{{"model":"switchyard-sim","p":"{}"}}"#,
                "x".repeat(20_000)
            )
            .into_bytes(),
            413,
        ),
    ] {
        let resp = send(body).await.expect("send");
        let s = resp.status().as_u16();
        check(s, &resp.text().await.expect("body"), want);
    }
    // The 503 for the scaled-to-zero model counts as incoming (what KEDA scales on).
    let page = get_text(&c, &r.url("/metrics")).await;
    assert_eq!(
        metric(
            &page,
            "vllm:num_incoming_requests_total",
            &[("model", "ghost")]
        ),
        Some(1.0),
        "{page}"
    );
    // A model seen before with no healthy engine: 503 with Retry-After.
    drop(e);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = send(serde_json::to_vec(&small_chat()).expect("json"))
            .await
            .expect("send");
        let s = resp.status().as_u16();
        if s == 503 {
            assert_eq!(
                resp.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                Some("5")
            );
            check(s, &resp.text().await.expect("body"), 503);
            break;
        }
        assert_eq!(s, 502, "before ejection the dead engine is a bad gateway");
        assert!(Instant::now() < deadline, "never ejected");
    }
}

#[tokio::test]
async fn killing_an_engine_under_load_loses_no_unstarted_request() {
    let slow = ["--sim-preset", "zero", "--sim-step-overhead-us", "20000"];
    let e1 = Proc::engine(&slow);
    let mut e2 = Some(Proc::engine(&slow));
    let e3 = Proc::engine(&slow);
    let r = router(
        &[&e1, e2.as_ref().expect("e2"), &e3],
        &["--routing-logic", "roundrobin"],
    );
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..90 {
        let c = c.clone();
        let url = r.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(i * 10)).await;
            let body = json!({"model":"switchyard-sim","messages":[{"role":"user","content":"x"}],"max_tokens":10,"ignore_eos":true});
            let resp = c.post(url).json(&body).send().await.expect("send");
            (resp.status().as_u16(), resp.text().await.unwrap_or_default())
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    e2 = None; // killed while it holds requests and more keep coming
    assert!(e2.is_none());
    for t in tasks {
        let (status, body) = t.await.expect("task");
        assert_eq!(status, 200, "a non-streamed request was lost: {body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["usage"]["completion_tokens"], 10);
    }
}

#[tokio::test]
async fn client_disconnect_frees_the_engine_slot() {
    let e = Proc::engine(&["--sim-preset", "zero", "--sim-step-overhead-us", "20000"]);
    let r = router(&[&e], &[]);
    let c = client();
    let resp = c
        .post(r.url("/v1/completions"))
        .json(&json!({"model":"switchyard-sim","prompt":"long","max_tokens":2000,"stream":true,"ignore_eos":true}))
        .send()
        .await
        .expect("send");
    let mut s = resp.bytes_stream();
    s.next().await.expect("first chunk").expect("ok");
    // The engine loop updates its gauges just after sending the step's tokens: wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine_metric(&c, &e, "vllm:num_requests_running", &[]).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the engine never ran the request"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(s);
    while engine_metric(&c, &e, "vllm:num_requests_running", &[]).await != Some(0.0) {
        assert!(Instant::now() < deadline, "the engine kept the request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        engine_metric(
            &c,
            &e,
            "vllm:request_success_total",
            &[("finished_reason", "abort")]
        )
        .await,
        Some(1.0)
    );
    let page = c
        .get(r.url("/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert_eq!(
        metric(
            &page,
            "vllm:router_in_flight_requests",
            &[("server", &e.url)]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn streams_pass_through_incrementally() {
    let e = Proc::engine(&["--sim-preset", "zero", "--sim-step-overhead-us", "10000"]);
    let r = router(&[&e], &[]);
    let c = client();
    let t0 = Instant::now();
    let resp = c
        .post(r.url("/v1/completions"))
        .json(&json!({"model":"switchyard-sim","prompt":"x","max_tokens":20,"stream":true,"ignore_eos":true}))
        .send()
        .await
        .expect("send");
    let mut s = resp.bytes_stream();
    let mut times = Vec::new();
    while let Some(chunk) = s.next().await {
        chunk.expect("chunk");
        times.push(t0.elapsed());
    }
    assert!(times.len() >= 10, "{} chunks: buffered?", times.len());
    assert!(
        times[times.len() - 1] >= times[0] + Duration::from_millis(100),
        "{times:?}"
    );
}

#[tokio::test]
async fn config_change_adds_an_engine_without_failing_requests_in_flight() {
    let slow = ["--sim-preset", "zero", "--sim-step-overhead-us", "10000"];
    let a = Proc::engine(&slow);
    let b = Proc::engine(&slow);
    let dir = std::env::temp_dir().join(format!("switchyard-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("router.json");
    std::fs::write(
        &path,
        json!({"static_backends": [a.url], "routing_logic": "roundrobin"}).to_string(),
    )
    .expect("write");
    let path_s = path.to_string_lossy().to_string();
    let r = Proc::start(&[
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--dynamic-config-json",
        &path_s,
        "--dynamic-config-interval",
        "0.1",
    ]);
    let c = client();
    // Streams in flight on A while the config changes.
    let mut inflight = Vec::new();
    for _ in 0..4 {
        let c = c.clone();
        let url = r.url("/v1/completions");
        inflight.push(tokio::spawn(async move {
            let body = json!({"model":"switchyard-sim","prompt":"x","max_tokens":50,"stream":true,"ignore_eos":true});
            c.post(url).json(&body).send().await.expect("send").text().await.expect("body")
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(
        &path,
        json!({"static_backends": [a.url, b.url], "routing_logic": "roundrobin"}).to_string(),
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value = get_json(&c, &r.url("/engines")).await;
        if v["data"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "config change not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen_b = false;
    for _ in 0..4 {
        let resp = chat(&c, &r, &[], small_chat()).await;
        assert_eq!(resp.status(), 200);
        seen_b |= served_by(&resp) == b.host_port();
    }
    assert!(seen_b, "the new engine gets traffic");
    for t in inflight {
        let body = t.await.expect("task");
        assert_eq!(
            body.matches("data: {").count(),
            50,
            "an in-flight stream was cut: {body}"
        );
        assert!(body.ends_with("data: [DONE]\n\n"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loopback engine that answers one request per connection and keeps the connection
/// open, then closes it unanswered when the next request arrives on it (llama-server's
/// way after a streamed answer, with `Keep-Alive` in its headers); with `answer` false it
/// closes every connection unanswered. Returns its URL, how many connections it took, and
/// how many completion requests it read (a request that met a closed connection is not
/// read).
async fn closing_engine(answer: bool) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (conns, completions) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (seen, read) = (conns.clone(), completions.clone());
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            let read = read.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                let Some(req) = read_request(&mut r).await else {
                    return;
                };
                let path = req.target;
                if path == "/v1/completions" {
                    read.fetch_add(1, Ordering::SeqCst);
                }
                if !answer {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100";
                let out = if path == "/v1/completions" {
                    let events = concat!(
                        "data: {\"id\":\"c\",\"object\":\"text_completion\",\"model\":\"m\",\"choices\":[{\"index\":0,\"text\":\"hi\",\"finish_reason\":\"length\"}]}\n\n",
                        "data: [DONE]\n\n"
                    );
                    format!(
                        "{head}\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{events}\r\n0\r\n\r\n",
                        events.len()
                    )
                } else {
                    let b = if path == "/v1/models" {
                        r#"{"object":"list","data":[{"id":"m","object":"model"}]}"#
                    } else {
                        "{}"
                    };
                    format!(
                        "{head}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                        b.len()
                    )
                };
                let mut sock = r.into_inner();
                let _ = sock.write_all(out.as_bytes()).await;
                // Kept open until the client sends the next request on it; then closed.
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
            });
        }
    });
    (url, conns, completions)
}

/// An engine that closes each kept-alive connection when the next request comes down it
/// (llama-server after every streamed answer): each such request is sent again on a new
/// connection and answered; the engine is neither ejected nor blamed. A new connection
/// closed unanswered is the engine's failure: answered 502, not sent to it again.
#[tokio::test]
async fn a_kept_alive_connection_the_engine_closed_is_not_a_failure() {
    let c = client();
    let (url, conns, completions) = closing_engine(true).await;
    let r = Proc::router(&[&url], &["--static-models", "m"]);
    let body = json!({"model":"m","prompt":"hi","max_tokens":1,"stream":true});
    for i in 0..6 {
        let resp = completion(&c, &r, &body).await;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, 200, "request {i}: {text}");
        assert!(text.contains("[DONE]"), "request {i}: {text}");
    }
    // Every request after the first met a closed connection and went on a new one.
    assert!(conns.load(Ordering::SeqCst) >= 6, "{conns:?}");
    assert_eq!(completions.load(Ordering::SeqCst), 6);
    let page = get_text(&c, &r.url("/metrics")).await;
    for cause in ["traffic", "circuit_breaker", "health_check"] {
        let ejected = metric(
            &page,
            "vllm:router_engine_ejections_total",
            &[("cause", cause)],
        );
        assert_eq!(ejected, Some(0.0), "ejections by {cause}");
    }
    let errors = metric(
        &page,
        "vllm:request_errors_total",
        &[("error_type", "upstream_unavailable")],
    );
    assert!(errors.unwrap_or(0.0) == 0.0, "{errors:?}");

    let (url, _, completions) = closing_engine(false).await;
    let r = Proc::router(&[&url], &["--static-models", "m"]);
    let resp = completion(&c, &r, &body).await;
    let status = resp.status();
    let err: Value = resp.json().await.expect("json");
    assert_eq!(status, 502, "{err}");
    assert_eq!(err["error"]["code"], 502, "{err}");
    let page = get_text(&c, &r.url("/metrics")).await;
    let errors = metric(
        &page,
        "vllm:request_errors_total",
        &[("error_type", "upstream_unavailable")],
    );
    assert!(errors.unwrap_or(0.0) >= 1.0, "{page}");
    // Each attempt the router's retry policy made was sent once, not again.
    let retries = metric(&page, "vllm:router_retries_total", &[]).unwrap_or(0.0);
    assert_eq!(
        completions.load(Ordering::SeqCst),
        1 + retries as usize,
        "{page}"
    );
}

/// What one connection to [`draining_engine`] carried: requests, and whether the client
/// closed it.
#[derive(Clone, Copy, Debug, Default)]
struct ConnUse {
    requests: usize,
    closed: bool,
}

/// An engine shutting down as vLLM does under uvicorn: `/health` answers 503, everything
/// else still answers, and each connection is served for as long as the client keeps
/// using it (the server exits only once every connection is closed).
async fn draining_engine() -> (String, Arc<std::sync::Mutex<Vec<ConnUse>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = conns.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let i = {
                let mut v = seen.lock().expect("lock");
                v.push(ConnUse::default());
                v.len() - 1
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                while let Some(req) = read_request(&mut r).await {
                    seen.lock().expect("lock")[i].requests += 1;
                    let (status, body) = match req.target.as_str() {
                        "/health" => ("503 Service Unavailable", ""),
                        "/v1/models" => (
                            "200 OK",
                            r#"{"object":"list","data":[{"id":"m","object":"model"}]}"#,
                        ),
                        _ => ("200 OK", ""),
                    };
                    let out = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if r.get_mut().write_all(out.as_bytes()).await.is_err() {
                        break;
                    }
                }
                seen.lock().expect("lock")[i].closed = true;
            });
        }
    });
    (url, conns)
}

/// Once health checks eject an engine, it is checked and scraped on a new connection each
/// time, closed once answered: a kept-alive connection in use every fraction of a second
/// would keep a draining vLLM (uvicorn waits for its connections) from ever exiting.
#[tokio::test]
async fn an_ejected_engine_is_not_held_open_by_the_checks() {
    let c = client();
    let (url, conns) = draining_engine().await;
    let r = Proc::router(
        &[&url],
        &[
            "--static-models",
            "m",
            "--health-check-interval",
            "0.1",
            "--health-failure-threshold",
            "1",
            "--engine-stats-interval",
            "1",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = get_text(&c, &r.url("/metrics")).await;
        let ejected = metric(
            &page,
            "vllm:router_engine_ejections_total",
            &[("cause", "health_check")],
        );
        if ejected.unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "never ejected:\n{page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Connections opened from now on: each carries one check or scrape and is closed.
    let first = conns.lock().expect("lock").len();
    let after = |v: &[ConnUse]| v[first.min(v.len())..].to_vec();
    loop {
        let v = after(&conns.lock().expect("lock"));
        if v.iter().filter(|u| u.closed).count() >= 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after ejection, connections (requests, closed by the router): {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = after(&conns.lock().expect("lock"));
    assert!(v.iter().all(|u| u.requests <= 1), "{v:?}");
}
