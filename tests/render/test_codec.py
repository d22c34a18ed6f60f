"""The chunk frames codec: FFV1 in Matroska, bit-exact RGB."""

from __future__ import annotations

import numpy as np
import pytest

from reelfarm.render import codec
from reelfarm.render.codec import decode_frame, decode_frames, encode_frames


def _frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), np.uint8)


@pytest.mark.parametrize("shape", [(3, 18, 32), (2, 17, 33)])
def test_codec_round_trip_is_bit_exact(shape: tuple[int, int, int]) -> None:
    frames = _frames(*shape)
    data = encode_frames(frames)
    np.testing.assert_array_equal(decode_frames(data), frames)
    np.testing.assert_array_equal(decode_frames(data, num_frames=shape[0]), frames)
    for wrong in (shape[0] - 1, shape[0] + 1):
        with pytest.raises(ValueError, match="frames"):
            decode_frames(data, num_frames=wrong)


@pytest.mark.parametrize("num_frames", [1, 2, 17, 81])
def test_one_frame_is_decoded_by_seeking_to_it(num_frames: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every frame alone equals the same frame of the whole decode, and no frame needs the
    whole decode (its fallback is made to fail here)."""
    frames = _frames(num_frames, 18, 32, seed=num_frames)
    data = encode_frames(frames)

    def whole(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded the whole chunk for one frame")

    monkeypatch.setattr(codec, "decode_frames", whole)
    for i in range(num_frames):
        np.testing.assert_array_equal(decode_frame(data, i, num_frames=num_frames), frames[i])
    for bad in (-1, num_frames):
        with pytest.raises(ValueError, match="frame"):
            decode_frame(data, bad, num_frames=num_frames)
