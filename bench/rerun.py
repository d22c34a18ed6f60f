"""Re-runs of a finished film: nothing changed (no-op), and one shot edited.

    python -m bench.rerun [--spec examples/lonely_flame/film.yaml] [--repeat 3]

Renders the film once through the CLI (embedded Ray, no Prefect), then times, as separate
``reelfarm render`` processes (what a user runs, imports included):
- the no-op re-run with Prefect on (the default): every chunk and deliverable is current,
  so neither Prefect nor Ray starts and no file is written (mtimes compared);
- a re-run after one shot's prompt changed: only that shot renders, and only its clip, its
  scene and the final cut are encoded again.
Writes bench/results/rerun.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from bench._machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _render(spec: Path, out: Path, *extra: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "reelfarm.cli", "render", str(spec), "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"render failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc.stdout


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "lonely_flame" / "film.yaml"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    src = Path(args.spec).resolve()
    with tempfile.TemporaryDirectory(prefix="reelfarm-bench-rerun-") as tmp:
        work = Path(tmp)
        film_dir = work / "film"
        shutil.copytree(src.parent, film_dir)
        spec = film_dir / src.name
        out = work / "out"
        first, _ = _render(spec, out, "--no-prefect")
        print(f"first render: {first:.1f} s", flush=True)
        before = _mtimes(out)
        noop = []
        for _ in range(args.repeat):
            elapsed, stdout = _render(spec, out)
            assert "up to date" in stdout, stdout
            noop.append(elapsed)
        written = sorted(rel for rel, m in _mtimes(out).items() if before.get(rel) != m)
        print(f"no-op re-run: median {statistics.median(noop):.2f} s, files written: {len(written)}", flush=True)
        # Edit one shot's prompt: its chunks, clip, scene and the final cut change.
        doc = yaml.safe_load(spec.read_text())
        shot = doc["scenes"][-1]["shots"][-1]
        shot["prompt"] = shot["prompt"] + ", in the rain"
        spec.write_text(yaml.safe_dump(doc, sort_keys=False))
        before = _mtimes(out)
        edit, stdout = _render(spec, out, "--no-prefect")
        changed = sorted(rel for rel, m in _mtimes(out).items()
                         if before.get(rel) != m and not rel.startswith(("chunks/", "runs/", "identities/")))
        print(f"one shot edited: {edit:.1f} s; deliverables written: {changed}", flush=True)
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "spec": str(src.relative_to(ROOT)) if src.is_relative_to(ROOT) else str(src),
        "first_render_s": round(first, 2),
        "noop_rerun_s": [round(x, 3) for x in noop],
        "noop_rerun_median_s": round(statistics.median(noop), 3),
        "noop_files_written": written,
        "one_shot_edit_s": round(edit, 2),
        "one_shot_edit_written": changed,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rerun.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "# Re-runs of a finished film", "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"`{result['spec']}`; each figure is one `reelfarm render` process, imports included.", "",
        "| run | seconds | what was written |", "|---|---:|---|",
        f"| first render (`--no-prefect`) | {first:.1f} | everything |",
        f"| no-op re-run, Prefect on (median of {len(noop)}) | {statistics.median(noop):.2f} | "
        f"{len(written)} files |",
        f"| one shot's prompt edited (`--no-prefect`) | {edit:.1f} | {', '.join(changed)} |", "",
        "Target (issue 9): a no-op re-run under 5 s that writes no file.",
    ]
    (RESULTS / "rerun.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
