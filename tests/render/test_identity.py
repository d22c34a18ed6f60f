"""Identity bundles: the key a backend gives a bundle is the key the farm caches it under."""

from __future__ import annotations

import numpy as np
import torch

from reelfarm.render.base import load_backend
from reelfarm.render.identity import IdentityBundle
from reelfarm.render.identity import identity_key as identity_cache_key
from reelfarm.schemas.film import AnimaticModel
from tests.render import tiny_pipelines as tp

SHA = "ab" * 32


def _reference() -> np.ndarray:
    img = np.zeros((40, 30, 4), np.uint8)
    img[5:35, 5:25] = (250, 120, 30, 255)
    return img


def test_animatic_bundle_key_is_the_cache_key():
    model = AnimaticModel()
    bundle = load_backend(model).encode_identity("flame", _reference(), SHA)
    assert bundle.key[:32] == identity_cache_key(model, SHA)
    assert identity_cache_key(model, "cd" * 32) != identity_cache_key(model, SHA)


def test_diffusers_bundle_key_is_the_cache_key_and_depends_on_the_model():
    model = tp.tiny_model("wan", str(tp.saved_model_dir("wan")))
    backend = load_backend(model)
    try:
        bundle = backend.encode_identity("flame", _reference(), SHA)
    finally:
        backend.close()
    assert bundle.key[:32] == identity_cache_key(model, SHA)
    assert identity_cache_key(model.model_copy(update={"dtype": "bfloat16"}), SHA) != bundle.key[:32]
    assert identity_cache_key(AnimaticModel(), SHA) != bundle.key[:32]


def test_bundle_round_trips_through_safetensors_bytes():
    bundle = IdentityBundle("moth", "k" * 32, {"reference_rgba": torch.arange(24, dtype=torch.uint8).view(2, 3, 4)},
                            {"backend": "animatic"})
    back = IdentityBundle.from_bytes(bundle.to_bytes())
    assert (back.character, back.key, back.meta) == ("moth", "k" * 32, {"backend": "animatic"})
    assert torch.equal(back.tensors["reference_rgba"], bundle.tensors["reference_rgba"])
