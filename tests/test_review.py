"""--review over HTTP: the token, POST-only changes, only the plan's files, the lock, conflicts, escaping, and a save
that the records and the next run see as a person's edit; approval into --export and --audit."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from urllib.parse import quote

import pytest

import enhance_captions as ec
from tests.conftest import caches, make_image, run_main, user_message
from tests.review_server import ReviewServer, ds, endpoint_args, merged_dataset, template  # noqa: F401 (fixtures)


@pytest.fixture
def review(tmp_path, ds):
    with ReviewServer(tmp_path, ds) as server:
        yield server


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_review_prints_one_line_sends_nothing_and_stops_on_sigterm_or_ctrl_c(tmp_path, ds, llm_server):
    before = files_of(ds)
    server = ReviewServer(tmp_path, ds, "--base_url", llm_server.base_url, "--model", "test-model")
    lines = server.cli.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("review: 3 images under ") and "(Ctrl-C to stop)" in lines[0]
    assert server.host == "127.0.0.1" and len(server.token) >= 32
    assert server.request("GET", f"/?token={server.token}", token=None)[0] == 200
    assert server.items()["total"] == 3
    assert server.request("GET", "/thumb?id=img000.jpg", token=server.token)[0] == 200
    assert server.stop(signal.SIGTERM) == 143
    assert server.cli.stdout.splitlines() == lines and server.cli.stderr == ""
    assert llm_server.requests == []  # no request: nothing to merge is merged, no endpoint is checked
    assert files_of(ds) == before  # looking writes nothing: no thumbnail beside the images, no record

    again = ReviewServer(tmp_path, ds, name="again")
    assert again.token != server.token  # a new one each start
    assert again.stop(signal.SIGINT) == 130


def test_every_request_needs_the_token(review, ds):
    before = files_of(ds)
    wrong = review.token[:-1] + ("A" if review.token[-1] != "A" else "B")
    for path in ("/", "/api/items?offset=0&limit=5", "/thumb?id=img000.jpg", "/image?id=img000.jpg"):
        assert review.request("GET", path, token=None)[0] == 403, path
        assert review.request("GET", path, token=wrong)[0] == 403, path
        joiner = "&" if "?" in path else "?"
        assert review.request("GET", f"{path}{joiner}token=wrong", token=None)[0] == 403, path
        assert review.request("GET", f"{path}{joiner}token={review.token}", token=None)[0] == 200, path
    save = {"id": "img000.jpg", "kind": "manual", "sha": review.caption("img000.jpg", "manual")["sha"], "text": "new"}
    assert review.request("POST", "/api/save", save, token=None)[0] == 403
    assert review.request("POST", "/api/save", save, token=wrong)[0] == 403
    # a change never carries the token in its URL, where another page could have put it
    assert review.request("POST", f"/api/save?token={review.token}", save, token=None)[0] == 403
    assert review.request("POST", f"/api/save?token={review.token}", save)[0] == 403
    assert files_of(ds) == before
    assert review.request("POST", "/api/save", save)[0] == 200
    assert (ds / "img000.txt").read_bytes() == b"new\n"


def test_changes_are_post_requests_only(review, ds):
    before = files_of(ds)
    sha = review.caption("img000.jpg", "combined")["sha"]
    for path in (f"/api/save?id=img000.jpg&kind=manual&text=x&sha={review.caption('img000.jpg', 'manual')['sha']}",
                 f"/api/approve?id=img000.jpg&sha={sha}&approved=1"):
        for how in ({"token": "header"}, {"token": None}):
            status, _, _ = review.request("GET", path + f"&token={review.token}", **how)
            assert status == 405, path
    for method in ("PUT", "DELETE"):
        assert review.request(method, "/api/save", {"id": "img000.jpg", "kind": "manual", "text": "x"})[0] >= 400
    assert review.request("GET", "/api/nothing")[0] == 404
    assert review.request("POST", "/api/nothing", {})[0] == 404
    for body, status in ((b"not json", 400), (b"[1, 2]", 400), (b"x" * (ec.MAX_CHANGE_BYTES + 1), 413)):
        answer = review.request("POST", "/api/save", headers={"Content-Type": "application/json"}, raw=body)
        assert answer[0] == status, body[:10]
    assert files_of(ds) == before
    assert not (ds / ".enhance_captions" / "approved.json").exists()


def test_only_the_plans_files_are_served_or_written(review, ds, tmp_path):
    secret_image = make_image(tmp_path / "secret.jpg", 5)
    secret_text = tmp_path / "secret.txt"
    secret_text.write_text("not yours", encoding="utf-8")
    outside = files_of(tmp_path / "ds")
    ids = ["../secret.jpg", str(secret_image), "%2e%2e/secret.jpg", "img000.jpg/../../secret.jpg", "sub/../img000.jpg",
           "img000.txt", "img000_combined.txt", ".enhance_captions/records.jsonl", "", "IMG000.JPG"]
    for image_id in ids:
        for kind in ("thumb", "image"):
            status, headers, body = review.request("GET", f"/{kind}?id={image_id}&token={review.token}", token=None)
            assert status == 404 and headers["content-type"] == "application/json", (kind, image_id)
        status, answer = review.json("POST", "/api/save", {"id": image_id, "kind": "manual", "sha": None, "text": "x"})
        assert status == 404, (image_id, answer)
    sha = review.caption("img000.jpg", "manual")["sha"]
    for kind in ("../../secret", "../secret.txt", str(secret_text), "trainer", "combined_nope", "", None, ["manual"]):
        status, answer = review.json("POST", "/api/save", {"id": "img000.jpg", "kind": kind, "sha": sha, "text": "x"})
        assert status == 404, (kind, answer)
    assert review.request("GET", "/etc/passwd", token="header")[0] == 404
    assert review.request("GET", "/../secret.txt", token="header")[0] == 404
    assert secret_text.read_text(encoding="utf-8") == "not yours"
    assert files_of(tmp_path / "ds") == outside
    assert review.request("GET", f"/image?id=img000.jpg&token={review.token}", token=None)[2] == \
        (ds / "img000.jpg").read_bytes()


def test_symlinks_that_leave_the_dataset_are_neither_served_nor_written(tmp_path, ds):
    away = tmp_path / "away"
    make_image(away / "far.jpg", 11)
    make_image(away / "pic.jpg", 12)
    (away / "pic.txt").write_text("a caption outside", encoding="utf-8")
    (away / "far.txt").write_text("far away", encoding="utf-8")
    (ds / "sub").symlink_to(away, target_is_directory=True)  # a folder symlink: the run follows it
    (ds / "link.jpg").symlink_to(away / "pic.jpg")
    (ds / "link.txt").symlink_to(away / "pic.txt")
    (ds / "inner.jpg").symlink_to(ds / "img001.jpg")  # stays inside: served
    outside = files_of(away)
    with ReviewServer(tmp_path, ds) as review:
        ids = [c["id"] for c in review.items()["items"]]
        assert {"link.jpg", "sub/far.jpg", "sub/pic.jpg", "inner.jpg"} <= set(ids)  # in the plan, as a run sees them
        for image_id in ("link.jpg", "sub/far.jpg", "sub/pic.jpg"):
            for kind in ("thumb", "image"):
                assert review.request("GET", f"/{kind}?id={image_id}", token="header")[0] == 404, image_id
            assert review.save(image_id, "manual", "written through a link", sha=None)[0] == 404
            assert review.save(image_id, "combined", "written through a link", sha=None)[0] == 404
        manual = review.caption("inner.jpg", "manual")
        assert manual["text"] == "" and manual["editable"]
        assert review.request("GET", "/image?id=inner.jpg", token="header")[2] == (ds / "img001.jpg").read_bytes()
        # a caption file that is a symlink out of the dataset, beside an image that is inside it
        (ds / "img002.txt").unlink()
        (ds / "img002.txt").symlink_to(away / "far.txt")
        shown = review.caption("img002.jpg", "manual")
        assert shown["text"] == "" and "outside the dataset" in shown["note"] and not shown["editable"]
        assert review.save("img002.jpg", "manual", "through the link", sha=None)[0] == 404
    assert files_of(away) == outside


def test_saves_are_refused_while_a_run_holds_the_dataset_lock(review, ds):
    lock = ec.DatasetLock(ds)
    assert lock.acquire() is None  # as a run holds it
    try:
        before = files_of(ds)
        status, answer = review.save("img001.jpg", "combined", "a caption saved during a run")
        assert status == 423 and answer["error"].startswith("not saved: another run (pid ") and str(ds) in answer["error"]
        assert review.save("img001.jpg", "manual", "a manual caption saved during a run")[0] == 423
        assert files_of(ds) == before
    finally:
        lock.release()
    status, answer = review.save("img001.jpg", "combined", "a caption saved after the run")
    assert status == 200, answer
    assert caches(ds / "img001.jpg")[1].read_text(encoding="utf-8") == "a caption saved after the run\n"
    assert lock.acquire() is None  # the page let go of it at once
    lock.release()


def test_a_save_over_a_file_changed_since_it_was_shown_is_refused_with_the_file_as_it_is(review, ds):
    combined = caches(ds / "img001.jpg")[1]
    shown = review.caption("img001.jpg", "combined")
    combined.write_text("edited in another editor meanwhile\n", encoding="utf-8")
    status, answer = review.save("img001.jpg", "combined", "the page's edit", sha=shown["sha"])
    assert status == 409 and "changed on disk since the page showed it" in answer["error"]
    assert answer["text"] == "edited in another editor meanwhile"
    assert answer["sha"] == ec.digest(combined.read_bytes())
    assert combined.read_text(encoding="utf-8") == "edited in another editor meanwhile\n"
    # with the file as it is now, the save goes through
    assert review.save("img001.jpg", "combined", "the page's edit", sha=answer["sha"])[0] == 200
    assert combined.read_text(encoding="utf-8") == "the page's edit\n"
    # a file that appeared since the page showed it missing
    (ds / "img002.txt").unlink()
    assert review.caption("img002.jpg", "manual")["sha"] is None
    (ds / "img002.txt").write_text("written meanwhile", encoding="utf-8")
    status, answer = review.save("img002.jpg", "manual", "the page's caption", sha=None)
    assert status == 409 and answer["text"] == "written meanwhile"
    assert (ds / "img002.txt").read_text(encoding="utf-8") == "written meanwhile"


def test_an_empty_cache_is_refused_and_an_empty_manual_caption_saved(review, ds):
    before = files_of(ds)
    for kind in ("combined", "generated"):
        for text in ("", "  \n "):
            status, answer = review.save("img000.jpg", kind, text)
            assert status == 400 and "not saved" in answer["error"], (kind, text)
    assert files_of(ds) == before
    status, answer = review.save("img000.jpg", "manual", "")
    assert status == 200, answer
    assert (ds / "img000.txt").read_bytes() == b"\n"  # blank: "no caption"
    assert "merges img000_combined.txt again (manual changed)" in answer["message"]
    assert {"kind": "stale", "text": "img000_combined.txt: merged again next run (manual changed)"} in \
        answer["card"]["states"]


def test_caption_text_is_never_sent_as_html(review, ds):
    evil = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2"> & "quotes"'
    status, answer = review.save("img000.jpg", "manual", evil)
    assert status == 200
    status, headers, page = review.request("GET", f"/?token={review.token}", token=None)
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"pwned" not in page and b"<img src=x" not in page  # the page holds no caption; the API sends JSON
    policy = headers["content-security-policy"]
    assert "script-src 'nonce-" in policy and "unsafe-inline" not in policy
    status, headers, body = review.request("GET", "/api/items?offset=0&limit=5")
    assert headers["content-type"] == "application/json" and headers["x-content-type-options"] == "nosniff"
    assert review.caption("img000.jpg", "manual")["text"] == evil


def test_a_saved_cache_is_a_hand_edit_that_the_next_run_keeps(tmp_path, ds, llm_server, capsys):
    with ReviewServer(tmp_path, ds) as review:
        status, answer = review.save("img001.jpg", "combined", "  a caption a person wrote, with a lantern \n")
        assert status == 200, answer
        assert answer["message"] == ("saved img001_combined.txt as a hand edit; the next run leaves this image as it "
                                     "is and keeps img001_combined.txt as edited by hand")
        assert answer["card"]["states"] == [{"kind": "edited", "text": "img001_combined.txt: edited by hand (kept)"}]
        # a corrected vision caption: kept, and the merge made from it is made again
        status, answer = review.save("img002.jpg", "generated", "a corrected vision caption with two dogs")
        assert status == 200 and "merges img002_combined.txt again (generated edited)" in answer["message"]
    combined = caches(ds / "img001.jpg")[1]
    assert combined.read_bytes() == b"a caption a person wrote, with a lantern\n"
    assert oct(combined.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())

    code, out, err = run_main(capsys, *endpoint_args(ds, llm_server))
    assert code == 0, out + err
    assert len(llm_server.requests) == 1  # img002's merge, from the corrected vision caption; nothing for img001
    assert "a corrected vision caption with two dogs" in user_message(llm_server.requests[0])
    assert combined.read_bytes() == b"a caption a person wrote, with a lantern\n"
    assert caches(ds / "img002.jpg")[0].read_text(encoding="utf-8") == "a corrected vision caption with two dogs\n"
    assert "edited by hand (kept): 2 (1 combined, 1 generated)" in out
    records = {row["cache"]: row for row in map(json.loads, (ds / ".enhance_captions" / "records.jsonl").open())
               if "cache" in row}
    assert records["img001_combined.txt"]["by_hand"] is True
    assert records["img001_combined.txt"]["sha"] == ec.digest(combined.read_bytes())
    assert records["img002_generated.txt"]["by_hand"] is True
    assert "by_hand" not in records["img002_combined.txt"]  # made by the run
    code, out, err = run_main(capsys, *endpoint_args(ds, llm_server))
    assert code == 0 and len(llm_server.requests) == 1  # and so on, every run

    # its manual caption changed after the hand edit: the edit is kept, and the card says it is older
    with ReviewServer(tmp_path, ds) as review:
        status, answer = review.save("img001.jpg", "manual", "subject1, now in a red coat")
        assert status == 200, answer
        assert {"kind": "edited", "text": "img001_combined.txt: edited by hand (kept), older than a change to its "
                "manual caption or image"} in answer["card"]["states"]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_approval_goes_into_the_export_and_the_audit_and_an_edit_undoes_it(tmp_path, ds, llm_server, capsys):
    with ReviewServer(tmp_path, ds) as review:
        shown = review.caption("img000.jpg", "combined")
        status, answer = review.json("POST", "/api/approve", {"id": "img000.jpg", "sha": shown["sha"], "approved": True})
        assert status == 200 and answer["card"]["approved"] and answer["message"] == "img000.jpg: approved"
        stale = review.caption("img001.jpg", "combined")["sha"]
        caches(ds / "img001.jpg")[1].write_text("changed meanwhile\n", encoding="utf-8")
        status, answer = review.json("POST", "/api/approve", {"id": "img001.jpg", "sha": stale, "approved": True})
        assert status == 409 and not answer["card"]["approved"]
        assert review.card("img000.jpg")["approved"] and not review.card("img002.jpg")["approved"]
    approvals = json.loads((ds / ".enhance_captions" / "approved.json").read_text(encoding="utf-8"))
    assert approvals == {"img000_combined.txt": shown["sha"]}

    code, out, err = run_main(capsys, *endpoint_args(ds, llm_server, "--export", "metadata.jsonl"))
    assert code == 0, out + err
    assert llm_server.requests == []
    rows = load_imagefolder(ds, tmp_path / "hf")
    assert {name: row["approved"] for name, row in rows.items()} == {"img000.jpg": True, "img001.jpg": False,
                                                                     "img002.jpg": False}
    code, out, err = run_main(capsys, "--dataset_dir", ds, "--audit")
    assert "  reviewed: 1 approved, 2 not yet reviewed (--review)" in out.splitlines()

    with ReviewServer(tmp_path, ds, name="edit") as review:  # an edit since the approval undoes it
        assert review.card("img000.jpg")["approved"]
        assert review.save("img000.jpg", "combined", "a better caption")[0] == 200
        assert not review.card("img000.jpg")["approved"]
    code, out, err = run_main(capsys, "--dataset_dir", ds, "--audit")
    assert "  reviewed: 0 approved, 3 not yet reviewed (--review)" in out.splitlines()


def load_imagefolder(ds: Path, cache: Path) -> dict[str, dict]:
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(ds), split="train", cache_dir=str(cache))
    loaded = loaded.cast_column("image", datasets.Image(decode=False))
    return {Path(row["image"]["path"]).name: row for row in loaded}


def test_filters_search_and_pages_in_the_plans_order(tmp_path, ds):
    (ds / "img001.txt").write_text("subject1, a red lantern", encoding="utf-8")  # stale: manual changed
    caches(ds / "img002.jpg")[1].write_text("edited by a person\n", encoding="utf-8")  # edited
    caches(ds / "img000.jpg")[1].unlink()  # missing: stale, and the audit flags it
    (ds / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \xff")  # a manual caption that cannot be read: failed
    make_image(ds / "bad.jpg", 3)
    report = tmp_path / "report.jsonl"
    report.write_text(json.dumps({"path": str(ds.resolve() / "img000.jpg"), "stage": "llm", "error": "refusal: 'I can't'"})
                      + "\n" + json.dumps({"summary": {"exit_code": 1}}) + "\n", encoding="utf-8")
    with ReviewServer(tmp_path, ds, "--report", report) as review:
        listing = review.items()
        assert [c["id"] for c in listing["items"]] == ["bad.jpg", "img000.jpg", "img001.jpg", "img002.jpg"]
        assert listing["counts"] == {"all": 4, "flagged": 2, "stale": 3, "edited": 1, "failed": 2}
        assert [c["id"] for c in review.items("stale")["items"]] == ["bad.jpg", "img000.jpg", "img001.jpg"]
        assert [c["id"] for c in review.items("edited")["items"]] == ["img002.jpg"]
        assert [c["id"] for c in review.items("flagged")["items"]] == ["bad.jpg", "img000.jpg"]  # no combined caption
        failed = review.items("failed")["items"]
        assert [c["id"] for c in failed] == ["bad.jpg", "img000.jpg"]
        assert any("not valid UTF-8" in s["text"] for s in failed[0]["states"] if s["kind"] == "failed")
        assert {"kind": "failed", "text": "failed: the last run: [llm] refusal: 'I can't'"} in failed[1]["states"]
        assert [f["kind"] for f in failed[1]["findings"]] == ["missing"]
        assert [c["id"] for c in review.items(q="RED LANTERN")["items"]] == ["img001.jpg"]
        assert [c["id"] for c in review.items("edited", q="lantern")["items"]] == []
        pages = [review.items(offset=o, limit=1) for o in range(5)]
        assert [c["id"] for p in pages for c in p["items"]] == [c["id"] for c in listing["items"]]
        assert all(p["total"] == 4 for p in pages)
        for query in ("filter=nope", "offset=-1", "limit=0", "limit=201", "offset=x"):
            assert review.request("GET", f"/api/items?{query}")[0] == 400, query


def test_review_flags_are_checked(tmp_path, ds, capsys):
    for args in (["--review", "--audit"], ["--review", "--dry_run"], ["--review", "--export", "metadata.jsonl"],
                 ["--port", "8000"], ["--open"], ["--host", "0.0.0.0"], ["--review", "--port", "70000"]):
        code, out, err = run_main(capsys, "--dataset_dir", ds, *args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), args


def test_another_address_than_loopback_is_warned_of():
    assert ec.exposure_warning("127.0.0.1") is None
    assert ec.exposure_warning("::1") is None and ec.exposure_warning("localhost") is None
    for host in ("0.0.0.0", "192.168.1.20", "::", "myhost.lan"):
        assert ec.exposure_warning(host).startswith(f"warning: --host {host}: the review page can be reached")


def test_a_cache_saved_where_no_record_stood_is_a_hand_edit_not_adopted(tmp_path, ds, llm_server, capsys):
    (ds / ".enhance_captions" / "records.jsonl").unlink()  # caches of an earlier version, or of another tool
    with ReviewServer(tmp_path, ds) as review:
        assert review.save("img001.jpg", "combined", "a person's caption where none was recorded")[0] == 200
    (ds / "img001.txt").write_text("subject1, changed after the save", encoding="utf-8")
    for _ in range(2):  # the first run adopts the other caches; neither run replaces the person's caption
        code, out, err = run_main(capsys, *endpoint_args(ds, llm_server))
        assert code == 0, out + err
        assert "edited by hand (kept): 1 (1 combined)" in out
    assert llm_server.requests == []
    assert caches(ds / "img001.jpg")[1].read_text(encoding="utf-8") == "a person's caption where none was recorded\n"


def test_cards_show_each_variant_and_the_trainer_copy_and_save_a_variant_as_a_hand_edit(tmp_path, ds):
    prompt = tmp_path / "short.txt"
    prompt.write_text("Write a short caption.", encoding="utf-8")
    (ds / "img000_combined_short.txt").write_text("a short caption\n", encoding="utf-8")
    (ds / "img000.caption").write_text("the trainer's copy\n", encoding="utf-8")
    with ReviewServer(tmp_path, ds, "--variant", f"short={prompt}", "--write_captions", ".caption") as review:
        captions = review.card("img000.jpg")["captions"]
        assert [(c["kind"], c["file"], c["editable"]) for c in captions] == [
            ("manual", "img000.txt", True), ("generated", "img000_generated.txt", True),
            ("combined", "img000_combined.txt", True), ("combined_short", "img000_combined_short.txt", True),
            ("trainer", "img000.caption", False)]
        assert [c["text"] for c in captions[3:]] == ["a short caption", "the trainer's copy"]
        assert review.save("img000.jpg", "trainer", "edited copy")[0] == 404  # the run keeps it in step
        status, answer = review.save("img000.jpg", "combined_short", "a shorter caption")
        assert status == 200, answer
    assert (ds / "img000.caption").read_text(encoding="utf-8") == "the trainer's copy\n"
    journal = [json.loads(line) for f in (ds / ".enhance_captions" / "journal").glob("*.jsonl") for line in f.open()]
    assert [r for r in journal if r["cache"] == "img000_combined_short.txt"][-1]["by_hand"] is True


def test_saving_a_caption_unchanged_writes_nothing(review, ds):
    before = files_of(ds)  # img000.txt has no final newline: rewriting it would change its hash and cost a merge
    for kind in ("manual", "generated", "combined"):
        text = review.caption("img000.jpg", kind)["text"]
        status, answer = review.save("img000.jpg", kind, f"  {text}\n")
        assert status == 200 and answer["message"].endswith("is unchanged: nothing written"), answer
    assert files_of(ds) == before


def test_a_file_name_that_is_not_utf8_can_be_shown_and_saved(tmp_path, ds):
    """Its card is named printably (as the summary names it): the page can fetch its thumbnail and save its caption,
    where the name's undecodable byte came out as "?" and no request could name the image."""
    name = os.fsdecode(b"caf\xe9")
    image = make_image(ds / f"{name}.jpg", 7)
    with ReviewServer(tmp_path, ds) as review:
        card = next(c for c in review.items()["items"] if "caf" in c["id"])
        assert card["id"] == "caf\\xe9.jpg"
        status, headers, data = review.request("GET", f"/thumb?id={quote(card['id'])}")
        assert status == 200 and headers["content-type"] == "image/jpeg" and data[:2] == b"\xff\xd8"
        status, answer = review.save(card["id"], "manual", "a cafe, named in Latin-1")
        assert status == 200, answer
    assert (ds / f"{name}.txt").read_bytes() == b"a cafe, named in Latin-1\n"
    assert image.exists()


def test_approvals_made_on_a_sub_folder_are_the_datasets(tmp_path, ds, capsys):
    """A review of a sub-folder keeps its approvals with the dataset's records, where its runs, --audit and --export
    look: they went into a second .enhance_captions/ in the sub-folder, which no run on the dataset read."""
    merged_dataset(ds / "sub", 1)  # merged through the dataset's records: no record set of its own
    with ReviewServer(tmp_path, ds / "sub") as review:
        sha = review.caption("img000.jpg", "combined")["sha"]
        status, answer = review.json("POST", "/api/approve", {"id": "img000.jpg", "sha": sha, "approved": True})
        assert status == 200, answer
    assert not (ds / "sub" / ec.RECORDS_DIR).exists()
    code, out, err = run_main(capsys, "--dataset_dir", ds, "--audit")
    assert code in (0, 1) and "  reviewed: 1 approved, 3 not yet reviewed (--review)" in out, out + err
