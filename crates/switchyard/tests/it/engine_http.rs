//! The engine's HTTP API against real processes: vLLM's captured answers, streaming,
//! prefix caching, disconnects, bad input and metrics.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::{client, get_json, metric, Proc};

fn fixture(name: &str) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/vllm-reference/"
    );
    std::fs::read_to_string(format!("{path}{name}"))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name))
        .unwrap_or_else(|e| panic!("fixture {name} is not JSON: {e}"))
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// An engine configured like the one the captures came from.
fn vllm_like(extra: &[&str]) -> Proc {
    let mut args = vec![
        "--served-model-name",
        "smollm2",
        "--max-model-len",
        "2048",
        "--sim-preset",
        "zero",
    ];
    args.extend_from_slice(extra);
    Proc::engine(&args)
}

async fn post(c: &reqwest::Client, url: &str, body: &str) -> (u16, String) {
    let r = c
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

/// Status, error type, param and code match vLLM's capture; `exact` also the message.
fn assert_same_error(case: &str, status: u16, body: &str, exact: bool) {
    let want_status: u16 = fixture(&format!("{case}.status"))
        .trim()
        .parse()
        .expect("status");
    assert_eq!(status, want_status, "{case}: status; body {body}");
    let want = fixture_json(&format!("{case}.body"));
    let got: Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("{case}: not JSON: {body}"));
    for field in ["type", "code"] {
        assert_eq!(
            got["error"][field], want["error"][field],
            "{case}: error.{field}; got {body}"
        );
    }
    if case.starts_with("err_malformed_json") {
        // vLLM names the byte offset of the syntax error in its own request body.
        let param = got["error"]["param"].as_str().unwrap_or("");
        assert!(
            param.starts_with("body.") && param[5..].parse::<usize>().is_ok(),
            "{case}: param {param}"
        );
    } else {
        assert_eq!(
            got["error"]["param"], want["error"]["param"],
            "{case}: error.param; got {body}"
        );
    }
    if exact {
        assert_eq!(
            got["error"]["message"], want["error"]["message"],
            "{case}: message"
        );
    } else {
        assert!(
            got["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{case}: message"
        );
    }
}

#[tokio::test]
async fn errors_match_vllm_captures() {
    let e = vllm_like(&[]);
    let c = client();
    let chat = e.url("/v1/chat/completions");
    let comp = e.url("/v1/completions");
    let msgs = json!([{"role": "user", "content": "hi"}]);

    let (s, b) = post(
        &c,
        &chat,
        r#"{"model":"smollm2","messages":[{"role":"user","content":"hi"}] "max_tokens":5}"#,
    )
    .await;
    assert_same_error("err_malformed_json", s, &b, false);
    let (s, b) = post(&c, &comp, r#"{"model":"smollm2","prompt":}"#).await;
    assert_same_error("err_malformed_json_completions", s, &b, false);
    let (s, b) = post(&c, &chat, r#"{"model":"smollm2"}"#).await;
    assert_same_error("err_missing_messages", s, &b, false);
    let (s, b) = post(
        &c,
        &chat,
        &json!({"model":"smollm2","messages":msgs,"max_tokens":-5}).to_string(),
    )
    .await;
    assert_same_error("err_negative_max_tokens", s, &b, true);
    let (s, b) = post(
        &c,
        &comp,
        &json!({"model":"smollm2","prompt":"hi","max_tokens":-5}).to_string(),
    )
    .await;
    assert_same_error("err_negative_max_tokens_completions", s, &b, true);
    let (s, b) = post(
        &c,
        &chat,
        &json!({"model":"smollm2","messages":msgs,"max_tokens":5000}).to_string(),
    )
    .await;
    assert_same_error("err_max_tokens_exceeds_ctx", s, &b, true);
    let (s, b) = post(
        &c,
        &chat,
        &json!({"model":"nope","messages":msgs}).to_string(),
    )
    .await;
    assert_same_error("err_unknown_model", s, &b, true);
    let (s, b) = post(
        &c,
        &comp,
        &json!({"model":"nope","prompt":"hi"}).to_string(),
    )
    .await;
    assert_same_error("err_unknown_model_completions", s, &b, true);
    let (s, b) = post(
        &c,
        &chat,
        &json!({"model":"smollm2","messages":msgs,"temperature":"hot"}).to_string(),
    )
    .await;
    assert_same_error("err_temperature_string", s, &b, false);
    let (s, b) = post(
        &c,
        &comp,
        &json!({"model":"smollm2","prompt":"hi","temperature":"hot"}).to_string(),
    )
    .await;
    assert_same_error("err_temperature_string_completions", s, &b, false);

    // A prompt of 2049 tokens against a 2048 context: vLLM's exact message.
    let long: Vec<u32> = (0..2049).map(|i| 1000 + i).collect();
    let (s, b) = post(
        &c,
        &comp,
        &json!({"model":"smollm2","prompt":long}).to_string(),
    )
    .await;
    assert_same_error("err_prompt_too_long_completions", s, &b, true);
    let long_text = "word ".repeat(2100);
    let (s, b) = post(
        &c,
        &chat,
        &json!({"model":"smollm2","messages":[{"role":"user","content":long_text}]}).to_string(),
    )
    .await;
    assert_same_error("err_prompt_too_long", s, &b, false);

    // A prompt that fits but leaves little room is cut with finish_reason "length".
    let fits: Vec<u32> = (0..2000).map(|i| 1000 + i).collect();
    let (s, b) = post(
        &c,
        &comp,
        &json!({"model":"smollm2","prompt":fits,"max_tokens":100,"ignore_eos":true}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).expect("json");
    let want = fixture_json("err_prompt_plus_max_tokens.body");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 2000, "total_tokens": 2048, "completion_tokens": 48})
    );
    assert_eq!(v["usage"]["total_tokens"], want["usage"]["total_tokens"]);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // No content type.
    let r = c
        .post(&chat)
        .body(json!({"model":"smollm2","messages":msgs}).to_string())
        .send()
        .await
        .expect("send");
    let s = r.status().as_u16();
    assert_same_error(
        "err_no_content_type",
        s,
        &r.text().await.expect("body"),
        true,
    );

    // Unknown route and wrong method: FastAPI's `detail` bodies.
    let r = c.get(e.url("/v1/nope")).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(
        r.text().await.expect("body"),
        fixture("err_404_route.body").trim()
    );
    let r = c.get(&chat).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(
        r.text().await.expect("body"),
        fixture("err_405_method.body").trim()
    );

    // A missing `model` is accepted and the served model answers.
    let (s, b) = post(
        &c,
        &chat,
        &json!({"messages":msgs,"max_tokens":3}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        serde_json::from_str::<Value>(&b).expect("json")["model"],
        "smollm2"
    );
}

#[tokio::test]
async fn bodies_have_vllm_shapes() {
    let e = vllm_like(&[]);
    let c = client();
    let msgs = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let (s, b) = post(
        &c,
        &e.url("/v1/chat/completions"),
        &json!({"model":"smollm2","messages":msgs,"max_tokens":8}).to_string(),
    )
    .await;
    assert_eq!(s, 200);
    let got: Value = serde_json::from_str(&b).expect("json");
    let want = fixture_json("chat.body");
    let extra: Vec<_> = keys(&got).difference(&keys(&want)).cloned().collect();
    assert!(extra.is_empty(), "keys vLLM does not send: {extra:?}");
    for k in ["id", "object", "created", "model", "choices", "usage"] {
        assert!(got.get(k).is_some(), "missing {k}");
    }
    assert!(got["id"]
        .as_str()
        .is_some_and(|s| s.starts_with("chatcmpl-")));
    let (gc, wc) = (&got["choices"][0], &want["choices"][0]);
    assert!(
        keys(gc).difference(&keys(wc)).next().is_none(),
        "choice keys {:?}",
        keys(gc)
    );
    assert_eq!(keys(&gc["message"]), keys(&wc["message"]));
    assert_eq!(gc["message"]["role"], "assistant");
    let usage_keys = ["prompt_tokens", "total_tokens", "completion_tokens"];
    for k in usage_keys {
        assert!(got["usage"][k].as_u64().is_some(), "usage.{k}");
    }
    assert_eq!(got["usage"]["completion_tokens"], 8);

    let (s, b) = post(
        &c,
        &e.url("/v1/completions"),
        &json!({"model":"smollm2","prompt":"The capital of France is","max_tokens":16}).to_string(),
    )
    .await;
    assert_eq!(s, 200);
    let got: Value = serde_json::from_str(&b).expect("json");
    let want = fixture_json("completions.body");
    assert!(
        keys(&got).difference(&keys(&want)).next().is_none(),
        "{:?}",
        keys(&got)
    );
    assert!(keys(&got["choices"][0])
        .difference(&keys(&want["choices"][0]))
        .next()
        .is_none());
    assert_eq!(got["object"], "text_completion");

    let models: Value = get_json(&c, &e.url("/v1/models")).await;
    let want = fixture_json("models.body");
    assert_eq!(models["object"], want["object"]);
    assert_eq!(models["data"][0]["id"], "smollm2");
    assert_eq!(
        models["data"][0]["max_model_len"],
        want["data"][0]["max_model_len"]
    );
    for k in [
        "id",
        "object",
        "created",
        "owned_by",
        "root",
        "parent",
        "max_model_len",
    ] {
        assert!(models["data"][0].get(k).is_some(), "model card lacks {k}");
    }

    let r = c.get(e.url("/health")).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.expect("body"), "");
    let v: Value = get_json(&c, &e.url("/version")).await;
    assert!(v["version"].as_str().is_some());

    let tok: Value = c
        .post(e.url("/tokenize"))
        .json(&json!({"model":"smollm2","prompt":"Hello, world."}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(keys(&tok), keys(&fixture_json("tokenize.body")));
    assert_eq!(
        tok["count"].as_u64(),
        tok["tokens"].as_array().map(|a| a.len() as u64)
    );
    let de: Value = c
        .post(e.url("/detokenize"))
        .json(&json!({"model":"smollm2","tokens":tok["tokens"]}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(de["prompt"], "Hello, world.");
    let chat_tok: Value = c
        .post(e.url("/tokenize"))
        .json(&json!({"model":"smollm2","messages":[{"role":"user","content":"hi"}]}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert!(
        chat_tok["count"].as_u64().unwrap_or(0) > 3,
        "chat template applied: {chat_tok}"
    );
}

/// Split an SSE body into its `data:` payloads, checking vLLM's framing on the way.
fn sse_payloads(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "stream must end with [DONE]: {body:?}"
    );
    body.split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| {
            f.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("frame without data: {f:?}"))
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn streaming_matches_vllm_framing() {
    let e = vllm_like(&[]);
    let c = client();
    let req = json!({"model":"smollm2","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true,
        "stream_options":{"include_usage":true}});
    let r = c
        .post(e.url("/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .expect("send");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let want_ct = fixture("chat_stream.headers").lines().find_map(|l| {
        l.strip_prefix("content-type: ")
            .map(|v| v.trim().to_string())
    });
    assert_eq!(ct, want_ct);
    let body = r.text().await.expect("body");
    let ours = sse_payloads(&body);
    let theirs = sse_payloads(&fixture("chat_stream_usage.body"));
    assert_eq!(ours.last().map(String::as_str), Some("[DONE]"));
    let parse = |s: &String| serde_json::from_str::<Value>(s).expect("chunk json");
    let (o, t): (Vec<Value>, Vec<Value>) = (
        ours[..ours.len() - 1].iter().map(parse).collect(),
        theirs[..theirs.len() - 1].iter().map(parse).collect(),
    );
    // First chunk: the role, empty content.
    assert_eq!(o[0]["choices"][0]["delta"], t[0]["choices"][0]["delta"]);
    assert_eq!(o[0]["object"], "chat.completion.chunk");
    // Five token chunks, the last with finish_reason, then the usage chunk.
    assert_eq!(o.len(), 1 + 5 + 1, "{body}");
    let finishes: Vec<_> = o
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finishes.len(), 1);
    assert_eq!(o[5]["choices"][0]["finish_reason"], "length");
    let (ou, tu) = (&o[o.len() - 1], &t[t.len() - 1]);
    assert_eq!(ou["choices"], json!([]));
    assert_eq!(keys(&ou["usage"]), keys(&tu["usage"]));
    assert_eq!(ou["usage"]["completion_tokens"], 5);
    // Every chunk shares the id.
    assert!(o.iter().all(|c| c["id"] == o[0]["id"]));

    // Completions: no role chunk, finish on the last text chunk.
    let r = c
        .post(e.url("/v1/completions"))
        .json(&json!({"model":"smollm2","prompt":"The capital of France is","max_tokens":4,"stream":true}))
        .send()
        .await
        .expect("send");
    let body = r.text().await.expect("body");
    let ours = sse_payloads(&body);
    assert_eq!(ours.len(), 4 + 1);
    let last: Value = serde_json::from_str(&ours[3]).expect("json");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let want = fixture("completions_stream.body");
    let first_theirs: Value = serde_json::from_str(&sse_payloads(&want)[0]).expect("json");
    let first_ours: Value = serde_json::from_str(&ours[0]).expect("json");
    assert!(keys(&first_ours["choices"][0])
        .difference(&keys(&first_theirs["choices"][0]))
        .next()
        .is_none());
}

#[tokio::test]
async fn chunks_arrive_incrementally() {
    // 10 ms per step at scale 1: 20 tokens take ~200 ms; the first must come long before.
    let e = Proc::engine(&["--sim-preset", "zero", "--sim-step-overhead-us", "10000"]);
    let c = client();
    let t0 = Instant::now();
    let r = c
        .post(e.url("/v1/completions"))
        .json(&json!({"prompt":"count","max_tokens":20,"stream":true,"ignore_eos":true}))
        .send()
        .await
        .expect("send");
    let mut stream = r.bytes_stream();
    let mut arrivals = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        arrivals.push((t0.elapsed(), chunk.len()));
    }
    assert!(
        arrivals.len() >= 10,
        "expected many separate chunks, got {}",
        arrivals.len()
    );
    let (first, last) = (arrivals[0].0, arrivals[arrivals.len() - 1].0);
    assert!(
        last >= first + Duration::from_millis(100),
        "first {first:?} last {last:?}: not streamed"
    );
}

async fn metrics_page(c: &reqwest::Client, e: &Proc) -> String {
    c.get(e.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

async fn ttft(c: &reqwest::Client, e: &Proc, prompt: &[u32]) -> Duration {
    let t0 = Instant::now();
    let r = c
        .post(e.url("/v1/completions"))
        .json(&json!({"prompt":prompt,"max_tokens":2,"stream":true,"ignore_eos":true}))
        .send()
        .await
        .expect("send");
    let mut s = r.bytes_stream();
    let first = s.next().await.expect("a chunk").expect("chunk ok");
    let at = t0.elapsed();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    while s.next().await.is_some() {}
    at
}

#[tokio::test]
async fn shared_prefix_hits_the_cache_and_lowers_ttft() {
    // The H100 preset: ~32 µs per prefill token, so 1,000 uncached tokens cost ~32 ms.
    let e = Proc::engine(&["--sim-preset", "llama-3.1-8b-h100"]);
    let c = client();
    let prefix: Vec<u32> = (0..1000).map(|i| 5000 + i).collect();
    let a: Vec<u32> = prefix.iter().copied().chain([1, 2, 3, 4, 5]).collect();
    let b: Vec<u32> = prefix.iter().copied().chain([6, 7, 8, 9, 10]).collect();
    let before = metrics_page(&c, &e).await;
    let hits0 = metric(&before, "vllm:prefix_cache_hits_total", &[]).expect("hits metric");
    let t_first = ttft(&c, &e, &a).await;
    let mid = metrics_page(&c, &e).await;
    assert_eq!(
        metric(&mid, "vllm:prefix_cache_hits_total", &[]),
        Some(hits0),
        "cold request hit nothing"
    );
    let t_second = ttft(&c, &e, &b).await;
    let after = metrics_page(&c, &e).await;
    // The 1,000 shared tokens fill 62 blocks of 16: 992 tokens are hits.
    assert_eq!(
        metric(&after, "vllm:prefix_cache_hits_total", &[]),
        Some(hits0 + 992.0)
    );
    assert_eq!(
        metric(&after, "vllm:prefix_cache_queries_total", &[]),
        metric(&before, "vllm:prefix_cache_queries_total", &[]).map(|q| q + 2.0 * 1005.0)
    );
    assert!(
        t_second < t_first,
        "cached TTFT {t_second:?} should beat cold {t_first:?}"
    );
}

async fn wait_metric(
    c: &reqwest::Client,
    e: &Proc,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = metrics_page(c, e).await;
        let v = metric(&page, name, labels);
        if v == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed {v:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn client_disconnect_aborts_and_frees_blocks() {
    let e = Proc::engine(&["--sim-preset", "zero", "--sim-step-overhead-us", "20000"]);
    let c = client();
    for stream in [true, false] {
        let req = json!({"prompt":"tell me a long story","max_tokens":1000,"stream":stream,"ignore_eos":true});
        let fut = c.post(e.url("/v1/completions")).json(&req).send();
        if stream {
            let r = fut.await.expect("send");
            let mut s = r.bytes_stream();
            let _ = s.next().await.expect("first chunk");
            wait_metric(&c, &e, "vllm:num_requests_running", &[], 1.0).await;
            drop(s);
        } else {
            // Give up on a non-streamed request while it runs.
            let _ = tokio::time::timeout(Duration::from_millis(300), fut).await;
        }
        wait_metric(&c, &e, "vllm:num_requests_running", &[], 0.0).await;
        wait_metric(&c, &e, "vllm:kv_cache_usage_perc", &[], 0.0).await;
    }
    let page = metrics_page(&c, &e).await;
    assert_eq!(
        metric(
            &page,
            "vllm:request_success_total",
            &[("finished_reason", "abort")]
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn bad_input_gets_4xx_json_and_others_keep_being_served() {
    let e = Proc::engine(&["--sim-preset", "zero", "--sim-step-overhead-us", "2000"]);
    let c = client();
    // A long stream in flight while the bad requests arrive.
    let inflight = {
        let c = c.clone();
        let url = e.url("/v1/completions");
        tokio::spawn(async move {
            let r = c
                .post(url)
                .json(&json!({"prompt":"steady","max_tokens":100,"stream":true,"ignore_eos":true}))
                .send()
                .await
                .expect("send");
            r.text().await.expect("body")
        })
    };
    let chat = e.url("/v1/chat/completions");
    let huge = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(10 * 1024 * 1024)
    );
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed", b"{not json".to_vec(), 400),
        ("not utf-8", vec![0xff, 0xfe, 0x00, 0x7b], 400),
        ("array", b"[1,2,3]".to_vec(), 400),
        ("deeply nested", nested.into_bytes(), 400),
        (
            "unknown model",
            br#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
        ),
        (
            "messages wrong type",
            br#"{"messages":"hello"}"#.to_vec(),
            400,
        ),
        (
            "content wrong type",
            br#"{"messages":[{"role":"user","content":5}]}"#.to_vec(),
            400,
        ),
        (
            "max_tokens string",
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"many"}"#.to_vec(),
            400,
        ),
        (
            "negative max_tokens",
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#.to_vec(),
            400,
        ),
        (
            "n=0",
            br#"{"messages":[{"role":"user","content":"x"}],"n":0}"#.to_vec(),
            400,
        ),
        (
            "n above the limit",
            br#"{"messages":[{"role":"user","content":"x"}],"n":129}"#.to_vec(),
            400,
        ),
        (
            "top_p 0",
            br#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#.to_vec(),
            400,
        ),
        (
            "negative temperature",
            br#"{"messages":[{"role":"user","content":"x"}],"temperature":-1}"#.to_vec(),
            400,
        ),
        (
            "empty stop",
            br#"{"messages":[{"role":"user","content":"x"}],"stop":[""]}"#.to_vec(),
            400,
        ),
        (
            "min > max",
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":2,"min_tokens":5}"#
                .to_vec(),
            400,
        ),
        ("empty messages", br#"{"messages":[]}"#.to_vec(), 400),
        ("10 MB body", huge.into_bytes(), 413),
    ];
    for (name, body, want) in cases {
        let r = c
            .post(&chat)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect(name);
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        assert_eq!(status, want, "{name}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{name}: not JSON: {text}"));
        assert_eq!(v["error"]["code"], want, "{name}: {text}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert!(v["error"]["type"].as_str().is_some(), "{name}");
    }
    let body = inflight.await.expect("in-flight request");
    assert_eq!(
        sse_payloads(&body).len(),
        100 + 1,
        "the in-flight stream completed"
    );
    let (s, _) = post(
        &c,
        &chat,
        r#"{"messages":[{"role":"user","content":"still there?"}],"max_tokens":3}"#,
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn metrics_have_vllm_names_and_counters_move() {
    let e = Proc::engine(&["--sim-preset", "zero"]);
    let c = client();
    let before = metrics_page(&c, &e).await;
    let vllm_names = fixture("metric_names.txt");
    let known = |n: &str| {
        vllm_names
            .lines()
            .any(|l| l.split_whitespace().next() == Some(n))
    };
    for (name, in_032) in [
        ("vllm:num_requests_running", true),
        ("vllm:num_requests_waiting", true),
        ("vllm:kv_cache_usage_perc", true),
        ("vllm:gpu_cache_usage_perc", false),
        ("vllm:prefix_cache_queries_total", true),
        ("vllm:prefix_cache_hits_total", true),
        ("vllm:gpu_prefix_cache_queries_total", false),
        ("vllm:gpu_prefix_cache_hits_total", false),
        ("vllm:prompt_tokens_total", true),
        ("vllm:generation_tokens_total", true),
        ("vllm:num_preemptions_total", true),
        ("vllm:time_to_first_token_seconds_count", false),
        ("vllm:inter_token_latency_seconds_count", false),
        ("vllm:e2e_request_latency_seconds_count", false),
        ("vllm:request_queue_time_seconds_count", false),
        ("vllm:cache_config_info", true),
    ] {
        let labels: &[(&str, &str)] = if name == "vllm:cache_config_info" {
            &[("engine", "0")]
        } else {
            &[("engine", "0"), ("model_name", "switchyard-sim")]
        };
        assert!(metric(&before, name, labels).is_some(), "{name} missing");
        assert_eq!(
            known(name),
            in_032,
            "{name}: vLLM 0.32.0 lists it: {}",
            known(name)
        );
    }
    assert!(metric(
        &before,
        "vllm:cache_config_info",
        &[("block_size", "16"), ("num_gpu_blocks", "16384")]
    )
    .is_some());
    let gen0 = metric(&before, "vllm:generation_tokens_total", &[]).expect("gen");
    for _ in 0..3 {
        let (s, _) = post(
            &c,
            &e.url("/v1/completions"),
            r#"{"prompt":"hi","max_tokens":7,"ignore_eos":true}"#,
        )
        .await;
        assert_eq!(s, 200);
    }
    let after = metrics_page(&c, &e).await;
    assert_eq!(
        metric(&after, "vllm:generation_tokens_total", &[]),
        Some(gen0 + 21.0)
    );
    assert_eq!(
        metric(
            &after,
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(&after, "vllm:time_to_first_token_seconds_count", &[]),
        Some(3.0)
    );
    assert_eq!(
        metric(&after, "vllm:inter_token_latency_seconds_count", &[]),
        Some(18.0)
    );
    assert_eq!(
        metric(&after, "vllm:e2e_request_latency_seconds_count", &[]),
        Some(3.0)
    );
}

/// `continue_final_message`: the final assistant message is left open and continued (the
/// prompt is the render cut after its text), as vLLM does; with `add_generation_prompt`
/// true (explicitly or by default) it is a 400. A completion prompt may end mid-word.
#[tokio::test]
async fn chat_continues_the_final_message() {
    let e = vllm_like(&[]);
    let c = client();
    let url = e.url("/v1/chat/completions");
    let body = |extra: Value| {
        let mut b = json!({"model":"smollm2","max_tokens":4,"temperature":0,"seed":3,
            "ignore_eos":true,"messages":[{"role":"user","content":"hi"},
            {"role":"assistant","content":"Hello wor"}]});
        for (k, v) in extra.as_object().into_iter().flatten() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    let (status, text) = post(
        &c,
        &url,
        &body(json!({"continue_final_message":true,"add_generation_prompt":false})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    // The prompt is the render up to the open message's text: no end-of-turn after it.
    let open = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello wor";
    let (_, toks) = post(
        &c,
        &e.url("/tokenize"),
        &json!({"model":"smollm2","prompt":open}).to_string(),
    )
    .await;
    let toks: Value = serde_json::from_str(&toks).expect("json");
    assert_eq!(v["usage"]["prompt_tokens"], toks["count"], "{v}");
    // /tokenize renders chat the same way.
    let (_, chat_toks) = post(
        &c,
        &e.url("/tokenize"),
        &json!({"model":"smollm2","continue_final_message":true,"add_generation_prompt":false,
                "messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"Hello wor"}]})
        .to_string(),
    )
    .await;
    let chat_toks: Value = serde_json::from_str(&chat_toks).expect("json");
    assert_eq!(chat_toks["tokens"], toks["tokens"]);
    // vLLM's default generation prompt must be turned off explicitly.
    let (status, text) = post(&c, &url, &body(json!({"continue_final_message":true}))).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("are not compatible"), "{text}");
    let (status, text) = post(
        &c,
        &url,
        &body(json!({"continue_final_message":true,"add_generation_prompt":true})),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text
        .contains("Cannot set both `continue_final_message` and `add_generation_prompt` to True."));
    // A completion prompt that ends mid-word is served as it is.
    let (status, text) = post(
        &c,
        &e.url("/v1/completions"),
        &json!({"model":"smollm2","prompt":"Hello wor","max_tokens":3}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
}
