"""Runs that cannot progress stop, and say so; a run never switches its merge backend by accident.

A dead endpoint (connections refused), a hung one (accepts, never answers) and one that answers 500 to everything
are each a pool of one that is set aside; with --give_up_after SECONDS the stage stops, what it has not done is
left for the next run (counted, not failed), the lock is released and the run exits 1 with one line naming the
endpoint. A rerun against a good server does exactly the rest. A process of a two-process run that hangs is given
up on by the main process. Vision captions are seeded where only merges matter, and --model_id names no model.
No test asserts a duration: counts of requests, files and exit codes.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (caches, kill_launch, lines_with, make_dataset, report_failures, run_main, seed_generated,
                            two_process_command, user_message)
from tests.llm_server import FakeLLMServer, hang, reply, status, stop_after


def merge_args(ds: Path, server, *extra) -> list[str]:
    """Merges only: the vision captions are seeded, and --model_id names no model."""
    return [str(a) for a in ("--dataset_dir", ds, "--model_id", ds.parent / "no-such-model",
                             "--base_url", server.base_url, "--model", "test-model", *extra)]


def seeded(tmp_path: Path, n: int) -> list[Path]:
    images = make_dataset(tmp_path / "ds", n)
    seed_generated(images)
    return images


def merged(images) -> list[Path]:
    return [image for image in images if caches(image)[1].exists()]


def assert_lock_is_free(ds: Path) -> None:
    import fcntl

    with open(ds / ".enhance_captions.lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)


def assert_gave_up(code: int, out: str, err: str, url: str, left: int, images) -> None:
    """Exit 1, one error line naming the endpoint, no image blamed, `left` merges left for the next run."""
    assert code == 1, err
    errors = lines_with(err, "error:")
    assert len(errors) == 1 and url in errors[0] and "--give_up_after" in errors[0], err
    assert not lines_with(err, "FAILED"), err
    assert f"left for the next run: 0 to caption, {left} to merge" in out
    assert len(images) - len(merged(images)) == left


def rerun_does_the_rest(capsys, ds: Path, images, left: int) -> None:
    """A rerun against a good server sends exactly the requests of the merges left, and finishes."""
    assert_lock_is_free(ds)
    with FakeLLMServer() as good:
        code, out, err = run_main(capsys, *merge_args(ds, good))
        assert code == 0, err
        assert len(good.chat_requests()) == left
    assert len(merged(images)) == len(images)
    assert "left for the next run" not in out


# --------------------------------------------------------------------------------------------
# A dead, a hung and a failing endpoint
# --------------------------------------------------------------------------------------------


def test_a_refused_endpoint_gives_up_leaves_the_rest_and_a_rerun_finishes_it(tmp_path, capsys):
    images = seeded(tmp_path, 8)
    report = tmp_path / "report.jsonl"
    with FakeLLMServer() as dying:
        dying.reply = stop_after(dying, 2)
        url = dying.base_url
        code, out, err = run_main(capsys, *merge_args(tmp_path / "ds", dying, "--concurrency", "2", "--timeout", "2",
                                                      "--give_up_after", "1", "--report", report))
        answered = len(dying.chat_requests())
    assert 2 <= answered <= 4  # two answers, and what was on the wire as it stopped: then the port refuses
    left = len(images) - len(merged(images))
    assert left >= 4
    assert_gave_up(code, out, err, url, left, images)
    warnings = lines_with(err, "warning: endpoint")
    assert warnings and url in warnings[0] and "set aside" in warnings[0]
    summary = json.loads(report.read_text(encoding="utf-8").splitlines()[-1])["summary"]
    assert summary["exit_code"] == 1 and summary["left"] == {"vision": 0, "llm": left} and url in summary["error"]
    assert report_failures(report) == []  # left, not failed
    rerun_does_the_rest(capsys, tmp_path / "ds", images, left)


def test_a_hung_endpoint_gives_up_after_a_bounded_number_of_requests(tmp_path, capsys):
    images = seeded(tmp_path, 6)
    with FakeLLMServer() as hung:
        hung.reply = lambda body: hang(600)  # accepts, reads the request, never answers
        code, out, err = run_main(capsys, *merge_args(tmp_path / "ds", hung, "--concurrency", "3", "--timeout", "1",
                                                      "--max_retries", "5", "--give_up_after", "2"))
        asked = len(hung.chat_requests())
        url = hung.base_url
    assert 3 <= asked <= 6, asked  # the first three, and at most one more each: not 6 tries x 6 images
    assert_gave_up(code, out, err, url, 6, images)
    assert "timed out" in lines_with(err, "error:")[0]
    rerun_does_the_rest(capsys, tmp_path / "ds", images, 6)


def test_an_endpoint_that_answers_500_to_everything_gives_up(tmp_path, capsys):
    images = seeded(tmp_path, 6)
    with FakeLLMServer() as broken:
        broken.reply = lambda body: status(500)
        code, out, err = run_main(capsys, *merge_args(tmp_path / "ds", broken, "--concurrency", "3",
                                                      "--max_retries", "5", "--give_up_after", "1"))
        asked = len(broken.chat_requests())
        url = broken.base_url
    assert 3 <= asked <= 9, asked  # set aside after three failures of several images, then no request
    assert_gave_up(code, out, err, url, 6, images)
    assert "500" in lines_with(err, "error:")[0]
    rerun_does_the_rest(capsys, tmp_path / "ds", images, 6)


@pytest.mark.parametrize("message", [
    "max_tokens is too large: 512. This model supports at most 256 completion tokens, whereas you provided 512.",
    "Unsupported value: 'temperature' does not support 0.3 with this model. Only the default (1) value is supported.",
])
def test_an_endpoint_that_refuses_every_request_for_a_setting_stops_the_run_at_once(tmp_path, capsys, message):
    """The same 400 for every request, naming a setting each one carries: the stage stops after REFUSED_AT_START
    refusals with none answered, one error line, exit 2, the rest left for the next run."""
    images = seeded(tmp_path, 40)
    report = tmp_path / "report.jsonl"
    with FakeLLMServer() as strict:
        strict.reply = lambda body: status(400, body={"error": {"message": message, "type": "invalid_request_error"}})
        code, out, err = run_main(capsys, *merge_args(tmp_path / "ds", strict, "--concurrency", "2", "--report",
                                                      report))
        asked = len(strict.chat_requests())
        url = strict.base_url
    assert code == 2, err
    assert 8 <= asked <= 10, asked  # not 40: one refusal each
    errors = lines_with(err, "error:")
    assert len(errors) == 1 and url in errors[0] and "refused each of the first 8 requests" in errors[0], err
    assert message in errors[0]
    summary = json.loads(report.read_text(encoding="utf-8").splitlines()[-1])["summary"]
    assert summary["exit_code"] == 2 and summary["left"]["llm"] == 40 - summary["llm"]["failed"] >= 30
    assert merged(images) == []
    rerun_does_the_rest(capsys, tmp_path / "ds", images, 40)


def test_refusals_after_a_reply_fail_their_items_and_the_run_goes_on(tmp_path, capsys):
    """Once the endpoint has answered, a refusal is that item's (a caption too long for its context): the run goes
    on, and each refused item fails with the server's reason."""
    images = seeded(tmp_path, 12)
    with FakeLLMServer() as picky:
        picky.reply = lambda body: "a merged caption" if "subject0," in user_message(body) else status(400)
        code, out, err = run_main(capsys, *merge_args(tmp_path / "ds", picky, "--concurrency", "1"))
        asked = len(picky.chat_requests())
    assert code == 1, err
    assert asked == 12 and len(lines_with(err, "FAILED")) == 11 and not lines_with(err, "error:")
    assert merged(images) == images[:1]


@pytest.mark.parametrize("refusal", [
    lambda subject: "Your request was rejected as a result of our safety system.",  # alike, for each one's content
    lambda subject: f"this request is {4097 + subject} tokens, over the context of 4096",  # each its own length
], ids=["alike-for-content", "each-its-own"])
def test_refusals_of_the_first_items_own_fail_them_and_the_run_goes_on(tmp_path, capsys, refusal):
    """The first nine images refused before any reply, for reasons of their own, not for a setting every request
    carries: a stop would stop every later run at the same nine. They fail with their reasons; the run does the
    others."""
    images = seeded(tmp_path, 12)

    def reply(body):
        subject = int(re.search(r"subject(\d+),", user_message(body)).group(1))
        return status(400, body={"error": {"message": refusal(subject)}}) if subject < 9 else "a merged caption"

    with FakeLLMServer() as picky:
        picky.reply = reply
        code, out, err = run_main(capsys, *merge_args(tmp_path / "ds", picky, "--concurrency", "1"))
    assert code == 1, err
    assert len(lines_with(err, "FAILED")) == 9 and not lines_with(err, "error:")
    assert merged(images) == images[9:]


def test_a_hung_vision_endpoint_stops_its_stage_and_the_rest_waits_for_the_next_run(tmp_path, capsys):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 4)
    with FakeLLMServer() as vision, FakeLLMServer() as llm:
        vision.reply = lambda body: hang(600)
        code, out, err = run_main(capsys, "--dataset_dir", ds, "--model_id", tmp_path / "no-such-model",
                                  "--vlm_base_url", vision.base_url, "--vlm_model", "test-model",
                                  "--base_url", llm.base_url, "--model", "test-model", "--concurrency", "2",
                                  "--timeout", "1", "--give_up_after", "2")
        asked = len(vision.chat_requests())
        url = vision.base_url
        assert llm.chat_requests() == []  # nothing was captioned, so nothing merged
    assert code == 1, err
    assert 2 <= asked <= 4, asked
    errors = lines_with(err, "error:")
    assert len(errors) == 1 and url in errors[0] and "vision" in errors[0], err
    assert "left for the next run: 4 to caption, 4 to merge" in out
    assert not any(caches(image)[0].exists() for image in images)


# --------------------------------------------------------------------------------------------
# A served vision caption cut at --max_new_tokens is kept, as a local one is
# --------------------------------------------------------------------------------------------


def test_a_served_vision_caption_cut_at_the_limit_is_kept_with_a_note(tmp_path, capsys):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 2)
    with FakeLLMServer() as vision, FakeLLMServer() as llm:
        vision.reply = lambda body: reply("a red car parked beside a tall oak tree while the", "length")
        code, out, err = run_main(capsys, "--dataset_dir", ds, "--model_id", tmp_path / "no-such-model",
                                  "--vlm_base_url", vision.base_url, "--vlm_model", "test-model",
                                  "--base_url", llm.base_url, "--model", "test-model", "--max_new_tokens", "12")
        assert len(vision.chat_requests()) == 2  # one request each: never asked again
        assert len(llm.chat_requests()) == 2
    assert code == 0, err
    for image in images:
        assert caches(image)[0].read_bytes() == b"a red car parked beside a tall oak tree while the\n"
    notes = lines_with(out + err, "NOTE")
    assert len(notes) == 2 and all("--max_new_tokens 12" in note for note in notes), out + err


# --------------------------------------------------------------------------------------------
# No silent backend switch
# --------------------------------------------------------------------------------------------


def test_a_rerun_without_an_endpoint_refuses_to_switch_to_the_default_local_llm(tmp_path, capsys, model_dir):
    ds = tmp_path / "ds"
    images = seeded(tmp_path, 3)
    with FakeLLMServer() as server:
        code, out, err = run_main(capsys, *merge_args(ds, server))
        assert code == 0, err
    before = {image: caches(image)[1].read_bytes() for image in images}
    bare = ["--dataset_dir", ds, "--model_id", tmp_path / "no-such-model"]  # no --base_url; no OPENAI_* (conftest)

    code, out, err = run_main(capsys, *bare)
    assert code == 0, err  # nothing to merge: nothing would switch

    images[0].with_suffix(".txt").write_text("subject0, photo number 0, edited by hand", encoding="utf-8")
    code, out, err = run_main(capsys, *bare)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "endpoint model test-model" in lines[0] and "--local_llm" in lines[0], err
    assert {image: caches(image)[1].read_bytes() for image in images} == before  # nothing was merged

    code, out, err = run_main(capsys, *bare, "--local_llm", model_dir("causal_lm"))  # a switch asked for
    assert "endpoint model test-model" not in err
    made = re.search(r"^llm: (\d+) done, 2 from cache, (\d+) failed$", out, re.M)  # a tiny model's words may fail
    assert made and int(made[1]) + int(made[2]) == 1, out + err  # it went ahead, and merged the edited one
    assert caches(images[1])[1].read_bytes() == before[images[1]]


def test_a_sub_folder_run_trusting_its_caches_still_refuses_to_switch(tmp_path, capsys):
    """--refresh none reads no records to plan, so the switch check reads them itself: the dataset's, not a record
    set of the sub-folder that does not exist (which found no maker, and let the default local LLM merge)."""
    ds = tmp_path / "ds"
    images = make_dataset(ds / "sub", 2)
    seed_generated(images)
    with FakeLLMServer() as server:
        assert run_main(capsys, *merge_args(ds, server))[0] == 0
    caches(images[0])[1].unlink()  # one merge to make
    code, out, err = run_main(capsys, "--dataset_dir", ds / "sub", "--model_id", tmp_path / "no-such-model",
                              "--refresh", "none")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "were made by endpoint model test-model" in lines[0], err


# --------------------------------------------------------------------------------------------
# A process that hangs is given up on
# --------------------------------------------------------------------------------------------


def rank_of(process) -> int | None:
    try:
        return int(process.environ().get("RANK", ""))
    except (ValueError, OSError):
        return None


@pytest.mark.slow
def test_a_process_that_hangs_is_given_up_on_and_the_others_work_is_saved(tmp_path, capsys):
    import psutil

    ds = tmp_path / "ds"
    images = seeded(tmp_path, 16)
    report = tmp_path / "report.jsonl"
    with FakeLLMServer(latency=0.3) as server:
        command, env = two_process_command(*merge_args(ds, server, "--concurrency", "1", "--report", report))
        env["ENHANCE_CAPTIONS_WAIT_SCALE"] = "0.05"  # a process silent for 3 s is given up on
        with open(tmp_path / "launch.out", "w") as out, open(tmp_path / "launch.err", "w") as err:
            launcher = subprocess.Popen(command, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while len(set(server.peers)) < 2:  # each process has a request on the wire
                assert launcher.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "launch.err").read_text()[-3000:]
                time.sleep(0.05)
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if rank_of(p) == 1]
            assert len(workers) == 1
            workers[0].suspend()  # SIGSTOP: it neither works nor beats
            while not report.exists():
                assert launcher.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "launch.err").read_text()[-3000:]
                time.sleep(0.1)
            time.sleep(0.5)  # the summary lines after the report
        finally:
            kill_launch(launcher)
        asked = len(server.chat_requests())
    summary = json.loads(report.read_text(encoding="utf-8").splitlines()[-1])["summary"]
    assert summary["exit_code"] == 1 and "process 2 of 2" in summary["error"], summary
    stderr = (tmp_path / "launch.err").read_text()
    assert len([line for line in stderr.splitlines() if line.startswith("error: process 2 of 2")]) == 1, stderr
    left = summary["left"]["llm"]
    assert 1 <= left <= 3 and len(merged(images)) >= len(images) - left  # what the stopped one had claimed
    assert asked >= len(images) - left

    missing = [i for i, image in enumerate(images) if not caches(image)[1].exists()]
    with FakeLLMServer() as good:
        code, out, err = run_main(capsys, *merge_args(ds, good))
        assert code == 0, err
        assert sorted(int(user_message(r).split("subject")[1].split(",")[0]) for r in good.chat_requests()) == missing
