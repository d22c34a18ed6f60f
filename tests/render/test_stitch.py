"""Seam blending, shot encoding, joins and the whole stitch_film, on tiny clips (64x36, 24 fps)."""

from __future__ import annotations

import os
import uuid
from fractions import Fraction

import av
import fsspec
import helpers_stitch as H
import numpy as np
import pytest

from reelfarm.errors import PlanError, StitchError, StoreError
from reelfarm.render import ffmpeg as ff
from reelfarm.render.seams import blend_chunks, iter_blended, seam_score
from reelfarm.render.stitch import (
    Piece,
    StitchResult,
    encode_shot,
    film_joins,
    join_pieces,
    stitch_film,
)

FPS = Fraction(24)


@pytest.fixture
def out_url():
    name = f"memory://stitch-{uuid.uuid4().hex}"
    yield name
    fs, root = fsspec.core.url_to_fs(name)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def listing(url: str) -> set[str]:
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        return set()
    return {p[len(root.rstrip("/")) + 1:] for p in fs.find(root)}


def decode(path: str) -> np.ndarray:
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def flat(shot, values):
    """Constant-colour chunks: chunk k is filled with values[k]."""
    return [np.full((c.num_frames, shot.height, shot.width, 3), v, np.uint8)
            for c, v in zip(shot.chunks, values, strict=True)]


# --- seams (pure numpy) ------------------------------------------------------------------------
def test_identical_overlaps_reproduce_the_shot_exactly():
    shot = H.make_shot("a", 21, per_chunk=8, overlap=3)
    assert [(c.frame_start, c.frame_end, c.num_frames) for c in shot.chunks] == [
        (0, 8, 8), (5, 13, 8), (10, 18, 8), (15, 21, 8)]  # the last renders 2 extra frames
    out, seams = blend_chunks(shot, H.chunk_arrays(shot))
    assert out.shape == (21, 36, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, H.truth(shot))
    assert len(seams) == 3 and all(s == pytest.approx(1.0, abs=1e-6) for s in seams)


def test_overlap_is_a_linear_crossfade():
    shot = H.make_shot("a", 12, per_chunk=8, overlap=4)  # chunks [0, 8) and [4, 12)
    out, seams = blend_chunks(shot, flat(shot, [100, 160]))
    assert out[:, 0, 0, 0].tolist() == [100] * 4 + [112, 124, 136, 148] + [160] * 4
    # boundary at the overlap's midpoint: frames 5 (124) and 6 (136); static chunks
    assert seams == [pytest.approx(seam_score(12.0, 0.0))] == [pytest.approx(25.0)]


def test_seam_without_overlap_and_static_guard():
    shot = H.make_shot("a", 12, per_chunk=6, overlap=0)
    _, seams = blend_chunks(shot, flat(shot, [100, 160]))
    assert seams == [pytest.approx(121.0)]  # a 60-level jump in a static shot
    _, seams = blend_chunks(shot, flat(shot, [90, 90]))
    assert seams == [1.0]  # nothing moves, nothing jumps: no division by zero


@pytest.mark.parametrize(("overlap", "factor"), [(0, 2.0), (2, 1.1)])
def test_seam_scores_a_bad_chunk_above_a_good_one(overlap, factor):
    # chunk 1 comes out 40 levels brighter: both its seams show, less so when blended
    shot = H.make_shot("a", 20, per_chunk=8, overlap=overlap)
    good = H.chunk_arrays(shot)
    bad = [c.copy() for c in good]
    bad[1] = np.clip(bad[1].astype(int) + 40, 0, 255).astype(np.uint8)
    _, g = blend_chunks(shot, good)
    _, b = blend_chunks(shot, bad)
    assert g == pytest.approx([1.0] * len(g), abs=0.05)
    assert b[0] > factor * g[0] and b[1] > factor * g[1]


def test_blending_streams_one_block_per_chunk():
    shot = H.make_shot("a", 21, per_chunk=8, overlap=3)
    seams: list[float] = []
    blocks = list(iter_blended(shot, iter(H.chunk_arrays(shot)), seams))
    assert [len(b) for b in blocks] == [5, 5, 5, 6]
    assert len(seams) == 3


def test_chunk_problems_are_store_errors_naming_the_key():
    shot = H.make_shot("a", 20, per_chunk=8, overlap=2)
    arrays = H.chunk_arrays(shot)
    with pytest.raises(StoreError, match=shot.chunks[2].key):
        blend_chunks(shot, arrays[:2])
    short = [*arrays[:1], arrays[1][:3], *arrays[2:]]
    with pytest.raises(StoreError, match=shot.chunks[1].key):
        blend_chunks(shot, short)
    wrong_size = [*arrays[:2], np.zeros((8, 36, 60, 3), np.uint8)]
    with pytest.raises(StoreError, match=shot.chunks[2].key):
        blend_chunks(shot, wrong_size)


def test_inconsistent_chunk_ranges_are_plan_errors():
    shot = H.make_shot("a", 20, per_chunk=8, overlap=2)
    moved = shot.chunks[1].model_copy(update={"frame_start": 5})
    bad = shot.model_copy(update={"chunks": (shot.chunks[0], moved, *shot.chunks[2:])})
    with pytest.raises(PlanError, match="frame_start"):
        blend_chunks(bad, H.chunk_arrays(shot))
    with pytest.raises(PlanError, match="chunks end at"):
        blend_chunks(shot.model_copy(update={"frames": 22}), H.chunk_arrays(shot))


# --- pieces and joins ----------------------------------------------------------------------------
def _pieces(tmp_path, plan, fmt="mp4"):
    out = []
    for s in plan.shots:
        path = str(tmp_path / (s.shot_id + ff.FORMATS[fmt].ext))
        encode_shot(s, H.chunk_arrays(s), [(path, fmt)], crf=18)
        out.append(Piece(path, s.frames))
    return out


@pytest.mark.ffmpeg
@pytest.mark.parametrize("allow_copy", [True, False])
def test_truncated_middle_piece_is_caught(tmp_path, allow_copy):
    plan = H.cuts_plan()
    pieces = _pieces(tmp_path, plan)
    size = os.path.getsize(pieces[1].path)
    with open(pieces[1].path, "r+b") as fh:
        fh.truncate(size * 2 // 3)
    with pytest.raises((StitchError, StoreError)) as info:
        join_pieces(pieces, film_joins(plan.shots), str(tmp_path / "final.mp4"), fmt="mp4",
                    fps=FPS, width=H.W, height=H.H, crf=18, allow_copy=allow_copy)
    assert "b.mp4" in str(info.value)
    assert not (tmp_path / "final.mp4").exists()


@pytest.mark.ffmpeg
def test_join_methods_copy_only_when_allowed(tmp_path):
    plan = H.cuts_plan()
    pieces = _pieces(tmp_path, plan)
    joins = film_joins(plan.shots)
    copy = join_pieces(pieces, joins, str(tmp_path / "copy.mp4"), fmt="mp4", fps=FPS, width=H.W,
                       height=H.H, crf=18)
    again = join_pieces(pieces, joins, str(tmp_path / "reencode.mp4"), fmt="mp4", fps=FPS,
                        width=H.W, height=H.H, crf=18, allow_copy=False)
    assert (copy.method, again.method) == ("copy", "reencode")
    assert copy.argv[copy.argv.index("-c:v") + 1] == "copy" and "-filter_complex" not in copy.argv
    assert "-filter_complex" in again.argv
    assert copy.probe.frames == again.probe.frames == 38
    # stream copy re-encodes nothing: the film's pixels are the shot clips' pixels
    np.testing.assert_array_equal(decode(str(tmp_path / "copy.mp4")),
                                  np.concatenate([decode(p.path) for p in pieces]))


# --- the whole film ----------------------------------------------------------------------
@pytest.mark.ffmpeg
def test_stitch_film_transitions_every_format_with_padded_audio(tmp_path, out_url):
    H.write_wav(str(tmp_path / "score.wav"), 1.0)  # shorter than the 41-frame picture
    plan = H.three_shot_plan(audio=str(tmp_path / "score.wav"))
    store = H.FakeStore()
    H.fill(store, plan)
    work = tmp_path / "work"
    res = stitch_film(plan, store, out_url, formats=("mp4", "prores", "webm"), workdir=str(work))

    assert isinstance(res, StitchResult) and res.frames == plan.frames == 41
    assert listing(out_url) == {
        "shots/a.mp4", "shots/b.mp4", "shots/c.mp4", "scenes/s01.mp4", "scenes/s02.mp4",
        "final.mp4", "final.mov", "final.webm", "timeline.otio", "contact_sheet.png",
        "report.html", "deliverables.json"}
    assert res.outputs["final.mp4"] == out_url + "/final.mp4"
    assert res.join_methods == {
        "shots/a.mp4": "encode", "shots/b.mp4": "encode", "shots/c.mp4": "encode",
        "scenes/s01.mp4": "reencode", "scenes/s02.mp4": "copy",
        "final.mp4": "reencode", "final.mov": "reencode", "final.webm": "reencode"}
    assert set(res.seam_scores) == {"a", "b", "c"} and len(res.seam_scores["a"]) == 2

    frame = 1 / 24
    for rel, codec, pix_fmt in [("final.mp4", "h264", "yuv420p"),
                                ("final.mov", "prores", "yuv422p10le"),
                                ("final.webm", "vp9", "yuv420p")]:
        pr = ff.probe(str(work / rel))  # probe the file again, independently of the result
        assert (pr.codec, pr.pix_fmt, pr.frames, pr.fps) == (codec, pix_fmt, 41, FPS), rel
        assert pr.duration == pytest.approx(41 / 24, abs=frame / 2), rel
        assert pr.audio is not None and abs(pr.audio.duration - 41 / 24) <= frame, rel
    assert res.probes["scenes/s01.mp4"].frames == 20 + 16 - 4
    assert res.probes["scenes/s02.mp4"].frames == 12
    assert abs(res.probes["scenes/s02.mp4"].audio.duration - 0.5) <= frame
    for s in plan.shots:
        assert res.probes[f"shots/{s.shot_id}.mp4"].frames == s.frames

    # Pixels: the crossfade mixes a and b; the fade through black dips to black mid-way.
    film = decode(str(work / "final.mp4")).astype(float)
    a = decode(str(work / "shots/a.mp4")).astype(float)
    b = decode(str(work / "shots/b.mp4")).astype(float)
    assert np.abs(film[:16] - a[:16]).mean() < 2  # a second generation, nothing more
    mid = 16 + 2  # crossfade over film frames 16..19
    assert np.abs(film[mid] - (a[18] + b[2]) / 2).mean() < np.abs(film[mid] - a[18]).mean()
    c_start = 20 + 16 - 4 - 3  # fade_black over film frames 29..31
    assert film[c_start + 1].mean() < 0.5 * film[c_start - 2].mean()


@pytest.mark.ffmpeg
def test_stitch_film_cuts_take_the_stream_copy_path(out_url):
    audio_url = f"memory://audio-{uuid.uuid4().hex}/long.wav"
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:  # 5 s: longer than the picture, so it is trimmed
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(np.zeros(5 * 44100 * 2, "<i2").tobytes())
    with fsspec.open(audio_url, "wb") as fh:
        fh.write(buf.getvalue())
    plan = H.cuts_plan(audio=audio_url)
    store = H.FakeStore()
    H.fill(store, plan)
    res = stitch_film(plan, store, out_url, formats=("mp4", "prores", "webm"))
    assert {k: v for k, v in res.join_methods.items() if not k.startswith("shots/")} == {
        "scenes/s01.mp4": "copy", "scenes/s02.mp4": "copy",
        "final.mp4": "copy", "final.mov": "copy", "final.webm": "copy"}
    for rel in ("final.mp4", "final.mov", "final.webm"):
        argv = res.commands[rel]
        assert argv[argv.index("-c:v") + 1] == "copy" and "-filter_complex" not in argv
        pr = res.probes[rel]
        assert pr.frames == 38 and abs(pr.audio.duration - 38 / 24) <= 1 / 24
    assert res.probes["final.mp4"].audio.sample_rate == 48000
    fsspec.filesystem("memory").rm(audio_url.split("://")[1].rsplit("/", 1)[0], recursive=True)


@pytest.mark.ffmpeg
def test_missing_chunk_names_its_key_and_writes_nothing(out_url):
    plan = H.three_shot_plan()
    store = H.FakeStore()
    H.fill(store, plan)
    gone = plan.shots[1].chunks[1].key
    del store.frames[gone]
    with pytest.raises(StoreError, match=gone):
        stitch_film(plan, store, out_url)
    assert listing(out_url) == set() and store.reads == []  # refused before any work


@pytest.mark.ffmpeg
def test_real_chunk_store_read_only_and_corruption_caught(tmp_path, out_url):
    from reelfarm.cluster.store import ChunkStore

    plan = H.cuts_plan()
    store = ChunkStore(str(tmp_path / "farm"))
    H.fill(store, plan)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "farm").rglob("*"))
    res = stitch_film(plan, store, out_url)
    assert res.probes["final.mp4"].frames == 38
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "farm").rglob("*")) == before
    assert all(store.is_complete(c.key, verify=True) for c in plan.chunks)

    victim = plan.shots[2].chunks[0].key
    frames_file = next((tmp_path / "farm" / "chunks" / victim).rglob("frames.mkv"))
    data = bytearray(frames_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    frames_file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=victim):
        stitch_film(plan, store, out_url + "-2")


@pytest.mark.ffmpeg
def test_hostile_title_and_prompt_stay_metadata(tmp_path, out_url):
    title = "-i /etc/passwd\nmovie=/etc/passwd [out]; -y"
    shots = [H.make_shot("a", 10, prompt="movie=/etc/passwd\n-f lavfi -i amovie=/etc/shadow"),
             H.make_shot("b", 10)]
    plan = H.make_plan(shots, title=title)
    store = H.FakeStore()
    H.fill(store, plan)
    res = stitch_film(plan, store, out_url, workdir=str(tmp_path / "w"))
    expected_inputs = {"shots/a.mp4": 1, "shots/b.mp4": 1, "scenes/s01.mp4": 1, "final.mp4": 1}
    for rel, argv in res.commands.items():
        assert argv.count("-i") == expected_inputs[rel], rel
        for item in argv:
            if "passwd" in item or "shadow" in item:
                assert item.startswith(("title=", "comment=")) and "\n" not in item, (rel, item)
        if "-filter_complex" in argv:
            assert "passwd" not in argv[argv.index("-filter_complex") + 1]
    assert listing(out_url) == {"shots/a.mp4", "shots/b.mp4", "scenes/s01.mp4", "final.mp4",
                                "timeline.otio", "contact_sheet.png", "report.html",
                                "deliverables.json"}
    assert res.probes["final.mp4"].tags["title"] == "-i /etc/passwd movie=/etc/passwd [out]; -y"
    html = fsspec.open(out_url + "/report.html", "r").open().read()
    assert "/etc/passwd" in html and "<script" not in html


def test_unsafe_ids_and_bad_totals_are_refused_before_any_work(tmp_path, out_url):
    store = H.FakeStore()
    evil = H.make_plan([H.make_shot("a", 10).model_copy(update={"shot_id": "../../etc/x"})])
    with pytest.raises(PlanError, match="shot_id"):
        stitch_film(evil, store, out_url)
    evil = H.make_plan([H.make_shot("a", 10).model_copy(update={"scene_id": "s/../x"})])
    with pytest.raises(PlanError, match="scene_id"):
        stitch_film(evil, store, out_url)
    plan = H.cuts_plan()
    with pytest.raises(PlanError, match="`frames` is 40"):
        stitch_film(plan.model_copy(update={"frames": 40}), store, out_url)
    with pytest.raises(StitchError, match="unknown `format`"):
        stitch_film(plan, store, out_url, formats=("avi",))
    assert listing(out_url) == set() and store.reads == []


@pytest.mark.ffmpeg
def test_audio_that_is_not_audio_is_refused(tmp_path, out_url):
    fake = tmp_path / "score.wav"
    fake.write_text(f"ffconcat version 1.0\nfile '{tmp_path}/../../etc/passwd'\n")
    plan = H.cuts_plan(audio=str(fake))
    store = H.FakeStore()
    H.fill(store, plan)
    with pytest.raises(StitchError, match="is not wav"):
        stitch_film(plan, store, out_url)


@pytest.mark.ffmpeg
def test_ntsc_rate_transitions_are_frame_exact(out_url):
    fps = Fraction(24000, 1001)
    shots = [H.make_shot("a", 14, fps=fps),
             H.make_shot("b", 13, fps=fps, transition=H.Transition(kind="crossfade", seconds=0.2),
                         transition_frames=5),
             H.make_shot("c", 11, fps=fps, transition=H.Transition(kind="fade_black", seconds=0.1),
                         transition_frames=2),
             H.make_shot("d", 9, fps=fps)]
    plan = H.make_plan(shots)
    store = H.FakeStore()
    H.fill(store, plan)
    res = stitch_film(plan, store, out_url)
    pr = res.probes["final.mp4"]
    assert plan.frames == 14 + 13 + 11 + 9 - 5 - 2
    assert (pr.frames, pr.fps, res.join_methods["final.mp4"]) == (plan.frames, fps, "reencode")
    assert pr.duration == pytest.approx(plan.frames / fps, abs=0.5 / fps)


@pytest.mark.ffmpeg
def test_formats_without_mp4_still_write_mp4_shots_and_scenes(out_url):
    plan = H.cuts_plan()
    store = H.FakeStore()
    H.fill(store, plan)
    res = stitch_film(plan, store, out_url, formats=("webm",), crf=30,
                      manifest=H.manifest_for(plan, rows_extra=[{"attempts": 2}]))
    shot_argv = res.commands["shots/a.mp4"]
    assert shot_argv.count("-crf") == 2 and shot_argv[shot_argv.index("-crf") + 1] == "30"
    files = listing(out_url)
    assert "final.webm" in files and "final.mp4" not in files
    assert {"shots/a.mp4", "scenes/s01.mp4", "scenes/s02.mp4"} <= files
    assert res.probes["final.webm"].codec == "vp9" and res.join_methods["final.webm"] == "copy"
    html = fsspec.open(out_url + "/report.html", "r").open().read()
    assert "gpu-0" in html and "final.webm" in html


@pytest.mark.ffmpeg
def test_output_review_flags_are_honoured(out_url, tmp_path):
    plan = H.cuts_plan()
    store = H.FakeStore()
    H.fill(store, plan)
    res = stitch_film(plan, store, out_url, contact_sheet=False, report=False)
    files = listing(out_url)
    assert "timeline.otio" in files and "final.mp4" in files
    assert "contact_sheet.png" not in files and "report.html" not in files
    assert "report.html" not in res.outputs
    # A local OUT: every deliverable is published by rename, no temporary file is left.
    local = tmp_path / "out"
    stitch_film(plan, store, str(local))
    names = {p.name for p in local.rglob("*")}
    assert {"final.mp4", "contact_sheet.png", "report.html"} <= names
    assert not [n for n in names if n.endswith(".tmp")]


def _mtimes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.ffmpeg
def test_a_rerun_encodes_only_what_changed(tmp_path):
    out = tmp_path / "out"
    store = H.FakeStore()
    plan = H.three_shot_plan()
    H.fill(store, plan)
    first = stitch_film(plan, store, str(out))
    assert not first.up_to_date and first.join_methods["shots/c.mp4"] == "encode"
    before = _mtimes(out)

    # Nothing changed: nothing is read, encoded or written.
    store.reads.clear()
    again = stitch_film(plan, store, str(out))
    assert again.up_to_date and not store.reads and not again.join_methods
    assert _mtimes(out) == before
    assert again.seam_scores == first.seam_scores

    # Shot c edited (new chunk keys): its clip, its scene and the film cut are made again.
    a, b, c = plan.shots
    edited = c.model_copy(update={"chunks": tuple(
        ch.model_copy(update={"key": H.key_for("c-edited", ch.index)}) for ch in c.chunks)})
    plan2 = H.make_plan([a, b, edited])
    H.fill(store, plan2)
    store.reads.clear()
    res = stitch_film(plan2, store, str(out))
    assert res.join_methods["shots/c.mp4"] == "encode"
    assert res.join_methods["shots/a.mp4"] == res.join_methods["shots/b.mp4"] == "kept"
    assert set(store.reads) == {ch.key for ch in edited.chunks}  # no other chunk decoded
    after = _mtimes(out)
    changed = {rel for rel in after if after[rel] != before.get(rel)}
    assert {"shots/c.mp4", "scenes/s02.mp4", "final.mp4", "deliverables.json"} <= changed
    assert not changed & {"shots/a.mp4", "shots/b.mp4", "scenes/s01.mp4"}
    assert res.probes["final.mp4"].frames == plan2.frames
