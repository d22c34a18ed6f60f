"""Apply a model's ``accel:`` block (schemas/accel.py) to a loaded diffusers pipeline.

Called once when a worker loads the model, before any chunk: an option the installed stack
cannot do (a kernel that is not installed, a kernel that needs CUDA on a CPU worker, a hook
the loaded denoiser cannot take) raises :class:`~reelfarm.errors.BackendError` naming the
option, its value and the model. Nothing here changes mid-render.

Order matters: fp8 storage first (it casts the weights in place), then the attention
kernel and the cache hooks, then placement (group offload or a plain move), then compile,
which must see the final hooks and devices.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from reelfarm.errors import BackendError
from reelfarm.schemas.accel import ATTENTION_BACKENDS

if TYPE_CHECKING:
    from reelfarm.schemas.accel import Accel, Cache
    from reelfarm.schemas.film import DiffusersModel

logger = logging.getLogger(__name__)

__all__ = ["CUDA_ONLY_ATTENTION", "apply_accel", "cache_config", "check_attention", "denoiser"]

# Kernels that only exist on CUDA devices (flex and native run anywhere torch runs).
CUDA_ONLY_ATTENTION = frozenset({"cudnn", "efficient", "flash", "flash3", "sage"})
# Regex (re.fullmatch) of each family's transformer blocks: TaylorSeer's default patterns
# ("^blocks.*attn") match no module name of these models in diffusers 0.42.
_BLOCKS = {"wan": r"blocks\.\d+", "ltx": r"transformer_blocks\.\d+",
           "cogvideox": r"transformer_blocks\.\d+"}  # fmt: skip


def _name(model: DiffusersModel) -> str:
    rev = f"@{model.revision}" if model.revision else ""
    return f"model `{model.id}{rev}` (family `{model.family}`)"


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoiser: its transformer, or SVD's UNet."""
    return getattr(pipe, "transformer", None) or pipe.unet


def check_attention(model: DiffusersModel, device: str) -> None:
    """Refuse an attention kernel that this worker cannot run (not installed, or no CUDA)."""
    choice = model.accel.attention
    if choice == "native":
        return
    if choice in CUDA_ONLY_ATTENTION and not device.startswith("cuda"):
        raise BackendError(f"{_name(model)}: `accel.attention` {choice!r} needs a CUDA device, "
                           f"this worker renders on {device!r}")
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    try:
        _check_attention_backend_requirements(AttentionBackendName(ATTENTION_BACKENDS[choice]))
    except (RuntimeError, ValueError) as exc:
        raise BackendError(f"{_name(model)}: `accel.attention` {choice!r} is not installed "
                           f"here: {exc}") from None


def cache_config(cache: Cache, family: str, steps: int, timestep: Any = None) -> Any:
    """The diffusers config object of a ``cache`` block, for ``steps`` sampling steps."""
    import torch
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        TaylorSeerCacheConfig,
    )

    if cache.kind == "first_block":
        return FirstBlockCacheConfig(threshold=cache.effective_threshold)
    if cache.kind == "mag":
        # No ratios: a fixed schedule (ratio 1 everywhere, so only retention and
        # max_skip_steps decide which steps run). Real ratios come from calibrating a model.
        ratios = list(cache.mag_ratios) if cache.mag_ratios else [1.0] * max(steps, 2)
        return MagCacheConfig(threshold=cache.effective_threshold,
                              max_skip_steps=cache.max_skip_steps,
                              retention_ratio=cache.retention, num_inference_steps=steps,
                              mag_ratios=ratios)  # fmt: skip
    if cache.kind == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=cache.interval,
                                     disable_cache_before_step=cache.warmup_steps,
                                     max_order=cache.max_order,
                                     taylor_factors_dtype=torch.float32,
                                     cache_identifiers=[_BLOCKS[family]])  # fmt: skip
    return FasterCacheConfig(spatial_attention_block_skip_range=cache.interval,
                             current_timestep_callback=timestep,
                             is_guidance_distilled=False)  # fmt: skip


def _check_cache(model: DiffusersModel, den: Any) -> None:
    cache = model.accel.cache
    if cache is None:
        return
    if not hasattr(den, "enable_cache"):
        raise BackendError(f"{_name(model)}: `accel.cache.kind` {cache.kind!r}: the "
                           f"{type(den).__name__} takes no cache hook")
    if cache.kind == "first_block":
        pattern = re.compile(_BLOCKS[model.family])
        blocks = [n for n, _ in den.named_modules() if pattern.fullmatch(n)]
        if len(blocks) < 2:
            # The hook runs the first block and caches the rest: it needs a rest.
            raise BackendError(f"{_name(model)}: `accel.cache.kind` 'first_block' needs at "
                               f"least 2 transformer blocks, this model has {len(blocks)}")


def enable_cache(pipe: Any, model: DiffusersModel, steps: int) -> None:
    """(Re)install the cache hook for ``steps`` steps (MagCache's schedule depends on it)."""
    cache = model.accel.cache
    den = denoiser(pipe)
    if cache is None:
        return
    if getattr(den, "_reelfarm_cache_steps", None) is not None:
        den.disable_cache()
    den.enable_cache(cache_config(cache, model.family, steps, lambda: pipe.current_timestep))
    den._reelfarm_cache_steps = steps


def apply_accel(pipe: Any, model: DiffusersModel, device: str, *, steps: int) -> dict[str, Any]:
    """Apply ``model.accel`` to ``pipe`` (already loaded, not yet placed). Returns what it did.

    The caller places the pipeline afterwards unless ``"group_offload"`` is in the result
    (then the denoiser is placed here and the rest is moved to ``device``).

    Raises:
        BackendError: an option this worker or this model cannot run.
    """
    import torch

    accel: Accel = model.accel
    den = denoiser(pipe)
    done: dict[str, Any] = {}
    # 1. Check everything before changing anything.
    check_attention(model, device)
    _check_cache(model, den)
    if accel.compile and not getattr(den, "_repeated_blocks", None):
        raise BackendError(f"{_name(model)}: `accel.compile` true: {type(den).__name__} "
                           "declares no repeated blocks")
    if accel.group_offload != "none" and model.offload != "none":
        raise BackendError(f"{_name(model)}: `accel.group_offload` and `offload` both set")
    # 2. fp8 storage: weights cast now, upcast per layer at compute.
    if accel.weights == "fp8":
        den.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=den.dtype)
        done["weights"] = "fp8"
    # 3. Kernels and hooks.
    if accel.attention != "native":
        den.set_attention_backend(ATTENTION_BACKENDS[accel.attention])
        done["attention"] = accel.attention
    if accel.cache is not None:
        enable_cache(pipe, model, steps)
        done["cache"] = accel.cache.kind
    if accel.vae_slicing and hasattr(pipe.vae, "enable_slicing"):
        pipe.vae.enable_slicing()
        done["vae_slicing"] = True
    # 4. Placement of the denoiser by groups (the rest moves whole).
    if accel.group_offload != "none":
        place_grouped(pipe, model, device)
        done["group_offload"] = accel.group_offload
    return done


def place_grouped(pipe: Any, model: DiffusersModel, device: str) -> None:
    """Group-offload the denoiser to the CPU and move every other component to ``device``."""
    import torch

    den = denoiser(pipe)
    level = {"block": "block_level", "leaf": "leaf_level"}[model.accel.group_offload]
    kwargs: dict[str, Any] = {"offload_type": level}
    if level == "block_level":
        kwargs["num_blocks_per_group"] = model.accel.blocks_per_group
    den.enable_group_offload(onload_device=torch.device(device),
                             offload_device=torch.device("cpu"),
                             use_stream=device.startswith("cuda"), **kwargs)  # fmt: skip
    for part in pipe.components.values():
        if part is den or not isinstance(part, torch.nn.Module):
            continue
        part.to(device)
    logger.debug("%s: denoiser group-offloaded (%s)", _name(model), level)


def compile_blocks(pipe: Any, model: DiffusersModel) -> bool:
    """Regional torch.compile of the denoiser's repeated blocks (after placement)."""
    if not model.accel.compile:
        return False
    denoiser(pipe).compile_repeated_blocks(fullgraph=False, dynamic=False)
    return True
