"""Shared fixtures: offline environment, tiny models built once per session, datasets, the loopback LLM server."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "enhance_captions.py"
sys.path.insert(0, str(ROOT))

from tests import tiny_models  # noqa: E402
from tests.llm_server import FakeLLMServer  # noqa: E402

WAIT_SCALE = 0.05  # every backoff, Retry-After and set-aside wait of the script runs for real, 20 times shorter
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               "ENHANCE_CAPTIONS_WAIT_SCALE": str(WAIT_SCALE)}
SECRET_VARS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "VLM_API_KEY")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No Hub, no inherited endpoint or key, waits scaled down, and a working directory without a .env file."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    for key in SECRET_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)


def tiny_model_cache() -> Path:
    """Where the tiny models live between sessions: one folder per version of their builder (and of the libraries
    that write them), so an edit to tests/tiny_models.py builds them afresh and nothing stale is ever loaded."""
    import tokenizers
    import torch
    import transformers

    key = hashlib.sha256(Path(tiny_models.__file__).read_bytes())
    key.update(f"{transformers.__version__} {torch.__version__} {tokenizers.__version__}".encode())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "enhance_captions" / "tiny-models" / key.hexdigest()[:16]


def tiny_model(family: str) -> str:
    """The tiny random-weight model of `family`, built once per machine. Built in a folder of its own and renamed
    into place, so a pytest-xdist worker (or a session killed halfway) never loads a half-written one; when two
    workers build it at once, the first rename wins and the other's copy is thrown away."""
    target = tiny_model_cache() / family
    if not target.is_dir():
        builder = tiny_models.VLM_BUILDERS.get(family) or getattr(tiny_models, f"build_{family}")
        target.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
        try:
            builder(building / family)
            os.rename(building / family, target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return str(target)


@pytest.fixture(scope="session")
def model_dir():
    """model_dir("florence2") -> path of a tiny random-weight model (see tiny_model). Tests read it, never write."""
    return tiny_model


@pytest.fixture
def llm_server():
    with FakeLLMServer() as server:
        yield server


def make_image(path: Path, seed: int, size=(64, 48), mode="RGB", fmt=None) -> Path:
    """A small image whose pixels depend on the seed, so each image is distinct."""
    from PIL import Image

    img = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    for x in range(0, size[0], 7):
        img.putpixel((x, (x * seed) % size[1]), (255 - x % 256, x % 256, seed % 256))
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_dataset(folder: Path, n: int, captions: bool = True, ext: str = ".jpg") -> list[Path]:
    """n images img000.jpg ... with manual captions "subject{i}, photo number {i}" (distinct per image)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        image = make_image(folder / f"img{i:03d}{ext}", i)
        if captions:
            (folder / f"img{i:03d}.txt").write_text(f"subject{i}, photo number {i}", encoding="utf-8")
        images.append(image)
    return images


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    env.update(OFFLINE_ENV)
    env.update(extra)
    return env


TWO_PROCESS_LAUNCHER = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", "0", str(SCRIPT)]


def two_process_env() -> dict[str, str]:
    return cli_env(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")


def two_process_command(*args) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of run_two_processes, for a test that starts it with Popen."""
    return TWO_PROCESS_LAUNCHER + [str(a) for a in args], two_process_env()


def launch_command(*args, processes: int = 2, script: Path = SCRIPT, options=()) -> list[str]:
    """`accelerate launch` of the script (or a wrapper of it) as `processes` CPU processes, with launcher options."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--mixed_precision", "no", "--dynamo_backend", "no", *[str(o) for o in options]]
    if "--num_machines" not in launcher:
        launcher += ["--num_machines", "1", "--main_process_port", "0"]
    return launcher + [str(script)] + [str(a) for a in args]


def run_two_processes(*args, timeout: float = 600):
    """The real script under `accelerate launch` as two CPU processes that see each other (world size 2)."""
    return run_cli(*args, launcher=TWO_PROCESS_LAUNCHER, env=two_process_env(), timeout=timeout)


def kill_launch(launcher: subprocess.Popen) -> None:
    """Kill an `accelerate launch` started with start_new_session, and its workers: torch's launcher gives each
    worker a session of its own, so killpg alone misses them (and a stopped one would stay behind)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(launcher.pid).children(recursive=True):
            child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait(30)


def run_cli(*args, env: dict | None = None, timeout: float = 300, cwd=None, launcher=None):
    """Run the real script in a subprocess; returns CompletedProcess with text stdout/stderr."""
    command = (launcher or [sys.executable, str(SCRIPT)]) + [str(a) for a in args]
    return subprocess.run(command, env=env or cli_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def run_args(dataset, model, server, *extra, batch_size: int | None = 2, num_workers: int | None = 0) -> list[str]:
    """The one argument builder: a dataset, a tiny vision model, the loopback endpoint, short captions."""
    args = ["--dataset_dir", dataset, "--model_id", model, "--base_url", server.base_url, "--model", "test-model",
            "--max_new_tokens", "8"]
    if batch_size is not None:
        args += ["--batch_size", batch_size]
    if num_workers is not None:
        args += ["--num_workers", num_workers]
    return [str(a) for a in args + list(extra)]


def run_main(capsys, *args) -> tuple[int, str, str]:
    """The script in this process: (exit code, stdout, stderr)."""
    import enhance_captions as ec

    capsys.readouterr()
    code = ec.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def main_result(capsys, *args) -> subprocess.CompletedProcess:
    """The script's main() in this process, its result shaped as run_cli's: no interpreter to start and no torch to
    import for each run. The command line around main() is the tests' of run_cli."""
    code, out, err = run_main(capsys, *args)
    return subprocess.CompletedProcess([str(a) for a in args], code, out, err)


def report_failures(report: Path) -> list[dict]:
    """The failure rows of a --report file: every line but the last, which is the run's summary record."""
    import json

    rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert rows and set(rows[-1]) == {"summary"}, rows
    return rows[:-1]


def caches(image: Path) -> tuple[Path, Path]:
    base = image.with_suffix("")
    return base.parent / (base.name + "_generated.txt"), base.parent / (base.name + "_combined.txt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def transformers_serve(tmp_path_factory, model_dir):
    """A real `transformers serve` of the tiny causal LM, started once per session (its start takes seconds) and
    shared by the tests that only send it requests; they carry @pytest.mark.xdist_group("transformers_serve"), so
    that under `pytest -n auto --dist loadgroup` one worker starts it."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    try:
        if importlib.util.find_spec("transformers.cli.serve") is None:
            missing.append("transformers.cli.serve")
    except ImportError:
        missing.append("transformers.cli.serve")
    if missing:
        pytest.skip(f"the transformers[serving] extra is not installed (missing {', '.join(missing)}); "
                    "pip install 'transformers[serving]' to run this test")
    model = model_dir("causal_lm")
    port = free_port()
    tmp_path = tmp_path_factory.mktemp("transformers-serve")
    exe = Path(sys.executable).with_name("transformers")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "transformers.cli.transformers"]
    log = open(tmp_path / "serve.log", "w+", encoding="utf-8")
    server = subprocess.Popen(command + ["serve", model, "--host", "127.0.0.1", "--port", str(port)],
                              env=cli_env(), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"transformers serve exited with {server.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"transformers serve did not answer within 60 s:\n{log.read()[-3000:]}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def seed_generated(images) -> None:
    """Cache a vision caption for each image, so a run goes straight to the LLM stage."""
    for i, image in enumerate(images):
        caches(image)[0].write_text(f"a seeded vision caption number {i}\n", encoding="utf-8")


def user_message(request: dict) -> str:
    """The last user turn of a chat request the fake server recorded."""
    return [m for m in request["messages"] if m["role"] == "user"][-1]["content"]


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]

class Cli:
    """The real script in a subprocess, output to files (no pipe can fill up)."""

    def __init__(self, tmp_path: Path, name: str, *args, env=None):
        self.out_path, self.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(SCRIPT), *[str(a) for a in args]],
                                         env=env or cli_env(), stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, condition, timeout: float = 120.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run exited ({self.proc.returncode}) before {what}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.stderr[-3000:]}")
            time.sleep(0.005)

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the run did not exit within {timeout} s:\n{self.stderr[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
