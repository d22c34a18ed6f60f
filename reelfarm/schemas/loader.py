"""Load and validate film and campaign specs from a local path or any fsspec URL.

Every problem is reported before any work starts, as ``file:line path: message``, e.g.
``film.yaml:23 scenes[0].shots[2].characters[1]: unknown character 'mothh' (known: flame, moth)``.
A loaded film has absolute reference URLs and each reference's sha256 filled in, so the
planner can stay pure.

Schema errors and reference errors (unknown characters, duplicate ids) come in one pass,
with the nearest valid name suggested for a misspelt key, choice or character. Sizes are
bounded by the limits in :mod:`reelfarm.schemas.film`. The loader reads references, the
soundtrack and a campaign's base film only from the spec's own folder (and below) and from
the roots the operator allows (``allowed_roots=``, the ``allowed_read_roots`` setting).
A pinned keyframe (``keyframe: {pin: ...}``) is read the same way and must be an opaque
image of the film's size; a keyframe model given as a folder must hold the image-editing
pipeline its family names.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import io
import itertools
import logging
import os
import posixpath
import re
import string
import types
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Callable, Union, get_args, get_origin

import fsspec
from pydantic import BaseModel, ValidationError

from reelfarm.errors import Issue, SpecError
from reelfarm.schemas.campaign import Campaign, CampaignCell
from reelfarm.schemas.film import (
    KEYFRAME_PIPELINES,
    MAX_CHUNKS,
    MAX_REFERENCE_BYTES,
    MAX_SPEC_BYTES,
    SPEC_VERSION,
    Film,
    Keyframe,
    film_chunks,
    size_problems,
)
from reelfarm.schemas.source import Source, parse_document

__all__ = [
    "READ_ROOTS_SETTING",
    "UPGRADES",
    "audio_format",
    "LoadedCampaign",
    "load_campaign",
    "load_film",
    "load_spec",
    "resolve_url",
]

logger = logging.getLogger(__name__)

# Named in every refusal of a read outside the spec's folder: how an operator allows more.
READ_ROOTS_SETTING = "`allowed_read_roots` (REELFARM_ALLOWED_READ_ROOTS)"


# --- spec versions ----------------------------------------------------------------------
def _v0_to_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 0 (the pre-release format) wrote ``frame_rate`` and ``resolution: "WxH"``."""
    raw = dict(raw)
    if "frame_rate" in raw:
        raw["fps"] = raw.pop("frame_rate")
    res = raw.get("resolution")
    if isinstance(res, str) and "x" in res:
        w, _, h = res.partition("x")
        w, h = w.strip(), h.strip()
        if w.isascii() and w.isdigit() and h.isascii() and h.isdigit() and len(w) + len(h) < 20:
            raw["resolution"] = [int(w), int(h)]
    raw["reelfarm"] = 1
    return raw


# Upgrade hook: UPGRADES[n] turns a version-n document into version n+1.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1}


def _upgrade(src: Source) -> dict[str, Any]:
    raw = src.data
    version = raw.get("reelfarm", SPEC_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise SpecError([src.issue(("reelfarm",), f"spec version must be an integer, got {version!r}")])
    if version > SPEC_VERSION:
        raise SpecError([src.issue(("reelfarm",),
                                   f"spec version {version} is newer than this reelfarm "
                                   f"(reads up to {SPEC_VERSION}); upgrade reelfarm")])
    if version < 0:
        raise SpecError([src.issue(("reelfarm",), f"unknown spec version {version}")])
    while version < SPEC_VERSION:
        raw = UPGRADES[version](raw)
        version += 1
    return raw


# --- URLs and files -----------------------------------------------------------------------
def _has_scheme(url: str) -> bool:
    return "://" in url or url.startswith("memory:")


def _base_of(url: str) -> str:
    if _has_scheme(url):
        return url.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(url))


def resolve_url(ref: str, base: str) -> str:
    """``ref`` as an absolute path or URL, relative references taken from ``base``."""
    if _has_scheme(ref) or os.path.isabs(ref):
        return ref
    if _has_scheme(base):
        scheme, _, rest = base.partition("://")
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, ref))}"
    return os.path.normpath(os.path.join(base, ref))


def _read_bytes(url: str, storage_options: dict[str, Any] | None, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``url`` (one more than allowed tells it is too large)."""
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read(limit + 1)


def _read_text(url: str, storage_options: dict[str, Any] | None) -> str:
    try:
        data = _read_bytes(url, storage_options, MAX_SPEC_BYTES)
    except FileNotFoundError:
        raise SpecError([Issue(url, None, "", "spec file not found")]) from None
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad spec location
        raise SpecError([Issue(url, None, "", f"cannot read spec: {e}")]) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError([Issue(url, None, "", f"spec is larger than {MAX_SPEC_BYTES} bytes (MAX_SPEC_BYTES)")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError([Issue(url, None, "", "spec is not UTF-8 text")]) from None


def _local_path(url: str) -> str | None:
    """The local path ``url`` names, or None for a remote URL."""
    for prefix in ("file://", "local://"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return None if _has_scheme(url) else url


def _normal_url(url: str) -> str:
    """A remote URL with ``.`` and ``..`` segments of its path resolved (query kept)."""
    scheme, _, rest = url.partition("://")
    path, sep, query = rest.partition("?")
    path = posixpath.normpath(path) if path else path
    return f"{scheme}://{path}{sep}{query}"


# Soundtracks must be one of these, told by their first bytes (the stitcher forces the same
# demuxer), so a playlist or concat script posing as audio is never followed.
_AUDIO_MAGIC: list[tuple[Callable[[bytes], bool], str]] = [
    (lambda h: h[:4] == b"RIFF" and h[8:12] == b"WAVE", "wav"),
    (lambda h: h[:4] == b"fLaC", "flac"),
    (lambda h: h[:4] == b"OggS", "ogg"),
    (lambda h: h[4:8] == b"ftyp", "mov"),
    (lambda h: h[:4] == b"\x1a\x45\xdf\xa3", "matroska"),
    (lambda h: h[:3] == b"ID3" or (h[0] == 0xFF and h[1] & 0xE6 == 0xE2), "mp3"),
    (lambda h: h[0] == 0xFF and h[1] & 0xF6 == 0xF0, "aac"),
]
_AUDIO_KINDS = "wav, flac, ogg, mp3, aac, mp4/m4a or mkv/webm"


def audio_format(head: bytes) -> str | None:
    """The demuxer for a soundtrack from its first 16 bytes, or None if it is not one we read."""
    head = head[:16].ljust(16, b"\0")
    return next((name for test, name in _AUDIO_MAGIC if test(head)), None)


class _Reader:
    """Where the loader may read (folders and URL prefixes), and what it has read.

    A local place is compared by its real path (symlinks resolved) and matches at a folder
    boundary; a remote one by URL prefix, at a ``/``. Reads are remembered, so campaign
    cells sharing a reference read it once.
    """

    def __init__(self, folders: Iterable[str], allowed_roots: Sequence[str],
                 storage_options: dict[str, Any] | None) -> None:
        self.storage_options = storage_options
        self.places = [p for p in (self._place(f) for f in [*folders, *allowed_roots]) if p]
        self._images: dict[str, tuple[str | None, str | None]] = {}
        self._audio: dict[str, str | None] = {}

    @staticmethod
    def _place(root: str) -> str | None:
        if not isinstance(root, str) or not root.strip():
            return None
        local = _local_path(root.strip())
        if local is not None:
            return os.path.realpath(os.path.abspath(local))
        return _normal_url(root.strip()).rstrip("/")

    def with_folder(self, folder: str) -> _Reader:
        """This reader, also allowed ``folder`` (memories shared)."""
        out = copy.copy(self)
        place = self._place(folder)
        out.places = [*self.places, place] if place else list(self.places)
        return out

    def refusal(self, url: str) -> str | None:
        """None when ``url`` may be read, else how to show it in the refusal."""
        local = _local_path(url)
        if local is not None:
            absolute = os.path.abspath(local)
            real = os.path.realpath(absolute)
            for place in self.places:
                if not _has_scheme(place) and (real == place or real.startswith(place.rstrip(os.sep) + os.sep)):
                    return None
            return url if real == os.path.normpath(absolute) else f"{url} (a link to {real})"
        # fsspec chains URLs with "::" (e.g. "simplecache::s3://..."): never allowed by a prefix.
        target = _normal_url(url)
        if "::" not in url:
            for place in self.places:
                if _has_scheme(place) and (target == place or target.startswith(place + "/")):
                    return None
        return url

    def _open(self, url: str) -> Any:
        local = _local_path(url)
        if local is not None:  # the path checked, not an fsspec URL that could chain
            return open(os.path.realpath(local), "rb")  # noqa: SIM115 - closed by the caller
        return fsspec.open(url, "rb", **(self.storage_options or {}))

    def hash_image(self, url: str) -> tuple[str | None, str | None]:
        """(sha256, None) for a readable image, (None, why) otherwise."""
        if url not in self._images:
            self._images[url] = self._hash_image(url)
        return self._images[url]

    def _hash_image(self, url: str) -> tuple[str | None, str | None]:
        try:
            with self._open(url) as f:
                data = f.read(MAX_REFERENCE_BYTES + 1)
        except FileNotFoundError:
            return None, f"reference image not found: {url}"
        except Exception as e:  # noqa: BLE001 - whatever the store says, the image cannot be read
            return None, f"cannot read reference image {url}: {e}"
        if len(data) > MAX_REFERENCE_BYTES:
            return None, f"reference image is larger than {MAX_REFERENCE_BYTES} bytes (MAX_REFERENCE_BYTES): {url}"
        import warnings

        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
            return None, f"reference is not a readable image: {url} ({e.__class__.__name__})"
        return hashlib.sha256(data).hexdigest(), None

    def probe_audio(self, url: str) -> str | None:
        """None for a soundtrack with an audio stream, else why not."""
        if url not in self._audio:
            self._audio[url] = self._probe_audio(url)
        return self._audio[url]

    def _probe_audio(self, url: str) -> str | None:
        try:
            with self._open(url) as f:
                fmt = audio_format(f.read(16))
                if fmt is None:
                    return f"`audio` {url} is not a sound file ({_AUDIO_KINDS})"
                f.seek(0)
                import av

                with av.open(f, format=fmt) as container:
                    if not container.streams.audio:
                        return f"`audio` {url} has no audio stream"
        except FileNotFoundError:
            return f"audio file not found: {url}"
        except Exception as e:  # noqa: BLE001 - a demuxer or store failure: not a usable soundtrack
            return f"`audio` {url} cannot be read: {e.__class__.__name__}"
        return None


def _outside(shown: str, written: Any) -> str:
    return (f"{shown} is outside the spec's folder and the allowed read roots; allow it with "
            f"{READ_ROOTS_SETTING}, got {written!r}")


# --- pydantic errors -> issues -----------------------------------------------------------
def _hint(name: Any, choices: Iterable[Any], quote: str = "`") -> str:
    """``; did you mean `x`?`` for the valid name nearest ``name``, or nothing."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {quote}{close[0]}{quote}?" if close else ""


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _models_in(tp: Any) -> list[type[BaseModel]]:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    if get_origin(tp) in (Union, types.UnionType):
        return [m for arg in get_args(tp) for m in _models_in(arg)]
    return []


def _step(tp: Any, part: Any) -> Any:
    """The type found at ``part`` (a field, an index, a key or a union tag) inside ``tp``."""
    tp = _unwrap(tp)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        models = _models_in(tp)
        for m in models:  # a discriminated union's tag (model.diffusers.steps)
            tag = m.model_fields.get("backend")
            if tag is not None and part in get_args(tag.annotation):
                return m
        fields = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        return fields[0] if len(fields) == 1 else None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    if origin in (tuple, list) and get_args(tp):
        return get_args(tp)[0]
    if origin is dict and get_args(tp):
        return get_args(tp)[1]
    return None


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at pydantic location ``loc`` (the key that was refused dropped)."""
    tp: Any = model
    for part in loc[:-1]:
        tp = _step(tp, part)
        if tp is None:
            return []
    return sorted({name for m in _models_in(tp) for name in m.model_fields})


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        return f"unknown key {loc[-1]!r}" + _hint(loc[-1], _fields_at(model, tuple(loc)))
    if kind == "missing":
        return f"missing field `{loc[-1]}`"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    got = repr(err.get("input"))
    if len(got) > 60:
        got = got[:57] + "..."
    hint = ""
    ctx = err.get("ctx") or {}
    if kind == "literal_error":
        hint = _hint(err.get("input"), re.findall(r"'([^']*)'", str(ctx.get("expected", ""))), "'")
    elif kind == "union_tag_invalid":
        hint = _hint(ctx.get("tag"), re.findall(r"'([^']*)'", str(ctx.get("expected_tags", ""))), "'")
    return f"{msg}, got {got}{hint}"


def _error_path(data: Any, err: dict[str, Any], msg: str) -> tuple[str | int, ...]:
    """The field path of a pydantic error in ``data`` (the validated input), as written.

    Pydantic locations carry union tags (``model.diffusers``) and ``[key]`` markers that
    are not in the data: drop them. Only a ``missing`` error names a field that is not
    there. A model-level check whose message starts with a field in backticks (e.g.
    "`chunk_frames` must be 4k+1") points at that field when the data has it.
    """
    loc = tuple(err["loc"])
    node, path = data, []
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif i == len(loc) - 1 and err["type"] == "missing":
            node = None
            path.append(part)
    named = re.match(r"`(\w+)`", msg)
    if named and isinstance(node, dict) and named.group(1) in node:
        path.append(named.group(1))
    return tuple(path)


def _validate(model: type[BaseModel], src: Source, data: dict[str, Any], context: str = "") -> Any:
    try:
        # The film's size limits are checked by _check_film, each at its own line.
        return model.model_validate(data, context={"sizes_checked_by_loader": True})
    except ValidationError as e:
        issues = []
        errors: list[dict[str, Any]] = [dict(err) for err in e.errors()]
        locs = [tuple(err["loc"]) for err in errors]
        for err in errors:
            loc = tuple(err["loc"])
            # A list that is "too short" only because its items failed: report the items.
            if any(other != loc and other[: len(loc)] == loc for other in locs):
                continue
            msg = _describe(err, model)
            path = _error_path(data, err, msg)
            issues.append(src.issue(path, f"{context}{msg}"))
        raise SpecError(_sorted(_dedupe(issues))) from None


def _sorted(issues: list[Issue]) -> list[Issue]:
    return sorted(issues, key=lambda i: (i.line or 0, i.path))


# --- film ------------------------------------------------------------------------------
def _deep_merge(base: Any, over: Any) -> Any:
    """Dicts merge key by key; anything else in ``over`` replaces ``base``."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _items(value: Any) -> list[Any]:
    """The items of a list as written, or none: anything else is for the schema to refuse."""
    return value if isinstance(value, list) else []


def _shots(raw: dict[str, Any]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """``(path, shot)`` for every shot written as a mapping, in film order."""
    return [(("scenes", si, "shots", ti), shot)
            for si, scene in enumerate(_items(raw.get("scenes"))) if isinstance(scene, dict)
            for ti, shot in enumerate(_items(scene.get("shots"))) if isinstance(shot, dict)]


def _merge_shot_models(raw: dict[str, Any]) -> dict[str, Any]:
    """A shot's ``model:`` overrides the film's model field by field (same backend)."""
    film_model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    film_model = {"backend": "animatic", **film_model}
    scenes = raw.get("scenes")
    if not isinstance(scenes, list):
        return raw
    raw = dict(raw)
    raw["scenes"] = new_scenes = []
    for scene in scenes:
        if isinstance(scene, dict) and isinstance(scene.get("shots"), list):
            scene = dict(scene)
            shots = []
            for shot in scene["shots"]:
                if isinstance(shot, dict) and isinstance(shot.get("model"), dict):
                    over = shot["model"]
                    if over.get("backend", film_model["backend"]) == film_model["backend"]:
                        shot = {**shot, "model": _deep_merge(film_model, over)}
                shots.append(shot)
            scene["shots"] = shots
        new_scenes.append(scene)
    return raw


def _merge_shot_keyframes(raw: dict[str, Any]) -> dict[str, Any]:
    """A shot's ``keyframe:`` overrides the film's field by field; a shot's ``pin`` replaces it
    whole (a pinned keyframe takes nothing from a film's keyframe model)."""
    film_kf = raw.get("keyframe")
    if not isinstance(film_kf, dict):
        return raw
    base = {k: v for k, v in film_kf.items() if k not in ("pin", "sha256")}
    raw = copy.deepcopy(raw)
    for _, shot in _shots(raw):
        over = shot.get("keyframe")
        if isinstance(over, dict) and "pin" not in over:
            shot["keyframe"] = _deep_merge(base, over)
    return raw


Written = dict[tuple[Any, ...], str]  # path of a reference or the audio -> the value as written


def _absolutise(raw: dict[str, Any], base: str) -> tuple[dict[str, Any], Written]:
    """Make reference, audio and local model paths absolute, relative to ``base``.

    Returns the new document and the values as written (for messages).
    """
    raw = copy.deepcopy(raw)
    written: Written = {}
    chars = raw.get("characters")
    if isinstance(chars, dict):
        for name, c in chars.items():
            if isinstance(c, dict) and isinstance(c.get("reference"), str) and c["reference"]:
                written[("characters", name, "reference")] = c["reference"]
                c["reference"] = resolve_url(c["reference"], base)
    if isinstance(raw.get("audio"), str) and raw["audio"]:
        written[("audio",)] = raw["audio"]
        raw["audio"] = resolve_url(raw["audio"], base)
    keyframes = [((), raw.get("keyframe"))] + [(path, shot.get("keyframe")) for path, shot in _shots(raw)]
    for path, kf in keyframes:
        if isinstance(kf, dict) and isinstance(kf.get("pin"), str) and kf["pin"]:
            written[(*path, "keyframe", "pin")] = kf["pin"]
            kf["pin"] = resolve_url(kf["pin"], base)
    models = [raw.get("model")] + [shot.get("model") for _, shot in _shots(raw)]
    models += [kf.get("model") for _, kf in keyframes if isinstance(kf, dict)]
    for m in models:
        if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]:
            mid = m["id"]
            if not _has_scheme(mid) and not os.path.isabs(mid) and not _has_scheme(base):
                local = os.path.normpath(os.path.join(base, mid))
                if mid.startswith(".") or os.path.isdir(local):
                    m["id"] = local
    return raw, written


def _reference_issues(raw: dict[str, Any], src: Source, context: str = "",
                      characters: bool = True) -> list[Issue]:
    """What refers to something that is not there, read from the document as written.

    Unknown or twice-listed characters (unless ``characters`` is false: the block has
    schema errors of its own) and duplicate scene or shot ids. Checked on the raw document,
    so they are reported together with schema errors, in one pass.
    """
    issues: list[Issue] = []
    chars = raw.get("characters", {})
    check_chars = characters and isinstance(chars, dict)
    names = sorted(str(k) for k in chars) if check_chars else []
    known = ", ".join(names) or "none"
    seen_scenes: dict[str, int] = {}
    seen_shots: dict[str, tuple[int, int]] = {}
    for si, scene in enumerate(_items(raw.get("scenes"))):
        if not isinstance(scene, dict):
            continue
        sid = scene.get("id")
        if isinstance(sid, str):
            if sid in seen_scenes:
                issues.append(src.issue(("scenes", si, "id"), f"{context}duplicate scene id {sid!r} "
                                                              f"(first at scenes[{seen_scenes[sid]}])"))
            seen_scenes.setdefault(sid, si)
        for ti, shot in enumerate(_items(scene.get("shots"))):
            if not isinstance(shot, dict):
                continue
            here = ("scenes", si, "shots", ti)
            tid = shot.get("id")
            if isinstance(tid, str):
                if tid in seen_shots:
                    a, b = seen_shots[tid]
                    issues.append(src.issue((*here, "id"), f"{context}duplicate shot id {tid!r} "
                                                           f"(first at scenes[{a}].shots[{b}])"))
                seen_shots.setdefault(tid, (si, ti))
            listed = _items(shot.get("characters"))
            for ci, name in enumerate(listed if check_chars else []):
                if not isinstance(name, str):
                    continue
                if name not in chars:
                    issues.append(src.issue((*here, "characters", ci),
                                            f"{context}unknown character {name!r} (known: {known})"
                                            + _hint(name, names, "'")))
                elif listed.index(name) != ci:
                    issues.append(src.issue((*here, "characters", ci),
                                            f"{context}character {name!r} is listed twice"))
    return issues


def _check_film(film: Film, src: Source, reader: _Reader, hash_references: bool,
                written: Written | None = None, issues: list[Issue] | None = None) -> Film:
    """Cross-field checks after ``issues`` already found; returns the film with reference
    hashes filled in."""
    issues = list(issues or [])
    written = written or {}
    order: list[tuple[tuple[Any, ...], Any, int, int]] = []  # (path, shot, frames, transition in)
    w, h = film.resolution
    fam = film.model.rule()
    for path, message in size_problems(film):
        issues.append(src.issue(path, message))
    if w % fam.size_multiple or h % fam.size_multiple:
        issues.append(src.issue(("resolution",),
                                f"{fam.name} needs width and height divisible by {fam.size_multiple}, "
                                f"got {w}x{h}"))
    prev = None  # (shot, frames) of the previous shot in film order
    for si, scene in enumerate(film.scenes):
        for ti, shot in enumerate(scene.shots):
            here = ("scenes", si, "shots", ti)
            frames = shot.frame_count(film.fps)
            if frames <= 0:
                issues.append(src.issue((*here, "duration"),
                                        f"`duration` is shorter than one frame at {film.fps} fps, "
                                        f"got {shot.duration}"))
            if shot.model is not None:
                rule = shot.model.rule()
                if w % rule.size_multiple or h % rule.size_multiple:
                    issues.append(src.issue((*here, "model"),
                                            f"{rule.name} needs width and height divisible by "
                                            f"{rule.size_multiple}, got {w}x{h}"))
            t = shot.transition
            t_frames = 0 if t.kind == "cut" else _transition_frames(t.seconds, film)
            order.append((here, shot, frames, t_frames))
            if t.kind != "cut" and t_frames < 1:
                issues.append(src.issue((*here, "transition"),
                                        f"{t.kind} of {t.seconds} s is shorter than one frame at "
                                        f"{film.fps} fps"))
            elif t.kind != "cut":
                if prev is None:
                    issues.append(src.issue((*here, "transition"),
                                            f"the film's first shot cannot begin with a {t.kind}: "
                                            "there is no shot before it"))
                else:
                    p_shot, p_frames = prev
                    if t_frames > p_frames:
                        issues.append(src.issue((*here, "transition"),
                                                f"{t.kind} of {t.seconds} s ({t_frames} frames) is longer "
                                                f"than the previous shot {p_shot.id!r} ({p_frames} frames)"))
                    if t_frames > frames:
                        issues.append(src.issue((*here, "transition"),
                                                f"{t.kind} of {t.seconds} s ({t_frames} frames) is longer "
                                                f"than this shot ({frames} frames)"))
            prev = (shot, frames)
    # A shot must outlast the transitions into and out of it together.
    for (here, shot, frames, t_in), (_, nxt, _, t_out) in zip(order, order[1:]):
        if t_in and t_out and t_in + t_out > frames:
            issues.append(src.issue((*here, "transition"),
                                    f"shot {shot.id!r} ({frames} frames) is shorter than its transitions "
                                    f"in ({t_in} frames) and out to {nxt.id!r} ({t_out} frames) together"))
    # Diffusers models given as a folder or URL must be there (hub ids are checked by the
    # worker that loads them: the driver may have no hub access).
    models = [(("model", "id"), film.model)] + [
        (("scenes", si, "shots", ti, "model", "id"), shot.model)
        for si, scene in enumerate(film.scenes) for ti, shot in enumerate(scene.shots) if shot.model]
    for path, model in models:
        why = _missing_model(model, reader.storage_options) if model.backend == "diffusers" else None
        if why:
            issues.append(src.issue(path, why))
    issues += _keyframe_issues(film, src, reader, written)
    # References and the soundtrack: only from allowed places (workers read references
    # later, so this holds even when nothing is read now).
    for name, char in film.characters.items():
        shown = reader.refusal(char.reference)
        if shown:
            where = ("characters", name, "reference")
            issues.append(src.issue(where, f"character {name!r}: "
                                           + _outside(shown, written.get(where, char.reference))))
    if film.audio and (shown := reader.refusal(film.audio)):
        issues.append(src.issue(("audio",), "`audio` " + _outside(shown, written.get(("audio",), film.audio))))
    if issues or not hash_references:
        if issues:
            raise SpecError(_sorted(issues))
        return film
    # Each character's image must exist and be an image: hash it. The soundtrack must have sound.
    characters = dict(film.characters)
    for name, char in film.characters.items():
        digest, why = reader.hash_image(char.reference)
        if why:
            issues.append(src.issue(("characters", name, "reference"), f"character {name!r}: {why}"))
        elif char.sha256 and char.sha256 != digest:
            issues.append(src.issue(("characters", name, "sha256"),
                                    f"character {name!r}: reference changed: pinned sha256 "
                                    f"{char.sha256[:12]}..., file has {digest[:12]}..."))  # type: ignore[index]
        else:
            characters[name] = char.model_copy(update={"sha256": digest})
    if film.audio and (why := reader.probe_audio(film.audio)):
        issues.append(src.issue(("audio",), f"{why}, got {written.get(('audio',), film.audio)!r}"))
    film, pin_issues = _hash_pins(film, src, reader, written)
    issues += pin_issues
    if issues:
        raise SpecError(_sorted(issues))
    return film.model_copy(update={"characters": characters})


# --- keyframes -------------------------------------------------------------------------
def _keyframe_issues(film: Film, src: Source, reader: _Reader, written: Written) -> list[Issue]:
    """Keyframes where they cannot be used: a pin on the film, a keyframe on a shot the
    animatic renders, a pin outside the allowed places, a model folder that is not an
    image-editing pipeline of its family."""
    issues: list[Issue] = []
    checked: set[str] = set()
    if film.keyframe is not None and film.keyframe.pin is not None:
        issues.append(src.issue(("keyframe", "pin"),
                                "a pinned keyframe is one shot's first frame: set `keyframe.pin` on the shot, "
                                f"got {written.get(('keyframe', 'pin'), film.keyframe.pin)!r}"))
    if film.keyframe is not None and film.keyframe.model is not None:
        checked.add(film.keyframe.model.id)
        if why := _not_keyframe_model(film.keyframe.model, reader.storage_options):
            issues.append(src.issue(("keyframe", "model", "id"), why))
    for si, scene in enumerate(film.scenes):
        for ti, shot in enumerate(scene.shots):
            here = ("scenes", si, "shots", ti, "keyframe")
            kf = shot.keyframe
            if kf is None or kf == "animatic":
                continue
            backend = film.model_for(shot).backend
            if backend != "diffusers":
                issues.append(src.issue(here, f"shot {shot.id!r}: a keyframe is the first frame a diffusers "
                                              f"model starts from; this shot renders with the {backend} "
                                              "(`model.backend`); remove `keyframe` or render it with diffusers"))
                continue
            if kf.model is not None and kf.model.id not in checked:  # type: ignore[union-attr]
                checked.add(kf.model.id)  # type: ignore[union-attr]
                if why := _not_keyframe_model(kf.model, reader.storage_options):  # type: ignore[union-attr]
                    issues.append(src.issue((*here, "model", "id"), f"shot {shot.id!r}: {why}"))
            if kf.pin is not None and (shown := reader.refusal(kf.pin)):  # type: ignore[union-attr]
                issues.append(src.issue((*here, "pin"), f"shot {shot.id!r}: `keyframe.pin` "
                                        + _outside(shown, written.get((*here, "pin"), kf.pin))))  # type: ignore[union-attr]
    return issues


def _not_keyframe_model(model: Any, storage_options: dict[str, Any] | None) -> str | None:
    """Why a keyframe model given as a folder or URL is missing or not its family's
    image-editing pipeline, or None (hub ids are checked where the model loads)."""
    import json

    want = KEYFRAME_PIPELINES[model.family]
    mid = model.id
    if not os.path.isabs(mid) and not (_has_scheme(mid) and not mid.startswith(("http://", "https://"))):
        return None
    try:
        fs, path = fsspec.core.url_to_fs(mid, **(storage_options or {}))
        if not fs.isdir(path):
            return f"`keyframe.model.id` {model.family} model folder not found: {mid}"
        with fs.open(posixpath.join(path, "model_index.json"), "rb") as f:
            found = json.loads(f.read(1 << 20)).get("_class_name")
    except FileNotFoundError:
        return (f"`keyframe.model.id` is not an image-editing pipeline: {mid} has no model_index.json "
                f"({model.family} takes a {want} folder)")
    except Exception as e:  # noqa: BLE001 - unreachable store, unreadable JSON
        return f"`keyframe.model.id` {mid} cannot be read: {type(e).__name__}: {e}"
    if found != want:
        return (f"`keyframe.model.id` is not an image-editing pipeline of family {model.family!r}: "
                f"{mid} holds a {found}, {model.family} takes a {want}")
    return None


def _read_pin(url: str, reader: _Reader, size: tuple[int, int]) -> tuple[str | None, str | None]:
    """(sha256, None) for a pinned keyframe that is an opaque image of ``size``, else (None, why)."""
    import warnings

    from PIL import Image

    try:
        with reader._open(url) as f:
            data = f.read(MAX_REFERENCE_BYTES + 1)
    except FileNotFoundError:
        return None, f"pinned keyframe not found: {url}"
    except Exception as e:  # noqa: BLE001 - whatever the store says, the file cannot be read
        return None, f"cannot read pinned keyframe {url}: {e}"
    if len(data) > MAX_REFERENCE_BYTES:
        return None, f"pinned keyframe is larger than {MAX_REFERENCE_BYTES} bytes (MAX_REFERENCE_BYTES): {url}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                got, bands = im.size, im.getbands()
                opaque = "A" not in bands or im.getchannel("A").getextrema()[0] == 255
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
        return None, f"pinned keyframe is not a readable image: {url} ({e.__class__.__name__})"
    if tuple(got) != tuple(size):
        return None, (f"pinned keyframe must be the film's size {size[0]}x{size[1]}: {url} is "
                      f"{got[0]}x{got[1]}")
    if not opaque:
        return None, f"pinned keyframe must be opaque (it is used as given): {url} has transparent pixels"
    return hashlib.sha256(data).hexdigest(), None


def _hash_pins(film: Film, src: Source, reader: _Reader, written: Written | None = None,
               context: str = "") -> tuple[Film, list[Issue]]:
    """Read every shot's pinned keyframe: an opaque image of the film's size, hashed."""
    issues: list[Issue] = []
    scenes = []
    changed = False
    for si, scene in enumerate(film.scenes):
        shots = []
        for ti, shot in enumerate(scene.shots):
            kf = shot.keyframe
            if isinstance(kf, Keyframe) and kf.pin is not None:
                here = ("scenes", si, "shots", ti, "keyframe", "pin")
                digest, why = _read_pin(kf.pin, reader, film.resolution)
                if why:
                    issues.append(src.issue(here, f"{context}shot {shot.id!r}: {why}, got "
                                                  f"{(written or {}).get(here, kf.pin)!r}"))
                elif kf.sha256 and kf.sha256 != digest:
                    issues.append(src.issue(here, f"{context}shot {shot.id!r}: pinned keyframe changed: "
                                                  f"pinned sha256 {kf.sha256[:12]}..., file has {digest[:12]}..."))  # type: ignore[index]
                else:
                    shot = shot.model_copy(update={"keyframe": kf.model_copy(update={"sha256": digest})})
                    changed = True
            shots.append(shot)
        scenes.append(scene.model_copy(update={"shots": tuple(shots)}))
    return (film.model_copy(update={"scenes": tuple(scenes)}) if changed else film), issues


def _missing_model(model: Any, storage_options: dict[str, Any] | None) -> str | None:
    """Why a diffusers model given as a local folder or fsspec URL cannot be found, or None."""
    mid = model.id
    if os.path.isabs(mid):
        return None if os.path.isdir(mid) else f"{model.family} model folder not found: {mid}"
    if _has_scheme(mid) and not mid.startswith(("http://", "https://")):
        try:
            fs, path = fsspec.core.url_to_fs(mid, **(storage_options or {}))
            found = fs.exists(path)
        except Exception as e:  # noqa: BLE001 - unknown protocols, bad URLs, unreachable stores
            return f"{model.family} model {mid} is not reachable: {e}"
        return None if found else f"{model.family} model not found: {mid}"
    return None


def _transition_frames(seconds: float, film: Film) -> int:
    from reelfarm.schemas.film import seconds_to_frames

    return seconds_to_frames(seconds, film.fps)


def _film_from_raw(raw: dict[str, Any], src: Source, base: str, reader: _Reader,
                   hash_references: bool, context: str = "", written: Written | None = None) -> Film:
    raw, as_written = _absolutise(_merge_shot_keyframes(_merge_shot_models(raw)), base)
    as_written.update(written or {})
    try:
        film = _validate(Film, src, raw, context)
    except SpecError as e:
        # One pass: what the schema refused and what refers to nothing, together.
        broken = any(re.match(r"characters\b", i.path) for i in e.issues)
        found = [*e.issues, *_reference_issues(raw, src, context, characters=not broken)]
        raise SpecError(_sorted(_dedupe(found))) from None
    try:
        return _check_film(film, src, reader, hash_references, as_written, _reference_issues(raw, src))
    except SpecError as e:
        if not context:
            raise
        raise SpecError([Issue(i.file, i.line, i.path, context + i.message) for i in e.issues]) from None


def load_film(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
              hash_references: bool = True, allowed_roots: Sequence[str] = ()) -> Film:
    """Load a film spec (YAML or JSON) and check everything before any work starts.

    Args:
        url: a local path or any fsspec URL.
        storage_options: passed to fsspec for the spec and its references.
        hash_references: read and hash every reference image (the planner needs the hashes)
            and probe the soundtrack.
        allowed_roots: folders and URL prefixes references and audio may also be read from,
            besides the spec's own folder (the ``allowed_read_roots`` setting).

    Raises:
        SpecError: with every issue found, each naming file, line, field and value.
    """
    url = os.fspath(url)
    src = parse_document(_read_text(url, storage_options), url)
    raw = _upgrade(src)
    if "campaign" in raw:
        raise SpecError([src.issue(("campaign",), "this is a campaign spec; use load_campaign")])
    base = _base_of(url)
    reader = _Reader([base], allowed_roots, storage_options)
    return _film_from_raw(raw, src, base, reader, hash_references)


# --- campaign --------------------------------------------------------------------------
class LoadedCampaign:
    """A campaign and its cells, each a fully validated film."""

    def __init__(self, campaign: Campaign, cells: list[CampaignCell], url: str) -> None:
        self.campaign = campaign
        self.cells = cells
        self.url = url

    def __repr__(self) -> str:
        return f"LoadedCampaign({self.campaign.campaign!r}, cells={len(self.cells)})"


# Filled text never needs to be longer than this: titles and prompts are far shorter, and
# pydantic refuses what is too long.
_MAX_FILLED = 100_000


def _fill_vars(raw: Any, values: dict[str, str], src: Source, path: tuple[Any, ...],
               issues: list[Issue]) -> Any:
    """Fill ``{name}`` placeholders in the title and every prompt.

    Only plain names: no attributes, indexes, conversions or format specs (``{x:>999999999}``
    would build a gigabyte).
    """
    vars_known = ", ".join(sorted(values)) or "none"

    def fill(text: str, where: tuple[Any, ...]) -> str:
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as e:
            issues.append(src.issue(where, f"cannot fill placeholders: {e}, got {text[:60]!r}"))
            return text
        out: list[str] = []
        size = 0
        for literal, name, spec, conversion in parts:
            out.append(literal)
            size += len(literal)
            if name is None:
                continue
            if spec or conversion:
                issues.append(src.issue(where, f"placeholder {{{name}}} takes no conversion or format, "
                                               f"got {text[:60]!r}"))
                return text
            if name not in values:
                issues.append(src.issue(where, f"unknown placeholder {{{name}}} (campaign vars: {vars_known})"))
                return text
            out.append(values[name])
            size += len(values[name])
            if size > _MAX_FILLED:
                break
        return "".join(out)

    raw = copy.deepcopy(raw)
    if isinstance(raw.get("title"), str):
        raw["title"] = fill(raw["title"], ("title",))
    for where, shot in _shots(raw):
        if isinstance(shot.get("prompt"), str):
            shot["prompt"] = fill(shot["prompt"], (*where, "prompt"))
    return raw


def load_campaign(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                  hash_references: bool = True, allowed_roots: Sequence[str] = ()) -> LoadedCampaign:
    """Load a campaign and validate every cell's film before any work starts.

    Args:
        url: a local path or any fsspec URL.
        storage_options: passed to fsspec for the specs and their references.
        hash_references: read and hash every reference image and probe soundtracks.
        allowed_roots: folders and URL prefixes the base film, references and audio may also
            be read from, besides the campaign's folder (and the base film's, for what it names).

    Raises:
        SpecError: with every issue found, each naming file, line, field and value.
    """
    url = os.fspath(url)
    csrc = parse_document(_read_text(url, storage_options), url)
    craw = _upgrade(csrc)
    campaign: Campaign = _validate(Campaign, csrc, craw)
    cbase = _base_of(url)
    film_url = resolve_url(campaign.film, cbase)
    shown = _Reader([cbase], allowed_roots, storage_options).refusal(film_url)
    if shown:
        raise SpecError([csrc.issue(("film",), _outside(shown, campaign.film))])
    fsrc = parse_document(_read_text(film_url, storage_options), film_url)
    fbase = _base_of(film_url)
    fraw, fwritten = _absolutise(_upgrade(fsrc), fbase)
    reader = _Reader([cbase, fbase], allowed_roots, storage_options)
    axes = list(campaign.matrix.items())
    cells: list[CampaignCell] = []
    issues: list[Issue] = []
    chunks = 0
    for combo in itertools.product(*[list(values.items()) for _, values in axes]):
        values = {axis: name for (axis, _), (name, _) in zip(axes, combo)}
        cell_id = "/".join(name for name, _ in combo)
        raw = fraw
        written = dict(fwritten)
        variables: dict[str, str] = {}
        cell_src = fsrc
        for (axis, _), (name, mv) in zip(axes, combo):
            over, over_written = _absolutise(mv.film, cbase)
            raw = _deep_merge(raw, over)
            written.update(over_written)
            variables.update(mv.vars)
            # What this value overrides is reported at the campaign's line, not the film's.
            cell_src = cell_src.overlay(csrc, ("matrix", axis, name, "film"))
        variables.update({k: v for k, v in values.items() if k not in variables})
        cell_issues: list[Issue] = []
        raw = _fill_vars(raw, variables, cell_src, (), cell_issues)
        if cell_issues:
            issues.extend(Issue(i.file, i.line, i.path, f"(cell {cell_id}) {i.message}") for i in cell_issues)
            continue
        try:
            film = _film_from_raw(raw, cell_src, fbase, reader, hash_references=False,
                                  context=f"(cell {cell_id}) ", written=written)
        except SpecError as e:
            issues.extend(e.issues)
            continue
        cells.append(CampaignCell(cell_id=cell_id, values=values, film=film))
        chunks += film_chunks(film)
        if chunks > MAX_CHUNKS:  # stop building cells: the campaign is too large as a whole
            issues.append(csrc.issue(("matrix",), f"the cells plan more than {MAX_CHUNKS} chunks, the limit "
                                                  f"per load (MAX_CHUNKS), got {chunks} chunks in the first "
                                                  f"{len(cells)} of {campaign.cell_count} cells"))
            break
    if issues:
        raise SpecError(_dedupe(issues))
    if hash_references:
        cells = [_hash_cell(c, fsrc, reader) for c in cells]
    return LoadedCampaign(campaign, cells, url)


def _hash_cell(cell: CampaignCell, src: Source, reader: _Reader) -> CampaignCell:
    """Hash each reference once across all cells (cells share most references); probe audio."""
    chars = {}
    for name, char in cell.film.characters.items():
        digest, why = reader.hash_image(char.reference)
        if why:
            raise SpecError([src.issue(("characters", name, "reference"),
                                       f"(cell {cell.cell_id}) character {name!r}: {why}")])
        chars[name] = char.model_copy(update={"sha256": digest})
    if cell.film.audio and (why := reader.probe_audio(cell.film.audio)):
        raise SpecError([src.issue(("audio",), f"(cell {cell.cell_id}) {why}, got {cell.film.audio!r}")])
    film, issues = _hash_pins(cell.film, src, reader, context=f"(cell {cell.cell_id}) ")
    if issues:
        raise SpecError(issues)
    return cell.model_copy(update={"film": film.model_copy(update={"characters": chars})})


def _dedupe(issues: list[Issue]) -> list[Issue]:
    seen, out = set(), []
    for i in issues:
        if str(i) not in seen:
            seen.add(str(i))
            out.append(i)
    return out


def load_spec(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
              allowed_roots: Sequence[str] = ()) -> Film | LoadedCampaign:
    """Load a film or a campaign, whichever the document is (see :func:`load_film`)."""
    url = os.fspath(url)
    src = parse_document(_read_text(url, storage_options), url)
    if "campaign" in src.data:
        return load_campaign(url, storage_options=storage_options, allowed_roots=allowed_roots)
    return load_film(url, storage_options=storage_options, allowed_roots=allowed_roots)
