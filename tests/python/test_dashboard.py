"""The router's live status page (`/dashboard`) in headless Chromium, over a
`switchyard up` stack of two sim engines.

Chromium loads the page, runs its JavaScript (which polls `/dashboard/data`) under a
virtual-time budget, and prints the DOM it built (`--dump-dom`); the test reads the
figures out of it before and during load. A screenshot taken under load is kept in the
test's tmp dir and copied to target/test-artifacts/dashboard.png.

Chromium comes from scripts/setup-chromium.sh (Debian's `chromium`, installed once).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import MODEL, REPO_ROOT, _stop, start_switchyard

ARTIFACT = REPO_ROOT / "target" / "test-artifacts" / "dashboard.png"


@pytest.fixture(scope="module")
def chromium() -> str:
    out = subprocess.run(
        [str(REPO_ROOT / "scripts" / "setup-chromium.sh")], capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        pytest.fail(f"setup-chromium.sh failed ({out.returncode}):\n{out.stderr[-3000:]}", pytrace=False)
    match = re.search(r"^CHROMIUM_BIN=(.+)$", out.stdout, re.M)
    assert match, out.stdout
    return match.group(1).strip()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("dashboard-stack")
    up = start_switchyard(
        ["up", "--backend", "sim", "--host", "127.0.0.1", "--port", "0", "--engines", "2",
         "--engine-arg=--time-scale=0.01"],
        log_dir,
    )
    yield up
    _stop(up.proc)


def run_chromium(binary: str, url: str, profile: Path, *extra: str) -> str:
    args = [
        binary, "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
        "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
        "--window-size=1500,760", "--virtual-time-budget=3000", *extra, url,
    ]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")
    out = subprocess.run(args, capture_output=True, text=True, timeout=90)
    if out.returncode != 0:
        pytest.fail(f"chromium failed ({out.returncode}): {args}\n{out.stderr[-3000:]}", pytrace=False)
    return out.stdout


class Figures(HTMLParser):
    """What the page shows: the text of every element with an id, and per table row
    (keyed by its data-engine / data-model attribute) the text of each data-k cell."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}
        self.engines: dict[str, dict[str, str]] = {}
        self.models: dict[str, dict[str, str]] = {}
        self._open: list[tuple[str, str | None, str | None]] = []  # (tag, id, data-k)
        self._row: dict[str, str] | None = None
        self._text: dict[int, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-engine" in a:
            self._row = self.engines.setdefault(a["data-engine"], {})
        elif tag == "tr" and "data-model" in a:
            self._row = self.models.setdefault(a["data-model"], {})
        if tag in ("meta", "br", "polyline", "i"):
            return
        self._open.append((tag, a.get("id"), a.get("data-k")))
        self._text[len(self._open)] = []

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if not self._open or self._open[-1][0] != tag:
            return
        depth = len(self._open)
        _, ident, key = self._open.pop()
        text = "".join(self._text.pop(depth, [])).strip()
        if ident:
            self.ids[ident] = text
        if key and self._row is not None:
            self._row[key] = text
        if self._open:
            self._text[len(self._open)].append(text)

    def handle_data(self, data):
        if self._open:
            self._text[len(self._open)].append(data)


def figures(dom: str) -> Figures:
    f = Figures()
    f.feed(dom)
    return f


def number(text: str) -> float:
    match = re.match(r"^-?[0-9]+(\.[0-9]+)?", text)
    assert match, f"not a number: {text!r}"
    return float(match.group(0))


def test_dashboard_shows_every_engine_and_moves_under_load(stack, chromium, tmp_path):
    status, body = stack.get("/engines")
    assert status == 200
    urls = [e["url"] for e in json.loads(body)["data"]]
    assert len(urls) == 2
    page = f"{stack.url}/dashboard"

    before = figures(run_chromium(chromium, page, tmp_path / "profile", "--dump-dom"))
    assert before.ids.get("logic") == "routing: roundrobin", before.ids
    assert set(before.engines) == set(urls), before.engines
    for url in urls:
        row = before.engines[url]
        assert row["url"] == url
        assert row["health"] == "healthy"
        assert row["models"] == MODEL
        assert number(row["routed"]) == 0
    assert number(before.ids["t-requests"]) == 0, "the page's script filled in the figures"
    assert before.ids["t-healthy"] == "2 / 2"
    assert number(before.models[MODEL]["requests"]) == 0

    # Load while the page is looked at again.
    client = stack.client()
    stop = threading.Event()
    done = threading.Semaphore(0)
    errors: list[BaseException] = []

    def user() -> None:
        while not stop.is_set():
            try:
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Hello there, dashboard"}],
                    max_tokens=8, extra_body={"ignore_eos": True},
                )
                done.release()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    users = [threading.Thread(target=user, daemon=True) for _ in range(4)]
    for u in users:
        u.start()
    try:
        for _ in range(20):
            assert done.acquire(timeout=20), f"requests stalled: {errors}"
        during = figures(run_chromium(chromium, page, tmp_path / "profile", "--dump-dom"))
        shot = tmp_path / "dashboard.png"
        run_chromium(chromium, page, tmp_path / "profile", f"--screenshot={shot}")
    finally:
        stop.set()
        for u in users:
            u.join(timeout=30)
    assert not errors, errors

    assert set(during.engines) == set(urls)
    assert number(during.ids["t-requests"]) >= 20
    assert number(during.models[MODEL]["requests"]) >= 20
    for url in urls:
        row = during.engines[url]
        assert number(row["routed"]) >= 5, row
        assert number(row["qps"]) > 0, row
        assert row["ttft"].endswith(" ms"), row
        assert row["health"] == "healthy"
    assert number(during.ids["t-qps"]) > number(before.ids["t-qps"])
    assert re.match(r"^[0-9]+(\.[0-9])?$", during.ids["t-rate"]), "a rate from two polls"

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "a PNG"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1500, 760)
    assert len(png) > 20_000, "something was drawn"
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACT)
