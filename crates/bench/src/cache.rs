//! `switchyard bench cache`: PUT and GET throughput of a KV cache server (`lm://`, ours
//! or LMCache's `lmcache_server`), checked byte for byte. `--clients` connections PUT
//! `--chunks` chunks of `--chunk-bytes` between them (distinct keys, pseudo-random
//! payloads derived from the key), wait until every connection's PUTs are in (an EXIST
//! round trip on the same connection), then GET every chunk back and compare. GB/s are
//! payload bytes over the phase's wall time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache::lm::{self, Meta};
use clap::Args;
use serde::Serialize;

#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// The server(s): `lm://HOST:PORT[,lm://HOST:PORT...]`, or Redis (`redis://`,
    /// `redis-sentinel://`, `redis-cluster://`) (keys spread by consistent hashing, as
    /// engines spread them).
    #[arg(long)]
    pub url: String,
    /// Concurrent connections (per server).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Bytes per chunk (a 256-token SmolLM2 chunk in f16 is 2·30·256·192·2 = 5.9 MB).
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk_bytes: usize,
    /// Chunks in all.
    #[arg(long, default_value_t = 256)]
    pub chunks: usize,
    /// Give up on one request after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Seed of the keys and payloads (a new one each run by default, so reruns against a
    /// server that keeps data never see the last run's chunks).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Only PUT (no GET phase, nothing verified): to load a server past its memory bound.
    #[arg(long)]
    pub put_only: bool,
    /// Write the JSON summary here.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct CacheReport {
    pub url: String,
    pub clients: usize,
    pub chunk_bytes: usize,
    pub chunks: usize,
    pub put_seconds: f64,
    pub get_seconds: f64,
    pub put_gbps: f64,
    pub get_gbps: f64,
    /// Chunks read back equal to what was written.
    pub verified: usize,
    /// Requests that failed, chunks missing, or chunks that came back different.
    pub errors: usize,
    pub first_error: Option<String>,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn key(seed: u64, i: usize) -> String {
    format!("switchyard-bench@1@0@{:x}@half", mix(seed ^ mix(i as u64)))
}

/// Every chunk is the run's base payload with its own 16 leading bytes (or fewer, for a
/// tiny chunk), so chunks differ and checking one costs a compare, not a regeneration.
fn base_payload(seed: u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    let mut x = mix(seed.rotate_left(7));
    while out.len() < n {
        x = mix(x);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

fn stamp(buf: &mut [u8], seed: u64, i: usize) {
    let mut tag = [0u8; 16];
    tag[..8].copy_from_slice(&mix(seed ^ i as u64).to_le_bytes());
    tag[8..].copy_from_slice(&(i as u64).to_le_bytes());
    let n = buf.len().min(16);
    buf[..n].copy_from_slice(&tag[..n]);
}

struct Shared {
    args: CacheArgs,
    seed: u64,
    base: Vec<u8>,
    next: AtomicUsize,
    errors: AtomicUsize,
    verified: AtomicUsize,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(what);
    }
}

pub async fn run(args: CacheArgs) -> anyhow::Result<CacheReport> {
    anyhow::ensure!(
        args.clients > 0 && args.chunks > 0,
        "--clients and --chunks must be positive"
    );
    anyhow::ensure!(
        args.chunk_bytes > 0 && args.chunk_bytes <= i32::MAX as usize,
        "--chunk-bytes must be 1..2^31"
    );
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    // Checked once here; each task then gets its own connection to every server.
    cache::client::Remote::from_urls(&args.url, timeout).map_err(anyhow::Error::msg)?;
    // Each task gets its own connection to every server; keys go where the ring says.
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let shared = Arc::new(Shared {
        args: args.clone(),
        seed,
        base: base_payload(seed, args.chunk_bytes),
        next: AtomicUsize::new(0),
        errors: AtomicUsize::new(0),
        verified: AtomicUsize::new(0),
        first_error: std::sync::Mutex::new(None),
    });
    let remotes: Vec<Arc<cache::client::Remote>> = (0..args.clients)
        .map(|_| cache::client::Remote::from_urls(&args.url, timeout).map(Arc::new))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    phase(&shared, &remotes, Phase::Put).await;
    let put_seconds = started.elapsed().as_secs_f64();
    shared.next.store(0, Ordering::Relaxed);
    let started = Instant::now();
    if !args.put_only {
        phase(&shared, &remotes, Phase::Get).await;
    }
    let get_seconds = started.elapsed().as_secs_f64();
    let total = (args.chunks * args.chunk_bytes) as f64;
    let report = CacheReport {
        url: args.url.clone(),
        clients: args.clients,
        chunk_bytes: args.chunk_bytes,
        chunks: args.chunks,
        put_seconds,
        get_seconds,
        put_gbps: total / put_seconds.max(1e-9) / 1e9,
        get_gbps: if args.put_only {
            0.0
        } else {
            total / get_seconds.max(1e-9) / 1e9
        },
        verified: shared.verified.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        first_error: shared
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    };
    Ok(report)
}

#[derive(Clone, Copy)]
enum Phase {
    Put,
    Get,
}

async fn phase(shared: &Arc<Shared>, remotes: &[Arc<cache::client::Remote>], phase: Phase) {
    let tasks: Vec<_> = remotes
        .iter()
        .map(|remote| {
            let (shared, remote) = (shared.clone(), remote.clone());
            tokio::spawn(async move {
                let a = &shared.args;
                let mut want = shared.base.clone();
                loop {
                    let i = shared.next.fetch_add(1, Ordering::Relaxed);
                    if i >= a.chunks {
                        break;
                    }
                    let k = key(shared.seed, i);
                    let client = remote.shard(&k);
                    stamp(&mut want, shared.seed, i);
                    match phase {
                        Phase::Put => {
                            let meta = Meta {
                                length: 0,
                                fmt: lm::FMT_KV_2LTD,
                                dtype: lm::DTYPE_UINT8,
                                shape: [a.chunk_bytes as i32, 0, 0, 0],
                            };
                            if let Err(e) = client.put(&k, meta, &want).await {
                                shared.fail(format!("PUT {k}: {e}"));
                            }
                        }
                        Phase::Get => match client.get(&k).await {
                            Ok(Some(o)) if o.data[..] == want[..] => {
                                shared.verified.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Some(o)) => shared.fail(format!(
                                "GET {k}: {} bytes that differ from the {} written",
                                o.data.len(),
                                want.len()
                            )),
                            Ok(None) => shared.fail(format!("GET {k}: miss")),
                            Err(e) => shared.fail(format!("GET {k}: {e}")),
                        },
                    }
                }
                if let Phase::Put = phase {
                    // PUTs get no reply: one round trip per connection says they are in.
                    for c in remote.shards() {
                        if let Err(e) = c.exists("switchyard-bench@1@0@0@half").await {
                            shared.fail(format!("EXIST after PUTs: {e}"));
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

impl CacheReport {
    pub fn table(&self) -> String {
        format!(
            "cache server {}: {} clients, {} chunks of {} bytes\n  PUT {:.3} GB/s ({:.2} s)\n  GET {:.3} GB/s ({:.2} s)\n  verified {} of {}, errors {}{}\n",
            self.url,
            self.clients,
            self.chunks,
            self.chunk_bytes,
            self.put_gbps,
            self.put_seconds,
            self.get_gbps,
            self.get_seconds,
            self.verified,
            self.chunks,
            self.errors,
            self.first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        )
    }
}
