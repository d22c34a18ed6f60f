"""The chunk frames codec: FFV1 (lossless) in Matroska, in memory, bit-exact RGB.

What the chunk store writes as ``frames.mkv`` and stitching reads back. No storage here:
bytes in, bytes out.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np

__all__ = ["CONTAINER_RATE", "check_frames", "decode_frame", "decode_frames", "encode_frames", "ffv1_pix_fmt"]

# The frame rate written into the container. The store keeps frames, not timing: the plan
# owns the film's frame rate, and stitching sets it again.
CONTAINER_RATE = 24




@functools.cache
def ffv1_pix_fmt() -> str:
    """``gbrp`` where this FFmpeg's FFV1 encoder takes 8-bit planar RGB, else ``bgr0``."""
    import av

    formats = {f.name for f in (av.codec.Codec("ffv1", "w").video_formats or ())}
    return "gbrp" if "gbrp" in formats else "bgr0"


def encode_frames(frames: np.ndarray, *, rate: int = CONTAINER_RATE) -> bytes:
    """Encode ``T x H x W x 3`` uint8 RGB frames losslessly (FFV1 in Matroska).

    Args:
        frames: the frames, uint8 RGB.
        rate: frame rate written into the container.

    Returns:
        The Matroska file as bytes.
    """
    import av

    check_frames(frames)
    num_frames, height, width, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = ffv1_pix_fmt()
        # Version 3 codes slices independently (so both cores work) and CRCs each slice.
        stream.codec_context.options = {"level": "3", "slicecrc": "1"}
        stream.codec_context.thread_type = "SLICE"
        for i in range(num_frames):
            # The encoder converts rgb24 to its planar/padded RGB format: a pure reshuffle.
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def decode_frames(data: bytes, *, num_frames: int | None = None) -> np.ndarray:
    """Decode what :func:`encode_frames` wrote back to ``T x H x W x 3`` uint8 RGB.

    Args:
        data: the Matroska file.
        num_frames: the expected frame count, when known: frames are then decoded straight
            into one array (no second copy), and any other count is an error.

    Raises:
        ValueError: no frames, or not ``num_frames`` of them; ``av`` errors for a bad file.
    """
    import av

    out: np.ndarray | None = None
    pending: list[np.ndarray] = []
    count = 0
    with av.open(io.BytesIO(data), mode="r", format="matroska") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            rgb = _rgb_view(frame)
            if num_frames is None:
                pending.append(rgb)  # views keep their frames alive until the stack
            else:
                if count >= num_frames:
                    raise ValueError(f"more than the {num_frames} frames expected")
                if out is None:
                    out = np.empty((num_frames, *rgb.shape), np.uint8)
                out[count] = rgb
            count += 1
    if count == 0:
        raise ValueError("no video frames in the file")
    if num_frames is None:
        return np.stack(pending)
    if count != num_frames or out is None:
        raise ValueError(f"{count} frames, {num_frames} expected")
    return out


def decode_frame(data: bytes, index: int, *, num_frames: int) -> np.ndarray:
    """Frame ``index`` of what :func:`encode_frames` wrote, ``H x W x 3`` uint8 RGB, without
    decoding the frames before it: every FFV1 frame is a keyframe, so a seek lands on it.
    (A chained chunk needs one frame of the chunk before it, usually near its end.)

    Raises:
        ValueError: ``index`` outside ``0..num_frames - 1``, or the file does not have it.
    """
    import av

    if not 0 <= index < num_frames:
        raise ValueError(f"frame {index} of a {num_frames}-frame chunk")
    with av.open(io.BytesIO(data), mode="r", format="matroska") as container:
        stream = container.streams.video[0]
        rate, base = stream.average_rate or stream.base_rate, stream.time_base
        if rate and base and index:
            container.seek(int(round(index / (rate * base))), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            at = int(round(frame.pts * base * rate)) if frame.pts is not None and rate and base else None
            if at is None:  # no timestamps to go by: count from the start instead
                break
            if at == index:
                return np.ascontiguousarray(_rgb_view(frame))
            if at > index:
                break
    return decode_frames(data, num_frames=num_frames)[index]  # the slow way, still right


def _rgb_view(frame: Any) -> np.ndarray:
    """``H x W x 3`` RGB of a decoded frame; a view into it where the format allows."""
    if frame.format.name == "bgr0":
        # Fast path: view the packed B,G,R,pad plane and reorder in numpy.
        plane = frame.planes[0]
        packed = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
        return packed[:, : frame.width * 4].reshape(frame.height, frame.width, 4)[..., 2::-1]
    return frame.to_ndarray(format="rgb24")


def check_frames(frames: Any) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(
            f"`frames` must be a uint8 numpy array, got {type(frames).__name__}"
            f"{'' if not isinstance(frames, np.ndarray) else ' of ' + str(frames.dtype)}"
        )
    if frames.ndim != 4 or frames.shape[3] != 3 or 0 in frames.shape:
        raise ValueError(f"`frames` must be T x H x W x 3 with T, H, W > 0, got {frames.shape}")
