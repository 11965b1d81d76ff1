"""KV offloading on the real CPU engine, configured as vLLM + LMCache users configure it
(`--kv-transfer-config` + `LMCACHE_*`): chunks of a long prompt served from the host
tier, the disk tier (across a restart), a remote `switchyard cache-server` and a real
Redis give the same greedy text as computing them, the metrics prove where they came from, and a cache
server that is down or never answers costs a recompute, never a failed request or a hang.
Timings are not asserted (BENCHMARKS.md has them); tokens computed are.
"""

from __future__ import annotations

import re
import struct
import socket
import threading
import urllib.request
import json

import pytest

from conftest import _stop, start_switchyard

MODEL = "SmolLM2-135M-Instruct"
TRANSFER = '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'
# ~810 tokens: three full 256-token chunks, and a tail to compute.
PROMPT = "The history of the river valley is long. " * 90
OTHER = "A lighthouse keeper writes letters to the sea. " * 80


def engine_args(*extra: str) -> list[str]:
    return ["engine", "--host", "127.0.0.1", "--port", "0", "--max-model-len", "2048",
            "--kv-cache-memory-bytes", str(256 << 20), "--kv-transfer-config", TRANSFER, *extra]


def complete(e, prompt: str) -> tuple[str, dict]:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}).encode()
    req = urllib.request.Request(f"{e.url}/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        d = json.load(r)
    return d["choices"][0]["text"], d["usage"]


def metrics(e) -> str:
    return e.get("/metrics")[1]


def value(page: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in page.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def computed_prompt_tokens(page: str) -> float:
    """Prompt tokens the engine computed itself: prompt tokens minus its prefix hits
    (imported chunks are prefix hits)."""
    return value(page, "vllm:prompt_tokens_total") - value(page, "vllm:prefix_cache_hits_total")


@pytest.fixture
def cache_server(tmp_path):
    s = start_switchyard(["cache-server", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
                          "--max-bytes", str(256 << 20)], tmp_path)
    lm = next(re.search(r"lm://\S+", l).group(0) for l in s.stdout_lines if l.startswith("LM "))
    yield s, lm
    _stop(s.proc)


def test_a_prompt_computed_on_one_engine_is_a_remote_hit_on_another(tmp_path, monkeypatch, cache_server):
    server, lm = cache_server
    monkeypatch.setenv("LMCACHE_REMOTE_URL", lm)
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "False")
    a = start_switchyard(engine_args(), tmp_path)
    b = start_switchyard(engine_args(), tmp_path)
    try:
        want, usage = complete(a, PROMPT)
        assert usage["prompt_tokens"] > 3 * 256, usage
        # A saved its three full chunks to the server (off the request path: wait for them).
        for _ in range(200):
            if value(metrics(server), "switchyard_cache_server_entries") >= 3:
                break
            threading.Event().wait(0.05)
        assert value(metrics(server), "switchyard_cache_server_entries") == 3
        before = metrics(b)
        got, _ = complete(b, PROMPT)
        after = metrics(b)
        assert got == want, (got, want)
        assert value(after, "switchyard:kv_offload_hit_chunks_total", tier="remote") == 3
        assert value(after, "vllm:external_prefix_cache_hits_total") == 3 * 256
        computed = computed_prompt_tokens(after) - computed_prompt_tokens(before)
        assert computed == usage["prompt_tokens"] - 3 * 256, (computed, usage)
        # Computed from scratch on B too (no tier): the same text.
        plain = start_switchyard(["engine", "--host", "127.0.0.1", "--port", "0", "--max-model-len", "2048",
                                  "--kv-cache-memory-bytes", str(256 << 20)], tmp_path)
        try:
            assert complete(plain, PROMPT)[0] == want
        finally:
            _stop(plain.proc)
    finally:
        _stop(a.proc)
        _stop(b.proc)


def test_host_tier_serves_what_the_paged_cache_dropped(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "True")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.5")
    e = start_switchyard(engine_args(), tmp_path)
    try:
        want, usage = complete(e, PROMPT)
        # Drop the engine's own prefix cache: only the host tier still has the chunks.
        req = urllib.request.Request(f"{e.url}/reset_prefix_cache", b"", method="POST")
        urllib.request.urlopen(req, timeout=30).read()
        before = metrics(e)
        got, _ = complete(e, PROMPT)
        after = metrics(e)
        assert got == want
        assert value(after, "switchyard:kv_offload_hit_chunks_total", tier="cpu") == 3
        assert computed_prompt_tokens(after) - computed_prompt_tokens(before) == usage["prompt_tokens"] - 768
        assert value(after, "switchyard:kv_offload_tier_bytes", tier="cpu") == 3 * 256 * 2 * 30 * 192 * 2
    finally:
        _stop(e.proc)


def test_disk_tier_survives_an_engine_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "False")
    monkeypatch.setenv("LMCACHE_LOCAL_DISK", f"file://{tmp_path}/kv")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_DISK_SIZE", "1")
    e = start_switchyard(engine_args(), tmp_path)
    try:
        want, usage = complete(e, PROMPT)
        for _ in range(200):
            if value(metrics(e), "switchyard:kv_offload_saved_chunks_total", tier="disk") >= 3:
                break
            threading.Event().wait(0.05)
        assert value(metrics(e), "switchyard:kv_offload_saved_chunks_total", tier="disk") == 3
    finally:
        _stop(e.proc)
    assert len(list((tmp_path / "kv").glob("*.kvchunk"))) == 3
    e = start_switchyard(engine_args(), tmp_path)
    try:
        got, _ = complete(e, PROMPT)
        page = metrics(e)
        assert got == want
        assert value(page, "switchyard:kv_offload_hit_chunks_total", tier="disk") == 3
        assert computed_prompt_tokens(page) == usage["prompt_tokens"] - 768
    finally:
        _stop(e.proc)


def test_a_server_down_or_silent_costs_a_recompute_not_a_request(tmp_path, monkeypatch, cache_server):
    # A server that accepts connections and never answers: loads time out.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("LMCACHE_REMOTE_URL", f"lm://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "False")
    monkeypatch.setenv("LMCACHE_BLOCKING_TIMEOUT_SECS", "1")
    e = start_switchyard(engine_args(), tmp_path)
    try:
        text, usage = complete(e, PROMPT)
        assert usage["completion_tokens"] == 12 and text
        assert value(metrics(e), "switchyard:kv_offload_failures_total", tier="remote") >= 1
        assert value(metrics(e), "vllm:external_prefix_cache_hits_total") == 0
    finally:
        _stop(e.proc)
        stop.set()
        silent.close()
        for c in held:
            c.close()

    # A real server, killed under the engine and started again on the same port.
    server, lm = cache_server
    monkeypatch.setenv("LMCACHE_REMOTE_URL", lm)
    e = start_switchyard(engine_args(), tmp_path)
    try:
        want, _ = complete(e, PROMPT)
        _stop(server.proc)
        got, _ = complete(e, OTHER)  # the server is gone: saves fail, the request does not
        assert got
        port = lm.rsplit(":", 1)[1]
        again = start_switchyard(["cache-server", "--host", "127.0.0.1", "--port", port, "--http-port", "0"], tmp_path)
        try:
            # After the reconnect backoff (at most 5 s) saves reach the new server.
            for i in range(120):
                complete(e, f"Note {i}. " + OTHER)
                if value(metrics(again), "switchyard_cache_server_entries") >= 1:
                    break
            assert value(metrics(again), "switchyard_cache_server_entries") >= 1
            assert value(metrics(e), "switchyard:kv_offload_failures_total", tier="remote") >= 1
        finally:
            _stop(again.proc)
    finally:
        _stop(e.proc)


def test_up_with_a_kv_cache_server_shares_prompts_across_engines(tmp_path):
    """`switchyard up --kv-cache-server`: a prompt computed on one engine (round robin
    sends the next request to the other) is loaded there from the cache server."""
    stack = start_switchyard(["up", "--host", "127.0.0.1", "--port", "0", "--engines", "2", "--kv-cache-server",
                              "--engine-arg=--kv-cache-memory-bytes=268435456",
                              "--engine-arg=--max-model-len=2048"], tmp_path)
    try:
        engines = re.findall(r"engine (http://\S+)", stack.log_path.read_text())
        assert len(engines) == 2, stack.log_path.read_text()[-2000:]
        texts = [complete(stack, PROMPT)[0]]
        for _ in range(100):  # the first engine's chunks reach the server off the request path
            saved = sum(value(urllib.request.urlopen(f"{u}/metrics", timeout=10).read().decode(),
                              "switchyard:kv_offload_saved_chunks_total", tier="remote") for u in engines)
            if saved >= 3:
                break
            threading.Event().wait(0.05)
        texts.append(complete(stack, PROMPT)[0])
        assert texts[0] == texts[1]
        remote_hits = sum(value(urllib.request.urlopen(f"{u}/metrics", timeout=10).read().decode(),
                                "switchyard:kv_offload_hit_chunks_total", tier="remote") for u in engines)
        assert remote_hits == 3
    finally:
        _stop(stack.proc)


@pytest.fixture
def redis_server(redis_farm):
    """A real redis-server (Debian's; scripts/setup-redis.sh) on a free loopback port."""
    return redis_farm()


def test_redis_remote_tier_keeps_chunks_as_lmcache_does(tmp_path, monkeypatch, redis_server):
    """redis:// as the remote tier: chunks land as `<key>kv_bytes` + `<key>metadata`
    (LMCache's Redis connector's layout, 28-byte metadata), and another engine loads them
    for the same greedy text."""
    monkeypatch.setenv("LMCACHE_REMOTE_URL", f"redis://127.0.0.1:{redis_server}")
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "False")
    a = start_switchyard(engine_args(), tmp_path)
    b = start_switchyard(engine_args(), tmp_path)
    try:
        want, _ = complete(a, PROMPT)
        for _ in range(200):
            if value(metrics(a), "switchyard:kv_offload_saved_chunks_total", tier="remote") >= 3:
                break
            threading.Event().wait(0.05)
        keys = b" ".join(resp(redis_server, "KEYS", "*"))
        meta_keys = re.findall(rb"(SmolLM2-135M-Instruct@1@0@[0-9a-f]+@half)metadata", keys)
        assert len(meta_keys) == 3, keys
        for k in meta_keys:
            assert resp(redis_server, "STRLEN", k + b"metadata") == 28
            assert resp(redis_server, "STRLEN", k + b"kv_bytes") == 256 * 2 * 30 * 192 * 2
        got, _ = complete(b, PROMPT)
        assert got == want
        assert value(metrics(b), "switchyard:kv_offload_hit_chunks_total", tier="remote") == 3
        # A chunk whose payload is gone is a miss, not an error: the prompt is computed
        # again and its chunks saved again, whole.
        first = meta_keys[0]
        resp(redis_server, "DEL", first + b"kv_bytes")
        c = start_switchyard(engine_args(), tmp_path)
        try:
            assert complete(c, PROMPT)[0] == want
            page = metrics(c)
            assert value(page, "switchyard:kv_offload_failures_total", tier="remote") == 0
            assert value(page, "vllm:external_prefix_cache_hits_total") < 3 * 256
            for _ in range(200):
                if value(metrics(c), "switchyard:kv_offload_saved_chunks_total", tier="remote") >= 3:
                    break
                threading.Event().wait(0.05)
            assert resp(redis_server, "STRLEN", first + b"kv_bytes") == 256 * 2 * 30 * 192 * 2
        finally:
            _stop(c.proc)
    finally:
        _stop(a.proc)
        _stop(b.proc)


class RedisError(Exception):
    pass


def resp(port: int, *args, timeout: float = 10, before: tuple = ()):
    """One RESP command on a fresh connection (after the commands in `before`, e.g.
    AUTH), its reply parsed (errors raise RedisError)."""
    out = b""
    for cmd in (*before, args):
        raw = [a if isinstance(a, bytes) else str(a).encode() for a in cmd]
        out += b"*%d\r\n" % len(raw) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in raw)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(out)
        f = c.makefile("rb")

        def read():
            line = f.readline()
            if not line.endswith(b"\r\n"):
                raise ConnectionError(f"redis :{port} closed the connection")
            kind, rest = line[:1], line[1:-2]
            if kind == b"+":
                return rest
            if kind == b"-":
                raise RedisError(rest.decode())
            if kind == b":":
                return int(rest)
            if kind == b"$":
                n = int(rest)
                return None if n < 0 else f.read(n + 2)[:-2]
            if kind == b"*":
                n = int(rest)
                return None if n < 0 else [read() for _ in range(n)]
            raise RedisError(f"unexpected reply {line!r}")

        for _ in before:
            read()
        return read()


def free_port(below: int = 65536) -> int:
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port < below:
            return port


def wait_for(what: str, check, timeout: float = 30):
    import time
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except (OSError, RedisError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def redis_farm(tmp_path):
    """Starts real redis-servers (and sentinels) on free loopback ports; every one it
    started is stopped at the end, whatever happened."""
    import os
    import subprocess

    binary = os.environ.get("REDIS_SERVER_BIN") or "redis-server"
    procs: list[subprocess.Popen] = []

    def start(*extra: str, sentinel_conf: str | None = None) -> int:
        port = free_port()
        d = tmp_path / f"redis-{port}"
        d.mkdir()
        if sentinel_conf is not None:
            conf = d / "sentinel.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {d}\n{sentinel_conf}")
            argv = [binary, str(conf), "--sentinel"]
        else:
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", str(d), *extra]
        log = open(d / "log", "wb")
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        log.close()
        proc = procs[-1]
        def up():
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited: {(d / 'log').read_text()}")
            try:
                return resp(port, "PING", timeout=1) == b"PONG"
            except RedisError as e:
                return str(e).startswith("NOAUTH")  # up, with a password

        wait_for(f"redis on :{port}", up)
        return port

    yield start
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def chunk_keys(ports: list[int]) -> dict[int, list[bytes]]:
    return {p: sorted(resp(p, "KEYS", "*")) for p in ports}


def wait_saved(e, n: int):
    for _ in range(400):
        if value(metrics(e), "switchyard:kv_offload_saved_chunks_total", tier="remote") >= n:
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"{n} chunks not saved: {metrics(e)}")


def test_redis_cluster_remote_tier_routes_chunks_by_slot(tmp_path, monkeypatch, redis_farm):
    """redis-cluster:// (one seed given): a 3-master Redis Cluster; engine A's chunks land
    on several masters by CRC16 slot, engine B loads them for the same greedy text, also
    after one slot moved under B's map (MOVED) and with another in mid-migration (ASK)."""
    nodes = []
    for _ in range(3):
        bus = free_port()
        port = redis_farm("--cluster-enabled", "yes", "--cluster-port", str(bus),
                          "--cluster-config-file", str(tmp_path / f"nodes-{bus}.conf"))
        nodes.append((port, bus))
    ports = [p for p, _ in nodes]
    ranges = [(0, 5460), (5461, 10922), (10923, 16383)]
    for p, (first, last) in zip(ports, ranges):
        resp(p, "CLUSTER", "ADDSLOTSRANGE", first, last)
    for p, bus in nodes[1:]:
        resp(ports[0], "CLUSTER", "MEET", "127.0.0.1", p, bus)
    for p in ports:
        wait_for(f"cluster ok on :{p}", lambda: b"cluster_state:ok" in resp(p, "CLUSTER", "INFO")
                 and b"cluster_known_nodes:3" in resp(p, "CLUSTER", "INFO"))
    ids = [resp(p, "CLUSTER", "MYID") for p in ports]

    def owner(slot: int) -> int:
        return next(i for i, (first, last) in enumerate(ranges) if first <= slot <= last)

    monkeypatch.setenv("LMCACHE_REMOTE_URL", f"redis-cluster://127.0.0.1:{ports[0]}")
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "False")
    a = start_switchyard(engine_args(), tmp_path)
    b = start_switchyard(engine_args(), tmp_path)
    try:
        want, _ = complete(a, PROMPT)
        wait_saved(a, 3)
        held = chunk_keys(ports)
        assert sum(len(k) for k in held.values()) == 6, held
        assert sum(1 for k in held.values() if k) >= 2, f"all chunks on one master: {held}"
        for p, keys in held.items():
            for k in keys:
                assert owner(resp(p, "CLUSTER", "KEYSLOT", k)) == ports.index(p)
        meta = sorted(k[:-len(b"metadata")] for ks in held.values() for k in ks if k.endswith(b"metadata"))
        assert len(meta) == 3
        # B loads the slot map (a miss, its own chunks saved), then slots move under it.
        other = complete(b, OTHER)[1]["prompt_tokens"] // 256
        wait_saved(b, other)

        def migrate(key: bytes, finish: bool):
            slot = resp(ports[0], "CLUSTER", "KEYSLOT", key)
            src = owner(slot)
            dst = (src + 1) % 3
            resp(ports[dst], "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
            resp(ports[src], "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
            keys = resp(ports[src], "CLUSTER", "GETKEYSINSLOT", slot, 100)
            assert key in keys
            resp(ports[src], "MIGRATE", "127.0.0.1", ports[dst], "", 0, 5000, "KEYS", *keys)
            if finish:
                for i in (dst, src, 3 - src - dst):
                    resp(ports[i], "CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
            return slot

        moved = migrate(meta[0] + b"kv_bytes", finish=True)
        asked = migrate(meta[1] + b"metadata", finish=False)
        assert moved != asked
        with pytest.raises(RedisError, match="^ASK "):
            resp(ports[owner(asked)], "GET", meta[1] + b"metadata")
        got, _ = complete(b, PROMPT)
        page = metrics(b)
        assert got == want, (got, want)
        assert value(page, "switchyard:kv_offload_hit_chunks_total", tier="remote") == 3
        assert value(page, "switchyard:kv_offload_failures_total", tier="remote") == 0
    finally:
        _stop(a.proc)
        _stop(b.proc)


def test_redis_sentinel_remote_tier_follows_a_failover(tmp_path, monkeypatch, redis_farm):
    """redis-sentinel:// with LMCache's REDIS_SERVICE_NAME: the engines find the master
    through a real Sentinel; after a failover (the replica promoted, the old master made a
    replica: -READONLY) engine A asks the sentinel again and saves to the new master."""
    master = redis_farm()
    replica = redis_farm("--replicaof", "127.0.0.1", str(master))
    wait_for("replica in sync", lambda: b"master_link_status:up" in resp(replica, "INFO", "replication"))
    sentinel = redis_farm(sentinel_conf=f"sentinel monitor mymaster 127.0.0.1 {master} 1\n"
                                        "sentinel down-after-milliseconds mymaster 2000\n"
                                        "sentinel failover-timeout mymaster 10000\n")
    monkeypatch.setenv("REDIS_SERVICE_NAME", "mymaster")
    monkeypatch.setenv("LMCACHE_REMOTE_URL", f"redis-sentinel://127.0.0.1:{sentinel}")
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "False")
    a = start_switchyard(engine_args(), tmp_path)
    b = start_switchyard(engine_args(), tmp_path)
    try:
        want, _ = complete(a, PROMPT)
        wait_saved(a, 3)
        assert len(resp(master, "KEYS", "*")) == 6
        got, _ = complete(b, PROMPT)
        assert got == want
        assert value(metrics(b), "switchyard:kv_offload_hit_chunks_total", tier="remote") == 3
        # Fail over: the replica becomes the master, the old master its replica.
        wait_for("sentinel sees the replica", lambda: resp(sentinel, "SENTINEL", "REPLICAS", "mymaster"))
        wait_for("failover started", lambda: resp(sentinel, "SENTINEL", "FAILOVER", "mymaster") == b"OK")
        wait_for("replica promoted", lambda: resp(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
                 == [b"127.0.0.1", str(replica).encode()])
        wait_for("old master demoted", lambda: resp(master, "ROLE")[0] == b"slave")
        with pytest.raises(RedisError, match="^READONLY"):
            resp(master, "SET", "x", "y")
        # A still talks to the old master: its next saves meet READONLY, then go to the new one.
        other = complete(a, OTHER)[1]["prompt_tokens"] // 256
        wait_saved(a, 3 + other)
        assert value(metrics(a), "switchyard:kv_offload_failures_total", tier="remote") == 0
        assert len(resp(replica, "KEYS", "*")) == 2 * (3 + other)
        assert f"master found master=127.0.0.1:{replica}" in a.log_path.read_text(errors="replace")
    finally:
        _stop(a.proc)
        _stop(b.proc)


def bench_cache(url: str, tmp_path, chunks: int = 16) -> dict:
    """`switchyard bench cache` (PUT then GET and verify `chunks` chunks) against `url`."""
    import os
    import subprocess
    from conftest import engine_binary

    out = tmp_path / f"bench-{len(list(tmp_path.iterdir()))}.json"
    proc = subprocess.run([str(engine_binary()), "bench", "cache", "--url", url, "--clients", "2",
                           "--chunk-bytes", "65536", "--chunks", str(chunks), "--timeout", "2",
                           "--output", str(out)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert out.exists(), f"bench cache {url}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(out.read_text())


def test_redis_urls_log_in_as_lmcache_writes_them(tmp_path, monkeypatch, redis_farm):
    """`user:password@` (or `:password@`) before the hosts, as LMCache's Redis adapters
    take it, and redis://'s `/DB`: a password-protected server, a password-protected
    master behind Sentinel (the sentinels asked without one) and a one-node cluster; a
    wrong password fails every request, fast."""
    secret = "s3cr3t:with-colon"
    plain = redis_farm("--requirepass", secret)
    auth = (("AUTH", secret),)
    r = bench_cache(f"redis://:{secret}@127.0.0.1:{plain}/3", tmp_path)
    assert (r["verified"], r["errors"]) == (16, 0), r
    assert resp(plain, "DBSIZE", before=auth + (("SELECT", 3),)) == 32
    assert resp(plain, "DBSIZE", before=auth) == 0
    r = bench_cache(f"redis://default:{secret}@127.0.0.1:{plain}", tmp_path)
    assert (r["verified"], r["errors"]) == (16, 0), r

    master = redis_farm("--requirepass", secret)
    sentinel = redis_farm(sentinel_conf=f"sentinel monitor m 127.0.0.1 {master} 1\n"
                                        f"sentinel auth-pass m {secret}\n")
    monkeypatch.setenv("REDIS_SERVICE_NAME", "ignored-the-url-names-it")
    r = bench_cache(f"redis-sentinel://:{secret}@127.0.0.1:{sentinel}/m", tmp_path)
    assert (r["verified"], r["errors"]) == (16, 0), r
    assert resp(master, "DBSIZE", before=auth) == 32

    bus = free_port()
    node = redis_farm("--requirepass", secret, "--cluster-enabled", "yes", "--cluster-port", str(bus),
                      "--cluster-config-file", str(tmp_path / f"nodes-{bus}.conf"))
    resp(node, "CLUSTER", "ADDSLOTSRANGE", 0, 16383, before=auth)
    wait_for("cluster ok", lambda: b"cluster_state:ok" in resp(node, "CLUSTER", "INFO", before=auth))
    r = bench_cache(f"redis-cluster://:{secret}@127.0.0.1:{node}", tmp_path)
    assert (r["verified"], r["errors"]) == (16, 0), r

    import time
    started = time.monotonic()
    r = bench_cache(f"redis://:wrong@127.0.0.1:{plain}", tmp_path)
    assert r["verified"] == 0 and r["errors"] > 0, r
    assert time.monotonic() - started < 10


class DyingServer:
    """An `lm://` server that stores PUTs and answers EXIST and HEALTH like LMCache's, but
    on a GET sends the reply header and half the payload, then drops the connection: a
    server killed in the middle of a load."""

    HEADER = struct.Struct("=9i150s")
    REPLY = struct.Struct("=9i")

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.objects: dict[bytes, tuple[tuple[int, ...], bytes]] = {}
        self.cut_gets = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"lm://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = conn.recv(n - len(buf))
            if not got:
                raise ConnectionError("closed")
            buf += got
        return buf

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                cmd, length, fmt, dtype, loc, s0, s1, s2, s3, key = self.HEADER.unpack(
                    self._read(conn, self.HEADER.size))
                if cmd == 1:  # PUT
                    payload = self._read(conn, length)
                    with self.lock:
                        self.objects[key] = ((length, fmt, dtype, s0, s1, s2, s3), payload)
                elif cmd in (3, 5):  # EXIST, HEALTH
                    code = 200 if cmd == 5 or key in self.objects else 400
                    conn.sendall(self.REPLY.pack(code, 0, 1, 2, 0, 0, 0, 0, 0))
                elif cmd == 2:  # GET: half the object, then gone
                    with self.lock:
                        found = self.objects.get(key)
                    if found is None:
                        conn.sendall(self.REPLY.pack(400, 0, 1, 2, 0, 0, 0, 0, 0))
                        continue
                    meta, payload = found
                    conn.sendall(self.REPLY.pack(200, *meta, 0) + payload[: len(payload) // 2])
                    with self.lock:
                        self.cut_gets += 1
                    conn.shutdown(socket.SHUT_RDWR)
                    return
        except (ConnectionError, OSError, struct.error):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_a_server_dying_in_the_middle_of_a_load_costs_a_recompute(tmp_path, monkeypatch):
    server = DyingServer()
    monkeypatch.setenv("LMCACHE_REMOTE_URL", server.url)
    monkeypatch.setenv("LMCACHE_LOCAL_CPU", "False")
    monkeypatch.setenv("LMCACHE_BLOCKING_TIMEOUT_SECS", "5")
    a = start_switchyard(engine_args(), tmp_path)
    b = start_switchyard(engine_args(), tmp_path)
    try:
        want, usage = complete(a, PROMPT)
        for _ in range(200):  # A's saves are off the request path
            if len(server.objects) >= 3:
                break
            threading.Event().wait(0.05)
        assert len(server.objects) == 3
        before = metrics(b)
        got, _ = complete(b, PROMPT)
        after = metrics(b)
        # B asked for the first chunk, got half of it, and computed the whole prompt itself.
        assert server.cut_gets >= 1
        assert got == want, (got, want)
        assert value(after, "switchyard:kv_offload_failures_total", tier="remote") > value(
            before, "switchyard:kv_offload_failures_total", tier="remote")
        assert value(after, "vllm:external_prefix_cache_hits_total") == 0
        assert computed_prompt_tokens(after) - computed_prompt_tokens(before) == usage["prompt_tokens"]
        # And B keeps serving.
        assert complete(b, OTHER)[0]
    finally:
        _stop(a.proc)
        _stop(b.proc)
        server.close()
