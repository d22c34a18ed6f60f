"""A real diffusers model through the farm: from_pretrained in Ray workers, shared identities,
chained chunks conditioned on the previous chunk read back from storage."""

from __future__ import annotations

import numpy as np
import pytest

from reelfarm.cluster.farm import Farm
from reelfarm.cluster.manifest import ManifestWriter
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
