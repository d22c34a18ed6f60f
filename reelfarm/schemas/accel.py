"""Acceleration options of a diffusers model: the ``accel:`` block of a model spec.

Which options change pixels (and so enter content keys, see ``flows/plan.py``):

- ``attention``: another kernel is another algorithm (``sage`` quantises to int8; flash and
  cuDNN sum in another order), so frames differ. **Changes pixels.**
- ``cache`` and every threshold in it: steps reuse earlier outputs. **Changes pixels.**
- ``weights: fp8``: weights are stored in float8 and upcast per layer. **Changes pixels.**
- ``decode_chunk``: SVD's temporal decoder sees that many frames at once. **Changes pixels.**
- ``compile``: the same operations, fused; frames match stock to rounding. Not in the key.
- ``group_offload`` / ``blocks_per_group`` and ``vae_slicing``: where weights live, and a
  batch of one split in ones. Frames are identical. Not in the key.

(``vae_tiling`` and ``offload`` sit on the model itself: tiling changes pixels, offload does not.
The farm's memory fit, ``render/memory.py``, only ever adds offload: never tiling or a decode chunk.)

What the schema refuses: a cache the family's denoiser cannot take (SVD's UNet takes no cache
hook; FasterCache needs a denoiser that batches the unconditional pass, CogVideoX here), an
attention kernel on SVD or CogVideoX (their attention processors do not go through diffusers'
attention dispatcher, so the option would do nothing),
``compile`` on SVD (its UNet declares no repeated blocks), ``decode_chunk`` outside SVD.
Whether a kernel is *installed* is checked where it runs, when the worker loads the model
(``render/accel.py``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ATTENTION_BACKENDS", "CACHE_FAMILIES", "Accel", "Cache"]

# Spec name -> diffusers' AttentionBackendName value.
ATTENTION_BACKENDS: dict[str, str] = {
    "native": "native",
    "cudnn": "_native_cudnn",
    "efficient": "_native_efficient",
    "flash": "flash",
    "flash3": "_flash_3",
    "sage": "sage",
    "flex": "flex",
}
# Cache kind -> the families whose denoiser takes it (diffusers 0.42, checked on the tiny
# pipelines: Wan and LTX call the transformer once per CFG branch or pack them in ways
# FasterCache's batch split does not expect).
CACHE_FAMILIES: dict[str, tuple[str, ...]] = {
    "first_block": ("wan", "ltx", "cogvideox"),
    "mag": ("wan", "ltx", "cogvideox"),
    "taylorseer": ("wan", "ltx", "cogvideox"),
    "faster": ("cogvideox",),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cache(_Strict):
    """Step caching through diffusers' hooks.

    ``first_block`` and ``mag`` read ``threshold`` (defaults 0.05 and 0.06). ``mag`` also reads
    ``max_skip_steps``, ``retention`` and ``mag_ratios``; without ratios it runs a fixed schedule
    (all ratios 1: every step after the retained ones is skipped, up to ``max_skip_steps`` in a
    row). ``taylorseer`` reads ``interval``, ``warmup_steps`` and ``max_order``; ``faster`` reads
    ``interval`` (its spatial attention skip range).
    """

    kind: Literal["first_block", "mag", "taylorseer", "faster"]
    threshold: float | None = Field(None, gt=0.0, le=1.0)
    max_skip_steps: int = Field(3, ge=1, le=50)
    retention: float = Field(0.2, ge=0.0, le=1.0)
    mag_ratios: tuple[float, ...] | None = Field(None, min_length=2, max_length=1000)
    interval: int = Field(2, ge=1, le=100)
    warmup_steps: int = Field(1, ge=0, le=1000)
    max_order: int = Field(1, ge=1, le=4)

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Cache:
        if self.threshold is not None and self.kind not in ("first_block", "mag"):
            raise ValueError(f"`threshold` is read by the first_block and mag caches only, not "
                             f"{self.kind!r}; remove it, got {self.threshold}")
        if self.mag_ratios is not None and self.kind != "mag":
            raise ValueError(f"`mag_ratios` is read by the mag cache only, not {self.kind!r}")
        return self

    @property
    def effective_threshold(self) -> float:
        return self.threshold if self.threshold is not None else {"mag": 0.06}.get(self.kind, 0.05)


class Accel(_Strict):
    """How a worker speeds up or slims down one model (see the module docstring)."""

    PIXEL_FIELDS: ClassVar[tuple[str, ...]] = ("attention", "cache", "weights", "decode_chunk")

    attention: Literal["native", "cudnn", "efficient", "flash", "flash3", "sage", "flex"] = "native"
    compile: bool = Field(False, description="torch.compile the repeated transformer blocks")
    cache: Cache | None = None
    weights: Literal["native", "fp8"] = Field(
        "native", description="fp8: store the denoiser's weights in float8 (layerwise casting)"
    )
    vae_slicing: bool = False
    decode_chunk: int | None = Field(None, ge=1, le=256, description="SVD: frames per VAE decode")
    group_offload: Literal["none", "block", "leaf"] = "none"
    blocks_per_group: int = Field(1, ge=1, le=64)

    def problems(self, family: str) -> list[str]:
        """What this block asks of ``family`` that the family cannot do (empty when fine)."""
        out = []
        if self.cache is not None and family not in CACHE_FAMILIES[self.cache.kind]:
            takes = ", ".join(CACHE_FAMILIES[self.cache.kind])
            out.append(f"`accel.cache.kind` {self.cache.kind!r} cannot run on the {family} family "
                       f"(it runs on: {takes}), got {self.cache.kind!r}")
        if family in ("svd", "cogvideox") and self.attention != "native":
            out.append(f"`accel.attention` must be 'native' for {family} (its attention does not "
                       f"go through diffusers' attention dispatcher), got {self.attention!r}")
        if family == "svd" and self.compile:
            out.append("`accel.compile` is not available for svd (its UNet declares no repeated "
                       "blocks), got true")
        if family != "svd" and self.decode_chunk is not None:
            out.append(f"`accel.decode_chunk` is read by svd only, not {family!r}; remove it, "
                       f"got {self.decode_chunk}")
        return out

    def pixel_doc(self) -> dict:
        """The options that change pixels and differ from their defaults (for content keys)."""
        default = Accel()
        return {k: getattr(self, k).model_dump(mode="json") if k == "cache" and self.cache
                else getattr(self, k)
                for k in self.PIXEL_FIELDS if getattr(self, k) != getattr(default, k)}
