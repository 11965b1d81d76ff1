//! Greedy ids from the GGUF backend for token-id prompts, for comparing with llama.cpp:
//! `cargo run -p switchyard-engine --example gguf_greedy -- MODEL.gguf N IDS [IDS...]`
//! (`IDS`: comma-separated token ids, one prompt each). Prints one JSON line per prompt:
//! `{"prompt_ids": [...], "output_ids": [...]}`; each prompt runs alone, prefilled in one
//! step, then decoded one token per step. With `FORCE=1`, each `IDS` is a prompt and a
//! forced continuation joined by `|`: the continuation's tokens are fed instead of the
//! model's picks, and each step's top-`N` log-probabilities of the raw distribution are
//! printed (`"top": [[[id, logprob], ...], ...]`), for comparing distributions with
//! llama.cpp's along the same text.
use gguf::Gguf;
use switchyard_engine::backend::gguf::{model::Model, GgufBackend};
use switchyard_engine::backend::Backend;
use switchyard_engine::core::step::SeqStep;
use switchyard_engine::core::SamplingParams;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("MODEL.gguf");
    let n: usize = args.next().expect("N").parse().expect("N");
    let g = Gguf::open(std::path::Path::new(&path)).expect("gguf");
    let t = std::time::Instant::now();
    let m = Model::load(&g).expect("load");
    eprintln!("loaded in {:?}: {:?}", t.elapsed(), m.cfg.arch);
    let eos: Vec<u32> = g
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.as_i64())
        .map(|v| vec![v as u32])
        .unwrap_or_default();
    let mut be = GgufBackend::new(m, 1024, 16, eos.clone());
    let force = std::env::var_os("FORCE").is_some();
    let params = SamplingParams {
        temperature: 0.0,
        logprobs: force.then_some(n as u32),
        ..Default::default()
    };
    let parse = |s: &str| -> Vec<u32> {
        s.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse().expect("id"))
            .collect()
    };
    for prompt in args {
        let (prompt, forced) = prompt.split_once('|').unwrap_or((&prompt, ""));
        let forced = parse(forced);
        let mut toks = parse(prompt);
        let np = toks.len();
        if force {
            let blocks: Vec<u32> = (0..(np + forced.len()).div_ceil(16) as u32).collect();
            let mut tops = Vec::new();
            let mut computed = 0;
            for &f in &forced {
                let step = SeqStep {
                    req_id: 0,
                    tokens: &toks,
                    num_prompt: np,
                    num_computed: computed,
                    num_new: toks.len() - computed,
                    block_ids: &blocks,
                    sample: true,
                    params: &params,
                    rng_seed: 0,
                    lora: None,
                };
                let mut out = Vec::new();
                be.execute(&[step], &mut out).expect("step");
                let mut lp = Vec::new();
                be.take_logprobs(&mut lp);
                let top: Vec<(u32, f32)> = lp
                    .pop()
                    .flatten()
                    .map(|l| l.top.clone())
                    .unwrap_or_default();
                tops.push(
                    top.iter()
                        .map(|(i, l)| format!("[{i}, {l}]"))
                        .collect::<Vec<_>>(),
                );
                computed = toks.len();
                toks.push(f);
            }
            let tops: Vec<String> = tops.iter().map(|t| format!("[{}]", t.join(", "))).collect();
            println!(
                "{{\"prompt_ids\": {:?}, \"top\": [{}]}}",
                &toks[..np],
                tops.join(", ")
            );
            continue;
        }
        let blocks: Vec<u32> = (0..(np + n).div_ceil(16) as u32).collect();
        let mut computed = 0;
        while toks.len() < np + n {
            let step = SeqStep {
                req_id: 0,
                tokens: &toks,
                num_prompt: np,
                num_computed: computed,
                num_new: toks.len() - computed,
                block_ids: &blocks,
                sample: true,
                params: &params,
                rng_seed: 0,
                lora: None,
            };
            let mut out = Vec::new();
            be.execute(&[step], &mut out).expect("step");
            computed = toks.len();
            toks.push(out[0]);
            if eos.contains(&out[0]) {
                break;
            }
        }
        println!(
            "{{\"prompt_ids\": {:?}, \"output_ids\": {:?}}}",
            &toks[..np],
            &toks[np..]
        );
    }
}
