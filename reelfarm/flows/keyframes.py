"""The keyframe stage: every shot's keyframe, rendered once, before any chunk starts.

    plans -> keyframes storage lacks (by content key) -> pins committed as given ->
    composed keyframes rendered model by model (each model loaded once) -> committed

A keyframe is a one-frame chunk in the chunk store under its key (``KeyframePlan.key``), so
the commit protocol, checksums and resume of chunks hold for it too; a later run (``reelfarm
render`` after ``reelfarm keyframes``) finds it committed and renders nothing. The worker
gives it to the shot's first chunk as its start image (cluster/worker.py).

Composed keyframes render in a child process of the driver by default: the driver keeps
torch and the editing model out of its own memory, and the model's memory (GPU included) is
released when the stage ends, before the farm's workers load the video models.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from reelfarm import events
from reelfarm.cluster.store import ChunkStore
from reelfarm.errors import BackendError
from reelfarm.schemas.plan import RenderPlan, ShotPlan

__all__ = ["KEYFRAME_SHEET", "KeyframeSummary", "keyframe_shots", "keyframe_sheet", "keyframes_only",
           "read_keyframe", "render_keyframes"]

KEYFRAME_SHEET = "keyframes.png"  # OUT/keyframes.png (OUT/<cell>/keyframes.png): `reelfarm keyframes`

logger = logging.getLogger(__name__)


@dataclass
class KeyframeSummary:
    """What one keyframe stage did; ``rendered`` counts composed keyframes made by a model."""

    rendered: list[str] = field(default_factory=list)  # keys composed by a model in this stage
    pinned: list[str] = field(default_factory=list)  # keys committed from a pinned file
    cached: list[str] = field(default_factory=list)  # keys already committed before the stage
    model_loads: int = 0
    seconds: float = 0.0

    def to_doc(self) -> dict[str, Any]:
        return {"rendered": len(self.rendered), "pinned": len(self.pinned), "cached": len(self.cached),
                "model_loads": self.model_loads}


def keyframe_shots(plans: list[RenderPlan]) -> dict[str, tuple[ShotPlan, dict[str, str]]]:
    """``key -> (shot, character -> reference URL)`` for every keyframe of ``plans``, once per key
    (campaign cells and shots that share a keyframe share its key)."""
    out: dict[str, tuple[ShotPlan, dict[str, str]]] = {}
    for plan in plans:
        for shot in plan.shots:
            if shot.keyframe is not None and shot.keyframe.key not in out:
                out[shot.keyframe.key] = (shot, {n: plan.references[n] for n in shot.characters})
    return out


def read_keyframe(store: ChunkStore, shot: ShotPlan) -> Any:
    """The committed keyframe of ``shot`` (``H x W x 3`` uint8), or None without one."""
    if shot.keyframe is None or not store.is_complete(shot.keyframe.key):
        return None
    return store.read_frames(shot.keyframe.key)[0]


def _read(url: str, storage_options: dict[str, Any]) -> bytes:
    import fsspec

    with fsspec.open(url, "rb", **storage_options) as f:
        return f.read()


def _commit(store: ChunkStore, shot: ShotPlan, frame: Any, meta: dict[str, Any]) -> None:
    from reelfarm.render.base import ChunkOutput

    kf = shot.keyframe
    assert kf is not None
    store.write_chunk(kf.key, ChunkOutput(frames=frame[None]), meta={
        "keyframe": True, "shot": shot.shot_id, "source": kf.source, "seed": kf.seed, "prompt": kf.prompt,
        "model": None if kf.model is None else kf.model.model_dump(mode="json"), "pin": kf.pin, **meta})


def _compose(root: str, storage_options: dict[str, Any], jobs: list[tuple[ShotPlan, dict[str, str]]]
             ) -> tuple[list[str], int]:
    """Compose and commit keyframes, each model loaded once (in whatever process runs this)."""
    from reelfarm.render.keyframes import KeyframeRenderer, collage, decode_image

    store = ChunkStore(root, storage_options=storage_options)
    by_model: dict[str, list[tuple[ShotPlan, dict[str, str]]]] = {}
    for shot, refs in jobs:
        assert shot.keyframe is not None and shot.keyframe.model is not None
        by_model.setdefault(shot.keyframe.model.model_dump_json(), []).append((shot, refs))
    done: list[str] = []
    loads = 0
    images: dict[str, Any] = {}
    for group in by_model.values():
        model = group[0][0].keyframe.model  # type: ignore[union-attr]
        try:
            renderer = KeyframeRenderer.load(model)  # type: ignore[arg-type]
        except BackendError as e:  # say which shots and which field, not only which model
            shots = ", ".join(repr(s.shot_id) for s, _ in group)
            mid = model.id  # type: ignore[union-attr]
            raise BackendError(f"shot{'s' * (len(group) > 1)} {shots}: `keyframe.model.id` {mid!r} "
                               f"cannot be loaded: {e}") from None
        loads += 1
        try:
            for shot, refs in group:
                for name, url in refs.items():
                    if url not in images:
                        images[url] = decode_image(_read(url, storage_options),
                                                   f"the reference of character {name!r} ({url})")
                t0 = time.perf_counter()
                frame = renderer(shot, collage(shot, {n: images[u] for n, u in refs.items()}))
                _commit(store, shot, frame, {"device": renderer.device, "render_s": time.perf_counter() - t0})
                done.append(shot.keyframe.key)  # type: ignore[union-attr]
        finally:
            renderer.close()
    return done, loads


def render_keyframes(plans: list[RenderPlan], store: ChunkStore, *, storage_options: dict[str, Any] | None = None,
                     isolate: bool = True, force: set[str] | None = None) -> KeyframeSummary:
    """Make every keyframe of ``plans`` that ``store`` lacks; the keyframe stage of a run.

    Args:
        plans: the film's plan, or every campaign cell's.
        store: the chunk store (OUT); keyframes are committed there under their keys.
        storage_options: fsspec options for reading references and pinned files.
        isolate: compose in a child process (default: see the module docstring); False runs
            the editing model in this process (tests, notebooks).
        force: keys to make again even if committed.

    Raises:
        FarmError: a keyframe model cannot be loaded or run, or a pinned file changed; before
            any chunk starts.
    """
    # 1. What storage lacks
    t0 = time.monotonic()
    options = storage_options if storage_options is not None else dict(store.storage_options or {})
    summary = KeyframeSummary()
    todo: list[tuple[ShotPlan, dict[str, str]]] = []
    for key, (shot, refs) in keyframe_shots(plans).items():
        # Checksummed (one frame: cheap): a keyframe gone bad is made again, not handed on.
        if key not in (force or set()) and store.is_complete(key, verify=True):
            summary.cached.append(key)
        else:
            todo.append((shot, refs))
    if not todo:
        summary.seconds = time.monotonic() - t0
        return summary
    events.emit("keyframes_start", detail={"keyframes": len(todo)})
    # 2. Pins: the file's pixels as given (no model, no torch)
    from reelfarm.render.keyframes import decode_pin

    composed = []
    for shot, refs in todo:
        kf = shot.keyframe
        assert kf is not None
        if kf.source == "pin":
            _commit(store, shot, decode_pin(_read(kf.pin, options), shot), {"sha256": kf.pin_sha256})  # type: ignore[arg-type]
            summary.pinned.append(kf.key)
        else:
            composed.append((shot, refs))
    # 3. Composed: each model loaded once, in a child process unless asked otherwise
    if composed:
        if isolate:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                done, loads = pool.submit(_compose, str(store.root), options, composed).result()
        else:
            done, loads = _compose(str(store.root), options, composed)
        summary.rendered.extend(done)
        summary.model_loads += loads
    summary.seconds = time.monotonic() - t0
    events.emit("keyframes_done", seconds=round(summary.seconds, 3), detail=summary.to_doc())
    logger.info("keyframes: %d composed, %d pinned, %d already in storage (%d model loads, %.1f s)",
                len(summary.rendered), len(summary.pinned), len(summary.cached), summary.model_loads,
                summary.seconds)
    return summary


def keyframe_sheet(plan: RenderPlan, store: ChunkStore, storage_options: dict[str, Any] | None = None) -> bytes:
    """A contact sheet (PNG) of the first frame every shot starts from, for approval.

    A shot with a keyframe shows it as committed (label ``<shot> model`` or ``<shot> pin``);
    any other shot shows the animatic keyframe it starts from (``<shot> animatic``).
    """
    import io

    from reelfarm.render import review
    from reelfarm.render.keyframes import collage, decode_image

    options = storage_options if storage_options is not None else dict(store.storage_options or {})
    images: dict[str, Any] = {}
    tiles = []
    for shot in plan.shots:
        frame = read_keyframe(store, shot)
        if frame is not None:
            tiles.append((f"{shot.shot_id} {shot.keyframe.source}", review.thumbnail(frame)))  # type: ignore[union-attr]
            continue
        for name in shot.characters:
            url = plan.references[name]
            if url not in images:
                images[url] = decode_image(_read(url, options), f"the reference of character {name!r} ({url})")
        frame = collage(shot, {n: images[plan.references[n]] for n in shot.characters})
        tiles.append((f"{shot.shot_id} animatic", review.thumbnail(frame)))
    buf = io.BytesIO()
    review.contact_sheet(tiles).save(buf, format="PNG")
    return buf.getvalue()


def keyframes_only(cells: list[tuple[str, RenderPlan]], out_url: str, storage_options: dict[str, Any] | None = None,
                   *, isolate: bool = True) -> tuple[KeyframeSummary, dict[str, str]]:
    """``reelfarm keyframes``: every keyframe storage lacks, then a sheet per cell; no chunk.

    Keyframes are committed to the chunk store at ``out_url`` under their content keys, so a
    later ``reelfarm render`` into the same OUT finds them and renders none again.

    Returns:
        The stage's summary, and cell -> URL of its ``keyframes.png``.
    """
    from reelfarm.storage import Location

    store = ChunkStore(out_url, storage_options=storage_options)
    summary = render_keyframes([p for _, p in cells], store, storage_options=storage_options, isolate=isolate)
    sheets = {}
    for cell, plan in cells:
        where = Location(out_url.rstrip("/") + (f"/{cell}" if cell else ""), storage_options=storage_options)
        sheets[cell] = where.write_bytes_atomic(KEYFRAME_SHEET, keyframe_sheet(plan, store, storage_options))
    return summary, sheets
