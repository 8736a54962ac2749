#!/usr/bin/env python3
# /// script
# requires-python = ">=3.11"
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

Both are caches, and `.enhance_captions/` records what made each one: a rerun (after a crash, a Ctrl-C, or from
cron while the captions are being edited) redoes exactly what changed, and never overwrites a hand edit.

    accelerate launch enhance_captions.py --dataset_dir images/ \\
        --model_id florence-community/Florence-2-base --prompt "<MORE_DETAILED_CAPTION>" \\
        --base_url http://127.0.0.1:11434/v1/ --model llama3.1

Map of this file, top to bottom:
    constants and types        Config, Item, Variant, Merge, Failure, Note, Stats
    pure functions             discovery, caption and cache files, images, prompts, reply cleaning, --keep_tokens
    records                    what made each cache: per-process journals folded into records.jsonl
    rate limiter               sliding 60 s windows for requests and tokens, shared Retry-After pause
    chat backends              the OpenAI-compatible endpoint, a pool of several, and a local transformers LLM
    request with retries       complete_item(): where a reply is checked, cleaned and retried
    vision captioners          one local path chosen by the processor's capabilities, or a served model
    progress and messages      the one reporter that prints
    stages                     the vision loop, the async LLM stage, overlap or one after the other
    planning and sharding      plan_work()/decide(): the one decision per item (what is redone and why)
    run()                      orchestration for one process
    around the run             lock, signals, preflight, dry run, summary, --write_captions, report, export
    training captions          token budgets, --prefix/--suffix, --export formats (imagefolder, kohya), --audit
    review page                --review: each image beside its captions, state and findings; saves hand edits
    CLI                        build_parser(), main()
"""
from __future__ import annotations

import sys

if sys.version_info < (3, 11):  # before any import: torch has no 3.10 builds here, and 3.10 fails far later
    sys.stderr.write(f"error: enhance_captions.py needs Python 3.11 or newer (this is {sys.version.split()[0]})\n")
    raise SystemExit(2)

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import contextvars
import csv
import dataclasses
import datetime
import functools
import gc
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import os
import pickle
import random
import re
import secrets
import signal
import socket
import threading
import time
import unicodedata
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import parse_qs, urlsplit

try:
    import fcntl
except ImportError:  # Windows: no dataset lock
    fcntl = None

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}
GENERATED_SUFFIX = "_generated.txt"
COMBINED_SUFFIX = "_combined.txt"
LOCK_NAME = ".enhance_captions.lock"
PAUSE_NAME = ".enhance_captions.{stage}.pause"  # a Retry-After pause, shared by the processes of a run
SET_ASIDE_AFTER = 3  # failed requests in a row (5xx, timeouts, dropped connections) that set a pooled endpoint aside
SET_ASIDE_SECONDS = 30.0  # how long, the first time; doubled each time it fails again on its return, up to:
SET_ASIDE_MAX_SECONDS = 600.0
SCRIPT_DIR = Path(__file__).resolve().parent
DEFAULT_SYSTEM_PROMPT = SCRIPT_DIR / "system_prompt.txt"
DEFAULT_MODEL_ID = "florence-community/Florence-2-base"
DEFAULT_LOCAL_LLM = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"  # where the openai client goes without a base URL
DEFAULT_TASK_PROMPT = "<MORE_DETAILED_CAPTION>"
DEFAULT_CHAT_PROMPT = (
    "Describe this image in one detailed paragraph for a training caption: subject, clothing, pose, "
    "setting, lighting, colours, composition and style. State only what is visible."
)
# PIL's own decompression-bomb threshold; larger images are refused before their pixels are allocated.
MAX_IMAGE_PIXELS = 89_478_485
INLINE_TENSOR_BYTES = 1 << 20  # smaller tensors travel from the decoding workers inside the pickle
ORIENTATION_TAG = 0x0112  # EXIF: values 5-8 turn the image a quarter
SENDABLE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}  # sent to a served model as they are
WINDOW_SECONDS = 60.0
PREFLIGHT_TIMEOUT = 15.0
HUB_CHECK_TIMEOUT = 5.0  # one look at the Hub before a download, instead of huggingface_hub's minutes of retries
# Requests a process claims at a time, at most: a store round trip per chunk, and at the end of a run no more than
# one chunk that another process could have taken. Never more than --concurrency, so a claimed chunk starts at once.
REQUEST_CHUNK = 4
STATS_WAIT = 7 * 24 * 3600.0  # how long the main process waits for another's Stats: as long as any run takes

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


class EndpointDown(ItemError):
    """The endpoint did not answer this request (no connection, a dropped one, a timeout, a 5xx): a pool of
    endpoints sends it to another. `refused`: no connection could be made at all."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


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
    variants: tuple[tuple[str, str], ...] = ()  # (name, system prompt) per --variant
    write_captions: str | None = None  # also write each combined caption to {stem}EXT for the trainer
    vlm_system_prompt: str | None = None
    base_url: tuple[str, ...] = ()  # one or more (--base_url repeatable); none: the openai client's default
    model: str | None = None  # None: the one model the endpoint lists, found by preflight
    model_from_list: bool = False
    api_key: str | None = None
    local_llm: str | None = None
    set_aside_base_url: str | None = None  # $OPENAI_BASE_URL, unused because --local_llm was given
    vlm_base_url: tuple[str, ...] = ()  # one or more (--vlm_base_url repeatable)
    vlm_model: str | None = None
    vlm_api_keys: tuple[str | None, ...] = ()  # the key for each vlm_base_url
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
    refresh: str = "inputs"
    dry_run: bool = False
    export: str | None = None
    prefix: str = ""
    suffix: str = ""
    max_caption_tokens: int | None = None
    caption_tokenizer: str | None = None
    audit: bool = False
    report: Path | None = None
    verbosity: int = 1  # 0 quiet, 1 normal, 2 verbose


@dataclasses.dataclass(slots=True)
class Item:
    """One image, what is known about it so far, and what planning decided it needs this run and why."""

    image: Path
    caption_path: Path
    generated: str | None = None
    manual: str | None = None         # the manual caption, read once, at planning
    manual_sha: str | None = None
    generated_sha: str | None = None  # hash of the vision caption's bytes, as cached (or as it would be)
    stamp: str | None = None          # image_stamp() at planning
    vision: str | None = None         # why the vision caption is made this run (a REASON_*), or None
    merges: list[Merge] = dataclasses.field(default_factory=list)  # the default merge, then one per --variant
    kept: tuple[str, ...] = ()        # kinds of cache edited by hand, kept as they are ("generated", "combined")
    adopted: tuple[str, ...] = ()     # kinds of cache found without a record, taken as they are
    # The paths, made once: pathlib's parsing was a third of planning a fully cached rerun when made on each use.
    base: Path = dataclasses.field(init=False)
    generated_path: Path = dataclasses.field(init=False)
    combined_path: Path = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.base = self.image.with_suffix("")
        self.generated_path = self.base.parent / (self.base.name + GENERATED_SUFFIX)
        self.combined_path = self.base.parent / (self.base.name + COMBINED_SUFFIX)

    def cache_path(self, kind: str) -> Path:
        """generated -> {stem}_generated.txt, combined -> {stem}_combined.txt, combined_NAME -> {stem}_combined_NAME.txt"""
        if kind == KIND_GENERATED:
            return self.generated_path
        if kind == KIND_COMBINED:
            return self.combined_path
        return self.base.parent / f"{self.base.name}_{kind}.txt"



@dataclasses.dataclass(frozen=True)
class Variant:
    """A merged caption made for every image: the default one (no name), and one per --variant NAME=FILE."""

    name: str
    system_prompt: str

    @property
    def kind(self) -> str:
        return KIND_COMBINED + (f"_{self.name}" if self.name else "")


@dataclasses.dataclass(slots=True)
class Merge:
    """One merged caption of one image, and what planning decided for it."""

    item: Item
    variant: Variant
    text: str | None = None
    sha: str | None = None
    reason: str | None = None         # why the merge is made this run (a REASON_*), or None
    unless: str | None = None         # ...only if the new vision caption's hash differs from this one

    @property
    def path(self) -> Path:
        return self.item.cache_path(self.variant.kind)

    @property
    def image(self) -> Path:  # the stages name the image in a failure
        return self.item.image

    def wanted(self) -> bool:
        """After the vision stage: a conditional merge happens only if the vision caption really changed."""
        return self.reason is not None and (self.unless is None or self.item.generated_sha != self.unless)


@dataclasses.dataclass(frozen=True)
class Failure:
    path: str
    stage: str
    error: str


@dataclasses.dataclass(frozen=True)
class Note:
    path: str
    stage: str
    note: str


@dataclasses.dataclass
class Stats:
    """A run's counts and failures. The event-loop thread, the writer thread and the main thread all change them,
    so every change goes through count(), fail() or merge(), under one lock."""

    counts: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: {s: collections.Counter() for s in (STAGE_VISION, STAGE_LLM)}
    )
    failures: list[Failure] = dataclasses.field(default_factory=list)
    notes: list[Note] = dataclasses.field(default_factory=list)  # done, but not as asked (a caption cut to fit)
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

    def note(self, path: Path | str, stage: str, note: str) -> None:
        with self.lock:
            self.notes.append(Note(str(path), stage, note))

    def merge(self, other: Stats) -> None:
        with self.lock:
            for stage, counter in other.counts.items():
                self.counts[stage].update(counter)
            self.failures.extend(other.failures)
            self.notes.extend(other.notes)
            self.fatal = self.fatal or other.fatal
            self.signal = self.signal or other.signal

    def __getstate__(self) -> dict:  # Stats travel between processes pickled; a lock does not pickle
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


STALE_TEMPORARY = re.compile(r"^\..+(?:_generated|_combined(?:_[\w-]+)?)\.txt\.[a-z0-9_]+\.tmp$")


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


def digest(data: bytes) -> str:
    """A short content hash: 64 bits tell a hand edit from what was written."""
    return hashlib.sha256(data).hexdigest()[:16]


def cache_bytes(text: str) -> bytes:
    """A cache's bytes exactly as atomic_write writes them, so a record's hash can be taken before the write."""
    return (text.strip() + "\n").encode("utf-8")


def image_stamp(path: Path) -> str:
    """An image's size and mtime: one stat per image, so a rerun over 100k images stays cheap. A replaced image
    (a new file, an edit, a copy) changes it; a copy that keeps both size and mtime would not be noticed."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def read_caption(path: Path) -> tuple[str | None, str | None]:
    """A UTF-8 text file (BOM allowed), stripped, and the hash of its bytes; (None, None) when missing or blank.
    The one reader of caption files. Raises ItemError when it cannot be read or decoded."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        raise ItemError(f"cannot read {path.name}: {e.strerror or e}") from e
    if not data.strip():
        return None, None
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ItemError(f"{path.name} is not valid UTF-8 (byte {e.start}); re-save it as UTF-8") from e
    return (text or None), digest(data)


def read_text(path: Path) -> str | None:
    return read_caption(path)[0]


def read_cache(path: Path) -> str | None:
    """A finished cache's text for the export; one that cannot be read counts as missing."""
    try:
        return read_text(path)
    except ItemError:
        return None


def atomic_write(path: Path, text: str) -> None:
    """Write via a hidden temporary file in the same folder and rename: readers never see half a file."""
    with atomic_file(path) as f:
        f.write(text.strip() + "\n")


@contextlib.contextmanager
def atomic_file(path: Path, errors: str = "strict"):
    """A UTF-8 text file to write, renamed into place when the block ends; removed if it fails."""
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors=errors) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_temporary(path: Path) -> tuple[int, Path]:
    """A new hidden `.{name}.{random}.tmp` beside path (the name STALE_TEMPORARY recognises), opened for writing.
    Created with mode 0o666 so the kernel applies the user's umask: the file that the rename leaves is as readable
    as any other file the user's programs write (mkstemp's 0600 would survive the rename)."""
    while True:
        tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.tmp"
        try:
            return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # another writer's temporary of the same file: draw another name
            continue


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
    """A JPEG data URL of the image, upright RGB, its longest side at most max_side, for served vision models."""
    img = load_image(path, min_side=max_side)
    img.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return data_url("image/jpeg", buffer.getvalue())


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def own_bytes_url(path: Path, max_side: int) -> str | None:
    """The file's own bytes as a data URL where a served model can take them as they are; None where the image
    must be converted (image_data_url). Reads the file and its header; decodes no pixels."""
    try:
        data = path.read_bytes()
    except OSError:
        return None  # load_image says why
    mime = sendable_mime(data, max_side)
    return data_url(mime, data) if mime else None


def sendable_mime(data: bytes, max_side: int) -> str | None:
    """The MIME type of an image that needs no conversion, from its header: a JPEG, PNG or WebP, RGB or 8-bit
    greyscale (a server converts that to RGB without loss; vLLM does), opaque, one frame, both sides within
    max_side, upright as stored (EXIF orientation absent or 1) and whole as far as its last bytes tell (a
    truncated file is converted, which reports it). None for anything else, unreadable files included."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            mime = SENDABLE_FORMATS.get(img.format)
            if (mime is None or img.mode not in ("RGB", "L") or "transparency" in img.info
                    or getattr(img, "n_frames", 1) > 1 or max(img.size) > max_side
                    or img.width * img.height > MAX_IMAGE_PIXELS or not looks_whole(data, img.format)):
                return None
            # The base class's getexif: PNG's own decodes the pixels first, to look for EXIF after them.
            if Image.Image.getexif(img).get(ORIENTATION_TAG, 1) != 1:
                return None
            return mime
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def looks_whole(data: bytes, fmt: str) -> bool:
    """Whether the file ends as its format ends: a JPEG's end-of-image marker, a PNG's IEND chunk, a WebP as
    long as its RIFF header says."""
    if fmt == "JPEG":
        return data.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return data.endswith(b"IEND\xaeB`\x82")
    return len(data) >= int.from_bytes(data[4:8], "little") + 8


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
PREAMBLE_STOP_WORDS = frozenset("a an the is are of for this that here my your and or in on at with to s".split())
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


ECHO_WORD = re.compile(r"\w+")
ECHO_SEPARATORS = " \t\r\n.,:;!?-\u2013\u2014"


def strip_echo(text: str, prompt: str | None) -> str:
    """text without the prompt at its start, however the model re-spelled it: BLIP lower-cases the prompt and
    spaces its tokens ("describe this image in detail ." for "Describe this image in detail."), an uncased
    tokenizer drops accents, one that splits words by characters spaces them apart. So the two are compared as
    their words' letters alone, and the echo is cut after the text's word where the prompt's letters end."""
    text = text.strip()
    target = "".join(fold_word(w) for w in ECHO_WORD.findall(prompt or ""))
    seen = ""
    for match in ECHO_WORD.finditer(text) if target else ():
        seen += fold_word(match.group())
        if seen == target:
            return text[match.end():].lstrip(ECHO_SEPARATORS).strip()
        if not target.startswith(seen):
            break
    return text


def fold_word(word: str) -> str:
    """A word without case or accents, as uncased tokenizers give it back."""
    return "".join(c for c in unicodedata.normalize("NFKD", word.casefold()) if not unicodedata.combining(c))


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[^\W_]+", text.translate(APOSTROPHES).lower())} - PREAMBLE_STOP_WORDS


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
    if is_refusal(text):
        return f"refusal: {text[:60]!r}"
    return None


def is_refusal(text: str) -> bool:
    """A refusal whatever its apostrophes (straight, typographic, modifier letter), letter case and wrapping quotes."""
    return bool(REFUSAL.match(unwrap_quotes(text.strip()).translate(APOSTROPHES)))


def estimate_tokens(text: str) -> int:
    return len(text) // 4 + 1


def process_share(total: int, index: int, count: int) -> int:
    """This process's whole-number share of a per-run budget; the shares add up to the total exactly."""
    return total // count + (1 if index < total % count else 0)


def claimed_chunks(total: int, size: int, claim: Callable[[], int] | None = None) -> Iterator[range]:
    """The chunks of a list of `total` that this process does, each claimed when the one before is done with:
    chunk n is [n*size, (n+1)*size). claim() hands out the next chunk number from a counter shared by all
    processes, each number once; without one, this process does every chunk, in order."""
    for n in (itertools.count() if claim is None else iter(claim, None)):
        if n * size >= total:
            return
        yield range(n * size, min((n + 1) * size, total))


def first_line(error: Exception) -> str:
    """Library errors can run to pages (download hints, tracebacks): one line is enough for a person."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def redact(text: str, secret: str | None) -> str:
    text = re.sub(r"(https?://)[^/@\s]+@", r"\1***@", text)  # credentials inside a URL
    return text.replace(secret, "***") if secret else text


def printable(text: str) -> str:
    """text as any UTF-8 terminal or log takes it: a file name that is not valid UTF-8 (Python keeps its bytes as
    lone surrogates) shows those bytes as \\xNN, as `ls -b` does, instead of crashing the print."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that stand for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def json_line(record: dict) -> str:
    """One JSON line with names readable as they are. A name that is not valid UTF-8 keeps its bytes as \\udcNN
    escapes (valid JSON, and json.loads then os.fsencode give back the exact name) where UTF-8 cannot hold them."""
    text = json.dumps(record, ensure_ascii=False)
    return LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


# --------------------------------------------------------------------------------------------
# Records: what made each cache
# --------------------------------------------------------------------------------------------

RECORDS_DIR = ".enhance_captions"  # hidden: trainers, imagefolder loaders and walk_images never look inside
RECORDS_FILE = "records.jsonl"
JOURNAL_DIR = "journal"
KIND_GENERATED, KIND_COMBINED = "generated", "combined"


def settings_id(kind: str, values: dict) -> str:
    return kind[:1] + "-" + digest(json.dumps(values, sort_keys=True, ensure_ascii=False).encode("utf-8"))[:12]


@dataclasses.dataclass(frozen=True, slots=True)  # one per cache: 400k of them at 200k images
class Record:
    """What made one cache file. `sha` is the hash of the bytes as written; the inputs are hashes too."""

    sha: str
    settings: str
    image: str | None = None      # image_stamp() of the image the caption was made from
    manual: str | None = None     # hash of the manual caption file's bytes (None: there was none)
    generated: str | None = None  # hash of the vision caption's bytes the merge was made from
    combined: str | None = None   # hash of the combined caption's bytes a --write_captions file copies
    commit: str | None = None     # the vision model's resolved revision, when known
    adopted: bool = False         # found without a record and taken as it is
    by_hand: bool = False         # saved by a person from the review page: theirs, kept like any hand edit
    made: str | None = None       # when the record was written

    def line(self, cache: str) -> dict:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False)}
        return {"cache": cache, **fields}

    @classmethod
    def from_line(cls, row: dict) -> Record:
        return cls(**{name: row.get(name, default) for name, default in RECORD_FIELDS})


RECORD_FIELDS = tuple((f.name, f.default) for f in dataclasses.fields(Record))  # read once: 40k lines a rerun
OURS, EDITED, UNRECORDED = "ours", "edited", "unrecorded"


class Records:
    """The record of every cache this script wrote, in `.enhance_captions/` at the dataset root.

    `records.jsonl` holds one JSON line per cache (and one per distinct set of settings); each process appends
    what it writes to a journal of its own, `journal/<time>-<host>-<pid>.jsonl`, so processes and machines on a
    shared filesystem never write the same file. A record is appended before its cache is renamed into place:
    a kill between the two leaves the old file with the record before it, which is kept for exactly that
    (`previous`), so a cache is never mistaken for a hand edit. The main process folds the journals into
    records.jsonl at the end of a run; a journal left by a killed run is read, and folded in by the next run."""

    def __init__(self, root: Path):
        self.root, self.folder = root, root / RECORDS_DIR
        self.latest: dict[str, Record] = {}
        self.previous: dict[str, Record] = {}
        self.settings: dict[str, dict] = {}
        self.journal = None
        self.lock = threading.Lock()

    def key(self, path: Path) -> str:
        text, root = str(path), str(self.root)
        if text.startswith(root + os.sep):  # what relative_to would give, without its cost (40k calls a rerun)
            return text[len(root) + 1:].replace(os.sep, "/")
        return path.relative_to(self.root).as_posix()

    # -- reading ----------------------------------------------------------------------------------
    def load(self) -> Records:
        for path in [self.folder / RECORDS_FILE, *self.journals()]:
            self._read(path)
        return self

    def journals(self) -> list[Path]:
        try:
            return sorted((self.folder / JOURNAL_DIR).glob("*.jsonl"))  # named by start time: oldest first
        except OSError:
            return []

    def _read(self, path: Path) -> None:
        try:
            handle = open(path, encoding="utf-8", errors="surrogateescape")
        except OSError:
            return
        with handle:
            for line in handle:
                try:
                    row = json.loads(line)
                    if "settings" in row and "values" in row:
                        self.settings[row["settings"]] = row["values"]
                    else:
                        self._remember(row["cache"], Record.from_line(row))
                except (ValueError, KeyError, TypeError):  # a line a kill cut short, or a person's typo
                    continue

    def _remember(self, key: str, record: Record) -> None:
        old = self.latest.get(key)
        if old is not None and old.sha != record.sha:
            self.previous[key] = old
        self.latest[key] = record

    def match(self, path: Path, sha: str | None) -> tuple[str, Record | None]:
        """Is the cache file with this hash ours (and by which record), edited by hand, or unrecorded?"""
        if not self.latest:  # none recorded (or none read: --refresh none): no path to work out
            return UNRECORDED, None
        key = self.key(path)
        latest = self.latest.get(key)
        if latest is None:
            return UNRECORDED, None
        if sha == latest.sha:
            return (EDITED if latest.by_hand else OURS), latest
        previous = self.previous.get(key)
        if previous is not None and sha == previous.sha and not previous.by_hand:
            return OURS, previous
        return EDITED, latest

    # -- writing ----------------------------------------------------------------------------------
    def write(self, path: Path, record: Record, values: dict | None = None) -> None:
        """Append one record to this process's journal (the settings line first, the first time they are used)."""
        record = dataclasses.replace(record, made=time.strftime("%Y-%m-%dT%H:%M:%S"))
        lines = []
        if values is not None and self.settings.get(record.settings) != values:
            self.settings[record.settings] = values
            lines.append({"settings": record.settings, "values": values})
        key = self.key(path)
        lines.append(record.line(key))
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in lines)
        with self.lock:
            if self.journal is None:
                self.journal = self._open_journal()
            self.journal.write(text)
            self.journal.flush()  # in the kernel before the cache is renamed: a SIGKILL loses neither
            self._remember(key, record)

    def _open_journal(self):
        folder = self.folder / JOURNAL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}.jsonl"
        return open(folder / name, "a", encoding="utf-8", errors="surrogateescape")

    def close(self) -> None:
        with self.lock:
            if self.journal is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self.journal.fileno())
                self.journal.close()
                self.journal = None

    def compact(self) -> int:
        """Fold every journal into records.jsonl (main process, once every process has finished writing).
        Where a kill left two candidates for one cache, the one that matches the file wins. Returns the number
        of journals folded in."""
        self.close()
        journals = self.journals()
        if not journals:
            return 0
        merged = Records(self.root)
        merged._read(self.folder / RECORDS_FILE)
        touched: set[str] = set()
        for journal in journals:
            before = dict(merged.latest)
            merged._read(journal)
            touched.update(k for k, r in merged.latest.items() if before.get(k) is not r)
        for key in touched:
            merged._settle(key)
        merged._write_compacted()
        for journal in journals:
            with contextlib.suppress(OSError):
                journal.unlink()
        return len(journals)

    def _settle(self, key: str) -> None:
        """Keep the one record that stands for the file as it is now."""
        try:
            sha = digest((self.root / key).read_bytes())
        except OSError:  # the cache is gone: so is its record
            self.latest.pop(key, None)
            self.previous.pop(key, None)
            return
        previous = self.previous.pop(key, None)
        if previous is not None and self.latest[key].sha != sha and previous.sha == sha:
            self.latest[key] = previous

    def _write_compacted(self) -> None:
        used = {r.settings for r in self.latest.values()}
        with atomic_file(self.folder / RECORDS_FILE, errors="surrogateescape") as f:  # written line by line
            for sid in sorted(used & self.settings.keys()):
                f.write(json.dumps({"settings": sid, "values": self.settings[sid]}, ensure_ascii=False) + "\n")
            for key in sorted(self.latest):
                f.write(json.dumps(self.latest[key].line(key), ensure_ascii=False) + "\n")


def write_cache(records: Records, path: Path, text: str, record: Record, values: dict | None) -> None:
    """The one writer of a cache: its record goes to the journal, then the file is renamed into place."""
    records.write(path, dataclasses.replace(record, sha=digest(cache_bytes(text))), values)
    atomic_write(path, text)


def server_reason(error: Exception, secret: str | None) -> str:
    """A refusing server's own explanation, one line, key redacted, in place of the client's `Error code: 400 - {...}`.
    The openai client keeps the body's "error" object, or the body itself: OpenAI, vLLM and llama.cpp put a
    "message" in it, FastAPI servers (`transformers serve`) a "detail", Ollama a bare string."""
    body = getattr(error, "body", None)
    text = (body.get("message") or body.get("detail")) if isinstance(body, dict) else body
    if text is not None and not isinstance(text, str):
        text = json.dumps(text)
    if not text or not text.strip():
        text = getattr(error, "message", None) or str(error) or type(error).__name__
    return redact((text.strip().splitlines() or [""])[0], secret)[:300]


def model_names(served: Sequence[str], most: int = 10) -> str:
    names = ", ".join(served[:most])
    return names + f", and {len(served) - most} more" if len(served) > most else names


def same_origin(url: str, other: str) -> bool:
    """Scheme, host and port equal: the same server, so the same key may go to both."""
    def origin(u: str) -> tuple:
        parts = urlsplit(u.strip())
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)
    return origin(url) == origin(other)


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


ENDPOINT_SETTINGS = {  # what a person changes to fix each endpoint, named in its error lines
    STAGE_LLM: {"url": "--base_url", "model": "--model", "key": "OPENAI_API_KEY"},
    STAGE_VISION: {"url": "--vlm_base_url", "model": "--vlm_model", "key": "--vlm_api_key or VLM_API_KEY"},
}


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

    def __init__(self, base_url: str | None, api_key: str | None, model: str | None, limiter: RateLimiter,
                 max_retries: int, timeout: float, max_tokens: int, temperature: float, stage: str = STAGE_LLM,
                 pooled: bool = False):
        import openai

        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.pooled = pooled  # one request per complete(): the pool retries a failed one on another endpoint
        self.settings = ENDPOINT_SETTINGS[stage]
        self.limiter, self.api_key = limiter, api_key
        self.openai = openai
        http = openai.DefaultAsyncHttpxClient(
            event_hooks={"request": [self._before_request], "response": [self._after_response]}
        )
        # A local server needs no key, but the client insists on one.
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "not-needed",
                                         max_retries=max_retries, timeout=timeout, http_client=http)
        self.retrying: dict[int, Any] = {}

    def client_with_retries(self, retries: int):
        """The client allowed `retries` transport retries; one copy per count, so a copy's cached platform
        details are not looked up again (in a thread) for every request."""
        if retries not in self.retrying:
            self.retrying[retries] = self.client.with_options(max_retries=retries)
        return self.retrying[retries]

    async def _before_request(self, request) -> None:
        if request.method != "POST":
            return
        attempts = ATTEMPTS.get()
        if attempts is not None and attempts.stopping.is_set():
            raise Stopped  # the openai client may be about to retry: once stopping, nothing new is sent
        request.extensions["limiter_entry"] = await self.limiter.acquire(self._estimate(request))
        if attempts is not None and attempts.stopping.is_set():
            raise Stopped  # the limiter's wait ended just as the stop came
        count_request()

    def _estimate(self, request) -> int:
        """The tokens a request may spend, for --tpm; without a token limit, a vision request's ~100 KB body
        is not parsed for nothing."""
        if not self.limiter.tokens:
            return 0
        try:
            body = json.loads(request.content or b"{}")
        except ValueError:
            body = {}
        return estimate_tokens(request.content.decode("utf-8", "replace")) + int(body.get("max_tokens") or 0)

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

    async def check(self) -> str:
        """Fail fast, before any model loads, on an endpoint that is down, refuses the key or does not serve the
        model. Returns the model to use: the one configured, or without one the endpoint's only listed model."""
        served = await self._served_models()
        if self.model is None:
            self.model = self._only_model(served)
        elif served is None or self.model not in served:
            await self._probe(served)  # llama.cpp lists one name and answers to any: only a request tells
        return self.model

    async def _served_models(self) -> list[str] | None:
        """The model names the endpoint lists; None when it lists none (some servers have no /models)."""
        o = self.openai
        try:
            page = await self.client.with_options(max_retries=1, timeout=PREFLIGHT_TIMEOUT).models.list()
        except (o.AuthenticationError, o.PermissionDeniedError) as e:
            raise FatalEndpointError(self._explain(e)) from e
        except o.APIConnectionError as e:
            raise FatalEndpointError(f"cannot reach the endpoint {self._url()}: {type(e).__name__}; is the server "
                                     f"running and {self.settings['url']} right?") from e
        except o.APIError:
            return None
        return [m.id for m in page.data]

    def _only_model(self, served: list[str] | None) -> str:
        if served and len(served) == 1:
            return served[0]
        flag = self.settings["model"]
        if not served:
            raise FatalEndpointError(f"no {flag} given, and the endpoint {self._url()} lists no models: "
                                     f"name one with {flag} or OPENAI_MODEL")
        raise FatalEndpointError(f"no {flag} given, and the endpoint {self._url()} serves {len(served)} models "
                                 f"({model_names(served)}): pick one with {flag} or OPENAI_MODEL")

    async def _probe(self, served: list[str] | None) -> None:
        """A one-token request for a model the endpoint does not list: vLLM and OpenAI refuse an unknown model with
        404, a `transformers serve` pinned to one model with 400; a server that answers to any name says 200."""
        o = self.openai
        try:
            await self.client.with_options(max_retries=1).chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        except (o.NotFoundError, o.BadRequestError) as e:
            raise FatalEndpointError(f"the endpoint {self._url()} refused {self.settings['model']} {self.model!r} "
                                     f"({e.status_code}: {self._reason(e)}); it serves: "
                                     f"{model_names(served) if served else 'no models listed'}") from e
        except (o.AuthenticationError, o.PermissionDeniedError) as e:
            raise FatalEndpointError(self._explain(e)) from e
        except o.APIError:
            pass  # it answered (busy, rate limited, a broken reply) without refusing the name: the run will tell

    def _url(self) -> str:
        return redact(str(self.client.base_url), self.api_key)

    def _reason(self, e: Exception) -> str:
        return server_reason(e, self.api_key)

    def _explain(self, e: Exception) -> str:
        url, key = self._url(), self.settings["key"]
        status = getattr(e, "status_code", None)
        if status == 401:
            return f"the endpoint {url} rejected the API key (401: {self._reason(e)}); check {key}"
        if status == 403:
            return f"the endpoint {url} refused access (403: {self._reason(e)}); check {key} and its permissions"
        if status == 404:
            return (f"the endpoint {url} answered 404 for {self.settings['model']} {self.model!r} ({self._reason(e)}): "
                    f"unknown model or wrong {self.settings['url']}")
        return f"the endpoint {url} failed: {self._reason(e)}"

    async def complete(self, messages: list[dict]) -> Reply:
        o = self.openai
        attempts = ATTEMPTS.get()
        # The client's transport retries come out of the item's budget: it may retry as often as attempts are left.
        retries = 0 if self.pooled else None if attempts is None else max(attempts.left - 1, 0)
        client = self.client if retries is None else self.client_with_retries(retries)
        try:
            response = await client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=self.temperature)
        except (o.AuthenticationError, o.PermissionDeniedError, o.NotFoundError) as e:
            raise FatalEndpointError(self._explain(e)) from e
        except o.RateLimitError as e:  # the client gives up at once on a long Retry-After; the limiter waits it out
            raise RetryableReply(f"rate limited (429): {self._reason(e)}") from e
        except o.APIStatusError as e:
            error = EndpointDown if e.status_code >= 500 else ItemError
            raise error(f"endpoint answered {e.status_code}: {self._reason(e)}") from e
        except o.APITimeoutError as e:
            raise EndpointDown("request timed out (--timeout)") from e
        except o.APIConnectionError as e:  # ConnectError (httpx, httpx2): no connection was made at all
            raise EndpointDown(f"connection failed: {redact(str(e), self.api_key)[:200]}",
                               refused=type(e.__cause__).__name__ == "ConnectError") from e
        except (o.APIResponseValidationError, ValueError) as e:
            raise RetryableReply(f"invalid reply from the endpoint: {type(e).__name__}") from e
        if not getattr(response, "choices", None):
            raise RetryableReply("reply has no choices")
        choice = response.choices[0]
        return Reply(choice.message.content or "", choice.finish_reason)

    async def close(self) -> None:
        await self.client.close()


@dataclasses.dataclass
class PoolMember:
    """One endpoint of a pool and how it has fared."""

    chat: EndpointChat
    in_flight: int = 0
    sent: int = 0
    failures: int = 0  # failed requests in a row
    back_at: float = 0.0  # set aside until this time (the pool's clock)
    aside: float = 0.0  # how long it was set aside last; 0 once it answers again
    reason: str = ""


class EndpointPool:
    """Several endpoints serving one model, in EndpointChat's place. A request goes to the endpoint with the fewest
    in flight; each has its own limiter (so --rpm and --tpm hold per endpoint) and sends one request per call, no
    transport retries of its own. An endpoint that stops answering (a refused connection, or SET_ASIDE_AFTER
    failures in a row) is set aside with one warning line and used again after SET_ASIDE_SECONDS, doubled each
    time it fails again on its return. The request that failed goes to another endpoint, out of the item's
    attempts (ATTEMPTS). With every endpoint set aside no endpoint is left: FatalEndpointError ends the run."""

    def __init__(self, chats: Sequence[EndpointChat], warn: Callable[[str], None] | None = None,
                 clock=time.monotonic, sleep=asyncio.sleep):
        self.members = [PoolMember(chat) for chat in chats]
        self.warn = warn or warn_stderr
        self.clock, self.sleep = clock, sleep

    async def check(self) -> str:
        """Every endpoint's own check. The first settles the model (the one configured, or the one it lists); the
        others must serve that model. Any one failing is an error that names it."""
        first, *rest = self.members
        model = await first.chat.check()
        for member in rest:
            member.chat.model = model
        for result in await asyncio.gather(*(m.chat.check() for m in rest), return_exceptions=True):
            if isinstance(result, BaseException):
                raise result
        return model

    async def complete(self, messages: list[dict]) -> Reply:
        attempts = ATTEMPTS.get()
        last: PoolMember | None = None
        tries = 0
        while True:
            member = self._pick(avoid=last)
            if member is last:  # no other endpoint to go to: back off, as the client's own retries would
                await self.sleep(min(8.0, 0.5 * 2 ** (tries - 1)) * (0.5 + random.random()))
            member.in_flight += 1
            member.sent += 1
            try:
                reply = await member.chat.complete(messages)
            except EndpointDown as e:
                self._failed(member, e)
                if attempts is None or attempts.left <= 0:
                    raise EndpointDown(f"{member.chat._url()}: {e}", e.refused) from e
                last, tries = member, tries + 1
                continue
            finally:
                member.in_flight -= 1
            member.failures, member.aside = 0, 0.0
            return reply

    def _pick(self, avoid: PoolMember | None = None) -> PoolMember:
        """The endpoint with the fewest requests in flight, then the fewest sent; another than `avoid` if any."""
        now = self.clock()
        ready = [m for m in self.members if m.back_at <= now]
        if not ready:
            raise FatalEndpointError("no endpoint left, every one is set aside: " + "; ".join(
                f"{m.chat._url()} ({m.reason})" for m in self.members))
        return min(ready, key=lambda m: (m is avoid, m.in_flight, m.sent))

    def _failed(self, member: PoolMember, error: EndpointDown) -> None:
        member.failures += 1
        member.reason = str(error)
        now = self.clock()
        if member.back_at > now:  # set aside already, by a request that failed before this one
            return
        if not (error.refused or member.failures >= SET_ASIDE_AFTER or member.aside):  # aside: just back, on trial
            return
        member.aside = min(2 * member.aside or SET_ASIDE_SECONDS, SET_ASIDE_MAX_SECONDS)
        member.back_at = now + member.aside
        left = sum(m.back_at <= now for m in self.members)
        self.warn(f"warning: endpoint {member.chat._url()} set aside for {member.aside:.0f} s ({error}); "
                  + (f"its requests go to the others ({left} left)" if left else "no endpoint is left"))

    async def close(self) -> None:
        for member in self.members:
            await member.chat.close()


def warn_stderr(message: str) -> None:
    """A warning from inside a stage, where no Reporter reaches: printed between the progress bars, as Reporter does."""
    from tqdm import tqdm

    tqdm.write(printable(message), file=sys.stderr)


class LocalChat:
    """A transformers causal LM in this process; concurrent requests are gathered into batches."""

    def __init__(self, model_id: str, device, dtype, batch_size: int, max_tokens: int, temperature: float,
                 revision: str = "main", trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        common = {"revision": revision, "trust_remote_code": trust_remote_code}
        check_model_source(model_id, "--local_llm", revision)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_id, **common)
            self.model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **common).to(device).eval()
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load --local_llm {model_id}: {first_line(e)}") from e
        except Exception as e:
            if not is_damaged_weights(e):
                raise
            raise UsageError(f"cannot load --local_llm {model_id}: its weights are damaged ({first_line(e)}); "
                             "download it again") from e
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


class OverBudget(ItemError):
    """Every reply was longer than the trainer's token budget: the last one, for the caller to cut."""

    def __init__(self, text: str, problem: str):
        super().__init__(problem)
        self.text, self.problem = text, problem


async def complete_item(backend, messages: list[dict], max_retries: int, manual: str | None = None,
                        must_keep: Sequence[str] = (), *, stopping: asyncio.Event | None = None,
                        sleep=asyncio.sleep, too_long: Callable[[str], str | None] | None = None) -> str:
    """Ask until the reply is usable, in at most max_retries + 1 requests in all. The openai client retries
    transport faults (5xx, resets, timeouts) with its own backoff; here bad replies (broken, empty, refused, cut
    off) are asked again; the request hook counts both against one budget (Attempts). The kept tokens are put
    first by construction. A reply that `too_long` finds over the token budget is asked again with its count and
    the limit; OverBudget carries the last one when none fits. Raises Stopped once `stopping` is set, and sends
    nothing after it."""
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
            if problem:
                continue
            text = keep_tokens_first(text, must_keep)
            over = too_long(text) if too_long else None
            if over is None:
                return text
            if attempts.left <= 0:
                raise OverBudget(text, f"{over} (after {max_retries + 1} attempts)")
            messages = messages + [{"role": "assistant", "content": reply.text or ""},
                                   {"role": "user", "content": f"That caption is too long: {over}. Write it again, "
                                                               "shorter, keeping every fact of the manual caption."}]
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


# Switches of processors that cut an image into tiles, each tile at the processor's size, and tile counts of those
# that tile without a switch: the image they start from can be many times the size, by a rule of their own.
TILING_SWITCHES = ("do_image_splitting", "split_image", "crop_to_patches", "do_pan_and_scan")
TILE_COUNTS = ("max_image_tiles", "max_patches", "max_num_tiles", "dynamic_hd")


def decode_side(image_processor) -> int:
    """The side both of an image's sides may be decoded down to without losing what the processor keeps: the
    largest size it may resize or tile to, or 0 (decode in full) where that size cannot be bounded."""
    side = resize_side(image_processor)
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if side and pinpoints:  # LLaVA-NeXT, OneVision: the image is resized to one of these grids, then tiled
        return max([side] + [int(v) for point in pinpoints for v in point])
    if not tiles(image_processor):
        return side
    tile = getattr(image_processor, "max_image_size", None)
    if side and getattr(image_processor, "do_image_splitting", False) and isinstance(tile, dict) \
            and set(tile) == {"longest_edge"}:  # Idefics3, SmolVLM: resized to `size`, split into tiles of this
        return max(side, int(tile["longest_edge"]))
    return 0  # tiles by a rule we cannot bound (crops of the full image, a grid of up to N tiles)


def tiles(image_processor) -> bool:
    """Whether the processor may cut the image into tiles: its switch says so, or, without one, it has a tile count."""
    switches = [getattr(image_processor, name) for name in TILING_SWITCHES
                if getattr(image_processor, name, None) is not None]
    if switches:
        return any(switches)
    return any(getattr(image_processor, name, None) for name in TILE_COUNTS)


def resize_side(image_processor) -> int:
    """The largest side the processor's resize aims at (height/width, shortest_edge, longest_edge), or 0 when it
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

    def __getstate__(self) -> dict:
        # Spawned decoding workers receive the captioner to prepare batches: the processor, never the model's weights.
        return {key: value for key, value in self.__dict__.items() if key != "model"}

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
        # plain captioners (BLIP, PaliGemma) echo a prompt with their own token edits: strip_prompt removes it
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [self.strip_prompt(t) for t in texts]

    def strip_prompt(self, text: str) -> str:
        """The caption without an echo of the prompt, for every kind that decodes text: plain captioners return
        the prompt before the caption, and a chat model may open its answer by repeating the instruction."""
        return strip_echo(text, self.prompt)


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
    check_model_source(cfg.model_id, "--model_id", cfg.revision)
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
        except Exception as e:  # a damaged weights file (safetensors' own error) or a broken checkpoint
            if not is_damaged_weights(e):
                raise
            raise UsageError(f"cannot load {cfg.model_id}: its weights are damaged ({first_line(e)}); download "
                             "it again") from e
    if model is None:
        raise UsageError(f"{cfg.model_id} is not an image-to-text model; supported: {LocalCaptioner.KINDS}")
    if "device_map" not in kwargs:
        model = model.to(device)
    model.eval()

    generate_kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": False}
    if cfg.repetition_penalty:
        generate_kwargs["repetition_penalty"] = cfg.repetition_penalty
    return LocalCaptioner(processor, model, cfg.prompt, cfg.vlm_system_prompt, generate_kwargs)


def check_model_source(name: str, flag: str, revision: str = "main") -> None:
    """Fail in seconds where loading would fail slowly or obscurely: a path that is no folder, or a Hub id that is
    not in the cache while the Hub cannot be reached (huggingface_hub tries each missing file six times over about
    25 s, and a model has several). A local folder or a cached model costs no request."""
    if name.startswith((".", "/", "~")):
        if not Path(name).expanduser().is_dir():
            raise UsageError(f"{flag}: no such folder: {name}")
        return
    if Path(name).is_dir():
        return
    import huggingface_hub
    from huggingface_hub import constants, errors

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json", revision=revision), str):
            return
    except errors.HFValidationError:
        return  # not a Hub id at all: the loader says so
    offline = (f"to run offline, pass a local folder, or download it beforehand (hf download {name}) "
               "and set HF_HUB_OFFLINE=1")
    if huggingface_hub.is_offline_mode():
        raise UsageError(f"{flag} {name} is not in the model cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                         f"forbids downloading it; {offline}")
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(name, "config.json", revision=revision),
                                             timeout=HUB_CHECK_TIMEOUT)
    except errors.HfHubHTTPError:
        return  # the Hub answers (unknown, gated, private): the loader explains
    except Exception as e:  # a network error of whichever HTTP library this huggingface_hub uses
        raise UsageError(f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) to download {flag} {name} "
                         f"({type(e).__name__}); {offline}") from e


def is_damaged_weights(error: Exception) -> bool:
    """safetensors reports a truncated or garbled file with its own exception type, outside OSError/ValueError."""
    return type(error).__name__ in ("SafetensorError", "HeaderTooLarge", "UnpicklingError")


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


class Collate:
    """The DataLoader's collate_fn: a batch of decoded images becomes the processor's inputs, in the worker.
    A class, not a closure: workers started by spawn (the default on macOS and Windows) unpickle it."""

    def __init__(self, captioner: LocalCaptioner):
        self.captioner = captioner

    def __call__(self, batch):
        captioner = self.captioner
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

    def __init__(self, verbosity: int, is_main: bool, stream=None, processes: int = 1):
        self.verbosity, self.is_main, self.processes = verbosity, is_main, processes
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
            tqdm.write(printable(message), file=self.stream)

    def progress(self, name: str, total: int | None) -> Progress:
        """Counts this process's items; only the main process prints, so with several the label says it is a share.
        Several processes take their work as they go: then total is None, and the count has no end to show."""
        if self.processes > 1:
            name = f"{name} (this process's share, 1 of {self.processes})"
        return Progress(self, name, total, enabled=self.is_main and self.verbosity >= 1 and total != 0)


class Progress:
    def __init__(self, reporter: Reporter, name: str, total: int | None, enabled: bool, every: float = 5.0):
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
        if self.total is None:
            return f"{self.name}: {self.done} done ({rate:.2f}/s)"
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        return f"{self.name}: {self.done}/{self.total} ({rate:.2f}/s, ETA {eta_text})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.total is None:  # no total reached to print the last count at (0: none here)
            self.reporter._write(self.line())


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


class AsyncStage:
    """Bounded concurrent workers on an event loop thread; any thread can submit items.

    `handle(item)` does one item and raises ItemError to fail it; FatalEndpointError stops the stage.
    The workers take the items of `source` first (this process's claimed chunks, see SharedWork), then what
    submit() passes on, until close().
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, concurrency: int,
                 handle: Callable[[Item], Any], stats: Stats, progress: Progress, stop: threading.Event,
                 source: Iterable = ()):
        self.loop, self.name, self.handle = loop, name, handle
        self.stats, self.progress, self.stop = stats, progress, stop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.source: Iterator | None = iter(source)
        self.done = asyncio.run_coroutine_threadsafe(self._run(concurrency), loop)

    def submit(self, item: Item | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def close(self) -> None:
        self.submit(None)

    async def _run(self, concurrency: int) -> None:
        self.taking = asyncio.Lock()
        workers = [asyncio.create_task(self._work()) for _ in range(concurrency)]
        await asyncio.gather(*workers)

    async def _next(self) -> Item | None:
        async with self.taking:  # one worker at a time draws from the source
            if self.source is not None and not self.stop.is_set():  # stopping: claim nothing more
                item = await asyncio.to_thread(next, self.source, None)  # a claim is a store round trip
                if item is not None:
                    return item
            self.source = None
        return await self.queue.get()

    async def _work(self) -> None:
        while True:
            item = await self._next()
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
        except concurrent.futures.TimeoutError:  # not yet the builtin TimeoutError before Python 3.11
            continue


def caption_locally(items: Sequence[Item], captioner: LocalCaptioner, cfg: Config, stats: Stats,
                    progress: Progress, reporter: Reporter, stop: threading.Event,
                    keep: Callable[[Item, str], None], batches: Iterable[range]) -> None:
    """The vision loop: decode in DataLoader workers, generate per batch, keep each batch's captions at once
    (`keep(item, text)` writes the cache on the writer thread and passes the item on). `batches` are the
    positions in `items` of this process's batches, claimed as the DataLoader asks for the next."""
    import torch

    with torch_threads_set(model_threads(captioner.model.device, cfg.num_workers, torch.get_num_threads())):
        caption_batches(items, captioner, cfg, stats, progress, reporter, stop, keep, batches)


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
                    keep: Callable[[Item, str], None], batches: Iterable[range]) -> None:
    from torch.utils.data import DataLoader

    def save(item: Item, text: str) -> None:  # on the writer thread, so saving overlaps the next batch
        try:
            keep(item, text)
        except OSError as e:
            stats.fail(item.image, STAGE_VISION, f"cannot write {item.generated_path.name}: {e.strerror or e}")
            return
        stats.count(STAGE_VISION, "done")

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
            writer.submit(save, item, text)
            reporter.detail(f"captioned {item.image}")
        progress.update(len(indices) + len(errors))

    # The loader draws a batch's positions in this process, a few batches ahead of the model (2 per worker), and
    # the workers decode them: claiming stays here, decoding stays in the workers.
    loader = DataLoader(ImageFolder(items, captioner.decode_side), batch_sampler=batches,
                        num_workers=cfg.num_workers, collate_fn=Collate(captioner),
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


REASON_MISSING = "missing"
REASON_MANUAL = "manual changed"
REASON_IMAGE = "image changed"
REASON_GENERATED = "generated edited"
REASON_SETTINGS = "settings changed"
REASON_OVERWRITE = "--overwrite"
REFRESH_MODES = ("inputs", "settings", "none")


class Settings:
    """The settings that change each kind of cache's text; a record keeps the id of those that made it."""

    def __init__(self, vision: dict, merge: dict, variants: Sequence[Variant]):
        self.variants = list(variants)
        self.vision, self.vision_id = vision, settings_id(KIND_GENERATED, vision)
        self.merges = {v.name: merge | {"system_prompt": digest(v.system_prompt.encode("utf-8"))} for v in variants}
        self.merge_ids = {name: settings_id(KIND_COMBINED, values) for name, values in self.merges.items()}


def variants_of(cfg: Config) -> list[Variant]:
    return [Variant("", cfg.system_prompt)] + [Variant(name, prompt) for name, prompt in cfg.variants]


def run_settings(cfg: Config) -> Settings:
    if cfg.vlm_base_url:
        vision = {"served_model": cfg.vlm_model, "max_side": cfg.vlm_max_side}
    else:
        vision = {"model_id": cfg.model_id, "revision": cfg.revision, "quantization": cfg.quantization,
                  "repetition_penalty": cfg.repetition_penalty}
    vision |= {"prompt": cfg.prompt, "vlm_system_prompt": cfg.vlm_system_prompt, "max_new_tokens": cfg.max_new_tokens}
    merge = {"backend": "local" if cfg.local_llm else "endpoint", "model": cfg.local_llm or cfg.model,
             "keep_tokens": cfg.keep_tokens, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens,
             "prefix": cfg.prefix, "suffix": cfg.suffix, "max_caption_tokens": cfg.max_caption_tokens,
             "caption_tokenizer": cfg.caption_tokenizer}
    return Settings(vision, merge, variants_of(cfg))


@dataclasses.dataclass(frozen=True)
class CacheFile:
    """A cache file as planning found it."""

    sha: str | None = None          # hash of its bytes; None: no file, or a blank one (both count as missing)
    text: str | None = None         # its text, when it is valid UTF-8
    error: str | None = None        # why its text cannot be used
    status: str = UNRECORDED        # OURS, EDITED or UNRECORDED (see Records.match)
    record: Record | None = None


def inspect_cache(records: Records, path: Path) -> CacheFile:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return CacheFile()
    except OSError as e:  # unreadable: nothing can use it, and nothing may replace it
        return CacheFile(sha="unreadable", error=f"cannot read {path.name}: {e.strerror or e}", status=EDITED)
    if not data.strip():
        return CacheFile()
    sha = digest(data)
    status, record = records.match(path, sha)
    try:
        return CacheFile(sha, data.decode("utf-8-sig").strip(), None, status, record)
    except UnicodeDecodeError as e:
        return CacheFile(sha, None, f"{path.name} is not valid UTF-8 (byte {e.start})", status, record)


@dataclasses.dataclass
class Plan:
    items: list[Item]
    to_generate: list[Item]
    to_combine: list[Merge]
    failures: list[Failure]
    stale: list[Path] = dataclasses.field(default_factory=list)  # temporaries of a killed run
    cached_generated: int = 0
    cached_combined: int = 0
    records: Records | None = None
    settings: Settings | None = None
    adopt: list[tuple[Path, Record]] = dataclasses.field(default_factory=list)  # written once the lock is ours
    trainer_captions: collections.Counter | None = None  # --write_captions: written, current, kept


def plan_work(cfg: Config) -> Plan:
    """Find the images, read each one's caches, manual caption and records once, and decide what it needs."""
    stale: list[Path] = []
    images, failures = walk_images(cfg.dataset_dir, stale)
    items, conflicts = pair_items(images, cfg.caption_extension)
    records = Records(cfg.dataset_dir)
    # --refresh none trusts every cache as it is: no record is needed to judge one; but the --write_captions files
    # are copies kept in step, and only their records tell this script's copy from a hand edit
    if cfg.refresh != "none" or cfg.write_captions:
        records.load()
    plan = Plan(items, [], [], failures + conflicts, stale, records=records, settings=run_settings(cfg))
    budget = cfg.limit
    for item in items:
        try:
            decide(item, cfg, plan)
        except ItemError as e:
            plan.failures.append(Failure(str(item.image), STAGE_INPUT, str(e)))
            for merge in item.merges:  # the vision caption may still be made: the merges wait for the fix
                merge.reason = None
        merges = [m for m in item.merges if m.reason]
        if (item.vision or merges) and budget is not None:
            if budget <= 0:
                item.vision, merges = None, []
                for merge in item.merges:
                    merge.reason = None
                continue
            budget -= 1
        plan.cached_generated += item.generated is not None and item.vision is None
        plan.cached_combined += sum(m.text is not None and m.reason is None for m in item.merges)
        if item.vision:
            plan.to_generate.append(item)
        plan.to_combine += merges
    return plan


def decide(item: Item, cfg: Config, plan: Plan) -> None:
    """The one decision per item: what is redone and why, what is kept as a hand edit, what is adopted."""
    records, settings = plan.records, plan.settings
    try:
        item.stamp = image_stamp(item.image)
    except OSError as e:
        raise ItemError(f"cannot read: {e.strerror or e}") from e
    gen = inspect_cache(records, item.generated_path)
    item.merges = [Merge(item, variant) for variant in settings.variants]
    try:
        item.manual, item.manual_sha = read_caption(item.caption_path)
    except ItemError:
        if gen.sha is None and cfg.cache_generated:  # caption the image now; merge once the caption is fixed
            item.vision = REASON_MISSING
        raise
    item.generated, item.generated_sha = gen.text, gen.sha
    refresh = cfg.refresh != "none"

    if gen.sha is not None:
        if cfg.overwrite in ("generated", "all"):
            item.vision = REASON_OVERWRITE
        elif not refresh:
            pass
        elif gen.status == EDITED:
            item.kept += (KIND_GENERATED,)
        elif gen.status == UNRECORDED:
            adopt(plan, item, KIND_GENERATED, Record(gen.sha, settings.vision_id, image=item.stamp))
        else:
            item.vision = stale_vision(gen.record, item, cfg, settings)
    if item.vision:
        item.generated = None  # it is being made again: nothing downstream may use the old text

    for merge in item.merges:
        decide_merge(merge, cfg, plan, refresh)

    if item.generated is None and not item.vision and any(m.reason and m.unless is None for m in item.merges):
        if gen.error:  # a hand-edited vision caption that cannot be read: never replaced, so no merge either
            raise ItemError(f"{gen.error}; re-save it as UTF-8 (or delete it to caption the image again)")
        item.vision = REASON_MISSING  # a merge needs a vision caption that is not there


def decide_merge(merge: Merge, cfg: Config, plan: Plan, refresh: bool) -> None:
    item, settings = merge.item, plan.settings
    found = inspect_cache(plan.records, merge.path)
    merge.text, merge.sha = found.text, found.sha
    if found.sha is None:
        merge.reason = REASON_MISSING
    elif cfg.overwrite in ("combined", "all"):
        merge.reason = REASON_OVERWRITE
    elif not refresh:
        pass
    elif found.status == EDITED:
        item.kept += (merge.variant.kind,)
    elif found.status == UNRECORDED:
        record = Record(found.sha, settings.merge_ids[merge.variant.name], image=item.stamp, manual=item.manual_sha,
                        generated=item.generated_sha)
        adopt(plan, item, merge.variant.kind, record)
        stale_merge(record, merge, cfg, settings)  # adopted as it is now; a vision caption made again may change it
    else:
        stale_merge(found.record, merge, cfg, settings)


def stale_vision(record: Record, item: Item, cfg: Config, settings: Settings) -> str | None:
    if record.image != item.stamp:
        return REASON_IMAGE
    if cfg.refresh == "settings" and record.settings != settings.vision_id:
        return REASON_SETTINGS
    return None


def stale_merge(record: Record, merge: Merge, cfg: Config, settings: Settings) -> None:
    """Why a merge made by this script is out of date, if it is. Where the vision caption is being made again,
    the merge waits for it: it is redone only if the new caption differs from the one it was made from."""
    item = merge.item
    if record.manual != item.manual_sha:
        merge.reason = REASON_MANUAL
    elif item.vision is None and item.generated_sha is not None and record.generated != item.generated_sha:
        merge.reason = REASON_GENERATED
    elif cfg.refresh == "settings" and record.settings != settings.merge_ids[merge.variant.name]:
        merge.reason = REASON_SETTINGS
    elif item.vision is not None:
        merge.reason, merge.unless = item.vision, record.generated
    elif item.generated_sha is None and record.image != item.stamp:  # vision caption deleted, image replaced
        item.vision = REASON_IMAGE
        merge.reason, merge.unless = REASON_IMAGE, record.generated


def adopt(plan: Plan, item: Item, kind: str, record: Record) -> None:
    """A cache without a record (an earlier version, another tool) is taken as it is, and recorded as it is now."""
    plan.adopt.append((item.cache_path(kind), dataclasses.replace(record, adopted=True)))
    item.adopted += (kind,)


class SharedWork:
    """How the processes of one run share its work, through the key-value store that torch.distributed already
    runs for the process group. Every process plans the same sorted lists, so a chunk number names the same items
    everywhere. Each stage hands out its chunk numbers from its own counter (the store's atomic add): a process
    takes the next chunk when it is done with its last, so one that drew slow images or slow merges takes fewer,
    and all finish close together. A process that dies leaves only its claimed chunks undone, for the rerun.
    At the end each process leaves its Stats in the store and the main process waits for them without a deadline:
    a collective there times out (NCCL's default is 10 minutes) when one process finishes long after the others,
    and takes the summary, the report and the export with it. The keys carry the run's id, so a rerun in the same
    store never sees old counts. One process has no store, and takes every chunk in order."""

    def __init__(self, store=None, run_id: str = "", rank: int = 0, processes: int = 1):
        self.store, self.run_id, self.rank, self.processes = store, run_id, rank, processes

    @classmethod
    def of(cls, state, run_id: str) -> SharedWork:
        if state.num_processes == 1:
            return cls()
        from torch.distributed.distributed_c10d import _get_default_store

        return cls(_get_default_store(), run_id, state.process_index, state.num_processes)

    def key(self, name: str) -> str:
        return f"enhance_captions/{self.run_id}/{name}"

    def chunks(self, stage: str, total: int, size: int) -> Iterator[range]:
        claim = None if self.store is None else lambda: self.store.add(self.key(stage), 1) - 1
        return claimed_chunks(total, size, claim)

    def items(self, stage: str, items: Sequence, size: int) -> Iterator:
        return (items[i] for chunk in self.chunks(stage, len(items), size) for i in chunk)

    def gather(self, stats: Stats, waiting: Callable[[str], None]) -> Stats:
        """On the main process, the Stats of every process; on the others, their own, once left for the main one."""
        if self.store is None:
            return stats
        if self.rank:
            self.store.set(self.key(f"stats/{self.rank}"), pickle.dumps(stats))
            return stats
        total = Stats()
        total.merge(stats)
        for rank in range(1, self.processes):
            key = self.key(f"stats/{rank}")
            self.wait(key, lambda: waiting(f"waiting for process {rank + 1} of {self.processes} to finish its work"))
            total.merge(pickle.loads(self.store.get(key)))
        return total

    def wait(self, key: str, waiting: Callable[[], None]) -> None:
        """Wait for a key in one wait, not in slices: torch logs two warning lines for every wait that runs out.
        A SIGTERM still ends this process at once (the launcher passes a Ctrl-C on to its processes as one)."""
        if not self.store.check([key]):
            waiting()
            self.store.wait([key], datetime.timedelta(seconds=STATS_WAIT))




# --------------------------------------------------------------------------------------------
# run(): orchestration for one process
# --------------------------------------------------------------------------------------------


def make_chat(cfg: Config, state):
    """The LLM client factory: the endpoint (or a pool of them) with this process's share of the rate limits, or a
    local LLM."""
    if cfg.local_llm:
        quiet_transformers(cfg.verbosity)
        return LocalChat(cfg.local_llm, state.device, resolve_dtype(cfg.dtype, state.device), cfg.batch_size,
                         cfg.max_tokens, cfg.temperature, trust_remote_code=cfg.trust_remote_code)
    urls = cfg.base_url or (None,)
    return endpoint_chat(cfg, state, STAGE_LLM, [(url, cfg.api_key) for url in urls], cfg.model, cfg.rpm, cfg.tpm,
                         cfg.max_tokens, cfg.temperature)


def endpoint_chat(cfg: Config, state, stage: str, endpoints: Sequence[tuple[str | None, str | None]],
                  model: str | None, rpm: int, tpm: int, max_tokens: int, temperature: float):
    """The one place that builds endpoint clients: each (url, key) gets its own limiter with this process's share of
    --rpm/--tpm, which so hold per endpoint. Several endpoints make an EndpointPool."""
    pooled = len(endpoints) > 1
    chats = []
    for url, key in endpoints:
        limiter = RateLimiter(requests=process_share(rpm, state.process_index, state.num_processes),
                              tokens=process_share(tpm, state.process_index, state.num_processes),
                              shared=shared_pause(cfg, state, stage, url if pooled else None))
        chats.append(EndpointChat(url, key, model, limiter, cfg.max_retries, cfg.timeout, max_tokens, temperature,
                                  stage=stage, pooled=pooled))
    return EndpointPool(chats) if pooled else chats[0]


def shared_pause(cfg: Config, state, stage: str, url: str | None = None) -> SharedPause | None:
    """Where several processes call one endpoint, a 429's pause reaches all of them; one process keeps it in memory.
    In a pool each endpoint has its own pause, its file named with a short hash of its URL."""
    if state.num_processes == 1:
        return None
    name = stage if url is None else f"{stage}-{digest(url.encode('utf-8'))[:8]}"
    return SharedPause(cfg.dataset_dir / PAUSE_NAME.format(stage=name))


def make_vision_chat(cfg: Config, state) -> EndpointChat | EndpointPool:
    return endpoint_chat(cfg, state, STAGE_VISION, list(zip(cfg.vlm_base_url, cfg.vlm_api_keys)), cfg.vlm_model,
                         cfg.vlm_rpm, 0, cfg.max_new_tokens, 0.0)


def run(cfg: Config, plan: Plan, state, reporter: Reporter, stop: StopEvent, *,
        make_captioner=load_captioner, make_llm=make_chat, count_tokens: Callable[[str], int] | None = None,
        work: SharedWork | None = None) -> Stats:
    """Caption and merge the chunks of the plan this process claims; returns its Stats for main() to gather.
    The merges of the images it captions follow them; the other merges are claimed by their own counter."""
    stats = Stats()
    work = work or SharedWork()
    generating = {id(i) for i in plan.to_generate}
    vision_items = plan.to_generate
    llm_only = [m for m in plan.to_combine if id(m.item) not in generating]
    n_llm = len(plan.to_combine)
    if not vision_items and not n_llm:
        return stats
    alone = work.store is None  # several processes: this one's part is known only once it is done
    chunk = min(REQUEST_CHUNK, cfg.concurrency)

    events = EventLoopThread(stop)
    chat = None
    llm_stage: AsyncStage | None = None
    llm_progress = reporter.progress("llm", n_llm if alone else None)
    records, settings = plan.records, plan.settings
    commit: str | None = None  # the vision model's resolved revision, once it is loaded

    def keep_caption(item: Item, text: str) -> None:
        """A new vision caption: cached with its record (when caching), then on to the merge."""
        item.generated, item.generated_sha = text, digest(cache_bytes(text))
        if cfg.cache_generated:
            write_cache(records, item.generated_path, text, Record("", settings.vision_id, image=item.stamp,
                                                                   commit=commit), settings.vision)
        forward(item)

    def dress(text: str, kept: Sequence[str]) -> str:  # the --prefix and --suffix, once each
        return apply_affixes(text, cfg.prefix, cfg.suffix, kept)

    def over_budget(text: str, kept: Sequence[str]) -> str | None:
        return budget_problem(dress(text, kept), cfg.max_caption_tokens, count_tokens) if count_tokens else None

    async def merge(job: Merge) -> None:
        item, variant, manual = job.item, job.variant, job.item.manual
        kept = keep_token_parts(manual, cfg.keep_tokens)
        try:
            text = dress(await complete_item(chat, llm_messages(item, variant.system_prompt, manual), cfg.max_retries,
                                             manual, kept, stopping=events.stopping,
                                             too_long=lambda t: over_budget(t, kept)), kept)
        except OverBudget as e:  # cut at a sentence or comma boundary, the fixed and kept parts intact
            text = training_caption(e.text, kept, cfg, count_tokens)
            stats.note(item.image, STAGE_LLM, f"{job.path.name}: {e.problem}; cut to {count_tokens(text)} tokens")
        record = Record("", settings.merge_ids[variant.name], image=item.stamp, manual=item.manual_sha,
                        generated=item.generated_sha)
        await asyncio.to_thread(write_cache, records, job.path, text, record, settings.merges[variant.name])
        job.text = text  # (the thread above: an fsync must not stall the loop)
        reporter.detail(f"merged {job.path}")

    def start_llm() -> AsyncStage:
        nonlocal chat
        chat = make_llm(cfg, state)
        return AsyncStage(events.loop, STAGE_LLM, cfg.concurrency, merge, stats, llm_progress, stop,
                          work.items(STAGE_LLM, llm_only, chunk))

    def forward(item: Item) -> None:  # a new generated caption goes on to the LLM, if that runs already
        if llm_stage is None:
            return
        for job in item.merges:
            if job.wanted():
                llm_stage.submit(job)
            elif job.reason:  # the vision caption came out as before: the merge made from it stands
                unchanged_merge(records, job)
                stats.count(STAGE_LLM, "unchanged")
                llm_progress.update()

    # A local LLM waits for the vision model to leave the GPU; an endpoint can start at once.
    overlap = cfg.overlap and not cfg.local_llm
    try:
        if n_llm and overlap:
            llm_stage = start_llm()
        if vision_items:
            vision_progress = reporter.progress("vision", len(vision_items) if alone else None)
            if cfg.vlm_base_url:
                caption_served(cfg, state, events, work.items(STAGE_VISION, vision_items, chunk), stats,
                               vision_progress, stop, keep_caption)
            else:
                captioner = make_captioner(cfg, state.device)
                commit = getattr(captioner.model.config, "_commit_hash", None)
                caption_locally(vision_items, captioner, cfg, stats, vision_progress, reporter, stop, keep_caption,
                                work.chunks(STAGE_VISION, len(vision_items), cfg.batch_size))
                captioner = None
                release_memory()
            vision_progress.close()
        if n_llm and llm_stage is None and not stop.is_set():
            llm_stage = start_llm()
            for item in vision_items:
                if item.generated is not None:  # captioned here, by this process
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


def unchanged_merge(records: Records, job: Merge) -> None:
    """Record that the merged caption now stands for the new image (its vision caption did not change)."""
    _, record = records.match(job.path, job.sha)
    if record is not None:
        records.write(job.path, dataclasses.replace(record, image=job.item.stamp))


def caption_served(cfg: Config, state, events: EventLoopThread, items: Iterable[Item], stats: Stats,
                   progress: Progress, stop: threading.Event, keep: Callable[[Item, str], None]) -> None:
    """The vision stage through an OpenAI-compatible vision endpoint: no torch model is loaded."""
    chat = make_vision_chat(cfg, state)
    prompt = cfg.prompt or DEFAULT_CHAT_PROMPT

    async def describe(item: Item) -> None:
        url = await asyncio.to_thread(own_bytes_url, item.image, cfg.vlm_max_side)
        if url is None:
            url = await events.loop.run_in_executor(converters, image_data_url, item.image, cfg.vlm_max_side)
        messages = vision_messages(url, cfg, prompt)
        text = await complete_item(chat, messages, cfg.max_retries, stopping=events.stopping)
        await asyncio.to_thread(keep, item, text)

    # Most images go as they are; the rest are converted here, a thread per core: PIL lets go of the GIL while
    # it decodes, resizes and encodes, so threads use every core without a process pool's start-up and pickling.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="vlm-convert") as converters:
        stage = AsyncStage(events.loop, STAGE_VISION, cfg.concurrency, describe, stats, progress, stop, items)
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
        try:
            check_writable(self.path)  # the caches are written beside the images: find out now, not once per image
            handle = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), "r+", encoding="utf-8")
        except OSError as e:
            return f"cannot write in the dataset folder {self.path.parent}: {e.strerror or e}; the caches are " \
                   "written beside the images, so the folder must be writable"
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


def check_writable(path: Path) -> None:
    """Raise OSError unless a file can be created beside path (a read-only folder or file system)."""
    fd, tmp = create_temporary(path)
    os.close(fd)
    os.unlink(tmp)


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


def preflight(cfg: Config, plan: Plan, state) -> Config:
    """Find every model and reach every endpoint that the plan needs before any model loads; raise
    FatalEndpointError or UsageError if one fails. Returns cfg with the LLM's model where the endpoint chose it."""
    if plan.to_generate and not cfg.vlm_base_url:
        check_model_source(cfg.model_id, "--model_id", cfg.revision)
    llm = vision = None
    if plan.to_combine and cfg.local_llm:
        check_local_model(cfg)
    elif plan.to_combine:
        llm = make_chat(cfg, state)
    if plan.to_generate and cfg.vlm_base_url:
        vision = make_vision_chat(cfg, state)

    async def check_all() -> str | None:
        try:
            model = await llm.check() if llm else cfg.model
            if vision:
                await vision.check()
            return model
        finally:
            for chat in (llm, vision):
                if chat:
                    await chat.close()

    model = asyncio.run(check_all()) if llm or vision else cfg.model
    return dataclasses.replace(cfg, model=model, model_from_list=True) if model != cfg.model else cfg


def check_local_model(cfg: Config) -> None:
    """Find the local LLM's config (cache, path or Hub) before the vision stage spends an hour."""
    from transformers import AutoConfig

    check_model_source(cfg.local_llm, "--local_llm")
    quiet_transformers(cfg.verbosity)
    try:
        AutoConfig.from_pretrained(cfg.local_llm, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise FatalEndpointError(f"cannot load --local_llm {cfg.local_llm}: {first_line(e)}") from e


def adopt_unrecorded(plan: Plan) -> str | None:
    """Record the caches found without a record, as they are now (main process, once the lock is ours)."""
    settings = plan.settings
    values = {settings.vision_id: settings.vision} | {settings.merge_ids[n]: v for n, v in settings.merges.items()}
    try:
        for path, record in plan.adopt:
            plan.records.write(path, record, values.get(record.settings))
    except OSError as e:
        return f"cannot write the records in {plan.records.folder}: {e.strerror or e}"
    return None


def plan_lines(plan: Plan) -> list[str]:
    """What planning decided, counted by reason."""
    vision = collections.Counter(i.vision for i in plan.to_generate)
    merge = collections.Counter(m.reason for m in plan.to_combine)
    kept = collections.Counter(k for i in plan.items for k in i.kept)
    adopted = collections.Counter(k for i in plan.items for k in i.adopted)
    stale = collections.Counter(why for i in plan.items for why in {i.vision, *(m.reason for m in i.merges)}
                                if why)  # images, once per reason: not each of their caches
    conditional = sum(m.unless is not None for m in plan.to_combine)

    def breakdown(counter) -> str:
        return ", ".join(f"{n} {why}" for why, n in sorted(counter.items())) or "none"

    lines = [
        f"  to caption: {len(plan.to_generate)} ({breakdown(vision)})",
        f"  to merge: {len(plan.to_combine)} ({breakdown(merge)})"
        + (f", {conditional} of them only if the new vision caption differs" if conditional else ""),
        "  stale: " + ", ".join(f"{stale[why]} {why}" for why in
                                (REASON_MANUAL, REASON_IMAGE, REASON_GENERATED, REASON_SETTINGS)),
        f"  edited by hand (kept): {sum(kept.values())} ({breakdown(kept)})",
        f"  adopted: {sum(adopted.values())} ({breakdown(adopted)})",
    ]
    return lines


def plan_items(plan: Plan) -> Iterable[str]:
    """What planning decided for each item that is not simply current (-v)."""
    for item in plan.items:
        if item.vision:
            yield f"    caption {item.image}: {item.vision}"
        for merge in item.merges:
            if merge.reason:
                yield f"    merge {item.image}{f' ({merge.variant.name})' if merge.variant.name else ''}: {merge.reason}"
        for kind in item.kept:
            yield f"    kept {item.cache_path(kind)}: edited by hand"
        for kind in item.adopted:
            yield f"    adopted {item.cache_path(kind)}"


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
    for merge in plan.to_combine:
        item = merge.item
        generated = estimate_tokens(item.generated) if item.generated else cfg.max_new_tokens
        prompt_tokens += estimate_tokens(merge.variant.system_prompt + build_user_message(item.manual, "")) + generated
    lines = [
        f"dry run: {len(plan.items)} images under {cfg.dataset_dir} (--refresh {cfg.refresh})",
        f"  {run_description(cfg)}",
        f"  vision captions to make: {len(plan.to_generate)} ({plan.cached_generated} cached)",
        f"  LLM calls to make: {len(plan.to_combine)} ({plan.cached_combined} cached)",
        *plan_lines(plan),
        *(plan_items(plan) if cfg.verbosity >= 2 else ()),
        f"  estimated LLM tokens: ~{prompt_tokens:,} in, up to {len(plan.to_combine) * cfg.max_tokens:,} out",
        f"  problems: {len(problems)}",
    ]
    lines += [f"    {f.path}: {f.error}" for f in problems]
    return lines


def summary_lines(plan: Plan, stats: Stats) -> list[str]:
    cached = {STAGE_VISION: plan.cached_generated, STAGE_LLM: plan.cached_combined}
    lines = [f"{stage}: {c['done']} done, {cached[stage] + c['unchanged']} from cache, {c['failed']} failed"
             for stage, c in stats.counts.items()]
    lines += plan_lines(plan)
    if plan.trainer_captions is not None:
        c = plan.trainer_captions
        lines.append(f"  trainer captions: {c['written']} written, {c['current']} current, "
                     f"{c['kept']} edited by hand (kept)")
    inputs = sum(f.stage == STAGE_INPUT for f in stats.failures)
    if inputs:
        lines.append(f"input: {inputs} skipped")
    lines += [f"NOTE {n.path} [{n.stage}]: {n.note}" for n in stats.notes]
    lines += [f"FAILED {f.path} [{f.stage}]: {f.error}" for f in stats.failures]
    if stats.fatal:
        lines.append(f"error: {stats.fatal}")
    return lines


def write_trainer_captions(cfg: Config, plan: Plan, stats: Stats) -> list[str]:
    """--write_captions: each image's combined caption also at {stem}EXT, where the trainer reads it, kept in step
    with _combined.txt on every run. A file there that this script did not write, or that was edited since, is a
    person's: it is kept and reported. Returns a line per file kept (-v)."""
    records, settings = plan.records, settings_id("trainer", {"copy_of": KIND_COMBINED})
    counts, kept = collections.Counter(), []
    for item in plan.items:
        try:
            text, sha = read_caption(item.combined_path)
        except ItemError:
            text = None
        if text is None:
            continue
        target = item.image.with_suffix(cfg.write_captions)
        found = inspect_cache(records, target)
        if found.sha is not None and found.status == OURS and found.record.combined == sha:
            counts["current"] += 1
        elif found.sha is not None and found.status != OURS and found.text != text and cfg.overwrite != "all":
            counts["kept"] += 1
            kept.append(f"    kept {target}: not written by this script, or edited since")
        else:
            record = Record("", settings, combined=sha, adopted=found.sha is not None and found.status != OURS)
            try:
                write_cache(records, target, text, record, None)
            except OSError as e:
                stats.fail(item.image, STAGE_LLM, f"cannot write {target.name}: {e.strerror or e}")
                continue
            counts["written"] += 1
    plan.trainer_captions = counts
    return kept


def write_report(path: Path, failures: Iterable[Failure | Note | Finding], summary: dict) -> None:
    """A JSON line per failure (path, stage, error) or note (path, stage, note), then the summary record: the last
    line carries the run's exit code, which `accelerate launch` does not pass on (it exits 1 for any failure)."""
    lines = [json_line(dataclasses.asdict(f)) for f in failures] + [json_line({"summary": summary})]
    atomic_write(path, "\n".join(lines))


def report_summary(plan: Plan, stats: Stats) -> dict:
    """The run in numbers, for the report's last line."""
    cached = {STAGE_VISION: plan.cached_generated, STAGE_LLM: plan.cached_combined}
    summary: dict[str, Any] = {"exit_code": stats.exit_code()}
    for stage, counts in stats.counts.items():
        summary[stage] = {"done": counts["done"], "cached": cached[stage] + counts["unchanged"],
                          "failed": counts["failed"]}
    summary["skipped"] = sum(f.stage == STAGE_INPUT for f in stats.failures)
    summary["failed"] = len(stats.failures)
    summary["notes"] = len(stats.notes)
    summary["signal"] = signal.Signals(stats.signal).name if stats.signal else None
    summary["error"] = stats.fatal
    return summary


def write_export(cfg: Config, plan: Plan, warn: Callable[[str], None] | None = None) -> int:
    """Every image with a combined caption, in the trainer format that --export's file name names: metadata.jsonl or
    metadata.csv (Hugging Face imagefolder, at the dataset root, with an `approved` column from --review) or *.json
    (kohya fine-tuning metadata)."""
    target, fmt = export_target(cfg), export_format(cfg.export)
    approvals = load_approvals(cfg.dataset_dir)
    rows = []
    for item in plan.items:
        captions = export_captions(item)
        if captions is None:
            continue
        key = export_key(item, cfg, fmt)
        if not is_utf8(key):  # JSON and Arrow strings are UTF-8: one such name would make the whole file unloadable
            (warn or print_stderr)(f"warning: export skips {str(item.image)!r}: its file name is not valid UTF-8; "
                                   "rename it")
            continue
        columns = caption_columns(fmt, captions) | extra_columns(item, fmt)
        if fmt != "kohya":  # a column to filter on: its reader takes caption and tags only
            columns["approved"] = is_approved(approvals, plan.records, item)
        rows.append((key, columns))
    atomic_write(target, EXPORT_WRITERS[fmt](rows))
    return len(rows)


# --------------------------------------------------------------------------------------------
# Captions a trainer can use as they are: length budgets, fixed text, trainer formats, audit
# --------------------------------------------------------------------------------------------


def load_caption_tokenizer(name: str):
    """The trainer's text tokenizer (a Hub id or a folder), so that a caption is measured the way it will be cut."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise UsageError(f"cannot load --caption_tokenizer {name}: {first_line(e)}") from e


def count_caption_tokens(tokenizer, text: str) -> int:
    """The caption's length as the trainer counts it, start and end tokens included: CLIP's 77 positions hold
    <|startoftext|>, 75 tokens and <|endoftext|> (kohya's --max_token_length 75 is 77 here), T5's 512 hold its </s>."""
    # verbose=False: a caption over model_max_length is what is being measured here, not a mistake to warn about
    return len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


def caption_counter(cfg: Config) -> Callable[[str], int] | None:
    """count(text) with --caption_tokenizer, or None without a --max_caption_tokens budget."""
    if not cfg.max_caption_tokens:
        return None
    tokenizer = load_caption_tokenizer(cfg.caption_tokenizer)
    return lambda text: count_caption_tokens(tokenizer, text)


def budget_problem(text: str, budget: int, count: Callable[[str], int], what: str = "reply") -> str | None:
    """Why a caption is too long for the trainer, or None when it fits."""
    tokens = count(text)
    return f"{what} is {tokens} tokens, the limit is {budget}" if tokens > budget else None


def caption_parts(text: str) -> list[str]:
    """The comma-separated parts of a caption, as kohya's shuffle and --keep_tokens split it."""
    return [p.strip() for p in text.split(",") if p.strip()]


def join_caption(parts: Iterable[str]) -> str:
    """Parts joined by commas, so each stays a part of its own; after a finished sentence a space is enough."""
    text = ""
    for part in (p.strip() for p in parts):
        if part:
            text = part if not text else text + (" " if text[-1] in ".!?:;" else ", ") + part
    return text


def same_text(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()


def word_at(text: str, start: int, end: int) -> bool:
    """text[start:end] is whole words: no letter or digit runs on into it from either side."""
    return (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum())


def starts_with(text: str, part: str) -> bool:
    return same_text(text[:len(part)], part) and word_at(text, 0, len(part))


def ends_with(text: str, part: str) -> bool:
    """At the end, in any case; a closing full stop does not count."""
    text = text.rstrip(" .")
    return len(text) >= len(part) and same_text(text[-len(part):], part) and word_at(text, len(text) - len(part),
                                                                                      len(text))


def without_comma_part(text: str, part: str) -> str:
    parts = caption_parts(text)
    kept = [p for p in parts if not same_text(p, part)]
    return ", ".join(kept) if len(kept) < len(parts) else text


def apply_affixes(text: str, prefix: str, suffix: str, kept_parts: Sequence[str] = ()) -> str:
    """The fixed --prefix first, in front of the --keep_tokens parts, and the --suffix last, each exactly once and
    spelt as given: a reply that has one already, in any case, at its start or end stays as it is; one that has it as
    a comma part elsewhere gets it moved there rather than doubled. A suffix that is itself a kept part stays in front
    with the kept parts."""
    if prefix:
        if starts_with(text, prefix):
            text = prefix + text[len(prefix):]
        else:
            text = join_caption([prefix, without_comma_part(text, prefix)])
    if suffix and not any(same_text(suffix, part) for part in kept_parts):
        if ends_with(text, suffix):
            text = text.rstrip(" .")[:-len(suffix)] + suffix
        else:
            text = join_caption([without_comma_part(text, suffix), suffix])
    return text


def budget_head(kept_parts: Sequence[str], prefix: str) -> list[str]:
    """What leads every caption and is never cut: the prefix, then the kept parts, each once."""
    head: list[str] = []
    for part in ([prefix] if prefix else []) + list(kept_parts):
        if part and not any(same_text(part, h) for h in head):
            head.append(part)
    return head


def shorter_bodies(body: str) -> list[str]:
    """Cuts of body, longest first: after a sentence or before a comma; at a word only where no such cut is left."""
    clauses = [body[:m.end()] for m in re.finditer(r"[.!?](?=\s|$)", body)]
    clauses += [body[:m.start()] for m in re.finditer(",", body)]
    clauses = sorted({c.strip(" ,;:") for c in clauses} - {""}, key=len, reverse=True)
    words = {body[:m.start()].strip(" ,;:") for m in re.finditer(r"\s+", body)} - set(clauses) - {""}
    return clauses + sorted(words, key=len, reverse=True)


def fit_to_budget(text: str, kept_parts: Sequence[str], budget: int, count: Callable[[str], int],
                  prefix: str = "", suffix: str = "") -> str:
    """A caption of at most `budget` tokens: the prefix and kept parts intact at the front, the suffix at the end, and
    the description between them cut at its last sentence or comma boundary that fits. A trainer would cut it at
    the budget wherever that falls, kept tokens and suffix included."""
    if count(text) <= budget:
        return text
    head = budget_head(kept_parts, prefix)
    body = text
    for part in head:  # in front already (as apply_affixes leaves them), or else taken out of where they are
        body = body[len(part):].lstrip(" ,;:") if starts_with(body, part) else without_comma_part(body, part)
    if suffix:
        body = body.rstrip(" .")[:-len(suffix)].rstrip(" ,;:") if ends_with(body, suffix) else \
            without_comma_part(body, suffix)
    for cut in shorter_bodies(body):
        candidate = join_caption([*head, cut, suffix])
        if count(candidate) <= budget:
            return candidate
    return join_caption([*head, suffix])  # may still be over: budget_problem says so


def training_caption(text: str, kept_parts: Sequence[str], cfg: Config,
                     count: Callable[[str], int] | None = None) -> str:
    """A cleaned reply as the trainer gets it: the fixed text added, then cut to the token budget."""
    text = apply_affixes(text, cfg.prefix, cfg.suffix, kept_parts)
    if count is not None and cfg.max_caption_tokens:
        text = fit_to_budget(text, kept_parts, cfg.max_caption_tokens, count, cfg.prefix, cfg.suffix)
    return text


IMAGEFOLDER_NAMES = {"metadata.jsonl": "jsonl", "metadata.csv": "csv"}  # the names Hugging Face imagefolder looks for


def export_format(path: str) -> str:
    """The trainer format that an --export file name stands for: jsonl, csv or kohya."""
    name = Path(path).name
    if name in IMAGEFOLDER_NAMES:
        return IMAGEFOLDER_NAMES[name]
    if name.lower().endswith(".json"):
        return "kohya"
    raise UsageError(f"--export {path}: unknown format; name it metadata.jsonl or metadata.csv (Hugging Face "
                     "imagefolder) or NAME.json (kohya fine-tuning metadata)")


def export_target(cfg: Config) -> Path:
    target = Path(cfg.export).expanduser()
    return target if target.is_absolute() else cfg.dataset_dir / target


def export_captions(item: Item) -> dict[str, str] | None:
    """The finished captions of one image by variant name ("" for the combined caption); None when it has none.
    Read from the files: other processes made some of them."""
    captions = {m.variant.name: read_cache(m.path) for m in item.merges}
    if captions.get("") is None:
        return None
    return {name: text or "" for name, text in captions.items()}


def caption_columns(fmt: str, captions: dict[str, str]) -> dict[str, str]:
    """Variant names as the format's columns: text, text_short for imagefolder; caption, caption_short for kohya."""
    base = "caption" if fmt == "kohya" else "text"
    return {base + (f"_{name}" if name else ""): text for name, text in captions.items()}


def extra_columns(item: Item, fmt: str) -> dict[str, str]:
    """imagefolder rows also carry both inputs of the merge; kohya reads "caption" (and would append "tags")."""
    if fmt == "kohya":
        return {}
    return {"manual": item.manual or "", "generated": read_cache(item.generated_path) or item.generated or ""}


def export_key(item: Item, cfg: Config, fmt: str) -> str:
    """imagefolder: the path relative to the metadata file's folder, the dataset root, with forward slashes.
    kohya: the full path, which its fine-tuning dataset opens as it is (merge_captions_to_metadata.py --full_path);
    a bare stem would be searched for in one image_dir only, so images in subfolders would not be found."""
    if fmt == "kohya":
        return str(item.image)
    return item.image.relative_to(cfg.dataset_dir).as_posix()


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # a name that is not UTF-8 on disk arrives here with surrogate escapes
    except UnicodeEncodeError:
        return False
    return True


def print_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def jsonl_export(rows: list[tuple[str, dict[str, str]]]) -> str:
    return "\n".join(json.dumps({"file_name": key, **columns}, ensure_ascii=False) for key, columns in rows)


def csv_export(rows: list[tuple[str, dict[str, str]]]) -> str:
    names = ["file_name"] + list(dict.fromkeys(name for _, columns in rows for name in columns))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, restval="", lineterminator="\n")
    writer.writeheader()
    for key, columns in rows:
        writer.writerow({"file_name": key, **columns})
    return buffer.getvalue()


def kohya_export(rows: list[tuple[str, dict[str, str]]]) -> str:
    return json.dumps(dict(rows), ensure_ascii=False, indent=2)


EXPORT_WRITERS = {"jsonl": jsonl_export, "csv": csv_export, "kohya": kohya_export}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing in a finished dataset that would hurt training."""

    path: str
    kind: str
    detail: str


PHRASE_STOP_WORDS = frozenset(
    "a an the and or but of in on at to with without by for from as into onto over under near its it his her their "
    "this that these those is are was were be been being has have there here very some".split()
)
WORD = re.compile(r"\w+(?:['\u2019]\w+)*")
PHRASE_SHARE = 0.8  # a phrase in this share of the captions teaches the model nothing about any one image
PHRASE_MIN_CAPTIONS = 5  # in fewer captions than this, every shared phrase is "in 80% of them"
LOOP_REPEATS = 3


def phrase_words(text: str) -> list[list[str]]:
    """The caption's words in lower case, one list per clause: a phrase does not run across a comma or a full stop."""
    return [WORD.findall(clause) for clause in re.split(r"[,.;:!?]", text.casefold())]


def word_ngrams(text: str, sizes=range(2, 5)) -> set[str]:
    grams = set()
    for words in phrase_words(text):
        for n in sizes:
            grams.update(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return grams


def common_phrases(texts: Sequence[str], fixed: Iterable[str]) -> list[tuple[str, int]]:
    """Phrases of 2-4 words in at least PHRASE_SHARE of the texts, leaving out the fixed text (kept parts, prefix,
    suffix) and phrases of stop words only. Each is named once: not also the shorter phrases inside it, and
    overlapping ones chained ("in the style of", "the style of a", ... as one "in the style of a watercolor")."""
    if len(texts) < PHRASE_MIN_CAPTIONS:
        return []
    fixed_words = [f" {' '.join(w for clause in phrase_words(f) for w in clause)} " for f in fixed]
    counts = collections.Counter(gram for text in texts for gram in word_ngrams(text))
    found: list[str] = []
    for gram, n in sorted(counts.items(), key=lambda kv: (-len(kv[0].split()), kv[0])):
        if n < PHRASE_SHARE * len(texts) or set(gram.split()) <= PHRASE_STOP_WORDS:
            continue
        if any(f" {gram} " in f for f in fixed_words) or any(f" {gram} " in f" {longer} " for longer in found):
            continue
        found.append(gram)
    clauses = [[f" {' '.join(words)} " for words in phrase_words(text)] for text in texts]
    return [(phrase, sum(any(f" {phrase} " in c for c in cs) for cs in clauses)) for phrase in chain_phrases(found)]


def chain_phrases(grams: list[str]) -> list[str]:
    """Join phrases of one length that overlap in all but one word: "a b c d" and "b c d e" make "a b c d e"."""
    chains = []
    for size in sorted({len(g.split()) for g in grams}, reverse=True):
        group = [g.split() for g in grams if len(g.split()) == size]
        while group:
            chain, grown = group.pop(0), True
            while grown:
                grown = False
                for other in group:
                    if chain[1 - size:] == other[:size - 1]:
                        chain, grown = chain + other[size - 1:], True
                    elif other[1 - size:] == chain[:size - 1]:
                        chain, grown = other + chain[size - 1:], True
                    if grown:
                        group.remove(other)
                        break
            chains.append(" ".join(chain))
    return chains


def find_loop(text: str) -> str | None:
    """A sequence of 1-4 words repeated LOOP_REPEATS or more times in a row: a small vision model stuck in a loop."""
    words = WORD.findall(text.casefold())
    for i in range(len(words)):
        for n in range(1, 5):
            seq = words[i:i + n]
            repeats = 1
            while len(seq) == n and words[i + repeats * n:i + (repeats + 1) * n] == seq:
                repeats += 1
            if repeats >= LOOP_REPEATS:
                return f'"{" ".join(seq)}" {repeats} times in a row'
    return None


def read_finished(path: Path) -> tuple[str | None, Finding | None]:
    """A finished caption file's text, or the finding that it is missing, unreadable, empty or a refusal."""
    try:
        text = read_text(path)
    except ItemError as e:
        return None, Finding(str(path), "unreadable", str(e))
    if text is None:
        exists = path.exists()
        return None, Finding(str(path), "empty" if exists else "missing",
                             "blank file" if exists else "no combined caption yet (run without --audit to make it)")
    problem = reply_problem(text, None)
    if problem:
        return None, Finding(str(path), "refusal" if problem.startswith("refusal") else "empty", problem)
    return text, None


def audit_item(item: Item, cfg: Config, text: str, count: Callable[[str], int] | None) -> list[Finding]:
    """One combined caption against the trainer's settings: kept parts first, and within the token budget."""
    findings, path = [], str(item.combined_path)
    kept = keep_token_parts(item.manual, cfg.keep_tokens)  # planning read it (and reported it if it cannot)
    lead = budget_head(kept, cfg.prefix)
    missing = [part for part in kept if part not in text]
    if missing:
        findings.append(Finding(path, "keep_tokens", f"missing kept parts {missing}"))
    elif lead and [p.casefold() for p in caption_parts(text)[:len(lead)]] != [p.casefold() for p in lead]:
        findings.append(Finding(path, "keep_tokens", f"does not start with the kept parts {', '.join(lead)!r}"))
    if count is not None:
        problem = budget_problem(text, cfg.max_caption_tokens, count, what="caption")
        if problem:
            findings.append(Finding(path, "over_budget", problem))
    return findings


def audit_dataset(cfg: Config, plan: Plan, count: Callable[[str], int] | None = None) -> list[Finding]:
    """Everything in the finished captions that would hurt training; reads files only, calls nothing."""
    findings = [Finding(f.path, "input", f.error) for f in plan.failures]
    texts: list[tuple[Item, str]] = []
    fixed = [t for t in (cfg.prefix, cfg.suffix) if t]
    for item in plan.items:
        text, problem = read_finished(item.combined_path)
        if problem:
            findings.append(problem)
        else:
            texts.append((item, text))
            findings += audit_item(item, cfg, text, count)
        fixed += keep_token_parts(item.manual, cfg.keep_tokens)
        problem = generated_finding(item)
        if problem:
            findings.append(problem)
    findings += duplicate_findings(cfg, texts)
    findings += [Finding(str(cfg.dataset_dir), "phrase", f'"{gram}" is in {n} of {len(texts)} combined captions')
                 for gram, n in common_phrases([text for _, text in texts], fixed)]
    return findings


def generated_finding(item: Item) -> Finding | None:
    """A vision caption that a loop or a refusal spoilt: the merge carries its flaw into the combined caption."""
    text = read_cache(item.generated_path)
    if text is None:
        return None
    if is_refusal(text):
        return Finding(str(item.generated_path), "refusal", f"refusal: {text[:60]!r}")
    loop = find_loop(text)
    return Finding(str(item.generated_path), "loop", loop) if loop else None


def duplicate_findings(cfg: Config, texts: Sequence[tuple[Item, str]]) -> list[Finding]:
    """Different images with the same caption teach the trainer that they look the same."""
    groups = collections.defaultdict(list)
    for item, text in texts:
        groups[" ".join(text.casefold().split())].append(item)
    findings = []
    for group in (g for g in groups.values() if len(g) > 1):
        for item in group:
            others = ", ".join(o.image.relative_to(cfg.dataset_dir).as_posix() for o in group if o is not item)
            findings.append(Finding(str(item.combined_path), "duplicate", f"same caption as {others}"))
    return findings


def audit_lines(cfg: Config, plan: Plan, findings: Sequence[Finding]) -> list[str]:
    kinds = collections.Counter(f.kind for f in findings)
    lines = [f"audit: {len(plan.items)} images under {cfg.dataset_dir}, {len(findings)} findings"]
    lines += [f"  {kind}: {n}" for kind, n in sorted(kinds.items())]
    lines += [f"{f.kind} {f.path}: {f.detail}" for f in findings]
    return lines


def run_audit(cfg: Config) -> int:
    """--audit: report what in the finished captions would hurt training. No lock, no model, no request."""
    try:
        count = caption_counter(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    plan = plan_work(cfg)
    if not plan.items:
        print(f"error: no images ({' '.join(sorted(IMAGE_EXTENSIONS))}) found under {cfg.dataset_dir}", file=sys.stderr)
        return EXIT_USAGE
    findings = audit_dataset(cfg, plan, count)
    approved = approved_count(cfg, plan)
    lines = audit_lines(cfg, plan, findings)
    lines.insert(1, f"  reviewed: {approved} approved, {len(plan.items) - approved} not yet reviewed (--review)")
    print("\n".join(lines))
    code = EXIT_FAILED if findings else EXIT_OK
    if cfg.report:
        kinds = collections.Counter(f.kind for f in findings)
        write_report(cfg.report, findings, {"exit_code": code, "images": len(plan.items), "findings": dict(kinds),
                                            "approved": approved})
    return code


# --------------------------------------------------------------------------------------------
# Review page: each image beside its captions, state and findings; a person's edits saved as hand edits
# --------------------------------------------------------------------------------------------

APPROVALS_FILE = "approved.json"  # in RECORDS_DIR: {combined caption's key: hash of the bytes a person approved}
THUMB_SIDE = 320
PAGE_LIMIT = 200  # cards per request, at most
REVIEW_FILTERS = ("all", "flagged", "stale", "edited", "failed")
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
KIND_MANUAL, KIND_TRAINER = "manual", "trainer"
REVIEW_CHANGES = {"/api/save": "save", "/api/approve": "approve"}  # POST only
MAX_CHANGE_BYTES = 1 << 20


def load_approvals(root: Path) -> dict[str, str]:
    try:
        approvals = json.loads((root / RECORDS_DIR / APPROVALS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return approvals if isinstance(approvals, dict) else {}


def file_sha(path: Path) -> str | None:
    """The hash of a caption file's bytes as read_caption gives it; None when missing, blank or unreadable."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return digest(data) if data.strip() else None


def is_approved(approvals: dict[str, str], records: Records, item: Item) -> bool:
    """Approved: a person approved the combined caption exactly as it is now (an edit since un-approves it)."""
    sha = approvals.get(records.key(item.combined_path))
    return sha is not None and sha == file_sha(item.combined_path)


def approved_count(cfg: Config, plan: Plan) -> int:
    approvals = load_approvals(cfg.dataset_dir)
    return sum(is_approved(approvals, plan.records, item) for item in plan.items) if approvals else 0


def exposure_warning(host: str) -> str | None:
    """--host other than loopback: anyone who can reach it and has the address (token included) can edit."""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return None
    if host == "localhost":
        return None
    return (f"warning: --host {host}: the review page can be reached from other machines; anyone with its address "
            "(the token included) can read and change the captions")


def thumbnail(path: Path, stamp: str) -> bytes:
    """A JPEG of the image at most THUMB_SIDE a side, made on the fly; kept in memory by (path, stamp)."""
    return _thumbnail(str(path), stamp)


@functools.lru_cache(maxsize=2048)  # ~20 KB each: a few screens of cards scrolled back and forth
def _thumbnail(path: str, stamp: str) -> bytes:
    img = load_image(Path(path), min_side=THUMB_SIDE)
    img.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


@dataclasses.dataclass
class ReviewEntry:
    """One card: the item as planning decided it, and what the audit (and the last run's report) found."""

    id: str                   # the image's path in the dataset, with forward slashes: how the page names it
    item: Item
    findings: list[Finding]
    failures: list[str]       # why planning could not judge it, or why the last run failed it
    text: str = ""            # its captions in lower case, for the search

    def matches(self, show: str, query: str) -> bool:
        if query and query not in self.text:
            return False
        item = self.item
        return {"all": True, "flagged": bool(self.findings), "edited": bool(item.kept), "failed": bool(self.failures),
                "stale": bool(item.vision or any(m.reason for m in item.merges))}[show]


class Review:
    """What the review page shows and changes: one plan of the dataset, made at start and again when the page is
    loaded, and each item decided again after a save. Saves take the dataset lock for the moment of the write."""

    def __init__(self, cfg: Config, token: str):
        self.cfg, self.token = cfg, token
        self.root = os.path.realpath(cfg.dataset_dir)
        self.count = caption_counter(cfg)  # the trainer's tokenizer (no model), for --max_caption_tokens findings
        self.busy = threading.Lock()       # one save or planning at a time
        self.planned_unseen = False        # a plan no page has shown yet: the first page load uses it
        self.refresh()

    # -- the plan and its cards ---------------------------------------------------------------
    def refresh(self) -> None:
        with self.busy:
            plan = plan_work(dataclasses.replace(self.cfg, limit=None))
            findings = audit_dataset(self.cfg, plan, self.count)
            reported = self.reported_failures()
            entries = [ReviewEntry(item.image.relative_to(self.cfg.dataset_dir).as_posix(), item, [], [])
                       for item in plan.items]
            by_path = {str(p): e for e in entries for p in (e.item.image, *self.files(e.item).values())}
            notes = []
            for finding in findings:
                entry = by_path.get(finding.path)
                if entry is None:
                    notes.append(finding)
                elif finding.kind != "input":  # a failure to plan the item: shown as its state instead
                    entry.findings.append(finding)
            for failure in plan.failures:
                if failure.path in by_path:
                    by_path[failure.path].failures.append(failure.error)
            for entry in entries:
                item = entry.item
                if item.vision or any(m.reason for m in item.merges):  # a failure since fixed is not shown
                    entry.failures += [f"the last run: {why}" for why in reported.get(str(item.image), ())]
                entry.text = self.search_text(item)
            self.plan, self.entries, self.notes = plan, entries, notes
            self.by_id = {e.id: e for e in entries}
            self.approvals = load_approvals(self.cfg.dataset_dir)
            self.planned_unseen = True

    def reported_failures(self) -> dict[str, list[str]]:
        """--report FILE with --review: the failures of the run that wrote it, by image."""
        found = collections.defaultdict(list)
        if self.cfg.report is None:
            return found
        with contextlib.suppress(OSError):
            for line in self.cfg.report.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    row = json.loads(line)
                    if "error" in row:
                        found[row["path"]].append(f"[{row.get('stage')}] {row['error']}")
        return found

    def search_text(self, item: Item) -> str:
        return "\n".join(t for t in (item.manual, item.generated, *(m.text for m in item.merges)) if t).casefold()

    def files(self, item: Item) -> dict[str, Path]:
        """The caption files of one card, by kind: what the page may show, and the only files it may write."""
        files = {KIND_MANUAL: item.caption_path, KIND_GENERATED: item.generated_path}
        files |= {v.kind: item.cache_path(v.kind) for v in variants_of(self.cfg)}
        if self.cfg.write_captions:
            files[KIND_TRAINER] = item.image.with_suffix(self.cfg.write_captions)
        return files

    def inside(self, path: Path) -> bool:
        """In the dataset folder once every symlink is followed."""
        real = os.path.realpath(path)
        return real.startswith(self.root + os.sep)

    def listing(self, show: str, query: str, offset: int, limit: int, refresh: bool) -> dict:
        if refresh and not self.planned_unseen:  # a page loaded again: look at the folder again
            self.refresh()
        self.planned_unseen = False
        entries, query = self.entries, query.casefold().strip()
        chosen = [e for e in entries if e.matches(show, query)]
        return {"total": len(chosen), "offset": offset,
                "counts": {name: sum(e.matches(name, "") for e in entries) for name in REVIEW_FILTERS},
                "notes": [f"{f.kind}: {f.detail}" for f in self.notes],
                "items": [self.card(e) for e in chosen[offset:offset + limit]]}

    def card(self, entry: ReviewEntry) -> dict:
        item = entry.item
        captions = []
        for kind, path in self.files(item).items():
            text, sha, note = self.shown(path)
            label = {KIND_MANUAL: "manual caption", KIND_GENERATED: "vision caption", KIND_COMBINED: "combined caption",
                     KIND_TRAINER: "trainer caption (a copy of the combined caption, made by each run)"}.get(
                kind, f"combined caption, variant {kind.removeprefix(KIND_COMBINED + '_')}")
            captions.append({"kind": kind, "label": label, "file": path.name, "text": text, "sha": sha,
                             "note": note, "editable": kind != KIND_TRAINER and note in (None, "none yet")})
        return {"id": entry.id, "states": self.states(entry), "captions": captions,
                "findings": [{"kind": f.kind, "detail": f.detail, "file": Path(f.path).name} for f in entry.findings],
                "approved": is_approved(self.approvals, self.plan.records, item)}

    def shown(self, path: Path) -> tuple[str, str | None, str | None]:
        """A caption file as the page shows it: (text, hash of its bytes, why it is not shown or not editable)."""
        if not self.inside(path):
            return "", None, "outside the dataset folder (a symlink): not shown"
        try:
            text, sha = read_caption(path)
        except ItemError as e:
            return "", file_sha(path), f"{e}: not shown"
        return text or "", sha, None if text else "none yet"

    def states(self, entry: ReviewEntry) -> list[dict]:
        item, states = entry.item, [{"kind": "failed", "text": f"failed: {why}"} for why in entry.failures]
        if item.vision:
            states.append({"kind": "stale", "text": f"vision caption: made again next run ({item.vision})"})
        for merge in item.merges:
            if merge.reason:
                name = merge.path.name
                states.append({"kind": "stale", "text": f"{name}: merged again next run ({merge.reason})"
                               + (", if the new vision caption differs" if merge.unless else "")})
        states += [{"kind": "edited", "text": f"{item.cache_path(kind).name}: edited by hand (kept)"}
                   for kind in item.kept]
        return states or [{"kind": "ok", "text": "current"}]

    # -- changes ------------------------------------------------------------------------------
    def entry(self, body: dict) -> ReviewEntry:
        entry = self.by_id.get(body.get("id")) if isinstance(body.get("id"), str) else None
        if entry is None or not self.inside(entry.item.image):
            raise LookupError("no such image in the plan")
        return entry

    def save(self, body: dict) -> tuple[int, dict]:
        """Write one caption as a person's words, unless the file changed since the page showed it."""
        entry = self.entry(body)
        kind, text, shown = body.get("kind"), body.get("text"), body.get("sha")
        path = self.files(entry.item).get(kind) if isinstance(kind, str) and kind != KIND_TRAINER else None
        if path is None or not self.inside(path):
            raise LookupError("no such caption file in the plan")
        if not isinstance(text, str):
            return 400, {"error": "not saved: no text"}
        if kind != KIND_MANUAL and not text.strip():
            return 400, {"error": f"not saved: an empty {path.name} would be made again by the next run; "
                                  "delete the file to have it made again"}
        with self.busy:
            lock = DatasetLock(self.cfg.dataset_dir)
            busy = lock.acquire()
            if busy:
                return 423, {"error": f"not saved: {busy}"}
            try:
                text_now, sha_now, unreadable = self.shown(path)
                if file_sha(path) != shown:
                    return 409, {"error": f"not saved: {path.name} changed on disk since the page showed it; it now "
                                          "reads as shown, your text is still in the editor",
                                 "text": text_now, "sha": sha_now, "card": self.card(entry)}
                if text_now == text.strip() and unreadable in (None, "none yet"):  # a new hash would cost a merge
                    return 200, {"message": f"{path.name} is unchanged: nothing written", "card": self.card(entry)}
                self.write(entry.item, kind, path, text)
            finally:
                lock.release()
            self.decide_again(entry)
        edit = "" if kind == KIND_MANUAL else " as a hand edit"
        return 200, {"message": f"saved {path.name}{edit}; {self.next_run(entry.item)}",
                     "card": self.card(entry)}

    def write(self, item: Item, kind: str, path: Path, text: str) -> None:
        """A manual caption as it is; a cache with a record that says a person wrote it, so a rerun keeps it."""
        if kind != KIND_MANUAL:
            records = self.plan.records
            _, old = records.match(path, file_sha(path))
            record = Record("", "") if old is None else dataclasses.replace(old, adopted=False)
            records.write(path, dataclasses.replace(record, sha=digest(cache_bytes(text)), by_hand=True))
            records.close()  # a run folds the journals in, and must not fold one this server still writes to
        atomic_write(path, text)

    def decide_again(self, entry: ReviewEntry) -> None:
        """One item planned again after a save: its state, and its own findings (duplicates and the phrases of
        the whole dataset are found again when the page is loaded again)."""
        item = Item(entry.item.image, entry.item.caption_path)
        plan = Plan([item], [], [], [], records=self.plan.records, settings=self.plan.settings)
        try:
            decide(item, self.cfg, plan)
        except ItemError as e:
            plan.failures.append(Failure(str(item.image), STAGE_INPUT, str(e)))
            for merge in item.merges:
                merge.reason = None
        findings = audit_dataset(self.cfg, plan, self.count)
        entry.item, entry.text = item, self.search_text(item)
        duplicates = [f for f in entry.findings if f.kind == "duplicate"]
        entry.findings = [f for f in findings if f.kind != "input"] + duplicates
        entry.failures = [f.error for f in plan.failures]

    def next_run(self, item: Item) -> str:
        todo = ([f"makes its vision caption again ({item.vision})"] if item.vision else []) + [
            f"merges {m.path.name} again ({m.reason})" for m in item.merges if m.reason]
        kept = [item.cache_path(kind).name for kind in item.kept]
        return ("the next run " + (", ".join(todo) if todo else "leaves this image as it is")
                + (f" and keeps {', '.join(kept)} as edited by hand" if kept else ""))

    def approve(self, body: dict) -> tuple[int, dict]:
        """Mark the combined caption, as the page showed it, approved (or not): an edit since un-approves it."""
        entry = self.entry(body)
        path, shown, approved = entry.item.combined_path, body.get("sha"), bool(body.get("approved"))
        if not self.inside(path):
            raise LookupError("no such caption file in the plan")
        with self.busy:
            now = file_sha(path)
            if now is None or now != shown:
                return 409, {"error": f"not {'approved' if approved else 'changed'}: {path.name} "
                                      f"{'is missing' if now is None else 'changed on disk since the page showed it'}",
                             "card": self.card(entry)}
            approvals = load_approvals(self.cfg.dataset_dir)  # another page may have approved others since
            key = self.plan.records.key(path)
            if approved:
                approvals[key] = now
            else:
                approvals.pop(key, None)
            folder = self.cfg.dataset_dir / RECORDS_DIR
            folder.mkdir(exist_ok=True)
            atomic_write(folder / APPROVALS_FILE, json.dumps(approvals, ensure_ascii=False, indent=0, sort_keys=True))
            self.approvals = approvals
        return 200, {"message": f"{entry.id}: {'approved' if approved else 'no longer approved'}",
                     "card": self.card(entry)}


class ReviewHandler(BaseHTTPRequestHandler):
    """Every request shows the token: a page's own GETs in the URL (an <img> sends no header), the API's in the
    X-Token header. A change is a POST with the token in the header, which no other site's page can send."""

    review: Review
    server_version = "enhance_captions"

    def log_message(self, format: str, *args) -> None:  # the one line printed at start is all the output
        pass

    def allowed(self, query: dict | None) -> bool:
        shown = self.headers.get("X-Token") or (query or {}).get("token", [""])[0]
        return hmac.compare_digest(shown.encode(), self.review.token.encode())

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self.allowed(query):
            return self.answer(403, {"error": "a wrong or missing token: open the address the review printed"})
        if url.path == "/":
            nonce = secrets.token_urlsafe(12)  # only the page's own script and style run, whatever a caption holds
            policy = (f"default-src 'none'; img-src 'self' data:; connect-src 'self'; script-src 'nonce-{nonce}'; "
                      f"style-src 'nonce-{nonce}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
            return self.answer(200, REVIEW_PAGE.replace("NONCE", nonce).encode(), "text/html; charset=utf-8",
                               {"Content-Security-Policy": policy})
        if url.path == "/api/items":
            show = query.get("filter", ["all"])[0]
            try:
                offset, limit = int(query.get("offset", ["0"])[0]), int(query.get("limit", ["50"])[0])
            except ValueError:
                offset = limit = -1
            if show not in REVIEW_FILTERS or offset < 0 or not 0 < limit <= PAGE_LIMIT:
                return self.answer(400, {"error": f"filter is one of {', '.join(REVIEW_FILTERS)}; offset >= 0; "
                                                  f"0 < limit <= {PAGE_LIMIT}"})
            return self.answer(200, self.review.listing(show, query.get("q", [""])[0], offset, limit,
                                                        "refresh" in query))
        if url.path in ("/thumb", "/image"):
            entry = self.review.by_id.get(query.get("id", [""])[0])
            if entry is None or not self.review.inside(entry.item.image):
                return self.answer(404, {"error": "no such image in the plan"})
            try:
                if url.path == "/thumb":
                    data = thumbnail(entry.item.image, image_stamp(entry.item.image))
                    return self.answer(200, data, "image/jpeg", {"Cache-Control": "private, max-age=3600"})
                data = entry.item.image.read_bytes()
            except (ItemError, OSError) as e:
                return self.answer(404, {"error": f"cannot show {entry.id}: {e}"})
            return self.answer(200, data, IMAGE_TYPES[entry.item.image.suffix.lower()])
        if url.path in REVIEW_CHANGES:
            return self.answer(405, {"error": "changes are POST requests"}, extra={"Allow": "POST"})
        self.answer(404, {"error": "not found"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if not self.allowed(None) or url.query:  # the token in the header only, never in the URL
            return self.answer(403, {"error": "a wrong or missing token: reload the page from the printed address"})
        change = getattr(self.review, REVIEW_CHANGES.get(url.path, ""), None)
        if change is None:
            return self.answer(404, {"error": "not found"})
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > MAX_CHANGE_BYTES:
            return self.answer(413, {"error": f"not a change: send a JSON object of at most {MAX_CHANGE_BYTES} bytes"})
        try:
            body = json.loads(self.rfile.read(int(length)) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            self.answer(*change(body))
        except LookupError as e:
            self.answer(404, {"error": f"not found: {e}"})
        except ValueError as e:
            self.answer(400, {"error": f"not a change: {e}"})
        except OSError as e:
            self.answer(500, {"error": f"not saved: {e.strerror or e}"})

    def answer(self, status: int, body: dict | bytes, kind: str = "application/json", extra: dict | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode("utf-8", "replace")
        self.send_response(status)
        for name, value in {"Content-Type": kind, "Content-Length": str(len(data)), "Cache-Control": "no-store",
                            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                            **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def run_review(cfg: Config, host: str, port: int, open_browser: bool) -> int:
    """--review: serve the page until Ctrl-C or SIGTERM. Loads no model and sends no request."""
    try:
        review = Review(cfg, secrets.token_urlsafe(24))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not review.entries:
        print(f"error: no images ({' '.join(sorted(IMAGE_EXTENSIONS))}) found under {cfg.dataset_dir}", file=sys.stderr)
        return EXIT_USAGE
    handler = type("Handler", (ReviewHandler,), {"review": review})
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6 if ":" in host
                                                          else socket.AF_INET})
    try:
        server = server_class((host, port), handler)
    except OSError as e:
        print(f"error: cannot serve the review page on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    warning = exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_address[1]}/?token={review.token}"
    print(printable(f"review: {len(review.entries)} images under {cfg.dataset_dir} at {url} (Ctrl-C to stop)"),
          flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    stopped_by: list[int] = []

    def stop(signum, frame):
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in EXIT_FOR_SIGNAL}
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        with review.busy:  # a save in flight finishes first
            server.server_close()
    return EXIT_FOR_SIGNAL.get(stopped_by[0] if stopped_by else signal.SIGINT, EXIT_OK)


REVIEW_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width,initial-scale=1"><link rel="icon" href="data:,">
<title>Review: enhance_captions</title>
<style nonce="NONCE">
body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f3f3f0;color:#222}
header{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid #ccc;padding:8px 12px;display:flex;
 flex-wrap:wrap;gap:6px;align-items:center}
header button{border:1px solid #bbb;background:#fff;border-radius:4px;padding:3px 9px;cursor:pointer}
header button.on{background:#333;color:#fff}
#q{flex:1;min-width:12em;padding:4px}
#status{flex-basis:100%;color:#444;min-height:1.4em}#status.bad{color:#b00}
#notes{flex-basis:100%;color:#a40;font-size:13px}
main{padding:12px;display:grid;gap:12px}
.card{background:#fff;border:2px solid #ddd;border-radius:6px;padding:10px;display:grid;
 grid-template-columns:minmax(120px,260px) 1fr;gap:14px}
.card.current{border-color:#2a6ad6}
.card img{max-width:100%;max-height:260px;cursor:zoom-in;display:block}
.name{font-size:12px;color:#555;word-break:break-all;margin-top:4px}
.tags span{display:inline-block;padding:1px 7px;margin:0 4px 4px 0;border-radius:3px;font-size:12px;background:#eee}
.tags .stale{background:#fbe3a5}.tags .edited{background:#d5e5ff}.tags .failed{background:#f6c2c2}
.tags .ok{background:#d0efd0}.tags .approved{background:#2e8b3e;color:#fff}
.finding{color:#a33d00;font-size:13px}
.cap{margin:8px 0 0}.cap b{font-size:12px;color:#555;font-weight:600}.cap .file{font-size:11px;color:#888}
.text{white-space:pre-wrap;padding:2px 5px;border:1px solid transparent;border-radius:3px}
.editable .text{cursor:text}.editable .text:hover{border-color:#ccc}
.text.none{color:#999;font-style:italic}
textarea{width:100%;box-sizing:border-box;min-height:6em;font:inherit;padding:4px}
.approve{margin-top:8px}
#full{position:fixed;inset:0;z-index:2;background:rgba(0,0,0,.85);display:none;align-items:center;
 justify-content:center;cursor:zoom-out}#full img{max-width:98vw;max-height:98vh}
</style></head><body>
<header><b>Review</b><span id="filters"></span><input id="q" type="search" placeholder="search the captions">
<span id="count"></span><div id="notes"></div>
<div id="status" role="status" aria-live="polite">j/k move, e edits the combined caption (or click a caption),
Ctrl+Enter or Cmd+Enter saves, Esc cancels, a approves</div></header>
<main id="cards"></main><p id="more"></p><div id="full"><img alt="the whole image"></div>
<script nonce="NONCE">
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
const $ = s => document.querySelector(s), cards = $("#cards"), names = ["all", "flagged", "stale", "edited", "failed"];
let show = "all", query = "", loaded = 0, total = null, loading = false, turn = 0, current = null, first = true;

function el(tag, cls, text) {  // captions go in as text only, never as HTML
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function say(text, bad) { const s = $("#status"); s.textContent = text; s.className = bad ? "bad" : ""; }
async function api(path, body) {
  const options = {headers: {"X-Token": token}};
  if (body) Object.assign(options, {method: "POST", body: JSON.stringify(body)});
  options.headers["Content-Type"] = "application/json";
  try {
    const r = await fetch(path, options);
    return [r.status, await r.json()];
  } catch (e) { return [0, {error: "the review server does not answer: " + e.message}]; }
}
const asset = (kind, id) => `/${kind}?id=${encodeURIComponent(id)}&token=${encodeURIComponent(token)}`;

async function more() {
  if (loading || (total !== null && loaded >= total)) return;
  loading = true;
  const mine = turn, refresh = first ? "&refresh=1" : "", help = $("#status").textContent;
  if (first) say("looking at the dataset folder (each load of the page plans it again)...");
  first = false;
  const [status, data] = await api(`/api/items?filter=${show}&q=${encodeURIComponent(query)}&offset=${loaded}` +
                                   `&limit=40${refresh}`);
  if (mine !== turn) return;
  loading = false;
  if (status !== 200) return say(data.error || `the server answered ${status}`, true);
  if (refresh) say(help);
  total = data.total;
  for (const item of data.items) cards.append(card(item));
  loaded += data.items.length;
  $("#filters").replaceChildren(...names.map(name => {
    const b = el("button", name === show ? "on" : "", `${name} ${data.counts[name]}`);
    b.onclick = () => { show = name; restart(); say(`showing ${name} images`); };
    return b;
  }));
  $("#notes").replaceChildren(...data.notes.map(n => el("div", "", n)));
  $("#count").textContent = `${total} shown`;
  $("#more").textContent = loaded < total ? "loading more..." : total ? "" : "no images match";
  if (current === null && cards.firstChild) select(cards.firstChild, false);
  if (loaded < total && $("#more").getBoundingClientRect().top < innerHeight + 800) more();
}
function restart() {
  turn++; loading = false; loaded = 0; total = null; current = null;
  cards.replaceChildren();
  more();
}
new IntersectionObserver(e => { if (e[0].isIntersecting) more(); }, {rootMargin: "800px"}).observe($("#more"));

function card(item) {
  const c = el("section", "card"), side = el("div"), body = el("div"), tags = el("div", "tags");
  c.item = item;
  c.dataset.id = item.id;
  const img = el("img");
  img.loading = "lazy"; img.alt = item.id; img.src = asset("thumb", item.id);
  img.onclick = () => { $("#full img").src = asset("image", item.id); $("#full").style.display = "flex"; };
  img.onerror = () => img.replaceWith(el("div", "text none", "no preview"));
  side.append(img, el("div", "name", item.id));
  for (const s of item.states) tags.append(el("span", s.kind, s.text));
  if (item.approved) tags.append(el("span", "approved", "approved"));
  body.append(tags);
  for (const f of item.findings) body.append(el("div", "finding", `${f.kind} (${f.file}): ${f.detail}`));
  for (const cap of item.captions) body.append(caption(c, cap));
  const combined = item.captions.find(cap => cap.kind === "combined");
  const a = el("button", "approve", item.approved ? "approved: undo" : "approve the combined caption");
  a.disabled = !combined || !combined.sha;
  a.onclick = () => approve(c);
  body.append(a);
  c.append(side, body);
  c.onclick = () => select(c, false);
  return c;
}
function caption(c, cap) {
  const box = el("div", "cap" + (cap.editable ? " editable" : "")), text = el("div", "text", cap.text);
  box.dataset.kind = cap.kind;
  box.append(el("b", "", cap.label + " "), el("span", "file", cap.file));
  if (!cap.text) { text.className = "text none"; text.textContent = cap.note || "none yet"; }
  box.append(text);
  if (cap.editable) text.onclick = () => edit(c, cap, box);
  return box;
}
function edit(c, cap, box) {
  let area = box.querySelector("textarea");
  if (area) return area.focus();
  area = el("textarea");
  area.value = cap.text;
  let sha = cap.sha;
  const shown = box.querySelector(".text");
  shown.hidden = true;  // shown again only to show the file as it is now, after a refused save
  box.append(area);
  area.focus();
  say(`editing ${cap.file}: Ctrl+Enter (Cmd+Enter) saves, Esc cancels`);
  area.onkeydown = async ev => {
    if (ev.key === "Escape") {
      ev.preventDefault(); ev.stopPropagation();
      area.remove(); shown.hidden = false; say(`cancelled: ${cap.file} is as it was`);
    } else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      const [status, data] = await api("/api/save", {id: c.item.id, kind: cap.kind, sha: sha, text: area.value});
      if (status === 200) { replace(c, data.card); say(data.message); }
      else if (status === 409) {
        sha = data.sha;
        shown.textContent = data.text || "none yet";
        shown.className = data.text ? "text" : "text none";
        shown.hidden = false;
        say(data.error, true);
      } else say(data.error || `not saved: the server answered ${status}`, true);
    }
  };
}
async function approve(c) {
  const combined = c.item.captions.find(cap => cap.kind === "combined");
  const [status, data] = await api("/api/approve", {id: c.item.id, sha: combined && combined.sha,
                                                     approved: !c.item.approved});
  if (data.card) replace(c, data.card);
  say(data.message || data.error || `the server answered ${status}`, status !== 200);
}
function replace(c, item) {
  const n = card(item);
  c.replaceWith(n);
  if (current === c) select(n, false);
}
function select(c, scroll) {
  if (current) current.classList.remove("current");
  current = c;
  c.classList.add("current");
  if (scroll) c.scrollIntoView({block: "nearest"});
}
document.addEventListener("keydown", ev => {
  if (ev.key === "Escape" && $("#full").style.display === "flex") { $("#full").style.display = "none"; return; }
  if (ev.target.matches("textarea, input") || ev.ctrlKey || ev.metaKey || ev.altKey || !current) return;
  if (ev.key === "j" && current.nextElementSibling) select(current.nextElementSibling, true);
  else if (ev.key === "k" && current.previousElementSibling) select(current.previousElementSibling, true);
  else if (ev.key === "e") {
    const box = current.querySelector('.cap.editable[data-kind="combined"]');
    if (box) { ev.preventDefault(); edit(current, current.item.captions.find(x => x.kind === "combined"), box); }
  } else if (ev.key === "a") approve(current);
  else return;
  if (ev.key === "j" && !current.nextElementSibling) more();
});
$("#full").onclick = () => { $("#full").style.display = "none"; };
let typing;
$("#q").oninput = () => {
  clearTimeout(typing);
  typing = setTimeout(() => {
    query = $("#q").value;
    restart();
    say(query ? `searching for "${query}"` : "showing all");
  }, 250);
};
more();
</script></body></html>
"""


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
    g.add_argument("--refresh", choices=REFRESH_MODES, default="inputs",
                   help="inputs: redo a cache whose inputs changed since it was made (manual caption, image, "
                        "hand-edited vision caption); settings: also one made with other settings (models, "
                        "prompts, generation settings); none: trust every existing cache")
    g.add_argument("--overwrite", choices=["generated", "combined", "all"],
                   help="recompute these caches even where they exist, hand edits included")
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
    g.add_argument("--vlm_base_url", action="append", help="caption with a served vision model at this "
                   "OpenAI-compatible URL instead (repeatable: several servers of one model share the work)")
    g.add_argument("--vlm_model", help="the served vision model's name (with --vlm_base_url)")
    g.add_argument("--vlm_api_key", help="the vision endpoints' key (default: $VLM_API_KEY; $OPENAI_API_KEY only to a "
                                         "--vlm_base_url with the scheme, host and port of a --base_url)")
    g.add_argument("--vlm_max_side", type=int, default=1024, help="downscale images to this longest side before sending")
    g.add_argument("--vlm_rpm", type=int, default=0, help="requests per minute to each vision endpoint (0: no limit)")

    g = p.add_argument_group("LLM")
    g.add_argument("--base_url", action="append", help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, one URL "
                   "or several separated by commas or spaces); repeatable: several servers of one model share the "
                   "requests, fewest in flight first, and one that stops answering is set aside")
    g.add_argument("--model", help="the endpoint's model (default: $OPENAI_MODEL, else the one model the endpoint "
                                   "lists)")
    g.add_argument("--local_llm", help=f"merge in-process with this transformers instruct model; the default when no "
                                       f"endpoint or key is configured is {DEFAULT_LOCAL_LLM}")
    g.add_argument("--system_prompt", type=Path, help="the LLM's system prompt file (default: system_prompt.txt "
                                                    "beside the script)")
    g.add_argument("--max_tokens", type=int, default=512, help="length limit of the merged caption, in tokens")
    g.add_argument("--temperature", type=float, default=0.3, help="LLM sampling temperature")
    g.add_argument("--rpm", type=int, default=0, help="requests per minute to each endpoint, for the whole run, all "
                                                      "processes (0: none)")
    g.add_argument("--tpm", type=int, default=0, help="tokens per minute to each endpoint, for the whole run, all "
                                                      "processes (0: none)")
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
    g.add_argument("--export", help="after the run write the captions for a trainer, the format chosen by the name: "
                                    "metadata.jsonl or metadata.csv (Hugging Face imagefolder, at the dataset root), "
                                    "NAME.json (kohya fine-tuning metadata, keyed by full path)")
    g.add_argument("--report", type=Path, help="write every failure as JSON lines (path, stage, error); with "
                                                 "--review, read it")
    g.add_argument("--quiet", action="store_true", help="only warnings, errors and the summary")
    g.add_argument("-v", "--verbose", action="store_true", help="a line per item")

    g = p.add_argument_group("training captions")
    g.add_argument("--variant", action="append", default=[], metavar="NAME=FILE",
                   help="also merge with the system prompt in FILE, cached as {stem}_combined_NAME.txt "
                        "(repeatable; e.g. short=prompts/short.txt, tags=prompts/tags.txt)")
    g.add_argument("--write_captions", metavar="EXT",
                   help="also write each image's combined caption to {stem}EXT, where the trainer reads it "
                        "(.caption for kohya, .txt for OneTrainer, ai-toolkit, SimpleTuner); never the manual "
                        "captions' --caption_extension")
    g.add_argument("--prefix", metavar="TEXT", help="fixed text at the start of every combined caption, before the "
                                                "--keep_tokens parts (e.g. a trigger word); never doubled")
    g.add_argument("--suffix", metavar="TEXT", help="fixed text at the end of every combined caption; never doubled")
    g.add_argument("--max_caption_tokens", type=int, metavar="N",
                   help="the trainer's caption limit in tokens of --caption_tokenizer, start and end tokens included "
                        "(CLIP: 77, kohya --max_token_length N: N+2, T5: 512)")
    g.add_argument("--caption_tokenizer", metavar="ID_OR_PATH", help="the trainer's text tokenizer, Hub id or folder "
                                               "(e.g. openai/clip-vit-large-patch14)")
    g.add_argument("--audit", action="store_true",
                   help="check the finished captions for what would hurt training (kept parts, length, duplicates, "
                        "refusals, phrases in every caption, vision loops); loads no model, calls nothing; exit 1 "
                        "when something is found")

    g = p.add_argument_group("review")
    g.add_argument("--review", action="store_true",
                   help="serve a page of each image beside its captions, state and findings, to edit (saved as hand "
                        "edits) and approve; give it the flags of your run; with --report FILE it shows that run's "
                        "failures; loads no model, calls nothing; runs until Ctrl-C")
    g.add_argument("--port", type=int, default=0, help="the review page's port (default: a free one)")
    g.add_argument("--host", default="127.0.0.1", help="the address the review page listens on; another than "
                                                      "loopback lets other machines reach it")
    g.add_argument("--open", action="store_true", help="open the review page in the default browser")
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
    if args.local_llm and args.base_url:
        raise UsageError(f"--local_llm and --base_url both given: drop --base_url to merge in-process with "
                         f"{args.local_llm}, or drop --local_llm to merge through the endpoint")
    env_base_url = os.environ.get("OPENAI_BASE_URL") or None
    base_url = endpoint_urls(args.base_url or (() if args.local_llm else url_list(env_base_url)), "--base_url")
    api_key = os.environ.get("OPENAI_API_KEY") or None
    local_llm = args.local_llm or (None if base_url or api_key else DEFAULT_LOCAL_LLM)
    vlm_base_url = endpoint_urls(args.vlm_base_url or (), "--vlm_base_url")
    vlm_api_key = args.vlm_api_key or os.environ.get("VLM_API_KEY") or None
    llm_urls = args.base_url or url_list(env_base_url) or (DEFAULT_OPENAI_URL,)
    vlm_api_keys = tuple(vlm_api_key or (api_key if any(same_origin(url, llm) for llm in llm_urls) else None)
                         for url in vlm_base_url)  # the LLM endpoints' key, sent to no other server
    extension = caption_extension_of(args.caption_extension)
    check_training_args(args, folder)
    check_review_args(args)
    return Config(
        dataset_dir=folder.resolve(), model_id=args.model_id, prompt=args.prompt, revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        system_prompt=read_prompt_file(args.system_prompt or DEFAULT_SYSTEM_PROMPT, "--system_prompt"),
        variants=parse_variants(args.variant),
        write_captions=caption_extension_of(args.write_captions) if args.write_captions else None,
        vlm_system_prompt=read_prompt_file(args.vlm_system_prompt, "--vlm_system_prompt")
        if args.vlm_system_prompt else None,
        base_url=base_url, model=args.model or os.environ.get("OPENAI_MODEL") or None, api_key=api_key,
        local_llm=local_llm, set_aside_base_url=env_base_url if args.local_llm else None,
        vlm_base_url=vlm_base_url, vlm_model=args.vlm_model, vlm_api_keys=vlm_api_keys,
        vlm_max_side=args.vlm_max_side,
        vlm_rpm=args.vlm_rpm, cache_generated=args.cache_generated_captions_to_disk,
        caption_extension=extension, rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency,
        batch_size=args.batch_size, num_workers=args.num_workers, overlap=args.overlap,
        max_new_tokens=args.max_new_tokens, max_tokens=args.max_tokens, temperature=args.temperature,
        repetition_penalty=args.repetition_penalty, dtype=args.dtype, attn_implementation=args.attn_implementation,
        device_map=args.device_map, quantization=args.quantization, max_retries=args.max_retries,
        timeout=args.timeout, keep_tokens=args.keep_tokens, limit=args.limit, overwrite=args.overwrite,
        refresh=args.refresh,
        dry_run=args.dry_run, export=args.export, report=args.report,
        verbosity=0 if args.quiet else 2 if args.verbose else 1,
        prefix=(args.prefix or "").strip(" ,"), suffix=(args.suffix or "").strip(" ,"),
        max_caption_tokens=args.max_caption_tokens,
        caption_tokenizer=args.caption_tokenizer, audit=args.audit,
    )


def url_list(text: str | None) -> tuple[str, ...]:
    """$OPENAI_BASE_URL: one URL, or several separated by commas or white space."""
    return tuple(url for url in re.split(r"[\s,]+", text or "") if url)


def endpoint_urls(urls: Sequence[str], flag: str) -> tuple[str, ...]:
    """Each endpoint once: the same server twice would get twice its --rpm and share of the work."""
    seen: set[str] = set()
    for url in urls:
        if url.strip().rstrip("/") in seen:
            raise UsageError(f"{flag} {redact(url, None)} is given twice")
        seen.add(url.strip().rstrip("/"))
    return tuple(url.strip() for url in urls)


VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


def parse_variants(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """--variant NAME=FILE, each name once: (name, system prompt)."""
    variants: dict[str, str] = {}
    for value in values:
        name, _, file = value.partition("=")
        if not VARIANT_NAME.match(name) or not file:
            raise UsageError(f"--variant {value}: give NAME=FILE, NAME of letters, digits and dashes (e.g. short=prompts/short.txt)")
        if name in variants:
            raise UsageError(f"--variant {name} is given twice")
        variants[name] = read_prompt_file(Path(file).expanduser(), f"--variant {name}")
    return tuple(variants.items())


def caption_extension_of(value: str) -> str:
    return value if value.startswith(".") else "." + value


def check_training_args(args: argparse.Namespace, folder: Path) -> None:
    """The training-caption flags: a budget needs its tokenizer, an export a format its trainer reads."""
    if args.max_caption_tokens is not None and args.max_caption_tokens < 1:
        raise UsageError("--max_caption_tokens must be at least 1")
    if args.max_caption_tokens and not args.caption_tokenizer:
        raise UsageError("--max_caption_tokens needs --caption_tokenizer (the trainer's tokenizer, to count with)")
    if args.caption_tokenizer and not args.max_caption_tokens:
        raise UsageError("--caption_tokenizer needs --max_caption_tokens (the limit to count against)")
    if args.write_captions:
        ext, manual = caption_extension_of(args.write_captions), caption_extension_of(args.caption_extension)
        if not re.fullmatch(r"\.[A-Za-z0-9]+", ext):
            raise UsageError(f"--write_captions {args.write_captions}: give a plain extension such as .caption or .txt")
        if ext.lower() in IMAGE_EXTENSIONS:
            raise UsageError(f"--write_captions {ext} is an image extension: the text files would be found as images "
                             "(or replace them); give one such as .caption or .txt")
        if ext.lower() == manual.lower():
            raise UsageError(f"--write_captions {ext} would overwrite the manual captions (--caption_extension "
                             f"{manual}) that the next run reads: keep the manual captions as .caption and write "
                             ".txt, or the reverse")
    if args.export:
        fmt = export_format(args.export)
        target = Path(args.export).expanduser()
        if fmt != "kohya" and target.is_absolute() and target.parent.resolve() != folder.resolve():
            raise UsageError(f"--export {args.export}: Hugging Face imagefolder reads {target.name} from the dataset "
                             f"folder; give the name only")


def check_review_args(args: argparse.Namespace) -> None:
    if args.review:
        for flag in ("dry_run", "audit", "export"):
            if getattr(args, flag):
                raise UsageError(f"--review and --{flag} both given: run them one after the other")
        if not 0 <= args.port < 65536:
            raise UsageError(f"--port {args.port}: give a port from 1 to 65535 (or 0 for a free one)")
    elif args.port or args.open or args.host != "127.0.0.1":
        raise UsageError("--port, --host and --open are for --review")


def run_description(cfg: Config) -> str:
    """The vision model and the LLM a run uses (URLs redacted), for the first info line and the dry run."""
    if cfg.vlm_base_url:
        vision = f"served {cfg.vlm_model} at " + ", ".join(redact(url, key) for url, key in
                                                           zip(cfg.vlm_base_url, cfg.vlm_api_keys))
    else:
        vision = cfg.model_id
    if cfg.local_llm:
        merge = f"local LLM {cfg.local_llm}"
        if cfg.set_aside_base_url:
            merge += f" (--local_llm wins over OPENAI_BASE_URL={redact(cfg.set_aside_base_url, cfg.api_key)})"
    else:
        model = cfg.model or "chosen from the endpoint's list of models"
        if cfg.model_from_list:
            model += " (the one model the endpoint lists)"
        urls = ", ".join(redact(url, cfg.api_key) for url in cfg.base_url or (DEFAULT_OPENAI_URL,))
        merge = f"endpoint{'s' if len(cfg.base_url) > 1 else ''} {urls} model {model}"
    return f"vision: {vision}; merge: {merge}"


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
    if cfg.audit:  # reads finished files only: no lock, no model, no endpoint
        return run_audit(cfg)
    if args.review:  # no model, no endpoint; takes the lock only for the moment of each save
        return run_review(cfg, args.host, args.port, args.open)
    state = make_state()
    reporter = Reporter(cfg.verbosity, state.is_main_process, processes=state.num_processes)
    lock = DatasetLock(cfg.dataset_dir)
    try:
        error, count_tokens = None, None
        try:
            check_against_state(cfg, state)
            count_tokens = caption_counter(cfg)  # the trainer's tokenizer, for --max_caption_tokens
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
                cfg = preflight(cfg, plan, state)
            except (FatalEndpointError, UsageError) as e:
                error = str(e)
        error = agree(state, error)
        if error:
            if state.is_main_process:
                print(printable(f"error: {error}"), file=sys.stderr)
                if cfg.report and not cfg.dry_run:  # cron under accelerate launch reads the exit code there
                    with contextlib.suppress(OSError):
                        write_report(cfg.report, [], report_summary(plan, Stats(fatal=error)))
            return EXIT_USAGE
        if cfg.dry_run:
            return EXIT_OK
        planned, cfg = cfg, agree(state, cfg)  # with the model the main process's preflight found, for every process
        if cfg.model != planned.model:  # the merge settings name the model: judge the caches against the real one
            plan = plan_work(cfg)
        if state.is_main_process and (error := adopt_unrecorded(plan)):
            reporter.warn(f"warning: {error}; they are adopted on a later run")
        work = SharedWork.of(state, agree(state, uuid.uuid4().hex))  # the main process names the run's keys
        reporter.info(run_description(cfg))
        reporter.info(f"{len(plan.items)} images: {len(plan.to_generate)} to caption, {len(plan.to_combine)} to merge"
                      + (f", split over {state.num_processes} processes" if state.num_processes > 1 else ""))
        for line in plan_items(plan):
            reporter.detail(line)
        stop = StopEvent()
        stats = Stats()
        with stop_on_signals(stop, stats, reporter):
            try:
                stats.merge(run(cfg, plan, state, reporter, stop, count_tokens=count_tokens, work=work))
            except UsageError as e:  # the model cannot be loaded: nothing else can go on
                stats.fatal = str(e)
        return finish(cfg, plan, state, stats, reporter, work)
    finally:
        lock.release()


def finish(cfg: Config, plan: Plan, state, stats: Stats, reporter: Reporter, work: SharedWork | None = None) -> int:
    """Gather every process's Stats, print the summary, write the report and export. The main process's exit code
    is the run's; the others exit with their own (accelerate launch exits 1 if any process does not exit 0)."""
    stats = (work or SharedWork()).gather(stats, reporter.info)
    stats.failures[:0] = plan.failures
    if state.is_main_process and cfg.write_captions and not stats.fatal:
        for line in write_trainer_captions(cfg, plan, stats):
            reporter.detail(line)
    plan.records.close()
    if state.is_main_process:
        with contextlib.suppress(OSError):  # a folder that refuses it keeps the journals, read again next run
            plan.records.compact()
        for line in summary_lines(plan, stats):
            print(printable(line), file=sys.stderr if line.startswith(("FAILED", "error")) else sys.stdout)
        if cfg.report:
            try:
                write_report(cfg.report, [*stats.failures, *stats.notes], report_summary(plan, stats))
            except OSError as e:  # the work is saved; only its record is missing, which a cron job must hear of
                print(printable(f"error: cannot write the report {cfg.report}: {e.strerror or e}"), file=sys.stderr)
                return max(stats.exit_code(), EXIT_USAGE)
        if cfg.export and not stats.fatal:
            count = write_export(cfg, plan, reporter.warn)
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
