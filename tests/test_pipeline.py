"""End to end: caches, resume, one LLM call per missing cache, errors, accelerate. The first run and the two-process
run go through the command line; the others call main() in this process."""
from __future__ import annotations

import shutil

import pytest

import enhance_captions as ec
from tests.conftest import (SCRIPT, caches, main_result, make_dataset, run_args, run_cli, run_two_processes,
                            user_message)
from tests.llm_server import sha12





@pytest.mark.slow
def test_first_run_writes_every_cache_and_each_merge_belongs_to_its_image(tmp_path, model_dir, llm_server):
    images = make_dataset(tmp_path / "ds", 5)
    result = run_cli(*run_args(tmp_path / "ds", model_dir("florence2"), llm_server))
    assert result.returncode == 0, result.stderr
    assert len(llm_server.requests) == 5
    system = (SCRIPT.parent / "system_prompt.txt").read_text(encoding="utf-8").strip()
    by_tag = {sha12(user_message(r)): r for r in llm_server.requests}
    for i, image in enumerate(images):
        generated, combined = caches(image)
        assert generated.read_text(encoding="utf-8").strip()
        text = combined.read_text(encoding="utf-8").strip()
        tag = text.split()[1]
        request = by_tag[tag]  # the reply written next to this image answers this image's own request
        message = user_message(request)
        assert f"subject{i}, photo number {i}" in message
        assert message.count(f"subject{i}, photo number {i}") == 1
        assert message.count(generated.read_text(encoding="utf-8").strip()) == 1
        assert request["messages"][0] == {"role": "system", "content": system}
    assert "vision: 5 done, 0 from cache, 0 failed" in result.stdout
    assert "llm: 5 done, 0 from cache, 0 failed" in result.stdout
    assert not list((tmp_path / "ds").glob(".*.tmp"))  # no temporary files left behind


@pytest.mark.slow
def test_rerun_loads_no_model_and_calls_nothing_then_redoes_one_deleted_merge(tmp_path, capsys, model_dir,
                                                                               llm_server):
    images = make_dataset(tmp_path / "ds", 4)
    model = tmp_path / "model"
    shutil.copytree(model_dir("florence2"), model)
    assert main_result(capsys, *run_args(tmp_path / "ds", model, llm_server)).returncode == 0
    before = {p: p.read_text() for p in (tmp_path / "ds").glob("*_*.txt")}
    assert len(before) == 8
    shutil.rmtree(model)  # a rerun that loaded the model would now fail
    rerun = main_result(capsys, *run_args(tmp_path / "ds", model, llm_server))
    assert rerun.returncode == 0, rerun.stderr
    assert len(llm_server.requests) == 4
    assert "llm: 0 done, 4 from cache, 0 failed" in rerun.stdout
    assert {p: p.read_text() for p in (tmp_path / "ds").glob("*_*.txt")} == before

    caches(images[2])[1].unlink()
    third = main_result(capsys, *run_args(tmp_path / "ds", model, llm_server))
    assert third.returncode == 0, third.stderr
    assert len(llm_server.requests) == 5
    assert "subject2, photo number 2" in user_message(llm_server.requests[-1])
    assert caches(images[2])[1].read_text() == before[caches(images[2])[1]]  # deterministic fake reply


def test_missing_manual_caption_and_empty_cache(tmp_path, capsys, model_dir, llm_server):
    images = make_dataset(tmp_path / "ds", 3)
    images[0].with_suffix(".txt").unlink()          # no manual caption at all
    images[1].with_suffix(".txt").write_text("  \n")  # an empty one counts the same
    generated, combined = caches(images[2])
    generated.write_text("")                        # an empty cache counts as missing
    combined.write_text("   \n")
    result = main_result(capsys, *run_args(tmp_path / "ds", model_dir("florence2"), llm_server))
    assert result.returncode == 0, result.stderr
    assert len(llm_server.requests) == 3
    for request in llm_server.requests:
        message = user_message(request)
        assert ". ." not in message and not message.startswith(". ")
        if "subject2" not in message:
            assert "There is no manual caption" in message
            assert "Manual caption" not in message
    assert generated.read_text().strip() and combined.read_text().strip()


@pytest.mark.slow
def test_no_cache_mode_writes_only_combined(tmp_path, capsys, model_dir, llm_server):
    images = make_dataset(tmp_path / "ds", 3)
    result = main_result(capsys, *run_args(tmp_path / "ds", model_dir("florence2"), llm_server,
                                           "--no-cache_generated_captions_to_disk"))
    assert result.returncode == 0, result.stderr
    for image in images:
        generated, combined = caches(image)
        assert not generated.exists()
        assert combined.read_text().strip()
    assert len(llm_server.requests) == 3


@pytest.mark.slow
def test_nested_folders_hidden_files_and_letter_case(tmp_path, capsys, model_dir, llm_server):
    from tests.conftest import make_image

    ds = tmp_path / "ds"
    make_image(ds / "a" / "b" / "deep.PNG", 1)
    make_image(ds / "top.JpEg", 2)
    make_image(ds / "x.webp", 3)
    make_image(ds / ".hidden" / "skip.jpg", 4)
    make_image(ds / "._apple.jpg", 5)
    (ds / "notes.gif").write_bytes(b"GIF89a")
    result = main_result(capsys, *run_args(ds, model_dir("florence2"), llm_server))
    assert result.returncode == 0, result.stderr
    assert sorted(p.relative_to(ds).as_posix() for p in ds.rglob("*_combined.txt")) == [
        "a/b/deep_combined.txt", "top_combined.txt", "x_combined.txt"]
    assert len(llm_server.requests) == 3


@pytest.mark.slow
def test_bad_flag_missing_folder_missing_prompt_file_exit_2(tmp_path, llm_server):
    make_dataset(tmp_path / "ds", 1)
    bad_flag = run_cli("--dataset_dir", tmp_path / "ds", "--no_such_flag")
    assert bad_flag.returncode == 2 and "--no_such_flag" in bad_flag.stderr
    missing = run_cli("--dataset_dir", tmp_path / "nope", "--base_url", llm_server.base_url)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_prompt = run_cli("--dataset_dir", tmp_path / "ds", "--system_prompt", tmp_path / "none.txt",
                        "--base_url", llm_server.base_url)
    assert no_prompt.returncode == 2 and "none.txt" in no_prompt.stderr
    assert llm_server.requests == []


def test_unreachable_endpoint_fails_before_any_model_loads(tmp_path, capsys, model_dir):
    import socket

    make_dataset(tmp_path / "ds", 2)
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = main_result(capsys, "--dataset_dir", tmp_path / "ds", "--model_id", model_dir("florence2"),
                         "--base_url", f"http://127.0.0.1:{port}/v1", "--max_retries", "0")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "cannot reach" in lines[0]
    assert not list((tmp_path / "ds").glob("*_generated.txt"))


@pytest.mark.slow
def test_failed_llm_item_is_reported_not_cached_and_run_goes_on(tmp_path, capsys, model_dir, llm_server):
    from tests.llm_server import status

    images = make_dataset(tmp_path / "ds", 3)
    llm_server.script(*[status(400)] * 1)  # a non-retryable answer for the first request
    result = main_result(capsys, *run_args(tmp_path / "ds", model_dir("florence2"), llm_server,
                                           "--concurrency", "1"))
    assert result.returncode == 1
    done = [image for image in images if caches(image)[1].exists()]
    assert len(done) == 2
    assert "llm: 2 done, 0 from cache, 1 failed" in result.stdout
    assert "FAILED" in result.stderr and "400" in result.stderr


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_chat_model_end_to_end(tmp_path, capsys, model_dir, llm_server, family):
    images = make_dataset(tmp_path / "ds", 3)
    result = main_result(capsys, *run_args(tmp_path / "ds", model_dir(family), llm_server))
    assert result.returncode == 0, result.stderr
    for image in images:
        text = caches(image)[0].read_text()
        assert text.strip()
        assert ec.DEFAULT_CHAT_PROMPT not in text and "assistant" not in text.lower()


@pytest.mark.slow
def test_two_process_accelerate_launch_captions_each_image_once(tmp_path, model_dir, llm_server):
    images = make_dataset(tmp_path / "ds", 7)
    result = run_two_processes(*run_args(tmp_path / "ds", model_dir("florence2"), llm_server))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split over 2 processes" in result.stdout + result.stderr  # the world size really is 2
    assert len(llm_server.requests) == 7
    tags = sorted(sha12(user_message(r)) for r in llm_server.requests)
    assert len(set(tags)) == 7  # each image merged exactly once
    for image in images:
        assert all(p.read_text().strip() for p in caches(image))
    assert "vision: 7 done" in result.stdout and "llm: 7 done" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_starts_merging_while_the_vision_model_works(tmp_path, model_dir, overlap):
    """With --overlap some LLM request arrives before the last caption is written; without it none does."""
    from tests.llm_server import FakeLLMServer, default_reply_text

    images = make_dataset(tmp_path / "ds", 12)
    seen: list[int] = []

    def reply(body):
        seen.append(sum(caches(image)[0].exists() for image in images))
        return default_reply_text(body)

    with FakeLLMServer(reply=reply) as server:
        argv = run_args(tmp_path / "ds", model_dir("florence2"), server, "--batch_size", "1")
        rc = ec.main([str(a) for a in argv] + (["--overlap"] if overlap else []))
    assert rc == 0 and len(seen) == 12
    if overlap:
        assert min(seen) < 12
    else:
        assert min(seen) == 12
