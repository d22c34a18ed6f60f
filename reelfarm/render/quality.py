"""Quality control as the report, the timeline and the per-shot report read it.

Plain Python over the manifest's qc columns (``identity_score``, ``take``, ``takes``,
``qc_flag``, ``scores``; filled from each chunk's :class:`~reelfarm.cluster.worker.RenderReply`
``.qc``). No torch: the driver reads this. The scores themselves are computed on workers
by :mod:`reelfarm.render.scores`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reelfarm.schemas.plan import RenderPlan

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

__all__ = ["ChunkQc", "ShotQc", "shot_qc"]


@dataclass(frozen=True)
class ChunkQc:
    """One chunk's qc: the committed take, how many were made and why each retake was."""

    chunk_name: str
    identity: float | None
    continuity: float | None
    take: int | None
    takes: int | None
    flag: str | None
    history: tuple[dict[str, Any], ...]  # per take: take, seed, identity, seam, reasons, key


@dataclass
class ShotQc:
    """A shot's qc: identity against shot frame per character, and its chunks' takes.

    ``flagged`` is True when any chunk was delivered below the policy (its best take).
    """

    shot_id: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # name -> (frame, score)
    chunks: list[ChunkQc] = field(default_factory=list)
    metric: str = "region"

    @property
    def flagged(self) -> bool:
        return any(c.flag for c in self.chunks)

    @property
    def flags(self) -> list[str]:
        return [f"{c.chunk_name}: {c.flag}" for c in self.chunks if c.flag]

    @property
    def retakes(self) -> int:
        return sum(max((c.takes or 1) - 1, 0) for c in self.chunks)

    @property
    def identity(self) -> float | None:
        seen = [c.identity for c in self.chunks if c.identity is not None]
        return min(seen) if seen else None

    def report(self) -> dict[str, Any]:
        """What a per-shot report (``status.json``, the CLI) adds for this shot."""
        return {"identity": None if self.identity is None else round(self.identity, 4),
                "retakes": self.retakes, "qc": "flagged" if self.flagged else "ok", "qc_flags": self.flags}


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def shot_qc(plan: RenderPlan, manifest: pa.Table | None) -> dict[str, ShotQc]:
    """Per shot of ``plan``: its characters' identity over time and its chunks' takes.

    Rows of other plans in the manifest are ignored (matched by content key).
    """
    out = {s.shot_id: ShotQc(s.shot_id) for s in plan.shots}
    if manifest is None or manifest.num_rows == 0:
        return out
    by_key = {c.key: (s.shot_id, c) for s in plan.shots for c in s.chunks}
    cols = {n: _column(manifest, n) for n in ("content_key", "identity_score", "continuity_score", "take", "takes",
                                                "qc_flag", "scores")}
    rows = sorted((by_key[k][1].frame_start, i) for i, k in enumerate(cols["content_key"]) if k in by_key)
    for _, i in rows:
        shot_id, chunk = by_key[cols["content_key"][i]]
        sq = out[shot_id]
        doc: dict[str, Any] = {}
        if cols["scores"][i]:
            try:
                doc = json.loads(cols["scores"][i])
            except ValueError:
                logger.warning("chunk %s: unreadable `scores` in the manifest", chunk.name)
        sq.metric = doc.get("metric", sq.metric)
        values = doc.get("embedding" if sq.metric == "embedding" else "region") or {}
        frames = doc.get("frames") or []
        for name, scores in values.items():
            line = sq.series.setdefault(name, [])
            line.extend((f, float(v)) for f, v in zip(frames, scores, strict=False) if v is not None)
        sq.chunks.append(ChunkQc(
            chunk_name=chunk.name, identity=cols["identity_score"][i], continuity=cols["continuity_score"][i],
            take=cols["take"][i], takes=cols["takes"][i], flag=cols["qc_flag"][i],
            history=tuple(doc.get("takes") or ()),
        ))
    for sq in out.values():
        for name, line in sq.series.items():
            sq.series[name] = sorted(dict(line).items())  # overlapping chunks score a frame once
    return out
