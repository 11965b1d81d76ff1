//! Chunks on local disk (key → LMCache `Meta` + payload), LRU-bounded and kept across
//! restarts: an engine's disk tier (`LMCACHE_LOCAL_DISK`) and the cache server's
//! `--persist-dir`.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::lm::Meta;
use crate::store::Object;
use bytes::Bytes;

const MAGIC: &[u8; 8] = b"SYKVCHK1";

/// A directory of chunk files, `<hash of key>.kvchunk`, each
/// `MAGIC | fmt dtype shape[4] (i32 LE) | length (u64 LE) | key length (u32 LE) | key |
/// payload`, written to a temporary name and renamed, so a reader never sees half a file.
/// The index (key → size, recency) is rebuilt from the files at start.
pub struct DiskTier {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<DiskIndex>,
}

#[derive(Default)]
struct DiskIndex {
    map: HashMap<String, (u64, u64)>,
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
}

impl DiskIndex {
    fn touch(&mut self, key: &str) -> bool {
        let Some(entry) = self.map.get_mut(key) else {
            return false;
        };
        self.tick += 1;
        let old = std::mem::replace(&mut entry.1, self.tick);
        if let Some(k) = self.order.remove(&old) {
            self.order.insert(self.tick, k);
        }
        true
    }
}

fn file_name(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}.kvchunk")
}

fn read_header(f: &mut impl Read) -> std::io::Result<(Meta, u64, String)> {
    let mut head = [0u8; 8 + 6 * 4 + 8 + 4];
    f.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(std::io::Error::other("not a chunk file"));
    }
    let i = |n: usize| i32::from_le_bytes(head[8 + n * 4..12 + n * 4].try_into().unwrap_or([0; 4]));
    let length = u64::from_le_bytes(head[32..40].try_into().unwrap_or([0; 8]));
    let key_len = u32::from_le_bytes(head[40..44].try_into().unwrap_or([0; 4])) as usize;
    if key_len > 4096 || length > i32::MAX as u64 {
        return Err(std::io::Error::other("bad chunk header"));
    }
    let mut key = vec![0u8; key_len];
    f.read_exact(&mut key)?;
    let key = String::from_utf8(key).map_err(|_| std::io::Error::other("bad key"))?;
    let meta = Meta {
        length: length as i32,
        fmt: i(0),
        dtype: i(1),
        shape: [i(2), i(3), i(4), i(5)],
    };
    Ok((meta, length, key))
}

impl DiskTier {
    /// Open (creating) `dir`, indexing the chunk files already there, oldest first.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<DiskTier> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("kvchunk") {
                continue;
            }
            let Ok(mut f) = std::fs::File::open(&path) else {
                continue;
            };
            let Ok((_, length, key)) = read_header(&mut f) else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let mtime = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            found.push((mtime, key, length));
        }
        found.sort();
        let tier = DiskTier {
            dir: dir.to_path_buf(),
            max_bytes,
            index: Mutex::new(DiskIndex::default()),
        };
        {
            let mut ix = tier.lock();
            for (_, key, length) in found {
                ix.tick += 1;
                let t = ix.tick;
                ix.order.insert(t, key.clone());
                ix.map.insert(key, (length, t));
                ix.bytes += length;
            }
        }
        tier.evict_to(0);
        Ok(tier)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DiskIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn contains(&self, key: &str) -> bool {
        self.lock().map.contains_key(key)
    }

    /// Evict least recently used files until `incoming` more bytes fit.
    fn evict_to(&self, incoming: u64) {
        let mut ix = self.lock();
        while ix.bytes + incoming > self.max_bytes {
            let Some((_, key)) = ix.order.pop_first() else {
                break;
            };
            if let Some((len, _)) = ix.map.remove(&key) {
                ix.bytes -= len;
                let _ = std::fs::remove_file(self.dir.join(file_name(&key)));
            }
        }
    }

    /// Write a chunk (blocking: callers run it off their request path).
    pub fn put(&self, key: &str, object: &Object) -> std::io::Result<()> {
        let len = object.data.len() as u64;
        if len > self.max_bytes {
            return Ok(());
        }
        {
            // A key written again replaces its file (last write wins, as a PUT does).
            let mut ix = self.lock();
            if let Some((old, t)) = ix.map.remove(key) {
                ix.order.remove(&t);
                ix.bytes -= old;
            }
        }
        self.evict_to(len);
        let path = self.dir.join(file_name(key));
        let tmp = self.dir.join(format!(".{}.tmp", file_name(key)));
        {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            let m = &object.meta;
            f.write_all(MAGIC)?;
            for v in [
                m.fmt, m.dtype, m.shape[0], m.shape[1], m.shape[2], m.shape[3],
            ] {
                f.write_all(&v.to_le_bytes())?;
            }
            f.write_all(&len.to_le_bytes())?;
            f.write_all(&(key.len() as u32).to_le_bytes())?;
            f.write_all(key.as_bytes())?;
            f.write_all(&object.data)?;
            f.flush()?;
        }
        std::fs::rename(&tmp, &path)?;
        let mut ix = self.lock();
        ix.tick += 1;
        let t = ix.tick;
        ix.order.insert(t, key.to_string());
        ix.map.insert(key.to_string(), (len, t));
        ix.bytes += len;
        Ok(())
    }

    /// Read a chunk; `None` when absent or unreadable (an unreadable file is dropped).
    pub fn get(&self, key: &str) -> Option<Object> {
        if !self.lock().touch(key) {
            return None;
        }
        let path = self.dir.join(file_name(key));
        let read = || -> std::io::Result<Object> {
            let mut f = std::io::BufReader::new(std::fs::File::open(&path)?);
            let (meta, length, stored_key) = read_header(&mut f)?;
            if stored_key != key {
                return Err(std::io::Error::other("another key's chunk"));
            }
            let mut data = vec![0u8; length as usize];
            f.read_exact(&mut data)?;
            Ok(Object {
                meta,
                data: Bytes::from(data),
            })
        };
        match read() {
            Ok(o) => Some(o),
            Err(_) => {
                let mut ix = self.lock();
                if let Some((len, t)) = ix.map.remove(key) {
                    ix.order.remove(&t);
                    ix.bytes -= len;
                }
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(n: usize, fill: u8) -> Object {
        Object {
            meta: Meta {
                length: n as i32,
                fmt: 1,
                dtype: 2,
                shape: [2, 3, 4, 5],
            },
            data: Bytes::from(vec![fill; n]),
        }
    }

    #[test]
    fn chunks_survive_a_restart_and_stay_within_the_bound() {
        let dir = std::env::temp_dir().join(format!("switchyard-disk-tier-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let t = DiskTier::open(&dir, 3000).expect("open");
            t.put("a", &obj(1000, 1)).expect("put");
            t.put("b", &obj(1000, 2)).expect("put");
            assert!(t.get("a").is_some(), "a is now recent");
            t.put("c", &obj(1000, 3)).expect("put");
            t.put("d", &obj(1000, 4)).expect("put");
            assert!(!t.contains("b"), "the least recently used went");
            assert_eq!(t.bytes(), 3000);
        }
        let t = DiskTier::open(&dir, 3000).expect("reopen");
        let got = t.get("d").expect("kept across a restart");
        assert_eq!(
            (got.data.len(), got.data[0], got.meta.shape),
            (1000, 4, [2, 3, 4, 5])
        );
        assert!(t.get("b").is_none());
        // A damaged file is dropped, never misread.
        std::fs::write(dir.join(file_name("c")), b"garbage").expect("write");
        assert!(t.get("c").is_none());
        assert!(!t.contains("c"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
