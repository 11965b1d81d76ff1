"""The official `openai` client through the router, on a stack started by `switchyard up`."""

from __future__ import annotations

import pytest

from conftest import MODEL, _stop, start_switchyard


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("stack-logs")
    up = start_switchyard(
        ["up", "--backend", "sim", "--host", "127.0.0.1", "--port", "0", "--engines", "2", "--engine-arg=--time-scale=0.01"], log_dir
    )
    yield up
    _stop(up.proc)


def test_chat_and_completions_through_the_router(stack):
    client = stack.client()
    models = [m.id for m in client.models.list().data]
    assert models == [MODEL]

    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 6
    assert resp.choices[0].message.content

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage.completion_tokens == 5

    comp = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, extra_body={"ignore_eos": True})
    assert comp.usage.completion_tokens == 4 and comp.choices[0].text


def test_roundrobin_uses_both_engines_and_errors_pass_as_openai_errors(stack):
    client = stack.client()
    engines = set()
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        engines.add(raw.headers["x-switchyard-engine"])
        assert raw.headers.get("x-request-id")
    assert len(engines) == 2

    import openai

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
