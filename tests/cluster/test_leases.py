"""One writer per chunk: leases on a local disk and on S3 (moto on loopback), and two real
renders of one film into one OUT rendering every chunk exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid

import pytest

from reelfarm.cluster.lease import Leases
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.plan import plan_film
from reelfarm.render.ffmpeg import probe
from reelfarm.schemas.loader import load_film
from tests.films import write_film

KEY = "0123456789abcdef0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return ChunkStore(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_bucket")
    return ChunkStore(f"{bucket['url']}/run", storage_options=bucket["storage_options"])


def test_a_live_lease_is_respected_and_a_lapsed_one_taken_over(store):
    clock = Clock()
    a = Leases(store, "run-a", ttl_s=30, clock=clock)
    b = Leases(store, "run-b", ttl_s=30, clock=clock)
    assert a.acquire(KEY) and a.acquire(KEY)  # taken, then renewed
    assert not b.acquire(KEY) and b.holder_of(KEY).holder == "run-a"
    clock.t += 29
    assert not b.acquire(KEY)
    clock.t += 2  # run-a stopped heartbeating 31 s ago
    assert b.acquire(KEY) and b.taken_over == 1 and b.holder_of(KEY).holder == "run-b"
    assert a.renew([KEY]) == [KEY]  # run-a learns it lost the chunk
    b.release(KEY)
    assert b.holder_of(KEY) is None and a.acquire(KEY)


def test_racing_writers_exactly_one_wins(store):
    for round_ in range(5):
        key = f"{round_:02d}" + KEY[2:]
        barrier = threading.Barrier(4)
        won: list[str] = []

        def take(name: str, key: str, barrier: threading.Barrier, won: list[str]) -> None:
            leases = Leases(store, name, ttl_s=30)
            barrier.wait()
            if leases.acquire(key):
                won.append(name)

        threads = [threading.Thread(target=take, args=(f"run-{i}", key, barrier, won)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(won) == 1, won
        assert Leases(store, "x").holder_of(key).holder == won[0]


def _attempts(store: ChunkStore, key: str) -> int:
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.url("chunks", key), detail=False)]
    return sum(len(n) == 32 for n in names)  # attempt folders: uuid4 hex


@pytest.mark.ffmpeg
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_renders_into_one_out_render_each_chunk_once(where, tmp_path, request):
    spec = write_film(tmp_path / "spec")
    plan = plan_film(load_film(spec))
    extra: list[str] = []
    if where == "local":
        out = str(tmp_path / "out")
        store = ChunkStore(out)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        out = f"{bucket['url']}/run-{uuid.uuid4().hex[:6]}"
        store = ChunkStore(out, storage_options=bucket["storage_options"])
        extra = ["--storage-option", f"client_kwargs.endpoint_url={bucket['endpoint_url']}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # after s3_bucket set the keys
    # Two embedded Ray instances (no --address), one worker each, started together.
    cmd = [sys.executable, "-m", "reelfarm.cli", "render", str(spec), "--out", out, "--no-prefect", "--json",
           "--workers", "1", "--chunk-delay", "0.3", *extra]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, (stdout + stderr)[-3000:]
    attempts = {c.key: _attempts(store, c.key) for c in plan.chunks}
    assert set(attempts.values()) == {1}, attempts  # no chunk rendered twice
    # Counted by the runs themselves: together they rendered every chunk exactly once.
    summaries = [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs]
    rendered = [s.get("rendered", 0) for s in summaries]
    assert sum(rendered) == len(plan.chunks), summaries
    if where == "local":
        assert probe(os.path.join(out, "final.mp4")).frames == plan.frames
