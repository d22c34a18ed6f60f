"""The report's charts: the farm's worker timeline, planned against actual GPU-seconds per
shot, and seam scores along the film, drawn with matplotlib (Agg) as PNG bytes.

The data functions (:func:`chunk_spans`, :func:`worker_usage`, :func:`seam_points`) are
plain Python the report's tables use too; matplotlib is imported only to draw.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from reelfarm.render.seams import SEAM_WARN
from reelfarm.schemas.plan import RenderPlan

if TYPE_CHECKING:
    import pyarrow as pa
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = [
    "CHARTS",
    "ChunkSpan",
    "SeamPoint",
    "WorkerUsage",
    "chunk_spans",
    "gpu_seconds_chart",
    "identity_chart",
    "seam_points",
    "seams_chart",
    "shot_spans",
    "timeline_chart",
    "worker_usage",
    "write_charts",
]

CHARTS = ("timeline", "gpu", "seams", "identity")  # the names write_charts gives its PNGs
DPI = 120
WIDTH_IN = 10.0
INK, MUTED, GRID = "#222222", "#777777", "#e6e6e6"
PLANNED, ACTUAL, OVER, BAD, IDLE = "#c9ced6", "#2f6db5", "#e08a1e", "#c62828", "#f3d9d9"


# --- data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkSpan:
    """One chunk on one worker, in seconds since the run's first chunk was handed out.

    ``start`` is when the worker began rendering: ``finished_at - render_s`` when both are
    known (the farm hands each worker a second chunk while it renders one, so
    ``started_at`` also counts time spent queued), else ``started_at``.
    """

    worker: str
    node: str
    shot_id: str
    chunk_name: str
    start: float
    end: float
    status: str


@dataclass(frozen=True)
class WorkerUsage:
    """A worker's busy time and its idle gaps inside the run's window."""

    node: str
    busy_s: float
    window_s: float
    gaps: tuple[tuple[float, float], ...]

    @property
    def utilisation(self) -> float:
        return self.busy_s / self.window_s if self.window_s > 0 else 0.0

    @property
    def idle_s(self) -> float:
        return max(self.window_s - self.busy_s, 0.0)


@dataclass(frozen=True)
class SeamPoint:
    """One chunk boundary: where it falls in the film and how visible it is."""

    shot_id: str
    index: int  # the boundary's number inside its shot, from 1
    film_s: float
    score: float

    @property
    def flagged(self) -> bool:
        return self.score > SEAM_WARN


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def chunk_spans(plan: RenderPlan, manifest: pa.Table | None) -> tuple[list[ChunkSpan], datetime | None]:
    """The plan's chunks that ran on a worker in this manifest, as time spans.

    Rows without a worker or a finish time (cached chunks, chunks still queued) are left
    out, and so are rows of other plans. Returns the spans and the time they count from.
    """
    if manifest is None or manifest.num_rows == 0:
        return [], None
    keys = {c.key for c in plan.chunks}
    names = ("content_key", "worker", "node", "shot_id", "chunk_name", "started_at", "finished_at",
             "render_s", "status")
    cols = {n: _column(manifest, n) for n in names}
    raw: list[tuple[dict[str, Any], datetime, datetime]] = []
    for i in range(manifest.num_rows):
        row = {n: cols[n][i] for n in names}
        started, finished = row["started_at"], row["finished_at"]
        if row["content_key"] not in keys or not row["worker"] or finished is None:
            continue
        render_s = row["render_s"]
        if render_s is not None and not math.isnan(render_s):
            started = finished - timedelta(seconds=float(render_s))
        if started is None or started > finished:
            continue
        raw.append((row, started, finished))
    if not raw:
        return [], None
    t0 = min(s for _, s, _ in raw)
    spans = [ChunkSpan(str(r["worker"]), str(r["node"] or ""), str(r["shot_id"]), str(r["chunk_name"]),
                       (s - t0).total_seconds(), (f - t0).total_seconds(), str(r["status"]))
             for r, s, f in raw]
    return sorted(spans, key=lambda sp: (sp.worker, sp.start)), t0


def worker_usage(spans: Sequence[ChunkSpan]) -> dict[str, WorkerUsage]:
    """Per worker: busy seconds (the union of its spans) and idle gaps in the run's window.

    The window runs from the first chunk started on any worker to the last one finished, so
    a worker that joined late or ran out of work early shows that as idle time.
    """
    if not spans:
        return {}
    lo, hi = min(s.start for s in spans), max(s.end for s in spans)
    usage: dict[str, WorkerUsage] = {}
    for worker in sorted({s.worker for s in spans}):
        mine = sorted((s for s in spans if s.worker == worker), key=lambda s: s.start)
        busy, gaps, at = 0.0, [], lo
        for s in mine:
            if s.start > at:
                gaps.append((at, s.start))
            busy += max(s.end - max(s.start, at), 0.0)
            at = max(at, s.end)
        if hi > at:
            gaps.append((at, hi))
        usage[worker] = WorkerUsage(mine[0].node, busy, hi - lo, tuple(gaps))
    return usage


def seam_points(plan: RenderPlan, seam_scores: Mapping[str, Sequence[float]]) -> list[SeamPoint]:
    """Every seam score placed on the film's clock (shots overlap by their transitions).

    A shot's boundary ``k`` sits in the middle of chunk ``k``'s overlap, where
    :func:`reelfarm.render.seams.iter_blended` measures it.
    """
    points: list[SeamPoint] = []
    fps = float(plan.fps)
    for shot, (_, start_s, _) in zip(plan.shots, shot_spans(plan)):
        chunks = sorted(shot.chunks, key=lambda c: c.index)
        for k, score in enumerate(seam_scores.get(shot.shot_id, ()), start=1):
            frame = chunks[k].frame_start + chunks[k].overlap // 2 if k < len(chunks) else shot.frames
            points.append(SeamPoint(shot.shot_id, k, start_s + frame / fps, float(score)))
    return points


def shot_spans(plan: RenderPlan) -> list[tuple[str, float, float]]:
    """``(shot id, start s, end s)`` on the film's clock."""
    out, at, fps = [], 0, float(plan.fps)
    for i, shot in enumerate(plan.shots):
        start = at - (shot.transition_frames if i else 0)
        out.append((shot.shot_id, start / fps, (start + shot.frames) / fps))
        at = start + shot.frames
    return out


# --- drawing -------------------------------------------------------------------------------------
def _figure(height_in: float) -> Figure:
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot and no global state

    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    fig.set_facecolor("white")
    return fig


def _style(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#bbbbbb")
    ax.tick_params(colors=INK, labelsize=9, length=3)
    ax.set_axisbelow(True)


def _clock(seconds: float, _pos: Any = None) -> str:
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _shot_colours(plan: RenderPlan) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {s.shot_id: cmap((2 * i) % 20 + (i // 10) % 2) for i, s in enumerate(plan.shots)}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def timeline_chart(plan: RenderPlan, spans: Sequence[ChunkSpan], t0: datetime | None) -> bytes:
    """Chunks per worker over time, as a farm monitor draws it: one lane per worker, a bar
    per chunk coloured by shot, idle gaps shaded, utilisation at the lane's end."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    usage = worker_usage(spans)
    lanes = list(usage)
    fig = _figure(1.4 + 0.42 * max(len(lanes), 1))
    ax = fig.add_subplot()
    _style(ax)
    colours = _shot_colours(plan)
    end = max((s.end for s in spans), default=1.0) or 1.0
    for y, worker in enumerate(lanes):
        for a, b in usage[worker].gaps:
            ax.broken_barh([(a, b - a)], (y - 0.4, 0.8), facecolors=IDLE, hatch="///", edgecolor="#e8b4b4",
                           linewidth=0)
        for s in (s for s in spans if s.worker == worker):
            failed = s.status == "failed"
            ax.broken_barh([(s.start, max(s.end - s.start, end / 2000))], (y - 0.34, 0.68),
                           facecolors="white" if failed else colours.get(s.shot_id, ACTUAL),
                           edgecolor=BAD if failed else "white", linewidth=1.2 if failed else 0.6,
                           hatch="xx" if failed else None)
        ax.text(end * 1.01, y, f"{100 * usage[worker].utilisation:.0f}%", va="center", fontsize=9,
                color=INK, fontweight="bold")
    ax.set_yticks(range(len(lanes)), [f"{w}\n{usage[w].node}" if usage[w].node else w for w in lanes],
                  fontsize=8)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, end * 1.07)
    ax.xaxis.set_major_formatter(FuncFormatter(_clock))
    ax.grid(axis="x", color=GRID)
    since = f" since {t0:%Y-%m-%d %H:%M:%S} UTC" if t0 else ""
    ax.set_xlabel(f"elapsed{since}  ·  busy % of the run at the right", fontsize=9, color=MUTED)
    handles = [Patch(facecolor=colours[s.shot_id], label=s.shot_id) for s in plan.shots
               if any(sp.shot_id == s.shot_id for sp in spans)][:16]
    handles += [Patch(facecolor=IDLE, hatch="///", edgecolor="#e8b4b4", label="idle")]
    if any(s.status == "failed" for s in spans):
        handles.append(Patch(facecolor="white", hatch="xx", edgecolor=BAD, label="failed"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 9), fontsize=8,
               frameon=False)
    return _png(fig)


def gpu_seconds_chart(plan: RenderPlan, actual: Mapping[str, float | None]) -> bytes:
    """Planned against actual GPU-seconds per shot, as paired horizontal bars; a shot that
    took more than 1.5x its estimate is drawn in orange and labelled with the ratio."""
    shots = list(plan.shots)
    fig = _figure(1.2 + 0.36 * len(shots))
    ax = fig.add_subplot()
    _style(ax)
    ys = range(len(shots))
    planned = [s.est_gpu_s for s in shots]
    done = [actual.get(s.shot_id) for s in shots]
    ax.barh([y - 0.19 for y in ys], planned, height=0.36, color=PLANNED, label="planned")
    colours = [OVER if a is not None and p > 0 and a > 1.5 * p else ACTUAL for a, p in zip(done, planned)]
    ax.barh([y + 0.19 for y in ys], [a or 0.0 for a in done], height=0.36, color=colours, label="actual")
    top = max([*planned, *(a or 0.0 for a in done), 1e-9])
    for y, a, p in zip(ys, done, planned):
        label = "not run" if a is None else f"{a:,.1f} s" + (f"  ({a / p:.1f}x)" if p > 0 and a > 1.5 * p else "")
        ax.text((a or 0.0) + top * 0.01, y + 0.19, label, va="center", fontsize=8, color=MUTED)
    ax.set_yticks(list(ys), [s.shot_id for s in shots], fontsize=9)
    ax.set_ylim(len(shots) - 0.4, -0.6)
    ax.set_xlim(0, top * 1.22)
    ax.grid(axis="x", color=GRID)
    ax.set_xlabel("GPU-seconds", fontsize=9, color=MUTED)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return _png(fig)


def seams_chart(plan: RenderPlan, points: Sequence[SeamPoint]) -> bytes:
    """Seam scores along the film: a dot per chunk boundary, shots as bands, the
    :data:`SEAM_WARN` line dashed, and boundaries above it as red triangles with a label."""
    fig = _figure(3.0)
    ax = fig.add_subplot()
    _style(ax)
    bands = shot_spans(plan)
    top = max([SEAM_WARN * 1.6, *(p.score * 1.15 for p in points)])
    many = len(bands) > 12
    for i, (shot_id, a, b) in enumerate(bands):
        if i % 2:
            ax.axvspan(a, b, color="#f4f5f7", linewidth=0)
        if len(bands) <= 40:  # shot names along the top, outside the plot
            ax.text((a + b) / 2, 1.01, shot_id, transform=ax.get_xaxis_transform(), ha="left" if many else "center",
                    va="bottom", fontsize=7 if many else 8, color=MUTED, rotation=35 if many else 0,
                    rotation_mode="anchor")
    ax.axhline(SEAM_WARN, color=BAD, linestyle="--", linewidth=1)
    ax.text(bands[-1][2] if bands else 1.0, SEAM_WARN, f" flagged above {SEAM_WARN:g}", color=BAD,
            fontsize=8, va="bottom", ha="right")
    ax.axhline(1.0, color="#9e9e9e", linestyle=":", linewidth=1)
    ok = [p for p in points if not p.flagged]
    bad = [p for p in points if p.flagged]
    ax.scatter([p.film_s for p in ok], [p.score for p in ok], s=28, color=ACTUAL, zorder=3, label="seam")
    ax.scatter([p.film_s for p in bad], [p.score for p in bad], s=70, marker="^", color=BAD, zorder=4,
               label=f"above {SEAM_WARN:g}")
    for p in bad if len(bad) <= 6 else ():  # more than that: the report's table lists them
        ax.annotate(f"{p.shot_id} #{p.index}: {p.score:.2f}", (p.film_s, p.score), textcoords="offset points",
                    xytext=(6, 4), fontsize=8, color=BAD)
    ax.set_ylim(0, top)
    ax.set_xlim(0, bands[-1][2] if bands else 1.0)
    ax.grid(axis="y", color=GRID)
    ax.set_xlabel("film time (s)", fontsize=9, color=MUTED)
    ax.set_ylabel("seam score", fontsize=9, color=MUTED)
    if points:
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.18), ncols=2, fontsize=8, frameon=False)
    return _png(fig)


def identity_chart(plan: RenderPlan, qc: Mapping[str, Any]) -> bytes:
    """Identity against time, one small plot per shot with one line per character; the
    shot's ``qc.min_identity`` dashed, and shots delivered below it titled in red.

    Args:
        plan: the film's plan.
        qc: shot id -> :class:`reelfarm.render.quality.ShotQc`.
    """
    shots = [s for s in plan.shots if qc.get(s.shot_id) is not None and qc[s.shot_id].series]
    cols = min(3, max(len(shots), 1))
    rows = max(1, math.ceil(len(shots) / cols))
    fig = _figure(1.9 * rows + 0.3)
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    names = sorted({n for s in shots for n in qc[s.shot_id].series})
    colour = {n: cmap(i % 10) for i, n in enumerate(names)}
    for k, s in enumerate(shots):
        ax = fig.add_subplot(rows, cols, k + 1)
        _style(ax)
        q = qc[s.shot_id]
        fps = float(s.fps)
        for name, line in q.series.items():
            ax.plot([f / fps for f, _ in line], [v for _, v in line], marker="o", markersize=3, linewidth=1.4,
                    color=colour[name], label=name)
        floor = getattr(s.qc, "min_identity", None) if getattr(s, "qc", None) is not None else None
        if floor is not None:
            ax.axhline(floor, color=BAD, linestyle="--", linewidth=1)
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, max(s.frames - 1, 1) / fps)
        ax.grid(axis="y", color=GRID)
        ax.set_title(s.shot_id + (" (flagged)" if q.flagged else ""), fontsize=9,
                     color=BAD if q.flagged else INK)
        ax.legend(loc="lower left", fontsize=7, frameon=False, ncols=3)
        if k % cols == 0:
            ax.set_ylabel(f"identity ({q.metric})", fontsize=8, color=MUTED)
        ax.set_xlabel("shot time (s)", fontsize=8, color=MUTED)
    return _png(fig)


def write_charts(plan: RenderPlan, manifest: pa.Table | None, actual: Mapping[str, float | None],
                 seam_scores: Mapping[str, Sequence[float]]) -> dict[str, bytes]:
    """Draw every chart that has data. Returns chart name (see :data:`CHARTS`) -> PNG bytes."""
    charts: dict[str, bytes] = {}
    spans, t0 = chunk_spans(plan, manifest)
    if spans:
        charts["timeline"] = timeline_chart(plan, spans, t0)
    charts["gpu"] = gpu_seconds_chart(plan, actual)
    points = seam_points(plan, seam_scores)
    if points:
        charts["seams"] = seams_chart(plan, points)
    from reelfarm.render.quality import shot_qc

    qc = shot_qc(plan, manifest)
    if any(q.series for q in qc.values()):
        charts["identity"] = identity_chart(plan, qc)
    return charts
