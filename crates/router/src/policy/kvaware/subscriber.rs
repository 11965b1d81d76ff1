//! Following the engines' KV-cache events for `kvaware` routing: one ZMQ SUB per engine,
//! fed into the shared [`KvIndex`](super::index::KvIndex), on a thread of its own (the
//! serving threads never decode events). It is handed what it needs (the [`KvState`],
//! the registry, the connect timeout), not the router's state.
//!
//! - **Where**: a Switchyard engine advertises its sockets on `GET /kv_events`
//!   (`{"endpoint","replay_endpoint","topic","block_size"}`; a wildcard host means the
//!   engine's own host). Otherwise (404: real vLLM) by convention: `tcp://HOST:PORT` with
//!   the engine's host and `--kv-events-port`, every topic, no replay. An endpoint given
//!   for the backend (`--static-kv-events-endpoints`) wins over both.
//! - **Gaps**: sequence numbers are followed per engine. A batch past the next expected
//!   one asks the replay socket (DEALER `["", start as 8 bytes BE]` → `["", seq, payload]`
//!   … `["", -1, ""]`) for what was missed; what replay cannot give back clears the
//!   engine's entries (missed removals would leave blocks it no longer holds). On
//!   connecting, the subscriber replays from 0, so a router started after its engines
//!   knows what they already cached (as far as the engine's replay buffer reaches).
//! - **Restarts**: a live sequence number at or below the last one seen (or below the
//!   expected one after a disconnect) is a new publisher: the engine's entries are dropped
//!   and it is replayed from 0. `AllBlocksCleared` drops them too. A stream quiet for 2 s
//!   has the engine's advertisement read again: an engine restarted on new event ports is
//!   followed there (from a clean slate, replayed from 0).
//! - **Leaving**: the manager follows the registry; an engine no longer in it has its
//!   subscriber stopped and its entries dropped. Nothing is followed unless the routing
//!   logic is `kvaware` ([`KvState::following`]).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use kv_events::{decode_batch, END_SEQ};
use serde::Deserialize;
use zeromq::{Socket, SocketRecv, SocketSend};

use super::index::EngineKey;
use super::KvState;
use crate::engines::{Endpoint, Registry};
use crate::upstream::{self, HttpClient};

// ---------------------------------------------------------------------------------------
// Where an engine publishes

/// An engine's event sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub endpoint: String,
    pub replay: Option<String>,
    pub topic: String,
    pub block_size: Option<usize>,
}

#[derive(Deserialize)]
struct Advertised {
    endpoint: String,
    #[serde(default)]
    replay_endpoint: Option<String>,
    #[serde(default)]
    topic: String,
    #[serde(default)]
    block_size: Option<usize>,
}

/// The host part of `host:port` (brackets of IPv6 kept).
fn host_of(host_port: &str) -> &str {
    host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
}

/// `tcp://0.0.0.0:P` (or `*`, `[::]`) → `tcp://HOST:P`: a wildcard bind is reached at the
/// engine's own host.
pub fn resolve_endpoint(endpoint: &str, engine_host: &str) -> String {
    let Some(rest) = endpoint.strip_prefix("tcp://") else {
        return endpoint.to_string();
    };
    match rest.rsplit_once(':') {
        Some(("0.0.0.0" | "*" | "[::]" | "::" | "", port)) => {
            format!("tcp://{engine_host}:{port}")
        }
        _ => endpoint.to_string(),
    }
}

/// Ask the engine where it publishes; `Err` when it cannot be reached.
pub async fn discover(
    client: &HttpClient,
    ep: &Endpoint,
    events_port: u16,
) -> Result<StreamInfo, String> {
    let host = host_of(&ep.host_port);
    if let Some(endpoint) = &ep.kv_events {
        return Ok(StreamInfo {
            endpoint: endpoint.clone(),
            replay: None,
            topic: String::new(),
            block_size: None,
        });
    }
    let (status, body) = upstream::get(
        client,
        &format!("{}/kv_events", ep.url),
        Duration::from_secs(3),
        None,
    )
    .await?;
    if status.is_success() {
        let a: Advertised = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        return Ok(StreamInfo {
            endpoint: resolve_endpoint(&a.endpoint, host),
            replay: a.replay_endpoint.map(|r| resolve_endpoint(&r, host)),
            topic: a.topic,
            block_size: a.block_size.filter(|&b| b > 0),
        });
    }
    Ok(StreamInfo {
        endpoint: format!("tcp://{host}:{events_port}"),
        replay: None,
        topic: String::new(),
        block_size: None,
    })
}

// ---------------------------------------------------------------------------------------
// Sequence numbers

/// What to do with a batch that arrived on the live stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next expected batch: apply it.
    Apply,
    /// Already applied (from a replay): skip it.
    Skip,
    /// Batches were missed: replay from `from` (after dropping the engine's entries and
    /// starting over at 0 when `restart`), then look again.
    Resync { from: u64, restart: bool },
}

/// The sequence-number bookkeeping of one engine's stream.
#[derive(Debug, Default, Clone)]
pub struct SeqState {
    /// The next sequence number to apply.
    pub next: u64,
    /// The last sequence number seen on the live stream.
    live_last: Option<u64>,
    /// The connection dropped since the last live batch.
    disconnected: bool,
}

impl SeqState {
    pub fn on_live(&mut self, seq: u64) -> Step {
        let restarted =
            self.live_last.is_some_and(|l| seq <= l) || (self.disconnected && seq < self.next);
        self.disconnected = false;
        self.live_last = Some(seq);
        if restarted {
            self.next = 0;
            return Step::Resync {
                from: 0,
                restart: true,
            };
        }
        match seq.cmp(&self.next) {
            std::cmp::Ordering::Less => Step::Skip,
            std::cmp::Ordering::Equal => Step::Apply,
            std::cmp::Ordering::Greater => Step::Resync {
                from: self.next,
                restart: false,
            },
        }
    }

    pub fn disconnected(&mut self) {
        self.disconnected = true;
    }
}

// ---------------------------------------------------------------------------------------
// Tasks

/// Start the thread that follows the engines of `registry` while the routing logic is
/// `kvaware` (upstream connections with `connect_timeout`). It stops when the registry is
/// dropped (with the router's state).
pub fn spawn(kv: Arc<KvState>, registry: Weak<Registry>, connect_timeout: Duration) {
    let r = httpx::spawn_runtime_thread("kv-events", manager(kv, registry, connect_timeout));
    if let Err(e) = r {
        tracing::error!(error = %e, "KV events: cannot start the subscriber thread");
    }
}

/// Keep one subscriber per engine in the registry (while `kvaware` is on).
async fn manager(kv: Arc<KvState>, registry: Weak<Registry>, connect_timeout: Duration) {
    let mut subs: HashMap<EngineKey, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(snap) = registry.upgrade().map(|r| r.snapshot()) else {
            break;
        };
        let want: HashMap<EngineKey, &Arc<Endpoint>> = if kv.following() {
            snap.endpoints.iter().map(|e| (e.key, e)).collect()
        } else {
            HashMap::new()
        };
        subs.retain(|key, task| {
            if want.contains_key(key) && !task.is_finished() {
                return true;
            }
            task.abort();
            if !want.contains_key(key) {
                kv.index_mut().remove_engine(*key);
                tracing::info!("KV events: engine left; its blocks dropped from the index");
            }
            false
        });
        // Engines the index follows that no subscriber owns any more (left while a task
        // was being restarted).
        let stale: Vec<EngineKey> = kv
            .index()
            .engines()
            .into_iter()
            .filter(|k| !want.contains_key(k))
            .collect();
        for k in stale {
            kv.index_mut().remove_engine(k);
        }
        for (key, ep) in want {
            if subs.contains_key(&key) {
                continue;
            }
            let client = upstream::thread_client(connect_timeout);
            let task = subscribe(kv.clone(), client, ep.clone());
            subs.insert(key, tokio::spawn(task));
        }
    }
    for (_, t) in subs {
        t.abort();
    }
}

/// Follow one engine's events until aborted.
async fn subscribe(kv: Arc<KvState>, client: HttpClient, ep: Arc<Endpoint>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let info = match discover(&client, &ep, kv.events_port).await {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(engine = %ep.url, error = %e, "KV events: engine unreachable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        match follow(&kv, &client, &ep, &info).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                tracing::debug!(engine = %ep.url, endpoint = %info.endpoint, error = %e, "KV events: no stream");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// How long the live stream may be quiet before the advertisement is checked again (an
/// engine restarted on new ports is followed there).
const QUIET: Duration = Duration::from_secs(2);

/// Connect to `info` and apply its batches; returns when the advertisement changed
/// (`Ok`) or the connection could not be made (`Err`).
async fn follow(
    kv: &KvState,
    client: &HttpClient,
    ep: &Endpoint,
    info: &StreamInfo,
) -> Result<(), String> {
    let key = ep.key;
    let mut sock = zeromq::SubSocket::new();
    sock.subscribe(&info.topic)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), sock.connect(&info.endpoint))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tracing::info!(engine = %ep.url, endpoint = %info.endpoint, replay = ?info.replay, "KV events: subscribed");
    {
        let mut idx = kv.index_mut();
        // A new stream: whatever was known of this engine is replaced by its replay.
        idx.clear_all(key);
        idx.attach(key);
        if let Some(bs) = info.block_size {
            idx.set_block_size(key, bs);
        }
    }
    let mut seq = SeqState::default();
    let mut heard = tokio::time::Instant::now();
    // Catch up with what the engine cached before we subscribed.
    replay_into(kv, key, info, &mut seq).await;
    loop {
        // Quiet for `QUIET` (no batch, or a peer that keeps failing): look at the
        // advertisement again.
        let wait = QUIET.saturating_sub(heard.elapsed());
        let got = tokio::time::timeout(wait, sock.recv()).await;
        let msg = match got {
            Ok(Ok(m)) => {
                heard = tokio::time::Instant::now();
                m
            }
            Ok(Err(_)) if heard.elapsed() < QUIET => {
                // The peer went away; the socket reconnects by itself.
                seq.disconnected();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            _ => {
                heard = tokio::time::Instant::now();
                match discover(client, ep, kv.events_port).await {
                    Ok(now) if now != *info => {
                        tracing::info!(engine = %ep.url, "KV events: endpoint changed; resubscribing");
                        return Ok(());
                    }
                    _ => continue,
                }
            }
        };
        let frames = msg.into_vec();
        if frames.len() < 3 || frames[1].len() != 8 {
            tracing::warn!(engine = %ep.url, frames = frames.len(), "KV events: bad message");
            continue;
        }
        let n = u64::from_be_bytes(frames[1][..].try_into().expect("8 bytes"));
        let payload = &frames[frames.len() - 1];
        match seq.on_live(n) {
            Step::Skip => continue,
            Step::Apply => {}
            Step::Resync { restart, .. } => {
                if restart {
                    tracing::info!(engine = %ep.url, "KV events: engine restarted; resyncing");
                    kv.index_mut().clear_all(key);
                }
                replay_into(kv, key, info, &mut seq).await;
                if n < seq.next {
                    continue;
                }
                if n > seq.next {
                    // Lost for good: what we hold may include blocks since removed.
                    tracing::warn!(engine = %ep.url, missed = n - seq.next, "KV events: batches lost; dropping the engine's entries");
                    kv.index_mut().clear_all(key);
                    seq.next = n;
                }
            }
        }
        apply_payload(kv, key, payload);
        seq.next = n + 1;
    }
}

/// Apply one batch's payload (undecodable batches are skipped).
fn apply_payload(kv: &KvState, key: EngineKey, payload: &[u8]) {
    match decode_batch(payload) {
        Ok(batch) => {
            let mut idx = kv.index_mut();
            for ev in &batch.events {
                idx.apply(key, ev);
            }
        }
        Err(e) => tracing::warn!(error = %e, "KV events: undecodable batch skipped"),
    }
}

/// Replay from `seq.next` (when the engine has a replay socket), applying each batch in
/// order.
async fn replay_into(kv: &KvState, key: EngineKey, info: &StreamInfo, seq: &mut SeqState) {
    let Some(r) = &info.replay else { return };
    match replay(r, seq.next).await {
        Ok(batches) => {
            for (n, payload) in batches {
                if n >= seq.next {
                    apply_payload(kv, key, &payload);
                    seq.next = n + 1;
                }
            }
        }
        Err(e) => tracing::warn!(endpoint = %r, error = %e, "KV events: replay failed"),
    }
}

/// Ask a replay socket for every buffered batch from `start` on.
pub async fn replay(endpoint: &str, start: u64) -> Result<Vec<(u64, Bytes)>, String> {
    let mut d = zeromq::DealerSocket::new();
    let wait = Duration::from_secs(5);
    tokio::time::timeout(wait, d.connect(endpoint))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let req = zeromq::ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .map_err(|e| e.to_string())?;
    tokio::time::timeout(wait, d.send(req))
        .await
        .map_err(|_| "send timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    loop {
        let m = tokio::time::timeout(wait, d.recv())
            .await
            .map_err(|_| "replay timed out".to_string())?
            .map_err(|e| e.to_string())?
            .into_vec();
        if m.len() != 3 || m[1].len() != 8 {
            return Err(format!("bad replay message ({} frames)", m.len()));
        }
        if m[1][..] == END_SEQ {
            return Ok(out);
        }
        let n = u64::from_be_bytes(m[1][..].try_into().expect("8 bytes"));
        out.push((n, m[2].clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_hosts_resolve_to_the_engine() {
        assert_eq!(
            resolve_endpoint("tcp://0.0.0.0:5557", "10.1.2.3"),
            "tcp://10.1.2.3:5557"
        );
        assert_eq!(resolve_endpoint("tcp://*:9", "[::1]"), "tcp://[::1]:9");
        assert_eq!(
            resolve_endpoint("tcp://127.0.0.1:9", "10.1.2.3"),
            "tcp://127.0.0.1:9"
        );
        assert_eq!(host_of("127.0.0.1:8000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:8000"), "[::1]");
    }

    #[test]
    fn sequence_numbers_gaps_duplicates_and_restarts() {
        let mut s = SeqState::default();
        assert_eq!(s.on_live(0), Step::Apply);
        s.next = 1;
        // Missed 1..3: replay from 1.
        assert_eq!(
            s.on_live(4),
            Step::Resync {
                from: 1,
                restart: false
            }
        );
        s.next = 5; // the replay applied 1..=4
                    // Queued live copies of what the replay gave back are skipped... (5 was also
                    // replayed here).
        s.next = 6;
        assert_eq!(s.on_live(5), Step::Skip);
        assert_eq!(s.on_live(6), Step::Apply);
        s.next = 7;
        // A sequence number at or below the last live one: a new publisher.
        assert_eq!(
            s.on_live(2),
            Step::Resync {
                from: 0,
                restart: true
            }
        );
        assert_eq!(s.next, 0);
        // After a disconnect, a number below the expected one is a restart too.
        let mut s = SeqState::default();
        assert_eq!(s.on_live(0), Step::Apply);
        s.next = 1;
        s.disconnected();
        assert_eq!(s.on_live(1), Step::Apply);
        s.next = 2;
        s.disconnected();
        assert_eq!(
            s.on_live(5),
            Step::Resync {
                from: 2,
                restart: false
            }
        );
    }
}
