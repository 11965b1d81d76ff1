"""TLS on the listener and the bounded drain on SIGTERM, for the engine and the router,
with the official `openai` client.

TLS: `--ssl-certfile`/`--ssl-keyfile` (as `vllm serve` names them) with the self-signed
certificate in tests/fixtures/tls; the client verifies it. Drain: on SIGTERM the listener
closes at once, a stream already running finishes, and `--shutdown-timeout` bounds how
long the process waits for it.
"""

from __future__ import annotations

import signal
import socket
import ssl
import threading
import time
from urllib.parse import urlparse

import openai
import pytest

from conftest import BASE_ARGS, MODEL, REPO_ROOT, _stop, start_switchyard

TLS = REPO_ROOT / "tests" / "fixtures" / "tls"
TLS_ARGS = ["--ssl-certfile", str(TLS / "cert.pem"), "--ssl-keyfile", str(TLS / "key.pem")]
# The sim's default preset decodes a token in about 7 ms; scale it so streams last seconds.
SLOW = ["--time-scale", "4"]


def https_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/v1",
        api_key="sk-test",
        max_retries=0,
        timeout=60,
        http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(TLS / "cert.pem"))),
    )


def plain_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=60)


def refuses_connections(url: str) -> bool:
    u = urlparse(url)
    try:
        socket.create_connection((u.hostname, u.port), timeout=1).close()
        return False
    except OSError:
        return True


def wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class Stream:
    """A streaming completion read on a thread: text so far, whether it ended in a
    finish_reason, and the error if it broke."""

    def __init__(self, client: openai.OpenAI, max_tokens: int):
        self.pieces: list[str] = []
        self.finish: str | None = None
        self.error: Exception | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(client, max_tokens), daemon=True)
        self.thread.start()

    def _run(self, client, max_tokens):
        try:
            for chunk in client.completions.create(
                model=MODEL, prompt="Tell me a story", max_tokens=max_tokens, stream=True,
                extra_body={"ignore_eos": True},
            ):
                self.pieces.append(chunk.choices[0].text)
                self.started.set()
                if chunk.choices[0].finish_reason:
                    self.finish = chunk.choices[0].finish_reason
        except Exception as e:  # noqa: BLE001 - the test inspects it
            self.error = e
        finally:
            self.started.set()


def test_engine_serves_https_and_refuses_plain_http(tmp_path):
    engine = start_switchyard([*BASE_ARGS, *TLS_ARGS], tmp_path)
    try:
        assert engine.url.startswith("https://"), engine.url
        client = https_client(engine.url)
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
            extra_body={"ignore_eos": True},
        )
        assert resp.usage.completion_tokens == 5
        # Plain HTTP on the TLS port gets no HTTP answer.
        with pytest.raises(openai.APIConnectionError):
            plain_client(engine.url.replace("https://", "http://")).models.list()
        # A client that does not trust the certificate is refused.
        untrusting = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="x", max_retries=0, timeout=10)
        with pytest.raises(openai.APIConnectionError):
            untrusting.models.list()
        # And the engine keeps serving after both.
        assert [m.id for m in client.models.list().data] == [MODEL]
    finally:
        _stop(engine.proc)


def test_router_serves_https_streams_in_front_of_a_plain_engine(tmp_path):
    engine = start_switchyard([*BASE_ARGS], tmp_path)
    router = start_switchyard(
        ["router", "--host", "127.0.0.1", "--port", "0", "--service-discovery", "static",
         "--static-backends", engine.url, "--static-models", MODEL, *TLS_ARGS],
        tmp_path,
    )
    try:
        assert router.url.startswith("https://"), router.url
        text = "".join(
            c.choices[0].text
            for c in https_client(router.url).completions.create(
                model=MODEL, prompt="Hello", max_tokens=8, stream=True, extra_body={"ignore_eos": True}
            )
        )
        assert text
    finally:
        _stop(router.proc)
        _stop(engine.proc)


@pytest.mark.parametrize("role", ["engine", "router"])
def test_sigterm_drains_a_running_stream_and_stops_accepting(tmp_path, role):
    engine = start_switchyard([*BASE_ARGS[:-2], *SLOW], tmp_path)
    router = None
    target = engine
    if role == "router":
        router = start_switchyard(
            ["router", "--host", "127.0.0.1", "--port", "0", "--service-discovery", "static",
             "--static-backends", engine.url, "--static-models", MODEL],
            tmp_path,
        )
        target = router
    try:
        stream = Stream(plain_client(target.url), max_tokens=100)  # ~3 s at this scale
        assert stream.started.wait(20) and stream.error is None, stream.error
        target.proc.send_signal(signal.SIGTERM)
        # The listener closes at once: new clients are refused while the stream runs.
        assert wait_until(lambda: refuses_connections(target.url), 2.0)
        assert target.proc.poll() is None, "exited before its stream finished"
        stream.thread.join(30)
        assert stream.error is None, stream.error
        assert stream.finish == "length"
        assert len([p for p in stream.pieces if p]) == 100
        assert target.proc.wait(timeout=10) == 0
    finally:
        if router:
            _stop(router.proc)
        _stop(engine.proc)


def test_shutdown_timeout_bounds_the_drain(tmp_path):
    engine = start_switchyard([*BASE_ARGS[:-2], *SLOW, "--shutdown-timeout", "1"], tmp_path)
    try:
        stream = Stream(plain_client(engine.url), max_tokens=5000)  # minutes at this scale
        assert stream.started.wait(20) and stream.error is None, stream.error
        t0 = time.monotonic()
        engine.proc.send_signal(signal.SIGTERM)
        assert engine.proc.wait(timeout=10) == 0
        waited = time.monotonic() - t0
        assert 0.9 <= waited < 5, waited
        stream.thread.join(10)
        assert stream.finish is None, "the stream cannot have finished"
    finally:
        _stop(engine.proc)
