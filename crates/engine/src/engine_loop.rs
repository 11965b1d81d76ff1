//! The engine loop (vLLM v1's `EngineCore`): one thread that owns the scheduler (and,
//! through it, the block manager) and the backend, and the [`EngineHandle`] through which
//! everything else talks to it. It sits above [`crate::core`] and [`crate::backend`]:
//! it hands the scheduler's step ([`crate::core::step`]) to the backend and the backend's
//! tokens back, using only the scheduler's methods.
//!
//! Commands arrive on a channel; the loop blocks on it when idle, drains it between
//! steps when busy, runs `schedule → backend.execute → update`, streams each new token to
//! its request's channel, and updates the metrics. Dropping every handle stops the loop.
//!
//! Generated tokens and finish reasons are counted by the API layer as the client sees
//! them (as vLLM's output processor does): tokens made after a stop string matched are
//! not counted, and a stop string that matches after the core already ended the request
//! by length still counts as a stop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::core::block_manager::BlockManager;
use crate::core::request::{EngineEvent, FinishReason, NewRequest, Request};
use crate::core::scheduler::{Finished, Scheduled, Scheduler, SchedulerConfig, StepStats};
use crate::core::step::TokenLogprobs;
use crate::kv_offload::Offload;
use crate::kv_publisher::KvEventSink;
use crate::metrics::EngineMetrics;

pub enum EngineCommand {
    Add(NewRequest),
    /// Remove a request (client gone, or a stop string matched) and free its blocks.
    /// `events` is the request's receiver, handed over so that tokens the loop sends
    /// before it sees this command do not fail (a failed send counts the request as
    /// aborted rather than `reason`).
    Abort {
        id: u64,
        reason: FinishReason,
        events: Option<tokio::sync::mpsc::UnboundedReceiver<EngineEvent>>,
    },
    /// Drop all cached prefixes (answered with whether it happened).
    ResetPrefixCache(Sender<bool>),
}

/// Cheap, cloneable handle to the engine loop.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<EngineCommand>,
    next_id: Arc<AtomicU64>,
    pub metrics: Arc<EngineMetrics>,
}

impl EngineHandle {
    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Submit a command; false when the loop has stopped.
    pub fn send(&self, cmd: EngineCommand) -> bool {
        self.tx.send(cmd).is_ok()
    }
}

pub struct CoreConfig {
    pub scheduler: SchedulerConfig,
    pub num_blocks: usize,
    pub block_size: usize,
    pub prefix_caching: bool,
    pub eos_token_ids: Vec<u32>,
    /// Where KV-cache events go (`--kv-events-config`); `None`: not recorded at all.
    pub kv_events: Option<KvEventSink>,
    /// KV offloading tiers (`--kv-transfer-config`), when on.
    pub offload: Option<Offload>,
}

/// Start the engine loop on its own thread.
pub fn spawn_engine(
    config: CoreConfig,
    backend: Box<dyn Backend>,
    metrics: Arc<EngineMetrics>,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel();
    let mut bm = BlockManager::new(config.num_blocks, config.block_size, config.prefix_caching);
    if config.kv_events.is_some() {
        bm.enable_events();
    }
    let sched = Scheduler::new(config.scheduler, bm);
    let m = metrics.clone();
    let eos = config.eos_token_ids;
    let kv_events = config.kv_events;
    let offload = config.offload;
    std::thread::Builder::new()
        .name("engine-core".into())
        .spawn(move || {
            let mut lp = EngineLoop::new(sched, backend, m, eos);
            if let Some(sink) = kv_events {
                lp.set_kv_events(sink);
            }
            lp.offload = offload;
            if lp.kv_events.is_some() {
                if let Some(off) = lp.offload.as_mut() {
                    off.enable_events();
                }
            }
            lp.run(rx)
        })?;
    // Ids start at a per-process random point, so two engines never hand out the same
    // response ids, and unseeded sampling differs between engines.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let start = kv_events::hash::mix64(nanos ^ u64::from(std::process::id()).rotate_left(32)) >> 2;
    Ok(EngineHandle {
        tx,
        next_id: Arc::new(AtomicU64::new(start)),
        metrics,
    })
}

pub struct EngineLoop {
    sched: Scheduler,
    backend: Box<dyn Backend>,
    metrics: Arc<EngineMetrics>,
    eos: Vec<u32>,
    scheduled: Vec<Scheduled>,
    sampled: Vec<u32>,
    logprobs: Vec<Option<Box<TokenLogprobs>>>,
    finished: Vec<Finished>,
    stats: StepStats,
    kv_events: Option<KvEventSink>,
    offload: Option<Offload>,
    /// Nanoseconds spent in `schedule` + `update` (the core's own work), for benchmarks.
    sched_nanos: u64,
    steps: u64,
}

impl EngineLoop {
    pub fn new(
        sched: Scheduler,
        backend: Box<dyn Backend>,
        metrics: Arc<EngineMetrics>,
        eos: Vec<u32>,
    ) -> Self {
        EngineLoop {
            sched,
            backend,
            metrics,
            eos,
            scheduled: Vec::new(),
            sampled: Vec::new(),
            logprobs: Vec::new(),
            finished: Vec::new(),
            stats: StepStats::default(),
            kv_events: None,
            offload: None,
            sched_nanos: 0,
            steps: 0,
        }
    }

    /// Publish KV-cache events through `sink` (also turns on the block manager's events).
    pub fn set_kv_events(&mut self, sink: KvEventSink) {
        self.sched.enable_kv_events();
        self.kv_events = Some(sink);
    }

    /// The scheduler, read-only (for tests and benchmarks).
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// Steps run that scheduled something.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Nanoseconds spent in `schedule` + `update` (the core's own work), for benchmarks.
    pub fn sched_nanos(&self) -> u64 {
        self.sched_nanos
    }

    /// Hand the block manager's events since the last call to the publisher as one batch
    /// (a channel send: never blocks on I/O).
    fn publish_kv_events(&mut self) {
        if let Some(sink) = self.kv_events.as_mut() {
            let extra = self
                .offload
                .as_mut()
                .map(Offload::take_events)
                .unwrap_or_default();
            sink.publish_with(self.sched.drain_kv_events(), extra);
        }
    }

    fn run(mut self, rx: Receiver<EngineCommand>) {
        loop {
            if self.sched.is_idle() {
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            if !self.step() {
                // Nothing could be scheduled: wait for a command rather than spin.
                match rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }

    pub fn handle(&mut self, cmd: EngineCommand) {
        match cmd {
            EngineCommand::Add(r) => {
                if !self.sched.fits_ever(r.prompt.len() + 1) {
                    let _ = r.events.send(EngineEvent::Rejected(format!(
                        "The prompt ({} tokens) does not fit the KV cache ({} blocks of {} tokens).",
                        r.prompt.len(),
                        self.sched.block_manager().num_blocks(),
                        self.sched.block_manager().block_size()
                    )));
                    return;
                }
                let mut req = Request::new(r);
                if self.offload.as_ref().is_some_and(Offload::loads) {
                    self.sched.hash_blocks(&mut req);
                    self.load_chunks(&req);
                }
                self.sched.add(req);
            }
            EngineCommand::Abort {
                id,
                reason,
                events: _keep_open_until_removed,
            } => {
                if let Some(req) = self.sched.abort(id) {
                    self.record_finish(&req, reason);
                }
            }
            EngineCommand::ResetPrefixCache(reply) => {
                let done = self.sched.reset_prefix_cache();
                // vLLM sends the clear with the next step's batch; sent now (before the
                // answer), a consumer need not wait for traffic to learn the cache is gone.
                self.publish_kv_events();
                let _ = reply.send(done);
            }
        }
        self.update_gauges();
    }

    /// Run one step; false when nothing was scheduled.
    pub fn step(&mut self) -> bool {
        let stepped = self.step_inner();
        self.publish_kv_events();
        stepped
    }

    fn step_inner(&mut self) -> bool {
        let t0 = Instant::now();
        self.stats.clear();
        self.sched.schedule(&mut self.scheduled, &mut self.stats);
        if self.scheduled.is_empty() {
            self.metrics.preemptions.add(self.stats.preemptions);
            self.update_gauges();
            return false;
        }
        let steps = self.sched.seq_steps(&self.scheduled);
        let t1 = Instant::now();
        self.sampled.clear();
        let result = self.backend.execute(&steps, &mut self.sampled);
        drop(steps);
        let t2 = Instant::now();
        if result.is_ok() {
            self.save_chunks();
        }
        if let Err(e) = result {
            tracing::error!(error = %e, "backend step failed; failing its requests");
            for req in self.sched.fail_step(&self.scheduled) {
                self.record_finish(&req, FinishReason::Error);
                let _ = req.events.send(EngineEvent::Rejected(e.to_string()));
            }
            self.update_gauges();
            return true;
        }
        self.finished.clear();
        self.logprobs.clear();
        self.backend.take_logprobs(&mut self.logprobs);
        self.sched.update(
            &self.scheduled,
            &self.sampled,
            &mut self.logprobs,
            &self.eos,
            &mut self.stats,
            &mut self.finished,
        );
        let finished = std::mem::take(&mut self.finished);
        for f in &finished {
            self.record_finish(&f.request, f.reason);
        }
        self.finished = finished;
        let m = &self.metrics;
        m.prefix_queries.add(self.stats.prefix_queries);
        m.prefix_hits.add(self.stats.prefix_hits);
        m.prompt_tokens.add(self.stats.prefix_queries);
        m.preemptions.add(self.stats.preemptions);
        for &v in &self.stats.ttft {
            m.ttft.observe(v);
        }
        for &v in &self.stats.itl {
            m.itl.observe(v);
        }
        self.update_gauges();
        self.steps += 1;
        self.sched_nanos += (t1 - t0).as_nanos() as u64 + t2.elapsed().as_nanos() as u64;
        true
    }

    /// Load the chunks of `req`'s prompt that follow its own prefix-cache hit from the
    /// offloading tiers into free blocks registered as cached (see [`crate::kv_offload`]),
    /// stopping at the first chunk no tier has.
    fn load_chunks(&mut self, req: &Request) {
        let Some(off) = self.offload.as_mut() else {
            return;
        };
        let bs = self.sched.block_manager().block_size();
        let cs = off.chunk_size();
        let bpc = cs / bs;
        let chunks = req.tokens.len().saturating_sub(1) / cs;
        if chunks == 0 {
            return;
        }
        let mut local = self.sched.cached_prefix_blocks(req);
        off.metrics
            .queries
            .add((chunks * cs).saturating_sub(local * bs) as u64);
        if local >= chunks * bpc {
            return;
        }
        for (c, key) in off.chunk_keys(&req.tokens, chunks).into_iter().enumerate() {
            let end = (c + 1) * bpc;
            if local >= end {
                continue;
            }
            let started = Instant::now();
            let Some((tier, chunk)) = off.fetch(&key) else {
                break;
            };
            let first = local.max(c * bpc);
            let parent = first.checked_sub(1).map(|p| req.blocks.hashes[p]);
            let Some(ids) = self.sched.import_cached(
                &req.blocks.hashes[first..end],
                parent,
                &req.tokens[first * bs..end * bs],
            ) else {
                break;
            };
            if !self
                .backend
                .import_kv(&ids, &chunk.data, cs, (first - c * bpc) * bs)
            {
                self.sched.forget_blocks(&ids);
                break;
            }
            self.backend
                .kv_loaded(tier, chunk.data.len(), started.elapsed());
            off.metrics.hits.add(((end - first) * bs) as u64);
            off.remember(key);
            local = end;
        }
    }

    /// After a step's forward pass: save the full chunks of every prompt whose prefill
    /// this step completed (their KV is all written now), unless saved before.
    fn save_chunks(&mut self) {
        let Some(off) = self.offload.as_mut() else {
            return;
        };
        if !off.stores() {
            return;
        }
        let bs = self.sched.block_manager().block_size();
        let cs = off.chunk_size();
        let bpc = cs / bs;
        let running = self.sched.running();
        for s in &self.scheduled {
            let req = &running[s.idx];
            let done = req.num_computed + s.num_new;
            if !(req.num_computed < req.num_prompt && done >= req.num_prompt) {
                continue;
            }
            let full = req.num_prompt / cs;
            for (c, key) in off
                .chunk_keys(&req.tokens[..req.num_prompt], full)
                .into_iter()
                .enumerate()
            {
                if off.saved(&key) {
                    continue;
                }
                let Some(blocks) = req.blocks.ids.get(c * bpc..(c + 1) * bpc) else {
                    break;
                };
                let mut data = Vec::with_capacity(off.chunk_meta().length as usize);
                if !self.backend.export_kv(blocks, &mut data) {
                    return;
                }
                let first = c * bpc;
                off.save(
                    key,
                    data,
                    crate::kv_offload::ChunkBlocks {
                        hashes: &req.blocks.hashes[first..first + bpc],
                        parent: first.checked_sub(1).map(|p| req.blocks.hashes[p]),
                        tokens: &req.tokens[first * bs..(first + bpc) * bs],
                        block_size: bs,
                    },
                );
            }
        }
    }

    /// Latency histograms of a request leaving the core. Finish reasons are counted by
    /// the API layer, which sees what the client saw (a stop string can match after the
    /// core already finished the request by length), except engine errors.
    fn record_finish(&self, req: &Request, reason: FinishReason) {
        let now = Instant::now();
        if reason == FinishReason::Error {
            self.metrics.finished(reason);
        }
        self.metrics
            .e2e
            .observe(now.duration_since(req.arrival).as_secs_f64());
        let queued = req
            .first_scheduled
            .unwrap_or(now)
            .duration_since(req.arrival);
        self.metrics.queue_time.observe(queued.as_secs_f64());
    }

    fn update_gauges(&self) {
        self.metrics.running.set(self.sched.num_running() as f64);
        self.metrics.waiting.set(self.sched.num_waiting() as f64);
        self.metrics.kv_usage.set(self.sched.kv_usage());
    }
}
