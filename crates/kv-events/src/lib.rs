//! vLLM's KV-cache event wire format and the block hashing the router's index keys on:
//! the contract between an engine that publishes KV events and anyone who follows them.
//! Pure data and codec: no sockets, no threads (the engine's publisher and the router's
//! subscriber do the I/O).
//!
//! Wire format (checked against real vLLM 0.32.0 captures in
//! `tests/fixtures/vllm-reference/kv_events_raw.bin`):
//! - a ZMQ PUB socket sends one 3-frame message per batch: `[topic, seq, payload]`, where
//!   `seq` is an 8-byte big-endian counter starting at 0 and `payload` is msgpack;
//! - the payload is the `EventBatch` as a positional array `[ts, events, data_parallel_rank]`
//!   (`ts` a float64 of Unix seconds);
//! - each event is a msgpack map tagged by `"type"` (msgspec's `tag=True`, `omit_defaults`):
//!   `BlockStored {type, block_hashes, parent_block_hash, token_ids, block_size, lora_id,
//!   medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind}`, `BlockRemoved {type,
//!   block_hashes, medium, group_idx}`, `AllBlocksCleared {type}`. Hashes are uint64.
//! - an optional ROUTER socket (`replay_endpoint`) answers a request `[identity, "", seq as 8
//!   bytes big-endian]` with every buffered batch whose sequence number is at least `seq`,
//!   each as `[identity, "", seq, payload]`, then the end marker `[identity, "", -1 as 8
//!   bytes, ""]`. The last `buffer_steps` batches (default 10,000) are kept.
//!
//! The decoder also reads the older positional encoding of events (arrays whose first

pub mod hash;

use rmpv::Value;

/// vLLM's `MEDIUM_GPU`.
pub const MEDIUM_GPU: &str = "GPU";
/// vLLM's `MEDIUM_CPU`: blocks offloaded to host memory.
pub const MEDIUM_CPU: &str = "CPU";
/// The end-of-replay marker: -1 as an 8-byte big-endian signed integer.
pub const END_SEQ: [u8; 8] = [0xff; 8];

// Events

/// vLLM's `BlockStored`: consecutive blocks of one sequence, newly cached.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    pub block_hashes: Vec<u64>,
    /// Hash of the block before the first one (`None` when the first starts the sequence).
    pub parent_block_hash: Option<u64>,
    /// The tokens of all the blocks, concatenated.
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    pub lora_id: Option<i64>,
    pub medium: Option<String>,
    pub lora_name: Option<String>,
    /// One entry per block (vLLM: multimodal ids, LoRA name, cache salt...); `nil` here.
    pub extra_keys: Option<Vec<Value>>,
    pub group_idx: Option<i64>,
    pub kv_cache_spec_kind: Option<String>,
    pub kv_cache_spec_sliding_window: Option<i64>,
}

/// vLLM's `BlockRemoved`: blocks evicted from the prefix cache.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<u64>,
    pub medium: Option<String>,
    pub group_idx: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    /// The whole prefix cache was dropped.
    AllBlocksCleared,
}

/// vLLM's `KVEventBatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    pub ts: f64,
    pub events: Vec<KvEvent>,
    pub data_parallel_rank: Option<i64>,
}

impl BlockStored {
    /// A store event as this engine emits it (the fields vLLM 0.32 sets for a full-attention
    /// model without LoRA).
    pub fn new(
        block_hashes: Vec<u64>,
        parent: Option<u64>,
        token_ids: Vec<u32>,
        block_size: usize,
    ) -> Self {
        let n = block_hashes.len();
        BlockStored {
            block_hashes,
            parent_block_hash: parent,
            token_ids,
            block_size: block_size as u32,
            lora_id: None,
            medium: Some(MEDIUM_GPU.into()),
            lora_name: None,
            extra_keys: Some(vec![Value::Nil; n]),
            group_idx: Some(0),
            kv_cache_spec_kind: Some("full_attention".into()),
            kv_cache_spec_sliding_window: None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Encoding (what msgspec writes for these structs: smallest int forms, float64, fixmap
// keys in field order, defaults omitted)

fn w_str(buf: &mut Vec<u8>, s: &str) {
    rmp::encode::write_str(buf, s).expect("write to Vec");
}

fn w_uint(buf: &mut Vec<u8>, v: u64) {
    rmp::encode::write_uint(buf, v).expect("write to Vec");
}

fn w_int(buf: &mut Vec<u8>, v: i64) {
    // msgspec writes non-negative ints in the unsigned forms.
    if v >= 0 {
        w_uint(buf, v as u64);
    } else {
        rmp::encode::write_sint(buf, v).expect("write to Vec");
    }
}

fn w_nil(buf: &mut Vec<u8>) {
    rmp::encode::write_nil(buf).expect("write to Vec");
}

fn w_opt_int(buf: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => w_int(buf, v),
        None => w_nil(buf),
    }
}

fn w_opt_str(buf: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(s) => w_str(buf, s),
        None => w_nil(buf),
    }
}

fn w_hashes(buf: &mut Vec<u8>, hashes: &[u64]) {
    rmp::encode::write_array_len(buf, hashes.len() as u32).expect("write to Vec");
    for &h in hashes {
        w_uint(buf, h);
    }
}

fn encode_event(buf: &mut Vec<u8>, ev: &KvEvent) {
    match ev {
        KvEvent::BlockStored(s) => {
            let n = 8
                + usize::from(s.extra_keys.is_some())
                + usize::from(s.group_idx.is_some())
                + usize::from(s.kv_cache_spec_kind.is_some())
                + usize::from(s.kv_cache_spec_sliding_window.is_some());
            rmp::encode::write_map_len(buf, n as u32).expect("write to Vec");
            w_str(buf, "type");
            w_str(buf, "BlockStored");
            w_str(buf, "block_hashes");
            w_hashes(buf, &s.block_hashes);
            w_str(buf, "parent_block_hash");
            match s.parent_block_hash {
                Some(h) => w_uint(buf, h),
                None => w_nil(buf),
            }
            w_str(buf, "token_ids");
            rmp::encode::write_array_len(buf, s.token_ids.len() as u32).expect("write to Vec");
            for &t in &s.token_ids {
                w_uint(buf, u64::from(t));
            }
            w_str(buf, "block_size");
            w_uint(buf, u64::from(s.block_size));
            w_str(buf, "lora_id");
            w_opt_int(buf, s.lora_id);
            w_str(buf, "medium");
            w_opt_str(buf, s.medium.as_deref());
            w_str(buf, "lora_name");
            w_opt_str(buf, s.lora_name.as_deref());
            if let Some(keys) = &s.extra_keys {
                w_str(buf, "extra_keys");
                rmp::encode::write_array_len(buf, keys.len() as u32).expect("write to Vec");
                for k in keys {
                    write_opaque(buf, k);
                }
            }
            if let Some(g) = s.group_idx {
                w_str(buf, "group_idx");
                w_int(buf, g);
            }
            if let Some(k) = &s.kv_cache_spec_kind {
                w_str(buf, "kv_cache_spec_kind");
                w_str(buf, k);
            }
            if let Some(w) = s.kv_cache_spec_sliding_window {
                w_str(buf, "kv_cache_spec_sliding_window");
                w_int(buf, w);
            }
        }
        KvEvent::BlockRemoved(r) => {
            let n = 3 + usize::from(r.group_idx.is_some());
            rmp::encode::write_map_len(buf, n as u32).expect("write to Vec");
            w_str(buf, "type");
            w_str(buf, "BlockRemoved");
            w_str(buf, "block_hashes");
            w_hashes(buf, &r.block_hashes);
            w_str(buf, "medium");
            w_opt_str(buf, r.medium.as_deref());
            if let Some(g) = r.group_idx {
                w_str(buf, "group_idx");
                w_int(buf, g);
            }
        }
        KvEvent::AllBlocksCleared => {
            rmp::encode::write_map_len(buf, 1).expect("write to Vec");
            w_str(buf, "type");
            w_str(buf, "AllBlocksCleared");
        }
    }
}

/// The msgpack payload of a batch, byte for byte as vLLM 0.32 writes it.
pub fn encode_batch(batch: &EventBatch) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    // msgspec's array_like + omit_defaults drops a trailing `None` rank.
    let len = if batch.data_parallel_rank.is_some() {
        3
    } else {
        2
    };
    rmp::encode::write_array_len(&mut buf, len).expect("write to Vec");
    rmp::encode::write_f64(&mut buf, batch.ts).expect("write to Vec");
    rmp::encode::write_array_len(&mut buf, batch.events.len() as u32).expect("write to Vec");
    for ev in &batch.events {
        encode_event(&mut buf, ev);
    }
    if let Some(r) = batch.data_parallel_rank {
        w_int(&mut buf, r);
    }
    buf
}

// ---------------------------------------------------------------------------------------
// Decoding (both of vLLM's encodings: tagged maps, and older tagged positional arrays)

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid msgpack: {0}")]
    Msgpack(String),
    #[error("unexpected shape: {0}")]
    Shape(String),
}

/// Write a value passed through untouched (`extra_keys`) back as it came: a msgpack str
/// holding invalid UTF-8 stays a str with the same bytes (rmpv would write it as bin),
/// inside arrays and maps too. Found by the `kv_events` fuzz target.
fn write_opaque(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::String(s) if s.as_str().is_none() => {
            let b = s.as_bytes();
            rmp::encode::write_str_len(buf, b.len() as u32).expect("write to Vec");
            buf.extend_from_slice(b);
        }
        Value::Array(items) => {
            rmp::encode::write_array_len(buf, items.len() as u32).expect("write to Vec");
            for i in items {
                write_opaque(buf, i);
            }
        }
        Value::Map(pairs) => {
            rmp::encode::write_map_len(buf, pairs.len() as u32).expect("write to Vec");
            for (k, x) in pairs {
                write_opaque(buf, k);
                write_opaque(buf, x);
            }
        }
        other => rmpv::encode::write_value(buf, other).expect("write to Vec"),
    }
}

fn shape(msg: impl Into<String>) -> DecodeError {
    DecodeError::Shape(msg.into())
}

/// A block hash: an integer (vLLM ≥ 0.9: uint64; negative int64 taken as its bits), or
/// bytes (older vLLM sent the digest: its last 8 bytes, big-endian).
fn hash_of(v: &Value) -> Result<u64, DecodeError> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|x| x as u64))
            .ok_or_else(|| shape("hash out of range")),
        Value::Binary(b) => {
            let mut x = [0u8; 8];
            let tail = &b[b.len().saturating_sub(8)..];
            x[8 - tail.len()..].copy_from_slice(tail);
            Ok(u64::from_be_bytes(x))
        }
        other => Err(shape(format!("hash is {other}"))),
    }
}

fn hashes_of(v: &Value) -> Result<Vec<u64>, DecodeError> {
    v.as_array()
        .ok_or_else(|| shape("block_hashes is not an array"))?
        .iter()
        .map(hash_of)
        .collect()
}

fn opt_hash(v: Option<&Value>) -> Result<Option<u64>, DecodeError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => hash_of(v).map(Some),
    }
}

fn opt_int(v: Option<&Value>) -> Option<i64> {
    v.and_then(|v| v.as_i64())
}

fn opt_string(v: Option<&Value>) -> Option<String> {
    v.and_then(|v| v.as_str()).map(str::to_owned)
}

fn tokens_of(v: Option<&Value>) -> Result<Vec<u32>, DecodeError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    v.as_array()
        .ok_or_else(|| shape("token_ids is not an array"))?
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| shape("token id is not a u32"))
        })
        .collect()
}

/// Field access by name (map form) or by position (array form, position 0 is the tag).
struct Fields<'a> {
    map: Option<&'a [(Value, Value)]>,
    arr: Option<&'a [Value]>,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str, pos: usize) -> Option<&'a Value> {
        if let Some(m) = self.map {
            m.iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v)
        } else {
            self.arr.and_then(|a| a.get(pos))
        }
    }
}

fn decode_event(v: &Value) -> Result<Option<KvEvent>, DecodeError> {
    let (tag, fields) = match v {
        Value::Map(m) => {
            let tag = m
                .iter()
                .find(|(k, _)| k.as_str() == Some("type"))
                .and_then(|(_, v)| v.as_str())
                .ok_or_else(|| shape("event map without a \"type\""))?;
            (
                tag,
                Fields {
                    map: Some(m),
                    arr: None,
                },
            )
        }
        Value::Array(a) => {
            let tag = a
                .first()
                .and_then(|v| v.as_str())
                .ok_or_else(|| shape("event array without a tag"))?;
            (
                tag,
                Fields {
                    map: None,
                    arr: Some(a),
                },
            )
        }
        other => return Err(shape(format!("event is {other}"))),
    };
    let ev = match tag {
        "BlockStored" => {
            let block_hashes = hashes_of(
                fields
                    .get("block_hashes", 1)
                    .ok_or_else(|| shape("BlockStored without block_hashes"))?,
            )?;
            KvEvent::BlockStored(BlockStored {
                block_hashes,
                parent_block_hash: opt_hash(fields.get("parent_block_hash", 2))?,
                token_ids: tokens_of(fields.get("token_ids", 3))?,
                block_size: opt_int(fields.get("block_size", 4)).unwrap_or(0) as u32,
                lora_id: opt_int(fields.get("lora_id", 5)),
                medium: opt_string(fields.get("medium", 6)),
                lora_name: opt_string(fields.get("lora_name", 7)),
                extra_keys: fields
                    .get("extra_keys", 8)
                    .and_then(|v| v.as_array())
                    .cloned(),
                group_idx: opt_int(fields.get("group_idx", 9)),
                kv_cache_spec_kind: opt_string(fields.get("kv_cache_spec_kind", 10)),
                kv_cache_spec_sliding_window: opt_int(
                    fields.get("kv_cache_spec_sliding_window", 11),
                ),
            })
        }
        "BlockRemoved" => KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: hashes_of(
                fields
                    .get("block_hashes", 1)
                    .ok_or_else(|| shape("BlockRemoved without block_hashes"))?,
            )?,
            medium: opt_string(fields.get("medium", 2)),
            group_idx: opt_int(fields.get("group_idx", 3)),
        }),
        "AllBlocksCleared" => KvEvent::AllBlocksCleared,
        // An event type this decoder does not know: skipped.
        _ => return Ok(None),
    };
    Ok(Some(ev))
}

/// Decode a batch's msgpack payload (positional `[ts, events, rank]` or a map).
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    let mut rd = payload;
    let v = rmpv::decode::read_value(&mut rd).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
    let (ts, events, rank) = match &v {
        Value::Array(a) => (a.first(), a.get(1), a.get(2)),
        Value::Map(m) => {
            let get = |k: &str| {
                m.iter()
                    .find(|(key, _)| key.as_str() == Some(k))
                    .map(|(_, v)| v)
            };
            (get("ts"), get("events"), get("data_parallel_rank"))
        }
        other => return Err(shape(format!("batch is {other}"))),
    };
    let ts = ts
        .and_then(|t| t.as_f64().or_else(|| t.as_i64().map(|x| x as f64)))
        .ok_or_else(|| shape("batch without a ts"))?;
    let events = events
        .and_then(|e| e.as_array())
        .ok_or_else(|| shape("batch without events"))?;
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        if let Some(ev) = decode_event(e)? {
            out.push(ev);
        }
    }
    Ok(EventBatch {
        ts,
        events: out,
        data_parallel_rank: opt_int(rank),
    })
}
