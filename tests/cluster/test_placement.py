"""Memory-aware placement and several GPUs per worker, on the session's real Ray cluster
(fake GPUs: Ray counts them, torch inside the workers sees none and renders on the CPU).

Fake GPUs have no memory a worker could read, so the tests declare it (``gpu_memory_gib``)
or give a node Ray's ``accelerator_type`` resource, as a cloud node has.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
from ray.util.placement_group import placement_group_table

from reelfarm.cluster.farm import Farm
from reelfarm.cluster.manifest import ManifestWriter, read_manifest
from reelfarm.cluster.store import ChunkStore
from reelfarm.errors import FarmError, PlanError
from reelfarm.flows.plan import plan_film
from reelfarm.schemas.loader import load_film
from reelfarm.settings import Settings
from tests.films import write_film
from tests.render import tiny_pipelines as tp

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _wan_spec(tmp_path, *, model_id: str, resolution: list[int], frames: int = 9):
    model = {"backend": "diffusers", "family": "wan", "id": model_id, "steps": 2, "dtype": "float32",
             "max_sequence_length": 512, "chunk_frames": 9, "overlap": 1}
    shots = [{"id": "s01_010", "frames": frames, "prompt": "a candle flame", "characters": ["flame"]}]
    return write_film(tmp_path / "spec", shots=shots, resolution=resolution, model=model,
                      characters=("flame",))


def test_a_chunk_that_fits_no_gpu_is_refused_before_anything_starts(tmp_path):
    # A model id nothing can load: had anything been encoded or rendered, the error would be
    # the loader's. 4096x4096 Wan fits no 24 GiB card with any offload.
    plan = plan_film(load_film(_wan_spec(tmp_path, model_id="org/not-there", resolution=[4096, 4096])))
    store = ChunkStore(str(tmp_path / "out"))
    with Farm(store, Settings(manifest_flush_s=0.0, gpu_memory_gib=24)) as farm:
        manifest = ManifestWriter(store, plan, "r1", flush_s=0.0)
        with pytest.raises(PlanError, match=r"^shot 's01_010': model `org/not-there` \(wan\) at "
                                            r"4096x4096x9 needs at least [\d.]+ GiB with every offload, "
                                            r"more than the largest GPU \(24 GiB\)"):
            farm.render(plan, manifest)
        assert farm.stats.identity_encodes == 0 and farm.stats.model_loads == 0
    assert {r["status"] for r in read_manifest(store).to_pylist()} == {"planned"}
    assert not store.is_complete(plan.chunks[0].key)


def test_the_offload_a_gpu_needs_is_chosen_before_the_chunk_and_keeps_pixels(tmp_path):
    """The memory model sizes Wan by its published weights (14B, float32 here): on a 48 GiB
    card the farm loads it group-offloaded, on 141 GiB whole; the frames are the same and so
    is the key. (Model and sequential offload need CUDA: on the CPU they are skipped.)"""
    spec = _wan_spec(tmp_path, model_id=str(tp.saved_model_dir("wan")), resolution=[32, 32])
    plan = plan_film(load_film(spec))
    key = plan.chunks[0].key
    frames = {}
    for gib, offload in ((48, "group"), (141, "none")):
        store = ChunkStore(str(tmp_path / f"out-{gib}"))
        with Farm(store, Settings(manifest_flush_s=0.0, gpu_memory_gib=gib, workers=1)) as farm:
            summary = farm.render(plan, ManifestWriter(store, plan, f"r{gib}", flush_s=0.0))
        assert summary.ok, summary.failed
        [line] = summary.fits["s01_010"]
        assert line.startswith(f"{gib} GiB: offload {offload}, peak ")
        side = store.read_sidecar(key)
        assert side["offload"] == offload  # what the worker loaded the model with
        assert side["accel"] == ({"group_offload": "block"} if offload == "group" else {})
        rows = read_manifest(store).to_pylist()
        assert {r["gpu"] for r in rows} == {f"GPU ({gib} GiB from gpu_memory_gib)"}
        frames[gib] = store.read_frames(key)
    np.testing.assert_array_equal(frames[48], frames[141])


@pytest.fixture
def two_gpu_node(ray_cluster):
    """One more node with two fake GPUs of Ray's accelerator type L4; removed afterwards."""
    node = ray_cluster.add_node(num_cpus=1, num_gpus=2, resources={"accelerator_type:L4": 1})
    ray_cluster.wait_for_nodes()
    node_id = next(n["NodeID"] for n in ray.nodes()
                   if n["Alive"] and n["Resources"].get("GPU") == 2)
    yield node_id
    ray_cluster.remove_node(node)


def test_gpus_per_worker_places_one_actor_on_two_gpus_of_one_node(two_gpu_node, tmp_path):
    spec = write_film(tmp_path / "spec")  # the animatic: placement is what is tested here
    plan = plan_film(load_film(spec))
    store = ChunkStore(str(tmp_path / "out"))
    farm = Farm(store, Settings(manifest_flush_s=0.0, gpus_per_worker=2))
    with farm:
        # The 1-GPU nodes hold no 2-GPU worker: one worker, on the 2-GPU node, holding both.
        [info] = farm.worker_info()
        assert info["node_id"] == two_gpu_node and info["gpus"] == 2 and info["gpu"] is None
        [w] = farm._alive()
        table = placement_group_table(w.pg)
        assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
        assert table["bundles"] == {0: {"GPU": 2.0}}
        assert set(table["bundles_to_node_id"].values()) == {two_gpu_node}
        assert farm.gpu_memory_gib(w) == 22.0  # Ray's accelerator_type L4
        summary = farm.render(plan, ManifestWriter(store, plan, "r1", flush_s=0.0))
        assert summary.ok, summary.failed
        assert summary.nodes_used == {two_gpu_node}
        rows = read_manifest(store).to_pylist()
        assert {r["gpu"] for r in rows} == {"2 x GPU (22 GiB from accelerator_type L4)"}
        pg = w.pg
    assert placement_group_table(pg)["state"] == "REMOVED"  # its GPUs given back


def test_gpus_per_worker_larger_than_any_node_is_refused_before_any_worker(two_gpu_node, tmp_path):
    farm = Farm(ChunkStore(str(tmp_path / "out")), Settings(gpus_per_worker=3))
    with pytest.raises(FarmError, match=r"^`gpus_per_worker` must be at most the GPUs of one node "
                                        r"\(the largest node here has 2\), got 3$"):
        farm.start()
    assert farm.workers == [] and farm.stats.workers_started == 0


def test_a_two_gpu_worker_splits_each_chunk_and_renders_the_frames_of_one(two_gpu_node, tmp_path):
    """gpus_per_worker 2 on the tiny Wan model: the worker's backend is split across two ranks
    (context parallelism, gloo on the CPU here), and the frames equal a one-GPU worker's."""
    spec = _wan_spec(tmp_path, model_id=str(tp.saved_model_dir("wan")), resolution=[32, 32])
    plan = plan_film(load_film(spec))
    key = plan.chunks[0].key
    frames = {}
    for n in (2, 1):
        store = ChunkStore(str(tmp_path / f"out-{n}"))
        with Farm(store, Settings(manifest_flush_s=0.0, gpus_per_worker=n, gpu_memory_gib=141)) as farm:
            summary = farm.render(plan, ManifestWriter(store, plan, f"r{n}", flush_s=0.0))
        assert summary.ok, summary.failed
        side = store.read_sidecar(key)
        assert side.get("context_parallel") == ({"kind": "ulysses", "ranks": 2} if n == 2 else None)
        frames[n] = store.read_frames(key)
    np.testing.assert_array_equal(frames[2], frames[1])
