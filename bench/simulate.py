"""Simulator benchmark: the real Scheduler on a discrete-event clock, at film and campaign scale.

Cases (targets from issue #14, on a 2-core machine): a 2-hour Wan film (planned by
``plan_film``) on 1,000 H200s, and a 1,000,000-chunk campaign-shaped job list (built
directly: planning 1M chunks takes ~30 s by itself, see plan.md), each under 60 s. Then
the makespan with the planner's estimates wrong by 3x both ways, learning on and off, and
the scheduler's peak RSS at 1,000 / 10,000 / 100,000 chunks (each in a fresh process).
Writes bench/results/simulate.md and .json. ``python -m bench simulate``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

try:
    from bench._machine import cpu_name
except ImportError:  # pragma: no cover
    from _machine import cpu_name  # type: ignore[no-redef]
from reelfarm.cluster.scheduler import Job, Rules
from reelfarm.cluster.simulate import SimSpec, chunk_seconds, sim_jobs, simulate
from reelfarm.flows.plan import plan_film
from reelfarm.schemas import Film

HERE = Path(__file__).resolve().parent
RSS = """
import sys
from reelfarm.cluster.scheduler import Job
from reelfarm.cluster.simulate import SimSpec, simulate
n = int(sys.argv[1])
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = hwm()
jobs = [Job(f"{i:032x}", f"s{i // 10}/chunk-{i % 10}", f"s{i // 10}", 30.0, "wan",
            f"{i - 1:032x}" if i % 10 else None, cost="wan", frames=81) for i in range(n)]
simulate(jobs, {j.key: (30.0, 40) for j in jobs}, SimSpec(gpus=64, load_s=0))
print(before, hwm())
"""


def scheduler_rss(sizes: tuple[int, ...] = (1_000, 10_000, 100_000)) -> list[dict[str, int]]:
    """Peak RSS (KiB) of a simulated scheduler run per film size, each in a fresh interpreter:
    the farm's driver state without Ray. ``baseline_kib`` is the interpreter before the run."""
    out = []
    for n in sizes:
        before, after = map(int, subprocess.run([sys.executable, "-c", RSS, str(n)], capture_output=True,
                                                text=True, check=True, cwd=HERE.parent).stdout.split())
        out.append({"chunks": n, "peak_kib": after, "baseline_kib": before})
    return out


def two_hour_film() -> Film:
    """720 shots of 10 s at 24 fps, Wan 832x480, 81-frame chunks chained."""
    sha = "0" * 64
    return Film.model_validate({
        "title": "two hours", "fps": 24, "seed": 1, "resolution": [832, 480],
        "model": {"backend": "diffusers", "family": "wan", "id": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"},
        "characters": {"moth": {"reference": "/refs/moth.png", "sha256": sha}},
        "scenes": [{"id": f"sc{s:03d}", "shots": [
            {"id": f"sc{s:03d}_{t:02d}", "frames": 240, "prompt": f"shot {t}", "characters": ["moth"]}
            for t in range(24)]} for s in range(30)],
    })


def campaign_jobs(n: int) -> tuple[list[Job], dict[str, tuple[float, int]]]:
    """``n`` chunks shaped like a campaign: 3-chunk chained shots, 4 aspects x 2 families."""
    sizes = [(768, 432), (432, 768), (512, 512), (1024, 432)]
    jobs: list[Job] = []
    costs: dict[str, tuple[float, int]] = {}
    for i in range(n):
        shot, k = divmod(i, 3)
        fam = "ltx" if shot % 2 else "wan"
        w, h = sizes[shot % 4]
        frames, steps = (121, 40) if fam == "ltx" else (81, 40)
        key = f"{i:032x}"
        true = chunk_seconds(fam, "h200", w, h, frames, steps)
        jobs.append(Job(key, f"sh{shot}/chunk-{k}", f"sh{shot}", true, fam, f"{i - 1:032x}" if k else None,
                        cost=f"{fam}/{w}x{h}/{steps}", frames=frames))
        costs[key] = (true, steps)
    return jobs, costs


def timed(fn, repeat: int) -> tuple[list[float], list[float], object]:
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus, out


def wrong_by(jobs: list[Job], factors: dict[str, float]) -> list[Job]:
    """The same jobs with each family's estimate multiplied by its factor."""
    return [Job(j.key, j.name, j.shot, j.est_s * factors.get(j.model, 1.0), j.model, j.depends_on,
                cost=j.cost, frames=j.frames) for j in jobs]


def mixed_film() -> tuple[list[Job], dict[str, tuple[float, int]]]:
    """A film where the critical path matters: 150 LTX shots of 80 chunks, 8 Wan shots of 12."""
    jobs, costs = [], {}
    c = chunk_seconds("ltx", "h200", 768, 512, 121, 40)
    for s in range(150):
        for k in range(80):
            key = f"l{s}-{k}"
            jobs.append(Job(key, f"l{s}/chunk-{k}", f"l{s}", c, "ltx", f"l{s}-{k - 1}" if k else None,
                            cost="ltx", frames=121))
            costs[key] = (c, 40)
    for s in range(8):
        for k in range(12):
            key = f"w{s}-{k}"
            c = chunk_seconds("wan", "h200", 832, 480, 81, 40)
            jobs.append(Job(key, f"w{s}/chunk-{k}", f"w{s}", c, "wan", f"w{s}-{k - 1}" if k else None,
                            cost="wan", frames=81))
            costs[key] = (c, 40)
    return jobs, costs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--campaign", type=int, default=1_000_000)
    ap.add_argument("--out", default=str(HERE / "results" / "simulate"))
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    rows, doc = [], {"cases": {}}

    # 1. Scale: a 2-hour film on 1,000 GPUs (with spot preemptions), a 1M-chunk campaign.
    plan = plan_film(two_hour_film())
    fjobs, fcosts = sim_jobs(plan, "h200")
    spec = SimSpec(gpus=1000, preempt_per_gpu_hour=0.05, checkpoint_steps=10, seed=1,
                   rules=Rules(max_attempts=10))
    walls, cpus, r = timed(lambda: simulate(fjobs, fcosts, spec), args.repeat)
    rows.append(("2-hour Wan film, 1,000 x h200, 0.05 preemptions/GPU-h, save every 10 steps",
                 len(fjobs), r, walls, cpus))
    t0 = time.perf_counter()
    cjobs, ccosts = campaign_jobs(args.campaign)
    build_s = time.perf_counter() - t0
    cspec = SimSpec(gpus=1000, preempt_per_gpu_hour=0.05, checkpoint_steps=10, seed=1,
                    rules=Rules(max_attempts=10))
    walls, cpus, r = timed(lambda: simulate(cjobs, ccosts, cspec), 1 if args.campaign >= 500_000 else args.repeat)
    rows.append((f"campaign-shaped {args.campaign:,} chunks (Wan+LTX, 4 sizes), 1,000 x h200, preemptions",
                 len(cjobs), r, walls, cpus))
    lines = [
        "# Simulator benchmark",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_name()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}, Python {platform.python_version()}; load average {load:.1f} at start "
        "(a neighbour ran the test suite: wall time also measures it, CPU time is given too).",
        "",
        "## Scale (target: each under 60 s)",
        "",
        "| case | chunks | median wall s | CPU s | makespan h | bound h | ratio | utilisation | "
        "preemptions | lost GPU-h | cost USD | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, n, r, walls, cpus in rows:
        med = statistics.median(walls)
        lines.append(f"| {name} | {n:,} | {med:.1f} | {statistics.median(cpus):.1f} | {r.makespan / 3600:.2f} | "
                     f"{r.bound / 3600:.2f} | {r.ratio:.3f} | {r.utilisation:.3f} | {r.preemptions} | "
                     f"{r.lost_s / 3600:.2f} | {r.usd:,.0f} | {'yes' if med < 60 else 'NO'} |")
        doc["cases"][name] = {"chunks": n, "wall_s": walls, "cpu_s": cpus, "makespan_s": r.makespan,
                              "bound_s": r.bound, "ratio": r.ratio, "utilisation": r.utilisation,
                              "preemptions": r.preemptions, "lost_s": r.lost_s, "usd": r.usd,
                              "failed": r.failed, "rechains": r.rechains}
    lines += ["", f"Building the {args.campaign:,} jobs took {build_s:.1f} s (not timed above). "
              "The campaign's jobs are built directly, not planned (planning alone would take ~30 s).", ""]

    # 2. Wrong cost models: estimates 3x off both ways, learning on and off.
    mjobs, mcosts = mixed_film()
    lines += ["## Estimates wrong by 3x (150 LTX shots of 80 chained chunks + 8 Wan shots of 12, "
              "32 x h200, no load time; one model per worker pool, so loads do not blur it)", "",
              "| estimates | queue depth | learn | makespan s | bound s | ratio |", "|---|---:|---|---:|---:|---:|"]
    doc["wrong_estimates"] = []
    for label, f in [("right", {}), ("Wan 3x low, LTX 3x high", {"wan": 1 / 3, "ltx": 3.0}),
                     ("Wan 3x high, LTX 3x low", {"wan": 3.0, "ltx": 1 / 3})]:
        for depth in (1, 2):
            for learn in (True, False):
                r = simulate(wrong_by(mjobs, f), mcosts,
                             SimSpec(gpus=32, load_s=0, learn=learn, rules=Rules(queue_depth=depth)))
                lines.append(f"| {label} | {depth} | {'on' if learn else 'off'} | {r.makespan:,.0f} | "
                             f"{r.bound:,.0f} | {r.ratio:.3f} |")
                doc["wrong_estimates"].append({"estimates": label, "queue_depth": depth, "learn": learn,
                                               "makespan_s": r.makespan, "bound_s": r.bound, "ratio": r.ratio})

    # 3. Scheduler RSS, each size in a fresh interpreter (simulated run, 64 GPUs).
    lines += ["", "## Driver RSS of a scheduler run (simulated, fresh process each)", "",
              "| chunks | peak RSS MiB | of which the run | per chunk KiB |", "|---:|---:|---:|---:|"]
    doc["rss"] = scheduler_rss()
    for r in doc["rss"]:
        n, before, after = r["chunks"], r["baseline_kib"], r["peak_kib"]
        lines.append(f"| {n:,} | {after / 1024:.0f} | {(after - before) / 1024:.0f} | "
                     f"{(after - before) / n:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        doc["machine"] = {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(), "load": load}
        Path(args.out + ".json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(statistics.median(w) < 60 for _, _, _, w, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
