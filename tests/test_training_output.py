"""Captions a trainer can use as they are: token budgets, fixed prefix/suffix, trainer export formats (Hugging Face
imagefolder jsonl/csv, kohya json), --audit of a finished folder, and the shipped prompt files."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

import enhance_captions as ec
from tests.conftest import ROOT, caches, make_dataset, make_image, report_failures, run_args, run_cli, run_main

# --------------------------------------------------------------------------------------------
# A tiny trainer tokenizer: one token per word or punctuation mark, plus <bos> and <eos>
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """Built with the tokenizers library and saved the way a Hub tokenizer folder is; loaded by path, no Hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    for word in "sks woman a red dress standing in the park soft golden light , .".split():
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                           special_tokens=[("<bos>", 1), ("<eos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   model_max_length=12)
    folder = tmp_path_factory.mktemp("caption-tokenizer")
    fast.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def count(tokenizer_dir):
    return ec.caption_counter(ec.Config(dataset_dir=Path("."), max_caption_tokens=77, caption_tokenizer=tokenizer_dir))


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_count_includes_the_start_and_end_tokens(count):
    assert count("sks woman") == 4  # <bos> sks woman <eos>: what CLIP's 77 counts too
    assert count("sks woman, red dress.") == 8
    assert count(words(100)) == 102  # over model_max_length: counted in full, not cut


def test_budget_problem_names_the_length_and_the_limit(count):
    assert ec.budget_problem(words(91), 77, count) == "reply is 93 tokens, the limit is 77"
    assert ec.budget_problem(words(75), 77, count) is None


def test_a_tokenizer_that_cannot_be_loaded_is_one_usage_line(tmp_path):
    with pytest.raises(ec.UsageError) as raised:
        ec.caption_counter(ec.Config(dataset_dir=tmp_path, max_caption_tokens=77,
                                     caption_tokenizer=str(tmp_path / "no-such-tokenizer")))
    message = str(raised.value)
    assert "--caption_tokenizer" in message and "no-such-tokenizer" in message and "\n" not in message


# Budgets below are in tokens of the tiny tokenizer: words and punctuation marks, plus 2.
FIT_CASES = [
    # (text, kept, budget, prefix, suffix, expected)
    ("sks woman, red dress", ["sks woman"], 77, "", "", "sks woman, red dress"),
    ("sks woman, red dress, standing in the park, soft light", ["sks woman"], 10, "", "",
     "sks woman, red dress"),
    ("sks woman, red dress. She stands in the park, in soft light", ["sks woman"], 12, "", "",
     "sks woman, red dress."),
    ("sks woman, red dress. She stands in the park, in soft light", ["sks woman"], 16, "", "",
     "sks woman, red dress. She stands in the park"),
    ("sks woman, red dress, standing", ["sks woman"], 4, "", "", "sks woman"),
    ("red dress, sks woman, standing in the park", ["sks woman"], 9, "", "", "sks woman, red dress"),
    ("photo, sks woman, red dress, standing in the park, golden", ["sks woman"], 13, "photo", "golden",
     "photo, sks woman, red dress, golden"),
    ("sks woman standing alone in the big park", ["sks woman"], 8, "", "", "sks woman, standing alone in"),
    ("a woman stands in the park", [], 5, "", "", "a woman stands"),
]


@pytest.mark.parametrize("text, kept, budget, prefix, suffix, expected", FIT_CASES)
def test_fit_to_budget_cuts_at_the_last_boundary_that_fits(count, text, kept, budget, prefix, suffix, expected):
    fitted = ec.fit_to_budget(text, kept, budget, count, prefix, suffix)
    assert fitted == expected
    assert count(fitted) <= budget
    assert fitted.startswith(", ".join([p for p in [prefix] if p] + kept))
    assert fitted.endswith(suffix)


def test_fit_to_budget_never_cuts_the_fixed_parts_even_when_they_alone_are_over(count):
    fitted = ec.fit_to_budget("photo, sks woman, red dress, golden", ["sks woman"], 4, count, "photo", "golden")
    assert fitted == "photo, sks woman, golden"
    assert ec.budget_problem(fitted, 4, count) == "reply is 8 tokens, the limit is 4"


# --------------------------------------------------------------------------------------------
# Fixed text: --prefix and --suffix
# --------------------------------------------------------------------------------------------

AFFIX_CASES = [
    # (text, prefix, suffix, kept, expected)
    ("sks woman, red dress", "", "", ["sks woman"], "sks woman, red dress"),
    ("sks woman, red dress", "photo of sks", "masterpiece", ["sks woman"],
     "photo of sks, sks woman, red dress, masterpiece"),
    ("Photo of SKS, sks woman, red dress", "photo of sks", "", ["sks woman"], "photo of sks, sks woman, red dress"),
    ("photo of sks woman in a red dress", "photo of sks", "", [], "photo of sks woman in a red dress"),
    ("sks woman, photo of sks, red dress", "photo of sks", "", ["sks woman"], "photo of sks, sks woman, red dress"),
    ("sks woman, red dress, Masterpiece.", "", "masterpiece", ["sks woman"], "sks woman, red dress, masterpiece"),
    ("sks woman, MASTERPIECE, red dress", "", "masterpiece", ["sks woman"], "sks woman, red dress, masterpiece"),
    ("sks woman, red dress", "", "sks woman", ["sks woman"], "sks woman, red dress"),
    ("sksman, red dress", "sks", "", [], "sks, sksman, red dress"),
    ("A woman stands in a park.", "sks", "masterpiece", [], "sks, A woman stands in a park. masterpiece"),
    ("", "sks", "masterpiece", [], "sks, masterpiece"),
]


@pytest.mark.parametrize("text, prefix, suffix, kept, expected", AFFIX_CASES)
def test_apply_affixes_adds_each_once_prefix_first_suffix_last(text, prefix, suffix, kept, expected):
    result = ec.apply_affixes(text, prefix, suffix, kept)
    assert result == expected
    assert ec.apply_affixes(result, prefix, suffix, kept) == result  # applying twice changes nothing


def test_training_caption_counts_the_fixed_text_in_the_budget(tmp_path, count, tokenizer_dir):
    cfg = ec.Config(dataset_dir=tmp_path, prefix="photo", suffix="golden", max_caption_tokens=11,
                    caption_tokenizer=tokenizer_dir)
    reply = "sks woman, red dress, standing in the park, soft light"
    shaped = ec.training_caption(reply, ["sks woman"], cfg, count)
    assert shaped == "photo, sks woman, red dress, golden"
    assert count(shaped) <= 11


@pytest.mark.parametrize("flags, named", [
    (["--max_caption_tokens", "77"], "--caption_tokenizer"),
    (["--caption_tokenizer", "openai/clip-vit-large-patch14"], "--max_caption_tokens"),
    (["--max_caption_tokens", "0", "--caption_tokenizer", "x"], "--max_caption_tokens"),
    (["--export", "captions.txt"], "--export"),
    (["--export", "/elsewhere/metadata.jsonl"], "--export"),
])
def test_training_flags_misused_are_one_usage_line(tmp_path, capsys, flags, named):
    make_dataset(tmp_path / "ds", 1)
    code, out, err = run_main(capsys, "--dataset_dir", tmp_path / "ds", *flags)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err


# --------------------------------------------------------------------------------------------
# Trainer formats for --export
# --------------------------------------------------------------------------------------------


def captioned_dataset(tmp_path: Path, model_dir, llm_server, capsys) -> tuple[Path, list[Path]]:
    """Images at the root and in a subfolder, every one merged by a real run (tiny florence2, loopback LLM)."""
    ds = tmp_path.resolve() / "ds"
    images = make_dataset(ds, 3)
    images.append(make_image(ds / "sub" / "deep" / "x.png", 7))
    (ds / "sub" / "deep" / "x.txt").write_text("deep subject, nested", encoding="utf-8")
    images.append(make_image(ds / "sub" / "y.webp", 8))  # no manual caption
    code, out, err = run_main(capsys, *run_args(ds, model_dir("florence2"), llm_server))
    assert code == 0, out + err
    assert all(caches(image)[1].exists() for image in images)
    return ds, images


def combined_text(image: Path) -> str:
    return caches(image)[1].read_text(encoding="utf-8").strip()


def load_imagefolder(ds: Path, cache: Path) -> dict[Path, dict]:
    """The export as the trainer sees it: datasets' imagefolder, each row by the image file it loaded."""
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(ds), split="train", cache_dir=str(cache))
    loaded = loaded.cast_column("image", datasets.Image(decode=False))
    return {Path(row["image"]["path"]).resolve(): row for row in loaded}


@pytest.mark.slow
def test_export_metadata_jsonl_and_csv_load_with_datasets_imagefolder(tmp_path, model_dir, llm_server, capsys):
    ds, images = captioned_dataset(tmp_path, model_dir, llm_server, capsys)
    requests = len(llm_server.requests)
    for name in ("metadata.jsonl", "metadata.csv"):
        code, out, err = run_main(capsys, *run_args(ds, model_dir("florence2"), llm_server, "--export", name))
        assert code == 0, out + err
        rows = load_imagefolder(ds, tmp_path / f"hf-cache-{name}")
        assert sorted(rows) == sorted(image.resolve() for image in images)
        for image in images:
            assert rows[image.resolve()]["text"] == combined_text(image)
        (ds / name).unlink()  # imagefolder refuses two metadata files of different formats side by side
    assert len(llm_server.requests) == requests  # exporting asks nothing: the captions were cached


@pytest.mark.slow
def test_export_kohya_json_is_keyed_by_full_paths_that_exist(tmp_path, model_dir, llm_server, capsys):
    ds, images = captioned_dataset(tmp_path, model_dir, llm_server, capsys)
    code, out, err = run_main(capsys, *run_args(ds, model_dir("florence2"), llm_server, "--export", "kohya.json"))
    assert code == 0, out + err
    with open(ds / "kohya.json", encoding="utf-8") as f:  # as kohya's fine-tuning dataset reads its metadata_file
        metadata = json.load(f)
    assert len(metadata) == len(images)
    for key, entry in metadata.items():
        assert os.path.isabs(key) and os.path.exists(key)  # kohya opens a key that exists as it is
        assert entry["caption"] == combined_text(Path(key))
        assert "tags" not in entry  # kohya would append it to the caption
    assert sorted(Path(k) for k in metadata) == sorted(images)


def test_export_writer_names_variant_columns_per_format():
    captions = {"": "long caption", "short": "short one"}
    assert ec.caption_columns("jsonl", captions) == {"text": "long caption", "text_short": "short one"}
    assert ec.caption_columns("csv", captions) == {"text": "long caption", "text_short": "short one"}
    assert ec.caption_columns("kohya", captions) == {"caption": "long caption", "caption_short": "short one"}
    csv_text = ec.export_text("csv", [("a.jpg", {"text": "x, y", "text_short": "x"}), ("b.jpg", {"text": "z"})])
    assert csv_text.splitlines() == ["file_name,text,text_short", 'a.jpg,"x, y",x', "b.jpg,z,"]


def write_finished(image: Path, combined: str, generated: str | None = "a photo", manual: str | None = None) -> None:
    generated_path, combined_path = caches(image)
    combined_path.write_text(combined + "\n", encoding="utf-8")
    if generated is not None:
        generated_path.write_text(generated + "\n", encoding="utf-8")
    if manual is not None:
        image.with_suffix(".txt").write_text(manual, encoding="utf-8")


def test_export_skips_a_file_name_that_is_not_utf8_with_one_warning(tmp_path, capsys):
    ds = tmp_path.resolve() / "ds"
    good = make_image(ds / "good.jpg", 1)
    bad = make_image(ds / os.fsdecode(b"caf\xe9.jpg"), 2)
    write_finished(good, "sks woman, red dress")
    write_finished(bad, "sks woman, blue dress")
    for name in ("metadata.jsonl", "kohya.json"):
        code, out, err = run_main(capsys, "--dataset_dir", ds, "--export", name)  # everything cached: no model
        assert code == 0, out + err
        warnings = [line for line in err.splitlines() if "not valid UTF-8" in line]
        assert len(warnings) == 1 and repr(str(bad)) in warnings[0]
    rows = load_imagefolder(ds, tmp_path / "hf-cache")
    assert list(rows) == [good.resolve()] and rows[good.resolve()]["text"] == "sks woman, red dress"
    assert list(json.loads((ds / "kohya.json").read_text(encoding="utf-8"))) == [str(good)]


# --------------------------------------------------------------------------------------------
# --audit
# --------------------------------------------------------------------------------------------


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def audit_args(ds: Path, tokenizer_dir: str, *extra) -> list[str]:
    """Settings that would fail at once if the audit loaded a model or called an endpoint."""
    return ["--dataset_dir", str(ds), "--audit", "--keep_tokens", "1", "--max_caption_tokens", "20",
            "--caption_tokenizer", tokenizer_dir, "--model_id", str(ds / "no-such-model"),
            "--base_url", closed_port_url(), *extra]


CLEAN = ["a red car by the river", "two dogs on a beach", "an old tram in fog", "a bowl of ripe plums",
         "a kite over green hills", "snow on a quiet street", "a violin on a chair"]


def clean_dataset(ds: Path) -> list[Path]:
    images = []
    for i, scene in enumerate(CLEAN):
        image = make_image(ds / f"c{i}.jpg", i)
        write_finished(image, f"sks woman, {scene}", generated=f"{scene}, seen from afar",
                       manual=f"sks woman, {scene}")
        images.append(image)
    return images


@pytest.mark.slow
def test_audit_finds_one_of_each_flaw_and_exits_1(tmp_path, tokenizer_dir):
    ds = tmp_path.resolve() / "ds"
    clean_dataset(ds)
    flawed = {}

    def add(name: str, combined: str | None, generated: str = "a picture", manual: str = "sks woman, a picture"):
        image = make_image(ds / f"{name}.jpg", len(flawed) + 20)
        if combined is not None:
            write_finished(image, combined, generated, manual)
        else:
            image.with_suffix(".txt").write_text(manual, encoding="utf-8")
        flawed[name] = image

    golden = ", soft golden light"  # in 10 of the 12 combined captions that have text: 83%
    add("keep", "a blue bicycle, sks woman" + golden)
    add("long", "sks woman, " + words(20) + golden)
    add("dup1", "sks woman, twin lamps on a desk" + golden)
    add("dup2", "sks woman, twin lamps on a desk" + golden)
    add("refused", "I'm sorry, I can't help with that.")
    add("blank", "")
    add("missing", None)
    add("loop", "sks woman, a cat in a hat" + golden, generated="a cat with a hat with a hat with a hat")
    for i, image in enumerate(sorted(ds.glob("c*.jpg"))[:5]):
        caches(image)[1].write_text(f"sks woman, {CLEAN[i]}{golden}\n", encoding="utf-8")

    report = tmp_path / "audit.jsonl"
    result = run_cli(*audit_args(ds, tokenizer_dir, "--report", report), timeout=120)
    assert result.returncode == 1 and not result.stderr, result.stdout + result.stderr
    findings = report_failures(report)
    assert all(set(f) == {"path", "kind", "detail"} for f in findings)
    summary = json.loads(report.read_text(encoding="utf-8").splitlines()[-1])["summary"]
    assert summary["exit_code"] == 1 and sum(summary["findings"].values()) == len(findings)
    combined = {name: str(caches(image)[1]) for name, image in flawed.items()}
    assert sorted((f["kind"], f["path"]) for f in findings) == sorted([
        ("keep_tokens", combined["keep"]),
        ("over_budget", combined["long"]),
        ("duplicate", combined["dup1"]),
        ("duplicate", combined["dup2"]),
        ("refusal", combined["refused"]),
        ("empty", combined["blank"]),
        ("missing", combined["missing"]),
        ("loop", str(caches(flawed["loop"])[0])),
        ("phrase", str(ds.resolve())),
    ])
    by_kind = {f["kind"]: f["detail"] for f in findings}
    assert "soft golden light" in by_kind["phrase"] and "sks woman" not in by_kind["phrase"]
    assert by_kind["over_budget"] == "caption is 29 tokens, the limit is 20"
    assert "with a hat" in by_kind["loop"]
    for kind in ("keep_tokens", "over_budget", "duplicate", "refusal", "empty", "missing", "loop", "phrase"):
        assert kind in result.stdout
    assert f"over_budget {combined['long']}" in result.stdout
    assert not (ds / ec.LOCK_NAME).exists()  # the audit takes no lock and writes nothing in the folder


def test_audit_of_a_clean_folder_exits_0_and_asks_nothing(tmp_path, tokenizer_dir, llm_server, capsys):
    ds = tmp_path.resolve() / "ds"
    clean_dataset(ds)
    report = tmp_path / "audit.jsonl"
    args = audit_args(ds, tokenizer_dir, "--report", report)
    args[args.index("--base_url") + 1] = llm_server.base_url
    code, out, err = run_main(capsys, *args)
    assert code == 0, out + err
    assert "0 findings" in out
    assert report_failures(report) == []
    assert llm_server.requests == []


def test_audit_with_a_tokenizer_that_cannot_load_is_a_usage_error(tmp_path, capsys):
    ds = tmp_path / "ds"
    clean_dataset(ds)
    code, out, err = run_main(capsys, "--dataset_dir", ds, "--audit", "--max_caption_tokens", "77",
                              "--caption_tokenizer", tmp_path / "nothing-here")
    assert code == 2 and err.count("\n") == 1 and "--caption_tokenizer" in err


@pytest.mark.parametrize("text, loop", [
    ("a cat with a hat with a hat with a hat", '"with a hat" 3 times in a row'),
    ("very very very tall", '"very" 3 times in a row'),
    ("a red car, a red car, a red car, a red car", '"a red car" 4 times in a row'),
    ("a red car next to a red car", None),
    ("one two three four five, one two three four five, one two three four five", None),  # 5 words: not a loop
])
def test_find_loop(text, loop):
    assert ec.find_loop(text) == loop


def test_common_phrases_leave_out_kept_parts_stop_words_and_small_folders():
    texts = [f"sks woman, in the style of a watercolor, scene {i}" for i in range(5)]
    assert ec.common_phrases(texts, ["sks woman"]) == [("in the style of a watercolor", 5)]  # one, not its 4-grams
    assert ec.common_phrases(texts, []) == [("in the style of a watercolor", 5), ("sks woman", 5)]
    assert ec.common_phrases([f"cat{i} in the box{i}" for i in range(5)], []) == []  # stop words only
    assert ec.common_phrases(texts[:4], ["sks woman"]) == []  # four captions always share their phrases
    assert ec.common_phrases(texts + ["scene five, plain"] * 2, ["sks woman"]) == []  # 5 of 7 is under 80%


# --------------------------------------------------------------------------------------------
# Shipped prompt files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["short.txt", "tags.txt"])
def test_shipped_prompts_are_sent_as_the_system_prompt(tmp_path, llm_server, capsys, name):
    prompt = ROOT / "prompts" / name
    text = prompt.read_text(encoding="utf-8").strip()
    assert "trigger word" in text and "manual caption" in text
    ds = tmp_path / "ds"
    image = make_image(ds / "a.jpg", 1)
    caches(image)[0].write_text("a photo of a woman\n", encoding="utf-8")  # cached: only the merge runs
    image.with_suffix(".txt").write_text("sks woman, red dress", encoding="utf-8")
    code, out, err = run_main(capsys, "--dataset_dir", ds, "--base_url", llm_server.base_url, "--model", "test-model",
                              "--system_prompt", prompt)
    assert code == 0, out + err
    assert [r["messages"][0] for r in llm_server.requests] == [{"role": "system", "content": text}]


# --------------------------------------------------------------------------------------------
# Budgets and fixed text in the merge itself
# --------------------------------------------------------------------------------------------

LONG_REPLY = "sks woman, a red dress, standing in the park, soft golden light. A red dress in the soft light."


def budget_dataset(ds: Path) -> Path:
    image = make_image(ds / "a.jpg", 1)
    caches(image)[0].write_text("a woman in a red dress in a park\n", encoding="utf-8")  # only the merge runs
    image.with_suffix(".txt").write_text("sks woman, in the park", encoding="utf-8")
    return image


def merge_args(ds: Path, server, tokenizer_dir: str, *extra) -> list:
    return ["--dataset_dir", ds, "--model_id", ds / "no-model", "--base_url", server.base_url, "--model", "test-model",
            "--keep_tokens", "1", "--max_caption_tokens", "12", "--caption_tokenizer", tokenizer_dir, *extra]


def test_a_reply_over_the_budget_is_asked_again_with_its_count_then_cut_with_a_note(tmp_path, llm_server, capsys,
                                                                                   tokenizer_dir, count):
    ds = tmp_path / "ds"
    image = budget_dataset(ds)
    llm_server.reply = lambda body: LONG_REPLY  # never complies
    report = tmp_path / "report.jsonl"
    code, out, err = run_main(capsys, *merge_args(ds, llm_server, tokenizer_dir, "--max_retries", "2",
                                                  "--report", report))
    assert code == 0, out + err
    assert len(llm_server.requests) == 3
    for request in llm_server.requests[1:]:  # asked again, with the count and the limit
        last = request["messages"][-1]["content"]
        assert last.startswith("That caption is too long") and "the limit is 12" in last
        assert f"is {count(LONG_REPLY)} tokens" in last
    text = caches(image)[1].read_text(encoding="utf-8").strip()
    assert count(text) <= 12 and text.startswith("sks woman, ")
    assert LONG_REPLY.startswith(text.rstrip("."))  # cut at a boundary of the reply, nothing invented
    rows = report_failures(report)
    assert [r["path"] for r in rows] == [str(image)] and "cut to" in rows[0]["note"]


def test_a_reply_that_fits_on_the_second_try_is_cached_without_a_note(tmp_path, llm_server, capsys, tokenizer_dir,
                                                                      count):
    ds = tmp_path / "ds"
    image = budget_dataset(ds)
    llm_server.script(("reply", LONG_REPLY), ("reply", "sks woman, a red dress"))
    report = tmp_path / "report.jsonl"
    code, out, err = run_main(capsys, *merge_args(ds, llm_server, tokenizer_dir, "--report", report))
    assert code == 0, out + err
    assert len(llm_server.requests) == 2
    assert caches(image)[1].read_bytes() == b"sks woman, a red dress\n"
    assert report_failures(report) == []


@pytest.mark.parametrize("reply, expected", [
    ("sks woman, a red dress", "photo, sks woman, a red dress, golden"),
    ("photo, sks woman, a red dress, golden", "photo, sks woman, a red dress, golden"),  # never doubled
    ("Photo, sks woman, golden, a red dress", "photo, sks woman, a red dress, golden"),
])
def test_prefix_and_suffix_reach_every_combined_caption_once(tmp_path, llm_server, capsys, reply, expected):
    ds = tmp_path / "ds"
    image = budget_dataset(ds)
    llm_server.reply = lambda body: reply
    code, out, err = run_main(capsys, "--dataset_dir", ds, "--model_id", ds / "no-model", "--base_url",
                              llm_server.base_url, "--model", "test-model", "--keep_tokens", "1",
                              "--prefix", "photo", "--suffix", "golden")
    assert code == 0, out + err
    assert caches(image)[1].read_text(encoding="utf-8").strip() == expected
