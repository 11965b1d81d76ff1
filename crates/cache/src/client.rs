//! The client side of `lm://`: what engines (the remote tier) and `switchyard bench
//! cache` use to reach cache servers, ours or LMCache's own `lmcache_server`.
//!
//! - [`LmClient`]: one connection to one server, requests strictly in order (the
//!   protocol has no request ids). Every call has a deadline; a connection that failed
//!   or timed out is dropped, and reconnecting backs off (0.1 s doubling to 5 s), so a
//!   server that is down costs a caller one fast error, not a hang.
//! - [`RedisClient`]: chunks in Redis as LMCache's Redis connector keeps them.
//! - [`Remote`]: several servers (`lm://a:1,lm://b:2`, `redis://` too), chunks spread by
//!   consistent hashing of the key (64 points per server on a ring), so adding a server
//!   moves only its share of the keys.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lm::{self, Meta, Reply, Request, WireError};
use crate::store::Object;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cache server {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("cache server {0}: down, not retried yet")]
    Down(String),
    #[error("cache server {0}: timed out")]
    Timeout(String),
    #[error("cache server {addr}: {source}")]
    Wire { addr: String, source: WireError },
}

struct Conn {
    stream: Option<TcpStream>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One connection to one server, kept open and reopened with backoff.
struct Link {
    addr: String,
    timeout: Duration,
    conn: tokio::sync::Mutex<Conn>,
}

impl Link {
    fn new(addr: String, timeout: Duration) -> Link {
        Link {
            addr,
            timeout,
            conn: tokio::sync::Mutex::new(Conn {
                stream: None,
                retry_at: None,
                backoff: BACKOFF_MIN,
            }),
        }
    }

    /// The connection, opened first if need be (at most one attempt per backoff period).
    async fn connected(&self) -> Result<tokio::sync::MutexGuard<'_, Conn>, ClientError> {
        let mut conn = self.conn.lock().await;
        let now = Instant::now();
        if conn.stream.is_none() {
            if conn.retry_at.is_some_and(|t| now < t) {
                return Err(ClientError::Down(self.addr.clone()));
            }
            let connect = tokio::time::timeout(self.timeout, TcpStream::connect(&self.addr)).await;
            match connect {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    conn.stream = Some(s);
                    conn.retry_at = None;
                    conn.backoff = BACKOFF_MIN;
                }
                failed => {
                    conn.retry_at = Some(now + conn.backoff);
                    conn.backoff = (conn.backoff * 2).min(BACKOFF_MAX);
                    return Err(match failed {
                        Ok(Err(source)) => ClientError::Io {
                            addr: self.addr.clone(),
                            source,
                        },
                        _ => ClientError::Timeout(self.addr.clone()),
                    });
                }
            }
        }
        Ok(conn)
    }

    /// The outcome of one exchange run within the deadline; any failure drops the
    /// connection (where the stream stands is unknown), so the next call starts over.
    fn settle<T>(
        &self,
        conn: &mut Conn,
        r: Result<Result<T, Exchange>, tokio::time::error::Elapsed>,
    ) -> Result<T, ClientError> {
        let result = match r {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(Exchange::Io(source))) => Err(ClientError::Io {
                addr: self.addr.clone(),
                source,
            }),
            Ok(Err(Exchange::Wire(source))) => Err(ClientError::Wire {
                addr: self.addr.clone(),
                source,
            }),
            Err(_) => Err(ClientError::Timeout(self.addr.clone())),
        };
        if result.is_err() {
            conn.stream = None;
        }
        result
    }
}

/// One connection to one `lm://` cache server.
pub struct LmClient {
    link: Link,
}

impl LmClient {
    /// `addr` is `HOST:PORT`; each call gives up after `timeout`.
    pub fn new(addr: impl Into<String>, timeout: Duration) -> LmClient {
        LmClient {
            link: Link::new(addr.into(), timeout),
        }
    }

    pub fn addr(&self) -> &str {
        &self.link.addr
    }

    /// Store `data` under `key` (no reply comes: done once the bytes are written).
    pub async fn put(&self, key: &str, meta: Meta, data: &[u8]) -> Result<(), ClientError> {
        let meta = Meta {
            length: i32::try_from(data.len())
                .map_err(|_| self.wire(WireError::NegativeLength(-1)))?,
            ..meta
        };
        self.call(Request::new(lm::PUT, meta, key), data)
            .await
            .map(|_| ())
    }

    /// The object under `key`, or `None` on a miss.
    pub async fn get(&self, key: &str) -> Result<Option<Object>, ClientError> {
        self.call(Request::new(lm::GET, Meta::NONE, key), &[]).await
    }

    pub async fn exists(&self, key: &str) -> Result<bool, ClientError> {
        Ok(self
            .call(Request::new(lm::EXIST, Meta::NONE, key), &[])
            .await?
            .is_some())
    }

    fn wire(&self, source: WireError) -> ClientError {
        ClientError::Wire {
            addr: self.link.addr.clone(),
            source,
        }
    }

    /// Send one request; for GET/EXIST read the reply (`Some` on success, with the
    /// payload for a GET hit).
    async fn call(&self, req: Request, body: &[u8]) -> Result<Option<Object>, ClientError> {
        let header = req.encode().map_err(|e| self.wire(e))?;
        let command = req.command;
        let mut conn = self.link.connected().await?;
        let Some(stream) = conn.stream.as_mut() else {
            return Err(ClientError::Down(self.link.addr.clone()));
        };
        let r =
            tokio::time::timeout(self.link.timeout, exchange(stream, &header, body, command)).await;
        self.link.settle(&mut conn, r)
    }
}

/// One connection to a Redis server holding chunks the way LMCache's Redis connector
/// does: `SET <key>kv_bytes <payload>` and `SET <key>metadata <meta>`, where the metadata
/// is LMCache's `RemoteMetadata` for one group, seven native-endian `i32`s: length, fmt,
/// dtype, shape[4]. A chunk exists when its metadata does; a GET whose payload is gone
/// deletes the metadata too (as LMCache's does).
pub struct RedisClient {
    link: Link,
}

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

/// A RESP2 reply, as far as these commands need.
enum Resp {
    Ok,
    Int(i64),
    Bulk(Option<BytesMut>),
}

fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

async fn read_line(stream: &mut TcpStream) -> Result<Vec<u8>, Exchange> {
    let mut line = Vec::with_capacity(16);
    loop {
        let b = stream.read_u8().await?;
        if b == b'\n' && line.last() == Some(&b'\r') {
            line.pop();
            return Ok(line);
        }
        line.push(b);
        if line.len() > 4096 {
            return Err(Exchange::Io(std::io::Error::other(
                "redis: reply line too long",
            )));
        }
    }
}

async fn read_reply(stream: &mut TcpStream) -> Result<Resp, Exchange> {
    let line = read_line(stream).await?;
    let bad = || Exchange::Io(std::io::Error::other("redis: unexpected reply"));
    let (kind, rest) = line.split_first().ok_or_else(bad)?;
    let rest = std::str::from_utf8(rest).map_err(|_| bad())?;
    match kind {
        b'+' => Ok(Resp::Ok),
        b'-' => Err(Exchange::Io(std::io::Error::other(format!(
            "redis: {rest}"
        )))),
        b':' => rest.parse().map(Resp::Int).map_err(|_| bad()),
        b'$' => {
            let n: i64 = rest.parse().map_err(|_| bad())?;
            if n < 0 {
                return Ok(Resp::Bulk(None));
            }
            let mut data = BytesMut::new();
            data.resize(n as usize + 2, 0);
            stream.read_exact(&mut data).await?;
            data.truncate(n as usize);
            Ok(Resp::Bulk(Some(data)))
        }
        _ => Err(bad()),
    }
}

impl RedisClient {
    pub fn new(addr: impl Into<String>, timeout: Duration) -> RedisClient {
        RedisClient {
            link: Link::new(addr.into(), timeout),
        }
    }

    pub fn addr(&self) -> &str {
        &self.link.addr
    }

    async fn roundtrip(&self, args: &[&[u8]], replies: usize) -> Result<Vec<Resp>, ClientError> {
        let mut out = Vec::new();
        command(&mut out, args);
        let mut conn = self.link.connected().await?;
        let Some(stream) = conn.stream.as_mut() else {
            return Err(ClientError::Down(self.link.addr.clone()));
        };
        let io = async {
            stream.write_all(&out).await?;
            let mut got = Vec::with_capacity(replies);
            for _ in 0..replies {
                got.push(read_reply(stream).await?);
            }
            Ok(got)
        };
        let r = tokio::time::timeout(self.link.timeout, io).await;
        self.link.settle(&mut conn, r)
    }

    pub async fn put(&self, key: &str, meta: Meta, data: &[u8]) -> Result<(), ClientError> {
        let meta = Meta {
            length: data.len() as i32,
            ..meta
        };
        let kv = format!("{key}kv_bytes");
        let md = format!("{key}metadata");
        self.roundtrip(&[b"SET", kv.as_bytes(), data], 1).await?;
        self.roundtrip(&[b"SET", md.as_bytes(), &meta_bytes(&meta)], 1)
            .await?;
        Ok(())
    }

    pub async fn exists(&self, key: &str) -> Result<bool, ClientError> {
        let md = format!("{key}metadata");
        let r = self.roundtrip(&[b"EXISTS", md.as_bytes()], 1).await?;
        Ok(matches!(r.first(), Some(Resp::Int(n)) if *n > 0))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Object>, ClientError> {
        let md = format!("{key}metadata");
        let r = self.roundtrip(&[b"GET", md.as_bytes()], 1).await?;
        let Some(Resp::Bulk(Some(m))) = r.into_iter().next() else {
            return Ok(None);
        };
        let Some(meta) = meta_from(&m) else {
            return Ok(None);
        };
        let kv = format!("{key}kv_bytes");
        let r = self.roundtrip(&[b"GET", kv.as_bytes()], 1).await?;
        match r.into_iter().next() {
            Some(Resp::Bulk(Some(data))) => Ok(Some(Object {
                meta,
                data: data.freeze(),
            })),
            _ => {
                self.roundtrip(&[b"DEL", md.as_bytes()], 1).await?;
                Ok(None)
            }
        }
    }

    /// `PING`: true when the server answers.
    pub async fn ping(&self) -> Result<bool, ClientError> {
        let r = self.roundtrip(&[b"PING"], 1).await?;
        Ok(matches!(r.first(), Some(Resp::Ok)))
    }
}

/// One server of a [`Remote`]: LMCache's `lm://` server or Redis.
pub enum Shard {
    Lm(LmClient),
    Redis(RedisClient),
}

impl Shard {
    pub fn addr(&self) -> &str {
        match self {
            Shard::Lm(c) => c.addr(),
            Shard::Redis(c) => c.addr(),
        }
    }

    pub async fn put(&self, key: &str, meta: Meta, data: &[u8]) -> Result<(), ClientError> {
        match self {
            Shard::Lm(c) => c.put(key, meta, data).await,
            Shard::Redis(c) => c.put(key, meta, data).await,
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Object>, ClientError> {
        match self {
            Shard::Lm(c) => c.get(key).await,
            Shard::Redis(c) => c.get(key).await,
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, ClientError> {
        match self {
            Shard::Lm(c) => c.exists(key).await,
            Shard::Redis(c) => c.exists(key).await,
        }
    }
}

/// `lm://HOST:PORT` or `redis://HOST:PORT` → a shard.
pub fn parse_url(url: &str, timeout: Duration) -> Result<Shard, String> {
    let u = url.trim().trim_end_matches('/');
    let (scheme, rest) = u
        .split_once("://")
        .ok_or_else(|| format!("{url}: expected lm://HOST:PORT or redis://HOST:PORT"))?;
    let ok =
        matches!(rest.rsplit_once(':'), Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok());
    match scheme {
        "lm" if ok => Ok(Shard::Lm(LmClient::new(rest, timeout))),
        "redis" if ok => Ok(Shard::Redis(RedisClient::new(rest, timeout))),
        "redis" => Err(format!(
            "{url}: expected redis://HOST:PORT (no database or password)"
        )),
        "redis-cluster" | "redis-sentinel" | "rediss" => Err(format!(
            "{url}: {scheme}:// is not supported yet (redis:// and lm:// are)"
        )),
        _ => Err(format!(
            "{url}: expected lm://HOST:PORT or redis://HOST:PORT"
        )),
    }
}

enum Exchange {
    Io(std::io::Error),
    Wire(WireError),
}

impl From<std::io::Error> for Exchange {
    fn from(e: std::io::Error) -> Self {
        Exchange::Io(e)
    }
}

async fn exchange(
    stream: &mut TcpStream,
    header: &[u8],
    body: &[u8],
    command: i32,
) -> Result<Option<Object>, Exchange> {
    stream.write_all(header).await?;
    if !body.is_empty() {
        stream.write_all(body).await?;
    }
    if command == lm::PUT || command == lm::LIST {
        return Ok(Some(Object {
            meta: Meta::NONE,
            data: Bytes::new(),
        }));
    }
    let mut head = [0u8; lm::REPLY_LEN];
    stream.read_exact(&mut head).await?;
    let reply = Reply::decode(&head).map_err(Exchange::Wire)?;
    if reply.code != lm::SUCCESS {
        return Ok(None);
    }
    let mut data = BytesMut::new();
    if command == lm::GET {
        let len = reply.meta.length as usize;
        data.resize(len, 0);
        stream.read_exact(&mut data).await?;
    }
    Ok(Some(Object {
        meta: reply.meta,
        data: data.freeze(),
    }))
}

/// `lm://HOST:PORT` → `HOST:PORT`.
pub fn parse_lm_url(url: &str) -> Result<String, String> {
    let rest = url
        .trim()
        .strip_prefix("lm://")
        .ok_or_else(|| format!("{url}: expected lm://HOST:PORT"))?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(rest.to_string()),
        _ => Err(format!("{url}: expected lm://HOST:PORT")),
    }
}

/// Several cache servers, each key on one of them by consistent hashing.
pub struct Remote {
    shards: Vec<Shard>,
    /// (point, shard), sorted by point.
    ring: Vec<(u64, usize)>,
}

/// Points per server on the ring.
const POINTS: u64 = 64;

fn hash64(s: &[u8]) -> u64 {
    // FNV-1a, then SplitMix64's finalizer: fixed across processes and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Remote {
    /// From `lm://a:1[,lm://b:2...]` (or `redis://` servers).
    pub fn from_urls(urls: &str, timeout: Duration) -> Result<Remote, String> {
        let shards: Vec<Shard> = urls
            .split(',')
            .filter(|u| !u.trim().is_empty())
            .map(|u| parse_url(u, timeout))
            .collect::<Result<_, _>>()?;
        if shards.is_empty() {
            return Err("no cache server given".into());
        }
        Ok(Remote::new(shards))
    }

    pub fn new(shards: Vec<Shard>) -> Remote {
        let mut ring = Vec::with_capacity(shards.len() * POINTS as usize);
        for (i, s) in shards.iter().enumerate() {
            for p in 0..POINTS {
                ring.push((hash64(format!("{}#{p}", s.addr()).as_bytes()), i));
            }
        }
        ring.sort_unstable();
        Remote { shards, ring }
    }

    /// The server that holds `key`.
    pub fn shard(&self, key: &str) -> &Shard {
        let h = hash64(key.as_bytes());
        let i = self.ring.partition_point(|(p, _)| *p < h);
        let (_, s) = self.ring[i % self.ring.len()];
        &self.shards[s]
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_lm_url("lm://cache:65432").as_deref(),
            Ok("cache:65432")
        );
        assert!(parse_lm_url("redis://cache:6379").is_err());
        let t = Duration::from_secs(1);
        assert!(matches!(
            parse_url("redis://cache:6379", t),
            Ok(Shard::Redis(_))
        ));
        assert!(matches!(parse_url("lm://cache:1", t), Ok(Shard::Lm(_))));
        assert!(parse_url("redis-cluster://a:1", t).is_err());
        assert!(parse_url("http://a:1", t).is_err());
        assert!(parse_lm_url("lm://cache").is_err());
        let r = Remote::from_urls("lm://a:1, lm://b:2", Duration::from_secs(1)).expect("ok");
        assert_eq!(r.shards().len(), 2);
        assert!(Remote::from_urls("", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn adding_a_server_moves_only_its_share() {
        let t = Duration::from_secs(1);
        let three = Remote::from_urls("lm://a:1,lm://b:1,lm://c:1", t).expect("ok");
        let four = Remote::from_urls("lm://a:1,lm://b:1,lm://c:1,lm://d:1", t).expect("ok");
        let keys: Vec<String> = (0..4000).map(|i| format!("m@1@0@{i:x}@half")).collect();
        let mut moved = 0;
        let mut per = std::collections::HashMap::new();
        for k in &keys {
            let (a, b) = (three.shard(k).addr(), four.shard(k).addr());
            *per.entry(b.to_string()).or_insert(0) += 1;
            if a != b {
                moved += 1;
                assert_eq!(b, "d:1", "a key only ever moves to the new server");
            }
        }
        let share = moved as f64 / keys.len() as f64;
        assert!((0.15..0.35).contains(&share), "{share}");
        for (addr, n) in per {
            assert!((600..1500).contains(&n), "{addr} holds {n} of 4000");
        }
    }

    #[tokio::test]
    async fn a_down_server_fails_fast_and_is_retried_later() {
        // A port nothing listens on.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = free.local_addr().expect("addr").to_string();
        drop(free);
        let c = LmClient::new(addr, Duration::from_secs(2));
        assert!(matches!(c.exists("k").await, Err(ClientError::Io { .. })));
        // Within the backoff: refused without a connect attempt.
        assert!(matches!(c.exists("k").await, Err(ClientError::Down(_))));
    }
}
