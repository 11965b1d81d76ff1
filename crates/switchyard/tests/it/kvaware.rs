//! `--routing-logic kvaware` end to end: sim engines publishing KV-cache events (ZMQ on
//! OS-chosen ports, found through each engine's `GET /kv_events`), a router following
//! them. Requests sharing a long prefix go to the engine that holds it; an engine leaving
//! (killed, then removed from the config) does not break routing; a router started after
//! its engines learns what they cached through replay.
//!
//! No blind sleeps: every wait polls the router's `/metrics` (its index gauges) with a
//! deadline.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{client, get_json, metric, Proc};

const EVENTS: &str = r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:0","replay_endpoint":"tcp://*:0","topic":"kv"}"#;

fn kv_engine() -> Proc {
    Proc::engine(&["--sim-preset", "zero", "--kv-events-config", EVENTS])
}

fn router(backends: &[&str], extra: &[&str]) -> Proc {
    let mut args = vec![
        "--routing-logic",
        "kvaware",
        "--health-check-interval",
        "0.5",
    ];
    args.extend_from_slice(extra);
    Proc::router(backends, &args)
}

/// A long shared prefix (a system prompt of ~300 one-token words) and a question.
fn chat(prefix_seed: u64, question: &str) -> Value {
    const W: &[&str] = &[
        "alpha", "brick", "cloud", "delta", "ember", "frost", "grain", "harbor", "ivory", "jolt",
    ];
    let mut s = prefix_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let system: Vec<&str> = (0..300)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            W[(s % W.len() as u64) as usize]
        })
        .collect();
    json!({"model":"switchyard-sim","messages":[
        {"role":"system","content":system.join(" ")},
        {"role":"user","content":question}],
        "max_tokens":4,"ignore_eos":true})
}

async fn send(c: &reqwest::Client, url: &str, body: &Value) -> String {
    let resp = c.post(url).json(body).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let by = resp
        .headers()
        .get("x-switchyard-engine")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let _ = resp.bytes().await.expect("body");
    by
}

async fn page(c: &reqwest::Client, r: &Proc) -> String {
    c.get(r.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("page")
}

/// Poll the router's `/metrics` until `ok(page)`, or panic after 20 s.
async fn wait_for(c: &reqwest::Client, r: &Proc, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = page(c, r).await;
        if ok(&p) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{p}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the router follows every engine's events, send the first request of
/// conversation `seed`, and wait until its engine's blocks are indexed; returns that
/// engine (`host:port`).
async fn warm_owner(c: &reqwest::Client, r: &Proc, urls: &[String], seed: u64) -> String {
    wait_for(c, r, "all three streams", |p| {
        urls.iter().all(|u| engine_blocks(p, u).is_some())
    })
    .await;
    let owner = send(c, &r.url("/v1/chat/completions"), &chat(seed, "q0")).await;
    let owner_url = format!("http://{owner}");
    wait_for(c, r, "the owner's blocks", |p| {
        engine_blocks(p, &owner_url).unwrap_or(0.0) >= 10.0
    })
    .await;
    owner
}

fn engine_blocks(page: &str, e: &str) -> Option<f64> {
    metric(page, "vllm:router_kv_engine_blocks", &[("server", e)])
}

#[tokio::test]
async fn engines_advertise_their_event_sockets() {
    let e = kv_engine();
    let c = client();
    let r = c.get(e.url("/kv_events")).send().await.expect("send");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    for k in ["endpoint", "replay_endpoint"] {
        let ep = v[k].as_str().expect(k);
        let port: u16 = ep.rsplit(':').next().unwrap().parse().expect("port");
        assert!(ep.starts_with("tcp://") && port != 0, "{k}: {ep}");
    }
    assert_eq!(v["topic"], "kv");
    assert_eq!(v["block_size"], 16);
    // A loopback endpoint with port 0 binds too (the OS picks the port), as the
    // benchmark's engines are started.
    let lo = Proc::engine(&[
        "--sim-preset",
        "zero",
        "--kv-events-config",
        r#"{"enable_kv_cache_events":true,"endpoint":"tcp://127.0.0.1:0"}"#,
    ]);
    let v: Value = get_json(&c, &lo.url("/kv_events")).await;
    let ep = v["endpoint"].as_str().expect("endpoint");
    assert!(
        ep.starts_with("tcp://127.0.0.1:") && !ep.ends_with(":0"),
        "{ep}"
    );
    let plain = Proc::engine(&["--sim-preset", "zero"]);
    let r = c.get(plain.url("/kv_events")).send().await.expect("send");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn shared_prefix_goes_to_the_engine_holding_it() {
    let engines: Vec<Proc> = (0..4).map(|_| kv_engine()).collect();
    let urls: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
    let r = router(&urls, &[]);
    let c = client();
    wait_for(&c, &r, "all four streams", |p| {
        urls.iter().all(|u| engine_blocks(p, u).is_some())
    })
    .await;

    // Warm one engine with the prefix; wait until the index knows.
    let chat_url = r.url("/v1/chat/completions");
    let owner = send(&c, &chat_url, &chat(1, "question zero")).await;
    let owner_url = format!("http://{owner}");
    wait_for(&c, &r, "the warmed engine's blocks", |p| {
        engine_blocks(p, &owner_url).unwrap_or(0.0) >= 10.0
    })
    .await;
    for k in 1..8 {
        let by = send(&c, &chat_url, &chat(1, &format!("question {k}"))).await;
        assert_eq!(by, owner, "request {k} left the engine holding the prefix");
    }
    // New prefixes spread (the least loaded, then the engine holding the least).
    let mut others = std::collections::HashSet::new();
    for seed in 2..5 {
        let by = send(&c, &chat_url, &chat(seed, "hello")).await;
        others.insert(by.clone());
        // Each new owner is known before the next one is chosen.
        let u = format!("http://{by}");
        wait_for(&c, &r, "the new owner's blocks", |p| {
            engine_blocks(p, &u).unwrap_or(0.0) >= 10.0
        })
        .await;
    }
    assert_eq!(others.len(), 3, "new prefixes spread: {others:?}");
    assert!(!others.contains(&owner));

    let p = page(&c, &r).await;
    let hits = metric(
        &p,
        "vllm:router_kv_decisions_total",
        &[("outcome", "cache_hit")],
    )
    .unwrap_or(0.0);
    let misses =
        metric(&p, "vllm:router_kv_decisions_total", &[("outcome", "miss")]).unwrap_or(0.0);
    assert!(hits >= 7.0 && misses >= 4.0, "hits {hits}, misses {misses}");
    assert!(metric(&p, "vllm:router_kv_index_blocks", &[]).unwrap_or(0.0) >= 40.0);
    assert!(metric(&p, "vllm:router_kv_matched_prefix_ratio_count", &[]).unwrap_or(0.0) >= 11.0);
    // The engine's own prefix cache confirms: the followers hit it.
    let ep = c
        .get(format!("{owner_url}/metrics"))
        .send()
        .await
        .expect("engine metrics")
        .text()
        .await
        .expect("text");
    assert!(metric(&ep, "vllm:prefix_cache_hits_total", &[]).unwrap_or(0.0) > 7.0 * 100.0);
}

#[tokio::test]
async fn an_engine_leaving_does_not_break_routing() {
    let mut engines: Vec<Proc> = (0..3).map(|_| kv_engine()).collect();
    let urls: Vec<String> = engines.iter().map(|e| e.url.clone()).collect();
    let dir = std::env::temp_dir().join(format!("switchyard-kvaware-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("router.json");
    std::fs::write(&file, json!({"static_backends": urls}).to_string()).expect("write");
    let file_s = file.to_string_lossy().to_string();
    let r = Proc::start(&[
        "router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--routing-logic",
        "kvaware",
        "--dynamic-config-json",
        &file_s,
        "--dynamic-config-interval",
        "0.2",
        "--health-check-interval",
        "0.5",
    ]);
    let c = client();
    let chat_url = r.url("/v1/chat/completions");
    let owner = warm_owner(&c, &r, &urls, 7).await;
    let owner_url = format!("http://{owner}");

    // Kill the engine holding the prefix: requests still succeed (failover, then the
    // health checks eject it), and the prefix settles on one of the others.
    let i = engines
        .iter()
        .position(|e| e.host_port() == owner)
        .expect("owner is ours");
    drop(engines.remove(i));
    let next = send(&c, &chat_url, &chat(7, "q1")).await;
    assert_ne!(next, owner);
    let next_url = format!("http://{next}");
    wait_for(&c, &r, "the new owner's blocks", |p| {
        engine_blocks(p, &next_url).unwrap_or(0.0) >= 10.0
    })
    .await;
    for k in 2..6 {
        assert_eq!(send(&c, &chat_url, &chat(7, &format!("q{k}"))).await, next);
    }

    // Remove it from the configuration: its entries leave the index.
    let left: Vec<&String> = urls.iter().filter(|u| **u != owner_url).collect();
    std::fs::write(&file, json!({"static_backends": left}).to_string()).expect("write");
    wait_for(&c, &r, "the departed engine dropped", |p| {
        engine_blocks(p, &owner_url).is_none()
    })
    .await;
    for k in 6..9 {
        assert_eq!(send(&c, &chat_url, &chat(7, &format!("q{k}"))).await, next);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_router_started_late_catches_up_through_replay() {
    let engines: Vec<Proc> = (0..3).map(|_| kv_engine()).collect();
    // Traffic straight to the last engine, before any router exists.
    let c = client();
    let target = &engines[2];
    send(&c, &target.url("/v1/chat/completions"), &chat(11, "early")).await;

    let urls: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
    let r = router(&urls, &[]);
    wait_for(&c, &r, "the replayed blocks", |p| {
        engine_blocks(p, &target.url).unwrap_or(0.0) >= 10.0
    })
    .await;
    let by = send(&c, &r.url("/v1/chat/completions"), &chat(11, "late")).await;
    assert_eq!(by, target.host_port());
    let p = page(&c, &r).await;
    assert_eq!(
        metric(
            &p,
            "vllm:router_kv_decisions_total",
            &[("outcome", "cache_hit")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn an_engine_restarting_is_followed_from_a_clean_slate() {
    let mut engines: Vec<Proc> = (0..3).map(|_| kv_engine()).collect();
    let urls: Vec<String> = engines.iter().map(|e| e.url.clone()).collect();
    let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let r = router(&url_refs, &[]);
    let c = client();
    let chat_url = r.url("/v1/chat/completions");
    let owner = warm_owner(&c, &r, &urls, 21).await;
    let owner_url = format!("http://{owner}");

    // Restart the owner on the same HTTP port (its event sockets get new ports, and its
    // cache starts empty): the router follows the new stream and forgets the old blocks.
    let i = engines
        .iter()
        .position(|e| e.host_port() == owner)
        .expect("owner is ours");
    drop(engines.remove(i));
    let port = owner.rsplit(':').next().expect("port").to_string();
    let restarted = Proc::start(&[
        "engine",
        "--backend",
        "sim",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--sim-preset",
        "zero",
        "--kv-events-config",
        EVENTS,
    ]);
    assert_eq!(restarted.url, owner_url);
    wait_for(&c, &r, "the restarted engine's blocks dropped", |p| {
        engine_blocks(p, &owner_url) == Some(0.0)
    })
    .await;
    // Its new stream is live: traffic sent straight to it shows up in the index.
    send(
        &c,
        &restarted.url("/v1/chat/completions"),
        &chat(22, "direct"),
    )
    .await;
    wait_for(&c, &r, "the restarted engine's new blocks", |p| {
        engine_blocks(p, &owner_url).unwrap_or(0.0) >= 10.0
    })
    .await;
    // And routing goes on: the new holder of prefix 22 gets it (once the health checks
    // have it admitted, should its restart have got it ejected).
    wait_for(&c, &r, "the restarted engine healthy", |p| {
        metric(p, "vllm:healthy_pods_total", &[("server", &owner_url)]) == Some(1.0)
    })
    .await;
    assert_eq!(send(&c, &chat_url, &chat(22, "via router")).await, owner);
    let by = send(&c, &chat_url, &chat(21, "q1")).await;
    assert!(!by.is_empty());
}
