"""Checkpoint and resume a stock diffusers denoising loop from outside it.

No pipeline of the installed diffusers can start its loop at step ``k``: Wan and Wan VACE
take no custom timestep list at all, and where LTX, CogVideoX and SVD take one, a shortened
list changes the schedule itself (the scheduler sizes its sigmas and its multistep order
from it). So a resume does not change the call; for one call, :class:`StepHooks` wraps
three of the pipeline's own seams and otherwise lets the stock loop run:

1. ``scheduler.set_timesteps``: after the stock method sets the full schedule, the saved
   scheduler state is put back (step index, multistep history, ...) and the loop is handed
   ``timesteps[k:]``; the full list is restored at the first ``step`` (schedulers such as
   UniPC read its length).
2. ``pipeline.prepare_latents``: the stock method runs (so it draws its noise from the
   generator exactly as before), then its latents are replaced by the checkpoint's and the
   generator is set to its saved state, which covers any noise a scheduler draws per step.
3. ``callback_on_step_end``: counts the steps run and saves a checkpoint every K steps.

What else a family's loop carries between steps is saved too: CogVideoX's DPM scheduler
takes the previous step's ``old_pred_original_sample`` and ``timesteps[i - 1]`` as
arguments (found by ``step``'s signature, not the class name), which the ``step`` wrapper
records and hands back on the first resumed step.

The schedule and the latent shape are checked against the checkpoint before anything is
used; a mismatch raises :class:`CheckpointMismatch` before the first resumed step, and the
backend renders the chunk from step 0 instead.

A step cache (``accel.cache``: first-block cache, MagCache...) keeps state in hooks on the
denoiser between steps that is not saved; models with one are not checkpointed.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reelfarm.render.checkpoints import StepCheckpoint

if TYPE_CHECKING:
    from reelfarm.render.checkpoints import StepCheckpoints

logger = logging.getLogger(__name__)

__all__ = ["CheckpointMismatch", "StepHooks"]

SKIP = ("_internal_dict", "config")  # the scheduler's config: the same by construction


class CheckpointMismatch(Exception):
    """The checkpoint does not fit this call (another schedule or latent shape)."""


def _pack(value: Any) -> tuple[bool, Any]:
    """A scheduler attribute as something ``torch.load(weights_only=True)`` reads back."""
    if value is None or isinstance(value, bool | int | float | str):
        return True, value
    if isinstance(value, torch.Tensor):
        return True, value.detach().to("cpu").clone()
    if isinstance(value, np.ndarray):
        return True, {"__ndarray__": torch.from_numpy(np.array(value))}
    if isinstance(value, np.generic):
        return True, value.item()
    if isinstance(value, list | tuple):
        items = [_pack(v) for v in value]
        if all(ok for ok, _ in items):
            packed = [v for _, v in items]
            return True, packed if isinstance(value, list) else {"__tuple__": packed}
    return False, None


def _unpack(value: Any, device: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict) and "__ndarray__" in value:
        return value["__ndarray__"].numpy()
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_unpack(v, device) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_unpack(v, device) for v in value]
    return value


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """The scheduler's mutable state (everything but its config), CPU copies."""
    state = {}
    for name, value in vars(scheduler).items():
        if name in SKIP or callable(value):
            continue
        ok, packed = _pack(value)
        if ok:
            state[name] = packed
        else:
            logger.debug("scheduler attribute %s (%s) not checkpointed", name, type(value))
    return state


def _same(a: Any, b: Any) -> bool:
    a, b = torch.as_tensor(a).to("cpu"), torch.as_tensor(b).to("cpu")
    return a.shape == b.shape and bool(torch.equal(a.to(b.dtype), b))


class StepHooks:
    """Checkpoint (and, given one, resume) one pipeline call. Use as a context manager and
    pass :attr:`call_kwargs` to the pipeline call.

    Args:
        pipe: the loaded pipeline.
        checkpoints: the chunk's checkpoints in the store.
        generator: the call's generator (its state is saved and restored).
        resume: look for a checkpoint to resume from (False: render from step 0).
    """

    def __init__(
        self, pipe: Any, checkpoints: StepCheckpoints, generator: torch.Generator, *, resume: bool
    ) -> None:
        self.pipe = pipe
        self.checkpoints = checkpoints
        self.generator = generator
        self.start: StepCheckpoint | None = checkpoints.load() if resume else None
        self.offset = self.start.step if self.start is not None else 0
        self._full: torch.Tensor | None = None
        self._first_step = True
        self._old_pred: torch.Tensor | None = None
        self._installed: list[tuple[Any, str]] = []

    @property
    def call_kwargs(self) -> dict[str, Any]:
        return {"callback_on_step_end": self._on_step_end,
                "callback_on_step_end_tensor_inputs": ["latents"]}  # fmt: skip

    # --- install -------------------------------------------------------------------
    def __enter__(self) -> StepHooks:
        sched = self.pipe.scheduler
        self._two_step = "old_pred_original_sample" in inspect.signature(sched.step).parameters
        self._patch(sched, "set_timesteps", self._set_timesteps_wrapper(sched.set_timesteps))
        self._patch(sched, "step", self._step_wrapper(sched.step))
        self._patch(self.pipe, "prepare_latents",
                    self._prepare_latents_wrapper(self.pipe.prepare_latents))  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        for obj, name in reversed(self._installed):
            vars(obj).pop(name, None)
        self._installed.clear()
        if self._full is not None:
            self.pipe.scheduler.timesteps = self._full

    def _patch(self, obj: Any, name: str, fn: Any) -> None:
        object.__setattr__(obj, name, fn)
        self._installed.append((obj, name))

    # --- the three seams -----------------------------------------------------------
    def _set_timesteps_wrapper(self, original: Any) -> Any:
        @functools.wraps(original)  # callers inspect its signature
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            sched = self.pipe.scheduler
            self._full = sched.timesteps
            start = self.start
            if start is None:
                return out
            saved = start.scheduler.get("timesteps")
            if saved is None or not _same(saved, self._full):
                raise CheckpointMismatch("its schedule differs from this call's")
            device = self.pipe._execution_device
            for name, value in start.scheduler.items():
                fresh = vars(sched).get(name)
                target = fresh.device if isinstance(fresh, torch.Tensor) else device
                setattr(sched, name, _unpack(value, target))
            sched.timesteps = self._full[start.step :]  # what the loop iterates over
            return out

        return set_timesteps

    def _prepare_latents_wrapper(self, original: Any) -> Any:
        @functools.wraps(original)  # callers inspect its signature
        def prepare_latents(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)  # draws from the generator as the stock call does
            start = self.start
            if start is None:
                return out
            latents = out[0] if isinstance(out, tuple) else out
            saved = start.latents
            if tuple(saved.shape) != tuple(latents.shape) or saved.dtype != latents.dtype:
                raise CheckpointMismatch(
                    f"its latents are {tuple(saved.shape)} {saved.dtype}, this call's "
                    f"{tuple(latents.shape)} {latents.dtype}"
                )
            resumed = saved.to(latents.device)
            if start.generator is not None:
                self.generator.set_state(start.generator)
            return (resumed, *out[1:]) if isinstance(out, tuple) else resumed

        return prepare_latents

    def _step_wrapper(self, original: Any) -> Any:
        @functools.wraps(original)  # callers inspect its signature
        def step(*args: Any, **kwargs: Any) -> Any:
            start, sched = self.start, self.pipe.scheduler
            if self._first_step:
                self._first_step = False
                if start is not None and self._full is not None:
                    sched.timesteps = self._full  # the loop has its slice; the scheduler the whole
                    if self._two_step and len(args) >= 4:
                        args = list(args)  # type: ignore[assignment]
                        if args[1] is None:
                            args[1] = _unpack(start.extra.get("old_pred"), args[0].device)  # type: ignore[index]
                        if args[3] is None:
                            args[3] = self._full[start.step - 1]  # type: ignore[index]
            out = original(*args, **kwargs)
            if self._two_step:
                self._old_pred = out[1] if isinstance(out, tuple) else out.pred_original_sample
            return out

        return step

    def _on_step_end(self, pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        ckpt = self.checkpoints
        ckpt.steps_run += 1
        done = self.offset + i + 1
        if ckpt.due(done):
            extra = {}
            if self._old_pred is not None:
                extra["old_pred"] = self._old_pred.detach().to("cpu").clone()
            ckpt.save(StepCheckpoint(
                key=ckpt.key, step=done, steps=ckpt.steps,
                latents=kwargs["latents"].detach().to("cpu").clone(),
                scheduler=scheduler_state(pipe.scheduler),
                generator=self.generator.get_state(), extra=extra,
            ))  # fmt: skip
        return {}
