"""Mid-chunk checkpoints on every diffusers family: a render killed after its checkpoint at
step k of n resumes in a fresh backend, runs n - k steps, and gives the uninterrupted
chunk's frames and latents bit for bit. Bad checkpoints are ignored, never resumed from.

Besides each family's tiny pipeline as saved, the schedulers the published models ship
with, which keep state between steps: Wan 2.1's UniPC (multistep history) and
CogVideoX-5B's DPM (the previous step's prediction passed back into ``step``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from reelfarm.cluster.store import ChunkStore
from reelfarm.render.base import load_backend
from reelfarm.render.checkpoints import CheckpointPolicy, StepCheckpoint, StepCheckpoints
from reelfarm.render.diffusers import DiffusersBackend

try:  # tests/ has no __init__.py: import the helper either way pytest set sys.path
    from tests.render import tiny_pipelines as tp
except ImportError:  # pragma: no cover - depends on how pytest set sys.path
    import tiny_pipelines as tp  # type: ignore[no-redef]

STEPS = 4
KILL_AT = 2
# family, scheduler swapped in after loading (None: the tiny pipeline's own)
CASES = [(f, None) for f in tp.FAMILIES] + [("wan", "unipc"), ("cogvideox", "dpm")]


class Killed(Exception):
    """Stands in for the worker process dying right after a checkpoint was written."""


class KilledAfter(StepCheckpoints):
    def __init__(self, *args, kill_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kill_at = kill_at

    def save(self, checkpoint: StepCheckpoint) -> None:
        super().save(checkpoint)
        if checkpoint.step == self.kill_at:
            raise Killed


def _scheduler(kind: str | None, pipe) -> None:
    if kind == "unipc":  # as Wan 2.1's model folders configure it
        from diffusers import UniPCMultistepScheduler

        pipe.scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
            num_train_timesteps=1000, solver_order=2)  # fmt: skip
    elif kind == "dpm":  # CogVideoX-5B I2V's
        from diffusers import CogVideoXDPMScheduler

        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)


def _backend(family: str, scheduler: str | None) -> DiffusersBackend:
    be = load_backend(tp.tiny_model(family, str(tp.saved_model_dir(family)), steps=STEPS))
    assert isinstance(be, DiffusersBackend)
    _scheduler(scheduler, be.pipe)
    return be


def _ids(be: DiffusersBackend) -> dict:
    ref = tp.reference_image(48)
    return {"flame": be.encode_identity("flame", ref, hashlib.sha256(ref.tobytes()).hexdigest())}


def _files(store: ChunkStore, key: str) -> list[str]:
    folder = Path(store.root) / "checkpoints" / key
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize(("family", "scheduler"), CASES, ids=[f"{f}-{s or 'own'}" for f, s in CASES])
def test_killed_render_resumes_elsewhere_bit_identical(family, scheduler, tmp_path) -> None:
    store = ChunkStore(str(tmp_path / "out"))
    be = _backend(family, scheduler)
    shot = tp.tiny_shot(be.model, chunks=1)
    chunk = shot.chunks[0]
    ids = _ids(be)
    plain = be(shot, chunk, ids)  # no checkpoints at all

    # Checkpointing every step does not change the frames, and counts what it did.
    every = StepCheckpoints(store, "whole", STEPS, every=1)
    whole = be(shot, chunk, ids, checkpoints=every)
    np.testing.assert_array_equal(whole.frames, plain.frames)
    assert (every.steps_run, every.saved, every.resumed_from) == (STEPS, STEPS - 1, 0)
    assert _files(store, "whole") == [f"step-{STEPS - 1:05d}.pt"]  # only the last is kept

    # Killed right after the checkpoint at step 2 of 4...
    with pytest.raises(Killed):
        be(shot, chunk, ids, checkpoints=KilledAfter(store, chunk.key, STEPS, every=1, kill_at=KILL_AT))
    assert _files(store, chunk.key) == [f"step-{KILL_AT:05d}.pt"]
    be.close()

    # ...and resumed by another worker: a fresh backend loaded from the same folder.
    other = _backend(family, scheduler)
    ckpt = StepCheckpoints(store, chunk.key, STEPS, every=1)
    resumed = other(shot, chunk, _ids(other), checkpoints=ckpt)
    assert (ckpt.resumed_from, ckpt.steps_run) == (KILL_AT, STEPS - KILL_AT)
    assert resumed.meta["checkpoints"]["steps_saved"] == KILL_AT and not ckpt.ignored
    np.testing.assert_array_equal(resumed.frames, plain.frames)
    torch.testing.assert_close(resumed.latents, plain.latents, rtol=0, atol=0)
    ckpt.clear()
    assert _files(store, chunk.key) == []
    other.close()


@pytest.fixture(scope="module")
def ltx() -> DiffusersBackend:
    be = _backend("ltx", None)
    yield be
    be.close()


def _killed_at(be: DiffusersBackend, store: ChunkStore, shot, key: str) -> Path:
    with pytest.raises(Killed):
        be(shot, shot.chunks[0], _ids(be), checkpoints=KilledAfter(store, key, STEPS, every=1, kill_at=KILL_AT))
    return Path(store.root) / "checkpoints" / key / f"step-{KILL_AT:05d}.pt"


@pytest.mark.parametrize("bad", ["garbage", "truncated", "other key", "other size"])
def test_a_bad_checkpoint_is_ignored_and_the_chunk_renders_from_step_0(ltx, bad, tmp_path) -> None:
    store = ChunkStore(str(tmp_path / "out"))
    shot = tp.tiny_shot(ltx.model, chunks=1)
    chunk = shot.chunks[0]
    plain = ltx(shot, chunk, _ids(ltx))
    target = Path(store.root) / "checkpoints" / chunk.key / f"step-{KILL_AT:05d}.pt"
    if bad in ("garbage", "truncated"):
        good = _killed_at(ltx, store, shot, chunk.key).read_bytes()
        target.write_bytes(b"\x00not a checkpoint" if bad == "garbage" else good[: len(good) // 2])
    elif bad == "other key":  # a valid checkpoint, copied under this chunk's key
        data = _killed_at(ltx, store, shot, "another-chunk").read_bytes()
        target.parent.mkdir(parents=True)
        target.write_bytes(data)
    else:  # same key and steps, but made for a larger picture: its latents do not fit
        big = tp.tiny_shot(ltx.model, chunks=1, size=2 * tp.TINY_SIZE)
        _killed_at(ltx, store, big, chunk.key)
    ckpt = StepCheckpoints(store, chunk.key, STEPS, every=0)
    out = ltx(shot, chunk, _ids(ltx), checkpoints=ckpt)
    assert (ckpt.resumed_from, ckpt.steps_run) == (0, STEPS)
    assert len(ckpt.ignored) == 1 and "ignored" in ckpt.ignored[0]
    want = {"garbage": "unreadable", "truncated": "unreadable", "other key": "another-chunk",
            "other size": "latents"}[bad]  # fmt: skip
    assert want in ckpt.ignored[0]
    np.testing.assert_array_equal(out.frames, plain.frames)


def test_policy_by_chunk_cost() -> None:
    auto = CheckpointPolicy(interval_s=120.0)
    assert auto.every_for(40, est_gpu_s=100.0) == 0  # shorter than two intervals: none
    assert auto.every_for(40, est_gpu_s=1200.0) == 4  # 30 s a step: every 4 steps = 120 s
    assert auto.every_for(10, est_gpu_s=10_000.0) == 1  # 1,000 s a step: every step
    assert CheckpointPolicy(every=5).every_for(40, 1.0) == 5
    assert CheckpointPolicy(every=0).every_for(40, 1e6) == 0
    assert CheckpointPolicy(every=40).every_for(40, 1e6) == 0  # after the last step: never


def test_a_step_cache_is_not_checkpointed(tmp_path) -> None:
    model = tp.tiny_model("ltx", str(tp.saved_model_dir("ltx")), steps=STEPS,
                          accel={"cache": {"kind": "first_block", "threshold": 0.05}})
    shot = tp.tiny_shot(model, chunks=1)
    be = DiffusersBackend.__new__(DiffusersBackend)  # step_checkpoints reads only the shot
    store = ChunkStore(str(tmp_path))
    assert be.step_checkpoints(store, "k", shot, shot.chunks[0], CheckpointPolicy(every=1)) is None
    plain = shot.model_copy(update={"model": tp.tiny_model("ltx", "x", steps=STEPS)})
    ckpt = be.step_checkpoints(store, "k", plain, plain.chunks[0], CheckpointPolicy(every=1))
    assert ckpt is not None and ckpt.every == 1 and ckpt.steps == STEPS
