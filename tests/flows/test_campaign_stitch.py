"""A campaign cell's cut is stitched as soon as its own chunks are done, not when the queue is.

Two cells on one queue: cell ``a`` is one shot; cell ``b`` is that shot (identical chunks,
rendered once) and a longer one. Another run holds the lease of ``b``'s last chunk (the
one-writer rule parks it), and lets it go only once ``a/final.mp4`` exists, so ``b``
cannot finish before ``a`` is published unless ``a`` waits for ``b`` (the old order: then
the lease goes only after ``GATE_S`` and the order of the timestamps says so). Nothing
here depends on how fast anything runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone

import pytest
from prefect import flow

from reelfarm import events
from reelfarm.cluster.lease import Leases
from reelfarm.cluster.manifest import read_manifest
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.film import PREFECT_STAGES
from reelfarm.flows.plan import plan_film
from reelfarm.flows.render import RunJob, run_job, run_summary
from reelfarm.render.ffmpeg import probe
from reelfarm.schemas.loader import load_film
from reelfarm.settings import Settings
from tests.films import write_film

pytestmark = [pytest.mark.usefixtures("ray_cluster", "prefect_api"), pytest.mark.ffmpeg]
GATE_S = 180.0  # the other run gives up its lease after this at the latest (old order: no deadlock)

SHARED = {"id": "s01_010", "frames": 16, "prompt": "a flame alone on a shelf", "characters": ["flame"]}
LONG = {"id": "s01_020", "frames": 52, "prompt": "a moth circles the flame", "characters": ["moth"]}


def _stitch_task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return [r for r in asyncio.run(read()) if r.name.startswith("stitch")]


def _hold_until(other: Leases, key: str, ready) -> tuple[threading.Thread, dict]:
    """Hold ``key``'s lease (another run's) until ``ready()`` or GATE_S; then let it go."""
    assert other.acquire(key)
    gate: dict = {}

    def hold() -> None:
        t0 = time.monotonic()
        while not ready() and time.monotonic() - t0 < GATE_S:
            time.sleep(0.2)
        gate["by_ready"] = ready()
        gate["at"] = time.time()
        other.release(key)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    return holder, gate


def _two_cells(out, fa, fb, spec):
    """Run cells a and b on one queue as a Prefect flow; (summaries, flow run state)."""

    @flow(name="two-cells")
    def two_cells() -> dict:
        job = RunJob(str(out), (("a", fa), ("b", fb)), ("Two cells", str(spec)))
        return {cell: run_summary(r) for cell, r in run_job(job, Settings(manifest_flush_s=0.0),
                                                            stages=PREFECT_STAGES).items()}

    state = two_cells(return_state=True)
    return state.result(), state


def test_a_cell_is_stitched_while_the_other_still_renders(tmp_path):
    fa = load_film(write_film(tmp_path / "spec", shots=[SHARED], name="a.yaml"))
    fb = load_film(write_film(tmp_path / "spec", shots=[SHARED, LONG], name="b.yaml"))
    pa, pb = plan_film(fa), plan_film(fb)
    shared = {c.key for c in pa.chunks} & {c.key for c in pb.chunks}
    assert shared == {c.key for c in pa.chunks}  # a's chunks are all b's too
    last_b = pb.shot("s01_020").chunks[-1]  # nothing continues from it
    out = tmp_path / "out"
    store = ChunkStore(str(out))

    # 1. Another run holds b's last chunk until a's cut is out (or GATE_S has passed).
    holder, gate = _hold_until(Leases(store, "other-run", ttl_s=3600), last_b.key,
                               lambda: (out / "a" / "final.mp4").exists())

    # 2. Both cells on one queue, recorded by Prefect.
    seen: list[events.RunEvent] = []
    with events.subscribed(seen.append):
        cells, state = _two_cells(out, fa, fb, tmp_path / "spec" / "b.yaml")
    holder.join(timeout=5)
    assert cells["a"]["ok"] and cells["b"]["ok"], cells

    # 3. a's cut was published before b's last chunk finished, and the lease went because of it.
    assert gate["by_ready"], "a's cut was not out while b's last chunk was held"
    a_cut = datetime.fromtimestamp((out / "a" / "final.mp4").stat().st_mtime, timezone.utc)
    rows_b = read_manifest(store, prefix="b").to_pylist()
    b_last = max(r["finished_at"] for r in rows_b if r["status"] == "done")
    held_row = next(r for r in rows_b if r["content_key"] == last_b.key)
    assert held_row["status"] == "done" and held_row["finished_at"] == b_last
    assert a_cut < b_last, (a_cut, b_last)
    # The same order on the run's event bus: a's stitch began, its cut was out, b's last chunk.
    a_stitch = next(e.at for e in seen if e.kind == "stitch_start" and e.cell == "a")
    b_chunk = next(e.at for e in seen if e.kind == "chunk_done" and e.key == last_b.key)
    assert a_stitch < gate["at"] < b_chunk

    # 4. Both cuts whole, identical chunks rendered once, both stitches recorded by Prefect.
    assert probe(str(out / "a" / "final.mp4")).frames == pa.frames
    assert probe(str(out / "b" / "final.mp4")).frames == pb.frames
    assert cells["a"]["rendered"] + cells["b"]["rendered"] == len({c.key for c in pa.chunks + pb.chunks})
    assert cells["b"]["cached"] == len(shared)
    rows_a = read_manifest(store, prefix="a").to_pylist()
    assert {r["status"] for r in rows_a} == {"done"} and (out / "a" / "status.json").exists()
    stitches = _stitch_task_runs(state.state_details.flow_run_id)
    assert len(stitches) == 2 and all(r.state_type.value == "COMPLETED" for r in stitches), stitches


def test_an_early_stitch_that_finds_a_bad_chunk_is_finished_after_the_queue(tmp_path):
    fa = load_film(write_film(tmp_path / "spec", shots=[SHARED], name="a.yaml"))
    fb = load_film(write_film(tmp_path / "spec", shots=[SHARED, LONG], name="b.yaml"))
    pa, pb = plan_film(fa), plan_film(fb)
    (victim,) = pa.chunks
    last_b = pb.shot("s01_020").chunks[-1]
    out = tmp_path / "out"
    store = ChunkStore(str(out))
    deferred = threading.Event()

    def on_event(e: events.RunEvent) -> None:
        # a's only chunk goes bad right after it commits, before a's early stitch reads it.
        if e.kind == "chunk_done" and e.key == victim.key and not deferred.is_set():
            for f in (out / "chunks" / victim.key).rglob("frames.mkv"):
                with open(f, "r+b") as fh:
                    fh.truncate(f.stat().st_size // 2)
        if e.kind == "stitch_done" and e.cell == "a" and (e.error or "").startswith("deferred"):
            deferred.set()

    # b's last chunk held until a's early stitch has given up (or GATE_S): a is reported early.
    holder, gate = _hold_until(Leases(store, "other-run", ttl_s=3600), last_b.key, deferred.is_set)
    with events.subscribed(on_event):
        cells, state = _two_cells(out, fa, fb, tmp_path / "spec" / "b.yaml")
    holder.join(timeout=5)

    assert gate["by_ready"], "a's early stitch did not find the bad chunk"
    # After the queue: the chunk rendered again with the farm, then both cells stitched.
    assert cells["a"]["ok"] and cells["b"]["ok"], cells
    assert store.is_complete(victim.key, verify=True)
    assert probe(str(out / "a" / "final.mp4")).frames == pa.frames
    assert probe(str(out / "b" / "final.mp4")).frames == pb.frames
    stitches = _stitch_task_runs(state.state_details.flow_run_id)
    assert len(stitches) == 3, stitches  # a early (gave up), a again, b
