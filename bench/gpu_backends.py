"""Diffusers families at their published sizes, random weights: acceleration options, in a window.

GPU time comes in short windows (about 10 minutes, start-up included), so this script is
built to fit one: ``--budget SECONDS`` is split across the families in proportion to their
expected cost, and each family runs in its own process (bench/_gpu_family.py) with its own
time limit. A family over its limit is killed and recorded as "timed out" with whatever it
finished; its unused time rolls over to the next. Results (Markdown and JSON) are rewritten
after every family.

Per family (each renders one chunk through ``DiffusersBackend.from_pipeline``, so the project's
``reelfarm.render.accel`` applies every option):

1. build the pipeline from configs in code (random weights, seeded; no download);
2. warm up (2 steps, decoded), then time one step on a rebuilt denoiser;
3. from that step time and the family's share of the budget, choose one step count for stock
   and every variant (at least 8 for Wan, LTX and CogVideoX, so caches can skip; SVD 4),
   dropping the least likely options when even that does not fit;
4. stock, then each option that applies, one at a time, then the best combination (the
   fastest cache, attention kernel, fp8 and compile that beat stock; SVD adds the decode
   chunk). Options whose kernel is not installed, or that need CUDA on a CPU run, are
   skipped with the reason.

Reported per setting: seconds per step (CUDA events, enable_timing; perf_counter on CPU),
the speedup over stock at equal steps, peak memory (torch.cuda.max_memory_allocated; on CPU
the RSS rise), the largest difference from stock at the same seed (pixels after decode, or
latents when the family's decode is too dear to repeat in the budget), and GPU seconds per
second of video at the family's default steps. Targets (issue 11) are printed against the
results. Random weights make the pictures noise: only time, memory and the size of the
differences mean anything. Threshold caches (first-block, MagCache) decide from the model's
own dynamics, which random weights do not have, so they run on a fixed schedule here.

Families: ``wan`` Wan2.1-I2V-14B-480P 832x480x81 bf16 (VAE, CLIP fp32), ``cogvideox``
CogVideoX-5B-I2V 720x480x49 bf16, ``ltx`` LTX-Video 2B 0.9.0 768x512x121 bf16, ``svd``
SVD-XT 1024x576x25 fp16; on request (``--families wan_vace``, its own window) ``wan_vace``
Wan2.1-VACE-1.3B 832x480x81 bf16 with the shot's characters as reference images.
``--scale tiny --device cpu`` runs tests/render/tiny_pipelines.py's pipelines through the
very same code (what was verified here: every family, every option that runs on CPU, the
planner, the per-family processes and the time limit); ``--scale small`` keeps the widths
with fewer layers. ``--dry-run`` prints the plan for a budget without building anything;
``--params`` builds every family on the meta device and prints parameter counts (checked
here: Wan 22.8 B, its transformer 16.4 B; Wan VACE 1.3B 8.0 B, its transformer 2.15 B with
the VACE blocks; LTX 1.9 B; CogVideoX 5.6 B; SVD's UNet 1.5 B). **Not verified without a
GPU**: the full-size runs, CUDA-event timing, the CUDA attention kernels, fp8 and regional
compile on CUDA, group offload with streams, and whether the step counts chosen actually
fit the window (the priors for Wan and CogVideoX are estimates). Without CUDA (and without
``--device cpu``) it prints "skipped" and exits 0.

Writes ``<out-dir>/gpu_backends_<device>_<scale>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

try:  # `python -m bench` / `python -m bench.NAME`, or `python bench/NAME.py`
    from bench import _gpu_family as gf
    from bench._machine import cpu_name
except ImportError:  # pragma: no cover
    import _gpu_family as gf  # type: ignore[no-redef]
    from _machine import cpu_name  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET = 540.0  # a 10-minute window less installing wheels and starting Python
WRITE_RESERVE = 5.0  # seconds kept back for the last write
TARGETS = {
    "wan": "best setting >= 2x faster per chunk than stock at equal steps",
    "cogvideox": "best setting >= 2x faster per chunk than stock at equal steps",
    "ltx": "<= 5 s per 121-frame chunk at 40 steps",
    "svd": "1024x576x25 under 24 GiB peak",
}
NOTES = [
    "Random weights at the published architecture sizes (built in code, seeded): pictures are "
    "noise; times, memory and the size of differences are what count.",
    "Stock and every setting run the same step count on a freshly built denoiser with the same "
    "weights and seed; `s/step` is the denoising loop's mean per step (CUDA events on a GPU, "
    "perf_counter on CPU), so cached steps count at their real, lower cost.",
    "cache=first_block runs on a **fixed schedule** (the first two transformer calls of each "
    "CFG branch, then every other one), and cache=mag on reelfarm's fixed schedule (no "
    "calibrated ratios: all 1, so retention 0.2 and max_skip_steps 3 decide): their thresholds "
    "would decide from the weights' own dynamics, which random weights do not have. "
    "TaylorSeer (interval 2) and FasterCache are fixed schedules anyway.",
    "`diff`: the largest absolute difference from stock at the same seed: 8-bit pixels after "
    "decode where the decode fit the budget, else the latents.",
    "`GPU-s/video-s`: (prepare + s/step x the family's default steps + decode) / (frames / "
    "native fps: Wan 16, LTX 24, CogVideoX 8, SVD 7); a setting that was not decoded uses "
    "stock's decode time.",
]


# --- planning ----------------------------------------------------------------------------


def plan(families: list[str], budget: float, scale: str, device: str) -> list[dict[str, Any]]:
    """The expected plan: each family's share and the steps its priors give (--dry-run)."""
    shares = gf.split_budget(families, budget - WRITE_RESERVE, scale, device)
    out = []
    for family in families:
        build, prepare, step, decode = gf.PRIOR[scale][family]
        share = shares[family]
        runnable = [n for n, a in gf.options(family) if not _refused_cheap(n, device)]
        # As bench/_gpu_family.py plans once it has measured these (priors here).
        left = share - gf.STARTUP_S - build - prepare - decode - 2 * step
        rebuild = gf.REBUILD[scale][family]
        decode_all = decode * (len(runnable) + 2) < 0.15 * max(left, 1.0)
        steps, kept, dropped = gf.plan_steps(
            family, left - decode, step_s=step, fixed_s=0.05 * left,
            per_variant_s=rebuild + 0.2 * prepare + (decode if decode_all else 0.0),
            variants=runnable, min_steps=gf.MIN_STEPS[family],
            max_steps=gf.DEFAULT_STEPS[family],
        )  # fmt: skip
        w, h, f = gf.GEOMETRY[family][scale]
        out.append({"family": family, "size": f"{w}x{h}x{f}", "share_s": share, "steps": steps,
                    "prior_step_s": step, "kept": kept, "dropped": dropped})  # fmt: skip
    return out


def _refused_cheap(name: str, device: str) -> bool:
    """Options skipped without trying on this device (for the dry-run's plan)."""
    if device.startswith("cuda"):
        return name in ("attention=flash", "attention=flash3", "attention=sage") and not \
            _installed(name.split("=")[1])
    return name in ("compile", "group_offload=block") or name.split("=")[-1] in gf.ATTENTION[:5]


def _installed(kernel: str) -> bool:
    import importlib.util

    module = {"flash": "flash_attn", "flash3": "flash_attn_interface", "sage": "sageattention"}
    return importlib.util.find_spec(module[kernel]) is not None


def dry_run(args: argparse.Namespace) -> int:
    rows = plan(args.families, args.budget, args.scale, args.device)
    print(f"plan for --budget {args.budget:.0f} s, {args.scale} on {args.device} "
          f"(priors, before any measurement):")  # fmt: skip
    for r in rows:
        print(f"  {r['family']:<10} {r['size']:<14} share {r['share_s']:5.0f} s  steps "
              f"{args.steps or r['steps']:>3} (prior {r['prior_step_s']} s/step)  options: "
              f"{', '.join(r['kept']) or '-'}"
              + (f"  dropped: {', '.join(r['dropped'])}" if r["dropped"] else ""))
    print("each family measures one warm step first and re-plans from it")
    return 0


def count_params(args: argparse.Namespace) -> int:
    """Build every family on the meta device and print parameter counts (checks configs)."""
    import torch

    for family in args.families:
        scale = "small" if args.scale == "small" else "full"
        pipe = gf.BUILDERS[family](gf.Builder("meta", scale == "small"),
                                   getattr(torch, gf.DTYPE[family]))  # fmt: skip
        counts = gf.parameter_counts(pipe)
        parts = ", ".join(f"{k} {v:.3f} B" for k, v in sorted(counts.items()))
        print(f"{family} ({scale}): {sum(counts.values()):.2f} B parameters: {parts}")
    return 0


# --- running -----------------------------------------------------------------------------


def run_family(family: str, args: argparse.Namespace, share: float, jsonl: Path,
               log: Path) -> tuple[str, float]:
    """Run one family in its own process, killed at ``share`` seconds. (status, seconds)."""
    jsonl.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench._gpu_family", "--family", family, "--scale",
           args.scale, "--device", args.device, "--budget", f"{share:.1f}", "--deadline",
           f"{time.time() + share - 2.0:.1f}", "--out", str(jsonl)]  # fmt: skip
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as fh, subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    ) as proc:
        assert proc.stdout is not None
        out = proc.stdout

        def pump() -> None:
            for line in out:
                fh.write(line)
                fh.flush()
                if line.startswith(f"[{family}]") or "Error" in line:
                    sys.stdout.write(line[:400] + ("\n" if len(line) > 400 else ""))
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=share)
            status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timed out after {share:.0f} s"
        reader.join(timeout=5)
    return status, time.perf_counter() - t0


def load_records(jsonl: Path) -> dict[str, Any]:
    """What a family process wrote: meta, plan, variants (in order), done."""
    out: dict[str, Any] = {"variants": []}
    if not jsonl.exists():
        return out
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        kind = rec.pop("kind")
        if kind == "variant":
            out["variants"].append(rec)
        else:
            out[kind] = rec
    return out


def summarise(family: str, rec: dict[str, Any]) -> None:
    """Add speedups, per-chunk estimates, GPU-s per video-s and the target to ``rec``."""
    meta = rec.get("meta")
    variants = {v["name"]: v for v in rec["variants"] if v.get("status") == "ok"}
    stock = variants.get("stock")
    if not meta or not stock:
        return
    default = gf.DEFAULT_STEPS[family]
    video_s = meta["frames"] / gf.NATIVE_FPS[family]
    for v in variants.values():
        decode = v["decode_s"] if v.get("decoded") else stock["decode_s"]
        v["speedup"] = stock["s_per_step"] / v["s_per_step"] if v["s_per_step"] else None
        v["chunk_s"] = stock["prepare_s"] + v["s_per_step"] * v["steps"] + decode
        v["chunk_speedup"] = stock["chunk_s"] / v["chunk_s"] if "chunk_s" in stock else None
        v["default_chunk_s"] = stock["prepare_s"] + v["s_per_step"] * default + decode
        v["gpu_s_per_video_s"] = v["default_chunk_s"] / video_s
    for v in variants.values():  # stock's chunk_s exists now
        v["chunk_speedup"] = stock["chunk_s"] / v["chunk_s"]
    fastest = min(variants.values(), key=lambda v: v["chunk_s"])
    if family not in TARGETS:  # no target of its own (wan_vace): its figures only
        return
    if family in ("wan", "cogvideox"):
        got = f"{fastest['name']}: {fastest['chunk_speedup']:.2f}x per chunk"
        met = fastest["chunk_speedup"] >= 2.0
    elif family == "ltx":
        at40 = min(v["default_chunk_s"] for v in variants.values())
        got = f"{at40:.2f} s per chunk at 40 steps ({fastest['name']})"
        met = at40 <= 5.0
    else:
        low = min(variants.values(), key=lambda v: v["peak_gib"])
        got = f"{low['peak_gib']:.2f} GiB peak ({low['name']})"
        met = low["peak_gib"] < 24.0
    rec["target"] = {"target": TARGETS[family], "got": got, "met": met}


def markdown(result: dict[str, Any]) -> str:
    m, a = result["machine"], result["args"]
    lines = [
        f"# Diffusers families, {a['scale']} size, random weights: acceleration options in a "
        f"{a['budget']:.0f} s budget",
        "",
        f"Device: {m['gpu']} ({m['gpu_memory_gib']} GiB), CPU {m['cpu']} x {m['cpu_count']}, "
        f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, "
        f"Python {m['python']}. Command: `{a['command']}`. Whole run {result['total_s']:.0f} s.",
        "",
        "| family | size | setting | steps | s/step | speedup | s/chunk | peak GiB | diff vs "
        "stock (max) | GPU-s/video-s @default | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    targets = []
    for family, rec in result["families"].items():
        meta = rec.get("meta") or {}
        size = f"{meta.get('width', '?')}x{meta.get('height', '?')}x{meta.get('frames', '?')}"
        head = (f"{rec['status']}, {rec['seconds']:.0f} s of {rec['share_s']:.0f}")
        if meta:
            head += (f"; build {meta['build_s']:.1f} s, warm step "
                     f"{meta['probe']['s_per_step']:.3g} s, decode "
                     f"{meta['warmup']['decode_s']:.2f} s")  # fmt: skip
        if rec.get("plan"):
            head += f"; plan: {rec['plan']['steps']} steps"
        lines.append(f"| **{family}** | {size} | | | | | | | | | {head} |")
        for v in rec["variants"]:
            if v["status"] != "ok":
                lines.append(f"| {family} | | {v['name']} | | | | | | | | "
                             f"{v['status']}: {v.get('reason', '').replace('|', '/')} |")  # fmt: skip
                continue
            diff = v.get("diff")
            dtxt = "—" if diff is None else (
                f"{diff['max']} px (mean {diff['mean']:.2f})" if diff["kind"].startswith("pixels")
                else f"{diff['max']:.3g} latent (mean {diff['mean']:.3g})")  # fmt: skip
            acc = ", ".join(f"{k}={v2['kind'] if isinstance(v2, dict) else v2}"
                            for k, v2 in v["accel"].items()) if v["name"] == "best" else ""
            note = acc
            if v.get("compile_warmup_s"):
                note += f" compile warm-up {v['compile_warmup_s']:.0f} s"
            if v.get("offload") not in (None, "none"):
                note += f" offload {v['offload']}"
            sp = v.get("speedup")
            lines.append(
                f"| {family} | | {v['name']} | {v['steps']} | {v['s_per_step']:.4g} "
                f"| {'—' if sp is None else f'{sp:.2f}x'} | {v.get('chunk_s', 0):.3g} "
                f"| {v['peak_gib']:.3g} | {dtxt} | {v.get('gpu_s_per_video_s', 0):.3g} "
                f"| {note.strip()} |"
            )
        t = rec.get("target")
        if t:
            tiny = ", tiny scale: not the real target" if a["scale"] == "tiny" else ""
            targets.append(f"- {family}: {t['target']}: **{'met' if t['met'] else 'not met'}** "
                           f"({t['got']}{tiny})")  # fmt: skip
        elif family in TARGETS:
            targets.append(f"- {family}: {TARGETS[family]}: no result ({rec['status']})")
    lines += ["", "Targets (issue 11):", "", *targets, "", "Notes:", ""]
    lines += [f"- {n}" for n in NOTES]
    peak = next((v["peak_kind"] for r in result["families"].values() for v in r["variants"]
                 if "peak_kind" in v), "")  # fmt: skip
    if peak:
        lines.append(f"- Peak memory: {peak} during the chunk.")
    return "\n".join(lines) + "\n"


def machine(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    cuda = device.startswith("cuda")
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "gpu": props.name if props else f"none ({device})",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else 0.0,
        "cuda": torch.version.cuda, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=list(gf.DEFAULT_FAMILIES), choices=gf.FAMILIES,
                    help="default: %(default)s; wan_vace (Wan 2.1 VACE 1.3B) on request")
    ap.add_argument("--scale", choices=("full", "small", "tiny"), default="full",
                    help="tiny: the test pipelines, to check this script without a GPU")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:1... (cpu with --scale tiny)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                    help="seconds for the whole run, start-up included (default %(default)s)")
    ap.add_argument("--steps", type=int, default=0, help="fixed steps (default: sized to fit)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; build nothing")
    ap.add_argument("--params", action="store_true", help="meta-device build: parameter counts")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--log-dir", default="", help="per-family logs (default: a temp folder)")
    args = ap.parse_args(argv)

    if args.dry_run:
        return dry_run(args)
    if args.params:
        return count_params(args)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: no CUDA device (bench/gpu_backends.py renders on a GPU; --dry-run "
              "prints the plan, --scale tiny --device cpu checks the script)")  # fmt: skip
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="gpu_backends-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_backends_{args.device.split(':')[0]}_{args.scale}"
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    command = "python -m bench.gpu_backends " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if "/" not in a)
    result: dict[str, Any] = {
        "machine": machine(args.device),
        "args": {"scale": args.scale, "device": args.device, "budget": args.budget,
                 "steps": args.steps, "families": args.families, "command": command.strip()},
        "families": {}, "total_s": 0.0,
    }  # fmt: skip
    todo = list(args.families)
    while todo:
        family = todo[0]
        left = args.budget - (time.perf_counter() - t_start) - WRITE_RESERVE
        share = gf.split_budget(todo, max(left, 0.0), args.scale, args.device)[family]
        todo.pop(0)
        if share < gf.STARTUP_S + 5:
            rec: dict[str, Any] = {"variants": [], "status": "skipped: budget spent",
                                   "seconds": 0.0, "share_s": share}  # fmt: skip
        else:
            print(f"=== {family}: {share:.0f} s of {left:.0f} s left", flush=True)
            jsonl = log_dir / f"{family}.jsonl"
            status, secs = run_family(family, args, share, jsonl, log_dir / f"{family}.log")
            rec = load_records(jsonl)
            if status == "ok" and "done" not in rec:
                status = "incomplete"
            rec.update(status=status, seconds=secs, share_s=share)
            if not status.startswith("ok"):
                print(f"{family}: {status}; log {log_dir / f'{family}.log'}", flush=True)
        summarise(family, rec)
        result["families"][family] = rec
        result["total_s"] = time.perf_counter() - t_start
        text = markdown(result)
        md.write_text(text, encoding="utf-8")
        js.write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    print(text)
    print(f"wrote {md} and {js.name} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
