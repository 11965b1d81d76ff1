//! Observability end to end: W3C trace context through the router to the engines, the
//! OTLP span export, JSON log lines, the `/dashboard` status page and the metric series
//! that exist from the start. Stub engines and a stub collector in the test record what
//! reaches them; real sim engines and a real router run as processes on loopback.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::common::{client, get_json, metric, read_request, Proc, RawRequest};

const MODEL: &str = "stub-model";

/// A request a stub saw.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A stand-in engine (and OTLP collector): answers `/v1/models` with [`MODEL`], POSTs
/// with `post_status` (a chat completion when 200), anything else with `{}`, and records
/// every request.
struct Stub {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Stub {
    async fn start(post_status: u16) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut r = BufReader::new(sock);
                    let Some(req) = read_request(&mut r).await else {
                        return;
                    };
                    let RawRequest {
                        method,
                        target: path,
                        headers,
                        body,
                    } = req;
                    let (status, answer) = match (method.as_str(), path.as_str()) {
                        ("GET", "/v1/models") => (
                            200,
                            json!({"object":"list","data":[{"id":MODEL,"object":"model","owned_by":"vllm"}]}),
                        ),
                        ("POST", "/v1/chat/completions") if post_status == 200 => (
                            200,
                            json!({"id":"chatcmpl-1","object":"chat.completion","model":MODEL,
                                "choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],
                                "usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}),
                        ),
                        ("POST", _) => (post_status, json!({})),
                        _ => (200, json!({})),
                    };
                    log.lock().expect("lock").push(Seen {
                        method,
                        path,
                        headers,
                        body,
                    });
                    let body = answer.to_string();
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let mut sock = r.into_inner();
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(body.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Stub { url, seen }
    }

    /// The chat requests it got, in order.
    fn chats(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.path == "/v1/chat/completions")
            .cloned()
            .collect()
    }
}

/// `(trace id, span id, flags)` of a well-formed version-00 `traceparent`.
fn traceparent(v: &str) -> (String, String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {v}");
    assert_eq!(parts[0], "00", "{v}");
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            && s.bytes().any(|c| c != b'0')
    };
    assert!(
        hex(parts[1], 32) && hex(parts[2], 16) && hex(parts[3], 2),
        "{v}"
    );
    (parts[1].into(), parts[2].into(), parts[3].into())
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn chat(c: &reqwest::Client, r: &Proc, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = c
        .post(r.url("/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("send")
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const TRACE2: &str = "0af7651916cd43dd8448eb211c80319c";

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["attributes"]
        .as_array()
        .and_then(|a| a.iter().find(|kv| kv["key"] == key))
        .map_or(&Value::Null, |kv| &kv["value"])
}

#[tokio::test]
async fn trace_context_reaches_engines_and_spans_and_logs_follow() {
    let engine = Stub::start(200).await;
    let collector = Stub::start(200).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let r = Proc::start_logged(
        &[
            "--log-format",
            "json",
            "--log-level",
            "warn,router::access=debug",
            "router",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--static-backends",
            &engine.url,
            "--static-models",
            MODEL,
            "--otlp-traces-endpoint",
            &collector.url,
        ],
        log.clone(),
    );
    let c = client();

    // 1. The caller's trace continues: same trace id, a new span id, tracestate kept.
    let incoming = format!("00-{TRACE}-{PARENT}-01");
    let resp = chat(
        &c,
        &r,
        &[
            ("traceparent", &incoming),
            ("tracestate", "vendor=abc"),
            ("x-request-id", "obs-req-1"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let seen = engine.chats();
    assert_eq!(seen.len(), 1);
    let (trace, span1, flags) = traceparent(seen[0].header("traceparent").expect("traceparent"));
    assert_eq!(trace, TRACE, "the caller's trace id");
    assert_ne!(
        span1, PARENT,
        "a child span of the router's, not the caller's"
    );
    assert_eq!(flags, "01");
    assert_eq!(seen[0].header("tracestate"), Some("vendor=abc"));
    assert_eq!(
        seen[0]
            .headers
            .iter()
            .filter(|(k, _)| k == "traceparent")
            .count(),
        1,
        "one traceparent, the router's"
    );

    // 2. No traceparent: a fresh trace, different per request.
    chat(&c, &r, &[]).await;
    chat(&c, &r, &[]).await;
    // 3. An invalid one is replaced, and its tracestate is not passed on.
    chat(
        &c,
        &r,
        &[
            ("traceparent", "00-NOT-A-TRACE-01"),
            ("tracestate", "vendor=zzz"),
        ],
    )
    .await;
    let seen = engine.chats();
    assert_eq!(seen.len(), 4);
    let fresh: Vec<_> = seen[1..]
        .iter()
        .map(|s| traceparent(s.header("traceparent").expect("always sent")))
        .collect();
    for (t, s, f) in &fresh {
        assert_ne!(t, TRACE);
        assert_ne!(s, &span1);
        assert_eq!(f, "01", "a trace the router starts is sampled");
    }
    assert_ne!(fresh[0].0, fresh[1].0, "each request its own trace");
    assert_ne!(fresh[1].0, fresh[2].0);
    assert_eq!(seen[3].header("tracestate"), None);

    // The access log: JSON lines, one per request, with its fields.
    let line: Value = eventually("the request's log line", || {
        log.lock()
            .expect("lock")
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["request_id"] == "obs-req-1")
    })
    .await;
    assert_eq!(line["message"], "request");
    assert_eq!(line["level"], "DEBUG");
    assert_eq!(line["target"], "router::access");
    assert_eq!(line["model"], MODEL);
    assert_eq!(line["engine"], engine.url.as_str());
    assert_eq!(line["status"], 200);
    assert_eq!(line["trace_id"], TRACE);
    assert!(
        line["latency_s"].as_f64().is_some_and(|l| l > 0.0),
        "{line}"
    );
    assert!(line["ttft_s"].as_f64().is_some_and(|t| t > 0.0), "{line}");
    assert!(line["timestamp"].is_string());
    let lines = eventually("a line per request", || {
        let lines = log.lock().expect("lock").clone();
        let n = lines.iter().filter(|l| l.contains("\"request\"")).count();
        (n >= 4).then_some(lines)
    })
    .await;
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
    }

    // The spans reached the collector as OTLP JSON: the router's (a child of the caller's
    // span) and the attempt's (the span the engine was given).
    let spans: Vec<Value> = eventually("exported spans", || {
        let spans: Vec<Value> = collector
            .seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.method == "POST" && s.path == "/v1/traces")
            .flat_map(|s| {
                assert_eq!(s.header("content-type"), Some("application/json"));
                let v: Value = serde_json::from_slice(&s.body).expect("OTLP JSON");
                v["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        (spans.iter().filter(|s| s["traceId"] == TRACE).count() >= 2).then_some(spans)
    })
    .await;
    let server = spans
        .iter()
        .find(|s| s["traceId"] == TRACE && s["kind"] == 2)
        .expect("the router's span");
    assert_eq!(server["parentSpanId"], PARENT);
    assert_eq!(server["name"], "POST /v1/chat/completions");
    assert_eq!(attr(server, "gen_ai.request.model")["stringValue"], MODEL);
    assert_eq!(
        attr(server, "switchyard.engine")["stringValue"],
        engine.url.as_str()
    );
    assert_eq!(attr(server, "http.response.status_code")["intValue"], "200");
    assert_eq!(
        attr(server, "gen_ai.request.id")["stringValue"],
        "obs-req-1"
    );
    assert!(attr(server, "gen_ai.latency.time_to_first_token")["doubleValue"].is_f64());
    let start: u64 = server["startTimeUnixNano"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("start");
    let end: u64 = server["endTimeUnixNano"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("end");
    assert!(
        start > 1_600_000_000_000_000_000 && end >= start,
        "{server}"
    );
    let attempt = spans
        .iter()
        .find(|s| s["traceId"] == TRACE && s["kind"] == 3)
        .expect("the attempt's span");
    assert_eq!(attempt["spanId"], span1.as_str(), "the span the engine saw");
    assert_eq!(attempt["parentSpanId"], server["spanId"]);
    assert!(
        spans.iter().filter(|s| s["kind"] == 2).count() >= 4,
        "a span for every request"
    );

    let page = c
        .get(r.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metric(
            &page,
            "vllm:router_otlp_spans_total",
            &[("outcome", "exported")]
        )
        .is_some_and(|n| n >= 2.0),
        "{page}"
    );

    // A request just before a graceful shutdown: its span is flushed on the way out,
    // not lost with the batch still gathering.
    let last = format!("00-{TRACE2}-{PARENT}-01");
    assert_eq!(chat(&c, &r, &[("traceparent", &last)]).await.status(), 200);
    // Off the runtime thread: the collector answers on it while the router shuts down.
    let mut r = r;
    let exited = tokio::task::spawn_blocking(move || r.terminate())
        .await
        .expect("join");
    assert!(exited, "the router exits cleanly on SIGTERM");
    let flushed = collector
        .seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| s.method == "POST" && s.path == "/v1/traces")
        .any(|s| String::from_utf8_lossy(&s.body).contains(TRACE2));
    assert!(
        flushed,
        "the last request's span reached the collector before exit"
    );
}

#[tokio::test]
async fn each_attempt_is_its_own_span_of_the_trace() {
    let failing = Stub::start(503).await;
    let good = Stub::start(200).await;
    let backends = [failing.url.as_str(), good.url.as_str()];
    let r = Proc::router(
        &backends,
        &[
            "--static-models",
            &format!("{MODEL},{MODEL}"),
            "--routing-logic",
            "roundrobin",
        ],
    );
    let c = client();
    // Round robin puts the failing engine first for one of two requests.
    for i in 0..2 {
        let tp = format!("00-{TRACE}-{:016x}-01", i + 1);
        let resp = chat(&c, &r, &[("traceparent", &tp)]).await;
        assert_eq!(resp.status(), 200, "failed over");
    }
    let failed = failing.chats();
    assert_eq!(failed.len(), 1, "tried once, first");
    let (t_fail, s_fail, _) = traceparent(failed[0].header("traceparent").expect("sent"));
    let spans: Vec<String> = good
        .chats()
        .iter()
        .map(|s| {
            let (t, span, _) = traceparent(s.header("traceparent").expect("sent"));
            assert_eq!(t, TRACE);
            span
        })
        .collect();
    assert_eq!(t_fail, TRACE);
    assert_eq!(spans.len(), 2);
    assert!(!spans.contains(&s_fail), "the retry is a new span");
    assert_ne!(spans[0], spans[1]);
}

#[tokio::test]
async fn dashboard_and_series_that_exist_from_the_start() {
    let e1 = Proc::engine(&["--sim-preset", "zero"]);
    let e2 = Proc::engine(&["--sim-preset", "zero"]);
    let e3 = Proc::engine(&["--sim-preset", "zero", "--served-model-name", "other"]);
    let r = Proc::router(
        &[e1.url.as_str(), e2.url.as_str(), e3.url.as_str()],
        &["--engine-stats-interval", "1"],
    );
    let c = client();

    // Before any request: the incoming counter and every error series at 0, and the
    // engine info gauge joining servers to models.
    let page = c
        .get(r.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for model in ["switchyard-sim", "other"] {
        assert_eq!(
            metric(
                &page,
                "vllm:num_incoming_requests_total",
                &[("model", model)]
            ),
            Some(0.0),
            "{page}"
        );
        assert_eq!(
            metric(
                &page,
                "vllm:request_errors_total",
                &[
                    ("server", ""),
                    ("model", model),
                    ("error_type", "no_healthy_engine")
                ]
            ),
            Some(0.0),
            "{page}"
        );
    }
    for (e, model) in [
        (&e1, "switchyard-sim"),
        (&e2, "switchyard-sim"),
        (&e3, "other"),
    ] {
        assert_eq!(
            metric(
                &page,
                "vllm:router_engine_info",
                &[("server", &e.url), ("model", model)]
            ),
            Some(1.0),
            "{page}"
        );
        for t in ["timeout", "upstream_unavailable"] {
            assert_eq!(
                metric(
                    &page,
                    "vllm:request_errors_total",
                    &[("server", &e.url), ("model", model), ("error_type", t)]
                ),
                Some(0.0),
                "{page}"
            );
        }
    }
    assert_eq!(
        page.lines()
            .filter(|l| l.starts_with("vllm:router_engine_info{"))
            .count(),
        3,
        "one per engine and model"
    );
    // A name no engine serves makes no series.
    let resp = c
        .post(r.url("/v1/completions"))
        .json(&json!({"model":"nope","prompt":"x"}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 404);

    // The page: HTML, self-contained, polling its data.
    let resp = c.get(r.url("/dashboard")).send().await.expect("dashboard");
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html")));
    let html = resp.text().await.expect("html");
    assert!(html.contains("<table id=\"engines\"") && html.contains("dashboard/data"));

    let before = get_json(&c, &r.url("/dashboard/data")).await;
    let urls = |d: &Value| -> Vec<String> {
        d["engines"]
            .as_array()
            .expect("engines")
            .iter()
            .map(|e| e["url"].as_str().expect("url").to_string())
            .collect()
    };
    assert_eq!(
        urls(&before),
        vec![e1.url.clone(), e2.url.clone(), e3.url.clone()]
    );
    assert_eq!(before["totals"]["requests"], 0);
    assert_eq!(before["totals"]["healthy_engines"], 3);
    assert_eq!(before["routing_logic"], "roundrobin");
    for e in before["engines"].as_array().expect("engines") {
        assert_eq!(e["routed"], 0);
        assert_eq!(e["qps"], 0.0);
        assert_eq!(e["healthy"], true);
    }

    for _ in 0..6 {
        let resp = c
            .post(r.url("/v1/chat/completions"))
            .json(&json!({"model":"switchyard-sim","messages":[{"role":"user","content":"hello there"}],
                "max_tokens":4,"ignore_eos":true,"stream":true}))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("body");
    }
    // Figures change with the traffic; the engines' own figures arrive with the scrapes.
    let after = eventually_json(&c, &r.url("/dashboard/data"), |d| {
        d["engines"][0]["prefix_hit_rate"].is_f64() && d["engines"][0]["completed"] == 3
    })
    .await;
    assert_eq!(urls(&after), urls(&before));
    assert_eq!(after["totals"]["requests"], 6);
    assert_eq!(after["totals"]["routed"], 6);
    let engines = after["engines"].as_array().expect("engines");
    for e in &engines[..2] {
        assert_eq!(e["routed"], 3, "round robin: {e}");
        assert!(e["qps"].as_f64().is_some_and(|q| q > 0.0), "{e}");
        assert!(e["avg_ttft"].as_f64().is_some_and(|t| t > 0.0), "{e}");
        assert!(e["ttft_p99"].as_f64().is_some_and(|t| t > 0.0), "{e}");
    }
    assert_eq!(engines[2]["routed"], 0, "serves another model");
    let models = after["models"].as_array().expect("models");
    let sim = models
        .iter()
        .find(|m| m["name"] == "switchyard-sim")
        .expect("model row");
    assert_eq!(sim["requests"], 6);
    assert_eq!(sim["engines"], 2);
    assert!(
        models.iter().all(|m| m["name"] != "nope"),
        "unknown names are not models"
    );
}

/// GET `url` until `ok` holds for its JSON (10 s at most).
async fn eventually_json(c: &reqwest::Client, url: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = get_json(c, url).await;
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
