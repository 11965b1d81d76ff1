//! The model's KV cache, paged as the block manager pages it: block `b` holds positions
//! `[i·B, (i+1)·B)` of every sequence whose block table has `b` at index `i`, so a
//! prefix-cache hit in the block manager is KV the model really does not recompute.
//!
//! Layout per layer: `[num_blocks][block_size][n_kv_heads][head_dim]` of `f32`, keys and
//! values apart.

use super::attention::RowInfo;

pub struct KvCache {
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub num_blocks: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(
        n_layers: usize,
        num_blocks: usize,
        block_size: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> KvCache {
        let per_layer = num_blocks * block_size * n_kv_heads * head_dim;
        KvCache {
            block_size,
            n_kv_heads,
            head_dim,
            num_blocks,
            k: (0..n_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..n_layers).map(|_| vec![0.0; per_layer]).collect(),
        }
    }

    /// Bytes one block takes over all layers (keys and values).
    pub fn bytes_per_block(
        n_layers: usize,
        block_size: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        2 * n_layers * block_size * n_kv_heads * head_dim * std::mem::size_of::<f32>()
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
        let w = self.n_kv_heads * self.head_dim;
        for (r, row) in rows.iter().enumerate() {
            if let Some(off) = self.slot(row.blocks, row.pos) {
                self.k[layer][off..off + w].copy_from_slice(&k[r * w..(r + 1) * w]);
                self.v[layer][off..off + w].copy_from_slice(&v[r * w..(r + 1) * w]);
            }
        }
    }

    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }
}
