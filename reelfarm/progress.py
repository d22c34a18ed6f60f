"""Showing a run as it goes, the way a render-farm monitor does: per shot, chunks done,
running and queued, frames, elapsed and ETA, GPU-seconds spent against the plan, workers
busy, retries.

Three displays over one :class:`ProgressState`, fed by :mod:`reelfarm.events`:
- :class:`LiveDisplay`: rich's live progress bars, on a terminal;
- :class:`LineDisplay`: one plain line per event (a pipe, a log file, CI);
- :class:`JsonDisplay`: one JSON object per line (``--json``), for machines.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from reelfarm.events import RunEvent

__all__ = ["JsonDisplay", "LineDisplay", "LiveDisplay", "ProgressState", "display_for"]


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


@dataclass
class ShotState:
    chunks: int = 0
    frames: int = 0
    done: int = 0
    cached: int = 0
    failed: int = 0
    frames_done: int = 0
    running: set[str] = field(default_factory=set)

    @property
    def queued(self) -> int:
        return max(0, self.chunks - self.done - self.cached - self.failed - len(self.running))


class ProgressState:
    """Counts kept from run events (one run, or every cell of a campaign)."""

    def __init__(self) -> None:
        self.shots: dict[str, ShotState] = {}
        self.started = time.monotonic()
        self.est_total = 0.0
        self.est_done = 0.0
        self.gpu_s = 0.0
        self.retries = 0
        self.workers: dict[str, str] = {}  # worker -> chunk it runs
        self.stage = "planning"

    def _shot(self, ev: RunEvent) -> ShotState:
        name = f"{ev.cell}/{ev.shot}" if ev.cell else str(ev.shot)
        return self.shots.setdefault(name, ShotState())

    def apply(self, ev: RunEvent) -> None:
        k = ev.kind
        if k == "run_start":
            detail = ev.detail or {}
            for shot, n in detail.get("shots", {}).items():
                name = f"{ev.cell}/{shot}" if ev.cell else shot
                self.shots[name] = ShotState(chunks=n, frames=detail.get("frames", {}).get(shot, 0))
            self.est_total += ev.est_s or 0.0
            self.stage = "rendering"
        elif k == "chunk_cached":
            st = self._shot(ev)
            st.cached += 1
            st.frames_done += ev.frames or 0
        elif k == "chunk_start":
            self._shot(ev).running.add(str(ev.key))
            self.workers[str(ev.worker)] = str(ev.chunk)
        elif k in ("chunk_done", "chunk_failed", "chunk_retry"):
            st = self._shot(ev)
            st.running.discard(str(ev.key))
            if ev.worker and self.workers.get(ev.worker) == ev.chunk:
                del self.workers[ev.worker]
            if k == "chunk_done":
                st.done += 1
                st.frames_done += ev.frames or 0
                self.gpu_s += ev.seconds or 0.0
                self.est_done += ev.est_s or 0.0
            elif k == "chunk_failed":
                st.failed += 1
            else:
                self.retries += 1
        elif k == "worker_lost":
            self.workers.pop(str(ev.worker), None)
        elif k == "stitch_start":
            self.stage = "stitching"
        elif k == "run_done":
            self.stage = "done"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self) -> float | None:
        """Seconds left: planned GPU-seconds left at the rate planned work has been done."""
        if self.est_done <= 0 or self.est_total <= 0:
            return None
        left = max(0.0, self.est_total - self.est_done - self._cached_est())
        return self.elapsed * left / self.est_done

    def _cached_est(self) -> float:
        chunks = sum(s.chunks for s in self.shots.values()) or 1
        return self.est_total * sum(s.cached for s in self.shots.values()) / chunks

    def totals(self) -> dict[str, int]:
        s = self.shots.values()
        return {"chunks": sum(x.chunks for x in s), "done": sum(x.done for x in s),
                "cached": sum(x.cached for x in s), "running": sum(len(x.running) for x in s),
                "failed": sum(x.failed for x in s), "queued": sum(x.queued for x in s)}

    def summary_line(self) -> str:
        t = self.totals()
        return (f"{t['done'] + t['cached']}/{t['chunks']} chunks ({t['cached']} cached, {t['running']} running, "
                f"{t['queued']} queued, {t['failed']} failed) · GPU-s {self.gpu_s:,.1f} of "
                f"{self.est_total:,.1f} planned · workers busy {len(self.workers)} · retries {self.retries} · "
                f"elapsed {_clock(self.elapsed)} · ETA {_clock(self.eta())}")


class JsonDisplay:
    """One JSON object per event, one per line."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, ev: RunEvent) -> None:
        self.stream.write(json.dumps(ev.to_json(), sort_keys=True) + "\n")
        self.stream.flush()

    def __enter__(self) -> JsonDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class LineDisplay:
    """A plain line per event, for pipes and logs: no cursor movement, no colour."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.state = ProgressState()

    def __call__(self, ev: RunEvent) -> None:
        self.state.apply(ev)
        if ev.kind == "chunk_cached":
            return  # counted; listing every cached chunk would drown the log
        shot = self.state.shots.get(f"{ev.cell}/{ev.shot}" if ev.cell else str(ev.shot))
        where = f" {ev.chunk}" if ev.chunk else ""
        who = f" on {ev.worker}" if ev.worker else ""
        took = f" in {ev.seconds:.1f} s" if ev.seconds is not None and ev.kind == "chunk_done" else ""
        err = f": {ev.error}" if ev.error else ""
        per_shot = (f" [shot {ev.shot} {shot.done + shot.cached}/{shot.chunks}]"
                    if shot is not None and ev.shot else "")
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.at))
        self.stream.write(f"{stamp} {ev.kind}{where}{who}{took}{err}{per_shot} | {self.state.summary_line()}\n")
        self.stream.flush()

    def __enter__(self) -> LineDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class LiveDisplay:
    """Live progress bars on a terminal: one per shot, and a farm line under them."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.state = ProgressState()
        self.progress = Progress(TextColumn("{task.description}", style="bold"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 console=console, expand=False)
        self.tasks: dict[str, Any] = {}
        self.footer = Text("")
        self.live = Live(Group(self.progress, self.footer), console=console, refresh_per_second=4,
                         transient=False)

    def __call__(self, ev: RunEvent) -> None:
        self.state.apply(ev)
        for name, st in self.state.shots.items():
            info = (f"{st.frames_done}/{st.frames} frames · {len(st.running)} running · {st.queued} queued"
                    + (f" · [red]{st.failed} failed[/]" if st.failed else ""))
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(name, total=st.chunks or 1, info=info)
            self.progress.update(self.tasks[name], completed=st.done + st.cached, info=info)
        self.footer.plain = f"{self.state.stage}: {self.state.summary_line()}"

    def __enter__(self) -> LiveDisplay:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()


def display_for(console: Console, *, as_json: bool) -> JsonDisplay | LineDisplay | LiveDisplay:
    """JSON lines when asked; live bars on a terminal; else a line per event."""
    if as_json:
        return JsonDisplay()
    if console.is_terminal:
        return LiveDisplay(console)
    return LineDisplay()
