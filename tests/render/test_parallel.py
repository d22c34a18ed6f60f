"""Context parallelism on the CPU: the tiny Wan pipeline renders one chunk through the
backend in two gloo processes, its transformer split by diffusers' Ulysses attention, and
the frames equal one process's exactly (reelfarm/render/parallel.py says what the installed
diffusers and torch allow, and why ring and ``enable_parallelism`` do not run on the CPU)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from reelfarm.errors import BackendError
from reelfarm.render.diffusers import DiffusersBackend
from reelfarm.render.parallel import enable_context_parallel
from reelfarm.schemas.film import DiffusersModel

try:
    from tests.render import tiny_pipelines as tp
except ImportError:  # pragma: no cover
    import tiny_pipelines as tp  # type: ignore[no-redef]

SIZE = 32  # 3 latent frames x 2 x 2 patches: 12 tokens, split 6 and 6


def _model() -> DiffusersModel:
    return DiffusersModel(backend="diffusers", family="wan", id="tiny", steps=2, dtype="float32",
                          chunk_frames=tp.TINY_FRAMES["wan"], overlap=1, max_sequence_length=512)


def _render(parallel: bool) -> tuple[np.ndarray, set[int]]:
    """One chunk's frames, and the token counts the second transformer block saw."""
    torch.set_num_threads(1)
    be = DiffusersBackend.from_pipeline(tp.build_pipeline("wan"), _model())
    if parallel:
        enable_context_parallel(be.pipe.transformer)
    seen: set[int] = set()
    be.pipe.transformer.blocks[1].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.add((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True)
    shot = tp.tiny_shot(be.model, chunks=1, size=SIZE)
    ids = {"flame": be.encode_identity("flame", tp.reference_image(48), "0" * 64)}
    return be(shot, shot.chunks[0], ids).frames, seen


def _rank(rank: int, world: int, port: int, queue) -> None:  # a spawned process
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, "ok", _render(parallel=True)))
    except Exception as e:  # noqa: BLE001 - reported to the test
        queue.put((rank, "error", f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ulysses_on_two_cpu_ranks_renders_the_frames_of_one_process():
    stock, tokens = _render(parallel=False)
    assert tokens == {12}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            rank, status, value = queue.get(timeout=300)
            assert status == "ok", f"rank {rank}: {value}"
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert stock.shape == (tp.TINY_FRAMES["wan"], SIZE, SIZE, 3)
    for frames, seen in results.values():
        assert seen == {6}, "each rank's blocks see half of the tokens: the split engaged"
        np.testing.assert_array_equal(frames, stock)


def test_context_parallel_is_refused_without_a_process_group_or_a_plan():
    pipe = tp.build_pipeline("wan")
    with pytest.raises(BackendError, match="no torch.distributed process group"):
        enable_context_parallel(pipe.transformer)
    cog = tp.build_pipeline("cogvideox")
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(BackendError, match=r"CogVideoXTransformer3DModel declares no context-parallel plan"):
            enable_context_parallel(cog.transformer)
        with pytest.raises(BackendError, match=r"`ring` needs a CUDA attention kernel"):
            enable_context_parallel(pipe.transformer, kind="ring")
        with pytest.raises(BackendError, match=r"needs at least 2 ranks, got 1"):
            enable_context_parallel(pipe.transformer)
    finally:
        dist.destroy_process_group()
