"""The scoring server's guard: a request size cap and error bodies that do not echo the input.

MLflow's scoring server (a FastAPI app run by uvicorn) reads each request body whole, and
its error bodies quote the input: the raw body for invalid JSON, the parsed table for a model
error, the Content-Type for an unsupported one, sometimes with a stack trace.
:class:`RequestGuard`, a pure ASGI middleware around that app, changes two things:

- **size cap**: a request whose ``Content-Length`` is over ``$CLIPOPS_SERVE_MAX_REQUEST_BYTES``
  (default 32 MiB) gets HTTP 413 before any of its body is read. A body without a length
  (chunked) is read up to the cap and rejected once it goes past it. The body must arrive
  within ``$MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` seconds (MLflow's, default 60; 408
  otherwise).
- **error bodies**: every 4xx and 5xx body becomes one line of JSON, ``{"error_code": ...,
  "message": ...}``, built only from fixed text, field names and positions. The model's own
  errors (:class:`clip_registry.request.RequestError`) arrive through
  :func:`report_request_error` in their ``public`` form. MLflow's own errors are recognised
  by their fixed wording. 5xx details and stack traces go to the server log only.

The guard is in front of the model both ways it is served:

- ``clipops serve -m models:/NAME@champion`` (:func:`run_serve`) wraps MLflow's own scoring
  app (``mlflow.pyfunc.scoring_server.init``) and runs it with uvicorn;
- under ``mlflow models serve`` the model installs it while MLflow's app module loads the
  model (:func:`install_in_mlflow_scoring_server`, called from ``load_context``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import types
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from contextvars import ContextVar
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]

MAX_REQUEST_BYTES_ENV = "CLIPOPS_SERVE_MAX_REQUEST_BYTES"
DEFAULT_MAX_REQUEST_BYTES = 32 << 20
#: MLflow's request timeout (seconds); the guard applies it to receiving the body too.
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
#: The local model directory ``clipops serve`` hands its uvicorn workers.
MODEL_PATH_ENV = "CLIPOPS_SERVE_MODEL_PATH"

_MLFLOW_APP_MODULE = "mlflow.pyfunc.scoring_server.app"
_PARAMS = ("task", "labels", "templates")
_COLUMNS = ("image", "text")
_FORMATS = "dataframe_split, dataframe_records, instances, inputs"
_SPLIT = 'dataframe_split must be {"columns": [...], "data": [[...], ...]}'
_CODE = re.compile(r"[A-Z][A-Z_]{0,63}")
_DEFAULT_CODES = {
    404: "ENDPOINT_NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "REQUEST_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}
_UNEXPECTED = "Encountered an unexpected error while evaluating the model"
#: MLflow's error messages (after its "Invalid input. " prefix) -> what the client gets.
_MLFLOW_MESSAGES = (
    ("Ensure that input is a valid JSON", "the request body is not valid JSON (UTF-8)"),
    ("Ensure that input is a valid UTF-8", "the request body is not valid UTF-8"),
    (
        "The input must be a JSON dictionary",
        f"the request must be a JSON object with exactly one of the fields {_FORMATS} "
        "(and optionally params)",
    ),
    ("Dataframe split format", _SPLIT),
    ("Provided dataframe_split", _SPLIT),
    ("Dataframe records format", "dataframe_records must be a list of row objects"),
    ("Provided dataframe_records", "dataframe_records must be a list of row objects"),
    (
        "Failed to parse input as a Pandas DataFrame. Ensure that the input is a valid CSV",
        "the request body is not a valid CSV table",
    ),
    (
        "Failed to parse input as a Pandas DataFrame. Ensure that the input is a valid Parquet",
        "the request body is not a valid Parquet table",
    ),
    (_UNEXPECTED, "the model failed on this input (details in the server log)"),
)

_log = logging.getLogger(__name__)
_REPORTED: ContextVar[list[str] | None] = ContextVar("clipops_request_errors", default=None)


def max_request_bytes() -> int:
    """``$CLIPOPS_SERVE_MAX_REQUEST_BYTES``: a positive number of bytes, default 32 MiB."""
    raw = os.environ.get(MAX_REQUEST_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_REQUEST_BYTES
    value = int(raw) if raw.isdigit() else 0
    if value <= 0:
        raise ValueError(f"${MAX_REQUEST_BYTES_ENV}={raw!r} is not a positive number of bytes")
    return value


def _body_timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    return float(raw) if raw.isdigit() and int(raw) > 0 else 60.0


def report_request_error(public: str) -> None:
    """Record a data-free reason for this request's error; the guard sends it to the client.

    A no-op outside a request served through :class:`RequestGuard` (e.g. in-process calls).
    """
    reported = _REPORTED.get()
    if reported is not None:
        reported.append(public)


def public_error(status: int, body: bytes, reported: Sequence[str] = ()) -> tuple[str, str]:
    """``(error_code, message)`` for an error response of MLflow's app, free of request data.

    ``reported`` (the model's :func:`report_request_error` reasons) wins for a 4xx; otherwise
    the message comes from :data:`_MLFLOW_MESSAGES` or other fixed text. MLflow's
    ``error_code`` is kept when it is an upper-case identifier.
    """
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    fields = parsed if isinstance(parsed, dict) else {}
    code = str(fields.get("error_code", ""))
    if not _CODE.fullmatch(code):
        code = _DEFAULT_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
    message = str(fields.get("message", ""))
    if "stack_trace" in fields and (status >= 500 or message.startswith(_UNEXPECTED)):
        _log.warning("scoring error %s (HTTP %d): %s", code, status, fields["stack_trace"])
    if status == 504:
        return code, "the request took longer than the server's time limit"
    if status >= 500:
        _log.error("scoring error %s (HTTP %d): %.2000s", code, status, message or body)
        return code, "the request failed on the server (details in the server log)"
    if reported:
        return code, f"clipops: {reported[-1]}"
    return code, _describe(status, message)


def _describe(status: int, message: str) -> str:
    """A fixed description of MLflow's 4xx ``message`` (which may quote the request)."""
    if status == 404:
        return "not found: the endpoints are POST /invocations, GET /ping, /health, /version"
    if status == 405:
        return "method not allowed: POST /invocations; GET /ping, /health, /version"
    if status == 415:
        return (
            "unsupported Content-Type: send application/json (charset utf-8), text/csv "
            "or application/vnd.apache.parquet"
        )
    head = message.removeprefix("Invalid input. ")
    for prefix, reply in _MLFLOW_MESSAGES:
        if head.startswith(prefix):
            return reply
    if head.startswith("Failed to predict data"):
        return _model_input_error(head)
    return f"the request was rejected (HTTP {status})"


def _model_input_error(message: str) -> str:
    """MLflow's signature checks of the model's input and params (the message quotes both)."""
    if "Invalid parameters found" in message:
        names = [f"params.{p}" for p in _PARAMS if f"for '{p}'" in message] or ["params"]
        verb = "has" if len(names) == 1 else "have"
        return (
            f"{', '.join(names)} {verb} the wrong type (task is a string; labels and templates "
            "are lists of strings)"
        )
    if "Parameters must be a dictionary" in message:
        return "params must be a JSON object"
    column = re.search(r"for column (\w+)", message)
    if column and column.group(1) in _COLUMNS:
        return f"column '{column.group(1)}' does not match the model signature (a string)"
    return "the input does not match the model signature: columns image and/or text, strings"


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": " ".join(message.split())}).encode()


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = _error_body(code, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLargeError(Exception):
    """The body went past the cap while it was read."""


class _ErrorBodies:
    """A ``send`` that passes successful responses through and rewrites error bodies."""

    def __init__(self, send: Send, reported: list[str]) -> None:
        self.send = send
        self.reported = reported
        self.status: int | None = None  # set while an error response is being collected
        self.parts: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start" and int(message["status"]) >= 400:
            self.status = int(message["status"])
            return
        if kind != "http.response.body" or self.status is None:
            await self.send(message)
            return
        self.parts.append(bytes(message.get("body", b"")))
        if not message.get("more_body", False):
            code, text = public_error(self.status, b"".join(self.parts), self.reported)
            await _send_error(self.send, self.status, code, text)


class RequestGuard:
    """ASGI middleware around MLflow's scoring app: size cap and data-free error bodies."""

    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_request_bytes() if max_bytes is None else max_bytes
        self.timeout_s = _body_timeout_s()

    def _too_large(self) -> str:
        return (
            f"the request body is larger than this server's limit of {self.max_bytes} bytes; "
            "send fewer rows per request"
        )

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope (non-HTTP scopes pass through untouched)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _send_error(send, 413, _code(413), self._too_large())  # h11 checks the syntax
            return
        if scope.get("path") == "/invocations" and b"content-type" not in headers:  # else 500
            await _send_error(send, 415, _code(415), "send a Content-Type: application/json")
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.timeout_s)
        except _TooLargeError:
            await _send_error(send, 413, _code(413), self._too_large())
            return
        except TimeoutError:
            reason = f"the request body did not arrive within {self.timeout_s:g} s"
            await _send_error(send, 408, _code(408), reason)
            return
        if body is None:  # the client left
            return
        reported: list[str] = []
        token = _REPORTED.set(reported)
        try:
            await self.app(scope, _replay(body, receive), _ErrorBodies(send, reported))
        finally:
            _REPORTED.reset(token)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body (None if the client left first); over the cap: _TooLargeError."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLargeError
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _code(status: int) -> str:
    return _DEFAULT_CODES.get(status, "BAD_REQUEST")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then the connection's events."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class _GuardedAppModule(types.ModuleType):
    """MLflow's ``scoring_server.app`` module, whose ``app`` is read through the guard."""

    @property
    def app(self) -> RequestGuard:
        """The module's own ``app`` (MLflow's FastAPI app) behind :class:`RequestGuard`."""
        own = vars(self)
        if "app" not in own:
            raise AttributeError("app")
        guarded = own.get("_clipops_guarded")
        if not isinstance(guarded, RequestGuard) or guarded.app is not own["app"]:
            guarded = own["_clipops_guarded"] = RequestGuard(own["app"])
        return guarded


def install_in_mlflow_scoring_server() -> bool:
    """Put :class:`RequestGuard` in front of MLflow's scoring app while it loads this model.

    ``mlflow models serve`` runs ``uvicorn mlflow.pyfunc.scoring_server.app:app``. That module
    loads the model (``load_context`` calls this) before it assigns ``app``; the module then
    hands uvicorn its ``app`` behind the guard. Returns whether the guard is in place: False
    outside that module's import (in-process use, ``clipops serve``, which wraps the app
    itself). A bad ``$CLIPOPS_SERVE_MAX_REQUEST_BYTES`` fails here, so the model fails to load.
    """
    module = sys.modules.get(_MLFLOW_APP_MODULE)
    if module is None or "app" in vars(module):
        return False
    max_request_bytes()
    if type(module) is types.ModuleType:
        module.__class__ = _GuardedAppModule
    return isinstance(module, _GuardedAppModule)


def create_app() -> RequestGuard:
    """The uvicorn app factory of ``clipops serve``: MLflow's scoring app behind the guard."""
    from mlflow.pyfunc import load_model, scoring_server

    return RequestGuard(scoring_server.init(load_model(os.environ[MODEL_PATH_ENV])))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``clipops serve``."""
    p.add_argument("-m", "--model-uri", required=True, help="e.g. models:/clip-vit-b32@champion")
    p.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    p.add_argument("-p", "--port", type=int, default=5000, help="port (default: 5000)")
    p.add_argument("-w", "--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help=f"request body cap (default: ${MAX_REQUEST_BYTES_ENV}, else 32 MiB)",
    )
    p.add_argument(
        "--timeout",
        type=int,
        default=None,
        help=f"seconds per request (default: ${TIMEOUT_ENV}, else 60)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db",
    )


def run_serve(args: argparse.Namespace) -> int:
    """``clipops serve``: fetch the model once, then serve it behind the guard; exit code."""
    import uvicorn
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from clip_train.tracking import resolve_tracking_uri

    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(args.tracking_uri)
    if args.max_request_bytes is not None:
        os.environ[MAX_REQUEST_BYTES_ENV] = str(args.max_request_bytes)
    if args.timeout is not None:
        os.environ[TIMEOUT_ENV] = str(args.timeout)
    try:
        max_request_bytes()
        if args.workers < 1 or (args.timeout is not None and args.timeout < 1):
            raise ValueError("--workers and --timeout must be >= 1")
        os.environ[MODEL_PATH_ENV] = download_artifacts(artifact_uri=args.model_uri)
    except (ValueError, MlflowException, OSError) as exc:
        print(f"clipops serve: error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        "clip_registry.serving:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
    )
    return 0
