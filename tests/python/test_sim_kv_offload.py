"""KV offloading on the sim backend: the same tiers as the real engine (host memory, a
shared `switchyard cache-server`), with payloads of the preset model's byte size and
modelled transfer times. A prompt evicted from the paged pool and asked again is a
host-tier hit; a prompt served by one engine is a remote hit on another; both cost
less time to first token than computing the prompt (the sim charges only the uncached
suffix, plus the modelled load). A chunk of another model's shape is refused.

TTFT is read from the engine's own `vllm:time_to_first_token_seconds` histogram (the
sum's increase over one request), so client and HTTP noise stay out of it.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request

import pytest

from conftest import _stop, start_switchyard
from test_kv_offload import TRANSFER, metrics, value

# SmolLM2-135M on a CPU, a quarter of real time: ~0.2 ms per prompt token.
PRESET = "smollm2-135m-cpu"
# 30 layers x 3 KV heads x 64 x (K, V) x f16, per token; 256-token chunks.
CHUNK_BYTES = 256 * 30 * 3 * 64 * 2 * 2
# One sim token per word: 1000 tokens, three full chunks before the last token.
PROMPT = " red" * 1000


def sim_engine(*extra: str, preset: str = PRESET) -> list[str]:
    return ["engine", "--backend", "sim", "--host", "127.0.0.1", "--port", "0",
            "--sim-preset", preset, "--time-scale", "0.25",
            "--served-model-name", "sim-kv", "--kv-transfer-config", TRANSFER, *extra]


def ask(e, prompt: str) -> tuple[float, str]:
    """TTFT in seconds (the engine's histogram) and the page after."""
    page = metrics(e)
    before = value(page, "vllm:time_to_first_token_seconds_sum")
    count = value(page, "vllm:time_to_first_token_seconds_count")
    body = json.dumps({"model": "sim-kv", "prompt": prompt, "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(f"{e.url}/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.load(r)["choices"][0]["finish_reason"] == "length"
    # The loop records a request's statistics just after its last token goes out: wait
    # for the observation, not for a guessed time.
    for _ in range(500):
        page = metrics(e)
        if value(page, "vllm:time_to_first_token_seconds_count") > count:
            break
        threading.Event().wait(0.01)
    assert value(page, "vllm:time_to_first_token_seconds_count") == count + 1, page
    return value(page, "vllm:time_to_first_token_seconds_sum") - before, page


def suffix_floor_s(tokens: int) -> float:
    """What the sim charges at least for computing `tokens` prompt tokens in one step."""
    return (11400 + 800 * tokens) * 1e-6 * 0.25


def test_sim_host_tier_serves_a_prompt_evicted_from_the_paged_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "True")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.5")
    # 80 blocks of 16: 1280 tokens, room for one long prompt at a time.
    e = start_switchyard(sim_engine("--num-gpu-blocks-override", "80", "--max-model-len", "1280",
                                    "--max-num-batched-tokens", "2048"), tmp_path)
    try:
        cold, page = ask(e, PROMPT)
        assert value(page, "switchyard:kv_offload_saved_chunks_total", tier="cpu") == 3
        # A prompt that needs the whole pool evicts every block of the first.
        ask(e, " sun" * 1270)
        hit, page = ask(e, PROMPT)
        assert value(page, "switchyard:kv_offload_hit_chunks_total", tier="cpu") == 3, page
        assert value(page, "vllm:external_prefix_cache_hits_total") == 3 * 256
        # Payloads of the preset model's size: 3 + 4 chunks held.
        assert value(page, "switchyard:kv_offload_tier_bytes", tier="cpu") == 7 * CHUNK_BYTES
        assert value(page, "switchyard:kv_offload_loaded_bytes_total") == 3 * CHUNK_BYTES
        # Only the 232-token suffix is computed: TTFT drops, but not below its cost.
        assert cold >= suffix_floor_s(1000)
        # Modelled time: at least the suffix's compute; under the whole prompt's (a generous
        # bound, so a loaded machine cannot fail it).
        assert suffix_floor_s(1000 - 768) <= hit < cold, (hit, cold)
    finally:
        _stop(e.proc)


@pytest.fixture
def cache_server(tmp_path):
    s = start_switchyard(["cache-server", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
                          "--max-bytes", str(256 << 20)], tmp_path)
    lm = next(re.search(r"lm://\S+", l).group(0) for l in s.stdout_lines if l.startswith("LM "))
    yield s, lm
    _stop(s.proc)


def test_two_sim_engines_share_a_cache_server(tmp_path, monkeypatch, cache_server):
    server, lm = cache_server
    monkeypatch.setenv("LMCACHE_REMOTE_URL", lm)
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "False")
    started = []
    try:
        # C: the same served name with another model's shape (Llama-3.1-8B's): same keys.
        for args in (sim_engine(), sim_engine(), sim_engine(preset="llama-3.1-8b-h100")):
            started.append(start_switchyard(args, tmp_path))
        a, b, c = started
        cold, _ = ask(a, PROMPT)
        for _ in range(200):  # A saves off the request path: wait for its chunks
            if value(metrics(server), "switchyard_cache_server_entries") >= 3:
                break
            threading.Event().wait(0.05)
        assert value(metrics(server), "switchyard_cache_server_entries") == 3
        assert value(metrics(server), "switchyard_cache_server_bytes") >= 3 * CHUNK_BYTES
        hit, page = ask(b, PROMPT)
        assert value(page, "switchyard:kv_offload_hit_chunks_total", tier="remote") == 3, page
        assert value(page, "vllm:external_prefix_cache_hits_total") == 3 * 256
        # Modelled time: at least the suffix's compute; under the whole prompt's (a generous
        # bound, so a loaded machine cannot fail it).
        assert suffix_floor_s(1000 - 768) <= hit < cold, (hit, cold)
        # C finds the chunks but refuses them (their layout is not its own) and computes.
        _, page = ask(c, PROMPT)
        assert value(page, "switchyard:kv_offload_rejected_chunks_total") == 1, page
        assert value(page, "switchyard:kv_offload_hit_chunks_total", tier="remote") == 0
        assert value(page, "vllm:external_prefix_cache_hits_total") == 0
    finally:
        for p in started:
            _stop(p.proc)


def test_up_with_sim_engines_and_a_kv_cache_server_shares_prompts(tmp_path):
    """`switchyard up --backend sim --kv-cache-server`: round robin sends the second ask
    to the other engine, which loads the prompt's chunks from the server."""
    stack = start_switchyard(["up", "--backend", "sim", "--host", "127.0.0.1", "--port", "0", "--engines", "2",
                              "--served-model-name", "sim-kv", "--kv-cache-server=268435456",
                              "--engine-arg=--sim-preset=smollm2-135m-cpu", "--engine-arg=--time-scale=0.25"],
                             tmp_path)
    try:
        engines = re.findall(r"engine (http://\S+)", stack.log_path.read_text())
        assert len(engines) == 2, stack.log_path.read_text()[-2000:]

        def total(name: str, **labels: str) -> float:
            return sum(value(urllib.request.urlopen(f"{u}/metrics", timeout=10).read().decode(), name, **labels)
                       for u in engines)

        body = json.dumps({"model": "sim-kv", "prompt": PROMPT, "max_tokens": 1}).encode()

        def complete() -> None:
            req = urllib.request.Request(f"{stack.url}/v1/completions", body, {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert json.load(r)["usage"]["prompt_tokens"] == 1000

        complete()
        for _ in range(200):  # the first engine's chunks reach the server off the request path
            if total("switchyard:kv_offload_saved_chunks_total", tier="remote") >= 3:
                break
            threading.Event().wait(0.05)
        complete()
        assert total("switchyard:kv_offload_hit_chunks_total", tier="remote") == 3
        assert total("vllm:external_prefix_cache_hits_total") == 3 * 256
    finally:
        _stop(stack.proc)
