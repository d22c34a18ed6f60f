"""The report as a producer sees it: a real stitch into a local OUT, opened in headless
Chromium, every picture decoded and every video's duration read back from the page.

The page has no scripts; the test evaluates its own over the Chrome DevTools protocol
(Chromium started with ``--remote-debugging-port=0``, a websocket to the page).
Skipped only when no Chromium binary is on PATH (``.ci/run`` installs one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import helpers_stitch as H
import pytest

from reelfarm.render import ffmpeg as ff
from reelfarm.render.seams import SEAM_WARN
from reelfarm.render.stitch import stitch_film

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

pytestmark = [
    pytest.mark.ffmpeg,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs it: apt-get install chromium)"),
    pytest.mark.timeout(240),
]

# Waits for every <img> to load or fail and every <video> to read its metadata or fail,
# then reports what the page decoded, and every resource the page fetched.
_PROBE_JS = """
(async () => {
  const settle = (el, done, events) => new Promise(resolve => {
    if (done()) return resolve();
    const timer = setTimeout(resolve, 20000);
    for (const ev of events) el.addEventListener(ev, () => { clearTimeout(timer); resolve(); }, {once: true});
  });
  const images = [...document.images];
  const videos = [...document.querySelectorAll('video')];
  await Promise.all(images.map(i => settle(i, () => i.complete, ['load', 'error'])));
  await Promise.all(videos.map(v => settle(v, () => v.readyState >= 1 || v.error, ['loadedmetadata', 'error'])));
  return {
    images: images.map(i => ({src: i.getAttribute('src'), width: i.naturalWidth})),
    videos: videos.map(v => ({src: v.getAttribute('src'), duration: v.duration, width: v.videoWidth,
                              error: v.error ? v.error.code : null, poster: v.getAttribute('poster')})),
    scripts: document.scripts.length,
    text: document.body.innerText,
  };
})()
"""


class DevTools:
    """The few Chrome DevTools protocol calls the test needs, over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 2**20, open_timeout=30)
        self.next_id = 0
        self.events: list[dict] = []  # every event seen, in order

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive between replies: keep them
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(end - time.monotonic(), 0.1)))
            if "method" in msg:
                self.events.append(msg)
            if msg.get("method") == method:
                return msg["params"]

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium with remote debugging on a free port; yields the page's DevTools."""
    profile = tmp_path / "profile"
    argv = [CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--mute-audio", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            "--window-size=1280,2000", "about:blank"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")  # Chromium refuses to sandbox as root (CI containers)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _farm_manifest(plan):
    """Two workers on two nodes, chunks back to back with a gap, one chunk retried."""
    table = H.manifest_for(plan)
    t0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    at = {"gpu-0": 0.0, "gpu-1": 3.0}  # gpu-1 joined late: idle at the start
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        worker = "gpu-0" if i % 2 == 0 else "gpu-1"
        render_s = 4.0 + (i % 3)
        start = at[worker] + (6.0 if i == 4 else 0.0)  # an idle gap on gpu-0
        row.update(worker=worker, node="node-a" if worker == "gpu-0" else "node-b", render_s=render_s,
                   started_at=t0 + timedelta(seconds=start),
                   finished_at=t0 + timedelta(seconds=start + render_s), attempts=2 if i == 1 else 1)
        at[worker] = start + render_s
    return type(table).from_pylist(rows)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """A real OUT: three tiny shots stitched with a manifest, one seam forced above SEAM_WARN."""
    plan = H.cuts_plan(title='Tiny <Film> & "friends"')
    store = H.FakeStore()
    H.fill(store, plan)
    shot = plan.shots[0]
    c = shot.chunks[1]  # drawn half a cycle off: a hard jump at its seam
    store.put(c.key, H.truth(shot, c.frame_start + c.num_frames, phase=0.5)[c.frame_start:])
    out = tmp_path / "out"
    res = stitch_film(plan, store, str(out), manifest=_farm_manifest(plan), workdir=str(tmp_path / "work"))
    assert max(res.seam_scores["a"]) > SEAM_WARN
    return out


def test_report_pictures_and_videos_load_in_chromium(out_dir, chromium):
    url = (out_dir / "report.html").as_uri()
    chromium.call("Page.enable")
    chromium.call("Network.enable")
    chromium.call("Page.navigate", url=url)
    chromium.wait_event("Page.loadEventFired")
    got = chromium.call("Runtime.evaluate", expression=_PROBE_JS, awaitPromise=True, returnByValue=True)
    page = got["result"]["value"]

    assert page["scripts"] == 0
    # every picture decodes: three shot thumbnails and three charts inside the page, the contact sheet beside it
    images = page["images"]
    assert all(i["width"] > 0 for i in images), [(i["src"][:40], i["width"]) for i in images]
    kinds = sorted(i["src"].split(";")[0] for i in images)
    assert kinds == ["contact_sheet.png"] + ["data:image/jpeg"] * 3 + ["data:image/png"] * 3
    # the film and every shot play: each reports its duration, as ffprobe measured it
    videos = {v["src"]: v for v in page["videos"]}
    assert set(videos) == {"final.mp4", "shots/a.mp4", "shots/b.mp4", "shots/c.mp4"}
    for rel, v in videos.items():
        assert v["error"] is None and v["width"] > 0, v
        assert v["duration"] == pytest.approx(ff.probe(str(out_dir / rel)).duration, abs=0.05), rel
    assert videos["shots/a.mp4"]["poster"].startswith("data:image/jpeg;base64,")
    # nothing came from elsewhere than OUT (or the page itself: data: URIs)
    fetched = {e["params"]["request"]["url"] for e in chromium.events if e["method"] == "Network.requestWillBeSent"}
    outside = {u for u in fetched if not u.startswith((out_dir.as_uri() + "/", "data:"))}
    assert url in fetched and not outside, outside
    files = [p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()]
    assert [f for f in files if f.endswith((".png", ".jpg"))] == ["contact_sheet.png"]  # the rest are inside
    # what a producer reads: the escaped title as text, the flagged seam, both workers
    text = page["text"]
    assert 'Tiny <Film> & "friends"' in text
    assert f"seams above {SEAM_WARN:g}" in text and "gpu-1" in text and "node-b" in text

    shot = chromium.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    assert len(shot["data"]) > 10_000  # a page was drawn
