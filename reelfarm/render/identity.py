"""Identity bundles: a character's conditioning, computed once per run and shared.

A bundle is a dict of CPU tensors plus string metadata, stored as safetensors (never
pickle) under its key (:func:`identity_key`, the one owner of that key), put once into
Ray's object store and passed by reference. Every bundle carries the reference's staging
cut-out (:func:`reference_rgba`), whatever backend made it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from reelfarm.errors import BackendError

__all__ = [
    "IDENTITY_KEY_LEN",
    "REFERENCE_MAX_SIDE",
    "IdentityBundle",
    "check_reference",
    "feathered_ellipse",
    "identity_doc",
    "identity_key",
    "reference_rgba",
]

# References are resized to fit this many pixels before anything encodes them.
REFERENCE_MAX_SIDE = 512
IDENTITY_KEY_LEN = 32  # hex digits: the bundle's key and its file name identities/<key>.safetensors


def identity_doc(model: Any) -> dict[str, Any]:
    """What encodes a reference for ``model`` (an AnimaticModel or DiffusersModel).

    Every bundle holds the reference cut-out, so the cut-out's drawing version and size
    are part of every key; a diffusers bundle also depends on the model that encodes it.
    """
    from reelfarm.schemas.families import ANIMATIC_VERSION

    doc: dict[str, Any] = {"cutout": ANIMATIC_VERSION, "max_side": REFERENCE_MAX_SIDE}
    if model.backend != "animatic":
        doc.update({k: getattr(model, k) for k in ("family", "id", "revision", "dtype")})
    if getattr(model, "family", None) == "wan_vace":
        doc["composite"] = "over white"  # how a reference with transparency is flattened for VACE
    return doc


def identity_key(model: Any, reference_sha256: str) -> str:
    """The key of a character's identity for ``model``: a hash of the reference's bytes
    and of what encodes them. Backends name their bundles with it; the farm caches and
    shares bundles under it."""
    doc = {"ref": reference_sha256, "backend": model.backend, "model": identity_doc(model)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:IDENTITY_KEY_LEN]


# --- the reference cut-out ---------------------------------------------------------------
def check_reference(reference: Any, what: str) -> np.ndarray:
    ref = np.asarray(reference)
    if ref.dtype != np.uint8 or ref.ndim != 3 or ref.shape[2] not in (3, 4) or 0 in ref.shape:
        raise BackendError(
            f"{what} must be an H x W x 3|4 uint8 image, got shape {tuple(ref.shape)} "
            f"dtype {ref.dtype}"
        )
    return ref


def feathered_ellipse(height: int, width: int) -> np.ndarray:
    """An alpha mask (0..1) of the inscribed ellipse, feathered over its outer 15 %."""
    ys = (np.arange(height, dtype=np.float64) + 0.5) / height * 2.0 - 1.0
    xs = (np.arange(width, dtype=np.float64) + 0.5) / width * 2.0 - 1.0
    r = np.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2)
    t = np.clip((1.0 - r) / 0.15, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def reference_rgba(reference: np.ndarray) -> np.ndarray:
    """Prepare a reference for staging: RGBA uint8 that fits within 512 px.

    A reference without an alpha channel gets alpha 255; a fully opaque one (a photo, say)
    then gets a soft elliptical cut-out so that it reads as a figure over the backdrop.
    Every backend stores this as its bundles' ``reference_rgba`` tensor.

    Args:
        reference: ``H x W x 3|4`` uint8.

    Returns:
        ``h x w x 4`` uint8, ``max(h, w) <= 512``.
    """
    ref = check_reference(reference, "`reference`")
    if ref.shape[2] == 3:
        ref = np.concatenate([ref, np.full(ref.shape[:2] + (1,), 255, np.uint8)], axis=2)
    image = Image.fromarray(np.ascontiguousarray(ref), "RGBA")
    if max(image.size) > REFERENCE_MAX_SIDE:
        scale = REFERENCE_MAX_SIDE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        # Resize premultiplied so transparent pixels do not bleed their colour into edges.
        image = image.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    rgba = np.array(image, dtype=np.uint8)
    if rgba[..., 3].min() == 255:
        mask = feathered_ellipse(*rgba.shape[:2])
        rgba[..., 3] = np.round(mask * 255.0).astype(np.uint8)
    return rgba


@dataclass
class IdentityBundle:
    """One character's encoded identity.

    Attributes:
        character: the character's name in the film.
        key: :func:`identity_key`; the file is ``identities/<key>.safetensors``.
        tensors: named CPU tensors (``torch.Tensor``), e.g. image embeddings or the RGBA cut-out.
        meta: string metadata stored in the safetensors header.
    """

    character: str
    key: str
    tensors: dict[str, Any]
    meta: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        meta = {"character": self.character, "key": self.key, **self.meta}
        return save({k: v.contiguous() for k, v in self.tensors.items()}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> IdentityBundle:
        from safetensors.torch import load

        tensors = load(data)
        # The header (8-byte length, then JSON) holds the metadata that load() drops.
        size = int.from_bytes(data[:8], "little")
        meta = dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})
        character = meta.pop("character")
        key = meta.pop("key")
        return cls(character=character, key=key, tensors=tensors, meta=meta)
