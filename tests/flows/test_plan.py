"""The pure planner: chunk ranges per family, exact names, dependencies, seeds, keys, costs.

Like Flamenco's job-compiler tests: exact names, ranges and dependencies. Cross-process
determinism runs the planner in two fresh interpreters with different hash seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from reelfarm.errors import PlanError, SpecError
from reelfarm.flows.plan import CampaignPlan, chunk_ranges, chunk_seed, plan_campaign, plan_film
from reelfarm.schemas import FAMILIES, RenderPlan, load_campaign, load_film, load_spec
from reelfarm.schemas.families import FamilyRule
from reelfarm.schemas.loader import LoadedCampaign
from tests.films import CAMPAIGN_FILM

# Four shots: 48 + 100 + 130 + 60 frames; s01_020 begins with a 12-frame crossfade.
FILM = """\
reelfarm: 1
title: Moth and flame
resolution: [768, 512]
seed: 7
characters:
  moth: {reference: moth.png}
  flame: {reference: flame.png}
scenes:
  - id: s01
    shots:
      - id: s01_010
        frames: 48
        prompt: a moth circles a candle
        characters: [moth]
      - id: s01_020
        frames: 100
        prompt: the flame flickers
        characters: [flame]
        transition: {crossfade: 0.5}
  - id: s02
    shots:
      - id: s02_010
        frames: 130
        prompt: moth and flame together
        characters: [moth, flame]
      - id: s02_020
        duration: 2.5
        prompt: darkness
"""
SHOT_FRAMES = {"s01_010": 48, "s01_020": 100, "s02_010": 130, "s02_020": 60}
USES = {"s01_010": {"moth"}, "s01_020": {"flame"}, "s02_010": {"moth", "flame"}, "s02_020": set()}

WAN = "model: {backend: diffusers, family: wan, id: org/wan-i2v}\n"


def edit(old: str, new: str, text: str = FILM) -> str:
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def with_model(model_line: str, text: str = FILM) -> str:
    return edit("seed: 7\n", "seed: 7\n" + model_line, text)


def png(path: Path, color: tuple[int, int, int]) -> Path:
    Image.new("RGB", (8, 8), color).save(path, format="PNG")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    png(tmp_path / "moth.png", (200, 180, 150))
    png(tmp_path / "flame.png", (250, 120, 20))
    return tmp_path


@pytest.fixture
def plan_text(folder: Path) -> Callable[..., RenderPlan]:
    """Write a film spec next to the references, load it and plan it."""

    def plan(text: str = FILM, name: str = "film.yaml") -> RenderPlan:
        path = folder / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return plan_film(load_film(path))

    return plan


def keys_by_shot(plan: RenderPlan) -> dict[str, list[str]]:
    return {s.shot_id: [c.key for c in s.chunks] for s in plan.shots}


def changed_shots(a: RenderPlan, b: RenderPlan) -> set[str]:
    ka, kb = keys_by_shot(a), keys_by_shot(b)
    assert ka.keys() == kb.keys()
    return {shot for shot in ka if ka[shot] != kb[shot]}


# --- chunk ranges: every family's frame rule ---------------------------------------------------
def check_ranges(frames: int, rule: FamilyRule, per_chunk: int,
                 overlap: int) -> list[tuple[int, int, int]]:
    ranges = chunk_ranges(frames, rule, per_chunk, overlap)
    assert ranges[0][0] == 0
    assert ranges[-1][1] == frames, "the last chunk reaches the shot's end"
    for i, (start, end, num) in enumerate(ranges):
        assert rule.accepts(num), f"{rule.name}: {num} frames break {rule.rule}"
        assert num <= per_chunk, "no chunk longer than a chunk"
        assert 0 <= start < end <= frames
        assert num >= end - start, "a chunk renders at least the frames it covers"
        if i < len(ranges) - 1:
            assert (end - start, num) == (per_chunk, per_chunk), "inner chunks are full"
            nxt = ranges[i + 1][0]
            assert end - nxt == overlap, "neighbours share exactly `overlap` frames"
    if frames <= per_chunk:
        assert len(ranges) == 1
    return ranges


def valid_lengths(rule: FamilyRule) -> list[int]:
    """The native length plus a few other valid chunk lengths above the overlap."""
    if rule.allowed:
        return list(rule.allowed)
    return sorted({rule.native_frames} | {n for n in (9, 17, 25, 33, 49, 57) if rule.accepts(n)})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunk_ranges_obey_each_family_rule(family):
    rule = FAMILIES[family]
    for per_chunk in valid_lengths(rule):
        for overlap in sorted({0, 1, 8, per_chunk // 2, per_chunk - 1}):
            if overlap >= per_chunk:
                continue
            for frames in [*range(1, 3 * per_chunk + 2), 1000, 1001, 172_800 // 720]:
                check_ranges(frames, rule, per_chunk, overlap)


@pytest.mark.parametrize(
    ("family", "frames", "expected"),
    [
        ("animatic", 100, [(0, 48, 48), (40, 88, 48), (80, 100, 20)]),
        ("animatic", 5, [(0, 5, 5)]),
        ("wan", 100, [(0, 81, 81), (73, 100, 29)]),
        ("wan", 3, [(0, 3, 5)]),  # shorter than the family's minimum: render 5, keep 3
        ("wan", 81, [(0, 81, 81)]),
        ("wan", 82, [(0, 81, 81), (73, 82, 9)]),
        ("ltx", 300, [(0, 121, 121), (113, 234, 121), (226, 300, 81)]),
        ("cogvideox", 60, [(0, 49, 49), (41, 60, 25)]),
        ("svd", 30, [(0, 25, 25), (17, 30, 14)]),
        ("svd", 40, [(0, 25, 25), (17, 40, 25)]),
        ("svd", 10, [(0, 10, 14)]),
    ],
)
def test_chunk_ranges_exact(family, frames, expected):
    rule = FAMILIES[family]
    assert chunk_ranges(frames, rule, rule.native_frames, 8) == expected


def test_chunk_ranges_refuse_an_empty_shot():
    with pytest.raises(PlanError, match="at least one frame, got 0"):
        chunk_ranges(0, FAMILIES["wan"], 81, 8)


@pytest.mark.parametrize(
    ("model_line", "family"),
    [
        ("", "animatic"),
        ("model: {backend: diffusers, family: wan, id: x}\n", "wan"),
        ("model: {backend: diffusers, family: wan, id: x, chunk_frames: 33, overlap: 4}\n", "wan"),
        ("model: {backend: diffusers, family: ltx, id: x}\n", "ltx"),
        ("model: {backend: diffusers, family: cogvideox, id: x}\n", "cogvideox"),
        ("model: {backend: diffusers, family: svd, id: x}\n", "svd"),
        ("model: {backend: diffusers, family: svd, id: x, chunk_frames: 14, overlap: 2}\n", "svd"),
    ],
)
def test_planned_chunks_obey_the_family_rule(plan_text, model_line, family):
    plan = plan_text(with_model(model_line))
    rule = FAMILIES[family]
    model = plan.shots[0].model
    for shot in plan.shots:
        assert shot.frames == SHOT_FRAMES[shot.shot_id]
        ranges = [(c.frame_start, c.frame_end, c.num_frames) for c in shot.chunks]
        assert ranges == check_ranges(shot.frames, rule, model.frames_per_chunk, model.overlap)
        assert all(c.num_frames <= rule.native_frames for c in shot.chunks)
        assert [c.index for c in shot.chunks] == list(range(len(shot.chunks)))
        assert [c.overlap for c in shot.chunks] == [0] + [model.overlap] * (len(shot.chunks) - 1)


def test_chunk_frames_longer_than_the_native_clip_is_refused(folder):
    # FamilyRule.native_frames is "the longest clip one call makes"; 161 frames is 4k+1
    # but twice Wan's native 81, so the planner makes chunks longer than the model can.
    path = folder / "film.yaml"
    path.write_text(with_model("model: {backend: diffusers, family: wan, id: x, chunk_frames: 161}\n"))
    with pytest.raises(SpecError, match="chunk_frames"):
        load_film(path)


# --- exact names and dependencies ------------------------------------------------------------
def test_chunk_names_are_exact(plan_text):
    plan = plan_text()
    assert [c.name for c in plan.chunks] == [
        "s01_010/chunk-00000-00047",
        "s01_020/chunk-00000-00047",
        "s01_020/chunk-00040-00087",
        "s01_020/chunk-00080-00099",
        "s02_010/chunk-00000-00047",
        "s02_010/chunk-00040-00087",
        "s02_010/chunk-00080-00127",
        "s02_010/chunk-00120-00129",
        "s02_020/chunk-00000-00047",
        "s02_020/chunk-00040-00059",
    ]
    assert [c.num_frames for c in plan.shot("s02_010").chunks] == [48, 48, 48, 10]


def test_wan_chunk_names_and_lengths(plan_text):
    plan = plan_text(with_model(WAN))
    shot = plan.shot("s02_010")
    assert [(c.name, c.num_frames) for c in shot.chunks] == [
        ("s02_010/chunk-00000-00080", 81),
        ("s02_010/chunk-00073-00129", 57),
    ]


def test_diffusers_chunks_depend_on_the_previous_chunk_by_default(plan_text):
    plan = plan_text(with_model(WAN))
    assert plan.shots[0].model.continuation == "previous"
    for shot in plan.shots:
        chunks = shot.chunks
        assert chunks[0].depends_on is None, "a shot starts from its references"
        for prev, chunk in zip(chunks, chunks[1:]):
            assert chunk.depends_on == prev.key


def test_reference_continuation_has_no_dependencies(plan_text):
    plan = plan_text(with_model(
        "model: {backend: diffusers, family: wan, id: x, continuation: reference}\n"))
    assert all(c.depends_on is None for c in plan.chunks)


def test_animatic_has_no_dependencies_by_default(plan_text):
    plan = plan_text()
    assert plan.shots[0].model.continuation == "none"
    assert all(c.depends_on is None for c in plan.chunks)


def test_animatic_previous_continuation_chains(plan_text):
    plan = plan_text(with_model("model: {backend: animatic, continuation: previous}\n"))
    chunks = plan.shot("s02_010").chunks
    assert [c.depends_on for c in chunks] == [None] + [c.key for c in chunks[:-1]]


def test_dependencies_never_cross_shots(plan_text):
    plan = plan_text(with_model(WAN))
    for shot in plan.shots:
        own = {c.key for c in shot.chunks}
        assert all(c.depends_on is None or c.depends_on in own for c in shot.chunks)


def test_shot_model_override_changes_only_that_shot(plan_text):
    text = with_model(WAN)
    text = edit("        prompt: darkness\n",
                "        prompt: darkness\n        model: {continuation: reference}\n", text)
    plan = plan_text(text)
    assert plan.shot("s02_020").model.continuation == "reference"
    assert plan.shot("s02_020").model.family == "wan"
    assert all(c.depends_on is None for c in plan.shot("s02_020").chunks)
    assert plan.shot("s02_010").chunks[1].depends_on == plan.shot("s02_010").chunks[0].key


# --- determinism --------------------------------------------------------------------------------
PLAN_IN_A_NEW_PROCESS = """\
import json, sys
from reelfarm.flows.plan import plan_film
from reelfarm.schemas import load_film
plan = plan_film(load_film(sys.argv[1]))
print(json.dumps({"key": plan.key,
                  "chunks": [[c.name, c.seed, c.key, c.depends_on] for c in plan.chunks]}))
"""


def plan_summary(plan: RenderPlan) -> dict:
    return {"key": plan.key, "chunks": [[c.name, c.seed, c.key, c.depends_on] for c in plan.chunks]}


def test_seeds_and_keys_are_identical_across_processes(folder):
    path = folder / "film.yaml"
    path.write_text(with_model(WAN), encoding="utf-8")
    procs = [
        subprocess.Popen([sys.executable, "-c", PLAN_IN_A_NEW_PROCESS, str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONHASHSEED": seed})
        for seed in ("1", "2")
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert outs[0] == outs[1]
    assert outs[0] == plan_summary(plan_film(load_film(path)))


def test_repeated_plans_are_equal(folder, plan_text):
    a = plan_text(with_model(WAN))
    b = plan_text(with_model(WAN))
    assert a == b
    film = load_film(folder / "film.yaml")
    assert plan_film(film) == plan_film(film) == a


def test_chunk_seed_is_pinned():
    # A recorded value: if this changes, every planned chunk in the world re-renders.
    assert chunk_seed(7, "s01_010", 0) == chunk_seed(7, "s01_010", 0)
    assert 0 <= chunk_seed(7, "s01_010", 0) < 2**63
    assert chunk_seed(7, "s01_010", 0) != chunk_seed(7, "s01_010", 1)
    assert chunk_seed(7, "s01_010", 0) != chunk_seed(8, "s01_010", 0)


def test_seeds_differ_between_chunks_and_shots(plan_text):
    plan = plan_text(with_model(WAN))
    seeds = [c.seed for c in plan.chunks]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    keys = [c.key for c in plan.chunks]
    assert len(set(keys)) == len(keys)


def test_shot_seed_changes_only_that_shot(plan_text):
    a = plan_text()
    b = plan_text(edit("        prompt: darkness\n", "        prompt: darkness\n        seed: 99\n"))
    assert changed_shots(a, b) == {"s02_020"}
    assert b.shot("s02_020").seed == 99 and a.shot("s02_020").seed == 7


def test_film_seed_changes_every_shot(plan_text):
    a = plan_text()
    b = plan_text(edit("seed: 7", "seed: 8"))
    assert changed_shots(a, b) == set(SHOT_FRAMES)
    assert not {c.seed for c in a.chunks} & {c.seed for c in b.chunks}


# --- key sensitivity ------------------------------------------------------------------------
def test_changing_one_prompt_changes_only_that_shots_keys(plan_text):
    a = plan_text(with_model(WAN))
    b = plan_text(with_model(WAN, edit("prompt: the flame flickers", "prompt: the flame gutters")))
    assert changed_shots(a, b) == {"s01_020"}
    # every chunk of that shot changes, and the film's key with it
    assert not set(keys_by_shot(a)["s01_020"]) & set(keys_by_shot(b)["s01_020"])
    assert a.key != b.key
    assert [c.seed for c in a.chunks] == [c.seed for c in b.chunks], "seeds do not hash the prompt"


def test_changing_a_reference_image_changes_only_shots_using_it(folder, plan_text):
    a = plan_text()
    png(folder / "flame.png", (250, 121, 20))  # one pixel value differs
    b = plan_text()
    assert changed_shots(a, b) == {s for s, chars in USES.items() if "flame" in chars}
    assert a.characters["flame"] != b.characters["flame"]
    assert a.characters["moth"] == b.characters["moth"]


def test_offload_does_not_change_keys(plan_text):
    a = plan_text(with_model(WAN))
    b = plan_text(with_model(
        "model: {backend: diffusers, family: wan, id: org/wan-i2v, offload: sequential}\n"))
    assert keys_by_shot(a) == keys_by_shot(b) and a.key == b.key


@pytest.mark.parametrize(
    "field",
    ["steps: 20", "guidance_scale: 6.0", "negative_prompt: blurry", "dtype: float16", "revision: v2"],
)
def test_model_fields_that_shape_pixels_change_keys(plan_text, field):
    a = plan_text(with_model(WAN))
    b = plan_text(with_model(f"model: {{backend: diffusers, family: wan, id: org/wan-i2v, {field}}}\n"))
    assert changed_shots(a, b) == set(SHOT_FRAMES)


def test_model_id_changes_keys(plan_text):
    a = plan_text(with_model(WAN))
    b = plan_text(with_model("model: {backend: diffusers, family: wan, id: org/wan-i2v-720p}\n"))
    assert changed_shots(a, b) == set(SHOT_FRAMES)


def test_camera_and_resolution_change_keys(plan_text):
    a = plan_text()
    cam = plan_text(edit("        prompt: darkness\n",
                         "        prompt: darkness\n        camera: {move: push_in}\n"))
    assert changed_shots(a, cam) == {"s02_020"}
    size = plan_text(edit("resolution: [768, 512]", "resolution: [512, 512]"))
    assert changed_shots(a, size) == set(SHOT_FRAMES)


def test_shot_length_changes_only_that_shot(plan_text):
    a = plan_text()
    b = plan_text(edit("frames: 130", "frames: 131"))
    assert changed_shots(a, b) == {"s02_010"}


def test_stitch_only_fields_keep_keys(plan_text):
    a = plan_text()
    b = plan_text(edit("title: Moth and flame", "title: Moth and flame (director's cut)"))
    c = plan_text(edit("transition: {crossfade: 0.5}", "transition: {fade_black: 1}"))
    assert keys_by_shot(a) == keys_by_shot(b) == keys_by_shot(c)


def test_animatic_slate_keys_on_the_scene_id(plan_text):
    # Slated frames show the scene and shot ids, so renaming a scene changes its pixels.
    a = plan_text()
    b = plan_text(edit("  - id: s02\n", "  - id: s02b\n"))
    assert changed_shots(a, b) == {"s02_010", "s02_020"}
    no_slate = "model: {backend: animatic, slate: false}\n"
    c = plan_text(with_model(no_slate))
    d = plan_text(with_model(no_slate, edit("  - id: s02\n", "  - id: s02b\n")))
    assert changed_shots(c, d) == set()


# --- frames and cost ------------------------------------------------------------------------
def test_film_frames_are_shot_frames_less_transitions(plan_text):
    plan = plan_text()
    assert [s.transition_frames for s in plan.shots] == [0, 12, 0, 0]
    assert plan.frames == sum(SHOT_FRAMES.values()) - 12 == 326
    assert plan.duration_s == pytest.approx(326 / 24)
    assert plan.shot("s02_020").duration_s == 2.5


def test_costs_are_positive_and_add_up(plan_text):
    plan = plan_text(with_model(WAN))
    for shot in plan.shots:
        assert all(c.est_gpu_s > 0 for c in shot.chunks)
        assert shot.est_gpu_s == pytest.approx(sum(c.est_gpu_s for c in shot.chunks), abs=1e-3)
    assert plan.est_gpu_s == pytest.approx(sum(s.est_gpu_s for s in plan.shots), abs=1e-3)
    # Wan: 20 s fixed + 0.23 s per frame per megapixel per step, 40 steps at 768x512;
    # the 48-frame shot renders 49 frames (4k+1).
    first = plan.chunks[0]
    assert first.num_frames == 49
    assert first.est_gpu_s == pytest.approx(20.0 + 0.23 * 49 * (768 * 512 / 1e6) * 40, abs=1e-3)


def test_more_steps_cost_more(plan_text):
    a = plan_text(with_model(WAN))
    b = plan_text(with_model("model: {backend: diffusers, family: wan, id: org/wan-i2v, steps: 80}\n"))
    assert b.est_gpu_s > a.est_gpu_s


def test_plan_records_references_of_used_characters(folder, plan_text):
    plan = plan_text()
    assert plan.references == {"flame": str(folder / "flame.png"), "moth": str(folder / "moth.png")}
    assert plan.shot("s02_010").character_hashes == (plan.characters["moth"], plan.characters["flame"])


def test_unhashed_film_is_refused(folder):
    path = folder / "film.yaml"
    path.write_text(FILM, encoding="utf-8")
    with pytest.raises(PlanError, match="not hashed"):
        plan_film(load_film(path, hash_references=False))


# --- campaigns ------------------------------------------------------------------------------------
CAMPAIGN = """\
reelfarm: 1
campaign: Spring launch
film: film.yaml
matrix:
  aspect:
    wide: {film: {resolution: [768, 432]}}
    tall: {film: {resolution: [432, 768]}}
    square: {film: {resolution: [512, 512]}}
  product:
    mug: {vars: {product: coffee mug}}
    lamp: {vars: {product: desk lamp}}
schedule: {cron: "0 6 * * 1", timezone: Europe/Paris}
"""


@pytest.fixture
def campaign_path(folder: Path) -> Callable[..., Path]:
    def write(campaign: str = CAMPAIGN, film: str = CAMPAIGN_FILM) -> Path:
        (folder / "film.yaml").write_text(film, encoding="utf-8")
        path = folder / "campaign.yaml"
        path.write_text(campaign, encoding="utf-8")
        return path

    return write


def test_campaign_plans_to_six_cells(campaign_path):
    loaded = load_campaign(campaign_path())
    cplan = plan_campaign(loaded.campaign.campaign, loaded.cells)
    assert isinstance(cplan, CampaignPlan) and cplan.title == "Spring launch"
    assert [c.cell_id for c, _ in cplan.cells] == [
        "wide/mug", "wide/lamp", "tall/mug", "tall/lamp", "square/mug", "square/lamp",
    ]
    cells = {c.cell_id: (c, p) for c, p in cplan.cells}
    cell, plan = cells["tall/lamp"]
    assert cell.values == {"aspect": "tall", "product": "lamp"}
    assert (plan.width, plan.height) == (432, 768)
    assert plan.title == "desk lamp spot"
    assert plan.shot("s01_010").prompt == "a moth lands on a desk lamp"
    assert plan.shot("s01_020").prompt == "the logo"
    assert cells["wide/mug"][1].shot("s01_010").prompt == "a moth lands on a coffee mug"


def test_campaign_counts_shared_chunks_once(campaign_path):
    loaded = load_campaign(campaign_path())
    cplan = plan_campaign(loaded.campaign.campaign, loaded.cells)
    # s01_010: 2 chunks, different in every cell; s01_020: 1 chunk, shared by both products.
    assert cplan.chunk_count == 6 * 3
    assert cplan.unique_chunks == 6 * 2 + 3 * 1
    by_key = {c.key: c.est_gpu_s for _, p in cplan.cells for c in p.chunks}
    assert cplan.est_gpu_s == pytest.approx(sum(by_key.values()), abs=1e-3)
    assert cplan.est_gpu_s < sum(p.est_gpu_s for _, p in cplan.cells)
    wide = {c.cell_id: p for c, p in cplan.cells}
    assert wide["wide/mug"].shot("s01_020").chunks == wide["wide/lamp"].shot("s01_020").chunks
    assert wide["wide/mug"].shot("s01_020").chunks != wide["tall/mug"].shot("s01_020").chunks


def test_campaign_schedule_and_load_spec(campaign_path):
    loaded = load_spec(campaign_path())
    assert isinstance(loaded, LoadedCampaign)
    assert loaded.campaign.schedule is not None
    schedule = loaded.campaign.schedule
    assert (schedule.cron, schedule.timezone) == ("0 6 * * 1", "Europe/Paris")
    assert loaded.campaign.cell_count == len(loaded.cells) == 6
    # every cell's references are hashed, once
    assert {c.film.characters["moth"].sha256 for c in loaded.cells} != {None}
    assert len({c.film.characters["moth"].sha256 for c in loaded.cells}) == 1


def test_campaign_unknown_placeholder_names_the_cell(folder, campaign_path):
    path = campaign_path(film=CAMPAIGN_FILM.replace("prompt: the logo", "prompt: the logo, {tagline}"))
    with pytest.raises(SpecError) as info:
        load_campaign(path)
    issues = info.value.issues
    assert len(issues) == 6
    film = folder / "film.yaml"
    assert str(issues[0]) == (
        f"{film}:14 scenes[0].shots[1].prompt: (cell wide/mug) unknown placeholder {{tagline}} "
        "(campaign vars: aspect, product)"
    )
    assert {i.message.split(")")[0] for i in issues} == {
        "(cell wide/mug", "(cell wide/lamp", "(cell tall/mug", "(cell tall/lamp",
        "(cell square/mug", "(cell square/lamp",
    }


def test_campaign_bad_cron_is_refused(campaign_path):
    path = campaign_path(CAMPAIGN.replace('"0 6 * * 1"', '"61 6 * * 1"'))
    with pytest.raises(SpecError) as info:
        load_campaign(path)
    (issue,) = info.value.issues
    assert str(issue).startswith(f"{path}:12 schedule.cron: not a valid cron line '61 6 * * 1'")


def test_campaign_bad_time_zone_is_refused(campaign_path):
    path = campaign_path(CAMPAIGN.replace("Europe/Paris", "Mars/Olympus"))
    with pytest.raises(SpecError) as info:
        load_campaign(path)
    assert str(info.value) == f"{path}:12 schedule.timezone: unknown time zone 'Mars/Olympus'"


def test_campaign_cell_override_errors_name_the_cell(campaign_path):
    path = campaign_path(CAMPAIGN.replace("[432, 768]", "[431, 768]"))
    with pytest.raises(SpecError) as info:
        load_campaign(path)
    messages = [i.message for i in info.value.issues]
    assert messages == [
        f"(cell tall/{p}) width and height must be even (yuv420p), got [431, 768]"
        for p in ("mug", "lamp")
    ]
    assert {i.path for i in info.value.issues} == {"resolution"}


def test_campaign_override_errors_point_at_the_campaign_line(campaign_path):
    path = campaign_path(CAMPAIGN.replace("[432, 768]", "[431, 768]"))
    with pytest.raises(SpecError) as info:
        load_campaign(path)
    assert str(info.value.issues[0]).startswith(f"{path}:7 ")


def test_campaign_matrix_value_names_are_slugs(campaign_path):
    path = campaign_path(CAMPAIGN.replace("    mug: {vars", "    ../mug: {vars"))
    with pytest.raises(SpecError) as info:
        load_campaign(path)
    (issue,) = info.value.issues
    assert str(issue).startswith(f"{path}:10 matrix.product.../mug: '../mug' is not a safe id")


def test_campaign_version_newer_than_supported(campaign_path):
    path = campaign_path(CAMPAIGN.replace("reelfarm: 1", "reelfarm: 9"))
    with pytest.raises(SpecError, match=r"campaign.yaml:1 reelfarm: spec version 9 is newer"):
        load_campaign(path)
