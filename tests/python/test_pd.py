"""Prefill/decode disaggregation with the real model (vLLM's NixlConnector contract):
a prefill engine and a decode engine (`--backend gguf`, SmolLM2), the test playing the
router with the official openai client: the prefill body (`max_tokens: 1`,
`do_remote_decode`), then the original body with the prefill's `kv_transfer_params` to
the decode engine, which pulls the prompt's KV over the side channel. The greedy answer
must equal a single engine's, the decode engine must have computed at most one prompt
token, and the prefill engine generated exactly one.

The engines keep only the Q8_0 weights (`--cpu-f32-weights-max-bytes 0`), as
test_resume.py does: the decode engine computes the last prompt token alone, and with the
default f32 prefill gemm near-ties could flip between that and a whole-prompt prefill.
"""

from __future__ import annotations

import re
import urllib.request

import pytest

from conftest import _stop, start_switchyard

MODEL = "SmolLM2-135M-Instruct"
NIXL = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
ENGINE_ARGS = ["engine", "--backend", "gguf", "--host", "127.0.0.1", "--port", "0", "--max-model-len", "2048",
               "--kv-cache-memory-bytes", str(64 << 20), "--cpu-f32-weights-max-bytes", "0"]
PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("pd")
    pd = [start_switchyard(ENGINE_ARGS + ["--kv-transfer-config", NIXL, "--kv-side-channel-port", "0"], log_dir)
          for _ in range(2)]
    single = start_switchyard(ENGINE_ARGS, log_dir)
    yield pd[0], pd[1], single
    for e in [*pd, single]:
        _stop(e.proc)


def metric(engine, name: str, source: str | None = None) -> float:
    with urllib.request.urlopen(f"{engine.url}/metrics", timeout=10) as r:
        page = r.read().decode()
    label = f',source="{source}"' if source else ""
    m = re.search(rf'^{re.escape(name)}\{{engine="0",model_name="[^"]*"{re.escape(label)}\}} (\S+)$', page, re.M)
    assert m, f"{name} {source} not on the page"
    return float(m.group(1))


def ask(engine, kind: str, stream: bool, max_tokens: int, kv: dict | None):
    client = engine.client(timeout=300.0)
    extra = {"kv_transfer_params": kv} if kv is not None else {}
    if kind == "chat":
        messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                           stream=stream, extra_body=extra)
    else:
        r = client.completions.create(model=MODEL, prompt="The history of the printing press begins with",
                                      max_tokens=max_tokens, temperature=0, stream=stream, extra_body=extra)
    if not stream:
        return r
    text = []
    for chunk in r:
        if chunk.choices:
            c = chunk.choices[0]
            text.append((c.delta.content or "") if kind == "chat" else c.text)
    return "".join(text)


def text_of(r, kind: str) -> str:
    return r.choices[0].message.content if kind == "chat" else r.choices[0].text


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_greedy_output_through_prefill_then_decode_equals_one_engine(engines, kind, stream):
    prefill, decode, single = engines
    want = ask(single, kind, stream, 24, None)
    want = want if stream else text_of(want, kind)

    g0 = metric(prefill, "vllm:generation_tokens_total")
    p = ask(prefill, kind, False, 1, PREFILL_PARAMS)
    assert p.usage.completion_tokens == 1
    assert metric(prefill, "vllm:generation_tokens_total") - g0 == 1
    kv = p.model_extra["kv_transfer_params"]
    assert kv["do_remote_prefill"] is True and kv["do_remote_decode"] is False
    assert kv["remote_block_ids"] and kv["remote_engine_id"] and kv["remote_host"] and kv["remote_port"]
    assert kv["tp_size"] == 1 and len(kv["remote_request_id"]) == 32
    n = p.usage.prompt_tokens

    e0 = metric(decode, "vllm:prompt_tokens_by_source_total", "external_kv_transfer")
    l0 = metric(decode, "vllm:prompt_tokens_by_source_total", "local_compute")
    got = ask(decode, kind, stream, 24, kv)
    got = got if stream else text_of(got, kind)
    assert got == want
    assert metric(decode, "vllm:prompt_tokens_by_source_total", "external_kv_transfer") - e0 == n - 1
    assert metric(decode, "vllm:prompt_tokens_by_source_total", "local_compute") - l0 <= 1
    assert metric(prefill, "switchyard:kv_transfer_leases") == 0, "the lease was released after the pull"


def test_a_dead_prefill_engine_or_a_forged_lease_costs_a_recompute_with_the_same_answer(engines, tmp_path):
    prefill, decode, single = engines
    want = text_of(ask(single, "completions", False, 16, None), "completions")
    kv = ask(prefill, "completions", False, 1, PREFILL_PARAMS).model_extra["kv_transfer_params"]
    forged = dict(kv, remote_request_id="f" * 32)
    f0 = metric(decode, "switchyard:kv_transfer_load_failures_total")
    assert text_of(ask(decode, "completions", False, 16, forged), "completions") == want
    assert metric(decode, "switchyard:kv_transfer_load_failures_total") - f0 == 1
    assert metric(prefill, "switchyard:kv_transfer_leases") == 1, "a forged read takes nothing"

    doomed = start_switchyard(ENGINE_ARGS + ["--kv-transfer-config", NIXL, "--kv-side-channel-port", "0"], tmp_path)
    kv2 = ask(doomed, "completions", False, 1, PREFILL_PARAMS).model_extra["kv_transfer_params"]
    doomed.proc.kill()
    _stop(doomed.proc)
    assert text_of(ask(decode, "completions", False, 16, kv2), "completions") == want
    assert metric(decode, "switchyard:kv_transfer_load_failures_total") - f0 == 2
    # The real lease still serves its decode.
    assert text_of(ask(decode, "completions", False, 16, kv), "completions") == want
    assert metric(prefill, "switchyard:kv_transfer_leases") == 0
