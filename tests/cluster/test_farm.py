"""The farm on a real 3-node Ray cluster (fake GPUs): placement, failures, resume, sharing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reelfarm.cluster.farm import Farm
from reelfarm.cluster.manifest import ManifestWriter, read_manifest
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.plan import plan_film
from reelfarm.flows.render import new_run_id
from reelfarm.schemas.loader import load_film
from reelfarm.settings import Settings
from tests.films import empty_model_folder as _empty_model
from tests.films import write_film

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def farm(ray_cluster, tmp_path_factory):
    """One pool of workers shared by the tests that do not kill anything."""
    store = ChunkStore(str(tmp_path_factory.mktemp("farm-store")))
    with Farm(store, Settings(manifest_flush_s=0.0)) as f:
        yield f


def _render(farm: Farm, spec: Path, out: Path):
    film = load_film(spec)
    plan = plan_film(film)
    store = ChunkStore(str(out))
    farm.store = store
    manifest = ManifestWriter(store, plan, new_run_id(), flush_s=0.0)
    return plan, store, farm.render(plan, manifest)


def _alive_nodes(cluster) -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}


def test_film_renders_on_every_node(farm, ray_cluster, tmp_path):
    spec = write_film(tmp_path / "spec")
    plan, store, summary = _render(farm, spec, tmp_path / "out")

    assert summary.ok, summary.failed
    assert len(plan.chunks) >= 9
    assert sorted(summary.rendered) == sorted(c.key for c in plan.chunks)
    assert summary.nodes_used == _alive_nodes(ray_cluster), "chunks must land on every GPU node"
    for c in plan.chunks:
        frames = store.read_frames(c.key)
        assert frames.shape == (c.num_frames, 36, 64, 3)
    rows = read_manifest(store).to_pylist()
    assert [r["status"] for r in rows] == ["done"] * len(plan.chunks)
    assert len({r["node"] for r in rows}) == 3


def test_second_run_renders_nothing_and_encodes_nothing(farm, tmp_path):
    spec = write_film(tmp_path / "spec")
    plan, _, first = _render(farm, spec, tmp_path / "out")
    # Two distinct characters are used: each identity is encoded exactly once.
    assert first.identity_encodes == 2
    info = farm.worker_info()
    # Loads counted by the driver agree with the workers' own counters, one per worker.
    assert all(w["model_loads"] <= 1 for w in info)
    _, store, second = _render(farm, spec, tmp_path / "out")
    assert second.rendered == [] and sorted(second.cached) == sorted(c.key for c in plan.chunks)
    assert second.identity_encodes == 0 and second.model_loads == 0
    # A fresh farm on the same OUT reads identities back from storage: still 0 encodes.
    rows = read_manifest(store).to_pylist()
    assert {r["status"] for r in rows} == {"cached"}


def test_editing_one_shot_renders_only_that_shot(farm, tmp_path):
    spec = write_film(tmp_path / "spec")
    plan1, _, s1 = _render(farm, spec, tmp_path / "out")
    doc = yaml.safe_load(spec.read_text())
    doc["scenes"][0]["shots"][1]["prompt"] = "a moth flies in, slowly"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    plan2, _, s2 = _render(farm, spec, tmp_path / "out")
    edited = {c.key for c in plan2.shot("s01_020").chunks}
    assert set(s2.rendered) == edited
    assert set(s2.cached) == {c.key for c in plan2.chunks} - edited
    assert not edited & {c.key for c in plan1.chunks}


def test_failed_shot_does_not_stop_the_others(farm, tmp_path):
    shots = [
        {"id": "s01_010", "frames": 30, "prompt": "fine", "characters": ["flame"]},
        {"id": "s01_020", "frames": 20, "prompt": "broken model", "characters": [],
         "model": {"backend": "diffusers", "family": "wan", "id": str(_empty_model(tmp_path))}},
    ]
    spec = write_film(tmp_path / "spec", shots=shots, resolution=[64, 48])
    plan, store, summary = _render(farm, spec, tmp_path / "out")
    assert set(summary.failed_shots) == {"s01_020"}
    assert "model_index.json" in summary.failed_shots["s01_020"]
    good = {c.key for c in plan.shot("s01_010").chunks}
    assert good <= set(summary.rendered) and all(store.is_complete(k) for k in good)
    rows = {r["shot_id"]: r for r in read_manifest(store).to_pylist()}
    assert rows["s01_020"]["status"] == "failed" and rows["s01_020"]["attempts"] == 1


def test_s3_output_end_to_end(farm, s3_bucket, tmp_path):
    spec = write_film(tmp_path / "spec", shots=[
        {"id": "s01_010", "frames": 30, "prompt": "to the cloud", "characters": ["flame"]}])
    plan = plan_film(load_film(spec))
    store = ChunkStore(s3_bucket["url"] + "/film", storage_options=s3_bucket["storage_options"])
    farm.store = store
    summary = farm.render(plan, ManifestWriter(store, plan, "r1", flush_s=0.0))
    assert summary.ok, summary.failed
    fresh = ChunkStore(s3_bucket["url"] + "/film", storage_options=s3_bucket["storage_options"])
    for c in plan.chunks:
        assert fresh.is_complete(c.key, verify=True)
    assert read_manifest(fresh).num_rows == len(plan.chunks)


def test_corrupt_chunk_found_by_stitching_is_rendered_again(farm, tmp_path):
    from reelfarm.flows.render import render_spec
    from reelfarm.render.ffmpeg import probe

    spec = write_film(tmp_path / "spec")
    film = load_film(spec)
    out = tmp_path / "out"
    first = render_spec(film, str(out), farm.settings, farm=farm)
    assert first.exit_code == 0
    # Flip one byte inside a committed chunk: sizes still match, the checksum does not.
    victim = first.plan.shot("s01_020").chunks[1]
    rec = ChunkStore(str(out)).record(victim.key)
    frames = Path(rec.url.replace("file://", "")) / rec.attempt / "frames.mkv"
    data = bytearray(frames.read_bytes())
    data[len(data) // 2] ^= 0xFF
    frames.write_bytes(bytes(data))

    again = render_spec(film, str(out), farm.settings, farm=farm)
    assert again.exit_code == 0
    assert again.summary.rendered == [victim.key]  # named by key, rendered again, not skipped
    assert probe(str(out / "final.mp4")).frames == again.plan.frames
    assert ChunkStore(str(out)).is_complete(victim.key, verify=True)


def test_unreadable_dependency_is_rendered_again_before_its_dependent(farm, tmp_path):
    model = {"backend": "animatic", "chunk_frames": 16, "overlap": 4, "continuation": "previous"}
    spec = write_film(tmp_path / "spec", model=model)
    plan, store, first = _render(farm, spec, tmp_path / "out")
    assert first.ok
    c0, c1 = plan.shot("s01_010").chunks[:2]
    assert c1.depends_on == c0.key
    # Corrupt the first chunk (same size, wrong bytes) and drop the second's commit.
    rec = store.record(c0.key)
    frames = Path(rec.url) / rec.attempt / "frames.mkv"
    data = bytearray(frames.read_bytes())
    data[len(data) // 2] ^= 0xFF
    frames.write_bytes(bytes(data))
    (Path(store.chunk_url(c1.key)) / "COMMIT.json").unlink()

    _, _, second = _render(farm, spec, tmp_path / "out")
    assert second.ok, second.failed
    assert sorted(second.rendered) == sorted([c0.key, c1.key])
    assert store.is_complete(c0.key, verify=True) and store.is_complete(c1.key, verify=True)
