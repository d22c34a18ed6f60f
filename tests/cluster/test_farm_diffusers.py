"""A real diffusers model through the farm: from_pretrained in Ray workers, shared identities,
chained chunks conditioned on the previous chunk read back from storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reelfarm.cluster.farm import Farm
from reelfarm.cluster.manifest import ManifestWriter, read_manifest
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.plan import plan_film
from reelfarm.schemas.loader import load_film
from reelfarm.settings import Settings
from tests.films import write_film
from tests.render import tiny_pipelines as tp

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_tiny_wan_film_renders_on_the_farm(tmp_path):
    model = {"backend": "diffusers", "family": "wan", "id": str(tp.saved_model_dir("wan")),
             "steps": 2, "dtype": "float32", "max_sequence_length": 512, "chunk_frames": 9,
             "overlap": 1}
    shots = [{"id": "s01_010", "frames": 17, "prompt": "a candle flame at night",
              "characters": ["flame"]},
             {"id": "s01_020", "frames": 9, "prompt": "a moth", "characters": ["moth"]}]
    spec = write_film(tmp_path / "spec", shots=shots, resolution=[32, 32], model=model)
    plan = plan_film(load_film(spec))
    chained = plan.shot("s01_010").chunks
    assert [c.num_frames for c in chained] == [9, 9] and chained[1].depends_on == chained[0].key

    with Farm(ChunkStore(str(tmp_path / "a")), Settings(manifest_flush_s=0.0)) as farm:
        store = farm.store
        first = farm.render(plan, ManifestWriter(store, plan, "r1"))
        assert first.ok, first.failed
        assert first.identity_encodes == 2
        info = farm.worker_info()
        assert first.model_loads == sum(w["model_loads"] for w in info) == len(
            [w for w in info if w["model_loads"]])
        for c in plan.chunks:
            assert store.read_frames(c.key).shape == (c.num_frames, 32, 32, 3)
        side = store.read_sidecar(chained[1].key)
        assert side["seed"] == chained[1].seed and side["versions"]["diffusers"].startswith("0.4")
        assert store.read_latents(chained[0].key) is not None

        # Same plan into another OUT on the same workers: no loads, same pixels.
        other = ChunkStore(str(tmp_path / "b"))
        farm.store = other
        again = farm.render(plan, ManifestWriter(other, plan, "r2"))
        assert again.ok and again.model_loads == 0
        for c in plan.chunks:
            np.testing.assert_array_equal(other.read_frames(c.key), store.read_frames(c.key))


def _one_chunk_ltx_film(tmp_path, *, steps: int):
    """A one-shot, one-chunk film on the tiny LTX (32x32, 9 frames), one character."""
    model = {"backend": "diffusers", "family": "ltx", "id": str(tp.saved_model_dir("ltx")),
             "steps": steps, "dtype": "float32", "max_sequence_length": 16, "chunk_frames": 9,
             "overlap": 1}
    shots = [{"id": "s01_010", "frames": 9, "prompt": "a candle flame", "characters": ["flame"]}]
    spec = write_film(tmp_path / "spec", shots=shots, characters=("flame",), resolution=[32, 32],
                      model=model)
    return plan_film(load_film(spec))


def test_a_chunk_killed_after_a_checkpoint_resumes_on_another_worker(tmp_path):
    """The render that died wrote its checkpoint at step 2 of 4 into OUT (here in this test's
    process); the farm's worker (another process) resumes it, runs 2 steps, and commits the
    frames an uninterrupted render makes. Its checkpoints are gone once it commits."""
    from reelfarm.cluster.worker import _decode_reference
    from reelfarm.render.base import load_backend
    from reelfarm.render.checkpoints import StepCheckpoints
    from reelfarm.render.review import manifest_summary

    try:
        from tests.render.test_checkpoints import Killed, KilledAfter
    except ImportError:  # pragma: no cover - depends on how pytest set sys.path
        from test_checkpoints import Killed, KilledAfter  # type: ignore[no-redef]

    plan = _one_chunk_ltx_film(tmp_path, steps=4)
    shot, chunk = plan.shots[0], plan.shots[0].chunks[0]
    store = ChunkStore(str(tmp_path / "a"))

    be = load_backend(shot.model)
    data = (tmp_path / "spec" / "refs" / "flame.png").read_bytes()
    ids = {"flame": be.encode_identity("flame", _decode_reference(data), shot.character_hashes[0])}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the farm's 1-CPU workers: float sums depend on the split
    try:
        with pytest.raises(Killed):
            be(shot, chunk, ids, checkpoints=KilledAfter(store, chunk.key, 4, every=1, kill_at=2))
    finally:
        torch.set_num_threads(threads)
        be.close()
    assert StepCheckpoints(store, chunk.key, 4, every=1).load().step == 2

    with Farm(store, Settings(manifest_flush_s=0.0, checkpoint_every=1)) as farm:
        resumed = farm.render(plan, ManifestWriter(store, plan, "r1"))
        assert resumed.ok, resumed.failed
        side = store.read_sidecar(chunk.key)["checkpoints"]
        assert (side["resumed_from_step"], side["steps_run"]) == (2, 2) and resumed.steps_saved == 2
        assert not (tmp_path / "a" / "checkpoints" / chunk.key).exists()
        shot_rows, _ = manifest_summary(plan, read_manifest(store, "r1"))
        assert shot_rows[shot.shot_id]["steps_saved"] == 2  # the report's count

        other = ChunkStore(str(tmp_path / "b"))  # the same chunk, never interrupted
        farm.store = other
        whole = farm.render(plan, ManifestWriter(other, plan, "r2"))
        assert whole.ok and whole.steps_saved == 0
        assert other.read_sidecar(chunk.key)["checkpoints"]["steps_run"] == 4
        np.testing.assert_array_equal(store.read_frames(chunk.key), other.read_frames(chunk.key))


def test_a_worker_on_a_draining_node_checkpoints_its_running_chunk_when_asked(tmp_path):
    """``checkpoint_now`` (what the farm calls for the workers of a draining node) runs beside
    the render, in the actor's control group, and the chunk saves one checkpoint at its next
    step end although its policy says none."""
    import ray

    from reelfarm.cluster.farm import _RemoteWorker
    from reelfarm.render.checkpoints import CheckpointPolicy

    plan = _one_chunk_ltx_film(tmp_path, steps=40)
    shot, chunk = plan.shots[0], plan.shots[0].chunks[0]
    store = ChunkStore(str(tmp_path / "out"))
    worker = _RemoteWorker.options(num_cpus=1).remote("drill/cpu-0", 0.0, CheckpointPolicy(every=0))
    try:
        data = (tmp_path / "spec" / "refs" / "flame.png").read_bytes()
        bundle = worker.encode_identity.remote(shot.model, "flame", data, shot.character_hashes[0],
                                               "f" * 16, store)
        reply = worker.render.remote(shot, chunk, store, ["flame"], bundle)
        assert ray.get(worker.checkpoint_now.remote(), timeout=60)  # not queued behind the render
        ray.get(reply, timeout=300)
        side = store.read_sidecar(chunk.key)["checkpoints"]
        assert (side["every"], side["saved"], side["on_request"]) == (0, 1, 1)
        assert side["steps_run"] == 40 and not (tmp_path / "out" / "checkpoints" / chunk.key).exists()
    finally:
        ray.kill(worker)
