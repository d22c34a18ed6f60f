"""Joining a film's shot clips: stream copy (concat demuxer) against re-encoding the same joins.

A 10-minute film by default: 60 shots of 10 s at 24 fps, 320x180, encoded once with the
production MP4 profile; then the film cut is joined ``--repeats`` times each way through
:func:`reelfarm.render.stitch.join_pieces` (which probes every piece before and the result
after), and the medians are compared. Run ``python bench/stitch.py`` (``--help`` for options).
Prints a Markdown table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from fractions import Fraction

import numpy as np

try:  # `python -m bench` / `python -m bench.NAME`, or `python bench/NAME.py`
    from bench._machine import cpu_name
except ImportError:  # pragma: no cover
    from _machine import cpu_name  # type: ignore[no-redef]
from reelfarm.render import ffmpeg as ff
from reelfarm.render.stitch import Piece, join_pieces


def shot_frames(index: int, frames: int, width: int, height: int) -> np.ndarray:
    """A coloured gradient drifting across the frame, per shot: compresses like footage."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    base = np.stack([128 + 100 * np.sin(6 * x + index) * np.cos(4 * y),
                     128 + 100 * np.sin(5 * y + x - index),
                     255 * (x + y) / 2 + 0 * x], axis=-1)
    base = np.clip(base, 0, 255).astype(np.uint8)
    return np.stack([np.roll(base, t * 2, axis=1) for t in range(frames)])


def ffmpeg_version() -> str:
    import subprocess

    out = subprocess.run([ff.ffmpeg_binary(), "-hide_banner", "-version"], capture_output=True,
                         text=True, check=False).stdout
    first = out.split("\n", 1)[0].replace("ffmpeg version ", "") if out else "unknown"
    return first.split(" Copyright")[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--shot-seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--size", default="320x180")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--crf", type=int, default=18)
    ap.add_argument("--out",
                    default=os.path.join(os.path.dirname(__file__), "results", "stitch.md"))
    args = ap.parse_args(argv)
    width, height = map(int, args.size.split("x"))
    fps = Fraction(args.fps)
    per_shot = round(args.shot_seconds * args.fps)
    shots = max(1, round(args.minutes * 60 / args.shot_seconds))

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-stitch-") as work:
        # 1. Encode the shot clips once (the same profile stitch_film uses).
        t0 = time.perf_counter()
        pieces = []
        for i in range(shots):
            path = os.path.join(work, f"shot_{i:03d}.mp4")
            frames = shot_frames(i, per_shot, width, height)
            ff.run_ffmpeg(ff.encode_frames_args([(path, "mp4")], width=width, height=height,
                                                fps=fps, frames=per_shot, crf=args.crf),
                          timeout=600, frames=[frames])
            pieces.append(Piece(path, per_shot))
        encode_s = time.perf_counter() - t0
        joins = [ff.Join("cut")] * (shots - 1)

        # 2. Probing alone (part of every join: each piece is checked before joining).
        t0 = time.perf_counter()
        for p in pieces:
            ff.probe(p.path)
        probe_s = time.perf_counter() - t0

        # 3. The same joins, by stream copy and by re-encoding, alternating.
        times: dict[str, list[float]] = {"copy": [], "reencode": [], "copy_ffmpeg": []}
        for r in range(args.repeats):
            for allow_copy, name in ((True, "copy"), (False, "reencode")):
                out = os.path.join(work, f"final_{name}_{r}.mp4")
                t0 = time.perf_counter()
                res = join_pieces(pieces, joins, out, fmt="mp4", fps=fps, width=width,
                                  height=height, crf=args.crf, allow_copy=allow_copy)
                times[name].append(time.perf_counter() - t0)
                assert res.method == name and res.probe.frames == shots * per_shot
                if name == "copy":  # the same command again, without the checks around it
                    t0 = time.perf_counter()
                    ff.run_ffmpeg(res.argv, timeout=600)
                    times["copy_ffmpeg"].append(time.perf_counter() - t0)
                os.remove(out)

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    copy_s = statistics.median(times["copy"])
    reencode_s = statistics.median(times["reencode"])
    film_s = shots * per_shot / args.fps
    machine = (f"{platform.node() or 'host'}: {cpu_name()}, {os.cpu_count()} cores, "
               f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
               f"ffmpeg {ffmpeg_version()}")
    lines = [
        "# Stitch benchmark: stream copy vs re-encode",
        "",
        f"Film: {shots} shots x {args.shot_seconds:g} s = {film_s / 60:g} min, "
        f"{width}x{height} @ {args.fps} fps, H.264 crf {args.crf} (x264 preset medium), "
        f"{shots * per_shot} frames.",
        f"Machine: {machine}; 1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after (other work on a shared machine slows both methods).",
        f"Shot clips encoded once from raw frames in {encode_s:.1f} s; probing all {shots} "
        f"pieces (packet count, PyAV) takes {probe_s:.2f} s and is included in each join.",
        "",
        f"| join method | median of {args.repeats} (s) | runs (s) | speed (x real time) |",
        "|---|---|---|---|",
        f"| stream copy (concat demuxer, `-c:v copy`) | {copy_s:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in times['copy'])} | {film_s / copy_s:.0f}x |",
        f"| stream copy, the ffmpeg command alone (no probes) | "
        f"{statistics.median(times['copy_ffmpeg']):.2f} | "
        f"{', '.join(f'{t:.2f}' for t in times['copy_ffmpeg'])} | "
        f"{film_s / statistics.median(times['copy_ffmpeg']):.0f}x |",
        f"| re-encode (normalised concat filter, libx264) | {reencode_s:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in times['reencode'])} | {film_s / reencode_s:.1f}x |",
        "",
        f"Re-encoding is **{reencode_s / copy_s:.1f}x** slower than stream copy (both with "
        "their checks: every piece probed before the join, the result after).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
