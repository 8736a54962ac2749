"""Promises that hold under real use: one plan for every process, a last look before every write, one set of
records for a dataset and its sub-folders, a stop that cannot hang, errors that are never lost, caches that are
the bytes their records name, and a dry run that loads nothing.

Runs go through the real CLI. Where a test must act at one point of a run (after planning, during one merge),
the loopback server does it while it answers a request of that run: preflight's probe (a one-token request for
a model the endpoint does not list) comes after the main process has planned and before any work starts."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

import enhance_captions as ec
from tests.conftest import (Cli, caches, lines_with, make_dataset, make_image, run_args, run_main,
                            seed_generated, two_process_command, user_message)
from tests.llm_server import FakeLLMServer, default_reply_text

SUBJECT = re.compile(r"subject(\d+), photo number")
PROBE = "Hi"  # preflight's request for a model the endpoint does not list


def subject_of(request: dict) -> int | None:
    match = SUBJECT.search(user_message(request))
    return int(match.group(1)) if match else None


def merged_subjects(server: FakeLLMServer) -> list[int]:
    return sorted(subject_of(r) for r in server.chat_requests() if user_message(r) != PROBE)


def recorded(ds: Path) -> dict[str, str]:
    """cache key -> sha, as records.jsonl holds them after a run."""
    rows = [json.loads(line) for line in (ds / ec.RECORDS_DIR / ec.RECORDS_FILE).read_text().splitlines()]
    return {row["cache"]: row["sha"] for row in rows if "cache" in row}


def summary_of(report: Path) -> dict:
    return json.loads(report.read_text(encoding="utf-8").splitlines()[-1])["summary"]


def on_probe(action):
    """A reply callable that runs `action` once, when preflight's probe arrives, and answers every request."""
    done = []

    def reply(body):
        if user_message(body) == PROBE and not done:
            action()
            done.append(True)
        return default_reply_text(body)
    return reply, done


def holding(subject: int):
    """A reply callable that holds the merge of image `subject` (with `held` set) until `release` is set."""
    held, release = threading.Event(), threading.Event()

    def reply(body):
        if subject_of(body) == subject and not release.is_set():
            held.set()
            release.wait(120)
        return default_reply_text(body)
    return reply, held, release


def tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")]


# --------------------------------------------------------------------------------------------
# A last look before every write
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("before", ["changed", "created"])
def test_a_caption_edited_by_hand_while_its_merge_is_in_flight_is_kept(tmp_path, capsys, model_dir, before):
    """The server holds the merge of img001 until the test has written that combined caption by hand: over a file
    the previous run made and recorded (changed), or where there was none (created)."""
    ds = tmp_path / "ds"
    images = make_dataset(ds, 3)
    seed_generated(images)
    combined, report = caches(images[1])[1], tmp_path / "report.jsonl"
    reply, held, release = holding(1)

    with FakeLLMServer(reply=reply) as server:
        args = run_args(ds, model_dir("florence2"), server)
        if before == "changed":
            release.set()
            assert run_main(capsys, *args)[0] == 0
            release.clear()
            (ds / "img001.txt").write_text("subject1, photo number 1, now in the rain", encoding="utf-8")
        asked = len(server.requests)
        run = Cli(tmp_path, "run", *args, "--report", report)
        run.wait_for(held.is_set, what="the merge of img001 in flight")
        combined.write_bytes(b"my own words for this photo\n")
        release.set()
        assert run.wait() == 0, run.stderr
        dropped = [" ".join(default_reply_text(r).split()) for r in server.chat_requests()[asked:]
                   if subject_of(r) == 1]

        assert combined.read_bytes() == b"my own words for this photo\n"
        assert len(dropped) == 1
        assert lines_with(run.stdout, "edited during the run (kept):") == ["  edited during the run (kept): 1"]
        summary = summary_of(report)
        assert summary["edited_during_run"] == 1 and summary["left"] == {"vision": 0, "llm": 0} and summary["exit_code"] == 0
        assert recorded(ds).get("img001_combined.txt") != ec.digest(ec.cache_bytes(dropped[0]))  # no record of it

        asked = len(server.requests)
        code, out, err = run_main(capsys, *args)  # the next run treats it as any hand edit
        assert code == 0, err
        assert server.chat_requests()[asked:] == []
        assert combined.read_bytes() == b"my own words for this photo\n"
        kept = "edited by hand (kept): 1 (1 combined)" if before == "changed" else "adopted: 1 (1 combined)"
        assert kept in out


def test_a_trainer_caption_edited_by_hand_while_its_merge_is_in_flight_is_kept(tmp_path, capsys, model_dir):
    """--write_captions: the trainer's file follows its combined caption, after a last look of its own. The server
    holds the merge of img001 until the test has written img001's trainer file by hand."""
    ds = tmp_path / "ds"
    images = make_dataset(ds, 3)
    seed_generated(images)
    trainer, report = images[1].with_suffix(".caption"), tmp_path / "report.jsonl"
    reply, held, release = holding(1)

    with FakeLLMServer(reply=reply) as server:
        args = run_args(ds, model_dir("florence2"), server, "--write_captions", ".caption")
        release.set()
        assert run_main(capsys, *args)[0] == 0
        release.clear()
        copies = {image: image.with_suffix(".caption").read_bytes() for image in images}
        (ds / "img001.txt").write_text("subject1, photo number 1, now in the rain", encoding="utf-8")
        run = Cli(tmp_path, "run", *args, "--report", report)
        run.wait_for(held.is_set, what="the merge of img001 in flight")
        trainer.write_bytes(b"my own words for the trainer\n")
        release.set()
        assert run.wait() == 0, run.stderr

        assert trainer.read_bytes() == b"my own words for the trainer\n"
        assert b"now in the rain" in caches(images[1])[1].read_bytes()  # the combined caption itself moved on
        assert all(images[i].with_suffix(".caption").read_bytes() == copies[images[i]] for i in (0, 2))
        assert "  trainer captions: 0 written, 2 current, 0 edited by hand (kept)" in run.stdout.splitlines()
        assert lines_with(run.stdout, "edited during the run (kept):") == ["  edited during the run (kept): 1"]
        assert summary_of(report)["edited_during_run"] == 1
        assert recorded(ds).get("img001.caption") == ec.digest(copies[images[1]])  # no record of the dropped copy

        code, out, err = run_main(capsys, *args)  # the next run treats it as any hand edit
        assert code == 0, err
        assert trainer.read_bytes() == b"my own words for the trainer\n"
        assert "  trainer captions: 0 written, 2 current, 1 edited by hand (kept)" in out.splitlines()


# --------------------------------------------------------------------------------------------
# One plan for every process
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_files_added_while_two_processes_start_wait_for_the_next_run(tmp_path, capsys, model_dir):
    """New images (sorting first, vision captions cached) arrive once the main process has planned. Each planned
    image is merged once, by one of the two processes; the new ones are left alone, and the next run does them."""
    ds = tmp_path / "ds"
    images = make_dataset(ds, 8)
    seed_generated(images)
    new = [ds / f"a{i}.jpg" for i in range(4)]

    def add_files() -> None:
        for i, image in enumerate(new):
            make_image(image, 100 + i)
            image.with_suffix(".txt").write_text(f"subject{100 + i}, photo number {100 + i}", encoding="utf-8")
        seed_generated(new)

    reply, probed = on_probe(add_files)
    with FakeLLMServer(reply=reply, models=("listed-model",)) as server:
        args = run_args(ds, model_dir("florence2"), server, "--write_captions", ".caption")
        command, env = two_process_command(*args)
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert probed, result.stderr[-3000:]
        assert result.returncode == 0, result.stderr[-3000:]
        assert "split over 2 processes" in result.stdout + result.stderr
        assert merged_subjects(server) == list(range(8))  # each planned image once, no new one
        assert "llm: 8 done, 0 from cache, 0 failed" in result.stdout
        assert "left for the next run" not in result.stdout
        assert not any(caches(image)[1].exists() or image.with_suffix(".caption").exists() for image in new)
        # the trainer's copies, made by whichever process merged each, counted once in the main one's summary
        assert "  trainer captions: 8 written, 0 current, 0 edited by hand (kept)" in result.stdout.splitlines()
        assert all(image.with_suffix(".caption").read_bytes() == caches(image)[1].read_bytes() for image in images)

    with FakeLLMServer() as server:
        code, out, err = run_main(capsys, *run_args(ds, model_dir("florence2"), server, "--write_captions", ".caption"))
        assert code == 0, err
        assert merged_subjects(server) == [100, 101, 102, 103]
        assert all(caches(image)[1].exists() for image in new)
        assert "  trainer captions: 4 written, 8 current, 0 edited by hand (kept)" in out.splitlines()


# --------------------------------------------------------------------------------------------
# A sub-folder shares its dataset's records and lock
# --------------------------------------------------------------------------------------------


def test_a_run_on_a_sub_folder_after_an_edit_uses_the_datasets_records_and_lock(tmp_path, capsys, model_dir,
                                                                               llm_server):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 2) + make_dataset(ds / "sub", 2)
    seed_generated(images)
    model = model_dir("florence2")
    assert run_main(capsys, *run_args(ds, model, llm_server))[0] == 0
    (ds / "sub" / "img001.txt").write_text("a caption rewritten by hand, sub folder", encoding="utf-8")

    asked = len(llm_server.requests)
    code, out, err = run_main(capsys, *run_args(ds / "sub", model, llm_server))
    assert code == 0, err
    sent = llm_server.chat_requests()[asked:]
    assert len(sent) == 1 and "rewritten by hand, sub folder" in user_message(sent[0])
    assert f"records: {ds / ec.RECORDS_DIR}" in err
    assert not (ds / "sub" / ec.RECORDS_DIR).exists() and not (ds / "sub" / ec.LOCK_NAME).exists()
    assert recorded(ds)["sub/img001_combined.txt"] == ec.digest(caches(images[3])[1].read_bytes())

    asked = len(llm_server.requests)
    code, out, err = run_main(capsys, *run_args(ds, model, llm_server))  # the whole dataset: all current
    assert code == 0, err
    assert llm_server.chat_requests()[asked:] == []
    assert "edited by hand (kept): 0" in out

    lock = ec.DatasetLock(ds)  # another run on the dataset holds its lock: the sub-folder waits its turn
    assert lock.acquire() is None
    try:
        code, out, err = run_main(capsys, *run_args(ds / "sub", model, llm_server))
    finally:
        lock.release()
    assert code == 2 and f"is already working on {ds}" in err


def test_a_run_on_the_folder_above_a_dataset_refuses_and_misreads_nothing(tmp_path, capsys, model_dir, llm_server):
    """The mirror of the sub-folder case: above a dataset with records of its own, a run would start a second record
    set in which every cache of the dataset is unrecorded, so adopted as it is, and an edit made since the dataset's
    last run is never merged. It refuses instead, before any work, with one line naming the dataset."""
    parent = tmp_path / "lora"
    images = make_dataset(parent / "char_a", 2) + make_dataset(parent / "char_b", 1)
    seed_generated(images)
    model = model_dir("florence2")
    assert run_main(capsys, *run_args(parent / "char_a", model, llm_server))[0] == 0
    (parent / "char_a" / "img001.txt").write_text("a caption rewritten by hand, before the wider run", encoding="utf-8")

    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in parent.rglob("*") if p.is_file() and p.name != ec.LOCK_NAME}

    before = files()

    asked = len(llm_server.requests)
    for extra in ((), ("--dry_run",), ("--audit",)):
        code, out, err = run_main(capsys, *run_args(parent, model, llm_server, *extra))
        assert code == 2, out + err
        error = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and str(parent / "char_a") in error[0] and ec.RECORDS_DIR in error[0], err
    assert len(llm_server.requests) == asked
    assert files() == before and not (parent / ec.RECORDS_DIR).exists()  # no second record set, nothing written

    code, out, err = run_main(capsys, *run_args(parent / "char_a", model, llm_server))  # the dataset itself: fine
    assert code == 0, err
    sent = llm_server.chat_requests()[asked:]
    assert len(sent) == 1 and "rewritten by hand, before the wider run" in user_message(sent[0])

    # a dataset with records copied into a folder that has records too: neither record set is passed over, and
    # the line says how to keep one (a run on the dataset itself would meet the same two)
    (parent / ec.RECORDS_DIR).mkdir()
    for folder in (parent / "char_a", parent):
        code, out, err = run_main(capsys, *run_args(folder, model, llm_server))
        assert code == 2 and f"error: {parent / 'char_a'} keeps records of its own" in err, err
        assert f"Keep one: delete {parent / 'char_a' / ec.RECORDS_DIR}" in err, err


# --------------------------------------------------------------------------------------------
# A stop that cannot hang; errors that are never lost
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_while_progress_prints_without_a_terminal(tmp_path, model_dir, llm_server):
    """Output to files, so progress comes as lines every few seconds from the thread that runs the vision model."""
    ds = tmp_path / "ds"
    images = make_dataset(ds, 60)
    llm_server.hold()  # the merges wait until the signal has been sent: the run cannot end before it
    run = Cli(tmp_path, "run", *run_args(ds, model_dir("florence2"), llm_server, "--batch_size", "1"))
    run.wait_for(lambda: re.search(r"^vision: \d+/60 ", run.stderr, re.M), what="a progress line")
    run.proc.send_signal(signal.SIGTERM)
    llm_server.release()
    assert run.wait(120) == 143, run.stderr
    assert len(lines_with(run.stderr, "SIGTERM: stopping after the work in flight")) == 1
    written = [caches(image)[0] for image in images if caches(image)[0].exists()]
    assert 0 < len(written) <= len(images)
    assert all(path.read_bytes().endswith(b"\n") and path.read_bytes().strip() for path in written)
    assert re.search(rf"^vision: {len(written)} done, 0 from cache, 0 failed$", run.stdout, re.M), run.stdout
    assert tmp_files(ds) == []


def test_a_cache_that_cannot_be_written_fails_its_item_with_one_line(tmp_path, capsys, model_dir):
    """img001's vision cache path becomes a folder once planning is done: that image fails with one line, its merge
    is left for the next run, the others are captioned and merged, and the exit code says so."""
    ds = tmp_path / "ds"
    images = make_dataset(ds, 3)
    report = tmp_path / "report.jsonl"
    reply, probed = on_probe(lambda: caches(images[1])[0].mkdir())
    with FakeLLMServer(reply=reply, models=("listed-model",)) as server:
        code, out, err = run_main(capsys, *run_args(ds, model_dir("florence2"), server, "--report", report))
    assert probed and code == 1, err
    failed = lines_with(err, "FAILED")
    assert len(failed) == 1 and "img001.jpg [vision]: cannot write img001_generated.txt" in failed[0], err
    assert "vision: 2 done, 0 from cache, 1 failed" in out and "llm: 2 done" in out
    assert "left for the next run: 0 to caption, 1 to merge" in out
    assert caches(images[0])[1].exists() and caches(images[2])[1].exists()
    summary = summary_of(report)
    assert summary["left"] == {"vision": 0, "llm": 1} and summary["exit_code"] == 1


def test_an_error_of_any_kind_on_the_writer_thread_fails_the_item(tmp_path, model_dir):
    """The vision loop of the script with a tiny model; keeping one caption raises something other than OSError."""
    import torch

    ds = tmp_path / "ds"
    make_dataset(ds, 2)
    cfg = ec.Config(dataset_dir=ds, model_id=model_dir("florence2"), batch_size=2, num_workers=0, max_new_tokens=8)
    items = ec.plan_work(cfg).to_generate
    captioner = ec.load_captioner(cfg, torch.device("cpu"))
    stats, reporter = ec.Stats(), ec.Reporter(0, True)

    def keep(item, text):
        if item.image.name == "img001.jpg":
            raise RuntimeError("the disk is on fire")
        return "done"

    ec.caption_locally(items, captioner, cfg, stats, reporter.progress("vision", 2), reporter, threading.Event(),
                       keep, ec.claimed_chunks(2, 2))
    assert stats.counts[ec.STAGE_VISION] == {"done": 1, "failed": 1}
    assert [(Path(f.path).name, f.error) for f in stats.failures] == \
        [("img001.jpg", "cannot keep the caption: RuntimeError: the disk is on fire")]


# --------------------------------------------------------------------------------------------
# Bytes, dry runs, settings
# --------------------------------------------------------------------------------------------


def test_caches_are_the_bytes_their_records_name(tmp_path, capsys, model_dir, llm_server):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 3)
    code, out, err = run_main(capsys, *run_args(ds, model_dir("florence2"), llm_server, "--write_captions", ".caption"))
    assert code == 0, err
    records = recorded(ds)
    files = [p for p in ds.iterdir() if p.name.endswith(("_generated.txt", "_combined.txt", ".caption"))]
    assert len(files) == 3 * len(images)
    for path in files:
        data = path.read_bytes()
        assert b"\r" not in data and data.endswith(b"\n") and not data.endswith(b"\n\n"), path
        assert records[path.name] == ec.digest(data), path


def test_a_dry_run_with_a_caption_tokenizer_loads_nothing(tmp_path, capsys, monkeypatch):
    import transformers

    loads = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a))
    make_dataset(tmp_path / "ds", 2)
    code, out, err = run_main(capsys, "--dataset_dir", tmp_path / "ds", "--dry_run", "--max_caption_tokens", "77",
                              "--caption_tokenizer", tmp_path / "no-such-tokenizer")
    assert code == 0, err
    assert loads == []
    assert "dry run: 2 images" in out


def test_overlap_with_a_local_llm_is_said_once(tmp_path, capsys, model_dir):
    images = make_dataset(tmp_path / "ds", 2)
    seed_generated(images)
    code, out, err = run_main(capsys, "--dataset_dir", tmp_path / "ds", "--local_llm", model_dir("causal_lm"),
                              "--max_tokens", "48", "--overlap")
    assert code == 0, err
    assert len(lines_with(err, "--overlap has no effect with --local_llm")) == 1


def test_dtype_is_a_vision_setting_and_revision_a_local_llm_setting(tmp_path):
    base = ec.Config(dataset_dir=tmp_path)
    assert ec.run_settings(ec.dataclasses.replace(base, dtype="float16")).vision_id != ec.run_settings(base).vision_id
    local = ec.dataclasses.replace(base, local_llm="some/llm")
    assert ec.run_settings(ec.dataclasses.replace(local, revision="v2")).merge_ids[""] != \
        ec.run_settings(local).merge_ids[""]
