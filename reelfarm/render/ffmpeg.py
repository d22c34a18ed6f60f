"""ffmpeg for stitching: find the binary, build argv lists as data, run them, probe what they wrote.

Every builder here is a pure function returning a ``list[str]`` that starts with the literal
``"ffmpeg"``; :func:`run_ffmpeg` swaps in the real binary. Nothing ever goes through a shell,
user text only ever reaches ffmpeg as the value half of a ``-metadata key=value`` item, and
no filter string contains user text (so ``movie=``/``drawtext=textfile=`` cannot be smuggled in).

Probing uses ``ffprobe`` when one is on PATH and PyAV otherwise (the imageio-ffmpeg wheel
ships no ffprobe). Frame counts always come from counting packets, never from a header.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import ffmpeg as ffmpeg_python
import numpy as np

from reelfarm.errors import StitchError

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "AudioInput",
    "AudioProbe",
    "FormatProfile",
    "Join",
    "MediaProbe",
    "audio_codec_args",
    "audio_filter",
    "audio_steps",
    "concat_copy_args",
    "concat_list_text",
    "encode_frames_args",
    "ffmpeg_binary",
    "ffprobe_binary",
    "join_args",
    "join_length",
    "metadata_args",
    "parse_ffprobe_json",
    "probe",
    "run_ffmpeg",
    "timescale_for",
    "video_codec_args",
]

# Options every command starts with: no banner, never read the terminal, overwrite our own
# temp outputs, stop on the first error instead of writing a short file, and keep stderr
# to errors so its tail is the useful part.
GLOBAL_ARGS = ["-hide_banner", "-nostdin", "-y", "-xerror", "-loglevel", "error"]
STDERR_TAIL_LINES = 20
_COLOUR = ["-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
           "-color_range", "tv"]
_META_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class FormatProfile:
    """One deliverable format: its container, codec and the fixed encoder profile."""

    name: str  # "mp4" | "prores" | "webm"
    ext: str  # ".mp4"
    muxer: str  # ffmpeg -f name
    encoder: str  # ffmpeg encoder
    codec: str  # the codec name a probe reports
    pix_fmt: str
    audio_encoder: str


FORMATS: dict[str, FormatProfile] = {
    "mp4": FormatProfile("mp4", ".mp4", "mp4", "libx264", "h264", "yuv420p", "aac"),
    "prores": FormatProfile("prores", ".mov", "mov", "prores_ks", "prores", "yuv422p10le",
                            "pcm_s24le"),
    "webm": FormatProfile("webm", ".webm", "webm", "libvpx-vp9", "vp9", "yuv420p", "libopus"),
}


def _profile(fmt: str) -> FormatProfile:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise StitchError(f"unknown output format `{fmt}` (known: {', '.join(FORMATS)})") from None


def _rate(fps: Fraction) -> str:
    fps = Fraction(fps)
    return f"{fps.numerator}/{fps.denominator}"


def _seconds(frames: int, fps: Fraction) -> str:
    """Frames as seconds with microsecond precision: ffmpeg rounds back to the exact frame."""
    return f"{float(Fraction(frames) / Fraction(fps)):.6f}"


def timescale_for(fps: Fraction) -> int:
    """An MP4/MOV track timescale in which every frame lasts a whole number of ticks (>= 10000)."""
    num = Fraction(fps).numerator
    return num * max(1, math.ceil(10000 / num))


# --- binaries -------------------------------------------------------------------------------
def ffmpeg_binary() -> str:
    """The ffmpeg on PATH, else the static one shipped in the imageio-ffmpeg wheel."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # the wheel raises RuntimeError when its binary is missing
        raise StitchError(f"no ffmpeg on PATH and none in imageio-ffmpeg: {exc}") from None


def ffprobe_binary() -> str | None:
    """The ffprobe on PATH, or None (then :func:`probe` uses PyAV)."""
    return shutil.which("ffprobe")


# --- argv pieces ----------------------------------------------------------------------------
def metadata_args(metadata: dict[str, str] | None) -> list[str]:
    """``-metadata key=value`` pairs; each pair is one argv item, control characters removed."""
    args: list[str] = []
    for key, value in (metadata or {}).items():
        if not _META_KEY.match(key):
            raise StitchError(f"metadata key `{key}` is not a plain lower-case name")
        clean = _CONTROL.sub(" ", str(value)).strip()[:1000]
        args += ["-metadata", f"{key}={clean}"]
    return args


def video_codec_args(fmt: str, *, fps: Fraction, crf: int) -> list[str]:
    """The fixed encoder profile of ``fmt``: identical for every piece, so pieces can be joined.

    ``crf`` is used as given for both x264 and VP9 (both accept 0..51; VP9 goes to 63).
    """
    p = _profile(fmt)
    if fmt == "mp4":
        args = ["-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-pix_fmt", p.pix_fmt,
                "-video_track_timescale", str(timescale_for(fps)), "-movflags", "+faststart"]
    elif fmt == "prores":
        args = ["-c:v", "prores_ks", "-profile:v", "3", "-vendor", "apl0", "-pix_fmt", p.pix_fmt,
                "-video_track_timescale", str(timescale_for(fps))]
    else:
        args = ["-c:v", "libvpx-vp9", "-crf", str(crf), "-b:v", "0", "-pix_fmt", p.pix_fmt,
                "-deadline", "good", "-cpu-used", "4", "-row-mt", "1"]
    return args + _COLOUR


def audio_codec_args(fmt: str) -> list[str]:
    """Audio encoder for ``fmt``: AAC (MP4), 24-bit PCM (ProRes MOV), Opus (WebM); 48 kHz stereo."""
    p = _profile(fmt)
    rate = ["-b:a", "192k"] if fmt == "mp4" else ["-b:a", "160k"] if fmt == "webm" else []
    return ["-c:a", p.audio_encoder, *rate, "-ar", "48000", "-ac", "2"]


@dataclass(frozen=True)
class AudioInput:
    """An audio file already copied into the work folder, and the slice of it a cut uses.

    Attributes:
        path: absolute local path that reelfarm wrote (never a user string).
        fmt: the demuxer name it was probed as (a value of demuxer).
        start_frame: where the cut begins in film frames (a scene cut starts mid-film).
    """

    path: str
    fmt: str
    start_frame: int = 0


def audio_steps(audio: AudioInput, *, frames: int, fps: Fraction) -> list[tuple[str, tuple[str, ...], dict[str, str]]]:
    """The audio filter chain, as data: cut ``[start, start + picture)`` and pad it with
    silence to the picture length. One owner for both argv forms below."""
    start = _seconds(audio.start_frame, fps)
    end = _seconds(audio.start_frame + frames, fps)
    length = _seconds(frames, fps)
    return [("atrim", (), {"start": start, "end": end}), ("asetpts", ("PTS-STARTPTS",), {}),
            ("apad", (), {"whole_dur": length}), ("atrim", (), {"end": length})]


def audio_filter(audio: AudioInput, *, frames: int, fps: Fraction) -> str:
    """:func:`audio_steps` as an ``-af`` filter string."""
    return ",".join(name + "=" + ":".join([*args, *(f"{k}={v}" for k, v in kw.items())])
                    for name, args, kw in audio_steps(audio, frames=frames, fps=fps))


def _audio_input_args(audio: AudioInput) -> list[str]:
    return ["-f", audio.fmt, "-protocol_whitelist", "file", "-i", audio.path]


def encode_frames_args(
    outputs: Sequence[tuple[str, str]],
    *,
    width: int,
    height: int,
    fps: Fraction,
    frames: int,
    crf: int,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Encode ``frames`` raw rgb24 frames read from stdin into one file per ``(path, format)``.

    One decode feeds every output, so a shot's MP4 clip and its ProRes/WebM pieces come from
    the same pixels. The RGB to YUV conversion is BT.709, limited range, tagged as such.
    """
    argv = ["ffmpeg", *GLOBAL_ARGS,
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-framerate", _rate(fps), "-protocol_whitelist", "pipe", "-i", "pipe:0"]
    for path, fmt in outputs:
        p = _profile(fmt)
        argv += ["-map", "0:v:0", "-frames:v", str(frames),
                 "-vf", f"scale=out_color_matrix=bt709:out_range=tv,format={p.pix_fmt},setsar=1",
                 *video_codec_args(fmt, fps=fps, crf=crf), *metadata_args(metadata),
                 "-f", p.muxer, path]
    return argv


def concat_list_text(paths: Sequence[str]) -> str:
    """An ffconcat list of absolute paths reelfarm generated itself (the only use of -safe 0)."""
    lines = ["ffconcat version 1.0"]
    for path in paths:
        if not os.path.isabs(path) or any(c in path for c in "\n\r\0"):
            raise StitchError(f"concat list path `{path!r}` must be absolute and on one line")
        lines.append("file '" + path.replace("'", "'\\''") + "'")
    return "\n".join(lines) + "\n"


def concat_copy_args(
    list_file: str,
    output: str,
    *,
    fmt: str,
    frames: int,
    fps: Fraction,
    audio: AudioInput | None = None,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Join pieces that share one encoder profile by stream copy (concat demuxer, no re-encode).

    The optional audio is the only stream that is encoded.
    """
    p = _profile(fmt)
    argv = ["ffmpeg", *GLOBAL_ARGS,
            "-f", "concat", "-safe", "0", "-protocol_whitelist", "file", "-i", list_file]
    if audio is not None:
        argv += _audio_input_args(audio)
    argv += ["-map", "0:v:0"]
    if audio is not None:
        argv += ["-map", "1:a:0", "-af", audio_filter(audio, frames=frames, fps=fps),
                 *audio_codec_args(fmt)]
    argv += ["-c:v", "copy"]
    if fmt == "mp4":
        argv += ["-movflags", "+faststart"]
    return argv + [*metadata_args(metadata), "-f", p.muxer, output]


@dataclass(frozen=True)
class Join:
    """How piece ``i + 1`` follows piece ``i``: a cut, or an xfade overlapping ``frames``."""

    kind: str  # "cut" | "crossfade" | "fade_black"
    frames: int = 0


_XFADE = {"crossfade": "fade", "fade_black": "fadeblack"}


def join_args(
    inputs: Sequence[tuple[str, int]],
    joins: Sequence[Join],
    output: str,
    *,
    fmt: str,
    input_fmt: str,
    fps: Fraction,
    crf: int,
    audio: AudioInput | None = None,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Re-encode a join: normalise every piece, then concat cuts and xfade transitions.

    Args:
        inputs: ``(path, frames)`` of each piece, in order.
        joins: one per boundary (``len(inputs) - 1``).
        output: the file to write.
        fmt: the output format; ``input_fmt`` is the pieces' format (forced with ``-f``).
        fps: the film frame rate; every piece is normalised to it, with time base ``1/fps``,
            zero-based timestamps, the output pixel format and square pixels.
    """
    if len(joins) != len(inputs) - 1:
        raise StitchError(f"{len(inputs)} pieces need {len(inputs) - 1} joins, got {len(joins)}")
    p = _profile(fmt)
    demuxer = _profile(input_fmt).muxer
    tb = f"{Fraction(fps).denominator}/{Fraction(fps).numerator}"
    streams = []
    for path, _ in inputs:
        src = ffmpeg_python.input(path, f=demuxer, protocol_whitelist="file").video
        streams.append(src.filter("setpts", "PTS-STARTPTS").filter("fps", fps=_rate(fps))
                       .filter("settb", tb).filter("format", p.pix_fmt).filter("setsar", "1"))

    # Consecutive cuts become one concat; each transition is an xfade whose offset is the
    # length so far less the overlap, in exact frames written as seconds.
    video, length = streams[0], inputs[0][1]
    run: list[Any] = []
    for stream, (_, n), join in zip(streams[1:], inputs[1:], joins, strict=True):
        if join.kind == "cut":
            run.append(stream)
            length += n
            continue
        if run:  # concat outputs in microseconds: back to 1/fps so xfade sees one time base
            video = ffmpeg_python.concat(video, *run, v=1, a=0).filter("settb", tb)
            run = []
        if join.kind not in _XFADE or not 0 < join.frames <= min(n, length):
            raise StitchError(f"bad join `{join.kind}` over {join.frames} frames")
        video = ffmpeg_python.filter(
            [video, stream], "xfade", transition=_XFADE[join.kind],
            duration=_seconds(join.frames, fps), offset=_seconds(length - join.frames, fps))
        length += n - join.frames
    if run:
        video = ffmpeg_python.concat(video, *run, v=1, a=0)

    streams_out = [video]
    if audio is not None:
        a = ffmpeg_python.input(audio.path, f=audio.fmt, protocol_whitelist="file").audio
        streams_out.append(_audio_chain(a, audio, length, fps))
    graph = ffmpeg_python.output(*streams_out, output).get_args()[:-1]  # drop the file name
    argv = ["ffmpeg", *GLOBAL_ARGS, *graph, *video_codec_args(fmt, fps=fps, crf=crf)]
    if audio is not None:
        argv += audio_codec_args(fmt)
    return argv + [*metadata_args(metadata), "-f", p.muxer, output]


def _audio_chain(a: Any, audio: AudioInput, frames: int, fps: Fraction) -> Any:
    """:func:`audio_steps` applied to an ffmpeg-python stream."""
    for name, args, kw in audio_steps(audio, frames=frames, fps=fps):
        a = a.filter(name, *args, **kw)
    return a


def join_length(inputs: Sequence[int], joins: Sequence[Join]) -> int:
    """Frames of a join: the pieces' frames less every transition overlap."""
    return sum(inputs) - sum(j.frames for j in joins if j.kind != "cut")


# --- running ---------------------------------------------------------------------------------
def run_ffmpeg(
    argv: Sequence[str],
    *,
    timeout: float,
    frames: Iterable[np.ndarray] | None = None,
) -> str:
    """Run one ffmpeg command; optionally feed raw frames on stdin. Returns stderr.

    Args:
        argv: a builder's list; a leading ``"ffmpeg"`` becomes :func:`ffmpeg_binary`.
        timeout: seconds before the process is killed.
        frames: arrays (``H x W x 3`` or ``T x H x W x 3`` uint8) written to stdin in order.

    Raises:
        StitchError: non-zero exit, a closed pipe, or a timeout; with argv and stderr tail.
    """
    argv = list(argv)
    if argv and argv[0] == "ffmpeg":
        argv[0] = ffmpeg_binary()
    logger.debug("ffmpeg: %s", " ".join(argv))
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if frames is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
    except OSError as exc:
        raise StitchError(f"could not start ffmpeg: {exc}", argv) from None

    # Drain stderr on a thread so a chatty ffmpeg never blocks while we write stdin.
    tail: deque[str] = deque(maxlen=200)
    reader = threading.Thread(target=_drain, args=(proc.stderr, tail), daemon=True)
    reader.start()
    timed_out = threading.Event()

    def _kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, _kill)
    timer.start()
    broken = False
    try:
        if frames is not None:
            assert proc.stdin is not None
            try:
                for block in frames:  # errors making the frames are raised as they are
                    data = np.ascontiguousarray(block, dtype=np.uint8).data
                    try:
                        proc.stdin.write(data)
                    except (BrokenPipeError, ValueError, OSError):
                        broken = True  # ffmpeg exited early; its stderr says why
                        break
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    broken = True
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
    text = "".join(tail)
    stderr_tail = "\n".join(text.splitlines()[-STDERR_TAIL_LINES:])
    if timed_out.is_set():
        raise StitchError(f"ffmpeg ran past its {timeout:.0f} s timeout", argv, stderr_tail)
    if rc != 0:
        raise StitchError(f"ffmpeg exited with status {rc}", argv, stderr_tail)
    if broken:
        raise StitchError("ffmpeg closed its input before every frame was written", argv,
                          stderr_tail)
    return text


def _drain(pipe: Any, tail: deque[str]) -> None:
    for raw in iter(pipe.readline, b""):
        tail.append(raw.decode("utf-8", "replace"))
    pipe.close()


# --- probing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AudioProbe:
    """The first audio stream of a file."""

    codec: str
    sample_rate: int
    channels: int
    duration: float  # seconds, from packet timestamps


@dataclass(frozen=True)
class MediaProbe:
    """What a file really holds (first video stream), measured by counting packets.

    ``duration`` is the video stream's span in seconds (first packet to the end of the last);
    ``container_duration`` is what the container header says.
    """

    path: str
    format_name: str
    codec: str
    width: int
    height: int
    pix_fmt: str
    fps: Fraction
    time_base: Fraction
    sar: Fraction | None
    profile: str | None
    frames: int
    duration: float
    container_duration: float | None
    audio: AudioProbe | None
    tags: dict[str, str]
    tool: str  # "ffprobe" | "pyav"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("fps", "time_base", "sar"):
            d[k] = None if d[k] is None else str(d[k])
        return d


def probe(path: str) -> MediaProbe:
    """Probe a local file with ffprobe when present, else PyAV.

    Raises:
        StitchError: the file cannot be opened or has no video stream.
    """
    tool = ffprobe_binary()
    return _probe_ffprobe(path, tool) if tool else _probe_pyav(path)


def _frac(text: Any) -> Fraction | None:
    if text in (None, "", "0/0", "N/A"):
        return None
    try:
        value = Fraction(str(text).replace(":", "/"))
    except (ValueError, ZeroDivisionError):
        return None
    return value or None


def _probe_ffprobe(path: str, tool: str) -> MediaProbe:
    argv = [tool, "-v", "error", "-count_packets", "-show_streams", "-show_format",
            "-of", "json", path]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise StitchError(f"ffprobe timed out on `{path}`", argv) from None
    if done.returncode != 0:
        raise StitchError(f"ffprobe cannot read `{path}`", argv,
                          done.stderr.decode("utf-8", "replace")[-2000:])
    return parse_ffprobe_json(path, json.loads(done.stdout or b"{}"))


def parse_ffprobe_json(path: str, data: dict[str, Any]) -> MediaProbe:
    """Turn ``ffprobe -count_packets -show_streams -show_format -of json`` into a MediaProbe."""
    streams = data.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    if video is None:
        raise StitchError(f"`{path}` has no video stream")
    fmt = data.get("format", {})
    fps = _frac(video.get("avg_frame_rate")) or _frac(video.get("r_frame_rate")) or Fraction(0)
    frames = int(video.get("nb_read_packets") or 0)
    duration = float(video["duration"]) if video.get("duration") not in (None, "N/A") else (
        float(frames / fps) if fps else 0.0)
    audio = None
    a = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if a is not None:
        audio = AudioProbe(
            codec=a.get("codec_name", ""), sample_rate=int(a.get("sample_rate") or 0),
            channels=int(a.get("channels") or 0),
            duration=float(a.get("duration") or fmt.get("duration") or 0.0))
    return MediaProbe(
        path=path, format_name=fmt.get("format_name", ""), codec=video.get("codec_name", ""),
        width=int(video.get("width") or 0), height=int(video.get("height") or 0),
        pix_fmt=video.get("pix_fmt", ""), fps=fps,
        time_base=_frac(video.get("time_base")) or Fraction(0),
        sar=_frac(video.get("sample_aspect_ratio")), profile=video.get("profile"),
        frames=frames, duration=duration,
        container_duration=float(fmt["duration"]) if fmt.get("duration") else None,
        audio=audio, tags={str(k): str(v) for k, v in (fmt.get("tags") or {}).items()},
        tool="ffprobe",
    )


def _probe_pyav(path: str) -> MediaProbe:
    import av

    try:
        container = av.open(path)
    except Exception as exc:  # av raises many kinds (InvalidDataError, OSError, ...)
        raise StitchError(f"cannot open `{path}`: {exc}") from None
    try:
        if not container.streams.video:
            raise StitchError(f"`{path}` has no video stream")
        vs = container.streams.video[0]
        ast = container.streams.audio[0] if container.streams.audio else None
        wanted = [vs] + ([ast] if ast is not None else [])
        spans: dict[int, list[float]] = {s.index: [math.inf, -math.inf] for s in wanted}
        frames = 0
        try:
            for packet in container.demux(*wanted):
                if packet.size == 0:
                    continue  # the flush packet at the end of each stream
                if packet.stream.index == vs.index:
                    frames += 1
                if packet.pts is not None:
                    span = spans[packet.stream.index]
                    span[0] = min(span[0], packet.pts)
                    span[1] = max(span[1], packet.pts + (packet.duration or 0))
        except Exception as exc:  # a truncated file errors part way through
            raise StitchError(f"cannot read every packet of `{path}`: {exc}") from None

        def seconds(stream: Any) -> float:
            lo, hi = spans[stream.index]
            if hi < lo:
                return 0.0
            return float((hi - max(lo, 0)) * stream.time_base)

        cc = vs.codec_context
        fps = vs.average_rate or vs.guessed_rate or vs.base_rate or Fraction(0)
        audio = None
        if ast is not None:
            ac = ast.codec_context
            audio = AudioProbe(codec=ac.name, sample_rate=ac.sample_rate, channels=ac.channels,
                               duration=seconds(ast))
        return MediaProbe(
            path=path, format_name=container.format.name, codec=cc.name,
            width=cc.width, height=cc.height, pix_fmt=cc.pix_fmt or "",
            fps=Fraction(fps), time_base=Fraction(vs.time_base or 0),
            sar=Fraction(vs.sample_aspect_ratio) if vs.sample_aspect_ratio else None,
            profile=cc.profile, frames=frames, duration=seconds(vs),
            container_duration=container.duration / 1e6 if container.duration else None,
            audio=audio, tags={str(k): str(v) for k, v in container.metadata.items()},
            tool="pyav",
        )
    finally:
        container.close()
