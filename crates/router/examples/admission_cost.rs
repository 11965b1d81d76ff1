//! What the front door costs per request: the checks `api` runs for every proxied request
//! (the key from the headers, its models and rate limits, the engine key swapped in
//! upstream), with keys and limits on against off, single-threaded, in ns per request.
//! A keys file of 1,000 keys; the caller's key has limits high enough never to refuse.
//!
//! `cargo run --release -p switchyard-router --example admission_cost [ITERATIONS]`

use std::hint::black_box;
use std::time::Instant;

use axum::http::{header, HeaderMap, HeaderValue};
use futures_util::FutureExt;
use switchyard_router::admission::{limits, Admission};
use switchyard_router::config::{AdmissionArgs, Secret};

fn args(file: Option<std::path::PathBuf>, gate: usize) -> AdmissionArgs {
    AdmissionArgs {
        api_keys_file: file,
        api_key: None,
        engine_api_key: Some(Secret("sk-engine".into())),
        api_keys_interval: 5.0,
        max_concurrent_requests: gate,
        queue_size: 100,
        queue_timeout_secs: 60.0,
    }
}

/// One request's checks, as `api::proxy` runs them; false if anything refused.
fn check(a: &Admission, base: &HeaderMap, body_len: usize) -> bool {
    let mut h = base.clone();
    let Ok(who) = a.authenticate(&h) else {
        return false;
    };
    let ok = a
        .authorize(who.as_deref(), "switchyard-sim", "switchyard-sim", || {
            limits::estimate_tokens(body_len, Some(16), None)
        })
        .is_ok();
    let permit = match a.enter(who.as_deref()).now_or_never() {
        Some(Ok(p)) => p,
        _ => return false,
    };
    a.upstream_headers(&mut h);
    black_box((&h, &permit));
    ok
}

fn measure(name: &str, a: &Admission, base: &HeaderMap, n: u64) -> f64 {
    let mut runs = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        for _ in 0..n {
            assert!(check(a, black_box(base), black_box(180)), "{name} refused");
        }
        runs.push(t0.elapsed().as_nanos() as f64 / n as f64);
    }
    runs.sort_by(f64::total_cmp);
    let med = runs[2];
    println!("{name:<28} {med:8.1} ns/request (runs: {runs:.1?})");
    med
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("admission-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("keys.yaml");
    let mut yaml = String::from("keys:\n");
    for i in 0..1000 {
        yaml.push_str(&format!(
            "  - name: user-{i}\n    key: sk-user-{i:04}-0123456789abcdef\n    models: [switchyard-sim, other]\n    limits: {{requests_per_minute: 1000000000000, tokens_per_minute: 1000000000000000}}\n"
        ));
    }
    std::fs::write(&file, yaml).expect("write");

    let mut base = HeaderMap::new();
    base.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8001"));
    base.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    base.insert(header::CONTENT_LENGTH, HeaderValue::from_static("180"));
    base.insert(header::USER_AGENT, HeaderValue::from_static("wrk"));
    base.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer sk-user-0500-0123456789abcdef"),
    );

    let off = Admission::from_args(&args(None, 0)).expect("off");
    let on = Admission::from_args(&args(Some(file.clone()), 0)).expect("on");
    let gated = Admission::from_args(&args(Some(file), 1 << 20)).expect("gated");
    println!("{n} requests per run, 5 runs, median:");
    let a = measure("off", &off, &base, n);
    let b = measure("key + rate limit", &on, &base, n);
    let c = measure("key + rate limit + gate", &gated, &base, n);
    println!(
        "extra per request: key + rate limit {:.2} µs; with the concurrency gate {:.2} µs",
        (b - a) / 1000.0,
        (c - a) / 1000.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
