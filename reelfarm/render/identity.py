"""Identity bundles: a character's conditioning, computed once per run and shared.

A bundle is a dict of CPU tensors plus string metadata, stored as safetensors (never
pickle) under its content hash, put once into Ray's object store and passed by reference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REFERENCE_MAX_SIDE", "IdentityBundle", "identity_key", "model_identity_key"]

# References are resized to fit this many pixels before anything encodes them.
REFERENCE_MAX_SIDE = 512


def identity_key(*, character_sha256: str, backend: str, model: dict[str, Any]) -> str:
    """Content hash of an identity: the reference bytes and what encodes them."""
    doc = {"ref": character_sha256, "backend": backend, "model": model}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def model_identity_key(model: Any, reference_sha256: str) -> str:
    """The identity key of a character's reference for ``model`` (an AnimaticModel or
    DiffusersModel): the one function the backends and the farm's cache both use.

    Every bundle holds the reference cut-out, so the cut-out's drawing version and size
    are part of every key; a diffusers bundle also depends on the model that encodes it.
    """
    from reelfarm.schemas.families import ANIMATIC_VERSION

    doc: dict[str, Any] = {"cutout": ANIMATIC_VERSION, "max_side": REFERENCE_MAX_SIDE}
    if model.backend != "animatic":
        doc.update({k: getattr(model, k) for k in ("family", "id", "revision", "dtype")})
    return identity_key(character_sha256=reference_sha256, backend=model.backend, model=doc)


@dataclass
class IdentityBundle:
    """One character's encoded identity.

    Attributes:
        character: the character's name in the film.
        key: content hash (see :func:`identity_key`); the file is ``identities/<key>.safetensors``.
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
