//! The front door end to end: API keys (the router's keys file and shared key, the
//! engine's `--api-key`), per-key rate limits, and the concurrency limit with its queue.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::{client, get_text, metric, Proc};

const ALICE: &str = "sk-alice-7f3a9c21d4e8";
const BOB: &str = "sk-bob-52be0a91c3d7";
/// Carol's key is in the file only as its SHA-256.
const CAROL: &str = "sk-carol-0c9e44b1a6f2";
const ENGINE_KEY: &str = "sk-engine-18d2f7e3b5a0";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-admission-{name}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Replace `path` whole (written aside, then renamed), as a config tool would.
fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn sha256_hex(s: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

async fn post(
    c: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: Value,
) -> (u16, Option<String>, Value) {
    let mut req = c.post(url).json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    (status, retry, v)
}

fn chat(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "messages":[{"role":"user","content":"hi"}], "max_tokens": max_tokens, "ignore_eos": true})
}

/// Poll until `f` holds (10 s at most).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn engine_api_key_guards_everything_but_health_and_metrics() {
    let e = Proc::engine(&["--sim-preset", "zero", "--api-key", ENGINE_KEY]);
    let c = client();
    let url = e.url("/v1/chat/completions");
    for key in [None, Some("wrong"), Some("")] {
        let (status, _, body) = post(&c, &url, key, chat("switchyard-sim", 2)).await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(body, json!({"error": "Unauthorized"}), "vLLM's body");
    }
    let resp = c.get(e.url("/v1/models")).send().await.expect("send");
    assert_eq!(resp.status(), 401);
    let (status, _, body) = post(&c, &url, Some(ENGINE_KEY), chat("switchyard-sim", 2)).await;
    assert_eq!(status, 200, "{body}");
    for open in ["/health", "/metrics", "/version"] {
        let resp = c.get(e.url(open)).send().await.expect("send");
        assert_eq!(resp.status(), 200, "{open}");
    }
    let resp = c
        .get(e.url("/v1/models"))
        .header("authorization", format!("bearer {ENGINE_KEY}"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200, "the scheme in any case, as vLLM");
}

#[tokio::test]
async fn keys_are_checked_revoked_by_a_file_change_and_never_logged() {
    // The engine has its own key: a request reaches it only if the router sends the
    // engine key in place of the client's.
    let e = Proc::engine(&["--sim-preset", "zero", "--api-key", ENGINE_KEY]);
    let dir = scratch("keys");
    let file = dir.join("keys.yaml");
    let carol_hash = sha256_hex(CAROL);
    let all = format!(
        "keys:\n  - name: alice\n    key: {ALICE}\n    models: [switchyard-sim]\n  - name: bob\n    key: {BOB}\n    models: [other]\n  - name: carol\n    key_sha256: {carol_hash}\n"
    );
    write_file(&file, &all);
    let log = Arc::new(Mutex::new(Vec::new()));
    let r = Proc::start_logged(
        &[
            "router",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--static-backends",
            &e.url,
            "--api-keys-file",
            file.to_str().expect("path"),
            "--api-keys-interval",
            "0.1",
            "--engine-api-key",
            ENGINE_KEY,
            "--log-level",
            "debug",
        ],
        log.clone(),
    );
    let c = client();
    let url = r.url("/v1/chat/completions");

    let (status, _, body) = post(&c, &url, None, chat("switchyard-sim", 2)).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "AuthenticationError", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let (status, _, body) = post(&c, &url, Some("sk-nobody"), chat("switchyard-sim", 2)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], 401, "{body}");
    let resp = c.get(r.url("/v1/models")).send().await.expect("send");
    assert_eq!(resp.status(), 401);

    let (status, _, body) = post(&c, &url, Some(ALICE), chat("switchyard-sim", 2)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = post(&c, &url, Some(CAROL), chat("switchyard-sim", 2)).await;
    assert_eq!(status, 200, "a key given by its SHA-256: {body}");
    let (status, _, body) = post(&c, &url, Some(BOB), chat("switchyard-sim", 2)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["type"], "PermissionDeniedError", "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");

    // /v1/models lists what the key may use.
    let models = |key: &'static str| {
        let c = c.clone();
        let u = r.url("/v1/models");
        async move {
            let v: Value = c
                .get(u)
                .bearer_auth(key)
                .send()
                .await
                .expect("send")
                .json()
                .await
                .expect("json");
            v["data"].as_array().map(Vec::len).unwrap_or(99)
        }
    };
    assert_eq!(models(ALICE).await, 1);
    assert_eq!(models(BOB).await, 0);
    for open in ["/health", "/metrics", "/version", "/dashboard", "/engines"] {
        let resp = c.get(r.url(open)).send().await.expect("send");
        assert_eq!(resp.status(), 200, "{open} stays open");
    }

    // A file that does not parse keeps the keys in force.
    write_file(&file, "keys:\n  - name: [broken\n");
    eventually("the bad file is reported", || {
        let log = log.clone();
        async move {
            log.lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("API keys file not applied"))
        }
    })
    .await;
    let (status, _, _) = post(&c, &url, Some(ALICE), chat("switchyard-sim", 2)).await;
    assert_eq!(status, 200, "a bad file revoked the keys");

    // Revoking alice: her key stops working, the others go on.
    let without_alice = all.replace(
        &format!("  - name: alice\n    key: {ALICE}\n    models: [switchyard-sim]\n"),
        "",
    );
    assert_ne!(without_alice, all);
    write_file(&file, &without_alice);
    eventually("alice's key is revoked", || {
        let c = c.clone();
        let url = url.clone();
        async move {
            post(&c, &url, Some(ALICE), chat("switchyard-sim", 2))
                .await
                .0
                == 401
        }
    })
    .await;
    let (status, _, _) = post(&c, &url, Some(CAROL), chat("switchyard-sim", 2)).await;
    assert_eq!(status, 200);

    // Metrics per key name; no key text anywhere, in the metrics or the log.
    let m = get_text(&c, &r.url("/metrics")).await;
    assert!(
        metric(
            &m,
            "vllm:router_api_key_requests_total",
            &[("key", "carol")]
        )
        .is_some_and(|v| v >= 2.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "vllm:router_api_key_rejections_total",
            &[("key", "bob"), ("reason", "model_not_allowed")]
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &m,
            "vllm:router_api_key_rejections_total",
            &[("key", "anonymous"), ("reason", "invalid_key")]
        )
        .is_some_and(|v| v >= 2.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "vllm:router_api_key_rejections_total",
            &[("key", "anonymous"), ("reason", "missing_key")]
        ),
        Some(2.0)
    );
    assert!(
        !m.contains("key=\"alice\""),
        "a revoked name leaves the metrics"
    );
    let lines = log.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("router::access") && l.contains("carol")),
        "the access log names the key"
    );
    for secret in [ALICE, BOB, CAROL, ENGINE_KEY, carol_hash.as_str()] {
        assert!(!m.contains(secret), "a key in /metrics");
        if let Some(l) = lines.iter().find(|l| l.contains(secret)) {
            panic!("a key in the log: {l}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_above_the_limit_only() {
    let e = Proc::engine(&["--sim-preset", "zero"]);
    let dir = scratch("limits");
    let file = dir.join("keys.json");
    write_file(
        &file,
        &json!({"keys": [
            {"name": "five", "key": ALICE, "limits": {"requests_per_minute": 5}},
            {"name": "tokens", "key": BOB, "limits": {"tokens_per_minute": 600}},
            {"name": "roomy", "key": CAROL, "limits": {"requests_per_minute": 30, "tokens_per_minute": 100000}},
        ]})
        .to_string(),
    );
    let r = Proc::router(
        &[&e.url],
        &["--api-keys-file", file.to_str().expect("path")],
    );
    let c = client();
    let url = r.url("/v1/chat/completions");

    // A burst at the limit passes; one more is refused until the bucket refills.
    for i in 0..5 {
        let (status, _, body) = post(&c, &url, Some(ALICE), chat("switchyard-sim", 2)).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
    let (status, retry, body) = post(&c, &url, Some(ALICE), chat("switchyard-sim", 2)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "RateLimitError", "{body}");
    let retry: u64 = retry.expect("Retry-After").parse().expect("seconds");
    assert!(
        (1..=12).contains(&retry),
        "5 a minute refills one in 12 s: {retry}"
    );

    // A burst under its limit: none refused.
    for i in 0..20 {
        let (status, _, body) = post(&c, &url, Some(CAROL), chat("switchyard-sim", 2)).await;
        assert_eq!(status, 200, "request {i} under the limit: {body}");
    }

    // Tokens: prompt bytes / 4 + max_tokens against 600 a minute.
    let (status, _, body) = post(&c, &url, Some(BOB), chat("switchyard-sim", 400)).await;
    assert_eq!(status, 200, "{body}");
    let (status, retry, body) = post(&c, &url, Some(BOB), chat("switchyard-sim", 400)).await;
    assert_eq!(status, 429, "{body}");
    assert!(retry.is_some(), "Retry-After when waiting helps");
    let (status, retry, body) = post(&c, &url, Some(BOB), chat("switchyard-sim", 5000)).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        retry.is_none(),
        "no Retry-After for a request no wait admits"
    );

    let m = get_text(&c, &r.url("/metrics")).await;
    assert_eq!(
        metric(
            &m,
            "vllm:router_api_key_rejections_total",
            &[("key", "five"), ("reason", "requests_per_minute")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "vllm:router_api_key_rejections_total",
            &[("key", "tokens"), ("reason", "tokens_per_minute")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            "vllm:router_api_key_rejections_total",
            &[("key", "roomy"), ("reason", "requests_per_minute")]
        ),
        Some(0.0)
    );
    assert!(
        metric(&m, "vllm:router_api_key_tokens_total", &[("key", "tokens")])
            .is_some_and(|v| v >= 400.0),
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A streamed request that takes about `max_tokens` × 20 ms on the slow engine.
async fn slow_stream(c: &reqwest::Client, r: &Proc, max_tokens: u64) -> reqwest::Response {
    c.post(r.url("/v1/completions"))
        .json(&json!({"model":"switchyard-sim","prompt":"x","max_tokens":max_tokens,"stream":true,"ignore_eos":true}))
        .send()
        .await
        .expect("send")
}

async fn gauge(c: &reqwest::Client, r: &Proc, name: &str) -> Option<f64> {
    metric(&get_text(c, &r.url("/metrics")).await, name, &[])
}

#[tokio::test]
async fn the_queue_bounds_concurrency_answering_429_when_full_and_408_after_waiting() {
    let e = Proc::engine(&["--sim-preset", "zero", "--sim-step-overhead-us", "20000"]);
    let r = Proc::router(
        &[&e.url],
        &[
            "--max-concurrent-requests",
            "1",
            "--queue-size",
            "1",
            "--queue-timeout-secs",
            "30",
        ],
    );
    let c = client();
    const IN_FLIGHT: &str = "vllm:router_admission_in_flight";
    const QUEUED: &str = "vllm:router_admission_queue_depth";

    // The first holds the slot for as long as its stream lasts, headers or not.
    let first = slow_stream(&c, &r, 200).await;
    assert_eq!(first.status(), 200);
    assert_eq!(gauge(&c, &r, IN_FLIGHT).await, Some(1.0));
    // The second waits in the queue.
    let second = tokio::spawn({
        let c = c.clone();
        let url = r.url("/v1/completions");
        async move {
            let resp = c
                .post(url)
                .json(&json!({"model":"switchyard-sim","prompt":"x","max_tokens":2,"ignore_eos":true}))
                .send()
                .await
                .expect("send");
            resp.status().as_u16()
        }
    });
    eventually("the second request is queued", || async {
        gauge(&c, &r, QUEUED).await == Some(1.0)
    })
    .await;
    // The third finds the queue full.
    let (status, retry, body) = post(
        &c,
        &r.url("/v1/completions"),
        None,
        json!({"model":"switchyard-sim","prompt":"x","max_tokens":2}),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(retry.is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)));
    assert_eq!(body["error"]["type"], "RateLimitError", "{body}");
    // The stream ends; the queued request gets the slot.
    let body = first.text().await.expect("stream");
    assert!(body.ends_with("data: [DONE]\n\n"));
    assert_eq!(second.await.expect("join"), 200);
    eventually("the slot is free again", || async {
        gauge(&c, &r, IN_FLIGHT).await == Some(0.0)
    })
    .await;

    // A client that goes away mid-stream frees the slot too.
    let mut s = slow_stream(&c, &r, 2000).await.bytes_stream();
    s.next().await.expect("first chunk").expect("ok");
    assert_eq!(gauge(&c, &r, IN_FLIGHT).await, Some(1.0));
    drop(s);
    eventually("a dropped stream frees its slot", || async {
        gauge(&c, &r, IN_FLIGHT).await == Some(0.0)
    })
    .await;
    let m = get_text(&c, &r.url("/metrics")).await;
    assert_eq!(
        metric(
            &m,
            "vllm:router_admission_rejections_total",
            &[("reason", "queue_full")]
        ),
        Some(1.0)
    );

    // With a short queue timeout, a queued request gets 408.
    let r = Proc::router(
        &[&e.url],
        &[
            "--max-concurrent-requests",
            "1",
            "--queue-timeout-secs",
            "0.3",
        ],
    );
    let first = slow_stream(&c, &r, 100).await;
    assert_eq!(first.status(), 200);
    let t0 = Instant::now();
    let (status, retry, body) = post(
        &c,
        &r.url("/v1/completions"),
        None,
        json!({"model":"switchyard-sim","prompt":"x","max_tokens":2}),
    )
    .await;
    assert_eq!(status, 408, "{body}");
    assert!(retry.is_none());
    assert!(t0.elapsed() >= Duration::from_millis(250), "it waited");
    drop(first);
    let m = get_text(&c, &r.url("/metrics")).await;
    assert_eq!(
        metric(
            &m,
            "vllm:router_admission_rejections_total",
            &[("reason", "queue_timeout")]
        ),
        Some(1.0)
    );
}
