"""Files the run leaves, its record under accelerate, and the vision details around the model.

File modes under the user's umask; the report's summary line (the real exit code where `accelerate launch` hides
it); progress labels of a several-process run; file names that are not UTF-8; a dataset folder that cannot be
written; decoding workers started by spawn; tiling processors and reduced-scale JPEG decoding; prompt echoes.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import enhance_captions as ec
from tests import tiny_models
from tests.conftest import SCRIPT, caches, cli_env, make_dataset, make_image, run_args, run_main, run_two_processes
from tests.llm_server import FakeLLMServer


def truncated_jpeg(path: Path | bytes) -> None:
    """A JPEG cut in half: PIL reads its header, then fails to decode it ("image file is truncated")."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    noise = Image.frombytes("RGB", (96, 96), bytes((i * 7919 + i // 3) % 251 for i in range(96 * 96 * 3)))
    noise.save(buffer, format="JPEG", quality=95)
    with open(path, "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def report_lines(path: Path) -> tuple[list[dict], dict]:
    """The report's failure rows and its last line's summary; every line is JSON."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows and set(rows[-1]) == {"summary"}, rows
    assert all(set(row) == {"path", "stage", "error"} for row in rows[:-1]), rows
    return rows[:-1], rows[-1]["summary"]


def run_script(*args, umask: int | None = None, env: dict | None = None, timeout: float = 300):
    """The real script in a subprocess, with bytes output (to check that it decodes) and an optional umask."""
    return subprocess.run([sys.executable, str(SCRIPT), *[str(a) for a in args]], env=env or cli_env(),
                          capture_output=True, timeout=timeout,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


# --------------------------------------------------------------------------------------------
# 1. files the run writes have the mode the user's umask gives
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_caches_report_and_export_get_the_mode_the_umask_gives(tmp_path, model_dir, llm_server, umask):
    images = make_dataset(tmp_path / "ds", 2)
    report = tmp_path / "report.jsonl"
    result = run_script(*run_args(tmp_path / "ds", model_dir("florence2"), llm_server, "--report", report,
                                  "--export", "metadata.jsonl"), umask=umask)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    expected = 0o666 & ~umask  # 0644 under 022, 0640 under 027: like any file the user's programs write
    written = [*caches(images[0]), *caches(images[1]), report, tmp_path / "ds" / "metadata.jsonl"]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: oct(expected) for p in written}
    assert report_lines(report)[1]["exit_code"] == 0
    assert not list((tmp_path / "ds").glob(".*.tmp"))


def test_atomic_write_keeps_the_temporary_hidden_and_recognisable(tmp_path, monkeypatch):
    """The temporary is named so that walk_images sweeps it up after a kill (STALE_TEMPORARY)."""
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(ec.os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst)))
    ec.atomic_write(tmp_path / "a_generated.txt", "text")
    assert len(seen) == 1 and ec.STALE_TEMPORARY.match(seen[0]), seen
    assert (tmp_path / "a_generated.txt").read_text(encoding="utf-8") == "text\n"


# --------------------------------------------------------------------------------------------
# 2. the report's last line carries the exit code; 8. progress of several processes says it is a share
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, model_dir):
    """One two-process run over 4 good images and a truncated one, shared by the tests that read it."""
    root = tmp_path_factory.mktemp("two")
    make_dataset(root / "ds", 4)
    truncated_jpeg(root / "ds" / "broken.jpg")
    report = root / "report.jsonl"
    with FakeLLMServer() as server:
        result = run_two_processes(*run_args(root / "ds", model_dir("florence2"), server, "--report", report))
    return result, report


@pytest.mark.slow
@pytest.mark.xdist_group("two_process_run")  # one worker makes the run both read
def test_under_accelerate_the_report_ends_with_the_real_exit_code_and_counts(two_process_run):
    result, report = two_process_run
    assert "split over 2 processes" in result.stdout + result.stderr  # the world size really is 2
    assert result.returncode != 0  # whatever accelerate makes of it (1, with its own traceback)
    failures, summary = report_lines(report)
    assert [(Path(f["path"]).name, f["stage"]) for f in failures] == [("broken.jpg", "vision")]
    assert summary["exit_code"] == 1
    assert summary["vision"] == {"done": 4, "cached": 0, "failed": 1}
    assert summary["llm"] == {"done": 4, "cached": 0, "failed": 0}
    assert summary["failed"] == 1 and summary["skipped"] == 0 and summary["signal"] is None


@pytest.mark.slow
@pytest.mark.xdist_group("two_process_run")  # one worker makes the run both read
def test_progress_of_several_processes_says_it_is_this_process_share(two_process_run):
    result, _ = two_process_run
    progress = [line for line in result.stderr.splitlines() if re.match(r"(vision|llm)\b.*: \d+(/\d+| done) \(", line)]
    assert progress, result.stderr[-3000:]
    for line in progress:  # no line passes a share off as the run: the processes take work as they go, so no total
        assert re.match(r"(vision|llm) \(this process's share, 1 of 2\): \d+ done \(", line), line
    assert "vision: 4 done, 0 from cache, 1 failed" in result.stdout  # the summary counts the whole run


def test_a_refused_run_writes_its_exit_code_to_the_report(tmp_path, capsys, model_dir, llm_server):
    (tmp_path / "empty").mkdir()
    report = tmp_path / "report.jsonl"
    code, out, err = run_main(capsys, *run_args(tmp_path / "empty", model_dir("florence2"), llm_server,
                                                "--report", report))
    assert code == 2 and "no images" in err
    failures, summary = report_lines(report)
    assert failures == [] and summary["exit_code"] == 2 and "no images" in summary["error"]


@pytest.mark.slow
def test_a_report_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, capsys, model_dir, llm_server):
    """The work is saved; a cron job that reads the report must still hear that there is none."""
    images = make_dataset(tmp_path / "ds", 1)
    report = tmp_path / "missing" / "report.jsonl"
    code, out, err = run_main(capsys, *run_args(tmp_path / "ds", model_dir("florence2"), llm_server,
                                                "--report", report))
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        f"error: cannot write the report {report}: No such file or directory"]
    assert all(p.read_text(encoding="utf-8").strip() for p in caches(images[0]))


# --------------------------------------------------------------------------------------------
# 5. a file name that is not UTF-8
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_a_file_name_that_is_not_utf8_is_reported_and_printed_without_a_crash(tmp_path, model_dir, llm_server,
                                                                                locale):
    """python enhance_captions.py keeps its real exit code (1); stdout, stderr and the report stay UTF-8."""
    ds = tmp_path / "ds"
    make_dataset(ds, 1)
    name = b"caf\xe9.jpg"  # Latin-1, as an old camera or a Windows share may name it
    truncated_jpeg(os.path.join(os.fsencode(ds), name))
    report = tmp_path / "report.jsonl"
    env = cli_env(LC_ALL=locale, LANG=locale)
    result = run_script(*run_args(ds, model_dir("florence2"), llm_server, "--report", report, "-v"), env=env)
    out, err = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")  # both decode
    assert result.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    assert any(line.startswith("FAILED ") and "caf\\xe9.jpg" in line for line in err.splitlines()), err
    failures, summary = report_lines(report)  # parses as JSON lines
    assert len(failures) == 1 and os.fsencode(failures[0]["path"]).endswith(b"/" + name)  # the exact name, back
    assert summary["exit_code"] == 1 and summary["vision"]["done"] == 1 and "vision: 1 done" in out


def test_audit_and_dry_run_print_a_name_that_is_not_utf8_on_a_strict_terminal(tmp_path, llm_server):
    """A desktop's UTF-8 locale encodes stdout strictly (unlike C and C.UTF-8): the lines naming such a file print as
    the summary's do (\\xNN), where they were a UnicodeEncodeError traceback."""
    ds = tmp_path / "ds"
    make_dataset(ds, 1)
    make_image(Path(os.fsdecode(os.path.join(os.fsencode(ds), b"caf\xe9.jpg"))), 2)
    env = cli_env(PYTHONIOENCODING="utf-8:strict")
    audit = run_script("--dataset_dir", ds, "--audit", env=env)
    dry = run_script(*run_args(ds, tmp_path / "no-model", llm_server, "--dry_run", "-v"), env=env)
    for result, code in ((audit, 1), (dry, 0)):
        out, err = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
        assert result.returncode == code and "Traceback" not in err, err[-2000:]
        assert "caf\\xe9" in out, out
    assert "missing " in audit.stdout.decode() and "    caption " in dry.stdout.decode()


def test_printable_and_json_line_take_any_name():
    name = os.fsdecode(b"caf\xe9 \xff.jpg")
    assert ec.printable(f"FAILED {name}") == "FAILED caf\\xe9 \\xff.jpg"
    assert ec.printable("naïve 北京") == "naïve 北京"
    line = ec.json_line({"path": name, "error": "naïve"})
    line.encode("utf-8")  # writable as UTF-8
    assert "naïve" in line and os.fsencode(json.loads(line)["path"]) == b"caf\xe9 \xff.jpg"


# --------------------------------------------------------------------------------------------
# 6. a dataset folder that cannot be written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lock_left", [False, True], ids=["first_run", "lock_of_an_earlier_run"])
def test_a_read_only_dataset_folder_is_one_line_exit_2(tmp_path, capsys, monkeypatch, model_dir, llm_server,
                                                       lock_left):
    """chmod 0555 stops a normal user's writes. The tests run as root, where it does not: there os.open refuses to
    create files in the folder, as the kernel does for a read-only folder or file system (an existing file, such as
    an earlier run's lock, still opens)."""
    ds = tmp_path / "ds"
    make_dataset(ds, 2)
    if lock_left:
        (ds / ec.LOCK_NAME).write_text("")
    before = sorted(os.listdir(ds))
    ds.chmod(0o555)
    if os.geteuid() == 0:
        real_open = os.open

        def read_only_folder(path, flags, mode=0o777, *args, **kwargs):
            if flags & os.O_CREAT and Path(path).parent == ds and not os.path.exists(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, mode, *args, **kwargs)
        monkeypatch.setattr(os, "open", read_only_folder)
    try:
        code, out, err = run_main(capsys, *run_args(ds, model_dir("florence2"), llm_server))
    finally:
        ds.chmod(0o755)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and str(ds) in lines[0] and "Permission denied" in lines[0], err
    assert "Traceback" not in err and llm_server.requests == []
    assert sorted(os.listdir(ds)) == before


# --------------------------------------------------------------------------------------------
# 7. decoding workers started by spawn
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_decoding_workers_started_by_spawn_caption_the_images(tmp_path, model_dir, llm_server):
    """spawn is the default start method on macOS and Windows: the workers unpickle the dataset and the collate."""
    images = make_dataset(tmp_path / "ds", 3)
    argv = [str(SCRIPT)] + run_args(tmp_path / "ds", model_dir("florence2"), llm_server, num_workers=1)
    startup = ("import multiprocessing, runpy, sys; multiprocessing.set_start_method('spawn', force=True); "
               f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", startup], env=cli_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for image in images:
        assert all(p.read_text(encoding="utf-8").strip() for p in caches(image))


def test_collate_pickles_without_the_model(tmp_path, model_dir):
    import pickle

    captioner = captioner_for(tmp_path, model_dir("florence2"))
    collate = pickle.loads(pickle.dumps(captioner.collate))
    assert "model" not in vars(collate.__self__) and collate.__self__.prompt == captioner.prompt
    indices, prepared, errors = collate([(0, ec.load_image(make_image(tmp_path / "a.png", 1)), None),
                                         (1, None, ec.BadInput("empty file (0 bytes)"))])
    errors = pickle.loads(pickle.dumps(errors))  # as a decoding worker hands them over
    assert indices == [0] and prepared is not None
    assert [(i, type(e), str(e)) for i, e in errors] == [(1, ec.BadInput, "empty file (0 bytes)")]


# --------------------------------------------------------------------------------------------
# 3. tiling processors: never decode below the largest size they tile to
# --------------------------------------------------------------------------------------------


def captioner_for(tmp_path, model, **options):
    import torch

    cfg = ec.Config(dataset_dir=tmp_path, model_id=model, max_new_tokens=8, verbosity=0, **options)
    return ec.load_captioner(cfg, torch.device("cpu"))


def image_processor(name: str, **options):
    import transformers

    return getattr(transformers, name)(**options)


@pytest.mark.parametrize("name, options, expected", [
    ("CLIPImageProcessor", {"size": {"shortest_edge": 224}}, 224),  # no tiling: the resize's own side
    ("LlavaNextImageProcessor", {}, 1008),  # the largest pinpoint side
    ("LlavaOnevisionImageProcessor", {}, 2304),
    ("SmolVLMImageProcessor", {}, 1456),  # splitting on: the image is resized to 1456, cut into 364 px tiles
    ("SmolVLMImageProcessor", {"size": {"longest_edge": 32}, "max_image_size": {"longest_edge": 96}}, 96),
    ("Idefics3ImageProcessor", {"do_image_splitting": True}, 1456),
    ("SmolVLMImageProcessor", {"do_image_splitting": False, "size": {"longest_edge": 32}}, 32),
    ("Gemma3ImageProcessor", {}, 224),  # pan and scan off
    ("Gemma3ImageProcessor", {"do_pan_and_scan": True}, 0),  # crops of the full image: decode in full
    ("Idefics2ImageProcessor", {"do_image_splitting": True}, 0),
    ("GotOcr2ImageProcessor", {"crop_to_patches": True}, 0),
    ("GotOcr2ImageProcessor", {"crop_to_patches": False}, 384),
    ("MllamaImageProcessor", {}, 0),  # a grid of up to max_image_tiles tiles, no switch
    ("Llama4ImageProcessor", {}, 0),
])
def test_decode_side_is_at_least_the_largest_size_a_processor_tiles_to(name, options, expected):
    assert ec.decode_side(image_processor(name, **options)) == expected


def test_tiny_llava_next_decode_side_covers_its_pinpoints(tmp_path, model_dir):
    captioner = captioner_for(tmp_path, model_dir("llava_next"))
    largest = max(max(point) for point in tiny_models.LLAVA_NEXT_PINPOINTS)
    assert captioner.decode_side >= largest > 32  # above its 32 px crop, which today's rule stopped at


@pytest.mark.slow
def test_tiny_llava_next_captions_jpegs_through_the_cli(tmp_path, capsys, model_dir, llm_server):
    images = make_dataset(tmp_path / "ds", 3)
    code, out, err = run_main(capsys, *run_args(tmp_path / "ds", model_dir("llava_next"), llm_server))
    assert code == 0, err
    for image in images:
        words = caches(image)[0].read_text(encoding="utf-8").split()
        assert words and all(w in tiny_models.CAPTION_WORDS for w in words), words
    assert "vision: 3 done" in out


@pytest.mark.parametrize("size", [(1024, 768), (500, 260)])
def test_reduced_jpeg_decoding_gives_llava_next_the_same_input(tmp_path, model_dir, size):
    """A large JPEG decoded at reduced scale is never smaller than the largest pinpoint, and gives the processor
    inputs of the same shapes (the same tiles, the same number of image tokens) as the full decode."""
    import torch
    from PIL import Image

    path = tmp_path / "camera.jpg"
    Image.linear_gradient("L").resize(size).convert("RGB").save(path, format="JPEG", quality=90)
    captioner = captioner_for(tmp_path, model_dir("llava_next"))
    full_inputs, _ = captioner.prepare([ec.load_image(path)])
    reduced_image = ec.load_image(path, min_side=captioner.decode_side)
    reduced_inputs, reduced_sizes = captioner.prepare([reduced_image])
    assert min(reduced_image.size) >= max(max(p) for p in tiny_models.LLAVA_NEXT_PINPOINTS)
    assert reduced_image.size[0] < size[0]  # it was decoded at reduced scale
    assert reduced_sizes == [size]
    assert set(full_inputs) == set(reduced_inputs)
    for key, full in full_inputs.items():
        assert full.shape == reduced_inputs[key].shape, key
    assert torch.equal(full_inputs["input_ids"], reduced_inputs["input_ids"])
    assert (full_inputs["pixel_values"] - reduced_inputs["pixel_values"]).abs().mean() < 0.05
    (full_h, full_w), (h, w) = full_inputs["image_sizes"][0].tolist(), reduced_inputs["image_sizes"][0].tolist()
    assert abs(full_w / full_h - w / h) < 0.02 * full_w / full_h  # image_sizes: the decoded size, same shape


# --------------------------------------------------------------------------------------------
# 4. a prompt never opens a generated caption
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, prompt, expected", [
    ("describe this image in detail . a red car", "Describe this image in detail.", "a red car"),  # BLIP spacing
    ("Describe this image in detail. A red car", "Describe this image in detail.", "A red car"),
    ("DESCRIBE   this image,in detail: a red car", "describe this image in detail", "a red car"),
    ("a photography of a red car", "a photography of", "a red car"),  # BLIP's conditional captioning
    ("what ' s in this image ? a dog", "What's in this image?", "a dog"),  # a contraction split into tokens
    ("decris cette image : un chat", "Décris cette image :", "un chat"),  # an uncased tokenizer drops accents
    ("描 述 图 片 一只猫", "描述图片", "一只猫"),  # a tokenizer that spaces characters apart
    ("caption en a red car", "caption en", "a red car"),  # PaliGemma
    ("describes a red car", "describe", "describes a red car"),  # a word that only starts like the prompt
    ("a red car, describe this image", "describe this image", "a red car, describe this image"),  # not at the start
    ("describe this a red car", "describe this image", "describe this a red car"),  # the echo is incomplete
    ("a red car", "", "a red car"),
    ("a red car", None, "a red car"),
    ("  a red car  ", "?", "a red car"),  # a prompt without words
    ("describe this image.", "Describe this image", ""),  # nothing but the echo: an empty caption, reported
])
def test_strip_echo(text, prompt, expected):
    assert ec.strip_echo(text, prompt) == expected


@pytest.mark.slow
def test_blip_with_a_prompt_never_opens_a_caption_with_it(tmp_path, capsys, model_dir, llm_server):
    """BLIP returns the prompt as its own tokens give it back: lower case, spaced punctuation."""
    prompt = "Describe this image in detail."
    images = make_dataset(tmp_path / "ds", 3)
    code, out, err = run_main(capsys, *run_args(tmp_path / "ds", model_dir("blip"), llm_server, "--prompt", prompt))
    assert code == 0, err
    prompt_words = [w.lower() for w in re.findall(r"\w+", prompt)]
    for image in images:
        words = caches(image)[0].read_text(encoding="utf-8").split()
        assert words and [w.lower() for w in words[:len(prompt_words)]] != prompt_words, words
        assert all(w in tiny_models.CAPTION_WORDS for w in words), words  # no word of the prompt at all
