//! The HTTP side of P/D disaggregation (vLLM's NixlConnector contract; see
//! [`crate::kv_offload::pd`]): a request's `kv_transfer_params` checked (400 naming the
//! field), a prefill's lease asked for, a decode's KV pulled from the prefill engine's
//! side channel here, in the handler's task (never on the loop thread), and the lease
//! turned into the response's `kv_transfer_params`.

use std::time::Instant;

use protocol::ApiError;
use tokio::sync::oneshot;

use crate::assembly::Engine;
use crate::core::KvTransfer;
use crate::kv_offload::pd::{self, TransferParams};

/// What a request does in P/D.
#[derive(Default)]
pub(super) struct Plan {
    /// Goes to the loop with the (first) choice.
    pub(super) transfer: Option<KvTransfer>,
    /// Prefill: the lease token, and where the loop answers the leased block ids.
    lease: Option<(String, oneshot::Receiver<Option<Vec<u32>>>)>,
    num_prompt: usize,
}

/// Check `kv_transfer_params` and prepare the request's part: a lease (prefill, one
/// non-streamed choice), or the pulled KV (decode). A failed pull recomputes, or with
/// `kv_load_failure_policy: fail` is an error.
pub(super) async fn plan(
    engine: &Engine,
    params: Option<&serde_json::Value>,
    prompt: &[u32],
    n: usize,
    stream: bool,
) -> Result<Plan, ApiError> {
    let parsed = pd::parse_params(params)
        .map_err(|m| ApiError::bad_request(m, Some("kv_transfer_params")))?;
    let Some((cfg, metrics)) = &engine.pd else {
        // As vLLM without a connector: the parameters are ignored.
        return Ok(Plan::default());
    };
    let none = Plan {
        num_prompt: prompt.len(),
        ..Plan::default()
    };
    match parsed {
        TransferParams::None => Ok(none),
        TransferParams::RemoteDecode => {
            if !cfg.produces || n != 1 || stream {
                return Ok(none);
            }
            let token = pd::new_token();
            let (reply, rx) = oneshot::channel();
            Ok(Plan {
                transfer: Some(KvTransfer::Lease {
                    token: token.clone(),
                    reply,
                }),
                lease: Some((token, rx)),
                num_prompt: prompt.len(),
            })
        }
        TransferParams::RemotePrefill(remote) => {
            if !cfg.consumes || prompt.len() < 2 {
                return Ok(none);
            }
            let expected = pd::Expected {
                layout: cfg.layout,
                block_size: cfg.block_size,
                num_tokens: prompt.len(),
                prompt_hash: pd::prompt_hash(prompt),
                modelled: cfg.modelled.is_some(),
            };
            let started = Instant::now();
            match pd::pull(&remote, &expected, cfg.pull_timeout).await {
                Ok((h, data)) => {
                    if let (Some(net), Some(bytes)) = (cfg.modelled, h.payload_bytes()) {
                        // The sim: this request waits what the transfer would take,
                        // the engine's steps do not (NIXL's reads are asynchronous).
                        let rest = net.pull_time(bytes).saturating_sub(started.elapsed());
                        tokio::time::sleep(rest).await;
                        metrics.pulled_bytes.add(bytes as u64);
                    } else {
                        metrics.pulled_bytes.add(data.len() as u64);
                    }
                    let elapsed = started.elapsed();
                    metrics.pull_seconds.observe(elapsed.as_secs_f64());
                    Ok(Plan {
                        transfer: Some(KvTransfer::Import {
                            data,
                            chunk_tokens: h.num_blocks * h.block_size,
                            elapsed,
                            fail_on_error: cfg.fail_on_error,
                        }),
                        ..none
                    })
                }
                Err(e) => {
                    metrics.load_failures.inc();
                    if cfg.fail_on_error {
                        tracing::warn!(error = %e, host = %remote.host, port = remote.port, "KV pull from the prefill engine failed (kv_load_failure_policy: fail)");
                        return Err(ApiError::internal(format!(
                            "KV transfer from the prefill engine failed: {e} (kv_load_failure_policy: fail)"
                        )));
                    }
                    tracing::warn!(error = %e, host = %remote.host, port = remote.port, "KV pull from the prefill engine failed; recomputing the prompt");
                    Ok(none)
                }
            }
        }
    }
}

impl Plan {
    /// After the request finished: the response's `kv_transfer_params` (a prefill's
    /// lease), `None` when there is none.
    pub(super) async fn response_params(&mut self, engine: &Engine) -> Option<serde_json::Value> {
        let (token, rx) = self.lease.take()?;
        let ids = rx.await.ok().flatten()?;
        let (cfg, _) = engine.pd.as_ref()?;
        Some(pd::response_params(cfg, &ids, &token, self.num_prompt))
    }
}
