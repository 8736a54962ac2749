#!/usr/bin/env python3
"""Throughput and memory benchmark of enhance_captions.py, measured side by side in one run.

    python bench/bench.py             # full run (~17 min on a 2-core CPU box)
    python bench/bench.py --quick     # smoke run (< 2 min)
    python bench/bench.py --only records          # records vs none, cached rerun of 20k images (~5 min)
    python bench/bench.py --quick --only rss,rerun  # any sections, comma-separated

Everything is built here, offline: a synthetic dataset of ~768 px noisy JPEGs, the tiny random-weight
Florence-2 of tests/tiny_models.py (or --model_id, or --florence_large_random on a GPU), and the loopback
OpenAI-compatible server of tests/llm_server.py. The script is driven through its own code (load_captioner,
plan_work, caption_locally, main) or as a subprocess; nothing in it is patched. Timers are wrapped around the
model and captioner objects for one profiled vision run, reported apart from the measurements the targets
apply to.

Measurements (each function below explains its own):

  vision     images/s of the vision stage at batch size 1 and at --batch_size (8), and of a bare loop that
             calls model.generate on already-decoded, already-preprocessed tensors at the same batch size:
             how close the pipeline gets to the model's own limit. Output length is fixed
             (min_new_tokens = max_new_tokens) so that every batch size does the same work per image.
  llm        requests/s of the LLM stage at --concurrency 16 and 1 against a server with 200 ms latency,
             vs the limit concurrency / latency, and vs a bare openai-client loop against the same server. Only
             the LLM stage runs: the generated captions exist and --model_id names no model at all.
  rpm        --rpm 30 with 45 requests: the most requests the server saw in any 60 s window (takes ~60 s).
  balance    two CPU processes under `accelerate launch`, merges only, --concurrency 1: 32 images whose first 16
             take 1 s each at the endpoint: first request to last answer against 16 s split by count and 8 s
             split perfectly, the slow merges each process took, and how far apart the two finished.
  overlap    --overlap vs phased, end to end (vision + LLM), the LLM latency chosen so both stages weigh alike.
  rss        peak RSS of the script's own process at 1,000 and 20,000 images: a fully cached rerun, and a run
             that plans work for every image (then stops where the model would load).
  rerun      wall time of a fully cached rerun over 10,000 images vs `python -c "import torch, transformers"`.
  served     images/s of the served vision stage (--vlm_base_url) over small RGB JPEGs within --vlm_max_side,
             vs a bare AsyncOpenAI loop at the same concurrency sending each file's own bytes, against one
             zero-latency loopback server in a child process; and the stage again where every image must be
             converted (--vlm_max_side below the photos' size).
  scale      (opt-in: --only scale) planning, a fully cached rerun and its peak RSS, and the first (adopting)
             run, at 50,000 and 100,000 images, projected linearly to 1,000,000; each rerun against the floor,
             the least work any correct rerun must do (FLOOR), side by side: wall time and memory per image.
  records    a fully cached rerun over 20,000 images with complete records: --refresh inputs (records read,
             every file hashed) vs --refresh none (no record read), alternating, medians of 5 rounds, as
             subprocesses and as plan_work alone; peak RSS with records at 1,000 and 20,000 images.

Results: a table on stdout, and JSON in bench/results/bench.json (and --out PATH).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "enhance_captions.py"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
SECRET_VARS = ("OPENAI_API_KEY", "OPENAI_BASE_URL")
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
for _key in SECRET_VARS:
    os.environ.pop(_key, None)

import enhance_captions as ec  # noqa: E402
from tests import tiny_models  # noqa: E402
from tests.llm_server import FakeLLMServer  # noqa: E402

SECTIONS = ("vision", "llm", "rpm", "balance", "overlap", "rss", "rerun", "served", "records", "scale")
OPT_IN = {"scale"}  # ~1M files on disk and ~15 minutes: run with --only scale
PHOTO_SIZES = ((768, 576), (576, 768), (768, 768), (768, 512))
MISSING_MODEL = "/nonexistent/no-model-here"  # a --model_id that cannot load: proves no model is loaded


# --------------------------------------------------------------------------------------------
# Sizes of one run
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sizes:
    images: int = 96            # vision stage images per measurement at batch size 1
    images_large_batch: int = 384  # ... at the large batch size
    repeats: int = 7            # vision stage: rounds of pipeline and bare loop back to back
    llm_items: int = 320        # LLM stage items at concurrency 16
    llm_items_serial: int = 48  # ... at concurrency 1 (the rate, not the count, is compared)
    overlap_images: int = 192
    rss_small: int = 1_000
    rss_large: int = 20_000
    rerun_images: int = 10_000
    rerun_repeats: int = 3
    served_images: int = 400    # served vision stage images per measurement
    served_repeats: int = 5     # ... rounds of stage and bare loop back to back
    records_small: int = 1_000
    records_large: int = 20_000
    records_repeats: int = 5
    scale_sizes: tuple = (50_000, 100_000)  # a cached rerun against the floor, projected to 1M from the two

    @classmethod
    def quick(cls) -> Sizes:
        return cls(images=32, images_large_batch=64, repeats=1, llm_items=160, llm_items_serial=16, overlap_images=32,
                   rss_small=1_000, rss_large=5_000, rerun_images=5_000, rerun_repeats=1, served_images=100,
                   served_repeats=1, records_large=2_000, records_repeats=3, scale_sizes=(2_000, 4_000))


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def make_photos(folder: Path, n: int, seed: int = 0, side: int = 768) -> list[Path]:
    """n JPEGs with a longest side of `side` px (several aspect ratios; ~200-300 KB at 768 px): smooth colour
    fields plus sensor-like noise, so that decoding costs about what a real photo costs (~3-5 ms at 768 px).
    Above 1024 px only 16 distinct images are drawn and the rest are copies (drawing a 12 MP one takes ~1 s)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    distinct = n if side <= 1024 else min(n, 16)
    paths = []
    for i in range(n):
        path = folder / f"photo{i:05d}.jpg"
        paths.append(path)
        if i >= distinct:
            shutil.copyfile(paths[i % distinct], path)
            continue
        width, height = (round(d * side / 768) for d in PHOTO_SIZES[i % len(PHOTO_SIZES)])
        field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(base + rng.normal(0, 18, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return paths


def link_photos(photos: list[Path], folder: Path, captions: bool = False) -> Path:
    """A fresh dataset folder holding (hard links to) the photos: no caches, nothing from an earlier run."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, photo in enumerate(photos):
        target = folder / photo.name
        try:
            os.link(photo, target)
        except OSError:
            shutil.copyfile(photo, target)
        if captions:
            target.with_suffix(".txt").write_text(f"subject{i}, a photo numbered {i}", encoding="utf-8")
    return folder


def tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_captioned_items(folder: Path, n: int, combined: bool = False, start: int = 0) -> None:
    """n tiny 8x8 PNGs, each with a manual caption and a generated caption (and the combined one if asked):
    only the LLM stage has work to do here (or nothing at all, when combined)."""
    png = tiny_png()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        stem = folder / f"img{i:05d}"
        stem.with_suffix(".png").write_bytes(png)
        stem.with_suffix(".txt").write_text(f"subject{i}, photo number {i}", encoding="utf-8")
        Path(f"{stem}{ec.GENERATED_SUFFIX}").write_text(
            f"a red cat number {i} sitting on a blue sofa in a sunlit room", encoding="utf-8")
        if combined:
            Path(f"{stem}{ec.COMBINED_SUFFIX}").write_text(
                f"subject{i}, a red cat sitting on a blue sofa in a sunlit room", encoding="utf-8")


def make_trees(root: Path, counts: list[int]) -> dict[int, Path]:
    """A folder of fully cached images for each size, side by side (root/a, root/b, ... smallest first): each a
    dataset of its own. (One folder nested in the next cost fewer files, but a run on a folder above a dataset with
    records of its own is refused.) One-letter names, as the nested folders had: a path's length and its parts are
    part of the memory per image (a cached rerun of 50,000 images in root/n50000 peaked 6 MB above root/x).
    Returns {count: folder}."""
    folders = {n: root / chr(ord("a") + i) for i, n in enumerate(sorted(set(counts)))}
    for n, folder in folders.items():
        make_captioned_items(folder, n, combined=True)
    return folders


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_florence2_large_random(path: Path, device, new_tokens: int) -> str:
    """A random-weight model with Florence-2-large's real sizes, saved to `path` for load_captioner.

    DaViT vision tower: depths [1, 1, 9, 1], embed dims [256, 512, 1024, 2048], heads and groups
    [8, 16, 32, 64], window 12, projection 1024, 768 x 768 input (577 image tokens). BART-large text side:
    d_model 1024, 12 encoder + 12 decoder layers, 16 heads, FFN 4096, vocabulary 51,289. Random weights
    generate junk, so the output length is fixed by the caller (min_new_tokens = max_new_tokens); the word-level
    tokenizer has as many entries as Florence-2's, so the LM head costs what the real one costs.
    """
    import torch
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, GenerationConfig, PreTrainedTokenizerFast)

    vocab_size = 51_289
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<image>"]
    vocab: dict[str, int] = {}
    for word in (*specials, *tiny_models.PROMPT_WORDS, *tiny_models.CAPTION_WORDS):
        vocab.setdefault(word, len(vocab))
    for i in range(vocab_size - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"})
    bos, pad, eos, unk = (tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>"))
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=vocab_size, d_model=1024, encoder_layers=12,
                         decoder_layers=12, encoder_attention_heads=16, decoder_attention_heads=16,
                         encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
                         bos_token_id=bos, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=eos,
                         forced_eos_token_id=eos),
        vision_config=dict(depths=[1, 1, 9, 1], embed_dim=[256, 512, 1024, 2048], num_heads=[8, 16, 32, 64],
                           num_groups=[8, 16, 32, 64], patch_size=[7, 3, 3, 3], patch_stride=[4, 2, 2, 2],
                           patch_padding=[3, 1, 1, 1], patch_prenorm=[False, True, True, True], window_size=12,
                           projection_dim=1024, drop_path_rate=0.0),
        image_token_id=image_token_id,
    )
    dtype = ec.resolve_dtype("auto", device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Florence2ForConditionalGeneration(config).to(dtype).eval()
    image_processor = CLIPImageProcessor(size={"height": 768, "width": 768}, crop_size={"height": 768, "width": 768},
                                         do_center_crop=False, resample=3,
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    with torch.inference_mode():
        probe = torch.zeros(1, 3, 768, 768, device=device, dtype=dtype)
        image_processor.image_seq_length = model.get_image_features(pixel_values=probe).pooler_output.shape[1]
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer, num_additional_image_tokens=0,
                                   post_processor_config=tiny_models.FLORENCE2_POST_PROCESSOR_CONFIG)
    # As the tiny builder: BOS is banned through bad_words_ids, since suppress_tokens would also mask the forced one.
    model.generation_config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens, bos_token_id=bos,
        eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=eos, forced_bos_token_id=bos,
        suppress_tokens=[pad, unk, image_token_id], bad_words_ids=[[bos]])
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    del model
    ec.release_memory()
    return str(path)


def resolve_model(args, workdir: Path, device) -> tuple[str, str]:
    """(model path or id, a name for the report)."""
    if args.florence_large_random:
        path = build_florence2_large_random(workdir / "florence2-large-random", device, args.new_tokens)
        return path, "Florence-2-large sizes, random weights"
    if args.model_id:
        return args.model_id, args.model_id
    return tiny_models.build_florence2(workdir / "florence2-tiny"), "tiny Florence-2 (tests/tiny_models.py)"


# --------------------------------------------------------------------------------------------
# Running the script
# --------------------------------------------------------------------------------------------


def run_main(argv: list[str]) -> tuple[int, str]:
    """ec.main in this process, its output captured; returns (exit code, output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = ec.main([str(a) for a in argv])
    return rc, out.getvalue()


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    env.update(OFFLINE_ENV)
    return env


# A small launcher process runs each measured command: Linux carries the high-water RSS of the process that
# spawns a child (vfork, then exec) into the child's ru_maxrss, so a child spawned straight from this benchmark,
# which holds torch and models, would report this benchmark's peak instead of its own.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=sys.stderr)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall": wall, "maxrss": usage.ru_maxrss,
                  "cpu": usage.ru_utime + usage.ru_stime}))
"""


def run_child(command: list[str], cwd: Path) -> tuple[int, float, int, str]:
    """Run a command as a fresh child of a small launcher; returns (exit code, wall seconds, peak RSS in bytes,
    its output tail). The peak RSS is ru_maxrss from wait4(): the command's own process over its whole life,
    interpreter shutdown included (and any children it waited for)."""
    report = child_report(command, cwd)
    return report["rc"], report["wall"], report["maxrss"], report["output"]


def child_report(command: list[str], cwd: Path) -> dict:
    """run_child's measurements as a dict, with the child's CPU time (user + system, from wait4) as "cpu"."""
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], cwd=cwd, env=child_env(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"launcher failed: {result.stderr[-2000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["maxrss"] *= 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return report | {"output": result.stderr[-2000:]}


# Runs the script's main() exactly as `python enhance_captions.py ARGS` would, then reports the peak RSS reached
# by the time main() returned, before the interpreter's shutdown (where torch's teardown alone adds ~100 MB).
MAIN_THEN_RSS = """
import importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("enhance_captions", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["enhance_captions"] = module
spec.loader.exec_module(module)
sys.argv = sys.argv[1:]
rc = module.main(sys.argv[1:])
sys.stdout.flush()
print(f"BENCH_MAIN_MAXRSS={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr, flush=True)
sys.exit(rc)
"""


def script_command(dataset: Path, server: FakeLLMServer, *extra: str, rss_marker: bool = False) -> list[str]:
    """`python enhance_captions.py` over `dataset`, no model to load, the loopback server as the endpoint."""
    python = [sys.executable, "-c", MAIN_THEN_RSS] if rss_marker else [sys.executable]
    return python + [str(SCRIPT), "--dataset_dir", str(dataset), "--model_id", MISSING_MODEL,
                     "--base_url", server.base_url, "--model", "test-model", "--quiet", *extra]


def main_peak(output: str) -> int:
    """The peak RSS (bytes) that MAIN_THEN_RSS printed."""
    value = [line for line in output.splitlines() if line.startswith("BENCH_MAIN_MAXRSS=")][-1].split("=")[1]
    return int(value) * (1 if sys.platform == "darwin" else 1024)


# --------------------------------------------------------------------------------------------
# Vision stage
# --------------------------------------------------------------------------------------------


def vision_config(model_id: str, folder: Path, batch_size: int, args) -> ec.Config:
    return ec.Config(dataset_dir=folder, model_id=model_id, batch_size=batch_size, num_workers=args.num_workers,
                     max_new_tokens=args.new_tokens, verbosity=0)


def fix_output_length(captioner: ec.LocalCaptioner, args) -> None:
    """Every caption exactly --new_tokens long, so batch sizes and runs do the same work per image."""
    captioner.generate_kwargs.update(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    if args.num_beams > 1:
        captioner.generate_kwargs["num_beams"] = args.num_beams


def time_vision_stage(captioner, photos: list[Path], folder: Path, cfg: ec.Config) -> dict:
    """One vision stage: caption_locally over a fresh folder (its Items from the script's own plan_work),
    with the script's DataLoader workers and its cache writer; the clock covers exactly caption_locally."""
    import torch

    link_photos(photos, folder)
    cfg = dataclasses.replace(cfg, dataset_dir=folder)
    items = ec.plan_work(cfg).to_generate
    stats, reporter, stop = ec.Stats(), ec.Reporter(0, True), threading.Event()
    progress = reporter.progress("vision", len(items))
    sync(torch)
    start = time.perf_counter()
    ec.caption_locally(items, captioner, cfg, stats, progress, reporter, stop, lambda item, text: None,
                       ec.claimed_chunks(len(items), cfg.batch_size))
    sync(torch)
    seconds = time.perf_counter() - start
    done = stats.counts[ec.STAGE_VISION]["done"]
    if done != len(items):
        problems = "; ".join(f.error for f in stats.failures[:3])
        raise RuntimeError(f"vision stage captioned {done}/{len(items)} images: {problems}")
    return {"seconds": seconds, "images": len(items), "images_per_s": len(items) / seconds, "started": start}


def sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def vision_side_by_side(captioner, photos, batches: list, workdir: Path, cfg: ec.Config, repeats: int) -> dict:
    """Vision stage images/s at cfg.batch_size and the bare generate loop's, measured in `repeats` rounds of one
    pipeline run and one bare run back to back (the order flips every round), after one warm-up run (first-call
    costs: lazy imports, kernel selection). A shared machine's speed drifts by up to 2x over seconds, so the
    two are compared within each round: pipeline_vs_bare is the median of the rounds' ratios. The median rates
    go with it; the best rate of each, and the ratio of the two bests, are reported too. Each round also times
    the bare loop at the torch threads the stage runs with (on a CPU it leaves cores to the decoding workers),
    next to the bare run, which keeps its place beside the pipeline run. `batches` are the bare loop's input
    (bare_batches of the same photos)."""
    time_vision_stage(captioner, photos[: cfg.batch_size * 2], workdir / "warmup", cfg)
    threads = stage_threads(captioner, cfg)
    runs, bare, bare_at_stage_threads = [], [], []
    for r in range(repeats):
        def pipeline_run():
            runs.append(time_vision_stage(captioner, photos, workdir / f"vision-bs{cfg.batch_size}-{r}", cfg))

        def bare_run():
            bare.append(bare_generate(captioner, batches, len(photos)))

        def bare_run_at_stage_threads():
            with ec.torch_threads_set(threads):
                bare_at_stage_threads.append(bare_generate(captioner, batches, len(photos)))

        order = (pipeline_run, bare_run, bare_run_at_stage_threads)
        for measure in order if r % 2 == 0 else reversed(order):
            measure()
    rates = [run["images_per_s"] for run in runs]
    ratios = [a / b for a, b in zip(rates, bare)]
    return {"pipeline": rate_summary(rates, len(photos)), "bare_generate": rate_summary(bare, len(photos)),
            "bare_generate_at_stage_threads": dict(rate_summary(bare_at_stage_threads, len(photos)),
                                                   threads=threads),
            "round_ratios": [round(x, 3) for x in ratios], "pipeline_vs_bare": statistics.median(ratios),
            "best_vs_best": max(rates) / max(bare)}


def rate_summary(rates: list[float], images: int) -> dict:
    return {"images": images, "images_per_s": statistics.median(rates), "best_images_per_s": max(rates),
            "runs_images_per_s": [round(x, 2) for x in rates]}


def bare_batches(captioner, photos: list[Path], batch_size: int) -> list:
    """The bare loop's input: every batch decoded (as the pipeline decodes it), preprocessed by the captioner's
    own prepare, and already on the device in the model's dtype."""
    import torch

    batches = []
    for i in range(0, len(photos), batch_size):
        images = [ec.load_image(p, min_side=captioner.decode_side) for p in photos[i:i + batch_size]]
        inputs, _ = captioner.prepare(images)
        batches.append(captioner.to_model(inputs))
    with torch.inference_mode():
        captioner.model.generate(**batches[0], **captioner.generate_kwargs)  # warm-up
    return batches


def bare_generate(captioner, batches: list, images: int) -> float:
    """The model's own limit at this batch size, in images/s: model.generate in a plain loop over prepared
    batches, with the same generate kwargs. No decoding, no post-processing, no file writes."""
    import torch

    with torch.inference_mode():
        sync(torch)
        start = time.perf_counter()
        for inputs in batches:
            captioner.model.generate(**inputs, **captioner.generate_kwargs)
        sync(torch)
    return images / (time.perf_counter() - start)


def feeding_cost(captioner, photos: list[Path], batch_size: int) -> dict:
    """CPU cost of feeding the model, per image, in one thread: decoding in full, decoding as the pipeline does
    (JPEGs at reduced scale down to the processor's size, when it has one) and preprocessing (prepare)."""
    sample = photos[: max(batch_size, 16)]

    def per_image(fn) -> tuple[float, list]:
        start = time.perf_counter()
        out = [fn(p) for p in sample]
        return (time.perf_counter() - start) / len(sample), out

    full, _ = per_image(ec.load_image)
    reduced, images = per_image(lambda p: ec.load_image(p, min_side=captioner.decode_side))
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        captioner.prepare(images[i:i + batch_size])
    prepare = (time.perf_counter() - start) / len(images)
    return {"decode_side": captioner.decode_side, "decode_full_ms": full * 1000, "decode_ms": reduced * 1000,
            "prepare_ms": prepare * 1000, "one_worker_images_per_s": 1 / (reduced + prepare)}


class Timer:
    """Wraps a callable and adds up the seconds spent in it, by the wall clock and in CPU time of the calling
    thread (a thread that waits for a core, or for the GIL, adds wall time but no CPU time); remembers when it
    was first called."""

    def __init__(self, fn):
        self.fn, self.seconds, self.cpu_seconds, self.calls, self.first_call = fn, 0.0, 0.0, 0, None

    def __call__(self, *a, **kw):
        import torch

        start, cpu_start = time.perf_counter(), time.thread_time()
        self.first_call = self.first_call or start
        try:
            result = self.fn(*a, **kw)
            sync(torch)
            return result
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.thread_time() - cpu_start
            self.calls += 1

    def per_call_ms(self) -> dict:
        calls = max(1, self.calls)
        return {"wall_ms": round(self.seconds * 1000 / calls, 2), "cpu_ms": round(self.cpu_seconds * 1000 / calls, 2)}


def vision_profile(captioner, photos, batches: list, workdir: Path, cfg: ec.Config) -> dict:
    """Where one vision stage's time goes: in model.generate, in the rest of captioner.caption (moving inputs
    to the device, batch_decode, post_process_generation), and outside caption (waiting for the DataLoader to
    hand over the next batch, bookkeeping, queuing cache writes). Of the last, first_batch_s is the one-off
    wait for the first batch (starting the DataLoader workers, decoding and preprocessing one batch), a cost
    that does not grow with the dataset; steady_images_per_s is the rate with that wait left out, and
    between_batches_ms the rest of outside caption per later batch (mostly receiving it from a worker).
    generate_per_batch compares one model.generate call in that stage with one in the bare loop right after
    it (over `batches`, the bare_batches of the same photos), at the stage's torch threads: wall and CPU time of
    the calling thread, per batch."""
    caption, generate = Timer(captioner.caption), Timer(captioner.model.generate)
    captioner.caption, captioner.model.generate = caption, generate
    try:
        run = time_vision_stage(captioner, photos, workdir / "vision-profile", cfg)
    finally:
        del captioner.caption, captioner.model.generate  # the instance attributes go, the methods remain
    bare = Timer(captioner.model.generate)
    captioner.model.generate = bare
    try:
        with ec.torch_threads_set(stage_threads(captioner, cfg)):
            bare_generate(captioner, batches, len(photos))
    finally:
        del captioner.model.generate
    total = run["seconds"]
    parts = {"generate_s": generate.seconds, "caption_other_s": caption.seconds - generate.seconds,
             "outside_caption_s": total - caption.seconds}
    first = caption.first_call - run["started"]
    steady = run["images"] / (total - first)
    between = (parts["outside_caption_s"] - first) / max(1, caption.calls - 1)
    return {"stage_s": total, "batches": caption.calls, "first_batch_s": round(first, 3),
            "steady_images_per_s": steady, "between_batches_ms": round(between * 1000, 2),
            "generate_per_batch": {"stage": generate.per_call_ms(), "bare": bare.per_call_ms()},
            **{k: round(v, 3) for k, v in parts.items()},
            **{k.replace("_s", "_share"): round(v / total, 3) for k, v in parts.items()}}


def measure_vision(args, sizes: Sizes, workdir: Path, device, model_id: str) -> dict:
    """Vision stage at batch size 1 and at the large batch size, vs the bare generate loop at each. The large
    batch size gets more images, so that a run lasts seconds and the one-off start of the DataLoader workers
    weighs on it as little as it does on a real dataset."""
    small, large = args.batch_sizes
    photos = make_photos(workdir / "photos", max(sizes.images, sizes.images_large_batch), side=args.photo_side)
    count = {small: sizes.images, large: max(sizes.images_large_batch, large * 2)}
    cfg = vision_config(model_id, workdir / "unused", large, args)
    captioner = ec.load_captioner(cfg, device)
    fix_output_length(captioner, args)
    out: dict = {"images": count, "new_tokens": args.new_tokens, "num_workers": args.num_workers,
                 "batch_sizes": [small, large], "torch_threads": torch_threads()}
    batches = {bs: bare_batches(captioner, photos[:count[bs]], bs) for bs in (small, large)}
    for bs in (small, large):
        out[f"bs{bs}"] = vision_side_by_side(captioner, photos[:count[bs]], batches[bs], workdir,
                                             dataclasses.replace(cfg, batch_size=bs), sizes.repeats)
    out["batch_speedup"] = out[f"bs{large}"]["pipeline"]["images_per_s"] / out[f"bs{small}"]["pipeline"]["images_per_s"]
    out["profile"] = vision_profile(captioner, photos[:count[large]], batches[large], workdir, cfg)
    out["feeding"] = feeding_cost(captioner, photos, large)
    del captioner
    ec.release_memory()
    return out


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def stage_threads(captioner, cfg: ec.Config) -> int:
    """The torch threads the script's vision stage runs with (it leaves a CPU's cores to the decoding workers)."""
    return ec.model_threads(captioner.model.device, cfg.num_workers, torch_threads())


# --------------------------------------------------------------------------------------------
# LLM stage
# --------------------------------------------------------------------------------------------


def llm_stage(workdir: Path, name: str, n: int, concurrency: int, latency: float, *extra: str) -> dict:
    """LLM stage only: n items whose generated captions exist, run through ec.main with a --model_id that does
    not exist (so the run succeeds only if no model is loaded). The rate is n over the time from the first chat
    request reaching the server to ec.main returning: it leaves out startup and planning, keeps every request,
    every cache write and the stage's shutdown."""
    folder = workdir / name
    if folder.exists():
        shutil.rmtree(folder)
    make_captioned_items(folder, n)
    with FakeLLMServer(latency=latency) as server:
        rc, output = run_main(["--dataset_dir", folder, "--model_id", MISSING_MODEL, "--base_url", server.base_url,
                               "--model", "test-model", "--concurrency", concurrency, "--quiet", *extra])
        end = time.monotonic()  # the server's clock
        times = sorted(server.request_times)
        requests, in_flight = len(server.requests), server.max_in_flight
    combined = sum(1 for _ in folder.glob(f"*{ec.COMBINED_SUFFIX}"))
    if rc != 0 or combined != n:
        raise RuntimeError(f"LLM stage run failed (exit {rc}, {combined}/{n} merged): {output[-1000:]}")
    seconds = end - times[0]
    return {"items": n, "requests": requests, "concurrency": concurrency, "latency_s": latency,
            "seconds": seconds, "requests_per_s": n / seconds, "max_in_flight": in_flight, "request_times": times}


def bare_client(n: int, concurrency: int, latency: float) -> dict:
    """The LLM side's own limit on this machine: the same openai client in a plain asyncio loop, `concurrency`
    workers sending the script's kind of request (its system prompt, a user turn of the same shape, its default
    max_tokens and temperature) to the same loopback server. No limiter, no retries, no files."""
    import asyncio

    import openai

    system = ec.read_prompt_file(ec.DEFAULT_SYSTEM_PROMPT, "system prompt")
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": ec.build_user_message("subject1, photo number 1",
                                                                  "a red cat sitting on a blue sofa in a sunlit room")}]

    async def run(url: str) -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="not-needed", max_retries=0)
        todo = list(range(n))

        async def worker() -> None:
            while todo:
                todo.pop()
                await client.chat.completions.create(model="test-model", messages=messages, max_tokens=512,
                                                     temperature=0.3)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await client.close()

    with FakeLLMServer(latency=latency) as server:
        asyncio.run(run(server.base_url))
        seconds = time.monotonic() - min(server.request_times)
    return {"items": n, "concurrency": concurrency, "seconds": seconds, "requests_per_s": n / seconds}


def measure_llm(sizes: Sizes, workdir: Path, latency: float = 0.2, concurrency: int = 16) -> dict:
    """Requests/s at --concurrency 16 and 1 against 200 ms of server latency, vs the limit concurrency/latency,
    and vs a bare openai-client loop at concurrency 16 (what the client and server manage here without the script)."""
    wide = llm_stage(workdir, "llm-c16", sizes.llm_items, concurrency, latency)
    serial = llm_stage(workdir, "llm-c1", sizes.llm_items_serial, 1, latency)
    bare = bare_client(sizes.llm_items, concurrency, latency)
    # Beyond the targets: at concurrency 64 the event loop's own work per request starts to show.
    busy = llm_stage(workdir, "llm-c64", sizes.llm_items * 2, 64, latency)
    busy["bare_client_requests_per_s"] = bare_client(sizes.llm_items * 2, 64, latency)["requests_per_s"]
    limit = concurrency / latency
    for run in (wide, serial, busy):
        run.pop("request_times")
    return {"concurrency": wide, "serial": serial, "bare_client": bare, "c64": busy, "limit_requests_per_s": limit,
            "fraction_of_limit": wide["requests_per_s"] / limit,
            "fraction_of_bare_client": wide["requests_per_s"] / bare["requests_per_s"],
            "speedup_vs_serial": wide["requests_per_s"] / serial["requests_per_s"]}


def max_in_window(times: list[float], window: float) -> int:
    """The most timestamps inside any half-open window [t, t + window)."""
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def measure_rpm(workdir: Path, rpm: int = 30, n: int = 45) -> dict:
    """--rpm 30, 45 requests, --concurrency 16, no latency: the first 30 go at once, the other 15 must wait for
    the first ones to leave the 60 s window. Reports the most requests the server saw in any 60 s window, and
    the shortest time spanned by rpm + 1 consecutive requests (must be >= 60 s)."""
    run = llm_stage(workdir, "llm-rpm", n, 16, 0.0, "--rpm", rpm)
    times = run.pop("request_times")
    spans = [times[i + rpm] - times[i] for i in range(len(times) - rpm)]
    return {"rpm": rpm, "requests": n, "seconds": run["seconds"],
            "max_in_any_60s_window": max_in_window(times, ec.WINDOW_SECONDS),
            "min_span_of_rpm_plus_1_s": min(spans) if spans else None}


def measure_balance(workdir: Path, n: int = 32, slow: int = 16, seconds: float = 1.0) -> dict:
    """Work taken as it goes across processes: two CPU processes (gloo) merge n items, one request at a time each
    (so each keeps one connection, which names it), the first `slow` in sorted order taking `seconds` at the
    endpoint. Split by count one process would take every slow merge: slow * seconds from first request to last
    answer; split perfectly, half that."""
    import re

    folder = workdir / "balance"
    shutil.rmtree(folder, ignore_errors=True)
    make_captioned_items(folder, n)
    ends: dict[int, float] = {}

    def reply(body):
        subject = int(re.search(r"subject(\d+),", body["messages"][-1]["content"]).group(1))
        if subject < slow:
            time.sleep(seconds)
        ends[subject] = time.monotonic()
        return f"merged caption {subject}"

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                "0", str(SCRIPT), "--dataset_dir", str(folder), "--model_id", MISSING_MODEL, "--concurrency", "1",
                "--model", "test-model", "--quiet"]
    with FakeLLMServer(reply=reply) as server:
        result = subprocess.run(launcher + ["--base_url", server.base_url], capture_output=True, text=True,
                                env=child_env() | {"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""})
        subjects = [int(re.search(r"subject(\d+),", r["messages"][-1]["content"]).group(1))
                    for r in server.chat_requests()]
        starts, peers = list(server.request_times), list(server.peers)
    if result.returncode != 0 or sorted(subjects) != list(range(n)):
        raise RuntimeError(f"balance run failed (exit {result.returncode}): {result.stderr[-1000:]}")
    by_process: dict[tuple, list[int]] = {}
    for subject, peer in zip(subjects, peers):
        by_process.setdefault(peer, []).append(subject)
    firsts = [min(t for t, p in zip(starts, peers) if p == peer) for peer in by_process]
    lasts = [max(ends[s] for s in mine) for mine in by_process.values()]
    return {"images": n, "slow": slow, "seconds": seconds, "span_s": max(ends.values()) - min(starts),
            "by_count_s": slow * seconds, "balanced_s": slow * seconds / 2,
            "slow_per_process": [sum(s < slow for s in mine) for mine in by_process.values()],
            "second_started_later_s": max(firsts) - min(firsts), "finished_apart_s": max(lasts) - min(lasts)}


# --------------------------------------------------------------------------------------------
# Overlap vs phased, end to end
# --------------------------------------------------------------------------------------------


def end_to_end(photos, workdir: Path, name: str, model_id: str, latency: float, args, overlap: bool) -> dict:
    """One whole run through ec.main: load the model, caption, merge (fresh folder, no caches)."""
    folder = link_photos(photos, workdir / name, captions=True)
    with FakeLLMServer(latency=latency) as server:
        argv = ["--dataset_dir", folder, "--model_id", model_id, "--base_url", server.base_url, "--model", "test-model",
                "--batch_size", args.batch_sizes[1], "--num_workers", args.num_workers,
                "--max_new_tokens", args.new_tokens, "--concurrency", 16, "--quiet"]
        start = time.perf_counter()
        rc, output = run_main(argv + (["--overlap"] if overlap else []))
        seconds = time.perf_counter() - start
        requests = len(server.requests)
    if rc != 0 or requests != len(photos):
        raise RuntimeError(f"end-to-end run failed (exit {rc}, {requests} requests): {output[-1000:]}")
    return {"seconds": seconds, "images": len(photos)}


def measure_overlap(args, sizes: Sizes, workdir: Path, model_id: str, vision_rate: float | None) -> dict:
    """--overlap vs phased end to end. The LLM latency is set so that the LLM stage (n * latency / 16) takes
    about as long as the vision stage (n / vision images/s): phased costs about their sum, overlap about the
    larger of the two, so the best possible speedup is close to 2x (less the model load, which both pay)."""
    photos = make_photos(workdir / "photos-e2e", sizes.overlap_images, seed=1, side=args.photo_side)
    if vision_rate is None:  # the vision section did not run: measure the stage once
        cfg = vision_config(model_id, workdir / "unused", args.batch_sizes[1], args)
        captioner = ec.load_captioner(cfg, args.device_obj)
        vision_rate = time_vision_stage(captioner, photos, workdir / "e2e-probe", cfg)["images_per_s"]
        del captioner
    latency = min(max(16 / vision_rate, 0.02), 5.0)
    phased = end_to_end(photos, workdir, "e2e-phased", model_id, latency, args, overlap=False)
    overlapped = end_to_end(photos, workdir, "e2e-overlap", model_id, latency, args, overlap=True)
    vision_s = len(photos) / vision_rate
    llm_s = len(photos) * latency / 16
    return {"images": len(photos), "llm_latency_s": round(latency, 3), "est_vision_stage_s": vision_s,
            "est_llm_stage_s": llm_s, "phased_s": phased["seconds"], "overlap_s": overlapped["seconds"],
            "speedup": phased["seconds"] / overlapped["seconds"],
            "saved_s": phased["seconds"] - overlapped["seconds"], "max_saving_s": min(vision_s, llm_s)}


# --------------------------------------------------------------------------------------------
# Memory and the cached rerun
# --------------------------------------------------------------------------------------------


def measure_rss(sizes: Sizes, tree: dict[int, Path], workdir: Path) -> dict:
    """Peak RSS of the script's own process, one fresh child per measurement, at two dataset sizes:
      cached    a fully cached rerun (every _generated and _combined cache present): plans, finds nothing to do;
      planning  --overwrite all over the same images: plans a caption and a merge for every image, then stops at
                the preflight, before any model loads (--model_id names no model; exit 2).
    Two peaks each: through main() (what the run holds: imports, the plan, the Items; the targets use this one),
    and of the whole process (wait4), interpreter shutdown included, where torch's teardown briefly adds
    ~100 MB and can hide the plan's growth. The growth between the sizes is what the plan and Items cost."""
    out: dict = {}
    with FakeLLMServer() as server:
        for mode, extra, expected in (("cached", (), 0), ("planning", ("--overwrite", "all"), 2)):
            for n in (sizes.rss_small, sizes.rss_large):
                rc, wall, peak, output = run_child(script_command(tree[n], server, *extra, rss_marker=True), workdir)
                if rc != expected or (mode == "planning" and "--model_id: no such folder" not in output):
                    raise RuntimeError(f"{mode} run over {n} images: exit {rc} (expected {expected}): {output}")
                out[f"{mode}_{n}"] = {"peak_rss_mb": main_peak(output) / 2**20, "process_peak_rss_mb": peak / 2**20,
                                      "seconds": wall}
            for key in ("peak_rss_mb", "process_peak_rss_mb"):
                out[f"{mode}_growth_{key.replace('peak_rss_', '')}"] = (
                    out[f"{mode}_{sizes.rss_large}"][key] - out[f"{mode}_{sizes.rss_small}"][key])
        out["chat_requests_sent"] = len(server.requests)  # must stay 0: nothing was merged
    _, _, peak, _ = run_child([sys.executable, "-c", "import torch, transformers"], workdir)
    out["import_torch_transformers_mb"] = peak / 2**20
    return out


def record_tree(tree: dict[int, Path]) -> None:
    """Each folder of the tree is a dataset of its own: one run per folder adopts and records its
    caches (no request, no model), so that the rss and rerun sections measure a cached rerun, not an adopting one."""
    with FakeLLMServer() as server:
        for n, folder in sorted(tree.items()):
            rc, output = run_main(["--dataset_dir", folder, "--model_id", MISSING_MODEL, "--base_url",
                                   server.base_url, "--model", "test-model", "--quiet"])
            if rc != 0 or "adopted: 0 (none)" in output:
                raise RuntimeError(f"adopting the caches under {folder} failed (exit {rc}): {output[-2000:]}")


def measure_rerun(sizes: Sizes, tree: dict[int, Path], workdir: Path) -> dict:
    """Wall time of a fully cached rerun over `rerun_images` images (a fresh `python enhance_captions.py`),
    vs a bare `python -c "import torch, transformers"`; best of `rerun_repeats` each. The difference is what
    the script spends beyond importing its libraries: its own imports, walking and reading 3 files per image."""
    baseline = [run_child([sys.executable, "-c", "import torch, transformers"], workdir)[1]
                for _ in range(sizes.rerun_repeats)]
    with FakeLLMServer() as server:
        reruns = []
        for _ in range(sizes.rerun_repeats):
            rc, wall, _, output = run_child(script_command(tree[sizes.rerun_images], server), workdir)
            if rc != 0 or f"{sizes.rerun_images} from cache" not in output:
                raise RuntimeError(f"cached rerun failed (exit {rc}): {output}")
            reruns.append(wall)
    return {"images": sizes.rerun_images, "rerun_s": min(reruns), "import_torch_transformers_s": min(baseline),
            "ratio": min(reruns) / min(baseline), "extra_s": min(reruns) - min(baseline),
            "rerun_runs_s": [round(s, 3) for s in reruns], "import_runs_s": [round(s, 3) for s in baseline]}


# --------------------------------------------------------------------------------------------
# Served vision stage
# --------------------------------------------------------------------------------------------


# The fake server in a child process of its own, so that its request handling does not take the benchmark's GIL.
# It forgets the requests (~150 KB each) whenever it is asked how many it has seen since the last time.
SERVER_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from tests.llm_server import FakeLLMServer
with FakeLLMServer(latency=0.0) as server:
    print(server.base_url, flush=True)
    for _ in sys.stdin:
        with server._lock:
            seen = len(server.requests)
            for records in (server.requests, server.headers, server.request_times, server.peers):
                records.clear()
        print(seen, flush=True)
"""


@contextlib.contextmanager
def server_child():
    """A zero-latency FakeLLMServer in a child process: yields (base_url, a function returning the number of chat
    requests it saw since it was last called)."""
    child = subprocess.Popen([sys.executable, "-c", SERVER_CHILD, str(ROOT)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        url = child.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the fake server did not start: {url!r}")

        def seen() -> int:
            child.stdin.write("\n")
            child.stdin.flush()
            return int(child.stdout.readline())
        yield url, seen
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def served_config(folder: Path, url: str, concurrency: int, max_side: int) -> ec.Config:
    return ec.Config(dataset_dir=folder, vlm_base_url=(url,), vlm_api_keys=(None,), vlm_model="test-model",
                     vlm_max_side=max_side, concurrency=concurrency, verbosity=0)


def time_served_stage(items: list, cfg: ec.Config, state) -> tuple[float, float]:
    """(images/s, CPU ms per image in this process) of the script's caption_served over `items` (its Items from
    plan_work, its own event loop thread, client, limiter, retries and conversion threads); the captions are thrown
    away, as time_vision_stage does."""
    stats, stop = ec.Stats(), ec.StopEvent()
    progress = ec.Reporter(0, True).progress("vision", len(items))
    events = ec.EventLoopThread(stop)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        ec.caption_served(cfg, state, events, items, stats, progress, stop, lambda item, text: None)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        events.close()
    done = stats.counts[ec.STAGE_VISION]["done"]
    if done != len(items):
        problems = "; ".join(f.error for f in stats.failures[:3])
        raise RuntimeError(f"served vision stage captioned {done}/{len(items)} images: {problems}")
    return len(items) / seconds, cpu * 1000 / len(items)


def bare_served(photos: list[Path], url: str, concurrency: int, max_tokens: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the least a client can do: one AsyncOpenAI client, `concurrency` workers, each reading a file
    and sending its own bytes as a data URL with the script's default prompt. No limiter, retries or threads."""
    import asyncio
    import base64

    import openai

    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="not-needed", max_retries=0)
        todo = list(photos)

        async def worker() -> None:
            while todo:
                data = todo.pop().read_bytes()
                image = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
                await client.chat.completions.create(
                    model="test-model", max_tokens=max_tokens, temperature=0.0,
                    messages=[{"role": "user", "content": [{"type": "text", "text": ec.DEFAULT_CHAT_PROMPT},
                                                           {"type": "image_url", "image_url": {"url": image}}]}])
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await client.close()

    start, cpu = time.perf_counter(), time.process_time()
    asyncio.run(run())
    return len(photos) / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / len(photos)


def measure_served(sizes: Sizes, workdir: Path, concurrency: int = 64, max_side: int = 1024,
                   small_side: int = 256) -> dict:
    """The served vision stage over small RGB JPEGs within --vlm_max_side (512 px, ~100 KB: each goes as it is)
    vs the bare AsyncOpenAI loop, at --concurrency 64, against one zero-latency server: what the stage costs on
    top of the client itself. After one warm-up of each, `served_repeats` rounds of stage, bare loop and the
    stage at --vlm_max_side 256 (every image converted: the conversion pool's rate) back to back, the order
    flipping every round; served_vs_bare is the median of the rounds' ratios. Each run's CPU time per image in
    this process (the server's is its own) is reported too: on a machine shared with other work it drifts less
    than the rates do. The server is asked after each run how many requests it saw: exactly one per image."""
    folder = workdir / "served"
    if folder.exists():
        shutil.rmtree(folder)
    photos = make_photos(folder, sizes.served_images, seed=3, side=512)
    state = ec.make_state()
    with server_child() as (url, seen):
        cfg = served_config(folder, url, concurrency, max_side)
        converting = served_config(folder, url, concurrency, small_side)
        items = ec.plan_work(cfg).to_generate
        stage, bare, converted = [], [], []  # (images/s, CPU ms per image) of each run

        def counted(runs: list, fn) -> None:
            runs.append(fn())
            if seen() != len(photos):
                raise RuntimeError("the server did not see one request per image")

        def stage_run():
            counted(stage, lambda: time_served_stage(items, cfg, state))

        def bare_run():
            counted(bare, lambda: bare_served(photos, url, concurrency, cfg.max_new_tokens))

        def converted_run():
            counted(converted, lambda: time_served_stage(items, converting, state))

        stage_run(), bare_run()  # warm-up: imports, the client's first connections
        stage.clear(), bare.clear()
        for r in range(sizes.served_repeats):
            order = (stage_run, bare_run, converted_run)
            for measure in order if r % 2 == 0 else reversed(order):
                measure()
    def summary(runs: list, **extra) -> dict:
        cpu = [c for _, c in runs]
        return dict(rate_summary([r for r, _ in runs], len(photos)), cpu_ms_per_image=statistics.median(cpu),
                    runs_cpu_ms_per_image=[round(c, 2) for c in cpu], **extra)

    ratios = [a[0] / b[0] for a, b in zip(stage, bare)]
    return {"images": len(photos), "photo_bytes": sum(p.stat().st_size for p in photos) // len(photos),
            "concurrency": concurrency, "max_side": max_side, "stage": summary(stage), "bare_client": summary(bare),
            "converted": summary(converted, max_side=small_side),
            "round_ratios": [round(x, 3) for x in ratios], "served_vs_bare": statistics.median(ratios),
            "cpu_bare_vs_stage": statistics.median(b[1] / a[1] for a, b in zip(stage, bare))}


# --------------------------------------------------------------------------------------------
# Records: a cached rerun that reads them and hashes every file, vs one that trusts every cache
# --------------------------------------------------------------------------------------------


class CountingServer(FakeLLMServer):
    """The loopback server, counting every connection made to it (the preflight's GET /models included)."""

    connections = 0

    def _track(self, conn, add: bool) -> None:
        if add:
            self.connections += 1
        super()._track(conn, add)


def make_recorded_folder(folder: Path, n: int, server: FakeLLMServer) -> dict:
    """n fully cached images (manual caption, _generated.txt, _combined.txt) with complete records, made by the
    script itself: the caches are written as an earlier version left them, then one run with --refresh inputs
    adopts and records every one of them (no request, no model), and folds its journal into records.jsonl."""
    if folder.exists():
        shutil.rmtree(folder)
    make_captioned_items(folder, n, combined=True)
    t = time.perf_counter()
    rc, output = run_main(["--dataset_dir", folder, "--model_id", MISSING_MODEL, "--base_url", server.base_url,
                           "--model", "test-model", "--refresh", "inputs"])
    seconds = time.perf_counter() - t
    if rc != 0 or f"adopted: {2 * n} ({n} combined, {n} generated)" not in output:
        raise RuntimeError(f"adopting {n} caches failed (exit {rc}): {output[-2000:]}")
    records = ec.Records(folder).load()
    journals = records.journals()
    if len(records.latest) != 2 * n or journals or not (records.folder / ec.RECORDS_FILE).exists():
        raise RuntimeError(f"{folder}: {len(records.latest)} records for {2 * n} caches, {len(journals)} journals")
    return {"adopt_run_s": seconds, "records": len(records.latest),
            "records_bytes": (records.folder / ec.RECORDS_FILE).stat().st_size}


def cached_rerun(folder: Path, n: int, server: FakeLLMServer, refresh: str, workdir: Path,
                 rss_marker: bool = False) -> dict:
    """One fully cached rerun as a fresh `python enhance_captions.py --refresh REFRESH`; child_report's dict.
    It must find every cache current: nothing to caption, to merge, to adopt, nothing kept as a hand edit."""
    report = child_report(script_command(folder, server, "--refresh", refresh, rss_marker=rss_marker), workdir)
    rc, output = report["rc"], report["output"]
    current = (f"vision: 0 done, {n} from cache, 0 failed", f"llm: 0 done, {n} from cache, 0 failed",
               "edited by hand (kept): 0 (none)", "adopted: 0 (none)")
    if rc != 0 or not all(line in output for line in current):
        raise RuntimeError(f"cached rerun --refresh {refresh} over {n} images failed (exit {rc}): {output}")
    return report


def time_plan_work(folder: Path, server: FakeLLMServer, refresh: str) -> tuple[float, float, float]:
    """ec.plan_work alone, in this process, on the Config the command line makes; (seconds, CPU seconds, and
    Records.load's seconds, timed apart after it)."""
    argv = ["--dataset_dir", folder, "--model_id", MISSING_MODEL, "--base_url", server.base_url,
            "--model", "test-model", "--quiet", "--refresh", refresh]
    cfg = ec.config_from_args(ec.build_parser().parse_args([str(a) for a in argv]))
    start, cpu = time.perf_counter(), time.process_time()
    plan = ec.plan_work(cfg)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if plan.to_generate or plan.to_combine or plan.adopt or plan.failures:
        raise RuntimeError(f"plan_work --refresh {refresh}: {len(plan.to_generate)} to caption, "
                           f"{len(plan.to_combine)} to merge, {len(plan.adopt)} to adopt, {len(plan.failures)} failed")
    start = time.perf_counter()
    if refresh != "none":
        ec.Records(cfg.dataset_dir).load()
    return seconds, cpu, time.perf_counter() - start


# The least work any correct cached rerun must do: import the libraries a rerun imports, walk the folder, stat each
# image, read and hash each caption and cache file, and parse the records. Prints its RSS after the imports (the
# baseline that memory per image is measured above) and its counts, so the floor is known to have done the work.
FLOOR = """
import hashlib, json, os, resource, sys
import torch, accelerate  # what a cached rerun imports (it loads no model and sends no request)
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
images = texts = 0
def walk(folder):
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from walk(entry.path)
        else:
            yield entry
for entry in walk(sys.argv[1]):
    if entry.name.endswith((".png", ".jpg", ".jpeg", ".webp")):
        entry.stat()
        images += 1
    elif entry.name.endswith(".txt"):
        with open(entry.path, "rb") as f:
            hashlib.sha256(f.read()).hexdigest()
        texts += 1
with open(os.path.join(sys.argv[1], ".enhance_captions", "records.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
print(f"FLOOR images={images} texts={texts} records={len(records)} imported_maxrss={imported}", file=sys.stderr)
"""


def measure_floor(folder: Path, n: int, workdir: Path) -> dict:
    """FLOOR as a fresh child: its wall time, peak RSS and RSS after the imports."""
    report = child_report([sys.executable, "-c", FLOOR, str(folder)], workdir)
    line = [x for x in report["output"].splitlines() if x.startswith("FLOOR ")]
    if report["rc"] != 0 or not line:
        raise RuntimeError(f"the floor over {folder} failed: {report['output']}")
    counts = dict(field.split("=") for field in line[-1].split()[1:])
    if int(counts["images"]) != n or int(counts["texts"]) != 3 * n:
        raise RuntimeError(f"the floor found {counts} for {n} images")
    unit = 1 if sys.platform == "darwin" else 1024
    return {"wall": report["wall"], "peak_rss_mb": report["maxrss"] / 2**20,
            "imported_rss_mb": int(counts["imported_maxrss"]) * unit / 2**20}


def measure_scale(sizes: Sizes, workdir: Path) -> dict:
    """Planning and a fully cached rerun at two large sizes (a folder each, as the rss section builds them), and a
    linear projection to 1,000,000 images from the two:
      adopt    the first run over caches without records: plans every image and records 2 caches each;
      plan     ec.plan_work alone, in this process, with the records (wall and CPU);
      rerun    a fresh `python enhance_captions.py` over the recorded folder: wall time and peak RSS (main()).
    Linear means the per-image cost at the large size is close to that at the small one."""
    small, large = sizes.scale_sizes
    tree = make_trees(workdir / "scale-tree", [small, large])
    out: dict = {}
    with FakeLLMServer() as server:
        for n in (small, large):
            folder = tree[n]
            start = time.perf_counter()
            rc, output = run_main(["--dataset_dir", folder, "--model_id", MISSING_MODEL, "--base_url",
                                   server.base_url, "--model", "test-model", "--quiet"])
            adopt = time.perf_counter() - start
            if rc != 0 or f"adopted: {2 * n}" not in output:
                raise RuntimeError(f"adopting {n} images failed (exit {rc}): {output[-2000:]}")
            seconds, cpu, load = time_plan_work(folder, server, "inputs")
            floors, reruns = [], []
            for _ in range(3):  # alternating, medians: the two are compared as a ratio on a noisy machine
                floors.append(measure_floor(folder, n, workdir))
                reruns.append(cached_rerun(folder, n, server, "inputs", workdir, rss_marker=True))
            floor = min(floors, key=lambda f: f["wall"])
            rerun_s = statistics.median(r["wall"] for r in reruns)
            floor_s = statistics.median(f["wall"] for f in floors)
            peak = statistics.median(main_peak(r["output"]) for r in reruns) / 2**20
            out[str(n)] = {"adopt_s": adopt, "plan_work_s": seconds, "plan_work_cpu_s": cpu, "records_load_s": load,
                           "rerun_s": rerun_s, "rerun_peak_rss_mb": peak, "floor_s": floor_s,
                           "rerun_vs_floor": statistics.median(r["wall"] / f["wall"] for r, f in zip(reruns, floors)),
                           "floor_imported_rss_mb": floor["imported_rss_mb"],
                           "kb_per_image": (peak - floor["imported_rss_mb"]) * 1024 / n}
        if server.requests:
            raise RuntimeError("a cached rerun sent a request")
    a, b = out[str(small)], out[str(large)]
    out["projected_1M"] = {key: b[key] + (b[key] - a[key]) / (large - small) * (1_000_000 - large)
                           for key in ("plan_work_s", "rerun_s", "rerun_peak_rss_mb", "adopt_s")}
    out["per_image_ms"] = {str(n): {k: out[str(n)][k] * 1000 / n for k in ("plan_work_s", "rerun_s")}
                           for n in (small, large)}
    return out


def side_by_side(runs: dict[str, list[float]]) -> dict:
    """Medians of the two modes' runs (paired by round), and the median of the rounds' ratios inputs / none."""
    ratios = [a / b for a, b in zip(runs["inputs"], runs["none"])]
    return {**{m: {"median_s": statistics.median(v), "runs_s": [round(s, 3) for s in v]} for m, v in runs.items()},
            "round_ratios": [round(x, 3) for x in ratios], "ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(runs["inputs"]) / statistics.median(runs["none"])}


def measure_records(sizes: Sizes, workdir: Path) -> dict:
    """What records cost a fully cached rerun: --refresh inputs (records.jsonl read, every manual caption and
    cache hashed and matched against its record) vs --refresh none (no record read: every cache trusted, as
    before records existed), over the same folder of `records_large` images with complete records.
      wall   a fresh `python enhance_captions.py` per run (imports included), the two modes alternating, first
             one then the other, the order flipped every round, `records_repeats` rounds after a warm-up run of
             each; the target (<= 1.3x) applies to the median of the rounds' ratios (a shared machine drifts
             over seconds, so the two are compared within each round); the ratio of the medians goes with it.
             Each run's CPU time (user + system, from wait4) is compared the same way: on a machine whose cores
             are shared it moves less than the wall time does.
      plan   ec.plan_work alone, in this process, the same way, wall and CPU time (and Records.load alone,
             timed after it).
      rss    peak RSS through main() of a cached rerun at records_small and records_large images, each mode:
             the growth is what the Items and the records cost; "flat" means the <= +100 MB of the rss section.
    The endpoint is the loopback server; with nothing to do the script must not even connect to it."""
    out: dict = {"images": sizes.records_large, "rounds": sizes.records_repeats}
    modes = ("inputs", "none")
    with CountingServer() as server:
        folders = {n: workdir / f"records-{n}" for n in (sizes.records_small, sizes.records_large)}
        for n, folder in folders.items():
            out[f"folder_{n}"] = make_recorded_folder(folder, n, server)
        server.connections = 0
        large, n = folders[sizes.records_large], sizes.records_large
        for refresh in modes:  # warm-up: page cache, .pyc files
            cached_rerun(large, n, server, refresh, workdir)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(sizes.records_repeats):
            for refresh in modes if r % 2 == 0 else reversed(modes):
                runs[refresh].append(cached_rerun(large, n, server, refresh, workdir))
        out["wall"] = side_by_side({m: [run["wall"] for run in runs[m]] for m in modes})
        out["cpu"] = side_by_side({m: [run["cpu"] for run in runs[m]] for m in modes})
        for refresh in modes:
            time_plan_work(large, server, refresh)
        plan: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
        for r in range(sizes.records_repeats):
            for refresh in modes if r % 2 == 0 else reversed(modes):
                plan[refresh].append(time_plan_work(large, server, refresh))
        out["plan_work"] = side_by_side({m: [p[0] for p in plan[m]] for m in modes})
        out["plan_work_cpu"] = side_by_side({m: [p[1] for p in plan[m]] for m in modes})
        out["records_load_median_s"] = statistics.median(p[2] for p in plan["inputs"])
        for refresh in modes:
            for size, folder in folders.items():
                run = cached_rerun(folder, size, server, refresh, workdir, rss_marker=True)
                out[f"rss_{refresh}_{size}"] = {"peak_rss_mb": main_peak(run["output"]) / 2**20,
                                                "process_peak_rss_mb": run["maxrss"] / 2**20, "seconds": run["wall"]}
            out[f"rss_{refresh}_growth_mb"] = (out[f"rss_{refresh}_{sizes.records_large}"]["peak_rss_mb"]
                                               - out[f"rss_{refresh}_{sizes.records_small}"]["peak_rss_mb"])
        out["server_connections"] = server.connections  # must stay 0: a cached rerun needs no endpoint
        out["chat_requests_sent"] = len(server.requests)
    if out["server_connections"] or out["chat_requests_sent"]:
        raise RuntimeError(f"a cached rerun reached the endpoint: {out['server_connections']} connections")
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    name: str
    value: str
    target: str = ""
    passed: bool | None = None

    def result(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "FAIL")


def rows_for(results: dict, args) -> list[Row]:
    rows: list[Row] = []
    v = results.get("vision")
    if v:
        small, large = v["batch_sizes"]
        s, b = v[f"bs{small}"], v[f"bs{large}"]
        rows += [
            Row(f"vision bs{small}: pipeline / bare generate (medians)",
                f"{s['pipeline']['images_per_s']:.1f} / {s['bare_generate']['images_per_s']:.1f} img/s"),
            Row(f"vision bs{large}: pipeline / bare generate (medians)",
                f"{b['pipeline']['images_per_s']:.1f} / {b['bare_generate']['images_per_s']:.1f} img/s"),
            Row(f"vision bs{large} vs bs{small} (pipeline)", f"{v['batch_speedup']:.2f}x"),
            Row(f"vision bs{large}: pipeline vs bare loop", f"{b['pipeline_vs_bare']:.0%} (median of rounds "
                f"{min(b['round_ratios']):.2f}-{max(b['round_ratios']):.2f}; best vs best {b['best_vs_best']:.0%})",
                ">= 85%", b["pipeline_vs_bare"] >= 0.85),
        ]
        at = b["bare_generate_at_stage_threads"]
        rows.append(Row(f"  bare generate bs{large} at the stage's torch threads ({at['threads']})",
                        f"{at['images_per_s']:.1f} img/s (median)"))
        p, f = v["profile"], v["feeding"]
        g = p["generate_per_batch"]
        rows.append(Row(f"  one bs{large} generate: in the stage / bare",
                        f"{g['stage']['wall_ms']:.0f} / {g['bare']['wall_ms']:.0f} ms, of it CPU time "
                        f"{g['stage']['cpu_ms']:.0f} / {g['bare']['cpu_ms']:.0f} ms "
                        "(the rest: waiting for a core or the GIL)"))
        rows.append(Row(f"  where bs{large} time goes", f"generate {p['generate_share']:.0%}, caption other "
                        f"{p['caption_other_share']:.0%}, outside caption {p['outside_caption_share']:.0%} "
                        f"({p['first_batch_s'] * 1000:.0f} ms waiting for the first batch, then "
                        f"{p['between_batches_ms']:.1f} ms between batches)"))
        rows.append(Row("  feeding cost per image (one thread)",
                        f"decode {f['decode_ms']:.1f} ms (in full {f['decode_full_ms']:.1f}; sides >= "
                        f"{f['decode_side']} px) + prepare {f['prepare_ms']:.1f} ms"))
    llm = results.get("llm")
    if llm:
        c, one = llm["concurrency"], llm["serial"]
        rows += [
            Row("llm c16 / c1 (200 ms latency)", f"{c['requests_per_s']:.1f} / {one['requests_per_s']:.2f} req/s"),
            Row("llm c16 vs limit 16/0.2 s", f"{llm['fraction_of_limit']:.0%} of {llm['limit_requests_per_s']:.0f}",
                ">= 90%", llm["fraction_of_limit"] >= 0.90),
            Row("llm c16 vs c1", f"{llm['speedup_vs_serial']:.1f}x", ">= 12x", llm["speedup_vs_serial"] >= 12),
            Row("  llm c16 vs bare openai-client loop", f"{llm['fraction_of_bare_client']:.0%} of "
                f"{llm['bare_client']['requests_per_s']:.1f} req/s"),
            Row("  llm c64: script / bare client / limit", f"{llm['c64']['requests_per_s']:.0f} / "
                f"{llm['c64']['bare_client_requests_per_s']:.0f} / {64 / llm['c64']['latency_s']:.0f} req/s"),
        ]
    r = results.get("rpm")
    if r:
        rows.append(Row(f"rpm {r['rpm']}: most requests in any 60 s", f"{r['max_in_any_60s_window']} "
                        f"(shortest {r['rpm'] + 1} in a row: {r['min_span_of_rpm_plus_1_s']:.3f} s)",
                        f"<= {r['rpm']}", r["max_in_any_60s_window"] <= r["rpm"]))
    elif args.rpm_skipped:
        rows.append(Row("rpm window check", "skipped (--check_rpm runs it)", "<= rpm", None))
    o = results.get("overlap")
    if o:
        rows.append(Row(f"--overlap vs phased ({o['images']} img, {o['llm_latency_s']} s LLM)",
                        f"{o['overlap_s']:.1f} s vs {o['phased_s']:.1f} s = {o['speedup']:.2f}x "
                        f"(saved {o['saved_s']:.1f} of <= {o['max_saving_s']:.1f} s)"))
    b = results.get("balance")
    if b:
        rows.append(Row("balance, 2 processes: first request to last answer", f"{b['span_s']:.1f} s (by count "
                        f"{b['by_count_s']:.0f} s, perfect {b['balanced_s']:.0f} s); slow merges per process "
                        f"{b['slow_per_process']}, second started {b['second_started_later_s']:.1f} s later",
                        "< 0.75x by count", b["span_s"] < 0.75 * b["by_count_s"]))
        rows.append(Row("  balance: the two processes finished apart", f"{b['finished_apart_s']:.2f} s",
                        "< 0.25x by count", b["finished_apart_s"] < 0.25 * b["by_count_s"]))
    m = results.get("rss")
    if m:
        small, large = results["sizes"]["rss_small"], results["sizes"]["rss_large"]
        for mode in ("cached", "planning"):
            a, b = m[f"{mode}_{small}"], m[f"{mode}_{large}"]
            growth = m[f"{mode}_growth_mb"]
            rows.append(Row(f"peak RSS {mode} {small:,} -> {large:,}",
                            f"{a['peak_rss_mb']:.0f} -> {b['peak_rss_mb']:.0f} MB ({growth:+.0f}); whole process "
                            f"{a['process_peak_rss_mb']:.0f} -> {b['process_peak_rss_mb']:.0f}",
                            "<= +100 MB", growth <= 100))
        rows.append(Row("  peak RSS of import torch, transformers", f"whole process "
                        f"{m['import_torch_transformers_mb']:.0f} MB"))
    rr = results.get("rerun")
    if rr:
        rows.append(Row(f"cached rerun {rr['images']:,} img vs import torch+transformers",
                        f"{rr['rerun_s']:.2f} s vs {rr['import_torch_transformers_s']:.2f} s "
                        f"({rr['extra_s']:+.2f} s)"))
    sv = results.get("served")
    if sv:
        rows += [
            Row(f"served vision c{sv['concurrency']}: stage / bare client (medians)",
                f"{sv['stage']['images_per_s']:.0f} / {sv['bare_client']['images_per_s']:.0f} img/s "
                f"({sv['images']} JPEGs of ~{sv['photo_bytes'] // 1000} KB, sent as they are)"),
            Row("served vision: stage vs bare client", f"{sv['served_vs_bare']:.0%} (median of rounds "
                f"{min(sv['round_ratios']):.2f}-{max(sv['round_ratios']):.2f})",
                ">= 80%", sv["served_vs_bare"] >= 0.80),
            Row("  served vision CPU per image: stage / bare client", f"{sv['stage']['cpu_ms_per_image']:.1f} / "
                f"{sv['bare_client']['cpu_ms_per_image']:.1f} ms (bare / stage, median of rounds: "
                f"{sv['cpu_bare_vs_stage']:.0%})"),
            Row(f"  served vision, every image converted (max side {sv['converted']['max_side']})",
                f"{sv['converted']['images_per_s']:.0f} img/s, {sv['converted']['cpu_ms_per_image']:.1f} ms CPU "
                "per image (medians)"),
        ]
    rec = results.get("records")
    if rec:
        w, c, pw, pc, n = rec["wall"], rec["cpu"], rec["plan_work"], rec["plan_work_cpu"], rec["images"]
        small, large = results["sizes"]["records_small"], results["sizes"]["records_large"]
        rows.append(Row(f"cached rerun {n:,} img: --refresh inputs / none", f"{w['inputs']['median_s']:.2f} / "
                        f"{w['none']['median_s']:.2f} s = {w['ratio']:.2f}x (median of {rec['rounds']} rounds "
                        f"{min(w['round_ratios']):.2f}-{max(w['round_ratios']):.2f}; of medians "
                        f"{w['ratio_of_medians']:.2f}x)", "<= 1.3x", w["ratio"] <= 1.3))
        rows.append(Row("  the same, CPU time of the process", f"{c['inputs']['median_s']:.2f} / "
                        f"{c['none']['median_s']:.2f} s = {c['ratio']:.2f}x (rounds {min(c['round_ratios']):.2f}-"
                        f"{max(c['round_ratios']):.2f})"))
        rows.append(Row(f"  plan_work {n:,} img: --refresh inputs / none", f"{pw['inputs']['median_s']:.2f} / "
                        f"{pw['none']['median_s']:.2f} s = {pw['ratio']:.2f}x; CPU {pc['inputs']['median_s']:.2f} / "
                        f"{pc['none']['median_s']:.2f} s = {pc['ratio']:.2f}x (Records.load "
                        f"{rec['records_load_median_s']:.2f} s)"))
        for refresh in ("inputs", "none"):
            a, b = rec[f"rss_{refresh}_{small}"], rec[f"rss_{refresh}_{large}"]
            growth = rec[f"rss_{refresh}_growth_mb"]
            rows.append(Row(f"{'' if refresh == 'inputs' else '  '}peak RSS cached rerun --refresh {refresh} "
                            f"{small:,} -> {large:,}", f"{a['peak_rss_mb']:.0f} -> {b['peak_rss_mb']:.0f} MB "
                            f"({growth:+.0f}); whole process {a['process_peak_rss_mb']:.0f} -> "
                            f"{b['process_peak_rss_mb']:.0f}", *(("<= +100 MB", growth <= 100)
                                                                 if refresh == "inputs" else ())))
    sc = results.get("scale")
    if sc:
        small, large = results["sizes"]["scale_sizes"]
        a, b, m = sc[str(small)], sc[str(large)], sc["projected_1M"]
        for key, name, unit in (("plan_work_s", "plan_work", "s"), ("rerun_s", "cached rerun", "s"),
                                ("rerun_peak_rss_mb", "cached rerun peak RSS", "MB"), ("adopt_s", "first run, adopting", "s")):
            rows.append(Row(f"{name} {small:,} / {large:,} img -> 1M projected",
                            f"{a[key]:.1f} / {b[key]:.1f} {unit} -> {m[key]:.0f} {unit}"))
        for n, r in ((small, a), (large, b)):
            rows.append(Row(f"cached rerun vs floor at {n:,} img (wall, median of rounds)",
                            f"{r['rerun_s']:.1f} / {r['floor_s']:.1f} s = {r['rerun_vs_floor']:.2f}x", "<= 1.5x",
                            r["rerun_vs_floor"] <= 1.5))
            rows.append(Row(f"cached rerun memory above the imports at {n:,} img",
                            f"{r['kb_per_image']:.2f} KB/img", "<= 1.5 KB", r["kb_per_image"] <= 1.5))
    return rows


def print_table(rows: list[Row], quick: bool) -> None:
    if quick:
        print("--quick: smoke-run sizes; use a full run to judge the targets\n")
    widths = [max(len(r.name) for r in rows), max(len(r.value) for r in rows), max(len(r.target) for r in rows)]
    print(f"{'measurement':<{widths[0]}}  {'value':<{widths[1]}}  {'target':<{widths[2]}}  result")
    print("-" * (sum(widths) + 12))
    for r in rows:
        print(f"{r.name:<{widths[0]}}  {r.value:<{widths[1]}}  {r.target:<{widths[2]}}  {r.result()}")


def environment(args, model_name: str) -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(), "device": str(args.device_obj),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "model": model_name,
            "quick": args.quick, "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run (< 2 min on a CPU box)")
    p.add_argument("--model_id", help="vision model (Hub id or path) for the vision and overlap sections "
                                      "(default: the tiny random Florence-2 of tests/tiny_models.py)")
    p.add_argument("--florence_large_random", action="store_true",
                   help="a random-weight model with Florence-2-large's sizes, at batch sizes 1 and 32 (needs a GPU)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--images", type=int, help="images per vision and overlap measurement (default 96 at batch size 1, "
                                              "384 at the large one, 192 for overlap; quick 32, 64, 32; 256 "
                                              "with --florence_large_random)")
    p.add_argument("--photo_side", type=int, default=768,
                   help="longest side of the synthetic photos (e.g. 4032 for 12 MP camera JPEGs)")
    p.add_argument("--batch_size", type=int, help="the large batch size (default 8; 32 with --florence_large_random)")
    p.add_argument("--num_workers", type=int, default=2, help="the script's --num_workers (its default: 2)")
    p.add_argument("--new_tokens", type=int, help="fixed caption length in tokens (default 32; 64 with a GPU)")
    p.add_argument("--num_beams", type=int, default=1, help="beam search width for generate (default greedy)")
    p.add_argument("--check_rpm", action="store_true", help="run the ~60 s rpm window check in a --quick run too")
    p.add_argument("--only", help=f"comma-separated sections to run: {','.join(SECTIONS)} (default: all)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--workdir", type=Path, help="keep the datasets and models here (default: a temporary folder)")
    args = p.parse_args(argv)
    import torch

    if args.out:
        args.out = args.out.resolve()  # before the benchmark changes its working folder
    if args.florence_large_random and args.model_id:
        p.error("--florence_large_random and --model_id exclude each other")
    args.device_obj = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.florence_large_random and args.device_obj.type != "cuda":
        p.error("--florence_large_random needs a GPU (--device cuda): on a CPU it would take hours")
    large = args.batch_size or (32 if args.florence_large_random else 8)
    args.batch_sizes = (1, large)
    args.new_tokens = args.new_tokens or (64 if args.device_obj.type == "cuda" else 32)
    args.sections = [s.strip() for s in args.only.split(",")] if args.only else [s for s in SECTIONS
                                                                                   if s not in OPT_IN]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.rpm_skipped = args.quick and not args.check_rpm and not args.only
    if args.rpm_skipped:
        args.sections.remove("rpm")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.florence_large_random and not args.images:
        sizes.images = sizes.images_large_batch = sizes.overlap_images = 256
    if args.images:
        sizes.images = sizes.images_large_batch = sizes.overlap_images = args.images
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)  # no .env from the caller's working folder reaches ec.main
        results: dict = {"sizes": dataclasses.asdict(sizes)}
        started = time.perf_counter()

        def section(name: str, fn):
            if name in args.sections:
                t = time.perf_counter()
                print(f"[bench] {name} ...", file=sys.stderr, flush=True)
                results[name] = fn()
                print(f"[bench] {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)

        model_id, model_name = (None, None)
        if {"vision", "overlap"} & set(args.sections):
            model_id, model_name = resolve_model(args, workdir, args.device_obj)
        results["environment"] = environment(args, model_name or "-")
        section("vision", lambda: measure_vision(args, sizes, workdir, args.device_obj, model_id))
        section("llm", lambda: measure_llm(sizes, workdir))
        section("rpm", lambda: measure_rpm(workdir))
        section("balance", lambda: measure_balance(workdir))
        vision_rate = None
        if "vision" in results:
            vision_rate = results["vision"][f"bs{args.batch_sizes[1]}"]["pipeline"]["images_per_s"]
        section("overlap", lambda: measure_overlap(args, sizes, workdir, model_id, vision_rate))
        if {"rss", "rerun"} & set(args.sections):
            counts = sorted({sizes.rss_small, sizes.rerun_images, sizes.rss_large})
            t = time.perf_counter()
            tree = make_trees(workdir / "cached-tree", counts)
            record_tree(tree)
            print(f"[bench] built {counts[-1]:,} cached images in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            section("rss", lambda: measure_rss(sizes, tree, workdir))
            section("rerun", lambda: measure_rerun(sizes, tree, workdir))
        section("served", lambda: measure_served(sizes, workdir))
        section("records", lambda: measure_records(sizes, workdir))
        section("scale", lambda: measure_scale(sizes, workdir))
        results["total_s"] = time.perf_counter() - started
        rows = rows_for(results, args)
        results["table"] = [dataclasses.asdict(r) | {"result": r.result()} for r in rows]
        os.chdir(ROOT)
    print_table(rows, args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=str)
    (RESULTS / "bench.json").write_text(text + "\n", encoding="utf-8")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(f"\nJSON: {RESULTS / 'bench.json'}" + (f" and {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
