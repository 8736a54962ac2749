"""Every kind of vision model, end to end: one path chosen by the processor's capabilities.

Task-token models (Florence-2), chat-template models (Qwen2.5-VL, Qwen3-VL, SmolVLM, Janus, LLaVA), plain
captioners (BLIP; PaliGemma, which has no chat template), a model that fits none of them, the loading options,
and served vision models.
The tiny models can only generate tiny_models.CAPTION_WORDS: any other word in a caption (a prompt word,
a chat role, a special token) means the script decoded more than the generated part.
"""
from __future__ import annotations

import base64
import io
import shutil
import types
from pathlib import Path

import pytest

import enhance_captions as ec
from tests import tiny_models
from tests.conftest import caches, main_result, make_dataset, make_image, run_args, run_cli
from tests.llm_server import FakeLLMServer, sha12

FAMILIES = ["florence2", "janus", "qwen2_5_vl", "qwen3_vl", "smolvlm", "llava", "blip", "paligemma"]
EXPECTED_KIND = {"florence2": "task", "janus": "chat", "qwen2_5_vl": "chat", "qwen3_vl": "chat", "smolvlm": "chat",
                 "llava": "chat", "blip": "plain", "paligemma": "plain"}
# Flags a family needs on the command line: PaliGemma has no chat template and captions only after a task
# prefix such as "caption en" (the plain kind's default prompt is none).
FAMILY_ARGS = {"paligemma": ["--prompt", "caption en"]}
# Words the tiny vocabularies know (so the system turn tokenizes to real ids); never generated.
SYSTEM_TEXT = "Write one short caption of this photo ."



def run_default_args(dataset, model, server, *extra):
    """run_args at the script's own batch size and decoding workers."""
    return run_args(dataset, model, server, *extra, batch_size=None, num_workers=None)


def assert_caption_words_only(text: str, where) -> None:
    """A generated caption: non-empty, one line, made only of the words the tiny model can generate."""
    words = text.split()
    assert words, f"{where}: empty caption"
    assert text == text.strip() and "\n" not in text, f"{where}: {text!r}"
    assert "<" not in text and ">" not in text and "</s>" not in text, f"{where}: special token in {text!r}"
    roles = {"user", "assistant", "system"} & {w.strip(":").lower() for w in words}
    assert not roles, f"{where}: chat role {roles} in {text!r}"
    stray = [w for w in words if w not in tiny_models.CAPTION_WORDS]
    assert not stray, f"{where}: words that are not generated captions {stray} in {text!r}"


def read_generated(image: Path) -> str:
    return caches(image)[0].read_text(encoding="utf-8").strip()


def no_caption_files(folder: Path) -> bool:
    return not list(folder.rglob("*_generated.txt")) and not list(folder.rglob("*_combined.txt"))


def error_lines(stderr: str) -> list[str]:
    """The error report of a failed run (progress lines such as "vision: ..." are not part of it)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error")]


# --------------------------------------------------------------------------------------------
# 1. every family end to end through main(), batched, one partial batch
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end_batched_captions_are_generated_words_only(tmp_path, capsys, model_dir, llm_server, family):
    images = make_dataset(tmp_path / "ds", 5)
    result = main_result(capsys, *run_default_args(tmp_path / "ds", model_dir(family), llm_server, "--batch_size",
                                                   "3", "--num_workers", "1", *FAMILY_ARGS.get(family, [])))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vision: 5 done, 0 from cache, 0 failed" in result.stdout, result.stdout
    assert "llm: 5 done, 0 from cache, 0 failed" in result.stdout, result.stdout
    for image in images:
        generated, combined = caches(image)
        assert_caption_words_only(generated.read_text(encoding="utf-8").strip(), generated.name)
        assert combined.read_text(encoding="utf-8").strip()
    assert len(llm_server.requests) == 5
    # each merge request carries exactly one of the generated captions, each caption once in all
    sent = [[m for m in r["messages"] if m["role"] == "user"][-1]["content"] for r in llm_server.requests]
    for image in images:
        assert any(f"\n{read_generated(image)}\n" in s + "\n" for s in sent), image.name


# --------------------------------------------------------------------------------------------
# 2. greedy captions do not depend on the batch size
# --------------------------------------------------------------------------------------------


def varied_dataset(folder: Path, n: int = 9) -> list[Path]:
    """Images of different sizes, so a chat model with size-dependent image tokens has to pad in a batch."""
    sizes = [(64, 48), (48, 64), (56, 56), (112, 84), (64, 48), (84, 112), (60, 40), (96, 96), (64, 48)]
    return [make_image(folder / f"img{i:03d}.jpg", i, size=sizes[i % len(sizes)]) for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["florence2", "qwen2_5_vl", "qwen3_vl", "smolvlm"])
def test_caption_at_batch_size_8_equals_caption_at_batch_size_1(tmp_path, model_dir, llm_server, family):
    images = varied_dataset(tmp_path / "b8")
    shutil.copytree(tmp_path / "b8", tmp_path / "b1")
    for folder, batch in (("b8", "8"), ("b1", "1")):
        code = ec.main([str(a) for a in run_default_args(tmp_path / folder, model_dir(family), llm_server,
                                                 "--batch_size", batch, "--num_workers", "0", "--quiet")])
        assert code == 0, f"batch size {batch}: exit {code}"
    for image in images:
        batched = read_generated(image)
        single = read_generated(tmp_path / "b1" / image.name)
        assert_caption_words_only(batched, image.name)
        assert batched == single, f"{image.name}: batch 8 {batched!r} != batch 1 {single!r}"
    assert len({read_generated(image) for image in images}) > 1  # the captions do depend on the image


@pytest.mark.slow
@pytest.mark.parametrize("family", ["florence2", "qwen2_5_vl"])
def test_captions_from_decoding_workers_equal_captions_decoded_in_process(tmp_path, model_dir, llm_server, family):
    """Workers hand small tensors over inline and large ones through shared memory; the model sees the same."""
    images = varied_dataset(tmp_path / "w2")
    shutil.copytree(tmp_path / "w2", tmp_path / "w0")
    for folder, workers in (("w2", "2"), ("w0", "0")):
        code = ec.main([str(a) for a in run_default_args(tmp_path / folder, model_dir(family), llm_server,
                                                 "--batch_size", "4", "--num_workers", workers, "--quiet")])
        assert code == 0, f"--num_workers {workers}: exit {code}"
    for image in images:
        assert read_generated(image) == read_generated(tmp_path / "w0" / image.name), image.name


# --------------------------------------------------------------------------------------------
# 3. --vlm_system_prompt adds a system turn
# --------------------------------------------------------------------------------------------


def captioner_for(tmp_path, model, **options):
    import torch

    cfg = ec.Config(dataset_dir=tmp_path, model_id=model, max_new_tokens=8, verbosity=0, **options)
    return ec.load_captioner(cfg, torch.device("cpu"))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "smolvlm", "janus"])
def test_vlm_system_prompt_is_a_system_turn_in_the_model_input(tmp_path, model_dir, family):
    from PIL import Image

    image = Image.new("RGB", (64, 48), (10, 120, 200))
    with_system = captioner_for(tmp_path, model_dir(family), vlm_system_prompt=SYSTEM_TEXT, prompt="Describe the image")
    turns = with_system.conversation(image)
    assert turns[0]["role"] == "system"
    assert SYSTEM_TEXT in str(turns[0]["content"])
    assert [t["role"] for t in turns] == ["system", "user"]
    rendered = with_system.processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert SYSTEM_TEXT in rendered
    # the system text reaches the model: it is in the token ids that prepare() builds for generate()
    inputs, _ = with_system.prepare([image])
    decoded = with_system.processor.tokenizer.decode(inputs["input_ids"][0])
    assert SYSTEM_TEXT in decoded
    assert "Describe the image" in decoded

    without = captioner_for(tmp_path, model_dir(family), prompt="Describe the image")
    assert [t["role"] for t in without.conversation(image)] == ["user"]
    inputs, _ = without.prepare([image])
    assert SYSTEM_TEXT not in without.processor.tokenizer.decode(inputs["input_ids"][0])


@pytest.mark.slow
def test_vlm_system_prompt_flag_end_to_end(tmp_path, capsys, model_dir, llm_server):
    images = make_dataset(tmp_path / "ds", 4)
    prompt_file = tmp_path / "vlm_system.txt"
    prompt_file.write_text(SYSTEM_TEXT + "\n", encoding="utf-8")
    result = main_result(capsys, *run_default_args(tmp_path / "ds", model_dir("qwen2_5_vl"), llm_server,
                                                   "--batch_size", "3", "--num_workers", "0",
                                                   "--vlm_system_prompt", prompt_file))
    assert result.returncode == 0, result.stderr[-3000:]
    for image in images:
        assert_caption_words_only(read_generated(image), image.name)
    missing = main_result(capsys, *run_default_args(tmp_path / "ds", model_dir("qwen2_5_vl"), llm_server,
                                                    "--vlm_system_prompt", tmp_path / "none.txt"))
    assert missing.returncode == 2 and "none.txt" in missing.stderr


# --------------------------------------------------------------------------------------------
# 4. the kind comes from the processor's capabilities; a model of no kind fails at load time
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_kind_of_processor_by_capability(model_dir, family):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir(family))
    assert ec.LocalCaptioner.kind_of(processor) == EXPECTED_KIND[family]


def test_kind_does_not_depend_on_the_model_name(tmp_path, model_dir):
    misleading = {"florence2": "Qwen2.5-VL-3B-Instruct", "qwen2_5_vl": "blip-image-captioning", "blip": "Florence-2-base"}
    for family, name in misleading.items():  # a folder name that suggests another family
        renamed = tmp_path / name
        shutil.copytree(model_dir(family), renamed)
        assert captioner_for(tmp_path, str(renamed)).kind == EXPECTED_KIND[family]


def test_processor_of_no_kind_raises_usage_error_naming_the_kinds():
    class ImageOnly:  # an image processor alone: no tokenizer, no chat template, no post-processing
        image_processor = None

    with pytest.raises(ec.UsageError) as info:
        ec.LocalCaptioner.kind_of(ImageOnly())
    assert "supported" in str(info.value) and "\n" not in str(info.value)
    for kind in ("task-token", "chat-template", "BLIP"):
        assert kind in str(info.value)


def test_text_only_model_is_no_vision_kind(tmp_path):
    """A chat LM's tokenizer has a chat template but cannot take an image: it fits no kind."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_models.build_causal_lm(tmp_path / "lm"))
    with pytest.raises(ec.UsageError) as info:
        ec.LocalCaptioner.kind_of(processor)
    assert "supported" in str(info.value)


def build_vit_classifier(path: Path) -> str:
    """A tiny image classifier: an image processor and a model, but nothing that writes text."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("builder", ["causal_lm", "vit_classifier"])
def test_model_that_is_not_image_to_text_fails_at_load_time_with_one_line(tmp_path, capsys, llm_server, builder):
    make_dataset(tmp_path / "ds", 3)
    model = tmp_path / "model"
    if builder == "causal_lm":
        tiny_models.build_causal_lm(model)
    else:
        build_vit_classifier(model)
    result = main_result(capsys, *run_default_args(tmp_path / "ds", model, llm_server, "--batch_size", "2",
                                                   "--num_workers", "0"))
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = error_lines(result.stderr)
    assert len(lines) == 1, lines
    assert "supported" in lines[0]
    for kind in ("task-token", "chat-template", "BLIP"):
        assert kind in lines[0], lines[0]
    assert no_caption_files(tmp_path / "ds")
    assert llm_server.requests == []


# --------------------------------------------------------------------------------------------
# 5. loading and generation options
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dtype_attention_and_repetition_penalty_end_to_end(tmp_path, capsys, model_dir, llm_server):
    images = make_dataset(tmp_path / "ds", 4)
    result = main_result(capsys, *run_default_args(tmp_path / "ds", model_dir("qwen2_5_vl"), llm_server,
                                                   "--batch_size", "3", "--num_workers", "0", "--dtype", "bfloat16",
                                                   "--attn_implementation", "eager", "--repetition_penalty", "1.2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vision: 4 done" in result.stdout
    for image in images:
        assert_caption_words_only(read_generated(image), image.name)


def test_loading_options_reach_the_model(tmp_path, model_dir):
    import torch

    captioner = captioner_for(tmp_path, model_dir("qwen2_5_vl"), dtype="bfloat16", attn_implementation="eager",
                              repetition_penalty=1.2)
    assert captioner.model.dtype == torch.bfloat16
    assert captioner.model.config._attn_implementation == "eager"
    assert captioner.generate_kwargs["repetition_penalty"] == 1.2
    assert captioner.generate_kwargs["max_new_tokens"] == 8
    assert captioner.generate_kwargs["do_sample"] is False

    plain = captioner_for(tmp_path, model_dir("florence2"), dtype="float32")
    assert plain.model.dtype == torch.float32
    assert "repetition_penalty" not in plain.generate_kwargs



def test_device_map_auto_is_passed_to_the_loader_and_the_model_is_not_moved(tmp_path, model_dir, monkeypatch):
    import torch
    import transformers
    from PIL import Image

    seen: list[dict] = []
    real = transformers.AutoModelForImageTextToText.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        model = real(cls, *args, **kwargs)
        monkeypatch.setattr(model, "to", lambda *a, **k: pytest.fail("a device-mapped model was moved with .to()"))
        return model

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", classmethod(spy))
    mapped = captioner_for(tmp_path, model_dir("smolvlm"), device_map="auto")
    assert [k.get("device_map") for k in seen] == ["auto"]
    assert mapped.model.device == torch.device("cpu")

    captions = mapped.caption(mapped.prepare([Image.new("RGB", (64, 48), (200, 30, 30))]))
    assert len(captions) == 1
    assert_caption_words_only(captions[0], "device_map auto")


def test_quantization_without_bitsandbytes_is_one_clear_line(tmp_path, capsys, model_dir, llm_server):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    make_dataset(tmp_path / "ds", 2)
    result = main_result(capsys, *run_default_args(tmp_path / "ds", model_dir("florence2"), llm_server,
                                                   "--quantization", "4bit", "--num_workers", "0"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "bitsandbytes" in lines[0], lines
    assert no_caption_files(tmp_path / "ds")


def test_device_map_auto_needs_one_process(tmp_path):
    cfg = ec.Config(dataset_dir=tmp_path, device_map="auto")
    with pytest.raises(ec.UsageError) as info:
        ec.check_against_state(cfg, types.SimpleNamespace(num_processes=2, process_index=0))
    assert "device_map" in str(info.value) and "one process" in str(info.value)
    ec.check_against_state(cfg, types.SimpleNamespace(num_processes=1, process_index=0))  # one process is fine
    ec.check_against_state(ec.Config(dataset_dir=tmp_path), types.SimpleNamespace(num_processes=2, process_index=0))


# --------------------------------------------------------------------------------------------
# 6. served vision models: each image goes to an OpenAI-compatible endpoint; no torch model loads
# --------------------------------------------------------------------------------------------


def image_parts(request: dict) -> list[str]:
    urls = []
    for message in request["messages"]:
        if isinstance(message.get("content"), list):
            for part in message["content"]:
                if part.get("type") == "image_url":
                    urls.append(part["image_url"]["url"])
    return urls


def is_vision_request(request: dict) -> bool:
    return bool(image_parts(request))


def decode_data_url(url: str):
    from PIL import Image

    assert url.startswith("data:image/"), url[:40]
    header, data = url.split(",", 1)
    assert header.endswith(";base64")
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    return img.convert("RGB")


def mean_colour(img) -> tuple[float, float, float]:
    from PIL import ImageStat

    return tuple(ImageStat.Stat(img.convert("RGB")).mean)


def match_image(decoded, images: list[Path]) -> Path:
    """The dataset image whose pixels the decoded request image shows (nearest mean colour, same aspect)."""
    from PIL import Image

    def distance(path: Path) -> float:
        with Image.open(path) as original:
            if abs(original.width / original.height - decoded.width / decoded.height) > 0.05:
                return float("inf")
            return sum(abs(a - b) for a, b in zip(mean_colour(original.resize(decoded.size)), mean_colour(decoded)))

    ranked = sorted(images, key=distance)
    assert distance(ranked[0]) < 12 and distance(ranked[1]) > 3 * max(distance(ranked[0]), 1), "ambiguous image"
    return ranked[0]


def check_served_captions(images: list[Path], vision_requests: list[dict], max_side: int, prompt: str) -> None:
    assert len(vision_requests) == len(images)
    matched: dict[Path, dict] = {}
    for request in vision_requests:
        assert request["model"] == "test-model"
        urls = image_parts(request)
        assert len(urls) == 1
        decoded = decode_data_url(urls[0])
        assert max(decoded.size) <= max_side, decoded.size
        image = match_image(decoded, images)
        assert image not in matched, f"{image.name} was sent twice"
        matched[image] = request
        texts = [p["text"] for m in request["messages"] if isinstance(m["content"], list)
                 for p in m["content"] if p.get("type") == "text"]
        assert prompt in texts
    for image in images:  # the caption written next to an image answers the request that carried that image
        url = image_parts(matched[image])[0]
        assert read_generated(image) == "VISION " + sha12(url), image.name


@pytest.mark.slow
def test_served_vision_model_one_server_for_both_stages_large_images_downscaled(tmp_path, llm_server):
    images = [make_image(tmp_path / "ds" / f"big{i}.jpg", i + 1, size=(1500, 1000)) for i in range(3)]
    images.append(make_image(tmp_path / "ds" / "tall.png", 7, size=(600, 1200)))
    result = run_cli("--dataset_dir", tmp_path / "ds", "--model_id", tmp_path / "no-such-model",
                     "--vlm_base_url", llm_server.base_url, "--vlm_model", "test-model", "--vlm_max_side", "256",
                     "--vlm_rpm", "600", "--prompt", "Describe the image", "--base_url", llm_server.base_url,
                     "--model", "test-model")
    assert result.returncode == 0, result.stderr[-3000:]
    vision = [r for r in llm_server.requests if is_vision_request(r)]
    merges = [r for r in llm_server.requests if not is_vision_request(r)]
    check_served_captions(images, vision, 256, "Describe the image")
    for request in vision:  # the 1500x1000 images arrive as 256x171, the 600x1200 one as 128x256
        assert max(decode_data_url(image_parts(request)[0]).size) == 256
    assert len(merges) == len(images)
    for image in images:
        assert caches(image)[1].read_text(encoding="utf-8").strip()
    assert "vision: 4 done, 0 from cache, 0 failed" in result.stdout
    assert not (tmp_path / "no-such-model").exists()


@pytest.mark.slow
def test_served_vision_model_and_llm_on_two_servers(tmp_path):
    images = make_dataset(tmp_path / "ds", 5)
    system_file = tmp_path / "vlm_system.txt"
    system_file.write_text(SYSTEM_TEXT, encoding="utf-8")
    with FakeLLMServer() as vision_server, FakeLLMServer() as llm:
        result = run_cli("--dataset_dir", tmp_path / "ds", "--model_id", tmp_path / "no-such-model",
                         "--vlm_base_url", vision_server.base_url, "--vlm_model", "test-model", "--vlm_rpm", "120",
                         "--vlm_system_prompt", system_file, "--prompt", "Describe the image",
                         "--base_url", llm.base_url, "--model", "test-model", "--concurrency", "3")
        assert result.returncode == 0, result.stderr[-3000:]
        vision_requests, llm_requests = vision_server.chat_requests(), llm.chat_requests()
    assert all(is_vision_request(r) for r in vision_requests)
    assert not any(is_vision_request(r) for r in llm_requests)
    check_served_captions(images, vision_requests, 1024, "Describe the image")
    for request in vision_requests:
        assert request["messages"][0] == {"role": "system", "content": SYSTEM_TEXT}
        assert decode_data_url(image_parts(request)[0]).size == (64, 48)  # small images are not enlarged
    assert len(llm_requests) == 5
    for image in images:  # each merge request carries that image's served caption
        generated = read_generated(image)
        assert sum(generated in [m for m in r["messages"] if m["role"] == "user"][-1]["content"]
                   for r in llm_requests) == 1
        assert caches(image)[1].read_text(encoding="utf-8").strip()


def test_served_vision_model_needs_its_name(tmp_path, llm_server):
    make_dataset(tmp_path / "ds", 1)
    result = run_cli("--dataset_dir", tmp_path / "ds", "--vlm_base_url", llm_server.base_url,
                     "--base_url", llm_server.base_url)
    assert result.returncode == 2 and "--vlm_model" in result.stderr
    assert llm_server.requests == []


# --------------------------------------------------------------------------------------------
# Reduced-scale JPEG decoding keeps what each processor feeds its model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_jpeg_decoding_gives_the_model_the_same_input(tmp_path, model_dir, family):
    """A camera-sized JPEG decoded at reduced scale (down to the processor's own size) must give the model an
    input of the same shape and nearly the same pixels as decoding it in full; the captioner reports the full
    image's size (Florence-2 maps region coordinates onto it)."""
    import torch
    from PIL import Image

    path = tmp_path / "camera.jpg"
    Image.linear_gradient("L").resize((1024, 768)).convert("RGB").save(path, format="JPEG", quality=90)
    captioner = captioner_for(tmp_path, model_dir(family))
    full_inputs, full_sizes = captioner.prepare([ec.load_image(path)])
    reduced_image = ec.load_image(path, min_side=captioner.decode_side)
    reduced_inputs, reduced_sizes = captioner.prepare([reduced_image])
    assert full_sizes == reduced_sizes == [(1024, 768)]
    assert set(full_inputs) == set(reduced_inputs)
    for key, full in full_inputs.items():
        reduced = reduced_inputs[key]
        assert full.shape == reduced.shape, key
        if torch.is_floating_point(full):
            assert (full - reduced).abs().mean() < 0.05, key
        else:
            assert torch.equal(full, reduced), key
    if captioner.decode_side and captioner.decode_side <= 384:
        assert reduced_image.size[0] < 1024  # the tiny processors' sizes are small enough to decode at 1/2 or less
