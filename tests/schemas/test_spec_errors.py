"""Every spec error names the file, the line, the field path and the bad value.

Specs are written with textwrap.dedent, so the line numbers asserted here are the lines of
``FILM`` (numbered in the comment below) after the shown edit.
"""

from __future__ import annotations

import json
import pickle
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest

from reelfarm.errors import Issue, SpecError
from reelfarm.schemas import Film, load_film, load_spec

#  1 reelfarm: 1
#  2 title: Moth and flame
#  3 characters:
#  4   moth: {reference: moth.png}
#  5   flame: {reference: flame.png}
#  6 scenes:
#  7   - id: s01
#  8     shots:
#  9       - id: s01_010
# 10         duration: 2
# 11         prompt: a moth circles a candle
# 12         characters: [moth]
# 13       - id: s01_020
# 14         frames: 30
# 15         prompt: the flame flickers
# 16         characters: [flame, moth]
# 17   - id: s02
# 18     shots:
# 19       - id: s02_010
# 20         frames: 24
# 21         prompt: darkness
FILM = """\
reelfarm: 1
title: Moth and flame
characters:
  moth: {reference: moth.png}
  flame: {reference: flame.png}
scenes:
  - id: s01
    shots:
      - id: s01_010
        duration: 2
        prompt: a moth circles a candle
        characters: [moth]
      - id: s01_020
        frames: 30
        prompt: the flame flickers
        characters: [flame, moth]
  - id: s02
    shots:
      - id: s02_010
        frames: 24
        prompt: darkness
"""

SLUG_HELP = "is not a safe id"


def edit(old: str, new: str, text: str = FILM) -> str:
    """Replace exactly one occurrence of ``old``: an edit that matches nothing is a test bug."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def spec_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_film(path)
    return info.value


def only_issue(path: Path) -> str:
    """The one issue a spec has, as text."""
    err = spec_error(path)
    assert len(err.issues) == 1, str(err)
    return str(err.issues[0])


# --- the valid spec ------------------------------------------------------------------------
def test_base_film_loads_and_hashes_references(write_spec):
    path = write_spec(FILM)
    film = load_film(path)
    assert isinstance(film, Film)
    assert [s.id for _, s in film.shots()] == ["s01_010", "s01_020", "s02_010"]
    assert film.fps == Fraction(24)
    for name in ("moth", "flame"):
        char = film.characters[name]
        assert char.reference == str(path.parent / f"{name}.png")
        assert char.sha256 is not None and len(char.sha256) == 64
    assert film.characters["moth"].sha256 != film.characters["flame"].sha256


# --- syntax --------------------------------------------------------------------------------
def test_malformed_yaml_names_file_and_line(write_spec):
    path = write_spec(edit("prompt: the flame flickers", "prompt: the flame: flickers"))
    assert only_issue(path) == f"{path}:15: malformed YAML: mapping values are not allowed here"


def test_malformed_yaml_unclosed_flow_list(write_spec):
    path = write_spec(edit("characters: [moth]\n", "characters: [moth\n"))
    msg = only_issue(path)
    assert msg.startswith(f"{path}:13: malformed YAML: ")


def test_duplicate_yaml_key_is_refused(write_spec):
    # PyYAML would silently keep the last `frames`.
    path = write_spec(edit("frames: 30\n", "frames: 30\n        frames: 31\n"))
    assert only_issue(path) == f"{path}:15 scenes[0].shots[1].frames: duplicate key 'frames'"


def test_top_level_must_be_a_mapping(write_spec):
    path = write_spec("- just\n- a list\n")
    assert only_issue(path) == f"{path}:1: expected a mapping at the top, got list"


# --- keys ----------------------------------------------------------------------------------
def test_unknown_key_in_a_shot(write_spec):
    path = write_spec(edit("        prompt: a moth circles a candle\n",
                           "        prompt: a moth circles a candle\n        colour: red\n"))
    assert only_issue(path) == f"{path}:12 scenes[0].shots[0].colour: unknown key 'colour'"


def test_unknown_top_level_key(write_spec):
    path = write_spec(edit("title: Moth and flame\n", "title: Moth and flame\nframe_rate: 25\n"))
    assert only_issue(path) == f"{path}:3 frame_rate: unknown key 'frame_rate'"


def test_unknown_key_inside_the_model_union(write_spec):
    # pydantic's location carries the union tag (model.diffusers.stepz); the path must not.
    path = write_spec(edit("title: Moth and flame\n",
                           "title: Moth and flame\nmodel:\n  backend: diffusers\n  family: wan\n"
                           "  id: x\n  stepz: 3\n"))
    assert only_issue(path) == f"{path}:7 model.stepz: unknown key 'stepz'; did you mean `steps`?"


def test_missing_shot_field_points_at_the_shot(write_spec):
    path = write_spec(edit("        prompt: the flame flickers\n", ""))
    assert only_issue(path) == f"{path}:13 scenes[0].shots[1].prompt: missing field `prompt`"


def test_missing_title(write_spec):
    path = write_spec(edit("title: Moth and flame\n", ""))
    assert only_issue(path) == f"{path}:1 title: missing field `title`"


def test_missing_model_id(write_spec):
    path = write_spec(edit("title: Moth and flame\n",
                           "title: Moth and flame\nmodel: {backend: diffusers, family: wan}\n"))
    assert only_issue(path) == f"{path}:3 model.id: missing field `id`"


def test_neither_duration_nor_frames(write_spec):
    path = write_spec(edit("        frames: 24\n", ""))
    assert only_issue(path) == (
        f"{path}:19 scenes[1].shots[0]: give exactly one of `duration` (seconds) or `frames`"
    )


def test_both_duration_and_frames(write_spec):
    path = write_spec(edit("        frames: 24\n", "        frames: 24\n        duration: 1\n"))
    assert only_issue(path) == (
        f"{path}:19 scenes[1].shots[0]: give exactly one of `duration` (seconds) or `frames`"
    )


# --- cross-field checks ---------------------------------------------------------------------
def test_unknown_character(write_spec):
    path = write_spec(edit("characters: [flame, moth]", "characters: [flame, mothh]"))
    assert only_issue(path) == (
        f"{path}:16 scenes[0].shots[1].characters[1]: unknown character 'mothh' (known: flame, moth); "
        "did you mean 'moth'?"
    )


def test_character_listed_twice(write_spec):
    path = write_spec(edit("characters: [flame, moth]", "characters: [moth, moth]"))
    assert only_issue(path) == (
        f"{path}:16 scenes[0].shots[1].characters[1]: character 'moth' is listed twice"
    )


def test_duplicate_shot_id_in_one_scene(write_spec):
    path = write_spec(edit("- id: s01_020", "- id: s01_010"))
    assert only_issue(path) == (
        f"{path}:13 scenes[0].shots[1].id: duplicate shot id 's01_010' (first at scenes[0].shots[0])"
    )


def test_duplicate_shot_id_across_scenes(write_spec):
    path = write_spec(edit("- id: s02_010", "- id: s01_020"))
    assert only_issue(path) == (
        f"{path}:19 scenes[1].shots[0].id: duplicate shot id 's01_020' (first at scenes[0].shots[1])"
    )


def test_duplicate_scene_id(write_spec):
    path = write_spec(edit("  - id: s02\n", "  - id: s01\n"))
    assert only_issue(path) == f"{path}:17 scenes[1].id: duplicate scene id 's01' (first at scenes[0])"


def test_every_issue_is_reported_in_file_order(write_spec):
    text = edit("characters: [flame, moth]", "characters: [flame, mothh]")
    text = edit("- id: s02_010", "- id: s01_010", text)
    text = edit("characters: [moth]", "characters: [moht]", text)
    err = spec_error(write_spec(text))
    assert [(i.line, i.path) for i in err.issues] == [
        (12, "scenes[0].shots[0].characters[0]"),
        (16, "scenes[0].shots[1].characters[1]"),
        (19, "scenes[1].shots[0].id"),
    ]


# --- ids are safe slugs -----------------------------------------------------------------------
UNSAFE_IDS = [
    pytest.param("../x", id="dotdot"),
    pytest.param("a/b", id="slash"),
    pytest.param("", id="empty"),
    pytest.param("a\x01b", id="control"),
    pytest.param("a\tb", id="tab"),
    pytest.param("a" * 65, id="65-chars"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("a..b", id="inner-dotdot"),
    pytest.param("s01\n", id="trailing-newline"),
    pytest.param("a" * 64 + "\n", id="64-chars-and-newline"),
]


@pytest.mark.parametrize("bad", UNSAFE_IDS)
def test_shot_id_must_be_a_safe_slug(write_spec, bad):
    # json.dumps gives a double-quoted string YAML reads with the same escapes.
    path = write_spec(edit("- id: s01_020", f"- id: {json.dumps(bad)}"))
    msg = only_issue(path)
    assert msg.startswith(f"{path}:13 scenes[0].shots[1].id: {bad!r} {SLUG_HELP}"), msg


def test_scene_id_must_be_a_safe_slug(write_spec):
    path = write_spec(edit("  - id: s02\n", "  - id: ../s02\n"))
    assert only_issue(path).startswith(f"{path}:17 scenes[1].id: '../s02' {SLUG_HELP}")


def test_character_name_must_be_a_safe_slug(write_spec):
    path = write_spec(edit("  flame: {reference: flame.png}\n", "  fl/ame: {reference: flame.png}\n"))
    assert only_issue(path).startswith(f"{path}:5 characters.fl/ame: 'fl/ame' {SLUG_HELP}")


def test_longest_safe_id_is_accepted(write_spec):
    longest = "a" * 64
    film = load_film(write_spec(edit("- id: s02_010", f"- id: {longest}")))
    assert film.scenes[1].shots[0].id == longest


# --- durations --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "Input should be greater than 0, got 0"),
        ("-1", "Input should be greater than 0, got -1"),
        ("-0.5", "Input should be greater than 0, got -0.5"),
        (".nan", "Input should be a finite number, got nan"),
        (".inf", "Input should be a finite number, got inf"),
    ],
)
def test_duration_must_be_positive(write_spec, value, message):
    path = write_spec(edit("duration: 2", f"duration: {value}"))
    assert only_issue(path) == f"{path}:10 scenes[0].shots[0].duration: {message}"


@pytest.mark.parametrize("value", ["0", "-24"])
def test_frames_must_be_positive(write_spec, value):
    path = write_spec(edit("frames: 30", f"frames: {value}"))
    assert only_issue(path) == (
        f"{path}:14 scenes[0].shots[1].frames: Input should be greater than 0, got {value}"
    )


def test_duration_shorter_than_one_frame(write_spec):
    path = write_spec(edit("duration: 2", "duration: 0.01"))
    assert only_issue(path) == (
        f"{path}:10 scenes[0].shots[0].duration: `duration` is shorter than one frame at 24 fps, "
        "got 0.01"
    )


# --- model families ---------------------------------------------------------------------------
def with_model(model_lines: str, text: str = FILM) -> str:
    """Insert a block-style film ``model:`` after the title (line 3 onwards)."""
    return edit("title: Moth and flame\n", "title: Moth and flame\nmodel:\n" + model_lines, text)


def test_ltx_needs_sizes_divisible_by_32(write_spec):
    path = write_spec(edit("title: Moth and flame\n",
                           "title: Moth and flame\nresolution: [100, 64]\n"
                           "model: {backend: diffusers, family: ltx, id: x}\n"))
    assert only_issue(path) == (
        f"{path}:3 resolution: ltx needs width and height divisible by 32, got 100x64"
    )


def test_ltx_default_resolution_is_refused_where_no_resolution_is_written(write_spec):
    # 768x432: 432 is not a multiple of 32. No `resolution:` line, so the document's line.
    path = write_spec(with_model("  backend: diffusers\n  family: ltx\n  id: x\n"))
    assert only_issue(path) == (
        f"{path}:1 resolution: ltx needs width and height divisible by 32, got 768x432"
    )


def test_shot_model_family_checks_the_size_too(write_spec):
    text = edit("        frames: 24\n",
                "        frames: 24\n        model: {backend: diffusers, family: ltx, id: x}\n")
    path = write_spec(text)
    assert only_issue(path) == (
        f"{path}:21 scenes[1].shots[0].model: ltx needs width and height divisible by 32, got 768x432"
    )


@pytest.mark.parametrize(
    ("family", "frames", "rule"),
    [
        ("wan", 50, "4k+1 (at least 5)"),
        ("wan", 80, "4k+1 (at least 5)"),
        ("ltx", 120, "8k+1 (at least 9)"),
        ("cogvideox", 48, "8k+1 (at least 9)"),
        ("svd", 20, "14 or 25 (at least 14)"),
        ("svd", 13, "14 or 25 (at least 14)"),
    ],
)
def test_chunk_frames_must_obey_the_family_rule(write_spec, family, frames, rule):
    # 768x512 suits every family's size rule, so only the frame rule fails.
    text = with_model(f"  backend: diffusers\n  family: {family}\n  id: x\n  chunk_frames: {frames}\n")
    text = edit("title: Moth and flame\n", "title: Moth and flame\nresolution: [768, 512]\n", text)
    path = write_spec(text)
    assert only_issue(path) == (
        f"{path}:8 model.chunk_frames: `chunk_frames` must be {rule} for {family}, got {frames}"
    )


@pytest.mark.parametrize(("family", "frames"), [("wan", 49), ("wan", 81), ("svd", 14), ("svd", 25),
                                                ("cogvideox", 49), ("cogvideox", 17)])
def test_chunk_frames_that_obey_the_rule_load(write_spec, family, frames):
    film = load_film(write_spec(with_model(f"  backend: diffusers\n  family: {family}\n  id: x\n"
                                           f"  chunk_frames: {frames}\n")))
    assert film.model.frames_per_chunk == frames


def test_shot_model_override_obeys_the_family_rule(write_spec):
    text = with_model("  backend: diffusers\n  family: wan\n  id: x\n")
    text = edit("        frames: 30\n",
                "        frames: 30\n        model:\n          chunk_frames: 50\n", text)
    path = write_spec(text)
    assert only_issue(path) == (
        f"{path}:20 scenes[0].shots[1].model.chunk_frames: `chunk_frames` must be 4k+1 (at least 5) "
        "for wan, got 50"
    )


def test_overlap_must_be_shorter_than_a_chunk(write_spec):
    path = write_spec(with_model("  backend: diffusers\n  family: wan\n  id: x\n  overlap: 81\n"))
    assert only_issue(path) == (
        f"{path}:7 model.overlap: `overlap` must be shorter than a chunk (81 frames), got 81"
    )


def test_chained_diffusers_chunks_need_an_overlap(write_spec):
    path = write_spec(with_model("  backend: diffusers\n  family: wan\n  id: x\n  overlap: 0\n"))
    assert only_issue(path) == (
        f"{path}:7 model.overlap: `overlap` must be at least 1 when `continuation` is 'previous', got 0"
    )
    ok = write_spec(with_model("  backend: diffusers\n  family: wan\n  id: x\n  overlap: 0\n"
                               "  continuation: reference\n"))
    load_film(ok)


def test_unknown_family(write_spec):
    path = write_spec(with_model("  backend: diffusers\n  family: sora\n  id: x\n"))
    msg = only_issue(path)
    assert msg.startswith(f"{path}:5 model.family: ") and msg.endswith("got 'sora'"), msg


# --- references -------------------------------------------------------------------------------
def test_missing_reference_image(write_spec):
    path = write_spec(edit("{reference: moth.png}", "{reference: mooth.png}"))
    assert only_issue(path) == (
        f"{path}:4 characters.moth.reference: character 'moth': reference image not found: "
        f"{path.parent / 'mooth.png'}"
    )


def test_reference_that_is_not_an_image(write_spec, refs):
    (refs / "notes.png").write_bytes(b"this is not a PNG")
    path = write_spec(edit("{reference: flame.png}", "{reference: notes.png}"))
    assert only_issue(path) == (
        f"{path}:5 characters.flame.reference: character 'flame': reference is not a readable image: "
        f"{refs / 'notes.png'} (UnidentifiedImageError)"
    )


def test_reference_that_is_a_truncated_png(write_spec, refs):
    data = (refs / "moth.png").read_bytes()
    (refs / "half.png").write_bytes(data[: len(data) // 2])
    path = write_spec(edit("{reference: moth.png}", "{reference: half.png}"))
    msg = only_issue(path)
    assert msg.startswith(f"{path}:4 characters.moth.reference: character 'moth': reference is not a "
                          f"readable image: {refs / 'half.png'}"), msg


def test_reference_that_is_a_folder(write_spec, refs):
    (refs / "folder.png").mkdir()
    path = write_spec(edit("{reference: moth.png}", "{reference: folder.png}"))
    msg = only_issue(path)
    assert msg.startswith(f"{path}:4 characters.moth.reference: character 'moth': "), msg
    assert str(refs / "folder.png") in msg


def test_pinned_reference_hash_must_match(write_spec):
    path = write_spec(edit("{reference: moth.png}", "{reference: moth.png, sha256: " + "0a" * 32 + "}"))
    msg = only_issue(path)
    assert msg.startswith(f"{path}:4 characters.moth.sha256: character 'moth': reference changed: "
                          "pinned sha256 0a0a0a0a0a0a..."), msg


# --- transitions ------------------------------------------------------------------------------
def test_crossfade_on_the_first_shot(write_spec):
    path = write_spec(edit("        duration: 2\n",
                           "        duration: 2\n        transition: {crossfade: 0.5}\n"))
    assert only_issue(path) == (
        f"{path}:11 scenes[0].shots[0].transition: the film's first shot cannot begin with a "
        "crossfade: there is no shot before it"
    )


def test_fade_black_on_the_first_shot(write_spec):
    path = write_spec(edit("        duration: 2\n",
                           "        duration: 2\n        transition: {fade_black: 1}\n"))
    assert "cannot begin with a fade_black" in only_issue(path)


def test_transition_longer_than_the_previous_shot(write_spec):
    # s01_010 is 48 frames; s01_020 made 200 frames so only the previous shot is too short.
    text = edit("frames: 30\n", "frames: 200\n        transition: {crossfade: 2.5}\n")
    path = write_spec(text)
    assert only_issue(path) == (
        f"{path}:15 scenes[0].shots[1].transition: crossfade of 2.5 s (60 frames) is longer than the "
        "previous shot 's01_010' (48 frames)"
    )


def test_transition_longer_than_this_shot(write_spec):
    # s01_020 is 30 frames; a 1.5 s crossfade is 36 frames, shorter than s01_010's 48.
    path = write_spec(edit("frames: 30\n", "frames: 30\n        transition: {crossfade: 1.5}\n"))
    assert only_issue(path) == (
        f"{path}:15 scenes[0].shots[1].transition: crossfade of 1.5 s (36 frames) is longer than this "
        "shot (30 frames)"
    )


def test_transition_as_long_as_both_neighbours_is_allowed(write_spec):
    text = edit("frames: 30\n", "frames: 48\n        transition: {crossfade: 2}\n")
    film = load_film(write_spec(text))
    assert film.scenes[0].shots[1].transition.seconds == 2


def test_a_cut_has_no_duration(write_spec):
    path = write_spec(edit("frames: 30\n", "frames: 30\n        transition: {kind: cut, seconds: 1}\n"))
    assert only_issue(path) == f"{path}:15 scenes[0].shots[1].transition: a cut has no duration"


# --- versions ---------------------------------------------------------------------------------
def test_spec_version_newer_than_supported(write_spec):
    path = write_spec(edit("reelfarm: 1", "reelfarm: 2"))
    assert only_issue(path) == (
        f"{path}:1 reelfarm: spec version 2 is newer than this reelfarm (reads up to 1); "
        "upgrade reelfarm"
    )


@pytest.mark.parametrize(("value", "shown"), [("'1'", "'1'"), ("true", "True"), ("1.5", "1.5")])
def test_spec_version_must_be_an_integer(write_spec, value, shown):
    path = write_spec(edit("reelfarm: 1", f"reelfarm: {value}"))
    assert only_issue(path) == f"{path}:1 reelfarm: spec version must be an integer, got {shown}"


def test_v0_spec_is_upgraded(write_spec):
    text = edit("reelfarm: 1\n", "reelfarm: 0\nframe_rate: 25\nresolution: \"768x432\"\n")
    film = load_film(write_spec(text))
    assert film.reelfarm == 1
    assert film.fps == Fraction(25)
    assert film.resolution == (768, 432)


def test_v0_spec_with_ntsc_rate_is_upgraded_exactly(write_spec):
    text = edit("reelfarm: 1\n", "reelfarm: 0\nframe_rate: 23.976\nresolution: 640x360\n")
    film = load_film(write_spec(text))
    assert film.fps == Fraction(24000, 1001)
    assert film.resolution == (640, 360)


def test_v0_errors_keep_their_lines(write_spec):
    text = edit("reelfarm: 1\n", "reelfarm: 0\nframe_rate: 25\n")
    text = edit("characters: [flame, moth]", "characters: [flame, mothh]", text)
    path = write_spec(text)
    assert only_issue(path) == (
        f"{path}:17 scenes[0].shots[1].characters[1]: unknown character 'mothh' (known: flame, moth); "
        "did you mean 'moth'?"
    )


# --- JSON specs -------------------------------------------------------------------------------
#  1 {
#  2   "reelfarm": 1,
#  3   "title": "Moth and flame",
#  4   "characters": {
#  5     "moth": {"reference": "moth.png"},
#  6     "flame": {"reference": "flame.png"}
#  7   },
#  8   "scenes": [
#  9     {"id": "s01", "shots": [
# 10       {"id": "s01_010", "duration": 2, "prompt": "a moth", "characters": ["moth"]},
# 11       {"id": "s01_020", "frames": 30, "prompt": "the flame",
# 12        "characters": ["flame", "moth"]}
# 13     ]}
# 14   ]
# 15 }
FILM_JSON = """\
{
  "reelfarm": 1,
  "title": "Moth and flame",
  "characters": {
    "moth": {"reference": "moth.png"},
    "flame": {"reference": "flame.png"}
  },
  "scenes": [
    {"id": "s01", "shots": [
      {"id": "s01_010", "duration": 2, "prompt": "a moth", "characters": ["moth"]},
      {"id": "s01_020", "frames": 30, "prompt": "the flame",
       "characters": ["flame", "moth"]}
    ]}
  ]
}
"""


def test_json_spec_loads(write_spec):
    film = load_film(write_spec(FILM_JSON, "film.json"))
    assert [s.id for _, s in film.shots()] == ["s01_010", "s01_020"]
    assert film.characters["moth"].sha256


def test_json_unknown_character(write_spec):
    path = write_spec(edit('["flame", "moth"]', '["flame", "mothh"]', FILM_JSON), "film.json")
    assert only_issue(path) == (
        f"{path}:12 scenes[0].shots[1].characters[1]: unknown character 'mothh' (known: flame, moth); "
        "did you mean 'moth'?"
    )


def test_json_unknown_key(write_spec):
    path = write_spec(edit('"frames": 30,', '"frames": 30, "colour": "red",', FILM_JSON), "film.json")
    assert only_issue(path) == f"{path}:11 scenes[0].shots[1].colour: unknown key 'colour'"


def test_json_duplicate_shot_id(write_spec):
    path = write_spec(edit('"id": "s01_020"', '"id": "s01_010"', FILM_JSON), "film.json")
    assert only_issue(path) == (
        f"{path}:11 scenes[0].shots[1].id: duplicate shot id 's01_010' (first at scenes[0].shots[0])"
    )


def test_json_bad_duration(write_spec):
    path = write_spec(edit('"duration": 2', '"duration": -2', FILM_JSON), "film.json")
    assert only_issue(path) == (
        f"{path}:10 scenes[0].shots[0].duration: Input should be greater than 0, got -2"
    )


def test_json_duplicate_key_is_refused(write_spec):
    # json.loads keeps the last key silently; the line map refuses it like YAML.
    path = write_spec(edit('"frames": 30,', '"frames": 30, "frames": 31,', FILM_JSON), "film.json")
    assert only_issue(path) == f"{path}:11 scenes[0].shots[1].frames: duplicate key 'frames'"


def test_malformed_json_names_the_line(write_spec):
    text = edit('"characters": ["moth"]}', '"characters": ["moth"],}', FILM_JSON)
    path = write_spec(text, "film.json")
    assert only_issue(path) == (
        f"{path}:10: malformed JSON: Expecting property name enclosed in double quotes"
    )


def test_tab_indented_json_keeps_its_lines(write_spec):
    # Tabs are plain JSON whitespace, but YAML (used for the line map) refuses tab indentation.
    doc = json.loads(FILM_JSON)
    doc["scenes"][0]["shots"][0]["characters"] = ["mothh"]
    text = json.dumps(doc, indent="\t")
    line = text.splitlines().index('\t\t\t\t\t\t"mothh"') + 1
    path = write_spec(text, "film.json")
    assert only_issue(path) == (
        f"{path}:{line} scenes[0].shots[0].characters[0]: unknown character 'mothh' "
        "(known: flame, moth); did you mean 'moth'?"
    )


def test_json_v0_upgrade(write_spec):
    text = edit('"reelfarm": 1,', '"reelfarm": 0, "frame_rate": 25, "resolution": "640x360",',
                FILM_JSON)
    film = load_film(write_spec(text, "film.json"))
    assert (film.fps, film.resolution) == (Fraction(25), (640, 360))


# --- files and errors -------------------------------------------------------------------------
def test_missing_spec_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert only_issue(path) == f"{path}: spec file not found"


def test_load_spec_tells_films_from_campaigns(write_spec):
    assert isinstance(load_spec(write_spec(FILM)), Film)


def test_spec_error_pickles_with_its_issues(write_spec):
    err = spec_error(write_spec(edit("characters: [flame, moth]", "characters: [flame, mothh]")))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is SpecError
    assert back.issues == err.issues and str(back) == str(err)
    assert isinstance(back.issues[0], Issue) and back.issues[0].line == 16


def test_issue_without_a_line_or_path():
    assert str(Issue("f.yaml", None, "", "boom")) == "f.yaml: boom"
    assert str(Issue("f.yaml", 3, "a.b", "boom")) == "f.yaml:3 a.b: boom"
    assert textwrap.dedent(FILM).count("\n") == 21


def test_a_diffusers_model_folder_that_is_not_there(write_spec, tmp_path):
    gone = tmp_path / "models" / "wan-tiny"
    path = write_spec(with_model(f"  backend: diffusers\n  family: wan\n  id: {gone}\n"))
    assert only_issue(path) == f"{path}:6 model.id: wan model folder not found: {gone}"
    gone.mkdir(parents=True)
    load_film(path)  # a folder that exists passes; what is in it is the worker's to check
    hub = write_spec(with_model("  backend: diffusers\n  family: wan\n  id: Wan-AI/Wan2.1-I2V-14B-480P-Diffusers\n"))
    load_film(hub)  # a hub id is not looked up by the driver


def test_a_transition_shorter_than_one_frame(write_spec):
    path = write_spec(edit("frames: 30\n", "frames: 30\n        transition: {crossfade: 0.01}\n"))
    assert only_issue(path) == (
        f"{path}:15 scenes[0].shots[1].transition: crossfade of 0.01 s is shorter than one frame at 24 fps"
    )


def test_a_shot_shorter_than_its_transitions_in_and_out(write_spec):
    text = edit("frames: 30\n", "frames: 30\n        transition: {crossfade: 1.0}\n")  # 24 frames in
    text = edit("frames: 24\n", "frames: 24\n        transition: {fade_black: 0.5}\n", text)  # 12 out
    path = write_spec(text)
    assert only_issue(path) == (
        f"{path}:15 scenes[0].shots[1].transition: shot 's01_020' (30 frames) is shorter than its "
        "transitions in (24 frames) and out to 's02_010' (12 frames) together"
    )
    load_film(write_spec(edit("crossfade: 1.0", "crossfade: 0.75", text)))  # 18 + 12 frames fit in 30


def test_max_sequence_length_is_refused_where_the_family_ignores_it():
    from pydantic import ValidationError

    from reelfarm.schemas.film import DiffusersModel

    assert DiffusersModel(backend="diffusers", family="ltx", id="x", max_sequence_length=128).max_sequence_length == 128
    for family in ("wan", "cogvideox", "svd"):
        with pytest.raises(ValidationError, match="read by the ltx family only"):
            DiffusersModel(backend="diffusers", family=family, id="x", max_sequence_length=300)
        DiffusersModel(backend="diffusers", family=family, id="x")  # the default stays accepted
