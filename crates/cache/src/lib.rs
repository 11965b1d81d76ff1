//! The shared KV tier (the Production Stack's LMCache tier): LMCache's `lm://` wire
//! format ([`lm`]), the cache server's bounded store ([`store`]) and server
//! ([`server`], `switchyard cache-server`), and the client engines and the benchmark use
//! to reach one or several servers ([`client`]), Redis among them: one server, Sentinel
//! or Cluster ([`redis`]); chunks on local disk ([`disk`]).

pub mod client;
pub mod disk;
pub mod lm;
pub mod redis;
pub mod server;
pub mod store;

pub use server::ServerArgs;
