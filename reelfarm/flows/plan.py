"""The planner: a film becomes shots, chunks, seeds, content keys, dependencies and costs.

Pure: no I/O, no Ray, no Prefect. The same film gives the same plan in any process on
any machine, so a plan can be recomputed instead of stored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from reelfarm.errors import PlanError
from reelfarm.schemas.campaign import CampaignCell
from reelfarm.schemas.families import ANIMATIC_VERSION, FamilyRule
from reelfarm.schemas.film import AnimaticModel, Film, Scene, Shot, seconds_to_frames
from reelfarm.schemas.plan import ChunkPlan, KeyframePlan, RenderPlan, ShotPlan, check_plan

__all__ = ["KEY_VERSION", "CampaignPlan", "chunk_ranges", "chunk_seed", "keyframe_seed", "plan", "plan_campaign",
           "plan_film"]

# Bump when the meaning of a content key changes (every chunk renders again).
KEY_VERSION = 1
# Model fields that never change pixels, left out of content keys. chunk_frames and
# overlap are covered by each chunk's own frame range.
_NOT_PIXELS = {"chunk_frames", "overlap", "offload"}


def chunk_seed(base_seed: int, shot_id: str, index: int) -> int:
    """A 63-bit seed from the film (or shot) seed, shot id and chunk index.

    blake2b, not ``hash()``: Python salts string hashes per process.
    """
    digest = hashlib.blake2b(f"{base_seed}/{shot_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def keyframe_seed(base_seed: int, shot_id: str) -> int:
    """The seed a shot's keyframe model samples with (blake2b, like :func:`chunk_seed`)."""
    digest = hashlib.blake2b(f"{base_seed}/{shot_id}/keyframe".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _plan_keyframe(film: Film, shot: Shot, shot_doc: dict[str, Any], base_seed: int) -> KeyframePlan | None:
    """The shot's keyframe and its content key, or None for the animatic keyframe.

    A composed keyframe's key hashes the editing model (what changes pixels), its prompt and
    seed, and everything that draws the collage it is given: the animatic's drawing version,
    the shot's prompt (its backdrop), seed, characters with their references' sha256, camera,
    size, fps and length. A pinned keyframe's key hashes the file's bytes (sha256) and size.
    """
    kf = film.keyframe_for(shot)
    if kf is None:
        return None
    doc: dict[str, Any] = {"v": KEY_VERSION, "what": "keyframe", "size": shot_doc["size"]}
    if kf.pin is not None:
        if kf.sha256 is None:
            raise PlanError(f"shot {shot.id!r}: the pinned keyframe is not hashed; load the film with load_film()")
        doc["pin"] = kf.sha256
        key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
        return KeyframePlan.model_construct(key=key, source="pin", prompt="", seed=0, model=None,
                                            pin=kf.pin, pin_sha256=kf.sha256)
    assert kf.model is not None
    prompt = kf.prompt or shot.prompt
    seed = keyframe_seed(base_seed, shot.id)
    doc.update(model=kf.model.model_dump(mode="json"), prompt=prompt, seed=seed,
               collage={"animatic": ANIMATIC_VERSION, "seed": base_seed,
                        **{k: shot_doc[k] for k in ("prompt", "characters", "camera", "fps", "shot_frames")}})
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
    return KeyframePlan.model_construct(key=key, source="model", prompt=prompt, seed=seed, model=kf.model,
                                        pin=None, pin_sha256=None)


def chunk_ranges(frames: int, rule: FamilyRule, per_chunk: int, overlap: int) -> list[tuple[int, int, int]]:
    """Split ``frames`` into ``(start, end, num_frames)`` chunks.

    Every chunk renders ``num_frames`` frames obeying the family's rule; chunks start
    ``per_chunk - overlap`` apart, and the last one renders the shortest valid clip that
    reaches the shot's end (frames past the end are dropped by stitching).
    """
    if frames <= 0:
        raise PlanError(f"a shot needs at least one frame, got {frames}")
    if frames <= per_chunk:
        return [(0, frames, rule.smallest_at_least(frames, per_chunk))]
    stride = per_chunk - overlap
    out = []
    start = 0
    while start + per_chunk < frames:
        out.append((start, start + per_chunk, per_chunk))
        start += stride
    out.append((start, frames, rule.smallest_at_least(frames - start, per_chunk)))
    return out


def _model_doc(model: Any) -> dict[str, Any]:
    if isinstance(model, AnimaticModel):
        return {"backend": "animatic", "slate": model.slate, "version": ANIMATIC_VERSION}
    doc = {k: v for k, v in model.model_dump(mode="json").items() if k not in _NOT_PIXELS}
    # Only the accel options that change pixels, and only when set: a film with no `accel:`
    # keeps the keys it had before the block existed (schemas/accel.py says which count).
    doc.pop("accel", None)
    accel = model.accel.pixel_doc()
    if accel:
        doc["accel"] = accel
    return doc


def _plan_shot(film: Film, scene: Scene, shot: Shot, index: int, transition_frames: int) -> ShotPlan:
    model = film.model_for(shot)
    rule = model.rule()
    frames = shot.frame_count(film.fps)
    w, h = film.resolution
    names = shot.characters
    try:
        characters = [film.characters[n] for n in names]
    except KeyError as e:
        raise PlanError(f"shot {shot.id!r}: unknown character {e.args[0]!r}") from None
    if any(c.sha256 is None for c in characters):
        raise PlanError(f"shot {shot.id!r}: reference images are not hashed; load the film with load_film()")
    hashes = tuple(str(c.sha256) for c in characters)
    # 1. Everything shot-wide that shapes pixels, hashed once as a prefix.
    shot_doc = {
        "v": KEY_VERSION,
        "model": _model_doc(model),
        "prompt": shot.prompt,
        "characters": list(zip(names, hashes)),
        "camera": shot.camera.model_dump(mode="json"),
        "size": [w, h],
        "fps": str(film.fps),
        "shot_frames": frames,
    }
    if isinstance(model, AnimaticModel) and model.slate:
        shot_doc["slate"] = [scene.id, shot.id]
    qc = film.qc_for(shot)
    if qc is not None and qc.key_doc() is not None:
        # More than one take: which take the chunk's key commits depends on the policy.
        # Each take is stored under schemas.qc.take_key(key, take) with take_seed(seed, take).
        shot_doc["qc"] = qc.key_doc()
    base_seed = shot.seed if shot.seed is not None else film.seed
    keyframe = _plan_keyframe(film, shot, shot_doc, base_seed)
    if keyframe is not None:
        # The first frame every chunk that starts from the keyframe is given (absent without
        # one, so films without keyframes keep their keys).
        shot_doc["keyframe"] = keyframe.key
    prefix = hashlib.sha256(json.dumps(shot_doc, sort_keys=True, separators=(",", ":")).encode())
    # 2. Chunks: frame ranges, seeds, keys chained through their conditioning.
    chained = model.continuation == "previous"
    steps = model.steps or rule.default_steps
    megapixels = w * h / 1e6
    chunks = []
    prev_key: str | None = None
    total = 0.0
    for i, (start, end, num) in enumerate(chunk_ranges(frames, rule, model.frames_per_chunk, model.overlap)):
        seed = chunk_seed(base_seed, shot.id, i)
        depends = prev_key if chained else None
        h_ = prefix.copy()
        h_.update(f"|{seed}|{start}|{num}|{depends or ''}".encode())
        key = h_.hexdigest()[:32]
        cost = rule.gpu_s_fixed + rule.gpu_s_per_frame_mp_step * num * megapixels * steps
        total += cost
        chunks.append(ChunkPlan.model_construct(
            name=f"{shot.id}/chunk-{start:05d}-{end - 1:05d}",
            index=i, frame_start=start, frame_end=end, num_frames=num,
            overlap=0 if i == 0 else model.overlap, seed=seed, key=key,
            depends_on=depends, est_gpu_s=round(cost, 4),
        ))
        prev_key = key
    return ShotPlan.model_construct(
        scene_id=scene.id, shot_id=shot.id, index=index, prompt=shot.prompt,
        characters=names, character_hashes=hashes, camera=shot.camera,
        transition=shot.transition, transition_frames=transition_frames, model=model,
        width=w, height=h, fps=film.fps, frames=frames, seed=base_seed,
        chunks=tuple(chunks), est_gpu_s=round(total, 4), qc=qc, keyframe=keyframe,
    )


def plan_film(film: Film) -> RenderPlan:
    """Plan a loaded film (see :func:`reelfarm.schemas.loader.load_film`).

    Raises:
        PlanError: when the film cannot be planned (e.g. references not hashed).
    """
    shots = []
    frames = 0
    for index, (scene, shot) in enumerate(film.shots()):
        t = shot.transition
        t_frames = 0 if t.kind == "cut" else seconds_to_frames(t.seconds, film.fps)
        sp = _plan_shot(film, scene, shot, index, t_frames)
        frames += sp.frames - t_frames
        shots.append(sp)
    key = hashlib.sha256("".join(c.key for s in shots for c in s.chunks).encode()).hexdigest()[:32]
    used = {n for s in shots for n in s.characters}
    # Built without pydantic's validation (fast at 100,000 chunks): the invariants are
    # checked once, here, where the plan is made.
    plan = RenderPlan.model_construct(
        title=film.title, fps=film.fps, width=film.width, height=film.height,
        shots=tuple(shots), frames=frames, est_gpu_s=round(sum(s.est_gpu_s for s in shots), 4),
        key=key,
        characters={n: str(film.characters[n].sha256) for n in sorted(used)},
        references={n: film.characters[n].reference for n in sorted(used)},
        audio=film.audio,
    )
    check_plan(plan)
    return plan


plan = plan_film  # the name the design uses


@dataclass(frozen=True)
class CampaignPlan:
    """Every cell's plan. Chunks with equal keys across cells are rendered once."""

    title: str
    cells: tuple[tuple[CampaignCell, RenderPlan], ...]

    @property
    def chunk_count(self) -> int:
        return sum(len(p.chunks) for _, p in self.cells)

    @property
    def unique_chunks(self) -> int:
        return len({c.key for _, p in self.cells for c in p.chunks})

    @property
    def est_gpu_s(self) -> float:
        """GPU-seconds for the unique chunks (shared chunks are paid once)."""
        seen: dict[str, float] = {}
        for _, p in self.cells:
            for c in p.chunks:
                seen[c.key] = c.est_gpu_s
        return round(sum(seen.values()), 4)


def plan_campaign(title: str, cells: list[CampaignCell]) -> CampaignPlan:
    """Plan every cell of a campaign."""
    return CampaignPlan(title=title, cells=tuple((c, plan_film(c.film)) for c in cells))
