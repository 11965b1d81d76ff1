//! The plan: for each routing logic, the fewest engines whose simulated run meets the SLO,
//! then a table, an SVG chart of latency against engine count, and the Helm values that
//! deploy the choice.
//!
//! The search doubles the engine count from 1 until the SLO holds (or `--max-engines`),
//! then bisects between the last count that failed and the first that held: about
//! 2·log2(N) runs per routing logic. It assumes more engines never hurt (true of these
//! policies up to noise; every run is listed, so a violation would show).

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bench::compare::{esc, fmt_tick, nice_axis};
use clap::{Args, Parser};
use engine::backend::sim::SimProfile;
use router::config::RoutingLogic;

use crate::sim::{routing_name, simulate, RunResult, Workload};
use crate::stack::StackConfig;
use crate::WorkloadArgs;

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The engine's sim profile (`plan calibrate` writes one), or a preset's name.
    #[arg(long, default_value = "llama-3.1-8b-h100")]
    pub profile: String,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// What must hold, e.g. 'ttft_p90<=500ms,itl_p99<=50ms' (metrics ttft, itl, tpot,
    /// e2e; statistics p50, p90, p99, mean; units ms or s). Failed requests fail it too.
    #[arg(long, default_value = "ttft_p90<=1s,itl_p99<=100ms")]
    pub slo: String,
    /// The most engines to consider.
    #[arg(long, default_value_t = 16)]
    pub max_engines: usize,
    /// Routing logics to compare (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "roundrobin,prefixaware,kvaware"
    )]
    pub routing: Vec<RoutingLogic>,
    /// Price of one engine for an hour (for the cost per million output tokens).
    #[arg(long, default_value_t = 1.0)]
    pub price_per_engine_hour: f64,
    /// Per engine: KV blocks (default: the profile's, else 16384), tokens per block, and
    /// the scheduler's limits, as the engine's flags.
    #[arg(long)]
    pub num_gpu_blocks: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 32768)]
    pub max_model_len: usize,
    /// Write the chart (SVG) here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Write every run's figures (JSON) here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Put a KV cache server of this many bytes (default 64 GiB) behind the engines, as
    /// `switchyard up --kv-cache-server` and the Helm chart's `cacheserverSpec` do: a
    /// prompt computed on one engine is a remote hit on the others.
    #[arg(long, value_name = "MAX_BYTES", num_args = 0..=1, default_missing_value = "68719476736")]
    pub kv_cache_server: Option<u64>,
    /// Simulate these engine counts (comma-separated) instead of searching.
    #[arg(long, value_delimiter = ',')]
    pub engines: Vec<usize>,
}

/// One bound of the SLO.
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    pub metric: String,
    pub stat: String,
    pub max_ms: f64,
}

impl Bound {
    /// This bound's figure in a run's report (ms).
    pub fn value(&self, r: &bench::Report) -> f64 {
        let d = match self.metric.as_str() {
            "ttft" => &r.ttft_ms,
            "itl" => &r.itl_ms,
            "tpot" => &r.tpot_ms,
            _ => &r.e2e_ms,
        };
        match self.stat.as_str() {
            "p50" => d.p50,
            "p90" => d.p90,
            "p99" => d.p99,
            _ => d.mean,
        }
    }

    pub fn label(&self) -> String {
        format!("{}_{}", self.metric, self.stat)
    }
}

/// Parse 'ttft_p90<=500ms,itl_p99<=50ms'.
pub fn parse_slo(s: &str) -> anyhow::Result<Vec<Bound>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once("<=")
            .with_context(|| format!("SLO {part:?}: expected METRIC_STAT<=VALUE"))?;
        let (metric, stat) = name
            .trim()
            .split_once('_')
            .with_context(|| format!("SLO {part:?}: expected e.g. ttft_p90"))?;
        anyhow::ensure!(
            ["ttft", "itl", "tpot", "e2e"].contains(&metric),
            "SLO {part:?}: metric must be ttft, itl, tpot or e2e"
        );
        anyhow::ensure!(
            ["p50", "p90", "p99", "mean"].contains(&stat),
            "SLO {part:?}: statistic must be p50, p90, p99 or mean"
        );
        let v = value.trim();
        let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix('s') {
            (n, 1000.0)
        } else {
            anyhow::bail!("SLO {part:?}: the value needs a unit, ms or s");
        };
        let n: f64 = num
            .trim()
            .parse()
            .with_context(|| format!("SLO {part:?}: {num:?} is not a number"))?;
        anyhow::ensure!(n > 0.0 && n.is_finite(), "SLO {part:?}: must be positive");
        out.push(Bound {
            metric: metric.into(),
            stat: stat.into(),
            max_ms: n * scale,
        });
    }
    anyhow::ensure!(!out.is_empty(), "the SLO is empty");
    Ok(out)
}

/// Whether a run meets every bound, with no failed request.
pub fn meets(slo: &[Bound], r: &RunResult) -> bool {
    r.report.requests.failed == 0
        && r.report.requests.completed > 0
        && slo.iter().all(|b| b.value(&r.report) <= b.max_ms)
}

/// The stack of `a` with `engines` engines and `routing`.
pub fn stack_config(
    a: &SearchArgs,
    profile: &SimProfile,
    engines: usize,
    routing: RoutingLogic,
) -> StackConfig {
    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        router: router::RouterArgs,
    }
    // The router's own defaults for its policies' knobs.
    let d = Defaults::parse_from(["router"]).router;
    StackConfig {
        engines,
        routing,
        profile: profile.clone(),
        max_num_seqs: a.max_num_seqs,
        max_num_batched_tokens: a.max_num_batched_tokens,
        max_model_len: a.max_model_len,
        block_size: profile.block_size.unwrap_or(a.block_size),
        num_blocks: a.num_gpu_blocks.or(profile.num_gpu_blocks).unwrap_or(16384),
        stats_interval: Duration::from_secs(d.engine_stats_interval.max(1)),
        kv_overlap_weight: d.kv_overlap_weight,
        kv_min_match: d.kv_min_match,
        prefix: router::config::PrefixSettings {
            match_threshold: d.prefix_match_threshold,
            balance_abs: d.balance_abs_threshold,
            balance_rel: d.balance_rel_threshold,
            max_chars: d.prefix_cache_max_chars,
        },
        kv_cache_server: a.kv_cache_server,
    }
}

/// A routing logic's search: every run, and the fewest engines that met the SLO.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub routing: String,
    pub runs: Vec<RunResult>,
    pub best: Option<usize>,
}

impl Outcome {
    pub fn run_at(&self, n: usize) -> Option<&RunResult> {
        self.runs.iter().find(|r| r.engines == n)
    }
}

/// Search the fewest engines for one routing logic (or run the given counts).
pub fn search_one(
    a: &SearchArgs,
    profile: &SimProfile,
    workload: &Workload,
    slo: &[Bound],
    routing: RoutingLogic,
    mut progress: impl FnMut(&RunResult),
) -> anyhow::Result<Outcome> {
    let mut runs: Vec<RunResult> = Vec::new();
    let mut run = |n: usize, runs: &mut Vec<RunResult>| -> anyhow::Result<bool> {
        if let Some(r) = runs.iter().find(|r| r.engines == n) {
            return Ok(meets(slo, r));
        }
        let r = simulate(&stack_config(a, profile, n, routing), workload)?;
        progress(&r);
        let ok = meets(slo, &r);
        runs.push(r);
        Ok(ok)
    };
    if !a.engines.is_empty() {
        for &n in &a.engines {
            run(n.max(1), &mut runs)?;
        }
    } else {
        let max = a.max_engines.max(1);
        let (mut lo, mut hi) = (0usize, None);
        let mut n = 1;
        loop {
            if run(n, &mut runs)? {
                hi = Some(n);
                break;
            }
            lo = n;
            if n >= max {
                break;
            }
            n = (n * 2).min(max);
        }
        if let Some(mut h) = hi {
            while h - lo > 1 {
                let mid = lo + (h - lo) / 2;
                if run(mid, &mut runs)? {
                    h = mid;
                } else {
                    lo = mid;
                }
            }
        }
    }
    runs.sort_by_key(|r| r.engines);
    let best = runs.iter().find(|r| meets(slo, r)).map(|r| r.engines);
    Ok(Outcome {
        routing: routing_name(routing),
        runs,
        best,
    })
}

/// Cost per million output tokens of a run at `price` per engine-hour.
pub fn cost_per_million(r: &RunResult, price: f64) -> f64 {
    let tokens = r.report.tokens.output_total as f64;
    if tokens == 0.0 {
        return f64::INFINITY;
    }
    r.engines as f64 * price * (r.simulated_s / 3600.0) / (tokens / 1e6)
}

/// The table: per routing logic, its choice and the figures at it.
pub fn table(outcomes: &[Outcome], slo: &[Bound], price: f64) -> String {
    let mut s = String::new();
    let _ = write!(s, "{:<13} {:>7}", "routing", "engines");
    for b in slo {
        let _ = write!(s, " {:>12}", format!("{} ms", b.label()));
    }
    let _ = writeln!(
        s,
        " {:>10} {:>10} {:>9} {:>10}",
        "req/s", "out tok/s", "cache hit", "$/M tok"
    );
    for o in outcomes {
        let (label, run) = match o.best {
            Some(n) => (n.to_string(), o.run_at(n)),
            None => (
                format!(">{}", o.runs.last().map_or(0, |r| r.engines)),
                o.runs.last(),
            ),
        };
        let _ = write!(s, "{:<13} {:>7}", o.routing, label);
        match run {
            Some(r) => {
                for b in slo {
                    let _ = write!(s, " {:>12.1}", b.value(&r.report));
                }
                let _ = writeln!(
                    s,
                    " {:>10.2} {:>10.0} {:>8.1}% {:>10.3}",
                    r.report.throughput.requests_per_s,
                    r.report.throughput.output_tokens_per_s,
                    100.0 * r.cache_hit_rate,
                    cost_per_million(r, price)
                );
            }
            None => s.push('\n'),
        }
    }
    s
}

const COLORS: [&str; 6] = [
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2",
];

/// Latency of the SLO's first bound against engine count, one line per routing logic,
/// the bound dashed.
pub fn chart(outcomes: &[Outcome], bound: &Bound) -> String {
    let (w, h, left, top, right, bottom) = (640.0, 400.0, 70.0, 40.0, 150.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let max_n = outcomes
        .iter()
        .flat_map(|o| o.runs.iter().map(|r| r.engines))
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let vmax = outcomes
        .iter()
        .flat_map(|o| o.runs.iter().map(|r| bound.value(&r.report)))
        .fold(bound.max_ms, f64::max);
    let (ymax, ystep) = nice_axis(vmax * 1.05);
    let x = |n: f64| left + pw * (n - 1.0) / (max_n - 1.0);
    let y = |v: f64| top + ph - ph * (v / ymax).clamp(0.0, 1.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="22" text-anchor="middle" font-weight="bold">{} (ms) against engines</text>"#,
        left + pw / 2.0,
        esc(&bound.label())
    );
    let mut t = 0.0;
    while t <= ymax + ystep * 1e-9 {
        let yy = y(t);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + pw,
            left - 6.0,
            yy + 4.0,
            fmt_tick(t)
        );
        t += ystep;
    }
    let step = ((max_n / 8.0).ceil() as usize).max(1);
    let mut n = 1;
    while n as f64 <= max_n {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{n}</text>"#,
            x(n as f64),
            top + ph + 16.0
        );
        n += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">engines</text>"#,
        left + pw / 2.0,
        top + ph + 36.0
    );
    let yb = y(bound.max_ms);
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{yb:.1}\" x2=\"{:.1}\" y2=\"{yb:.1}\" stroke=\"#222\" stroke-dasharray=\"6,4\"/><text x=\"{:.1}\" y=\"{:.1}\">SLO {}</text>",
        left + pw,
        left + pw + 6.0,
        yb + 4.0,
        fmt_tick(bound.max_ms)
    );
    for (i, o) in outcomes.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<String> = o
            .runs
            .iter()
            .map(|r| {
                format!(
                    "{:.1},{:.1}",
                    x(r.engines as f64),
                    y(bound.value(&r.report))
                )
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        for r in &o.runs {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"><title>{} × {}: {:.1} ms</title></circle>"#,
                x(r.engines as f64),
                y(bound.value(&r.report)),
                esc(&o.routing),
                r.engines,
                bound.value(&r.report)
            );
        }
        let ly = top + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="12" height="12" fill="{c}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            left + pw + 10.0,
            ly + 30.0,
            left + pw + 28.0,
            ly + 40.0,
            esc(&o.routing)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The Helm values that deploy `engines` engines routed by `routing`, for the chart's
/// `servingEngineSpec` / `routerSpec`.
pub fn helm_values(
    routing: &str,
    engines: usize,
    profile: &SimProfile,
    kv_cache_server: Option<u64>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# switchyard plan: {engines} engines, {routing} (profile {})",
        profile.name
    );
    let _ = writeln!(s, "routerSpec:\n  routingLogic: {routing}");
    let _ = writeln!(
        s,
        "servingEngineSpec:\n  modelSpec:\n    - name: model          # your model's entry\n      replicaCount: {engines}\n      hpa:\n        enabled: true\n        minReplicas: {engines}\n        maxReplicas: {}\n        metric: vllm_num_requests_waiting\n        target: \"2\"",
        engines + engines.div_ceil(2)
    );
    if let Some(bytes) = kv_cache_server {
        // The server's memory: its capacity and a quarter more for keys and buffers.
        let _ = writeln!(
            s,
            "      lmcacheConfig:\n        enabled: true\ncacheserverSpec:\n  enabled: true\n  maxBytes: \"{bytes}\"\n  resources:\n    requests:\n      memory: {mib}Mi\n    limits:\n      memory: {mib}Mi",
            mib = (bytes + bytes / 4).div_ceil(1 << 20)
        );
    }
    s
}

/// Requests per engine: each count up to 16 engines, else the range and the idle ones.
fn spread(routed: &[u64]) -> String {
    if routed.len() <= 16 {
        return format!("{routed:?}");
    }
    let min = routed.iter().min().copied().unwrap_or(0);
    let max = routed.iter().max().copied().unwrap_or(0);
    let idle = routed.iter().filter(|&&n| n == 0).count();
    format!("{min}..{max} per engine, {idle} idle")
}

/// `switchyard plan`.
pub fn run(a: &SearchArgs) -> anyhow::Result<()> {
    let profile = SimProfile::load(&a.profile).map_err(anyhow::Error::msg)?;
    let slo = parse_slo(&a.slo)?;
    let workload = Workload::new(a.workload.clone())?;
    anyhow::ensure!(!a.routing.is_empty(), "--routing names no logic");
    let mut outcomes = Vec::new();
    for &routing in &a.routing {
        let o = search_one(a, &profile, &workload, &slo, routing, |r| {
            eprintln!(
                "plan: {:<12} {:>3} engines: {}  {} completed, {} failed, hit {:.1}%{}  ({:.0} s simulated in {:.1} s, {:.0}x; routed {})",
                r.routing,
                r.engines,
                slo.iter()
                    .map(|b| format!("{} {:.1} ms", b.label(), b.value(&r.report)))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.report.requests.completed,
                r.report.requests.failed,
                100.0 * r.cache_hit_rate,
                r.kv_server_held.map_or(String::new(), |(chunks, bytes)| format!(
                    " (loaded {} tokens from the KV tiers; server holds {chunks} chunks, {:.1} GiB)",
                    r.kv_loaded_tokens.unwrap_or(0),
                    bytes as f64 / (1u64 << 30) as f64
                )),
                r.simulated_s,
                r.wall_s,
                r.speed(),
                spread(&r.routed)
            );
        })?;
        outcomes.push(o);
    }
    print!("{}", table(&outcomes, &slo, a.price_per_engine_hour));
    let choice = outcomes
        .iter()
        .filter_map(|o| o.best.map(|n| (n, o)))
        .min_by(|(n1, o1), (n2, o2)| {
            n1.cmp(n2).then_with(|| {
                let c = |o: &Outcome, n| {
                    o.run_at(n)
                        .map_or(f64::INFINITY, |r| slo[0].value(&r.report))
                };
                c(o1, *n1).total_cmp(&c(o2, *n2))
            })
        });
    match choice {
        Some((n, o)) => {
            println!("\nFewest engines: {n} with {}.\n", o.routing);
            print!(
                "{}",
                helm_values(&o.routing, n, &profile, a.kv_cache_server)
            );
        }
        None => println!(
            "\nNo routing logic met the SLO within {} engines.",
            a.max_engines
        ),
    }
    if let Some(path) = &a.svg {
        std::fs::write(path, chart(&outcomes, &slo[0]))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("chart written to {}", path.display());
    }
    if let Some(path) = &a.output {
        std::fs::write(path, serde_json::to_string_pretty(&outcomes)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slo_parses_and_refuses_what_it_cannot_read() {
        let b = parse_slo("ttft_p90<=500ms, itl_p99<=0.05s").expect("valid");
        assert_eq!(
            b,
            vec![
                Bound {
                    metric: "ttft".into(),
                    stat: "p90".into(),
                    max_ms: 500.0
                },
                Bound {
                    metric: "itl".into(),
                    stat: "p99".into(),
                    max_ms: 50.0
                }
            ]
        );
        for bad in [
            "",
            "ttft<=1s",
            "ttft_p90<1s",
            "ttft_p95<=1s",
            "foo_p90<=1s",
            "ttft_p90<=1",
            "ttft_p90<=-1ms",
        ] {
            assert!(parse_slo(bad).is_err(), "{bad:?} accepted");
        }
    }
}
