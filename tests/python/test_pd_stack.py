"""Prefill/decode disaggregation end to end, with the real model and the official openai
client: `switchyard up --prefill-engines N --decode-engines M` (SmolLM2 on the gguf
backend, NixlConnector's `--kv-transfer-config`, the router's `disaggregated_prefill`).

- Greedy answers through 1P1D and 2P2D equal a single engine's, streamed and not, chat
  and completions.
- The KV really moves: the decode engines' `vllm:prompt_tokens_by_source_total` counts
  the prompts as `external_kv_transfer` and computes at most the last prompt token of
  each; the prefill engines generate exactly one token per request.

The engines keep only the Q8_0 weights (`--cpu-f32-weights-max-bytes 0`): the prefill
engine's prompt pass and the decode engine's recompute of the last prompt token then run
on the same kernel as a single engine's, so the numbers, and the greedy tokens, are the
same (as in test_resume.py).
"""

from __future__ import annotations

import re
import urllib.request

import pytest

from conftest import _stop, start_switchyard

MODEL = "SmolLM2-135M-Instruct"
ENGINE = ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(64 << 20), "--cpu-f32-weights-max-bytes", "0"]
PROMPT = "The history of the printing press begins"
MESSAGES = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]
ENGINE_LINE = re.compile(r"^\s+engine (http://\S+) \((prefill|decode)\)$", re.M)


def up(tmp_path, prefill: int, decode: int):
    args = ["up", "--host", "127.0.0.1", "--port", "0", "--prefill-engines", str(prefill),
            "--decode-engines", str(decode), *[f"--engine-arg={a}" for a in ENGINE]]
    stack = start_switchyard(args, tmp_path)
    roles = {"prefill": [], "decode": []}
    for url, role in ENGINE_LINE.findall(stack.log_path.read_text()):
        roles[role].append(url)
    assert len(roles["prefill"]) == prefill and len(roles["decode"]) == decode, stack.log_tail()
    return stack, roles


def page(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return r.read().decode()


def total(text: str, name: str, **labels: str) -> float:
    n = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            n += float(line.rsplit(" ", 1)[1])
    return n


def sources(urls: list[str]) -> dict[str, float]:
    out = {"local_compute": 0.0, "local_cache_hit": 0.0, "external_kv_transfer": 0.0}
    for u in urls:
        p = page(u)
        for s in out:
            out[s] += total(p, "vllm:prompt_tokens_by_source_total", source=s)
    return out


def generated(urls: list[str]) -> float:
    return sum(total(page(u), "vllm:generation_tokens_total") for u in urls)


def ask(client, kind: str, stream: bool, max_tokens: int = 48) -> str:
    common = dict(model=MODEL, max_tokens=max_tokens, temperature=0)
    if kind == "chat":
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(messages=MESSAGES, stream=True, **common) if c.choices)
        return client.chat.completions.create(messages=MESSAGES, **common).choices[0].message.content
    if stream:
        return "".join(c.choices[0].text or "" for c in
                       client.completions.create(prompt=PROMPT, stream=True, **common) if c.choices)
    return client.completions.create(prompt=PROMPT, **common).choices[0].text


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A single engine's greedy answers."""
    e = start_switchyard(["engine", "--host", "127.0.0.1", "--port", "0", *ENGINE], tmp_path_factory.mktemp("ref"))
    try:
        c = e.client(timeout=120.0)
        yield {kind: ask(c, kind, False) for kind in ("chat", "completions")}
    finally:
        _stop(e.proc)


@pytest.mark.parametrize("prefill,decode", [(1, 1), (2, 2)])
def test_disaggregated_answers_equal_a_single_engine_s_and_the_kv_moves(tmp_path, reference, prefill, decode):
    stack, roles = up(tmp_path, prefill, decode)
    try:
        client = stack.client(timeout=120.0)
        before_src = sources(roles["decode"])
        before_gen = generated(roles["prefill"])
        n = 0
        for kind in ("chat", "completions"):
            for stream in (False, True):
                got = ask(client, kind, stream)
                n += 1
                assert got == reference[kind], (kind, stream, got, reference[kind])
        src = sources(roles["decode"])
        moved = src["external_kv_transfer"] - before_src["external_kv_transfer"]
        computed = src["local_compute"] - before_src["local_compute"]
        # Every request's prompt came over the side channel but its last token, which the
        # decode engine computes again for its logits (as vLLM does).
        assert moved > 0, (src, stack.log_tail())
        assert computed <= n, (computed, n, src)
        # The prefill engines generated the one token each prefill asks for, no more.
        assert generated(roles["prefill"]) - before_gen == n
        router = page(stack.url)
        assert total(router, "vllm:router_pd_handoffs_total", outcome="ok") == n, router
        assert total(router, "vllm:router_pd_fallbacks_total") == 0
    finally:
        _stop(stack.proc)
