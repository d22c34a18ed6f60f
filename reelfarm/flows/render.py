"""Render a film or campaign end to end: the plain functions the Prefect flows and CLI call.

validate -> plan -> (farm: identities, chunks) -> stitch -> manifest and report.
Nothing here imports Prefect; :mod:`reelfarm.flows.film` wraps these steps in a flow.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from reelfarm.cluster.farm import Farm, RenderSummary
from reelfarm.cluster.manifest import ManifestWriter
from reelfarm.cluster.store import ChunkStore
from reelfarm.errors import SpecError, StoreError
from reelfarm.flows.plan import plan_film
from reelfarm.schemas.film import Film
from reelfarm.schemas.plan import RenderPlan
from reelfarm.settings import Settings

__all__ = [
    "CAMPAIGN_DOC",
    "FILM_DOC",
    "RunResult",
    "load_run",
    "load_run_film",
    "new_run_id",
    "render_cells",
    "render_plan",
    "render_spec",
]

logger = logging.getLogger(__name__)
FILM_DOC = "film.json"  # the resolved film, kept in OUT so `reelfarm resume OUT` needs nothing else
CAMPAIGN_DOC = "campaign.json"  # a campaign's cells, each with OUT/<cell>/film.json
STITCH_ROUNDS = 3  # stitching finds a corrupt chunk -> render it again -> stitch again


@dataclass
class RunResult:
    """The outcome of one film (or campaign cell) run."""

    run_id: str
    out_url: str
    plan: RenderPlan
    summary: RenderSummary
    outputs: dict[str, str] = field(default_factory=dict)  # name -> URL
    stitch: Any = None

    @property
    def exit_code(self) -> int:
        return 0 if self.summary.ok else 1

    def shot_report(self) -> list[dict[str, Any]]:
        failed = self.summary.failed_shots
        return [{"shot": s.shot_id, "scene": s.scene_id, "chunks": len(s.chunks),
                 "status": "failed" if s.shot_id in failed else "ok", "error": failed.get(s.shot_id)}
                for s in self.plan.shots]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts if p]])


def render_plan(plan: RenderPlan, farm: Farm, store: ChunkStore, *, out_url: str, run_id: str,
                formats: tuple[str, ...] = ("mp4",), crf: int = 18, prefix: str = "",
                settings: Settings | None = None) -> RunResult:
    """Render the plan's missing chunks on ``farm``, then stitch the deliverables.

    ``store`` holds the chunks (shared by campaign cells); deliverables and the manifest
    go under ``out_url`` (``store.url(prefix)``).
    """
    settings = settings or farm.settings
    manifest = ManifestWriter(store, plan, run_id, flush_s=settings.manifest_flush_s, prefix=prefix)
    summary = farm.render(plan, manifest)
    result = RunResult(run_id=run_id, out_url=out_url, plan=plan, summary=summary)
    if not summary.ok:
        _partial(plan, store, out_url, result, crf)
        manifest.flush(force=True)
        _write_status(store, prefix, result)
        return result

    from reelfarm.render.stitch import stitch_film

    for round_ in range(STITCH_ROUNDS):
        try:
            stitched = stitch_film(plan, store, out_url, formats=formats, crf=crf,
                                   manifest=manifest.table())
            break
        except StoreError as e:
            # A chunk vanished or went corrupt since it was committed: render it again.
            bad = _bad_keys(e, plan)
            if not bad or round_ == STITCH_ROUNDS - 1:
                raise
            logger.warning("stitching found %d chunk(s) unreadable (%s): rendering again", len(bad), e)
            again = farm.render(plan, manifest, force=bad)
            summary.rendered.extend(again.rendered)
            summary.failed.update(again.failed)
            summary.failed_shots.update(again.failed_shots)
            if not again.ok:
                _partial(plan, store, out_url, result, crf)
                manifest.flush(force=True)
                _write_status(store, prefix, result)
                return result
    result.stitch = stitched
    seams = getattr(stitched, "seam_scores", {}) or {}
    for shot in plan.shots:
        for chunk, score in zip(shot.chunks[1:], seams.get(shot.shot_id, [])):
            manifest.update(chunk.key, seam_score=float(score))
    manifest.flush(force=True)
    result.outputs = dict(getattr(stitched, "outputs", {}) or {})
    _write_status(store, prefix, result)
    return result


def _partial(plan: RenderPlan, store: ChunkStore, out_url: str, result: RunResult, crf: int) -> None:
    """Some shots failed: no cut, but the good shots' clips, so nothing rendered is wasted."""
    from reelfarm.render.stitch import stitch_shots

    summary = result.summary
    good = [s.shot_id for s in plan.shots if s.shot_id not in summary.failed_shots]
    logger.warning("%d chunk(s) failed in %d shot(s): no cut; writing the %d good shot clip(s)",
                   len(summary.failed), len(summary.failed_shots), len(good))
    try:
        result.outputs = stitch_shots(plan, store, out_url, good, crf=crf)
    except Exception as e:  # noqa: BLE001 - the per-shot report matters more than the clips
        logger.warning("could not write the good shots' clips: %s", e)


def _bad_keys(error: StoreError, plan: RenderPlan) -> set[str]:
    """The chunks a StoreError names (it names every key it found missing or corrupt)."""
    text = str(error)
    return {c.key for c in plan.chunks if c.key in text}


def _write_status(store: ChunkStore, prefix: str, result: RunResult) -> None:
    doc = {
        "run_id": result.run_id,
        "ok": result.summary.ok,
        "rendered": len(result.summary.rendered),
        "cached": len(result.summary.cached),
        "failed": result.summary.failed,
        "shots": result.shot_report(),
        "model_loads": result.summary.model_loads,
        "identity_encodes": result.summary.identity_encodes,
        "blocklisted_nodes": sorted(result.summary.blocklisted),
        "outputs": result.outputs,
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    store.write_bytes_atomic(_join(prefix, "status.json") if prefix else "status.json",
                             json.dumps(doc, indent=1).encode())


def load_run_film(out_url: str, storage_options: dict[str, Any] | None = None) -> Film:
    """The film a run in ``out_url`` was started with (for ``reelfarm resume OUT``)."""
    store = ChunkStore(out_url, storage_options=storage_options)
    data = store.read_bytes(FILM_DOC)
    if data is None:
        raise SpecError.single(f"{out_url}/{FILM_DOC}", "no reelfarm run here (film.json missing)")
    return Film.model_validate_json(data)


def load_run(out_url: str, storage_options: dict[str, Any] | None = None
             ) -> Film | list[tuple[str, Film]]:
    """What a run in ``out_url`` renders: its film, or a campaign's ``(cell, film)`` list."""
    store = ChunkStore(out_url, storage_options=storage_options)
    doc = store.read_bytes(CAMPAIGN_DOC)
    if doc is None:
        return load_run_film(out_url, storage_options)
    cells = []
    for cell in json.loads(doc)["cells"]:
        data = store.read_bytes(f"{cell}/{FILM_DOC}")
        if data is None:
            raise SpecError.single(f"{out_url}/{cell}/{FILM_DOC}", f"campaign cell {cell!r} has no film.json")
        cells.append((cell, Film.model_validate_json(data)))
    return cells


def render_cells(cells: list[tuple[str, Film]], out_url: str, settings: Settings | None = None
                 ) -> dict[str, RunResult]:
    """Render campaign cells into ``out_url/<cell>/`` on one farm, chunks shared at ``out_url``."""
    settings = settings or Settings()
    store = ChunkStore(out_url, storage_options=settings.storage_options)
    results: dict[str, RunResult] = {}
    with Farm(store, settings) as farm:
        for cell, film in cells:
            results[cell] = render_plan(plan_film(film), farm, store, out_url=store.url(cell),
                                        run_id=new_run_id(), formats=tuple(film.output.formats),
                                        crf=film.output.crf, prefix=cell, settings=settings)
    return results


def render_spec(film: Film, out_url: str, settings: Settings | None = None, *,
                farm: Farm | None = None, run_id: str | None = None) -> RunResult:
    """Plan and render a validated film into ``out_url`` (a folder or any fsspec URL)."""
    settings = settings or Settings()
    plan = plan_film(film)
    store = ChunkStore(out_url, storage_options=settings.storage_options)
    store.write_bytes_atomic(FILM_DOC, film.model_dump_json(indent=1).encode())
    run_id = run_id or new_run_id()
    own = farm is None
    farm = farm or Farm(store, settings).start()
    farm.store = store
    try:
        return render_plan(plan, farm, store, out_url=out_url, run_id=run_id,
                           formats=tuple(film.output.formats), crf=film.output.crf, settings=settings)
    finally:
        if own:
            farm.shutdown()
