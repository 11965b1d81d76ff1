//! Causal attention straight from the paged KV cache: each row (one new token of one
//! sequence) attends to positions `0..=pos` of its own sequence, reading keys and values
//! in place through the sequence's block table (no gather, no padding), with grouped-query
//! heads sharing their KV head. Large batches are split across scoped threads by rows;
//! a row's result does not depend on what else is in the batch.

use super::kv_cache::KvCache;

/// One row of the packed batch: its position and its sequence's block table.
#[derive(Debug, Clone, Copy)]
pub struct RowInfo<'a> {
    pub pos: usize,
    pub blocks: &'a [u32],
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}

/// `out[r] = softmax(q[r] · Kᵀ / √d) V` per head, over the row's sequence's positions
/// `0..=pos`. `q` and `out` are `[rows, n_heads·head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    cache: &KvCache,
    layer: usize,
    rows: &[RowInfo<'_>],
    q: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    let w = n_heads * head_dim;
    // Work ~ Σ positions attended; below this a thread costs more than it saves.
    let work: usize = rows.iter().map(|r| r.pos + 1).sum();
    let threads = if work * n_heads < 1 << 16 {
        1
    } else {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(rows.len())
    };
    let run = |rows: &[RowInfo<'_>], q: &[f32], out: &mut [f32]| {
        let mut scores = Vec::new();
        for ((o, qr), row) in out.chunks_mut(w).zip(q.chunks(w)).zip(rows) {
            attend_row(
                cache,
                layer,
                row,
                qr,
                n_heads,
                n_kv_heads,
                head_dim,
                o,
                &mut scores,
            );
        }
    };
    if threads <= 1 {
        run(rows, q, out);
        return;
    }
    // Split rows into `threads` parts of about equal work.
    let per = work.div_ceil(threads);
    std::thread::scope(|sc| {
        let (mut rows, mut q, mut out) = (rows, q, out);
        for _ in 0..threads - 1 {
            let mut acc = 0;
            let mut n = 0;
            while n < rows.len() && acc < per {
                acc += rows[n].pos + 1;
                n += 1;
            }
            let (r0, r1) = rows.split_at(n);
            let (q0, q1) = q.split_at(n * w);
            let (o0, o1) = std::mem::take(&mut out).split_at_mut(n * w);
            sc.spawn(move || run(r0, q0, o0));
            (rows, q, out) = (r1, q1, o1);
        }
        run(rows, q, out);
    });
}

#[allow(clippy::too_many_arguments)]
fn attend_row(
    cache: &KvCache,
    layer: usize,
    row: &RowInfo<'_>,
    qr: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    o: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let (kc, vc) = cache.layer(layer);
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    o.fill(0.0);
    let n = row.pos + 1;
    scores.clear();
    scores.resize(n * n_heads, 0.0);
    for p in 0..n {
        let Some(off) = cache.slot(row.blocks, p) else {
            scores[p * n_heads..(p + 1) * n_heads].fill(f32::NEG_INFINITY);
            continue;
        };
        for h in 0..n_heads {
            let g = h / group;
            let k = &kc[off + g * head_dim..off + (g + 1) * head_dim];
            scores[p * n_heads + h] = dot(&qr[h * head_dim..(h + 1) * head_dim], k) * scale;
        }
    }
    for h in 0..n_heads {
        let mut max = f32::NEG_INFINITY;
        for p in 0..n {
            max = max.max(scores[p * n_heads + h]);
        }
        let mut sum = 0.0;
        for p in 0..n {
            let e = (scores[p * n_heads + h] - max).exp();
            scores[p * n_heads + h] = e;
            sum += e;
        }
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for p in 0..n {
            scores[p * n_heads + h] *= inv;
        }
    }
    for p in 0..n {
        let Some(off) = cache.slot(row.blocks, p) else {
            continue;
        };
        for h in 0..n_heads {
            let g = h / group;
            let v = &vc[off + g * head_dim..off + (g + 1) * head_dim];
            axpy(
                &mut o[h * head_dim..(h + 1) * head_dim],
                scores[p * n_heads + h],
                v,
            );
        }
    }
}
