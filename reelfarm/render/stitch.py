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
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from reelfarm.errors import StitchError, StoreError
from reelfarm.render import ffmpeg as ff
from reelfarm.render.audio import stage_audio
from reelfarm.render.ffmpeg import FORMATS, AudioInput, Join, MediaProbe
from reelfarm.render.seams import iter_blended
from reelfarm.render.uptodate import DELIVERABLES_DOC, Freshness, audio_sha256, deliverable_keys
from reelfarm.schemas.plan import ChunkPlan, RenderPlan, ShotPlan, check_plan, ordered_chunks, safe_id
from reelfarm.storage import Location

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

__all__ = [
    "ChunkReader",
    "JoinResult",
    "Piece",
    "StitchResult",
    "check_probe",
    "encode_shot",
    "film_joins",
    "iter_blended",
    "join_pieces",
    "stitch_film",
    "stitch_shots",
]


class ChunkReader(Protocol):
    """What stitching needs of a chunk store (the cluster's ``ChunkStore`` is one)."""

    storage_options: dict[str, Any]

    def is_complete(self, key: str, *, verify: bool = False) -> bool: ...

    def read_frames(self, key: str) -> np.ndarray: ...





def _timeout(frames: int, width: int, height: int) -> float:
    """A generous ffmpeg budget: a minute plus ~50 ms per 640x360-equivalent frame."""
    return 60.0 + 0.05 * frames * max(1.0, width * height / (640 * 360))


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
    up_to_date: bool = False  # nothing was made: every deliverable in OUT was current


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
    contact_sheet: bool = True,
    report: bool = True,
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
        contact_sheet: write ``contact_sheet.png`` (the spec's ``output.contact_sheet``).
        report: write ``report.html`` (the spec's ``output.report``).

    Raises:
        StoreError: a chunk is missing or corrupt (the message names its key).
        StitchError: ffmpeg failed or wrote something other than what was asked.
        PlanError: the plan is inconsistent (chunk ranges, transitions, frame totals).
    """
    from reelfarm.render import deliverables

    if storage_options is None:
        storage_options = dict(getattr(store, "storage_options", None) or {})
    # 1. Check inputs before any work: the plan's invariants, formats, what is up to date.
    formats = _check_formats(formats)
    check_plan(plan)
    if not 0 <= crf <= 51:
        raise StitchError(f"`crf` must be 0..51, got {crf}")
    out = Location(out_url, storage_options=storage_options)
    fresh = freshness(plan, out, formats=formats, crf=crf, contact_sheet=contact_sheet, report=report)
    result = StitchResult(out_url=out_url, frames=plan.frames, duration_s=plan.duration_s)
    encode = _shots_to_encode(plan, fresh, formats) if not fresh.up_to_date else set()
    # Chunks to decode must be there; those not decoded are checksummed instead (cheaper
    # than a decode), so a chunk gone bad is found and rendered again even when every
    # deliverable is current.
    missing = [c.key for s in plan.shots for c in s.chunks
               if not store.is_complete(c.key, verify=s.shot_id not in encode)]
    if missing:
        shown = ", ".join(f"`{k}`" for k in missing[:20])
        raise StoreError(f"{len(missing)} chunk(s) missing or corrupt in the store: {shown}", keys=missing)
    if fresh.up_to_date:  # nothing changed since the last stitch: encode nothing
        result.seam_scores = {s.shot_id: fresh.seams(s.shot_id) or [] for s in plan.shots}
        result.outputs = {rel: out_url.rstrip("/") + "/" + rel for rel in fresh.keys}
        result.up_to_date = True
        return result
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="reelfarm-stitch-")
    work = os.path.abspath(workdir or tmp.name)  # type: ignore[union-attr]
    try:
        for sub in ("shots", "scenes", *(f"pieces/{f}" for f in formats if f != "mp4")):
            os.makedirs(os.path.join(work, sub), exist_ok=True)
        audio_src = stage_audio(plan.audio, work, storage_options) if plan.audio else None
        # 2. Shots, one at a time: blend, encode the clip (+ pieces for other formats);
        #    an unchanged clip is fetched from OUT instead, when a cut needs it.
        pieces, thumbs = _encode_shots(plan, store, work, formats, crf, result, encode=encode,
                                       fresh=fresh, out=out)
        # 3. Scene cuts (MP4) and 4. the film cut, once per format: those whose inputs changed.
        _join_cuts(plan, pieces, work, formats, crf, audio_src, result, stale=fresh.stale)
        # 5. Timeline, contact sheet, report. 6. Publish what was made, each in one step,
        #    then the record of what every file is made from.
        made = [rel for rel in fresh.keys if rel.startswith(("shots/", "scenes/", "final"))
                and rel in fresh.stale]
        if fresh.stale - set(made) or made:
            made += deliverables.write_review(plan, work, thumbs, result, manifest=manifest,
                                              contact_sheet=contact_sheet, report=report,
                                              keyframes=_keyframes(plan, store))
        deliverables.publish(work, made, out_url, storage_options)
        out.write_bytes_atomic(DELIVERABLES_DOC, fresh.document(result.seam_scores))
        result.outputs = {rel: out_url.rstrip("/") + "/" + rel for rel in fresh.keys}
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def freshness(plan: RenderPlan, out: Location, *, formats: Sequence[str], crf: int,
              contact_sheet: bool = True, report: bool = True) -> Freshness:
    """What of OUT's deliverables is up to date for ``plan`` (see :mod:`reelfarm.render.uptodate`)."""
    from reelfarm.render.deliverables import REVIEW_FILES

    review = [r for r in REVIEW_FILES
              if (r != "contact_sheet.png" or contact_sheet) and (r != "report.html" or report)]
    keys = deliverable_keys(plan, formats=formats, crf=crf, review=review,
                            audio=audio_sha256(plan.audio, out.storage_options) if plan.audio else None)
    return Freshness.check(keys, out.read_bytes(DELIVERABLES_DOC),
                           exists=lambda rel: bool(out.fs.exists(out._path(rel))))


def _shots_to_encode(plan: RenderPlan, fresh: Freshness, formats: tuple[str, ...]) -> set[str]:
    """Shots whose clip changed, or every shot when a non-MP4 cut must be made again (its
    pieces are not kept in OUT)."""
    if any("final" + FORMATS[f].ext in fresh.stale for f in formats if f != "mp4"):
        return {s.shot_id for s in plan.shots}
    return {s.shot_id for s in plan.shots if f"shots/{s.shot_id}.mp4" in fresh.stale}


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(formats)
    for fmt in formats:
        if fmt not in FORMATS:
            raise StitchError(f"unknown `format` {fmt!r} (known: {', '.join(FORMATS)})")
    if not formats or len(set(formats)) != len(formats):
        raise StitchError(f"`formats` must name each format once, got {list(formats)}")
    return formats


def _encode_shots(plan: RenderPlan, store: ChunkReader, work: str, formats: tuple[str, ...], crf: int,
                  result: StitchResult, *, encode: set[str], fresh: Freshness, out: Location
                  ) -> tuple[dict[str, list[Piece]], list[tuple[str, np.ndarray]]]:
    """Blend and encode the shots in ``encode`` (and their piece in every other format);
    fetch the other shots' unchanged clips from OUT."""
    from reelfarm.render import review

    thumbs: list[tuple[str, np.ndarray]] = []
    pieces: dict[str, list[Piece]] = {f: [] for f in ("mp4", *formats)}
    for s in plan.shots:
        rel = f"shots/{s.shot_id}.mp4"
        outs = [(os.path.join(work, rel), "mp4")]
        outs += [(os.path.join(work, "pieces", f, s.shot_id + FORMATS[f].ext), f)
                 for f in formats if f != "mp4"]
        if s.shot_id not in encode:
            out.fs.get_file(out._path(rel), outs[0][0])
            result.seam_scores[s.shot_id] = fresh.seams(s.shot_id) or []
            result.join_methods[rel] = "kept"
            pieces["mp4"].append(Piece(outs[0][0], s.frames))
            if "contact_sheet.png" in fresh.stale:
                thumbs.append((s.shot_id, review.thumbnail(_frame_of(outs[0][0], s.frames // 2))))
            continue
        chunk_iter = (_read_chunk(store, c) for c in ordered_chunks(s))
        meta = {"title": f"{plan.title} - {s.shot_id}", "comment": s.prompt}
        seams, argv = encode_shot(
            s, chunk_iter, outs, crf=crf, metadata=meta,
            on_frame=lambda _i, fr, sid=s.shot_id: thumbs.append((sid, review.thumbnail(fr))))
        result.seam_scores[s.shot_id] = seams
        result.join_methods[rel] = "encode"
        result.commands[rel] = argv
        for path, f in outs:
            pieces[f].append(Piece(path, s.frames))
        result.probes[rel] = ff.probe(outs[0][0])
        logger.info("stitched shot %s: %d frames, seams %s", s.shot_id, s.frames, seams)
    return pieces, thumbs


def _frame_of(path: str, index: int) -> np.ndarray:
    """Frame ``index`` of a clip, RGB (the thumbnail of a shot that was not encoded again)."""
    import av

    with av.open(path) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i == index:
                return frame.to_ndarray(format="rgb24")
    raise StitchError(f"`{os.path.basename(path)}` has no frame {index}")


def _join_cuts(plan: RenderPlan, pieces: dict[str, list[Piece]], work: str, formats: tuple[str, ...],
               crf: int, audio_src: tuple[str, str] | None, result: StitchResult, *,
               stale: set[str] | None = None) -> None:
    """Scene cuts (MP4, the transitions inside each scene only) and the film cut per format."""
    shots = list(plan.shots)
    fps = Fraction(plan.fps)
    joins = film_joins(shots)
    starts, at = {}, 0
    for s, j in zip(shots, [Join("cut")] + joins):
        at -= j.frames
        starts[s.shot_id] = at
        at += s.frames
    shot_piece = {s.shot_id: p for s, p in zip(shots, pieces["mp4"])}
    cuts: list[tuple[str, list[Piece], list[Join], str, dict[str, str], int]] = [
        (f"scenes/{scene_id}.mp4", [shot_piece[s.shot_id] for s in scene_shots], film_joins(scene_shots),
         "mp4", {"title": f"{plan.title} - {scene_id}"}, starts[scene_shots[0].shot_id])
        for scene_id, scene_shots in _scenes(plan)]
    cuts += [("final" + FORMATS[fmt].ext, pieces[fmt], joins, fmt,
              {"title": plan.title, "comment": f"reelfarm plan {plan.key}"}, 0) for fmt in formats]
    for rel, cut_pieces, cut_joins, fmt, meta, start in cuts:
        if stale is not None and rel not in stale:
            continue
        audio = AudioInput(*audio_src, start_frame=start) if audio_src else None
        jr = join_pieces(cut_pieces, cut_joins, os.path.join(work, rel), fmt=fmt, fps=fps, width=plan.width,
                         height=plan.height, crf=crf, audio=audio, metadata=meta)
        result.join_methods[rel], result.probes[rel], result.commands[rel] = jr.method, jr.probe, jr.argv


def stitch_shots(plan: RenderPlan, store: ChunkReader, out_url: str, shot_ids: Iterable[str], *,
                 crf: int = 18, storage_options: dict | None = None) -> dict[str, str]:
    """Encode only some shots' clips (``shots/<shot>.mp4``), e.g. the good shots of a run
    in which another shot failed, so editors get what rendered. Returns path -> URL."""
    if storage_options is None:
        storage_options = dict(getattr(store, "storage_options", None) or {})
    wanted = set(shot_ids)
    out = Location(out_url, storage_options=storage_options)
    outputs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="reelfarm-shots-") as work:
        for shot in plan.shots:
            if shot.shot_id not in wanted:
                continue
            rel = f"shots/{safe_id(shot.shot_id, 'shot_id')}.mp4"
            local = os.path.join(work, f"{shot.shot_id}.mp4")
            chunks = ordered_chunks(shot)
            encode_shot(shot, (_read_chunk(store, c) for c in chunks), [(local, "mp4")], crf=crf)
            out.put_file_atomic(local, rel)
            outputs[rel] = out_url.rstrip("/") + "/" + rel
    return outputs


def _keyframes(plan: RenderPlan, store: Any) -> dict[str, np.ndarray]:
    """Shot id -> the keyframe it started from (committed by the keyframe stage), for review."""
    out = {}
    for s in plan.shots:
        if s.keyframe is not None and store.is_complete(s.keyframe.key):
            out[s.shot_id] = store.read_frames(s.keyframe.key)[0]
    return out
