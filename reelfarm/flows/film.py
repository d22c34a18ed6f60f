"""Prefect flows: films and campaigns, recorded stage by stage.

Prefect works at stage level (validate, plan, identities, render chunks, stitch) and
publishes a per-shot table; Ray works at chunk level inside ``render-chunks``. A Prefect
task per chunk would be the wrong grain: every task run costs an API round trip, and
through prefect-ray every Ray worker starts its own temporary Prefect server.
Resume never depends on Prefect's result cache: storage (content keys) decides what is done.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from reelfarm.cluster.farm import Farm
from reelfarm.cluster.store import ChunkStore
from reelfarm.errors import FarmError, RenderError
from reelfarm.flows.plan import plan_film
from reelfarm.flows.render import CAMPAIGN_DOC, FILM_DOC, RunResult, new_run_id, render_plan
from reelfarm.schemas.film import Film
from reelfarm.schemas.loader import LoadedCampaign, load_campaign, load_film
from reelfarm.schemas.plan import RenderPlan
from reelfarm.settings import Settings

__all__ = ["render_campaign_flow", "render_film_flow", "run_summary"]

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


@task(name="validate", cache_policy=NO_CACHE)
def validate_film(spec_url: str, storage_options: dict[str, Any]) -> Film:
    return load_film(spec_url, storage_options=storage_options)


@task(name="validate-campaign", cache_policy=NO_CACHE)
def validate_campaign(spec_url: str, storage_options: dict[str, Any]) -> LoadedCampaign:
    return load_campaign(spec_url, storage_options=storage_options)


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(film: Film) -> RenderPlan:
    return plan_film(film)


@task(name="render-and-stitch", cache_policy=NO_CACHE, retries=1, retry_condition_fn=is_retryable)
def render_task(plan: RenderPlan, farm: Farm, store: ChunkStore, out_url: str, run_id: str,
                formats: tuple[str, ...], crf: int, prefix: str) -> RunResult:
    return render_plan(plan, farm, store, out_url=out_url, run_id=run_id, formats=formats, crf=crf,
                       prefix=prefix)


def run_summary(result: RunResult) -> dict[str, Any]:
    """A JSON-able summary of a run (the flow's return value)."""
    s = result.summary
    return {
        "run_id": result.run_id,
        "out": result.out_url,
        "ok": s.ok,
        "exit_code": result.exit_code,
        "chunks": len(result.plan.chunks),
        "rendered": len(s.rendered),
        "cached": len(s.cached),
        "failed": len(s.failed),
        "failed_shots": dict(s.failed_shots),
        "model_loads": s.model_loads,
        "identity_encodes": s.identity_encodes,
        "nodes_used": len(s.nodes_used),
        "outputs": result.outputs,
    }


def _artifact_key(name: str) -> str:
    """Prefect artifact keys take lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "shots"


def _settings(settings: Settings | None) -> Settings:
    """Flow settings. Storage options (credentials) never travel as flow parameters,
    which Prefect stores in its database: they are read here, from REELFARM_* variables."""
    settings = settings or Settings()
    if not settings.storage_options:
        settings = settings.model_copy(update={"storage_options": Settings().storage_options})
    return settings


def _publish(result: RunResult, name: str) -> None:
    try:
        create_table_artifact(
            key=_artifact_key(name), table=result.shot_report(),
            description=f"reelfarm run {result.run_id}: per-shot status ({result.out_url})")
    except Exception as e:  # noqa: BLE001 - a report must never fail a finished render
        logger.warning("could not publish the shot table: %s", e)


def _run_film(film: Film, out_url: str, settings: Settings, farm: Farm | None, store: ChunkStore,
              prefix: str = "", out_store: ChunkStore | None = None) -> RunResult:
    plan = plan_task(film)
    (out_store or store).write_bytes_atomic(FILM_DOC, film.model_dump_json(indent=1).encode())
    own = farm is None
    farm = farm or Farm(store, settings).start()
    try:
        return render_task(plan, farm, store, out_url, new_run_id(), tuple(film.output.formats),
                           film.output.crf, prefix)
    finally:
        if own:
            farm.shutdown()


@flow(name="render-film", log_prints=True, validate_parameters=False)
def render_film_flow(spec: str, out: str, settings: Settings | None = None) -> dict[str, Any]:
    """Render a film spec into OUT. Fails (after keeping everything) if any shot failed."""
    log = get_run_logger()
    settings = _settings(settings)
    film = validate_film(spec, settings.storage_options)
    store = ChunkStore(out, storage_options=settings.storage_options)
    result = _run_film(film, out, settings, None, store)
    _publish(result, "shots")
    summary = run_summary(result)
    log.info("rendered %d, cached %d, failed %d chunks; %d model loads, %d identity encodes",
             summary["rendered"], summary["cached"], summary["failed"], summary["model_loads"],
             summary["identity_encodes"])
    if not result.summary.ok:
        raise RenderError(f"{len(result.summary.failed_shots)} shot(s) failed: "
                          + "; ".join(f"{k}: {v}" for k, v in result.summary.failed_shots.items()))
    return summary


@flow(name="render-campaign", log_prints=True, validate_parameters=False)
def render_campaign_flow(spec: str, out: str, settings: Settings | None = None) -> dict[str, Any]:
    """Render every cell of a campaign into ``OUT/<cell>/``, chunks shared under ``OUT/chunks``."""
    log = get_run_logger()
    settings = _settings(settings)
    loaded = validate_campaign(spec, settings.storage_options)
    store = ChunkStore(out, storage_options=settings.storage_options)
    store.write_bytes_atomic(CAMPAIGN_DOC, json.dumps(
        {"campaign": loaded.campaign.campaign, "spec": spec,
         "cells": [c.cell_id for c in loaded.cells]}, indent=1).encode())
    cells: dict[str, Any] = {}
    failed: list[str] = []
    with Farm(store, settings) as farm:  # one pool of workers for every cell
        for cell in loaded.cells:
            cell_url = store.url(cell.cell_id)
            cell_store = ChunkStore(cell_url, storage_options=settings.storage_options)
            result = _run_film(cell.film, cell_url, settings, farm, store, prefix=cell.cell_id,
                               out_store=cell_store)
            _publish(result, "shots-" + cell.cell_id)
            cells[cell.cell_id] = run_summary(result)
            if not result.summary.ok:
                failed.append(cell.cell_id)
            log.info("cell %s: rendered %d, cached %d", cell.cell_id, len(result.summary.rendered),
                     len(result.summary.cached))
    if failed:
        raise RenderError(f"{len(failed)} cell(s) had failed shots: {', '.join(failed)}")
    return {"campaign": loaded.campaign.campaign, "cells": cells}
