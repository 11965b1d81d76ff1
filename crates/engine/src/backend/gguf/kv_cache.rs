//! The model's KV cache, paged as the block manager pages it: block `b` holds positions
//! `[i·B, (i+1)·B)` of every sequence whose block table has `b` at index `i`, so a
//! prefix-cache hit in the block manager is KV the model really does not recompute.
//!
//! Layout per layer: `[num_blocks][block_size][n_kv_heads][head_dim]`, keys and values
//! apart, in f16 (the default, as llama.cpp and vLLM keep KV in the model's 16-bit type:
//! twice the tokens per byte of f32) or f32 (`--kv-cache-dtype float32`).

use half::f16;

use super::attention::{KvElem, RowInfo};

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F16,
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

enum Store {
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    F16 { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
}

/// One layer's keys and values.
pub enum KvLayer<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [f16], &'a [f16]),
}

pub struct KvCache {
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub num_blocks: usize,
    store: Store,
}

impl KvCache {
    /// An f16 cache.
    pub fn new(
        n_layers: usize,
        num_blocks: usize,
        block_size: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> KvCache {
        Self::with_dtype(
            n_layers,
            num_blocks,
            block_size,
            n_kv_heads,
            head_dim,
            KvDtype::F16,
        )
    }

    pub fn with_dtype(
        n_layers: usize,
        num_blocks: usize,
        block_size: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> KvCache {
        let per_layer = num_blocks * block_size * n_kv_heads * head_dim;
        fn layers<T: Clone>(n: usize, per_layer: usize, zero: T) -> Vec<Vec<T>> {
            (0..n).map(|_| vec![zero.clone(); per_layer]).collect()
        }
        let store = match dtype {
            KvDtype::F32 => Store::F32 {
                k: layers(n_layers, per_layer, 0.0),
                v: layers(n_layers, per_layer, 0.0),
            },
            KvDtype::F16 => Store::F16 {
                k: layers(n_layers, per_layer, f16::ZERO),
                v: layers(n_layers, per_layer, f16::ZERO),
            },
        };
        KvCache {
            block_size,
            n_kv_heads,
            head_dim,
            num_blocks,
            store,
        }
    }

    /// Bytes one block takes over all layers (keys and values).
    pub fn bytes_per_block(
        n_layers: usize,
        block_size: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> usize {
        2 * n_layers * block_size * n_kv_heads * head_dim * dtype.bytes()
    }

    /// Offset of position `pos` of a sequence with block table `blocks`, or `None` when
    /// the table does not reach it.
    #[inline]
    pub fn slot(&self, blocks: &[u32], pos: usize) -> Option<usize> {
        let b = *blocks.get(pos / self.block_size)? as usize;
        if b >= self.num_blocks {
            return None;
        }
        let s = b * self.block_size + pos % self.block_size;
        Some(s * self.n_kv_heads * self.head_dim)
    }

    /// Store each row's key and value (`[rows, n_kv_heads·head_dim]`) at its position.
    pub fn write(&mut self, layer: usize, rows: &[RowInfo<'_>], k: &[f32], v: &[f32]) {
        fn put<T: KvElem>(dst: &mut [T], src: &[f32]) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = T::from_f32(*s);
            }
        }
        let w = self.n_kv_heads * self.head_dim;
        for (r, row) in rows.iter().enumerate() {
            let Some(off) = self.slot(row.blocks, row.pos) else {
                continue;
            };
            let (ks, vs) = (&k[r * w..(r + 1) * w], &v[r * w..(r + 1) * w]);
            match &mut self.store {
                Store::F32 { k, v } => {
                    put(&mut k[layer][off..off + w], ks);
                    put(&mut v[layer][off..off + w], vs);
                }
                Store::F16 { k, v } => {
                    put(&mut k[layer][off..off + w], ks);
                    put(&mut v[layer][off..off + w], vs);
                }
            }
        }
    }

    /// Layers, width (`kv_heads × head_dim`) and bytes per element.
    pub fn layout(&self) -> (usize, usize, usize) {
        let (layers, elem) = match &self.store {
            Store::F32 { k, .. } => (k.len(), 4),
            Store::F16 { k, .. } => (k.len(), 2),
        };
        (layers, self.n_kv_heads * self.head_dim, elem)
    }

    /// Append every slot of `blocks` to `out` as `[2][layers][tokens][width]` elements,
    /// little-endian (keys, then values).
    pub fn export(&self, blocks: &[u32], out: &mut Vec<u8>) -> bool {
        let bs = self.block_size * self.n_kv_heads * self.head_dim;
        if blocks.iter().any(|&b| b as usize >= self.num_blocks) {
            return false;
        }
        fn put<T: Copy>(out: &mut Vec<u8>, src: &[T], bytes: impl Fn(T) -> [u8; 2]) {
            for &x in src {
                out.extend_from_slice(&bytes(x));
            }
        }
        match &self.store {
            Store::F16 { k, v } => {
                for side in [k, v] {
                    for layer in side {
                        for &b in blocks {
                            let off = b as usize * bs;
                            put(out, &layer[off..off + bs], |x: f16| x.to_le_bytes());
                        }
                    }
                }
            }
            Store::F32 { k, v } => {
                for side in [k, v] {
                    for layer in side {
                        for &b in blocks {
                            let off = b as usize * bs;
                            for x in &layer[off..off + bs] {
                                out.extend_from_slice(&x.to_le_bytes());
                            }
                        }
                    }
                }
            }
        }
        true
    }

    /// The inverse of [`KvCache::export`] for part of a chunk: `data` holds
    /// `chunk_tokens` tokens; those from `first_token` on fill `blocks` in order.
    pub fn import(
        &mut self,
        blocks: &[u32],
        data: &[u8],
        chunk_tokens: usize,
        first_token: usize,
    ) -> bool {
        let (layers, width, elem) = self.layout();
        let tokens = blocks.len() * self.block_size;
        if data.len() != 2 * layers * chunk_tokens * width * elem
            || first_token + tokens > chunk_tokens
            || blocks.iter().any(|&b| b as usize >= self.num_blocks)
        {
            return false;
        }
        let bs = self.block_size * width;
        match &mut self.store {
            Store::F16 { k, v } => {
                for (side_i, side) in [k, v].into_iter().enumerate() {
                    for (l, layer) in side.iter_mut().enumerate() {
                        let base = ((side_i * layers + l) * chunk_tokens + first_token) * width;
                        for (j, &b) in blocks.iter().enumerate() {
                            let src = &data[(base + j * bs) * 2..(base + (j + 1) * bs) * 2];
                            let dst = &mut layer[b as usize * bs..(b as usize + 1) * bs];
                            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                                *d = f16::from_le_bytes([c[0], c[1]]);
                            }
                        }
                    }
                }
            }
            Store::F32 { k, v } => {
                for (side_i, side) in [k, v].into_iter().enumerate() {
                    for (l, layer) in side.iter_mut().enumerate() {
                        let base = ((side_i * layers + l) * chunk_tokens + first_token) * width;
                        for (j, &b) in blocks.iter().enumerate() {
                            let src = &data[(base + j * bs) * 4..(base + (j + 1) * bs) * 4];
                            let dst = &mut layer[b as usize * bs..(b as usize + 1) * bs];
                            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                            }
                        }
                    }
                }
            }
        }
        true
    }

    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        match &self.store {
            Store::F32 { k, v } => KvLayer::F32(&k[layer], &v[layer]),
            Store::F16 { k, v } => KvLayer::F16(&k[layer], &v[layer]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fill `tokens` positions of a sequence with distinct values through `write`.
    fn filled(dtype: KvDtype, blocks: &[u32], tokens: usize) -> KvCache {
        let mut c = KvCache::with_dtype(2, 8, 4, 2, 3, dtype);
        let w = 6;
        for layer in 0..2 {
            for pos in 0..tokens {
                let k: Vec<f32> = (0..w)
                    .map(|i| (layer * 1000 + pos * 10 + i) as f32)
                    .collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                c.write(layer, &[RowInfo { pos, blocks }], &k, &v);
            }
        }
        c
    }

    #[test]
    fn exported_chunks_import_into_other_blocks_bit_for_bit() {
        for dtype in [KvDtype::F16, KvDtype::F32] {
            let src_blocks = [5u32, 2, 7];
            let src = filled(dtype, &src_blocks, 12);
            let mut chunk = Vec::new();
            assert!(src.export(&src_blocks, &mut chunk));
            let (layers, width, elem) = src.layout();
            assert_eq!(chunk.len(), 2 * layers * 12 * width * elem);
            // Into other blocks of another cache, whole and from the second block on.
            let mut dst = KvCache::with_dtype(2, 8, 4, 2, 3, dtype);
            assert!(dst.import(&[0, 1, 3], &chunk, 12, 0));
            let mut again = Vec::new();
            assert!(dst.export(&[0, 1, 3], &mut again));
            assert_eq!(again, chunk);
            let mut part = KvCache::with_dtype(2, 8, 4, 2, 3, dtype);
            assert!(part.import(&[6, 4], &chunk, 12, 4));
            let mut tail = Vec::new();
            assert!(part.export(&[6, 4], &mut tail));
            let mut want = Vec::new();
            assert!(src.export(&[2, 7], &mut want));
            assert_eq!(tail, want);
            // Wrong sizes change nothing.
            assert!(!dst.import(&[0], &chunk[1..], 12, 0));
            assert!(!dst.import(&[0, 1, 2, 3], &chunk, 12, 0));
            assert!(!dst.import(&[99], &chunk, 12, 0));
        }
    }
}
