"""Stable Video Diffusion (``StableVideoDiffusionPipeline``) with cached CLIP image embeddings.

SVD adds ``noise_aug_strength x randn(generator)`` to the start image's pixels before its
VAE encode, so the VAE latent depends on the seed and is not cached (it could be only with
``noise_aug_strength=0``). The subclass below overrides ``_encode_image`` to use cached CLIP
embeddings; with nothing cached it is the stock method.

What is cached:
    identity bundle: ``clip_embeds``, the CLIP image embedding of the character reference.
    per shot and worker: the start image's CLIP embedding when the shot has no characters.
Several characters: their CLIP embeddings are averaged (SVD cross-attends to a single
image token, so a mean keeps the input in distribution).
Continuation: from ``condition.image`` (SVD has no latent continuation).
The spec's ``guidance_scale`` is SVD's ``max_guidance_scale`` (it ramps from 1.0 over
the frames); ``fps`` is the shot's rate rounded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from diffusers import StableVideoDiffusionPipeline

from reelfarm.render.diffusers.family import FamilyRunner, SampleJob, to_uint8

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["SVDPrecomputedPipeline", "SVDRunner"]

MIN_GUIDANCE_SCALE = 1.0
MOTION_BUCKET_ID = 127
NOISE_AUG_STRENGTH = 0.02
LOW_MEMORY_DECODE_FRAMES = 4  # frames per VAE decode after low_memory(); else all at once


class SVDPrecomputedPipeline(StableVideoDiffusionPipeline):
    """``StableVideoDiffusionPipeline`` that can take cached CLIP image embeddings."""

    _cached_image_embeds: torch.Tensor | None = None

    @contextmanager
    def cached(self, image_embeds: torch.Tensor) -> Iterator[None]:
        self._cached_image_embeds = image_embeds
        try:
            yield
        finally:
            self._cached_image_embeds = None

    def _encode_image(
        self,
        image: Any,
        device: str | torch.device,
        num_videos_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> torch.Tensor:
        embeds = self._cached_image_embeds
        if embeds is None:
            return super()._encode_image(image, device, num_videos_per_prompt,
                                         do_classifier_free_guidance)  # fmt: skip
        # The stock method's tail (diffusers 0.42): repeat per video, zeros for the uncond.
        embeds = embeds.to(device=device, dtype=next(self.image_encoder.parameters()).dtype)
        bs, seq, _ = embeds.shape
        embeds = embeds.repeat(1, num_videos_per_prompt, 1).view(
            bs * num_videos_per_prompt, seq, -1
        )
        if do_classifier_free_guidance:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
        return embeds


class SVDRunner(FamilyRunner):
    family: ClassVar[str] = "svd"
    identity_tensor: ClassVar[str | None] = "clip_embeds"
    identity_combine: ClassVar[str] = "mean"

    @classmethod
    def pipeline_class(cls) -> type:
        return SVDPrecomputedPipeline

    @property
    def spatial_multiple(self) -> int:
        return max(8, self.pipe.vae_scale_factor)

    def encode_reference(self, image: Image.Image) -> torch.Tensor | None:
        return StableVideoDiffusionPipeline._encode_image(
            self.pipe, image, self.execution_device, 1, False
        )  # [1, 1, dim]

    def combine(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors).mean(dim=0)

    def _common(self, job: SampleJob, generator: torch.Generator) -> dict[str, Any]:
        return dict(
            height=job.height, width=job.width, num_frames=job.num_frames,
            num_inference_steps=job.steps, min_guidance_scale=MIN_GUIDANCE_SCALE,
            max_guidance_scale=job.guidance_scale, fps=max(1, round(float(job.fps))),
            motion_bucket_id=MOTION_BUCKET_ID, noise_aug_strength=NOISE_AUG_STRENGTH,
            generator=generator, output_type="latent",
            **self.call_hooks,
        )  # fmt: skip

    def sample_stock(self, job: SampleJob, generator: torch.Generator) -> Any:
        return self.pipe(image=job.image, **self._common(job, generator)).frames

    def sample_precomputed(self, job: SampleJob, generator: torch.Generator) -> Any:
        embeds = job.identity
        if embeds is None:
            embeds = self.memo.get(
                ("clip", job.image_key), lambda: self.encode_reference(job.image)
            )
        with self.pipe.cached(embeds):
            return self.pipe(image=job.image, **self._common(job, generator)).frames

    def decode(self, latents: Any, job: SampleJob, generator: torch.Generator) -> np.ndarray:
        pipe = self.pipe
        chunk = self.decode_chunk or job.num_frames
        if self.low_memory:
            chunk = min(chunk, LOW_MEMORY_DECODE_FRAMES)
        video = pipe.decode_latents(latents, job.num_frames, chunk)
        return to_uint8(pipe.video_processor.postprocess_video(video, output_type="np")[0])
