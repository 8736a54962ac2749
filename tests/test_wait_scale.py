"""ENHANCE_CAPTIONS_WAIT_SCALE: one factor, read from the environment, on every wait the script takes on its own
(backoffs, Retry-After pauses, set-aside endpoints). The tests run with it at conftest.WAIT_SCALE."""
from __future__ import annotations

import asyncio

import pytest

import enhance_captions as ec
from tests.llm_server import FakeLLMServer, reply, status


def test_the_scale_comes_from_the_environment_and_a_bad_value_warns_once_and_scales_nothing(monkeypatch, capsys):
    monkeypatch.delenv(ec.WAIT_SCALE_VARIABLE)
    assert ec.scaled_wait(30.0) == 30.0  # unset: the real waits
    monkeypatch.setenv(ec.WAIT_SCALE_VARIABLE, "0.01")
    assert ec.scaled_wait(30.0) == pytest.approx(0.3)
    monkeypatch.setenv(ec.WAIT_SCALE_VARIABLE, "0")
    assert ec.scaled_wait(30.0) == 0.0
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setattr(ec, "WAIT_SCALES", {})
        monkeypatch.setenv(ec.WAIT_SCALE_VARIABLE, bad)
        assert ec.scaled_wait(30.0) == ec.scaled_wait(30.0) == 30.0
        warned = [line for line in capsys.readouterr().err.splitlines() if ec.WAIT_SCALE_VARIABLE in line]
        assert len(warned) == 1 and repr(bad) in warned[0]


def test_complete_items_backoff_is_scaled(monkeypatch):
    sleeps: list[float] = []

    async def sleep(seconds):
        sleeps.append(seconds)

    class Stubborn:
        async def complete(self, messages):
            return ec.Reply("", "stop")  # empty: asked again after a backoff

    monkeypatch.setenv(ec.WAIT_SCALE_VARIABLE, "0.001")
    with pytest.raises(ec.ItemError):
        asyncio.run(ec.complete_item(Stubborn(), [], 4, sleep=sleep))
    assert len(sleeps) == 4 and max(sleeps) <= 0.001 * 30 * 1.5  # unscaled, the first alone is 0.25 s or more


class DownChat:
    """An endpoint that answers 502, spending one of the item's attempts per request as a real one does."""

    def _url(self) -> str:
        return "http://down/v1"

    async def complete(self, messages):
        ec.ATTEMPTS.get().left -= 1
        raise ec.EndpointDown("endpoint answered 502: Bad gateway.")


def test_the_pools_backoff_and_set_aside_are_scaled(monkeypatch):
    monkeypatch.setenv(ec.WAIT_SCALE_VARIABLE, "0.01")
    sleeps: list[float] = []

    async def sleep(seconds):
        sleeps.append(seconds)

    pool = ec.EndpointPool([DownChat()], warn=lambda _: None, clock=lambda: 0.0, sleep=sleep)

    async def ask():
        token = ec.ATTEMPTS.set(ec.Attempts(3, asyncio.Event()))
        try:
            await pool.complete([])
        finally:
            ec.ATTEMPTS.reset(token)

    with pytest.raises(ec.EndpointDown):  # three tries, two backoffs between them; the third sets it aside
        asyncio.run(ask())
    assert len(sleeps) == 2 and max(sleeps) <= 0.01 * 8 * 1.5
    assert pool.members[0].back_at == pytest.approx(0.01 * ec.SET_ASIDE_SECONDS)


def test_the_limiters_pause_and_the_openai_clients_own_retry_wait_are_scaled(tmp_path, monkeypatch):
    """A 429 with Retry-After: 100 pauses the limiter and makes the client wait before its own retry. Scaled by
    0.0001 both are 10 ms; unscaled the request could not be answered within the deadline."""
    monkeypatch.setenv(ec.WAIT_SCALE_VARIABLE, "0.0001")
    with FakeLLMServer() as server:
        server.script(status(429, {"Retry-After": "100"}), reply("after the pause"))
        limiter = ec.RateLimiter()
        chat = ec.EndpointChat(server.base_url, None, "test-model", limiter, max_retries=1, timeout=30,
                               max_tokens=16, temperature=0.0)

        async def ask():
            try:
                return await asyncio.wait_for(chat.complete([{"role": "user", "content": "hi"}]), 30)
            finally:
                await chat.close()

        answer = asyncio.run(ask())
    assert answer.text == "after the pause" and len(server.requests) == 2  # the client's own retry
    assert limiter.paused_until > 0  # the limiter took the pause too
