"""Diffusers backend speed on the tiny random-weight pipelines: stock vs precomputed identity.

For each family (Wan 2.1 I2V, LTX-Video, CogVideoX I2V, SVD), the tiny pipeline from
tests/render/tiny_pipelines.py is saved and loaded back with ``from_pretrained`` through
``DiffusersBackend.load``; a shot of ``--chunks`` chained chunks (32 px, 2 steps) is rendered
``--repeats`` times in each mode, interleaved, on the same chunks:

* ``stock``: ``precompute=False``, the pipeline encodes prompt and image itself every call.
* ``precomputed``: identity from the bundle, shot conditioning memoised. The memo is cleared
  before each repetition, so each one is a new shot: prompt embeddings are computed once
  per shot, each start image is encoded once.
* ``repeat``: the same chunks again with the memo warm (a retry, a take, a campaign cell).

Reports the median wall and process-CPU seconds per chunk. At this scale the encoders are a
large share of a call; with real weights the denoiser dominates (see bench/gpu_backends.py).
Run ``python bench/backends_diffusers.py`` (``--help`` for options); writes Markdown and JSON
to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

try:  # `python -m bench` / `python -m bench.NAME`, or `python bench/NAME.py`
    from bench._machine import cpu_name
except ImportError:  # pragma: no cover
    from _machine import cpu_name  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests/render/tiny_pipelines.py builds the pipelines
    sys.path.insert(0, str(ROOT))

MODES = ("stock", "precomputed", "repeat")


def render_chain(backend: Any, shot: Any, ids: dict[str, Any]) -> list[tuple[float, float, Any]]:
    """Render the shot's chunks in order, each from the previous one's tail (as the worker does)."""
    from reelfarm.render.base import Condition

    out, previous = [], None
    for chunk in shot.chunks:
        condition = None
        if previous is not None:
            condition = Condition(image=previous.frames[shot.continuation_frame(chunk)],
                                  latents=previous.latents)
        w0, c0 = time.perf_counter(), time.process_time()
        previous = backend(shot, chunk, ids, condition)
        out.append((time.perf_counter() - w0, time.process_time() - c0, previous))
    return out


def bench_family(family: str, chunks: int, repeats: int) -> dict[str, Any]:
    import numpy as np

    from reelfarm.render.diffusers import DiffusersBackend
    from tests.render import tiny_pipelines as tp

    model = tp.tiny_model(family, str(tp.saved_model_dir(family)))
    t0 = time.perf_counter()
    backend = DiffusersBackend.load(model)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = {"flame": backend.encode_identity("flame", tp.reference_image(48), "f" * 64)}
    identity_s = time.perf_counter() - t0
    shot = tp.tiny_shot(model, chunks=chunks)
    # mode -> one list per repetition of (wall, cpu) per chunk position
    samples: dict[str, list[list[tuple[float, float]]]] = {m: [] for m in MODES}
    same_first = None
    try:
        for mode in ("stock", "precomputed"):  # warm-up: first-call costs of both paths
            backend.precompute = mode != "stock"
            render_chain(backend, shot, ids)
        for _ in range(repeats):
            firsts = {}
            for mode in MODES:
                backend.precompute = mode != "stock"
                if mode != "repeat":
                    backend.clear_cache()
                runs = render_chain(backend, shot, ids)
                samples[mode].append([(w, c) for w, c, _ in runs])
                firsts[mode] = runs[0][2].frames
            same_first = bool(np.array_equal(firsts["stock"], firsts["precomputed"]))
    finally:
        backend.close()
    row: dict[str, Any] = {
        "family": family, "frames": shot.chunks[0].num_frames, "size": shot.width,
        "steps": model.steps, "chunks": chunks, "repeats": repeats, "load_s": load_s,
        "identity_s": identity_s, "first_chunk_identical_to_stock": same_first,
    }  # fmt: skip
    for mode in MODES:
        every = [s for rep in samples[mode] for s in rep]
        row[f"{mode}_wall_s"] = statistics.median(w for w, _ in every)
        row[f"{mode}_cpu_s"] = statistics.median(c for _, c in every)
        # The fastest repetition of each chunk, averaged over the chain: what a chunk costs
        # when no other process takes the CPU (this machine is shared).
        row[f"{mode}_best_s"] = statistics.fmean(
            min(rep[i][0] for rep in samples[mode]) for i in range(chunks)
        )
    row["saving_pct"] = 100.0 * (1.0 - row["precomputed_wall_s"] / row["stock_wall_s"])
    row["saving_best_pct"] = 100.0 * (1.0 - row["precomputed_best_s"] / row["stock_best_s"])
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=["wan", "ltx", "cogvideox", "svd"])
    ap.add_argument("--chunks", type=int, default=3, help="chained chunks per shot")
    ap.add_argument("--repeats", type=int, default=5, help="repetitions per mode (medians)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "backends_diffusers.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import diffusers
    import torch
    import transformers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # prompt-truncation notices of the tiny tokenizer
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [bench_family(f, args.chunks, args.repeats) for f in args.families]
    load_after = os.getloadavg()
    machine = {
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "loadavg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
    }  # fmt: skip
    lines = [
        "# Diffusers backend, tiny pipelines: seconds per chunk",
        "",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} CPUs, torch threads "
        f"{machine['torch_threads']}, {machine['platform']}, Python {machine['python']}, "
        f"torch {machine['torch']}, diffusers {machine['diffusers']}, transformers "
        f"{machine['transformers']}. 1-min load average before/after: "
        f"{machine['loadavg_1m'][0]} / {machine['loadavg_1m'][1]}.",
        "",
        f"{args.repeats} repetitions x {args.chunks} chained chunks, 32 px, 2 steps, CFG on, "
        "float32, CPU. Seconds per chunk: median wall (median process CPU) and best, the "
        "fastest repetition of each chunk averaged over the chain.",
        "",
        "| family | frames | stock | precomputed | saving | stock best | precomputed best "
        "| saving (best) | repeat, warm memo | load | identity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['frames']} | {r['stock_wall_s']:.3f} ({r['stock_cpu_s']:.3f}) "
            f"| {r['precomputed_wall_s']:.3f} ({r['precomputed_cpu_s']:.3f}) "
            f"| {r['saving_pct']:.0f} % | {r['stock_best_s']:.3f} | {r['precomputed_best_s']:.3f} "
            f"| {r['saving_best_pct']:.0f} % | {r['repeat_wall_s']:.3f} ({r['repeat_cpu_s']:.3f}) "
            f"| {r['load_s']:.2f} | {r['identity_s']:.3f} |"
        )
    lines += [
        "",
        "First chunk identical to stock: "
        + ", ".join(f"{r['family']} {'yes' if r['first_chunk_identical_to_stock'] else 'no'}"
                    for r in rows)
        + ". (Wan and SVD take CLIP from the character reference when precomputed, from the "
        "start image when stock; the equality tests give them the same image.)",
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=2), encoding="utf-8"
    )
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
