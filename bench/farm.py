"""Farm benchmark: orchestration overhead and dispatch throughput on a local Ray instance.

Measures what the scheduler adds on top of the work (notes P1/P7): the same chunks with
each chunk held to a fixed duration T (``chunk_delay_s``, the drill throttle) on W CPU
workers; ideal makespan = N*T/W; overhead = (wall - ideal) / ideal. Then throughput with
T=0 (the animatic's own render + FFV1 commit per chunk), and the resume scan (every chunk
already committed). Run ``python bench/farm.py``; writes bench/results/farm.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from reelfarm.cluster.farm import Farm
from reelfarm.cluster.manifest import ManifestWriter
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.plan import plan_film
from reelfarm.schemas.loader import load_film
from reelfarm.settings import Settings

HERE = Path(__file__).resolve().parent


def _film(folder: Path, shots: int, frames: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ref = np.zeros((32, 32, 4), np.uint8)
    ref[8:24, 8:24] = (255, 160, 40, 255)
    Image.fromarray(ref).save(folder / "ref.png")
    doc = {
        "title": "farm bench", "fps": 24, "resolution": [64, 36], "seed": 1,
        "model": {"backend": "animatic", "chunk_frames": 16, "overlap": 4, "slate": False},
        "characters": {"hero": {"reference": "ref.png"}},
        "scenes": [{"id": "s1", "shots": [
            {"id": f"s1_{i:03d}", "frames": frames, "prompt": f"shot {i}", "characters": ["hero"]}
            for i in range(shots)]}],
    }
    path = folder / "film.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(farm: Farm, plan, out: Path) -> float:
    store = ChunkStore(str(out))
    farm.store = store
    t0 = time.perf_counter()
    summary = farm.render(plan, ManifestWriter(store, plan, "bench", flush_s=1.0))
    wall = time.perf_counter() - t0
    assert summary.ok, summary.failed
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--delay", type=float, default=0.5, help="T, seconds per chunk")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "farm.md"))
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="reelfarm-bench-"))
    try:
        # One chunk per shot (16 frames = one chunk), so N shots = N chunks.
        plan = plan_film(load_film(_film(tmp / "spec", args.chunks, 16)))
        n = len(plan.chunks)
        rows = []
        for delay in (args.delay, 0.0):
            settings = Settings(workers=args.workers, chunk_delay_s=delay, manifest_flush_s=1.0)
            with Farm(ChunkStore(str(tmp / "warm")), settings) as farm:
                _run(farm, plan, tmp / "warm")  # loads the model on each worker
                walls = [_run(farm, plan, tmp / f"run-{delay}-{i}") for i in range(args.repeat)]
                resume = [_run(farm, plan, tmp / f"run-{delay}-0") for _ in range(args.repeat)]
            med = statistics.median(walls)
            if delay:
                ideal = n * delay / args.workers
                rows.append((f"{n} chunks x T={delay} s on {args.workers} workers", med, min(walls),
                             f"ideal {ideal:.2f} s, overhead {(med - ideal) / ideal:+.1%}"))
            else:
                rows.append((f"{n} chunks, T=0 (animatic 64x36 + FFV1 commit)", med, min(walls),
                             f"{n / med:.1f} chunks/s"))
            rows.append((f"resume scan: {n} chunks all committed", statistics.median(resume),
                         min(resume), f"{statistics.median(resume) / n * 1000:.1f} ms/chunk"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        import ray

        if ray.is_initialized():
            ray.shutdown()
    lines = [
        "# Farm benchmark",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.platform()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; local Ray, CPU workers; "
        f"median of {args.repeat} after a warm-up run.",
        "",
        "| case | median s | min s | figure |",
        "|---|---:|---:|---|",
        *[f"| {a} | {b:.2f} | {c:.2f} | {d} |" for a, b, c, d in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
