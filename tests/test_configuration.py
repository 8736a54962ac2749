"""Configuration errors before any work: the endpoint serves the model, no provider's model name by default, each
endpoint gets its own key, no guessing between backends, fast failures when a model cannot be fetched, the
Python version, the install files, and the one-line description of what a run uses."""
from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

import enhance_captions as ec
from tests.conftest import (ROOT, SCRIPT, caches, cli_env, free_port, make_dataset, run_args, run_cli, run_main,
                            run_two_processes, seed_generated)
from tests.llm_server import FakeLLMServer, status

LLM_SECRET = "sk-llm-0f5e1d2c3b4a-only-for-the-llm"
VLM_SECRET = "sk-vlm-9a8b7c6d5e4f-only-for-vision"




def corrupt_model(tmp_path: Path) -> Path:
    """A folder that looks like a model but cannot load: an error about it means a load was tried."""
    folder = tmp_path / "corrupt-model"
    folder.mkdir()
    (folder / "config.json").write_text("{ this is not json", encoding="utf-8")
    (folder / "preprocessor_config.json").write_text("{ nor this", encoding="utf-8")
    return folder


def without_model(args: list[str]) -> list[str]:
    i = args.index("--model")
    return args[:i] + args[i + 2:]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error")]


def probes(server: FakeLLMServer) -> list[dict]:
    return [r for r in server.requests if r.get("max_tokens") == 1]


# --------------------------------------------------------------------------------------------
# 1. The endpoint serves the model, proven before any model loads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code, explanation", [(404, "does not exist"), (400, "pinned")])
def test_a_model_the_endpoint_does_not_serve_stops_the_run_before_the_vision_model_loads(
        tmp_path, capsys, code, explanation):
    images = make_dataset(tmp_path / "ds", 2)  # nothing cached: the vision stage would load the model first
    with FakeLLMServer(models=("served-a", "served-b"), unknown_model=code) as server:
        args = run_args(tmp_path / "ds", corrupt_model(tmp_path), server)
        args[args.index("--model") + 1] = "wanted-model"
        exit_code, out, err = run_main(capsys, *args)
    assert exit_code == 2, out + err
    [line] = error_lines(err)
    assert "wanted-model" in line and "served-a" in line and "served-b" in line and str(code) in line
    assert explanation in line  # the server's own words, not the client's `Error code: 400 - {...}`
    assert "Error code" not in line and "corrupt-model" not in err  # no vision load was tried
    assert len(server.requests) == 1 and server.requests[0]["max_tokens"] == 1  # one probe, no merge
    assert not any(caches(image)[0].exists() for image in images)


def test_a_server_that_answers_to_any_name_keeps_working(tmp_path, capsys):
    """llama.cpp lists one name and answers whatever model a request names: the probe's 200 lets the run go on."""
    images = make_dataset(tmp_path / "ds", 2)
    seed_generated(images)
    with FakeLLMServer(models=("the-gguf-file",)) as server:
        args = run_args(tmp_path / "ds", corrupt_model(tmp_path), server)
        args[args.index("--model") + 1] = "llama3.1"
        exit_code, out, err = run_main(capsys, *args)
    assert exit_code == 0, out + err
    assert len(probes(server)) == 1
    merges = [r for r in server.requests if r.get("max_tokens") != 1]
    assert len(merges) == 2 and {r["model"] for r in merges} == {"llama3.1"}
    assert all(caches(image)[1].read_text(encoding="utf-8").strip() for image in images)


def test_a_listed_model_costs_no_probe(tmp_path, capsys, llm_server):
    images = make_dataset(tmp_path / "ds", 2)
    seed_generated(images)
    exit_code, out, err = run_main(capsys, *run_args(tmp_path / "ds", corrupt_model(tmp_path), llm_server))
    assert exit_code == 0, out + err
    assert not probes(llm_server) and len(llm_server.requests) == 2


def test_a_vision_model_the_vision_endpoint_does_not_serve_stops_the_run_before_any_caption(tmp_path, capsys):
    images = make_dataset(tmp_path / "ds", 2)
    with FakeLLMServer(models=("vision-a",), unknown_model=404) as vision, FakeLLMServer() as llm:
        exit_code, out, err = run_main(capsys, *run_args(tmp_path / "ds", corrupt_model(tmp_path), llm),
                                       "--vlm_base_url", vision.base_url, "--vlm_model", "vision-wanted")
        vision_requests, llm_requests = vision.chat_requests(), llm.chat_requests()
    assert exit_code == 2, out + err
    [line] = error_lines(err)
    assert "vision-wanted" in line and "vision-a" in line and "--vlm_model" in line and "404" in line
    assert len(vision_requests) == 1 and vision_requests[0]["max_tokens"] == 1
    assert llm_requests == []
    assert not any(caches(image)[0].exists() for image in images)


def test_a_4xx_mid_run_shows_the_servers_first_line_with_the_key_redacted(tmp_path, capsys, llm_server,
                                                                         monkeypatch):
    images = make_dataset(tmp_path / "ds", 2)
    seed_generated(images)
    monkeypatch.setenv("OPENAI_API_KEY", LLM_SECRET)
    message = f"This model's maximum context length is 256 tokens (key {LLM_SECRET}).\nA second line of detail."
    llm_server.reply = lambda body: status(400, body={"error": {"message": message, "type": "invalid_request_error",
                                                                "param": None, "code": None}})
    exit_code, out, err = run_main(capsys, *run_args(tmp_path / "ds", corrupt_model(tmp_path), llm_server),
                                   "--max_retries", "0")
    assert exit_code == 1, out + err
    failed = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2
    for line in failed:
        assert "400: This model's maximum context length is 256 tokens (key ***)." in line, line
        assert "Error code" not in line and "second line" not in line
    assert LLM_SECRET not in out + err


@pytest.mark.slow
@pytest.mark.xdist_group("transformers_serve")
def test_transformers_serve_asked_for_a_model_it_does_not_serve(tmp_path, transformers_serve):
    base_url, served = transformers_serve
    images = make_dataset(tmp_path / "ds", 2)
    result = run_cli("--dataset_dir", tmp_path / "ds", "--model_id", corrupt_model(tmp_path),
                     "--base_url", base_url, "--model", "some-other-model", timeout=240)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = error_lines(result.stderr)
    assert "some-other-model" in line and served in line, line
    assert not any(caches(image)[0].exists() for image in images)


# --------------------------------------------------------------------------------------------
# 2. No provider's model name by default
# --------------------------------------------------------------------------------------------


def test_without_a_model_the_endpoints_only_model_is_used_and_named(tmp_path, capsys):
    images = make_dataset(tmp_path / "ds", 2)
    seed_generated(images)
    with FakeLLMServer(models=("the-only-one",), unknown_model=404) as server:
        exit_code, out, err = run_main(capsys, *without_model(run_args(tmp_path / "ds", corrupt_model(tmp_path),
                                                                       server)))
    assert exit_code == 0, out + err
    assert len(server.requests) == 2 and {r["model"] for r in server.requests} == {"the-only-one"}
    first = next(line for line in err.splitlines() if line.strip())
    assert "the-only-one" in first, err


@pytest.mark.slow
def test_the_model_the_main_process_found_is_used_by_every_process(tmp_path):
    images = make_dataset(tmp_path / "ds", 4)
    seed_generated(images)
    with FakeLLMServer(models=("the-only-one",), unknown_model=404) as server:
        result = run_two_processes(*without_model(run_args(tmp_path / "ds", corrupt_model(tmp_path), server)))
        requests = server.chat_requests()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "split over 2 processes" in result.stdout + result.stderr
    assert len(requests) == 4 and {r["model"] for r in requests} == {"the-only-one"}


def test_openai_model_in_the_environment_names_the_model(tmp_path, capsys, monkeypatch):
    images = make_dataset(tmp_path / "ds", 2)
    seed_generated(images)
    monkeypatch.setenv("OPENAI_MODEL", "model-b")
    with FakeLLMServer(models=("model-a", "model-b"), unknown_model=404) as server:
        exit_code, out, err = run_main(capsys, *without_model(run_args(tmp_path / "ds", corrupt_model(tmp_path),
                                                                       server)))
    assert exit_code == 0, out + err
    assert {r["model"] for r in server.requests} == {"model-b"} and len(server.requests) == 2


@pytest.mark.parametrize("models, expected", [(("model-a", "model-b"), ["model-a", "model-b", "2 models"]),
                                               ((), ["lists no models"])])
def test_without_a_model_an_endpoint_with_several_or_none_is_a_configuration_error(
        tmp_path, capsys, models, expected):
    make_dataset(tmp_path / "ds", 2)
    with FakeLLMServer(models=models) as server:
        exit_code, out, err = run_main(capsys, *without_model(run_args(tmp_path / "ds", corrupt_model(tmp_path),
                                                                       server)))
        assert server.requests == []
    assert exit_code == 2, out + err
    [line] = error_lines(err)
    assert all(text in line for text in expected) and "--model" in line and "OPENAI_MODEL" in line, line


def test_the_dry_run_chooses_no_model_and_calls_nothing(tmp_path, capsys):
    """The dry run calls nothing: an endpoint on a closed port is fine, and the model is left to the real run."""
    make_dataset(tmp_path / "ds", 2)
    closed = f"http://127.0.0.1:{free_port()}/v1"
    args = ["--dataset_dir", tmp_path / "ds", "--base_url", closed, "--dry_run"]
    exit_code, out, err = run_main(capsys, *args)
    assert exit_code == 0, out + err
    cfg = ec.config_from_args(ec.build_parser().parse_args([str(a) for a in args]))
    assert cfg.model is None
    assert "chosen from the endpoint's list" in ec.run_description(cfg)


# --------------------------------------------------------------------------------------------
# 3. Keys kept apart
# --------------------------------------------------------------------------------------------


def vision_and_llm_run(tmp_path, capsys, vision: FakeLLMServer, llm: FakeLLMServer, *extra) -> tuple:
    make_dataset(tmp_path / "ds", 2)
    report = tmp_path / "report.jsonl"
    result = run_main(capsys, *run_args(tmp_path / "ds", corrupt_model(tmp_path), llm),
                      "--vlm_base_url", vision.base_url, "--vlm_model", "test-model", "--report", report, "-v", *extra)
    return (*result, report.read_text(encoding="utf-8") if report.exists() else "")


@pytest.mark.parametrize("how", ["environment", "flag"])
def test_each_endpoint_gets_its_own_key_and_no_key_reaches_the_output(tmp_path, capsys, monkeypatch, how):
    monkeypatch.setenv("OPENAI_API_KEY", LLM_SECRET)
    extra = []
    if how == "environment":
        monkeypatch.setenv("VLM_API_KEY", VLM_SECRET)
    else:
        extra = ["--vlm_api_key", VLM_SECRET]
    with FakeLLMServer(api_key=VLM_SECRET) as vision, FakeLLMServer(api_key=LLM_SECRET) as llm:
        exit_code, out, err, report = vision_and_llm_run(tmp_path, capsys, vision, llm, *extra)
        vision_keys = {h["authorization"] for h in vision.headers}
        llm_keys = {h["authorization"] for h in llm.headers}
    assert exit_code == 0, out + err
    assert vision_keys == {f"Bearer {VLM_SECRET}"} and llm_keys == {f"Bearer {LLM_SECRET}"}
    assert len(vision.requests) == 2 and len(llm.requests) == 2
    for text in (out, err, report):
        assert LLM_SECRET not in text and VLM_SECRET not in text


def test_the_llm_key_does_not_go_to_another_server(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", LLM_SECRET)
    with FakeLLMServer() as vision, FakeLLMServer(api_key=LLM_SECRET) as llm:
        exit_code, out, err, report = vision_and_llm_run(tmp_path, capsys, vision, llm)
        vision_keys = {h["authorization"] for h in vision.headers}
    assert exit_code == 0, out + err
    assert len(vision.requests) == 2 and not any(LLM_SECRET in key for key in vision_keys)
    assert LLM_SECRET not in out + err + report


def test_the_llm_key_goes_to_a_vision_endpoint_on_the_same_server(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", LLM_SECRET)
    with FakeLLMServer(api_key=LLM_SECRET) as server:
        exit_code, out, err, report = vision_and_llm_run(tmp_path, capsys, server, server)
        keys = {h["authorization"] for h in server.headers}
    assert exit_code == 0, out + err
    assert keys == {f"Bearer {LLM_SECRET}"} and len(server.requests) == 4
    assert LLM_SECRET not in out + err + report


def test_a_refused_vision_key_names_the_vision_key_and_is_redacted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLM_API_KEY", VLM_SECRET)
    with FakeLLMServer(api_key="another-key") as vision, FakeLLMServer() as llm:
        exit_code, out, err, report = vision_and_llm_run(tmp_path, capsys, vision, llm)
    assert exit_code == 2, out + err
    [line] = error_lines(err)
    assert "401" in line and "VLM_API_KEY" in line
    assert VLM_SECRET not in out + err + report


@pytest.mark.parametrize("url, other, same", [
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/other/v1", True),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1", False),
    ("http://example.com/v1", "https://example.com/v1", False),
    ("https://api.openai.com/v1", "https://API.openai.com:443/", True),
    ("http://localhost/v1", "http://localhost:80", True),
    ("http://user:pw@host:1/v1", "http://host:1/v1", True),
])
def test_same_origin(url, other, same):
    assert ec.same_origin(url, other) is same


# --------------------------------------------------------------------------------------------
# 4. No guessing between backends
# --------------------------------------------------------------------------------------------


def test_local_llm_and_base_url_together_is_a_configuration_error(tmp_path, capsys, llm_server):
    make_dataset(tmp_path / "ds", 1)
    exit_code, out, err = run_main(capsys, *run_args(tmp_path / "ds", corrupt_model(tmp_path), llm_server),
                                   "--local_llm", tmp_path / "some-llm")
    assert exit_code == 2
    [line] = error_lines(err)
    assert "--local_llm" in line and "drop --base_url" in line
    assert llm_server.requests == []


@pytest.mark.slow
def test_local_llm_flag_wins_over_the_environments_endpoint_and_says_so(tmp_path, capsys, monkeypatch, model_dir,
                                                                        llm_server):
    monkeypatch.setattr(ec, "SCRIPT_DIR", tmp_path)  # no .env beside the script
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.base_url)
    images = make_dataset(tmp_path / "ds", 2)
    seed_generated(images)
    exit_code, out, err = run_main(capsys, "--dataset_dir", tmp_path / "ds", "--model_id", corrupt_model(tmp_path),
                                   "--local_llm", model_dir("causal_lm"), "--max_tokens", "48")  # room to end
    assert exit_code == 0, out + err
    first = next(line for line in err.splitlines() if line.strip())
    assert "local LLM" in first and "--local_llm wins over OPENAI_BASE_URL" in first, err
    assert llm_server.requests == []
    assert all(caches(image)[1].read_text(encoding="utf-8").strip() for image in images)


# --------------------------------------------------------------------------------------------
# 5. Fast, clear failures when a model cannot be fetched
# --------------------------------------------------------------------------------------------


def hub_down_env(tmp_path: Path) -> dict[str, str]:
    """The Hub on a closed loopback port, an empty cache, and offline mode off: a download would be tried."""
    env = cli_env(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "empty-hf-home"))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(key, None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--model_id", "--local_llm"])
def test_a_hub_id_with_the_hub_unreachable_fails_at_once_with_how_to_run_offline(tmp_path, flag):
    images = make_dataset(tmp_path / "ds", 2)
    if flag == "--local_llm":
        seed_generated(images)
        args = ["--model_id", corrupt_model(tmp_path), "--local_llm", "nobody/no-such-llm"]
    else:
        args = ["--model_id", "nobody/no-such-vlm", "--local_llm", corrupt_model(tmp_path)]  # fails first
    # The timeout is a hang guard: huggingface_hub's own retries took minutes here.
    result = run_cli("--dataset_dir", tmp_path / "ds", *args, env=hub_down_env(tmp_path), timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = error_lines(result.stderr)
    assert "Hugging Face Hub" in line and "no-such-" in line and flag in line
    assert "HF_HUB_OFFLINE=1" in line and "local folder" in line
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_offline_a_hub_id_not_in_the_cache_says_how_to_download_it(tmp_path):
    make_dataset(tmp_path / "ds", 1)
    env = cli_env(HF_HOME=str(tmp_path / "empty-hf-home"))  # offline, as every test
    result = run_cli("--dataset_dir", tmp_path / "ds", "--model_id", "nobody/no-such-vlm", "--local_llm",
                     corrupt_model(tmp_path), env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = error_lines(result.stderr)
    assert "not in the model cache" in line and "hf download nobody/no-such-vlm" in line


@pytest.mark.parametrize("flag", ["--model_id", "--local_llm"])
@pytest.mark.parametrize("path", ["./no-such-folder", "~/no-such-folder-for-enhance-captions", "/no/such/folder"])
def test_a_path_that_is_no_folder_is_named(tmp_path, capsys, llm_server, flag, path):
    images = make_dataset(tmp_path / "ds", 1)
    if flag == "--local_llm":
        seed_generated(images)
        args = ["--dataset_dir", tmp_path / "ds", "--model_id", corrupt_model(tmp_path), "--local_llm", path]
    else:
        args = run_args(tmp_path / "ds", path, llm_server)
    exit_code, out, err = run_main(capsys, *args)
    assert exit_code == 2, out + err
    assert error_lines(err) == [f"error: {flag}: no such folder: {path}"]
    assert llm_server.requests == []


# --------------------------------------------------------------------------------------------
# 6. requires-python tells the truth
# --------------------------------------------------------------------------------------------


def pep723_header() -> str:
    return SCRIPT.read_text(encoding="utf-8").split("# ///", 2)[1]


def test_the_script_declares_python_3_11():
    assert 'requires-python = ">=3.11"' in pep723_header()


def test_every_runtime_requirement_is_in_the_pep723_header():
    header = pep723_header()
    names = [re.split(r"[<>=\[ #]", line.strip(), maxsplit=1)[0]
             for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert names and not [n for n in names if f'"{n}' not in header]


def python_3_10() -> str | None:
    """Any Python 3.10 here: on PATH, through pyenv, or one that uv knows; each is asked its version, since a
    pyenv shim exists for versions that are not active."""
    candidates = [shutil.which("python3.10")]
    for tool, args in (("pyenv", ["which", "python3.10"]), ("uv", ["python", "find", "3.10"])):
        if shutil.which(tool):
            found = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
            candidates.append(found.stdout.strip() if found.returncode == 0 else None)
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python")))
    for candidate in filter(None, candidates):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            asked = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True, timeout=60)
            if asked.stdout.strip() == "(3, 10)":
                return candidate
    return None


@pytest.mark.slow
def test_python_3_10_exits_2_with_one_line(tmp_path):
    python = python_3_10()
    if python is None:
        pytest.skip("no Python 3.10 on PATH, through pyenv or through uv")
    make_dataset(tmp_path / "ds", 1)
    result = run_cli("--dataset_dir", tmp_path / "ds", launcher=[python, str(SCRIPT)], timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "needs Python 3.11 or newer" in result.stderr and "3.10" in result.stderr


def test_wait_future_waits_past_a_slice_and_returns_once_the_future_is_done():
    future: concurrent.futures.Future = concurrent.futures.Future()
    returned = threading.Event()
    waiter = threading.Thread(target=lambda: (ec.wait_future(future), returned.set()), daemon=True)
    waiter.start()
    assert not returned.wait(0.5)  # more than one 0.2 s slice: still waiting for the future
    future.set_result(None)
    assert returned.wait(60), "wait_future did not return after its future was done"


# --------------------------------------------------------------------------------------------
# 7. Installing
# --------------------------------------------------------------------------------------------


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.split("#")[0].strip()]


def test_no_file_a_gpu_user_installs_pins_torch_and_only_ci_does():
    """A GPU machine keeps its own CUDA build of torch: requirements.txt, requirements-dev.txt and the PEP 723
    block may ask for a floor, never a version; CI pins the builds it has on disk through its constraints."""
    header = [line.lstrip("# ").strip().strip('",') for line in pep723_header().splitlines() if '"' in line]
    for source, lines in (("requirements.txt", requirement_lines(ROOT / "requirements.txt")),
                          ("requirements-dev.txt", requirement_lines(ROOT / "requirements-dev.txt")),
                          ("the PEP 723 block", header)):
        torch = [line for line in lines if re.match(r"torch(vision)?\b", line)]
        assert not [line for line in torch if re.search(r"==|<|~=|===|@", line)], (source, torch)
    assert "datasets" in requirement_lines(ROOT / "requirements-dev.txt")
    pins = requirement_lines(ROOT / ".ci" / "constraints.txt")
    assert [line for line in pins if line.startswith("torch==")] and all("==" in line for line in pins)
    assert "-r requirements-dev.txt -c .ci/constraints.txt" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# 8. run_description
# --------------------------------------------------------------------------------------------


def config(tmp_path: Path, *args: str) -> ec.Config:
    make_dataset(tmp_path / "ds", 1)
    return ec.config_from_args(ec.build_parser().parse_args(["--dataset_dir", str(tmp_path / "ds"), *args]))


def test_run_description_names_the_models_and_hides_credentials(tmp_path, monkeypatch):
    monkeypatch.setattr(ec, "SCRIPT_DIR", tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", LLM_SECRET)
    cfg = config(tmp_path, "--model_id", "org/vision", "--base_url", "http://user:pw@127.0.0.1:9/v1",
                 "--model", "merger")
    text = ec.run_description(cfg)
    assert "org/vision" in text and "merger" in text and "127.0.0.1:9" in text
    assert "pw" not in text and LLM_SECRET not in text
    served = ec.run_description(config(tmp_path, "--vlm_base_url", "http://k:secret@127.0.0.1:8/v1",
                                       "--vlm_model", "seer", "--local_llm", "org/llm"))
    assert "served seer at http://***@127.0.0.1:8/v1" in served and "local LLM org/llm" in served
    chosen = ec.run_description(ec.dataclasses.replace(cfg, model="solo", model_from_list=True))
    assert "solo (the one model the endpoint lists)" in chosen


def test_env_example_names_the_new_variables():
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert re.search(r"^OPENAI_MODEL=", example, re.M) and re.search(r"^VLM_API_KEY=", example, re.M)
