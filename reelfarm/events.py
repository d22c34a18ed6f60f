"""Run events: what the farm and the run report as they go, for progress displays and logs.

The farm and the run function publish :class:`RunEvent` s on a process-wide bus; the CLI
subscribes a display (live per-shot progress on a terminal, a line per event in a pipe,
JSON lines with ``--json``). Publishing is synchronous and cheap; a subscriber that fails
is logged and dropped, never allowed to fail a render. Nothing here imports Ray or Prefect.

Kinds: ``run_start`` (shots, chunks, est_s), ``chunk_cached``, ``chunk_start``,
``chunk_done``, ``chunk_retry``, ``chunk_failed``, ``worker_up``, ``worker_lost``,
``stitch_start``, ``stitch_done``, ``run_done``, ``interrupted``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RunEvent", "emit", "subscribe", "subscribed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunEvent:
    """One thing that happened in a run. Fields that do not apply are None."""

    kind: str
    at: float = field(default_factory=time.time)  # unix seconds
    run_id: str | None = None
    cell: str | None = None
    shot: str | None = None
    chunk: str | None = None  # chunk name: <shot>/chunk-<first>-<last>
    key: str | None = None
    worker: str | None = None
    frames: int | None = None
    seconds: float | None = None  # chunk: render seconds; run: elapsed
    est_s: float | None = None  # planned GPU-seconds (chunk, or the run's total)
    attempt: int | None = None
    error: str | None = None
    detail: dict[str, Any] | None = None  # run_start: {"shots": {shot: chunks}}, ...

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


_lock = threading.Lock()
_subscribers: list[Callable[[RunEvent], None]] = []


def subscribe(fn: Callable[[RunEvent], None]) -> Callable[[], None]:
    """Call ``fn`` with every event from now on; returns the function that unsubscribes."""
    with _lock:
        _subscribers.append(fn)

    def unsubscribe() -> None:
        with _lock:
            if fn in _subscribers:
                _subscribers.remove(fn)

    return unsubscribe


@contextmanager
def subscribed(fn: Callable[[RunEvent], None]) -> Iterator[None]:
    unsubscribe = subscribe(fn)
    try:
        yield
    finally:
        unsubscribe()


def emit(kind: str, **fields: Any) -> None:
    """Publish one event to every subscriber (none: nearly free)."""
    if not _subscribers:
        return
    event = RunEvent(kind, **fields)
    with _lock:
        subscribers = list(_subscribers)
    for fn in subscribers:
        try:
            fn(event)
        except Exception:  # noqa: BLE001 - a display must never fail a render
            logger.exception("run event subscriber failed; dropped")
            with _lock:
                if fn in _subscribers:
                    _subscribers.remove(fn)
