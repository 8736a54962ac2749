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
        ec.wait_scale.cache_clear()
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


class RefusedChat:
    """An endpoint that cannot be reached at all: set aside at its first refused connection."""

    def _url(self) -> str:
        return "http://down/v1"

    async def complete(self, messages):
        raise ec.EndpointDown("cannot connect", refused=True)


def test_the_pools_set_aside_is_scaled(monkeypatch):
    monkeypatch.setenv(ec.WAIT_SCALE_VARIABLE, "0.01")
    pool = ec.EndpointPool([RefusedChat()], warn=lambda _: None, clock=lambda: 0.0)
    with pytest.raises(ec.EndpointDown):
        asyncio.run(pool.complete([]))
    assert pool.members[0].back_at == pytest.approx(0.01 * ec.SET_ASIDE_SECONDS)


def test_the_limiters_retry_after_pause_is_scaled(monkeypatch):
    """A 429 with Retry-After: 100 pauses the limiter, and complete_item asks again once the pause is over. Scaled by
    0.0001 the pause is 10 ms; unscaled the request could not be answered within the deadline."""
    monkeypatch.setenv(ec.WAIT_SCALE_VARIABLE, "0.0001")
    with FakeLLMServer() as server:
        server.script(status(429, {"Retry-After": "100"}), reply("after the pause"))
        limiter = ec.RateLimiter()
        chat = ec.EndpointChat(server.base_url, None, "test-model", limiter, timeout=30, max_tokens=16,
                               temperature=0.0)
        pool = ec.EndpointPool([chat], warn=lambda _: None)

        async def ask():
            try:
                return await asyncio.wait_for(ec.complete_item(pool, [{"role": "user", "content": "hi"}], 1), 30)
            finally:
                await pool.close()

        answer = asyncio.run(ask())
    assert answer == "after the pause" and len(server.requests) == 2  # asked again after the pause
    assert limiter.paused_until > 0  # the limiter took the pause
