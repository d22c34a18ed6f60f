"""Deliverables beside the cuts: the OTIO timeline, the contact sheet and the HTML report,
and publishing every file stitching made into OUT, each in one step.

A reader of OUT sees each deliverable's old version or its new one, never a part: files
are made in a local work folder, then published one by one with
:meth:`reelfarm.storage.Location.put_file_atomic` (rename on a disk, one upload on an
object store). Relative paths come from checked ids and fixed names only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from reelfarm.schemas.plan import RenderPlan
from reelfarm.storage import Location

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["REVIEW_FILES", "publish", "write_report", "write_review"]

REVIEW_FILES = ("timeline.otio", "contact_sheet.png", "report.html")


def write_review(plan: RenderPlan, work: str, thumbs: Sequence[tuple[str, np.ndarray]], result: Any, *,
                 manifest: pa.Table | None = None, contact_sheet: bool = True, report: bool = True,
                 keyframes: Mapping[str, np.ndarray] | None = None) -> list[str]:
    """Write the timeline, and the contact sheet and report when asked, into ``work``.

    Returns the relative paths written, in the order to publish them (``report.html``
    last, after the contact sheet it shows). The spec's ``output.contact_sheet`` and
    ``output.report`` say whether those two are made; the timeline always is (it is the
    cut an editor conforms from).

    Args:
        plan: the film's plan.
        work: the local work folder.
        thumbs: ``(shot id, thumbnail)`` per shot.
        result: the stitch result so far (seam scores, join methods, probes).
        manifest: the run's manifest, for the report's actual GPU-seconds and workers.
        contact_sheet: write ``contact_sheet.png``.
        report: write ``report.html`` (its thumbnails and charts inside it).
        keyframes: shot id -> the keyframe it started from (composed or pinned), shown
            beside its thumbnail on the contact sheet and in the report.
    """
    from reelfarm.render import review, timeline

    timeline.write_timeline(timeline.build_timeline(plan, seam_scores=result.seam_scores, manifest=manifest),
                            os.path.join(work, "timeline.otio"))
    written = ["timeline.otio"]
    if contact_sheet:
        review.write_contact_sheet(review.sheet_tiles(thumbs, keyframes), os.path.join(work, "contact_sheet.png"))
        written.append("contact_sheet.png")
    if report:
        written += write_report(plan, work, thumbs, result, manifest=manifest, contact_sheet=contact_sheet,
                                keyframes=keyframes)
    return written


def write_report(plan: RenderPlan, work: str, thumbs: Sequence[tuple[str, np.ndarray]], result: Any, *,
                 manifest: pa.Table | None = None, contact_sheet: bool = True,
                 keyframes: Mapping[str, np.ndarray] | None = None) -> list[str]:
    """Write ``report.html``, its thumbnails and charts inside it as ``data:`` URIs.

    Why inside: the report stays one file, so it is published in one step with the
    pictures it shows (never a page with missing pictures), is tracked as one deliverable
    in ``deliverables.json``, and can be mailed or attached to a ticket as it is. Only the
    videos (and the contact sheet, a deliverable of its own) are links to files beside it.

    Returns:
        ``["report.html"]``.
    """
    from reelfarm.render import charts, review

    shot_thumbs = {shot_id: review.data_uri(_jpeg(thumb), "image/jpeg") for shot_id, thumb in thumbs}
    actual = {sid: row["actual_s"] for sid, row in review.manifest_summary(plan, manifest)[0].items()}
    pngs = charts.write_charts(plan, manifest, actual, result.seam_scores)
    media = review.ReportMedia(thumbs=shot_thumbs,
                               keyframes={sid: review.data_uri(_png(kf), "image/png")
                                          for sid, kf in (keyframes or {}).items()},
                               charts={name: review.data_uri(png, "image/png") for name, png in pngs.items()},
                               contact_sheet="contact_sheet.png" if contact_sheet else None)
    page = review.render_report(plan, manifest=manifest, seam_scores=result.seam_scores,
                                join_methods=result.join_methods, probes=result.probes, media=media)
    with open(os.path.join(work, "report.html"), "w", encoding="utf-8") as fh:
        fh.write(page)
    return ["report.html"]


def _png(frame: np.ndarray) -> bytes:
    """Lossless: a keyframe is shown as it is (a studio approves these pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def publish(work: str, rels: Sequence[str], out_url: str, storage_options: dict[str, Any]) -> dict[str, str]:
    """Publish ``work/<rel>`` as ``OUT/<rel>`` for each path, each in one step.

    Returns:
        Relative path -> URL under ``out_url``.
    """
    out = Location(out_url, storage_options=storage_options)
    outputs: dict[str, str] = {}
    for rel in rels:
        out.put_file_atomic(os.path.join(work, rel), rel)
        outputs[rel] = out_url.rstrip("/") + "/" + rel
    return outputs
