"""Fixtures that run a real `switchyard engine --backend sim` process.

The binary comes from $SWITCHYARD_BIN (default: target/debug/switchyard under
the repository root). Each engine is started with `--port 0`, and its address is
read from the `READY http://HOST:PORT` line it prints on stdout, so nothing here
guesses ports or sleeps while hoping the server is up.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "switchyard-sim"
READY_RE = re.compile(r"^READY (https?://\S+)\s*$")
READY_TIMEOUT_S = float(os.environ.get("SWITCHYARD_READY_TIMEOUT", "30"))
BASE_ARGS = ["engine", "--backend", "sim", "--host", "127.0.0.1", "--port", "0", "--time-scale", "0.01"]


def engine_binary() -> Path:
    raw = os.environ.get("SWITCHYARD_BIN", "target/debug/switchyard")
    path = Path(raw)
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path


@dataclass
class Engine:
    """A running engine process and where it listens."""

    url: str
    proc: subprocess.Popen
    args: list[str]
    log_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        return MODEL

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key="sk-switchyard-test",
            max_retries=0,
            timeout=kwargs.pop("timeout", 30.0),
            **kwargs,
        )

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def start_engine(extra_args: list[str], log_dir: Path) -> Engine:
    return start_switchyard([*BASE_ARGS, *extra_args], log_dir)


def start_switchyard(cli_args: list[str], log_dir: Path) -> Engine:
    """Start `switchyard <cli_args>` and wait for its READY line."""
    binary = engine_binary()
    if not binary.is_file():
        pytest.fail(f"engine binary {binary} not found: run `cargo build` or set SWITCHYARD_BIN", pytrace=False)

    args = [str(binary), *cli_args]
    log_fd, log_name = tempfile.mkstemp(prefix="switchyard-", suffix=".log", dir=log_dir)
    log_path = Path(log_name)
    env = dict(os.environ)
    env.setdefault("NO_COLOR", "1")
    with os.fdopen(log_fd, "wb") as log_file:
        proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=env,
            text=True,
            bufsize=1,
        )

    # A reader thread keeps draining stdout for the life of the process, so the
    # engine never blocks on a full pipe; the READY line reaches us through the queue.
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line.rstrip("\n"))
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="switchyard-stdout", daemon=True).start()

    deadline = time.monotonic() + READY_TIMEOUT_S
    url = None
    while url is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _stop(proc)
            pytest.fail(
                f"engine did not print READY within {READY_TIMEOUT_S}s\nargs: {args}\n"
                f"stdout: {seen}\nstderr tail:\n{_tail(log_path)}",
                pytrace=False,
            )
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            code = proc.wait(timeout=5)
            pytest.fail(
                f"engine exited with {code} before READY\nargs: {args}\n"
                f"stdout: {seen}\nstderr tail:\n{_tail(log_path)}",
                pytrace=False,
            )
        match = READY_RE.match(line)
        if match:
            url = match.group(1).rstrip("/")

    return Engine(url=url, proc=proc, args=args, log_path=log_path, stdout_lines=seen)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


@pytest.fixture(scope="session")
def engine_factory(tmp_path_factory):
    """Starts engines with extra CLI flags; all of them are stopped at session end."""
    log_dir = tmp_path_factory.mktemp("engine-logs")
    started: list[Engine] = []

    def factory(*extra_args: str) -> Engine:
        eng = start_engine(list(extra_args), log_dir)
        started.append(eng)
        return eng

    yield factory

    for eng in started:
        _stop(eng.proc)


@pytest.fixture(scope="session")
def engine(engine_factory) -> Engine:
    """The shared engine: default sim preset, 100x faster than real time."""
    return engine_factory()


@pytest.fixture(scope="session")
def client(engine) -> openai.OpenAI:
    return engine.client()


@pytest.fixture(autouse=True)
def _engine_still_alive(request):
    """Fails the test that crashed the shared engine, rather than every test after it."""
    yield
    if "engine" in request.fixturenames:
        eng: Engine = request.getfixturevalue("engine")
        code = eng.proc.poll()
        if code is not None:
            pytest.fail(f"engine exited with {code} during this test\nstderr tail:\n{eng.log_tail()}", pytrace=False)
