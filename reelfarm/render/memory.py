"""Peak GPU memory of a chunk, per family, and the settings that make a chunk fit a GPU.

A chunk's peak is the largest of three phases, each the weights resident then plus that
phase's activations:

- encode: text and image encoders (small activations, not modelled);
- denoise: ``DENOISE_K x tokens x hidden x CFG batch x bytes`` (tokens = latent positions
  after patching);
- decode: ``decode_k x width x height x frames decoded at once x VAE channels x bytes``.

Weights are the published parameter counts by dtype (fp8 storage halves the denoiser's
bfloat16). Which weights are resident depends on the offload: all of them (none), the
phase's component (model), the rest plus one group of the denoiser (group), almost none
(sequential).

Calibration. ``decode_k`` of LTX-Video 2B and SVD-XT is fitted to peaks measured on an H200
(random weights, bench/gpu_backends.py): LTX 768x512x121 bfloat16, 17.8 GiB; SVD-XT
1024x576x25 float16, 64.8 GiB (see /work/shared/notes/gpu-benchmark-machine.md); both peaks
are the VAE decode. Wan 2.1 and CogVideoX **are estimated, not measured** (their GPU runs did
not finish in the window), as is ``DENOISE_K`` for every family. Torch-free: the planner and
the CLI import it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reelfarm.schemas.film import DiffusersModel

logger = logging.getLogger(__name__)

__all__ = ["FAMILY_MEMORY", "GPU_CLASSES", "FamilyMemory", "Fit", "choose_fit", "estimate_gib",
           "largest_fitting", "profile_from_pipeline"]  # fmt: skip

GIB = 2**30
GPU_CLASSES = (24, 48, 80, 141)  # GiB: L4/4090, L40S/A6000, A100/H100, H200
USABLE = 0.92  # of a card's memory: CUDA context, allocator fragmentation
DENOISE_K = 16.0  # activation elements per token per hidden unit (estimated)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class FamilyMemory:
    """The sizes one family's memory model reads.

    Attributes:
        params: parameters per component (``transformer``/``unet``, ``text_encoder``,
            ``image_encoder``, ``vae``).
        fp32: components kept in float32 whatever the model's dtype (Wan's VAE and CLIP).
        vae_channels: the VAE decoder's channels at full resolution.
        decode_k: decode activation bytes per pixel-frame-channel-byte (fitted or estimated).
        decode_frames: frames the VAE decodes at once (0: all of the chunk).
        tile: the VAE's tile (width, height) when tiling is on; None: no tiling.
        spatial, temporal, patch: latent compression and the denoiser's spatial patch.
        hidden: the denoiser's width.
        cfg_batch: 2 when CFG batches both branches in one call, 1 when they run apart.
        source: how ``decode_k`` was found.
    """

    family: str
    params: dict[str, float]
    vae_channels: int
    decode_k: float
    hidden: int
    spatial: int
    temporal: int
    patch: int
    cfg_batch: int
    decode_frames: int = 0
    tile: tuple[int, int] | None = None
    fp32: tuple[str, ...] = ()
    source: str = "estimated"
    blocks: int = field(default=40)

    @property
    def denoiser(self) -> str:
        return "unet" if "unet" in self.params else "transformer"


def _fit_decode_k(peak_gib: float, params: float, elem: int, w: int, h: int, f: int, ch: int) -> float:
    return (peak_gib * GIB - params * elem) / (w * h * f * ch * elem)


_LTX = {"transformer": 1.923e9, "text_encoder": 4.762e9, "vae": 0.419e9}
_SVD = {"unet": 1.525e9, "image_encoder": 0.632e9, "vae": 0.098e9}
FAMILY_MEMORY: dict[str, FamilyMemory] = {
    "ltx": FamilyMemory(
        "ltx", _LTX, vae_channels=128, hidden=2048, spatial=32, temporal=8, patch=1,
        cfg_batch=2, tile=(512, 512), blocks=28,
        decode_k=_fit_decode_k(17.8, sum(_LTX.values()), 2, 768, 512, 121, 128),
        source="fitted: H200, 768x512x121 bfloat16, peak 17.8 GiB",
    ),
    "svd": FamilyMemory(
        "svd", _SVD, vae_channels=128, hidden=320, spatial=8, temporal=1, patch=1,
        cfg_batch=2, blocks=4,
        decode_k=_fit_decode_k(64.8, sum(_SVD.values()), 2, 1024, 576, 25, 128),
        source="fitted: H200, 1024x576x25 float16, peak 64.8 GiB",
    ),
    "wan": FamilyMemory(
        "wan", {"transformer": 16.395e9, "text_encoder": 5.681e9, "image_encoder": 0.631e9,
                "vae": 0.127e9},
        vae_channels=96, hidden=5120, spatial=8, temporal=4, patch=2, cfg_batch=1,
        decode_frames=4, tile=(256, 256), fp32=("vae", "image_encoder"), decode_k=4.0, blocks=40,
    ),
    "cogvideox": FamilyMemory(
        "cogvideox", {"transformer": 5.570e9, "text_encoder": 4.762e9, "vae": 0.216e9},
        vae_channels=128, hidden=3072, spatial=8, temporal=4, patch=2, cfg_batch=2,
        decode_frames=8, tile=(720, 480), decode_k=4.0, blocks=42,
    ),
}


# Estimate: Wan 2.1 VACE 14B is the Wan 14B transformer plus VACE's context blocks (about 5 %
# more weights, not measured); its references are encoded like frames, so the rest is Wan's.
FAMILY_MEMORY["wan_vace"] = replace(
    FAMILY_MEMORY["wan"], family="wan_vace",
    params={**FAMILY_MEMORY["wan"].params, "transformer": 16.395e9 * 1.05})


@dataclass(frozen=True)
class Fit:
    """Settings chosen so a chunk fits a GPU, and the peak they give (GiB)."""

    offload: str = "none"  # none, model, group, sequential
    vae_tiling: bool = False
    decode_chunk: int | None = None
    peak_gib: float = 0.0

    @property
    def changes_pixels(self) -> bool:
        return self.vae_tiling or self.decode_chunk is not None


def _weights(mem: FamilyMemory, dtype: str, fp8: bool) -> dict[str, float]:
    out = {}
    for name, n in mem.params.items():
        elem = 4 if name in mem.fp32 else _BYTES[dtype]
        if fp8 and name == mem.denoiser and elem > 1:
            elem = 1
        out[name] = n * elem
    return out


def _phases(mem: FamilyMemory, *, dtype: str, width: int, height: int, frames: int,
            fp8: bool = False, offload: str = "none", vae_tiling: bool = False,
            decode_chunk: int | None = None, blocks_per_group: int = 1) -> dict[str, float]:
    """Bytes at the peak of each phase."""
    elem = _BYTES[dtype]
    w = _weights(mem, dtype, fp8)
    den = mem.denoiser
    latent_frames = (frames - 1) // mem.temporal + 1
    tokens = latent_frames * (height // (mem.spatial * mem.patch)) * (width // (mem.spatial * mem.patch))
    denoise_act = DENOISE_K * tokens * mem.hidden * mem.cfg_batch * elem
    at_once = decode_chunk or mem.decode_frames or frames
    at_once = min(at_once, frames)
    area = width * height
    if vae_tiling and mem.tile:
        area = min(area, int(mem.tile[0] * mem.tile[1] * 1.25))  # tiles overlap
    vae_elem = 4 if "vae" in mem.fp32 else elem
    decode_act = mem.decode_k * area * at_once * mem.vae_channels * vae_elem
    encoders = sum(v for k, v in w.items() if k in ("text_encoder", "image_encoder"))
    if offload == "none":
        total = sum(w.values())
        resident = {"encode": total, "denoise": total, "decode": total}
    elif offload == "model":
        resident = {"encode": encoders, "denoise": w[den], "decode": w["vae"]}
    elif offload == "group":
        rest = sum(v for k, v in w.items() if k != den)
        group = w[den] * min(1.0, 2 * blocks_per_group / mem.blocks)  # one group on, one next
        resident = {"encode": rest + group, "denoise": rest + group, "decode": rest + group}
    else:  # sequential: one leaf module at a time
        resident = {"encode": 0.0, "denoise": 0.0, "decode": 0.0}
    return {"encode": resident["encode"], "denoise": resident["denoise"] + denoise_act,
            "decode": resident["decode"] + decode_act}


def estimate_gib(model: DiffusersModel, width: int, height: int, frames: int, *,
                 memory: FamilyMemory | None = None, **settings: Any) -> float:
    """Peak GPU memory (GiB) of one chunk of ``model`` at this size, with ``settings``
    (``offload``, ``vae_tiling``, ``decode_chunk``) over the spec's own."""
    mem = memory or FAMILY_MEMORY[model.family]
    offload = settings.get("offload", _spec_offload(model))
    return max(_phases(
        mem, dtype=model.dtype, width=width, height=height, frames=frames,
        fp8=model.accel.weights == "fp8", offload=offload,
        vae_tiling=settings.get("vae_tiling", model.vae_tiling),
        decode_chunk=settings.get("decode_chunk", model.accel.decode_chunk),
        blocks_per_group=model.accel.blocks_per_group,
    ).values()) / GIB  # fmt: skip


def _spec_offload(model: DiffusersModel) -> str:
    if model.accel.group_offload != "none":
        return "group"
    return model.offload


def choose_fit(model: DiffusersModel, width: int, height: int, frames: int,
               gpu_gib: float) -> Fit | None:
    """The cheapest settings under which a chunk fits ``gpu_gib``, or None.

    The spec's own choices are kept; what is added is tried in this order: nothing, model
    offload, group offload, sequential offload (these leave pixels as they are), then VAE
    tiling and a smaller SVD decode chunk (these change pixels within the tolerance stated
    in tests/render/test_accel.py; the chunk's meta records them).
    """
    budget = gpu_gib * USABLE
    offloads = ["none", "model", "group", "sequential"]
    start = offloads.index(_spec_offload(model))
    candidates: list[Fit] = [Fit(offload=o) for o in offloads[start:]]
    mem = FAMILY_MEMORY[model.family]
    tiling = [True] if mem.tile else []
    chunks = [c for c in (8, 4, 2, 1) if model.family == "svd" and c < frames]
    for o in offloads[start:]:
        for t in tiling or [False]:
            candidates.append(Fit(offload=o, vae_tiling=t or model.vae_tiling))
        for c in chunks:
            candidates.append(Fit(offload=o, decode_chunk=c))
    for fit in candidates:
        fit = replace(fit, vae_tiling=fit.vae_tiling or model.vae_tiling,
                      decode_chunk=fit.decode_chunk or model.accel.decode_chunk)
        peak = estimate_gib(model, width, height, frames, offload=fit.offload,
                            vae_tiling=fit.vae_tiling, decode_chunk=fit.decode_chunk)
        if peak <= budget:
            return replace(fit, peak_gib=round(peak, 2))
    return None


def largest_fitting(model: DiffusersModel, width: int, height: int, frames: int,
                    gpus_gib: tuple[float, ...] = GPU_CLASSES) -> float | None:
    """The smallest GPU of ``gpus_gib`` a chunk fits (with settings chosen), or None."""
    for gib in sorted(gpus_gib):
        if choose_fit(model, width, height, frames, gib) is not None:
            return gib
    return None


def profile_from_pipeline(pipe: Any, family: str) -> FamilyMemory:
    """The family's memory model with sizes read off a loaded pipeline (tiny or real),
    keeping the family's fitted constants: used to check the model on CPU."""
    base = FAMILY_MEMORY[family]
    params = {}
    for name in ("transformer", "unet", "text_encoder", "image_encoder", "vae"):
        part = getattr(pipe, name, None)
        if part is not None:
            params[name] = float(sum(p.numel() for p in part.parameters()))
    vae = pipe.vae.config
    channels = (vae.get("base_dim") if family in ("wan", "wan_vace")
                else (vae.get("decoder_block_out_channels") or vae.get("block_out_channels"))[0])
    den = getattr(pipe, "transformer", None) or pipe.unet
    cfg = den.config
    hidden = (cfg.get("num_attention_heads", 1) * cfg.get("attention_head_dim", 1)
              if family != "svd" else cfg["block_out_channels"][0])
    spatial = (getattr(pipe, "vae_scale_factor_spatial", None)
               or getattr(pipe, "vae_spatial_compression_ratio", None)
               or getattr(pipe, "vae_scale_factor", 8))
    temporal = (getattr(pipe, "vae_scale_factor_temporal", None)
                or getattr(pipe, "vae_temporal_compression_ratio", None) or 1)
    patch = cfg.get("patch_size", 1)
    patch = patch[-1] if isinstance(patch, (list, tuple)) else (patch or 1)
    return replace(base, params=params, vae_channels=int(channels), hidden=int(hidden),
                   spatial=int(spatial), temporal=int(temporal), patch=int(patch), fp32=(),
                   source=f"sizes from the loaded pipeline; {base.source}")


def shot_peaks(plan: Any) -> dict[str, float | None]:
    """Peak GiB of each shot's largest chunk as the spec asks (None: animatic, no GPU)."""
    out: dict[str, float | None] = {}
    for shot in plan.shots:
        if shot.model.backend != "diffusers":
            out[shot.shot_id] = None
            continue
        frames = max(c.num_frames for c in shot.chunks)
        out[shot.shot_id] = round(estimate_gib(shot.model, shot.width, shot.height, frames), 2)
    return out


def check_plan_fits(plan: Any, gpus_gib: tuple[float, ...]) -> None:
    """Refuse a plan with a chunk that fits none of ``gpus_gib``, whatever settings are chosen.

    Raises:
        PlanError: naming the shot, the model, the chunk size and the largest GPU.
    """
    from reelfarm.errors import PlanError

    largest = max(gpus_gib)
    for shot in plan.shots:
        if shot.model.backend != "diffusers":
            continue
        frames = max(c.num_frames for c in shot.chunks)
        if choose_fit(shot.model, shot.width, shot.height, frames, largest) is None:
            need = estimate_gib(shot.model, shot.width, shot.height, frames, offload="sequential",
                                vae_tiling=True, decode_chunk=1 if shot.model.family == "svd" else None)
            raise PlanError(
                f"shot {shot.shot_id!r}: model `{shot.model.id}` ({shot.model.family}) at "
                f"{shot.width}x{shot.height}x{frames} needs at least {need:.1f} GiB, more than "
                f"the largest GPU ({largest:g} GiB)"
            )
