"""The animatic backend: shapes, determinism, seamless chunks, camera moves, slate, staging."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reelfarm.errors import BackendError
from reelfarm.render.animatic import (
    ANIMATIC_VERSION,
    AnimaticBackend,
    keyframe,
)
from reelfarm.render.base import ChunkOutput, load_backend
from reelfarm.render.identity import IdentityBundle, identity_doc, identity_key, reference_rgba
from reelfarm.schemas.film import AnimaticModel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # helpers_animatic sits beside this file
import helpers_animatic as h  # noqa: E402

MOVES = ["pan_left", "pan_right", "tilt_up", "tilt_down", "push_in", "pull_out", "orbit"]


@pytest.fixture(scope="module")
def backend() -> AnimaticBackend:
    return load_backend(AnimaticModel())  # type: ignore[return-value]


@pytest.fixture(scope="module")
def ids(backend: AnimaticBackend) -> dict[str, IdentityBundle]:
    names = ("flame", "moth", "ox")
    return {n: backend.encode_identity(n, h.reference(n), h.sha(n)) for n in names}


def digest(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def best_shift(a: np.ndarray, b: np.ndarray, axis: int, span: int) -> int:
    """The shift s (pixels) for which ``b`` best matches ``a`` moved by s along ``axis``."""
    n = a.shape[axis]
    scores = {}
    for s in range(-span, span + 1):
        lo, hi = max(0, s), min(n, n + s)
        a_part = np.take(a, range(lo - s, hi - s), axis=axis)
        b_part = np.take(b, range(lo, hi), axis=axis)
        scores[s] = mean_diff(a_part, b_part)
    return min(scores, key=scores.get)


# --- output ---------------------------------------------------------------------------
def test_chunk_shape_dtype_and_meta(backend, ids):
    shot = h.shot(("flame", "moth"), width=160, height=90)
    out = backend(shot, h.chunk(4, 10, seed=42), ids)
    assert isinstance(out, ChunkOutput)
    assert out.frames.shape == (10, 90, 160, 3) and out.frames.dtype == np.uint8
    assert out.latents is None
    assert out.meta["seed"] == 42 and out.meta["backend"] == "animatic"
    assert out.meta["versions"]["torch"] == torch.__version__
    assert out.frames.std() > 10  # a picture, not a flat fill


def test_portrait_and_odd_sizes_render(backend, ids):
    out = backend(h.shot(("flame",), width=72, height=128, move="orbit"), h.chunk(0, 3), ids)
    assert out.frames.shape == (3, 128, 72, 3)


# --- determinism ----------------------------------------------------------------------
def test_same_inputs_same_bytes(backend, ids):
    shot = h.shot(("flame", "moth"), move="orbit", slate=True)
    first = backend(shot, h.chunk(0, 12), ids).frames
    backend.close()  # drops the memoised layers: the second call rebuilds them
    fresh = AnimaticBackend.load(AnimaticModel())
    again = {n: fresh.encode_identity(n, h.reference(n), h.sha(n)) for n in ("flame", "moth")}
    assert np.array_equal(first, fresh(shot, h.chunk(0, 12), again).frames)


def test_same_bytes_in_another_process(backend, ids):
    shot = h.shot(("flame", "moth"), move="push_in", slate=True)
    local = digest(backend(shot, h.chunk(3, 9), ids).frames)
    script = f"""
import hashlib, sys
sys.path.insert(0, {str(HERE)!r})
import helpers_animatic as h
import torch
torch.set_num_threads(1)  # a worker with another thread count draws the same bytes
from reelfarm.render.animatic import AnimaticBackend
b = AnimaticBackend()
ids = {{n: b.encode_identity(n, h.reference(n), h.sha(n)) for n in ("flame", "moth")}}
shot = h.shot(("flame", "moth"), move="push_in", slate=True)
print(hashlib.sha256(b(shot, h.chunk(3, 9), ids).frames.tobytes()).hexdigest())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == local


@pytest.mark.parametrize("move", ["static", *MOVES])
def test_frame_is_the_same_in_any_chunk(backend, ids, move):
    shot = h.shot(("flame", "moth", "ox"), move=move, frames=24, slate=True)
    a = backend(shot, h.chunk(0, 20), ids).frames  # frames 0..19
    b = backend(shot, h.chunk(13, 17, seed=99), ids).frames  # 13..29, past the shot's end
    assert np.array_equal(a[13:20], b[:7])
    single = backend(shot, h.chunk(17, 1), ids).frames[0]
    assert np.array_equal(single, a[17])


def test_keyframe_is_the_frame_without_slate(backend, ids):
    shot = h.shot(("flame", "moth"), move="pan_right", slate=False)
    frames = backend(shot, h.chunk(0, 8), ids).frames
    kf = keyframe(shot, ids, 5)
    assert kf.shape == (90, 160, 3) and kf.dtype == np.uint8
    assert np.array_equal(kf, frames[5])


# --- camera -----------------------------------------------------------------------------
@pytest.mark.parametrize("move", MOVES)
def test_each_camera_move_moves_the_image(backend, ids, move):
    static = backend(h.shot(("flame",), move="static"), h.chunk(0, 24), ids).frames
    moving = backend(h.shot(("flame",), move=move), h.chunk(0, 24), ids).frames
    still, moved = mean_diff(static[0], static[-1]), mean_diff(moving[0], moving[-1])
    assert moved > 3 * still and moved > 4, (move, moved, still)


@pytest.mark.parametrize(
    ("move", "axis", "sign"),
    [("pan_left", 1, 1), ("pan_right", 1, -1), ("tilt_up", 0, 1), ("tilt_down", 0, -1)],
)
def test_pans_and_tilts_go_the_right_way(backend, ids, move, axis, sign):
    # No characters: the backdrop alone shows how the camera moved.
    shot = h.shot((), move=move, amount=0.2, frames=25, width=160, height=90)
    frames = backend(shot, h.chunk(0, 25), ids).frames
    expected = 0.5 * 0.2 * (160 if axis == 1 else 90)  # half a frame per unit of amount
    shift = best_shift(frames[0], frames[-1], axis=axis, span=20)
    assert shift == pytest.approx(sign * expected, abs=1.5)


def test_motion_continues_past_the_shots_end(backend, ids):
    shot = h.shot((), move="pan_right", amount=0.2, frames=25)
    frames = backend(shot, h.chunk(24, 25), ids).frames  # frames 24..48, the shot has 25
    assert best_shift(frames[0], frames[-1], axis=1, span=20) == pytest.approx(-16, abs=1.5)
    assert all(f.std() > 5 for f in frames)  # the backdrop never runs out


def test_orbit_has_parallax(backend, ids):
    """Circling the characters, the backdrop slides one way and the characters the other."""
    bare = backend(h.shot((), move="orbit", frames=24), h.chunk(0, 24), ids).frames
    cast = backend(h.shot(("flame",), move="orbit", frames=24), h.chunk(0, 24), ids).frames

    def centre_x(n: int) -> float:
        mask = np.abs(cast[n].astype(np.int16) - bare[n].astype(np.int16)).max(axis=2) > 40
        return float(np.nonzero(mask)[1].mean())

    figure = centre_x(-1) - centre_x(0)
    backdrop = best_shift(bare[0][:40], bare[-1][:40], axis=1, span=50)
    assert backdrop > 10 and figure < -2, (backdrop, figure)


# --- slate and staging --------------------------------------------------------------------
def test_slate_burns_in_top_left_only(backend, ids):
    plain = backend(h.shot(("flame",), slate=False), h.chunk(0, 3), ids).frames
    slated = backend(h.shot(("flame",), slate=True), h.chunk(0, 3), ids).frames
    changed = np.nonzero((plain != slated).any(axis=(0, 3)))
    assert changed[0].size > 200
    assert changed[0].max() < 90 // 3 and changed[1].max() < 160 * 0.9  # top, left


def test_slate_shows_the_frame_number(backend, ids):
    shot = h.shot((), slate=True)  # static and no characters: only the slate can change
    frames = backend(shot, h.chunk(0, 2), ids).frames
    assert not np.array_equal(frames[0], frames[1])
    assert np.array_equal(frames[0][40:], frames[1][40:])


def test_a_character_appears_in_its_place(backend, ids):
    empty = backend(h.shot(()), h.chunk(0, 1), ids).frames[0]
    alone = backend(h.shot(("flame",)), h.chunk(0, 1), ids).frames[0]
    centre = (slice(45, 80), slice(65, 95))
    corner = (slice(0, 20), slice(0, 30))
    assert mean_diff(alone[centre], empty[centre]) > 40
    assert np.array_equal(alone[corner], empty[corner])


def test_characters_are_staged_left_to_right(backend, ids):
    frame = backend(h.shot(("flame", "moth")), h.chunk(0, 1), ids).frames[0].astype(np.int16)

    def centre_x(colour: tuple[int, int, int]) -> float:
        near = np.abs(frame - np.array(colour, np.int16)).max(axis=2) < 12
        assert near.sum() > 30, colour
        return float(np.nonzero(near)[1].mean())

    flame, moth = centre_x(h.COLOURS["flame"]), centre_x(h.COLOURS["moth"])
    assert flame < 80 < moth


def test_characters_move_gently_on_a_static_shot(backend, ids):
    frames = backend(h.shot(("flame",), move="static"), h.chunk(0, 24), ids).frames
    steps = [mean_diff(frames[i], frames[i + 1]) for i in range(23)]
    assert all(0 < s < 2 for s in steps)  # alive, but no jumps...
    assert max(steps) < 2.5 * float(np.median(steps))  # ...and smooth from frame to frame


# --- identities ---------------------------------------------------------------------------
def test_encode_identity_makes_a_fitting_cutout(backend):
    big = np.zeros((700, 350, 4), np.uint8)
    big[100:600, 50:300] = (250, 120, 20, 255)
    bundle = backend.encode_identity("flame", big, h.sha("big"))
    rgba = bundle.tensors["reference_rgba"]
    assert rgba.dtype == torch.uint8 and tuple(rgba.shape) == (512, 256, 4)
    assert rgba[0, 0, 3] == 0 and rgba[256, 128, 3] == 255
    assert bundle.key == identity_key(AnimaticModel(), h.sha("big"))
    assert identity_doc(AnimaticModel()) == {"cutout": ANIMATIC_VERSION, "max_side": 512}
    back = IdentityBundle.from_bytes(bundle.to_bytes())
    assert back.character == "flame" and torch.equal(back.tensors["reference_rgba"], rgba)


def test_opaque_reference_gets_a_soft_cutout():
    rgba = reference_rgba(h.reference("flame", opaque=True))
    assert rgba.shape == (64, 48, 4)
    alpha = rgba[..., 3]
    assert alpha[0, 0] == 0 and alpha[32, 24] == 255
    assert 0 < alpha[32, 2] < 255  # feathered, not a hard edge


def test_missing_identity_names_the_character(backend, ids):
    with pytest.raises(BackendError, match="'dragon'"):
        backend(h.shot(("flame", "dragon")), h.chunk(0, 2), ids)


def test_bad_reference_rgba_names_the_character(backend):
    bad = IdentityBundle("moth", "k", {"reference_rgba": torch.zeros(8, 8, 3, dtype=torch.uint8)})
    with pytest.raises(BackendError, match="'moth'.*reference_rgba"):
        backend(h.shot(("moth",)), h.chunk(0, 1), {"moth": bad})


def test_bad_reference_image_is_refused(backend):
    with pytest.raises(BackendError, match="'moth'"):
        backend.encode_identity("moth", np.zeros((8, 8), np.float32), h.sha("x"))


def test_bad_chunk_is_refused(backend, ids):
    with pytest.raises(BackendError, match="num_frames"):
        backend(h.shot(("flame",)), h.chunk(0, 1).model_copy(update={"num_frames": 0}), ids)


def test_meta_is_json(backend, ids):
    out = backend(h.shot(("flame",)), h.chunk(0, 1), ids)
    back = json.loads(json.dumps(out.meta))
    assert back == out.meta
    assert back["versions"]["animatic"] == ANIMATIC_VERSION and back["seed"] == 1
