"""Hand-built plans and references for the animatic tests (no planner, no files)."""

from __future__ import annotations

import hashlib
from fractions import Fraction

import numpy as np

from reelfarm.schemas.film import AnimaticModel, Camera, Transition
from reelfarm.schemas.plan import ChunkPlan, ShotPlan

COLOURS = {"flame": (255, 150, 30), "moth": (200, 190, 170), "ox": (120, 80, 50)}


def reference(name: str, size: int = 64, opaque: bool = False) -> np.ndarray:
    """A small RGBA figure: a coloured ellipse with two eyes, on a transparent ground."""
    r, g, b = COLOURS.get(name, (90, 160, 220))
    h, w = size, size * 3 // 4
    ys = (np.arange(h) + 0.5) / h * 2 - 1
    xs = (np.arange(w) + 0.5) / w * 2 - 1
    inside = ys[:, None] ** 2 + xs[None, :] ** 2 < 0.9
    img = np.zeros((h, w, 4), np.uint8)
    img[inside] = (r, g, b, 255)
    for ex in (w // 3, 2 * w // 3):
        img[h // 3 : h // 3 + 4, ex - 2 : ex + 2, :3] = 20
    if opaque:
        img[~inside] = (30, 90, 40, 255)
        return img[..., :3].copy()
    return img


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def shot(
    characters: tuple[str, ...] = ("flame",),
    *,
    move: str = "static",
    amount: float = 0.5,
    frames: int = 24,
    width: int = 160,
    height: int = 90,
    slate: bool = False,
    prompt: str = "a little flame on a shelf at night",
    seed: int = 7,
) -> ShotPlan:
    return ShotPlan(
        scene_id="s01",
        shot_id="s01_010",
        index=0,
        prompt=prompt,
        characters=tuple(characters),
        character_hashes=tuple(sha(c) for c in characters),
        camera=Camera(move=move, amount=amount),
        transition=Transition(),
        transition_frames=0,
        model=AnimaticModel(slate=slate),
        width=width,
        height=height,
        fps=Fraction(24),
        frames=frames,
        seed=seed,
        chunks=(),
        est_gpu_s=0.0,
    )


def chunk(start: int, num_frames: int, *, seed: int = 1, index: int = 0) -> ChunkPlan:
    last = start + num_frames - 1
    return ChunkPlan(
        name=f"s01_010/chunk-{start:04d}-{last:04d}",
        index=index,
        frame_start=start,
        frame_end=start + num_frames,
        num_frames=num_frames,
        overlap=0,
        seed=seed,
        key=f"key-{start}-{num_frames}-{seed}",
        est_gpu_s=0.0,
    )
