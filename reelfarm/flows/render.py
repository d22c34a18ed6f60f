"""Run a film or a campaign end to end: the one plain run function the CLI and Prefect call.

    job (film, campaign cells, or OUT to resume) -> run_job:
        write run documents -> one farm for every cell -> per cell: plan, render the
        missing chunks, stitch the deliverables, write status and manifest

A campaign's cells share one queue; a cell whose chunks are all done is stitched on a
thread of the driver while the others still render (its cut is out before the campaign
ends), the rest once the queue is empty.

Nothing here imports Prefect. :mod:`reelfarm.flows.film` decorates :func:`run_job` as
flows and passes :class:`Stages` whose steps are Prefect tasks; that is all Prefect adds.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from reelfarm import events
from reelfarm.cluster.farm import Farm, RenderSummary
from reelfarm.cluster.manifest import ManifestWriter
from reelfarm.cluster.outdir import CAMPAIGN_DOC, FILM_DOC, OutputFolder
from reelfarm.cluster.store import ChunkStore
from reelfarm.errors import SpecError, StoreError
from reelfarm.flows.keyframes import KeyframeSummary, render_keyframes
from reelfarm.flows.plan import plan_film
from reelfarm.schemas.film import Film, Output
from reelfarm.schemas.loader import LoadedCampaign
from reelfarm.schemas.plan import RenderPlan
from reelfarm.settings import Settings

__all__ = [
    "CAMPAIGN_DOC",
    "FILM_DOC",
    "RunJob",
    "RunResult",
    "Cell",
    "Stages",
    "begin_cell",
    "finish_cell",
    "keyframe_stage",
    "load_run",
    "load_run_film",
    "new_run_id",
    "render_cells",
    "render_chunks",
    "render_plan",
    "render_spec",
    "run_job",
    "run_summary",
    "up_to_date",
]

logger = logging.getLogger(__name__)
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
    error: str | None = None  # the run could not finish its deliverables (storage failed)
    manifest: Any = None  # the run's manifest table (pyarrow), for the per-shot qc report
    keyframes: KeyframeSummary | None = None  # the keyframe stage (a campaign's: on every cell)

    @property
    def ok(self) -> bool:
        return self.summary.ok and self.error is None

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def shot_report(self) -> list[dict[str, Any]]:
        """Per shot: status, error, and its identity score, retakes and qc flags."""
        from reelfarm.render.quality import shot_qc

        failed = self.summary.failed_shots
        qc = shot_qc(self.plan, self.manifest) if self.manifest is not None else {}
        return [{"shot": s.shot_id, "scene": s.scene_id, "chunks": len(s.chunks),
                 "status": "failed" if s.shot_id in failed else "ok", "error": failed.get(s.shot_id),
                 **(qc[s.shot_id].report() if s.shot_id in qc else {})}
                for s in self.plan.shots]


def run_summary(result: RunResult) -> dict[str, Any]:
    """A JSON-able summary of a run (what flows return and the CLI prints)."""
    s = result.summary
    return {
        "run_id": result.run_id,
        "out": result.out_url,
        "ok": result.ok,
        "exit_code": result.exit_code,
        "error": result.error,
        "chunks": len(result.plan.chunks),
        "rendered": len(s.rendered),
        "cached": len(s.cached),
        "failed": len(s.failed),
        "failed_shots": dict(s.failed_shots),
        "model_loads": s.model_loads,
        "identity_encodes": s.identity_encodes,
        "steps_saved": s.steps_saved,
        "keyframes": result.keyframes.to_doc() if result.keyframes is not None else None,
        "nodes_used": len(s.nodes_used),
        "outputs": result.outputs,
    }


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# --- what to run -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunJob:
    """A film (one cell named ``""``) or a campaign's cells, into one OUT.

    Attributes:
        out_url: OUT, any fsspec URL.
        cells: ``(cell id, film)``; a film's only cell is ``""`` and writes to OUT itself.
        campaign: the campaign's title and spec URL, for ``OUT/campaign.json``.
    """

    out_url: str
    cells: tuple[tuple[str, Film], ...]
    campaign: tuple[str, str] | None = None

    @classmethod
    def film(cls, film: Film, out_url: str) -> RunJob:
        return cls(out_url, (("", film),))

    @classmethod
    def from_loaded(cls, loaded: Film | LoadedCampaign, out_url: str, spec: str) -> RunJob:
        """A job from what ``load_spec`` returned."""
        if isinstance(loaded, Film):
            return cls.film(loaded, out_url)
        return cls(out_url, tuple((c.cell_id, c.film) for c in loaded.cells),
                   (loaded.campaign.campaign, spec))

    @property
    def is_campaign(self) -> bool:
        return self.campaign is not None or any(cell for cell, _ in self.cells)


def load_run(out_url: str, storage_options: dict[str, Any] | None = None
             ) -> Film | list[tuple[str, Film]]:
    """What a run in ``out_url`` renders: its film, or a campaign's ``(cell, film)`` list."""
    out = OutputFolder(out_url, storage_options=storage_options)
    doc = out.read_campaign()
    if doc is None:
        return out.read_film()
    cells = []
    for cell in doc["cells"]:
        try:
            cells.append((cell, out.cell(cell).read_film()))
        except SpecError:
            raise SpecError.single(f"{out_url}/{cell}/{FILM_DOC}",
                                   f"campaign cell {cell!r} has no film.json") from None
    return cells


def load_run_film(out_url: str, storage_options: dict[str, Any] | None = None) -> Film:
    """The film a run in ``out_url`` was started with (for ``reelfarm resume OUT``)."""
    return OutputFolder(out_url, storage_options=storage_options).read_film()


def resume_job(out_url: str, storage_options: dict[str, Any] | None = None) -> RunJob:
    """The job a run in ``out_url`` was started with, to finish it."""
    run = load_run(out_url, storage_options)
    if isinstance(run, Film):
        return RunJob.film(run, out_url)
    doc = OutputFolder(out_url, storage_options=storage_options).read_campaign() or {}
    return RunJob(out_url, tuple(run), (doc.get("campaign", ""), doc.get("spec", "")))


# --- one cell --------------------------------------------------------------------------------
def render_plan(plan: RenderPlan, farm: Farm, store: ChunkStore, *, out_url: str, run_id: str,
                formats: tuple[str, ...] = ("mp4",), crf: int = 18, prefix: str = "",
                settings: Settings | None = None, output: Output | None = None) -> RunResult:
    """Render the plan's missing chunks on ``farm``, then stitch the deliverables (one cell).

    ``store`` holds the chunks (shared by campaign cells); deliverables and the manifest
    go under ``out_url`` (``store.url(prefix)``). ``output`` (the spec's ``output:``), when
    given, decides the formats, quality and review files over ``formats`` and ``crf``.
    """
    cell = begin_cell(plan, store, run_id=run_id, prefix=prefix, out_url=out_url,
                      settings=settings or farm.settings, output=output or Output(formats=formats, crf=crf))
    (summary,) = render_chunks(farm, [cell])
    return finish_cell(cell, summary, farm, store)


@dataclass
class Cell:
    """One film (or campaign cell) on its way: its plan, manifest, OUT and output options."""

    plan: RenderPlan
    manifest: ManifestWriter
    out_url: str
    output: Output
    prefix: str = ""
    t0: float = field(default_factory=time.monotonic)
    keyframes: KeyframeSummary | None = None


def begin_cell(plan: RenderPlan, store: ChunkStore, *, run_id: str, prefix: str, out_url: str,
               settings: Settings, output: Output) -> Cell:
    """A cell's manifest, and the event that says it started."""
    manifest = ManifestWriter(store, plan, run_id, flush_s=settings.manifest_flush_s, prefix=prefix)
    events.emit("run_start", run_id=run_id, cell=prefix, est_s=plan.est_gpu_s, frames=plan.frames,
                detail={"shots": {s.shot_id: len(s.chunks) for s in plan.shots},
                        "frames": {s.shot_id: s.frames for s in plan.shots}})
    return Cell(plan, manifest, out_url, output, prefix)


def keyframe_stage(cells: list[Cell], store: ChunkStore, settings: Settings) -> KeyframeSummary:
    """Every cell's keyframes that storage lacks, before any chunk starts (flows/keyframes.py)."""
    return render_keyframes([c.plan for c in cells], store, storage_options=settings.storage_options)


def render_chunks(farm: Farm, cells: list[Cell],
                  on_cell_done: Callable[[int, RenderSummary], None] | None = None) -> list[RenderSummary]:
    """Every cell's missing chunks on one queue (identical chunks once); a summary per cell.

    ``on_cell_done(i, summary)`` is called as soon as cell ``i``'s chunks are all done
    while others still render (see ``Farm.render_many``)."""
    return farm.render_many([(c.plan, c.manifest) for c in cells], on_plan_done=on_cell_done)


class RerenderNeeded(Exception):
    """An early stitch found chunks unreadable: the cell is finished after the queue."""


def finish_cell(cell: Cell, summary: RenderSummary, farm: Farm | None, store: ChunkStore) -> RunResult | None:
    """Stitch a cell whose chunks are rendered (or its good shots, when some failed); status.

    ``farm`` renders again a chunk stitching finds unreadable. Without one (an early
    stitch while the farm's queue runs) such a cell returns None, nothing written, and is
    finished again once the farm is free.
    """
    plan, manifest, out_url, output = cell.plan, cell.manifest, cell.out_url, cell.output
    run_id, prefix = manifest.run_id, cell.prefix
    out = OutputFolder(out_url, storage_options=store.storage_options)
    result = RunResult(run_id=run_id, out_url=out_url, plan=plan, summary=summary, keyframes=cell.keyframes)
    if summary.ok:
        review = {"contact_sheet": output.contact_sheet, "report": output.report}
        events.emit("stitch_start", run_id=run_id, cell=prefix)
        try:
            _stitch(result, farm, store, manifest, formats=tuple(output.formats), crf=output.crf, review=review)
        except RerenderNeeded as e:
            logger.warning("cell %s: %s; stitched again after the queue", prefix or "-", e)
            events.emit("stitch_done", run_id=run_id, cell=prefix, error=f"deferred: {e}")
            return None
        except OSError as e:
            # OUT's storage failed (full, gone, read-only). Every deliverable is published
            # whole or not at all, and every chunk is kept: `reelfarm resume OUT` finishes it.
            result.error = f"storage: {type(e).__name__}: {e}"
            logger.error("%s: could not write the deliverables: %s", out_url, result.error)
        events.emit("stitch_done", run_id=run_id, cell=prefix, error=result.error,
                    detail={"outputs": sorted(result.outputs)})
    if not summary.ok:
        _partial(plan, store, out_url, result, output.crf)
    result.manifest = manifest.table()
    try:
        manifest.flush(force=True)
        out.write_status(_status_doc(result))
    except OSError as e:  # the same full disk: the run's outcome still reaches the caller
        result.error = result.error or f"storage: {type(e).__name__}: {e}"
        logger.error("%s: could not write status.json: %s", out_url, e)
    events.emit("run_done", run_id=run_id, cell=prefix, seconds=round(time.monotonic() - cell.t0, 3),
                detail={"ok": result.ok, "rendered": len(summary.rendered), "cached": len(summary.cached),
                        "failed_shots": dict(summary.failed_shots)})
    return result


def _stitch(result: RunResult, farm: Farm | None, store: ChunkStore, manifest: ManifestWriter, *,
            formats: tuple[str, ...], crf: int, review: dict[str, bool]) -> None:
    """Stitch; a chunk found missing or corrupt is rendered again and stitching retried."""
    from reelfarm.render.stitch import stitch_film

    plan, summary = result.plan, result.summary
    for round_ in range(STITCH_ROUNDS):
        try:
            stitched = stitch_film(plan, store, result.out_url, formats=formats, crf=crf,
                                   manifest=manifest.table(), **review)
            break
        except StoreError as e:
            bad = set(e.keys) & {c.key for c in plan.chunks}
            if not bad or round_ == STITCH_ROUNDS - 1:
                raise
            if farm is None:  # the farm's queue is running: not now
                raise RerenderNeeded(f"{len(bad)} chunk(s) unreadable") from e
            logger.warning("stitching found %d chunk(s) unreadable (%s): rendering again", len(bad), e)
            again = farm.render(plan, manifest, force=bad)
            summary.rendered.extend(again.rendered)
            summary.cached = [k for k in summary.cached if k not in bad]
            summary.failed.update(again.failed)
            summary.failed_shots.update(again.failed_shots)
            if not again.ok:
                return
    result.stitch = stitched
    for shot in plan.shots:
        for chunk, score in zip(shot.chunks[1:], stitched.seam_scores.get(shot.shot_id, [])):
            manifest.update(chunk.key, seam_score=float(score))
    result.outputs = dict(stitched.outputs)


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


def _status_doc(result: RunResult) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "ok": result.ok,
        "error": result.error,
        "rendered": len(result.summary.rendered),
        "cached": len(result.summary.cached),
        "failed": result.summary.failed,
        "shots": result.shot_report(),
        "model_loads": result.summary.model_loads,
        "identity_encodes": result.summary.identity_encodes,
        "steps_saved": result.summary.steps_saved,
        "keyframes": result.keyframes.to_doc() if result.keyframes is not None else None,
        "blocklisted_nodes": sorted(result.summary.blocklisted),
        "outputs": result.outputs,
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


# --- the run ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stages:
    """The steps of a run that a recorder (Prefect) may wrap; plain functions by default.

    Attributes:
        plan: ``Film -> RenderPlan``, per cell.
        keyframes: :func:`keyframe_stage`: every cell's keyframes, before any chunk.
        chunks: :func:`render_chunks`: every cell's chunks on one queue; it calls back when
            a cell's own chunks are all done.
        finish: :func:`finish_cell`: stitch one cell and write its status; for a cell done
            early, on the stitch thread with no farm (None back: finish it again after).
        publish: called with each cell's result and its name (artifacts); no-op here.
    """

    plan: Callable[[Film], RenderPlan] = plan_film
    keyframes: Callable[..., KeyframeSummary] = keyframe_stage
    chunks: Callable[..., list[RenderSummary]] = render_chunks
    finish: Callable[..., RunResult] = finish_cell
    publish: Callable[[RunResult, str], None] = lambda result, name: None


PLAIN = Stages()


def run_job(job: RunJob, settings: Settings | None = None, *, farm: Farm | None = None,
            stages: Stages = PLAIN, run_id: str | None = None) -> dict[str, RunResult]:
    """Run a film or a campaign end to end: the one run function.

    Every cell's chunks go to one chunk store at OUT (identical chunks render once) and
    one farm (workers keep their models); each cell's deliverables, manifest and status go
    to ``OUT/<cell>`` (OUT itself for a film).

    Args:
        job: what to render and where.
        settings: run settings (default: from ``REELFARM_*``).
        farm: a started farm to use (kept running); default one for this run.
        stages: the steps, plain or wrapped as Prefect tasks.
        run_id: the run id of a film job (default: a new one).

    Returns:
        Cell id -> its result (``""`` for a film).
    """
    settings = settings or Settings()
    store = ChunkStore(job.out_url, storage_options=settings.storage_options)
    out = OutputFolder(job.out_url, storage_options=settings.storage_options)
    if job.campaign is not None:
        out.write_campaign(job.campaign[0], job.campaign[1], [cell for cell, _ in job.cells])
    for cell, film in job.cells:  # before any work: `reelfarm resume OUT` needs them
        out.cell(cell).write_film(film)
    own = farm is None
    farm = farm or Farm(store, settings).check()  # Ray starts when a chunk must render
    farm.store = store
    results: dict[str, RunResult] = {}
    # Cells whose chunks are done while others render are stitched on this thread, one at
    # a time (stitching is ffmpeg and numpy on the driver; the farm's loop keeps the GPUs
    # fed meanwhile). Each stitch runs in a copy of this context, taken here, so Prefect
    # records it as a task of the flow, not of render-chunks.
    stitcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reelfarm-stitch")
    early: dict[int, Future] = {}
    try:
        # Every cell's chunks on one queue, then each cell's deliverables.
        cells = [begin_cell(stages.plan(film), store, run_id=run_id or new_run_id(), prefix=cell,
                            out_url=out.cell(cell).root, settings=settings, output=film.output)
                 for cell, film in job.cells]
        keyframes = stages.keyframes(cells, store, settings)  # before any chunk starts
        for cell in cells:
            cell.keyframes = keyframes
        contexts = [contextvars.copy_context() for _ in cells]

        def cell_done(i: int, summary: RenderSummary) -> None:
            early[i] = stitcher.submit(contexts[i].run, stages.finish, cells[i], summary, None, store)

        summaries = stages.chunks(farm, cells, cell_done if len(cells) > 1 else None)
        for i, ((name, _), cell, summary) in enumerate(zip(job.cells, cells, summaries)):
            result = early[i].result() if i in early else None
            if result is None:  # not done early, or its early stitch needs the farm
                result = stages.finish(cell, summary, farm, store)
            stages.publish(result, name)
            results[name] = result
    finally:
        stitcher.shutdown(wait=True, cancel_futures=True)
        if own:
            farm.shutdown()
    return results


def up_to_date(job: RunJob, settings: Settings | None = None) -> bool:
    """Whether a run of ``job`` would render nothing and encode nothing.

    Every chunk committed and every deliverable in OUT made from the current inputs. Reads
    storage only (no Ray, no Prefect), so a re-run of a finished film costs seconds.
    """
    from reelfarm.render.stitch import freshness

    settings = settings or Settings()
    store = ChunkStore(job.out_url, storage_options=settings.storage_options)
    out = OutputFolder(job.out_url, storage_options=settings.storage_options)
    for cell, film in job.cells:
        plan = plan_film(film)
        if not all(store.is_complete(c.key) for c in plan.chunks):
            return False
        o = film.output
        if not freshness(plan, out.cell(cell), formats=tuple(o.formats), crf=o.crf,
                         contact_sheet=o.contact_sheet, report=o.report).up_to_date:
            return False
    return True


def render_spec(film: Film, out_url: str, settings: Settings | None = None, *,
                farm: Farm | None = None, run_id: str | None = None) -> RunResult:
    """Plan and render a validated film into ``out_url`` (a folder or any fsspec URL)."""
    return run_job(RunJob.film(film, out_url), settings, farm=farm, run_id=run_id)[""]


def render_cells(cells: list[tuple[str, Film]], out_url: str, settings: Settings | None = None
                 ) -> dict[str, RunResult]:
    """Render campaign cells into ``out_url/<cell>/`` on one farm, chunks shared at ``out_url``."""
    return run_job(RunJob(out_url, tuple(cells)), settings)
