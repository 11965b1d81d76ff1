//! A minimal reader of the safetensors format (a little-endian `u64` header length, a JSON
//! header of `name → {dtype, shape, data_offsets}`, then the bytes), enough for LoRA
//! adapters: F32, F16 and BF16 tensors read into `f32`, every offset checked against the
//! file before use.

use std::collections::HashMap;

use half::{bf16, f16};
use serde::Deserialize;

use super::LoraError;

/// Headers larger than this are refused (an adapter's header is a few KiB).
const MAX_HEADER: u64 = 16 << 20;

#[derive(Debug, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// A safetensors file in memory.
pub struct SafeTensors {
    data: Vec<u8>,
    /// Where the tensor bytes start in `data`.
    base: usize,
    entries: HashMap<String, Entry>,
}

impl SafeTensors {
    pub fn parse(data: Vec<u8>) -> Result<SafeTensors, LoraError> {
        let bad = |what: String| LoraError::Invalid(format!("adapter_model.safetensors: {what}"));
        if data.len() < 8 {
            return Err(bad("shorter than its header length".into()));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&data[..8]);
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || 8 + n > data.len() as u64 {
            return Err(bad(format!("header of {n} bytes does not fit the file")));
        }
        let base = 8 + n as usize;
        let raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&data[8..base])
            .map_err(|e| bad(format!("header is not JSON: {e}")))?;
        let mut entries = HashMap::with_capacity(raw.len());
        for (name, v) in raw {
            if name == "__metadata__" {
                continue;
            }
            let e: Entry = serde_json::from_value(v).map_err(|e| bad(format!("`{name}`: {e}")))?;
            let [start, end] = e.data_offsets;
            let width = match e.dtype.as_str() {
                "F32" => 4,
                "F16" | "BF16" => 2,
                other => {
                    return Err(bad(format!(
                        "`{name}` has dtype {other} (F32, F16 or BF16 expected)"
                    )))
                }
            };
            let count = e.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let ok = count
                .and_then(|c| c.checked_mul(width))
                .is_some_and(|bytes| {
                    start <= end && end - start == bytes && base + end <= data.len()
                });
            if !ok {
                return Err(bad(format!(
                    "`{name}`: offsets {start}..{end} do not hold shape {:?} of {}",
                    e.shape, e.dtype
                )));
            }
            entries.insert(name, e);
        }
        Ok(SafeTensors {
            data,
            base,
            entries,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The tensor's values as `f32`, row-major.
    pub fn f32(&self, name: &str) -> Option<Vec<f32>> {
        let e = self.entries.get(name)?;
        let bytes = &self.data[self.base + e.data_offsets[0]..self.base + e.data_offsets[1]];
        Some(match e.dtype.as_str() {
            "F32" => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "F16" => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, payload: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn reads_each_dtype_and_refuses_what_does_not_fit() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&1.5f32.to_le_bytes());
        payload.extend_from_slice(&(-2.0f32).to_le_bytes());
        payload.extend_from_slice(&f16::from_f32(0.25).to_le_bytes());
        payload.extend_from_slice(&bf16::from_f32(3.0).to_le_bytes());
        let h = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[1],"data_offsets":[8,10]},"c":{"dtype":"BF16","shape":[1],"data_offsets":[10,12]}}"#;
        let st = SafeTensors::parse(file(h, &payload)).expect("valid");
        assert_eq!(st.f32("a"), Some(vec![1.5, -2.0]));
        assert_eq!(st.shape("a"), Some(&[1usize, 2][..]));
        assert_eq!(st.f32("b"), Some(vec![0.25]));
        assert_eq!(st.f32("c"), Some(vec![3.0]));
        assert_eq!(st.names().count(), 3);

        for bad in [
            r#"{"a":{"dtype":"F32","shape":[1,3],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            r#"{"a":{"dtype":"I8","shape":[8],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}}"#,
            "not json",
        ] {
            assert!(
                SafeTensors::parse(file(bad, &payload[..8])).is_err(),
                "{bad}"
            );
        }
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(SafeTensors::parse(huge).is_err());
        assert!(SafeTensors::parse(vec![1, 2]).is_err());
    }
}
