"""ffmpeg argv builders (exact), running, failure reporting and probing."""

from __future__ import annotations

import os
import stat
from fractions import Fraction

import numpy as np
import pytest

from reelfarm.errors import StitchError
from reelfarm.render import ffmpeg as ff

G = ["ffmpeg", "-hide_banner", "-nostdin", "-y", "-xerror", "-loglevel", "error"]
COLOUR = ["-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
          "-color_range", "tv"]


def frames(n: int, w: int = 64, h: int = 36) -> np.ndarray:
    t = np.arange(n)[:, None, None, None]
    x = np.arange(w)[None, None, :, None]
    return np.broadcast_to(((x * 4 + t * 9) % 256).astype(np.uint8), (n, h, w, 3)).copy()


# --- binaries ---------------------------------------------------------------------------------
def test_ffmpeg_binary_falls_back_to_the_wheel(monkeypatch):
    monkeypatch.setenv("PATH", "")
    path = ff.ffmpeg_binary()
    assert os.path.isfile(path) and os.access(path, os.X_OK)
    assert ff.ffprobe_binary() is None


def test_ffmpeg_binary_prefers_path(monkeypatch, tmp_path):
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "ffprobe").write_text("#!/bin/sh\n")
    (tmp_path / "ffprobe").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ff.ffmpeg_binary() == str(fake)
    assert ff.ffprobe_binary() == str(tmp_path / "ffprobe")


# --- builders: exact argv ------------------------------------------------------------------------
def test_encode_frames_args_exact():
    argv = ff.encode_frames_args([("/w/a.mp4", "mp4"), ("/w/a.mov", "prores")], width=64,
                                 height=36, fps=Fraction(24000, 1001), frames=10, crf=20,
                                 metadata={"title": "T"})
    assert argv == [
        *G, "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x36", "-framerate", "24000/1001",
        "-protocol_whitelist", "pipe", "-i", "pipe:0",
        "-map", "0:v:0", "-frames:v", "10",
        "-vf", "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p,setsar=1",
        "-c:v", "libx264", "-preset", "medium", "-crf", "20", "-pix_fmt", "yuv420p",
        "-video_track_timescale", "24000", "-movflags", "+faststart", *COLOUR,
        "-metadata", "title=T", "-f", "mp4", "/w/a.mp4",
        "-map", "0:v:0", "-frames:v", "10",
        "-vf", "scale=out_color_matrix=bt709:out_range=tv,format=yuv422p10le,setsar=1",
        "-c:v", "prores_ks", "-profile:v", "3", "-vendor", "apl0", "-pix_fmt", "yuv422p10le",
        "-video_track_timescale", "24000", *COLOUR,
        "-metadata", "title=T", "-f", "mov", "/w/a.mov",
    ]


def test_webm_codec_args_exact():
    assert ff.video_codec_args("webm", fps=Fraction(24), crf=30) == [
        "-c:v", "libvpx-vp9", "-crf", "30", "-b:v", "0", "-pix_fmt", "yuv420p",
        "-deadline", "good", "-cpu-used", "4", "-row-mt", "1", *COLOUR]
    assert ff.audio_codec_args("webm") == [
        "-c:a", "libopus", "-b:a", "160k", "-ar", "48000", "-ac", "2"]
    assert ff.audio_codec_args("prores") == ["-c:a", "pcm_s24le", "-ar", "48000", "-ac", "2"]


def test_concat_copy_args_exact():
    audio = ff.AudioInput("/w/audio/soundtrack", "wav", start_frame=24)
    argv = ff.concat_copy_args("/w/list.ffconcat", "/w/final.mp4", fmt="mp4", frames=12,
                               fps=Fraction(24), audio=audio, metadata={"title": "Film"})
    assert argv == [
        *G, "-f", "concat", "-safe", "0", "-protocol_whitelist", "file", "-i", "/w/list.ffconcat",
        "-f", "wav", "-protocol_whitelist", "file", "-i", "/w/audio/soundtrack",
        "-map", "0:v:0", "-map", "1:a:0",
        "-af", "atrim=start=1.000000:end=1.500000,asetpts=PTS-STARTPTS,"
               "apad=whole_dur=0.500000,atrim=end=0.500000",
        "-c:a", "aac", "-b:a", "192k", "-ar", "48000", "-ac", "2",
        "-c:v", "copy", "-movflags", "+faststart", "-metadata", "title=Film",
        "-f", "mp4", "/w/final.mp4",
    ]
    assert ff.concat_copy_args("/w/l", "/w/f.webm", fmt="webm", frames=1, fps=Fraction(24)) == [
        *G, "-f", "concat", "-safe", "0", "-protocol_whitelist", "file", "-i", "/w/l",
        "-map", "0:v:0", "-c:v", "copy", "-f", "webm", "/w/f.webm"]


def test_join_args_exact():
    argv = ff.join_args(
        [("/w/a.mp4", 10), ("/w/b.mp4", 12), ("/w/c.mp4", 8), ("/w/d.mp4", 9)],
        [ff.Join("crossfade", 4), ff.Join("cut"), ff.Join("fade_black", 3)],
        "/w/final.mp4", fmt="mp4", input_fmt="mp4", fps=Fraction(24), crf=18)

    def norm(i: int, s: int) -> str:
        return (f"[{i}:v]setpts=PTS-STARTPTS[s{s}];[s{s}]fps=fps=24/1[s{s + 1}];"
                f"[s{s + 1}]settb=1/24[s{s + 2}];[s{s + 2}]format=yuv420p[s{s + 3}];"
                f"[s{s + 3}]setsar=1[s{s + 4}]")

    graph = ";".join([
        norm(0, 0), norm(1, 5),
        "[s4][s9]xfade=duration=0.166667:offset=0.250000:transition=fade[s10]",
        norm(2, 11),
        "[s10][s15]concat=a=0:n=2:v=1[s16]", "[s16]settb=1/24[s17]",
        norm(3, 18),
        # 10 + 12 - 4 + 8 = 26 frames so far; the fade starts 3 frames before their end
        "[s17][s22]xfade=duration=0.125000:offset=0.958333:transition=fadeblack[s23]",
    ])
    inputs = []
    for name in "abcd":
        inputs += ["-f", "mp4", "-protocol_whitelist", "file", "-i", f"/w/{name}.mp4"]
    assert argv == [
        *G, *inputs, "-filter_complex", graph, "-map", "[s23]",
        "-c:v", "libx264", "-preset", "medium", "-crf", "18", "-pix_fmt", "yuv420p",
        "-video_track_timescale", "10008", "-movflags", "+faststart", *COLOUR,
        "-f", "mp4", "/w/final.mp4",
    ]
    assert ff.join_length([10, 12, 8, 9], [ff.Join("crossfade", 4), ff.Join("cut"),
                                            ff.Join("fade_black", 3)]) == 32


def test_join_args_refuse_bad_joins():
    with pytest.raises(StitchError, match="need 1 joins"):
        ff.join_args([("/a", 5), ("/b", 5)], [], "/o.mp4", fmt="mp4", input_fmt="mp4",
                     fps=Fraction(24), crf=18)
    with pytest.raises(StitchError, match="bad join"):
        ff.join_args([("/a", 5), ("/b", 5)], [ff.Join("crossfade", 6)], "/o.mp4", fmt="mp4",
                     input_fmt="mp4", fps=Fraction(24), crf=18)
    with pytest.raises(StitchError, match="unknown output format"):
        ff.video_codec_args("avi", fps=Fraction(24), crf=18)


def test_metadata_is_one_argv_item_without_control_characters():
    hostile = "-i /etc/passwd\nmovie=/etc/passwd;\x00[x]"
    assert ff.metadata_args({"title": hostile}) == [
        "-metadata", "title=-i /etc/passwd movie=/etc/passwd; [x]"]
    with pytest.raises(StitchError, match="metadata key"):
        ff.metadata_args({"title=x -i": "y"})


def test_concat_list_quotes_and_refuses_relative_paths():
    text = ff.concat_list_text(["/w/a.mp4", "/w/it's.mp4"])
    assert text == "ffconcat version 1.0\nfile '/w/a.mp4'\nfile '/w/it'\\''s.mp4'\n"
    with pytest.raises(StitchError, match="absolute"):
        ff.concat_list_text(["../etc/passwd"])
    with pytest.raises(StitchError, match="one line"):
        ff.concat_list_text(["/w/a.mp4\nfile '/etc/passwd'"])


def test_timescale_gives_whole_ticks_per_frame():
    for fps in (Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(24000, 1001)):
        ts = ff.timescale_for(fps)
        assert ts >= 10000 and (ts / fps).denominator == 1


# --- running and probing -----------------------------------------------------------------
@pytest.mark.ffmpeg
@pytest.mark.parametrize(("fmt", "codec", "pix_fmt"), [
    ("mp4", "h264", "yuv420p"), ("prores", "prores", "yuv422p10le"), ("webm", "vp9", "yuv420p")])
def test_encode_and_probe_each_format(tmp_path, fmt, codec, pix_fmt):
    path = str(tmp_path / ("clip" + ff.FORMATS[fmt].ext))
    fps = Fraction(24000, 1001)
    ff.run_ffmpeg(ff.encode_frames_args([(path, fmt)], width=64, height=36, fps=fps, frames=11,
                                        crf=18, metadata={"title": "a\nb"}),
                  timeout=60, frames=[frames(5), frames(6)])
    pr = ff.probe(path)
    assert (pr.codec, pr.pix_fmt, pr.width, pr.height, pr.frames) == (codec, pix_fmt, 64, 36, 11)
    assert pr.fps == fps
    assert pr.duration == pytest.approx(11 / fps, abs=0.002)
    assert pr.tool == ("ffprobe" if ff.ffprobe_binary() else "pyav") and pr.audio is None
    assert pr.tags.get("title") == "a b"
    assert pr.sar in (None, Fraction(1))


@pytest.mark.ffmpeg
def test_run_ffmpeg_failure_carries_argv_and_stderr(tmp_path):
    argv = [*G, "-f", "mp4", "-i", str(tmp_path / "missing.mp4"),
            "-f", "mp4", str(tmp_path / "o.mp4")]
    with pytest.raises(StitchError) as info:
        ff.run_ffmpeg(argv, timeout=30)
    err = info.value
    assert err.argv[1:] == argv[1:] and os.path.isabs(err.argv[0])
    assert "missing.mp4" in err.stderr_tail and "No such file" in err.stderr_tail
    assert "argv:" in str(err)


@pytest.mark.ffmpeg
def test_run_ffmpeg_reports_a_closed_pipe(tmp_path):
    # ffmpeg stops reading after 2 frames; 4 MB more cannot fit a pipe buffer: refused, not hung
    argv = ff.encode_frames_args([(str(tmp_path / "a.mp4"), "mp4")], width=64, height=36,
                                 fps=Fraction(24), frames=2, crf=18)
    with pytest.raises(StitchError, match="closed its input"):
        ff.run_ffmpeg(argv, timeout=30, frames=(frames(24) for _ in range(25)))


@pytest.mark.ffmpeg
def test_run_ffmpeg_encoder_error(tmp_path):
    bad = ff.encode_frames_args([(str(tmp_path / "b.mp4"), "mp4")], width=63, height=35,
                                fps=Fraction(24), frames=2, crf=18)
    with pytest.raises(StitchError, match="exited with status") as info:
        ff.run_ffmpeg(bad, timeout=30, frames=[frames(2, 63, 35)])
    assert info.value.stderr_tail


@pytest.mark.ffmpeg
def test_run_ffmpeg_timeout(tmp_path):
    argv = ff.encode_frames_args([(str(tmp_path / "a.mp4"), "mp4")], width=64, height=36,
                                 fps=Fraction(24), frames=1000, crf=18)

    def slow():
        import time

        yield frames(1)
        time.sleep(1.5)
        yield frames(1)

    with pytest.raises(StitchError, match="timeout"):
        ff.run_ffmpeg(argv, timeout=0.5, frames=slow())


@pytest.mark.ffmpeg
def test_probe_refuses_truncated_and_garbage_files(tmp_path):
    path = str(tmp_path / "a.mp4")
    ff.run_ffmpeg(ff.encode_frames_args([(path, "mp4")], width=64, height=36, fps=Fraction(24),
                                        frames=24, crf=18), timeout=60, frames=[frames(24)])
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    try:
        pr = ff.probe(path)
    except StitchError:
        pass
    else:
        assert pr.frames < 24
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(StitchError, match="cannot open"):
        ff.probe(str(tmp_path / "junk.mp4"))


def test_parse_ffprobe_json():
    data = {
        "streams": [
            {"codec_type": "video", "codec_name": "h264", "profile": "High", "width": 64,
             "height": 36, "pix_fmt": "yuv420p", "sample_aspect_ratio": "1:1",
             "r_frame_rate": "24/1", "avg_frame_rate": "24/1", "time_base": "1/12288",
             "duration": "1.000000", "nb_read_packets": "24"},
            {"codec_type": "audio", "codec_name": "aac", "sample_rate": "48000", "channels": 2,
             "duration": "0.998000"},
        ],
        "format": {"format_name": "mov,mp4,m4a,3gp,3g2,mj2", "duration": "1.000000",
                   "tags": {"title": "T"}},
    }
    pr = ff.parse_ffprobe_json("/w/a.mp4", data)
    assert (pr.codec, pr.frames, pr.fps, pr.time_base, pr.sar, pr.tool) == (
        "h264", 24, Fraction(24), Fraction(1, 12288), Fraction(1), "ffprobe")
    assert pr.audio == ff.AudioProbe("aac", 48000, 2, 0.998)
    assert pr.to_dict()["fps"] == "24"
    with pytest.raises(StitchError, match="no video"):
        ff.parse_ffprobe_json("/w/a.wav", {"streams": [data["streams"][1]], "format": {}})
