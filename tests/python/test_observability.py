"""The Grafana dashboards and Prometheus rules under deploy/helm/switchyard/files/, against a
real Prometheus scraping a live stack.

Two sim engines (with KV events) behind two routers (`prefixaware` and `kvaware`, so both
policies' routing series exist), Prometheus from $PROMETHEUS_BIN (scripts/setup-prometheus.sh)
scraping all four every second with our rule files loaded, and `switchyard bench
multi-round` against each router. Then: promtool accepts the rule files; every recording
rule produces series; every dashboard query and every prometheus-adapter query returns
data; killing an engine makes the engine-down alerts pending.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from conftest import MODEL, REPO_ROOT, _stop, _tail, engine_binary, start_engine, start_switchyard

FILES = REPO_ROOT / "deploy" / "helm" / "switchyard" / "files"
DASHBOARDS = sorted((FILES / "dashboards").glob("*.json"))
RULE_FILES = sorted((FILES / "prometheus").glob("*.yaml"))
ADAPTER_RULES = FILES / "prometheus-adapter-rules.yaml"
NAMESPACE = "switchyard-test"
KV_EVENTS = '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:0"}'
LOAD_SECONDS = 10
DEADLINE_S = 30.0

# What Grafana would put in for its variables when the test queries a panel.
GRAFANA_VARS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "model": MODEL,
}
VAR_RE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(__\w+|[A-Za-z_]\w*))")


def _tool(env: str, name: str) -> str:
    path = os.environ.get(env) or shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"{name} not found: run scripts/setup-prometheus.sh and export {env}", pytrace=False)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_port(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def _unix(rfc3339: str) -> float:
    """Prometheus's RFC 3339 timestamps (nanoseconds, `Z`) as unix seconds."""
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.fromisoformat(trimmed).timestamp()


def substitute(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by concrete values."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in GRAFANA_VARS:
            raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARS[name]

    return VAR_RE.sub(repl, expr)


def rule_names(kind: str) -> list[str]:
    """`record:` or `alert:` names declared in our rule files (they are one per line)."""
    names = []
    for f in RULE_FILES:
        names += re.findall(rf"^\s*-\s*{kind}:\s*(\S+)\s*$", f.read_text(), flags=re.M)
    return names


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query of every panel."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                out.append((path.name, panel["title"], t["expr"]))
    return out


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path):
        self.url, self.proc, self.log_path = url, proc, log_path

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:  # 400/422: a bad query; the body says why
            body = json.load(e)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def alerts(self, name: str) -> list[dict]:
        return [a for a in self.api("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name]

    def evaluated_since(self, t: float) -> bool:
        """Whether every rule group has been evaluated after unix time `t`."""
        groups = self.api("/api/v1/rules")["groups"]
        return bool(groups) and all(_unix(g["lastEvaluation"]) > t for g in groups)

    def wait_for(self, what: str, check, timeout: float = DEADLINE_S):
        """Polls `check()` until it returns something truthy; fails with `what` after `timeout`."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}\n{_tail(self.log_path)}", pytrace=False)
            last = check()
            if last:
                return last
            time.sleep(0.25)
        pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})", pytrace=False)


def start_prometheus(targets: dict[str, list[tuple[str, str]]], workdir: Path) -> Prometheus:
    """Prometheus on a free loopback port, scraping `targets` ({job: [(host:port, pod)]}) every second."""
    binary = _tool("PROMETHEUS_BIN", "prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(f) for f in RULE_FILES],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [
                    {"targets": [addr], "labels": {"namespace": NAMESPACE, "pod": pod}} for addr, pod in addrs
                ],
            }
            for job, addrs in targets.items()
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    check = subprocess.run(
        [_tool("PROMTOOL_BIN", "promtool"), "check", "config", str(config_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    port = _free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log_path)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    prom.wait_for("prometheus /-/ready", ready)
    return prom


def run_bench(router_url: str, seed: int, log_dir: Path) -> subprocess.Popen:
    report = log_dir / f"bench-{seed}.json"
    args = [
        str(engine_binary()), "bench", "multi-round", "--base-url", router_url, "--model", MODEL,
        "--num-users", "6", "--num-rounds", "4", "--qps", "8", "--shared-system-prompt", "200",
        "--user-history-prompt", "300", "--answer-len", "24", "--time", str(LOAD_SECONDS),
        "--drain-timeout", "5", "--request-timeout", "10", "--seed", str(seed), "--no-progress",
        "--output", str(report),
    ]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.report = report  # type: ignore[attr-defined]
    return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Engines, routers and Prometheus, after LOAD_SECONDS of load; stopped at module end."""
    log_dir = tmp_path_factory.mktemp("observability")
    procs: list[subprocess.Popen] = []
    prom = None
    try:
        engines = []
        for _ in range(2):
            eng = start_engine(["--kv-events-config", KV_EVENTS], log_dir)
            procs.append(eng.proc)
            engines.append(eng)
        backends = ",".join(e.url for e in engines)
        routers = {}
        for logic in ("prefixaware", "kvaware"):
            r = start_switchyard(
                [
                    "router", "--host", "127.0.0.1", "--port", "0", "--static-backends", backends,
                    "--routing-logic", logic, "--engine-stats-interval", "1", "--health-check-interval", "1",
                    "--health-failure-threshold", "1",
                ],
                log_dir,
            )
            procs.append(r.proc)
            routers[logic] = r

        prom = start_prometheus(
            {
                "switchyard-router": [(_host_port(r.url), f"router-{logic}") for logic, r in routers.items()],
                "switchyard-engine": [(_host_port(e.url), f"engine-{i}") for i, e in enumerate(engines)],
            },
            log_dir,
        )
        prom.wait_for("all 4 targets up", lambda: len(prom.query("up == 1")) == 4)

        # Router-side errors, so vllm:request_errors_total has a series: a request pinned
        # (?id=) to an engine that does not exist is refused with 503 (no_healthy_engine).
        # One before the load and one after: the counter appears at 1, and only the second
        # error is an increase that rate() can see.
        def router_error() -> None:
            req = urllib.request.Request(
                f"{routers['prefixaware'].url}/v1/chat/completions?id=no-such-engine",
                data=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode(),
                headers={"content-type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            assert err.value.code == 503

        router_error()
        benches = [run_bench(r.url, seed, log_dir) for seed, r in enumerate(routers.values())]
        procs.extend(benches)
        for b in benches:
            out, _ = b.communicate(timeout=LOAD_SECONDS + 30)
            assert b.returncode == 0, out
            report = json.loads(b.report.read_text())
            assert report["requests"]["completed"] >= 20 and report["requests"]["failed"] == 0, report["requests"]
        router_error()

        # Everything sent has been scraped once Prometheus counts as many incoming requests
        # as were sent (the bench's requests and the two errors); then every rule group
        # evaluates once more over it.
        def counted() -> int:
            return int(
                sum(float(s["value"][1]) for s in prom.query("vllm:num_incoming_requests_total"))
            )

        want = sum(json.loads(b.report.read_text())["requests"]["launched"] for b in benches) + 2
        prom.wait_for(f"{want} incoming requests in prometheus", lambda: counted() >= want)
        scraped = time.time()
        prom.wait_for("every rule group evaluated after the last scrape", lambda: prom.evaluated_since(scraped))
        yield {"prom": prom, "engines": engines, "routers": routers}
    finally:
        if prom is not None:
            _stop(prom.proc)
        for p in reversed(procs):
            _stop(p)


def test_promtool_accepts_every_rule_file():
    promtool = _tool("PROMTOOL_BIN", "promtool")
    assert {f.name for f in RULE_FILES} >= {"alerts.yaml", "recording-rules.yaml"}
    for f in RULE_FILES:
        res = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "SUCCESS" in res.stdout, f"{f}:\n{res.stdout}{res.stderr}"


def test_dashboards_are_grafana_json_with_the_expected_variables():
    assert {p.name for p in DASHBOARDS} == {"switchyard-overview.json", "switchyard-model.json"}
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] == path.stem and board["title"] and board["schemaVersion"] >= 36
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        model = variables["model"]
        assert model["type"] == "query" and model["datasource"]["uid"] == "${datasource}"
        assert "vllm:num_incoming_requests_total" in model["definition"]
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        queries = 0
        for panel in board["panels"]:
            g = panel["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (path.name, panel["title"], g)
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], f"{path.name}: panel {panel['title']!r} has no query"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
            for t in panel["targets"]:
                assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", panel["title"]
                substitute(t["expr"])  # only variables the test (and Grafana) knows
                queries += 1
        assert queries >= 20, f"{path.name}: only {queries} queries"


def test_rules_are_loaded_and_evaluate_without_errors(stack):
    prom = stack["prom"]
    groups = prom.api("/api/v1/rules")["groups"]
    loaded = [r for g in groups for r in g["rules"]]
    assert sorted(r["name"] for r in loaded if r["type"] == "recording") == sorted(rule_names("record"))
    assert sorted(r["name"] for r in loaded if r["type"] == "alerting") == sorted(rule_names("alert"))
    assert len(rule_names("record")) >= 30 and len(rule_names("alert")) >= 6
    bad = [(r["name"], r["health"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not bad, f"rules that failed to evaluate: {bad}"


def test_every_recording_rule_produces_series(stack):
    prom = stack["prom"]
    empty = [name for name in rule_names("record") if not prom.query(name)]
    assert not empty, f"recording rules without output: {empty}"
    # The joins by model found the model behind each engine URL the routers use.
    info = prom.query("switchyard:router_server_model:info")
    assert {(s["metric"]["server"], s["metric"]["model"]) for s in info} == {
        (e.url, MODEL) for e in stack["engines"]
    }
    by_model = prom.query("switchyard:router_ttft_seconds:p99_5m")
    assert [s["metric"].get("model") for s in by_model] == [MODEL]
    assert 0 < float(by_model[0]["value"][1]) < 10
    # The second router error is seen as an increase.
    errors = prom.query('switchyard:request_errors:rate1m{error_type="no_healthy_engine"} > 0')
    assert [s["metric"]["model"] for s in errors] == [MODEL]
    assert prom.query("switchyard:router_error_ratio:rate5m > 0")
    # The prefix caches were hit (multi-round QA resends each conversation).
    assert prom.query("switchyard:engine_prefix_cache_hit_ratio:rate5m > 0.3")


def test_every_dashboard_query_returns_data(stack):
    prom = stack["prom"]
    targets = dashboard_targets()
    assert len(targets) >= 60
    failures = []
    for board, title, expr in targets:
        concrete = substitute(expr)
        try:
            if not prom.query(concrete):
                failures.append(f"{board} / {title}: no data: {concrete}")
        except AssertionError as e:
            failures.append(f"{board} / {title}: {e}")
    assert not failures, "\n".join(failures)


def test_prometheus_adapter_queries_return_data(stack):
    """The adapter's series and metrics queries, with its template fields filled in."""
    prom = stack["prom"]
    text = ADAPTER_RULES.read_text()
    sections = re.split(r"^(rules|externalRules):\s*$", text, flags=re.M)
    kinds = dict(zip(sections[1::2], sections[2::2]))
    assert set(kinds) == {"rules", "externalRules"}
    names = re.findall(r'^\s*as:\s*"([^"]+)"', kinds["rules"], flags=re.M)
    assert sorted(names) == ["vllm_num_incoming_requests_per_second", "vllm_num_requests_waiting"]
    checked = 0
    for kind, body in kinds.items():
        series_queries = re.findall(r"^\s*-\s*seriesQuery:\s*'([^']+)'", body, flags=re.M)
        metrics_queries = re.findall(r"^\s*metricsQuery:\s*'([^']+)'", body, flags=re.M)
        assert series_queries and len(series_queries) == len(metrics_queries), kind
        group_by = "pod" if kind == "rules" else "namespace"
        for sq, mq in zip(series_queries, metrics_queries):
            series = prom.api("/api/v1/series", **{"match[]": sq})
            assert series, f"{kind}: seriesQuery {sq} matches nothing"
            metric = sq.split("{")[0]
            q = (
                mq.replace("<<.Series>>", metric)
                .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}"')
                .replace("<<.GroupBy>>", group_by)
            )
            assert "<<" not in q, q
            result = prom.query(q)
            assert result, f"{kind}: metricsQuery {q} returns nothing"
            if kind == "rules":
                assert all(s["metric"].get("pod") for s in result), result
            checked += 1
    assert checked == 3
    waiting = prom.query(
        'sum by (pod) (vllm:num_requests_waiting{namespace="%s",model_name!=""})' % NAMESPACE
    )
    assert sorted(s["metric"]["pod"] for s in waiting) == ["engine-0", "engine-1"]


def test_killing_an_engine_makes_the_engine_down_alerts_pending(stack):
    prom = stack["prom"]
    victim, survivor = stack["engines"][1], stack["engines"][0]
    active = ("pending", "firing")
    for name in ("SwitchyardEngineDown", "SwitchyardEngineUnhealthy", "SwitchyardNoHealthyEngine"):
        assert not prom.alerts(name), f"{name} active before any engine died: {prom.alerts(name)}"

    victim.proc.kill()
    victim.proc.wait(timeout=10)
    instance = _host_port(victim.url)

    down = prom.wait_for(
        "SwitchyardEngineDown pending for the killed engine",
        lambda: [a for a in prom.alerts("SwitchyardEngineDown") if a["state"] in active],
    )
    assert [a["labels"]["instance"] for a in down] == [instance]
    assert down[0]["labels"]["job"] == "switchyard-engine" and down[0]["labels"]["severity"] == "warning"

    # Both routers eject it after one failed health check.
    unhealthy = prom.wait_for(
        "SwitchyardEngineUnhealthy pending from both routers",
        lambda: (lambda a: a if len(a) == 2 else None)(
            [a for a in prom.alerts("SwitchyardEngineUnhealthy") if a["state"] in active]
        ),
    )
    assert {a["labels"]["server"] for a in unhealthy} == {victim.url}

    # The other engine still serves the model: no model is left without a healthy engine.
    assert prom.query(f'vllm:healthy_pods_total{{server="{survivor.url}"}} == 1')
    assert not prom.alerts("SwitchyardNoHealthyEngine")
