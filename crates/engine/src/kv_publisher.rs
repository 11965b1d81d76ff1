//! The engine's KV-event publisher: vLLM's `--kv-events-config`, the engine loop's
//! non-blocking sink, and the thread that owns the ZMQ PUB and replay sockets. The wire
//! format itself is the `kv_events` crate's.
//!
//! The engine loop never does I/O here: [`KvEventSink::publish`] is a non-blocking channel
//! send; encoding and sockets live on the publisher's own thread.

use std::collections::VecDeque;
use std::io;

use bytes::Bytes;
use kv_events::{
    encode_batch, BlockRemoved, BlockStored, EventBatch, KvEvent, END_SEQ, MEDIUM_GPU,
};
use rmpv::Value;
use serde::Deserialize;

use crate::core::block_manager::CacheEvent;

// ---------------------------------------------------------------------------------------
// Config

/// vLLM's `KVEventsConfig`, parsed from `--kv-events-config` (same JSON keys and defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct KvEventsConfig {
    pub enable_kv_cache_events: bool,
    /// `"zmq"` or `"null"`; when absent, `"zmq"` if events are enabled, else `"null"`.
    pub publisher: Option<String>,
    /// PUB address: bound when it has a wildcard (`tcp://*:5557`), else connected to.
    pub endpoint: String,
    /// ROUTER address for replay requests (always bound).
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// Accepted for compatibility: the PUB queue per subscriber holds 100,000 messages.
    pub hwm: usize,
    /// Batches waiting to be published at most; past it a batch is dropped and the next one
    /// starts with `AllBlocksCleared`, so consumers never believe in blocks they missed.
    pub max_queue_size: usize,
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        KvEventsConfig {
            enable_kv_cache_events: false,
            publisher: None,
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
        }
    }
}

impl KvEventsConfig {
    /// Parse the flag's JSON (a clap value parser).
    pub fn parse(s: &str) -> Result<Self, String> {
        let c: KvEventsConfig =
            serde_json::from_str(s).map_err(|e| format!("invalid --kv-events-config: {e}"))?;
        match c.publisher.as_deref() {
            None | Some("zmq") | Some("null") => {}
            Some(other) => return Err(format!("Unknown event publisher '{other}'")),
        }
        if c.enabled() && c.buffer_steps == 0 {
            return Err("invalid --kv-events-config: buffer_steps must be positive".into());
        }
        Ok(c)
    }

    /// Whether events are published (vLLM's `EventPublisherFactory.create`).
    pub fn enabled(&self) -> bool {
        let publisher = self
            .publisher
            .as_deref()
            .unwrap_or(if self.enable_kv_cache_events {
                "zmq"
            } else {
                "null"
            });
        self.enable_kv_cache_events && publisher == "zmq"
    }
}

/// Turn the block manager's events into vLLM's: consecutive stores that chain (each block's
/// parent is the block before) become one `BlockStored`; each eviction is one
/// `BlockRemoved` with one hash, as vLLM sends them.
pub fn from_cache_events(
    events: impl IntoIterator<Item = CacheEvent>,
    block_size: usize,
) -> Vec<KvEvent> {
    let mut out: Vec<KvEvent> = Vec::new();
    for ev in events {
        match ev {
            CacheEvent::Stored {
                hash,
                parent,
                tokens,
                lora,
            } => {
                let lora_id = lora.as_ref().map(|a| a.id as i64);
                if let Some(KvEvent::BlockStored(s)) = out.last_mut() {
                    if parent.is_some()
                        && s.block_hashes.last().copied() == parent
                        && s.lora_id == lora_id
                    {
                        s.block_hashes.push(hash);
                        s.token_ids.extend_from_slice(&tokens);
                        if let Some(k) = s.extra_keys.as_mut() {
                            k.push(Value::Nil);
                        }
                        continue;
                    }
                }
                let mut s = BlockStored::new(vec![hash], parent, tokens, block_size);
                if let Some(a) = &lora {
                    s.lora_id = Some(a.id as i64);
                    s.lora_name = Some(a.name.clone());
                }
                out.push(KvEvent::BlockStored(s));
            }
            CacheEvent::Removed { hash } => out.push(KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![hash],
                medium: Some(MEDIUM_GPU.into()),
                group_idx: Some(0),
            })),
            CacheEvent::AllCleared => out.push(KvEvent::AllBlocksCleared),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Publisher

/// Where the publisher's sockets ended up (ports resolved when `:0` was asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherInfo {
    /// The PUB endpoint, e.g. `tcp://0.0.0.0:5557` (as configured when connecting).
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub topic: String,
}

/// The engine loop's end of the publisher: non-blocking.
pub struct KvEventSink {
    tx: tokio::sync::mpsc::Sender<EventBatch>,
    block_size: usize,
    /// A batch was dropped (queue full): the next one starts with `AllBlocksCleared`.
    lost: bool,
    pub dropped: u64,
}

impl KvEventSink {
    /// A sink whose batches go to the returned receiver, in process (`switchyard plan`
    /// feeds them to its router's KV index), at most `capacity` queued.
    pub fn channel(
        block_size: usize,
        capacity: usize,
    ) -> (KvEventSink, tokio::sync::mpsc::Receiver<EventBatch>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        let sink = KvEventSink {
            tx,
            block_size,
            lost: false,
            dropped: 0,
        };
        (sink, rx)
    }

    /// Publish the block manager's events of one step (nothing when there are none).
    pub fn publish(&mut self, events: Vec<CacheEvent>) {
        self.publish_with(events, Vec::new());
    }

    /// [`KvEventSink::publish`], followed in the same batch by `extra` events already in
    /// vLLM's form (the offloading tier's, `medium: "CPU"`).
    pub fn publish_with(&mut self, events: Vec<CacheEvent>, extra: Vec<KvEvent>) {
        if events.is_empty() && extra.is_empty() {
            return;
        }
        let mut evs = from_cache_events(events, self.block_size);
        evs.extend(extra);
        if self.lost {
            evs.insert(0, KvEvent::AllBlocksCleared);
        }
        let batch = EventBatch {
            ts: unix_ts(),
            events: evs,
            data_parallel_rank: Some(0),
        };
        match self.tx.try_send(batch) {
            Ok(()) => self.lost = false,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                self.dropped += 1;
                if !self.lost {
                    tracing::warn!("KV event queue full: dropping batches until it drains");
                }
                self.lost = true;
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

fn unix_ts() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// vLLM binds when the endpoint has a wildcard (or is ipc/inproc), else connects.
fn binds(endpoint: &str) -> bool {
    endpoint.contains('*')
        || endpoint.contains("::")
        || endpoint.starts_with("ipc://")
        || endpoint.starts_with("inproc://")
        // Port 0 only makes sense for a socket that binds (the OS picks the port; the
        // engine advertises the real one at `GET /kv_events`).
        || endpoint.ends_with(":0")
}

/// `tcp://*:P` → `tcp://0.0.0.0:P` (the zeromq crate has no `*` host).
fn bind_address(endpoint: &str) -> String {
    endpoint.replacen("://*:", "://0.0.0.0:", 1)
}

fn io_err(what: &str, endpoint: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("KV events: cannot {what} {endpoint}: {e}"))
}

/// Start the publisher thread for `config` (which must be [`KvEventsConfig::enabled`]):
/// binds its sockets before returning, so a taken port is an error here.
pub fn start_publisher(
    config: &KvEventsConfig,
    block_size: usize,
) -> io::Result<(KvEventSink, PublisherInfo)> {
    let (tx, rx) = tokio::sync::mpsc::channel(config.max_queue_size.max(1));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<PublisherInfo>>();
    let config = config.clone();
    httpx::spawn_runtime_thread("kv-events", publisher_main(config, rx, ready_tx))?;
    let info = ready_rx
        .recv()
        .map_err(|_| io::Error::other("KV events: publisher thread died"))??;
    Ok((
        KvEventSink {
            tx,
            block_size,
            lost: false,
            dropped: 0,
        },
        info,
    ))
}

async fn publisher_main(
    config: KvEventsConfig,
    mut rx: tokio::sync::mpsc::Receiver<EventBatch>,
    ready: std::sync::mpsc::Sender<io::Result<PublisherInfo>>,
) {
    use zeromq::{Socket, SocketSend};

    let mut publisher = zeromq::PubSocket::new();
    let connect_to = if binds(&config.endpoint) {
        let addr = bind_address(&config.endpoint);
        match publisher.bind(&addr).await {
            Ok(_) => None,
            Err(e) => {
                let _ = ready.send(Err(io_err("bind", &config.endpoint, e)));
                return;
            }
        }
    } else {
        Some(config.endpoint.clone())
    };
    let endpoint = match &connect_to {
        Some(e) => e.clone(),
        None => publisher
            .binds()
            .keys()
            .next()
            .map(|e| e.to_string())
            .unwrap_or_else(|| config.endpoint.clone()),
    };
    let mut replay = None;
    let mut replay_endpoint = None;
    if let Some(ep) = &config.replay_endpoint {
        let mut r = zeromq::RouterSocket::new();
        match r.bind(&bind_address(ep)).await {
            Ok(bound) => replay_endpoint = Some(bound.to_string()),
            Err(e) => {
                let _ = ready.send(Err(io_err("bind", ep, e)));
                return;
            }
        }
        replay = Some(r);
    }
    let _ = ready.send(Ok(PublisherInfo {
        endpoint,
        replay_endpoint,
        topic: config.topic.clone(),
    }));
    drop(ready);
    if let Some(ep) = connect_to {
        if let Err(e) = publisher.connect(&ep).await {
            tracing::error!(endpoint = %ep, error = %e, "KV events: cannot connect; not publishing");
        }
    }

    let topic = Bytes::from(config.topic.clone().into_bytes());
    let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::with_capacity(config.buffer_steps.min(1024));
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                let payload = Bytes::from(encode_batch(&batch));
                let seq_bytes = Bytes::copy_from_slice(&seq.to_be_bytes());
                let msg = zeromq::ZmqMessage::try_from(vec![topic.clone(), seq_bytes, payload.clone()])
                    .expect("three frames");
                if let Err(e) = publisher.send(msg).await {
                    tracing::warn!(error = %e, "KV events: publish failed");
                }
                if buffer.len() == config.buffer_steps {
                    buffer.pop_front();
                }
                buffer.push_back((seq, payload));
                seq += 1;
            }
            req = recv_opt(&mut replay) => {
                let (Some(sock), Ok(req)) = (replay.as_mut(), req) else { continue };
                serve_replay(sock, req, &buffer).await;
            }
        }
    }
}

async fn recv_opt(
    sock: &mut Option<zeromq::RouterSocket>,
) -> zeromq::ZmqResult<zeromq::ZmqMessage> {
    use zeromq::SocketRecv;
    match sock {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Answer `[identity, "", start_seq]` with the buffered batches from `start_seq` on, then
/// the end marker, as vLLM's `_service_replay`.
async fn serve_replay(
    sock: &mut zeromq::RouterSocket,
    req: zeromq::ZmqMessage,
    buffer: &VecDeque<(u64, Bytes)>,
) {
    use zeromq::SocketSend;
    let frames = req.into_vec();
    if frames.len() != 3 {
        tracing::warn!(frames = frames.len(), "KV events: invalid replay request");
        return;
    }
    let client = frames[0].clone();
    // Python's int.from_bytes(b, "big"): any length (too large for u128: past the end).
    let start = frames[2]
        .iter()
        .try_fold(0u128, |acc, &b| {
            acc.checked_mul(256)?.checked_add(u128::from(b))
        })
        .unwrap_or(u128::MAX);
    let send = |seq: Bytes, payload: Bytes| {
        zeromq::ZmqMessage::try_from(vec![client.clone(), Bytes::new(), seq, payload])
            .expect("four frames")
    };
    for (seq, payload) in buffer {
        if u128::from(*seq) >= start {
            let m = send(Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone());
            if let Err(e) = sock.send(m).await {
                tracing::warn!(error = %e, "KV events: replay send failed");
                return;
            }
        }
    }
    let _ = sock
        .send(send(Bytes::from_static(&END_SEQ), Bytes::new()))
        .await;
}
