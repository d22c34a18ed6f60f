"""Hand-built plans, frames and stores for the stitching tests (no planner, no backend)."""

from __future__ import annotations

import hashlib
import wave
from datetime import UTC, datetime
from fractions import Fraction

import numpy as np
import pyarrow as pa

from reelfarm.errors import StoreError
from reelfarm.schemas.film import AnimaticModel, Camera, Transition
from reelfarm.schemas.plan import ChunkPlan, RenderPlan, ShotPlan

W, H, FPS = 64, 36, Fraction(24)


def key_for(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:32]


def chunk_ranges(frames: int, per_chunk: int, overlap: int) -> list[tuple[int, int, int]]:
    """The planner's layout: chunks ``per_chunk - overlap`` apart, the last one may run long."""
    if frames <= per_chunk:
        return [(0, frames, per_chunk)]
    out, start = [], 0
    while start + per_chunk < frames:
        out.append((start, start + per_chunk, per_chunk))
        start += per_chunk - overlap
    out.append((start, frames, per_chunk))
    return out


def make_shot(
    shot_id: str,
    frames: int,
    *,
    scene_id: str = "s01",
    index: int = 0,
    per_chunk: int = 8,
    overlap: int = 2,
    transition: Transition | str = "cut",
    transition_frames: int = 0,
    prompt: str = "a small flame on a shelf",
    width: int = W,
    height: int = H,
    fps: Fraction = FPS,
) -> ShotPlan:
    if isinstance(transition, str):
        transition = Transition(kind=transition)
    chunks = tuple(
        ChunkPlan(
            name=f"{shot_id}/chunk-{s:05d}-{e - 1:05d}", index=i, frame_start=s, frame_end=e,
            num_frames=n, overlap=0 if i == 0 else overlap, seed=1000 + i,
            key=key_for(shot_id, i, s, n), est_gpu_s=1.5)
        for i, (s, e, n) in enumerate(chunk_ranges(frames, per_chunk, overlap)))
    return ShotPlan(
        scene_id=scene_id, shot_id=shot_id, index=index, prompt=prompt, characters=("flame",),
        character_hashes=("ab" * 32,), camera=Camera(), transition=transition,
        transition_frames=transition_frames, model=AnimaticModel(), width=width, height=height,
        fps=fps, frames=frames, seed=7, chunks=chunks, est_gpu_s=1.5 * len(chunks))


def make_plan(
    shots: list[ShotPlan], *, title: str = "Tiny Film", audio: str | None = None
) -> RenderPlan:
    shots = [s.model_copy(update={"index": i}) for i, s in enumerate(shots)]
    frames = shots[0].frames + sum(s.frames - s.transition_frames for s in shots[1:])
    return RenderPlan(
        title=title, fps=shots[0].fps, width=shots[0].width, height=shots[0].height,
        shots=tuple(shots), frames=frames, est_gpu_s=sum(s.est_gpu_s for s in shots),
        key=key_for("plan", *(c.key for s in shots for c in s.chunks)),
        characters={"flame": "ab" * 32}, references={"flame": "refs/flame.png"}, audio=audio)


def truth(shot: ShotPlan, frames: int | None = None, *, phase: float | None = None) -> np.ndarray:
    """Smoothly moving frames for a shot (a travelling sine per channel), ``frames`` long."""
    n = frames or shot.frames
    phase = (shot.index * 0.37) if phase is None else phase
    t = np.arange(n)[:, None, None, None]
    x = np.arange(shot.width)[None, None, :, None]
    y = np.arange(shot.height)[None, :, None, None]
    c = np.arange(3)[None, None, None, :]
    turns = x / shot.width + y / (2 * shot.height) + t / 24 + phase + c / 3
    v = 128 + 90 * np.sin(2 * np.pi * turns)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def chunk_arrays(shot: ShotPlan, film: np.ndarray | None = None) -> list[np.ndarray]:
    """Each chunk's rendered frames cut from one truth (overlaps agree exactly)."""
    longest = max(c.frame_start + c.num_frames for c in shot.chunks)
    film = truth(shot, longest) if film is None else film
    return [film[c.frame_start:c.frame_start + c.num_frames].copy() for c in shot.chunks]


class FakeStore:
    """The ChunkStore calls stitching makes, over a dict. Records reads; never deletes."""

    def __init__(self) -> None:
        self.frames: dict[str, np.ndarray] = {}
        self.reads: list[str] = []

    def put(self, key: str, frames: np.ndarray) -> None:
        self.frames[key] = frames

    def is_complete(self, key: str, *, verify: bool = False) -> bool:
        return key in self.frames

    def read_frames(self, key: str) -> np.ndarray:
        self.reads.append(key)
        if key not in self.frames:
            raise StoreError(f"chunk `{key}` is not committed")
        return self.frames[key]


def fill(store, plan: RenderPlan) -> None:
    """Put every chunk of ``plan`` into ``store`` (a FakeStore or a real ChunkStore)."""
    for shot in plan.shots:
        for chunk, frames in zip(shot.chunks, chunk_arrays(shot), strict=True):
            if isinstance(store, FakeStore):
                store.put(chunk.key, frames)
            else:
                from reelfarm.render.base import ChunkOutput

                store.write_chunk(chunk.key, ChunkOutput(frames=frames), meta={"seed": chunk.seed})


def write_wav(path: str, seconds: float, rate: int = 48000) -> None:
    """A mono 440 Hz sine, 16-bit."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def three_shot_plan(**kw) -> RenderPlan:
    """Two scenes: a (cut) b (crossfade 4) | c (fade_black 3). 20 + 16 + 12 - 4 - 3 = 41 frames."""
    return make_plan([
        make_shot("a", 20, scene_id="s01"),
        make_shot("b", 16, scene_id="s01", transition=Transition(kind="crossfade", seconds=4 / 24),
                  transition_frames=4),
        make_shot("c", 12, scene_id="s02", transition=Transition(kind="fade_black", seconds=0.125),
                  transition_frames=3),
    ], **kw)


def cuts_plan(**kw) -> RenderPlan:
    """Two scenes, cuts only: 16 + 10 | 12 = 38 frames."""
    return make_plan([
        make_shot("a", 16, scene_id="s01"),
        make_shot("b", 10, scene_id="s01"),
        make_shot("c", 12, scene_id="s02"),
    ], **kw)


def manifest_for(plan, rows_extra=None) -> pa.Table:
    """A manifest like the farm writes: one row per chunk, some fields null."""
    rows = []
    for s in plan.shots:
        for c in s.chunks:
            rows.append({
                "run_id": "run1", "scene_id": s.scene_id, "shot_id": s.shot_id,
                "chunk_index": c.index, "chunk_name": c.name, "frame_start": c.frame_start,
                "frame_end": c.frame_end, "num_frames": c.num_frames, "overlap": c.overlap,
                "seed": c.seed, "content_key": c.key, "depends_on": c.depends_on,
                "backend": "animatic", "model_id": None, "est_gpu_s": c.est_gpu_s,
                "status": "done", "attempts": 1, "worker": "gpu-0", "node": "node-a",
                "started_at": datetime(2026, 1, 1, tzinfo=UTC),
                "finished_at": datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC),
                "render_s": 2.0, "output_url": f"memory://farm/chunks/{c.key}",
                "checksum": "0" * 64, "seam_score": None, "error": None,
            })
    for i, row in enumerate(rows_extra or []):
        rows[i].update(row)
    return pa.Table.from_pylist(rows)
