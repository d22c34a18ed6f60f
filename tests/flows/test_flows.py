"""Prefect flows, run for real: a Prefect API, the 3-node Ray cluster, ffmpeg, the animatic."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from reelfarm.cluster.manifest import read_manifest
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.deploy import build_deployment
from reelfarm.flows.film import render_campaign_flow, render_film_flow, resume_flow
from reelfarm.flows.plan import plan_film
from reelfarm.flows.render import load_run, render_cells
from reelfarm.render.ffmpeg import probe
from reelfarm.schemas.loader import load_film
from reelfarm.settings import Settings
from tests.films import empty_model_folder as _empty_model
from tests.films import write_film

pytestmark = [pytest.mark.usefixtures("ray_cluster", "prefect_api"), pytest.mark.ffmpeg]


def _flow_runs(name: str):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            flows = {f.id: f.name for f in await client.read_flows()}
            return [r for r in runs if flows.get(r.flow_id) == name]

    return asyncio.run(read())


def test_film_flow_renders_stitches_and_is_recorded(tmp_path):
    spec = write_film(tmp_path / "spec")
    out = tmp_path / "out"
    summary = render_film_flow(str(spec), str(out), Settings(manifest_flush_s=0.0))

    plan = plan_film(load_film(spec))
    assert summary["ok"] and summary["rendered"] == len(plan.chunks)
    final = probe(str(out / "final.mp4"))
    assert final.frames == plan.frames
    for shot in plan.shots:
        assert probe(str(out / "shots" / f"{shot.shot_id}.mp4")).frames == shot.frames
    for name in ("timeline.otio", "contact_sheet.png", "report.html", "manifest.parquet", "film.json"):
        assert (out / name).exists(), name
    rows = read_manifest(ChunkStore(str(out))).to_pylist()
    seams = [r["seam_score"] for r in rows if r["chunk_index"] > 0]
    assert seams and all(s is not None and s > 0 for s in seams)
    runs = _flow_runs("render-film")
    assert any(r.state_type.value == "COMPLETED" for r in runs)


def test_film_flow_fails_but_keeps_what_rendered(tmp_path):
    shots = [
        {"id": "s01_010", "frames": 20, "prompt": "fine", "characters": ["flame"]},
        {"id": "s01_020", "frames": 20, "prompt": "broken", "characters": [],
         "model": {"backend": "diffusers", "family": "wan", "id": str(_empty_model(tmp_path))}},
    ]
    spec = write_film(tmp_path / "spec", shots=shots, resolution=[64, 48])
    out = tmp_path / "out"
    state = render_film_flow(str(spec), str(out), Settings(), return_state=True)
    assert state.is_failed()
    assert "s01_020" in state.message
    plan = plan_film(load_film(spec))
    store = ChunkStore(str(out))
    assert all(store.is_complete(c.key) for c in plan.shot("s01_010").chunks)
    assert not (out / "final.mp4").exists()
    assert probe(str(out / "shots" / "s01_010.mp4")).frames == 20


def test_campaign_flow_renders_every_cell_and_shares_chunks(tmp_path):
    base = write_film(tmp_path / "spec", name="ad.yaml", shots=[
        {"id": "s01_010", "frames": 20, "prompt": "a shelf at night", "characters": ["flame"]},
        {"id": "s01_020", "frames": 20, "prompt": "{tagline}", "characters": []},
    ])
    campaign = {
        "reelfarm": 1, "campaign": "Tiny Launch", "film": base.name,
        "schedule": {"cron": "0 2 * * *", "timezone": "Europe/London"},
        "matrix": {"tagline": {"warm": {"vars": {"tagline": "warmth in every sip"}},
                               "bold": {"vars": {"tagline": "run the city"}}}},
    }
    spec = tmp_path / "spec" / "campaign.yaml"
    spec.write_text(yaml.safe_dump(campaign))
    out = tmp_path / "out"
    result = render_campaign_flow(str(spec), str(out), Settings())
    cells = result["cells"]
    assert set(cells) == {"warm", "bold"}
    for cell in cells:
        assert (out / cell / "final.mp4").exists()
        assert read_manifest(ChunkStore(str(out)), prefix=cell).num_rows == cells[cell]["chunks"]
    # The first shot is identical in both cells: rendered once, then found in storage.
    shared = len(plan_film(load_film(base)).shot("s01_010").chunks)
    assert cells["warm"]["rendered"] + cells["bold"]["rendered"] == cells["warm"]["chunks"] * 2 - shared
    assert cells["warm"]["cached"] + cells["bold"]["cached"] == shared

    # `reelfarm resume OUT` on a campaign: every cell found again, nothing left to render.
    run = load_run(str(out))
    assert sorted(cell for cell, _ in run) == sorted(cells)
    resumed = render_cells(run, str(out), Settings())
    assert all(r.exit_code == 0 and not r.summary.rendered for r in resumed.values())
    assert sum(len(r.summary.cached) for r in resumed.values()) == cells["warm"]["chunks"] * 2
    # Resume through Prefect: the same run function, recorded as the `resume` flow.
    again = resume_flow(str(out), Settings())
    assert set(again["cells"]) == {"warm", "bold"}
    assert all(c["rendered"] == 0 and c["ok"] for c in again["cells"].values())
    assert any(r.state_type.value == "COMPLETED" for r in _flow_runs("resume"))

    deployment = build_deployment(str(spec), str(out))
    assert deployment.name == "tiny-launch"
    (sched,) = deployment.schedules
    assert sched.schedule.cron == "0 2 * * *" and sched.schedule.timezone == "Europe/London"
    assert deployment.parameters == {"spec": str(spec), "out": str(out)}
