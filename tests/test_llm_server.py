"""Tests of the fake OpenAI chat-completions server, driven by the real openai client."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import openai
import pytest

try:
    from tests.llm_server import (FakeLLMServer, default_reply_text, hang, invalid_json, reply, reset,
                                  sha12, status)
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from llm_server import (FakeLLMServer, default_reply_text, hang, invalid_json, reply, reset,  # type: ignore
                            sha12, status)


def make_client(srv: FakeLLMServer, **kw) -> openai.OpenAI:
    kw.setdefault("api_key", "x")
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=srv.base_url, **kw)


def ask(client: openai.OpenAI, text: str = "hello", **kw):
    return client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": text}], **kw
    )


@pytest.fixture
def srv():
    with FakeLLMServer() as s:
        yield s


@pytest.fixture
def client(srv):
    c = make_client(srv)
    yield c
    c.close()


# ----------------------------------------------------------------------------- basics


def test_sha12():
    assert sha12("") == "da39a3ee5e6b"
    assert sha12("abc") == "a9993e364706"
    assert len(sha12("ü" * 100)) == 12


def test_base_url_is_loopback(srv):
    assert srv.base_url.startswith("http://127.0.0.1:")
    assert srv.base_url.endswith("/v1")
    assert srv.port > 0


def test_default_reply_format_and_tag(srv, client):
    text = "line one\nline two\n  caption, with ünïcode"
    r = ask(client, text)
    assert r.choices[0].message.content == "MERGED " + sha12(text) + " :: " + text.replace("\n", " ")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion"
    assert r.model == "test-model"
    assert r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # recorded request + headers
    assert len(srv.requests) == 1 and srv.chat_requests() == srv.requests
    assert srv.requests[0]["messages"][-1]["content"] == text
    assert srv.headers[0]["authorization"] == "Bearer x"
    assert srv.headers[0]["Authorization"] == "Bearer x"  # case-insensitive
    assert len(srv.request_times) == 1


def test_default_reply_uses_last_user_message(client):
    r = client.chat.completions.create(
        model="test-model",
        messages=[
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second"},
        ],
    )
    assert r.choices[0].message.content == f"MERGED {sha12('second')} :: second"


def test_vision_reply(client):
    url = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    r = client.chat.completions.create(
        model="test-model",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "image_url", "image_url": {"url": "data:other"}},
        ]}],
    )
    assert r.choices[0].message.content == "VISION " + sha12(url)


def test_default_reply_text_helper():
    assert default_reply_text({"messages": []}) == "MERGED da39a3ee5e6b :: "
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert default_reply_text(body) == f"MERGED {sha12('a' + chr(10) + 'b')} :: a b"


def test_reply_callable_override():
    def fn(body):
        return "custom:" + body["messages"][-1]["content"]

    with FakeLLMServer(reply=fn) as s, make_client(s) as c:
        assert ask(c, "zz").choices[0].message.content == "custom:zz"
        s.script(reply("scripted"))
        assert ask(c, "zz").choices[0].message.content == "scripted"


def test_reply_callable_dict_and_action():
    calls = []

    def fn(body):
        calls.append(body)
        if len(calls) == 1:
            return {"content": "cut", "finish_reason": "length"}
        return status(503)

    with FakeLLMServer(reply=fn) as s, make_client(s) as c:
        r = ask(c)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("cut", "length")
        with pytest.raises(openai.InternalServerError):
            ask(c)


# ----------------------------------------------------------------------------- actions


def test_status_429_retry_after(srv, client):
    srv.script(status(429, {"Retry-After": "1"}))
    with pytest.raises(openai.RateLimitError) as ei:
        ask(client)
    e = ei.value
    assert e.status_code == 429
    assert e.response.headers["retry-after"] == "1"
    assert e.body["code"] == "rate_limit_exceeded"  # the client unwraps {"error": ...}
    assert ask(client).choices[0].message.content.startswith("MERGED ")  # queue drained -> default
    assert srv.pending_actions == 0
    assert len(srv.requests) == 2


@pytest.mark.parametrize(
    "code, exc",
    [
        (500, openai.InternalServerError),
        (502, openai.InternalServerError),
        (503, openai.InternalServerError),
        (504, openai.InternalServerError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (400, openai.BadRequestError),
    ],
)
def test_status_codes(srv, client, code, exc):
    srv.script(status(code))
    with pytest.raises(exc) as ei:
        ask(client)
    assert ei.value.status_code == code
    assert isinstance(ei.value.body, dict) and ei.value.body["message"]


def test_status_custom_body_and_tuple_form(srv, client):
    srv.script(("status", 500, None, {"error": {"message": "boom", "type": "x", "code": "y"}}))
    with pytest.raises(openai.InternalServerError) as ei:
        ask(client)
    assert ei.value.body["message"] == "boom"


def test_script_is_fifo(srv, client):
    srv.script(status(500), reply("a"), ("reply", "b", "length"), "reset")
    with pytest.raises(openai.InternalServerError):
        ask(client)
    assert ask(client).choices[0].message.content == "a"
    r = ask(client)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("b", "length")
    with pytest.raises(openai.APIConnectionError):
        ask(client)
    assert ask(client, "q").choices[0].message.content == f"MERGED {sha12('q')} :: q"


def test_hang_times_out(srv):
    srv.script(hang(3))
    with make_client(srv, timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            ask(c)
        assert time.monotonic() - t0 < 2.5
        # the next request (new connection) is answered normally
        assert ask(c, "after").choices[0].message.content.endswith(":: after")


def test_hang_then_answers_normally(srv, client):
    srv.script(hang(0.3))
    t0 = time.monotonic()
    r = ask(client, "slow")
    assert time.monotonic() - t0 >= 0.3
    assert r.choices[0].message.content == f"MERGED {sha12('slow')} :: slow"


def test_reset_gives_connection_error(srv, client):
    srv.script(reset())
    with pytest.raises(openai.APIConnectionError) as ei:
        ask(client)
    assert not isinstance(ei.value, openai.APITimeoutError)
    assert ask(client).choices[0].message.content.startswith("MERGED ")


def test_invalid_json(srv, client):
    srv.script(invalid_json())
    # openai 3.x does not wrap this: the decoder's ValueError (JSONDecodeError) escapes as is
    with pytest.raises(ValueError) as ei:
        ask(client)
    assert not isinstance(ei.value, openai.OpenAIError)
    assert isinstance(ei.value, json.JSONDecodeError)
    assert ask(client).choices[0].message.content.startswith("MERGED ")


def test_invalid_json_is_not_retried(srv):
    srv.script(invalid_json(), invalid_json())
    with make_client(srv, max_retries=2) as c:
        with pytest.raises(ValueError):
            ask(c)
    assert len(srv.requests) == 1


def test_5xx_is_retried_by_client(srv):
    srv.script(status(503), status(500, {"Retry-After": "0.05"}))
    with make_client(srv, max_retries=2) as c:
        r = ask(c, "x")
    assert r.choices[0].message.content == f"MERGED {sha12('x')} :: x"
    assert len(srv.requests) == 3


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "stop"),
        ("I'm sorry, I can't help with that.", "stop"),
        ("<think>\nhmm\n</think>\nA cat on a mat.", "stop"),
        ("Sure! Here is the merged caption:\n\nA dog.", "stop"),
        ("A very long capt", "length"),
    ],
)
def test_reply_exact(srv, client, text, reason):
    srv.script(reply(text, finish_reason=reason))
    r = ask(client)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason


def test_reply_null_content(srv, client):
    srv.script(reply(None))
    assert ask(client).choices[0].message.content is None


def test_streaming(srv, client):
    srv.script(reply("streamed text", "length"))
    chunks = list(client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "s"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed text"
    assert chunks[-1].choices[0].finish_reason == "length"


# ----------------------------------------------------------------------------- auth / models / misc


def test_api_key_enforced():
    with FakeLLMServer(api_key="sekret") as s:
        s.script(reply("kept for the authorised request"))
        with make_client(s, api_key="wrong") as bad:
            with pytest.raises(openai.AuthenticationError) as ei:
                ask(bad)
            assert ei.value.status_code == 401
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with make_client(s, api_key="sekret") as good:
            assert ask(good).choices[0].message.content == "kept for the authorised request"
            assert [m.id for m in good.models.list()] == ["test-model"]
        assert len(s.requests) == 2  # unauthorised requests are recorded too


def test_models_list():
    with FakeLLMServer(models=("m1", "m2")) as s, make_client(s) as c:
        assert [m.id for m in c.models.list()] == ["m1", "m2"]
        assert c.models.retrieve("m2").owned_by == "test"
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("nope")
        assert s.requests == []


def test_unknown_path_404(srv):
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(srv.base_url + "/nope", timeout=5)
    assert ei.value.code == 404
    assert "error" in json.loads(ei.value.read())


def test_latency_and_concurrency():
    with FakeLLMServer(latency=0.3) as s, make_client(s) as c:
        results, errors = {}, []
        barrier = threading.Barrier(8)

        def work(i):
            try:
                barrier.wait(5)
                results[i] = ask(c, f"caption {i}").choices[0].message.content
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        elapsed = time.monotonic() - t0
        assert not errors
        assert s.max_in_flight >= 8
        assert elapsed < 2.0  # concurrent, not 8 * 0.3 serialised
        for i, text in results.items():
            assert text == f"MERGED {sha12(f'caption {i}')} :: caption {i}"
        assert len(s.requests) == len(s.request_times) == len(s.headers) == 8
        assert s.request_times == sorted(s.request_times)
        deadline = time.monotonic() + 5
        while s.in_flight and time.monotonic() < deadline:  # a handler counts down just after its reply is sent
            time.sleep(0.01)
        assert s.in_flight == 0


def test_many_concurrent_requests_fast():
    n = 100
    with FakeLLMServer(latency=0.2) as s, make_client(s) as c:
        errors = []

        def work(i):
            try:
                r = ask(c, f"x{i}")
                assert r.choices[0].message.content.endswith(f":: x{i}")
            except Exception as e:  # pragma: no cover
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        elapsed = time.monotonic() - t0
        assert not errors, errors[:3]
        assert len(s.requests) == n
        assert elapsed < 3.0, elapsed
        assert s.max_in_flight >= 50


def test_keep_alive_reuses_connection(srv, client):
    for i in range(5):
        ask(client, str(i))
    # the openai client pools connections: sequential requests share one source port
    assert len(srv.requests) == len(srv.peers) == 5
    assert len({port for _, port in srv.peers}) == 1
    assert all(host == "127.0.0.1" for host, _ in srv.peers)


def test_exit_does_not_hang_with_hanging_handler():
    s = FakeLLMServer()
    s.__enter__()
    s.script(hang(60))
    c = make_client(s, timeout=5)
    t = threading.Thread(target=lambda: pytest.raises(Exception, ask, c), daemon=True)
    t.start()
    deadline = time.monotonic() + 3
    while s.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.in_flight == 1
    t0 = time.monotonic()
    s.__exit__(None, None, None)
    assert time.monotonic() - t0 < 2.0
    t.join(5)
    assert not t.is_alive()
    c.close()
    # the port is closed afterwards
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
