"""Mid-chunk checkpoints: a chunk's sampler state every K steps, so a chunk cut short (a
spot node reclaimed, a worker killed) resumes elsewhere and runs only its remaining steps.

A checkpoint is one file, ``OUT/checkpoints/<chunk key>/step-<k>.pt``: the denoising loop's
latents after step ``k`` of ``n``, the scheduler's state, the noise generator's state and
what else the family's loop carries between steps. It sits beside the chunks it belongs to,
under the chunk's content key, so any worker that renders that chunk finds it. Only the last
one is kept, and the folder is deleted once the chunk commits.

A checkpoint is a hint, never a source of truth: one that cannot be read, names another
chunk key, another step count, or does not match the resumed call's own schedule and latent
shape (checked in :mod:`reelfarm.render.diffusers.resume`) is ignored with a warning, and
the chunk renders from step 0. Writing one that fails is logged and the render goes on.

What the resumed frames equal: a resumed chunk is bit-identical to an uninterrupted one
rendered on the same kind of device, with the same versions and thread count (tests check it
for every diffusers family on CPU). Resumed on another GPU model the steps after ``k`` run
there, so the frames are those of a render that moved mid-way: within float rounding of
the uninterrupted one, as any render moved between GPU models is.

This module is torch-free at import (the driver imports the policy); torch is imported
when a checkpoint is read or written, in the worker.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reelfarm.storage import Location

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "CheckpointPolicy", "StepCheckpoint", "StepCheckpoints"]

FORMAT = "reelfarm-step-checkpoint/1"
# A chunk is checkpointed only when its estimate is at least this many intervals: a short
# chunk is cheaper to render again than to checkpoint.
MIN_INTERVALS = 2


@dataclass(frozen=True)
class CheckpointPolicy:
    """How often a chunk's sampler state is saved.

    Attributes:
        every: checkpoint every this many steps; ``0`` never; ``None`` by chunk cost: about
            one checkpoint per ``interval_s`` of the chunk's estimated GPU time (the
            planner's estimate), none for a chunk shorter than two intervals.
        interval_s: the target GPU seconds between checkpoints when ``every`` is None. The
            default, 120 s, is the notice a spot instance gets before it is reclaimed.
    """

    every: int | None = None
    interval_s: float = 120.0

    def every_for(self, steps: int, est_gpu_s: float) -> int:
        """Steps between checkpoints for a chunk of ``steps`` steps; 0 for none."""
        if steps <= 1:
            return 0
        if self.every is not None:
            return self.every if 0 < self.every < steps else 0
        if est_gpu_s < MIN_INTERVALS * self.interval_s:
            return 0
        per_step = est_gpu_s / steps
        return min(steps - 1, max(1, math.floor(self.interval_s / per_step)))


@dataclass
class StepCheckpoint:
    """The sampler's state after ``step`` of ``steps`` steps (see the module doc)."""

    key: str
    step: int
    steps: int
    latents: Any  # torch.Tensor
    scheduler: dict[str, Any]
    generator: Any  # torch.ByteTensor, torch.Generator.get_state()
    extra: dict[str, Any]

    def to_bytes(self) -> bytes:
        import torch

        buf = io.BytesIO()
        torch.save({"format": FORMAT, "key": self.key, "step": self.step, "steps": self.steps,
                    "latents": self.latents, "scheduler": self.scheduler,
                    "generator": self.generator, "extra": self.extra}, buf)  # fmt: skip
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, key: str, steps: int) -> StepCheckpoint:
        """Read and check one checkpoint. Raises ValueError naming what is wrong."""
        import torch

        try:
            doc = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is just unreadable
            raise ValueError(f"unreadable: {type(err).__name__}: {err}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if doc.get("key") != key:
            raise ValueError(f"it belongs to chunk key {doc.get('key')!r}")
        if doc.get("steps") != steps:
            raise ValueError(f"it is for {doc.get('steps')!r} steps, this chunk has {steps}")
        step = doc.get("step")
        if not isinstance(step, int) or not 0 < step < steps:
            raise ValueError(f"its step {step!r} is not within 1..{steps - 1}")
        if not isinstance(doc.get("latents"), torch.Tensor):
            raise ValueError("it holds no latents")
        return cls(key=key, step=step, steps=steps, latents=doc["latents"],
                   scheduler=dict(doc.get("scheduler") or {}), generator=doc.get("generator"),
                   extra=dict(doc.get("extra") or {}))  # fmt: skip


class StepCheckpoints:
    """The checkpoints of one chunk (or one take of it) in the chunk store.

    Args:
        store: the run's output root (a ``ChunkStore``).
        key: the chunk's content key (a take's key for a retake).
        steps: the chunk's sampling steps.
        every: save after every this many steps (0: never save; a saved one is still read).

    The counters say what happened, for the chunk's sidecar: ``resumed_from`` (the step the
    render started at), ``saved`` (checkpoints written), ``steps_run`` (denoising steps
    this render ran; the sampler hooks count them).
    """

    def __init__(self, store: Location, key: str, steps: int, every: int) -> None:
        self.store = store
        self.key = key
        self.steps = steps
        self.every = every
        self.resumed_from = 0
        self.saved = 0
        self.on_request = 0  # checkpoints saved because one was requested
        self.steps_run = 0
        self.ignored: list[str] = []  # why a found checkpoint was not used
        # Set by someone else (the worker, when its node is draining): save at the next step
        # end whatever ``every`` says. A ``threading.Event`` or anything with is_set/clear.
        self.requested: Any = None

    @property
    def folder(self) -> str:
        return f"checkpoints/{self.key}"

    def _name(self, step: int) -> str:
        return f"{self.folder}/step-{step:05d}.pt"

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` steps (never after the last: the chunk commits):
        every ``every`` steps, and once after each request."""
        if step >= self.steps:
            return False
        if self.requested is not None and self.requested.is_set():
            self.requested.clear()
            self.on_request += 1
            return True
        return self.every > 0 and step % self.every == 0

    def _steps_found(self) -> list[int]:
        fs = self.store.fs
        folder = self.store._path(self.folder)
        try:
            fs.invalidate_cache(folder)
            names = [str(p).rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for name in names:
            stem = name.removeprefix("step-").removesuffix(".pt")
            if name.startswith("step-") and name.endswith(".pt") and stem.isdigit():
                found.append(int(stem))
        return sorted(found, reverse=True)

    def load(self) -> StepCheckpoint | None:
        """The latest usable checkpoint, or None (unusable ones are logged and skipped)."""
        for step in self._steps_found():
            try:
                data = self.store.read_bytes(self._name(step))
                if data is None:
                    continue
                return StepCheckpoint.from_bytes(data, key=self.key, steps=self.steps)
            except Exception as err:  # noqa: BLE001 - a bad checkpoint only costs its steps
                self.reject(step, str(err))
        return None

    def reject(self, step: int, why: str) -> None:
        """Record that the checkpoint at ``step`` is not used, and why."""
        message = f"checkpoint {self._name(step)} ignored ({why}); rendering from step 0"
        logger.warning("%s", message)
        self.ignored.append(message)

    def save(self, checkpoint: StepCheckpoint) -> None:
        """Write ``checkpoint`` and drop the older ones. A failure is logged, not raised."""
        try:
            self.store.write_bytes_atomic(self._name(checkpoint.step), checkpoint.to_bytes())
        except Exception as err:  # noqa: BLE001 - a checkpoint is an optimisation
            logger.warning("chunk %s: could not write checkpoint at step %d: %s",
                           self.key, checkpoint.step, err)  # fmt: skip
            return
        self.saved += 1
        for step in self._steps_found():
            if step < checkpoint.step:
                self._remove(self._name(step))

    def clear(self) -> None:
        """Delete this chunk's checkpoints (after it committed)."""
        folder = self.store._path(self.folder)
        try:
            if self.store.fs.exists(folder):
                self.store.fs.rm(folder, recursive=True)
        except Exception as err:  # noqa: BLE001 - an orphan checkpoint is harmless
            logger.warning("could not remove the checkpoints of chunk %s: %s", self.key, err)

    def _remove(self, relpath: str) -> None:
        try:
            self.store.fs.rm(self.store._path(relpath))
        except Exception:  # noqa: BLE001 - best effort
            pass

    def summary(self) -> dict[str, Any]:
        """The sidecar's ``checkpoints`` entry."""
        return {"every": self.every, "resumed_from_step": self.resumed_from,
                "steps_run": self.steps_run, "steps_saved": self.resumed_from,
                "saved": self.saved, "on_request": self.on_request,
                "ignored": list(self.ignored)}  # fmt: skip
