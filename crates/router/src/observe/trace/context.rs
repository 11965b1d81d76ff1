//! W3C Trace Context: a request's place in its trace (the caller's, when it sent a valid
//! `traceparent`, else a new one), the router's span and its attempts' spans, and the
//! `traceparent` each upstream attempt carries. Ids come from a per-thread generator, no
//! locking.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use kv_events::hash::mix64;

use crate::upstream::TRACEPARENT;

fn id_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        mix64(t ^ u64::from(std::process::id()).rotate_left(32))
    })
}

/// A random non-zero 64-bit id (span ids; two make a trace id). Per thread, no locking.
pub fn new_id() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = const { Cell::new(0) };
    }
    STATE.with(|s| {
        let mut x = s.get();
        if x == 0 {
            static THREADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let t = THREADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            x = mix64(id_seed() ^ t.wrapping_mul(0xD1B5_4A32_D192_ED03)) | 1;
        }
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(x);
        match mix64(x) {
            0 => 1,
            id => id,
        }
    })
}

fn hex_u64(s: &[u8]) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    hex(s).map(|v| v as u64)
}

fn hex(s: &[u8]) -> Option<u128> {
    let mut v: u128 = 0;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u128::from(d);
    }
    Some(v)
}

/// A `traceparent` value: `(trace id, parent span id, flags)`, or None when it is not
/// valid per W3C Trace Context (lowercase hex; version `ff` and all-zero ids invalid; a
/// version above `00` may carry more fields after a `-`).
pub fn parse_traceparent(v: &[u8]) -> Option<(u128, u64, u8)> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex(&v[0..2])? as u8;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace = hex(&v[3..35])?;
    let parent = hex_u64(&v[36..52])?;
    let flags = hex(&v[53..55])? as u8;
    (trace != 0 && parent != 0).then_some((trace, parent, flags))
}

pub fn format_traceparent(trace: u128, span: u64, flags: u8) -> HeaderValue {
    let s = format!("00-{trace:032x}-{span:016x}-{flags:02x}");
    HeaderValue::from_maybe_shared(Bytes::from(s)).unwrap_or_else(|_| {
        HeaderValue::from_static("00-00000000000000000000000000000001-0000000000000001-00")
    })
}

/// A request's place in its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceCtx {
    pub trace_id: u128,
    /// The caller's span, when it sent a valid `traceparent`.
    pub parent: Option<u64>,
    /// The router's span for this request.
    pub span_id: u64,
    /// Trace flags sent on (only `sampled`, bit 0, is kept); a new trace is sampled.
    pub flags: u8,
}

impl TraceCtx {
    /// Continue the caller's trace, or start one.
    pub fn from_headers(h: &HeaderMap) -> Self {
        let incoming = h
            .get(TRACEPARENT)
            .and_then(|v| parse_traceparent(v.as_bytes()));
        match incoming {
            Some((trace_id, parent, flags)) => TraceCtx {
                trace_id,
                parent: Some(parent),
                span_id: new_id(),
                flags: flags & 1,
            },
            None => TraceCtx {
                trace_id: (u128::from(new_id()) << 64) | u128::from(new_id()),
                parent: None,
                span_id: new_id(),
                flags: 1,
            },
        }
    }

    /// The incoming `tracestate` travels on only with the caller's valid `traceparent`.
    pub fn keeps_state(&self) -> bool {
        self.parent.is_some()
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` an upstream attempt with span `span` carries.
    pub fn header_for(&self, span: u64) -> HeaderValue {
        format_traceparent(self.trace_id, span, self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing_follows_the_spec() {
        let ok = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(ok),
            Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1))
        );
        for bad in [
            &b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            b"",
        ] {
            assert_eq!(
                parse_traceparent(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A later version may append fields.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-ab")
                .is_some()
        );
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01ab")
                .is_none()
        );
    }

    #[test]
    fn context_continues_or_starts_a_trace() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03"),
        );
        let c = TraceCtx::from_headers(&h);
        assert_eq!(c.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(c.parent, Some(0x00f067aa0ba902b7));
        assert_eq!(c.flags, 1, "only the sampled flag is passed on");
        assert!(c.keeps_state());
        let span = new_id();
        let sent = c.header_for(span);
        let (t, p, f) = parse_traceparent(sent.as_bytes()).expect("valid");
        assert_eq!((t, p, f), (c.trace_id, span, 1));

        let fresh = TraceCtx::from_headers(&HeaderMap::new());
        let other = TraceCtx::from_headers(&HeaderMap::new());
        assert_ne!(fresh.trace_id, other.trace_id);
        assert_eq!(fresh.parent, None);
        assert!(fresh.sampled() && !fresh.keeps_state());
        assert!(parse_traceparent(fresh.header_for(new_id()).as_bytes()).is_some());
    }

    #[test]
    fn span_ids_are_unique_and_nonzero() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = new_id();
            assert_ne!(id, 0);
            assert!(seen.insert(id));
        }
    }
}
