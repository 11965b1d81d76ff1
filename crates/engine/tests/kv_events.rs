//! KV-cache events as vLLM publishes them: the codec against real vLLM 0.32.0 captures
//! (`tests/fixtures/vllm-reference/kv_events_raw.bin`), then a live engine over real ZMQ
//! sockets on loopback: stores with chained hashes for prompts sharing a prefix, evictions,
//! the clear after `/reset_prefix_cache`, gapless sequence numbers, and replay.
//!
//! No sleeps as synchronization: every wait is a receive with a deadline.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use rmpv::Value;
use tokio::time::{timeout, Instant};
use zeromq::{Socket, SocketRecv, SocketSend};

use kv_events::hash::block_hash;
use kv_events::{
    decode_batch, encode_batch, BlockRemoved, BlockStored, EventBatch, KvEvent, END_SEQ,
};
use switchyard_engine::core::block_manager::CacheEvent;
use switchyard_engine::kv_publisher::{from_cache_events, KvEventsConfig};
use switchyard_engine::EngineArgs;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/vllm-reference/kv_events_raw.bin"
);

/// The capture's records: `u32 BE frame count`, then per frame `u32 BE length` + bytes.
fn fixture_messages() -> Vec<Vec<Vec<u8>>> {
    let data = std::fs::read(FIXTURE).expect("fixture kv_events_raw.bin");
    let mut out = Vec::new();
    let mut i = 0;
    let u32_at = |i: &mut usize| {
        let v = u32::from_be_bytes(data[*i..*i + 4].try_into().unwrap()) as usize;
        *i += 4;
        v
    };
    while i < data.len() {
        let n = u32_at(&mut i);
        let mut frames = Vec::new();
        for _ in 0..n {
            let len = u32_at(&mut i);
            frames.push(data[i..i + len].to_vec());
            i += len;
        }
        out.push(frames);
    }
    out
}

fn stored(ev: &KvEvent) -> &BlockStored {
    match ev {
        KvEvent::BlockStored(s) => s,
        other => panic!("expected BlockStored, got {other:?}"),
    }
}

fn removed(ev: &KvEvent) -> &BlockRemoved {
    match ev {
        KvEvent::BlockRemoved(r) => r,
        other => panic!("expected BlockRemoved, got {other:?}"),
    }
}

#[test]
fn vllm_capture_decodes_and_reencodes_byte_for_byte() {
    let msgs = fixture_messages();
    assert_eq!(msgs.len(), 15);
    let mut batches = Vec::new();
    for m in &msgs {
        assert_eq!(m.len(), 3, "three frames");
        assert_eq!(m[0], b"kv", "topic frame");
        assert_eq!(m[1].len(), 8, "8-byte sequence number");
        let seq = u64::from_be_bytes(m[1].clone().try_into().unwrap());
        let batch = decode_batch(&m[2]).expect("decodes");
        // Our encoder writes exactly what vLLM's msgspec wrote.
        assert_eq!(encode_batch(&batch), m[2], "re-encoding of seq {seq}");
        batches.push((seq, batch));
    }
    let seqs: Vec<u64> = batches.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3]);

    // seq 0 (kv_events_decoded.txt): 15 blocks stored at once, no parent.
    let b0 = &batches[0].1;
    assert_eq!(b0.ts, 1795514607.1381967);
    assert_eq!(b0.data_parallel_rank, Some(0));
    assert_eq!(b0.events.len(), 1);
    let s = stored(&b0.events[0]);
    assert_eq!(s.block_hashes.len(), 15);
    assert_eq!(s.block_hashes[0], 8369014444865443797);
    assert_eq!(s.block_hashes[1], 13303172507669021975); // > i64::MAX: a real uint64
    assert_eq!(s.block_hashes[14], 3921333894898985023);
    assert_eq!(s.parent_block_hash, None);
    assert_eq!(s.token_ids.len(), 15 * 128);
    assert_eq!(&s.token_ids[..2], &[28120, 33662]);
    assert_eq!(s.block_size, 128);
    assert_eq!(s.lora_id, None);
    assert_eq!(s.medium.as_deref(), Some("GPU"));
    assert_eq!(s.lora_name, None);
    assert_eq!(s.extra_keys.as_ref().map(Vec::len), Some(15));
    assert!(s.extra_keys.as_ref().unwrap().iter().all(Value::is_nil));
    assert_eq!(s.group_idx, Some(0));
    assert_eq!(s.kv_cache_spec_kind.as_deref(), Some("full_attention"));

    // seq 1 and 2 (kv_demo_output.txt): the second prompt's block chains onto the first's
    // third block, which both prompts share.
    let s1 = stored(&batches[1].1.events[0]);
    assert_eq!(
        s1.block_hashes,
        [
            17581983403497397629,
            12764150203371753312,
            16174326569385090559,
            10118518632702092982
        ]
    );
    let s2 = stored(&batches[2].1.events[0]);
    assert_eq!(s2.block_hashes, [16670171901238983330]);
    assert_eq!(s2.parent_block_hash, Some(s1.block_hashes[2]));
    assert_eq!(s2.token_ids.len(), 128);
    assert_eq!(&s2.token_ids[..6], &[30, 1027, 216, 34, 39, 42]);

    // The eviction run (kv_evict_output.txt): one BlockRemoved per evicted block, before
    // the store that needed the room.
    let e1 = &batches[12].1;
    let r = removed(&e1.events[0]);
    assert_eq!(r.block_hashes, [7091175461852677354]);
    assert_eq!(r.medium.as_deref(), Some("GPU"));
    assert_eq!(r.group_idx, Some(0));
    assert_eq!(removed(&e1.events[1]).block_hashes, [16422646659207084753]);
    assert_eq!(stored(&e1.events[2]).block_hashes.len(), 5);
    assert_eq!(batches[13].1.events.len(), 6);

    // kv_reset_output.txt: two resets, flushed together.
    let last = &batches[14].1;
    assert_eq!(last.ts, 1795514745.8181741);
    assert_eq!(
        last.events,
        [KvEvent::AllBlocksCleared, KvEvent::AllBlocksCleared]
    );
}

/// The keys of each event map, and the msgpack kind of each value, in order.
fn shape_of(payload: &[u8]) -> Vec<Vec<(String, &'static str)>> {
    let v = rmpv::decode::read_value(&mut &payload[..]).unwrap();
    let a = v.as_array().expect("batch is a positional array");
    assert_eq!(a.len(), 3, "[ts, events, data_parallel_rank]");
    assert!(a[0].is_f64(), "ts is a float64");
    assert!(a[2].is_u64(), "data_parallel_rank is an int");
    a[1].as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e.as_map()
                .expect("event is a map")
                .iter()
                .map(|(k, v)| {
                    let kind = match v {
                        Value::Nil => "nil",
                        Value::Integer(_) => "int",
                        Value::String(_) => "str",
                        Value::Array(_) => "array",
                        _ => "other",
                    };
                    (k.as_str().unwrap().to_owned(), kind)
                })
                .collect()
        })
        .collect()
}

#[test]
fn our_events_have_vllms_shape() {
    let msgs = fixture_messages();
    // vLLM's shapes: a store with no parent, a store with a parent, a removal, a clear.
    let theirs_root = shape_of(&msgs[0][2])[0].clone();
    let theirs_child = shape_of(&msgs[2][2])[0].clone();
    let theirs_removed = shape_of(&msgs[12][2])[0].clone();
    let theirs_cleared = shape_of(&msgs[14][2])[0].clone();

    let t: Vec<u32> = (0..48).collect();
    let h0 = block_hash(None, &t[..16]);
    let h1 = block_hash(Some(h0), &t[16..32]);
    let h2 = block_hash(Some(h1), &t[32..48]);
    let events = from_cache_events(
        [
            CacheEvent::Removed { hash: 7 },
            CacheEvent::Stored {
                hash: h0,
                parent: None,
                tokens: t[..16].to_vec(),
                lora: None,
            },
            CacheEvent::Stored {
                hash: h1,
                parent: Some(h0),
                tokens: t[16..32].to_vec(),
                lora: None,
            },
            CacheEvent::Stored {
                hash: h2,
                parent: Some(h1),
                tokens: t[32..48].to_vec(),
                lora: None,
            },
            // Another sequence, starting from a cached block: a new event.
            CacheEvent::Stored {
                hash: 99,
                parent: Some(h0),
                tokens: t[..16].to_vec(),
                lora: None,
            },
            CacheEvent::AllCleared,
        ],
        16,
    );
    assert_eq!(events.len(), 4);
    let s = stored(&events[1]);
    assert_eq!(s.block_hashes, [h0, h1, h2]);
    assert_eq!(s.parent_block_hash, None);
    assert_eq!(s.token_ids, t);
    assert_eq!(stored(&events[2]).parent_block_hash, Some(h0));

    let batch = EventBatch {
        ts: 1795514607.25,
        events,
        data_parallel_rank: Some(0),
    };
    let bytes = encode_batch(&batch);
    assert_eq!(decode_batch(&bytes).unwrap(), batch);
    let ours = shape_of(&bytes);
    assert_eq!(ours[0], theirs_removed);
    assert_eq!(ours[1], theirs_root);
    assert_eq!(ours[2], theirs_child);
    assert_eq!(ours[3], theirs_cleared);
}

#[test]
fn decodes_the_older_positional_encoding_and_ignores_unknowns() {
    // Older vLLM: array_like events, tag first; a future event type is skipped; a map
    // event with an unknown field still decodes.
    let stored = Value::Array(vec![
        "BlockStored".into(),
        Value::Array(vec![Value::from(u64::MAX), Value::from(5u64)]),
        Value::from(3u64),
        Value::Array((0..4u32).map(Value::from).collect()),
        Value::from(2u64),
        Value::Nil,
        "GPU".into(),
    ]);
    let removed = Value::Array(vec![
        "BlockRemoved".into(),
        Value::Array(vec![Value::from(5u64)]),
        "GPU".into(),
    ]);
    let cleared = Value::Array(vec!["AllBlocksCleared".into()]);
    let future = Value::Map(vec![("type".into(), "SomethingNew".into())]);
    let extra = Value::Map(vec![
        ("type".into(), "BlockRemoved".into()),
        ("block_hashes".into(), Value::Array(vec![Value::from(8u64)])),
        ("medium".into(), Value::Nil),
        ("future_field".into(), Value::from(1u64)),
    ]);
    let batch = Value::Array(vec![
        Value::F64(1.5),
        Value::Array(vec![stored, removed, cleared, future, extra]),
    ]);
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &batch).unwrap();
    let b = decode_batch(&buf).unwrap();
    assert_eq!(b.ts, 1.5);
    assert_eq!(b.data_parallel_rank, None);
    assert_eq!(b.events.len(), 4);
    let s = match &b.events[0] {
        KvEvent::BlockStored(s) => s,
        e => panic!("{e:?}"),
    };
    assert_eq!(s.block_hashes, [u64::MAX, 5]);
    assert_eq!(s.parent_block_hash, Some(3));
    assert_eq!(s.token_ids, [0, 1, 2, 3]);
    assert_eq!(s.block_size, 2);
    assert_eq!(s.medium.as_deref(), Some("GPU"));
    assert!(matches!(&b.events[1], KvEvent::BlockRemoved(r) if r.block_hashes == [5]));
    assert_eq!(b.events[2], KvEvent::AllBlocksCleared);
    assert!(matches!(&b.events[3], KvEvent::BlockRemoved(r) if r.block_hashes == [8]));
    // A batch without a rank re-encodes as vLLM does: two elements.
    assert_eq!(encode_batch(&b)[0], 0x92);
}

#[test]
fn config_parses_vllms_json() {
    let c = KvEventsConfig::parse(
        r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","topic":"kv"}"#,
    )
    .unwrap();
    assert!(c.enabled());
    assert_eq!(c.endpoint, "tcp://*:5557");
    assert_eq!(c.topic, "kv");
    assert_eq!(c.replay_endpoint, None);
    assert_eq!(c.buffer_steps, 10_000);
    assert_eq!(c.hwm, 100_000);
    // publisher defaults to zmq when enabled, null otherwise.
    assert!(KvEventsConfig::parse(r#"{"enable_kv_cache_events":true}"#)
        .unwrap()
        .enabled());
    assert!(!KvEventsConfig::parse(r#"{"publisher":"zmq"}"#)
        .unwrap()
        .enabled());
    assert!(
        !KvEventsConfig::parse(r#"{"enable_kv_cache_events":true,"publisher":"null"}"#)
            .unwrap()
            .enabled()
    );
    let e = KvEventsConfig::parse(r#"{"enable_kv_cache_events":true,"publisher":"kafka"}"#)
        .unwrap_err();
    assert!(e.contains("Unknown event publisher 'kafka'"), "{e}");
    assert!(KvEventsConfig::parse("{not json").is_err());
}

// ---------------------------------------------------------------------------------------
// Live engine

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: EngineArgs,
}

struct Live {
    base: String,
    http: reqwest::Client,
    pub_port: u16,
    replay_port: Option<u16>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

async fn start_engine(num_blocks: usize, kv_config: &str) -> Live {
    let cli = Cli::parse_from([
        "engine",
        "--backend",
        "sim",
        "--sim-preset",
        "zero",
        "--block-size",
        "16",
        "--num-gpu-blocks",
        &num_blocks.to_string(),
        "--max-model-len",
        "256",
        "--kv-events-config",
        kv_config,
    ]);
    let engine = switchyard_engine::build_engine(&cli.args).expect("engine starts");
    let info = engine.kv_events.clone().expect("events enabled");
    assert_eq!(info.topic, "kv");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(switchyard_engine::serve(
        listener,
        engine,
        async move {
            let _ = stopped.await;
        },
        Default::default(),
    ));
    Live {
        base,
        http: reqwest::Client::new(),
        pub_port: port_of(&info.endpoint),
        replay_port: info.replay_endpoint.as_deref().map(port_of),
        _stop: stop,
    }
}

impl Live {
    async fn complete(&self, prompt: &[u32]) {
        let r = self
            .http
            .post(format!("{}/v1/completions", self.base))
            .json(&serde_json::json!({
                "prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": true
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    async fn reset(&self) {
        let r = self
            .http
            .post(format!("{}/reset_prefix_cache", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// A subscriber that checks every message's framing and that sequence numbers have no
/// gaps, keeping what it received.
struct Sub {
    sock: zeromq::SubSocket,
    got: Vec<(u64, Bytes, EventBatch)>,
}

impl Sub {
    async fn connect(port: u16) -> Sub {
        let mut sock = zeromq::SubSocket::new();
        sock.connect(&format!("tcp://127.0.0.1:{port}"))
            .await
            .unwrap();
        sock.subscribe("kv").await.unwrap();
        Sub {
            sock,
            got: Vec::new(),
        }
    }

    /// The next batch, or `None` after `wait`.
    async fn next(&mut self, wait: Duration) -> Option<&EventBatch> {
        let msg = timeout(wait, self.sock.recv()).await.ok()?.unwrap();
        let frames = msg.into_vec();
        assert_eq!(frames.len(), 3, "[topic, seq, payload]");
        assert_eq!(&frames[0][..], b"kv");
        let seq = u64::from_be_bytes(frames[1][..].try_into().expect("8-byte seq"));
        if let Some((prev, _, _)) = self.got.last() {
            assert_eq!(seq, prev + 1, "sequence numbers without gaps");
        }
        let batch = decode_batch(&frames[2]).expect("decodes");
        assert_eq!(batch.data_parallel_rank, Some(0));
        self.got.push((seq, frames[2].clone(), batch));
        self.got.last().map(|(_, _, b)| b)
    }

    /// Receive until `done` holds for everything received since `from`, or panic at the
    /// deadline.
    async fn until(&mut self, from: usize, what: &str, done: impl Fn(&[KvEvent]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let evs: Vec<KvEvent> = self.got[from..]
                .iter()
                .flat_map(|(_, _, b)| b.events.iter().cloned())
                .collect();
            if done(&evs) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}; got {evs:?}");
            self.next(left).await;
        }
    }

    fn events_since(&self, from: usize) -> Vec<KvEvent> {
        self.got[from..]
            .iter()
            .flat_map(|(_, _, b)| b.events.iter().cloned())
            .collect()
    }
}

/// Subscribing is asynchronous (ZMQ's slow joiner): reset the (empty) prefix cache, which
/// publishes `AllBlocksCleared`, until one arrives.
async fn join(live: &Live, sub: &mut Sub) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        live.reset().await;
        if sub.next(Duration::from_millis(100)).await.is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "no KV events received");
    }
}

fn tokens(salt: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 97 + (i * 7 + salt) % 26).collect()
}

fn stores(evs: &[KvEvent]) -> Vec<&BlockStored> {
    evs.iter()
        .filter_map(|e| match e {
            KvEvent::BlockStored(s) => Some(s),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_publishes_stores_evictions_and_clears() {
    let live = start_engine(
        16,
        r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:0","topic":"kv"}"#,
    )
    .await;
    let mut sub = Sub::connect(live.pub_port).await;
    join(&live, &mut sub).await;
    // Drain further probe clears, if any were still in flight.
    while sub.next(Duration::from_millis(50)).await.is_some() {}
    assert!(sub
        .got
        .iter()
        .all(|(_, _, b)| b.events == [KvEvent::AllBlocksCleared]));

    // Prompt A: 3 full blocks of prefix plus 20 tokens; B shares the 3 blocks.
    let prefix = tokens(0, 48);
    let a: Vec<u32> = prefix.iter().copied().chain(tokens(5, 20)).collect();
    let b: Vec<u32> = prefix.iter().copied().chain(tokens(11, 20)).collect();
    let mark = sub.got.len();
    live.complete(&a).await;
    // A's 68 prompt tokens fill 4 blocks.
    sub.until(mark, "A's 4 blocks", |evs| {
        stores(evs)
            .iter()
            .map(|s| s.block_hashes.len())
            .sum::<usize>()
            >= 4
    })
    .await;
    let evs_a = sub.events_since(mark);
    let sa = stores(&evs_a);
    assert_eq!(sa[0].parent_block_hash, None, "A starts a chain");
    let mut hashes_a = Vec::new();
    let mut toks_a = Vec::new();
    for s in &sa {
        // Each event continues the chain of the one before.
        assert_eq!(s.parent_block_hash, hashes_a.last().copied());
        assert_eq!(s.block_size, 16);
        assert_eq!(s.medium.as_deref(), Some("GPU"));
        assert_eq!(s.token_ids.len(), 16 * s.block_hashes.len());
        assert_eq!(
            s.extra_keys.as_ref().map(Vec::len),
            Some(s.block_hashes.len())
        );
        hashes_a.extend_from_slice(&s.block_hashes);
        toks_a.extend_from_slice(&s.token_ids);
    }
    assert_eq!(toks_a, a[..64]);
    // The hashes are the engine's chained block hashes of exactly those tokens.
    let mut parent = None;
    for (i, h) in hashes_a.iter().enumerate() {
        let expect = block_hash(parent, &a[i * 16..(i + 1) * 16]);
        assert_eq!(*h, expect, "block {i}");
        parent = Some(expect);
    }

    let mark = sub.got.len();
    live.complete(&b).await;
    sub.until(mark, "B's new block", |evs| !stores(evs).is_empty())
        .await;
    let evs_b = sub.events_since(mark);
    let sb = stores(&evs_b);
    assert_eq!(sb.len(), 1, "B's one new block: {evs_b:?}");
    assert_eq!(
        sb[0].parent_block_hash,
        Some(hashes_a[2]),
        "B's block chains onto the shared third block"
    );
    assert_eq!(sb[0].token_ids, b[48..64]);
    let mut live_hashes: HashSet<u64> = hashes_a.iter().copied().collect();
    live_hashes.extend(&sb[0].block_hashes);

    // Two long unique prompts need 13 blocks each of a 16-block pool: the cached blocks
    // of A and B are evicted, one BlockRemoved each.
    let mark = sub.got.len();
    live.complete(&tokens(3, 200)).await;
    live.complete(&tokens(17, 200)).await;
    sub.until(mark, "evictions", |evs| {
        evs.iter()
            .filter(|e| matches!(e, KvEvent::BlockRemoved(_)))
            .count()
            >= 5
    })
    .await;
    let mut stored_now: HashSet<u64> = live_hashes.clone();
    for ev in sub.events_since(mark) {
        match ev {
            KvEvent::BlockStored(s) => stored_now.extend(s.block_hashes),
            KvEvent::BlockRemoved(r) => {
                assert_eq!(r.block_hashes.len(), 1, "one hash per removal, as vLLM");
                assert_eq!(r.medium.as_deref(), Some("GPU"));
                assert_eq!(r.group_idx, Some(0));
                assert!(
                    stored_now.remove(&r.block_hashes[0]),
                    "removed a block never stored"
                );
            }
            KvEvent::AllBlocksCleared => panic!("unexpected clear"),
        }
    }
    assert!(
        live_hashes.iter().all(|h| !stored_now.contains(h)),
        "A's and B's blocks were evicted"
    );

    let mark = sub.got.len();
    live.reset().await;
    sub.until(mark, "AllBlocksCleared", |evs| {
        evs.contains(&KvEvent::AllBlocksCleared)
    })
    .await;
    assert_eq!(sub.events_since(mark), [KvEvent::AllBlocksCleared]);
}

/// A replay client (DEALER, as vLLM's own consumers use): `["", start]` → each buffered
/// batch from `start` as `["", seq, payload]`, then `["", -1, ""]`.
async fn replay(port: u16, start: u64) -> Vec<(u64, Bytes)> {
    let mut d = zeromq::DealerSocket::new();
    d.connect(&format!("tcp://127.0.0.1:{port}")).await.unwrap();
    let req = zeromq::ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .unwrap();
    d.send(req).await.unwrap();
    let mut out = Vec::new();
    loop {
        let m = timeout(Duration::from_secs(10), d.recv())
            .await
            .expect("replay answers")
            .unwrap()
            .into_vec();
        assert_eq!(m.len(), 3, "[\"\", seq, payload]");
        assert!(m[0].is_empty(), "empty delimiter");
        if m[1][..] == END_SEQ {
            assert!(m[2].is_empty());
            return out;
        }
        out.push((
            u64::from_be_bytes(m[1][..].try_into().unwrap()),
            m[2].clone(),
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_resends_buffered_batches_from_a_sequence_number() {
    let live = start_engine(
        64,
        r#"{"enable_kv_cache_events":true,"endpoint":"tcp://*:0","replay_endpoint":"tcp://*:0","buffer_steps":8,"topic":"kv"}"#,
    )
    .await;
    let replay_port = live.replay_port.expect("replay endpoint");
    let mut sub = Sub::connect(live.pub_port).await;
    join(&live, &mut sub).await;
    // Sequence numbers start at 0 (the probe clears before the subscription took hold
    // were published too: replay shows them).
    let joined = sub.got[0].0;
    let early: Vec<u64> = replay(replay_port, 0)
        .await
        .iter()
        .map(|(s, _)| *s)
        .collect();
    let first = joined.saturating_sub(7); // 0 unless joining took more than 8 probes
    assert_eq!(early, (first..=joined).collect::<Vec<_>>());
    // Eight batches at least: one store each.
    for salt in 0..8 {
        let mark = sub.got.len();
        live.complete(&tokens(salt, 20)).await;
        sub.until(mark, "a store", |evs| !stores(evs).is_empty())
            .await;
    }
    let last = sub.got.last().unwrap().0;
    assert!(last >= 8);

    // From a sequence number still buffered: that batch and every later one, in order,
    // byte for byte what was published.
    let from = last - 2;
    let got = replay(replay_port, from).await;
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (from..=last).collect::<Vec<_>>());
    for (seq, payload) in &got {
        let (_, published, _) = sub.got.iter().find(|(s, _, _)| s == seq).unwrap();
        assert_eq!(payload, published);
    }
    // From 0: only the last `buffer_steps` (8) batches are kept.
    let got = replay(replay_port, 0).await;
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (last - 7..=last).collect::<Vec<_>>());
    // From past the end: just the end marker.
    assert!(replay(replay_port, last + 1).await.is_empty());
}

/// A block computed under a LoRA adapter is announced with vLLM's `lora_id` and
/// `lora_name`, never folded into a neighbouring event of another adapter (or none).
#[test]
fn blocks_under_a_lora_adapter_carry_its_id_and_name() {
    let adapter = std::sync::Arc::new(switchyard_engine::lora::Adapter {
        name: "sql".into(),
        id: 3,
        path: "/adapters/sql".into(),
        rank: 8,
        salt: switchyard_engine::lora::salt_for("sql"),
        weights: None,
    });
    let t: Vec<u32> = (0..32).collect();
    let h0 = block_hash(None, &t[..16]);
    let h1 = block_hash(Some(h0), &t[16..]);
    let events = from_cache_events(
        [
            CacheEvent::Stored {
                hash: h0,
                parent: None,
                tokens: t[..16].to_vec(),
                lora: None,
            },
            // Chained on h0 by its hashes, but under an adapter: a separate event.
            CacheEvent::Stored {
                hash: h1,
                parent: Some(h0),
                tokens: t[16..].to_vec(),
                lora: Some(adapter.clone()),
            },
            CacheEvent::Stored {
                hash: 77,
                parent: Some(h1),
                tokens: t[..16].to_vec(),
                lora: Some(adapter),
            },
        ],
        16,
    );
    assert_eq!(events.len(), 2, "{events:?}");
    let (base, sql) = (stored(&events[0]), stored(&events[1]));
    assert_eq!((base.lora_id, base.lora_name.as_deref()), (None, None));
    assert_eq!(
        (sql.lora_id, sql.lora_name.as_deref()),
        (Some(3), Some("sql"))
    );
    assert_eq!(sql.block_hashes, [h1, 77]);
    let batch = EventBatch {
        ts: 1.0,
        events,
        data_parallel_rank: None,
    };
    assert_eq!(decode_batch(&encode_batch(&batch)).unwrap(), batch);
}
