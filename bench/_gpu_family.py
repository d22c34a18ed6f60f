"""One family of bench/gpu_backends.py, in its own process: build, warm up, plan, measure.

``python -m bench._gpu_family --family ltx --scale tiny --device cpu --budget 40 --out F.jsonl``
appends one JSON line to ``F.jsonl`` per finished part (``meta`` after the build and the
warm-up, ``plan``, one ``variant`` per acceleration setting, ``done``), so a parent that
kills this process at its time limit still has everything finished before the kill.

The same functions run at every scale: ``tiny`` builds tests/render/tiny_pipelines.py's
pipelines (checked on CPU), ``full`` the published architectures with random weights
(``build_*`` below; only their configs were checked here, on the meta device).
Every variant renders one chunk through the project's real ``DiffusersBackend.from_pipeline``
(so ``reelfarm.render.accel.apply_accel`` applies the option) on a freshly built denoiser
(seeded: the same weights each time; fp8 casts and hooks change a denoiser in place), with
the other components and the memoised shot conditioning shared across variants.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests/render/tiny_pipelines.py has the in-code tokenizers
    sys.path.insert(0, str(ROOT))

FAMILIES = ("ltx", "svd", "wan_vace", "cogvideox", "wan")  # cheapest first: unused time rolls over
# The default run: the four families of the 10-minute window (issue 11). Wan VACE 1.3B is
# measured in a window of its own (``--families wan_vace --budget 180``): a fifth family
# in the same 540 s would leave Wan 14B too few steps for its caches to act.
DEFAULT_FAMILIES = ("ltx", "svd", "cogvideox", "wan")
GEOMETRY = {  # family -> scale -> (width, height, frames)
    "wan": {"full": (832, 480, 81), "small": (480, 272, 33), "tiny": (32, 32, 9)},
    "wan_vace": {"full": (832, 480, 81), "small": (480, 272, 33), "tiny": (32, 32, 9)},
    "ltx": {"full": (768, 512, 121), "small": (512, 352, 41), "tiny": (32, 32, 17)},
    "cogvideox": {"full": (720, 480, 49), "small": (352, 240, 25), "tiny": (32, 32, 9)},
    "svd": {"full": (1024, 576, 25), "small": (512, 288, 14), "tiny": (32, 32, 14)},
}
DTYPE = {"wan": "bfloat16", "wan_vace": "bfloat16", "ltx": "bfloat16", "cogvideox": "bfloat16",
         "svd": "float16"}
NATIVE_FPS = {"wan": 16, "wan_vace": 16, "ltx": 24, "cogvideox": 8, "svd": 7}  # the models' own
DEFAULT_STEPS = {"wan": 40, "wan_vace": 30, "ltx": 40, "cogvideox": 50, "svd": 25}  # families.py
# Same step count for stock and every variant; caches need room to skip (issue 11).
MIN_STEPS = {"wan": 8, "wan_vace": 8, "ltx": 8, "cogvideox": 8, "svd": 4}
# Expected costs (seconds) for splitting a budget and for --dry-run, before anything is
# measured: build, cold prepare (encoders), one sampling step (CFG on), one decode.
# full/cuda: LTX and SVD measured on the H200 (notes/gpu-benchmark-machine.md); Wan and
# CogVideoX from schemas/families.py's H100 figures (5 min / 40 steps, 90 s / 50 steps) plus
# guesses for their VAEs; Wan VACE 1.3B a guess: a tenth of Wan 14B's step plus its 15
# VACE blocks, Wan's VAE (it also encodes the conditioning video and the references).
# tiny/cpu: measured on the 2-core VM.
PRIOR = {
    "full": {"wan": (30, 25, 7.5, 25), "wan_vace": (12, 20, 1.3, 25), "ltx": (15, 3, 0.14, 1.5),
             "cogvideox": (15, 6, 1.8, 15), "svd": (8, 2, 3.0, 3.0)},
    "small": {"wan": (8, 4, 0.5, 4), "wan_vace": (4, 3, 0.1, 4), "ltx": (6, 1, 0.05, 0.5),
              "cogvideox": (6, 2, 0.2, 3), "svd": (4, 1, 0.5, 1)},
    "tiny": {"wan": (2, 0.5, 0.08, 0.4), "wan_vace": (2, 0.5, 0.08, 0.4),
             "ltx": (1.5, 0.3, 0.05, 0.2), "cogvideox": (2, 0.3, 0.07, 0.2),
             "svd": (2, 0.5, 2.0, 0.5)},
}  # fmt: skip
REBUILD = {"full": {"wan": 8.0, "wan_vace": 2.0, "ltx": 1.5, "cogvideox": 3.0, "svd": 1.5},
           "small": {"wan": 2.0, "wan_vace": 1.0, "ltx": 1.0, "cogvideox": 1.0, "svd": 1.0},
           "tiny": {"wan": 0.1, "wan_vace": 0.1, "ltx": 0.1, "cogvideox": 0.1,
                    "svd": 0.3}}  # a denoiser alone
CORE_OPTIONS = 3  # options a family's share is sized for; more run if time is left
STARTUP_S = 12.0  # a fresh interpreter importing torch, diffusers, transformers, reelfarm
ATTENTION = ("cudnn", "efficient", "flash", "flash3", "sage", "flex")
FIXED_SCHEDULE = "fixed schedule"  # how threshold caches run here (random weights)


# --- what to measure ---------------------------------------------------------------------


def options(family: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, accel block) of each option that applies to ``family``, one at a time, in the
    order they are measured (the most likely to matter first; a tight budget drops the tail)."""
    from reelfarm.schemas.accel import CACHE_FAMILIES

    out: list[tuple[str, dict[str, Any]]] = []
    if family == "svd":  # its target is memory: the decode chunk first
        out.append(("decode_chunk", {"decode_chunk": None}))  # filled in per scale
    for kind in ("mag", "taylorseer", "first_block", "faster"):
        if family in CACHE_FAMILIES[kind]:
            out.append((f"cache={kind}", {"cache": {"kind": kind}}))
    if family in ("wan", "wan_vace", "ltx"):  # the others' attention skips the dispatcher
        out += [(f"attention={k}", {"attention": k}) for k in ATTENTION]
    out.append(("weights=fp8", {"weights": "fp8"}))
    if family != "svd":
        out.append(("compile", {"compile": True}))
    out.append(("vae_slicing", {"vae_slicing": True}))
    out.append(("group_offload=block", {"group_offload": "block"}))
    return out


def decode_chunk_frames(scale: str) -> int:
    return 4 if scale == "tiny" else 8


def step_factor(name: str) -> float:
    """Expected cost of a step relative to stock, for planning (conservative)."""
    if name.startswith("cache="):
        return 0.6  # the fixed schedules compute about half the steps
    return 1.5 if name.startswith("group_offload") else 1.0


def plan_steps(
    family: str, budget_s: float, *, step_s: float, fixed_s: float, per_variant_s: float,
    variants: list[str], min_steps: int, max_steps: int,
) -> tuple[int, list[str], list[str]]:
    """Steps for stock and every variant, and which variants fit ``budget_s`` (the rest are
    dropped from the tail, the combination kept last). Returns (steps, kept, dropped)."""
    kept = list(variants)
    dropped: list[str] = []
    while True:
        combo = 1.0 if len(kept) >= 2 else 0.0  # the combination of two or more
        weight = 1.0 + sum(step_factor(v) for v in kept) + combo  # stock + each + combination
        room = budget_s - fixed_s - per_variant_s * (len(kept) + 1 + combo)
        steps = int(room / (weight * max(step_s, 1e-6))) if room > 0 else 0
        if steps >= min_steps or not kept:
            break
        dropped.insert(0, kept.pop())
    return max(min_steps, min(steps, max_steps)), kept, dropped


def family_costs(family: str, scale: str) -> tuple[float, float]:
    """(fixed, variable) seconds a family should cost with ``CORE_OPTIONS`` options at its
    minimum steps: start-up, build, encoders, one decode, two warm steps; then the runs."""
    build, prepare, step, decode = PRIOR[scale][family]
    runs = 2 + min(CORE_OPTIONS, len(options(family)))
    fixed = STARTUP_S + build + prepare + decode + 2 * step + REBUILD[scale][family]
    return fixed, runs * (MIN_STEPS[family] * step + REBUILD[scale][family])


def split_budget(families: list[str], budget_s: float, scale: str, device: str) -> dict[str, float]:
    """Each family's share of ``budget_s``: its fixed cost, then the rest in proportion to
    its runs' cost (all in proportion when the fixed costs alone do not fit)."""
    costs = {f: family_costs(f, scale) for f in families}
    fixed = sum(c[0] for c in costs.values())
    if fixed >= budget_s:
        total = sum(sum(c) for c in costs.values())
        return {f: budget_s * sum(costs[f]) / total for f in families}
    variable = sum(c[1] for c in costs.values())
    return {f: costs[f][0] + (budget_s - fixed) * costs[f][1] / variable for f in families}


# --- building ----------------------------------------------------------------------------

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


class Builder:
    """Builds components on ``device``: seeded, directly in their dtype."""

    def __init__(self, device: str, small: bool) -> None:
        self.device = device
        self.small = small

    def layers(self, full: int, small: int) -> int:
        return small if self.small else full

    def __call__(self, make: Callable[[], Any], dtype: Any) -> Any:
        import torch

        torch.manual_seed(0)
        # Built in its dtype on the device: Wan's transformer would take 66 GB in float32.
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


def build_wan(b: Builder, dtype: Any, denoiser_only: bool = False) -> Any:
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
    if denoiser_only:
        return transformer
    return WanImageToVideoPipeline(
        tokenizer=t5_tokenizer(512), text_encoder=_text_encoder(b, True, dtype),
        vae=b(lambda: AutoencoderKLWan(), torch.float32),  # Wan 2.1 VAE = the defaults
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=3.0),
        image_processor=clip_processor(224),
        image_encoder=_clip(b, CLIPVisionModel, torch.float32), transformer=transformer,
    )  # fmt: skip


def build_wan_vace(b: Builder, dtype: Any, denoiser_only: bool = False) -> Any:
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )

    from tests.render.tiny_pipelines import t5_tokenizer

    # Wan-AI/Wan2.1-VACE-1.3B-diffusers transformer/config.json (diffusers' conversion
    # script): 30 Wan blocks, a VACE block beside every second one, no image encoder.
    transformer = b(lambda: WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
        num_layers=b.layers(30, 4), cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024,
        vace_layers=list(range(0, b.layers(30, 4), 2)), vace_in_channels=96,
    ), dtype)  # fmt: skip
    if denoiser_only:
        return transformer
    return WanVACEPipeline(
        tokenizer=t5_tokenizer(512), text_encoder=_text_encoder(b, True, dtype),
        vae=b(lambda: AutoencoderKLWan(), torch.float32),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                          use_flow_sigmas=True, flow_shift=3.0),
        transformer=transformer,
    )  # fmt: skip


def build_ltx(b: Builder, dtype: Any, denoiser_only: bool = False) -> Any:
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXImageToVideoPipeline,
        LTXVideoTransformer3DModel,
    )

    from tests.render.tiny_pipelines import t5_tokenizer

    # Lightricks/LTX-Video (0.9.0): transformer and VAE configs are diffusers' defaults.
    transformer = b(lambda: LTXVideoTransformer3DModel(num_layers=b.layers(28, 4)), dtype)
    if denoiser_only:
        return transformer
    return LTXImageToVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05,
            shift=1.0, shift_terminal=0.1, use_dynamic_shifting=True,
        ),
        vae=b(lambda: AutoencoderKLLTXVideo(), dtype),
        text_encoder=_text_encoder(b, False, dtype), tokenizer=t5_tokenizer(128),
        transformer=transformer,
    )  # fmt: skip


def build_cogvideox(b: Builder, dtype: Any, denoiser_only: bool = False) -> Any:
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
    if denoiser_only:
        return transformer
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


def build_svd(b: Builder, dtype: Any, denoiser_only: bool = False) -> Any:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPVisionModelWithProjection

    from tests.render.tiny_pipelines import clip_processor

    # stabilityai/stable-video-diffusion-img2vid-xt: the UNet is diffusers' default config.
    unet = b(lambda: UNetSpatioTemporalConditionModel(
        layers_per_block=b.layers(2, 1), num_frames=25), dtype)
    if denoiser_only:
        return unet
    return StableVideoDiffusionPipeline(
        vae=b(lambda: AutoencoderKLTemporalDecoder(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, sample_size=768,
        ), dtype),
        image_encoder=_clip(b, CLIPVisionModelWithProjection, dtype), unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            interpolation_type="linear", num_train_timesteps=1000,
            prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
            timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
        ),
        feature_extractor=clip_processor(224),
    )  # fmt: skip


BUILDERS = {"wan": build_wan, "wan_vace": build_wan_vace, "ltx": build_ltx,
            "cogvideox": build_cogvideox, "svd": build_svd}


def parameter_counts(pipe: Any) -> dict[str, float]:
    """Billions of parameters per model component."""
    import torch

    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    return {name: sum(p.numel() for p in part.parameters()) / 1e9 for name, part in modules.items()}


class Family:
    """A family's pipeline parts, built once, and a seeded rebuild of its denoiser."""

    def __init__(self, family: str, scale: str, device: str) -> None:
        self.family, self.scale, self.device = family, scale, device
        self.key = "unet" if family == "svd" else "transformer"
        t0 = time.perf_counter()
        pipe = self._build(False)
        self.build_s = time.perf_counter() - t0
        self.cls = type(pipe)
        self.params_b = parameter_counts(pipe)
        self.components = {k: v for k, v in pipe.components.items() if k != self.key}
        self._first: Any = getattr(pipe, self.key)  # used by the first run, then rebuilt
        del pipe

    def _build(self, denoiser_only: bool) -> Any:
        import torch

        if self.scale == "tiny":
            from tests.render.tiny_pipelines import build_pipeline

            pipe = build_pipeline(self.family)
            return getattr(pipe, self.key) if denoiser_only else pipe
        b = Builder(self.device, self.scale == "small")
        return BUILDERS[self.family](b, getattr(torch, DTYPE[self.family]), denoiser_only)

    def pipeline(self) -> tuple[Any, float]:
        """A pipeline with a fresh denoiser (the same weights each time); seconds to build it."""
        t0 = time.perf_counter()
        den, self._first = self._first, None
        if den is None:
            den = self._build(True)
        return self.cls(**self.components, **{self.key: den}), time.perf_counter() - t0


def model_spec(family: str, scale: str, steps: int, accel: dict[str, Any]) -> Any:
    from reelfarm.schemas.film import DiffusersModel

    frames = GEOMETRY[family][scale][2]
    if scale == "tiny":
        from tests.render.tiny_pipelines import tiny_model

        return tiny_model(family, f"random-weights/{family}-tiny", steps=steps, accel=accel)
    fields: dict[str, Any] = dict(
        backend="diffusers", family=family, id=f"random-weights/{family}-{scale}", steps=steps,
        dtype=DTYPE[family], chunk_frames=frames, overlap=1, accel=accel,
        guidance_scale=3.0 if family == "svd" else 5.0, negative_prompt="blurry",
    )  # fmt: skip
    if family == "ltx":
        fields["max_sequence_length"] = 128
    return DiffusersModel(**fields)


# --- measuring ---------------------------------------------------------------------------


class StepTimer:
    """Per-step times of a pipeline call: a mark when the denoiser is first called and after
    every ``scheduler.step``. CUDA events (enable_timing) on a GPU, perf_counter on CPU."""

    def __init__(self, pipe: Any, device: str) -> None:
        import torch

        from reelfarm.render.accel import denoiser

        self.cuda = device.startswith("cuda")
        self.torch = torch
        self.marks: list[Any] = []
        self.start: Any = None
        self.scheduler = pipe.scheduler
        original = self.scheduler.step

        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.marks.append(self._mark())
            return out

        self.scheduler.step = step
        self.handle = denoiser(pipe).register_forward_pre_hook(self._pre)

    def _mark(self) -> Any:
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, module: Any, args: Any) -> None:
        if self.start is None:
            self.start = self._mark()

    def reset(self) -> None:
        self.marks, self.start = [], None

    def times(self) -> list[float]:
        """Seconds per step of the last call."""
        if self.start is None:
            return []
        if self.cuda:
            self.torch.cuda.synchronize()
        out, prev = [], self.start
        for m in self.marks:
            out.append(prev.elapsed_time(m) / 1e3 if self.cuda else m - prev)
            prev = m
        return out

    def remove(self) -> None:
        self.handle.remove()
        vars(self.scheduler).pop("step", None)


class _RssPeak:
    """Peak resident memory of this process during a block, sampled every 5 ms (CPU runs)."""

    def __init__(self) -> None:
        self.peak = self.base = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> _RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, Any]]:
    """GPU: torch.cuda.max_memory_allocated (weights included); CPU: peak RSS above the start."""
    import torch

    out: dict[str, Any] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            yield out
        finally:
            torch.cuda.synchronize()
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["peak_kind"] = "cuda max_memory_allocated"
        return
    with _RssPeak() as rss:
        try:
            yield out
        finally:
            pass
    out["peak_gib"] = (rss.peak - rss.base) / 2**30
    out["peak_kind"] = "RSS delta"


def fixed_schedule_first_block() -> None:
    """First-block cache on a fixed schedule: compute the first two calls of each branch,
    then every other one (its threshold would decide from random weights' dynamics)."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    def should_compute(self: Any, residual: Any) -> bool:
        state = self.state_manager.get_state()
        n = getattr(state, "_bench_calls", 0)
        state._bench_calls = n + 1
        return state.tail_block_residuals is None or n < 2 or n % 2 == 0

    FBCHeadBlockHook._should_compute_remaining_blocks = should_compute


class Bench:
    """One family's runs: the shared parts, the stock reference, the variants."""

    def __init__(self, family: str, scale: str, device: str, out: Path, budget_s: float) -> None:
        self.family, self.scale, self.device, self.out = family, scale, device, out
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.width, self.height, self.frames = GEOMETRY[family][scale]
        self.memo: Any = None
        self.ids: Any = None
        self.stock: dict[str, Any] | None = None

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def write(self, record: dict[str, Any]) -> None:
        with self.out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        print(f"[{self.family}] {json.dumps(record, default=float)[:300]}", flush=True)

    def run(self, accel: dict[str, Any], steps: int, *, decode: bool) -> dict[str, Any]:
        """Render one chunk with ``accel`` at ``steps`` steps; the measurements."""
        import numpy as np
        import torch

        from reelfarm.render.diffusers import DiffusersBackend
        from tests.render.tiny_pipelines import reference_image, tiny_shot

        pipe, rebuild_s = self.fam.pipeline()
        model = model_spec(self.family, self.scale, steps, accel)
        t0 = time.perf_counter()
        be = DiffusersBackend.from_pipeline(pipe, model, device=self.device)
        apply_s = time.perf_counter() - t0
        del pipe
        runner = be._live()
        if self.memo is not None:  # prompt embeddings and image encodings: shared
            runner.memo = self.memo
        self.memo = runner.memo
        if self.ids is None:
            self.ids = {"flame": be.encode_identity("flame", reference_image(48), "f" * 64)}
        if not decode:  # sampling only: compare latents, save the VAE's time
            expected = (self.frames, self.height, self.width, 3)
            be._decode = lambda *a, **k: np.zeros(expected, np.uint8)
        timer = StepTimer(be.pipe, self.device)
        shot = tiny_shot(model, chunks=1, width=self.width, height=self.height)
        try:
            warm_s = None
            if accel.get("compile"):  # compile on a 1-step chunk first, untimed
                w0 = time.perf_counter()
                be(shot.model_copy(update={"model": model_spec(
                    self.family, self.scale, 1, accel)}), shot.chunks[0], self.ids)
                warm_s = time.perf_counter() - w0
            timer.reset()
            w0 = time.perf_counter()
            with np.errstate(invalid="ignore"), peak_memory(self.device) as mem:
                out = be(shot, shot.chunks[0], self.ids)
            wall = time.perf_counter() - w0
            step_times = timer.times()
        finally:
            timer.remove()
            vae = be.pipe.vae
            be.close()
            for off in ("disable_slicing", "disable_tiling"):
                if hasattr(vae, off):
                    getattr(vae, off)()
            gc.collect()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        stages = out.meta["stage_s"]
        row = {
            "steps": steps, "wall_s": wall, "rebuild_s": rebuild_s, "apply_s": apply_s,
            "compile_warmup_s": warm_s, "step_s": step_times,
            "s_per_step": sum(step_times) / max(len(step_times), 1),
            "median_step_s": float(np.median(step_times)) if step_times else None,
            "prepare_s": stages["prepare"], "sample_s": stages["sample"],
            "decode_s": stages["decode"] if decode else None, "decoded": decode,
            "offload": out.meta["offload"], "applied": out.meta["accel"],
            "fit": out.meta["fit"], **mem,
        }  # fmt: skip
        frames = out.frames.astype(np.int16)
        latents = out.latents.float().numpy()
        if self.stock is None:
            self.stock = {"frames": frames if decode else None, "latents": latents}
        else:
            ref = self.stock
            if decode and ref["frames"] is not None:
                d = np.abs(frames - ref["frames"])
                row["diff"] = {"kind": "pixels (0-255)", "max": int(d.max()), "mean": float(d.mean())}
            else:
                d = np.abs(latents - ref["latents"])
                row["diff"] = {"kind": "latents", "max": float(np.nanmax(d)),
                               "mean": float(np.nanmean(d))}  # fmt: skip
        return row


def measure(args: argparse.Namespace) -> int:
    import torch
    from diffusers.utils import logging as diffusers_logging

    from reelfarm.errors import BackendError
    from reelfarm.schemas.accel import Accel

    diffusers_logging.set_verbosity_error()
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    fixed_schedule_first_block()
    out = Path(args.out)
    b = Bench(args.family, args.scale, args.device, out, args.budget)
    family, scale = args.family, args.scale
    b.fam = Family(family, scale, args.device)  # type: ignore[attr-defined]
    # 1. Warm-up: stock, 2 steps, decoded: step time, decode time, kernels and allocator.
    warm = b.run({}, 1, decode=True)
    # One more step on a rebuilt denoiser, warm: the step time that sizes the plan.
    probe = b.run({}, 1, decode=False)
    b.stock = None
    step_s = probe["s_per_step"] or PRIOR[scale][family][2]
    b.write({"kind": "meta", "family": family, "scale": scale, "device": args.device,
             "width": b.width, "height": b.height, "frames": b.frames,
             "dtype": "float32" if scale == "tiny" else DTYPE[family],
             "build_s": b.fam.build_s, "params_b": b.fam.params_b,  # type: ignore[attr-defined]
             "warmup": warm, "probe": probe, "since_start_s": time.perf_counter() - b.t0})  # fmt: skip
    # 2. Plan: steps from the warm-up step, decode only where it is cheap or is the point.
    chunk_frames = decode_chunk_frames(scale)
    variants = []
    for name, accel in options(family):
        if name == "decode_chunk":
            accel = {"decode_chunk": chunk_frames}
        variants.append((name, accel))
    decode_s = warm["decode_s"] or 0.0
    decode_all = decode_s * (len(variants) + 2) < 0.15 * max(b.left(), 1.0)
    per_variant = probe["wall_s"] - step_s + probe["rebuild_s"] + probe["apply_s"]
    per_variant += decode_s if decode_all else 0.0
    runnable = [n for n, a in variants if not _refused(family, a, args.device)]
    steps, kept, dropped = plan_steps(
        family, b.left() - decode_s, step_s=step_s, fixed_s=0.05 * b.left(),
        per_variant_s=per_variant, variants=runnable, min_steps=MIN_STEPS[family],
        max_steps=DEFAULT_STEPS[family],
    )  # fmt: skip
    if args.steps:
        steps, kept, dropped = args.steps, runnable, []
    b.write({"kind": "plan", "steps": steps, "decode_all": decode_all, "step_s_warmup": step_s,
             "budget_s": args.budget, "left_s": b.left(), "kept": kept, "dropped": dropped})
    # 3. Stock, then each option, then the best combination.
    stock = b.run({}, steps, decode=decode_all)
    if not decode_all:
        stock["decode_s"] = decode_s  # the warm-up's: the VAE is too dear to run again
    b.write({"kind": "variant", "name": "stock", "accel": {}, "status": "ok", **stock})
    results: dict[str, dict[str, Any]] = {}
    for name, accel in variants:
        record: dict[str, Any] = {"kind": "variant", "name": name, "accel": accel}
        why = _refused(family, accel, args.device)
        if why:
            b.write({**record, "status": "skipped", "reason": why})
            continue
        if name in dropped:
            b.write({**record, "status": "skipped", "reason": "over budget (plan)"})
            continue
        need = steps * step_s * step_factor(name) + per_variant
        if need > b.left():
            b.write({**record, "status": "skipped",
                     "reason": f"over budget (needs ~{need:.0f} s, {b.left():.0f} s left)"})
            continue
        decode = decode_all or name in ("vae_slicing", "decode_chunk")
        try:
            row = b.run(accel, steps, decode=decode)
        except (BackendError, RuntimeError, ValueError, ImportError) as exc:
            b.write({**record, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        results[name] = {**row, "accel": accel}
        b.write({**record, "status": "ok", **row})
    combo = best_combination(family, stock, results)
    record = {"kind": "variant", "name": "best", "accel": combo}
    if not combo or Accel(**combo).problems(family):
        b.write({**record, "status": "skipped", "reason": "no option beat stock"})
    elif len(combo) < 2:
        b.write({**record, "status": "same", "reason": "one option: see its row"})
    elif steps * step_s + per_variant > b.left():
        b.write({**record, "status": "skipped", "reason": "over budget"})
    else:
        try:
            row = b.run(combo, steps, decode=decode_all or "decode_chunk" in combo)
            b.write({**record, "status": "ok", **row})
        except (BackendError, RuntimeError, ValueError, ImportError) as exc:
            b.write({**record, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]})
    b.write({"kind": "done", "since_start_s": time.perf_counter() - b.t0})
    return 0


def _refused(family: str, accel: dict[str, Any], device: str) -> str | None:
    """Why ``accel`` cannot run here, decided before building anything (else None)."""
    from reelfarm.errors import BackendError
    from reelfarm.render.accel import check_attention

    cuda = device.startswith("cuda")
    if accel.get("compile") and not cuda:
        return "compile: not measured on CPU (inductor's C++ build outlasts the tiny budget)"
    if accel.get("group_offload") and not cuda:
        return "group offload: CPU to CPU, nothing to measure"
    if "attention" in accel:
        try:
            check_attention(model_spec(family, "tiny", 2, accel), device)
        except BackendError as exc:
            return str(exc).split(": ", 1)[-1]
    return None


def best_combination(family: str, stock: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fastest measured option of each kind, where it beat stock (SVD: also the decode
    chunk, which is about memory)."""
    base = stock["s_per_step"]
    combo: dict[str, Any] = {}

    def best(prefix: str) -> str | None:
        names = [n for n in results if n.startswith(prefix)]
        names = [n for n in names if results[n]["s_per_step"] < 0.98 * base]
        return min(names, key=lambda n: results[n]["s_per_step"]) if names else None

    cache = best("cache=")
    if cache:
        combo["cache"] = {"kind": cache.split("=", 1)[1]}
    attention = best("attention=")
    if attention:
        combo["attention"] = attention.split("=", 1)[1]
    if best("weights=fp8"):
        combo["weights"] = "fp8"
    if best("compile"):
        combo["compile"] = True
    if family == "svd" and "decode_chunk" in results:  # the memory target, not speed
        combo["decode_chunk"] = results["decode_chunk"]["accel"]["decode_chunk"]
    return combo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one family of bench/gpu_backends.py")
    ap.add_argument("--family", required=True, choices=FAMILIES)
    ap.add_argument("--scale", choices=("full", "small", "tiny"), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, required=True, help="seconds for this family")
    ap.add_argument("--steps", type=int, default=0, help="fixed steps (default: from budget)")
    ap.add_argument("--deadline", type=float, default=0.0, help="epoch seconds: stop planning past it")
    ap.add_argument("--out", required=True, help="JSON lines, appended")
    args = ap.parse_args(argv)
    if args.deadline:  # the imports above already spent some of the budget
        args.budget = min(args.budget, args.deadline - time.time())
    faulthandler.dump_traceback_later(max(15.0, args.budget / 4), repeat=True)
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())

