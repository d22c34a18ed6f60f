"""Seams: a shot's chunks blended over their overlaps, and how visible each seam is.

Overlaps are blended in pixels (a linear crossfade); each chunk boundary gets a seam score,
the step across it over the usual step inside the chunks. :data:`SEAM_WARN` is the one
threshold above which a seam is flagged (report in red, timeline marker in red).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from reelfarm.errors import PlanError, StoreError
from reelfarm.schemas.plan import ChunkPlan, ShotPlan, ordered_chunks

__all__ = ["SEAM_EPS", "SEAM_WARN", "blend_chunks", "iter_blended", "seam_score"]

# Below half a grey level a difference is invisible; added to both sides of the seam ratio
# so static shots score 1.0 instead of dividing by zero.
SEAM_EPS = 0.5
SEAM_WARN = 2.0  # seam scores above this are flagged: a jump twice the footage's own motion


def _used(shot: ShotPlan, chunk: ChunkPlan, frames: Any) -> np.ndarray:
    """The frames a chunk contributes; anything malformed is a corrupt chunk (StoreError)."""
    need = chunk.frame_end - chunk.frame_start
    ok = (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
          and frames.shape[1:] == (shot.height, shot.width, 3) and frames.shape[0] >= need)
    if not ok:
        shape = getattr(frames, "shape", type(frames).__name__)
        raise StoreError(f"chunk `{chunk.key}` ({chunk.name}) holds {shape}, stitching needs at "
                         f"least {need} x {shot.height} x {shot.width} x 3 uint8", keys=(chunk.key,))
    return frames[:need]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def _motion(frames: np.ndarray) -> tuple[float, int]:
    """Sum of frame-to-frame mean absolute differences, and how many pairs."""
    total = sum(_mad(frames[i], frames[i + 1]) for i in range(len(frames) - 1))
    return total, max(len(frames) - 1, 0)


def seam_score(across: float, within: float) -> float:
    """How visible a seam is: the step across it over the usual step inside the chunks.

    ``(across + SEAM_EPS) / (within + SEAM_EPS)``, both mean absolute differences in grey
    levels (0..255). 1.0 means the seam moves like the footage around it; a static shot with
    a hard jump of 10 levels scores 21.
    """
    return (across + SEAM_EPS) / (within + SEAM_EPS)


def iter_blended(
    shot: ShotPlan,
    chunk_frames: Iterable[np.ndarray],
    seams: list[float],
) -> Iterator[np.ndarray]:
    """Blend a shot's chunks as they arrive and yield its frames in blocks, in order.

    Overlaps are blended in pixels with a linear crossfade: the ``i``-th of ``O`` shared
    frames is ``(1 - w) * previous + w * next`` with ``w = (i + 1) / (O + 1)``. Blending in
    latent space would need the VAE (a backend's job) and is out of scope here.

    A seam score is appended to ``seams`` per chunk boundary. The boundary is the overlap's
    midpoint ``m = frame_start[k+1] + overlap // 2`` (with no overlap, the first frame of
    chunk ``k+1``); the score compares the blended frames ``m - 1`` and ``m`` with the mean
    frame-to-frame difference inside the two chunks' raw frames (see :func:`seam_score`).

    Args:
        shot: the shot's plan.
        chunk_frames: each chunk's frames, in chunk order (``T x H x W x 3`` uint8).
        seams: list to append seam scores to.

    Raises:
        PlanError: the chunk ranges do not tile the shot.
        StoreError: a chunk's frames are missing or have the wrong shape.
    """
    chunks = ordered_chunks(shot)
    it = iter(chunk_frames)
    prev: np.ndarray | None = None
    prev_motion = (0.0, 0)
    for chunk in chunks:
        raw = next(it, None)
        if raw is None:
            raise StoreError(f"chunk `{chunk.key}` ({chunk.name}) was not provided", keys=(chunk.key,))
        used = _used(shot, chunk, raw)
        motion = _motion(used)
        if prev is None:
            cur = used
        else:
            o = chunk.overlap
            keep = len(prev) - o
            yield prev[:keep]
            cur = used
            if o:
                w = (np.arange(1, o + 1, dtype=np.float32) / (o + 1))[:, None, None, None]
                mixed = prev[keep:].astype(np.float32) * (1 - w) + used[:o].astype(np.float32) * w
                cur = used.copy()
                cur[:o] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
            m = o // 2  # index of the boundary frame within `cur`
            before = cur[m - 1] if m >= 1 else prev[keep - 1]
            within = (prev_motion[0] + motion[0]) / max(prev_motion[1] + motion[1], 1)
            seams.append(seam_score(_mad(before, cur[m]), within))
        prev, prev_motion = cur, motion
    if next(it, None) is not None:
        raise PlanError(f"shot `{shot.shot_id}` was given more chunks than its plan has")
    assert prev is not None
    yield prev


def blend_chunks(shot: ShotPlan, frames: list[np.ndarray]) -> tuple[np.ndarray, list[float]]:
    """Blend a shot's chunks into exactly ``shot.frames`` frames.

    Args:
        shot: the shot's plan (chunk ranges and overlaps).
        frames: each chunk's rendered frames, in chunk order.

    Returns:
        ``(frames, seam_scores)``: ``shot.frames x H x W x 3`` uint8, and one score per
        chunk boundary (see :func:`iter_blended`).
    """
    seams: list[float] = []
    out = np.concatenate(list(iter_blended(shot, frames, seams)), axis=0)
    if len(out) != shot.frames:  # _check_layout makes this impossible; keep the promise loud
        raise PlanError(f"shot `{shot.shot_id}` blended to {len(out)} frames, "
                        f"planned {shot.frames}")
    return out, seams
