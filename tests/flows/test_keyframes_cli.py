"""`reelfarm keyframes` then `reelfarm render` on one spec: each keyframe rendered once (counted),
through the CLI, the keyframe stage's child process, the farm (Ray workers) and stitching."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from reelfarm.cli import app
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.plan import plan_film
from reelfarm.schemas.loader import load_film
from tests.films import write_film
from tests.render import tiny_kontext as tk
from tests.render import tiny_pipelines as tp

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.ffmpeg]
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def _json_lines(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def test_keyframes_then_render_renders_each_keyframe_once(tmp_path):
    wan = {"backend": "diffusers", "family": "wan", "id": str(tp.saved_model_dir("wan")), "steps": 2,
           "dtype": "float32", "chunk_frames": 9, "overlap": 1}
    kontext = {"family": "flux_kontext", "id": str(tk.kontext_dir()), "steps": 2, "dtype": "float32",
               "max_sequence_length": 16}
    pinned = np.random.default_rng(11).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    (tmp_path / "spec").mkdir()
    Image.fromarray(pinned).save(tmp_path / "spec" / "approved.png")
    shots = [
        {"id": "s01_010", "frames": 9, "prompt": "a candle flame at night", "characters": ["flame"]},
        {"id": "s01_020", "frames": 9, "prompt": "the moth meets the flame", "characters": ["flame", "moth"]},
        {"id": "s01_030", "frames": 9, "prompt": "the approved shot", "characters": ["moth"],
         "keyframe": {"pin": "approved.png"}},
    ]
    spec = write_film(tmp_path / "spec", shots=shots, resolution=[32, 32], model=wan,
                      keyframe={"model": kontext})
    out = tmp_path / "out"
    runner = CliRunner()

    # 1. Keyframes only: two composed (one model load), one pinned; a sheet; no chunk.
    first = runner.invoke(app, ["keyframes", str(spec), "--out", str(out), "--json"], env=ENV)
    assert first.exit_code == 0, first.output
    (summary,) = _json_lines(first.stdout)
    assert (summary["rendered"], summary["pinned"], summary["cached"], summary["model_loads"]) == (2, 1, 0, 1)
    assert Image.open(out / "keyframes.png").size[0] > 3 * 32
    plan = plan_film(load_film(spec))
    store = ChunkStore(str(out))
    assert not any(store.is_complete(c.key) for c in plan.chunks)
    keyframes = {s.shot_id: store.read_frames(s.keyframe.key)[0] for s in plan.shots}
    np.testing.assert_array_equal(keyframes["s01_030"], pinned)

    # 2. The night's render reuses all three: none rendered again, every chunk starts from its own.
    second = runner.invoke(app, ["render", str(spec), "--out", str(out), "--no-prefect", "--json"], env=ENV)
    assert second.exit_code == 0, second.output
    run = [d for d in _json_lines(second.stdout) if d.get("kind") == "summary"][-1]
    assert run["keyframes"] == {"rendered": 0, "pinned": 0, "cached": 3, "model_loads": 0}
    assert summary["rendered"] + run["keyframes"]["rendered"] == 2  # each composed keyframe once
    for s in plan.shots:
        assert store.read_sidecar(s.chunks[0].key)["start"] == "given keyframe"
        np.testing.assert_array_equal(store.read_frames(s.keyframe.key)[0], keyframes[s.shot_id])
    status = json.loads((out / "status.json").read_text())
    assert status["keyframes"]["cached"] == 3
    # The contact sheet has a keyframe tile beside each shot's; the report shows the keyframes.
    assert Image.open(out / "contact_sheet.png").size[0] > Image.open(out / "keyframes.png").size[0]
    report = (out / "report.html").read_text()
    assert "<h2>Keyframes</h2>" in report and "pinned: " in report and report.count('alt="keyframe of ') == 3
