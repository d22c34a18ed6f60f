"""Deliverables keyed by what they are made from, as chunks are: a re-run encodes only what changed.

Each file stitching writes has a key, a hash of its inputs: a shot clip of its chunks'
content keys and the encoder settings; a scene or final cut of its shots' keys, the joins
and the soundtrack's bytes; the review files of the plan. ``OUT/deliverables.json`` records
the key each published file was made from (and each shot's seam scores, which later runs
reuse without decoding). A file whose key is unchanged and which is still in OUT is not
made again; a run in which nothing changed encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from reelfarm.schemas.plan import RenderPlan, ShotPlan

__all__ = ["DELIVERABLES_DOC", "STITCH_VERSION", "Freshness", "audio_sha256", "deliverable_keys"]

DELIVERABLES_DOC = "deliverables.json"
# Bump when what stitching writes changes for the same inputs (encoder settings, layout).
STITCH_VERSION = "1"
_EXT = {"mp4": ".mp4", "prores": ".mov", "webm": ".webm"}


def _hash(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def audio_sha256(url: str | None, storage_options: dict[str, Any] | None = None) -> str | None:
    """sha256 of the soundtrack's bytes (a replaced file under the same name changes the cut)."""
    if not url:
        return None
    h = hashlib.sha256()
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shot_key(shot: ShotPlan, crf: int) -> str:
    return _hash({"v": STITCH_VERSION, "chunks": [c.key for c in shot.chunks], "frames": shot.frames,
                  "fps": str(shot.fps), "size": [shot.width, shot.height], "crf": crf})


def _join_doc(shots: Iterable[ShotPlan], shot_keys: dict[str, str]) -> list[Any]:
    return [[shot_keys[s.shot_id], s.transition.kind, s.transition_frames] for s in shots]


def deliverable_keys(plan: RenderPlan, *, formats: Iterable[str], crf: int, audio: str | None,
                     review: Iterable[str]) -> dict[str, str]:
    """Relative path under OUT -> the key of what it is made from.

    Args:
        plan: the film's plan.
        formats: the final cut's formats.
        crf: the encoder quality.
        audio: the soundtrack's sha256 (see :func:`audio_sha256`), or None.
        review: the review files written (``timeline.otio``, ``contact_sheet.png``, ``report.html``).
    """
    shot_keys = {s.shot_id: _shot_key(s, crf) for s in plan.shots}
    keys = {f"shots/{s.shot_id}.mp4": shot_keys[s.shot_id] for s in plan.shots}
    start, scenes = 0, {}
    for s in plan.shots:
        start -= s.transition_frames if s.index else 0
        scenes.setdefault(s.scene_id, (start, []))[1].append(s)
        start += s.frames
    for scene_id, (first, shots) in scenes.items():
        keys[f"scenes/{scene_id}.mp4"] = _hash({"v": STITCH_VERSION, "joins": _join_doc(shots, shot_keys),
                                                "audio": audio, "at": first, "crf": crf})
    for fmt in formats:
        keys["final" + _EXT[fmt]] = _hash({"v": STITCH_VERSION, "fmt": fmt, "crf": crf, "audio": audio,
                                           "joins": _join_doc(plan.shots, shot_keys), "title": plan.title})
    for rel in review:
        keys[rel] = _hash({"v": STITCH_VERSION, "plan": plan.key, "file": rel, "files": sorted(keys.items())})
    return keys


@dataclass
class Freshness:
    """What OUT already holds, against what a stitch would write.

    Attributes:
        keys: relative path -> key of what it would be made from now.
        previous: relative path -> its record in the last ``deliverables.json``.
        stale: paths to make again (new key, or the file is gone).
    """

    keys: dict[str, str]
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)

    @classmethod
    def check(cls, keys: dict[str, str], doc: bytes | None, exists: Callable[[str], bool]) -> Freshness:
        previous: dict[str, dict[str, Any]] = {}
        if doc:
            try:
                loaded = json.loads(doc)
                if loaded.get("version") == STITCH_VERSION and isinstance(loaded.get("files"), dict):
                    previous = {k: v for k, v in loaded["files"].items() if isinstance(v, dict)}
            except ValueError:
                previous = {}
        stale = {rel for rel, key in keys.items()
                 if previous.get(rel, {}).get("key") != key or not exists(rel)}
        return cls(keys, previous, stale)

    @property
    def up_to_date(self) -> bool:
        return not self.stale

    def seams(self, shot_id: str) -> list[float] | None:
        rec = self.previous.get(f"shots/{shot_id}.mp4")
        return None if rec is None else list(rec.get("seams") or [])

    def document(self, seam_scores: dict[str, list[float]]) -> bytes:
        """The ``deliverables.json`` to publish once every file is in place."""
        files: dict[str, dict[str, Any]] = {}
        for rel, key in sorted(self.keys.items()):
            rec: dict[str, Any] = {"key": key}
            if rel.startswith("shots/"):
                rec["seams"] = [float(x) for x in seam_scores.get(rel[6:-4], [])]
            files[rel] = rec
        return json.dumps({"version": STITCH_VERSION, "files": files}, indent=1).encode()
