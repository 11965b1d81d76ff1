//! Chaos: 4 sim engines behind a router under steady streaming load (an in-test closed
//! loop of clients), and one engine goes bad mid-run: killed (SIGKILL), frozen
//! (SIGSTOP: it still accepts connections), answering 500s, or slow (every answer,
//! `/health` included, delayed 2 s) — the last two through the engine's hidden fault
//! knobs, switched on by SIGUSR1. For every routing logic, each fault runs side by side
//! with a fault-free run of the same stack, and:
//! - no request fails before its first byte (every request that had not started
//!   streaming is served, by another engine if need be);
//! - the bad engine is ejected (health checks with a short timeout, failures of live
//!   requests, or its circuit breaker) within 3 s of the fault;
//! - throughput is at least 0.7x the fault-free run's.
//!
//! - no stream is cut either: streams under way on a killed or frozen engine are
//!   continued on another (mid-stream failover, `resume.rs`), and the router counts
//!   them as resumed.
//!
//! Each logic is one test (the harness runs them in parallel); within it the five runs
//! go at once, each with its own processes. A frozen engine is SIGKILLed when its
//! [`Proc`] drops, panics included.

use std::process::Command;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use crate::common::{metric, Proc};

const EVENTS: &str = r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:0","replay_endpoint":"tcp://*:0","topic":"kv"}"#;
/// Concurrent clients per run.
const CLIENTS: usize = 8;
/// Length of a run, and when the fault strikes.
const RUN: Duration = Duration::from_secs(5);
const FAULT_AT: Duration = Duration::from_secs(1);
/// The router's health checks: every 0.2 s, 0.4 s to answer, 2 failures eject.
const ROUTER_FLAGS: &[&str] = &[
    "--health-check-interval",
    "0.2",
    "--health-check-timeout-secs",
    "0.4",
    "--health-failure-threshold",
    "2",
    "--session-key",
    "x-user",
];
/// How soon after the fault the bad engine must be out.
const EJECT_WITHIN: Duration = Duration::from_secs(3);
/// The engine that goes bad.
const BAD: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Kill,
    Stop,
    Http500,
    Slow,
}

struct Stack {
    engines: Vec<Proc>,
    router: Proc,
}

impl Stack {
    fn start(logic: &str, fault: Fault) -> Stack {
        let mut engines = Vec::new();
        for i in 0..4 {
            let mut flags = vec!["--sim-preset", "zero", "--sim-step-overhead-us", "20000"];
            if logic == "kvaware" {
                flags.extend(["--kv-events-config", EVENTS]);
            }
            if i == BAD {
                match fault {
                    Fault::Http500 => {
                        flags.extend(["--fault-http-500-rate", "1", "--fault-on-signal"])
                    }
                    Fault::Slow => flags.extend(["--fault-delay-ms", "2000", "--fault-on-signal"]),
                    _ => {}
                }
            }
            engines.push(Proc::engine(&flags));
        }
        let urls: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
        let mut flags = vec!["--routing-logic", logic];
        flags.extend_from_slice(ROUTER_FLAGS);
        let router = Proc::router(&urls, &flags);
        Stack { engines, router }
    }

    /// Make the bad engine bad.
    fn strike(&mut self, fault: Fault) {
        let e = &mut self.engines[BAD];
        let pid = e.child.id().to_string();
        let signal = match fault {
            Fault::None => return,
            Fault::Kill => {
                let _ = e.child.kill();
                return;
            }
            Fault::Stop => "-STOP",
            Fault::Http500 | Fault::Slow => "-USR1",
        };
        let ok = Command::new("kill")
            .args([signal, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {signal} {pid}");
    }
}

#[derive(Debug, Default)]
struct Counts {
    /// Served to the end (`data: [DONE]`) within the run.
    ok: AtomicU64,
    /// Served to the end after the run (not counted as throughput).
    late: AtomicU64,
    /// No byte of an answer: an error status, or the connection failed first.
    failed_before_first_byte: AtomicU64,
    /// Started streaming, then broke off.
    cut_mid_way: AtomicU64,
    /// Streams the bad engine has started and not finished: a kill or a freeze strikes
    /// while one is under way, so that a resume is due (between two requests of a client
    /// an engine can hold no stream at all, and a kill then resumes nothing).
    under_way_on_bad: AtomicI64,
}

async fn one(
    c: &reqwest::Client,
    url: &str,
    user: &str,
    n: u64,
    bad: &str,
    counts: &Counts,
) -> Result<(), bool> {
    let body = json!({
        "model": "switchyard-sim",
        "prompt": format!("user {user} question {n}: tell me about the weather"),
        "max_tokens": 16,
        "ignore_eos": true,
        "stream": true,
    });
    // A new session every 4 requests, so that `session` spreads the clients over
    // every engine (8 fixed ones could all miss the bad one).
    let resp = c
        .post(url)
        .header("x-user", format!("{user}-{}", n / 4))
        .json(&body)
        .send()
        .await
        .map_err(|_| false)?;
    if resp.status() != 200 {
        return Err(false);
    }
    let on_bad = resp
        .headers()
        .get("x-switchyard-engine")
        .is_some_and(|v| v.as_bytes() == bad.as_bytes());
    struct UnderWay<'a>(Option<&'a AtomicI64>);
    impl Drop for UnderWay<'_> {
        fn drop(&mut self) {
            if let Some(n) = self.0 {
                n.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
    let mut under_way = UnderWay(None);
    let mut s = resp.bytes_stream();
    let mut got = false;
    let mut tail = Vec::new();
    while let Some(chunk) = s.next().await {
        let Ok(b) = chunk else { return Err(got) };
        got |= !b.is_empty();
        if got && on_bad && under_way.0.is_none() {
            counts.under_way_on_bad.fetch_add(1, Ordering::SeqCst);
            under_way.0 = Some(&counts.under_way_on_bad);
        }
        tail.extend_from_slice(&b);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
    }
    if tail.windows(12).any(|w| w == b"data: [DONE]") {
        Ok(())
    } else {
        Err(got)
    }
}

/// What one run measured.
#[derive(Debug)]
struct Outcome {
    fault: Fault,
    ok: u64,
    failed: u64,
    cut: u64,
    /// `vllm:router_stream_resumes_total{outcome="resumed"}` at the end of the run.
    resumed: f64,
    ejected_after: Option<Duration>,
}

/// Is `server` out of rotation (ejected, or its breaker open)?
async fn is_out(c: &reqwest::Client, router: &str, server: &str) -> bool {
    let Ok(resp) = c.get(format!("{router}/metrics")).send().await else {
        return false;
    };
    let page = resp.text().await.unwrap_or_default();
    metric(&page, "vllm:healthy_pods_total", &[("server", server)]) == Some(0.0)
        || metric(
            &page,
            "vllm:router_circuit_breaker_state",
            &[("server", server)],
        ) == Some(1.0)
}

async fn run(mut stack: Stack, fault: Fault) -> Outcome {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let counts = Arc::new(Counts::default());
    let url = stack.router.url("/v1/completions");
    let start = Instant::now();
    let end = start + RUN;
    let mut clients = Vec::new();
    let bad = stack.engines[BAD].host_port();
    for i in 0..CLIENTS {
        let (c, url, counts, bad) = (c.clone(), url.clone(), counts.clone(), bad.clone());
        clients.push(tokio::spawn(async move {
            let user = format!("u{i}");
            let mut n = 0;
            while Instant::now() < end {
                n += 1;
                let r = one(&c, &url, &user, n, &bad, &counts).await;
                let field = match r {
                    Ok(()) if Instant::now() <= end => &counts.ok,
                    Ok(()) => &counts.late,
                    Err(false) => &counts.failed_before_first_byte,
                    Err(true) => &counts.cut_mid_way,
                };
                field.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep_until((start + FAULT_AT).into()).await;
    if matches!(fault, Fault::Kill | Fault::Stop) {
        let wait = Instant::now();
        while counts.under_way_on_bad.load(Ordering::SeqCst) == 0
            && wait.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    stack.strike(fault);
    let struck = Instant::now();
    let mut ejected_after = None;
    if fault != Fault::None {
        let bad = stack.engines[BAD].url.clone();
        while struck.elapsed() < EJECT_WITHIN * 2 {
            if is_out(&c, &stack.router.url, &bad).await {
                ejected_after = Some(struck.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for t in clients {
        t.await.expect("client task");
    }
    let resumed = match c.get(stack.router.url("/metrics")).send().await {
        Ok(r) => metric(
            &r.text().await.unwrap_or_default(),
            "vllm:router_stream_resumes_total",
            &[("outcome", "resumed")],
        )
        .unwrap_or(0.0),
        Err(_) => -1.0,
    };
    // `stack` drops here: every engine is SIGKILLed (a stopped one too) and waited for.
    drop(stack);
    Outcome {
        fault,
        ok: counts.ok.load(Ordering::Relaxed),
        failed: counts.failed_before_first_byte.load(Ordering::Relaxed),
        cut: counts.cut_mid_way.load(Ordering::Relaxed),
        resumed,
        ejected_after,
    }
}

async fn chaos(logic: &str) {
    let faults = [
        Fault::None,
        Fault::Kill,
        Fault::Stop,
        Fault::Http500,
        Fault::Slow,
    ];
    let stacks: Vec<Stack> = faults.iter().map(|&f| Stack::start(logic, f)).collect();
    let runs = stacks.into_iter().zip(faults).map(|(s, f)| run(s, f));
    let outcomes = futures_util::future::join_all(runs).await;
    let base = outcomes[0].ok.max(1);
    for o in &outcomes {
        eprintln!(
            "chaos {logic:12} {:8?} ok {:4} ({:.2}x) failed-before-first-byte {} cut-mid-way {} resumed {} ejected after {:?}",
            o.fault,
            o.ok,
            o.ok as f64 / base as f64,
            o.failed,
            o.cut,
            o.resumed,
            o.ejected_after
        );
    }
    for o in &outcomes {
        assert_eq!(
            o.failed, 0,
            "{logic} {:?}: requests failed before their first byte: {o:?}",
            o.fault
        );
        if o.fault == Fault::None {
            assert_eq!(o.cut, 0, "{logic}: a fault-free run cut streams: {o:?}");
            continue;
        }
        let after = o.ejected_after.unwrap_or(Duration::MAX);
        assert!(
            after <= EJECT_WITHIN,
            "{logic} {:?}: the bad engine was not ejected within {EJECT_WITHIN:?}: {o:?}",
            o.fault
        );
        assert!(
            o.ok as f64 >= 0.7 * base as f64,
            "{logic} {:?}: throughput {} against {base} fault-free: {o:?}",
            o.fault,
            o.ok
        );
        assert_eq!(
            o.cut, 0,
            "{logic} {:?}: streams under way were cut: {o:?}",
            o.fault
        );
        if o.fault == Fault::Kill {
            // The kill struck while a stream of 16 tokens was under way on the engine.
            assert!(
                o.resumed >= 1.0,
                "{logic}: no stream was continued after the kill: {o:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_roundrobin() {
    chaos("roundrobin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_session() {
    chaos("session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_leastload() {
    chaos("leastload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_prefixaware() {
    chaos("prefixaware").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kvaware() {
    chaos("kvaware").await;
}

/// The breaker on its own: an engine answering only 500s, with passive ejection out of
/// the way (a high health threshold), opens its breaker after `--cb-failure-threshold`
/// failures; every request is still served (retried on the good engine), the breaker's
/// gauge and the ejection and retry counters say so, and the open engine gets no more
/// requests.
#[tokio::test]
async fn an_engine_answering_500s_opens_its_breaker_and_no_request_fails() {
    let good = Proc::engine(&["--sim-preset", "zero"]);
    let bad = Proc::engine(&["--sim-preset", "zero", "--fault-http-500-rate", "1"]);
    let r = Proc::router(
        &[&bad.url, &good.url],
        &[
            "--routing-logic",
            "roundrobin",
            "--health-failure-threshold",
            "1000",
            "--cb-failure-threshold",
            "3",
            "--retry-initial-backoff-ms",
            "1",
        ],
    );
    let c = crate::common::client();
    let body = json!({"model":"switchyard-sim","prompt":"x","max_tokens":2});
    for _ in 0..12 {
        let resp = c
            .post(r.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()
                .get("x-switchyard-engine")
                .and_then(|v| v.to_str().ok()),
            Some(good.host_port().as_str())
        );
    }
    let page = c
        .get(r.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let m = |name: &str, labels: &[(&str, &str)]| metric(&page, name, labels);
    assert_eq!(
        m("vllm:router_circuit_breaker_state", &[("server", &bad.url)]),
        Some(1.0)
    );
    assert_eq!(
        m(
            "vllm:router_circuit_breaker_state",
            &[("server", &good.url)]
        ),
        Some(0.0)
    );
    assert_eq!(
        m(
            "vllm:router_engine_ejections_total",
            &[("server", &bad.url), ("cause", "circuit_breaker")]
        ),
        Some(1.0)
    );
    assert_eq!(m("vllm:router_retries_total", &[]), Some(3.0), "{page}");
    assert_eq!(
        m("vllm:healthy_pods_total", &[("server", &bad.url)]),
        Some(1.0)
    );
}

/// Every engine stalls at once (a starved machine: the soak saw it, load average 28):
/// the health checks eject them all, and requests waiting on them must not fail for want
/// of anywhere to move; they wait for their engine's answer (the last one standing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_engine_ejected_at_once_still_serves_its_requests() {
    let mut engines = Vec::new();
    for _ in 0..2 {
        engines.push(Proc::engine(&[
            "--sim-preset",
            "zero",
            "--fault-delay-ms",
            "1500",
            "--fault-on-signal",
        ]));
    }
    let urls: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
    let router = Proc::router(&urls, ROUTER_FLAGS);
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    for e in &engines {
        let ok = Command::new("kill")
            .args(["-USR1", &e.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok);
    }
    let started = Instant::now();
    let mut answers = Vec::new();
    for stream in [false, true, false, true] {
        let (c, url) = (c.clone(), router.url("/v1/completions"));
        answers.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .json(&json!({"model":"switchyard-sim","prompt":"hello","max_tokens":4,"stream":stream}))
                .send()
                .await
                .expect("send");
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }));
    }
    for a in answers {
        let (status, text) = a.await.expect("join");
        assert_eq!(status, 200, "{text}");
    }
    // Both engines were out meanwhile (2 failed 0.4-s checks of 1.5-s-late answers).
    let page = c
        .get(router.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let ejections: f64 = page
        .lines()
        .filter(|l| l.starts_with("vllm:router_engine_ejections_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    assert!(
        ejections >= 2.0 && started.elapsed() >= Duration::from_millis(1500),
        "both engines should have been ejected while the requests waited: {ejections}\n{page}"
    );
}

/// A stream whose only engine goes silent for longer than the stall timeout (a long
/// prefill step of a busy CPU engine looks the same as this SIGSTOP/SIGCONT) is not cut:
/// with nowhere else to continue it, it waits, and ends whole once the engine is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_nowhere_else_to_go_outwaits_a_stall() {
    let mut engine = Proc::engine(&["--sim-preset", "zero", "--sim-step-overhead-us", "20000"]);
    let mut flags = vec!["--stream-stall-timeout-secs", "1"];
    flags.extend_from_slice(ROUTER_FLAGS);
    let router = Proc::router(&[engine.url.as_str()], &flags);
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let resp = c
        .post(router.url("/v1/completions"))
        .json(
            &json!({"model":"switchyard-sim","prompt":"hello","max_tokens":100,
                      "ignore_eos":true,"stream":true}),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let mut s = resp.bytes_stream();
    let first = s.next().await.expect("a first frame").expect("frame");
    assert!(!first.is_empty());
    let pid = engine.child.id().to_string();
    let signal = |sig: &str| {
        Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(signal("-STOP"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(signal("-CONT"));
    let mut body = first.to_vec();
    while let Some(chunk) = s.next().await {
        body.extend_from_slice(&chunk.expect("the stream was cut"));
    }
    let text = String::from_utf8_lossy(&body);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let events = text.matches("\"text\"").count();
    assert!(events >= 100, "{events} events");
    let _ = engine.child.kill();
}
