"""Run every benchmark: ``python -m bench`` (or ``python -m bench plan store`` for some).

Each ``bench/<name>.py`` has a ``main()`` returning an exit code. Each runs in a fresh
interpreter, so one benchmark's imports and memory do not weigh on the next. A script that
cannot run here (no GPU, no ffmpeg...) exits with a message containing "skipped", e.g.
``sys.exit("skipped: no CUDA device")``: that counts as skipped, not failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUN_MAIN = "import importlib, sys; sys.exit(importlib.import_module('bench.{name}').main([]))"


def discover() -> list[str]:
    """Every benchmark script's name, sorted: ``bench/*.py`` less ``_private`` files."""
    return sorted(p.stem for p in HERE.glob("*.py") if not p.name.startswith("_"))


def run_one(name: str) -> tuple[str, float, str]:
    """Run ``bench/<name>.py``'s main(); (``ok`` | ``skipped`` | ``failed (rc N)``, seconds, why)."""
    t0 = time.perf_counter()
    last = ""
    # Stream the output as it comes (benchmarks are long) and keep the last line.
    with subprocess.Popen([sys.executable, "-c", RUN_MAIN.format(name=name)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                last = line.strip()
    elapsed = time.perf_counter() - t0
    if "skipped" in last.lower():
        return "skipped", elapsed, last
    if proc.returncode == 0:
        return "ok", elapsed, ""
    return f"failed (rc {proc.returncode})", elapsed, last


def main(argv: list[str] | None = None) -> int:
    names = discover()
    ap = argparse.ArgumentParser(prog="python -m bench", description="Run reelfarm's benchmarks.")
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(names)})")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; have {', '.join(names)}")
    results = []
    for name in args.names or names:
        print(f"\n=== bench/{name}.py ===", flush=True)
        results.append((name, *run_one(name)))
    print("\n| benchmark | result | seconds | note |\n|---|---|---:|---|")
    for name, status, elapsed, note in results:
        print(f"| {name} | {status} | {elapsed:.1f} | {note.replace('|', '/')} |")
    return 1 if any(status.startswith("failed") for _, status, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
