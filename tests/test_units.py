"""Unit tests of the pure functions: discovery, caches, prompts, reply cleaning, the limiter, retries."""
from __future__ import annotations

import asyncio
import os
import types
from pathlib import Path

import pytest

import enhance_captions as ec


@pytest.mark.parametrize("raw, clean", [
    ("  A red car.  ", "A red car."),
    ("<think>plan it</think>\nA red car.", "A red car."),
    ("reasoning without an opening tag</think> A red car.", "A red car."),
    ("<think>\nnever closed", ""),
    ("Here is the combined caption:\nA red car.", "A red car."),
    ("Sure! Here's the merged caption: A red car.", "A red car."),
    ("Combined caption: A red car.", "A red car."),
    ('"A red car."', "A red car."),
    ("\u201cA red car.\u201d", "A red car."),
    ("```\nA red car.\n```", "A red car."),
    ("```text\nA red car.\n```", "A red car."),
    ("A red car.\n\nIt is   parked\tnear a tree.", "A red car. It is parked near a tree."),
    (None, ""),
])
def test_clean_reply(raw, clean):
    assert ec.clean_reply(raw) == clean


def test_clean_reply_keeps_quotes_that_are_part_of_the_caption():
    text = '"Hello" reads the sign, and "Exit" the door.'
    assert ec.clean_reply(text) == text
    assert ec.clean_reply("Here is the caption:\n```text\n'A red car.'\n```") == "A red car."


def test_clean_reply_keeps_a_caption_that_merely_contains_a_colon():
    text = "ohwx woman, portrait: soft light from the left, a blue scarf."
    assert ec.clean_reply(text) == text


@pytest.mark.parametrize("text, finish, problem", [
    ("A red car.", "stop", None),
    ("", "stop", "empty reply"),
    (" ... !", "stop", "empty reply"),
    ("I'm sorry, but I can't help with that.", "stop", "refusal"),
    ("I cannot describe this image.", "stop", "refusal"),
    ("A red car parked", "length", "cut off"),
])
def test_reply_problem(text, finish, problem):
    found = ec.reply_problem(text, finish)
    assert (found is None) if problem is None else (problem in found)


def test_user_message_labels_each_caption_once_and_says_when_there_is_no_manual_one():
    with_manual = ec.build_user_message("ohwx man, red shirt", "a man in a red shirt")
    assert with_manual.count("ohwx man, red shirt") == 1 and with_manual.count("a man in a red shirt") == 1
    assert "Manual caption" in with_manual and "Generated caption" in with_manual
    without = ec.build_user_message(None, "a man in a red shirt")
    assert "There is no manual caption" in without and "Manual caption" not in without
    assert not without.startswith((".", " ")) and ". ." not in without


def test_keep_token_parts():
    assert ec.keep_token_parts("ohwx man,  red shirt , smiling", 2) == ["ohwx man", "red shirt"]
    assert ec.keep_token_parts("ohwx man", 0) == []
    assert ec.keep_token_parts(None, 3) == []


@pytest.mark.parametrize("total, count", [(0, 3), (1, 1), (10, 3), (30, 4), (7, 7)])
def test_process_shares_add_up_to_the_total(total, count):
    shares = [ec.process_share(total, i, count) for i in range(count)]
    assert sum(shares) == total and max(shares) - min(shares) <= 1


def test_redact_hides_keys_and_url_credentials():
    assert "sk-secret" not in ec.redact("bad key sk-secret given", "sk-secret")
    assert "user:pw" not in ec.redact("http://user:pw@host/v1", None)


def test_read_text_bom_blank_and_invalid(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffohwx man\n".encode("utf-8"))
    assert ec.read_text(path) == "ohwx man"
    path.write_text(" \n\t")
    assert ec.read_text(path) is None
    assert ec.read_text(tmp_path / "missing.txt") is None
    path.write_bytes(b"caf\xe9")
    with pytest.raises(ec.ItemError, match="not valid UTF-8"):
        ec.read_text(path)
    assert ec.read_cache(path) is None  # an unreadable cache is redone, not trusted


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "x_combined.txt"
    target.write_text("old")
    ec.atomic_write(target, "  new caption \n")
    assert target.read_text() == "new caption\n"
    assert sorted(os.listdir(tmp_path)) == ["x_combined.txt"]


def test_walk_and_pair_skip_hidden_and_report_stem_conflicts(tmp_path):
    for name in ["b.png", "a.jpg", "a.png", "sub/c.WEBP", ".hid/d.jpg", "._e.jpg", "f.gif", "g_generated.txt"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    images, problems = ec.walk_images(tmp_path)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in images] == ["a.jpg", "a.png", "b.png", "sub/c.WEBP"]
    assert problems == []
    items, conflicts = ec.pair_items(images, ".txt")
    assert [i.image.name for i in items] == ["b.png", "c.WEBP"]
    assert sorted(Path(f.path).name for f in conflicts) == ["a.jpg", "a.png"]
    assert all("stem" in f.error for f in conflicts)


def test_walk_lists_images_in_the_order_of_their_paths(tmp_path):
    """As sorted Paths, folder by folder: b/c.png before b-c.png, though a string puts "-" before "/"."""
    names = ["b-c.png", "b/c.png", "a.png", "b/a/z.png", "B.png", "b.png", "b0.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    images, _ = ec.walk_images(tmp_path)
    assert images == [str(p) for p in sorted(tmp_path / name for name in names)]


def test_caption_file_that_is_another_images_cache_is_a_conflict(tmp_path):
    images = [tmp_path / "a.png", tmp_path / "a_generated.png"]
    items, conflicts = ec.pair_items(images, ".txt")
    assert items == [] and len(conflicts) == 2


def test_caption_file_that_is_another_images_combined_caption_is_a_conflict(tmp_path):
    images = [tmp_path / "a.png", tmp_path / "a_combined.png", tmp_path / "b_combined.png"]
    items, conflicts = ec.pair_items(images, ".txt")
    assert [i.image.name for i in items] == ["b_combined.png"]
    assert sorted(Path(f.path).name for f in conflicts) == ["a.png", "a_combined.png"]
    assert all("a_combined.txt is also a.png's cache file" in f.error for f in conflicts)


def test_symlink_loop_is_reported_not_followed_forever(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jpg").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")
    images, problems = ec.walk_images(tmp_path)
    assert [Path(p).name for p in images] == ["x.jpg"]
    assert len(problems) == 1 and "symlink loop" in problems[0].error


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self):
        return self.now

    async def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_limiter_never_lets_a_60s_window_exceed_the_rpm():
    clock = FakeClock()
    limiter = ec.RateLimiter(requests=5, clock=clock, sleep=clock.sleep)

    async def go():
        times = []
        for _ in range(17):
            await limiter.acquire()
            times.append(clock.now)
            clock.now += 1.0
        return times

    times = asyncio.run(go())
    for t in times:
        assert sum(t <= u < t + 60 for u in times) <= 5
    assert times[-1] - times[0] >= 180  # 17 requests at 5 per minute need over three windows


def test_limiter_tokens_per_minute_and_shared_pause():
    clock = FakeClock()
    limiter = ec.RateLimiter(tokens=1000, clock=clock, sleep=clock.sleep)

    async def go():
        await limiter.acquire(600)
        start = clock.now
        await limiter.acquire(600)  # would make 1200 in the window: waits for the first to leave it
        waited = clock.now - start
        limiter.pause(7.5)
        before = clock.now
        await limiter.acquire(1)
        return waited, clock.now - before

    waited, paused = asyncio.run(go())
    assert waited >= 60 and paused >= 7.5


def test_a_pause_one_process_publishes_holds_back_the_other_processes_limiters(tmp_path):
    """Two processes' limiters on one dataset folder: a 429's Retry-After in one makes the other wait too,
    and a pause that has ended (or a file left by an earlier run) holds nobody back."""
    clock = FakeClock()
    path = tmp_path / ec.PAUSE_NAME.format(stage=ec.STAGE_LLM)
    first, second = (ec.RateLimiter(clock=clock, sleep=clock.sleep, shared=ec.SharedPause(path, wall=clock))
                     for _ in range(2))

    async def go():
        await second.acquire()
        assert clock.sleeps == []  # no pause yet: no file, no wait
        first.pause(12.0)
        start = clock.now
        await second.acquire()
        waited = clock.now - start
        await first.acquire()
        return waited

    assert asyncio.run(go()) == pytest.approx(12.0)
    assert float(path.read_text()) == pytest.approx(clock.now)
    assert clock.sleeps == [pytest.approx(12.0)]  # the first process's own wait was already over

    path.write_text("half a numb")  # caught mid-write: ignored, read again next time
    late = ec.RateLimiter(clock=clock, sleep=clock.sleep, shared=ec.SharedPause(path, wall=clock))
    asyncio.run(late.acquire())
    assert clock.sleeps == [pytest.approx(12.0)]


@pytest.mark.parametrize("reported, waits", [(900, 1), (10, 0)])
def test_tpm_counts_the_tokens_the_server_reports_not_the_estimate(reported, waits):
    """Through the real HTTP path: the limiter's estimate of a small request (~45 tokens) is replaced by the
    usage the server reports, so a reply that cost 900 of 920 tokens makes the next request (~45) wait."""
    from tests.llm_server import FakeLLMServer

    def reply(body):
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": reported - 1, "completion_tokens": 1, "total_tokens": reported}}

    clock = FakeClock()
    limiter = ec.RateLimiter(tokens=920, clock=clock, sleep=clock.sleep)
    with FakeLLMServer(reply=reply) as server:
        chat = ec.EndpointChat(server.base_url, None, "test-model", limiter, timeout=10,
                               max_tokens=16, temperature=0.0)

        async def go():
            first = await chat.complete([{"role": "user", "content": "hello"}])
            second = await chat.complete([{"role": "user", "content": "hello again"}])
            await chat.client.close()
            return first, second

        first, second = asyncio.run(go())
        assert len(server.chat_requests()) == 2
    assert first.text == second.text == "ok"
    assert limiter.sent[0][1] == reported
    assert len(clock.sleeps) == waits
    if waits:
        assert clock.sleeps[0] == pytest.approx(60.0)


def test_complete_item_retries_bad_replies_then_reports():
    clock = FakeClock()

    class Backend:
        def __init__(self, replies):
            self.replies, self.calls = list(replies), []

        async def complete(self, messages):
            self.calls.append(messages)
            reply = self.replies.pop(0)
            if isinstance(reply, Exception):
                raise reply
            return reply

    ok = Backend([ec.RetryableReply("not json"), ec.Reply("", "stop"), ec.Reply("I'm sorry, I can't.", "stop"),
                  ec.Reply("A red car.", "stop")])
    text = asyncio.run(ec.complete_item(ok, [], 5, sleep=clock.sleep))
    assert text == "A red car." and len(ok.calls) == 4 and len(clock.sleeps) == 3
    assert clock.sleeps[1] > clock.sleeps[0] * 0.5  # backoff grows (with jitter)

    bad = Backend([ec.Reply("cut", "length")] * 3)
    with pytest.raises(ec.ItemError, match="cut off"):
        asyncio.run(ec.complete_item(bad, [], 2, sleep=clock.sleep))


def test_complete_item_puts_the_kept_tokens_first_without_asking_again():
    class Backend:
        def __init__(self, replies):
            self.replies, self.calls = list(replies), 0

        async def complete(self, messages):
            self.calls += 1
            return ec.Reply(self.replies.pop(0), "stop")

    async def no_sleep(_):
        pass

    stubborn = Backend(["a man in red"])
    assert asyncio.run(ec.complete_item(stubborn, [], 3, None, ["ohwx man", "red"], sleep=no_sleep)) == \
        "ohwx man, red, a man in"
    assert stubborn.calls == 1


def test_load_image_refuses_a_bomb_without_allocating(tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(ec.ItemError, match="decompression bomb"):
        ec.load_image(bomb)
    with pytest.raises(ec.ItemError, match="decompression bomb: 100x100 pixels"):
        ec.load_image(_small_png(tmp_path), max_pixels=9_999)


def _small_png(tmp_path):
    from PIL import Image

    path = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(path)
    return path


# --------------------------------------------------------------------------------------------
# Reduced-scale JPEG decoding
# --------------------------------------------------------------------------------------------


def _gradient_jpeg(path: Path, size: tuple[int, int], orientation: int | None = None) -> Path:
    from PIL import Image

    width, height = size
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(path, format="JPEG", quality=90, exif=exif.tobytes())
    assert (width, height) == Image.open(path).size
    return path


@pytest.mark.parametrize("size, expected", [
    ({"height": 768, "width": 768}, 768),
    ({"shortest_edge": 224}, 224),
    ({"longest_edge": 1456}, 1456),
    ({"shortest_edge": 378, "longest_edge": 980}, 980),
    ({"shortest_edge": 3136, "longest_edge": 12845056}, 12845056),  # Qwen-VL's pixel counts: never reduces
    ({"max_pixels": 1_000_000}, 0),   # a pixel budget: no side to keep, so decode in full
    ({"height": 384, "width": 384, "max_height": 512}, 0),
    ({}, 0),
    (384, 384),
])
def test_decode_side_is_the_largest_side_the_processor_resizes_to(size, expected):
    processor = types.SimpleNamespace(do_resize=True, size=size)
    assert ec.decode_side(processor) == expected


def test_decode_side_is_zero_when_the_processor_does_not_resize():
    assert ec.decode_side(types.SimpleNamespace(do_resize=False, size={"height": 32, "width": 32})) == 0
    assert ec.decode_side(types.SimpleNamespace(size={"height": 32, "width": 32})) == 0
    assert ec.decode_side(types.SimpleNamespace(do_resize=True)) == 0


@pytest.mark.parametrize("min_side, decoded", [(0, (1600, 1200)), (500, (800, 600)), (300, (400, 300)),
                                               (100, (200, 150)), (700, (1600, 1200)), (2000, (1600, 1200))])
def test_load_image_decodes_a_jpeg_no_smaller_than_min_side(tmp_path, min_side, decoded):
    img = ec.load_image(_gradient_jpeg(tmp_path / "big.jpg", (1600, 1200)), min_side=min_side)
    assert img.size == decoded
    assert min(img.size) >= min(min_side, 1200)
    assert img.info["full_size"] == (1600, 1200)
    assert img.mode == "RGB"


@pytest.mark.parametrize("orientation, full_size", [(1, (1600, 1200)), (3, (1600, 1200)), (6, (1200, 1600)),
                                                    (8, (1200, 1600))])
def test_load_image_keeps_the_upright_full_size_of_a_reduced_jpeg(tmp_path, orientation, full_size):
    img = ec.load_image(_gradient_jpeg(tmp_path / "r.jpg", (1600, 1200), orientation), min_side=200)
    assert img.info["full_size"] == full_size
    assert (img.width > img.height) == (full_size[0] > full_size[1])  # turned upright as well


def test_load_image_min_side_leaves_other_formats_whole(tmp_path):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("RGB", (640, 480), (10, 20, 30)).save(path)
    img = ec.load_image(path, min_side=32)
    assert img.size == img.info["full_size"] == (640, 480)


def test_inline_small_tensors_leaves_large_and_bfloat16_tensors_shared():
    import numpy as np
    import torch

    big = torch.zeros(ec.INLINE_TENSOR_BYTES // 4, dtype=torch.float32)
    inputs = {"input_ids": torch.arange(6).reshape(2, 3), "pixel_values": big,
              "small_bf16": torch.ones(2, dtype=torch.bfloat16), "sizes": [(4, 3), (3, 4)]}
    ec.inline_small_tensors(inputs)
    assert isinstance(inputs["input_ids"], np.ndarray) and inputs["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert inputs["pixel_values"] is big
    assert isinstance(inputs["small_bf16"], torch.Tensor)
    assert inputs["sizes"] == [(4, 3), (3, 4)]
