"""Load and validate film and campaign specs from a local path or any fsspec URL.

Every problem is reported before any work starts, as ``file:line path: message``, e.g.
``film.yaml:23 scenes[0].shots[2].characters[1]: unknown character 'mothh' (known: flame, moth)``.
A loaded film has absolute reference URLs and each reference's sha256 filled in, so the
planner can stay pure.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import logging
import os
import posixpath
import re
import string
from typing import Any, Callable

import fsspec
from pydantic import BaseModel, ValidationError

from reelfarm.errors import Issue, SpecError
from reelfarm.schemas.campaign import Campaign, CampaignCell
from reelfarm.schemas.film import SPEC_VERSION, Film
from reelfarm.schemas.source import Source, parse_document

__all__ = [
    "UPGRADES",
    "LoadedCampaign",
    "load_campaign",
    "load_film",
    "load_spec",
    "resolve_url",
]

logger = logging.getLogger(__name__)


# --- spec versions ----------------------------------------------------------------------
def _v0_to_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 0 (the pre-release format) wrote ``frame_rate`` and ``resolution: "WxH"``."""
    raw = dict(raw)
    if "frame_rate" in raw:
        raw["fps"] = raw.pop("frame_rate")
    res = raw.get("resolution")
    if isinstance(res, str) and "x" in res:
        w, _, h = res.partition("x")
        if w.strip().isdigit() and h.strip().isdigit():
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


def _read_text(url: str, storage_options: dict[str, Any] | None) -> str:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise SpecError([Issue(url, None, "", "spec file not found")]) from None
    except OSError as e:
        raise SpecError([Issue(url, None, "", f"cannot read spec: {e}")]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError([Issue(url, None, "", "spec is not UTF-8 text")]) from None


def _hash_image(url: str, storage_options: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(sha256, None) for a readable image, (None, why) otherwise."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        return None, f"reference image not found: {url}"
    except OSError as e:
        return None, f"cannot read reference image {url}: {e}"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return None, f"reference is not a readable image: {url} ({e.__class__.__name__})"
    return hashlib.sha256(data).hexdigest(), None


# --- pydantic errors -> issues -----------------------------------------------------------
def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        return f"unknown key {loc[-1]!r}"
    if kind == "missing":
        return f"missing field `{loc[-1]}`"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    got = repr(err.get("input"))
    if len(got) > 60:
        got = got[:57] + "..."
    return f"{msg}, got {got}"


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
        return model.model_validate(data)
    except ValidationError as e:
        issues = []
        errors = e.errors()
        locs = [tuple(err["loc"]) for err in errors]
        for err in errors:
            loc = tuple(err["loc"])
            # A list that is "too short" only because its items failed: report the items.
            if any(other != loc and other[: len(loc)] == loc for other in locs):
                continue
            msg = _describe(err)
            path = _error_path(data, err, msg)
            issues.append(src.issue(path, f"{context}{msg}"))
        raise SpecError(_sorted(issues)) from None


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


def _absolutise(raw: dict[str, Any], base: str) -> dict[str, Any]:
    """Make reference, audio and local model paths absolute, relative to ``base``."""
    raw = copy.deepcopy(raw)
    chars = raw.get("characters")
    if isinstance(chars, dict):
        for c in chars.values():
            if isinstance(c, dict) and isinstance(c.get("reference"), str) and c["reference"]:
                c["reference"] = resolve_url(c["reference"], base)
    if isinstance(raw.get("audio"), str) and raw["audio"]:
        raw["audio"] = resolve_url(raw["audio"], base)
    models = [raw.get("model")]
    for scene in raw.get("scenes") or []:
        for shot in (scene.get("shots") or []) if isinstance(scene, dict) else []:
            if isinstance(shot, dict):
                models.append(shot.get("model"))
    for m in models:
        if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]:
            mid = m["id"]
            if not _has_scheme(mid) and not os.path.isabs(mid) and not _has_scheme(base):
                local = os.path.normpath(os.path.join(base, mid))
                if mid.startswith(".") or os.path.isdir(local):
                    m["id"] = local
    return raw


def _check_film(film: Film, src: Source, storage_options: dict[str, Any] | None,
                hash_references: bool) -> Film:
    """Cross-field checks; returns the film with reference hashes filled in."""
    issues: list[Issue] = []
    known = ", ".join(sorted(film.characters)) or "none"
    seen_scenes: dict[str, int] = {}
    seen_shots: dict[str, tuple[int, int]] = {}
    prev = None  # (shot, frames) of the previous shot in film order
    order: list[tuple[tuple[Any, ...], Any, int, int]] = []  # (path, shot, frames, transition in)
    used: set[str] = set()
    w, h = film.resolution
    fam = film.model.rule()
    if w % fam.size_multiple or h % fam.size_multiple:
        issues.append(src.issue(("resolution",),
                                f"{fam.name} needs width and height divisible by {fam.size_multiple}, "
                                f"got {w}x{h}"))
    for si, scene in enumerate(film.scenes):
        if scene.id in seen_scenes:
            issues.append(src.issue(("scenes", si, "id"),
                                    f"duplicate scene id {scene.id!r} (first at scenes[{seen_scenes[scene.id]}])"))
        seen_scenes.setdefault(scene.id, si)
        for ti, shot in enumerate(scene.shots):
            here = ("scenes", si, "shots", ti)
            if shot.id in seen_shots:
                a, b = seen_shots[shot.id]
                issues.append(src.issue((*here, "id"),
                                        f"duplicate shot id {shot.id!r} (first at scenes[{a}].shots[{b}])"))
            seen_shots.setdefault(shot.id, (si, ti))
            for ci, name in enumerate(shot.characters):
                if name not in film.characters:
                    issues.append(src.issue((*here, "characters", ci),
                                            f"unknown character {name!r} (known: {known})"))
                elif shot.characters.index(name) != ci:
                    issues.append(src.issue((*here, "characters", ci),
                                            f"character {name!r} is listed twice"))
                used.add(name)
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
        why = _missing_model(model, storage_options) if model.backend == "diffusers" else None
        if why:
            issues.append(src.issue(path, why))
    # References: each character's image must exist and be an image; hash it.
    characters = dict(film.characters)
    if hash_references and not issues:
        for name, char in film.characters.items():
            digest, why = _hash_image(char.reference, storage_options)
            if why:
                issues.append(src.issue(("characters", name, "reference"), f"character {name!r}: {why}"))
            elif char.sha256 and char.sha256 != digest:
                issues.append(src.issue(("characters", name, "sha256"),
                                        f"character {name!r}: reference changed: pinned sha256 "
                                        f"{char.sha256[:12]}..., file has {digest[:12]}..."))
            else:
                characters[name] = char.model_copy(update={"sha256": digest})
        if film.audio:
            try:
                fs, path = fsspec.core.url_to_fs(film.audio, **(storage_options or {}))
                if not fs.exists(path):
                    issues.append(src.issue(("audio",), f"audio file not found: {film.audio}"))
            except (OSError, ValueError) as e:
                issues.append(src.issue(("audio",), f"cannot read audio {film.audio}: {e}"))
    if issues:
        raise SpecError(_sorted(issues))
    return film.model_copy(update={"characters": characters})


def _missing_model(model: Any, storage_options: dict[str, Any] | None) -> str | None:
    """Why a diffusers model given as a local folder or fsspec URL cannot be found, or None."""
    mid = model.id
    if os.path.isabs(mid):
        return None if os.path.isdir(mid) else f"{model.family} model folder not found: {mid}"
    if _has_scheme(mid) and not mid.startswith(("http://", "https://")):
        try:
            fs, path = fsspec.core.url_to_fs(mid, **(storage_options or {}))
            found = fs.exists(path)
        except (OSError, ValueError, ImportError) as e:
            return f"{model.family} model {mid} is not reachable: {e}"
        return None if found else f"{model.family} model not found: {mid}"
    return None


def _transition_frames(seconds: float, film: Film) -> int:
    from reelfarm.schemas.film import seconds_to_frames

    return seconds_to_frames(seconds, film.fps)


def _film_from_raw(raw: dict[str, Any], src: Source, base: str, storage_options: dict[str, Any] | None,
                   hash_references: bool, context: str = "") -> Film:
    raw = _absolutise(_merge_shot_models(raw), base)
    film = _validate(Film, src, raw, context)
    try:
        return _check_film(film, src, storage_options, hash_references)
    except SpecError as e:
        if not context:
            raise
        raise SpecError([Issue(i.file, i.line, i.path, context + i.message) for i in e.issues]) from None


def load_film(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
              hash_references: bool = True) -> Film:
    """Load a film spec (YAML or JSON) and check everything before any work starts.

    Args:
        url: a local path or any fsspec URL.
        storage_options: passed to fsspec for the spec and its references.
        hash_references: read and hash every reference image (the planner needs the hashes).

    Raises:
        SpecError: with every issue found, each naming file, line, field and value.
    """
    url = os.fspath(url)
    src = parse_document(_read_text(url, storage_options), url)
    raw = _upgrade(src)
    if "campaign" in raw:
        raise SpecError([src.issue(("campaign",), "this is a campaign spec; use load_campaign")])
    return _film_from_raw(raw, src, _base_of(url), storage_options, hash_references)


# --- campaign --------------------------------------------------------------------------
class LoadedCampaign:
    """A campaign and its cells, each a fully validated film."""

    def __init__(self, campaign: Campaign, cells: list[CampaignCell], url: str) -> None:
        self.campaign = campaign
        self.cells = cells
        self.url = url

    def __repr__(self) -> str:
        return f"LoadedCampaign({self.campaign.campaign!r}, cells={len(self.cells)})"


def _fill_vars(raw: Any, values: dict[str, str], src: Source, path: tuple[Any, ...],
               issues: list[Issue]) -> Any:
    """Fill ``{name}`` placeholders in the title and every prompt."""
    def fill(text: str, where: tuple[Any, ...]) -> str:
        names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        missing = [n for n in names if n not in values]
        if missing:
            issues.append(src.issue(where, f"unknown placeholder {{{missing[0]}}} "
                                           f"(campaign vars: {', '.join(sorted(values)) or 'none'})"))
            return text
        return text.format_map(values)

    raw = copy.deepcopy(raw)
    if isinstance(raw.get("title"), str):
        raw["title"] = fill(raw["title"], ("title",))
    for si, scene in enumerate(raw.get("scenes") or []):
        for ti, shot in enumerate(scene.get("shots") or [] if isinstance(scene, dict) else []):
            if isinstance(shot, dict) and isinstance(shot.get("prompt"), str):
                shot["prompt"] = fill(shot["prompt"], ("scenes", si, "shots", ti, "prompt"))
    return raw


def load_campaign(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None,
                  hash_references: bool = True) -> LoadedCampaign:
    """Load a campaign and validate every cell's film before any work starts."""
    url = os.fspath(url)
    csrc = parse_document(_read_text(url, storage_options), url)
    craw = _upgrade(csrc)
    campaign: Campaign = _validate(Campaign, csrc, craw)
    cbase = _base_of(url)
    film_url = resolve_url(campaign.film, cbase)
    fsrc = parse_document(_read_text(film_url, storage_options), film_url)
    fraw = _absolutise(_upgrade(fsrc), _base_of(film_url))
    axes = list(campaign.matrix.items())
    cells: list[CampaignCell] = []
    issues: list[Issue] = []
    hashes: dict[str, str] = {}
    for combo in itertools.product(*[list(values.items()) for _, values in axes]):
        values = {axis: name for (axis, _), (name, _) in zip(axes, combo)}
        cell_id = "/".join(name for name, _ in combo)
        raw = fraw
        variables: dict[str, str] = {}
        cell_src = fsrc
        for (axis, _), (name, mv) in zip(axes, combo):
            over = _absolutise(mv.film, cbase)
            raw = _deep_merge(raw, over)
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
            film = _film_from_raw(raw, cell_src, _base_of(film_url), storage_options,
                                  hash_references=False, context=f"(cell {cell_id}) ")
        except SpecError as e:
            issues.extend(e.issues)
            continue
        cells.append(CampaignCell(cell_id=cell_id, values=values, film=film))
    if issues:
        raise SpecError(_dedupe(issues))
    if hash_references:
        cells = [_hash_cell(c, fsrc, storage_options, hashes) for c in cells]
    return LoadedCampaign(campaign, cells, url)


def _hash_cell(cell: CampaignCell, src: Source, storage_options: dict[str, Any] | None,
               memo: dict[str, str]) -> CampaignCell:
    """Hash each reference once across all cells (cells share most references)."""
    chars = {}
    for name, char in cell.film.characters.items():
        if char.reference not in memo:
            digest, why = _hash_image(char.reference, storage_options)
            if why:
                raise SpecError([src.issue(("characters", name, "reference"),
                                           f"(cell {cell.cell_id}) character {name!r}: {why}")])
            memo[char.reference] = digest  # type: ignore[assignment]
        chars[name] = char.model_copy(update={"sha256": memo[char.reference]})
    return cell.model_copy(update={"film": cell.film.model_copy(update={"characters": chars})})


def _dedupe(issues: list[Issue]) -> list[Issue]:
    seen, out = set(), []
    for i in issues:
        if str(i) not in seen:
            seen.add(str(i))
            out.append(i)
    return out


def load_spec(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
              ) -> Film | LoadedCampaign:
    """Load a film or a campaign, whichever the document is."""
    url = os.fspath(url)
    src = parse_document(_read_text(url, storage_options), url)
    if "campaign" in src.data:
        return load_campaign(url, storage_options=storage_options)
    return load_film(url, storage_options=storage_options)
