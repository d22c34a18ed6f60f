"""An ad campaign: a base film and a matrix of variants (aspect x product x tagline...).

Each cell of the matrix is one film. A matrix value deep-merges ``film:`` overrides into
the base film and fills ``{name}`` placeholders in prompts and the title from ``vars:``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from reelfarm.schemas.film import MAX_CAMPAIGN_CELLS, SPEC_VERSION, Film, Slug

__all__ = ["Campaign", "CampaignCell", "MatrixValue", "Schedule"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Schedule(_Strict):
    """When the campaign renders by itself: a cron line, as a Prefect deployment."""

    cron: str
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        try:
            CronSim(v, datetime(2026, 1, 1))
        except CronSimError as e:
            raise ValueError(f"not a valid cron line {v!r}: {e}") from None
        except Exception as e:  # noqa: BLE001 - cronsim has crashed on odd lines; refuse them too
            raise ValueError(f"not a valid cron line {v!r}: {type(e).__name__}") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(v)
        except Exception:
            raise ValueError(f"unknown time zone {v!r}") from None
        return v


class MatrixValue(_Strict):
    """One value of one matrix axis."""

    film: dict[str, Any] = {}
    vars: dict[Slug, str] = {}


class Campaign(_Strict):
    """The campaign document (``campaign.yaml``)."""

    reelfarm: int = Field(SPEC_VERSION, description="spec version")
    campaign: str = Field(..., min_length=1, max_length=200)
    film: str = Field(..., min_length=1, description="the base film, relative to this file")
    matrix: dict[Slug, dict[Slug, MatrixValue]] = Field(..., min_length=1)
    schedule: Schedule | None = None

    @field_validator("matrix")
    @classmethod
    def _non_empty_axes(cls, v: dict[str, dict[str, MatrixValue]]) -> dict[str, dict[str, MatrixValue]]:
        cells = 1
        for axis, values in v.items():
            if not values:
                raise ValueError(f"axis {axis!r} has no values")
            cells *= len(values)
        # Counted, not built: a matrix of ten axes of ten values is ten billion cells.
        if cells > MAX_CAMPAIGN_CELLS:
            raise ValueError(f"the matrix makes more than {MAX_CAMPAIGN_CELLS} cells, the limit per campaign "
                             f"(MAX_CAMPAIGN_CELLS), got {cells} cells")
        return v

    @property
    def cell_count(self) -> int:
        n = 1
        for values in self.matrix.values():
            n *= len(values)
        return n


class CampaignCell(_Strict):
    """One variant: its path under OUT (``wide/mug``), the axis values, and its film."""

    cell_id: str
    values: dict[str, str]
    film: Film
