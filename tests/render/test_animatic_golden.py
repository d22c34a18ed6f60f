"""Golden slices of animatic pixels, pinned per drawing version.

Every animatic content key includes ANIMATIC_VERSION, so cached chunks are reused as long
as the version stands. A drawing change that forgets to bump it would silently mix stale
cached frames with new ones: these slices fail first. The only way to change them is to
bump ANIMATIC_VERSION (schemas/families.py) and record the new slices under the new
version; the old entries stay as the record of what each version drew.
"""

from __future__ import annotations

import helpers_animatic as h
import numpy as np
import pytest

from reelfarm.render.animatic import ANIMATIC_VERSION
from reelfarm.render.base import load_backend
from reelfarm.schemas.film import AnimaticModel

# Red channel of frames 0 and 11, rows 15::30, columns 20::40, of a 160x90 two-character shot.
GOLDEN = {
    "1": {
        "static": [
            [[25, 25, 25, 25], [36, 255, 200, 44], [33, 254, 197, 33]],
            [[25, 25, 25, 25], [36, 255, 200, 44], [33, 255, 197, 33]]],
        "push_in": [
            [[25, 25, 25, 25], [36, 255, 200, 44], [33, 255, 200, 33]],
            [[29, 29, 29, 29], [36, 255, 202, 45], [34, 255, 200, 34]]],
        "orbit": [
            [[25, 25, 25, 25], [36, 255, 200, 44], [33, 255, 200, 33]],
            [[26, 26, 26, 26], [36, 254, 200, 44], [33, 177, 200, 33]]],
    },
}


@pytest.fixture(scope="module")
def rendered():
    backend = load_backend(AnimaticModel())
    ids = {n: backend.encode_identity(n, h.reference(n), h.sha(n)) for n in ("flame", "moth")}

    def render(move: str) -> np.ndarray:
        frames = backend(h.shot(("flame", "moth"), move=move), h.chunk(0, 12), ids).frames
        return frames[[0, 11]][:, 15::30, 20::40, 0]

    return render


def test_the_current_drawing_version_has_golden_slices():
    assert ANIMATIC_VERSION in GOLDEN, (
        f"ANIMATIC_VERSION {ANIMATIC_VERSION} has no golden slices: record them for the new drawing")


@pytest.mark.parametrize("move", ["static", "push_in", "orbit"])
def test_animatic_pixels_match_the_golden_slices_of_their_version(rendered, move):
    expected = np.array(GOLDEN[ANIMATIC_VERSION][move], dtype=np.int16)
    got = rendered(move).astype(np.int16)
    # One grey level of slack for CPU float differences in grid_sample; a drawing change moves far more.
    np.testing.assert_allclose(got, expected, atol=1, err_msg=(
        "the animatic draws differently: bump ANIMATIC_VERSION and record new golden slices"))
