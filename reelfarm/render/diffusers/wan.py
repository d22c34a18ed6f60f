"""Wan 2.1 image-to-video (``WanImageToVideoPipeline``) with cached identity and conditioning.

diffusers 0.42 refuses ``image_embeds=`` together with ``image`` (the image is still needed
for the VAE condition), so the public inputs cannot carry cached conditioning. The
pipeline subclass below overrides ``encode_image`` (cached CLIP hidden states) and
``prepare_latents`` (cached VAE condition; the noise is still drawn from the generator in
the same place). Both fall through to the stock code when nothing is cached.

What is cached:
    identity bundle: ``clip_hidden``, CLIP ``hidden_states[-2]`` of the character reference.
    per shot and worker: prompt embeddings; the VAE condition ``[mask, latent]`` of the start
    image, for each ``(image, width, height, num_frames)``.
Several characters: their CLIP token sequences are concatenated (Wan 2.1 attends over any
number of image tokens; its transformer splits image from text by assuming 512 text tokens).
A shot with no characters uses the start image's CLIP encoding, as the stock pipeline does.
Continuation: from ``condition.image`` (re-encoded by the VAE). The previous chunk's latents
are not used: Wan's causal VAE encodes a lone first frame differently from a 4-frame group.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from reelfarm.render.diffusers.family import FamilyRunner, Memo, SampleJob, to_uint8

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["WanPrecomputedPipeline", "WanRunner"]

WAN_TEXT_TOKENS = 512  # transformer_wan.py: image_context_length = seq_len - 512


class WanPrecomputedPipeline(WanImageToVideoPipeline):
    """``WanImageToVideoPipeline`` that can take cached CLIP hidden states and VAE condition."""

    _cached_image_embeds: torch.Tensor | None = None
    _cached_condition: torch.Tensor | None = None

    @contextmanager
    def cached(self, image_embeds: torch.Tensor, condition: torch.Tensor) -> Iterator[None]:
        """Use these for the calls made inside the block."""
        self._cached_image_embeds, self._cached_condition = image_embeds, condition
        try:
            yield
        finally:
            self._cached_image_embeds = self._cached_condition = None

    def encode_image(self, image: Any, device: torch.device | None = None) -> torch.Tensor:
        if self._cached_image_embeds is None:
            return super().encode_image(image, device)
        return self._cached_image_embeds.to(device or self._execution_device)

    def prepare_latents(  # same signature as diffusers 0.42
        self,
        image: Any,
        batch_size: int,
        num_channels_latents: int = 16,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        last_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        condition = self._cached_condition
        if condition is None:
            return super().prepare_latents(
                image, batch_size, num_channels_latents, height, width, num_frames, dtype,
                device, generator, latents, last_image,
            )  # fmt: skip
        # The stock method draws the noise first, then encodes the condition without the
        # generator (argmax): drawing only the noise keeps the generator in step.
        shape = (
            batch_size,
            num_channels_latents,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        if condition.shape[0] != batch_size or tuple(condition.shape[2:]) != shape[2:]:
            raise RuntimeError(
                f"cached Wan condition {tuple(condition.shape)} does not fit {shape}"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents, condition.to(device)


class WanGeometry:
    """What every Wan 2.x runner shares: the frame and size rules (the VAE's compression, the
    transformer's spatial patch) and the memoised UMT5 prompt embeddings."""

    pipe: Any
    memo: Memo
    execution_device: Any

    def prompt_embeds(self, job: SampleJob) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's and negative prompt's embeddings, once per shot and worker."""
        cfg = job.guidance_scale > 1.0
        return self.memo.get(
            ("prompt", job.prompt, job.negative_prompt, cfg),
            lambda: self.pipe.encode_prompt(
                job.prompt, job.negative_prompt, do_classifier_free_guidance=cfg,
                max_sequence_length=WAN_TEXT_TOKENS, device=self.execution_device,
            ),
        )  # fmt: skip

    @property
    def temporal_ratio(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    @property
    def spatial_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.pipe.transformer.config.patch_size[1]


class WanRunner(WanGeometry, FamilyRunner):
    family: ClassVar[str] = "wan"
    identity_tensor: ClassVar[str | None] = "clip_hidden"
    identity_combine: ClassVar[str] = "concat"

    @classmethod
    def pipeline_class(cls) -> type:
        return WanPrecomputedPipeline

    def check_pipeline(self) -> None:
        if self.pipe.config.expand_timesteps:
            raise self.bad("Wan 2.2 TI2V (`expand_timesteps`) is not supported, only Wan 2.1 I2V")
        if self.pipe.transformer is None:
            raise self.bad("the pipeline has no `transformer`")
        if self.pipe.transformer.config.pos_embed_seq_len is not None:
            raise self.bad("first-last-frame (FLF2V) checkpoints are not supported")
        if not self.has_clip:  # Wan 2.2 A14B: no CLIP image conditioning at all
            self.identity_tensor = None

    @property
    def has_clip(self) -> bool:
        return bool(self.pipe.image_encoder is not None and self.pipe.transformer.config.image_dim)

    # --- identity --------------------------------------------------------------------
    def encode_reference(self, image: Image.Image) -> torch.Tensor | None:
        if not self.has_clip:
            return None
        return WanImageToVideoPipeline.encode_image(self.pipe, image, self.execution_device)

    def combine(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=1)  # [1, tokens x characters, dim]

    # --- rendering -------------------------------------------------------------------
    def _common(self, job: SampleJob, generator: torch.Generator) -> dict[str, Any]:
        return dict(
            height=job.height, width=job.width, num_frames=job.num_frames,
            num_inference_steps=job.steps, guidance_scale=job.guidance_scale,
            generator=generator, output_type="latent", max_sequence_length=WAN_TEXT_TOKENS,
            **self.call_hooks,
        )  # fmt: skip

    def sample_precomputed(self, job: SampleJob, generator: torch.Generator) -> Any:
        pipe, device = self.pipe, self.execution_device
        prompt_embeds, negative_embeds = self.prompt_embeds(job)
        image_embeds = job.identity
        if image_embeds is None and self.has_clip:
            image_embeds = self.memo.get(
                ("clip", job.image_key),
                lambda: WanImageToVideoPipeline.encode_image(pipe, job.image, device),
            )
        condition = self.memo.get(
            ("condition", job.image_key, job.width, job.height, job.num_frames),
            lambda: self._condition(job),
        )
        with pipe.cached(image_embeds, condition):
            out = pipe(
                image=job.image,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                **self._common(job, generator),
            )
        return out.frames

    def _condition(self, job: SampleJob) -> torch.Tensor:
        """The stock VAE condition of the start image (its throwaway noise draw is discarded)."""
        pipe, device = self.pipe, self.execution_device
        image = pipe.video_processor.preprocess(job.image, height=job.height, width=job.width)
        image = image.to(device, dtype=torch.float32)
        _, condition = WanImageToVideoPipeline.prepare_latents(
            pipe, image, 1, pipe.vae.config.z_dim, job.height, job.width, job.num_frames,
            torch.float32, device, torch.Generator("cpu").manual_seed(0),
        )  # fmt: skip
        return condition

    def decode(self, latents: Any, job: SampleJob, generator: torch.Generator) -> np.ndarray:
        # As the stock pipeline does after its loop (diffusers 0.42).
        vae = self.pipe.vae
        latents = latents.to(device=get_module_execution_device(vae), dtype=vae.dtype)
        z = vae.config.z_dim
        mean = (
            torch.tensor(vae.config.latents_mean)
            .view(1, z, 1, 1, 1)
            .to(latents.device, latents.dtype)
        )
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return to_uint8(self.pipe.video_processor.postprocess_video(video, output_type="np")[0])
