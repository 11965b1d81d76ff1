//! `switchyard plan calibrate`: fit the sim's latency model to a running engine (ours or
//! real vLLM) and write a sim profile.
//!
//! The model: a step costs `overhead + prefill·(prompt tokens computed) + per_seq·(decoding
//! sequences) + per_ctx·(their context tokens)`. Two sweeps measure it through the OpenAI
//! API, as a client would:
//! - prefill: one request at a time, prompts of each `--prefill-lengths` (random words, so
//!   the prefix cache never hits), one output token: TTFT = HTTP round trip + one step of
//!   `P` prompt tokens;
//! - decode: `B` streams of each `--batch-sizes` at once, at each `--decode-contexts`
//!   prompt length: the median gap between tokens after the first few = one step of `B`
//!   sequences with about `L + T/2` context tokens each.
//!
//! Least squares over both, with the HTTP round trip as a fifth unknown that only TTFT
//! carries, and no cost allowed below zero. The KV pool comes from the engine's
//! `vllm:cache_config_info`. The fit report lists each measurement against the model.

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bench::client::Target;
use bench::text::{words, Rng};
use clap::Args;
use engine::backend::sim::SimProfile;
use serde_json::json;

#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    /// The engine's base URL (with or without `/v1`).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Model name; default: the first the engine lists.
    #[arg(long)]
    pub model: Option<String>,
    /// Write the profile here (JSON).
    #[arg(long)]
    pub output: PathBuf,
    /// The profile's name (default: the model's).
    #[arg(long)]
    pub name: Option<String>,
    /// Prompt lengths of the prefill sweep (tokens, about: the engine's tokenizer decides).
    #[arg(long, value_delimiter = ',', default_value = "64,256,512,1024")]
    pub prefill_lengths: Vec<usize>,
    /// Streams at once in the decode sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub batch_sizes: Vec<usize>,
    /// Prompt lengths of the decode sweep (at least two, to tell the per-sequence cost
    /// from the per-context-token cost).
    #[arg(long, value_delimiter = ',', default_value = "32,1024")]
    pub decode_contexts: Vec<usize>,
    /// Output tokens per stream in the decode sweep.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Times each prefill length is measured.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bearer token, if the engine wants one.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// One measurement: the step's shape and its time (µs).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Point {
    /// Prompt tokens computed in the step (prefill sweep), else 0.
    pub prefill_tokens: f64,
    /// Decoding sequences in the step (decode sweep), else 0.
    pub seqs: f64,
    /// Their context tokens in all.
    pub ctx_tokens: f64,
    /// Measured: TTFT (prefill) or inter-token gap (decode), µs.
    pub us: f64,
}

impl Point {
    fn row(&self) -> [f64; 5] {
        let ttft = if self.seqs == 0.0 { 1.0 } else { 0.0 };
        [1.0, self.prefill_tokens, self.seqs, self.ctx_tokens, ttft]
    }
}

/// The fitted costs (µs) and the HTTP round trip TTFT carries.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Fit {
    pub overhead_us: f64,
    pub prefill_us_per_token: f64,
    pub decode_us_per_seq: f64,
    pub decode_us_per_ctx_token: f64,
    pub http_us: f64,
    /// Share of the measurements' variance the model explains, and the typical miss.
    pub r2: f64,
    pub rms_rel_error: f64,
}

impl Fit {
    pub fn predict(&self, p: &Point) -> f64 {
        let c = [
            self.overhead_us,
            self.prefill_us_per_token,
            self.decode_us_per_seq,
            self.decode_us_per_ctx_token,
            self.http_us,
        ];
        p.row().iter().zip(c).map(|(x, c)| x * c).sum()
    }
}

/// Solve the least-squares problem over `cols` (the rest fixed at zero) by the normal
/// equations; None when singular.
fn lstsq(points: &[Point], cols: &[usize]) -> Option<Vec<f64>> {
    let k = cols.len();
    // Relative errors matter: weight each point by 1/measured (so a 1 ms step counts as
    // much as a 100 ms one).
    let mut a = vec![vec![0.0; k + 1]; k];
    for p in points {
        let w = 1.0 / p.us.max(1.0);
        let r = p.row();
        for i in 0..k {
            for j in 0..k {
                a[i][j] += w * w * r[cols[i]] * r[cols[j]];
            }
            a[i][k] += w * w * r[cols[i]] * p.us;
        }
    }
    for c in 0..k {
        let piv = (c..k).max_by(|&x, &y| a[x][c].abs().total_cmp(&a[y][c].abs()))?;
        if a[piv][c].abs() < 1e-12 {
            return None;
        }
        a.swap(c, piv);
        let pivot = a[c].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot[c];
                for (x, p) in row.iter_mut().zip(&pivot).skip(c) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..k).map(|i| a[i][k] / a[i][i]).collect())
}

/// Fit the model to `points`: least squares, dropping any cost that comes out negative
/// (fixed at zero) and fitting again.
pub fn fit(points: &[Point]) -> anyhow::Result<Fit> {
    let mut cols: Vec<usize> = (0..5).collect();
    let coef = loop {
        let c = lstsq(points, &cols).context(
            "the measurements cannot tell the costs apart (vary prompt lengths, batch sizes and contexts)",
        )?;
        match c.iter().position(|v| *v < 0.0) {
            Some(i) => {
                cols.remove(i);
                anyhow::ensure!(!cols.is_empty(), "no cost is positive");
            }
            None => break c,
        }
    };
    let mut full = [0.0; 5];
    for (i, &c) in cols.iter().enumerate() {
        full[c] = coef[i];
    }
    let mut f = Fit {
        overhead_us: full[0],
        prefill_us_per_token: full[1],
        decode_us_per_seq: full[2],
        decode_us_per_ctx_token: full[3],
        http_us: full[4],
        r2: 0.0,
        rms_rel_error: 0.0,
    };
    let mean = points.iter().map(|p| p.us).sum::<f64>() / points.len().max(1) as f64;
    let (mut ss_res, mut ss_tot, mut rel) = (0.0, 0.0, 0.0);
    for p in points {
        let e = p.us - f.predict(p);
        ss_res += e * e;
        ss_tot += (p.us - mean).powi(2);
        rel += (e / p.us.max(1.0)).powi(2);
    }
    f.r2 = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        1.0
    };
    f.rms_rel_error = (rel / points.len().max(1) as f64).sqrt();
    Ok(f)
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn body(model: &str, prompt: &str, max_tokens: usize) -> bytes::Bytes {
    bytes::Bytes::from(
        serde_json::to_vec(&json!({
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": true,
            "stream_options": {"include_usage": true}, "ignore_eos": true, "temperature": 0
        }))
        .expect("serializable"),
    )
}

/// The engine's KV pool from `vllm:cache_config_info` (num_gpu_blocks, block_size).
async fn kv_pool(target: &Target) -> Option<(usize, usize)> {
    let page = target.get("/metrics").await.ok()?;
    let text = std::str::from_utf8(&page).ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))?;
    let label = |name: &str| -> Option<usize> {
        let at = line.find(&format!("{name}=\""))? + name.len() + 2;
        line[at..].split('"').next()?.parse().ok()
    };
    Some((label("num_gpu_blocks")?, label("block_size")?))
}

/// Run both sweeps against `target`.
pub async fn measure(
    a: &CalibrateArgs,
    target: &Target,
    model: &str,
) -> anyhow::Result<Vec<Point>> {
    let mut rng = Rng::derive(a.seed, 0xCA11);
    let mut points = Vec::new();
    // Warm up (connections, first-request costs).
    let _ = target
        .stream(
            "/v1/completions",
            body(model, &words(&mut rng, 16), 2),
            None,
            false,
        )
        .await;
    for &len in &a.prefill_lengths {
        for _ in 0..a.repeats.max(1) {
            let o = target
                .stream(
                    "/v1/completions",
                    body(model, &words(&mut rng, len), 1),
                    None,
                    false,
                )
                .await;
            if let Some((_, e)) = &o.error {
                anyhow::bail!("prefill of {len} tokens failed: {e}");
            }
            let ttft = o.ttft.context("no token came back")?;
            let p = o.prompt_tokens.unwrap_or(len as u64) as f64;
            points.push(Point {
                prefill_tokens: p,
                seqs: 0.0,
                ctx_tokens: 0.0,
                us: ttft * 1e6,
            });
        }
    }
    let t = a.decode_tokens.max(8);
    for &ctx in &a.decode_contexts {
        for &b in &a.batch_sizes {
            let streams: Vec<_> = (0..b.max(1))
                .map(|_| {
                    let (target, body) = (target.clone(), body(model, &words(&mut rng, ctx), t));
                    tokio::spawn(async move {
                        target.stream("/v1/completions", body, None, false).await
                    })
                })
                .collect();
            let mut gaps = Vec::new();
            let mut prompt = 0.0;
            for s in streams {
                let o = s.await.context("stream task")?;
                if let Some((_, e)) = &o.error {
                    anyhow::bail!("decode at batch {b} failed: {e}");
                }
                prompt += o.prompt_tokens.unwrap_or(ctx as u64) as f64;
                // Gaps after the first few tokens: every stream is decoding by then.
                gaps.extend(o.itl.iter().skip(3).map(|g| g * 1e6));
            }
            let b = b.max(1) as f64;
            let mean_prompt = prompt / b;
            if let Some(us) = median(&mut gaps) {
                points.push(Point {
                    prefill_tokens: 0.0,
                    seqs: b,
                    ctx_tokens: b * (mean_prompt + t as f64 / 2.0),
                    us,
                });
            }
        }
    }
    Ok(points)
}

/// The fit report: each measurement against the model.
pub fn report(points: &[Point], f: &Fit) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "step = {:.0} µs + {:.2} µs/prefill token + {:.1} µs/sequence + {:.4} µs/context token  (HTTP {:.0} µs; R² {:.4}, rms error {:.1}%)",
        f.overhead_us,
        f.prefill_us_per_token,
        f.decode_us_per_seq,
        f.decode_us_per_ctx_token,
        f.http_us,
        f.r2,
        100.0 * f.rms_rel_error
    );
    let _ = writeln!(
        s,
        "{:>9} {:>6} {:>9} {:>11} {:>11} {:>7}",
        "prefill", "seqs", "context", "measured", "model", "error"
    );
    for p in points {
        let m = f.predict(p);
        let _ = writeln!(
            s,
            "{:>9.0} {:>6.0} {:>9.0} {:>9.2}ms {:>9.2}ms {:>6.1}%",
            p.prefill_tokens,
            p.seqs,
            p.ctx_tokens,
            p.us / 1e3,
            m / 1e3,
            100.0 * (m - p.us) / p.us.max(1.0)
        );
    }
    s
}

/// `switchyard plan calibrate`.
pub fn run(a: &CalibrateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.decode_contexts.len() >= 2 && !a.batch_sizes.is_empty() && !a.prefill_lengths.is_empty(),
        "need prefill lengths, batch sizes and at least two decode contexts"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let target = Target::new(&a.base_url, a.api_key.clone(), Duration::from_secs(600));
        let model = match &a.model {
            Some(m) => m.clone(),
            None => target.first_model().await?,
        };
        eprintln!("calibrating {model} at {}", a.base_url);
        let points = measure(a, &target, &model).await?;
        let f = fit(&points)?;
        print!("{}", report(&points, &f));
        let pool = kv_pool(&target).await;
        let profile = SimProfile {
            name: a.name.clone().unwrap_or_else(|| model.clone()),
            source: format!("switchyard plan calibrate --base-url {}", a.base_url),
            overhead_us: f.overhead_us,
            prefill_us_per_token: f.prefill_us_per_token,
            decode_us_per_seq: f.decode_us_per_seq,
            decode_us_per_ctx_token: f.decode_us_per_ctx_token,
            request_overhead_us: f.http_us,
            num_gpu_blocks: pool.map(|p| p.0),
            block_size: pool.map(|p| p.1),
            fit: Some(json!({"fit": f, "points": points})),
        };
        std::fs::write(&a.output, serde_json::to_string_pretty(&profile)? + "\n")
            .with_context(|| format!("writing {}", a.output.display()))?;
        eprintln!("profile written to {}", a.output.display());
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_the_costs_that_made_the_points() {
        let truth = Fit {
            overhead_us: 5000.0,
            prefill_us_per_token: 40.0,
            decode_us_per_seq: 300.0,
            decode_us_per_ctx_token: 0.5,
            http_us: 700.0,
            r2: 1.0,
            rms_rel_error: 0.0,
        };
        let mut points = Vec::new();
        for p in [64.0, 256.0, 1024.0] {
            points.push(Point {
                prefill_tokens: p,
                seqs: 0.0,
                ctx_tokens: 0.0,
                us: 0.0,
            });
        }
        for b in [1.0, 4.0, 16.0] {
            for c in [48.0, 1040.0] {
                points.push(Point {
                    prefill_tokens: 0.0,
                    seqs: b,
                    ctx_tokens: b * c,
                    us: 0.0,
                });
            }
        }
        for p in &mut points {
            p.us = truth.predict(p);
        }
        let f = fit(&points).expect("fit");
        for (got, want) in [
            (f.overhead_us, truth.overhead_us),
            (f.prefill_us_per_token, truth.prefill_us_per_token),
            (f.decode_us_per_seq, truth.decode_us_per_seq),
            (f.decode_us_per_ctx_token, truth.decode_us_per_ctx_token),
            (f.http_us, truth.http_us),
        ] {
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1.0),
                "{got} vs {want}"
            );
        }
        assert!(f.r2 > 0.999999);
        // A cost the data contradicts comes out zero, not negative.
        let flat: Vec<Point> = points
            .iter()
            .map(|p| Point {
                us: 5000.0 + 40.0 * p.prefill_tokens,
                ..*p
            })
            .collect();
        let f = fit(&flat).expect("fit");
        assert!(f.decode_us_per_seq >= 0.0 && f.decode_us_per_ctx_token >= 0.0 && f.http_us >= 0.0);
        assert!((f.overhead_us - 5000.0).abs() < 1.0);
    }
}
