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

What a fit may change. A chunk's content key is fixed by the planner, before anyone knows
which GPU renders it, so the settings chosen here to fit a GPU are only those that leave
pixels as they are: where the weights live (model, group, sequential offload). VAE tiling and
a smaller SVD decode chunk change pixels; they are never added behind the key. When only they
would make a chunk fit, the refusal says so and the user puts them in the spec
(``vae_tiling: true``, ``accel.decode_chunk: N``), where they enter the content key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reelfarm.schemas.film import DiffusersModel

logger = logging.getLogger(__name__)

__all__ = ["ACCELERATOR_GIB", "FAMILY_MEMORY", "GPU_CLASSES", "FamilyMemory", "Fit", "check_plan_fits",
           "choose_fit", "estimate_gib", "fitted_model", "gpu_gib_of", "largest_fitting",
           "no_fit_message", "profile_from_pipeline", "shot_peaks"]  # fmt: skip

GIB = 2**30
GPU_CLASSES = (24, 48, 80, 141)  # GiB: L4/4090, L40S/A6000, A100/H100, H200
# Ray's accelerator_type -> total memory as torch reports it (GiB). A100 without its variant:
# the 40 GB card (the smaller, so never an over-estimate).
ACCELERATOR_GIB: dict[str, float] = {
    "T4": 14.6, "V100": 15.8, "A10G": 22.1, "L4": 22.0, "L40S": 44.4, "A100": 39.4,
    "A100-40G": 39.4, "A100-80G": 79.2, "H100": 79.2, "H20": 94.9, "H200": 139.8,
    "B200": 178.4, "RTX-PRO-6000": 94.9,
}
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
    """Settings chosen so a chunk fits a GPU, and the peak they give (GiB).

    ``vae_tiling`` and ``decode_chunk`` are the values the chunk renders with (the spec's own,
    unless ``pixel_options`` names ones added here); ``offload`` never changes pixels.
    """

    offload: str = "none"  # none, model, group, sequential
    vae_tiling: bool = False
    decode_chunk: int | None = None
    peak_gib: float = 0.0
    pixel_options: tuple[str, ...] = ()  # spec fields added that change pixels ("" when none)

    @property
    def changes_pixels(self) -> bool:
        """True when the fit adds an option that changes pixels (so it cannot be chosen for a
        chunk whose content key is already fixed: the spec must ask for it)."""
        return bool(self.pixel_options)

    def spec_hint(self) -> str:
        """The options as they would be written in the spec (``vae_tiling: true``...)."""
        parts = [{"vae_tiling": "`vae_tiling: true`",
                  "decode_chunk": f"`accel.decode_chunk: {self.decode_chunk}`"}[o]
                 for o in self.pixel_options]
        if self.offload != "none":
            parts.append(f"offload {self.offload}")
        return " with ".join(parts)


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
               gpu_gib: float, *, keep_pixels: bool = True) -> Fit | None:
    """The cheapest settings under which a chunk fits ``gpu_gib``, or None.

    The spec's own choices are kept. What is added is tried in this order: nothing, model
    offload, group offload, sequential offload. These leave pixels as they are, so a chunk
    renders the same frames on any GPU and its content key (fixed by the planner, before
    anyone knows the GPU) stays true. With ``keep_pixels=False`` VAE tiling and a smaller
    SVD decode chunk are tried too: they change pixels (tests/render/test_accel.py states by
    how much), so the farm never adds them; they are only suggested to the user, whose spec
    then carries them into the content key (``vae_tiling`` and ``accel.decode_chunk``).
    """
    budget = gpu_gib * USABLE
    offloads = ["none", "model", "group", "sequential"]
    start = offloads.index(_spec_offload(model))
    mem = FAMILY_MEMORY[model.family]
    own = Fit(vae_tiling=model.vae_tiling, decode_chunk=model.accel.decode_chunk)
    candidates: list[Fit] = [replace(own, offload=o) for o in offloads[start:]]
    if not keep_pixels:
        tiling = bool(mem.tile) and not model.vae_tiling
        chunks = [c for c in (8, 4, 2, 1) if model.family == "svd" and c < frames
                  and c < (model.accel.decode_chunk or frames)]
        for o in offloads[start:]:
            if tiling:
                candidates.append(replace(own, offload=o, vae_tiling=True, pixel_options=("vae_tiling",)))
            for c in chunks:
                candidates.append(replace(own, offload=o, decode_chunk=c, pixel_options=("decode_chunk",)))
    for fit in candidates:
        peak = estimate_gib(model, width, height, frames, offload=fit.offload,
                            vae_tiling=fit.vae_tiling, decode_chunk=fit.decode_chunk)
        if peak <= budget:
            return replace(fit, peak_gib=round(peak, 2))
    return None


def fitted_model(model: DiffusersModel, fit: Fit) -> DiffusersModel:
    """``model`` with the offload ``fit`` chose, as the worker loads it.

    Only where weights live changes (not in the content key, schemas/accel.py): ``model`` and
    ``sequential`` are the model's ``offload``; ``group`` is ``accel.group_offload: block``;
    sequential over a spec's own group offload is ``accel.group_offload: leaf``.

    Raises:
        ValueError: ``fit`` adds an option that changes pixels.
    """
    if fit.changes_pixels:
        raise ValueError(f"a fit that changes pixels ({', '.join(fit.pixel_options)}) belongs in the spec")
    if fit.offload == _spec_offload(model):
        return model
    if fit.offload == "group":
        accel = model.accel.model_copy(update={"group_offload": "block"})
        return model.model_copy(update={"accel": accel, "offload": "none"})
    if fit.offload == "sequential" and model.accel.group_offload != "none":
        return model.model_copy(update={"accel": model.accel.model_copy(update={"group_offload": "leaf"})})
    return model.model_copy(update={"offload": fit.offload})


def largest_fitting(model: DiffusersModel, width: int, height: int, frames: int,
                    gpus_gib: tuple[float, ...] = GPU_CLASSES) -> float | None:
    """The smallest GPU of ``gpus_gib`` a chunk fits (with settings chosen), or None."""
    for gib in sorted(gpus_gib):
        if choose_fit(model, width, height, frames, gib) is not None:
            return gib
    return None


def gpu_gib_of(accelerator_type: str | None) -> float | None:
    """Total memory (GiB, as torch reports it) of a Ray ``accelerator_type``, or None."""
    return ACCELERATOR_GIB.get(accelerator_type or "")


def no_fit_message(model: DiffusersModel, width: int, height: int, frames: int,
                   largest_gib: float, where: str = "") -> str | None:
    """Why a chunk of this size fits no GPU of ``largest_gib`` (None when it fits one): the
    model, the size, what it needs at least, the largest GPU, and a spec change that would
    make it fit (one that changes pixels, so it is the user's to make)."""
    if choose_fit(model, width, height, frames, largest_gib) is not None:
        return None
    need = estimate_gib(model, width, height, frames, offload="sequential")
    msg = (f"{where}model `{model.id}` ({model.family}) at {width}x{height}x{frames} needs at "
           f"least {need:.1f} GiB with every offload, more than the largest GPU ({largest_gib:g} GiB)")
    hint = choose_fit(model, width, height, frames, largest_gib, keep_pixels=False)
    if hint is not None:
        msg += (f"; it fits with {hint.spec_hint()} (changes pixels: set it in the spec, where it "
                f"enters the content key)")
    return msg


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
    """Refuse a plan with a chunk that fits none of ``gpus_gib`` with the settings the farm may
    choose (offload only: see :func:`choose_fit`).

    Raises:
        PlanError: naming the shot, the model, the chunk size and the largest GPU.
    """
    from reelfarm.errors import PlanError

    largest = max(gpus_gib)
    for shot in plan.shots:
        if shot.model.backend != "diffusers":
            continue
        frames = max(c.num_frames for c in shot.chunks)
        msg = no_fit_message(shot.model, shot.width, shot.height, frames, largest,
                             where=f"shot {shot.shot_id!r}: ")
        if msg:
            raise PlanError(msg)
