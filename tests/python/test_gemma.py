"""Gemma 3 270M (Q4_K_M: K-quants, a SentencePiece vocabulary, sliding-window layers)
served by `switchyard up --model gemma3-270m` and used through the official openai client.

The model is fetched into the cache on first use (the Rust tests fetch it first in
scripts/test.sh). What is checked against llama.cpp comes from the fixtures its own tools
recorded: the chat prompt's ids (tests/fixtures/tokenizer/gemma3.json) and greedy
continuations (tests/fixtures/gguf/gemma3_greedy.json); timings are never asserted.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from conftest import REPO_ROOT, _stop, start_switchyard

MODEL = "gemma3-270m"
SMALL = ["--engine-arg=--kv-cache-memory-bytes=268435456", "--engine-arg=--max-model-len=4096"]


def fixture(name: str) -> dict:
    return json.loads((REPO_ROOT / "tests" / "fixtures" / name).read_text())


def metric(page: str, name: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in page.splitlines()
               if l.startswith(name + "{") or l.startswith(name + " "))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("gemma-up")
    s = start_switchyard(["up", "--model", MODEL, "--host", "127.0.0.1", "--port", "0", "--engines", "2",
                          "--routing-logic", "prefixaware", *SMALL], log_dir)
    yield s
    _stop(s.proc)


def post(stack, path: str, body: dict) -> dict:
    req = urllib.request.Request(stack.url.rstrip("/") + path, json.dumps({"model": MODEL, **body}).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def tokenize(stack, body: dict) -> list[int]:
    return post(stack, "/tokenize", body)["tokens"]


def test_served_under_its_short_name_with_gemmas_chat_prompt(stack):
    client = stack.client(timeout=120.0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    for chat in fixture("tokenizer/gemma3.json")["chats"]:
        want = chat["llama_cpp_ids_with_bos"]
        # The router's /tokenize reaches an engine: Gemma's template from the file (or the
        # built-in one) and the SentencePiece ids, as llama.cpp's server builds them.
        assert tokenize(stack, {"messages": chat["messages"]}) == want, chat["messages"]
        r = client.chat.completions.create(model=MODEL, messages=chat["messages"], max_tokens=8, temperature=0)
        assert r.usage.prompt_tokens == len(want)
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")


def test_tricky_texts_tokenize_as_llama_cpp_does(stack):
    texts = fixture("tokenizer/gemma3.json")["texts"]
    # A spread of the recorded texts (unicode, digits, spaces, byte fallback, specials).
    for case in texts[:: max(1, len(texts) // 12)]:
        got = tokenize(stack, {"prompt": case["text"], "add_special_tokens": False})
        assert got == case["llama_cpp"], case["text"]


def test_greedy_text_matches_llama_cpp_and_streams_the_same(stack):
    client = stack.client(timeout=120.0)
    case = fixture("gguf/gemma3_greedy.json")["cases"][0]
    assert case["prompt"] == "The capital of France is"
    # Where llama.cpp's top choice led by a clear margin all the way, the text must be its.
    n = next((i for i, m in enumerate(case["margins"]) if m < 0.05), len(case["margins"]))
    assert n >= 8, "the fixture's first prompt should lead clearly for several tokens"
    want = post(stack, "/detokenize", {"tokens": case["output_ids"][:n]})["prompt"]
    r = client.completions.create(model=MODEL, prompt=case["prompt"], max_tokens=n, temperature=0)
    assert r.choices[0].text == want, (r.choices[0].text, want)
    assert r.usage.prompt_tokens == len(case["prompt_ids"])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=case["prompt"], max_tokens=n, temperature=0, stream=True) if c.choices)
    assert streamed == want


def test_a_prompt_past_the_sliding_window_answers_the_same_from_the_prefix_cache(stack):
    """Longer than the local layers' 512-token window: the second request goes where the
    first went (prefixaware), reuses its blocks (the engine's own prefix-cache hits) and
    answers the same."""
    client = stack.client(timeout=120.0)
    story = " ".join(f"Room {i} has a {c} door." for i, c in zip(range(150), ["red", "blue", "green"] * 50))
    prompt = story + " Room 7 has a"
    assert len(tokenize(stack, {"prompt": prompt})) > 1024
    texts, engines, hits = [], [], []
    for _ in range(2):
        raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        engine = raw.headers.get("x-switchyard-engine")
        assert engine, dict(raw.headers)
        texts.append(raw.parse().choices[0].text)
        engines.append(engine)
        with urllib.request.urlopen(f"http://{engine}/metrics", timeout=10) as r:
            hits.append(metric(r.read().decode(), "vllm:prefix_cache_hits_total"))
    assert engines[0] == engines[1], engines
    assert texts[0] == texts[1], texts
    # The pattern continues (the model is small: which colour it recalls is not checked).
    assert re.match(r" (red|blue|green) door\. Room 8", texts[0]), texts[0]
    # Every full block of the prompt but the last came from the cache the second time.
    assert hits[1] - hits[0] >= 1024, hits
