"""Animatic render speed: frames per second per camera move, on one CPU thread.

A 96-frame shot of the flame and the moth (the example references) at 768x432 with the
slate on, rendered in the animatic's native 48-frame chunks. "Cold" is the shot's first
chunk (backdrop and sprites drawn, then memoised); "warm" is the median of ``--repeats``
renders of its second chunk, by wall clock and by this process's CPU time (which other
processes on a shared machine disturb less). Run ``python bench/animatic.py`` (``--help``
for options). Prints a Markdown table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:  # `python -m bench` / `python -m bench.NAME`, or `python bench/NAME.py`
    from bench._machine import cpu_name
except ImportError:  # pragma: no cover
    from _machine import cpu_name  # type: ignore[no-redef]
from reelfarm.render.animatic import AnimaticBackend
from reelfarm.schemas.film import AnimaticModel, Camera, Transition
from reelfarm.schemas.plan import ChunkPlan, ShotPlan

ROOT = Path(__file__).resolve().parent.parent
REFS = ROOT / "examples" / "lonely_flame" / "refs"
MOVES = ["static", "pan_left", "pan_right", "tilt_up", "tilt_down", "push_in", "pull_out", "orbit"]


def make_shot(move: str, width: int, height: int, frames: int) -> ShotPlan:
    return ShotPlan(
        scene_id="s02", shot_id="s02_030", index=0,
        prompt="flame and moth face each other on the dusty shelf at night",
        characters=("flame", "moth"), character_hashes=("0" * 64, "1" * 64),
        camera=Camera(move=move, amount=0.3), transition=Transition(), transition_frames=0,
        model=AnimaticModel(slate=True), width=width, height=height, fps=Fraction(24),
        frames=frames, seed=1234, chunks=(), est_gpu_s=0.0,
    )


def make_chunk(start: int, num_frames: int) -> ChunkPlan:
    return ChunkPlan(
        name=f"s02_030/chunk-{start:04d}-{start + num_frames - 1:04d}", index=start // num_frames,
        frame_start=start, frame_end=start + num_frames, num_frames=num_frames, overlap=0,
        seed=0, key=f"bench-{start}", est_gpu_s=0.0,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--height", type=int, default=432)
    ap.add_argument("--chunk", type=int, default=48, help="frames per chunk")
    ap.add_argument("--repeats", type=int, default=7, help="warm runs per move (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "animatic.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    # 1. Identities from the example references (encoded once, as the farm does).
    backend = AnimaticBackend.load(AnimaticModel())
    identities = {}
    for name in ("flame", "moth"):
        data = (REFS / f"{name}.png").read_bytes()
        image = np.array(Image.open(REFS / f"{name}.png").convert("RGBA"))
        identities[name] = backend.encode_identity(name, image, hashlib.sha256(data).hexdigest())

    # 2. Each camera move: one cold chunk, then warm repeats of the next chunk.
    load_before = os.getloadavg()[0]
    rows, warm_fps, cpu_fps = [], [], []
    for move in MOVES:
        shot = make_shot(move, args.width, args.height, 2 * args.chunk)
        backend.close()  # forget memoised layers: the first chunk is really cold
        t0 = time.perf_counter()
        backend(shot, make_chunk(0, args.chunk), identities)
        cold = time.perf_counter() - t0
        runs, cpu_runs = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = backend(shot, make_chunk(args.chunk, args.chunk), identities)
            runs.append(time.perf_counter() - t0)
            cpu_runs.append(time.process_time() - c0)
        assert out.frames.shape == (args.chunk, args.height, args.width, 3)
        median = statistics.median(runs)
        warm_fps.append(args.chunk / median)
        cpu_fps.append(args.chunk / statistics.median(cpu_runs))
        rows.append(
            f"| {move} | {args.chunk / median:.0f} | {1000 * median / args.chunk:.2f} | "
            f"{min(args.chunk / r for r in runs):.0f}-{max(args.chunk / r for r in runs):.0f} | "
            f"{args.chunk / statistics.median(cpu_runs):.0f} | {args.chunk / cold:.0f} |"
        )
    load_after = os.getloadavg()[0]

    # 3. The table.
    lines = [
        "# Animatic benchmark: frames per second",
        "",
        "Shot: 2 characters (flame, moth), slate on, camera amount 0.3,"
        f" {args.width}x{args.height}, {args.chunk}-frame chunks; torch threads: {args.threads}.",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()},"
        f" Python {platform.python_version()}, torch {torch.__version__}.",
        f"Load average (1 min) before/after: {load_before:.2f}/{load_after:.2f}"
        " (the machine is shared: a high load lowers the numbers).",
        "",
        f"| camera | warm fps (median of {args.repeats}) | ms/frame | warm fps range |"
        " warm fps by CPU time | cold fps (first chunk, builds the backdrop) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Slowest move: **{min(warm_fps):.0f} frames/s** by wall clock,"
        f" **{min(cpu_fps):.0f} frames/s** by CPU time; median over moves:"
        f" {statistics.median(warm_fps):.0f} and {statistics.median(cpu_fps):.0f} frames/s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
