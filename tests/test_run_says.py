"""What the run says is what it did (issue 22): settings that only finish the LLM's reply are re-applied to the
recorded reply without a request, other settings are counted with the line that redoes them, bad inputs are
remembered until they change, progress and summary agree with the files, a closed pipe or a broken install is
no traceback, prompt files are found beside the script, and the trainer's own file is what the export reads.

Every run goes through the command line (main() in this process, or the script in a subprocess) against the
loopback fake server. Where no model load is expected, the vision model is a copy of the tiny model whose weights
are junk: a load would fail the run with exit 2."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (ROOT, SCRIPT, caches, cli_env, make_dataset, make_image, run_args, run_main,
                            seed_generated, user_message)
from tests.test_training_output import tokenizer_dir  # noqa: F401 (a fixture)


def junk_weights(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"not a safetensors file " * 64)


@pytest.fixture
def vlm(model_dir, tmp_path) -> Path:
    """A copy of the tiny vision model at a path of its own, so its weights can be spoilt (same settings)."""
    path = tmp_path / "vlm"
    shutil.copytree(model_dir("florence2"), path)
    return path


def seeded(tmp_path: Path, n: int = 3) -> tuple[Path, list[Path]]:
    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, n)
    seed_generated(images)
    return ds, images


def no_model(tmp_path: Path) -> Path:
    return tmp_path / "no-such-model"


def run(capsys, ds, model, server, *extra, expect: int = 0) -> tuple[str, str, list[dict]]:
    """One run in this process: (stdout, stderr, the merge requests it made)."""
    asked = len(server.requests)
    code, out, err = run_main(capsys, *run_args(ds, model, server, *extra))
    assert code == expect, out + err
    return out, err, [r for r in server.chat_requests()[asked:] if "Generated caption" in user_message(r)]


def combined_texts(images) -> list[str]:
    return [caches(image)[1].read_text(encoding="utf-8").strip() for image in images]


# --------------------------------------------------------------------------------------------
# Settings: the finishing ones re-applied without a request, the others counted with their hint
# --------------------------------------------------------------------------------------------


def test_keep_tokens_added_to_a_finished_dataset_is_applied_without_a_request(tmp_path, capsys, llm_server):
    ds, images = seeded(tmp_path)
    run(capsys, ds, no_model(tmp_path), llm_server)
    before = {image: caches(image)[1].read_bytes() for image in images}

    out, err, requests = run(capsys, ds, no_model(tmp_path), llm_server, "--keep_tokens", "1", "-v")
    assert requests == []
    for i, text in enumerate(combined_texts(images)):
        assert text.startswith(f"subject{i}, ") and text.count(f"subject{i}") == 1, text
    assert "  combined captions: 0 made, 3 re-finished from the recorded reply, no request" in out
    assert "settings changed" not in out and "--refresh settings" not in out
    assert len(re.findall(r"^re-finished .*_combined\.txt \(another --keep_tokens \(0 → 1\)\): \".*\" → \"subject",
                          err, re.M)) == 3, err

    # and a --prefix on top; then back to the first settings: the very bytes the first run wrote
    run(capsys, ds, no_model(tmp_path), llm_server, "--keep_tokens", "1", "--prefix", "ohwx")
    for i, text in enumerate(combined_texts(images)):
        assert text.startswith(f"ohwx, subject{i}, "), text
    _, _, requests = run(capsys, ds, no_model(tmp_path), llm_server)
    assert requests == []
    assert {image: caches(image)[1].read_bytes() for image in images} == before

    # the same settings again: nothing to do, nothing written
    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server)
    assert requests == [] and "re-finished" not in out


def test_another_llm_is_counted_with_its_hint_and_refresh_settings_redoes_it(tmp_path, capsys, llm_server):
    ds, images = seeded(tmp_path)
    run(capsys, ds, no_model(tmp_path), llm_server)
    hint = "  3 combined captions were made with another LLM (test-model → qwen2.5); --refresh settings redoes them"

    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, "--model", "qwen2.5", "--dry_run")
    assert requests == [] and hint in out.splitlines()
    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, "--model", "qwen2.5")
    assert requests == [] and hint in out.splitlines()
    assert "0 settings changed" not in out

    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, "--model", "qwen2.5", "--refresh", "settings")
    assert len(requests) == 3 and {r["model"] for r in requests} == {"qwen2.5"}
    assert "  combined captions: 3 made (3 settings changed)" in out
    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, "--model", "qwen2.5")
    assert requests == [] and "--refresh settings" not in out


def test_a_new_budget_the_replies_fit_costs_no_request_and_one_they_do_not_is_counted(tmp_path, capsys, llm_server,
                                                                                       tokenizer_dir):
    llm_server.reply = lambda request: "a red dress in the park"  # 8 tokens with <bos> and <eos>
    ds, images = seeded(tmp_path)
    run(capsys, ds, no_model(tmp_path), llm_server)
    before = [caches(image)[1].read_bytes() for image in images]

    budget = ("--caption_tokenizer", tokenizer_dir, "--max_caption_tokens")
    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, *budget, "20")
    assert requests == [] and "3 re-finished from the recorded reply, no request" in out
    assert [caches(image)[1].read_bytes() for image in images] == before

    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, *budget, "5", "--dry_run")
    assert requests == []  # a dry run loads no tokenizer: whether each reply fits is the run's to find out
    assert any(line.startswith("  to re-finish from the recorded reply, no request: 3 ") for line in out.splitlines())
    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, *budget, "5")
    assert requests == []
    assert "  3 combined captions are over the new --max_caption_tokens 5; --refresh settings redoes them" in out
    assert [caches(image)[1].read_bytes() for image in images] == before
    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, *budget, "5", "--max_retries", "0",
                           "--refresh", "settings")
    assert len(requests) == 3 and "  combined captions: 3 made (3 settings changed)" in out


# --------------------------------------------------------------------------------------------
# Bad files remembered
# --------------------------------------------------------------------------------------------


def test_a_broken_image_is_remembered_and_the_next_run_loads_no_model(tmp_path, capsys, vlm, llm_server):
    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, 2)
    broken = ds / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:300])  # a truncated JPEG
    out, err, _ = run(capsys, ds, vlm, llm_server, expect=1)
    assert f"FAILED {broken} [vision]" in err
    assert all(caches(image)[1].exists() for image in images)

    junk_weights(vlm)  # a load now fails the run with exit 2
    for extra in (["--dry_run"], []):
        out, err, requests = run(capsys, ds, vlm, llm_server, *extra, expect=0 if extra else 1)
        assert requests == [] and "loading" not in out + err
        line = next(line for line in (out + err).splitlines() if str(broken) in line)
        assert re.search(r"still failing since \d{4}-\d\d-\d\d \d\d:\d\d: cannot decode image", line), line
    assert "  bad input: 1 (exit 1 until each file is fixed or removed)" in out

    code, out, err = run_main(capsys, "--dataset_dir", ds, "--audit")
    assert code == 1
    assert f"missing {caches(broken)[1]}: no combined caption: fix or replace {broken}" in out


def test_a_run_on_a_sub_folder_keeps_the_rest_of_the_datasets_bad_inputs(tmp_path, capsys, vlm, llm_server):
    """The memory is the dataset's: a run on one folder of it forgot the bad inputs of the others, so the next run
    on the whole dataset tried them again (and loaded the vision model for them)."""
    ds = tmp_path.resolve() / "ds"
    broken = []
    for folder in ("a", "b"):
        images = make_dataset(ds / folder, 1)
        broken.append(ds / folder / "broken.jpg")
        broken[-1].write_bytes(images[0].read_bytes()[:300])  # a truncated JPEG
    run(capsys, ds, vlm, llm_server, expect=1)
    run(capsys, ds / "a", vlm, llm_server, expect=1)
    junk_weights(vlm)  # a load now fails the run with exit 2
    out, err, requests = run(capsys, ds, vlm, llm_server, expect=1)
    assert requests == [] and "loading" not in out + err
    for path in broken:
        assert re.search(rf"FAILED {re.escape(str(path))} \[input\]: still failing since ", err), err


def test_a_fixed_image_is_tried_again(tmp_path, capsys, vlm, llm_server):
    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, 1)
    broken = ds / "broken.jpg"
    broken.write_bytes(b"")
    run(capsys, ds, vlm, llm_server, expect=1)
    assert (ds / ".enhance_captions" / "failures.jsonl").exists()
    make_image(broken, 7)
    out, err, requests = run(capsys, ds, vlm, llm_server)
    assert caches(broken)[0].exists() and caches(broken)[1].exists() and len(requests) == 1
    assert not (ds / ".enhance_captions" / "failures.jsonl").exists()
    assert "still failing" not in out + err and images


def test_an_image_that_cannot_be_opened_is_not_remembered_as_bad(tmp_path, capsys, vlm, llm_server, monkeypatch):
    """Permission denied is the file's access, not its bytes: a chmod fixes it without changing its size or mtime,
    so a remembered failure would stay "still failing" for good. (The tests run as root, which no mode stops: the
    refusal is the one PIL's open would raise.)"""
    from PIL import Image

    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, 2)
    real_open = Image.open

    def refusing(path, *args, **kwargs):
        if Path(path) == images[1]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refusing)
    out, err, _ = run(capsys, ds, vlm, llm_server, expect=1)
    assert f"FAILED {images[1]} [vision]: cannot read image: Permission denied" in err
    assert not (ds / ".enhance_captions" / "failures.jsonl").exists() and "bad input" not in out
    monkeypatch.setattr(Image, "open", real_open)  # the mode fixed
    out, err, requests = run(capsys, ds, vlm, llm_server)
    assert len(requests) == 1 and caches(images[1])[1].exists() and "still failing" not in out + err


def test_a_caption_that_is_not_utf8_is_still_failing_until_it_is_resaved(tmp_path, capsys, llm_server):
    ds, images = seeded(tmp_path, 2)
    images[1].with_suffix(".txt").write_bytes(b"caf\xe9 au lait")
    out, err, requests = run(capsys, ds, no_model(tmp_path), llm_server, expect=1)
    assert len(requests) == 1
    out, err, requests = run(capsys, ds, no_model(tmp_path), llm_server, expect=1)
    assert requests == []
    assert re.search(rf"FAILED {re.escape(str(images[1]))} \[input\]: still failing since .*: img001.txt is not "
                     "valid UTF-8", err), err
    code, out, _ = run_main(capsys, "--dataset_dir", ds, "--audit")
    assert f"fix or replace {images[1].with_suffix('.txt')}" in out
    images[1].with_suffix(".txt").write_text("café au lait", encoding="utf-8")
    out, err, requests = run(capsys, ds, no_model(tmp_path), llm_server)
    assert len(requests) == 1 and "café au lait" in user_message(requests[0])


# --------------------------------------------------------------------------------------------
# Progress and summary agree with the files
# --------------------------------------------------------------------------------------------


def last_progress(err: str, stage: str) -> tuple[int, int]:
    done, total = re.findall(rf"^{stage}: (\d+)/(\d+) ", err, re.M)[-1]
    return int(done), int(total)


def test_progress_and_summary_counts_match_the_files_written(tmp_path, capsys, vlm, llm_server):
    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, 5)
    seed_generated(images[:2])
    short = ROOT / "prompts" / "short.txt"
    out, err, requests = run(capsys, ds, vlm, llm_server, "--variant", f"short={short}", "--limit", "4")
    made_vision = [i for i in images if caches(i)[0].exists()]
    made = [i for i in images if caches(i)[1].exists()]
    made_short = [i for i in images if i.with_name(i.stem + "_combined_short.txt").exists()]
    assert len(made) == len(made_short) == 4 and len(made_vision) == 4 and len(requests) == 8
    assert last_progress(err, "vision") == (2, 2)
    assert last_progress(err, "llm") == (8, 8)
    assert "vision: 2 done, 2 from cache, 0 failed" in out
    assert "llm: 8 done, 0 from cache, 0 failed" in out
    assert "  vision captions: 2 made (2 missing)" in out
    assert "  combined captions: 4 made (4 missing)" in out
    assert "  short variant captions: 4 made (4 missing)" in out
    assert "  left by --limit: 1 images, for the next run" in out
    assert err.index("loading ") < err.index("vision: 2/2")  # a line before the model loads
    assert "to caption:" not in out  # the plan is not repeated after the results

    out, err, requests = run(capsys, ds, vlm, llm_server, "--variant", f"short={short}")
    assert len(requests) == 2 and last_progress(err, "llm") == (2, 2)
    assert "  combined captions: 1 made (1 missing), 4 already current" in out
    assert "left by --limit" not in out


def test_a_stale_caption_left_by_limit_is_not_counted_as_current(tmp_path, capsys, llm_server):
    ds, images = seeded(tmp_path, 4)
    run(capsys, ds, no_model(tmp_path), llm_server)
    for image in images[:2]:
        image.with_suffix(".txt").write_text(f"{image.stem}, edited before a limited run", encoding="utf-8")
    before = combined_texts(images)
    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, "--limit", "1")
    assert len(requests) == 1 and combined_texts(images)[1:] == before[1:]
    # 1 made, 2 current, 1 stale left by --limit: the stage's line and the kind's line say the same
    assert "llm: 1 done, 2 from cache, 0 failed" in out
    assert "  combined captions: 1 made (1 manual changed), 2 already current" in out
    assert "vision: 0 done, 4 from cache, 0 failed" in out
    assert "  left by --limit: 1 images, for the next run" in out
    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server)
    assert len(requests) == 1 and "  combined captions: 1 made (1 manual changed), 3 already current" in out


def test_verbose_names_each_changed_caption_with_its_reason_and_first_words(tmp_path, capsys, llm_server):
    ds, images = seeded(tmp_path, 2)
    run(capsys, ds, no_model(tmp_path), llm_server)
    old = combined_texts(images)[0].split()
    images[0].with_suffix(".txt").write_text("subject0, photo number 0, at night", encoding="utf-8")
    _, err, _ = run(capsys, ds, no_model(tmp_path), llm_server, "-v")
    new = combined_texts(images)[0].split()
    line = next(line for line in err.splitlines() if line.startswith(f"merged {caches(images[0])[1]}"))
    assert line == (f'merged {caches(images[0])[1]} (manual changed): "{" ".join(old[:6])} …" → '
                    f'"{" ".join(new[:6])} …"')


# --------------------------------------------------------------------------------------------
# No tracebacks for ordinary things
# --------------------------------------------------------------------------------------------


def closed_stdout(*args, cwd=None, env=None) -> tuple[int, str]:
    """The script with its stdout read by nobody: the reader closed the pipe before a line was written."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *[str(a) for a in args]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env or cli_env(), cwd=cwd)
    proc.stdout.close()
    err = proc.stderr.read().decode("utf-8", "replace")
    return proc.wait(300), err


@pytest.mark.slow
def test_output_into_a_closed_pipe_ends_quietly(tmp_path, llm_server):
    ds, images = seeded(tmp_path)
    args = run_args(ds, no_model(tmp_path), llm_server)
    code, err = closed_stdout(*args, "--dry_run")
    assert code == 141 and "Traceback" not in err and "Error" not in err, err
    code, err = closed_stdout("--dataset_dir", ds, "--audit")
    assert code == 141 and "Traceback" not in err, err

    # a run finishes its work, its report and its export, and exits with its own code
    code, err = closed_stdout(*args, "--export", "metadata.jsonl", "--report", tmp_path / "run.jsonl")
    assert code == 0 and "Traceback" not in err and "Error" not in err, err
    assert all(caches(image)[1].exists() for image in images)
    assert len((ds / "metadata.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    assert json.loads((tmp_path / "run.jsonl").read_text(encoding="utf-8").splitlines()[-1])["summary"]["exit_code"] == 0


@pytest.mark.slow
def test_a_torchvision_that_does_not_match_torch_is_one_line_before_any_load(tmp_path, vlm, llm_server):
    fake = tmp_path / "site"
    (fake / "torchvision").mkdir(parents=True)
    (fake / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n', encoding="utf-8")
    ds = tmp_path.resolve() / "ds"
    make_dataset(ds, 1)
    env = cli_env(PYTHONPATH=str(fake))
    result = subprocess.run([sys.executable, str(SCRIPT), *run_args(ds, vlm, llm_server)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "loading" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "torchvision does not match torch" in errors[0] and \
        "pip install --upgrade torch torchvision" in errors[0]
    assert not caches(ds / "img000.jpg")[0].exists()


# --------------------------------------------------------------------------------------------
# Prompt files, and the trainer's own file
# --------------------------------------------------------------------------------------------


def system_of(request: dict) -> str:
    return next(m["content"] for m in request["messages"] if m["role"] == "system")


def test_bundled_prompt_files_are_found_from_another_working_folder(tmp_path, capsys, llm_server):
    ds, images = seeded(tmp_path, 1)
    assert Path.cwd() != ROOT and not Path("prompts").exists()
    _, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, "--variant", "short=prompts/short.txt",
                         "--system_prompt", "system_prompt.txt")
    bundled = {(ROOT / "prompts" / "short.txt").read_text(encoding="utf-8").strip(),
               (ROOT / "system_prompt.txt").read_text(encoding="utf-8").strip()}
    assert {system_of(r) for r in requests} == bundled

    # one in the working folder comes first
    Path("prompts").mkdir()
    Path("prompts/short.txt").write_text("My own short prompt.", encoding="utf-8")
    _, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, "--variant", "short=prompts/short.txt",
                         "--refresh", "settings")
    assert [system_of(r) for r in requests] == ["My own short prompt."]


def test_an_edited_trainer_caption_reaches_the_export_and_the_audit(tmp_path, capsys, llm_server):
    ds, images = seeded(tmp_path, 2)
    args = ("--write_captions", ".caption", "--export", "metadata.jsonl")
    run(capsys, ds, no_model(tmp_path), llm_server, *args)
    trainer = images[0].with_suffix(".caption")
    edited = "subject0, my own last word on this picture\n"
    trainer.write_text(edited, encoding="utf-8")

    out, _, requests = run(capsys, ds, no_model(tmp_path), llm_server, *args)
    assert requests == [] and trainer.read_text(encoding="utf-8") == edited
    rows = {json.loads(line)["file_name"]: json.loads(line)
            for line in (ds / "metadata.jsonl").read_text(encoding="utf-8").splitlines()}
    assert rows["img000.jpg"]["text"] == edited.strip()
    assert rows["img001.jpg"]["text"] == caches(images[1])[1].read_text(encoding="utf-8").strip()

    trainer.write_text("I'm sorry, I can't help with that.", encoding="utf-8")
    code, out, _ = run_main(capsys, "--dataset_dir", ds, "--audit", "--write_captions", ".caption")
    assert code == 1 and f"refusal {trainer}:" in out


def test_a_phrase_from_the_manual_captions_is_not_boilerplate(tmp_path, capsys):
    ds = tmp_path.resolve() / "ds"
    for i, scene in enumerate(["a red car", "two dogs", "an old tram", "ripe plums", "a green kite", "snow"]):
        image = make_image(ds / f"c{i}.jpg", i)
        image.with_suffix(".txt").write_text(f"ohwx style, {scene}", encoding="utf-8")
        caches(image)[0].write_text(f"{scene} seen from afar\n", encoding="utf-8")
        caches(image)[1].write_text(f"{scene} in ohwx style, soft golden light\n", encoding="utf-8")
    code, out, _ = run_main(capsys, "--dataset_dir", ds, "--audit")
    phrases = [line for line in out.splitlines() if line.startswith("phrase ")]
    assert len(phrases) == 1 and "soft golden light" in phrases[0] and "ohwx" not in phrases[0], out


def test_a_stage_bar_appears_when_its_stage_starts():
    import io

    import enhance_captions as ec

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    reporter = ec.Reporter(1, True, stream=terminal)
    llm = reporter.progress("llm", 3)
    vision = reporter.progress("vision", 2)
    vision.begin()
    assert vision.bar is not None and llm.bar is None and "llm" not in terminal.getvalue()
    vision.close()
    llm.update()  # the first merge starts the stage (and its clock) if nothing began it before
    assert llm.bar is not None and llm.start is not None and "llm" in terminal.getvalue()
    llm.close()
