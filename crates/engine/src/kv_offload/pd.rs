//! Prefill/decode disaggregation as vLLM's NixlConnector contract has it
//! (`--kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'`).
//!
//! - **Prefill** (a request with `kv_transfer_params.do_remote_decode: true`): the
//!   engine computes the prompt and its one token as usual, but when the request ends its
//!   prompt's blocks stay pinned under a [`Lease`] (an unguessable 128-bit token, a
//!   deadline: `kv_lease_duration`, else `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`, else 30 s as vLLM 0.32),
//!   and the response's `kv_transfer_params` names them (`remote_block_ids`,
//!   `remote_engine_id`, `remote_host`/`remote_port` of the side channel,
//!   `remote_request_id` = the token).
//! - **Decode** (`do_remote_prefill: true` with those fields): the HTTP handler's task
//!   pulls the blocks over the side channel ([`pull`], bounded by a timeout and by the
//!   size this prompt's blocks must have), checks the payload's layout, token count and
//!   prompt hash against its own tokenization, and hands it to the loop with the request
//!   ([`crate::core::KvTransfer::Import`]); the loop writes it into fresh blocks and
//!   computes only the last prompt token (for its logits, as vLLM does).
//! - **Side channel** ([`serve`]): a TCP listener answering one read per connection. The
//!   loop owns the KV: a read becomes `EngineCommand::KvRead`, the loop checks the token
//!   (constant time) and the block ids against its leases, copies the blocks out
//!   (`Backend::export_kv`: real KV on gguf, zeros of the real size on sim) and releases
//!   the lease. Anything else is refused and gets no data.
//!
//! Wire format (big-endian): a read is `"SYKV" u32 len` + JSON [`ReadRequest`] (≤ 64 KiB);
//! the answer is `"SYKV" u8 status u32 len` + JSON (status 0: [`PayloadHeader`], then
//! `u64 len` + the KV bytes; else `{"error": ...}`).
//!
//! Leases are bounded: at most half the KV pool is ever leased (a new lease past that
//! releases the oldest first), expired leases are released whenever the loop runs (at
//! least once a second while any exist), and when a waiting request cannot be admitted
//! the oldest lease is released for it: leases never starve the pool.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use protocol::prom::{Counter, Gauge, Histogram, TextWriter};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::core::block_manager::SeqBlocks;
use crate::core::step::KvLayout;

pub const MAGIC: &[u8; 4] = b"SYKV";
/// Largest read request (its block ids) accepted.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Largest answer header accepted.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// The payload layout (LMCache's `KV_2LTD`, as the offload tiers' chunks).
pub const KV_FORMAT: &str = "KV_2LTD";
/// Block ids above this are absurd (no pool is that large).
pub const MAX_BLOCK_ID: u64 = 1 << 31;

/// This engine's P/D settings (the side channel's bound address included).
#[derive(Debug, Clone)]
pub struct PdConfig {
    /// A UUID made at start (`remote_engine_id`).
    pub engine_id: String,
    /// `VLLM_NIXL_SIDE_CHANNEL_HOST`, advertised as `remote_host`.
    pub host: String,
    /// The bound side-channel port, advertised as `remote_port`.
    pub port: u16,
    pub lease: Duration,
    pub fail_on_error: bool,
    /// `kv_producer`/`kv_both`: leases prompts for decode engines.
    pub produces: bool,
    /// `kv_consumer`/`kv_both`: pulls prompts from prefill engines.
    pub consumes: bool,
    pub layout: KvLayout,
    pub block_size: usize,
    /// Time a pull may take (connect, read, payload).
    pub pull_timeout: Duration,
    /// The sim's modelled network: payloads are not sent (the header names the bytes a
    /// real model would move) and a pull waits the modelled time.
    pub modelled: Option<crate::backend::NetworkModel>,
}

/// P/D metrics (rendered with the engine's).
#[derive(Debug)]
pub struct PdMetrics {
    pub pulled_bytes: Counter,
    pub served_bytes: Counter,
    pub pull_seconds: Histogram,
    pub leases: Gauge,
    pub leased_blocks: Gauge,
    pub expired: Counter,
    pub evicted: Counter,
    pub load_failures: Counter,
    pub refused: Counter,
}

const PULL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Default for PdMetrics {
    fn default() -> Self {
        PdMetrics {
            pulled_bytes: Counter::default(),
            served_bytes: Counter::default(),
            pull_seconds: Histogram::new(PULL_BUCKETS),
            leases: Gauge::default(),
            leased_blocks: Gauge::default(),
            expired: Counter::default(),
            evicted: Counter::default(),
            load_failures: Counter::default(),
            refused: Counter::default(),
        }
    }
}

impl PdMetrics {
    pub fn render(&self, w: &mut TextWriter, labels: &[(&str, &str)]) {
        let one = |w: &mut TextWriter, name: &str, kind: &str, help: &str, v: f64| {
            w.header(name, kind, help);
            w.sample(name, labels, v);
        };
        one(
            w,
            "switchyard:kv_transfer_pulled_bytes_total",
            "counter",
            "KV bytes pulled from prefill engines (P/D decode).",
            self.pulled_bytes.get() as f64,
        );
        one(
            w,
            "switchyard:kv_transfer_served_bytes_total",
            "counter",
            "KV bytes served to decode engines over the side channel (P/D prefill).",
            self.served_bytes.get() as f64,
        );
        one(
            w,
            "switchyard:kv_transfer_leases",
            "gauge",
            "Finished prompts whose blocks are held for a decode engine.",
            self.leases.get(),
        );
        one(
            w,
            "switchyard:kv_transfer_leased_blocks",
            "gauge",
            "KV blocks held by leases.",
            self.leased_blocks.get(),
        );
        one(
            w,
            "switchyard:kv_transfer_expired_leases_total",
            "counter",
            "Leases released unread because their time ran out.",
            self.expired.get() as f64,
        );
        one(
            w,
            "switchyard:kv_transfer_evicted_leases_total",
            "counter",
            "Leases released unread because the KV pool needed their blocks.",
            self.evicted.get() as f64,
        );
        one(
            w,
            "switchyard:kv_transfer_load_failures_total",
            "counter",
            "Pulls of a prefill engine's KV that failed (the prompt was recomputed or the request failed).",
            self.load_failures.get() as f64,
        );
        one(
            w,
            "switchyard:kv_transfer_refused_reads_total",
            "counter",
            "Side-channel reads refused (unknown or wrong token, other blocks, bad frame).",
            self.refused.get() as f64,
        );
        w.header(
            "switchyard:kv_transfer_pull_seconds",
            "histogram",
            "Time to pull one request's KV from its prefill engine.",
        );
        w.histogram(
            "switchyard:kv_transfer_pull_seconds",
            labels,
            &self.pull_seconds,
        );
    }
}

// ---------------------------------------------------------------------------------------
// kv_transfer_params

/// Where a decode engine pulls a prompt's KV from.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteKv {
    pub engine_id: String,
    pub host: String,
    pub port: u16,
    pub block_ids: Vec<u32>,
    pub token: String,
}

/// What a request's `kv_transfer_params` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum TransferParams {
    None,
    /// Prefill for a remote decode: lease the prompt's blocks.
    RemoteDecode,
    /// Decode of a remote prefill: pull these blocks.
    RemotePrefill(RemoteKv),
}

/// Parse and check `kv_transfer_params` (absent or `null`: none). Wrong types, negative
/// or absurd block ids, missing fields where `do_remote_prefill` needs them: an error
/// message (the API answers 400 naming `kv_transfer_params`).
pub fn parse_params(v: Option<&serde_json::Value>) -> Result<TransferParams, String> {
    use serde_json::Value;
    let obj = match v {
        None | Some(Value::Null) => return Ok(TransferParams::None),
        Some(Value::Object(o)) => o,
        Some(_) => return Err("kv_transfer_params must be an object".into()),
    };
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let flag = |k: &str| -> Result<bool, String> {
        match get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(format!("kv_transfer_params.{k} must be a boolean")),
        }
    };
    let string = |k: &str| -> Result<Option<String>, String> {
        match get(k) {
            None => Ok(None),
            Some(Value::String(s)) if s.len() <= 1024 => Ok(Some(s.clone())),
            Some(_) => Err(format!(
                "kv_transfer_params.{k} must be a string (at most 1024 bytes)"
            )),
        }
    };
    let decode = flag("do_remote_decode")?;
    let prefill = flag("do_remote_prefill")?;
    let engine_id = string("remote_engine_id")?;
    let host = string("remote_host")?;
    let token = string("remote_request_id")?;
    let port = match get("remote_port") {
        None => None,
        Some(p) => match p.as_u64() {
            Some(p) if (1..=65535).contains(&p) => Some(p as u16),
            _ => {
                return Err("kv_transfer_params.remote_port must be an integer in 1..=65535".into())
            }
        },
    };
    if let Some(t) = get("tp_size") {
        if t.as_u64().is_none_or(|t| t < 1) {
            return Err("kv_transfer_params.tp_size must be a positive integer".into());
        }
    }
    let block_ids = match get("remote_block_ids") {
        None => None,
        Some(Value::Array(a)) => {
            if a.len() > 1 << 20 {
                return Err("kv_transfer_params.remote_block_ids is too long".into());
            }
            let mut ids = Vec::with_capacity(a.len());
            for x in a {
                match x.as_u64() {
                    Some(id) if id < MAX_BLOCK_ID => ids.push(id as u32),
                    _ => {
                        return Err(format!(
                            "kv_transfer_params.remote_block_ids must hold block ids (integers in 0..{MAX_BLOCK_ID}), not {x}"
                        ))
                    }
                }
            }
            Some(ids)
        }
        Some(_) => return Err("kv_transfer_params.remote_block_ids must be a list".into()),
    };
    if decode && prefill {
        return Err(
            "kv_transfer_params: do_remote_decode and do_remote_prefill cannot both be true".into(),
        );
    }
    if prefill {
        let missing =
            |k: &str| format!("kv_transfer_params.{k} is required with do_remote_prefill");
        let remote = RemoteKv {
            engine_id: engine_id.ok_or_else(|| missing("remote_engine_id"))?,
            host: host.ok_or_else(|| missing("remote_host"))?,
            port: port.ok_or_else(|| missing("remote_port"))?,
            block_ids: block_ids.ok_or_else(|| missing("remote_block_ids"))?,
            token: token.ok_or_else(|| missing("remote_request_id"))?,
        };
        if remote.block_ids.is_empty() {
            return Err("kv_transfer_params.remote_block_ids is empty".into());
        }
        return Ok(TransferParams::RemotePrefill(remote));
    }
    Ok(if decode {
        TransferParams::RemoteDecode
    } else {
        TransferParams::None
    })
}

/// The `kv_transfer_params` a prefill engine answers with (vLLM's `request_finished`
/// fields, plus `remote_num_tokens`).
pub fn response_params(
    cfg: &PdConfig,
    block_ids: &[u32],
    token: &str,
    num_tokens: usize,
) -> serde_json::Value {
    serde_json::json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": block_ids,
        "remote_engine_id": cfg.engine_id,
        "remote_request_id": token,
        "remote_host": cfg.host,
        "remote_port": cfg.port,
        "tp_size": 1,
        "remote_num_tokens": num_tokens,
    })
}

/// 16 random bytes from the OS.
pub fn random_bytes() -> [u8; 16] {
    use std::io::Read;
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        // No /dev/urandom: mix what varies (never expected on Linux).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let a = kv_events::hash::mix64(t as u64 ^ u64::from(std::process::id()));
        let c = kv_events::hash::mix64(a ^ (t >> 64) as u64 ^ (&b as *const _ as u64));
        b[..8].copy_from_slice(&a.to_le_bytes());
        b[8..].copy_from_slice(&c.to_le_bytes());
    }
    b
}

/// A lease token: 128 random bits, hex.
pub fn new_token() -> String {
    random_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A random (version 4) UUID, for the engine id.
pub fn new_uuid() -> String {
    let mut b = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Equality whose time depends only on the lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The hash a payload names its prompt by (and the decode engine checks).
pub fn prompt_hash(tokens: &[u32]) -> String {
    format!("{:016x}", kv_events::hash::tokens_hash(tokens))
}

// ---------------------------------------------------------------------------------------
// Leases

/// A finished prompt's blocks, held for a decode engine.
#[derive(Debug)]
pub struct Lease {
    pub token: String,
    /// The blocks (the request's own reference on each).
    pub blocks: SeqBlocks,
    pub num_tokens: usize,
    pub prompt_hash: String,
    pub deadline: Instant,
}

/// Why a read got nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No live lease has that token and those blocks (never said which).
    NoSuchLease,
}

/// The leases of one engine, oldest first, bounded in blocks.
#[derive(Debug)]
pub struct Leases {
    list: VecDeque<Lease>,
    blocks: usize,
    max_blocks: usize,
}

impl Leases {
    pub fn new(max_blocks: usize) -> Self {
        Leases {
            list: VecDeque::new(),
            blocks: 0,
            max_blocks,
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Blocks held by all leases.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Add a lease; the leases it pushed out (oldest first) to stay within the bound,
    /// for the caller to release. A lease larger than the bound on its own is refused
    /// (returned as the last element, its blocks to release too).
    pub fn insert(&mut self, lease: Lease) -> Vec<Lease> {
        let n = lease.blocks.ids.len();
        if n > self.max_blocks {
            return vec![lease];
        }
        let mut out = Vec::new();
        while self.blocks + n > self.max_blocks {
            match self.pop_oldest() {
                Some(l) => out.push(l),
                None => break,
            }
        }
        self.blocks += n;
        self.list.push_back(lease);
        out
    }

    /// The lease with this token and exactly these blocks, taken out (the caller reads
    /// and releases it). Every lease's token is compared, in constant time each.
    pub fn take(&mut self, token: &str, block_ids: &[u32], now: Instant) -> Result<Lease, Refusal> {
        let mut found = None;
        for (i, l) in self.list.iter().enumerate() {
            let ok = ct_eq(l.token.as_bytes(), token.as_bytes());
            if ok && found.is_none() {
                found = Some(i);
            }
        }
        let i = found.ok_or(Refusal::NoSuchLease)?;
        let l = &self.list[i];
        if l.blocks.ids != block_ids || l.deadline <= now {
            return Err(Refusal::NoSuchLease);
        }
        let l = self.list.remove(i).ok_or(Refusal::NoSuchLease)?;
        self.blocks -= l.blocks.ids.len();
        Ok(l)
    }

    /// Leases whose deadline passed, taken out.
    pub fn expire(&mut self, now: Instant) -> Vec<Lease> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.list.len() {
            if self.list[i].deadline <= now {
                if let Some(l) = self.list.remove(i) {
                    self.blocks -= l.blocks.ids.len();
                    out.push(l);
                }
            } else {
                i += 1;
            }
        }
        out
    }

    /// The oldest lease, taken out.
    pub fn pop_oldest(&mut self) -> Option<Lease> {
        let l = self.list.pop_front()?;
        self.blocks -= l.blocks.ids.len();
        Some(l)
    }
}

// ---------------------------------------------------------------------------------------
// Side channel

/// A decode engine's read of a lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadRequest {
    pub remote_request_id: String,
    pub block_ids: Vec<u32>,
    pub engine_id: String,
}

/// What a served payload is: its layout and the prompt it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PayloadHeader {
    pub engine_id: String,
    /// Always [`KV_FORMAT`]: `[2][layers][tokens][width]`, as LMCache's chunks.
    pub format: String,
    pub layers: usize,
    pub width: usize,
    pub elem_bytes: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub num_tokens: usize,
    pub prompt_hash: String,
    /// The KV is modelled (sim): no payload follows; `payload_bytes` is what a real
    /// model would have moved.
    #[serde(default)]
    pub modelled: bool,
}

impl PayloadHeader {
    /// Bytes on the wire after the header: the payload, or none when modelled.
    pub fn wire_bytes(&self) -> Option<usize> {
        if self.modelled {
            Some(0)
        } else {
            self.payload_bytes()
        }
    }

    pub fn layout(&self) -> KvLayout {
        KvLayout {
            layers: self.layers,
            width: self.width,
            elem_bytes: self.elem_bytes,
        }
    }

    /// Payload bytes this header implies (`None` on overflow).
    pub fn payload_bytes(&self) -> Option<usize> {
        self.num_blocks
            .checked_mul(self.block_size)?
            .checked_mul(self.layout().bytes_per_token())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("side channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("side channel: bad frame: {0}")]
    Frame(String),
    #[error("prefill engine refused the read: {0}")]
    Refused(String),
}

async fn read_len_json<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<T, WireError> {
    let len = r.read_u32().await? as usize;
    if len > max {
        return Err(WireError::Frame(format!(
            "{len} bytes of JSON (at most {max})"
        )));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    serde_json::from_slice(&buf).map_err(|e| WireError::Frame(e.to_string()))
}

async fn read_magic<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), WireError> {
    let mut m = [0u8; 4];
    r.read_exact(&mut m).await?;
    if &m != MAGIC {
        return Err(WireError::Frame("not a Switchyard KV side channel".into()));
    }
    Ok(())
}

pub async fn write_request<W: AsyncWrite + Unpin>(
    w: &mut W,
    req: &ReadRequest,
) -> Result<(), WireError> {
    let body = serde_json::to_vec(req).map_err(|e| WireError::Frame(e.to_string()))?;
    if body.len() > MAX_REQUEST_BYTES {
        return Err(WireError::Frame("read request too large".into()));
    }
    let mut buf = Vec::with_capacity(8 + body.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<ReadRequest, WireError> {
    read_magic(r).await?;
    read_len_json(r, MAX_REQUEST_BYTES).await
}

/// Write an answer: the payload, or a refusal.
pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    answer: Result<(&PayloadHeader, &[u8]), &str>,
) -> Result<(), WireError> {
    let (status, head) = match &answer {
        Ok((h, _)) => (0u8, serde_json::to_vec(h)),
        Err(e) => (1u8, serde_json::to_vec(&serde_json::json!({ "error": e }))),
    };
    let head = head.map_err(|e| WireError::Frame(e.to_string()))?;
    let mut buf = Vec::with_capacity(17 + head.len());
    buf.extend_from_slice(MAGIC);
    buf.push(status);
    buf.extend_from_slice(&(head.len() as u32).to_be_bytes());
    buf.extend_from_slice(&head);
    if let Ok((_, data)) = &answer {
        buf.extend_from_slice(&(data.len() as u64).to_be_bytes());
    }
    w.write_all(&buf).await?;
    if let Ok((_, data)) = answer {
        w.write_all(data).await?;
    }
    w.flush().await?;
    Ok(())
}

/// Read an answer. `check` sees the header before the payload is read, and gives the
/// payload size it must have (at most what the caller can take); a header it refuses,
/// a different announced size, or a short payload is an error.
pub async fn read_response<R, F>(r: &mut R, check: F) -> Result<(PayloadHeader, Vec<u8>), WireError>
where
    R: AsyncRead + Unpin,
    F: FnOnce(&PayloadHeader) -> Result<usize, String>,
{
    read_magic(r).await?;
    let status = r.read_u8().await?;
    if status != 0 {
        #[derive(Deserialize)]
        struct Refusal {
            error: String,
        }
        let e: Refusal = read_len_json(r, MAX_HEADER_BYTES).await?;
        return Err(WireError::Refused(e.error));
    }
    let header: PayloadHeader = read_len_json(r, MAX_HEADER_BYTES).await?;
    let want = check(&header).map_err(WireError::Frame)?;
    let len = r.read_u64().await?;
    if len != want as u64 {
        return Err(WireError::Frame(format!(
            "payload of {len} bytes announced, {want} expected"
        )));
    }
    let mut data = vec![0u8; want];
    r.read_exact(&mut data).await?;
    Ok((header, data))
}

/// What the decode engine expects of a payload.
#[derive(Debug, Clone)]
pub struct Expected {
    pub layout: KvLayout,
    pub block_size: usize,
    pub num_tokens: usize,
    pub prompt_hash: String,
    /// This engine's KV is modelled (sim): only modelled payloads fit, and real ones only
    /// a real engine.
    pub modelled: bool,
}

impl Expected {
    /// The payload size a header must imply, or why it does not fit this prompt.
    pub fn check(&self, remote: &RemoteKv, h: &PayloadHeader) -> Result<usize, String> {
        if h.engine_id != remote.engine_id {
            return Err("the payload comes from another engine".into());
        }
        if h.format != KV_FORMAT || h.layout() != self.layout {
            return Err(format!(
                "KV layout {:?} is not this engine's {:?}",
                h.layout(),
                self.layout
            ));
        }
        if h.block_size != self.block_size {
            return Err(format!(
                "block size {} is not this engine's {}",
                h.block_size, self.block_size
            ));
        }
        if h.num_tokens != self.num_tokens || h.prompt_hash != self.prompt_hash {
            return Err("the payload holds another prompt".into());
        }
        if h.num_blocks != remote.block_ids.len()
            || h.num_blocks != self.num_tokens.div_ceil(self.block_size)
        {
            return Err("the payload's block count does not fit the prompt".into());
        }
        if h.modelled != self.modelled {
            return Err("modelled (sim) and real KV do not mix".into());
        }
        h.payload_bytes()
            .ok_or_else(|| "payload size overflows".to_string())?;
        h.wire_bytes()
            .ok_or_else(|| "payload size overflows".into())
    }
}

/// Pull a lease's blocks from the prefill engine's side channel, within `timeout`.
pub async fn pull(
    remote: &RemoteKv,
    expected: &Expected,
    timeout: Duration,
) -> Result<(PayloadHeader, Vec<u8>), WireError> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect((remote.host.as_str(), remote.port)).await?;
        let _ = s.set_nodelay(true);
        write_request(
            &mut s,
            &ReadRequest {
                remote_request_id: remote.token.clone(),
                block_ids: remote.block_ids.clone(),
                engine_id: remote.engine_id.clone(),
            },
        )
        .await?;
        let (mut rd, _w) = s.split();
        let mut rd = tokio::io::BufReader::with_capacity(1 << 16, &mut rd);
        read_response(&mut rd, |h| expected.check(remote, h)).await
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(WireError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out",
        ))),
    }
}

/// What the loop answers a read with.
pub type ReadAnswer = Result<(PayloadHeader, Vec<u8>), String>;

/// Serve side-channel reads on `listener`: each connection sends one read, `ask` turns
/// it into the loop's answer. At most 16 connections at a time; a read must arrive
/// within 10 s.
pub async fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<PdMetrics>,
    ask: F,
) where
    F: Fn(ReadRequest) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ReadAnswer> + Send,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let ask = ask.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = sock.set_nodelay(true);
            let req = tokio::time::timeout(Duration::from_secs(10), read_request(&mut sock)).await;
            let answer = match req {
                Ok(Ok(req)) => ask(req).await,
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no read request within 10 s".into()),
            };
            let r = match &answer {
                Ok((h, data)) => {
                    // A modelled payload counts the bytes a real model would send.
                    m.served_bytes
                        .add(h.payload_bytes().unwrap_or(data.len()) as u64);
                    write_response(&mut sock, Ok((h, data))).await
                }
                Err(e) => {
                    m.refused.inc();
                    tracing::debug!(error = %e, "KV side channel: read refused");
                    write_response(&mut sock, Err(e)).await
                }
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "KV side channel: answer not sent");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(token: &str, ids: &[u32], deadline: Instant) -> Lease {
        Lease {
            token: token.into(),
            blocks: SeqBlocks {
                ids: ids.to_vec(),
                ..SeqBlocks::default()
            },
            num_tokens: ids.len() * 16,
            prompt_hash: "h".into(),
            deadline,
        }
    }

    #[test]
    fn leases_check_token_and_blocks_expire_and_stay_bounded() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut l = Leases::new(4);
        assert!(l.insert(lease("aa", &[1, 2], later)).is_empty());
        assert!(l
            .insert(lease("bb", &[3], now + Duration::from_millis(1)))
            .is_empty());
        assert_eq!((l.len(), l.blocks()), (2, 3));
        // Wrong token, right blocks; right token, other blocks: nothing, lease kept.
        assert_eq!(
            l.take("ab", &[1, 2], now).unwrap_err(),
            Refusal::NoSuchLease
        );
        assert_eq!(l.take("aa", &[3], now).unwrap_err(), Refusal::NoSuchLease);
        assert_eq!(l.take("aa", &[1], now).unwrap_err(), Refusal::NoSuchLease);
        assert_eq!(l.take("", &[], now).unwrap_err(), Refusal::NoSuchLease);
        assert_eq!(l.len(), 2);
        // Past its deadline a lease serves nothing, and expiry releases it.
        let t = now + Duration::from_millis(2);
        assert!(l.take("bb", &[3], t).is_err());
        let gone = l.expire(t);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].token, "bb");
        assert_eq!((l.len(), l.blocks()), (1, 2));
        // The right token and blocks: taken once (released), then gone.
        let got = l.take("aa", &[1, 2], now).expect("lease");
        assert_eq!(got.blocks.ids, vec![1, 2]);
        assert!(l.take("aa", &[1, 2], now).is_err());
        assert_eq!((l.len(), l.blocks()), (0, 0));
        // The bound: oldest leases go first; one larger than the bound is refused.
        l.insert(lease("a", &[1, 2], later));
        l.insert(lease("b", &[3], later));
        let out = l.insert(lease("c", &[4, 5], later));
        assert_eq!(
            out.iter().map(|l| l.token.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(l.blocks(), 3);
        let out = l.insert(lease("d", &[6, 7, 8, 9, 10], later));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].token, "d");
        assert_eq!(l.blocks(), 3);
        assert_eq!(l.pop_oldest().map(|l| l.token), Some("b".into()));
    }

    #[test]
    fn tokens_are_random_hex_and_compared_whole() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(ct_eq(a.as_bytes(), a.clone().as_bytes()));
        assert!(!ct_eq(a.as_bytes(), b.as_bytes()));
        assert!(!ct_eq(a.as_bytes(), &a.as_bytes()[..31]));
        let u = new_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }

    #[test]
    fn params_are_checked() {
        use serde_json::json;
        assert_eq!(parse_params(None), Ok(TransferParams::None));
        assert_eq!(parse_params(Some(&json!(null))), Ok(TransferParams::None));
        let router_prefill = json!({"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null});
        assert_eq!(
            parse_params(Some(&router_prefill)),
            Ok(TransferParams::RemoteDecode)
        );
        let decode = json!({"do_remote_prefill": true, "do_remote_decode": false,
            "remote_block_ids": [3, 4], "remote_engine_id": "e", "remote_host": "localhost",
            "remote_port": 5600, "tp_size": 1, "remote_request_id": "t"});
        match parse_params(Some(&decode)) {
            Ok(TransferParams::RemotePrefill(r)) => {
                assert_eq!(
                    (r.block_ids, r.port, r.token.as_str()),
                    (vec![3, 4], 5600, "t")
                )
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            json!("x"),
            json!([1]),
            json!({"do_remote_decode": "yes"}),
            json!({"do_remote_prefill": true}),
            json!({"remote_port": 70000}),
            json!({"remote_port": "80"}),
            json!({"remote_block_ids": [-1]}),
            json!({"remote_block_ids": [1.5]}),
            json!({"remote_block_ids": [4294967296u64]}),
            json!({"remote_block_ids": "1,2"}),
            json!({"remote_engine_id": 7}),
            json!({"tp_size": 0}),
            json!({"do_remote_prefill": true, "do_remote_decode": true}),
        ] {
            assert!(parse_params(Some(&bad)).is_err(), "{bad}");
        }
        let mut empty = decode.clone();
        empty["remote_block_ids"] = json!([]);
        assert!(parse_params(Some(&empty)).is_err());
    }

    fn header(num_blocks: usize) -> PayloadHeader {
        PayloadHeader {
            engine_id: "e".into(),
            format: KV_FORMAT.into(),
            layers: 2,
            width: 4,
            elem_bytes: 2,
            block_size: 16,
            num_blocks,
            num_tokens: 20,
            prompt_hash: "h".into(),
            modelled: false,
        }
    }

    fn expected() -> (Expected, RemoteKv) {
        (
            Expected {
                layout: KvLayout {
                    layers: 2,
                    width: 4,
                    elem_bytes: 2,
                },
                block_size: 16,
                num_tokens: 20,
                prompt_hash: "h".into(),
                modelled: false,
            },
            RemoteKv {
                engine_id: "e".into(),
                host: "localhost".into(),
                port: 1,
                block_ids: vec![7, 9],
                token: "t".into(),
            },
        )
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let req = ReadRequest {
            remote_request_id: "t".into(),
            block_ids: vec![7, 9],
            engine_id: "e".into(),
        };
        let mut buf = Vec::new();
        write_request(&mut buf, &req).await.expect("write");
        assert_eq!(read_request(&mut buf.as_slice()).await.expect("read"), req);
        // Truncated anywhere: an error, never a partial request.
        for cut in 0..buf.len() {
            assert!(
                read_request(&mut &buf[..cut]).await.is_err(),
                "cut at {cut}"
            );
        }
        // Oversize: refused before reading (no allocation of the announced length).
        let mut big = MAGIC.to_vec();
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read_request(&mut big.as_slice()).await,
            Err(WireError::Frame(_))
        ));
        assert!(read_request(&mut &b"HTTP/1.1 200"[..]).await.is_err());

        let (exp, remote) = expected();
        let h = header(2);
        let data = vec![5u8; h.payload_bytes().expect("size")];
        let mut out = Vec::new();
        write_response(&mut out, Ok((&h, &data)))
            .await
            .expect("write");
        let (got_h, got) = read_response(&mut out.as_slice(), |h| exp.check(&remote, h))
            .await
            .expect("read");
        assert_eq!((got_h, got), (h.clone(), data.clone()));
        for cut in [0, 5, 20, out.len() - 1] {
            assert!(read_response(&mut &out[..cut], |h| exp.check(&remote, h))
                .await
                .is_err());
        }
        // A payload announced larger than the header implies: refused unread.
        let mut lie = out.clone();
        let at = out.len() - data.len() - 8;
        lie[at..at + 8].copy_from_slice(&(u64::MAX).to_be_bytes());
        assert!(
            read_response(&mut lie.as_slice(), |h| exp.check(&remote, h))
                .await
                .is_err()
        );
        // Headers that do not fit the prompt: another layout, prompt, engine, size.
        let mut other = h.clone();
        other.layers = 3;
        assert!(exp.check(&remote, &other).is_err());
        let mut other = h.clone();
        other.format = "KV_T2D".into();
        assert!(exp.check(&remote, &other).is_err());
        let mut other = h.clone();
        other.prompt_hash = "x".into();
        assert!(exp.check(&remote, &other).is_err());
        let mut other = h.clone();
        other.engine_id = "f".into();
        assert!(exp.check(&remote, &other).is_err());
        assert!(exp.check(&remote, &header(3)).is_err());
        let mut huge = h.clone();
        huge.num_blocks = usize::MAX;
        assert!(exp.check(&remote, &huge).is_err());
        // Modelled (sim) and real KV never mix; a modelled payload has no bytes on the
        // wire and still names the real size.
        let mut m = h.clone();
        m.modelled = true;
        assert!(
            exp.check(&remote, &m).is_err(),
            "a real engine refuses modelled KV"
        );
        let sim = Expected {
            modelled: true,
            ..exp.clone()
        };
        assert!(
            sim.check(&remote, &h).is_err(),
            "a sim engine refuses real KV"
        );
        assert_eq!(sim.check(&remote, &m), Ok(0));
        let mut out = Vec::new();
        write_response(&mut out, Ok((&m, &[])))
            .await
            .expect("write");
        let (got_m, got) = read_response(&mut out.as_slice(), |h| sim.check(&remote, h))
            .await
            .expect("read");
        assert!(got.is_empty() && got_m.payload_bytes() == h.payload_bytes());
        // A refusal reads as one.
        let mut out = Vec::new();
        write_response(&mut out, Err("no")).await.expect("write");
        assert!(matches!(
            read_response(&mut out.as_slice(), |h| exp.check(&remote, h)).await,
            Err(WireError::Refused(e)) if e == "no"
        ));
    }
}
