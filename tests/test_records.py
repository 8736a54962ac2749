"""Records: what made each cache, and the one decision per item that reads them (--refresh, hand edits, adoption).

Every run goes through the command line against the loopback fake server. Where no model load is expected, the
vision model is a copy of the tiny model whose weights file is junk: a needless load fails the run. Requests are
told apart by the manual captions make_dataset writes ("subject{i}, photo number {i}"); the tiny model's words
are never asserted, only whether a caption's bytes changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import Cli, caches, make_dataset, make_image, run_args, run_main, run_two_processes, user_message

SUBJECT = re.compile(r"subject(\d+), photo number \1")
RECORDS = Path(".enhance_captions") / "records.jsonl"
JOURNALS = Path(".enhance_captions") / "journal"
LOCK = ".enhance_captions.lock"
CACHE_SUFFIXES = ("_generated.txt", "_combined.txt")
OTHER_PICTURE = 39  # a make_image seed whose picture the tiny model captions unlike img000's (either way is checked)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class VisionModel:
    """A copy of the tiny vision model at one path (so the settings stay the same) whose weights can be junk."""

    def __init__(self, source: str, folder: Path):
        shutil.copytree(source, folder)
        self.path = folder
        self.weights = folder / "model.safetensors"
        self.good_bytes = self.weights.read_bytes()

    def good(self) -> Path:
        """A load is expected: the real weights."""
        self.weights.write_bytes(self.good_bytes)
        return self.path

    def broken(self) -> Path:
        """No load is expected: a load would fail the run."""
        self.weights.write_bytes(b"not a safetensors file " * 64)
        return self.path


@pytest.fixture
def vlm(model_dir, tmp_path) -> VisionModel:
    return VisionModel(model_dir("florence2"), tmp_path / "vlm")




def system_message(request: dict) -> str:
    return [m for m in request["messages"] if m["role"] == "system"][0]["content"]


def subject_of(request: dict) -> int | None:
    match = SUBJECT.search(user_message(request))
    return int(match.group(1)) if match else None


def subjects(requests) -> list:
    """Which images were asked for, by manual caption; None for an image without one."""
    return sorted((subject_of(r) for r in requests), key=lambda s: (s is None, s))


def run(capsys, ds, model, server, *extra, expect: int = 0) -> tuple[str, list[dict]]:
    """One in-process run; returns its stdout and the requests it made."""
    asked = len(server.requests)
    code, out, err = run_main(capsys, *run_args(ds, model, server, *extra))
    assert code == expect, out + err
    return out + err, server.chat_requests()[asked:]


def vision_done(out: str) -> int:
    return int(re.search(r"^vision: (\d+) done", out, re.M).group(1))


def snapshot(ds: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under the dataset, hidden ones too (but not the lock a run rewrites): bytes and mtime."""
    return {p.relative_to(ds).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(ds.rglob("*")) if p.is_file() and p.name != LOCK}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def cache_files(ds: Path) -> dict[str, Path]:
    return {p.relative_to(ds).as_posix(): p for p in sorted(ds.rglob("*"))
            if p.name.endswith(CACHE_SUFFIXES) and not p.name.startswith(".")}


def read_records(ds: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """records.jsonl: every line parses, one record per cache; (records by cache, settings by id)."""
    rows = [json.loads(line) for line in (ds / RECORDS).read_text(encoding="utf-8").splitlines()]
    records = [r for r in rows if "cache" in r]
    keys = [r["cache"] for r in records]
    assert len(keys) == len(set(keys)), "more than one record for a cache"
    settings = {r["settings"]: r["values"] for r in rows if "values" in r}
    assert len(records) + len(settings) == len(rows), "a line that is neither a record nor settings"
    return dict(zip(keys, records)), settings


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def assert_recorded(ds: Path, edited: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every cache on disk has a record whose sha is its bytes' hash (a hand edit's differs), with its settings;
    the journals are folded in."""
    records, settings = read_records(ds)
    for key, path in cache_files(ds).items():
        assert key in records, f"{key} has no record"
        assert (records[key]["sha"] == sha(path)) is (key not in edited), key
        assert records[key]["settings"] in settings, key
    assert not list((ds / JOURNALS).glob("*.jsonl")), "a journal was left behind"
    return records


def assert_quiet(capsys, ds, vlm, server, *extra) -> None:
    """A rerun with nothing changed: no request, no model load, no file written."""
    before = snapshot(ds)
    out, requests = run(capsys, ds, vlm.broken(), server, *extra)
    assert requests == []
    assert vision_done(out) == 0
    assert changed(before, snapshot(ds)) == set()


def summary(out: str, name: str) -> str:
    return re.search(rf"^  {name}: .*$", out, re.M).group(0)


# --------------------------------------------------------------------------------------------
# 1. One change at a time: exactly the requests and model loads it needs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_each_change_redoes_exactly_what_it_touched(tmp_path, capsys, vlm, llm_server):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 4)
    (ds / "img003.txt").unlink()  # one image without a manual caption
    gen = [caches(image)[0] for image in images]
    hand_edits: tuple[str, ...] = ()

    out, requests = run(capsys, ds, vlm.good(), llm_server)
    assert vision_done(out) == 4
    assert subjects(requests) == [0, 1, 2, None]
    assert set(assert_recorded(ds)) == set(cache_files(ds)) and len(cache_files(ds)) == 8

    # nothing changed
    assert_quiet(capsys, ds, vlm, llm_server)

    # a manual caption edited: that merge again, from the cached vision caption
    (ds / "img000.txt").write_text("subject0, photo number 0, in the rain", encoding="utf-8")
    before = snapshot(ds)
    out, requests = run(capsys, ds, vlm.broken(), llm_server)
    assert subjects(requests) == [0] and "in the rain" in user_message(requests[0])
    assert gen[0].read_text(encoding="utf-8").strip() in user_message(requests[0])
    assert changed(before, snapshot(ds)) == {"img000_combined.txt", RECORDS.as_posix()}
    assert summary(out, "combined captions") == "  combined captions: 1 made (1 manual changed), 3 already current"
    assert_recorded(ds, hand_edits)
    assert_quiet(capsys, ds, vlm, llm_server)

    # a manual caption added to an image that had none
    (ds / "img003.txt").write_text("subject3, photo number 3", encoding="utf-8")
    before = snapshot(ds)
    out, requests = run(capsys, ds, vlm.broken(), llm_server)
    assert subjects(requests) == [3]
    assert changed(before, snapshot(ds)) == {"img003_combined.txt", RECORDS.as_posix()}
    assert_quiet(capsys, ds, vlm, llm_server)

    # a manual caption deleted
    (ds / "img002.txt").unlink()
    out, requests = run(capsys, ds, vlm.broken(), llm_server)
    assert subjects(requests) == [None]
    assert "There is no manual caption" in user_message(requests[0])
    assert gen[2].read_text(encoding="utf-8").strip() in user_message(requests[0])
    assert_recorded(ds, hand_edits)
    assert_quiet(capsys, ds, vlm, llm_server)

    # a vision caption edited by hand: merged again from the edited text, which is kept byte for byte
    hand_edits = ("img001_generated.txt",)
    edited = b"a hand edited vision caption, with a lantern"  # no final newline: not how the script writes
    gen[1].write_bytes(edited)
    before = snapshot(ds)
    out, requests = run(capsys, ds, vlm.broken(), llm_server)
    assert subjects(requests) == [1]
    assert "a hand edited vision caption, with a lantern" in user_message(requests[0])
    assert gen[1].read_bytes() == edited
    assert changed(before, snapshot(ds)) == {"img001_combined.txt", RECORDS.as_posix()}
    assert summary(out, "combined captions").startswith("  combined captions: 1 made (1 generated edited)")
    assert summary(out, "edited by hand \\(kept\\)") == "  edited by hand (kept): 1 (1 generated)"
    assert_recorded(ds, hand_edits)
    assert_quiet(capsys, ds, vlm, llm_server)

    # an image touched (same pixels, new mtime): captioned again; the caption is the same, so no merge
    old = gen[2].read_bytes()
    os.utime(images[2], ns=(images[2].stat().st_atime_ns, images[2].stat().st_mtime_ns + 5_000_000_000))
    out, requests = run(capsys, ds, vlm.good(), llm_server)
    assert vision_done(out) == 1
    assert gen[2].read_bytes() == old  # greedy captions of the same pixels
    assert requests == []
    assert_recorded(ds, hand_edits)
    assert_quiet(capsys, ds, vlm, llm_server)  # the merge now stands for the new image: not captioned again

    # an image replaced by another picture: captioned again, merged again only if its caption changed
    old = gen[0].read_bytes()
    make_image(images[0], OTHER_PICTURE)
    out, requests = run(capsys, ds, vlm.good(), llm_server)
    assert vision_done(out) == 1
    assert subjects(requests) == ([0] if gen[0].read_bytes() != old else [])
    if requests:
        assert gen[0].read_text(encoding="utf-8").strip() in user_message(requests[0])
    assert_recorded(ds, hand_edits)
    assert_quiet(capsys, ds, vlm, llm_server)

    # a vision caption deleted whose merge is current: nothing to do, and it is not made again
    gen[3].unlink()
    assert_quiet(capsys, ds, vlm, llm_server)
    assert not gen[3].exists()

    # another system prompt: ignored by --refresh inputs, a merge per image with --refresh settings
    prompt = tmp_path / "other_prompt.txt"
    prompt.write_text("Merge the captions, tersely.", encoding="utf-8")
    assert_quiet(capsys, ds, vlm, llm_server, "--system_prompt", prompt)
    _, requests = run(capsys, ds, vlm.broken(), llm_server, "--system_prompt", prompt)
    assert requests == [] and "  4 combined captions were made with another system prompt; --refresh settings " \
                              "redoes them" in _
    out, requests = run(capsys, ds, vlm.good(), llm_server, "--system_prompt", prompt, "--refresh", "settings")
    assert subjects(requests) == [0, 1, 3, None]
    assert all(system_message(r) == "Merge the captions, tersely." for r in requests)
    assert vision_done(out) == 1 and gen[3].exists()  # img003's merge needs the vision caption deleted above
    assert summary(out, "combined captions") == "  combined captions: 4 made (4 settings changed)"
    assert gen[1].read_bytes() == edited
    assert_recorded(ds, hand_edits)
    assert_quiet(capsys, ds, vlm, llm_server, "--system_prompt", prompt, "--refresh", "settings")

    # other vision settings with --refresh settings: captioned again (not the hand edit), merged where it changed
    old = {i: gen[i].read_bytes() for i in range(4)}
    settings = ("--system_prompt", prompt, "--refresh", "settings", "--max_new_tokens", "5")
    out, requests = run(capsys, ds, vlm.good(), llm_server, *settings)
    assert vision_done(out) == 3
    assert gen[1].read_bytes() == edited
    recaptioned = [i for i in (0, 2, 3) if gen[i].read_bytes() != old[i]]
    assert subjects(requests) == sorted((None if i == 2 else i for i in recaptioned), key=lambda s: (s is None, s))
    assert_recorded(ds, hand_edits)
    assert_quiet(capsys, ds, vlm, llm_server, *settings)

    # --refresh none trusts every cache; the next --refresh inputs run merges the edit
    (ds / "img002.txt").write_text("subject2, photo number 2", encoding="utf-8")
    assert_quiet(capsys, ds, vlm, llm_server, "--refresh", "none")
    out, requests = run(capsys, ds, vlm.broken(), llm_server)
    assert subjects(requests) == [2]
    assert_recorded(ds, hand_edits)
    assert_quiet(capsys, ds, vlm, llm_server)


# --------------------------------------------------------------------------------------------
# 2. Hand edits are kept byte for byte until --overwrite names their kind
# --------------------------------------------------------------------------------------------

UTF8_EDIT = "My own caption \u2014 a caf\u00e9 at dusk\n".encode("utf-8")
CP1252_EDIT = b"caf\xe9 au lait, my own words\r\n"  # saved by an editor as cp1252: not valid UTF-8


def edit_manual_captions(ds: Path, n: int) -> None:
    for i in range(n):
        (ds / f"img{i:03d}.txt").write_text(f"subject{i}, photo number {i}, edited", encoding="utf-8")


@pytest.mark.slow
def test_hand_edited_combined_captions_are_kept_until_overwrite_combined(tmp_path, capsys, vlm, llm_server):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 3)
    run(capsys, ds, vlm.good(), llm_server)
    comb = [caches(image)[1] for image in images]
    comb[0].write_bytes(UTF8_EDIT)
    comb[1].write_bytes(CP1252_EDIT)
    edit_manual_captions(ds, 3)  # their manual captions changed too: still kept

    out, requests = run(capsys, ds, vlm.broken(), llm_server, "-v")
    assert subjects(requests) == [2]
    assert comb[0].read_bytes() == UTF8_EDIT and comb[1].read_bytes() == CP1252_EDIT
    assert summary(out, "edited by hand \\(kept\\)") == "  edited by hand (kept): 2 (2 combined)"
    assert f"kept {comb[0]}: edited by hand" in out and f"kept {comb[1]}: edited by hand" in out
    assert_recorded(ds, ("img000_combined.txt", "img001_combined.txt"))
    assert_quiet(capsys, ds, vlm, llm_server)

    # the other kind's --overwrite leaves them alone
    out, requests = run(capsys, ds, vlm.good(), llm_server, "--overwrite", "generated")
    assert vision_done(out) == 3
    assert comb[0].read_bytes() == UTF8_EDIT and comb[1].read_bytes() == CP1252_EDIT
    assert 0 not in subjects(requests) and 1 not in subjects(requests)
    assert "edited by hand (kept): 2 (2 combined)" in out

    out, requests = run(capsys, ds, vlm.broken(), llm_server, "--overwrite", "combined")
    assert subjects(requests) == [0, 1, 2]
    assert comb[0].read_bytes() != UTF8_EDIT and comb[1].read_bytes() != CP1252_EDIT
    assert all(c.read_text(encoding="utf-8").startswith("MERGED ") for c in comb)
    assert_recorded(ds)
    assert_quiet(capsys, ds, vlm, llm_server)


def test_a_hand_edit_older_than_a_change_to_its_inputs_is_kept_and_named(tmp_path, capsys, vlm, llm_server):
    """Nothing redoes a hand edit, so one whose manual caption or image changed after it is said to be outdated; one
    made after the change is the person's latest word and is not."""
    ds = tmp_path / "ds"
    images = make_dataset(ds, 3)
    run(capsys, ds, vlm.good(), llm_server)
    gen, comb = zip(*(caches(image) for image in images))

    def edit(path: Path, data: bytes, at: int) -> None:  # written `at` seconds after the run, by the clock of mtimes
        path.write_bytes(data)
        os.utime(path, ns=(os.stat(path).st_atime_ns, (int(images[0].stat().st_mtime) + at) * 10**9))

    edit(comb[0], UTF8_EDIT, 10)  # edited, then its manual caption changed: outdated
    edit(ds / "img000.txt", b"subject0, photo number 0, now in blue", 20)
    edit(ds / "img001.txt", b"subject1, photo number 1, now in blue", 10)  # changed, then edited: the latest word
    edit(comb[1], CP1252_EDIT, 20)
    edit(gen[2], UTF8_EDIT, 10)  # a vision caption edited, then the image replaced: outdated
    make_image(images[2], OTHER_PICTURE)
    os.utime(images[2], ns=(0, (int(images[0].stat().st_mtime) + 20) * 10**9))
    before = snapshot(ds)

    out, requests = run(capsys, ds, vlm.broken(), llm_server, "-v")
    assert subjects(requests) == [2]  # its merge follows the edited vision caption
    assert changed(before, snapshot(ds)) <= {"img002_combined.txt", ".enhance_captions/records.jsonl"}
    assert summary(out, "edited by hand \\(kept\\)") == "  edited by hand (kept): 3 (2 combined, 1 generated)"
    assert summary(out, "hand edits older than a change to their manual caption or image") == (
        "  hand edits older than a change to their manual caption or image: 2 (1 combined, 1 generated); kept: "
        "delete one to have it made again (-v names them)")
    outdated = ", older than a change to its manual caption or image"
    assert f"kept {comb[0]}: edited by hand{outdated}\n" in out and f"kept {gen[2]}: edited by hand{outdated}\n" in out
    assert f"kept {comb[1]}: edited by hand\n" in out
    assert comb[0].read_bytes() == UTF8_EDIT and comb[1].read_bytes() == CP1252_EDIT and gen[2].read_bytes() == UTF8_EDIT

    comb[0].unlink()  # as the line says: deleted, it is merged again from the new manual caption
    out, requests = run(capsys, ds, vlm.broken(), llm_server)
    assert subjects(requests) == [0]
    assert "hand edits older than a change to their manual caption or image: 1 (1 generated)" in out


@pytest.mark.slow
def test_hand_edited_generated_captions_are_kept_until_overwrite_generated(tmp_path, capsys, vlm, llm_server):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 3)
    run(capsys, ds, vlm.good(), llm_server)
    gen = [caches(image)[0] for image in images]
    gen[0].write_bytes(UTF8_EDIT)
    gen[1].write_bytes(CP1252_EDIT)
    edit_manual_captions(ds, 3)
    edits = ("img000_generated.txt", "img001_generated.txt")

    # img000 merges from its edited text; img001's cannot be read: one line naming it, and it is not replaced
    out, requests = run(capsys, ds, vlm.broken(), llm_server, expect=1)
    assert subjects(requests) == [0, 2]
    asked = {subject_of(r): r for r in requests}  # in whatever order the requests went out
    assert "caf\u00e9 at dusk" in user_message(asked[0])
    assert gen[0].read_bytes() == UTF8_EDIT and gen[1].read_bytes() == CP1252_EDIT
    assert summary(out, "edited by hand \\(kept\\)") == "  edited by hand (kept): 2 (2 generated)"
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "img001_generated.txt is not valid UTF-8" in failed[0], out
    assert_recorded(ds, edits)

    # the other kind's --overwrite leaves them alone
    out, requests = run(capsys, ds, vlm.broken(), llm_server, "--overwrite", "combined", expect=1)
    assert subjects(requests) == [0, 2]
    assert gen[0].read_bytes() == UTF8_EDIT and gen[1].read_bytes() == CP1252_EDIT

    old = gen[2].read_bytes()
    out, requests = run(capsys, ds, vlm.good(), llm_server, "--overwrite", "generated")
    assert vision_done(out) == 3
    assert gen[0].read_bytes() != UTF8_EDIT and gen[1].read_bytes() != CP1252_EDIT
    for path in gen:
        path.read_bytes().decode("utf-8")
    # img001's merge waited for a readable vision caption; img000's was made from the edit, which is gone;
    # img002's stands unless its new caption differs
    assert subjects(requests) == [0, 1] + ([2] if gen[2].read_bytes() != old else [])
    assert_recorded(ds)
    assert_quiet(capsys, ds, vlm, llm_server)


# --------------------------------------------------------------------------------------------
# 3. SIGKILL at any point leaves records and caches consistent
# --------------------------------------------------------------------------------------------


def all_record_shas(ds: Path) -> dict[str, set[str]]:
    """Every sha recorded for each cache, in records.jsonl and in the journals a killed run left."""
    shas: dict[str, set[str]] = {}
    for path in [ds / RECORDS, *sorted((ds / JOURNALS).glob("*.jsonl"))]:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line a kill cut short
                continue
            if "cache" in row:
                shas.setdefault(row["cache"], set()).add(row["sha"])
    return shas


@pytest.mark.slow
@pytest.mark.parametrize("point", ["vision", "llm_first_request", "llm_midway", "remerge_midway"])
def test_sigkill_anywhere_then_one_rerun_finishes_and_the_next_does_nothing(
        tmp_path, capsys, vlm, llm_server, point):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 8 if point == "vision" else 6)
    model = vlm.good()
    if point == "remerge_midway":  # a finished folder whose manual captions all changed: merges only, no load
        run(capsys, ds, model, llm_server)
        edit_manual_captions(ds, len(images))
        model = vlm.broken()
    before_kill = snapshot(ds)
    k = 1 if point in ("vision", "llm_first_request") else 4
    llm_server.hold(after=k - 1)  # the k-th request and the ones after it stay in flight until the kill
    killed = Cli(tmp_path, "killed", *run_args(ds, model, llm_server, "--batch_size", "1", "--concurrency", "2"))
    asked = len(llm_server.requests)
    if point == "vision":
        killed.wait_for(lambda: len(list(ds.glob("*_generated.txt"))) >= 3, what="the first vision captions")
    else:
        killed.wait_for(lambda: len(llm_server.requests) >= asked + k, what=f"{k} LLM requests")
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(30)
    llm_server.release()

    # what the kill left: no empty cache, and each one's bytes are recorded (journal or records.jsonl)
    recorded = all_record_shas(ds)
    for key, path in cache_files(ds).items():
        assert path.read_bytes().strip(), key
        assert sha(path) in recorded.get(key, set()), f"{key} is on disk without its record"
    if point == "vision":
        assert len(list(ds.glob("*_generated.txt"))) < len(images)  # killed mid-stage
    if point == "remerge_midway":
        redo = [i for i, image in enumerate(images)
                if caches(image)[1].read_bytes() == before_kill[f"img{i:03d}_combined.txt"][0]]
        missing_generated = []
    else:
        redo = [i for i, image in enumerate(images) if not caches(image)[1].exists()]
        missing_generated = [i for i, image in enumerate(images) if not caches(image)[0].exists()]
    assert redo

    out, requests = run(capsys, ds, vlm.good() if missing_generated else vlm.broken(), llm_server)
    assert subjects(requests) == redo  # what the kill left undone, once each
    assert vision_done(out) == len(missing_generated)
    assert all(caches(image)[0].exists() and caches(image)[1].exists() for image in images)
    assert set(assert_recorded(ds)) == set(cache_files(ds))
    assert not [p for p in ds.rglob("*.tmp")]
    assert_quiet(capsys, ds, vlm, llm_server)


@pytest.mark.slow
def test_a_kill_between_the_record_and_the_rename_is_not_taken_for_a_hand_edit(tmp_path, capsys, vlm, llm_server):
    """The record goes to the journal before the cache is renamed into place: a kill in between leaves the old
    file behind a newer record (and maybe half a line). The old file is still ours, so it is redone, not kept."""
    ds = tmp_path / "ds"
    make_dataset(ds, 2)
    run(capsys, ds, vlm.good(), llm_server)
    records, _ = read_records(ds)
    (ds / "img000.txt").write_text("subject0, photo number 0, edited", encoding="utf-8")
    written = dict(records["img000_combined.txt"], sha="0123456789abcdef", manual=sha(ds / "img000.txt"))
    journal = ds / JOURNALS / "00000000000000000001-elsewhere-1.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text(json.dumps(written) + "\n" + '{"cache": "img001_combined.txt", "sha": "fe', encoding="utf-8")

    out, requests = run(capsys, ds, vlm.broken(), llm_server)
    assert subjects(requests) == [0]
    assert summary(out, "edited by hand \\(kept\\)") == "  edited by hand (kept): 0 (none)"
    assert set(assert_recorded(ds)) == set(cache_files(ds))
    assert_quiet(capsys, ds, vlm, llm_server)


# --------------------------------------------------------------------------------------------
# 4. Two processes write their records side by side
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_record_every_cache_and_lose_no_line(tmp_path, capsys, vlm, llm_server):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 6)
    result = run_two_processes(*run_args(ds, vlm.good(), llm_server))
    assert result.returncode == 0, result.stderr[-3000:]
    assert subjects(llm_server.requests) == list(range(6))
    records = assert_recorded(ds)  # every line parses, one record per cache, each matching its file
    assert set(records) == set(cache_files(ds)) and len(records) == 12

    # both processes merge again (no load in either), and both journals are folded in
    edit_manual_captions(ds, len(images))
    asked = len(llm_server.requests)
    result = run_two_processes(*run_args(ds, vlm.broken(), llm_server, "-v"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert subjects(llm_server.requests[asked:]) == list(range(6))
    planned = [line for line in result.stderr.splitlines() if re.fullmatch(r" {4}merge .*: manual changed", line)]
    assert len(planned) == 6  # -v lists the one plan once: the main process's, not its rows again in the other
    records = assert_recorded(ds)
    assert set(records) == set(cache_files(ds)) and len(records) == 12
    manual = {f"img{i:03d}_combined.txt": sha(ds / f"img{i:03d}.txt") for i in range(6)}
    assert {k: r["manual"] for k, r in records.items() if k in manual} == manual
    assert_quiet(capsys, ds, vlm, llm_server)


# --------------------------------------------------------------------------------------------
# 5. Caches from before records existed are adopted as they are
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_legacy_folder_is_adopted_without_a_request_or_a_load(tmp_path, capsys, vlm, llm_server):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 4)
    gen, comb = zip(*(caches(image) for image in images))
    for i in range(4):
        gen[i].write_text(f"a legacy vision caption {i}\n", encoding="utf-8")
    for i in range(3):  # img003 has only its vision caption: its merge is missing
        comb[i].write_text(f"a legacy merged caption {i}\n", encoding="utf-8")
    legacy = snapshot(ds)

    out, requests = run(capsys, ds, vlm.broken(), llm_server, "-v")
    assert subjects(requests) == [3]
    assert "a legacy vision caption 3" in user_message(requests[0])
    assert vision_done(out) == 0
    assert summary(out, "adopted") == "  adopted: 7 (3 combined, 4 generated)"
    assert f"adopted {gen[0]}" in out and f"adopted {comb[0]}" in out
    after = snapshot(ds)
    assert all(after[k] == legacy[k] for k in legacy)  # taken as they are
    records = assert_recorded(ds)
    assert set(records) == set(cache_files(ds))
    assert {k for k, r in records.items() if r.get("adopted")} == set(cache_files(ds)) - {"img003_combined.txt"}

    out, requests = run(capsys, ds, vlm.broken(), llm_server)
    assert requests == [] and summary(out, "adopted") == "  adopted: 0 (none)"

    # adopted merges go stale like any other
    (ds / "img001.txt").write_text("subject1, photo number 1, edited", encoding="utf-8")
    out, requests = run(capsys, ds, vlm.broken(), llm_server)
    assert subjects(requests) == [1]
    assert "a legacy vision caption 1" in user_message(requests[0])
    make_image(images[2], OTHER_PICTURE)  # the tiny model never writes "a legacy vision caption 2"
    out, requests = run(capsys, ds, vlm.good(), llm_server)
    assert vision_done(out) == 1 and subjects(requests) == [2]
    assert_recorded(ds)
    assert_quiet(capsys, ds, vlm, llm_server)


# --------------------------------------------------------------------------------------------
# 6. The dry run counts by reason and touches nothing
# --------------------------------------------------------------------------------------------


def plan_summary(out: str) -> list[str]:
    names = ("to caption", "to merge", "stale images", "edited by hand \\(kept\\)", "adopted")
    return [summary(out, name) for name in names]


@pytest.mark.slow
def test_dry_run_counts_each_reason_and_touches_nothing(tmp_path, capsys, vlm, llm_server):
    ds = tmp_path / "ds"
    images = make_dataset(ds, 5)
    run(capsys, ds, vlm.good(), llm_server)
    caches(images[3])[1].unlink()
    _, requests = run(capsys, ds, vlm.broken(), llm_server, "--temperature", "0.5")  # other merge settings
    assert subjects(requests) == [3]

    (ds / "img000.txt").write_text("subject0, photo number 0, edited", encoding="utf-8")  # manual changed
    old_caption = caches(images[1])[0].read_bytes()
    make_image(images[1], OTHER_PICTURE)                                                   # image changed
    caches(images[2])[0].write_text("a hand edited vision caption\n", encoding="utf-8")    # generated edited
    caches(images[4])[1].write_text("a hand edited merged caption\n", encoding="utf-8")    # kept
    legacy = make_dataset(tmp_path / "more", 7)[5:]                                        # img005: adopted
    for image in legacy:                                                                   # img006: missing
        shutil.copy(image, ds / image.name)
        shutil.copy(image.with_suffix(".txt"), ds / image.with_suffix(".txt").name)
    img005, img006 = (ds / image.name for image in legacy)
    for path in caches(img005):
        path.write_text("a legacy caption\n", encoding="utf-8")

    args = ("--refresh", "settings")
    before = snapshot(ds)
    out, requests = run(capsys, ds, vlm.broken(), llm_server, *args, "--dry_run", "-v")
    assert requests == []
    assert snapshot(ds) == before
    assert plan_summary(out) == [
        "  to caption: 2 (1 image changed, 1 missing)",
        "  to merge: 5 (1 generated edited, 1 image changed, 1 manual changed, 1 missing, 1 settings changed), "
        "1 of them only if the new vision caption differs",
        "  stale images: 1 manual changed, 1 image changed, 1 generated edited, 1 settings changed",
        "  edited by hand (kept): 2 (1 combined, 1 generated)",
        "  adopted: 2 (1 combined, 1 generated)",
    ]
    for line in (f"caption {images[1]}: image changed", f"caption {img006}: missing",
                 f"merge {images[0]}: manual changed", f"merge {images[1]}: image changed",
                 f"merge {images[2]}: generated edited", f"merge {images[3]}: settings changed",
                 f"merge {img006}: missing", f"kept {caches(images[2])[0]}: edited by hand",
                 f"kept {caches(images[4])[1]}: edited by hand", f"adopted {caches(img005)[0]}",
                 f"adopted {caches(img005)[1]}"):
        assert f"    {line}\n" in out, line

    # the run does what the dry run said, and its summary says the same
    out_run, requests = run(capsys, ds, vlm.good(), llm_server, *args)
    assert plan_summary(out)[3:] == [summary(out_run, "edited by hand \\(kept\\)"), summary(out_run, "adopted")]
    assert summary(out_run, "combined captions").startswith(  # the planned merges, made (one only if it changed)
        "  combined captions: ") and "(1 generated edited, 1 image changed, 1 manual changed, 1 missing, " \
        "1 settings changed)" in summary(out_run, "combined captions")
    assert vision_done(out_run) == 2
    recaptioned = caches(images[1])[0].read_bytes() != old_caption
    assert subjects(requests) == [0] + [1] * recaptioned + [2, 3, 6]
    assert_recorded(ds, ("img002_generated.txt", "img004_combined.txt"))
    assert_quiet(capsys, ds, vlm, llm_server, *args)


def test_damaged_weights_are_one_line_and_exit_2(tmp_path, capsys, vlm, llm_server):
    """The junk weights that guard the tests above, met when a load is really needed: one clear line."""
    ds = tmp_path / "ds"
    make_dataset(ds, 2)
    code, out, err = run_main(capsys, *run_args(ds, vlm.broken(), llm_server))
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "damaged" in lines[0] and "Traceback" not in err
    assert llm_server.requests == [] and not list(ds.glob("*_combined.txt"))
