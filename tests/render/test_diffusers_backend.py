"""The diffusers backend on tiny random-weight pipelines: the real from_pretrained path, chained
chunks, precomputed-vs-stock equality, determinism, input checks and loading errors.

Every family's pipeline is built in code and saved once per session (tiny_pipelines.py);
the backend loads it back with ``from_pretrained``. Nothing is fetched from a hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from reelfarm.errors import BackendError, GpuOutOfMemory
from reelfarm.render.base import ChunkOutput, Condition, load_backend
from reelfarm.render.diffusers import DiffusersBackend
from reelfarm.render.identity import IdentityBundle

try:  # tests/ has no __init__.py: import the helper either way pytest set sys.path
    from tests.render import tiny_pipelines as tp
except ImportError:  # pragma: no cover - depends on how pytest set sys.path
    import tiny_pipelines as tp  # type: ignore[no-redef]

FAMILIES = list(tp.FAMILIES)
SHA = "0" * 64


@pytest.fixture(scope="session")
def tiny_dirs() -> dict[str, Path]:
    """Every family's tiny pipeline, saved with save_pretrained once per session."""
    return {family: tp.saved_model_dir(family) for family in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def backend(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]) -> DiffusersBackend:
    family = request.param
    be = load_backend(tp.tiny_model(family, str(tiny_dirs[family])))
    assert isinstance(be, DiffusersBackend)
    yield be
    be.close()


def _identities(be: DiffusersBackend, **refs: np.ndarray) -> dict[str, IdentityBundle]:
    """Bundles keyed, as in a run, by the hash of each reference's bytes."""
    return {name: be.encode_identity(name, ref, hashlib.sha256(ref.tobytes()).hexdigest())
            for name, ref in refs.items()}  # fmt: skip


# --- rendering ----------------------------------------------------------------------------


def test_two_chained_chunks(backend: DiffusersBackend) -> None:
    family = backend.model.family
    shot = tp.tiny_shot(backend.model)
    ids = _identities(backend, flame=tp.reference_image(48))
    first = backend(shot, shot.chunks[0], ids)
    n = shot.chunks[0].num_frames
    assert isinstance(first, ChunkOutput)
    assert first.frames.shape == (n, tp.TINY_SIZE, tp.TINY_SIZE, 3)
    assert first.frames.dtype == np.uint8
    assert first.frames.std() > 1.0  # a picture, not a constant
    assert isinstance(first.latents, torch.Tensor) and first.latents.device.type == "cpu"
    assert first.meta["seed"] == shot.chunks[0].seed
    assert first.meta["start"] == "keyframe"
    assert set(first.meta["versions"]) == {"torch", "diffusers", "transformers"}
    assert first.meta["versions"]["diffusers"] == __import__("diffusers").__version__

    # The worker hands the next chunk the frame at its start (overlap 1: the last one).
    condition = Condition(image=first.frames[-1], latents=first.latents)
    second = backend(shot, shot.chunks[1], ids, condition)
    assert second.frames.shape == first.frames.shape
    assert second.meta["start"] == ("latents" if family == "ltx" else "image")
    assert not np.array_equal(second.frames, first.frames)
    # Same chunk, same inputs: the same frames, bit for bit.
    again = backend(shot, shot.chunks[1], ids, condition)
    np.testing.assert_array_equal(again.frames, second.frames)
    torch.testing.assert_close(again.latents, second.latents, rtol=0, atol=0)


def test_seed_and_character_change_the_frames(backend: DiffusersBackend) -> None:
    shot = tp.tiny_shot(backend.model)
    chunk = shot.chunks[0]
    ids = _identities(backend, flame=tp.reference_image(48, seed=0))
    base = backend(shot, chunk, ids).frames
    reseeded = backend(shot, chunk.model_copy(update={"seed": chunk.seed + 7}), ids).frames
    assert not np.array_equal(base, reseeded)
    # Another reference: another keyframe (and for Wan/SVD other CLIP embeddings).
    other = _identities(backend, flame=tp.reference_image(48, seed=5))
    assert not np.array_equal(base, backend(shot, chunk, other).frames)


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_matches_stock_pipeline(family: str, tiny_dirs: dict[str, Path]) -> None:
    """Cached identity and shot conditioning give the stock call's frames, bit for bit."""
    model = tp.tiny_model(family, str(tiny_dirs[family]))
    be = DiffusersBackend.load(model)
    try:
        ref = tp.reference_image(tp.TINY_SIZE, seed=3, alpha=False)
        # The stock pipeline takes CLIP from its start image: give the character that image.
        ids = _identities(be, flame=ref)
        shot = tp.tiny_shot(model)
        chunk = shot.chunks[1]
        condition = Condition(image=ref)
        ours = be(shot, chunk, ids, condition)
        with _count_encoders(be.pipe) as warm_calls:
            warm = be(shot, chunk, ids, condition)  # memoised shot conditioning this time
        be.precompute = False
        with _count_encoders(be.pipe) as stock_calls:
            ours_stock = be(shot, chunk, ids, condition)
        stock = be.pipe(**_stock_kwargs(family, model, shot, chunk, ref)).frames[0]
    finally:
        be.close()
    stock = np.clip(np.round(stock * 255.0), 0, 255).astype(np.uint8)
    assert ours.meta["precompute"] and not ours_stock.meta["precompute"]
    # The warm precomputed call ran no encoder (SVD: its VAE encodes noise-augmented pixels).
    assert warm_calls == {name: int(family == "svd" and name == "vae") for name in warm_calls}
    assert all(n >= 1 for n in stock_calls.values()), stock_calls
    np.testing.assert_array_equal(ours.frames, stock)
    np.testing.assert_array_equal(warm.frames, stock)
    np.testing.assert_array_equal(ours_stock.frames, stock)


@contextlib.contextmanager
def _count_encoders(pipe) -> Iterator[dict[str, int]]:
    """Count forward calls of the text encoder, the CLIP image encoder and the VAE encoder."""
    modules = {"text": getattr(pipe, "text_encoder", None),
               "clip": getattr(pipe, "image_encoder", None), "vae": pipe.vae.encoder}  # fmt: skip
    calls = {name: 0 for name, module in modules.items() if module is not None}
    handles = [
        module.register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        for name, module in modules.items() if module is not None
    ]  # fmt: skip
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _stock_kwargs(family, model, shot, chunk, ref) -> dict:
    from PIL import Image

    kw = dict(
        image=Image.fromarray(ref), height=shot.height, width=shot.width,
        num_frames=chunk.num_frames, num_inference_steps=model.steps,
        generator=torch.Generator("cpu").manual_seed(chunk.seed), output_type="np",
    )  # fmt: skip
    if family == "svd":
        kw.update(max_guidance_scale=model.guidance_scale, fps=24)
        return kw
    kw.update(prompt=shot.prompt, negative_prompt=model.negative_prompt,
              guidance_scale=model.guidance_scale)  # fmt: skip
    if family == "ltx":
        kw.update(max_sequence_length=model.max_sequence_length, frame_rate=24.0)
    elif family == "cogvideox":
        kw.update(max_sequence_length=16)  # the transformer's max_text_seq_length
    return kw  # Wan: its default 512 text tokens


def test_identity_bundle(tiny_dirs: dict[str, Path]) -> None:
    be = DiffusersBackend.load(tp.tiny_model("wan", str(tiny_dirs["wan"])))
    try:
        big = np.zeros((600, 300, 3), np.uint8)
        big[100:500, 50:250] = (200, 80, 20)
        bundle = be.encode_identity("ox", big, SHA)
        rgba = bundle.tensors["reference_rgba"]
        assert rgba.dtype == torch.uint8 and tuple(rgba.shape) == (512, 256, 4)
        assert bundle.tensors["clip_hidden"].shape == (1, 17, 8)  # CLIP hidden_states[-2]
        back = IdentityBundle.from_bytes(bundle.to_bytes())  # safetensors, never pickle
        assert back.key == bundle.key and back.meta == bundle.meta
        for name, tensor in bundle.tensors.items():
            torch.testing.assert_close(back.tensors[name], tensor, rtol=0, atol=0)
        # Two characters: Wan concatenates their CLIP token sequences.
        two = tp.tiny_shot(be.model, characters=("flame", "moth"))
        ids = _identities(be, flame=tp.reference_image(48), moth=tp.reference_image(48, seed=9))
        combined = be._identity(two, ids)
        assert combined.shape == (1, 34, 8)
        torch.testing.assert_close(combined[:, 17:], ids["moth"].tensors["clip_hidden"])
        out = be(two, two.chunks[0], ids)
        assert out.frames.shape == (tp.TINY_FRAMES["wan"], 32, 32, 3)
    finally:
        be.close()


def test_svd_averages_characters(tiny_dirs: dict[str, Path]) -> None:
    be = DiffusersBackend.load(tp.tiny_model("svd", str(tiny_dirs["svd"])))
    try:
        ids = _identities(be, flame=tp.reference_image(48), moth=tp.reference_image(48, seed=9))
        two = tp.tiny_shot(be.model, characters=("flame", "moth"))
        combined = be._identity(two, ids)
        mean = (ids["flame"].tensors["clip_embeds"] + ids["moth"].tensors["clip_embeds"]) / 2
        assert combined.shape == (1, 1, 32)
        torch.testing.assert_close(combined, mean)
    finally:
        be.close()


# --- input checks ---------------------------------------------------------------------------


def test_frame_and_size_rules_are_checked_before_the_pipeline(backend: DiffusersBackend) -> None:
    family = backend.model.family
    shot = tp.tiny_shot(backend.model)
    ids = _identities(backend, flame=tp.reference_image(48))
    bad_count = {"wan": 8, "ltx": 13, "cogvideox": 13, "svd": 15}[family]  # 13: 4k+1, not 8k+1
    chunk = shot.chunks[0].model_copy(update={"num_frames": bad_count})
    with pytest.raises(BackendError, match=rf"`num_frames` must be .* got {bad_count}"):
        backend(shot, chunk, ids)
    odd = shot.model_copy(update={"width": 36})
    with pytest.raises(BackendError, match=r"`width` and `height` must be multiples"):
        backend(odd, odd.chunks[0], ids)


def test_refusals(tiny_dirs: dict[str, Path]) -> None:
    model = tp.tiny_model("cogvideox", str(tiny_dirs["cogvideox"]))
    be = DiffusersBackend.load(model)
    try:
        shot = tp.tiny_shot(model)
        ids = _identities(be, flame=tp.reference_image(48))
        bigger = shot.model_copy(update={"width": 64})  # learned positional embeddings: 32 only
        with pytest.raises(BackendError, match="learned positional embeddings fix the size"):
            be(bigger, bigger.chunks[0], ids)
        longer = shot.chunks[0].model_copy(update={"num_frames": 17})
        with pytest.raises(BackendError, match="trained for `num_frames` 9, got 17"):
            be(shot, longer, ids)
        with pytest.raises(BackendError, match="no identity for character 'flame'"):
            be(shot, shot.chunks[0], {})
        with pytest.raises(BackendError, match="no `condition.image` was given"):
            be(shot, shot.chunks[1], ids)
        other = shot.model_copy(update={"model": model.model_copy(update={"dtype": "bfloat16"})})
        with pytest.raises(BackendError, match="this worker holds"):
            be(other, other.chunks[0], ids)
    finally:
        be.close()
    with pytest.raises(BackendError, match="is closed"):
        be(shot, shot.chunks[0], ids)
    be.close()  # twice is fine


def test_reference_continuation_starts_every_chunk_from_the_keyframe(
    tiny_dirs: dict[str, Path],
) -> None:
    model = tp.tiny_model("cogvideox", str(tiny_dirs["cogvideox"]), continuation="reference")
    be = DiffusersBackend.load(model)
    try:
        shot = tp.tiny_shot(model)
        ids = _identities(be, flame=tp.reference_image(48))
        out = be(shot, shot.chunks[1], ids)  # no condition needed
        assert out.meta["start"] == "keyframe" and out.frames.shape == (9, 32, 32, 3)
    finally:
        be.close()


def test_ltx_takes_previous_latents_only_at_a_latent_boundary(tiny_dirs: dict[str, Path]) -> None:
    be = DiffusersBackend.load(tp.tiny_model("ltx", str(tiny_dirs["ltx"])))
    try:
        ids = _identities(be, flame=tp.reference_image(48))
        starts = {}
        for overlap in (1, 2):  # chunk 1 starts at frame 16 (= 8 x 2) or at frame 15
            model = be.model.model_copy(update={"overlap": overlap})
            shot = tp.tiny_shot(model)
            first = be(shot, shot.chunks[0], ids)
            offset = shot.chunks[1].frame_start
            condition = Condition(image=first.frames[offset], latents=first.latents)
            second = be(shot, shot.chunks[1], ids, condition)
            starts[overlap] = second.meta["start"]
            if overlap == 1:
                # The start latent is the previous chunk's last latent frame, kept as frame 0.
                torch.testing.assert_close(second.latents[:, :, :1], first.latents[:, :, 2:3])
        assert starts == {1: "latents", 2: "image"}
    finally:
        be.close()


def test_identity_from_another_model_is_refused(tiny_dirs: dict[str, Path]) -> None:
    from reelfarm.render.animatic import AnimaticBackend

    model = tp.tiny_model("wan", str(tiny_dirs["wan"]))
    be = DiffusersBackend.load(model)
    try:
        shot = tp.tiny_shot(model)
        animatic = {"flame": AnimaticBackend().encode_identity("flame", tp.reference_image(), SHA)}
        with pytest.raises(BackendError, match=r"has no `clip_hidden`"):
            be(shot, shot.chunks[0], animatic)
    finally:
        be.close()


# --- memory ----------------------------------------------------------------------------------


def test_svd_decode_out_of_memory_retries_in_smaller_batches_without_sampling_again(
    tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SVD's temporal VAE has no tiling: its second try decodes fewer frames at a time."""
    model = tp.tiny_model("svd", str(tiny_dirs["svd"]))
    be = DiffusersBackend.load(model)
    try:
        shot = tp.tiny_shot(model, chunks=1)
        ids = _identities(be, flame=tp.reference_image(48))
        vae, unet = be.pipe.vae, be.pipe.unet
        real_decode, calls = vae.decode, {"decode": 0, "denoise": 0, "batch": []}
        unet.register_forward_pre_hook(lambda *_: calls.__setitem__("denoise", calls["denoise"] + 1))

        def decode_once_oom(latents, *args, **kwargs):
            calls["decode"] += 1
            calls["batch"].append(latents.shape[0])
            if calls["decode"] == 1:
                raise torch.cuda.OutOfMemoryError("injected")
            return real_decode(latents, *args, **kwargs)

        monkeypatch.setattr(vae, "decode", decode_once_oom)
        out = be(shot, shot.chunks[0], ids)
        assert out.frames.shape[0] == shot.chunks[0].num_frames
        assert calls["denoise"] == model.steps  # sampled once (SVD batches CFG: 1 UNet call a step)
        assert calls["batch"][0] > max(calls["batch"][1:])  # the retry decoded smaller batches
    finally:
        be.close()


def test_decode_out_of_memory_retries_tiled_without_sampling_again(
    tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the VAE decode raises CUDA's out-of-memory error."""
    model = tp.tiny_model("wan", str(tiny_dirs["wan"]))
    be = DiffusersBackend.load(model)
    try:
        shot = tp.tiny_shot(model)
        ids = _identities(be, flame=tp.reference_image(48))
        expected = be(shot, shot.chunks[0], ids).frames
        vae, transformer = be.pipe.vae, be.pipe.transformer
        real_decode, calls = vae.decode, {"decode": 0, "denoise": 0}
        transformer.register_forward_pre_hook(
            lambda *_: calls.__setitem__("denoise", calls["denoise"] + 1)
        )

        def decode_once_oom(*args, **kwargs):
            calls["decode"] += 1
            if calls["decode"] == 1:
                raise torch.cuda.OutOfMemoryError("injected")
            return real_decode(*args, **kwargs)

        monkeypatch.setattr(vae, "decode", decode_once_oom)
        out = be(shot, shot.chunks[0], ids)
        assert calls["decode"] == 2 and calls["denoise"] == 2 * model.steps  # CFG: 2 per step
        assert out.meta["vae_tiling"] is True and vae.use_tiling
        np.testing.assert_array_equal(out.frames, expected)  # 32 px: below one tile

        def always_oom(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("injected")

        monkeypatch.setattr(vae, "decode", always_oom)
        with pytest.raises(GpuOutOfMemory, match="while decoding"):
            be(shot, shot.chunks[0], ids)
    finally:
        be.close()


def test_low_memory_keeps_rendering(tiny_dirs: dict[str, Path]) -> None:
    model = tp.tiny_model("ltx", str(tiny_dirs["ltx"]), offload="model")  # ignored on CPU
    be = DiffusersBackend.load(model)
    try:
        assert be.offload == "none"
        shot = tp.tiny_shot(model)
        ids = _identities(be, flame=tp.reference_image(48))
        before = be(shot, shot.chunks[0], ids)
        be.low_memory()
        after = be(shot, shot.chunks[0], ids)
        assert after.meta["vae_tiling"] and be.pipe.vae.use_tiling
        np.testing.assert_array_equal(after.frames, before.frames)  # 32 px: below one tile
    finally:
        be.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def test_load_and_close_twenty_times_keeps_rss_flat(tiny_dirs: dict[str, Path]) -> None:
    # SVD: its tiny weights are the largest (~7 MB resident), so a pipeline that is not
    # freed would add ~120 MB over 17 loads; a leaked pipeline was measured failing this.
    model = tp.tiny_model("svd", str(tiny_dirs["svd"]))
    ref = tp.reference_image(48)
    rss = []
    for _ in range(20):
        be = DiffusersBackend.load(model)
        be.encode_identity("flame", ref, SHA)
        be.close()
        rss.append(_rss_mb())
    assert rss[-1] - rss[2] < 50, f"RSS grew {rss[-1] - rss[2]:.1f} MB over 17 loads: {rss}"


# --- loading -----------------------------------------------------------------------------------


def test_wrong_family_is_refused_before_loading(tiny_dirs: dict[str, Path]) -> None:
    model = tp.tiny_model("wan", str(tiny_dirs["ltx"]))
    with pytest.raises(BackendError) as err:
        DiffusersBackend.load(model)
    text = str(err.value)
    assert str(tiny_dirs["ltx"]) in text and "family `wan`" in text
    assert "LTXImageToVideoPipeline" in text and "looks like a `ltx` model" in text


def test_broken_folders_are_refused(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    with pytest.raises(BackendError, match="no model_index.json"):
        DiffusersBackend.load(tp.tiny_model("ltx", str(tmp_path)))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["ltx"], broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(BackendError, match=r"family `ltx`.*from_pretrained failed"):
        DiffusersBackend.load(tp.tiny_model("ltx", str(broken)))


def test_unreachable_models_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BackendError, match=r"`memory://nowhere/model`.*not reachable"):
        DiffusersBackend.load(tp.tiny_model("svd", "memory://nowhere/model"))
    with pytest.raises(BackendError, match="neither a local folder"):
        DiffusersBackend.load(tp.tiny_model("svd", str(tmp_path / "missing")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: never wait for the hub
    t0 = time.perf_counter()
    with pytest.raises(
        BackendError, match=r"`no-such-org/no-such-model`.*not reachable on the hub"
    ):
        DiffusersBackend.load(tp.tiny_model("svd", "no-such-org/no-such-model"))
    assert time.perf_counter() - t0 < 10  # the hub client retries for ~25 s


def test_fsspec_url_is_copied_once_into_the_model_cache(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fsspec

    cache = tmp_path / "cache"
    monkeypatch.setenv("REELFARM_MODEL_CACHE", str(cache))
    mem = fsspec.filesystem("memory")
    url = "memory://reelfarm-test/models/ltx"
    try:
        for path in tiny_dirs["ltx"].rglob("*"):
            if path.is_file():
                mem.pipe(
                    f"{url}/{path.relative_to(tiny_dirs['ltx']).as_posix()}", path.read_bytes()
                )
        model = tp.tiny_model("ltx", url, revision="v1")
        DiffusersBackend.load(model).close()
        (copy,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
        assert (copy / "model_index.json").is_file()
        mem.rm(url, recursive=True)  # gone from the store: the second load reads the cache
        be = DiffusersBackend.load(model)
        shot = tp.tiny_shot(model)
        out = be(shot, shot.chunks[0], _identities(be, flame=tp.reference_image(48)))
        be.close()
        assert out.frames.shape == (17, 32, 32, 3)
        with pytest.raises(BackendError, match="not reachable"):  # another revision: new copy
            DiffusersBackend.load(tp.tiny_model("ltx", url, revision="v2"))
    finally:
        if mem.exists(url):
            mem.rm(url, recursive=True)
    file_url = "file://" + str(tiny_dirs["cogvideox"])
    DiffusersBackend.load(tp.tiny_model("cogvideox", file_url)).close()
