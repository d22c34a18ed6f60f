"""A campaign on one queue against cell by cell: makespan and chunks rendered.

    python -m bench.campaign [--repeat 3] [--delay 0.4]

The example campaign (3 aspect ratios x 2 products, 36 chunks, 33 unique) on 2 workers:
- real farm: embedded Ray, 2 CPU workers, animatic chunks held for at least ``--delay``
  seconds each (a stand-in for GPU time, so the schedule, not the 2-core CPU, decides);
  ``Farm.render_many`` (all cells on one queue) against ``Farm.render`` per cell in turn
  (what reelfarm did before), each into a fresh OUT;
- simulated: the same plans with H200 chunk costs (reelfarm.cluster.simulate), one queue
  against cells in turn (a later cell finds the chunks it shares already rendered).
Writes bench/results/campaign.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench._machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SPEC = ROOT / "examples" / "campaign" / "campaign.yaml"


def _real(plans, delay: float, repeat: int) -> dict:
    from reelfarm.cluster.farm import Farm
    from reelfarm.cluster.manifest import ManifestWriter
    from reelfarm.cluster.store import ChunkStore
    from reelfarm.settings import Settings

    settings = Settings(workers=2, chunk_delay_s=delay, manifest_flush_s=60.0)
    walls: dict[str, list[float]] = {"one queue": [], "cell by cell": []}
    rendered: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-campaign-") as tmp:
        store = ChunkStore(os.path.join(tmp, "warm"))
        with Farm(store, settings) as farm:
            farm.render(plans[0], ManifestWriter(store, plans[0], "warm"))  # workers up, model loaded
            for i in range(repeat):
                for mode in walls:
                    farm.store = store = ChunkStore(os.path.join(tmp, f"{mode}-{i}"))
                    runs = [(p, ManifestWriter(store, p, f"r{i}", flush_s=60.0, prefix=f"c{n}"))
                            for n, p in enumerate(plans)]
                    t0 = time.perf_counter()
                    if mode == "one queue":
                        summaries = farm.render_many(runs)
                    else:
                        summaries = [farm.render(p, m) for p, m in runs]
                    walls[mode].append(time.perf_counter() - t0)
                    rendered[mode] = sum(len(s.rendered) for s in summaries)
    return {mode: {"median_s": round(statistics.median(w), 3), "runs_s": [round(x, 3) for x in w],
                   "rendered": rendered[mode]} for mode, w in walls.items()}


def _simulated(plans) -> dict:
    from reelfarm.cluster.simulate import SimSpec, sim_jobs, simulate, simulate_plans

    together = simulate_plans(plans, gpus=2, gpu="h200").makespan
    seen: set[str] = set()
    in_turn = 0.0
    for plan in plans:
        jobs, costs = sim_jobs(plan, "h200")
        jobs = [j for j in jobs if j.key not in seen]
        if jobs:
            in_turn += simulate(jobs, {j.key: costs[j.key] for j in jobs}, SimSpec(gpus=2, gpu="h200")).makespan
        seen |= {j.key for j in jobs}
    return {"one queue_s": round(together, 1), "cell by cell_s": round(in_turn, 1),
            "ratio": round(together / in_turn, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.4, help="seconds each chunk holds its worker at least")
    args = ap.parse_args(argv)
    from reelfarm.flows.plan import plan_campaign
    from reelfarm.schemas.loader import load_campaign

    loaded = load_campaign(SPEC)
    plans = [p for _, p in plan_campaign(loaded.campaign.campaign, loaded.cells).cells]
    keys = [c.key for p in plans for c in p.chunks]
    real = _real(plans, args.delay, args.repeat)
    sim = _simulated(plans)
    ratio = real["one queue"]["median_s"] / real["cell by cell"]["median_s"]
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "campaign": str(SPEC.relative_to(ROOT)), "cells": len(plans), "chunks": len(keys),
        "unique_chunks": len(set(keys)), "workers": 2, "chunk_delay_s": args.delay, "real": real,
        "real_ratio": round(ratio, 3), "simulated_h200": sim,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "campaign.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "# A campaign on one queue against cell by cell", "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores. `{result['campaign']}`: "
        f"{len(plans)} cells, {len(keys)} chunks, {len(set(keys))} unique; 2 workers.", "",
        f"Real farm (embedded Ray, 2 CPU workers, each chunk held >= {args.delay} s), median of {args.repeat}:", "",
        "| order | makespan s | chunks rendered |", "|---|---:|---:|",
        *(f"| {mode} | {r['median_s']:.2f} | {r['rendered']} |" for mode, r in real.items()),
        "", f"One queue / cell by cell: **{ratio:.3f}**.", "",
        f"Simulated with H200 chunk costs: one queue {sim['one queue_s']} s, cell by cell "
        f"{sim['cell by cell_s']} s, ratio **{sim['ratio']}**.",
    ]
    (RESULTS / "campaign.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
