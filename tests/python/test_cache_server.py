"""`switchyard cache-server` and `switchyard bench cache` against LMCache 0.5.6 itself.

- LMCache's own lm:// client (`LMCServerConnector`, the connector vLLM uses for
  `remote_url="lm://host:port"`) round-trips bf16 and fp16 KV chunks through our server.
- The wire captures of LMCache's own server (tests/fixtures/lmcache/) are replayed to our
  server, and every byte it sends back must equal what LMCache's server sent.
- `switchyard bench cache` (our client) against LMCache's own server.
- The `--max-bytes` bound (LRU eviction) and bad input (truncated PUT, unknown command,
  PUT larger than the store) over raw sockets.

LMCache needs torch, which the suite's own venv does not have, so LMCache's code runs as
a subprocess of $LMCACHE_PYTHON (scripts/setup-lmcache.sh; scripts/test.sh exports it).
Everything listens on loopback with OS-chosen ports; readiness is waited for, not slept on.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO_ROOT, Engine, _stop, _tail, engine_binary, start_switchyard

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "lmcache"

# LMCache 0.5.6 v1/protocol.py: native-endian int32s, no padding.
REQUEST_FMT = "iiiiiiiii150s"  # command, length, fmt, dtype, location, shape[4], key
REPLY_FMT = "iiiiiiiii"  # code, length, fmt, dtype, shape[4], location
REQUEST_LEN = struct.calcsize(REQUEST_FMT)  # 186
REPLY_LEN = struct.calcsize(REPLY_FMT)  # 36
PUT, GET, EXIST, LIST, HEALTH = 1, 2, 3, 4, 5
SUCCESS, FAIL = 200, 400
FMT_KV_2LTD, DTYPE_FP16 = 1, 2

IO_TIMEOUT_S = 10.0
MiB = 1 << 20


def lmcache_python() -> str:
    py = os.environ.get("LMCACHE_PYTHON")
    if not py:
        pytest.fail(
            "LMCACHE_PYTHON is not set: run the suite through scripts/test.sh, or export the "
            "`LMCACHE_PYTHON=...` line that scripts/setup-lmcache.sh prints",
            pytrace=False,
        )
    if not os.access(py, os.X_OK):
        pytest.fail(f"LMCACHE_PYTHON={py} is not an executable: rerun scripts/setup-lmcache.sh", pytrace=False)
    return py


# ---------------------------------------------------------------- processes


@dataclass
class CacheServer:
    proc: Engine
    lm_host: str
    lm_port: int

    @property
    def lm_url(self) -> str:
        return f"lm://{self.lm_host}:{self.lm_port}"

    @property
    def addr(self) -> tuple[str, int]:
        return (self.lm_host, self.lm_port)

    def metrics(self) -> str:
        status, text = self.proc.get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return text

    def alive(self) -> None:
        code = self.proc.proc.poll()
        assert code is None, f"cache-server exited with {code}\nstderr tail:\n{self.proc.log_tail()}"


LM_RE = re.compile(r"^LM lm://(\S+):(\d+)\s*$")


@pytest.fixture
def cache_server(tmp_path) -> Callable[..., CacheServer]:
    """Starts `switchyard cache-server` processes; each is stopped after the test."""
    started: list[Engine] = []

    def start(max_bytes: int = 256 * MiB, *extra: str) -> CacheServer:
        args = [
            "cache-server", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
            "--max-bytes", str(max_bytes), *extra,
        ]  # fmt: skip
        eng = start_switchyard(args, tmp_path)
        started.append(eng)
        lm = [m for m in map(LM_RE.match, eng.stdout_lines) if m]
        assert lm, f"no `LM lm://HOST:PORT` line before READY; stdout: {eng.stdout_lines}"
        return CacheServer(proc=eng, lm_host=lm[0].group(1), lm_port=int(lm[0].group(2)))

    yield start

    for eng in started:
        _stop(eng.proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], bool], what: str, timeout: float = IO_TIMEOUT_S) -> None:
    """Polls `cond` (bounded) until it holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)
        time.sleep(0.02)


def switchyard(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    binary = engine_binary()
    if not binary.is_file():
        pytest.fail(f"binary {binary} not found: run `cargo build` or set SWITCHYARD_BIN", pytrace=False)
    return subprocess.run(
        [str(binary), *args], cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip


# ---------------------------------------------------------------- wire helpers


def header(cmd: int, key: str, length: int = 0, fmt: int = FMT_KV_2LTD, dtype: int = DTYPE_FP16,
           shape: tuple[int, int, int, int] = (0, 0, 0, 0), location: int = 0) -> bytes:  # fmt: skip
    """A request header as LMCache's ClientMetaMessage.serialize() writes it (key space-padded)."""
    raw = key.encode()
    assert len(raw) <= 150, key
    return struct.pack(REQUEST_FMT, cmd, length, fmt, dtype, location, *shape, raw.ljust(150))


def decode_reply(b: bytes) -> dict:
    v = struct.unpack(REPLY_FMT, b[:REPLY_LEN])
    return dict(code=v[0], length=v[1], fmt=v[2], dtype=v[3], shape=list(v[4:8]), location=v[8])


def connect(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=IO_TIMEOUT_S)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    """Exactly n bytes, or fewer if the peer closes; a timeout is a test failure."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(n - len(buf))
        except socket.timeout:
            pytest.fail(f"no reply: got {len(buf)} of {n} bytes within {IO_TIMEOUT_S}s", pytrace=False)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def closed_by_peer(s: socket.socket) -> tuple[bool, bytes]:
    """Reads until EOF (bounded by the socket timeout): (closed?, bytes received first)."""
    got = bytearray()
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True, bytes(got)
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return True, bytes(got)
    except socket.timeout:
        return False, bytes(got)


def reply_for(s: socket.socket, cmd: int, key: str) -> dict:
    s.sendall(header(cmd, key))
    r = recv_exact(s, REPLY_LEN)
    assert len(r) == REPLY_LEN, f"command {cmd}: connection closed after {len(r)} reply bytes"
    return decode_reply(r)


def get_payload(s: socket.socket, key: str) -> tuple[dict, bytes]:
    s.sendall(header(GET, key))
    r = recv_exact(s, REPLY_LEN)
    assert len(r) == REPLY_LEN, f"GET {key}: connection closed after {len(r)} reply bytes"
    meta = decode_reply(r)
    data = recv_exact(s, meta["length"]) if meta["code"] == SUCCESS else b""
    return meta, data


def health(addr: tuple[str, int]) -> int:
    with connect(addr) as s:
        return reply_for(s, HEALTH, "m@1@0@0@half")["code"]


# ---------------------------------------------------------------- metrics


def metric(page: str, name: str, **labels: str) -> float | None:
    """The value of sample `name` with exactly these labels (None when absent)."""
    for fam in text_string_to_metric_families(page):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def requests(page: str, command: str, outcome: str) -> float:
    v = metric(page, "switchyard_cache_server_requests_total", command=command, outcome=outcome)
    return 0.0 if v is None else v


def gauge(page: str, name: str) -> float:
    v = metric(page, name)
    assert v is not None, f"{name} missing from /metrics:\n{page}"
    return v


# ---------------------------------------------------------------- captures


def parse_capture(path: Path) -> list[tuple[str, bytes]]:
    """[("send"|"recv", bytes), ...] in order, from a capture .txt or the session .log."""
    steps = []
    for line in path.read_text().splitlines():
        m = re.match(r"^(send|recv):\s*([0-9a-f]*)\s*$", line) or re.match(r"^(C>S|S>C) ([0-9a-f]+)\s*$", line)
        if m:
            kind = {"C>S": "send", "S>C": "recv"}.get(m.group(1), m.group(1))
            steps.append((kind, bytes.fromhex(m.group(2))))
    assert steps, f"nothing parsed from {path}"
    return steps


CAPTURES_ON_ONE_CONNECTION = sorted(p.name for p in FIXTURES.glob("[01][0-9]_*.txt") if int(p.name[:2]) <= 10)


def describe(b: bytes) -> str:
    if len(b) >= REPLY_LEN:
        return f"{decode_reply(b)} + {len(b) - REPLY_LEN} payload bytes"
    return f"{len(b)} bytes {b.hex()}"


def test_captures_are_present():
    assert CAPTURES_ON_ONE_CONNECTION == [
        "01_health.txt", "02_exist_miss.txt", "03_get_miss.txt", "04_put_kv.txt", "05_exist_hit.txt",
        "06_get_hit.txt", "07_put_binary_layerkey_tags.txt", "08_get_binary.txt",
        "09_list_then_health.txt", "10_put_overwrite_get.txt",
    ]  # fmt: skip


# ---------------------------------------------------------------- (b) byte-exact replay


def replay(s: socket.socket, name: str, steps: list[tuple[str, bytes]]) -> None:
    for i, (kind, data) in enumerate(steps):
        if kind == "send":
            s.sendall(data)
            continue
        got = recv_exact(s, len(data))
        assert got == data, (
            f"{name} step {i}: reply differs from LMCache 0.5.6's server\n"
            f"  expected {describe(data)}\n  got      {describe(got)}\n"
            f"  expected hex {data.hex()}\n  got hex      {got.hex()}"
        )


def test_replays_lmcache_captures_byte_for_byte(cache_server):
    """Captures 01-10 (LMCache's client bytes) on one connection, in order: every byte the
    server sends back equals what LMCache's server sent, including the absence of replies to
    PUT and LIST (checked by a final HEALTH, whose reply must come next with nothing before it)."""
    srv = cache_server()
    health_send, health_recv = (d for _, d in parse_capture(FIXTURES / "01_health.txt"))
    with connect(srv.addr) as s:
        for name in CAPTURES_ON_ONE_CONNECTION:
            replay(s, name, parse_capture(FIXTURES / name))
        replay(s, "final HEALTH", [("send", health_send), ("recv", health_recv)])
    srv.alive()
    page = srv.metrics()
    # 04, 07, 10 store; 06, 08, 10 hit; 02/03 miss; 05 exist hit; 01, 09, final: health; 09: list.
    assert requests(page, "put", "stored") == 3, page
    assert requests(page, "get", "hit") == 3 and requests(page, "get", "miss") == 1, page
    assert requests(page, "exist", "hit") == 1 and requests(page, "exist", "miss") == 1, page
    assert requests(page, "health", "ok") == 3 and requests(page, "list", "ok") == 1, page
    assert gauge(page, "switchyard_cache_server_entries") == 2  # the Qwen key (overwritten) + layer key
    assert gauge(page, "switchyard_cache_server_bytes") == 64 + 17


def test_replays_lmcache_connector_session(cache_server):
    """20_lm_connector_session.log: what LMCServerConnector sent and LMCache's server answered
    (EXIST miss, GET miss, PUT 1024 B bf16, EXIST hit, GET hit), replayed byte for byte."""
    srv = cache_server()
    with connect(srv.addr) as s:
        replay(s, "20_lm_connector_session", parse_capture(FIXTURES / "20_lm_connector_session.log"))
    srv.alive()


# ---------------------------------------------------------------- (a) LMCache's own client

CONNECTOR_DRIVER = r'''
# LMCache's own lm:// client (LMCServerConnector) against HOST PORT: for each dtype, N chunks:
# EXIST miss, GET miss, PUT, then EXIST hit, GET hit (tensor equal, shape, dtype). Prints JSON.
import asyncio, json, random, sys, threading
import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = LMCacheEngineConfig.from_defaults(chunk_size=16, local_cpu=False, max_local_cpu_size=0.05,
                                        remote_url=f"lm://{host}:{port}", remote_serde="naive")
meta = LMCacheMetadata(model_name="test-model", world_size=1, local_world_size=1, worker_id=0,
                       local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=(2, 2, 16, 2, 4),
                       chunk_size=16)
backend = LocalCPUBackend(cfg, meta)
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()
run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=20)
conn = LMCServerConnector(host, port, loop, backend)

rng = random.Random()
shapes = {torch.bfloat16: torch.Size([2, 2, 16, 8]), torch.float16: torch.Size([2, 4, 8, 16])}
objs = []
for dtype, shape in shapes.items():
    for i in range(n):
        key = CacheEngineKey("test-model", 1, 0, rng.getrandbits(63), dtype)
        obj = backend.allocate(shape, dtype, MemoryFormat.KV_2LTD)
        assert obj is not None, "LocalCPUBackend.allocate failed"
        obj.tensor.copy_(torch.randn(shape).to(dtype))
        assert run(conn.exists(key)) is False, f"EXIST before PUT says present: {key.to_string()}"
        assert run(conn.get(key)) is None, f"GET before PUT returned data: {key.to_string()}"
        run(conn.put(key, obj))  # no reply in the protocol
        objs.append((key, obj, shape, dtype))
total = 0
for key, obj, shape, dtype in objs:
    assert run(conn.exists(key)) is True, f"EXIST after PUT says absent: {key.to_string()}"
    got = run(conn.get(key))
    assert got is not None, f"GET after PUT missed: {key.to_string()}"
    assert tuple(got.get_shape()) == tuple(shape), f"{key.to_string()}: shape {tuple(got.get_shape())} != {tuple(shape)}"
    assert got.get_dtype() == dtype, f"{key.to_string()}: dtype {got.get_dtype()} != {dtype}"
    assert got.get_memory_format() == MemoryFormat.KV_2LTD, f"{key.to_string()}: fmt {got.get_memory_format()}"
    assert torch.equal(got.tensor, obj.tensor), f"{key.to_string()}: payload differs"
    total += obj.get_size()
    got.ref_count_down()
    obj.ref_count_down()
run(conn.close())
print(json.dumps({"chunks": len(objs), "bytes": total}))
'''


def test_lmcache_connector_round_trips_through_cache_server(cache_server, tmp_path):
    srv = cache_server()
    n = 4
    driver = tmp_path / "drive_connector.py"
    driver.write_text(CONNECTOR_DRIVER)
    proc = subprocess.run(
        [lmcache_python(), str(driver), srv.lm_host, str(srv.lm_port), str(n)],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"LMCServerConnector against {srv.lm_url} failed (exit {proc.returncode})\n"
        f"stderr tail:\n{proc.stderr[-4000:]}\nserver stderr tail:\n{srv.proc.log_tail()}"
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    chunks = 2 * n
    assert result["chunks"] == chunks
    srv.alive()
    page = srv.metrics()
    assert requests(page, "put", "stored") == chunks, page
    assert requests(page, "exist", "miss") == chunks and requests(page, "exist", "hit") == chunks, page
    assert requests(page, "get", "miss") == chunks and requests(page, "get", "hit") == chunks, page
    assert gauge(page, "switchyard_cache_server_entries") == chunks
    assert gauge(page, "switchyard_cache_server_bytes") == result["bytes"]  # 4 x 1024 + 4 x 2048


def test_cache_server_http_endpoints(cache_server):
    srv = cache_server(3 * MiB)
    ready = [i for i, line in enumerate(srv.proc.stdout_lines) if line.startswith("READY ")]
    lm = [i for i, line in enumerate(srv.proc.stdout_lines) if LM_RE.match(line)]
    assert lm and ready and lm[0] < ready[0], srv.proc.stdout_lines
    status, _ = srv.proc.get("/health")
    assert status == 200
    page = srv.metrics()
    assert gauge(page, "switchyard_cache_server_max_bytes") == 3 * MiB
    assert gauge(page, "switchyard_cache_server_bytes") == 0
    assert gauge(page, "switchyard_cache_server_entries") == 0


# ---------------------------------------------------------------- (c) our client, LMCache's server


class LmcacheServer:
    """LMCache 0.5.6's own server: `$LMCACHE_PYTHON -m lmcache.v1.server 127.0.0.1 PORT cpu`."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        fd, name = tempfile.mkstemp(prefix="lmcache-server-", suffix=".log", dir=log_dir)
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [lmcache_python(), "-m", "lmcache.v1.server", "127.0.0.1", str(self.port), "cpu"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_listening(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"LMCache server exited with {self.proc.returncode}:\n{_tail(self.log_path)}", pytrace=False)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"LMCache server not listening after {timeout}s:\n{_tail(self.log_path)}", pytrace=False)
                time.sleep(0.05)


def run_bench(url: str, out: Path, clients: int, chunk_bytes: int, chunks: int) -> dict:
    args = ["bench", "cache", "--url", url, "--clients", str(clients), "--chunk-bytes", str(chunk_bytes),
            "--chunks", str(chunks), "--output", str(out)]  # fmt: skip
    proc = switchyard(args)
    assert proc.returncode == 0, (
        f"switchyard {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    assert proc.stdout.strip(), "bench printed no summary"
    result = json.loads(out.read_text())
    for k, t in (("put_gbps", (int, float)), ("get_gbps", (int, float)), ("verified", int), ("errors", int)):
        assert isinstance(result.get(k), t), f"{k} missing or not {t}: {result}"
    return result


def test_bench_cache_against_lmcache_server(tmp_path):
    server = LmcacheServer(tmp_path)
    try:
        server.wait_listening()
        result = run_bench(f"lm://127.0.0.1:{server.port}", tmp_path / "out.json", 4, 65536, 64)
        assert result["verified"] == 64 and result["errors"] == 0, result
        assert result["put_gbps"] > 0 and result["get_gbps"] > 0, result
        assert server.proc.poll() is None, f"LMCache server died:\n{_tail(server.log_path)}"
        assert "Traceback" not in server.log_path.read_text(errors="replace"), _tail(server.log_path, 60)
    finally:
        _stop(server.proc)


def test_bench_cache_against_cache_server(cache_server, tmp_path):
    srv = cache_server()
    result = run_bench(srv.lm_url, tmp_path / "out.json", 4, 65536, 64)
    assert result["verified"] == 64 and result["errors"] == 0, result
    page = srv.metrics()
    assert requests(page, "put", "stored") == 64, page
    assert requests(page, "get", "hit") == 64, page
    assert gauge(page, "switchyard_cache_server_entries") == 64
    assert gauge(page, "switchyard_cache_server_bytes") == 64 * 65536


# ---------------------------------------------------------------- (d) memory bound

CHUNK = 64 * 1024
CHUNK_SHAPE = (2, 2, 256, 32)  # fp16: 2*2*256*32*2 bytes = 64 KiB


def chunk_key(i: int) -> str:
    return f"m@1@0@{i:016x}@half"


def put_chunk(s: socket.socket, key: str, payload: bytes) -> None:
    s.sendall(header(PUT, key, len(payload), FMT_KV_2LTD, DTYPE_FP16, CHUNK_SHAPE) + payload)


def test_max_bytes_bounds_memory_with_lru_eviction(cache_server):
    max_bytes = 1 * MiB
    srv = cache_server(max_bytes)
    n = 10 * MiB // CHUNK  # 160 chunks, 10x the bound
    payloads = [os.urandom(CHUNK) for _ in range(n)]
    with connect(srv.addr) as s:
        for i, p in enumerate(payloads):
            put_chunk(s, chunk_key(i), p)
        # PUT has no reply; the HEALTH reply on the same connection comes after all of them.
        assert reply_for(s, HEALTH, chunk_key(0))["code"] == SUCCESS
    page = srv.metrics()
    held, entries = gauge(page, "switchyard_cache_server_bytes"), gauge(page, "switchyard_cache_server_entries")
    assert gauge(page, "switchyard_cache_server_max_bytes") == max_bytes
    assert 0 < held <= max_bytes, page
    assert held == entries * CHUNK, page
    evictions = gauge(page, "switchyard_cache_server_evictions_total")
    assert evictions > 0 and evictions == n - entries, page
    assert requests(page, "put", "stored") == n, page

    with connect(srv.addr) as s:
        meta, data = get_payload(s, chunk_key(n - 1))
        assert meta == dict(code=SUCCESS, length=CHUNK, fmt=FMT_KV_2LTD, dtype=DTYPE_FP16,
                            shape=list(CHUNK_SHAPE), location=0), meta  # fmt: skip
        assert data == payloads[-1], "most recent chunk came back different"
        miss = header(GET, chunk_key(0))
        s.sendall(miss)
        first = recv_exact(s, REPLY_LEN)
        assert decode_reply(first)["code"] == FAIL, decode_reply(first)
        # A miss is exactly LMCache's 36-byte FAIL reply (03_get_miss), with no payload after it.
        assert first == parse_capture(FIXTURES / "03_get_miss.txt")[1][1]
        assert reply_for(s, EXIST, chunk_key(0))["code"] == FAIL
        assert reply_for(s, EXIST, chunk_key(n - 1))["code"] == SUCCESS
    srv.alive()


# ---------------------------------------------------------------- (e) bad input


def test_truncated_put_stores_nothing_and_blocks_no_one(cache_server):
    srv = cache_server(1 * MiB)
    key = chunk_key(0xBAD)
    stalled = connect(srv.addr)
    try:
        stalled.sendall(header(PUT, key, CHUNK, FMT_KV_2LTD, DTYPE_FP16, CHUNK_SHAPE) + b"x" * 100)
        # While that PUT waits for the rest of its payload, others are served.
        with connect(srv.addr) as other:
            assert reply_for(other, HEALTH, key)["code"] == SUCCESS
            assert reply_for(other, EXIST, key)["code"] == FAIL
    finally:
        stalled.close()  # the client goes away 100 bytes into a 65536-byte payload
    with connect(srv.addr) as s:
        assert reply_for(s, EXIST, key)["code"] == FAIL, "a truncated PUT created the key"
        assert get_payload(s, key)[0]["code"] == FAIL
        # The same key PUT in full afterwards is stored whole.
        payload = os.urandom(CHUNK)
        put_chunk(s, key, payload)
        meta, data = get_payload(s, key)
        assert meta["code"] == SUCCESS and data == payload
    page = srv.metrics()
    assert gauge(page, "switchyard_cache_server_entries") == 1
    assert gauge(page, "switchyard_cache_server_bytes") == CHUNK
    srv.alive()


def test_unknown_command_closes_only_that_connection(cache_server):
    srv = cache_server(1 * MiB)
    with connect(srv.addr) as bystander, connect(srv.addr) as bad:
        assert reply_for(bystander, HEALTH, chunk_key(1))["code"] == SUCCESS
        bad.sendall(header(9, chunk_key(1)))
        closed, got = closed_by_peer(bad)
        assert closed, f"connection with an unknown command not closed within {IO_TIMEOUT_S}s"
        assert got == b"", f"server sent {describe(got)} before closing"
        assert reply_for(bystander, HEALTH, chunk_key(1))["code"] == SUCCESS
    assert health(srv.addr) == SUCCESS
    srv.alive()


def test_put_larger_than_max_bytes_is_rejected(cache_server):
    max_bytes = 1 * MiB
    srv = cache_server(max_bytes)
    small = os.urandom(CHUNK)
    with connect(srv.addr) as s:
        put_chunk(s, chunk_key(1), small)
        assert reply_for(s, EXIST, chunk_key(1))["code"] == SUCCESS
    big_key, big = chunk_key(2), os.urandom(2 * MiB)
    conn_kept = None
    with connect(srv.addr) as s:
        try:
            s.sendall(header(PUT, big_key, len(big), FMT_KV_2LTD, DTYPE_FP16, (2, 2, 8192, 32)) + big)
            # Either the server reads past the payload and carries on with this connection,
            # or it closes it; both are fine, as long as nothing is stored and it keeps serving.
            s.sendall(header(HEALTH, big_key))
            r = recv_exact(s, REPLY_LEN)
            conn_kept = len(r) == REPLY_LEN
            if conn_kept:
                assert decode_reply(r)["code"] == SUCCESS, decode_reply(r)
        except (BrokenPipeError, ConnectionResetError):
            conn_kept = False
    wait_until(lambda: requests(srv.metrics(), "put", "rejected") >= 1, "put outcome=rejected in /metrics")
    assert health(srv.addr) == SUCCESS
    with connect(srv.addr) as s:
        assert reply_for(s, EXIST, big_key)["code"] == FAIL, "a PUT larger than --max-bytes was stored"
        meta, data = get_payload(s, chunk_key(1))
        assert meta["code"] == SUCCESS and data == small, "the small entry was lost to the oversized PUT"
    page = srv.metrics()
    assert requests(page, "put", "rejected") == 1, page
    assert gauge(page, "switchyard_cache_server_bytes") == CHUNK, page
    assert gauge(page, "switchyard_cache_server_entries") == 1, page
    srv.alive()
