"""Identity and continuity scores of a rendered chunk, per character, on sampled frames.

Two identity scores, each 0..1 and higher meaning "looks more like the reference":

- ``region`` needs no weights. Where each character stands in a frame comes from the
  animatic's staging (the same sprites, cameras and idle poses that draw the animatic,
  and the keyframe every diffusers shot starts from), so on animatic renders the region
  is exact and on model renders it is where the character was staged. The character's
  region is cropped, resampled to a square and compared with the reference cut-out:
  a weighted colour-histogram intersection (what colours) and a weighted correlation of
  luminance (what shape), averaged. Pixels hidden by a character in front are left out.
- ``embedding`` is the cosine of image embeddings of the same crop (background greyed
  out) and of the reference over grey, from a ``CLIPVisionModelWithProjection`` loaded
  with ``from_pretrained`` from a path (:class:`Embedder`).

Continuity is the same region similarity between a character's crops on consecutive
sampled frames (does the character stay itself through the chunk). The seam score of a
chained chunk is :func:`reelfarm.render.seams.seam_score` of its first frame against the
frame it continues from. Torch is imported here; this module runs on workers.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from reelfarm.render.seams import seam_score

if TYPE_CHECKING:
    from reelfarm.render.base import Condition
    from reelfarm.render.identity import IdentityBundle
    from reelfarm.schemas.plan import ChunkPlan, ShotPlan
    from reelfarm.schemas.qc import QcPolicy

logger = logging.getLogger(__name__)

__all__ = [
    "CROP",
    "ChunkScores",
    "Embedder",
    "Region",
    "character_regions",
    "chunk_seam",
    "load_embedder",
    "reference_crop",
    "region_similarity",
    "sample_frames",
    "score_chunk",
]

CROP = 48  # side of the square both crops are resampled to for the region score
_MIN_PIXELS = 16  # a character showing fewer visible pixels than this is not scored
_BINS = 4  # colour histogram bins per channel (64 bins)
_FIGURE = 0.5  # staging coverage above this is the figure (its ground shadow stays below 0.45)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- where each character is ----------------------------------------------------------------
@dataclass(frozen=True)
class Region:
    """One character in one frame: its figure's box and the weight of each pixel in it.

    ``weights`` is ``y1-y0 x x1-x0`` float32 0..1: the figure's coverage, less what the
    characters drawn in front of it hide.
    """

    box: tuple[int, int, int, int]  # x0, x1, y0, y1
    weights: np.ndarray

    @property
    def visible(self) -> float:
        return float(self.weights.sum())


def sample_frames(chunk: ChunkPlan, count: int) -> list[int]:
    """``count`` frame indices within the chunk's own frames, spread evenly, first and last included."""
    used = max(chunk.frame_end - chunk.frame_start, 1)
    if count <= 1 or used == 1:
        return [0]
    return sorted({round(i * (used - 1) / (count - 1)) for i in range(count)})


def character_regions(shot: ShotPlan, identities: dict[str, IdentityBundle], frames: list[int]
                      ) -> dict[str, list[Region | None]]:
    """Where each of the shot's characters stands in each shot frame of ``frames``.

    Drawn with the animatic's own staging: each sprite's alpha warped exactly as the
    animatic warps its colour, back row first, so later sprites hide earlier ones.

    Returns:
        character -> one :class:`Region` per frame (``None`` where it is off screen).
    """
    from reelfarm.render.animatic import character_coverage

    covers = character_coverage(shot, identities, frames)
    regions: dict[str, list[Region | None]] = {name: [None] * len(frames) for name in shot.characters}
    for j, (name, cover) in enumerate(covers):
        figure = (cover > _FIGURE).to(torch.float32) * cover
        visible = figure.clone()
        for _, later in covers[j + 1:]:
            visible *= 1.0 - later.clamp(0.0, 1.0)
        for n in range(len(frames)):
            ys, xs = torch.nonzero(figure[n] > 0, as_tuple=True)
            if ys.numel() == 0 or float(visible[n].sum()) < _MIN_PIXELS:
                continue
            x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
            regions[name][n] = Region((x0, x1, y0, y1), visible[n, y0:y1, x0:x1].numpy().copy())
    return regions


# --- comparing a region with a reference -------------------------------------------------------
def _square(image: np.ndarray, size: int = CROP) -> torch.Tensor:
    """``h x w x c`` float -> ``c x size x size`` (area-averaged down, bilinear up)."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


_REF_CROPS: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def reference_crop(bundle: IdentityBundle, size: int = CROP) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference cut-out cropped to its figure: ``(3 x s x s colour 0..255, s x s alpha 0..1)``.

    Memoised per bundle key (the key hashes the reference), a few dozen at most per run.
    """
    memo = (bundle.key, size)
    if memo not in _REF_CROPS:
        if len(_REF_CROPS) > 256:
            _REF_CROPS.clear()
        _REF_CROPS[memo] = _reference_crop(bundle, size)
    return _REF_CROPS[memo]


def _reference_crop(bundle: IdentityBundle, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rgba = bundle.tensors["reference_rgba"]
    rgba = rgba.numpy() if isinstance(rgba, torch.Tensor) else np.asarray(rgba)
    rows = np.flatnonzero(rgba[..., 3].max(axis=1) > 8)
    cols = np.flatnonzero(rgba[..., 3].max(axis=0) > 8)
    if rows.size:
        rgba = rgba[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    sq = _square(rgba.astype(np.float32), size)
    return sq[:3], sq[3] / 255.0


def _crop(frame: np.ndarray, region: Region, size: int = CROP) -> tuple[torch.Tensor, torch.Tensor]:
    x0, x1, y0, y1 = region.box
    pixels = frame[y0:y1, x0:x1].astype(np.float32)
    sq = _square(np.concatenate([pixels, region.weights[..., None]], axis=2), size)
    return sq[:3], sq[3].clamp(0.0, 1.0)


def _histogram(rgb: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    bins = (rgb.clamp(0, 255) * (_BINS / 256.0)).floor().clamp(0, _BINS - 1).long()
    index = (bins[0] * _BINS + bins[1]) * _BINS + bins[2]
    hist = torch.zeros(_BINS ** 3, dtype=torch.float32)
    hist.index_add_(0, index.flatten(), weights.flatten())
    return hist / hist.sum().clamp_min(1e-6)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _similarity(a_rgb: torch.Tensor, a_w: torch.Tensor, b_rgb: torch.Tensor, b_w: torch.Tensor) -> float | None:
    """Colour and structure similarity (0..1) of two square crops with their pixel weights."""
    joint = a_w * b_w
    if float(joint.sum()) < 1.0:
        return None
    colour = float(torch.minimum(_histogram(a_rgb, a_w), _histogram(b_rgb, b_w)).sum())
    la, lb = _luma(a_rgb), _luma(b_rgb)
    total = joint.sum()
    ma, mb = (la * joint).sum() / total, (lb * joint).sum() / total
    da, db = la - ma, lb - mb
    cov = (da * db * joint).sum() / total
    var_a, var_b = (da * da * joint).sum() / total, (db * db * joint).sum() / total
    c = 6.5  # (0.01 * 255)^2: flat crops compare as equal rather than dividing by zero
    # SSIM's luminance x contrast-structure terms over the whole weighted crop.
    lum = (2 * ma * mb + c) / (ma * ma + mb * mb + c)
    struct = (2 * cov + 9 * c) / (var_a + var_b + 9 * c)
    structure = float((lum * struct).clamp(0.0, 1.0))
    return 0.5 * colour + 0.5 * structure


def region_similarity(frame: np.ndarray, region: Region, bundle: IdentityBundle) -> float | None:
    """The ``region`` identity score (0..1) of a frame's region against a character's reference."""
    rgb, w = _crop(frame, region)
    ref_rgb, ref_a = reference_crop(bundle)
    return _similarity(rgb, w, ref_rgb, ref_a)


# --- the learned score ----------------------------------------------------------------------------
class Embedder:
    """Image embeddings from a CLIP vision tower with projection (``from_pretrained``).

    Args:
        path: a local folder holding a ``CLIPVisionModelWithProjection`` (its
            ``preprocessor_config.json``, when present, gives the normalisation).
        device: torch device.
    """

    def __init__(self, path: str, device: str = "cpu") -> None:
        import os

        from transformers import CLIPVisionModelWithProjection

        self.path = path
        self.device = device
        self.model = CLIPVisionModelWithProjection.from_pretrained(path).to(device).eval()
        self.size = int(self.model.config.image_size)
        mean, std = _CLIP_MEAN, _CLIP_STD
        pre = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(pre):
            with open(pre, encoding="utf-8") as fh:
                doc = json.load(fh)
            mean, std = tuple(doc.get("image_mean", mean)), tuple(doc.get("image_std", std))
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    @torch.no_grad()
    def embed(self, images: list[torch.Tensor]) -> torch.Tensor:
        """``3 x h x w`` colour tensors (0..255) -> unit embeddings ``N x D``."""
        batch = torch.stack([
            (F.interpolate(im[None] / 255.0, size=(self.size, self.size), mode="bilinear",
                           align_corners=False, antialias=True)[0] - self.mean) / self.std
            for im in images
        ]).to(self.device)
        emb = self.model(pixel_values=batch).image_embeds.float().cpu()
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def similarity(self, crops: list[tuple[torch.Tensor, torch.Tensor]], reference: tuple[torch.Tensor, torch.Tensor]
                   ) -> list[float]:
        """Cosine (clipped to 0..1) of each crop against the reference, both over grey."""
        grey = torch.full((3, 1, 1), 127.5)
        images = [reference[0] * reference[1] + grey * (1 - reference[1])]
        images += [rgb * w + grey * (1 - w) for rgb, w in crops]
        emb = self.embed(images)
        return [max(0.0, float(x)) for x in emb[1:] @ emb[0]]


_EMBEDDERS: dict[str, Embedder] = {}


def load_embedder(path: str, device: str = "cpu") -> Embedder:
    """The embedder at ``path``, loaded once per process."""
    if path not in _EMBEDDERS:
        _EMBEDDERS[path] = Embedder(path, device)
    return _EMBEDDERS[path]


# --- a chunk's scores -----------------------------------------------------------------------------
@dataclass
class ChunkScores:
    """One take's scores. Lists are per sampled frame; ``None`` where a character is hidden."""

    frames: list[int]  # shot frame numbers scored
    region: dict[str, list[float | None]]
    embedding: dict[str, list[float | None]] | None = None
    continuity: dict[str, float | None] = field(default_factory=dict)
    seam: float | None = None

    def per_character(self, metric: str = "region") -> dict[str, float | None]:
        """Mean score over the scored frames, per character."""
        table = self.embedding if metric == "embedding" and self.embedding is not None else self.region
        out: dict[str, float | None] = {}
        for name, values in table.items():
            seen = [v for v in values if v is not None]
            out[name] = sum(seen) / len(seen) if seen else None
        return out

    def identity(self, metric: str = "region") -> float | None:
        """The chunk's identity score: its least recognisable character's mean."""
        seen = [v for v in self.per_character(metric).values() if v is not None]
        return min(seen) if seen else None

    def continuity_score(self) -> float | None:
        seen = [v for v in self.continuity.values() if v is not None]
        return min(seen) if seen else None

    def to_doc(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(float(v), 5)

        doc: dict[str, Any] = {
            "frames": list(self.frames),
            "region": {k: [r(v) for v in vs] for k, vs in self.region.items()},
            "continuity": {k: r(v) for k, v in self.continuity.items()},
            "seam": r(self.seam),
        }
        if self.embedding is not None:
            doc["embedding"] = {k: [r(v) for v in vs] for k, vs in self.embedding.items()}
        return doc


def chunk_seam(shot: ShotPlan, chunk: ChunkPlan, frames: np.ndarray, condition: Condition | None) -> float | None:
    """The seam score of a chained chunk against the frame it continues from (else ``None``)."""
    if condition is None or condition.image is None or not chunk.depends_on:
        return None
    used = frames[: max(chunk.frame_end - chunk.frame_start, 1)].astype(np.int16)
    across = float(np.mean(np.abs(used[0] - condition.image.astype(np.int16))))
    steps = [float(np.mean(np.abs(used[i + 1] - used[i]))) for i in range(len(used) - 1)]
    within = sum(steps) / len(steps) if steps else 0.0
    return seam_score(across, within)


def score_chunk(shot: ShotPlan, chunk: ChunkPlan, frames: np.ndarray, identities: dict[str, IdentityBundle],
                policy: QcPolicy | None = None, *, condition: Condition | None = None,
                embedder: Embedder | None = None) -> ChunkScores:
    """Score one rendered chunk: identity per character on sampled frames, continuity, seam.

    Args:
        shot: the chunk's shot.
        chunk: the chunk (``frames[i]`` is shot frame ``chunk.frame_start + i``).
        frames: the rendered frames, ``T x H x W x 3`` uint8.
        identities: the shot's characters' bundles (their ``reference_rgba`` is compared).
        policy: how many frames to sample (default 4).
        condition: the previous chunk's frame, for the seam score.
        embedder: when given, the learned embedding score is computed too.
    """
    count = policy.sample_frames if policy is not None else 4
    local = sample_frames(chunk, count)
    shot_frames = [chunk.frame_start + i for i in local]
    regions = character_regions(shot, identities, shot_frames) if shot.characters else {}
    region: dict[str, list[float | None]] = {}
    embedding: dict[str, list[float | None]] | None = {} if embedder is not None else None
    continuity: dict[str, float | None] = {}
    for name in shot.characters:
        bundle = identities[name]
        ref = reference_crop(bundle)
        crops = [None if reg is None else _crop(frames[i], reg) for i, reg in zip(local, regions[name], strict=True)]
        region[name] = [None if c is None else _similarity(c[0], c[1], ref[0], ref[1]) for c in crops]
        shown = [c for c in crops if c is not None]
        if embedding is not None and embedder is not None:
            sims = iter(embedder.similarity(shown, ref)) if shown else iter(())
            embedding[name] = [None if c is None else next(sims) for c in crops]
        pairs = [_similarity(a[0], a[1], b[0], b[1]) for a, b in zip(shown, shown[1:])]
        seen = [p for p in pairs if p is not None]
        continuity[name] = sum(seen) / len(seen) if seen else None
    seam = chunk_seam(shot, chunk, frames, condition)
    if seam is not None and not math.isfinite(seam):
        seam = None
    return ChunkScores(frames=shot_frames, region=region, embedding=embedding, continuity=continuity, seam=seam)
