"""Tiny random-weight image-to-video pipelines for the diffusers families, built in code.

Nothing is fetched from a hub: every component is built from constructor arguments
(``torch.manual_seed(0)`` before each one, ``.eval()`` on transformers models) and the
tokenizers are built from an in-code vocabulary. :func:`saved_model_dir` writes a family's
pipeline with ``save_pretrained`` once per process, so tests and bench load it back with
``from_pretrained`` through :class:`reelfarm.render.diffusers.DiffusersBackend`, the real
loading path. Configs come from ``/work/shared/notes/tiny-diffusers-probe.md`` (diffusers 0.42.1).

Also here: plan builders (:func:`tiny_model`, :func:`tiny_shot`) so a test or a benchmark can
render chained chunks without the planner.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from reelfarm.schemas.film import Camera, DiffusersModel, Transition
from reelfarm.schemas.plan import ChunkPlan, ShotPlan

__all__ = [
    "FAMILIES",
    "TINY_FRAMES",
    "TINY_SIZE",
    "build_pipeline",
    "clip_processor",
    "reference_image",
    "saved_model_dir",
    "t5_tokenizer",
    "tiny_model",
    "tiny_shot",
]

FAMILIES = ("wan", "ltx", "cogvideox", "svd")
TINY_SIZE = 32  # pixels, square; CogVideoX's learned positional embeddings fix it at 32
# Frames per chunk that obey each family's rule (families.py) at tiny scale.
TINY_FRAMES = {"wan": 9, "ltx": 17, "cogvideox": 9, "svd": 14, "wan_vace": 9}
# Text lengths the tiny models need: Wan's attention splits image and text tokens assuming
# 512 text tokens; CogVideoX's must equal `max_text_seq_length` of its transformer (16 here).
TINY_TEXT = {"wan": 512, "ltx": 16, "cogvideox": 16, "svd": 226, "wan_vace": 512}
_WORDS = "a the person cat candle flame moth talking dance to camera blurry night shelf".split()

_saved: dict[str, Path] = {}
_root: Path | None = None


# --- tokenizers -------------------------------------------------------------------------


def t5_tokenizer(max_length: int = 64) -> Any:
    """A T5/UMT5 Unigram tokenizer from an in-code vocabulary (ids 0, 1, 2 = pad, eos, unk)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in _WORDS]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz"]  # character fallback
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _t5_config(vocab_size: int, *, umt5: bool) -> Any:
    from transformers import T5Config, UMT5Config

    common = dict(
        vocab_size=vocab_size, d_model=32, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    if umt5:
        return UMT5Config(d_ff=64, relative_attention_max_distance=16,
                          feed_forward_proj="gated-gelu", **common)  # fmt: skip
    return T5Config(d_ff=37, **common)


# --- one builder per family ---------------------------------------------------------------


def _wan_text_and_vae() -> tuple[Any, Any, Any]:
    """The tokenizer, UMT5 text encoder and VAE every tiny Wan pipeline shares (seeded)."""
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    tok = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(_t5_config(len(tok), umt5=True)).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    return tok, text_encoder, vae


def _wan() -> Any:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tok, text_encoder, vae = _wan_text_and_vae()
    torch.manual_seed(0)
    # added_kv_proj_dim = the inner dim (2 x 12), as in Wan 2.1 I2V: the image tokens get their
    # own attention, split from the text at 512 tokens.
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        image_dim=8, added_kv_proj_dim=24, pos_embed_seq_len=None,
    )  # fmt: skip
    torch.manual_seed(0)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=8, projection_dim=8, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, intermediate_size=16, patch_size=8,
    )).eval()  # fmt: skip
    return WanImageToVideoPipeline(
        tokenizer=tok, text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_processor=clip_processor(32), image_encoder=image_encoder, transformer=transformer,
    )  # fmt: skip


def _wan_vace() -> Any:
    """Wan 2.1 VACE: the Wan text encoder and VAE, a transformer with VACE blocks, no CLIP."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )

    tok, text_encoder, vae = _wan_text_and_vae()
    torch.manual_seed(0)
    # vace_in_channels = 2 x 16 (inactive and reactive latents) + 64 (the 8 x 8 mask).
    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        vace_layers=[0, 2], vace_in_channels=96,
    )  # fmt: skip
    return WanVACEPipeline(
        tokenizer=tok, text_encoder=text_encoder, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer,
    )  # fmt: skip


def _ltx() -> Any:
    import torch
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXImageToVideoPipeline,
        LTXVideoTransformer3DModel,
    )
    from transformers import T5EncoderModel

    tok = t5_tokenizer()
    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
        attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32,
    )  # fmt: skip
    torch.manual_seed(0)
    # Three spatio-temporal scalings: 8x in time and space, so the real 8k+1 rule holds.
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    )  # fmt: skip
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(_t5_config(len(tok), umt5=False)).eval()
    return LTXImageToVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tok, transformer=transformer,
    )  # fmt: skip


def _cogvideox() -> Any:
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5EncoderModel

    tok = t5_tokenizer()
    torch.manual_seed(0)
    # Learned positional embeddings, as in CogVideoX-5b-I2V: fixed at 32 px and 9 frames.
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4,
        time_embed_dim=2, text_embed_dim=32, num_layers=1, sample_width=4, sample_height=4,
        sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
        latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )  # fmt: skip
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(_t5_config(len(tok), umt5=False)).eval()
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        timestep_spacing="trailing", snr_shift_scale=1.0,
    )  # fmt: skip
    return CogVideoXImageToVideoPipeline(
        tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=scheduler,
    )  # fmt: skip


def _svd() -> Any:
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 32), layers_per_block=1, sample_size=32, in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=2, projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", num_train_timesteps=1000, prediction_type="v_prediction",
        sigma_max=700.0, sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
        timestep_type="continuous", trained_betas=None, use_karras_sigmas=True,
    )  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"], latent_channels=4,
    )  # fmt: skip
    torch.manual_seed(0)
    # SVD resizes PIL/numpy inputs to 224 px itself: the CLIP tower must take 224 px.
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, intermediate_size=37, patch_size=32,
    )).eval()  # fmt: skip
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
        feature_extractor=clip_processor(224),
    )  # fmt: skip


def clip_processor(size: int) -> Any:
    """A CLIP image processor (OpenAI mean/std); without torchvision, the PIL-backed class."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        cls = None
    cls = cls or transformers.CLIPImageProcessor
    return cls(crop_size=size, size=size)


_BUILDERS = {"wan": _wan, "ltx": _ltx, "cogvideox": _cogvideox, "svd": _svd,
             "wan_vace": _wan_vace}


def build_pipeline(family: str) -> Any:
    """Build ``family``'s tiny pipeline in memory (random weights, seeded)."""
    return _BUILDERS[family]()


def saved_model_dir(family: str) -> Path:
    """``family``'s tiny pipeline saved with ``save_pretrained``, once per process."""
    global _root
    if family not in _saved:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="reelfarm-tiny-"))
            atexit.register(shutil.rmtree, _root, True)
        path = _root / family
        build_pipeline(family).save_pretrained(path)
        _saved[family] = path
    return _saved[family]


# --- plans and images ---------------------------------------------------------------------


def tiny_model(family: str, model_id: str, **overrides: Any) -> DiffusersModel:
    """A spec for ``family``'s tiny model: float32, 2 steps, the tiny text length."""
    fields: dict[str, Any] = dict(
        backend="diffusers", family=family, id=model_id, steps=2, dtype="float32",
        max_sequence_length=TINY_TEXT[family], chunk_frames=TINY_FRAMES[family], overlap=1,
        guidance_scale=3.0 if family == "svd" else 5.0, negative_prompt="blurry",
    )  # fmt: skip
    if family != "ltx":  # the only family that reads it (schemas/film.py refuses it elsewhere)
        fields.pop("max_sequence_length")
    fields.update(overrides)
    return DiffusersModel(**fields)


def tiny_shot(
    model: DiffusersModel,
    *,
    chunks: int = 2,
    characters: tuple[str, ...] = ("flame",),
    character_hashes: tuple[str, ...] | None = None,
    prompt: str = "the little flame flickers at night",
    size: int = TINY_SIZE,
    width: int | None = None,
    height: int | None = None,
    seed: int = 1234,
) -> ShotPlan:
    """A shot of ``chunks`` chained chunks of ``model.frames_per_chunk`` frames.

    Chunks overlap by ``model.overlap`` frames (1 in :func:`tiny_model`); the picture is
    ``size`` square unless ``width`` and ``height`` are given.
    """
    n = model.frames_per_chunk
    step = n - model.overlap
    plans = []
    for i in range(chunks):
        start = i * step
        plans.append(ChunkPlan(
            name=f"s01_010/chunk-{start:04d}-{start + n - 1:04d}", index=i, frame_start=start,
            frame_end=start + n, num_frames=n, overlap=model.overlap if i else 0,
            seed=seed + i, key=f"key-{i}", depends_on=f"key-{i - 1}" if i else None,
            est_gpu_s=1.0,
        ))  # fmt: skip
    hashes = character_hashes or tuple(hashlib.sha256(c.encode()).hexdigest() for c in characters)
    return ShotPlan(
        scene_id="s01", shot_id="s01_010", index=0, prompt=prompt, characters=characters,
        character_hashes=hashes, camera=Camera(), transition=Transition(), transition_frames=0,
        model=model, width=width or size, height=height or size, fps=Fraction(24),
        frames=step * chunks + model.overlap,
        seed=seed, chunks=tuple(plans), est_gpu_s=float(chunks),
    )  # fmt: skip


def reference_image(size: int = 48, *, seed: int = 0, alpha: bool = True) -> np.ndarray:
    """A deterministic character reference: a coloured disc, RGBA with a transparent outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[...] = rng.integers(0, 256, 3, dtype=np.uint8)
    rgb[..., 0] = (rgb[..., 0].astype(np.int32) + xx * 3).clip(0, 255).astype(np.uint8)
    if not alpha:
        return rgb
    a = np.where(inside, 255, 0).astype(np.uint8)[..., None]
    return np.concatenate([rgb, a], axis=-1)
