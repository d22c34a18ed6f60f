"""The render plan: what the planner makes of a film, and what workers and stitching read.

A plan is data only. ``ShotPlan`` carries everything that shapes a shot's pixels, so a
backend needs nothing else; ``ChunkPlan`` is one model call's worth of frames.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

from pydantic import BaseModel, ConfigDict

from reelfarm.errors import PlanError
from reelfarm.schemas.film import Camera, FrameRate, KeyframeModel, ModelSpec, Transition
from reelfarm.schemas.qc import QcPolicy

__all__ = ["ChunkPlan", "KeyframePlan", "RenderPlan", "ShotPlan", "check_plan", "ordered_chunks", "safe_id"]


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


class KeyframePlan(_Frozen):
    """Where a diffusers shot's first frame comes from when it is not the animatic keyframe.

    The keyframe is a one-frame artefact in the chunk store under ``key`` (a hash of the
    model, the references' hashes, the prompt, seed and size, or of the pinned file's bytes),
    made by the keyframe stage before any chunk starts (flows/keyframes.py).
    """

    key: str
    source: str  # "model" (an image-editing pipeline composes it) or "pin" (a file, used as given)
    prompt: str = ""  # what the editing model is told
    seed: int = 0
    model: KeyframeModel | None = None
    pin: str | None = None  # the pinned file's URL
    pin_sha256: str | None = None


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
    qc: QcPolicy | None = None  # scoring and retakes (schemas.qc); read by the worker
    keyframe: KeyframePlan | None = None  # None: the animatic keyframe (render.animatic.keyframe)

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


# --- invariants: what stitching and the farm rely on; one owner -------------------------------
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def safe_id(value: str, what: str) -> str:
    """Ids become file names under OUT: the same rule as the spec's ``Slug``, checked again."""
    if not isinstance(value, str) or not _SLUG.match(value) or ".." in value:
        raise PlanError(f"`{what}` {value!r} is not a safe id for a file name")
    return value


def ordered_chunks(shot: ShotPlan) -> list[ChunkPlan]:
    """Chunks in order, checked against the layout stitching relies on.

    Chunk ``k`` renders film frames starting at ``frame_start``; ``[frame_start, frame_end)``
    are the frames it contributes. Chunk ``k+1`` starts ``overlap`` frames before chunk ``k``
    ends (``frame_start[k+1] == frame_end[k] - overlap[k+1]``): those frames are rendered twice
    and blended. The first chunk's overlap is ignored (it has no predecessor).
    """
    chunks = sorted(shot.chunks, key=lambda c: c.index)
    if not chunks:
        raise PlanError(f"shot `{shot.shot_id}` has no chunks")
    if chunks[0].frame_start != 0:
        raise PlanError(f"chunk `{chunks[0].name}`: `frame_start` must be 0, "
                        f"got {chunks[0].frame_start}")
    for prev, cur in zip(chunks, chunks[1:]):
        if cur.frame_start != prev.frame_end - cur.overlap or cur.overlap < 0:
            raise PlanError(
                f"chunk `{cur.name}`: `frame_start` must be {prev.frame_end - cur.overlap} "
                f"(previous end {prev.frame_end} less overlap {cur.overlap}), "
                f"got {cur.frame_start}")
        head = prev.overlap if prev.index != chunks[0].index else 0
        if cur.frame_start - prev.frame_start < max(1, head):
            raise PlanError(f"chunk `{cur.name}` overlaps more than one earlier chunk")
    for c in chunks:
        if (c.frame_end <= c.frame_start or c.num_frames < c.frame_end - c.frame_start
                or c.frame_end - c.frame_start < c.overlap):
            raise PlanError(f"chunk `{c.name}`: bad range [{c.frame_start}, {c.frame_end}) "
                            f"for `num_frames` {c.num_frames}")
    if chunks[-1].frame_end != shot.frames:
        raise PlanError(f"shot `{shot.shot_id}`: chunks end at {chunks[-1].frame_end}, "
                        f"the shot has {shot.frames} frames")
    return chunks


def _check_transitions(shots: Sequence[ShotPlan]) -> None:
    """Each shot must be long enough for the transitions into and out of it."""
    for i, s in enumerate(shots):
        t_in = s.transition_frames if i and s.transition.kind != "cut" else 0
        t_out = 0
        if i + 1 < len(shots) and shots[i + 1].transition.kind != "cut":
            t_out = shots[i + 1].transition_frames
        if i and s.transition.kind != "cut" and s.transition_frames <= 0:
            raise PlanError(f"shot `{s.shot_id}`: a {s.transition.kind} needs "
                            "`transition_frames` > 0")
        if t_in + t_out > s.frames:
            raise PlanError(f"shot `{s.shot_id}` has {s.frames} frames, fewer than its "
                            f"transitions overlap ({t_in} in + {t_out} out)")


def check_plan(plan: RenderPlan) -> None:
    """Raise PlanError unless ``plan`` keeps every invariant stitching and the farm rely on.

    The planner calls it on every plan it builds (plans are built with ``model_construct``
    for speed, which skips pydantic's validation); stitching calls it on what it is given,
    since ids become file names under OUT and a plan may come from a document in OUT.
    """
    shots = list(plan.shots)
    if not shots:
        raise PlanError("the plan has no shots")
    for s in shots:
        safe_id(s.shot_id, "shot_id")
        safe_id(s.scene_id, "scene_id")
        if (s.width, s.height, Fraction(s.fps)) != (plan.width, plan.height, Fraction(plan.fps)):
            raise PlanError(f"shot `{s.shot_id}` is {s.width}x{s.height}@{s.fps}, the film "
                            f"{plan.width}x{plan.height}@{plan.fps}")
        ordered_chunks(s)
    if len({s.shot_id for s in shots}) != len(shots):
        raise PlanError("shot ids must be unique")
    if shots[0].transition_frames:
        raise PlanError(f"shot `{shots[0].shot_id}` opens the film, so its "
                        f"{shots[0].transition.kind} has nothing to overlap: "
                        f"`transition_frames` must be 0, got {shots[0].transition_frames}")
    _check_transitions(shots)
    joins = [0 if s.transition.kind == "cut" else s.transition_frames for s in shots[1:]]
    total = sum(s.frames for s in shots) - sum(joins)
    if total != plan.frames:
        raise PlanError(f"`frames` is {plan.frames}, but the shots less their transitions "
                        f"make {total}")
