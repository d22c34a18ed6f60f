"""A disk that fills while deliverables are written: OUT never holds a partial file, the run
ends with one clear storage error (exit 1, status.json when it fits), and a later run, with
space back, completes. A real small tmpfs as OUT (this needs root, as CI and this machine
have); the chunks are committed beforehand, so no Ray worker is needed (the farm starts Ray
only when a chunk must render)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from reelfarm.cluster.farm import Farm
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.render import render_plan
from reelfarm.render.ffmpeg import probe
from reelfarm.settings import Settings
from tests.render import helpers_stitch as H

pytestmark = pytest.mark.ffmpeg
VIDEOS = ("shots/a.mp4", "shots/b.mp4", "shots/c.mp4", "scenes/s01.mp4", "scenes/s02.mp4", "final.mp4")


def _mount(path: Path, size_kb: int, *, remount: bool = False) -> bool:
    opts = f"{'remount,' if remount else ''}size={size_kb}k"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _render(plan, store: ChunkStore, out: Path):
    farm = Farm(store, Settings(manifest_flush_s=0.0)).check()
    return render_plan(plan, farm, store, out_url=str(out), run_id=uuid.uuid4().hex[:8])


def test_a_full_disk_never_leaves_a_partial_deliverable_and_a_later_run_completes(tmp_path):
    plan = H.three_shot_plan()
    store = ChunkStore(str(tmp_path / "chunks"))
    H.fill(store, plan)
    reference = tmp_path / "reference"
    first = _render(plan, store, reference)
    assert first.ok and first.exit_code == 0
    want = _files(reference)
    total_kb = sum(len(v) for v in want.values()) // 1024
    out = tmp_path / "out"
    out.mkdir()
    if not _mount(out, 64):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        for fraction in (0.15, 0.5, 0.85):
            for p in sorted(out.rglob("*"), reverse=True):  # each case starts from an empty OUT
                p.unlink() if p.is_file() else p.rmdir()
            assert _mount(out, max(16, int(total_kb * fraction)), remount=True)
            result = _render(plan, store, out)
            assert result.exit_code == 1 and result.error and result.error.startswith("storage: ")
            assert "No space left" in result.error, result.error
            have = _files(out)
            assert not [n for n in have if n.endswith(".tmp") or "/." in n or n.startswith(".")], sorted(have)
            for name in VIDEOS + ("timeline.otio", "contact_sheet.png"):
                if name in have:  # a deliverable is there whole, or not at all
                    assert have[name] == want[name], f"{name} is partial at {fraction:.0%}"
            # Space comes back: the next run publishes what is missing.
            assert _mount(out, total_kb * 4, remount=True)
            again = _render(plan, store, out)
            assert again.ok, again.error
            have = _files(out)
            for name in VIDEOS:
                assert have[name] == want[name], name
            assert probe(str(out / "final.mp4")).frames == plan.frames
            assert (out / "status.json").exists() and (out / "deliverables.json").exists()
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)
    assert not os.path.ismount(out)
