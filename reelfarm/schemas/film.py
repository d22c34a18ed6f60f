"""The film spec users write: Film, Scene, Shot, Character, Camera, Transition, models.

Strict (`extra="forbid"`) and frozen. Time is integer frames at a rational frame rate;
seconds are converted to frames in exactly one place, :func:`seconds_to_frames`.
Checks that need more than one field (unknown characters, duplicate ids, transitions
longer than a neighbour...) live in :mod:`reelfarm.schemas.loader`, which knows file lines.

Limits. Every size a spec can ask for is bounded here, in one place, so that a typo
(``duration: 1000000000000``) is refused at load instead of growing the planner's memory:

- ``MAX_SPEC_BYTES``: the size of a spec file (film, campaign or base film).
- ``MAX_SPEC_NODES``: values in one spec document, YAML aliases counted as often as they
  are used (so an alias "billion laughs" cannot expand).
- ``MAX_REFERENCE_BYTES``: the size of one reference image the loader reads and hashes.
- ``MAX_SHOT_FRAMES``: frames in one shot, written as ``frames`` or as ``duration``.
- ``MAX_FILM_FRAMES``: frames of all the shots of one film together.
- ``MAX_PIXEL_FRAMES``: width x height x frames of one film.
- ``MAX_CHUNKS``: chunks one load may plan: a film's, or a campaign's cells together
  (estimated exactly as the planner cuts shots, see :func:`estimate_chunks`).
- ``MAX_CAMPAIGN_CELLS``: cells of a campaign matrix (checked before any cell is built).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from reelfarm.schemas.accel import Accel
from reelfarm.schemas.families import FamilyRule, family_for
from reelfarm.schemas.qc import QcPolicy

__all__ = [
    "SPEC_VERSION",
    "AnimaticModel",
    "Camera",
    "Character",
    "DiffusersModel",
    "Film",
    "FrameRate",
    "KEYFRAME_PIPELINES",
    "Keyframe",
    "KeyframeModel",
    "MAX_CAMPAIGN_CELLS",
    "MAX_CHUNKS",
    "MAX_FILM_FRAMES",
    "MAX_PIXEL_FRAMES",
    "MAX_REFERENCE_BYTES",
    "MAX_SHOT_FRAMES",
    "MAX_SPEC_BYTES",
    "MAX_SPEC_NODES",
    "ModelSpec",
    "Output",
    "Scene",
    "Shot",
    "Slug",
    "Transition",
    "estimate_chunks",
    "parse_frame_rate",
    "seconds_to_frames",
    "size_problems",
]

SPEC_VERSION = 1

# --- limits (see the module docstring) ------------------------------------------------------
MAX_SPEC_BYTES = 4 * 2**20  # 4 MiB: thousands of shots
MAX_SPEC_NODES = 200_000  # about 10,000 shots written out in full
MAX_REFERENCE_BYTES = 64 * 2**20  # a reference is one still image
MAX_SHOT_FRAMES = 1_000_000  # 11.5 hours at 24 fps
MAX_FILM_FRAMES = 2_000_000  # 23 hours at 24 fps, 9 hours at 60 fps
MAX_PIXEL_FRAMES = 4 * 10**12  # 5.5 hours of 3840x2160
MAX_CHUNKS = 100_000  # a three-hour film cut into 48-frame chunks is about 6,500
MAX_CAMPAIGN_CELLS = 1_000

_RATE_TEXT = re.compile(r"\s*\d{1,9}(\.\d{1,9})?\s*(/\s*\d{1,9}\s*)?")
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
# Common NTSC rates written as decimals map to their exact rational rate.
_NTSC = {23.976: Fraction(24000, 1001), 29.97: Fraction(30000, 1001), 59.94: Fraction(60000, 1001)}


def _check_slug(value: str) -> str:
    """Ids become file names and URL parts: refuse anything that could escape a folder."""
    # fullmatch, not match: `$` also matches before a trailing "\n".
    if not isinstance(value, str) or not _SLUG.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not a safe id: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, with no '..'"
        )
    return value


Slug = Annotated[str, AfterValidator(_check_slug)]


def parse_frame_rate(value: Any) -> Fraction:
    """Read a frame rate: ``24``, ``"24000/1001"``, ``23.976`` (NTSC decimals are exact)."""
    if isinstance(value, bool):
        raise ValueError(f"frame rate must be a number or 'N/D', got {value!r}")
    if isinstance(value, Fraction):
        rate = value
    elif isinstance(value, int):
        rate = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"frame rate must be between 1 and 240, got {value!r}")
        rate = _NTSC.get(round(value, 3)) or Fraction(value).limit_denominator(1001)
    elif isinstance(value, str):
        # Only plain decimals and N/D: Fraction("1e999999999") would compute 10**999999999.
        if not _RATE_TEXT.fullmatch(value):
            raise ValueError(f"frame rate must be a number or 'N/D', got {value!r}")
        try:
            rate = Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"frame rate must be a number or 'N/D', got {value!r}") from None
    else:
        raise ValueError(f"frame rate must be a number or 'N/D', got {value!r}")
    if not (1 <= rate <= 240):
        raise ValueError(f"frame rate must be between 1 and 240, got {value!r}")
    return rate


def _fraction_out(rate: Fraction) -> int | str:
    return rate.numerator if rate.denominator == 1 else f"{rate.numerator}/{rate.denominator}"


FrameRate = Annotated[Fraction, PlainSerializer(_fraction_out, return_type=Any)]


def seconds_to_frames(seconds: float, fps: Fraction) -> int:
    """The one place seconds become frames: the nearest whole frame, halves rounded up."""
    return math.floor(Fraction(seconds).limit_denominator(1_000_000) * fps + Fraction(1, 2))


def estimate_chunks(frames: int, per_chunk: int, overlap: int) -> int:
    """How many chunks the planner cuts a shot of ``frames`` into (exactly, without a list).

    Chunks start ``per_chunk - overlap`` apart; the last one reaches the shot's end.
    """
    if frames <= per_chunk:
        return 1
    stride = max(per_chunk - overlap, 1)
    return 1 + -(-(frames - per_chunk) // stride)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Camera(_Strict):
    """How the virtual camera moves through a shot. ``amount`` is the move's strength, 0..1."""

    move: Literal[
        "static", "pan_left", "pan_right", "tilt_up", "tilt_down", "push_in", "pull_out", "orbit"
    ] = "static"
    amount: float = Field(0.2, ge=0.0, le=1.0)


class Transition(_Strict):
    """How a shot begins: a cut, or a crossfade / fade through black from the previous shot.

    Written in YAML as ``cut``, ``{crossfade: 0.5}`` or ``{fade_black: 0.5}`` (seconds).
    Crossfades and fades overlap the two shots by their duration.
    """

    kind: Literal["cut", "crossfade", "fade_black"] = "cut"
    seconds: float = Field(0.0, ge=0.0, le=10.0)

    @model_validator(mode="before")
    @classmethod
    def _from_short_form(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"kind": value}
        if isinstance(value, dict) and len(value) == 1:
            ((key, seconds),) = value.items()
            if key in ("crossfade", "fade_black"):
                return {"kind": key, "seconds": seconds}
        return value

    @model_validator(mode="after")
    def _duration_matches_kind(self) -> Transition:
        if self.kind == "cut" and self.seconds:
            raise ValueError("a cut has no duration")
        if self.kind != "cut" and self.seconds <= 0:
            raise ValueError(f"a {self.kind} needs a duration in seconds > 0")
        return self


class _ModelCommon(_Strict):
    id: str | None = None
    revision: str | None = None
    steps: int | None = Field(None, ge=1, le=1000)
    chunk_frames: int | None = Field(
        None, ge=1, le=1024, description="frames per chunk (default: the family's native clip)"
    )
    overlap: int = Field(8, ge=0, le=512, description="frames shared by neighbouring chunks")

    def rule(self) -> FamilyRule:
        return family_for(self.backend, getattr(self, "family", None))  # type: ignore[attr-defined]

    @property
    def frames_per_chunk(self) -> int:
        return self.chunk_frames or self.rule().native_frames

    @model_validator(mode="after")
    def _frame_rule(self) -> _ModelCommon:
        rule = self.rule()
        if self.chunk_frames is not None and not rule.accepts(self.chunk_frames):
            raise ValueError(
                f"`chunk_frames` must be {rule.rule} (at least {rule.min_frames}) for "
                f"{rule.name}, got {self.chunk_frames}"
            )
        if self.chunk_frames is not None and self.chunk_frames > rule.longest:
            raise ValueError(
                f"`chunk_frames` must be at most {rule.longest} for {rule.name} (its native clip "
                f"is {rule.native_frames} frames), got {self.chunk_frames}"
            )
        if self.overlap >= self.frames_per_chunk:
            raise ValueError(
                f"`overlap` must be shorter than a chunk ({self.frames_per_chunk} frames), "
                f"got {self.overlap}"
            )
        return self


class AnimaticModel(_ModelCommon):
    """The embedded default: a deterministic pre-visualisation, no weights, no GPU."""

    backend: Literal["animatic"] = "animatic"
    slate: bool = Field(True, description="burn scene, shot and frame into each frame")
    continuation: Literal["none", "previous"] = "none"


class DiffusersModel(_ModelCommon):
    """A diffusers image-to-video pipeline."""

    backend: Literal["diffusers"]
    family: Literal["wan", "ltx", "cogvideox", "svd", "wan_vace"]
    id: str = Field(..., min_length=1, description="hub id, local folder or fsspec URL")
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    negative_prompt: str = ""
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    offload: Literal["none", "model", "sequential"] = "none"
    vae_tiling: bool = False
    accel: Accel = Field(Accel(), description="acceleration (schemas/accel.py)")
    max_sequence_length: int = Field(226, ge=8, le=1024)
    continuation: Literal["previous", "reference"] = "previous"

    @model_validator(mode="after")
    def _text_length_is_read(self) -> DiffusersModel:
        # Only LTX takes a prompt length: Wan's transformer splits image from text by
        # assuming 512 text tokens, CogVideoX takes its length from the model's config,
        # SVD reads no prompt. A value the model would ignore is refused, not dropped.
        default = type(self).model_fields["max_sequence_length"].default
        fixed = {"wan": 512, "wan_vace": 512, "cogvideox": 226}.get(self.family)  # what the family's model takes
        if self.family != "ltx" and self.max_sequence_length not in (default, fixed):
            raise ValueError(f"`max_sequence_length` is read by the ltx family only, not {self.family!r}"
                             + (f" (it takes {fixed} text tokens)" if fixed else "")
                             + f"; remove it, got {self.max_sequence_length}")
        return self

    @model_validator(mode="after")
    def _accel_fits_family(self) -> DiffusersModel:
        problems = self.accel.problems(self.family)
        if self.accel.group_offload != "none" and self.offload != "none":
            problems.append(f"`accel.group_offload` and `offload` both move weights; choose one, "
                            f"got {self.accel.group_offload!r} and {self.offload!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _continuation_overlaps(self) -> DiffusersModel:
        # An image-to-video chunk's first frame reproduces the image it starts from: that
        # frame must be one the previous chunk made, or the shot shows it twice.
        if self.continuation == "previous" and self.overlap < 1:
            raise ValueError("`overlap` must be at least 1 when `continuation` is 'previous', got 0")
        return self


ModelSpec = Annotated[AnimaticModel | DiffusersModel, Field(discriminator="backend")]

# Keyframe models: an image-editing pipeline of the installed diffusers per family, and what
# it is given (render/keyframes.py owns the registry of classes and the rendering).
KEYFRAME_PIPELINES = {"flux_kontext": "FluxKontextPipeline"}  # family -> diffusers pipeline class
# Families the installed diffusers has but reelfarm does not run yet, and why (said at load).
_KEYFRAME_NOT_YET = {
    "qwen_image_edit_plus": (
        "`qwen_image_edit_plus` (QwenImageEditPlusPipeline, several images) is not supported yet: "
        "its Qwen2VLProcessor cannot be built without torchvision in the installed transformers "
        "(it requires a video processor), so reelfarm can neither load nor test it; use "
        "`flux_kontext` (one image: the animatic collage of the references)"),
}


class KeyframeModel(_Strict):
    """An image-editing diffusers pipeline that composes a shot's first frame.

    ``flux_kontext`` (``FluxKontextPipeline``) takes one image: it is given the animatic's
    collage of the shot's characters' references over its backdrop, and the prompt.
    """

    family: Literal["flux_kontext"]
    id: str = Field(..., min_length=1, description="hub id, local folder or fsspec URL")
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    steps: int = Field(28, ge=1, le=1000)
    guidance_scale: float = Field(2.5, ge=0.0, le=30.0)
    max_sequence_length: int = Field(512, ge=8, le=512, description="T5 prompt tokens")

    @field_validator("family", mode="before")
    @classmethod
    def _known_family(cls, v: Any) -> Any:
        if isinstance(v, str) and v in _KEYFRAME_NOT_YET:
            raise ValueError(_KEYFRAME_NOT_YET[v])
        return v


class Keyframe(_Strict):
    """Where a diffusers shot's first frame comes from, instead of the animatic keyframe.

    Exactly one of ``model`` (an image-editing pipeline composes it from the shot's
    characters' references and ``prompt``) or ``pin`` (an image file of the film's size,
    used as given). Written on the film (every diffusers shot) or on a shot; a shot may say
    ``keyframe: animatic`` to keep the animatic keyframe.
    """

    model: KeyframeModel | None = None
    pin: str | None = Field(None, min_length=1, description="an image file; relative to the spec")
    prompt: str | None = Field(None, min_length=1, max_length=4000,
                               description="what the editing model is told (default: the shot's prompt)")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="pinned hash of the pinned file; set by the loader")

    @model_validator(mode="after")
    def _one_source(self) -> Keyframe:
        if (self.model is None) == (self.pin is None):
            raise ValueError("give exactly one of `model` (an image-editing pipeline) or `pin` (an image file)")
        if self.pin is not None and self.prompt is not None:
            raise ValueError("a pinned keyframe is used as given: `prompt` is for a keyframe `model`")
        return self


class Character(_Strict):
    """A character: one reference image, resolved relative to the spec file or any fsspec URL."""

    reference: str = Field(..., min_length=1)
    description: str = ""
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="pinned hash of the reference; set by the loader"
    )


class Shot(_Strict):
    """One shot: a prompt, its characters, a camera move, and how it begins."""

    id: Slug
    duration: float | None = Field(None, gt=0, allow_inf_nan=False, description="seconds; or `frames`")
    frames: int | None = Field(None, gt=0)
    prompt: str = Field(..., min_length=1, max_length=4000)
    characters: tuple[str, ...] = ()  # names checked against the film in checks.py
    camera: Camera = Camera()
    transition: Transition = Transition()
    seed: int | None = Field(None, ge=0, lt=2**63)
    model: ModelSpec | None = Field(None, description="this shot's model; the loader merges it")
    qc: QcPolicy | None = Field(None, description="this shot's quality policy (replaces the film's)")
    keyframe: Annotated[
        Annotated[Keyframe, Tag("keyframe")] | Annotated[Literal["animatic"], Tag("animatic")],
        Discriminator(lambda v: "animatic" if isinstance(v, str) else "keyframe"),
    ] | None = Field(None, description="this shot's first frame (over the film's); `animatic` keeps the animatic's")

    @field_validator("frames")
    @classmethod
    def _bounded_frames(cls, v: int | None) -> int | None:
        if v is not None and v > MAX_SHOT_FRAMES:
            raise ValueError(f"`frames` is more than {MAX_SHOT_FRAMES} frames, the limit per shot "
                             f"(MAX_SHOT_FRAMES), got {v}")
        return v

    @model_validator(mode="after")
    def _length(self) -> Shot:
        if (self.duration is None) == (self.frames is None):
            raise ValueError("give exactly one of `duration` (seconds) or `frames`")
        return self

    def frame_count(self, fps: Fraction) -> int:
        return self.frames if self.frames is not None else seconds_to_frames(self.duration, fps)  # type: ignore[arg-type]


class Scene(_Strict):
    """A scene: an ordered list of shots, cut together into ``scenes/<id>.mp4``."""

    id: Slug
    title: str = ""
    shots: tuple[Shot, ...] = Field(..., min_length=1)


class Output(_Strict):
    """What the film becomes: the formats of the cut and the review extras."""

    formats: tuple[Literal["mp4", "prores", "webm"], ...] = ("mp4",)
    crf: int = Field(18, ge=0, le=51)
    contact_sheet: bool = True
    report: bool = True

    @field_validator("formats")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("name at least one format")
        if len(set(v)) != len(v):
            raise ValueError(f"formats are listed twice: {list(v)}")
        return v


class Film(_Strict):
    """A whole film: the document a user writes (``reelfarm: 1``)."""

    reelfarm: int = Field(SPEC_VERSION, description="spec version")
    title: str = Field(..., min_length=1, max_length=200)
    fps: FrameRate = Fraction(24)
    resolution: tuple[int, int] = (768, 432)
    seed: int = Field(0, ge=0, lt=2**63)
    model: ModelSpec = AnimaticModel()
    characters: dict[Slug, Character] = {}
    scenes: tuple[Scene, ...] = Field(..., min_length=1)
    audio: str | None = None
    output: Output = Output()
    qc: QcPolicy | None = Field(None, description="quality policy for every shot (see schemas.qc)")
    keyframe: Keyframe | None = Field(None, description="first frames of every diffusers shot")

    @field_validator("fps", mode="before")
    @classmethod
    def _fps(cls, v: Any) -> Fraction:
        return parse_frame_rate(v)

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, v: tuple[int, int]) -> tuple[int, int]:
        w, h = v
        if not (16 <= w <= 8192 and 16 <= h <= 8192):
            raise ValueError(f"width and height must be 16..8192, got {list(v)}")
        if w % 2 or h % 2:
            raise ValueError(f"width and height must be even (yuv420p), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _bounded(self, info: ValidationInfo) -> Film:
        # The loader reports these itself, each at its own line (see size_problems).
        if not (isinstance(info.context, dict) and info.context.get("sizes_checked_by_loader")):
            problems = size_problems(self)
            if problems:
                raise ValueError(problems[0][1])
        return self

    @model_validator(mode="after")
    def _references_fit_model(self) -> Film:
        # A reference-to-video model takes each character of a shot as one reference image,
        # up to the number its family takes (FamilyRule.max_references).
        for scene in self.scenes:
            for shot in scene.shots:
                rule = self.model_for(shot).rule()
                limit = rule.max_references
                if limit is not None and len(shot.characters) > limit:
                    raise ValueError(
                        f"shot {shot.id!r}: `characters` must name at most {limit} characters "
                        f"for {rule.name} (one reference image each), got "
                        f"{list(shot.characters)}")
        return self

    # --- derived values -------------------------------------------------------------
    def shots(self) -> list[tuple[Scene, Shot]]:
        """Every shot in film order, with its scene."""
        return [(scene, shot) for scene in self.scenes for shot in scene.shots]

    def model_for(self, shot: Shot) -> AnimaticModel | DiffusersModel:
        return shot.model or self.model

    def qc_for(self, shot: Shot) -> QcPolicy | None:
        return shot.qc or self.qc

    def keyframe_for(self, shot: Shot) -> Keyframe | None:
        """The shot's keyframe source, or None for the animatic keyframe (the default).

        Only a diffusers shot starts from a keyframe; the film's ``keyframe`` is every such
        shot's default, a shot's own replaces it (the loader merges the two field by field).
        """
        if shot.keyframe == "animatic" or self.model_for(shot).backend != "diffusers":
            return None
        return shot.keyframe or self.keyframe  # type: ignore[return-value]

    @property
    def width(self) -> int:
        return self.resolution[0]

    @property
    def height(self) -> int:
        return self.resolution[1]



def size_problems(film: Film) -> list[tuple[tuple[str | int, ...], str]]:
    """``(field path, message)`` for each size of ``film`` over its limit (see the module doc)."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    total = chunks = 0
    for si, scene in enumerate(film.scenes):
        for ti, shot in enumerate(scene.shots):
            frames = shot.frame_count(film.fps)
            if frames > MAX_SHOT_FRAMES:
                seconds = float(MAX_SHOT_FRAMES / film.fps)
                fps = _fraction_out(film.fps)
                out.append((("scenes", si, "shots", ti, "duration"),
                            f"`duration` is longer than {MAX_SHOT_FRAMES} frames ({seconds:g} s at {fps} fps), "
                            f"the limit per shot (MAX_SHOT_FRAMES), got {shot.duration}"))
                continue
            model = film.model_for(shot)
            total += max(frames, 0)
            chunks += estimate_chunks(frames, model.frames_per_chunk, model.overlap)
    if out:
        return out  # the totals of an unbounded shot say nothing more
    w, h = film.resolution
    if total > MAX_FILM_FRAMES:
        out.append((("scenes",), f"the shots add up to more than {MAX_FILM_FRAMES} frames, the limit per "
                                 f"film (MAX_FILM_FRAMES), got {total} frames"))
    if w * h * total > MAX_PIXEL_FRAMES:
        out.append((("resolution",), f"width x height x frames is more than {MAX_PIXEL_FRAMES} pixel-frames, "
                                     f"the limit per film (MAX_PIXEL_FRAMES), got {w}x{h} x {total} frames"))
    if chunks > MAX_CHUNKS:
        out.append((("scenes",), f"the shots plan more than {MAX_CHUNKS} chunks, the limit per load "
                                 f"(MAX_CHUNKS), got {chunks} chunks"))
    return out


def film_chunks(film: Film) -> int:
    """The chunks the planner cuts ``film`` into (see :func:`estimate_chunks`)."""
    return sum(estimate_chunks(shot.frame_count(film.fps), film.model_for(shot).frames_per_chunk,
                               film.model_for(shot).overlap) for _, shot in film.shots())
