//! API keys: the keys file (`--api-keys-file`, YAML or JSON) and `--api-key`, held as a
//! [`KeySet`] of SHA-256 digests (a plain key is hashed when read and not kept), each
//! with its name, allowed models, rate limiter and counters.
//!
//! A presented bearer token is hashed and looked up by its digest, then the digests are
//! compared in constant time. Nothing that takes time here depends on a secret: the
//! lookup depends only on the digest of what the client sent (which the client knows),
//! and a stored digest is useless without its preimage.
//!
//! Keys never reach a log line, an error message or a metric: entries are named by
//! their `name`, and parse errors have their values cut out.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use protocol::prom::Counter;
use serde::Deserialize;

use super::limits::{Limiter, Limits};

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// The name `--api-key`'s key goes by.
pub const SHARED_NAME: &str = "shared";
/// The name requests without a valid key are counted under.
pub const ANONYMOUS: &str = "anonymous";

pub fn sha256(data: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Equal digests, in a time independent of where they differ.
pub fn digests_equal(a: &Digest, b: &Digest) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

fn parse_hex_digest(s: &str) -> Option<Digest> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Why requests were refused, per key (the label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No bearer token (counted under [`ANONYMOUS`]).
    MissingKey,
    /// A token that is no key (counted under [`ANONYMOUS`]).
    InvalidKey,
    ModelNotAllowed,
    RequestsPerMinute,
    TokensPerMinute,
    QueueFull,
    QueueTimeout,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::MissingKey,
        Reason::InvalidKey,
        Reason::ModelNotAllowed,
        Reason::RequestsPerMinute,
        Reason::TokensPerMinute,
        Reason::QueueFull,
        Reason::QueueTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::MissingKey => "missing_key",
            Reason::InvalidKey => "invalid_key",
            Reason::ModelNotAllowed => "model_not_allowed",
            Reason::RequestsPerMinute => "requests_per_minute",
            Reason::TokensPerMinute => "tokens_per_minute",
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
        }
    }
}

/// One key name's counters; kept across reloads while the name stays in the file.
#[derive(Debug, Default)]
pub struct KeyStats {
    /// Requests that presented the key.
    pub requests: Counter,
    /// Estimated tokens of the requests admitted (see `limits::estimate_tokens`).
    pub tokens: Counter,
    rejected: [Counter; Reason::ALL.len()],
}

impl KeyStats {
    pub fn reject(&self, r: Reason) {
        self.rejected[r as usize].inc();
    }

    pub fn rejected(&self, r: Reason) -> u64 {
        self.rejected[r as usize].get()
    }
}

/// Who a valid key belongs to, and what it may do.
pub struct Client {
    pub name: Arc<str>,
    /// The models it may use (`None`: all).
    models: Option<Box<[String]>>,
    /// Its buckets when it has limits.
    pub limiter: Option<Arc<Limiter>>,
    pub stats: Arc<KeyStats>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("models", &self.models)
            .field("limits", &self.limiter.as_ref().map(|l| l.limits()))
            .finish()
    }
}

impl Client {
    /// Whether it may use the model asked for by `requested` (resolved to `resolved`
    /// through the aliases): either name listed will do.
    pub fn allows(&self, requested: &str, resolved: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == requested || x == resolved))
    }
}

/// The keys in force, swapped whole on a reload.
#[derive(Default)]
pub struct KeySet {
    by_digest: HashMap<Digest, Arc<Client>>,
    /// Every client, by name (for the metrics; names are unique).
    clients: Vec<Arc<Client>>,
}

/// The keys file: `keys:` a list of entries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    pub keys: Vec<KeySpec>,
}

/// One entry of the keys file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub name: String,
    /// The key itself...
    #[serde(default)]
    pub key: Option<String>,
    /// ...or its SHA-256, 64 hex digits (`printf %s KEY | sha256sum`).
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Models it may use; all when absent.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Option<Limits>,
}

impl std::fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySpec")
            .field("name", &self.name)
            .field("models", &self.models)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A serde message without the values it quotes (they may be keys): what comes before
/// ", expected" loses its quoted parts (the names serde expected stay).
fn redact(msg: &str) -> String {
    let cut = msg.find(", expected").unwrap_or(msg.len());
    let (head, tail) = msg.split_at(cut);
    let mut out = String::with_capacity(msg.len());
    let mut quoted = false;
    for c in head.chars() {
        match c {
            '`' => {
                out.push(c);
                if !quoted {
                    out.push('…');
                }
                quoted = !quoted;
            }
            _ if quoted => {}
            _ => out.push(c),
        }
    }
    if head.contains("invalid type") || head.contains("invalid value") {
        // "invalid type: string \"...\"": drop what follows the colon.
        if let Some(i) = out.rfind(": ") {
            out.truncate(i + 2);
            out.push('…');
        }
    }
    out.push_str(tail);
    out
}

/// Parse a keys file's text: JSON when `path` ends in `.json`, else YAML.
pub fn parse(path: &Path, text: &str) -> Result<Vec<KeySpec>, String> {
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let parsed: Result<KeysFile, String> = if json {
        serde_json::from_str(text).map_err(|e| redact(&e.to_string()))
    } else {
        serde_yaml::from_str(text).map_err(|e| redact(&e.to_string()))
    };
    parsed.map(|f| f.keys)
}

impl KeySet {
    /// The set from the file's entries and `--api-key`'s digest, keeping the counters
    /// and buckets of names `previous` had.
    pub fn build(
        specs: &[KeySpec],
        shared: Option<&Digest>,
        previous: &KeySet,
    ) -> Result<KeySet, String> {
        let now = Instant::now();
        let old: HashMap<&str, &Arc<Client>> =
            previous.clients.iter().map(|c| (&*c.name, c)).collect();
        let mut set = KeySet::default();
        let add = |name: &str,
                   digest: Digest,
                   models: Option<&Vec<String>>,
                   limits: Limits,
                   set: &mut KeySet|
         -> Result<(), String> {
            if set.clients.iter().any(|c| &*c.name == name) {
                return Err(format!("the name `{name}` is used twice"));
            }
            if set.by_digest.contains_key(&digest) {
                return Err(format!("the key of `{name}` is also another entry's"));
            }
            let prev = old.get(name);
            let limiter = if limits.is_unlimited() {
                None
            } else {
                Some(match prev.and_then(|p| p.limiter.as_ref()) {
                    Some(l) if l.limits() == limits => l.clone(),
                    Some(l) => Arc::new(Limiter::carried(limits, l, now)),
                    None => Arc::new(Limiter::new(limits, now)),
                })
            };
            let client = Arc::new(Client {
                name: Arc::from(name),
                models: models.map(|m| m.clone().into_boxed_slice()),
                limiter,
                stats: prev.map(|p| p.stats.clone()).unwrap_or_default(),
            });
            set.by_digest.insert(digest, client.clone());
            set.clients.push(client);
            Ok(())
        };
        if let Some(d) = shared {
            add(SHARED_NAME, *d, None, Limits::default(), &mut set)?;
        }
        for (i, s) in specs.iter().enumerate() {
            let name = s.name.trim();
            let at = format!("entry {} (`{name}`)", i + 1);
            if name.is_empty() || name.len() > 64 {
                return Err(format!("entry {}: `name` must be 1-64 characters", i + 1));
            }
            if name == ANONYMOUS || (name == SHARED_NAME && shared.is_some()) {
                return Err(format!("{at}: the name `{name}` is reserved"));
            }
            let digest = match (&s.key, &s.key_sha256) {
                (Some(k), None) if !k.is_empty() => sha256(k.as_bytes()),
                (None, Some(h)) => parse_hex_digest(h)
                    .ok_or_else(|| format!("{at}: `key_sha256` must be 64 hex digits"))?,
                _ => return Err(format!("{at}: give exactly one of `key` or `key_sha256`")),
            };
            let limits = s.limits.unwrap_or_default();
            if limits.requests_per_minute == Some(0) || limits.tokens_per_minute == Some(0) {
                return Err(format!("{at}: a limit must be at least 1"));
            }
            add(name, digest, s.models.as_ref(), limits, &mut set)?;
        }
        Ok(set)
    }

    /// The client whose key is `token`.
    pub fn lookup(&self, token: &[u8]) -> Option<&Arc<Client>> {
        let d = sha256(token);
        let (stored, client) = self.by_digest.get_key_value(&d)?;
        digests_equal(stored, &d).then_some(client)
    }

    pub fn clients(&self) -> &[Arc<Client>] {
        &self.clients
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
keys:
  - name: alice
    key: sk-alice-secret
    models: [m1]
    limits: {requests_per_minute: 60, tokens_per_minute: 1000}
  - name: bob
    key_sha256: "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
"#;

    fn specs(text: &str, path: &str) -> Vec<KeySpec> {
        parse(Path::new(path), text).expect("parses")
    }

    #[test]
    fn reads_plain_and_hashed_keys_with_models_and_limits() {
        let set = KeySet::build(&specs(YAML, "k.yaml"), None, &KeySet::default()).unwrap();
        let alice = set.lookup(b"sk-alice-secret").expect("alice");
        assert_eq!(&*alice.name, "alice");
        assert!(alice.allows("m1", "m1") && !alice.allows("m2", "m2"));
        assert!(alice.allows("alias", "m1"));
        assert!(alice.limiter.is_some());
        // sha256("test") in upper case hex.
        let bob = set.lookup(b"test").expect("bob");
        assert!(bob.allows("anything", "anything") && bob.limiter.is_none());
        assert!(set.lookup(b"sk-alice-secreT").is_none());
        assert!(set.lookup(b"").is_none());
        let json = r#"{"keys":[{"name":"c","key":"k","limits":{"tokens_per_minute":5}}]}"#;
        let set = KeySet::build(&specs(json, "k.json"), None, &KeySet::default()).unwrap();
        assert!(set.lookup(b"k").is_some());
    }

    #[test]
    fn a_reload_keeps_counters_and_used_limits_by_name() {
        let first = KeySet::build(&specs(YAML, "k.yaml"), None, &KeySet::default()).unwrap();
        let alice = first.lookup(b"sk-alice-secret").unwrap().clone();
        alice.stats.requests.inc();
        let second = KeySet::build(&specs(YAML, "k.yaml"), None, &first).unwrap();
        let again = second.lookup(b"sk-alice-secret").unwrap();
        assert_eq!(again.stats.requests.get(), 1);
        assert!(Arc::ptr_eq(
            again.limiter.as_ref().unwrap(),
            alice.limiter.as_ref().unwrap()
        ));
    }

    #[test]
    fn bad_files_are_refused_without_quoting_keys() {
        let bad = [
            "keys:\n  - name: a\n",
            "keys:\n  - name: a\n    key: x\n    key_sha256: ab\n",
            "keys:\n  - name: a\n    key_sha256: zz\n",
            "keys:\n  - name: a\n    key: x\n  - name: a\n    key: y\n",
            "keys:\n  - name: a\n    key: x\n  - name: b\n    key: x\n",
            "keys:\n  - name: anonymous\n    key: x\n",
            "keys:\n  - name: a\n    key: x\n    limits: {requests_per_minute: 0}\n",
        ];
        for text in bad {
            let e = KeySet::build(&specs(text, "k.yaml"), None, &KeySet::default())
                .err()
                .unwrap_or_else(|| panic!("accepted {text}"));
            assert!(!e.contains(": x") && !e.contains("`x`"), "{e}");
        }
        for text in [
            "keys:\n  - name: a\n    key: [sk-123-secret]\n",
            "keys:\n  - name: a\n    key: {sk-123-secret: 1}\n",
            "keys:\n  - name: a\n    api_key: sk-123-secret\n",
        ] {
            let e = parse(Path::new("k.yaml"), text).expect_err("refused");
            assert!(!e.contains("secret") && !e.contains("12345678"), "{e}");
        }
        let e = parse(
            Path::new("k.json"),
            r#"{"keys":[{"name":"a","key":1234567}]}"#,
        )
        .expect_err("refused");
        assert!(!e.contains("1234567"), "{e}");
    }

    #[test]
    fn the_shared_key_is_named_shared() {
        let d = sha256(b"s3");
        let set = KeySet::build(&[], Some(&d), &KeySet::default()).unwrap();
        assert_eq!(&*set.lookup(b"s3").unwrap().name, SHARED_NAME);
    }
}
