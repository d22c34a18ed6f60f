"""One pass reports every problem: schema errors and reference errors together, with hints."""

from __future__ import annotations

import pytest

from reelfarm.errors import SpecError
from reelfarm.schemas import load_film
from tests.schemas.test_spec_errors import edit


def messages(path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_film(path)
    return [str(i) for i in info.value.issues]


def test_a_misspelt_key_and_an_unknown_character_are_reported_together(write_spec):
    text = edit("title: Moth and flame\n", "title: Moth and flame\nresolutoin: [640, 360]\n")
    text = edit("characters: [flame, moth]", "characters: [flame, mothh]", text)
    path = write_spec(text)
    assert messages(path) == [
        f"{path}:3 resolutoin: unknown key 'resolutoin'; did you mean `resolution`?",
        f"{path}:17 scenes[0].shots[1].characters[1]: unknown character 'mothh' (known: flame, moth); "
        "did you mean 'moth'?",
    ]


def test_a_misspelt_shot_field_suggests_the_field(write_spec):
    path = write_spec(edit("duration: 2", "duraton: 2"))
    assert messages(path) == [
        f"{path}:10 scenes[0].shots[0].duraton: unknown key 'duraton'; did you mean `duration`?"
    ]


def test_a_misspelt_key_inside_the_model_union_suggests_from_that_backend(write_spec):
    path = write_spec(edit("title: Moth and flame\n", "title: Moth and flame\n"
                           "model: {backend: diffusers, family: wan, id: x, guidance_scal: 3}\n"))
    assert messages(path) == [
        f"{path}:3 model.guidance_scal: unknown key 'guidance_scal'; did you mean `guidance_scale`?"
    ]


def test_a_misspelt_choice_suggests_the_choice(write_spec):
    path = write_spec(edit("characters: [moth]\n", "characters: [moth]\n        camera: {move: push_inn}\n"))
    (msg,) = messages(path)
    assert msg.startswith(f"{path}:13 scenes[0].shots[0].camera.move: Input should be ")
    assert msg.endswith(", got 'push_inn'; did you mean 'push_in'?"), msg


def test_no_hint_when_nothing_is_close(write_spec):
    path = write_spec(edit("duration: 2", "duration: 2\n        xyzzy: 1"))
    assert messages(path) == [f"{path}:11 scenes[0].shots[0].xyzzy: unknown key 'xyzzy'"]


def test_schema_errors_and_duplicate_ids_are_reported_together(write_spec):
    text = edit("- id: s02_010", "- id: s01_010")
    text = edit("frames: 30", "frames: -3", text)
    path = write_spec(text)
    assert messages(path) == [
        f"{path}:14 scenes[0].shots[1].frames: Input should be greater than 0, got -3",
        f"{path}:19 scenes[1].shots[0].id: duplicate shot id 's01_010' (first at scenes[0].shots[0])",
    ]


def test_a_broken_characters_block_does_not_flood_unknown_characters(write_spec):
    text = edit("characters:\n  moth: {reference: moth.png}\n  flame: {reference: flame.png}\n",
                "characters: 3\n")
    path = write_spec(text)
    assert messages(path) == [f"{path}:3 characters: Input should be a valid dictionary, got 3"]
