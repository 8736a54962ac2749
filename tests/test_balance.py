"""Several processes share a run by cost, not by count: each claims small chunks from per-stage counters in
torch.distributed's store as it goes, every item is done exactly once, and the end of the run waits for a process
that finishes long after the others without any collective that could time out."""
from __future__ import annotations

import datetime
import itertools
import json
import re
import subprocess
import threading
import time

import pytest

import enhance_captions as ec
from tests.conftest import (ROOT, caches, free_port, launch_command, make_dataset, report_failures, run_args,
                            seed_generated, two_process_env)
from tests.llm_server import FakeLLMServer, default_reply_text

SUBJECT = re.compile(r"subject(\d+), photo number")


def subject_of(request: dict) -> int:
    user = [m for m in request["messages"] if m["role"] == "user"][-1]["content"]
    return int(SUBJECT.search(user).group(1))




def tcp_store():
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))


# --------------------------------------------------------------------------------------------
# Chunks and the store, in one process
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total,size", [(0, 4), (1, 4), (10, 4), (12, 4), (7, 1)])
def test_alone_a_process_takes_every_chunk_in_order(total, size):
    chunks = list(ec.claimed_chunks(total, size))
    assert [i for chunk in chunks for i in chunk] == list(range(total))
    assert all(len(chunk) == size for chunk in chunks[:-1])


def test_processes_drawing_from_one_counter_do_every_item_once():
    counter, lock = itertools.count(), threading.Lock()

    def claim() -> int:
        with lock:
            return next(counter)

    done: list[list[int]] = [[], [], []]

    def process(rank: int) -> None:
        for chunk in ec.claimed_chunks(50, 3, claim):
            done[rank].extend(chunk)
            time.sleep(0.002 * (rank + 1))  # one process slower than the next

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(i for part in done for i in part) == list(range(50))


def test_shared_work_claims_through_the_store_one_counter_per_stage_and_run():
    store = tcp_store()
    a, b = ec.SharedWork(store, "run1", 0, 2), ec.SharedWork(store, "run1", 1, 2)
    vision_a, vision_b = a.chunks(ec.STAGE_VISION, 10, 4), b.chunks(ec.STAGE_VISION, 10, 4)
    assert [next(vision_a), next(vision_b), next(vision_a)] == [range(0, 4), range(4, 8), range(8, 10)]
    assert next(vision_b, None) is None and next(vision_a, None) is None
    assert list(b.items(ec.STAGE_LLM, "abcdef", 4)) == list("abcdef")  # the LLM stage has a counter of its own
    rerun = ec.SharedWork(store, "run2", 0, 2)  # a new run id in the same store starts from the first chunk
    assert next(rerun.chunks(ec.STAGE_VISION, 10, 4)) == range(0, 4)


def test_the_main_process_waits_for_late_stats_beyond_the_store_timeout():
    store = tcp_store()
    store.set_timeout(datetime.timedelta(seconds=0.3))  # the store's own timeout does not limit the wait
    from torch.distributed import TCPStore

    client = TCPStore("127.0.0.1", store.port, is_master=False)  # the other process's connection
    main, other = ec.SharedWork(store, "r", 0, 2), ec.SharedWork(client, "r", 1, 2)
    mine, theirs = ec.Stats(), ec.Stats()
    mine.count(ec.STAGE_LLM)
    theirs.count(ec.STAGE_LLM)
    theirs.fail("late.jpg", ec.STAGE_LLM, "bad reply")
    said: list[str] = []
    late = threading.Timer(0.9, lambda: other.gather(theirs, said.append))  # three times the store's timeout
    late.start()
    total = main.gather(mine, said.append)
    late.join()
    assert total.counts[ec.STAGE_LLM] == {"done": 2, "failed": 1}
    assert [f.path for f in total.failures] == ["late.jpg"]
    assert said == ["waiting for process 2 of 2 to finish its work"]


def test_finish_calls_no_collective(tmp_path, monkeypatch, capsys):
    """The end of a run is where processes arrive far apart: nothing there may wait on a collective."""
    import torch.distributed
    from accelerate import utils

    def collective(*args, **kwargs):
        raise AssertionError("a collective after the work")

    for name in ("gather_object", "broadcast_object_list", "wait_for_everyone"):
        monkeypatch.setattr(utils, name, collective, raising=False)
    for name in ("all_gather_object", "gather_object", "broadcast_object_list", "barrier", "all_gather"):
        monkeypatch.setattr(torch.distributed, name, collective)
    seed_generated(make_dataset(tmp_path / "ds", 2))  # planned: 2 merges, which the two processes' Stats hold
    cfg = ec.Config(dataset_dir=tmp_path / "ds", report=tmp_path / "report.jsonl")
    plan = ec.plan_work(cfg)
    store = tcp_store()
    theirs = ec.Stats()
    theirs.count(ec.STAGE_LLM)
    ec.SharedWork(store, "r", 1, 2).gather(theirs, print)
    state = type("State", (), {"num_processes": 2, "process_index": 0, "is_main_process": True})()
    mine = ec.Stats()
    mine.count(ec.STAGE_LLM)
    reporter = ec.Reporter(1, True, processes=2)
    assert ec.finish(cfg, plan, state, mine, reporter, ec.SharedWork(store, "r", 0, 2)) == ec.EXIT_OK
    assert "llm: 2 done" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.jsonl").read_text().splitlines()[-1])["summary"]["llm"]["done"] == 2


# --------------------------------------------------------------------------------------------
# Real runs under accelerate launch
# --------------------------------------------------------------------------------------------


def launch(*args, processes: int = 2, script=ec.__file__, timeout: float = 600):
    return subprocess.run(launch_command(*args, processes=processes, script=script), env=two_process_env(),
                          capture_output=True, text=True, timeout=timeout)


def slow_server(slow: set[int], seconds: float) -> tuple[FakeLLMServer, dict[int, float]]:
    """A loopback endpoint that answers the images whose subject is in `slow` in `seconds`, the others at once;
    records each answer's end. No answer goes out before both processes have a request in flight, so how late the
    second one starts (imports on a busy machine) has no part in who takes what."""
    ends: dict[int, float] = {}
    seen: set[tuple] = set()
    both = threading.Event()

    def reply(body):
        seen.update(server.peers)
        if len(seen) >= 2:
            both.set()
        assert both.wait(300), "the second process sent no request"
        subject = subject_of(body)
        if subject in slow:
            time.sleep(seconds)
        ends[subject] = time.monotonic()
        return default_reply_text(body)

    server = FakeLLMServer(reply=reply)
    return server, ends


def assert_merged_once(images, server: FakeLLMServer) -> None:
    assert sorted(subject_of(r) for r in server.chat_requests()) == list(range(len(images)))  # one request each
    for image in images:
        assert caches(image)[1].read_text(encoding="utf-8").strip()


@pytest.mark.slow
def test_two_processes_share_slow_merges_by_cost(tmp_path, model_dir):
    """32 images, the first 16 in sorted order slow at the endpoint, the rest answered at once, one request at a
    time per process. Split by count, one process would get all 16 slow ones and the other none; taken as they go,
    each takes a fair part of them (half, give or take how the requests interleave). How long it takes is
    measured in bench/ (--only balance), not asserted here."""
    images = make_dataset(tmp_path / "ds", 32)
    seed_generated(images)
    slow = set(range(16))
    server, ends = slow_server(slow, 0.25)
    with server:
        result = launch(*run_args(tmp_path / "ds", model_dir("florence2"), server, "--concurrency", "1"))
        requests, peers = server.chat_requests(), list(server.peers)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split over 2 processes" in result.stdout + result.stderr
    assert "llm: 32 done, 0 from cache, 0 failed" in result.stdout
    assert_merged_once(images, server)
    by_process: dict[tuple, list[int]] = {}  # one request at a time: each process keeps its one connection
    for request, peer in zip(requests, peers):
        by_process.setdefault(peer, []).append(subject_of(request))
    assert len(by_process) == 2, by_process
    slow_counts = sorted(len(slow.intersection(subjects)) for subjects in by_process.values())
    assert slow_counts[0] >= 4, slow_counts  # by count: [0, 16]


def long_timeout_wrapper(folder, seconds: int):
    """The script under a process group whose collectives time out after `seconds`: accelerate's PartialState
    takes init_process_group's timeout, and the script takes its state from make_state()."""
    wrapper = folder / "short_timeout.py"
    wrapper.write_text(f"""import datetime, sys
sys.path.insert(0, {str(ROOT)!r})
import enhance_captions as ec
from accelerate import PartialState

ec.make_state = lambda: PartialState(cpu=True, timeout=datetime.timedelta(seconds={seconds}))
ec.exit_process(ec.main())
""", encoding="utf-8")
    return wrapper


@pytest.mark.slow
def test_a_process_that_finishes_far_behind_the_other_still_gets_its_summary_report_and_export(tmp_path, model_dir):
    """One merge is answered only 9 s after the five others, so whichever process claims it finishes at least 9 s
    after the other, and the process group's collectives time out after 8 s. The summary, the report and the
    export still count every image."""
    images = make_dataset(tmp_path / "ds", 6)
    seed_generated(images)
    ends: dict[int, float] = {}

    def reply(body):
        subject = subject_of(body)
        if subject == 0:
            deadline = time.monotonic() + 300
            while len(ends) < 5 and time.monotonic() < deadline:  # the other process's merges, then its end
                time.sleep(0.01)
            time.sleep(9.0)
        ends[subject] = time.monotonic()
        return default_reply_text(body)

    server = FakeLLMServer(reply=reply)
    report, export = tmp_path / "report.jsonl", tmp_path / "ds" / "metadata.jsonl"
    with server:
        result = launch(*run_args(tmp_path / "ds", model_dir("florence2"), server, "--concurrency", "1",
                                  "--report", report, "--export", "metadata.jsonl"),
                        script=long_timeout_wrapper(tmp_path, 8))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split over 2 processes" in result.stdout + result.stderr
    assert "llm: 6 done, 0 from cache, 0 failed" in result.stdout
    assert_merged_once(images, server)
    assert report_failures(report) == []
    summary = json.loads(report.read_text().splitlines()[-1])["summary"]
    assert summary["exit_code"] == 0 and summary["llm"] == {"done": 6, "cached": 0, "failed": 0}
    assert len(export.read_text(encoding="utf-8").splitlines()) == 6
    assert ends[0] - max(end for subject, end in ends.items() if subject) > 8  # the processes ended far apart


@pytest.mark.slow
def test_three_processes_caption_and_merge_each_image_once(tmp_path, model_dir, llm_server):
    images = make_dataset(tmp_path / "ds", 9)
    result = launch(*run_args(tmp_path / "ds", model_dir("florence2"), llm_server, "--batch_size", "1"),
                    processes=3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split over 3 processes" in result.stdout + result.stderr
    assert "vision: 9 done, 0 from cache, 0 failed" in result.stdout and "llm: 9 done" in result.stdout
    assert_merged_once(images, llm_server)
    for image in images:
        assert caches(image)[0].read_text(encoding="utf-8").strip()


@pytest.mark.slow
def test_two_machines_on_loopback_take_their_work_from_one_store(tmp_path, model_dir, llm_server):
    """`accelerate launch --num_machines 2`, one launcher per machine rank, both on 127.0.0.1 and one folder."""
    images = make_dataset(tmp_path / "ds", 6)
    port = free_port()
    launchers = []
    for rank in (0, 1):
        options = ["--num_machines", "2", "--machine_rank", rank, "--main_process_ip", "127.0.0.1",
                   "--main_process_port", port]
        command = launch_command(*run_args(tmp_path / "ds", model_dir("florence2"), llm_server), options=options)
        launchers.append(subprocess.Popen(command, env=two_process_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = [launcher.communicate(timeout=600) for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], [err[-3000:] for _, err in outputs]
    out, err = outputs[0]
    assert "split over 2 processes" in out + err
    assert "vision: 6 done, 0 from cache, 0 failed" in out and "llm: 6 done, 0 from cache, 0 failed" in out
    assert not outputs[1][0].strip()  # the summary comes from the main process, on machine 0
    assert_merged_once(images, llm_server)
