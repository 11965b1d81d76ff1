"""The official `openai` Python client against a running sim engine.

The sim backend is deterministic for a given seed and prompt, so a streamed
response must spell exactly the text of the same request made without
streaming, and a stop string can be chosen from text generated beforehand.
"""

from __future__ import annotations

import openai
import pytest

from conftest import MODEL

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a few things you can see from a train window."},
]
PROMPT = "The quick brown fox jumps over the lazy dog because"
IGNORE_EOS = {"ignore_eos": True}


# --------------------------------------------------------------------------- helpers


def chat(client, stream=False, **kwargs):
    params = dict(model=MODEL, messages=CHAT_MESSAGES, temperature=0, seed=1234, max_tokens=16, extra_body=IGNORE_EOS)
    params.update(kwargs)
    if stream:
        params.update(stream=True, stream_options={"include_usage": True})
    return client.chat.completions.create(**params)


def complete(client, stream=False, **kwargs):
    params = dict(model=MODEL, prompt=PROMPT, temperature=0, seed=1234, max_tokens=16, extra_body=IGNORE_EOS)
    params.update(kwargs)
    if stream:
        params.update(stream=True, stream_options={"include_usage": True})
    return client.completions.create(**params)


def collect_chat_stream(stream):
    """Returns (chunks, concatenated content) and checks the invariants every stream shares."""
    chunks = list(stream)
    assert chunks, "stream produced no chunks"
    ids = {c.id for c in chunks}
    assert len(ids) == 1, f"chunks carry different ids: {ids}"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.model == MODEL for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks, content


def collect_completion_stream(stream):
    chunks = list(stream)
    assert chunks, "stream produced no chunks"
    ids = {c.id for c in chunks}
    assert len(ids) == 1, f"chunks carry different ids: {ids}"
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text or "" for c in chunks if c.choices)
    return chunks, text


def check_stream_tail(chunks, *, finish_reason, completion_tokens, prompt_tokens):
    """Exactly one choice chunk finishes; then one usage-only chunk closes the stream."""
    finished = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason is not None]
    assert len(finished) == 1, f"expected exactly one chunk with finish_reason, got {len(finished)}"
    assert chunks[finished[0]].choices[0].finish_reason == finish_reason

    last = chunks[-1]
    assert last.choices == [], "the usage chunk must carry no choices"
    assert last.usage is not None, "include_usage: the final chunk must carry usage"
    assert finished[0] < len(chunks) - 1, "the finish chunk must come before the usage chunk"
    assert last.usage.completion_tokens == completion_tokens
    assert last.usage.prompt_tokens == prompt_tokens
    assert last.usage.total_tokens == prompt_tokens + completion_tokens
    assert all(c.usage is None for c in chunks[:-1]), "only the final chunk may carry usage"


def pick_stop_string(text: str) -> str:
    """A word (with its leading space) from the middle of `text` that does not occur at its very start."""
    words = text.split()
    assert len(words) >= 8, f"need more text to pick a stop string from: {text!r}"
    middle = len(words) // 2
    for word in words[middle:] + words[:middle]:
        stop = " " + word
        if text.find(stop) > 0:
            return stop
    raise AssertionError(f"no usable stop string in {text!r}")


# --------------------------------------------------------------------------- models


def test_models_lists_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


# --------------------------------------------------------------------------- chat


def test_chat_non_streaming(client):
    resp = chat(client, max_tokens=16)
    assert resp.object == "chat.completion"
    assert resp.model == MODEL
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.completion_tokens == 16
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 16


def test_chat_streaming_matches_non_streaming(client):
    n = 24
    plain = chat(client, max_tokens=n, seed=99)
    chunks, content = collect_chat_stream(chat(client, stream=True, max_tokens=n, seed=99))

    first = chunks[0]
    assert first.choices and first.choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 2, "content should arrive incrementally, over several chunks"
    check_stream_tail(
        chunks, finish_reason="length", completion_tokens=n, prompt_tokens=plain.usage.prompt_tokens
    )
    assert plain.usage.completion_tokens == n
    assert content == plain.choices[0].message.content


def test_chat_streaming_without_usage_has_no_usage_chunk(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT_MESSAGES, max_tokens=5, seed=5, temperature=0, stream=True, extra_body=IGNORE_EOS
    )
    chunks, content = collect_chat_stream(stream)
    assert content
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "length"


def test_seed_makes_output_deterministic(client):
    a = chat(client, seed=7, max_tokens=20).choices[0].message.content
    b = chat(client, seed=7, max_tokens=20).choices[0].message.content
    c = chat(client, seed=8, max_tokens=20).choices[0].message.content
    assert a == b
    assert a != c, "different seeds should give different text (else the stream comparisons prove little)"


# --------------------------------------------------------------------------- completions


def test_completion_non_streaming(client):
    resp = complete(client, max_tokens=12)
    assert resp.object == "text_completion"
    assert resp.model == MODEL
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert isinstance(choice.text, str) and choice.text.strip()
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_completion_streaming_matches_non_streaming(client):
    n = 20
    plain = complete(client, max_tokens=n, seed=42)
    chunks, text = collect_completion_stream(complete(client, stream=True, max_tokens=n, seed=42))

    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    assert len(text_chunks) >= 2, "text should arrive incrementally, over several chunks"
    check_stream_tail(
        chunks, finish_reason="length", completion_tokens=n, prompt_tokens=plain.usage.prompt_tokens
    )
    assert plain.usage.completion_tokens == n
    assert text == plain.choices[0].text


def test_completion_max_tokens_bounds_output_for_any_prompt(client):
    """max_tokens bounds the output regardless of prompt length."""
    short = complete(client, prompt="Hi", max_tokens=3)
    long = complete(client, prompt=PROMPT * 20, max_tokens=3)
    assert short.usage.completion_tokens == long.usage.completion_tokens == 3
    assert long.usage.prompt_tokens > short.usage.prompt_tokens
    assert not long.choices[0].text.startswith(PROMPT), "the prompt must not be echoed back"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_unknown_model_is_404(client, endpoint):
    call = chat if endpoint == "chat" else complete
    with pytest.raises(openai.NotFoundError) as info:
        call(client, model="no-such-model")
    err = info.value
    assert err.status_code == 404
    body = err.response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == "NotFoundError"
    assert body["error"]["code"] == 404
    assert "no-such-model" in body["error"]["message"]
    # The client unwraps the "error" object into .body.
    assert err.body["type"] == "NotFoundError"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_negative_max_tokens_is_400(client, endpoint):
    call = chat if endpoint == "chat" else complete
    with pytest.raises(openai.BadRequestError) as info:
        call(client, max_tokens=-5)
    err = info.value
    assert err.status_code == 400
    error = err.response.json()["error"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    assert "max_tokens" in f"{error.get('param')} {error['message']}"


def test_engine_serves_after_errors(client):
    with pytest.raises(openai.BadRequestError):
        chat(client, max_tokens=-5)
    resp = chat(client, max_tokens=4)
    assert resp.usage.completion_tokens == 4


# --------------------------------------------------------------------------- stop strings


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_stop_string(client, endpoint, stream):
    n = 48
    seed = 2024
    if endpoint == "chat":
        free = chat(client, max_tokens=n, seed=seed).choices[0].message.content
    else:
        free = complete(client, max_tokens=n, seed=seed).choices[0].text
    stop = pick_stop_string(free)
    expected = free[: free.index(stop)]
    assert expected, "the stop string must leave some text before it"

    if endpoint == "chat":
        if stream:
            chunks, text = collect_chat_stream(chat(client, stream=True, max_tokens=n, seed=seed, stop=[stop]))
        else:
            resp = chat(client, max_tokens=n, seed=seed, stop=[stop])
            text = resp.choices[0].message.content
    else:
        if stream:
            chunks, text = collect_completion_stream(complete(client, stream=True, max_tokens=n, seed=seed, stop=[stop]))
        else:
            resp = complete(client, max_tokens=n, seed=seed, stop=[stop])
            text = resp.choices[0].text

    assert stop not in text
    assert text == expected, f"stop={stop!r}: output should be the unconstrained text up to the stop string"

    if stream:
        finished = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
        assert len(finished) == 1
        choice = finished[0].choices[0]
        usage = chunks[-1].usage
    else:
        choice = resp.choices[0]
        usage = resp.usage
    assert choice.finish_reason == "stop"
    # vLLM extension: which stop string ended the request.
    assert getattr(choice, "stop_reason", None) == stop
    assert usage is not None and 0 < usage.completion_tokens < n


# --------------------------------------------------------------------------- ignore_eos


@pytest.fixture(scope="module")
def eos_client(engine_factory):
    """An engine whose sim ends each sequence with probability 0.2 per token."""
    return engine_factory("--sim-eos-prob", "0.2").client()


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_ignore_eos(eos_client, endpoint):
    n = 64  # P(no EOS in 64 tokens at p=0.2) ~ 6e-7, for each seed
    call = chat if endpoint == "chat" else complete
    for seed in (1, 2, 3):
        ended = call(eos_client, max_tokens=n, seed=seed, extra_body={})
        full = call(eos_client, max_tokens=n, seed=seed, extra_body={"ignore_eos": True})
        assert ended.choices[0].finish_reason == "stop"
        assert getattr(ended.choices[0], "stop_reason", None) is None, "EOS is not a stop string"
        assert ended.usage.completion_tokens < n
        assert full.choices[0].finish_reason == "length"
        assert full.usage.completion_tokens == n
        ended_text = ended.choices[0].message.content if endpoint == "chat" else ended.choices[0].text
        full_text = full.choices[0].message.content if endpoint == "chat" else full.choices[0].text
        assert full_text.startswith(ended_text), "same seed: ignoring EOS only lets the same text run on"
        assert len(full_text) > len(ended_text)


# --------------------------------------------------------------------------- n > 1


def _call_and_text(endpoint):
    if endpoint == "chat":
        return chat, (lambda c: c.message.content)
    return complete, (lambda c: c.text)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_n_choices_are_the_single_requests_seeded_seed_plus_index(client, endpoint):
    call, text = _call_and_text(endpoint)
    resp = call(client, n=3, seed=500, temperature=1.0, max_tokens=12)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in resp.choices)
    singles = [call(client, seed=500 + i, temperature=1.0, max_tokens=12) for i in range(3)]
    assert [text(c) for c in resp.choices] == [text(s.choices[0]) for s in singles]
    assert len({text(c) for c in resp.choices}) == 3, "seeded choices differ from one another"
    # The prompt counts once; completion tokens add up over the choices.
    assert resp.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert resp.usage.completion_tokens == 36
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 36


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_n_streamed_choices_spell_the_plain_ones_and_each_finish(client, endpoint):
    call, text = _call_and_text(endpoint)
    chunks = list(call(client, stream=True, n=2, seed=77, temperature=1.0, max_tokens=10))
    assert len({c.id for c in chunks}) == 1
    got, finish, roles = {0: "", 1: ""}, {}, []
    for c in chunks:
        for ch in c.choices:
            if endpoint == "chat":
                got[ch.index] += ch.delta.content or ""
                if ch.delta.role == "assistant":
                    roles.append(ch.index)
            else:
                got[ch.index] += ch.text or ""
            if ch.finish_reason:
                assert ch.index not in finish, "a choice finished twice"
                finish[ch.index] = ch.finish_reason
    assert finish == {0: "length", 1: "length"}
    if endpoint == "chat":
        assert sorted(roles) == [0, 1], "a role chunk opens each choice"
    plain = call(client, n=2, seed=77, temperature=1.0, max_tokens=10)
    assert [got[0], got[1]] == [text(c) for c in plain.choices]
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens == 20
    assert chunks[-1].usage is not None, "the usage chunk comes last"


@pytest.mark.parametrize("n", [0, 129])
def test_n_out_of_range_is_400(client, n):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, n=n)
    error = info.value.response.json()["error"]
    assert error["code"] == 400
    assert error["message"].startswith(f"n must be at {'least 1' if n < 1 else 'most 128'}, got {n}.")


# --------------------------------------------------------------------------- logprobs


def test_sim_logprobs_are_its_uniform_distribution(client):
    """With EOS ignored the sim picks each of its words alike: every token has the same
    log-probability, the top entries share it, and streaming reports the same values."""
    resp = chat(client, seed=11, temperature=1.0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 8
    lp = content[0].logprob
    assert lp < 0
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    for e in content:
        assert e.logprob == pytest.approx(lp)
        assert len(e.top_logprobs) == 3
        assert all(t.logprob == pytest.approx(lp) for t in e.top_logprobs)
    chunks = list(chat(client, stream=True, seed=11, temperature=1.0, max_tokens=8, logprobs=True, top_logprobs=3))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
