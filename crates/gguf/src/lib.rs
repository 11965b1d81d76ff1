//! A reader for GGUF files' header: metadata key/values and tensor descriptors (names,
//! shapes, types, offsets), without touching the tensor data. Used to load a model's
//! tokenizer and chat template (engine and router) and to check a model file before
//! loading weights, so a bad file gets a clear error instead of a panic.
//!
//! Every length read from the file is checked against the file's size before anything is
//! allocated, so a corrupt or hostile file cannot make the reader allocate unbounded memory.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

const MAGIC: u32 = 0x4655_4747; // "GGUF" read little-endian
const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file (bad magic)")]
    BadMagic { path: String },
    #[error("{path}: unsupported GGUF version {version} (2 and 3 are supported)")]
    Version { path: String, version: u32 },
    #[error("{path}: corrupt GGUF header: {what}")]
    Corrupt { path: String, what: String },
    #[error("{path}: missing metadata key `{key}`")]
    Missing { path: String, key: String },
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// Any integer type that fits in `i64` (and `u64` up to `i64::MAX`).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Value::U8(v) => v as i64,
            Value::I8(v) => v as i64,
            Value::U16(v) => v as i64,
            Value::I16(v) => v as i64,
            Value::U32(v) => v as i64,
            Value::I32(v) => v as i64,
            Value::U64(v) => i64::try_from(v).ok()?,
            Value::I64(v) => v,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// Where one tensor lives and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: the first dimension is the innermost (contiguous) one.
    pub dims: Vec<u64>,
    /// The `ggml_type` code (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, ...).
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

/// A GGUF file's header.
#[derive(Debug, Clone)]
pub struct Gguf {
    pub path: String,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
    pub file_size: u64,
}

impl Gguf {
    /// Read the header of the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let p = path.display().to_string();
        let io = |source| GgufError::Io {
            path: p.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let file_size = file.metadata().map_err(io)?.len();
        Self::read(BufReader::with_capacity(1 << 16, file), file_size, p)
    }

    /// Read a header from bytes in memory (`name` stands for the path in errors). The
    /// same checks as [`Gguf::open`]: counts and lengths against the size before any
    /// allocation.
    pub fn parse(bytes: &[u8], name: &str) -> Result<Gguf, GgufError> {
        Self::read(bytes, bytes.len() as u64, name.to_string())
    }

    fn read<R: Read>(inner: R, file_size: u64, p: String) -> Result<Gguf, GgufError> {
        let mut r = Reader {
            inner,
            pos: 0,
            size: file_size,
            path: p.clone(),
        };
        let magic = r
            .u32()
            .map_err(|_| GgufError::BadMagic { path: p.clone() })?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { path: p });
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version { path: p, version });
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // Each key/value takes at least 12 bytes, each tensor descriptor at least 24.
        r.check_count(n_kv, 12, "metadata count")?;
        r.check_count(n_tensors, 24, "tensor count")?;
        let mut metadata = HashMap::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 8 {
                return Err(r.corrupt(format!("tensor {name} has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_i64)
            .filter(|a| *a > 0)
            .map(|a| a as u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        let data_offset = r.pos.div_ceil(align) * align;
        Ok(Gguf {
            path: p,
            version,
            metadata,
            tensors,
            data_offset,
            file_size,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required key, or a clear error naming it.
    pub fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::Missing {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }
}

struct Reader<R> {
    inner: R,
    pos: u64,
    size: u64,
    path: String,
}

impl<R: Read> Reader<R> {
    fn corrupt(&self, what: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    fn check_count(&self, n: u64, min_bytes_each: u64, what: &str) -> Result<(), GgufError> {
        let left = self.size.saturating_sub(self.pos);
        if n.saturating_mul(min_bytes_each) > left {
            return Err(self.corrupt(format!("{what} {n} exceeds the file size")));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .map_err(|_| self.corrupt(format!("unexpected end of file at byte {}", self.pos)))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        self.check_count(len, 1, "string length")?;
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| self.corrupt("unexpected end of file in a string".into()))?;
        self.pos += len;
        // Token texts are not always valid UTF-8 (byte tokens of some vocabularies).
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.bytes()?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.corrupt("arrays nested too deep".into()));
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                self.check_count(n, 1, "array length")?;
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(self.corrupt(format!("unknown value type {other}"))),
        })
    }
}

/// Writes GGUF files: used by tests to build small models and malformed files.
pub mod write {
    use super::Value;
    use std::io::Write;

    fn value_type(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::Str(s) => put_str(out, s),
            Value::Array(items) => {
                let elem = items.first().map(value_type).unwrap_or(0);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for i in items {
                    put_value(out, i);
                }
            }
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// One tensor to write: name, GGUF-order dims, ggml type and its raw bytes.
    pub struct Tensor<'a> {
        pub name: &'a str,
        pub dims: &'a [u64],
        pub ggml_type: u32,
        pub data: &'a [u8],
    }

    /// A whole GGUF v3 file (alignment 32).
    pub fn to_bytes(metadata: &[(&str, Value)], tensors: &[Tensor<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(tensors.len());
        for t in tensors {
            put_str(&mut out, t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).div_ceil(32) * 32;
        }
        let pad = |out: &mut Vec<u8>| {
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
        };
        pad(&mut out);
        let base = out.len();
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend_from_slice(t.data);
        }
        pad(&mut out);
        out
    }

    pub fn to_file(
        path: &std::path::Path,
        metadata: &[(&str, Value)],
        tensors: &[Tensor<'_>],
    ) -> std::io::Result<()> {
        std::fs::File::create(path)?.write_all(&to_bytes(metadata, tensors))
    }
}

#[cfg(test)]
mod tests {
    use super::write::{to_bytes, Tensor};
    use super::*;

    fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("sy-gguf-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn round_trips_metadata_and_tensors() {
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let bytes = to_bytes(
            &[
                ("general.architecture", Value::Str("llama".into())),
                ("llama.block_count", Value::U32(2)),
                ("x.f", Value::F32(0.5)),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(vec![Value::Str("a".into()), Value::Str("b".into())]),
                ),
            ],
            &[
                Tensor {
                    name: "t0",
                    dims: &[2],
                    ggml_type: 0,
                    data: &data,
                },
                Tensor {
                    name: "t1",
                    dims: &[4, 1],
                    ggml_type: 0,
                    data: &data[..4],
                },
            ],
        );
        let p = tmp("ok", &bytes);
        let g = Gguf::open(&p).unwrap();
        assert_eq!(g.architecture(), Some("llama"));
        assert_eq!(g.get("llama.block_count").and_then(Value::as_i64), Some(2));
        assert_eq!(g.get("x.f").and_then(Value::as_f64), Some(0.5));
        assert_eq!(
            g.get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(|a| a.len()),
            Some(2)
        );
        assert_eq!(g.tensors.len(), 2);
        assert_eq!(g.tensors[1].dims, vec![4, 1]);
        assert_eq!(g.tensors[1].offset, 32);
        assert_eq!(g.data_offset % 32, 0);
        let raw = std::fs::read(&p).unwrap();
        let at = (g.data_offset + g.tensors[1].offset) as usize;
        assert_eq!(&raw[at..at + 4], &data[..4]);
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let p = tmp("magic", b"NOPE0000000000000000000000");
        assert!(matches!(Gguf::open(&p), Err(GgufError::BadMagic { .. })));
        let mut bytes = to_bytes(&[("k", Value::Str("v".into()))], &[]);
        bytes.truncate(30);
        let p2 = tmp("trunc", &bytes);
        let e = Gguf::open(&p2).unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        // A huge claimed metadata count is refused before allocating.
        let mut huge = b"GGUF".to_vec();
        huge.extend_from_slice(&3u32.to_le_bytes());
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        let p3 = tmp("huge", &huge);
        let e = Gguf::open(&p3).unwrap_err().to_string();
        assert!(e.contains("exceeds the file size"), "{e}");
        let missing = Gguf::open(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
        for p in [p, p2, p3] {
            std::fs::remove_file(p).ok();
        }
    }
}
