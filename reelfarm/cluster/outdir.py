"""The output folder's run documents: ``film.json``, ``campaign.json``, ``status.json``.

They are what ``reelfarm resume OUT`` and ``reelfarm status OUT`` read, so a run needs
nothing but its OUT to be finished or inspected. Each is written in one step
(:meth:`Location.write_bytes_atomic`). Chunks live in :class:`~reelfarm.cluster.store.ChunkStore`,
the manifest in :mod:`reelfarm.cluster.manifest`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from reelfarm.errors import FarmError, SpecError
from reelfarm.schemas.film import Film
from reelfarm.storage import Location, check_relpath

__all__ = ["CAMPAIGN_DOC", "FILM_DOC", "STATUS_DOC", "OutputFolder"]

FILM_DOC = "film.json"  # the resolved film, kept in OUT so `reelfarm resume OUT` needs nothing else
CAMPAIGN_DOC = "campaign.json"  # a campaign's cells, each with OUT/<cell>/film.json
STATUS_DOC = "status.json"  # the last run's outcome, per shot


class OutputFolder(Location):
    """OUT (or a campaign cell's ``OUT/<cell>``) as the home of a run's documents."""

    def check(self) -> OutputFolder:
        """Refuse an OUT that cannot hold a run, before anything starts (no file written).

        Raises:
            FarmError: OUT is an existing file, or a folder that cannot be made or written.
        """
        if self.local:
            path = self._path()
            probe = path
            while probe and not os.path.exists(probe):  # the nearest existing ancestor
                probe = os.path.dirname(probe.rstrip("/"))
            if os.path.exists(path) and not os.path.isdir(path):
                raise FarmError(f"--out {self.root_url}: is a file, not a folder")
            if not probe or not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
                raise FarmError(f"--out {self.root_url}: cannot create or write there ({probe or '/'} "
                                "is not a writable folder)")
            if probe.startswith(("/proc", "/sys", "/dev")):
                raise FarmError(f"--out {self.root_url}: {probe} is a kernel file system, not storage")
            return self
        bucket = self._path().split("/", 1)[0]
        try:
            self.fs.ls(bucket, detail=False, refresh=True)  # one LIST: the bucket answers
        except FileNotFoundError:
            raise FarmError(f"--out {self.root_url}: the bucket {bucket!r} does not exist") from None
        except Exception as e:  # noqa: BLE001 - credentials, endpoint: say which
            raise FarmError(f"--out {self.root_url}: cannot reach it ({type(e).__name__}: {e})") from None
        return self

    def cell(self, cell: str) -> OutputFolder:
        """The folder of one campaign cell; ``""`` is this folder."""
        if not cell:
            return self
        return OutputFolder(self.url(check_relpath(cell)), storage_options=self.storage_options)

    def _json(self, relpath: str) -> Any:
        data = self.read_bytes(relpath)
        return None if data is None else json.loads(data)

    def write_film(self, film: Film) -> str:
        return self.write_bytes_atomic(FILM_DOC, film.model_dump_json(indent=1).encode())

    def read_film(self) -> Film:
        """The film a run here was started with.

        Raises:
            SpecError: there is no run here.
        """
        data = self.read_bytes(FILM_DOC)
        if data is None:
            raise SpecError.single(self.url(FILM_DOC), "no reelfarm run here (film.json missing)")
        return Film.model_validate_json(data)

    def write_campaign(self, campaign: str, spec: str, cells: list[str]) -> str:
        doc = {"campaign": campaign, "spec": spec, "cells": cells}
        return self.write_bytes_atomic(CAMPAIGN_DOC, json.dumps(doc, indent=1).encode())

    def read_campaign(self) -> dict[str, Any] | None:
        """``{"campaign", "spec", "cells"}`` when OUT holds a campaign run, else None."""
        return self._json(CAMPAIGN_DOC)

    def write_status(self, doc: dict[str, Any]) -> str:
        return self.write_bytes_atomic(STATUS_DOC, json.dumps(doc, indent=1).encode())

    def read_status(self) -> dict[str, Any] | None:
        return self._json(STATUS_DOC)
