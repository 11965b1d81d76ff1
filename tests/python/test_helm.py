"""The Helm chart under deploy/helm/switchyard, through Helm's own Go library.

helm-sdkpy bundles Helm (v4) as a shared library. Two of its actions are used:

- `Lint`: the real `helm lint` (chart structure, templates render, values.schema.json).
  It takes no values files, so each value set is linted on a copy of the chart whose
  values.yaml is the chart's defaults merged with the set, as `helm lint -f SET` does.
  It reports only each message's severity and path, not its text.
- `Install`: the real `helm install`, against a fake Kubernetes API server run here
  (discovery for the kinds the chart uses, objects created in memory, release records in
  Helm's `memory` storage driver). It renders every template, checks the values against
  the schema (with Helm's error text), maps every object to an API resource and creates
  it; its result carries the rendered manifest, which the tests parse and check.

The Go runtime reads the environment once, when the library loads, so Helm runs in a
child process (this file run as a script) started with HELM_DRIVER=memory; the tests
talk to it over a pipe, one JSON request and answer per line.

Rendered objects of built-in kinds are validated against Kubernetes' own OpenAPI
schemas (strict: unknown fields fail) with kubernetes-validate. Nothing here needs a
network or a cluster.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "deploy" / "helm" / "switchyard"
RELEASE = "sy"
NAMESPACE = "llm"
KUBE_VERSION = "1.32"

# ------------------------------------------------------------------------------------
# The fake Kubernetes API server and the Helm worker (child process side).

# group, version, kind, plural: everything the chart may create, plus what Helm itself
# reads. Namespaced, all of them.
API_RESOURCES = [
    ("", "v1", "ConfigMap", "configmaps"),
    ("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
    ("", "v1", "Pod", "pods"),
    ("", "v1", "Secret", "secrets"),
    ("", "v1", "Service", "services"),
    ("", "v1", "ServiceAccount", "serviceaccounts"),
    ("apps", "v1", "Deployment", "deployments"),
    ("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
    ("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "Ingress", "ingresses"),
    ("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    ("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
    ("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors"),
    ("monitoring.coreos.com", "v1", "PodMonitor", "podmonitors"),
    ("monitoring.coreos.com", "v1", "PrometheusRule", "prometheusrules"),
    ("keda.sh", "v1alpha1", "ScaledObject", "scaledobjects"),
]
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


class FakeKubeAPI:
    """Just enough of the API server for `helm install`: discovery (/version, /api,
    /apis, each group version's resource list), GET of an object (404 until created),
    LIST (empty or the created ones), POST (create: 409 if it exists), PUT (replace)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}  # "/apis/.../namespaces/NS/PLURAL/NAME" -> object
        self.created: list[tuple[str, str, str]] = []  # (apiVersion, kind, name), in order
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the API server does
            disable_nagle_algorithm = True  # else each answer waits ~40 ms for an ACK

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                api.get(self)

            def do_POST(self):
                api.write(self, create=True)

            def do_PUT(self):
                api.write(self, create=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, name="fake-kube-api", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def reset(self) -> None:
        with self.lock:
            self.objects.clear()
            self.created.clear()

    def kubeconfig(self, directory: str) -> str:
        """A kubeconfig file (JSON is YAML) that points at this server; returns its path."""
        path = os.path.join(directory, "kubeconfig")
        config = json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
                "current-context": "fake",
            }
        )
        with open(path, "w") as f:
            f.write(config)
        return path

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": message}

    @staticmethod
    def _resource_list(group: str, version: str) -> dict | None:
        rs = [
            {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind, "verbs": VERBS}
            for g, v, kind, plural in API_RESOURCES
            if (g, v) == (group, version)
        ]
        if not rs:
            return None
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}" if group else version, "resources": rs}

    def get(self, h: BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path.rstrip("/")
        if path == "/version":
            return self._send(h, 200, {"major": "1", "minor": KUBE_VERSION.split(".")[1], "gitVersion": f"v{KUBE_VERSION}.0", "platform": "linux/amd64"})
        if path == "/api":
            return self._send(h, 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups: dict[str, list[str]] = {}
            for g, v, _, _ in API_RESOURCES:
                if g and v not in groups.setdefault(g, []):
                    groups[g].append(v)
            return self._send(
                h,
                200,
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": g,
                            "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                            "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                        }
                        for g, vs in groups.items()
                    ],
                },
            )
        m = re.fullmatch(r"/api/(v1)|/apis/([^/]+)/([^/]+)", path)
        if m:
            group, version = ("", m.group(1)) if m.group(1) else (m.group(2), m.group(3))
            body = self._resource_list(group, version)
            return self._send(h, 200, body) if body else self._send(h, 404, self._status(404, "NotFound", path))
        with self.lock:
            if path in self.objects:
                return self._send(h, 200, self.objects[path])
            if re.search(r"/namespaces/[^/]+/[^/]+$", path):  # a collection: LIST
                items = [o for p, o in self.objects.items() if p.rsplit("/", 1)[0] == path]
                return self._send(h, 200, {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items})
        return self._send(h, 404, self._status(404, "NotFound", f"{path} not found"))

    def write(self, h: BaseHTTPRequestHandler, create: bool) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        try:
            obj = json.loads(raw)
        except ValueError:
            return self._send(h, 415, self._status(415, "UnsupportedMediaType", "only JSON bodies are supported here"))
        path = urlsplit(h.path).path.rstrip("/")
        if create:
            path = f"{path}/{obj['metadata']['name']}"
        with self.lock:
            if create and path in self.objects:
                return self._send(h, 409, self._status(409, "AlreadyExists", f"{path} already exists"))
            obj.setdefault("metadata", {})
            obj["metadata"].setdefault("uid", f"uid-{len(self.objects)}")
            obj["metadata"]["resourceVersion"] = str(len(self.created) + 1)
            self.objects[path] = obj
            if create:
                self.created.append((obj["apiVersion"], obj["kind"], obj["metadata"]["name"]))
        return self._send(h, 201 if create else 200, obj)


def _worker_main() -> None:
    """Child process: serve lint/install requests, one JSON object per line."""
    # Helm (Go) may write to fd 1; answers go to a private copy of the pipe.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import helm_sdkpy

    api = FakeKubeAPI()
    kubeconfig = api.kubeconfig(tempfile.mkdtemp(prefix="switchyard-helm-"))
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["action"] == "lint":
                cfg = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=kubeconfig)
                answer = {"ok": True, "lint": asyncio.run(helm_sdkpy.Lint(cfg).run(req["chart"]))}
            else:
                api.reset()
                cfg = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=kubeconfig)
                rel = asyncio.run(
                    helm_sdkpy.Install(cfg).run(RELEASE, req["chart"], values=req.get("values") or None, wait=False, timeout=30)
                )
                answer = {
                    "ok": True,
                    "manifest": rel.get("manifest", ""),
                    "notes": (rel.get("info") or {}).get("notes", ""),
                    "created": api.created,
                }
        except Exception as e:  # noqa: BLE001 - every Helm failure goes back as text
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        answers.write(json.dumps(answer) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--helm-worker"]:
    _worker_main()
    sys.exit(0)

# ------------------------------------------------------------------------------------
# Test side.

import pytest  # noqa: E402
import yaml  # noqa: E402

CI_SETS = ["cpu-quickstart", "multi-model-gpu", "keda-scale-from-zero", "observability", "cache-server",
           "disaggregated-prefill"]
ERROR = 3  # helm lint severities: 1 info, 2 warning, 3 error
WARNING = 2


def ci_values(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


def default_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def helm_merge(base, over):
    """Helm's coalescing of a values file over the chart's values: maps merge key by key,
    anything else replaces, null deletes."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif k in out:
            out[k] = helm_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class Helm:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        # Memory storage for releases; no client-side throttling of the fake API.
        env = dict(os.environ, HELM_DRIVER="memory", HELM_QPS="1000", HELM_BURST_LIMIT="1000")
        self.log = tmp / "helm-worker.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--helm-worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                text=True,
            )
        self.copies = 0

    def _ask(self, req: dict) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=5)
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
            pytest.fail(f"helm worker exited with {code}:\n{tail}", pytrace=False)
        return json.loads(line)

    def chart_copy(self, values: dict | None = None, files: dict[str, str] | None = None) -> Path:
        """A copy of the chart; values.yaml = defaults merged with `values`; with `files`,
        the copy's files/ holds exactly those."""
        self.copies += 1
        dst = self.tmp / f"chart-{self.copies}" / "switchyard"
        shutil.copytree(CHART, dst)
        if files is not None:
            shutil.rmtree(dst / "files", ignore_errors=True)
        if values is not None:
            (dst / "values.yaml").write_text(yaml.safe_dump(helm_merge(default_values(), values), sort_keys=False))
        for rel, text in (files or {}).items():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_text(text)
        return dst

    def lint(self, chart: Path) -> list[dict]:
        ans = self._ask({"action": "lint", "chart": str(chart)})
        assert ans["ok"], ans["error"]
        assert ans["lint"]["TotalChartsLinted"] == 1
        return ans["lint"]["Messages"] or []

    def install_raw(self, values: dict | None, chart: Path = CHART) -> dict:
        return self._ask({"action": "install", "chart": str(chart), "values": values})

    def install(self, values: dict | None, chart: Path = CHART) -> Rendered:
        ans = self.install_raw(values, chart)
        assert ans["ok"], f"helm install failed: {ans['error']}"
        objs = [o for o in yaml.safe_load_all(ans["manifest"]) if o]
        return Rendered(objs, ans["notes"], [tuple(c) for c in ans["created"]])

    def install_error(self, values: dict | None, chart: Path = CHART) -> str:
        ans = self.install_raw(values, chart)
        assert not ans["ok"], "helm install accepted values it should have rejected"
        return ans["error"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


class Rendered:
    def __init__(self, objs: list[dict], notes: str, created: list[tuple]):
        self.objs = objs
        self.notes = notes
        self.created = created

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objs if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: found {len(found)}; have {sorted(self.names(kind))}"
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.of_kind(kind)}


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    import importlib.util

    for module in ("helm_sdkpy", "kubernetes_validate"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed: run scripts/setup-test-env.sh", pytrace=False)
    h = Helm(tmp_path_factory.mktemp("helm"))
    yield h
    h.close()


@pytest.fixture(scope="module")
def rendered(helm):
    """Each CI value set, installed once."""
    cache: dict[str, Rendered] = {}

    def get(name: str) -> Rendered:
        if name not in cache:
            cache[name] = helm.install(ci_values(name))
        return cache[name]

    return get


# Names as the chart makes them (release "sy" does not contain "switchyard").
FULLNAME = f"{RELEASE}-switchyard"
ROUTER = f"{FULLNAME}-router"
CACHE_SERVER = f"{FULLNAME}-cache-server"


def engine_name(model: str) -> str:
    return f"{FULLNAME}-{model}-engine"


def container(obj: dict, name: str | None = None) -> dict:
    cs = obj["spec"]["template"]["spec"]["containers"]
    if name is None:
        assert len(cs) == 1
        return cs[0]
    return next(c for c in cs if c["name"] == name)


def flag(args: list[str], name: str) -> str | None:
    """The value after `name` in an argument list (None if absent)."""
    return args[args.index(name) + 1] if name in args else None


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def label_selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions) against labels."""
    ops = {
        "In": lambda k, vs: labels.get(k) in vs,
        "NotIn": lambda k, vs: labels.get(k) not in vs,
        "Exists": lambda k, _: k in labels,
        "DoesNotExist": lambda k, _: k not in labels,
    }
    return selector_matches(selector.get("matchLabels", {}), labels) and all(
        ops[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", [])
    )


def parse_label_selector(s: str) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in s.split(",")]
    assert all(len(p) == 2 and p[0] and p[1] for p in pairs), f"not key=value pairs: {s!r}"
    return dict(pairs)


# ------------------------------------------------------------------------------------
# helm lint


def test_lint_default_values(helm):
    msgs = helm.lint(CHART)
    bad = [m for m in msgs if m["Severity"] >= WARNING]
    assert not bad, f"helm lint warnings/errors on the chart as shipped: {bad}"


@pytest.mark.parametrize("name", CI_SETS)
def test_lint_value_sets(helm, name):
    chart = helm.chart_copy(ci_values(name))
    msgs = helm.lint(chart)
    bad = [m for m in msgs if m["Severity"] >= WARNING]
    assert not bad, f"helm lint -f ci/{name}-values.yaml: {bad}"


@pytest.mark.parametrize(
    "values",
    [{"routerSpec": {"routingLogic": "nonsense"}}, {"cacheserverSpec": {"enabled": True, "shards": 2}}],
    ids=["routing-logic", "cacheserver-unknown-key"],
)
def test_lint_fails_on_values_the_schema_rejects(helm, values):
    chart = helm.chart_copy(values)
    msgs = helm.lint(chart)
    assert any(m["Severity"] == ERROR and m["Path"] == "values.yaml" for m in msgs), msgs


# ------------------------------------------------------------------------------------
# values.schema.json: bad values fail with the field named


# A vLLM engine for one_model (which defaults to a Switchyard sim engine).
VLLM_MODEL = {"engine": "vllm", "modelURL": "HuggingFaceTB/SmolLM2-135M-Instruct", "switchyardConfig": None}


def one_model(**fields) -> dict:
    base = {"name": "m", "engine": "switchyard", "modelURL": "switchyard-sim", "switchyardConfig": {"backend": "sim"}}
    base.update(fields)
    for k in [k for k, v in base.items() if v is None]:
        del base[k]
    return {"servingEngineSpec": {"modelSpec": [base]}}


SCHEMA_REJECTS = [
    ("routing-logic", {"routerSpec": {"routingLogic": "nonsense"}}, "/routerSpec/routingLogic"),
    ("negative-replicas", one_model(replicaCount=-1), "/servingEngineSpec/modelSpec/0/replicaCount"),
    ("no-model-url", one_model(modelURL=None), "missing property 'modelURL'"),
    ("no-name", one_model(name=None), "missing property 'name'"),
    ("engine-enum", one_model(engine="tgi"), "/servingEngineSpec/modelSpec/0/engine"),
    ("gpu-type", one_model(requestGPU="two"), "/servingEngineSpec/modelSpec/0/requestGPU"),
    ("name-not-dns", one_model(name="Llama/3"), "/servingEngineSpec/modelSpec/0/name"),
    ("typo-in-vllm-config", one_model(vllmConfig={"maxModelLength": 4096}), "'maxModelLength' not allowed"),
    ("secret-ref-half", one_model(hf_token={"secretName": "hf"}), "missing property 'secretKey'"),
    ("memory-quantity", one_model(requestMemory="lots"), "/servingEngineSpec/modelSpec/0/requestMemory"),
    ("hpa-min-zero", one_model(hpa={"enabled": True, "minReplicas": 0}), "/servingEngineSpec/modelSpec/0/hpa/minReplicas"),
    ("hpa-metric", one_model(hpa={"enabled": True, "metric": "cpu"}), "/servingEngineSpec/modelSpec/0/hpa/metric"),
    ("discovery", {"routerSpec": {"serviceDiscovery": "consul"}}, "/routerSpec/serviceDiscovery"),
    ("static-without-backends", {"routerSpec": {"serviceDiscovery": "static"}}, "/routerSpec/staticBackends"),
    ("router-replicas-type", {"routerSpec": {"replicaCount": "two"}}, "/routerSpec/replicaCount"),
    ("unknown-top-level", {"routrSpec": {}}, "'routrSpec' not allowed"),
    ("cacheserver-unknown-key", {"cacheserverSpec": {"enabled": True, "shards": 2}}, "'shards' not allowed"),
    ("cacheserver-port", {"cacheserverSpec": {"containerPort": 70000}}, "/cacheserverSpec/containerPort"),
    ("cacheserver-max-bytes", {"cacheserverSpec": {"maxBytes": "lots"}}, "/cacheserverSpec/maxBytes"),
    ("lmcache-unknown-key", one_model(lmcacheConfig={"enabled": True, "cpuOffloadingBuffer": "5"}), "'cpuOffloadingBuffer' not allowed"),
    ("lmcache-size-unit", one_model(lmcacheConfig={"enabled": True, "cpuOffloadingBufferSize": "20Gi"}), "/servingEngineSpec/modelSpec/0/lmcacheConfig/cpuOffloadingBufferSize"),
    ("lmcache-kv-role", one_model(lmcacheConfig={"enabled": True, "kvRole": "both"}), "/servingEngineSpec/modelSpec/0/lmcacheConfig/kvRole"),
    ("lora-adapter-without-path", one_model(loraAdapters=[{"name": "sql"}], loraConfig={"pvcName": "a"}), "missing property 'path'"),
    ("lora-name-with-equals", one_model(loraAdapters=[{"name": "a=b", "path": "x"}], loraConfig={"pvcName": "a"}), "/servingEngineSpec/modelSpec/0/loraAdapters/0/name"),
    ("lora-max-loras-zero", one_model(loraConfig={"maxLoras": 0}), "/servingEngineSpec/modelSpec/0/loraConfig/maxLoras"),
]


@pytest.mark.parametrize("values,field", [(v, f) for _, v, f in SCHEMA_REJECTS], ids=[i for i, _, _ in SCHEMA_REJECTS])
def test_schema_rejects_bad_values(helm, values, field):
    err = helm.install_error(values)
    assert "values don't meet the specifications of the schema" in err, err
    assert field in err, f"the error does not name {field!r}:\n{err}"


def test_schema_accepts_what_it_documents(helm):
    """The rejections above are the schema's doing, not a chart that fails on anything:
    the same shapes with good values install."""
    r = helm.install(one_model(replicaCount=0, requestGPU=0, requestMemory="512Mi", hpa={"enabled": False}))
    assert r.get("Deployment", engine_name("m"))["spec"]["replicas"] == 0


@pytest.mark.parametrize(
    "values,message",
    [
        (
            one_model(hpa={"enabled": True}, keda={"enabled": True}),
            "hpa.enabled and keda.enabled are both true",
        ),
        (
            {"servingEngineSpec": {"modelSpec": [one_model()["servingEngineSpec"]["modelSpec"][0]] * 2}},
            '"m" is used by more than one model',
        ),
        (
            one_model(hpa={"enabled": True, "minReplicas": 5, "maxReplicas": 2}),
            "hpa.minReplicas is above hpa.maxReplicas",
        ),
        (
            {"cacheserverSpec": {"enabled": True, "containerPort": 8080, "httpPort": 8080}},
            "containerPort (lm://) and httpPort (/metrics, /health) must differ",
        ),
        (
            {"cacheserverSpec": {"enabled": True, "resources": {"limits": {"memory": "1"}}}},
            "--max-bytes comes to 0 bytes",
        ),
        (
            # A Production Stack values file's cache server image.
            {"cacheserverSpec": {"enabled": True, "repository": "lmcache/vllm-openai", "tag": "latest"}},
            "cacheserverSpec.repository: \"lmcache/vllm-openai\" is LMCache's image",
        ),
        (
            one_model(kvTransfer={"enabled": True}, lmcacheConfig={"enabled": True}),
            "kvTransfer.enabled and lmcacheConfig.enabled both set --kv-transfer-config",
        ),
        (
            {"routerSpec": {"routingLogic": "disaggregated_prefill", "prefillModelLabels": "a"}},
            "routerSpec.prefillModelLabels and routerSpec.decodeModelLabels: required",
        ),
        (
            one_model(loraAdapters=[{"name": "sql", "path": "sql"}]),
            "loraAdapters needs loraConfig.pvcName or loraConfig.initContainer",
        ),
        (
            one_model(loraAdapters=[{"name": "sql", "path": "sql"}], loraConfig={"pvcName": "a", "initContainer": {"image": "busybox"}}),
            "loraConfig.pvcName and loraConfig.initContainer both give /adapters",
        ),
    ],
    ids=["hpa-and-keda", "duplicate-name", "hpa-min-above-max", "cache-server-ports", "cache-server-no-bytes",
         "cache-server-lmcache-image", "kv-transfer-and-lmcache", "pd-without-labels", "lora-without-volume",
         "lora-two-volumes"],
)
def test_template_rejects_inconsistent_values(helm, values, message):
    err = helm.install_error(values)
    assert message in err, err


# ------------------------------------------------------------------------------------
# What the value sets render to


def test_every_object_was_created_through_the_api(rendered):
    """Helm mapped every rendered object to an API resource and created it (so each
    apiVersion/kind is one the chart's dependencies serve), nothing else."""
    for name in CI_SETS:
        r = rendered(name)
        want = sorted((o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in r.objs)
        assert sorted(r.created) == want, name
        for o in r.objs:
            assert o["metadata"].get("namespace") in (None, NAMESPACE), (name, o["kind"], o["metadata"]["name"])


def _k8s_validate(obj: dict) -> None:
    import kubernetes_validate
    from kubernetes_validate import utils

    if not getattr(utils.schema_contents, "switchyard_cached", False):
        # kubernetes-validate re-reads its (large) schema files for every object.
        load, cache = utils.schema_contents, {}

        def cached(filename, version):
            if filename not in cache:
                cache[filename] = load(filename, version)
            return cache[filename]

        cached.switchyard_cached = True
        utils.schema_contents = cached
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


BUILTIN_KINDS = {"ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "PersistentVolumeClaim",
                 "PodDisruptionBudget", "Role", "RoleBinding", "Secret", "Service", "ServiceAccount"}


@pytest.mark.parametrize("name", CI_SETS)
def test_objects_match_the_kubernetes_api_schemas(rendered, name):
    from kubernetes_validate import ValidationError

    r = rendered(name)
    kinds = {o["kind"] for o in r.objs}
    assert kinds, "nothing rendered"
    for o in r.objs:
        if o["kind"] not in BUILTIN_KINDS:
            assert o["kind"] in {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject"}, o["kind"]
            continue
        try:
            _k8s_validate(o)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{o['kind']}/{o['metadata']['name']}: {path}: {e.message}", pytrace=False)


def check_engine_basics(r: Rendered, model: str) -> dict:
    """What every engine Deployment must have; returns its container."""
    dep = r.get("Deployment", engine_name(model))
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert labels["model"] == model
    assert selector_matches(dep["spec"]["selector"]["matchLabels"], labels)
    c = container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", (model, probe)
        assert get["port"] == "http" and "http" in ports, (model, probe, get)
    svc = r.get("Service", engine_name(model))
    assert selector_matches(svc["spec"]["selector"], labels)
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    return c


def check_router_discovers_engines(r: Rendered, models: list[str]) -> list[str]:
    """The router finds exactly the engine pods of this release, with the RBAC to."""
    router = r.get("Deployment", ROUTER)
    c = container(router)
    args = c["args"]
    assert args[0] == "router"
    assert flag(args, "--service-discovery") == "k8s"
    assert flag(args, "--k8s-namespace") == NAMESPACE
    selector = parse_label_selector(flag(args, "--k8s-label-selector"))
    engine_deps = [o for o in r.of_kind("Deployment") if o["metadata"]["name"] not in (ROUTER, CACHE_SERVER)]
    assert sorted(d["metadata"]["name"] for d in engine_deps) == sorted(engine_name(m) for m in models)
    for d in engine_deps:
        assert selector_matches(selector, d["spec"]["template"]["metadata"]["labels"]), d["metadata"]["name"]
        port = next(p["containerPort"] for p in container(d)["ports"] if p["name"] == "http")
        assert flag(args, "--k8s-port") == str(port)
    assert not selector_matches(selector, router["spec"]["template"]["metadata"]["labels"])
    # RBAC: the router's service account may get, list and watch pods and services.
    sa = router["spec"]["template"]["spec"]["serviceAccountName"]
    assert sa in r.names("ServiceAccount")
    binding = next(b for b in r.of_kind("RoleBinding") if any(s["name"] == sa for s in b["subjects"]))
    assert all(s["namespace"] == NAMESPACE for s in binding["subjects"])
    role = r.get("Role", binding["roleRef"]["name"])
    for resource in ("pods", "services"):
        verbs = {v for rule in role["rules"] if resource in rule["resources"] and "" in rule["apiGroups"] for v in rule["verbs"]}
        assert {"get", "list", "watch"} <= verbs, (resource, verbs)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    svc = r.get("Service", ROUTER)
    assert selector_matches(svc["spec"]["selector"], router["spec"]["template"]["metadata"]["labels"])
    return args


def test_cpu_quickstart(rendered):
    r = rendered("cpu-quickstart")
    args = check_router_discovers_engines(r, ["smollm2"])
    assert flag(args, "--routing-logic") == "prefixaware"
    c = check_engine_basics(r, "smollm2")
    dep = r.get("Deployment", engine_name("smollm2"))
    # The Switchyard engine from the Switchyard image, serving a GGUF on CPU, as a
    # non-root user.
    assert c["image"].startswith("switchyard:")
    assert "command" not in c  # the image's ENTRYPOINT is `switchyard`
    assert c["args"][:3] == ["engine", "--backend", "gguf"]
    assert flag(c["args"], "--model").endswith(".gguf")
    assert flag(c["args"], "--served-model-name") == "smollm2"
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # No GPU anywhere: no GPU resource, no runtime class, no GPU toleration.
    for o in r.of_kind("Deployment"):
        spec = o["spec"]["template"]["spec"]
        assert "runtimeClassName" not in spec
        assert not spec.get("tolerations")
        for cc in spec["containers"]:
            for part in ("requests", "limits"):
                assert not any("gpu" in k for k in cc.get("resources", {}).get(part, {})), o["metadata"]["name"]
    assert dep["spec"]["replicas"] == 2
    pdb = r.get("PodDisruptionBudget", engine_name("smollm2"))
    assert selector_matches(pdb["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    assert not r.of_kind("HorizontalPodAutoscaler") and not r.of_kind("ScaledObject")
    assert "smollm2" in r.notes and "port-forward" in r.notes


def test_multi_model_gpu(rendered):
    r = rendered("multi-model-gpu")
    values = ci_values("multi-model-gpu")
    models = {m["name"]: m for m in values["servingEngineSpec"]["modelSpec"]}
    assert len(models) == 2
    args = check_router_discovers_engines(r, list(models))
    assert flag(args, "--routing-logic") == "kvaware"
    assert flag(args, "--kv-events-port") == "5557"
    for name, spec in models.items():
        c = check_engine_basics(r, name)
        dep = r.get("Deployment", engine_name(name))
        assert c["image"].startswith("vllm/vllm-openai:")
        assert c["command"] == ["vllm", "serve"]
        assert c["args"][0] == spec["modelURL"]
        gpus = str(spec["requestGPU"])
        assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert flag(c["args"], "--tensor-parallel-size") == str(spec["vllmConfig"]["tensorParallelSize"])
        assert flag(c["args"], "--max-model-len") == str(spec["vllmConfig"]["maxModelLen"])
        assert ("--enable-chunked-prefill" in c["args"]) == bool(spec["vllmConfig"].get("enableChunkedPrefill"))
        env = {e["name"]: e for e in c["env"]}
        assert env["HF_HOME"]["value"] == "/data"
        if isinstance(spec.get("hf_token"), dict):
            ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": spec["hf_token"]["secretName"], "key": spec["hf_token"]["secretKey"]}
        else:
            assert "HF_TOKEN" not in env
        assert json.loads(flag(c["args"], "--kv-events-config")) == {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": "tcp://*:5557",
            "topic": "kv-events",
        }
        assert {"name": "kv-events", "containerPort": 5557, "protocol": "TCP"} in c["ports"]
        # /dev/shm in memory for tensor parallelism.
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert vols["shm"]["emptyDir"]["medium"] == "Memory"
        assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        # Weights on a PVC that survives uninstall.
        pvc = r.get("PersistentVolumeClaim", f"{engine_name(name)}-data")
        assert pvc["spec"]["resources"]["requests"]["storage"] == spec["pvcStorage"]
        assert vols["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        # The HPA owns the replica count.
        assert "replicas" not in dep["spec"]
        hpa = r.get("HorizontalPodAutoscaler", engine_name(name))
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": engine_name(name)}
        assert hpa["spec"]["minReplicas"] == spec["hpa"]["minReplicas"]
        assert hpa["spec"]["maxReplicas"] == spec["hpa"]["maxReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        if spec["hpa"].get("metric", "vllm_num_requests_waiting") == "vllm_num_requests_waiting":
            assert metric["type"] == "Pods"
            assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
            assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": str(spec["hpa"]["target"])}
        else:
            kind = spec["hpa"].get("metricType") or "External"
            assert metric["type"] == kind
            body = metric[kind.lower()]
            assert body["metric"]["name"] == "vllm_num_incoming_requests_per_second"
            assert body["metric"]["selector"]["matchLabels"] == {"model": name}
            if kind == "Object":
                assert body["describedObject"] == {"apiVersion": "v1", "kind": "Service", "name": ROUTER}
    metric_kinds = {r.get("HorizontalPodAutoscaler", engine_name(n))["spec"]["metrics"][0]["type"] for n in models}
    assert metric_kinds == {"Pods", "External"}, "the GPU set shows both the engine-queue and the router-rate HPA"


def test_disaggregated_prefill_2p2d(helm, rendered):
    """2P2D: prefill and decode pods labelled for the router, NIXL's kv-transfer config and
    side-channel host (the pod IP), and the router's disaggregated_prefill flags."""
    r = rendered("disaggregated-prefill")
    args = check_router_discovers_engines(r, ["llama-prefill", "llama-decode"])
    assert flag(args, "--routing-logic") == "disaggregated_prefill"
    assert flag(args, "--prefill-model-labels") == "llama-prefill"
    assert flag(args, "--decode-model-labels") == "llama-decode"
    assert flag(args, "--known-models") == "llama"
    for side in ("prefill", "decode"):
        name = f"llama-{side}"
        c = check_engine_basics(r, name)
        dep = r.get("Deployment", engine_name(name))
        assert dep["spec"]["replicas"] == 2
        assert dep["spec"]["template"]["metadata"]["labels"]["model"] == name
        assert flag(c["args"], "--served-model-name") == "llama"
        assert json.loads(flag(c["args"], "--kv-transfer-config")) == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
        env = {e["name"]: e for e in c["env"]}
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"] == "5600"
        assert {"name": "nixl-side", "containerPort": 5600, "protocol": "TCP"} in c["ports"]
    # Switchyard engines get the same flag; a label other than `model` is added as is, and
    # labels given as a comma string pass through.
    values = ci_values("disaggregated-prefill")
    for m in values["servingEngineSpec"]["modelSpec"]:
        m.update(engine="switchyard", modelURL="/opt/switchyard/models/SmolLM2-135M-Instruct.Q4_1.gguf", requestGPU=0)
        m["labels"]["tier"] = "pd"
    values["routerSpec"]["decodeModelLabels"] = "llama-decode,other-decode"
    r = helm.install(values)
    c = container(r.get("Deployment", engine_name("llama-decode")))
    assert c["args"][:2] == ["engine", "--backend"]
    assert json.loads(flag(c["args"], "--kv-transfer-config"))["kv_connector"] == "NixlConnector"
    assert "VLLM_NIXL_SIDE_CHANNEL_HOST" in {e["name"] for e in c["env"]}
    labels = r.get("Deployment", engine_name("llama-decode"))["spec"]["template"]["metadata"]["labels"]
    assert labels["model"] == "llama-decode" and labels["tier"] == "pd"
    router_args = container(r.get("Deployment", ROUTER))["args"]
    assert flag(router_args, "--decode-model-labels") == "llama-decode,other-decode"


def test_hpa_on_the_router_service(helm):
    """The request-rate metric as an Object metric on the router Service."""
    r = helm.install(one_model(hpa={"enabled": True, "metric": "vllm_num_incoming_requests_per_second", "metricType": "Object", "target": 5}))
    hpa = r.get("HorizontalPodAutoscaler", engine_name("m"))
    assert hpa["spec"]["scaleTargetRef"]["name"] == engine_name("m")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Object"
    assert metric["object"]["describedObject"] == {"apiVersion": "v1", "kind": "Service", "name": ROUTER}
    assert ROUTER in r.names("Service")
    assert metric["object"]["metric"] == {"name": "vllm_num_incoming_requests_per_second", "selector": {"matchLabels": {"model": "m"}}}
    assert metric["object"]["target"] == {"type": "AverageValue", "averageValue": "5"}


def test_keda_scale_from_zero(rendered):
    r = rendered("keda-scale-from-zero")
    values = ci_values("keda-scale-from-zero")
    (spec,) = values["servingEngineSpec"]["modelSpec"]
    name = spec["name"]
    check_router_discovers_engines(r, [name])
    check_engine_basics(r, name)
    dep = r.get("Deployment", engine_name(name))
    assert dep["spec"]["replicas"] == 0
    so = r.get("ScaledObject", engine_name(name))
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == engine_name(name)
    assert so["spec"]["minReplicaCount"] == 0
    assert so["spec"]["maxReplicaCount"] == spec["keda"]["maxReplicaCount"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == f'sum(rate(vllm:num_incoming_requests_total{{model="{name}"}}[1m]))'
    assert trigger["metadata"]["serverAddress"] == spec["keda"]["serverAddress"]
    # KEDA reads the router's counter through Prometheus: the router must be scraped.
    sm = r.get("ServiceMonitor", ROUTER)
    router = r.get("Deployment", ROUTER)
    assert selector_matches(sm["spec"]["selector"]["matchLabels"], router["metadata"]["labels"])
    assert sm["spec"]["endpoints"][0]["port"] == "http" and sm["spec"]["endpoints"][0]["path"] == "/metrics"
    # KEDA makes its own HPA: the chart must not add one.
    assert not r.of_kind("HorizontalPodAutoscaler")
    # A router started while the model is at zero still answers 503 and counts the
    # request (what the trigger reads), rather than 404: it is told the model.
    served = spec.get("servedModelName", name)
    assert served in flag(container(router)["args"], "--known-models").split(",")


def test_observability_objects(helm):
    """ServiceMonitor, PodMonitor, Ingress, one dashboard ConfigMap per JSON file and a
    PrometheusRule with every group of files/prometheus/*.yaml, on a chart copy with
    files of our own (the real ones are another part's; they are checked below)."""
    dashboard = json.dumps({"title": "Test dashboard", "panels": []})
    rules = "groups:\n  - name: a\n    rules:\n      - record: x:y\n        expr: sum(up)\n"
    more = "groups:\n  - name: b\n    rules:\n      - alert: Down\n        expr: up == 0\n        annotations:\n          summary: '{{ $labels.instance }} down'\n"
    chart = helm.chart_copy(
        files={
            "files/dashboards/Test_Board.json": dashboard,
            "files/prometheus/a.yaml": rules,
            "files/prometheus/b.yaml": more,
        }
    )
    r = helm.install(ci_values("observability"), chart=chart)
    cm = r.get("ConfigMap", f"{FULLNAME}-dashboard-test-board")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["Test_Board.json"]) == json.loads(dashboard)
    (rule,) = r.of_kind("PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == ["a", "b"]
    assert rule["spec"]["groups"][1]["rules"][0]["annotations"]["summary"] == "{{ $labels.instance }} down"
    pm = r.get("PodMonitor", f"{FULLNAME}-engines")
    engine = r.get("Deployment", engine_name("smollm2"))
    assert selector_matches(pm["spec"]["selector"]["matchLabels"], engine["spec"]["template"]["metadata"]["labels"])
    sm = r.get("ServiceMonitor", f"{FULLNAME}-engines")
    assert selector_matches(sm["spec"]["selector"]["matchLabels"], r.get("Service", engine_name("smollm2"))["metadata"]["labels"])
    ing = r.get("Ingress", ROUTER)
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": ROUTER, "port": {"name": "http"}}


def test_dashboards_and_rules_shipped_with_the_chart(helm):
    """Whatever files/ holds now renders: one ConfigMap per dashboard, every rule group."""
    r = helm.install(ci_values("observability"))
    boards = sorted((CHART / "files" / "dashboards").glob("*.json")) if (CHART / "files" / "dashboards").is_dir() else []
    cms = [o for o in r.of_kind("ConfigMap") if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert sorted(k for cm in cms for k in cm["data"]) == sorted(p.name for p in boards)
    for cm in cms:
        (key,) = cm["data"]
        assert json.loads(cm["data"][key]) == json.loads((CHART / "files" / "dashboards" / key).read_text())
        assert len(json.dumps(cm["data"])) < 1024 * 1024, f"{key}: over a ConfigMap's 1 MiB"
    groups = []
    for p in sorted((CHART / "files" / "prometheus").glob("*.yaml")) if (CHART / "files" / "prometheus").is_dir() else []:
        groups += (yaml.safe_load(p.read_text()) or {}).get("groups", [])
    rules = r.of_kind("PrometheusRule")
    rendered_groups = [g for rule in rules for g in rule["spec"]["groups"]]
    assert rendered_groups == groups
    names = [g["name"] for g in rendered_groups]
    assert len(names) == len(set(names)), f"rule group names repeat across files: {names}"


def test_static_discovery_needs_no_rbac(helm):
    r = helm.install(
        {
            "servingEngineSpec": {"enableEngine": False},
            "routerSpec": {
                "serviceDiscovery": "static",
                "staticBackends": "http://10.0.0.1:8000,http://10.0.0.2:8000",
                "staticModels": "a,b",
            },
        }
    )
    args = container(r.get("Deployment", ROUTER))["args"]
    assert flag(args, "--static-backends") == "http://10.0.0.1:8000,http://10.0.0.2:8000"
    assert flag(args, "--static-models") == "a,b"
    assert "--k8s-label-selector" not in args
    assert not r.of_kind("Role") and not r.of_kind("RoleBinding")
    assert r.names("Deployment") == {ROUTER}


def test_secrets_given_as_strings(helm):
    """PS-style string secrets go into the chart's Secret, and the pods read them there."""
    values = helm_merge(
        one_model(engine="vllm", modelURL="org/model", hf_token="hf_abc"),
        {"servingEngineSpec": {"vllmApiKey": "sk-123"}},
    )
    r = helm.install(values)
    (secret,) = r.of_kind("Secret")
    assert secret["stringData"] == {"hf_token_m": "hf_abc", "vllmApiKey": "sk-123"}
    name = secret["metadata"]["name"]
    engine_env = {e["name"]: e for e in container(r.get("Deployment", engine_name("m")))["env"]}
    assert engine_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "hf_token_m"}
    assert engine_env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "vllmApiKey"}
    router_env = {e["name"]: e for e in container(r.get("Deployment", ROUTER))["env"]}
    assert router_env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "vllmApiKey"}
    # Switchyard engines (`--api-key` reads VLLM_API_KEY, as vllm serve) get the key too.
    r = helm.install(helm_merge(one_model(), {"servingEngineSpec": {"vllmApiKey": "sk-123"}}))
    engine_env = {e["name"]: e for e in container(r.get("Deployment", engine_name("m")))["env"]}
    assert engine_env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "vllmApiKey"
    # Nothing secret when nothing is given.
    assert not helm.install(one_model()).of_kind("Secret")


def test_sim_engine_and_served_name(helm):
    r = helm.install(
        one_model(servedModelName="meta-llama/Llama-3.1-8B-Instruct", vllmConfig={"enableKvEvents": False, "extraArgs": ["--sim-preset", "smollm2-135m-cpu"]})
    )
    c = container(r.get("Deployment", engine_name("m")))
    assert c["args"][:5] == ["engine", "--backend", "sim", "--model", "switchyard-sim"]
    assert flag(c["args"], "--served-model-name") == "meta-llama/Llama-3.1-8B-Instruct"
    assert "--kv-events-config" not in c["args"]
    assert c["args"][-2:] == ["--sim-preset", "smollm2-135m-cpu"]
    assert [p["name"] for p in c["ports"]] == ["http"]


def test_lora_adapters(helm):
    """loraAdapters: the engine serves them as models (--enable-lora, --lora-modules
    NAME=/adapters/PATH) from a PVC mounted read-only, or from what an init container put
    in an emptyDir; allowRuntimeUpdating sets vLLM's env (and LoRA on with no adapter)."""
    r = helm.install(
        one_model(
            loraAdapters=[{"name": "sql", "path": "sql-lora"}, {"name": "chat", "path": "/chat.gguf"}],
            loraConfig={"pvcName": "adapters", "maxLoras": 4},
        )
    )
    d = r.get("Deployment", engine_name("m"))
    spec = d["spec"]["template"]["spec"]
    c = container(d)
    args = c["args"]
    assert "--enable-lora" in args
    assert (flag(args, "--max-loras"), flag(args, "--max-lora-rank")) == ("4", "16")
    i = args.index("--lora-modules")
    assert args[i + 1 : i + 3] == ["sql=/adapters/sql-lora", "chat=/adapters/chat.gguf"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["lora-adapters"] == {"name": "lora-adapters", "mountPath": "/adapters", "readOnly": True}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["lora-adapters"]["persistentVolumeClaim"] == {"claimName": "adapters", "readOnly": True}
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env_values(c)
    assert "initContainers" not in spec

    init = {"image": "busybox:1.36", "command": ["sh", "-c", "cp -r /src/. /adapters/"]}
    r = helm.install(
        one_model(loraAdapters=[{"name": "sql", "path": "sql"}], loraConfig={"initContainer": init, "allowRuntimeUpdating": True})
    )
    d = r.get("Deployment", engine_name("m"))
    spec = d["spec"]["template"]["spec"]
    (ic,) = spec["initContainers"]
    assert (ic["name"], ic["image"], ic["command"]) == ("lora-adapters", "busybox:1.36", init["command"])
    assert ic["volumeMounts"] == [{"name": "lora-adapters", "mountPath": "/adapters"}]
    assert {v["name"]: v for v in spec["volumes"]}["lora-adapters"] == {"name": "lora-adapters", "emptyDir": {}}
    c = container(d)
    assert env_values(c)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert flag(c["args"], "--lora-modules") == "sql=/adapters/sql"

    # Runtime loading only: LoRA on, nothing to mount.
    d = helm.install(one_model(loraConfig={"allowRuntimeUpdating": True})).get("Deployment", engine_name("m"))
    c = container(d)
    assert "--enable-lora" in c["args"] and "--lora-modules" not in c["args"]
    assert all(v["name"] != "lora-adapters" for v in d["spec"]["template"]["spec"]["volumes"])
    # Nothing of it by default.
    r = helm.install(one_model())
    c = container(r.get("Deployment", engine_name("m")))
    assert "--enable-lora" not in c["args"]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env_values(c)
    assert "--lora-affinity" not in container(r.get("Deployment", ROUTER))["args"]
    # The router's adapter affinity.
    values = one_model(loraAdapters=[{"name": "sql", "path": "sql"}], loraConfig={"pvcName": "adapters"})
    values["routerSpec"] = {"loraAffinity": True}
    assert "--lora-affinity" in container(helm.install(values).get("Deployment", ROUTER))["args"]


# ------------------------------------------------------------------------------------
# The shared KV cache tier: cacheserverSpec and lmcacheConfig

KV_TRANSFER = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}


def env_values(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_cache_server(rendered):
    """`switchyard cache-server` from the Switchyard image: lm:// and http ports, probes on
    /health of the http port, a Service with both, --max-bytes from the memory limit."""
    r = rendered("cache-server")
    values = ci_values("cache-server")
    spec = values["cacheserverSpec"]
    dep = r.get("Deployment", CACHE_SERVER)
    pod = dep["spec"]["template"]
    assert dep["spec"]["replicas"] == 1
    assert selector_matches(dep["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "cache-server"
    c = container(dep)
    assert c["name"] == "cache-server"
    assert c["image"] == container(r.get("Deployment", ROUTER))["image"]  # the router's image
    assert "command" not in c  # the image's ENTRYPOINT is `switchyard`
    args = c["args"]
    assert args[0] == "cache-server"
    assert flag(args, "--host") == "0.0.0.0"
    assert flag(args, "--port") == "65432"
    assert flag(args, "--http-port") == "8080"
    # 3/4 of the 16Gi memory limit.
    assert flag(args, "--max-bytes") == str(16 * 2**30 * 3 // 4)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"lm": 65432, "http": 8080}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert c["resources"] == spec["resources"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # The Service: lm:// on 81 (the Production Stack's port), http for scraping.
    svc = r.get("Service", CACHE_SERVER)
    assert svc["spec"]["type"] == "ClusterIP"
    assert selector_matches(svc["spec"]["selector"], pod["metadata"]["labels"])
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert svc_ports["lm"]["port"] == 81 and svc_ports["lm"]["targetPort"] == "lm"
    assert svc_ports["http"]["port"] == 8080 and svc_ports["http"]["targetPort"] == "http"
    # Not an engine: the router neither discovers it nor routes to it.
    models = [m["name"] for m in values["servingEngineSpec"]["modelSpec"]]
    router_args = check_router_discovers_engines(r, models)
    selector = parse_label_selector(flag(router_args, "--k8s-label-selector"))
    assert not selector_matches(selector, pod["metadata"]["labels"])
    assert not selector_matches(selector, svc["metadata"]["labels"])
    # The engines' ServiceMonitor scrapes it too (its Service port `http`), not the router.
    sm = r.get("ServiceMonitor", f"{FULLNAME}-engines")
    assert label_selector_matches(sm["spec"]["selector"], svc["metadata"]["labels"])
    assert "http" in svc_ports and sm["spec"]["endpoints"][0]["port"] == "http"
    for m in models:
        assert label_selector_matches(sm["spec"]["selector"], r.get("Service", engine_name(m))["metadata"]["labels"])
    assert not label_selector_matches(sm["spec"]["selector"], r.get("Service", ROUTER)["metadata"]["labels"])
    assert f"lm://{CACHE_SERVER}.{NAMESPACE}.svc.cluster.local:81" in r.notes


def test_cache_server_in_the_pod_monitor(helm):
    values = helm_merge(ci_values("cache-server"), {"servingEngineSpec": {"serviceMonitor": {"enabled": False}, "podMonitor": {"enabled": True}}})
    r = helm.install(values)
    pm = r.get("PodMonitor", f"{FULLNAME}-engines")
    cache_pod = r.get("Deployment", CACHE_SERVER)["spec"]["template"]
    assert label_selector_matches(pm["spec"]["selector"], cache_pod["metadata"]["labels"])
    assert "http" in {p["name"] for p in container(r.get("Deployment", CACHE_SERVER))["ports"]}
    assert pm["spec"]["podMetricsEndpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    for m in ("llama3", "smollm2"):
        assert label_selector_matches(pm["spec"]["selector"], r.get("Deployment", engine_name(m))["spec"]["template"]["metadata"]["labels"])
    assert not label_selector_matches(pm["spec"]["selector"], r.get("Deployment", ROUTER)["spec"]["template"]["metadata"]["labels"])
    assert not r.of_kind("ServiceMonitor")


def test_lmcache_engines_use_the_cache_server(rendered):
    """Both engine kinds get LMCache's connector and environment, with the remote URL
    pointing at the rendered cache-server Service."""
    r = rendered("cache-server")
    values = ci_values("cache-server")
    svc = r.get("Service", CACHE_SERVER)
    lm_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "lm")
    target = next(p["targetPort"] for p in svc["spec"]["ports"] if p["name"] == "lm")
    cache_ports = {p["name"]: p["containerPort"] for p in container(r.get("Deployment", CACHE_SERVER))["ports"]}
    assert target in cache_ports and flag(container(r.get("Deployment", CACHE_SERVER))["args"], "--port") == str(cache_ports[target])
    engines = set()
    for spec in values["servingEngineSpec"]["modelSpec"]:
        lmc = spec.get("lmcacheConfig")
        if not lmc:
            c = check_engine_basics(r, spec["name"])
            assert "--kv-transfer-config" not in c["args"]
            assert not any(e["name"].startswith("LMCACHE_") for e in c.get("env", []))
            continue
        c = check_engine_basics(r, spec["name"])
        engines.add(spec["engine"])
        assert json.loads(flag(c["args"], "--kv-transfer-config")) == KV_TRANSFER
        env = env_values(c)
        assert env["LMCACHE_LOCAL_CPU"] == "True"
        assert env["LMCACHE_MAX_LOCAL_CPU_SIZE"] == str(lmc["cpuOffloadingBufferSize"])
        assert env["LMCACHE_CHUNK_SIZE"] == str(lmc.get("chunkSize", 256))
        url = urlsplit(env["LMCACHE_REMOTE_URL"])
        assert url.scheme == "lm"
        assert url.hostname == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        assert url.port == lm_port == 81
        assert env["LMCACHE_REMOTE_SERDE"] == "naive"
        if lmc.get("diskOffloadingBufferSize"):
            assert env["LMCACHE_MAX_LOCAL_DISK_SIZE"] == str(lmc["diskOffloadingBufferSize"])
            disk = env["LMCACHE_LOCAL_DISK"]
            assert disk.startswith("file:///data/"), disk
            assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
        else:
            assert "LMCACHE_LOCAL_DISK" not in env and "LMCACHE_MAX_LOCAL_DISK_SIZE" not in env
        if spec["engine"] == "vllm":
            # LMCache's vLLM image keeps vllm in its virtualenv.
            assert c["command"] == ["/opt/venv/bin/vllm", "serve"]
            assert env["HF_HOME"] == "/data"
        else:
            assert "command" not in c and c["args"][0] == "engine"
    assert engines == {"vllm", "switchyard"}


def test_nothing_of_the_cache_tier_by_default(helm, rendered):
    """Default values (and every other CI set): no cache server, no LMCache flag or env,
    the monitors select the engines only."""
    for r in [helm.install(None)] + [rendered(n) for n in CI_SETS if n != "cache-server"]:
        assert CACHE_SERVER not in r.names("Deployment") | r.names("Service")
        for o in r.of_kind("Deployment"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                # (disaggregated-prefill's engines have NixlConnector's, not LMCache's.)
                assert "LMCacheConnectorV1" not in (flag(c.get("args", []), "--kv-transfer-config") or "")
                assert not [n for n in env_values(c) if n.startswith("LMCACHE_")], o["metadata"]["name"]
        for m in r.of_kind("ServiceMonitor") + r.of_kind("PodMonitor"):
            assert "matchExpressions" not in m["spec"]["selector"]
        assert "Shared KV cache" not in r.notes
    assert default_values()["cacheserverSpec"]["enabled"] is False


def test_lmcache_without_the_cache_server(helm):
    """lmcacheConfig alone: local offloading, no remote tier; remoteUrl names another
    server; a model's own env wins over the chart's LMCACHE_*."""
    r = helm.install(one_model(**VLLM_MODEL, lmcacheConfig={"enabled": True, "cpuOffloadingBufferSize": 0, "kvRole": "kv_producer"}))
    c = container(r.get("Deployment", engine_name("m")))
    assert json.loads(flag(c["args"], "--kv-transfer-config")) == {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_producer"}
    env = env_values(c)
    assert env["LMCACHE_LOCAL_CPU"] == "False" and "LMCACHE_MAX_LOCAL_CPU_SIZE" not in env
    assert env["LMCACHE_CHUNK_SIZE"] == "256"
    assert "LMCACHE_REMOTE_URL" not in env and "LMCACHE_REMOTE_SERDE" not in env
    assert CACHE_SERVER not in r.names("Deployment")

    r = helm.install(
        one_model(
            **VLLM_MODEL,
            lmcacheConfig={"enabled": True, "remoteUrl": "lm://cache.other.svc:65432", "remoteSerde": "cachegen"},
            env=[{"name": "LMCACHE_CHUNK_SIZE", "value": "512"}],
        )
    )
    c = container(r.get("Deployment", engine_name("m")))
    env = env_values(c)
    assert env["LMCACHE_REMOTE_URL"] == "lm://cache.other.svc:65432"
    assert env["LMCACHE_REMOTE_SERDE"] == "cachegen"
    assert env["LMCACHE_LOCAL_CPU"] == "True"
    names = [e["name"] for e in c["env"]]
    assert names.index("LMCACHE_CHUNK_SIZE") < len(names) - 1 - names[::-1].index("LMCACHE_CHUNK_SIZE")
    assert c["env"][-1] == {"name": "LMCACHE_CHUNK_SIZE", "value": "512"}  # the model's own, last


@pytest.mark.parametrize(
    "spec,max_bytes",
    [
        ({"maxBytes": "2Gi"}, 2 * 2**30),
        ({"maxBytes": 1000000}, 1000000),
        ({"maxBytes": "1.5G"}, 1500000000),
        ({"resources": {"limits": {"memory": "8G"}}}, 6000000000),
        # null removes a default, as in a values file.
        ({"resources": {"limits": None, "requests": {"memory": "1Gi"}}}, 3 * 2**30 // 4),
        ({"resources": None}, 2**30),
        ({}, 3 * 2**30),  # the default resources: a 4Gi limit
    ],
    ids=["quantity", "bytes", "decimal", "limit", "request", "no-resources", "default"],
)
def test_cache_server_max_bytes(helm, spec, max_bytes):
    """--max-bytes: maxBytes, else 3/4 of the memory limit (or request), else 1 GiB."""
    r = helm.install({"cacheserverSpec": {"enabled": True, **spec}})
    c = container(r.get("Deployment", CACHE_SERVER))
    assert flag(c["args"], "--max-bytes") == str(max_bytes)


# ------------------------------------------------------------------------------------
# Documentation and image


def _leaf_paths(v, prefix=""):
    if isinstance(v, dict) and v:
        for k, sub in v.items():
            yield from _leaf_paths(sub, f"{prefix}.{k}" if prefix else k)
    elif isinstance(v, list) and v and isinstance(v[0], dict):
        for sub in v:
            yield from _leaf_paths(sub, f"{prefix}[]")
    else:
        yield prefix


def test_pods_drain_on_termination(helm, rendered):
    """Grace period, preStop sleep and the matching --shutdown-timeout for the router and
    Switchyard engines; vLLM engines get the grace period and the sleep."""
    r = rendered("cpu-quickstart")
    router = r.get("Deployment", ROUTER)
    engine = r.get("Deployment", engine_name("smollm2"))
    for dep, grace, sleep in ((router, 60, 5), (engine, 120, 10)):
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert pod["terminationGracePeriodSeconds"] == grace
        assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": sleep}}
        assert flag(c["args"], "--shutdown-timeout") == str(grace - sleep - 5)
    r = helm.install(
        helm_merge(
            ci_values("cpu-quickstart"),
            {"routerSpec": {"terminationGracePeriodSeconds": 3, "preStopSleepSeconds": 0}},
        )
    )
    c = container(r.get("Deployment", ROUTER))
    assert "lifecycle" not in c
    assert flag(c["args"], "--shutdown-timeout") == "1"


def test_chart_readme_lists_every_value():
    readme = (CHART / "README.md").read_text()
    # Keys under free-form maps (labels, probes, resources, ...) are examples, not values.
    free_form = ("labels.", "resources.", "SecurityContext.", "securityContext.", "Probe.", "hosts[]", "podAnnotations.")
    missing = sorted(
        {p for p in _leaf_paths(default_values()) if not any(f in p for f in free_form)} - set(re.findall(r"`([A-Za-z][\w.\[\]]*)`", readme))
    )
    assert not missing, f"deploy/helm/switchyard/README.md does not list: {missing}"


def test_dockerfile_builds_the_image_the_chart_runs():
    text = (REPO_ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    stages: dict[str, list[str]] = {}  # stage name -> its lines, FROM first
    for ln in lines:
        if ln.upper().startswith("FROM "):
            current = stages.setdefault(ln.split()[-1], [])
        current.append(ln)
    assert list(stages) == ["builder", "runtime", "engine"], list(stages)
    assert stages["builder"][0] == "FROM rust:1-bookworm AS builder"
    assert any("cargo build --release --locked -p switchyard" in ln for ln in stages["builder"])
    assert stages["runtime"][0] == "FROM debian:bookworm-slim AS runtime"
    assert any("ca-certificates" in ln for ln in stages["runtime"])
    assert stages["engine"][0] == "FROM runtime AS engine"  # the default target: the last
    assert any("python3-pip" in ln for ln in stages["engine"])
    for name in ("runtime", "engine"):
        users = [ln.split()[1] for ln in stages[name] if ln.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name} runs as {users}"
        assert users[-1].split(":")[0].isdigit(), "runAsNonRoot needs a numeric USER"
    assert 'ENTRYPOINT ["switchyard"]' in stages["runtime"]
    assert "EXPOSE 8000" in stages["runtime"]
    # The user id the chart's securityContext asks for is the image's.
    values = default_values()
    uid = values["servingEngineSpec"]["switchyardSecurityContext"]["runAsUser"]
    assert uid == values["routerSpec"]["securityContext"]["runAsUser"]
    assert re.search(rf"useradd\b[^\n]*--uid {uid}\b", text), "the image's user id differs from the chart's runAsUser"
    assert users[-1] == f"{uid}:{uid}"
    # The GGUF the chart's default model points at is the one the engine image ships.
    model_url = values["servingEngineSpec"]["modelSpec"][0]["modelURL"]
    assert model_url in text, f"{model_url} is not where the Dockerfile puts SmolLM2"
    ignore = (REPO_ROOT / ".dockerignore").read_text().split()
    assert "target" in ignore or "target/" in ignore or "/target" in ignore
