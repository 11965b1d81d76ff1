//! `switchyard plan`: calibration recovers a known latency model from a running sim
//! engine; the virtual-time simulation agrees with the same workload run for real (sim
//! engines and the router as processes, `switchyard bench` as the client); and a plan's
//! recommendation holds when run for real, while one engine fewer does not.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{get_text, metric, Proc};

fn tmp(name: &str) -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "switchyard-plan-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Run `switchyard <args>` to its end (at most `limit`); its stdout.
fn run(args: &[&str], limit: Duration) -> String {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("SWITCHYARD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn switchyard");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("switchyard {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap_or_default();
    assert!(
        status.success(),
        "switchyard {args:?} failed: {status}\n{out}"
    );
    out
}

fn read_json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&text).expect("JSON")
}

fn within(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs()
}

/// A sim profile file with these costs (µs).
fn profile(overhead: f64, prefill: f64, per_seq: f64, per_ctx: f64) -> std::path::PathBuf {
    let path = tmp("profile.json");
    let p = json!({
        "name": "test", "source": "timing/plan.rs",
        "overhead_us": overhead, "prefill_us_per_token": prefill,
        "decode_us_per_seq": per_seq, "decode_us_per_ctx_token": per_ctx,
    });
    std::fs::write(&path, p.to_string()).expect("write profile");
    path
}

/// Fit against a sim engine with given costs: they come back within 5%, and the pool
/// from the engine's `vllm:cache_config_info`.
#[test]
fn calibration_recovers_a_known_latency_model() {
    let _one = crate::serial_blocking();
    let engine = Proc::engine(&[
        "--sim-step-overhead-us",
        "20000",
        "--sim-prefill-us-per-token",
        "100",
        "--sim-decode-us-per-seq",
        "2000",
        "--sim-decode-us-per-ctx-token",
        "2",
        "--num-gpu-blocks",
        "4096",
    ]);
    let out = tmp("calibrated.json");
    let report = run(
        &[
            "plan",
            "calibrate",
            "--base-url",
            &engine.url,
            "--output",
            out.to_str().expect("path"),
            "--batch-sizes",
            "1,4,8,16",
        ],
        Duration::from_secs(120),
    );
    let p = read_json(&out);
    for (field, want) in [
        ("overhead_us", 20000.0),
        ("prefill_us_per_token", 100.0),
        ("decode_us_per_seq", 2000.0),
        ("decode_us_per_ctx_token", 2.0),
    ] {
        let got = p[field].as_f64().unwrap_or(f64::NAN);
        assert!(
            within(got, want, 0.05),
            "{field}: fitted {got}, true {want}\n{report}"
        );
    }
    assert_eq!(
        (p["num_gpu_blocks"].as_u64(), p["block_size"].as_u64()),
        (Some(4096), Some(16))
    );
    assert!(
        p["fit"]["fit"]["r2"].as_f64().unwrap_or(0.0) > 0.99,
        "{report}"
    );
}

/// The engines' prefix-cache hits and queries so far, from their `/metrics`.
async fn cache_counts(c: &reqwest::Client, engines: &[Proc]) -> (f64, f64) {
    let (mut hits, mut queries) = (0.0, 0.0);
    for e in engines {
        let page = get_text(c, &e.url("/metrics")).await;
        hits += metric(&page, "vllm:prefix_cache_hits_total", &[]).unwrap_or(0.0);
        queries += metric(&page, "vllm:prefix_cache_queries_total", &[]).unwrap_or(0.0);
    }
    (hits, queries)
}

/// Start `n` sim engines on `profile` (with `extra` flags) and a router over them.
fn stack(n: usize, profile: &str, routing: &str, extra: &[&str]) -> (Vec<Proc>, Proc) {
    let mut flags = vec!["--sim-profile", profile];
    flags.extend_from_slice(extra);
    let engines: Vec<Proc> = (0..n).map(|_| Proc::engine(&flags)).collect();
    let urls: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
    let router = Proc::router(
        &urls,
        &["--routing-logic", routing, "--session-key", "x-user-id"],
    );
    (engines, router)
}

/// 4 sim engines, 2 minutes of multi-round QA: run for real and in virtual time, TTFT and
/// ITL percentiles within 10%, cache hit rate within 2 points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_time_agrees_with_real_time() {
    let _one = crate::serial().await;
    let prof = profile(20000.0, 40.0, 1000.0, 0.5);
    let prof = prof.to_str().expect("path").to_string();
    let workload = [
        "--num-users",
        "8",
        "--num-rounds",
        "5",
        "--qps",
        "2",
        "--shared-system-prompt",
        "500",
        "--user-history-prompt",
        "1000",
        "--question-len",
        "16",
        "--seed",
        "7",
    ];
    let (engines, router) = stack(4, &prof, "session", &[]);
    // Calibrated as a client sees one engine through the router (its HTTP, the router's
    // hop, parsing and tokenizing: the profile's request overhead), then planned from it.
    let one = Proc::router(&[engines[0].url.as_str()], &[]);
    let calibrated = tmp("calibrated.json");
    let report = run(
        &[
            "plan",
            "calibrate",
            "--base-url",
            &one.url,
            "--output",
            calibrated.to_str().expect("path"),
            "--batch-sizes",
            "1,2,4",
        ],
        Duration::from_secs(120),
    );
    drop(one);
    eprintln!("{report}");
    let prof = calibrated.to_str().expect("path").to_string();
    // Flush the calibration's blocks: the workload starts from empty caches.
    for e in &engines {
        let _ = reqwest::Client::new()
            .post(e.url("/reset_prefix_cache"))
            .send()
            .await;
    }
    let before = cache_counts(&reqwest::Client::new(), &engines).await;
    let real_out = tmp("real.json");
    let mut args: Vec<String> = [
        "bench",
        "multi-round",
        "--base-url",
        &router.url,
        "--answer-len",
        "40",
        "--time",
        "120",
        "--no-progress",
        "--output",
        real_out.to_str().expect("path"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(workload.iter().map(|s| s.to_string()));
    let prof_arg = prof.clone();
    let real = tokio::task::spawn_blocking(move || {
        run(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            Duration::from_secs(300),
        );
        read_json(&real_out)
    })
    .await
    .expect("bench");
    let after = cache_counts(&reqwest::Client::new(), &engines).await;
    let real_hit = (after.0 - before.0) / (after.1 - before.1).max(1.0);
    drop((engines, router));

    let virt_out = tmp("virtual.json");
    let mut args = vec![
        "plan",
        "--profile",
        &prof_arg,
        "--workload",
        "multi-round",
        "--output-len",
        "40",
        "--duration",
        "120",
        "--engines",
        "4",
        "--routing",
        "session",
        "--output",
        virt_out.to_str().expect("path"),
    ];
    args.extend_from_slice(&workload);
    run(&args, Duration::from_secs(120));
    let virt = read_json(&virt_out);
    let v = &virt[0]["runs"][0];
    let report = &v["report"];
    let summary = format!(
        "real: ttft {} itl {} hit {real_hit:.3}\nvirtual: ttft {} itl {} hit {}",
        real["ttft_ms"], real["itl_ms"], report["ttft_ms"], report["itl_ms"], v["cache_hit_rate"]
    );
    eprintln!("{summary}");
    assert!(
        real["requests"]["completed"].as_u64().unwrap_or(0) > 100,
        "{summary}"
    );
    for m in ["ttft_ms", "itl_ms"] {
        for s in ["p50", "p90"] {
            let (r, x) = (
                real[m][s].as_f64().unwrap_or(f64::NAN),
                report[m][s].as_f64().unwrap_or(f64::NAN),
            );
            assert!(
                within(x, r, 0.10),
                "{m} {s}: virtual {x}, real {r}\n{summary}"
            );
        }
    }
    let vhit = v["cache_hit_rate"].as_f64().unwrap_or(f64::NAN);
    assert!((vhit - real_hit).abs() <= 0.02, "hit rate\n{summary}");
}

/// The plan's recommendation holds: from simulated runs at 1-3 engines, an SLO between
/// the first capacity cliff's two sides; the plan recommends the engines past it; run for
/// real, that many meet the SLO and one fewer does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planned_engine_count_meets_the_slo_and_one_fewer_does_not() {
    let _one = crate::serial().await;
    let prof = profile(20000.0, 50.0, 2000.0, 0.0);
    let prof = prof.to_str().expect("path").to_string();
    let engine_flags = ["--max-num-seqs", "4"];
    let plan_common = |out: &str| -> Vec<String> {
        [
            "plan",
            "--profile",
            &prof,
            "--workload",
            "random",
            "--qps",
            "4",
            "--input-len",
            "200",
            "--output-len",
            "50",
            "--duration",
            "60",
            "--seed",
            "3",
            "--max-num-seqs",
            "4",
            "--routing",
            "roundrobin",
            "--output",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let p90s_of = |v: &Value| -> Vec<(usize, f64)> {
        v[0]["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .map(|r| {
                (
                    r["engines"].as_u64().unwrap_or(0) as usize,
                    r["report"]["ttft_ms"]["p90"].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect()
    };
    let sweep_out = tmp("sweep.json");
    let mut args = plan_common(sweep_out.to_str().expect("path"));
    args.extend(["--engines".into(), "1,2,3".into()]);
    run(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(120),
    );
    let p90 = p90s_of(&read_json(&sweep_out));
    let k = (1..p90.len())
        .find(|&i| p90[i - 1].1 >= 3.0 * p90[i].1)
        .map(|i| p90[i].0)
        .unwrap_or_else(|| panic!("no capacity cliff in {p90:?}"));
    let slo_ms = (p90[k - 2].1 * p90[k - 1].1).sqrt();

    let plan_out = tmp("plan.json");
    let mut args = plan_common(plan_out.to_str().expect("path"));
    let slo = format!("ttft_p90<={slo_ms:.0}ms");
    args.extend([
        "--max-engines".into(),
        "3".into(),
        "--slo".into(),
        slo.clone(),
    ]);
    run(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Duration::from_secs(120),
    );
    let plan = read_json(&plan_out);
    assert_eq!(plan[0]["best"].as_u64(), Some(k as u64), "{slo}: {plan}");

    // Both counts run at once, each its own stack and client: the sim engines sleep
    // through their modelled time, so two stacks on two cores keep it (and the SLO sits
    // a factor of at least 3 from either side), in half the wall time.
    let runs = [k, k - 1].map(|n| {
        let (engines, router) = stack(n, &prof, "roundrobin", &engine_flags);
        let out = tmp(&format!("real-{n}.json"));
        let args: Vec<String> = [
            "bench",
            "random",
            "--base-url",
            &router.url,
            "--request-rate",
            "4",
            "--time",
            "60",
            "--input-len",
            "200",
            "--output-len",
            "50",
            "--range-ratio",
            "0.5",
            "--seed",
            "3",
            "--no-progress",
            "--output",
            out.to_str().expect("path"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let bench = tokio::task::spawn_blocking(move || {
            run(
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
                Duration::from_secs(300),
            );
            read_json(&out)
        });
        (bench, engines, router)
    });
    let mut real = Vec::new();
    for (bench, engines, router) in runs {
        let report = bench.await.expect("bench");
        drop((engines, router));
        real.push(report["ttft_ms"]["p90"].as_f64().unwrap_or(f64::NAN));
    }
    assert!(
        real[0] <= slo_ms && real[1] > slo_ms,
        "{slo}: real p90 TTFT with {k} engines {} ms, with {} {} ms; simulated {p90:?}",
        real[0],
        k - 1,
        real[1]
    );
}
