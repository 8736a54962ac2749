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

    python enhance_captions.py --dataset_dir images/ \\
        --model_id florence-community/Florence-2-base --prompt "<MORE_DETAILED_CAPTION>" \\
        --base_url http://127.0.0.1:11434/v1/ --model llama3.1

Map of this file, top to bottom:
    constants and types        Config, Item, Variant, Merge, Failure, Note, Flagged, Stats
    pure functions             discovery, caption and cache files, images, prompts, reply cleaning, --keep_tokens
    records                    what made each cache: per-process journals folded into records.jsonl, kept by the
                               dataset root (dataset_root); write_cache(): the one writer, with a last look
    rate limiter               sliding 60 s windows for requests and tokens, shared Retry-After pause, wait scale
    chat backends              the OpenAI-compatible endpoint, the pool in front of one or several, a local LLM
    request with retries       complete_item(): where a reply is checked, cleaned and retried
    --verify                   the check of a merged caption against its sources: request, strict parse, findings
    vision captioners          one local path chosen by the processor's capabilities, or a served model
    progress and messages      the one reporter of a run, and the two ways every line leaves: between the progress
                               bars, or said at once (say()); either way printable
    stages                     AsyncStage (requests on the event loop thread), the local vision loop
    planning and sharding      plan_work()/decide(): the one decision per item (what is redone and why, what is
                               re-finished from its recorded reply, what differs in settings, whether the
                               --write_captions copy follows), made by the main process over the dataset's one
                               record set (one_record_set); bad inputs remembered; plan_rows(): the plan as the
                               other processes get it
    run()                      one process's stages, one way: caption (NewCaptions passes each on) -> merge (Merger)
    around the run             lock, signals, preflight, dry run, the summary block, report, export
    training captions          token budgets, --prefix/--suffix, --export formats (imagefolder, kohya), --audit
                               (with the captions --verify flagged)
    review page                --review: each image beside its captions, state and findings; saves hand edits
    CLI                        build_parser(), main(): prepare() (main process) -> run() -> finish(); output into a
                               closed pipe ends quietly
"""
from __future__ import annotations

import sys

if sys.version_info < (3, 11):  # before any import: torch has no 3.10 builds here, and 3.10 fails far later
    sys.stderr.write(f"error: enhance_captions.py needs Python 3.11 or newer (this is {sys.version.split()[0]})\n")
    raise SystemExit(2)

import argparse
import asyncio
import base64
import codecs
import collections
import concurrent.futures
import contextlib
import contextvars
import csv
import dataclasses
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
SET_ASIDE_AFTER = 3  # failed requests in a row (5xx, timeouts, dropped connections), of 2+ items, that set one aside
SET_ASIDE_SECONDS = 30.0  # how long, the first time; doubled each time it fails again on its return, up to:
SET_ASIDE_MAX_SECONDS = 600.0
REFUSED_AT_START = 8  # requests refused (a 400) before any got a reply that stop a stage: the rest would be too,
REQUEST_SETTING = re.compile(r"max_(?:completion_)?tokens|temperature", re.IGNORECASE)  # when they name one of these
GIVE_UP_AFTER = 300.0  # --give_up_after: a stage whose every endpoint is set aside, and none answered this long, stops
WAIT_SCALE_VARIABLE = "ENHANCE_CAPTIONS_WAIT_SCALE"  # times every backoff, Retry-After and set-aside wait (tests)
SCRIPT_DIR = Path(__file__).resolve().parent
DEFAULT_SYSTEM_PROMPT = SCRIPT_DIR / "system_prompt.txt"
DEFAULT_VERIFY_PROMPT = SCRIPT_DIR / "prompts" / "verify.txt"
REVIEW_PAGE = SCRIPT_DIR / "review.html"  # --review's page: its NONCE is the one its Content-Security-Policy allows
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
SENDABLE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}  # sent to a served model as is
WINDOW_SECONDS = 60.0
PREFLIGHT_TIMEOUT = 15.0
HUB_CHECK_TIMEOUT = 5.0  # one look at the Hub before a download, instead of huggingface_hub's minutes of retries
# Requests a process claims at a time, at most: a store round trip per chunk, and at the end of a run no more than
# one chunk that another process could have taken. Never more than --concurrency, so a claimed chunk starts at once.
REQUEST_CHUNK = 4
HEARTBEAT_SECONDS = 5.0  # how often each process of a run says in the store that it is alive
HEARTBEAT_LOST = 60.0  # a process silent this long is given up on by the main process

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell shows for any tool whose reader went away (`| head`)
EXIT_FOR_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}

STAGE_INPUT, STAGE_VISION, STAGE_LLM, STAGE_VERIFY = "input", "vision", "llm", "verify"


class UsageError(Exception):
    """A configuration or usage problem: one line, exit 2."""


class FatalEndpointError(Exception):
    """The endpoint refuses every request (bad key, unknown model, wrong URL): stop the run, exit 2."""


class ItemError(Exception):
    """One item failed; the run goes on."""


class BadInput(ItemError):
    """The input file itself is bad (an image that cannot be decoded, a caption that is not UTF-8): remembered until
    the file changes, so that no later run tries it again (or loads a model for it)."""


class RetryableReply(ItemError):
    """A reply that came back broken (not JSON, no choices) or rate limited: worth asking again."""


class Refused(ItemError):
    """The endpoint refused this request (a 4xx other than 401, 403, 404 and 429): asking again changes nothing."""


class EndpointDown(ItemError):
    """The endpoint did not answer this request (no connection, a dropped one, a timeout, a 5xx): a pool of
    endpoints sends it to another. `refused`: no connection could be made at all."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


class GaveUp(Exception):
    """No endpoint of a stage has answered for --give_up_after seconds, and every one is set aside: the stage stops,
    and what it has not done is left for the next run."""


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
    local_llm_by_default: bool = False  # no flag, variable or .env named an endpoint or a local LLM
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
    give_up_after: float = GIVE_UP_AFTER
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
    verify: str | None = None  # --verify: None, "on" or "strict"
    verify_prompt: str = ""  # the check's instructions (--verify_prompt, default prompts/verify.txt)
    report: Path | None = None
    verbosity: int = 1  # 0 quiet, 1 normal, 2 verbose


@dataclasses.dataclass(slots=True)
class Item:
    """One image, what is known about it so far, and what planning decided it needs this run and why."""

    image_file: str                   # the image's path: a string, as planning uses it (`image` is its Path)
    caption_extension: str            # the manual caption's: {stem}EXT (--caption_extension)
    generated: str | None = None
    manual: str | None = None         # the manual caption, read once, at planning
    manual_sha: str | None = None
    generated_sha: str | None = None  # hash of the vision caption's bytes, as cached (or as it would be)
    stamp: str | None = None          # image_stamp() at planning
    vision: str | None = None         # why the vision caption is made this run (a REASON_*), or None
    merges: tuple[Merge, ...] = ()    # the default merge, then one per --variant (a list: 48 bytes more an image)
    kept: tuple[str, ...] = ()        # kinds of cache edited by hand, kept as they are ("generated", "combined")
    outdated: tuple[str, ...] = ()    # kinds of a person's file kept (trainer too) older than a change to its inputs
    adopted: tuple[str, ...] = ()     # kinds of cache found without a record, taken as they are
    trainer: TrainerFile | None = None  # --write_captions: the trainer's copy of the combined caption

    # The paths are made on use: kept, their Path objects were over half of a fully cached rerun's memory (400 bytes
    # an image, 330 the caption's), and making them a tenth of its time. Planning uses the names (the *_file ones).
    @property
    def image(self) -> Path:
        return Path(self.image_file)

    def beside(self, suffix: str) -> str:
        """{stem}SUFFIX: a file of this image's, by name (an image's name has a dot)."""
        return self.image_file.rpartition(".")[0] + suffix

    @property
    def caption_file(self) -> str:
        return self.beside(self.caption_extension)

    @property
    def caption_path(self) -> Path:
        return Path(self.caption_file)

    def cache_file(self, kind: str) -> str:
        return self.beside(f"_{kind}.txt")

    def cache_path(self, kind: str) -> Path:
        return Path(self.cache_file(kind))

    @property
    def generated_path(self) -> Path:
        return self.cache_path(KIND_GENERATED)

    @property
    def combined_path(self) -> Path:
        return self.cache_path(KIND_COMBINED)


@dataclasses.dataclass(frozen=True, slots=True)
class TrainerFile:
    """--write_captions: the trainer's file as planning found it, a copy that follows the combined caption."""

    seen: str | None    # hash of its bytes (None: no file), for the last look before it is replaced
    copies: str | None  # hash of the combined caption's bytes it is a copy of, by its record (None: not ours)
    kept: bool = False  # a person's file (not written by this script, or edited since): never replaced


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
    record: Record | None = None      # the record of the cache as it is (it stands for the new image if unchanged)
    check_only: bool = False          # --verify: the caption is current but not checked (with these settings)

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


@dataclasses.dataclass(frozen=True)
class Flagged:
    """A merged caption that --verify's check still finds fault with after a second merge: kept, and reported."""

    path: str
    stage: str
    unsupported: tuple[str, ...]
    contradictions: tuple[str, ...]
    missing: tuple[str, ...]


@dataclasses.dataclass
class Stats:
    """A run's counts and failures. The event-loop thread, the writer thread and the main thread all change them,
    so every change goes through a method, under the lock."""

    counts: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: {s: collections.Counter() for s in (STAGE_VISION, STAGE_LLM)})
    failures: list[Failure] = dataclasses.field(default_factory=list)
    notes: list[Note] = dataclasses.field(default_factory=list)  # done, but not as asked (a caption cut to fit)
    bad: list[str] = dataclasses.field(default_factory=list)  # images whose failure is their own file's fault
    flagged: list[Flagged] = dataclasses.field(default_factory=list)  # --verify: kept with findings
    checks: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # --verify: by outcome
    spent: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # requests, tokens by purpose
    fatal: str | None = None
    gave_up: str | None = None  # why the run stopped short of its work (an endpoint, a process): exit 1
    signal: int | None = None
    left: dict[str, int] = dataclasses.field(default_factory=dict)  # per stage, planned and not settled (account())
    lock = threading.Lock()  # one for every Stats, not a field: Stats travel between processes pickled

    def count(self, stage: str, what: str = "done") -> None:
        """A count of a stage (vision, llm) or of a kind of output (combined, combined_NAME)."""
        with self.lock:
            self.counts.setdefault(stage, collections.Counter())[what] += 1

    def fail(self, path: Path | str, stage: str, error: str, bad_input: bool = False) -> None:
        with self.lock:
            self.failures.append(Failure(str(path), stage, error))
            if stage in self.counts:
                self.counts[stage]["failed"] += 1
            if bad_input:
                self.bad.append(str(path))

    def note(self, path: Path | str, stage: str, note: str) -> None:
        with self.lock:
            self.notes.append(Note(str(path), stage, note))

    def flag(self, flagged: Flagged) -> None:
        with self.lock:
            self.flagged.append(flagged)

    def tally(self, counter: str, what: str, n: int = 1) -> None:
        with self.lock:
            getattr(self, counter)[what] += n

    def merge(self, other: Stats) -> None:
        with self.lock:
            for stage, counter in other.counts.items():
                self.counts.setdefault(stage, collections.Counter()).update(counter)
            for name in ("failures", "notes", "bad", "flagged"):
                getattr(self, name).extend(getattr(other, name))
            for name in ("checks", "spent"):
                getattr(self, name).update(getattr(other, name))
            for name in ("fatal", "gave_up", "signal"):
                setattr(self, name, getattr(self, name) or getattr(other, name))

    def exit_code(self) -> int:
        if self.fatal:
            return EXIT_USAGE
        if self.signal:
            return EXIT_FOR_SIGNAL.get(self.signal, 128 + self.signal)
        return EXIT_FAILED if self.failures or self.gave_up or any(self.left.values()) else EXIT_OK

    def account(self, plan: Plan) -> None:
        """Every planned item is done, from cache, failed, kept as edited, or else left for the next run (a stop, a
        stage that gave up, a process lost, a vision caption that failed before its merge)."""
        planned = {STAGE_VISION: len(plan.to_generate), STAGE_LLM: len(plan.to_combine)}
        settled = ("done", "checked", "unchanged", "failed", "edited")
        self.left = {stage: max(0, n - sum(self.counts[stage][k] for k in settled)) for stage, n in planned.items()}


# --------------------------------------------------------------------------------------------
# Pure functions: discovery, caches, images, prompts, reply cleaning, sharding
# --------------------------------------------------------------------------------------------


STALE_TEMPORARY = re.compile(r"^\..+(?:_generated|_combined(?:_[\w-]+)?)\.txt\.[a-z0-9_]+\.tmp$")


def walk_images(root: Path, stale: list[Path] | None = None,
                nested: list[Path] | None = None) -> tuple[list[str], list[Failure]]:
    """All images under root as path strings, sorted as Paths sort (on Windows, without case); follows folder symlinks
    but reports loops. A killed run's temporary cache files go into `stale`, sub-folders with records into `nested`."""
    found, problems, seen, extensions = [], [], set(), tuple(IMAGE_EXTENSIONS)

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
            if entry.name.startswith("."):  # also AppleDouble "._x.jpg" and our own temporary files
                if stale is not None and STALE_TEMPORARY.match(entry.name):
                    stale.append(Path(entry.path))
                if nested is not None and entry.name == RECORDS_DIR and folder is not root and entry.is_dir():
                    nested.append(folder)
                continue
            try:  # a Path only for folders: most entries are images and their caption files, and a Path costs more
                if entry.is_dir():
                    visit(Path(entry.path))
                elif entry.name.lower().endswith(extensions):
                    found.append(entry.path)
            except OSError as e:
                problems.append(Failure(entry.path, STAGE_INPUT, f"cannot read: {e.strerror or e}"))

    visit(root)
    return sorted(found, key=lambda path: os.path.normcase(path).split(os.sep)), problems


def pair_items(images: Sequence[str], caption_extension: str) -> tuple[list[Item], list[Failure]]:
    """One Item per image; images whose caches or captions would collide are reported, not processed."""
    items = [Item(str(p), caption_extension) for p in images]
    by_stem = collections.defaultdict(list)  # keyed by strings: three Paths per image are slow at 100k images
    for item in items:
        by_stem[os.path.splitext(item.image_file)[0]].append(item)
    bad = {item.image: f"shares its stem with another image ({', '.join(i.image.name for i in group)}): "
                       "their caches would collide; rename one"
           for group in by_stem.values() if len(group) > 1 for item in group}
    # A caption file that is another image's cache file ({stem}_generated.txt, {stem}_combined.txt): that image is
    # found by its stem (a table of every cache file's name held 100k names at 50k images, and took 0.09 s).
    for item in items:
        other = None
        if item.caption_file.endswith((GENERATED_SUFFIX, COMBINED_SUFFIX)):
            other = by_stem.get(item.caption_file.rsplit("_", 1)[0], [None])[-1]
        if other is not None and other is not item:
            why = f"{item.image.name}'s caption file {item.caption_path.name} is also {other.image.name}'s cache file"
            bad[item.image] = bad[other.image] = why + "; rename one"
    failures = [Failure(str(p), STAGE_INPUT, why) for p, why in sorted(bad.items())]
    bad_files = {str(p) for p in bad}
    return [i for i in items if i.image_file not in bad_files], failures


def digest(data: bytes) -> str:
    """A short content hash: 64 bits tell a hand edit from what was written."""
    return hashlib.sha256(data).hexdigest()[:16]


def cache_bytes(text: str) -> bytes:
    """A cache's bytes exactly as atomic_write writes them, so a record's hash can be taken before the write."""
    return (text.strip() + "\n").encode("utf-8")


def image_stamp(path: Path | str) -> str:
    """An image's size and mtime: one stat per image, so a rerun over 100k images stays cheap. A replaced image
    (a new file, an edit, a copy) changes it; a copy that keeps both size and mtime would not be noticed."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def file_bytes(path: Path | str) -> bytes:
    """A file's bytes, read through its descriptor: 3 µs a caption file, where open() and its buffered reader took 5
    (150k files in a cached rerun of 50k images)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_caption(path: Path | str) -> tuple[str | None, str | None]:
    """A UTF-8 text file (BOM allowed), stripped, and the hash of its bytes; (None, None) when missing or blank.
    The one reader of caption files. Raises ItemError when it cannot be read or decoded."""
    try:
        data = file_bytes(path)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        raise ItemError(f"cannot read {os.path.basename(path)}: {e.strerror or e}") from e
    if not data.strip():
        return None, None
    try:
        text = decode_text(data)
    except UnicodeDecodeError as e:
        raise BadInput(f"{os.path.basename(path)} is not valid UTF-8 (byte {e.start}); re-save it as UTF-8") from e
    return (text or None), digest(data)


def decode_text(data: bytes) -> str:
    """UTF-8 text (a BOM allowed), stripped: what the utf-8-sig codec gives, without its Python-level wrapper (0.4 µs
    for each of 150k files a cached rerun of 50k images reads)."""
    return data.removeprefix(codecs.BOM_UTF8).decode("utf-8").strip()


def read_text(path: Path) -> str | None:
    return read_caption(path)[0]


def read_cache(path: Path) -> str | None:
    """A finished cache's text for the export; one that cannot be read counts as missing."""
    try:
        return read_text(path)
    except ItemError:
        return None


def atomic_write(path: Path, data: str | Iterable[bytes], last_look: Callable[[], bool] | None = None) -> bool:
    """Write via a hidden temporary file in the same folder and rename: readers never see half a file. Text is
    written as cache_bytes() gives it, in binary, so the bytes (and their hash) are the same on every system.
    `last_look()`, called once the bytes are on disk and just before the rename, may refuse it: False."""
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines([cache_bytes(data)] if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if last_look is not None and not last_look():
            return False
        os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(OSError):  # after the rename, there is none
            os.unlink(tmp)


def create_temporary(path: Path) -> tuple[int, Path]:
    """A new hidden `.{name}.{random}.tmp` beside path (as STALE_TEMPORARY knows it), opened for writing. Mode 0o666,
    so the user's umask applies: the renamed file is as readable as any other (mkstemp's 0600 would survive)."""
    while True:
        tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.tmp"
        with contextlib.suppress(FileExistsError):  # another writer's temporary of the same file: draw another name
            return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666), tmp


def on_disk(path: Path | str) -> str | None:
    """The hash of a file's bytes now, as planning takes it (None: no file, or a blank one). Raises OSError."""
    try:
        data = file_bytes(path)
    except FileNotFoundError:
        return None
    return digest(data) if data.strip() else None


def load_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 0):
    """One image as upright RGB (16-bit scaled down, transparency on white), or BadInput with a reason a person can
    act on. With min_side, a JPEG is decoded at 1/2, 1/4 or 1/8 scale with both sides at least min_side (several
    times cheaper than a full decode and a resize); img.info["full_size"] keeps the full image's upright size."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size  # header only: a bomb is refused before its pixels exist
            if width * height > max_pixels:
                raise BadInput(f"refused as a decompression bomb: {width}x{height} pixels, "
                               f"over the {max_pixels:,} limit")
            if min_side:
                img.draft(None, (min_side, min_side))  # a no-op for formats other than JPEG
            img.load()
            quarter_turn = img.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8)  # what exif_transpose will do
            upright = ImageOps.exif_transpose(img)
            if upright.mode in ("I;16", "I;16B", "I;16L", "I"):
                upright = upright.convert("I").point(lambda v: v * (1 / 256)).convert("L")
            if upright.mode in ("RGBA", "LA", "PA", "RGBa") or upright.mode == "P" and "transparency" in upright.info:
                upright = Image.alpha_composite(Image.new("RGBA", upright.size, "white"), upright.convert("RGBA"))
            upright = upright.convert("RGB")
    except Image.DecompressionBombError as e:
        raise BadInput(f"refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:
        size = path.stat().st_size if path.exists() else 0
        raise BadInput("empty file (0 bytes)" if size == 0 else "not an image PIL can read") from e
    except (FileNotFoundError, PermissionError) as e:  # its access, not its bytes: a chmod fixes it, and no stamp
        raise ItemError(f"cannot read image: {e.strerror or e}") from e  # would tell, so it is not remembered as bad
    except (OSError, SyntaxError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise BadInput(f"cannot decode image: {reason}") from e
    upright.info["full_size"] = (height, width) if quarter_turn else (width, height)
    return upright


def image_data_url(path: Path, max_side: int) -> str:
    """A JPEG data URL of the image, upright RGB, its longest side at most max_side, for served vision models."""
    img = load_image(path, min_side=max_side)
    img.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def own_bytes_url(path: Path, max_side: int) -> str | None:
    """The file's own bytes as a data URL where a served model can take them as they are: a JPEG, PNG or WebP, RGB
    or 8-bit greyscale (a server converts that to RGB without loss; vLLM does), opaque, one frame, within max_side,
    upright as stored, and whole as far as its last bytes tell. Decodes no pixels. None for anything else: it is
    converted (image_data_url), which reports a truncated or unreadable file."""
    from PIL import Image

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            mime = SENDABLE_FORMATS.get(img.format)
            whole = {"JPEG": data.endswith(b"\xff\xd9"), "PNG": data.endswith(b"IEND\xaeB`\x82"),
                     "WEBP": len(data) >= int.from_bytes(data[4:8], "little") + 8}.get(img.format)
            # The base class's getexif: PNG's own decodes the pixels first, to look for EXIF after them.
            if (not whole or img.mode not in ("RGB", "L") or "transparency" in img.info
                    or getattr(img, "n_frames", 1) > 1 or max(img.size) > max_side
                    or img.width * img.height > MAX_IMAGE_PIXELS
                    or Image.Image.getexif(img).get(ORIENTATION_TAG, 1) != 1):
                return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def build_user_message(manual: str | None, generated: str) -> str:
    """The LLM's user turn: each caption once, clearly labelled; says so when there is no manual caption."""
    first = (f"Manual caption (written by a person; keep every fact, name and trigger word):\n{manual}" if manual
             else "There is no manual caption for this image; write the caption from the generated one.")
    return f"{first}\n\nGenerated caption (from a vision model; use it for visual detail):\n{generated}"


def keep_token_parts(manual: str | None, keep_tokens: int) -> list[str]:
    """The first N comma-separated parts of the manual caption: trigger words and names that must survive.
    As in kohya's keep_tokens, a caption without a comma is one part, and one with fewer parts keeps them all."""
    parts = [p.strip() for p in (manual or "").split(",")]
    return [p for p in parts if p][:max(keep_tokens, 0)]


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
    # What a removed phrase leaves: empty brackets, doubled commas, a space before a comma, punctuation at the start.
    rest = " ".join(re.sub(r"\(\s*\)|\[\s*\]", "", rest).split())
    rest = re.sub(r"\s+([,.;:!?])", r"\1", rest)
    rest = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", rest)
    rest = re.sub(r"[,;:]+(?=[.!?])", "", rest)
    rest = re.sub(r"([.!?])\s*[,;:]+", r"\1", rest)
    rest = re.sub(r"^[\s,;:.!?]+|[\s,;:]+$", "", rest)
    head = ", ".join(parts)
    return head + (" " if head[-1] in ".!?;:" else ", ") + rest if rest else head


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


def strip_echo(text: str, prompt: str | None) -> str:
    """text without the prompt echoed at its start, however re-spelled (BLIP lower-cases and spaces tokens, uncased
    tokenizers drop accents, character ones space letters): matched by letters alone, and cut at a word's end."""
    def fold(word: str) -> str:  # without case or accents, as uncased tokenizers give it back
        return "".join(c for c in unicodedata.normalize("NFKD", word.casefold()) if not unicodedata.combining(c))

    text = text.strip()
    target = "".join(fold(w) for w in re.findall(r"\w+", prompt or ""))
    seen = ""
    for match in re.finditer(r"\w+", text) if target else ():
        seen += fold(match.group())
        if seen == target:
            return text[match.end():].lstrip(" \t\r\n.,:;!?-\u2013\u2014").strip()
        if not target.startswith(seen):
            break
    return text


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
    """The chunks [n*size, (n+1)*size) of a list of `total` that this process does, each claimed when the one before
    is done with: claim() hands out chunk numbers from a counter all processes share; without it, every chunk."""
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


def first_words(text: str | None, n: int = 6) -> str:
    """The start of a caption, for a line that says what changed in it (-v)."""
    if not text:
        return "(none)"
    words = text.split()
    return '"' + " ".join(words[:n]) + (" …" if len(words) > n else "") + '"'


def json_line(record: dict) -> str:
    """One JSON line with names readable as they are. A name that is not valid UTF-8 keeps its bytes as \\udcNN
    escapes (valid JSON, and json.loads then os.fsencode give back the exact name) where UTF-8 cannot hold them."""
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", json.dumps(record, ensure_ascii=False))


# --------------------------------------------------------------------------------------------
# Records: what made each cache
# --------------------------------------------------------------------------------------------

RECORDS_DIR = ".enhance_captions"  # hidden: trainers, imagefolder loaders and walk_images never look inside
RECORDS_FILE = "records.jsonl"
JOURNAL_DIR = "journal"
KIND_GENERATED, KIND_COMBINED, KIND_TRAINER = "generated", "combined", "trainer"


def dataset_root(folder: Path) -> Path:
    """The dataset a folder is part of: the outermost folder at or above it with records (else the folder itself), so
    a run on a sub-folder uses the dataset's records and lock (its own went stale when the whole dataset ran)."""
    return next((p for p in reversed((folder, *folder.parents)) if (p / RECORDS_DIR).is_dir()), folder)


def settings_id(kind: str, values: dict) -> str:
    return kind[:1] + "-" + digest(json.dumps(values, sort_keys=True, ensure_ascii=False).encode("utf-8"))[:12]


# One per cache: 400k of them at 200k images. Not frozen, though nothing changes one (dataclasses.replace makes
# another): a frozen dataclass sets each of its 14 fields through object.__setattr__, 6% of planning 50k images.
@dataclasses.dataclass(slots=True)
class Record:
    """What made one cache file. `sha` is the hash of the bytes as written; the inputs are hashes too."""

    sha: str
    settings: str
    image: str | None = None      # image_stamp() of the image the caption was made from
    manual: str | None = None     # hash of the manual caption file's bytes (None: there was none)
    generated: str | None = None  # hash of the vision caption's bytes the merge was made from
    combined: str | None = None   # hash of the combined caption's bytes a --write_captions file copies
    commit: str | None = None     # the vision model's resolved revision, when known
    finish: str | None = None     # id of the settings that made the LLM's reply this file (--keep_tokens, --prefix,
    #                               --suffix, the budget); set: the reply is recorded, so they can be re-applied
    reply: str | None = None      # the LLM's cleaned reply, where it differs from the file's text
    adopted: bool = False         # found without a record and taken as it is
    by_hand: bool = False         # saved by a person from the review page: theirs, kept like any hand edit
    made: str | None = None       # when the record was written
    check: str | None = None      # --verify: the settings id of the check the caption passed or was flagged by
    findings: dict | None = None  # --verify: what that check still found ({"unsupported": [...], ...}); None: clean

    def line(self, cache: str) -> dict:
        return {"cache": cache, **{k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False)}}

    @classmethod
    def from_line(cls, row: dict, shared: dict[str, str]) -> Record:
        for name in SHARED_FIELDS:
            if type(value := row.get(name)) is str:
                row[name] = shared.setdefault(value, value)
        return cls(*[row.get(name, default) for name, default in RECORD_FIELDS])


RECORD_FIELDS = tuple((f.name, f.default) for f in dataclasses.fields(Record))  # read once: 100k lines a rerun
# Values the records repeat: a few settings ids and times among 100k records, and an image's stamp and its vision
# caption's hash in the records of both its caches. One string for each value, found in `shared` while the records
# are read: 136 bytes an image of a cached rerun. records.jsonl is sorted by cache, so an image's records are next to
# each other: `shared` holds the values of the last lines only (all of them made a dict of 9 MB at 50k images).
SHARED_FIELDS = ("settings", "finish", "check", "made", "image", "sha", "generated")
SHARED_MOST = 1000
OURS, EDITED, UNRECORDED = "ours", "edited", "unrecorded"


class Records:
    """The record of every cache this script wrote, in `.enhance_captions/` at the dataset root: `records.jsonl`, one
    JSON line per cache (and one per distinct set of settings), and a journal that each process alone appends to,
    `journal/<time>-<host>-<pid>.jsonl`. A record is appended before its cache is renamed into place: a kill between
    the two leaves the old file, whose record is kept for that (`previous`), so a cache is never mistaken for a hand
    edit. The main process folds the journals into records.jsonl at the end of a run (a killed run's, at the next)."""

    def __init__(self, root: Path):
        self.root, self.folder = root, root / RECORDS_DIR
        self.prefix = str(root) + os.sep  # of every path inside the root: key() cuts it off
        self.latest: dict[str, Record] = {}
        self.previous: dict[str, Record] = {}
        self.settings: dict[str, dict] = {}
        self.journal = None
        self.lock = threading.Lock()

    def key(self, path: Path | str) -> str:
        text = str(path)
        if text.startswith(self.prefix):  # what relative_to would give, without its cost (100k calls a rerun)
            return text[len(self.prefix):].replace(os.sep, "/")
        return Path(path).relative_to(self.root).as_posix()

    def load(self) -> Records:
        shared: dict[str, str] = {}  # see SHARED_FIELDS; let go once the records are read
        for path in [self.folder / RECORDS_FILE, *self.journals()]:
            self._read(path, shared)
        return self

    def journals(self) -> list[Path]:
        return sorted((self.folder / JOURNAL_DIR).glob("*.jsonl"))  # named by start time: oldest first

    def _read(self, path: Path, shared: dict[str, str]) -> None:
        with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="surrogateescape") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                    if "settings" in row and "values" in row:
                        self.settings[row["settings"]] = row["values"]
                    else:
                        self._remember(row["cache"], Record.from_line(row, shared))
                        if len(shared) > SHARED_MOST:
                            shared.clear()
                except (ValueError, KeyError, TypeError):  # a line a kill cut short, or a person's typo
                    continue

    def _remember(self, key: str, record: Record) -> None:
        old = self.latest.get(key)
        if old is not None and old.sha != record.sha:
            self.previous[key] = old
        self.latest[key] = record

    def match(self, path: Path, sha: str | None) -> tuple[str, Record | None]:
        """Is the cache file with this hash ours (and by which record), edited by hand, or unrecorded?"""
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

    def write(self, path: Path, record: Record, values: dict | None = None, finish: dict | None = None,
              check_values: dict | None = None) -> None:
        """Append one record to this process's journal (its settings lines first, the first time they are used)."""
        record = dataclasses.replace(record, made=time.strftime("%Y-%m-%dT%H:%M:%S"))
        lines = []
        for sid, table in ((record.settings, values), (record.finish, finish), (record.check, check_values)):
            if sid and table is not None and self.settings.get(sid) != table:
                self.settings[sid] = table
                lines.append({"settings": sid, "values": table})
        key = self.key(path)
        lines.append(record.line(key))
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in lines)
        with self.lock:
            if self.journal is None:
                (self.folder / JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
                name = f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}.jsonl"
                self.journal = open(self.folder / JOURNAL_DIR / name, "a", encoding="utf-8", errors="surrogateescape")
            self.journal.write(text)
            self.journal.flush()  # in the kernel before the cache is renamed: a SIGKILL loses neither
            self._remember(key, record)

    def close(self) -> None:
        with self.lock:
            if self.journal is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self.journal.fileno())
                self.journal.close()
                self.journal = None

    def compact(self) -> None:
        """Fold every journal into records.jsonl (main process, once every process has finished writing).
        Where a kill left two candidates for one cache, the one that matches the file wins."""
        self.close()
        journals = self.journals()
        if not journals:
            return
        merged, shared = Records(self.root), {}
        merged._read(self.folder / RECORDS_FILE, shared)
        compacted = dict(merged.latest)
        for journal in journals:
            merged._read(journal, shared)
        latest, previous = merged.latest, merged.previous
        touched = [key for key, record in latest.items() if compacted.get(key) is not record]
        for key in touched:  # keep the one record that stands for the file as it is now
            try:
                sha = digest((self.root / key).read_bytes())
            except OSError:  # the cache is gone: so is its record
                del latest[key]
                continue
            if key in previous and latest[key].sha != sha and previous[key].sha == sha:
                latest[key] = previous[key]
        used = {sid for r in latest.values() for sid in (r.settings, r.finish, r.check) if sid}
        settings = ({"settings": sid, "values": merged.settings[sid]} for sid in sorted(used & merged.settings.keys()))
        rows = itertools.chain(settings, (latest[key].line(key) for key in sorted(latest)))
        atomic_write(self.folder / RECORDS_FILE,  # line by line: 400,000 of them at 200,000 images
                     ((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape") for row in rows))
        for journal in journals:
            with contextlib.suppress(OSError):
                journal.unlink()


def write_cache(records: Records, path: Path, text: str, record: Record, values: dict | None, seen: str | None,
                finish: dict | None = None, check_values: dict | None = None) -> bool:
    """The one writer of a cache, with a last look: the file is replaced only while it is as planning saw it (`seen`,
    its bytes' hash then; None: absent). Else a person changed or created it: it stays unrecorded, and False says so."""
    data = cache_bytes(text)

    def last_look() -> bool:
        if on_disk(path) != seen:
            return False
        records.write(path, dataclasses.replace(record, sha=digest(data)), values, finish, check_values)
        return True

    try:
        return atomic_write(path, [data], last_look)
    except OSError as e:
        raise ItemError(f"cannot write {path.name}: {e.strerror or e}") from e


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


def scaled_wait(seconds: float) -> float:
    """A backoff, Retry-After or set-aside wait, times $ENHANCE_CAPTIONS_WAIT_SCALE: the tests run them all, shorter."""
    return seconds * wait_scale(os.environ.get(WAIT_SCALE_VARIABLE, ""))


@functools.cache  # each value of the variable read once, so a bad one warns once
def wait_scale(raw: str) -> float:
    with contextlib.suppress(ValueError):
        if 0 <= (scale := float(raw or 1)) < float("inf"):
            return scale
    warn_stderr(f"warning: {WAIT_SCALE_VARIABLE}={raw!r} is not a number of 0 or more; waits are not scaled")
    return 1.0


class SharedPause:
    """A Retry-After pause that every process of a run honours: the wall-clock time it ends, in a hidden file in the
    dataset folder, which they all share already (machines' clocks may differ a little). Each request costs a stat;
    the file is read only when it has changed."""

    def __init__(self, path: Path, wall=time.time):
        self.path, self.wall, self.until, self.seen = path, wall, 0.0, None

    def publish(self, seconds: float) -> None:
        if seconds > self.remaining():
            self.until = self.wall() + seconds
            with contextlib.suppress(OSError):  # a folder that refuses it leaves the pause to this process
                self.path.write_text(f"{self.until:.3f}\n", encoding="utf-8")

    def remaining(self) -> float:
        with contextlib.suppress(OSError, ValueError):  # none yet, or caught half-written: read again next time
            stat = self.path.stat()
            if (seen := (stat.st_mtime_ns, stat.st_size, stat.st_ino)) != self.seen:
                self.until = max(self.until, float(self.path.read_text(encoding="utf-8")))
                self.seen = seen
        return self.until - self.wall()


class RateLimiter:
    """At most `requests` requests and `tokens` tokens in any 60 s window, retries included. A 429 with Retry-After
    pauses every request of the run: those of this process here, those of the others through `shared`."""

    def __init__(self, requests: int = 0, tokens: int = 0, clock=time.monotonic, sleep=None,
                 shared: SharedPause | None = None):
        self.requests, self.tokens = requests, tokens
        self.clock, self.sleep = clock, sleep or asyncio.sleep
        self.sent: collections.deque[list] = collections.deque()  # [time, tokens] per request
        self.paused_until, self.shared = 0.0, shared

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + seconds)
        if self.shared is not None:
            self.shared.publish(seconds)

    async def acquire(self, tokens: int = 0) -> list:
        """Wait for room; the entry recorded for this request, [time, tokens], for the caller to correct."""
        while True:
            now = self.clock()
            while self.sent and self.sent[0][0] <= now - WINDOW_SECONDS:
                self.sent.popleft()
            waits = [self.paused_until - now, self.shared.remaining() if self.shared else 0.0]
            if self.requests and len(self.sent) >= self.requests:
                waits.append(self.sent[-self.requests][0] + WINDOW_SECONDS - now)
            excess = sum(t for _, t in self.sent) + tokens - self.tokens if self.tokens else 0
            for when, spent in self.sent:  # wait until enough old tokens leave the window
                if excess <= 0:
                    break
                excess -= spent
                waits.append(when + WINDOW_SECONDS - now)
            if max(waits) <= 0:
                self.sent.append([now, tokens])
                return self.sent[-1]
            await self.sleep(max(waits))


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


@dataclasses.dataclass(eq=False)
class Asking:
    """One item's requests (complete_item()), reached through ASKING: the run's stop, and whether a request is on
    the wire (its reply is worth waiting for when stopping). A pool tells failing items apart by it."""

    stopping: asyncio.Event
    in_flight: bool = False


ASKING: contextvars.ContextVar[Asking | None] = contextvars.ContextVar("asking", default=None)
# What the requests of this task cost, for the summary: a collections.Counter with "requests" and "tokens" (where the
# server reports usage); set around the merge and the check, so that each is counted apart.
SPENDING: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar("spending", default=None)


def on_the_wire() -> None:
    """A request goes out for this task's item: from now on its reply is awaited even when stopping."""
    if (asking := ASKING.get()) is not None:
        if asking.stopping.is_set():
            raise Stopped  # the wait for the limiter or an endpoint ended just as the stop came
        asking.in_flight = True
    if (spending := SPENDING.get()) is not None:
        spending["requests"] += 1


async def unless_set(awaitable, event: asyncio.Event, error: Callable[[], BaseException],
                     let_finish: Callable[[], bool] = lambda: False):
    """Await `awaitable` unless `event` is set first: then cancel it (which wakes a wait in the rate limiter, for an
    endpoint or in a backoff at once) and raise error(), unless let_finish() says it is worth waiting for still."""
    task = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and not let_finish():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Stopped, Exception):
                await task
            raise error()
        return await task
    finally:
        waiter.cancel()
        task.cancel()  # nothing once it is done; here when this is cancelled itself, so that the request is too


class EndpointChat:
    """chat.completions on one OpenAI-compatible endpoint, under its rate limiter. The client retries nothing:
    complete_item() owns an item's attempts, and the pool sees every request that fails."""

    def __init__(self, base_url: str | None, api_key: str | None, model: str | None, limiter: RateLimiter,
                 timeout: float, max_tokens: int, temperature: float, stage: str = STAGE_LLM):
        import openai

        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.stage, self.settings = stage, ENDPOINT_SETTINGS[stage]
        self.limiter, self.api_key, self.openai = limiter, api_key, openai
        # A local server needs no key, but the client insists on one.
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=0,
                                         timeout=timeout)
        self.structured = True  # takes response_format; False once it refused it (a 400 naming it), for the run

    async def check(self) -> str:
        """Fail fast, before any model loads, on an endpoint that is down, refuses the key or does not serve the
        model. Returns the model to use: the one configured, or without one the endpoint's only listed model."""
        o, flag = self.openai, self.settings["model"]
        try:
            page = await self.client.with_options(max_retries=1, timeout=PREFLIGHT_TIMEOUT).models.list()
            served = [m.id for m in page.data]
        except (o.AuthenticationError, o.PermissionDeniedError) as e:
            raise FatalEndpointError(self._explain(e)) from e
        except o.APIConnectionError as e:
            raise FatalEndpointError(f"cannot reach the endpoint {self._url()}: {type(e).__name__}; is the server "
                                     f"running and {self.settings['url']} right?") from e
        except o.APIError:
            served = []  # some servers have no /models
        if self.model is None and len(served) == 1:
            self.model = served[0]
        elif self.model is None:
            listed = f"serves {len(served)} models ({model_names(served)}): pick" if served else "lists no models: name"
            raise FatalEndpointError(f"no {flag} given, and the endpoint {self._url()} {listed} one with {flag} or "
                                     "OPENAI_MODEL")
        elif self.model not in served:
            # llama.cpp lists one name and answers to any: only a request tells. vLLM and OpenAI refuse an unknown
            # model with 404, a `transformers serve` pinned to one model with 400.
            try:
                await self.client.with_options(max_retries=1).chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
            except (o.NotFoundError, o.BadRequestError) as e:
                raise FatalEndpointError(f"the endpoint {self._url()} refused {flag} {self.model!r} "
                                         f"({e.status_code}: {server_reason(e, self.api_key)}); it serves: "
                                         f"{model_names(served) if served else 'no models listed'}") from e
            except (o.AuthenticationError, o.PermissionDeniedError) as e:
                raise FatalEndpointError(self._explain(e)) from e
            except o.APIError:
                pass  # it answered (busy, rate limited, a broken reply) without refusing the name: the run will tell
        return self.model

    def _url(self) -> str:
        return redact(str(self.client.base_url), self.api_key)

    def _explain(self, e) -> str:
        """A 401, 403 or 404, which every request would get, as what to change."""
        url, reason, settings = self._url(), server_reason(e, self.api_key), self.settings
        return {401: f"the endpoint {url} rejected the API key (401: {reason}); check {settings['key']}",
                403: f"the endpoint {url} refused access (403: {reason}); check {settings['key']} and its permissions",
                404: f"the endpoint {url} answered 404 for {settings['model']} {self.model!r} ({reason}): "
                     f"unknown model or wrong {settings['url']}"}[e.status_code]

    async def complete(self, messages: list[dict], temperature: float | None = None,
                       response_format: dict | None = None) -> Reply:
        """One chat completion. A `response_format` this endpoint refused once goes as an instruction in the prompt."""
        o = self.openai
        if response_format is not None and not self.structured:
            messages, response_format = format_in_prompt(messages, response_format), None
        options = {"response_format": response_format} if response_format is not None else {}
        # The tokens it may spend, for --tpm; not measured without it (a vision request carries ~100 KB of image).
        estimate = estimate_tokens(json.dumps(messages)) + self.max_tokens if self.limiter.tokens else 0
        entry = await self.limiter.acquire(estimate)
        on_the_wire()
        try:
            response = await self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=self.max_tokens,
                temperature=self.temperature if temperature is None else temperature, **options)
        except (o.AuthenticationError, o.PermissionDeniedError, o.NotFoundError) as e:
            raise FatalEndpointError(self._explain(e)) from e
        except o.APIStatusError as e:
            reason = server_reason(e, self.api_key)
            if options and e.status_code == 400 and FORMAT_REFUSED.search(reason):
                # Not a retry: the same attempt, sent in the form this endpoint takes, once for the run.
                self.structured = False
                warn_stderr(f"warning: endpoint {self._url()} refuses response_format ({reason}); the "
                            "check asks for its JSON in the prompt instead")
                return await self.complete(messages, temperature, response_format)
            # A 429 or 503 with Retry-After pauses every request to this endpoint (of every process), not only this.
            retry_after = e.response.headers.get("retry-after")
            if e.status_code in (429, 503) and retry_after:
                with contextlib.suppress(ValueError):
                    self.limiter.pause(scaled_wait(min(float(retry_after), 600.0)))
            if e.status_code == 429:
                raise RetryableReply(f"rate limited (429): {reason}") from e
            error = EndpointDown if e.status_code >= 500 else Refused
            raise error(f"endpoint answered {e.status_code}: {reason}") from e
        except o.APITimeoutError as e:
            raise EndpointDown("request timed out (--timeout)") from e
        except o.APIConnectionError as e:  # ConnectError (httpx, httpx2): no connection was made at all
            raise EndpointDown(f"connection failed: {redact(str(e), self.api_key)[:200]}",
                               refused=type(e.__cause__).__name__ == "ConnectError") from e
        except (o.APIResponseValidationError, ValueError) as e:
            raise RetryableReply(f"invalid reply from the endpoint: {type(e).__name__}") from e
        with contextlib.suppress(ValueError, TypeError, AttributeError):  # what it really cost, where the server says
            entry[1] = int(response.usage.total_tokens)
            if (spending := SPENDING.get()) is not None:
                spending["tokens"] += entry[1]
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
    failing: set[int] = dataclasses.field(default_factory=set)  # the items (ids of their Asking) they came from
    back_at: float = 0.0  # set aside until this time (the pool's clock)
    aside: float = 0.0  # how long it was set aside last; 0 once it answers again
    reason: str = ""


class EndpointPool:
    """The endpoints of one stage (servers of one model), each with its own limiter, so --rpm and --tpm hold per
    endpoint. A request goes to the one with the fewest in flight, then the fewest sent.

    An endpoint that stops answering is set aside with one warning: at once when no connection can be made, else
    after SET_ASIDE_AFTER failed requests in a row from more than one item (one item failing alone is its own fault).
    It is tried again after SET_ASIDE_SECONDS, one request at a time, the wait doubled each time it fails again;
    meanwhile requests go to the others, or wait, spending no attempts. Once every endpoint is set aside and none has
    answered for `give_up_after` seconds since the stage's last answer (or first request), every item waiting and
    every request in flight ends with GaveUp: a hung server costs minutes, not hours."""

    def __init__(self, chats: Sequence[EndpointChat], warn: Callable[[str], None] | None = None,
                 give_up_after: float = GIVE_UP_AFTER, clock=time.monotonic):
        self.members = [PoolMember(chat) for chat in chats]
        self.warn = warn or warn_stderr
        self.give_up_after, self.clock = give_up_after, clock
        self.answered = 0.0  # the stage's last answer, or its first request
        self.replied = False  # whether any request got a reply
        self.refusal, self.refusals = "", 0  # before one did: the last refusal, and how many in a row said the same
        self.gave_up: str | None = None
        self.changed = asyncio.Event()  # set, and replaced, whenever an endpoint's state changes
        self.over = asyncio.Event()  # set when the stage gives up
        self.watch: asyncio.Task | None = None

    async def check(self) -> str:
        """Each endpoint's check in turn: the first settles the model, which the others must serve."""
        model = self.members[0].chat.model
        for member in self.members:
            member.chat.model = model
            model = await member.chat.check()
        return model

    async def complete(self, messages: list[dict], **options) -> Reply:
        """One request, on the endpoint _ready() picks; complete_item() asks again where it fails."""
        member = await self._ready()
        member.in_flight += 1
        member.sent += 1
        try:
            reply = await unless_set(member.chat.complete(messages, **options), self.over,
                                     lambda: GaveUp(self.gave_up))
        except EndpointDown as e:
            self._failed(member, e)
            if len(self.members) > 1:
                raise EndpointDown(f"{member.chat._url()}: {e}", e.refused) from e
            raise
        except ItemError as e:  # it answered, though not with a reply to use (a 4xx, a 429, a broken reply)
            self._answered(member)
            if isinstance(e, Refused) and not self.replied:
                self._refused(member, e)
            raise
        finally:
            member.in_flight -= 1
            self._wake()
        self._answered(member)
        self.replied = True
        return reply

    def _refused(self, member: PoolMember, error: Refused) -> None:
        """The first REFUSED_AT_START requests of the stage all refused alike for a setting every request carries (a
        --max_tokens over the model's limit, a --temperature a reasoning model does not take), none answered: every
        request would be, so the stage stops at once. Any other refusal is the item's own (its length, its size, its
        content), even when several say the same: those fail, and the run goes on, so a run never stops for good at
        the same few items."""
        if not REQUEST_SETTING.search(str(error)):
            return
        self.refusals = self.refusals + 1 if str(error) == self.refusal else 1
        self.refusal = str(error)
        if self.refusals >= REFUSED_AT_START:
            raise FatalEndpointError(f"the {member.chat.stage} endpoint {member.chat._url()} refused each of the "
                                     f"first {self.refusals} requests and answered none ({error}); the rest is left "
                                     "for the next run") from error

    async def _ready(self) -> PoolMember:
        """The endpoint to send to; one back on trial takes one request at a time. With none ready, wait for one."""
        if self.watch is None:  # the stage's first request: it has had no chance to fail before
            self.answered = self.clock()
            self.watch = asyncio.ensure_future(self._watch())
        while True:
            if self.gave_up:
                raise GaveUp(self.gave_up)
            now = self.clock()
            ready = [m for m in self.members if m.back_at <= now and not (m.aside and m.in_flight)]
            if ready:
                return min(ready, key=lambda m: (m.in_flight, m.sent))
            back = [m.back_at - now for m in self.members if m.back_at > now]
            await self._changes(min(back) if back else None)

    async def _watch(self) -> None:
        while True:
            left = self.answered + self.give_up_after - self.clock()
            if left <= 0 and all(m.aside for m in self.members):  # set aside, or back on trial and unanswered
                stage, plural = self.members[0].chat.stage, "s" if len(self.members) > 1 else ""
                where = "; ".join(f"{m.chat._url()} ({m.reason})" for m in self.members)  # each, and its last error
                self.gave_up = (f"the {stage} endpoint{plural} {where}: no answer for "
                                f"{self.clock() - self.answered:.0f} s (--give_up_after {self.give_up_after:g}); the "
                                f"{stage} stage stopped, and what it had not done is left for the next run")
                self.over.set()
                self._wake()
                return
            await self._changes(left if left > 0 else None)

    async def _changes(self, timeout: float | None) -> None:
        """Wait until an endpoint's state changes, or `timeout` seconds. Not wait_for: before Python 3.12 it drops a
        cancellation that comes as the event is set, and close() would wait out the whole timeout."""
        waiter = asyncio.ensure_future(self.changed.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _answered(self, member: PoolMember) -> None:
        member.failures, member.aside = 0, 0.0
        member.failing.clear()
        self.answered = self.clock()

    def _failed(self, member: PoolMember, error: EndpointDown) -> None:
        member.failures += 1
        member.failing.add(id(ASKING.get()))
        member.reason = str(error)
        now = self.clock()
        if member.back_at > now:  # set aside already, by a request that failed before this one
            return
        down = member.failures >= SET_ASIDE_AFTER and len(member.failing) > 1
        if not (error.refused or down or member.aside):  # aside: just back, on trial
            return
        member.aside = min(2 * member.aside or scaled_wait(SET_ASIDE_SECONDS), scaled_wait(SET_ASIDE_MAX_SECONDS))
        member.back_at = now + member.aside
        left = sum(m.back_at <= now for m in self.members)
        self.warn(f"warning: endpoint {member.chat._url()} set aside for {member.aside:.3g} s ({error}); "
                  + (f"its requests go to the others ({left} left)" if left else
                     f"requests wait for it (the stage gives up after --give_up_after {self.give_up_after:g} s "
                     "without an answer)"))

    async def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watch
        for member in self.members:
            await member.chat.close()


class LocalChat:
    """A transformers causal LM in this process; concurrent requests are gathered into batches."""

    def __init__(self, model_id: str, device, dtype, batch_size: int, max_tokens: int, temperature: float,
                 revision: str = "main", trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        common = {"revision": revision, "trust_remote_code": trust_remote_code}
        check_model_source(model_id, "--local_llm", revision)
        with loading(f"--local_llm {model_id}"):
            self.tokenizer = AutoTokenizer.from_pretrained(model_id, **common)
            self.model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **common).to(device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device, self.batch_size, self.max_tokens, self.temperature = device, batch_size, max_tokens, temperature
        self.queue: list[tuple[list[dict], float, asyncio.Future]] = []
        self.draining: asyncio.Task | None = None  # held, so that the loop cannot drop it halfway

    async def complete(self, messages: list[dict], temperature: float | None = None,
                       response_format: dict | None = None) -> Reply:
        """Queued for a batch. A local model has no constrained decoding: a response_format goes in the prompt."""
        on_the_wire()  # queued for a batch is in flight: a generation cannot be called back halfway
        if response_format is not None:
            messages = format_in_prompt(messages, response_format)
        future = asyncio.get_running_loop().create_future()
        self.queue.append((messages, self.temperature if temperature is None else temperature, future))
        if self.draining is None or self.draining.done():
            self.draining = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.queue:
            if len(self.queue) < self.batch_size:
                await asyncio.sleep(0.02)  # let the other workers queue their requests into this batch
            temperature = self.queue[0][1]  # one generate call samples at one temperature (a check's is 0)
            batch = [q for q in self.queue if q[1] == temperature][: self.batch_size]
            self.queue = [q for q in self.queue if not any(q is b for b in batch)]
            try:
                replies = await asyncio.to_thread(self._generate, [m for m, _, _ in batch], temperature)
            except Exception as e:  # one broken batch fails its items, not the run
                for _, _, future in batch:
                    future.set_exception(ItemError(f"local LLM failed: {e}"))
                continue
            for (_, _, future), reply in zip(batch, replies):
                future.set_result(reply)

    def _generate(self, conversations: list[list[dict]], temperature: float) -> list[Reply]:
        import torch

        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = temperature > 0
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=sample,
                                      temperature=temperature if sample else None,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        return [Reply(self.tokenizer.decode(row, skip_special_tokens=True),
                      "stop" if eos.intersection(row) or len(row) < self.max_tokens else "length")
                for row in new.tolist()]

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
                        sleep=asyncio.sleep, too_long: Callable[[str], str | None] | None = None,
                        on_cut: Callable[[], None] | None = None, options: dict | None = None) -> str:
    """The one retry layer: ask until the reply is usable, in at most max_retries + 1 requests in all. A failed
    request (5xx, timeout, dropped connection, 429, broken reply) and an unusable reply (empty, refused, cut off) are
    asked again after a backoff. A reply that `too_long` finds over the budget is asked again with its count and the
    limit; OverBudget carries the last one when none fits. With `on_cut`, a reply cut at the token limit is kept (a
    served vision caption, as a local one is) and on_cut() says so. Raises Stopped once `stopping` is set."""
    asking = Asking(stopping or asyncio.Event())
    token = ASKING.set(asking)
    try:
        problem = "no attempt made"
        for attempt in range(max_retries + 1):
            if attempt:  # asked before: back off
                backoff = scaled_wait(min(30.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random()))
                await unless_set(sleep(backoff), asking.stopping, Stopped)
            try:
                # A request on the wire is let finish when stopping: its reply is saved.
                reply = await unless_set(backend.complete(messages, **(options or {})), asking.stopping, Stopped,
                                         lambda: asking.in_flight)
            except (RetryableReply, EndpointDown) as e:
                problem = str(e)
                continue
            finally:
                asking.in_flight = False
            text = clean_reply(reply.text, manual)
            cut = reply.finish_reason == "length" and on_cut is not None
            problem = reply_problem(text, None if cut else reply.finish_reason)
            if problem:
                continue
            if cut:
                on_cut()
            text = keep_tokens_first(text, must_keep)
            over = too_long(text) if too_long else None
            if over is None:
                return text
            if attempt == max_retries:
                raise OverBudget(text, f"{over} (after {max_retries + 1} attempts)")
            messages = messages + [{"role": "assistant", "content": reply.text or ""},
                                   {"role": "user", "content": f"That caption is too long: {over}. Write it again, "
                                                               "shorter, keeping every fact of the manual caption."}]
    finally:
        ASKING.reset(token)
    raise ItemError(f"{problem} (after {max_retries + 1} attempts)")


# --------------------------------------------------------------------------------------------
# --verify: a merged caption checked against the captions it was made from
# --------------------------------------------------------------------------------------------

CHECK_KEYS = ("unsupported", "contradictions", "missing")
CHECK_FORMAT = {"type": "json_schema", "json_schema": {"name": "caption_check", "strict": True, "schema": {
    "type": "object", "properties": {key: {"type": "array", "items": {"type": "string"}} for key in CHECK_KEYS},
    "required": list(CHECK_KEYS), "additionalProperties": False}}}
FORMAT_REFUSED = re.compile(r"response_format|json_schema", re.IGNORECASE)  # in a 400: a server without them


@dataclasses.dataclass(frozen=True)
class Check:
    """What the check found in one merged caption."""

    unsupported: tuple[str, ...] = ()     # statements neither source supports
    contradictions: tuple[str, ...] = ()  # statements that contradict the manual caption
    missing: tuple[str, ...] = ()         # facts of the manual caption the merged caption lost

    @property
    def clean(self) -> bool:
        return not (self.unsupported or self.contradictions or self.missing)

    def recorded(self) -> dict | None:
        """As the record keeps it: the three lists, or None for a clean caption."""
        return None if self.clean else {key: list(getattr(self, key)) for key in CHECK_KEYS}

    def lines(self) -> list[str]:
        """Each finding as the second merge's request names it: what to remove, what to keep."""
        return [f"remove: {s}" for s in self.unsupported + self.contradictions] + [f"keep: {s}" for s in self.missing]


def format_in_prompt(messages: list[dict], response_format: dict) -> list[dict]:
    """The JSON a response_format asks for, asked in words at the end of the last user turn instead."""
    keys = ", ".join(f'"{key}"' for key in response_format["json_schema"]["schema"]["properties"])
    ask = (f"Answer with one JSON object only, no other text, with exactly the keys {keys}, each a list of strings "
           "(empty when there is nothing to report).")
    *head, last = messages
    return [*head, {**last, "content": f"{last['content']}\n\n{ask}"}]


def check_messages(prompt: str, manual: str | None, generated: str, caption: str,
                   fixed: Sequence[str] = ()) -> list[dict]:
    """The check's request: its instructions, then the two sources and the caption as the trainer will see it."""
    parts = [f"Manual caption (written by a person):\n{manual}" if manual else "There is no manual caption.",
             f"Generated caption (from a vision model):\n{generated}",
             f"Merged caption (to check):\n{caption}"]
    if fixed:
        parts.append("Fixed text the person adds to every caption (never a finding): " + "; ".join(fixed))
    return [{"role": "system", "content": prompt}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_check(text: str) -> Check | None:
    """The check's answer as one JSON object (maybe fenced) of CHECK_KEYS, each a list of strings; else None."""
    fenced = CODE_FENCE.match(text.strip())
    try:
        data = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None
    if not isinstance(data, dict) or set(data) != set(CHECK_KEYS) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()):
        return None
    return Check(*(tuple(s.strip() for s in data[key] if s.strip()) for key in CHECK_KEYS))


def with_findings(messages: list[dict], check: Check) -> list[dict]:
    """The merge's request again, with what the check found: one "remove: ..." or "keep: ..." line each."""
    *head, last = messages
    note = "A check of the caption merged from these found:\n" + "\n".join(check.lines()) + \
           "\nWrite the caption again, following each of these lines."
    return [*head, {**last, "content": f"{last['content']}\n\n{note}"}]


async def check_caption(backend, messages: list[dict], max_retries: int, *,
                        stopping: asyncio.Event | None = None) -> Check:
    """Ask the check at temperature 0 for its structured answer; an answer of the wrong shape is asked again once,
    saying what was wrong. Raises ItemError after that (a failed check, never a pass)."""
    options = {"temperature": 0.0, "response_format": CHECK_FORMAT}
    for _ in range(2):
        text = await complete_item(backend, messages, max_retries, stopping=stopping, options=options)
        check = parse_check(text)
        if check is not None:
            return check
        messages = messages + [{"role": "assistant", "content": text},
                               {"role": "user", "content": "That is not a JSON object with exactly the keys "
                                "unsupported, contradictions and missing, each a list of strings. Answer again with "
                                "that object only."}]
    raise ItemError(f"the check's answer is not the JSON asked for, twice: {text[:80]!r}")


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
    size = getattr(image_processor, "size", None)
    if not getattr(image_processor, "do_resize", False) or size is None:
        return 0
    # Sides (height/width, shortest_edge, longest_edge), never maximum heights or pixel budgets, which we cannot
    # bound. Qwen-VL keeps pixel counts under shortest_edge/longest_edge: read as sides they are only larger, so safe.
    values = {"longest_edge": size} if isinstance(size, int) else dict(size)  # a SizeDict yields only the keys set
    sides = [values.pop(key) for key in ("height", "width", "shortest_edge", "longest_edge") if key in values]
    if values or not all(isinstance(v, int) for v in sides):
        return 0
    side = max(sides, default=0)
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if side and pinpoints:  # LLaVA-NeXT, OneVision: the image is resized to one of these grids, then tiled
        return max([side] + [int(v) for point in pinpoints for v in point])
    switches = [v for v in (getattr(image_processor, name, None) for name in TILING_SWITCHES) if v is not None]
    if not any(switches or [getattr(image_processor, name, None) for name in TILE_COUNTS]):
        return side  # it does not tile: its switch says so, or, without one, it has no tile count
    tile = getattr(image_processor, "max_image_size", None)
    if side and getattr(image_processor, "do_image_splitting", False) and isinstance(tile, dict) \
            and set(tile) == {"longest_edge"}:  # Idefics3, SmolVLM: resized to `size`, split into tiles of this
        return max(side, int(tile["longest_edge"]))
    return 0  # tiles by a rule we cannot bound (crops of the full image, a grid of up to N tiles)


class LocalCaptioner:
    """A transformers image-to-text model of its processor's kind (kind_of); `collate` runs in DataLoader workers."""

    KINDS = "task-token models (Florence-2), chat-template vision models (Qwen-VL, SmolVLM, LLaVA, Janus, ...) " \
            "and plain image captioners (BLIP)"

    def __init__(self, processor, model, prompt: str | None, system_prompt: str | None, generate_kwargs: dict):
        self.processor, self.model, self.kind = processor, model, self.kind_of(processor)
        self.system_prompt, self.generate_kwargs = system_prompt, generate_kwargs
        self.decode_side = decode_side(processor.image_processor)
        self.prompt = prompt if prompt is not None else \
            {"task": DEFAULT_TASK_PROMPT, "chat": DEFAULT_CHAT_PROMPT, "plain": ""}[self.kind]
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and not getattr(model.config, "is_encoder_decoder", False):
            tokenizer.padding_side = "left"  # decoder-only: pad on the left so batching keeps captions equal

    def __getstate__(self) -> dict:
        # Decoding workers started by spawn (the default on macOS and Windows) unpickle the captioner with its
        # collate: the processor, never the model's weights.
        return {key: value for key, value in self.__dict__.items() if key != "model"}

    @staticmethod
    def kind_of(processor) -> str:
        if getattr(processor, "image_processor", None) is None:  # a text-only tokenizer can have a chat template
            raise UsageError(f"{type(processor).__name__} takes no images; supported: {LocalCaptioner.KINDS}")
        if callable(getattr(processor, "post_process_generation", None)):
            return "task"  # the prompt is a task token; the processor's own post-processing makes the caption
        if getattr(processor, "chat_template", None):
            return "chat"  # a chat turn in, the new tokens out
        if getattr(processor, "tokenizer", None) is not None:
            return "plain"  # the image (and an optional prompt prefix) in, text out
        raise UsageError(f"{type(processor).__name__} fits no supported kind; supported: {LocalCaptioner.KINDS}")

    def prepare(self, images: list) -> Any:
        if self.kind == "chat":
            inputs = self.processor.apply_chat_template(
                [self.conversation(img) for img in images], add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
        else:  # text always, even empty: processors that insert image tokens into it (PaliGemma) need it
            inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt",
                                    padding=True)
        return inputs, [img.info.get("full_size", img.size) for img in images]

    def collate(self, batch: list) -> tuple[list[int], Any, list[tuple[int, ItemError]]]:
        """The DataLoader's collate_fn: ImageFolder's (position, image, error) reads become the processor's inputs
        in the worker. Returns the positions captioned, their inputs, and each other position's error."""
        good = [(i, img) for i, img, _ in batch if img is not None]
        errors = [(i, err) for i, _, err in batch if err is not None]
        try:
            prepared = self.prepare([img for _, img in good]) if good else None
        except Exception:  # an image the processor refuses (Qwen-VL: aspect ratio over 200) must not sink its batch
            kept = []
            for index, img in good:
                try:
                    self.prepare([img])
                    kept.append((index, img))
                except Exception as e:
                    width, height = img.info.get("full_size", img.size)
                    errors.append((index, BadInput(f"the processor refused the {width}x{height} image: "
                                                   f"{type(e).__name__}: {first_line(e)}")))
            good = kept
            prepared = self.prepare([img for _, img in good]) if good else None
        if prepared is not None:
            inline_small_tensors(prepared[0])
        return [i for i, _ in good], prepared, errors

    def conversation(self, image) -> list[dict]:
        system = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}]
        user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": self.prompt}]}
        return (system if self.system_prompt else []) + [user]

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
        # Without the prompt's echo: plain captioners (BLIP, PaliGemma) return it, with their own token edits,
        # before the caption, and a chat model may open its answer by repeating the instruction.
        return [strip_echo(t, self.prompt) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


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
    except ImportError as e:  # an optional package the processor needs (num2words for SmolVLM): its own hint
        if "torchvision" in str(e).lower():
            raise UsageError(f"{cfg.model_id}'s processor needs torchvision: pip install torchvision") from e
        raise UsageError(f"cannot load the processor of {cfg.model_id}: {' '.join(str(e).split())}") from e
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
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            **{f"load_in_{cfg.quantization}": True}, bnb_4bit_compute_dtype=dtype)  # load_in_4bit or load_in_8bit
        kwargs.setdefault("device_map", {"": device})
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):  # remote-code models may register only the latter
        with loading(cfg.model_id):
            try:
                model = auto.from_pretrained(cfg.model_id, **kwargs)
                break
            except ValueError as e:
                if "Unrecognized configuration class" not in str(e):
                    raise  # not "not this auto class, try the next"
    else:  # no auto class took its configuration
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
    if Path(name).expanduser().is_dir():
        return
    if name.startswith((".", "/", "~")):
        raise UsageError(f"{flag}: no such folder: {name}")
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


@contextlib.contextmanager
def loading(what: str):
    """One line for a model that cannot load: a missing file or a bad configuration, or damaged weights (safetensors
    reports a truncated or garbled file with its own exception type, outside OSError/ValueError)."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load {what}: {first_line(e)}") from e
    except Exception as e:
        if type(e).__name__ not in ("SafetensorError", "HeaderTooLarge", "UnpicklingError"):
            raise
        raise UsageError(f"cannot load {what}: its weights are damaged ({first_line(e)}); download it again") from e


def release_memory() -> None:
    """Give the GPU memory of dropped models back before the next model or server needs it."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()  # nothing to do where CUDA was never initialised


class ImageFolder:
    """A torch Dataset: reads are (position, image or None, error or None). No __len__: a batch_sampler drives it."""

    def __init__(self, items: Sequence[Item], min_side: int = 0):
        self.items, self.min_side = items, min_side

    def __getitem__(self, index: int):
        try:
            return index, load_image(self.items[index].image, min_side=self.min_side), None
        except ItemError as e:
            return index, None, e


def worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # the workers decode; leave the cores to the model
    for signum in EXIT_FOR_SIGNAL:  # Ctrl-C reaches the whole process group: the main process decides
        signal.signal(signum, signal.SIG_IGN)


def inline_small_tensors(inputs) -> None:
    """Small tensors (token ids, masks, small pixel arrays) leave a worker as numpy arrays inside its pickle: torch
    gives every tensor a shared-memory segment whose descriptor costs an authenticated socket round trip. On 2 CPU
    cores (tiny Florence-2, batch 8) that was a median 4.1 ms per batch for three tensors, 1.0 ms inline. Large
    pixel arrays still go through shared memory, where one round trip is cheap beside copying them."""
    import torch

    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.nbytes < INLINE_TENSOR_BYTES and value.dtype != torch.bfloat16:
            inputs[key] = value.numpy()  # numpy has no bfloat16


# --------------------------------------------------------------------------------------------
# Progress and messages: one reporter, two ways out
# --------------------------------------------------------------------------------------------


def warn_stderr(message: str, stream=None) -> None:
    """A line between any progress bars: a stage's warning (where no Reporter reaches) or the Reporter's own."""
    from tqdm import tqdm

    tqdm.write(printable(message), file=stream or sys.stderr)


def say(text: str, stream=None) -> None:
    """Every other line for a person (a summary, a report, an error): any file name printable (see printable)."""
    print(printable(text), file=stream or sys.stdout, flush=True)


class Reporter:
    """Prints on the main process; bars on a terminal, a line every few seconds elsewhere (cron, CI, tee)."""

    def __init__(self, verbosity: int, is_main: bool, stream=None, processes: int = 1):
        self.verbosity, self.is_main, self.processes = verbosity, is_main, processes
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.lock = threading.Lock()
        self.said_stop = False

    def info(self, message: str) -> None:
        if self.is_main and self.verbosity >= 1:
            self.warn(message)

    def detail(self, message: str) -> None:
        if self.verbosity >= 2:
            self.warn(message)

    def warn(self, message: str) -> None:
        with self.lock:
            try:
                warn_stderr(message, self.stream)
            except BrokenPipeError:  # the reader went away (`2>&1 | head`): the work goes on, unseen
                stream_closed(self.stream)

    def stopping(self, stop: threading.Event) -> None:
        """Once, on the main thread, after a signal handler recorded the stop (a handler that printed could wait
        for the lock a print of this thread holds, for ever)."""
        signum = getattr(stop, "signal", None)
        if signum and not self.said_stop:
            self.said_stop = True
            self.warn(f"{signal.Signals(signum).name}: stopping after the work in flight (again to abort)")

    def progress(self, name: str, total: int | None) -> Progress:
        """Counts this process's items; only the main process prints, so with several the label says it is a share.
        Several processes take their work as they go: then total is None, and the count has no end to show."""
        if self.processes > 1:
            name = f"{name} (this process's share, 1 of {self.processes})"
        return Progress(self, name, total, enabled=self.is_main and self.verbosity >= 1 and total != 0)


class Progress:
    """One stage's count. It starts with its stage (begin(), or the first update): the rate and the ETA count from
    there, and the bar appears then, not above another stage's from the start of the run."""

    every = 5.0  # seconds between lines where there is no terminal

    def __init__(self, reporter: Reporter, name: str, total: int | None, enabled: bool):
        self.reporter, self.name, self.total, self.enabled = reporter, name, total, enabled
        self.done, self.start, self.last = 0, None, time.monotonic()
        self.lock = threading.RLock()
        self.bar = None

    def begin(self) -> None:
        with self.lock:
            if self.start is not None:
                return
            self.start = self.last = time.monotonic()
            if self.enabled and self.reporter.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc=self.name, unit="img", file=self.reporter.stream,
                                dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.begin()
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            elif time.monotonic() - self.last >= self.every or self.done == self.total:
                self.last = time.monotonic()
                self.reporter.warn(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - (self.start or time.monotonic()), 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            return f"{self.name}: {self.done} done ({rate:.2f}/s)"
        eta = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "?"
        return f"{self.name}: {self.done}/{self.total} ({rate:.2f}/s, ETA {eta})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.total is None:  # no total reached to print the last count at (0: none here)
            self.reporter.warn(self.line())


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


class AsyncStage:
    """Bounded concurrent workers on an event loop thread. `handle(item)` returns what to count ("done" when it
    says nothing) or raises: ItemError fails the item, FatalEndpointError stops the run, GaveUp stops the stage
    (the next run does the rest). The workers take `source`'s items first (this process's claimed chunks, see
    SharedWork), then what any thread submit()s, until close()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, concurrency: int,
                 handle: Callable[[Any], Any], stats: Stats, progress: Progress, stop: threading.Event,
                 source: Iterable = ()):
        self.loop, self.name, self.handle, self.concurrency = loop, name, handle, concurrency
        self.stats, self.progress, self.stop = stats, progress, stop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.taking = asyncio.Lock()  # one worker at a time draws from the source
        self.source: Iterator | None = iter(source)
        self.gave_up = False
        self.done: concurrent.futures.Future | None = None

    def start(self) -> AsyncStage:
        self.done = asyncio.run_coroutine_threadsafe(self._run(), self.loop)
        return self

    def submit(self, item: Item | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def close(self) -> None:
        self.submit(None)

    async def _run(self) -> None:
        await asyncio.gather(*(self._work() for _ in range(self.concurrency)))

    async def _next(self) -> Item | None:
        async with self.taking:
            if self.source is not None and not self.stop.is_set() and not self.gave_up:  # claim nothing more
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
            if self.stop.is_set() or self.gave_up:
                continue  # stopping: leave the rest for the next run
            try:
                self.stats.count(self.name, await self.handle(item) or "done")
            except Stopped:
                continue  # neither done nor failed: the next run does it
            except GaveUp as e:
                self.gave_up = True
                with self.stats.lock:
                    self.stats.gave_up = self.stats.gave_up or str(e)
                continue
            except ItemError as e:  # a BadInput is remembered until its file changes
                self.stats.fail(item.image, self.name, str(e), bad_input=isinstance(e, BadInput))
            except FatalEndpointError as e:
                with self.stats.lock:
                    self.stats.fatal = self.stats.fatal or str(e)
                self.stop.set()
            except Exception as e:  # a bug or an unexpected library error: fail the item, keep its reason
                self.stats.fail(item.image, self.name, f"{type(e).__name__}: {e}")
            self.progress.update()


class StopEvent(threading.Event):
    """The run's stop flag, set by a signal handler or a stage: a threading.Event that also sets the asyncio
    Events that tasks on event loops wait on, so that a wait in the limiter or a retry sleep ends at once."""

    def __init__(self):
        super().__init__()
        self.waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.signal: int | None = None  # the signal that stops the run

    def set(self) -> None:
        super().set()
        for loop, event in list(self.waiting):
            with contextlib.suppress(RuntimeError):  # the loop is closed already: nothing waits any more
                loop.call_soon_threadsafe(event.set)

    def on_loop(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        """An asyncio.Event on `loop` that is set when this one is. No lock: a signal handler may call set()
        while this runs, on the same thread; the is_set() after the append catches a set() that came first."""
        event = asyncio.Event()
        self.waiting.append((loop, event))
        if self.is_set():
            loop.call_soon_threadsafe(event.set)
        return event


class EventLoopThread:
    """An asyncio loop in a background thread, for the request stages while torch runs in the main one."""

    def __init__(self, stop: StopEvent):
        self.loop = asyncio.new_event_loop()
        self.stopping = stop.on_loop(self.loop)  # the run's stop flag, for tasks on this loop to wait on
        self.thread = threading.Thread(target=self.loop.run_forever, name="requests", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def wait_future(future, every_slice: Callable[[], None] = lambda: None) -> None:
    """Wait for a stage in slices, so signal handlers keep running in the main thread, which calls `every_slice`."""
    every_slice()
    while not concurrent.futures.wait([future], timeout=0.2).done:  # not result(timeout): a stage may raise a timeout
        every_slice()
    future.result()


def caption_locally(items: Sequence[Item], captioner: LocalCaptioner, cfg: Config, stats: Stats,
                    progress: Progress, reporter: Reporter, stop: threading.Event,
                    keep: Callable[[Item, str], str | None], batches: Iterable[range]) -> None:
    """The vision loop: DataLoader workers decode, the model generates per batch, and the writer thread keeps each
    caption at once (`keep(item, text)` writes its cache and passes the item on). `batches` (positions in `items`)
    are claimed here as the loader asks for them, a few batches ahead of the model (2 per worker)."""
    import torch
    from torch.utils.data import DataLoader

    def save(item: Item, text: str) -> None:  # on the writer thread, so saving overlaps the next batch
        try:
            stats.count(STAGE_VISION, keep(item, text) or "done")
        except ItemError as e:
            stats.fail(item.image, STAGE_VISION, str(e))
        except Exception as e:  # nothing on this thread may be lost: the item fails, saying why
            stats.fail(item.image, STAGE_VISION, f"cannot keep the caption: {type(e).__name__}: {first_line(e)}")

    loader = DataLoader(ImageFolder(items, captioner.decode_side), batch_sampler=batches,
                        num_workers=cfg.num_workers, collate_fn=captioner.collate,
                        worker_init_fn=worker_init if cfg.num_workers else None,
                        prefetch_factor=2 if cfg.num_workers else None)
    threads = model_threads(captioner.model.device, cfg.num_workers, torch.get_num_threads())
    with torch_threads_set(threads), ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer:
        try:
            for indices, prepared, errors in loader:
                for index, error in errors:  # it cannot be read or decoded, or the processor refuses it
                    stats.fail(items[index].image, STAGE_VISION, str(error), bad_input=isinstance(error, BadInput))
                    reporter.detail(f"failed {items[index].image}: {error}")
                failure = "the vision model returned an empty caption"
                try:
                    captions = captioner.caption(prepared) if indices else []
                except Exception as e:  # one bad batch does not stop the run; a dead worker does (below)
                    if worker_died(e):
                        raise
                    failure, captions = f"generation failed: {type(e).__name__}: {e}", [""] * len(indices)
                for index, text in zip(indices, captions):
                    if text.strip():
                        writer.submit(save, items[index], " ".join(text.split()))
                    else:
                        stats.fail(items[index].image, STAGE_VISION, failure)
                progress.update(len(indices) + len(errors))
                if stop.is_set():
                    reporter.stopping(stop)
                    break
        except RuntimeError as e:
            if not worker_died(e):
                raise
            stats.fatal = (f"an image decoding worker died ({first_line(e)}); captions written so far are kept. "
                           "Rerun with --num_workers 0, or give the container more shared memory "
                           "(docker run --shm-size 2g)")


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


def worker_died(error: BaseException) -> bool:
    """torch's DataLoader reports a dead worker (killed, out of memory, out of shared memory in a container) as a
    RuntimeError, raised from its SIGCHLD handler wherever the main thread happens to be, or on the next batch."""
    return isinstance(error, RuntimeError) and "DataLoader worker" in str(error)


def vision_messages(url: str, cfg: Config, prompt: str) -> list[dict]:
    system = [{"role": "system", "content": cfg.vlm_system_prompt}] if cfg.vlm_system_prompt else []
    return system + [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                  {"type": "image_url", "image_url": {"url": url}}]}]


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
REASON_UNCHECKED = "unchecked"  # --verify: a current caption made without the check
REFRESH_MODES = ("inputs", "settings", "none")


class Settings:
    """The settings that change each kind of cache's text; a record keeps the id of those that made it. A merge's
    are in two parts: those of the request (`merges`), which only the LLM can apply, and those that turn its reply
    into the file (`finish`), which a run re-applies to the recorded reply without asking again."""

    def __init__(self, vision: dict, merge: dict, variants: Sequence[Variant], finish: dict, check: dict | None):
        self.variants = list(variants)
        self.vision, self.vision_id = vision, settings_id(KIND_GENERATED, vision)
        self.merges = {v.name: merge | {"system_prompt": digest(v.system_prompt.encode("utf-8"))} for v in variants}
        self.merge_ids = {name: settings_id(KIND_COMBINED, values) for name, values in self.merges.items()}
        self.finish, self.finish_id = finish, settings_id("finish", finish)
        # --verify: the check's own settings, apart from the merge's, so that turning it on re-merges nothing
        self.check, self.check_id = check, settings_id("verify", check) if check else None


def variants_of(cfg: Config) -> list[Variant]:
    return [Variant("", cfg.system_prompt)] + [Variant(name, prompt) for name, prompt in cfg.variants]


# The Config fields that change each kind of cache's text. A new flag that changes what is generated joins one of
# these, and with it the cache settings: tests/test_settings.py fails until every Config field is placed. (The
# backend, the LLM, the system prompts and --verify's are added by run_settings itself.)
VISION_SETTINGS = ("model_id", "revision", "dtype", "quantization", "repetition_penalty", "prompt",
                   "vlm_system_prompt", "max_new_tokens")
SERVED_VISION_SETTINGS = ("vlm_model", "vlm_max_side", "prompt", "vlm_system_prompt", "max_new_tokens")
MERGE_SETTINGS = ("temperature", "max_tokens")
LOCAL_LLM_SETTINGS = ("revision", "dtype")
FINISH_SETTINGS = ("keep_tokens", "prefix", "suffix", "max_caption_tokens", "caption_tokenizer")
RECORDED_AS = {"vlm_model": "served_model", "vlm_max_side": "max_side"}  # the names records have always used


def settings_of(cfg: Config, names: Sequence[str]) -> dict:
    return {RECORDED_AS.get(name, name): getattr(cfg, name) for name in names}


def run_settings(cfg: Config) -> Settings:
    vision = settings_of(cfg, SERVED_VISION_SETTINGS if cfg.vlm_base_url else VISION_SETTINGS)
    merge = {"backend": "local" if cfg.local_llm else "endpoint", "model": cfg.local_llm or cfg.model}
    merge |= settings_of(cfg, MERGE_SETTINGS + (LOCAL_LLM_SETTINGS if cfg.local_llm else ()))
    check = {"prompt": digest(cfg.verify_prompt.encode("utf-8")), "model": merge["model"],
             "backend": merge["backend"]} if cfg.verify else None
    return Settings(vision, merge, variants_of(cfg), settings_of(cfg, FINISH_SETTINGS), check)


SETTING_WORDS = {"model_id": "vision model", "served_model": "vision model", "model": "LLM", "backend": "LLM backend",
                 "prompt": "vision prompt", "vlm_system_prompt": "vision system prompt",
                 "system_prompt": "system prompt"}
UNSHOWN_SETTINGS = {"system_prompt", "vlm_system_prompt"}  # long texts (or their hashes): named, not shown


def settings_change(records: Records, sid: str, current_id: str, current: dict) -> str | None:
    """How the settings that made a cache differ from this run's, in words (e.g. "another LLM (llama3.1 → qwen2.5)");
    None where they do not. A cache whose settings were not recorded differs in "other settings"."""
    if sid == current_id:
        return None
    old = records.settings.get(sid)
    if old is None:
        return "other settings"
    words = []
    for key in sorted(current.keys() | old.keys()):
        if old.get(key) == current.get(key):
            continue
        name = SETTING_WORDS.get(key, f"--{key}")
        before, after = (str(v) if v not in (None, "") else "none" for v in (old.get(key), current.get(key)))
        words.append(f"another {name}" if key in UNSHOWN_SETTINGS else f"another {name} ({before} → {after})")
    return " and ".join(words) or None  # None: recorded in an older layout, with the same values


@dataclasses.dataclass(slots=True)
class CacheFile:
    """A cache file as planning found it."""

    sha: str | None = None          # hash of its bytes; None: no file, or a blank one (both count as missing)
    text: str | None = None         # its text, when it is valid UTF-8
    error: str | None = None        # why its text cannot be used
    status: str = UNRECORDED        # OURS, EDITED or UNRECORDED (see Records.match)
    record: Record | None = None


def inspect_cache(records: Records, path: Path | str) -> CacheFile:
    try:
        data = file_bytes(path)
    except FileNotFoundError:
        return CacheFile()
    except OSError as e:  # unreadable: nothing can use it, and nothing may replace it
        return CacheFile(sha="unreadable", error=f"cannot read {os.path.basename(path)}: {e.strerror or e}",
                         status=EDITED)
    if not data.strip():
        return CacheFile()
    sha = digest(data)
    status, record = records.match(path, sha)
    if status == OURS:
        sha = record.sha  # the same hash, kept once
    try:
        return CacheFile(sha, decode_text(data), None, status, record)
    except UnicodeDecodeError as e:
        return CacheFile(sha, None, f"{os.path.basename(path)} is not valid UTF-8 (byte {e.start})", status, record)


@dataclasses.dataclass
class Plan:
    items: list[Item]
    to_generate: list[Item]
    to_combine: list[Merge]
    failures: list[Failure]
    stale: list[Path] = dataclasses.field(default_factory=list)  # temporaries of a killed run
    cached_generated: int = 0
    # the merged captions found current, by kind: the summary's "already current", the LLM stage's "from cache"
    current: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    records: Records | None = None
    settings: Settings | None = None
    adopt: list[tuple[Path, Record]] = dataclasses.field(default_factory=list)  # written once the lock is ours
    refinish: list[Refinish] = dataclasses.field(default_factory=list)  # written once the lock is ours
    differ: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (kind, how): caches
    count: Callable[[str], int] | None = None  # the trainer's token count, for --max_caption_tokens (planning only)
    limited: int = 0  # images with work that --limit left for the next run
    failing: dict[str, dict] = dataclasses.field(default_factory=dict)  # bad inputs remembered (failures.jsonl)
    still: dict[str, dict] = dataclasses.field(default_factory=dict)    # ...of them, unchanged: not tried this run
    bad: list[str] = dataclasses.field(default_factory=list)            # images whose input failed at planning


@dataclasses.dataclass(frozen=True)
class Refinish:
    """A merged caption whose recorded reply gets this run's --keep_tokens, --prefix, --suffix or budget: no request."""

    merge: Merge  # its record is the one the reply comes from
    reply: str
    text: str
    change: str  # in words, e.g. "another --keep_tokens (0 → 1)"


@contextlib.contextmanager
def collector_paused():
    """Planning makes a handful of objects per image and no garbage cycles; Python's cyclic collector, which runs
    every few hundred new objects over an ever larger heap, cost planning 20k images a fifth to a third of its time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@collector_paused()
def plan_work(cfg: Config, count: Callable[[str], int] | None = None, keep_texts: bool = False) -> Plan:
    """Find the images, read each one's caches, manual caption and records once, and decide what it needs.
    `count`: the trainer's token count, to tell a recorded reply that fits a new budget from one that needs asking.
    `keep_texts`: keep the caption texts of every item, not only of those with work (for the audit and the review)."""
    stale, nested = [], []
    images, failures = walk_images(cfg.dataset_dir, stale, nested)
    records = Records(dataset_root(cfg.dataset_dir))
    one_record_set(cfg.dataset_dir, records.root, nested)
    items, conflicts = pair_items(images, cfg.caption_extension)
    # --refresh none trusts every cache as it is: no record is needed to judge one; but the --write_captions files
    # are copies kept in step, and only their records tell this script's copy from a hand edit
    if cfg.refresh != "none" or cfg.write_captions:
        records.load()
    plan = Plan(items, [], [], failures + conflicts, stale, records=records, settings=run_settings(cfg), count=count,
                failing=read_failing(records))
    budget = cfg.limit
    for item in items:
        refinishing = len(plan.refinish)
        try:
            decide(item, cfg, plan)
            if cfg.write_captions:
                decide_trainer(item, cfg, plan)
        except ItemError as e:
            if isinstance(e, BadInput):
                plan.bad.append(str(item.image))
            plan.failures.append(Failure(str(item.image), STAGE_INPUT, str(e)))
            for merge in item.merges:  # the vision caption may still be made: the merges wait for the fix
                merge.reason = None
        merges = [m for m in item.merges if m.reason]
        # counted before --limit drops the work: a stale cache it leaves for the next run is not current
        plan.current.update(m.variant.kind for m in item.merges if m.text is not None and m.reason is None)
        plan.cached_generated += item.generated is not None and item.vision is None
        if (item.vision or merges) and budget is not None:
            budget -= 1
            if budget < 0:
                plan.limited += 1
                item.vision = None
                for merge in item.merges:
                    merge.reason = None
                continue
        if item.vision:
            plan.to_generate.append(item)
        plan.to_combine += merges
        if not (item.vision or merges or keep_texts or len(plan.refinish) > refinishing):
            forget_texts(item)
    return plan


def one_record_set(folder: Path, root: Path, nested: list[Path]) -> None:
    """A dataset has one record set. A folder inside it with records of its own is refused, naming it: this run would
    find its caches unrecorded, adopt them as they are, and never merge the edits made since that folder's last run."""
    inner = nested + [p for p in (folder, *folder.parents) if root in p.parents and (p / RECORDS_DIR).is_dir()]
    if not inner:
        return
    first, more = inner[0], f" (and {len(inner) - 1} more such folders)" if len(inner) > 1 else ""
    if (root / RECORDS_DIR).is_dir():  # two record sets already (an older version's, or copied in): no run can choose
        raise UsageError(f"{first} keeps records of its own ({first / RECORDS_DIR}){more}, and so does the dataset at "
                         f"{root} around it: each would misread the captions the other judged. Keep one: delete "
                         f"{first / RECORDS_DIR}, or move {first} out of {root}")
    raise UsageError(f"{first} keeps records of its own ({first / RECORDS_DIR}){more}, apart from the dataset at "
                     f"{root}: a run here would take its captions as they are and miss the edits made since its last "
                     f"run. Run on {first} itself, or, to make {root} one dataset, run on {first} once more and then "
                     f"delete {first / RECORDS_DIR}")


def forget_texts(item: Item) -> None:
    """An item this run leaves as it is needs no caption texts (the export reads the files): kept, they were 280
    bytes an image of a cached rerun with the bench's short captions."""
    item.manual = item.generated = None
    for merge in item.merges:
        merge.text = None


def decide(item: Item, cfg: Config, plan: Plan) -> None:
    """The one decision per item: what is redone and why, what is kept as a hand edit, what is adopted."""
    records, settings = plan.records, plan.settings
    try:
        item.stamp = image_stamp(item.image_file)
    except OSError as e:
        raise ItemError(f"cannot read: {e.strerror or e}") from e
    gen = inspect_cache(records, item.cache_file(KIND_GENERATED))
    item.merges = tuple(Merge(item, variant) for variant in settings.variants)
    remembered = plan.failing.get(records.key(item.image_file)) if plan.failing else None
    if remembered is not None and remembered.get("stamp") == input_stamp(item) and \
            (cfg.audit or remembered.get("settings") == settings.vision_id):
        plan.still[records.key(item.image_file)] = remembered
        raise ItemError(f"still failing since {remembered.get('since')}: {remembered.get('error')}")
    try:
        item.manual, item.manual_sha = read_caption(item.caption_file)
    except ItemError:
        if gen.sha is None and cfg.cache_generated:  # caption the image now; merge once the caption is fixed
            item.vision = REASON_MISSING
        raise
    item.generated, item.generated_sha = gen.text, gen.sha
    if gen.sha is not None:
        if cfg.overwrite in ("generated", "all"):
            item.vision = REASON_OVERWRITE
        elif cfg.refresh == "none":
            pass
        elif gen.status == EDITED:
            keep_hand_edit(item, KIND_GENERATED, gen.record)
        elif gen.status == UNRECORDED:
            adopt(plan, item, KIND_GENERATED, Record(gen.sha, settings.vision_id, image=item.stamp))
        else:
            if gen.record.image != item.stamp:
                item.vision = REASON_IMAGE
            elif cfg.refresh == "settings" and gen.record.settings != settings.vision_id:
                item.vision = REASON_SETTINGS
            change = settings_change(records, gen.record.settings, settings.vision_id, settings.vision)
            if item.vision is None and change:
                plan.differ[(KIND_GENERATED, f"were made with {change}")] += 1
    if item.vision:
        item.generated = None  # it is being made again: nothing downstream may use the old text
    for merge in item.merges:
        decide_merge(merge, cfg, plan)
    if item.generated is None and not item.vision and any(m.reason and m.unless is None for m in item.merges):
        if gen.error:  # a hand-edited vision caption that cannot be read: never replaced, so no merge either
            raise ItemError(f"{gen.error}; re-save it as UTF-8 (or delete it to caption the image again)")
        item.vision = REASON_MISSING  # a merge needs a vision caption that is not there


def keep_hand_edit(item: Item, kind: str, record: Record | None) -> None:
    item.kept += (kind,)
    if older_than_inputs(item, record, item.cache_file(kind), manual=kind != KIND_GENERATED):
        item.outdated += (kind,)


def older_than_inputs(item: Item, record: Record | None, edit: str, manual: bool) -> bool:
    """Nothing redoes a person's file, so the run says when an input of what it was made from (the image, and with
    `manual` the manual caption) changed after their edit. `record`: what our file there was made from."""
    if record is None or record.image is None:  # a record that knows no inputs (a page save of a new file)
        return False
    inputs = [item.image_file] if record.image != item.stamp else []
    if manual and record.manual != item.manual_sha:
        inputs.append(item.caption_file)
    return any(changed_after(path, edit) for path in inputs)


def changed_after(path: str, edit: str) -> bool:
    """Whether `path` changed after the file `edit` was last written; a deleted one counts as changed."""
    try:
        return os.stat(path).st_mtime_ns > os.stat(edit).st_mtime_ns
    except FileNotFoundError:
        return True
    except OSError:
        return False


def decide_merge(merge: Merge, cfg: Config, plan: Plan) -> None:
    item, settings = merge.item, plan.settings
    found = inspect_cache(plan.records, item.cache_file(merge.variant.kind))
    merge.text, merge.sha, merge.record = found.text, found.sha, found.record
    if found.sha is None:
        merge.reason = REASON_MISSING
    elif cfg.overwrite in ("combined", "all"):
        merge.reason = REASON_OVERWRITE
    elif cfg.refresh == "none":
        pass
    elif found.status == EDITED:
        keep_hand_edit(item, merge.variant.kind, found.record)
    else:
        if found.status == UNRECORDED:  # adopted as it is now; a vision caption made again may change it
            merge.record = adopt(plan, item, merge.variant.kind, Record(
                found.sha, settings.merge_ids[merge.variant.name], image=item.stamp, manual=item.manual_sha,
                generated=item.generated_sha))
        stale_merge(merge, cfg, plan)
        stale_check(merge, cfg, settings)


def stale_merge(merge: Merge, cfg: Config, plan: Plan) -> None:
    """Why a merge made by this script is out of date, if it is. One whose vision caption is made again is redone
    only if that caption changes; one that stands may be re-finished, or counted as made with other settings."""
    item, settings, name, record = merge.item, plan.settings, merge.variant.name, merge.record
    item.stamp = recorded_string(item.stamp, record.image)
    item.manual_sha = recorded_string(item.manual_sha, record.manual)
    # a record without `finish` is older than the split: its settings held the finishing ones too
    current = settings.merges[name] if record.finish else settings.merges[name] | settings.finish
    change = settings_change(plan.records, record.settings, settings.merge_ids[name], current)
    if record.manual != item.manual_sha:
        merge.reason = REASON_MANUAL
    elif item.vision is None and item.generated_sha is not None and record.generated != item.generated_sha:
        merge.reason = REASON_GENERATED
    elif cfg.refresh == "settings" and change:
        merge.reason = REASON_SETTINGS
    elif item.vision is not None:
        merge.reason, merge.unless = item.vision, record.generated
    elif item.generated_sha is None and record.image != item.stamp:  # vision caption deleted, image replaced
        item.vision = REASON_IMAGE
        merge.reason, merge.unless = REASON_IMAGE, record.generated
    if merge.reason is not None:
        return
    if change:
        plan.differ[(merge.variant.kind, f"were made with {change}")] += 1
    if record.finish and record.finish != settings.finish_id and merge.text is not None:
        refinish_merge(merge, cfg, plan)


def decide_trainer(item: Item, cfg: Config, plan: Plan) -> None:
    """--write_captions: the trainer's file is a copy that follows the combined caption. One this script did not write,
    or edited since, is a person's: kept, unless it is the combined caption's very bytes or --overwrite all."""
    path, combined = item.beside(cfg.write_captions), item.merges[0]
    found = inspect_cache(plan.records, path)
    ours = found.status == OURS
    kept = found.sha is not None and not ours and found.sha != combined.sha and cfg.overwrite != "all"
    item.trainer = TrainerFile(found.sha, found.record.combined if ours else None, kept)
    if kept and older_than_inputs(item, found.record, path, manual=True):
        item.outdated += (KIND_TRAINER,)


def trainer_path(item: Item, cfg: Config) -> Path:
    """{stem}EXT (--write_captions)."""
    return Path(item.beside(cfg.write_captions))


TRAINER_SETTINGS = settings_id(KIND_TRAINER, {"copy_of": KIND_COMBINED})


def copy_for_trainer(cfg: Config, records: Records, merge: Merge, stats: Stats, sha: str | None = None) -> None:
    """--write_captions: the combined caption on disk copied to the trainer's file after a last look, unless the copy
    is current or a person's. Once per image: at the start of the run, or once its merge is over (made, failed, or
    waiting for a failed vision caption). `sha`: the combined caption's hash if known (a current copy costs no read)."""
    item, trainer = merge.item, merge.item.trainer
    if trainer is None or trainer.kept or merge.variant.name:
        return
    if sha is not None and sha == trainer.copies:
        stats.count(KIND_TRAINER, "current")
        return
    try:
        text, sha = read_caption(item.combined_path)
        if text is None:
            return
        made = records.latest.get(records.key(item.combined_path))
        inputs = {"image": made.image, "manual": made.manual} if made is not None and made.sha == sha else {}
        record = Record("", TRAINER_SETTINGS, combined=sha, adopted=trainer.copies is None and trainer.seen is not None,
                        **inputs)  # what the caption it copies was made from, if on record as it is
        if sha == trainer.copies:
            stats.count(KIND_TRAINER, "current")
        elif write_cache(records, trainer_path(item, cfg), text, record, None, trainer.seen):
            stats.count(KIND_TRAINER, "written")
        else:
            stats.count(KIND_TRAINER, "edited")  # a person's file, written during the run: theirs stays
    except ItemError as e:
        stats.fail(item.image, STAGE_LLM, str(e))


def recorded_string(value: str | None, recorded: str | None) -> str | None:
    """The record's string where the two are equal: the item and its records then hold one string, not two, for the
    image's stamp and the manual caption's hash (136 bytes an image of a cached rerun)."""
    return recorded if value == recorded else value


def finish_reply(reply: str, kept: Sequence[str], cfg: Config, count: Callable[[str], int] | None = None) -> str:
    """The LLM's cleaned reply as the file has it: kept parts first, the fixed text, with `count` cut to the budget."""
    return training_caption(keep_tokens_first(reply, kept), kept, cfg, count)


def refinish_merge(merge: Merge, cfg: Config, plan: Plan) -> None:
    """This run's --keep_tokens, --prefix, --suffix applied to the reply as recorded. One over a new
    --max_caption_tokens needs the LLM to shorten it: counted, or with --refresh settings redone."""
    settings, record = plan.settings, merge.record
    reply = record.reply if record.reply is not None else merge.text
    text = finish_reply(reply, keep_token_parts(merge.item.manual, cfg.keep_tokens), cfg)
    if plan.count is not None and cfg.max_caption_tokens and budget_problem(text, cfg.max_caption_tokens, plan.count):
        if cfg.refresh == "settings":
            merge.reason = REASON_SETTINGS
        else:
            plan.differ[(merge.variant.kind, f"are over the new --max_caption_tokens {cfg.max_caption_tokens}")] += 1
        return
    change = settings_change(plan.records, record.finish, settings.finish_id, settings.finish) or "other settings"
    plan.refinish.append(Refinish(merge, reply, text, change))


FAILURES_FILE = "failures.jsonl"  # in RECORDS_DIR: the bad inputs, each until its file changes


def input_stamp(item: Item) -> str:
    """What a remembered bad input is waiting for to change: the image or its caption. (Or the vision settings,
    recorded beside it: another model's processor may take an image this one refused.)"""
    try:
        caption = image_stamp(item.caption_path)
    except OSError:
        caption = "-"
    return f"{item.stamp}|{caption}"


def read_failing(records: Records) -> dict[str, dict]:
    """The bad inputs of earlier runs, by image key."""
    failing = {}
    with contextlib.suppress(OSError), open(records.folder / FAILURES_FILE, encoding="utf-8",
                                            errors="surrogateescape") as handle:
        for line in handle:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                failing[row["failing"]] = row
    return failing


def remember_failing(plan: Plan, stats: Stats, folder: Path) -> None:
    """Keep the bad inputs for the next run (main process, at the end): those still failing as they were, and this
    run's new ones with the time they first failed. Those outside the folder of this run stay as they were."""
    records, now = plan.records, time.strftime("%Y-%m-%d %H:%M")
    inside = records.key(folder) + "/" if folder != records.root else ""
    rows = {key: row for key, row in plan.failing.items() if not key.startswith(inside)} | plan.still
    bad, errors = set(stats.bad) | set(plan.bad), {f.path: f.error for f in stats.failures}
    for item in plan.items:
        key = records.key(item.image_file)
        if item.image_file in bad and key not in rows and item.stamp is not None:
            rows[key] = {"failing": key, "stamp": input_stamp(item), "settings": plan.settings.vision_id,
                         "since": now, "error": errors.get(item.image_file, "failed")}
    path = records.folder / FAILURES_FILE
    if rows:
        records.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "\n".join(json_line(rows[k]) for k in sorted(rows)))
    else:
        path.unlink(missing_ok=True)


def stale_check(merge: Merge, cfg: Config, settings: Settings) -> None:
    """--verify: a current caption never checked, or (--refresh settings) checked with another --verify_prompt, is
    checked now without merging it again: a check-only job. Not without its vision caption (deleted, or never
    cached): the check needs both sources, and making one again would load the vision model for it."""
    record = merge.record
    if merge.reason or not settings.check_id or merge.text is None or merge.item.generated is None or \
            record.check == settings.check_id:
        return
    if record.check is None:
        merge.reason = REASON_UNCHECKED
    elif cfg.refresh == "settings":
        merge.reason = REASON_SETTINGS
    else:
        return
    merge.check_only = True


def adopt(plan: Plan, item: Item, kind: str, record: Record) -> Record:
    """A cache without a record (an earlier version, another tool) is taken as it is, and recorded as it is now."""
    record = dataclasses.replace(record, adopted=True)
    plan.adopt.append((item.cache_path(kind), record))
    item.adopted += (kind,)
    return record


def plan_rows(plan: Plan, folder: Path) -> tuple[Path, list[Item]]:
    """The plan as the main process sends it to the others: where the records are, and each item with work, in
    order, with the merges it makes, but no cached text they do not need. Paths are relative to the dataset folder."""
    rows = []
    for item in plan.items:
        merges = [m for m in item.merges if m.reason]
        if item.vision or merges:
            row = dataclasses.replace(item, image_file=str(item.image.relative_to(folder)))
            row.merges = tuple(dataclasses.replace(m, item=row, text=m.text if m.check_only else None) for m in merges)
            rows.append(row)
    return plan.records.root, rows


def plan_from_rows(cfg: Config, root: Path, rows: list[Item]) -> Plan:
    """The main process's plan, in another process: the same items in the same order, so that a chunk number
    names the same work everywhere. This process walks no folder and reads no records."""
    plan = Plan(rows, [], [], [], records=Records(root), settings=run_settings(cfg))
    for item in rows:
        item.image_file = str(cfg.dataset_dir / item.image_file)
        plan.to_generate += [item] if item.vision else []
        plan.to_combine += item.merges
    return plan


class SharedWork:
    """How the processes of one run share its work, through torch.distributed's key-value store. Every process has
    the main process's plan, so a chunk number names the same items everywhere; each stage hands out chunk numbers
    from its own counter, so a process that drew slow work takes fewer, and one that dies leaves only its claimed
    chunks undone. At the end the main process waits for each one's Stats while its heartbeat goes on: a collective
    there would time out (NCCL's default is 10 minutes) when one process finishes long after the others. The keys
    carry the run's id: a rerun in the same store never sees old counts. One process has no store."""

    def __init__(self, store=None, run_id: str = "", rank: int = 0, processes: int = 1):
        self.store, self.run_id, self.rank, self.processes = store, run_id, rank, processes

    @classmethod
    def of(cls, state, run_id: str) -> SharedWork:
        if state.num_processes == 1:
            return cls()
        from torch.distributed.distributed_c10d import _get_default_store

        work = cls(_get_default_store(), run_id, state.process_index, state.num_processes)
        threading.Thread(target=work.beat, name="heartbeat", daemon=True).start()
        return work

    def beat(self) -> None:
        """Say that this process is alive, every few seconds, until it exits (or the store is gone)."""
        with contextlib.suppress(Exception):  # the main process has exited and its store with it: nobody listens
            while True:
                self.store.add(self.key(f"alive/{self.rank}"), 1)
                time.sleep(scaled_wait(HEARTBEAT_SECONDS))

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
        for rank in range(1, self.processes):
            key = self.key(f"stats/{rank}")
            if self.wait(key, rank, lambda: waiting(f"waiting for process {rank + 1} of {self.processes} to finish "
                                                     "its work")):
                stats.merge(pickle.loads(self.store.get(key)))
            elif not stats.gave_up:
                stats.gave_up = (f"process {rank + 1} of {self.processes} stopped (no heartbeat for "
                                 f"{scaled_wait(HEARTBEAT_LOST):.0f} s): the work it had claimed and not reported "
                                 "is left for the next run")
        return stats

    def finished(self) -> None:
        """The main process says the run is over; the others wait for that (while it is alive) before they exit:
        the launcher stops every process once one exits with an error, the main one too, mid-summary."""
        if self.store is None:
            return
        if self.rank == 0:
            self.store.set(self.key("finished"), b"1")
        else:
            self.wait(self.key("finished"), 0, lambda: None)

    def wait(self, key: str, rank: int, waiting: Callable[[], None]) -> bool:
        """Wait for a key while process `rank` is alive; False once its heartbeat has stopped for HEARTBEAT_LOST.
        A check a second, not the store's wait: torch logs two warning lines for every wait that runs out."""
        beat, seen, heard = self.key(f"alive/{rank}"), None, time.monotonic()
        if not self.store.check([key]):
            waiting()
        while not self.store.check([key]):
            count, now = self.store.add(beat, 0), time.monotonic()
            if count != seen:
                seen, heard = count, now
            elif now - heard > scaled_wait(HEARTBEAT_LOST):
                return False
            time.sleep(min(1.0, scaled_wait(HEARTBEAT_SECONDS)))
        return True


# --------------------------------------------------------------------------------------------
# run(): orchestration for one process
# --------------------------------------------------------------------------------------------


def make_chat(cfg: Config, state):
    """The LLM client factory: the endpoint (or a pool of them), or a local LLM."""
    if cfg.local_llm:
        quiet_transformers(cfg.verbosity)
        return LocalChat(cfg.local_llm, state.device, resolve_dtype(cfg.dtype, state.device), cfg.batch_size,
                         cfg.max_tokens, cfg.temperature, cfg.revision, cfg.trust_remote_code)
    return endpoint_chat(cfg, state, STAGE_LLM, [(url, cfg.api_key) for url in cfg.base_url or (None,)], cfg.model,
                         cfg.rpm, cfg.tpm, cfg.max_tokens, cfg.temperature)


def endpoint_chat(cfg: Config, state, stage: str, endpoints: Sequence[tuple[str | None, str | None]],
                  model: str | None, rpm: int, tpm: int, max_tokens: int, temperature: float):
    """The one place that builds endpoint clients: each (url, key) gets its own limiter with this process's share of
    --rpm/--tpm, which so hold per endpoint; one endpoint is a pool of one. With several processes a 429's pause
    reaches all of them through a file, one per endpoint (named with a short hash of its URL in a pool)."""
    chats = []
    for url, key in endpoints:
        name = stage if len(endpoints) == 1 else f"{stage}-{digest(url.encode('utf-8'))[:8]}"
        shared = SharedPause(cfg.dataset_dir / PAUSE_NAME.format(stage=name)) if state.num_processes > 1 else None
        limiter = RateLimiter(requests=process_share(rpm, state.process_index, state.num_processes),
                              tokens=process_share(tpm, state.process_index, state.num_processes), shared=shared)
        chats.append(EndpointChat(url, key, model, limiter, cfg.timeout, max_tokens, temperature, stage=stage))
    return EndpointPool(chats, give_up_after=cfg.give_up_after)


def make_vision_chat(cfg: Config, state) -> EndpointPool:
    return endpoint_chat(cfg, state, STAGE_VISION, list(zip(cfg.vlm_base_url, cfg.vlm_api_keys)), cfg.vlm_model,
                         cfg.vlm_rpm, 0, cfg.max_new_tokens, 0.0)


def run(cfg: Config, plan: Plan, state, reporter: Reporter, stop: StopEvent, *,
        count_tokens: Callable[[str], int] | None = None, work: SharedWork | None = None) -> Stats:
    """This process's part of the plan, in stages that hand on one way: caption, then merge. The merges of the images
    it captions follow them; the other merges are claimed by their own counter. Returns its Stats for finish()."""
    stats, work = Stats(), work or SharedWork()
    if not plan.to_generate and not plan.to_combine:
        return stats
    llm_only = [m for m in plan.to_combine if not m.item.vision]
    events = EventLoopThread(stop)
    merger = Merger(cfg, plan, stats, reporter, events.stopping, count_tokens)
    merges = AsyncStage(events.loop, STAGE_LLM, cfg.concurrency, merger, stats,
                        reporter.progress("llm", len(plan.to_combine) if work.store is None else None), stop,
                        work.items(STAGE_LLM, llm_only, min(REQUEST_CHUNK, cfg.concurrency)))
    try:
        if plan.to_combine and cfg.overlap and not cfg.local_llm:  # a local LLM waits for the GPU to be free
            merger.start(state, merges)
        if plan.to_generate:
            caption(cfg, plan, state, events, stats, reporter, stop, work, merges)
        if plan.to_combine and merges.done is None and not stop.is_set():
            merger.start(state, merges)
        if merges.done is not None:
            merges.close()
            wait_future(merges.done, lambda: reporter.stopping(stop))
        merges.progress.close()
    except BaseException:
        stop.set()  # a stage failed as a whole: let the other one wind down before the loop closes
        raise
    finally:
        if merger.chat is not None:
            with contextlib.suppress(Exception):
                events.run(merger.chat.close(), timeout=10)
        events.close()
    return stats


def caption(cfg: Config, plan: Plan, state, events: EventLoopThread, stats: Stats, reporter: Reporter,
            stop: StopEvent, work: SharedWork, merges: AsyncStage) -> None:
    """The vision stage: this process's chunks of plan.to_generate, through a served model or a local one. Each
    image's merges go on to `merges` with its new caption, or, where it failed, wait for the next run."""
    items = plan.to_generate
    progress = reporter.progress("vision", len(items) if work.store is None else None)
    if cfg.vlm_base_url:
        progress.begin()
        caption_served(cfg, state, events, work.items(STAGE_VISION, items, min(REQUEST_CHUNK, cfg.concurrency)),
                       stats, progress, stop, NewCaptions(cfg, plan, merges, reporter), lambda: reporter.stopping(stop))
    else:
        reporter.info(f"loading {cfg.model_id} …")
        captioner = load_captioner(cfg, state.device)
        progress.begin()
        keep = NewCaptions(cfg, plan, merges, reporter, getattr(captioner.model.config, "_commit_hash", None))
        caption_locally(items, captioner, cfg, stats, progress, reporter, stop, keep,
                        work.chunks(STAGE_VISION, len(items), cfg.batch_size))
        del captioner
        release_memory()
    progress.close()
    failed = {f.path for f in stats.failures if f.stage == STAGE_VISION}
    for job in (m for item in items if str(item.image) in failed for m in item.merges if m.reason):
        stats.count(job.variant.kind, "waiting")  # counted, so that the summary adds up
        merges.progress.update()
        copy_for_trainer(cfg, plan.records, job, stats)  # --write_captions: the copy follows the caption as it is


class NewCaptions:
    """Where a new vision caption goes (on the thread that saves it): its cache, after a last look, then its merges
    to the merge stage, which decides on its own thread whether each is still wanted (Merge.wanted)."""

    def __init__(self, cfg: Config, plan: Plan, merges: AsyncStage, reporter: Reporter, commit: str | None = None):
        self.cfg, self.records, self.settings, self.merges = cfg, plan.records, plan.settings, merges
        self.reporter, self.commit = reporter, commit  # the local vision model's resolved revision

    def __call__(self, item: Item, text: str) -> str:
        if self.cfg.verbosity >= 2:  # the old caption is still on disk: what changed, in its first words
            self.reporter.detail(f"captioned {item.image} ({item.vision}): "
                                 f"{first_words(read_cache(item.generated_path))} → {first_words(text)}")
        seen, item.generated, item.generated_sha = item.generated_sha, text, digest(cache_bytes(text))
        what = "done"
        if self.cfg.cache_generated:
            record = Record("", self.settings.vision_id, image=item.stamp, commit=self.commit)
            if not write_cache(self.records, item.generated_path, text, record, self.settings.vision, seen):
                what = "edited"  # a person's vision caption, written during the run: the merges are made from it
                with contextlib.suppress(ItemError):
                    mine, sha = read_caption(item.generated_path)
                    if mine:
                        item.generated, item.generated_sha = mine, sha
        for job in item.merges:
            if job.reason:
                self.merges.submit(job)
        return what


class Merger:
    """The merge stage's work on one merged caption: ask the LLM, add the fixed text, write the cache after a last
    look. Returns what to count: done, unchanged, or edited (a person's file, written during the run, is kept)."""

    def __init__(self, cfg: Config, plan: Plan, stats: Stats, reporter: Reporter, stopping: asyncio.Event,
                 count_tokens: Callable[[str], int] | None):
        self.cfg, self.records, self.settings, self.stats = cfg, plan.records, plan.settings, stats
        self.reporter, self.stopping, self.count_tokens = reporter, stopping, count_tokens
        self.chat = None  # made when the stage starts

    def start(self, state, stage: AsyncStage) -> None:
        if self.cfg.local_llm:
            self.reporter.info(f"loading {self.cfg.local_llm} …")
        self.chat = make_chat(self.cfg, state)
        stage.progress.begin()
        stage.start()

    async def __call__(self, job: Merge) -> str:
        """Counted per kind of output as well as for the stage, so the summary can say what each kind got."""
        try:
            what = await self.merge(job)
        except (Stopped, FatalEndpointError, GaveUp):
            self.stats.count(job.variant.kind, "left")
            raise
        except Exception:
            self.stats.count(job.variant.kind, "failed")
            await self.copy_for_trainer(job)  # the copy follows the combined caption as it still is
            raise
        self.stats.count(job.variant.kind, what)
        await self.copy_for_trainer(job)
        return what

    async def copy_for_trainer(self, job: Merge) -> None:
        if job.item.trainer is not None:  # --write_captions: on a thread, as every write of the stage
            await asyncio.to_thread(copy_for_trainer, self.cfg, self.records, job, self.stats)

    async def merge(self, job: Merge) -> str:
        if not job.wanted():  # the vision caption came out as before: the merge made from it now stands for the image
            self.records.write(job.path, dataclasses.replace(job.record, image=job.item.stamp))
            return "unchanged"
        cfg, item = self.cfg, job.item
        kept = keep_token_parts(item.manual, cfg.keep_tokens)
        messages = llm_messages(item, job.variant.system_prompt, item.manual)
        reply, text = (None, job.text) if job.check_only else await self.ask(job, messages, kept)
        found = None
        if self.settings.check_id:
            try:
                reply, text, found = await self.checked(job, messages, kept, reply, text)
            except Stopped:  # stopping before the check was made: the merge is kept, for the next run to check
                if reply is not None and cfg.verify != "strict":
                    await self.write(job, reply, text)
                raise
        if reply is None:  # a check-only job that kept its caption: only its record changes
            if found is not None:
                checked_as = {"check": self.settings.check_id, "findings": found.recorded()}
                await asyncio.to_thread(self.records.write, job.path, dataclasses.replace(job.record, **checked_as),
                                        None, None, self.settings.check)
            self.reporter.detail(f"checked {job.path}")
            return "checked"
        return await self.write(job, reply, text, found)

    async def ask(self, job: Merge, messages: list[dict], kept: Sequence[str]) -> tuple[str, str]:
        """One merge: the LLM's reply as cleaned (recorded, so that the finishing settings can change later), and the
        caption the trainer will see: the kept parts first, the prefix and suffix, within the budget."""
        cfg, item, count = self.cfg, job.item, self.count_tokens
        too_long = count and (lambda t: budget_problem(finish_reply(t, kept, cfg), cfg.max_caption_tokens, count))
        try:
            reply = await self.spending("merge", complete_item(self.chat, messages, cfg.max_retries, item.manual,
                                                               stopping=self.stopping, too_long=too_long))
            return reply, finish_reply(reply, kept, cfg)
        except OverBudget as e:  # cut at a sentence or comma boundary, the fixed and kept parts intact
            text = finish_reply(e.text, kept, cfg, count)
            self.stats.note(item.image, STAGE_LLM, f"{job.path.name}: {e.problem}; cut to {count(text)} tokens")
            return e.text, text

    async def spending(self, purpose: str, awaitable):
        """Await a merge's or a check's requests, counting what they cost (requests, tokens) under `purpose`."""
        spent = collections.Counter()
        token = SPENDING.set(spent)
        try:
            return await awaitable
        finally:
            SPENDING.reset(token)
            for what, n in spent.items():
                self.stats.tally("spent", f"{purpose} {what}", n)

    async def check(self, job: Merge, text: str) -> Check | None:
        """--verify's check of one caption; None when it failed (which is never a pass)."""
        cfg = self.cfg
        fixed = [t for t in (cfg.prefix, cfg.suffix) if t]
        request = check_messages(cfg.verify_prompt, job.item.manual, job.item.generated or "", text, fixed)
        try:
            found = await self.spending("check", check_caption(self.chat, request, cfg.max_retries,
                                                               stopping=self.stopping))
        except ItemError as e:
            self.stats.tally("checks", "failed")
            if cfg.verify == "strict":
                raise ItemError(f"{job.path.name}: its check failed ({e}); not written (--verify strict)") from e
            self.stats.fail(job.path, STAGE_VERIFY, f"check failed: {e}")
            return None
        for key in CHECK_KEYS:
            for finding in getattr(found, key):
                self.reporter.detail(f"check {job.path}: {key} {json.dumps(finding, ensure_ascii=False)}")
        return found

    async def checked(self, job: Merge, messages: list[dict], kept: Sequence[str], reply: str | None,
                      text: str) -> tuple[str | None, str, Check | None]:
        """--verify: the caption checked; one with findings is merged again once, with the findings, and checked again.
        Returns the reply (None: the caption as it was) and caption to keep, and the last check (None: it failed)."""
        stats = self.stats
        stats.tally("checks", "checked")
        found, again = await self.check(job, text), False
        if found is not None and not found.clean:
            (reply, text), again = await self.ask(job, with_findings(messages, found), kept), True
            found = await self.check(job, text)
        if found is not None and found.clean:  # (a failed check, None, is counted and reported by check())
            stats.tally("checks", "fixed" if again else "clean")
        elif found is not None:
            stats.tally("checks", "flagged")
            if self.cfg.verify == "strict":
                raise ItemError(f"{job.path.name}: {'; '.join(found.lines())} (--verify strict: not written)")
            stats.flag(Flagged(str(job.path), STAGE_VERIFY, found.unsupported, found.contradictions, found.missing))
        return reply, text, found

    async def write(self, job: Merge, reply: str, text: str, found: Check | None = None) -> str:
        """A merged caption written, after a last look, with its record (and its check's, when it had one)."""
        item, name, settings = job.item, job.variant.name, self.settings
        checked_as = {"check": settings.check_id, "findings": found.recorded()} if found else {}
        record = Record("", settings.merge_ids[name], image=item.stamp, manual=item.manual_sha,
                        generated=item.generated_sha, finish=settings.finish_id,
                        reply=reply if reply.strip() != text.strip() else None, **checked_as)
        # on a thread: an fsync must not stall the loop
        if not await asyncio.to_thread(write_cache, self.records, job.path, text, record, settings.merges[name],
                                       job.sha, settings.finish, settings.check):
            return "edited"
        self.reporter.detail(f"merged {job.path} ({job.reason}): {first_words(job.text)} → {first_words(text)}")
        job.text = text
        return "done"


def caption_served(cfg: Config, state, events: EventLoopThread, items: Iterable[Item], stats: Stats,
                   progress: Progress, stop: threading.Event, keep: Callable[[Item, str], str | None],
                   every_slice: Callable[[], None] = lambda: None) -> None:
    """The vision stage through an OpenAI-compatible vision endpoint: no torch model is loaded."""
    chat = make_vision_chat(cfg, state)

    async def describe(item: Item) -> str | None:
        url = await asyncio.to_thread(own_bytes_url, item.image, cfg.vlm_max_side)
        if url is None:
            url = await events.loop.run_in_executor(converters, image_data_url, item.image, cfg.vlm_max_side)
        messages = vision_messages(url, cfg, cfg.prompt or DEFAULT_CHAT_PROMPT)
        text = await complete_item(chat, messages, cfg.max_retries, stopping=events.stopping, on_cut=lambda: stats.note(
            item.image, STAGE_VISION, f"{item.generated_path.name}: cut at --max_new_tokens {cfg.max_new_tokens}"))
        return await asyncio.to_thread(keep, item, text)

    # Most images go as they are; the rest are converted here, a thread per core: PIL lets go of the GIL while
    # it decodes, resizes and encodes, so threads use every core without a process pool's start-up and pickling.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="vlm-convert") as converters:
        stage = AsyncStage(events.loop, STAGE_VISION, cfg.concurrency, describe, stats, progress, stop, items).start()
        stage.close()
        wait_future(stage.done, every_slice)
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
            fd, tmp = create_temporary(self.path)  # caches are written beside the images: find out now, not per image
            os.close(fd)
            os.unlink(tmp)
            handle = open(self.path, "a+", encoding="utf-8")
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
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.file = handle
        return None

    def release(self) -> None:
        if self.file is not None:
            self.file.truncate(0)
            self.file.close()  # and with it the flock
            self.file = None


@contextlib.contextmanager
def stop_on_signals(stop: StopEvent):
    """Ctrl-C or SIGTERM: finish the work in flight, save it, report. A second signal aborts at once. The handler
    only records the stop; the main thread says so (Reporter.stopping)."""
    def handle(signum, frame):
        if stop.signal:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        stop.signal = signum
        stop.set()

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
        # A torchvision built for another torch fails deep inside an image processor, after planning, in a long
        # traceback; importing it now (a second) names the fix instead. A missing one is the processor's to report.
        try:
            import torchvision  # noqa: F401
        except ModuleNotFoundError:
            pass
        except Exception as e:  # RuntimeError "operator torchvision::nms does not exist", or an undefined symbol
            import torch

            raise UsageError(f"torchvision does not match torch {torch.__version__} ({first_line(e)}); install the "
                             "pair built together: pip install --upgrade torch torchvision") from e
        check_model_source(cfg.model_id, "--model_id", cfg.revision)
    if plan.to_combine and cfg.local_llm:  # its config found (cache, path or Hub) before the vision stage's hour
        from transformers import AutoConfig

        check_model_source(cfg.local_llm, "--local_llm", cfg.revision)
        quiet_transformers(cfg.verbosity)
        try:
            AutoConfig.from_pretrained(cfg.local_llm, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise FatalEndpointError(f"cannot load --local_llm {cfg.local_llm}: {first_line(e)}") from e

    async def checked(chat) -> str | None:
        try:
            return await chat.check()
        finally:
            await chat.close()

    model = asyncio.run(checked(make_chat(cfg, state))) if plan.to_combine and not cfg.local_llm else cfg.model
    if plan.to_generate and cfg.vlm_base_url:
        asyncio.run(checked(make_vision_chat(cfg, state)))
    return dataclasses.replace(cfg, model=model, model_from_list=True) if model != cfg.model else cfg


def refinish(plan: Plan, stats: Stats, reporter: Reporter) -> None:
    """Write the merged captions that get this run's --keep_tokens, --prefix, --suffix (or budget) from their recorded
    reply (main process, once the lock is ours): no request, the record keeps the reply and the request's settings."""
    for job in plan.refinish:
        merge = job.merge
        record = dataclasses.replace(merge.record, finish=plan.settings.finish_id,
                                     reply=job.reply if job.reply.strip() != job.text.strip() else None)
        try:
            if not write_cache(plan.records, merge.path, job.text, record, None, merge.sha, plan.settings.finish):
                stats.count(STAGE_LLM, "edited")  # a person's file, written since planning: theirs stays
                continue
        except ItemError as e:
            stats.fail(merge.image, STAGE_LLM, str(e))
            continue
        stats.count(merge.variant.kind, "refinished")
        reporter.detail(f"re-finished {merge.path} ({job.change}): {first_words(merge.text)} → {first_words(job.text)}")
        merge.text, merge.sha = job.text, digest(cache_bytes(job.text))


def copy_for_trainers(cfg: Config, plan: Plan, stats: Stats) -> None:
    """--write_captions, at the start of a run (main process, after refinish()): the trainer files of the combined
    captions no merge of this run will make; the others are copied after their merge (Merger)."""
    stats.counts.setdefault(KIND_TRAINER, collections.Counter())
    for item in plan.items:
        if item.trainer is None:  # no decision: the item failed at planning
            continue
        if item.trainer.kept:
            stats.count(KIND_TRAINER, "kept")
        elif not item.merges[0].reason:
            copy_for_trainer(cfg, plan.records, item.merges[0], stats, item.merges[0].sha)


def backend_switch(cfg: Config, plan: Plan) -> str | None:
    """Why this run must not merge, if it must not: the local LLM came by default, only because this environment names
    no endpoint (cron runs without the shell's variables), while the combined captions on record were made by another
    backend or model. A change asked for by a flag or a variable goes ahead."""
    if not cfg.local_llm_by_default or not plan.to_combine:
        return None
    records = plan.records if plan.records.latest else Records(plan.records.root).load()  # --refresh none reads none
    made_with = (records.settings.get(record.settings) or {} for record in records.latest.values())
    makers = collections.Counter((used["backend"], used.get("model")) for used in made_with if "backend" in used)
    del makers["local", cfg.local_llm]
    if not makers:
        return None
    (backend, model), count = makers.most_common(1)[0]
    if backend == "endpoint":
        made, choose = f"endpoint model {model}", f"pass --base_url URL --model {model}"
    else:
        made, choose = f"local LLM {model}", f"pass --local_llm {model}"
    return (f"{count} combined captions under {cfg.dataset_dir} were made by {made}; this environment names no "
            f"endpoint (no --base_url, OPENAI_BASE_URL or OPENAI_API_KEY, no .env), so the default local LLM "
            f"{cfg.local_llm} would merge: {choose}, or --local_llm MODEL to switch on purpose")


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


def breakdown(counter) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(counter.items())) or "none"


def output_label(kind: str) -> str:
    """A kind of cache in words: vision captions, combined captions, NAME variant captions."""
    labels = {KIND_GENERATED: "vision captions", KIND_COMBINED: "combined captions"}
    return labels.get(kind) or f"{kind.removeprefix(KIND_COMBINED + '_')} variant captions"


OUTDATED = ", older than a change to its manual caption or image"  # a hand edit nothing redoes (keep_hand_edit)


def kept_lines(plan: Plan) -> list[str]:
    kept = collections.Counter(k for i in plan.items for k in i.kept)
    outdated = collections.Counter(k for i in plan.items for k in i.outdated)
    adopted = collections.Counter(k for i in plan.items for k in i.adopted)
    return [f"  edited by hand (kept): {kept.total()} ({breakdown(kept)})",
            *([f"  hand edits older than a change to their manual caption or image: {outdated.total()} "
               f"({breakdown(outdated)}); kept: delete one to have it made again (-v names them)"] if outdated else []),
            f"  adopted: {adopted.total()} ({breakdown(adopted)})"]


def settings_lines(plan: Plan) -> list[str]:
    """The caches this run leaves as they are, though made with other settings: how many, how, and what redoes them."""
    return [f"  {n} {output_label(kind)} {how}; --refresh settings redoes them"
            for (kind, how), n in sorted(plan.differ.items())]


def plan_items(cfg: Config, plan: Plan) -> Iterable[str]:
    """What planning decided for each item that is not simply current (-v)."""
    for item in plan.items:
        if item.vision:
            yield f"    caption {item.image}: {item.vision}"
        for merge in item.merges:
            if merge.reason:
                verb, name = "check" if merge.check_only else "merge", merge.variant.name
                yield f"    {verb} {item.image}{f' ({name})' if name else ''}: {merge.reason}"
        for kind in item.kept:
            yield f"    kept {item.cache_path(kind)}: edited by hand{OUTDATED if kind in item.outdated else ''}"
        for kind in item.adopted:
            yield f"    adopted {item.cache_path(kind)}"
        if item.trainer is not None and item.trainer.kept:
            yield f"    kept {trainer_path(item, cfg)}: not written by this script, or edited since" + (
                OUTDATED if KIND_TRAINER in item.outdated else "")


def dry_run_report(cfg: Config, plan: Plan) -> list[str]:
    """What a run would do, counted by reason, without loading a model or calling anything."""
    from PIL import Image

    problems = list(plan.failures)
    for item in plan.to_generate:
        try:
            with Image.open(item.image) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    problems.append(Failure(str(item.image), STAGE_INPUT, f"image is {img.width}x{img.height} pixels"))
        except (OSError, SyntaxError, ValueError) as e:
            problems.append(Failure(str(item.image), STAGE_INPUT, f"not a readable image: {type(e).__name__}"))
    merges = [m for m in plan.to_combine if not m.check_only]
    prompt_tokens = sum(estimate_tokens(m.variant.system_prompt + build_user_message(m.item.manual, ""))
                        + (estimate_tokens(m.item.generated) if m.item.generated else cfg.max_new_tokens)
                        for m in merges)
    check_only = collections.Counter(m.reason for m in plan.to_combine if m.check_only)
    stale = collections.Counter(why for i in plan.items for why in {i.vision, *(m.reason for m in i.merges)}
                                if why)  # images, once per reason: not each of their caches
    conditional = sum(m.unless is not None for m in plan.to_combine)
    reasons = (REASON_MANUAL, REASON_IMAGE, REASON_GENERATED) + ((REASON_SETTINGS,) if stale[REASON_SETTINGS] else ())
    refinished = "; ".join(sorted({job.change for job in plan.refinish}))
    trainers = [(i.trainer, i.merges[0]) for i in plan.items if i.trainer is not None]
    behind = sum(not t.kept and bool(m.reason or m.sha is not None and m.sha != t.copies) for t, m in trainers)
    return [
        f"dry run: {len(plan.items)} images under {cfg.dataset_dir} (--refresh {cfg.refresh})",
        f"  {run_description(cfg)}",
        f"  vision captions to make: {len(plan.to_generate)} ({plan.cached_generated} cached)",
        f"  LLM calls to make: {len(merges)} ({plan.current.total()} cached)",
        *([f"  checks to make (--verify): {len(plan.to_combine)} ({len(plan.to_combine) - len(merges)} of them of "
           "captions made already); each caption with a finding adds a merge and a check"]
          if plan.settings.check_id else []),
        f"  to caption: {len(plan.to_generate)} ({breakdown(collections.Counter(i.vision for i in plan.to_generate))})",
        f"  to merge: {len(merges)} ({breakdown(collections.Counter(m.reason for m in merges))})"
        + (f", {conditional} of them only if the new vision caption differs" if conditional else ""),
        "  stale images: " + ", ".join(f"{stale[why]} {why}" for why in reasons),
        *([f"  to re-finish from the recorded reply, no request: {len(plan.refinish)} ({refinished})"]
          if plan.refinish else []),
        *kept_lines(plan),
        *([f"  trainer captions to write (--write_captions): {behind} "
           f"({sum(t.kept for t, _ in trainers)} edited by hand, kept)"] if cfg.write_captions else []),
        *settings_lines(plan),
        *([f"  to check without merging again: {check_only.total()} ({breakdown(check_only)})"] if check_only else []),
        *(plan_items(cfg, plan) if cfg.verbosity >= 2 else ()),
        f"  estimated LLM tokens: ~{prompt_tokens:,} in, up to {len(merges) * cfg.max_tokens:,} out",
        f"  problems: {len(problems)}",
        *(f"    {f.path}: {f.error}" for f in problems),
    ]


def summary_lines(plan: Plan, stats: Stats) -> list[str]:
    """The run's summary, one block: the totals per stage, what was made per kind of output, what was left and why,
    then each note and failure. No line repeats the plan; each count agrees with the progress of its stage."""
    lines = [f"{stage}: {c['done']} done, {c['cached']} from cache, {c['failed']} failed"
             for stage, c in stage_counts(plan, stats).items()]
    lines += done_lines(plan, stats) + verify_lines(stats) + kept_lines(plan)
    if edited := edited_during_run(stats):  # what the run left, and why
        lines.append(f"  edited during the run (kept): {edited}")
    if any(stats.left.values()):
        lines.append(f"  left for the next run: {stats.left[STAGE_VISION]} to caption, "
                     f"{stats.left[STAGE_LLM]} to merge")
    if plan.limited:
        lines.append(f"  left by --limit: {plan.limited} images, for the next run")
    lines += settings_lines(plan)
    if inputs := sum(f.stage == STAGE_INPUT for f in stats.failures):
        lines.append(f"  bad input: {inputs} (exit 1 until each file is fixed or removed)")
    lines += [f"NOTE {n.path} [{n.stage}]: {n.note}" for n in stats.notes]
    lines += [f"FAILED {f.path} [{f.stage}]: {f.error}" for f in stats.failures]
    if stats.fatal or stats.gave_up:
        lines.append(f"error: {stats.fatal or stats.gave_up}")
    return lines


def stage_counts(plan: Plan, stats: Stats) -> dict[str, dict[str, int]]:
    """Per stage: made, taken from cache (found current, or made again the same), failed."""
    cached = {STAGE_VISION: plan.cached_generated, STAGE_LLM: plan.current.total()}
    return {stage: {"done": stats.counts[stage]["done"], "cached": n + stats.counts[stage]["unchanged"],
                    "failed": stats.counts[stage]["failed"]} for stage, n in cached.items()}


SUMMARY_COUNTS = (("checked", "checked without merging again (--verify)"),
                  ("unchanged", "unchanged (the new vision caption came out the same)"),
                  ("waiting", "waiting for a vision caption that failed"),
                  ("refinished", "re-finished from the recorded reply, no request"),
                  ("failed", "failed"), ("left", "left for the next run"))


def done_lines(plan: Plan, stats: Stats) -> list[str]:
    """Per kind of output: how many were made and why, kept as they were, re-finished, failed, left."""
    planned = collections.defaultdict(collections.Counter)
    planned[KIND_GENERATED].update(i.vision for i in plan.to_generate)
    for m in plan.to_combine:
        if not m.check_only:
            planned[m.variant.kind][m.reason] += 1
    current = collections.Counter({KIND_GENERATED: plan.cached_generated, **plan.current})
    lines = []
    for kind in [KIND_GENERATED] + [v.kind for v in plan.settings.variants]:
        counts = stats.counts.get(STAGE_VISION if kind == KIND_GENERATED else kind, collections.Counter())
        reasons, planned_n = planned[kind], planned[kind].total()
        others = [f"{counts[what]} {words}" for what, words in SUMMARY_COUNTS if counts[what]]
        if not (counts["done"] or others or reasons):
            continue
        made = f"{counts['done']} made" + (f" of {planned_n}" if planned_n != counts["done"] else "") \
            + (f" ({breakdown(reasons)})" if reasons else "")
        if already := current[kind] - counts["refinished"]:
            others.append(f"{already} already current")
        lines.append(f"  {output_label(kind)}: " + ", ".join([made, *others]))
    if (c := stats.counts.get(KIND_TRAINER)) is not None:
        lines.append(f"  trainer captions: {c['written']} written, {c['current']} current, "
                     f"{c['kept']} edited by hand (kept)")
    return lines


def edited_during_run(stats: Stats) -> int:
    """Files a person changed or created while this run was about to replace them: theirs kept, the text dropped."""
    return sum(stats.counts.get(kind, {}).get("edited", 0) for kind in (STAGE_VISION, STAGE_LLM, KIND_TRAINER))


def verify_lines(stats: Stats) -> list[str]:
    """--verify in the summary: the checks by outcome, the requests and tokens of merging and checking, each flag."""
    checks, spent = stats.checks, stats.spent
    if not checks["checked"]:
        return []
    cost = f"  requests: {spent['merge requests']} merging, {spent['check requests']} checking"
    if spent["merge tokens"] or spent["check tokens"]:
        cost += f"; tokens: {spent['merge tokens']:,} merging, {spent['check tokens']:,} checking"
    return [f"verify: {checks['checked']} checked, {checks['clean']} clean, {checks['fixed']} fixed by a second "
            f"merge, {checks['flagged']} flagged, {checks['failed']} check failed", cost,
            *(f"FLAGGED {f.path}: {findings_text(dataclasses.asdict(f))}" for f in stats.flagged)]


def findings_text(findings: dict) -> str:
    """A check's findings on one line: 'unsupported: "a red scarf"; missing: "ohwx"'."""
    return "; ".join(f"{key}: " + ", ".join(json.dumps(s, ensure_ascii=False) for s in findings[key])
                     for key in CHECK_KEYS if findings.get(key))


def write_report(path: Path, failures: Iterable[Failure | Note | Flagged | Finding], summary: dict) -> None:
    """A JSON line per failure, note, flagged caption or audit finding, then the summary record: the last line carries
    the run's exit code, which `accelerate launch` does not pass on (it exits 1 for any failure)."""
    lines = [json_line(dataclasses.asdict(f)) for f in failures] + [json_line({"summary": summary})]
    atomic_write(path, "\n".join(lines))


def report_summary(plan: Plan, stats: Stats) -> dict:
    """The run in numbers, for the report's last line."""
    summary: dict[str, Any] = {"exit_code": stats.exit_code(), **stage_counts(plan, stats),
                               "edited_during_run": edited_during_run(stats),
                               "skipped": sum(f.stage == STAGE_INPUT for f in stats.failures),
                               "failed": len(stats.failures), "notes": len(stats.notes),
                               "left": {stage: stats.left.get(stage, 0) for stage in (STAGE_VISION, STAGE_LLM)}}
    if stats.checks["checked"]:
        summary["verify"] = {what: stats.checks[what] for what in ("checked", "clean", "fixed", "flagged", "failed")}
        summary["verify"] |= {what: {purpose: stats.spent[f"{purpose} {what}"] for purpose in ("merge", "check")}
                              for what in ("requests", "tokens")}
    summary["signal"] = signal.Signals(stats.signal).name if stats.signal else None
    summary["error"] = stats.fatal or stats.gave_up
    return summary


def write_export(cfg: Config, plan: Plan, warn: Callable[[str], None]) -> int:
    """Every image with a combined caption, in the trainer format that --export's file name names (export_format);
    imagefolder's rows also hold both inputs of the merge and an `approved` column from --review."""
    fmt = export_format(cfg.export)
    target = cfg.dataset_dir / Path(cfg.export).expanduser()  # an absolute --export path replaces the root
    approvals = load_approvals(plan.records)
    rows = []
    for item in plan.items:
        # by variant name, from the files (other processes made some): "" is the combined caption, or the
        # --write_captions file the trainer reads, where a person may have edited it
        captions = {m.variant.name: read_cache(m.path) for m in item.merges}
        if captions.get("") is None:
            continue
        if cfg.write_captions:
            captions[""] = read_cache(finished_path(item, cfg)) or captions[""]
        # kohya: the full path, which its fine-tuning dataset opens as it is (merge_captions_to_metadata.py
        # --full_path); a bare stem would be searched for in one image_dir only, so images in subfolders would not be
        # found. imagefolder: the path from the metadata file's folder, the dataset root, with forward slashes.
        key = str(item.image) if fmt == "kohya" else item.image.relative_to(cfg.dataset_dir).as_posix()
        try:
            key.encode("utf-8")  # a name that is not UTF-8 on disk arrives here with surrogate escapes
        except UnicodeEncodeError:  # JSON and Arrow strings are UTF-8: one such name would make the file unloadable
            warn(f"warning: export skips {str(item.image)!r}: its file name is not valid UTF-8; rename it")
            continue
        columns = caption_columns(fmt, {name: text or "" for name, text in captions.items()})
        if fmt != "kohya":  # both inputs of the merge, and a column to filter on; kohya reads "caption" and "tags"
            columns |= {"manual": read_cache(item.caption_path) or "",
                        "generated": read_cache(item.generated_path) or item.generated or "",
                        "approved": is_approved(approvals, plan.records, item)}
        rows.append((key, columns))
    atomic_write(target, export_text(fmt, rows))
    return len(rows)


# --------------------------------------------------------------------------------------------
# Captions a trainer can use as they are: length budgets, fixed text, trainer formats, audit
# --------------------------------------------------------------------------------------------


def caption_counter(cfg: Config) -> Callable[[str], int] | None:
    """count(text) by --caption_tokenizer, start and end tokens included, as the trainer counts (CLIP's 77 positions
    hold <|startoftext|>, 75 tokens and <|endoftext|>); None without a --max_caption_tokens budget."""
    if not cfg.max_caption_tokens:
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.caption_tokenizer)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise UsageError(f"cannot load --caption_tokenizer {cfg.caption_tokenizer}: {first_line(e)}") from e
    # verbose=False: a caption over model_max_length is what is being measured here, not a mistake to warn about
    return lambda text: len(tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])


def budget_problem(text: str, budget: int, count: Callable[[str], int], what: str = "reply") -> str | None:
    tokens = count(text)
    return f"{what} is {tokens} tokens, the limit is {budget}" if tokens > budget else None


def caption_parts(text: str) -> list[str]:
    """The comma-separated parts of a caption, as kohya's shuffle and --keep_tokens split it."""
    return [p.strip() for p in text.split(",") if p.strip()]


def join_caption(parts: Iterable[str]) -> str:
    """Parts joined by commas, so each stays a part of its own; after a finished sentence a space is enough."""
    text = ""
    for part in filter(None, (p.strip() for p in parts)):
        text = part if not text else text + (" " if text[-1] in ".!?:;" else ", ") + part
    return text


def same_text(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()


def starts_with(text: str, part: str) -> bool:
    """At the start, in any case, as whole words: no letter or digit runs on from it."""
    return same_text(text[:len(part)], part) and not text[len(part):len(part) + 1].isalnum()


def ends_with(text: str, part: str) -> bool:
    """At the end, in any case, as whole words; a closing full stop does not count."""
    text = text.rstrip(" .")
    start = len(text) - len(part)
    return start >= 0 and same_text(text[start:], part) and not text[start - 1:start].isalnum()


def without_comma_part(text: str, part: str) -> str:
    parts = caption_parts(text)
    kept = [p for p in parts if not same_text(p, part)]
    return ", ".join(kept) if len(kept) < len(parts) else text


def apply_affixes(text: str, prefix: str, suffix: str, kept_parts: Sequence[str] = ()) -> str:
    """The --prefix first, before the --keep_tokens parts, and the --suffix last, each once and spelt as given: one
    already at its start or end, in any case, stays; one that is a comma part elsewhere moves there, not doubled.
    A suffix that is itself a kept part stays in front with them."""
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
    head: dict[str, str] = {}
    for part in filter(None, [prefix, *kept_parts]):
        head.setdefault(part.casefold(), part)
    return list(head.values())


def fit_to_budget(text: str, kept_parts: Sequence[str], budget: int, count: Callable[[str], int],
                  prefix: str = "", suffix: str = "") -> str:
    """At most `budget` tokens: the prefix and kept parts intact in front, the suffix at the end, the description
    between cut at its last sentence or comma that fits (a trainer would cut anywhere, kept tokens included)."""
    if count(text) <= budget:
        return text
    head = budget_head(kept_parts, prefix)
    body = text
    for part in head:  # in front already (as apply_affixes leaves them), or else taken out of where they are
        body = body[len(part):].lstrip(" ,;:") if starts_with(body, part) else without_comma_part(body, part)
    if suffix:
        body = body.rstrip(" .")[:-len(suffix)].rstrip(" ,;:") if ends_with(body, suffix) else \
            without_comma_part(body, suffix)
    # cuts of the body, longest first: after a sentence or before a comma; at a word only where no such cut is left
    clauses = [body[:m.end()] for m in re.finditer(r"[.!?](?=\s|$)", body)]
    clauses += [body[:m.start()] for m in re.finditer(",", body)]
    clauses = sorted({c.strip(" ,;:") for c in clauses} - {""}, key=len, reverse=True)
    words = {body[:m.start()].strip(" ,;:") for m in re.finditer(r"\s+", body)} - set(clauses) - {""}
    for cut in clauses + sorted(words, key=len, reverse=True):
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


def export_format(path: str) -> str:
    """jsonl or csv (the names Hugging Face imagefolder looks for) or kohya, from an --export file name."""
    name = Path(path).name
    if name in ("metadata.jsonl", "metadata.csv"):
        return name.removeprefix("metadata.")
    if name.lower().endswith(".json"):
        return "kohya"
    raise UsageError(f"--export {path}: unknown format; name it metadata.jsonl or metadata.csv (Hugging Face "
                     "imagefolder) or NAME.json (kohya fine-tuning metadata)")


def caption_columns(fmt: str, captions: dict[str, str]) -> dict[str, str]:
    """Variant names as the format's columns: text, text_short for imagefolder; caption, caption_short for kohya."""
    base = "caption" if fmt == "kohya" else "text"
    return {base + (f"_{name}" if name else ""): text for name, text in captions.items()}


def export_text(fmt: str, rows: list[tuple[str, dict[str, str]]]) -> str:
    """The rows (a file key and its columns) as the format's file: JSON lines, kohya's JSON, or CSV."""
    if fmt == "jsonl":
        return "\n".join(json.dumps({"file_name": key, **columns}, ensure_ascii=False) for key, columns in rows)
    if fmt == "kohya":
        return json.dumps(dict(rows), ensure_ascii=False, indent=2)
    buffer = io.StringIO()
    names = ["file_name"] + list(dict.fromkeys(name for _, columns in rows for name in columns))
    writer = csv.DictWriter(buffer, fieldnames=names, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({"file_name": key, **columns} for key, columns in rows)
    return buffer.getvalue()


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
    return {" ".join(words[i:i + n]) for words in phrase_words(text) for n in sizes
            for i in range(len(words) - n + 1)}


def common_phrases(texts: Sequence[str], fixed: Iterable[str], manual: Sequence[str] = ()) -> list[tuple[str, int]]:
    """Phrases of 2-4 words in at least PHRASE_SHARE of the texts, but not the fixed text, the person's own phrases
    (in the manual captions of at least half the captions that have them: a trigger word, a style tag) or stop words
    only. Each once: not the shorter phrases inside it, and overlapping ones chained into one."""
    if len(texts) < PHRASE_MIN_CAPTIONS:
        return []
    fixed_words = [f" {' '.join(w for clause in phrase_words(f) for w in clause)} " for f in fixed]
    counts = collections.Counter(gram for text in texts for gram in word_ngrams(text))
    own = collections.Counter(gram for text in manual for gram in word_ngrams(text, range(1, 5)))
    found: list[str] = []
    for gram, n in sorted(counts.items(), key=lambda kv: (-len(kv[0].split()), kv[0])):
        if n < PHRASE_SHARE * len(texts) or set(gram.split()) <= PHRASE_STOP_WORDS or 2 * own[phrase_core(gram)] >= n:
            continue
        if any(f" {gram} " in f for f in fixed_words) or any(f" {gram} " in f" {longer} " for longer in found):
            continue
        found.append(gram)
    clauses = [[f" {' '.join(words)} " for words in phrase_words(text)] for text in texts]
    return [(phrase, sum(any(f" {phrase} " in c for c in cs) for cs in clauses)) for phrase in chain_phrases(found)]


def phrase_core(gram: str) -> str:
    """A phrase without the stop words at its ends: "in ohwx style" is the person's "ohwx style"."""
    words = gram.split()
    inner = [i for i, word in enumerate(words) if word not in PHRASE_STOP_WORDS]
    return " ".join(words[inner[0]:inner[-1] + 1]) if inner else ""


def chain_phrases(grams: list[str]) -> list[str]:
    """Join phrases of one length that overlap in all but one word: "a b c d" and "b c d e" make "a b c d e"."""
    chains = []
    for size in sorted({len(g.split()) for g in grams}, reverse=True):
        group, n = [g.split() for g in grams if len(g.split()) == size], size - 1
        while group:
            chain = group.pop(0)
            while other := next((o for o in group if chain[-n:] == o[:n] or o[-n:] == chain[:n]), None):
                group.remove(other)
                chain = chain + other[n:] if chain[-n:] == other[:n] else other + chain[n:]
            chains.append(" ".join(chain))
    return chains


def find_loop(text: str) -> str | None:
    """A sequence of 1-4 words repeated LOOP_REPEATS or more times in a row: a small vision model stuck in a loop."""
    words = WORD.findall(text.casefold())
    for i in range(len(words)):
        for n in range(1, 5):
            seq, repeats = words[i:i + n], 1
            while words[i + repeats * n:i + (repeats + 1) * n] == seq:
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
    if text is None and path.exists():
        return None, Finding(str(path), "empty", "blank file")
    if text is None:
        return None, Finding(str(path), "missing", "no combined caption yet (run without --audit to make it)")
    if problem := reply_problem(text, None):
        return None, Finding(str(path), "refusal" if problem.startswith("refusal") else "empty", problem)
    return text, None


def audit_item(item: Item, cfg: Config, text: str, count: Callable[[str], int] | None, path: str) -> list[Finding]:
    """One finished caption (at path) against the trainer's settings: kept parts first, and within the token budget."""
    findings = []
    kept = keep_token_parts(item.manual, cfg.keep_tokens)  # planning read it (and reported it if it cannot)
    lead = budget_head(kept, cfg.prefix)
    if missing := [part for part in kept if part not in text]:
        findings.append(Finding(path, "keep_tokens", f"kept part {missing[0]!r} (part {kept.index(missing[0]) + 1} "
                                                     f"of {item.caption_path.name}) is not in the caption"))
    else:  # the first comma part that is not the one the trainer keeps there
        for i, (part, found) in enumerate(zip(lead, caption_parts(text) + [None] * len(lead))):
            if found is None or not same_text(found, part):
                findings.append(Finding(path, "keep_tokens", f"comma part {i + 1} should be {part!r}, "
                                                             f"not {found!r}; the caption starts {', '.join(lead)!r} "
                                                             "for the trainer to keep"))
                break
    if count is not None and (problem := budget_problem(text, cfg.max_caption_tokens, count, what="caption")):
        findings.append(Finding(path, "over_budget", problem))
    return findings


def finished_path(item: Item, cfg: Config) -> Path:
    """The caption the trainer reads: the --write_captions file where there is one (a person's edit), else combined."""
    trainer = cfg.write_captions and trainer_path(item, cfg)
    return trainer if trainer and trainer.exists() else item.combined_path


def audit_dataset(cfg: Config, plan: Plan, count: Callable[[str], int] | None = None) -> list[Finding]:
    """Everything in the finished captions that would hurt training; reads files only, calls nothing."""
    findings = [Finding(f.path, "input", f.error) for f in plan.failures]
    bad = {f.path: f.error for f in plan.failures}
    texts: list[tuple[Item, str]] = []
    for item in plan.items:
        path = finished_path(item, cfg)
        text, problem = read_finished(path)
        if problem and problem.kind == "missing" and (error := bad.get(str(item.image))) is not None:  # name the file
            culprit = item.caption_path if item.caption_path.name in error else item.image
            problem = Finding(problem.path, problem.kind, f"no combined caption: fix or replace {culprit} ({error})")
        if problem:
            findings.append(problem)
        else:
            texts.append((item, text))
            findings += audit_item(item, cfg, text, count, str(path))
        findings += generated_findings(item)
    fixed = [t for t in (cfg.prefix, cfg.suffix) if t]
    fixed += [part for item in plan.items for part in keep_token_parts(item.manual, cfg.keep_tokens)]
    manual = [item.manual or "" for item in plan.items]
    findings += duplicate_findings(cfg, texts)
    findings += check_findings(plan)
    findings += [Finding(str(cfg.dataset_dir), "phrase", f'"{gram}" is in {n} of {len(texts)} combined captions')
                 for gram, n in common_phrases([text for _, text in texts], fixed, manual)]
    return findings


STALE_CHECK = "verify_stale"  # a flagged caption edited by hand since: shown, but the person's word stands


def check_findings(plan: Plan) -> Iterator[Finding]:
    """The captions --verify's check flagged, from their records; marked stale where edited by hand since."""
    for item in plan.items:
        for merge in item.merges:
            if merge.record is not None and merge.record.findings:
                stale = merge.variant.kind in item.kept
                detail = findings_text(merge.record.findings) + (" (stale: edited by hand since)" if stale else "")
                yield Finding(str(merge.path), STALE_CHECK if stale else "verify", detail)


def generated_findings(item: Item) -> list[Finding]:
    """A vision caption that a loop or a refusal spoilt: the merge carries its flaw into the combined caption."""
    path, text = str(item.generated_path), read_cache(item.generated_path)
    if text is not None and is_refusal(text):
        return [Finding(path, "refusal", f"refusal: {text[:60]!r}")]
    loop = text is not None and find_loop(text)
    return [Finding(path, "loop", loop)] if loop else []


def duplicate_findings(cfg: Config, texts: Sequence[tuple[Item, str]]) -> Iterator[Finding]:
    """Different images with the same caption teach the trainer that they look the same."""
    groups = collections.defaultdict(list)
    for item, text in texts:
        groups[" ".join(text.casefold().split())].append(item)
    for group in (g for g in groups.values() if len(g) > 1):
        for item in group:
            others = ", ".join(o.image.relative_to(cfg.dataset_dir).as_posix() for o in group if o is not item)
            yield Finding(str(item.combined_path), "duplicate", f"same caption as {others}")


def no_images(cfg: Config) -> str:
    return f"no images ({' '.join(sorted(IMAGE_EXTENSIONS))}) found under {cfg.dataset_dir}"


def run_audit(cfg: Config) -> int:
    """--audit: report what in the finished captions would hurt training. No lock, no model, no request. Raises
    UsageError before anything is printed."""
    count = caption_counter(cfg)
    plan = plan_work(cfg, keep_texts=True)
    if not plan.items:
        raise UsageError(no_images(cfg))
    findings = audit_dataset(cfg, plan, count)
    approved = approved_count(cfg, plan)
    code = EXIT_FAILED if any(f.kind != STALE_CHECK for f in findings) else EXIT_OK
    kinds = collections.Counter(f.kind for f in findings)
    if cfg.report:  # first: a reader of the printout that goes away (`| head`) does not cost the report
        write_report(cfg.report, findings, {"exit_code": code, "images": len(plan.items), "findings": dict(kinds),
                                            "approved": approved})
    say("\n".join([f"audit: {len(plan.items)} images under {cfg.dataset_dir}, {len(findings)} findings",
                   f"  reviewed: {approved} approved, {len(plan.items) - approved} not yet reviewed (--review)",
                   *(f"  {kind}: {n}" for kind, n in sorted(kinds.items())),
                   *(f"{f.kind} {f.path}: {f.detail}" for f in findings)]))
    return code


# --------------------------------------------------------------------------------------------
# Review page: each image beside its captions, state and findings; a person's edits saved as hand edits
# --------------------------------------------------------------------------------------------

APPROVALS_FILE = "approved.json"  # in RECORDS_DIR: {combined caption's key: hash of the bytes a person approved}
THUMB_SIDE = 320
PAGE_LIMIT = 200  # cards per request, at most
REVIEW_FILTERS = {"all": lambda e: True, "flagged": lambda e: bool(e.findings), "stale": lambda e: e.stale,
                  "edited": lambda e: bool(e.item.kept), "failed": lambda e: bool(e.failures)}
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
KIND_MANUAL = "manual"
REVIEW_CHANGES = {"/api/save": "save", "/api/approve": "approve"}  # POST only
MAX_CHANGE_BYTES = 1 << 20


def load_approvals(records: Records) -> dict[str, str]:
    """Kept with the dataset's records, whichever folder of it was reviewed."""
    try:
        approvals = json.loads((records.folder / APPROVALS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return approvals if isinstance(approvals, dict) else {}


def file_sha(path: Path) -> str | None:
    """on_disk's hash, and None also where the file cannot be read."""
    with contextlib.suppress(OSError):
        return on_disk(path)
    return None


def is_approved(approvals: dict[str, str], records: Records, item: Item) -> bool:
    """Approved: a person approved the combined caption exactly as it is now (an edit since un-approves it)."""
    sha = approvals.get(records.key(item.combined_path))
    return sha is not None and sha == file_sha(item.combined_path)


def approved_count(cfg: Config, plan: Plan) -> int:
    approvals = load_approvals(plan.records)
    return sum(is_approved(approvals, plan.records, item) for item in plan.items) if approvals else 0


def exposure_warning(host: str) -> str | None:
    """--host other than loopback: anyone who can reach it and has the address (token included) can edit."""
    with contextlib.suppress(ValueError):
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    return (f"warning: --host {host}: the review page can be reached from other machines; anyone with its address "
            "(the token included) can read and change the captions")


@functools.lru_cache(maxsize=2048)  # ~20 KB each: a few screens of cards scrolled back and forth
def thumbnail(path: Path, stamp: str) -> bytes:
    """A JPEG of the image at most THUMB_SIDE a side, made on the fly; kept in memory by (path, stamp)."""
    img = load_image(path, min_side=THUMB_SIDE)
    img.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


@dataclasses.dataclass
class ReviewEntry:
    """One card: the item as planning decided it, and what the audit (and the last run's report) found."""

    id: str                   # the image's path in the dataset, with forward slashes, printable: the page's name
    item: Item
    findings: list[Finding] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)  # planning's, or the last run's

    def __post_init__(self) -> None:
        self.update(self.item)

    def update(self, item: Item) -> None:
        """The item as planned again, and its captions in lower case for the search."""
        self.item = item
        self.text = "\n".join(t for t in (item.manual, item.generated, *(m.text for m in item.merges)) if t).casefold()

    @property
    def stale(self) -> bool:
        return bool(self.item.vision or any(m.reason for m in self.item.merges))


class Review:
    """What the review page shows and changes: one plan of the dataset, made at start and again when the page is
    loaded, and each item decided again after a save. Saves take the dataset lock for the moment of the write."""

    def __init__(self, cfg: Config, token: str):
        self.cfg, self.token = cfg, token
        self.page = read_prompt_file(REVIEW_PAGE, "the review page")
        self.root = os.path.realpath(cfg.dataset_dir)
        self.count = caption_counter(cfg)  # the trainer's tokenizer (no model), for --max_caption_tokens findings
        self.busy = threading.Lock()       # one save or planning at a time
        self.planned_unseen = False        # a plan no page has shown yet: the first page load uses it
        self.refresh()

    # -- the plan and its cards ---------------------------------------------------------------
    def refresh(self) -> None:
        with self.busy:
            plan = plan_work(dataclasses.replace(self.cfg, limit=None), keep_texts=True)
            reported = self.reported_failures()
            entries = [ReviewEntry(printable(item.image.relative_to(self.cfg.dataset_dir).as_posix()), item)
                       for item in plan.items]
            by_path = {str(p): e for e in entries for p in (e.item.image, *self.files(e.item).values())}
            notes = []
            for finding in audit_dataset(self.cfg, plan, self.count):
                if finding.path not in by_path:
                    notes.append(finding)
                elif finding.kind != "input":  # a failure to plan the item: shown as its state instead
                    by_path[finding.path].findings.append(finding)
            for failure in plan.failures:
                if failure.path in by_path:
                    by_path[failure.path].failures.append(failure.error)
            for entry in entries:
                if entry.stale:  # a failure since fixed is not shown
                    entry.failures += [f"the last run: {why}" for why in reported.get(str(entry.item.image), ())]
            self.plan, self.entries, self.notes = plan, entries, notes
            self.by_id = {e.id: e for e in entries}
            self.approvals = load_approvals(plan.records)
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

    def files(self, item: Item) -> dict[str, Path]:
        """The caption files of one card, by kind: what the page may show, and the only files it may write."""
        files = {KIND_MANUAL: item.caption_path, KIND_GENERATED: item.generated_path}
        files |= {v.kind: item.cache_path(v.kind) for v in variants_of(self.cfg)}
        if self.cfg.write_captions:
            files[KIND_TRAINER] = trainer_path(item, self.cfg)
        return files

    def inside(self, path: Path) -> bool:
        """In the dataset folder once every symlink is followed."""
        return os.path.realpath(path).startswith(self.root + os.sep)

    def listing(self, show: str, query: str, offset: int, limit: int, refresh: bool) -> dict:
        if refresh and not self.planned_unseen:  # a page loaded again: look at the folder again
            self.refresh()
        self.planned_unseen = False
        query = query.casefold().strip()
        chosen = [e for e in self.entries if query in e.text and REVIEW_FILTERS[show](e)]
        return {"total": len(chosen), "offset": offset,
                "counts": {name: sum(map(shows, self.entries)) for name, shows in REVIEW_FILTERS.items()},
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
        item = entry.item
        states = [("failed", f"failed: {why}") for why in entry.failures]
        states += [("stale", f"vision caption: made again next run ({item.vision})")] if item.vision else []
        states += [("stale", f"{m.path.name}: merged again next run ({m.reason})"
                    + (", if the new vision caption differs" if m.unless else "")) for m in item.merges if m.reason]
        states += [("edited", f"{item.cache_path(kind).name}: edited by hand (kept)"
                    + (OUTDATED if kind in item.outdated else "")) for kind in item.kept]
        return [{"kind": kind, "text": text} for kind, text in states or [("ok", "current")]]

    # -- changes ------------------------------------------------------------------------------
    def target(self, body: dict, kind: object) -> tuple[ReviewEntry, Path]:
        """The card and the caption file a change names: one of the plan's, inside the dataset folder."""
        entry = self.by_id.get(body.get("id")) if isinstance(body.get("id"), str) else None
        if entry is None or not self.inside(entry.item.image):
            raise LookupError("no such image in the plan")
        path = self.files(entry.item).get(kind) if isinstance(kind, str) and kind != KIND_TRAINER else None
        if path is None or not self.inside(path):
            raise LookupError("no such caption file in the plan")
        return entry, path

    def save(self, body: dict) -> tuple[int, dict]:
        """Write one caption as a person's words, unless the file changed since the page showed it."""
        kind, text = body.get("kind"), body.get("text")
        entry, path = self.target(body, kind)
        if not isinstance(text, str):
            return 400, {"error": "not saved: no text"}
        if kind != KIND_MANUAL and not text.strip():
            return 400, {"error": f"not saved: an empty {path.name} would be made again by the next run; "
                                  "delete the file to have it made again"}
        with self.busy:
            lock = DatasetLock(dataset_root(self.cfg.dataset_dir))
            if busy := lock.acquire():
                return 423, {"error": f"not saved: {busy}"}
            try:
                text_now, sha_now, unreadable = self.shown(path)
                if sha_now != body.get("sha"):
                    return 409, {"error": f"not saved: {path.name} changed on disk since the page showed it; it now "
                                          "reads as shown, your text is still in the editor",
                                 "text": text_now, "sha": sha_now, "card": self.card(entry)}
                if text_now == text.strip() and unreadable in (None, "none yet"):  # a new hash would cost a merge
                    return 200, {"message": f"{path.name} is unchanged: nothing written", "card": self.card(entry)}
                if kind != KIND_MANUAL:  # a record that says a person wrote it, so that a rerun keeps it
                    records = self.plan.records
                    _, old = records.match(path, sha_now)
                    record = Record("", "") if old is None else dataclasses.replace(old, adopted=False)
                    records.write(path, dataclasses.replace(record, sha=digest(cache_bytes(text)), by_hand=True))
                    records.close()  # a run folds the journals in, and must not fold one this server still writes to
                atomic_write(path, text)
            finally:
                lock.release()
            self.decide_again(entry)
        edit = "" if kind == KIND_MANUAL else " as a hand edit"
        return 200, {"message": f"saved {path.name}{edit}; {self.next_run(entry.item)}", "card": self.card(entry)}

    def decide_again(self, entry: ReviewEntry) -> None:
        """One item planned again after a save: its state, and its own findings (duplicates and the phrases of
        the whole dataset are found again when the page is loaded again)."""
        item = Item(entry.item.image_file, entry.item.caption_extension)
        plan = Plan([item], [], [], [], records=self.plan.records, settings=self.plan.settings)
        try:
            decide(item, self.cfg, plan)
        except ItemError as e:
            plan.failures.append(Failure(str(item.image), STAGE_INPUT, str(e)))
            for merge in item.merges:
                merge.reason = None
        duplicates = [f for f in entry.findings if f.kind == "duplicate"]
        entry.findings = [f for f in audit_dataset(self.cfg, plan, self.count) if f.kind != "input"] + duplicates
        entry.failures = [f.error for f in plan.failures]
        entry.update(item)

    def next_run(self, item: Item) -> str:
        todo = ([f"makes its vision caption again ({item.vision})"] if item.vision else []) + [
            f"merges {m.path.name} again ({m.reason})" for m in item.merges if m.reason]
        kept = [item.cache_path(kind).name for kind in item.kept]
        return ("the next run " + (", ".join(todo) if todo else "leaves this image as it is")
                + (f" and keeps {', '.join(kept)} as edited by hand" if kept else ""))

    def approve(self, body: dict) -> tuple[int, dict]:
        """Mark the combined caption, as the page showed it, approved (or not): an edit since un-approves it."""
        entry, path = self.target(body, KIND_COMBINED)
        approved = bool(body.get("approved"))
        with self.busy:
            now = file_sha(path)
            if now is None or now != body.get("sha"):
                return 409, {"error": f"not {'approved' if approved else 'changed'}: {path.name} "
                                      f"{'is missing' if now is None else 'changed on disk since the page showed it'}",
                             "card": self.card(entry)}
            approvals = load_approvals(self.plan.records)  # another page may have approved others since
            key = self.plan.records.key(path)
            if approved:
                approvals[key] = now
            else:
                approvals.pop(key, None)
            folder = self.plan.records.folder
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

    def allowed(self, in_url: str) -> bool:
        shown = self.headers.get("X-Token") or in_url
        return hmac.compare_digest(shown.encode(), self.review.token.encode())

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {name: values[0] for name, values in parse_qs(url.query).items()}
        if not self.allowed(query.get("token", "")):
            return self.answer(403, {"error": "a wrong or missing token: open the address the review printed"})
        if url.path == "/":
            nonce = secrets.token_urlsafe(12)  # only the page's own script and style run, whatever a caption holds
            policy = (f"default-src 'none'; img-src 'self' data:; connect-src 'self'; script-src 'nonce-{nonce}'; "
                      f"style-src 'nonce-{nonce}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
            return self.answer(200, self.review.page.replace("NONCE", nonce).encode(), "text/html; charset=utf-8",
                               {"Content-Security-Policy": policy})
        if url.path == "/api/items":
            show, offset, limit = query.get("filter", "all"), query.get("offset", "0"), query.get("limit", "50")
            valid = show in REVIEW_FILTERS and offset.isdecimal() and limit.isdecimal() and 0 < int(limit) <= PAGE_LIMIT
            if not valid:
                return self.answer(400, {"error": f"filter is one of {', '.join(REVIEW_FILTERS)}; offset >= 0; "
                                                  f"0 < limit <= {PAGE_LIMIT}"})
            listing = self.review.listing(show, query.get("q", ""), int(offset), int(limit), "refresh" in query)
            return self.answer(200, listing)
        if url.path in ("/thumb", "/image"):
            entry = self.review.by_id.get(query.get("id", ""))
            if entry is None or not self.review.inside(entry.item.image):
                return self.answer(404, {"error": "no such image in the plan"})
            image, thumb = entry.item.image, url.path == "/thumb"
            try:
                data = thumbnail(image, image_stamp(image)) if thumb else image.read_bytes()
            except (ItemError, OSError) as e:
                return self.answer(404, {"error": f"cannot show {entry.id}: {e}"})
            if thumb:
                return self.answer(200, data, "image/jpeg", {"Cache-Control": "private, max-age=3600"})
            return self.answer(200, data, IMAGE_TYPES[image.suffix.lower()])
        if url.path in REVIEW_CHANGES:
            return self.answer(405, {"error": "changes are POST requests"}, extra={"Allow": "POST"})
        self.answer(404, {"error": "not found"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if not self.allowed("") or url.query:  # the token in the header only, never in the URL
            return self.answer(403, {"error": "a wrong or missing token: reload the page from the printed address"})
        if url.path not in REVIEW_CHANGES:
            return self.answer(404, {"error": "not found"})
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > MAX_CHANGE_BYTES:
            # a refused body of up to 16 MiB is read, so that the client sees the 413 rather than a reset connection
            self.close_connection = True
            left = int(length) if length.isdigit() and int(length) <= 16 * MAX_CHANGE_BYTES else 0
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            return self.answer(413, {"error": f"not a change: send a JSON object of at most {MAX_CHANGE_BYTES} bytes"})
        try:
            body = json.loads(self.rfile.read(int(length)) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            self.answer(*getattr(self.review, REVIEW_CHANGES[url.path])(body))
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
    """--review: serve the page until Ctrl-C or SIGTERM; no model, no request. Raises UsageError before serving."""
    review = Review(cfg, secrets.token_urlsafe(24))
    if not review.entries:
        raise UsageError(no_images(cfg))
    handler = type("Handler", (ReviewHandler,), {"review": review})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        server = type("Server", (ThreadingHTTPServer,), {"address_family": family})((host, port), handler)
    except OSError as e:
        raise UsageError(f"cannot serve the review page on {host}:{port}: {e.strerror or e}") from e
    if warning := exposure_warning(host):
        say(warning, sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_address[1]}/?token={review.token}"
    stop = StopEvent()
    with stop_on_signals(stop):  # before the address is printed: from then on a signal stops the page cleanly
        say(f"review: {len(review.entries)} images under {cfg.dataset_dir} at {url} (Ctrl-C to stop)")
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        # the main thread waits for the signal; shutdown() is seen within a poll interval (the default is 0.5 s)
        threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
        stop.wait()
    server.shutdown()
    with review.busy:  # a save in flight finishes first
        server.server_close()
    return EXIT_FOR_SIGNAL[stop.signal]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

EPILOG = """examples:
  python enhance_captions.py --dataset_dir images/ --base_url http://127.0.0.1:11434/v1/ --model llama3.1
  accelerate launch --multi_gpu --num_processes 4 --num_machines 1 --mixed_precision no --dynamo_backend no \\
      enhance_captions.py --dataset_dir images/ --base_url http://127.0.0.1:11434/v1/ --model llama3.1
  python enhance_captions.py --dataset_dir images/ --model_id Qwen/Qwen2.5-VL-3B-Instruct --batch_size 16 --overlap
  python enhance_captions.py --dataset_dir images/ --dry_run

exit codes: 0 all done, 1 some items failed (listed at the end), 2 usage or configuration error,
130/143 stopped by Ctrl-C/SIGTERM (the finished work is saved; rerun to go on), 141 --dry_run or --audit
into a pipe that closed (| head). accelerate launch turns any non-zero exit into 1: read --report's last line.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default where it has a meaningful one; keeps the epilog's line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enhance_captions.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=functools.partial(HelpFormatter, max_help_position=36, width=110))
    g = p.add_argument_group("input")
    g.add_argument("--dataset_dir", type=Path, required=True, help="folder of images and manual captions (recursive)")
    g.add_argument("--caption_extension", default=".txt", help="extension of the manual captions (kohya: .caption)")
    g.add_argument("--limit", type=int, help="process only the first N images that need work")
    g.add_argument("--refresh", choices=REFRESH_MODES, default="inputs", help="inputs: redo a cache whose inputs "
                   "changed since it was made (manual caption, image, hand-edited vision caption); settings: also one "
                   "made with other settings (models, prompts, generation settings); none: trust every existing cache")
    g.add_argument("--overwrite", choices=["generated", "combined", "all"],
                   help="recompute these caches even where they exist, hand edits included")
    g.add_argument("--dry_run", action="store_true", help="show what a run would do; load nothing, call nothing")

    g = p.add_argument_group("vision model")
    g.add_argument("--model_id", default=DEFAULT_MODEL_ID, help="vision model: Hub id or local path")
    g.add_argument("--revision", default="main", help="model revision (the vision model's processor and "
                                                                 "weights, and --local_llm's)")
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
    g.add_argument("--vlm_max_side", type=int, default=1024,
                   help="downscale images to this longest side before sending")
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
    g.add_argument("--max_retries", type=int, default=5, help="at most N+1 requests per item in all, transport "
                                                               "retries included (backoff, honours Retry-After)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--give_up_after", type=float, default=GIVE_UP_AFTER, metavar="SECONDS",
                   help="stop a stage (LLM or served vision) whose every endpoint is set aside and none has answered "
                        "for this long; what it has not done is left for the next run (exit 1)")
    g.add_argument("--keep_tokens", type=int, default=0, help="start each caption with the first N comma-separated "
                   "parts of the manual caption, verbatim and once each (0: off)")

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
    g.add_argument("--report", type=Path, help="write every failure as JSON lines (path, stage, error), and every "
                   "caption --verify flagged (path, stage, the three lists of findings); with --review, read it")
    g.add_argument("--quiet", action="store_true", help="only warnings, errors and the summary")
    g.add_argument("-v", "--verbose", action="store_true", help="a line per item")

    g = p.add_argument_group("training captions")
    g.add_argument("--variant", action="append", default=[], metavar="NAME=FILE",
                   help="also merge with the system prompt in FILE, cached as {stem}_combined_NAME.txt "
                        "(repeatable; e.g. short=prompts/short.txt, tags=prompts/tags.txt)")
    g.add_argument("--write_captions", metavar="EXT", help="also write each image's combined caption to {stem}EXT, "
                   "where the trainer reads it (.caption for kohya, .txt for OneTrainer, ai-toolkit, SimpleTuner); "
                   "never the manual captions' --caption_extension")
    g.add_argument("--prefix", metavar="TEXT", help="fixed text at the start of every combined caption, before the "
                                                "--keep_tokens parts (e.g. a trigger word); never doubled")
    g.add_argument("--suffix", metavar="TEXT", help="fixed text at the end of every combined caption; never doubled")
    g.add_argument("--max_caption_tokens", type=int, metavar="N",
                   help="the trainer's caption limit in tokens of --caption_tokenizer, start and end tokens included "
                        "(CLIP: 77, kohya --max_token_length N: N+2, T5: 512)")
    g.add_argument("--caption_tokenizer", metavar="ID_OR_PATH", help="the trainer's text tokenizer, Hub id or folder "
                                               "(e.g. openai/clip-vit-large-patch14)")
    g.add_argument("--audit", action="store_true", help="check the finished captions for what would hurt training "
                   "(kept parts, length, duplicates, refusals, phrases in every caption, vision loops); loads no "
                   "model, calls nothing; exit 1 when something is found")
    g.add_argument("--verify", nargs="?", const="on", choices=("on", "strict"),
                   help="check each merged caption against the manual and vision captions with one more request: "
                        "invented details, contradictions and lost facts are merged again once, then flagged; "
                        "strict: a caption still flagged is not written (the item fails)")
    g.add_argument("--verify_prompt", type=Path, metavar="FILE",
                   help="the check's instructions (default: prompts/verify.txt beside the script)")

    g = p.add_argument_group("review")
    g.add_argument("--review", action="store_true", help="serve a page of each image beside its captions, state and "
                   "findings, to edit (saved as hand edits) and approve; give it the flags of your run; with --report "
                   "FILE it shows that run's failures; loads no model, calls nothing; runs until Ctrl-C")
    g.add_argument("--port", type=int, default=0, help="the review page's port (default: a free one)")
    g.add_argument("--host", default="127.0.0.1", help="the address the review page listens on; another than "
                                                      "loopback lets other machines reach it")
    g.add_argument("--open", action="store_true", help="open the review page in the default browser")
    return p


def read_prompt_file(path: Path, what: str) -> str:
    """A prompt file named by a relative path is read from the working folder, else from beside the script (the
    bundled prompts/), so `--variant short=prompts/short.txt` works from wherever the script is run."""
    path = path.expanduser()
    if not (path.is_absolute() or path.exists()) and (SCRIPT_DIR / path).exists():
        path = SCRIPT_DIR / path
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
    for name in ("batch_size", "concurrency", "max_new_tokens", "max_tokens", "vlm_max_side", "limit",
                 "max_caption_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    for name in ("num_workers", "rpm", "tpm", "vlm_rpm", "max_retries", "keep_tokens", "give_up_after"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must not be negative")
    for flag, needs, why in (("vlm_base_url", "vlm_model", ""), ("verify_prompt", "verify", ""),
                             ("max_caption_tokens", "caption_tokenizer", " (the trainer's tokenizer, to count with)"),
                             ("caption_tokenizer", "max_caption_tokens", " (the limit to count against)")):
        if getattr(args, flag) and not getattr(args, needs):
            raise UsageError(f"--{flag} needs --{needs}{why}")
    if args.local_llm and args.base_url:
        raise UsageError(f"--local_llm and --base_url both given: drop --base_url to merge in-process with "
                         f"{args.local_llm}, or drop --local_llm to merge through the endpoint")
    env_base_url = os.environ.get("OPENAI_BASE_URL") or None
    env_urls = [url for url in re.split(r"[\s,]+", env_base_url or "") if url]  # one URL, or several
    base_url = endpoint_urls(args.base_url or (() if args.local_llm else env_urls), "--base_url")
    api_key = os.environ.get("OPENAI_API_KEY") or None
    local_llm = args.local_llm or (None if base_url or api_key else DEFAULT_LOCAL_LLM)
    vlm_base_url = endpoint_urls(args.vlm_base_url or (), "--vlm_base_url")
    vlm_api_key = args.vlm_api_key or os.environ.get("VLM_API_KEY") or None
    llm_urls = args.base_url or env_urls or (DEFAULT_OPENAI_URL,)
    vlm_api_keys = tuple(vlm_api_key or (api_key if any(same_origin(url, llm) for llm in llm_urls) else None)
                         for url in vlm_base_url)  # the LLM endpoints' key, sent to no other server
    check_training_args(args, folder)
    check_review_args(args)
    derived = dict(  # every other field is the flag of its name, as given
        dataset_dir=folder.resolve(),
        system_prompt=read_prompt_file(args.system_prompt or DEFAULT_SYSTEM_PROMPT, "--system_prompt"),
        variants=parse_variants(args.variant),
        write_captions=caption_extension_of(args.write_captions) if args.write_captions else None,
        vlm_system_prompt=read_prompt_file(args.vlm_system_prompt, "--vlm_system_prompt")
        if args.vlm_system_prompt else None,
        base_url=base_url, model=args.model or os.environ.get("OPENAI_MODEL") or None, api_key=api_key,
        local_llm=local_llm, local_llm_by_default=local_llm is not None and not args.local_llm,
        set_aside_base_url=env_base_url if args.local_llm else None,
        vlm_base_url=vlm_base_url, vlm_api_keys=vlm_api_keys, cache_generated=args.cache_generated_captions_to_disk,
        caption_extension=caption_extension_of(args.caption_extension),
        verbosity=0 if args.quiet else 2 if args.verbose else 1,
        prefix=(args.prefix or "").strip(" ,"), suffix=(args.suffix or "").strip(" ,"),
        verify_prompt=read_prompt_file(args.verify_prompt or DEFAULT_VERIFY_PROMPT, "--verify_prompt")
        if args.verify else "",
    )
    flags = {f.name for f in dataclasses.fields(Config)} & vars(args).keys() - derived.keys()
    return Config(**{name: getattr(args, name) for name in flags}, **derived)


def endpoint_urls(urls: Sequence[str], flag: str) -> tuple[str, ...]:
    """Each endpoint once: the same server twice would get twice its --rpm and share of the work."""
    urls = tuple(url.strip() for url in urls)
    for i, url in enumerate(urls):
        if url.rstrip("/") in {seen.rstrip("/") for seen in urls[:i]}:
            raise UsageError(f"{flag} {redact(url, None)} is given twice")
    return urls


def parse_variants(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """--variant NAME=FILE, each name once: (name, system prompt)."""
    variants: dict[str, str] = {}
    for value in values:
        name, _, file = value.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", name) or not file:
            raise UsageError(f"--variant {value}: give NAME=FILE, NAME of letters, digits and dashes "
                             "(e.g. short=prompts/short.txt)")
        if name in variants:
            raise UsageError(f"--variant {name} is given twice")
        variants[name] = read_prompt_file(Path(file), f"--variant {name}")
    return tuple(variants.items())


def caption_extension_of(value: str) -> str:
    return value if value.startswith(".") else "." + value


def check_training_args(args: argparse.Namespace, folder: Path) -> None:
    """--write_captions: an extension no other file has; --export: a format its trainer reads."""
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
        target = Path(args.export).expanduser()
        if (export_format(args.export) != "kohya" and target.is_absolute()
                and target.parent.resolve() != folder.resolve()):
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


def agree(value):
    """The main process's value, seen by every process."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.review:  # no model, no endpoint; takes the lock only for the moment of each save
            return run_review(cfg, args.host, args.port, args.open)
        if cfg.audit:  # reads finished files only: no lock, no model, no endpoint
            return run_audit(cfg)
    except UsageError as e:
        say(f"error: {e}", sys.stderr)
        return EXIT_USAGE
    state = make_state()
    reporter = Reporter(cfg.verbosity, state.is_main_process, processes=state.num_processes)
    lock = DatasetLock(dataset_root(cfg.dataset_dir))
    try:
        plan = error = count_tokens = None
        try:
            check_against_state(cfg, state)
            if not cfg.dry_run:  # a dry run loads nothing
                count_tokens = caption_counter(cfg)  # the trainer's tokenizer, for --max_caption_tokens
            if state.is_main_process:
                cfg, plan, error = prepare(cfg, state, lock, count_tokens)
        except UsageError as e:
            error = str(e)
        shared = plan_rows(plan, cfg.dataset_dir) if plan and state.num_processes > 1 and not cfg.dry_run else None
        error, cfg, run_id, shared = agree((error, cfg, uuid.uuid4().hex, shared))
        if error:
            if state.is_main_process:
                say(f"error: {error}", sys.stderr)
                if cfg.report and not cfg.dry_run:  # cron under accelerate launch reads the exit code there
                    with contextlib.suppress(OSError):
                        write_report(cfg.report, [], report_summary(plan or Plan([], [], [], []), Stats(fatal=error)))
            return EXIT_USAGE
        if cfg.dry_run:
            return EXIT_OK
        plan = plan or plan_from_rows(cfg, *shared)  # one plan: the main process's
        work = SharedWork.of(state, run_id)
        reporter.info(run_description(cfg))
        if plan.records.root != cfg.dataset_dir:
            reporter.info(f"records: {plan.records.folder} (this folder is part of the dataset at {plan.records.root})")
        if state.is_main_process and cfg.overlap and cfg.local_llm:
            reporter.warn("warning: --overlap has no effect with --local_llm: the local LLM loads once the vision "
                          "model has left the GPU")
        check_only = sum(m.check_only for m in plan.to_combine)
        reporter.info(f"{len(plan.items)} images: {len(plan.to_generate)} to caption, "
                      f"{len(plan.to_combine) - check_only} to merge"
                      + (f", {check_only} to check only" if check_only else "")
                      + (f", split over {state.num_processes} processes" if state.num_processes > 1 else ""))
        if state.is_main_process:  # the plan, once: the others hold only its rows with work
            for line in plan_items(cfg, plan):
                reporter.detail(line)
        stop, stats = StopEvent(), Stats()
        if state.is_main_process:
            refinish(plan, stats, reporter)
            if cfg.write_captions:
                copy_for_trainers(cfg, plan, stats)
        with stop_on_signals(stop):
            try:
                stats.merge(run(cfg, plan, state, reporter, stop, count_tokens=count_tokens, work=work))
            except UsageError as e:  # the model cannot be loaded: nothing else can go on
                stats.fatal = str(e)
            stats.signal = stop.signal
            reporter.stopping(stop)
        code = finish(cfg, plan, state, stats, reporter, work)
        work.finished()
        return code
    finally:
        lock.release()


def prepare(cfg: Config, state, lock: DatasetLock, count_tokens: Callable[[str], int] | None
            ) -> tuple[Config, Plan | None, str | None]:
    """The main process, before any work: the lock, the one plan (or the dry run's report), preflight. Returns the
    Config with the model preflight found, the plan, and the error that stops the run, if any."""
    if not cfg.dry_run and (error := lock.acquire()):
        return cfg, None, error
    plan = plan_work(cfg, count_tokens)
    if not plan.items:
        return cfg, plan, no_images(cfg)
    if error := backend_switch(cfg, plan):
        return cfg, plan, error
    if cfg.dry_run:
        say("\n".join(dry_run_report(cfg, plan)))
        return cfg, plan, None
    # The lock is ours: no other run is writing these. A killed run's temporaries of its records (records.jsonl, tens
    # of MB at 200k images) are found by age: a review page writes its approvals there without the lock.
    for path in plan.stale + [p for p in plan.records.folder.glob(".*.tmp") if file_age(p) > 60]:
        with contextlib.suppress(OSError):
            path.unlink()
    try:
        checked = preflight(cfg, plan, state)
    except (FatalEndpointError, UsageError) as e:
        return cfg, plan, str(e)
    if checked.model != cfg.model:  # the merge settings name the model: judge the caches against the real one
        plan = plan_work(checked, count_tokens)
    if error := adopt_unrecorded(plan):
        warn_stderr(f"warning: {error}; they are adopted on a later run")
    return checked, plan, None


def finish(cfg: Config, plan: Plan, state, stats: Stats, reporter: Reporter, work: SharedWork) -> int:
    """Gather every process's Stats, print the summary, write the report and export. The main process's exit code
    is the run's; the others exit with their own (accelerate launch exits 1 if any process does not exit 0)."""
    plan.records.close()  # the journal is whole on disk before the main process folds it in
    stats = work.gather(stats, reporter.info)
    if not state.is_main_process:
        return stats.exit_code()
    stats.failures[:0] = plan.failures
    stats.account(plan)
    with contextlib.suppress(OSError):  # a folder that refuses it keeps the journals, read again next run
        plan.records.compact()
    if not stats.fatal:
        with contextlib.suppress(OSError):  # without it, the next run only tries the bad inputs again
            remember_failing(plan, stats, cfg.dataset_dir)
    for line in summary_lines(plan, stats):
        stream = sys.stderr if line.startswith(("FAILED", "error")) else sys.stdout
        try:
            say(line, stream)
        except BrokenPipeError:  # the reader went away (`| head`): the report and export are still written
            stream_closed(stream)
    if cfg.report:
        try:
            write_report(cfg.report, [*stats.failures, *stats.notes, *stats.flagged], report_summary(plan, stats))
        except OSError as e:  # the work is saved; only its record is missing, which a cron job must hear of
            say(f"error: cannot write the report {cfg.report}: {e.strerror or e}", sys.stderr)
            return max(stats.exit_code(), EXIT_USAGE)
    if cfg.export and not stats.fatal:
        count = write_export(cfg, plan, reporter.warn)
        reporter.info(f"exported {count} captions to {cfg.export}")
    return stats.exit_code()


def file_age(path: Path) -> float:
    """Seconds since the file was last written (0 when it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def stream_closed(stream) -> None:
    """The reader went away: the rest goes to /dev/null, so no later print or last flush prints a traceback."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def exit_process(code: int) -> None:
    """Once processes have met in a process group, skip the interpreter's teardown: a gloo thread that drops its
    last reference to a collective's tensors while the interpreter finalizes aborts the process (SIGABRT after a
    finished run, about one two-process CPU run in eight). Everything is written and closed by now."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    try:
        exit_code = main()
        sys.stdout.flush()  # here, not in the interpreter's teardown, where a closed pipe is a traceback
    except BrokenPipeError:  # --dry_run or --audit piped into `head`: end quietly, as a tool SIGPIPE ended would
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, ValueError):
                stream_closed(stream)
        exit_code = EXIT_CLOSED_PIPE
    exit_process(exit_code)
