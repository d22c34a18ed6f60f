"""Prefect deployments: a campaign's cron schedule becomes a deployment that renders nightly.

``reelfarm schedule campaign.yaml --out s3://bucket/spring`` serves it from this process;
``build_deployment`` gives the deployment object to apply to a work pool instead.
"""

from __future__ import annotations

import re

from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from reelfarm.errors import SpecError
from reelfarm.flows.film import render_campaign_flow
from reelfarm.schemas.loader import load_campaign

__all__ = ["build_deployment", "deployment_name"]


def deployment_name(title: str) -> str:
    """A deployment name from a campaign title: lower-case slug."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "campaign"


def build_deployment(spec: str, out: str, *, name: str | None = None,
                     storage_options: dict | None = None, allowed_roots: list[str] | None = None
                     ) -> RunnerDeployment:
    """The deployment that renders ``spec`` into ``out`` on the campaign's schedule.

    ``allowed_roots``: where the campaign may read besides its folder (each nightly run
    reads them from ``REELFARM_ALLOWED_READ_ROOTS`` in the worker's environment).

    Raises:
        SpecError: the campaign is invalid or has no ``schedule``.
    """
    loaded = load_campaign(spec, storage_options=storage_options, allowed_roots=allowed_roots or ())
    schedule = loaded.campaign.schedule
    if schedule is None:
        raise SpecError.single(spec, "the campaign has no `schedule: {cron: ...}` to deploy",
                               path="schedule")
    return render_campaign_flow.to_deployment(
        name=name or deployment_name(loaded.campaign.campaign),
        schedule=Cron(schedule.cron, timezone=schedule.timezone),
        parameters={"spec": spec, "out": out},
        description=f"reelfarm campaign {loaded.campaign.campaign!r}: "
                    f"{len(loaded.cells)} cells into {out}",
        tags=["reelfarm", "campaign"],
    )
