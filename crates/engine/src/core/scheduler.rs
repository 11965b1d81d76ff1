//! The continuous-batching scheduler, as in vLLM v1: FCFS waiting and running queues,
//! a per-step token budget (`max_num_batched_tokens`), chunked prefill, a cap on running
//! sequences (`max_num_seqs`), preemption by recompute when KV blocks run out, and abort.
//!
//! Each step: running requests first (decodes and unfinished prefill chunks), in arrival
//! order; when one cannot get a block, the last running request is preempted (its blocks
//! freed, its progress reset) until it can. Then, if nothing was preempted, waiting
//! requests are admitted in order while budget, sequence slots and blocks last, starting
//! from their longest cached prefix.

use std::collections::VecDeque;

use super::block_manager::{BlockId, BlockManager, CacheEvent};
use super::request::{EngineEvent, Finish, FinishReason, Request};
use super::step::{SeqStep, TokenLogprobs};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
}

/// One request's share of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scheduled {
    /// Index into the running queue ([`Scheduler::running`]; valid until `update`).
    pub idx: usize,
    /// Tokens to compute this step, starting at the request's `num_computed`.
    pub num_new: usize,
}

/// Counters a step produced, for metrics.
#[derive(Debug, Default, Clone)]
pub struct StepStats {
    pub preemptions: u64,
    /// Prompt tokens looked up in / found in the prefix cache by newly admitted requests.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    /// Prompt tokens newly admitted requests got from another engine (P/D).
    pub external_hits: u64,
    pub prefill_tokens: u64,
    pub decode_seqs: u64,
    pub generated: u64,
    /// Time to first token and inter-token gaps (seconds) of tokens sampled this step.
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
}

impl StepStats {
    pub fn clear(&mut self) {
        let (mut ttft, mut itl) = (
            std::mem::take(&mut self.ttft),
            std::mem::take(&mut self.itl),
        );
        ttft.clear();
        itl.clear();
        *self = StepStats {
            ttft,
            itl,
            ..Default::default()
        };
    }
}

/// A request that left the scheduler this step.
#[derive(Debug)]
pub struct Finished {
    pub request: Request,
    pub reason: FinishReason,
    pub stop_token: Option<u32>,
}

/// The scheduler owns the waiting and running queues and the block manager; everything
/// else (the engine loop, tests) goes through its methods.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    bm: BlockManager,
    waiting: VecDeque<Request>,
    running: Vec<Request>,
    hits: Vec<BlockId>,
    /// Most distinct LoRA adapters among running requests (`--max-loras`; 0: no cap).
    max_loras: usize,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, bm: BlockManager) -> Self {
        Scheduler {
            config,
            bm,
            waiting: VecDeque::new(),
            running: Vec::new(),
            hits: Vec::new(),
            max_loras: 0,
        }
    }

    /// Cap the distinct LoRA adapters running at once (vLLM's `--max-loras`): a waiting
    /// request for another adapter waits, and requests behind it that fit are admitted
    /// first (as vLLM's scheduler skips it).
    pub fn with_max_loras(mut self, n: usize) -> Self {
        self.max_loras = n;
        self
    }

    /// The first waiting request that may be admitted under the LoRA cap.
    fn next_admissible(&self) -> Option<usize> {
        if self.waiting.is_empty() {
            return None;
        }
        if self.max_loras == 0 {
            return Some(0);
        }
        let mut active: Vec<u32> = Vec::new();
        for r in &self.running {
            if let Some(a) = &r.lora {
                if !active.contains(&a.id) {
                    active.push(a.id);
                }
            }
        }
        self.waiting.iter().position(|r| match &r.lora {
            None => true,
            Some(a) => active.contains(&a.id) || active.len() < self.max_loras,
        })
    }

    pub fn add(&mut self, mut req: Request) {
        self.bm.update_hashes(&mut req.blocks, &req.tokens);
        self.waiting.push_back(req);
    }

    /// Hash `req`'s full prompt blocks now (`add` would), so its cached prefix and the
    /// chunks beyond it can be looked up before it is queued.
    pub fn hash_blocks(&self, req: &mut Request) {
        self.bm.update_hashes(&mut req.blocks, &req.tokens);
    }

    /// How many of `req`'s leading blocks the prefix cache holds now.
    pub fn cached_prefix_blocks(&mut self, req: &Request) -> usize {
        self.bm
            .find_cached_prefix(&req.blocks.hashes, req.tokens.len(), &mut self.hits);
        self.hits.len()
    }

    /// [`BlockManager::import_cached`].
    pub fn import_cached(
        &mut self,
        hashes: &[u64],
        parent: Option<u64>,
        tokens: &[u32],
    ) -> Option<Vec<BlockId>> {
        self.bm.import_cached(hashes, parent, tokens)
    }

    /// `n` fresh blocks for a request's own use (reference count 1), for KV written from
    /// outside before it is queued (P/D decode); `None` when fewer than `n` plus
    /// `headroom` are free.
    pub fn allocate_blocks(&mut self, n: usize, headroom: usize) -> Option<Vec<BlockId>> {
        self.bm.allocate_fresh(n, headroom)
    }

    /// Release blocks a finished request held on to ([`Request::hold_blocks`]).
    pub fn free_blocks(&mut self, seq: &mut super::block_manager::SeqBlocks) {
        self.bm.free(seq);
    }

    /// [`BlockManager::forget`].
    pub fn forget_blocks(&mut self, ids: &[BlockId]) {
        self.bm.forget(ids);
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The running queue, in scheduling order (read-only; [`Scheduled::idx`] indexes it).
    pub fn running(&self) -> &[Request] {
        &self.running
    }

    /// The waiting queue, front first (read-only).
    pub fn waiting(&self) -> &VecDeque<Request> {
        &self.waiting
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The KV block manager (read-only: blocks change only through scheduling).
    pub fn block_manager(&self) -> &BlockManager {
        &self.bm
    }

    /// Fraction of KV blocks in use.
    pub fn kv_usage(&self) -> f64 {
        self.bm.usage()
    }

    /// Record the block manager's KV-cache events from now on.
    pub fn enable_kv_events(&mut self) {
        self.bm.enable_events();
    }

    /// The KV-cache events since the last call (empty unless enabled).
    pub fn drain_kv_events(&mut self) -> Vec<CacheEvent> {
        self.bm.drain_events()
    }

    /// Drop every cached prefix; false (and nothing done) while any block is in use.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.bm.reset_prefix_cache()
    }

    /// Could this many tokens ever fit the KV cache on their own?
    pub fn fits_ever(&self, num_tokens: usize) -> bool {
        self.bm.blocks_for(num_tokens) <= self.bm.num_blocks()
    }

    /// What the backend needs to run the step `scheduled` describes.
    pub fn seq_steps(&self, scheduled: &[Scheduled]) -> Vec<SeqStep<'_>> {
        scheduled
            .iter()
            .map(|s| {
                let r = &self.running[s.idx];
                SeqStep {
                    req_id: r.id,
                    tokens: &r.tokens,
                    num_prompt: r.num_prompt,
                    num_computed: r.num_computed,
                    num_new: s.num_new,
                    block_ids: &r.blocks.ids,
                    sample: r.num_computed + s.num_new == r.tokens.len(),
                    params: &r.params,
                    rng_seed: r.rng_seed,
                    lora: r.lora.as_deref(),
                }
            })
            .collect()
    }

    /// Remove a request wherever it is, freeing its blocks.
    pub fn abort(&mut self, id: u64) -> Option<Request> {
        let mut req = if let Some(pos) = self.running.iter().position(|r| r.id == id) {
            self.running.remove(pos)
        } else if let Some(pos) = self.waiting.iter().position(|r| r.id == id) {
            self.waiting.remove(pos)?
        } else {
            return None;
        };
        self.bm.free(&mut req.blocks);
        Some(req)
    }

    /// The step planned in `scheduled` failed: take the blocks it would have computed
    /// back out of the prefix cache (they were registered when scheduled).
    pub fn uncache_uncomputed(&mut self, scheduled: &[Scheduled]) {
        let bs = self.bm.block_size();
        for s in scheduled {
            if let Some(req) = self.running.get_mut(s.idx) {
                self.bm.uncache_from(&mut req.blocks, req.num_computed / bs);
            }
        }
    }

    /// The step planned in `scheduled` failed: uncache what it would have computed and
    /// remove its requests (their blocks freed), returned in the plan's order.
    pub fn fail_step(&mut self, scheduled: &[Scheduled]) -> Vec<Request> {
        self.uncache_uncomputed(scheduled);
        let ids: Vec<u64> = scheduled.iter().map(|s| self.running[s.idx].id).collect();
        ids.into_iter().filter_map(|id| self.abort(id)).collect()
    }

    /// Plan one step into `out`.
    pub fn schedule(&mut self, out: &mut Vec<Scheduled>, stats: &mut StepStats) {
        out.clear();
        let now = crate::clock::now();
        let mut budget = self.config.max_num_batched_tokens;
        let mut preempted = false;

        let mut i = 0;
        'running: while i < self.running.len() && budget > 0 {
            let num_new = self.running[i].num_pending().min(budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            loop {
                let req = &mut self.running[i];
                let target = req.num_computed + num_new;
                if self.bm.allocate(&mut req.blocks, &[], target) {
                    break;
                }
                // Out of blocks: preempt the lowest-priority (last) running request.
                let Some(mut victim) = self.running.pop() else {
                    break 'running;
                };
                self.bm.free(&mut victim.blocks);
                victim.num_computed = 0;
                victim.num_preemptions += 1;
                stats.preemptions += 1;
                preempted = true;
                let was_self = self.running.len() == i;
                self.waiting.push_front(victim);
                if was_self {
                    break 'running;
                }
            }
            // Cached as soon as scheduled (as vLLM does): a request scheduled later in
            // this same step may reuse these blocks, because the forward pass writes every
            // row's keys and values of a layer before any row attends.
            let req = &mut self.running[i];
            self.bm
                .cache_full_blocks(&mut req.blocks, &req.tokens, req.num_computed + num_new);
            out.push(Scheduled { idx: i, num_new });
            budget -= num_new;
            i += 1;
        }

        if preempted {
            return;
        }
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(pick) = self.next_admissible() else {
                break;
            };
            let Some(req) = self.waiting.get_mut(pick) else {
                break;
            };
            let num_computed = if req.num_computed == 0 {
                self.bm
                    .find_cached_prefix(&req.blocks.hashes, req.tokens.len(), &mut self.hits);
                self.hits.len() * self.bm.block_size()
            } else {
                // Admitted with blocks already written (P/D decode: the prompt's KV
                // pulled from the prefill engine): start where that stops.
                self.hits.clear();
                req.num_computed
            };
            let num_new = (req.tokens.len() - num_computed).min(budget);
            if !self
                .bm
                .allocate(&mut req.blocks, &self.hits, num_computed + num_new)
            {
                break;
            }
            let Some(mut req) = self.waiting.remove(pick) else {
                break;
            };
            req.num_computed = num_computed;
            if req.first_scheduled.is_none() {
                req.first_scheduled = Some(now);
                req.cached_tokens = num_computed;
                stats.prefix_queries += req.tokens.len() as u64;
                if req.external_tokens > 0 {
                    stats.external_hits += num_computed as u64;
                } else {
                    stats.prefix_hits += num_computed as u64;
                }
            }
            self.bm
                .cache_full_blocks(&mut req.blocks, &req.tokens, num_computed + num_new);
            self.running.push(req);
            out.push(Scheduled {
                idx: self.running.len() - 1,
                num_new,
            });
            budget -= num_new;
        }
    }

    /// Apply a step's results: advance each scheduled request, append and send sampled
    /// tokens (`sampled[k]` for the k-th scheduled request that reached its end), record
    /// token timings in `stats`, and move finished requests into `finished`. A request
    /// whose receiver is gone is finished as aborted. `eos` are the tokenizer's end tokens.
    pub fn update(
        &mut self,
        scheduled: &[Scheduled],
        sampled: &[u32],
        logprobs: &mut [Option<Box<TokenLogprobs>>],
        eos: &[u32],
        stats: &mut StepStats,
        finished: &mut Vec<Finished>,
    ) {
        let now = crate::clock::now();
        let mut k = 0;
        let mut done: Vec<(usize, FinishReason, Option<u32>)> = Vec::new();
        for s in scheduled {
            let req = &mut self.running[s.idx];
            let was_decode = req.num_computed >= req.num_prompt && s.num_new == 1;
            if was_decode {
                stats.decode_seqs += 1;
            } else {
                stats.prefill_tokens += s.num_new as u64;
            }
            req.num_computed += s.num_new;
            self.bm
                .cache_full_blocks(&mut req.blocks, &req.tokens, req.num_computed);
            if req.num_computed < req.tokens.len() {
                continue;
            }
            let Some(&tok) = sampled.get(k) else { continue };
            let lp = logprobs.get_mut(k).and_then(Option::take);
            k += 1;
            req.tokens.push(tok);
            match req.last_token_at {
                None => stats
                    .ttft
                    .push(now.duration_since(req.arrival).as_secs_f64()),
                Some(t) => stats.itl.push(now.duration_since(t).as_secs_f64()),
            }
            req.last_token_at = Some(now);
            stats.generated += 1;
            let n_out = req.num_output();
            let p = &req.params;
            let reason = if n_out >= p.min_tokens && !p.ignore_eos && eos.contains(&tok) {
                Some((FinishReason::Stop, None))
            } else if n_out >= p.min_tokens && p.stop_token_ids.contains(&tok) {
                Some((FinishReason::Stop, Some(tok)))
            } else if n_out >= p.max_tokens || req.tokens.len() >= self.config.max_model_len {
                Some((FinishReason::Length, None))
            } else {
                None
            };
            let finish = reason.map(|(reason, stop_token)| Finish {
                reason,
                stop_token,
                cached_tokens: req.cached_tokens as u32,
            });
            if req
                .events
                .send(EngineEvent::Token {
                    id: tok,
                    finish,
                    logprobs: lp,
                })
                .is_err()
            {
                // The receiver is gone: the client left.
                done.push((s.idx, FinishReason::Abort, None));
            } else if let Some((r, stop_tok)) = reason {
                done.push((s.idx, r, stop_tok));
            }
        }
        // Remove from the back so indices stay valid; the rest keep their FCFS order.
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (idx, reason, stop_token) in done {
            let mut request = self.running.remove(idx);
            if !(request.hold_blocks && reason != FinishReason::Abort) {
                self.bm.free(&mut request.blocks);
            }
            finished.push(Finished {
                request,
                reason,
                stop_token,
            });
        }
    }
}
