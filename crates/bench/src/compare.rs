//! `switchyard bench compare`: ratios between runs and a hand-written SVG chart.

use std::fmt::Write;
use std::path::PathBuf;

use crate::report::Report;

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// JSON reports written by `--output`; the first is the baseline.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// Write an SVG chart of TTFT and throughput per run here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

pub fn run(a: &CompareArgs) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for p in &a.reports {
        let text = std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
        let r: Report = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a bench report: {e}", p.display()))?;
        runs.push(r);
    }
    print!("{}", table(&runs));
    if let Some(path) = &a.chart {
        std::fs::write(path, chart(&runs))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

/// One row per run, with ratios of TTFT p50, ITL p50 and output tokens/s to the first.
pub fn table(runs: &[Report]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<32} {:>8} {:>10} {:>9} {:>9} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8}",
        "run",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "E2E p50",
        "errors",
        "TTFT×",
        "ITL×",
        "tok/s×"
    );
    let Some(base) = runs.first() else { return s };
    for r in runs {
        let _ = writeln!(
            s,
            "{:<32} {:>8.2} {:>10.1} {:>9.2} {:>9.2} {:>8.2} {:>8.1} {:>7} {:>8} {:>8} {:>8}",
            crate::client::clip(&r.label, 32),
            r.throughput.requests_per_s,
            r.throughput.output_tokens_per_s,
            r.ttft_ms.p50,
            r.ttft_ms.p99,
            r.itl_ms.p50,
            r.e2e_ms.p50,
            r.requests.failed,
            ratio(r.ttft_ms.p50, base.ttft_ms.p50),
            ratio(r.itl_ms.p50, base.itl_ms.p50),
            ratio(
                r.throughput.output_tokens_per_s,
                base.throughput.output_tokens_per_s
            ),
        );
    }
    let _ = writeln!(s, "(latencies in ms; × = this run / the first)");
    s
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round axis maximum ≥ `v` and its tick step (1, 2 or 5 × 10^k, 4-5 ticks).
pub fn nice_axis(v: f64) -> (f64, f64) {
    if v <= 0.0 || !v.is_finite() {
        return (1.0, 0.25);
    }
    let raw = v / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((v / step).ceil() * step, step)
}

pub fn fmt_tick(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .into()
    }
}

struct Panel<'a> {
    title: &'a str,
    /// Bar height and an optional upper marker (p99) per run.
    values: Vec<(f64, Option<f64>)>,
    color: &'a str,
}

/// Two bar panels side by side: TTFT (p50 bar, p99 marker) and output tokens/s.
pub fn chart(runs: &[Report]) -> String {
    let n = runs.len().max(1);
    let pw = (80 + 70 * n).max(360) as f64; // panel width
    let (ph, top, bottom, left) = (300.0, 40.0, 150.0, 60.0);
    let w = 2.0 * pw + 40.0;
    let h = top + ph + bottom;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let panels = [
        Panel {
            title: "TTFT (ms): bar p50, tick p99",
            values: runs
                .iter()
                .map(|r| (r.ttft_ms.p50, Some(r.ttft_ms.p99)))
                .collect(),
            color: "#4c78a8",
        },
        Panel {
            title: "Output tokens/s",
            values: runs
                .iter()
                .map(|r| (r.throughput.output_tokens_per_s, None))
                .collect(),
            color: "#f58518",
        },
    ];
    for (pi, p) in panels.iter().enumerate() {
        let x0 = 20.0 + pi as f64 * (pw + 20.0) + left;
        let inner = pw - left - 10.0;
        let vmax = p
            .values
            .iter()
            .map(|(v, m)| v.max(m.unwrap_or(0.0)))
            .fold(0.0, f64::max);
        let (amax, step) = nice_axis(vmax);
        let y = |v: f64| top + ph - ph * (v / amax).clamp(0.0, 1.0);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-weight="bold">{}</text>"#,
            x0 + inner / 2.0,
            top - 15.0,
            esc(p.title)
        );
        let mut t = 0.0;
        while t <= amax + step * 1e-9 {
            let yy = y(t);
            let _ = writeln!(
                s,
                "<line x1=\"{x0}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                x0 + inner,
                x0 - 6.0,
                yy + 4.0,
                fmt_tick(t)
            );
            t += step;
        }
        let slot = inner / n as f64;
        let bw = (slot * 0.6).min(60.0);
        for (i, (v, marker)) in p.values.iter().enumerate() {
            let cx = x0 + slot * (i as f64 + 0.5);
            let yv = y(*v);
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{yv:.1}" width="{bw:.1}" height="{:.1}" fill="{}"><title>{}: {v:.2}</title></rect>"#,
                cx - bw / 2.0,
                top + ph - yv,
                p.color,
                esc(&runs[i].label)
            );
            let _ = writeln!(
                s,
                r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                yv - 4.0,
                fmt_tick((v * 100.0).round() / 100.0)
            );
            if let Some(m) = marker {
                let ym = y(*m);
                let _ = writeln!(
                    s,
                    "<line x1=\"{:.1}\" y1=\"{ym:.1}\" x2=\"{:.1}\" y2=\"{ym:.1}\" stroke=\"#222\" stroke-width=\"2\"/>\
                     <line x1=\"{cx:.1}\" y1=\"{yv:.1}\" x2=\"{cx:.1}\" y2=\"{ym:.1}\" stroke=\"#222\"/>",
                    cx - bw / 4.0,
                    cx + bw / 4.0
                );
            }
            let _ = writeln!(
                s,
                r#"<text transform="translate({cx:.1},{:.1}) rotate(-35)" text-anchor="end">{}</text>"#,
                top + ph + 14.0,
                esc(&crate::client::clip(&runs[i].label, 40))
            );
        }
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>",
            top + ph,
            x0 + inner,
            top + ph
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_is_round() {
        assert_eq!(nice_axis(37.0), (40.0, 10.0));
        assert_eq!(nice_axis(0.9), (1.0, 0.5));
        assert_eq!(nice_axis(1234.0), (1500.0, 500.0));
    }

    #[test]
    fn chart_and_table_name_every_run() {
        let mut a = Report {
            label: "a <1>".into(),
            ..Default::default()
        };
        a.ttft_ms.p50 = 10.0;
        a.ttft_ms.p99 = 20.0;
        a.throughput.output_tokens_per_s = 100.0;
        let mut b = a.clone();
        b.label = "b".into();
        b.ttft_ms.p50 = 5.0;
        b.throughput.output_tokens_per_s = 300.0;
        let svg = chart(&[a.clone(), b.clone()]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;1&gt;") && svg.contains(">b<"));
        let t = table(&[a, b]);
        assert!(t.contains("0.50x") && t.contains("3.00x"), "{t}");
    }
}
