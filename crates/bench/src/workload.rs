//! The workloads and the loops that drive them.
//!
//! Prompts are generated as they are sent (from seeded generators), so memory does not
//! grow with `--num-requests`; a multi-round user keeps only its own conversation,
//! at most `--num-rounds` questions and answers.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep_until, Instant};

use crate::client::Target;
use crate::report::Report;
use crate::stats::Recorder;
use crate::text::{push_words, words, Rng};
use crate::{
    secs, Api, CommonArgs, LengthDist, LoadArgs, MultiRoundArgs, RandomArgs, SharedPrefixArgs,
    TraceArgs,
};

// Seed streams, so that each kind of choice has its own generator.
const S_SYSTEM: u64 = 1;
const S_ARRIVALS: u64 = 2;
const S_LENGTHS: u64 = 3;
const S_ORDER: u64 = 4;
const S_GROUP: u64 = 1 << 32;
const S_USER: u64 = 2 << 32;
const S_REQUEST: u64 = 3 << 32;

#[derive(Serialize)]
struct Msg<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: &'a [Msg<'a>],
    max_tokens: usize,
    stream: bool,
    stream_options: StreamOptions,
    ignore_eos: bool,
    /// `--extra-body`'s fields.
    #[serde(flatten)]
    extra: Option<&'a Map<String, Value>>,
}

#[derive(Serialize)]
struct CompletionBody<'a> {
    model: &'a str,
    prompt: &'a str,
    max_tokens: usize,
    stream: bool,
    stream_options: StreamOptions,
    ignore_eos: bool,
    /// `--extra-body`'s fields.
    #[serde(flatten)]
    extra: Option<&'a Map<String, Value>>,
}

fn chat_body(
    model: &str,
    messages: &[Msg<'_>],
    max_tokens: usize,
    extra: Option<&Map<String, Value>>,
) -> Bytes {
    let b = ChatBody {
        model,
        messages,
        max_tokens,
        stream: true,
        stream_options: StreamOptions {
            include_usage: true,
        },
        ignore_eos: true,
        extra,
    };
    Bytes::from(serde_json::to_vec(&b).expect("serializable"))
}

fn prompt_body(
    api: Api,
    model: &str,
    prompt: &str,
    max_tokens: usize,
    extra: Option<&Map<String, Value>>,
) -> (&'static str, Bytes) {
    match api {
        Api::Chat => (
            "/v1/chat/completions",
            chat_body(
                model,
                &[Msg {
                    role: "user",
                    content: prompt,
                }],
                max_tokens,
                extra,
            ),
        ),
        Api::Completions => {
            let b = CompletionBody {
                model,
                prompt,
                max_tokens,
                stream: true,
                stream_options: StreamOptions {
                    include_usage: true,
                },
                ignore_eos: true,
                extra,
            };
            (
                "/v1/completions",
                Bytes::from(serde_json::to_vec(&b).expect("serializable")),
            )
        }
    }
}

async fn connect(common: &CommonArgs) -> anyhow::Result<(Target, String)> {
    anyhow::ensure!(
        common.request_timeout > 0.0,
        "--request-timeout must be positive"
    );
    let target = Target::new(
        &common.base_url,
        common.api_key.clone(),
        secs(common.request_timeout),
    );
    let model = match &common.model {
        Some(m) => m.clone(),
        None => target
            .first_model()
            .await
            .map_err(|e| anyhow::anyhow!("finding the model at {}: {e}", common.base_url))?,
    };
    Ok((target, model))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A progress line on stderr: in place every second on a terminal, else every 10 s.
struct Progress {
    task: Option<JoinHandle<()>>,
    tty: bool,
}

impl Progress {
    fn start(rec: Arc<Recorder>, name: &'static str, enabled: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        if !enabled {
            return Progress { task: None, tty };
        }
        let every = Duration::from_secs(if tty { 1 } else { 10 });
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let t = (crate::now() - rec.start).as_secs_f64();
                let done = rec.completed.load(Ordering::Relaxed);
                let line = format!(
                    "{name}: {t:.0}s  completed {done}  failed {}  in flight {}  {:.2} req/s  {:.0} output tok/s",
                    rec.failed.load(Ordering::Relaxed),
                    rec.in_flight.load(Ordering::Relaxed),
                    done as f64 / t,
                    rec.output_tokens.load(Ordering::Relaxed) as f64 / t,
                );
                if tty {
                    eprint!("\r\x1b[2K{line}");
                } else {
                    eprintln!("{line}");
                }
            }
        });
        Progress {
            task: Some(task),
            tty,
        }
    }

    fn stop(self) {
        if let Some(t) = self.task {
            t.abort();
            if self.tty {
                eprint!("\r\x1b[2K");
            }
        }
    }
}

/// Wait for the tasks; with a drain limit, cancel whatever is still running after it.
async fn drain(set: &mut JoinSet<()>, limit: Option<Duration>) {
    let all = async { while set.join_next().await.is_some() {} };
    match limit {
        Some(l) => {
            let _ = tokio::time::timeout(l, all).await;
        }
        None => all.await,
    }
    set.abort_all();
    while set.join_next().await.is_some() {}
}

/// What a run was, for its report.
struct RunInfo {
    workload: &'static str,
    label: String,
    load: Option<f64>,
    model: String,
    config: serde_json::Value,
    started_unix: f64,
}

fn finish(info: RunInfo, common: &CommonArgs, rec: &Recorder) -> Report {
    let launched = rec.launched.load(Ordering::Relaxed);
    Report::new(
        info.workload,
        common.label.clone().unwrap_or(info.label),
        info.load,
        &common.base_url,
        info.model,
        info.config,
        rec.totals(),
        launched,
        info.started_unix,
    )
}

/// Open loop: `n` requests at a Poisson rate and/or under a concurrency cap.
async fn open_loop<F>(
    target: &Target,
    load: &LoadArgs,
    common: &CommonArgs,
    n: usize,
    name: &'static str,
    mut make: F,
) -> Arc<Recorder>
where
    F: FnMut(usize) -> (&'static str, Bytes),
{
    let rec = Arc::new(Recorder::new());
    let progress = Progress::start(rec.clone(), name, !common.no_progress);
    let start = Instant::from_std(rec.start);
    let deadline = load.time.map(|t| start + secs(t));
    let far = start + Duration::from_secs(86400 * 365);
    let sem = load.concurrency.map(|c| Arc::new(Semaphore::new(c.max(1))));
    let mut arrivals = Rng::derive(common.seed, S_ARRIVALS);
    let mut set = JoinSet::new();
    let mut next = start;
    for i in 0..n {
        if load.request_rate.is_finite() && i > 0 {
            next += secs(arrivals.exp(1.0 / load.request_rate));
            if deadline.is_some_and(|d| next >= d) {
                break;
            }
            sleep_until(next).await;
        }
        let permit = match &sem {
            Some(s) => tokio::select! {
                p = s.clone().acquire_owned() => Some(p.expect("semaphore open")),
                _ = sleep_until(deadline.unwrap_or(far)) => break,
            },
            None => None,
        };
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let (path, body) = make(i);
        let t = target.clone();
        let guard = rec.begin();
        let r = rec.clone();
        set.spawn(async move {
            let o = t.stream(path, body, None, false).await;
            r.record(&o, None);
            drop(guard);
            drop(permit);
        });
        while set.try_join_next().is_some() {}
    }
    drain(&mut set, deadline.map(|_| secs(common.drain_timeout))).await;
    progress.stop();
    rec
}

fn load_label(load: &LoadArgs) -> (String, Option<f64>) {
    match (load.request_rate.is_finite(), load.concurrency) {
        (true, Some(c)) => (
            format!("rate={} c={c}", load.request_rate),
            Some(load.request_rate),
        ),
        (true, None) => (
            format!("rate={}", load.request_rate),
            Some(load.request_rate),
        ),
        (false, Some(c)) => (format!("c={c}"), Some(c as f64)),
        (false, None) => ("burst".into(), None),
    }
}

fn sample_len(rng: &mut Rng, mean: usize, ratio: f64, dist: LengthDist) -> usize {
    match dist {
        LengthDist::Uniform => {
            let lo = (mean as f64 * (1.0 - ratio)).round().max(1.0) as u64;
            let hi = (mean as f64 * (1.0 + ratio)).round().max(1.0) as u64;
            rng.range(lo, hi) as usize
        }
        LengthDist::Exponential => (rng.exp(mean as f64).round() as usize).max(1),
    }
}

/// `random`: prompt and output lengths drawn from a distribution.
pub async fn random(a: &RandomArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.range_ratio),
        "--range-ratio must be within [0, 1]"
    );
    anyhow::ensure!(a.load.request_rate > 0.0, "--request-rate must be positive");
    let n = a.load.num_requests.unwrap_or(if a.load.time.is_some() {
        usize::MAX
    } else {
        200
    });
    anyhow::ensure!(
        n < usize::MAX || a.load.request_rate.is_finite() || a.load.concurrency.is_some(),
        "--time without --num-requests needs --request-rate or --concurrency"
    );
    let (target, model) = connect(&a.common).await?;
    random_on(&target, model, a).await
}

/// [`random`] against `target` serving `model`.
pub async fn random_on(target: &Target, model: String, a: &RandomArgs) -> anyhow::Result<Report> {
    let n = a.load.num_requests.unwrap_or(if a.load.time.is_some() {
        usize::MAX
    } else {
        200
    });
    let started = unix_now();
    let mut lengths = Rng::derive(a.common.seed, S_LENGTHS);
    let rec = open_loop(target, &a.load, &a.common, n, "random", |i| {
        let input = sample_len(&mut lengths, a.input_len, a.range_ratio, a.length_dist);
        let output = sample_len(&mut lengths, a.output_len, a.range_ratio, a.length_dist);
        let prompt = words(&mut Rng::derive(a.common.seed, S_REQUEST + i as u64), input);
        prompt_body(a.api, &model, &prompt, output, a.common.extra_body.as_ref())
    })
    .await;
    let (load, value) = load_label(&a.load);
    Ok(finish(
        RunInfo {
            workload: "random",
            label: format!("random {load}"),
            load: value,
            model,
            config: serde_json::to_value(a)?,
            started_unix: started,
        },
        &a.common,
        &rec,
    ))
}

/// `shared-prefix`: groups of requests sharing a long prefix, in a shuffled order.
pub async fn shared_prefix(a: &SharedPrefixArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        a.num_groups > 0 && a.prompts_per_group > 0,
        "empty workload"
    );
    anyhow::ensure!(a.load.request_rate > 0.0, "--request-rate must be positive");
    let (target, model) = connect(&a.common).await?;
    shared_prefix_on(&target, model, a).await
}

/// [`shared_prefix`] against `target` serving `model`.
pub async fn shared_prefix_on(
    target: &Target,
    model: String,
    a: &SharedPrefixArgs,
) -> anyhow::Result<Report> {
    let prefixes: Vec<String> = (0..a.num_groups)
        .map(|g| {
            words(
                &mut Rng::derive(a.common.seed, S_GROUP + g as u64),
                a.prefix_len,
            )
        })
        .collect();
    let mut order: Vec<(u32, u32)> = (0..a.num_groups as u32)
        .flat_map(|g| (0..a.prompts_per_group as u32).map(move |k| (g, k)))
        .collect();
    Rng::derive(a.common.seed, S_ORDER).shuffle(&mut order);
    let total = order.len();
    let n = a.load.num_requests.unwrap_or(total).min(total);
    let started = unix_now();
    let rec = open_loop(target, &a.load, &a.common, n, "shared-prefix", |i| {
        let (g, k) = order[i];
        let mut prompt = prefixes[g as usize].clone();
        let stream = S_REQUEST + ((g as u64) << 20) + k as u64;
        push_words(
            &mut Rng::derive(a.common.seed, stream),
            a.suffix_len,
            &mut prompt,
        );
        prompt_body(
            a.api,
            &model,
            &prompt,
            a.output_len,
            a.common.extra_body.as_ref(),
        )
    })
    .await;
    let (load, value) = load_label(&a.load);
    Ok(finish(
        RunInfo {
            workload: "shared-prefix",
            label: format!("shared-prefix {load}"),
            load: value,
            model,
            config: serde_json::to_value(a)?,
            started_unix: started,
        },
        &a.common,
        &rec,
    ))
}

struct Session {
    target: Target,
    model: String,
    system: String,
    args: MultiRoundArgs,
    rec: Arc<Recorder>,
    deadline: Instant,
    /// Seconds between one user's questions (start to start).
    gap: Duration,
}

impl Session {
    /// One user: `rounds` questions, each after the previous answer and at least
    /// `gap` after the previous question; stops at the deadline or on an error.
    async fn user(self: Arc<Self>, id: u64, rounds: usize, first: Instant) {
        let uid = id.to_string();
        let a = &self.args;
        let mut rng = Rng::derive(a.common.seed, S_USER + id);
        let mut own: Vec<(&'static str, String)> = Vec::with_capacity(2 * rounds);
        let mut next = first;
        for round in 1..=rounds {
            sleep_until(next.min(self.deadline)).await;
            if Instant::now() >= self.deadline {
                break;
            }
            let mut q = String::new();
            if round == 1 {
                push_words(&mut rng, a.user_history_prompt, &mut q);
            }
            push_words(&mut rng, a.question_len, &mut q);
            own.push(("user", q));
            let body = {
                let mut msgs = Vec::with_capacity(own.len() + 1);
                msgs.push(Msg {
                    role: "system",
                    content: &self.system,
                });
                msgs.extend(own.iter().map(|(role, content)| Msg { role, content }));
                chat_body(
                    &self.model,
                    &msgs,
                    a.answer_len,
                    a.common.extra_body.as_ref(),
                )
            };
            let sent = Instant::now();
            let guard = self.rec.begin();
            let o = self
                .target
                .stream("/v1/chat/completions", body, Some(&uid), true)
                .await;
            self.rec.record(&o, Some(round));
            drop(guard);
            if o.error.is_some() {
                break; // the user leaves; a new one takes the slot
            }
            own.push(("assistant", o.text));
            next = sent + self.gap;
        }
        // The user holds its slot until its last question's gap is over, so that with
        // every slot taken the rate is num_users/gap = qps.
        sleep_until(next.min(self.deadline)).await;
    }
}

/// `multi-round`: the Production Stack's multi-round QA.
///
/// Each user asks `--num-rounds` questions, one every `num_users/qps` seconds (or once
/// the previous answer is in, if later), each carrying the whole conversation: the shared
/// system prompt, then the user's own context and first question, then alternating
/// answers and questions. New users join every `(num_rounds−1)/qps` seconds while fewer
/// than `--num-users` are active, so the overall rate approaches `--qps`. By default the
/// run starts with a full cohort, staggered over one question gap with 1..num_rounds
/// questions left each (the steady state), as the Production Stack's ramp-up does.
pub async fn multi_round(a: &MultiRoundArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        a.num_users > 0 && a.num_rounds > 0,
        "--num-users and --num-rounds must be positive"
    );
    anyhow::ensure!(a.qps > 0.0 && a.qps.is_finite(), "--qps must be positive");
    anyhow::ensure!(a.time > 0.0, "--time must be positive");
    let (target, model) = connect(&a.common).await?;
    multi_round_on(target, model, a).await
}

/// [`multi_round`] against `target` serving `model`.
pub async fn multi_round_on(
    target: Target,
    model: String,
    a: &MultiRoundArgs,
) -> anyhow::Result<Report> {
    let started = unix_now();
    let n = a.num_users;
    let r = a.num_rounds;
    let gap = secs(n as f64 / a.qps);
    let join = secs(if r > 1 { (r - 1) as f64 } else { 1.0 } / a.qps);
    let rec = Arc::new(Recorder::new());
    let progress = Progress::start(rec.clone(), "multi-round", !a.common.no_progress);
    let start = Instant::from_std(rec.start);
    let deadline = start + secs(a.time);
    let session = Arc::new(Session {
        target,
        model: model.clone(),
        system: words(
            &mut Rng::derive(a.common.seed, S_SYSTEM),
            a.shared_system_prompt,
        ),
        args: a.clone(),
        rec: rec.clone(),
        deadline,
        gap,
    });
    let slots = Arc::new(Semaphore::new(n));
    let mut users = JoinSet::new();
    let mut next_id = 0u64;
    let mut spawn = |users: &mut JoinSet<()>, rounds: usize, first: Instant, permit| {
        next_id += 1;
        let s = session.clone();
        users.spawn(async move {
            s.user(next_id, rounds, first).await;
            drop(permit);
        });
    };
    let mut next_join = start;
    if !a.no_ramp_up {
        for i in 0..n {
            let permit = slots.clone().try_acquire_owned().expect("free slot");
            let rounds = (1 + i * r / n).min(r);
            spawn(
                &mut users,
                rounds,
                start + gap.mul_f64(i as f64 / n as f64),
                permit,
            );
        }
        next_join = start + join;
    }
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore open"),
            _ = sleep_until(deadline) => break,
        };
        sleep_until(next_join.min(deadline)).await;
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        spawn(&mut users, r, now, permit);
        next_join = next_join.max(now) + join;
        while users.try_join_next().is_some() {}
    }
    drain(&mut users, Some(secs(a.common.drain_timeout))).await;
    progress.stop();
    Ok(finish(
        RunInfo {
            workload: "multi-round",
            label: format!("multi-round qps={} users={}", a.qps, a.num_users),
            load: Some(a.qps),
            model,
            config: serde_json::to_value(a)?,
            started_unix: started,
        },
        &a.common,
        &rec,
    ))
}

/// One line of a trace file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TraceEntry {
    /// Seconds (any origin: replayed relative to the earliest).
    pub timestamp: f64,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub prompt_tokens: Option<usize>,
    pub output_tokens: usize,
    #[serde(default)]
    pub session_id: Option<String>,
}

/// Read a JSONL trace, sorted by arrival; a bad line is an error naming it.
pub fn read_trace(path: &std::path::Path) -> anyhow::Result<Vec<TraceEntry>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e: TraceEntry = serde_json::from_str(line)
            .map_err(|err| anyhow::anyhow!("{}:{}: {err}", path.display(), i + 1))?;
        anyhow::ensure!(
            e.timestamp.is_finite() && (e.prompt.is_some() || e.prompt_tokens.is_some()),
            "{}:{}: needs a finite timestamp and a prompt or prompt_tokens",
            path.display(),
            i + 1
        );
        out.push(e);
    }
    anyhow::ensure!(!out.is_empty(), "{}: no requests", path.display());
    out.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    Ok(out)
}

/// `trace`: replay a JSONL file's arrivals at their times.
pub async fn trace(a: &TraceArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        a.speedup > 0.0 && a.speedup.is_finite(),
        "--speedup must be positive"
    );
    let entries = read_trace(&a.file)?;
    let (target, model) = connect(&a.common).await?;
    trace_on(&target, model, a, &entries).await
}

/// [`trace`] of `entries` (sorted by arrival) against `target` serving `model`.
pub async fn trace_on(
    target: &Target,
    model: String,
    a: &TraceArgs,
    entries: &[TraceEntry],
) -> anyhow::Result<Report> {
    let started = unix_now();
    let rec = Arc::new(Recorder::new());
    let progress = Progress::start(rec.clone(), "trace", !a.common.no_progress);
    let start = Instant::from_std(rec.start);
    let t0 = entries.first().map_or(0.0, |e| e.timestamp);
    let deadline = a.time.map(|t| start + secs(t));
    let mut set = JoinSet::new();
    for (i, e) in entries.iter().enumerate() {
        let at = start + secs((e.timestamp - t0) / a.speedup);
        if deadline.is_some_and(|d| at >= d) {
            break;
        }
        sleep_until(at).await;
        let prompt = match (&e.prompt, e.prompt_tokens) {
            (Some(p), _) => p.clone(),
            (None, n) => words(
                &mut Rng::derive(a.common.seed, S_REQUEST + i as u64),
                n.unwrap_or(1),
            ),
        };
        let (path, body) = prompt_body(
            a.api,
            &model,
            &prompt,
            e.output_tokens.max(1),
            a.common.extra_body.as_ref(),
        );
        let (t, r, user) = (target.clone(), rec.clone(), e.session_id.clone());
        let guard = rec.begin();
        set.spawn(async move {
            let o = t.stream(path, body, user.as_deref(), false).await;
            r.record(&o, None);
            drop(guard);
        });
        while set.try_join_next().is_some() {}
    }
    drain(&mut set, deadline.map(|_| secs(a.common.drain_timeout))).await;
    progress.stop();
    Ok(finish(
        RunInfo {
            workload: "trace",
            label: format!("trace {}", a.file.display()),
            load: None,
            model,
            config: serde_json::to_value(a)?,
            started_unix: started,
        },
        &a.common,
        &rec,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(b: &Bytes) -> Value {
        serde_json::from_slice(b).expect("JSON body")
    }

    #[test]
    fn a_trace_is_read_sorted_and_bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("sy-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("t.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"timestamp": 12.5, "prompt": "hello there", "output_tokens": 4, "session_id": "u1"}"#,
                "\n\n",
                r#"{"timestamp": 10, "prompt_tokens": 300, "output_tokens": 20}"#,
                "\n"
            ),
        )
        .expect("write");
        let t = read_trace(&path).expect("valid trace");
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].timestamp, t[0].prompt_tokens), (10.0, Some(300)));
        assert_eq!(t[1].session_id.as_deref(), Some("u1"));
        std::fs::write(
            &path,
            "{\"timestamp\": 1, \"prompt\": \"a\", \"output_tokens\": 1}\nnot json\n",
        )
        .expect("write");
        let e = read_trace(&path).expect_err("bad line").to_string();
        assert!(e.contains("t.jsonl:2"), "{e}");
        std::fs::write(&path, "{\"timestamp\": 1, \"output_tokens\": 1}\n").expect("write");
        assert!(read_trace(&path).is_err(), "no prompt");
        std::fs::write(&path, "").expect("write");
        assert!(read_trace(&path).is_err(), "empty");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn extra_body_fields_join_every_request_body() {
        let extra: Map<String, Value> =
            serde_json::from_str(r#"{"lora": [{"id": 2, "scale": 1.0}]}"#).expect("object");
        for api in [Api::Chat, Api::Completions] {
            let (_, plain) = prompt_body(api, "m", "hi", 4, None);
            let (path, with) = prompt_body(api, "m", "hi", 4, Some(&extra));
            let (plain, with) = (json(&plain), json(&with));
            assert!(plain.get("lora").is_none(), "{path}: {plain}");
            assert_eq!(with["lora"], extra["lora"], "{path}");
            let mut rest = with.as_object().expect("object").clone();
            rest.remove("lora");
            assert_eq!(
                Value::Object(rest),
                plain,
                "{path}: the other fields are unchanged"
            );
        }
        let msgs = [Msg {
            role: "user",
            content: "hi",
        }];
        assert_eq!(
            json(&chat_body("m", &msgs, 4, Some(&extra)))["lora"][0]["id"],
            2
        );
    }
}
