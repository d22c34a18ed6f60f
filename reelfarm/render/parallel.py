"""Context parallelism: one chunk's denoiser split across several processes (one per GPU).

Every rank runs the same pipeline call with the same seed; diffusers' context-parallel hooks
split the transformer's token sequence across the ranks at its first block and gather it at
``proj_out`` (the model's ``_cp_plan``), and attention exchanges heads between ranks
(Ulysses: all-to-all) or passes key/value chunks round a ring. Encoders and the VAE run
whole on every rank. The frames come out the same on every rank.

What the installed stack allows (diffusers 0.42.1, torch 2.13), measured on the tiny Wan
transformer with two gloo processes (tests/render/test_parallel.py):

- ``ModelMixin.enable_parallelism`` does not run on a torch without an accelerator: its
  ``_resolve_parallel_config`` picks the device as ``rank % torch.accelerator.device_count()``
  and that count is 0 (ZeroDivisionError). On the CPU this module builds the same mesh and
  config itself and installs diffusers' own hooks (``apply_context_parallel``, the attention
  processors' ``_parallel_config``), which is what ``enable_parallelism`` does after that line.
  On CUDA it calls ``enable_parallelism``.
- Ulysses on gloo works on the CPU and matches one process exactly.
- Ring attention needs a kernel that returns the log-sum-exp (flash, sage, cuDNN); diffusers'
  native kernel refuses (``Native attention does not support return_lse=True``), so ring is
  refused here on the CPU.
- Families: the denoiser must declare a ``_cp_plan`` (Wan, LTX-Video in 0.42; Wan VACE, CogVideoX's
  transformer and SVD's UNet do not).

Torch is imported inside the functions: the planner imports nothing of this.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Literal

from reelfarm.errors import BackendError

logger = logging.getLogger(__name__)

__all__ = ["CP_FAMILIES", "SplitBackend", "enable_context_parallel", "split_backend"]

# Families whose denoiser declares a context-parallel plan in diffusers 0.42.
CP_FAMILIES = ("wan", "ltx")


def enable_context_parallel(denoiser: Any, *, kind: Literal["ulysses", "ring"] = "ulysses") -> Any:
    """Split ``denoiser`` across every rank of the initialised default process group.

    Args:
        denoiser: a diffusers transformer with a ``_cp_plan``.
        kind: ``ulysses`` (all-to-all of heads: the head count must divide by the ranks) or
            ``ring`` (needs a CUDA kernel with log-sum-exp).

    Returns:
        The diffusers ``ParallelConfig`` installed.

    Raises:
        BackendError: no process group, a denoiser without a plan, ring on the CPU, one rank.
    """
    import torch
    import torch.distributed as dist
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    name = type(denoiser).__name__
    if not (dist.is_available() and dist.is_initialized()):
        raise BackendError(f"context parallelism for {name}: no torch.distributed process group")
    if getattr(denoiser, "_cp_plan", None) is None:
        raise BackendError(f"context parallelism: {name} declares no context-parallel plan "
                           f"(diffusers 0.42 has one for the {', '.join(CP_FAMILIES)} families)")
    accelerated = torch.accelerator.is_available() and torch.accelerator.device_count() > 0
    if kind == "ring" and not accelerated:
        raise BackendError(f"context parallelism for {name}: `ring` needs a CUDA attention kernel "
                           "that returns the log-sum-exp; on the CPU use `ulysses`")
    world = dist.get_world_size()
    if world < 2:
        raise BackendError(f"context parallelism for {name} needs at least 2 ranks, got {world}")
    cp = ContextParallelConfig(**{f"{kind}_degree": world})
    if accelerated:
        denoiser.enable_parallelism(config=cp)
        return denoiser._parallel_config
    # CPU (gloo): what enable_parallelism does, past the device pick that divides by 0.
    from diffusers.hooks.context_parallel import apply_context_parallel

    config = ParallelConfig(context_parallel_config=cp)
    mesh = dist.device_mesh.init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), world, torch.device("cpu"), mesh=mesh)
    denoiser._parallel_config = config
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(denoiser, cp, denoiser._cp_plan)
    logger.debug("%s: context parallel (%s) over %d CPU ranks", name, kind, world)
    return config


def _rank_main(rank: int, world: int, port: int, model: Any, device: str, jobs: Any, replies: Any) -> None:
    """A helper rank (a spawned process): load the model, join the group, render what rank 0
    renders (its frames are rank 0's; only the errors come back)."""
    import torch.distributed as dist

    from reelfarm.render.base import load_backend

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=rank, world_size=world)
    try:
        backend = load_backend(model, device=device)
        enable_context_parallel(backend.pipe.transformer)
        replies.put((rank, None))
        while (job := jobs.get()) is not None:
            try:
                backend(*job)
                replies.put((rank, None))
            except Exception as e:  # noqa: BLE001 - rank 0 raises it
                replies.put((rank, f"{type(e).__name__}: {e}"))
    except Exception as e:  # noqa: BLE001
        replies.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SplitBackend:
    """A diffusers backend whose chunks are split across ``world`` ranks of one worker.

    This process is rank 0: it holds ``backend`` and returns the frames. Ranks 1.. are spawned
    processes with their own copy of the model (device ``cuda:r``, or the CPU), fed each chunk
    through a queue. Encoders and the VAE run whole on every rank; the denoiser is split.
    """

    # Not checkpointed mid-chunk: every rank would have to resume from the same step
    # (render/checkpoints.py); the worker sees no ``step_checkpoints`` and passes none.
    step_checkpoints = None

    def __init__(self, backend: Any, model: Any, device: str, world: int) -> None:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        self.backend, self.model, self.world = backend, model, world
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._jobs = [ctx.Queue() for _ in range(1, world)]
        self._replies = ctx.Queue()
        self._procs = []
        for rank in range(1, world):
            dev = f"cuda:{rank}" if device.startswith("cuda") else "cpu"
            p = ctx.Process(target=_rank_main, args=(rank, world, port, model, dev, self._jobs[rank - 1],
                                                     self._replies), daemon=True)
            p.start()
            self._procs.append(p)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=0, world_size=world)
        enable_context_parallel(backend.pipe.transformer)
        self._gather("start")

    def _gather(self, what: str) -> None:
        errors = []
        for _ in self._procs:
            rank, err = self._replies.get(timeout=3600)
            if err:
                errors.append(f"rank {rank}: {err}")
        if errors:
            raise BackendError(f"{self.model.id}: context-parallel {what} failed: " + "; ".join(errors))

    def __getattr__(self, name: str) -> Any:  # encode_identity, low_memory, pipe...
        return getattr(self.backend, name)

    def __call__(self, shot: Any, chunk: Any, identities: Any, condition: Any = None) -> Any:
        for q in self._jobs:
            q.put((shot, chunk, identities, condition))
        out = self.backend(shot, chunk, identities, condition)
        self._gather(chunk.name)
        out.meta["context_parallel"] = {"kind": "ulysses", "ranks": self.world}
        return out

    def close(self) -> None:
        import torch.distributed as dist

        for q in self._jobs:
            q.put(None)
        for p in self._procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        self._procs = []
        if dist.is_initialized():
            dist.destroy_process_group()
        self.backend.close()


def split_backend(backend: Any, model: Any, device: str, gpus: int) -> Any:
    """``backend`` split across ``gpus`` ranks when the model can be (a diffusers family with a
    context-parallel plan); otherwise ``backend`` itself, on one GPU of the worker's."""
    if gpus < 2 or getattr(model, "backend", None) != "diffusers":
        return backend
    if model.family not in CP_FAMILIES:
        logger.warning("%s: the %s family has no context-parallel plan; it renders on one of "
                       "the worker's %d GPUs", model.id, model.family, gpus)
        return backend
    return SplitBackend(backend, model, device, gpus)
