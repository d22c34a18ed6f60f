"""Contact sheet and HTML report."""

from __future__ import annotations

from html.parser import HTMLParser

import helpers_stitch as H
import numpy as np
from helpers_stitch import manifest_for
from PIL import Image

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
        {"attempts": 3, "worker": "gpu-1", "node": "node-b", "render_s": 5.0},
        {"render_s": None, "worker": None},
        {"status": "failed", "error": "GpuOutOfMemory <b>boom</b>"},
    ])
    summary, workers = manifest_summary(plan, table)
    assert summary["a"]["retries"] == 2 and summary["a"]["failed"] == 1
    assert summary["a"]["actual_s"] == 5.0 + 2.0  # a's three chunks: 5, null, 2
    assert summary["b"]["actual_s"] == 6.0
    assert workers["gpu-1"] == {"node": "node-b", "chunks": 1, "render_s": 5.0}
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
    assert "gpu-1" in text and "node-b" in text


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
