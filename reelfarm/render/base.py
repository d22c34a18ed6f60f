"""The backend protocol: how one planned chunk becomes frames.

A backend is loaded once per worker (the worker picks device and dtype), encodes each
character's identity once, and renders chunks from their plan, the identities of the
shot's characters and an optional condition from the previous chunk. It returns frames
as uint8 RGB ``T x H x W x 3`` and, where the model has them, the chunk's final latents.
No torch import here: this module is read by the driver too.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from reelfarm.errors import BackendError

if TYPE_CHECKING:
    from reelfarm.render.identity import IdentityBundle
    from reelfarm.schemas.film import AnimaticModel, DiffusersModel
    from reelfarm.schemas.plan import ChunkPlan, ShotPlan

__all__ = ["BACKENDS", "Backend", "ChunkOutput", "Condition", "load_backend", "backend_class"]


@dataclass
class Condition:
    """What a chunk continues from: the previous chunk's tail.

    Attributes:
        image: the previous chunk's frame at this chunk's first frame
            (:meth:`~reelfarm.schemas.plan.ShotPlan.continuation_frame`), ``H x W x 3`` uint8.
        latents: the previous chunk's final latents, where the family accepts them
            (avoids the decode/re-encode round trip that makes colours drift).
    """

    image: np.ndarray | None = None
    latents: Any | None = None  # torch.Tensor on CPU


@dataclass
class ChunkOutput:
    """One rendered chunk: ``frames`` is ``num_frames x H x W x 3`` uint8 RGB."""

    frames: np.ndarray
    latents: Any | None = None  # torch.Tensor on CPU, or None
    meta: dict[str, Any] = field(default_factory=dict)  # seed, library versions, timings


class Backend(Protocol):
    """What every backend offers. See ``AnimaticBackend`` for the smallest one."""

    name: ClassVar[str]

    @classmethod
    def load(cls, model: AnimaticModel | DiffusersModel, *, device: str = "cpu") -> Backend: ...

    def encode_identity(self, character: str, reference: np.ndarray, sha256: str) -> IdentityBundle:
        """Encode one character's reference (``H x W x 3|4`` uint8) once per run."""
        ...

    def __call__(
        self,
        shot: ShotPlan,
        chunk: ChunkPlan,
        identities: dict[str, IdentityBundle],
        condition: Condition | None = None,
    ) -> ChunkOutput: ...

    def low_memory(self) -> None:
        """Switch to the low-memory settings (offload, VAE tiling) for an OOM retry."""
        ...

    def close(self) -> None:
        """Release the model and its device memory."""
        ...


# Plain registry: backend name -> "module:Class", imported only when a worker loads it,
# so the driver never imports torch or diffusers.
BACKENDS: dict[str, str] = {
    "animatic": "reelfarm.render.animatic:AnimaticBackend",
    "diffusers": "reelfarm.render.diffusers.backend:DiffusersBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name``."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendError(
            f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})"
        ) from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_backend(model: AnimaticModel | DiffusersModel, *, device: str = "cpu") -> Backend:
    """Load the backend for ``model`` on ``device``."""
    return backend_class(model.backend).load(model, device=device)
