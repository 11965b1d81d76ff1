//! Redis as the remote tier, keeping chunks the way LMCache's Redis connectors do:
//! `SET <key>kv_bytes <payload>` then `SET <key>metadata <meta>`, where the metadata is
//! LMCache's `RemoteMetadata` for one group, seven native-endian `i32`s (length, fmt,
//! dtype, shape[4]). A chunk exists when its metadata does; a GET whose payload is gone
//! deletes the metadata too (as LMCache's does).
//!
//! Three topologies, as LMCache's `remote_url` spells them:
//! - `redis://HOST:PORT`: one server.
//! - `redis-sentinel://H:P[,H:P...][/NAME]`: Sentinels, asked in turn
//!   (`SENTINEL get-master-addr-by-name NAME`) for the master, which serves reads and
//!   writes. A connection failure or a `-READONLY` (a demoted master) makes the next
//!   attempt ask again, once per call.
//! - `redis-cluster://H:P[,H:P...]`: seeds for `CLUSTER SLOTS`; each key goes to the
//!   master of slot `CRC16(key) mod 16384` (hash tags `{...}` as Redis defines them),
//!   `-MOVED` updates the map (and the next call reloads it whole), `-ASK` is followed by
//!   `ASKING` on the named node. One connection per node.
//!
//! Credentials come before the hosts as in LMCache (`USER:PASSWORD@` or `:PASSWORD@`; for
//! Sentinel they are the master's), `redis://`'s `/DB` selects a database: each new
//! connection sends `AUTH` and `SELECT` first.
//!
//! Every operation has one deadline (LMCache's `blocking_timeout_secs`) covering all of its
//! round trips, redirects and re-resolutions; a node that failed to connect is not tried
//! again within its backoff (0.1 s doubling to 5 s), so a down tier costs one fast error.
//! Replies are bounded: lines of 4 KiB, bulk strings of 512 MiB (Redis's own
//! `proto-max-bulk-len` default), arrays of 65536 items, 8 levels deep.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::client::{ClientError, Exchange, Link};
use crate::lm::Meta;
use crate::store::Object;

/// LMCache's default Sentinel master name (`RedisSentinelConnector`).
pub const DEFAULT_SENTINEL_NAME: &str = "redismaster";

/// Redis Cluster's hash slots.
pub const SLOTS: u16 = 16384;

const MAX_LINE: usize = 4096;
/// The largest bulk string read: Redis's own `proto-max-bulk-len` default.
pub const MAX_BULK: usize = 512 << 20;
const MAX_ARRAY: usize = 1 << 16;
const MAX_DEPTH: usize = 8;
/// Redirects followed per command before giving up.
const MAX_REDIRECTS: usize = 5;

const METADATA_LEN: usize = 28;

fn meta_bytes(m: &Meta) -> [u8; METADATA_LEN] {
    let mut out = [0u8; METADATA_LEN];
    for (chunk, v) in out.chunks_exact_mut(4).zip([
        m.length, m.fmt, m.dtype, m.shape[0], m.shape[1], m.shape[2], m.shape[3],
    ]) {
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    out
}

fn meta_from(b: &[u8]) -> Option<Meta> {
    if b.len() < METADATA_LEN {
        return None;
    }
    let i = |n: usize| i32::from_ne_bytes([b[n * 4], b[n * 4 + 1], b[n * 4 + 2], b[n * 4 + 3]]);
    Some(Meta {
        length: i(0),
        fmt: i(1),
        dtype: i(2),
        shape: [i(3), i(4), i(5), i(6)],
    })
}

/// A RESP2 reply. Error replies are values: the stream stays in step after one.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<BytesMut>),
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// A simple or bulk string as text.
    fn text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) => Some(s.clone()),
            Resp::Bulk(Some(b)) => std::str::from_utf8(b).ok().map(str::to_string),
            _ => None,
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Resp::Int(n) => Some(*n),
            other => other.text().and_then(|t| t.parse().ok()),
        }
    }
}

fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

fn bad(what: &str) -> Exchange {
    Exchange::Io(std::io::Error::other(format!("redis: {what}")))
}

async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, Exchange> {
    let mut line = Vec::with_capacity(16);
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' && line.last() == Some(&b'\r') {
            line.pop();
            return Ok(line);
        }
        line.push(b);
        if line.len() > MAX_LINE {
            return Err(bad("reply line too long"));
        }
    }
}

type ReplyFuture<'a> = Pin<Box<dyn Future<Output = Result<Resp, Exchange>> + Send + 'a>>;

/// One reply, its sizes bounded (see the module's doc).
pub(crate) fn read_reply<R: AsyncRead + Unpin + Send>(r: &mut R, depth: usize) -> ReplyFuture<'_> {
    Box::pin(async move {
        let line = read_line(r).await?;
        let (kind, rest) = line.split_first().ok_or_else(|| bad("empty reply line"))?;
        let rest = std::str::from_utf8(rest).map_err(|_| bad("reply is not text"))?;
        let len = || -> Result<Option<usize>, Exchange> {
            let n: i64 = rest.parse().map_err(|_| bad("bad length"))?;
            Ok(usize::try_from(n).ok())
        };
        match kind {
            b'+' => Ok(Resp::Simple(rest.to_string())),
            b'-' => Ok(Resp::Error(rest.to_string())),
            b':' => rest.parse().map(Resp::Int).map_err(|_| bad("bad integer")),
            b'$' => {
                let Some(n) = len()? else {
                    return Ok(Resp::Bulk(None));
                };
                if n > MAX_BULK {
                    return Err(bad("bulk reply over 512 MiB"));
                }
                let mut data = BytesMut::new();
                data.resize(n + 2, 0);
                r.read_exact(&mut data).await?;
                data.truncate(n);
                Ok(Resp::Bulk(Some(data)))
            }
            b'*' => {
                let Some(n) = len()? else {
                    return Ok(Resp::Array(None));
                };
                if n > MAX_ARRAY || depth >= MAX_DEPTH {
                    return Err(bad("array reply too large or too deep"));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(read_reply(r, depth + 1).await?);
                }
                Ok(Resp::Array(Some(items)))
            }
            _ => Err(bad("unexpected reply type")),
        }
    })
}

/// `HOST:PORT`, with an IPv6 host in brackets.
fn join_host_port(host: &str, port: i64) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// How to log in on each new connection: `AUTH [USER] PASSWORD`, then `SELECT DB`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Login {
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: Option<u32>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "..."))
            .field("db", &self.db)
            .finish()
    }
}

impl Login {
    /// The commands a new connection starts with.
    fn commands(&self) -> Vec<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        if let Some(password) = &self.password {
            let mut auth = vec![b"AUTH".to_vec()];
            if let Some(user) = &self.user {
                auth.push(user.as_bytes().to_vec());
            }
            auth.push(password.as_bytes().to_vec());
            out.push(auth);
        }
        if let Some(db) = self.db.filter(|db| *db != 0) {
            out.push(vec![b"SELECT".to_vec(), db.to_string().into_bytes()]);
        }
        out
    }
}

/// One connection to one Redis server (kept open, reopened with backoff; logged in
/// first when it is new).
pub(crate) struct Node {
    link: Link,
    hello: Arc<Vec<Vec<Vec<u8>>>>,
}

impl Node {
    fn new(addr: String, timeout: Duration, hello: Arc<Vec<Vec<Vec<u8>>>>) -> Node {
        Node {
            link: Link::new(addr, timeout),
            hello,
        }
    }

    fn addr(&self) -> &str {
        &self.link.addr
    }

    /// Send `cmds` in one write and read one reply each, all by `deadline`.
    async fn pipeline(
        &self,
        cmds: &[&[&[u8]]],
        deadline: Instant,
    ) -> Result<Vec<Resp>, ClientError> {
        if Instant::now() >= deadline {
            return Err(ClientError::Timeout(self.link.addr.clone()));
        }
        let mut conn = self.link.connected(deadline).await?;
        let hello: &[Vec<Vec<u8>>] = if conn.fresh { &self.hello } else { &[] };
        let mut out = Vec::new();
        for h in hello {
            let args: Vec<&[u8]> = h.iter().map(Vec::as_slice).collect();
            encode(&mut out, &args);
        }
        for args in cmds {
            encode(&mut out, args);
        }
        let Some(stream) = conn.stream.as_mut() else {
            return Err(ClientError::Down(self.link.addr.clone()));
        };
        let io = async {
            stream.write_all(&out).await?;
            for _ in hello {
                if let Resp::Error(e) = read_reply(stream, 0).await? {
                    return Err(bad(&format!("login refused: {e}")));
                }
            }
            let mut got = Vec::with_capacity(cmds.len());
            for _ in 0..cmds.len() {
                got.push(read_reply(stream, 0).await?);
            }
            Ok(got)
        };
        let r = tokio::time::timeout_at(deadline, io).await;
        let r = self.link.settle(&mut conn, r);
        if r.is_ok() {
            conn.fresh = false;
        }
        r
    }

    async fn call(&self, args: &[&[u8]], deadline: Instant) -> Result<Resp, ClientError> {
        let mut r = self.pipeline(&[args], deadline).await?;
        r.pop()
            .ok_or_else(|| ClientError::Topology(format!("redis {}: no reply", self.addr())))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A Redis URL's hosts, path and credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    pub hosts: Vec<String>,
    /// After the last host's `/`: a Sentinel master name, a database number.
    pub path: Option<String>,
    pub login: Login,
}

/// `[USER:PASSWORD@ | :PASSWORD@]HOST:PORT[,[scheme://]HOST:PORT...][/PATH]` (the part
/// after `scheme://`), split as LMCache's Redis adapters split it: the credentials before
/// the first `@` (not percent-decoded), the hosts between commas.
pub fn parse_hosts(scheme: &str, rest: &str) -> Result<Hosts, String> {
    let prefix = format!("{scheme}://");
    let mut login = Login::default();
    let rest = match rest.split_once('@') {
        Some((auth, rest)) => {
            let (user, password) = auth
                .split_once(':')
                .filter(|(_, p)| !p.is_empty())
                .ok_or("expected USER:PASSWORD@ or :PASSWORD@ before the hosts")?;
            login.user = (!user.is_empty()).then(|| user.to_string());
            login.password = Some(password.to_string());
            rest
        }
        None => rest,
    };
    let mut hosts = Vec::new();
    let mut path = None;
    for piece in rest.split(',').map(str::trim) {
        let piece = piece.strip_prefix(&prefix).unwrap_or(piece);
        if piece.contains('@') {
            return Err("credentials go before the first host only".into());
        }
        if path.is_some() {
            return Err("the /PATH goes after the last host".into());
        }
        let (hp, p) = match piece.split_once('/') {
            Some((hp, p)) => (hp, Some(p.trim_matches('/'))),
            None => (piece, None),
        };
        match hp.rsplit_once(':') {
            Some((h, port)) if !h.is_empty() && port.parse::<u16>().is_ok() => {
                hosts.push(hp.to_string())
            }
            _ => return Err(format!("{hp:?} is not HOST:PORT")),
        }
        if let Some(p) = p.filter(|p| !p.is_empty()) {
            if p.contains(['/', '?', '#']) {
                return Err(format!("{p:?}: expected a name (no options)"));
            }
            path = Some(p.to_string());
        }
    }
    if hosts.is_empty() {
        return Err("no HOST:PORT".into());
    }
    Ok(Hosts { hosts, path, login })
}

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0, no reflection), Redis Cluster's key
/// hash.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster slot of `key`: only the part between the first `{` and the next `}` is
/// hashed when that part is not empty (a hash tag), else the whole key.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let tail = &key[open + 1..];
            let close = tail.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &tail[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS
}

/// A cluster redirect in an error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// `MOVED slot host:port`: the slot lives there now.
    Moved { slot: u16, addr: String },
    /// `ASK slot host:port`: this key, this once, is there (send `ASKING` first).
    Ask { slot: u16, addr: String },
}

impl Redirect {
    /// From an error reply's text; an empty host (`MOVED 1 :7001`, the node does not know
    /// its own address) means `host` (the node that answered).
    pub fn parse(error: &str, host: &str) -> Option<Redirect> {
        let mut words = error.split_ascii_whitespace();
        let kind = words.next()?;
        let slot: u16 = words.next()?.parse().ok().filter(|s| *s < SLOTS)?;
        let target = words.next()?;
        let (h, p) = target.rsplit_once(':')?;
        let port: u16 = p.parse().ok()?;
        let h = if h.is_empty() { host } else { h };
        let addr = join_host_port(h, i64::from(port));
        match kind {
            "MOVED" => Some(Redirect::Moved { slot, addr }),
            "ASK" => Some(Redirect::Ask { slot, addr }),
            _ => None,
        }
    }
}

/// `CLUSTER SLOTS`' reply → (first slot, last slot, master address) ranges. An empty or
/// `?` host means the node asked (`asked_host`).
fn parse_slots(reply: &Resp, asked_host: &str) -> Result<Vec<(u16, u16, String)>, String> {
    let Resp::Array(Some(ranges)) = reply else {
        return Err("CLUSTER SLOTS: not an array".into());
    };
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let Resp::Array(Some(items)) = r else {
            return Err("CLUSTER SLOTS: a range is not an array".into());
        };
        let slot = |i: usize| {
            items
                .get(i)
                .and_then(Resp::int)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n < SLOTS)
        };
        let (Some(first), Some(last)) = (slot(0), slot(1)) else {
            return Err("CLUSTER SLOTS: bad slot range".into());
        };
        let Some(Resp::Array(Some(master))) = items.get(2) else {
            return Err("CLUSTER SLOTS: a range without a master".into());
        };
        let host = master.first().and_then(Resp::text).unwrap_or_default();
        let port = master
            .get(1)
            .and_then(Resp::int)
            .filter(|p| (1..=65535).contains(p))
            .ok_or("CLUSTER SLOTS: bad port")?;
        let host = if host.is_empty() || host == "?" {
            asked_host
        } else {
            &host
        };
        if first <= last {
            out.push((first, last, join_host_port(host, port)));
        }
    }
    Ok(out)
}

/// Redis Sentinel: the master found through the sentinels.
struct Sentinel {
    sentinels: Vec<Node>,
    name: String,
    timeout: Duration,
    /// The master's login.
    hello: Arc<Vec<Vec<Vec<u8>>>>,
    master: Mutex<Option<Arc<Node>>>,
}

impl Sentinel {
    /// Ask each sentinel in turn for the master's address.
    async fn resolve(&self, deadline: Instant) -> Result<Arc<Node>, ClientError> {
        let mut last = None;
        let ask: [&[u8]; 3] = [
            b"SENTINEL",
            b"get-master-addr-by-name",
            self.name.as_bytes(),
        ];
        for s in &self.sentinels {
            let why = match s.call(&ask, deadline).await {
                Ok(Resp::Array(Some(v))) => {
                    let host = v.first().and_then(Resp::text);
                    let port = v
                        .get(1)
                        .and_then(Resp::int)
                        .filter(|p| (1..=65535).contains(p));
                    if let (Some(host), Some(port)) = (host, port) {
                        let addr = join_host_port(&host, port);
                        let mut master = lock(&self.master);
                        if let Some(m) = master.as_ref().filter(|m| m.addr() == addr) {
                            return Ok(m.clone());
                        }
                        tracing::info!(master = %addr, name = %self.name, sentinel = %s.addr(), "redis sentinel: master found");
                        let m = Arc::new(Node::new(addr, self.timeout, self.hello.clone()));
                        *master = Some(m.clone());
                        return Ok(m);
                    }
                    ClientError::Topology(format!(
                        "redis sentinel {}: bad reply to get-master-addr-by-name",
                        s.addr()
                    ))
                }
                Ok(Resp::Array(None)) | Ok(Resp::Bulk(None)) => ClientError::Topology(format!(
                    "redis sentinel {}: no master named {:?}",
                    s.addr(),
                    self.name
                )),
                Ok(Resp::Error(message)) => ClientError::Reply {
                    addr: s.addr().to_string(),
                    message,
                },
                Ok(_) => {
                    ClientError::Topology(format!("redis sentinel {}: unexpected reply", s.addr()))
                }
                Err(e) => e,
            };
            tracing::debug!(error = %why, "redis sentinel: no answer");
            last = Some(why);
        }
        Err(last.unwrap_or_else(|| ClientError::Topology("no sentinel given".into())))
    }

    async fn call(&self, args: &[&[u8]], deadline: Instant) -> Result<Resp, ClientError> {
        let known = lock(&self.master).clone();
        let (node, fresh) = match known {
            Some(n) => (n, false),
            None => (self.resolve(deadline).await?, true),
        };
        let r = node.call(args, deadline).await;
        // The master may have moved: a demoted one says READONLY, a dead one does not
        // answer. Ask the sentinels again (once) and retry if that changes anything.
        let retry = match &r {
            Ok(Resp::Error(e)) => e.starts_with("READONLY"),
            Err(ClientError::Timeout(_)) => false,
            Err(_) => true,
            Ok(_) => false,
        };
        if !retry || fresh {
            return r;
        }
        let again = self.resolve(deadline).await?;
        let broken = matches!(r, Err(ClientError::Io { .. }));
        if Arc::ptr_eq(&again, &node) && !broken {
            return r;
        }
        again.call(args, deadline).await
    }
}

/// The slot map: each slot's master, one [`Node`] per address.
struct SlotMap {
    owner: Vec<Option<Arc<Node>>>,
    nodes: HashMap<String, Arc<Node>>,
    /// Reload the whole map before the next command (after a MOVED or a failed node).
    stale: bool,
}

/// Redis Cluster: keys routed by slot.
struct Cluster {
    seeds: Vec<Arc<Node>>,
    hello: Arc<Vec<Vec<Vec<u8>>>>,
    timeout: Duration,
    map: Mutex<SlotMap>,
}

impl Cluster {
    fn node(&self, map: &mut SlotMap, addr: &str) -> Arc<Node> {
        if let Some(n) = map.nodes.get(addr) {
            return n.clone();
        }
        let n = self
            .seeds
            .iter()
            .find(|s| s.addr() == addr)
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(Node::new(
                    addr.to_string(),
                    self.timeout,
                    self.hello.clone(),
                ))
            });
        map.nodes.insert(addr.to_string(), n.clone());
        n
    }

    /// Load the slot map from the first node (known ones, then seeds) that gives one.
    async fn refresh(&self, deadline: Instant) -> Result<(), ClientError> {
        let mut candidates: Vec<Arc<Node>> = lock(&self.map).nodes.values().cloned().collect();
        for s in &self.seeds {
            if !candidates.iter().any(|c| c.addr() == s.addr()) {
                candidates.push(s.clone());
            }
        }
        let mut last = None;
        for n in candidates {
            let why = match n.call(&[b"CLUSTER", b"SLOTS"], deadline).await {
                Ok(Resp::Error(message)) => ClientError::Reply {
                    addr: n.addr().to_string(),
                    message,
                },
                Ok(reply) => match parse_slots(&reply, host_of(n.addr())) {
                    Ok(ranges) if !ranges.is_empty() => {
                        self.install(&ranges);
                        tracing::debug!(from = %n.addr(), ranges = ranges.len(), "redis cluster: slot map loaded");
                        return Ok(());
                    }
                    Ok(_) => ClientError::Topology(format!(
                        "redis cluster {}: no slots assigned",
                        n.addr()
                    )),
                    Err(e) => ClientError::Topology(format!("redis cluster {}: {e}", n.addr())),
                },
                Err(e) => e,
            };
            tracing::debug!(error = %why, "redis cluster: no slot map");
            last = Some(why);
        }
        Err(last.unwrap_or_else(|| ClientError::Topology("no cluster node given".into())))
    }

    fn install(&self, ranges: &[(u16, u16, String)]) {
        let mut map = lock(&self.map);
        let old = std::mem::take(&mut map.nodes);
        let mut owner = vec![None; usize::from(SLOTS)];
        for (first, last, addr) in ranges {
            let n = match old.get(addr) {
                Some(n) => {
                    map.nodes.insert(addr.clone(), n.clone());
                    n.clone()
                }
                None => self.node(&mut map, addr),
            };
            for s in *first..=*last {
                owner[usize::from(s)] = Some(n.clone());
            }
        }
        map.owner = owner;
        map.stale = false;
    }

    /// The node serving `slot`, the map (re)loaded first if need be.
    async fn owner(&self, slot: u16, deadline: Instant) -> Result<Arc<Node>, ClientError> {
        let (found, stale) = {
            let map = lock(&self.map);
            let found = map.owner.get(usize::from(slot)).cloned().flatten();
            (found, map.stale || map.owner.is_empty())
        };
        if let (Some(n), false) = (&found, stale) {
            return Ok(n.clone());
        }
        match self.refresh(deadline).await {
            Ok(()) => {}
            // A map we had still routes (its node answers MOVED if it is wrong).
            Err(e) => return found.ok_or(e),
        }
        lock(&self.map)
            .owner
            .get(usize::from(slot))
            .cloned()
            .flatten()
            .ok_or_else(|| {
                ClientError::Topology(format!("redis cluster: slot {slot} is not served"))
            })
    }

    async fn call(
        &self,
        key: &[u8],
        args: &[&[u8]],
        deadline: Instant,
    ) -> Result<Resp, ClientError> {
        let mut node = self.owner(key_slot(key), deadline).await?;
        let mut asking = false;
        for _ in 0..=MAX_REDIRECTS {
            let r = if asking {
                node.pipeline(&[&[b"ASKING"], args], deadline)
                    .await
                    .map(|mut v| v.pop())
                    .and_then(|r| r.ok_or_else(|| ClientError::Topology("redis: no reply".into())))
            } else {
                node.call(args, deadline).await
            };
            let message = match r {
                Ok(Resp::Error(message)) => message,
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    // A failover may have moved its slots: reload the map next time.
                    lock(&self.map).stale = true;
                    return Err(e);
                }
            };
            match Redirect::parse(&message, host_of(node.addr())) {
                Some(Redirect::Moved { slot, addr }) => {
                    let mut map = lock(&self.map);
                    let n = self.node(&mut map, &addr);
                    if let Some(o) = map.owner.get_mut(usize::from(slot)) {
                        *o = Some(n.clone());
                    }
                    map.stale = true;
                    node = n;
                    asking = false;
                }
                Some(Redirect::Ask { addr, .. }) => {
                    node = self.node(&mut lock(&self.map), &addr);
                    asking = true;
                }
                None => {
                    return Err(ClientError::Reply {
                        addr: node.addr().to_string(),
                        message,
                    })
                }
            }
        }
        Err(ClientError::Topology(format!(
            "redis cluster: more than {MAX_REDIRECTS} redirects"
        )))
    }
}

enum Mode {
    Single(Node),
    Sentinel(Sentinel),
    Cluster(Cluster),
}

/// Chunks in Redis (one server, behind Sentinel, or a Cluster) as LMCache keeps them.
pub struct RedisClient {
    mode: Mode,
    /// What [`RedisClient::addr`] says (a consistent-hashing ring hashes it).
    label: String,
    timeout: Duration,
}

impl RedisClient {
    /// One server at `addr` (`HOST:PORT`); each call gives up after `timeout`.
    pub fn new(addr: impl Into<String>, timeout: Duration) -> RedisClient {
        RedisClient::with_login(addr.into(), Login::default(), timeout)
    }

    /// One server at `addr`, each new connection logged in with `login`.
    pub fn with_login(addr: String, login: Login, timeout: Duration) -> RedisClient {
        RedisClient {
            label: addr.clone(),
            mode: Mode::Single(Node::new(addr, timeout, Arc::new(login.commands()))),
            timeout,
        }
    }

    /// The master named `name`, found through `sentinels` (`HOST:PORT` each; asked
    /// without credentials), logged in with `login`.
    pub fn sentinel(
        sentinels: Vec<String>,
        name: String,
        login: Login,
        timeout: Duration,
    ) -> RedisClient {
        let none = Arc::new(Vec::new());
        RedisClient {
            label: format!("redis-sentinel://{}/{name}", sentinels.join(",")),
            mode: Mode::Sentinel(Sentinel {
                sentinels: sentinels
                    .into_iter()
                    .map(|a| Node::new(a, timeout, none.clone()))
                    .collect(),
                name,
                timeout,
                hello: Arc::new(login.commands()),
                master: Mutex::new(None),
            }),
            timeout,
        }
    }

    /// A Redis Cluster, its slot map asked of `seeds` (`HOST:PORT` each) first; every
    /// node logged in with `login`.
    pub fn cluster(seeds: Vec<String>, login: Login, timeout: Duration) -> RedisClient {
        let hello = Arc::new(login.commands());
        RedisClient {
            label: format!("redis-cluster://{}", seeds.join(",")),
            mode: Mode::Cluster(Cluster {
                seeds: seeds
                    .into_iter()
                    .map(|a| Arc::new(Node::new(a, timeout, hello.clone())))
                    .collect(),
                hello,
                timeout,
                map: Mutex::new(SlotMap {
                    owner: Vec::new(),
                    nodes: HashMap::new(),
                    stale: true,
                }),
            }),
            timeout,
        }
    }

    pub fn addr(&self) -> &str {
        &self.label
    }

    /// One command whose key is `args[1]`; error replies become errors.
    async fn cmd(&self, args: &[&[u8]], deadline: Instant) -> Result<Resp, ClientError> {
        let r = match &self.mode {
            Mode::Single(n) => n.call(args, deadline).await,
            Mode::Sentinel(s) => s.call(args, deadline).await,
            Mode::Cluster(c) => {
                c.call(args.get(1).copied().unwrap_or_default(), args, deadline)
                    .await
            }
        }?;
        match r {
            Resp::Error(message) => Err(ClientError::Reply {
                addr: self.label.clone(),
                message,
            }),
            r => Ok(r),
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// `<key>kv_bytes` first, then `<key>metadata` (a reader never finds metadata without
    /// its payload, except after an eviction).
    pub async fn put(&self, key: &str, meta: Meta, data: &[u8]) -> Result<(), ClientError> {
        let deadline = self.deadline();
        let meta = Meta {
            length: i32::try_from(data.len()).unwrap_or(i32::MAX),
            ..meta
        };
        let kv = format!("{key}kv_bytes");
        let md = format!("{key}metadata");
        self.cmd(&[b"SET", kv.as_bytes(), data], deadline).await?;
        self.cmd(&[b"SET", md.as_bytes(), &meta_bytes(&meta)], deadline)
            .await?;
        Ok(())
    }

    pub async fn exists(&self, key: &str) -> Result<bool, ClientError> {
        let md = format!("{key}metadata");
        let r = self
            .cmd(&[b"EXISTS", md.as_bytes()], self.deadline())
            .await?;
        Ok(matches!(r, Resp::Int(n) if n > 0))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Object>, ClientError> {
        let deadline = self.deadline();
        let md = format!("{key}metadata");
        let Resp::Bulk(Some(m)) = self.cmd(&[b"GET", md.as_bytes()], deadline).await? else {
            return Ok(None);
        };
        let Some(meta) = meta_from(&m) else {
            return Ok(None);
        };
        let kv = format!("{key}kv_bytes");
        match self.cmd(&[b"GET", kv.as_bytes()], deadline).await? {
            Resp::Bulk(Some(data)) => Ok(Some(Object {
                meta,
                data: data.freeze(),
            })),
            _ => {
                self.cmd(&[b"DEL", md.as_bytes()], deadline).await?;
                Ok(None)
            }
        }
    }

    /// `PING` (the master's, or a node's for a cluster: a key's): true when it answers.
    pub async fn ping(&self) -> Result<bool, ClientError> {
        let r = match &self.mode {
            Mode::Single(n) => n.call(&[b"PING"], self.deadline()).await?,
            Mode::Sentinel(s) => s.call(&[b"PING"], self.deadline()).await?,
            Mode::Cluster(c) => c.call(b"", &[b"PING"], self.deadline()).await?,
        };
        Ok(matches!(r, Resp::Simple(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_and_slots_match_redis() {
        // The check value the Redis Cluster spec gives for its CRC16.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        // `CLUSTER KEYSLOT foo` and `bar`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        // Hash tags, the spec's examples.
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"{"), crc16(b"{") % SLOTS);
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn redirects_parse() {
        assert_eq!(
            Redirect::parse("MOVED 3999 127.0.0.1:6381", "x"),
            Some(Redirect::Moved {
                slot: 3999,
                addr: "127.0.0.1:6381".into()
            })
        );
        assert_eq!(
            Redirect::parse("ASK 3999 10.0.0.2:7000", "x"),
            Some(Redirect::Ask {
                slot: 3999,
                addr: "10.0.0.2:7000".into()
            })
        );
        // No host: the node that answered.
        assert_eq!(
            Redirect::parse("MOVED 1 :7001", "10.1.1.1"),
            Some(Redirect::Moved {
                slot: 1,
                addr: "10.1.1.1:7001".into()
            })
        );
        assert_eq!(
            Redirect::parse("MOVED 2 ::1:7001", "x"),
            Some(Redirect::Moved {
                slot: 2,
                addr: "[::1]:7001".into()
            })
        );
        for not in [
            "ERR unknown command",
            "MOVED 16384 a:1",
            "MOVED x a:1",
            "MOVED 1 a",
            "MOVED 1 a:99999",
            "READONLY You can't write against a read only replica.",
            "",
        ] {
            assert_eq!(Redirect::parse(not, "h"), None, "{not}");
        }
    }

    #[test]
    fn hosts_parse_as_lmcache_writes_them() {
        let h = parse_hosts("redis-sentinel", "a:26379,b:26380").expect("ok");
        assert_eq!(h.hosts, ["a:26379", "b:26380"]);
        assert_eq!((h.path, h.login), (None, Login::default()));
        let h = parse_hosts(
            "redis-sentinel",
            "u:p@w@a:26379,redis-sentinel://b:26380/mymaster",
        );
        assert!(h.is_err(), "an @ in the hosts");
        let h = parse_hosts(
            "redis-sentinel",
            "u:p:w@a:26379,redis-sentinel://b:26380/mymaster",
        )
        .expect("ok");
        assert_eq!(h.hosts, ["a:26379", "b:26380"]);
        assert_eq!(h.path.as_deref(), Some("mymaster"));
        assert_eq!(h.login.user.as_deref(), Some("u"));
        assert_eq!(h.login.password.as_deref(), Some("p:w"));
        assert!(
            !format!("{:?}", h.login).contains("p:w"),
            "no password in logs"
        );
        let h = parse_hosts("redis-cluster", ":secret@a:1").expect("ok");
        assert_eq!(
            (h.login.user, h.login.password.as_deref()),
            (None, Some("secret"))
        );
        assert!(parse_hosts("redis-cluster", "user@a:1").is_err());
        assert!(parse_hosts("redis-cluster", "user:@a:1").is_err());
        assert!(parse_hosts("redis-cluster", "a:1/x,b:2").is_err());
        assert!(parse_hosts("redis", "a:1/0?x=1").is_err());
        assert!(parse_hosts("redis-cluster", "a").is_err());
        assert!(parse_hosts("redis-cluster", "a:70000").is_err());
        assert!(parse_hosts("redis-cluster", "").is_err());
        let login = Login {
            user: Some("u".into()),
            password: Some("p".into()),
            db: Some(2),
        };
        let want: Vec<Vec<Vec<u8>>> = vec![
            vec![b"AUTH".to_vec(), b"u".to_vec(), b"p".to_vec()],
            vec![b"SELECT".to_vec(), b"2".to_vec()],
        ];
        assert_eq!(login.commands(), want);
        assert!(Login::default().commands().is_empty());
    }

    async fn parse(bytes: &[u8]) -> Result<Resp, Exchange> {
        let mut r = bytes;
        read_reply(&mut r, 0).await
    }

    #[tokio::test]
    async fn replies_parse_and_sizes_are_bounded() {
        let slots = b"*2\r\n*3\r\n:0\r\n:8191\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n\
                      *3\r\n:8192\r\n:16383\r\n*2\r\n$0\r\n\r\n:7001\r\n";
        let r = parse(slots).await.ok().expect("parses");
        let ranges = parse_slots(&r, "10.0.0.9").expect("slots");
        assert_eq!(
            ranges,
            [
                (0, 8191, "127.0.0.1:7000".to_string()),
                (8192, 16383, "10.0.0.9:7001".to_string())
            ]
        );
        assert_eq!(
            parse(b"-MOVED 1 a:1\r\n").await.ok(),
            Some(Resp::Error("MOVED 1 a:1".into()))
        );
        assert_eq!(parse(b"$-1\r\n").await.ok(), Some(Resp::Bulk(None)));
        assert_eq!(parse(b"*-1\r\n").await.ok(), Some(Resp::Array(None)));
        assert!(parse(b"$600000000\r\n").await.is_err(), "bulk over the cap");
        assert!(parse(b"*70000\r\n").await.is_err(), "array over the cap");
        let deep = "*1\r\n".repeat(20) + ":1\r\n";
        assert!(parse(deep.as_bytes()).await.is_err(), "too deep");
        assert!(parse(b"$5\r\nab").await.is_err(), "cut short");
        assert!(parse(b"?x\r\n").await.is_err());
    }

    #[tokio::test]
    async fn a_down_or_silent_tier_costs_one_bounded_error() {
        let t = Duration::from_millis(300);
        // Nothing listens: an error at once, then refused within the backoff.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let down = free.local_addr().expect("addr").to_string();
        drop(free);
        for c in [
            RedisClient::sentinel(vec![down.clone()], "m".into(), Login::default(), t),
            RedisClient::cluster(vec![down.clone()], Login::default(), t),
        ] {
            assert!(c.get("k").await.is_err(), "{}", c.addr());
            assert!(
                matches!(c.get("k").await, Err(ClientError::Down(_))),
                "{}",
                c.addr()
            );
        }
        // Accepts (the backlog does) and never answers: one deadline for the whole call.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("addr").to_string();
        for c in [
            RedisClient::sentinel(
                vec![addr.clone(), addr.clone()],
                "m".into(),
                Login::default(),
                t,
            ),
            RedisClient::cluster(vec![addr.clone(), addr.clone()], Login::default(), t),
            RedisClient::new(addr.clone(), t),
        ] {
            let started = std::time::Instant::now();
            assert!(
                matches!(
                    c.put("k", Meta::NONE, b"x").await,
                    Err(ClientError::Timeout(_))
                ),
                "{}",
                c.addr()
            );
            let took = started.elapsed();
            assert!(
                took >= t && took < t + Duration::from_millis(200),
                "{}: {took:?}",
                c.addr()
            );
        }
    }

    #[test]
    fn metadata_round_trips() {
        let m = Meta {
            length: 7,
            fmt: 1,
            dtype: 2,
            shape: [2, 30, 256, 192],
        };
        let b = meta_bytes(&m);
        let back = meta_from(&b).expect("28 bytes");
        assert_eq!((back.length, back.shape), (7, [2, 30, 256, 192]));
        assert!(meta_from(&b[..27]).is_none());
    }
}
