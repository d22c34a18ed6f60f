"""Wan 2.1 VACE reference-to-video (``WanVACEPipeline``, 1.3B and 14B) with cached references.

Each character of a shot is one ``reference_images`` entry (several subjects in one call).
A reference with transparency is composited over white: the pipeline letterboxes every
reference onto a white canvas (``torch.ones``) before its VAE sees it, so a cut-out over
white reads as the subject alone. The backend composites alpha references over
``CLIP_BACKGROUND`` (white), the same colour; an import-time check keeps the two equal.

What is cached:
    identity bundle: ``vace_reference``, the composited RGB reference the pipeline is given.
    per character, size and worker: the reference latent (VAE ``argmax`` of the reference
    letterboxed onto the shot's canvas, normalised, with VACE's zero "reactive" half). It
    cannot live in the bundle: the pipeline fits the reference into the chunk's
    ``height x width`` before encoding, and a bundle is encoded before any shot size is known.
    per shot and worker: prompt embeddings.
The pipeline subclass overrides ``prepare_video_latents`` to prepend cached reference latents
in the stock order (each reference is put in front of the previous ones); the VAE still
encodes the chunk's own video condition. Nothing here draws from the generator.

Continuation, VACE's way (video + mask): the chunk's first ``K`` frames are known (mask 0)
and the rest is generated (mask 1, grey pixels). ``K`` is the model's ``overlap``: those are
exactly the frames this chunk shares with the previous one, so handing all of them over
continues the motion, not only the pose. They come from decoding the previous chunk's latents
(``condition.latents``, the same decode that made its frames); with only ``condition.image``
(or ``precompute=False``), ``K`` is 1. ``K = 4m + 1`` (1, 5, 9) fills whole latent frames of
Wan's causal VAE (latent 0 is frame 0, then 4 frames each); other counts work, the mask is
resampled to latent frames. A shot's first chunk has one known frame, the animatic keyframe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from diffusers import WanVACEPipeline
from diffusers.pipelines.wan.pipeline_wan_vace import retrieve_latents

from reelfarm.render.diffusers.backend import CLIP_BACKGROUND
from reelfarm.render.diffusers.family import FamilyRunner, SampleJob, image_key
from reelfarm.render.diffusers.wan import WAN_TEXT_TOKENS, WanGeometry, WanRunner

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["VACE_BACKGROUND", "WanVACEPrecomputedPipeline", "WanVACERunner", "known_frames"]

VACE_BACKGROUND = (255, 255, 255)  # the pipeline's reference canvas: torch.ones in [-1, 1]
GREY = 128  # unknown frames, as diffusers' VACE example (127.5 in the original code)
if VACE_BACKGROUND != CLIP_BACKGROUND:  # pragma: no cover - a change to either must be seen
    raise ImportError("wan_vace composites references over CLIP_BACKGROUND; keep it white")


def known_frames(overlap: int, available: int) -> int:
    """How many of the previous chunk's frames a chained chunk takes as known frames."""
    return max(1, min(overlap, available))


class WanVACEPrecomputedPipeline(WanVACEPipeline):
    """``WanVACEPipeline`` that can take cached reference latents."""

    _cached_references: list[torch.Tensor] | None = None

    @contextmanager
    def cached(self, references: list[torch.Tensor]) -> Iterator[None]:
        """Use these reference latents (``[32, 1, h, w]`` each, in reference order) inside."""
        self._cached_references = references
        try:
            yield
        finally:
            self._cached_references = None

    def prepare_video_latents(  # same signature as diffusers 0.42
        self,
        video: torch.Tensor,
        mask: torch.Tensor,
        reference_images: list[list[torch.Tensor]] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        cached = self._cached_references
        if cached is None:
            return super().prepare_video_latents(video, mask, reference_images, generator, device)
        given = [len(batch) for batch in reference_images or [[]]]
        if given != [len(cached)]:
            raise RuntimeError(f"{len(cached)} cached reference latents for references {given}")
        # The video condition as stock (no references), then the references in front, one
        # after the other, as the stock loop does.
        latents = super().prepare_video_latents(video, mask, [[]], generator, device)
        latent = latents[0]
        for reference in cached:
            latent = torch.cat([reference.to(device=latent.device, dtype=latent.dtype), latent], 1)
        return torch.stack([latent])


class WanVACERunner(WanGeometry, FamilyRunner):
    family: ClassVar[str] = "wan_vace"
    identity_tensor: ClassVar[str | None] = "vace_reference"
    identity_combine: ClassVar[str] = "references"  # one reference image per character
    accepts_condition_latents: ClassVar[bool] = True
    references_in_stock: ClassVar[bool] = True  # the stock call takes the references too

    @classmethod
    def pipeline_class(cls) -> type:
        return WanVACEPrecomputedPipeline

    def check_pipeline(self) -> None:
        if self.pipe.transformer is None:
            raise self.bad("the pipeline has no `transformer`")
        if self.pipe.transformer_2 is not None or self.pipe.config.boundary_ratio is not None:
            raise self.bad("two-transformer (Wan 2.2) VACE is not supported, only Wan 2.1 VACE")

    # --- identity --------------------------------------------------------------------
    def encode_reference(self, image: Image.Image) -> torch.Tensor | None:
        # The backend hands the reference composited over white (see the module doc).
        return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))

    def combine(self, tensors: list[torch.Tensor]) -> Any:
        return list(tensors)  # references differ in size: kept apart, in the shot's order

    @staticmethod
    def _references(job: SampleJob) -> list[Image.Image]:
        from PIL import Image

        refs = job.identity
        if refs is None:
            return []
        refs = [refs] if isinstance(refs, torch.Tensor) else refs
        return [Image.fromarray(r.cpu().numpy(), "RGB") for r in refs]

    def reference_latent(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """One reference's latent as the stock ``prepare_video_latents`` makes it."""
        pipe, device = self.pipe, self.execution_device
        _, _, (refs,) = pipe.preprocess_conditions(
            None, None, [image], 1, height, width, 1, torch.float32, device
        )
        vae = pipe.vae
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, device=device, dtype=torch.float32)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device, dtype=torch.float32)
        reference = refs[0].to(dtype=vae.dtype)[None, :, None, :, :]  # [1, C, 1, H, W]
        latent = retrieve_latents(vae.encode(reference), None, sample_mode="argmax")
        latent = ((latent.float() - mean.view(1, z, 1, 1, 1)) * inv_std.view(1, z, 1, 1, 1))
        latent = latent.to(vae.dtype).squeeze(0)  # [C, 1, h, w]
        return torch.cat([latent, torch.zeros_like(latent)], dim=0)

    # --- continuation ----------------------------------------------------------------
    def start_latent(self, latents: torch.Tensor, frame: int) -> torch.Tensor | None:
        """The previous chunk's known frames from ``frame`` on, decoded from its latents
        (``K x H x W x 3`` uint8): the frames it made, where ``condition.image`` is only one."""
        frames = self._decode_video(latents.to(self.execution_device))
        k = known_frames(self.model.overlap, frames.shape[0] - frame)
        return torch.from_numpy(frames[frame : frame + k].copy())

    def _video_and_mask(self, job: SampleJob) -> tuple[list[Image.Image], list[Image.Image]]:
        from PIL import Image

        size = (job.width, job.height)
        if job.start_latent is not None:
            known = [Image.fromarray(f, "RGB") for f in job.start_latent.cpu().numpy()]
        else:
            known = [job.image]
        known = [im if im.size == size else im.resize(size) for im in known][: job.num_frames]
        rest = job.num_frames - len(known)
        video = known + [Image.new("RGB", size, (GREY, GREY, GREY))] * rest
        mask = [Image.new("L", size, 0)] * len(known) + [Image.new("L", size, 255)] * rest
        return video, mask

    # --- rendering -------------------------------------------------------------------
    def _common(self, job: SampleJob, generator: torch.Generator) -> dict[str, Any]:
        video, mask = self._video_and_mask(job)
        refs = self._references(job)
        return dict(
            video=video, mask=mask, reference_images=refs or None,
            height=job.height, width=job.width, num_frames=job.num_frames,
            num_inference_steps=job.steps, guidance_scale=job.guidance_scale,
            generator=generator, output_type="latent", max_sequence_length=WAN_TEXT_TOKENS,
            **self.call_hooks,
        )  # fmt: skip

    def sample_stock(self, job: SampleJob, generator: torch.Generator) -> Any:
        out = self.pipe(prompt=job.prompt, negative_prompt=job.negative_prompt,
                        **self._common(job, generator))  # fmt: skip
        return out.frames

    def sample_precomputed(self, job: SampleJob, generator: torch.Generator) -> Any:
        pipe = self.pipe
        prompt_embeds, negative_embeds = self.prompt_embeds(job)
        references = []
        for image in self._references(job):
            key = ("reference", image_key(np.asarray(image)), job.width, job.height)
            references.append(self.memo.get(
                key, lambda im=image: self.reference_latent(im, job.width, job.height)
            ))  # fmt: skip
        with pipe.cached(references):
            out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                       **self._common(job, generator))  # fmt: skip
        return out.frames

    def chunk_latents(self, latents: Any, job: SampleJob) -> torch.Tensor:
        return latents[:, :, len(self._references(job)) :]  # the video, without the references

    def decode(self, latents: Any, job: SampleJob, generator: torch.Generator) -> np.ndarray:
        return self._decode_video(self.chunk_latents(latents, job))

    def _decode_video(self, latents: torch.Tensor) -> np.ndarray:
        return WanRunner.decode(self, latents, None, None)  # type: ignore[arg-type]
