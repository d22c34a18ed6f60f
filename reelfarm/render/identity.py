"""Identity bundles: a character's conditioning, computed once per run and shared.

A bundle is a dict of CPU tensors plus string metadata, stored as safetensors (never
pickle) under its content hash, put once into Ray's object store and passed by reference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["IdentityBundle", "identity_key"]


def identity_key(*, character_sha256: str, backend: str, model: dict[str, Any]) -> str:
    """Content hash of an identity: the reference bytes and what encodes them."""
    doc = {"ref": character_sha256, "backend": backend, "model": model}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


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
