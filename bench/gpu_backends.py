"""Diffusers backends at their real architecture sizes, random weights, on one CUDA GPU.

Builds each family's pipeline in memory from configs that match the published models
(nothing is downloaded) and renders chained chunks through ``DiffusersBackend``:

* ``wan``: Wan2.1-I2V-14B-480P (transformer 40 x 5120, UMT5-XXL, CLIP ViT-H/14, Wan VAE),
  832 x 480, 81 frames, bfloat16 (VAE and CLIP in float32, as its model card does).
* ``ltx``: LTX-Video 2B 0.9.0 (transformer 28 x 2048, T5-v1.1-XXL, 128-channel VAE),
  768 x 512, 121 frames, bfloat16.
* ``cogvideox``: CogVideoX-5B-I2V (transformer 42 x 3072, learned positional embeddings,
  T5-v1.1-XXL), 720 x 480, 49 frames, bfloat16.
* ``svd``: Stable Video Diffusion XT (UNet 320-1280, CLIP ViT-H/14, temporal VAE),
  1024 x 576, 25 frames, float16.

Every component is cast whole to its dtype (from_pretrained would keep T5's ``wo`` layers in
float32). ``--scale small`` keeps every width but cuts the layers (transformer 4, text encoder 2,
CLIP 4, UNet 1 per block) and the picture, to fit a 24 GB card. Full scale needs an 80 GB
card for Wan. For each family, ``--repeats`` shots of ``--chunks`` chained chunks are
rendered stock (``precompute=False``) and precomputed (memo cleared per shot), then the
chunks once more with the memo warm, at ``--steps`` sampling steps (CFG on). Reports median
seconds per chunk, its prepare / sample / decode stages, seconds per sampling step, an
estimate at the family's default step count, and peak GPU memory. Random weights make the
pictures noise: only time and memory mean anything.

``--dry-run`` builds every component on the meta device (no memory, no GPU) and prints the
parameter counts, to check the configs (Wan 22.8 B in all, its transformer 16.4 B; LTX 1.9 B;
CogVideoX 5.6 B; SVD's UNet 1.5 B). ``--scale tiny --device cpu`` runs the test pipelines
through the same code, to check the script itself. Without CUDA the script prints
"skipped: no CUDA device" and exits 0. Writes Markdown and JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests/render/tiny_pipelines.py has the in-code tokenizers
    sys.path.insert(0, str(ROOT))

FAMILIES = ("wan", "ltx", "cogvideox", "svd")
# family -> scale -> (width, height, frames)
GEOMETRY = {
    "wan": {"full": (832, 480, 81), "small": (480, 272, 33)},
    "ltx": {"full": (768, 512, 121), "small": (512, 352, 41)},
    "cogvideox": {"full": (720, 480, 49), "small": (352, 240, 25)},
    "svd": {"full": (1024, 576, 25), "small": (512, 288, 14)},
}
for _family, _frames in (("wan", 9), ("ltx", 17), ("cogvideox", 9), ("svd", 14)):
    GEOMETRY[_family]["tiny"] = (32, 32, _frames)  # tests/render/tiny_pipelines.py
DTYPE = {"wan": "bfloat16", "ltx": "bfloat16", "cogvideox": "bfloat16", "svd": "float16"}
# CLIP ViT-H/14 (open_clip laion2B), as used by Wan 2.1 I2V and SVD.
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                  num_hidden_layers=32, patch_size=14, image_size=224, projection_dim=1024,
                  hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip
# T5-v1.1-XXL encoder (LTX-Video, CogVideoX) and UMT5-XXL (Wan).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6,
              tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)  # fmt: skip
UMT5_XXL = {**T5_XXL, "vocab_size": 256384}


# --- building ----------------------------------------------------------------------------


class Builder:
    """Builds components on ``device``: seeded, in float32, then cast to their dtype."""

    def __init__(self, device: str, small: bool) -> None:
        self.device = device
        self.small = small

    def layers(self, full: int, small: int) -> int:
        return small if self.small else full

    def __call__(self, make: Callable[[], Any], dtype: Any) -> Any:
        import torch

        torch.manual_seed(0)
        # Built directly in its dtype on the device: Wan's transformer alone would take
        # 66 GB in float32 before a cast.
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(self.device):
                module = make()
        finally:
            torch.set_default_dtype(default)
        return module.to(dtype).eval()


def _text_encoder(b: Builder, umt5: bool, dtype: Any) -> Any:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg = dict(UMT5_XXL if umt5 else T5_XXL, num_layers=b.layers(24, 2))
    if umt5:
        return b(lambda: UMT5EncoderModel(UMT5Config(**cfg)), dtype)
    return b(lambda: T5EncoderModel(T5Config(**cfg)), dtype)


def _clip(b: Builder, cls: Any, dtype: Any) -> Any:
    from transformers import CLIPVisionConfig

    cfg = dict(CLIP_VIT_H, num_hidden_layers=b.layers(32, 4))
    return b(lambda: cls(CLIPVisionConfig(**cfg)), dtype)


def build_wan(b: Builder, dtype: Any) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPVisionModel

    from tests.render.tiny_pipelines import clip_processor, t5_tokenizer

    # Wan-AI/Wan2.1-I2V-14B-480P-Diffusers transformer/config.json; the rest are defaults.
    transformer = b(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
        num_layers=b.layers(40, 4), cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
    ), dtype)  # fmt: skip
    return WanImageToVideoPipeline(
        tokenizer=t5_tokenizer(512), text_encoder=_text_encoder(b, True, dtype),
        vae=b(lambda: AutoencoderKLWan(), torch.float32),  # Wan 2.1 VAE = the defaults
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=3.0),
        image_processor=clip_processor(224),
        image_encoder=_clip(b, CLIPVisionModel, torch.float32), transformer=transformer,
    )  # fmt: skip


def build_ltx(b: Builder, dtype: Any) -> Any:
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXImageToVideoPipeline,
        LTXVideoTransformer3DModel,
    )

    from tests.render.tiny_pipelines import t5_tokenizer

    # Lightricks/LTX-Video (0.9.0): transformer and VAE configs are diffusers' defaults.
    return LTXImageToVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05,
            shift=1.0, shift_terminal=0.1, use_dynamic_shifting=True,
        ),
        vae=b(lambda: AutoencoderKLLTXVideo(), dtype),
        text_encoder=_text_encoder(b, False, dtype), tokenizer=t5_tokenizer(128),
        transformer=b(lambda: LTXVideoTransformer3DModel(num_layers=b.layers(28, 4)), dtype),
    )  # fmt: skip


def build_cogvideox(b: Builder, dtype: Any) -> Any:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )

    from tests.render.tiny_pipelines import t5_tokenizer

    width, height, frames = GEOMETRY["cogvideox"]["small" if b.small else "full"]
    # THUDM/CogVideoX-5b-I2V transformer/config.json (learned positional embeddings fix the
    # size at sample_width x sample_height x 8 and are trained at sample_frames).
    transformer = b(lambda: CogVideoXTransformer3DModel(
        num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16,
        time_embed_dim=512, text_embed_dim=4096, num_layers=b.layers(42, 4),
        sample_width=width // 8, sample_height=height // 8, sample_frames=frames, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
    ), dtype)  # fmt: skip
    return CogVideoXImageToVideoPipeline(
        tokenizer=t5_tokenizer(226), text_encoder=_text_encoder(b, False, dtype),
        vae=b(lambda: AutoencoderKLCogVideoX(scaling_factor=0.7), dtype),  # 5B: 0.7
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
            set_alpha_to_one=True, timestep_spacing="trailing", snr_shift_scale=1.0,
        ),
    )  # fmt: skip


def build_svd(b: Builder, dtype: Any) -> Any:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPVisionModelWithProjection

    from tests.render.tiny_pipelines import clip_processor

    # stabilityai/stable-video-diffusion-img2vid-xt: the UNet is diffusers' default config.
    return StableVideoDiffusionPipeline(
        vae=b(lambda: AutoencoderKLTemporalDecoder(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, sample_size=768,
        ), dtype),
        image_encoder=_clip(b, CLIPVisionModelWithProjection, dtype),
        unet=b(lambda: UNetSpatioTemporalConditionModel(
            layers_per_block=b.layers(2, 1), num_frames=25), dtype),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            interpolation_type="linear", num_train_timesteps=1000,
            prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
            timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
        ),
        feature_extractor=clip_processor(224),
    )  # fmt: skip


BUILDERS = {"wan": build_wan, "ltx": build_ltx, "cogvideox": build_cogvideox, "svd": build_svd}


def parameter_counts(pipe: Any) -> dict[str, float]:
    """Billions of parameters per model component."""
    import torch

    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    return {name: sum(p.numel() for p in part.parameters()) / 1e9 for name, part in modules.items()}


# --- rendering ---------------------------------------------------------------------------


def reference(size: int = 512) -> Any:
    """A synthetic character reference: a shaded disc with eyes, RGBA."""
    import numpy as np

    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5
    inside = xs**2 + ys**2 < 0.16
    img = np.zeros((size, size, 4), np.uint8)
    img[..., 0] = (200 + 50 * xs).clip(0, 255).astype(np.uint8)
    img[..., 1] = (120 + 100 * ys).clip(0, 255).astype(np.uint8)
    img[..., 2] = 40
    img[..., 3] = np.where(inside, 255, 0)
    for ex in (0.38, 0.62):
        img[int(0.4 * size) : int(0.45 * size), int(ex * size) - 8 : int(ex * size) + 8, :3] = 20
    return img


def _allocated_gib() -> float:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


@contextlib.contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Peak GPU memory allocated inside the block (0 without CUDA)."""
    import torch

    out: dict[str, float] = {"peak_gib": 0.0}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30


def bench_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from bench.backends_diffusers import render_chain
    from reelfarm.render.diffusers import DiffusersBackend
    from reelfarm.schemas.families import FAMILIES as RULES
    from reelfarm.schemas.film import DiffusersModel
    from tests.render.tiny_pipelines import tiny_shot

    width, height, frames = GEOMETRY[family][args.scale]
    dtype = DTYPE[family] if args.scale != "tiny" else "float32"
    t0 = time.perf_counter()
    if args.scale == "tiny":  # the test pipelines: checks this script on any machine
        from tests.render.tiny_pipelines import build_pipeline

        pipe = build_pipeline(family)
    else:
        pipe = BUILDERS[family](Builder(args.device, args.scale == "small"), getattr(torch, dtype))
    build_s = time.perf_counter() - t0
    params = parameter_counts(pipe)
    model = DiffusersModel(
        backend="diffusers", family=family, id=f"random-weights/{family}-{args.scale}",
        steps=args.steps, dtype=dtype, chunk_frames=frames, overlap=1,
        guidance_scale=3.0 if family == "svd" else 5.0,
        max_sequence_length=128 if family == "ltx" else 16 if args.scale == "tiny" else 226,
    )  # fmt: skip
    backend = DiffusersBackend.from_pipeline(pipe, model, device=args.device)
    del pipe
    weights_gib = _allocated_gib()
    try:
        t0 = time.perf_counter()
        ids = {"flame": backend.encode_identity("flame", reference(), "f" * 64)}
        identity_s = time.perf_counter() - t0
        shot = tiny_shot(model, chunks=args.chunks, width=width, height=height)
        samples: dict[str, list[dict[str, float]]] = {"stock": [], "precomputed": [], "repeat": []}
        with np.errstate(invalid="ignore"):  # random weights can overflow to NaN pixels
            backend.precompute = True  # warm-up: kernels, allocator
            render_chain(backend, shot.model_copy(update={"chunks": shot.chunks[:1]}), ids)
            for _ in range(args.repeats):
                for mode in samples:
                    backend.precompute = mode != "stock"
                    if mode != "repeat":
                        backend.clear_cache()
                    with peak_memory() as mem:
                        runs = render_chain(backend, shot, ids)
                    for wall, _, out in runs:
                        stages = out.meta["stage_s"]
                        samples[mode].append({"wall": wall, **stages, "peak_gib": mem["peak_gib"]})
    finally:
        backend.close()
    row: dict[str, Any] = {
        "family": family, "scale": args.scale, "width": width, "height": height,
        "frames": frames, "dtype": dtype, "steps": args.steps, "build_s": build_s,
        "params_b": params, "weights_gib": weights_gib, "identity_s": identity_s,
    }  # fmt: skip
    default_steps = RULES[family].default_steps
    for mode, runs in samples.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        med["peak_gib"] = max(r["peak_gib"] for r in runs)
        row[mode] = med
    # "sample" includes whatever conditioning the memo did not hold; with the memo warm
    # ("repeat") it is the denoising loop alone, so that gives the time per step.
    per_step = row["repeat"]["sample"] / args.steps
    for mode in samples:
        med = row[mode]
        encoders = max(0.0, med["sample"] - row["repeat"]["sample"])
        med["s_per_step"] = per_step
        med[f"est_chunk_s_at_{default_steps}_steps"] = (
            med["prepare"] + encoders + med["decode"] + per_step * default_steps
        )
    row["default_steps"] = default_steps
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def dry_run(families: list[str], scale: str) -> int:
    """Build every family on the meta device and print parameter counts (checks configs)."""
    import torch

    for family in families:
        pipe = BUILDERS[family](Builder("meta", scale == "small"), getattr(torch, DTYPE[family]))
        counts = parameter_counts(pipe)
        parts = ", ".join(f"{k} {v:.3f} B" for k, v in sorted(counts.items()))
        print(f"{family} ({scale}): {sum(counts.values()):.2f} B parameters: {parts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument(
        "--scale",
        choices=("full", "small", "tiny"),
        default="full",
        help="tiny: the test pipelines, to check this script without a GPU",
    )
    ap.add_argument("--device", default="cuda", help="cuda, cuda:1... (cpu with --scale tiny)")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps per chunk")
    ap.add_argument("--chunks", type=int, default=2, help="chained chunks per shot")
    ap.add_argument("--repeats", type=int, default=1, help="shots per mode (medians)")
    ap.add_argument("--dry-run", action="store_true", help="meta-device build, no GPU needed")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_backends.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.dry_run:
        return dry_run(args.families, args.scale)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: no CUDA device (bench/gpu_backends.py renders on a GPU; "
              "--dry-run checks the configs without one)")  # fmt: skip
        return 0
    import diffusers
    import transformers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    rows = []
    for family in args.families:
        print(f"{family} ({args.scale}) ...", flush=True)
        rows.append(bench_family(family, args))
        print(json.dumps(rows[-1], indent=1), flush=True)
    cuda = args.device.startswith("cuda")
    props = torch.cuda.get_device_properties(args.device) if cuda else None
    machine = {
        "gpu": props.name if props else f"none ({args.device})",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else 0.0,
        "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }  # fmt: skip
    lines = [
        f"# Diffusers backends at {args.scale} size, random weights: seconds per chunk",
        "",
        f"GPU: {machine['gpu']} ({machine['gpu_memory_gib']} GiB), CUDA {machine['cuda']}, "
        f"torch {machine['torch']}, diffusers {machine['diffusers']}, transformers "
        f"{machine['transformers']}, {machine['platform']}.",
        "",
        f"{args.steps} steps (CFG on), {args.chunks} chained chunks x {args.repeats} shots per "
        "mode; medians. `prepare`: checks, keyframe, identity; `sample`: encoders the memo "
        "did not hold plus the denoising loop; `s/step` from the warm-memo `repeat` runs; "
        "`est.` extrapolates to the family's default steps.",
        "",
        "| family | size | params (B) | mode | s/chunk | prepare | sample | decode | s/step "
        "| est. s/chunk (steps) | peak GiB |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for mode in ("stock", "precomputed", "repeat"):
            m = r[mode]
            est = m[f"est_chunk_s_at_{r['default_steps']}_steps"]
            lines.append(
                f"| {r['family']} | {r['width']}x{r['height']}x{r['frames']} "
                f"| {sum(r['params_b'].values()):.2f} | {mode} | {m['wall']:.2f} "
                f"| {m['prepare']:.2f} | {m['sample']:.2f} | {m['decode']:.2f} "
                f"| {m['s_per_step']:.2f} | {est:.1f} ({r['default_steps']}) "
                f"| {m['peak_gib']:.1f} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
