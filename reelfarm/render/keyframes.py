"""Keyframes: the first frame a diffusers shot starts from, when it is not the animatic's.

Two sources (the spec's ``keyframe:``, schemas/film.py):

- **composed**: an image-editing pipeline of the installed diffusers composes the frame from
  the shot's characters' references and a prompt. ``flux_kontext`` (``FluxKontextPipeline``)
  takes one image, so it is given the animatic's collage (:func:`collage`: the references
  staged over the shot's backdrop, the animatic keyframe itself) and told the prompt.
- **pinned**: an image file of the film's size, used as given (:func:`decode_pin`).

A keyframe is rendered once per content key (``KeyframePlan.key``) by the keyframe stage
(flows/keyframes.py) before any chunk starts, and committed to the chunk store as a
one-frame chunk; the worker hands it to a shot's first chunk as its start image.
"""

from __future__ import annotations

import gc
import io
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from reelfarm.errors import BackendError
from reelfarm.schemas.film import KEYFRAME_PIPELINES

if TYPE_CHECKING:
    from reelfarm.schemas.film import KeyframeModel
    from reelfarm.schemas.plan import ShotPlan

logger = logging.getLogger(__name__)

__all__ = ["KEYFRAME_PIPELINES", "KeyframeRenderer", "collage", "decode_image", "decode_pin"]


def _name(model: KeyframeModel) -> str:
    rev = f"@{model.revision}" if model.revision else ""
    return f"keyframe model `{model.id}{rev}` (family `{model.family}`)"


def decode_image(data: bytes, what: str) -> np.ndarray:
    """``H x W x 3|4`` uint8 from image bytes (a reference keeps its alpha)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGBA") if "A" in im.getbands() else im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - any decode failure is the file's fault
        raise BackendError(f"{what} is not a readable image: {type(e).__name__}: {e}") from None


def decode_pin(data: bytes, shot: ShotPlan) -> np.ndarray:
    """A pinned keyframe's pixels, as given: ``H x W x 3`` uint8 at the shot's size.

    Raises:
        BackendError: the file changed since the spec was loaded (its sha256 is the
            keyframe's key), is not an opaque image, or is not the shot's size.
    """
    import hashlib

    kf = shot.keyframe
    assert kf is not None and kf.pin is not None
    what = f"shot {shot.shot_id!r}: pinned keyframe {kf.pin}"
    if kf.pin_sha256 and hashlib.sha256(data).hexdigest() != kf.pin_sha256:
        raise BackendError(f"{what} changed since the spec was loaded (sha256 {kf.pin_sha256[:12]}...); "
                           "load the spec again")
    pixels = decode_image(data, what)
    if pixels.shape[2] == 4:
        if pixels[..., 3].min() != 255:
            raise BackendError(f"{what} has transparent pixels; a keyframe is used as given")
        pixels = pixels[..., :3]
    if pixels.shape[:2] != (shot.height, shot.width):
        raise BackendError(f"{what} is {pixels.shape[1]}x{pixels.shape[0]}, the film is "
                           f"{shot.width}x{shot.height}")
    return np.ascontiguousarray(pixels)


def collage(shot: ShotPlan, references: dict[str, np.ndarray]) -> np.ndarray:
    """The animatic keyframe of ``shot`` (frame 0, no slate) from its characters' references.

    This is what the diffusers backend starts a shot from without a keyframe model, and what
    a one-image editing model is given to compose the keyframe from.
    """
    from reelfarm.render.animatic import keyframe
    from reelfarm.render.identity import IdentityBundle, reference_rgba

    bundles = {}
    for name in shot.characters:
        if name not in references:
            raise BackendError(f"shot {shot.shot_id!r}: no reference for character {name!r}")
        try:
            rgba = reference_rgba(references[name])
        except BackendError as e:
            raise BackendError(f"character {name!r}: {e}") from None
        bundles[name] = IdentityBundle(character=name, key="", tensors={"reference_rgba": rgba})
    return keyframe(shot, bundles, 0)


class KeyframeRenderer:
    """One loaded image-editing pipeline that composes keyframes, shot after shot.

    Args:
        pipe: a loaded pipeline of the family's class (``load`` makes one).
        model: the spec it was loaded from.
        device: ``"cpu"`` or ``"cuda"``...
    """

    def __init__(self, pipe: Any, model: KeyframeModel, *, device: str = "cpu") -> None:
        self.pipe = pipe
        self.model = model
        self.device = device
        want = KEYFRAME_PIPELINES[model.family]
        if type(pipe).__name__ != want:
            raise BackendError(f"{_name(model)}: not an image-editing pipeline of its family: got a "
                               f"{type(pipe).__name__}, {model.family} takes a {want}")

    @classmethod
    def load(cls, model: KeyframeModel, *, device: str | None = None) -> KeyframeRenderer:
        """Load ``model`` from a local folder, an fsspec URL or a hub id, after checking that its
        ``model_index.json`` names the family's image-editing pipeline.

        Raises:
            BackendError: unreachable, not an image-editing pipeline, or refused by diffusers.
        """
        import diffusers
        import torch

        from reelfarm.render.diffusers.loading import read_model_index, resolve_source

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        want = KEYFRAME_PIPELINES[model.family]
        source = resolve_source(model)  # type: ignore[arg-type] - reads id, revision, family
        found = read_model_index(source, model).get("_class_name")  # type: ignore[arg-type]
        if found != want:
            raise BackendError(f"{_name(model)} is not an image-editing pipeline of its family: the "
                               f"folder holds a {found}, {model.family} takes a {want}")
        kwargs: dict[str, Any] = {"dtype": getattr(torch, model.dtype)}
        if model.revision and not str(source).startswith("/"):
            kwargs["revision"] = model.revision
        try:
            pipe = getattr(diffusers, want).from_pretrained(source, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever from_pretrained refuses, say which model
            raise BackendError(f"{_name(model)}: from_pretrained failed: {type(e).__name__}: {e}") from None
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        return cls(pipe, model, device=device)

    def __call__(self, shot: ShotPlan, image: np.ndarray) -> np.ndarray:
        """Compose ``shot``'s keyframe from ``image`` (the collage) and the keyframe's prompt.

        Returns:
            ``H x W x 3`` uint8 at the shot's size.
        """
        import torch
        from PIL import Image

        kf = shot.keyframe
        if kf is None or kf.model is None:
            raise BackendError(f"shot {shot.shot_id!r} has no keyframe model")
        w, h = shot.width, shot.height
        # Kontext sizes its output from `max_area` and rounds to its latent grid; asked for the
        # shot's area it renders the shot's size where that fits the grid (else resized below).
        # The input is given at the shot's size too (`_auto_resize=False`): its tokens line up
        # with the output's, and no 1-megapixel detour is paid for a preview-sized shot.
        generator = torch.Generator("cpu").manual_seed(kf.seed)
        with torch.inference_mode():
            out = self.pipe(
                image=Image.fromarray(np.ascontiguousarray(image[..., :3]), "RGB"), prompt=kf.prompt,
                height=h, width=w, max_area=w * h, num_inference_steps=self.model.steps,
                guidance_scale=self.model.guidance_scale, generator=generator, output_type="np",
                max_sequence_length=self.model.max_sequence_length, _auto_resize=False,
            ).images[0]  # fmt: skip
        frame = np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
        if frame.shape[:2] != (h, w):
            frame = np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.LANCZOS))
        return frame

    def close(self) -> None:
        """Release the pipeline and its device memory."""
        self.pipe = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
