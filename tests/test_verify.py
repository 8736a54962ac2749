"""--verify: every merged caption checked against the manual and vision captions it was made from, by one more request
to the merge endpoint (the loopback server, answering checks from a script); a caption with findings merged again
once with them in the request, then kept and flagged (or, with --verify strict, not written); the check recorded with
the caption, so that a rerun sends nothing; its cost counted in requests."""
from __future__ import annotations

import json
import pickle
import re
import shutil
import signal
from pathlib import Path

import pytest

import enhance_captions as ec
from tests.conftest import Cli, ROOT, caches, make_dataset, report_failures, run_args, run_main, seed_generated
from tests.llm_server import FakeLLMServer

VERIFY_PROMPT = ROOT / "prompts" / "verify.txt"
SHORT_PROMPT = ROOT / "prompts" / "short.txt"
CLEAN = {"unsupported": [], "contradictions": [], "missing": []}
SCARF = "a red scarf"


# --------------------------------------------------------------------------------------------
# The loopback server's answers: merges, and checks from a script
# --------------------------------------------------------------------------------------------


def system_of(request: dict) -> str:
    return next(m["content"] for m in request["messages"] if m["role"] == "system")


def first_user(request: dict) -> str:
    return next(m["content"] for m in request["messages"] if m["role"] == "user")


def last_user(request: dict) -> str:
    return [m["content"] for m in request["messages"] if m["role"] == "user"][-1]


def is_check(request: dict, prompt: Path = VERIFY_PROMPT) -> bool:
    return system_of(request) == prompt.read_text(encoding="utf-8").strip()


def section(text: str, label: str) -> str:
    """One labelled part of a merge's or a check's user turn: the line after its label."""
    return re.search(re.escape(label) + r"[^\n]*\n(.*)", text).group(1)


def checked_caption(request: dict) -> str:
    return section(first_user(request), "Merged caption (to check):")


def manual_in(request: dict) -> str:
    return section(first_user(request), "Manual caption (written by a person")


class Script:
    """The server's reply callable. A merge answers with the image's manual caption and a scene, plus the invented
    "a red scarf" unless its request asks to remove it (and "short" for the short variant's system prompt); a check
    (its system turn is the verify prompt) answers with what `verdict(checked caption)` returns."""

    def __init__(self, verdict, prompt: Path = VERIFY_PROMPT):
        self.verdict, self.prompt = verdict, prompt

    def __call__(self, request: dict):
        if is_check(request, self.prompt):
            return self.verdict(checked_caption(request))
        kind = "a short caption" if system_of(request) == SHORT_PROMPT.read_text(encoding="utf-8").strip() else "a person"
        text = f"{manual_in(request)}, {kind} in a park"
        if f"remove: {SCARF}" not in last_user(request):
            text += f", {SCARF}"
        return text


def clean(caption: str) -> str:
    return json.dumps(CLEAN)


def scarf_invented(caption: str) -> str:
    """Flags the scarf where the caption has it; answered in a code fence, as chat models often do."""
    found = dict(CLEAN, unsupported=[SCARF] if SCARF in caption else [])
    return "```json\n" + json.dumps(found) + "\n```"


def always_flags(caption: str) -> str:
    return json.dumps(dict(CLEAN, unsupported=[SCARF], contradictions=["a person"]))


def not_json(caption: str) -> str:
    return "The caption looks accurate to me."


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def seeded(tmp_path: Path, n: int = 2) -> tuple[Path, list[Path]]:
    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, n)
    seed_generated(images)
    return ds, images


def args_for(tmp_path: Path, ds: Path, server, *extra) -> list[str]:
    """No vision model to load (a path that does not exist): the seeded vision captions go straight to the merge."""
    return run_args(ds, tmp_path / "no-such-model", server, *extra)


def manual_of(image: Path) -> str:
    return image.with_suffix(".txt").read_text(encoding="utf-8").strip()


def combined(image: Path, variant: str = "") -> Path:
    return image.parent / f"{image.stem}_combined{f'_{variant}' if variant else ''}.txt"


def for_image(requests: list[dict], image: Path) -> list[dict]:
    return [r for r in requests if manual_in(r) == manual_of(image)]


def records_by_cache(ds: Path) -> dict[str, dict]:
    lines = (ds / ".enhance_captions" / "records.jsonl").read_text(encoding="utf-8").splitlines()
    return {row["cache"]: row for row in map(json.loads, lines) if "cache" in row}


def settings_values(ds: Path) -> dict[str, dict]:
    lines = (ds / ".enhance_captions" / "records.jsonl").read_text(encoding="utf-8").splitlines()
    return {row["settings"]: row["values"] for row in map(json.loads, lines) if "values" in row}


def record_of(ds: Path, path: Path) -> dict:
    return records_by_cache(ds)[path.relative_to(ds).as_posix()]


def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


# --------------------------------------------------------------------------------------------
# A clean caption: 2 requests, the check's request as the issue asks, recorded
# --------------------------------------------------------------------------------------------


def test_a_clean_caption_costs_two_requests_and_its_check_is_recorded(tmp_path, llm_server, capsys):
    llm_server.reply = Script(clean)
    ds, images = seeded(tmp_path)
    code, out, err = run_main(capsys, *args_for(tmp_path, ds, llm_server, "--verify"))
    assert code == 0, out + err
    requests = llm_server.chat_requests()
    assert len(requests) == 2 * len(images)
    values = settings_values(ds)
    for image in images:
        merge, check = for_image(requests, image)
        assert not is_check(merge) and is_check(check)
        assert "response_format" not in merge
        assert check["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "caption_check", "strict": True, "schema": {
                "type": "object",
                "properties": {k: {"type": "array", "items": {"type": "string"}} for k in ec.CHECK_KEYS},
                "required": ["unsupported", "contradictions", "missing"], "additionalProperties": False}}}
        assert check["temperature"] == 0
        assert check["model"] == merge["model"] == "test-model"
        user = first_user(check)
        assert manual_of(image) in user and text_of(caches(image)[0]) in user  # both sources
        assert checked_caption(check) == text_of(combined(image)) == f"{manual_of(image)}, a person in a park, {SCARF}"
        record = record_of(ds, combined(image))
        assert record["sha"] == ec.digest(combined(image).read_bytes())
        assert "findings" not in record
        assert values[record["check"]] == {"prompt": ec.digest(VERIFY_PROMPT.read_text(encoding="utf-8").strip()
                                                               .encode("utf-8")),
                                           "model": "test-model", "backend": "endpoint"}
    assert "verify: 2 checked, 2 clean, 0 fixed by a second merge, 0 flagged, 0 check failed" in out
    tokens = re.search(r"  requests: 2 merging, 2 checking; tokens: ([\d,]+) merging, ([\d,]+) checking", out)
    assert tokens, out  # the loopback server reports usage
    assert all(int(t.replace(",", "")) > 0 for t in tokens.groups())


# --------------------------------------------------------------------------------------------
# A finding: merged again once with it, checked again; the trainer's caption is what is checked
# --------------------------------------------------------------------------------------------


def test_an_invented_detail_is_merged_again_once_and_the_fixed_caption_written(tmp_path, llm_server, capsys):
    llm_server.reply = Script(scarf_invented)
    ds, images = seeded(tmp_path)
    report = tmp_path / "report.jsonl"
    fixed = ["--keep_tokens", "1", "--prefix", "photo of sks", "--suffix", "film grain"]
    code, out, err = run_main(capsys, *args_for(tmp_path, ds, llm_server, "--verify", "-v", "--report", report,
                                                *fixed))
    assert code == 0, out + err
    requests = llm_server.chat_requests()
    assert len(requests) == 4 * len(images)
    for i, image in enumerate(images):
        merge, check, again, check_again = for_image(requests, image)
        assert [is_check(r) for r in (merge, check, again, check_again)] == [False, True, False, True]
        assert f"remove: {SCARF}" not in last_user(merge)
        assert last_user(again).startswith(last_user(merge))  # the same request, the finding appended
        assert last_user(again).splitlines()[-2:-1] == [f"remove: {SCARF}"]
        written = text_of(combined(image))
        # kept parts, prefix and suffix hold for the caption merged again; the check saw it as the trainer will
        assert written == f"photo of sks, subject{i}, photo number {i}, a person in a park, film grain"
        assert checked_caption(check).endswith(f"{SCARF}, film grain")
        assert checked_caption(check_again) == written
        assert "Fixed text the person adds to every caption" in first_user(check)
        record = record_of(ds, combined(image))
        assert record["check"].startswith("v-") and "findings" not in record
        assert f'check {combined(image)}: unsupported "{SCARF}"' in err  # -v prints each finding
    assert "verify: 2 checked, 0 clean, 2 fixed by a second merge, 0 flagged, 0 check failed" in out
    assert "  requests: 4 merging, 4 checking" in out
    assert report_failures(report) == []


def test_a_caption_merged_again_still_fits_the_token_budget(tmp_path, llm_server, capsys):
    """The second merge goes through the same budget as the first: cut at a boundary, the kept part intact."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<bos>": 1, "<eos>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                           special_tokens=[("<bos>", 1), ("<eos>", 2)])
    tokenizer = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(tokenizer)

    def reply(request: dict) -> str:  # the first merge fits and invents; the second is over the budget
        if is_check(request):
            return scarf_invented(checked_caption(request))
        return "photo number 0, a person in a park" if "remove:" in last_user(request) else f"{SCARF}"

    llm_server.reply = reply
    ds, images = seeded(tmp_path, 1)
    # "subject0, photo number 0, a person in a park" is 13 tokens with <bos>, <eos> and the commas: over 10
    code, out, err = run_main(capsys, *args_for(tmp_path, ds, llm_server, "--verify", "--keep_tokens", "1",
                                                "--max_caption_tokens", "10", "--caption_tokenizer", tokenizer,
                                                "--max_retries", "0"))
    assert code == 0, out + err
    requests = llm_server.chat_requests()
    assert len(requests) == 4
    assert checked_caption(requests[1]) == f"subject0, {SCARF}"
    written = text_of(combined(images[0]))
    assert written == "subject0, photo number 0"  # the kept part first, cut at the last comma that fits
    assert checked_caption(requests[3]) == written
    assert "reply is 13 tokens, the limit is 10 (after 1 attempts); cut to 7 tokens" in out


# --------------------------------------------------------------------------------------------
# A caption that keeps its findings: flagged, reported, audited; --verify strict does not write it
# --------------------------------------------------------------------------------------------


def test_a_caption_still_flagged_is_kept_reported_and_audited_and_a_rerun_sends_nothing(tmp_path, llm_server, capsys):
    llm_server.reply = Script(always_flags)
    ds, images = seeded(tmp_path)
    report = tmp_path / "report.jsonl"
    args = args_for(tmp_path, ds, llm_server, "--verify", "--report", report)
    code, out, err = run_main(capsys, *args)
    assert code == 0, out + err  # kept: a finding is not a failure
    requests = llm_server.chat_requests()
    assert len(requests) == 4 * len(images)
    rows = report_failures(report)
    assert sorted(rows, key=lambda r: r["path"]) == [
        {"path": str(combined(image)), "stage": "verify", "unsupported": [SCARF],
         "contradictions": ["a person"], "missing": []} for image in images]
    for image in images:
        again = for_image(requests, image)[2]
        assert last_user(again).splitlines()[-3:-1] == [f"remove: {SCARF}", "remove: a person"]
        assert text_of(combined(image)) == f"{manual_of(image)}, a person in a park"  # the second merge, kept
        assert record_of(ds, combined(image))["findings"] == {"unsupported": [SCARF],
                                                               "contradictions": ["a person"], "missing": []}
        assert f'FLAGGED {combined(image)}: unsupported: "{SCARF}"; contradictions: "a person"' in out
    assert "verify: 2 checked, 0 clean, 0 fixed by a second merge, 2 flagged, 0 check failed" in out
    assert json.loads(report.read_text().splitlines()[-1])["summary"]["verify"]["flagged"] == 2

    code, out, err = run_main(capsys, "--dataset_dir", ds, "--audit")
    assert code == 1, out + err
    for image in images:
        assert f'verify {combined(image)}: unsupported: "{SCARF}"; contradictions: "a person"' in out

    before = {image: combined(image).read_bytes() for image in images}
    code, out, err = run_main(capsys, *args)
    assert code == 0, out + err
    assert len(llm_server.requests) == len(requests)  # an unchanged caption is not checked again
    assert {image: combined(image).read_bytes() for image in images} == before


def test_verify_strict_fails_a_flagged_caption_and_does_not_write_it(tmp_path, llm_server, capsys):
    llm_server.reply = Script(always_flags)
    ds, images = seeded(tmp_path)
    report = tmp_path / "report.jsonl"
    code, out, err = run_main(capsys, *args_for(tmp_path, ds, llm_server, "--verify", "strict", "--report", report))
    assert code == 1, out + err
    assert len(llm_server.requests) == 4 * len(images)
    assert not any(combined(image).exists() for image in images)
    rows = report_failures(report)
    assert len(rows) == len(images)
    for row in rows:
        assert row["stage"] == "llm"
        assert f"remove: {SCARF}; remove: a person" in row["error"] and "--verify strict" in row["error"]
    assert "verify: 2 checked, 0 clean, 0 fixed by a second merge, 2 flagged, 0 check failed" in out


# --------------------------------------------------------------------------------------------
# A server without response_format; a checker that does not answer in JSON
# --------------------------------------------------------------------------------------------


def test_a_server_without_response_format_is_asked_for_the_json_in_the_prompt_once_refused(tmp_path, capsys):
    with FakeLLMServer(structured_outputs=False) as server:
        server.reply = Script(clean)
        ds, images = seeded(tmp_path)
        code, out, err = run_main(capsys, *args_for(tmp_path, ds, server, "--verify", "--concurrency", "1"))
        requests = server.chat_requests()
    assert code == 0, out + err
    # first image: merge, a check refused (400), the same check without response_format; second image: merge, check
    assert len(requests) == 5
    assert sum("response_format" in r for r in requests) == 1  # remembered for the endpoint: refused only once
    refused, *checks = [r for r in requests if is_check(r)]
    assert "response_format" in refused and "Answer with one JSON object only" not in last_user(refused)
    assert last_user(checks[0]).startswith(last_user(refused) + "\n\n")  # the same check, the JSON asked in words
    for check in checks:
        assert "response_format" not in check and check["temperature"] == 0
        assert 'exactly the keys "unsupported", "contradictions", "missing"' in last_user(check)
    assert err.count("refuses response_format") == 1
    for image in images:
        assert "check" in record_of(ds, combined(image))
    assert "verify: 2 checked, 2 clean" in out


def test_a_check_answered_in_prose_is_asked_once_more_then_failed_and_checked_again_on_a_rerun(
        tmp_path, llm_server, capsys):
    llm_server.reply = Script(not_json)
    ds, images = seeded(tmp_path)
    report = tmp_path / "report.jsonl"
    args = args_for(tmp_path, ds, llm_server, "--verify", "--report", report)
    code, out, err = run_main(capsys, *args)
    assert code == 1, out + err  # never a pass
    requests = llm_server.chat_requests()
    assert len(requests) == 3 * len(images)  # the merge, the check, the check asked once more
    for image in images:
        merge, check, again = for_image(requests, image)
        assert is_check(check) and is_check(again)
        assert again["messages"][:2] == check["messages"]
        assert again["messages"][2] == {"role": "assistant", "content": not_json("")}
        assert "not a JSON object" in last_user(again)
        assert text_of(combined(image)).endswith(SCARF)  # the caption is written, unchecked
        assert "check" not in record_of(ds, combined(image))
    rows = report_failures(report)
    assert sorted((r["path"], r["stage"]) for r in rows) == [(str(combined(image)), "verify") for image in images]
    assert all("not the JSON asked for" in r["error"] for r in rows)
    assert "verify: 2 checked, 0 clean, 0 fixed by a second merge, 0 flagged, 2 check failed" in out

    before = {image: combined(image).read_bytes() for image in images}
    llm_server.reply = Script(clean)
    code, out, err = run_main(capsys, *args)
    assert code == 0, out + err
    new = llm_server.chat_requests()[len(requests):]
    assert len(new) == len(images) and all(is_check(r) for r in new)  # checked without merging again
    assert {image: combined(image).read_bytes() for image in images} == before
    assert all(record_of(ds, combined(image))["check"].startswith("v-") for image in images)


# --------------------------------------------------------------------------------------------
# Reruns: captions made before --verify, a new check prompt, hand edits
# --------------------------------------------------------------------------------------------


def test_captions_made_before_verify_are_checked_once_without_merging_again(tmp_path, llm_server, capsys):
    llm_server.reply = Script(clean)
    ds, images = seeded(tmp_path)
    plain = args_for(tmp_path, ds, llm_server)
    code, out, err = run_main(capsys, *plain)
    assert code == 0 and len(llm_server.requests) == len(images)
    before = {image: combined(image).read_bytes() for image in images}

    code, out, err = run_main(capsys, *plain, "--verify", "--dry_run")
    assert code == 0 and len(llm_server.requests) == len(images)  # a dry run calls nothing
    assert "  LLM calls to make: 0" in out
    assert "  checks to make (--verify): 2 (2 of them of captions made already)" in out
    assert "  to check without merging again: 2 (2 unchecked)" in out

    code, out, err = run_main(capsys, *plain, "--verify")
    assert code == 0, out + err
    new = llm_server.chat_requests()[len(images):]
    assert len(new) == len(images) and all(is_check(r) for r in new)  # 1 request per clean caption
    assert {checked_caption(r) for r in new} == {text_of(combined(image)) for image in images}
    assert {image: combined(image).read_bytes() for image in images} == before
    assert "verify: 2 checked, 2 clean" in out

    code, out, err = run_main(capsys, *plain, "--verify")
    assert len(llm_server.requests) == 2 * len(images)  # checked: a rerun sends nothing


def test_another_check_prompt_is_a_settings_change_for_refresh_settings_only(tmp_path, llm_server, capsys):
    prompt = tmp_path / "my_verify.txt"
    shutil.copy(VERIFY_PROMPT, prompt)
    llm_server.reply = Script(clean, prompt)
    ds, images = seeded(tmp_path)
    args = args_for(tmp_path, ds, llm_server, "--verify", "--verify_prompt", prompt)
    assert run_main(capsys, *args)[0] == 0
    first = len(llm_server.requests)
    assert first == 2 * len(images)
    before = {image: combined(image).read_bytes() for image in images}

    prompt.write_text(VERIFY_PROMPT.read_text(encoding="utf-8") + "\nNames of places count as facts.\n",
                      encoding="utf-8")
    assert run_main(capsys, *args)[0] == 0
    assert len(llm_server.requests) == first  # --refresh inputs: a prompt is a setting, not an input
    code, out, err = run_main(capsys, *args, "--refresh", "settings")
    assert code == 0, out + err
    new = llm_server.chat_requests()[first:]
    assert len(new) == len(images) and all(system_of(r) == text_of(prompt) for r in new)  # checks only
    assert {image: combined(image).read_bytes() for image in images} == before
    assert "  combined captions: 0 made, 2 checked without merging again (--verify)" in out
    assert run_main(capsys, *args, "--refresh", "settings")[0] == 0
    assert len(llm_server.requests) == first + len(images)


def test_a_hand_edit_is_never_checked_and_its_old_findings_show_as_stale(tmp_path, llm_server, capsys):
    llm_server.reply = Script(always_flags)
    ds, images = seeded(tmp_path, 1)
    args = args_for(tmp_path, ds, llm_server, "--verify")
    assert run_main(capsys, *args)[0] == 0
    sent = len(llm_server.requests)
    assert sent == 4
    path = combined(images[0])
    path.write_text("subject0, photo number 0, my own words\n", encoding="utf-8")

    code, out, err = run_main(capsys, *args, "--refresh", "settings")
    assert code == 0, out + err
    assert len(llm_server.requests) == sent  # the person's word: not checked, not merged again
    assert path.read_text(encoding="utf-8") == "subject0, photo number 0, my own words\n"

    code, out, err = run_main(capsys, "--dataset_dir", ds, "--audit")
    assert code == 0, out + err  # the only flagged caption was edited since: nothing remains
    assert (f'verify_stale {path}: unsupported: "{SCARF}"; contradictions: "a person" '
            "(stale: edited by hand since)") in out


def test_a_hand_edit_made_before_verify_is_not_checked(tmp_path, llm_server, capsys):
    llm_server.reply = Script(clean)
    ds, images = seeded(tmp_path)
    assert run_main(capsys, *args_for(tmp_path, ds, llm_server))[0] == 0
    combined(images[0]).write_text("subject0, edited by hand\n", encoding="utf-8")
    code, out, err = run_main(capsys, *args_for(tmp_path, ds, llm_server, "--verify"))
    assert code == 0, out + err
    new = llm_server.chat_requests()[len(images):]
    assert [checked_caption(r) for r in new] == [text_of(combined(images[1]))]
    assert combined(images[0]).read_text(encoding="utf-8") == "subject0, edited by hand\n"


# --------------------------------------------------------------------------------------------
# Variants, each checked on its own
# --------------------------------------------------------------------------------------------


def test_variants_are_checked_each_on_their_own(tmp_path, llm_server, capsys):
    def short_only(caption: str) -> str:  # only the short variant's caption has its scarf flagged
        return scarf_invented(caption) if "a short caption" in caption else clean(caption)

    llm_server.reply = Script(short_only)
    ds, images = seeded(tmp_path)
    code, out, err = run_main(capsys, *args_for(tmp_path, ds, llm_server, "--verify",
                                                "--variant", f"short={SHORT_PROMPT}"))
    assert code == 0, out + err
    requests = llm_server.chat_requests()
    assert len(requests) == (2 + 4) * len(images)  # the default clean, the short variant fixed
    for image in images:
        mine = for_image(requests, image)
        assert len(mine) == 6
        checks = [checked_caption(r) for r in mine if is_check(r)]
        assert sorted(checks) == sorted([text_of(combined(image)), text_of(combined(image, "short")),
                                         f"{manual_of(image)}, a short caption in a park, {SCARF}"])
        assert text_of(combined(image)) == f"{manual_of(image)}, a person in a park, {SCARF}"
        assert text_of(combined(image, "short")) == f"{manual_of(image)}, a short caption in a park"
        default, short = record_of(ds, combined(image)), record_of(ds, combined(image, "short"))
        assert default["check"] == short["check"] and default["settings"] != short["settings"]
    assert "verify: 4 checked, 2 clean, 2 fixed by a second merge, 0 flagged, 0 check failed" in out


# --------------------------------------------------------------------------------------------
# Units: the strict parse, the JSON asked in words, the flags
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ('{"unsupported": ["a red scarf"], "contradictions": [], "missing": ["ohwx"]}',
     ec.Check(("a red scarf",), (), ("ohwx",))),
    ('```json\n{"unsupported": [], "contradictions": ["a woman"], "missing": []}\n```', ec.Check((), ("a woman",), ())),
    ('{"unsupported": [" ", "in Paris "], "contradictions": [], "missing": []}', ec.Check(("in Paris",), (), ())),
    ('{"unsupported": [], "contradictions": []}', None),  # a key missing
    ('{"unsupported": [], "contradictions": [], "missing": [], "notes": []}', None),  # a key too many
    ('{"unsupported": "a red scarf", "contradictions": [], "missing": []}', None),  # not a list
    ('{"unsupported": [1], "contradictions": [], "missing": []}', None),  # not strings
    ('[]', None),
    ('Here is the check: {"unsupported": [], "contradictions": [], "missing": []}', None),
    ("The caption looks fine.", None),
])
def test_parse_check_takes_only_the_asked_shape(text, expected):
    assert ec.parse_check(text) == expected


def test_format_in_prompt_names_the_keys_at_the_end_of_the_last_user_turn():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    asked = ec.format_in_prompt(messages, ec.CHECK_FORMAT)
    assert asked[0] == messages[0] and messages[1] == {"role": "user", "content": "U"}
    assert asked[1]["content"].startswith("U\n\n") and '"unsupported", "contradictions", "missing"' in asked[1]["content"]


def test_verify_prompt_without_verify_is_a_usage_error(tmp_path, llm_server, capsys):
    ds, _ = seeded(tmp_path, 1)
    code, out, err = run_main(capsys, *args_for(tmp_path, ds, llm_server, "--verify_prompt", VERIFY_PROMPT))
    assert code == 2 and "--verify_prompt needs --verify" in err and not llm_server.requests


def test_a_caption_whose_vision_caption_is_gone_is_not_checked_and_loads_no_model(tmp_path, llm_server, capsys):
    llm_server.reply = Script(clean)
    ds, images = seeded(tmp_path)
    assert run_main(capsys, *args_for(tmp_path, ds, llm_server))[0] == 0
    caches(images[0])[0].unlink()  # the --model_id does not exist: loading it would fail the run
    code, out, err = run_main(capsys, *args_for(tmp_path, ds, llm_server, "--verify"))
    assert code == 0, out + err
    new = llm_server.chat_requests()[len(images):]
    assert [manual_in(r) for r in new] == [manual_of(images[1])]
    assert "check" not in record_of(ds, combined(images[0]))


def test_verify_strict_does_not_write_a_caption_whose_check_failed(tmp_path, llm_server, capsys):
    llm_server.reply = Script(not_json)
    ds, images = seeded(tmp_path, 1)
    code, out, err = run_main(capsys, *args_for(tmp_path, ds, llm_server, "--verify", "strict"))
    assert code == 1, out + err
    assert len(llm_server.requests) == 3
    assert not combined(images[0]).exists()
    assert "its check failed" in err and "not written (--verify strict)" in err


def test_each_endpoint_of_a_pool_remembers_its_own_response_format_refusal(tmp_path):
    """Two endpoints in a pool, taking requests in turn; only the one without structured outputs is asked in words,
    and it refuses once."""
    import asyncio
    from types import SimpleNamespace

    prompt = VERIFY_PROMPT.read_text(encoding="utf-8").strip()
    with FakeLLMServer(reply=Script(clean)) as taking, FakeLLMServer(reply=Script(clean),
                                                                      structured_outputs=False) as refusing:
        cfg = ec.Config(dataset_dir=tmp_path, max_retries=2)
        pool = ec.endpoint_chat(cfg, SimpleNamespace(process_index=0, num_processes=1), ec.STAGE_LLM,
                                [(taking.base_url, None), (refusing.base_url, None)], "test-model", 0, 0, 64, 0.3)

        async def checks() -> list:
            try:
                return [await ec.check_caption(pool, ec.check_messages(prompt, f"m{i}", "g", f"c{i}"), 2)
                        for i in range(4)]
            finally:
                await pool.close()

        assert asyncio.run(checks()) == [ec.Check()] * 4
        took, refused = taking.chat_requests(), refusing.chat_requests()
    assert len(took) == 2 and all(r["response_format"] == ec.CHECK_FORMAT for r in took)
    assert len(refused) == 3 and ["response_format" in r for r in refused] == [True, False, False]


def test_with_a_local_llm_the_check_goes_to_it_at_temperature_0_with_the_json_asked_in_words(
        tmp_path, model_dir, capsys, monkeypatch):
    ds, images = seeded(tmp_path)
    llm = model_dir("causal_lm")
    calls: list[tuple[list, float]] = []
    original = ec.LocalChat._generate

    def spy(self, conversations, temperature):
        """The real generate; a random-weight model writes no JSON, so a check's reply is replaced by a clean one."""
        calls.append((conversations, temperature))
        return [ec.Reply(json.dumps(CLEAN) if c[0]["content"] == text_of(VERIFY_PROMPT) else "a caption " + r.text,
                         "stop") for c, r in zip(conversations, original(self, conversations, temperature))]

    monkeypatch.setattr(ec.LocalChat, "_generate", spy)
    code, out, err = run_main(capsys, "--dataset_dir", ds, "--model_id", tmp_path / "no-such-model", "--local_llm", llm,
                              "--max_tokens", "8", "--verify")
    assert code == 0, out + err
    checks = [(c, t) for batch, t in calls for c in batch if c[0]["content"] == text_of(VERIFY_PROMPT)]
    merges = [(c, t) for batch, t in calls for c in batch if c[0]["content"] != text_of(VERIFY_PROMPT)]
    assert len(checks) == len(merges) == len(images)
    assert {t for _, t in checks} == {0.0} and {t for _, t in merges} == {0.3}  # never one batch of both
    for conversation, _ in checks:
        assert "Merged caption (to check):\na caption" in conversation[-1]["content"]
        assert "Answer with one JSON object only" in conversation[-1]["content"]  # no response_format locally
    values = settings_values(ds)
    for image in images:
        assert values[record_of(ds, combined(image))["check"]]["backend"] == "local"
    assert "verify: 2 checked, 2 clean" in out


def test_a_merge_stopped_before_its_check_is_kept_and_checked_on_the_next_run(tmp_path, llm_server, capsys):
    llm_server.reply = Script(clean)
    ds, images = seeded(tmp_path, 1)
    args = args_for(tmp_path, ds, llm_server, "--verify")
    run = Cli(tmp_path, "stopped", *args, "--rpm", "1")  # the check waits a minute for its turn
    run.wait_for(lambda: combined(images[0]).exists() or len(llm_server.requests) >= 1, what="the merge")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(60) == 130, run.stderr
    assert len(llm_server.requests) == 1  # the merge only
    assert text_of(combined(images[0])) == f"{manual_of(images[0])}, a person in a park, {SCARF}"
    assert "check" not in record_of(ds, combined(images[0]))

    code, out, err = run_main(capsys, *args)
    assert code == 0, out + err
    new = llm_server.chat_requests()[1:]
    assert len(new) == 1 and is_check(new[0])  # checked, not merged again
    assert record_of(ds, combined(images[0]))["check"].startswith("v-")


def test_stats_from_another_process_bring_their_checks_costs_and_flagged_captions():
    mine, theirs = ec.Stats(), ec.Stats()
    mine.tally("checks", "checked")
    mine.tally("spent", "check requests", 2)
    theirs.tally("checks", "checked")
    theirs.tally("checks", "flagged")
    theirs.tally("spent", "check requests", 2)
    theirs.flag(ec.Flagged("b_combined.txt", "verify", (SCARF,), (), ()))
    mine.merge(pickle.loads(pickle.dumps(theirs)))  # as SharedWork.gather passes them
    assert mine.checks == {"checked": 2, "flagged": 1} and mine.spent == {"check requests": 4}
    assert mine.flagged == theirs.flagged
    assert ec.verify_lines(mine)[:2] == ["verify: 2 checked, 0 clean, 0 fixed by a second merge, 1 flagged, "
                                         "0 check failed", "  requests: 0 merging, 4 checking"]


# --------------------------------------------------------------------------------------------
# The README's example (section "Checked captions"), as it was run
# --------------------------------------------------------------------------------------------

README_IMAGES = {  # your caption, the vision caption, the first merge, the second merge
    "street": ("ohwx man, black coat, a street at night",
               "a woman in a black coat walks down a wet street at night, lights reflected in puddles",
               "ohwx man, black coat, a street at night, a woman with a red scarf walking down a wet street in Paris",
               "ohwx man, black coat, a street at night, a man walking down a wet street, lights reflected in puddles"),
    "bench": ("ohwx man, sitting on a bench, reading a newspaper",
              "a man sits on a wooden bench in a park, trees behind him",
              "ohwx man, sitting on a bench, a man on a wooden bench in a park, trees behind him",
              "ohwx man, sitting on a bench, a man on a wooden bench in a park with trees behind him"),
    "cafe": ("ohwx man, in a cafe", "a man at a small table by a window, a cup of coffee in front of him",
             "ohwx man, in a cafe, a man at a small table by a window with a cup of coffee", None),
}


def readme_reply(request: dict) -> str:
    if is_check(request):
        caption = checked_caption(request)
        found = dict(CLEAN, unsupported=[d for d in ("a red scarf", "in Paris") if d in caption],
                     contradictions=["a woman"] if "woman" in caption else [],
                     missing=["reading a newspaper"] if "bench" in caption and "newspaper" not in caption else [])
        return json.dumps(found)
    _, _, first, second = next(v for v in README_IMAGES.values() if v[0] == manual_in(request))
    return second if re.search(r"^(remove|keep): ", last_user(request), re.M) else first


def test_the_readme_example(tmp_path, llm_server, capsys):
    from tests.conftest import make_image

    llm_server.reply = readme_reply
    ds = tmp_path.resolve() / "images"
    for i, (name, (manual, generated, _, _)) in enumerate(README_IMAGES.items()):
        make_image(ds / f"{name}.jpg", i)
        (ds / f"{name}.txt").write_text(manual, encoding="utf-8")
        (ds / f"{name}_generated.txt").write_text(generated, encoding="utf-8")
    report = tmp_path / "report.jsonl"
    args = args_for(tmp_path, ds, llm_server, "--keep_tokens", "1", "--verify", "-v", "--report", report)
    code, out, err = run_main(capsys, *args)
    assert code == 0, out + err
    requests = llm_server.chat_requests()
    assert len(requests) == 10
    street = [r for r in requests if manual_in(r) == README_IMAGES["street"][0] and not is_check(r)][1]
    assert last_user(street).endswith("A check of the caption merged from these found:\nremove: a red scarf\n"
                                      "remove: in Paris\nremove: a woman\n"
                                      "Write the caption again, following each of these lines.")
    assert "verify: 3 checked, 1 clean, 1 fixed by a second merge, 1 flagged, 0 check failed" in out
    assert re.search(r"^  requests: 5 merging, 5 checking; tokens: [\d,]+ merging, [\d,]+ checking$", out, re.M)
    assert f'FLAGGED {ds / "bench_combined.txt"}: missing: "reading a newspaper"' in out
    assert report_failures(report) == [{"path": str(ds / "bench_combined.txt"), "stage": "verify", "unsupported": [],
                                        "contradictions": [], "missing": ["reading a newspaper"]}]
    for name, (_, _, first, second) in README_IMAGES.items():
        assert text_of(ds / f"{name}_combined.txt") == (second or first)
    code, out, err = run_main(capsys, "--dataset_dir", ds, "--audit")
    assert code == 1 and f'verify {ds / "bench_combined.txt"}: missing: "reading a newspaper"' in out
    assert run_main(capsys, *args)[0] == 0 and len(llm_server.requests) == 10  # a rerun sends nothing
