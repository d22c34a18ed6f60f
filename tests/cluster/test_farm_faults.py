"""Failure drills on a real 3-node Ray cluster: each test starts its own farm and breaks it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from reelfarm.cluster.farm import Farm
from reelfarm.cluster.manifest import ManifestWriter, read_manifest
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.plan import plan_film
from reelfarm.schemas.loader import load_film
from reelfarm.settings import Settings
from tests.films import empty_model_folder as _empty_model
from tests.films import write_film

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_model_loads_equal_worker_model_pairs(ray_cluster, tmp_path):
    spec = write_film(tmp_path / "spec")
    store = ChunkStore(str(tmp_path / "out"))
    with Farm(store, Settings(manifest_flush_s=0.0)) as farm:
        plan = plan_film(load_film(spec))
        summary = farm.render(plan, ManifestWriter(store, plan, "r1"))
        info = farm.worker_info()
    used = [w for w in info if w["model_loads"]]
    assert summary.model_loads == sum(w["model_loads"] for w in info) == len(used)
    assert {w["model"] for w in used} == {"animatic"}
    # Identity bundles were written to storage under their content hash.
    assert len(store.fs.ls(store.url("identities"))) == 2


def _run_in_thread(fn):
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("result", fn()), daemon=True)
    t.start()
    return t, box


def _wait_for(predicate, timeout: float = 60.0, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError("timed out waiting")


def test_killing_a_worker_mid_chunk_loses_nothing(ray_cluster, tmp_path):
    spec = write_film(tmp_path / "spec")
    plan = plan_film(load_film(spec))
    store = ChunkStore(str(tmp_path / "out"))
    with Farm(store, Settings(chunk_delay_s=0.5, manifest_flush_s=0.0)) as farm:
        victim = farm.worker_info()[0]
        manifest = ManifestWriter(store, plan, "r1", flush_s=0.0)
        thread, box = _run_in_thread(lambda: farm.render(plan, manifest))
        # Kill the victim while it is inside a chunk (each chunk takes >= 0.5 s).
        _wait_for(lambda: any(r.worker == victim["worker"] and r.status == "running"
                              for r in manifest.rows))
        time.sleep(0.2)
        os.kill(victim["pid"], signal.SIGKILL)
        thread.join(120)
        summary = box["result"]
    assert summary.ok, summary.failed
    assert sorted(summary.rendered) == sorted(c.key for c in plan.chunks)  # each exactly once
    assert max(r.attempts for r in manifest.rows) == 2  # the killed chunk, retried elsewhere
    for c in plan.chunks:
        assert store.read_frames(c.key).shape[0] == c.num_frames
    assert sum(s.frames for s in plan.shots) - sum(s.transition_frames for s in plan.shots) == plan.frames


def test_removing_a_node_mid_run_loses_nothing(ray_cluster, tmp_path):
    extra = ray_cluster.add_node(num_cpus=1, num_gpus=1)
    ray_cluster.wait_for_nodes()
    spec = write_film(tmp_path / "spec")
    plan = plan_film(load_film(spec))
    store = ChunkStore(str(tmp_path / "out"))
    with Farm(store, Settings(chunk_delay_s=0.5, manifest_flush_s=0.0)) as farm:
        extra_id = extra.node_id
        assert any(w.node_id == extra_id for w in farm.workers)
        manifest = ManifestWriter(store, plan, "r1", flush_s=0.0)
        thread, box = _run_in_thread(lambda: farm.render(plan, manifest))
        _wait_for(lambda: any(r.node == extra_id and r.status == "running" for r in manifest.rows))
        ray_cluster.remove_node(extra, allow_graceful=False)
        thread.join(180)
        summary = box["result"]
    assert summary.ok, summary.failed
    assert sorted(summary.rendered) == sorted(c.key for c in plan.chunks)
    assert all(r.status == "done" and r.node != extra_id for r in manifest.rows if r.attempts > 1)
    for c in plan.chunks:
        assert store.read_frames(c.key).shape[0] == c.num_frames


def test_driver_killed_then_resumed_renders_no_finished_chunk(ray_cluster, tmp_path):
    spec = write_film(tmp_path / "spec")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "reelfarm.cli", "render", str(spec), "--out", str(out),
           "--address", ray_cluster.address, "--no-prefect", "--chunk-delay", "0.4"]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    store = ChunkStore(str(out))
    plan = plan_film(load_film(spec))
    try:
        _wait_for(lambda: sum(store.is_complete(c.key) for c in plan.chunks) >= 3, timeout=90)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    time.sleep(2.0)  # the dead driver's workers are torn down by Ray
    finished = {c.key for c in plan.chunks if store.is_complete(c.key)}
    assert 3 <= len(finished) < len(plan.chunks), "the driver must die mid-run"

    resumed = subprocess.run([sys.executable, "-m", "reelfarm.cli", "resume", str(out),
                              "--address", ray_cluster.address], env=env, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = read_manifest(store).to_pylist()
    assert {r["content_key"] for r in rows if r["status"] == "cached"} == finished
    assert {r["content_key"] for r in rows if r["status"] == "done"} == {c.key for c in plan.chunks} - finished


def test_chunk_past_its_deadline_is_cancelled_and_nodes_blocklisted(ray_cluster, tmp_path):
    spec = write_film(tmp_path / "spec", shots=[
        {"id": "s01_010", "frames": 10, "prompt": "one slow chunk", "characters": []}])
    plan = plan_film(load_film(spec))
    store = ChunkStore(str(tmp_path / "out"))
    settings = Settings(chunk_delay_s=30.0, timeout_floor_s=1.0, timeout_factor=2.0, load_timeout_s=0.0,
                        node_failure_limit=1, max_attempts=3, manifest_flush_s=0.0)
    with Farm(store, settings) as farm:
        farm.worker_info()  # workers up before the clock starts
        summary = farm.render(plan, ManifestWriter(store, plan, "r1"))
    key = plan.chunks[0].key
    assert "ChunkTimeout after 3 attempts" in summary.failed[key]
    # Each node failed once (limit 1): the first two are blocklisted; the last node that
    # can take work never is, since that would fail everything left.
    assert len(summary.blocklisted) == 2
    rows = read_manifest(store).to_pylist()
    assert rows[0]["status"] == "failed" and rows[0]["attempts"] == 3
    assert not store.is_complete(key)


def test_cli_render_with_a_failed_shot_exits_1_and_keeps_the_rest(ray_cluster, tmp_path):
    shots = [
        {"id": "s01_010", "frames": 20, "prompt": "fine", "characters": ["flame"]},
        {"id": "s01_020", "frames": 20, "prompt": "broken", "characters": [],
         "model": {"backend": "diffusers", "family": "wan", "id": str(_empty_model(tmp_path))}},
    ]
    spec = write_film(tmp_path / "spec", shots=shots, resolution=[64, 48])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "reelfarm.cli", "render", str(spec), "--out", str(out),
                           "--address", ray_cluster.address, "--no-prefect"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "shot s01_020 failed" in proc.stderr and "model_index.json" in proc.stderr
    assert "[red]" not in proc.stderr and "[/]" not in proc.stderr  # markup rendered, not printed
    plan = plan_film(load_film(spec))
    store = ChunkStore(str(out))
    assert all(store.is_complete(c.key) for c in plan.shot("s01_010").chunks)
    assert (out / "status.json").exists() and not (out / "final.mp4").exists()
    # No cut, but the good shot's clip is there for the editors.
    assert (out / "shots" / "s01_010.mp4").exists() and not (out / "shots" / "s01_020.mp4").exists()


def test_a_drained_node_gets_no_new_chunk_after_the_drain(ray_cluster, tmp_path):
    import ray
    from ray.core.generated import autoscaler_pb2

    extra = ray_cluster.add_node(num_cpus=1, num_gpus=1)
    ray_cluster.wait_for_nodes()
    spec = write_film(tmp_path / "spec")
    plan = plan_film(load_film(spec))
    store = ChunkStore(str(tmp_path / "out"))
    try:
        with Farm(store, Settings(chunk_delay_s=3.0, manifest_flush_s=0.0)) as farm:
            manifest = ManifestWriter(store, plan, "r1", flush_s=0.0)
            thread, box = _run_in_thread(lambda: farm.render(plan, manifest))
            _wait_for(lambda: any(r.node == extra.node_id and r.status == "running" for r in manifest.rows))
            # Spot preemption notice: Ray's drain API with a deadline two minutes out.
            gcs = ray._raylet.GcsClient(address=ray_cluster.address)
            accepted, why = gcs.drain_node(extra.node_id, autoscaler_pb2.DrainNodeReason.Value(
                "DRAIN_NODE_REASON_PREEMPTION"), "spot preemption drill", int(time.time() * 1000) + 120_000)
            assert accepted, why
            drained_at = time.time()
            thread.join(180)
            summary = box["result"]
    finally:
        ray_cluster.remove_node(extra, allow_graceful=False)
    assert summary.ok, summary.failed
    assert sorted(summary.rendered) == sorted(c.key for c in plan.chunks)
    on_extra = [r for r in manifest.rows if r.node == extra.node_id]
    assert on_extra, "the extra node rendered before the drain"
    # The farm polls Ray's drain list every second; chunks hold their worker 3 s, so without
    # the drain the node's worker would start its next chunk about 3 s after the notice.
    late = [r.chunk_name for r in on_extra if r.started_at.timestamp() > drained_at + 1.5]
    assert not late, late
    after = [r for r in manifest.rows if r.started_at and r.started_at.timestamp() > drained_at + 1.5]
    assert after, "chunks still started elsewhere after the drain (else the test proves nothing)"
    assert extra.node_id not in summary.blocklisted
