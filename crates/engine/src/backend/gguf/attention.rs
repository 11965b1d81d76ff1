//! Causal attention straight from the paged KV cache: each row (one new token of one
//! sequence) attends to positions `0..=pos` of its own sequence, reading keys and values
//! in place through the sequence's block table (no gather, no padding), with grouped-query
//! heads sharing their KV head. Large batches are split across the current rayon pool by rows;
//! a row's result does not depend on what else is in the batch.

use super::kv_cache::{KvCache, KvLayer};

/// An element type of the KV cache: f32, or f16 (half the memory; widened to f32 as it is
/// read, with F16C on x86-64).
pub trait KvElem: Copy + Send + Sync + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// 8 values at `p`, widened to f32 lanes.
    ///
    /// # Safety
    /// AVX2 and F16C must be present; 8 values must be readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees AVX and 8 readable floats.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvElem for half::f16 {
    #[inline]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    #[inline]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees F16C and 8 readable halves (16 bytes).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

/// One row of the packed batch: its position and its sequence's block table.
#[derive(Debug, Clone, Copy)]
pub struct RowInfo<'a> {
    pub pos: usize,
    pub blocks: &'a [u32],
}

#[inline]
fn dot<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if a.len() == b.len() && a.len().is_multiple_of(16) && super::has_avx2() {
        // SAFETY: AVX2, FMA and F16C are present, and both slices hold `a.len()` values.
        return unsafe { dot_avx2(a, b) };
    }
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y.to_f32();
    }
    s
}

/// Two 8-lane sums, then a shuffle reduction (the scalar loop's sum of 8 lanes is a
/// serial chain that costs more than the products for a 64-wide head).
///
/// # Safety
/// AVX2, FMA and F16C must be present; `a.len() == b.len()`, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    use std::arch::x86_64::*;
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    for i in (0..a.len()).step_by(16) {
        // SAFETY: i + 16 <= len for both slices.
        unsafe {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), T::load8(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), T::load8(pb.add(i + 8)), s1);
        }
    }
    let v = _mm256_add_ps(s0, s1);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

#[inline]
fn axpy<T: KvElem>(out: &mut [f32], w: f32, x: &[T]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v.to_f32();
    }
}

/// The heads of one attention layer: how many query and KV heads of what width, the
/// score scale, and the sliding window (0: none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q · k` (`1/√head_dim` for most models; Gemma's comes from the model).
    pub scale: f32,
    /// A row at position `p` attends to positions `p - window + 1 ..= p` (llama.cpp's
    /// `LLAMA_SWA_TYPE_STANDARD`: a key is masked when `p - key_pos >= window`); 0 attends
    /// to every position `0..=p`.
    pub window: usize,
}

impl Heads {
    /// Causal attention over every position, scaled by `1/√head_dim`.
    pub fn causal(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Heads {
        Heads {
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: 0,
        }
    }

    /// The first position a row at `pos` attends to.
    #[inline]
    pub fn first_key(&self, pos: usize) -> usize {
        if self.window > 0 && pos + 1 > self.window {
            pos + 1 - self.window
        } else {
            0
        }
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
    let heads = Heads::causal(n_heads, n_kv_heads, head_dim);
    paged_attention_with(cache, layer, rows, q, &heads, out)
}

/// `out[r] = softmax(scale · q[r] · Kᵀ) V` per head, over the row's sequence's positions
/// `first_key(pos)..=pos` (all of `0..=pos` without a window).
pub fn paged_attention_with(
    cache: &KvCache,
    layer: usize,
    rows: &[RowInfo<'_>],
    q: &[f32],
    heads: &Heads,
    out: &mut [f32],
) {
    match cache.layer(layer) {
        KvLayer::F32(k, v) => paged::<f32>(cache, k, v, rows, q, heads, out),
        KvLayer::F16(k, v) => paged::<half::f16>(cache, k, v, rows, q, heads, out),
    }
}

/// [`paged_attention_with`] over one layer's keys `kc` and values `vc` of element type `T`.
fn paged<T: KvElem>(
    cache: &KvCache,
    kc: &[T],
    vc: &[T],
    rows: &[RowInfo<'_>],
    q: &[f32],
    heads: &Heads,
    out: &mut [f32],
) {
    let w = heads.n_heads * heads.head_dim;
    let attended = |r: &RowInfo<'_>| r.pos + 1 - heads.first_key(r.pos);
    // Work ~ Σ positions attended, times the heads (each ~2·head_dim multiply-adds): below
    // 4,096 (about half a million multiply-adds, ~0.1 ms) a thread costs more than it
    // saves. (It was 65,536: 16 decoding SmolLM2 sequences of 200 tokens each attended
    // on one core while the other waited.)
    let work: usize = rows.iter().map(attended).sum();
    let parts = if work * heads.n_heads < 1 << 12 {
        1
    } else {
        (2 * rayon::current_num_threads()).min(rows.len())
    };
    let run = |rows: &[RowInfo<'_>], q: &[f32], out: &mut [f32]| {
        let mut scratch = Scratch::default();
        for ((o, qr), row) in out.chunks_mut(w).zip(q.chunks(w)).zip(rows) {
            attend_row(cache, kc, vc, row, qr, heads, o, &mut scratch);
        }
    };
    if parts <= 1 {
        run(rows, q, out);
        return;
    }
    // Split rows into `parts` of about equal work, run on the pool.
    let per = work.div_ceil(parts);
    rayon::scope(|sc| {
        let (mut rows, mut q, mut out) = (rows, q, out);
        while !rows.is_empty() {
            let mut acc = 0;
            let mut n = 0;
            while n < rows.len() && acc < per {
                acc += attended(&rows[n]);
                n += 1;
            }
            let (r0, r1) = rows.split_at(n);
            let (q0, q1) = q.split_at(n * w);
            let (o0, o1) = std::mem::take(&mut out).split_at_mut(n * w);
            if r1.is_empty() {
                run(r0, q0, o0);
            } else {
                sc.spawn(move |_| run(r0, q0, o0));
            }
            (rows, q, out) = (r1, q1, o1);
        }
    });
}

/// Offsets (in floats, within a layer) of positions `0..n` of a sequence, block by block;
/// `NONE` past its block table.
fn positions(cache: &KvCache, blocks: &[u32], n: usize, out: &mut Vec<usize>) {
    let (bs, kvw) = (cache.block_size, cache.n_kv_heads * cache.head_dim);
    out.clear();
    for &b in blocks {
        let take = (n - out.len()).min(bs);
        if take == 0 {
            break;
        }
        if (b as usize) < cache.num_blocks {
            let base = b as usize * bs * kvw;
            out.extend((0..take).map(|j| base + j * kvw));
        } else {
            out.extend(std::iter::repeat_n(NONE, take));
        }
    }
    out.resize(n, NONE);
}

const NONE: usize = usize::MAX;

/// Per-row scratch space, reused across rows.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    offs: Vec<usize>,
    /// Per head: the running maximum score and sum of exponentials.
    max: Vec<f32>,
    sum: Vec<f32>,
    /// Per head: whether the chunk has a position the table reaches.
    live: Vec<bool>,
}

#[allow(clippy::too_many_arguments)]
fn attend_row<T: KvElem>(
    cache: &KvCache,
    kc: &[T],
    vc: &[T],
    row: &RowInfo<'_>,
    qr: &[f32],
    heads: &Heads,
    o: &mut [f32],
    scratch: &mut Scratch,
) {
    let (n_heads, head_dim, scale) = (heads.n_heads, heads.head_dim, heads.scale);
    let group = n_heads / heads.n_kv_heads;
    let n = row.pos + 1;
    let first = heads.first_key(row.pos);
    positions(cache, row.blocks, n, &mut scratch.offs);
    let Scratch {
        scores,
        offs,
        max,
        sum,
        live,
    } = scratch;
    // Keys before the window are never read (their blocks may even be reused).
    let offs = &offs[first..];
    let len = CHUNK.min(offs.len());
    scores.resize(n_heads * len, 0.0);
    max.clear();
    max.resize(n_heads, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(n_heads, 0.0);
    live.clear();
    live.resize(n_heads, false);
    o.fill(0.0);
    // Positions in chunks (fixed by the row's position, so its result never depends on its
    // batch) whose scores fit in L1 and L2; the softmax is the online one: a chunk with a
    // higher maximum rescales what came before. Keys and values are read position by
    // position, every KV head of a slice of `SLICE` positions before the next slice, so
    // the cache walks memory in order (a KV head at a time strided over the whole chunk,
    // reading a third of each line pair's neighbourhood per pass, stalled on memory). A
    // head's scores and its sum over values come out the same bits in either order: each
    // is its own sequence of operations.
    for offs in offs.chunks(CHUNK) {
        let len = offs.len();
        let sc = &mut scores[..n_heads * len];
        // The 4-position kernel runs until a group meets a position past the table, and
        // stays off for the rest of the chunk (as if it had walked the chunk at once).
        let mut simd = true;
        let kvw = heads.n_kv_heads * head_dim;
        for p0 in (0..len).step_by(SLICE) {
            let part = &offs[p0..(p0 + SLICE).min(len)];
            prefetch_next(kc, offs, p0 + SLICE, kvw);
            for kvh in 0..heads.n_kv_heads {
                let h0 = kvh * group;
                group_scores(
                    &qr[h0 * head_dim..(h0 + group) * head_dim],
                    kc,
                    part,
                    kvh * head_dim,
                    scale,
                    &mut sc[h0 * len..(h0 + group) * len],
                    len,
                    p0,
                    &mut simd,
                );
            }
        }
        for (h, sc) in sc.chunks_exact_mut(len).enumerate() {
            let oh = &mut o[h * head_dim..(h + 1) * head_dim];
            let cmax = sc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            live[h] = cmax != f32::NEG_INFINITY;
            if !live[h] {
                continue;
            }
            if cmax > max[h] {
                if max[h] != f32::NEG_INFINITY {
                    let f = (max[h] - cmax).exp();
                    sum[h] *= f;
                    oh.iter_mut().for_each(|v| *v *= f);
                }
                max[h] = cmax;
            }
            sum[h] += exp_sub_sum(sc, max[h]);
        }
        for p0 in (0..len).step_by(SLICE) {
            let p1 = (p0 + SLICE).min(len);
            prefetch_next(vc, offs, p1, kvw);
            for (h, oh) in o.chunks_exact_mut(head_dim).enumerate() {
                if live[h] {
                    let g = h / group * head_dim;
                    head_values(&sc[h * len + p0..h * len + p1], vc, &offs[p0..p1], g, oh);
                }
            }
        }
    }
    for (oh, &s) in o.chunks_exact_mut(head_dim).zip(sum.iter()) {
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        oh.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Positions per chunk of [`attend_row`]: their scores (`n_heads·CHUNK` floats) stay in
/// L1 or L2 between the softmax and the values.
const CHUNK: usize = 256;

/// Positions whose keys (or values), every KV head of them, are read before the next
/// ones: one 16-token block, 6 KB of f16 keys for SmolLM2, stays in L1 while each KV
/// head's query heads read it. A multiple of 4 (the score kernel's group).
const SLICE: usize = 16;

/// For each head `h` of `q` (heads sharing one KV head, `head_dim` apart, `sc.len() /
/// stride` of them): `sc[h·stride + p0 + p] = q_h · K[p] · scale` (`-inf` where the table
/// does not reach `p`) for the positions `p` of `offs`; `K[p]` is the KV head's key at
/// offset `offs[p] + g`. The 4-position kernel runs while `simd` holds, and clears it at
/// the first group it cannot take; the rest go through [`dot`]. A head's scores are the
/// same bits whichever heads it is scored with.
#[allow(clippy::too_many_arguments)]
fn group_scores<T: KvElem>(
    q: &[f32],
    kc: &[T],
    offs: &[usize],
    g: usize,
    scale: f32,
    sc: &mut [f32],
    stride: usize,
    p0: usize,
    simd: &mut bool,
) {
    let len = offs.len();
    let heads = sc.len() / stride.max(1);
    if heads == 0 || len == 0 {
        return;
    }
    let hd = q.len() / heads;
    let mut done = 0;
    let mut h = 0;
    let was = *simd;
    while h < heads {
        let n = if heads - h >= 2 { 2 } else { 1 };
        let qh = &q[h * hd..(h + n) * hd];
        #[cfg(target_arch = "x86_64")]
        if was && hd.is_multiple_of(8) && super::has_avx2() {
            let s = &mut sc[h * stride..];
            // SAFETY: AVX2 and FMA are present; offsets other than NONE are inside `kc`;
            // `qh` holds `n` heads of `hd` and `s` their `n` rows of `stride` scores, this
            // slice's at `p0 .. p0 + len <= stride`.
            done = unsafe {
                if n == 2 {
                    head_scores_avx2::<T, 2>(qh, kc, offs, g, scale, s, stride, p0)
                } else {
                    head_scores_avx2::<T, 1>(qh, kc, offs, g, scale, s, stride, p0)
                }
            };
            if done < len / 4 * 4 {
                *simd = false;
            }
        }
        for i in 0..n {
            let qi = &qh[i * hd..(i + 1) * hd];
            let row = &mut sc[(h + i) * stride + p0..(h + i) * stride + p0 + len];
            for (s, &off) in row.iter_mut().zip(offs).skip(done) {
                *s = if off == NONE {
                    f32::NEG_INFINITY
                } else {
                    dot(qi, &kc[off + g..off + g + hd]) * scale
                };
            }
        }
        h += n;
    }
}

/// Scores of positions in groups of 4 (all present), for `H` heads at once (`q` holds
/// them one after the other, `sc` their rows of `stride` scores, these at `p0..`), each head's four
/// sums reduced together; returns how many leading positions it scored (the rest go
/// through [`dot`]). Which path a position takes depends only on its index, so a row's
/// scores never depend on its batch; a head's sums are the same bits for `H` = 1 or 2.
///
/// # Safety
/// AVX2, FMA and F16C must be present; `q.len()` a multiple of `8·H`; `sc.len() >=
/// (H - 1) · stride + p0 + offs.len()`; `off + g + q.len() / H <= kc.len()` for every
/// offset but `NONE`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_scores_avx2<T: KvElem, const H: usize>(
    q: &[f32],
    kc: &[T],
    offs: &[usize],
    g: usize,
    scale: f32,
    sc: &mut [f32],
    stride: usize,
    p0: usize,
) -> usize {
    use std::arch::x86_64::*;
    assert!(sc.len() >= (H - 1) * stride + p0 + offs.len());
    let hd = q.len() / H;
    let len = offs.len();
    let mut p = 0;
    while p + 4 <= len && offs[p..p + 4].iter().all(|&o| o != NONE) {
        let k: [&[T]; 4] = std::array::from_fn(|i| &kc[offs[p + i] + g..offs[p + i] + g + hd]);
        let mut a = [[_mm256_setzero_ps(); 4]; H];
        for c in (0..hd).step_by(8) {
            // SAFETY: every key slice holds `hd` values and each head of `q` `hd` floats;
            // c + 8 <= hd.
            unsafe {
                let kv: [__m256; 4] = std::array::from_fn(|i| T::load8(k[i].as_ptr().add(c)));
                for (h, a) in a.iter_mut().enumerate() {
                    let qv = _mm256_loadu_ps(q.as_ptr().add(h * hd + c));
                    for i in 0..4 {
                        a[i] = _mm256_fmadd_ps(qv, kv[i], a[i]);
                    }
                }
            }
        }
        for (h, a) in a.iter().enumerate() {
            let s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            let s4 = _mm_mul_ps(
                _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)),
                _mm_set1_ps(scale),
            );
            // SAFETY: p + 4 <= len, head h's row is `sc[h·stride..]` and this slice's
            // scores are at `p0..p0 + len` in it (asserted above).
            unsafe { _mm_storeu_ps(sc.as_mut_ptr().add(h * stride + p0 + p), s4) };
        }
        p += 4;
    }
    p
}

/// `o += Σ_p w[p] · V[p]` over the positions the table reaches.
fn head_values<T: KvElem>(w: &[f32], vc: &[T], offs: &[usize], g: usize, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: AVX2, FMA and F16C are present; every offset is inside `vc` (blocks
        // below `num_blocks`).
        match o.len() {
            64 => return unsafe { head_values_avx2::<T, 8>(w, vc, offs, g, o) },
            128 => return unsafe { head_values_avx2::<T, 16>(w, vc, offs, g, o) },
            // Wider heads (Gemma's 256) in slices of 128, 16 accumulators each.
            n if n.is_multiple_of(128) => {
                for (i, oc) in o.chunks_exact_mut(128).enumerate() {
                    // SAFETY: as above; slice `i` reads values `g + 128·i ..` of a head
                    // that holds `o.len()` of them.
                    unsafe { head_values_avx2::<T, 16>(w, vc, offs, g + 128 * i, oc) };
                }
                return;
            }
            _ => {}
        }
    }
    for (&wp, &off) in w.iter().zip(offs) {
        if off != NONE {
            axpy(o, wp, &vc[off + g..off + g + o.len()]);
        }
    }
}

/// # Safety
/// AVX2, FMA and F16C must be present; `o.len() == 8 * CH`; `off + g + o.len() <=
/// vc.len()` for every offset but `NONE`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn head_values_avx2<T: KvElem, const CH: usize>(
    w: &[f32],
    vc: &[T],
    offs: &[usize],
    g: usize,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    // SAFETY: `o` holds 8 * CH floats.
    let mut acc: [__m256; CH] =
        std::array::from_fn(|c| unsafe { _mm256_loadu_ps(o.as_ptr().add(8 * c)) });
    for (&wp, &off) in w.iter().zip(offs) {
        if off == NONE {
            continue;
        }
        let v = vc[off + g..off + g + 8 * CH].as_ptr();
        let wv = _mm256_set1_ps(wp);
        for (c, a) in acc.iter_mut().enumerate() {
            // SAFETY: the slice above holds 8 * CH values.
            *a = _mm256_fmadd_ps(wv, unsafe { T::load8(v.add(8 * c)) }, *a);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        // SAFETY: `o` holds 8 * CH floats.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * c), *a) };
    }
}

/// Ask for every KV head of the `SLICE` positions from `from` (`kvw` elements each): the
/// next slice's keys or values are in flight while this one's are used. (A slice's
/// block is somewhere else in memory than the last one's, where the hardware prefetcher
/// does not look; 1.15x to 1.25x on `examples/attention_bench.rs`.)
#[inline]
fn prefetch_next<T>(c: &[T], offs: &[usize], from: usize, kvw: usize) {
    #[cfg(target_arch = "x86_64")]
    if PREFETCH.load(std::sync::atomic::Ordering::Relaxed) {
        for &o in offs.iter().skip(from).take(SLICE) {
            if o != NONE {
                prefetch_span(c.as_ptr().wrapping_add(o), kvw);
            }
        }
    }
}

/// Whether [`prefetch_next`] asks (on unless a benchmark turns it off to compare;
/// results never depend on it).
pub static PREFETCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Ask for the cache lines of `n` elements at `p` (a hint: never read, never faults).
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_span<T>(p: *const T, n: usize) {
    use std::arch::x86_64::*;
    let (p, bytes) = (p as *const i8, n * std::mem::size_of::<T>());
    for b in (0..bytes).step_by(64) {
        // SAFETY: prefetching is a hint that never faults.
        unsafe { _mm_prefetch(p.wrapping_add(b), _MM_HINT_T0) };
    }
}

/// `x[i] = exp(x[i] - max)` for every element; returns their sum. A position masked with
/// `-inf` gets 0.
fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
    if max == f32::NEG_INFINITY {
        x.fill(0.0);
        return 0.0;
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: AVX2 and FMA are present.
        return unsafe { exp_sub_sum_avx2(x, max) };
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

/// 8 lanes at a time with a polynomial `exp` (relative error about 2e-7, the same on
/// every call for the same input), the tail with `expf`.
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(x: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` holds 8 floats.
        unsafe {
            let v = exp256(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            _mm256_storeu_ps(c.as_mut_ptr(), v);
            acc = _mm256_add_ps(acc, v);
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let mut sum: f32 = lanes.iter().sum();
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

/// `exp(x)` for `x <= 0` (inputs below -87 and `-inf` give 0): `2^n · p(r)` with
/// `x = n·ln2 + r`, `|r| <= ln2/2`, and a degree-6 polynomial for `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp256(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let lo = _mm256_set1_ps(-87.0);
    let under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    let x = _mm256_max_ps(x, lo);
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    // r = x - n·ln2, with ln2 split in two for precision.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_andnot_ps(under, _mm256_mul_ps(p, pow2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_and_masks_to_zero() {
        let mut x: Vec<f32> = (0..2000).map(|i| -(i as f32) * 0.05).collect();
        x.push(f32::NEG_INFINITY);
        x.push(-1e30);
        let want: Vec<f32> = x.iter().map(|v| v.exp()).collect();
        let sum = exp_sub_sum(&mut x, 0.0);
        for (i, (g, w)) in x.iter().zip(&want).enumerate() {
            let tol = 1e-6 * w + 1e-37;
            assert!((g - w).abs() <= tol, "exp at {i}: {g} vs {w}");
        }
        assert_eq!(x[2000], 0.0);
        let total: f32 = want.iter().sum();
        assert!((sum - total).abs() < 1e-4 * total, "{sum} vs {total}");
    }

    fn data(len: usize, seed: u64) -> Vec<f32> {
        super::super::test_data(len, seed, 2.0)
    }

    /// A sliding window (Gemma's local layers) attends exactly to the last `window`
    /// positions (`p - window < key <= p`, llama.cpp's standard SWA mask), with the model's
    /// own scale and 256-wide heads; rows inside the window see everything, as without one.
    #[test]
    fn sliding_window_masks_keys_older_than_the_window() {
        use super::super::kv_cache::KvDtype;
        let (bs, nb, nkv, hd, nh) = (16, 64, 1, 256, 4);
        let mut cache = KvCache::with_dtype(1, nb, bs, nkv, hd, KvDtype::F32);
        let table: Vec<u32> = (0..nb as u32).map(|i| (i * 37) % nb as u32).collect();
        let window = 40;
        let n = CHUNK + 3 * window;
        let kvw = nkv * hd;
        let (ks, vs) = (data(n * kvw, 17), data(n * kvw, 18));
        let rows: Vec<RowInfo<'_>> = (0..n)
            .map(|pos| RowInfo {
                pos,
                blocks: &table,
            })
            .collect();
        cache.write(0, &rows, &ks, &vs);
        let heads = Heads {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            scale: 0.0625,
            window,
        };
        let picks = [
            0,
            window - 2,
            window - 1,
            window,
            window + 1,
            CHUNK + 7,
            n - 1,
        ];
        let q = data(picks.len() * nh * hd, 19);
        let sel: Vec<RowInfo<'_>> = picks.iter().map(|&p| rows[p]).collect();
        let mut out = vec![0f32; picks.len() * nh * hd];
        paged_attention_with(&cache, 0, &sel, &q, &heads, &mut out);
        let mut unwindowed = vec![0f32; out.len()];
        let all = Heads { window: 0, ..heads };
        paged_attention_with(&cache, 0, &sel, &q, &all, &mut unwindowed);
        for (i, &pos) in picks.iter().enumerate() {
            let first = (pos + 1).saturating_sub(window);
            assert_eq!(heads.first_key(pos), first);
            for h in 0..nh {
                let qh = &q[(i * nh + h) * hd..(i * nh + h + 1) * hd];
                let s: Vec<f64> = (first..=pos)
                    .map(|p| {
                        let k = &ks[p * kvw..p * kvw + hd];
                        qh.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * 0.0625
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = (first..=pos)
                        .map(|p| e[p - first] / z * vs[p * kvw + d] as f64)
                        .sum();
                    let at = (i * nh + h) * hd + d;
                    let got = out[at] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "pos {pos} head {h} dim {d}: {got} vs {want}"
                    );
                    if pos < window {
                        assert_eq!(out[at], unwindowed[at], "inside the window");
                    }
                }
            }
        }
    }

    /// Chunked online softmax over paged blocks equals a plain softmax over the gathered
    /// keys and values (as stored: f32, or rounded to f16), for rows shorter and longer
    /// than a chunk, with GQA.
    #[test]
    fn paged_chunked_attention_equals_the_plain_formula() {
        use super::super::kv_cache::KvDtype;
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let (bs, nb, nkv, hd, nh) = (16, 64, 2, 64, 6);
            let mut cache = KvCache::with_dtype(1, nb, bs, nkv, hd, dtype);
            // Blocks out of order, as the block manager hands them out.
            let table: Vec<u32> = (0..nb as u32).map(|i| (i * 37) % nb as u32).collect();
            let n = 3 * CHUNK / 2 + 5;
            let kvw = nkv * hd;
            let (ks, vs) = (data(n * kvw, 7), data(n * kvw, 8));
            let rows: Vec<RowInfo<'_>> = (0..n)
                .map(|pos| RowInfo {
                    pos,
                    blocks: &table,
                })
                .collect();
            cache.write(0, &rows, &ks, &vs);
            let stored = |x: f32| match dtype {
                KvDtype::F32 => x as f64,
                KvDtype::F16 => half::f16::from_f32(x).to_f32() as f64,
            };
            let picks = [0, 3, CHUNK - 1, CHUNK, n - 1];
            let q = data(picks.len() * nh * hd, 9);
            let sel: Vec<RowInfo<'_>> = picks.iter().map(|&p| rows[p]).collect();
            let mut out = vec![0f32; picks.len() * nh * hd];
            paged_attention(&cache, 0, &sel, &q, nh, nkv, hd, &mut out);
            for (i, &pos) in picks.iter().enumerate() {
                for h in 0..nh {
                    let g = h / (nh / nkv);
                    let qh = &q[(i * nh + h) * hd..(i * nh + h + 1) * hd];
                    let s: Vec<f64> = (0..=pos)
                        .map(|p| {
                            let k = &ks[p * kvw + g * hd..p * kvw + (g + 1) * hd];
                            qh.iter()
                                .zip(k)
                                .map(|(a, b)| *a as f64 * stored(*b))
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..=pos)
                            .map(|p| e[p] / z * stored(vs[p * kvw + g * hd + d]))
                            .sum();
                        let got = out[(i * nh + h) * hd + d] as f64;
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{dtype:?} pos {pos} head {h} dim {d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Positions whose block the table does not reach (an id past the cache) are masked,
    /// mid-chunk and in later slices too (where the 4-position kernel has stopped), and the
    /// row attends to the rest exactly as the plain formula says; a row is the same bits
    /// alone or in a batch.
    #[test]
    fn positions_past_the_table_are_masked_in_every_slice() {
        let (bs, nb, nkv, hd, nh) = (16, 32, 3, 64, 9);
        let mut cache = KvCache::new(1, nb, bs, nkv, hd);
        let n = CHUNK + 40;
        let kvw = nkv * hd;
        let full: Vec<u32> = (0..nb as u32).rev().collect();
        let (ks, vs) = (data(n * kvw, 27), data(n * kvw, 28));
        let all: Vec<RowInfo<'_>> = (0..n).map(|pos| RowInfo { pos, blocks: &full }).collect();
        cache.write(0, &all, &ks, &vs);
        let stored = |x: f32| half::f16::from_f32(x).to_f32() as f64;
        // Block 2 (positions 32..48) is out of the cache's range.
        let mut holed = full.clone();
        holed[2] = nb as u32 + 5;
        let rows = [
            RowInfo {
                pos: n - 1,
                blocks: &holed,
            },
            RowInfo {
                pos: 100,
                blocks: &holed,
            },
        ];
        let q = data(2 * nh * hd, 29);
        let mut out = vec![0f32; 2 * nh * hd];
        paged_attention(&cache, 0, &rows, &q, nh, nkv, hd, &mut out);
        for (i, row) in rows.iter().enumerate() {
            let mut alone = vec![0f32; nh * hd];
            let qi = &q[i * nh * hd..(i + 1) * nh * hd];
            paged_attention(&cache, 0, &rows[i..=i], qi, nh, nkv, hd, &mut alone);
            assert_eq!(
                alone[..],
                out[i * nh * hd..(i + 1) * nh * hd],
                "row {i} alone"
            );
            let seen: Vec<usize> = (0..=row.pos).filter(|p| !(32..48).contains(p)).collect();
            for h in 0..nh {
                let g = h / (nh / nkv);
                let qh = &qi[h * hd..(h + 1) * hd];
                let s: Vec<f64> = seen
                    .iter()
                    .map(|&p| {
                        let k = &ks[p * kvw + g * hd..p * kvw + (g + 1) * hd];
                        let d: f64 = qh.iter().zip(k).map(|(a, b)| *a as f64 * stored(*b)).sum();
                        d / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = seen
                        .iter()
                        .zip(&e)
                        .map(|(&p, e)| e / z * stored(vs[p * kvw + g * hd + d]))
                        .sum();
                    let got = out[(i * nh + h) * hd + d] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "row {i} head {h} dim {d}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
