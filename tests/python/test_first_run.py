"""What a new user meets first: the README's own request against `switchyard up`, an
engine given only a model file, `up --routing-logic kvaware` really following KV events,
the generation defaults reaching the sampler, and plain log lines off a terminal.

Needs the default model (fetched into the cache on first use; the Rust tests fetch it
first in scripts/test.sh). Answers are checked on prompts whose answer leads by a wide
margin at the model card's temperature 0.2 (first tokens "The"/"Paris" against "L" at
-3.5 nats), or seeded where the lead is narrower, never on timings.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import REPO_ROOT, _stop, engine_binary, start_switchyard

MODEL = "SmolLM2-135M-Instruct"
SMALL = ["--engine-arg=--kv-cache-memory-bytes=268435456", "--engine-arg=--max-model-len=2048"]


def default_model_path() -> Path:
    cache = os.environ.get("SWITCHYARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "switchyard")
    path = Path(cache) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"the default model should have been fetched by the Rust tests: {path}"
    return path


def readme_first_request() -> str:
    """The first `curl` command of the README, as written (continuation lines joined)."""
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    for block in blocks:
        if "curl" in block:
            return block.replace("\\\n", " ").strip()
    raise AssertionError("the README has no curl example")


def post(url: str, body: dict, timeout: float = 120.0) -> tuple[dict, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r), dict(r.headers)


def metric(page: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in page.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_readme_first_request_answers_sensibly(tmp_path):
    """`switchyard up` with its defaults, then the README's curl exactly as written, but
    for the port the test's stack got."""
    command = readme_first_request()
    assert "temperature" not in command, "the README's first request leaves sampling to the defaults"
    stack = start_switchyard(["up", "--host", "127.0.0.1", "--port", "0", "--engines", "2", *SMALL], tmp_path)
    try:
        host_port = stack.url.removeprefix("http://").rstrip("/")
        assert "localhost:8000" in command, command
        out = subprocess.run(["bash", "-c", command.replace("localhost:8000", host_port)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        answer = json.loads(out)["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        assert len(answer) < 200 and "France" in answer, answer
    finally:
        _stop(stack.proc)


def test_engine_given_only_a_model_file_serves_it(tmp_path):
    """`switchyard engine --model X.gguf`: the gguf backend by default, served under the
    path as vLLM names it, answering from the model card's defaults (temperature 0.2, so
    each request is seeded: an unseeded sample once answered "Neptune" in CI)."""
    path = str(default_model_path())
    e = start_switchyard(["engine", "--model", path, "--host", "127.0.0.1", "--port", "0"], tmp_path)
    try:
        client = e.client(timeout=120.0)
        assert [m.id for m in client.models.list().data] == [path]
        r = client.chat.completions.create(
            model=path, messages=[{"role": "user", "content": "In one sentence, what is the capital of France?"}],
            max_tokens=24, seed=0)
        assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
        r = client.chat.completions.create(
            model=path, messages=[{"role": "user", "content": "Which planet is the largest in our solar system?"}],
            max_tokens=24, seed=0)
        assert "Jupiter" in r.choices[0].message.content, r.choices[0].message.content
    finally:
        _stop(e.proc)


def test_generation_defaults_reach_the_sampler(tmp_path):
    """--override-generation-config: a request without the fields gets them (greedy, and a
    default max_tokens); a request's own fields still win."""
    e = start_switchyard(["engine", "--host", "127.0.0.1", "--port", "0", "--max-model-len", "1024",
                          "--kv-cache-memory-bytes", str(128 << 20),
                          "--override-generation-config", '{"temperature": 0, "max_new_tokens": 5}'], tmp_path)
    try:
        client = e.client(timeout=120.0)
        kw = dict(model=MODEL, prompt="Once upon a time")
        plain = client.completions.create(**kw)
        assert plain.usage.completion_tokens == 5, plain.usage
        greedy = client.completions.create(temperature=0, max_tokens=5, **kw)
        assert plain.choices[0].text == greedy.choices[0].text
        # Without the override the default would sample; here every default run is greedy.
        assert {client.completions.create(**kw).choices[0].text for _ in range(3)} == {greedy.choices[0].text}
        longer = client.completions.create(max_tokens=9, **kw)
        assert longer.usage.completion_tokens == 9
        hot = {client.completions.create(temperature=1.5, seed=s, **kw).choices[0].text for s in range(4)}
        assert len(hot) > 1, "the request's own temperature wins over the default"
    finally:
        _stop(e.proc)
    bad = subprocess.run([str(engine_binary()), "engine", "--port", "0", "--override-generation-config",
                          '{"temprature": 0}'], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "temprature" in bad.stderr, bad.stderr


def test_up_kvaware_follows_the_engines_kv_events(tmp_path):
    """`up --routing-logic kvaware` over two real engines: the engines publish KV events,
    the router tokenizes as they do, and a conversation returns to the engine holding its
    prefix (cache_hit decisions, not load fallbacks)."""
    stack = start_switchyard(["up", "--host", "127.0.0.1", "--port", "0", "--engines", "2",
                              "--routing-logic", "kvaware", *SMALL], tmp_path)
    try:
        url = stack.url.rstrip("/")
        users = {
            "a": "You are a ship's navigator. " * 30,
            "b": "You are a patient chemistry tutor. " * 30,
        }
        owner: dict[str, str] = {}
        before = 0.0
        for rnd in range(3):
            for user, system in users.items():
                msgs = [{"role": "system", "content": system},
                        {"role": "user", "content": f"Question {rnd} please."}]
                _, headers = post(f"{url}/v1/chat/completions",
                                  {"model": MODEL, "messages": msgs, "max_tokens": 2, "temperature": 0})
                engine = headers.get("x-switchyard-engine") or headers.get("X-Switchyard-Engine")
                assert engine, headers
                if rnd == 0:
                    owner[user] = engine
                else:
                    assert engine == owner[user], (user, rnd, engine, owner)
            if rnd == 0:
                # Readiness, not a sleep: wait until the router has indexed both prompts.
                deadline = time.monotonic() + 30
                while True:
                    _, page = stack.get("/metrics")
                    if metric(page, "vllm:router_kv_index_blocks") >= 20:
                        before = metric(page, "vllm:router_kv_decisions_total", outcome="cache_hit")
                        break
                    assert time.monotonic() < deadline, page[-3000:]
                    time.sleep(0.1)
        _, page = stack.get("/metrics")
        hits = metric(page, "vllm:router_kv_decisions_total", outcome="cache_hit") - before
        # Every request after the first round followed the KV events to its prefix.
        assert hits == 4, page
    finally:
        _stop(stack.proc)


def test_logs_are_plain_off_a_terminal(tmp_path):
    """A log file gets no ANSI colour codes (NO_COLOR unset on purpose)."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["SWITCHYARD_LOG"] = "info"
    log = tmp_path / "engine.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(engine_binary()), "engine", "--backend", "sim", "--host", "127.0.0.1",
                                 "--port", "0"], stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("READY "), line
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    text = log.read_text()
    assert "engine listening" in text, text
    assert "\x1b[" not in text, shlex.quote(text[:300])
