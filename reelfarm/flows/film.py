"""Prefect flows: films, campaigns and resumes, recorded stage by stage.

Each flow decorates the one run function, :func:`reelfarm.flows.render.run_job`, and adds
only what Prefect adds: task records for validate, plan, keyframes, render-chunks and stitch, a per-shot
table artifact, a retry for retryable failures, and deployments. Prefect works at stage
level; Ray works at chunk level inside ``render-chunks``. A campaign cell whose chunks are
done while others render is stitched at once, on a thread, as a ``stitch`` task of the flow
beside ``render-chunks``. A Prefect task per chunk would be the wrong grain: every task
run costs an API round trip, and through prefect-ray every Ray worker starts its own
temporary Prefect server. Resume never depends on
Prefect's result cache: storage (content keys) decides what is done.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from reelfarm.errors import FarmError
from reelfarm.flows.plan import plan_film
from reelfarm.flows.render import (
    RunJob,
    RunResult,
    Stages,
    finish_cell,
    keyframe_stage,
    render_chunks,
    resume_job,
    run_job,
    run_summary,
)
from reelfarm.schemas.loader import load_spec
from reelfarm.settings import Settings

__all__ = ["record_run", "render_campaign_flow", "render_film_flow", "resume_flow",
           "run_summary"]

logger = logging.getLogger(__name__)


def is_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a Prefect task only for failures whose class says trying again may help."""
    try:
        state.result()
    except FarmError as e:
        return e.retryable
    except Exception:  # noqa: BLE001 - unknown failures are not retried
        return False
    return False


def _artifact_key(name: str) -> str:
    """Prefect artifact keys take lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "shots"


def _publish(result: RunResult, cell: str) -> None:
    try:
        create_table_artifact(
            key=_artifact_key("shots-" + cell if cell else "shots"), table=result.shot_report(),
            description=f"reelfarm run {result.run_id}: per-shot status ({result.out_url})")
    except Exception as e:  # noqa: BLE001 - a report must never fail a finished render
        logger.warning("could not publish the shot table: %s", e)


PREFECT_STAGES = Stages(
    plan=task(name="plan", cache_policy=NO_CACHE)(plan_film),
    keyframes=task(name="keyframes", cache_policy=NO_CACHE)(keyframe_stage),
    chunks=task(name="render-chunks", cache_policy=NO_CACHE)(render_chunks),
    finish=task(name="stitch", cache_policy=NO_CACHE, retries=1, retry_condition_fn=is_retryable)(finish_cell),
    publish=_publish,
)
validate_task = task(name="validate", cache_policy=NO_CACHE)(load_spec)
resume_task = task(name="read-run", cache_policy=NO_CACHE)(resume_job)


def _settings(settings: Settings | None) -> Settings:
    """Flow settings. Storage options (credentials) are excluded from the settings' dump,
    so they never become flow parameters in Prefect's database; a deployment's run reads
    them here, from REELFARM_* variables."""
    settings = settings or Settings()
    if not settings.storage_options:
        settings = settings.model_copy(update={"storage_options": Settings().storage_options})
    return settings


def _finish(job: RunJob, results: dict[str, RunResult]) -> dict[str, Any] | State:
    """The flow's return value: the summary; when a shot failed (everything else kept), a
    Failed state carrying it, so Prefect records a failed run without a traceback."""
    log = get_run_logger()
    cells = {cell: run_summary(r) for cell, r in results.items()}
    for cell, s in cells.items():
        log.info("%srendered %d, cached %d, failed %d chunks; %d model loads, %d identity encodes",
                 f"cell {cell}: " if cell else "", s["rendered"], s["cached"], s["failed"],
                 s["model_loads"], s["identity_encodes"])
    summary = ({"campaign": job.campaign[0] if job.campaign else "", "cells": cells}
               if job.is_campaign else cells[""])
    failed = {f"{cell}/{shot}" if cell else shot: err for cell, s in cells.items()
              for shot, err in s["failed_shots"].items()}
    failed.update({cell or "run": s["error"] for cell, s in cells.items() if s.get("error")})
    if failed:
        return Failed(message=f"{len(failed)} shot(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()),
                      data=summary)
    return summary


@flow(name="render-film", log_prints=True, validate_parameters=False)
def render_film_flow(spec: str, out: str, settings: Settings | None = None) -> dict[str, Any] | State:
    """Render a film spec into OUT. Fails (after keeping everything) if any shot failed."""
    settings = _settings(settings)
    loaded = validate_task(spec, storage_options=settings.storage_options,
                           allowed_roots=settings.allowed_read_roots)
    job = RunJob.from_loaded(loaded, out, spec)
    return _finish(job, run_job(job, settings, stages=PREFECT_STAGES))


@flow(name="render-campaign", log_prints=True, validate_parameters=False)
def render_campaign_flow(spec: str, out: str, settings: Settings | None = None) -> dict[str, Any] | State:
    """Render every cell of a campaign into ``OUT/<cell>/``, chunks shared under ``OUT/chunks``."""
    return render_film_flow.fn(spec, out, settings)


@flow(name="resume", log_prints=True, validate_parameters=False)
def resume_flow(out: str, settings: Settings | None = None) -> dict[str, Any] | State:
    """Finish the film or campaign run in OUT: renders only what storage lacks."""
    settings = _settings(settings)
    job = resume_task(out, settings.storage_options)
    return _finish(job, run_job(job, settings, stages=PREFECT_STAGES))


def record_run(flow_fn: Any, *args: Any) -> dict[str, Any]:
    """Run a flow and return its summary, also when shots failed (``summary["ok"]`` false).

    Raises:
        FarmError: the run could not finish (bad input, no workers, storage down).
    """
    state = flow_fn(*args, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result  # the summary, also from a Failed state (shots failed, the rest kept)
