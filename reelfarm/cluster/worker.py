"""The GPU worker: a long-lived Ray actor that keeps one model loaded and renders chunks.

One actor per GPU (or CPU slot). It loads a backend once and keeps it while chunks for
it remain, reads its conditioning (the previous chunk's tail) from the chunk store,
writes its output to the store, and returns only a small record: frames never pass
through the driver.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from reelfarm.cluster.store import ChunkRecord, ChunkStore
from reelfarm.errors import (
    BackendError,
    DependencyUnreadable,
    FarmError,
    GpuOutOfMemory,
    RenderError,
    StoreError,
)
from reelfarm.render.checkpoints import CheckpointPolicy
from reelfarm.render.identity import IdentityBundle
from reelfarm.schemas.film import AnimaticModel, DiffusersModel
from reelfarm.schemas.plan import ChunkPlan, ShotPlan
from reelfarm.schemas.qc import qc_reasons, take_key, take_seed

__all__ = ["ChunkWorker", "RenderReply", "load_key"]

logger = logging.getLogger(__name__)


def load_key(model: AnimaticModel | DiffusersModel) -> str:
    """Which loaded model a chunk needs: workers holding the same key can take it."""
    if isinstance(model, AnimaticModel):
        return "animatic"
    doc: dict[str, Any] = {k: getattr(model, k) for k in ("family", "id", "revision", "dtype")}
    if model.accel != type(model.accel)():  # hooks and kernels are set at load: another load
        doc["accel"] = model.accel.model_dump(mode="json")
    return "diffusers:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RenderReply:
    """What a worker returns for one chunk: small and picklable."""

    record: ChunkRecord
    worker: str
    node: str
    pid: int
    render_s: float
    loaded: bool  # this call loaded the model
    timings: dict[str, float] = field(default_factory=dict)
    take: int = 1  # the take committed under the chunk's key (schemas.qc)
    takes: int = 1  # takes rendered for this chunk
    # Manifest columns this chunk fills (identity_score, continuity_score, take, takes,
    # qc_flag, scores); the same dict is in the chunk's sidecar under "qc".
    qc: dict[str, Any] = field(default_factory=dict)
    steps_saved: int = 0  # sampling steps its takes resumed past (mid-chunk checkpoints)


def _decode_reference(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGBA") if "A" in im.getbands() else im.convert("RGB"))


class ChunkWorker:
    """A render worker. Wrapped with ``ray.remote`` by the scheduler (see ``Farm``).

    Args:
        worker_id: a name for logs and the manifest (``node-2/gpu-0``).
        chunk_delay_s: minimum seconds per chunk, a throttle for demos and failure drills.
        checkpoints: how often a chunk's sampler state is saved (render/checkpoints.py).
    """

    def __init__(self, worker_id: str, chunk_delay_s: float = 0.0,
                 checkpoints: CheckpointPolicy | None = None) -> None:
        self.worker_id = worker_id
        self.chunk_delay_s = chunk_delay_s
        self.checkpoint_policy = checkpoints or CheckpointPolicy()
        # Set from the farm (another thread: the "control" concurrency group) when this
        # worker's node is draining: the running chunk checkpoints at its next step end.
        self._checkpoint_now = threading.Event()
        self.node = socket.gethostname()
        self._backend: Any = None
        self._backend_key: str | None = None
        self._low_memory = False
        self.model_loads = 0
        self.identity_encodes = 0
        self.device = self._pick_device()
        self._gpus = len(ray.get_gpu_ids()) if ray.is_initialized() else 0  # GPUs Ray gave it

    # --- plumbing ----------------------------------------------------------------
    @staticmethod
    def _pick_device() -> str:
        # torch is imported here, in the worker process, never in the driver.
        import torch

        if torch.cuda.is_available():
            return "cuda"
        # Ray gives a num_cpus=1 actor OMP_NUM_THREADS=1; honour what Ray assigned.
        cpus = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
        torch.set_num_threads(max(1, cpus))
        return "cpu"

    def info(self) -> dict[str, Any]:
        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "node": self.node,
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": self.device,
            **self._gpu_info(),
            "model": self._backend_key,
            "model_loads": self.model_loads,
            "identity_encodes": self.identity_encodes,
        }

    @ray.method(concurrency_group="control")
    def checkpoint_now(self) -> bool:
        """Ask the running chunk to save a checkpoint at its next step end (its node is being
        drained: if the node goes before the chunk ends, it resumes elsewhere from there).
        Runs beside ``render`` (see ``Farm``: the actor's "control" concurrency group)."""
        self._checkpoint_now.set()
        return True

    def _gpu_info(self) -> dict[str, Any]:
        """The GPU this worker renders on: name, total memory (GiB) and how many Ray gave it.
        On CPU (or on GPUs Ray counts but torch cannot see) name and memory are None."""
        import torch

        if not self.device.startswith("cuda"):
            return {"gpu": None, "gpu_memory_gib": None, "gpus": self._gpus}
        props = torch.cuda.get_device_properties(self.device)
        return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 2), "gpus": self._gpus}

    def _ensure(self, model: AnimaticModel | DiffusersModel) -> bool:
        """Load ``model`` unless it is the one held. Returns True when it loaded."""
        key = load_key(model)
        if self._backend_key == key:
            return False
        if self._backend is not None:
            self._backend.close()  # one model per GPU: free it before the next
            self._backend = None
            self._backend_key = None
        from reelfarm.render.base import load_backend

        self._backend = load_backend(model, device=self.device)
        if self._gpus > 1:  # gpus_per_worker: the chunk split across them (render/parallel.py)
            from reelfarm.render.parallel import split_backend

            self._backend = split_backend(self._backend, model, self.device, self._gpus)
        self._backend_key = key
        self._low_memory = False
        self.model_loads += 1
        return True

    # --- work --------------------------------------------------------------------
    def encode_identity(self, model: AnimaticModel | DiffusersModel, character: str, reference: bytes,
                        sha256: str, key: str, store: ChunkStore) -> IdentityBundle:
        """Encode one character's identity from its reference's bytes, store it, return it."""
        self._ensure(model)
        try:
            image = _decode_reference(reference)
        except Exception as e:  # noqa: BLE001 - any decode failure is the reference's fault
            raise BackendError(f"character {character!r}: reference is not a readable image: {e}") from None
        bundle = self._backend.encode_identity(character, image, sha256)
        store.put_identity(key, bundle.to_bytes())
        self.identity_encodes += 1
        return bundle

    def render(self, shot: ShotPlan, chunk: ChunkPlan, store: ChunkStore, names: list[str],
               *identities: IdentityBundle, low_memory: bool = False, run_id: str = "",
               attempt: int = 1) -> RenderReply:
        """Render one chunk and commit it to the store. Identities arrive resolved by Ray."""
        t0 = time.perf_counter()
        loaded = self._ensure(shot.model)
        if low_memory and not self._low_memory:
            self._backend.low_memory()
            self._low_memory = True
        t1 = time.perf_counter()
        try:
            condition = self._condition(shot, chunk, store)
        except StoreError as e:
            # The chunk this one continues from went missing or corrupt: the farm renders
            # that one again, then this one.
            raise DependencyUnreadable(f"{chunk.name}: cannot continue from {chunk.depends_on}: {e}",
                                       str(chunk.depends_on)) from None
        t2 = time.perf_counter()
        # The take loop (schemas.qc): render, score, and while the take misses the shot's
        # qc policy and takes remain, render again with the next take's seed. A missed take
        # is committed under its own take key (it stays in storage); the chunk's own key
        # commits the best take. Kept inside the worker so the scheduler and the farm see one
        # chunk whatever its takes (and a policy every take meets renders nothing extra).
        policy = shot.qc
        allowed = policy.takes if policy is not None else 1
        bundles = dict(zip(names, identities, strict=True))
        history: list[dict[str, Any]] = []
        best: tuple[tuple[bool, float, float], int, Any, Any, list[str]] | None = None
        render_s = 0.0
        steps: list[Any] = []  # each take's checkpoints, deleted once the chunk commits
        for take in range(1, allowed + 1):
            seed = take_seed(chunk.seed, take)
            take_chunk = chunk if take == 1 else chunk.model_copy(update={"seed": seed})
            ts = time.perf_counter()
            ckpt = self._checkpoints(shot, take_chunk, store, chunk.key if take == 1 else take_key(chunk.key, take))
            steps.append(ckpt)
            out = self._render_take(shot, take_chunk, bundles, condition, ckpt)
            render_s += time.perf_counter() - ts
            scores = self._score(shot, chunk, out, bundles, condition)
            identity = scores.identity(policy.metric if policy is not None else "region")
            reasons = qc_reasons(policy, identity, scores.seam)
            entry: dict[str, Any] = {"take": take, "seed": seed, "identity": identity, "seam": scores.seam,
                                     "reasons": reasons, "scores": scores.to_doc(), "key": None}
            history.append(entry)
            rank = (not reasons, identity if identity is not None else 0.0,
                    -(scores.seam if scores.seam is not None else 0.0))
            if best is None or rank > best[0]:
                best = (rank, take, out, scores, reasons)
            if not reasons:
                break
            if allowed > 1:  # every missed take stays in storage under its own key
                entry["key"] = take_key(chunk.key, take)
                store.write_chunk(entry["key"], out, meta={**out.meta, "chunk": chunk.name, "take": take,
                                                           "seed": seed, "run_id": run_id, "qc": entry})
        assert best is not None
        _, take, out, scores, reasons = best
        t3 = time.perf_counter()
        if self.chunk_delay_s:
            time.sleep(max(0.0, self.chunk_delay_s - (t3 - t0)))
        metric = policy.metric if policy is not None else "region"
        qc = {
            "identity_score": scores.identity(metric),
            "continuity_score": scores.continuity_score(),
            "take": take,
            "takes": len(history),
            "qc_flag": "; ".join(reasons) or None,
            "scores": json.dumps({"metric": metric, "take": take, **scores.to_doc(),
                                  "takes": [{k: v for k, v in h.items() if k != "scores"} for h in history]},
                                 sort_keys=True),
        }
        meta = {
            **out.meta,
            "chunk": chunk.name, "key": chunk.key, "seed": take_seed(chunk.seed, take), "run_id": run_id,
            "attempt": attempt, "worker": self.worker_id, "node": self.node, "pid": os.getpid(),
            "device": self.device, "low_memory": self._low_memory,
            "timings": {"load_s": t1 - t0, "condition_s": t2 - t1, "render_s": render_s,
                        "takes_s": t3 - t2},
            "qc": qc,
        }
        record = store.write_chunk(chunk.key, out, meta=meta)
        for ckpt in steps:
            if ckpt is not None:
                ckpt.clear()
        t4 = time.perf_counter()
        return RenderReply(record=record, worker=self.worker_id, node=self.node, pid=os.getpid(),
                           render_s=t4 - t0, loaded=loaded,
                           timings={"load_s": t1 - t0, "render_s": render_s, "write_s": t4 - t3},
                           take=take, takes=len(history), qc=qc,
                           steps_saved=sum(c.resumed_from for c in steps if c is not None))

    def _checkpoints(self, shot: ShotPlan, chunk: ChunkPlan, store: ChunkStore, key: str) -> Any:
        """The take's mid-chunk checkpoints, where the backend samples in steps."""
        make = getattr(self._backend, "step_checkpoints", None)
        ckpt = None if make is None else make(store, key, shot, chunk, self.checkpoint_policy)
        if ckpt is not None:
            ckpt.requested = self._checkpoint_now
        return ckpt

    def _render_take(self, shot: ShotPlan, chunk: ChunkPlan, bundles: dict[str, IdentityBundle],
                     condition: Any, checkpoints: Any = None) -> Any:
        """One backend call, its failures classified (and pickle-safe)."""
        try:
            if checkpoints is not None:
                return self._backend(shot, chunk, bundles, condition, checkpoints=checkpoints)
            return self._backend(shot, chunk, bundles, condition)
        except FarmError:
            raise
        except Exception as e:  # noqa: BLE001 - classify, keep the message, pickle-safe
            import torch

            if isinstance(e, torch.OutOfMemoryError):
                raise GpuOutOfMemory(f"{chunk.name}: out of memory on {self.worker_id}: {e}") from None
            tb = traceback.format_exc(limit=3)
            raise RenderError(f"{chunk.name}: {type(e).__name__}: {e}\n{tb}") from None

    def _score(self, shot: ShotPlan, chunk: ChunkPlan, out: Any, bundles: dict[str, IdentityBundle],
               condition: Any) -> Any:
        """Identity, continuity and seam scores of one take (render.scores)."""
        from reelfarm.render.scores import load_embedder, score_chunk

        policy = shot.qc
        try:
            embedder = (load_embedder(policy.embedding_model, self.device)
                        if policy is not None and policy.embedding_model else None)
        except Exception as e:  # noqa: BLE001 - a wrong path is the spec's fault: say which
            raise BackendError(f"{chunk.name}: `qc.embedding_model` {policy.embedding_model!r} "  # type: ignore[union-attr]
                               f"cannot be loaded: {type(e).__name__}: {e}") from None
        return score_chunk(shot, chunk, out.frames, bundles, policy, condition=condition, embedder=embedder)

    def _condition(self, shot: ShotPlan, chunk: ChunkPlan, store: ChunkStore):
        """The previous chunk's tail, read from storage, for a chained chunk; for a chunk that
        starts from the shot's keyframe, that keyframe (made by the keyframe stage), if any."""
        from reelfarm.render.base import Condition

        if not chunk.depends_on:
            if shot.keyframe is None:
                return None
            try:
                return Condition(image=store.read_frames(shot.keyframe.key)[0])
            except StoreError as e:  # not a dependency the farm can render: the stage makes it
                raise BackendError(f"{chunk.name}: the keyframe of shot {shot.shot_id!r} is not readable "
                                   f"(the keyframe stage commits it before any chunk): {e}") from None

        # One frame of the previous chunk (decoded alone: FFV1 frames are all keyframes).
        return Condition(image=store.read_frame(chunk.depends_on, shot.continuation_frame(chunk)),
                         latents=store.read_latents(chunk.depends_on))

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
            self._backend_key = None
