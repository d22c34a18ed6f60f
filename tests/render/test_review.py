"""Contact sheet and HTML report."""

from __future__ import annotations

import base64
import io
import os
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from types import SimpleNamespace

import helpers_stitch as H
import numpy as np
import pytest
from helpers_stitch import manifest_for
from PIL import Image

from reelfarm.render.charts import chunk_spans, seam_points, shot_spans, worker_usage
from reelfarm.render.deliverables import write_review
from reelfarm.render.review import (
    contact_sheet,
    manifest_summary,
    render_report,
    thumbnail,
    write_contact_sheet,
)


def test_thumbnail_and_contact_sheet(tmp_path):
    frame = np.zeros((36, 64, 3), np.uint8)
    frame[:, :32] = (255, 0, 0)
    thumb = thumbnail(frame, width=96)
    assert thumb.shape == (54, 96, 3)
    thumbs = [(f"shot_{i:02d}", thumb) for i in range(8)]
    sheet = contact_sheet(thumbs, columns=3)
    assert sheet.size == (3 * (96 + 4) + 4, 3 * (54 + 16 + 4) + 4)
    path = tmp_path / "sheet.png"
    write_contact_sheet(thumbs, str(path))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img[4 + 10, 4 + 10].tolist() == [255, 0, 0]  # the red half of the first thumbnail
    label = img[4 + 54 : 4 + 54 + 16, 4 : 4 + 96]
    assert (label > 200).any()  # the label's text is drawn


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k == "href"]

    def handle_data(self, data):
        self.text.append(data)


def test_report_plan_vs_actual_retries_workers_and_links():
    plan = H.three_shot_plan()
    table = manifest_for(plan, rows_extra=[
        {"attempts": 3, "worker": "gpu-1", "node": "node-b", "gpu": "NVIDIA L4 (22 GiB)", "render_s": 5.0},
        {"render_s": None, "worker": None},
        {"status": "failed", "error": "GpuOutOfMemory <b>boom</b>"},
    ])
    summary, workers = manifest_summary(plan, table)
    assert summary["a"]["retries"] == 2 and summary["a"]["failed"] == 1
    assert summary["a"]["actual_s"] == 5.0 + 2.0  # a's three chunks: 5, null, 2
    assert summary["b"]["actual_s"] == 6.0
    assert workers["gpu-1"] == {"node": "node-b", "gpu": "NVIDIA L4 (22 GiB)", "chunks": 1, "render_s": 5.0}
    assert workers["gpu-0"]["chunks"] == len(plan.chunks) - 2

    html = render_report(plan, manifest=table, seam_scores={"a": [1.0, 3.0], "b": [1.1]},
                         join_methods={"shots/a.mp4": "encode", "final.mp4": "reencode"})
    page = _Collect()
    page.feed(html)
    assert "script" not in page.tags
    assert {"shots/a.mp4", "shots/b.mp4", "shots/c.mp4", "final.mp4", "timeline.otio",
            "contact_sheet.png"} <= set(page.links)
    text = " ".join(page.text)
    assert "GpuOutOfMemory <b>boom</b>" in text  # shown as text, not markup
    assert "<b>" not in html.replace("GpuOutOfMemory &lt;b&gt;", "")
    assert '<span class="bad">3.00</span>' in html and '<span class="ok">1.00</span>' in html
    assert "gpu-1" in text and "node-b" in text and "NVIDIA L4 (22 GiB)" in text


def test_report_escapes_hostile_strings_and_needs_no_manifest():
    evil = '<script>alert("x")</script>'
    plan = H.make_plan([H.make_shot("a", 10, prompt=evil)], title=evil)
    html = render_report(plan)
    page = _Collect()
    page.feed(html)
    assert "script" not in page.tags
    assert html.count("&lt;script&gt;") == 3  # <title>, <h1> and the prompt
    assert "no manifest rows" in html


def test_rows_of_other_plans_do_not_count():
    plan = H.cuts_plan()
    table = manifest_for(plan, rows_extra=[{"content_key": "f" * 32, "render_s": 99.0}])
    summary, _ = manifest_summary(plan, table)
    assert summary["a"]["actual_s"] == 2.0 * (len(plan.shots[0].chunks) - 1)


# --- pictures in the report ---------------------------------------------------------------------
def _timed(plan, spans):
    """A manifest whose rows run on the given (worker, start s, end s, render_s) spans."""
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    extra = [{"worker": w, "node": f"node-{w}", "started_at": t0 + timedelta(seconds=a),
              "finished_at": t0 + timedelta(seconds=b), "render_s": r} for w, a, b, r in spans]
    return manifest_for(plan, rows_extra=extra)


def test_chunk_spans_and_worker_usage_count_render_time_and_idle_gaps():
    plan = H.cuts_plan()  # 3 + 2 + 2 chunks
    # w1: 0-4, then queued at 4 but rendering 6-10 (render_s 4), a gap 4-6; w2: 2-12 then nothing
    table = _timed(plan, [("w1", 0, 4, 4.0), ("w1", 4, 10, 4.0), ("w2", 2, 12, None),
                          ("w1", 10, 14, 4.0), ("w2", 12, 13, 1.0), ("w2", 13, 16, 3.0), ("w1", 14, 15, 1.0)])
    spans, t0 = chunk_spans(plan, table)
    assert t0 == datetime(2026, 3, 1, tzinfo=UTC)
    assert [(s.worker, s.start, s.end) for s in spans][:5] == [
        ("w1", 0, 4), ("w1", 6, 10), ("w1", 10, 14), ("w1", 14, 15), ("w2", 2, 12)]
    usage = worker_usage(spans)
    assert usage["w1"].busy_s == 13 and usage["w1"].gaps == ((4, 6), (15, 16))
    assert usage["w2"].busy_s == 14 and usage["w2"].gaps == ((0, 2),)
    assert usage["w1"].utilisation == pytest.approx(13 / 16) and usage["w2"].idle_s == 2
    # cached rows (no worker) and rows of other plans are not on the timeline
    other = manifest_for(plan, rows_extra=[{"worker": None}, {"content_key": "f" * 32}])
    assert len(chunk_spans(plan, other)[0]) == len(plan.chunks) - 2
    assert chunk_spans(plan, None) == ([], None)


def test_seam_points_sit_on_the_film_clock():
    plan = H.three_shot_plan()  # a 0-20, b from 16 (crossfade 4), c from 29 (fade 3)
    points = seam_points(plan, {"a": [1.0, 3.0], "b": [1.1], "c": []})
    a = plan.shots[0].chunks
    assert [(p.shot_id, p.index, p.flagged) for p in points] == [("a", 1, False), ("a", 2, True), ("b", 1, False)]
    assert points[0].film_s == pytest.approx((a[1].frame_start + a[1].overlap // 2) / 24)
    b1 = plan.shots[1].chunks[1]
    assert points[2].film_s == pytest.approx((16 + b1.frame_start + b1.overlap // 2) / 24)
    assert [round(x, 4) for _, x, _ in shot_spans(plan)] == [0, round(16 / 24, 4), round(29 / 24, 4)]


def _png_size(uri: str) -> tuple[int, int]:
    head, _, data = uri.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
    return Image.open(io.BytesIO(base64.b64decode(data))).size


def test_write_review_puts_thumbnails_and_charts_inside_the_page(tmp_path):
    evil = '"><img src=x onerror=alert(1)>'
    plan = H.make_plan([H.make_shot("a", 20, prompt=evil), H.make_shot("b", 10)], title=evil)
    thumbs = [(s.shot_id, thumbnail(H.truth(s, 1)[0])) for s in plan.shots]
    result = SimpleNamespace(seam_scores={"a": [1.2, 2.5], "b": [0.9]}, probes={},
                             join_methods={"shots/a.mp4": "encode", "final.mp4": "copy"})
    rels = write_review(plan, str(tmp_path), thumbs, result, manifest=_timed(plan, [("w1", 0, 3, 3.0)]))
    assert rels == ["timeline.otio", "contact_sheet.png", "report.html"]  # the page last
    assert sorted(os.listdir(tmp_path)) == sorted(rels)
    html = (tmp_path / "report.html").read_text()
    page = _Collect()
    page.feed(html)
    assert "script" not in page.tags and "onerror=alert" not in html.replace("onerror=alert(1)&gt;", "")
    imgs = re.findall(r'<img src="([^"]+)"', html)
    assert imgs.count("contact_sheet.png") == 1
    charts = [u for u in imgs if u.startswith("data:image/png")]
    assert len(charts) == 3 and all(_png_size(u)[0] == 1200 for u in charts)  # timeline, GPU-s, seams
    assert [_png_size(u) for u in imgs if u.startswith("data:image/jpeg")] == [(192, 108)] * 2
    assert re.findall(r'<video [^>]*src="([^"]+)"', html) == ["final.mp4", "shots/a.mp4", "shots/b.mp4"]
    assert all('preload="metadata"' in v for v in re.findall(r"<video [^>]*>", html))
    assert re.findall(r'<td class="n bad">([\d.]+)</td>', html) == ["2.50"]  # the flagged seam, listed
    assert '<span class="badge">1 seam</span>' in html


def test_report_plays_what_a_browser_can_and_says_so_otherwise():
    plan = H.cuts_plan()
    webm = render_report(plan, join_methods={"final.webm": "reencode", "final.mov": "reencode"})
    assert re.findall(r'<video [^>]*src="(final[^"]*)"', webm) == ["final.webm"]
    prores = render_report(plan, join_methods={"final.mov": "reencode"})
    assert "final.mov" in prores and not re.findall(r'<video [^>]*src="final', prores)
    assert "no seam scores" in prores and "seams.png" not in prores
