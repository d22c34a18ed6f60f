"""Review deliverables: a labelled contact sheet and a plain HTML report of the run.

The report needs no JavaScript: plan against actual GPU-seconds per shot, retries, seam
scores, worker usage and links to every clip. Every string that came from a user or the
manifest is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reelfarm.render.seams import SEAM_WARN
from reelfarm.schemas.plan import RenderPlan

if TYPE_CHECKING:
    import pyarrow as pa

    from reelfarm.render.ffmpeg import MediaProbe

logger = logging.getLogger(__name__)

__all__ = [
    "contact_sheet",
    "manifest_summary",
    "render_report",
    "thumbnail",
    "write_contact_sheet",
]

THUMB_WIDTH = 192
COLUMNS = 6
LABEL_H = 16
_MANIFEST_COLUMNS = ("shot_id", "content_key", "status", "attempts", "worker", "node",
                     "render_s", "est_gpu_s", "error")


def thumbnail(frame: np.ndarray, width: int = THUMB_WIDTH) -> np.ndarray:
    """A small copy of one ``H x W x 3`` uint8 frame, ``width`` pixels wide."""
    img = Image.fromarray(np.ascontiguousarray(frame))
    height = max(1, round(img.height * width / img.width))
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))


def contact_sheet(
    thumbs: Sequence[tuple[str, np.ndarray]], *, columns: int = COLUMNS
) -> Image.Image:
    """A grid of thumbnails, each with its shot id underneath (PIL's default font)."""
    if not thumbs:
        return Image.new("RGB", (THUMB_WIDTH, LABEL_H), "black")
    tw = max(t.shape[1] for _, t in thumbs)
    th = max(t.shape[0] for _, t in thumbs)
    cols = min(columns, len(thumbs))
    rows = math.ceil(len(thumbs) / cols)
    gap = 4
    sheet = Image.new("RGB", (cols * (tw + gap) + gap, rows * (th + LABEL_H + gap) + gap),
                      (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (label, thumb) in enumerate(thumbs):
        x = gap + (i % cols) * (tw + gap)
        y = gap + (i // cols) * (th + LABEL_H + gap)
        sheet.paste(Image.fromarray(thumb), (x, y))
        draw.text((x + 2, y + th + 2), label, fill=(235, 235, 235), font=font)
    return sheet


def write_contact_sheet(thumbs: Sequence[tuple[str, np.ndarray]], path: str) -> None:
    """Write :func:`contact_sheet` as a PNG to a local ``path``."""
    contact_sheet(thumbs).save(path, format="PNG")


# --- the report --------------------------------------------------------------------------------
def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def manifest_summary(plan: RenderPlan, manifest: pa.Table | None) -> tuple[dict, dict]:
    """Per-shot and per-worker totals from the manifest rows that belong to ``plan``.

    Rows count when their ``content_key`` is one of the plan's chunks (rows of an older
    version of an edited shot are left out).

    Returns:
        ``(shots, workers)``: shot id -> {actual_s, retries, chunks, failed, errors};
        worker -> {node, chunks, render_s}.
    """
    shots: dict[str, dict[str, Any]] = {
        s.shot_id: {"actual_s": None, "retries": 0, "chunks": 0, "failed": 0, "errors": []}
        for s in plan.shots}
    workers: dict[str, dict[str, Any]] = {}
    if manifest is None or manifest.num_rows == 0:
        return shots, workers
    keys = {c.key for c in plan.chunks}
    cols = {name: _column(manifest, name) for name in _MANIFEST_COLUMNS}
    for i in range(manifest.num_rows):
        shot_id, key = cols["shot_id"][i], cols["content_key"][i]
        if shot_id not in shots or (key is not None and key not in keys):
            continue
        row = shots[shot_id]
        row["chunks"] += 1
        render_s = cols["render_s"][i]
        if render_s is not None and not math.isnan(render_s):
            row["actual_s"] = (row["actual_s"] or 0.0) + float(render_s)
        row["retries"] += max(int(cols["attempts"][i] or 0) - 1, 0)
        if cols["status"][i] == "failed":
            row["failed"] += 1
        if cols["error"][i]:
            row["errors"].append(str(cols["error"][i]))
        worker = cols["worker"][i]
        if worker:
            w = workers.setdefault(worker, {"node": cols["node"][i], "chunks": 0, "render_s": 0.0})
            w["chunks"] += 1
            w["render_s"] += float(render_s or 0.0)
    return shots, workers


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.6em;font-size:1.2em}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top} th{background:#eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b00;font-weight:bold} .ok{color:#070} .muted{color:#888} .prompt{max-width:32em}
"""


def _num(value: float | None, digits: int = 1) -> str:
    return "&ndash;" if value is None else f"{value:,.{digits}f}"


def render_report(
    plan: RenderPlan,
    *,
    manifest: pa.Table | None = None,
    seam_scores: Mapping[str, Sequence[float]] | None = None,
    join_methods: Mapping[str, str] | None = None,
    probes: Mapping[str, MediaProbe] | None = None,
) -> str:
    """The run as one self-contained HTML page (inline CSS, no scripts).

    Args:
        plan: the film's plan (planned GPU-seconds, shots, prompts).
        manifest: the run's manifest table (actual GPU-seconds, retries, workers), if any.
        seam_scores: shot id -> seam scores.
        join_methods: output path -> how it was made ("encode", "copy", "reencode").
        probes: output path -> probe of the file written.
    """
    e = html.escape
    shot_rows, workers = manifest_summary(plan, manifest)
    fps = Fraction(plan.fps)
    out: list[str] = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(plan.title)} &ndash; reelfarm report</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(plan.title)}</h1>",
        f'<p class="muted">plan {e(plan.key)} &middot; {plan.width}&times;{plan.height} '
        f"@ {e(str(fps))} fps &middot; {plan.frames} frames ({plan.duration_s:.2f} s) &middot; "
        f"{len(plan.shots)} shots, {len(plan.chunks)} chunks</p>",
    ]
    out += _deliverables_section(dict(join_methods or {}), dict(probes or {}))
    out += _shots_section(plan, shot_rows, dict(seam_scores or {}), has_manifest=manifest is not None)
    out += _workers_section(workers)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _deliverables_section(methods: dict[str, str], probes: dict[str, MediaProbe]) -> list[str]:
    e = html.escape
    out = ["<h2>Deliverables</h2><table><tr><th>file</th><th>made by</th><th>codec</th>"
           "<th>frames</th><th>seconds</th><th>audio</th></tr>"]
    for rel, method in methods.items():
        if rel.startswith("shots/"):
            continue
        pr = probes.get(rel)
        out.append(
            f'<tr><td><a href="{e(rel)}">{e(rel)}</a></td><td>{e(method)}</td>'
            f"<td>{e(pr.codec + ' ' + pr.pix_fmt) if pr else ''}</td>"
            f'<td class="n">{pr.frames if pr else ""}</td>'
            f'<td class="n">{f"{pr.duration:.3f}" if pr else ""}</td>'
            f"<td>{e(pr.audio.codec) if pr and pr.audio else ''}</td></tr>")
    out.append('</table><p><a href="timeline.otio">timeline.otio</a> &middot; '
               '<a href="contact_sheet.png">contact sheet</a></p>')
    return out


def _shots_section(plan: RenderPlan, shot_rows: dict, seams: dict[str, Sequence[float]], *,
                   has_manifest: bool) -> list[str]:
    e = html.escape
    out = ["<h2>Shots</h2><table><tr><th>#</th><th>shot</th><th>scene</th><th>frames</th>"
           "<th>chunks</th><th>planned GPU-s</th><th>actual GPU-s</th><th>retries</th>"
           "<th>seam scores</th><th>prompt</th></tr>"]
    planned_total, actual_total, retries_total = 0.0, 0.0, 0
    for s in plan.shots:
        row = shot_rows[s.shot_id]
        planned_total += s.est_gpu_s
        actual_total += row["actual_s"] or 0.0
        retries_total += row["retries"]
        scores = seams.get(s.shot_id, [])
        score_html = " ".join(
            f'<span class="{"bad" if x > SEAM_WARN else "ok"}">{x:.2f}</span>' for x in scores
        ) or '<span class="muted">none</span>'
        failed = f' <span class="bad">{row["failed"]} failed</span>' if row["failed"] else ""
        errors = "".join(f'<br><span class="bad">{e(err[:300])}</span>'
                         for err in row["errors"][:3])
        link = f"shots/{s.shot_id}.mp4"
        out.append(
            f'<tr><td class="n">{s.index}</td><td><a href="{e(link)}">{e(s.shot_id)}</a></td>'
            f"<td>{e(s.scene_id)}</td><td class=\"n\">{s.frames}</td>"
            f'<td class="n">{len(s.chunks)}</td><td class="n">{_num(s.est_gpu_s)}</td>'
            f'<td class="n">{_num(row["actual_s"])}</td><td class="n">{row["retries"]}{failed}</td>'
            f'<td>{score_html}</td><td class="prompt">{e(s.prompt)}{errors}</td></tr>')
    out.append(f'<tr><th colspan="5">total</th><th class="n">{_num(planned_total)}</th>'
               f'<th class="n">{_num(actual_total if has_manifest else None)}</th>'
               f'<th class="n">{retries_total}</th><th colspan="2"></th></tr></table>')
    return out


def _workers_section(workers: dict) -> list[str]:
    e = html.escape
    out = ["<h2>Workers</h2>"]
    if not workers:
        return out + ['<p class="muted">no manifest rows with a worker</p>']
    busy = sum(w["render_s"] for w in workers.values()) or 1.0
    out.append("<table><tr><th>worker</th><th>node</th><th>chunks</th><th>render s</th>"
               "<th>share</th></tr>")
    for name, w in sorted(workers.items()):
        out.append(
            f"<tr><td>{e(str(name))}</td><td>{e(str(w['node'] or ''))}</td>"
            f'<td class="n">{w["chunks"]}</td><td class="n">{_num(w["render_s"])}</td>'
            f'<td class="n">{100 * w["render_s"] / busy:.0f}%</td></tr>')
    out.append("</table>")
    return out
