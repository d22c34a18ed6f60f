"""Wan 2.1 VACE reference-to-video on a tiny random-weight pipeline (save_pretrained, then
from_pretrained through DiffusersBackend): several characters as references, chained
chunks through VACE's video-and-mask conditioning, stock-vs-precomputed equality, and the
spec check on how many characters a shot may name."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from reelfarm.errors import SpecError
from reelfarm.render.base import Condition
from reelfarm.render.diffusers import DiffusersBackend
from reelfarm.render.identity import IdentityBundle

try:  # tests/ has no __init__.py: import the helper either way pytest set sys.path
    from tests.render import tiny_pipelines as tp
except ImportError:  # pragma: no cover - depends on how pytest set sys.path
    import tiny_pipelines as tp  # type: ignore[no-redef]


@pytest.fixture(scope="module")
def backend() -> DiffusersBackend:
    be = DiffusersBackend.load(tp.tiny_model("wan_vace", str(tp.saved_model_dir("wan_vace")),
                                             overlap=5))  # fmt: skip
    yield be
    be.close()


def _refs() -> dict[str, np.ndarray]:
    return {"flame": tp.reference_image(48), "moth": tp.reference_image(40, seed=9)}


def _identities(be: DiffusersBackend, refs: dict[str, np.ndarray]) -> dict[str, IdentityBundle]:
    return {name: be.encode_identity(name, ref, hashlib.sha256(ref.tobytes()).hexdigest())
            for name, ref in refs.items()}  # fmt: skip


def _over_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:].astype(np.float32) / 255.0
    return np.round(rgba[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _count_vae_encodes(pipe) -> dict[str, int]:
    """Wrap the VAE's encode: one-frame inputs are references, longer ones the chunk video."""
    calls = {"reference": 0, "video": 0}
    real = pipe.vae.encode

    def encode(x, *args, **kwargs):
        calls["reference" if x.shape[2] == 1 else "video"] += 1
        return real(x, *args, **kwargs)

    pipe.vae.encode = encode
    return calls


def test_two_characters_two_chained_chunks(backend: DiffusersBackend) -> None:
    ids = _identities(backend, _refs())
    # Transparency: the reference the pipeline gets is the cut-out over white.
    flame = ids["flame"].tensors["vace_reference"].numpy()
    np.testing.assert_array_equal(flame, _over_white(_refs()["flame"]))
    assert (flame[0, 0] == 255).all()  # a transparent corner is white
    back = IdentityBundle.from_bytes(ids["moth"].to_bytes())  # stored like every bundle
    torch.testing.assert_close(back.tensors["vace_reference"], ids["moth"].tensors["vace_reference"])

    shot = tp.tiny_shot(backend.model, characters=("flame", "moth"))
    backend.clear_cache()
    calls = _count_vae_encodes(backend.pipe)
    try:
        first = backend(shot, shot.chunks[0], ids)
        frame = shot.continuation_frame(shot.chunks[1])
        condition = Condition(image=first.frames[frame], latents=first.latents)
        second = backend(shot, shot.chunks[1], ids, condition)
        again = backend(shot, shot.chunks[1], ids, condition)
    finally:
        del backend.pipe.vae.encode
    # Each character's reference latent was encoded once for the three calls; each call
    # encodes its video twice (VACE's known and to-generate halves).
    assert calls == {"reference": 2, "video": 6}
    assert first.frames.shape == second.frames.shape == (9, 32, 32, 3)
    assert first.frames.std() > 1.0
    # The chunk's latents are the video's: the two reference frames are stripped.
    assert tuple(first.latents.shape) == (1, 16, 3, 4, 4)
    assert first.meta["start"] == "keyframe" and second.meta["start"] == "latents"
    assert frame == 4
    # The known frames are the previous chunk's 5 overlap frames, decoded from its latents.
    runner = backend._live()
    with torch.inference_mode():
        known = runner.start_latent(first.latents, frame).numpy()
    assert known.shape == (5, 32, 32, 3)
    assert np.abs(known.astype(int) - first.frames[4:].astype(int)).max() <= 1
    assert not np.array_equal(second.frames, first.frames)
    np.testing.assert_array_equal(again.frames, second.frames)  # deterministic
    # Pinned values: a silent change in what goes into the pipeline fails here.
    assert first.frames.astype(np.int64).sum() == pytest.approx(EXPECTED_FIRST_SUM, abs=300)
    # The order of the characters is the order of the references: it changes the frames.
    swapped = tp.tiny_shot(backend.model, characters=("moth", "flame"))
    assert not np.array_equal(backend(swapped, swapped.chunks[0], ids).frames, first.frames)


EXPECTED_FIRST_SUM = 3232462  # uint8 sum of the first chunk (2 threads, CPU)


@pytest.mark.parametrize("chunk_index", [0, 1])
def test_precomputed_matches_stock_pipeline(backend: DiffusersBackend, chunk_index: int) -> None:
    """Cached prompt embeddings and reference latents give the stock call's frames, bit for bit."""
    from PIL import Image

    refs = _refs()
    ids = _identities(backend, refs)
    shot = tp.tiny_shot(backend.model, characters=("flame", "moth"))
    chunk = shot.chunks[chunk_index]
    start = tp.reference_image(32, seed=3, alpha=False)
    condition = Condition(image=start) if chunk_index else None
    backend.clear_cache()
    ours = backend(shot, chunk, ids, condition)
    calls = _count_vae_encodes(backend.pipe)
    try:
        warm = backend(shot, chunk, ids, condition)
        assert calls == {"reference": 0, "video": 2}  # references come from the memo
        backend.precompute = False
        ours_stock = backend(shot, chunk, ids, condition)
        assert calls == {"reference": 2, "video": 4}
    finally:
        backend.precompute = True
        del backend.pipe.vae.encode
    if chunk_index:
        first = start
    else:  # chunk 0 starts from the animatic keyframe
        from reelfarm.render.animatic import keyframe

        first = keyframe(shot, ids, chunk.frame_start)[..., :3]
    n, size = chunk.num_frames, (shot.width, shot.height)
    model = backend.model
    stock = backend.pipe(
        prompt=shot.prompt, negative_prompt=model.negative_prompt,
        video=[Image.fromarray(np.ascontiguousarray(first))]
        + [Image.new("RGB", size, (128, 128, 128))] * (n - 1),
        mask=[Image.new("L", size, 0)] + [Image.new("L", size, 255)] * (n - 1),
        reference_images=[Image.fromarray(_over_white(refs[c])) for c in shot.characters],
        height=shot.height, width=shot.width, num_frames=n, num_inference_steps=model.steps,
        guidance_scale=model.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(chunk.seed), output_type="np",
    ).frames[0]  # fmt: skip
    stock = np.clip(np.round(stock * 255.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(ours.frames, stock)
    np.testing.assert_array_equal(warm.frames, stock)
    np.testing.assert_array_equal(ours_stock.frames, stock)


FILM = """\
reelfarm: 1
title: Four at once
resolution: [64, 32]
model: {backend: diffusers, family: wan_vace, id: Wan-AI/Wan2.1-VACE-1.3B-diffusers}
characters:
  a: {reference: a.png}
  b: {reference: b.png}
  c: {reference: c.png}
  d: {reference: d.png}
scenes:
  - id: s01
    shots:
      - id: s01_010
        frames: 9
        prompt: three friends
        characters: [a, b, c]
      - id: s01_020
        frames: 9
        prompt: four friends
        characters: [a, b, c, d]
"""


def test_more_characters_than_references_is_refused_at_load(tmp_path: Path) -> None:
    from reelfarm.schemas import load_film

    path = tmp_path / "film.yaml"
    path.write_text(textwrap.dedent(FILM))
    with pytest.raises(SpecError) as err:
        load_film(path, hash_references=False)
    assert len(err.value.issues) == 1, str(err.value)
    text = str(err.value.issues[0])
    assert "shot 's01_020'" in text and "`characters`" in text and "at most 3" in text
    assert "['a', 'b', 'c', 'd']" in text and "wan_vace" in text
    # Three characters are fine.
    path.write_text(textwrap.dedent(FILM).replace("[a, b, c, d]", "[a, b, d]"))
    assert load_film(path, hash_references=False).scenes[0].shots[1].characters == ("a", "b", "d")
