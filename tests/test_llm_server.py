"""The fake server's behaviour that the script's tests rely on, driven by the real openai client: the default
reply each combined caption is compared with, scripted faults, the request log (bodies, keys, connections,
requests in flight), held requests, and a shutdown that never waits for a hanging handler."""

from __future__ import annotations

import socket
import threading

import openai
import pytest

from tests.llm_server import FakeLLMServer, default_reply_text, hang, invalid_json, reply, reset, sha12, status


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


def test_default_reply_tags_the_last_user_message_and_is_recorded(srv, client):
    text = "line one\nline two\n  caption, with ünïcode"
    r = client.chat.completions.create(model="test-model", messages=[
        {"role": "system", "content": "sys"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": text}])
    assert r.choices[0].message.content == "MERGED " + sha12(text) + " :: " + text.replace("\n", " ")
    assert r.choices[0].message.content == default_reply_text(srv.requests[0])
    assert r.choices[0].finish_reason == "stop" and r.usage.total_tokens > 0
    assert srv.chat_requests() == srv.requests and srv.requests[0]["messages"][-1]["content"] == text
    assert srv.headers[0]["Authorization"] == "Bearer x"  # case-insensitive
    assert len(srv.request_times) == len(srv.peers) == 1
    assert srv.base_url.startswith("http://127.0.0.1:") and srv.peers[0][0] == "127.0.0.1"


def test_vision_reply_tags_the_first_image(client):
    url = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    r = client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": [
        {"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": "data:other"}}]}])
    assert r.choices[0].message.content == "VISION " + sha12(url)


def test_reply_callable_answers_text_dicts_and_actions():
    answers = iter(["custom", {"content": "cut", "finish_reason": "length"}, status(503)])
    with FakeLLMServer(reply=lambda body: next(answers)) as s, make_client(s) as c:
        assert ask(c).choices[0].message.content == "custom"
        r = ask(c)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("cut", "length")
        with pytest.raises(openai.InternalServerError):
            ask(c)
        s.script(reply("scripted"))  # a scripted action comes before the callable
        assert ask(c).choices[0].message.content == "scripted"


def test_script_is_fifo_and_each_fault_is_what_the_client_sees(srv):
    srv.script(status(429, {"Retry-After": "1"}), status(400, body={"error": {"message": "boom"}}), reset(),
               invalid_json(), reply("", "length"), reply(None), hang(3))
    with make_client(srv, timeout=0.5) as c:
        with pytest.raises(openai.RateLimitError) as limited:
            ask(c)
        assert limited.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.BadRequestError) as bad:
            ask(c)
        assert bad.value.body["message"] == "boom"
        with pytest.raises(openai.APIConnectionError) as dropped:
            ask(c)
        assert not isinstance(dropped.value, openai.APITimeoutError)
        with pytest.raises(ValueError):  # openai 3.x lets the decoder's JSONDecodeError escape as it is
            ask(c)
        r = ask(c)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("", "length")
        assert ask(c).choices[0].message.content is None
        with pytest.raises(openai.APITimeoutError):
            ask(c)
        assert srv.pending_actions == 0
        assert ask(c, "q").choices[0].message.content == f"MERGED {sha12('q')} :: q"  # then the default reply
    assert len(srv.requests) == 8


def test_api_key_models_and_unknown_models():
    with FakeLLMServer(api_key="sekret", models=("m1", "m2"), unknown_model=404) as s:
        s.script(reply("kept for the authorised request"))
        with make_client(s, api_key="wrong") as bad:
            with pytest.raises(openai.AuthenticationError):
                ask(bad)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with make_client(s, api_key="sekret") as good:
            assert [m.id for m in good.models.list()] == ["m1", "m2"]
            with pytest.raises(openai.NotFoundError):
                ask(good)  # test-model is not served
            assert good.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}]) \
                .choices[0].message.content == "kept for the authorised request"
        assert len(s.requests) == 3  # refused requests are recorded too, and consume no action
    with FakeLLMServer(models=("pinned",), unknown_model=400) as s, make_client(s) as c:
        with pytest.raises(openai.BadRequestError):
            ask(c)


def test_held_requests_are_all_in_flight_at_once_until_released():
    """hold(): the concurrency tests count requests in flight at the server without a latency to wait out."""
    with FakeLLMServer() as s, make_client(s) as c:
        s.hold(after=1)
        assert ask(c, "first").choices[0].message.content.endswith(":: first")  # let through
        results: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: results.update({i: ask(c, f"x{i}").choices[0]
                                                                       .message.content})) for i in range(8)]
        for thread in threads:
            thread.start()
        deadline = threading.Event()
        for _ in range(600):  # until all eight are held
            if s.held == 8:
                break
            deadline.wait(0.05)
        assert s.held == 8 and s.in_flight == 8 and not results
        s.release()
        for thread in threads:
            thread.join(30)
        assert s.max_in_flight == 8 and s.held == 0
        assert results == {i: f"MERGED {sha12(f'x{i}')} :: x{i}" for i in range(8)}


def test_keep_alive_reuses_connection(srv, client):
    for i in range(5):
        ask(client, str(i))
    # one connection per client that asks one at a time: the tests tell processes apart by it
    assert len({port for _, port in srv.peers}) == 1


def test_stop_does_not_wait_for_a_hanging_or_held_handler():
    s = FakeLLMServer().start()
    s.script(hang(600))
    s.hold(after=1)
    c = make_client(s, timeout=600)
    errors: list[Exception] = []

    def asking():
        try:
            ask(c)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=asking, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(600):
        if s.in_flight == 2 and s.held == 1:
            break
        threading.Event().wait(0.05)
    assert s.in_flight == 2 and s.held == 1
    stopper = threading.Thread(target=s.stop)
    stopper.start()
    stopper.join(60)  # a deadline against a hang, far beyond the milliseconds it takes
    assert not stopper.is_alive()
    for t in threads:
        t.join(60)
    assert len(errors) == 2 and all(isinstance(e, openai.APIConnectionError) for e in errors)
    c.close()
    with pytest.raises(OSError):  # the port is closed afterwards
        socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
