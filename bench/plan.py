"""Planner benchmark: a 2-hour film and campaigns of over 100,000 chunks, planned in memory.

Targets from the foundation issue, on a 2-core machine: a 2-hour film (172,800 frames at
24 fps) plans in under 1 s, and a 100,000-chunk campaign in under 10 s. Films are built in
code (no files: references carry a fake sha256, as ``load_film`` would fill it in), then
:func:`reelfarm.flows.plan.plan_film` / :func:`plan_campaign` are timed. Run
``python bench/plan.py`` (``--help`` for options); prints a Markdown table and writes it
to ``--out``. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable

import pydantic

try:  # `python -m bench` / `python -m bench.NAME`, or `python bench/NAME.py`
    from bench._machine import cpu_name
except ImportError:  # pragma: no cover
    from _machine import cpu_name  # type: ignore[no-redef]
from reelfarm.flows.plan import plan_campaign, plan_film
from reelfarm.schemas import CampaignCell, Film

FPS = 24
ASPECTS = {"wide": [768, 432], "tall": [432, 768], "square": [512, 512], "cinema": [1024, 432]}
PRODUCTS = ["mug", "lamp", "chair", "kettle", "clock", "vase"]


def fake_sha(name: str) -> str:
    """What load_film would put in Character.sha256, without a file to hash."""
    return hashlib.sha256(f"reference of {name}".encode()).hexdigest()


def film_doc(scenes: int, shots: int, frames: int, *, title: str = "bench",
             model: dict[str, Any] | None = None, product: str | None = None,
             tagline: str | None = None) -> dict[str, Any]:
    """A film document: ``scenes`` x ``shots`` shots of ``frames`` frames, two characters.

    With ``product``, every other shot's prompt names it (as a campaign's ``{product}``
    would), so cells of one aspect share the other half of their chunks; ``tagline``
    goes into the last shot's prompt.
    """
    doc: dict[str, Any] = {
        "title": title,
        "fps": FPS,
        "seed": 1234,
        "characters": {
            "moth": {"reference": "/refs/moth.png", "sha256": fake_sha("moth")},
            "flame": {"reference": "/refs/flame.png", "sha256": fake_sha("flame")},
        },
        "scenes": [
            {
                "id": f"sc{s:03d}",
                "shots": [
                    {
                        "id": f"sc{s:03d}_{t:03d}",
                        "frames": frames,
                        "prompt": (f"scene {s} shot {t}: a moth circles a candle"
                                   + (f" beside a {product}" if product and t % 2 == 0 else "")
                                   + (f", {tagline}" if tagline and s == scenes - 1 and t == shots - 1
                                      else "")),
                        "characters": [["moth"], ["flame"], ["moth", "flame"]][t % 3],
                        "camera": {"move": ["static", "push_in", "pan_left"][t % 3]},
                    }
                    for t in range(shots)
                ],
            }
            for s in range(scenes)
        ],
    }
    if model:
        doc["model"] = model
    return doc


def campaign_cells(aspects: int, products: int, taglines: int, scenes: int, shots: int,
                   frames: int, model: dict[str, Any] | None = None) -> list[CampaignCell]:
    """An ``aspects`` x ``products`` x ``taglines`` matrix of films, as load_campaign builds them."""
    cells = []
    for aspect, size in list(ASPECTS.items())[:aspects]:
        for product in PRODUCTS[:products]:
            for n in range(taglines):
                tagline = f"tagline {n}" if taglines > 1 else None
                doc = film_doc(scenes, shots, frames, title=f"{product} spot", model=model,
                               product=product, tagline=tagline)
                doc["resolution"] = size
                values = {"aspect": aspect, "product": product}
                if tagline:
                    values["tagline"] = f"t{n:03d}"
                cells.append(CampaignCell(cell_id="/".join(values.values()), values=values,
                                          film=Film.model_validate(doc)))
    return cells


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], list[float], Any]:
    """Wall and CPU times of ``repeats`` calls (garbage collected before each), last result.

    CPU time is reported too because on a shared 2-core machine wall time also measures
    the neighbours.
    """
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        result = None
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "plan.md"),
                    help="write the Markdown table here ('' to skip)")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    wan = {"backend": "diffusers", "family": "wan", "id": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"}
    cases: list[tuple[str, Callable[[], Any], float]] = []

    # 1. The 2-hour film: 30 scenes x 24 shots x 240 frames = 172,800 frames at 24 fps.
    film_animatic = Film.model_validate(film_doc(30, 24, 240))
    film_wan = Film.model_validate(film_doc(30, 24, 240, model=wan))
    assert sum(s.frame_count(film_animatic.fps) for _, s in film_animatic.shots()) == 172_800
    cases.append(("2-hour film, animatic (48-frame chunks)", lambda: plan_film(film_animatic), 1.0))
    cases.append(("2-hour film, Wan (81-frame chunks)", lambda: plan_film(film_wan), 1.0))

    # 2. Campaigns over 100,000 chunks: 24 long cells, and 8,400 short ads (30 s, 6 Wan
    #    shots of 120 frames = 12 chunks each; per-film overhead dominates).
    long_cells = campaign_cells(4, 6, 1, 30, 24, 240)
    ad_cells = campaign_cells(4, 6, 350, 1, 6, 120, model=wan)

    def whole_campaign(cells: list[CampaignCell]) -> Callable[[], Any]:
        def run() -> Any:  # what `reelfarm plan campaign.yaml` computes
            cplan = plan_campaign("bench", cells)
            return cplan, cplan.chunk_count, cplan.unique_chunks, cplan.est_gpu_s
        return run

    cases.append(("campaign 4x6 cells of the 2-hour film, animatic", whole_campaign(long_cells), 10.0))
    cases.append(("campaign 4x6x350 cells of a 30 s Wan ad", whole_campaign(ad_cells), 10.0))

    rows, missed = [], []
    for name, fn, target in cases:
        times, cpus, result = timed(fn, args.repeats)
        if isinstance(result, tuple):
            cplan, chunks, unique, _ = result
            shots = sum(len(p.shots) for _, p in cplan.cells)
            frames = sum(p.frames for _, p in cplan.cells)
            label = f"{len(cplan.cells):,} cells"
        else:
            chunks, unique = len(result.chunks), len({c.key for c in result.chunks})
            shots, frames, label = len(result.shots), result.frames, "1 film"
        med = statistics.median(times)
        ok = med < target
        if not ok:
            missed.append(name)
        rows.append(f"| {name} | {label} | {shots:,} | {frames:,} | {chunks:,} | {unique:,} | "
                    f"{med:.3f} | {min(times):.3f} | {statistics.median(cpus):.3f} | < {target:g} | "
                    f"{'yes' if ok else '**no**'} |")
        print(f"{name}: median {med:.3f} s, min {min(times):.3f} s, "
              f"CPU {statistics.median(cpus):.3f} s, {chunks:,} chunks", file=sys.stderr)

    machine = (f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()} "
               f"({platform.machine()}), Python {platform.python_version()}, "
               f"pydantic {pydantic.VERSION}; load average {load:.1f} at start")
    lines = [
        "# Planner benchmark",
        "",
        f"`plan_film` / `plan_campaign` on films built in memory (no I/O), median and min of "
        f"{args.repeats} runs (wall clock; the target applies to the median). Campaign times "
        "include the CLI's totals (`chunk_count`, `unique_chunks`, `est_gpu_s`); building the "
        "films is not timed. CPU time is given too: on a shared machine wall time also measures "
        "the neighbours.",
        "",
        f"Machine: {machine}. Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "| case | cells | shots | frames | chunks | unique chunks | median s | min s | CPU s (median) "
        "| target s | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
    ]
    if load > (os.cpu_count() or 1):
        lines += [f"Note: load average {load:.1f} on {os.cpu_count()} CPUs at start: wall times "
                  "include waiting for other processes; the CPU column is steadier.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, args.out)
    if missed:
        print(f"missed targets: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
