"""Start or join Ray: with no address reelfarm runs on an instance of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from reelfarm.cluster.manifest import read_manifest
from reelfarm.cluster.store import ChunkStore
from tests.films import write_film

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.ffmpeg]


def test_render_without_address_uses_its_own_ray_and_leaves_others_alone(ray_cluster, tmp_path):
    import ray

    other = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    spec = write_film(tmp_path / "spec")
    out = tmp_path / "out"
    # No --address and no RAY_ADDRESS: a bare ray.init() would join the cluster above
    # (the last one started on this machine).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "reelfarm.cli", "render", str(spec), "--out", str(out),
                           "--no-prefect", "--workers", "1"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Token authentication is enabled" not in proc.stderr  # on, but not announced every run
    nodes = {r["node"] for r in read_manifest(ChunkStore(str(out))).to_pylist()}
    assert nodes and not nodes & other, (nodes, other)
    assert len(nodes) == 1  # the embedded instance is one node
    # The other cluster is untouched: every node still alive.
    assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} == other

    # A re-run of the finished film (Prefect on, the default): nothing rendered or encoded,
    # no file written, and neither Prefect nor Ray started.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = subprocess.run([sys.executable, "-m", "reelfarm.cli", "render", str(spec), "--out", str(out)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "up to date" in again.stdout
    assert "prefect" not in again.stderr.lower() and "ray" not in again.stderr.lower()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
