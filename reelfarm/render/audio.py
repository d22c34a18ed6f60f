"""The soundtrack: copied into the stitch work folder and identified by its bytes.

The demuxer is named from magic bytes and then forced with ``-f``, so a playlist or concat
script posing as audio is refused instead of being followed. How a cut slices the audio is
ffmpeg argv (:func:`reelfarm.render.ffmpeg.audio_filter`).
"""

from __future__ import annotations

import os
import shutil

import fsspec

from reelfarm.errors import StitchError
from reelfarm.schemas.loader import audio_format

__all__ = ["stage_audio"]


def stage_audio(url: str, workdir: str, storage_options: dict | None = None) -> tuple[str, str]:
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
        fmt = audio_format(fh.read(16))  # the loader's rule, one owner
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
