"""--variant NAME=FILE (a merge per system prompt, each with its own cache, record, freshness and resume),
--write_captions EXT (each combined caption also where the trainer reads it, kept in step), and the variants as
extra columns of --export."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import enhance_captions as ec
from tests.conftest import ROOT, caches, make_dataset, make_image, run_args, run_main, seed_generated, user_message
from tests.llm_server import default_reply_text, sha12, status

PROMPTS = {"": ROOT / "system_prompt.txt", "short": ROOT / "prompts" / "short.txt",
           "tags": ROOT / "prompts" / "tags.txt"}
VARIANT_ARGS = ["--variant", f"short={PROMPTS['short']}", "--variant", f"tags={PROMPTS['tags']}"]


def system_of(request: dict) -> str:
    return next(m["content"] for m in request["messages"] if m["role"] == "system")


def user_of(request: dict) -> str:
    return [m["content"] for m in request["messages"] if m["role"] == "user"][-1]


def tag_reply(request: dict) -> str:
    """The reply names both the system prompt and the user message it answered, so a cache traces to its request."""
    return f"sys-{sha12(system_of(request))} for user-{sha12(user_of(request))}"


def prompt_text(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def variant_path(image: Path, name: str) -> Path:
    return image.parent / f"{image.stem}_combined{f'_{name}' if name else ''}.txt"


def requests_for(requests: list[dict], manual: str) -> list[dict]:
    return [r for r in requests if manual in user_of(r)]


def manual_of(image: Path, ext: str = ".txt") -> str:
    return image.with_suffix(ext).read_text(encoding="utf-8").strip()




def seeded(tmp_path: Path, n: int = 2, captions: bool = True) -> tuple[Path, list[Path]]:
    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, n, captions=captions)
    seed_generated(images)
    return ds, images


def no_model_args(tmp_path: Path, ds: Path, server, *extra) -> list[str]:
    """A --model_id that does not exist: a run that tried to load the vision model would fail."""
    return run_args(ds, tmp_path / "no-such-model", server, *extra)


def run_ok(capsys, args) -> str:
    """Run to exit 0; the summary (stdout), then the progress and -v lines (stderr)."""
    code, out, err = run_main(capsys, *args)
    assert code == 0, out + err
    return out + err


def records_by_cache(ds: Path) -> dict[str, dict]:
    lines = (ds / ".enhance_captions" / "records.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return {row["cache"]: row for row in rows if "cache" in row}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# --variant: every variant from a request with its own system prompt
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [[], ["--overlap"]], ids=["after-vision", "overlap"])
def test_each_variant_is_merged_with_its_own_system_prompt(tmp_path, model_dir, llm_server, capsys, overlap):
    llm_server.reply = tag_reply
    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, 3)
    run_ok(capsys, run_args(ds, model_dir("florence2"), llm_server, *VARIANT_ARGS, *overlap))

    prompts = {name: prompt_text(path) for name, path in PROMPTS.items()}
    assert len(set(prompts.values())) == 3
    requests = llm_server.chat_requests()
    assert len(requests) == 3 * len(images)
    records = records_by_cache(ds)
    for image in images:
        mine = requests_for(requests, manual_of(image))
        assert sorted(system_of(r) for r in mine) == sorted(prompts.values()), image.name
        assert len({user_of(r) for r in mine}) == 1  # the same manual and vision caption for every variant
        assert caches(image)[0].read_text(encoding="utf-8").strip() in user_of(mine[0])
        for name, prompt in prompts.items():
            path = variant_path(image, name)
            request = next(r for r in mine if system_of(r) == prompt)
            assert path.read_text(encoding="utf-8").strip() == tag_reply(request), path.name
            record = records[path.relative_to(ds).as_posix()]  # a record of its own per variant
            assert record["sha"] == ec.digest(path.read_bytes())
        settings = {records[variant_path(image, name).relative_to(ds).as_posix()]["settings"] for name in prompts}
        assert len(settings) == 3  # the system prompt is part of each variant's settings
    assert not list(ds.glob("*.caption"))  # no --write_captions: no trainer captions


# --------------------------------------------------------------------------------------------
# Resume and freshness, per variant
# --------------------------------------------------------------------------------------------


def test_a_rerun_asks_nothing_and_a_deleted_variant_is_made_again_alone(tmp_path, llm_server, capsys):
    llm_server.reply = tag_reply
    ds, images = seeded(tmp_path)
    args = no_model_args(tmp_path, ds, llm_server, *VARIANT_ARGS)
    run_ok(capsys, args)
    assert len(llm_server.requests) == 3 * len(images)
    before = snapshot(ds)

    run_ok(capsys, args)
    assert len(llm_server.requests) == 3 * len(images)  # every variant resumed from its cache
    assert {k: v for k, v in snapshot(ds).items() if not k.startswith(".enhance_captions")} == \
        {k: v for k, v in before.items() if not k.startswith(".enhance_captions")}

    short = variant_path(images[1], "short")
    old = short.read_bytes()
    short.unlink()
    out = run_ok(capsys, args)
    new = llm_server.chat_requests()[3 * len(images):]
    assert len(new) == 1
    assert system_of(new[0]) == prompt_text(PROMPTS["short"]) and manual_of(images[1]) in user_of(new[0])
    assert short.read_bytes() == old
    assert "  short variant captions: 1 made (1 missing)" in out


def test_an_edited_variant_prompt_is_stale_only_for_that_variant_and_only_with_refresh_settings(
        tmp_path, llm_server, capsys):
    llm_server.reply = tag_reply
    ds, images = seeded(tmp_path)
    short_file = tmp_path / "short.txt"
    shutil.copy(PROMPTS["short"], short_file)
    args = no_model_args(tmp_path, ds, llm_server, "--variant", f"short={short_file}",
                         "--variant", f"tags={PROMPTS['tags']}")
    run_ok(capsys, args)
    first = len(llm_server.requests)
    others = {image: [variant_path(image, n).read_bytes() for n in ("", "tags")] for image in images}

    short_file.write_text(prompt_text(PROMPTS["short"]) + "\nUse at most twelve words.\n", encoding="utf-8")
    out = run_ok(capsys, args)  # --refresh inputs (the default): a prompt is a setting, not an input
    assert len(llm_server.requests) == first
    assert (f"  {len(images)} short variant captions were made with another system prompt; --refresh settings "
            "redoes them") in out

    out = run_ok(capsys, args + ["--refresh", "settings"])
    new = llm_server.chat_requests()[first:]
    assert len(new) == len(images)
    assert {system_of(r) for r in new} == {prompt_text(short_file)}
    for image in images:
        request = requests_for(new, manual_of(image))
        assert len(request) == 1
        assert variant_path(image, "short").read_text(encoding="utf-8").strip() == tag_reply(request[0])
        assert [variant_path(image, n).read_bytes() for n in ("", "tags")] == others[image]
    assert f"  short variant captions: {len(images)} made ({len(images)} settings changed)" in out

    run_ok(capsys, args + ["--refresh", "settings"])  # the new record holds the new prompt: current now
    assert len(llm_server.requests) == first + len(images)


@pytest.mark.slow
def test_a_replaced_image_redoes_every_variant_from_its_new_vision_caption(tmp_path, model_dir, llm_server, capsys):
    llm_server.reply = tag_reply
    ds, images = seeded(tmp_path)
    args = run_args(ds, model_dir("florence2"), llm_server, *VARIANT_ARGS)
    run_ok(capsys, args)  # the seeded vision captions are adopted: no model needed yet
    first = len(llm_server.requests)
    seed = caches(images[0])[0].read_text(encoding="utf-8").strip()
    make_image(images[0], 40)  # a new picture under the same name

    out = run_ok(capsys, args)
    generated = caches(images[0])[0].read_text(encoding="utf-8").strip()
    assert generated != seed and "vision: 1 done" in out
    new = llm_server.chat_requests()[first:]
    assert len(new) == 3 and all(generated in user_of(r) for r in new)
    assert sorted(system_of(r) for r in new) == sorted(prompt_text(p) for p in PROMPTS.values())
    for name, path in PROMPTS.items():
        request = next(r for r in new if system_of(r) == prompt_text(path))
        assert variant_path(images[0], name).read_text(encoding="utf-8").strip() == tag_reply(request)


def test_a_hand_edited_variant_cache_is_kept_byte_for_byte(tmp_path, llm_server, capsys):
    llm_server.reply = tag_reply
    ds, images = seeded(tmp_path)
    args = no_model_args(tmp_path, ds, llm_server, *VARIANT_ARGS)
    run_ok(capsys, args)
    first = len(llm_server.requests)
    tags = variant_path(images[0], "tags")
    edit = b"sks woman, my own tags,  by hand\r\n"
    tags.write_bytes(edit)

    for extra in ([], ["--refresh", "settings"], ["-v"]):
        out = run_ok(capsys, args + extra)
        assert len(llm_server.requests) == first
        assert tags.read_bytes() == edit
        assert "  edited by hand (kept): 1 (1 combined_tags)" in out
    assert f"kept {tags}: edited by hand" in out  # -v names the file


def test_an_edited_manual_caption_redoes_every_variant_of_that_image(tmp_path, llm_server, capsys):
    llm_server.reply = tag_reply
    ds, images = seeded(tmp_path)
    args = no_model_args(tmp_path, ds, llm_server, *VARIANT_ARGS)
    run_ok(capsys, args)
    first = len(llm_server.requests)
    untouched = snapshot(ds)

    images[1].with_suffix(".txt").write_text("sks woman, a new manual caption", encoding="utf-8")
    out = run_ok(capsys, args)
    new = llm_server.chat_requests()[first:]
    assert len(new) == 3
    assert all("sks woman, a new manual caption" in user_of(r) for r in new)
    assert sorted(system_of(r) for r in new) == sorted(prompt_text(p) for p in PROMPTS.values())
    for name, path in PROMPTS.items():
        request = next(r for r in new if system_of(r) == prompt_text(path))
        assert variant_path(images[1], name).read_text(encoding="utf-8").strip() == tag_reply(request)
        assert variant_path(images[0], name).read_bytes() == untouched[variant_path(images[0], name).name]
    for label in ("combined captions", "short variant captions", "tags variant captions"):
        assert f"  {label}: 1 made (1 manual changed)" in out


@pytest.mark.parametrize("values, named", [
    (["short"], "--variant short"),
    (["=prompts/short.txt"], "--variant =prompts/short.txt"),
    (["short="], "--variant short="),
    (["two words=prompts/short.txt"], "--variant two words"),
    (["a_b=prompts/short.txt"], "--variant a_b"),
    (["short=no/such/prompt.txt"], "no/such/prompt.txt"),
    (["short=empty.txt"], "empty.txt"),
    (["short=prompts/short.txt", "short=prompts/tags.txt"], "--variant short is given twice"),
])
def test_a_bad_variant_is_one_line_and_exit_2(tmp_path, llm_server, capsys, values, named):
    (tmp_path / "prompts").mkdir()
    for name in ("short.txt", "tags.txt"):
        shutil.copy(PROMPTS[name.removesuffix(".txt")], tmp_path / "prompts" / name)  # relative to the cwd
    (tmp_path / "empty.txt").write_text(" \n", encoding="utf-8")
    ds, images = seeded(tmp_path)
    before = snapshot(ds)
    variant_args = [a for value in values for a in ("--variant", value)]
    code, out, err = run_main(capsys, *no_model_args(tmp_path, ds, llm_server, *variant_args))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err
    assert not llm_server.requests and snapshot(ds) == before


# --------------------------------------------------------------------------------------------
# --write_captions EXT
# --------------------------------------------------------------------------------------------


def kohya_caption(image: Path, caption_extension: str) -> str:
    """How kohya's DreamBooth-style dataset reads a caption: the file beside the image named stem + extension,
    opened as UTF-8, its first line stripped."""
    path = os.path.splitext(str(image))[0] + caption_extension
    assert os.path.isfile(path), path
    with open(path, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    assert len(lines) > 0, path
    return lines[0].strip()


def combined(image: Path) -> str:
    return caches(image)[1].read_text(encoding="utf-8").strip()


def trainer_line(written: int, current: int, kept: int) -> str:
    return f"  trainer captions: {written} written, {current} current, {kept} edited by hand (kept)"


@pytest.mark.slow
def test_write_captions_copies_each_combined_caption_where_kohya_reads_it(tmp_path, model_dir, llm_server, capsys):
    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, 3)
    args = run_args(ds, model_dir("florence2"), llm_server, "--write_captions", ".caption")
    out = run_ok(capsys, args)
    assert trainer_line(3, 0, 0) in out.splitlines()
    for image in images:
        assert image.with_suffix(".caption").read_text(encoding="utf-8").strip() == combined(image)
        assert kohya_caption(image, ".caption") == combined(image)
    records = records_by_cache(ds)
    assert all(image.with_suffix(".caption").name in records for image in images)

    requests = len(llm_server.requests)
    out = run_ok(capsys, args)
    assert trainer_line(0, 3, 0) in out.splitlines() and len(llm_server.requests) == requests


def test_write_captions_follow_an_edited_manual_caption(tmp_path, llm_server, capsys):
    ds, images = seeded(tmp_path)
    args = no_model_args(tmp_path, ds, llm_server, "--write_captions", "caption")  # the dot is optional
    run_ok(capsys, args)
    old = [image.with_suffix(".caption").read_bytes() for image in images]

    images[0].with_suffix(".txt").write_text("sks woman, edited manual caption", encoding="utf-8")
    out = run_ok(capsys, args)
    assert trainer_line(1, 1, 0) in out.splitlines()
    assert "sks woman, edited manual caption" in combined(images[0])
    for image in images:
        assert kohya_caption(image, ".caption") == combined(image)
    assert images[0].with_suffix(".caption").read_bytes() != old[0]
    assert images[1].with_suffix(".caption").read_bytes() == old[1]


def test_write_captions_follow_a_hand_edited_combined_caption(tmp_path, llm_server, capsys):
    ds, images = seeded(tmp_path)
    args = no_model_args(tmp_path, ds, llm_server, "--write_captions", ".caption")
    run_ok(capsys, args)
    requests = len(llm_server.requests)
    caches(images[0])[1].write_text("sks woman, combined caption fixed by hand\n", encoding="utf-8")
    out = run_ok(capsys, args)
    assert len(llm_server.requests) == requests  # the hand edit is kept ...
    assert kohya_caption(images[0], ".caption") == "sks woman, combined caption fixed by hand"  # ... and trained on
    assert trainer_line(1, 1, 0) in out.splitlines()


def test_a_hand_edited_trainer_caption_is_kept_and_counted(tmp_path, llm_server, capsys):
    ds, images = seeded(tmp_path, 3)
    args = no_model_args(tmp_path, ds, llm_server, "--write_captions", ".caption")
    run_ok(capsys, args)
    edited = images[1].with_suffix(".caption")
    edit = b"sks woman, trainer caption edited by hand\r\n"
    edited.write_bytes(edit)

    out = run_ok(capsys, args + ["-v"])
    assert trainer_line(0, 2, 1) in out.splitlines()
    assert edited.read_bytes() == edit
    assert str(edited) in out  # -v names the file kept
    assert "older than a change" not in out

    images[1].with_suffix(".txt").write_text("sks woman, a newer manual caption", encoding="utf-8")
    out = run_ok(capsys, args + ["-v"])  # the combined caption moves on; the person's trainer caption stays
    assert "sks woman, a newer manual caption" in combined(images[1])
    assert edited.read_bytes() == edit
    assert trainer_line(0, 2, 1) in out.splitlines()
    outdated = ("  hand edits older than a change to their manual caption or image: 1 (1 trainer); kept: delete one to "
                "have it made again (-v names them)")
    assert outdated in out.splitlines()  # this run and every later one, until the file is given back
    assert f"kept {edited}: not written by this script, or edited since, older than a change to its manual " \
           "caption or image" in out
    assert outdated in run_ok(capsys, args).splitlines()

    edited.unlink()  # given back: written again
    out = run_ok(capsys, args)
    assert trainer_line(1, 2, 0) in out.splitlines()
    assert "older than a change" not in out
    assert kohya_caption(images[1], ".caption") == combined(images[1])


def test_a_trainer_caption_found_from_before_is_kept(tmp_path, llm_server, capsys):
    ds, images = seeded(tmp_path)
    theirs = images[0].with_suffix(".caption")
    theirs.write_bytes(b"captions from another tool\n")
    out = run_ok(capsys, no_model_args(tmp_path, ds, llm_server, "--write_captions", ".caption"))
    assert theirs.read_bytes() == b"captions from another tool\n"
    assert trainer_line(1, 0, 1) in out.splitlines()


def test_a_trainer_caption_follows_its_combined_caption_when_the_merge_fails(tmp_path, llm_server, capsys):
    """The copy follows the combined caption as it is on disk: a merge that fails leaves the one made before, and the
    trainer's file (not there yet: the earlier run had no --write_captions) is brought up to it."""
    ds, images = seeded(tmp_path)
    run_ok(capsys, no_model_args(tmp_path, ds, llm_server))
    before = combined(images[0])
    images[0].with_suffix(".txt").write_text("sks woman, refused by the endpoint", encoding="utf-8")
    llm_server.reply = lambda body: status(400) if "refused by the endpoint" in user_message(body) \
        else default_reply_text(body)
    code, out, err = run_main(capsys, *no_model_args(tmp_path, ds, llm_server, "--write_captions", ".caption"))
    assert code == 1, out + err
    assert combined(images[0]) == before
    assert trainer_line(2, 0, 0) in out.splitlines()
    assert [kohya_caption(image, ".caption") for image in images] == [combined(image) for image in images]


@pytest.mark.slow
def test_a_trainer_caption_follows_its_combined_caption_when_the_vision_caption_fails(tmp_path, model_dir,
                                                                                      llm_server, capsys):
    """An image replaced by a broken file: its vision caption fails, its merge waits for the next run, and the
    trainer's file is brought up to the combined caption that stays."""
    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, 2)
    run_ok(capsys, run_args(ds, model_dir("florence2"), llm_server))
    images[0].write_bytes(images[0].read_bytes()[:200])  # a truncated JPEG: the image changed, and cannot be read
    code, out, err = run_main(capsys, *run_args(ds, model_dir("florence2"), llm_server, "--write_captions", ".caption"))
    assert code == 1, out + err
    assert trainer_line(2, 0, 0) in out.splitlines()
    assert [kohya_caption(image, ".caption") for image in images] == [combined(image) for image in images]


def test_write_captions_beside_an_image_that_cannot_be_read(tmp_path, llm_server, capsys):
    """A dangling symlink is found as an image and fails at planning, before its caches are looked at: one line for
    it, and the trainer's files of the others written."""
    ds, images = seeded(tmp_path)
    (ds / "gone.jpg").symlink_to(ds / "no-such-file.jpg")
    code, out, err = run_main(capsys, *no_model_args(tmp_path, ds, llm_server, "--write_captions", ".caption"))
    assert code == 1, out + err
    assert len([line for line in err.splitlines() if "gone.jpg" in line]) == 1, err
    assert trainer_line(2, 0, 0) in out.splitlines()
    assert [kohya_caption(image, ".caption") for image in images] == [combined(image) for image in images]


@pytest.mark.parametrize("value", [".txt", "txt", ".TXT", ".png", ".jpg", "webp", ".JPEG"])
def test_write_captions_over_the_manual_captions_or_as_an_image_is_refused(tmp_path, llm_server, capsys, value):
    """.txt would overwrite the manual captions the next run reads; a text file named like an image would be found
    as an image on the next run (or replace one)."""
    ds, images = seeded(tmp_path)
    before = snapshot(ds)
    code, out, err = run_main(capsys, *no_model_args(tmp_path, ds, llm_server, "--write_captions", value))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "--write_captions" in err, err
    assert snapshot(ds) == before and not llm_server.requests


def test_manual_captions_as_caption_and_trainer_captions_as_txt(tmp_path, llm_server, capsys):
    ds, images = seeded(tmp_path, captions=False)
    for i, image in enumerate(images):
        image.with_suffix(".caption").write_text(f"sks subject{i}, manual caption in a .caption file",
                                                 encoding="utf-8")
    manual = snapshot(ds)
    args = no_model_args(tmp_path, ds, llm_server, "--caption_extension", ".caption", "--write_captions", ".txt")
    out = run_ok(capsys, args)
    assert trainer_line(2, 0, 0) in out.splitlines()
    for i, image in enumerate(images):
        assert manual_of(image, ".caption") in user_of(requests_for(llm_server.requests, f"subject{i},")[0])
        assert image.with_suffix(".caption").read_bytes() == manual[image.with_suffix(".caption").name]
        assert kohya_caption(image, ".txt") == combined(image)

    requests = len(llm_server.requests)
    out = run_ok(capsys, args)  # the .txt files written are nobody's manual captions: nothing to redo
    assert len(llm_server.requests) == requests
    assert trainer_line(0, 2, 0) in out.splitlines()
    code, out, err = run_main(capsys, *no_model_args(tmp_path, ds, llm_server, "--caption_extension", ".caption",
                                                     "--write_captions", ".caption"))
    assert code == 2 and err.count("\n") == 1


def test_write_captions_with_dry_run_writes_nothing(tmp_path, llm_server, capsys):
    ds, images = seeded(tmp_path)
    before = snapshot(ds)
    code, out, err = run_main(capsys, *no_model_args(tmp_path, ds, llm_server, "--write_captions", ".caption",
                                                     "--dry_run", *VARIANT_ARGS))
    assert code == 0, out + err
    assert snapshot(ds) == before and not llm_server.requests
    assert "LLM calls to make: 6 (0 cached)" in out
    assert "  trainer captions to write (--write_captions): 2 (0 edited by hand, kept)" in out.splitlines()
    run_ok(capsys, no_model_args(tmp_path, ds, llm_server, "--write_captions", ".caption"))
    images[0].with_suffix(".caption").write_text("sks woman, trainer caption edited by hand", encoding="utf-8")
    images[1].with_suffix(".caption").unlink()
    code, out, err = run_main(capsys, *no_model_args(tmp_path, ds, llm_server, "--write_captions", ".caption",
                                                     "--dry_run"))
    assert code == 0, out + err
    assert "  trainer captions to write (--write_captions): 1 (1 edited by hand, kept)" in out.splitlines()


# --------------------------------------------------------------------------------------------
# --export carries the variants
# --------------------------------------------------------------------------------------------


def test_export_carries_a_variant_as_its_own_column(tmp_path, llm_server, capsys):
    import datasets

    llm_server.reply = tag_reply
    ds, images = seeded(tmp_path, 3)
    args = no_model_args(tmp_path, ds, llm_server, "--variant", f"short={PROMPTS['short']}")
    run_ok(capsys, args + ["--export", "metadata.jsonl"])
    run_ok(capsys, args + ["--export", "kohya.json"])
    assert len(llm_server.requests) == 2 * len(images)

    loaded = datasets.load_dataset("imagefolder", data_dir=str(ds), split="train", cache_dir=str(tmp_path / "hf"))
    loaded = loaded.cast_column("image", datasets.Image(decode=False))
    assert {"text", "text_short"} <= set(loaded.column_names)
    rows = {Path(row["image"]["path"]).resolve(): row for row in loaded}
    assert sorted(rows) == sorted(image.resolve() for image in images)
    for image in images:
        assert rows[image.resolve()]["text"] == combined(image)
        assert rows[image.resolve()]["text_short"] == variant_path(image, "short").read_text(encoding="utf-8").strip()
        assert rows[image.resolve()]["text"] != rows[image.resolve()]["text_short"]

    metadata = json.loads((ds / "kohya.json").read_text(encoding="utf-8"))
    assert sorted(Path(key) for key in metadata) == sorted(images)
    for key, entry in metadata.items():
        assert entry["caption"] == combined(Path(key))
        assert entry["caption_short"] == variant_path(Path(key), "short").read_text(encoding="utf-8").strip()


def test_write_captions_with_refresh_none_still_know_their_own_files(tmp_path, llm_server, capsys):
    """--refresh none trusts the caches; the trainer captions are still this script's copies, not hand edits."""
    ds, images = seeded(tmp_path)
    args = no_model_args(tmp_path, ds, llm_server, "--write_captions", ".caption")
    run_ok(capsys, args)
    caches(images[0])[1].write_text("sks woman, combined caption fixed by hand\n", encoding="utf-8")
    out = run_ok(capsys, args + ["--refresh", "none"])
    assert kohya_caption(images[0], ".caption") == "sks woman, combined caption fixed by hand"
    assert trainer_line(1, 1, 0) in out.splitlines()
