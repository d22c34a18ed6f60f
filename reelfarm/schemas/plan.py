"""The render plan: what the planner makes of a film, and what workers and stitching read.

A plan is data only. ``ShotPlan`` carries everything that shapes a shot's pixels, so a
backend needs nothing else; ``ChunkPlan`` is one model call's worth of frames.
"""

from __future__ import annotations

from fractions import Fraction

from pydantic import BaseModel, ConfigDict

from reelfarm.schemas.film import Camera, FrameRate, ModelSpec, Transition

__all__ = ["ChunkPlan", "RenderPlan", "ShotPlan"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkPlan(_Frozen):
    """One model call: frames ``[frame_start, frame_end)`` of its shot.

    ``num_frames`` is what the model renders (it obeys the family's frame rule) and may
    run past ``frame_end`` on a shot's last chunk; the extra frames are dropped.
    ``overlap`` frames at the start are shared with the previous chunk and blended.
    """

    name: str  # "<shot>/chunk-<first>-<last>", 0-based inclusive frame numbers
    index: int
    frame_start: int
    frame_end: int
    num_frames: int
    overlap: int
    seed: int
    key: str  # content key: a hash of everything that changes this chunk's pixels
    depends_on: str | None = None  # the key of the chunk whose tail conditions this one
    est_gpu_s: float


class ShotPlan(_Frozen):
    """A shot as the farm sees it: resolved model, frame count, and its chunks."""

    scene_id: str
    shot_id: str
    index: int  # position in the film
    prompt: str
    characters: tuple[str, ...]
    character_hashes: tuple[str, ...]  # sha256 of each character's reference, same order
    camera: Camera
    transition: Transition
    transition_frames: int  # frames overlapped with the previous shot (0 for a cut)
    model: ModelSpec
    width: int
    height: int
    fps: FrameRate
    frames: int
    seed: int
    chunks: tuple[ChunkPlan, ...]
    est_gpu_s: float

    @property
    def duration_s(self) -> float:
        return float(self.frames / self.fps)

    def continuation_frame(self, chunk: ChunkPlan) -> int:
        """Which of the previous chunk's frames ``chunk`` continues from (its index there).

        A chained chunk's first frame is a frame the previous chunk rendered (the overlap
        starts there); with no overlap it continues from the previous chunk's last used
        frame (frames past the shot's end are dropped).
        """
        if chunk.index < 1:
            raise ValueError(f"chunk {chunk.name!r} is its shot's first: it continues from nothing")
        prev = self.chunks[chunk.index - 1]
        used = prev.frame_end - prev.frame_start
        return min(chunk.frame_start - prev.frame_start, used - 1)


class RenderPlan(_Frozen):
    """A whole film, planned. ``key`` is a hash over every chunk key, in order."""

    title: str
    fps: FrameRate
    width: int
    height: int
    shots: tuple[ShotPlan, ...]
    frames: int  # the film cut's length: shot frames less transition overlaps
    est_gpu_s: float
    key: str
    characters: dict[str, str]  # character name -> reference sha256, for every character used
    references: dict[str, str]  # character name -> resolved reference URL
    audio: str | None = None

    @property
    def chunks(self) -> list[ChunkPlan]:
        return [c for s in self.shots for c in s.chunks]

    @property
    def duration_s(self) -> float:
        return float(Fraction(self.frames) / self.fps)

    def shot(self, shot_id: str) -> ShotPlan:
        for s in self.shots:
            if s.shot_id == shot_id:
                return s
        raise KeyError(shot_id)
