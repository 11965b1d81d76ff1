"""Mid-stream failover with the real model: two `--backend gguf` engines (SmolLM2) behind
the router; the engine streaming a greedy answer is SIGKILLed part way, and the official
openai client still reads one unbroken answer, equal to an uninterrupted run's.

The engines keep only the Q8_0 weights (`--cpu-f32-weights-max-bytes 0`), so the
continuation's prefill of the text already sent runs on the same kernel as the decode
that produced it: the same numbers, so the same greedy tokens. With the default f32
prefill gemm, near-ties can flip after a resume (see README, mid-stream failover).
"""

from __future__ import annotations

import re
import signal
import urllib.request

import pytest

from conftest import _stop, start_switchyard

MODEL = "SmolLM2-135M-Instruct"
ENGINE_ARGS = ["engine", "--backend", "gguf", "--host", "127.0.0.1", "--port", "0", "--max-model-len", "2048",
               "--kv-cache-memory-bytes", str(128 << 20), "--cpu-f32-weights-max-bytes", "0"]


@pytest.fixture
def stack(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("resume")
    engines = [start_switchyard(ENGINE_ARGS, log_dir) for _ in range(2)]
    router = start_switchyard(
        ["router", "--host", "127.0.0.1", "--port", "0", "--static-backends", ",".join(e.url for e in engines),
         "--stream-stall-timeout-secs", "3"],
        log_dir,
    )
    yield engines, router
    for p in [router, *engines]:
        if p.proc.poll() is None:
            p.proc.kill()
        _stop(p.proc)


def resumed(router) -> float:
    with urllib.request.urlopen(f"{router.url}/metrics", timeout=10) as r:
        page = r.read().decode()
    m = re.search(r'^vllm:router_stream_resumes_total\{outcome="resumed"\} (\S+)$', page, re.M)
    return float(m.group(1)) if m else -1.0


def run(router, engines, kind: str, kill_after: int | None) -> tuple[str, str | None]:
    """Stream one greedy answer; after `kill_after` chunks, SIGKILL the engine serving it."""
    client = router.client(timeout=300.0)
    common = dict(model=MODEL, max_tokens=160, temperature=0, stream=True, extra_body={"ignore_eos": True})
    if kind == "chat":
        raw = client.chat.completions.with_raw_response.create(
            messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}], **common)
    else:
        raw = client.completions.with_raw_response.create(prompt="The history of the printing press begins", **common)
    serving = raw.headers["x-switchyard-engine"]
    text, finish, n = [], None, 0
    for chunk in raw.parse():
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        piece = ch.delta.content if kind == "chat" else ch.text
        text.append(piece or "")
        finish = ch.finish_reason or finish
        n += 1
        if kill_after is not None and n == kill_after:
            victim = next(e for e in engines if e.url.endswith(serving))
            victim.proc.send_signal(signal.SIGKILL)
    return "".join(text), finish


@pytest.mark.parametrize("kind,cut", [("chat", 4), ("chat", 30), ("completions", 12)])
def test_a_killed_engine_s_greedy_answer_continues_token_identical(stack, kind, cut):
    engines, router = stack
    want, want_finish = run(router, engines, kind, None)
    got, finish = run(router, engines, kind, cut)
    assert resumed(router) == 1.0, "the engine finished before it was killed: nothing was resumed"
    assert finish == want_finish == "length"
    assert got == want
