"""Quality control: the `qc:` policy of a film or shot, and the one owner of take keys and seeds.

A chunk is scored after it renders (identity per character, seam against the chunk it
continues from; see :mod:`reelfarm.render.scores`). When a policy asks for more than one
take and a take falls below it, the worker renders the chunk again with the next take's
seed. Take ``t`` of chunk ``key`` is stored under :func:`take_key`; the chunk's own key
commits the best take. Take 1 is the chunk as planned (its own seed), so a policy every
chunk meets renders exactly what no policy would.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["MAX_TAKES", "QcPolicy", "qc_reasons", "take_key", "take_seed"]

MAX_TAKES = 8  # a chunk is rendered at most this many times by one policy


class QcPolicy(BaseModel):
    """What a chunk must reach, and how many takes it may use to reach it.

    Written as ``qc:`` on the film (every shot) or on a shot (replaces the film's).

    Attributes:
        min_identity: the lowest identity score (0..1) of any character in the chunk.
        max_seam: the highest seam score against the chunk it continues from
            (see :func:`reelfarm.render.seams.seam_score`; chained chunks only).
        takes: renders allowed per chunk, the first included.
        metric: ``region`` (masked colour and structure, no weights) or ``embedding``
            (cosine of image embeddings from ``embedding_model``).
        embedding_model: a folder or URL holding a ``CLIPVisionModelWithProjection``
            (``from_pretrained``); when set, the embedding score is recorded too.
        sample_frames: frames scored per chunk, spread evenly over its own frames.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_identity: float | None = Field(None, ge=0.0, le=1.0)
    max_seam: float | None = Field(None, gt=0.0, le=1000.0)
    takes: int = Field(1, ge=1, le=MAX_TAKES)
    metric: Literal["region", "embedding"] = "region"
    embedding_model: str | None = Field(None, min_length=1)
    sample_frames: int = Field(4, ge=1, le=32)

    @model_validator(mode="after")
    def _metric_has_model(self) -> QcPolicy:
        if self.metric == "embedding" and not self.embedding_model:
            raise ValueError("`metric` 'embedding' needs `embedding_model`, got None")
        return self

    def key_doc(self) -> dict[str, Any] | None:
        """What the policy adds to a chunk's content key: which take is committed.

        With one take the chunk's pixels never depend on the policy (scores and flags are
        read beside them), so the key is unchanged and no chunk renders again.
        """
        if self.takes <= 1:
            return None
        return self.model_dump(mode="json")


def take_seed(seed: int, take: int) -> int:
    """The seed of take ``take`` (1-based) of a chunk seeded ``seed``; take 1 keeps ``seed``."""
    if take <= 1:
        return seed
    digest = hashlib.blake2b(f"{seed}/take/{take}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def take_key(key: str, take: int) -> str:
    """The store key of take ``take`` of the chunk whose content key is ``key``."""
    return hashlib.sha256(f"{key}|take|{take}".encode()).hexdigest()[: len(key)]


def qc_reasons(policy: QcPolicy | None, identity: float | None, seam: float | None) -> list[str]:
    """Why a take misses ``policy`` (empty when it passes); the messages name field and value."""
    if policy is None:
        return []
    out = []
    if policy.min_identity is not None and identity is not None and identity < policy.min_identity:
        out.append(f"identity {identity:.4f} < `min_identity` {policy.min_identity:g}")
    if policy.max_seam is not None and seam is not None and seam > policy.max_seam:
        out.append(f"seam {seam:.4f} > `max_seam` {policy.max_seam:g}")
    return out
