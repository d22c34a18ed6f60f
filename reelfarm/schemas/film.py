"""The film spec users write: Film, Scene, Shot, Character, Camera, Transition, models.

Strict (`extra="forbid"`) and frozen. Time is integer frames at a rational frame rate;
seconds are converted to frames in exactly one place, :func:`seconds_to_frames`.
Checks that need more than one field (unknown characters, duplicate ids, transitions
longer than a neighbour...) live in :mod:`reelfarm.schemas.checks`, which knows file lines.
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
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from reelfarm.schemas.families import FamilyRule, family_for

__all__ = [
    "SPEC_VERSION",
    "AnimaticModel",
    "Camera",
    "Character",
    "DiffusersModel",
    "Film",
    "FrameRate",
    "ModelSpec",
    "Output",
    "Scene",
    "Shot",
    "Slug",
    "Transition",
    "parse_frame_rate",
    "seconds_to_frames",
]

SPEC_VERSION = 1
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
        rate = _NTSC.get(round(value, 3)) or Fraction(value).limit_denominator(1001)
    elif isinstance(value, str):
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
    family: Literal["wan", "ltx", "cogvideox", "svd"]
    id: str = Field(..., min_length=1, description="hub id, local folder or fsspec URL")
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    negative_prompt: str = ""
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    offload: Literal["none", "model", "sequential"] = "none"
    vae_tiling: bool = False
    max_sequence_length: int = Field(226, ge=8, le=1024)
    continuation: Literal["previous", "reference"] = "previous"

    @model_validator(mode="after")
    def _continuation_overlaps(self) -> DiffusersModel:
        # An image-to-video chunk's first frame reproduces the image it starts from: that
        # frame must be one the previous chunk made, or the shot shows it twice.
        if self.continuation == "previous" and self.overlap < 1:
            raise ValueError("`overlap` must be at least 1 when `continuation` is 'previous', got 0")
        return self


ModelSpec = Annotated[AnimaticModel | DiffusersModel, Field(discriminator="backend")]


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
    frames: int | None = Field(None, gt=0, le=1_000_000)
    prompt: str = Field(..., min_length=1, max_length=4000)
    characters: tuple[str, ...] = ()  # names checked against the film in checks.py
    camera: Camera = Camera()
    transition: Transition = Transition()
    seed: int | None = Field(None, ge=0, lt=2**63)
    model: ModelSpec | None = Field(None, description="this shot's model; the loader merges it")

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

    # --- derived values -------------------------------------------------------------
    def shots(self) -> list[tuple[Scene, Shot]]:
        """Every shot in film order, with its scene."""
        return [(scene, shot) for scene in self.scenes for shot in scene.shots]

    def model_for(self, shot: Shot) -> AnimaticModel | DiffusersModel:
        return shot.model or self.model

    @property
    def width(self) -> int:
        return self.resolution[0]

    @property
    def height(self) -> int:
        return self.resolution[1]

