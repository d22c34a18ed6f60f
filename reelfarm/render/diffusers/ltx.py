"""LTX-Video image-to-video (``LTXImageToVideoPipeline``) through its public ``latents=`` input.

The stock call encodes the start image with the VAE and *samples* the posterior with the
generator, then draws the noise. Here the posterior (its moments) is cached once per start
image; each call samples it and draws the noise in that same order, packs the result and
passes it as ``latents=`` with ``image=None``, so the pipeline skips the image and the VAE.

What is cached:
    identity bundle: nothing but ``reference_rgba`` (LTX has no image encoder).
    per shot and worker: prompt embeddings and masks; the VAE posterior of the start image.
Continuation: when the previous chunk's latents are given and this chunk's start frame ends
one of its latent frames (frame ``8k``), that latent becomes frame 0 directly: no decode
and re-encode round trip, hence no colour drift. It is a group latent standing in for a
lone first-frame latent (LTX's causal VAE encodes frame 0 alone), which the denoiser
tolerates; otherwise the start image is re-encoded. ``meta["start"]`` says which.
The decode draws its timestep-conditioning noise (VAE 0.9.1+) from the generator in the
stock order, on the CPU.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import LTXImageToVideoPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from reelfarm.render.diffusers.family import FamilyRunner, SampleJob, to_uint8

logger = logging.getLogger(__name__)

__all__ = ["LTXRunner"]

# The stock call's decode defaults (LTX 0.9.1+ model cards suggest 0.05 and 0.025).
DECODE_TIMESTEP = 0.0
DECODE_NOISE_SCALE = 0.0


class LTXRunner(FamilyRunner):
    family: ClassVar[str] = "ltx"
    accepts_condition_latents: ClassVar[bool] = True

    @classmethod
    def pipeline_class(cls) -> type:
        return LTXImageToVideoPipeline

    @property
    def temporal_ratio(self) -> int:
        return self.pipe.vae_temporal_compression_ratio

    @property
    def spatial_multiple(self) -> int:
        return max(32, self.pipe.vae_spatial_compression_ratio)  # check_inputs wants 32

    # --- geometry --------------------------------------------------------------------
    def _latent_shape(self, job: SampleJob) -> tuple[int, int, int, int, int]:
        p = self.pipe
        return (
            1,
            p.transformer.config.in_channels,
            (job.num_frames - 1) // p.vae_temporal_compression_ratio + 1,
            job.height // p.vae_spatial_compression_ratio,
            job.width // p.vae_spatial_compression_ratio,
        )

    def _unpack(self, packed: torch.Tensor, job: SampleJob) -> torch.Tensor:
        _, _, f, h, w = self._latent_shape(job)
        p = self.pipe
        return p._unpack_latents(
            packed, f, h, w, p.transformer_spatial_patch_size, p.transformer_temporal_patch_size
        )

    # --- rendering -------------------------------------------------------------------
    def _common(self, job: SampleJob, generator: torch.Generator) -> dict[str, Any]:
        return dict(
            height=job.height, width=job.width, num_frames=job.num_frames,
            frame_rate=float(job.fps), num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale, generator=generator, output_type="latent",
            max_sequence_length=self.model.max_sequence_length,
            **self.call_hooks,
        )  # fmt: skip

    def sample_precomputed(self, job: SampleJob, generator: torch.Generator) -> Any:
        pipe, device = self.pipe, self.execution_device
        cfg = job.guidance_scale > 1.0
        pe, pm, ne, nm = self.memo.get(
            ("prompt", job.prompt, job.negative_prompt, cfg, self.model.max_sequence_length),
            lambda: pipe.encode_prompt(
                job.prompt, job.negative_prompt, do_classifier_free_guidance=cfg,
                max_sequence_length=self.model.max_sequence_length, device=device,
            ),
        )  # fmt: skip
        if job.start_latent is not None:
            first = job.start_latent.to(device=device, dtype=torch.float32)
        else:
            moments = self.memo.get(
                ("posterior", job.image_key, job.width, job.height),
                lambda: self._posterior(job, pe.dtype),
            )
            # 1. Sample the posterior with the generator, as retrieve_latents() does.
            first = DiagonalGaussianDistribution(moments).sample(generator).to(torch.float32)
            vae = pipe.vae
            first = pipe._normalize_latents(first, vae.latents_mean, vae.latents_std)
        latents = self._with_noise(first, job, generator, device)
        out = pipe(image=None, latents=latents, prompt_embeds=pe, prompt_attention_mask=pm,
                   negative_prompt_embeds=ne, negative_prompt_attention_mask=nm,
                   **self._common(job, generator))  # fmt: skip
        return out.frames

    def _posterior(self, job: SampleJob, dtype: torch.dtype) -> torch.Tensor:
        """The VAE posterior moments of the start image, as the stock call would encode it."""
        pipe = self.pipe
        image = pipe.video_processor.preprocess(job.image, height=job.height, width=job.width)
        image = image.to(device=self.execution_device, dtype=dtype)
        return pipe.vae.encode(image[0].unsqueeze(0).unsqueeze(2)).latent_dist.parameters

    def _with_noise(
        self, first: torch.Tensor, job: SampleJob, generator: torch.Generator, device: Any
    ) -> torch.Tensor:
        """2. Draw the noise and 3. pack, exactly as ``prepare_latents`` (diffusers 0.42)."""
        pipe = self.pipe
        shape = self._latent_shape(job)
        mask = torch.zeros((1, 1) + shape[2:], device=device, dtype=torch.float32)
        mask[:, :, 0] = 1.0
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = first.repeat(1, 1, shape[2], 1, 1) * mask + noise * (1 - mask)
        return pipe._pack_latents(
            latents, pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
        )

    def chunk_latents(self, latents: Any, job: SampleJob) -> torch.Tensor:
        return self._unpack(latents, job)  # [1, C, F, h, w], normalised as the denoiser sees them

    def start_latent(self, latents: torch.Tensor, frame: int) -> torch.Tensor | None:
        ratio = self.temporal_ratio
        if latents.ndim != 5 or frame <= 0 or frame % ratio:
            return None
        index = frame // ratio
        if (
            index >= latents.shape[2]
            or latents.shape[1] != self.pipe.transformer.config.in_channels
        ):
            return None
        return latents[:, :, index : index + 1]

    def decode(self, latents: Any, job: SampleJob, generator: torch.Generator) -> np.ndarray:
        # As the stock pipeline does after its loop (diffusers 0.42).
        pipe, vae = self.pipe, self.pipe.vae
        device = get_module_execution_device(vae)
        dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else vae.dtype
        x = self._unpack(latents, job)
        x = pipe._denormalize_latents(
            x, vae.latents_mean, vae.latents_std, vae.config.scaling_factor
        )
        x = x.to(device=device, dtype=dtype)
        timestep = None
        if vae.config.timestep_conditioning:
            # Drawn on the CPU: the stock code calls torch.randn with a CPU generator on the
            # device, which fails on CUDA.
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(device)
            timestep = torch.tensor([DECODE_TIMESTEP], device=device, dtype=x.dtype)
            scale = torch.tensor([DECODE_NOISE_SCALE], device=device, dtype=x.dtype)
            scale = scale[:, None, None, None, None]
            x = (1 - scale) * x + scale * noise
        video = vae.decode(x, timestep, return_dict=False)[0]
        return to_uint8(pipe.video_processor.postprocess_video(video, output_type="np")[0])
