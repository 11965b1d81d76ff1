//! The cache server's objects: key → (meta, bytes), bounded by `--max-bytes` of payload
//! with least-recently-used eviction. A GET or EXIST hit makes an object recent.
//!
//! One mutex guards the map and the recency order; nothing is awaited or copied while it
//! is held (a GET takes a reference-counted handle to the bytes and writes them out after
//! the lock is released). Every operation is O(log n) in the number of objects.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::lm::Meta;

/// One stored object.
#[derive(Debug, Clone)]
pub struct Object {
    pub meta: Meta,
    pub data: Bytes,
}

struct Slot {
    object: Object,
    /// Position in the recency order (larger is more recent).
    tick: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Arc<str>, Slot>,
    /// tick → key, oldest first.
    order: BTreeMap<u64, Arc<str>>,
    tick: u64,
    bytes: u64,
}

/// What a PUT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored, after evicting this many older objects.
    Stored { evicted: usize },
    /// Larger than the whole store: not stored.
    TooLarge,
}

/// A byte-bounded LRU map, shared by every connection.
pub struct Store {
    max_bytes: u64,
    inner: Mutex<Inner>,
}

impl Store {
    pub fn new(max_bytes: u64) -> Store {
        Store {
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store `object` under `key` (a later PUT of the same key replaces it, as LMCache's
    /// server does), evicting the least recently used objects until it fits.
    pub fn put(&self, key: &str, object: Object) -> PutOutcome {
        self.put_evicting(key, object, None)
    }

    /// [`Store::put`], also handing back the keys it evicted.
    pub fn put_evicting(
        &self,
        key: &str,
        object: Object,
        mut evicted_keys: Option<&mut Vec<Arc<str>>>,
    ) -> PutOutcome {
        let size = object.data.len() as u64;
        if size > self.max_bytes {
            return PutOutcome::TooLarge;
        }
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(old) = inner.map.remove(key) {
            inner.order.remove(&old.tick);
            inner.bytes -= old.object.data.len() as u64;
        }
        let mut evicted = 0;
        while inner.bytes + size > self.max_bytes {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some(slot) = inner.map.remove(&oldest) {
                inner.bytes -= slot.object.data.len() as u64;
                evicted += 1;
                if let Some(keys) = evicted_keys.as_deref_mut() {
                    keys.push(oldest);
                }
            }
        }
        inner.tick += 1;
        let tick = inner.tick;
        let key: Arc<str> = Arc::from(key);
        inner.order.insert(tick, key.clone());
        inner.map.insert(key, Slot { object, tick });
        inner.bytes += size;
        PutOutcome::Stored { evicted }
    }

    /// The object under `key`, made most recent.
    pub fn get(&self, key: &str) -> Option<Object> {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.tick += 1;
        let tick = inner.tick;
        let slot = inner.map.get_mut(key)?;
        let old = std::mem::replace(&mut slot.tick, tick);
        let object = slot.object.clone();
        if let Some(k) = inner.order.remove(&old) {
            inner.order.insert(tick, k);
        }
        Some(object)
    }

    /// Whether `key` is held (a hit makes it most recent, as a GET would follow).
    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// (objects, payload bytes) held now.
    pub fn usage(&self) -> (usize, u64) {
        let g = self.lock();
        (g.map.len(), g.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(n: usize, fill: u8) -> Object {
        Object {
            meta: Meta {
                length: n as i32,
                ..Meta::NONE
            },
            data: Bytes::from(vec![fill; n]),
        }
    }

    #[test]
    fn evicts_least_recently_used_to_stay_within_the_bound() {
        let s = Store::new(300);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(
                s.put(k, obj(100, i as u8)),
                PutOutcome::Stored { evicted: 0 }
            );
        }
        assert!(s.contains("a"), "a is now the most recent");
        assert_eq!(s.put("d", obj(100, 9)), PutOutcome::Stored { evicted: 1 });
        assert!(!s.contains("b"), "b was the least recently used");
        assert!(s.contains("a") && s.contains("c") && s.contains("d"));
        assert_eq!(s.usage(), (3, 300));
        assert_eq!(s.put("big", obj(301, 0)), PutOutcome::TooLarge);
        assert_eq!(s.usage(), (3, 300));
        assert_eq!(s.put("e", obj(250, 0)), PutOutcome::Stored { evicted: 3 });
        assert_eq!(s.usage(), (1, 250));
    }

    #[test]
    fn a_put_replaces_and_a_get_returns_what_was_put() {
        let s = Store::new(1000);
        s.put("k", obj(10, 1));
        s.put("k", obj(20, 2));
        let o = s.get("k").expect("hit");
        assert_eq!((o.meta.length, o.data.len(), o.data[0]), (20, 20, 2));
        assert_eq!(s.usage(), (1, 20));
        assert!(s.get("missing").is_none());
    }

    #[test]
    fn bytes_never_exceed_the_bound_under_random_load() {
        let s = Store::new(10_000);
        let mut x = 12345u64;
        for i in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let size = (x >> 33) as usize % 3000;
            s.put(&format!("k{}", (x >> 40) % 64), obj(size, i as u8));
            if i % 3 == 0 {
                s.get(&format!("k{}", (x >> 20) % 64));
            }
            let (n, bytes) = s.usage();
            assert!(bytes <= 10_000, "{bytes}");
            assert!(n <= 64);
        }
    }
}
