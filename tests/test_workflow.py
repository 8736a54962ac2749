"""The workflow around a run: the built-in local LLM, a real `transformers serve` endpoint, --dry_run,
--limit, --overwrite, --export, --caption_extension, logs for humans and for cron, --help and the docs."""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import enhance_captions as ec
from tests.conftest import (ROOT, SCRIPT, caches, cli_env, make_dataset, make_image, run_args, run_cli, run_main,
                           user_message)
from tests.llm_server import status

PROGRESS_LINE = re.compile(r"\w+: \d+/\d+ \(.*/s, ETA")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def short_prompt(tmp_path: Path) -> Path:
    path = tmp_path / "short_prompt.txt"
    path.write_text("Merge the two captions into one short caption.", encoding="utf-8")
    return path


def vision_args(model) -> list:
    return ["--model_id", model, "--batch_size", "2", "--num_workers", "0", "--max_new_tokens", "8"]






def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder (hidden ones too): content and mtime."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def set_old_mtime(paths) -> int:
    old = 1_000_000_000
    for path in paths:
        os.utime(path, (old, old))
    return old * 1_000_000_000


def no_endpoint_env(monkeypatch, folder: Path) -> None:
    """No endpoint in the environment, nor in a .env file beside the script (config_from_args reads both)."""
    for key in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(ec, "SCRIPT_DIR", folder)


# --------------------------------------------------------------------------------------------
# 1. The built-in local LLM
# --------------------------------------------------------------------------------------------


def test_local_llm_merges_in_process_batched_with_the_system_prompt_cleaned_and_cached(
        tmp_path, model_dir, capsys, monkeypatch):
    no_endpoint_env(monkeypatch, tmp_path)
    images = make_dataset(tmp_path / "ds", 4)
    prompt = short_prompt(tmp_path)
    llm = model_dir("causal_lm")

    batches: list[list[list[dict]]] = []
    original = ec.LocalChat._generate

    def spy(self, conversations, *rest):  # the real generate; its replies get a preamble the cleaning must remove
        batches.append(conversations)
        return [ec.Reply("Here is the combined caption: " + r.text, r.finish_reason)
                for r in original(self, conversations, *rest)]

    monkeypatch.setattr(ec.LocalChat, "_generate", spy)
    args = ["--dataset_dir", tmp_path / "ds", *vision_args(model_dir("florence2")), "--batch_size", "4",
            "--local_llm", llm, "--system_prompt", prompt, "--max_tokens", "24"]
    code, out, err = run_main(capsys, *args)
    assert code == 0, out + err
    for image in images:
        generated, combined = caches(image)
        assert generated.read_text(encoding="utf-8").strip()
        text = combined.read_text(encoding="utf-8").strip()
        assert text and "Here is" not in text and "caption:" not in text  # cleaned like an endpoint's reply
    first_lines = [line for line in err.splitlines() if line.strip()][:2]
    assert any("local" in line.lower() and llm in line for line in first_lines), err
    conversations = [c for batch in batches for c in batch]
    assert max(len(batch) for batch in batches) > 1  # batched, not one generate call per image
    system = prompt.read_text(encoding="utf-8").strip()
    assert all(c[0] == {"role": "system", "content": system} for c in conversations)
    subjects = [next(i for i in range(4) if f"subject{i}, photo number {i}" in user_message({"messages": c}))
                for c in conversations]
    # Each image asked; which images share a batch depends on timing, and a random-weight reply cut off in one
    # batch is asked again (retries are test_requests' subject), within the default --max_retries 5.
    assert sorted(set(subjects)) == [0, 1, 2, 3] and max(subjects.count(i) for i in range(4)) <= 6, subjects

    # The same caches: a rerun loads no model (neither path exists any more) and writes nothing.
    before = snapshot(tmp_path / "ds")
    code, out, err = run_main(capsys, "--dataset_dir", tmp_path / "ds", *vision_args(tmp_path / "gone-vlm"),
                              "--local_llm", tmp_path / "gone-llm", "--system_prompt", prompt)
    assert code == 0, out + err
    after = snapshot(tmp_path / "ds")
    assert {k: v for k, v in after.items() if not k.startswith(".")} == \
        {k: v for k, v in before.items() if not k.startswith(".")}


def test_local_llm_is_the_default_backend_only_without_endpoint_or_key(tmp_path, monkeypatch):
    no_endpoint_env(monkeypatch, tmp_path)
    make_dataset(tmp_path / "ds", 1)

    def config():
        return ec.config_from_args(ec.build_parser().parse_args(["--dataset_dir", str(tmp_path / "ds")]))

    assert config().local_llm == ec.DEFAULT_LOCAL_LLM
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert config().local_llm is None
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert config().local_llm is None
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = ec.config_from_args(ec.build_parser().parse_args(
        ["--dataset_dir", str(tmp_path / "ds"), "--base_url", "http://127.0.0.1:9/v1"]))
    assert cfg.local_llm is None


def test_a_local_llm_that_cannot_be_loaded_is_a_one_line_configuration_error(tmp_path, capsys, monkeypatch):
    """Like an endpoint that is down or a vision model that cannot load: exit 2 with one line, no traceback."""
    no_endpoint_env(monkeypatch, tmp_path)
    images = make_dataset(tmp_path / "ds", 2)
    for image in images:  # vision captions cached: only the merge is left to do
        caches(image)[0].write_text(f"generated for {image.stem}", encoding="utf-8")
    try:
        code, out, err = run_main(capsys, "--dataset_dir", tmp_path / "ds", "--model_id", tmp_path / "no-model",
                                  "--local_llm", tmp_path / "no-such-llm", "--system_prompt", short_prompt(tmp_path))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"main() raised {type(e).__name__}: {e} instead of exiting 2 with one line")
    assert code == 2, out + err
    assert "no-such-llm" in err and "Traceback" not in err
    assert not any(caches(image)[1].exists() for image in images)


@pytest.mark.slow
def test_dotenv_in_the_working_directory_sets_the_endpoint(tmp_path, llm_server):
    images = make_dataset(tmp_path / "ds", 2)
    for image in images:  # vision captions cached: only the merge runs
        caches(image)[0].write_text(f"generated for {image.stem}", encoding="utf-8")
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".env").write_text(f"OPENAI_BASE_URL={llm_server.base_url}\n", encoding="utf-8")
    result = run_cli("--dataset_dir", tmp_path / "ds", "--model_id", tmp_path / "no-model", "--model", "test-model",
                     cwd=workdir, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(llm_server.requests) == 2
    assert all(caches(image)[1].read_text(encoding="utf-8").strip() for image in images)


# --------------------------------------------------------------------------------------------
# 2. A real OpenAI-compatible server: `transformers serve`
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("transformers_serve")
def test_end_to_end_against_transformers_serve(tmp_path, model_dir, transformers_serve):
    base_url, model = transformers_serve
    images = make_dataset(tmp_path / "ds", 3)
    result = run_cli("--dataset_dir", tmp_path / "ds", *vision_args(model_dir("florence2")),
                     "--base_url", base_url, "--model", model, "--max_tokens", "24",
                     "--system_prompt", short_prompt(tmp_path), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    for image in images:
        assert caches(image)[1].read_text(encoding="utf-8").strip()


# --------------------------------------------------------------------------------------------
# 3-5. Trying before spending: --dry_run, --limit, --overwrite
# --------------------------------------------------------------------------------------------


def count_after(text: str, label: str) -> tuple[int, ...]:
    """The numbers on the first line that contains label (case-insensitive)."""
    line = next((line for line in text.splitlines() if label.lower() in line.lower()), None)
    assert line is not None, f"no line with {label!r} in:\n{text}"
    return tuple(int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", line.split(label, 1)[-1]))


def test_dry_run_reports_the_plan_and_touches_nothing(tmp_path, llm_server, capsys):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 4)                    # img000 .. img003
    caches(images[0])[0].write_text("cached generated 0", encoding="utf-8")
    caches(images[0])[1].write_text("cached combined 0", encoding="utf-8")
    caches(images[1])[0].write_text("cached generated 1", encoding="utf-8")
    images[3].with_suffix(".txt").write_bytes(b"caf\xe9 \xff not utf-8")  # an undecodable manual caption
    make_image(ds / "a.png", 10)                    # a stem conflict
    make_image(ds / "a.jpg", 11)
    (ds / "bad.jpg").write_text("this is not an image", encoding="utf-8")
    before = snapshot(ds)

    code, out, err = run_main(capsys, "--dataset_dir", ds, "--model_id", tmp_path / "no-such-model",
                              "--base_url", llm_server.base_url, "--model", "test-model", "--dry_run")
    assert code == 0, out + err
    # Processable images: img000-img003 and bad.jpg; a.png/a.jpg are reported as a conflict.
    found = [int(n) for n in re.findall(r"(\d+) images", out)]
    assert found and found[0] in (5, 7), out
    assert count_after(out, "captions to make")[:2] == (3, 2), out   # img002, img003, bad.jpg; 2 cached
    # img001, img002, bad.jpg; 1 cached. img003's merge waits until its manual caption can be read.
    assert count_after(out, "LLM calls")[:2] == (3, 1), out
    tokens = count_after(out, "tokens")
    assert tokens and max(tokens) > 0, out
    assert "a.png" in out and "a.jpg" in out                         # the conflict, by name
    assert "bad.jpg" in out and "img003.txt" in out                  # the unreadable files, by name
    line = next(line for line in out.splitlines() if "vision:" in line and "merge:" in line)  # what would run
    assert str(tmp_path / "no-such-model") in line and llm_server.base_url in line and "model test-model" in line
    assert llm_server.requests == []
    assert snapshot(ds) == before                                    # no cache, no lock, no temporary file


@pytest.mark.slow
def test_limit_processes_the_next_n_images_that_need_work(tmp_path, model_dir, llm_server, capsys):
    images = make_dataset(tmp_path / "ds", 5)
    args = run_args(tmp_path / "ds", model_dir("florence2"), llm_server, "--limit", "2")
    code, out, err = run_main(capsys, *args)
    assert code == 0, out + err
    assert [all(p.exists() for p in caches(i)) for i in images] == [True, True, False, False, False]
    assert not any(p.exists() for i in images[2:] for p in caches(i))
    assert len(llm_server.requests) == 2

    code, out, err = run_main(capsys, *args)
    assert code == 0, out + err
    assert [all(p.exists() for p in caches(i)) for i in images] == [True, True, True, True, False]
    assert not any(p.exists() for p in caches(images[4]))
    assert len(llm_server.requests) == 4
    assert sorted(int(user_message(r).split("subject")[1].split(",")[0]) for r in llm_server.requests) == [0, 1, 2, 3]


@pytest.mark.slow
def test_overwrite_recomputes_exactly_the_chosen_caches(tmp_path, model_dir, llm_server, capsys):
    images = make_dataset(tmp_path / "ds", 3)
    model = tmp_path / "model"
    shutil.copytree(model_dir("florence2"), model)
    assert run_main(capsys, *run_args(tmp_path / "ds", model, llm_server))[0] == 0
    assert len(llm_server.requests) == 3
    generated = [caches(i)[0] for i in images]
    combined = [caches(i)[1] for i in images]

    # combined: the LLM again for every image; the vision captions untouched, no model loaded.
    old = set_old_mtime(generated + combined)
    texts = [p.read_text() for p in generated]
    shutil.rmtree(model)
    code, out, err = run_main(capsys, *run_args(tmp_path / "ds", model, llm_server, "--overwrite", "combined"))
    assert code == 0, out + err
    assert len(llm_server.requests) == 6
    assert [p.read_text() for p in generated] == texts and all(p.stat().st_mtime_ns == old for p in generated)
    assert all(p.stat().st_mtime_ns != old and p.read_text().strip() for p in combined)

    # generated: the vision captions rewritten; the merges kept, no LLM call.
    shutil.copytree(model_dir("florence2"), model)
    old = set_old_mtime(generated + combined)
    merged = [p.read_text() for p in combined]
    code, out, err = run_main(capsys, *run_args(tmp_path / "ds", model, llm_server, "--overwrite", "generated"))
    assert code == 0, out + err
    assert all(p.stat().st_mtime_ns != old and p.read_text().strip() for p in generated)
    assert [p.read_text() for p in combined] == merged and all(p.stat().st_mtime_ns == old for p in combined)
    assert len(llm_server.requests) == 6

    # all: both again.
    old = set_old_mtime(generated + combined)
    code, out, err = run_main(capsys, *run_args(tmp_path / "ds", model, llm_server, "--overwrite", "all"))
    assert code == 0, out + err
    assert all(p.stat().st_mtime_ns != old for p in generated + combined)
    assert len(llm_server.requests) == 9


# --------------------------------------------------------------------------------------------
# 6-7. Fitting trainers: --export, --caption_extension
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_lists_every_combined_caption_with_relative_posix_paths(tmp_path, model_dir, llm_server, capsys):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 3)
    images.append(make_image(ds / "sub" / "deep" / "x.png", 7))
    (ds / "sub" / "deep" / "x.txt").write_text("deep subject, nested", encoding="utf-8")
    images.append(make_image(ds / "sub" / "y.webp", 8))  # no manual caption
    (ds / "metadata.jsonl").write_text('{"file_name": "stale.jpg", "text": "old"}\n', encoding="utf-8")

    # An earlier run merged the first two images.
    assert run_main(capsys, *run_args(ds, model_dir("florence2"), llm_server, "--limit", "2"))[0] == 0
    assert len(llm_server.requests) == 2

    # This run fails one merge (a non-retryable 400), does the others, and exports.
    llm_server.script(status(400))
    code, out, err = run_main(capsys, *run_args(ds, model_dir("florence2"), llm_server,
                                                     "--concurrency", "1", "--export", "metadata.jsonl"))
    assert code == 1, out + err
    failed = [image for image in images if not caches(image)[1].exists()]
    assert len(failed) == 1 and failed[0] not in images[:2]

    rows = [json.loads(line) for line in (ds / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    expected = {image.relative_to(ds).as_posix(): image for image in images if image not in failed}
    assert sorted(row["file_name"] for row in rows) == sorted(expected)
    assert len(rows) == 4 and any("/" in name for name in expected)
    for row in rows:
        image = expected[row["file_name"]]
        generated, combined = caches(image)
        assert row["text"] == combined.read_text(encoding="utf-8").strip()
        assert row["generated"] == generated.read_text(encoding="utf-8").strip()
        manual = image.with_suffix(".txt")
        if manual.exists():
            assert row["manual"] == manual.read_text(encoding="utf-8").strip()
        else:
            assert row["manual"] in ("", None)
    assert not [p for p in ds.rglob("*") if p.name.endswith(".tmp")]  # written atomically, nothing left over


@pytest.mark.slow
def test_caption_extension_reads_kohya_caption_files(tmp_path, model_dir, llm_server, capsys):
    images = make_dataset(tmp_path / "ds", 2, captions=False)
    for i, image in enumerate(images):
        image.with_suffix(".caption").write_text(f"kohya{i}, from the caption file", encoding="utf-8")
        image.with_suffix(".txt").write_text(f"plaintext{i}, must be ignored", encoding="utf-8")
    code, out, err = run_main(capsys, *run_args(tmp_path / "ds", model_dir("florence2"), llm_server,
                                                     "--caption_extension", ".caption"))
    assert code == 0, out + err
    messages = sorted(user_message(r) for r in llm_server.requests)
    assert len(messages) == 2
    for i, message in enumerate(messages):
        assert f"kohya{i}, from the caption file" in message
        assert "plaintext" not in message
    assert all(caches(image)[1].read_text().strip() for image in images)


# --------------------------------------------------------------------------------------------
# 8. Logs for humans and for cron
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_without_a_terminal_progress_comes_as_lines_not_bars(tmp_path, model_dir, llm_server):
    make_dataset(tmp_path / "ds", 3)
    result = run_cli(*run_args(tmp_path / "ds", model_dir("florence2"), llm_server), timeout=180)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if PROGRESS_LINE.search(line)]
    assert any(line.startswith("vision") and "3/3" in line for line in progress), result.stderr
    assert any(line.startswith("llm") and "3/3" in line for line in progress), result.stderr
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert "%|" not in result.stderr


@pytest.mark.slow
def test_quiet_keeps_only_the_summary_and_failures(tmp_path, model_dir, llm_server, capsys):
    make_dataset(tmp_path / "ds", 3)
    llm_server.script(status(400))
    code, out, err = run_main(capsys, *run_args(tmp_path / "ds", model_dir("florence2"), llm_server,
                                                     "--concurrency", "1", "--quiet"))
    assert code == 1
    output = out + err
    assert not [line for line in output.splitlines() if PROGRESS_LINE.search(line)], output
    assert "images:" not in output and "%|" not in output
    assert re.search(r"^vision: .*done", out, re.M) and re.search(r"^llm: .*done", out, re.M), out
    assert len([line for line in err.splitlines() if "FAILED" in line]) == 1, err


@pytest.mark.slow
def test_verbose_adds_a_line_per_item(tmp_path, model_dir, llm_server, capsys):
    images = make_dataset(tmp_path / "ds", 3)
    code, out, err = run_main(capsys, *run_args(tmp_path / "ds", model_dir("florence2"), llm_server))
    assert code == 0
    normal = out + err
    assert not any(image.name in normal for image in images)  # the default names no item

    for image in images:
        caches(image)[1].unlink()
        caches(image)[0].unlink()
    code, out, err = run_main(capsys, *run_args(tmp_path / "ds", model_dir("florence2"), llm_server, "-v"))
    assert code == 0
    for image in images:
        assert [line for line in (out + err).splitlines() if image.name in line], (image, out + err)


@pytest.mark.slow
def test_on_a_terminal_progress_comes_as_bars(tmp_path, model_dir, llm_server):
    try:
        import pty
        import fcntl
        import struct
        import termios

        master, slave = pty.openpty()
        # A new pseudo-terminal is 0x0; give it the size of an ordinary terminal window, as a real one has.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    except (ImportError, OSError) as e:
        pytest.skip(f"no pseudo-terminal on this platform: {e}")
    make_dataset(tmp_path / "ds", 3)
    command = [sys.executable, str(SCRIPT)] + [str(a) for a in run_args(tmp_path / "ds", model_dir("florence2"),
                                                                              llm_server)]
    process = subprocess.Popen(command, env=cli_env(), stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    output = b"".join(chunks).decode("utf-8", "replace")
    assert code == 0, output[-3000:]
    assert "%|" in output or "img/s" in output or "it/s" in output, output[-3000:]
    assert "\r" in output  # bars redraw in place


# --------------------------------------------------------------------------------------------
# 9. --help, README, .env.example
# --------------------------------------------------------------------------------------------


def test_help_groups_the_flags_and_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ec.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    headings = [line.rstrip(":").strip() for line in text.splitlines() if re.match(r"^\S.*:$", line)]
    for group in ("input", "vision model", "LLM", "performance", "output"):
        assert group in headings, text
    batch_line = next(line for line in text.splitlines() if line.strip().startswith("--batch_size"))
    assert "(default: 8)" in batch_line


def test_every_flag_in_help_is_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = []
    for action in ec.build_parser()._actions:
        if action.help == "==SUPPRESS==" or not action.option_strings:
            continue
        if not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", readme) for flag in action.option_strings):
            missing.append("/".join(action.option_strings))
    assert not missing, f"flags in --help but not in README.md: {missing}"


def test_env_example_lists_every_environment_variable_the_script_reads():
    source = SCRIPT.read_text(encoding="utf-8")
    names = set(re.findall(r"os\.environ(?:\.get|\.setdefault|\.pop)?\s*[\[(]\s*[\"'](\w+)[\"']", source))
    names |= set(re.findall(r"os\.getenv\(\s*[\"'](\w+)[\"']", source))
    assert {"OPENAI_BASE_URL", "OPENAI_API_KEY"} <= names  # the grep itself works
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert not [name for name in sorted(names) if not re.search(rf"\b{name}\b", example)]
