"""The real script's --review in a subprocess, for the HTTP and browser tests; and the dataset they review."""
from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import OFFLINE_ENV, SECRET_VARS, Cli, make_dataset, seed_generated
from tests.llm_server import FakeLLMServer


class ReviewServer:
    """`enhance_captions.py --dataset_dir DS --review` on a free loopback port; stopped with a signal on exit."""

    def __init__(self, tmp_path: Path, dataset: Path, *extra, name: str = "review"):
        self.cli = Cli(tmp_path, name, "--dataset_dir", dataset, "--review", *extra)
        self.cli.wait_for(lambda: "\n" in self.cli.stdout, 60, "the review page's address")
        self.url = re.search(r"http://\S+", self.cli.stdout).group()
        self.base, self.token = self.url.split("/?token=")
        self.host, port = self.base.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)

    def __enter__(self) -> ReviewServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.cli.proc.poll() is None:
            self.cli.proc.send_signal(signum)
        return self.cli.wait(30)

    def request(self, method: str, path: str, body: dict | None = None, token: str | None = "header",
                headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict, bytes]:
        """(status, headers, body). token: "header" sends the right one in X-Token; a string sends that one; None
        sends none. raw: the body's bytes as they are."""
        sent = dict(headers or {})
        if token == "header":
            sent["X-Token"] = self.token
        elif token is not None:
            sent["X-Token"] = token
        data = raw if raw is not None else None if body is None else json.dumps(body).encode("utf-8")
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            connection.request(method, path, body=data, headers=sent)
            answer = connection.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            connection.close()

    def json(self, method: str, path: str, body: dict | None = None, **kw) -> tuple[int, dict]:
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data)

    def items(self, show: str = "all", q: str = "", offset: int = 0, limit: int = 200) -> dict:
        status, listing = self.json("GET", f"/api/items?filter={show}&q={quote(q)}&offset={offset}&limit={limit}")
        assert status == 200, listing
        return listing

    def card(self, image_id: str) -> dict:
        return next(c for c in self.items()["items"] if c["id"] == image_id)

    def caption(self, image_id: str, kind: str) -> dict:
        return next(c for c in self.card(image_id)["captions"] if c["kind"] == kind)

    def save(self, image_id: str, kind: str, text: str, sha: str | None = "current") -> tuple[int, dict]:
        if sha == "current":
            sha = self.caption(image_id, kind)["sha"]
        return self.json("POST", "/api/save", {"id": image_id, "kind": kind, "sha": sha, "text": text})


def endpoint_args(dataset: Path, server: FakeLLMServer, *extra) -> list[str]:
    """A run whose vision captions are all cached: it loads no vision model, and merges through the server."""
    return ["--dataset_dir", str(dataset), "--base_url", server.base_url, "--model", "test-model", *map(str, extra)]


def merged_dataset(folder: Path, n: int = 3) -> list[Path]:
    """n images with manual and seeded vision captions, merged by a real run against the loopback server."""
    import enhance_captions as ec

    images = make_dataset(folder, n)
    seed_generated(images)
    with FakeLLMServer() as server:
        assert off_the_loop(ec.main, endpoint_args(folder, server)) == 0
        assert len(server.requests) == n
    return images


def off_the_loop(function, *args):
    """function(*args) on a thread of its own: Playwright's sync API keeps an event loop running on this one, and
    a run starts its own with asyncio.run."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result()


def run_main_off_the_loop(capsys, *args) -> tuple[int, str, str]:
    """conftest.run_main, off the loop."""
    import enhance_captions as ec

    capsys.readouterr()
    code = off_the_loop(ec.main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def copy_dataset(template: Path, target: Path) -> Path:
    """A copy with the same sizes and mtimes, so the records still stand for it."""
    shutil.copytree(template, target, symlinks=True)
    return target


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("review-template") / "ds"
    with pytest.MonkeyPatch.context() as mp:  # the autouse `offline` fixture is per test
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        for key in SECRET_VARS:
            mp.delenv(key, raising=False)
        mp.chdir(folder.parent)
        merged_dataset(folder)
    return folder


@pytest.fixture
def ds(template, tmp_path) -> Path:
    """Three merged images, img000.jpg ... img002.jpg: every cache current and recorded."""
    return copy_dataset(template, tmp_path / "ds")
