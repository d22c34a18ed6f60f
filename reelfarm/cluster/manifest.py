"""The manifest writer: one row per chunk, rewritten to OUT as chunks finish.

``OUT/manifest.parquet`` always holds the latest run; ``OUT/runs/<run_id>/manifest.parquet``
keeps each run's own. Writes go through the store's atomic small-file write, so a
reader sees the previous table or the new one, never half of one.
"""

from __future__ import annotations

import io
import logging
import time
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from reelfarm.cluster.store import ChunkStore
from reelfarm.schemas.manifest import ManifestRow, plan_rows, rows_to_table
from reelfarm.schemas.plan import RenderPlan

__all__ = ["ManifestGroup", "ManifestWriter", "read_manifest", "utcnow"]

logger = logging.getLogger(__name__)
MANIFEST = "manifest.parquet"
FLUSH_SHARE = 0.05  # the most of the driver's time periodic manifest writes may take


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def read_manifest(store: ChunkStore, run_id: str | None = None, prefix: str = "") -> pa.Table | None:
    """The latest manifest under OUT (or one run's), or None when there is none."""
    rel = MANIFEST if run_id is None else f"runs/{run_id}/{MANIFEST}"
    if prefix:
        rel = f"{prefix.strip('/')}/{rel}"
    data = store.read_bytes(rel)
    if data is None:
        return None
    return pq.read_table(io.BytesIO(data))


class ManifestWriter:
    """Holds the run's rows in memory and flushes them to storage now and then."""

    def __init__(self, store: ChunkStore, plan: RenderPlan, run_id: str, *, flush_s: float = 2.0,
                 prefix: str = "") -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.run_id = run_id
        self.flush_s = flush_s
        self.rows: list[ManifestRow] = plan_rows(plan, run_id)
        # key -> its row, or a list of rows where several chunks share a content key (rare)
        self._by_key: dict[str, ManifestRow | list[ManifestRow]] = {}
        by_key = self._by_key
        for row in self.rows:
            held = by_key.setdefault(row.content_key, row)
            if held is not row:
                if isinstance(held, list):
                    held.append(row)
                else:
                    by_key[row.content_key] = [held, row]
        self._last = 0.0
        self._took = 0.0  # how long the last flush took
        self._dirty = True

    def _rows(self, key: str) -> list[ManifestRow]:
        held = self._by_key.get(key)
        return [] if held is None else held if isinstance(held, list) else [held]

    def update(self, key: str, **fields: Any) -> None:
        for row in self._rows(key):
            for name, value in fields.items():
                setattr(row, name, value)
        self._dirty = True

    def get(self, key: str) -> ManifestRow:
        held = self._by_key[key]
        return held[0] if isinstance(held, list) else held

    def table(self) -> pa.Table:
        return rows_to_table(self.rows)

    def flush(self, *, force: bool = False) -> None:
        """Write the table if it changed, at most every ``flush_s`` (``force``: now).

        A big manifest is written less often: never more than FLUSH_SHARE of the driver's time
        (a 100,000-row table takes about a second to write; every 2 s would halve dispatch).
        ``flush_s=0`` still writes every time (tests, drills).
        """
        now = time.monotonic()
        gap = max(self.flush_s, self._took / FLUSH_SHARE) if self.flush_s > 0 else 0.0
        if not self._dirty or (not force and now - self._last < gap):
            return
        buf = io.BytesIO()
        pq.write_table(self.table(), buf, compression="zstd")
        data = buf.getvalue()
        base = f"{self.prefix}/" if self.prefix else ""
        self.store.write_bytes_atomic(f"{base}runs/{self.run_id}/{MANIFEST}", data)
        self.store.write_bytes_atomic(f"{base}{MANIFEST}", data)
        self._last = time.monotonic()
        self._took = self._last - now
        self._dirty = False


class ManifestGroup:
    """Several runs' manifests updated as one: a campaign's cells on one queue share chunks,
    and a chunk's news goes to every cell that uses it."""

    def __init__(self, writers: list[ManifestWriter]) -> None:
        self.writers = writers
        self.run_id = writers[0].run_id
        self._owners: dict[str, list[ManifestWriter]] = {}
        if len(writers) > 1:  # one writer (a film) owns every key: no index of 100,000 lists
            for w in writers:
                for key in w._by_key:
                    self._owners.setdefault(key, []).append(w)

    @property
    def rows(self) -> list[ManifestRow]:
        return [row for w in self.writers for row in w.rows]

    def update(self, key: str, **fields: Any) -> None:
        for w in self._owners.get(key, ()) if self._owners else self.writers:
            w.update(key, **fields)

    def get(self, key: str) -> ManifestRow:
        return (self._owners[key][0] if self._owners else self.writers[0]).get(key)

    def flush(self, *, force: bool = False) -> None:
        for w in self.writers:
            w.flush(force=force)
