"""A campaign on one queue against cell by cell: makespan to the last cut, chunks rendered.

    python -m bench.campaign [--repeat 3] [--delay 0.4 4]

The example campaign (3 aspect ratios x 2 products = 6 cells, 36 chunks, 33 unique) on 2
workers, end to end (chunks and every cell's deliverables):
- real farm: embedded Ray, 2 CPU workers, animatic chunks held for at least ``--delay``
  seconds each (a stand-in for GPU time: the worker sleeps, so the CPU is free for the
  driver's stitching as it would be beside GPUs; each delay is a separate measurement),
  one warm farm, each run into a fresh OUT, in three orders:
  - ``one queue``: ``run_job`` as reelfarm runs a campaign: every cell's chunks on one
    queue, each cell stitched (on a driver thread) as soon as its own chunks are done;
  - ``one queue, stitch at end``: the same queue, every cell stitched once it is empty
    (reelfarm before per-cell stitching);
  - ``cell by cell``: each cell rendered, then stitched, then the next (before the queue);
  the makespan is the time to the last cell's ``run_done``; each cell's time to its cut
  is kept too;
- simulated: the same plans' chunks only with H200 chunk costs (reelfarm.cluster.simulate),
  one queue against cells in turn (a later cell finds the chunks it shares already rendered).
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
ORDERS = ("one queue", "one queue, stitch at end", "cell by cell")


def _run(order: str, job, farm, settings) -> tuple[int, list[float]]:
    """One campaign run in ``order``: (chunks rendered, each cell's seconds to its cut)."""
    from reelfarm import events
    from reelfarm.cluster.outdir import OutputFolder
    from reelfarm.cluster.store import ChunkStore
    from reelfarm.flows.plan import plan_film
    from reelfarm.flows.render import begin_cell, finish_cell, new_run_id, render_chunks, run_job

    cuts: list[float] = []
    t0 = time.perf_counter()

    def on_event(e) -> None:
        if e.kind == "run_done":
            cuts.append(time.perf_counter() - t0)

    with events.subscribed(on_event):
        if order == "one queue":
            results = run_job(job, settings, farm=farm)
            rendered = sum(len(r.summary.rendered) for r in results.values())
        else:
            store = farm.store = ChunkStore(job.out_url)
            out = OutputFolder(job.out_url)
            run_id = new_run_id()
            cells = [begin_cell(plan_film(film), store, run_id=run_id, prefix=name, out_url=out.cell(name).root,
                                settings=settings, output=film.output) for name, film in job.cells]
            groups = [cells] if order == "one queue, stitch at end" else [[c] for c in cells]
            rendered = 0
            for group in groups:
                for cell, summary in zip(group, render_chunks(farm, group)):
                    rendered += len(finish_cell(cell, summary, farm, store).summary.rendered)
    assert len(cuts) == len(job.cells), cuts
    return rendered, sorted(cuts)


def _real(loaded, delay: float, repeat: int) -> dict:
    from reelfarm.cluster.farm import Farm
    from reelfarm.cluster.manifest import ManifestWriter
    from reelfarm.cluster.store import ChunkStore
    from reelfarm.flows.plan import plan_film
    from reelfarm.flows.render import RunJob
    from reelfarm.settings import Settings

    settings = Settings(workers=2, chunk_delay_s=delay, manifest_flush_s=60.0)
    cells = tuple((c.cell_id, c.film) for c in loaded.cells)
    runs: dict[str, list[tuple[float, float, int]]] = {o: [] for o in ORDERS}  # (makespan, mean cut, rendered)
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-campaign-") as tmp:
        store = ChunkStore(os.path.join(tmp, "warm"))
        first = plan_film(cells[0][1])
        with Farm(store, settings) as farm:
            farm.render(first, ManifestWriter(store, first, "warm"))  # workers up, model loaded
            for i in range(repeat):
                for order in ORDERS[i % 3:] + ORDERS[:i % 3]:  # each order first once in three
                    out = os.path.join(tmp, f"{order.replace(' ', '-').replace(',', '')}-{i}")
                    job = RunJob(out, cells, (loaded.campaign.campaign, str(SPEC)))
                    rendered, cuts = _run(order, job, farm, settings)
                    runs[order].append((cuts[-1], statistics.mean(cuts), rendered))
                    print(f"run {i} {order}: makespan {cuts[-1]:.2f} s, cuts at "
                          + ", ".join(f"{c:.1f}" for c in cuts), flush=True)
    return {o: {"makespan_median_s": round(statistics.median(r[0] for r in rs), 3),
                "mean_time_to_cut_median_s": round(statistics.median(r[1] for r in rs), 3),
                "makespans_s": [round(r[0], 3) for r in rs], "rendered": rs[-1][2]}
            for o, rs in runs.items()}


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
    ap.add_argument("--delay", type=float, nargs="+", default=[0.4, 4.0],
                    help="seconds each chunk holds its worker at least (one measurement per value)")
    args = ap.parse_args(argv)
    from reelfarm.flows.plan import plan_campaign
    from reelfarm.schemas.loader import load_campaign

    loaded = load_campaign(SPEC)
    plans = [p for _, p in plan_campaign(loaded.campaign.campaign, loaded.cells).cells]
    keys = [c.key for p in plans for c in p.chunks]
    real = {d: _real(loaded, d, args.repeat) for d in args.delay}
    sim = _simulated(plans)
    ratios = {d: {o: round(r["makespan_median_s"] / rs["cell by cell"]["makespan_median_s"], 3)
                  for o, r in rs.items()} for d, rs in real.items()}
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "note": "shared with other jobs while it ran"},
        "campaign": str(SPEC.relative_to(ROOT)), "cells": len(plans), "chunks": len(keys),
        "unique_chunks": len(set(keys)), "workers": 2, "repeat": args.repeat,
        "real": {f"chunk_delay_{d}s": rs for d, rs in real.items()},
        "makespan_ratio_to_cell_by_cell": {f"chunk_delay_{d}s": r for d, r in ratios.items()},
        "simulated_h200_chunks_only": sim,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "campaign.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "# A campaign on one queue against cell by cell", "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores (shared with other jobs "
        f"while it ran). `{result['campaign']}`: {len(plans)} cells, {len(keys)} chunks, "
        f"{len(set(keys))} unique; 2 workers.", "",
        f"Real farm, end to end (embedded Ray, 2 CPU workers, animatic chunks held for at least the delay, "
        f"the worker sleeping the rest; stitching on the driver), median of {args.repeat} runs per order:", "",
        "| chunk held s | order | makespan s (to the last cut) | / cell by cell | mean time to a cell's cut s "
        "| chunks rendered |",
        "|---:|---|---:|---:|---:|---:|",
        *(f"| {d} | {o} | {r['makespan_median_s']:.2f} | {ratios[d][o]:.3f} | "
          f"{r['mean_time_to_cut_median_s']:.2f} | {r['rendered']} |" for d, rs in real.items() for o, r in rs.items()),
        "", "One queue (cells stitched as they finish) / cell by cell: "
        + ", ".join(f"**{ratios[d]['one queue']:.3f}** (chunks held {d} s)" for d in real) + ".", "",
        f"Simulated, chunks only, H200 chunk costs: one queue {sim['one queue_s']} s, cell by cell "
        f"{sim['cell by cell_s']} s, ratio **{sim['ratio']}**.",
    ]
    (RESULTS / "campaign.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
