//! Bearer tokens, as `vllm serve --api-key` reads them: `Authorization: Bearer TOKEN`
//! (the scheme in any case), and a comparison whose time does not depend on the secret.

use axum::http::{header, HeaderMap};

/// The token of an `Authorization: Bearer TOKEN` header (scheme case-insensitive, as
/// vLLM's middleware); `None` when the header is missing, not a bearer token, or empty.
pub fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let space = v.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = v.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Whether `given` equals `secret`, in a time that depends only on `given`'s length:
/// every byte of `given` is compared (against `secret` repeated), whatever the lengths
/// and wherever they differ, so neither the secret's bytes nor its length leak.
pub fn ct_eq(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = (given.len() ^ secret.len()) as u64;
    if secret.is_empty() {
        return false;
    }
    for (i, g) in given.iter().enumerate() {
        diff |= u64::from(g ^ secret[i % secret.len()]);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn reads_bearer_tokens_as_vllm_does() {
        assert_eq!(bearer_token(&headers("Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer_token(&headers("bearer  abc")), Some(&b"abc"[..]));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert_eq!(bearer_token(&headers("Bearer")), None);
        assert_eq!(bearer_token(&headers("Bearer ")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[test]
    fn compares_whole_tokens() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secre", b"secret"));
        assert!(!ct_eq(b"secretsecret", b"secret"));
        assert!(!ct_eq(b"secreT", b"secret"));
        assert!(!ct_eq(b"", b"secret"));
        assert!(!ct_eq(b"", b""));
    }
}
