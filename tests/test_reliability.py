"""Reliability: the LLM endpoint fails, the process dies, the input is bad; the report and the exit codes.

LLM-side tests run the script in-process (`ec.main([...])`) with the vision captions already cached, so no
vision model is loaded; kill, signal and lock tests run the real script in a subprocess (reruns in-process).
Replies of the fake server are scripted, so combined captions can be asserted verbatim; the tiny vision model's
words never are.
"""
from __future__ import annotations

import os
import re
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest

import enhance_captions as ec
from tests.conftest import (WAIT_SCALE, Cli, caches, lines_with, make_dataset, make_image, report_failures,
                            run_args, run_main, run_two_processes, seed_generated, user_message)
from tests.llm_server import default_reply_text, hang, invalid_json, reply, reset, sha12, status

SECRET = "sk-test-7f3a9c1e5b2d-DO-NOT-LEAK-0042"
SUBJECT = re.compile(r"subject(\d+), photo number \1")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------




def run_args_4(dataset, model, server, *extra):
    return run_args(dataset, model, server, *extra, batch_size=4)






def subject_of(request: dict) -> int | None:
    match = SUBJECT.search(user_message(request))
    return int(match.group(1)) if match else None


def default_text(request: dict) -> str:
    """What the combined cache holds when the fake server answered `request` with its default reply."""
    return " ".join(default_reply_text(request).split())




def combined_text(image: Path) -> str | None:
    path = caches(image)[1]
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


def tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


def assert_clean_final_state(ds: Path, images, requests) -> None:
    """Every image: non-empty caches; each combined cache answers its own image's request; no temporaries."""
    by_tag = {sha12(user_message(r)): r for r in requests}
    for i, image in enumerate(images):
        generated, combined = caches(image)
        gen_text = generated.read_text(encoding="utf-8").strip()
        comb_text = combined.read_text(encoding="utf-8").strip()
        assert gen_text and comb_text, image
        request = by_tag[comb_text.split()[1]]
        assert subject_of(request) == i
        assert gen_text in user_message(request)
        assert comb_text == default_text(request)
    assert tmp_files(ds) == []




# --------------------------------------------------------------------------------------------
# The LLM endpoint fails: transient failures are retried
# --------------------------------------------------------------------------------------------

TRANSIENT = {
    "429": lambda: status(429),
    "500": lambda: status(500),
    "502": lambda: status(502),
    "503": lambda: status(503),
    "504": lambda: status(504),
    "timeout": lambda: hang(6),
    "connection_reset": reset,
    "invalid_json": invalid_json,
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(TRANSIENT))
def test_transient_fault_then_success_is_retried_and_cached(tmp_path, capsys, model_dir, llm_server, fault):
    images = make_dataset(tmp_path / "ds", 2)
    seed_generated(images)
    llm_server.script(TRANSIENT[fault]())  # only the very first request fails
    code, out, err = run_main(capsys, *run_args_4(tmp_path / "ds", model_dir("florence2"), llm_server,
                                                "--concurrency", "1", "--max_retries", "2", "--timeout", "1.5"))
    assert code == 0, err
    requests = llm_server.chat_requests()
    assert len(requests) == 3  # two images, one of them asked twice
    assert user_message(requests[0]) == user_message(requests[1])  # the failed request was retried
    for i, image in enumerate(images):
        asked = [r for r in requests if subject_of(r) == i]
        assert combined_text(image) == default_text(asked[-1])
    assert "llm: 2 done, 0 from cache, 0 failed" in out
    assert "FAILED" not in err


PERSISTENT = {"500": lambda: status(500), "connection_reset": reset, "invalid_json": invalid_json}


@pytest.mark.parametrize("fault", list(PERSISTENT))
def test_persistent_fault_fails_only_that_item_after_backing_off(tmp_path, capsys, model_dir, llm_server, fault):
    images = make_dataset(tmp_path / "ds", 3)
    seed_generated(images)
    llm_server.reply = lambda body: PERSISTENT[fault]() if subject_of(body) == 1 else default_reply_text(body)
    report = tmp_path / "report.jsonl"
    code, out, err = run_main(capsys, *run_args_4(tmp_path / "ds", model_dir("florence2"), llm_server,
                                                "--concurrency", "2", "--max_retries", "3", "--report", report))
    assert code == 1, err
    requests = llm_server.chat_requests()
    tries = [t for r, t in zip(requests, llm_server.request_times) if subject_of(r) == 1]
    assert len(tries) == 4  # --max_retries 3: the first try and three retries, then it is given up
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    for n, gap in enumerate(gaps):  # exponential backoff: every wait at least double the first bound
        assert gap >= 0.2 * 2 ** n * WAIT_SCALE, gaps
    assert not caches(images[1])[1].exists()  # nothing cached for the failed item
    assert combined_text(images[0]) and combined_text(images[2])
    assert "llm: 2 done, 0 from cache, 1 failed" in out
    failed = lines_with(err, "FAILED")
    assert len(failed) == 1 and failed[0].startswith(f"FAILED {images[1].resolve()} [llm]: ")
    rows = report_failures(report)
    assert [(r["path"], r["stage"]) for r in rows] == [(str(images[1].resolve()), "llm")]
    assert rows[0]["error"]


def wait_until(condition, what: str, timeout: float = 120.0) -> None:
    """In a server handler: poll until `condition()`; a hang fails the test instead of hanging it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def first_answers_429_once_all_are_in_flight(server, in_flight: int, paused, limited: list[int]):
    """A reply callable: the first request waits until `in_flight` requests are at the server, then gets a 429 with
    Retry-After: 10 (0.5 s scaled); the others then in flight are held until `paused()` says the script has taken
    the pause. So when the pause starts no request is on the wire, and every request that arrives after it was sent
    after it."""
    lock = threading.Lock()

    def reply(body):
        with lock:
            first = not limited
            if first:
                limited.append(subject_of(body))
        if first:
            wait_until(lambda: server.in_flight >= in_flight, f"{in_flight} requests in flight")
            return status(429, {"Retry-After": "10"})
        if len(server.requests) <= in_flight:
            wait_until(paused, "the pause")
        return default_reply_text(body)

    return reply


@pytest.mark.slow
def test_retry_after_is_honoured_and_holds_back_every_worker(tmp_path, capsys, monkeypatch, model_dir, llm_server):
    """A 429 with Retry-After pauses the whole run, not just the request that got it: with four workers' requests
    in flight when it comes, the three others are answered once the pause is taken, and no request at all reaches
    the server from then until the pause ends. Without the shared pause they would go on at once."""
    images = make_dataset(tmp_path / "ds", 12)
    seed_generated(images)
    pauses: list[tuple[float, float]] = []  # (when, until), on the server's clock (time.monotonic)
    take_pause = ec.RateLimiter.pause

    def pause(self, seconds):
        take_pause(self, seconds)
        pauses.append((time.monotonic(), self.paused_until))

    monkeypatch.setattr(ec.RateLimiter, "pause", pause)
    limited: list[int] = []
    llm_server.reply = first_answers_429_once_all_are_in_flight(llm_server, 4, lambda: pauses, limited)
    code, out, err = run_main(capsys, *run_args_4(tmp_path / "ds", model_dir("florence2"), llm_server,
                                                "--concurrency", "4", "--max_retries", "2"))
    assert code == 0, err
    assert "llm: 12 done, 0 from cache, 0 failed" in out
    requests, times = llm_server.chat_requests(), list(llm_server.request_times)
    assert len(requests) == 13 and len(pauses) == 1
    when, until = pauses[0]
    assert until - when == pytest.approx(10 * WAIT_SCALE, abs=0.01)  # Retry-After: 10, scaled
    after = [(subject_of(r), t) for r, t in zip(requests, times) if t > when]
    assert len(after) == 13 - 4  # the retry and the eight not asked yet: all sent after the pause began
    assert limited[0] in [subject for subject, _ in after]  # the 429's request was asked again
    assert all(t >= until for _, t in after), [(s, t - until) for s, t in after]  # none during the pause


@pytest.mark.slow
def test_retry_after_holds_back_the_other_processes_of_a_two_process_run(tmp_path, model_dir, llm_server):
    """The same pause across `accelerate launch` processes, one request at a time each (so each keeps one
    connection, which names it here). With both processes' first requests in flight, one gets a 429 with
    Retry-After; the other's is answered once the pause file is in the dataset folder. From then on neither process
    sends a request until the pause written there ends, and both go on after it."""
    images = make_dataset(tmp_path / "ds", 40)
    seed_generated(images)
    pause_file = tmp_path / "ds" / ec.PAUSE_NAME.format(stage=ec.STAGE_LLM)
    limited: list[int] = []
    llm_server.reply = first_answers_429_once_all_are_in_flight(llm_server, 2, pause_file.exists, limited)
    result = run_two_processes(*run_args_4(tmp_path / "ds", model_dir("florence2"), llm_server, "--concurrency", "1",
                                         "--max_retries", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split over 2 processes" in result.stdout + result.stderr
    assert "llm: 40 done, 0 from cache, 0 failed" in result.stdout
    requests, peers = llm_server.chat_requests(), list(llm_server.peers)
    wall = time.time() - time.monotonic()  # the pause file holds wall-clock time
    times = [t + wall for t in llm_server.request_times]
    assert len(requests) == 41 and len(limited) == 1 and len(set(peers)) == 2
    written, until = pause_file.stat().st_mtime, float(pause_file.read_text())
    after = [(p, t) for p, t in zip(peers, times) if t > written]
    assert len(after) == 41 - 2  # every request but the first two was sent after the pause was written
    assert all(t >= until - 0.002 for _, t in after), [t - until for _, t in after]  # none during the pause
    assert len({p for p, _ in after}) == 2  # and both processes went on after it


# --------------------------------------------------------------------------------------------
# The LLM endpoint fails: permanent failures stop the run, the key never shows
# --------------------------------------------------------------------------------------------


def leaked_body(code: int) -> dict:
    """An error body that echoes the key, as some servers do."""
    return {"error": {"message": f"Incorrect API key provided: {SECRET}. Key {SECRET} refused.",
                      "type": "invalid_request_error", "param": None, "code": f"http_{code}"}}


def test_bad_key_rejected_up_front_exits_2_with_one_line_and_never_shows_the_key(
        tmp_path, capsys, monkeypatch, model_dir):
    from tests.llm_server import FakeLLMServer

    images = make_dataset(tmp_path / "ds", 3)
    seed_generated(images)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    report = tmp_path / "report.jsonl"
    with FakeLLMServer(api_key="the-right-key") as server:  # every request with another key gets a 401
        code, out, err = run_main(capsys, *run_args_4(tmp_path / "ds", model_dir("florence2"), server,
                                                    "--report", report, "-v"))
        assert code == 2
        assert server.requests == []  # stopped before a single chat request
    cause = [line for line in err.splitlines() if line.strip()]
    assert len(cause) == 1 and "401" in cause[0] and "key" in cause[0].lower(), err
    assert SECRET not in out + err
    assert not report.exists() or SECRET not in report.read_text()
    assert not any(caches(image)[1].exists() for image in images)


def status_lines(err: str, code: int) -> list[str]:
    """The lines that name an HTTP status as a word: "403" is also inside some of the loopback server's ports."""
    return [line for line in err.splitlines() if re.search(rf"\b{code}\b", line)]


@pytest.mark.parametrize("code", [401, 403])
def test_key_refused_mid_run_stops_at_the_first_occurrence(tmp_path, capsys, monkeypatch, model_dir, llm_server,
                                                           code):
    images = make_dataset(tmp_path / "ds", 10)
    seed_generated(images)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    llm_server.reply = lambda body: status(code, body=leaked_body(code))  # models listed, every chat refused
    report = tmp_path / "report.jsonl"
    exit_code, out, err = run_main(capsys, *run_args_4(tmp_path / "ds", model_dir("florence2"), llm_server,
                                                     "--concurrency", "3", "--max_retries", "3", "--report", report,
                                                     "-v"))
    assert exit_code == 2, err
    assert llm_server.headers[0]["authorization"] == f"Bearer {SECRET}"  # the key was really used
    assert 1 <= len(llm_server.requests) <= 3  # the requests already in flight, not one (or more) per image
    cause = status_lines(err, code)
    assert len(cause) == 1 and "key" in cause[0].lower(), err
    assert "FAILED" not in err  # the images are not blamed for a bad key
    assert SECRET not in out + err
    assert SECRET not in report.read_text()
    assert not any(caches(image)[1].exists() for image in images)


def test_key_echoed_in_an_error_message_is_redacted_everywhere(tmp_path, capsys, monkeypatch, model_dir,
                                                               llm_server):
    images = make_dataset(tmp_path / "ds", 2)
    seed_generated(images)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    llm_server.reply = lambda body: status(400, body=leaked_body(400))
    report = tmp_path / "report.jsonl"
    code, out, err = run_main(capsys, *run_args_4(tmp_path / "ds", model_dir("florence2"), llm_server,
                                                "--max_retries", "1", "--report", report, "-v"))
    assert code == 1
    assert len(lines_with(err, "FAILED")) == 2 and all("400" in line for line in lines_with(err, "FAILED"))
    assert SECRET not in out + err
    assert SECRET not in report.read_text() and len(report_failures(report)) == 2


@pytest.mark.parametrize("where", ["unknown_model", "wrong_base_url"])
def test_404_stops_at_the_first_occurrence_exit_2(tmp_path, capsys, model_dir, llm_server, where):
    images = make_dataset(tmp_path / "ds", 12)
    seed_generated(images)
    args = run_args_4(tmp_path / "ds", model_dir("florence2"), llm_server, "--concurrency", "4", "--max_retries", "3")
    if where == "unknown_model":
        llm_server.reply = lambda body: status(404, body={"error": {
            "message": "The model `test-model` does not exist", "type": "invalid_request_error",
            "param": None, "code": "model_not_found"}})
    else:
        args[args.index("--base_url") + 1] = llm_server.base_url.replace("/v1", "/wrong/v1")
    code, out, err = run_main(capsys, *args)
    assert code == 2, err
    assert len(llm_server.requests) <= 4  # at most the requests already in flight (concurrency 4)
    cause = status_lines(err, 404)
    assert len(cause) == 1, err
    assert "model" in cause[0] or "--base_url" in cause[0]
    assert "FAILED" not in err
    assert not any(caches(image)[1].exists() for image in images)


# --------------------------------------------------------------------------------------------
# Bad replies are not cached; replies are cleaned; --keep_tokens
# --------------------------------------------------------------------------------------------

BAD_REPLIES = {
    "empty": lambda: reply(""),
    "null_content": lambda: reply(None),
    "whitespace": lambda: reply("  \n\t  \n"),
    "punctuation": lambda: reply("... !!! -- ?"),
    "refusal": lambda: reply("I'm sorry, but I can't help with describing this image."),
    "refusal_cannot": lambda: reply("I cannot create a caption for this image."),
    "cut_off": lambda: reply("A red car parked beside a tall oak tree while the", "length"),
    "only_reasoning": lambda: reply("<think>The user wants a caption. Let me think"),
}


@pytest.mark.parametrize("kind", list(BAD_REPLIES))
def test_bad_reply_is_retried_then_reported_and_never_cached(tmp_path, capsys, model_dir, llm_server, kind):
    images = make_dataset(tmp_path / "ds", 1)
    seed_generated(images)
    args = run_args_4(tmp_path / "ds", model_dir("florence2"), llm_server, "--max_retries", "1")
    report = tmp_path / "report.jsonl"

    llm_server.script(BAD_REPLIES[kind](), BAD_REPLIES[kind]())  # every try is bad
    code, out, err = run_main(capsys, *args, "--report", report)
    assert code == 1, err
    assert len(llm_server.requests) == 2  # retried once (--max_retries 1), then given up
    assert not caches(images[0])[1].exists()
    failed = lines_with(err, "FAILED")
    assert len(failed) == 1 and failed[0].startswith(f"FAILED {images[0].resolve()} [llm]: ")
    assert "llm: 0 done, 0 from cache, 1 failed" in out
    assert len(report_failures(report)) == 1

    llm_server.script(BAD_REPLIES[kind](), reply("A red car parked beside a tall oak tree."))  # bad, then good
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    assert len(llm_server.requests) == 4
    assert combined_text(images[0]) == "A red car parked beside a tall oak tree."


CLEANING = {
    "think_block": ("<think>The manual caption names the car; keep it.</think>\nA red car parked by a tree.",
                    "A red car parked by a tree."),
    "think_without_opening_tag": ("The user wants one caption, so I merge both.\n</think>\n\nA red car parked by a tree.",
                                  "A red car parked by a tree."),
    "preamble": ("Here is the combined caption:\nA red car parked by a tree.", "A red car parked by a tree."),
    "preamble_sure": ("Sure! Here's the merged caption: A red car parked by a tree.", "A red car parked by a tree."),
    "double_quotes": ('"A red car parked by a tree."', "A red car parked by a tree."),
    "curly_quotes": ("\u201cA red car parked by a tree.\u201d", "A red car parked by a tree."),
    "code_fence": ("```\nA red car parked by a tree.\n```", "A red car parked by a tree."),
    "code_fence_with_language": ("```text\nA red car parked by a tree.\n```", "A red car parked by a tree."),
    "whitespace": ("  A red car\n\nparked   by a\ttree.  \n", "A red car parked by a tree."),
    "think_preamble_quotes": ('<think>plan</think>\n\nHere is the combined caption:\n\n"A red car\nparked by a tree."',
                              "A red car parked by a tree."),
    "preamble_then_fence": ("Here is the combined caption:\n```text\nA red car parked\nby a tree.\n```",
                            "A red car parked by a tree."),
    "colon_in_caption_kept": ("ohwx man, portrait: soft light, a red car.", "ohwx man, portrait: soft light, a red car."),
}


@pytest.mark.parametrize("kind", list(CLEANING))
def test_reply_is_cleaned_before_caching(tmp_path, capsys, model_dir, llm_server, kind):
    raw, clean = CLEANING[kind]
    images = make_dataset(tmp_path / "ds", 1)
    seed_generated(images)
    llm_server.script(reply(raw))
    code, out, err = run_main(capsys, *run_args_4(tmp_path / "ds", model_dir("florence2"), llm_server))
    assert code == 0, err
    assert len(llm_server.requests) == 1
    assert caches(images[0])[1].read_text(encoding="utf-8") == clean + "\n"


def keep_tokens_dataset(tmp_path):
    images = make_dataset(tmp_path / "ds", 1, captions=False)
    images[0].with_suffix(".txt").write_text("ohwx man, red shirt, smiling, outdoors", encoding="utf-8")
    seed_generated(images)
    return images


@pytest.mark.parametrize("answer, combined", [
    ("A smiling man in a red shirt, outdoors.", "ohwx man, red shirt, A smiling man in a, outdoors."),  # drops one
    ("A smiling man outdoors.", "ohwx man, red shirt, A smiling man outdoors."),  # drops both
    ("ohwx man in a red shirt, smiling outdoors.", "ohwx man, red shirt, in a, smiling outdoors."),  # keeps both
])
def test_keep_tokens_are_put_first_by_construction_in_one_request(tmp_path, capsys, model_dir, llm_server, answer,
                                                                  combined):
    images = keep_tokens_dataset(tmp_path)
    llm_server.script(reply(answer))
    code, out, err = run_main(capsys, *run_args_4(tmp_path / "ds", model_dir("florence2"), llm_server,
                                                "--keep_tokens", "2", "--max_retries", "1"))
    assert code == 0, err
    assert len(llm_server.requests) == 1  # never asked again for the kept tokens
    assert combined_text(images[0]) == combined


# --------------------------------------------------------------------------------------------
# The process dies: SIGKILL, SIGINT, SIGTERM, a second run
# --------------------------------------------------------------------------------------------


def cache_snapshot(ds: Path) -> dict[Path, tuple[int, str]]:
    """Every cache file: (inode, text). A rewrite (atomic replace) changes the inode."""
    return {p: (p.stat().st_ino, p.read_text(encoding="utf-8"))
            for p in ds.rglob("*") if p.name.endswith(("_generated.txt", "_combined.txt"))}


@pytest.mark.slow
@pytest.mark.parametrize("point", ["vision", "llm_first_request", "llm_midway"])
def test_sigkill_then_rerun_gives_a_clean_runs_caches_and_redoes_nothing_finished(
        tmp_path, capsys, model_dir, llm_server, point):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 16 if point == "vision" else 8)
    k = {"vision": 1, "llm_first_request": 1, "llm_midway": 5}[point]
    llm_server.hold(after=k - 1)  # the k-th request and the ones after it stay in flight until the kill
    run = Cli(tmp_path, "killed", *run_args_4(ds, model_dir("florence2"), llm_server, "--batch_size", "1",
                                             "--concurrency", "2"))
    if point == "vision":
        run.wait_for(lambda: len(list(ds.glob("*_generated.txt"))) >= 3, what="the first vision captions")
    else:
        run.wait_for(lambda: len(llm_server.requests) >= k, what=f"{k} LLM requests")
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait(30)
    llm_server.release()

    before = cache_snapshot(ds)
    assert all(text.strip() for _, text in before.values())  # no empty or half-written cache
    if point == "vision":
        assert len([p for p in before if p.name.endswith("_generated.txt")]) < len(images)  # killed mid-stage
    missing_generated = [i for i, image in enumerate(images) if not caches(image)[0].exists()]
    missing_combined = [i for i, image in enumerate(images) if not caches(image)[1].exists()]
    assert missing_combined
    asked_before = len(llm_server.requests)

    code, out, err = run_main(capsys, *run_args_4(ds, model_dir("florence2"), llm_server))
    assert code == 0, err
    rerun_requests = llm_server.chat_requests()[asked_before:]
    assert sorted(subject_of(r) for r in rerun_requests) == missing_combined  # only what was missing, once each
    n_gen = len(missing_generated)
    assert f"vision: {n_gen} done, {len(images) - n_gen} from cache, 0 failed" in out
    after = cache_snapshot(ds)
    assert {p: after[p] for p in before} == before  # finished work was neither redone nor rewritten
    assert_clean_final_state(ds, images, llm_server.chat_requests())


@pytest.mark.slow
def test_rerun_after_a_kill_mid_write_leaves_no_half_written_temporaries(tmp_path, capsys, model_dir, llm_server):
    """A SIGKILL between writing a cache's temporary file and renaming it leaves that temporary behind."""
    ds = tmp_path / "ds"
    images = make_dataset(ds, 3)
    seed_generated(images[:2])
    (ds / ".img001_combined.txt.k3j9x2.tmp").write_text("MERGED half a capt")
    (ds / ".img002_generated.txt.q8w7e6.tmp").write_text("")
    (ds / ".enhance_captions").mkdir()
    killed = ds / ".enhance_captions" / ".records.jsonl.0a1b2c3d.tmp"  # a compaction a kill cut short
    killed.write_text('{"cache": "img000_combined.txt", "sha": "0')
    os.utime(killed, (time.time() - 120, time.time() - 120))
    saving = ds / ".enhance_captions" / ".approved.json.4e5f6a7b.tmp"  # a review page's save, this moment
    saving.write_text("{")
    code, out, err = run_main(capsys, *run_args_4(ds, model_dir("florence2"), llm_server))
    assert code == 0, err
    assert all(combined_text(image) for image in images)
    assert tmp_files(ds) == [saving]


@pytest.mark.slow
@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_save_replies_in_flight_print_the_summary_and_exit(
        tmp_path, capsys, model_dir, llm_server, signum, exit_code):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 8)
    seed_generated(images)
    llm_server.hold()  # the two requests in flight are answered only once the run has taken the signal
    run = Cli(tmp_path, "stopped", *run_args_4(ds, model_dir("florence2"), llm_server, "--concurrency", "2"))
    run.wait_for(lambda: llm_server.held == 2, what="two LLM requests in flight")
    in_flight = len(llm_server.requests)
    run.proc.send_signal(signum)
    run.wait_for(lambda: "stopping after the work in flight" in run.stderr, what="the signal to be taken")
    llm_server.release()
    assert run.wait(60) == exit_code, run.stderr
    done = [i for i, image in enumerate(images) if combined_text(image)]
    assert len(done) >= in_flight  # the replies in flight when the signal came were saved
    assert len(done) == len(llm_server.requests)  # every reply that arrived was saved
    assert len(done) < len(images)  # it did stop early
    assert re.search(rf"^llm: {len(done)} done, 0 from cache, 0 failed$", run.stdout, re.M), run.stdout
    assert tmp_files(ds) == []

    asked_before = len(llm_server.requests)
    code, out, err = run_main(capsys, *run_args_4(ds, model_dir("florence2"), llm_server))
    assert code == 0, err
    assert sorted(subject_of(r) for r in llm_server.requests[asked_before:]) == \
        [i for i in range(len(images)) if i not in done]
    assert f"llm: {len(images) - len(done)} done, {len(done)} from cache, 0 failed" in out
    assert_clean_final_state(ds, images, llm_server.chat_requests())


@pytest.mark.slow
def test_second_run_on_the_same_folder_refuses_at_once_and_a_dead_owners_lock_is_free(
        tmp_path, capsys, model_dir, llm_server):
    import fcntl

    ds = tmp_path / "ds"
    images = make_dataset(ds, 4)
    seed_generated(images)
    llm_server.hold()  # the first run's requests stay in flight until it is killed
    first = Cli(tmp_path, "first", *run_args_4(ds, model_dir("florence2"), llm_server))
    first.wait_for(lambda: len(llm_server.requests) >= len(images), what="the first run's LLM requests")
    assert [p for p in ds.iterdir() if "lock" in p.name.lower()]  # the lock file lives in the dataset folder
    asked = len(llm_server.requests)

    second = Cli(tmp_path, "second", *run_args_4(ds, model_dir("florence2"), llm_server))
    assert second.wait(120) == 2, second.stderr
    assert first.proc.poll() is None  # refused while the first was still running: it did not wait for it
    message = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(message) == 1 and "another run" in message[0], second.stderr
    assert len(llm_server.requests) == asked  # the second run asked nothing
    assert not any(caches(image)[1].exists() for image in images)

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(30)
    llm_server.release()
    code, out, err = run_main(capsys, *run_args_4(ds, model_dir("florence2"), llm_server))
    assert code == 0, err  # the dead owner's lock is not stale
    assert all(combined_text(image) for image in images)
    for lock in (p for p in ds.iterdir() if "lock" in p.name.lower()):  # released on exit
        with open(lock) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# The input is bad
# --------------------------------------------------------------------------------------------


def header_only_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def truncated_jpeg(path: Path) -> Path:
    from PIL import Image

    noise = Image.frombytes("RGB", (128, 128), bytes((i * 7919 + i // 3) % 251 for i in range(128 * 128 * 3)))
    noise.save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def two_colour(size, first, second, mode="RGB", vertical=False):
    """An image whose left (or top) half is `first` and the rest `second`."""
    from PIL import Image

    img = Image.new(mode, size, second)
    half = (0, 0, size[0], size[1] // 2) if vertical else (0, 0, size[0] // 2, size[1])
    img.paste(first, half)
    return img


def exif_rotated_jpeg(path: Path, orientation: int) -> Path:
    from PIL import Image

    img = two_colour((40, 20), (255, 0, 0), (0, 0, 255))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def cmyk_jpeg(path: Path) -> Path:
    two_colour((32, 32), (0, 255, 255, 0), (255, 255, 0, 0), mode="CMYK").save(path, format="JPEG", quality=95)
    return path  # left red, right blue


def sixteen_bit_png(path: Path) -> Path:
    two_colour((32, 32), 65535, 0, mode="I;16").save(path, format="PNG")
    return path  # left white, right black


def palette_transparent_png(path: Path) -> Path:
    from PIL import Image

    img = Image.new("P", (32, 32), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(0, (0, 0, 16, 32))
    img.save(path, format="PNG", transparency=0)  # left transparent (index 0), right opaque blue
    return path


def close(pixel, expected, tolerance=40):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


@pytest.mark.parametrize("orientation, size, top_left, bottom_right", [
    (1, (40, 20), (255, 0, 0), (0, 0, 255)),
    (3, (40, 20), (0, 0, 255), (255, 0, 0)),   # upside down
    (6, (20, 40), (255, 0, 0), (0, 0, 255)),   # turned a quarter clockwise: the left edge ends on top
    (8, (20, 40), (0, 0, 255), (255, 0, 0)),   # turned a quarter counter-clockwise: the left edge ends at the bottom
])
def test_load_image_applies_exif_orientation(tmp_path, orientation, size, top_left, bottom_right):
    img = ec.load_image(exif_rotated_jpeg(tmp_path / "r.jpg", orientation))
    assert img.mode == "RGB" and img.size == size
    assert close(img.getpixel((0, 0)), top_left) and close(img.getpixel((size[0] - 1, size[1] - 1)), bottom_right)


@pytest.mark.parametrize("make, left, right", [
    (cmyk_jpeg, (255, 0, 0), (0, 0, 255)),
    (sixteen_bit_png, (255, 255, 255), (0, 0, 0)),
    (palette_transparent_png, (255, 255, 255), (0, 0, 255)),  # transparency on white, not black
])
def test_load_image_converts_modes_to_rgb(tmp_path, make, left, right):
    from PIL import Image

    path = make(tmp_path / f"img{'.jpg' if make is cmyk_jpeg else '.png'}")
    with Image.open(path) as raw:
        assert raw.mode != "RGB"  # the file really is in the unusual mode
    img = ec.load_image(path)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert close(img.getpixel((2, 16)), left) and close(img.getpixel((29, 16)), right)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("dims", [(100_000, 100_000), (10_000, 10_000)])
def test_load_image_refuses_a_decompression_bomb_without_allocating_it(tmp_path, dims):
    import resource

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(header_only_png(*dims))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ec.ItemError, match="bomb"):
        ec.load_image(bomb)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100_000  # 10000x10000 RGB alone would be 300 MB


def test_load_image_names_the_reason_for_each_bad_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is a text file, not a JPEG\n")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "dangling.jpg")
    truncated = truncated_jpeg(tmp_path / "truncated.jpg")
    reasons = {}
    for path in (tmp_path / "empty.png", tmp_path / "text.jpg", tmp_path / "dangling.jpg", truncated):
        with pytest.raises(ec.ItemError) as info:
            ec.load_image(path)
        reasons[path.name] = str(info.value)
    assert "empty" in reasons["empty.png"] or "0 bytes" in reasons["empty.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert all(reason.strip() for reason in reasons.values())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_load_image_unreadable_file(tmp_path):
    path = make_image(tmp_path / "locked.jpg", 1)
    path.chmod(0)
    with pytest.raises(ec.ItemError, match="(?i)permission"):
        ec.load_image(path)


@pytest.mark.slow
def test_bad_inputs_are_reported_once_each_and_every_good_image_is_captioned(tmp_path, capsys, model_dir,
                                                                              llm_server):
    ds = tmp_path / "ds"
    ds.mkdir()
    good = {
        "plain.jpg": make_image(ds / "plain.jpg", 1),
        "unicode": make_image(ds / "my holiday phötö ünïcødé 写真.jpg", 2),
        "cmyk": cmyk_jpeg(ds / "cmyk.jpg"),
        "16bit": sixteen_bit_png(ds / "gray16.png"),
        "palette": palette_transparent_png(ds / "palette.png"),
        "rotated": exif_rotated_jpeg(ds / "rotated.jpg", 6),
        "nested": make_image(ds / "sub" / "nested.jpg", 3),
        "bad_caption": make_image(ds / "badcaption.jpg", 4),
    }
    (ds / "my holiday phötö ünïcødé 写真.txt").write_text("ünïcødé subject, 写真", encoding="utf-8")
    (ds / "plain.txt").write_text("plain subject, daylight", encoding="utf-8")
    (ds / "badcaption.txt").write_bytes(b"caf\xe9 au lait, \xff\xfe broken")  # Latin-1, not UTF-8
    bad = {
        "truncated.jpg": truncated_jpeg(ds / "truncated.jpg"),
        "empty.png": ds / "empty.png",
        "text.jpg": ds / "text.jpg",
        "bomb.png": ds / "bomb.png",
        "dangling.jpg": ds / "dangling.jpg",
        "loop": ds / "sub" / "loop",
        "a.png": make_image(ds / "a.png", 5),
        "a.jpg": make_image(ds / "a.jpg", 6),
    }
    bad["empty.png"].write_bytes(b"")
    bad["text.jpg"].write_text("not a picture at all\n")
    bad["bomb.png"].write_bytes(header_only_png(100_000, 100_000))
    os.symlink(ds / "gone.jpg", bad["dangling.jpg"])
    os.symlink(ds, bad["loop"])
    if os.geteuid() != 0:  # root reads anything: there the dangling symlink stands for an unreadable file
        bad["unreadable.jpg"] = make_image(ds / "unreadable.jpg", 7)
        bad["unreadable.jpg"].chmod(0)
    report = tmp_path / "report.jsonl"

    code, out, err = run_main(capsys, *run_args_4(ds, model_dir("florence2"), llm_server, "--report", report))
    assert code == 1, err

    root = ds.resolve()
    rows = report_failures(report)
    assert all(set(row) == {"path", "stage", "error"} and row["error"].strip() for row in rows), rows
    reported = sorted(Path(row["path"]).relative_to(root).as_posix() for row in rows)
    expected = sorted([p.relative_to(ds).as_posix() for p in bad.values()] + ["badcaption.jpg"])
    assert reported == expected  # each bad file once, nothing else
    error = {Path(row["path"]).name: row["error"] for row in rows}
    assert "bomb" in error["bomb.png"]
    assert "empty" in error["empty.png"] or "0 bytes" in error["empty.png"]
    assert "truncated" in error["truncated.jpg"]
    assert "loop" in error["loop"]
    assert "a.png" in error["a.jpg"] and "a.jpg" in error["a.png"]  # the conflict names the other image
    assert "badcaption.txt" in error["badcaption.jpg"] and "UTF-8" in error["badcaption.jpg"]
    assert len(lines_with(err, "FAILED ")) == len(rows)
    for row in rows:  # the same failures, each once, on stderr
        assert len([line for line in err.splitlines() if line.startswith(f"FAILED {row['path']} [")]) == 1, row

    for name, image in good.items():
        generated, combined = caches(image)
        assert generated.read_text(encoding="utf-8").strip(), name
        if name != "bad_caption":
            assert combined.read_text(encoding="utf-8").strip(), name
    assert not caches(good["bad_caption"])[1].exists()
    for name, path in bad.items():
        if path.suffix:
            assert not any(p.exists() for p in caches(path)), name  # a.png/a.jpg: neither processed
    messages = [user_message(r) for r in llm_server.requests]
    assert len(messages) == len(good) - 1
    assert not any("caf" in m for m in messages)  # the undecodable caption was not guessed at
    assert any("ünïcødé subject, 写真" in m for m in messages)
    # A dangling symlink fails at planning (its image cannot be stat'ed), the other bad images in the vision stage.
    n_bad_images = len([n for n in bad if n not in ("loop", "a.png", "a.jpg", "dangling.jpg")])
    assert f"vision: {len(good)} done, 0 from cache, {n_bad_images} failed" in out
    assert f"llm: {len(good) - 1} done, 0 from cache, 0 failed" in out  # badcaption's merge waits, reported at input


def test_dataset_dir_that_is_a_file_or_an_empty_folder_is_a_clear_exit_2(tmp_path, capsys, model_dir, llm_server):
    a_file = tmp_path / "images.zip"
    a_file.write_bytes(b"PK\x03\x04")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    for folder, words in ((a_file, "file"), (empty, "no images")):
        code, out, err = run_main(capsys, *run_args_4(folder, model_dir("florence2"), llm_server))
        assert code == 2
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and str(folder.name) in lines[0] and words in lines[0], err
    assert llm_server.requests == []


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_image_the_processor_refuses_fails_alone_and_its_batch_is_captioned(tmp_path, capsys, model_dir,
                                                                              llm_server, workers):
    """Qwen-VL's processor raises on an aspect ratio over 200: that image gets its own line, the other images
    of its batch are captioned and merged, and the exit code says that something failed."""
    from PIL import Image

    ds = tmp_path / "ds"
    ds.mkdir()
    good = [make_image(ds / f"good{i}.jpg", i) for i in range(3)]
    strip = ds / "strip.png"
    Image.new("RGB", (1, 300), (200, 30, 30)).save(strip)
    report = tmp_path / "report.jsonl"

    code, out, err = run_main(capsys, *run_args_4(ds, model_dir("qwen2_5_vl"), llm_server, "--num_workers", workers,
                                                "--report", report))
    assert code == 1, err
    rows = report_failures(report)
    assert [(Path(r["path"]).name, r["stage"]) for r in rows] == [("strip.png", "vision")]
    assert "1x300" in rows[0]["error"] and "aspect ratio" in rows[0]["error"]
    assert len(lines_with(err, "FAILED ")) == 1 and "Traceback" not in err
    for image in good:
        generated, combined = caches(image)
        assert generated.read_text(encoding="utf-8").strip() and combined.read_text(encoding="utf-8").strip()
    assert not any(caches(strip)[i].exists() for i in (0, 1))
    assert "vision: 3 done, 0 from cache, 1 failed" in out


@pytest.mark.slow
def test_a_decoding_worker_that_dies_ends_the_run_with_one_line_and_keeps_what_was_done(
        tmp_path, capsys, model_dir, llm_server):
    """A DataLoader worker killed mid-stage (as the OOM killer or a full /dev/shm would): exit 2 with one line
    naming the cause and the remedy, no traceback, every caption written so far intact, and a rerun finishes."""
    import psutil

    ds = tmp_path / "ds"
    images = make_dataset(ds, 40)
    run = Cli(tmp_path, "worker", *run_args_4(ds, model_dir("florence2"), llm_server, "--batch_size", "1",
                                            "--num_workers", "2"))
    script = psutil.Process(run.proc.pid)
    run.wait_for(lambda: len(list(ds.glob("*_generated.txt"))) >= 1, what="the first vision caption")
    workers = script.children()
    assert len(workers) == 2
    workers[0].kill()
    code = run.wait()

    assert code == 2, run.stderr[-3000:]
    errors = lines_with(run.stderr, "error: ")
    assert len(errors) == 1 and "decoding worker died" in errors[0] and "--num_workers 0" in errors[0]
    assert "Traceback" not in run.stderr and not lines_with(run.stderr, "FAILED ")  # no image is blamed for it
    done = [image for image in images if caches(image)[0].exists()]
    assert 1 <= len(done) < len(images)
    assert all(caches(image)[0].read_text(encoding="utf-8").strip() for image in done)
    assert all(caches(image)[1].exists() for image in done)  # what was captioned was still merged
    assert tmp_files(ds) == []

    code, out, err = run_main(capsys, *run_args_4(ds, model_dir("florence2"), llm_server))
    assert code == 0, err
    assert f"vision: {len(images) - len(done)} done, {len(done)} from cache, 0 failed" in out
