"""The OTIO timeline: structure, ranges, transitions, recipe metadata, round trip, otiotool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import helpers_stitch as H
import opentimelineio as otio
import pytest

from reelfarm.render.timeline import build_timeline, write_timeline

OTIOTOOL = os.path.join(os.path.dirname(sys.executable), "otiotool")
SEAMS = {"a": [1.0, 3.5], "b": [0.9, 1.1], "c": [1.2]}


def _written(tmp_path, plan):
    path = str(tmp_path / "timeline.otio")
    write_timeline(build_timeline(plan, seam_scores=SEAMS), path)
    return path


def test_round_trip_keeps_cut_ranges_and_recipe(tmp_path):
    plan = H.three_shot_plan(audio="s3://bucket/score.wav")
    tl = otio.adapters.read_from_file(_written(tmp_path, plan))
    rate = 24.0
    assert tl.name == plan.title
    assert tl.metadata["reelfarm"]["plan_key"] == plan.key
    assert tl.metadata["reelfarm"]["fps"] == "24" and tl.metadata["reelfarm"]["frames"] == 41

    video, audio = tl.tracks
    assert video.kind == otio.schema.TrackKind.Video and audio.kind == otio.schema.TrackKind.Audio
    assert [type(x).__name__ for x in video] == ["Clip", "Transition", "Clip", "Transition", "Clip"]
    assert video.duration() == otio.opentime.RationalTime(41, rate)  # == plan.frames
    assert audio.duration() == otio.opentime.RationalTime(41, rate)
    assert audio[0].media_reference.target_url == "s3://bucket/score.wav"

    clips = list(video.find_clips())
    assert [c.name for c in clips] == ["a", "b", "c"]
    assert [c.media_reference.target_url for c in clips] == [
        "shots/a.mp4", "shots/b.mp4", "shots/c.mp4"]
    # crossfade a->b over 4 frames: 2 + 2 around the cut; fade_black b->c over 3: 1 + 2
    ranges = [(c.source_range.start_time.value, c.source_range.duration.value) for c in clips]
    assert ranges == [(0, 20 - 2), (2, 16 - 2 - 2), (1, 12 - 1)]
    for c, s in zip(clips, plan.shots, strict=True):
        assert c.source_range.start_time.rate == rate
        assert c.media_reference.available_range == otio.opentime.TimeRange(
            otio.opentime.RationalTime(0, rate), otio.opentime.RationalTime(s.frames, rate))

    t1, t2 = video[1], video[3]
    assert t1.transition_type == otio.schema.TransitionTypes.SMPTE_Dissolve
    assert (t1.in_offset.value, t1.out_offset.value, t1.in_offset.rate) == (2, 2, rate)
    assert (t2.in_offset.value, t2.out_offset.value) == (1, 2)
    assert dict(t1.metadata["reelfarm"]) == {"kind": "crossfade", "frames": 4, "xfade": "fade"}
    assert t2.metadata["reelfarm"]["kind"] == "fade_black"

    recipe = clips[1].metadata["reelfarm"]
    shot = plan.shots[1]
    assert recipe["backend"] == "animatic" and recipe["model_id"] is None
    assert "model_revision" in recipe and recipe["seed"] == shot.seed
    assert recipe["prompt"] == shot.prompt
    assert list(recipe["chunk_keys"]) == [c.key for c in shot.chunks]
    assert dict(recipe["identity_hashes"]) == {"flame": "ab" * 32}
    assert dict(recipe["transition"]) == {"kind": "crossfade", "seconds": 4 / 24, "frames": 4}
    assert list(recipe["seam_scores"]) == [0.9, 1.1]

    markers = clips[0].markers
    assert [m.color for m in markers] == [
        otio.schema.MarkerColor.GREEN, otio.schema.MarkerColor.RED]
    assert markers[1].metadata["reelfarm"]["seam_score"] == 3.5


def test_expanded_transitions_use_the_overlapping_frames(tmp_path):
    plan = H.three_shot_plan()
    tl = otio.adapters.read_from_file(_written(tmp_path, plan))
    expanded = otio.algorithms.track_with_expanded_transitions(tl.tracks[0])
    pre, _, post = expanded[1]
    # the crossfade uses a's last 4 frames and b's first 4, as the ffmpeg cut does
    assert (pre.source_range.start_time.value, pre.source_range.duration.value) == (16, 4)
    assert (post.source_range.start_time.value, post.source_range.duration.value) == (0, 4)


def test_cuts_only_and_a_hostile_prompt_round_trip(tmp_path):
    plan = H.make_plan([H.make_shot("a", 10, prompt='"}]\n<x> -i /etc/passwd'),
                        H.make_shot("b", 12)])
    path = _written(tmp_path, plan)
    json.loads(open(path, encoding="utf-8").read())  # valid JSON
    tl = otio.adapters.read_from_file(path)
    assert len(tl.tracks) == 1 and tl.tracks[0].duration().value == 22
    assert not any(isinstance(x, otio.schema.Transition) for x in tl.tracks[0])
    assert tl.find_clips()[0].metadata["reelfarm"]["prompt"] == '"}]\n<x> -i /etc/passwd'


@pytest.mark.skipif(not os.path.exists(OTIOTOOL), reason="otiotool is not installed")
def test_otiotool_reads_it(tmp_path):
    path = _written(tmp_path, H.three_shot_plan())
    done = subprocess.run([OTIOTOOL, "--input", path, "--list-clips", "--stats", "--verify-ranges"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ("a", "b", "c"):
        assert f"CLIP: {name} IN BOUNDS" in done.stdout
    assert "Duration: 00:00:01:17" in done.stdout  # 41 frames at 24 fps


def test_recipe_holds_every_model_field_that_shapes_pixels():
    from reelfarm.render.timeline import shot_recipe
    from reelfarm.schemas.film import DiffusersModel

    model = DiffusersModel(backend="diffusers", family="wan", id="org/wan", guidance_scale=6.5,
                           negative_prompt="blurry", dtype="float16")
    shot = H.make_shot("a", 10).model_copy(update={"model": model})
    recipe = shot_recipe(shot)
    assert (recipe["guidance_scale"], recipe["negative_prompt"], recipe["dtype"]) == (6.5, "blurry", "float16")
    assert recipe["model"]["family"] == "wan" and recipe["model"]["guidance_scale"] == 6.5
