"""Chunk store throughput: write+commit and read+verify of 48-frame 768x432 chunks on local disk.

Run with ``python bench/store.py`` (or ``python -m bench.store``); ``--help`` lists the options.
Prints a Markdown table (median of ``--repeats`` runs) and writes it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from reelfarm.cluster.store import ChunkStore
from reelfarm.render.base import ChunkOutput
from reelfarm.render.codec import decode_frames, encode_frames

logger = logging.getLogger(__name__)


def natural_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Moving colour gradients plus mild sensor-like noise: closer to real video than noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        phase = t / max(num_frames, 1)
        rgb = np.stack(
            [
                128 + 100 * np.sin(6.0 * x + 3.0 * phase) * np.cos(4.0 * y),
                128 + 100 * np.sin(5.0 * y - 2.0 * phase + x),
                255 * (x + y) / 2 * np.ones_like(x + y),
            ],
            axis=-1,
        )
        out[t] = np.clip(rgb + rng.normal(0.0, 4.0, rgb.shape), 0, 255).astype(np.uint8)
    return out


def noise_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Uniform random pixels: the worst case for a lossless codec."""
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), np.uint8)


CONTENT: dict[str, Callable[..., np.ndarray]] = {"natural": natural_frames, "noise": noise_frames}


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """Median and min wall seconds, and median CPU seconds (all threads) of ``fn()``."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), min(walls), statistics.median(cpus)


def bench_content(store: ChunkStore, frames: np.ndarray, repeats: int) -> dict[str, Any]:
    """(median wall, min wall, median CPU) seconds for each step on one chunk of ``frames``."""
    keys: list[str] = []

    def write() -> None:
        key = uuid.uuid4().hex
        store.write_chunk(key, ChunkOutput(frames), meta={"bench": True})
        keys.append(key)

    write_s = _median_time(write, repeats)
    read_keys = iter(keys)
    read_s = _median_time(lambda: store.read_frames(next(read_keys)), repeats)
    np.testing.assert_array_equal(store.read_frames(keys[0]), frames)  # bit-exact, untimed
    record = store.record(keys[0])
    assert record is not None
    data = encode_frames(frames)
    return {
        "write_s": write_s,
        "read_s": read_s,
        "encode_s": _median_time(lambda: encode_frames(frames), repeats),
        "decode_s": _median_time(lambda: decode_frames(data, num_frames=len(frames)), repeats),
        "stored_mb": record.bytes / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", help="store root (default: a fresh temporary folder, removed)")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--height", type=int, default=432)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--content", choices=[*CONTENT, "all"], default="all")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)

    root = args.root or tempfile.mkdtemp(prefix="reelfarm-bench-store-")
    try:
        store = ChunkStore(root)
        names = list(CONTENT) if args.content == "all" else [args.content]
        raw_mb = args.frames * args.height * args.width * 3 / 1e6
        import av

        lines = [
            "# Chunk store benchmark",
            "",
            f"`ChunkStore` on a local disk ({store.root}): chunks of {args.frames} frames of "
            f"{args.width}x{args.height} ({raw_mb:.1f} MB raw RGB), FFV1 in Matroska, "
            f"{args.repeats} runs. *natural*: moving colour gradients plus Gaussian noise "
            "(sigma 4); *noise*: uniform random pixels, the worst case. "
            "*write+commit* is `write_chunk` (encode, sha256, write, "
            "size check, COMMIT.json); *read+verify* is `read_frames` (commit, read, size and "
            "sha256 check, decode). frames/s and raw MB/s use the median wall time. CPU time "
            "counts all threads; on a shared machine wall time also measures the neighbours.",
            "",
            f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
            f"{platform.python_version()}, PyAV {av.__version__}; load average "
            f"{os.getloadavg()[0]:.1f} at start. Run "
            f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M')} UTC.",
            "",
            "| content | step | median s | min s | frames/s | raw MB/s | CPU s | stored MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in names:
            frames = CONTENT[name](args.frames, args.height, args.width)
            result = bench_content(store, frames, args.repeats)
            for step, key in (
                ("write+commit", "write_s"),
                ("read+verify", "read_s"),
                ("encode only", "encode_s"),
                ("decode only", "decode_s"),
            ):
                secs, best, cpu = result[key]
                lines.append(
                    f"| {name} | {step} | {secs:.3f} | {best:.3f} | {args.frames / secs:.0f} | "
                    f"{raw_mb / secs:.0f} | {cpu:.3f} | {result['stored_mb']:.1f} |"
                )
        table = "\n".join(lines)
        print(table)
        if args.out:
            with open(args.out, "w") as f:
                f.write(table + "\n")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
