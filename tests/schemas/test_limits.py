"""Every size a spec can ask for is bounded, however it is written, and refused at load.

The limits live in :mod:`reelfarm.schemas.film`; each refusal names its limit.
"""

from __future__ import annotations

import pytest
import yaml

from reelfarm.errors import SpecError
from reelfarm.schemas import load_campaign, load_film
from reelfarm.schemas.film import (
    MAX_CAMPAIGN_CELLS,
    MAX_CHUNKS,
    MAX_FILM_FRAMES,
    MAX_PIXEL_FRAMES,
    MAX_SHOT_FRAMES,
    MAX_SPEC_BYTES,
    MAX_SPEC_NODES,
    Film,
    estimate_chunks,
)
from tests.schemas.test_spec_errors import FILM, edit


def issues(path, load=load_film, **kw) -> list[str]:
    with pytest.raises(SpecError) as info:
        load(path, **kw)
    return [str(i) for i in info.value.issues]


def test_limits_are_sane():
    assert MAX_SHOT_FRAMES <= MAX_FILM_FRAMES
    assert MAX_PIXEL_FRAMES >= 1920 * 1080 * 24 * 3600 * 3  # a three-hour HD feature fits
    assert MAX_CHUNKS >= 10_000 and MAX_CAMPAIGN_CELLS >= 100


# --- per shot -------------------------------------------------------------------------------
def test_a_huge_duration_is_refused_like_huge_frames(write_spec):
    path = write_spec(edit("duration: 2", "duration: 1000000000000"))
    assert issues(path) == [
        f"{path}:10 scenes[0].shots[0].duration: `duration` is longer than {MAX_SHOT_FRAMES} frames "
        f"(41666.7 s at 24 fps), the limit per shot (MAX_SHOT_FRAMES), got 1000000000000.0"
    ]
    path = write_spec(edit("frames: 30", f"frames: {MAX_SHOT_FRAMES + 1}"))
    assert issues(path) == [
        f"{path}:14 scenes[0].shots[1].frames: `frames` is more than {MAX_SHOT_FRAMES} frames, "
        f"the limit per shot (MAX_SHOT_FRAMES), got {MAX_SHOT_FRAMES + 1}"
    ]


@pytest.mark.parametrize("value", ["1e308", "1.7976931348623157e308", "99999999999999999999999"])
def test_absurd_durations_are_refused_quickly(write_spec, value):
    path = write_spec(edit("duration: 2", f"duration: {value}"))
    (msg,) = issues(path)
    assert "MAX_SHOT_FRAMES" in msg, msg


def test_a_duration_at_the_limit_loads(write_spec):
    # 1,000,000 frames at 24 fps is 41666.66 s; 41666.6 s rounds to 999,998 frames.
    film = load_film(write_spec(edit("duration: 2", "duration: 41666.6")))
    assert film.scenes[0].shots[0].frame_count(film.fps) <= MAX_SHOT_FRAMES


# --- per film -------------------------------------------------------------------------------
def test_total_frames_of_a_film_are_bounded(write_spec):
    text = edit("frames: 30", f"frames: {MAX_SHOT_FRAMES}")
    text = edit("frames: 24", f"frames: {MAX_SHOT_FRAMES}", text)
    text = edit("title: Moth and flame\n", "title: Moth and flame\nresolution: [16, 16]\n"
                "model: {backend: animatic, chunk_frames: 1024}\n", text)
    path = write_spec(text)
    total = MAX_SHOT_FRAMES * 2 + 48
    assert issues(path) == [
        f"{path}:8 scenes: the shots add up to more than {MAX_FILM_FRAMES} frames, the limit per film "
        f"(MAX_FILM_FRAMES), got {total} frames"
    ]


def test_pixel_frames_are_bounded(write_spec):
    text = edit("frames: 30", f"frames: {MAX_SHOT_FRAMES}")
    text = edit("title: Moth and flame\n", "title: Moth and flame\nresolution: [8192, 8192]\n"
                "model: {backend: animatic, chunk_frames: 1024}\n", text)
    path = write_spec(text)
    frames = MAX_SHOT_FRAMES + 48 + 24
    assert issues(path) == [
        f"{path}:3 resolution: width x height x frames is more than {MAX_PIXEL_FRAMES} pixel-frames, "
        f"the limit per film (MAX_PIXEL_FRAMES), got 8192x8192 x {frames} frames"
    ]


def test_chunks_of_a_film_are_bounded(write_spec):
    # One-frame chunks: a 200,000-frame shot would plan 200,000 chunks.
    text = edit("frames: 30", "frames: 200000")
    text = edit("title: Moth and flame\n", "title: Moth and flame\nresolution: [16, 16]\n"
                "model: {backend: animatic, chunk_frames: 1, overlap: 0}\n", text)
    path = write_spec(text)
    assert issues(path) == [
        f"{path}:8 scenes: the shots plan more than {MAX_CHUNKS} chunks, the limit per load "
        f"(MAX_CHUNKS), got 200072 chunks"
    ]


def test_estimate_chunks_matches_the_planner():
    from reelfarm.flows.plan import chunk_ranges
    from reelfarm.schemas.families import FAMILIES

    for fam in FAMILIES.values():
        per = fam.native_frames
        for overlap in (0, 1, 8, per - 1):
            for frames in (1, per - 1, per, per + 1, 3 * per + 7, 1000):
                if frames >= 1:
                    assert estimate_chunks(frames, per, overlap) == len(chunk_ranges(frames, fam, per, overlap))


def test_a_film_built_directly_is_bounded_too(write_spec):
    film = load_film(write_spec(FILM))
    doc = film.model_dump(mode="json")
    doc["scenes"][0]["shots"][0] = {"id": "s01_010", "duration": 1e12, "prompt": "x"}
    with pytest.raises(ValueError, match="MAX_SHOT_FRAMES"):
        Film.model_validate(doc)


# --- the spec document itself ----------------------------------------------------------------
def test_a_spec_file_too_large_is_refused(write_spec):
    path = write_spec(FILM + "#" * MAX_SPEC_BYTES)
    assert issues(path) == [f"{path}: spec is larger than {MAX_SPEC_BYTES} bytes (MAX_SPEC_BYTES)"]


def test_a_yaml_alias_bomb_is_refused(write_spec):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    path = write_spec(FILM + "\n".join(lines) + "\n")
    (msg,) = issues(path)
    assert msg == f"{path}: spec has more than {MAX_SPEC_NODES} values (MAX_SPEC_NODES), aliases counted"


def test_a_yaml_alias_that_contains_itself_is_refused(write_spec):
    path = write_spec(FILM + "loop: &loop [1, *loop]\n")
    (msg,) = issues(path)
    assert msg.endswith("loop[1]: a YAML alias refers to a value that contains it"), msg


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a: " + "9" * 5000, "title: 2001-13-45"])
def test_unparseable_values_are_spec_errors(write_spec, text):
    path = write_spec(text + "\n")
    (msg,) = issues(path)
    assert msg.startswith(f"{path}"), msg


# --- campaigns: cells x chunks -----------------------------------------------------------------
def write_campaign(folder, matrix, film_frames=48, chunk_frames=48):
    film = edit("frames: 30", f"frames: {film_frames}")
    film = edit("title: Moth and flame\n", "title: Moth and flame\nresolution: [16, 16]\n"
                f"model: {{backend: animatic, chunk_frames: {chunk_frames}, overlap: 0}}\n", film)
    (folder / "film.yaml").write_text(film)
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump({"reelfarm": 1, "campaign": "c", "film": "film.yaml", "matrix": matrix}))
    return path


def test_campaign_cells_are_bounded_before_any_cell_is_built(refs):
    axis = {f"v{i}": {} for i in range(100)}
    path = write_campaign(refs, {"a": axis, "b": axis, "c": axis})  # a million cells
    assert issues(path, load_campaign) == [
        f"{path}:3 matrix: the matrix makes more than {MAX_CAMPAIGN_CELLS} cells, the limit per campaign "
        f"(MAX_CAMPAIGN_CELLS), got 1000000 cells"
    ]


def test_campaign_cells_times_chunks_are_bounded(refs):
    # 500 cells x 400 one-frame chunks... each film is fine alone, together they are not.
    axis = {f"v{i}": {} for i in range(500)}
    path = write_campaign(refs, {"a": axis}, film_frames=300, chunk_frames=1)
    (msg,) = issues(path, load_campaign, hash_references=False)
    assert msg.startswith(f"{path}:3 matrix: the cells plan more than {MAX_CHUNKS} chunks, the limit per "
                          "load (MAX_CHUNKS), got "), msg
