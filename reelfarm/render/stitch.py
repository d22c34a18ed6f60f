"""Stitching: chunks become shots (blended seams), shots become scene cuts and the film cut.

Work goes shot by shot: a shot's chunks are read from the store, blended and piped into one
ffmpeg process that writes the shot clip and any per-format pieces, so at most two chunks
and one overlap are in memory at once. Joins then work on those files: by stream copy when
every piece shares one encoder profile and every join is a cut, else by one re-encode that
normalises frame rate, time base, pixel format and SAR first. Every piece is probed before
a join and every result after it; ffmpeg's exit code alone is never trusted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol

import fsspec
import numpy as np

from reelfarm.errors import PlanError, StitchError, StoreError
from reelfarm.render import ffmpeg as ff
from reelfarm.render.ffmpeg import FORMATS, AudioInput, Join, MediaProbe
from reelfarm.schemas.plan import ChunkPlan, RenderPlan, ShotPlan

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)


class ChunkReader(Protocol):
    """What stitching needs of a chunk store (the cluster's ``ChunkStore`` is one)."""

    storage_options: dict[str, Any]

    def is_complete(self, key: str, *, verify: bool = False) -> bool: ...

    def read_frames(self, key: str) -> np.ndarray: ...

__all__ = [
    "ChunkReader",
    "JoinResult",
    "Piece",
    "StitchResult",
    "blend_chunks",
    "check_probe",
    "encode_shot",
    "film_joins",
    "iter_blended",
    "join_pieces",
    "seam_score",
    "stitch_film",
]

# Below half a grey level a difference is invisible; added to both sides of the seam ratio
# so static shots score 1.0 instead of dividing by zero.
SEAM_EPS = 0.5
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def _timeout(frames: int, width: int, height: int) -> float:
    """A generous ffmpeg budget: a minute plus ~50 ms per 640x360-equivalent frame."""
    return 60.0 + 0.05 * frames * max(1.0, width * height / (640 * 360))


def _safe_id(value: str, what: str) -> str:
    """Ids become file names under OUT: the same rule as the spec's ``Slug``, checked again."""
    if not isinstance(value, str) or not _SLUG.match(value) or ".." in value:
        raise PlanError(f"`{what}` {value!r} is not a safe id for a file name")
    return value


# --- seams -------------------------------------------------------------------------------------
def _check_layout(shot: ShotPlan) -> list[ChunkPlan]:
    """Chunks in order, checked against the layout stitching relies on.

    Chunk ``k`` renders film frames starting at ``frame_start``; ``[frame_start, frame_end)``
    are the frames it contributes. Chunk ``k+1`` starts ``overlap`` frames before chunk ``k``
    ends (``frame_start[k+1] == frame_end[k] - overlap[k+1]``): those frames are rendered twice
    and blended. The first chunk's overlap is ignored (it has no predecessor).
    """
    chunks = sorted(shot.chunks, key=lambda c: c.index)
    if not chunks:
        raise PlanError(f"shot `{shot.shot_id}` has no chunks")
    if chunks[0].frame_start != 0:
        raise PlanError(f"chunk `{chunks[0].name}`: `frame_start` must be 0, "
                        f"got {chunks[0].frame_start}")
    for prev, cur in zip(chunks, chunks[1:]):
        if cur.frame_start != prev.frame_end - cur.overlap or cur.overlap < 0:
            raise PlanError(
                f"chunk `{cur.name}`: `frame_start` must be {prev.frame_end - cur.overlap} "
                f"(previous end {prev.frame_end} less overlap {cur.overlap}), "
                f"got {cur.frame_start}")
        head = prev.overlap if prev.index != chunks[0].index else 0
        if cur.frame_start - prev.frame_start < max(1, head):
            raise PlanError(f"chunk `{cur.name}` overlaps more than one earlier chunk")
    for c in chunks:
        if (c.frame_end <= c.frame_start or c.num_frames < c.frame_end - c.frame_start
                or c.frame_end - c.frame_start < c.overlap):
            raise PlanError(f"chunk `{c.name}`: bad range [{c.frame_start}, {c.frame_end}) "
                            f"for `num_frames` {c.num_frames}")
    if chunks[-1].frame_end != shot.frames:
        raise PlanError(f"shot `{shot.shot_id}`: chunks end at {chunks[-1].frame_end}, "
                        f"the shot has {shot.frames} frames")
    return chunks


def _used(shot: ShotPlan, chunk: ChunkPlan, frames: Any) -> np.ndarray:
    """The frames a chunk contributes; anything malformed is a corrupt chunk (StoreError)."""
    need = chunk.frame_end - chunk.frame_start
    ok = (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
          and frames.shape[1:] == (shot.height, shot.width, 3) and frames.shape[0] >= need)
    if not ok:
        shape = getattr(frames, "shape", type(frames).__name__)
        raise StoreError(f"chunk `{chunk.key}` ({chunk.name}) holds {shape}, stitching needs at "
                         f"least {need} x {shot.height} x {shot.width} x 3 uint8", keys=(chunk.key,))
    return frames[:need]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def _motion(frames: np.ndarray) -> tuple[float, int]:
    """Sum of frame-to-frame mean absolute differences, and how many pairs."""
    total = sum(_mad(frames[i], frames[i + 1]) for i in range(len(frames) - 1))
    return total, max(len(frames) - 1, 0)


def seam_score(across: float, within: float) -> float:
    """How visible a seam is: the step across it over the usual step inside the chunks.

    ``(across + SEAM_EPS) / (within + SEAM_EPS)``, both mean absolute differences in grey
    levels (0..255). 1.0 means the seam moves like the footage around it; a static shot with
    a hard jump of 10 levels scores 21.
    """
    return (across + SEAM_EPS) / (within + SEAM_EPS)


def iter_blended(
    shot: ShotPlan,
    chunk_frames: Iterable[np.ndarray],
    seams: list[float],
) -> Iterator[np.ndarray]:
    """Blend a shot's chunks as they arrive and yield its frames in blocks, in order.

    Overlaps are blended in pixels with a linear crossfade: the ``i``-th of ``O`` shared
    frames is ``(1 - w) * previous + w * next`` with ``w = (i + 1) / (O + 1)``. Blending in
    latent space would need the VAE (a backend's job) and is out of scope here.

    A seam score is appended to ``seams`` per chunk boundary. The boundary is the overlap's
    midpoint ``m = frame_start[k+1] + overlap // 2`` (with no overlap, the first frame of
    chunk ``k+1``); the score compares the blended frames ``m - 1`` and ``m`` with the mean
    frame-to-frame difference inside the two chunks' raw frames (see :func:`seam_score`).

    Args:
        shot: the shot's plan.
        chunk_frames: each chunk's frames, in chunk order (``T x H x W x 3`` uint8).
        seams: list to append seam scores to.

    Raises:
        PlanError: the chunk ranges do not tile the shot.
        StoreError: a chunk's frames are missing or have the wrong shape.
    """
    chunks = _check_layout(shot)
    it = iter(chunk_frames)
    prev: np.ndarray | None = None
    prev_motion = (0.0, 0)
    for chunk in chunks:
        raw = next(it, None)
        if raw is None:
            raise StoreError(f"chunk `{chunk.key}` ({chunk.name}) was not provided", keys=(chunk.key,))
        used = _used(shot, chunk, raw)
        motion = _motion(used)
        if prev is None:
            cur = used
        else:
            o = chunk.overlap
            keep = len(prev) - o
            yield prev[:keep]
            cur = used
            if o:
                w = (np.arange(1, o + 1, dtype=np.float32) / (o + 1))[:, None, None, None]
                mixed = prev[keep:].astype(np.float32) * (1 - w) + used[:o].astype(np.float32) * w
                cur = used.copy()
                cur[:o] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
            m = o // 2  # index of the boundary frame within `cur`
            before = cur[m - 1] if m >= 1 else prev[keep - 1]
            within = (prev_motion[0] + motion[0]) / max(prev_motion[1] + motion[1], 1)
            seams.append(seam_score(_mad(before, cur[m]), within))
        prev, prev_motion = cur, motion
    if next(it, None) is not None:
        raise PlanError(f"shot `{shot.shot_id}` was given more chunks than its plan has")
    assert prev is not None
    yield prev


def blend_chunks(shot: ShotPlan, frames: list[np.ndarray]) -> tuple[np.ndarray, list[float]]:
    """Blend a shot's chunks into exactly ``shot.frames`` frames.

    Args:
        shot: the shot's plan (chunk ranges and overlaps).
        frames: each chunk's rendered frames, in chunk order.

    Returns:
        ``(frames, seam_scores)``: ``shot.frames x H x W x 3`` uint8, and one score per
        chunk boundary (see :func:`iter_blended`).
    """
    seams: list[float] = []
    out = np.concatenate(list(iter_blended(shot, frames, seams)), axis=0)
    if len(out) != shot.frames:  # _check_layout makes this impossible; keep the promise loud
        raise PlanError(f"shot `{shot.shot_id}` blended to {len(out)} frames, "
                        f"planned {shot.frames}")
    return out, seams


# --- pieces and joins ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """A file to join and the frames it must hold."""

    path: str
    frames: int


@dataclass(frozen=True)
class JoinResult:
    """How a join was made and what it produced."""

    method: str  # "copy" (concat demuxer, no re-encode) | "reencode" (filter graph)
    probe: MediaProbe
    argv: list[str]


def check_probe(
    pr: MediaProbe,
    *,
    fmt: str,
    frames: int,
    fps: Fraction,
    width: int,
    height: int,
    audio: bool = False,
) -> None:
    """Raise StitchError unless a file holds exactly what was asked.

    Checks codec, pixel format, size, frame rate, frame count (packets counted), video
    duration within half a frame, and, when ``audio``, an audio track within one frame of
    the picture.
    """
    p = FORMATS[fmt]
    frame_s = float(1 / Fraction(fps))
    want = float(frames / Fraction(fps))
    problems = []
    if pr.codec != p.codec:
        problems.append(f"codec {pr.codec}, expected {p.codec}")
    if pr.pix_fmt != p.pix_fmt:
        problems.append(f"pixel format {pr.pix_fmt}, expected {p.pix_fmt}")
    if (pr.width, pr.height) != (width, height):
        problems.append(f"size {pr.width}x{pr.height}, expected {width}x{height}")
    if pr.fps != Fraction(fps):
        problems.append(f"frame rate {pr.fps}, expected {Fraction(fps)}")
    if pr.frames != frames:
        problems.append(f"{pr.frames} frames, expected {frames}")
    if abs(pr.duration - want) > frame_s / 2:
        problems.append(f"video lasts {pr.duration:.4f} s, expected {want:.4f} s")
    if audio:
        if pr.audio is None:
            problems.append("no audio track")
        elif abs(pr.audio.duration - want) > frame_s:
            problems.append(f"audio lasts {pr.audio.duration:.4f} s, picture {want:.4f} s")
    if problems:
        raise StitchError(f"`{os.path.basename(pr.path)}` is wrong: " + "; ".join(problems))


def _same_profile(probes: Sequence[MediaProbe]) -> bool:
    """True when every piece has the parameters a stream-copy join needs to be identical."""
    keys = {(p.codec, p.profile, p.width, p.height, p.pix_fmt, p.fps, p.time_base, p.sar)
            for p in probes}
    return len(keys) == 1


def join_pieces(
    pieces: Sequence[Piece],
    joins: Sequence[Join],
    output: str,
    *,
    fmt: str,
    fps: Fraction,
    width: int,
    height: int,
    crf: int,
    audio: AudioInput | None = None,
    metadata: dict[str, str] | None = None,
    allow_copy: bool = True,
) -> JoinResult:
    """Join pieces of format ``fmt`` into ``output``; check every piece first, the result after.

    Stream copy is used when ``allow_copy``, every join is a cut and every piece shares one
    encoder profile; otherwise one re-encode with normalised inputs.

    Raises:
        StitchError: a piece or the result is not what was asked, or ffmpeg failed.
    """
    if not pieces:
        raise StitchError("nothing to join")
    # Absolute paths only: ffmpeg reads "name:..." as a protocol, and the concat list needs them.
    pieces = [Piece(os.path.abspath(p.path), p.frames) for p in pieces]
    output = os.path.abspath(output)
    if output in {p.path for p in pieces}:
        raise StitchError(f"join output `{output}` is one of its own pieces")
    probes = []
    for piece in pieces:
        pr = ff.probe(piece.path)
        check_probe(pr, fmt=fmt, frames=piece.frames, fps=fps, width=width, height=height)
        probes.append(pr)
    total = ff.join_length([p.frames for p in pieces], joins)
    timeout = _timeout(total, width, height)
    if allow_copy and all(j.kind == "cut" for j in joins) and _same_profile(probes):
        method = "copy"
        list_file = output + ".ffconcat"
        with open(list_file, "w", encoding="utf-8") as fh:
            fh.write(ff.concat_list_text([p.path for p in pieces]))
        argv = ff.concat_copy_args(list_file, output, fmt=fmt, frames=total, fps=fps,
                                   audio=audio, metadata=metadata)
    else:
        method = "reencode"
        argv = ff.join_args([(p.path, p.frames) for p in pieces], joins, output, fmt=fmt,
                            input_fmt=fmt, fps=fps, crf=crf, audio=audio, metadata=metadata)
    ff.run_ffmpeg(argv, timeout=timeout)
    result = ff.probe(output)
    try:
        check_probe(result, fmt=fmt, frames=total, fps=fps, width=width, height=height,
                    audio=audio is not None)
    except StitchError as err:
        raise StitchError(err.message, argv) from None
    return JoinResult(method=method, probe=result, argv=argv)


def film_joins(shots: Sequence[ShotPlan]) -> list[Join]:
    """The joins between consecutive shots: each shot's own transition (the first's is unused)."""
    return [Join(s.transition.kind, 0 if s.transition.kind == "cut" else s.transition_frames)
            for s in shots[1:]]


def _check_transitions(shots: Sequence[ShotPlan]) -> None:
    """Each shot must be long enough for the transitions into and out of it."""
    for i, s in enumerate(shots):
        t_in = s.transition_frames if i and s.transition.kind != "cut" else 0
        t_out = 0
        if i + 1 < len(shots) and shots[i + 1].transition.kind != "cut":
            t_out = shots[i + 1].transition_frames
        if i and s.transition.kind != "cut" and s.transition_frames <= 0:
            raise PlanError(f"shot `{s.shot_id}`: a {s.transition.kind} needs "
                            "`transition_frames` > 0")
        if t_in + t_out > s.frames:
            raise PlanError(f"shot `{s.shot_id}` has {s.frames} frames, fewer than its "
                            f"transitions overlap ({t_in} in + {t_out} out)")


# --- one shot --------------------------------------------------------------------------------
def _read_chunk(store: ChunkReader, chunk: ChunkPlan) -> np.ndarray:
    try:
        return store.read_frames(chunk.key)
    except StoreError:
        raise
    except Exception as exc:  # an fsspec or decode error: still a chunk problem, named
        raise StoreError(f"chunk `{chunk.key}` ({chunk.name}) cannot be read: "
                         f"{type(exc).__name__}: {exc}", keys=(chunk.key,)) from None


def encode_shot(
    shot: ShotPlan,
    chunk_frames: Iterable[np.ndarray],
    outputs: Sequence[tuple[str, str]],
    *,
    crf: int,
    metadata: dict[str, str] | None = None,
    on_frame: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[list[float], list[str]]:
    """Blend a shot's chunks and encode it to each ``(path, format)`` in one ffmpeg run.

    Args:
        shot: the shot's plan.
        chunk_frames: the chunks' frames in order (a generator keeps one chunk in memory).
        outputs: files to write and their formats.
        crf: quality for x264/VP9.
        metadata: ``-metadata`` values (user text is fine here: one argv item each).
        on_frame: called with ``(index, frame)`` for the shot's middle frame (thumbnails).

    Returns:
        ``(seam_scores, argv)``. Every output is probed and checked before returning.
    """
    seams: list[float] = []
    middle = shot.frames // 2

    def blocks() -> Iterator[np.ndarray]:
        at = 0
        for block in iter_blended(shot, chunk_frames, seams):
            if on_frame is not None and at <= middle < at + len(block):
                on_frame(middle, block[middle - at])
            at += len(block)
            yield block

    argv = ff.encode_frames_args(outputs, width=shot.width, height=shot.height, fps=shot.fps,
                                 frames=shot.frames, crf=crf, metadata=metadata)
    ff.run_ffmpeg(argv, timeout=_timeout(shot.frames, shot.width, shot.height), frames=blocks())
    for path, fmt in outputs:
        try:
            check_probe(ff.probe(path), fmt=fmt, frames=shot.frames, fps=shot.fps,
                        width=shot.width, height=shot.height)
        except StitchError as err:
            raise StitchError(f"shot `{shot.shot_id}`: {err.message}", argv) from None
    return seams, argv


# --- audio -------------------------------------------------------------------------------------
_AUDIO_MAGIC: list[tuple[Callable[[bytes], bool], str]] = [
    (lambda h: h[:4] == b"RIFF" and h[8:12] == b"WAVE", "wav"),
    (lambda h: h[:4] == b"fLaC", "flac"),
    (lambda h: h[:4] == b"OggS", "ogg"),
    (lambda h: h[4:8] == b"ftyp", "mov"),
    (lambda h: h[:4] == b"\x1a\x45\xdf\xa3", "matroska"),
    (lambda h: h[:3] == b"ID3" or (h[0] == 0xFF and h[1] & 0xE6 == 0xE2), "mp3"),
    (lambda h: h[0] == 0xFF and h[1] & 0xF6 == 0xF0, "aac"),
]


def _stage_audio(url: str, workdir: str, storage_options: dict | None = None) -> tuple[str, str]:
    """Copy the soundtrack into the work folder and name its demuxer from its magic bytes.

    The demuxer is then forced with ``-f``, so a playlist or concat script posing as audio
    is refused instead of being followed.
    """
    local = os.path.join(workdir, "audio", "soundtrack")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except Exception as exc:
        raise StitchError(f"cannot read `audio` {url!r}: {type(exc).__name__}: {exc}") from None
    with open(local, "rb") as fh:
        head = fh.read(16).ljust(16, b"\0")
    fmt = next((name for test, name in _AUDIO_MAGIC if test(head)), None)
    if fmt is None:
        raise StitchError(f"`audio` {url!r} is not wav, flac, ogg, mp3, aac, mp4/m4a or mkv/webm")
    import av

    try:
        with av.open(local, format=fmt) as c:
            if not c.streams.audio:
                raise StitchError(f"`audio` {url!r} has no audio stream")
    except StitchError:
        raise
    except Exception as exc:
        raise StitchError(f"`audio` {url!r} cannot be read as {fmt}: {exc}") from None
    return local, fmt


# --- the film ----------------------------------------------------------------------------------
@dataclass
class StitchResult:
    """What stitching wrote.

    Attributes:
        out_url: the output root.
        outputs: relative path under OUT -> full URL, for every file written.
        seam_scores: shot id -> one score per chunk boundary (see :func:`seam_score`).
        join_methods: relative path -> "encode" (shot clips, from frames), "copy" (stream
            copy, no re-encode) or "reencode" (normalised filter-graph join).
        probes: relative path -> probe of every video written.
        commands: relative path -> the ffmpeg argv that wrote it.
        frames: the film cut's frame count (== ``plan.frames``).
        duration_s: the film cut's duration.
    """

    out_url: str
    outputs: dict[str, str] = field(default_factory=dict)
    seam_scores: dict[str, list[float]] = field(default_factory=dict)
    join_methods: dict[str, str] = field(default_factory=dict)
    probes: dict[str, MediaProbe] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)
    frames: int = 0
    duration_s: float = 0.0


def _rel_ok(rel: str) -> str:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel or ":" in rel:
        raise StitchError(f"output path `{rel}` would leave OUT")
    return rel


def _scenes(plan: RenderPlan) -> list[tuple[str, list[ShotPlan]]]:
    order: dict[str, list[ShotPlan]] = {}
    for s in plan.shots:
        order.setdefault(s.scene_id, []).append(s)
    return list(order.items())


def stitch_film(
    plan: RenderPlan,
    store: ChunkReader,
    out_url: str,
    *,
    formats: tuple[str, ...] = ("mp4",),
    manifest: pa.Table | None = None,
    workdir: str | None = None,
    crf: int = 18,
    storage_options: dict | None = None,
) -> StitchResult:
    """Stitch a rendered plan into every deliverable under ``out_url``.

    Writes ``shots/<shot>.mp4``, ``scenes/<scene>.mp4``, ``final.mp4`` / ``final.mov``
    (prores) / ``final.webm``, ``timeline.otio``, ``contact_sheet.png`` and ``report.html``.
    Everything is encoded in a local folder first, then uploaded with fsspec. Chunks are
    only read, never deleted.

    Args:
        plan: the film's plan.
        store: the chunk store holding every chunk's committed frames.
        out_url: output root, any fsspec URL.
        formats: final cut formats, from ``mp4``, ``prores``, ``webm``.
        manifest: the run's manifest (for the report's actual GPU-seconds, retries, workers).
        workdir: a local folder for the intermediate files (kept); default a temp folder.
        crf: x264/VP9 quality, the film's ``output.crf`` (ProRes ignores it).
        storage_options: fsspec options for ``out_url`` and the audio (default: the store's).

    Raises:
        StoreError: a chunk is missing or corrupt (the message names its key).
        StitchError: ffmpeg failed or wrote something other than what was asked.
        PlanError: the plan is inconsistent (chunk ranges, transitions, frame totals).
    """
    from reelfarm.render import review, timeline

    if storage_options is None:
        storage_options = dict(getattr(store, "storage_options", None) or {})
    # 1. Check inputs before any work: ids, formats, frame totals, transitions, chunks present.
    formats = tuple(formats)
    for fmt in formats:
        if fmt not in FORMATS:
            raise StitchError(f"unknown `format` {fmt!r} (known: {', '.join(FORMATS)})")
    if not formats or len(set(formats)) != len(formats):
        raise StitchError(f"`formats` must name each format once, got {list(formats)}")
    shots = list(plan.shots)
    if not shots:
        raise PlanError("the plan has no shots")
    for s in shots:
        _safe_id(s.shot_id, "shot_id")
        _safe_id(s.scene_id, "scene_id")
        if (s.width, s.height, Fraction(s.fps)) != (plan.width, plan.height, Fraction(plan.fps)):
            raise PlanError(f"shot `{s.shot_id}` is {s.width}x{s.height}@{s.fps}, the film "
                            f"{plan.width}x{plan.height}@{plan.fps}")
        _check_layout(s)
    if len({s.shot_id for s in shots}) != len(shots):
        raise PlanError("shot ids must be unique")
    if shots[0].transition_frames:
        raise PlanError(f"shot `{shots[0].shot_id}` opens the film, so its "
                        f"{shots[0].transition.kind} has nothing to overlap: "
                        f"`transition_frames` must be 0, got {shots[0].transition_frames}")
    _check_transitions(shots)
    joins = film_joins(shots)
    total = ff.join_length([s.frames for s in shots], joins)
    if total != plan.frames:
        raise PlanError(f"`frames` is {plan.frames}, but the shots less their transitions "
                        f"make {total}")
    missing = [c.key for s in shots for c in s.chunks if not store.is_complete(c.key, verify=False)]
    if missing:
        shown = ", ".join(f"`{k}`" for k in missing[:20])
        raise StoreError(f"{len(missing)} chunk(s) missing from the store: {shown}", keys=missing)

    if not 0 <= crf <= 51:
        raise StitchError(f"`crf` must be 0..51, got {crf}")
    fps = Fraction(plan.fps)
    result = StitchResult(out_url=out_url, frames=plan.frames, duration_s=plan.duration_s)
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="reelfarm-stitch-")
    work = os.path.abspath(workdir or tmp.name)  # type: ignore[union-attr]
    try:
        for sub in ("shots", "scenes", *(f"pieces/{f}" for f in formats if f != "mp4")):
            os.makedirs(os.path.join(work, sub), exist_ok=True)
        audio_src = _stage_audio(plan.audio, work, storage_options) if plan.audio else None

        # 2. Shots, one at a time: blend, encode the clip (+ pieces for other formats).
        thumbs: list[tuple[str, np.ndarray]] = []
        pieces: dict[str, list[Piece]] = {f: [] for f in ("mp4", *formats)}
        for s in shots:
            rel = f"shots/{s.shot_id}.mp4"
            outs = [(os.path.join(work, rel), "mp4")]
            outs += [(os.path.join(work, "pieces", f, s.shot_id + FORMATS[f].ext), f)
                     for f in formats if f != "mp4"]
            chunk_iter = (_read_chunk(store, c) for c in sorted(s.chunks, key=lambda c: c.index))
            meta = {"title": f"{plan.title} - {s.shot_id}", "comment": s.prompt}
            seams, argv = encode_shot(
                s, chunk_iter, outs, crf=crf, metadata=meta,
                on_frame=lambda _i, fr, sid=s.shot_id: thumbs.append((sid, review.thumbnail(fr))))
            result.seam_scores[s.shot_id] = seams
            result.join_methods[rel] = "encode"
            result.commands[rel] = argv
            for path, f in outs:
                pieces[f].append(Piece(path, s.frames))
            logger.info("stitched shot %s: %d frames, seams %s", s.shot_id, s.frames, seams)

        # 3. Scene cuts (MP4), with the transitions inside each scene only.
        starts, at = {}, 0
        for s, j in zip(shots, [Join("cut")] + joins):
            at -= j.frames
            starts[s.shot_id] = at
            at += s.frames
        shot_piece = {s.shot_id: p for s, p in zip(shots, pieces["mp4"])}
        for scene_id, scene_shots in _scenes(plan):
            rel = f"scenes/{scene_id}.mp4"
            audio = (AudioInput(*audio_src, start_frame=starts[scene_shots[0].shot_id])
                     if audio_src else None)
            jr = join_pieces([shot_piece[s.shot_id] for s in scene_shots], film_joins(scene_shots),
                             os.path.join(work, rel), fmt="mp4", fps=fps, width=plan.width,
                             height=plan.height, crf=crf, audio=audio,
                             metadata={"title": f"{plan.title} - {scene_id}"})
            result.join_methods[rel], result.probes[rel], result.commands[rel] = (
                jr.method, jr.probe, jr.argv)

        # 4. The film cut, once per format, from that format's pieces.
        for fmt in formats:
            rel = "final" + FORMATS[fmt].ext
            audio = AudioInput(*audio_src) if audio_src else None
            jr = join_pieces(pieces[fmt], joins, os.path.join(work, rel), fmt=fmt, fps=fps,
                             width=plan.width, height=plan.height, crf=crf, audio=audio,
                             metadata={"title": plan.title, "comment": f"reelfarm plan {plan.key}"})
            result.join_methods[rel], result.probes[rel], result.commands[rel] = (
                jr.method, jr.probe, jr.argv)
        for s, piece in zip(shots, pieces["mp4"]):
            result.probes[f"shots/{s.shot_id}.mp4"] = ff.probe(piece.path)

        # 5. Timeline, contact sheet, report.
        timeline.write_timeline(
            timeline.build_timeline(plan, seam_scores=result.seam_scores),
            os.path.join(work, "timeline.otio"))
        review.write_contact_sheet(thumbs, os.path.join(work, "contact_sheet.png"))
        html = review.render_report(plan, manifest=manifest, seam_scores=result.seam_scores,
                                    join_methods=result.join_methods, probes=result.probes)
        with open(os.path.join(work, "report.html"), "w", encoding="utf-8") as fh:
            fh.write(html)

        # 6. Upload: relative paths built from checked ids and fixed names only.
        rels = [*(f"shots/{s.shot_id}.mp4" for s in shots),
                *(f"scenes/{sc}.mp4" for sc, _ in _scenes(plan)),
                *("final" + FORMATS[f].ext for f in formats),
                "timeline.otio", "contact_sheet.png", "report.html"]
        fs, root = fsspec.core.url_to_fs(out_url, **storage_options)
        root = root.rstrip("/")
        for rel in rels:
            target = f"{root}/{_rel_ok(rel)}"
            parent = target.rsplit("/", 1)[0]
            if parent:
                fs.makedirs(parent, exist_ok=True)
            fs.put_file(os.path.join(work, rel), target)
            result.outputs[rel] = out_url.rstrip("/") + "/" + rel
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def stitch_shots(plan: RenderPlan, store: ChunkReader, out_url: str, shot_ids: Iterable[str], *,
                 crf: int = 18, storage_options: dict | None = None) -> dict[str, str]:
    """Encode only some shots' clips (``shots/<shot>.mp4``), e.g. the good shots of a run
    in which another shot failed, so editors get what rendered. Returns path -> URL."""
    if storage_options is None:
        storage_options = dict(getattr(store, "storage_options", None) or {})
    wanted = set(shot_ids)
    fs, root = fsspec.core.url_to_fs(out_url, **storage_options)
    root = root.rstrip("/")
    outputs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="reelfarm-shots-") as work:
        for shot in plan.shots:
            if shot.shot_id not in wanted:
                continue
            rel = _rel_ok(f"shots/{_safe_id(shot.shot_id, 'shot_id')}.mp4")
            local = os.path.join(work, f"{shot.shot_id}.mp4")
            chunks = _check_layout(shot)
            encode_shot(shot, (_read_chunk(store, c) for c in chunks), [(local, "mp4")], crf=crf)
            fs.makedirs(f"{root}/shots", exist_ok=True)
            fs.put_file(local, f"{root}/{rel}")
            outputs[rel] = out_url.rstrip("/") + "/" + rel
    return outputs
