//! Prefill/decode disaggregation (vLLM's NixlConnector contract) between sim engines (the engine side: `it/pd.rs` is the router side):
//! the test plays the router (the prefill body with `max_tokens: 1` and
//! `do_remote_decode`, then the original body with the prefill's `kv_transfer_params`
//! to the decode engine), and checks that the answer equals one engine's, that the
//! decode engine computed only the last prompt token, and every fault's fallback.

use serde_json::{json, Value};

use crate::common::{client, metric, Proc};

const NIXL: &str = r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#;

fn pd_engine(config: &str) -> Proc {
    Proc::engine(&[
        "--sim-preset",
        "zero",
        "--kv-transfer-config",
        config,
        "--kv-side-channel-port",
        "0",
    ])
}

fn prompt_text() -> String {
    "the quick brown fox jumps over the lazy dog ".repeat(6)
}

fn bodies(seed: Option<u64>) -> Vec<(&'static str, Value)> {
    let mut c = json!({"model": "switchyard-sim", "prompt": prompt_text(), "max_tokens": 12, "temperature": 0});
    let mut ch = json!({"model": "switchyard-sim", "messages": [{"role": "user", "content": prompt_text()}],
        "max_completion_tokens": 12, "temperature": 0});
    if let Some(s) = seed {
        for b in [&mut c, &mut ch] {
            b["temperature"] = json!(0.9);
            b["seed"] = json!(s);
        }
    }
    vec![("/v1/completions", c), ("/v1/chat/completions", ch)]
}

/// The router's prefill body (vLLM's disaggregated proxy).
fn prefill_body(body: &Value) -> Value {
    let mut b = body.clone();
    b["max_tokens"] = json!(1);
    if b.get("max_completion_tokens").is_some() {
        b["max_completion_tokens"] = json!(1);
    }
    b["stream"] = json!(false);
    if let Some(o) = b.as_object_mut() {
        o.remove("stream_options");
        o.remove("min_tokens");
    }
    b["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false,
        "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null});
    b
}

async fn post(c: &reqwest::Client, e: &Proc, path: &str, body: &Value) -> (u16, Value) {
    let r = c.post(e.url(path)).json(body).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

/// The prefill's `kv_transfer_params` (checked for vLLM's fields).
async fn prefill(c: &reqwest::Client, p: &Proc, path: &str, body: &Value) -> Value {
    let (status, r) = post(c, p, path, &prefill_body(body)).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 1, "{r}");
    let kv = r["kv_transfer_params"].clone();
    for k in [
        "do_remote_prefill",
        "do_remote_decode",
        "remote_block_ids",
        "remote_engine_id",
        "remote_request_id",
        "remote_host",
        "remote_port",
        "tp_size",
    ] {
        assert!(kv.get(k).is_some(), "{k} missing from {kv}");
    }
    assert_eq!(
        (&kv["do_remote_prefill"], &kv["do_remote_decode"]),
        (&json!(true), &json!(false))
    );
    assert_eq!(
        kv["remote_request_id"].as_str().map(str::len),
        Some(32),
        "{kv}"
    );
    kv
}

/// The answer's text (a stream's pieces joined), or the error body.
async fn complete(
    c: &reqwest::Client,
    e: &Proc,
    path: &str,
    body: &Value,
) -> Result<String, (u16, String)> {
    let r = c.post(e.url(path)).json(body).send().await.expect("send");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    if status != 200 {
        return Err((status, text));
    }
    let piece = |v: &Value| -> String {
        let ch = &v["choices"][0];
        ch["text"]
            .as_str()
            .or(ch["message"]["content"].as_str())
            .or(ch["delta"]["content"].as_str())
            .unwrap_or("")
            .to_string()
    };
    if body["stream"] == json!(true) {
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|l| *l != "[DONE]")
            .map(|l| piece(&serde_json::from_str(l).expect("frame")))
            .collect())
    } else {
        Ok(piece(&serde_json::from_str(&text).expect("json")))
    }
}

async fn page(c: &reqwest::Client, e: &Proc) -> String {
    c.get(e.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

fn source(page: &str, s: &str) -> f64 {
    metric(page, "vllm:prompt_tokens_by_source_total", &[("source", s)]).expect("by source")
}

fn gen_tokens(page: &str) -> f64 {
    metric(page, "vllm:generation_tokens_total", &[]).expect("generation tokens")
}

fn with_kv(body: &Value, kv: &Value, stream: bool) -> Value {
    let mut b = body.clone();
    b["stream"] = json!(stream);
    b["kv_transfer_params"] = kv.clone();
    b
}

#[tokio::test]
async fn pd_sim_prefill_then_decode_equals_one_engine_and_computes_one_prompt_token() {
    let (p, d, single) = (
        pd_engine(NIXL),
        pd_engine(NIXL),
        Proc::engine(&["--sim-preset", "zero"]),
    );
    let c = client();
    for seed in [None, Some(7)] {
        for (path, body) in bodies(seed) {
            for stream in [false, true] {
                let mut plain = body.clone();
                plain["stream"] = json!(stream);
                let want = complete(&c, &single, path, &plain).await.expect("single");
                let p0 = gen_tokens(&page(&c, &p).await);
                let kv = prefill(&c, &p, path, &body).await;
                let pp = page(&c, &p).await;
                assert_eq!(gen_tokens(&pp) - p0, 1.0, "the prefill generated one token");
                assert_eq!(metric(&pp, "switchyard:kv_transfer_leases", &[]), Some(1.0));
                let n = kv["remote_num_tokens"].as_f64().expect("num tokens");
                let d0 = page(&c, &d).await;
                let got = complete(&c, &d, path, &with_kv(&body, &kv, stream))
                    .await
                    .expect("decode");
                assert_eq!(got, want, "{path} stream={stream} seed={seed:?}");
                let d1 = page(&c, &d).await;
                assert_eq!(
                    source(&d1, "external_kv_transfer") - source(&d0, "external_kv_transfer"),
                    n - 1.0
                );
                assert!(source(&d1, "local_compute") - source(&d0, "local_compute") <= 1.0);
                let pp = page(&c, &p).await;
                assert_eq!(
                    metric(&pp, "switchyard:kv_transfer_leases", &[]),
                    Some(0.0),
                    "released after the pull"
                );
                assert!(
                    metric(&pp, "switchyard:kv_transfer_served_bytes_total", &[]).unwrap_or(0.0)
                        > 0.0
                );
            }
        }
    }
    let dp = page(&c, &d).await;
    assert_eq!(
        metric(&dp, "switchyard:kv_transfer_load_failures_total", &[]),
        Some(0.0)
    );
    assert!(dp.contains("switchyard:kv_transfer_pull_seconds_count"));
}

#[tokio::test]
async fn pd_faults_fall_back_to_recompute_or_fail_clearly() {
    let c = client();
    let single = Proc::engine(&["--sim-preset", "zero"]);
    let d = pd_engine(NIXL);
    let (path, body) = bodies(Some(3)).remove(0);
    let want = complete(&c, &single, path, &body).await.expect("single");
    let failures = |page: &str| {
        metric(page, "switchyard:kv_transfer_load_failures_total", &[]).unwrap_or(-1.0)
    };

    // Forged token, and the right token with another lease's block ids: nothing served,
    // the decode recomputes the same answer, and the real lease is still there after.
    let p = pd_engine(NIXL);
    let kv = prefill(&c, &p, path, &body).await;
    let mut forged = kv.clone();
    forged["remote_request_id"] = json!("0".repeat(32));
    let mut other_blocks = kv.clone();
    other_blocks["remote_block_ids"] = json!([900, 901, 902]);
    let mut other_engine = kv.clone();
    other_engine["remote_engine_id"] = json!("00000000-0000-4000-8000-000000000000");
    for bad in [&forged, &other_blocks, &other_engine] {
        let f0 = failures(&page(&c, &d).await);
        assert_eq!(
            complete(&c, &d, path, &with_kv(&body, bad, false))
                .await
                .expect("recompute"),
            want
        );
        assert_eq!(failures(&page(&c, &d).await) - f0, 1.0);
    }
    let pp = page(&c, &p).await;
    assert_eq!(
        metric(&pp, "switchyard:kv_transfer_served_bytes_total", &[]),
        Some(0.0)
    );
    assert!(metric(&pp, "switchyard:kv_transfer_refused_reads_total", &[]).unwrap_or(0.0) >= 2.0);
    assert_eq!(
        metric(&pp, "switchyard:kv_transfer_leases", &[]),
        Some(1.0),
        "the lease survived"
    );
    let d0 = page(&c, &d).await;
    assert_eq!(
        complete(&c, &d, path, &with_kv(&body, &kv, false))
            .await
            .expect("decode"),
        want
    );
    assert!(
        source(&page(&c, &d).await, "external_kv_transfer") > source(&d0, "external_kv_transfer")
    );

    // The prefill engine killed after answering, before the decode pulls: recompute.
    let kv = prefill(&c, &p, path, &body).await;
    drop(p);
    let f0 = failures(&page(&c, &d).await);
    assert_eq!(
        complete(&c, &d, path, &with_kv(&body, &kv, true))
            .await
            .expect("recompute"),
        want
    );
    assert_eq!(failures(&page(&c, &d).await) - f0, 1.0);

    // kv_load_failure_policy: fail answers a clear error instead (and keeps serving).
    let strict = pd_engine(
        r#"{"kv_connector":"NixlConnector","kv_role":"kv_consumer","kv_load_failure_policy":"fail"}"#,
    );
    let (status, text) = complete(&c, &strict, path, &with_kv(&body, &kv, false))
        .await
        .expect_err("fails");
    assert_eq!(status, 500, "{text}");
    assert!(text.contains("kv_load_failure_policy"), "{text}");
    assert_eq!(
        complete(&c, &strict, path, &body)
            .await
            .expect("still serving"),
        want
    );

    // A lease that expired: its blocks are freed, the decode recomputes.
    let short = pd_engine(
        r#"{"kv_connector":"NixlConnector","kv_role":"kv_producer","kv_connector_extra_config":{"kv_lease_duration":0.3}}"#,
    );
    let kv = prefill(&c, &short, path, &body).await;
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    let sp = page(&c, &short).await;
    assert_eq!(
        metric(&sp, "switchyard:kv_transfer_expired_leases_total", &[]),
        Some(1.0)
    );
    assert_eq!(metric(&sp, "switchyard:kv_transfer_leases", &[]), Some(0.0));
    assert_eq!(
        metric(&sp, "vllm:kv_cache_usage_perc", &[]),
        Some(0.0),
        "blocks freed"
    );
    let f0 = failures(&page(&c, &d).await);
    assert_eq!(
        complete(&c, &d, path, &with_kv(&body, &kv, false))
            .await
            .expect("recompute"),
        want
    );
    assert_eq!(failures(&page(&c, &d).await) - f0, 1.0);
}

#[tokio::test]
async fn malformed_kv_transfer_params_are_400s_and_the_engine_keeps_serving() {
    let c = client();
    let d = pd_engine(NIXL);
    let (path, body) = bodies(None).remove(0);
    for bad in [
        json!("not an object"),
        json!([1, 2]),
        json!({"do_remote_prefill": "yes"}),
        json!({"do_remote_prefill": true, "remote_block_ids": [-1], "remote_engine_id": "e",
               "remote_host": "localhost", "remote_port": 1, "remote_request_id": "t"}),
        json!({"do_remote_prefill": true, "remote_block_ids": [99999999999u64], "remote_engine_id": "e",
               "remote_host": "localhost", "remote_port": 1, "remote_request_id": "t"}),
        json!({"do_remote_prefill": true, "remote_block_ids": [1], "remote_engine_id": "e",
               "remote_host": "localhost", "remote_port": "5600", "remote_request_id": "t"}),
        json!({"do_remote_prefill": true, "remote_block_ids": [1]}),
    ] {
        let mut b = body.clone();
        b["kv_transfer_params"] = bad.clone();
        let (status, r) = post(&c, &d, path, &b).await;
        assert_eq!(status, 400, "{bad}: {r}");
        assert_eq!(r["error"]["type"], "BadRequestError", "{r}");
        assert_eq!(r["error"]["param"], "kv_transfer_params", "{r}");
        assert_eq!(r["error"]["code"], 400, "{r}");
        assert!(r["error"]["message"].is_string());
    }
    let (status, _) = post(&c, &d, path, &body).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn leases_never_starve_the_pool() {
    // 16 blocks of 16 tokens: at most 8 leased; a prompt needing 13 blocks must still run.
    let p = Proc::engine(&[
        "--sim-preset",
        "zero",
        "--num-gpu-blocks",
        "16",
        "--block-size",
        "16",
        "--max-model-len",
        "256",
        "--kv-transfer-config",
        NIXL,
        "--kv-side-channel-port",
        "0",
    ]);
    let c = client();
    for i in 0..6 {
        let body = json!({"model": "switchyard-sim", "temperature": 0, "max_tokens": 4,
            "prompt": format!("{i} {}", "one two three four five six seven eight nine ten ".repeat(4))});
        let kv = prefill(&c, &p, "/v1/completions", &body).await;
        assert!(!kv["remote_block_ids"].as_array().expect("ids").is_empty());
        let pp = page(&c, &p).await;
        assert!(
            metric(&pp, "switchyard:kv_transfer_leased_blocks", &[]).unwrap_or(99.0) <= 8.0,
            "bounded"
        );
    }
    let pp = page(&c, &p).await;
    assert!(metric(&pp, "switchyard:kv_transfer_evicted_leases_total", &[]).unwrap_or(0.0) >= 1.0);
    let long = json!({"model": "switchyard-sim", "temperature": 0, "max_tokens": 8,
        "prompt": "alpha beta gamma delta epsilon zeta eta theta iota kappa ".repeat(11)});
    let (status, r) = post(&c, &p, "/v1/completions", &long).await;
    assert_eq!(status, 200, "{r}");
    let n = r["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(
        n > 8 * 16 && n + 8 <= 256,
        "the prompt ({n} tokens) needs leased blocks"
    );
}

#[tokio::test]
async fn sim_engines_move_the_presets_real_kv_size() {
    // llama-3.1-8b-h100: 32 layers × 8 KV heads × 128 × 2 bytes, keys and values: 128 KiB
    // a token; the payload is zeros of that size, its network time charged by the model.
    let engine = || {
        Proc::engine(&[
            "--time-scale",
            "0.1",
            "--kv-transfer-config",
            NIXL,
            "--kv-side-channel-port",
            "0",
        ])
    };
    let (p, d) = (engine(), engine());
    let c = client();
    let (path, body) = bodies(Some(11)).remove(1);
    let kv = prefill(&c, &p, path, &body).await;
    let blocks = kv["remote_block_ids"].as_array().expect("ids").len() as f64;
    complete(&c, &d, path, &with_kv(&body, &kv, true))
        .await
        .expect("decode");
    let dp = page(&c, &d).await;
    assert_eq!(
        metric(&dp, "switchyard:kv_transfer_pulled_bytes_total", &[]),
        Some(blocks * 16.0 * 131072.0)
    );
    let n = kv["remote_num_tokens"].as_f64().expect("tokens");
    assert_eq!(source(&dp, "external_kv_transfer"), n - 1.0);
    assert_eq!(source(&dp, "local_compute"), 1.0);
}
