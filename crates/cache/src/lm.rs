//! LMCache's remote-server wire format (`lm://`, LMCache 0.5's `v1/protocol.py`), byte for
//! byte, so a vLLM engine with LMCache can use our server and our engines LMCache's.
//!
//! Every integer is a native-endian `i32` (little-endian on x86-64), with no padding.
//! - A request is 186 bytes: `command, length, fmt, dtype, location, shape[4]`, then the
//!   key as UTF-8 padded with spaces to 150 bytes. A PUT's `length` payload bytes follow.
//! - A reply is 36 bytes: `code, length, fmt, dtype, shape[4], location` (location last,
//!   unlike the request); a GET hit's payload follows.
//! - PUT and LIST get no reply; GET, EXIST and HEALTH do. Codes: 200 success, 400 fail.
//!
//! Checked against captures of LMCache 0.5.6's own client and server in
//! `tests/fixtures/lmcache/`. Pure data: no I/O here.

/// Bytes in a request header.
pub const REQUEST_LEN: usize = 186;
/// Bytes in a reply header.
pub const REPLY_LEN: usize = 36;
/// Bytes the key is padded to.
pub const KEY_LEN: usize = 150;

pub const PUT: i32 = 1;
pub const GET: i32 = 2;
pub const EXIST: i32 = 3;
pub const LIST: i32 = 4;
pub const HEALTH: i32 = 5;

pub const SUCCESS: i32 = 200;
pub const FAIL: i32 = 400;

/// LMCache's `MemoryFormat::KV_2LTD` (`[2, layers, tokens, hidden]`), its default.
pub const FMT_KV_2LTD: i32 = 1;
/// LMCache's dtype codes (`float16` is 2; `bfloat16` 3, `float32` 4, `uint8` 6).
pub const DTYPE_FLOAT16: i32 = 2;
pub const DTYPE_BFLOAT16: i32 = 3;
pub const DTYPE_FLOAT32: i32 = 4;
pub const DTYPE_UINT8: i32 = 6;

/// What is stored with an object and echoed in a GET reply: its size, memory format,
/// dtype and shape (padded with zeros to 4 dimensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub length: i32,
    pub fmt: i32,
    pub dtype: i32,
    pub shape: [i32; 4],
}

impl Meta {
    /// The fields LMCache's client and server put in headers that carry no object.
    pub const NONE: Meta = Meta {
        length: 0,
        fmt: FMT_KV_2LTD,
        dtype: DTYPE_FLOAT16,
        shape: [0; 4],
    };
}

/// A request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: i32,
    pub meta: Meta,
    pub location: i32,
    pub key: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("key of {0} bytes is longer than {KEY_LEN}")]
    KeyTooLong(usize),
    #[error("key is not UTF-8")]
    KeyNotUtf8,
    #[error("unknown command {0}")]
    UnknownCommand(i32),
    #[error("negative length {0}")]
    NegativeLength(i32),
}

fn put_i32s(out: &mut [u8], vals: &[i32]) {
    for (chunk, v) in out.chunks_exact_mut(4).zip(vals) {
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
}

fn i32_at(buf: &[u8], i: usize) -> i32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[i * 4..i * 4 + 4]);
    i32::from_ne_bytes(b)
}

impl Request {
    pub fn new(command: i32, meta: Meta, key: &str) -> Request {
        Request {
            command,
            meta,
            location: 0,
            key: key.to_string(),
        }
    }

    pub fn encode(&self) -> Result<[u8; REQUEST_LEN], WireError> {
        let key = self.key.as_bytes();
        if key.len() > KEY_LEN {
            return Err(WireError::KeyTooLong(key.len()));
        }
        let mut out = [b' '; REQUEST_LEN];
        let m = &self.meta;
        put_i32s(
            &mut out[..36],
            &[
                self.command,
                m.length,
                m.fmt,
                m.dtype,
                self.location,
                m.shape[0],
                m.shape[1],
                m.shape[2],
                m.shape[3],
            ],
        );
        out[36..36 + key.len()].copy_from_slice(key);
        Ok(out)
    }

    /// Parse a header. The key's padding (spaces, as LMCache writes it; NULs too) is
    /// trimmed. An unknown command or a negative length is an error: the stream can no
    /// longer be trusted, and the server closes that connection.
    pub fn decode(buf: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
        let command = i32_at(buf, 0);
        if !(PUT..=HEALTH).contains(&command) {
            return Err(WireError::UnknownCommand(command));
        }
        let length = i32_at(buf, 1);
        if length < 0 {
            return Err(WireError::NegativeLength(length));
        }
        let key = std::str::from_utf8(&buf[36..])
            .map_err(|_| WireError::KeyNotUtf8)?
            .trim_matches(|c: char| c == ' ' || c == '\0' || c.is_ascii_whitespace());
        Ok(Request {
            command,
            meta: Meta {
                length,
                fmt: i32_at(buf, 2),
                dtype: i32_at(buf, 3),
                shape: [
                    i32_at(buf, 5),
                    i32_at(buf, 6),
                    i32_at(buf, 7),
                    i32_at(buf, 8),
                ],
            },
            location: i32_at(buf, 4),
            key: key.to_string(),
        })
    }
}

/// A reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub code: i32,
    pub meta: Meta,
    pub location: i32,
}

impl Reply {
    /// A reply carrying no object (a miss, EXIST, HEALTH), as LMCache's server sends it.
    pub fn bare(code: i32) -> Reply {
        Reply {
            code,
            meta: Meta::NONE,
            location: 0,
        }
    }

    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut out = [0u8; REPLY_LEN];
        let m = &self.meta;
        put_i32s(
            &mut out,
            &[
                self.code,
                m.length,
                m.fmt,
                m.dtype,
                m.shape[0],
                m.shape[1],
                m.shape[2],
                m.shape[3],
                self.location,
            ],
        );
        out
    }

    pub fn decode(buf: &[u8; REPLY_LEN]) -> Result<Reply, WireError> {
        let length = i32_at(buf, 1);
        if length < 0 {
            return Err(WireError::NegativeLength(length));
        }
        Ok(Reply {
            code: i32_at(buf, 0),
            meta: Meta {
                length,
                fmt: i32_at(buf, 2),
                dtype: i32_at(buf, 3),
                shape: [
                    i32_at(buf, 4),
                    i32_at(buf, 5),
                    i32_at(buf, 6),
                    i32_at(buf, 7),
                ],
            },
            location: i32_at(buf, 8),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn request_round_trips_and_pads_the_key_with_spaces() {
        let r = Request::new(
            PUT,
            Meta {
                length: 256,
                fmt: FMT_KV_2LTD,
                dtype: DTYPE_BFLOAT16,
                shape: [2, 2, 4, 8],
            },
            "m@1@0@-13ca95e4793f0be@bfloat16",
        );
        let b = r.encode().expect("encode");
        assert_eq!(b.len(), 186);
        assert_eq!(&b[..4], &1i32.to_ne_bytes());
        assert_eq!(b[185], b' ');
        assert_eq!(Request::decode(&b).expect("decode"), r);
        let long = Request::new(GET, Meta::NONE, &"k".repeat(151));
        assert_eq!(long.encode(), Err(WireError::KeyTooLong(151)));
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut b = Request::new(GET, Meta::NONE, "k").encode().expect("encode");
        b[..4].copy_from_slice(&9i32.to_ne_bytes());
        assert_eq!(Request::decode(&b), Err(WireError::UnknownCommand(9)));
        let mut b = Request::new(PUT, Meta::NONE, "k").encode().expect("encode");
        b[4..8].copy_from_slice(&(-5i32).to_ne_bytes());
        assert_eq!(Request::decode(&b), Err(WireError::NegativeLength(-5)));
        let mut b = Request::new(GET, Meta::NONE, "k").encode().expect("encode");
        b[36] = 0xff;
        assert_eq!(Request::decode(&b), Err(WireError::KeyNotUtf8));
    }

    #[test]
    fn reply_matches_lmcache_bytes() {
        // LMCache 0.5.6's server, HEALTH (tests/fixtures/lmcache/01_health.txt).
        let health =
            hex("c80000000000000001000000020000000000000000000000000000000000000000000000");
        assert_eq!(&Reply::bare(SUCCESS).encode()[..], &health[..]);
        // ...and the request LMCache's client sent for it.
        let sent = hex(concat!(
            "050000000000000001000000020000000000000000000000000000000000000000000000",
            "5177656e2f5177656e332d302e3642403140304031323334616263643536373865663030",
            "4062666c6f61743136"
        ));
        let mut req = [b' '; REQUEST_LEN];
        req[..sent.len()].copy_from_slice(&sent);
        let r = Request::decode(&req).expect("decode");
        assert_eq!(r.command, HEALTH);
        assert_eq!(r.meta, Meta::NONE);
        assert_eq!(r.key, "Qwen/Qwen3-0.6B@1@0@1234abcd5678ef00@bfloat16");
        assert_eq!(r.encode().expect("encode"), req);
        let r = Reply {
            code: SUCCESS,
            meta: Meta {
                length: 256,
                fmt: 1,
                dtype: 3,
                shape: [2, 2, 4, 8],
            },
            location: 0,
        };
        assert_eq!(Reply::decode(&r.encode()).expect("decode"), r);
    }
}
