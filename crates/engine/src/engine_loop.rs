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
use crate::core::request::KvTransfer;
use crate::core::request::{EngineEvent, FinishReason, NewRequest, Request};
use crate::core::scheduler::{Finished, Scheduled, Scheduler, SchedulerConfig, StepStats};
use crate::core::step::KvTier;
use crate::core::step::TokenLogprobs;
use crate::kv_offload::pd::{self, Lease, Leases, PdConfig, PdMetrics};
use crate::kv_offload::Offload;
use crate::kv_publisher::KvEventSink;
use crate::metrics::EngineMetrics;
use std::collections::HashMap;

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
    /// A decode engine's side-channel read of a lease (P/D prefill): answered with the
    /// leased blocks' KV (the lease is then released) or a refusal.
    KvRead {
        request: crate::kv_offload::pd::ReadRequest,
        reply: tokio::sync::oneshot::Sender<crate::kv_offload::pd::ReadAnswer>,
    },
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
    /// P/D disaggregation (`--kv-transfer-config` with NixlConnector), when on.
    pub pd: Option<(Arc<PdConfig>, Arc<PdMetrics>)>,
    /// Most distinct LoRA adapters running at once (`--max-loras`; 0: LoRA off).
    pub max_loras: usize,
}

/// Where the loop answers a prefill request's leased block ids.
type LeaseReply = tokio::sync::oneshot::Sender<Option<Vec<u32>>>;

/// The loop's P/D state: its settings, leases, and the lease tokens of requests still
/// running (with where to answer their block ids).
struct PdState {
    cfg: Arc<PdConfig>,
    metrics: Arc<PdMetrics>,
    leases: Leases,
    pending: HashMap<u64, (String, LeaseReply)>,
}

/// The loop for `config`, not started.
fn build(config: CoreConfig, backend: Box<dyn Backend>, metrics: Arc<EngineMetrics>) -> EngineLoop {
    let mut bm = BlockManager::new(config.num_blocks, config.block_size, config.prefix_caching);
    if config.kv_events.is_some() {
        bm.enable_events();
    }
    let sched = Scheduler::new(config.scheduler, bm).with_max_loras(config.max_loras);
    let num_blocks = config.num_blocks;
    let mut lp = EngineLoop::new(sched, backend, metrics, config.eos_token_ids);
    if let Some(sink) = config.kv_events {
        lp.set_kv_events(sink);
    }
    lp.offload = config.offload;
    lp.pd = config.pd.map(|(cfg, metrics)| PdState {
        cfg,
        metrics,
        // At most half the pool leased: leases never take what running requests need.
        leases: Leases::new((num_blocks / 2).max(1)),
        pending: HashMap::new(),
    });
    if lp.kv_events.is_some() {
        if let Some(off) = lp.offload.as_mut() {
            off.enable_events();
        }
    }
    lp
}

/// Request ids start at a per-process random point, so two engines never hand out the
/// same response ids, and unseeded sampling differs between engines.
fn first_request_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    kv_events::hash::mix64(nanos ^ u64::from(std::process::id()).rotate_left(32)) >> 2
}

/// Start the engine loop on its own thread.
pub fn spawn_engine(
    config: CoreConfig,
    backend: Box<dyn Backend>,
    metrics: Arc<EngineMetrics>,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel();
    let m = metrics.clone();
    std::thread::Builder::new()
        .name("engine-core".into())
        .spawn(move || build(config, backend, m).run(rx))?;
    Ok(EngineHandle {
        tx,
        next_id: Arc::new(AtomicU64::new(first_request_id())),
        metrics,
    })
}

/// The engine loop as a task of the caller's runtime, for a discrete-event simulation in
/// virtual time (a current-thread runtime started paused): it takes commands from the
/// returned sender, and each step waits the backend's modelled time
/// ([`Backend::take_modelled_time`]) on tokio's clock between computing the step and
/// handing out its tokens, as the real loop's step takes that long. Ends when every
/// sender is dropped.
pub fn virtual_engine(
    config: CoreConfig,
    backend: Box<dyn Backend>,
    metrics: Arc<EngineMetrics>,
) -> (
    tokio::sync::mpsc::UnboundedSender<EngineCommand>,
    impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (tx, build(config, backend, metrics).run_virtual(rx))
}

/// What the first half of a step did.
enum Executed {
    /// Nothing could be scheduled.
    Nothing,
    /// The backend failed; the step's requests were failed.
    Failed,
    /// The backend ran; [`EngineLoop::step_update`] hands out its tokens.
    Ran,
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
    pd: Option<PdState>,
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
            pd: None,
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
            self.expire_leases();
            if self.sched.is_idle() {
                if self.pd.as_ref().is_some_and(|p| !p.leases.is_empty()) {
                    // Wake at least once a second while leases may expire.
                    match rx.recv_timeout(Duration::from_secs(1)) {
                        Ok(cmd) => self.handle(cmd),
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                } else {
                    match rx.recv() {
                        Ok(cmd) => self.handle(cmd),
                        Err(_) => return,
                    }
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

    async fn run_virtual(mut self, mut rx: tokio::sync::mpsc::UnboundedReceiver<EngineCommand>) {
        use tokio::sync::mpsc::error::TryRecvError;
        // Timers tick in whole milliseconds: what a sleep gives or takes against the
        // modelled time is carried into the next step's, so the clock never drifts from
        // the sum of the modelled steps by a millisecond or more.
        let mut carry = 0.0f64;
        loop {
            self.expire_leases();
            if self.sched.is_idle() {
                match rx.recv().await {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            match self.step_execute() {
                Executed::Ran => {
                    let want = self.backend.take_modelled_time().as_secs_f64() + carry;
                    let before = tokio::time::Instant::now();
                    if want > 0.0 {
                        tokio::time::sleep(Duration::from_secs_f64(want)).await;
                    }
                    carry = want - before.elapsed().as_secs_f64();
                    self.step_update();
                }
                Executed::Failed => {}
                Executed::Nothing => {
                    self.publish_kv_events();
                    match tokio::time::timeout(Duration::from_millis(5), rx.recv()).await {
                        Ok(Some(cmd)) => self.handle(cmd),
                        Ok(None) => return,
                        Err(_) => {}
                    }
                    continue;
                }
            }
            self.publish_kv_events();
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
                let mut r = r;
                let transfer = r.kv_transfer.take();
                let mut req = Request::new(NewRequest {
                    kv_transfer: None,
                    ..r
                });
                match transfer {
                    Some(KvTransfer::Lease { token, reply }) => match self.pd.as_mut() {
                        Some(pd) if pd.cfg.produces => {
                            req.hold_blocks = true;
                            pd.pending.insert(req.id, (token, reply));
                        }
                        _ => {
                            let _ = reply.send(None);
                        }
                    },
                    Some(KvTransfer::Import {
                        data,
                        chunk_tokens,
                        elapsed,
                        fail_on_error,
                    }) => {
                        let imported = self.import_remote(&mut req, &data, chunk_tokens, elapsed);
                        if let (false, Some(pd)) = (imported, &self.pd) {
                            pd.metrics.load_failures.inc();
                        }
                        if !imported && fail_on_error {
                            let _ = req.events.send(EngineEvent::Rejected(
                                "KV transfer from the prefill engine failed: its KV could not be written into this engine's cache (kv_load_failure_policy: fail)".into(),
                            ));
                            self.update_gauges();
                            return;
                        }
                    }
                    None => {}
                }
                // Offloaded chunks are keyed by tokens alone (LMCache's keys): requests under
                // a LoRA adapter neither load nor save them.
                if req.num_computed == 0
                    && req.lora.is_none()
                    && self.offload.as_ref().is_some_and(Offload::loads)
                {
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
                self.drop_pending_lease(id);
            }
            EngineCommand::ResetPrefixCache(reply) => {
                let done = self.sched.reset_prefix_cache();
                // vLLM sends the clear with the next step's batch; sent now (before the
                // answer), a consumer need not wait for traffic to learn the cache is gone.
                self.publish_kv_events();
                let _ = reply.send(done);
            }
            EngineCommand::KvRead { request, reply } => {
                let answer = self.serve_kv_read(&request);
                let _ = reply.send(answer);
            }
        }
        self.update_gauges();
    }

    /// Write a prompt's KV pulled from a prefill engine into fresh blocks of `req`, so
    /// that it is admitted with everything but its last prompt token computed. False
    /// (nothing changed) when the blocks are not there or the sizes do not fit.
    fn import_remote(
        &mut self,
        req: &mut Request,
        data: &[u8],
        chunk_tokens: usize,
        elapsed: Duration,
    ) -> bool {
        let n_prompt = req.num_prompt;
        if n_prompt < 2 || self.pd.is_none() {
            return false;
        }
        let n = self.sched.block_manager().blocks_for(n_prompt);
        // Leave a step's worth of blocks to the running requests.
        let headroom = self.sched.num_running();
        let Some(ids) = self.sched.allocate_blocks(n, headroom) else {
            return false;
        };
        // A modelled pull (sim) brought no payload and has waited its modelled time.
        let modelled =
            data.is_empty() && self.pd.as_ref().is_some_and(|p| p.cfg.modelled.is_some());
        if !modelled && !self.backend.import_kv(&ids, data, chunk_tokens, 0) {
            let mut seq = crate::core::block_manager::SeqBlocks {
                ids,
                ..Default::default()
            };
            self.sched.free_blocks(&mut seq);
            return false;
        }
        if !modelled {
            self.backend.kv_loaded(KvTier::Remote, data.len(), elapsed);
        }
        req.blocks.ids = ids;
        req.num_computed = n_prompt - 1;
        req.external_tokens = n_prompt - 1;
        true
    }

    /// Answer a side-channel read: the lease with that token and those blocks, copied
    /// out and released; anything else is refused (and no data goes out).
    fn serve_kv_read(&mut self, r: &pd::ReadRequest) -> pd::ReadAnswer {
        let Some(state) = self.pd.as_mut() else {
            return Err("this engine does not serve KV".into());
        };
        let now = crate::clock::now();
        if !pd::ct_eq(r.engine_id.as_bytes(), state.cfg.engine_id.as_bytes()) {
            return Err("no such lease".into());
        }
        let mut lease = state
            .leases
            .take(&r.remote_request_id, &r.block_ids, now)
            .map_err(|_| "no such lease".to_string())?;
        let cfg = state.cfg.clone();
        let metrics = state.metrics.clone();
        let modelled = cfg.modelled.is_some();
        let mut data = Vec::new();
        // A modelled backend's KV is read by the decode engine's RDMA in the model: no
        // copy out, no payload.
        let ok = modelled || {
            data.reserve_exact(
                lease.blocks.ids.len() * cfg.block_size * cfg.layout.bytes_per_token(),
            );
            self.backend.export_kv(&lease.blocks.ids, &mut data)
        };
        let header = pd::PayloadHeader {
            engine_id: cfg.engine_id.clone(),
            format: pd::KV_FORMAT.into(),
            layers: cfg.layout.layers,
            width: cfg.layout.width,
            elem_bytes: cfg.layout.elem_bytes,
            block_size: cfg.block_size,
            num_blocks: lease.blocks.ids.len(),
            num_tokens: lease.num_tokens,
            prompt_hash: std::mem::take(&mut lease.prompt_hash),
            modelled,
        };
        self.release_lease(lease);
        metrics
            .leases
            .set(self.pd.as_ref().map_or(0, |p| p.leases.len()) as f64);
        if !ok || Some(data.len()) != header.wire_bytes() {
            return Err("the KV could not be copied out".into());
        }
        Ok((header, data))
    }

    fn release_lease(&mut self, mut lease: Lease) {
        self.sched.free_blocks(&mut lease.blocks);
        if let Some(p) = &self.pd {
            p.metrics.leases.set(p.leases.len() as f64);
            p.metrics.leased_blocks.set(p.leases.blocks() as f64);
        }
    }

    /// A prefill request left without finishing: no lease for it.
    fn drop_pending_lease(&mut self, id: u64) {
        if let Some((_, reply)) = self.pd.as_mut().and_then(|p| p.pending.remove(&id)) {
            let _ = reply.send(None);
        }
    }

    /// Release the leases whose time ran out.
    fn expire_leases(&mut self) {
        let Some(p) = self.pd.as_mut() else {
            return;
        };
        if p.leases.is_empty() {
            return;
        }
        let gone = p.leases.expire(crate::clock::now());
        if gone.is_empty() {
            return;
        }
        p.metrics.expired.add(gone.len() as u64);
        for l in gone {
            self.release_lease(l);
        }
        self.update_gauges();
    }

    /// Lease the blocks of a prefill request that just finished (or release them).
    fn lease_finished(&mut self, req: &mut Request, reason: FinishReason) {
        let Some(p) = self.pd.as_mut() else {
            return;
        };
        let Some((token, reply)) = p.pending.remove(&req.id) else {
            return;
        };
        if !req.hold_blocks || reason == FinishReason::Abort || reason == FinishReason::Error {
            // The scheduler freed them (aborted, failed): nothing to lease.
            let _ = reply.send(None);
            return;
        }
        let n = self
            .sched
            .block_manager()
            .blocks_for(req.num_prompt)
            .min(req.blocks.ids.len());
        // Blocks past the prompt (none today) are not part of the lease.
        let mut extra = crate::core::block_manager::SeqBlocks {
            ids: req.blocks.ids.split_off(n),
            ..Default::default()
        };
        self.sched.free_blocks(&mut extra);
        let blocks = std::mem::take(&mut req.blocks);
        let ids = blocks.ids.clone();
        let lease = Lease {
            token,
            blocks,
            num_tokens: req.num_prompt,
            prompt_hash: pd::prompt_hash(&req.tokens[..req.num_prompt]),
            deadline: crate::clock::now() + p.cfg.lease,
        };
        let out = p.leases.insert(lease);
        let refused = out.last().is_some_and(|l| l.blocks.ids == ids);
        p.metrics.evicted.add(out.len() as u64 - u64::from(refused));
        let _ = reply.send((!refused).then_some(ids));
        for l in out {
            self.release_lease(l);
        }
        if let Some(p) = &self.pd {
            p.metrics.leases.set(p.leases.len() as f64);
            p.metrics.leased_blocks.set(p.leases.blocks() as f64);
        }
    }

    /// When a waiting request cannot be admitted (or running ones were preempted) while
    /// leases hold blocks, release the oldest lease: leases never starve the pool.
    fn relieve_pool(&mut self) {
        let Some(p) = self.pd.as_mut() else {
            return;
        };
        if let Some(l) = p.leases.pop_oldest() {
            p.metrics.evicted.inc();
            self.release_lease(l);
        }
    }

    /// Run one step; false when nothing was scheduled.
    pub fn step(&mut self) -> bool {
        let stepped = match self.step_execute() {
            Executed::Nothing => false,
            Executed::Failed => true,
            Executed::Ran => {
                self.step_update();
                true
            }
        };
        self.publish_kv_events();
        stepped
    }

    /// A step's first half: schedule, and run the backend (which, in real time, takes
    /// the step's time).
    fn step_execute(&mut self) -> Executed {
        let t0 = Instant::now(); // real time: the core's own work
        self.stats.clear();
        self.sched.schedule(&mut self.scheduled, &mut self.stats);
        if (self.stats.preemptions > 0 || self.scheduled.is_empty()) && self.sched.num_waiting() > 0
        {
            self.relieve_pool();
        }
        if self.scheduled.is_empty() {
            self.metrics.preemptions.add(self.stats.preemptions);
            self.update_gauges();
            return Executed::Nothing;
        }
        let steps = self.sched.seq_steps(&self.scheduled);
        let t1 = Instant::now(); // real time: the core's own work
        self.sampled.clear();
        let result = self.backend.execute(&steps, &mut self.sampled);
        drop(steps);
        self.sched_nanos += (t1 - t0).as_nanos() as u64;
        if result.is_ok() {
            self.save_chunks();
        }
        if let Err(e) = result {
            tracing::error!(error = %e, "backend step failed; failing its requests");
            for req in self.sched.fail_step(&self.scheduled) {
                self.record_finish(&req, FinishReason::Error);
                self.drop_pending_lease(req.id);
                let _ = req.events.send(EngineEvent::Rejected(e.to_string()));
            }
            self.update_gauges();
            return Executed::Failed;
        }
        Executed::Ran
    }

    /// A step's second half: the sampled tokens to their requests, finished requests out,
    /// metrics.
    fn step_update(&mut self) {
        let t2 = Instant::now(); // real time: the core's own work
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
        let mut finished = std::mem::take(&mut self.finished);
        for f in &mut finished {
            self.record_finish(&f.request, f.reason);
            if f.request.hold_blocks {
                self.lease_finished(&mut f.request, f.reason);
            }
        }
        self.finished = finished;
        let m = &self.metrics;
        m.prefix_queries.add(self.stats.prefix_queries);
        m.prefix_hits.add(self.stats.prefix_hits);
        m.external_prompt_tokens.add(self.stats.external_hits);
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
        self.sched_nanos += t2.elapsed().as_nanos() as u64;
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
            let started = crate::clock::now();
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
            self.backend.kv_loaded(
                tier,
                chunk.data.len(),
                crate::clock::now().saturating_duration_since(started),
            );
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
            if req.lora.is_some() || !(req.num_computed < req.num_prompt && done >= req.num_prompt)
            {
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
                let Some(data) = self.backend.export_kv_bytes(blocks) else {
                    return;
                };
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
        let now = crate::clock::now();
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
        if let Some(info) = &self.metrics.lora {
            info.set(
                self.sched
                    .running()
                    .iter()
                    .filter_map(|r| r.lora.as_deref()),
                self.sched
                    .waiting()
                    .iter()
                    .filter_map(|r| r.lora.as_deref()),
            );
        }
    }
}
