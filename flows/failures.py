"""Which failures the flows retry, and the one-line reason a failed flow run carries.

Retries (:func:`transient`, every task's ``retry_condition_fn``): only errors that another
attempt can fix: network and storage I/O (``OSError`` other than a missing or forbidden
path), and a Ray process or node lost under the job. Configuration and data errors
(``ValueError`` and its kin: an unknown config key, missing shards, a malformed suite), an
unreachable tracking server (:class:`clip_train.tracking.TrackingUnreachableError`) and a
missing file fail at once. The classes are listed by name in tables, never matched by
substring.

Reasons (:func:`one_line_failures`): a flow body runs inside it, so the exception that fails
the run, and therefore the state message Prefect shows in the UI and in ``prefect deployment
run --watch``, is one line naming the error: multi-line messages (Ray's wrapped worker
tracebacks) become :class:`FlowFailureError` with their first line, chained to the original.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Errors a retry cannot fix, even when they are ``OSError`` subclasses.
DETERMINISTIC: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    LookupError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
)
#: ``ray.exceptions`` classes meaning a Ray process or node went away (a retry may succeed).
LOST_RAY_PROCESS = (
    "ActorDiedError",
    "ActorUnavailableError",
    "NodeDiedError",
    "WorkerCrashedError",
    "ObjectLostError",
    "OwnerDiedError",
    "RaySystemError",
)
#: Longest reason kept on a failed state (the rest stays in the chained exception).
MAX_REASON = 400


class FlowFailureError(RuntimeError):
    """A flow run failed; the message is the one-line reason (the cause is chained)."""


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the worker failures Ray Train wraps."""
    seen: set[int] = set()
    out: list[BaseException] = []
    stack: list[BaseException | None] = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        out.append(cur)
        stack += [cur.__cause__, cur.__context__, *getattr(cur, "exceptions", [])]
        stack += list(getattr(cur, "worker_failures", {}).values())
    return out


def _lost_ray_classes() -> tuple[type[BaseException], ...]:
    try:
        import ray.exceptions as rex
    except ImportError:  # pragma: no cover - ray is a dependency
        return ()
    return tuple(getattr(rex, name) for name in LOST_RAY_PROCESS if hasattr(rex, name))


def is_transient(exc: BaseException) -> bool:
    """True when another attempt may succeed (see the module doc)."""
    from clip_train.tracking import TrackingUnreachableError

    chain = _chain(exc)
    if any(isinstance(e, (*DETERMINISTIC, TrackingUnreachableError)) for e in chain):
        return False
    lost = _lost_ray_classes()
    return any(isinstance(e, OSError) or (lost and isinstance(e, lost)) for e in chain)


def transient(_task: Any, _run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only a transient failure (:func:`is_transient`)."""
    exc = getattr(state, "data", None)
    return isinstance(exc, BaseException) and is_transient(exc)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most ``MAX_REASON`` characters)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


@contextmanager
def one_line_failures() -> Iterator[None]:
    """Run a flow body; a failure with a multi-line message leaves as :class:`FlowFailureError`."""
    try:
        yield
    except FlowFailureError:
        raise
    except Exception as exc:
        message = str(exc)
        if "\n" not in message.strip() and len(message) <= MAX_REASON:
            raise  # already one line: keep its type (callers catch it)
        raise FlowFailureError(one_line(exc)) from exc
