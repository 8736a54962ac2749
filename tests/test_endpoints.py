"""Several endpoints of one model: --base_url and --vlm_base_url repeatable.

The requests go to the endpoint with the fewest in flight; one that stops answering is set aside with one
warning line and its work goes to the others; with none left for --give_up_after seconds the stage gives up
(exit 1). Each endpoint is checked at startup and has its own rate limiter. The vision captions are seeded, so only
merges run, and --model_id names no model, which proves that none is loaded.
"""
from __future__ import annotations

import asyncio
import re
import types
from pathlib import Path

import pytest

import enhance_captions as ec
from tests.conftest import caches, free_port, make_dataset, run_cli, run_main, user_message
from tests.llm_server import FakeLLMServer, default_reply_text, sha12, stop_after

SUBJECT = re.compile(r"subject(\d+), photo number \1")
SECRET = "sk-test-endpoints-DO-NOT-LEAK-7731"


def merge_args(tmp_path: Path, *servers, extra=()) -> list[str]:
    """Merges only: the dataset's vision captions are seeded, and --model_id names no model."""
    args = ["--dataset_dir", tmp_path / "ds", "--model_id", tmp_path / "no-such-model", "--model", "test-model"]
    for server in servers:
        args += ["--base_url", server if isinstance(server, str) else server.base_url]
    return [str(a) for a in args + list(extra)]


def seeded_dataset(tmp_path: Path, n: int) -> list[Path]:
    images = make_dataset(tmp_path / "ds", n)
    for i, image in enumerate(images):
        caches(image)[0].write_text(f"a seeded vision caption number {i}\n", encoding="utf-8")
    return images




def subject_of(request: dict) -> int | None:
    match = SUBJECT.search(user_message(request))
    return int(match.group(1)) if match else None


def combined_text(image: Path) -> str | None:
    path = caches(image)[1]
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


def assert_each_is_its_own_reply(images, requests, only_written: bool = False) -> int:
    """Each image's combined caption is the fake server's reply to a request that carried that image's captions."""
    written = 0
    for i, image in enumerate(images):
        text = combined_text(image)
        if text is None and only_written:
            continue
        asked = [r for r in requests if subject_of(r) == i]
        assert asked, image
        assert text == " ".join(default_reply_text(asked[0]).split()), image
        assert f"a seeded vision caption number {i}" in text
        written += 1
    return written


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: endpoint")]


# --------------------------------------------------------------------------------------------
# The work is shared
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_endpoints_share_the_requests_and_every_image_is_merged_once(tmp_path, capsys):
    images = seeded_dataset(tmp_path, 20)
    with FakeLLMServer(latency=0.05) as one, FakeLLMServer(latency=0.05) as two:
        code, out, err = run_main(capsys, *merge_args(tmp_path, one, two, extra=["--concurrency", "4"]))
        first, second = one.chat_requests(), two.chat_requests()
    assert code == 0, err
    assert 7 <= len(first) <= 13 and 7 <= len(second) <= 13, (len(first), len(second))  # fewest in flight first
    assert sorted(subject_of(r) for r in first + second) == list(range(20))  # each image asked once, somewhere
    assert assert_each_is_its_own_reply(images, first + second) == 20
    assert "llm: 20 done, 0 from cache, 0 failed" in out
    assert f"endpoints {one.base_url}, {two.base_url} model test-model" in err
    assert not warning_lines(err) and not (tmp_path / "no-such-model").exists()


# --------------------------------------------------------------------------------------------
# An endpoint that stops answering is set aside; none left ends the run
# --------------------------------------------------------------------------------------------


def test_an_endpoint_killed_mid_run_is_set_aside_and_its_work_goes_to_the_other(tmp_path, capsys):
    images = seeded_dataset(tmp_path, 20)
    with FakeLLMServer(latency=0.05) as doomed, FakeLLMServer(latency=0.05) as steady:
        doomed.reply = stop_after(doomed, 3)
        doomed_url = doomed.base_url
        code, out, err = run_main(capsys, *merge_args(tmp_path, doomed, steady, extra=["--concurrency", "4"]))
        lost, kept = doomed.chat_requests(), steady.chat_requests()
    assert code == 0, err
    assert "FAILED" not in err and "llm: 20 done, 0 from cache, 0 failed" in out
    warnings = warning_lines(err)
    assert len(warnings) == 1 and doomed_url in warnings[0] and "set aside" in warnings[0], err
    assert len(kept) >= 20 - 3  # everything the doomed server did not answer went to the steady one
    assert assert_each_is_its_own_reply(images, lost + kept) == 20  # no request lost, none crossed


@pytest.mark.slow
def test_every_endpoint_down_gives_up_exit_1_and_a_rerun_does_the_rest(tmp_path, capsys):
    images = seeded_dataset(tmp_path, 20)
    with FakeLLMServer(latency=0.05) as one, FakeLLMServer(latency=0.05) as two:
        one.reply, two.reply = stop_after(one, 2), stop_after(two, 2)
        urls = (one.base_url, two.base_url)
        code, out, err = run_main(capsys, *merge_args(tmp_path, one, two, extra=["--concurrency", "4",
                                                                                 "--give_up_after", "1"]))
        requests = one.chat_requests() + two.chat_requests()
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--give_up_after 1" in errors[0] and all(url in errors[0] for url in urls), err
    assert "FAILED" not in err  # the images are not blamed for the endpoints
    done = assert_each_is_its_own_reply(images, requests, only_written=True)  # what was answered is kept
    assert 1 <= done < 20
    assert f"left for the next run: 0 to caption, {20 - done} to merge" in out
    with FakeLLMServer() as back:  # the rest was left for the next run, not failed
        code, out, err = run_main(capsys, *merge_args(tmp_path, back))
        assert code == 0, err
        assert len(back.chat_requests()) == 20 - done
    assert all(combined_text(image) for image in images)


class FakeChat:
    """An endpoint that fails while `down` (a 502, or no connection at all with `refused`)."""

    stage = "llm"

    def __init__(self, name: str):
        self.name, self.down, self.refused, self.sent = name, False, False, 0

    def _url(self) -> str:
        return f"http://{self.name}/v1"

    async def complete(self, messages):
        self.sent += 1
        if self.down:
            raise ec.EndpointDown("connection failed" if self.refused else "endpoint answered 502: Bad gateway.",
                                  self.refused)
        return ec.Reply(self.name, "stop")

    async def close(self):
        pass


def ask(pool, retries: int = 5):
    """One item through the one retry layer, without its backoff."""
    async def no_backoff(seconds):
        pass
    return ec.complete_item(pool, [], retries, sleep=no_backoff)


def test_an_endpoint_is_set_aside_after_three_failures_of_several_items_and_tried_again_later(monkeypatch):
    monkeypatch.setenv("ENHANCE_CAPTIONS_WAIT_SCALE", "0.01")  # set aside for 0.3 s, then 0.6 s
    warnings = []
    a, b = FakeChat("a"), FakeChat("b")

    async def scenario():
        pool = ec.EndpointPool([a, b], warn=warnings.append)
        a.down = True
        assert [await ask(pool) for _ in range(3)] == ["b"] * 3  # each request that failed on a is asked again on b
        assert a.sent == 3 and len(warnings) == 1 and "http://a/v1" in warnings[0] and "0.3 s" in warnings[0]
        assert [await ask(pool) for _ in range(4)] == ["b"] * 4 and a.sent == 3  # set aside: nothing goes to a
        await asyncio.sleep(0.35)  # back, on trial: one failure sets it aside again, for twice as long
        assert await ask(pool) == "b" and a.sent == 4 and len(warnings) == 2 and "0.6 s" in warnings[1]
        await asyncio.sleep(0.65)
        a.down = False
        assert await ask(pool) == "a" and pool.members[0].failures == 0  # answering again: back in the pool
        a.down = b.down = True
        with pytest.raises(ec.ItemError, match="http://a/v1"):  # the item's last attempt failed: it names where
            await ask(pool, retries=0)
        await pool.close()

    asyncio.run(scenario())


def test_one_item_failing_alone_does_not_set_its_endpoint_aside():
    """A request that a server cannot answer (a 500 for that input) fails its item, not the endpoint."""
    warnings = []
    a = FakeChat("a")

    async def scenario():
        pool = ec.EndpointPool([a], warn=warnings.append)
        a.down = True
        with pytest.raises(ec.ItemError, match="502"):
            await ask(pool, retries=5)
        assert a.sent == 6 and not warnings  # six failures in a row, all of one item
        a.down = False
        assert await ask(pool) == "a"
        await pool.close()

    asyncio.run(scenario())


def test_with_every_endpoint_set_aside_requests_wait_and_the_stage_gives_up_naming_each():
    a, b = FakeChat("a"), FakeChat("b")
    a.down = b.down = a.refused = b.refused = True  # no connection: set aside at once, for 30 s

    async def scenario():
        pool = ec.EndpointPool([a, b], warn=lambda line: None, give_up_after=0.3)
        with pytest.raises(ec.GaveUp) as given_up:
            await ask(pool, retries=5)
        await pool.close()
        return str(given_up.value)

    line = asyncio.run(scenario())
    assert a.sent == b.sent == 1  # one request each; the waiting spent no attempts
    assert "http://a/v1 (connection failed)" in line and "http://b/v1 (connection failed)" in line
    assert "--give_up_after 0.3" in line


# --------------------------------------------------------------------------------------------
# The startup check runs against each endpoint
# --------------------------------------------------------------------------------------------


def test_a_second_endpoint_that_does_not_serve_the_model_is_exit_2_naming_it(tmp_path, capsys):
    seeded_dataset(tmp_path, 2)
    with FakeLLMServer() as good, FakeLLMServer(models=("other-model",), unknown_model=404) as other:
        code, out, err = run_main(capsys, *merge_args(tmp_path, good, other))
        assert code == 2
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and other.base_url in lines[0] and "--model 'test-model'" in lines[0], err
        assert good.base_url not in lines[0]
        assert good.chat_requests() == []  # nothing merged before every endpoint passed


def test_a_second_endpoint_on_a_closed_port_is_exit_2_naming_it(tmp_path, capsys):
    seeded_dataset(tmp_path, 2)
    closed = f"http://127.0.0.1:{free_port()}/v1"
    with FakeLLMServer() as good:
        code, out, err = run_main(capsys, *merge_args(tmp_path, good, closed))
        assert code == 2
        assert f"error: cannot reach the endpoint {closed}" in err
        assert good.chat_requests() == []


def test_the_endpoints_model_comes_from_the_first_and_each_other_is_checked_for_it(tmp_path, capsys):
    images = seeded_dataset(tmp_path, 4)
    with FakeLLMServer(models=("solo",), unknown_model=404) as one, \
            FakeLLMServer(models=("solo", "more"), unknown_model=404) as two:
        args = [a for a in merge_args(tmp_path, one, two) if a not in ("--model", "test-model")]
        code, out, err = run_main(capsys, *args)
        requests = one.chat_requests() + two.chat_requests()
    assert code == 0, err
    assert {r["model"] for r in requests} == {"solo"} and len(requests) == 4
    assert assert_each_is_its_own_reply(images, requests) == 4


# --------------------------------------------------------------------------------------------
# Configuration: per-endpoint limits, the environment, keys
# --------------------------------------------------------------------------------------------


def config(tmp_path: Path, *args: str) -> ec.Config:
    make_dataset(tmp_path / "ds", 1)
    return ec.config_from_args(ec.build_parser().parse_args(["--dataset_dir", str(tmp_path / "ds"), *args]))


@pytest.mark.parametrize("processes, share", [(1, 6), (2, 3)])
def test_rpm_and_tpm_hold_per_endpoint_and_each_has_its_own_pause(tmp_path, processes, share):
    cfg = config(tmp_path, "--base_url", "http://127.0.0.1:1/v1", "--base_url", "http://127.0.0.1:2/v1",
                 "--model", "m", "--rpm", "6", "--tpm", "600")
    pool = ec.make_chat(cfg, types.SimpleNamespace(process_index=0, num_processes=processes))
    try:
        assert isinstance(pool, ec.EndpointPool)
        limiters = [m.chat.limiter for m in pool.members]
        assert [(limiter.requests, limiter.tokens) for limiter in limiters] == [(share, 600 // processes)] * 2
        if processes > 1:  # a 429's Retry-After pauses its own endpoint, in every process, not the other one
            paths = [limiter.shared.path for limiter in limiters]
            assert len(set(paths)) == 2 and all(p.parent == cfg.dataset_dir for p in paths)
    finally:
        asyncio.run(pool.close())
    single = ec.make_chat(config(tmp_path, "--base_url", "http://127.0.0.1:1/v1", "--model", "m", "--rpm", "6"),
                          types.SimpleNamespace(process_index=0, num_processes=1))
    assert isinstance(single, ec.EndpointPool) and len(single.members) == 1  # one endpoint: a pool of one
    assert single.members[0].chat.limiter.requests == 6
    asyncio.run(single.close())


@pytest.mark.parametrize("value", ["http://127.0.0.1:1/v1,http://127.0.0.1:2/v1",
                                   " http://127.0.0.1:1/v1  http://127.0.0.1:2/v1\n",
                                   "http://127.0.0.1:1/v1, http://127.0.0.1:2/v1"])
def test_openai_base_url_may_hold_several_urls(tmp_path, monkeypatch, value):
    monkeypatch.setenv("OPENAI_BASE_URL", value)
    assert config(tmp_path).base_url == ("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1")
    assert config(tmp_path, "--base_url", "http://127.0.0.1:3/v1").base_url == ("http://127.0.0.1:3/v1",)


def test_the_same_endpoint_twice_is_exit_2(tmp_path, capsys):
    seeded_dataset(tmp_path, 1)
    code, out, err = run_main(capsys, *merge_args(tmp_path, "http://u:pw@127.0.0.1:9/v1", "http://u:pw@127.0.0.1:9/v1/"))
    assert code == 2 and "--base_url http://***@127.0.0.1:9/v1/ is given twice" in err and "pw" not in err


def test_openai_key_goes_only_to_vision_urls_that_share_an_llm_endpoints_origin(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    cfg = config(tmp_path, "--base_url", "http://127.0.0.1:1/v1", "--base_url", "http://127.0.0.1:2/v1",
                 "--vlm_base_url", "http://127.0.0.1:2/vision/v1", "--vlm_base_url", "http://127.0.0.1:3/v1",
                 "--vlm_model", "seer")
    assert cfg.vlm_api_keys == (SECRET, None)
    monkeypatch.setenv("VLM_API_KEY", "vision-key")
    assert config(tmp_path, "--vlm_base_url", "http://127.0.0.1:2/v1", "--vlm_base_url", "http://127.0.0.1:3/v1",
                  "--vlm_model", "seer").vlm_api_keys == ("vision-key", "vision-key")


# --------------------------------------------------------------------------------------------
# Several vision servers
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_vision_servers_both_caption(tmp_path):
    images = make_dataset(tmp_path / "ds", 8)
    with FakeLLMServer(latency=0.05) as v1, FakeLLMServer(latency=0.05) as v2, FakeLLMServer() as llm:
        result = run_cli("--dataset_dir", tmp_path / "ds", "--model_id", tmp_path / "no-such-model",
                         "--vlm_base_url", v1.base_url, "--vlm_base_url", v2.base_url, "--vlm_model", "test-model",
                         "--base_url", llm.base_url, "--model", "test-model", "--concurrency", "4")
        vision = v1.chat_requests() + v2.chat_requests()
        assert result.returncode == 0, result.stderr[-3000:]
        assert v1.chat_requests() and v2.chat_requests()
        assert len(llm.chat_requests()) == 8
    assert len(vision) == 8
    sent = {"VISION " + sha12(part["image_url"]["url"]) for r in vision for m in r["messages"]
            if isinstance(m["content"], list) for part in m["content"] if part.get("type") == "image_url"}
    generated = {caches(image)[0].read_text(encoding="utf-8").strip() for image in images}
    assert generated == sent and len(generated) == 8  # each image's caption answers its own request
    assert f"served test-model at {v1.base_url}, {v2.base_url}" in result.stderr + result.stdout
    assert not (tmp_path / "no-such-model").exists()
