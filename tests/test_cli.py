"""`reelfarm validate` and `reelfarm plan`: exit codes, messages, tables and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from reelfarm.cli import app
from reelfarm.flows.plan import plan_film
from reelfarm.schemas import load_film
from tests.films import CAMPAIGN_FILM

FILM = """\
reelfarm: 1
title: Moth and flame
characters:
  moth: {reference: moth.png}
model: {backend: diffusers, family: wan, id: org/wan-i2v}
scenes:
  - id: s01
    shots:
      - id: s01_010
        frames: 100
        prompt: a moth circles a candle
        characters: [moth]
      - id: s01_020
        frames: 48
        prompt: the flame flickers
  - id: s02
    shots:
      - id: s02_010
        frames: 81
        prompt: darkness
"""
# line 12: `characters: [moth]` of s01_010
BAD = FILM.replace("characters: [moth]", "characters: [mothh]")
BAD_MESSAGE = "scenes[0].shots[0].characters[0]: unknown character 'mothh' (known: moth)"

CAMPAIGN = """\
reelfarm: 1
campaign: Spring launch
film: base.yaml
matrix:
  aspect:
    wide: {film: {resolution: [768, 432]}}
    tall: {film: {resolution: [432, 768]}}
    square: {film: {resolution: [512, 512]}}
  product:
    mug: {vars: {product: coffee mug}}
    lamp: {vars: {product: desk lamp}}
"""
CELLS = ["wide/mug", "wide/lamp", "tall/mug", "tall/lamp", "square/mug", "square/lamp"]

# Wide enough that rich neither wraps nor truncates the tables.
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def specs(tmp_path: Path) -> Path:
    """A folder with a reference, a good film, a bad film and a campaign."""
    folder = tmp_path / "specs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (200, 180, 150)).save(folder / "moth.png")
    (folder / "film.yaml").write_text(FILM, encoding="utf-8")
    (folder / "bad.yaml").write_text(BAD, encoding="utf-8")
    (folder / "base.yaml").write_text(CAMPAIGN_FILM, encoding="utf-8")
    (folder / "campaign.yaml").write_text(CAMPAIGN, encoding="utf-8")
    return folder


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*"))


# --- validate ------------------------------------------------------------------------------------
def test_validate_ok(runner, specs):
    result = runner.invoke(app, ["validate", str(specs / "film.yaml")], env=ENV)
    assert result.exit_code == 0, result.output
    assert "ok 'Moth and flame': 2 scenes, 3 shots" in result.stdout


def test_validate_campaign_ok(runner, specs):
    result = runner.invoke(app, ["validate", str(specs / "campaign.yaml")], env=ENV)
    assert result.exit_code == 0, result.output
    assert "ok campaign 'Spring launch': 6 cells" in result.stdout


def test_validate_bad_spec_exits_2_with_the_message(runner, specs):
    bad = specs / "bad.yaml"
    result = runner.invoke(app, ["validate", str(bad)], env=ENV)
    assert result.exit_code == 2
    assert f"{bad}:12 {BAD_MESSAGE}" in result.stderr
    assert "invalid spec (1 problem(s))" in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_validate_missing_file_exits_2(runner, tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")], env=ENV)
    assert result.exit_code == 2
    assert f"{tmp_path / 'nope.yaml'}: spec file not found" in result.stderr


def test_validate_subprocess_exits_2_without_a_traceback(specs, tmp_path):
    exe = Path(sys.executable).parent / "reelfarm"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run([str(exe), "validate", str(specs / "bad.yaml")], cwd=out_dir,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ENV})
    assert proc.returncode == 2
    assert f"{specs / 'bad.yaml'}:12 {BAD_MESSAGE}" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert files_under(out_dir) == []


# --- an invalid spec writes nothing ----------------------------------------------------------
def test_plan_on_a_bad_spec_writes_nothing(runner, specs, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = files_under(specs)
    monkeypatch.chdir(out_dir)
    for args in (["plan", str(specs / "bad.yaml")], ["plan", str(specs / "bad.yaml"), "--json"]):
        result = runner.invoke(app, args, env=ENV)
        assert result.exit_code == 2
        assert BAD_MESSAGE in result.stderr
        assert result.stdout == ""
    assert files_under(out_dir) == []
    assert files_under(specs) == before


def test_plan_subprocess_on_a_bad_spec_writes_nothing(specs, tmp_path):
    exe = Path(sys.executable).parent / "reelfarm"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run([str(exe), "plan", str(specs / "bad.yaml")], cwd=out_dir,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **ENV})
    assert proc.returncode == 2
    assert BAD_MESSAGE in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert files_under(out_dir) == []


def test_render_on_a_bad_spec_exits_2_and_writes_nothing(runner, specs, tmp_path):
    out_dir = tmp_path / "render-out"
    for extra in ([], ["--no-prefect"]):
        result = runner.invoke(app, ["render", str(specs / "bad.yaml"), "--out", str(out_dir), *extra],
                               env=ENV)
        assert result.exit_code == 2, result.output
        assert BAD_MESSAGE in result.stderr and "Traceback" not in result.output
    assert not out_dir.exists()  # not even the folder: nothing started


# --- plan -------------------------------------------------------------------------------------------
def test_plan_prints_a_table_with_totals(runner, specs):
    plan = plan_film(load_film(specs / "film.yaml"))
    result = runner.invoke(app, ["plan", str(specs / "film.yaml"), "--gpu-hour-price", "4"], env=ENV)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Moth and flame — 768x432 @ 24 fps" in out
    for col in ("scene", "shot", "frames", "chunks", "backend", "est GPU-s"):
        assert col in out
    for shot in plan.shots:
        line = next(ln for ln in out.splitlines() if f" {shot.shot_id} " in ln)
        assert f" {shot.frames} " in line and f" {len(shot.chunks)} " in line and "wan" in line
        assert f"{shot.est_gpu_s:,.1f}" in line
    hours = plan.est_gpu_s / 3600
    caption = " ".join(out.split())  # rich wraps the caption to the table's width
    assert (f"2 scenes, 3 shots, {len(plan.chunks)} chunks, {plan.frames} frames "
            f"({plan.duration_s:.1f} s); est {hours:,.3f} GPU-hours ≈ ${hours * 4:,.2f} "
            "at $4.0/GPU-hour") in caption
    assert len(plan.chunks) == 2 + 1 + 1 and plan.frames == 229


def test_plan_json_is_the_plan(runner, specs):
    plan = plan_film(load_film(specs / "film.yaml"))
    result = runner.invoke(app, ["plan", str(specs / "film.yaml"), "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["title"] == "Moth and flame" and doc["frames"] == plan.frames
    chunks = [c for s in doc["shots"] for c in s["chunks"]]
    assert [c["name"] for c in chunks] == [c.name for c in plan.chunks]
    assert [c["key"] for c in chunks] == [c.key for c in plan.chunks]
    assert [c["seed"] for c in chunks] == [c.seed for c in plan.chunks]
    assert chunks[1]["depends_on"] == chunks[0]["key"]
    assert doc["est_gpu_s"] == plan.est_gpu_s


def test_plan_campaign_prints_cells(runner, specs):
    result = runner.invoke(app, ["plan", str(specs / "campaign.yaml")], env=ENV)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "campaign Spring launch" in out
    for cell in CELLS:
        assert cell in out
    assert "432x768" in out and "512x512" in out
    assert "6 cells, 18 chunks, 15 unique (shared chunks render once)" in " ".join(out.split())


def test_plan_campaign_json(runner, specs):
    result = runner.invoke(app, ["plan", str(specs / "campaign.yaml"), "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["campaign"], doc["chunks"], doc["unique_chunks"]) == ("Spring launch", 18, 15)
    assert [c["cell"] for c in doc["cells"]] == CELLS
    assert doc["cells"][3]["values"] == {"aspect": "tall", "product": "lamp"}
    assert doc["cells"][3]["plan"]["shots"][0]["prompt"] == "a moth lands on a desk lamp"


def test_plan_campaign_bad_placeholder_exits_2(runner, specs):
    (specs / "base.yaml").write_text(CAMPAIGN_FILM.replace("the logo", "the logo, {tagline}"))
    result = runner.invoke(app, ["plan", str(specs / "campaign.yaml")], env=ENV)
    assert result.exit_code == 2
    assert "(cell wide/mug) unknown placeholder {tagline}" in result.stderr
    assert "invalid spec (6 problem(s))" in result.stderr


def test_no_arguments_shows_help(runner):
    result = runner.invoke(app, [], env=ENV)
    assert "validate" in result.output and "plan" in result.output


def test_resume_where_no_run_was_exits_2(runner, tmp_path):
    result = runner.invoke(app, ["resume", str(tmp_path)], env=ENV)
    assert result.exit_code == 2
    assert "no reelfarm run here (film.json missing)" in result.stderr and "Traceback" not in result.output


def test_figures_never_split_in_an_80_column_terminal(runner, specs):
    result = runner.invoke(app, ["plan", str(specs / "film.yaml")], env={**ENV, "COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for token in ("GPU-hours", "$2.5/GPU-hour"):
        assert any(token in line for line in lines), (token, lines)


def test_help_shows_the_workers_default(runner):
    result = runner.invoke(app, ["render", "--help"], env={**ENV, "COLUMNS": "200"})
    assert result.exit_code == 0
    assert "[default: (one per two cores, at least 1)]" in " ".join(result.stdout.split())


def test_reads_outside_the_spec_folder_need_allow_read(runner, specs, tmp_path):
    shared = tmp_path / "shared-refs"
    shared.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(shared / "moth.png")
    text = (specs / "film.yaml").read_text().replace("reference: moth.png", f"reference: {shared / 'moth.png'}")
    assert text != (specs / "film.yaml").read_text()
    (specs / "outside.yaml").write_text(text)
    refused = runner.invoke(app, ["validate", str(specs / "outside.yaml")], env=ENV)
    assert refused.exit_code == 2
    assert "allowed_read_roots" in refused.output and "moth.png" in refused.output
    allowed = runner.invoke(app, ["validate", str(specs / "outside.yaml"), "--allow-read", str(shared)], env=ENV)
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.parametrize("where", ["proc", "file"])
def test_a_bad_out_is_one_line_and_exit_2_before_anything_starts(runner, specs, tmp_path, where):
    if where == "proc":
        out = "/proc/reelfarm-x"
    else:
        out = str(tmp_path / "a-file")
        Path(out).write_text("not a folder")
    result = runner.invoke(app, ["render", str(specs / "film.yaml"), "--out", out, "--no-prefect"], env=ENV)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and out in lines[0] and "--out" in lines[0], lines
    assert "Traceback" not in result.output
