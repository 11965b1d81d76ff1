//! `--routing-logic prefixaware` end to end: multi-round conversations stay on the engine
//! that holds their history, users spread over engines, and the engines' prefix caches
//! hit far more often than under round robin for the same traffic.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::common::{client, get_text, metric, Proc};

const USERS: usize = 5;
const ROUNDS: usize = 5;

fn router(engines: &[Proc], logic: &str) -> Proc {
    let backends: Vec<&str> = engines.iter().map(|e| e.url.as_str()).collect();
    Proc::router(&backends, &["--routing-logic", logic])
}

/// A few pseudo-random words (deterministic per seed).
fn words(seed: u64, n: usize) -> String {
    const W: &[&str] = &[
        "alpha", "brick", "cloud", "delta", "ember", "frost", "grain", "harbor", "ivory", "jolt",
        "kite", "lumen", "marsh", "nectar", "orbit", "pixel", "quartz", "ridge", "sable", "tundra",
    ];
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            W[(s % W.len() as u64) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// User `u`'s conversation up to round `r` (1-based): a short shared system prompt, the
/// user's own context, then the questions and answers so far.
fn conversation(u: usize, r: usize) -> Value {
    let mut messages = vec![
        json!({"role":"system","content":"You are a helpful assistant. Answer briefly."}),
        json!({"role":"user","content":format!("My notes: {}", words(1000 + u as u64, 60))}),
        json!({"role":"assistant","content":"Noted."}),
    ];
    for k in 1..=r {
        messages.push(json!({"role":"user","content":format!("Question {k}: {}", words((u * 100 + k) as u64, 15))}));
        if k < r {
            messages
                .push(json!({"role":"assistant","content":words((u * 100 + k + 50) as u64, 40)}));
        }
    }
    json!({"model":"switchyard-sim","messages":messages,"max_tokens":4,"ignore_eos":true})
}

async fn prefix_hits(c: &reqwest::Client, engines: &[Proc]) -> f64 {
    let mut sum = 0.0;
    for e in engines {
        let page = get_text(c, &e.url("/metrics")).await;
        sum += metric(&page, "vllm:prefix_cache_hits_total", &[]).expect("hits metric");
    }
    sum
}

async fn send(c: &reqwest::Client, r: &Proc, u: usize, round: usize) -> String {
    let resp = c
        .post(r.url("/v1/chat/completions"))
        .json(&conversation(u, round))
        .send()
        .await
        .expect("send");
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

/// What [`run`] saw: per user the engine of each round, the engines, their prefix-cache
/// hits, and the router's `/metrics` page at the end.
struct Run {
    served: Vec<Vec<String>>,
    engines: Vec<String>,
    hits: f64,
    page: String,
}

/// Send `users` users' rounds, round by round (in user order, or all users at once).
async fn run(logic: &str, users: usize, concurrent: bool) -> Run {
    let engines: Vec<Proc> = (0..3)
        .map(|_| Proc::engine(&["--sim-preset", "zero"]))
        .collect();
    let r = router(&engines, logic);
    let c = client();
    let mut served = vec![Vec::new(); users];
    for round in 1..=ROUNDS {
        if concurrent {
            let all = (0..users).map(|u| send(&c, &r, u, round));
            for (u, by) in futures_util::future::join_all(all)
                .await
                .into_iter()
                .enumerate()
            {
                served[u].push(by);
            }
        } else {
            for (u, s) in served.iter_mut().enumerate() {
                s.push(send(&c, &r, u, round).await);
            }
        }
    }
    let hits = prefix_hits(&c, &engines).await;
    let page = c
        .get(r.url("/metrics"))
        .send()
        .await
        .expect("router metrics")
        .text()
        .await
        .expect("page");
    Run {
        served,
        engines: engines.iter().map(Proc::host_port).collect(),
        hits,
        page,
    }
}

/// The router's prefixaware series after `users` users' `ROUNDS` rounds: every request
/// counted, each user's first round a miss and its later rounds hits.
fn assert_prefix_metrics(page: &str, users: usize) {
    let m = |name: &str, labels: &[(&str, &str)]| {
        metric(page, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in\n{page}"))
    };
    let d = "vllm:router_prefix_decisions_total";
    let hit = m(d, &[("outcome", "cache_hit")]);
    let miss = m(d, &[("outcome", "miss")]);
    let imbalanced = m(d, &[("outcome", "imbalanced")]);
    assert_eq!(m(d, &[("outcome", "no_prompt")]), 0.0);
    assert_eq!(hit + miss + imbalanced, (users * ROUNDS) as f64);
    assert!(miss >= users as f64, "first rounds miss: {miss}");
    assert!(
        hit >= (users * (ROUNDS - 1)) as f64 - imbalanced,
        "later rounds hit: {hit} (imbalanced {imbalanced})"
    );
    let ratio = "vllm:router_prefix_matched_prefix_ratio";
    assert_eq!(m(&format!("{ratio}_count"), &[]), (users * ROUNDS) as f64);
    assert!(m(&format!("{ratio}_sum"), &[]) > 0.5 * hit);
    assert!(m("vllm:router_prefix_tree_bytes", &[]) > 0.0);
    assert!(m("vllm:router_prefix_tree_nodes", &[]) >= users as f64);
}

fn assert_sticky_and_spread(served: &[Vec<String>], engines: &[String]) {
    let mut owners = HashSet::new();
    for (u, rounds) in served.iter().enumerate() {
        assert!(
            rounds.iter().all(|e| *e == rounds[0]),
            "user {u} moved: {rounds:?}"
        );
        assert!(engines.contains(&rounds[0]), "{rounds:?}");
        owners.insert(rounds[0].clone());
    }
    assert_eq!(owners.len(), 3, "users spread over all engines: {served:?}");
}

#[tokio::test]
async fn prefixaware_keeps_conversations_on_their_engine() {
    // In order within a round, so round robin's placement is deterministic: five users
    // over three engines, so its rotation moves every conversation every round.
    let Run {
        served,
        engines,
        hits,
        page,
    } = run("prefixaware", USERS, false).await;
    assert_sticky_and_spread(&served, &engines);
    assert_prefix_metrics(&page, USERS);
    let Run {
        served: rr_served,
        hits: rr_hits,
        page: rr_page,
        ..
    } = run("roundrobin", USERS, false).await;
    assert!(
        metric(&rr_page, "vllm:router_prefix_decisions_total", &[]).is_none(),
        "prefixaware series only under prefixaware"
    );
    assert!(
        rr_served
            .iter()
            .all(|r| r.iter().collect::<HashSet<_>>().len() == 3),
        "round robin moves conversations: {rr_served:?}"
    );
    assert!(
        hits > 2.0 * rr_hits && hits > 0.0,
        "prefix cache hits: prefixaware {hits}, roundrobin {rr_hits}"
    );
    eprintln!("prefix cache hits: prefixaware {hits}, roundrobin {rr_hits}");
}

#[tokio::test]
async fn prefixaware_sticks_under_concurrent_users() {
    // All users at once (the router's worker threads share the tree).
    let r = run("prefixaware", 9, true).await;
    assert_sticky_and_spread(&r.served, &r.engines);
    assert_prefix_metrics(&r.page, 9);
}
