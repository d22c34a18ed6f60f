"""The manifest: one row per chunk, as a pydantic row model and its Arrow schema.

Written as ``OUT/manifest.parquet``. It is plain Parquet: pandas, DuckDB or Spark read it
without reelfarm installed. ``MANIFEST_SCHEMA`` and ``ManifestRow`` must agree (a test
checks it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from reelfarm.schemas.plan import RenderPlan

__all__ = [
    "MANIFEST_SCHEMA",
    "MANIFEST_VERSION",
    "ChunkStatus",
    "ManifestRow",
    "plan_rows",
    "rows_to_table",
    "table_to_rows",
]

MANIFEST_VERSION = 1
# Columns added with quality control; a manifest without them reads back with nulls.
QC_COLUMNS = frozenset({"identity_score", "continuity_score", "take", "takes", "qc_flag", "scores"})
# Columns added later; a manifest without them reads back with nulls too.
LATER_COLUMNS = QC_COLUMNS | {"steps_saved", "gpu"}
ChunkStatus = Literal["planned", "running", "done", "cached", "failed"]

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scene_id", pa.string(), nullable=False),
        pa.field("shot_id", pa.string(), nullable=False),
        pa.field("chunk_index", pa.int32(), nullable=False),
        pa.field("chunk_name", pa.string(), nullable=False),
        pa.field("frame_start", pa.int32(), nullable=False),
        pa.field("frame_end", pa.int32(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("overlap", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("content_key", pa.string(), nullable=False),
        pa.field("depends_on", pa.string()),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("model_id", pa.string()),
        pa.field("est_gpu_s", pa.float64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("worker", pa.string()),
        pa.field("node", pa.string()),
        pa.field("gpu", pa.string()),  # the worker's GPU: "NVIDIA H200 (139.8 GiB)", "cpu"
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("render_s", pa.float64()),
        pa.field("output_url", pa.string()),
        pa.field("checksum", pa.string()),
        pa.field("seam_score", pa.float64()),
        pa.field("error", pa.string()),
        # Quality control (render.scores, schemas.qc): filled from the worker's reply.
        pa.field("identity_score", pa.float64()),
        pa.field("continuity_score", pa.float64()),
        pa.field("take", pa.int32()),
        pa.field("takes", pa.int32()),
        pa.field("qc_flag", pa.string()),
        pa.field("scores", pa.string()),
        # Mid-chunk checkpoints (render.checkpoints): sampling steps not run again.
        pa.field("steps_saved", pa.int32()),
    ],
    metadata={b"reelfarm.manifest_version": str(MANIFEST_VERSION).encode()},
)


class ManifestRow(BaseModel):
    """One chunk's row. Mutable on purpose: the driver updates it as the chunk runs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    run_id: str
    scene_id: str
    shot_id: str
    chunk_index: int
    chunk_name: str
    frame_start: int
    frame_end: int
    num_frames: int
    overlap: int
    seed: int
    content_key: str
    depends_on: str | None = None
    backend: str
    model_id: str | None = None
    est_gpu_s: float
    status: ChunkStatus = "planned"
    attempts: int = 0
    worker: str | None = None
    node: str | None = None
    gpu: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    render_s: float | None = None
    output_url: str | None = None
    checksum: str | None = None
    seam_score: float | None = None
    error: str | None = None
    identity_score: float | None = None  # lowest character's mean identity score, 0..1
    continuity_score: float | None = None  # lowest character's frame-to-frame similarity
    take: int | None = None  # the take the chunk's key committed (1-based)
    takes: int | None = None  # takes rendered for this chunk
    qc_flag: str | None = None  # why the committed take misses the qc policy; None passes
    scores: str | None = None  # JSON: sampled frames, per-character scores, takes and why
    steps_saved: int | None = None  # sampling steps a checkpoint spared this chunk


def plan_rows(plan: RenderPlan, run_id: str) -> list[ManifestRow]:
    """The manifest of a plan before anything has run: every chunk ``planned``."""
    rows = []
    for shot in plan.shots:
        model_id = getattr(shot.model, "id", None)
        for c in shot.chunks:
            rows.append(ManifestRow.model_construct(
                run_id=run_id, scene_id=shot.scene_id, shot_id=shot.shot_id,
                chunk_index=c.index, chunk_name=c.name, frame_start=c.frame_start,
                frame_end=c.frame_end, num_frames=c.num_frames, overlap=c.overlap, seed=c.seed,
                content_key=c.key, depends_on=c.depends_on, backend=shot.model.backend,
                model_id=model_id, est_gpu_s=c.est_gpu_s, status="planned", attempts=0,
                worker=None, node=None, gpu=None, started_at=None, finished_at=None, render_s=None,
                output_url=None, checksum=None, seam_score=None, error=None,
                identity_score=None, continuity_score=None, take=None, takes=None,
                qc_flag=None, scores=None, steps_saved=None,
            ))
    return rows


def rows_to_table(rows: list[ManifestRow]) -> pa.Table:
    """Rows as an Arrow table with exactly ``MANIFEST_SCHEMA``."""
    columns: dict[str, list[Any]] = {f.name: [] for f in MANIFEST_SCHEMA}
    for row in rows:
        d = row.__dict__
        for name, col in columns.items():
            col.append(d[name])
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def table_to_rows(table: pa.Table) -> list[ManifestRow]:
    """Read rows back (e.g. for resume). Unknown columns are refused."""
    names = set(table.column_names)
    expected = {f.name for f in MANIFEST_SCHEMA}
    for name in sorted((expected - names) & LATER_COLUMNS):  # written before these existed
        table = table.append_column(MANIFEST_SCHEMA.field(name), pa.nulls(len(table), MANIFEST_SCHEMA.field(name).type))
        names.add(name)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise ValueError(f"manifest columns differ: missing {missing}, unexpected {extra}")
    return [ManifestRow.model_validate(r) for r in table.to_pylist()]
