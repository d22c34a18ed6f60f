"""The final cut as an OpenTimelineIO timeline: one clip per shot, its recipe in metadata.

Editors open ``timeline.otio`` (or convert it to EDL/AAF/FCP XML with OTIO's plugins) and
see the same cut as ``final.mp4``: clips point at ``shots/<shot>.mp4`` relative to OUT,
crossfades and fades through black are ``SMPTE_Dissolve`` transitions centred on the cut,
and each clip's ``metadata["reelfarm"]`` says how to render it again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import opentimelineio as otio

from reelfarm.errors import PlanError
from reelfarm.render.seams import SEAM_WARN
from reelfarm.schemas.plan import RenderPlan, ShotPlan

logger = logging.getLogger(__name__)

__all__ = ["build_timeline", "shot_recipe", "write_timeline"]

# Seams scoring above this are marked red on the clip (see render.stitch.seam_score).


def _rt(frames: int, rate: float) -> otio.opentime.RationalTime:
    return otio.opentime.RationalTime(frames, rate)


def _range(start: int, duration: int, rate: float) -> otio.opentime.TimeRange:
    return otio.opentime.TimeRange(_rt(start, rate), _rt(duration, rate))


def shot_recipe(shot: ShotPlan, seam_scores: Sequence[float] | None = None) -> dict[str, Any]:
    """Everything needed to render ``shot`` again, as plain JSON values."""
    model = shot.model
    return {
        "scene_id": shot.scene_id,
        "shot_id": shot.shot_id,
        "index": shot.index,
        "backend": model.backend,
        "family": getattr(model, "family", None),
        "model_id": model.id,
        "model_revision": model.revision,
        "steps": model.steps,
        "guidance_scale": getattr(model, "guidance_scale", None),
        "negative_prompt": getattr(model, "negative_prompt", None),
        "dtype": getattr(model, "dtype", None),
        "model": model.model_dump(mode="json"),
        "seed": shot.seed,
        "prompt": shot.prompt,
        "camera": shot.camera.model_dump(mode="json"),
        "characters": list(shot.characters),
        "identity_hashes": dict(zip(shot.characters, shot.character_hashes, strict=True)),
        "frames": shot.frames,
        "fps": str(Fraction(shot.fps)),
        "size": [shot.width, shot.height],
        "transition": {"kind": shot.transition.kind, "seconds": shot.transition.seconds,
                       "frames": shot.transition_frames},
        "chunk_keys": [c.key for c in shot.chunks],
        "chunks": [{"name": c.name, "key": c.key, "seed": c.seed, "frame_start": c.frame_start,
                    "frame_end": c.frame_end, "num_frames": c.num_frames, "overlap": c.overlap}
                   for c in shot.chunks],
        "seam_scores": [round(float(x), 4) for x in (seam_scores or [])],
    }


def build_timeline(
    plan: RenderPlan,
    *,
    seam_scores: Mapping[str, Sequence[float]] | None = None,
    shot_url: str = "shots/{shot}.mp4",
    manifest: Any = None,
) -> otio.schema.Timeline:
    """The cut as a Timeline: a video track of shot clips and transitions, plus audio if any.

    A transition of ``n`` frames overlaps two shots by ``n`` frames. In OTIO the clips abut at
    the cut point and the transition borrows handles: ``in_offset = n // 2`` frames of the
    outgoing clip before the cut, ``out_offset = n - n // 2`` of the incoming one after. So the
    outgoing clip's source range ends ``out_offset`` frames before its media does and the
    incoming one starts ``in_offset`` frames in, and the track lasts exactly ``plan.frames``.

    Args:
        plan: the film's plan.
        seam_scores: shot id -> seam scores, added to metadata and as markers.
        shot_url: target URL pattern of each shot's clip, relative to OUT.
        manifest: the run's manifest table: each clip's ``metadata["reelfarm"]["qc"]``
            then holds its identity scores per character over time and its chunks' takes.
    """
    from reelfarm.render.quality import shot_qc

    qc = shot_qc(plan, manifest) if manifest is not None else {}
    rate = float(plan.fps)
    scores = dict(seam_scores or {})
    tl = otio.schema.Timeline(name=plan.title, global_start_time=_rt(0, rate))
    tl.metadata["reelfarm"] = {
        "title": plan.title, "plan_key": plan.key, "fps": str(Fraction(plan.fps)),
        "width": plan.width, "height": plan.height, "frames": plan.frames,
        "characters": dict(plan.characters), "audio": plan.audio,
    }
    video = otio.schema.Track(name="picture", kind=otio.schema.TrackKind.Video)
    tl.tracks.append(video)
    shots = list(plan.shots)
    for i, shot in enumerate(shots):
        nxt = shots[i + 1] if i + 1 < len(shots) else None
        t_in = shot.transition_frames if i and shot.transition.kind != "cut" else 0
        t_out = nxt.transition_frames if nxt is not None and nxt.transition.kind != "cut" else 0
        head = t_in // 2  # this clip's media used before the incoming cut
        tail = t_out - t_out // 2  # media used after the outgoing cut
        if head + tail > shot.frames:
            raise PlanError(f"shot `{shot.shot_id}` is shorter than its transitions")
        if t_in:
            video.append(otio.schema.Transition(
                name=f"{shot.transition.kind} into {shot.shot_id}",
                transition_type=otio.schema.TransitionTypes.SMPTE_Dissolve,
                in_offset=_rt(t_in // 2, rate), out_offset=_rt(t_in - t_in // 2, rate),
                metadata={"reelfarm": {"kind": shot.transition.kind, "frames": t_in,
                                       "xfade": "fade" if shot.transition.kind == "crossfade"
                                       else "fadeblack"}},
            ))
        ref = otio.schema.ExternalReference(
            target_url=shot_url.format(shot=shot.shot_id),
            available_range=_range(0, shot.frames, rate),
        )
        clip = otio.schema.Clip(
            name=shot.shot_id, media_reference=ref,
            source_range=_range(head, shot.frames - head - tail, rate),
            metadata={"reelfarm": shot_recipe(shot, scores.get(shot.shot_id))},
        )
        if shot.shot_id in qc and qc[shot.shot_id].chunks:
            clip.metadata["reelfarm"]["qc"] = _qc_doc(qc[shot.shot_id])
        chunks = sorted(shot.chunks, key=lambda c: c.index)
        for k, score in enumerate(scores.get(shot.shot_id, [])):
            if k + 1 >= len(chunks):
                break
            at = chunks[k + 1].frame_start + chunks[k + 1].overlap // 2
            colour = (otio.schema.MarkerColor.RED if score > SEAM_WARN
                      else otio.schema.MarkerColor.GREEN)
            clip.markers.append(otio.schema.Marker(
                name=f"seam {k + 1}", marked_range=_range(at, 0, rate), color=colour,
                metadata={"reelfarm": {"seam_score": round(float(score), 4)}},
            ))
        video.append(clip)
    if plan.audio:
        sound = otio.schema.Track(name="soundtrack", kind=otio.schema.TrackKind.Audio)
        sound.append(otio.schema.Clip(
            name="soundtrack",
            media_reference=otio.schema.ExternalReference(target_url=plan.audio),
            source_range=_range(0, plan.frames, rate),
        ))
        tl.tracks.append(sound)
    return tl


def _qc_doc(q: Any) -> dict[str, Any]:
    """A shot's qc as plain JSON for clip metadata (see render.quality.ShotQc)."""
    return {
        **q.report(),
        "metric": q.metric,
        "identity_over_time": {name: [[f, round(v, 4)] for f, v in line] for name, line in q.series.items()},
        "chunks": [{"name": c.chunk_name, "identity": c.identity, "continuity": c.continuity, "take": c.take,
                    "takes": c.takes, "flag": c.flag} for c in q.chunks],
    }


def write_timeline(timeline: otio.schema.Timeline, path: str) -> None:
    """Write ``timeline`` as OTIO JSON to a local ``path``."""
    otio.adapters.write_to_file(timeline, path, adapter_name="otio_json")
