"""Review deliverables: a labelled contact sheet and an HTML report of the run.

The report needs no JavaScript and fetches nothing from elsewhere: the film and every shot
play in the page (HTML5 video, relative links beside ``report.html``), shot thumbnails,
charts from :mod:`reelfarm.render.charts` (worker timeline, planned against actual
GPU-seconds, seam scores), and tables of retries, seams, workers and deliverables. Every
string that came from a user or the manifest is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    "ReportMedia",
    "contact_sheet",
    "data_uri",
    "manifest_summary",
    "render_report",
    "sheet_tiles",
    "thumbnail",
    "write_contact_sheet",
]

THUMB_WIDTH = 192
COLUMNS = 6
LABEL_H = 16
_MANIFEST_COLUMNS = ("shot_id", "content_key", "status", "attempts", "worker", "node", "gpu",
                     "render_s", "est_gpu_s", "error", "steps_saved")


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


def sheet_tiles(thumbs: Sequence[tuple[str, np.ndarray]], keyframes: Mapping[str, np.ndarray] | None = None
                ) -> list[tuple[str, np.ndarray]]:
    """Contact sheet tiles: each shot's thumbnail, preceded by its keyframe where it has one
    (composed or pinned, labelled ``<shot> keyframe``), so the two read side by side."""
    out: list[tuple[str, np.ndarray]] = []
    for label, thumb in thumbs:
        if keyframes and label in keyframes:
            out.append((f"{label} keyframe", thumbnail(keyframes[label], thumb.shape[1])))
        out.append((label, thumb))
    return out


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
        ``(shots, workers)``: shot id -> {actual_s, retries, chunks, failed, errors,
        steps_saved (sampling steps resumed past from mid-chunk checkpoints)};
        worker -> {node, gpu, chunks, render_s}.
    """
    shots: dict[str, dict[str, Any]] = {
        s.shot_id: {"actual_s": None, "retries": 0, "chunks": 0, "failed": 0, "errors": [], "steps_saved": 0}
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
        row["steps_saved"] += int(cols["steps_saved"][i] or 0)
        if cols["status"][i] == "failed":
            row["failed"] += 1
        if cols["error"][i]:
            row["errors"].append(str(cols["error"][i]))
        worker = cols["worker"][i]
        if worker:
            w = workers.setdefault(worker, {"node": cols["node"][i], "gpu": cols["gpu"][i], "chunks": 0,
                                            "render_s": 0.0})
            w["chunks"] += 1
            w["render_s"] += float(render_s or 0.0)
    return shots, workers


_CSS = """
:root{--ink:#1d2330;--muted:#6b7280;--line:#e3e6eb;--bad:#c62828;--ok:#2e7d32;--accent:#2f6db5}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:var(--ink);
background:#f3f4f6}
header{background:#141922;color:#f5f6f8;padding:26px 32px 22px}
header h1{font-size:1.9em;margin:0 0 .25em;font-weight:650;letter-spacing:-.01em}
header p{margin:0;color:#aab1bd}
main{max-width:1200px;margin:0 auto;padding:8px 32px 64px}
h2{font-size:1.15em;margin:2em 0 .6em;padding-bottom:.3em;border-bottom:1px solid var(--line)}
.tiles{display:flex;flex-wrap:wrap;gap:12px;margin:20px 0 4px}
.tile{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 16px;min-width:140px}
.tile strong{display:block;font-size:1.45em;font-variant-numeric:tabular-nums}
.tile span{color:var(--muted);font-size:.85em}
.tile.bad strong{color:var(--bad)}
.film{background:#000;border-radius:8px;display:block;width:100%;max-width:960px;height:auto}
.shots{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:14px}
figure{margin:0}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;overflow:hidden}
.card video{display:block;width:100%;height:auto;background:#000}
.card figcaption{padding:6px 10px 8px;font-size:.9em}
.card figcaption strong{margin-right:.4em}
.chart{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px;margin:8px 0}
.chart img{display:block;width:100%;max-width:1200px;height:auto}
.sheet img{display:block;max-width:100%;height:auto;border-radius:6px}
table{border-collapse:collapse;background:#fff;border:1px solid var(--line);margin:8px 0}
td,th{border-bottom:1px solid var(--line);padding:5px 9px;text-align:left;vertical-align:middle}
th{background:#f0f2f5;font-weight:600;font-size:.92em}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.thumb{padding:3px}
td.thumb img{display:block;border-radius:3px}
.bad{color:var(--bad);font-weight:bold} .ok{color:var(--ok)} .muted{color:var(--muted)}
.prompt{max-width:30em}
.badge{display:inline-block;border-radius:9px;padding:0 7px;font-size:.8em;background:#fde8e8;color:var(--bad)}
.note{color:var(--muted);max-width:60em}
"""


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...``: a picture carried inside the page."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class ReportMedia:
    """The pictures a report shows: ``data:`` URIs or paths relative to ``report.html``.

    Attributes:
        thumbs: shot id -> the shot's thumbnail image.
        charts: chart name (``timeline``, ``gpu``, ``seams``) -> its PNG.
        contact_sheet: the contact sheet, shown inline when there is one.
        keyframes: shot id -> the keyframe the shot started from (composed or pinned).
    """

    thumbs: Mapping[str, str] = field(default_factory=dict)
    keyframes: Mapping[str, str] = field(default_factory=dict)
    charts: Mapping[str, str] = field(default_factory=dict)
    contact_sheet: str | None = None


def _num(value: float | None, digits: int = 1) -> str:
    return "&ndash;" if value is None else f"{value:,.{digits}f}"


def _film_source(methods: Mapping[str, str]) -> str | None:
    """The film cut a browser can play: MP4, else WebM (ProRes does not play in browsers)."""
    if not methods:
        return "final.mp4"
    return next((rel for rel in ("final.mp4", "final.webm") if rel in methods), None)


def render_report(
    plan: RenderPlan,
    *,
    manifest: pa.Table | None = None,
    seam_scores: Mapping[str, Sequence[float]] | None = None,
    join_methods: Mapping[str, str] | None = None,
    probes: Mapping[str, MediaProbe] | None = None,
    media: ReportMedia | None = None,
) -> str:
    """The run as one HTML page (inline CSS, no scripts, nothing fetched from elsewhere).

    Videos and pictures are relative links to files beside the page in OUT: ``final.mp4``,
    ``shots/<shot>.mp4`` and whatever ``media`` names.

    Args:
        plan: the film's plan (planned GPU-seconds, shots, prompts).
        manifest: the run's manifest table (actual GPU-seconds, retries, workers), if any.
        seam_scores: shot id -> seam scores.
        join_methods: output path -> how it was made ("encode", "copy", "reencode").
        probes: output path -> probe of the file written.
        media: thumbnails and charts to show (see :class:`ReportMedia`).
    """
    from reelfarm.render.charts import chunk_spans, seam_points, worker_usage

    e = html.escape
    media = media or ReportMedia()
    seams = dict(seam_scores or {})
    methods = dict(join_methods or {})
    shot_rows, workers = manifest_summary(plan, manifest)
    usage = worker_usage(chunk_spans(plan, manifest)[0])
    points = seam_points(plan, seams)
    fps = Fraction(plan.fps)
    out: list[str] = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{e(plan.title)} &ndash; reelfarm report</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{e(plan.title)}</h1>",
        f'<p>plan {e(plan.key)} &middot; {plan.width}&times;{plan.height} '
        f"@ {e(str(fps))} fps &middot; {plan.frames} frames ({plan.duration_s:.2f} s) &middot; "
        f"{len(plan.shots)} shots, {len(plan.chunks)} chunks</p></header><main>",
    ]
    out += _tiles(plan, shot_rows, points, usage, has_manifest=manifest is not None)
    out += _film_section(plan, methods)
    out += _shot_cards(plan, media, points)
    out += _keyframes_section(plan, media)
    out += _shots_section(plan, shot_rows, seams, media, has_manifest=manifest is not None)
    out += _seams_section(points, media)
    out += _qc_section(plan, manifest, media)
    out += _workers_section(workers, usage, media)
    out += _deliverables_section(methods, dict(probes or {}), media)
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _tiles(plan: RenderPlan, shot_rows: dict, points: Sequence[Any], usage: Mapping[str, Any], *,
           has_manifest: bool) -> list[str]:
    actual = sum(r["actual_s"] or 0.0 for r in shot_rows.values()) if has_manifest else None
    retries = sum(r["retries"] for r in shot_rows.values())
    flagged = sum(1 for p in points if p.flagged)
    busy = sum(u.busy_s for u in usage.values())
    window = sum(u.window_s for u in usage.values())
    tiles = [
        (f"{plan.duration_s:.1f} s", f"{len(plan.shots)} shots &middot; {len(plan.chunks)} chunks", False),
        (_num(plan.est_gpu_s), "planned GPU-s", False),
        (_num(actual), "actual GPU-s", False),
        (str(retries), "retries", retries > 0),
        (f"{flagged} of {len(points)}", f"seams above {SEAM_WARN:g}", flagged > 0),
        (f"{100 * busy / window:.0f}%" if window else "&ndash;", f"farm busy, {len(usage)} workers", False),
    ]
    saved = sum(r["steps_saved"] for r in shot_rows.values())
    if saved:  # chunks cut short (a lost node, a killed worker) that resumed mid-chunk
        tiles.append((str(saved), "sampling steps resumed from checkpoints", False))
    return ['<div class="tiles">'] + [
        f'<div class="tile{" bad" if bad else ""}"><strong>{value}</strong><span>{label}</span></div>'
        for value, label, bad in tiles] + ["</div>"]


def _film_section(plan: RenderPlan, methods: Mapping[str, str]) -> list[str]:
    e = html.escape
    src = _film_source(methods)
    out = ["<h2>Film</h2>"]
    if src is None:
        finals = [rel for rel in methods if rel.startswith("final.")]
        links = ", ".join(f'<a href="{e(rel)}">{e(rel)}</a>' for rel in finals)
        return out + [f'<p class="note">No cut a browser can play was asked for; open {links} in an editor.</p>']
    return out + [f'<video class="film" controls preload="metadata" width="{plan.width}" '
                  f'height="{plan.height}" src="{e(src)}"></video>']


def _shot_cards(plan: RenderPlan, media: ReportMedia, points: Sequence[Any]) -> list[str]:
    e = html.escape
    flagged: dict[str, int] = {}
    for p in points:
        flagged[p.shot_id] = flagged.get(p.shot_id, 0) + int(p.flagged)
    out = ['<h2>Shots</h2><div class="shots">']
    for s in plan.shots:
        poster = media.thumbs.get(s.shot_id)
        poster_attr = f' poster="{e(poster)}"' if poster else ""
        badge = (f' <span class="badge">{flagged[s.shot_id]} seam{"s" if flagged[s.shot_id] > 1 else ""}</span>'
                 if flagged.get(s.shot_id) else "")
        out.append(
            f'<figure class="card"><video controls preload="metadata" width="{s.width}" height="{s.height}"'
            f'{poster_attr} src="{e(f"shots/{s.shot_id}.mp4")}"></video>'
            f'<figcaption><strong>{e(s.shot_id)}</strong><span class="muted">{e(s.scene_id)} &middot; '
            f"{float(s.frames / Fraction(s.fps)):.2f} s</span>{badge}</figcaption></figure>")
    out.append("</div>")
    return out


def _keyframes_section(plan: RenderPlan, media: ReportMedia) -> list[str]:
    """The keyframes shots started from: picture, source (model or pinned file), prompt, key."""
    e = html.escape
    shots = [s for s in plan.shots if s.keyframe is not None]
    if not shots:
        return []
    out = ['<h2>Keyframes</h2><div class="shots">']
    for s in shots:
        kf = s.keyframe
        assert kf is not None
        src = media.keyframes.get(s.shot_id)
        img = (f'<img src="{e(src)}" width="{s.width}" height="{s.height}" alt="keyframe of {e(s.shot_id)}">'
               if src else '<p class="note">not in storage</p>')
        made = (f"pinned: {e(str(kf.pin))}" if kf.source == "pin"
                else f"{e(kf.model.family)} <code>{e(kf.model.id)}</code>: {e(kf.prompt)}")  # type: ignore[union-attr]
        out.append(f'<figure class="card">{img}<figcaption><strong>{e(s.shot_id)}</strong>'
                   f'<span class="muted">{made} &middot; key {e(kf.key)}</span></figcaption></figure>')
    out.append("</div>")
    return out


def _chart(media: ReportMedia, name: str, alt: str) -> list[str]:
    rel = media.charts.get(name)
    return [f'<div class="chart"><img src="{html.escape(rel)}" alt="{html.escape(alt)}"></div>'] if rel else []


def _deliverables_section(methods: dict[str, str], probes: dict[str, MediaProbe], media: ReportMedia
                          ) -> list[str]:
    e = html.escape
    out = ["<h2>Deliverables</h2><table><tr><th>file</th><th>made by</th><th>codec</th>"
           '<th class="n">frames</th><th class="n">seconds</th><th>audio</th></tr>']
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
    if media.contact_sheet:
        out.append(f'<figure class="sheet"><a href="{e(media.contact_sheet)}"><img src="{e(media.contact_sheet)}" '
                   'alt="contact sheet: the middle frame of every shot"></a></figure>')
    return out


def _shots_section(plan: RenderPlan, shot_rows: dict, seams: dict[str, Sequence[float]], media: ReportMedia, *,
                   has_manifest: bool) -> list[str]:
    e = html.escape
    out = ["<h2>Planned against actual GPU time</h2>", *_chart(media, "gpu", "planned and actual GPU-seconds per shot"),
           '<table><tr><th>#</th><th></th><th>shot</th><th>scene</th><th class="n">frames</th>'
           '<th class="n">chunks</th><th class="n">planned GPU-s</th><th class="n">actual GPU-s</th>'
           '<th class="n">retries</th><th>seam scores</th><th>prompt</th></tr>']
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
        link = e(f"shots/{s.shot_id}.mp4")
        thumb = media.thumbs.get(s.shot_id)
        thumb_html = (f'<a href="{link}"><img src="{e(thumb)}" width="96" alt="{e(s.shot_id)}"></a>'
                      if thumb else "")
        out.append(
            f'<tr><td class="n">{s.index}</td><td class="thumb">{thumb_html}</td>'
            f'<td><a href="{link}">{e(s.shot_id)}</a></td>'
            f"<td>{e(s.scene_id)}</td><td class=\"n\">{s.frames}</td>"
            f'<td class="n">{len(s.chunks)}</td><td class="n">{_num(s.est_gpu_s)}</td>'
            f'<td class="n">{_num(row["actual_s"])}</td><td class="n">{row["retries"]}{failed}</td>'
            f'<td>{score_html}</td><td class="prompt">{e(s.prompt)}{errors}</td></tr>')
    out.append(f'<tr><th colspan="6">total</th><th class="n">{_num(planned_total)}</th>'
               f'<th class="n">{_num(actual_total if has_manifest else None)}</th>'
               f'<th class="n">{retries_total}</th><th colspan="2"></th></tr></table>')
    return out


def _qc_section(plan: RenderPlan, manifest: pa.Table | None, media: ReportMedia) -> list[str]:
    """Identity per shot, the takes each chunk needed and why; shots below their policy flagged."""
    from reelfarm.render.quality import shot_qc

    e = html.escape
    qc = shot_qc(plan, manifest)
    if not any(q.chunks for q in qc.values()):
        return []
    out = ["<h2>Identity and takes</h2>", *_chart(media, "identity", "identity score against time per shot"),
           '<table><tr><th>shot</th><th class="n">identity</th><th class="n">takes</th><th>qc</th>'
           "<th>takes and why</th></tr>"]
    for s in plan.shots:
        q = qc[s.shot_id]
        if not q.chunks:
            continue
        takes = sum(c.takes or 1 for c in q.chunks)
        status = ('<span class="bad">flagged: delivered with its best take</span>' if q.flagged
                  else '<span class="ok">ok</span>')
        why = []
        for c in q.chunks:
            if (c.takes or 1) <= 1 and not c.flag:
                continue
            steps = "; ".join(
                f"take {t.get('take')}: identity {_num(t.get('identity'), 3)}"
                + (f" ({e(', '.join(t.get('reasons') or []))})" if t.get("reasons") else " (passed)")
                for t in c.history)
            why.append(f"{e(c.chunk_name)}: kept take {c.take} of {c.takes}: {steps}")
        detail = "<br>".join(why) or '<span class="muted">one take each</span>'
        out.append(f'<tr><td>{e(s.shot_id)}</td><td class="n">{_num(q.identity, 3)}</td>'
                   f'<td class="n">{takes}</td><td>{status}</td><td>{detail}</td></tr>')
    out.append("</table>")
    return out


def _seams_section(points: Sequence[Any], media: ReportMedia) -> list[str]:
    e = html.escape
    out = ["<h2>Seams</h2>",
           '<p class="note">Long shots are rendered in chunks that overlap by a few frames and are '
           "blended there. A seam score is the picture&rsquo;s jump across that join divided by the "
           "footage&rsquo;s own frame-to-frame motion: 1.0 moves like the shot around it, "
           f"above {SEAM_WARN:g} the join jumps more than twice as much as the footage and may be "
           "visible. Those seams are red here and carry red markers in timeline.otio.</p>"]
    if not points:
        return out + ['<p class="muted">no seam scores (a shot of one chunk has no seams)</p>']
    out += _chart(media, "seams", "seam scores along the film, with the warning threshold")
    bad = [p for p in points if p.flagged]
    if not bad:
        return out + [f'<p class="ok">all {len(points)} seams at or below {SEAM_WARN:g}</p>']
    out.append('<table><tr><th>shot</th><th class="n">seam</th><th class="n">at film s</th>'
               '<th class="n">score</th></tr>')
    out += [f'<tr><td>{e(p.shot_id)}</td><td class="n">{p.index}</td><td class="n">{p.film_s:.2f}</td>'
            f'<td class="n bad">{p.score:.2f}</td></tr>' for p in bad]
    out.append("</table>")
    return out


def _workers_section(workers: dict, usage: Mapping[str, Any], media: ReportMedia) -> list[str]:
    e = html.escape
    out = ["<h2>Farm</h2>"]
    if not workers:
        return out + ['<p class="muted">no manifest rows with a worker</p>']
    out += _chart(media, "timeline", "chunks per worker over time, with idle gaps")
    busy = sum(w["render_s"] for w in workers.values()) or 1.0
    out.append('<table><tr><th>worker</th><th>node</th><th>GPU</th><th class="n">chunks</th><th class="n">render s</th>'
               '<th class="n">share</th><th class="n">busy</th><th class="n">idle s</th></tr>')
    for name, w in sorted(workers.items()):
        u = usage.get(name)
        out.append(
            f"<tr><td>{e(str(name))}</td><td>{e(str(w['node'] or ''))}</td><td>{e(str(w.get('gpu') or ''))}</td>"
            f'<td class="n">{w["chunks"]}</td><td class="n">{_num(w["render_s"])}</td>'
            f'<td class="n">{100 * w["render_s"] / busy:.0f}%</td>'
            f'<td class="n">{f"{100 * u.utilisation:.0f}%" if u else "&ndash;"}</td>'
            f'<td class="n">{_num(u.idle_s if u else None)}</td></tr>')
    out.append("</table>")
    return out
