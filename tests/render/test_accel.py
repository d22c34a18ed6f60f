"""The ``accel:`` block on the tiny pipelines: each option that runs on CPU renders, stays
within a stated tolerance of stock, and the options that change pixels change content keys.

Tolerance (8-bit frames, random weights, 4 steps): an option that changes pixels keeps the
mean absolute difference from stock at most ``MEAN_TOL`` levels; options that should not
change pixels (group offload, VAE slicing) match stock bit for bit. Caches are checked to
engage (the frames differ from stock), so a hook that silently does nothing fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from reelfarm.errors import BackendError
from reelfarm.flows.plan import plan_film
from reelfarm.render.diffusers import DiffusersBackend
from reelfarm.schemas.film import DiffusersModel, Film

try:
    from tests.render import tiny_pipelines as tp
except ImportError:  # pragma: no cover - depends on how pytest set sys.path
    import tiny_pipelines as tp  # type: ignore[no-redef]

MEAN_TOL = 4.0  # 8-bit levels, mean |frames - stock|: fp8 weights
CACHE_TOL = 6.0  # step caches skip whole steps: a little more
DECODE_TOL = 12.0  # SVD's temporal decoder loses context across decode chunks
STEPS = 4
_pipes: dict[str, object] = {}
_stock: dict[str, np.ndarray] = {}


def _model(family: str, **accel: object) -> DiffusersModel:
    fields: dict = dict(backend="diffusers", family=family, id="tiny", steps=STEPS,
                        dtype="float32", chunk_frames=tp.TINY_FRAMES[family], overlap=1,
                        guidance_scale=3.0 if family == "svd" else 5.0, negative_prompt="blurry",
                        accel=accel)  # fmt: skip
    if family == "ltx":
        fields["max_sequence_length"] = tp.TINY_TEXT["ltx"]
    return DiffusersModel(**fields)


def _render(family: str, **accel: object) -> tuple[np.ndarray, DiffusersBackend]:
    torch.set_num_threads(2)
    if family not in _pipes:
        _pipes[family] = tp.build_pipeline(family)
    # A fresh copy of the stock weights per render: hooks and fp8 casts change the modules.
    import copy

    be = DiffusersBackend.from_pipeline(copy.deepcopy(_pipes[family]), _model(family, **accel))
    shot = tp.tiny_shot(be.model, chunks=1)
    ids = {"flame": be.encode_identity("flame", tp.reference_image(48), "0" * 64)}
    return be(shot, shot.chunks[0], ids).frames.astype(np.float32), be


def _stock_frames(family: str) -> np.ndarray:
    if family not in _stock:
        _stock[family] = _render(family)[0]
    return _stock[family]


CACHES = [("wan", {"kind": "first_block", "threshold": 0.05}), ("wan", {"kind": "mag"}),
          ("ltx", {"kind": "taylorseer"}), ("cogvideox", {"kind": "mag"}),
          ("cogvideox", {"kind": "faster"})]  # fmt: skip


# FasterCache's frequency split calls torch.meshgrid without `indexing` (diffusers 0.42).
@pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")
@pytest.mark.parametrize(("family", "cache"), CACHES, ids=[f"{f}-{c['kind']}" for f, c in CACHES])
def test_cache_engages_and_stays_near_stock(family: str, cache: dict) -> None:
    stock = _stock_frames(family)
    frames, be = _render(family, cache=cache)
    assert be.accel["cache"] == cache["kind"]
    diff = np.abs(frames - stock)
    assert diff.max() > 0, "the cache hook changed nothing: it did not engage"
    assert diff.mean() <= CACHE_TOL
    again, _ = _render(family, cache=cache)  # the hook's state is reset per chunk
    np.testing.assert_array_equal(again, frames)


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_fp8_weights_stay_near_stock(family: str) -> None:
    frames, be = _render(family, weights="fp8")
    assert be.accel["weights"] == "fp8"
    weights = [p for n, p in be.pipe.transformer.named_parameters() if "blocks" in n]
    assert any(p.dtype == torch.float8_e4m3fn for p in weights)
    diff = np.abs(frames - _stock_frames(family))
    assert 0 < diff.mean() <= MEAN_TOL


def test_group_offload_and_slicing_leave_pixels_alone() -> None:
    frames, be = _render("ltx", group_offload="block", vae_slicing=True)
    assert be.offload == "group" and be.accel["group_offload"] == "block"
    np.testing.assert_allclose(frames, _stock_frames("ltx"), atol=1.0)


@pytest.mark.slow  # SVD's tiny UNet takes about 30 s per render on two cores
def test_svd_decode_chunk_stays_near_stock() -> None:
    frames, be = _render("svd", decode_chunk=4)
    assert be._live().decode_chunk == 4
    diff = np.abs(frames - _stock_frames("svd"))
    assert 0 < diff.mean() <= DECODE_TOL


def test_fit_to_gpu_never_changes_pixels_behind_the_content_key() -> None:
    be = DiffusersBackend.from_pipeline(tp.build_pipeline("svd"), _model("svd"))
    # A real SVD-XT chunk on a 24 GiB card fits only with a chunked decode, which changes
    # pixels: the backend does not add it (the key was fixed without it), the decode stays whole.
    assert be.fit_to_gpu(1024, 576, 25, gpu_gib=24) is None
    assert be._live().decode_chunk is None and not be.vae_tiling
    fit = be.fit_to_gpu(1024, 576, 25, gpu_gib=141)
    assert fit.offload == "none" and fit.decode_chunk is None
    # Asked for in the spec (and so in the key), the chunked decode is what makes it fit.
    own = DiffusersBackend.from_pipeline(tp.build_pipeline("svd"), _model("svd", decode_chunk=4))
    fit = own.fit_to_gpu(1024, 576, 25, gpu_gib=24)
    assert fit is not None and fit.decode_chunk == 4 and not fit.changes_pixels
    assert own._live().decode_chunk == 4


@pytest.mark.slow
def test_regional_compile_matches_stock() -> None:
    frames, be = _render("ltx", compile=True)
    assert be.accel.get("compile") is True
    np.testing.assert_allclose(frames, _stock_frames("ltx"), atol=2.0)


# --- refusals: before any chunk starts -----------------------------------------------------


@pytest.mark.parametrize("kernel", ["sage", "flash", "cudnn"])
def test_cuda_kernels_are_refused_on_a_cpu_worker(kernel: str) -> None:
    with pytest.raises(BackendError, match=rf"`accel.attention` '{kernel}' needs a CUDA device"):
        DiffusersBackend.from_pipeline(tp.build_pipeline("wan"), _model("wan", attention=kernel))


def test_first_block_cache_needs_two_blocks() -> None:
    with pytest.raises(BackendError, match=r"`accel.cache.kind` 'first_block' needs at least 2"):
        DiffusersBackend.from_pipeline(tp.build_pipeline("ltx"),
                                       _model("ltx", cache={"kind": "first_block"}))


@pytest.mark.parametrize(("family", "accel", "message"), [
    ("svd", {"cache": {"kind": "mag"}}, "`accel.cache.kind` 'mag' cannot run on the svd family"),
    ("wan", {"cache": {"kind": "faster"}}, "`accel.cache.kind` 'faster' cannot run on the wan"),
    ("svd", {"attention": "flash"}, "`accel.attention` must be 'native' for svd"),
    ("cogvideox", {"attention": "sage"}, "`accel.attention` must be 'native' for cogvideox"),
    ("wan", {"attention": "xformers9"}, "attention"),
    ("ltx", {"decode_chunk": 4}, "`accel.decode_chunk` is read by svd only"),
    ("svd", {"compile": True}, "`accel.compile` is not available for svd"),
    ("wan", {"cache": {"kind": "taylorseer", "threshold": 0.1}}, "`threshold` is read by"),
])  # fmt: skip
def test_spec_refuses_what_the_family_cannot_do(family: str, accel: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _model(family, **accel)


# --- content keys ---------------------------------------------------------------------------


def _keys(**accel: object) -> list[str]:
    model = {"backend": "diffusers", "family": "wan", "id": "org/wan", "accel": accel}
    film = Film(title="t", model=model, scenes=[{"id": "s01", "shots": [
        {"id": "s01_010", "frames": 100, "prompt": "a moth"}]}])  # fmt: skip
    return [c.key for c in plan_film(film).chunks]


def test_pixel_options_change_content_keys_and_others_do_not() -> None:
    base = _keys()
    for pixels in ({"attention": "sage"}, {"weights": "fp8"}, {"cache": {"kind": "mag"}},
                   {"cache": {"kind": "mag", "threshold": 0.1}}):  # fmt: skip
        keys = _keys(**pixels)
        assert all(a != b for a, b in zip(keys, base)), pixels
    assert _keys(cache={"kind": "mag", "threshold": 0.1}) != _keys(cache={"kind": "mag"})
    for neutral in ({"compile": True}, {"group_offload": "leaf", "blocks_per_group": 2},
                    {"vae_slicing": True}, {"attention": "native"}):  # fmt: skip
        assert _keys(**neutral) == base, neutral
