"""The soundtrack: copied into the stitch work folder and identified by its bytes.

The demuxer is named from magic bytes and then forced with ``-f``, so a playlist or concat
script posing as audio is refused instead of being followed. How a cut slices the audio is
ffmpeg argv (:func:`reelfarm.render.ffmpeg.audio_filter`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import fsspec

from reelfarm.errors import StitchError

__all__ = ["stage_audio"]

_AUDIO_MAGIC: list[tuple[Callable[[bytes], bool], str]] = [
    (lambda h: h[:4] == b"RIFF" and h[8:12] == b"WAVE", "wav"),
    (lambda h: h[:4] == b"fLaC", "flac"),
    (lambda h: h[:4] == b"OggS", "ogg"),
    (lambda h: h[4:8] == b"ftyp", "mov"),
    (lambda h: h[:4] == b"\x1a\x45\xdf\xa3", "matroska"),
    (lambda h: h[:3] == b"ID3" or (h[0] == 0xFF and h[1] & 0xE6 == 0xE2), "mp3"),
    (lambda h: h[0] == 0xFF and h[1] & 0xF6 == 0xF0, "aac"),
]


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
