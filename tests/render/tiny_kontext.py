"""A tiny random-weight Flux Kontext pipeline (the keyframe model), built in code, saved once.

Nothing is fetched from a hub: the CLIP tokenizer is byte-level BPE with no merges over the
byte alphabet, the T5 tokenizer the in-code Unigram of :mod:`tests.render.tiny_pipelines`.
Configs follow diffusers' own Flux tests (1 double and 1 single block, 2 heads of 16, a
1-level VAE with 1 latent channel): a 32 x 32 keyframe in about 0.05 s on a CPU.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tests.render.tiny_pipelines import _t5_config, t5_tokenizer

__all__ = ["KONTEXT_STEPS", "build_kontext", "clip_tokenizer", "kontext_dir", "not_an_editor_dir"]

KONTEXT_STEPS = 2
_saved: dict[str, Path] = {}


def clip_tokenizer() -> Any:
    """A CLIP tokenizer from an in-code vocabulary: byte-level BPE with no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_kontext() -> Any:
    """``FluxKontextPipeline`` with random weights (seeded before each component)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok),
        hidden_act="gelu", projection_dim=32, max_position_embeddings=77)).eval()
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(_t5_config(len(tok2), umt5=False)).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                        layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                               tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok2,
                               transformer=transformer)


def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="reelfarm-kontext-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def kontext_dir() -> Path:
    """The tiny Kontext pipeline saved with ``save_pretrained``, once per process."""
    if "kontext" not in _saved:
        path = _root() / "kontext"
        build_kontext().save_pretrained(path)
        _saved["kontext"] = path
    return _saved["kontext"]


def not_an_editor_dir() -> Path:
    """A diffusers folder of another kind: a ``model_index.json`` naming a video pipeline."""
    if "wan" not in _saved:
        path = _root() / "wan-i2v"
        path.mkdir()
        (path / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline", '
                                               '"_diffusers_version": "0.42.1"}')
        _saved["wan"] = path
    return _saved["wan"]
