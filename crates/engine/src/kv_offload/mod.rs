//! KV offloading: the tiers below the engine's own paged blocks, configured as vLLM +
//! LMCache users configure them (`--kv-transfer-config`, `LMCACHE_*`; [`config`]).
//!
//! A prompt is cut into chunks of `chunk_size` tokens (256), each keyed as LMCache keys
//! them, `model@world_size@worker_id@chunk_hash@dtype`, where the chunk hash chains every
//! token up to the chunk's end with the engine's own 64-bit block hash
//! ([`kv_events::hash::block_hash`] over the chunk's tokens, parent = the previous
//! chunk's hash): fixed across processes and machines, unlike LMCache's default
//! (Python's `hash()`, LMCache#1139). A chunk's payload is its keys and values in
//! LMCache's `KV_2LTD` layout (`[2][layers][tokens][kv_heads·head_dim]`, the cache's
//! dtype); its `Meta` says so, and a chunk whose layout differs from this engine's is
//! rejected, never misread.
//!
//! - **Load** (engine loop, when a request arrives): after the engine's own prefix-cache
//!   hit, the following chunks are looked up tier by tier (host memory, then disk, then
//!   the remote servers, waiting at most `blocking_timeout_secs`; the tiers are the
//!   `cache` crate's `Store`, `DiskTier` and `Remote`), and each one found is
//!   written into free blocks registered as cached, so the scheduler admits the request
//!   with an ordinary prefix hit and computes only the rest. The first miss ends it.
//! - **Save** (engine loop, the step a prompt's prefill completes): each full chunk not
//!   saved before is copied out of the paged cache into the host tier and queued for the
//!   saver thread, which writes it to disk and to the remote servers: never on a
//!   request's critical path beyond that copy. A full queue drops the chunk (counted).

pub mod config;
pub mod pd;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache::client::Remote;
use cache::lm::{self, Meta};
use cache::store::{Object, Store};
use kv_events::{BlockRemoved, BlockStored, KvEvent, MEDIUM_CPU};
use protocol::prom::{Counter, Gauge, Histogram, TextWriter};

use crate::core::step::KvLayout;
use cache::disk::DiskTier;
pub use config::{KvTransferConfig, LmCacheSettings};

/// Where a chunk was found (the step contract's, so a backend can be told).
pub use crate::core::step::KvTier as Tier;

impl Tier {
    const ALL: [Tier; 3] = [Tier::Cpu, Tier::Disk, Tier::Remote];

    fn label(self) -> &'static str {
        match self {
            Tier::Cpu => "cpu",
            Tier::Disk => "disk",
            Tier::Remote => "remote",
        }
    }
}

/// Offloading metrics (rendered with the engine's).
#[derive(Debug)]
pub struct OffloadMetrics {
    /// Prompt tokens looked up beyond the engine's own prefix hit (vLLM's name).
    pub queries: Counter,
    /// Of those, tokens loaded from a tier.
    pub hits: Counter,
    hit_chunks: [Counter; 3],
    saved_chunks: [Counter; 3],
    failures: [Counter; 3],
    rejected: Counter,
    dropped: Counter,
    loaded_bytes: Counter,
    saved_bytes: Counter,
    cpu_bytes: Gauge,
    disk_bytes: Gauge,
    load_seconds: Histogram,
    save_seconds: Histogram,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Default for OffloadMetrics {
    fn default() -> Self {
        OffloadMetrics {
            queries: Counter::default(),
            hits: Counter::default(),
            hit_chunks: Default::default(),
            saved_chunks: Default::default(),
            failures: Default::default(),
            rejected: Counter::default(),
            dropped: Counter::default(),
            loaded_bytes: Counter::default(),
            saved_bytes: Counter::default(),
            cpu_bytes: Gauge::default(),
            disk_bytes: Gauge::default(),
            load_seconds: Histogram::new(LATENCY_BUCKETS),
            save_seconds: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl OffloadMetrics {
    /// The families, labelled like the engine's (`labels`).
    pub fn render(&self, w: &mut TextWriter, labels: &[(&str, &str)]) {
        let one = |w: &mut TextWriter, name: &str, kind: &str, help: &str, v: f64| {
            w.header(name, kind, help);
            w.sample(name, labels, v);
        };
        one(w, "vllm:external_prefix_cache_queries_total", "counter",
            "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
            self.queries.get() as f64);
        one(w, "vllm:external_prefix_cache_hits_total", "counter",
            "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
            self.hits.get() as f64);
        let per_tier = |w: &mut TextWriter, name: &str, help: &str, c: &[Counter; 3]| {
            w.header(name, "counter", help);
            for t in Tier::ALL {
                let mut l = labels.to_vec();
                l.push(("tier", t.label()));
                w.sample(name, &l, c[t as usize].get() as f64);
            }
        };
        per_tier(
            w,
            "switchyard:kv_offload_hit_chunks_total",
            "Chunks loaded, by the tier they came from.",
            &self.hit_chunks,
        );
        per_tier(
            w,
            "switchyard:kv_offload_saved_chunks_total",
            "Chunks saved, by tier.",
            &self.saved_chunks,
        );
        per_tier(
            w,
            "switchyard:kv_offload_failures_total",
            "Tier reads or writes that failed (timeouts, a server down, I/O errors).",
            &self.failures,
        );
        one(w, "switchyard:kv_offload_rejected_chunks_total", "counter",
            "Chunks found but refused: their layout is not this engine's, or they could not be written into the cache.",
            self.rejected.get() as f64);
        one(
            w,
            "switchyard:kv_offload_dropped_chunks_total",
            "counter",
            "Chunks not saved because the saver's queue was full.",
            self.dropped.get() as f64,
        );
        one(
            w,
            "switchyard:kv_offload_loaded_bytes_total",
            "counter",
            "Payload bytes loaded from the tiers.",
            self.loaded_bytes.get() as f64,
        );
        one(
            w,
            "switchyard:kv_offload_saved_bytes_total",
            "counter",
            "Payload bytes copied out of the paged cache to be saved.",
            self.saved_bytes.get() as f64,
        );
        w.header(
            "switchyard:kv_offload_tier_bytes",
            "gauge",
            "Payload bytes held by the local tiers.",
        );
        let mut l = labels.to_vec();
        l.push(("tier", "cpu"));
        w.sample("switchyard:kv_offload_tier_bytes", &l, self.cpu_bytes.get());
        l.pop();
        l.push(("tier", "disk"));
        w.sample(
            "switchyard:kv_offload_tier_bytes",
            &l,
            self.disk_bytes.get(),
        );
        w.header(
            "switchyard:kv_offload_load_seconds",
            "histogram",
            "Time to find and read one chunk from the tiers.",
        );
        w.histogram(
            "switchyard:kv_offload_load_seconds",
            labels,
            &self.load_seconds,
        );
        w.header(
            "switchyard:kv_offload_save_seconds",
            "histogram",
            "Time the saver took to write one chunk to disk and the remote servers.",
        );
        w.histogram(
            "switchyard:kv_offload_save_seconds",
            labels,
            &self.save_seconds,
        );
    }
}

/// A chunk's blocks as the engine hashes them, for KV events.
pub struct ChunkBlocks<'a> {
    pub hashes: &'a [u64],
    pub parent: Option<u64>,
    pub tokens: &'a [u32],
    pub block_size: usize,
}

struct SaveJob {
    key: String,
    object: Object,
}

/// The engine loop's offloading state.
pub struct Offload {
    transfer: KvTransferConfig,
    settings: LmCacheSettings,
    layout: KvLayout,
    /// The key's `model`, with `@` (the key's separator) replaced.
    model: String,
    dtype_name: &'static str,
    dtype_code: i32,
    host: Option<Store>,
    disk: Option<Arc<DiskTier>>,
    remote: Option<(tokio::runtime::Runtime, Remote)>,
    /// A remote tier in this process, shared by every engine given it: what `switchyard
    /// plan --kv-cache-server` puts behind its simulated engines (a cache server without
    /// the network, whose transfer time the sim backend models). Read and written on the
    /// loop thread: a store is a map of shared payloads, no I/O.
    shared: Option<Arc<Store>>,
    saver: Option<SyncSender<SaveJob>>,
    /// Keys saved lately (bounded): a prompt seen again is not saved again.
    saved: HashSet<String>,
    saved_order: VecDeque<String>,
    /// While KV events are published: each host-tier chunk's block hashes (to announce
    /// its eviction), and the events not handed to the publisher yet.
    cpu_blocks: Option<HashMap<String, Vec<u64>>>,
    cpu_events: Vec<KvEvent>,
    pub metrics: Arc<OffloadMetrics>,
}

const SAVED_MEMORY: usize = 65_536;

impl Offload {
    /// Set up the tiers for a backend keeping KV as `layout` in blocks of `block_size`.
    pub fn new(
        transfer: KvTransferConfig,
        settings: LmCacheSettings,
        layout: KvLayout,
        block_size: usize,
        model: &str,
    ) -> Result<Offload, String> {
        if !settings.chunk_size.is_multiple_of(block_size) {
            return Err(format!(
                "LMCache chunk_size {} must be a multiple of --block-size {block_size}",
                settings.chunk_size
            ));
        }
        let (dtype_name, dtype_code) = match layout.elem_bytes {
            2 => ("half", lm::DTYPE_FLOAT16),
            4 => ("float", lm::DTYPE_FLOAT32),
            n => return Err(format!("KV elements of {n} bytes cannot be offloaded")),
        };
        let metrics = Arc::new(OffloadMetrics::default());
        let host = (settings.local_cpu && settings.max_local_cpu_bytes() > 0)
            .then(|| Store::new(settings.max_local_cpu_bytes()));
        let disk = match &settings.local_disk {
            Some(dir) if settings.max_local_disk_bytes() > 0 => Some(Arc::new(
                DiskTier::open(dir, settings.max_local_disk_bytes())
                    .map_err(|e| format!("LMCache local_disk {}: {e}", dir.display()))?,
            )),
            _ => None,
        };
        let timeout = Duration::from_secs_f64(settings.blocking_timeout_secs.max(0.001));
        let remote_for = |what: &str| -> Result<Option<(tokio::runtime::Runtime, Remote)>, String> {
            let Some(url) = &settings.remote_url else {
                return Ok(None);
            };
            let remote =
                Remote::from_urls(url, timeout).map_err(|e| format!("LMCache remote_url: {e}"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("{what}: {e}"))?;
            Ok(Some((rt, remote)))
        };
        let remote = remote_for("KV offload loader")?;
        let saver = if transfer.stores() && (disk.is_some() || remote.is_some()) {
            let (tx, rx) = sync_channel::<SaveJob>(64);
            let disk = disk.clone();
            let remote = remote_for("KV offload saver")?;
            let m = metrics.clone();
            std::thread::Builder::new()
                .name("kv-offload".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        let started = Instant::now();
                        if let Some(d) = &disk {
                            match d.put(&job.key, &job.object) {
                                Ok(()) => m.saved_chunks[Tier::Disk as usize].inc(),
                                Err(e) => {
                                    m.failures[Tier::Disk as usize].inc();
                                    tracing::warn!(error = %e, "KV offload: disk write failed");
                                }
                            }
                            m.disk_bytes.set(d.bytes() as f64);
                        }
                        if let Some((rt, remote)) = &remote {
                            let client = remote.shard(&job.key);
                            let put = client.put(&job.key, job.object.meta, &job.object.data);
                            match rt.block_on(put) {
                                Ok(()) => m.saved_chunks[Tier::Remote as usize].inc(),
                                Err(e) => {
                                    m.failures[Tier::Remote as usize].inc();
                                    tracing::debug!(error = %e, "KV offload: remote save failed");
                                }
                            }
                        }
                        m.save_seconds.observe(started.elapsed().as_secs_f64());
                    }
                })
                .map_err(|e| format!("KV offload saver: {e}"))?;
            Some(tx)
        } else {
            None
        };
        if let Some(d) = &disk {
            metrics.disk_bytes.set(d.bytes() as f64);
        }
        Ok(Offload {
            transfer,
            settings,
            layout,
            model: model.replace('@', "_"),
            dtype_name,
            dtype_code,
            host,
            disk,
            remote,
            shared: None,
            saver,
            saved: HashSet::new(),
            saved_order: VecDeque::new(),
            cpu_blocks: None,
            cpu_events: Vec::new(),
            metrics,
        })
    }

    /// Use `store` as a remote tier (beside any `remote_url`): chunks saved go into it at
    /// once, and lookups that miss host memory and disk find it there.
    pub fn with_shared_remote(mut self, store: Arc<Store>) -> Offload {
        self.shared = Some(store);
        self
    }

    pub fn chunk_size(&self) -> usize {
        self.settings.chunk_size
    }

    pub fn loads(&self) -> bool {
        self.transfer.loads()
    }

    pub fn stores(&self) -> bool {
        self.transfer.stores()
    }

    /// The keys of the first `n` full chunks of `tokens`.
    pub fn chunk_keys(&self, tokens: &[u32], n: usize) -> Vec<String> {
        let cs = self.settings.chunk_size;
        let mut parent = None;
        (0..n.min(tokens.len() / cs))
            .map(|c| {
                let h = kv_events::hash::block_hash(parent, &tokens[c * cs..(c + 1) * cs]);
                parent = Some(h);
                format!("{}@1@0@{h:x}@{}", self.model, self.dtype_name)
            })
            .collect()
    }

    /// The `Meta` a chunk of this engine carries.
    pub fn chunk_meta(&self) -> Meta {
        let cs = self.settings.chunk_size;
        Meta {
            length: (cs * self.layout.bytes_per_token()) as i32,
            fmt: lm::FMT_KV_2LTD,
            dtype: self.dtype_code,
            shape: [
                2,
                self.layout.layers as i32,
                cs as i32,
                self.layout.width as i32,
            ],
        }
    }

    fn fits(&self, o: &Object) -> bool {
        let want = self.chunk_meta();
        o.meta.fmt == want.fmt
            && o.meta.dtype == want.dtype
            && o.meta.shape == want.shape
            && o.data.len() == want.length as usize
    }

    /// Find a chunk: host memory, then disk, then the remote servers. A chunk found
    /// below host memory is kept there too.
    pub fn fetch(&mut self, key: &str) -> Option<(Tier, Object)> {
        let started = Instant::now();
        let found = self.lookup(key);
        let (tier, object) = found?;
        if !self.fits(&object) {
            self.metrics.rejected.inc();
            tracing::warn!(
                key,
                "KV offload: a chunk's layout is not this engine's; recomputing"
            );
            return None;
        }
        self.metrics
            .load_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.hit_chunks[tier as usize].inc();
        self.metrics.loaded_bytes.add(object.data.len() as u64);
        if tier != Tier::Cpu && self.host.is_some() {
            self.host_put(key, object.clone(), None);
        }
        Some((tier, object))
    }

    fn lookup(&mut self, key: &str) -> Option<(Tier, Object)> {
        if let Some(o) = self.host.as_ref().and_then(|h| h.get(key)) {
            return Some((Tier::Cpu, o));
        }
        if let Some(o) = self.disk.as_ref().and_then(|d| d.get(key)) {
            return Some((Tier::Disk, o));
        }
        if let Some(o) = self.shared.as_ref().and_then(|s| s.get(key)) {
            return Some((Tier::Remote, o));
        }
        let (rt, remote) = self.remote.as_ref()?;
        match rt.block_on(remote.shard(key).get(key)) {
            Ok(Some(o)) => Some((Tier::Remote, o)),
            Ok(None) => None,
            Err(e) => {
                self.metrics.failures[Tier::Remote as usize].inc();
                tracing::debug!(error = %e, "KV offload: remote lookup failed; recomputing");
                None
            }
        }
    }

    /// Whether `key` was saved lately (or is in host memory): no need to save it again.
    pub fn saved(&self, key: &str) -> bool {
        self.saved.contains(key)
    }

    /// Announce host-tier chunks as KV events with `medium: "CPU"` (as vLLM announces
    /// offloaded blocks), so a KV-aware router can count them.
    pub fn enable_events(&mut self) {
        self.cpu_blocks = Some(HashMap::new());
    }

    /// The host tier's KV events since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.cpu_events)
    }

    /// Save a chunk copied out of the paged cache: host memory now, disk and remote on
    /// the saver thread. `blocks` is the chunk's blocks as the engine hashes them (with
    /// the hash before the chunk and its tokens), for the host tier's KV events.
    pub fn save(&mut self, key: String, data: Bytes, blocks: ChunkBlocks<'_>) {
        let object = Object {
            meta: self.chunk_meta(),
            data,
        };
        self.metrics.saved_bytes.add(object.data.len() as u64);
        if self.host.is_some() {
            self.host_put(&key, object.clone(), Some(blocks));
            self.metrics.saved_chunks[Tier::Cpu as usize].inc();
        }
        if let Some(shared) = &self.shared {
            if let cache::store::PutOutcome::Stored { .. } = shared.put(&key, object.clone()) {
                self.metrics.saved_chunks[Tier::Remote as usize].inc();
            }
        }
        if let Some(tx) = &self.saver {
            match tx.try_send(SaveJob {
                key: key.clone(),
                object,
            }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => self.metrics.dropped.inc(),
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        self.remember(key);
    }

    /// Put a chunk in host memory; with KV events on, announce it (when its blocks are
    /// given) and the eviction of every chunk it pushed out.
    fn host_put(&mut self, key: &str, object: Object, blocks: Option<ChunkBlocks<'_>>) {
        let Some(h) = &self.host else {
            return;
        };
        let mut evicted = Vec::new();
        let events = self.cpu_blocks.is_some();
        h.put_evicting(key, object, events.then_some(&mut evicted));
        self.metrics.cpu_bytes.set(h.usage().1 as f64);
        let Some(map) = self.cpu_blocks.as_mut() else {
            return;
        };
        for k in evicted {
            if let Some(hashes) = map.remove(k.as_ref()) {
                self.cpu_events.push(KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: hashes,
                    medium: Some(MEDIUM_CPU.into()),
                    group_idx: Some(0),
                }));
            }
        }
        if let Some(b) = blocks {
            if !map.contains_key(key) {
                let mut stored =
                    BlockStored::new(b.hashes.to_vec(), b.parent, b.tokens.to_vec(), b.block_size);
                stored.medium = Some(MEDIUM_CPU.into());
                self.cpu_events.push(KvEvent::BlockStored(stored));
                map.insert(key.to_string(), b.hashes.to_vec());
            }
        }
    }

    /// Note a chunk as present (loaded from a tier): not to be saved again.
    pub fn remember(&mut self, key: String) {
        if self.saved.insert(key.clone()) {
            self.saved_order.push_back(key);
            if self.saved_order.len() > SAVED_MEMORY {
                if let Some(old) = self.saved_order.pop_front() {
                    self.saved.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offload(elem_bytes: usize) -> Offload {
        let transfer =
            KvTransferConfig::parse(r#"{"kv_connector":"LMCacheConnectorV1"}"#).expect("config");
        let settings = LmCacheSettings {
            chunk_size: 32,
            max_local_cpu_size: 0.01,
            ..LmCacheSettings::default()
        };
        let layout = KvLayout {
            layers: 2,
            width: 4,
            elem_bytes,
        };
        Offload::new(transfer, settings, layout, 16, "m@x").expect("offload")
    }

    #[test]
    fn keys_chain_chunks_and_name_the_layout() {
        let o = offload(2);
        let tokens: Vec<u32> = (0..100).collect();
        let keys = o.chunk_keys(&tokens, 10);
        assert_eq!(keys.len(), 3, "only full chunks");
        assert!(
            keys[0].starts_with("m_x@1@0@") && keys[0].ends_with("@half"),
            "{}",
            keys[0]
        );
        let mut other = tokens.clone();
        other[0] = 7;
        let k2 = o.chunk_keys(&other, 3);
        assert!(
            keys.iter().zip(&k2).all(|(a, b)| a != b),
            "every later chunk depends on the first"
        );
        assert_eq!(o.chunk_keys(&tokens[..64], 2), keys[..2]);
        assert!(offload(4).chunk_keys(&tokens, 1)[0].ends_with("@float"));
        let m = o.chunk_meta();
        assert_eq!((m.shape, m.length), ([2, 2, 32, 4], 2 * 2 * 32 * 4 * 2));
    }

    #[test]
    fn a_chunk_of_another_layout_is_refused_not_loaded() {
        let mut o = offload(2);
        let good = vec![1u8; o.chunk_meta().length as usize];
        o.save(
            "good".into(),
            Bytes::from(good.clone()),
            ChunkBlocks {
                hashes: &[1, 2],
                parent: None,
                tokens: &[0; 32],
                block_size: 16,
            },
        );
        let (tier, got) = o.fetch("good").expect("hit");
        assert_eq!((tier, got.data.len()), (Tier::Cpu, good.len()));
        // Same key space, another model's shape (say, 3 layers), or a short payload.
        let mut bad = o.chunk_meta();
        bad.shape[1] = 3;
        let host = o.host.as_ref().expect("host tier");
        host.put(
            "other-model",
            Object {
                meta: bad,
                data: Bytes::from(good.clone()),
            },
        );
        host.put(
            "short",
            Object {
                meta: o.chunk_meta(),
                data: Bytes::from(vec![0u8; 10]),
            },
        );
        assert!(o.fetch("other-model").is_none());
        assert!(o.fetch("short").is_none());
        assert_eq!(o.metrics.rejected.get(), 2);
        assert!(o.fetch("absent").is_none());
        assert_eq!(o.metrics.rejected.get(), 2);
    }

    #[test]
    fn host_tier_chunks_are_announced_with_medium_cpu_and_their_eviction_too() {
        let mut o = offload(2);
        o.enable_events();
        // Chunks of over half the host tier's size: the second evicts the first.
        let per = o.host.as_ref().map(|h| h.max_bytes()).unwrap_or(0) as usize / 2 + 1;
        let tokens = [0u32; 32];
        let (ha, hb) = ([10u64, 11], [20u64, 21]);
        let blocks = |hashes| ChunkBlocks {
            hashes,
            parent: None,
            tokens: &tokens,
            block_size: 16,
        };
        o.save("a".into(), Bytes::from(vec![0; per]), blocks(&ha));
        o.save("b".into(), Bytes::from(vec![0; per]), blocks(&hb));
        let ev = o.take_events();
        let stored: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                KvEvent::BlockStored(s) => Some((s.block_hashes.clone(), s.medium.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(stored.len(), 2);
        assert!(stored.iter().all(|(_, m)| m.as_deref() == Some(MEDIUM_CPU)));
        let removed: Vec<_> = ev
            .iter()
            .filter_map(|e| match e {
                KvEvent::BlockRemoved(r) => Some((r.block_hashes.clone(), r.medium.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            removed,
            vec![(vec![10, 11], Some(MEDIUM_CPU.to_string()))],
            "a was evicted for b"
        );
        assert!(o.take_events().is_empty());
    }
}
