"""The manifest (Arrow schema and row model agree; Parquet any tool can read) and the
JSON round trip of a RenderPlan. Also pins the public names of ``reelfarm.schemas``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
import typing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import reelfarm.schemas
from reelfarm.flows.plan import plan_film
from reelfarm.schemas import MANIFEST_SCHEMA, ManifestRow, RenderPlan, load_film
from reelfarm.schemas.manifest import MANIFEST_VERSION, plan_rows, rows_to_table, table_to_rows

FILM = """\
reelfarm: 1
title: Manifest test
fps: 24000/1001
resolution: [832, 480]
characters:
  moth: {reference: moth.png}
  flame: {reference: flame.png}
model: {backend: diffusers, family: wan, id: org/wan-i2v, steps: 4}
scenes:
  - id: s01
    shots:
      - id: s01_010
        frames: 200
        prompt: a moth circles a candle
        characters: [moth, flame]
      - id: s01_020
        duration: 3.5
        prompt: the flame flickers
        transition: {crossfade: 0.5}
        camera: {move: push_in, amount: 0.4}
        model: {continuation: reference, guidance_scale: 3.5}
  - id: s02
    shots:
      - id: s02_010
        frames: 40
        prompt: darkness
        seed: 12345
        model: {backend: animatic, slate: false}
"""

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


@pytest.fixture
def plan(write_spec) -> RenderPlan:
    return plan_film(load_film(write_spec(FILM)))


@pytest.fixture
def rows(plan: RenderPlan) -> list[ManifestRow]:
    """The planned rows, with one chunk done and one failed, as the driver leaves them."""
    rows = plan_rows(plan, "run-0001")
    done, failed = rows[0], rows[1]
    done.status, done.attempts, done.worker, done.node = "done", 1, "gpu-actor-3", "node-a"
    done.started_at, done.finished_at, done.render_s = T0, T0 + timedelta(seconds=95.5), 95.5
    done.output_url = "memory://out/run-0001/chunks/s01_010/chunk-00000-00080.mp4"
    done.checksum, done.seam_score = "sha256:" + "ab" * 32, 0.0125
    failed.status, failed.attempts, failed.error = "failed", 3, "GpuOutOfMemory: 80 GiB"
    failed.started_at = T0
    return rows


# --- the public surface ------------------------------------------------------------------------
def test_schemas_public_names_are_pinned():
    assert reelfarm.schemas.__all__ == [
        "FAMILIES",
        "MANIFEST_SCHEMA",
        "SPEC_VERSION",
        "AnimaticModel",
        "Camera",
        "Campaign",
        "CampaignCell",
        "Character",
        "ChunkPlan",
        "DiffusersModel",
        "FamilyRule",
        "Film",
        "LoadedCampaign",
        "ManifestRow",
        "MatrixValue",
        "ModelSpec",
        "Output",
        "RenderPlan",
        "Scene",
        "Schedule",
        "Shot",
        "ShotPlan",
        "Transition",
        "load_campaign",
        "load_film",
        "load_spec",
        "seconds_to_frames",
    ]
    for name in reelfarm.schemas.__all__:
        assert hasattr(reelfarm.schemas, name), name


def test_schemas_import_neither_torch_nor_ray():
    code = ("import sys, reelfarm.schemas, reelfarm.flows.plan; "
            "print(sorted(m for m in ('torch', 'ray', 'prefect', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- MANIFEST_SCHEMA and ManifestRow agree --------------------------------------------------------
def _arrow_types(annotation: object) -> tuple[list[pa.DataType], bool]:
    """The Arrow types a Python annotation may be stored as, and whether it is Optional."""
    args = typing.get_args(annotation)
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        nullable = type(None) in args
        (annotation,) = [a for a in args if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        assert all(isinstance(v, str) for v in typing.get_args(annotation))
        return [pa.string()], nullable
    return {
        str: [pa.string()],
        int: [pa.int32(), pa.int64()],
        float: [pa.float64()],
        datetime: [pa.timestamp("us", tz="UTC")],
    }[annotation], nullable


def test_manifest_schema_matches_row_model():
    fields = ManifestRow.model_fields
    assert MANIFEST_SCHEMA.names == list(fields), "same fields in the same order"
    for arrow_field in MANIFEST_SCHEMA:
        allowed, optional = _arrow_types(fields[arrow_field.name].annotation)
        assert arrow_field.type in allowed, f"{arrow_field.name}: {arrow_field.type} not in {allowed}"
        assert arrow_field.nullable == optional, f"{arrow_field.name}: nullable={arrow_field.nullable}"


def test_manifest_schema_carries_its_version():
    assert MANIFEST_SCHEMA.metadata == {b"reelfarm.manifest_version": str(MANIFEST_VERSION).encode()}


def test_seeds_fit_the_manifest_columns(plan):
    for c in plan.chunks:
        assert 0 <= c.seed < 2**63
        assert 0 <= c.frame_start < c.frame_end < 2**31


# --- rows ---------------------------------------------------------------------------------------
def test_plan_rows_are_one_planned_row_per_chunk(plan):
    rows = plan_rows(plan, "run-0001")
    assert [r.chunk_name for r in rows] == [c.name for c in plan.chunks]
    assert [r.content_key for r in rows] == [c.key for c in plan.chunks]
    assert {r.status for r in rows} == {"planned"} and {r.attempts for r in rows} == {0}
    by_shot = {r.shot_id: r for r in rows}
    assert by_shot["s01_010"].backend == "diffusers" and by_shot["s01_010"].model_id == "org/wan-i2v"
    assert by_shot["s02_010"].backend == "animatic" and by_shot["s02_010"].model_id is None
    # the rows validate as well as construct
    assert [ManifestRow.model_validate(r.model_dump()) for r in rows] == rows


def test_rows_to_table_has_exactly_the_schema(rows):
    table = rows_to_table(rows)
    assert table.schema.equals(MANIFEST_SCHEMA, check_metadata=True)
    assert table.num_rows == len(rows)


def test_table_to_rows_round_trip(rows):
    assert table_to_rows(rows_to_table(rows)) == rows


def test_table_to_rows_refuses_other_columns(rows):
    table = rows_to_table(rows)
    with pytest.raises(ValueError, match=r"missing \['error'\], unexpected \[\]"):
        table_to_rows(table.drop_columns(["error"]))
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['extra'\]"):
        table_to_rows(table.append_column("extra", pa.array([1] * table.num_rows)))


def _none_if_missing(value: object) -> object:
    """pandas shows missing values as NaN/NaT; the rows use None."""
    if value is None or value is __import__("pandas").NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def test_parquet_round_trip_with_pyarrow_pandas_and_duckdb(rows, tmp_path: Path):
    import duckdb
    import pandas as pd

    path = tmp_path / "manifest.parquet"
    pq.write_table(rows_to_table(rows), path)
    expected = [r.model_dump() for r in rows]

    # pyarrow: same schema, metadata included, and same values
    table = pq.read_table(path)
    assert table.schema.equals(MANIFEST_SCHEMA, check_metadata=True)
    assert table.to_pylist() == expected
    assert table_to_rows(table) == rows

    # pandas
    df = pd.read_parquet(path)
    assert list(df.columns) == MANIFEST_SCHEMA.names
    got = [{k: _none_if_missing(v) for k, v in rec.items()} for rec in df.to_dict("records")]
    for g, e in zip(got, expected, strict=True):
        for name in MANIFEST_SCHEMA.names:
            assert g[name] == e[name], (name, g[name], e[name])

    # duckdb, with SQL over it as a user would
    rel = duckdb.sql(f"SELECT * FROM read_parquet('{path}') ORDER BY shot_id, chunk_index")
    assert rel.columns == MANIFEST_SCHEMA.names
    got = [dict(zip(rel.columns, tup)) for tup in rel.fetchall()]
    assert got == sorted(expected, key=lambda r: (r["shot_id"], r["chunk_index"]))
    ((n, gpu_s, done),) = duckdb.sql(
        f"SELECT count(*), sum(est_gpu_s), count(*) FILTER (WHERE status = 'done') "
        f"FROM read_parquet('{path}')").fetchall()
    assert n == len(rows) and done == 1
    assert gpu_s == pytest.approx(sum(r.est_gpu_s for r in rows))


READ_WITHOUT_REELFARM = """\
import importlib.abc, json, sys

class NoReelfarm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "reelfarm":
            raise ImportError("reelfarm is not installed here")
        return None

sys.meta_path.insert(0, NoReelfarm())
import duckdb, pandas as pd
df = pd.read_parquet(sys.argv[1])
rows = duckdb.sql(f"SELECT chunk_name, content_key, seed FROM read_parquet('{sys.argv[1]}')").fetchall()
print(json.dumps({"pandas": df[["chunk_name", "content_key", "seed"]].values.tolist(),
                  "duckdb": [list(r) for r in rows],
                  "reelfarm": any(m.startswith("reelfarm") for m in sys.modules)}))
"""


def test_manifest_reads_without_reelfarm(rows, tmp_path: Path):
    path = tmp_path / "manifest.parquet"
    pq.write_table(rows_to_table(rows), path)
    out = subprocess.run([sys.executable, "-c", READ_WITHOUT_REELFARM, str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    expected = [[r.chunk_name, r.content_key, r.seed] for r in rows]
    assert doc == {"pandas": expected, "duckdb": expected, "reelfarm": False}


# --- RenderPlan JSON --------------------------------------------------------------------------------
def test_render_plan_json_round_trip(plan):
    text = plan.model_dump_json()
    back = RenderPlan.model_validate_json(text)
    assert back == plan
    assert back.model_dump_json() == text
    assert back.fps == plan.fps and back.fps.denominator == 1001
    assert back.shot("s01_020").transition.kind == "crossfade"
    assert back.shot("s02_010").model.backend == "animatic"
    assert back.chunks == plan.chunks


def test_render_plan_json_is_plain(plan):
    doc = json.loads(plan.model_dump_json())
    assert doc["fps"] == "24000/1001"
    assert doc["shots"][0]["chunks"][0]["name"] == "s01_010/chunk-00000-00080"
    assert doc["shots"][0]["model"]["family"] == "wan"
