"""GET /metrics: valid Prometheus text with vLLM's metric names, and counters
that move by exactly what the requests made.

prometheus_client's parser names a counter family without its `_total`
suffix (family `vllm:generation_tokens`, sample `vllm:generation_tokens_total`),
so families are looked up by their stripped name and samples by their full one.
"""

from __future__ import annotations

import math
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL

LABELS = {"engine": "0", "model_name": MODEL}

GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
COUNTERS = [
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:request_success",
    "vllm:num_preemptions",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
]
HISTOGRAMS = [
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
]
FINISHED_REASONS = ["stop", "length", "abort"]


class Scrape:
    def __init__(self, text: str):
        self.text = text
        # list() forces the lazy parser over the whole text, so a bad line raises here.
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def family(self, name: str):
        assert name in self.families, f"metric family {name} missing; have {sorted(self.families)}"
        return self.families[name]

    def value(self, family: str, sample: str, **labels: str) -> float:
        want = {**LABELS, **labels}
        found = [
            s.value
            for s in self.family(family).samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in want.items())
        ]
        assert len(found) == 1, f"expected one {sample}{want}, found {len(found)}"
        return found[0]

    def counter(self, name: str, **labels: str) -> float:
        return self.value(name, f"{name}_total", **labels)

    def hist_count(self, name: str) -> float:
        return self.value(name, f"{name}_count")

    def success(self, reason: str) -> float:
        return self.counter("vllm:request_success", finished_reason=reason)


def scrape(engine) -> Scrape:
    status, text = engine.get("/metrics")
    assert status == 200
    return Scrape(text)


def wait_idle(engine, timeout: float = 10.0) -> Scrape:
    """The scrape once nothing is running or waiting (earlier tests' requests have drained)."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(engine)
        busy = s.value("vllm:num_requests_running", "vllm:num_requests_running") + s.value(
            "vllm:num_requests_waiting", "vllm:num_requests_waiting"
        )
        if busy == 0:
            return s
        assert time.monotonic() < deadline, f"engine still busy after {timeout}s"
        time.sleep(0.02)


def settle(engine, ready, timeout: float = 5.0) -> Scrape:
    """Metrics are recorded as the engine finishes a request, which may land just
    after the client has its response: poll briefly until `ready(scrape)` holds,
    then return that scrape (the caller asserts exact values on it)."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(engine)
        if ready(s) or time.monotonic() >= deadline:
            return s
        time.sleep(0.02)


# --------------------------------------------------------------------------- format


def test_metrics_endpoint_is_prometheus_text(engine):
    import urllib.request

    with urllib.request.urlopen(f"{engine.url}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers.get("Content-Type", "").startswith("text/plain")
        text = resp.read().decode("utf-8")
    families = list(text_string_to_metric_families(text))
    assert families, "no metric families parsed"


def test_vllm_metric_names_and_types(engine):
    s = scrape(engine)
    for name in GAUGES:
        assert s.family(name).type == "gauge", name
        s.value(name, name)
    for name in COUNTERS:
        fam = s.family(name)
        assert fam.type == "counter", name
        assert fam.samples, name
        assert all(sample.name == f"{name}_total" for sample in fam.samples), [x.name for x in fam.samples]
    for name in HISTOGRAMS:
        assert s.family(name).type == "histogram", name
    for reason in FINISHED_REASONS:
        s.success(reason)  # each finished_reason series exists from the start, like vLLM's


def test_histograms_are_well_formed(engine, client):
    client.completions.create(model=MODEL, prompt="warm up", max_tokens=3, extra_body={"ignore_eos": True})
    s = wait_idle(engine)
    for name in HISTOGRAMS:
        fam = s.family(name)
        buckets = [x for x in fam.samples if x.name == f"{name}_bucket" and x.labels.get("model_name") == MODEL]
        assert buckets, f"{name} has no buckets"
        bounds = [float(b.labels["le"]) for b in buckets]
        assert bounds == sorted(bounds), f"{name} buckets out of order"
        assert math.isinf(bounds[-1]), f"{name} lacks a +Inf bucket"
        counts = [b.value for b in buckets]
        assert all(a <= b for a, b in zip(counts, counts[1:])), f"{name} buckets are not cumulative"
        assert counts[-1] == s.hist_count(name), f"{name}: +Inf bucket != _count"
        assert s.value(name, f"{name}_sum") >= 0
        assert s.hist_count(name) > 0


# --------------------------------------------------------------------------- counters move


def test_counters_advance_by_request_totals(engine, client):
    before = wait_idle(engine)

    sizes = [5, 7, 9, 11]
    prompt_tokens = 0
    eos = {"ignore_eos": True}
    msgs = [{"role": "user", "content": "Count to ten."}]

    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=sizes[0], extra_body=eos)
    assert r.usage.completion_tokens == sizes[0]
    prompt_tokens += r.usage.prompt_tokens

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=sizes[1],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=eos,
        )
    )
    assert chunks[-1].usage.completion_tokens == sizes[1]
    prompt_tokens += chunks[-1].usage.prompt_tokens

    r = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=sizes[2], extra_body=eos)
    assert r.usage.completion_tokens == sizes[2]
    prompt_tokens += r.usage.prompt_tokens

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Three, four,",
            max_tokens=sizes[3],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=eos,
        )
    )
    assert chunks[-1].usage.completion_tokens == sizes[3]
    prompt_tokens += chunks[-1].usage.prompt_tokens

    n = len(sizes)
    after = settle(
        engine,
        lambda s: s.success("length") - before.success("length") >= n
        and s.hist_count("vllm:e2e_request_latency_seconds") - before.hist_count("vllm:e2e_request_latency_seconds") >= n,
    )

    def delta(fn):
        return fn(after) - fn(before)

    assert delta(lambda s: s.counter("vllm:generation_tokens")) == sum(sizes)
    assert delta(lambda s: s.counter("vllm:prompt_tokens")) == prompt_tokens
    assert delta(lambda s: s.success("length")) == n
    assert delta(lambda s: s.success("stop")) == 0
    assert delta(lambda s: s.success("abort")) == 0
    assert delta(lambda s: s.hist_count("vllm:time_to_first_token_seconds")) == n
    assert delta(lambda s: s.hist_count("vllm:e2e_request_latency_seconds")) == n
    assert delta(lambda s: s.hist_count("vllm:request_queue_time_seconds")) == n
    # One inter-token gap per output token after the first.
    assert delta(lambda s: s.hist_count("vllm:inter_token_latency_seconds")) == sum(k - 1 for k in sizes)
    assert delta(lambda s: s.value("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_sum")) > 0
    assert after.value("vllm:num_requests_running", "vllm:num_requests_running") == 0


def test_rejected_requests_are_not_counted(engine, client):
    before = wait_idle(engine)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-5)
    # A good request afterwards gives the engine's stats a point to settle on.
    client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"ignore_eos": True})
    after = settle(engine, lambda s: s.success("length") > before.success("length"))
    for reason in FINISHED_REASONS + ["error"]:
        expected = 1 if reason == "length" else 0
        assert after.success(reason) - before.success(reason) == expected, reason
    assert after.counter("vllm:generation_tokens") - before.counter("vllm:generation_tokens") == 2
    assert after.hist_count("vllm:time_to_first_token_seconds") - before.hist_count("vllm:time_to_first_token_seconds") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_stop_string_counts_as_stop(engine, client, stream):
    msgs = [{"role": "user", "content": "Say something."}]
    common = dict(model=MODEL, messages=msgs, max_tokens=40, seed=11, temperature=0, extra_body={"ignore_eos": True})
    free = client.chat.completions.create(**common).choices[0].message.content
    words = free.split()
    stop = " " + words[len(words) // 2]
    assert free.find(stop) > 0

    rounds = 3  # a miscount would be a race: several tries make it show
    before = wait_idle(engine)
    completion_tokens = 0
    for _ in range(rounds):
        if stream:
            chunks = list(
                client.chat.completions.create(
                    **common, stop=[stop], stream=True, stream_options={"include_usage": True}
                )
            )
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            completion_tokens += chunks[-1].usage.completion_tokens
        else:
            resp = client.chat.completions.create(**common, stop=[stop])
            finish = [resp.choices[0].finish_reason]
            completion_tokens += resp.usage.completion_tokens
        assert finish == ["stop"]

    finished_before = sum(before.success(r) for r in FINISHED_REASONS)
    settle(engine, lambda s: sum(s.success(r) for r in FINISHED_REASONS) >= finished_before + rounds)
    after = wait_idle(engine)
    assert after.success("stop") - before.success("stop") == rounds
    assert after.success("abort") - before.success("abort") == 0
    assert after.success("length") - before.success("length") == 0
    # Like vLLM: tokens generated past the stop string are not output, and not counted.
    assert after.counter("vllm:generation_tokens") - before.counter("vllm:generation_tokens") == completion_tokens
