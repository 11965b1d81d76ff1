//! The client side of `lm://`: what engines (the remote tier) and `switchyard bench
//! cache` use to reach cache servers, ours or LMCache's own `lmcache_server`.
//!
//! - [`LmClient`]: one connection to one server, requests strictly in order (the
//!   protocol has no request ids). Every call has a deadline; a connection that failed
//!   or timed out is dropped, and reconnecting backs off (0.1 s doubling to 5 s), so a
//!   server that is down costs a caller one fast error, not a hang.
//! - [`RedisClient`] (in [`crate::redis`]): chunks in Redis as LMCache's Redis connectors
//!   keep them, on one server (`redis://`), behind Sentinel (`redis-sentinel://`) or in a
//!   Redis Cluster (`redis-cluster://`).
//! - [`Remote`]: several servers (`lm://a:1,lm://b:2`, Redis too), chunks spread by
//!   consistent hashing of the key (64 points per server on a ring), so adding a server
//!   moves only its share of the keys. A Sentinel or Cluster URL lists its hosts with
//!   commas as LMCache's do (`redis-cluster://a:1,b:2`): it is one member of the ring.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lm::{self, Meta, Reply, Request, WireError};
pub use crate::redis::RedisClient;
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
    /// An error reply from Redis (`-ERR ...`, `-READONLY ...`, a redirect not followed).
    #[error("redis {addr}: {message}")]
    Reply { addr: String, message: String },
    /// Redis Sentinel or Cluster could not say where a key lives.
    #[error("{0}")]
    Topology(String),
}

pub(crate) struct Conn {
    pub(crate) stream: Option<TcpStream>,
    /// Opened and not used yet (a Redis connection logs in first).
    pub(crate) fresh: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One connection to one server, kept open and reopened with backoff.
pub(crate) struct Link {
    pub(crate) addr: String,
    pub(crate) timeout: Duration,
    conn: tokio::sync::Mutex<Conn>,
}

impl Link {
    pub(crate) fn new(addr: String, timeout: Duration) -> Link {
        Link {
            addr,
            timeout,
            conn: tokio::sync::Mutex::new(Conn {
                stream: None,
                fresh: false,
                retry_at: None,
                backoff: BACKOFF_MIN,
            }),
        }
    }

    /// The connection, opened first if need be (at most one attempt per backoff period,
    /// given up at `deadline`).
    pub(crate) async fn connected(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<tokio::sync::MutexGuard<'_, Conn>, ClientError> {
        let mut conn = self.conn.lock().await;
        let now = Instant::now();
        if conn.stream.is_none() {
            if conn.retry_at.is_some_and(|t| now < t) {
                return Err(ClientError::Down(self.addr.clone()));
            }
            let connect = tokio::time::timeout_at(deadline, TcpStream::connect(&self.addr)).await;
            match connect {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    conn.stream = Some(s);
                    conn.fresh = true;
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
    pub(crate) fn settle<T>(
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
        let deadline = tokio::time::Instant::now() + self.link.timeout;
        let mut conn = self.link.connected(deadline).await?;
        let Some(stream) = conn.stream.as_mut() else {
            return Err(ClientError::Down(self.link.addr.clone()));
        };
        let r = tokio::time::timeout_at(deadline, exchange(stream, &header, body, command)).await;
        self.link.settle(&mut conn, r)
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

/// The Sentinel master name used when a `redis-sentinel://` URL names none: LMCache's
/// `RedisSentinelConnector` reads it from this variable (default `redismaster`).
pub const SENTINEL_NAME_ENV: &str = "REDIS_SERVICE_NAME";

/// `lm://HOST:PORT`, `redis://[USER:PASSWORD@]HOST:PORT[/DB]`,
/// `redis-sentinel://[USER:PASSWORD@]H:P[,H:P...][/NAME]` or
/// `redis-cluster://[USER:PASSWORD@]H:P[,H:P...]` → a shard (`:PASSWORD@` alone works
/// too). A Sentinel URL without `/NAME` uses `$REDIS_SERVICE_NAME`, else `redismaster`
/// (as LMCache); its credentials are the master's (the sentinels are asked without).
pub fn parse_url(url: &str, timeout: Duration) -> Result<Shard, String> {
    let name = std::env::var(SENTINEL_NAME_ENV).ok();
    parse_url_with(url, timeout, name.as_deref())
}

/// [`parse_url`] with the Sentinel master name's fallback given (instead of read from
/// the environment).
pub fn parse_url_with(
    url: &str,
    timeout: Duration,
    sentinel_name: Option<&str>,
) -> Result<Shard, String> {
    let u = url.trim().trim_end_matches('/');
    let (scheme, rest) = u
        .split_once("://")
        .ok_or_else(|| format!("{url}: expected lm://HOST:PORT or redis://HOST:PORT"))?;
    let ok = matches!(rest.rsplit_once(':'), Some((h, p))
        if !h.is_empty() && !h.contains([',', '/', '@']) && p.parse::<u16>().is_ok());
    match scheme {
        "lm" if ok => Ok(Shard::Lm(LmClient::new(rest, timeout))),
        "redis" => {
            let h = crate::redis::parse_hosts(scheme, rest).map_err(|e| format!("{url}: {e}"))?;
            let [host] = h.hosts.as_slice() else {
                return Err(format!(
                    "{url}: expected redis://[USER:PASSWORD@]HOST:PORT[/DB] (one server; redis-cluster:// for several)"
                ));
            };
            let db = match h.path.as_deref() {
                None => None,
                Some(db) => Some(
                    db.parse::<u32>()
                        .map_err(|_| format!("{url}: {db:?} is not a database number"))?,
                ),
            };
            let login = crate::redis::Login { db, ..h.login };
            Ok(Shard::Redis(RedisClient::with_login(
                host.clone(),
                login,
                timeout,
            )))
        }
        "redis-sentinel" => {
            let h = crate::redis::parse_hosts(scheme, rest).map_err(|e| format!("{url}: {e}"))?;
            let name = h
                .path
                .or(sentinel_name.map(str::to_string))
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| crate::redis::DEFAULT_SENTINEL_NAME.to_string());
            Ok(Shard::Redis(RedisClient::sentinel(
                h.hosts, name, h.login, timeout,
            )))
        }
        "redis-cluster" => {
            let h = crate::redis::parse_hosts(scheme, rest).map_err(|e| format!("{url}: {e}"))?;
            if h.path.is_some() {
                return Err(format!(
                    "{url}: expected redis-cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...] (no database)"
                ));
            }
            Ok(Shard::Redis(RedisClient::cluster(h.hosts, h.login, timeout)))
        }
        "rediss" => Err(format!(
            "{url}: rediss:// (TLS) is not supported yet (lm://, redis://, redis-sentinel:// and redis-cluster:// are)"
        )),
        _ => Err(format!(
            "{url}: expected lm://HOST:PORT, redis://HOST:PORT, redis-sentinel://HOST:PORT[,...] or redis-cluster://HOST:PORT[,...]"
        )),
    }
}

/// Split a `remote_url` list into URLs: commas separate servers (`lm://a:1,lm://b:2`), but
/// a bare `HOST:PORT`, or a piece with the same Sentinel/Cluster scheme as the one before,
/// continues that URL's host list (`redis-cluster://a:1,b:2` and
/// `redis-cluster://a:1,redis-cluster://b:2` are one cluster, as in LMCache).
pub fn split_urls(urls: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for piece in urls.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let scheme = piece.split_once("://").map(|(s, _)| s);
        let joins = match (out.last(), scheme) {
            (Some(_), None) => true,
            (Some(prev), Some(s @ ("redis-sentinel" | "redis-cluster"))) => {
                prev.starts_with(&format!("{s}://"))
            }
            _ => false,
        };
        match out.last_mut() {
            Some(prev) if joins => {
                prev.push(',');
                prev.push_str(piece);
            }
            _ => out.push(piece.to_string()),
        }
    }
    out
}

pub(crate) enum Exchange {
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
    /// From `lm://a:1[,lm://b:2...]` (or Redis URLs; see [`split_urls`]).
    pub fn from_urls(urls: &str, timeout: Duration) -> Result<Remote, String> {
        let shards: Vec<Shard> = split_urls(urls)
            .iter()
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
        assert!(parse_url("rediss://a:1", t).is_err());
        let name = |u: &str, env: Option<&str>| match parse_url_with(u, t, env) {
            Ok(Shard::Redis(c)) => c.addr().to_string(),
            _ => "refused".to_string(),
        };
        // LMCache's forms: the master name from REDIS_SERVICE_NAME, else `redismaster`;
        // a `/NAME` path (as LMCache's CreateConnector documents) wins.
        assert_eq!(
            name("redis-sentinel://s1:26379,s2:26380", None),
            "redis-sentinel://s1:26379,s2:26380/redismaster"
        );
        assert_eq!(
            name("redis-sentinel://s1:26379", Some("mymaster")),
            "redis-sentinel://s1:26379/mymaster"
        );
        assert_eq!(
            name("redis-sentinel://s1:26379,s2:1/other", Some("mymaster")),
            "redis-sentinel://s1:26379,s2:1/other"
        );
        assert_eq!(
            name("redis-cluster://a:7000,b:7001", None),
            "redis-cluster://a:7000,b:7001"
        );
        assert_eq!(name("redis-cluster://a:7000/0", None), "refused");
        // Credentials (LMCache's `user:password@`) are used, never shown.
        assert_eq!(
            name("redis-sentinel://u:secret@a:1", None),
            "redis-sentinel://a:1/redismaster"
        );
        assert_eq!(name("redis://:secret@h:1/3", None), "h:1");
        assert_eq!(name("redis://h:1/x", None), "refused");
        assert_eq!(name("redis://h:1,h:2", None), "refused");
        assert_eq!(name("redis-cluster://secret@a:1", None), "refused");
        assert_eq!(name("redis-sentinel://a", None), "refused");
        assert!(parse_url("http://a:1", t).is_err());
        assert!(parse_lm_url("lm://cache").is_err());
        let r = Remote::from_urls("lm://a:1, lm://b:2", Duration::from_secs(1)).expect("ok");
        assert_eq!(r.shards().len(), 2);
        assert!(Remote::from_urls("", Duration::from_secs(1)).is_err());
        // A Sentinel or Cluster host list is one URL (one member of the ring).
        assert_eq!(
            split_urls("redis-cluster://a:1,b:2, redis-cluster://c:3,lm://d:4,lm://e:5"),
            [
                "redis-cluster://a:1,b:2,redis-cluster://c:3",
                "lm://d:4",
                "lm://e:5"
            ]
        );
        assert_eq!(
            split_urls("redis-sentinel://a:1,b:2/m,redis://c:3"),
            ["redis-sentinel://a:1,b:2/m", "redis://c:3"]
        );
        let r = Remote::from_urls("redis-cluster://a:1,b:2,lm://c:3", t).expect("ok");
        assert_eq!(r.shards().len(), 2);
        assert!(Remote::from_urls("lm://a:1,b:2", t).is_err());
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
