"""A scriptable fake OpenAI-compatible chat-completions server for tests.

Standard library only.  It binds to ``127.0.0.1`` on an OS-chosen port and
never touches any other address (no DNS / getfqdn lookups either).

Usage::

    from tests.llm_server import FakeLLMServer, sha12, status, hang, reset, invalid_json, reply

    with FakeLLMServer(latency=0.0) as srv:
        client = openai.OpenAI(api_key="x", base_url=srv.base_url, max_retries=0)
        srv.script(status(429, {"Retry-After": "1"}), reset(), reply("hi", "length"))
        ...
        assert srv.requests[0]["model"] == "test-model"

Constructor
-----------
``FakeLLMServer(latency=0.0, reply=None, api_key=None, models=("test-model",), unknown_model=None,
structured_outputs=True)``

* ``latency`` -- seconds slept by every chat request before it is answered
  (also before a scripted action is carried out).  Mutable at run time.
* ``reply`` -- optional ``callable(request_json) -> str | dict | Action``
  replacing the default reply for requests that have no scripted action:

  - ``str``: the assistant message content (finish_reason ``"stop"``);
  - ``dict`` containing ``"choices"``: sent verbatim as the whole response body;
  - other ``dict``: ``{"content": str|None, "finish_reason": str, **extra}``
    where extra keys (e.g. ``reasoning_content``) are merged into the message;
  - an action (see below): carried out as if it had been scripted.

  If the callable raises, the request gets a 500 whose message names the error.
* ``api_key`` -- if set, any request (chat or models) lacking
  ``Authorization: Bearer <api_key>`` gets a 401 OpenAI-style error.  Such
  requests are still recorded in ``requests``/``headers``/``request_times`` but
  do NOT consume a scripted action.
* ``models`` -- model ids served by ``GET /v1/models``.
* ``unknown_model`` -- ``None`` (default): chat requests for any model name are
  answered, like llama.cpp.  ``404``: a chat request for a model not in
  ``models`` gets vLLM's/OpenAI's 404 ``{"error": {"message": "The model `X`
  does not exist.", "code": "model_not_found"}}``.  ``400``: it gets the 400
  of a ``transformers serve`` pinned to one model, ``{"detail": "Server is
  pinned to 'M'; requested 'X'."}``.  Such requests are recorded but do not
  consume a scripted action.
* ``structured_outputs`` -- ``True`` (default): a ``response_format`` in a
  chat request is accepted (and not enforced: the reply is what it would be
  anyway).  ``False``: a request carrying ``response_format`` gets the 400 of
  a server without structured outputs, ``{"error": {"message":
  "response_format is not supported by this server", "param":
  "response_format", ...}}``; mutable at run time.  Such requests are
  recorded but do not consume a scripted action.

Attributes
----------
* ``base_url`` -- ``"http://127.0.0.1:PORT/v1"`` (valid once entered).
* ``requests`` -- parsed JSON bodies of every chat-completion request, in
  arrival order.  ``chat_requests()`` returns a snapshot copy.
* ``headers`` -- matching request headers; each is a ``dict`` subclass whose
  lookups are case-insensitive (keys are stored lower-case).
* ``request_times`` -- ``time.monotonic()`` at arrival of each chat request.
* ``peers`` -- ``(host, port)`` of the client connection of each chat request
  (same port twice == the connection was kept alive and reused).
* ``max_in_flight`` / ``in_flight`` -- highest / current number of chat
  requests being handled concurrently.
* ``pending_actions`` -- number of scripted actions not consumed yet.
* ``held`` -- number of chat requests waiting at the gate (see ``hold``).

Holding requests
----------------
``hold(after=0)`` answers ``after`` more chat requests, then holds every later one
(before its latency or action) until ``release()`` or the server stops: a test
decides when the requests in flight end, instead of sleeping for a latency.

Actions (``script(*actions)``)
------------------------------
Queued FIFO; each incoming (authorised) chat request consumes one; when the
queue is empty the default reply is served.  Each action can be given as the
dataclass (via the lower-case factory) or as a plain tuple / bare name:

* ``status(code, headers=None, body=None)`` / ``("status", code, headers, body)``
  -- answer with HTTP ``code``.  ``body`` defaults to an OpenAI-style error
  ``{"error": {"message", "type", "param", "code"}}``; a ``dict`` body is sent
  as JSON, a ``str``/``bytes`` body verbatim.  ``headers`` are added as given
  (e.g. ``{"Retry-After": "1"}``).
* ``hang(seconds)`` / ``("hang", seconds)`` -- sleep that long, then answer
  normally (default reply / ``reply`` callable).  The sleep is cut short when
  the server exits, in which case the connection is just closed.
* ``reset()`` / ``("reset",)`` / ``"reset"`` -- close the connection abruptly
  without any response (``SO_LINGER`` 0 then close -> TCP RST).
* ``invalid_json()`` / ``("invalid_json",)`` / ``"invalid_json"`` -- status
  200, ``Content-Type: application/json``, a body that is not JSON.
* ``reply(text, finish_reason="stop", **extra)`` / ``("reply", text[, finish_reason])``
  -- a normal completion whose message content is exactly ``text`` (may be
  ``""`` or ``None`` for null content); ``extra`` keys are merged into the
  message dict.

Default reply
-------------
For the last ``role == "user"`` message of the request:

* string content ``c``: ``"MERGED " + sha12(c) + " :: " + c.replace("\\n", " ")``
* list content (vision parts) with an ``image_url`` part:
  ``"VISION " + sha12(<first image_url part's url string>)``
* list content without any image: treated as the ``"\\n"``-joined text parts.
* no user message: treated as ``""``.

``sha12(s)`` is the first 12 hex digits of ``sha1(s.encode("utf-8"))``.

Other endpoints: ``GET /v1/models`` (list), ``GET /v1/models/<id>``; anything
else gets a 404 OpenAI-style JSON error.  ``"stream": true`` chat requests get
a minimal server-sent-events answer (one content chunk, one finish chunk,
``[DONE]``).  Every response carries ``Content-Length`` so HTTP/1.1 keep-alive
works; Nagle is disabled; per-request logging is suppressed.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import socket
import socketserver
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

__all__ = [
    "FakeLLMServer",
    "sha12",
    "status",
    "hang",
    "reset",
    "invalid_json",
    "reply",
    "Status",
    "Hang",
    "Reset",
    "InvalidJSON",
    "Reply",
    "default_reply_text",
]

HOST = "127.0.0.1"


def sha12(s: str) -> str:
    """First 12 hex digits of the SHA-1 of ``s`` (UTF-8)."""
    return hashlib.sha1(s.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Status:
    code: int
    headers: Optional[dict] = None
    body: Any = None


@dataclass(frozen=True)
class Hang:
    seconds: float


@dataclass(frozen=True)
class Reset:
    pass


@dataclass(frozen=True)
class InvalidJSON:
    body: bytes = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [ <html>oops'


@dataclass(frozen=True)
class Reply:
    text: Optional[str]
    finish_reason: str = "stop"
    extra: dict = field(default_factory=dict)


Action = Union[Status, Hang, Reset, InvalidJSON, Reply]
_ACTION_TYPES = (Status, Hang, Reset, InvalidJSON, Reply)


def status(code: int, headers: Optional[dict] = None, body: Any = None) -> Status:
    return Status(int(code), dict(headers) if headers else None, body)


def hang(seconds: float) -> Hang:
    return Hang(float(seconds))


def reset() -> Reset:
    return Reset()


def invalid_json() -> InvalidJSON:
    return InvalidJSON()


def reply(text: Optional[str], finish_reason: str = "stop", **extra: Any) -> Reply:
    return Reply(text, finish_reason, dict(extra))


def _coerce_action(a: Any) -> Action:
    if isinstance(a, _ACTION_TYPES):
        return a
    if isinstance(a, str):
        a = (a,)
    if isinstance(a, (tuple, list)) and a:
        name, args = str(a[0]).lower(), tuple(a[1:])
        makers = {
            "status": status,
            "hang": hang,
            "reset": reset,
            "invalid_json": invalid_json,
            "reply": reply,
        }
        if name in makers:
            return makers[name](*args)
    raise TypeError(f"not a FakeLLMServer action: {a!r}")


# --------------------------------------------------------------------------- helpers

_ERROR_KINDS = {
    400: ("invalid_request_error", "bad_request", "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_denied", "permission_denied", "You are not allowed to access this resource."),
    404: ("invalid_request_error", "not_found", "The requested resource does not exist."),
    408: ("timeout", "timeout", "Request timed out."),
    409: ("conflict", "conflict", "Conflict."),
    422: ("invalid_request_error", "unprocessable_entity", "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", "internal_error", "The server had an error while processing your request."),
    502: ("server_error", "bad_gateway", "Bad gateway."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded, please try again later."),
    504: ("server_error", "gateway_timeout", "Gateway timeout."),
}


def error_body(code: int, message: Optional[str] = None) -> dict:
    etype, ecode, emsg = _ERROR_KINDS.get(
        code, ("server_error" if code >= 500 else "invalid_request_error", f"http_{code}", f"HTTP {code}.")
    )
    return {"error": {"message": message or emsg, "type": etype, "param": None, "code": ecode}}


def _last_user_content(body: Any) -> Any:
    msgs = body.get("messages") if isinstance(body, dict) else None
    if isinstance(msgs, list):
        for m in reversed(msgs):
            if isinstance(m, dict) and m.get("role") == "user":
                return m.get("content")
    return ""


def default_reply_text(body: Any) -> str:
    """The default reply text for a chat request body (see module docstring)."""
    content = _last_user_content(body)
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "image_url" or "image_url" in part:
                iu = part.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                return "VISION " + sha12(str(url if url is not None else ""))
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
        content = "\n".join(texts)
    if content is None:
        content = ""
    content = str(content)
    return "MERGED " + sha12(content) + " :: " + content.replace("\n", " ")


def stop_after(server: "FakeLLMServer", answers: int) -> Callable[[Any], str]:
    """A reply callable that answers `answers` requests normally, then stops its server (from another thread): the
    port then refuses every connection. A request that arrives before the stop is complete has its connection
    dropped, so that the server answers exactly `answers` however the requests and the stop interleave."""
    count, lock = [0], threading.Lock()

    def answer(body):
        with lock:
            count[0] += 1
            n = count[0]
        if n == answers:
            threading.Thread(target=server.stop, daemon=True).start()
        return default_reply_text(body) if n <= answers else reset()
    return answer


class _Headers(dict):
    """dict with case-insensitive lookups (keys stored lower-case)."""

    def __init__(self, items=()):
        super().__init__()
        for k, v in items:
            k = k.lower()
            super().__setitem__(k, v if k not in self else self[k] + ", " + v)

    def __getitem__(self, k):
        return super().__getitem__(k.lower())

    def __setitem__(self, k, v):
        super().__setitem__(k.lower(), v)

    def __contains__(self, k):
        return isinstance(k, str) and super().__contains__(k.lower())

    def get(self, k, default=None):
        return super().get(k.lower(), default) if isinstance(k, str) else default


class _Abort(Exception):
    """Raised inside a handler to drop the connection without answering."""


# --------------------------------------------------------------------------- HTTP plumbing


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024

    def server_bind(self) -> None:
        # Skip HTTPServer.server_bind: it calls socket.getfqdn() (a DNS lookup).
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def handle_error(self, request, client_address) -> None:  # keep test output quiet
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeLLM/1.0"
    sys_version = ""
    disable_nagle_algorithm = True
    fake: "FakeLLMServer"  # set on the per-server subclass

    # -- plumbing ---------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.fake._track(self.connection, False)

    def handle(self) -> None:
        try:
            super().handle()
        except (_Abort, OSError, ValueError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise _Abort()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n > 0 else b""
        if len(data) < n:
            raise _Abort()
        return data

    def _send(self, code: int, body: Any, content_type: str = "application/json",
              headers: Optional[dict] = None) -> None:
        if isinstance(body, (dict, list)):
            payload = json.dumps(body).encode("utf-8")
        elif isinstance(body, str):
            payload = body.encode("utf-8")
        elif body is None:
            payload = b""
        else:
            payload = bytes(body)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            if k.lower() in ("content-length",):
                continue
            self.send_header(k, str(v))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_error_json(self, code: int, message: Optional[str] = None,
                         headers: Optional[dict] = None) -> None:
        self._send(code, error_body(code, message), headers=headers)

    def _reset(self) -> None:
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.rfile.close()  # drops the makefile reference so close() really closes
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass
        raise _Abort()

    def _authorised(self) -> bool:
        key = self.fake.api_key
        return key is None or self.headers.get("Authorization", "") == f"Bearer {key}"

    @staticmethod
    def _route(path: str) -> str:
        path = path.split("?", 1)[0].split("#", 1)[0].rstrip("/")
        return path

    # -- verbs --------------------------------------------------------------
    def do_GET(self) -> None:
        self._read_body()
        path = self._route(self.path)
        if path in ("/v1/models", "/models"):
            if not self._authorised():
                return self._send_error_json(401)
            return self._send(200, {"object": "list", "data": [self.fake._model_obj(m) for m in self.fake.models]})
        for prefix in ("/v1/models/", "/models/"):
            if path.startswith(prefix):
                if not self._authorised():
                    return self._send_error_json(401)
                mid = path[len(prefix):]
                if mid in self.fake.models:
                    return self._send(200, self.fake._model_obj(mid))
                return self._send_error_json(404, f"The model '{mid}' does not exist")
        self._send_error_json(404, f"Unknown path: {self.command} {path}")

    def do_POST(self) -> None:
        raw = self._read_body()
        path = self._route(self.path)
        if path in ("/v1/chat/completions", "/chat/completions"):
            return self.fake._handle_chat(self, raw)
        self._send_error_json(404, f"Unknown path: {self.command} {path}")

    def _not_found(self) -> None:
        self._read_body()
        self._send_error_json(404, f"Unknown path: {self.command} {self._route(self.path)}")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_found


# --------------------------------------------------------------------------- the server


class FakeLLMServer:
    """Scriptable OpenAI chat-completions server on 127.0.0.1 (see module docstring)."""

    def __init__(self, latency: float = 0.0, reply: Optional[Callable[[dict], Any]] = None,
                 api_key: Optional[str] = None, models=("test-model",), unknown_model: Optional[int] = None,
                 structured_outputs: bool = True):
        self.latency = float(latency)
        self.structured_outputs = structured_outputs
        self.unknown_model = unknown_model
        self.reply = reply
        self.api_key = api_key
        self.models = tuple(models)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.request_times: list[float] = []
        self.peers: list[tuple] = []
        self.max_in_flight = 0
        self.in_flight = 0
        self.base_url = ""
        self.port = 0
        self._lock = threading.Lock()
        self._queue: collections.deque = collections.deque()
        self._stop = threading.Event()
        self._conns: set = set()
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._counter = 0
        self._gate = threading.Event()
        self._gate.set()
        self._hold_from = 0
        self.held = 0

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "FakeLLMServer":
        if self._httpd is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"fake": self})
        self._stop.clear()
        self._httpd = _HTTPServer((HOST, 0), handler)
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://{HOST}:{self.port}/v1"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"FakeLLMServer:{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop.set()  # wakes hang()/latency sleeps
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # unblock keep-alive handler threads waiting for a next request
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- scripting --------------------------------------------------------------
    def script(self, *actions: Any) -> "FakeLLMServer":
        coerced = [_coerce_action(a) for a in actions]
        with self._lock:
            self._queue.extend(coerced)
        return self

    def hold(self, after: int = 0) -> "FakeLLMServer":
        with self._lock:
            self._hold_from = len(self.requests) + after
            self._gate.clear()
        return self

    def release(self) -> None:
        self._gate.set()

    def clear_script(self) -> None:
        with self._lock:
            self._queue.clear()

    @property
    def pending_actions(self) -> int:
        with self._lock:
            return len(self._queue)

    def chat_requests(self) -> list[dict]:
        with self._lock:
            return list(self.requests)

    # -- internals -------------------------------------------------------------
    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _model_obj(self, m: str) -> dict:
        return {"id": m, "object": "model", "created": 0, "owned_by": "test"}

    def _sleep(self, seconds: float) -> None:
        """Sleep, but raise _Abort if the server is shutting down."""
        if seconds > 0 and self._stop.wait(seconds):
            raise _Abort()
        if self._stop.is_set():
            raise _Abort()

    def _wait_at_gate(self) -> None:
        with self._lock:
            self.held += 1
        try:
            while not self._gate.wait(0.05):
                if self._stop.is_set():
                    raise _Abort()
        finally:
            with self._lock:
                self.held -= 1

    def _handle_chat(self, h: _Handler, raw: bytes) -> None:
        arrival = time.monotonic()
        try:
            body = json.loads(raw.decode("utf-8")) if raw else {}
        except (ValueError, UnicodeDecodeError):
            return h._send_error_json(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return h._send_error_json(400, "Request body must be a JSON object.")
        authorised = h._authorised()
        refused = self._refuses_model(body) or self._refuses_format(body)  # (status, body) or None
        with self._lock:
            held = not self._gate.is_set() and len(self.requests) >= self._hold_from
            self.requests.append(body)
            self.headers.append(_Headers(h.headers.items()))
            self.request_times.append(arrival)
            self.peers.append(tuple(h.client_address[:2]))
            action = self._queue.popleft() if (authorised and not refused and self._queue) else None
            self.in_flight += 1
            if self.in_flight > self.max_in_flight:
                self.max_in_flight = self.in_flight
        try:
            if held:
                self._wait_at_gate()
            self._sleep(self.latency)
            if not authorised:
                return h._send_error_json(401)
            if refused:
                return h._send(*refused)
            self._perform(h, body, action)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _refuses_model(self, body: dict) -> Optional[tuple]:
        """The status and error body for a model this server does not serve, or None (see ``unknown_model``)."""
        asked = body.get("model")
        if self.unknown_model is None or asked in self.models:
            return None
        if self.unknown_model == 400:
            pinned = self.models[0] if self.models else ""
            return 400, {"detail": f"Server is pinned to '{pinned}'; requested '{asked}'."}
        return self.unknown_model, {"error": {"message": f"The model `{asked}` does not exist.",
                                              "type": "invalid_request_error", "param": "model",
                                              "code": "model_not_found"}}

    def _refuses_format(self, body: dict) -> Optional[tuple]:
        """The status and error body for a response_format this server does not take, or None (see
        ``structured_outputs``)."""
        if self.structured_outputs or "response_format" not in body:
            return None
        return 400, {"error": {"message": "response_format is not supported by this server",
                               "type": "invalid_request_error", "param": "response_format", "code": None}}

    def _perform(self, h: _Handler, body: dict, action: Optional[Action]) -> None:
        if isinstance(action, Status):
            payload = error_body(action.code) if action.body is None else action.body
            ctype = "application/json" if isinstance(payload, (dict, list)) else "text/plain; charset=utf-8"
            if action.headers:
                for k, v in action.headers.items():
                    if k.lower() == "content-type":
                        ctype = v
            hdrs = {k: v for k, v in (action.headers or {}).items() if k.lower() != "content-type"}
            return h._send(action.code, payload, ctype, hdrs)
        if isinstance(action, Reset):
            return h._reset()
        if isinstance(action, InvalidJSON):
            return h._send(200, action.body, "application/json")
        if isinstance(action, Reply):
            return self._send_completion(h, body, action.text, action.finish_reason, action.extra)
        if isinstance(action, Hang):
            self._sleep(action.seconds)
        # normal answer: reply callable or default text
        if self.reply is not None:
            try:
                out = self.reply(body)
            except Exception as e:  # surface test bugs as a 500
                return h._send_error_json(500, f"reply callable raised {type(e).__name__}: {e}")
            if isinstance(out, _ACTION_TYPES) or (isinstance(out, tuple) and out and isinstance(out[0], str)):
                act = _coerce_action(out)
                if isinstance(act, Hang):  # hang then answer with the default text
                    self._sleep(act.seconds)
                    return self._send_completion(h, body, default_reply_text(body), "stop", {})
                return self._perform(h, body, act)
            if isinstance(out, dict):
                if "choices" in out:
                    return h._send(200, out)
                extra = {k: v for k, v in out.items() if k not in ("content", "finish_reason")}
                return self._send_completion(h, body, out.get("content"), out.get("finish_reason", "stop"), extra)
            return self._send_completion(h, body, None if out is None else str(out), "stop", {})
        return self._send_completion(h, body, default_reply_text(body), "stop", {})

    def _send_completion(self, h: _Handler, body: dict, text: Optional[str], finish_reason: str,
                         extra: dict) -> None:
        with self._lock:
            self._counter += 1
            n = self._counter
        cid = f"chatcmpl-{n:06d}{uuid.uuid4().hex[:18]}"
        model = body.get("model") or (self.models[0] if self.models else "test-model")
        created = int(time.time())
        try:
            prompt_len = len(json.dumps(body.get("messages", "")))
        except (TypeError, ValueError):
            prompt_len = 0
        pt = max(1, prompt_len // 4)
        ct = len(text or "") // 4
        usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
        message = {"role": "assistant", "content": text}
        message.update(extra or {})
        if body.get("stream"):
            delta = dict(message)
            base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
            chunks = [
                {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
                {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]},
            ]
            if (body.get("stream_options") or {}).get("include_usage"):
                chunks.append({**base, "choices": [], "usage": usage})
            sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return h._send(200, sse, "text/event-stream")
        resp = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage,
            "system_fingerprint": "fp_fake",
        }
        h._send(200, resp)
