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

    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        match &self.store {
            Store::F32 { k, v } => KvLayer::F32(&k[layer], &v[layer]),
            Store::F16 { k, v } => KvLayer::F16(&k[layer], &v[layer]),
        }
    }
}
