#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "torch",
#     "torchvision",
#     "transformers>=5.0",
#     "accelerate>=1.0",
#     "openai>=1.40",
#     "pillow>=10.0",
#     "tqdm",
#     "python-dotenv",
#     "num2words",
# ]
# ///
"""Turn a folder of images and hand-written captions into rich training captions.

For every image `photo.jpg` (with an optional manual caption `photo.txt` beside it):

    photo_generated.txt   what a vision-language model sees in the image
    photo_combined.txt    the manual and generated captions merged by an LLM

Both are caches: a rerun (after a crash, a Ctrl-C, or from cron) redoes only what is missing.

    accelerate launch enhance_captions.py --dataset_dir images/ \\
        --model_id florence-community/Florence-2-base --prompt "<MORE_DETAILED_CAPTION>" \\
        --base_url http://127.0.0.1:11434/v1/ --model llama3.1

Map of this file, top to bottom:
    constants and types        Config, Item, Failure, Stats
    pure functions             discovery, caches, images, prompts, reply cleaning, sharding
    rate limiter               sliding 60 s windows for requests and tokens, shared Retry-After pause
    chat backends              the OpenAI-compatible endpoint, and a local transformers LLM
    request with retries       complete_item(): where a reply is checked, cleaned and retried
    vision captioners          one local path chosen by the processor's capabilities, or a served model
    stages                     the vision loop, the async LLM stage, overlap or one after the other
    run()                      orchestration for one process
    CLI                        build_parser(), main()
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import contextvars
import dataclasses
import gc
import io
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

try:
    import fcntl
except ImportError:  # Windows: no dataset lock
    fcntl = None

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}
GENERATED_SUFFIX = "_generated.txt"
COMBINED_SUFFIX = "_combined.txt"
LOCK_NAME = ".enhance_captions.lock"
PAUSE_NAME = ".enhance_captions.{stage}.pause"  # a Retry-After pause, shared by the processes of a run
SCRIPT_DIR = Path(__file__).resolve().parent
DEFAULT_SYSTEM_PROMPT = SCRIPT_DIR / "system_prompt.txt"
DEFAULT_MODEL_ID = "florence-community/Florence-2-base"
DEFAULT_LOCAL_LLM = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_TASK_PROMPT = "<MORE_DETAILED_CAPTION>"
DEFAULT_CHAT_PROMPT = (
    "Describe this image in one detailed paragraph for a training caption: subject, clothing, pose, "
    "setting, lighting, colours, composition and style. State only what is visible."
)
# PIL's own decompression-bomb threshold; larger images are refused before their pixels are allocated.
MAX_IMAGE_PIXELS = 89_478_485
INLINE_TENSOR_BYTES = 1 << 20  # smaller tensors travel from the decoding workers inside the pickle
ORIENTATION_TAG = 0x0112  # EXIF: values 5-8 turn the image a quarter
WINDOW_SECONDS = 60.0
PREFLIGHT_TIMEOUT = 15.0

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_FOR_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}

STAGE_INPUT, STAGE_VISION, STAGE_LLM = "input", "vision", "llm"


class UsageError(Exception):
    """A configuration or usage problem: one line, exit 2."""


class FatalEndpointError(Exception):
    """The endpoint refuses every request (bad key, unknown model, wrong URL): stop the run, exit 2."""


class ItemError(Exception):
    """One item failed; the run goes on."""


class RetryableReply(ItemError):
    """A reply that came back broken (not JSON, no choices) or rate limited: worth asking again."""


class Stopped(BaseException):
    """The run is stopping (a signal, or a fatal error elsewhere): this item is left for the next run. A
    BaseException, like asyncio.CancelledError, so that no retry loop that catches Exception (older openai
    clients retry any exception a request hook raises) takes it for a fault to retry."""


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    dataset_dir: Path
    model_id: str = DEFAULT_MODEL_ID
    prompt: str | None = None
    revision: str = "main"
    trust_remote_code: bool = False
    system_prompt: str = ""
    vlm_system_prompt: str | None = None
    base_url: str | None = None
    model: str = "llama-3.3-70b-versatile"
    api_key: str | None = None
    local_llm: str | None = None
    vlm_base_url: str | None = None
    vlm_model: str | None = None
    vlm_max_side: int = 1024
    vlm_rpm: float = 0
    cache_generated: bool = True
    caption_extension: str = ".txt"
    rpm: float = 0
    tpm: float = 0
    concurrency: int = 16
    batch_size: int = 8
    num_workers: int = 2
    overlap: bool = False
    max_new_tokens: int = 256
    max_tokens: int = 512
    temperature: float = 0.3
    repetition_penalty: float | None = None
    dtype: str = "auto"
    attn_implementation: str | None = None
    device_map: str | None = None
    quantization: str | None = None
    max_retries: int = 5
    timeout: float = 120.0
    keep_tokens: int = 0
    limit: int | None = None
    overwrite: str | None = None
    dry_run: bool = False
    export: str | None = None
    report: Path | None = None
    verbosity: int = 1  # 0 quiet, 1 normal, 2 verbose


@dataclasses.dataclass
class Item:
    """One image and what is known about it so far."""

    image: Path
    caption_path: Path
    generated: str | None = None
    combined: str | None = None

    @property
    def base(self) -> Path:
        return self.image.with_suffix("")

    @property
    def generated_path(self) -> Path:
        return self.base.parent / (self.base.name + GENERATED_SUFFIX)

    @property
    def combined_path(self) -> Path:
        return self.base.parent / (self.base.name + COMBINED_SUFFIX)


@dataclasses.dataclass(frozen=True)
class Failure:
    path: str
    stage: str
    error: str


@dataclasses.dataclass
class Stats:
    """A run's counts and failures. The event-loop thread, the writer thread and the main thread all change them,
    so every change goes through count(), fail() or merge(), under one lock."""

    counts: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: {s: collections.Counter() for s in (STAGE_VISION, STAGE_LLM)}
    )
    failures: list[Failure] = dataclasses.field(default_factory=list)
    fatal: str | None = None
    signal: int | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, stage: str, what: str = "done") -> None:
        with self.lock:
            self.counts[stage][what] += 1

    def fail(self, path: Path | str, stage: str, error: str) -> None:
        with self.lock:
            self.failures.append(Failure(str(path), stage, error))
            if stage in self.counts:
                self.counts[stage]["failed"] += 1

    def merge(self, other: Stats) -> None:
        with self.lock:
            for stage, counter in other.counts.items():
                self.counts[stage].update(counter)
            self.failures.extend(other.failures)
            self.fatal = self.fatal or other.fatal
            self.signal = self.signal or other.signal

    def __getstate__(self) -> dict:  # gather_object pickles Stats between processes; a lock does not pickle
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock())

    def exit_code(self) -> int:
        if self.fatal:
            return EXIT_USAGE
        if self.signal:
            return EXIT_FOR_SIGNAL.get(self.signal, 128 + self.signal)
        return EXIT_FAILED if self.failures else EXIT_OK


# --------------------------------------------------------------------------------------------
# Pure functions: discovery, caches, images, prompts, reply cleaning, sharding
# --------------------------------------------------------------------------------------------


def is_hidden(name: str) -> bool:
    return name.startswith(".")  # also AppleDouble "._x.jpg" and our own temporary files


STALE_TEMPORARY = re.compile(r"^\..+(?:_generated|_combined)\.txt\.[a-z0-9_]+\.tmp$")


def walk_images(root: Path, stale: list[Path] | None = None) -> tuple[list[Path], list[Failure]]:
    """All images under root, sorted; follows directory symlinks but reports loops instead of hanging.
    Temporary cache files that a killed run left behind are collected into `stale`."""
    found, problems, seen = [], [], set()

    def visit(folder: Path) -> None:
        real = folder.resolve()
        if real in seen:
            problems.append(Failure(str(folder), STAGE_INPUT, "symlink loop (folder already visited), skipped"))
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append(Failure(str(folder), STAGE_INPUT, f"cannot list folder: {e.strerror or e}"))
            return
        for entry in entries:
            if is_hidden(entry.name):
                if stale is not None and STALE_TEMPORARY.match(entry.name):
                    stale.append(Path(entry.path))
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    visit(path)
                elif path.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(path)
            except OSError as e:
                problems.append(Failure(str(path), STAGE_INPUT, f"cannot read: {e.strerror or e}"))

    visit(root)
    return sorted(found), problems


def pair_items(images: Sequence[Path], caption_extension: str) -> tuple[list[Item], list[Failure]]:
    """One Item per image; images whose caches or captions would collide are reported, not processed."""
    items = [Item(image=p, caption_path=p.with_suffix(caption_extension)) for p in images]
    by_base = collections.defaultdict(list)
    for item in items:
        by_base[item.base].append(item)
    outputs = {item.generated_path: item for item in items} | {item.combined_path: item for item in items}
    bad: dict[Path, str] = {}
    for group in by_base.values():
        if len(group) > 1:
            names = ", ".join(i.image.name for i in group)
            for item in group:
                bad[item.image] = f"shares its stem with another image ({names}): their caches would collide; rename one"
    for item in items:
        other = outputs.get(item.caption_path)
        if other is not None and other is not item:
            for clash in (item, other):
                bad[clash.image] = (
                    f"{item.image.name}'s caption file {item.caption_path.name} is also "
                    f"{other.image.name}'s cache file; rename one"
                )
    failures = [Failure(str(p), STAGE_INPUT, why) for p, why in sorted(bad.items())]
    return [i for i in items if i.image not in bad], failures


def read_text(path: Path) -> str | None:
    """A UTF-8 text file (BOM allowed), stripped; None when missing or blank. Raises ItemError if undecodable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ItemError(f"cannot read {path.name}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ItemError(f"{path.name} is not valid UTF-8 (byte {e.start}); re-save it as UTF-8") from e
    return text or None


def read_cache(path: Path) -> str | None:
    """A cache is reused as is when non-empty; an empty, blank or unreadable one counts as missing."""
    try:
        return read_text(path)
    except ItemError:
        return None


def atomic_write(path: Path, text: str) -> None:
    """Write via a hidden temporary file in the same folder and rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text.strip() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 0):
    """Open one image as upright RGB, or raise ItemError with a reason a person can act on.

    With min_side, a JPEG is decoded at 1/2, 1/4 or 1/8 scale as long as both sides stay at least min_side
    (the DCT does the downscaling, several times cheaper than decoding in full and resizing). The upright size
    of the full image is kept in img.info["full_size"] for processors that map coordinates back to it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size  # header only: a bomb is refused before its pixels exist
            if width * height > max_pixels:
                raise ItemError(f"refused as a decompression bomb: {width}x{height} pixels, over the {max_pixels:,} limit")
            if min_side:
                img.draft(None, (min_side, min_side))  # a no-op for formats other than JPEG
            img.load()
            quarter_turn = img.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8)  # what exif_transpose will do
            upright = to_rgb(ImageOps.exif_transpose(img))
    except ItemError:
        raise
    except Image.DecompressionBombError as e:
        raise ItemError(f"refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        size = path.stat().st_size if path.exists() else 0
        raise ItemError("empty file (0 bytes)" if size == 0 else "not an image PIL can read") from e
    except (OSError, SyntaxError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ItemError(f"cannot decode image: {reason}") from e
    upright.info["full_size"] = (height, width) if quarter_turn else (width, height)
    return upright


def to_rgb(img):
    """RGB for any mode: 16-bit scaled down, transparency composited on white, CMYK converted."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def image_data_url(path: Path, max_side: int) -> str:
    """A JPEG data URL of the image, its longest side at most max_side, for served vision models."""
    img = load_image(path, min_side=max_side)
    img.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_user_message(manual: str | None, generated: str) -> str:
    """The LLM's user turn: each caption once, clearly labelled; says so when there is no manual caption."""
    parts = []
    if manual:
        parts.append(f"Manual caption (written by a person; keep every fact, name and trigger word):\n{manual}")
    else:
        parts.append("There is no manual caption for this image; write the caption from the generated one.")
    parts.append(f"Generated caption (from a vision model; use it for visual detail):\n{generated}")
    return "\n\n".join(parts)


def keep_token_parts(manual: str | None, keep_tokens: int) -> list[str]:
    """The first N comma-separated parts of the manual caption: trigger words and names that must survive.
    As in kohya's keep_tokens, a caption without a comma is one part, and one with fewer parts keeps them all."""
    if not manual or keep_tokens <= 0:
        return []
    parts = [p.strip() for p in manual.split(",")]
    return [p for p in parts if p][:keep_tokens]


def keep_tokens_first(text: str, parts: Sequence[str]) -> str:
    """--keep_tokens by construction, not by asking the LLM: the kept parts first, verbatim, in order, joined by
    ", ", each exactly once; then the reply with every copy of them (any case, on word boundaries) taken out."""
    if not parts:
        return text
    rest = text
    for part in sorted(parts, key=len, reverse=True):  # "ohwx man" before "ohwx": no half of a copy is left
        core = part.rstrip(".!?;: ")  # a last part "red shirt." also matches "red shirt" inside a sentence
        if re.search(r"\w", core):
            words = r"\s+".join(re.escape(w) for w in core.split())
            rest = re.sub(rf"(?<!\w){words}(?:['\u2019]s)?(?!\w)", "", rest, flags=re.IGNORECASE)
    rest = tidy_after_removal(rest)
    head = ", ".join(parts)
    if not rest:
        return head
    return head + (" " if head[-1] in ".!?;:" else ", ") + rest


def tidy_after_removal(text: str) -> str:
    """The punctuation a removed phrase leaves behind: empty brackets, doubled commas, a space before a comma,
    commas or a full stop at the start."""
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"[,;:]+(?=[.!?])", "", text)
    text = re.sub(r"([.!?])\s*[,;:]+", r"\1", text)
    return re.sub(r"^[\s,;:.!?]+|[\s,;:]+$", "", text)


THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
CODE_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```$", re.DOTALL)
# What a model says before the caption, as a closed list of fixed phrasings ("Sure! Here's the merged caption:",
# "**Final caption:**", "Caption:"). Never a pattern such as "this is ...:", which ate "This is ohwx woman:".
PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|okay|ok|of course|absolutely)\s*[,!.]?\s*)?(?:\*\*)?"
    r"(?:(?:here(?:['\u2019]s| is)|below is)\s+)?(?:(?:the|your|my|a)\s+)?"
    r"(?:(?:combined|merged|final|enhanced|improved|refined|rewritten|new)\s+)?caption"
    r"(?:\s+for\s+(?:the|this)\s+image)?(?:\*\*)?\s*:(?:\*\*)?\s*",
    re.IGNORECASE,
)
QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u201e": "\u201c", "\u00ab": "\u00bb"}
# Words a preamble shares with any caption; another shared word means the opening may be the caption itself.
STOP_WORDS = frozenset("a an the is are of for this that here my your and or in on at with to s".split())
APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry,?\s+(?:but\s+)?i\b|i'?m unable to|i am unable to|i'?m not able to"
    r"|i am not able to|as an ai\b|i (?:can'?t|cannot|can not|won'?t|will not)\s+"
    r"(?:help|assist|provide|create|generate|describe|caption|write|comply|fulfil|do|process|produce|make|"
    r"complete|identify|view|see|analy[sz]e|support|share|continue|engage))",
    re.IGNORECASE,
)


def clean_reply(text: str | None, manual: str | None = None) -> str:
    """Strip what is certainly not caption text: reasoning, a known preamble, fences, wrapping quotes; collapse it
    to one paragraph. A candidate preamble that shares a word with the manual caption stays: it is caption text."""
    text = text or ""
    lowered = text.lower()
    if "</think>" in lowered and "<think>" not in lowered:  # some reasoning servers drop the opening tag
        text = text[lowered.rindex("</think>") + len("</think>"):]
    text = THINK_BLOCK.sub("", text).strip()
    previous = None
    while text != previous:  # wrappers nest in any order: a preamble before a fence, quotes inside it
        previous = text
        fenced = CODE_FENCE.match(text)
        if fenced:
            text = fenced.group(1).strip()
        preamble = PREAMBLE.match(text)
        if preamble and not content_words(preamble.group(0)) & content_words(manual or ""):
            text = text[preamble.end():].strip()
        text = unwrap_quotes(text)
    return " ".join(text.split())


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[^\W_]+", text.translate(APOSTROPHES).lower())} - STOP_WORDS


def unwrap_quotes(text: str) -> str:
    """The text inside one pair of wrapping quotes; a caption that only quotes something inside stays whole."""
    closing = QUOTES.get(text[:1])
    if len(text) >= 2 and text[-1] == closing and closing not in text[1:-1]:
        return text[1:-1].strip()
    return text


def reply_problem(text: str, finish_reason: str | None) -> str | None:
    """Why a cleaned reply must not be cached, or None when it is fine."""
    if finish_reason == "length":
        return "reply cut off at --max_tokens (finish_reason=length)"
    if not re.search(r"\w", text):
        return "empty reply"
    if REFUSAL.match(unwrap_quotes(text.strip()).translate(APOSTROPHES)):
        return f"refusal: {text[:60]!r}"
    return None


def estimate_tokens(text: str) -> int:
    return len(text) // 4 + 1


def process_share(total: int, index: int, count: int) -> int:
    """This process's whole-number share of a per-run budget; the shares add up to the total exactly."""
    return total // count + (1 if index < total % count else 0)


def first_line(error: Exception) -> str:
    """Library errors can run to pages (download hints, tracebacks): one line is enough for a person."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def redact(text: str, secret: str | None) -> str:
    text = re.sub(r"(https?://)[^/@\s]+@", r"\1***@", text)  # credentials inside a URL
    return text.replace(secret, "***") if secret else text


# --------------------------------------------------------------------------------------------
# Rate limiter
# --------------------------------------------------------------------------------------------


class SharedPause:
    """A Retry-After pause that every process of a run honours: the wall-clock time it ends, in a small hidden
    file in the dataset folder, which all the processes share already (next to the lock). Each request costs a
    stat; the file is read only when it has changed. Two machines' clocks may differ a little, and so may their
    pauses."""

    def __init__(self, path: Path, wall=time.time):
        self.path, self.wall = path, wall
        self.until, self.seen = 0.0, None

    def publish(self, seconds: float) -> None:
        until = self.wall() + seconds
        if until > self.current():
            with contextlib.suppress(OSError):  # a folder that refuses it leaves the pause to this process
                self.path.write_text(f"{until:.3f}\n", encoding="utf-8")
            self.until = until

    def current(self) -> float:
        try:
            stat = self.path.stat()
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if seen != self.seen:
                self.until, self.seen = max(self.until, float(self.path.read_text(encoding="utf-8"))), seen
        except (OSError, ValueError):  # none yet, or caught half-written: read again next time
            pass
        return self.until

    def remaining(self) -> float:
        return self.current() - self.wall()


class RateLimiter:
    """At most `requests` requests and `tokens` tokens in any 60 s window, plus a shared pause.

    Sits on the HTTP layer, so the openai client's own retries are counted too. A 429 with
    Retry-After pauses every request of the run, not only the one that got it: those of this process here,
    those of the other processes through `shared`. Waits, never fails.
    """

    def __init__(self, requests: int = 0, tokens: int = 0, clock=time.monotonic, sleep=None,
                 shared: SharedPause | None = None):
        self.requests, self.tokens = requests, tokens
        self.clock, self.sleep = clock, sleep or asyncio.sleep
        self.sent: collections.deque[list] = collections.deque()  # [time, tokens] per request
        self.paused_until = 0.0
        self.shared = shared

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + seconds)
        if self.shared is not None:
            self.shared.publish(seconds)

    def _wait(self, now: float, tokens: int) -> float:
        while self.sent and self.sent[0][0] <= now - WINDOW_SECONDS:
            self.sent.popleft()
        waits = [self.paused_until - now]
        if self.shared is not None:
            waits.append(self.shared.remaining())
        if self.requests and len(self.sent) >= self.requests:
            waits.append(self.sent[-self.requests][0] + WINDOW_SECONDS - now)
        if self.tokens and self.sent:
            used, excess = sum(t for _, t in self.sent), 0
            excess = used + tokens - self.tokens
            for when, spent in self.sent:  # wait until enough old tokens leave the window
                if excess <= 0:
                    break
                excess -= spent
                waits.append(when + WINDOW_SECONDS - now)
        return max(waits)

    async def acquire(self, tokens: int = 0) -> list:
        while True:
            now = self.clock()
            wait = self._wait(now, tokens)
            if wait <= 0:
                entry = [now, tokens]
                self.sent.append(entry)
                return entry
            await self.sleep(wait)


# --------------------------------------------------------------------------------------------
# Chat backends: an OpenAI-compatible endpoint, or a local transformers LLM
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None


@dataclasses.dataclass
class Attempts:
    """One item's request budget: --max_retries + 1 requests in all, the openai client's own retries included.
    complete_item() puts it in ATTEMPTS for its task; the request hook counts every request that goes out."""

    left: int
    stopping: asyncio.Event
    in_flight: bool = False  # a request is on the wire and its reply is worth waiting for when stopping


ATTEMPTS: contextvars.ContextVar[Attempts | None] = contextvars.ContextVar("attempts", default=None)


def count_request() -> None:
    """A request goes out for this task's item: one attempt spent, and its reply is awaited even when stopping."""
    attempts = ATTEMPTS.get()
    if attempts is not None:
        attempts.left -= 1
        attempts.in_flight = True


class EndpointChat:
    """chat.completions on an OpenAI-compatible endpoint; the limiter sees every HTTP request."""

    def __init__(self, base_url: str | None, api_key: str | None, model: str, limiter: RateLimiter,
                 max_retries: int, timeout: float, max_tokens: int, temperature: float):
        import openai

        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.limiter, self.api_key = limiter, api_key
        self.openai = openai
        http = openai.DefaultAsyncHttpxClient(
            event_hooks={"request": [self._before_request], "response": [self._after_response]}
        )
        # A local server needs no key, but the client insists on one.
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "not-needed",
                                         max_retries=max_retries, timeout=timeout, http_client=http)

    async def _before_request(self, request) -> None:
        if request.method != "POST":
            return
        attempts = ATTEMPTS.get()
        if attempts is not None and attempts.stopping.is_set():
            raise Stopped  # the openai client may be about to retry: once stopping, nothing new is sent
        try:
            body = json.loads(request.content or b"{}")
        except ValueError:
            body = {}
        estimate = estimate_tokens(request.content.decode("utf-8", "replace")) + int(body.get("max_tokens") or 0)
        request.extensions["limiter_entry"] = await self.limiter.acquire(estimate)
        if attempts is not None and attempts.stopping.is_set():
            raise Stopped  # the limiter's wait ended just as the stop came
        count_request()

    async def _after_response(self, response) -> None:
        entry = response.request.extensions.get("limiter_entry")
        retry_after = response.headers.get("retry-after")
        if response.status_code in (429, 503) and retry_after:
            with contextlib.suppress(ValueError):
                self.limiter.pause(min(float(retry_after), 600.0))
        attempts = ATTEMPTS.get()
        if attempts is not None and response.status_code >= 400:
            attempts.in_flight = False  # the client may now sleep and retry: nothing here is worth waiting for
            if attempts.stopping.is_set():
                raise Stopped
        if entry is not None and self.limiter.tokens and response.status_code == 200:
            await response.aread()
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                entry[1] = int(json.loads(response.content)["usage"]["total_tokens"])

    async def check(self) -> None:
        """Fail fast, before any model loads, on an endpoint that is down or refuses the key."""
        try:
            await self.client.with_options(max_retries=1, timeout=PREFLIGHT_TIMEOUT).models.list()
        except (self.openai.AuthenticationError, self.openai.PermissionDeniedError) as e:
            raise FatalEndpointError(self._explain(e)) from e
        except self.openai.APIConnectionError as e:
            raise FatalEndpointError(f"cannot reach the endpoint {redact(str(self.client.base_url), self.api_key)}: "
                                     f"{type(e).__name__}; is the server running and --base_url right?") from e
        except self.openai.APIError:
            pass  # the endpoint answers; some servers do not list models

    def _explain(self, e: Exception) -> str:
        url = redact(str(self.client.base_url), self.api_key)
        status = getattr(e, "status_code", None)
        if status == 401:
            return f"the endpoint {url} rejected the API key (401); check OPENAI_API_KEY"
        if status == 403:
            return f"the endpoint {url} refused access (403); check OPENAI_API_KEY and its permissions"
        if status == 404:
            return f"the endpoint {url} answered 404 for model {self.model!r}: unknown model or wrong --base_url"
        return f"the endpoint {url} failed: {redact(str(e), self.api_key)}"

    async def complete(self, messages: list[dict]) -> Reply:
        o = self.openai
        attempts = ATTEMPTS.get()
        # The client's transport retries come out of the item's budget: it may retry as often as attempts are left.
        client = self.client if attempts is None else self.client.with_options(max_retries=max(attempts.left - 1, 0))
        try:
            response = await client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=self.temperature)
        except (o.AuthenticationError, o.PermissionDeniedError, o.NotFoundError) as e:
            raise FatalEndpointError(self._explain(e)) from e
        except o.RateLimitError as e:  # the client gives up at once on a long Retry-After; the limiter waits it out
            raise RetryableReply(f"rate limited (429): {redact(e.message, self.api_key)[:200]}") from e
        except o.APIStatusError as e:
            raise ItemError(f"endpoint answered {e.status_code}: {redact(e.message, self.api_key)[:200]}") from e
        except o.APITimeoutError as e:
            raise ItemError("request timed out (--timeout)") from e
        except o.APIConnectionError as e:
            raise ItemError(f"connection failed: {redact(str(e), self.api_key)[:200]}") from e
        except (o.APIResponseValidationError, ValueError) as e:
            raise RetryableReply(f"invalid reply from the endpoint: {type(e).__name__}") from e
        if not getattr(response, "choices", None):
            raise RetryableReply("reply has no choices")
        choice = response.choices[0]
        return Reply(choice.message.content or "", choice.finish_reason)

    async def close(self) -> None:
        await self.client.close()


class LocalChat:
    """A transformers causal LM in this process; concurrent requests are gathered into batches."""

    def __init__(self, model_id: str, device, dtype, batch_size: int, max_tokens: int, temperature: float,
                 revision: str = "main", trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        common = {"revision": revision, "trust_remote_code": trust_remote_code}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_id, **common)
            self.model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **common).to(device).eval()
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load --local_llm {model_id}: {first_line(e)}") from e
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device, self.batch_size = device, batch_size
        self.max_tokens, self.temperature = max_tokens, temperature
        self.queue: list[tuple[list[dict], asyncio.Future]] = []
        self.busy = False

    async def complete(self, messages: list[dict]) -> Reply:
        count_request()  # queued for a batch is in flight: a generation cannot be called back halfway
        future = asyncio.get_running_loop().create_future()
        self.queue.append((messages, future))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.queue:
                if len(self.queue) < self.batch_size:
                    await asyncio.sleep(0.02)  # let the other workers queue their requests into this batch
                batch, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size:]
                try:
                    replies = await loop.run_in_executor(None, self._generate, [m for m, _ in batch])
                except Exception as e:  # one broken batch fails its items, not the run
                    for _, future in batch:
                        future.set_exception(ItemError(f"local LLM failed: {e}"))
                    continue
                for (_, future), reply in zip(batch, replies):
                    future.set_result(reply)
        finally:
            self.busy = False

    def _generate(self, conversations: list[list[dict]]) -> list[Reply]:
        import torch

        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = self.temperature > 0
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=sample,
                                      temperature=self.temperature if sample else None,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        replies = []
        for row in new.tolist():
            stopped = any(t in eos for t in row)
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            replies.append(Reply(text, "stop" if stopped or len(row) < self.max_tokens else "length"))
        return replies

    async def check(self) -> None:
        pass

    async def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# One request with retries: where a reply is checked, cleaned and asked again
# --------------------------------------------------------------------------------------------


async def complete_item(backend, messages: list[dict], max_retries: int, manual: str | None = None,
                        must_keep: Sequence[str] = (), *, stopping: asyncio.Event | None = None,
                        sleep=asyncio.sleep) -> str:
    """Ask until the reply is usable, in at most max_retries + 1 requests in all. The openai client retries
    transport faults (5xx, resets, timeouts) with its own backoff; here bad replies (broken, empty, refused, cut
    off) are asked again; the request hook counts both against one budget (Attempts). The kept tokens are put
    first by construction. Raises Stopped once `stopping` is set, and sends nothing after it."""
    attempts = Attempts(max_retries + 1, stopping or asyncio.Event())
    token = ATTEMPTS.set(attempts)
    try:
        problem = "no attempt made"
        while attempts.left > 0:
            if attempts.left <= max_retries:  # asked before: back off
                used = max_retries + 1 - attempts.left
                await unless_stopped(sleep(min(30.0, 0.5 * 2 ** (used - 1)) * (0.5 + random.random())), attempts)
            before = attempts.left
            try:
                reply = await unless_stopped(backend.complete(messages), attempts)
            except RetryableReply as e:
                problem = str(e)
                continue
            finally:
                attempts.in_flight = False
                if attempts.left == before:  # a backend that counts no requests (a test double): one call, one try
                    attempts.left -= 1
            text = clean_reply(reply.text, manual)
            problem = reply_problem(text, reply.finish_reason)
            if not problem:
                return keep_tokens_first(text, must_keep)
    finally:
        ATTEMPTS.reset(token)
    raise ItemError(f"{problem} (after {max_retries + 1} attempts)")


async def unless_stopped(awaitable, attempts: Attempts):
    """Await `awaitable` unless the run stops first: then cancel it, which wakes a wait in the rate limiter or in
    the openai client's retry sleep at once, and raise Stopped. A request on the wire (attempts.in_flight) is let
    finish: its reply is saved, and the response hook raises Stopped for a failed one before any retry."""
    task = asyncio.ensure_future(awaitable)
    stop = asyncio.ensure_future(attempts.stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        stop.cancel()
    if not task.done() and not attempts.in_flight:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Stopped, Exception):
            await task
        raise Stopped
    return await task


# --------------------------------------------------------------------------------------------
# Vision captioners: one local path chosen by the processor's capabilities, or a served model
# --------------------------------------------------------------------------------------------


def decode_side(image_processor) -> int:
    """The side both of an image's sides may be decoded down to without losing what the processor keeps: the
    largest side its resize aims at (height/width, shortest_edge, longest_edge), or 0 (decode in full) when it
    does not resize or sizes by anything else (maximum heights, pixel budgets) whose meaning we cannot bound.
    Qwen-VL keeps pixel counts under shortest_edge/longest_edge: read as sides they are only larger, so safe."""
    size = getattr(image_processor, "size", None)
    if not getattr(image_processor, "do_resize", False) or size is None:
        return 0
    if isinstance(size, int):
        return size
    values = dict(size)  # a dict or a SizeDict (which yields only the keys that are set)
    sides = {key: values.pop(key) for key in ("height", "width", "shortest_edge", "longest_edge") if key in values}
    if values or not sides or not all(isinstance(v, int) for v in sides.values()):
        return 0
    return max(sides.values())


class LocalCaptioner:
    """A transformers image-to-text model. `prepare` runs in DataLoader workers, `caption` on the device.

    How a batch is built and decoded depends only on what the processor offers:
      post_process_generation -> task-token model (Florence-2): prompt as text, processor's post-processing
      chat_template           -> chat model (Qwen-VL, SmolVLM, LLaVA, Janus, ...): a chat turn, new tokens only
      otherwise               -> plain captioner (BLIP): image (and optional prompt prefix) in, text out
    """

    KINDS = "task-token models (Florence-2), chat-template vision models (Qwen-VL, SmolVLM, LLaVA, Janus, ...) " \
            "and plain image captioners (BLIP)"

    def __init__(self, processor, model, prompt: str | None, system_prompt: str | None, generate_kwargs: dict):
        self.processor, self.model = processor, model
        self.kind = self.kind_of(processor)
        self.decode_side = decode_side(processor.image_processor)
        self.prompt = prompt if prompt is not None else self.default_prompt(self.kind)
        self.system_prompt = system_prompt
        self.generate_kwargs = generate_kwargs
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and not getattr(model.config, "is_encoder_decoder", False):
            tokenizer.padding_side = "left"  # decoder-only: pad on the left so batching keeps captions equal

    @staticmethod
    def kind_of(processor) -> str:
        if getattr(processor, "image_processor", None) is None:  # a text-only tokenizer can have a chat template
            raise UsageError(f"{type(processor).__name__} takes no images; supported: {LocalCaptioner.KINDS}")
        if callable(getattr(processor, "post_process_generation", None)):
            return "task"
        if getattr(processor, "chat_template", None):
            return "chat"
        if getattr(processor, "tokenizer", None) is not None:
            return "plain"
        raise UsageError(f"{type(processor).__name__} fits no supported kind; supported: {LocalCaptioner.KINDS}")

    @staticmethod
    def default_prompt(kind: str) -> str:
        return {"task": DEFAULT_TASK_PROMPT, "chat": DEFAULT_CHAT_PROMPT, "plain": ""}[kind]

    def prepare(self, images: list) -> Any:
        if self.kind == "task":
            inputs = self.processor(text=[self.prompt] * len(images), images=images, return_tensors="pt")
        elif self.kind == "chat":
            inputs = self.processor.apply_chat_template(
                [self.conversation(img) for img in images], add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
        else:
            # Always pass text, even empty: processors that insert image tokens into it (PaliGemma) need it.
            inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt",
                                    padding=True)
        return inputs, [img.info.get("full_size", img.size) for img in images]

    def conversation(self, image) -> list[dict]:
        turns = []
        if self.system_prompt:
            turns.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        turns.append({"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": self.prompt}]})
        return turns

    def to_model(self, inputs):
        """Inputs on the model's device; pixel values in its dtype, ids stay integers."""
        import numpy as np
        import torch

        for key, value in inputs.items():
            if isinstance(value, np.ndarray):  # a small tensor handed over inline (inline_small_tensors)
                value = torch.from_numpy(value)
            if isinstance(value, torch.Tensor):
                inputs[key] = value.to(self.model.device, self.model.dtype if value.is_floating_point() else None)
        return inputs

    def caption(self, prepared) -> list[str]:
        import torch

        inputs, sizes = prepared
        inputs = self.to_model(inputs)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generate_kwargs)
        if self.kind == "task":  # location tokens matter to the post-processing; padding does not
            texts = self.processor.batch_decode(out, skip_special_tokens=False)
            pad = getattr(self.processor.tokenizer, "pad_token", None)
            texts = [t.replace(pad, "") if pad else t for t in texts]
            return [self.processor.post_process_generation(t, task=self.prompt, image_size=s)[self.prompt]
                    for t, s in zip(texts, sizes)]
        if self.kind == "chat" and not self.model.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]  # decoder-only models return the prompt too
        # plain captioners (BLIP) echo a prompt with their own token edits: strip_prompt removes it as text
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [self.strip_prompt(t) for t in texts]

    def strip_prompt(self, text: str) -> str:
        text = text.strip()
        if self.kind == "plain" and self.prompt and text.lower().startswith(self.prompt.lower()):
            text = text[len(self.prompt):]  # BLIP echoes a conditional prompt
        return text.strip()


def quiet_transformers(verbosity: int) -> None:
    """transformers' warnings only with -v; its loading bars only on a terminal."""
    from transformers.utils import logging as hf_logging

    if verbosity < 2:
        hf_logging.set_verbosity_error()
    if verbosity < 1 or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def resolve_dtype(name: str, device):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if getattr(device, "type", str(device)) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_captioner(cfg: Config, device) -> LocalCaptioner:
    """The model loader: processor and model by path or Hub id, with one clear line for what is missing."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    quiet_transformers(cfg.verbosity)
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(cfg.model_id, **common)
    except ImportError as e:
        if "torchvision" in str(e).lower():
            raise UsageError(f"{cfg.model_id}'s processor needs torchvision: pip install torchvision") from e
        raise UsageError(f"cannot load the processor of {cfg.model_id}: {e}") from e
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the processor of {cfg.model_id}: {first_line(e)}") from e
    LocalCaptioner.kind_of(processor)  # fail before the weights load

    dtype = resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = dict(common, dtype=dtype)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    if cfg.quantization:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UsageError(f"--quantization {cfg.quantization} needs bitsandbytes: pip install bitsandbytes") from e
        bits = {"load_in_4bit": True} if cfg.quantization == "4bit" else {"load_in_8bit": True}
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(**bits, bnb_4bit_compute_dtype=dtype)
        kwargs.setdefault("device_map", {"": device})
    model = None
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):  # remote-code models may register only the latter
        try:
            model = auto.from_pretrained(cfg.model_id, **kwargs)
            break
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise UsageError(f"cannot load {cfg.model_id}: {first_line(e)}") from e
        except OSError as e:
            raise UsageError(f"cannot load {cfg.model_id}: {first_line(e)}") from e
    if model is None:
        raise UsageError(f"{cfg.model_id} is not an image-to-text model; supported: {LocalCaptioner.KINDS}")
    if "device_map" not in kwargs:
        model = model.to(device)
    model.eval()

    generate_kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": False}
    if cfg.repetition_penalty:
        generate_kwargs["repetition_penalty"] = cfg.repetition_penalty
    return LocalCaptioner(processor, model, cfg.prompt, cfg.vlm_system_prompt, generate_kwargs)


def release_memory() -> None:
    """Give the GPU memory of dropped models back before the next model or server needs it."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ImageFolder:
    """A torch Dataset of items: each read returns (position, image or None, error or None)."""

    def __init__(self, items: Sequence[Item], min_side: int = 0):
        self.items, self.min_side = items, min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            return index, load_image(self.items[index].image, min_side=self.min_side), None
        except ItemError as e:
            return index, None, str(e)


def worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # the workers decode; leave the cores to the model
    for signum in EXIT_FOR_SIGNAL:  # Ctrl-C reaches the whole process group: the main process decides
        signal.signal(signum, signal.SIG_IGN)


def make_collate(captioner: LocalCaptioner):
    def collate(batch):
        good = [(i, img) for i, img, _ in batch if img is not None]
        errors = [(i, err) for i, _, err in batch if err is not None]
        try:
            prepared = captioner.prepare([img for _, img in good]) if good else None
        except Exception:  # an image the processor refuses (Qwen-VL: aspect ratio over 200) must not sink its batch
            good, refused = refuse_one_by_one(captioner, good)
            errors += refused
            prepared = captioner.prepare([img for _, img in good]) if good else None
        if prepared is not None:
            inline_small_tensors(prepared[0])
        return [i for i, _ in good], prepared, errors
    return collate


def inline_small_tensors(inputs) -> None:
    """Let a worker hand over small tensors (token ids, masks, small pixel arrays) as numpy arrays inside its
    pickle. torch gives every tensor its own shared-memory segment, and fetching a segment's descriptor from the
    worker is an authenticated socket round trip. On 2 CPU cores (tiny Florence-2, batch 8) the main process
    waited a median 4.1 ms per batch for three tensors, 1.0 ms with them inline. Large pixel arrays still go
    through shared memory, where one round trip is cheap beside copying them."""
    import torch

    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.nbytes < INLINE_TENSOR_BYTES and value.dtype != torch.bfloat16:
            inputs[key] = value.numpy()  # numpy has no bfloat16


def refuse_one_by_one(captioner: LocalCaptioner, good: list) -> tuple[list, list]:
    """Split a batch the processor failed on into the images it takes alone and the errors of the rest."""
    kept, refused = [], []
    for index, img in good:
        try:
            captioner.prepare([img])
            kept.append((index, img))
        except Exception as e:
            width, height = img.info.get("full_size", img.size)
            refused.append((index, f"the processor refused the {width}x{height} image: {type(e).__name__}: "
                                   f"{first_line(e)}"))
    return kept, refused


# --------------------------------------------------------------------------------------------
# Progress and messages: one reporter prints
# --------------------------------------------------------------------------------------------


class Reporter:
    """Prints on the main process; bars on a terminal, a line every few seconds elsewhere (cron, CI, tee)."""

    def __init__(self, verbosity: int, is_main: bool, stream=None):
        self.verbosity, self.is_main = verbosity, is_main
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.lock = threading.Lock()

    def info(self, message: str) -> None:
        if self.is_main and self.verbosity >= 1:
            self._write(message)

    def detail(self, message: str) -> None:
        if self.verbosity >= 2:
            self._write(message)

    def warn(self, message: str) -> None:
        self._write(message)

    def _write(self, message: str) -> None:
        from tqdm import tqdm

        with self.lock:
            tqdm.write(message, file=self.stream)

    def progress(self, name: str, total: int) -> Progress:
        return Progress(self, name, total, enabled=self.is_main and self.verbosity >= 1 and total > 0)


class Progress:
    def __init__(self, reporter: Reporter, name: str, total: int, enabled: bool, every: float = 5.0):
        self.reporter, self.name, self.total, self.enabled, self.every = reporter, name, total, enabled, every
        self.done, self.start, self.last = 0, time.monotonic(), time.monotonic()
        self.lock = threading.Lock()
        self.bar = None
        if enabled and reporter.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=name, unit="img", file=reporter.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            elif time.monotonic() - self.last >= self.every or self.done == self.total:
                self.last = time.monotonic()
                self.reporter._write(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        return f"{self.name}: {self.done}/{self.total} ({rate:.2f}/s, ETA {eta_text})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


class AsyncStage:
    """Bounded concurrent workers on an event loop thread; any thread can submit items.

    `handle(item)` does one item and raises ItemError to fail it; FatalEndpointError stops the stage.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, concurrency: int,
                 handle: Callable[[Item], Any], stats: Stats, progress: Progress, stop: threading.Event):
        self.loop, self.name, self.handle = loop, name, handle
        self.stats, self.progress, self.stop = stats, progress, stop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = asyncio.run_coroutine_threadsafe(self._run(concurrency), loop)

    def submit(self, item: Item | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def close(self) -> None:
        self.submit(None)

    async def _run(self, concurrency: int) -> None:
        workers = [asyncio.create_task(self._work()) for _ in range(concurrency)]
        await asyncio.gather(*workers)

    async def _work(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None:  # closing: pass the word on to the next worker
                self.queue.put_nowait(None)
                return
            if self.stop.is_set():
                continue  # stopping: leave the rest for the next run
            try:
                await self.handle(item)
                self.stats.count(self.name, "done")
            except Stopped:
                continue  # neither done nor failed: the next run does it
            except ItemError as e:
                self.stats.fail(item.image, self.name, str(e))
            except FatalEndpointError as e:
                if not self.stats.fatal:
                    self.stats.fatal = str(e)
                self.stop.set()
            except Exception as e:  # a bug or an unexpected library error: fail the item, keep its reason
                self.stats.fail(item.image, self.name, f"{type(e).__name__}: {e}")
            self.progress.update()


class StopEvent(threading.Event):
    """The run's stop flag, set by a signal handler or a stage: a threading.Event that also sets the asyncio
    Events that tasks on event loops wait on, so that a wait in the limiter or a retry sleep ends at once."""

    def __init__(self):
        super().__init__()
        self.wakers: list[Callable[[], None]] = []

    def set(self) -> None:
        super().set()
        for wake in list(self.wakers):
            wake()

    def on_loop(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        """An asyncio.Event on `loop` that is set when this one is. No lock: a signal handler may call set()
        while this runs, on the same thread; the is_set() after the append catches a set() that came first."""
        event = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already: nothing waits any more
                loop.call_soon_threadsafe(event.set)

        self.wakers.append(wake)
        if self.is_set():
            wake()
        return event


class EventLoopThread:
    """An asyncio loop in a background thread, for the request stages while torch runs in the main one.
    `stopping` is the run's stop flag as an asyncio.Event on that loop."""

    def __init__(self, stop: StopEvent):
        self.loop = asyncio.new_event_loop()
        self.stopping = stop.on_loop(self.loop)
        self.thread = threading.Thread(target=self.loop.run_forever, name="requests", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def wait_future(future) -> None:
    """Wait for a stage in slices, so signal handlers keep running in the main thread."""
    while True:
        try:
            future.result(timeout=0.2)
            return
        except TimeoutError:
            continue


def caption_locally(items: Sequence[Item], captioner: LocalCaptioner, cfg: Config, stats: Stats,
                    progress: Progress, reporter: Reporter, stop: threading.Event,
                    on_caption: Callable[[Item], None]) -> None:
    """The vision loop: decode in DataLoader workers, generate per batch, write each batch's captions at once."""
    import torch

    with torch_threads_set(model_threads(captioner.model.device, cfg.num_workers, torch.get_num_threads())):
        caption_batches(items, captioner, cfg, stats, progress, reporter, stop, on_caption)


@contextlib.contextmanager
def torch_threads_set(threads: int):
    """torch's intra-op threads for a block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_threads(device, num_workers: int, threads: int) -> int:
    """torch's threads during the vision stage: on a CPU, leave the decoding workers their cores."""
    if device.type == "cpu" and num_workers:
        return max(1, (os.cpu_count() or 1) - num_workers)
    return threads


def caption_batches(items: Sequence[Item], captioner: LocalCaptioner, cfg: Config, stats: Stats,
                    progress: Progress, reporter: Reporter, stop: threading.Event,
                    on_caption: Callable[[Item], None]) -> None:
    from torch.utils.data import DataLoader

    def save(item: Item, text: str) -> None:  # on the writer thread, so saving overlaps the next batch
        try:
            atomic_write(item.generated_path, text)
        except OSError as e:
            stats.fail(item.image, STAGE_VISION, f"cannot write {item.generated_path.name}: {e.strerror or e}")
            return
        stats.count(STAGE_VISION, "done")
        on_caption(item)

    def caption_batch(writer: ThreadPoolExecutor, indices: list[int], prepared, errors: list[tuple[int, str]]) -> None:
        for index, error in errors:
            stats.fail(items[index].image, STAGE_VISION, error)
            reporter.detail(f"failed {items[index].image}: {error}")
        captions = []
        if indices:
            try:
                captions = captioner.caption(prepared)
            except Exception as e:  # one bad batch does not stop the run; a dead worker does (below)
                if worker_died(e):
                    raise
                for index in indices:
                    stats.fail(items[index].image, STAGE_VISION, f"generation failed: {type(e).__name__}: {e}")
        for index, text in zip(indices, captions):
            item, text = items[index], " ".join(text.split())
            if not text:
                stats.fail(item.image, STAGE_VISION, "the vision model returned an empty caption")
                continue
            item.generated = text
            if cfg.cache_generated:
                writer.submit(save, item, text)
            else:
                stats.count(STAGE_VISION, "done")
                on_caption(item)
            reporter.detail(f"captioned {item.image}")
        progress.update(len(indices) + len(errors))

    loader = DataLoader(ImageFolder(items, captioner.decode_side), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, collate_fn=make_collate(captioner),
                        worker_init_fn=worker_init if cfg.num_workers else None,
                        prefetch_factor=2 if cfg.num_workers else None)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer:
        try:
            for indices, prepared, errors in loader:
                caption_batch(writer, indices, prepared, errors)
                if stop.is_set():
                    break
        except RuntimeError as e:
            if not worker_died(e):
                raise
            stats.fatal = (f"an image decoding worker died ({first_line(e)}); captions written so far are kept. "
                           "Rerun with --num_workers 0, or give the container more shared memory "
                           "(docker run --shm-size 2g)")


def worker_died(error: BaseException) -> bool:
    """torch's DataLoader reports a dead worker (killed, out of memory, out of shared memory in a container) as a
    RuntimeError, raised from its SIGCHLD handler wherever the main thread happens to be, or on the next batch."""
    return isinstance(error, RuntimeError) and "DataLoader worker" in str(error)


def vision_messages(url: str, cfg: Config, prompt: str) -> list[dict]:
    messages = []
    if cfg.vlm_system_prompt:
        messages.append({"role": "system", "content": cfg.vlm_system_prompt})
    messages.append({"role": "user", "content": [{"type": "text", "text": prompt},
                                                 {"type": "image_url", "image_url": {"url": url}}]})
    return messages


def llm_messages(item: Item, system_prompt: str, manual: str | None) -> list[dict]:
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": build_user_message(manual, item.generated or "")}]


# --------------------------------------------------------------------------------------------
# Planning and sharding
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    items: list[Item]
    to_generate: list[Item]
    to_combine: list[Item]
    failures: list[Failure]
    stale: list[Path] = dataclasses.field(default_factory=list)  # temporaries of a killed run
    cached_generated: int = 0
    cached_combined: int = 0


def plan_work(cfg: Config) -> Plan:
    """Find the images, read the caches, and decide what each image still needs."""
    stale: list[Path] = []
    images, failures = walk_images(cfg.dataset_dir, stale)
    items, conflicts = pair_items(images, cfg.caption_extension)
    plan = Plan(items, [], [], failures + conflicts, stale)
    redo_generated = cfg.overwrite in ("generated", "all")
    redo_combined = cfg.overwrite in ("combined", "all")
    budget = cfg.limit
    for item in items:
        combined = None if redo_combined else read_cache(item.combined_path)
        generated = None if redo_generated else read_cache(item.generated_path)
        needs_combined = combined is None
        needs_generated = generated is None and (cfg.cache_generated or needs_combined)
        if (needs_combined or needs_generated) and budget is not None:
            if budget <= 0:
                continue
            budget -= 1
        item.generated, item.combined = generated, combined
        plan.cached_generated += generated is not None
        plan.cached_combined += combined is not None
        if needs_generated:
            plan.to_generate.append(item)
        if needs_combined:
            plan.to_combine.append(item)
    return plan


def my_share(state, items: list[Item]) -> list[Item]:
    with state.split_between_processes(items) as share:
        return list(share)




# --------------------------------------------------------------------------------------------
# run(): orchestration for one process
# --------------------------------------------------------------------------------------------


def make_chat(cfg: Config, state):
    """The LLM client factory: the endpoint with this process's share of the rate limits, or a local LLM."""
    if cfg.local_llm:
        quiet_transformers(cfg.verbosity)
        return LocalChat(cfg.local_llm, state.device, resolve_dtype(cfg.dtype, state.device), cfg.batch_size,
                         cfg.max_tokens, cfg.temperature, trust_remote_code=cfg.trust_remote_code)
    limiter = RateLimiter(requests=process_share(cfg.rpm, state.process_index, state.num_processes),
                          tokens=process_share(cfg.tpm, state.process_index, state.num_processes),
                          shared=shared_pause(cfg, state, STAGE_LLM))
    return EndpointChat(cfg.base_url, cfg.api_key, cfg.model, limiter, cfg.max_retries, cfg.timeout,
                        cfg.max_tokens, cfg.temperature)


def shared_pause(cfg: Config, state, stage: str) -> SharedPause | None:
    """Where several processes call one endpoint, a 429's pause reaches all of them; one process keeps it in memory."""
    return SharedPause(cfg.dataset_dir / PAUSE_NAME.format(stage=stage)) if state.num_processes > 1 else None


def make_vision_chat(cfg: Config, state) -> EndpointChat:
    limiter = RateLimiter(requests=process_share(cfg.vlm_rpm, state.process_index, state.num_processes),
                          shared=shared_pause(cfg, state, STAGE_VISION))
    return EndpointChat(cfg.vlm_base_url, cfg.api_key, cfg.vlm_model, limiter, cfg.max_retries, cfg.timeout,
                        cfg.max_new_tokens, 0.0)


def run(cfg: Config, plan: Plan, state, reporter: Reporter, stop: StopEvent, *,
        make_captioner=load_captioner, make_llm=make_chat) -> Stats:
    """Caption and merge this process's share of the plan; returns its Stats for main() to gather."""
    stats = Stats()
    generating = {id(i) for i in plan.to_generate}
    to_combine = {id(i) for i in plan.to_combine}
    vision_items = my_share(state, plan.to_generate)
    llm_only = my_share(state, [i for i in plan.to_combine if id(i) not in generating])
    n_llm = len(llm_only) + sum(id(i) in to_combine for i in vision_items)
    if not vision_items and not n_llm:
        return stats

    events = EventLoopThread(stop)
    chat = None
    llm_stage: AsyncStage | None = None
    llm_progress = reporter.progress("llm", n_llm)

    async def merge(item: Item) -> None:
        manual = read_text(item.caption_path)
        text = await complete_item(chat, llm_messages(item, cfg.system_prompt, manual), cfg.max_retries, manual,
                                   keep_token_parts(manual, cfg.keep_tokens), stopping=events.stopping)
        await asyncio.to_thread(atomic_write, item.combined_path, text)  # an fsync must not stall the loop
        item.combined = text
        reporter.detail(f"merged {item.image}")

    def start_llm() -> AsyncStage:
        nonlocal chat
        chat = make_llm(cfg, state)
        stage = AsyncStage(events.loop, STAGE_LLM, cfg.concurrency, merge, stats, llm_progress, stop)
        for item in llm_only:
            stage.submit(item)
        return stage

    def forward(item: Item) -> None:  # a new generated caption goes on to the LLM, if that runs already
        if llm_stage is not None and id(item) in to_combine:
            llm_stage.submit(item)

    # A local LLM waits for the vision model to leave the GPU; an endpoint can start at once.
    overlap = cfg.overlap and not cfg.local_llm
    try:
        if n_llm and overlap:
            llm_stage = start_llm()
        if vision_items:
            vision_progress = reporter.progress("vision", len(vision_items))
            if cfg.vlm_base_url:
                caption_served(cfg, state, events, vision_items, stats, vision_progress, stop, forward)
            else:
                captioner = make_captioner(cfg, state.device)
                caption_locally(vision_items, captioner, cfg, stats, vision_progress, reporter, stop, forward)
                captioner = None
                release_memory()
            vision_progress.close()
        if n_llm and llm_stage is None and not stop.is_set():
            llm_stage = start_llm()
            for item in vision_items:
                if item.generated is not None:
                    forward(item)
        if llm_stage is not None:
            llm_stage.close()
            wait_future(llm_stage.done)
        llm_progress.close()
    except BaseException:
        stop.set()  # a stage failed as a whole: let the other one wind down before the loop closes
        raise
    finally:
        if chat is not None:
            with contextlib.suppress(Exception):
                events.run(chat.close(), timeout=10)
        events.close()
    return stats


def caption_served(cfg: Config, state, events: EventLoopThread, items: Sequence[Item], stats: Stats,
                   progress: Progress, stop: threading.Event, on_caption: Callable[[Item], None]) -> None:
    """The vision stage through an OpenAI-compatible vision endpoint: no torch model is loaded."""
    chat = make_vision_chat(cfg, state)
    prompt = cfg.prompt or DEFAULT_CHAT_PROMPT

    async def describe(item: Item) -> None:
        url = await asyncio.to_thread(image_data_url, item.image, cfg.vlm_max_side)
        messages = vision_messages(url, cfg, prompt)
        text = await complete_item(chat, messages, cfg.max_retries, stopping=events.stopping)
        if cfg.cache_generated:
            await asyncio.to_thread(atomic_write, item.generated_path, text)
        item.generated = text
        on_caption(item)

    stage = AsyncStage(events.loop, STAGE_VISION, cfg.concurrency, describe, stats, progress, stop)
    for item in items:
        stage.submit(item)
    stage.close()
    wait_future(stage.done)
    events.run(chat.close(), timeout=10)


# --------------------------------------------------------------------------------------------
# Around the run: lock, signals, preflight, dry run, summary, report, export
# --------------------------------------------------------------------------------------------


class DatasetLock:
    """One run per dataset folder. flock is released by the kernel when the owner dies, so it never goes stale."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.file = None

    def acquire(self) -> str | None:
        """None when the lock is ours; else why not."""
        if fcntl is None:
            return None
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            return f"another run ({owner}) is already working on {self.path.parent}; wait for it to finish"
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.file = handle
        return None

    def release(self) -> None:
        if self.file is not None:
            self.file.truncate(0)
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, stats: Stats, reporter: Reporter):
    """Ctrl-C or SIGTERM: finish the work in flight, save it, report. A second signal aborts at once."""
    def handle(signum, frame):
        if stop.is_set() and stats.signal:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        stats.signal = signum
        stop.set()
        reporter.warn(f"{signal.Signals(signum).name}: stopping after the work in flight (again to abort)")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handle) for s in EXIT_FOR_SIGNAL}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def preflight(cfg: Config, plan: Plan, state) -> None:
    """Reach every endpoint that the plan needs before any model loads; raise FatalEndpointError if one fails."""
    checks = []
    if plan.to_combine and cfg.local_llm:
        check_local_model(cfg)
    elif plan.to_combine:
        checks.append(make_chat(cfg, state))
    if plan.to_generate and cfg.vlm_base_url:
        checks.append(make_vision_chat(cfg, state))

    async def check_all():
        try:
            for chat in checks:
                await chat.check()
        finally:
            for chat in checks:
                await chat.close()

    if checks:
        asyncio.run(check_all())


def check_local_model(cfg: Config) -> None:
    """Find the local LLM's config (cache, path or Hub) before the vision stage spends an hour."""
    from transformers import AutoConfig

    quiet_transformers(cfg.verbosity)
    try:
        AutoConfig.from_pretrained(cfg.local_llm, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise FatalEndpointError(f"cannot load --local_llm {cfg.local_llm}: {first_line(e)}") from e


def dry_run_report(cfg: Config, plan: Plan) -> list[str]:
    """What a run would do, without loading a model or calling anything."""
    from PIL import Image

    problems = list(plan.failures)
    for item in plan.to_generate:
        try:
            with Image.open(item.image) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    problems.append(Failure(str(item.image), STAGE_INPUT, f"image is {img.width}x{img.height} pixels"))
        except (OSError, SyntaxError, ValueError) as e:
            problems.append(Failure(str(item.image), STAGE_INPUT, f"not a readable image: {type(e).__name__}"))
    prompt_tokens = 0
    for item in plan.to_combine:
        try:
            manual = read_text(item.caption_path)
        except ItemError as e:
            problems.append(Failure(str(item.caption_path), STAGE_INPUT, str(e)))
            manual = None
        generated = estimate_tokens(item.generated) if item.generated else cfg.max_new_tokens
        prompt_tokens += estimate_tokens(cfg.system_prompt + build_user_message(manual, "")) + generated
    lines = [
        f"dry run: {len(plan.items)} images under {cfg.dataset_dir}",
        f"  vision captions to make: {len(plan.to_generate)} ({plan.cached_generated} cached)",
        f"  LLM calls to make: {len(plan.to_combine)} ({plan.cached_combined} cached)",
        f"  estimated LLM tokens: ~{prompt_tokens:,} in, up to {len(plan.to_combine) * cfg.max_tokens:,} out",
        f"  problems: {len(problems)}",
    ]
    lines += [f"    {f.path}: {f.error}" for f in problems]
    return lines


def summary_lines(plan: Plan, stats: Stats) -> list[str]:
    cached = {STAGE_VISION: plan.cached_generated, STAGE_LLM: plan.cached_combined}
    lines = [f"{stage}: {c['done']} done, {cached[stage]} from cache, {c['failed']} failed"
             for stage, c in stats.counts.items()]
    inputs = sum(f.stage == STAGE_INPUT for f in stats.failures)
    if inputs:
        lines.append(f"input: {inputs} skipped")
    lines += [f"FAILED {f.path} [{f.stage}]: {f.error}" for f in stats.failures]
    if stats.fatal:
        lines.append(f"error: {stats.fatal}")
    return lines


def write_report(path: Path, failures: Iterable[Failure]) -> None:
    atomic_write(path, "\n".join(json.dumps(dataclasses.asdict(f), ensure_ascii=False) for f in failures))


def write_export(cfg: Config, plan: Plan) -> int:
    """A Hugging Face imagefolder metadata.jsonl at the dataset root: every image with a combined caption."""
    target = Path(cfg.export)
    if not target.is_absolute():
        target = cfg.dataset_dir / target
    rows = []
    for item in plan.items:
        text = read_cache(item.combined_path)
        if text is None:
            continue
        try:
            manual = read_text(item.caption_path)
        except ItemError:
            manual = None
        rows.append(json.dumps({
            "file_name": item.image.relative_to(cfg.dataset_dir).as_posix(),
            "text": text,
            "manual": manual or "",
            "generated": read_cache(item.generated_path) or item.generated or "",
        }, ensure_ascii=False))
    atomic_write(target, "\n".join(rows))
    return len(rows)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

EPILOG = """examples:
  accelerate launch enhance_captions.py --dataset_dir images/ --base_url http://127.0.0.1:11434/v1/ --model llama3.1
  python enhance_captions.py --dataset_dir images/ --model_id Qwen/Qwen2.5-VL-3B-Instruct --batch_size 16 --overlap
  python enhance_captions.py --dataset_dir images/ --dry_run

exit codes: 0 all done, 1 some items failed (listed at the end), 2 usage or configuration error,
130/143 stopped by Ctrl-C/SIGTERM (the finished work is saved; rerun to go on).
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default where it has a meaningful one; keeps the epilog's line breaks."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=36, width=110)

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enhance_captions.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--dataset_dir", type=Path, required=True, help="folder of images and manual captions (recursive)")
    g.add_argument("--caption_extension", default=".txt", help="extension of the manual captions (kohya: .caption)")
    g.add_argument("--limit", type=int, help="process only the first N images that need work")
    g.add_argument("--overwrite", choices=["generated", "combined", "all"],
                   help="recompute these caches even where they exist")
    g.add_argument("--dry_run", action="store_true", help="show what a run would do; load nothing, call nothing")

    g = p.add_argument_group("vision model")
    g.add_argument("--model_id", default=DEFAULT_MODEL_ID, help="vision model: Hub id or local path")
    g.add_argument("--revision", default="main", help="model revision (processor and model)")
    g.add_argument("--trust_remote_code", action="store_true", help="allow the model's own code (processor and model)")
    g.add_argument("--prompt", help=f"task token or instruction; default {DEFAULT_TASK_PROMPT} for task-token "
                                    "models, a detailed-description request for chat models, none for BLIP")
    g.add_argument("--vlm_system_prompt", type=Path, help="file with a system turn for chat vision models")
    g.add_argument("--max_new_tokens", type=int, default=256, help="vision caption length limit, in tokens")
    g.add_argument("--repetition_penalty", type=float, help="discourage loops (small models), e.g. 1.1")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU")
    g.add_argument("--attn_implementation", choices=["sdpa", "flash_attention_2", "eager"],
                   help="attention kernel (default: the model's own choice)")
    g.add_argument("--device_map", choices=["auto"], help="split one large model over all GPUs (one process only)")
    g.add_argument("--quantization", choices=["4bit", "8bit"], help="load the vision model quantized (bitsandbytes)")
    g.add_argument("--vlm_base_url", help="caption with a served vision model at this OpenAI-compatible URL instead")
    g.add_argument("--vlm_model", help="the served vision model's name (with --vlm_base_url)")
    g.add_argument("--vlm_max_side", type=int, default=1024, help="downscale images to this longest side before sending")
    g.add_argument("--vlm_rpm", type=int, default=0, help="requests per minute to the vision endpoint (0: no limit)")

    g = p.add_argument_group("LLM")
    g.add_argument("--base_url", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL)")
    g.add_argument("--model", default="llama-3.3-70b-versatile", help="the endpoint's model")
    g.add_argument("--local_llm", help=f"merge in-process with this transformers instruct model; the default when no "
                                       f"endpoint or key is configured is {DEFAULT_LOCAL_LLM}")
    g.add_argument("--system_prompt", type=Path, help="the LLM's system prompt file (default: system_prompt.txt "
                                                    "beside the script)")
    g.add_argument("--max_tokens", type=int, default=512, help="length limit of the merged caption, in tokens")
    g.add_argument("--temperature", type=float, default=0.3, help="LLM sampling temperature")
    g.add_argument("--rpm", type=int, default=0, help="requests per minute for the whole run, all processes (0: none)")
    g.add_argument("--tpm", type=int, default=0, help="tokens per minute for the whole run, all processes (0: none)")
    g.add_argument("--max_retries", type=int, default=5, help="at most N+1 requests per item in all, transport retries included (backoff, honours Retry-After)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--keep_tokens", type=int, default=0,
                   help="start each caption with the first N comma-separated parts of the manual caption, verbatim "
                        "and once each (0: off)")

    g = p.add_argument_group("performance")
    g.add_argument("--batch_size", type=int, default=8, help="images per generate call")
    g.add_argument("--num_workers", type=int, default=2, help="image decoding workers (0: in the main process)")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight at once, per process")
    g.add_argument("--overlap", action="store_true",
                   help="start LLM requests while the vision model runs (LLM on another machine or GPU)")

    g = p.add_argument_group("output")
    g.add_argument("--cache_generated_captions_to_disk", action=argparse.BooleanOptionalAction, default=True,
                   help="write {stem}_generated.txt; when off, generated captions live only in memory for this run")
    g.add_argument("--export", help="after the run write this imagefolder metadata file at the dataset root, "
                                    "e.g. metadata.jsonl")
    g.add_argument("--report", type=Path, help="write every failure as JSON lines (path, stage, error)")
    g.add_argument("--quiet", action="store_true", help="only warnings, errors and the summary")
    g.add_argument("-v", "--verbose", action="store_true", help="a line per item")
    return p


def read_prompt_file(path: Path, what: str) -> str:
    try:
        text = read_text(path)
    except ItemError as e:
        raise UsageError(f"{what} {path}: {e}") from e
    if not text:
        raise UsageError(f"{what} {path} is missing or empty")
    return text


def config_from_args(args: argparse.Namespace) -> Config:
    """Validate the flags and the environment; every problem is one UsageError line."""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True))
    load_dotenv(SCRIPT_DIR / ".env")
    folder = args.dataset_dir.expanduser()
    if not folder.exists():
        raise UsageError(f"--dataset_dir {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"--dataset_dir {folder} is a file, not a folder")
    for name in ("batch_size", "concurrency", "max_new_tokens", "max_tokens", "vlm_max_side"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    for name in ("num_workers", "rpm", "tpm", "vlm_rpm", "max_retries", "keep_tokens"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must not be negative")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.vlm_base_url and not args.vlm_model:
        raise UsageError("--vlm_base_url needs --vlm_model")
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = os.environ.get("OPENAI_API_KEY") or None
    local_llm = args.local_llm or (None if base_url or api_key else DEFAULT_LOCAL_LLM)
    extension = args.caption_extension if args.caption_extension.startswith(".") else "." + args.caption_extension
    return Config(
        dataset_dir=folder.resolve(), model_id=args.model_id, prompt=args.prompt, revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        system_prompt=read_prompt_file(args.system_prompt or DEFAULT_SYSTEM_PROMPT, "--system_prompt"),
        vlm_system_prompt=read_prompt_file(args.vlm_system_prompt, "--vlm_system_prompt")
        if args.vlm_system_prompt else None,
        base_url=base_url, model=args.model, api_key=api_key, local_llm=local_llm,
        vlm_base_url=args.vlm_base_url, vlm_model=args.vlm_model, vlm_max_side=args.vlm_max_side,
        vlm_rpm=args.vlm_rpm, cache_generated=args.cache_generated_captions_to_disk,
        caption_extension=extension, rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency,
        batch_size=args.batch_size, num_workers=args.num_workers, overlap=args.overlap,
        max_new_tokens=args.max_new_tokens, max_tokens=args.max_tokens, temperature=args.temperature,
        repetition_penalty=args.repetition_penalty, dtype=args.dtype, attn_implementation=args.attn_implementation,
        device_map=args.device_map, quantization=args.quantization, max_retries=args.max_retries,
        timeout=args.timeout, keep_tokens=args.keep_tokens, limit=args.limit, overwrite=args.overwrite,
        dry_run=args.dry_run, export=args.export, report=args.report,
        verbosity=0 if args.quiet else 2 if args.verbose else 1,
    )


def make_state():
    """accelerate's process state; on a machine without GPUs it must be told so, or processes never meet."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def check_against_state(cfg: Config, state) -> None:
    for name in ("rpm", "tpm", "vlm_rpm"):
        value = getattr(cfg, name)
        if 0 < value < state.num_processes:
            raise UsageError(f"--{name} {value} is below the number of processes ({state.num_processes}); "
                             "each process needs a share of at least 1")
    if cfg.device_map and state.num_processes > 1:
        raise UsageError("--device_map auto spreads one model over all GPUs: run it as one process")


def agree(state, error: str | None) -> str | None:
    """The main process's verdict, seen by every process."""
    if state.num_processes == 1:
        return error
    from accelerate.utils import broadcast_object_list

    box = [error]
    broadcast_object_list(box, from_process=0)
    return box[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    state = make_state()
    reporter = Reporter(cfg.verbosity, state.is_main_process)
    lock = DatasetLock(cfg.dataset_dir)
    try:
        error = None
        try:
            check_against_state(cfg, state)
            if state.is_main_process and not cfg.dry_run:
                error = lock.acquire()
        except UsageError as e:
            error = str(e)
        plan = plan_work(cfg)
        if error is None and state.is_main_process and not cfg.dry_run:
            for path in plan.stale:  # the lock is ours: no other run is writing these
                with contextlib.suppress(OSError):
                    path.unlink()
        if error is None and not plan.items and state.is_main_process:
            error = f"no images ({' '.join(sorted(IMAGE_EXTENSIONS))}) found under {cfg.dataset_dir}"
        if cfg.dry_run:
            if error is None and state.is_main_process:
                print("\n".join(dry_run_report(cfg, plan)))
        elif error is None and state.is_main_process:
            try:
                preflight(cfg, plan, state)
            except FatalEndpointError as e:
                error = str(e)
        error = agree(state, error)
        if error:
            if state.is_main_process:
                print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
        if cfg.dry_run:
            return EXIT_OK
        backend = f"local LLM {cfg.local_llm}" if cfg.local_llm else \
            f"endpoint {redact(cfg.base_url or 'https://api.openai.com/v1', cfg.api_key)} model {cfg.model}"
        vision = f"served {cfg.vlm_model} at {cfg.vlm_base_url}" if cfg.vlm_base_url else cfg.model_id
        reporter.info(f"vision: {vision}; merge: {backend}")
        reporter.info(f"{len(plan.items)} images: {len(plan.to_generate)} to caption, {len(plan.to_combine)} to merge"
                      + (f", split over {state.num_processes} processes" if state.num_processes > 1 else ""))
        stop = StopEvent()
        stats = Stats()
        with stop_on_signals(stop, stats, reporter):
            try:
                stats.merge(run(cfg, plan, state, reporter, stop))
            except UsageError as e:  # the model cannot be loaded: nothing else can go on
                stats.fatal = str(e)
        return finish(cfg, plan, state, stats, reporter)
    finally:
        lock.release()


def finish(cfg: Config, plan: Plan, state, stats: Stats, reporter: Reporter) -> int:
    """Gather every process's Stats, print the summary, write the report and export; one exit code for all."""
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        total = Stats()
        for part in gather_object([stats]):
            total.merge(part)
        stats = total
    stats.failures[:0] = plan.failures
    if state.is_main_process:
        for line in summary_lines(plan, stats):
            print(line, file=sys.stderr if line.startswith(("FAILED", "error")) else sys.stdout)
        if cfg.report:
            write_report(cfg.report, stats.failures)
        if cfg.export and not stats.fatal:
            count = write_export(cfg, plan)
            reporter.info(f"exported {count} captions to {cfg.export}")
    return stats.exit_code()


def exit_process(code: int) -> None:
    """Exit with code. Once processes have met in a process group, skip the interpreter's teardown: gloo's threads
    drop their last references to a collective's tensors just after it returns, and one that does so while the
    interpreter finalizes cannot take the GIL and aborts the process (SIGABRT after a finished run, about one
    two-process CPU run in eight). Everything is written and closed by now, so only the flush is left."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
