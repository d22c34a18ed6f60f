"""The resume scan at 100,000 committed chunks, on local disk and on a moto S3 server on loopback.

Part of ``bench/peers.py`` (not a benchmark by itself). The store is filled by copying one
real commit (``ChunkStore.write_chunk``) under every key of a 100,000-chunk Wan plan, with
the key in each COMMIT.json; on S3 the copies go straight into moto's in-process backend
(filling is not what is measured). The scan is what ``reelfarm resume`` does first:
``Farm.render`` with every chunk committed (each chunk's commit read and its files' sizes
checked, the manifest written; Ray never starts).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

CHUNKS = 100_000
# moto answers ~150 requests a second here (3 a chunk: a GET of its commit, a HEAD per file), so
# the S3 scan is measured on fewer chunks and reported per chunk.
S3_CHUNKS = 1_000
RESUME_CHUNK_FRAMES = 17  # 100,000 chunks of 81 frames pass the film limit (MAX_FILM_FRAMES)


def _template(tmp: Path) -> dict[str, Any]:
    """One real committed chunk: its COMMIT.json and its attempt's files."""
    import numpy as np

    from reelfarm.cluster.store import COMMIT_NAME, ChunkStore
    from reelfarm.render.base import ChunkOutput

    store = ChunkStore(str(tmp / "template"))
    key = "f" * 32
    store.write_chunk(key, ChunkOutput(frames=np.zeros((81, 16, 16, 3), np.uint8)), meta={"chunk": "template"})
    folder = tmp / "template" / "chunks" / key
    commit = json.loads((folder / COMMIT_NAME).read_text())
    files = {name: (folder / commit["attempt"] / name).read_bytes() for name in commit["files"]}
    return {"commit": commit, "files": files}


def _commit_bytes(template: dict[str, Any], key: str) -> bytes:
    return json.dumps({**template["commit"], "key": key}, indent=2, sort_keys=True).encode()


def fill_local(root: Path, keys: list[str], template: dict[str, Any]) -> None:
    from reelfarm.cluster.store import COMMIT_NAME

    attempt = template["commit"]["attempt"]
    for key in keys:
        folder = root / "chunks" / key
        (folder / attempt).mkdir(parents=True)
        for name, data in template["files"].items():
            (folder / attempt / name).write_bytes(data)
        (folder / COMMIT_NAME).write_bytes(_commit_bytes(template, key))


def fill_moto(bucket: str, prefix: str, keys: list[str], template: dict[str, Any]) -> None:
    """Objects put straight into the in-process moto backend the server serves."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from reelfarm.cluster.store import COMMIT_NAME

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    attempt = template["commit"]["attempt"]
    for key in keys:
        for name, data in template["files"].items():
            backend.put_object(bucket, f"{prefix}/chunks/{key}/{attempt}/{name}", data)
        backend.put_object(bucket, f"{prefix}/chunks/{key}/{COMMIT_NAME}", _commit_bytes(template, key))


def scan(url: str, plan: Any, storage_options: dict[str, Any] | None = None) -> tuple[float, float]:
    """(wall seconds, driver CPU seconds) of ``Farm.render`` over a fully committed store."""
    from reelfarm.cluster.farm import Farm
    from reelfarm.cluster.manifest import ManifestWriter
    from reelfarm.cluster.store import ChunkStore

    store = ChunkStore(url, storage_options=storage_options)
    c0, t0 = time.process_time(), time.perf_counter()
    summary = Farm(store).render(plan, ManifestWriter(store, plan, f"resume-{time.time_ns()}"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert summary.ok and not summary.rendered and len(summary.cached) == len(plan.chunks), summary
    return wall, cpu


def resume_scans(repeat: int, tmp: Path, chunks: int = CHUNKS, s3_chunks: int = S3_CHUNKS) -> dict[str, Any]:
    """The scan on local disk and on S3 (moto on loopback), median of ``repeat``."""
    from bench.peers import build

    logging.getLogger("reelfarm").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    plan, _ = build(chunks, 1.0, chunk_frames=RESUME_CHUNK_FRAMES)
    keys = [c.key for c in plan.chunks]
    out: dict[str, Any] = {"chunks": len(keys), "plan_s": time.perf_counter() - t0}
    template = _template(tmp)
    t0 = time.perf_counter()
    fill_local(tmp / "resume", keys, template)
    out["fill_local_s"] = time.perf_counter() - t0
    runs = [scan(str(tmp / "resume"), plan) for _ in range(repeat)]
    out["local"] = {"runs_s": [w for w, _ in runs], "cpu_s": [c for _, c in runs],
                    "median_s": statistics.median(w for w, _ in runs)}
    print(f"  resume scan, local disk, {len(keys):,} chunks: {out['local']['median_s']:.1f} s", flush=True)
    if s3_chunks:
        out["s3"] = _s3(plan if s3_chunks >= len(keys) else None, s3_chunks, template, repeat)
    return out


def _s3(plan: Any, n: int, template: dict[str, Any], repeat: int) -> dict[str, Any]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.peers import build
    from tests import s3 as moto_s3

    for name, value in moto_s3.AWS_ENV.items():
        os.environ[name] = value
    for name in moto_s3.AWS_ENV_UNSET:
        os.environ.pop(name, None)
    if plan is None:
        plan, _ = build(n, 1.0, chunk_frames=RESUME_CHUNK_FRAMES)
    keys = [c.key for c in plan.chunks]
    moto = moto_s3.start_moto_server()
    try:
        bucket = moto_s3.create_bucket(moto.storage_options)
        t0 = time.perf_counter()
        fill_moto(bucket, "film", keys, template)
        fill = time.perf_counter() - t0
        runs = [scan(f"s3://{bucket}/film", plan, moto.storage_options) for _ in range(repeat)]
    finally:
        moto.stop()
    med = statistics.median(w for w, _ in runs)
    print(f"  resume scan, S3 on loopback, {len(keys):,} chunks: {med:.1f} s", flush=True)
    return {"chunks": len(keys), "fill_s": fill, "runs_s": [w for w, _ in runs], "cpu_s": [c for _, c in runs],
            "median_s": med}
