"""CogVideoX image-to-video (``CogVideoXImageToVideoPipeline``) with a cached VAE posterior.

The stock ``prepare_latents`` encodes the start image and samples the posterior with the
generator before drawing the noise. The subclass below takes the cached posterior moments
instead and samples them in the same place, so the generator stays in step; with nothing
cached it is the stock method.

What is cached:
    identity bundle: nothing but ``reference_rgba`` (no image encoder).
    per shot and worker: prompt embeddings; the VAE posterior of the start image.
Continuation: from ``condition.image`` (re-encoded). The previous chunk's latents are not
used: CogVideoX's causal VAE encodes a lone first frame differently from a 4-frame group.
CogVideoX-5b-I2V's learned positional embeddings fix its size (720 x 480) and, to stay on
the learned embeddings, its frame count (49): other values are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import CogVideoXImageToVideoPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from reelfarm.render.diffusers.family import FamilyRunner, SampleJob, to_uint8

logger = logging.getLogger(__name__)

__all__ = ["CogVideoXPrecomputedPipeline", "CogVideoXRunner"]


class CogVideoXPrecomputedPipeline(CogVideoXImageToVideoPipeline):
    """``CogVideoXImageToVideoPipeline`` that can take the start image's cached posterior."""

    _cached_moments: torch.Tensor | None = None

    @contextmanager
    def cached(self, moments: torch.Tensor) -> Iterator[None]:
        self._cached_moments = moments
        try:
            yield
        finally:
            self._cached_moments = None

    def prepare_latents(  # same signature and body as diffusers 0.42, but the VAE encode
        self,
        image: torch.Tensor,
        batch_size: int = 1,
        num_channels_latents: int = 16,
        num_frames: int = 13,
        height: int = 60,
        width: int = 90,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self._cached_moments
        if moments is None:
            return super().prepare_latents(
                image, batch_size, num_channels_latents, num_frames, height, width, dtype,
                device, generator, latents,
            )  # fmt: skip
        if batch_size != 1 or isinstance(generator, list):
            raise RuntimeError("the cached CogVideoX posterior serves one video per call")
        num_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        h, w = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
        shape = (batch_size, num_frames, num_channels_latents, h, w)
        p_t = self.transformer.config.patch_size_t
        if p_t is not None:
            shape = shape[:1] + (shape[1] + shape[1] % p_t,) + shape[2:]
        if tuple(moments.shape[-2:]) != (h, w):
            raise RuntimeError(
                f"cached CogVideoX posterior {tuple(moments.shape)} does not fit {shape}"
            )

        image_latents = DiagonalGaussianDistribution(moments).sample(generator)
        image_latents = image_latents.to(dtype).permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]
        if not self.vae.config.invert_scale_latents:
            image_latents = self.vae_scaling_factor_image * image_latents
        else:
            image_latents = 1 / self.vae_scaling_factor_image * image_latents
        padding = torch.zeros((batch_size, num_frames - 1, num_channels_latents, h, w),
                              device=device, dtype=dtype)  # fmt: skip
        image_latents = torch.cat([image_latents, padding], dim=1)
        if p_t is not None:
            first_frame = image_latents[:, : image_latents.size(1) % p_t, ...]
            image_latents = torch.cat([first_frame, image_latents], dim=1)

        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device)
        return latents * self.scheduler.init_noise_sigma, image_latents


class CogVideoXRunner(FamilyRunner):
    family: ClassVar[str] = "cogvideox"

    @classmethod
    def pipeline_class(cls) -> type:
        return CogVideoXPrecomputedPipeline

    @property
    def text_length(self) -> int:
        return self.pipe.transformer.config.max_text_seq_length

    @property
    def temporal_ratio(self) -> int:
        return self.pipe.vae_scale_factor_temporal

    @property
    def spatial_multiple(self) -> int:
        return self.pipe.vae_scale_factor_spatial * self.pipe.transformer.config.patch_size

    def check_size(self, width: int, height: int, num_frames: int) -> None:
        cfg = self.pipe.transformer.config
        if not cfg.use_learned_positional_embeddings:
            return
        s = self.pipe.vae_scale_factor_spatial
        if (width, height) != (cfg.sample_width * s, cfg.sample_height * s):
            raise self.bad(
                f"learned positional embeddings fix the size at {cfg.sample_width * s} x "
                f"{cfg.sample_height * s}, got `width` x `height` {width} x {height}"
            )
        if num_frames != cfg.sample_frames:
            raise self.bad(
                f"learned positional embeddings are trained for `num_frames` "
                f"{cfg.sample_frames}, got {num_frames}"
            )

    def _common(self, job: SampleJob, generator: torch.Generator) -> dict[str, Any]:
        return dict(
            height=job.height, width=job.width, num_frames=job.num_frames,
            num_inference_steps=job.steps, guidance_scale=job.guidance_scale,
            generator=generator, output_type="latent", max_sequence_length=self.text_length,
            **self.call_hooks,
        )  # fmt: skip

    def sample_precomputed(self, job: SampleJob, generator: torch.Generator) -> Any:
        pipe, device = self.pipe, self.execution_device
        cfg = job.guidance_scale > 1.0
        pe, ne = self.memo.get(
            ("prompt", job.prompt, job.negative_prompt, cfg),
            lambda: pipe.encode_prompt(
                job.prompt, job.negative_prompt, do_classifier_free_guidance=cfg,
                max_sequence_length=self.text_length, device=device,
            ),
        )  # fmt: skip
        moments = self.memo.get(
            ("posterior", job.image_key, job.width, job.height),
            lambda: self._posterior(job, pe.dtype),
        )
        with pipe.cached(moments):
            out = pipe(image=job.image, prompt_embeds=pe, negative_prompt_embeds=ne,
                       **self._common(job, generator))  # fmt: skip
        return out.frames

    def _posterior(self, job: SampleJob, dtype: torch.dtype) -> torch.Tensor:
        pipe = self.pipe
        image = pipe.video_processor.preprocess(job.image, height=job.height, width=job.width)
        image = image.to(self.execution_device, dtype=dtype).unsqueeze(2)  # [1, C, 1, H, W]
        return pipe.vae.encode(image).latent_dist.parameters

    def decode(self, latents: Any, job: SampleJob, generator: torch.Generator) -> np.ndarray:
        # As the stock pipeline does after its loop (diffusers 0.42): drop CogVideoX 1.5's
        # padding frames, then decode.
        pipe = self.pipe
        latent_frames = (job.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        p_t = pipe.transformer.config.patch_size_t
        extra = p_t - latent_frames % p_t if p_t is not None and latent_frames % p_t else 0
        video = pipe.decode_latents(latents[:, extra:])
        return to_uint8(pipe.video_processor.postprocess_video(video, output_type="np")[0])
