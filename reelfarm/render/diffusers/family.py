"""What every diffusers family file implements, and the small helpers they share.

A :class:`FamilyRunner` wraps one loaded pipeline. The backend resolves a chunk into a
:class:`SampleJob`; the runner turns it into latents (stock call or precomputed
conditioning, same frames) and decodes them in a separate step.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from reelfarm.errors import BackendError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from reelfarm.schemas.film import DiffusersModel

logger = logging.getLogger(__name__)

__all__ = ["FamilyRunner", "Memo", "SampleJob", "image_key", "to_uint8"]

MEMO_ENTRIES = 8  # shot conditionings kept per worker (prompt embeddings, image encodings)


def image_key(image: np.ndarray) -> str:
    """Content hash of an ``H x W x C`` uint8 image."""
    return hashlib.sha256(str(image.shape).encode() + image.tobytes()).hexdigest()


def to_uint8(video: np.ndarray) -> np.ndarray:
    """``[0, 1]`` floats (``postprocess_video(output_type="np")``) to uint8, rounded."""
    return np.clip(np.round(video * 255.0), 0, 255).astype(np.uint8)


class Memo:
    """A small least-recently-used memo of shot conditioning tensors, per worker."""

    def __init__(self, entries: int = MEMO_ENTRIES) -> None:
        self.entries = entries
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = compute()
        self._items[key] = value
        while len(self._items) > self.entries:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class SampleJob:
    """One sampler call, resolved by the backend.

    Attributes:
        image: the start image, RGB at ``width x height``.
        image_key: content hash of ``image``.
        identity: the shot's combined character conditioning (Wan: CLIP hidden states,
            SVD: CLIP embeddings), on the device; None when the family has none or the
            shot has no characters (then the start image's own CLIP encoding is used).
        start_latent: LTX only, the first-frame latent taken from the previous chunk.
    """

    prompt: str
    negative_prompt: str
    image: Image.Image
    image_key: str
    width: int
    height: int
    num_frames: int
    steps: int
    guidance_scale: float
    fps: Fraction
    identity: torch.Tensor | None = None
    start_latent: torch.Tensor | None = None


class FamilyRunner:
    """One family's way of sampling and decoding with a loaded pipeline.

    Subclasses set the class attributes and implement the ``sample_*`` and ``decode``
    methods. Everything runs under ``torch.inference_mode()`` (the backend enters it).
    """

    family: ClassVar[str]
    identity_tensor: ClassVar[str | None] = None  # name in IdentityBundle.tensors
    identity_combine: ClassVar[str] = "none"  # how several characters combine
    accepts_condition_latents: ClassVar[bool] = False

    def __init__(self, pipe: Any, model: DiffusersModel, device: str) -> None:
        self.pipe = pipe
        self.model = model
        self.device = device
        self.memo = Memo()
        self.low_memory = False
        self.decode_chunk: int | None = None  # frames per VAE decode, where the family has it
        # Extra pipeline-call arguments for the next sample (step callbacks: resume.py);
        # every family's ``_common`` passes them on.
        self.call_hooks: dict[str, Any] = {}

    # --- loading ---------------------------------------------------------------------
    @classmethod
    def pipeline_class(cls) -> type:
        """The pipeline class ``from_pretrained`` is called on (a stock subclass)."""
        raise NotImplementedError

    def check_pipeline(self) -> None:
        """Refuse a loaded pipeline this runner cannot drive. Called once after loading."""

    # --- rules -----------------------------------------------------------------------
    @property
    def temporal_ratio(self) -> int:
        """``num_frames - 1`` must be a multiple of this (the VAE's temporal compression)."""
        return 1

    @property
    def spatial_multiple(self) -> int:
        """Width and height must be multiples of this."""
        return 8

    def check_size(self, width: int, height: int, num_frames: int) -> None:
        """Family-specific limits beyond the frame and size multiples."""

    # --- identity --------------------------------------------------------------------
    def encode_reference(self, image: Image.Image) -> torch.Tensor | None:
        """The character-only conditioning of one reference (None when the family has none)."""
        return None

    def combine(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Combine several characters' conditioning into one."""
        raise NotImplementedError

    # --- rendering -------------------------------------------------------------------
    def sample(self, job: SampleJob, generator: torch.Generator, *, precompute: bool) -> Any:
        """Denoise to latents (``output_type="latent"``), stock or precomputed."""
        if precompute:
            return self.sample_precomputed(job, generator)
        return self.sample_stock(job, generator)

    def _common(self, job: SampleJob, generator: torch.Generator) -> dict[str, Any]:
        """The family's call arguments shared by the stock and precomputed paths."""
        raise NotImplementedError

    def sample_stock(self, job: SampleJob, generator: torch.Generator) -> Any:
        """The pipeline's own call: it encodes prompt and image itself."""
        out = self.pipe(image=job.image, prompt=job.prompt, negative_prompt=job.negative_prompt,
                        **self._common(job, generator))  # fmt: skip
        return out.frames

    def sample_precomputed(self, job: SampleJob, generator: torch.Generator) -> Any:
        """The same call fed with memoised conditioning: identical frames, less work."""
        raise NotImplementedError

    def chunk_latents(self, latents: Any, job: SampleJob) -> torch.Tensor:
        """The latents to return with the chunk (CPU copy made by the backend)."""
        return latents

    def start_latent(self, latents: torch.Tensor, frame: int) -> torch.Tensor | None:
        """The previous chunk's latent for its frame ``frame``, if this family can use it."""
        return None

    def decode(self, latents: Any, job: SampleJob, generator: torch.Generator) -> np.ndarray:
        """Latents to ``num_frames x H x W x 3`` uint8 frames."""
        raise NotImplementedError

    def enable_vae_tiling(self) -> bool:
        """Switch on tiled VAE decoding where the VAE has it. Returns whether it did."""
        vae = self.pipe.vae
        if not hasattr(vae, "use_tiling"):
            return False
        vae.enable_tiling()
        return True

    # --- helpers ---------------------------------------------------------------------
    @property
    def execution_device(self) -> Any:
        return self.pipe._execution_device

    def bad(self, message: str) -> BackendError:
        rev = f"@{self.model.revision}" if self.model.revision else ""
        return BackendError(f"model `{self.model.id}{rev}` (family `{self.family}`): {message}")
