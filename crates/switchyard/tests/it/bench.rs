//! `switchyard bench`: measured latencies match a known sim latency model; errors are
//! counted by kind and the run stops by itself; multi-round conversations grow as
//! specified and carry `x-user-id`. The bench runs as a real process; misbehaving
//! servers are tiny raw-HTTP servers inside the test.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use serde_json::Value;

use crate::common::Proc;

/// Run `switchyard bench <args> --output <tmp> --no-progress`; return the exit status,
/// the JSON report and the wall time. Panics if the bench does not stop within 60 s.
fn bench(args: &[&str]) -> (bool, Value, Duration) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let out = std::env::temp_dir().join(format!(
        "switchyard-bench-test-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&out);
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("bench")
        .args(args)
        .args(["--no-progress", "--output"])
        .arg(&out)
        .env("SWITCHYARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn switchyard bench");
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("bench {args:?} did not stop by itself");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = start.elapsed();
    let text = std::fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("bench {args:?} wrote no report ({status}): {e}"));
    let _ = std::fs::remove_file(&out);
    (
        status.success(),
        serde_json::from_str(&text).expect("report is JSON"),
        took,
    )
}

fn f(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for k in path.split('.') {
        cur = &cur[k];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

/// |got − want| ≤ 25% of want: the stated tolerance for latency medians (loopback HTTP,
/// a debug-build engine, a 2-core machine shared with the other tests).
fn assert_close(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 0.25 * want,
        "{what}: measured {got:.2} ms, model {want:.2} ms (tolerance ±25%)"
    );
}

#[test]
fn measured_ttft_and_itl_match_the_sim_latency_model() {
    // Step = 20 ms + 0.1 ms per prefill token: TTFT = 20 + 0.1·prompt ms (one prefill
    // step, the first token comes out of it), ITL = 20 ms (one decode step per token).
    let engine = Proc::engine(&[
        "--sim-preset",
        "zero",
        "--sim-step-overhead-us",
        "20000",
        "--sim-prefill-us-per-token",
        "100",
    ]);
    let (ok, r, _) = bench(&[
        "random",
        "--base-url",
        &engine.url,
        "--num-requests",
        "8",
        "--concurrency",
        "1",
        "--input-len",
        "200",
        "--output-len",
        "12",
    ]);
    assert!(ok);
    assert_eq!(f(&r, "requests.completed"), 8.0, "{r:#}");
    assert_eq!(f(&r, "requests.failed"), 0.0);
    assert_eq!(
        f(&r, "tokens.output_total"),
        8.0 * 12.0,
        "ignore_eos makes lengths exact"
    );
    let prompt = f(&r, "tokens.prompt_total") / 8.0;
    assert!(
        (200.0..230.0).contains(&prompt),
        "200 words ≈ 200 tokens + template: {prompt}"
    );
    assert_close("TTFT p50", f(&r, "ttft_ms.p50"), 20.0 + 0.1 * prompt);
    assert_close("ITL p50", f(&r, "itl_ms.p50"), 20.0);
    assert_close("TPOT p50", f(&r, "tpot_ms.p50"), 20.0);
    assert_close(
        "E2E p50",
        f(&r, "e2e_ms.p50"),
        20.0 + 0.1 * prompt + 11.0 * 20.0,
    );
    assert_eq!(f(&r, "itl_ms.count"), 8.0 * 11.0);
}

// ---- a raw HTTP/1.1 server that misbehaves on purpose ----------------------------

#[derive(Clone, Copy, Debug)]
enum Behave {
    /// Stream `n` one-word tokens, then finish, usage and `[DONE]`.
    Ok {
        tokens: usize,
        gap_ms: u64,
    },
    Status(u16),
    /// Two tokens, then close the connection mid-stream.
    Cut,
    /// Response headers, then nothing.
    Hang,
}

#[derive(Clone, Debug)]
struct Seen {
    headers: BTreeMap<String, String>,
    body: Value,
}

type Rule = dyn Fn(usize, &Seen) -> Behave + Send + Sync;

struct Fake {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    /// Serve on a free port, a thread per connection, for the rest of the test binary.
    fn start(rule: Arc<Rule>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { return };
                let (s, rule) = (s.clone(), rule.clone());
                std::thread::spawn(move || {
                    let _ = serve_conn(sock, s, rule);
                });
            }
        });
        Fake { url, seen }
    }
}

fn serve_conn(
    mut sock: TcpStream,
    seen: Arc<Mutex<Vec<Seen>>>,
    rule: Arc<Rule>,
) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let mut buf = Vec::new();
    loop {
        // Headers.
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            let mut chunk = [0u8; 8192];
            let n = sock.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or("").to_string();
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        buf.drain(..end + 4);
        while buf.len() < len {
            let mut chunk = [0u8; 8192];
            let n = sock.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        if request_line.starts_with("GET /v1/models") {
            let b = r#"{"object":"list","data":[{"id":"fake-model","object":"model"}]}"#;
            sock.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                    b.len()
                )
                .as_bytes(),
            )?;
            continue;
        }
        let req = Seen {
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        };
        let index = {
            let mut s = seen.lock().unwrap();
            s.push(req.clone());
            s.len() - 1
        };
        // Prompt size in words, reported as prompt tokens.
        let words: usize = req.body["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|x| {
                        x["content"]
                            .as_str()
                            .unwrap_or("")
                            .split_whitespace()
                            .count()
                    })
                    .sum()
            })
            .unwrap_or(0);
        let sse_head =
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let chunk = |data: &str| {
            let ev = format!("data: {data}\n\n");
            format!("{:x}\r\n{ev}\r\n", ev.len())
        };
        let token =
            chunk(r#"{"choices":[{"index":0,"delta":{"content":" ok"},"finish_reason":null}]}"#);
        match rule(index, &req) {
            Behave::Status(code) => {
                let b = r#"{"error":{"message":"injected failure","type":"InternalServerError","code":500}}"#;
                sock.write_all(
                    format!(
                        "HTTP/1.1 {code} Injected\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                        b.len()
                    )
                    .as_bytes(),
                )?;
            }
            Behave::Cut => {
                sock.write_all(sse_head.as_bytes())?;
                sock.write_all(token.as_bytes())?;
                sock.write_all(token.as_bytes())?;
                sock.flush()?;
                std::thread::sleep(Duration::from_millis(5));
                return Ok(()); // dropped mid-stream
            }
            Behave::Hang => {
                sock.write_all(sse_head.as_bytes())?;
                std::thread::sleep(Duration::from_secs(120));
                return Ok(());
            }
            Behave::Ok { tokens, gap_ms } => {
                sock.write_all(sse_head.as_bytes())?;
                sock.write_all(
                    chunk(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#)
                        .as_bytes(),
                )?;
                for _ in 0..tokens {
                    std::thread::sleep(Duration::from_millis(gap_ms));
                    sock.write_all(token.as_bytes())?;
                }
                let fin = chunk(
                    r#"{"choices":[{"index":0,"delta":{"content":""},"finish_reason":"length"}]}"#,
                );
                let usage = chunk(&format!(
                    r#"{{"choices":[],"usage":{{"prompt_tokens":{words},"completion_tokens":{tokens},"total_tokens":{}}}}}"#,
                    words + tokens
                ));
                let done = chunk("[DONE]");
                sock.write_all(format!("{fin}{usage}{done}0\r\n\r\n").as_bytes())?;
            }
        }
    }
}

#[test]
fn errors_are_counted_by_kind_and_the_run_stops_after_its_requests() {
    let fake = Fake::start(Arc::new(|i, _: &Seen| match i % 5 {
        0 => Behave::Status(500),
        1 => Behave::Status(429),
        2 => Behave::Cut,
        3 => Behave::Hang,
        _ => Behave::Ok {
            tokens: 5,
            gap_ms: 2,
        },
    }));
    let (ok, r, took) = bench(&[
        "random",
        "--base-url",
        &fake.url,
        "--num-requests",
        "10",
        "--concurrency",
        "1",
        "--input-len",
        "20",
        "--output-len",
        "5",
        "--request-timeout",
        "0.5",
    ]);
    assert!(ok, "some requests completed, so the exit status is success");
    assert_eq!(
        fake.seen.lock().unwrap().len(),
        10,
        "exactly --num-requests sent"
    );
    assert_eq!(f(&r, "requests.launched"), 10.0);
    assert_eq!(f(&r, "requests.completed"), 2.0, "{r:#}");
    assert_eq!(f(&r, "requests.failed"), 8.0);
    assert_eq!(f(&r, "requests.unfinished"), 0.0);
    for kind in ["http_5xx", "http_4xx", "truncated", "timeout"] {
        assert_eq!(
            f(&r, &format!("errors.{kind}")),
            2.0,
            "{kind}: {:#}",
            r["errors"]
        );
        assert!(r["error_examples"][kind]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
    }
    assert!(r["error_examples"]["http_5xx"]
        .as_str()
        .unwrap()
        .contains("injected failure"));
    assert_eq!(r["errors"].as_object().unwrap().len(), 4);
    assert_eq!(
        f(&r, "tokens.output_total"),
        10.0,
        "only completed requests count"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");

    // Nothing listening: every request is a connect error, and the exit status says so.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (ok, r, _) = bench(&[
        "random",
        "--base-url",
        &format!("http://127.0.0.1:{port}"),
        "--model",
        "m",
        "--num-requests",
        "3",
    ]);
    assert!(!ok, "no request completed: nonzero exit");
    assert_eq!(f(&r, "errors.connect"), 3.0, "{r:#}");
}

#[test]
fn the_run_stops_at_time_and_reports_cancelled_requests_as_unfinished() {
    let fake = Fake::start(Arc::new(|i, _: &Seen| {
        if i % 2 == 0 {
            Behave::Ok {
                tokens: 3,
                gap_ms: 5,
            }
        } else {
            Behave::Hang
        }
    }));
    let (ok, r, took) = bench(&[
        "random",
        "--base-url",
        &fake.url,
        "--request-rate",
        "20",
        "--time",
        "1",
        "--drain-timeout",
        "0.3",
        "--output-len",
        "3",
    ]);
    assert!(ok);
    let sent = fake.seen.lock().unwrap().len() as f64;
    assert!((8.0..=40.0).contains(&sent), "≈20 requests in 1 s: {sent}");
    assert_eq!(f(&r, "requests.launched"), sent);
    assert_eq!(
        f(&r, "requests.completed") + f(&r, "requests.failed") + f(&r, "requests.unfinished"),
        sent
    );
    assert!(f(&r, "requests.unfinished") >= 4.0, "{r:#}");
    assert_eq!(f(&r, "requests.failed"), 0.0);
    assert!(
        took < Duration::from_secs(4),
        "stopped at --time + drain: {took:?}"
    );
}

#[test]
fn multi_round_conversations_grow_and_carry_the_user_id() {
    let fake = Fake::start(Arc::new(|_, _: &Seen| Behave::Ok {
        tokens: 4,
        gap_ms: 1,
    }));
    let (sys, hist, q, ans) = (50usize, 20usize, 5usize, 4usize);
    let (ok, r, took) = bench(&[
        "multi-round",
        "--base-url",
        &fake.url,
        "--num-users",
        "3",
        "--num-rounds",
        "4",
        "--qps",
        "30",
        "--shared-system-prompt",
        &sys.to_string(),
        "--user-history-prompt",
        &hist.to_string(),
        "--question-len",
        &q.to_string(),
        "--answer-len",
        &ans.to_string(),
        "--time",
        "1.5",
    ]);
    assert!(ok);
    assert!(took < Duration::from_secs(5), "{took:?}");
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(f(&r, "requests.completed"), seen.len() as f64);
    // ≈ qps over the run (the ramp-up starts with a full cohort).
    let rate = seen.len() as f64 / 1.5;
    assert!(
        (15.0..=36.0).contains(&rate),
        "rate {rate:.1}/s against --qps 30"
    );
    assert_eq!(r["model"], "fake-model", "model from GET /v1/models");

    let mut by_user: BTreeMap<u64, Vec<&Seen>> = BTreeMap::new();
    for s in &seen {
        let uid = s
            .headers
            .get("x-user-id")
            .expect("x-user-id on every request");
        by_user.entry(uid.parse().unwrap()).or_default().push(s);
        let b = &s.body;
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["max_tokens"], ans);
        assert_eq!(b["model"], "fake-model");
    }
    assert!(
        by_user.len() > 3,
        "finished users are replaced: {}",
        by_user.len()
    );
    let words = |m: &Value| m["content"].as_str().unwrap().split_whitespace().count();
    let mut system = None;
    let mut firsts = std::collections::HashSet::new();
    let mut full_sessions = 0;
    for reqs in by_user.values() {
        assert!(reqs.len() <= 4, "at most --num-rounds questions per user");
        if reqs.len() == 4 {
            full_sessions += 1;
        }
        let mut prev: Option<&Vec<Value>> = None;
        for (k, s) in reqs.iter().enumerate() {
            let round = k + 1;
            let msgs = s.body["messages"].as_array().unwrap();
            assert_eq!(
                msgs.len(),
                2 * round,
                "round {round}: system + 2·round−1 turns"
            );
            assert_eq!(msgs[0]["role"], "system");
            assert_eq!(words(&msgs[0]), sys);
            let sys_text = msgs[0]["content"].as_str().unwrap().to_string();
            assert_eq!(
                system.get_or_insert(sys_text.clone()),
                &sys_text,
                "one shared system prompt"
            );
            assert_eq!(msgs[1]["role"], "user");
            assert_eq!(words(&msgs[1]), hist + q, "user context + first question");
            for (j, m) in msgs.iter().enumerate().skip(2) {
                let (role, n) = if j % 2 == 0 {
                    ("assistant", ans)
                } else {
                    ("user", q)
                };
                assert_eq!(m["role"], role);
                assert_eq!(words(m), n);
            }
            if let Some(p) = prev {
                assert_eq!(&msgs[..p.len()], &p[..], "a round extends the previous one");
            }
            prev = Some(msgs);
        }
        let first = reqs[0].body["messages"][1]["content"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            firsts.insert(first),
            "user-specific text differs between users"
        );
    }
    assert!(full_sessions >= 1, "some user reached round 4");

    // The report's per-round breakdown: prompts grow by one answer and one question.
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4, "{r:#}");
    for (k, rr) in rounds.iter().enumerate() {
        let want = (sys + hist + q + k * (ans + q)) as f64;
        assert_eq!(rr["round"], k + 1);
        assert_eq!(f(rr, "prompt_tokens_mean"), want, "round {}", k + 1);
        assert!(f(rr, "completed") >= 1.0);
    }
}
