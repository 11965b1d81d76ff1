//! The load generator's SSE parser: an OpenAI stream fed in two pieces split anywhere
//! gives exactly the outcome of feeding it whole (text, events, usage, error).
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use switchyard_bench::client::{Outcome, SseParser};

fn run(pieces: &[&[u8]]) -> (Result<(), String>, Outcome) {
    let now = Instant::now();
    let mut p = SseParser::new(now, true);
    let mut o = Outcome::default();
    let mut r = Ok(());
    for piece in pieces {
        if let Err(e) = p.feed(piece, now, &mut o) {
            r = Err(format!("{:?}: {}", e.0, e.1));
            break;
        }
    }
    if r.is_ok() {
        r = p
            .finish(now, &mut o)
            .map_err(|e| format!("{:?}: {}", e.0, e.1));
    }
    (r, o)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let cut = if body.is_empty() {
        0
    } else {
        cut as usize % body.len()
    };
    let (whole_r, whole) = run(&[body]);
    let (split_r, split) = run(&[&body[..cut], &body[cut..]]);
    assert_eq!(whole_r, split_r);
    assert_eq!(whole.text, split.text);
    assert_eq!(whole.chunks, split.chunks);
    assert_eq!(whole.prompt_tokens, split.prompt_tokens);
    assert_eq!(whole.output_tokens, split.output_tokens);
});
